//! Evidence verification, in three steps (after Project Oak's verifier):
//!
//! * **extract** ([`extract`]): the marshalled `TPMS_ATTEST` and `TPMT_SIGNATURE`
//!   → typed values, with a bounded parser;
//! * **expect** ([`expect`]): the keyserver's [`ReferenceValues`] → what a good
//!   quote must show;
//! * **compare** (here): evidence against expectations, each failure a typed
//!   [`EvidenceError`] saying *why* the evidence was refused.
//!
//! The verifier reads no clock and keeps no state: freshness comes from the
//! nonce, which the caller issued, stored with its expiry (using its own,
//! injectable clock) and passes in as `expected_nonce`.
//!
//! Whether an AK or a measurement is trusted is a policy decision carried by
//! the reference values: AKs are **pinned** by public key, measurements are
//! allow-listed per event kind.

pub mod expect;
pub mod extract;

#[cfg(test)]
mod tests;

pub use expect::{
    REQUIRED_EVENT_KINDS, RESETTABLE_PCRS, ReferenceError, ReferenceValues, is_reset_value,
};
pub use extract::{ClockInfo, EcdsaSignature, PcrSelection, Quote, TPM_ALG_SHA256};

use crate::{Digest32, EVIDENCE_VERSION, EventKind, Evidence, binding, pcr_digest, replay};
use expect::Expected;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeSet;

/// Why evidence was refused. Messages carry no key material: at most public AK
/// fingerprints and measurement digests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// The evidence format version is not one this code speaks.
    #[error("unsupported evidence version {0}")]
    UnsupportedVersion(u32),
    /// A structure is truncated, too long, or has an out-of-range field.
    #[error("malformed evidence: {what}")]
    Malformed {
        /// The field or structure at fault.
        what: &'static str,
    },
    /// The signed structure does not start with `TPM_GENERATED_VALUE`: the TPM
    /// did not produce it.
    #[error("attestation magic {0:#010x} is not TPM_GENERATED_VALUE")]
    WrongMagic(u32),
    /// The signed structure is some other attestation than a quote.
    #[error("attestation type {0:#06x} is not a quote")]
    NotAQuote(u16),
    /// The signature is not ECDSA with SHA-256.
    #[error(
        "unsupported signature scheme {sig_alg:#06x} with hash {hash:#06x} (want ECDSA, SHA-256)"
    )]
    UnsupportedSignature {
        /// `sigAlg` of the `TPMT_SIGNATURE`.
        sig_alg: u16,
        /// Its hash algorithm.
        hash: u16,
    },
    /// The attestation key is not one of the pinned keys.
    #[error("attestation key {fingerprint} is not trusted")]
    UntrustedAk {
        /// Hex SHA-256 of the presented AK public key.
        fingerprint: String,
    },
    /// The quote signature does not verify under the attestation key.
    #[error("quote signature does not verify")]
    BadSignature,
    /// The evidence answers another nonce than the one expected.
    #[error("nonce is not the one issued for this attestation")]
    NonceMismatch,
    /// The HPKE public key is not an uncompressed P-256 point.
    #[error("HPKE public key is not an uncompressed P-256 point")]
    InvalidHpkeKey,
    /// The quote's `extraData` is not `binding(nonce, hpke public key)`.
    #[error("quote extraData does not bind the nonce and the HPKE public key")]
    BindingMismatch,
    /// The quoted PCR selection is not what the reference values require, or
    /// the evidence's PCR values are not for exactly the quoted PCRs.
    #[error("PCR selection: {0}")]
    SelectionMismatch(SelectionProblem),
    /// The PCR values in the evidence do not hash to the quote's `pcrDigest`.
    #[error("PCR values do not match the quote's pcrDigest")]
    PcrDigestMismatch,
    /// An event names another PCR than the measured one.
    #[error("event {index} extends PCR {pcr}, not the measured PCR {measured}")]
    EventWrongPcr {
        /// Position in the event log.
        index: usize,
        /// The PCR it names.
        pcr: u8,
        /// The measured PCR.
        measured: u8,
    },
    /// Replaying the event log does not give the quoted value of the measured PCR.
    #[error("event log replay does not give the quoted value of PCR {pcr}")]
    EventLogReplayMismatch {
        /// The measured PCR.
        pcr: u8,
    },
    /// An event's digest is not allowed for its kind.
    #[error("{kind} event digest {digest} is not allowed")]
    EventNotAllowed {
        /// The event's kind.
        kind: EventKind,
        /// Hex of its digest.
        digest: String,
    },
    /// A required event kind does not occur in the log.
    #[error("no {kind} event in the event log")]
    MissingEvent {
        /// The missing kind.
        kind: EventKind,
    },
    /// A PCR with a reference value has another value.
    #[error("PCR {pcr} differs from its reference value")]
    PcrValueMismatch {
        /// The PCR index.
        pcr: u8,
    },
}

