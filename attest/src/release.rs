//! What the keyserver sends back: wrapped keys after verified evidence
//! ([`KeyRelease`]), and its published request key signed by its identity key
//! ([`SignedRequestKey`]). Shared by the keyserver, the loader and clients.

use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Version of the key-release format written by this code.
pub const KEY_RELEASE_VERSION: u32 = 1;
/// Version of the request-key statement written by this code.
pub const REQUEST_KEY_STATEMENT_VERSION: u32 = 1;
/// The HPKE suite of request keys, as named in a [`RequestKeyStatement`].
pub const REQUEST_KEY_SUITE: &str = "DHKEM(P-256,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM";
/// `type` of a [`RequestKeyStatement`]: keeps these signatures apart from
/// anything else an identity key might ever sign.
pub const REQUEST_KEY_STATEMENT_TYPE: &str = "cinfer/request-key/v1";

/// Which kind of secret a [`ReleasedKey`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleasedKeyKind {
    /// A model data key (32-byte AES-256 key of a sealed model).
    Model,
    /// A request private key (32-byte P-256 scalar).
    Request,
    /// The receipt signing key (32-byte P-256 scalar), id [`RECEIPT_KEY_ID`];
    /// released with the request key.
    Receipt,
}

/// The id the receipt signing key is released under.
pub const RECEIPT_KEY_ID: &str = "receipt";

impl ReleasedKeyKind {
    /// The wire name (`model`, `request`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Request => "request",
            Self::Receipt => "receipt",
        }
    }
}

impl std::fmt::Display for ReleasedKeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One secret, wrapped (HPKE, `cinfer_envelope::keywrap`) to the evidence's
/// HPKE public key with context [`release_context`]`(kind, id)` and the
/// release's nonce as associated data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedKey {
    /// What the secret is.
    pub kind: ReleasedKeyKind,
    /// Model id, or request key id.
    pub id: String,
    /// HPKE encapsulated key.
    #[serde(with = "hex::serde")]
    pub enc: Vec<u8>,
    /// The wrapped secret.
    #[serde(with = "hex::serde")]
    pub ciphertext: Vec<u8>,
    /// Present when the wrapped secret is this keyserver's share of a split
    /// key (k-of-n keyservers), wrapped with [`share_context`]: the split's
    /// manifest, which the loader checks the share against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<crate::shares::SplitManifest>,
}

/// The keyserver's answer to verified evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRelease {
    /// [`KEY_RELEASE_VERSION`].
    pub version: u32,
    /// The nonce the evidence answered (also the wrapping AAD).
    #[serde(with = "hex::serde")]
    pub nonce: Vec<u8>,
    /// The wrapped secrets.
    pub keys: Vec<ReleasedKey>,
    /// The releasing keyserver's identity public key (uncompressed SEC1), so a
    /// loader that pins keyservers knows which one answered.
    #[serde(default, with = "hex::serde")]
    pub identity: Vec<u8>,
    /// ECDSA P-256 signature (`r || s`) by that identity over
    /// [`KeyRelease::signed_digest`]; empty when unsigned.
    #[serde(default, with = "hex::serde")]
    pub signature: Vec<u8>,
    /// Present when the keyserver trusted the AK through its endorsement: every
    /// key is then wrapped in HPKE PSK mode under
    /// [`credential_psk`]`(secret, nonce)`, where `secret` is what only the
    /// TPM holding the EK, with the AK loaded, gets back from this credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<Credential>,
}

/// A `TPM2_MakeCredential` result for the attesting TPM's EK and AK name
/// (TPM 2.0 Part 1 §24), plus a tag that lets the loader tell a credential
/// made for this attestation from a replayed one before unwrapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// Contents of the `TPM2B_ID_OBJECT`: `TPM2B_DIGEST(integrity HMAC) ||
    /// encIdentity`.
    #[serde(with = "hex::serde")]
    pub id_object: Vec<u8>,
    /// Contents of the `TPM2B_ENCRYPTED_SECRET`: the seed encrypted to the EK.
    #[serde(with = "hex::serde")]
    pub encrypted_secret: Vec<u8>,
    /// [`credential_binding`]`(secret, nonce)`.
    #[serde(with = "hex::serde")]
    pub binding: Vec<u8>,
}

