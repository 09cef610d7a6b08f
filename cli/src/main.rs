//! `cinfer`: operator and client commands. Runs on the untrusted side: it
//! handles model cleartext only when sealing (on the model owner's machine).
#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use cinfer_sealed_model::{DEFAULT_CHUNK_SIZE, ModelKey, Opened, Sealer};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

mod chat;
mod devrun;
mod measure;
mod openai;
mod proxy;
mod proxy_metrics;
mod signing;
mod split;
mod tdx_provider;

/// cinfer: confidential inference tools.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Encrypts a GGUF model into a sealed model (1 MiB AES-256-GCM chunks,
    /// STREAM construction, header authenticated by every chunk).
    SealModel {
        /// The GGUF file.
        model: PathBuf,
        /// Model id programs open it by (e.g. smollm2-135m-instruct).
        #[arg(long)]
        model_id: String,
        /// Id of the data key (recorded in the header; the keyserver releases keys by id).
        #[arg(long)]
        key_id: String,
        /// Data key file (`cinfer dev-model-key`); import it into the keyserver
        /// (`keyserver add-model-key`), which releases it to attested loaders only.
        #[arg(long)]
        key: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Plaintext bytes per chunk.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
        /// Seal the file byte for byte. By default the tokenizer image
        /// (`cinfer.tokenizer.image`: the tokenizer's tables, built once here
        /// so that programs need not build them on every request) is added to
        /// the GGUF metadata when the model has a tokenizer cinfer reads.
        #[arg(long)]
        no_tokenizer_image: bool,
    },
    /// Decrypts every chunk of a sealed model and checks the plaintext digest;
    /// prints the header. Writes no cleartext anywhere.
    UnsealCheck {
        /// The sealed model.
        sealed: PathBuf,
        /// Data key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Writes a new DEVELOPMENT-ONLY model data key file (refuses to overwrite).
    DevModelKey {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// k-of-n keyservers: splits a model data key, or a fresh request key
    /// with its receipt key, into one share file per keyserver (`keyserver
    /// add-share`). Loaders with `keyserver-threshold = K` rebuild a key
    /// only from the shares of K different pinned keyservers.
    SplitKey(split::SplitKeyArgs),
    /// Writes a new DEVELOPMENT-ONLY request private key file (mode 0600,
    /// refuses to overwrite) and prints its key id and public key. Real request
    /// keys are released by the keyserver to attested loaders only.
    DevRequestKey {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs one request in DEVELOPMENT mode, in this process: seals INPUT to
    /// --request-key as a client would, runs the program on the sealed request
    /// through the loader library, opens the sealed reply and prints it. The
    /// outcome goes to stderr; exits 1 unless the program completed. No
    /// attestation: for trying programs and models, not for serving.
    DevRun(devrun::DevRunArgs),
    /// Prints the event log and PCR value a trusted loader with this binary,
    /// serve configuration and policy produces, and the keyserver reference
    /// values that pin them (no TPM needed). With --tpm, also pins that TPM's
    /// attestation key and reads its boot PCRs: run it on the machine (VM
    /// image) the loader will run on.
    MeasureLoader(measure::MeasureArgs),
    /// TESTING ONLY: plays an Intel TDX guest's quote (configfs-tsm) and
    /// RTMR interfaces in a directory, signing TD quotes with a test PCK
    /// chain under a root CA made at start (never Intel's), so a loader's
    /// `[tdx]` evidence can be exercised without TDX hardware. Runs until
    /// killed; prints `ready DIR` when the directory is complete.
    TdxTestProvider(tdx_provider::ProviderArgs),
    /// Makes an ECDSA P-256 signing key pair for `cinfer sign` (PKCS#8 PEM
    /// private key, mode 0600; SubjectPublicKeyInfo PEM public key for the
    /// policy's `public-key`). Teams with an HSM or KMS keep the key there and
    /// sign with `cosign sign-blob --key`, which makes the same signatures.
    Keygen {
        /// Where to write the private key (refuses to overwrite).
        #[arg(long)]
        private: PathBuf,
        /// Where to write the public key (refuses to overwrite).
        #[arg(long)]
        public: PathBuf,
    },
    /// Signs a file (a program component) with an ECDSA P-256 key: writes a
    /// detached signature, base64 of the DER ECDSA-SHA256 signature, the
    /// format of `cosign sign-blob --key` (and `cosign verify-blob --key`
    /// checks it). Nothing is logged anywhere: the key path has no
    /// transparency log unless the team uploads the entry itself.
    Sign {
        /// The file to sign.
        file: PathBuf,
        /// PKCS#8 PEM private key (from `cinfer keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signature [default: FILE.sig].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Checks a program the way the trusted loader admits it: its signatures
    /// (Sigstore bundles or detached key signatures, verified offline) against
    /// a policy, then its imports against the granted world. Prints who
    /// signed, when, which log entry, and the verdict; exits 1 if refused.
    Verify {
        /// The program component (.wasm).
        program: PathBuf,
        /// Policy TOML (signers, quorums, trust root).
        #[arg(long)]
        policy: PathBuf,
        /// A signature file (repeatable): bundle JSON or detached signature.
        #[arg(long = "bundle", visible_alias = "signature", value_name = "FILE")]
        bundles: Vec<PathBuf>,
    },
    /// Prints a component's digest, size, imports and exports (nothing is run
    /// or compiled).
    Inspect {
        /// The component (.wasm).
        program: PathBuf,
    },
    /// Sends one chat request to llama-chat on an inference server, sealed to
    /// the keyserver-signed request key; prints the answer as it streams, then
    /// verifies the attested loader's receipt (exits 1 if anything fails).
    Chat(chat::ChatArgs),
    /// Serves an OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`)
    /// on a local address, sending each request sealed through the client
    /// library and answering only with verified replies.
    Proxy(proxy::ProxyArgs),
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_owned());
    pb
}

fn read_key(path: &Path) -> Result<ModelKey> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    Ok(ModelKey::from_key_file(&text)?)
}

/// The header of the GGUF file `model` with its tokenizer image added, and the offset where the
/// file's tensor data starts; `None` (with a note) when the model's tokenizer is not one cinfer
/// reads. A file that is not GGUF is an error.
fn header_with_image(model: &Path, len: u64) -> Result<Option<(Vec<u8>, u64)>> {
    let mut want = (8u64 << 20).min(len);
    loop {
        let mut prefix = Vec::new();
        std::fs::File::open(model)?
            .take(want)
            .read_to_end(&mut prefix)?;
        match cinfer_tokenizer::embed_image_header(&prefix) {
            Ok(h) => return Ok(Some(h)),
            Err(cinfer_tokenizer::TokenizerError::Gguf(cinfer_gguf::GgufError::Truncated(_)))
                if want < len =>
            {
                want = (want * 2).min(len)
            }
            Err(cinfer_tokenizer::TokenizerError::Gguf(e)) => {
                bail!("{} is not a GGUF model: {e}", model.display())
            }
            Err(e) => {
                println!("note: no tokenizer image ({e}); sealing the file as it is");
                return Ok(None);
            }
        }
    }
}

fn seal_model(
    model: &Path,
    model_id: &str,
    key_id: &str,
    key: &Path,
    out: &Path,
    chunk_size: u32,
    tokenizer_image: bool,
) -> Result<()> {
    let key = read_key(key)?;
    if out.exists() {
        bail!("{} exists; refusing to overwrite", out.display());
    }
    let file_len = std::fs::metadata(model)
        .with_context(|| format!("reading {}", model.display()))?
        .len();
    // The plaintext: the file, or a new header and the file's tensor data.
    let header = match tokenizer_image {
        true => header_with_image(model, file_len)?,
        false => None,
    };
    type OpenPlain<'a> = Box<dyn Fn() -> Result<Box<dyn Read>> + 'a>;
    let (len, open_plain): (u64, OpenPlain<'_>) = match header {
        None => (
            file_len,
            Box::new(|| Ok(Box::new(std::fs::File::open(model)?))),
        ),
        Some((header, data_offset)) => {
            let Some(data_len) = file_len.checked_sub(data_offset) else {
                bail!("{}: tensor data offset past the end", model.display());
            };
            (
                header.len() as u64 + data_len,
                Box::new(move || {
                    let mut f = std::fs::File::open(model)?;
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(data_offset))?;
                    Ok(Box::new(std::io::Cursor::new(header.clone()).chain(f)))
                }),
            )
        }
    };
    // Pass 1: digest (it is part of every chunk's associated data).
    let pb = bar(len, "hashing");
    let mut f = open_plain()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut read = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        read += n as u64;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    if read != len {
        bail!("{} changed while it was read", model.display());
    }
    let digest: [u8; 32] = h.finalize().into();
    // Pass 2: seal chunk by chunk.
    let sealer = Sealer::new(&key, model_id, key_id, chunk_size, len, digest)?;
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    w.write_all(sealer.header_bytes())?;
    let mut f = open_plain()?;
    let pb = bar(len, "sealing");
    for i in 0..sealer.header().chunk_count() {
        let n = sealer.header().chunk_plain_len(i);
        f.read_exact(&mut buf[..n])?;
        w.write_all(&sealer.seal_chunk(i, &buf[..n])?)?;
        pb.inc(n as u64);
    }
    w.flush()?;
    pb.finish_and_clear();
    zeroize::Zeroize::zeroize(&mut buf);
    println!(
        "sealed {} ({} bytes{}, sha256 {}) as model `{model_id}` (key `{key_id}`) into {}",
        model.display(),
        len,
        if len != file_len {
            ", with the tokenizer image"
        } else {
            ""
        },
        hex::encode(digest),
        out.display()
    );
    Ok(())
}

