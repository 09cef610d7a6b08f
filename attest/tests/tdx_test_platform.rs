//! The test TDX platform (`cinfer_attest::tdx_test`) against the verifier
//! (`cinfer_attest::tdx::verify_td_quote`, i.e. `dcap-qvl`): its quotes verify
//! under its own root with the TCB status its TCB info gives and exactly the
//! fields put in, and every part of quote and collateral is load-bearing:
//! tampering with any of it, verifying under another root, with another
//! platform's collateral or outside the collateral's validity is refused, each
//! for the reason asserted. Last, the Python `dcap-qvl` package (the same
//! verification logic, built and bound separately, with its own API) gives the
//! same verdicts on the same inputs, and on Intel's real sample quote.
#![cfg(feature = "tdx-test")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_attest::tdx::{
    TdxCollateral, TdxError, TdxReferenceValues, TdxVerdict, parse_collateral, verify_td_quote,
};
use cinfer_attest::tdx_test::{
    COLLATERAL_BACKDATE_SECS, COLLATERAL_LIFETIME_SECS, CPU_SVN, FMSPC, HEADER_LEN,
    MODULE_OUT_OF_DATE_ADVISORIES, MODULE_OUT_OF_DATE_ISVSVN, MODULE_UP_TO_DATE_ISVSVN, PCE_SVN,
    TD_ATTRIBUTES_DEBUG, TD_ATTRIBUTES_MIGRATABLE, TD_ATTRIBUTES_SEPT_VE_DISABLE,
    TD_REPORT_BODY_LEN, TdFields, TestTcb, TestTdxPlatform,
};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// 2026-01-01T00:00:00Z.
const NOW: u64 = 1_767_225_600;

// The v4 quote layout (offsets into the quote).
const BODY: usize = HEADER_LEN;
const AUTH_DATA_LEN: usize = BODY + TD_REPORT_BODY_LEN;
const SIGNATURE: usize = AUTH_DATA_LEN + 4;
const ATTESTATION_KEY: usize = SIGNATURE + 64;
const CERT_DATA_TYPE: usize = ATTESTATION_KEY + 64;
const QE_REPORT: usize = CERT_DATA_TYPE + 6;
const QE_REPORT_SIGNATURE: usize = QE_REPORT + 384;
const QE_AUTH_DATA: usize = QE_REPORT_SIGNATURE + 64 + 2;
const INNER_CERT_DATA_TYPE: usize = QE_AUTH_DATA + 32;
const PCK_CHAIN: usize = INNER_CERT_DATA_TYPE + 6;
// Offsets in the TD report body.
const TEE_TCB_SVN: usize = 0;
const TD_ATTRIBUTES: usize = 120;
const MR_TD: usize = 136;
const RTMR3: usize = 472;
const REPORT_DATA: usize = 520;

const INTEL_QUOTE: &[u8] = include_bytes!("fixtures/tdx/tdx_quote");
const INTEL_COLLATERAL: &[u8] = include_bytes!("fixtures/tdx/tdx_quote_collateral.json");
const INTEL_ROOT: &[u8] = include_bytes!("fixtures/tdx/intel-sgx-root-ca.der");
/// Inside the validity of the Intel sample's collateral (see `tests/tdx.rs`).
const INTEL_NOW: u64 = 1_752_919_234;

fn platform(tcb: TestTcb) -> TestTdxPlatform {
    TestTdxPlatform::generate(tcb, NOW).unwrap()
}

/// A TD with a distinct value in every register.
fn fields() -> TdFields {
    let register = |b: u8| [b; 48];
    TdFields {
        report_data: cinfer_attest::tdx_report_data(b"keyserver nonce", b"loader hpke key"),
        mr_td: register(0x11),
        rtmrs: [
            register(0x20),
            register(0x21),
            register(0x22),
            register(0x23),
        ],
        mr_config_id: register(0x31),
        mr_owner: register(0x32),
        mr_owner_config: register(0x33),
        ..TdFields::default()
    }
}

/// `fields()` with these TD attributes.
fn with_attributes(bits: u64) -> TdFields {
    TdFields {
        td_attributes: bits.to_le_bytes(),
        ..fields()
    }
}

/// References pinning every register of `f` under `p`'s root.
fn refs(p: &TestTdxPlatform, f: &TdFields) -> TdxReferenceValues {
    let mut r = TdxReferenceValues::new(p.root_ca_der().to_vec(), f.mr_td);
    r.rtmrs = f.rtmrs.map(Some);
    r.mr_config_id = Some(f.mr_config_id);
    r.mr_owner = Some(f.mr_owner);
    r
}

/// Verifies `quote` of `p` against references pinning `f`, at `NOW`.
fn verify(p: &TestTdxPlatform, quote: &[u8], f: &TdFields) -> Result<TdxVerdict, TdxError> {
    verify_td_quote(quote, p.collateral(), &refs(p, f), NOW, &f.report_data)
}

#[track_caller]
fn refused(r: Result<TdxVerdict, TdxError>) -> TdxError {
    match r {
        Err(e) => e,
        Ok(v) => panic!("accepted: {v:?}"),
    }
}

