//! k-of-n keyservers: secrets split into Shamir shares, one per keyserver, and
//! put back together inside the loader only from shares of `k` different
//! keyservers, each checked against the commitments recorded when the secret
//! was split.
//!
//! Sharing is `vsss-rs`'s byte-wise Shamir over GF(256) (a 32-byte secret
//! gives 33-byte shares: the share's index, then 32 bytes). The dealer is the
//! operator's `cinfer split-key` ([`split`], feature `split`); each keyserver
//! holds one [`ShareEntry`] per secret and releases it, wrapped to the attested
//! loader, with the [`SplitManifest`] of the split. The loader's [`SharePool`]
//! collects shares across key releases and combines a secret once `k` pinned
//! keyservers released shares under the same manifest.
//!
//! A share is *committed*: the manifest lists `SHA-256(label, kind, id, share)`
//! of every share. A keyserver that returns anything else for its share is
//! refused and named ([`ShareError::NotCommitted`]); one that returns a forged
//! manifest is left alone in its own group and never reaches a threshold the
//! honest keyservers do not also meet. A share is bound to its kind and id by
//! its commitment and by the wrapping context, so shares of one key never open
//! another.

use crate::release::ReleasedKeyKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// Largest number of shares (GF(256) has 255 non-zero evaluation points).
pub const MAX_SHARES: u8 = 255;
/// Most secrets whose shares a [`SharePool`] holds at once (a release naming
/// more new secrets is refused).
pub const MAX_PENDING_SECRETS: usize = 256;
/// Longest secret shared: keys are 32 bytes (a share is one byte longer).
pub const MAX_SECRET_BYTES: usize = 64;

/// What every share of one split has in common: the secret's kind and id, the
/// threshold, and a commitment to each share. Keyservers that agree on it
/// hold shares of the same split.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SplitManifest {
    /// Shares needed to rebuild the secret.
    pub threshold: u8,
    /// [`commitment`] of every share, in share order.
    pub commitments: Vec<Commitment>,
}

/// A SHA-256 commitment to one share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Commitment(#[serde(with = "hex::serde")] pub [u8; 32]);

impl SplitManifest {
    /// Number of shares.
    pub fn shares(&self) -> usize {
        self.commitments.len()
    }

    /// Whether this is a well-formed manifest: 2 ≤ threshold ≤ shares ≤ 255,
    /// commitments all different.
    pub fn check(&self) -> Result<(), ShareError> {
        let n = self.commitments.len();
        let distinct = self
            .commitments
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if self.threshold < 2 || usize::from(self.threshold) > n || n > 255 || distinct != n {
            return Err(ShareError::BadManifest);
        }
        Ok(())
    }
}

/// `SHA-256` over a label, the kind, the id and the share bytes (index
/// included), each length-prefixed.
pub fn commitment(kind: ReleasedKeyKind, id: &str, share: &[u8]) -> Commitment {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in [
        b"cinfer/key-share/v1 commitment".as_slice(),
        kind.as_str().as_bytes(),
        id.as_bytes(),
        share,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    Commitment(h.finalize().into())
}

/// One keyserver's share of one secret, as `cinfer split-key` writes it and
/// `keyserver add-share` stores it. Its `Debug` output shows no share bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ShareEntry {
    /// What the secret is.
    pub kind: ReleasedKeyKind,
    /// Model id, or the request key's id (for its request and receipt keys).
    pub id: String,
    /// The share: its index, then one byte per secret byte (hex).
    #[serde(with = "hex::serde")]
    pub share: Vec<u8>,
    /// The split it belongs to.
    pub manifest: SplitManifest,
}

impl std::fmt::Debug for ShareEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareEntry")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("index", &self.share.first())
            .field("threshold", &self.manifest.threshold)
            .field("shares", &self.manifest.shares())
            .finish_non_exhaustive()
    }
}

impl Drop for ShareEntry {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.share);
    }
}

/// The public half of a split request key, which every keyserver holding a
/// share of it states (signed) for clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RequestKeyPublic {
    /// `cinfer_envelope::RequestPublicKey::key_id`.
    pub key_id: String,
    /// Uncompressed SEC1 P-256 point.
    #[serde(with = "hex::serde")]
    pub public_key: Vec<u8>,
    /// The receipt key's uncompressed SEC1 P-256 point.
    #[serde(with = "hex::serde")]
    pub receipt_public_key: Vec<u8>,
}

/// `format` of a [`ShareFile`].
pub const SHARE_FILE_FORMAT: &str = "cinfer-key-share-v1";

