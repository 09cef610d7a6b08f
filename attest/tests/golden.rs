//! The verifier against evidence from a real software TPM (see
//! `fixtures/README.md`): real marshalling, a real ECDSA signature.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

use cinfer_attest::verify::ReferenceValues;
use cinfer_attest::{Evidence, EvidenceError, verify};
use std::path::Path;

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn golden() -> (Evidence, ReferenceValues) {
    let evidence = Evidence::from_json(&fixture("swtpm-evidence.json")).unwrap();
    let refs: ReferenceValues =
        toml::from_str(std::str::from_utf8(&fixture("swtpm-reference.toml")).unwrap()).unwrap();
    refs.check().unwrap();
    (evidence, refs)
}

#[test]
fn swtpm_quote_verifies() {
    let (evidence, refs) = golden();
    let v = verify(&evidence, &evidence.nonce, &refs).unwrap();
    assert_eq!(v.measured_pcr, 23);
    assert_eq!(v.quoted_pcrs.into_iter().collect::<Vec<_>>(), [0, 7, 23]);
    assert_eq!(
        hex::encode(v.measured_value),
        "93dfeba29f32dbd2a18915e9514dbadf05b7c40f827d1ffc9a379702fe5184c3"
    );
}

#[test]
fn swtpm_quote_refusals() {
    let (evidence, refs) = golden();
    let mut bad = evidence.clone();
    bad.attest[20] ^= 1; // inside qualifiedSigner
    assert_eq!(
        verify(&bad, &evidence.nonce, &refs),
        Err(EvidenceError::BadSignature)
    );
    let mut bad = evidence.clone();
    bad.event_log.pop();
    assert_eq!(
        verify(&bad, &evidence.nonce, &refs),
        Err(EvidenceError::EventLogReplayMismatch { pcr: 23 })
    );
    assert_eq!(
        verify(&evidence, &[0; 32], &refs),
        Err(EvidenceError::NonceMismatch)
    );
}
