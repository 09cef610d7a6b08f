//! The key this server proves itself to the trusted loader with.
//!
//! The loader serves one peer at a time and only one that signs the challenge
//! in its `Hello` with a key its measured configuration lists (`server-keys`).
//! This is that key's private half: a P-256 scalar, kept in a file as 64 hex
//! digits (`inference-server keygen` writes it, mode 0600, and prints the public
//! half for the loader's configuration). It authenticates the server to the
//! loader; it protects no data (everything on the channel is sealed or public).

use cinfer_channel::{CHALLENGE_LEN, PeerAuth, auth_message};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use std::path::Path;

/// Why a channel key could not be read, made or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelKeyError {
    /// The file could not be read or written.
    #[error("channel key {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold 64 hex digits of a valid P-256 scalar.
    #[error("channel key {0}: not 64 hex digits of a P-256 private key")]
    Malformed(std::path::PathBuf),
    /// No randomness for a new key.
    #[error("no randomness for a new channel key")]
    NoRandomness,
}

/// The server's channel key. Its `Debug` shows the public half only.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelKey(SigningKey);

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ChannelKey")
            .field(&self.public_hex())
            .finish()
    }
}

impl ChannelKey {
    /// A key from its 32-byte scalar; `None` if it is not a valid scalar.
    pub fn from_scalar(bytes: &[u8]) -> Option<Self> {
        SigningKey::from_slice(bytes).ok().map(Self)
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, ChannelKeyError> {
        loop {
            let mut scalar = zeroize::Zeroizing::new([0u8; 32]);
            getrandom::fill(scalar.as_mut_slice()).map_err(|_| ChannelKeyError::NoRandomness)?;
            // Out of range (about 2^-32 of draws): draw again.
            if let Some(k) = Self::from_scalar(scalar.as_slice()) {
                return Ok(k);
            }
        }
    }

    /// Reads a key file (64 hex digits, surrounding whitespace ignored).
    pub fn load(path: &Path) -> Result<Self, ChannelKeyError> {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            ChannelKeyError::Io {
                path: path.to_owned(),
                source,
            }
        })?);
        let bytes = zeroize::Zeroizing::new(
            hex::decode(text.trim()).map_err(|_| ChannelKeyError::Malformed(path.to_owned()))?,
        );
        Self::from_scalar(&bytes).ok_or_else(|| ChannelKeyError::Malformed(path.to_owned()))
    }

    /// Writes the key to a new file (refusing to overwrite one), readable by
    /// its owner only.
    pub fn write_new(&self, path: &Path) -> Result<(), ChannelKeyError> {
        use std::io::Write as _;
        let io = |source| ChannelKeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        let text = zeroize::Zeroizing::new(format!("{}\n", hex::encode(self.0.to_bytes())));
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// The public key, uncompressed SEC1.
    pub fn public_sec1(&self) -> [u8; 65] {
        let mut out = [0u8; 65];
        out.copy_from_slice(self.0.verifying_key().to_sec1_point(false).as_bytes());
        out
    }

    /// The public key as the loader's `server-keys` lists it (hex SEC1).
    pub fn public_hex(&self) -> String {
        hex::encode(self.public_sec1())
    }

    /// The `Auth` answer to a loader's challenge.
    pub fn answer(&self, challenge: &[u8; CHALLENGE_LEN]) -> PeerAuth {
        let signature: Signature = self.0.sign(&auth_message(challenge));
        PeerAuth {
            public_key: self.public_sec1(),
            signature: signature.to_bytes().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::Verifier as _;

    #[test]
    fn a_written_key_loads_and_answers_challenges_the_loader_verifies() {
        let dir = std::env::temp_dir().join(format!("cinfer-channel-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("channel.key");
        let key = ChannelKey::generate().unwrap();
        key.write_new(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            key.write_new(&path),
            Err(ChannelKeyError::Io { .. })
        ));
        let loaded = ChannelKey::load(&path).unwrap();
        assert_eq!(loaded, key);
        assert!(!format!("{loaded:?}").contains(&hex::encode(key.0.to_bytes())));
        let challenge = [3u8; CHALLENGE_LEN];
        let auth = loaded.answer(&challenge);
        let public = VerifyingKey::from_sec1_bytes(&auth.public_key).unwrap();
        let sig = Signature::from_slice(&auth.signature).unwrap();
        public.verify(&auth_message(&challenge), &sig).unwrap();
        assert!(
            public
                .verify(&auth_message(&[4; CHALLENGE_LEN]), &sig)
                .is_err()
        );
        std::fs::write(&path, "zz").unwrap();
        assert!(matches!(
            ChannelKey::load(&path),
            Err(ChannelKeyError::Malformed(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
