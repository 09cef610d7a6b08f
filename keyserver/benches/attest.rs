//! Full attestation and key release on loopback against a real software TPM:
//! nonce request (HTTP) + TPM quote (swtpm over TCP) + `POST /v1/attest` +
//! unwrap of the released keys, median and p90 over rounds, and each step
//! alone. Prints a markdown table; skips (exit 0) where swtpm is missing.
//!
//! `cargo bench -p cinfer-keyserver --bench attest`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use cinfer_attest::{Event, EventKind, KeyRelease, ReferenceValues, ReleasedKeyKind};
use cinfer_envelope::RequestPrivateKey;
use cinfer_tpm::Tpm;
use cinfer_tpm::swtpm::{Swtpm, SwtpmError};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const PCR: u8 = 23;
const ROUNDS: usize = 50;
/// Boot PCRs pinned and quoted beside the measured one (a VM's 0–7).
const BOOT_PCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
const QUOTED: [u8; 9] = [0, 1, 2, 3, 4, 5, 6, 7, PCR];

fn stats(mut t: Vec<Duration>) -> (Duration, Duration) {
    t.sort();
    (t[t.len() / 2], t[t.len() * 9 / 10])
}

fn row(name: &str, (median, p90): (Duration, Duration), note: &str) {
    println!(
        "| {name:<44} | {:>10.2} | {:>10.2} | {note}",
        median.as_secs_f64() * 1e3,
        p90.as_secs_f64() * 1e3
    );
}

fn main() {
    let sw = match Swtpm::start() {
        Ok(sw) => sw,
        Err(SwtpmError::NotInstalled) => {
            println!("SKIPPED: swtpm is not installed (apt-get install swtpm swtpm-tools)");
            return;
        }
        Err(e) => panic!("starting swtpm: {e}"),
    };
    let events = vec![
        Event::measure(
            PCR,
            EventKind::LoaderBinary,
            "trusted-loader",
            &[0xab; 4 << 20],
        ),
        Event::measure(
            PCR,
            EventKind::Config,
            "loader.toml",
            b"accelerator = \"cpu\"\n",
        ),
        Event::measure(PCR, EventKind::Policy, "policy.toml", b"[[program]]\n"),
        Event::measure(PCR, EventKind::TrustRoot, "trusted_root.json", b"{}"),
    ];
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    tpm.measure(PCR, &events).unwrap();
    let mut allowed: BTreeMap<EventKind, BTreeSet<[u8; 32]>> = BTreeMap::new();
    for e in &events {
        allowed.entry(e.kind).or_default().insert(e.digest);
    }
    let refs = ReferenceValues {
        trusted_aks: vec![tpm.ak_public().to_vec()],
        measured_pcr: PCR,
        events: allowed,
        // The boot PCRs pinned as a real deployment does (a VM's 0–7).
        pcrs: tpm.read_pcrs(&BOOT_PCRS).unwrap(),
        allow_resettable_pcrs_only: false,
    };

    // The keyserver runs on its own worker threads; the client (and the
    // TPM, which is not Send) on this one.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let h = rt.block_on(common::start_server(refs, |c| {
        c.max_outstanding_nonces = 100_000;
    }));

    let mut steps: [Vec<Duration>; 4] = Default::default();
    let mut total = Vec::new();
    for round in 0..ROUNDS + ROUNDS / 10 {
        let t0 = Instant::now();
        let nonce = rt.block_on(common::fresh_nonce(h.addr));
        let t1 = Instant::now();
        let loader_key = RequestPrivateKey::generate();
        let ev = tpm
            .quote(
                &QUOTED,
                &nonce,
                &loader_key.public_key().to_bytes(),
                &events,
            )
            .unwrap();
        let t2 = Instant::now();
        let (status, body) = rt.block_on(common::post(h.addr, "/v1/attest", &ev.to_json()));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let release: KeyRelease = serde_json::from_slice(&body).unwrap();
        let t3 = Instant::now();
        let (_, model) = common::unwrap_released(&release, &loader_key, ReleasedKeyKind::Model);
        let (_, request) = common::unwrap_released(&release, &loader_key, ReleasedKeyKind::Request);
        assert_eq!(model.as_slice(), common::MODEL_KEY);
        assert!(!request.is_empty());
        let t4 = Instant::now();
        if round < ROUNDS / 10 {
            continue; // warm-up
        }
        for (i, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3].into_iter().enumerate() {
            steps[i].push(d);
        }
        total.push(t4 - t0);
    }

    println!(
        "| {:<44} | median ms  | p90 ms     | note",
        format!("step ({ROUNDS} rounds, after warm-up)")
    );
    println!("|----------------------------------------------|-----------:|-----------:|------");
    let [nonce, quote, attest, unwrap] = steps;
    row("POST /v1/nonce (HTTP, loopback)", stats(nonce), "");
    row(
        "TPM2_Quote + PCR_Read (swtpm, TCP)",
        stats(quote),
        "includes HPKE keygen",
    );
    row(
        "POST /v1/attest (verify, wrap 3 keys, sign)",
        stats(attest),
        "",
    );
    row("unwrap 2 released keys (HPKE open)", stats(unwrap), "");
    let total = stats(total);
    row(
        "full attest + key release",
        total,
        if total.0 < Duration::from_millis(50) {
            "goal < 50 ms: met"
        } else {
            "goal < 50 ms: MISSED"
        },
    );
    drop(tpm);
    drop(sw);
}
