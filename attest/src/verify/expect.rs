//! Expect: reference values (from the keyserver's policy) → what a good quote
//! must show.
//!
//! Attestation keys are **pinned**: the keyserver lists the public keys of the
//! AKs it trusts (each enrolled out of band, e.g. from the TPM's EK certificate
//! and `TPM2_MakeCredential`/`ActivateCredential` at provisioning). There is no
//! certificate chain to walk at verification time.

use crate::{DEFAULT_PCR, Digest32, Event, EventKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Event kinds every accepted log must contain at least once.
pub const REQUIRED_EVENT_KINDS: [EventKind; 3] = [
    EventKind::LoaderBinary,
    EventKind::Config,
    EventKind::Policy,
];

/// What the keyserver accepts, as written in its policy TOML:
///
/// ```toml
/// measured-pcr = 23                       # default 23
/// trusted-aks = ["04a1b2…"]               # pinned AK public keys, uncompressed SEC1, hex
/// [events]                                # allowed SHA-256 digests per event kind
/// loader-binary = ["…"]
/// config = ["…"]
/// policy = ["…", "…"]
/// trust-root = ["…"]                      # optional kind
/// [pcrs]                                  # exact values of other PCRs (boot PCRs)
/// 0 = "…"
/// ```
///
/// At least one pinned PCR must be one software cannot reset (anything but 16
/// and 23) holding a measured value (not its reset value: all zeros, or all
/// ones for 17–22): the measured PCR alone proves nothing against root on the
/// host, who can reset PCR 23, replay the public event log into it and have
/// the TPM quote it for a key of their own. `allow-resettable-pcrs-only =
/// true` lifts this for development (a TPM where nothing measured the boot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReferenceValues {
    /// Pinned attestation keys: uncompressed SEC1 P-256 points.
    #[serde(with = "hex_list")]
    pub trusted_aks: Vec<Vec<u8>>,
    /// The PCR the loader measures into and the event log replays.
    #[serde(default = "default_pcr")]
    pub measured_pcr: u8,
    /// Allowed event digests, per kind. Every logged event must be allowed for
    /// its kind, and each of [`REQUIRED_EVENT_KINDS`] must occur.
    #[serde(default, with = "digest_sets")]
    pub events: BTreeMap<EventKind, BTreeSet<Digest32>>,
    /// Exact values other quoted PCRs must have (e.g. boot PCRs of a known VM
    /// image). Each must be in the quote's selection.
    #[serde(default, with = "crate::hex_map")]
    pub pcrs: BTreeMap<u8, Digest32>,
    /// Accept values that pin no PCR software cannot reset (development only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_resettable_pcrs_only: bool,
}

/// PCRs that software at locality 0 can reset (PC Client platform profile):
/// 16 (debug) and 23 (application).
pub const RESETTABLE_PCRS: [u8; 2] = [16, 23];

fn default_pcr() -> u8 {
    DEFAULT_PCR
}

/// Why a set of reference values cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReferenceError {
    /// No attestation key is trusted: nothing could ever verify.
    #[error("no trusted attestation keys")]
    NoTrustedAk,
    /// A pinned AK is not an uncompressed SEC1 P-256 point.
    #[error("trusted AK #{0} is not an uncompressed P-256 point")]
    BadAk(usize),
    /// The measured PCR is not a PCR of a PC-client TPM.
    #[error("measured PCR {0} out of range (0..=23)")]
    MeasuredPcrOutOfRange(u8),
    /// A required event kind has no allowed digest: nothing could ever verify.
    #[error("no allowed digests for required event kind {0}")]
    NoAllowedDigests(EventKind),
    /// Only resettable PCRs, or boot PCRs at their reset value, would be
    /// checked: root on the host could reset the measured PCR and replay the
    /// event log.
    #[error(
        "no measured boot PCR is pinned: PCRs 16 and 23 can be reset by root on the host, who could replay the event log, \
         and a boot PCR at its reset value shows nothing was measured; \
         pin measured boot PCRs in [pcrs] (and quote them: quote-pcrs in the loader configuration) \
         or set allow-resettable-pcrs-only = true for development"
    )]
    OnlyResettablePcrs,
    /// A pinned PCR index is not a PCR of a PC-client TPM.
    #[error("pinned PCR {0} out of range (0..=23)")]
    PcrOutOfRange(u8),
}

impl ReferenceValues {
    /// Values that allow exactly the digests of `events` (a loader's event
    /// log, as `cinfer measure-loader` computes it) in `measured_pcr`, with no
    /// trusted AK and no other PCR pinned yet: the operator adds those (from
    /// the TPM the loader runs on).
    pub fn for_events(measured_pcr: u8, events: &[Event]) -> Self {
        let mut values = Self {
            trusted_aks: Vec::new(),
            measured_pcr,
            events: BTreeMap::new(),
            pcrs: BTreeMap::new(),
            allow_resettable_pcrs_only: false,
        };
        for e in events {
            values.events.entry(e.kind).or_default().insert(e.digest);
        }
        values
    }

