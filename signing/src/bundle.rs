//! The parts of a Sigstore bundle and trusted root that this crate reads, as plain serde types
//! for the protobuf-specs JSON mapping (`dev.sigstore.bundle.v1.Bundle`,
//! `dev.sigstore.trustroot.v1.TrustedRoot`), read by the protobuf JSON rules:
//! - a field by its lowerCamelCase JSON name or its proto (snake_case) name; a missing field or
//!   `null` is the field's default (empty bytes, string or list, 0, no message);
//! - `bytes` as base64, standard or URL-safe alphabet, padded or not;
//! - int64 as a JSON number or a decimal string;
//! - a `Timestamp` as an RFC 3339 string, kept here as Unix seconds;
//! - the members of a oneof side by side in their parent: a bundle with two is refused.
//!
//! Unknown fields are ignored, and so are the fields this crate does not read (the enums among
//! them: no check depends on one). Below the bundle's top level, a message may also be a JSON
//! array of its fields in order (serde's derive reads both): only another spelling, as every
//! value read is checked.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use serde::de::{Deserializer, Error, Visitor};
use x509_cert::der::DateTime;

use crate::SigningError;

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Bundle {
    #[serde(alias = "media_type", deserialize_with = "or_default")]
    pub(crate) media_type: String,
    #[serde(alias = "verification_material")]
    pub(crate) verification_material: Option<VerificationMaterial>,
    /// oneof `content`: `message_signature` | `dsse_envelope`.
    #[serde(alias = "message_signature")]
    pub(crate) message_signature: Option<MessageSignature>,
    #[serde(alias = "dsse_envelope")]
    pub(crate) dsse_envelope: Option<Unread>,
}

impl Bundle {
    /// Parses a bundle, refusing one with two members of a oneof.
    pub(crate) fn from_json(json: &[u8]) -> Result<Self, SigningError> {
        // (serde's derive would also read a JSON array of the fields in order.)
        if !json.trim_ascii_start().starts_with(b"{") {
            return Err(SigningError::MalformedBundle(
                "not a Sigstore bundle: not a JSON object".to_owned(),
            ));
        }
        let bundle: Self = serde_json::from_slice(json)
            .map_err(|e| SigningError::MalformedBundle(format!("not a Sigstore bundle: {e}")))?;
        let oneof = |members: &[bool], names: &str| match members.iter().filter(|&&m| m).count() {
            0 | 1 => Ok(()),
            _ => Err(SigningError::MalformedBundle(format!(
                "more than one of {names}"
            ))),
        };
        let content = [
            bundle.message_signature.is_some(),
            bundle.dsse_envelope.is_some(),
        ];
        oneof(&content, "messageSignature, dsseEnvelope")?;
        if let Some(m) = &bundle.verification_material {
            let content = [
                m.certificate.is_some(),
                m.x509_certificate_chain.is_some(),
                m.public_key.is_some(),
            ];
            oneof(&content, "certificate, x509CertificateChain, publicKey")?;
        }
        Ok(bundle)
    }
}

