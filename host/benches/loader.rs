//! Loader benchmarks; prints a table. Run after building the programs:
//!
//! ```sh
//! cargo run --release -p build-programs && cargo bench -p cinfer-host --bench loader
//! ```
#![allow(clippy::expect_used, clippy::unwrap_used)]

use cinfer_envelope::{RequestPrivateKey, open_request, seal_request};
use cinfer_host::{Loader, LoaderConfig, Policy, RunOutcome};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn program(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/programs")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run cargo run --release -p build-programs",
            path.display()
        )
    })
}

/// Median and 90th percentile of `iters` timed calls (after `iters / 10` warm-ups).
fn measure(iters: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..iters / 10 {
        f();
    }
    let mut t: Vec<Duration> = (0..iters)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    (t[t.len() / 2], t[t.len() * 9 / 10])
}

fn row(name: &str, (median, p90): (Duration, Duration), note: &str) {
    println!(
        "| {name:<44} | {:>10.2} | {:>10.2} | {note}",
        median.as_secs_f64() * 1e6,
        p90.as_secs_f64() * 1e6
    );
}

fn main() {
    let echo = program("echo");
    let op_loop = program("op-loop");
    let worlds = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/worlds.wit"),
    )
    .expect("worlds");
    let toml_text = format!(
        "worlds = \"worlds.wit\"\n[[program]]\nname = \"echo\"\nsha256 = \"{}\"\nworld = \"request-reply\"\n[[program]]\nname = \"op-loop\"\nsha256 = \"{}\"\nworld = \"compute\"\n",
        hex::encode(cinfer_host::admission::digest(&echo)),
        hex::encode(cinfer_host::admission::digest(&op_loop)),
    );
    let policy = Policy::parse(&toml_text, |_| Ok(worlds.clone())).expect("policy");
    let loader = Loader::new(policy, LoaderConfig::default()).expect("loader");
    let key = RequestPrivateKey::generate();
    let msg = vec![b'x'; 256];

    println!("| benchmark                                    | median µs  | p90 µs     | note");
    println!("|----------------------------------------------|-----------:|-----------:|-----");

    row(
        "cold compile + admit `echo` (no cache)",
        measure(20, || {
            loader.admit_uncached(&echo).expect("admit");
        }),
        &format!("{} B component", echo.len()),
    );

    // Admission of a signed program a second time: same bytes, same bundle.
    let sigstore = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/sigstore");
    let signed_policy = Policy::load_path(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/signed-dev.toml"),
    )
    .expect("signed-dev policy");
    let signed_loader = Loader::new(signed_policy, LoaderConfig::default()).expect("loader");
    let bundle = std::fs::read(sigstore.join("programs/echo.wasm.sigstore.json")).expect("bundle");
    signed_loader
        .admit_signed(&echo, &bundle)
        .expect("signed echo");
    row(
        "signed `echo` admitted again (cached)",
        measure(2000, || {
            signed_loader
                .admit_signed(&echo, &bundle)
                .expect("signed echo");
        }),
        "SHA-256 of bytes + bundle, no re-verification (cold: cargo bench -p cinfer-signing)",
    );

    let admitted = loader.admit(&echo).expect("admit");
    let (sealed, _) = seal_request(key.public_key(), &msg).expect("seal");

    // Instantiate + run, without the HPKE open: the run's own clock
    // (`RunReport::elapsed` starts after the envelope opened and ends when
    // `run` returns, before the final frame is sealed).
    let mut inner = Vec::with_capacity(2000);
    for i in 0..2200 {
        let report = loader
            .run(&admitted, &sealed, &key, cinfer_host::RunOptions::default())
            .expect("run");
        let d = report.elapsed;
        assert_eq!(report.outcome, RunOutcome::Completed);
        if i >= 200 {
            inner.push(d);
        }
    }
    inner.sort();
    row(
        "instantiate + `echo` run (`RunReport::elapsed`)",
        (inner[inner.len() / 2], inner[inner.len() * 9 / 10]),
        "256 B request, goal: median < 50 µs",
    );

    row(
        "HPKE seal request (client)",
        measure(500, || {
            std::hint::black_box(seal_request(key.public_key(), &msg).expect("seal"));
        }),
        "DHKEM(P-256) encap + AES-256-GCM, pure Rust",
    );
    row(
        "HPKE open request (loader)",
        measure(500, || {
            std::hint::black_box(open_request(&key, &sealed).expect("open"));
        }),
        "DHKEM(P-256) decap + AES-256-GCM, pure Rust",
    );
    row(
        "full sealed round trip (`Loader::run`)",
        measure(500, || {
            let report = loader
                .run(&admitted, &sealed, &key, cinfer_host::RunOptions::default())
                .expect("run");
            assert_eq!(report.outcome, RunOutcome::Completed);
        }),
        "HPKE open + instantiate + run + seal",
    );

    // Accelerator op launch overhead: N tiny adds minus zero adds.
    let ops = loader.admit(&op_loop).expect("admit op-loop");
    let (loader, key, ops) = (&loader, &key, &ops);
    let run_n = |n: u32| {
        let (s, _) = seal_request(key.public_key(), n.to_string().as_bytes()).expect("seal");
        move || {
            let r = loader
                .run(ops, &s, key, cinfer_host::RunOptions::default())
                .expect("run");
            assert_eq!(r.outcome, RunOutcome::Completed);
        }
    };
    let base = measure(100, run_n(0)).0;
    let many = measure(20, run_n(10_000)).0;
    let per_launch = many.saturating_sub(base) / 10_000;
    row(
        "accelerator op launch (`add` on [1], host call)",
        (per_launch, per_launch),
        "(median(10000 launches) - median(0)) / 10000",
    );
}
