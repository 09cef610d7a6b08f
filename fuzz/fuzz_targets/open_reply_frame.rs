#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let key = cinfer_envelope::RequestPrivateKey::from_bytes(&[7u8; 32]).expect("fixed key");
    let (_, mut opener) = cinfer_envelope::seal_request(key.public_key(), b"").expect("seal");
    for frame in data.split(|b| *b == 0xff) {
        let _ = opener.open(frame);
    }
});
