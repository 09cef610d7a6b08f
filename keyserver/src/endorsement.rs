//! TPM endorsement: trusting a loader's attestation key (AK) because it lives
//! in a TPM whose endorsement key (EK) a manufacturer certified, instead of
//! because an operator pinned it.
//!
//! Three steps, each a typed refusal ([`EndorsementError`]):
//!
//! 1. **extract**: the loader's [`Endorsement`] → the EK certificate (DER), the
//!    EK's and the AK's public areas (`TPMT_PUBLIC`, bounded parser,
//!    [`tpm_public`]);
//! 2. **compare**: the EK certificate chains (rustls-webpki, RustCrypto
//!    signatures) to a manufacturer CA the operator configured, at the time the
//!    caller passes; its public key is the presented EK; the EK is a restricted
//!    decryption key with the profile's symmetric scheme; the AK area is the key
//!    that signed the quote, a restricted signing key fixed to its TPM;
//! 3. **challenge**: [`make_credential`] (`TPM2_MakeCredential` in software,
//!    [`credential`]) for the AK's *name*, encrypted to the EK. Only a TPM that
//!    holds this EK's private key *and* has an object with exactly that name
//!    loaded gets the secret back (`TPM2_ActivateCredential`); the keyserver
//!    wraps the released keys under it, so the chain of trust is closed by the
//!    TPM, not by anything the loader says.
//!
//! The certificate's dates are checked at the keyserver's clock (a
//! parameter); revocation is not checked (EK CAs publish CRLs rarely; pin a
//! narrower CA, or remove the CA, to revoke).

pub mod credential;
pub mod tpm_public;

use cinfer_attest::Endorsement;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use sha2::{Digest as _, Sha256};
use std::time::Duration;
use tpm_public::{TpmPublic, Unique};
use x509_cert::der::{Decode as _, Encode as _};

pub use credential::{CredentialError, MadeCredential, make_credential};

/// `tcg-kp-EKCertificate` (2.23.133.8.1), DER contents: the extended key
/// usage of an EK certificate. Required when the certificate has an EKU
/// extension at all (older EK certificates have none).
const TCG_KP_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];

/// `rsaEncryption`.
const RSA_ENCRYPTION: x509_cert::spki::ObjectIdentifier =
    x509_cert::spki::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Why an endorsement was refused. Messages name what was wrong; they carry
