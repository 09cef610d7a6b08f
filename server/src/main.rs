//! `inference-server`: the untrusted relay between clients, the trusted loader
//! and keyservers.
//!
//! ```sh
//! inference-server keygen --out channel.key   # prints the public key for the loader's server-keys
//! inference-server --config server.toml
//! ```
//!
//! Configuration keys and defaults (all optional; plain `http://` keyservers only
//! in this version):
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! loader = "tcp:127.0.0.1:7300"           # or unix:/run/cinfer/loader.sock
//! channel-key = "channel.key"             # signs the loader's challenge (no default; `keygen`)
//! keyservers = ["http://127.0.0.1:8740"]
//! max-request-bytes = 1048576
//! max-connections = 128                   # more are closed at once
//! max-in-flight = 8                       # requests running on the loader at once (the loader's max-in-flight)
//! max-queued = 64                         # requests waiting for a place; more are 429 with Retry-After
//! header-timeout-ms = 10000               # then the connection is closed
//! body-timeout-ms = 10000                 # then 408
//! ready-timeout-ms = 5000
//! reconnect-backoff-ms = 200              # doubles, capped at 5 s
//! max-frame-bytes = 16777216
//! request-timeout-ms = 120000
//! keyserver-timeout-ms = 5000
//! loader-timeout-ms = 30000
//! shutdown-grace-ms = 10000
//! tls-cert = "server.pem"                 # TLS on the listener (both or neither)
//! tls-key = "server.key"
//! ```
//!
//! Logs go to stderr (`CINFER_LOG`, else `RUST_LOG`, default `info`; `CINFER_LOG_FORMAT=json`
//! for JSON lines); SIGINT/SIGTERM stop accepting
//! and let requests in progress finish for up to the grace period.

use anyhow::{Context, Result};
use cinfer_server::{Config, Server};
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "inference-server",
    version,
    about = "cinfer inference server: relays sealed requests to the trusted loader and sealed replies back",
    long_about = format!(
        "cinfer inference server: relays sealed requests to the trusted loader and sealed replies back; \
relays the loader's attestation to keyservers. It never sees cleartext.\n\n{}",
        cinfer_server::config::HELP
    )
)]
struct Cli {
    /// Configuration file (TOML); without it every default applies.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Makes the key this server proves itself to the trusted loader with
    /// (its `channel-key`): writes the private key to a new file (mode 0600)
    /// and prints the public key (hex) for the loader's `server-keys`.
    Keygen {
        /// Where to write the private key (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("waiting for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("waiting for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
}

fn run(cli: &Cli) -> Result<()> {
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let listen = config.listen;
    let grace = config.shutdown_grace;
    let server = Server::new(config).context("configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            loaders = ?server.config().loaders.iter().map(ToString::to_string).collect::<Vec<_>>(),
            keyservers = ?server.config().keyservers,
            tls = server.config().tls.is_some(),
            "inference server listening"
        );
        cinfer_server::serve(listener, server, shutdown_signal(), grace).await;
        Ok(())
    })
}

fn keygen(out: &std::path::Path) -> Result<()> {
    let key = cinfer_server::ChannelKey::generate()?;
    key.write_new(out)?;
    println!("{}", key.public_hex());
    Ok(())
}

fn main() -> std::process::ExitCode {
    cinfer_log::init("inference-server", cinfer_log::LevelFilter::INFO);
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Keygen { out }) => keygen(out),
        None => run(&cli),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
