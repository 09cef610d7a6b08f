//! `TPM2_MakeCredential` in software (TPM 2.0 Part 1 §24, Part 3 §12.6), for
//! an RSA EK with the EK Credential Profile's template L-1 (name algorithm
//! SHA-256, AES-128-CFB):
//!
//! * `seed` = 32 random bytes (the size of the EK's name-algorithm digest),
//!   `encryptedSecret` = RSA-OAEP(SHA-256, label `"IDENTITY\0"`) of the seed
//!   to the EK;
//! * `symKey` = KDFa(SHA-256, seed, `"STORAGE"`, AK name, ∅, 128);
//!   `encIdentity` = AES-128-CFB(symKey, IV = 0) of `TPM2B_DIGEST(credential)`;
//! * `HMACkey` = KDFa(SHA-256, seed, `"INTEGRITY"`, ∅, ∅, 256);
//!   `outerHMAC` = HMAC-SHA256(HMACkey, encIdentity || AK name);
//! * `credentialBlob` = `TPM2B_DIGEST(outerHMAC) || encIdentity`.
//!
//! The TPM recomputes `outerHMAC` with the name of the object loaded at
//! `activateHandle`, so a credential made for another AK name (or altered)
//! fails with `TPM_RC_INTEGRITY`; only the EK's private key recovers the seed.
//!
//! No well-kept pure-Rust crate does this today: tss-esapi 7 only has the TPM
//! command (it needs a TPM and the C TSS), its unreleased 8.0 adds a software
//! version behind a feature but still links the C TSS, and other Rust
//! verifiers (rust-keylime) call OpenSSL. So it is written here (about 100
//! lines over RustCrypto) and cross-checked against `tpm2_makecredential` and
//! swtpm's `TPM2_ActivateCredential` in the tests.

use super::EndorsementError;
use super::tpm_public::{ALG_AES, ALG_CFB, ALG_NULL, ALG_RSA, ALG_SHA256, TpmPublic, Unique, attr};
use aes::cipher::{BlockCipherEncrypt as _, KeyInit as _};
use hmac::Mac as _;
use zeroize::Zeroizing;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Largest credential a `TPM2B_DIGEST` of a SHA-256-only TPM holds.
pub const MAX_CREDENTIAL_LEN: usize = 32;

/// Why a credential could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The EK is not one this code makes credentials for.
    #[error("unsupported EK: {0}")]
    UnsupportedEk(&'static str),
    /// The credential is empty or longer than [`MAX_CREDENTIAL_LEN`].
    #[error("credential of {0} bytes (1 to 32)")]
    BadLength(usize),
    /// The object name is not a SHA-256 name.
    #[error("object name is not nameAlg SHA-256 || digest")]
    BadName,
    /// The RSA encryption failed (no randomness, or a malformed modulus).
    #[error("encrypting the seed to the EK failed")]
    Encrypt,
}

impl From<CredentialError> for EndorsementError {
    fn from(e: CredentialError) -> Self {
        match e {
            CredentialError::UnsupportedEk(what) => EndorsementError::UnsupportedEk(what),
            _ => EndorsementError::UnsupportedEk("credential cannot be made for this EK"),
        }
    }
}