/// Asserts a refusal by `dcap-qvl` whose reason contains `reason`.
#[track_caller]
fn refused_because(r: Result<TdxVerdict, TdxError>, reason: &str) {
    match refused(r) {
        TdxError::Refused(why) => assert!(why.contains(reason), "want {reason:?}, got {why:?}"),
        other => panic!("want Refused({reason:?}), got {other:?}"),
    }
}

#[test]
fn a_quote_verifies_under_the_test_root_with_the_fields_put_in() {
    let p = platform(TestTcb::UpToDate);
    let f = fields();
    let quote = p.quote(&f);
    assert_eq!(
        verify(&p, &quote, &f).unwrap(),
        TdxVerdict {
            tcb_status: "UpToDate".into(),
            advisory_ids: vec![],
            mr_td: f.mr_td,
            rtmrs: f.rtmrs,
            td_attributes: f.td_attributes,
        }
    );
    assert_eq!(p.tcb(), TestTcb::UpToDate);

    // Read back with dcap-qvl's parser: a v4 TD quote of everything put in.
    let parsed = dcap_qvl::quote::Quote::parse(&quote).unwrap();
    assert_eq!(parsed.header.version, 4);
    assert_eq!(parsed.header.tee_type, 0x81);
    assert_eq!(parsed.header.attestation_key_type, 2, "ECDSA P-256");
    assert_eq!(
        parsed.report,
        dcap_qvl::quote::Report::TD10(td10_of(&f)),
        "the TD report is the fields put in"
    );
    // Certification data type 6 (QE report) holding type 5 (the PCK chain:
    // PCK certificate, PCK CA, root), where the offsets above say.
    match &parsed.auth_data {
        dcap_qvl::quote::AuthData::V4(auth) => {
            assert_eq!(auth.certification_data.cert_type, 6);
            assert_eq!(auth.qe_report_data.certification_data.cert_type, 5);
        }
        other => panic!("auth data {other:?}"),
    }
    assert_eq!(
        quote[CERT_DATA_TYPE..CERT_DATA_TYPE + 2],
        6u16.to_le_bytes()
    );
    assert_eq!(
        quote[INNER_CERT_DATA_TYPE..INNER_CERT_DATA_TYPE + 2],
        5u16.to_le_bytes()
    );
    assert!(quote[PCK_CHAIN..].starts_with(b"-----BEGIN CERTIFICATE-----"));
    let chain = dcap_qvl::intel::extract_cert_chain(&parsed).unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2], p.root_ca_der());
    // The PCK certificate's SGX extension names this platform and its TCB.
    let pck = dcap_qvl::intel::parse_pck_extension(&chain[0]).unwrap();
    assert_eq!(pck.fmspc, FMSPC);
    assert_eq!(pck.cpu_svn, CPU_SVN);
    assert_eq!(pck.pce_svn, PCE_SVN);
    assert_eq!(pck.ppid.len(), 16);

    // The collateral's JSON form parses back to the same collateral.
    assert_eq!(
        &parse_collateral(&p.collateral_json()).unwrap(),
        p.collateral()
    );
}

#[test]
fn each_platform_has_its_own_fresh_keys() {
    let (a, b) = (platform(TestTcb::UpToDate), platform(TestTcb::UpToDate));
    let f = fields();
    let (qa, qb) = (a.quote(&f), b.quote(&f));
    assert_ne!(a.root_ca_der(), b.root_ca_der());
    assert_ne!(
        a.collateral().tcb_info_signature,
        b.collateral().tcb_info_signature
    );
    assert_eq!(qa[BODY..AUTH_DATA_LEN], qb[BODY..AUTH_DATA_LEN]);
    assert_ne!(
        qa[SIGNATURE..CERT_DATA_TYPE],
        qb[SIGNATURE..CERT_DATA_TYPE],
        "signature and attestation key"
    );
    assert_ne!(qa[PCK_CHAIN..], qb[PCK_CHAIN..]);
    // Quoting is deterministic (RFC 6979 signatures).
    assert_eq!(a.quote(&f), qa);
    // A provider thread can hold one.
    fn send_sync<T: Send + Sync>() {}
    send_sync::<TestTdxPlatform>();
}

#[test]
fn the_tcb_status_is_that_of_the_tcb_level_the_platform_meets() {
    for tcb in [TestTcb::SwHardeningNeeded, TestTcb::OutOfDate] {
        let p = platform(tcb);
        let f = fields();
        let quote = p.quote(&f);
        // Refused by default reference values (`UpToDate` only)...
        match refused(verify(&p, &quote, &f)) {
            TdxError::TcbStatus {
                found,
                allowed,
                advisories,
            } => {
                assert_eq!(found, tcb.as_str());
                assert_eq!(allowed, ["UpToDate"]);
                assert_eq!(advisories, tcb.advisory_ids());
            }
            other => panic!("{tcb:?}: {other:?}"),
        }
        // ...accepted where the operator allows that status.
        let mut r = refs(&p, &f);
        r.allowed_tcb_statuses.push(tcb.as_str().into());
        let v = verify_td_quote(&quote, p.collateral(), &r, NOW, &f.report_data).unwrap();
        assert_eq!(v.tcb_status, tcb.as_str());
        assert_eq!(v.advisory_ids, tcb.advisory_ids());
    }
}