/// The HPKE PSK id of keys wrapped under a credential's secret.
pub const CREDENTIAL_PSK_ID: &[u8] = b"cinfer/tpm-credential/v1";

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::{KeyInit as _, Mac as _};
    // HMAC accepts keys of any length.
    let mut mac = hmac::Hmac::<sha2_v011::Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The HPKE PSK of a release with a credential: HMAC-SHA256 keyed with the
/// credential's secret over a label and the attestation's nonce. The secret is
/// fresh for every release, so a PSK serves one attestation only.
pub fn credential_psk(secret: &[u8], nonce: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
    zeroize::Zeroizing::new(hmac_sha256(secret, &[b"cinfer/credential-psk/v1", nonce]))
}

/// The tag a [`Credential`] carries: HMAC-SHA256 keyed with the secret over
/// another label and the nonce. A loader whose activated secret does not give
/// this tag for its pending nonce holds a credential of another attestation.
pub fn credential_binding(secret: &[u8], nonce: &[u8]) -> [u8; 32] {
    hmac_sha256(secret, &[b"cinfer/credential-binding/v1", nonce])
}

impl KeyRelease {
    /// What the keyserver signs: SHA-256 over a domain label, the version, the
    /// nonce and every key's kind, id, `enc` and ciphertext, each length-prefixed.
    pub fn signed_digest(&self) -> [u8; 32] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(b"cinfer/key-release/v1 signature");
        field(&self.version.to_be_bytes());
        field(&self.nonce);
        field(&self.identity);
        for k in &self.keys {
            field(k.kind.as_str().as_bytes());
            field(k.id.as_bytes());
            field(&k.enc);
            field(&k.ciphertext);
            // Absent for whole keys, whose digest is unchanged.
            if let Some(m) = &k.split {
                field(b"share");
                field(&[m.threshold]);
                for c in &m.commitments {
                    field(&c.0);
                }
            }
        }
        // Absent in releases without a credential, whose digest is unchanged.
        if let Some(c) = &self.credential {
            field(b"credential");
            field(&c.id_object);
            field(&c.encrypted_secret);
            field(&c.binding);
        }
        h.finalize().into()
    }

    /// Signs the release with the keyserver identity key (setting `identity`).
    pub fn sign(&mut self, identity: &SigningKey) {
        self.identity = identity
            .verifying_key()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec();
        let signature: Signature = identity.sign(&self.signed_digest());
        self.signature = signature.to_bytes().to_vec();
    }

    /// Checks that one of the `pinned` keyserver identities (SEC1) signed this
    /// release, exactly as it is.
    pub fn verify(&self, pinned: &[Vec<u8>]) -> Result<(), StatementError> {
        if !pinned.iter().any(|p| p == &self.identity) {
            return Err(StatementError::BadIdentityKey);
        }
        let key = VerifyingKey::from_sec1_bytes(&self.identity)
            .map_err(|_| StatementError::BadIdentityKey)?;
        let signature =
            Signature::from_slice(&self.signature).map_err(|_| StatementError::BadSignature)?;
        key.verify(&self.signed_digest(), &signature)
            .map_err(|_| StatementError::BadSignature)
    }
}

/// The wrapping context of a released key: `kind || 0x00 || id`, so a secret
/// unwraps only as what it was released as.
pub fn release_context(kind: ReleasedKeyKind, id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(kind.as_str().len() + 1 + id.len());
    out.extend_from_slice(kind.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(id.as_bytes());
    out
}

/// The wrapping context of a released share of a split key:
/// `kind || 0x00 || id || 0x00 || "share"`, so a share never unwraps as a
/// whole key, nor as a share of another key.
pub fn share_context(kind: ReleasedKeyKind, id: &str) -> Vec<u8> {
    let mut out = release_context(kind, id);
    out.extend_from_slice(b"\0share");
    out
}

/// What the keyserver states about its request key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestKeyStatement {
    /// [`REQUEST_KEY_STATEMENT_TYPE`].
    #[serde(rename = "type")]
    pub statement_type: String,
    /// `cinfer_envelope::RequestPublicKey::key_id` of the key.
    pub key_id: String,
    /// [`REQUEST_KEY_SUITE`].
    pub suite: String,
    /// The public key: uncompressed SEC1 P-256 point.
    #[serde(with = "hex::serde")]
    pub public_key: Vec<u8>,
    /// Valid from (Unix seconds).
    pub not_before: u64,
    /// Valid until (Unix seconds).
    pub not_after: u64,
    /// The receipt public key (uncompressed SEC1 P-256 point) whose private
    /// half only attested loaders receive: receipts verify under it.
    #[serde(default, with = "hex::serde")]
    pub receipt_public_key: Vec<u8>,
}

