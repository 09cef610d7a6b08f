#![no_main]
// A signature presented with a program: its kind, then full offline
// verification against the test trust root (chain, SCT, signature, SET,
// inclusion proof, checkpoint), as admission does. Since 2026-12-03 (evening)
// all of that is cinfer-signing's own code on webpki and RustCrypto.
use std::sync::LazyLock;
static TRUST: LazyLock<cinfer_signing::TrustRoot> = LazyLock::new(|| {
    cinfer_signing::TrustRoot::from_json(include_bytes!(
        "../../tests/sigstore/fixtures/trusted_root.json"
    ))
    .expect("test trust root")
});
/// The fixtures' artifact: a mutated bundle that keeps its digest reaches the
/// certificate, SCT, checkpoint and Merkle checks, not only the parsers.
const ARTIFACT: &[u8] = include_bytes!("../../tests/sigstore/fixtures/artifact.bin");
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cinfer_signing::signature_kind(data);
    let _ = cinfer_signing::verify_bundle(ARTIFACT, data, &TRUST, &[]);
    let _ = cinfer_signing::verify_logged_key_bundle(ARTIFACT, data, &TRUST);
});
