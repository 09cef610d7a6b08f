//! The signing certificate: leaf profile, chain to a trusted CA at the signing time (webpki),
//! and the embedded SCT under a trusted CT log key.
//!
//! What is whose:
//! - **Chain building and path validation** are rustls-webpki's (`EndEntityCert::
//!   verify_for_usage`: signatures, names, basic constraints, key usage, critical extensions,
//!   the `codeSigning` extended key usage, the leaf's dates at the signing time). The anchors it
//!   is given are only the trust-root CA certificates valid at the signing time with every
//!   certificate above them ([`TrustRoot::anchors_at`]): webpki never checks an anchor's dates.
//! - **The leaf profile** (X.509 v3, not a CA, `digitalSignature` key usage, `codeSigning`
//!   extended key usage) and **SCT verification** are written here, as sigstore-rs,
//!   sigstore-python and sigstore-js each write them: no crate verifies an embedded (precert)
//!   SCT. The SCT list is parsed by `x509-cert`'s `sct` module; the signed structure
//!   (RFC 6962 §3.2, `precert_entry`: the leaf's TBS without the SCT extension, under the SHA-256
//!   of the issuer's key) is assembled here, a dozen lines.

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use sha2::{Digest as _, Sha256};
use x509_cert::Certificate;
use x509_cert::der::asn1::AnyRef;
use x509_cert::der::{Decode as _, Encode as _, Tag, TagNumber, Tagged as _};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::sct::{HashAlgorithm, SignatureAlgorithm, Version};
use x509_cert::ext::pkix::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SignedCertificateTimestampList,
};
use x509_cert::spki::ObjectIdentifier;

use crate::crypto::{CHAIN_ALGORITHMS, Hash};
use crate::trust::TrustRoot;
use crate::{CertValidity, ChainCert, SigningError};

/// `id-kp-codeSigning`.
static CODE_SIGNING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.3");
/// The embedded SCT list extension (RFC 6962).
const SCT_LIST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.11129.2.4.2");

/// Unix seconds of an X.509 time.
pub(crate) fn unix(t: x509_cert::time::Time) -> i64 {
    i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
}

/// The leaf must look like a Fulcio code-signing certificate: v3, not a CA, with the
/// `digitalSignature` key usage and the `codeSigning` extended key usage.
pub(crate) fn check_leaf_profile(leaf: &Certificate) -> Result<(), SigningError> {
    let tbs = leaf.tbs_certificate();
    let refuse = |why: &str| SigningError::CertificateRefused(format!("signing certificate {why}"));
    if tbs.version() != x509_cert::Version::V3 {
        return Err(refuse("is not X.509 v3"));
    }
    let bad_ext = |e| refuse(&format!("has a malformed extension: {e}"));
    if let Some((_, bc)) = tbs.get_extension::<BasicConstraints>().map_err(bad_ext)?
        && bc.ca
    {
        return Err(refuse("is a CA certificate"));
    }
    let ku = tbs.get_extension::<KeyUsage>().map_err(bad_ext)?;
    if !ku.is_some_and(|(_, ku)| ku.digital_signature()) {
        return Err(refuse("lacks the digitalSignature key usage"));
    }
    let eku = tbs.get_extension::<ExtendedKeyUsage>().map_err(bad_ext)?;
    if !eku.is_some_and(|(_, eku)| eku.0.contains(&CODE_SIGNING)) {
        return Err(refuse("lacks the codeSigning extended key usage"));
    }
    Ok(())
}

