//! Single-use nonces with expiry, in a bounded store.
//!
//! A nonce is consumed by the first attestation that names it, whatever the
//! outcome: a nonce used twice is refused even when its first use failed. A
//! consumed nonce is remembered until it would have expired, so that a replay
//! is named as such; after that it is indistinguishable from one never issued.

use cinfer_attest::NONCE_LEN;
use std::collections::HashMap;

/// Why a nonce was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NonceError {
    /// Never issued by this keyserver (or long expired and forgotten).
    #[error("unknown nonce")]
    Unknown,
    /// Already used by an earlier attestation.
    #[error("nonce already used")]
    Reused,
    /// Issued, but its lifetime has passed.
    #[error("nonce expired")]
    Expired,
    /// Too many nonces outstanding; try again later.
    #[error("too many outstanding nonces")]
    Full,
    /// The operating system's random source failed.
    #[error("no randomness for a nonce")]
    NoRandomness,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    expires_at: u64,
    used: bool,
}

/// Issued nonces, by value.
#[derive(Debug)]
pub struct NonceStore {
    entries: HashMap<[u8; NONCE_LEN], Entry>,
    ttl_secs: u64,
    capacity: usize,
}

impl NonceStore {
    /// A store whose nonces live `ttl_secs` and which holds at most `capacity`.
    pub fn new(ttl_secs: u64, capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            ttl_secs,
            capacity,
        }
    }

    /// Issues a fresh random nonce at time `now`; returns it and its expiry.
    pub fn issue(&mut self, now: u64) -> Result<([u8; NONCE_LEN], u64), NonceError> {
        self.prune(now);
        if self.entries.len() >= self.capacity {
            return Err(NonceError::Full);
        }
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| NonceError::NoRandomness)?;
        let expires_at = now.saturating_add(self.ttl_secs);
        self.entries.insert(
            nonce,
            Entry {
                expires_at,
                used: false,
            },
        );
        Ok((nonce, expires_at))
    }

    /// Consumes `nonce` at time `now`. Valid until `expires_at` inclusive.
    pub fn consume(&mut self, nonce: &[u8], now: u64) -> Result<(), NonceError> {
        let key: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| NonceError::Unknown)?;
        let entry = self.entries.get_mut(&key).ok_or(NonceError::Unknown)?;
        if entry.used {
            return Err(NonceError::Reused);
        }
        entry.used = true;
        if now > entry.expires_at {
            return Err(NonceError::Expired);
        }
        Ok(())
    }

    /// Forgets expired nonces.
    pub fn prune(&mut self, now: u64) {
        self.entries.retain(|_, e| e.expires_at >= now);
    }

    /// Nonces held (issued or used, not yet pruned).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_expiry_and_bound() {
        let mut s = NonceStore::new(60, 3);
        let (a, exp) = s.issue(1000).unwrap();
        assert_eq!(exp, 1060);
        s.consume(&a, 1060).unwrap();
        assert_eq!(s.consume(&a, 1001), Err(NonceError::Reused));
        let (b, _) = s.issue(1000).unwrap();
        assert_eq!(s.consume(&b, 1061), Err(NonceError::Expired));
        assert_eq!(s.consume(&b, 1000), Err(NonceError::Reused));
        assert_eq!(s.consume(&[0; 32], 1000), Err(NonceError::Unknown));
        assert_eq!(s.consume(&[0; 5], 1000), Err(NonceError::Unknown));
        s.issue(1000).unwrap();
        assert_eq!(s.issue(1000), Err(NonceError::Full));
        // Expired entries are pruned, making room.
        s.issue(2000).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.consume(&a, 2000), Err(NonceError::Unknown));
    }
}
