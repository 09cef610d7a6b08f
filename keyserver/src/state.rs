//! Keys at rest.
//!
//! The state directory holds every secret the keyserver has, each in its own
//! file, encrypted with AES-256-GCM under a key-encryption key (KEK):
//!
//! ```text
//! STATE/identity.key.enc        ECDSA P-256 identity key (signs the published request key)
//! STATE/request.key.enc         the request private key (HPKE, P-256 scalar)
//! STATE/models/<id>.key.enc     model data keys (32-byte AES-256 keys), by model id
//! STATE/shares/<name>.share.enc this keyserver's shares of split keys (k-of-n;
//!                               `keyserver add-share`): model-<id>, request-<key id>
//! ```
//!
//! A file is `"CKS1" || nonce(12) || AES-256-GCM(KEK, nonce, secret, aad)` with
//! `aad = "cinfer-keyserver/state/v1" || 0x00 || name` (`identity`, `request`,
//! `model/<id>`): a file copied over another (say, one model's key put under
//! another model's name) fails to decrypt instead of being served as the wrong key.
//!
//! The KEK is read from a file named by the configuration, never kept in the
//! state directory. In production it comes from a KMS or `systemd-creds`
//! (`LoadCredentialEncrypted=`, sealed to the host's TPM): a copy of the state
//! directory (a backup, a stolen disk) is useless without it, and AES-GCM
//! detects any change to a key file.

use aes_gcm::aead::Aead;
use aes_gcm::aead::Payload;
use aes_gcm::{Aes256Gcm, KeyInit};
use cinfer_attest::ReleasedKeyKind;
use cinfer_attest::shares::{RequestKeyPublic, ShareEntry, ShareFile};
use cinfer_envelope::RequestPrivateKey;
use p256::ecdsa::SigningKey;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const FILE_MAGIC: &[u8; 4] = b"CKS1";
const AAD_PREFIX: &[u8] = b"cinfer-keyserver/state/v1\0";
const NONCE_LEN: usize = 12;
const IDENTITY_FILE: &str = "identity.key.enc";
const REQUEST_FILE: &str = "request.key.enc";
const RECEIPT_FILE: &str = "receipt.key.enc";
const MODELS_DIR: &str = "models";
const SHARES_DIR: &str = "shares";
const SHARE_SUFFIX: &str = ".share.enc";
const MODEL_SUFFIX: &str = ".key.enc";
/// The tag of a model key file written by `cinfer dev-model-key`.
const MODEL_KEY_FILE_TAG: &str = "cinfer-dev-model-key-v1";
/// Longest model id.
pub const MAX_MODEL_ID_LEN: usize = 64;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why (in the message, not as a `source`, so that a printed error
        /// chain does not say it twice).
        error: std::io::Error,
    },
    /// The KEK file is not 32 bytes (raw) or 64 hex digits.
    #[error("KEK file {0}: expected 32 raw bytes or 64 hex digits")]
    BadKek(PathBuf),
    /// A key file does not decrypt: the KEK is wrong or the file was changed.
    #[error("cannot decrypt {0}: wrong KEK, or the file was tampered with")]
    Decrypt(PathBuf),
    /// A key file decrypts to something that is not a key of its kind.
    #[error("{0}: decrypted contents are not a valid key")]
    BadKey(PathBuf),
    /// The state directory has no identity key.
    #[error("{0} is not initialized (run keyserver init)")]
    NotInitialized(PathBuf),
    /// `init` found an existing identity key.
    #[error("{0} is already initialized")]
    AlreadyInitialized(PathBuf),
    /// The KEK would sit inside the state directory.
    #[error("the KEK file must not be inside the state directory")]
    KekInsideState,
    /// A model id is empty, too long, or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid model id {0:?}")]
    BadModelId(String),
    /// A model key file is not in the `cinfer dev-model-key` format.
    #[error("model key file: {0}")]
    BadModelKeyFile(&'static str),
    /// A share file (`cinfer split-key`) is malformed.
    #[error("share file: {0}")]
    BadShareFile(cinfer_attest::shares::ShareError),
    /// The state holds shares of two request keys (one is served at a time).
    #[error("the state holds shares of two request keys ({0} and {1}); remove one")]
    TwoRequestKeyShares(String, String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |error| StateError::Io {
        path: path.to_owned(),
        error,
    }
}

/// The key-encryption key.
pub struct Kek(Aes256Gcm);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// Reads a KEK file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
    pub fn read(path: &Path) -> Result<Self, StateError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(io(path))?);
        let key = Zeroizing::new(if bytes.len() == 32 {
            bytes.to_vec()
        } else {
            let text = std::str::from_utf8(&bytes).map_err(|_| StateError::BadKek(path.into()))?;
            hex::decode(text.trim()).map_err(|_| StateError::BadKek(path.into()))?
        });
        Self::from_bytes(&key).ok_or_else(|| StateError::BadKek(path.into()))
    }

    fn from_bytes(key: &[u8]) -> Option<Self> {
        let key: &[u8; 32] = key.try_into().ok()?;
        Some(Self(Aes256Gcm::new(key.into())))
    }

    /// Writes a fresh random KEK (hex, mode 0600) to `path` unless it exists.
    /// Returns whether one was written.
    pub fn create_if_absent(path: &Path) -> Result<bool, StateError> {
        if path.exists() {
            return Ok(false);
        }
        let key = random::<32>()?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(key.as_slice())));
        write_new(path, text.as_bytes())?;
        Ok(true)
    }

    fn seal(&self, name: &str, secret: &[u8]) -> Result<Vec<u8>, StateError> {
        let nonce = random::<NONCE_LEN>()?;
        let aad = [AAD_PREFIX, name.as_bytes()].concat();
        let ct = self
            .0
            .encrypt(
                (&*nonce).into(),
                Payload {
                    msg: secret,
                    aad: &aad,
                },
            )
            .map_err(|_| StateError::BadKey(PathBuf::from(name)))?;
        Ok([FILE_MAGIC.as_slice(), nonce.as_slice(), &ct].concat())
    }

    fn open(
        &self,
        name: &str,
        path: &Path,
        bytes: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StateError> {
        let body = bytes
            .strip_prefix(FILE_MAGIC.as_slice())
            .filter(|b| b.len() >= NONCE_LEN)
            .ok_or_else(|| StateError::Decrypt(path.into()))?;
        let (nonce, ct) = body.split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| StateError::Decrypt(path.into()))?;
        let aad = [AAD_PREFIX, name.as_bytes()].concat();
        self.0
            .decrypt(nonce.into(), Payload { msg: ct, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| StateError::Decrypt(path.into()))
    }
}

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, StateError> {
    let mut out = Zeroizing::new([0u8; N]);
    getrandom::fill(out.as_mut_slice()).map_err(|e| StateError::Io {
        path: PathBuf::from("<os random source>"),
        error: std::io::Error::other(e.to_string()),
    })?;
    Ok(out)
}