impl RequestKeyStatement {
    /// Whether `now` (Unix seconds) lies in the validity window.
    pub fn is_valid_at(&self, now: u64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// A request key statement signed by the keyserver's identity key. The
/// signature covers the exact bytes of `statement_json` (ECDSA P-256, SHA-256),
/// so clients verify bytes, never a re-serialization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequestKey {
    /// The [`RequestKeyStatement`] as JSON.
    pub statement_json: String,
    /// ECDSA P-256 signature over `statement_json`, `r || s` (64 bytes), hex.
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
}

/// Why a signed request key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StatementError {
    /// The identity public key is not a P-256 point.
    #[error("identity public key is not a P-256 point")]
    BadIdentityKey,
    /// The signature does not verify under the identity key.
    #[error("request key statement signature does not verify")]
    BadSignature,
    /// The signed bytes are not a statement of this format.
    #[error("malformed request key statement: {0}")]
    Malformed(String),
}

impl SignedRequestKey {
    /// Signs `statement` with `identity`.
    pub fn sign(statement: &RequestKeyStatement, identity: &SigningKey) -> Self {
        // Serializing this plain struct cannot fail.
        let statement_json = serde_json::to_string(statement).unwrap_or_default();
        let signature: Signature = identity.sign(statement_json.as_bytes());
        Self {
            statement_json,
            signature: signature.to_bytes().to_vec(),
        }
    }

