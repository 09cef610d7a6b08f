#![no_main]
// A tokenizer image (`cinfer.tokenizer.image` in a sealed model's metadata):
// refused, or a tokenizer that encodes and decodes without panicking.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(t) = cinfer_tokenizer::Tokenizer::from_image(data) {
        for text in ["hello world", "<|im_start|>user\nhi<|im_end|>", "日本語 😀 123"] {
            let ids = t.encode(text, true);
            let _ = t.decode(&ids, true);
        }
        for id in 0..t.n_vocab().min(64) as u32 {
            let _ = (t.token_text(id), t.token_bytes(id, true), t.is_eog(id));
        }
    }
    // And as GGUF metadata that may carry an image.
    let _ = cinfer_tokenizer::Tokenizer::from_gguf_bytes(data);
});
