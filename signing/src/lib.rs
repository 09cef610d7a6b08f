//! Offline verification of signed programs.
//!
//! Two ways a program may be signed:
//!
//! - **Keyless (Sigstore bundle)**, [`verify_bundle`]: a bundle (v0.2 or v0.3 JSON) with a
//!   Fulcio-style certificate for an OIDC identity, an embedded SCT, a message signature over the
//!   artifact's SHA-256 digest and one Rekor `hashedrekord` entry with signed entry timestamp
//!   (SET), inclusion proof and signed checkpoint.
//! - **Key-based**, [`verify_detached`] (cosign `sign-blob --key` detached signature: base64 DER
//!   ECDSA P-256 SHA-256) and [`verify_key_bundle`] (a v0.3 bundle with a public-key hint and a
//!   Rekor entry, verified with a key the caller trusts — never with the hint).
//!
//! # What is trusted
//!
//! Only the [`TrustRoot`] (a `trusted_root.json`: certificate authorities, Rekor logs, CT logs,
//! each with a `validFor` window), the caller's [`IdentityRule`]s and public keys. Nothing is
//! fetched: no TUF, no Rekor lookups; nothing reads the clock. Every time check is made at the
//! signing time, the entry's `integratedTime`, which is trusted only after the SET verified.
//!
//! # Who checks what
//!
//! Nothing here comes from sigstore-rs: its verification feature pulls in its Fulcio and Rekor
//! clients (reqwest, hyper, tokio, a TLS stack), and the loader has no network stack.
//! Certificate path validation is rustls-webpki's; ECDSA is RustCrypto's (`p256`, `p384`); X.509
//! and the SCT list are parsed by `x509-cert`. Written here (each a published algorithm of a few
//! lines, cross-checked against sigstore-python and sigstore-js on every fixture of
//! `tests/sigstore`):
//! - reading the bundle and trust root: serde types for the fields this crate uses, by the
//!   protobuf JSON mapping of Sigstore's protobuf-specs (`bundle.rs`; unknown fields ignored);
//! - bundle shape: media type v0.1–v0.3, a message signature (DSSE refused), exactly one tlog
//!   entry with a SET, an inclusion proof and a checkpoint, no root certificate in a chain;
//! - the leaf's code-signing profile (v3, not a CA, `digitalSignature`, `codeSigning`);
//! - the leaf chain to a trusted CA at the signing time (webpki; every certificate of the path
//!   valid then: webpki never checks an anchor's dates, so only CA certificates valid at the
//!   signing time together with every certificate above them are offered as anchors, see
//!   `TrustRoot::anchors_at`; a refusal names the certificate that was out of its dates);
//! - the embedded SCT (RFC 6962 precert entry) under a CT log key valid at the signing time;
//! - the signature over the artifact's SHA-256 with the certificate key, and the bundle's
//!   `messageDigest` equal to that digest;
//! - the SET: Rekor's signature over the canonical JSON of body, integratedTime, logID and
//!   logIndex, under the trusted log key named by the entry's log ID (untrusted log → refused);
//! - the Merkle inclusion proof (RFC 9162) and the checkpoint: signature under the log key with
//!   the log's key hint, root hash and tree size equal to the proof's;
//! - `inclusionProof.logIndex <= logIndex` (public Rekor v1 is sharded: the first is the index
//!   in the shard, the second the global one);
//! - the `hashedrekord` body against certificate (or key), signature and digest;
//! - `validFor` windows of CAs, CT logs and Rekor logs at the signing time;
//! - identity rules with an anchored regex, applied after every other check, with a refusal that
//!   names the identity found; key-based bundles are verified under their logged key before that
//!   key is compared with the caller's.
//!
//! Not checked: the checkpoint's origin line against the log's URL; RFC 3161 timestamps (an
//! entry must carry a SET, which is the only accepted time source); DSSE bundles (refused);
//! logs or CT logs whose keys are not ECDSA P-256/P-384 (an entry from one is refused by name).
//!
//! Refusals are typed ([`SigningError`]); no message contains artifact bytes.

#![forbid(unsafe_code)]

mod bundle;
mod cert;
mod crypto;
mod error;
mod identity;
mod tlog;
mod trust;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest as _, Sha256};
use x509_cert::Certificate;
use x509_cert::der::Decode;