    /// Verifies the signature under `identity_public_key` (SEC1, as printed by
    /// `keyserver public-identity`) and returns the statement. The caller
    /// still checks the validity window ([`RequestKeyStatement::is_valid_at`]).
    pub fn verify(
        &self,
        identity_public_key: &[u8],
    ) -> Result<RequestKeyStatement, StatementError> {
        let key = VerifyingKey::from_sec1_bytes(identity_public_key)
            .map_err(|_| StatementError::BadIdentityKey)?;
        let signature =
            Signature::from_slice(&self.signature).map_err(|_| StatementError::BadSignature)?;
        key.verify(self.statement_json.as_bytes(), &signature)
            .map_err(|_| StatementError::BadSignature)?;
        let statement: RequestKeyStatement = serde_json::from_str(&self.statement_json)
            .map_err(|e| StatementError::Malformed(e.to_string()))?;
        if statement.statement_type != REQUEST_KEY_STATEMENT_TYPE {
            return Err(StatementError::Malformed(format!(
                "type {:?}",
                statement.statement_type
            )));
        }
        if statement.suite != REQUEST_KEY_SUITE {
            return Err(StatementError::Malformed(format!(
                "suite {:?}",
                statement.suite
            )));
        }
        Ok(statement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{public_bytes, test_key};

    fn statement() -> RequestKeyStatement {
        RequestKeyStatement {
            statement_type: REQUEST_KEY_STATEMENT_TYPE.into(),
            key_id: "0011223344556677".into(),
            suite: REQUEST_KEY_SUITE.into(),
            public_key: public_bytes(&test_key(3)),
            not_before: 100,
            not_after: 200,
            receipt_public_key: public_bytes(&test_key(4)),
        }
    }

    #[test]
    fn signed_statement_verifies_and_refuses_tampering() {
        let identity = test_key(9);
        let signed = SignedRequestKey::sign(&statement(), &identity);
        let got = signed.verify(&public_bytes(&identity)).unwrap();
        assert_eq!(got, statement());
        assert!(got.is_valid_at(150) && !got.is_valid_at(201) && !got.is_valid_at(99));

        let mut tampered = signed.clone();
        tampered.statement_json = tampered.statement_json.replace("200", "900");
        assert_eq!(
            tampered.verify(&public_bytes(&identity)),
            Err(StatementError::BadSignature)
        );
        assert_eq!(
            signed.verify(&public_bytes(&test_key(10))),
            Err(StatementError::BadSignature)
        );
        assert_eq!(signed.verify(&[4; 65]), Err(StatementError::BadIdentityKey));
    }

    #[test]
    fn statement_of_another_type_is_refused() {
        let identity = test_key(9);
        let mut s = statement();
        s.statement_type = "something-else".into();
        let signed = SignedRequestKey::sign(&s, &identity);
        assert!(matches!(
            signed.verify(&public_bytes(&identity)),
            Err(StatementError::Malformed(_))
        ));
    }

    #[test]
    fn release_context_separates_kind_and_id() {
        assert_eq!(
            release_context(ReleasedKeyKind::Model, "m1"),
            b"model\0m1".to_vec()
        );
        assert_ne!(
            release_context(ReleasedKeyKind::Model, "x"),
            release_context(ReleasedKeyKind::Request, "x")
        );
    }
}

/// `type` of a [`Receipt`].
pub const RECEIPT_TYPE: &str = "cinfer/receipt/v1";

/// What an attested loader states about one request it ran. Digests are hex
/// SHA-256. Names no cleartext: only digests of sealed bytes and of the code,
/// policy and model that ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// [`RECEIPT_TYPE`].
    #[serde(rename = "type")]
    pub receipt_type: String,
    /// SHA-256 of the sealed request bytes as the loader received them.
    pub request_sha256: String,
    /// SHA-256 of the program component that ran.
    pub program_sha256: String,
    /// `Policy::digest` of the loader's policy.
    pub policy_sha256: String,
    /// Plaintext SHA-256 of every model the program was allowed to open, by id.
    pub model_sha256: std::collections::BTreeMap<String, String>,
    /// SHA-256 over the sealed reply frames in order (each length-prefixed,
    /// u32 big-endian), the final frame included.
    pub reply_sha256: String,
    /// Number of sealed reply frames.
    pub reply_frames: u64,
    /// How the run ended: `completed`, `program-failed`, `aborted`, or
    /// `cancelled` (aborted because the peer cancelled it; the final reply
    /// frame says aborted), or `refused` (by the safety classifier).
    pub outcome: String,
    /// The safety classifier that read the request first, when the program's
    /// grant has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier: Option<ReceiptClassifier>,
    /// Identity keys (hex SEC1) of the keyservers that released the request
    /// key the request was sealed to: the one that released it whole, or
    /// those whose shares rebuilt it (k-of-n keyservers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyservers: Vec<String>,
}

/// A [`Receipt`]'s account of the classifier gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptClassifier {
    /// Its policy entry.
    pub name: String,
    /// SHA-256 of its component.
    pub sha256: String,
    /// `allow`, `deny`, or `failed` (it was stopped: the gate fails closed).
    pub verdict: String,
}

/// A [`Receipt`] signed (ECDSA P-256 over the exact `receipt_json` bytes) with
/// the receipt key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// The receipt as JSON.
    pub receipt_json: String,
    /// `r || s`, hex.
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
}

impl SignedReceipt {
    /// Signs `receipt` with the receipt key.
    pub fn sign(receipt: &Receipt, key: &SigningKey) -> Self {
        let receipt_json = serde_json::to_string(receipt).unwrap_or_default();
        let signature: Signature = key.sign(receipt_json.as_bytes());
        Self {
            receipt_json,
            signature: signature.to_bytes().to_vec(),
        }
    }

