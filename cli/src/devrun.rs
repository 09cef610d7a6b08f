//! Development commands that run the loader's library in this process, outside
//! any attestation: `cinfer dev-request-key` and `cinfer dev-run`. They used to
//! be `trusted-loader dev-keygen` and `run`; they live here so that the measured
//! loader binary carries no command that takes cleartext or a local key.

use anyhow::{Context, Result, bail};
use cinfer_envelope::{RequestPrivateKey, seal_request};
use cinfer_host::caps::model::ModelStore;
use cinfer_host::models::SealedGguf;
use cinfer_host::{Loader, LoaderConfig, Policy, RunOptions, RunOutcome};
use cinfer_sealed_model::ModelKey;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `cinfer dev-run`: one request in DEVELOPMENT mode.
#[derive(Debug, clap::Args)]
pub struct DevRunArgs {
    /// Policy TOML file (its worlds WIT file is read from the same directory).
    #[arg(long)]
    policy: PathBuf,
    /// Program component (.wasm).
    #[arg(long)]
    program: PathBuf,
    /// DEVELOPMENT-ONLY request private key file (from `cinfer dev-request-key`).
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
}

fn read(path: &Path) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        return Ok(buf);
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Opens each `ID=PATH` sealed model with the data key.
fn model_store(models: &[String], model_key: Option<&Path>) -> Result<ModelStore> {
    let mut store = ModelStore::default();
    if models.is_empty() {
        return Ok(store);
    }
    let key_path = model_key.context("--model needs --model-key")?;
    let key_text = zeroize::Zeroizing::new(
        String::from_utf8(read(key_path)?).context("model key file is not UTF-8")?,
    );
    let key = ModelKey::from_key_file(&key_text).context("parsing the model key")?;
    for spec in models {
        let (id, path) = spec.split_once('=').context("--model takes ID=PATH")?;
        let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
        let model = SealedGguf::open(Box::new(file), &key)
            .with_context(|| format!("opening sealed model {path}"))?;
        if model.model_id() != id {
            bail!("{path} holds model `{}`, not `{id}`", model.model_id());
        }
        store.insert(id, Arc::new(model));
    }
    Ok(store)
}

/// Seals the input to the request key as a client would, runs the program on
/// the sealed request through the loader library, opens the sealed reply and
/// prints it to stdout; the outcome goes to stderr. `Ok(false)` unless the
/// program completed.
pub fn run(a: &DevRunArgs) -> Result<bool> {
    let policy = Policy::load_path(&a.policy).context("loading the policy")?;
    let models = model_store(&a.models, a.model_key.as_deref())?;
    let key_text = zeroize::Zeroizing::new(
        String::from_utf8(read(&a.request_key)?).context("request key file is not UTF-8")?,
    );
    let key = RequestPrivateKey::from_dev_key_file(&key_text).context("parsing the request key")?;
    let bytes = read(&a.program)?;
    let request = zeroize::Zeroizing::new(read(&a.input)?);
    let loader = Loader::new(
        policy,
        LoaderConfig {
            models,
            ..LoaderConfig::default()
        },
    )?;
    let admitted = loader.admit(&bytes).context("admission refused")?;
    // Client side: seal the input to the request key.
    let (sealed, opener) = seal_request(key.public_key(), &request)?;
    drop(request);
    // Loader side: only sealed bytes cross this line, in both directions.
    let report = loader.run(&admitted, &sealed, &key, RunOptions::default())?;
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
    Ok(report.outcome == RunOutcome::Completed)
}

/// `cinfer dev-request-key`: a new DEVELOPMENT-ONLY request private key file.
pub fn request_key(out: &Path) -> Result<()> {
    let key = RequestPrivateKey::generate();
    crate::create_new(out, true)?.write_all(key.to_dev_key_file().as_bytes())?;
    println!("key id:     {}", key.public_key().key_id());
    println!("public key: {}", hex::encode(key.public_key().to_bytes()));
    eprintln!("wrote DEVELOPMENT-ONLY request key to {}", out.display());
    Ok(())
}