/// webpki's ECDSA algorithms over RustCrypto (see `crypto.rs`).
pub use crypto::CHAIN_ALGORITHMS as ECDSA_WEBPKI_ALGORITHMS;
pub use error::{CertValidity, ChainCert, SigningError, TransparencyError};
pub use identity::{IdentityRule, Matcher};
pub use trust::TrustRoot;

use bundle::{Bundle, MessageSignature, TransparencyLogEntry, VerificationMaterial};
use crypto::{EcKey, Hash};
use identity::FoundIdentity;

/// Who signed, when, and where it was logged — the result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedSigner {
    /// OIDC issuer of the certificate (empty for key-based bundles).
    pub issuer: String,
    /// The certificate subject (SAN) that matched a rule; for key-based bundles, the hex
    /// SHA-256 of the public key's DER SubjectPublicKeyInfo.
    pub subject: String,
    /// Rekor `integratedTime` (Unix seconds): the signing time.
    pub integrated_time: i64,
    /// Rekor log index of the entry.
    pub log_index: i64,
    /// Hex log ID of the Rekor log (SHA-256 of its key).
    pub log_id: String,
    /// Base URL of that log, as named in the trust root.
    pub log_url: String,
    /// SHA-256 of the artifact.
    pub artifact_sha256: [u8; 32],
}

/// Verifies a keyless Sigstore bundle over `artifact` against `trust`, and that the signer is
/// allowed by one of `identities`.
///
/// The identity is looked at last, after every cryptographic and log check passed: an invalid
/// bundle is refused for what is wrong with it, and [`SigningError::IdentityNotAllowed`] means a
/// valid bundle by a signer no rule allows.
pub fn verify_bundle(
    artifact: &[u8],
    bundle_json: &[u8],
    trust: &TrustRoot,
    identities: &[IdentityRule],
) -> Result<VerifiedSigner, SigningError> {
    let bundle = Bundle::from_json(bundle_json)?;
    let digest: [u8; 32] = Sha256::digest(artifact).into();

    let message = signed_message(&bundle)?;
    check_message_digest(message, &digest)?;
    let material = verification_material(&bundle)?;
    let leaf_der = match (&material.certificate, &material.x509_certificate_chain) {
        (Some(c), _) => c.raw_bytes.as_slice(),
        (None, Some(ch)) => {
            let (leaf, rest) = ch.certificates.split_first().ok_or_else(|| {
                SigningError::MalformedBundle("empty certificate chain".to_owned())
            })?;
            // As sigstore-rs and sigstore-python: the chain may carry intermediates (which are
            // not used: the trust root's CAs are the only issuers), never a root.
            for c in rest {
                let c = Certificate::from_der(&c.raw_bytes)
                    .map_err(|e| SigningError::MalformedBundle(format!("certificate: {e}")))?;
                if c.tbs_certificate().subject() == c.tbs_certificate().issuer() {
                    return Err(SigningError::MalformedBundle(
                        "the certificate chain contains a root certificate".to_owned(),
                    ));
                }
            }
            leaf.raw_bytes.as_slice()
        }
        (None, None) if material.public_key.is_some() => {
            return Err(SigningError::MalformedBundle(
                "key-based bundle (public-key hint): use verify_key_bundle".to_owned(),
            ));
        }
        (None, None) => return Err(SigningError::MalformedBundle("no certificate".to_owned())),
    };
    let leaf = Certificate::from_der(leaf_der)
        .map_err(|e| SigningError::MalformedBundle(format!("certificate: {e}")))?;
    let found = FoundIdentity::from_cert(&leaf);

    // Transparency log first: it authenticates integratedTime, which every time check uses.
    let entry = single_tlog_entry(material)?;
    let checked = tlog::check_entry(entry, trust)?;
    let t = checked.integrated_time;

    // The certificate: profile, path to a CA valid at t (the leaf's own dates included), SCT.
    cert::check_leaf_profile(&leaf)?;
    let issuer_spki = cert::verify_chain(leaf_der, &leaf, trust, t)?;
    cert::verify_sct(leaf_der, &leaf, &issuer_spki, trust, t)?;

    // The signature over the artifact's digest, with the certificate's key.
    let spki = x509_cert::der::Encode::to_der(leaf.tbs_certificate().subject_public_key_info())
        .map_err(|e| SigningError::MalformedBundle(format!("certificate key: {e}")))?;
    let key = EcKey::from_spki_der(&spki)
        .map_err(|e| SigningError::CertificateRefused(format!("signing certificate key: {e}")))?;
    if !key.verify_prehash(&digest, &message.signature) {
        return Err(SigningError::SignatureMismatch);
    }

    // The logged body names this certificate, signature and digest.
    let body = HashedRekord::parse(&entry.canonicalized_body)?;
    if body.key != LoggedKey::Certificate(leaf_der.to_vec())
        || body.signature != message.signature
        || body.sha256 != digest
    {
        return Err(TransparencyError::BodyMismatch.into());
    }

    // The identity is looked at only once the whole bundle verified: an invalid bundle is
    // refused for what is wrong with it, whoever signed it.
    if !identities.iter().any(|r| r.allows(&found)) {
        return Err(found.refusal());
    }

    let subject = found
        .subjects
        .iter()
        .find(|s| identities.iter().any(|r| r.subject.matches(s)))
        .cloned()
        .unwrap_or_default();
    Ok(VerifiedSigner {
        issuer: found.issuer.unwrap_or_default(),
        subject,
        integrated_time: checked.integrated_time,
        log_index: checked.log_index,
        log_id: hex::encode(&checked.log_id),
        log_url: checked.log_url,
        artifact_sha256: digest,
    })
}

