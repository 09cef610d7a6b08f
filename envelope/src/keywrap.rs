//! Key wrapping: one secret (a model data key, a request private key) sealed to
//! a loader's ephemeral [`RequestPublicKey`] with HPKE base mode, single shot,
//! in the envelope's suite: DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 /
//! AES-256-GCM.
//!
//! `info = "cinfer/key-release/v1" || context` binds what the secret is (e.g.
//! `kind || 0x00 || id`), and the associated data binds the release (the
//! keyserver nonce): a wrapped secret unwraps only under the same context and
//! AAD. Every failure to unwrap is the opaque
//! [`EnvelopeError::AuthenticationFailed`].
//!
//! [`wrap_key_psk`] is the same in HPKE PSK mode: the secret then unwraps only
//! with the private key *and* the pre-shared key (the keyserver uses the
//! secret a TPM credential carries, so only the loader whose TPM activated it
//! can unwrap).

use crate::{AesGcm256, EnvelopeError, HkdfSha256, Kem, RequestPrivateKey, RequestPublicKey};
use hpke::{Deserializable, OpModeR, OpModeS, PskBundle, Serializable};
use zeroize::Zeroizing;

const INFO_PREFIX: &[u8] = b"cinfer/key-release/v1";

/// A wrapped secret: the HPKE encapsulated key and the AEAD ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedSecret {
    /// Encapsulated key (uncompressed P-256 point, [`crate::ENC_LEN`] bytes).
    pub enc: Vec<u8>,
    /// The secret sealed with AES-256-GCM (secret length + [`crate::TAG_LEN`]).
    pub ciphertext: Vec<u8>,
}

fn info(context: &[u8]) -> Vec<u8> {
    [INFO_PREFIX, context].concat()
}

/// Wraps `secret` to `recipient`, binding `context` (into the HPKE info) and `aad`.
pub fn wrap_key(
    recipient: &RequestPublicKey,
    context: &[u8],
    aad: &[u8],
    secret: &[u8],
) -> Result<WrappedSecret, EnvelopeError> {
    seal(&OpModeS::Base, recipient, context, aad, secret)
}

/// [`wrap_key`] in HPKE PSK mode with `psk` (at least 32 bytes) named `psk_id`
/// (not empty).
pub fn wrap_key_psk(
    recipient: &RequestPublicKey,
    context: &[u8],
    aad: &[u8],
    secret: &[u8],
    psk: &[u8],
    psk_id: &[u8],
) -> Result<WrappedSecret, EnvelopeError> {
    let bundle = psk_bundle(psk, psk_id)?;
    seal(&OpModeS::Psk(bundle), recipient, context, aad, secret)
}

/// Unwraps a secret wrapped by [`wrap_key_psk`] with the same `psk` and
/// `psk_id`; any difference is [`EnvelopeError::AuthenticationFailed`].
pub fn unwrap_key_psk(
    sk: &RequestPrivateKey,
    context: &[u8],
    aad: &[u8],
    wrapped: &WrappedSecret,
    psk: &[u8],
    psk_id: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let bundle = psk_bundle(psk, psk_id)?;
    open(&OpModeR::Psk(bundle), sk, context, aad, wrapped)
}

fn psk_bundle<'a>(psk: &'a [u8], psk_id: &'a [u8]) -> Result<PskBundle<'a>, EnvelopeError> {
    // RFC 9180 §5.1.1: a PSK has at least 32 bytes of entropy.
    if psk.len() < 32 || psk_id.is_empty() {
        return Err(EnvelopeError::MalformedKey(
            "PSK shorter than 32 bytes or without an id",
        ));
    }
    PskBundle::new(psk, psk_id).map_err(|_| EnvelopeError::MalformedKey("PSK bundle"))
}

fn seal(
    mode: &OpModeS<'_, Kem>,
    recipient: &RequestPublicKey,
    context: &[u8],
    aad: &[u8],
    secret: &[u8],
) -> Result<WrappedSecret, EnvelopeError> {
    let (enc, ciphertext) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, Kem>(
        mode,
        &recipient.pk,
        &info(context),
        secret,
        aad,
    )
    .map_err(|_| EnvelopeError::MalformedKey("public key rejected by HPKE"))?;
    Ok(WrappedSecret {
        enc: enc.to_bytes().to_vec(),
        ciphertext,
    })
}

