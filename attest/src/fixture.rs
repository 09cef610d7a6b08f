//! Test fixtures: evidence built by hand and signed with a software P-256 key
//! standing in for the TPM's attestation key. For unit tests and the
//! keyserver's tests only (feature `test-fixtures`); real quotes come from a
//! TPM (`cinfer-tpm`).
#![allow(clippy::expect_used)]

use crate::verify::{ClockInfo, EcdsaSignature, PcrSelection, Quote, ReferenceValues};
use crate::{
    DEFAULT_PCR, Digest32, EVIDENCE_VERSION, Event, EventKind, Evidence, binding, pcr_digest,
    replay,
};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use std::collections::{BTreeMap, BTreeSet};

/// A deterministic P-256 key from a seed byte (1..=254), standing in for an AK.
pub fn test_key(seed: u8) -> SigningKey {
    SigningKey::from_slice(&[seed.clamp(1, 254); 32]).expect("valid scalar")
}

/// The uncompressed SEC1 encoding of a key's public half.
pub fn public_bytes(key: &SigningKey) -> Vec<u8> {
    key.verifying_key().to_sec1_point(false).as_bytes().to_vec()
}

/// Signs `attest` as the TPM would: a marshalled ECDSA/SHA-256 `TPMT_SIGNATURE`.
pub fn sign_attest(ak: &SigningKey, attest: &[u8]) -> Vec<u8> {
    let sig: Signature = ak.sign(attest);
    let (r, s) = sig.split_bytes();
    EcdsaSignature {
        r: r.into(),
        s: s.into(),
    }
    .to_bytes()
}

/// Everything a fixture quote is made of; change a field, then call
/// [`Fixture::evidence`].
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The stand-in AK.
    pub ak: SigningKey,
    /// The nonce answered.
    pub nonce: Vec<u8>,
    /// The HPKE public key bound into the quote.
    pub hpke_public_key: Vec<u8>,
    /// The measured PCR.
    pub measured_pcr: u8,
    /// The event log (all on `measured_pcr`).
    pub events: Vec<Event>,
    /// Other quoted PCRs and their values (boot PCRs).
    pub other_pcrs: BTreeMap<u8, Digest32>,
    /// TPM clock info put into the quote.
    pub clock_info: ClockInfo,
}

impl Fixture {
    /// A fixture answering `nonce` with `hpke_public_key`; AK from seed 7; events
    /// for each kind on PCR 23; boot PCRs 0 and 7 with fixed values.
    pub fn new(nonce: &[u8], hpke_public_key: &[u8]) -> Self {
        let pcr = DEFAULT_PCR;
        Self {
            ak: test_key(7),
            nonce: nonce.to_vec(),
            hpke_public_key: hpke_public_key.to_vec(),
            measured_pcr: pcr,
            events: vec![
                Event::measure(pcr, EventKind::LoaderBinary, "trusted-loader", b"loader"),
                Event::measure(pcr, EventKind::Config, "loader.toml", b"config"),
                Event::measure(pcr, EventKind::Policy, "dev.toml", b"policy"),
                Event::measure(pcr, EventKind::Policy, "worlds.wit", b"worlds"),
                Event::measure(pcr, EventKind::TrustRoot, "trusted_root.json", b"root"),
            ],
            other_pcrs: BTreeMap::from([(0, [0x10; 32]), (7, [0x70; 32])]),
            clock_info: ClockInfo {
                clock: 123_456,
                reset_count: 3,
                restart_count: 0,
                safe: true,
            },
        }
    }

    /// The quoted PCR values: the others plus the replayed measured PCR.
    pub fn pcrs(&self) -> BTreeMap<u8, Digest32> {
        let mut pcrs = self.other_pcrs.clone();
        pcrs.insert(self.measured_pcr, replay(&self.events, self.measured_pcr));
        pcrs
    }

    /// The quote the TPM would produce for this fixture.
    pub fn quote(&self) -> Quote {
        let pcrs = self.pcrs();
        Quote {
            // TPM2B_NAME of an AK: nameAlg SHA-256 + digest of its public area.
            qualified_signer: [&[0x00, 0x0b][..], &[0xaa; 32]].concat(),
            extra_data: binding(&self.nonce, &self.hpke_public_key).to_vec(),
            clock_info: self.clock_info,
            firmware_version: 0x2023_0101,
            pcr_selections: vec![PcrSelection::sha256(pcrs.keys().copied())],
            pcr_digest: pcr_digest(&pcrs).to_vec(),
        }
    }

    /// Evidence carrying `quote`, signed by the fixture's AK.
    pub fn evidence_with_quote(&self, quote: &Quote) -> Evidence {
        let attest = quote.to_bytes();
        Evidence {
            version: EVIDENCE_VERSION,
            nonce: self.nonce.clone(),
            hpke_public_key: self.hpke_public_key.clone(),
            ak_public: public_bytes(&self.ak),
            signature: sign_attest(&self.ak, &attest),
            attest,
            pcrs: self.pcrs(),
            event_log: self.events.clone(),
            endorsement: None,
            tdx: None,
        }
    }

    /// Valid evidence for this fixture.
    pub fn evidence(&self) -> Evidence {
        self.evidence_with_quote(&self.quote())
    }

    /// Reference values that accept exactly this fixture's evidence.
    pub fn reference_values(&self) -> ReferenceValues {
        let mut events: BTreeMap<EventKind, BTreeSet<Digest32>> = BTreeMap::new();
        for e in &self.events {
            events.entry(e.kind).or_default().insert(e.digest);
        }
        ReferenceValues {
            trusted_aks: vec![public_bytes(&self.ak)],
            measured_pcr: self.measured_pcr,
            events,
            pcrs: self.other_pcrs.clone(),
            allow_resettable_pcrs_only: false,
        }
    }
}