/// public values only (fingerprints), never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndorsementError {
    /// The keyserver requires endorsement and the evidence has none.
    #[error("endorsement required: the evidence carries no EK certificate")]
    Missing,
    /// The evidence carries an endorsement but the keyserver has no EK CA.
    #[error("the evidence carries an EK certificate but no EK CA is configured")]
    NoCaConfigured,
    /// The EK certificate does not parse.
    #[error("EK certificate is malformed: {0}")]
    MalformedCertificate(String),
    /// The EK certificate does not chain to a configured manufacturer CA (or
    /// is expired, not yet valid, or has the wrong key usage).
    #[error("EK certificate {fingerprint} does not chain to a configured EK CA: {reason}")]
    UntrustedCertificate {
        /// Hex SHA-256 of the certificate.
        fingerprint: String,
        /// webpki's reason.
        reason: String,
    },
    /// The presented EK public area does not parse.
    #[error("EK public area is malformed: {0}")]
    MalformedEkPublic(&'static str),
    /// The EK is not of a kind this keyserver makes credentials for.
    #[error("unsupported EK: {0}")]
    UnsupportedEk(&'static str),
    /// The certificate certifies another key than the presented EK.
    #[error("the EK certificate's public key is not the presented EK")]
    EkMismatch,
    /// The presented AK public area does not parse.
    #[error("AK public area is malformed: {0}")]
    MalformedAkPublic(&'static str),
    /// The AK public area is not the key that signed the quote.
    #[error("the AK public area is not the key that signed the quote")]
    AkMismatch,
    /// The AK is not a restricted signing key fixed to its TPM.
    #[error("AK attributes: {0}")]
    AkAttributes(&'static str),
}

/// The operator's EK trust: manufacturer CA certificates (trust anchors) and
/// intermediate certificates, DER.
#[derive(Debug, Clone, Default)]
pub struct EkTrust {
    anchors: Vec<TrustAnchor<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
}

impl EkTrust {
    /// Trusts EK certificates chaining to one of `ca_certs` (DER), possibly
    /// through some of `intermediates` (DER).
    pub fn new(ca_certs: &[Vec<u8>], intermediates: &[Vec<u8>]) -> Result<Self, String> {
        let mut anchors = Vec::with_capacity(ca_certs.len());
        for (i, der) in ca_certs.iter().enumerate() {
            let cert = CertificateDer::from(der.as_slice());
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| format!("EK CA certificate {i}: {e}"))?;
            anchors.push(anchor.to_owned());
        }
        Ok(Self {
            anchors,
            intermediates: intermediates
                .iter()
                .map(|d| CertificateDer::from(d.clone()))
                .collect(),
        })
    }

    /// Whether any CA is configured.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}

/// An endorsement that verified: what to make the credential for.
#[derive(Debug, Clone)]
pub struct EndorsedAk {
    /// The EK, parsed.
    pub ek: TpmPublic,
    /// The AK's name: `nameAlg || SHA-256(TPMT_PUBLIC)`.
    pub ak_name: Vec<u8>,
    /// Hex SHA-256 of the EK certificate (for the audit log).
    pub ek_certificate_fingerprint: String,
}

/// Verifies `endorsement` for a quote signed by `ak_public` (uncompressed
/// SEC1 P-256 point), at `now` (Unix seconds).
pub fn verify(
    endorsement: &Endorsement,
    ak_public: &[u8],
    trust: &EkTrust,
    now: u64,
) -> Result<EndorsedAk, EndorsementError> {
    if trust.is_empty() {
        return Err(EndorsementError::NoCaConfigured);
    }
    let fingerprint = hex::encode(Sha256::digest(&endorsement.ek_certificate));

    // Extract.
    let ek =
        TpmPublic::parse(&endorsement.ek_public).map_err(EndorsementError::MalformedEkPublic)?;
    let ak = TpmPublic::parse(&endorsement.ak_public_area)
        .map_err(EndorsementError::MalformedAkPublic)?;
    let cert = x509_cert::Certificate::from_der(&endorsement.ek_certificate)
        .map_err(|e| EndorsementError::MalformedCertificate(e.to_string()))?;

    // The chain, with webpki: signatures, validity at `now`, CA constraints,
    // key usage, critical extensions.
    let der = CertificateDer::from(endorsement.ek_certificate.as_slice());
    let ee = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| EndorsementError::MalformedCertificate(e.to_string()))?;
    let untrusted = |reason: String| EndorsementError::UntrustedCertificate {
        fingerprint: fingerprint.clone(),
        reason,
    };
    ee.verify_for_usage(
        &algorithms::ALL,
        &trust.anchors,
        &trust.intermediates,
        UnixTime::since_unix_epoch(Duration::from_secs(now)),
        webpki::KeyUsage::required_if_present(TCG_KP_EK_CERTIFICATE),
        None,
        None,
    )
    .map_err(|e| untrusted(e.to_string()))?;

    // The certified key is the presented EK.
    let spki = cert.tbs_certificate().subject_public_key_info();
    let Unique::Rsa { modulus } = &ek.unique else {
        return Err(EndorsementError::UnsupportedEk(
            "only RSA EKs are supported",
        ));
    };
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err(EndorsementError::EkMismatch);
    }
    let certified =
        spki.subject_public_key
            .as_bytes()
            .ok_or(EndorsementError::MalformedCertificate(
                "public key is not a whole number of bytes".into(),
            ))?;
    let certified = rsa_public_key(certified).ok_or(EndorsementError::MalformedCertificate(
        "RSA public key does not parse".into(),
    ))?;
    let exponent = ek.rsa_exponent().ok_or(EndorsementError::UnsupportedEk(
        "only RSA EKs are supported",
    ))?;
    if strip_zeros(&certified.0) != strip_zeros(modulus)
        || strip_zeros(&certified.1) != strip_zeros(&exponent.to_be_bytes())
    {
        return Err(EndorsementError::EkMismatch);
    }
    credential::check_ek(&ek)?;

    // The AK is the quoting key, and the TPM will only vouch for it if it is
    // a restricted signing key that never leaves the TPM.
    if ak.ecc_point_sec1().as_deref() != Some(ak_public) {
        return Err(EndorsementError::AkMismatch);
    }
    let attrs = ak.object_attributes;
    use tpm_public::attr;
    for (bit, what) in [
        (attr::FIXED_TPM, "not fixedTPM"),
        (attr::FIXED_PARENT, "not fixedParent"),
        (attr::SENSITIVE_DATA_ORIGIN, "not sensitiveDataOrigin"),
        (attr::RESTRICTED, "not restricted"),
        (attr::SIGN, "not a signing key"),
    ] {
        if attrs & bit == 0 {
            return Err(EndorsementError::AkAttributes(what));
        }
    }
    if attrs & attr::DECRYPT != 0 {
        return Err(EndorsementError::AkAttributes("also a decryption key"));
    }
    // TPM2_LoadExternal takes any public area, fixedTPM and all, without
    // its private part, and the copy has the same name. ActivateCredential
    // authorizes the object's ADMIN role: with the authValue (which a
    // public-only object does not have: TPM_RC_AUTH_UNAVAILABLE) unless
    // adminWithPolicy is set, when a policy the attacker chose could do.
    if attrs & attr::ADMIN_WITH_POLICY != 0 {
        return Err(EndorsementError::AkAttributes(
            "adminWithPolicy (a public-only copy could be authorized to activate)",
        ));
    }
    let ak_name = ak
        .name(&endorsement.ak_public_area)
        .ok_or(EndorsementError::AkAttributes(
            "name algorithm is not SHA-256",
        ))?;
    Ok(EndorsedAk {
        ek,
        ak_name,
        ek_certificate_fingerprint: fingerprint,
    })
}

/// `(modulus, exponent)` of a PKCS#1 `RSAPublicKey`.
fn rsa_public_key(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    use rsa::pkcs1::DecodeRsaPublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let key = rsa::RsaPublicKey::from_pkcs1_der(der).ok()?;
    Some((key.n().to_bytes_be(), key.e().to_bytes_be()))
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

/// Reads PEM certificates (one or more per file) into DER.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    use x509_cert::der::DecodePem as _;
    let mut out = Vec::new();
    let mut rest = pem;
    const END: &str = "-----END CERTIFICATE-----";
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[start..].find(END) else {
            return Err("unterminated PEM certificate".into());
        };
        let block = &rest[start..start + end + END.len()];
        let cert = x509_cert::Certificate::from_pem(block).map_err(|e| e.to_string())?;
        out.push(cert.to_der().map_err(|e| e.to_string())?);
        rest = &rest[start + end + END.len()..];
    }
    if out.is_empty() {
        return Err("no PEM certificate".into());
    }
    Ok(out)
}

