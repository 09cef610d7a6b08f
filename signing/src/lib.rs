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
//! Done by sigstore-rs 0.15 (`sigstore::bundle::verify::Verifier`, driven here without a
//! runtime): bundle shape (media type, one tlog entry, inclusion proof with checkpoint for
//! v0.2/v0.3), leaf certificate chain to a trusted CA (webpki, at the certificate's `notBefore`;
//! every trust-root certificate is a webpki anchor, whose dates webpki does not check),
//! the embedded SCT under a trusted CT log key, the signature over the
//! artifact digest with the certificate key, the `hashedrekord` body against certificate,
//! signature and digest, and `integratedTime` within the certificate's validity.
//!
//! Added by this crate (sigstore-rs 0.15 does not do them, see its issue 285):
//! - the SET: Rekor's signature over the canonical JSON of body, integratedTime, logID and
//!   logIndex, under the trusted log key named by the entry's log ID (untrusted log → refused);
//! - the Merkle inclusion proof (RFC 6962) and the checkpoint: signature under the log key,
//!   root hash and tree size equal to the proof's — through sigstore-rs's `InclusionProof`;
//! - `inclusionProof.logIndex <= logIndex` (public Rekor v1 is sharded: the first is the index
//!   in the shard, the second the global one), and a checkpoint signature whose key hint is the
//!   first 4 bytes of the log ID;
//! - `validFor` windows of CAs, CT logs and Rekor logs at the signing time (sigstore-rs ignores
//!   them);
//! - the validity of every certificate of the trust root's CA chains at the signing time: a
//!   certificate is offered as an anchor only if it and every certificate above it in its chain
//!   are valid then (see `TrustRoot::verifier_at`), so a leaf under an intermediate or root that
//!   had expired, or was not yet valid, is refused and the refusal names that certificate;
//! - the bundle's `messageDigest` equal to the artifact's SHA-256;
//! - identity rules with an anchored regex, and a refusal that names the identity found; the
//!   rules are applied after every other check (sigstore-rs's policy hook runs before its
//!   signature check, so it is handed an allow-all policy), and key-based bundles are verified
//!   under their logged key before that key is compared with the caller's;
//! - telling "expired" from "not yet valid" at signing time.
//!
//! Not checked: the checkpoint's origin line against the log's URL; RFC 3161 timestamps (an
//! entry must carry a SET, which is the only accepted time source); DSSE bundles (refused).
//! Key-based bundles are verified by hand ([`verify_key_bundle`]): sigstore-rs 0.15 only takes
//! certificate-bearing bundles.
//!
//! Refusals are typed ([`SigningError`]); no message contains artifact bytes.

#![forbid(unsafe_code)]

mod error;
mod identity;
mod tlog;
mod trust;

use std::future::Future;
use std::task::{Context, Poll, Waker};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest as _, Sha256};
use sigstore::bundle::Bundle;
use sigstore::bundle::verify::{
    BundleErrorKind, CertificateErrorKind, SignatureErrorKind, VerificationError,
};
use sigstore::crypto::{CosignVerificationKey, Signature};
use sigstore_protobuf_specs::dev::sigstore::bundle::v1::{bundle, verification_material};
use x509_cert::Certificate;
use x509_cert::der::Decode;

pub use error::{CertValidity, ChainCert, SigningError, TransparencyError};
pub use identity::{IdentityRule, Matcher};
pub use trust::TrustRoot;