/// Verifies a key-based v0.3 bundle (public-key hint, message signature, `hashedrekord` entry)
/// over `artifact` with `public_key_pem` (the policy's key; the bundle's hint is ignored), with
/// the same transparency-log checks as [`verify_bundle`].
///
/// The bundle is verified completely under the key its log entry records
/// ([`verify_logged_key_bundle`]) before that key is compared with `public_key_pem`: an invalid
/// bundle is refused for what is wrong with it, and [`SigningError::KeyNotTrusted`] means a
/// valid bundle by another key.
pub fn verify_key_bundle(
    artifact: &[u8],
    bundle_json: &[u8],
    trust: &TrustRoot,
    public_key_pem: &[u8],
) -> Result<VerifiedSigner, SigningError> {
    let fingerprint = key_fingerprint(public_key_pem)?;
    let signer = verify_logged_key_bundle(artifact, bundle_json, trust)?;
    if signer.subject != fingerprint {
        return Err(SigningError::KeyNotTrusted {
            found_key_sha256: signer.subject,
        });
    }
    Ok(signer)
}

/// Verifies a key-based v0.3 bundle over `artifact` under the key its `hashedrekord` log entry
/// records (authenticated by the SET; the bundle's hint is ignored), with the same
/// transparency-log checks as [`verify_bundle`], **without deciding whether that key is
/// trusted**: the caller must compare [`VerifiedSigner::subject`] (the hex SHA-256 of the key's
/// DER SubjectPublicKeyInfo, as [`key_fingerprint`] gives it) with the keys it trusts. For
/// callers that hold several keys, or none, and must still refuse an invalid bundle.
pub fn verify_logged_key_bundle(
    artifact: &[u8],
    bundle_json: &[u8],
    trust: &TrustRoot,
) -> Result<VerifiedSigner, SigningError> {
    let bundle = Bundle::from_json(bundle_json)?;
    let digest: [u8; 32] = Sha256::digest(artifact).into();
    let message = signed_message(&bundle)?;
    let material = verification_material(&bundle)?;
    if material.public_key.is_none() {
        return Err(SigningError::MalformedBundle(
            "not a key-based bundle: use verify_bundle".to_owned(),
        ));
    }
    let entry = single_tlog_entry(material)?;
    let checked = tlog::check_entry(entry, trust)?;

    // The logged body (authenticated by the SET) names the key, signature and digest.
    let body = HashedRekord::parse(&entry.canonicalized_body)?;
    if body.signature != message.signature {
        return Err(TransparencyError::BodyMismatch.into());
    }
    check_message_digest(message, &digest)?;
    if body.sha256 != digest {
        return Err(SigningError::SignatureMismatch);
    }
    let LoggedKey::PublicKey(spki) = &body.key else {
        return Err(TransparencyError::BodyMismatch.into());
    };
    let key = EcKey::from_spki_der(spki)
        .map_err(|_| TransparencyError::Malformed("hashedrekord body: publicKey".to_owned()))?;
    if !key.verify(key.natural_hash(), artifact, &message.signature) {
        return Err(SigningError::SignatureMismatch);
    }

    Ok(VerifiedSigner {
        issuer: String::new(),
        subject: hex::encode(Sha256::digest(spki)),
        integrated_time: checked.integrated_time,
        log_index: checked.log_index,
        log_id: hex::encode(&checked.log_id),
        log_url: checked.log_url,
        artifact_sha256: digest,
    })
}

