#![no_main]
// The keyserver's view of a loader's endorsement: the TPMT_PUBLIC parser, and
// the endorsement JSON with the whole check behind it (certificate parsing and
// chain to the golden local CA, EK and AK area comparison).
use cinfer_keyserver::endorsement::{self, EkTrust, tpm_public::TpmPublic};
use std::sync::LazyLock;
static TRUST: LazyLock<EkTrust> = LazyLock::new(|| {
    let pem = |p: &str| endorsement::certificates_from_pem(p).unwrap_or_default();
    EkTrust::new(
        &pem(include_str!("../../keyserver/tests/fixtures/endorsement/root.pem")),
        &pem(include_str!("../../keyserver/tests/fixtures/endorsement/intermediate.pem")),
    )
    .unwrap_or_default()
});
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = TpmPublic::parse(data);
    if let Ok(e) = serde_json::from_slice::<cinfer_attest::Endorsement>(data) {
        let _ = endorsement::verify(&e, &[4; 65], &TRUST, 1_800_000_000);
    }
});