/// Unwraps a secret wrapped by [`wrap_key`] to `sk`'s public key under the same
/// `context` and `aad`. The secret is zeroized on drop.
pub fn unwrap_key(
    sk: &RequestPrivateKey,
    context: &[u8],
    aad: &[u8],
    wrapped: &WrappedSecret,
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    open(&OpModeR::Base, sk, context, aad, wrapped)
}

fn open(
    mode: &OpModeR<'_, Kem>,
    sk: &RequestPrivateKey,
    context: &[u8],
    aad: &[u8],
    wrapped: &WrappedSecret,
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&wrapped.enc)
        .map_err(|_| EnvelopeError::MalformedEncapsulatedKey)?;
    hpke::single_shot_open::<AesGcm256, HkdfSha256, Kem>(
        mode,
        &sk.sk,
        &enc,
        &info(context),
        &wrapped.ciphertext,
        aad,
    )
    .map(Zeroizing::new)
    .map_err(|_| EnvelopeError::AuthenticationFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [0x42; 32];

    fn wrapped(key: &RequestPrivateKey) -> WrappedSecret {
        wrap_key(key.public_key(), b"model\0m1", b"nonce", &SECRET).unwrap()
    }

    #[test]
    fn psk_mode_needs_the_psk_and_its_id() {
        let key = RequestPrivateKey::generate();
        let (psk, id) = ([5u8; 32], b"cinfer/test".as_slice());
        let w = wrap_key_psk(key.public_key(), b"c", b"a", &SECRET, &psk, id).unwrap();
        let got = unwrap_key_psk(&key, b"c", b"a", &w, &psk, id).unwrap();
        assert_eq!(got.as_slice(), SECRET);
        let fail = Err(EnvelopeError::AuthenticationFailed);
        assert_eq!(unwrap_key_psk(&key, b"c", b"a", &w, &[6; 32], id), fail);
        assert_eq!(unwrap_key_psk(&key, b"c", b"a", &w, &psk, b"other"), fail);
        assert_eq!(unwrap_key(&key, b"c", b"a", &w), fail, "base mode");
        let base = wrap_key(key.public_key(), b"c", b"a", &SECRET).unwrap();
        assert_eq!(unwrap_key_psk(&key, b"c", b"a", &base, &psk, id), fail);
        assert!(matches!(
            wrap_key_psk(key.public_key(), b"c", b"a", &SECRET, &[1; 16], id),
            Err(EnvelopeError::MalformedKey(_))
        ));
        assert!(matches!(
            wrap_key_psk(key.public_key(), b"c", b"a", &SECRET, &psk, b""),
            Err(EnvelopeError::MalformedKey(_))
        ));
    }

    #[test]
    fn round_trip() {
        let key = RequestPrivateKey::generate();
        let w = wrapped(&key);
        assert_eq!(w.enc.len(), crate::ENC_LEN);
        assert_eq!(w.ciphertext.len(), SECRET.len() + crate::TAG_LEN);
        let got = unwrap_key(&key, b"model\0m1", b"nonce", &w).unwrap();
        assert_eq!(got.as_slice(), SECRET);
        // Each wrapping is fresh.
        assert_ne!(wrapped(&key), w);
    }

    #[test]
    fn wrong_context_aad_key_or_tampering_fail() {
        let key = RequestPrivateKey::generate();
        let w = wrapped(&key);
        let fail = Err(EnvelopeError::AuthenticationFailed);
        assert_eq!(unwrap_key(&key, b"model\0m2", b"nonce", &w), fail);
        assert_eq!(unwrap_key(&key, b"request\0m1", b"nonce", &w), fail);
        assert_eq!(unwrap_key(&key, b"model\0m1", b"nonce2", &w), fail);
        assert_eq!(
            unwrap_key(&RequestPrivateKey::generate(), b"model\0m1", b"nonce", &w),
            fail
        );
        for i in 0..w.ciphertext.len() {
            let mut t = w.clone();
            t.ciphertext[i] ^= 1;
            assert_eq!(unwrap_key(&key, b"model\0m1", b"nonce", &t), fail);
        }
        let mut t = w.clone();
        t.ciphertext.pop();
        assert_eq!(unwrap_key(&key, b"model\0m1", b"nonce", &t), fail);
        // Another valid point as enc: decapsulates to another secret.
        let mut t = w.clone();
        t.enc = RequestPrivateKey::generate().public_key().to_bytes();
        assert_eq!(unwrap_key(&key, b"model\0m1", b"nonce", &t), fail);
        // Not a point at all.
        let mut t = w;
        t.enc[1] ^= 1;
        assert!(unwrap_key(&key, b"model\0m1", b"nonce", &t).is_err());
    }
}
