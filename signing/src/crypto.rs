//! ECDSA verification for everything a bundle carries: the artifact signature, the signed entry
//! timestamp, the checkpoint, the SCT and — through webpki — the certificate chain.
//!
//! One implementation: RustCrypto's `p256`/`p384` (the same crates that verify TPM quotes and run
//! HPKE in the loader). Keys are ECDSA P-256 or P-384 in a DER SubjectPublicKeyInfo; signatures
//! are DER; the digest is SHA-256 or SHA-384, chosen by the caller (Sigstore signs with the hash
//! that matches the key, and a Fulcio leaf is certified with the CA's hash, e.g. P-384 over a
//! P-256 key). Anything else is refused: Sigstore's public-good and our test instance use only
//! these two curves.
//!
//! Written here rather than taken from a crate because webpki needs a
//! [`SignatureVerificationAlgorithm`] per (curve, hash) pair and only ships `ring`/`aws-lc-rs`
//! ones; these four are a few lines each over RustCrypto.

use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
use rustls_pki_types::{
    AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm, alg_id,
};
use sha2::{Digest as _, Sha256, Sha384};
use x509_cert::der::{Decode as _, DecodePem as _, Encode as _};
use x509_cert::spki::SubjectPublicKeyInfoOwned;

/// `id-ecPublicKey`.
const EC_PUBLIC_KEY: x509_cert::spki::ObjectIdentifier =
    x509_cert::spki::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp256r1` / `secp384r1`.
const P256: x509_cert::spki::ObjectIdentifier =
    x509_cert::spki::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: x509_cert::spki::ObjectIdentifier =
    x509_cert::spki::ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// The hash an ECDSA signature was made over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hash {
    Sha256,
    Sha384,
}

impl Hash {
    fn digest(self, message: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => Sha256::digest(message).to_vec(),
            Hash::Sha384 => Sha384::digest(message).to_vec(),
        }
    }
}

/// An ECDSA public key (P-256 or P-384) and the DER SubjectPublicKeyInfo it came from.
#[derive(Debug, Clone)]
pub(crate) struct EcKey {
    key: Curve,
    spki: Vec<u8>,
}

#[derive(Debug, Clone)]
enum Curve {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
}

impl EcKey {
    /// From a DER SubjectPublicKeyInfo.
    pub(crate) fn from_spki_der(der: &[u8]) -> Result<Self, String> {
        let spki = SubjectPublicKeyInfoOwned::from_der(der).map_err(|e| e.to_string())?;
        Self::from_spki(&spki)
    }

    /// From a PEM `PUBLIC KEY`.
    pub(crate) fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(pem).map_err(|_| "not PEM text".to_owned())?;
        let spki = SubjectPublicKeyInfoOwned::from_pem(text.trim()).map_err(|e| e.to_string())?;
        Self::from_spki(&spki)
    }

    fn from_spki(spki: &SubjectPublicKeyInfoOwned) -> Result<Self, String> {
        if spki.algorithm.oid != EC_PUBLIC_KEY {
            return Err(format!(
                "not an ECDSA key (algorithm {})",
                spki.algorithm.oid
            ));
        }
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<x509_cert::spki::ObjectIdentifier>().ok())
            .ok_or_else(|| "ECDSA key without a named curve".to_owned())?;
        let point = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| "public key is not a whole number of bytes".to_owned())?;
        let key = match curve {
            P256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(Curve::P256)
                .map_err(|_| "not a P-256 point".to_owned())?,
            P384 => p384::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(Curve::P384)
                .map_err(|_| "not a P-384 point".to_owned())?,
            other => return Err(format!("unsupported curve {other}")),
        };
        let spki = spki.to_der().map_err(|e| e.to_string())?;
        Ok(Self { key, spki })
    }

    /// DER SubjectPublicKeyInfo.
    pub(crate) fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// Whether this is a P-256 key.
    pub(crate) fn is_p256(&self) -> bool {
        matches!(self.key, Curve::P256(_))
    }

    /// The hash Sigstore pairs with this key's curve (SHA-256 for P-256, SHA-384 for P-384).
    pub(crate) fn natural_hash(&self) -> Hash {
        match self.key {
            Curve::P256(_) => Hash::Sha256,
            Curve::P384(_) => Hash::Sha384,
        }
    }

    /// Verifies a DER signature over `message` hashed with `hash`.
    pub(crate) fn verify(&self, hash: Hash, message: &[u8], der_sig: &[u8]) -> bool {
        self.verify_prehash(&hash.digest(message), der_sig)
    }

    /// Verifies a DER signature over an already computed digest.
    pub(crate) fn verify_prehash(&self, digest: &[u8], der_sig: &[u8]) -> bool {
        match &self.key {
            Curve::P256(k) => p256::ecdsa::Signature::from_der(der_sig)
                .is_ok_and(|s| k.verify_prehash(digest, &s).is_ok()),
            Curve::P384(k) => p384::ecdsa::Signature::from_der(der_sig)
                .is_ok_and(|s| k.verify_prehash(digest, &s).is_ok()),
        }
    }
}

/// A webpki signature algorithm: ECDSA on `curve` with `hash`.
#[derive(Debug)]
struct Ecdsa {
    curve: AlgorithmIdentifier,
    hash: Hash,
}

impl SignatureVerificationAlgorithm for Ecdsa {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        let digest = self.hash.digest(message);
        let ok = if self.curve == alg_id::ECDSA_P256 {
            p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key)
                .ok()
                .zip(p256::ecdsa::Signature::from_der(signature).ok())
                .is_some_and(|(k, s)| k.verify_prehash(&digest, &s).is_ok())
        } else {
            p384::ecdsa::VerifyingKey::from_sec1_bytes(public_key)
                .ok()
                .zip(p384::ecdsa::Signature::from_der(signature).ok())
                .is_some_and(|(k, s)| k.verify_prehash(&digest, &s).is_ok())
        };
        ok.then_some(()).ok_or(InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        self.curve
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        match self.hash {
            Hash::Sha256 => alg_id::ECDSA_SHA256,
            Hash::Sha384 => alg_id::ECDSA_SHA384,
        }
    }
}

static P256_SHA256: Ecdsa = Ecdsa {
    curve: alg_id::ECDSA_P256,
    hash: Hash::Sha256,
};
static P256_SHA384: Ecdsa = Ecdsa {
    curve: alg_id::ECDSA_P256,
    hash: Hash::Sha384,
};
static P384_SHA256: Ecdsa = Ecdsa {
    curve: alg_id::ECDSA_P384,
    hash: Hash::Sha256,
};
static P384_SHA384: Ecdsa = Ecdsa {
    curve: alg_id::ECDSA_P384,
    hash: Hash::Sha384,
};

/// The certificate signature algorithms webpki may use on a chain: ECDSA on
/// P-256 and P-384 with SHA-256 and SHA-384 (also the keyserver's, beside its
/// RSA ones, for EK certificate chains).
pub static CHAIN_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] =
    &[&P256_SHA256, &P256_SHA384, &P384_SHA256, &P384_SHA384];

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::EncodePublicKey as _;

    #[test]
    fn p256_signatures_verify_and_tampering_is_refused() {
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        let spki = p256::PublicKey::from(sk.verifying_key())
            .to_public_key_der()
            .unwrap_or_else(|e| panic!("{e}"));
        let key = EcKey::from_spki_der(spki.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert!(key.is_p256() && key.natural_hash() == Hash::Sha256);
        let sig: p256::ecdsa::DerSignature = sk.sign(b"message");
        assert!(key.verify(Hash::Sha256, b"message", sig.as_bytes()));
        assert!(!key.verify(Hash::Sha256, b"messagf", sig.as_bytes()));
        assert!(!key.verify(Hash::Sha384, b"message", sig.as_bytes()));
        assert!(!key.verify(Hash::Sha256, b"message", b"\x30\x00"));
        let alg = &P256_SHA256;
        let point = sk.verifying_key().to_sec1_point(false);
        assert!(
            alg.verify_signature(point.as_bytes(), b"message", sig.as_bytes())
                .is_ok()
        );
        assert!(
            alg.verify_signature(point.as_bytes(), b"other", sig.as_bytes())
                .is_err()
        );
        assert!(
            P384_SHA256
                .verify_signature(point.as_bytes(), b"message", sig.as_bytes())
                .is_err()
        );
    }

    #[test]
    fn other_key_types_are_refused_with_the_reason() {
        // An Ed25519 SubjectPublicKeyInfo.
        let ed = hex::decode("302a300506032b6570032100d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
            .unwrap_or_else(|e| panic!("{e}"));
        let err = EcKey::from_spki_der(&ed).err().unwrap_or_default();
        assert!(err.contains("not an ECDSA key"), "{err}");
        assert!(
            EcKey::from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err()
        );
    }
}
