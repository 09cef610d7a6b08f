//! The channel's peer: who is served, and how long it may stay silent.
//!
//! The loader serves one peer at a time, so the first local process to connect
//! must not be able to keep the real inference server out. A peer is served
//! only after it proves possession of a key the loader's measured
//! configuration names (`server-keys`): `Hello` carries a fresh 32-byte
//! challenge and the peer must answer, within `peer-auth-timeout-ms`, with an
//! `Auth` frame holding its P-256 public key and an ECDSA signature over
//! [`cinfer_channel::auth_message`]. After that it must send a complete frame
//! at least every `peer-idle-timeout-ms` (the server sends `Ping`s; `Hello`
//! tells it the timeout). A peer that does neither is dropped with a typed
//! [`PeerError`], and the next connection is served.
//!
//! The authentication keeps strangers off the channel; it does not make the
//! channel confidential (nothing on it needs to be: see `cinfer_channel`).

use cinfer_channel::{CHALLENGE_LEN, Kind, PeerAuth, auth_message};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest as _, Sha256};
use std::io::Read;
use std::time::{Duration, Instant};

/// Why a peer was dropped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// No `Auth` frame arrived within `peer-auth-timeout-ms` of `Hello`.
    #[error("no Auth frame within {timeout_ms} ms of Hello (peer-auth-timeout-ms)")]
    AuthTimeout {
        /// The timeout.
        timeout_ms: u64,
    },
    /// The peer hung up before authenticating.
    #[error("the peer closed the connection before authenticating")]
    ClosedBeforeAuth,
    /// The first frame was not `Auth`.
    #[error("the first frame is {0:?}, not Auth: this loader serves only authenticated peers")]
    NotAuth(Kind),
    /// The `Auth` payload is not a public key and a signature.
    #[error("malformed Auth frame (a 65-byte P-256 key and a 64-byte signature)")]
    MalformedAuth,
    /// The key is not one of the configured `server-keys`.
    #[error("key {0} is not one of this loader's server-keys")]
    UnknownKey(String),
    /// The signature over this connection's challenge does not verify.
    #[error("the signature over the challenge does not verify under key {0}")]
    BadSignature(String),
    /// No complete frame arrived within `peer-idle-timeout-ms`.
    #[error("no complete frame within {timeout_ms} ms (peer-idle-timeout-ms)")]
    Idle {
        /// The timeout.
        timeout_ms: u64,
    },
    /// No randomness for the challenge.
    #[error("no randomness for the peer challenge")]
    NoRandomness,
}

/// `sha256:` and the hex SHA-256 of a SEC1 public key (how logs and errors name keys).
pub fn key_fingerprint(sec1: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(sec1)))
}

/// Who may be served and the timeouts (from the serve configuration).
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    /// Keys a peer must prove; empty: peers are served unauthenticated
    /// (`allow-unauthenticated-peers`, development only).
    pub keys: Vec<VerifyingKey>,
    /// Time from `Hello` to a verified `Auth`.
    pub auth_timeout: Duration,
    /// Longest wait for the next complete frame.
    pub idle_timeout: Duration,
}

impl PeerPolicy {
    /// Whether peers must authenticate.
    pub fn authenticates(&self) -> bool {
        !self.keys.is_empty()
    }

    /// A fresh challenge for one connection's `Hello`.
    pub fn challenge() -> Result<[u8; CHALLENGE_LEN], PeerError> {
        let mut c = [0u8; CHALLENGE_LEN];
        getrandom::fill(&mut c).map_err(|_| PeerError::NoRandomness)?;
        Ok(c)
    }

