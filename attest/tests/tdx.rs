//! TDX quote verification against real quotes and collateral.
//!
//! Fixtures (`tests/fixtures/tdx/`), from the `dcap-qvl` 0.7.1 crate's
//! `sample/` directory (MIT; Phala Network): `tdx_quote` (a v4 quote of a TD
//! 1.0 report from real hardware) with `tdx_quote_collateral.json` (Intel PCS
//! collateral issued 2025-06-19, next update 2025-07-19), and `sgx_quote` with
//! its collateral. `intel-sgx-root-ca.der` is Intel's SGX root CA, the trust
//! anchor every sample chains to (the same file dcap-qvl embeds).
#![cfg(feature = "tdx")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_attest::tdx::{
    Measurement, TdxError, TdxReferenceValues, TdxVerdict, parse_collateral, verify_td_quote,
};

const QUOTE: &[u8] = include_bytes!("fixtures/tdx/tdx_quote");
const COLLATERAL: &[u8] = include_bytes!("fixtures/tdx/tdx_quote_collateral.json");
const SGX_QUOTE: &[u8] = include_bytes!("fixtures/tdx/sgx_quote");
const SGX_COLLATERAL: &[u8] = include_bytes!("fixtures/tdx/sgx_quote_collateral.json");
const INTEL_ROOT: &[u8] = include_bytes!("fixtures/tdx/intel-sgx-root-ca.der");
/// A moment inside every collateral item's validity (one second before the
/// earliest `nextUpdate`, 2025-07-19T10:00:35Z).
const NOW: u64 = 1_752_919_234;

/// The sample's TD report, read without verification (to build references).
fn report() -> dcap_qvl::quote::TDReport10 {
    let q = dcap_qvl::quote::Quote::parse(QUOTE).unwrap();
    *q.report.as_td10().unwrap()
}

/// References that accept the sample: its own MRTD and RTMRs pinned.
fn refs() -> TdxReferenceValues {
    let r = report();
    let mut refs = TdxReferenceValues::new(INTEL_ROOT.to_vec(), r.mr_td);
    refs.rtmrs = [
        Some(r.rt_mr0),
        Some(r.rt_mr1),
        Some(r.rt_mr2),
        Some(r.rt_mr3),
    ];
    refs.mr_config_id = Some(r.mr_config_id);
    refs.mr_owner = Some(r.mr_owner);
    refs
}

fn verify(
    quote: &[u8],
    collateral: &[u8],
    refs: &TdxReferenceValues,
    now: u64,
) -> Result<TdxVerdict, TdxError> {
    verify_td_quote(
        quote,
        &parse_collateral(collateral).unwrap(),
        refs,
        now,
        &report().report_data,
    )
}

fn refused(r: Result<TdxVerdict, TdxError>) -> TdxError {
    match r {
        Err(e) => e,
        Ok(v) => panic!("accepted: {v:?}"),
    }
}

#[test]
fn a_real_td_quote_verifies_and_its_registers_are_read() {
    let v = verify(QUOTE, COLLATERAL, &refs(), NOW).unwrap();
    let r = report();
    assert_eq!(v.tcb_status, "UpToDate");
    assert!(v.advisory_ids.is_empty(), "{:?}", v.advisory_ids);
    assert_eq!(v.mr_td, r.mr_td);
    assert_eq!(v.rtmrs, [r.rt_mr0, r.rt_mr1, r.rt_mr2, r.rt_mr3]);
    assert_eq!(
        v.td_attributes[0] & 1,
        0,
        "the sample TD is not in debug mode"
    );
}

#[test]
fn each_pinned_register_is_checked_with_its_own_reason() {
    let flip = |m: &mut Measurement| m[47] ^= 1;
    let mut r = refs();
    flip(&mut r.mr_td);
    assert!(matches!(
        refused(verify(QUOTE, COLLATERAL, &r, NOW)),
        TdxError::MrTd { .. }
    ));
    for index in 0..4 {
        let mut r = refs();
        flip(r.rtmrs[index].as_mut().unwrap());
        match refused(verify(QUOTE, COLLATERAL, &r, NOW)) {
            TdxError::Rtmr {
                index: i, found, ..
            } => {
                assert_eq!(i, index);
                let want = [
                    report().rt_mr0,
                    report().rt_mr1,
                    report().rt_mr2,
                    report().rt_mr3,
                ];
                assert_eq!(found, hex::encode(want[index]));
            }
            other => panic!("RTMR{index}: {other}"),
        }
    }
    let mut r = refs();
    flip(r.mr_config_id.as_mut().unwrap());
    assert!(matches!(
        refused(verify(QUOTE, COLLATERAL, &r, NOW)),
        TdxError::MrConfigId { .. }
    ));
    let mut r = refs();
    flip(r.mr_owner.as_mut().unwrap());
    assert!(matches!(
        refused(verify(QUOTE, COLLATERAL, &r, NOW)),
        TdxError::MrOwner { .. }
    ));
    // Unpinned RTMRs are not checked.
    let mut r = refs();
    r.rtmrs = [None; 4];
    verify(QUOTE, COLLATERAL, &r, NOW).unwrap();
}