/// Creates `path` (mode 0600), refusing to overwrite, and writes `bytes`.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Writes `bytes` to `path` through a temporary file and a rename (no torn files).
fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Checks a model id: 1..=64 characters of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn check_model_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_MODEL_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadModelId(id.to_owned()))
    }
}

/// Parses a model data key file as written by `cinfer dev-model-key`
/// (`cinfer-dev-model-key-v1 <64 hex digits>`, `#` comments).
pub fn parse_model_key_file(text: &str) -> Result<Zeroizing<[u8; 32]>, StateError> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or(StateError::BadModelKeyFile("no key line"))?;
    let hex_key = line
        .strip_prefix(MODEL_KEY_FILE_TAG)
        .ok_or(StateError::BadModelKeyFile(
            "key line must start with cinfer-dev-model-key-v1",
        ))?
        .trim();
    let mut key = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_key, key.as_mut_slice())
        .map_err(|_| StateError::BadModelKeyFile("key must be 64 hex digits"))?;
    Ok(key)
}

/// Every key the keyserver holds, decrypted.
pub struct Keys {
    /// Signs the published request key.
    pub identity: SigningKey,
    /// The request private key released to attested loaders.
    pub request: RequestPrivateKey,
    /// The receipt signing key released to attested loaders: a receipt signed
    /// with it comes from an attested loader (or this keyserver). Its public
    /// half is in the signed request-key statement.
    pub receipt: SigningKey,
    /// Model data keys, by model id.
    pub models: BTreeMap<String, Zeroizing<[u8; 32]>>,
    /// This keyserver's shares of split model keys, by model id.
    pub model_shares: BTreeMap<String, ShareEntry>,
    /// This keyserver's shares of a split request key and its receipt key:
    /// when present, that key is the one published and released (the
    /// keyserver's own request key is not used).
    pub request_shares: Option<RequestShares>,
}