    /// Verifies the signature under `receipt_public_key` (from a verified
    /// [`RequestKeyStatement`]) and returns the receipt.
    pub fn verify(&self, receipt_public_key: &[u8]) -> Result<Receipt, StatementError> {
        let key = VerifyingKey::from_sec1_bytes(receipt_public_key)
            .map_err(|_| StatementError::BadIdentityKey)?;
        let signature =
            Signature::from_slice(&self.signature).map_err(|_| StatementError::BadSignature)?;
        key.verify(self.receipt_json.as_bytes(), &signature)
            .map_err(|_| StatementError::BadSignature)?;
        let receipt: Receipt = serde_json::from_str(&self.receipt_json)
            .map_err(|e| StatementError::Malformed(e.to_string()))?;
        if receipt.receipt_type != RECEIPT_TYPE {
            return Err(StatementError::Malformed(format!(
                "type {:?}",
                receipt.receipt_type
            )));
        }
        Ok(receipt)
    }
}

/// SHA-256 over sealed reply frames, each prefixed by its length (u32 BE): the
/// `reply_sha256` of a [`Receipt`].
pub fn reply_digest<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut d = ReplyDigest::default();
    for f in frames {
        d.update(f);
    }
    d.finish()
}

/// [`reply_digest`] one frame at a time, as the loader streams a reply and the
/// client reads it, with the frame count the receipt also records. The one
/// definition of the receipt's `reply_sha256` and `reply_frames`.
#[derive(Debug, Clone, Default)]
pub struct ReplyDigest {
    hash: sha2::Sha256,
    frames: u64,
}

impl ReplyDigest {
    /// Adds the next sealed frame.
    pub fn update(&mut self, frame: &[u8]) {
        use sha2::Digest as _;
        self.hash.update((frame.len() as u32).to_be_bytes());
        self.hash.update(frame);
        self.frames += 1;
    }

    /// Frames added so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The digest of the frames added so far.
    pub fn finish(&self) -> [u8; 32] {
        use sha2::Digest as _;
        self.hash.clone().finalize().into()
    }
}

#[cfg(test)]
mod receipt_tests {
    use super::*;

    /// Known answers, from Python's `hmac` over the same length-prefixed parts
    /// (a change of HMAC crate or its hash must not change the values).
    #[test]
    fn credential_macs_are_hmac_sha256_over_length_prefixed_parts() {
        assert_eq!(
            hex::encode(credential_binding(
                b"secret-of-32-bytes-000000000000!",
                b"nonce-1"
            )),
            "c7ecef0b23e2224f4ca0810d60912d3c31bae32b6a62079ae22593a51b1d2ec6"
        );
        assert_eq!(
            hex::encode(*credential_psk(b"k", b"")),
            "de6d7e6d17aa544256c967c468a545e9324975d491414bcb45c3f5ede657d5e6"
        );
    }

    #[test]
    fn the_incremental_reply_digest_is_the_batch_one() {
        let frames: [&[u8]; 3] = [b"first", b"", b"third frame"];
        let mut d = ReplyDigest::default();
        assert_eq!(d.finish(), reply_digest([]));
        for (i, f) in frames.iter().enumerate() {
            d.update(f);
            assert_eq!(d.frames(), i as u64 + 1);
            assert_eq!(d.finish(), reply_digest(frames[..=i].iter().copied()));
        }
    }

