//! `keyserver`: verifies trusted-loader evidence and releases wrapped keys.
//!
//! ```sh
//! keyserver init --state /var/lib/cinfer-keyserver --kek /etc/cinfer/kek
//! keyserver --state … --kek … add-model-key --id smollm2 --key-file model.key
//! keyserver --state … --kek … public-identity
//! keyserver --config keyserver.toml serve
//! ```
//!
//! The KEK file may also be named by `$CINFER_KEYSERVER_KEK_FILE` (e.g. a
//! `systemd-creds` credential under `$CREDENTIALS_DIRECTORY`).

use anyhow::{Context, Result, bail};
use cinfer_keyserver::state::parse_model_key_file;
use cinfer_keyserver::{Config, KeyServer, StateDir, SystemClock};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroizing;

const KEK_ENV: &str = "CINFER_KEYSERVER_KEK_FILE";

#[derive(Parser)]
#[command(
    name = "keyserver",
    version,
    about = "cinfer keyserver: verifies loader evidence, releases wrapped keys",
    long_about = format!(
        "cinfer keyserver: verifies a loader's TPM quote and/or TD quote against pinned reference values, \
and releases keys wrapped to its attested key.\n\n{}",
        cinfer_keyserver::config::HELP
    )
)]
struct Cli {
    /// Configuration file (TOML); `--help` lists its keys.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// State directory (overrides the configuration's state-dir).
    #[arg(long, global = true)]
    state: Option<PathBuf>,
    /// Key-encryption-key file (overrides $CINFER_KEYSERVER_KEK_FILE and kek-file).
    #[arg(long, global = true)]
    kek: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the KEK file (if absent), the state directory, the identity key and a request key.
    Init,
    /// Import a model data key (a file written by `cinfer dev-model-key`).
    AddModelKey {
        /// Model id the key is released as.
        #[arg(long)]
        id: String,
        /// The key file.
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Import this keyserver's share of a split key (k-of-n keyservers: a
    /// file `cinfer split-key` wrote for it). The share file can be deleted
    /// afterwards; the state keeps it encrypted under the KEK.
    AddShare {
        /// The share file.
        #[arg(long)]
        share_file: PathBuf,
    },
    /// Print the identity public key (hex, uncompressed SEC1) for clients to pin.
    PublicIdentity,
    /// Serve the HTTP API (needs --config).
    Serve,
}

impl Cli {
    fn config(&self) -> Result<Option<Config>> {
        self.config
            .as_deref()
            .map(|p| Config::load(p).map_err(anyhow::Error::from))
            .transpose()
    }

    /// State dir and KEK file: flags, then the environment (KEK), then the configuration.
    fn state_and_kek(&self, config: Option<&Config>) -> Result<(PathBuf, PathBuf)> {
        let state = self
            .state
            .clone()
            .or_else(|| config.map(|c| c.state_dir.clone()))
            .context("no state directory: give --state or --config")?;
        let kek = self
            .kek
            .clone()
            .or_else(|| std::env::var_os(KEK_ENV).map(PathBuf::from))
            .or_else(|| {
                config
                    .map(|c| c.kek_file.clone())
                    .filter(|p| !p.as_os_str().is_empty())
            })
            .with_context(|| format!("no KEK file: give --kek, ${KEK_ENV} or kek-file"))?;
        Ok((state, kek))
    }
}

fn add_model_key(state: &Path, kek: &Path, id: &str, key_file: &Path) -> Result<()> {
    let text = Zeroizing::new(
        std::fs::read_to_string(key_file)
            .with_context(|| format!("reading {}", key_file.display()))?,
    );
    let key = parse_model_key_file(&text)?;
    StateDir::open(state, kek)?.add_model_key(id, &key)?;
    eprintln!("stored model key {id:?} (encrypted under the KEK)");
    Ok(())
}

fn serve(cli: &Cli) -> Result<()> {
    let Some(mut config) = cli.config()? else {
        bail!("serve needs --config");
    };
    let (state, kek) = cli.state_and_kek(Some(&config))?;
    config.state_dir = state;
    config.kek_file = kek;
    let listen = config.listen;
    let server = KeyServer::new(config, Arc::new(SystemClock)).context("starting the keyserver")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        tracing::info!(
            "keyserver listening on {}, identity {}",
            listener.local_addr()?,
            hex::encode(server.identity_public_key())
        );
        let shutdown = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!("waiting for Ctrl-C: {e}");
                std::future::pending::<()>().await;
            }
            tracing::info!("shutting down");
        };
        cinfer_keyserver::serve_until(listener, server, shutdown).await;
        Ok(())
    })
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Init => {
            let config = cli.config()?;
            let (state, kek) = cli.state_and_kek(config.as_ref())?;
            let dir = StateDir::init(&state, &kek)?;
            let keys = dir.load()?;
            eprintln!(
                "initialized {} (KEK {}); request key id {}",
                state.display(),
                kek.display(),
                keys.request.public_key().key_id()
            );
            println!(
                "{}",
                hex::encode(cinfer_keyserver::server::identity_public_key(&keys))
            );
            Ok(())
        }
        Command::AddModelKey { id, key_file } => {
            let config = cli.config()?;
            let (state, kek) = cli.state_and_kek(config.as_ref())?;
            add_model_key(&state, &kek, id, key_file)
        }
        Command::AddShare { share_file } => {
            let config = cli.config()?;
            let (state, kek) = cli.state_and_kek(config.as_ref())?;
            let bytes = Zeroizing::new(
                std::fs::read(share_file)
                    .with_context(|| format!("reading {}", share_file.display()))?,
            );
            let name = StateDir::open(&state, &kek)?.add_share(&bytes)?;
            eprintln!("stored share {name} (encrypted under the KEK)");
            Ok(())
        }
        Command::PublicIdentity => {
            let config = cli.config()?;
            let (state, kek) = cli.state_and_kek(config.as_ref())?;
            let keys = StateDir::open(&state, &kek)?.load()?;
            println!(
                "{}",
                hex::encode(cinfer_keyserver::server::identity_public_key(&keys))
            );
            Ok(())
        }
        Command::Serve => serve(cli),
    }
}

fn main() -> std::process::ExitCode {
    cinfer_log::init("keyserver", cinfer_log::LevelFilter::INFO);
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
