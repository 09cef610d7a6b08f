//! Evidence verification benchmark; prints a table.
//!
//! ```sh
//! cargo bench -p cinfer-attest --bench verify
//! ```
#![allow(clippy::expect_used, clippy::unwrap_used)]

use cinfer_attest::fixture::{Fixture, public_bytes, test_key};
use cinfer_attest::verify::Quote;
use cinfer_attest::{Evidence, verify};
use std::hint::black_box;
use std::time::{Duration, Instant};

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

fn row(name: &str, (median, p90): (Duration, Duration)) {
    println!(
        "| {name:<36} | {:>10.1} | {:>10.1} |",
        median.as_secs_f64() * 1e6,
        p90.as_secs_f64() * 1e6
    );
}

fn main() {
    let nonce = [0x5a; 32];
    let fixture = Fixture::new(&nonce, &public_bytes(&test_key(42)));
    let evidence = fixture.evidence();
    let refs = fixture.reference_values();
    let json = evidence.to_json();
    verify(&evidence, &nonce, &refs).expect("fixture verifies");

    println!(
        "| {:<36} | {:>10} | {:>10} |",
        "operation", "median µs", "p90 µs"
    );
    println!("|{:-<38}|{:-<12}|{:-<12}|", "", "", "");
    row(
        "parse TPMS_ATTEST",
        measure(20_000, || {
            black_box(Quote::parse(black_box(&evidence.attest)).unwrap());
        }),
    );
    row(
        "Evidence::from_json",
        measure(5_000, || {
            black_box(Evidence::from_json(black_box(&json)).unwrap());
        }),
    );
    row(
        "verify (valid evidence)",
        measure(2_000, || {
            black_box(verify(black_box(&evidence), &nonce, &refs).unwrap());
        }),
    );
    row(
        "from_json + verify",
        measure(2_000, || {
            let ev = Evidence::from_json(black_box(&json)).unwrap();
            black_box(verify(&ev, &nonce, &refs).unwrap());
        }),
    );
}
