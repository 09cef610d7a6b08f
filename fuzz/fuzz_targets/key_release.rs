#![no_main]
// A key release and a signed request-key statement as the loader and clients
// receive them from a keyserver (JSON, then the signature check).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<cinfer_attest::KeyRelease>(data) {
        let _ = r.verify(&[vec![4u8; 65]]);
    }
    if let Ok(s) = serde_json::from_slice::<cinfer_attest::SignedReceipt>(data) {
        let _ = s.verify(&[4u8; 65]);
    }
});