    /// Checks the values can be used (call when loading a policy, so a mistake
    /// shows at startup rather than as refused evidence).
    pub fn check(&self) -> Result<(), ReferenceError> {
        self.check_with(true)
    }

    /// The checks of [`Self::check_with`] that concern the event log only:
    /// for a keyserver that takes its measurements from TD quotes alone (no
    /// TPM: AKs and PCRs are not used).
    pub fn check_events(&self) -> Result<(), ReferenceError> {
        for kind in REQUIRED_EVENT_KINDS {
            if self.events.get(&kind).is_none_or(BTreeSet::is_empty) {
                return Err(ReferenceError::NoAllowedDigests(kind));
            }
        }
        Ok(())
    }

    /// [`ReferenceValues::check`], where `trusted-aks` may be empty unless
    /// `pins_required`: a keyserver that trusts AKs through their endorsement
    /// (EK certificate and credential) needs no pins.
    pub fn check_with(&self, pins_required: bool) -> Result<(), ReferenceError> {
        if pins_required && self.trusted_aks.is_empty() {
            return Err(ReferenceError::NoTrustedAk);
        }
        for (i, ak) in self.trusted_aks.iter().enumerate() {
            if !is_uncompressed_p256_point(ak) {
                return Err(ReferenceError::BadAk(i));
            }
        }
        if self.measured_pcr > 23 {
            return Err(ReferenceError::MeasuredPcrOutOfRange(self.measured_pcr));
        }
        self.check_events()?;
        if let Some(p) = self.pcrs.keys().find(|p| **p > 23) {
            return Err(ReferenceError::PcrOutOfRange(*p));
        }
        let boot_pinned = self
            .pcrs
            .iter()
            .any(|(p, v)| !RESETTABLE_PCRS.contains(p) && !is_reset_value(*p, v));
        if !boot_pinned && !self.allow_resettable_pcrs_only {
            return Err(ReferenceError::OnlyResettablePcrs);
        }
        Ok(())
    }
}

/// Whether `value` is what PCR `pcr` holds before anything is measured into
/// it: zeros, or (the DRTM PCRs 17–22 at TPM startup) all ones.
pub fn is_reset_value(pcr: u8, value: &Digest32) -> bool {
    *value == [0; 32] || ((17..=22).contains(&pcr) && *value == [0xff; 32])
}

/// Whether `bytes` is an uncompressed SEC1 encoding of a point on P-256.
pub(crate) fn is_uncompressed_p256_point(bytes: &[u8]) -> bool {
    bytes.len() == 65 && bytes[0] == 0x04 && p256::PublicKey::from_sec1_bytes(bytes).is_ok()
}

/// What a quote must show, derived from [`ReferenceValues`].
#[derive(Debug)]
pub(crate) struct Expected<'a> {
    pub measured_pcr: u8,
    /// The PCRs that must be quoted: the measured one and every reference PCR.
    pub required_selection: BTreeSet<u8>,
    pub refs: &'a ReferenceValues,
}

impl<'a> Expected<'a> {
    pub fn from_refs(refs: &'a ReferenceValues) -> Self {
        let mut required_selection: BTreeSet<u8> = refs.pcrs.keys().copied().collect();
        required_selection.insert(refs.measured_pcr);
        Self {
            measured_pcr: refs.measured_pcr,
            required_selection,
            refs,
        }
    }

    pub fn ak_trusted(&self, ak_public: &[u8]) -> bool {
        self.refs.trusted_aks.iter().any(|ak| ak == ak_public)
    }

    pub fn event_allowed(&self, kind: EventKind, digest: &Digest32) -> bool {
        self.refs
            .events
            .get(&kind)
            .is_some_and(|allowed| allowed.contains(digest))
    }
}

mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(hex::encode))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| hex::decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

mod digest_sets {
    use crate::{Digest32, EventKind};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::{BTreeMap, BTreeSet};

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<EventKind, BTreeSet<Digest32>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(
            m.iter()
                .map(|(k, v)| (k, v.iter().map(hex::encode).collect::<Vec<_>>())),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<EventKind, BTreeSet<Digest32>>, D::Error> {
        BTreeMap::<EventKind, Vec<String>>::deserialize(d)?
            .into_iter()
            .map(|(kind, digests)| {
                let set = digests
                    .into_iter()
                    .map(|h| {
                        let mut out = [0u8; 32];
                        hex::decode_to_slice(h, &mut out).map_err(serde::de::Error::custom)?;
                        Ok(out)
                    })
                    .collect::<Result<BTreeSet<_>, D::Error>>()?;
                Ok((kind, set))
            })
            .collect()
    }
}
