#![no_main]
use std::sync::LazyLock;
static KEY: LazyLock<cinfer_envelope::RequestPrivateKey> = LazyLock::new(cinfer_envelope::RequestPrivateKey::generate);
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cinfer_envelope::open_request(&KEY, data);
});
