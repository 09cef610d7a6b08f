//! Intel TDX quote verification, the keyserver's side: offline, against
//! collateral the operator supplies, with the pure-Rust `dcap-qvl` crate (no
//! network: its collateral client is not built).
//!
//! [`verify_td_quote`] accepts a TD quote only if, in this order:
//! 1. it parses and carries a TD report (not an SGX enclave report);
//! 2. `dcap-qvl` verifies it against the collateral at `now`, under the root
//!    CA the operator configured (Intel's SGX root in production, a test root
//!    in tests): the PCK chain and CRLs, the quote and QE report signatures,
//!    the QE identity, the TCB info and the validity of every collateral item
//!    at `now`, and the TD attributes (no reserved or migratable bits,
//!    `SEPT_VE_DISABLE` set);
//! 3. the TD attributes have DEBUG (bit 0) and TD profiling (bits 4–6) off,
//!    checked here so that the refusal has its own reason;
//! 4. the TCB status is one the reference values allow (`UpToDate` only by
//!    default);
//! 5. MRTD, each pinned RTMR, MRCONFIGID and MROWNER equal the reference values;
//! 6. the report data is [`crate::tdx_report_data`] of this attestation's nonce
//!    and the loader's ephemeral public key.
//!
//! Each refusal is a [`TdxError`] naming what failed.

pub use dcap_qvl::QuoteCollateralV3 as TdxCollateral;
use dcap_qvl::quote::{Quote, Report};
use dcap_qvl::verify::QuoteVerifier;

/// Parses collateral in the JSON form Intel's PCS / a PCCS serves it as
/// assembled by `dcap-qvl` (PEM chains, hex-encoded CRLs and signatures,
/// the signed TCB info and QE identity JSON text).
pub fn parse_collateral(json: &[u8]) -> Result<TdxCollateral, TdxError> {
    serde_json::from_slice(json).map_err(|e| TdxError::MalformedCollateral(e.to_string()))
}

/// A 48-byte TDX measurement register (SHA-384).
pub type Measurement = [u8; 48];

/// What a TD must be for the keyserver to trust it.
#[derive(Debug, Clone)]
pub struct TdxReferenceValues {
    /// The root CA (DER) the PCK chain and the collateral signers must chain
    /// to: Intel's SGX root CA in production.
    pub root_ca_der: Vec<u8>,
    /// The TCB statuses accepted (`UpToDate` only by default; add e.g.
    /// `SWHardeningNeeded` only where the operator decided it is acceptable).
    pub allowed_tcb_statuses: Vec<String>,
    /// MRTD (the TD's initial contents: firmware) that must match.
    pub mr_td: Measurement,
    /// RTMR0..3 that must match, where pinned.
    pub rtmrs: [Option<Measurement>; 4],
    /// MRCONFIGID, where pinned.
    pub mr_config_id: Option<Measurement>,
    /// MROWNER, where pinned.
    pub mr_owner: Option<Measurement>,
    /// The RTMR the loader extends its event log into (2 or 3); its value
    /// must be the log's replay ([`crate::rtmr_replay`]), so it is not pinned.
    pub event_rtmr: u8,
}

impl TdxReferenceValues {
    /// Reference values pinning `mr_td` under `root_ca_der`, accepting only
    /// `UpToDate`, with no RTMR, MRCONFIGID or MROWNER pinned yet.
    pub fn new(root_ca_der: Vec<u8>, mr_td: Measurement) -> Self {
        TdxReferenceValues {
            root_ca_der,
            allowed_tcb_statuses: vec!["UpToDate".to_owned()],
            mr_td,
            rtmrs: [None; 4],
            mr_config_id: None,
            mr_owner: None,
            event_rtmr: crate::TDX_EVENT_RTMR,
        }
    }
}

/// What a verified TD quote says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxVerdict {
    /// The platform's TCB status (an allowed one).
    pub tcb_status: String,
    /// Intel security advisories that apply to this TCB level.
    pub advisory_ids: Vec<String>,
    /// MRTD.
    pub mr_td: Measurement,
    /// RTMR0..3.
    pub rtmrs: [Measurement; 4],
    /// The TD attributes (little-endian bit field).
    pub td_attributes: [u8; 8],
}

