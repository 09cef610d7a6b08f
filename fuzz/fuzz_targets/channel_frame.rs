//! Frames from the untrusted side of the loader's channel, and the payload
//! decoders the loader runs on them (Submit, Program upload, request ids).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = cinfer_channel::decode(data, 1 << 20) {
        let again = cinfer_channel::encode(frame.kind, &frame.payload, 1 << 20).unwrap();
        assert_eq!(again, data[..used]);
    }
    let _ = cinfer_channel::read_frame(&mut &data[..], 1 << 20);
    if let Some(s) = cinfer_channel::Submit::decode(data) {
        assert_eq!(cinfer_channel::Submit::decode(&s.encode()), Some(s));
    }
    if let Some(p) = cinfer_channel::ProgramUpload::decode(data) {
        let again = cinfer_channel::ProgramUpload::decode(&p.encode()).expect("round trip");
        assert_eq!((again.name, again.component, again.signatures), (p.name, p.component, p.signatures));
    }
    let _ = cinfer_channel::split_request_id(data);
});