/// What `cinfer split-key` writes for one keyserver: its shares of one model
/// key, or of a request key and its receipt key (with their public halves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ShareFile {
    /// [`SHARE_FILE_FORMAT`].
    pub format: String,
    /// The shares.
    pub shares: Vec<ShareEntry>,
    /// For a request key: its public halves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_key: Option<RequestKeyPublic>,
}

impl ShareFile {
    /// Parses and checks a share file: its format, each share against its
    /// manifest, and (for a request key) one request and one receipt share
    /// named by the key id.
    pub fn parse(bytes: &[u8]) -> Result<Self, ShareError> {
        let file: ShareFile =
            serde_json::from_slice(bytes).map_err(|e| ShareError::Malformed(e.to_string()))?;
        if file.format != SHARE_FILE_FORMAT {
            return Err(ShareError::Malformed(format!("format {:?}", file.format)));
        }
        if file.shares.is_empty() {
            return Err(ShareError::Malformed("no shares".into()));
        }
        for s in &file.shares {
            s.manifest.check()?;
            if s.share.len() < 2 || s.share.len() > MAX_SECRET_BYTES + 1 {
                return Err(ShareError::BadShareLength(s.share.len()));
            }
            if !s
                .manifest
                .commitments
                .contains(&commitment(s.kind, &s.id, &s.share))
            {
                return Err(ShareError::Malformed(format!(
                    "the {} share {:?} is not one of its manifest's commitments",
                    s.kind, s.id
                )));
            }
        }
        match &file.request_key {
            Some(public) => {
                let mut kinds: Vec<_> = file.shares.iter().map(|s| s.kind).collect();
                kinds.sort();
                if kinds != [ReleasedKeyKind::Request, ReleasedKeyKind::Receipt]
                    || file.shares.iter().any(|s| s.id != public.key_id)
                {
                    return Err(ShareError::Malformed(
                        "a request-key share file holds one request and one receipt share named by the key id".into(),
                    ));
                }
            }
            None => {
                if file.shares.iter().any(|s| s.kind != ReleasedKeyKind::Model) {
                    return Err(ShareError::Malformed(
                        "request and receipt shares need the request key's public halves".into(),
                    ));
                }
            }
        }
        Ok(file)
    }
}

/// Why a share, a manifest or a combination was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// The manifest's threshold or share count is out of range, or two
    /// commitments are equal.
    #[error("malformed split manifest (need 2 ≤ threshold ≤ shares ≤ 255, distinct commitments)")]
    BadManifest,
    /// The manifest's threshold is below what the loader requires.
    #[error("the split needs only {found} shares; this loader requires at least {required}")]
    ThresholdTooLow {
        /// The manifest's threshold.
        found: u8,
        /// The loader's `keyserver-threshold`.
        required: u8,
    },
    /// The released share is not one the manifest commits to: the keyserver
    /// returned a wrong share.
    #[error("the {kind} share {id:?} from keyserver {keyserver} does not match its commitment")]
    NotCommitted {
        /// Kind of the secret.
        kind: ReleasedKeyKind,
        /// Its id.
        id: String,
        /// Fingerprint of the keyserver that released it.
        keyserver: String,
    },
    /// One release carried two shares of the same secret.
    #[error("one key release carries two shares of the {kind} key {id:?}")]
    Duplicate {
        /// Kind of the secret.
        kind: ReleasedKeyKind,
        /// Its id.
        id: String,
    },
    /// Too many secrets are waiting for shares.
    #[error("more than {MAX_PENDING_SECRETS} split keys are waiting for shares")]
    TooManyPending,
    /// A share is too short, or longer than a share of the longest secret.
    #[error("a share of {0} bytes (2 to {max} accepted)", max = MAX_SECRET_BYTES + 1)]
    BadShareLength(usize),
    /// A share file is not in the expected format.
    #[error("share file: {0}")]
    Malformed(String),
    /// Splitting failed (threshold, share count or random source).
    #[error("cannot split: {0}")]
    Split(String),
}

/// `sha256:` and the first 16 hex digits of SHA-256 of a keyserver's identity
/// key (SEC1): how errors and logs name a keyserver.
pub fn keyserver_fingerprint(identity: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(identity);
    format!("sha256:{}", &hex::encode(d)[..16])
}