#[test]
fn report_data_must_bind_this_attestation() {
    let wrong = cinfer_attest::tdx_report_data(&[7; 32], b"someone else's key");
    let e = verify_td_quote(
        QUOTE,
        &parse_collateral(COLLATERAL).unwrap(),
        &refs(),
        NOW,
        &wrong,
    );
    assert!(matches!(e, Err(TdxError::ReportData)), "{e:?}");
    // The construction: length-prefixed nonce, so nonce and key cannot trade bytes.
    assert_ne!(
        cinfer_attest::tdx_report_data(b"ab", b"c"),
        cinfer_attest::tdx_report_data(b"a", b"bc")
    );
}

#[test]
fn the_tcb_status_must_be_an_allowed_one() {
    let mut r = refs();
    r.allowed_tcb_statuses = vec!["SWHardeningNeeded".into()];
    match refused(verify(QUOTE, COLLATERAL, &r, NOW)) {
        TdxError::TcbStatus { found, allowed, .. } => {
            assert_eq!(found, "UpToDate");
            assert_eq!(allowed, ["SWHardeningNeeded"]);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn collateral_outside_its_validity_is_refused() {
    // Past the CRLs' next update; before the TCB info was issued.
    for (now, reason) in [
        (NOW + 2, "CrlExpired"),
        (1_700_000_000, "issue date is in the future"),
    ] {
        match refused(verify(QUOTE, COLLATERAL, &refs(), now)) {
            TdxError::Refused(why) => assert!(why.contains(reason), "at {now}: {why}"),
            other => panic!("at {now}: {other}"),
        }
    }
}

#[test]
fn a_tampered_quote_is_refused() {
    // A byte of MRTD (report body at 48 + 136), of the report data, of the
    // quote signature, of the attestation key, and of the QE report.
    let body = 48;
    let quote_signed = "ISV enclave report signature is invalid";
    for (at, reason) in [
        (body + 136, quote_signed),
        (body + 520, quote_signed),
        (636 + 10, quote_signed),
        (636 + 64 + 10, "QE report hash mismatch"),
        (636 + 128 + 6 + 50, "Signature is invalid for qe_report"),
    ] {
        let mut q = QUOTE.to_vec();
        q[at] ^= 0x01;
        let collateral = parse_collateral(COLLATERAL).unwrap();
        match verify_td_quote(&q, &collateral, &refs(), NOW, &report().report_data) {
            Err(TdxError::Refused(why)) => assert!(why.contains(reason), "byte {at}: {why}"),
            other => panic!("byte {at}: {other:?}"),
        }
    }
    assert!(matches!(
        verify(&QUOTE[..600], COLLATERAL, &refs(), NOW),
        Err(TdxError::Malformed(_))
    ));
}

#[test]
fn tampered_collateral_is_refused() {
    let c: serde_json::Value = serde_json::from_slice(COLLATERAL).unwrap();
    // The TCB info and QE identity are signed JSON text: one changed character.
    for field in ["tcb_info", "qe_identity"] {
        let mut t = c.clone();
        let text = t[field]
            .as_str()
            .unwrap()
            .replacen("\"version\":", "\"version\" :", 1);
        t[field] = serde_json::Value::String(text);
        let bytes = serde_json::to_vec(&t).unwrap();
        match refused(verify(QUOTE, &bytes, &refs(), NOW)) {
            TdxError::Refused(why) => assert!(
                why.contains(&format!("Signature is invalid for {field}")),
                "{field}: {why}"
            ),
            other => panic!("{field}: {other}"),
        }
    }
    assert!(matches!(
        parse_collateral(b"{}"),
        Err(TdxError::MalformedCollateral(_))
    ));
}

#[test]
fn another_root_ca_is_refused() {
    // Any other certificate as the trust anchor: the chain no longer ends there.
    let c: serde_json::Value = serde_json::from_slice(COLLATERAL).unwrap();
    let chain = c["tcb_info_issuer_chain"].as_str().unwrap();
    let first = pem_first_der(chain);
    let mut r = refs();
    r.root_ca_der = first;
    match refused(verify(QUOTE, COLLATERAL, &r, NOW)) {
        // The root CRL, signed by Intel's root, does not verify under it.
        TdxError::Refused(why) => assert!(why.contains("root CA CRL"), "{why}"),
        other => panic!("{other}"),
    }
}

#[test]
fn an_sgx_quote_is_not_a_td_quote() {
    let e = verify(SGX_QUOTE, SGX_COLLATERAL, &refs(), NOW);
    assert!(matches!(e, Err(TdxError::NotTd)), "{e:?}");
}

/// The DER of the first certificate of a PEM chain.
fn pem_first_der(chain: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = chain
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}