/// Why a TD quote was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TdxError {
    /// The quote does not parse.
    #[error("TD quote does not parse: {0}")]
    Malformed(String),
    /// The collateral does not parse.
    #[error("TDX collateral does not parse: {0}")]
    MalformedCollateral(String),
    /// The quote carries an SGX enclave report, not a TD report.
    #[error("not a TD quote (an SGX enclave report)")]
    NotTd,
    /// The quote, its certificate chain or the collateral failed verification
    /// (signature, chain, revocation, expired or not-yet-valid collateral, TD
    /// attributes): `dcap-qvl`'s reason.
    #[error("TD quote refused: {0}")]
    Refused(String),
    /// The TD runs with DEBUG (attribute bit 0) or TD profiling (bits 4–6,
    /// in the same "TD under debug" group) on: its memory and state are open
    /// to the host.
    #[error("TD attributes have DEBUG or TD profiling on")]
    Debug,
    /// The platform's TCB status is not an allowed one.
    #[error("TCB status {found} is not allowed (allowed: {allowed:?}; advisories: {advisories:?})")]
    TcbStatus {
        /// The status the collateral gives this platform.
        found: String,
        /// The statuses allowed.
        allowed: Vec<String>,
        /// The advisories of that TCB level.
        advisories: Vec<String>,
    },
    /// MRTD is not the reference value.
    #[error("MRTD {found} is not the reference {expected}")]
    MrTd {
        /// The reference value (hex).
        expected: String,
        /// The quote's (hex).
        found: String,
    },
    /// A pinned RTMR is not the reference value.
    #[error("RTMR{index} {found} is not the reference {expected}")]
    Rtmr {
        /// Which RTMR.
        index: usize,
        /// The reference value (hex).
        expected: String,
        /// The quote's (hex).
        found: String,
    },
    /// MRCONFIGID is not the reference value.
    #[error("MRCONFIGID {found} is not the reference {expected}")]
    MrConfigId {
        /// The reference value (hex).
        expected: String,
        /// The quote's (hex).
        found: String,
    },
    /// MROWNER is not the reference value.
    #[error("MROWNER {found} is not the reference {expected}")]
    MrOwner {
        /// The reference value (hex).
        expected: String,
        /// The quote's (hex).
        found: String,
    },
    /// The report data does not bind this attestation's nonce and key.
    #[error("the TD report data does not bind this attestation (nonce and key)")]
    ReportData,
    /// The evidence carries no TD quote, and the reference values require one.
    #[error("the evidence has no TD quote")]
    Missing,
    /// The evidence answers another nonce.
    #[error("the evidence answers another nonce")]
    Nonce,
    /// The loader extended its events into another RTMR than the reference.
    #[error("the event log was extended into RTMR{found}, the reference is RTMR{expected}")]
    EventRtmr {
        /// The RTMR of the reference values.
        expected: u8,
        /// The evidence's.
        found: u8,
    },
    /// The event RTMR is not the replay of the event log.
    #[error("RTMR{rtmr} is not the replay of the event log")]
    EventLogReplay {
        /// Which RTMR.
        rtmr: u8,
    },
}

