//! Frames from the untrusted side of the loader's channel.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = cinfer_channel::decode(data, 1 << 20) {
        let again = cinfer_channel::encode(frame.kind, &frame.payload, 1 << 20).unwrap();
        assert_eq!(again, data[..used]);
    }
    let _ = cinfer_channel::read_frame(&mut &data[..], 1 << 20);
});