/// Verifies the leaf's chain to a CA of `trust` at signing time `t` and returns the DER
/// SubjectPublicKeyInfo of the CA certificate that issued it.
pub(crate) fn verify_chain(
    leaf_der: &[u8],
    leaf: &Certificate,
    trust: &TrustRoot,
    t: i64,
) -> Result<Vec<u8>, SigningError> {
    let anchors_der = trust.anchors_at(t);
    let anchors: Vec<TrustAnchor<'_>> = anchors_der
        .iter()
        .filter_map(|der| webpki::anchor_from_trusted_cert(der).ok())
        .collect();
    let cert = CertificateDer::from(leaf_der);
    let ee = webpki::EndEntityCert::try_from(&cert)
        .map_err(|e| SigningError::MalformedBundle(format!("certificate: {e}")))?;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(t).unwrap_or(0),
    ));
    let path = ee
        .verify_for_usage(
            CHAIN_ALGORITHMS,
            &anchors,
            &[],
            time,
            webpki::KeyUsage::required(CODE_SIGNING.as_bytes()),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
                leaf_not_valid_at(leaf, t)
            }
            // No anchor issued it (no trusted CA of that name, or one of that name whose key did
            // not make the signature): name a CA certificate that was out of its dates, if the
            // leaf names one as its issuer; else the CA is unknown.
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => trust
                .ca_not_valid_at(leaf, t)
                .unwrap_or(SigningError::UntrustedCa),
            other => SigningError::CertificateRefused(format!("signing certificate: {other}")),
        })?;
    // The issuer is the anchor (no intermediates are offered): its SPKI, re-wrapped in the
    // SEQUENCE webpki strips.
    AnyRef::new(Tag::Sequence, &path.anchor().subject_public_key_info)
        .and_then(|a| a.to_der())
        .map_err(|e| SigningError::MalformedTrustRoot(format!("CA key: {e}")))
}

/// The leaf's validity at `t` as a typed refusal.
pub(crate) fn leaf_not_valid_at(leaf: &Certificate, t: i64) -> SigningError {
    let validity = leaf.tbs_certificate().validity();
    let (not_before, not_after) = (unix(validity.not_before), unix(validity.not_after));
    SigningError::CertificateNotValidAtSigningTime {
        certificate: ChainCert::Signing,
        kind: if t < not_before {
            CertValidity::NotYetValid
        } else {
            CertValidity::Expired
        },
        signing_time: t,
        not_before,
        not_after,
    }
}

/// At least one embedded SCT must verify under a CT log of `trust` valid at `t`.
pub(crate) fn verify_sct(
    leaf_der: &[u8],
    leaf: &Certificate,
    issuer_spki: &[u8],
    trust: &TrustRoot,
    t: i64,
) -> Result<(), SigningError> {
    let list = match leaf
        .tbs_certificate()
        .get_extension::<SignedCertificateTimestampList>()
    {
        Ok(Some((_, list))) => list,
        _ => return Err(SigningError::SctInvalid),
    };
    let scts = list
        .parse_timestamps()
        .map_err(|_| SigningError::SctInvalid)?;
    let tbs = precert_tbs_der(leaf_der).map_err(|_| SigningError::SctInvalid)?;
    let tbs_len = u32::try_from(tbs.len())
        .ok()
        .filter(|n| *n < 1 << 24)
        .ok_or(SigningError::SctInvalid)?;
    let issuer_key_hash: [u8; 32] = Sha256::digest(issuer_spki).into();
    for sct in scts.iter().filter_map(|s| s.parse_timestamp().ok()) {
        let Some(log) = trust.ctlog(&sct.log_id.key_id, t) else {
            continue;
        };
        let hash = match (
            sct.signature.algorithm.hash,
            sct.signature.algorithm.signature,
        ) {
            (HashAlgorithm::Sha256, SignatureAlgorithm::Ecdsa) => Hash::Sha256,
            (HashAlgorithm::Sha384, SignatureAlgorithm::Ecdsa) => Hash::Sha384,
            _ => continue,
        };
        let Version::V1 = sct.version;
        let extensions = sct.extensions.as_slice();
        let Ok(ext_len) = u16::try_from(extensions.len()) else {
            continue;
        };
        // RFC 6962 §3.2 digitally-signed struct, precert_entry.
        let mut signed = Vec::with_capacity(tbs.len() + 64);
        signed.push(0); // version v1
        signed.push(0); // signature_type certificate_timestamp
        signed.extend_from_slice(&sct.timestamp.to_be_bytes());
        signed.extend_from_slice(&1u16.to_be_bytes()); // entry_type precert_entry
        signed.extend_from_slice(&issuer_key_hash);
        signed.extend_from_slice(&tbs_len.to_be_bytes()[1..]);
        signed.extend_from_slice(&tbs);
        signed.extend_from_slice(&ext_len.to_be_bytes());
        signed.extend_from_slice(extensions);
        if log.verify(hash, &signed, sct.signature.signature.as_slice()) {
            return Ok(());
        }
    }
    Err(SigningError::SctInvalid)
}

