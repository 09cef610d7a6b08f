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
        /// Data key file (DEVELOPMENT-ONLY until the keyserver releases keys).
        #[arg(long)]
        key: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Plaintext bytes per chunk.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
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

fn seal_model(
    model: &Path,
    model_id: &str,
    key_id: &str,
    key: &Path,
    out: &Path,
    chunk_size: u32,
) -> Result<()> {
    let key = read_key(key)?;
    let len = std::fs::metadata(model)
        .with_context(|| format!("reading {}", model.display()))?
        .len();
    // Pass 1: digest (it is part of every chunk's associated data).
    let pb = bar(len, "hashing");
    let mut f = std::fs::File::open(model)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; chunk_size as usize];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    let digest: [u8; 32] = h.finalize().into();
    // Pass 2: seal chunk by chunk.
    let sealer = Sealer::new(&key, model_id, key_id, chunk_size, len, digest)?;
    if out.exists() {
        bail!("{} exists; refusing to overwrite", out.display());
    }
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    w.write_all(sealer.header_bytes())?;
    let mut f = std::fs::File::open(model)?;
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
        "sealed {} ({} bytes, sha256 {}) as model `{model_id}` (key `{key_id}`) into {}",
        model.display(),
        len,
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
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(out)
        .with_context(|| format!("creating {} (refusing to overwrite)", out.display()))?;
    f.write_all(ModelKey::generate()?.to_key_file().as_bytes())?;
    eprintln!("wrote DEVELOPMENT-ONLY model data key to {}", out.display());
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
        } => seal_model(model, model_id, key_id, key, out, *chunk_size),
        Command::UnsealCheck { sealed, key } => unseal_check(sealed, key),
        Command::DevModelKey { out } => dev_model_key(out),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