#[test]
fn the_tdx_module_is_rated_by_the_tcb_info() {
    let p = platform(TestTcb::UpToDate);
    let check = |edit: &dyn Fn(&mut TdFields)| {
        let mut f = fields();
        edit(&mut f);
        verify(&p, &p.quote(&f), &f)
    };
    // An older module ISVSVN (TEE_TCB_SVN[0]) meets the module identity's
    // `OutOfDate` level, which the platform status converges to.
    match refused(check(&|f| f.tee_tcb_svn[0] = MODULE_UP_TO_DATE_ISVSVN - 1)) {
        TdxError::TcbStatus {
            found, advisories, ..
        } => {
            assert_eq!(found, "OutOfDate");
            assert_eq!(advisories, MODULE_OUT_OF_DATE_ADVISORIES);
        }
        other => panic!("{other:?}"),
    }
    for (edit, reason) in [
        (
            &(|f: &mut TdFields| f.tee_tcb_svn[0] = MODULE_OUT_OF_DATE_ISVSVN - 1)
                as &dyn Fn(&mut TdFields),
            "TDX module ISVSVN 2 is below minimum",
        ),
        // A module version (TEE_TCB_SVN[1]) the TCB info has no identity for.
        (
            &|f| f.tee_tcb_svn[1] = 2,
            "No TDX module identity with id TDX_02",
        ),
        // A TDX component (the late microcode SVN) below every TCB level.
        (&|f| f.tee_tcb_svn[2] = 1, "No matching TCB level found"),
        // A module not signed by the signer the TCB info names.
        (&|f| f.mr_signer_seam[0] = 1, "TDX module MRSIGNER mismatch"),
        (
            &|f| f.seam_attributes[0] = 1,
            "TDX module SEAMATTRIBUTES mismatch",
        ),
    ] {
        refused_because(check(edit), reason);
    }
}

#[test]
fn td_attributes_must_be_those_of_a_production_td() {
    let p = platform(TestTcb::UpToDate);
    // DEBUG has its own reason (tdx.rs checks it after the signatures).
    let f = with_attributes(TD_ATTRIBUTES_SEPT_VE_DISABLE | TD_ATTRIBUTES_DEBUG);
    assert!(matches!(
        refused(verify(&p, &p.quote(&f), &f)),
        TdxError::Debug
    ));
    let sept = TD_ATTRIBUTES_SEPT_VE_DISABLE;
    for (bits, reason) in [
        (0, "SEPT_VE_DISABLE is not enabled"),
        (sept | TD_ATTRIBUTES_MIGRATABLE, "TD migration is enabled"),
        (sept | 1 << 17, "SERVTD_EXT is enabled"),
        (sept | 1 << 1, "Reserved bits in TD attributes are set"),
        (sept | 1 << 40, "Reserved bits in TD attributes are set"),
    ] {
        let f = with_attributes(bits);
        refused_because(verify(&p, &p.quote(&f), &f), reason);
    }
    // Defined attributes that do not open the TD are accepted: PKS (30),
    // PERFMON (63).
    for bits in [sept | 1 << 30, sept | 1 << 63] {
        let f = with_attributes(bits);
        let v = verify(&p, &p.quote(&f), &f).unwrap();
        assert_eq!(v.td_attributes, bits.to_le_bytes());
    }
}

/// TUD bits 4-6 (TD profiling, "if any of the bits in this group are set to
/// 1, the TD is untrusted") must be refused like DEBUG. `verify_td_quote` runs
/// dcap-qvl with `allow_debug(true)`, which also lifts dcap-qvl's check of
/// these bits, so it checks them itself (it once re-checked only bit 0).
#[test]
fn td_profiling_bits_are_refused() {
    let p = platform(TestTcb::UpToDate);
    for bit in 4..=6 {
        let f = with_attributes(TD_ATTRIBUTES_SEPT_VE_DISABLE | 1 << bit);
        match verify(&p, &p.quote(&f), &f) {
            Err(TdxError::Debug) => {}
            Err(TdxError::Refused(why)) if why.contains("TD profiling is enabled") => {}
            other => panic!("TUD bit {bit}: {other:?}"),
        }
    }
}