/// Splits `secret` into `shares` shares, any `threshold` of which rebuild it.
/// Returns one [`ShareEntry`] per share, in order, all under one manifest.
#[cfg(feature = "split")]
pub fn split(
    kind: ReleasedKeyKind,
    id: &str,
    secret: &[u8],
    threshold: u8,
    shares: u8,
) -> Result<Vec<ShareEntry>, ShareError> {
    if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
        return Err(ShareError::Split(format!(
            "secrets of 1 to {MAX_SECRET_BYTES} bytes are shared (got {})",
            secret.len()
        )));
    }
    if threshold < 2 || threshold > shares {
        return Err(ShareError::Split(format!(
            "need 2 ≤ threshold ≤ shares ≤ {MAX_SHARES} (got {threshold} of {shares})"
        )));
    }
    let rng = rand_core::UnwrapErr(getrandom::SysRng);
    let raw = vsss_rs::Gf256::split_bytes(usize::from(threshold), usize::from(shares), secret, rng)
        .map_err(|e| ShareError::Split(format!("{e:?}")))?;
    let raw: Vec<Zeroizing<Vec<u8>>> = raw.into_iter().map(Zeroizing::new).collect();
    let manifest = SplitManifest {
        threshold,
        commitments: raw.iter().map(|s| commitment(kind, id, s)).collect(),
    };
    manifest.check()?;
    Ok(raw
        .iter()
        .map(|s| ShareEntry {
            kind,
            id: id.to_owned(),
            share: s.to_vec(),
            manifest: manifest.clone(),
        })
        .collect())
}

/// A secret rebuilt from shares, with the keyservers whose shares rebuilt it.
pub struct Combined {
    /// What the secret is.
    pub kind: ReleasedKeyKind,
    /// Its id.
    pub id: String,
    /// The secret.
    pub secret: Zeroizing<Vec<u8>>,
    /// Identity keys (SEC1) of the keyservers whose shares were combined.
    pub keyservers: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Combined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combined")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("keyservers", &self.keyservers.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Held {
    keyserver: Vec<u8>,
    manifest: SplitManifest,
    share: Zeroizing<Vec<u8>>,
}

/// Shares received so far, by secret, each from one keyserver. Cloning it
/// is how a release is staged: the clone takes the new shares and replaces
/// the pool only when the whole release was accepted.
#[derive(Clone, Default)]
pub struct SharePool {
    waiting: BTreeMap<(ReleasedKeyKind, String), Vec<Held>>,
    /// The manifest each rebuilt secret's shares agreed on: later shares of
    /// the same split (a keyserver after the k-th) are checked, not kept.
    rebuilt: BTreeMap<(ReleasedKeyKind, String), SplitManifest>,
}

impl std::fmt::Debug for SharePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.waiting
                    .iter()
                    .map(|((k, id), held)| (format!("{k}/{id}"), held.len())),
            )
            .finish()
    }
}

/// A secret still waiting for shares: how many keyservers sent one and how
/// many the split needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waiting {
    /// Kind of the secret.
    pub kind: ReleasedKeyKind,
    /// Its id.
    pub id: String,
    /// Keyservers that sent a share (under the most common manifest).
    pub have: usize,
    /// The split's threshold.
    pub need: usize,
}

impl SharePool {
    /// Adds the share `keyserver` released for (`kind`, `id`) under
    /// `manifest`, replacing an earlier one from the same keyserver. Checks
    /// the manifest, its threshold against `min_threshold`, and the share
    /// against the manifest's commitments.
    pub fn add(
        &mut self,
        keyserver: &[u8],
        kind: ReleasedKeyKind,
        id: &str,
        manifest: &SplitManifest,
        share: Zeroizing<Vec<u8>>,
        min_threshold: u8,
    ) -> Result<(), ShareError> {
        manifest.check()?;
        if share.len() < 2 || share.len() > MAX_SECRET_BYTES + 1 {
            return Err(ShareError::BadShareLength(share.len()));
        }
        if manifest.threshold < min_threshold {
            return Err(ShareError::ThresholdTooLow {
                found: manifest.threshold,
                required: min_threshold,
            });
        }
        if !manifest.commitments.contains(&commitment(kind, id, &share)) {
            return Err(ShareError::NotCommitted {
                kind,
                id: id.to_owned(),
                keyserver: keyserver_fingerprint(keyserver),
            });
        }
        let key = (kind, id.to_owned());
        if self.rebuilt.get(&key) == Some(manifest) {
            return Ok(());
        }
        if !self.waiting.contains_key(&key) && self.waiting.len() >= MAX_PENDING_SECRETS {
            return Err(ShareError::TooManyPending);
        }
        let held = self.waiting.entry(key).or_default();
        held.retain(|h| h.keyserver != keyserver);
        held.push(Held {
            keyserver: keyserver.to_vec(),
            manifest: manifest.clone(),
            share,
        });
        Ok(())
    }

