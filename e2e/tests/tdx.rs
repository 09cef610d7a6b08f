//! A loader in a (test) TD, end to end: `cinfer tdx-test-provider` plays the
//! TD's configfs-tsm quote interface and its RTMR in a directory, signing TD
//! quotes with a test PCK chain under a root CA it made (never Intel's); the
//! loader extends its event log into RTMR3 and sends a TD quote with every
//! TPM quote; the keyserver requires both kinds (`[tdx]` from `cinfer
//! measure-loader --tdx-measurements`) and releases keys only when both
//! verify. All real processes and swtpm on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_e2e::{System, chat_request};
use sha2::{Digest as _, Sha384};
use std::time::{Duration, Instant};

/// The first audit line with `outcome`, waiting for it up to 60 s.
fn audit_line(system: &System, outcome: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(line) = system
            .audit(0)
            .into_iter()
            .find(|l| l["outcome"] == outcome)
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no {outcome} line in the audit log"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_loader_in_a_td_is_served_keys_only_on_tpm_and_td_quotes_and_answers() {
    let system = System::start_tdx("tdx-up-to-date", &[]);
    system.wait_ready();
    let mut text = Vec::new();
    let r = system
        .client()
        .chat(
            "llama-chat",
            &chat_request("What is the capital of France?", 8),
            |c| text.extend_from_slice(c),
        )
        .expect("chat through a TD-attested loader");
    assert_eq!(r.receipt.outcome, "completed");
    assert!(String::from_utf8_lossy(&text).contains("Paris"), "{text:?}");
    let released = audit_line(&system, "released");
    assert_eq!(released["tdx_tcb_status"], "UpToDate");
    let mrtd: [u8; 48] = Sha384::digest(b"cinfer test TD firmware").into();
    assert_eq!(released["tdx_mrtd"], hex::encode(mrtd));
    assert_eq!(released["outcome"], "released");
}

/// A TD with DEBUG on (its memory open to the host), or on a platform whose
/// TCB is out of date, gets nothing: the keyserver refuses with the kind and
/// the check, and the server never becomes ready.
#[test]
fn a_debug_td_or_an_out_of_date_platform_gets_no_keys() {
    for (name, args, reason) in [
        (
            "tdx-debug",
            &["--debug"][..],
            "tdx: TD attributes have DEBUG or TD profiling on",
        ),
        (
            "tdx-out-of-date",
            &["--tcb", "out-of-date"][..],
            "tdx: TCB status OutOfDate is not allowed",
        ),
    ] {
        let system = System::start_tdx(name, args);
        let refused = audit_line(&system, "refused");
        let found = refused["reason"].as_str().unwrap();
        assert!(found.starts_with(reason), "{name}: {found}");
        assert!(
            !system.audit(0).iter().any(|l| l["outcome"] == "released"),
            "{name}"
        );
        let (status, body) = system.readyz();
        assert_ne!(status, 200, "{name}: {body}");
    }
}

/// A TD without a vTPM: the loader's configuration has no `tpm`, its
/// evidence carries the event log and the TD quote only, and a keyserver
/// with `evidence = ["tdx"]` releases on the TD quote (its RTMR3 replaying
/// the log, the log's digests allowed) alone.
#[test]
fn a_loader_in_a_td_without_a_tpm_is_served_on_its_td_quote_alone() {
    let system = System::start_tdx_only("tdx-only");
    system.wait_ready();
    let r = system
        .client()
        .chat("llama-chat", &chat_request("Name a colour.", 4), |_| {})
        .expect("chat through a loader attested by its TD quote alone");
    assert_eq!(r.receipt.outcome, "completed");
    let released = audit_line(&system, "released");
    assert_eq!(released["tdx_tcb_status"], "UpToDate");
    assert!(released.get("ak_fingerprint").is_none(), "{released}");
    assert!(released.get("measured_pcr_value").is_none(), "{released}");
}