/// What is wrong with a quote's PCR selection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectionProblem {
    /// A bank other than SHA-256 is quoted.
    #[error("bank {0:#06x} quoted; only SHA-256 is accepted")]
    NotSha256(u16),
    /// The SHA-256 bank appears twice (or not at all).
    #[error("expected exactly one SHA-256 bank selection")]
    BankCount,
    /// The measured PCR is not quoted.
    #[error("measured PCR {0} is not quoted")]
    MeasuredPcrNotQuoted(u8),
    /// A PCR with a reference value is not quoted.
    #[error("reference PCR {0} is not quoted")]
    ReferencePcrNotQuoted(u8),
    /// The evidence's PCR values are not for exactly the quoted PCRs.
    #[error("the evidence's PCR values are not for exactly the quoted PCRs")]
    EvidencePcrsDiffer,
}

/// What verified evidence established, for the audit line and the release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Hex SHA-256 of the attestation key's public key (which pinned AK signed).
    pub ak_fingerprint: String,
    /// The measured PCR.
    pub measured_pcr: u8,
    /// Its quoted value (= the event log replay).
    pub measured_value: Digest32,
    /// The TPM's clock when it quoted.
    pub clock_info: ClockInfo,
    /// The TPM firmware version.
    pub firmware_version: u64,
    /// The quoted PCR indices.
    pub quoted_pcrs: BTreeSet<u8>,
}

/// Hex SHA-256 of an AK public key (its encoding as presented): how audit lines
/// and errors name an AK.
pub fn ak_fingerprint(ak_public: &[u8]) -> String {
    hex::encode(Sha256::digest(ak_public))
}

/// Verifies `evidence` as the answer to `expected_nonce` against `refs`.
///
/// Checks, cheapest first: version, nonce, HPKE key form, AK pinned, quote
/// structure, signature, `extraData` binding, PCR selection, PCR digest, event
/// log (PCR of each event, replay, allowed digests, required kinds), reference
/// PCR values.
pub fn verify(
    evidence: &Evidence,
    expected_nonce: &[u8],
    refs: &ReferenceValues,
) -> Result<Verified, EvidenceError> {
    verify_with(evidence, expected_nonce, refs, AkTrust::Pinned)
}

/// How [`verify_with`] decides whether the attestation key is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AkTrust {
    /// Only an AK listed in the reference values' `trusted-aks`.
    Pinned,
    /// The caller trusts the AK by other means and does not consult the pins:
    /// the keyserver checked its endorsement (EK certificate chain, EK, AK
    /// public area) and releases keys only under a credential for it, which
    /// nothing but the endorsed TPM holding this AK can activate.
    Endorsed,
}

/// [`verify`], with the AK trusted as `ak_trust` says.
pub fn verify_with(
    evidence: &Evidence,
    expected_nonce: &[u8],
    refs: &ReferenceValues,
    ak_trust: AkTrust,
) -> Result<Verified, EvidenceError> {
    let expected = Expected::from_refs(refs);
    check_header(evidence, expected_nonce)?;
    let ak_fingerprint = ak_fingerprint(&evidence.ak_public);
    if ak_trust == AkTrust::Pinned && !expected.ak_trusted(&evidence.ak_public) {
        return Err(EvidenceError::UntrustedAk {
            fingerprint: ak_fingerprint,
        });
    }

    // Extract.
    let quote = Quote::parse(&evidence.attest)?;
    let signature = EcdsaSignature::parse(&evidence.signature)?;

    // Compare: the TPM signed these bytes with this (pinned) key...
    let ak = VerifyingKey::from_sec1_bytes(&evidence.ak_public).map_err(|_| {
        EvidenceError::Malformed {
            what: "attestation key is not a P-256 point",
        }
    })?;
    let signature = Signature::from_scalars(signature.r, signature.s)
        .map_err(|_| EvidenceError::BadSignature)?;
    // ECDSA over SHA-256(attest), exactly what TPM2_Quote signs.
    ak.verify(&evidence.attest, &signature)
        .map_err(|_| EvidenceError::BadSignature)?;

    // ...for this challenge and this key...
    let bound = binding(&evidence.nonce, &evidence.hpke_public_key);
    if !constant_time_eq(&quote.extra_data, &bound) {
        return Err(EvidenceError::BindingMismatch);
    }

    // ...over these PCRs...
    let quoted_pcrs = check_selection(&quote.pcr_selections, &expected)?;
    let evidence_pcrs: BTreeSet<u8> = evidence.pcrs.keys().copied().collect();
    if evidence_pcrs != quoted_pcrs {
        return Err(EvidenceError::SelectionMismatch(
            SelectionProblem::EvidencePcrsDiffer,
        ));
    }
    if quote.pcr_digest != pcr_digest(&evidence.pcrs) {
        return Err(EvidenceError::PcrDigestMismatch);
    }

    // ...whose measured PCR is explained by an event log of allowed measurements...
    let measured = expected.measured_pcr;
    for (index, event) in evidence.event_log.iter().enumerate() {
        if event.pcr != measured {
            return Err(EvidenceError::EventWrongPcr {
                index,
                pcr: event.pcr,
                measured,
            });
        }
    }
    let measured_value =
        evidence
            .pcrs
            .get(&measured)
            .copied()
            .ok_or(EvidenceError::SelectionMismatch(
                SelectionProblem::MeasuredPcrNotQuoted(measured),
            ))?;
    if replay(&evidence.event_log, measured) != measured_value {
        return Err(EvidenceError::EventLogReplayMismatch { pcr: measured });
    }
    check_events(&evidence.event_log, &expected)?;

    // ...and whose other PCRs have their reference values.
    for (pcr, value) in &refs.pcrs {
        if evidence.pcrs.get(pcr) != Some(value) {
            return Err(EvidenceError::PcrValueMismatch { pcr: *pcr });
        }
    }

    Ok(Verified {
        ak_fingerprint,
        measured_pcr: measured,
        measured_value,
        clock_info: quote.clock_info,
        firmware_version: quote.firmware_version,
        quoted_pcrs,
    })
}

