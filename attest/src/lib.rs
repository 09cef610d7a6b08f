//! Attestation evidence, shared by the trusted loader (which produces it with a
//! TPM) and the keyserver (which verifies it in pure Rust, without a TPM).
//!
//! The loader measures what it is about to trust into one PCR (23 by default):
//! each [`Event`] extends `pcr := SHA-256(pcr || event.digest)` starting from
//! zeros (the loader resets the PCR first), and is kept in the event log. It then
//! makes an ephemeral HPKE key pair and asks the TPM for a quote over the
//! configured PCRs whose `extraData` is [`binding`]`(nonce, public key)`. The
//! keyserver checks that binding, the quote signature, the PCR digest, the event
//! log replay and the reference values, then wraps keys to that public key: only
//! the process that holds the private key (the measured loader) can unwrap them.
//!
//! Wire form: [`Evidence`] as JSON (byte strings in lowercase hex), the same bytes
//! over HTTP to the keyserver and over the loader's framed channel.
//!
//! Verification ([`verify::verify`]) is pure Rust and reads no clock; the
//! keyserver's answers ([`release::KeyRelease`], [`release::SignedRequestKey`])
//! are defined here too, so the loader and clients parse what the keyserver
//! writes.
//!
//! This crate trusts nothing it parses: every byte of evidence is checked
//! against the reference values it is given.
#![forbid(unsafe_code)]

pub mod release;
pub mod shares;
#[cfg(feature = "tdx")]
pub mod tdx;
#[cfg(feature = "tdx-test")]
pub mod tdx_test;
#[cfg(feature = "verify")]
pub mod verify;

#[cfg(any(test, feature = "test-fixtures"))]
pub mod fixture;

pub use release::{
    CREDENTIAL_PSK_ID, Credential, KEY_RELEASE_VERSION, KeyRelease, RECEIPT_KEY_ID, RECEIPT_TYPE,
    Receipt, ReceiptClassifier, ReleasedKey, ReleasedKeyKind, ReplyDigest, RequestKeyStatement,
    SignedReceipt, SignedRequestKey, StatementError, credential_binding, credential_psk,
    release_context, reply_digest, share_context,
};
#[cfg(feature = "verify")]
pub use verify::{
    AkTrust, EvidenceError, RESETTABLE_PCRS, ReferenceError, ReferenceValues, Verified,
    is_reset_value, verify, verify_event_log, verify_with,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Version of the evidence format written by this code.
pub const EVIDENCE_VERSION: u32 = 1;
/// The PCR the loader measures into unless configured otherwise (resettable,
/// "application support" PCR in the TCG PC client profile).
pub const DEFAULT_PCR: u8 = 23;
/// Length of a keyserver nonce, bytes.
pub const NONCE_LEN: usize = 32;

/// A SHA-256 digest, serialized as lowercase hex.
pub type Digest32 = [u8; 32];

/// What a measured event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The loader's own executable.
    LoaderBinary,
    /// The loader's configuration (accelerator choice, limits, PCR index...).
    Config,
    /// A policy file (program admission rules, worlds).
    Policy,
    /// A Sigstore trust root (`trusted_root.json`) named by a policy.
    TrustRoot,
}

impl EventKind {
    /// The kebab-case name used in JSON, TOML and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoaderBinary => "loader-binary",
            Self::Config => "config",
            Self::Policy => "policy",
            Self::TrustRoot => "trust-root",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the loader's event log: what was extended into which PCR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// PCR index the digest was extended into.
    pub pcr: u8,
    /// What was measured.
    pub kind: EventKind,
    /// A human-readable name (file name, not a path with secrets); not measured.
    pub name: String,
    /// SHA-256 of the measured bytes; this is what was extended.
    #[serde(with = "hex_array")]
    pub digest: Digest32,
}

impl Event {
    /// An event measuring `bytes`.
    pub fn measure(pcr: u8, kind: EventKind, name: impl Into<String>, bytes: &[u8]) -> Self {
        Self {
            pcr,
            kind,
            name: name.into(),
            digest: Sha256::digest(bytes).into(),
        }
    }
}