#[test]
fn pinned_registers_and_the_report_data_are_checked_with_their_own_reasons() {
    let p = platform(TestTcb::UpToDate);
    let f = fields();
    let quote = p.quote(&f);
    let check = |edit: &dyn Fn(&mut TdxReferenceValues)| {
        let mut r = refs(&p, &f);
        edit(&mut r);
        refused(verify_td_quote(
            &quote,
            p.collateral(),
            &r,
            NOW,
            &f.report_data,
        ))
    };
    assert!(matches!(check(&|r| r.mr_td[0] ^= 1), TdxError::MrTd { .. }));
    for i in 0..4 {
        match check(&|r| r.rtmrs[i].as_mut().unwrap()[47] ^= 1) {
            TdxError::Rtmr { index, found, .. } => {
                assert_eq!(index, i);
                assert_eq!(found, hex::encode(f.rtmrs[i]));
            }
            other => panic!("RTMR{i}: {other:?}"),
        }
    }
    assert!(matches!(
        check(&|r| r.mr_config_id.as_mut().unwrap()[0] ^= 1),
        TdxError::MrConfigId { .. }
    ));
    assert!(matches!(
        check(&|r| r.mr_owner.as_mut().unwrap()[0] ^= 1),
        TdxError::MrOwner { .. }
    ));
    // A quote of a TD with another MRTD, against the same references.
    let other_td = TdFields {
        mr_td: [0x99; 48],
        ..fields()
    };
    match refused(verify(&p, &p.quote(&other_td), &f)) {
        TdxError::MrTd { expected, found } => {
            assert_eq!(expected, hex::encode(f.mr_td));
            assert_eq!(found, hex::encode([0x99; 48]));
        }
        other => panic!("{other:?}"),
    }
    // Report data of another attestation.
    let other = cinfer_attest::tdx_report_data(b"another nonce", b"loader hpke key");
    assert!(matches!(
        verify_td_quote(&quote, p.collateral(), &refs(&p, &f), NOW, &other),
        Err(TdxError::ReportData)
    ));
}

#[test]
fn another_root_or_another_platforms_collateral_is_refused() {
    let (a, b) = (platform(TestTcb::UpToDate), platform(TestTcb::UpToDate));
    let f = fields();
    let quote = a.quote(&f);
    let under = |root: &[u8], collateral: &TdxCollateral| {
        let mut r = refs(&a, &f);
        r.root_ca_der = root.to_vec();
        verify_td_quote(&quote, collateral, &r, NOW, &f.report_data)
    };
    // Another root: the root CA CRL does not verify under it.
    refused_because(
        under(b.root_ca_der(), a.collateral()),
        "Failed to parse root CA CRL: InvalidCrlSignatureForPublicKey",
    );
    refused_because(
        under(INTEL_ROOT, a.collateral()),
        "Failed to parse root CA CRL: InvalidCrlSignatureForPublicKey",
    );
    refused_because(
        under(a.root_ca_der(), b.collateral()),
        "Failed to parse root CA CRL: InvalidCrlSignatureForPublicKey",
    );
    // B's collateral under B's root verifies, but A's PCK chain does not.
    refused_because(
        under(b.root_ca_der(), b.collateral()),
        "Failed to verify certificate chain: InvalidSignatureForPublicKey",
    );
    // A's collateral with B's (validly signed) TCB info: B's TCB signer does
    // not chain to A's root.
    let mut mixed = a.collateral().clone();
    mixed.tcb_info_issuer_chain = b.collateral().tcb_info_issuer_chain.clone();
    mixed.tcb_info = b.collateral().tcb_info.clone();
    mixed.tcb_info_signature = b.collateral().tcb_info_signature.clone();
    refused_because(
        under(a.root_ca_der(), &mixed),
        "Failed to verify certificate chain: InvalidSignatureForPublicKey",
    );
    // The same with B's QE identity.
    let mut mixed = a.collateral().clone();
    mixed.qe_identity_issuer_chain = b.collateral().qe_identity_issuer_chain.clone();
    mixed.qe_identity = b.collateral().qe_identity.clone();
    mixed.qe_identity_signature = b.collateral().qe_identity_signature.clone();
    refused_because(
        under(a.root_ca_der(), &mixed),
        "Failed to verify certificate chain: InvalidSignatureForPublicKey",
    );
    under(a.root_ca_der(), a.collateral()).unwrap();
}

#[test]
fn collateral_is_valid_from_its_issue_date_until_its_next_update() {
    let p = platform(TestTcb::UpToDate);
    let f = fields();
    let quote = p.quote(&f);
    let at = |now| verify_td_quote(&quote, p.collateral(), &refs(&p, &f), now, &f.report_data);
    assert_eq!(p.collateral_issued_at(), NOW - COLLATERAL_BACKDATE_SECS);
    assert_eq!(p.collateral_next_update(), NOW + COLLATERAL_LIFETIME_SECS);
    at(p.collateral_issued_at()).unwrap();
    at(p.collateral_next_update() - 1).unwrap();
    // At the next update the CRLs have expired (webpki: `now >= nextUpdate`).
    refused_because(at(p.collateral_next_update()), "CrlExpired");
    refused_because(at(NOW + 365 * 86_400), "CrlExpired");
    refused_because(
        at(p.collateral_issued_at() - 1),
        "TCBInfo issue date is in the future",
    );
    // `now` too early for collateral dates: a typed error, not a panic.
    assert!(TestTdxPlatform::generate(TestTcb::UpToDate, 60).is_err());
}

