#![no_main]
use std::sync::LazyLock;
// A policy that lists no digest: everything past the preamble and digest checks
// is refused, so this exercises the preamble check. Use `admit_uncached` with a
// policy pinning the input's digest to fuzz wasmtime's component validation.
static LOADER: LazyLock<cinfer_host::Loader> = LazyLock::new(|| {
    let policy = cinfer_host::Policy::parse("worlds = \"w\"\n", |_| {
        Ok("package cinfer:policies;\nworld w { import cinfer:loader/output@0.1.0; }\n".into())
    })
    .expect("policy");
    cinfer_host::Loader::new(policy, cinfer_host::LoaderConfig::default()).expect("loader")
});
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = LOADER.admit(data);
});