    #[test]
    fn releases_verify_only_as_signed_by_a_pinned_identity() {
        let ks = SigningKey::from_slice(&[5; 32]).unwrap();
        let other = SigningKey::from_slice(&[6; 32]).unwrap();
        let sec1 = |k: &SigningKey| k.verifying_key().to_sec1_point(false).as_bytes().to_vec();
        let mut r = KeyRelease {
            version: KEY_RELEASE_VERSION,
            nonce: vec![1; 32],
            keys: vec![ReleasedKey {
                kind: ReleasedKeyKind::Model,
                id: "m".into(),
                enc: vec![4; 65],
                ciphertext: vec![9; 48],
                split: None,
            }],
            identity: Vec::new(),
            signature: Vec::new(),
            credential: None,
        };
        assert_eq!(
            r.verify(&[sec1(&ks)]),
            Err(StatementError::BadIdentityKey),
            "unsigned"
        );
        r.sign(&ks);
        r.verify(&[sec1(&other), sec1(&ks)]).unwrap();
        assert_eq!(
            r.verify(&[sec1(&other)]),
            Err(StatementError::BadIdentityKey),
            "not pinned"
        );
        let json = serde_json::to_vec(&r).unwrap();
        let back: KeyRelease = serde_json::from_slice(&json).unwrap();
        back.verify(&[sec1(&ks)]).unwrap();
        let mut t = back.clone();
        t.keys[0].ciphertext[0] ^= 1;
        assert_eq!(t.verify(&[sec1(&ks)]), Err(StatementError::BadSignature));
        let mut t = back.clone();
        t.keys[0].id = "n".into();
        assert_eq!(t.verify(&[sec1(&ks)]), Err(StatementError::BadSignature));
        let mut t = back.clone();
        t.nonce[0] ^= 1;
        assert_eq!(t.verify(&[sec1(&ks)]), Err(StatementError::BadSignature));
        // A share's manifest is covered: another threshold or commitment
        // breaks the signature.
        let mut shared = back.clone();
        shared.keys[0].split = Some(crate::shares::SplitManifest {
            threshold: 2,
            commitments: vec![
                crate::shares::Commitment([1; 32]),
                crate::shares::Commitment([2; 32]),
            ],
        });
        shared.sign(&ks);
        shared.verify(&[sec1(&ks)]).unwrap();
        for tamper in [
            |m: &mut crate::shares::SplitManifest| m.threshold = 1,
            |m: &mut crate::shares::SplitManifest| m.commitments[1].0[0] ^= 1,
        ] {
            let mut t = shared.clone();
            tamper(t.keys[0].split.as_mut().unwrap());
            assert_eq!(t.verify(&[sec1(&ks)]), Err(StatementError::BadSignature));
        }
        // A credential, once signed, is covered too; one added after is not.
        let mut t = back;
        let credential = Credential {
            id_object: vec![1; 50],
            encrypted_secret: vec![2; 256],
            binding: vec![3; 32],
        };
        t.credential = Some(credential.clone());
        assert_eq!(t.verify(&[sec1(&ks)]), Err(StatementError::BadSignature));
        t.sign(&ks);
        t.verify(&[sec1(&ks)]).unwrap();
        for i in 0..3 {
            let mut u = t.clone();
            let c = u.credential.as_mut().unwrap();
            [&mut c.id_object, &mut c.encrypted_secret, &mut c.binding][i][0] ^= 1;
            assert_eq!(u.verify(&[sec1(&ks)]), Err(StatementError::BadSignature));
        }
    }

    #[test]
    fn credential_derivations_depend_on_secret_and_nonce() {
        let psk = credential_psk(&[1; 32], &[2; 32]);
        assert_ne!(*psk, *credential_psk(&[1; 32], &[3; 32]));
        assert_ne!(*psk, *credential_psk(&[4; 32], &[2; 32]));
        assert_ne!(
            *psk,
            credential_binding(&[1; 32], &[2; 32]),
            "labels differ"
        );
        assert_eq!(*psk, *credential_psk(&[1; 32], &[2; 32]));
    }

    #[test]
    fn receipts_verify_only_untampered_under_the_receipt_key() {
        let key = SigningKey::from_slice(&[7; 32]).unwrap();
        let public = key.verifying_key().to_sec1_point(false).as_bytes().to_vec();
        let r = Receipt {
            receipt_type: RECEIPT_TYPE.into(),
            request_sha256: "aa".into(),
            program_sha256: "bb".into(),
            policy_sha256: "cc".into(),
            model_sha256: Default::default(),
            reply_sha256: hex::encode(reply_digest([&b"x"[..]])),
            reply_frames: 1,
            outcome: "completed".into(),
            classifier: None,
            keyservers: Vec::new(),
        };
        let signed = SignedReceipt::sign(&r, &key);
        assert_eq!(signed.verify(&public).unwrap(), r);
        let mut t = signed.clone();
        t.receipt_json = t.receipt_json.replace("completed", "aborted");
        assert_eq!(t.verify(&public), Err(StatementError::BadSignature));
        let other = SigningKey::from_slice(&[8; 32]).unwrap();
        let other_pub = other
            .verifying_key()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec();
        assert_eq!(signed.verify(&other_pub), Err(StatementError::BadSignature));
        assert_ne!(
            reply_digest([&b"ab"[..], b"c"]),
            reply_digest([&b"a"[..], b"bc"])
        );
    }
}
