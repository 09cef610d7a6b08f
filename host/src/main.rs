//! `trusted-loader`: the command-line face of the trusted loader.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use cinfer_host::Policy;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The cinfer trusted loader: admits signed Wasm programs under a policy and
/// runs them with only decrypt, accelerator and encrypt capabilities.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves: measures the binary, this configuration and the policy into the
    /// TPM, then listens on the configured endpoint for one peer at a time,
    /// answering attestation requests and installing released keys. Never
    /// opens a connection itself.
    Serve {
        /// Serve configuration TOML (listen, tpm, policy, pcr, quote-pcrs,
        /// max-frame-bytes, server-keys, peer timeouts, …); it is measured byte
        /// for byte. Refused without `server-keys` (the inference servers' keys)
        /// unless `allow-unauthenticated-peers = true` (development only).
        #[arg(long)]
        config: PathBuf,
    },
    /// Prints the event log and PCR value a loader with this binary,
    /// configuration and policy produces, and the keyserver reference values
    /// to pin them (no TPM needed). With --tpm, also pins that TPM's AK.
    Measure {
        /// Serve configuration TOML.
        #[arg(long)]
        config: PathBuf,
        /// The loader binary to measure [default: this executable].
        #[arg(long)]
        binary: Option<PathBuf>,
        /// TCTI of the TPM whose attestation key to include (e.g.
        /// swtpm:host=127.0.0.1,port=2321).
        #[arg(long)]
        tpm: Option<String>,
    },
}

/// Opens a file named on the command line through a capability handle on its
/// directory (the loader's only ambient file access happens here, at start).
fn open_arg_file(path: &Path) -> Result<std::fs::File> {
    let (dir, name) = cinfer_host::open_parent_dir(path)
        .with_context(|| format!("opening the directory of {}", path.display()))?;
    Ok(dir
        .open(name)
        .with_context(|| format!("opening {}", path.display()))?
        .into_std())
}

/// Reads a file named on the command line (see [`open_arg_file`]); `-` is standard input.
fn read_arg_file(path: &Path) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        return Ok(buf);
    }
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut open_arg_file(path)?, &mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

/// What a serving loader starts from: its configuration, the policy and the
/// directory both were read through, and the event log they measure to.
struct Measured {
    cfg: cinfer_host::serve::ServeConfig,
    policy: Policy,
    dir: cap_std::fs::Dir,
    events: Vec<cinfer_attest::Event>,
}

/// Reads the serve configuration and its policy (through the configuration's
/// directory) and computes the event log.
fn measured(config: &Path, binary: Option<&Path>) -> Result<Measured> {
    let (dir, name) = cinfer_host::open_parent_dir(config)
        .with_context(|| format!("opening {}", config.display()))?;
    let config_bytes = dir
        .read(name)
        .with_context(|| format!("reading {}", config.display()))?;
    let cfg = cinfer_host::serve::ServeConfig::parse(
        std::str::from_utf8(&config_bytes).context("configuration is not UTF-8")?,
    )?;
    let policy = Policy::load(&dir, &cfg.policy).context("loading the policy")?;
    let binary = match binary {
        Some(b) => read_arg_file(b)?,
        None => std::fs::read(std::env::current_exe().context("locating this executable")?)
            .context("reading this executable")?,
    };
    let events = cinfer_host::serve::measurements(cfg.pcr, &binary, name, &config_bytes, &policy);
    Ok(Measured {
        cfg,
        policy,
        dir,
        events,
    })
}

