#![no_main]
// GGUF metadata as a program or the loader reads it: the parse, every array's
// items, the key spans and a metadata subset (what metadata-keys serves).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(g) = cinfer_gguf::parse_metadata(data) {
        for (_, v) in &g.kv {
            if let cinfer_gguf::Value::Array(a) = v {
                let _ = a.strings();
                let _ = a.as_bytes();
                for item in a.iter().take(1000) {
                    let _ = item.as_u64();
                }
            }
        }
    }
    let _ = cinfer_gguf::kv_spans(data);
    let _ = cinfer_gguf::write::metadata_subset(data, |k| k.starts_with("general."));
    let _ = cinfer_gguf::parse(data);
});
