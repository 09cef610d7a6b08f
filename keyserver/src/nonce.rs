//! Attestation nonces that cost the keyserver nothing to hand out.
//!
//! A nonce is `expires_at (u64 BE, Unix seconds) || random (8 bytes) ||
//! HMAC-SHA256(key, label || expires_at || random)[..16]`, 32 bytes, under a
//! key drawn at random when the process starts. Issuing one stores nothing, so
//! a flood of `POST /v1/nonce` cannot fill anything. At attest time the MAC
//! says the nonce is ours (a forged or altered one is refused), its expiry says
//! it is fresh, and single use is enforced by [`NonceStore::spend`]: the
//! nonces of attestations that passed verification are remembered until they
//! expire, so the set only grows with successful attestations (each needs a
//! real TPM quote), never with anonymous requests. A restarted keyserver has a
//! new key, so nonces it issued before (and its forgotten used set) are void.

use cinfer_attest::NONCE_LEN;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeSet;
use std::collections::HashSet;
use zeroize::Zeroizing;

const MAC_LABEL: &[u8] = b"cinfer/keyserver/nonce/v1";
const RANDOM_LEN: usize = 8;
const MAC_LEN: usize = NONCE_LEN - 8 - RANDOM_LEN;

/// Why a nonce was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NonceError {
    /// Not issued by this keyserver process: wrong length or its MAC does not
    /// verify (forged, altered, or issued before a restart).
    #[error("unknown nonce: not issued by this keyserver (bad length or MAC)")]
    Unknown,
    /// Already spent by an earlier successful attestation.
    #[error("nonce already used")]
    Reused,
    /// Issued, but its lifetime has passed.
    #[error("nonce expired")]
    Expired,
    /// Too many successful attestations within one nonce lifetime to remember.
    #[error("too many attestations within the nonce lifetime; try again later")]
    Full,
    /// The operating system's random source failed.
    #[error("no randomness for a nonce")]
    NoRandomness,
}

/// The nonce MAC key and the nonces spent by successful attestations.
pub struct NonceStore {
    key: Zeroizing<[u8; 32]>,
    ttl_secs: u64,
    capacity: usize,
    spent: HashSet<[u8; NONCE_LEN]>,
    /// The same, by expiry, for forgetting them once they expired.
    spent_by_expiry: BTreeSet<(u64, [u8; NONCE_LEN])>,
}

impl std::fmt::Debug for NonceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceStore")
            .field("ttl_secs", &self.ttl_secs)
            .field("spent", &self.spent.len())
            .finish_non_exhaustive()
    }
}

/// HMAC-SHA256 keyed with `key` over the concatenation of `parts`, ready to
/// finalize or verify (RustCrypto `hmac`).
fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for p in parts {
        mac.update(p);
    }
    mac
}