use identity::{AnyIdentity, FoundIdentity};

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
    let bundle = parse_bundle(bundle_json)?;
    let digest: [u8; 32] = Sha256::digest(artifact).into();

    // Our own pre-reading: signature present, certificate, identity for the refusal message.
    let message = message_signature(&bundle)?;
    check_message_digest(message, &digest)?;
    let material = verification_material(&bundle)?;
    let leaf_der = match &material.content {
        Some(verification_material::Content::Certificate(c)) => c.raw_bytes.as_slice(),
        Some(verification_material::Content::X509CertificateChain(ch)) => ch
            .certificates
            .first()
            .map(|c| c.raw_bytes.as_slice())
            .ok_or_else(|| SigningError::MalformedBundle("empty certificate chain".to_owned()))?,
        Some(verification_material::Content::PublicKey(_)) => {
            return Err(SigningError::MalformedBundle(
                "key-based bundle (public-key hint): use verify_key_bundle".to_owned(),
            ));
        }
        None => return Err(SigningError::MalformedBundle("no certificate".to_owned())),
    };
    let leaf = Certificate::from_der(leaf_der)
        .map_err(|e| SigningError::MalformedBundle(format!("certificate: {e}")))?;
    let found = FoundIdentity::from_cert(&leaf);

    // Transparency log first: it authenticates integratedTime, which every time check uses.
    let entry = single_tlog_entry(material)?;
    let checked = tlog::check_entry(entry, trust)?;

    // Everything sigstore-rs checks, with the trust material valid at the signing time. Its
    // policy hook runs before the signature, log-body and validity checks, so it is given no
    // identity rule: the identity is looked at only once the whole bundle verified, and an
    // invalid bundle is refused for what is wrong with it whoever signed it.
    let verifier = trust.verifier_at(checked.integrated_time)?;
    let result = block_on(verifier.verify_digest_with(digest.into(), bundle, &AnyIdentity, true));
    if let Err(e) = result {
        return Err(map_verification_error(
            e,
            trust,
            &leaf,
            checked.integrated_time,
            &found,
        ));
    }
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
    let (_, spki) = parse_p256_key(public_key_pem)?;
    let signer = verify_logged_key_bundle(artifact, bundle_json, trust)?;
    if signer.subject != hex::encode(Sha256::digest(&spki)) {
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
    let bundle = parse_bundle(bundle_json)?;
    let digest: [u8; 32] = Sha256::digest(artifact).into();
    let message = message_signature(&bundle)?;
    let material = verification_material(&bundle)?;
    if !matches!(
        material.content,
        Some(verification_material::Content::PublicKey(_))
    ) {
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
    let key = CosignVerificationKey::try_from_der(&body.spki)
        .map_err(|_| TransparencyError::Malformed("hashedrekord body: publicKey".to_owned()))?;
    key.verify_signature(Signature::Raw(&message.signature), artifact)
        .map_err(|_| SigningError::SignatureMismatch)?;

    Ok(VerifiedSigner {
        issuer: String::new(),
        subject: hex::encode(Sha256::digest(&body.spki)),
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
    let (key, _) = parse_p256_key(public_key_pem)?;
    let sig = parse_detached(signature_b64_der)?;
    key.verify_signature(Signature::Raw(&sig), artifact)
        .map_err(|_| SigningError::KeySignatureInvalid)
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
    let bundle = parse_bundle(bytes)?;
    Ok(match bundle.verification_material.and_then(|m| m.content) {
        Some(verification_material::Content::PublicKey(_)) => SignatureKind::KeyBundle,
        _ => SignatureKind::KeylessBundle,
    })
}

/// Hex SHA-256 of a P-256 public key's DER SubjectPublicKeyInfo: how key-based signers are
/// named in verdicts and logs (the same value [`VerifiedSigner::subject`] holds for them).
pub fn key_fingerprint(public_key_pem: &[u8]) -> Result<String, SigningError> {
    let (_, spki) = parse_p256_key(public_key_pem)?;
    Ok(hex::encode(Sha256::digest(&spki)))
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
fn message_signature(
    bundle: &Bundle,
) -> Result<&sigstore_protobuf_specs::dev::sigstore::common::v1::MessageSignature, SigningError> {
    match &bundle.content {
        Some(bundle::Content::MessageSignature(m)) if !m.signature.is_empty() => Ok(m),
        Some(bundle::Content::MessageSignature(_)) | None => Err(SigningError::Unsigned),
        Some(bundle::Content::DsseEnvelope(_)) => Err(SigningError::MalformedBundle(
            "DSSE envelopes are not accepted for programs".to_owned(),
        )),
    }
}

fn verification_material(
    bundle: &Bundle,
) -> Result<&sigstore_protobuf_specs::dev::sigstore::bundle::v1::VerificationMaterial, SigningError>
{
    bundle
        .verification_material
        .as_ref()
        .ok_or_else(|| SigningError::MalformedBundle("no verificationMaterial".to_owned()))
}

/// The bundle's one transparency-log entry.
fn single_tlog_entry(
    material: &sigstore_protobuf_specs::dev::sigstore::bundle::v1::VerificationMaterial,
) -> Result<&sigstore_protobuf_specs::dev::sigstore::rekor::v1::TransparencyLogEntry, SigningError>
{
    match material.tlog_entries.as_slice() {
        [entry] => Ok(entry),
        other => Err(TransparencyError::Malformed(format!(
            "need exactly 1 tlog entry, got {}",
            other.len()
        ))
        .into()),
    }
}

fn parse_bundle(json: &[u8]) -> Result<Bundle, SigningError> {
    serde_json::from_slice::<Bundle>(json)
        .map_err(|e| SigningError::MalformedBundle(format!("not a Sigstore bundle: {e}")))
}

/// The bundle's `messageDigest`, where present, must be SHA-256 of the artifact.
fn check_message_digest(
    message: &sigstore_protobuf_specs::dev::sigstore::common::v1::MessageSignature,
    digest: &[u8; 32],
) -> Result<(), SigningError> {
    match &message.message_digest {
        Some(d) if d.digest.as_slice() != digest.as_slice() => Err(SigningError::SignatureMismatch),
        _ => Ok(()),
    }
}

fn parse_p256_key(pem: &[u8]) -> Result<(CosignVerificationKey, Vec<u8>), SigningError> {
    let key = CosignVerificationKey::try_from_pem(pem)
        .map_err(|e| SigningError::MalformedKey(e.to_string()))?;
    match &key {
        CosignVerificationKey::ECDSA_P256_SHA256_ASN1(spki) => {
            let spki = spki.clone();
            Ok((key, spki))
        }
        _ => Err(SigningError::MalformedKey(
            "not an ECDSA P-256 key".to_owned(),
        )),
    }
}

/// The parts of a `hashedrekord` v0.0.1 body that bind it to a key-based bundle.
struct HashedRekord {
    spki: Vec<u8>,
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
        let spki = CosignVerificationKey::try_from_pem(&key_pem)
            .map(|k| match k {
                CosignVerificationKey::ECDSA_P256_SHA256_ASN1(d) => d,
                CosignVerificationKey::ECDSA_P384_SHA384_ASN1(d)
                | CosignVerificationKey::ECDSA_P521_SHA512_ASN1(d)
                | CosignVerificationKey::ED25519(d)
                | CosignVerificationKey::RSA_PSS_SHA256(d)
                | CosignVerificationKey::RSA_PKCS1_SHA256(d) => d,
            })
            .map_err(|_| bad("publicKey"))?;
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
            spki,
            signature,
            sha256,
        })
    }
}

/// Maps sigstore-rs's refusal to ours.
fn map_verification_error(
    e: VerificationError,
    trust: &TrustRoot,
    leaf: &Certificate,
    signing_time: i64,
    found: &FoundIdentity,
) -> SigningError {
    match e {
        VerificationError::Bundle(BundleErrorKind::SignatureMissing) => SigningError::Unsigned,
        VerificationError::Bundle(b) => SigningError::MalformedBundle(b.to_string()),
        VerificationError::Input(i) => SigningError::MalformedBundle(i.to_string()),
        VerificationError::Certificate(CertificateErrorKind::Expired) => {
            let validity = leaf.tbs_certificate().validity();
            let secs = |t: x509_cert::time::Time| {
                i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
            };
            let not_before = secs(validity.not_before);
            let not_after = secs(validity.not_after);
            SigningError::CertificateNotValidAtSigningTime {
                certificate: ChainCert::Signing,
                kind: if signing_time < not_before {
                    CertValidity::NotYetValid
                } else {
                    CertValidity::Expired
                },
                signing_time,
                not_before,
                not_after,
            }
        }
        VerificationError::Certificate(CertificateErrorKind::Sct(_)) => SigningError::SctInvalid,
        VerificationError::Certificate(CertificateErrorKind::Malformed(e)) => {
            SigningError::MalformedBundle(format!("certificate: {e}"))
        }
        // No path to a CA certificate valid at the signing time: name the CA certificate that
        // was out of its dates, if the leaf names one as its issuer; else the CA is unknown.
        VerificationError::Certificate(_) => trust
            .ca_not_valid_at(leaf, signing_time)
            .unwrap_or(SigningError::UntrustedCa),
        VerificationError::Signature(SignatureErrorKind::VerificationFailed(_)) => {
            SigningError::SignatureMismatch
        }
        VerificationError::Signature(SignatureErrorKind::Transparency) => {
            TransparencyError::BodyMismatch.into()
        }
        VerificationError::Signature(s) => SigningError::MalformedBundle(s.to_string()),
        VerificationError::Policy(_) => found.refusal(),
    }
}

/// Drives a future that never waits on I/O or timers (sigstore-rs's verifier only awaits
/// computation) to completion on this thread, instead of a Tokio runtime per call.
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}