/// A keyserver's shares of a split request key.
#[derive(Debug, Clone)]
pub struct RequestShares {
    /// The request key's public halves (signed into the statement).
    pub public: RequestKeyPublic,
    /// Share of the request private key.
    pub request: ShareEntry,
    /// Share of the receipt signing key.
    pub receipt: ShareEntry,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("request", &self.request)
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The state directory, opened with its KEK.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    kek: Kek,
}

impl StateDir {
    /// Opens `dir` with the KEK in `kek_file`.
    pub fn open(dir: &Path, kek_file: &Path) -> Result<Self, StateError> {
        Ok(Self {
            dir: dir.to_owned(),
            kek: Kek::read(kek_file)?,
        })
    }

    /// `keyserver init`: creates the KEK file if absent, the state directory,
    /// an identity key and a request key. Refuses an initialized directory.
    pub fn init(dir: &Path, kek_file: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir.join(MODELS_DIR)).map_err(io(dir))?;
        let kek_dir = kek_file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let (Ok(state), Ok(kek)) = (dir.canonicalize(), kek_dir.canonicalize())
            && kek.starts_with(&state)
        {
            return Err(StateError::KekInsideState);
        }
        if dir.join(IDENTITY_FILE).exists() {
            return Err(StateError::AlreadyInitialized(dir.to_owned()));
        }
        Kek::create_if_absent(kek_file)?;
        let state = Self::open(dir, kek_file)?;
        let identity = generate_signing_key()?;
        state.write(IDENTITY_FILE, "identity", &identity.to_bytes())?;
        let request = RequestPrivateKey::generate();
        state.write(REQUEST_FILE, "request", &request.to_bytes())?;
        let receipt = generate_signing_key()?;
        state.write(RECEIPT_FILE, "receipt", &receipt.to_bytes())?;
        Ok(state)
    }

    fn write(&self, file: &str, name: &str, secret: &[u8]) -> Result<(), StateError> {
        let sealed = self.kek.seal(name, secret)?;
        write_replace(&self.dir.join(file), &sealed)
    }

    fn read(&self, file: &Path, name: &str) -> Result<Zeroizing<Vec<u8>>, StateError> {
        let bytes = std::fs::read(file).map_err(io(file))?;
        self.kek.open(name, file, &bytes)
    }

    /// Stores (or replaces) a model data key.
    pub fn add_model_key(&self, id: &str, key: &[u8; 32]) -> Result<(), StateError> {
        check_model_id(id)?;
        if !self.dir.join(IDENTITY_FILE).exists() {
            return Err(StateError::NotInitialized(self.dir.clone()));
        }
        let file = format!("{MODELS_DIR}/{id}{MODEL_SUFFIX}");
        self.write(&file, &format!("model/{id}"), key)
    }

    /// Stores (or replaces) this keyserver's shares of a split key, from a
    /// file `cinfer split-key` wrote; returns the name it is stored under.
    pub fn add_share(&self, file_bytes: &[u8]) -> Result<String, StateError> {
        let file = ShareFile::parse(file_bytes).map_err(StateError::BadShareFile)?;
        if !self.dir.join(IDENTITY_FILE).exists() {
            return Err(StateError::NotInitialized(self.dir.clone()));
        }
        let name = share_name(&file)?;
        std::fs::create_dir_all(self.dir.join(SHARES_DIR)).map_err(io(&self.dir))?;
        let bytes = Zeroizing::new(serde_json::to_vec(&file).unwrap_or_default());
        self.write(
            &format!("{SHARES_DIR}/{name}{SHARE_SUFFIX}"),
            &format!("share/{name}"),
            &bytes,
        )?;
        Ok(name)
    }

    fn load_shares(
        &self,
    ) -> Result<(BTreeMap<String, ShareEntry>, Option<RequestShares>), StateError> {
        let mut models = BTreeMap::new();
        let mut request: Option<RequestShares> = None;
        let dir = self.dir.join(SHARES_DIR);
        for (path, name) in key_files(&dir, SHARE_SUFFIX)? {
            let name = name.as_str();
            let bytes = self.read(&path, &format!("share/{name}"))?;
            let file = ShareFile::parse(&bytes).map_err(StateError::BadShareFile)?;
            if share_name(&file)? != name {
                return Err(StateError::BadKey(path));
            }
            match file.request_key.clone() {
                Some(public) => {
                    if let Some(other) = &request {
                        return Err(StateError::TwoRequestKeyShares(
                            other.public.key_id.clone(),
                            public.key_id,
                        ));
                    }
                    let take = |kind| {
                        file.shares
                            .iter()
                            .find(|s| s.kind == kind)
                            .cloned()
                            .ok_or_else(|| StateError::BadKey(path.clone()))
                    };
                    request = Some(RequestShares {
                        request: take(ReleasedKeyKind::Request)?,
                        receipt: take(ReleasedKeyKind::Receipt)?,
                        public,
                    });
                }
                None => {
                    for s in &file.shares {
                        models.insert(s.id.clone(), s.clone());
                    }
                }
            }
        }
        Ok((models, request))
    }

    /// Decrypts every key. Fails on the first file that does not decrypt.
    pub fn load(&self) -> Result<Keys, StateError> {
        let identity_path = self.dir.join(IDENTITY_FILE);
        if !identity_path.exists() {
            return Err(StateError::NotInitialized(self.dir.clone()));
        }
        let identity = SigningKey::from_slice(&self.read(&identity_path, "identity")?)
            .map_err(|_| StateError::BadKey(identity_path.clone()))?;
        let request_path = self.dir.join(REQUEST_FILE);
        let request = RequestPrivateKey::from_bytes(&self.read(&request_path, "request")?)
            .map_err(|_| StateError::BadKey(request_path.clone()))?;
        let receipt_path = self.dir.join(RECEIPT_FILE);
        let receipt = SigningKey::from_slice(&self.read(&receipt_path, "receipt")?)
            .map_err(|_| StateError::BadKey(receipt_path.clone()))?;
        let mut models = BTreeMap::new();
        let models_dir = self.dir.join(MODELS_DIR);
        for (path, id) in key_files(&models_dir, MODEL_SUFFIX)? {
            let id = id.as_str();
            check_model_id(id)?;
            let secret = self.read(&path, &format!("model/{id}"))?;
            let key: [u8; 32] = secret
                .as_slice()
                .try_into()
                .map_err(|_| StateError::BadKey(path.clone()))?;
            models.insert(id.to_owned(), Zeroizing::new(key));
        }
        let (model_shares, request_shares) = self.load_shares()?;
        Ok(Keys {
            identity,
            request,
            receipt,
            models,
            model_shares,
            request_shares,
        })
    }
}