/// A message this crate does not read, only whether it is there.
#[derive(Deserialize)]
pub(crate) struct Unread {}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct VerificationMaterial {
    /// oneof `content`: `public_key` | `x509_certificate_chain` | `certificate`.
    #[serde(alias = "public_key")]
    pub(crate) public_key: Option<Unread>,
    #[serde(alias = "x509_certificate_chain")]
    pub(crate) x509_certificate_chain: Option<X509CertificateChain>,
    pub(crate) certificate: Option<X509Certificate>,
    #[serde(alias = "tlog_entries", deserialize_with = "or_default")]
    pub(crate) tlog_entries: Vec<TransparencyLogEntry>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct X509Certificate {
    #[serde(alias = "raw_bytes", deserialize_with = "bytes")]
    pub(crate) raw_bytes: Vec<u8>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(crate) struct X509CertificateChain {
    #[serde(deserialize_with = "or_default")]
    pub(crate) certificates: Vec<X509Certificate>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct MessageSignature {
    #[serde(alias = "message_digest")]
    pub(crate) message_digest: Option<HashOutput>,
    #[serde(deserialize_with = "bytes")]
    pub(crate) signature: Vec<u8>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(crate) struct HashOutput {
    #[serde(deserialize_with = "bytes")]
    pub(crate) digest: Vec<u8>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct TransparencyLogEntry {
    #[serde(alias = "log_index", deserialize_with = "int64")]
    pub(crate) log_index: i64,
    #[serde(alias = "log_id")]
    pub(crate) log_id: Option<LogId>,
    #[serde(alias = "integrated_time", deserialize_with = "int64")]
    pub(crate) integrated_time: i64,
    #[serde(alias = "inclusion_promise")]
    pub(crate) inclusion_promise: Option<InclusionPromise>,
    #[serde(alias = "inclusion_proof")]
    pub(crate) inclusion_proof: Option<InclusionProof>,
    #[serde(alias = "canonicalized_body", deserialize_with = "bytes")]
    pub(crate) canonicalized_body: Vec<u8>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct LogId {
    #[serde(alias = "key_id", deserialize_with = "bytes")]
    pub(crate) key_id: Vec<u8>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct InclusionPromise {
    #[serde(alias = "signed_entry_timestamp", deserialize_with = "bytes")]
    pub(crate) signed_entry_timestamp: Vec<u8>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct InclusionProof {
    #[serde(alias = "log_index", deserialize_with = "int64")]
    pub(crate) log_index: i64,
    #[serde(alias = "root_hash", deserialize_with = "bytes")]
    pub(crate) root_hash: Vec<u8>,
    #[serde(alias = "tree_size", deserialize_with = "int64")]
    pub(crate) tree_size: i64,
    #[serde(deserialize_with = "bytes_list")]
    pub(crate) hashes: Vec<Vec<u8>>,
    pub(crate) checkpoint: Option<Checkpoint>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(crate) struct Checkpoint {
    #[serde(deserialize_with = "or_default")]
    pub(crate) envelope: String,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct TrustedRoot {
    #[serde(alias = "media_type", deserialize_with = "or_default")]
    pub(crate) media_type: String,
    #[serde(deserialize_with = "or_default")]
    pub(crate) tlogs: Vec<TransparencyLogInstance>,
    #[serde(alias = "certificate_authorities", deserialize_with = "or_default")]
    pub(crate) certificate_authorities: Vec<CertificateAuthority>,
    #[serde(deserialize_with = "or_default")]
    pub(crate) ctlogs: Vec<TransparencyLogInstance>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct CertificateAuthority {
    #[serde(alias = "cert_chain")]
    pub(crate) cert_chain: Option<X509CertificateChain>,
    #[serde(alias = "valid_for")]
    pub(crate) valid_for: Option<TimeRange>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct TransparencyLogInstance {
    #[serde(alias = "base_url", deserialize_with = "or_default")]
    pub(crate) base_url: String,
    #[serde(alias = "public_key")]
    pub(crate) public_key: Option<PublicKey>,
    #[serde(alias = "log_id")]
    pub(crate) log_id: Option<LogId>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct PublicKey {
    /// `optional bytes`: absent and empty differ.
    #[serde(alias = "raw_bytes", deserialize_with = "optional_bytes")]
    pub(crate) raw_bytes: Option<Vec<u8>>,
    #[serde(alias = "valid_for")]
    pub(crate) valid_for: Option<TimeRange>,
}

/// Unix seconds; `None` = open.
#[derive(Default, Deserialize)]
#[serde(default)]
pub(crate) struct TimeRange {
    #[serde(deserialize_with = "timestamp")]
    pub(crate) start: Option<i64>,
    #[serde(deserialize_with = "timestamp")]
    pub(crate) end: Option<i64>,
}

/// A field whose `null` is its default.
fn or_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A `bytes` value: base64, standard or URL-safe alphabet, padded or not (trailing bits
/// allowed, as protobuf parsers do).
struct Base64(Vec<u8>);

impl<'de> Deserialize<'de> for Base64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const CONFIG: GeneralPurposeConfig = GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent);
        const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, CONFIG);
        const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, CONFIG);
        let s = String::deserialize(d)?;
        let decoded = STANDARD.decode(&s).or_else(|_| URL_SAFE.decode(&s));
        decoded
            .map(Base64)
            .map_err(|e| D::Error::custom(format!("invalid base64: {e}")))
    }
}

fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    Ok(optional_bytes(d)?.unwrap_or_default())
}

fn optional_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    Ok(Option::<Base64>::deserialize(d)?.map(|b| b.0))
}

fn bytes_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
    let list: Vec<Base64> = or_default(d)?;
    Ok(list.into_iter().map(|b| b.0).collect())
}

/// An int64: a JSON number (integral, exponent notation allowed) or a decimal string.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct Int64;
    impl Visitor<'_> for Int64 {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a 64-bit integer or decimal string")
        }
        fn visit_unit<E: Error>(self) -> Result<i64, E> {
            Ok(0)
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(E::custom)
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<i64, E> {
            const LIMIT: f64 = 9_223_372_036_854_775_808.0; // 2^63
            if v.fract() == 0.0 && (-LIMIT..LIMIT).contains(&v) {
                Ok(v as i64)
            } else {
                Err(E::custom(format!("not a 64-bit integer: {v}")))
            }
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<i64, E> {
            v.parse().map_err(E::custom)
        }
    }
    d.deserialize_any(Int64)
}

fn timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| {
            rfc3339_seconds(&s)
                .ok_or_else(|| D::Error::custom(format!("not an RFC 3339 timestamp: {s:?}")))
        })
        .transpose()
}

/// Unix seconds of a time as protobuf JSON writes a `Timestamp`:
/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)`. The fraction is dropped (a time is
/// compared in whole seconds), a leap second `:60` is read as `:59` (as protobuf parsers do),
/// and years before 1970 are refused (der's `DateTime`, which checks the calendar, has none).
fn rfc3339_seconds(s: &str) -> Option<i64> {
    let unix = |utc: String| -> Option<i64> {
        i64::try_from(utc.parse::<DateTime>().ok()?.unix_duration().as_secs()).ok()
    };
    let (time, rest) = s.split_at_checked(19)?;
    let digit = |c: char| c.is_ascii_digit();
    let rest = match rest.strip_prefix('.') {
        Some(fraction) => fraction.strip_prefix(digit)?.trim_start_matches(digit),
        None => rest,
    };
    // The offset, read as a time of day (which checks its form and ranges).
    let offset = match rest.split_at_checked(1) {
        Some(("Z", "")) => 0,
        Some(("+", hh_mm)) => unix(format!("1970-01-01T{hh_mm}:00Z"))?,
        Some(("-", hh_mm)) => -unix(format!("1970-01-01T{hh_mm}:00Z"))?,
        _ => return None,
    };
    let utc = match time.strip_suffix(":60") {
        Some(minute) => format!("{minute}:59Z"),
        None => format!("{time}Z"),
    };
    unix(utc)?.checked_sub(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> Result<TransparencyLogEntry, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn int64_is_a_number_or_a_decimal_string() {
        for (json, index) in [
            (r#""12""#, 12),
            ("12", 12),
            (r#""-1""#, -1),
            ("1e3", 1000),
            ("5.0", 5),
            ("null", 0),
            (r#""9223372036854775807""#, i64::MAX),
        ] {
            let e = entry(&format!(r#"{{"logIndex": {json}}}"#)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(e.log_index, index, "{json}");
        }
        let e = entry(r#"{"integrated_time": "7", "inclusionProof": {"treeSize": 9}}"#);
        let e = e.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (e.integrated_time, e.inclusion_proof.map(|p| p.tree_size)),
            (7, Some(9))
        );
        for json in [
            "true",
            "5.5",
            r#""1e3""#,
            r#"" 12""#,
            r#""12.0""#,
            r#""""#,
            "9223372036854775808",
            "9.3e18",
            "{}",
            "[1]",
        ] {
            assert!(
                entry(&format!(r#"{{"logIndex": {json}}}"#)).is_err(),
                "{json}"
            );
        }
    }

    #[test]
    fn bytes_are_base64_in_either_alphabet_padded_or_not() {
        for b64 in ["+/8=", "+/8", "-_8=", "-_8"] {
            let e = entry(&format!(r#"{{"canonicalizedBody": "{b64}"}}"#));
            assert_eq!(
                e.map(|e| e.canonicalized_body).ok(),
                Some(vec![0xfb, 0xff]),
                "{b64}"
            );
        }
        let e =
            entry(r#"{"canonicalizedBody": null, "inclusionProof": {"hashes": ["AA", "AQ=="]}}"#);
        let e = e.unwrap_or_else(|e| panic!("{e}"));
        assert!(e.canonicalized_body.is_empty());
        assert_eq!(
            e.inclusion_proof.map(|p| p.hashes),
            Some(vec![vec![0], vec![1]])
        );
        for json in [r#""+_8=""#, r#""A""#, r#"" AA""#, r#""AA=A""#, "5", "[0]"] {
            assert!(
                entry(&format!(r#"{{"canonicalizedBody": {json}}}"#)).is_err(),
                "{json}"
            );
        }
        assert!(entry(r#"{"inclusionProof": {"hashes": ["AA", null]}}"#).is_err());
    }

    #[test]
    fn optional_bytes_keep_absent_apart_from_empty() {
        let key = |json: &str| {
            serde_json::from_str::<PublicKey>(json)
                .map(|k| k.raw_bytes)
                .ok()
        };
        assert_eq!(key("{}"), Some(None));
        assert_eq!(key(r#"{"rawBytes": null}"#), Some(None));
        assert_eq!(key(r#"{"rawBytes": ""}"#), Some(Some(vec![])));
        assert_eq!(key(r#"{"raw_bytes": "AQ"}"#), Some(Some(vec![1])));
    }

    #[test]
    fn two_members_of_a_oneof_are_refused() {
        let refused = |json: &str| {
            matches!(
                Bundle::from_json(json.as_bytes()),
                Err(SigningError::MalformedBundle(why)) if why.starts_with("more than one of")
            )
        };
        let cert = r#""certificate": {"rawBytes": "AA"}"#;
        assert!(refused(r#"{"messageSignature": {}, "dsseEnvelope": {}}"#));
        assert!(refused(&format!(
            r#"{{"verificationMaterial": {{{cert}, "publicKey": {{}}}}}}"#
        )));
        assert!(refused(&format!(
            r#"{{"verificationMaterial": {{{cert}, "x509CertificateChain": {{}}}}}}"#
        )));
        // A member set to null is not there.
        let one = format!(r#"{{"verificationMaterial": {{{cert}, "publicKey": null}}}}"#);
        let material = Bundle::from_json(one.as_bytes()).map(|b| b.verification_material);
        assert!(material.is_ok_and(|m| m.is_some_and(|m| m.certificate.is_some())));
        assert!(Bundle::from_json(br#"{"messageSignature": {}, "dsseEnvelope": null}"#).is_ok());
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_ones_are_defaults() {
        let json = br#"{"mediaType": "m", "extra": [1], "verificationMaterial":
            {"tlogEntries": [{"kindVersion": {"kind": "k", "new": 1}, "logIndex": 3}],
             "timestampVerificationData": {}},
            "messageSignature": {"messageDigest": {"algorithm": "SHA9_999", "digest": "AQ"}}}"#;
        let b = Bundle::from_json(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.media_type, "m");
        let m = b.message_signature.unwrap_or_default();
        assert!(m.signature.is_empty());
        assert_eq!(m.message_digest.map(|d| d.digest), Some(vec![1]));
        let entries = b.verification_material.unwrap_or_default().tlog_entries;
        assert_eq!(entries.iter().map(|e| e.log_index).collect::<Vec<_>>(), [3]);

        let b = Bundle::from_json(br#"{"media_type": null, "verification_material": {}}"#);
        let b = b.unwrap_or_else(|e| panic!("{e}"));
        assert!(b.media_type.is_empty() && b.message_signature.is_none());
        assert!(
            b.verification_material
                .is_some_and(|m| m.tlog_entries.is_empty())
        );
        for bad in [
            &b"[]"[..],
            b"{",
            br#"{"mediaType": 1}"#,
            br#"{"messageSignature": 1}"#,
        ] {
            assert!(Bundle::from_json(bad).is_err());
        }
    }

    #[test]
    fn rfc3339_timestamps() {
        for (s, t) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2021-03-07T03:20:29Z", 1_615_087_229),
            ("2021-03-07T03:20:29.000Z", 1_615_087_229),
            ("2022-12-31T23:59:59.999999999999Z", 1_672_531_199),
            ("2021-03-07T03:20:29+01:00", 1_615_083_629),
            ("2021-03-07T03:20:29-01:30", 1_615_092_629),
            ("2021-03-07T03:20:29.5+23:59", 1_615_000_889),
            ("1970-01-01T00:00:00+01:00", -3600),
            ("2000-02-29T00:00:00Z", 951_782_400),
            ("2020-02-29T12:00:00Z", 1_582_977_600),
            ("2016-12-31T23:59:60Z", 1_483_228_799),
            ("9999-12-31T23:59:59Z", 253_402_300_799),
        ] {
            assert_eq!(rfc3339_seconds(s), Some(t), "{s}");
        }
        for s in [
            "",
            "2021-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2021-04-31T00:00:00Z",
            "2021-00-10T00:00:00Z",
            "2021-13-10T00:00:00Z",
            "2021-01-00T00:00:00Z",
            "2021-01-01T24:00:00Z",
            "2021-01-01T23:60:00Z",
            "2021-01-01T23:59:61Z",
            "2021-01-01T00:00:00",
            "2021-01-01T00:00:00z",
            "2021-01-01t00:00:00Z",
            "2021-01-01 00:00:00Z",
            "2021-01-01",
            "2021-01-01T00:00Z",
            "2021-1-01T00:00:00Z",
            "+2021-01-01T00:00:00Z",
            "2021-01-01T00:00:00.Z",
            "2021-01-01T00:00:00,5Z",
            "2021-01-01T00:00:00Z ",
            "2021-01-01T00:00:00+24:00",
            "2021-01-01T00:00:00+00:60",
            "2021-01-01T00:00:00+0100",
            "2021-01-01T00:00:00+01",
            "2021-01-01T00:00:00+1:00",
            "2021-01-01T00:00:00++1:00",
            "2021-01-01T00:00:00+01:00Z",
            "2021-01-01T00:00:00ZZ",
            "２021-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(rfc3339_seconds(s), None, "{s}");
        }
        let range = |json: &str| serde_json::from_str::<TimeRange>(json).map(|r| (r.start, r.end));
        assert_eq!(
            range(r#"{"start": "1970-01-01T00:00:01Z", "end": null}"#).ok(),
            Some((Some(1), None))
        );
        assert!(range(r#"{"start": 1}"#).is_err() && range(r#"{"end": "x"}"#).is_err());
    }
}