/// The evidence's version, that it answers `expected_nonce`, and its HPKE
/// key's form.
fn check_header(evidence: &Evidence, expected_nonce: &[u8]) -> Result<(), EvidenceError> {
    if evidence.version != EVIDENCE_VERSION {
        return Err(EvidenceError::UnsupportedVersion(evidence.version));
    }
    if !constant_time_eq(&evidence.nonce, expected_nonce) {
        return Err(EvidenceError::NonceMismatch);
    }
    if !expect::is_uncompressed_p256_point(&evidence.hpke_public_key) {
        return Err(EvidenceError::InvalidHpkeKey);
    }
    Ok(())
}

/// Every logged event allowed for its kind, and every required kind logged.
fn check_events(events: &[crate::Event], expected: &Expected<'_>) -> Result<(), EvidenceError> {
    for event in events {
        if !expected.event_allowed(event.kind, &event.digest) {
            return Err(EvidenceError::EventNotAllowed {
                kind: event.kind,
                digest: hex::encode(event.digest),
            });
        }
    }
    for kind in REQUIRED_EVENT_KINDS {
        if !events.iter().any(|e| e.kind == kind) {
            return Err(EvidenceError::MissingEvent { kind });
        }
    }
    Ok(())
}

/// The checks of [`verify`] that do not involve a TPM, for evidence whose
/// measurements another kind proves (a TD quote's RTMR replayed from the
/// same log: `tdx::verify_evidence`): version, nonce, HPKE key form, and an
/// event log of allowed measurements with every required kind. It proves
/// nothing alone: the log is only what the evidence claims until a quote
/// over its replay verifies.
pub fn verify_event_log(
    evidence: &Evidence,
    expected_nonce: &[u8],
    refs: &ReferenceValues,
) -> Result<(), EvidenceError> {
    check_header(evidence, expected_nonce)?;
    check_events(&evidence.event_log, &Expected::from_refs(refs))
}

/// The quote must select the SHA-256 bank only, including the measured PCR and
/// every reference PCR. Returns the selected indices.
fn check_selection(
    selections: &[PcrSelection],
    expected: &Expected<'_>,
) -> Result<BTreeSet<u8>, EvidenceError> {
    let problem = EvidenceError::SelectionMismatch;
    if let Some(other) = selections.iter().find(|s| s.hash_alg != TPM_ALG_SHA256) {
        return Err(problem(SelectionProblem::NotSha256(other.hash_alg)));
    }
    let [selection] = selections else {
        return Err(problem(SelectionProblem::BankCount));
    };
    let quoted = selection.indices();
    for pcr in &expected.required_selection {
        if !quoted.contains(pcr) {
            return Err(problem(if *pcr == expected.measured_pcr {
                SelectionProblem::MeasuredPcrNotQuoted(*pcr)
            } else {
                SelectionProblem::ReferencePcrNotQuoted(*pcr)
            }));
        }
    }
    Ok(quoted)
}

/// Equality whose time depends only on the lengths (nonces and bindings are
/// compared without an early exit).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