/// The leaf's TBSCertificate with the SCT list extension removed (what the CT log signed).
fn precert_tbs_der(leaf_der: &[u8]) -> x509_cert::der::Result<Vec<u8>> {
    const EXTENSIONS: Tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber(3),
    };
    let fields = Vec::<x509_cert::der::Any>::from_der(leaf_der)?;
    let tbs = fields.first().ok_or_else(|| Tag::Sequence.value_error())?;
    let mut tbs_fields: Vec<x509_cert::der::Any> = tbs.decode_as()?;
    if let Some(exts) = tbs_fields.iter_mut().find(|f| f.tag() == EXTENSIONS) {
        let mut kept = Vec::new();
        for ext in Vec::<x509_cert::der::Any>::from_der(exts.value())? {
            if ext.decode_as::<Extension>()?.extn_id != SCT_LIST {
                kept.push(ext);
            }
        }
        *exts = x509_cert::der::Any::new(EXTENSIONS, kept.to_der()?)?;
    }
    tbs_fields.to_der()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Bundle;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../tests/sigstore/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The reference bundle's leaf, its signing time and the trust root.
    fn reference() -> (Vec<u8>, Certificate, i64, TrustRoot) {
        let bundle =
            Bundle::from_json(&fixture("artifact.sigstore.json")).unwrap_or_else(|e| panic!("{e}"));
        let material = bundle.verification_material.unwrap_or_default();
        let Some(c) = material.certificate else {
            panic!("reference bundle has no certificate");
        };
        let t = material.tlog_entries[0].integrated_time;
        let leaf = Certificate::from_der(&c.raw_bytes).unwrap_or_else(|e| panic!("{e}"));
        let trust =
            TrustRoot::from_json(&fixture("trusted_root.json")).unwrap_or_else(|e| panic!("{e}"));
        (c.raw_bytes, leaf, t, trust)
    }

    #[test]
    fn sct_verifies_only_over_the_right_issuer_and_time() {
        let (der, leaf, t, trust) = reference();
        cert_profile_and_chain_hold(&der, &leaf, t, &trust);
        let issuer = verify_chain(&der, &leaf, &trust, t).unwrap_or_else(|e| panic!("{e}"));
        verify_sct(&der, &leaf, &issuer, &trust, t).unwrap_or_else(|e| panic!("{e}"));
        // Another issuer key hash: the signed precert entry differs.
        let mut other = issuer.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        assert!(matches!(
            verify_sct(&der, &leaf, &other, &trust, t),
            Err(SigningError::SctInvalid)
        ));
        // The CT log's validFor starts 2025-01-01: an SCT checked at an earlier signing time
        // finds no valid log.
        assert!(matches!(
            verify_sct(&der, &leaf, &issuer, &trust, 1_700_000_000),
            Err(SigningError::SctInvalid)
        ));
    }

    fn cert_profile_and_chain_hold(der: &[u8], leaf: &Certificate, t: i64, trust: &TrustRoot) {
        check_leaf_profile(leaf).unwrap_or_else(|e| panic!("{e}"));
        // Signed at t, but checked an hour after the 10-minute certificate expired.
        match verify_chain(der, leaf, trust, t + 3600) {
            Err(SigningError::CertificateNotValidAtSigningTime {
                certificate: ChainCert::Signing,
                kind: CertValidity::Expired,
                ..
            }) => {}
            other => panic!("expected the leaf's expiry, got {other:?}"),
        }
    }

    #[test]
    fn precert_tbs_drops_only_the_sct_extension() {
        let (der, leaf, _, _) = reference();
        let tbs = precert_tbs_der(&der).unwrap_or_else(|e| panic!("{e}"));
        let full = leaf
            .tbs_certificate()
            .to_der()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(tbs.len() < full.len());
        let parsed = x509_cert::TbsCertificate::from_der(&tbs).unwrap_or_else(|e| panic!("{e}"));
        let ids = |t: &x509_cert::TbsCertificate| -> Vec<ObjectIdentifier> {
            t.extensions()
                .map(|e| e.iter().map(|x| x.extn_id).collect())
                .unwrap_or_default()
        };
        let mut expected = ids(leaf.tbs_certificate());
        expected.retain(|id| *id != SCT_LIST);
        assert_eq!(ids(&parsed), expected);
        assert_eq!(parsed.subject(), leaf.tbs_certificate().subject());
    }
}