/// webpki signature algorithms over RustCrypto: RSA PKCS#1 v1.5 with SHA-256,
/// -384 and -512 (most EK CAs) here, and ECDSA P-256/P-384 with SHA-256/-384
/// from cinfer-signing.
mod algorithms {
    use rsa::signature::Verifier as _;
    use rustls_pki_types::{
        AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm, alg_id,
    };

    #[derive(Debug)]
    enum Hash {
        Sha256,
        Sha384,
        Sha512,
    }

    #[derive(Debug)]
    struct Rsa(Hash);

    impl SignatureVerificationAlgorithm for Rsa {
        fn verify_signature(
            &self,
            public_key: &[u8],
            message: &[u8],
            signature: &[u8],
        ) -> Result<(), InvalidSignature> {
            use rsa::pkcs1::DecodeRsaPublicKey as _;
            use rsa::pkcs1v15::{Signature, VerifyingKey};
            let key =
                rsa::RsaPublicKey::from_pkcs1_der(public_key).map_err(|_| InvalidSignature)?;
            // 2048 bits at least, as webpki's own RSA algorithms require.
            if rsa::traits::PublicKeyParts::size(&key) < 256 {
                return Err(InvalidSignature);
            }
            let sig = Signature::try_from(signature).map_err(|_| InvalidSignature)?;
            let ok = match self.0 {
                Hash::Sha256 => VerifyingKey::<rsa::sha2::Sha256>::new(key).verify(message, &sig),
                Hash::Sha384 => VerifyingKey::<rsa::sha2::Sha384>::new(key).verify(message, &sig),
                Hash::Sha512 => VerifyingKey::<rsa::sha2::Sha512>::new(key).verify(message, &sig),
            };
            ok.map_err(|_| InvalidSignature)
        }

        fn public_key_alg_id(&self) -> AlgorithmIdentifier {
            alg_id::RSA_ENCRYPTION
        }

        fn signature_alg_id(&self) -> AlgorithmIdentifier {
            match self.0 {
                Hash::Sha256 => alg_id::RSA_PKCS1_SHA256,
                Hash::Sha384 => alg_id::RSA_PKCS1_SHA384,
                Hash::Sha512 => alg_id::RSA_PKCS1_SHA512,
            }
        }
    }

    static RSA_SHA256: Rsa = Rsa(Hash::Sha256);
    static RSA_SHA384: Rsa = Rsa(Hash::Sha384);
    static RSA_SHA512: Rsa = Rsa(Hash::Sha512);

    /// The RSA algorithms above, then cinfer-signing's ECDSA ones (the same
    /// RustCrypto glue the loader verifies Fulcio chains with).
    pub(super) static ALL: std::sync::LazyLock<Vec<&'static dyn SignatureVerificationAlgorithm>> =
        std::sync::LazyLock::new(|| {
            let rsa: [&'static dyn SignatureVerificationAlgorithm; 3] =
                [&RSA_SHA256, &RSA_SHA384, &RSA_SHA512];
            rsa.into_iter()
                .chain(cinfer_signing::ECDSA_WEBPKI_ALGORITHMS.iter().copied())
                .collect()
        });
}
