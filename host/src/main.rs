//! `trusted-loader`: the command-line face of the trusted loader.
#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use cinfer_envelope::{RequestPrivateKey, seal_request};
use cinfer_host::caps::model::ModelStore;
use cinfer_host::models::SealedGguf;
use cinfer_host::{Loader, LoaderConfig, Policy, RunOutcome};
use cinfer_sealed_model::ModelKey;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

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
    /// Checks whether a program would be admitted under a policy and prints
    /// the verdict: granted capabilities and limits, or the refusal reason.
    /// Exits 1 on refusal.
    Check {
        /// Policy TOML file (its worlds WIT file is read from the same directory).
        #[arg(long)]
        policy: PathBuf,
        /// Program component (.wasm).
        #[arg(long)]
        program: PathBuf,
        /// A signature over the program (repeatable): a Sigstore bundle (JSON,
        /// keyless or key-based) or a detached `cosign sign-blob --key`
        /// signature. With any, the program is admitted by who signed it
        /// (`[[signer]]` / `[[quorum]]` entries) instead of by digest.
        #[arg(long = "bundle", visible_alias = "signature", value_name = "FILE")]
        bundles: Vec<PathBuf>,
    },
    /// Runs one request in DEVELOPMENT mode: seals INPUT to the key in
    /// --request-key as a client would, runs the program on the sealed
    /// request, opens the sealed reply and prints it to stdout. The outcome
    /// goes to stderr; exits 1 unless the program completed.
    Run {
        /// Policy TOML file.
        #[arg(long)]
        policy: PathBuf,
        /// Program component (.wasm).
        #[arg(long)]
        program: PathBuf,
        /// DEVELOPMENT-ONLY request private key file (from `dev-keygen`).
        /// Real request keys come from the keyserver to attested loaders.
        #[arg(long)]
        request_key: PathBuf,
        /// The request's cleartext (a file; `-` reads standard input).
        #[arg(long)]
        input: PathBuf,
        /// A sealed model to serve, as ID=PATH (repeatable). The id must match
        /// the one sealed into the file.
        #[arg(long = "model", value_name = "ID=PATH")]
        models: Vec<String>,
        /// DEVELOPMENT-ONLY model data key file (`cinfer dev-model-key`), for --model.
        #[arg(long)]
        model_key: Option<PathBuf>,
    },
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
    /// Writes a new DEVELOPMENT-ONLY request private key file and prints its
    /// key id and public key.
    DevKeygen {
        /// Where to write the private key (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
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

fn check(policy: &Path, program: &Path, bundles: &[PathBuf]) -> Result<ExitCode> {
    let policy = Policy::load_path(policy).context("loading the policy")?;
    let bytes = read_arg_file(program)?;
    let loader = Loader::new(policy, LoaderConfig::default())?;
    println!("program:  {}", program.display());
    let signatures = bundles
        .iter()
        .map(|b| read_arg_file(b))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&[u8]> = signatures.iter().map(Vec::as_slice).collect();
    let (admitted, report) = cinfer_host::report::admission(&loader, &bytes, &refs);
    print!("{report}");
    Ok(if admitted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Opens each `ID=PATH` sealed model with the data key.
fn model_store(models: &[String], model_key: Option<&Path>) -> Result<ModelStore> {
    let mut store = ModelStore::default();
    if models.is_empty() {
        return Ok(store);
    }
    let key_path = model_key.context("--model needs --model-key")?;
    let key_text = zeroize::Zeroizing::new(
        String::from_utf8(read_arg_file(key_path)?).context("model key file is not UTF-8")?,
    );
    let key = ModelKey::from_key_file(&key_text).context("parsing the model key")?;
    for spec in models {
        let (id, path) = spec.split_once('=').context("--model takes ID=PATH")?;
        let file = open_arg_file(Path::new(path))?;
        let model = SealedGguf::open(Box::new(file), &key)
            .with_context(|| format!("opening sealed model {path}"))?;
        if model.model_id() != id {
            bail!("{path} holds model `{}`, not `{id}`", model.model_id());
        }
        store.insert(id, Arc::new(model));
    }
    Ok(store)
}

fn run(
    policy: &Path,
    program: &Path,
    key: &Path,
    input: &Path,
    models: &[String],
    model_key: Option<&Path>,
) -> Result<ExitCode> {
    let policy = Policy::load_path(policy).context("loading the policy")?;
    let models = model_store(models, model_key)?;
    let key_text = zeroize::Zeroizing::new(
        String::from_utf8(read_arg_file(key)?).context("request key file is not UTF-8")?,
    );
    let key = RequestPrivateKey::from_dev_key_file(&key_text).context("parsing the request key")?;
    let bytes = read_arg_file(program)?;
    let request = zeroize::Zeroizing::new(read_arg_file(input)?);
    let loader = Loader::new(
        policy,
        LoaderConfig {
            models,
            ..LoaderConfig::default()
        },
    )?;
    let admitted = loader.admit(&bytes).context("admission refused")?;

    // Client side (development mode only): seal the input to the request key.
    let (sealed, opener) = seal_request(key.public_key(), &request)?;
    drop(request);
    // Loader side: only sealed bytes cross this line, in both directions.
    let report = loader.run(&admitted, &sealed, &key, cinfer_host::RunOptions::default())?;
    // Client side again: open the sealed reply.
    let (reply, status) = opener
        .open_all(report.frames.iter().map(Vec::as_slice))
        .context("opening the sealed reply")?;
    std::io::stdout().write_all(&reply)?;
    std::io::stdout().flush()?;
    eprintln!(
        "\noutcome: {} (reply status {status:?}), {} sealed frames, {} egress bytes, {} accelerator launches, {:?}",
        report.outcome,
        report.frames.len(),
        report.egress_bytes,
        report.accelerator_launches,
        report.elapsed
    );
    Ok(if report.outcome == RunOutcome::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn dev_keygen(out: &Path) -> Result<ExitCode> {
    if out.exists() {
        bail!("{} exists; refusing to overwrite a key", out.display());
    }
    let key = RequestPrivateKey::generate();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    f.write_all(key.to_dev_key_file().as_bytes())?;
    println!("key id:     {}", key.public_key().key_id());
    println!("public key: {}", hex::encode(key.public_key().to_bytes()));
    eprintln!("wrote DEVELOPMENT-ONLY request key to {}", out.display());
    Ok(ExitCode::SUCCESS)
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
        Command::Check {
            policy,
            program,
            bundles,
        } => check(policy, program, bundles),
        Command::Run {
            policy,
            program,
            request_key,
            input,
            models,
            model_key,
        } => run(
            policy,
            program,
            request_key,
            input,
            models,
            model_key.as_deref(),
        ),
        Command::DevKeygen { out } => dev_keygen(out),
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