fn measure(config: &Path, binary: Option<&Path>, tpm: Option<&str>) -> Result<ExitCode> {
    let Measured { cfg, events, .. } = measured(config, binary)?;
    println!("# event log (PCR {}, SHA-256 bank, from reset):", cfg.pcr);
    for e in &events {
        println!(
            "#   {:<14} {} {}",
            e.kind.as_str(),
            hex::encode(e.digest),
            e.name
        );
    }
    println!(
        "# PCR {} after measurement: {}",
        cfg.pcr,
        hex::encode(cinfer_attest::replay(&events, cfg.pcr))
    );
    let mut refs = cinfer_attest::ReferenceValues {
        trusted_aks: Vec::new(),
        measured_pcr: cfg.pcr,
        events: Default::default(),
        pcrs: Default::default(),
        allow_resettable_pcrs_only: false,
    };
    for e in &events {
        refs.events.entry(e.kind).or_default().insert(e.digest);
    }
    // The other quoted PCRs (the boot PCRs), as this TPM holds them now: run
    // on the machine (VM image) the loader will run on.
    let others: Vec<u8> = cfg
        .quote_pcrs()
        .into_iter()
        .filter(|p| *p != cfg.pcr)
        .collect();
    if let Some(tcti) = tpm {
        let mut t = cinfer_tpm::Tpm::open(tcti)?;
        refs.trusted_aks.push(t.ak_public().to_vec());
        refs.pcrs = t.read_pcrs(&others)?;
    } else {
        println!("# no --tpm: add the AK of each TPM to trust to trusted-aks");
        if !others.is_empty() {
            println!("# no --tpm: add the expected values of PCRs {others:?} to [pcrs]");
        }
    }
    if !others
        .iter()
        .any(|p| !cinfer_attest::RESETTABLE_PCRS.contains(p))
    {
        println!(
            "# quote-pcrs holds no boot PCR: a keyserver refuses these values unless \
             allow-resettable-pcrs-only = true (development)"
        );
    } else if tpm.is_some()
        && !refs
            .pcrs
            .iter()
            .any(|(p, v)| !cinfer_attest::is_reset_value(*p, v))
    {
        println!(
            "# every quoted boot PCR holds its reset value (nothing measured this boot): \
             a keyserver refuses these values unless allow-resettable-pcrs-only = true (development)"
        );
    }
    println!("# keyserver reference values:");
    print!(
        "{}",
        toml::to_string(&refs).context("rendering the reference values")?
    );
    Ok(ExitCode::SUCCESS)
}

fn serve(config: &Path) -> Result<ExitCode> {
    let Measured {
        cfg,
        policy,
        dir,
        events,
    } = measured(config, None)?;
    let tpm = cinfer_tpm::Tpm::open(&cfg.tpm)?;
    let attestor = cinfer_host::serve::Attestor::measure(tpm, cfg.pcr, events, cfg.quote_pcrs())?
        .pin_keyservers(cfg.pinned_keyservers()?);
    tracing::info!(events = attestor.events().len(), pcr = cfg.pcr, "measured");
    if cfg.keyservers.is_empty() {
        tracing::warn!(
            "no keyservers pinned: any key release that unwraps is installed (development only)"
        );
    }
    // Programs are admitted (and a bad policy refused) before anything is served.
    let mut service = cinfer_host::serve::Service::new(attestor, policy, &cfg, &dir)?;
    // SIGTERM/SIGINT: refuse new requests, let running ones finish (up to 30 s), exit.
    let drain = service.drain_handle();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "shutting down: draining requests");
            let left = drain.drain(std::time::Duration::from_secs(30));
            if left > 0 {
                tracing::warn!(requests = left, "grace period over, requests abandoned");
            }
            eprintln!("trusted-loader: shut down");
            std::process::exit(0);
        }
    });
    if cfg.allow_unauthenticated_peers {
        tracing::warn!(
            "allow-unauthenticated-peers: any local process may take the channel (development only)"
        );
    }
    let endpoint: cinfer_channel::Endpoint =
        cfg.listen.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    // One peer at a time; a peer that fails to authenticate or goes idle is
    // dropped (logged with the reason) and the next connection is served.
    fn serve_one<R: cinfer_host::peer::PeerStream>(
        service: &mut cinfer_host::serve::Service,
        reader: R,
        writer: Box<dyn Write + Send>,
    ) {
        if let Err(e) = service.serve_connection(reader, writer) {
            tracing::warn!(error = %e, "connection closed");
        }
    }
    match &endpoint {
        cinfer_channel::Endpoint::Tcp(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {endpoint}"))?;
            eprintln!("listening on tcp:{}", listener.local_addr()?);
            for stream in listener.incoming() {
                match stream.and_then(|s| Ok((s.try_clone()?, s))) {
                    Ok((r, w)) => {
                        let _ = w.set_nodelay(true);
                        serve_one(&mut service, r, Box::new(w));
                    }
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                }
            }
        }
        cinfer_channel::Endpoint::Unix(path) => {
            let listener = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("listening on {endpoint}"))?;
            eprintln!("listening on {endpoint}");
            for stream in listener.incoming() {
                match stream.and_then(|s| Ok((s.try_clone()?, s))) {
                    Ok((r, w)) => serve_one(&mut service, r, Box::new(w)),
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CINFER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve { config } => serve(config),
        Command::Measure {
            config,
            binary,
            tpm,
        } => measure(config, binary.as_deref(), tpm.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
