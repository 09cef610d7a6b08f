#![no_main]
// A signature presented with a program: its kind, then full offline
// verification against the test trust root (chain, SCT, signature, SET,
// inclusion proof, checkpoint), as admission does.
use std::sync::LazyLock;
static TRUST: LazyLock<cinfer_signing::TrustRoot> = LazyLock::new(|| {
    cinfer_signing::TrustRoot::from_json(include_bytes!(
        "../../tests/sigstore/fixtures/trusted_root.json"
    ))
    .expect("test trust root")
});
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cinfer_signing::signature_kind(data);
    let _ = cinfer_signing::verify_bundle(b"artifact", data, &TRUST, &[]);
    let _ = cinfer_signing::verify_logged_key_bundle(b"artifact", data, &TRUST);
});