/// Verifies a cosign `sign-blob --key` detached signature: `signature_b64_der` is base64 of a
/// DER ECDSA signature (surrounding whitespace allowed), `public_key_pem` an SPKI PEM ECDSA
/// P-256 key; the signature is over SHA-256 of `artifact`. No transparency log is involved.
pub fn verify_detached(
    artifact: &[u8],
    signature_b64_der: &[u8],
    public_key_pem: &[u8],
) -> Result<(), SigningError> {
    let key = parse_p256_key(public_key_pem)?;
    let sig = parse_detached(signature_b64_der)?;
    if key.verify(Hash::Sha256, artifact, &sig) {
        Ok(())
    } else {
        Err(SigningError::KeySignatureInvalid)
    }
}

/// What a signature file is, judged from its bytes alone (nothing is verified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureKind {
    /// A Sigstore bundle with a signing certificate (keyless): [`verify_bundle`].
    KeylessBundle,
    /// A Sigstore bundle with a public-key hint: [`verify_key_bundle`].
    KeyBundle,
    /// Anything else is taken as a detached `cosign sign-blob --key` signature:
    /// [`verify_detached`].
    Detached,
}

/// Tells keyless bundles, key-based bundles and detached signatures apart. A JSON object
/// that does not parse as a bundle is refused as malformed rather than guessed at.
pub fn signature_kind(bytes: &[u8]) -> Result<SignatureKind, SigningError> {
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Ok(SignatureKind::Detached);
    }
    let bundle = Bundle::from_json(bytes)?;
    Ok(
        match bundle.verification_material.and_then(|m| m.public_key) {
            Some(_) => SignatureKind::KeyBundle,
            None => SignatureKind::KeylessBundle,
        },
    )
}

/// Hex SHA-256 of a P-256 public key's DER SubjectPublicKeyInfo: how key-based signers are
/// named in verdicts and logs (the same value [`VerifiedSigner::subject`] holds for them).
pub fn key_fingerprint(public_key_pem: &[u8]) -> Result<String, SigningError> {
    let key = parse_p256_key(public_key_pem)?;
    Ok(hex::encode(Sha256::digest(key.spki_der())))
}

/// Decodes a detached signature file (base64 of DER, surrounding whitespace allowed) without
/// verifying it: [`SigningError::Unsigned`] when empty, `MalformedSignature` when not base64.
pub fn parse_detached(signature_b64_der: &[u8]) -> Result<Vec<u8>, SigningError> {
    let trimmed = signature_b64_der.trim_ascii();
    if trimmed.is_empty() {
        return Err(SigningError::Unsigned);
    }
    B64.decode(trimmed)
        .map_err(|e| SigningError::MalformedSignature(format!("not base64: {e}")))
}

/// The bundle's message signature over the artifact (programs are never DSSE envelopes).
fn message_signature(bundle: &Bundle) -> Result<&MessageSignature, SigningError> {
    if bundle.dsse_envelope.is_some() {
        return Err(SigningError::MalformedBundle(
            "DSSE envelopes are not accepted for programs".to_owned(),
        ));
    }
    bundle
        .message_signature
        .as_ref()
        .filter(|m| !m.signature.is_empty())
        .ok_or(SigningError::Unsigned)
}

fn verification_material(bundle: &Bundle) -> Result<&VerificationMaterial, SigningError> {
    bundle
        .verification_material
        .as_ref()
        .ok_or_else(|| SigningError::MalformedBundle("no verificationMaterial".to_owned()))
}