    /// Rebuilds every secret for which `threshold` keyservers hold shares
    /// under one manifest, and forgets those shares. Shares under another
    /// manifest for a rebuilt secret are dropped too (returned as the
    /// fingerprints of the keyservers that sent them, to be reported).
    pub fn take_complete(&mut self) -> (Vec<Combined>, Vec<String>) {
        let mut done = Vec::new();
        let mut dissent = Vec::new();
        let rebuilt = &mut self.rebuilt;
        self.waiting.retain(|(kind, id), held| {
            let mut by_manifest: BTreeMap<&SplitManifest, Vec<&Held>> = BTreeMap::new();
            for h in held.iter() {
                by_manifest.entry(&h.manifest).or_default().push(h);
            }
            let Some((manifest, group)) = by_manifest
                .into_iter()
                .find(|(m, g)| g.len() >= usize::from(m.threshold))
            else {
                return true;
            };
            let chosen = &group[..usize::from(manifest.threshold)];
            let raw: Vec<Vec<u8>> = chosen.iter().map(|h| h.share.to_vec()).collect();
            let raw: Vec<Zeroizing<Vec<u8>>> = raw.into_iter().map(Zeroizing::new).collect();
            let plain: Vec<Vec<u8>> = raw.iter().map(|s| s.to_vec()).collect();
            let combined = vsss_rs::Gf256::combine_bytes(&plain);
            for mut p in plain {
                zeroize::Zeroize::zeroize(&mut p);
            }
            if let Ok(secret) = combined {
                done.push(Combined {
                    kind: *kind,
                    id: id.clone(),
                    secret: Zeroizing::new(secret),
                    keyservers: chosen.iter().map(|h| h.keyserver.clone()).collect(),
                });
                dissent.extend(
                    held.iter()
                        .filter(|h| &h.manifest != manifest)
                        .map(|h| keyserver_fingerprint(&h.keyserver)),
                );
                rebuilt.insert((*kind, id.clone()), manifest.clone());
                false
            } else {
                // Committed shares with distinct indices always combine; keep
                // them if the library disagrees, rather than lose them.
                true
            }
        });
        (done, dissent)
    }

    /// Secrets still waiting for shares.
    pub fn waiting(&self) -> Vec<Waiting> {
        self.waiting
            .iter()
            .map(|((kind, id), held)| {
                let mut counts: BTreeMap<&SplitManifest, usize> = BTreeMap::new();
                for h in held {
                    *counts.entry(&h.manifest).or_default() += 1;
                }
                let (need, have) = counts
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map_or((0, 0), |(m, n)| (usize::from(m.threshold), *n));
                Waiting {
                    kind: *kind,
                    id: id.clone(),
                    have,
                    need,
                }
            })
            .collect()
    }
}

#[cfg(all(test, feature = "split"))]
mod tests {
    use super::*;

    const A: &[u8] = b"keyserver-a";
    const B: &[u8] = b"keyserver-b";
    const C: &[u8] = b"keyserver-c";

