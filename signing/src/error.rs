//! Typed refusals. Messages name what was wrong and where, never the artifact's bytes.

use thiserror::Error;

/// Why a signature, bundle or trust root was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SigningError {
    /// The bundle is not a Sigstore bundle this crate accepts (JSON, media type, shape).
    #[error("malformed Sigstore bundle: {0}")]
    MalformedBundle(String),
    /// The bundle carries no signature over the artifact.
    #[error("unsigned: the bundle carries no message signature")]
    Unsigned,
    /// The signature (or the bundle's message digest, or the logged digest) does not match the
    /// artifact's bytes.
    #[error("signature does not match the artifact's bytes")]
    SignatureMismatch,
    /// The signing certificate does not chain to a certificate authority of the trust root
    /// (valid at the signing time).
    #[error(
        "untrusted certificate authority: the signing certificate does not chain to a trusted CA"
    )]
    UntrustedCa,
    /// A certificate of the path — the signing certificate, or an intermediate or root of the
    /// trust root's CA chain above it — was not valid at the signing time (the log's
    /// `integratedTime`).
    #[error(
        "{certificate} {kind} at signing time {signing_time} (valid {not_before} .. {not_after}, Unix seconds)"
    )]
    CertificateNotValidAtSigningTime {
        /// Which certificate of the path.
        certificate: ChainCert,
        /// Expired or not yet valid.
        kind: CertValidity,
        /// `integratedTime` of the log entry (Unix seconds).
        signing_time: i64,
        /// Certificate `notBefore` (Unix seconds).
        not_before: i64,
        /// Certificate `notAfter` (Unix seconds).
        not_after: i64,
    },
    /// The signing certificate does not fit the code-signing profile (X.509 v3, not a CA,
    /// `digitalSignature` key usage, `codeSigning` extended key usage) or failed path validation
    /// for a reason other than its issuer or its dates (e.g. an unknown critical extension).
    #[error("{0}")]
    CertificateRefused(String),
    /// No signed certificate timestamp verifies under a trusted CT log key.
    #[error("SCT invalid or not from a trusted CT log")]
    SctInvalid,
    /// The signature is valid but the signer is not one of the allowed identities.
    #[error("identity not allowed: issuer {issuer:?}, subject {subject:?}")]
    IdentityNotAllowed {
        /// OIDC issuer found in the certificate (empty if none).
        issuer: String,
        /// Subject (SAN URI / e-mail) found in the certificate (several are joined by ", ").
        subject: String,
    },
    /// The transparency-log entry or its proofs do not verify.
    #[error("transparency proof invalid: {0}")]
    TransparencyProofInvalid(#[from] TransparencyError),
    /// A key-based signature does not verify under the given public key. With ECDSA a signature
    /// by another key and a signature over other bytes cannot be told apart, so this one reason
    /// covers both.
    #[error("key signature invalid: the signature does not verify under the given public key")]
    KeySignatureInvalid,
    /// A key-based bundle was signed (and logged) with a key that is not the trusted one.
    #[error(
        "signing key not trusted: the logged key (SHA-256 {found_key_sha256}) is not the policy key"
    )]
    KeyNotTrusted {
        /// Hex SHA-256 of the DER SubjectPublicKeyInfo found in the log entry.
        found_key_sha256: String,
    },
    /// A public key (PEM) could not be parsed or is not ECDSA P-256.
    #[error("malformed public key: {0}")]
    MalformedKey(String),
    /// A detached signature is not base64 of a DER signature.
    #[error("malformed signature: {0}")]
    MalformedSignature(String),
    /// The trust root (`trusted_root.json`) could not be used.
    #[error("malformed trust root: {0}")]
    MalformedTrustRoot(String),
    /// An identity rule could not be built (bad regular expression).
    #[error("invalid identity rule: {0}")]
    InvalidIdentityRule(String),
}

/// A certificate of the path from the signing certificate to the trust root.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainCert {
    /// The signing (leaf) certificate from the bundle.
    Signing,
    /// A certificate of a trust-root CA chain (intermediate or root).
    Ca {
        /// Its subject (RFC 4514 string).
        subject: String,
    },
}

impl std::fmt::Display for ChainCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainCert::Signing => f.write_str("signing certificate"),
            ChainCert::Ca { subject } => write!(f, "CA certificate {subject:?}"),
        }
    }
}

/// Which side of its validity window the certificate was on at signing time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertValidity {
    /// Signing time after `notAfter`.
    Expired,
    /// Signing time before `notBefore`.
    NotYetValid,
}

impl std::fmt::Display for CertValidity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertValidity::Expired => "expired",
            CertValidity::NotYetValid => "not yet valid",
        })
    }
}

/// Why the transparency-log evidence was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransparencyError {
    /// The bundle does not have exactly one log entry, or a required part is missing.
    #[error("missing or malformed log entry part: {0}")]
    Malformed(String),
    /// The entry's log ID is not a Rekor log of the trust root.
    #[error("log {log_id} is not a trusted transparency log")]
    UntrustedLog {
        /// Hex log ID from the entry.
        log_id: String,
    },
    /// The entry's log is in the trust root, but its key is of a kind this verifier does not
    /// take (only ECDSA P-256 and P-384 keys are).
    #[error("log {log_id} has a key this verifier cannot use: {why}")]
    UnsupportedLogKey {
        /// Hex log ID from the entry.
        log_id: String,
        /// Why the key is unusable.
        why: String,
    },
    /// The trusted log's key was not valid at the entry's `integratedTime`.
    #[error("log key not valid at integratedTime {0}")]
    LogNotValidAtSigningTime(i64),
    /// The signed entry timestamp (Rekor's signature over body, integratedTime, logID, logIndex)
    /// does not verify under the log's key.
    #[error("signed entry timestamp (SET) does not verify")]
    SignedEntryTimestamp,
    /// `inclusionProof.logIndex` (the index in the log shard's tree) is negative or greater than
    /// `logIndex` (the global index, the shard's offset plus the index in the shard).
    #[error("inclusionProof.logIndex {proof} cannot be the shard-local index of logIndex {entry}")]
    LogIndexMismatch {
        /// `tlogEntries[0].logIndex`.
        entry: i64,
        /// `tlogEntries[0].inclusionProof.logIndex`.
        proof: i64,
    },
    /// The Merkle inclusion proof does not lead from the entry to `rootHash`.
    #[error("Merkle inclusion proof does not lead to rootHash")]
    InclusionProof,
    /// The checkpoint's signature does not verify under the log's key.
    #[error("checkpoint signature does not verify")]
    CheckpointSignature,
    /// The checkpoint's root hash or tree size differ from the inclusion proof's.
    #[error("checkpoint root hash / tree size differ from the inclusion proof")]
    CheckpointMismatch,
    /// The logged body is not consistent with the bundle (certificate or key, signature, digest).
    #[error("log entry body is inconsistent with the bundle")]
    BodyMismatch,
}