impl NonceStore {
    /// A store with a fresh random MAC key; nonces live `ttl_secs`, and at most
    /// `capacity` spent nonces are remembered at once.
    pub fn new(ttl_secs: u64, capacity: usize) -> Result<Self, NonceError> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut_slice()).map_err(|_| NonceError::NoRandomness)?;
        Ok(Self::with_key(key, ttl_secs, capacity))
    }

    fn with_key(key: Zeroizing<[u8; 32]>, ttl_secs: u64, capacity: usize) -> Self {
        Self {
            key,
            ttl_secs,
            capacity,
            spent: HashSet::new(),
            spent_by_expiry: BTreeSet::new(),
        }
    }

    fn mac(&self, expires_at: &[u8], random: &[u8]) -> Hmac<Sha256> {
        hmac_sha256(&self.key, &[MAC_LABEL, expires_at, random])
    }

    /// Issues a fresh nonce at time `now`; returns it and its expiry. Stores
    /// nothing.
    pub fn issue(&self, now: u64) -> Result<([u8; NONCE_LEN], u64), NonceError> {
        let expires_at = now.saturating_add(self.ttl_secs);
        let mut random = [0u8; RANDOM_LEN];
        getrandom::fill(&mut random).map_err(|_| NonceError::NoRandomness)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&expires_at.to_be_bytes());
        nonce[8..8 + RANDOM_LEN].copy_from_slice(&random);
        let mac = self.mac(&nonce[..8], &random).finalize().into_bytes();
        nonce[8 + RANDOM_LEN..].copy_from_slice(&mac[..MAC_LEN]);
        Ok((nonce, expires_at))
    }

    /// Checks that `nonce` was issued by this process and has not expired at
    /// `now` (valid until its `expires_at` inclusive), and that it was not
    /// spent. Stores nothing: call it before verifying the evidence, and
    /// [`NonceStore::spend`] once the evidence verified.
    pub fn check(&self, nonce: &[u8], now: u64) -> Result<[u8; NONCE_LEN], NonceError> {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| NonceError::Unknown)?;
        let (expires_at, rest) = nonce.split_at(8);
        let (random, mac) = rest.split_at(RANDOM_LEN);
        // Constant-time comparison of the truncated tag (no timing oracle).
        if self
            .mac(expires_at, random)
            .verify_truncated_left(mac)
            .is_err()
        {
            return Err(NonceError::Unknown);
        }
        let mut be = [0u8; 8];
        be.copy_from_slice(expires_at);
        if now > u64::from_be_bytes(be) {
            return Err(NonceError::Expired);
        }
        if self.spent.contains(&nonce) {
            return Err(NonceError::Reused);
        }
        Ok(nonce)
    }

    /// Spends `nonce` for an attestation that passed verification: checks it
    /// again (two attestations racing on one nonce: the second is refused)
    /// and remembers it until it expires.
    pub fn spend(&mut self, nonce: &[u8], now: u64) -> Result<(), NonceError> {
        let nonce = self.check(nonce, now)?;
        while let Some(&(expiry, n)) = self.spent_by_expiry.first()
            && expiry < now
        {
            self.spent_by_expiry.pop_first();
            self.spent.remove(&n);
        }
        if self.spent.len() >= self.capacity {
            return Err(NonceError::Full);
        }
        let mut be = [0u8; 8];
        be.copy_from_slice(&nonce[..8]);
        self.spent.insert(nonce);
        self.spent_by_expiry.insert((u64::from_be_bytes(be), nonce));
        Ok(())
    }

    /// Spent nonces remembered (not yet pruned).
    pub fn len(&self) -> usize {
        self.spent.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.spent.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_known_answer() {
        // RFC 4231 test case 2 uses a 4-byte key ("Jefe"); zero-padded to 32
        // bytes it is the same HMAC key (keys shorter than the block are padded).
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hex::encode(
                hmac_sha256(&key, &[b"what do ya want ", b"for nothing?"])
                    .finalize()
                    .into_bytes()
            ),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn nonces_are_single_use_time_bound_and_unforgeable() {
        let mut s = NonceStore::new(60, 3).unwrap();
        let (a, exp) = s.issue(1000).unwrap();
        assert_eq!(exp, 1060);
        assert!(s.is_empty(), "issuing stores nothing");
        s.check(&a, 1060).unwrap();
        // Checked but not spent (its attestation failed): still usable.
        s.spend(&a, 1060).unwrap();
        assert_eq!(s.check(&a, 1001), Err(NonceError::Reused));
        assert_eq!(s.spend(&a, 1001), Err(NonceError::Reused));
        let (b, _) = s.issue(1000).unwrap();
        assert_eq!(s.check(&b, 1061), Err(NonceError::Expired));
        // Forged: any changed byte (expiry, random part, MAC), or wrong length.
        for i in [0, 7, 8, 15, 16, 31] {
            let mut f = b;
            f[i] ^= 1;
            assert_eq!(s.check(&f, 1000), Err(NonceError::Unknown), "byte {i}");
        }
        assert_eq!(s.check(&[0; 32], 1000), Err(NonceError::Unknown));
        assert_eq!(s.check(&b[..31], 1000), Err(NonceError::Unknown));
        // Another process's nonce (another key) is unknown here.
        let other = NonceStore::new(60, 3).unwrap();
        assert_eq!(
            s.check(&other.issue(1000).unwrap().0, 1000),
            Err(NonceError::Unknown)
        );
        // The spent set is bounded; expired entries are forgotten, making room.
        s.spend(&b, 1000).unwrap();
        let (c, _) = s.issue(1000).unwrap();
        s.spend(&c, 1000).unwrap();
        let (d, _) = s.issue(1000).unwrap();
        assert_eq!(s.spend(&d, 1000), Err(NonceError::Full));
        let (e, _) = s.issue(2000).unwrap();
        s.spend(&e, 2000).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.check(&a, 2000), Err(NonceError::Expired));
    }
}
