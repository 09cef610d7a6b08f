#![no_main]
// The keyserver's view of a loader's evidence: the marshalled TPMS_ATTEST and
// TPMT_SIGNATURE parsers, and the evidence JSON with the whole verifier behind it.
use std::sync::LazyLock;
// Reference values that trust one (arbitrary) key: verification runs every
// parse and check before the signature fails.
static REFS: LazyLock<cinfer_attest::ReferenceValues> = LazyLock::new(|| {
    cinfer_attest::ReferenceValues {
        trusted_aks: vec![vec![4u8; 65]],
        measured_pcr: 23,
        events: Default::default(),
        pcrs: Default::default(),
        allow_resettable_pcrs_only: true,
    }
});
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cinfer_attest::verify::Quote::parse(data);
    let _ = cinfer_attest::verify::EcdsaSignature::parse(data);
    if let Ok(e) = cinfer_attest::Evidence::from_json(data) {
        let _ = cinfer_attest::verify(&e, b"nonce", &REFS);
    }
});