fn unseal_check(sealed: &Path, key: &Path) -> Result<()> {
    let key = read_key(key)?;
    let f = std::fs::File::open(sealed).with_context(|| format!("opening {}", sealed.display()))?;
    let o = Opened::open(f, &key)?;
    let h = o.header().clone();
    let pb = bar(h.plaintext_len, "verifying");
    o.verify_all(|done| pb.set_position(done))?;
    pb.finish_and_clear();
    println!("model id:   {}", h.model_id);
    println!("key id:     {}", h.key_id);
    println!(
        "plaintext:  {} bytes, sha256 {}",
        h.plaintext_len,
        hex::encode(h.plaintext_sha256)
    );
    println!("chunks:     {} of {} bytes", h.chunk_count(), h.chunk_size);
    println!("verdict:    OK (every chunk authenticated, digest matches)");
    Ok(())
}

fn dev_model_key(out: &Path) -> Result<()> {
    create_new(out, true)?.write_all(ModelKey::generate()?.to_key_file().as_bytes())?;
    eprintln!("wrote DEVELOPMENT-ONLY model data key to {}", out.display());
    Ok(())
}

/// Creates `path` for writing; never overwrites, mode 0600 on Unix.
fn create_new(path: &Path, private: bool) -> Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    opts.open(path)
        .with_context(|| format!("creating {} (refusing to overwrite)", path.display()))
}

