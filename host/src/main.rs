//! `trusted-loader`: the command-line face of the trusted loader.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
The cinfer trusted loader: admits signed Wasm programs under a policy and runs
them with only decrypt, accelerator and encrypt capabilities.

Usage: trusted-loader serve --config <CONFIG>

Commands:
  serve  Measures the binary, this configuration and the policy into the TPM,
         then listens on the configured endpoint for one peer at a time,
         answering attestation requests and installing released keys. Never
         opens a connection itself.

Options:
  --config <CONFIG>  Serve configuration TOML (listen, tpm, policy, pcr,
                     quote-pcrs, max-frame-bytes, server-keys, peer timeouts,
                     ...); it is measured byte for byte. Refused without
                     `server-keys` (the inference servers' keys) unless
                     `allow-unauthenticated-peers = true` (development only).
  -h, --help         Print help
  -V, --version      Print version

Environment:
  CINFER_LOG         log filter, e.g. `info` or `warn,cinfer_host=debug` (default `warn`;
                     RUST_LOG is read when it is unset)
  CINFER_LOG_FORMAT  `text` (default) or `json` (one JSON object per line), to stderr
";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Serve { config: PathBuf },
    Help,
    Version,
}

fn parse_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut command = None;
    let mut config = None;
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("config") if command.is_some() => config = Some(PathBuf::from(parser.value()?)),
            Value(v) if command.is_none() && v == "serve" => command = Some(()),
            _ => return Err(arg.unexpected()),
        }
    }
    match (command, config) {
        (None, _) => Err("missing command (serve)".into()),
        (Some(()), None) => Err("serve needs --config <CONFIG>".into()),
        (Some(()), Some(config)) => Ok(Command::Serve { config }),
    }
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
    let tpm = cfg.tpm.as_deref().map(cinfer_tpm::Tpm::open).transpose()?;
    let mut attestor =
        cinfer_host::serve::Attestor::measure(tpm, cfg.pcr, events, cfg.quote_pcrs())?
            .pin_keyservers(cfg.pinned_keyservers()?)
            .keyserver_threshold(cfg.keyserver_threshold);
    tracing::info!(events = attestor.events().len(), pcr = cfg.pcr, "measured");
    if let Some(tdx) = &cfg.tdx {
        attestor = attestor.with_tdx(tdx.clone())?;
        tracing::info!(
            rtmr = tdx.rtmr,
            "extended into the TD's RTMR; TD quotes with every evidence"
        );
    }
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
    cinfer_log::init("trusted-loader", cinfer_log::LevelFilter::WARN);
    let result = match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Serve { config }) => serve(&config),
        Ok(Command::Help) => {
            print!("{USAGE}\n{}", cinfer_host::serve::CONFIG_HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("trusted-loader {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "error: {e}\n\nUsage: trusted-loader serve --config <CONFIG> (--help for more)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain_message(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the
/// message already contains (our errors print their source in their own
/// message, so `{:#}` would say it twice).
fn chain_message(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(std::ffi::OsString::from)).map_err(|e| e.to_string())
    }

    #[test]
    fn serve_takes_its_config() {
        assert_eq!(
            parse(&["serve", "--config", "a.toml"]),
            Ok(Command::Serve {
                config: "a.toml".into()
            })
        );
        assert_eq!(
            parse(&["serve", "--config=b.toml"]),
            Ok(Command::Serve {
                config: "b.toml".into()
            })
        );
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(parse(&["serve", "-V"]), Ok(Command::Version));
    }

    #[test]
    fn a_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(cinfer_host::measure::MeasureError::Read {
            path: "/x".into(),
            source: io,
        })
        .context("measuring");
        assert_eq!(chain_message(&e), "measuring: reading /x: no such file");
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        assert_eq!(parse(&[]), Err("missing command (serve)".into()));
        assert_eq!(
            parse(&["serve"]),
            Err("serve needs --config <CONFIG>".into())
        );
        assert_eq!(
            parse(&["run", "x"]),
            Err("unexpected argument \"run\"".into())
        );
        assert_eq!(
            parse(&["--config", "a.toml", "serve"]),
            Err("invalid option '--config'".into())
        );
        assert_eq!(
            parse(&["serve", "--config", "a", "--listen", "x"]),
            Err("invalid option '--listen'".into())
        );
        assert_eq!(
            parse(&["serve", "--config"]),
            Err("missing argument for option '--config'".into())
        );
    }
}