    fn z(v: &[u8]) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(v.to_vec())
    }

    #[test]
    fn any_two_of_three_rebuild_the_secret_and_one_is_not_enough() {
        let secret = [0x5a; 32];
        let shares = split(ReleasedKeyKind::Model, "m", &secret, 2, 3).unwrap();
        assert_eq!(shares.len(), 3);
        let indices: Vec<u8> = shares.iter().map(|s| s.share[0]).collect();
        assert_eq!(
            indices
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3,
            "distinct indices {indices:?}"
        );
        for (i, j) in [(0, 1), (0, 2), (2, 1)] {
            let mut pool = SharePool::default();
            let holders = [A, B, C];
            for k in [i, j] {
                let s = &shares[k];
                pool.add(holders[k], s.kind, &s.id, &s.manifest, z(&s.share), 2)
                    .unwrap();
                if k == i {
                    let (done, _) = pool.take_complete();
                    assert!(done.is_empty(), "one share is not enough");
                    assert_eq!(pool.waiting()[0].have, 1);
                    assert_eq!(pool.waiting()[0].need, 2);
                }
            }
            let (done, dissent) = pool.take_complete();
            assert!(dissent.is_empty());
            assert_eq!(done.len(), 1);
            assert_eq!(*done[0].secret, secret.to_vec());
            assert_eq!(
                done[0].keyservers,
                vec![holders[i].to_vec(), holders[j].to_vec()]
            );
            assert!(
                pool.waiting().is_empty(),
                "shares are forgotten once combined"
            );
        }
    }

    #[test]
    fn shares_after_the_kth_are_checked_but_not_kept() {
        let shares = split(ReleasedKeyKind::Model, "m", &[1; 32], 2, 3).unwrap();
        let mut pool = SharePool::default();
        for (s, k) in shares[..2].iter().zip([A, B]) {
            pool.add(k, s.kind, &s.id, &s.manifest, z(&s.share), 2)
                .unwrap();
        }
        assert_eq!(pool.take_complete().0.len(), 1);
        let s = &shares[2];
        pool.add(C, s.kind, &s.id, &s.manifest, z(&s.share), 2)
            .unwrap();
        assert!(pool.waiting().is_empty());
        assert!(pool.take_complete().0.is_empty());
        let mut bad = s.share.clone();
        bad[1] ^= 1;
        assert!(matches!(
            pool.add(C, s.kind, &s.id, &s.manifest, z(&bad), 2),
            Err(ShareError::NotCommitted { .. })
        ));
    }

    #[test]
    fn at_most_max_pending_secrets_wait_for_shares() {
        let mut pool = SharePool::default();
        for i in 0..MAX_PENDING_SECRETS {
            let id = format!("m{i}");
            let s = &split(ReleasedKeyKind::Model, &id, &[1; 32], 2, 3).unwrap()[0];
            pool.add(A, s.kind, &id, &s.manifest, z(&s.share), 2)
                .unwrap();
        }
        let s = &split(ReleasedKeyKind::Model, "one-more", &[1; 32], 2, 3).unwrap()[0];
        assert_eq!(
            pool.add(A, s.kind, "one-more", &s.manifest, z(&s.share), 2),
            Err(ShareError::TooManyPending)
        );
        assert_eq!(pool.waiting().len(), MAX_PENDING_SECRETS);
        // A secret already waiting still takes its other shares.
        let id = "m0";
        let again = &split(ReleasedKeyKind::Model, id, &[1; 32], 2, 3).unwrap()[1];
        pool.add(B, again.kind, id, &again.manifest, z(&again.share), 2)
            .unwrap();
    }

    #[test]
    fn the_same_keyserver_twice_counts_once() {
        let shares = split(ReleasedKeyKind::Model, "m", &[1; 32], 2, 3).unwrap();
        let mut pool = SharePool::default();
        for s in &shares[..2] {
            pool.add(A, s.kind, &s.id, &s.manifest, z(&s.share), 2)
                .unwrap();
        }
        assert!(pool.take_complete().0.is_empty());
        assert_eq!(pool.waiting()[0].have, 1);
    }

    #[test]
    fn a_wrong_share_is_refused_and_its_keyserver_named() {
        let shares = split(ReleasedKeyKind::Model, "m", &[2; 32], 2, 3).unwrap();
        let mut pool = SharePool::default();
        let mut bad = shares[1].share.clone();
        bad[5] ^= 1;
        let err = pool
            .add(
                B,
                ReleasedKeyKind::Model,
                "m",
                &shares[1].manifest,
                z(&bad),
                2,
            )
            .unwrap_err();
        assert_eq!(
            err,
            ShareError::NotCommitted {
                kind: ReleasedKeyKind::Model,
                id: "m".into(),
                keyserver: keyserver_fingerprint(B),
            }
        );
        assert!(err.to_string().contains(&keyserver_fingerprint(B)));
        assert!(pool.waiting().is_empty(), "nothing was added");
    }

    #[test]
    fn shares_of_one_key_never_open_another() {
        let a = split(ReleasedKeyKind::Model, "a", &[3; 32], 2, 3).unwrap();
        let b = split(ReleasedKeyKind::Model, "b", &[4; 32], 2, 3).unwrap();
        let mut pool = SharePool::default();
        // Under its own manifest but another name or kind: not committed.
        for (kind, id) in [
            (ReleasedKeyKind::Model, "b"),
            (ReleasedKeyKind::Request, "a"),
        ] {
            assert!(matches!(
                pool.add(A, kind, id, &a[0].manifest, z(&a[0].share), 2),
                Err(ShareError::NotCommitted { .. })
            ));
            // Under the other key's manifest: not committed either.
            assert!(matches!(
                pool.add(A, kind, id, &b[0].manifest, z(&a[0].share), 2),
                Err(ShareError::NotCommitted { .. })
            ));
        }
        // One share of each key under its own name: nothing opens.
        pool.add(
            A,
            ReleasedKeyKind::Model,
            "a",
            &a[0].manifest,
            z(&a[0].share),
            2,
        )
        .unwrap();
        pool.add(
            B,
            ReleasedKeyKind::Model,
            "b",
            &b[1].manifest,
            z(&b[1].share),
            2,
        )
        .unwrap();
        assert!(pool.take_complete().0.is_empty());
    }

    #[test]
    fn a_forged_manifest_stays_alone_and_is_reported() {
        let real = split(ReleasedKeyKind::Model, "m", &[6; 32], 2, 3).unwrap();
        let forged = split(ReleasedKeyKind::Model, "m", &[7; 32], 2, 3).unwrap();
        let mut pool = SharePool::default();
        pool.add(
            C,
            ReleasedKeyKind::Model,
            "m",
            &forged[2].manifest,
            z(&forged[2].share),
            2,
        )
        .unwrap();
        pool.add(
            A,
            ReleasedKeyKind::Model,
            "m",
            &real[0].manifest,
            z(&real[0].share),
            2,
        )
        .unwrap();
        assert!(
            pool.take_complete().0.is_empty(),
            "two manifests, one share each"
        );
        pool.add(
            B,
            ReleasedKeyKind::Model,
            "m",
            &real[1].manifest,
            z(&real[1].share),
            2,
        )
        .unwrap();
        let (done, dissent) = pool.take_complete();
        assert_eq!(*done[0].secret, vec![6; 32]);
        assert_eq!(dissent, vec![keyserver_fingerprint(C)]);
    }

    #[test]
    fn thresholds_below_the_loaders_and_bad_manifests_are_refused() {
        let s = split(ReleasedKeyKind::Model, "m", &[8; 32], 2, 3).unwrap();
        let mut pool = SharePool::default();
        assert_eq!(
            pool.add(A, s[0].kind, "m", &s[0].manifest, z(&s[0].share), 3),
            Err(ShareError::ThresholdTooLow {
                found: 2,
                required: 3
            })
        );
        let mut m = s[0].manifest.clone();
        m.threshold = 4;
        assert_eq!(
            pool.add(A, s[0].kind, "m", &m, z(&s[0].share), 2),
            Err(ShareError::BadManifest)
        );
        assert!(matches!(
            split(ReleasedKeyKind::Model, "m", &[1], 1, 3),
            Err(ShareError::Split(_))
        ));
        assert!(matches!(
            split(ReleasedKeyKind::Model, "m", &[1], 4, 3),
            Err(ShareError::Split(_))
        ));
        assert!(matches!(
            split(ReleasedKeyKind::Model, "m", &[0; 65], 2, 3),
            Err(ShareError::Split(_))
        ));
        // A long "share" that its own (forged) manifest commits to is still
        // refused: nothing larger than a key's share is kept.
        let long = vec![1u8; 4096];
        let forged = SplitManifest {
            threshold: 2,
            commitments: vec![
                commitment(ReleasedKeyKind::Model, "m", &long),
                Commitment([9; 32]),
            ],
        };
        assert_eq!(
            pool.add(A, ReleasedKeyKind::Model, "m", &forged, z(&long), 2),
            Err(ShareError::BadShareLength(4096))
        );
    }

    #[test]
    fn share_files_are_checked() {
        let s = split(ReleasedKeyKind::Model, "m", &[9; 32], 2, 3).unwrap();
        let file = ShareFile {
            format: SHARE_FILE_FORMAT.into(),
            shares: vec![s[0].clone()],
            request_key: None,
        };
        let json = serde_json::to_vec(&file).unwrap();
        assert_eq!(ShareFile::parse(&json).unwrap(), file);
        let mut t = file.clone();
        t.shares[0].share[3] ^= 1;
        assert!(ShareFile::parse(&serde_json::to_vec(&t).unwrap()).is_err());
        let mut t = file.clone();
        t.shares[0].kind = ReleasedKeyKind::Request;
        assert!(ShareFile::parse(&serde_json::to_vec(&t).unwrap()).is_err());
        assert!(format!("{:?}", file.shares[0]).contains("index"));
        assert!(!format!("{:?}", file.shares[0]).contains(&hex::encode(&s[0].share)));
    }
}