fn keygen(private: &Path, public: &Path) -> Result<()> {
    let (private_pem, public_pem) = signing::generate()?;
    create_new(private, true)?.write_all(private_pem.as_bytes())?;
    create_new(public, false)?.write_all(public_pem.as_bytes())?;
    println!(
        "wrote private key {} and public key {} (sha256 of key: {})",
        private.display(),
        public.display(),
        signing::fingerprint(&public_pem)?
    );
    Ok(())
}

fn sign(file: &Path, key: &Path, out: Option<&Path>) -> Result<()> {
    let pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?,
    );
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let sig = signing::sign(&pem, &bytes)?;
    let out = out.map_or_else(
        || {
            let mut p = file.as_os_str().to_owned();
            p.push(".sig");
            PathBuf::from(p)
        },
        Path::to_path_buf,
    );
    create_new(&out, false)?.write_all(sig.as_bytes())?;
    println!(
        "signed {} (sha256 {}) -> {}",
        file.display(),
        hex::encode(Sha256::digest(&bytes)),
        out.display()
    );
    Ok(())
}

fn verify(program: &Path, policy: &Path, bundles: &[PathBuf]) -> Result<bool> {
    let policy = cinfer_host::Policy::load_path(policy).context("loading the policy")?;
    let bytes = std::fs::read(program).with_context(|| format!("reading {}", program.display()))?;
    let sigs = bundles
        .iter()
        .map(|b| std::fs::read(b).with_context(|| format!("reading {}", b.display())))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&[u8]> = sigs.iter().map(Vec::as_slice).collect();
    let loader = cinfer_host::Loader::new(policy, cinfer_host::LoaderConfig::default())?;
    println!("program:  {}", program.display());
    let (admitted, report) = cinfer_host::report::admission(&loader, &bytes, &refs);
    print!("{report}");
    Ok(admitted)
}

fn inspect(program: &Path) -> Result<()> {
    let bytes = std::fs::read(program).with_context(|| format!("reading {}", program.display()))?;
    println!("file:     {}", program.display());
    println!("size:     {} bytes", bytes.len());
    println!("sha256:   {}", hex::encode(Sha256::digest(&bytes)));
    cinfer_host::admission::check_preamble(&bytes).context("not a WebAssembly component")?;
    let decoded = wit_component::decode(&bytes).context("not a WebAssembly component")?;
    let wit_component::DecodedWasm::Component(resolve, world) = &decoded else {
        bail!("a WIT package, not a component");
    };
    let world = &resolve.worlds[*world];
    for (label, items) in [("imports", &world.imports), ("exports", &world.exports)] {
        println!("{label}:");
        if items.is_empty() {
            println!("  (none)");
        }
        for (key, item) in items {
            let kind = match item {
                wit_parser::WorldItem::Interface { .. } => "interface",
                wit_parser::WorldItem::Function(_) => "func",
                wit_parser::WorldItem::Type { .. } => "type",
            };
            println!("  {kind} {}", resolve.name_world_key(key));
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match &cli.command {
        Command::SealModel {
            model,
            model_id,
            key_id,
            key,
            out,
            chunk_size,
            no_tokenizer_image,
        } => seal_model(
            model,
            model_id,
            key_id,
            key,
            out,
            *chunk_size,
            !*no_tokenizer_image,
        ),
        Command::UnsealCheck { sealed, key } => unseal_check(sealed, key),
        Command::DevModelKey { out } => dev_model_key(out),
        Command::SplitKey(args) => split::run(args),
        Command::DevRequestKey { out } => devrun::request_key(out),
        Command::DevRun(args) => match devrun::run(args) {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::MeasureLoader(args) => measure::run(args),
        Command::TdxTestProvider(args) => tdx_provider::run(args),
        Command::Keygen { private, public } => keygen(private, public),
        Command::Sign { file, key, out } => sign(file, key, out.as_deref()),
        Command::Verify {
            program,
            policy,
            bundles,
        } => match verify(program, policy, bundles) {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Inspect { program } => inspect(program),
        Command::Chat(args) => chat::run(args),
        Command::Proxy(args) => proxy::run(args),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