/// The two outputs of `TPM2_MakeCredential`, as the contents of the TPM2B
/// structures (no size prefix), as `TPM2_ActivateCredential` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeCredential {
    /// `TPM2B_ID_OBJECT` contents: `TPM2B_DIGEST(outerHMAC) || encIdentity`.
    pub id_object: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET` contents: the OAEP-encrypted seed.
    pub encrypted_secret: Vec<u8>,
}

/// Checks that `ek` is an EK this code makes credentials for: an RSA
/// restricted decryption key, name algorithm SHA-256, AES-128-CFB, no scheme.
pub fn check_ek(ek: &TpmPublic) -> Result<(), CredentialError> {
    if ek.object_type != ALG_RSA {
        return Err(CredentialError::UnsupportedEk("only RSA EKs are supported"));
    }
    if ek.name_alg != ALG_SHA256 {
        return Err(CredentialError::UnsupportedEk(
            "name algorithm is not SHA-256",
        ));
    }
    if ek.symmetric.algorithm != ALG_AES
        || ek.symmetric.key_bits != 128
        || ek.symmetric.mode != ALG_CFB
    {
        return Err(CredentialError::UnsupportedEk(
            "symmetric scheme is not AES-128-CFB",
        ));
    }
    if ek.scheme != ALG_NULL {
        return Err(CredentialError::UnsupportedEk(
            "a storage key has no scheme",
        ));
    }
    let a = ek.object_attributes;
    if a & attr::RESTRICTED == 0 || a & attr::DECRYPT == 0 || a & attr::SIGN != 0 {
        return Err(CredentialError::UnsupportedEk(
            "not a restricted decryption key",
        ));
    }
    if a & attr::FIXED_TPM == 0 {
        return Err(CredentialError::UnsupportedEk("not fixedTPM"));
    }
    if ek.rsa_key_bits < 2048 {
        return Err(CredentialError::UnsupportedEk(
            "RSA key shorter than 2048 bits",
        ));
    }
    Ok(())
}

/// Makes a credential carrying `credential` for the object named `name`
/// (`0x000b || SHA-256 digest`), encrypted to `ek`.
pub fn make_credential(
    ek: &TpmPublic,
    name: &[u8],
    credential: &[u8],
) -> Result<MadeCredential, CredentialError> {
    check_ek(ek)?;
    if credential.is_empty() || credential.len() > MAX_CREDENTIAL_LEN {
        return Err(CredentialError::BadLength(credential.len()));
    }
    if name.len() != 34 || name[..2] != ALG_SHA256.to_be_bytes() {
        return Err(CredentialError::BadName);
    }
    let Unique::Rsa { modulus } = &ek.unique else {
        return Err(CredentialError::UnsupportedEk("only RSA EKs are supported"));
    };
    let exponent = ek
        .rsa_exponent()
        .ok_or(CredentialError::UnsupportedEk("only RSA EKs are supported"))?;
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(modulus),
        rsa::BigUint::from(exponent),
    )
    .map_err(|_| CredentialError::Encrypt)?;

    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut()).map_err(|_| CredentialError::Encrypt)?;
    let padding = rsa::Oaep::new_with_label::<rsa::sha2::Sha256, _>("IDENTITY\0");
    let encrypted_secret = key
        .encrypt(&mut rsa::rand_core::OsRng, padding, seed.as_ref())
        .map_err(|_| CredentialError::Encrypt)?;
    let id_object = credential_blob(seed.as_ref(), name, credential);
    Ok(MadeCredential {
        id_object,
        encrypted_secret,
    })
}

/// The `credentialBlob` for a given seed (the deterministic part of
/// MakeCredential).
fn credential_blob(seed: &[u8], name: &[u8], credential: &[u8]) -> Vec<u8> {
    let sym_key = Zeroizing::new(kdfa_sha256(seed, b"STORAGE", name, &[], 128));
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    // `credential.len()` is at most MAX_CREDENTIAL_LEN.
    enc_identity.extend_from_slice(&(credential.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(credential);
    aes128_cfb_encrypt(&sym_key, [0; 16], &mut enc_identity);

    let hmac_key = Zeroizing::new(kdfa_sha256(seed, b"INTEGRITY", &[], &[], 256));
    let mut mac = HmacSha256::new_from_slice(&hmac_key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(&enc_identity);
    mac.update(name);
    let outer_hmac = mac.finalize().into_bytes();

    let mut blob = Vec::with_capacity(2 + outer_hmac.len() + enc_identity.len());
    blob.extend_from_slice(&(outer_hmac.len() as u16).to_be_bytes());
    blob.extend_from_slice(&outer_hmac);
    blob.extend_from_slice(&enc_identity);
    blob
}

/// KDFa (TPM 2.0 Part 1 §11.4.10.2, SP 800-108 counter mode) with
/// HMAC-SHA256: `HMAC(key, i || label || 0x00 || contextU || contextV || bits)`
/// for `i = 1, 2, …`, truncated to `bits` (a multiple of 8 here).
fn kdfa_sha256(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let len = (bits / 8) as usize;
    let mut out = Vec::with_capacity(len + 32);
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut mac = HmacSha256::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(&counter.to_be_bytes());
        mac.update(label);
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// AES-128 in CFB-128 mode with a zero IV, in place (the TPM's parameter and
/// credential encryption).
fn aes128_cfb_encrypt(key: &[u8], iv: [u8; 16], data: &mut [u8]) {
    let cipher = aes::Aes128::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("KDFa gave a 16-byte key"));
    let mut register = aes::Block::from(iv);
    for chunk in data.chunks_mut(16) {
        let mut keystream = register;
        cipher.encrypt_block(&mut keystream);
        for (b, k) in chunk.iter_mut().zip(keystream.iter()) {
            *b ^= k;
        }
        // The ciphertext feeds back (a final partial block is never reused).
        register[..chunk.len()].copy_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_matches_its_definition_across_blocks() {
        // Two HMAC blocks for 512 bits; the first 256 bits differ from a
        // 256-bit derivation because `bits` is part of every block's input.
        let long = kdfa_sha256(b"key", b"LABEL", b"u", b"v", 512);
        let short = kdfa_sha256(b"key", b"LABEL", b"u", b"v", 256);
        assert_eq!(long.len(), 64);
        assert_ne!(long[..32], short[..]);
        let mut mac = HmacSha256::new_from_slice(b"key").unwrap();
        mac.update(&2u32.to_be_bytes());
        mac.update(b"LABEL\0uv");
        mac.update(&512u32.to_be_bytes());
        assert_eq!(long[32..], mac.finalize().into_bytes()[..]);
    }

    #[test]
    fn cfb_matches_nist_sp800_38a_f_3_13() {
        // SP 800-38A F.3.13, CFB128-AES128.Encrypt (with its IV; the TPM uses
        // a zero IV), including a final partial block.
        let key = hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap();
        let iv: [u8; 16] = hex::decode("000102030405060708090a0b0c0d0e0f")
            .unwrap()
            .try_into()
            .unwrap();
        let mut data = hex::decode(
            "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411",
        )
        .unwrap();
        aes128_cfb_encrypt(&key, iv, &mut data);
        assert_eq!(
            hex::encode(data),
            "3b3fd92eb72dad20333449f8e83cfb4ac8a64537a0b3a93fcde3cdad9f1ce58b26751f67a3cbb140"
        );
    }

    #[test]
    fn blob_layout_and_name_dependence() {
        let name = [&ALG_SHA256.to_be_bytes()[..], &[7; 32]].concat();
        let other = [&ALG_SHA256.to_be_bytes()[..], &[8; 32]].concat();
        let blob = credential_blob(&[1; 32], &name, &[9; 32]);
        assert_eq!(blob.len(), 2 + 32 + 2 + 32);
        assert_eq!(blob[..2], [0, 32]);
        let blob2 = credential_blob(&[1; 32], &other, &[9; 32]);
        assert_ne!(blob, blob2, "the name keys the encryption and the HMAC");
    }
}