/// Verifies the TDX part of `evidence` as the answer to `expected_nonce`:
/// the TD quote ([`verify_td_quote`], with the report data bound to the
/// evidence's nonce and HPKE key) and that the event RTMR is the replay of
/// the evidence's event log. What each event may be (allowed digests,
/// required kinds) is checked on the same log by [`crate::verify::verify`].
pub fn verify_evidence(
    evidence: &crate::Evidence,
    expected_nonce: &[u8],
    collateral: &TdxCollateral,
    refs: &TdxReferenceValues,
    now_secs: u64,
) -> Result<TdxVerdict, TdxError> {
    let tdx = evidence.tdx.as_ref().ok_or(TdxError::Missing)?;
    if !crate::verify::constant_time_eq(&evidence.nonce, expected_nonce) {
        return Err(TdxError::Nonce);
    }
    if tdx.rtmr != refs.event_rtmr {
        return Err(TdxError::EventRtmr {
            expected: refs.event_rtmr,
            found: tdx.rtmr,
        });
    }
    let report_data = crate::tdx_report_data(&evidence.nonce, &evidence.hpke_public_key);
    let verdict = verify_td_quote(&tdx.quote, collateral, refs, now_secs, &report_data)?;
    let replayed = crate::rtmr_replay(&evidence.event_log);
    let index = usize::from(refs.event_rtmr);
    if verdict.rtmrs.get(index) != Some(&replayed) {
        return Err(TdxError::EventLogReplay {
            rtmr: refs.event_rtmr,
        });
    }
    Ok(verdict)
}

/// Checks a pinned 48-byte register.
fn pinned(
    expected: &Measurement,
    found: &Measurement,
    err: impl FnOnce(String, String) -> TdxError,
) -> Result<(), TdxError> {
    if expected == found {
        Ok(())
    } else {
        Err(err(hex::encode(expected), hex::encode(found)))
    }
}

/// Verifies `quote` with `collateral` at `now_secs` (Unix time) against
/// `refs`, and that its report data is `report_data` (see
/// [`crate::tdx_report_data`]). See the module documentation for the checks.
pub fn verify_td_quote(
    quote: &[u8],
    collateral: &TdxCollateral,
    refs: &TdxReferenceValues,
    now_secs: u64,
    report_data: &[u8; 64],
) -> Result<TdxVerdict, TdxError> {
    let parsed = Quote::parse(quote).map_err(|e| TdxError::Malformed(e.to_string()))?;
    if matches!(parsed.report, Report::SgxEnclave(_)) {
        return Err(TdxError::NotTd);
    }
    // DEBUG is refused below with its own reason, after the signatures.
    let verified = QuoteVerifier::new(refs.root_ca_der.clone())
        .allow_debug(true)
        .verify(quote, collateral, now_secs)
        .map_err(|e| TdxError::Refused(format!("{e:#}")))?;
    let td = verified.report.as_td10().ok_or(TdxError::NotTd)?;
    // `allow_debug(true)` lifts dcap-qvl's check of the whole "TD under
    // debug" group (bit 0 DEBUG, bits 4-6 profiling), so all four are
    // refused here; dcap-qvl still refuses the reserved bits 1-3 and 7.
    if td.td_attributes[0] & 0b0111_0001 != 0 {
        return Err(TdxError::Debug);
    }
    if !refs.allowed_tcb_statuses.contains(&verified.status) {
        return Err(TdxError::TcbStatus {
            found: verified.status,
            allowed: refs.allowed_tcb_statuses.clone(),
            advisories: verified.advisory_ids,
        });
    }
    pinned(&refs.mr_td, &td.mr_td, |expected, found| TdxError::MrTd {
        expected,
        found,
    })?;
    let rtmrs = [td.rt_mr0, td.rt_mr1, td.rt_mr2, td.rt_mr3];
    for (index, (pin, found)) in refs.rtmrs.iter().zip(&rtmrs).enumerate() {
        if let Some(pin) = pin {
            pinned(pin, found, |expected, found| TdxError::Rtmr {
                index,
                expected,
                found,
            })?;
        }
    }
    if let Some(pin) = &refs.mr_config_id {
        pinned(pin, &td.mr_config_id, |expected, found| {
            TdxError::MrConfigId { expected, found }
        })?;
    }
    if let Some(pin) = &refs.mr_owner {
        pinned(pin, &td.mr_owner, |expected, found| TdxError::MrOwner {
            expected,
            found,
        })?;
    }
    if !crate::verify::constant_time_eq(&td.report_data, report_data) {
        return Err(TdxError::ReportData);
    }
    Ok(TdxVerdict {
        tcb_status: verified.status,
        advisory_ids: verified.advisory_ids,
        mr_td: td.mr_td,
        rtmrs,
        td_attributes: td.td_attributes,
    })
}
