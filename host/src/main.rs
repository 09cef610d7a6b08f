//! `trusted-loader`: the command-line face of the trusted loader.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
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
}

fn serve(config: &Path) -> Result<ExitCode> {
    // The binary measured is this executable, read from disk.
    let binary = std::fs::read(std::env::current_exe().context("locating this executable")?)
        .context("reading this executable")?;
    let cinfer_host::measure::Measured {
        cfg,
        policy,
        dir,
        events,
    } = cinfer_host::measure::measure(config, &binary)?;
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
