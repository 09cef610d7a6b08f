//! SmolLM2 benchmarks through the confidential path (sealed weights, Wasm
//! program, sealed request and reply); prints a table. Needs the model
//! (`scripts/fetch-model`) and the programs (`cargo run --release -p build-programs`):
//!
//! ```sh
//! cargo bench -p cinfer-host --bench llama
//! ```
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/common/native_llama.rs"]
mod native_llama;

use cinfer_envelope::{RequestPrivateKey, seal_request};
use cinfer_host::backend::{Backend, CpuBackend};
use cinfer_host::caps::model::{ModelSource, ModelStore};
use cinfer_host::models::SealedGguf;
use cinfer_host::{Loader, LoaderConfig, Policy, RunOutcome};
use cinfer_sealed_model::{ModelKey, seal_bytes};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model_path = std::env::var_os("CINFER_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/cinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let Ok(plain) = std::fs::read(&model_path) else {
        println!(
            "skipped: {} not found; run scripts/fetch-model",
            model_path.display()
        );
        return;
    };
    let program = std::fs::read(root.join("target/programs/llama-chat.wasm"))
        .expect("build the programs first");
    // As `cinfer seal-model` seals it: with the tokenizer image in the metadata.
    let plain = cinfer_tokenizer::embed_image(&plain).expect("tokenizer image");
    let key = ModelKey::generate().expect("key");
    let sealed = seal_bytes(&key, "smollm2-135m-instruct", "bench", 1 << 20, &plain).expect("seal");
    let size = plain.len() as f64;
    drop(plain);

    // Sealed model load: open (decrypt the GGUF header) + decrypt and parse every tensor.
    let mut load_times = Vec::new();
    for _ in 0..5 {
        let copy = Box::new(sealed.clone());
        let start = Instant::now();
        let m = SealedGguf::open(copy, &key).expect("open");
        let names: Vec<String> = m.tensor_names().into_iter().map(str::to_owned).collect();
        for n in &names {
            std::hint::black_box(m.load_tensor(n, &CpuBackend).expect("load"));
        }
        load_times.push(start.elapsed());
    }
    load_times.sort();
    let load = load_times[2];

    let sealed_model = Arc::new(SealedGguf::open(Box::new(sealed), &key).expect("open"));
    let native = native_llama::NativeLlama::new(&sealed_model);
    let mut models = ModelStore::default();
    models.insert("smollm2-135m-instruct", sealed_model);
    let worlds = std::fs::read_to_string(root.join("policies/worlds.wit")).expect("worlds");
    let toml_text = format!(
        "worlds = \"worlds.wit\"\n[[program]]\nname = \"llama-chat\"\nsha256 = \"{}\"\nworld = \"inference\"\nmodels = [\"smollm2-135m-instruct\"]\nlimits = {{ memory-bytes = 268435456, deadline-ms = 600000, accelerator-bytes = 1073741824, egress-bytes = 16777216 }}\n",
        hex::encode(cinfer_host::admission::digest(&program))
    );
    let policy = Policy::parse(&toml_text, |_| Ok(worlds.clone())).expect("policy");
    let loader = Loader::new(
        policy,
        LoaderConfig {
            models: models.clone(),
            batching: std::env::var("CINFER_BENCH_BATCHING").map_or(true, |v| v != "0"),
            ..LoaderConfig::default()
        },
    )
    .expect("loader");
    let admitted = loader.admit(&program).expect("admit");
    let rk = RequestPrivateKey::generate();
    let run = |req: String| -> Duration {
        let (s, _) = seal_request(rk.public_key(), req.as_bytes()).expect("seal");
        let r = loader
            .run(&admitted, &s, &rk, cinfer_host::RunOptions::default())
            .expect("run");
        assert_eq!(r.outcome, RunOutcome::Completed);
        r.elapsed
    };
    // 128 prompt tokens: "a" repeated with spaces tokenizes to one token per " a".
    let long_prompt = format!("a{}", " a".repeat(127));
    let req = |prompt: &str, n: u32| {
        format!(
            "{{\"prompt\": {}, \"max_tokens\": {n}, \"ignore_eos\": true, \"format\": \"ids\"}}",
            serde_json_string(prompt)
        )
    };
    let native_time = |n: usize| {
        let start = Instant::now();
        std::hint::black_box(native.generate(&[6403], n, |_| false));
        start.elapsed()
    };
    // CINFER_BENCH_OPS=P: the native forward pass of a P-token prompt (and one
    // new token), 10 times, with the wall time of each kind of launch.
    if let Some(p) = env_num::<usize>("CINFER_BENCH_OPS") {
        let prompt: Vec<u32> = (0..p.max(1)).map(|i| 6403 + (i % 7) as u32).collect();
        native.generate(&prompt, 1, |_| false);
        let mut times = native_llama::OpTimes::default();
        let start = Instant::now();
        for _ in 0..10 {
            native.generate_timed(&prompt, 1, |_| false, &mut times);
        }
        let total = start.elapsed() / 10;
        println!("native forward of a {p}-token prompt: {total:?} a pass");
        println!("| launch | per pass | share | launches per pass |");
        println!("|---|---:|---:|---:|");
        for (kind, t, count) in &times.0 {
            println!(
                "| {kind} | {:?} | {:.1} % | {} |",
                *t / 10,
                100.0 * t.as_secs_f64() / 10.0 / total.as_secs_f64(),
                count / 10
            );
        }
        return;
    }
    // CINFER_BENCH_NATIVE_ONLY=N: only N native runs of a 1-token prompt and
    // CINFER_BENCH_NEW (default 1) new tokens, then their median (to profile
    // beside CINFER_BENCH_SHORT_ONLY, the same work on the confidential path).
    if let Some(n) = env_num::<usize>("CINFER_BENCH_NATIVE_ONLY") {
        let new: usize = env_num("CINFER_BENCH_NEW").unwrap_or(1);
        let t = (0..n.max(1)).map(|_| native_time(new)).collect();
        print_median(&format!("native, 1-token prompt, {new} new token(s)"), t);
        return;
    }
    // CINFER_BENCH_SHORT_ONLY=N: only N requests of a 1-token prompt and
    // CINFER_BENCH_NEW (default 1) new tokens, then their median (for
    // profiling the per-request overhead, or decode alone).
    if let Some(n) = env_num::<usize>("CINFER_BENCH_SHORT_ONLY") {
        let new: u32 = env_num("CINFER_BENCH_NEW").unwrap_or(1);
        // CINFER_BENCH_PROMPT=P: a P-token prompt instead (prefill profiling).
        let prompt = match env_num::<usize>("CINFER_BENCH_PROMPT") {
            Some(p) if p > 1 => format!("a{}", " a".repeat(p - 1)),
            _ => "Once".to_owned(),
        };
        let t = (0..n.max(1)).map(|_| run(req(&prompt, new))).collect();
        let label = format!("{}-byte prompt, {new} new token(s)", prompt.len());
        print_median(&label, t);
        return;
    }
    // Rounds interleave the confidential and the native runs, so drift in the
    // machine's load hits both alike; each figure is the median over rounds.
    let rate = |tokens: f64, long: Duration, short: Duration| {
        tokens / long.saturating_sub(short).as_secs_f64()
    };
    let mut decode_r = Vec::new();
    let mut native_r = Vec::new();
    let mut prefill_r = Vec::new();
    let mut short_r = Vec::new();
    // CINFER_BENCH_ROUNDS: fewer rounds when a script interleaves this bench
    // with another engine's.
    let rounds: usize = env_num("CINFER_BENCH_ROUNDS").unwrap_or(7).max(1);
    for _ in 0..rounds {
        let t_short_1 = run(req("Once", 1));
        let t_decode = run(req("Once", 65));
        let (t_native_65, t_native_1) = (native_time(65), native_time(1));
        let t_prefill = run(req(&long_prompt, 1));
        eprintln!(
            "round: 1 token {t_short_1:?}, 65 new {t_decode:?}, native 65/1 {t_native_65:?}/{t_native_1:?}, 128-token prompt {t_prefill:?}"
        );
        decode_r.push(rate(64.0, t_decode, t_short_1));
        native_r.push(rate(64.0, t_native_65, t_native_1));
        prefill_r.push(rate(127.0, t_prefill, t_short_1));
        short_r.push(t_short_1);
    }
    let mid = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (decode, native_decode, prefill) =
        (mid(&mut decode_r), mid(&mut native_r), mid(&mut prefill_r));
    short_r.sort();
    let t_short_1 = short_r[short_r.len() / 2];

    println!(
        "| benchmark (SmolLM2-135M Q4_1, CPU backend, SIMD {}) | value | note",
        cinfer_host::backend::simd::level().name()
    );
    println!("|---|---:|---");
    println!(
        "| sealed model load (decrypt + parse all 272 tensors) | {:.2} GB/s | {:.0} ms for {:.1} MB, median of 5",
        size / load.as_secs_f64() / 1e9,
        load.as_secs_f64() * 1e3,
        size / 1e6
    );
    println!(
        "| request with a 1-token prompt and 1 new token | {:.0} ms | metadata + tokenizer setup in the program, resident weights, 1 step |",
        t_short_1.as_secs_f64() * 1e3
    );
    println!(
        "| decode (tg64), confidential path | {decode:.1} tok/s | (t(65 new) - t(1 new)) / 64 |"
    );
    println!(
        "| decode (tg64), same ops driven natively | {native_decode:.1} tok/s | confidential path at {:.1}% of native |",
        100.0 * decode / native_decode
    );
    println!(
        "| prompt processing (pp128) | {prefill:.1} tok/s | (t(128-token prompt) - t(1-token prompt)) / 127 |"
    );
    // The classifier gate: a 1-token request with 1 new token through
    // llama-chat gated by the shipped keyword classifier, interleaved with the
    // same request ungated; medians of 15.
    let classifier = std::fs::read(root.join("target/programs/keyword-classifier.wasm"))
        .expect("build the programs first");
    let gated_toml = format!(
        "{toml_text}classifier = \"keyword-classifier\"\n[[program]]\nname = \"keyword-classifier\"\nsha256 = \"{}\"\nworld = \"classifier\"\n",
        hex::encode(cinfer_host::admission::digest(&classifier))
    );
    let gated = Loader::new(
        Policy::parse(&gated_toml, |_| Ok(worlds.clone())).expect("gated policy"),
        LoaderConfig {
            models: models.clone(),
            ..LoaderConfig::default()
        },
    )
    .expect("loader");
    gated.admit(&classifier).expect("admit the classifier");
    let gated_chat = gated.admit(&program).expect("admit");
    let (mut plain_t, mut gated_t) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        plain_t.push(run(req("Once", 1)));
        let (s, _) = seal_request(rk.public_key(), req("Once", 1).as_bytes()).expect("seal");
        let r = gated
            .run(&gated_chat, &s, &rk, cinfer_host::RunOptions::default())
            .expect("run");
        assert_eq!(r.outcome, RunOutcome::Completed);
        gated_t.push(r.elapsed);
    }
    plain_t.sort();
    gated_t.sort();
    let (plain_ms, gated_ms) = (
        plain_t[7].as_secs_f64() * 1e3,
        gated_t[7].as_secs_f64() * 1e3,
    );
    println!(
        "| 1-token request, 1 new token, gated by keyword-classifier | {gated_ms:.2} ms | ungated: {plain_ms:.2} ms; the gate costs {:.2} ms (medians of 15) |",
        gated_ms - plain_ms
    );
    // Concurrent streams through one Loader (CINFER_BENCH_STREAMS, default
    // 8): each a 1-token prompt and 64 new tokens, all started at once;
    // aggregate tokens/s over the wall time, cross-request batching off and on.
    let streams: usize = env_num("CINFER_BENCH_STREAMS").unwrap_or(8);
    let mut aggregate = [0f64; 2];
    let mut stats = Default::default();
    for (slot, batching) in [(0usize, false), (1, true)] {
        let backend: Arc<dyn Backend> = Arc::new(CpuBackend);
        let policy = Policy::parse(&toml_text, |_| Ok(worlds.clone())).expect("policy");
        let loader = Loader::new(
            policy,
            LoaderConfig {
                models: models.clone(),
                backend,
                batching,
                ..LoaderConfig::default()
            },
        )
        .expect("loader");
        let admitted = loader.admit(&program).expect("admit");
        let one = |n: u32| {
            let (s, _) = seal_request(rk.public_key(), req("Once", n).as_bytes()).expect("seal");
            let r = loader
                .run(&admitted, &s, &rk, cinfer_host::RunOptions::default())
                .expect("run");
            assert_eq!(r.outcome, RunOutcome::Completed);
        };
        one(1);
        let mut walls = Vec::new();
        for _ in 0..rounds.min(3) {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..streams {
                    s.spawn(|| one(64));
                }
            });
            walls.push(start.elapsed());
        }
        walls.sort();
        aggregate[slot] = (streams * 64) as f64 / walls[walls.len() / 2].as_secs_f64();
        if let Some(s) = loader.batch_stats() {
            stats = s;
        }
    }
    let cinfer_host::backend::batch::BatchStats {
        rounds: batch_rounds,
        launches,
        fused,
    } = stats;
    if streams > 0 {
        println!(
            "| {streams} concurrent streams (1-token prompt, 64 new tokens each), aggregate | {:.1} tok/s | batching off; on: {:.1} tok/s ({batch_rounds} rounds carrying {launches} launches, {fused} fused) |",
            aggregate[0], aggregate[1]
        );
    }
    // One line for scripts (scripts/bench-vs-llamacpp).
    println!(
        "bench-llama: decode_tok_s={decode:.2} prefill_tok_s={prefill:.2} short_ms={:.2} native_decode_tok_s={native_decode:.2} streams={streams} aggregate_tok_s={:.2} aggregate_unbatched_tok_s={:.2}",
        t_short_1.as_secs_f64() * 1e3,
        aggregate[1],
        aggregate[0]
    );
}

/// The environment variable `name` parsed as a `T`, if set and valid.
fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Prints the median and the minimum of `t`, after `label`.
fn print_median(label: &str, mut t: Vec<Duration>) {
    t.sort();
    println!(
        "{label}: median {:?}, min {:?} of {}",
        t[t.len() / 2],
        t[0],
        t.len()
    );
}

fn serde_json_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