#[test]
fn a_tampered_quote_is_refused() {
    let p = platform(TestTcb::UpToDate);
    let f = fields();
    let quote = p.quote(&f);
    verify(&p, &quote, &f).unwrap();
    let signed = "ISV enclave report signature is invalid";
    for (name, at, reason) in [
        ("header: QE vendor ID", 20, "Unknown QE vendor ID"),
        ("header: user data (QE ID)", 30, signed),
        ("TD report: TEE_TCB_SVN", BODY + TEE_TCB_SVN + 2, signed),
        (
            "TD report: attributes (DEBUG)",
            BODY + TD_ATTRIBUTES,
            signed,
        ),
        ("TD report: MRTD", BODY + MR_TD + 7, signed),
        ("TD report: RTMR3", BODY + RTMR3 + 47, signed),
        ("TD report: report data", BODY + REPORT_DATA + 63, signed),
        ("quote signature", SIGNATURE + 10, signed),
        (
            "attestation key",
            ATTESTATION_KEY + 10,
            "QE report hash mismatch",
        ),
        (
            "QE report",
            QE_REPORT + 50,
            "Signature is invalid for qe_report",
        ),
        (
            "QE report signature",
            QE_REPORT_SIGNATURE + 10,
            "Signature is invalid for qe_report",
        ),
        ("QE auth data", QE_AUTH_DATA + 3, "QE report hash mismatch"),
        (
            "PCK chain: a base64 character",
            PCK_CHAIN + 40,
            "Failed to extract PCK certificates from quote",
        ),
    ] {
        let mut q = quote.clone();
        if name.contains("base64") {
            q[at] = b'!';
        } else {
            q[at] ^= 0x01;
        }
        match verify(&p, &q, &f) {
            Err(TdxError::Refused(why)) => assert!(why.contains(reason), "{name}: {why}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    // One bit of the PCK certificate's subject, under its PEM: the chain no
    // longer verifies (the PCK CA's signature does not cover it).
    let mut q = quote.clone();
    flip_pck_subject_bit(&mut q);
    refused_because(
        verify(&p, &q, &f),
        "Failed to verify certificate chain: InvalidSignatureForPublicKey",
    );
    // A quote version 5 header makes the report a v5 body: no longer parses.
    let mut q = quote.clone();
    q[0] = 5;
    assert!(matches!(verify(&p, &q, &f), Err(TdxError::Malformed(_))));
    assert!(matches!(
        verify(&p, &quote[..PCK_CHAIN + 100], &f),
        Err(TdxError::Malformed(_))
    ));
}

/// A change to collateral.
type CollateralEdit = dyn Fn(&mut TdxCollateral);

#[test]
fn tampered_collateral_is_refused() {
    // An out-of-date platform, allowed by the references: the status the
    // TCB info gives is what an attacker would change.
    let p = platform(TestTcb::OutOfDate);
    let f = fields();
    let quote = p.quote(&f);
    let mut r = refs(&p, &f);
    r.allowed_tcb_statuses.push("OutOfDate".into());
    let with = |c: &TdxCollateral| verify_td_quote(&quote, c, &r, NOW, &f.report_data);
    assert_eq!(with(p.collateral()).unwrap().tcb_status, "OutOfDate");
    fn flip_last(bytes: &mut [u8]) {
        *bytes.last_mut().unwrap() ^= 1;
    }
    let cases: [(&str, &CollateralEdit, &str); 8] = [
        (
            "TCB info: the platform's level made UpToDate",
            &|c| {
                c.tcb_info = c
                    .tcb_info
                    .replace(r#""tcbStatus":"OutOfDate""#, r#""tcbStatus":"UpToDate""#)
            },
            "Signature is invalid for tcb_info",
        ),
        (
            "TCB info signature",
            &|c| c.tcb_info_signature[5] ^= 1,
            "Signature is invalid for tcb_info",
        ),
        (
            "QE identity: ISVSVN",
            &|c| c.qe_identity = c.qe_identity.replace(r#""isvsvn":4"#, r#""isvsvn":3"#),
            "Signature is invalid for qe_identity",
        ),
        (
            "QE identity signature",
            &|c| c.qe_identity_signature[5] ^= 1,
            "Signature is invalid for qe_identity",
        ),
        (
            "root CA CRL signature",
            &|c| flip_last(&mut c.root_ca_crl),
            "Failed to parse root CA CRL: InvalidCrlSignatureForPublicKey",
        ),
        (
            "PCK CRL signature",
            &|c| flip_last(&mut c.pck_crl),
            "Failed to verify certificate chain: InvalidCrlSignatureForPublicKey",
        ),
        (
            "TCB info signed by a certificate that is not the TCB signer's",
            &|c| c.tcb_info_issuer_chain = c.pck_crl_issuer_chain.clone(),
            "Failed to verify certificate chain: CaUsedAsEndEntity",
        ),
        (
            "PCK CRL: not a CRL",
            &|c| c.pck_crl.truncate(10),
            "Failed to parse PCK CRL",
        ),
    ];
    for (name, edit, reason) in cases {
        let mut c = p.collateral().clone();
        edit(&mut c);
        assert_ne!(&c, p.collateral(), "{name}: no change");
        match with(&c) {
            Err(TdxError::Refused(why)) => assert!(why.contains(reason), "{name}: {why}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn a_revoked_pck_certificate_is_refused() {
    let mut p = platform(TestTcb::UpToDate);
    let f = fields();
    let quote = p.quote(&f);
    verify(&p, &quote, &f).unwrap();
    p.revoke_pck_certificate().unwrap();
    refused_because(
        verify(&p, &quote, &f),
        "Failed to verify certificate chain: CertRevoked",
    );
    let collateral = parse_collateral(&p.collateral_json()).unwrap();
    assert_eq!(&collateral, p.collateral());
}

/// The TD report `f` makes, as dcap-qvl's type.
fn td10_of(f: &TdFields) -> dcap_qvl::quote::TDReport10 {
    dcap_qvl::quote::TDReport10 {
        tee_tcb_svn: f.tee_tcb_svn,
        mr_seam: f.mr_seam,
        mr_signer_seam: f.mr_signer_seam,
        seam_attributes: f.seam_attributes,
        td_attributes: f.td_attributes,
        xfam: f.xfam,
        mr_td: f.mr_td,
        mr_config_id: f.mr_config_id,
        mr_owner: f.mr_owner,
        mr_owner_config: f.mr_owner_config,
        rt_mr0: f.rtmrs[0],
        rt_mr1: f.rtmrs[1],
        rt_mr2: f.rtmrs[2],
        rt_mr3: f.rtmrs[3],
        report_data: f.report_data,
    }
}

/// The fields of a TD report (the inverse of [`td10_of`]).
fn fields_of(r: &dcap_qvl::quote::TDReport10) -> TdFields {
    TdFields {
        report_data: r.report_data,
        mr_td: r.mr_td,
        rtmrs: [r.rt_mr0, r.rt_mr1, r.rt_mr2, r.rt_mr3],
        mr_config_id: r.mr_config_id,
        mr_owner: r.mr_owner,
        mr_owner_config: r.mr_owner_config,
        td_attributes: r.td_attributes,
        xfam: r.xfam,
        tee_tcb_svn: r.tee_tcb_svn,
        mr_seam: r.mr_seam,
        mr_signer_seam: r.mr_signer_seam,
        seam_attributes: r.seam_attributes,
    }
}

/// Flips one bit of the PCK certificate's subject common name inside the PEM
/// chain the quote carries, keeping base64 and DER well formed: the base64
/// character that holds the top six bits of a subject byte moves to its
/// neighbour in the alphabet, which flips bit 2 of that byte only.
fn flip_pck_subject_bit(quote: &mut [u8]) {
    use base64::Engine as _;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let begin = PCK_CHAIN + b"-----BEGIN CERTIFICATE-----".len();
    let positions: Vec<usize> = (begin..)
        .take_while(|&i| quote[i] != b'-')
        .filter(|&i| !quote[i].is_ascii_whitespace())
        .collect();
    let text: Vec<u8> = positions.iter().map(|&i| quote[i]).collect();
    let engine = &base64::engine::general_purpose::STANDARD;
    let der = engine.decode(&text).unwrap();
    let name = b"cinfer TEST SGX PCK Certificate";
    let at = der.windows(name.len()).position(|w| w == name).unwrap();
    let byte = at.div_ceil(3) * 3;
    assert!(byte + 1 < at + name.len());
    let pos = positions[byte / 3 * 4];
    let index = ALPHABET.iter().position(|&c| c == quote[pos]).unwrap();
    quote[pos] = ALPHABET[index ^ 1];
    let text: Vec<u8> = positions.iter().map(|&i| quote[i]).collect();
    let flipped = engine.decode(&text).unwrap();
    let changed: Vec<usize> = (0..der.len()).filter(|&i| der[i] != flipped[i]).collect();
    assert_eq!(changed, [byte]);
}

/// The venv's Python (`scripts/setup` installs `dcap-qvl==0.7.0` into it):
/// `$CINFER_SIGSTORE_PYTHON`, else `$CINFER_SIGSTORE_VENV/bin/python`, else
/// `~/.cache/cinfer/sigstore-venv/bin/python`.
fn venv_python() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CINFER_SIGSTORE_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let venv = std::env::var_os("CINFER_SIGSTORE_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cinfer/sigstore-venv"))
        })
        .ok_or("no HOME")?;
    let python = venv.join("bin/python");
    if python.exists() {
        Ok(python)
    } else {
        Err(format!(
            "no Python venv at {} (run scripts/setup)",
            venv.display()
        ))
    }
}

/// Verifies each case with `dcap_qvl.verify_with_root_ca` and prints one JSON
/// object: the package version and each verdict (status, advisories and the
/// TD report's fields) or refusal (the error text).
const PY_VERIFY: &str = r#"
import json, sys
cases = json.load(sys.stdin)
try:
    import dcap_qvl
    from importlib.metadata import version
except ImportError as e:
    print(json.dumps({"missing": str(e)}))
    sys.exit(0)
results = []
for case in cases:
    try:
        collateral = dcap_qvl.QuoteCollateralV3.from_json(case["collateral"])
        verdict = dcap_qvl.verify_with_root_ca(
            bytes.fromhex(case["quote"]), collateral, bytes.fromhex(case["root"]), case["now"])
        report = json.loads(verdict.to_json())["report"]
        results.append({"ok": True, "status": verdict.status,
                        "advisory_ids": list(verdict.advisory_ids), "td": report["TD10"]})
    except Exception as e:
        results.append({"ok": False, "error": str(e)})
print(json.dumps({"version": version("dcap-qvl"), "results": results}))
"#;

/// What both verifiers must say.
#[derive(Debug)]
enum Expect {
    /// Accepted by dcap-qvl with this status.
    Status(&'static str),
    /// Refused by dcap-qvl for this reason.
    Refused(&'static str),
    /// Refused for DEBUG (tdx.rs's own check; Python's dcap-qvl refuses it).
    Debug,
}

struct Case {
    name: &'static str,
    quote: Vec<u8>,
    collateral: Vec<u8>,
    root: Vec<u8>,
    now: u64,
    /// The fields the quote carries.
    fields: TdFields,
    expect: Expect,
}

impl Case {
    fn of(
        name: &'static str,
        p: &TestTdxPlatform,
        fields: TdFields,
        now: u64,
        expect: Expect,
    ) -> Self {
        Case {
            name,
            quote: p.quote(&fields),
            collateral: p.collateral_json(),
            root: p.root_ca_der().to_vec(),
            now,
            fields,
            expect,
        }
    }
}

#[test]
fn python_dcap_qvl_gives_the_same_verdicts() {
    let up = platform(TestTcb::UpToDate);
    let other = platform(TestTcb::UpToDate);
    let mut revoked = platform(TestTcb::UpToDate);
    revoked.revoke_pck_certificate().unwrap();
    let intel_fields = fields_of(
        dcap_qvl::quote::Quote::parse(INTEL_QUOTE)
            .unwrap()
            .report
            .as_td10()
            .unwrap(),
    );
    let signed = "ISV enclave report signature is invalid";
    let mut cases = vec![
        Case {
            name: "Intel's sample TD quote",
            quote: INTEL_QUOTE.to_vec(),
            collateral: INTEL_COLLATERAL.to_vec(),
            root: INTEL_ROOT.to_vec(),
            now: INTEL_NOW,
            fields: intel_fields.clone(),
            expect: Expect::Status("UpToDate"),
        },
        Case {
            name: "Intel's sample TD quote, CRLs expired",
            quote: INTEL_QUOTE.to_vec(),
            collateral: INTEL_COLLATERAL.to_vec(),
            root: INTEL_ROOT.to_vec(),
            now: INTEL_NOW + 2,
            fields: intel_fields,
            expect: Expect::Refused("CrlExpired"),
        },
        Case::of("up to date", &up, fields(), NOW, Expect::Status("UpToDate")),
        Case::of(
            "SW hardening needed",
            &platform(TestTcb::SwHardeningNeeded),
            fields(),
            NOW,
            Expect::Status("SWHardeningNeeded"),
        ),
        Case::of(
            "out of date",
            &platform(TestTcb::OutOfDate),
            fields(),
            NOW,
            Expect::Status("OutOfDate"),
        ),
        Case::of(
            "TDX module out of date",
            &up,
            TdFields {
                tee_tcb_svn: [
                    MODULE_UP_TO_DATE_ISVSVN - 1,
                    1,
                    2,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ],
                ..fields()
            },
            NOW,
            Expect::Status("OutOfDate"),
        ),
        Case::of(
            "DEBUG",
            &up,
            with_attributes(TD_ATTRIBUTES_SEPT_VE_DISABLE | TD_ATTRIBUTES_DEBUG),
            NOW,
            Expect::Debug,
        ),
        Case::of(
            "no SEPT_VE_DISABLE",
            &up,
            with_attributes(0),
            NOW,
            Expect::Refused("SEPT_VE_DISABLE is not enabled"),
        ),
        Case::of(
            "expired",
            &up,
            fields(),
            up.collateral_next_update(),
            Expect::Refused("CrlExpired"),
        ),
        Case::of(
            "not yet issued",
            &up,
            fields(),
            up.collateral_issued_at() - 1,
            Expect::Refused("TCBInfo issue date is in the future"),
        ),
        Case::of(
            "revoked PCK",
            &revoked,
            fields(),
            NOW,
            Expect::Refused("CertRevoked"),
        ),
        Case {
            root: other.root_ca_der().to_vec(),
            ..Case::of(
                "another root",
                &up,
                fields(),
                NOW,
                Expect::Refused("InvalidCrlSignatureForPublicKey"),
            )
        },
        Case {
            collateral: other.collateral_json(),
            root: other.root_ca_der().to_vec(),
            ..Case::of(
                "another platform's collateral",
                &up,
                fields(),
                NOW,
                Expect::Refused("InvalidSignatureForPublicKey"),
            )
        },
    ];
    let mut tampered = Case::of("tampered MRTD", &up, fields(), NOW, Expect::Refused(signed));
    tampered.quote[BODY + MR_TD] ^= 1;
    cases.push(tampered);
    let mut tampered = Case::of(
        "tampered TCB info",
        &up,
        fields(),
        NOW,
        Expect::Refused("Signature is invalid for tcb_info"),
    );
    let mut c = up.collateral().clone();
    c.tcb_info = c.tcb_info.replacen(r#""pcesvn":13"#, r#""pcesvn":12"#, 1);
    assert_ne!(&c, up.collateral());
    tampered.collateral = serde_json::to_vec(&c).unwrap();
    cases.push(tampered);

    // Our verdicts first: each case is what it claims to be.
    let ours: Vec<Result<TdxVerdict, TdxError>> = cases.iter().map(our_verdict).collect();
    for (case, ours) in cases.iter().zip(&ours) {
        match (&case.expect, ours) {
            (Expect::Status(status), Ok(v)) => {
                assert_eq!(v.tcb_status, *status, "{}", case.name);
                assert_eq!(v.mr_td, case.fields.mr_td, "{}", case.name);
                assert_eq!(v.rtmrs, case.fields.rtmrs, "{}", case.name);
                assert_eq!(v.td_attributes, case.fields.td_attributes, "{}", case.name);
            }
            (Expect::Refused(reason), Err(TdxError::Refused(why))) => {
                assert!(why.contains(reason), "{}: {why}", case.name)
            }
            (Expect::Debug, Err(TdxError::Debug)) => {}
            (expect, got) => panic!("{}: want {expect:?}, got {got:?}", case.name),
        }
    }

    // Then Python's.
    let python = match venv_python() {
        Ok(p) => p,
        Err(why) => return skip_or_fail(&why),
    };
    let input = serde_json::Value::Array(
        cases
            .iter()
            .map(|c| {
                serde_json::json!({
                    "quote": hex::encode(&c.quote),
                    "collateral": String::from_utf8(c.collateral.clone()).unwrap(),
                    "root": hex::encode(&c.root),
                    "now": c.now,
                })
            })
            .collect(),
    );
    let output = run_python(&python, &serde_json::to_vec(&input).unwrap());
    if let Some(missing) = output.get("missing") {
        return skip_or_fail(&format!(
            "{} has no dcap_qvl package ({missing}; run scripts/setup)",
            python.display()
        ));
    }
    let results = output["results"].as_array().unwrap();
    assert_eq!(results.len(), cases.len());
    for ((case, ours), py) in cases.iter().zip(&ours).zip(results) {
        let name = case.name;
        match &case.expect {
            Expect::Status(status) => {
                assert_eq!(py["ok"], true, "{name}: Python refused: {py}");
                assert_eq!(py["status"], *status, "{name}");
                let ours = ours.as_ref().unwrap();
                assert_eq!(
                    py["advisory_ids"],
                    serde_json::json!(ours.advisory_ids),
                    "{name}"
                );
                let td = &py["td"];
                let f = &case.fields;
                let hex_field = |key: &str| td[key].as_str().unwrap().to_owned();
                assert_eq!(hex_field("mr_td"), hex::encode(ours.mr_td), "{name}");
                for (i, rtmr) in ours.rtmrs.iter().enumerate() {
                    assert_eq!(hex_field(&format!("rt_mr{i}")), hex::encode(rtmr), "{name}");
                }
                assert_eq!(
                    hex_field("td_attributes"),
                    hex::encode(ours.td_attributes),
                    "{name}"
                );
                for (key, value) in [
                    ("report_data", &f.report_data[..]),
                    ("mr_config_id", &f.mr_config_id),
                    ("mr_owner", &f.mr_owner),
                    ("mr_owner_config", &f.mr_owner_config),
                    ("xfam", &f.xfam),
                    ("tee_tcb_svn", &f.tee_tcb_svn),
                    ("mr_seam", &f.mr_seam),
                    ("mr_signer_seam", &f.mr_signer_seam),
                    ("seam_attributes", &f.seam_attributes),
                ] {
                    assert_eq!(hex_field(key), hex::encode(value), "{name}: {key}");
                }
            }
            Expect::Refused(reason) => {
                assert_eq!(py["ok"], false, "{name}: Python accepted: {py}");
                let error = py["error"].as_str().unwrap();
                assert!(error.contains(reason), "{name}: Python: {error}");
            }
            Expect::Debug => {
                assert_eq!(py["ok"], false, "{name}: Python accepted: {py}");
                let error = py["error"].as_str().unwrap();
                assert!(
                    error.contains("Debug mode is enabled"),
                    "{name}: Python: {error}"
                );
            }
        }
    }
    println!(
        "Python dcap-qvl {} agrees on {} verdicts",
        output["version"],
        cases.len()
    );
}

/// Our verdict on a case: references pinning the quote's own registers, every
/// status of the cases allowed, the quote's own report data.
fn our_verdict(case: &Case) -> Result<TdxVerdict, TdxError> {
    let f = &case.fields;
    let mut r = TdxReferenceValues::new(case.root.clone(), f.mr_td);
    r.rtmrs = f.rtmrs.map(Some);
    r.mr_config_id = Some(f.mr_config_id);
    r.mr_owner = Some(f.mr_owner);
    r.allowed_tcb_statuses = ["UpToDate", "SWHardeningNeeded", "OutOfDate"]
        .map(String::from)
        .to_vec();
    let collateral = parse_collateral(&case.collateral)?;
    verify_td_quote(&case.quote, &collateral, &r, case.now, &f.report_data)
}

fn run_python(python: &PathBuf, input: &[u8]) -> serde_json::Value {
    let mut child = Command::new(python)
        .args(["-c", PY_VERIFY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "Python's output is not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A missing tool skips the cross-check (saying why), except under CI.
fn skip_or_fail(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{why}");
    println!("skipped: {why}");
}
