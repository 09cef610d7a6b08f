//! TDX evidence as the keyserver checks it (`cinfer_attest::tdx::verify_evidence`):
//! a TD quote from the test platform (`tdx_test`: a PCK chain under a test
//! root, never Intel's) carried in [`Evidence`] next to the TPM quote, its
//! report data bound to the evidence's nonce and key, and its event RTMR the
//! replay of the evidence's event log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_attest::fixture::Fixture;
use cinfer_attest::tdx::{TdxError, TdxReferenceValues, verify_evidence};
use cinfer_attest::tdx_test::{TdFields, TestTcb, TestTdxPlatform};
use cinfer_attest::{Event, EventKind, Evidence, TdxEvidence, rtmr_replay, tdx_report_data};

const NOW: u64 = 1_780_000_000;
const MRTD: [u8; 48] = [0x5d; 48];

struct Setup {
    platform: TestTdxPlatform,
    evidence: Evidence,
    refs: TdxReferenceValues,
}

/// Evidence whose TD quote the platform made for `edit`ed fields (by
/// default: the report data of the evidence's nonce and key, RTMR3 the
/// replay of its event log).
fn setup_with(edit: impl FnOnce(&Evidence, &mut TdFields)) -> Setup {
    let platform = TestTdxPlatform::generate(TestTcb::UpToDate, NOW).unwrap();
    let mut evidence = Fixture::new(&[3; 32], &[4; 65]).evidence();
    let mut fields = TdFields {
        mr_td: MRTD,
        report_data: tdx_report_data(&evidence.nonce, &evidence.hpke_public_key),
        ..TdFields::default()
    };
    fields.rtmrs[3] = rtmr_replay(&evidence.event_log);
    edit(&evidence, &mut fields);
    evidence.tdx = Some(TdxEvidence {
        quote: platform.quote(&fields),
        rtmr: 3,
    });
    let refs = TdxReferenceValues::new(platform.root_ca_der().to_vec(), MRTD);
    Setup {
        platform,
        evidence,
        refs,
    }
}

fn check(s: &Setup, evidence: &Evidence) -> Result<cinfer_attest::tdx::TdxVerdict, TdxError> {
    verify_evidence(evidence, &[3; 32], s.platform.collateral(), &s.refs, NOW)
}

#[test]
fn evidence_with_a_bound_td_quote_and_a_replaying_rtmr_verifies() {
    let s = setup_with(|_, _| {});
    let verdict = check(&s, &s.evidence).unwrap();
    assert_eq!(verdict.tcb_status, "UpToDate");
    assert_eq!(verdict.mr_td, MRTD);
    assert_eq!(verdict.rtmrs[3], rtmr_replay(&s.evidence.event_log));
}

#[test]
fn missing_quote_other_nonce_and_other_rtmr_are_refused_by_name() {
    let s = setup_with(|_, _| {});
    let mut ev = s.evidence.clone();
    ev.tdx = None;
    assert!(matches!(check(&s, &ev), Err(TdxError::Missing)));

    let err =
        verify_evidence(&s.evidence, &[9; 32], s.platform.collateral(), &s.refs, NOW).unwrap_err();
    assert!(matches!(err, TdxError::Nonce), "{err}");

    let mut ev = s.evidence.clone();
    ev.tdx.as_mut().unwrap().rtmr = 2;
    let err = check(&s, &ev).unwrap_err();
    assert!(
        matches!(
            err,
            TdxError::EventRtmr {
                expected: 3,
                found: 2
            }
        ),
        "{err}"
    );
}

/// The event log must be what the TD extended: a log with an event dropped,
/// added or relabelled (another kind, same digest) does not replay to the
/// quoted RTMR3.
#[test]
fn an_event_log_that_is_not_what_the_td_extended_is_refused() {
    let s = setup_with(|_, _| {});
    let mut edits: Vec<Evidence> = Vec::new();
    let mut dropped = s.evidence.clone();
    dropped.event_log.pop();
    edits.push(dropped);
    let mut added = s.evidence.clone();
    added.event_log.push(Event::measure(
        23,
        EventKind::Policy,
        "extra.toml",
        b"extra",
    ));
    edits.push(added);
    let mut relabelled = s.evidence.clone();
    relabelled.event_log[2].kind = EventKind::Config;
    edits.push(relabelled);
    for ev in edits {
        let err = check(&s, &ev).unwrap_err();
        assert!(matches!(err, TdxError::EventLogReplay { rtmr: 3 }), "{err}");
    }
}

/// A TD quote of another attestation (report data over another nonce or
/// key), spliced into this evidence, is refused.
#[test]
fn a_td_quote_bound_to_another_attestation_is_refused() {
    let s = setup_with(|ev, fields| {
        fields.report_data = tdx_report_data(&ev.nonce, &[5; 65]);
    });
    let err = check(&s, &s.evidence).unwrap_err();
    assert!(matches!(err, TdxError::ReportData), "{err}");
    let s = setup_with(|ev, fields| {
        fields.report_data = tdx_report_data(&[8; 32], &ev.hpke_public_key);
    });
    let err = check(&s, &s.evidence).unwrap_err();
    assert!(matches!(err, TdxError::ReportData), "{err}");
}

/// The TD's other pins and its debug state are checked on evidence too.
#[test]
fn a_debug_td_and_another_firmware_are_refused() {
    let s = setup_with(|_, fields| fields.td_attributes[0] |= 1);
    let err = check(&s, &s.evidence).unwrap_err();
    assert!(matches!(err, TdxError::Debug), "{err}");
    let s = setup_with(|_, fields| fields.mr_td = [0x11; 48]);
    let err = check(&s, &s.evidence).unwrap_err();
    assert!(matches!(err, TdxError::MrTd { .. }), "{err}");
}

/// A TD without a TPM: evidence with no TPM quote. What the keyserver
/// checks besides the TD quote (`verify_event_log`): the nonce, the key's
/// form, and an event log of allowed digests with every required kind.
#[test]
fn td_only_evidence_needs_an_allowed_event_log() {
    use cinfer_attest::{EvidenceError, verify_event_log};
    let fixture = Fixture::new(&[3; 32], &hpke_point());
    let refs = fixture.reference_values();
    let mut ev = fixture.evidence();
    ev.ak_public.clear();
    ev.attest.clear();
    ev.signature.clear();
    ev.pcrs.clear();
    verify_event_log(&ev, &[3; 32], &refs).unwrap();
    assert!(matches!(
        verify_event_log(&ev, &[9; 32], &refs),
        Err(EvidenceError::NonceMismatch)
    ));
    let mut other = ev.clone();
    other.event_log.push(Event::measure(
        23,
        EventKind::Policy,
        "other.toml",
        b"other",
    ));
    assert!(matches!(
        verify_event_log(&other, &[3; 32], &refs),
        Err(EvidenceError::EventNotAllowed {
            kind: EventKind::Policy,
            ..
        })
    ));
    let mut missing = ev.clone();
    missing.event_log.retain(|e| e.kind != EventKind::Config);
    assert!(matches!(
        verify_event_log(&missing, &[3; 32], &refs),
        Err(EvidenceError::MissingEvent {
            kind: EventKind::Config
        })
    ));
    let mut bad_key = ev;
    bad_key.hpke_public_key = vec![4; 65];
    assert!(matches!(
        verify_event_log(&bad_key, &[3; 32], &refs),
        Err(EvidenceError::InvalidHpkeKey)
    ));
}

/// An uncompressed P-256 point (a real HPKE public key's form).
fn hpke_point() -> Vec<u8> {
    cinfer_attest::fixture::public_bytes(&cinfer_attest::fixture::test_key(9))
}