/// Evidence a loader presents to a keyserver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Format version ([`EVIDENCE_VERSION`]).
    pub version: u32,
    /// The keyserver nonce this evidence answers.
    #[serde(with = "hex::serde")]
    pub nonce: Vec<u8>,
    /// The loader's ephemeral HPKE public key (DHKEM(P-256), uncompressed SEC1
    /// point, as `cinfer_envelope::RequestPublicKey::to_bytes`).
    #[serde(with = "hex::serde")]
    pub hpke_public_key: Vec<u8>,
    /// The attestation key's public key: uncompressed SEC1 P-256 point.
    #[serde(with = "hex::serde")]
    pub ak_public: Vec<u8>,
    /// The marshalled `TPMS_ATTEST` the TPM signed (contents of `TPM2B_ATTEST`).
    #[serde(with = "hex::serde")]
    pub attest: Vec<u8>,
    /// The marshalled `TPMT_SIGNATURE` over `attest` (ECDSA P-256, SHA-256).
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
    /// The quoted PCR values of the SHA-256 bank, by index. Their digest (in
    /// ascending index order) must equal the quote's `pcrDigest`.
    #[serde(with = "hex_map")]
    pub pcrs: BTreeMap<u8, Digest32>,
    /// Everything the loader extended, in order.
    pub event_log: Vec<Event>,
    /// The TPM's endorsement, when the loader has one: lets a keyserver trust
    /// the AK through the EK certificate instead of a pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsement: Option<Endorsement>,
    /// A TD quote, when the loader runs in an Intel TDX guest configured to
    /// produce one: its report data is [`tdx_report_data`] of this nonce and
    /// key, and the loader extended every event of `event_log` into one RTMR
    /// ([`rtmr_event_value`]), so the keyserver replays them from the same log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx: Option<TdxEvidence>,
}

/// The TDX part of [`Evidence`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TdxEvidence {
    /// The TD quote as the guest's quote provider returned it (configfs-tsm
    /// `outblob`: a version 4 ECDSA quote with its certification data).
    #[serde(with = "hex::serde")]
    pub quote: Vec<u8>,
    /// The RTMR the event log was extended into (2 or 3: the ones Linux lets
    /// software extend).
    pub rtmr: u8,
}

/// What binds the AK to a TPM a manufacturer certified: the EK certificate,
/// the EK's public area and the AK's public area. The keyserver checks the
/// certificate chain, that the certificate's key is this EK, that the AK
/// area is the quoting key, and then makes a credential for the AK's name
/// that only this TPM can activate ([`release::Credential`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsement {
    /// The EK certificate (DER X.509), as read from the TPM's NV index.
    #[serde(with = "hex::serde")]
    pub ek_certificate: Vec<u8>,
    /// The EK's marshalled `TPMT_PUBLIC`.
    #[serde(with = "hex::serde")]
    pub ek_public: Vec<u8>,
    /// The AK's marshalled `TPMT_PUBLIC`; its name (`nameAlg || H(area)`)
    /// is what the credential is made for.
    #[serde(with = "hex::serde")]
    pub ak_public_area: Vec<u8>,
}

