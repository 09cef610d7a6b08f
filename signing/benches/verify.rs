//! Signature verification benchmarks; prints a table.
//!
//! ```sh
//! cargo bench -p cinfer-signing --bench verify
//! ```
//! Each figure is the whole check a loader makes for one signature file: parse the bundle,
//! certificate chain to the CA at the signing time, SCT, signature over the artifact digest,
//! identity rule, and our Rekor SET + inclusion proof + checkpoint checks (keyless); the same
//! log checks plus the key for key bundles; one ECDSA verify for detached signatures.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use cinfer_signing::{IdentityRule, TrustRoot};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn fixture(rel: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/sigstore")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
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

fn main() {
    let artifact = fixture("fixtures/artifact.bin");
    let trust = TrustRoot::from_json(&fixture("fixtures/trusted_root.json")).expect("trust root");
    let rules = [IdentityRule::exact(
        "https://token.actions.githubusercontent.com",
        "https://github.com/cinfer/cinfer/.github/workflows/release.yml@refs/heads/main",
    )];
    let keyless = fixture("fixtures/artifact.sigstore.json");
    let keyless_v02 = fixture("fixtures/artifact.v02.sigstore.json");
    let key_bundle = fixture("fixtures/artifact.key.sigstore.json");
    let detached = fixture("fixtures/artifact.bin.sig");
    let public_key = fixture("fixtures/cosign.pub");

    println!("| check | median | p90 |");
    println!("|---|---|---|");
    let row = |name: &str, (m, p): (Duration, Duration)| {
        println!(
            "| {name} | {:.3} ms | {:.3} ms |",
            m.as_secs_f64() * 1e3,
            p.as_secs_f64() * 1e3
        );
    };
    row(
        "keyless bundle v0.3 (chain, SCT, signature, identity, SET, inclusion proof, checkpoint)",
        measure(400, || {
            cinfer_signing::verify_bundle(&artifact, &keyless, &trust, &rules).expect("valid");
        }),
    );
    row(
        "keyless bundle v0.2",
        measure(400, || {
            cinfer_signing::verify_bundle(&artifact, &keyless_v02, &trust, &rules).expect("valid");
        }),
    );
    row(
        "key-based bundle (key, signature, SET, inclusion proof, checkpoint)",
        measure(400, || {
            cinfer_signing::verify_key_bundle(&artifact, &key_bundle, &trust, &public_key)
                .expect("valid");
        }),
    );
    row(
        "detached key signature",
        measure(400, || {
            cinfer_signing::verify_detached(&artifact, &detached, &public_key).expect("valid");
        }),
    );
}
