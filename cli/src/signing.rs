//! Key-based program signing (`cinfer keygen`, `cinfer sign`): ECDSA P-256 with
//! SHA-256, keys in PKCS#8 / SubjectPublicKeyInfo PEM, signatures as base64 of
//! DER — byte-compatible with `cosign generate-key-pair`-style P-256 keys and
//! `cosign sign-blob --key` output, so either tool's signatures verify with the
//! other (the loader checks them with `cinfer_signing::verify_detached`).

use anyhow::{Context, Result};
use base64::Engine as _;
use p256::ecdsa::{DerSignature, SigningKey, signature::Signer as _};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use zeroize::Zeroizing;

/// A fresh key pair: (private PKCS#8 PEM, public SPKI PEM).
pub fn generate() -> Result<(Zeroizing<String>, String)> {
    let key = loop {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).context("no system randomness")?;
        // Out-of-range scalars (probability ~2^-32) are simply drawn again.
        if let Ok(k) = SigningKey::from_slice(seed.as_slice()) {
            break k;
        }
    };
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .context("encoding the private key")?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .context("encoding the public key")?;
    Ok((Zeroizing::new(private.to_string()), public))
}

/// Signs `bytes`: base64 of the DER ECDSA-SHA256 signature, with a final newline.
pub fn sign(private_pem: &str, bytes: &[u8]) -> Result<String> {
    let key = SigningKey::from_pkcs8_pem(private_pem)
        .context("the key is not an unencrypted PKCS#8 PEM ECDSA P-256 private key")?;
    let sig: DerSignature = key.sign(bytes);
    Ok(format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(sig.as_bytes())
    ))
}

/// Hex SHA-256 of the public key's DER SubjectPublicKeyInfo (as the loader names key signers).
pub fn fingerprint(public_pem: &str) -> Result<String> {
    Ok(cinfer_signing::key_fingerprint(public_pem.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::VerifyingKey;
    use p256::pkcs8::DecodePublicKey;

    #[test]
    fn signatures_verify_with_the_loader_verifier_and_only_over_the_signed_bytes() {
        let (private, public) = generate().unwrap();
        let sig = sign(&private, b"component bytes").unwrap();
        cinfer_signing::verify_detached(b"component bytes", sig.as_bytes(), public.as_bytes())
            .unwrap();
        assert!(matches!(
            cinfer_signing::verify_detached(b"other bytes", sig.as_bytes(), public.as_bytes()),
            Err(cinfer_signing::SigningError::KeySignatureInvalid)
        ));
        let (_, other_public) = generate().unwrap();
        assert!(matches!(
            cinfer_signing::verify_detached(
                b"component bytes",
                sig.as_bytes(),
                other_public.as_bytes()
            ),
            Err(cinfer_signing::SigningError::KeySignatureInvalid)
        ));
        assert!(VerifyingKey::from_public_key_pem(&public).is_ok());
    }

    #[test]
    fn signs_with_the_cosign_fixture_key_like_cosign() {
        // The offline fixture key pair made by tests/sigstore (cosign format).
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/sigstore/fixtures");
        let private = std::fs::read_to_string(dir.join("cosign.key.pem")).unwrap();
        let public = std::fs::read(dir.join("cosign.pub")).unwrap();
        let sig = sign(&private, b"x").unwrap();
        cinfer_signing::verify_detached(b"x", sig.as_bytes(), &public).unwrap();
        assert!(
            sign("not a key", b"x")
                .unwrap_err()
                .to_string()
                .contains("PKCS#8")
        );
    }
}
