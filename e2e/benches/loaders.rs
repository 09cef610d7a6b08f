//! 16 concurrent streaming chats through the OpenAI-compatible proxy
//! (`cinfer proxy` → inference server → trusted loaders), with one loader
//! and with two (`loaders = [...]`, each its own process, swtpm and
//! attestation): every chat must complete (none refused while the server's
//! queue has room: `max-in-flight` 8 per loader, `max-queued` 64), time to
//! first token (first content chunk) p50/p99, and aggregate tokens/s.
//!
//! ```sh
//! cargo build --release --bins && cargo run --release -p build-programs
//! cargo bench -p cinfer-e2e --bench loaders
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_e2e::{System, start_proxy};
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

const STREAMS: usize = 16;
const TOKENS: u32 = 32;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One streaming chat: (time to the first content chunk, content chunks).
fn stream_chat(base: &str, i: usize) -> (Duration, usize) {
    let body = serde_json::json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": format!("Tell me a fact about the number {i}.")}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": true,
    });
    let start = Instant::now();
    let resp = ureq::post(&format!("{base}/chat/completions"))
        .header("content-type", "application/json")
        .send(serde_json::to_vec(&body).unwrap())
        .unwrap_or_else(|e| panic!("stream {i}: {e}"));
    assert_eq!(resp.status(), 200, "stream {i}");
    let mut first = None;
    let mut chunks = 0;
    let mut done = false;
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "stream {i}: {v}");
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            first.get_or_insert_with(|| start.elapsed());
            chunks += 1;
        }
    }
    assert!(done, "stream {i} ended without [DONE]");
    (first.expect("a content chunk"), chunks)
}

fn run(loaders: usize) {
    let system = System::start_loaders(&format!("bench-loaders-{loaders}"), loaders);
    let (_proxy, _, base) = start_proxy(
        &format!("http://{}", system.server_direct),
        &system.proxy_pins(),
    );
    stream_chat(&base, 0); // warm-up: request key, weights resident
    let start = Instant::now();
    let results: Vec<(Duration, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..STREAMS)
            .map(|i| {
                let base = base.clone();
                s.spawn(move || stream_chat(&base, i))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut ttft: Vec<f64> = results.iter().map(|r| r.0.as_secs_f64() * 1e3).collect();
    let chunks: usize = results.iter().map(|r| r.1).sum();
    println!(
        "| {loaders} | {}/{STREAMS} | {:.0} ms | {:.0} ms | {:.1} | {:.1} s |",
        results.len(),
        percentile(&mut ttft, 0.5),
        percentile(&mut ttft, 0.99),
        chunks as f64 / secs,
        secs
    );
}

fn main() {
    println!(
        "| loaders | completed | time to first token p50 | p99 | aggregate content chunks/s | wall |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for loaders in [1, 2] {
        run(loaders);
    }
}
