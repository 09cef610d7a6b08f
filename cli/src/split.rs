//! `cinfer split-key`: the operator's side of k-of-n keyservers. Splits a
//! model data key, or a fresh request key with its receipt key, into one
//! share file per keyserver (`keyserver add-share`); any `k` keyservers'
//! shares rebuild the key inside an attested loader, fewer reveal nothing.

use anyhow::{Context as _, Result, bail};
use cinfer_attest::ReleasedKeyKind;
use cinfer_attest::shares::{RequestKeyPublic, SHARE_FILE_FORMAT, ShareEntry, ShareFile, split};
use cinfer_envelope::RequestPrivateKey;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Arguments of `cinfer split-key`.
#[derive(Debug, clap::Args)]
pub struct SplitKeyArgs {
    /// Shares needed to rebuild the key (k, at least 2). The loaders'
    /// `keyserver-threshold` must not exceed it.
    #[arg(long)]
    threshold: u8,
    /// Shares made: one per keyserver (n, at most 255).
    #[arg(long)]
    shares: u8,
    /// Split this model data key file (`cinfer dev-model-key`, the key the
    /// model was sealed with). Delete it once the shares are with the
    /// keyservers.
    #[arg(long, conflicts_with = "request_key", requires = "model_id")]
    model_key: Option<PathBuf>,
    /// The model id the keyservers release the key as (the sealed model's id).
    #[arg(long)]
    model_id: Option<String>,
    /// Make a fresh request key and receipt key and split both (neither is
    /// ever written whole). Every keyserver holding a share states this key
    /// to clients, who seal only once `k` of them agree.
    #[arg(long)]
    request_key: bool,
    /// Directory for the share files `share-1.json` … `share-N.json` (mode
    /// 0600); created, and must not hold share files yet.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `cinfer split-key`.
pub fn run(args: &SplitKeyArgs) -> Result<()> {
    let (files, what) = match (&args.model_key, args.request_key) {
        (Some(path), false) => {
            let Some(id) = &args.model_id else {
                bail!("--model-key needs --model-id");
            };
            let key = crate::read_key(path)?;
            let shares = split(
                ReleasedKeyKind::Model,
                id,
                key.to_bytes().as_slice(),
                args.threshold,
                args.shares,
            )?;
            let files = shares
                .into_iter()
                .map(|s| ShareFile {
                    format: SHARE_FILE_FORMAT.into(),
                    shares: vec![s],
                    request_key: None,
                })
                .collect::<Vec<_>>();
            (files, format!("model key {id:?}"))
        }
        (None, true) => {
            let request = RequestPrivateKey::generate();
            let receipt = signing_key()?;
            let key_id = request.public_key().key_id();
            let public = RequestKeyPublic {
                key_id: key_id.clone(),
                public_key: request.public_key().to_bytes(),
                receipt_public_key: receipt
                    .verifying_key()
                    .to_sec1_point(false)
                    .as_bytes()
                    .to_vec(),
            };
            let requests = split(
                ReleasedKeyKind::Request,
                &key_id,
                &request.to_bytes(),
                args.threshold,
                args.shares,
            )?;
            let receipts = split(
                ReleasedKeyKind::Receipt,
                &key_id,
                Zeroizing::new(receipt.to_bytes().to_vec()).as_slice(),
                args.threshold,
                args.shares,
            )?;
            let files = requests
                .into_iter()
                .zip(receipts)
                .map(|(a, b): (ShareEntry, ShareEntry)| ShareFile {
                    format: SHARE_FILE_FORMAT.into(),
                    shares: vec![a, b],
                    request_key: Some(public.clone()),
                })
                .collect::<Vec<_>>();
            (files, format!("request key {key_id} (and its receipt key)"))
        }
        _ => bail!("give either --model-key FILE --model-id ID, or --request-key"),
    };
    write_files(&args.out, &files)?;
    eprintln!(
        "split the {what} into {} shares, any {} of which rebuild it, in {}:",
        args.shares,
        args.threshold,
        args.out.display()
    );
    for i in 1..=files.len() {
        eprintln!(
            "  share-{i}.json  → keyserver {i}: keyserver --config … add-share --share-file share-{i}.json"
        );
    }
    eprintln!(
        "hand each file to its keyserver's operator only, and delete it once imported; \
         loaders set keyserver-threshold = {} and pin the keyservers' identities",
        args.threshold
    );
    if let Some(public) = files.first().and_then(|f| f.request_key.as_ref()) {
        println!("{}", public.key_id);
    }
    Ok(())
}

fn write_files(dir: &Path, files: &[ShareFile]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let paths: Vec<PathBuf> = (1..=files.len())
        .map(|i| dir.join(format!("share-{i}.json")))
        .collect();
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        bail!("{} exists: refusing to overwrite shares", p.display());
    }
    for (file, path) in files.iter().zip(&paths) {
        let json = Zeroizing::new(serde_json::to_vec_pretty(file)?);
        crate::create_new(path, true)?.write_all(&json)?;
    }
    Ok(())
}

fn signing_key() -> Result<p256::ecdsa::SigningKey> {
    loop {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut_slice()).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        // A random 32-byte string is a valid scalar except with probability ~2^-32.
        if let Ok(key) = p256::ecdsa::SigningKey::from_slice(bytes.as_slice()) {
            return Ok(key);
        }
    }
}