    /// Checks an `Auth` payload against `challenge`; the key's fingerprint if
    /// it is a configured key and the signature verifies.
    pub fn verify(
        &self,
        challenge: &[u8; CHALLENGE_LEN],
        payload: &[u8],
    ) -> Result<String, PeerError> {
        let auth = PeerAuth::decode(payload).ok_or(PeerError::MalformedAuth)?;
        let fingerprint = key_fingerprint(&auth.public_key);
        let key = self
            .keys
            .iter()
            .find(|k| k.to_sec1_point(false).as_bytes() == auth.public_key.as_slice())
            .ok_or_else(|| PeerError::UnknownKey(fingerprint.clone()))?;
        let signature = Signature::from_slice(&auth.signature)
            .map_err(|_| PeerError::BadSignature(fingerprint.clone()))?;
        key.verify(&auth_message(challenge), &signature)
            .map_err(|_| PeerError::BadSignature(fingerprint.clone()))?;
        Ok(fingerprint)
    }
}

/// A peer connection whose reads can be bounded in time (TCP and Unix sockets).
pub trait PeerStream: Read {
    /// As `TcpStream::set_read_timeout`.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl PeerStream for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

#[cfg(unix)]
impl PeerStream for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
}

/// Reads from a peer until a deadline: every read waits at most until then,
/// and one past it fails with `TimedOut`. A deadline per frame bounds the
/// whole frame, so a peer cannot stay by trickling bytes.
#[derive(Debug)]
pub struct DeadlineReader<R> {
    inner: R,
    deadline: Option<Instant>,
}

impl<R: PeerStream> DeadlineReader<R> {
    /// No deadline yet.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            deadline: None,
        }
    }

    /// Reads from now on must finish within `within`.
    pub fn deadline_in(&mut self, within: Duration) {
        self.deadline = Some(Instant::now() + within);
    }

    /// Whether an I/O error is this reader's deadline passing.
    pub fn is_timeout(e: &std::io::Error) -> bool {
        e.kind() == std::io::ErrorKind::TimedOut
    }
}

impl<R: PeerStream> Read for DeadlineReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.inner.set_read_timeout(Some(left))?;
        }
        match self.inner.read(buf) {
            // A socket read timeout reads as WouldBlock on Unix.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(std::io::ErrorKind::TimedOut.into())
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_slice(&[b; 32]).unwrap()
    }

    fn auth(k: &SigningKey, challenge: &[u8; CHALLENGE_LEN]) -> Vec<u8> {
        let sig: Signature = k.sign(&auth_message(challenge));
        let mut public_key = [0u8; 65];
        public_key.copy_from_slice(k.verifying_key().to_sec1_point(false).as_bytes());
        PeerAuth {
            public_key,
            signature: sig.to_bytes().into(),
        }
        .encode()
    }

    #[test]
    fn only_a_configured_key_signing_this_challenge_is_accepted() {
        let server = key(0x31);
        let policy = PeerPolicy {
            keys: vec![*server.verifying_key()],
            auth_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
        };
        let c = [5u8; CHALLENGE_LEN];
        let fp = key_fingerprint(server.verifying_key().to_sec1_point(false).as_bytes());
        assert_eq!(policy.verify(&c, &auth(&server, &c)).ok(), Some(fp.clone()));
        // Another challenge (a replayed Auth), another key, junk.
        assert!(matches!(
            policy.verify(&[6; CHALLENGE_LEN], &auth(&server, &c)),
            Err(PeerError::BadSignature(f)) if f == fp
        ));
        let stranger = key(0x32);
        let stranger_fp = key_fingerprint(stranger.verifying_key().to_sec1_point(false).as_bytes());
        assert!(matches!(
            policy.verify(&c, &auth(&stranger, &c)),
            Err(PeerError::UnknownKey(f)) if f == stranger_fp
        ));
        assert!(matches!(
            policy.verify(&c, b"short"),
            Err(PeerError::MalformedAuth)
        ));
        // A configured key with a signature by another key.
        let mut forged = auth(&stranger, &c);
        forged[..65].copy_from_slice(server.verifying_key().to_sec1_point(false).as_bytes());
        assert!(matches!(
            policy.verify(&c, &forged),
            Err(PeerError::BadSignature(_))
        ));
    }
}