/// The bundle's one transparency-log entry.
fn single_tlog_entry(
    material: &VerificationMaterial,
) -> Result<&TransparencyLogEntry, SigningError> {
    match material.tlog_entries.as_slice() {
        [entry] => Ok(entry),
        other => Err(TransparencyError::Malformed(format!(
            "need exactly 1 tlog entry, got {}",
            other.len()
        ))
        .into()),
    }
}

/// Bundle media types accepted: v0.1 and v0.2 (`+json;version=`) and v0.3 (`.v0.3+json`, and
/// the legacy `+json;version=0.3` that sigstore-js wrote and sigstore-python accepts).
const BUNDLE_MEDIA_TYPES: [&str; 4] = [
    "application/vnd.dev.sigstore.bundle+json;version=0.1",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
    "application/vnd.dev.sigstore.bundle.v0.3+json",
];

/// The bundle's message signature over the artifact, in a bundle of a known version (a
/// bundle without a signature is [`SigningError::Unsigned`] whatever else it lacks).
fn signed_message(bundle: &Bundle) -> Result<&MessageSignature, SigningError> {
    let message = message_signature(bundle)?;
    if !BUNDLE_MEDIA_TYPES.contains(&bundle.media_type.as_str()) {
        return Err(SigningError::MalformedBundle(format!(
            "unknown bundle media type {:?}",
            bundle.media_type
        )));
    }
    Ok(message)
}

/// The bundle's `messageDigest`, where present, must be SHA-256 of the artifact.
fn check_message_digest(message: &MessageSignature, digest: &[u8; 32]) -> Result<(), SigningError> {
    match &message.message_digest {
        Some(d) if d.digest.as_slice() != digest.as_slice() => Err(SigningError::SignatureMismatch),
        _ => Ok(()),
    }
}

fn parse_p256_key(pem: &[u8]) -> Result<EcKey, SigningError> {
    let key = EcKey::from_pem(pem).map_err(SigningError::MalformedKey)?;
    if key.is_p256() {
        Ok(key)
    } else {
        Err(SigningError::MalformedKey(
            "not an ECDSA P-256 key".to_owned(),
        ))
    }
}

/// The signer's key as a `hashedrekord` body records it.
#[derive(Debug, PartialEq, Eq)]
enum LoggedKey {
    /// DER of a certificate (keyless bundles).
    Certificate(Vec<u8>),
    /// DER SubjectPublicKeyInfo (key-based bundles).
    PublicKey(Vec<u8>),
}

/// The parts of a `hashedrekord` v0.0.1 body that bind it to a bundle.
struct HashedRekord {
    key: LoggedKey,
    signature: Vec<u8>,
    sha256: [u8; 32],
}

impl HashedRekord {
    fn parse(body: &[u8]) -> Result<Self, SigningError> {
        let bad = |what: &str| TransparencyError::Malformed(format!("hashedrekord body: {what}"));
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| bad("not JSON"))?;
        if v["kind"] != "hashedrekord" || v["apiVersion"] != "0.0.1" {
            return Err(bad("not hashedrekord 0.0.1").into());
        }
        let spec = &v["spec"];
        let key_pem = spec["signature"]["publicKey"]["content"]
            .as_str()
            .and_then(|s| B64.decode(s).ok())
            .ok_or_else(|| bad("publicKey"))?;
        let key = match pem_rfc7468::decode_vec(&key_pem).map_err(|_| bad("publicKey"))? {
            ("CERTIFICATE", der) => LoggedKey::Certificate(der),
            ("PUBLIC KEY", der) => LoggedKey::PublicKey(der),
            _ => return Err(bad("publicKey").into()),
        };
        let signature = spec["signature"]["content"]
            .as_str()
            .and_then(|s| B64.decode(s).ok())
            .ok_or_else(|| bad("signature"))?;
        if spec["data"]["hash"]["algorithm"] != "sha256" {
            return Err(bad("hash algorithm").into());
        }
        let sha256 = spec["data"]["hash"]["value"]
            .as_str()
            .and_then(|s| hex::decode(s).ok())
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .ok_or_else(|| bad("hash"))?;
        Ok(Self {
            key,
            signature,
            sha256,
        })
    }
}
