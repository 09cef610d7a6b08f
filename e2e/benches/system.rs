//! The system's cost: `llama-chat` on SmolLM2 through the whole confidential path
//! (client → inference server → loader channel → trusted loader, sealed both
//! ways, receipt verified) beside the same program and model run directly on an
//! in-process `Loader` (no server, no channel, no client), interleaved, on one
//! machine; then 8 concurrent short chats through the system.
//!
//! ```sh
//! cargo build --release --bins && cargo run --release -p build-programs
//! cargo bench -p cinfer-e2e --bench system
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_e2e::{MODEL_ID, System, chat_request, model_path, root};
use cinfer_envelope::{RequestPrivateKey, seal_request};
use cinfer_host::caps::model::ModelStore;
use cinfer_host::models::SealedGguf;
use cinfer_host::{Loader, LoaderConfig, Policy};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PROMPT: &str = "Write a short poem about the sea.";
const TOKENS: u32 = 64;
const ROUNDS: usize = 5;

/// (first-chunk latency, decode seconds per token after the first).
fn timing(start: Instant, stamps: &[Instant]) -> (Duration, f64) {
    let first = stamps[0] - start;
    let per = if stamps.len() > 1 {
        (stamps[stamps.len() - 1] - stamps[0]).as_secs_f64() / (stamps.len() - 1) as f64
    } else {
        f64::NAN
    };
    (first, per)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let system = System::start("bench");
    let client = system.direct_client();

    // The direct path: the same component, policy grant and sealed model in-process.
    let dir = std::env::temp_dir().join(format!("cinfer-bench-direct-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sealed_path = dir.join("m.sealed");
    {
        let status = std::process::Command::new(cinfer_e2e::bin("cinfer"))
            .args(["dev-model-key", "--out"])
            .arg(dir.join("k"))
            .status()
            .unwrap();
        assert!(status.success());
        let status = std::process::Command::new(cinfer_e2e::bin("cinfer"))
            .arg("seal-model")
            .arg(model_path())
            .args(["--model-id", MODEL_ID, "--key-id", "b", "--key"])
            .arg(dir.join("k"))
            .arg("--out")
            .arg(&sealed_path)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let model_key = cinfer_sealed_model::ModelKey::from_key_file(
        &std::fs::read_to_string(dir.join("k")).unwrap(),
    )
    .unwrap();
    let mut store = ModelStore::default();
    store.insert(
        MODEL_ID,
        Arc::new(
            SealedGguf::open(
                Box::new(std::fs::File::open(&sealed_path).unwrap()),
                &model_key,
            )
            .unwrap(),
        ),
    );
    let policy = Policy::load_path(&root().join("policies/dev.toml")).unwrap();
    let loader = Loader::new(
        policy,
        LoaderConfig {
            models: store,
            ..LoaderConfig::default()
        },
    )
    .unwrap();
    let program = loader
        .admit(&std::fs::read(root().join("target/programs/llama-chat.wasm")).unwrap())
        .unwrap();
    let request_key = RequestPrivateKey::generate();
    let request = chat_request(PROMPT, TOKENS);

    let direct = || {
        let (sealed, _) = seal_request(request_key.public_key(), &request).unwrap();
        let stamps = Arc::new(Mutex::new(Vec::new()));
        let s = stamps.clone();
        let start = Instant::now();
        loader
            .run(
                &program,
                &sealed,
                &request_key,
                cinfer_host::RunOptions::default()
                    .stream_to(Box::new(move |_| s.lock().unwrap().push(Instant::now()))),
            )
            .unwrap();
        let mut v = stamps.lock().unwrap().clone();
        v.pop(); // the final frame carries no token
        timing(start, &v)
    };
    let through = || {
        let mut stamps = Vec::new();
        let start = Instant::now();
        client
            .chat("llama-chat", &request, |_| stamps.push(Instant::now()))
            .unwrap();
        timing(start, &stamps)
    };
    // Warm both (weights resident, programs compiled, request key fetched).
    direct();
    through();
    let (mut d_first, mut d_tok, mut s_first, mut s_tok) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let (f, t) = direct();
        d_first.push(f.as_secs_f64() * 1e3);
        d_tok.push(t);
        let (f, t) = through();
        s_first.push(f.as_secs_f64() * 1e3);
        s_tok.push(t);
    }
    let (df, dt, sf, st) = (
        median(d_first),
        median(d_tok),
        median(s_first),
        median(s_tok),
    );
    println!(
        "| path ({TOKENS} tokens, greedy, median of {ROUNDS} interleaved rounds) | first token | decode |"
    );
    println!("|---|---:|---:|");
    println!(
        "| direct: in-process `Loader::run` (streaming sink) | {df:.1} ms | {:.1} tok/s |",
        1.0 / dt
    );
    println!(
        "| system: `cinfer-client` → inference-server → channel → trusted-loader | {sf:.1} ms | {:.1} tok/s |",
        1.0 / st
    );
    println!(
        "| system overhead | +{:.1} ms | +{:.1} % decode time per token |",
        sf - df,
        (st / dt - 1.0) * 100.0
    );

    // Throughput: 8 concurrent short chats, several waves.
    let short = chat_request("Say hi.", 8);
    let waves = 3;
    let start = Instant::now();
    for _ in 0..waves {
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    client.chat("llama-chat", &short, |_| {}).unwrap();
                });
            }
        });
    }
    let secs = start.elapsed().as_secs_f64();
    println!();
    println!(
        "8 concurrent short chats (8 new tokens each), {waves} waves: {:.2} requests/s ({:.0} ms per wave)",
        (8 * waves) as f64 / secs,
        secs * 1e3 / waves as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