/// The files of a directory whose names end in `suffix`, each with its name
/// without the suffix (none if the directory does not exist). Other files
/// (e.g. a leftover `.tmp`) are not key files and are skipped.
fn key_files(dir: &Path, suffix: &str) -> Result<Vec<(PathBuf, String)>, StateError> {
    let paths = match std::fs::read_dir(dir) {
        Ok(e) => e
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io(dir))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(dir)(e)),
    };
    Ok(paths
        .into_iter()
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.strip_suffix(suffix)?.to_owned();
            Some((path, name))
        })
        .collect())
}

/// Where a share file is stored: `model-<id>` or `request-<key id>`.
fn share_name(file: &ShareFile) -> Result<String, StateError> {
    let (prefix, id) = match &file.request_key {
        Some(public) => ("request", public.key_id.as_str()),
        None => {
            let first = &file.shares[0].id;
            if file.shares.iter().any(|s| &s.id != first) {
                return Err(StateError::BadShareFile(
                    cinfer_attest::shares::ShareError::Malformed(
                        "one share file holds the shares of one key".into(),
                    ),
                ));
            }
            ("model", first.as_str())
        }
    };
    check_model_id(id)?;
    Ok(format!("{prefix}-{id}"))
}

fn generate_signing_key() -> Result<SigningKey, StateError> {
    loop {
        // A random 32-byte string is a valid scalar except with probability ~2^-32.
        if let Ok(key) = SigningKey::from_slice(random::<32>()?.as_slice()) {
            return Ok(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "cinfer-keyserver-state-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn init_load_and_model_keys() {
        let root = tmp("init");
        let (state_dir, kek) = (root.join("state"), root.join("kek"));
        let state = StateDir::init(&state_dir, &kek).unwrap();
        state.add_model_key("m-1.q4", &[7; 32]).unwrap();
        let keys = StateDir::open(&state_dir, &kek).unwrap().load().unwrap();
        assert_eq!(*keys.models["m-1.q4"], [7; 32]);
        assert!(matches!(
            StateDir::init(&state_dir, &kek),
            Err(StateError::AlreadyInitialized(_))
        ));
        // A key file moved to another model's name does not decrypt.
        std::fs::copy(
            state_dir.join("models/m-1.q4.key.enc"),
            state_dir.join("models/other.key.enc"),
        )
        .unwrap();
        assert!(matches!(
            StateDir::open(&state_dir, &kek).unwrap().load(),
            Err(StateError::Decrypt(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn shares_are_stored_encrypted_and_checked() {
        use cinfer_attest::shares::{SHARE_FILE_FORMAT, split};
        let root = tmp("shares");
        let (state_dir, kek) = (root.join("state"), root.join("kek"));
        let state = StateDir::init(&state_dir, &kek).unwrap();
        let model = split(ReleasedKeyKind::Model, "m1", &[3; 32], 2, 3).unwrap();
        let file = |shares: Vec<ShareEntry>, request_key| ShareFile {
            format: SHARE_FILE_FORMAT.into(),
            shares,
            request_key,
        };
        let json = serde_json::to_vec(&file(vec![model[0].clone()], None)).unwrap();
        assert_eq!(state.add_share(&json).unwrap(), "model-m1");
        let stored = std::fs::read(state_dir.join("shares/model-m1.share.enc")).unwrap();
        assert!(
            !stored
                .windows(16)
                .any(|w| model[0].share.windows(16).any(|v| v == w))
        );
        let public = |id: &str| RequestKeyPublic {
            key_id: id.into(),
            public_key: vec![4; 65],
            receipt_public_key: vec![4; 65],
        };
        for id in ["00aa", "00bb"] {
            let rq = split(ReleasedKeyKind::Request, id, &[5; 32], 2, 3).unwrap();
            let rc = split(ReleasedKeyKind::Receipt, id, &[6; 32], 2, 3).unwrap();
            let json =
                serde_json::to_vec(&file(vec![rq[1].clone(), rc[1].clone()], Some(public(id))))
                    .unwrap();
            assert_eq!(state.add_share(&json).unwrap(), format!("request-{id}"));
        }
        // Two request keys' shares: refused at load, naming both.
        assert!(matches!(
            state.load(),
            Err(StateError::TwoRequestKeyShares(a, b)) if a == "00aa" && b == "00bb"
        ));
        std::fs::remove_file(state_dir.join("shares/request-00bb.share.enc")).unwrap();
        let keys = state.load().unwrap();
        assert_eq!(keys.model_shares["m1"], model[0]);
        assert_eq!(keys.request_shares.unwrap().public.key_id, "00aa");
        // A tampered share, and a share file under another's name, are refused.
        let mut bad = file(vec![model[1].clone()], None);
        bad.shares[0].share[2] ^= 1;
        assert!(matches!(
            state.add_share(&serde_json::to_vec(&bad).unwrap()),
            Err(StateError::BadShareFile(_))
        ));
        std::fs::copy(
            state_dir.join("shares/model-m1.share.enc"),
            state_dir.join("shares/model-m2.share.enc"),
        )
        .unwrap();
        assert!(matches!(state.load(), Err(StateError::Decrypt(_))));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn kek_inside_state_is_refused() {
        let root = tmp("kekinside");
        assert!(matches!(
            StateDir::init(&root, &root.join("kek")),
            Err(StateError::KekInsideState)
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn model_ids_and_key_files() {
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(check_model_id(bad).is_err(), "{bad:?}");
        }
        check_model_id("SmolLM2-135M.Q4_1").unwrap();
        let text = format!("# comment\ncinfer-dev-model-key-v1 {}\n", "ab".repeat(32));
        assert_eq!(*parse_model_key_file(&text).unwrap(), [0xab; 32]);
        assert!(parse_model_key_file("cinfer-dev-request-key-v1 00").is_err());
        assert!(parse_model_key_file("cinfer-dev-model-key-v1 abcd").is_err());
    }
}