impl Evidence {
    /// Serializes to the wire form (JSON).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these plain types cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses the wire form.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The quote's `extraData`: `SHA-256(nonce || hpke_public_key)`. Binds the quote
/// to this keyserver challenge and to the key the released secrets are wrapped to.
pub fn binding(nonce: &[u8], hpke_public_key: &[u8]) -> Digest32 {
    let mut h = Sha256::new();
    h.update(nonce);
    h.update(hpke_public_key);
    h.finalize().into()
}

/// A TD quote's 64-byte report data for an attestation: `SHA-512("cinfer
/// tdx report data v1" || len(nonce) as u32 big-endian || nonce ||
/// hpke_public_key)`. As [`binding`] for a TPM quote, it ties the quote to the
/// keyserver's challenge and to the key released secrets are wrapped to; the
/// length prefix keeps the split between nonce and key unambiguous.
pub fn tdx_report_data(nonce: &[u8], hpke_public_key: &[u8]) -> [u8; 64] {
    let mut h = sha2::Sha512::new();
    h.update(b"cinfer tdx report data v1");
    h.update((nonce.len() as u32).to_be_bytes());
    h.update(nonce);
    h.update(hpke_public_key);
    h.finalize().into()
}

/// The RTMR a loader extends its event log into unless configured otherwise:
/// RTMR3, which the firmware and the kernel leave to software.
pub const TDX_EVENT_RTMR: u8 = 3;

/// A TDX measurement register value (SHA-384).
pub type Digest48 = [u8; 48];

/// What the loader extends into its RTMR for `event`: `SHA-384("cinfer rtmr
/// event v1" || kind || 0 || digest)`. Unlike the PCR extend (the event's
/// SHA-256 digest alone), it binds the event's kind, so a log cannot relabel
/// a measurement as another kind's.
pub fn rtmr_event_value(event: &Event) -> Digest48 {
    let mut h = sha2::Sha384::new();
    h.update(b"cinfer rtmr event v1");
    h.update(event.kind.as_str().as_bytes());
    h.update([0]);
    h.update(event.digest);
    h.finalize().into()
}

/// `SHA-384(rtmr || value)`: one RTMR extend (`TDG.MR.RTMR.EXTEND`).
pub fn rtmr_extend(rtmr: &Digest48, value: &Digest48) -> Digest48 {
    let mut h = sha2::Sha384::new();
    h.update(rtmr);
    h.update(value);
    h.finalize().into()
}

/// Replays `events` into an RTMR from its value at TD start (all zeros).
pub fn rtmr_replay(events: &[Event]) -> Digest48 {
    events
        .iter()
        .fold([0u8; 48], |acc, e| rtmr_extend(&acc, &rtmr_event_value(e)))
}

/// `SHA-256(pcr || digest)`: one PCR extend in the SHA-256 bank.
pub fn extend(pcr: &Digest32, digest: &Digest32) -> Digest32 {
    let mut h = Sha256::new();
    h.update(pcr);
    h.update(digest);
    h.finalize().into()
}

/// Replays the events for `pcr` from the reset value (all zeros).
pub fn replay(events: &[Event], pcr: u8) -> Digest32 {
    events
        .iter()
        .filter(|e| e.pcr == pcr)
        .fold([0u8; 32], |acc, e| extend(&acc, &e.digest))
}

/// `pcrDigest` of a quote over the SHA-256 bank: SHA-256 of the selected PCR
/// values concatenated in ascending index order.
pub fn pcr_digest(pcrs: &BTreeMap<u8, Digest32>) -> Digest32 {
    let mut h = Sha256::new();
    for v in pcrs.values() {
        h.update(v);
    }
    h.finalize().into()
}

mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

mod hex_map {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(m: &BTreeMap<u8, [u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k.to_string(), hex::encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u8, [u8; 32]>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                let idx: u8 = k.parse().map_err(serde::de::Error::custom)?;
                if idx > 23 {
                    return Err(serde::de::Error::custom(format!(
                        "PCR index {idx} out of range"
                    )));
                }
                let mut out = [0u8; 32];
                hex::decode_to_slice(v, &mut out).map_err(serde::de::Error::custom)?;
                Ok((idx, out))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_matches_sequential_extends() {
        let a = Event::measure(23, EventKind::LoaderBinary, "trusted-loader", b"bin");
        let b = Event::measure(23, EventKind::Policy, "dev.toml", b"policy");
        let other = Event::measure(16, EventKind::Config, "x", b"x");
        let expected = extend(&extend(&[0; 32], &a.digest), &b.digest);
        assert_eq!(replay(&[a.clone(), other, b.clone()], 23), expected);
        assert_ne!(replay(&[b, a], 23), expected, "order matters");
    }

    #[test]
    fn rtmr_replay_binds_order_and_kind() {
        let a = Event::measure(23, EventKind::Config, "c", b"x");
        let b = Event::measure(23, EventKind::Policy, "p", b"y");
        let expected = rtmr_extend(
            &rtmr_extend(&[0; 48], &rtmr_event_value(&a)),
            &rtmr_event_value(&b),
        );
        assert_eq!(rtmr_replay(&[a.clone(), b.clone()]), expected);
        assert_ne!(rtmr_replay(&[b, a.clone()]), expected, "order matters");
        let relabelled = Event {
            kind: EventKind::Policy,
            ..a.clone()
        };
        assert_ne!(
            rtmr_event_value(&relabelled),
            rtmr_event_value(&a),
            "the kind is bound"
        );
    }

    #[test]
    fn evidence_round_trips_through_json() {
        let ev = Evidence {
            version: EVIDENCE_VERSION,
            nonce: vec![1; NONCE_LEN],
            hpke_public_key: vec![4; 65],
            ak_public: vec![4; 65],
            attest: vec![0xff, 0x54],
            signature: vec![0, 0x18],
            pcrs: BTreeMap::from([(23, [7; 32])]),
            event_log: vec![Event::measure(23, EventKind::Config, "c", b"c")],
            endorsement: None,
            tdx: Some(TdxEvidence {
                quote: vec![4, 0, 2, 0],
                rtmr: 3,
            }),
        };
        let json = ev.to_json();
        assert_eq!(Evidence::from_json(&json).unwrap(), ev);
        let bad = String::from_utf8(json).unwrap().replace("\"23\"", "\"24\"");
        assert!(
            Evidence::from_json(bad.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("PCR index 24 out of range")
        );
    }
}
