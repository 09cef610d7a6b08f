//! Integration tests of the trusted loader on real components: the programs
//! and negative fixtures built by `cargo run --release -p build-programs`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::type_complexity)]

use cinfer_envelope::{EnvelopeError, ReplyStatus, RequestPrivateKey, seal_request};
use cinfer_host::admission::SignatureRefusal;
use cinfer_host::caps::PolicyViolation;
use cinfer_host::caps::model::{ModelSource, ModelStore};
use cinfer_host::{
    AbortReason, AdmissionError, Capability, Loader, LoaderConfig, Policy, PolicyError,
    RequestError, RunOutcome, Verdict,
};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod llama;
#[path = "common/native_llama.rs"]
mod native_llama;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Bytes of a built program, e.g. `echo` or `fixtures/memory-bomb`.
fn program(name: &str) -> Vec<u8> {
    let path = root().join("target/programs").join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Build the programs first: cargo run --release -p build-programs",
            path.display()
        )
    })
}

fn hex_digest(bytes: &[u8]) -> String {
    hex::encode(cinfer_host::admission::digest(bytes))
}

fn worlds() -> String {
    std::fs::read_to_string(root().join("policies/worlds.wit")).expect("policies/worlds.wit")
}

/// A policy with one entry per (program, world, extra TOML) triple.
fn policy_for(entries: &[(&str, &str, &str)]) -> Policy {
    let mut toml_text = String::from("worlds = \"worlds.wit\"\n[limits]\ndeadline-ms = 300\n");
    for (name, world, extra) in entries {
        toml_text.push_str(&format!(
            "[[program]]\nname = \"{name}\"\nsha256 = \"{}\"\nworld = \"{world}\"\n{extra}\n",
            hex_digest(&program(name))
        ));
    }
    Policy::parse(&toml_text, |_| Ok(worlds())).expect("test policy")
}

fn loader(policy: Policy) -> Loader {
    loader_with(policy, ModelStore::default())
}

/// A loader serving `models` (default configuration: batching on).
fn loader_with(policy: Policy, models: ModelStore) -> Loader {
    loader_configured(policy, models, true)
}

/// A loader serving `models`, cross-request batching on or off.
fn loader_configured(policy: Policy, models: ModelStore, batching: bool) -> Loader {
    Loader::new(
        policy,
        LoaderConfig {
            models,
            batching,
            ..LoaderConfig::default()
        },
    )
    .expect("loader")
}

/// Seals `msg`, runs it, opens the reply.
fn round_trip(
    loader: &Loader,
    name: &str,
    key: &RequestPrivateKey,
    msg: &[u8],
) -> (
    RunOutcome,
    Result<(Vec<u8>, ReplyStatus), EnvelopeError>,
    Vec<Vec<u8>>,
) {
    let admitted = loader.admit(&program(name)).expect("admitted");
    let (sealed, opener) = seal_request(key.public_key(), msg).expect("seal");
    let report = loader
        .run(&admitted, &sealed, key, cinfer_host::RunOptions::default())
        .expect("run");
    let opened = opener
        .open_all(report.frames.iter().map(Vec::as_slice))
        .map(|(r, s)| (r.to_vec(), s));
    (report.outcome, opened, report.frames)
}

#[test]
fn committed_policies_admit_the_built_programs() {
    let dev = Policy::load_path(&root().join("policies/dev.toml")).expect("policies/dev.toml");
    let names: Vec<String> = dev.programs().iter().map(|g| g.name.clone()).collect();
    assert!(names.len() >= 3, "dev.toml lists {names:?}");
    let l = loader(dev);
    for name in &names {
        let p = l.admit(&program(name)).unwrap_or_else(|e| {
            panic!("{name} refused by policies/dev.toml: {e} (digests stale? run: cargo run --release -p build-programs -- --update-policies)")
        });
        assert_eq!(&p.grant().name, name);
    }
    let echo = l.admit(&program("echo")).expect("echo");
    assert!(!echo.grant().capabilities.contains(Capability::Accelerator));
    assert!(!echo.grant().capabilities.contains(Capability::Model));
    // The fixtures policy must list every fixture (its digests are in sync too).
    let fixtures =
        Policy::load_path(&root().join("policies/fixtures.toml")).expect("fixtures.toml");
    for name in [
        "infinite-loop",
        "memory-bomb",
        "deep-recursion",
        "egress-bomb",
        "handle-bomb",
        "model-user",
        "wasi-filesystem",
    ] {
        let digest = cinfer_host::admission::digest(&program(&format!("fixtures/{name}")));
        assert!(
            fixtures.grant_for(&digest).is_some(),
            "{name} not pinned in policies/fixtures.toml"
        );
    }
}

#[test]
fn echo_round_trips_through_the_sealed_path() {
    let l = loader(policy_for(&[("echo", "request-reply", "")]));
    let key = RequestPrivateKey::generate();
    let msg = b"the quick brown fox asks a confidential question";
    let (outcome, opened, frames) = round_trip(&l, "echo", &key, msg);
    assert_eq!(outcome, RunOutcome::Completed);
    let (reply, status) = opened.expect("reply opens");
    assert_eq!(reply, msg);
    assert_eq!(status, ReplyStatus::Completed);
    for f in &frames {
        assert!(
            !f.windows(5).any(|w| w == b"quick"),
            "cleartext in a sealed frame"
        );
    }
    // Empty requests are fine too.
    let (outcome, opened, _) = round_trip(&l, "echo", &key, b"");
    assert_eq!(outcome, RunOutcome::Completed);
    assert_eq!(opened.expect("reply").0, b"");
}

/// Reference for programs/vector-ops (same deterministic weights, naive loops).
fn vector_ops_reference(x: &[f32]) -> (Vec<f32>, Vec<f32>, usize) {
    fn weights(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }
    let d = x.len();
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + 1e-6).sqrt();
    let xn: Vec<f32> = x.iter().map(|v| v / rms).collect();
    let (w1, b1, w2) = (weights(16 * d, 1), weights(16, 2), weights(4 * 16, 3));
    let h: Vec<f32> = (0..16)
        .map(|j| {
            let z = (0..d).map(|i| xn[i] * w1[j * d + i]).sum::<f32>() + b1[j];
            z / (1.0 + (-z).exp())
        })
        .collect();
    let logits: Vec<f32> = (0..4)
        .map(|j| (0..16).map(|i| h[i] * w2[j * 16 + i]).sum())
        .collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let s: f32 = e.iter().sum();
    let p: Vec<f32> = e.iter().map(|v| v / s).collect();
    let best = (0..4).fold(0, |b, i| if p[i] > p[b] { i } else { b });
    (h, p, best)
}

fn parse_row(line: &str, label: &str) -> Vec<f32> {
    line.strip_prefix(label)
        .unwrap_or_else(|| panic!("expected `{label}` in {line:?}"))
        .split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect()
}

#[test]
fn vector_ops_runs_an_mlp_on_the_accelerator() {
    let l = loader(policy_for(&[("vector-ops", "compute", "")]));
    let key = RequestPrivateKey::generate();
    for input in [vec![1.0f32, 2.0, 3.0, 4.0], vec![-0.5; 64], vec![7.25]] {
        let text: Vec<String> = input.iter().map(|v| v.to_string()).collect();
        let (outcome, opened, _) = round_trip(&l, "vector-ops", &key, text.join(" ").as_bytes());
        assert_eq!(outcome, RunOutcome::Completed);
        let reply = String::from_utf8(opened.expect("reply").0).expect("utf-8");
        let lines: Vec<&str> = reply.lines().collect();
        let (h, p, best) = vector_ops_reference(&input);
        for (got, want) in parse_row(lines[0], "hidden")
            .iter()
            .zip(&h)
            .chain(parse_row(lines[1], "probs").iter().zip(&p))
        {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        assert_eq!(lines[2], format!("argmax {best}"));
    }
    // A malformed request: the program fails, telling the requester why (sealed).
    let (outcome, opened, _) = round_trip(&l, "vector-ops", &key, b"not numbers");
    assert_eq!(outcome, RunOutcome::ProgramFailed);
    let (reply, status) = opened.expect("reply");
    assert_eq!(status, ReplyStatus::ProgramFailed);
    assert!(String::from_utf8_lossy(&reply).starts_with("error:"));
}

#[test]
fn admission_refusals_name_the_reason() {
    let l = loader(policy_for(&[
        ("fixtures/wasi-filesystem", "inference", ""),
        ("fixtures/model-user", "request-reply", ""),
        ("vector-ops", "request-reply", ""),
        ("fixtures/mistyped-import", "request-reply", ""),
        ("fixtures/no-run-export", "request-reply", ""),
        ("fixtures/mistyped-run", "request-reply", ""),
        ("fixtures/truncated-component", "request-reply", ""),
        ("fixtures/bare-function-import", "request-reply", ""),
    ]));
    let refuse = |name: &str| l.admit(&program(name)).expect_err(name);

    assert_eq!(refuse("fixtures/not-wasm"), AdmissionError::NotWasm);
    assert_eq!(refuse("fixtures/core-module"), AdmissionError::CoreModule);
    assert!(matches!(
        refuse("fixtures/truncated-component"),
        AdmissionError::InvalidComponent { .. }
    ));
    assert!(matches!(
        refuse("fixtures/wasi-filesystem"),
        AdmissionError::ImportNotGranted { ref import, .. } if import == "wasi:filesystem/types@0.2.0"
    ));
    assert!(matches!(
        refuse("fixtures/model-user"),
        AdmissionError::ImportNotGranted { ref import, .. } if import == "cinfer:loader/model@0.1.0"
    ));
    // vector-ops needs the accelerator; under request-reply it is refused.
    assert!(matches!(
        refuse("vector-ops"),
        AdmissionError::ImportNotGranted { ref import, ref world, .. }
            if import == "cinfer:loader/accelerator@0.1.0" && world == "request-reply"
    ));
    assert!(matches!(
        refuse("fixtures/mistyped-import"),
        AdmissionError::ImportMismatch { ref reason } if reason.contains("emit")
    ));
    // A granted interface imported as a bare function: granted, but misshapen.
    assert_eq!(
        refuse("fixtures/bare-function-import"),
        AdmissionError::ImportMismatch {
            reason: "`cinfer:loader/output@0.1.0` is imported as a function, not as an instance of the interface".into()
        }
    );
    assert_eq!(refuse("fixtures/no-run-export"), AdmissionError::MissingRun);
    assert!(matches!(
        refuse("fixtures/mistyped-run"),
        AdmissionError::MistypedRun { .. }
    ));
    // Not in the policy at all.
    assert!(
        matches!(refuse("echo"), AdmissionError::UnknownDigest { ref digest } if *digest == hex_digest(&program("echo")))
    );
    // One changed byte is another program.
    let mut tampered = program("fixtures/no-run-export");
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(matches!(
        l.admit(&tampered),
        Err(AdmissionError::UnknownDigest { .. })
    ));
}

#[test]
fn runtime_violations_are_trapped_and_the_engine_runs_the_next_program() {
    let l = loader(policy_for(&[
        ("fixtures/infinite-loop", "request-reply", ""),
        (
            "fixtures/memory-bomb",
            "request-reply",
            "limits = { memory-bytes = 8388608 }",
        ),
        ("fixtures/deep-recursion", "request-reply", ""),
        ("fixtures/unreachable-trap", "request-reply", ""),
        (
            "fixtures/egress-bomb",
            "request-reply",
            "limits = { egress-bytes = 100000 }",
        ),
        ("fixtures/bad-emit-pointer", "request-reply", ""),
        ("fixtures/table-bomb", "request-reply", ""),
        ("echo", "request-reply", ""),
    ]));
    let key = RequestPrivateKey::generate();
    let cases: [(&str, AbortReason); 7] = [
        (
            "fixtures/infinite-loop",
            AbortReason::Deadline(Duration::from_millis(300)),
        ),
        (
            "fixtures/memory-bomb",
            AbortReason::Policy(PolicyViolation::MemoryLimit { limit: 8 << 20 }),
        ),
        ("fixtures/deep-recursion", AbortReason::StackExhausted),
        (
            "fixtures/unreachable-trap",
            AbortReason::Trap(wasmtime::Trap::UnreachableCodeReached),
        ),
        (
            "fixtures/egress-bomb",
            AbortReason::Policy(PolicyViolation::EgressBudget { budget: 100_000 }),
        ),
        (
            "fixtures/bad-emit-pointer",
            AbortReason::Interface("list pointer/length out of bounds of memory".into()),
        ),
        (
            "fixtures/table-bomb",
            AbortReason::Policy(PolicyViolation::TableLimit { limit: 20_000 }),
        ),
    ];
    for (name, want) in cases {
        let (outcome, opened, _) = round_trip(&l, name, &key, b"payload");
        assert_eq!(outcome, RunOutcome::Aborted(want), "{name}");
        // The requester learns, authenticated, that the run was aborted.
        let (_, status) = opened.expect("reply of an aborted run still opens");
        assert_eq!(status, ReplyStatus::Aborted, "{name}");
        // The same engine runs a good program normally right after.
        let (outcome, opened, _) = round_trip(&l, "echo", &key, b"still alive");
        assert_eq!(outcome, RunOutcome::Completed, "echo after {name}");
        assert_eq!(opened.expect("echo reply").0, b"still alive");
    }
}

#[test]
fn deadline_stops_a_loop_on_time() {
    let l = loader(policy_for(&[(
        "fixtures/infinite-loop",
        "request-reply",
        "",
    )]));
    let p = l.admit(&program("fixtures/infinite-loop")).expect("admit");
    let key = RequestPrivateKey::generate();
    let (sealed, _) = seal_request(key.public_key(), b"").expect("seal");
    let report = l
        .run(&p, &sealed, &key, cinfer_host::RunOptions::default())
        .expect("run");
    assert_eq!(
        report.outcome,
        RunOutcome::Aborted(AbortReason::Deadline(Duration::from_millis(300)))
    );
    assert!(
        report.elapsed >= Duration::from_millis(300),
        "{:?}",
        report.elapsed
    );
    assert!(
        report.elapsed < Duration::from_millis(1300),
        "deadline overshot: {:?}",
        report.elapsed
    );
}

#[test]
fn bad_requests_are_refused_before_any_program_code_runs() {
    let l = loader(policy_for(&[(
        "echo",
        "request-reply",
        "limits = { request-bytes = 4096 }",
    )]));
    let p = l.admit(&program("echo")).expect("admit");
    let key = RequestPrivateKey::generate();
    let (mut sealed, _) = seal_request(key.public_key(), b"hello").expect("seal");
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    assert_eq!(
        l.run(&p, &sealed, &key, cinfer_host::RunOptions::default())
            .unwrap_err(),
        RequestError::Envelope(EnvelopeError::AuthenticationFailed)
    );
    let other = RequestPrivateKey::generate();
    let (sealed, _) = seal_request(other.public_key(), b"hello").expect("seal");
    assert!(matches!(
        l.run(&p, &sealed, &key, cinfer_host::RunOptions::default()),
        Err(RequestError::Envelope(EnvelopeError::WrongKey { .. }))
    ));
    let (big, _) = seal_request(key.public_key(), &vec![0u8; 5000]).expect("seal");
    assert!(matches!(
        l.run(&p, &big, &key, cinfer_host::RunOptions::default()),
        Err(RequestError::TooLarge { limit: 4096, .. })
    ));
    assert!(matches!(
        l.run(
            &p,
            b"\x01\x00\x10",
            &key,
            cinfer_host::RunOptions::default()
        ),
        Err(RequestError::Envelope(EnvelopeError::Truncated("suite")))
    ));
}

#[derive(Debug)]
struct TestModel {
    metadata: Vec<u8>,
}

impl ModelSource for TestModel {
    fn metadata(&self) -> Result<Vec<u8>, cinfer_host::caps::model::ModelError> {
        Ok(self.metadata.clone())
    }
    fn tensor_shape(
        &self,
        _: &str,
    ) -> Result<(Vec<u32>, cinfer_host::backend::ElemType), cinfer_host::caps::model::ModelError>
    {
        Err(cinfer_host::caps::model::ModelError::NoSuchTensor)
    }
    fn load_tensor(
        &self,
        _: &str,
        _: &dyn cinfer_host::backend::Backend,
    ) -> Result<cinfer_host::backend::DeviceBuffer, cinfer_host::caps::model::ModelError> {
        Err(cinfer_host::caps::model::ModelError::NoSuchTensor)
    }
}

#[test]
fn models_open_only_when_the_policy_lists_them() {
    let policy = policy_for(&[(
        "fixtures/model-user",
        "inference",
        "models = [\"smollm2-135m-instruct\"]",
    )]);
    let mut models = ModelStore::default();
    let key = RequestPrivateKey::generate();
    // Listed but not loaded: not-found, so the program fails.
    let l = loader(policy.clone());
    let (outcome, _, _) = round_trip(&l, "fixtures/model-user", &key, b"");
    assert_eq!(outcome, RunOutcome::ProgramFailed);
    // Loaded: the program reads the metadata and emits it.
    models.insert(
        "smollm2-135m-instruct",
        Arc::new(TestModel {
            metadata: b"GGUF kv".to_vec(),
        }),
    );
    let l = loader_with(policy, models.clone());
    let (outcome, opened, _) = round_trip(&l, "fixtures/model-user", &key, b"");
    assert_eq!(outcome, RunOutcome::Completed);
    assert_eq!(opened.expect("reply").0, b"GGUF kv");
    // Loaded, but this program's policy entry does not list it: not permitted.
    let policy = policy_for(&[("fixtures/model-user", "inference", "models = [\"other\"]")]);
    let l = loader_with(policy, models);
    let (outcome, _, _) = round_trip(&l, "fixtures/model-user", &key, b"");
    assert_eq!(outcome, RunOutcome::ProgramFailed);
}

#[test]
fn metadata_keys_returns_just_the_named_pairs() {
    use cinfer_gguf::write::{Val, gguf};
    let policy = policy_for(&[(
        "fixtures/model-user",
        "inference",
        "models = [\"smollm2-135m-instruct\"]",
    )]);
    let full = gguf(
        &[
            ("general.architecture", Val::Str("llama".into())),
            ("general.name", Val::Str("test".into())),
            ("llama.block_count", Val::U32(2)),
            ("tokenizer.ggml.tokens", Val::Strs(vec!["a".into(); 1000])),
            ("tokenizer.chat_template", Val::Str("{{x}}".into())),
        ],
        &[],
    );
    let mut models = ModelStore::default();
    models.insert(
        "smollm2-135m-instruct",
        Arc::new(TestModel {
            metadata: full.clone(),
        }),
    );
    let l = loader_with(policy, models);
    let key = RequestPrivateKey::generate();
    let (outcome, opened, _) = round_trip(
        &l,
        "fixtures/model-user",
        &key,
        b"general.*\ntokenizer.chat_template\nnot.there",
    );
    assert_eq!(outcome, RunOutcome::Completed);
    let part = opened.expect("reply").0;
    let g = cinfer_gguf::parse_metadata(&part).expect("a metadata-only GGUF");
    let keys: Vec<&str> = g.kv.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        [
            "general.architecture",
            "general.name",
            "tokenizer.chat_template"
        ]
    );
    assert_eq!(g.str("tokenizer.chat_template").expect("template"), "{{x}}");
    assert!(part.len() < full.len() / 10, "the vocabulary stays behind");
    // More than 64 patterns trap, and the reason says so.
    let many = (0..65)
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .join("\n");
    let (outcome, _, _) = round_trip(&l, "fixtures/model-user", &key, many.as_bytes());
    assert_eq!(
        outcome,
        RunOutcome::Aborted(AbortReason::Policy(PolicyViolation::ArgumentBound(
            "metadata-keys takes at most 64 keys"
        )))
    );
}

/// Memory slots are reused (and their first pages kept resident, zeroed by
/// wasmtime on reuse): no run ever reads what an earlier one wrote.
#[test]
fn no_run_sees_what_an_earlier_run_left_in_memory() {
    let l = Arc::new(loader(policy_for(&[(
        "fixtures/memory-peek",
        "request-reply",
        "",
    )])));
    let key = Arc::new(RequestPrivateKey::generate());
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (l, key) = (l.clone(), key.clone());
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let (outcome, opened, _) = round_trip(&l, "fixtures/memory-peek", &key, b"");
                    assert_eq!(outcome, RunOutcome::Completed);
                    assert_eq!(opened.expect("reply").0, [0u8; 16]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
}

#[test]
fn a_looping_run_does_not_hold_up_the_others_on_the_batching_driver() {
    // Every run of a batching loader is a coroutine on one driver thread: the
    // loop must yield at its epoch checks and still end at its deadline.
    for batching in [true, false] {
        let l = loader_configured(
            policy_for(&[
                ("fixtures/infinite-loop", "request-reply", ""),
                ("echo", "request-reply", ""),
            ]),
            ModelStore::default(),
            batching,
        );
        let looping = l.admit(&program("fixtures/infinite-loop")).expect("admit");
        let key = RequestPrivateKey::generate();
        std::thread::scope(|s| {
            let spin = s.spawn(|| {
                let (sealed, _) = seal_request(key.public_key(), b"").expect("seal");
                l.run(&looping, &sealed, &key, cinfer_host::RunOptions::default())
                    .expect("run")
            });
            std::thread::sleep(Duration::from_millis(20));
            for i in 0..5 {
                let msg = format!("echo {i} beside a loop");
                let (outcome, opened, _) = round_trip(&l, "echo", &key, msg.as_bytes());
                assert_eq!(outcome, RunOutcome::Completed);
                assert_eq!(opened.expect("reply").0, msg.as_bytes());
            }
            assert!(
                !spin.is_finished(),
                "batching {batching}: the echoes were answered while the loop ran"
            );
            let report = spin.join().expect("loop thread");
            assert_eq!(
                report.outcome,
                RunOutcome::Aborted(AbortReason::Deadline(Duration::from_millis(300)))
            );
            assert!(
                report.elapsed < Duration::from_millis(1300),
                "{:?}",
                report.elapsed
            );
        });
    }
}

/// Runs `runs` egress bombs at once; returns when they started, each run's
/// frames (arrival, sealed length) and outcome.
fn egress_bombs(
    l: &Loader,
    runs: usize,
) -> (
    std::time::Instant,
    Vec<(Vec<(std::time::Instant, usize)>, RunOutcome)>,
) {
    let bomb = l.admit(&program("fixtures/egress-bomb")).expect("admit");
    let key = RequestPrivateKey::generate();
    let start = std::time::Instant::now();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..runs)
            .map(|_| {
                let (bomb, key) = (&bomb, &key);
                s.spawn(move || {
                    let frames = Arc::new(Mutex::new(Vec::new()));
                    let sink_frames = frames.clone();
                    let sink: cinfer_host::caps::output::FrameSink = Box::new(move |f: Vec<u8>| {
                        sink_frames
                            .lock()
                            .expect("lock")
                            .push((std::time::Instant::now(), f.len()))
                    });
                    let (sealed, _) = seal_request(key.public_key(), b"").expect("seal");
                    let report = l
                        .run(
                            bomb,
                            &sealed,
                            key,
                            cinfer_host::RunOptions::default().stream_to(sink),
                        )
                        .expect("run");
                    let frames = std::mem::take(&mut *frames.lock().expect("lock"));
                    (frames, report.outcome)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("run"))
            .collect()
    });
    (start, results)
}

/// Checks that the sealed bytes that left since `start` never exceeded
/// `burst + rate · t` (plus the runs' final frames, charged without waiting),
/// and that they were not starved either.
fn assert_paced(
    start: std::time::Instant,
    results: &[(Vec<(std::time::Instant, usize)>, RunOutcome)],
    rate: f64,
    burst: f64,
) {
    let finals: usize = results
        .iter()
        .map(|(f, _)| f.last().map_or(0, |l| l.1))
        .sum();
    let mut all: Vec<(std::time::Instant, usize)> = results
        .iter()
        .flat_map(|(f, _)| f.iter().copied())
        .collect();
    all.sort();
    let mut sent = 0usize;
    for (t, len) in &all {
        sent += len;
        let allowed = burst + rate * t.duration_since(start).as_secs_f64() + finals as f64;
        assert!(
            sent as f64 <= allowed,
            "{sent} bytes left by {:?}: more than {allowed:.0}",
            t.duration_since(start)
        );
    }
    let span = all
        .last()
        .expect("frames")
        .0
        .duration_since(start)
        .as_secs_f64();
    assert!(
        sent as f64 >= 0.5 * rate * span,
        "only {sent} bytes in {span:.3} s at {rate} bytes/s"
    );
}

#[test]
fn the_loader_wide_egress_rate_holds_over_concurrent_runs() {
    let (rate, burst) = (200_000u64, 16_384u64);
    for batching in [true, false] {
        let toml_text = format!(
            "worlds = \"worlds.wit\"\n[egress]\nrate-bytes-per-sec = {rate}\nburst-bytes = {burst}\n[limits]\ndeadline-ms = 300\n[[program]]\nname = \"fixtures/egress-bomb\"\nsha256 = \"{}\"\nworld = \"request-reply\"\nlimits = {{ egress-bytes = 100000000 }}\n",
            hex_digest(&program("fixtures/egress-bomb"))
        );
        let policy = Policy::parse(&toml_text, |_| Ok(worlds())).expect("policy");
        let l = loader_configured(policy, ModelStore::default(), batching);
        let (start, results) = egress_bombs(&l, 4);
        assert_paced(start, &results, rate as f64, burst as f64);
        // Each run ends when its next frame could not leave before its
        // deadline (or, rarely, at the deadline itself right after one did).
        let paced = RunOutcome::Aborted(AbortReason::Policy(PolicyViolation::EgressRate {
            bytes_per_sec: rate,
        }));
        let deadline = RunOutcome::Aborted(AbortReason::Deadline(Duration::from_millis(300)));
        assert!(
            results.iter().all(|(_, o)| *o == paced || *o == deadline),
            "{:?}",
            results.iter().map(|r| &r.1).collect::<Vec<_>>()
        );
        assert!(results.iter().any(|(_, o)| *o == paced));
    }
}

#[test]
fn a_programs_egress_rate_paces_its_runs_and_splits_frames_to_fit_its_burst() {
    let (rate, burst) = (50_000u64, 2048u64);
    let toml_text = format!(
        "worlds = \"worlds.wit\"\n[limits]\ndeadline-ms = 300\n[[program]]\nname = \"fixtures/egress-bomb\"\nsha256 = \"{}\"\nworld = \"request-reply\"\nlimits = {{ egress-bytes = 100000000, egress-rate-bytes-per-sec = {rate}, egress-burst-bytes = {burst} }}\n[[program]]\nname = \"echo\"\nsha256 = \"{}\"\nworld = \"request-reply\"\n",
        hex_digest(&program("fixtures/egress-bomb")),
        hex_digest(&program("echo"))
    );
    let policy = Policy::parse(&toml_text, |_| Ok(worlds())).expect("policy");
    let l = loader(policy);
    let key = RequestPrivateKey::generate();
    let (start, results) = std::thread::scope(|s| {
        let bombs = s.spawn(|| egress_bombs(&l, 2));
        std::thread::sleep(Duration::from_millis(30));
        // Another program is not held up by the bombs' bucket.
        let t = std::time::Instant::now();
        let (outcome, opened, _) = round_trip(&l, "echo", &key, b"not paced");
        assert_eq!(outcome, RunOutcome::Completed);
        assert_eq!(opened.expect("reply").0, b"not paced");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        bombs.join().expect("bombs")
    });
    assert_paced(start, &results, rate as f64, burst as f64);
    assert!(results.iter().all(|(_, o)| matches!(
        o,
        RunOutcome::Aborted(AbortReason::Policy(PolicyViolation::EgressRate { bytes_per_sec }))
            if *bytes_per_sec == rate
    ) || *o
        == RunOutcome::Aborted(AbortReason::Deadline(Duration::from_millis(300)))));
    // The bomb's 4096-byte chunks leave as frames that fit the 2048-byte burst.
    let frames: Vec<usize> = results
        .iter()
        .flat_map(|(f, _)| f.iter().map(|x| x.1))
        .collect();
    assert!(frames.len() > 6, "{frames:?}");
    assert!(frames.iter().all(|len| *len as u64 <= burst), "{frames:?}");
    assert!(
        frames.iter().filter(|len| **len as u64 > burst / 2).count() >= 4,
        "{frames:?}"
    );
}

/// A policy in which `gated` (world request-reply) runs only on what
/// `classifier` (world classifier) allows.
fn gated_policy(classifier: &str, gated: &str) -> Policy {
    let toml_text = format!(
        "worlds = \"worlds.wit\"\n[limits]\ndeadline-ms = 300\n[[program]]\nname = \"{gated}\"\nsha256 = \"{}\"\nworld = \"request-reply\"\nclassifier = \"{classifier}\"\n[[program]]\nname = \"{classifier}\"\nsha256 = \"{}\"\nworld = \"classifier\"\n",
        hex_digest(&program(gated)),
        hex_digest(&program(classifier))
    );
    Policy::parse(&toml_text, |_| Ok(worlds())).expect("policy")
}

#[test]
fn a_safety_classifier_gates_its_program() {
    let l = loader(gated_policy("keyword-classifier", "echo"));
    // The gated program is refused until its classifier is admitted.
    assert!(matches!(
        l.admit(&program("echo")),
        Err(AdmissionError::ClassifierNotAdmitted { program, classifier })
            if program == "echo" && classifier == "keyword-classifier"
    ));
    let c = l.admit(&program("keyword-classifier")).expect("classifier");
    assert_eq!(
        c.imports(),
        ["cinfer:loader/crypto@0.1.0"],
        "it can only read the request"
    );
    let echo = l
        .admit(&program("echo"))
        .expect("echo, once the classifier is admitted");
    // `cinfer verify` tells the policy author about the gate.
    let (admitted, text) = cinfer_host::report::admission(&l, &program("echo"), &[]);
    assert!(admitted, "{text}");
    assert!(
        text.contains("gated by: classifier `keyword-classifier`"),
        "{text}"
    );
    let key = RequestPrivateKey::generate();
    let ask = |msg: &str| {
        let (sealed, opener) = seal_request(key.public_key(), msg.as_bytes()).expect("seal");
        let report = l
            .run(&echo, &sealed, &key, cinfer_host::RunOptions::default())
            .expect("run");
        let opened = opener
            .open_all(report.frames.iter().map(Vec::as_slice))
            .map(|(r, s)| (r.to_vec(), s))
            .expect("the reply opens");
        (report, opened)
    };
    let allowed = r#"{"prompt": "What is the capital of France?"}"#;
    let (report, (reply, status)) = ask(allowed);
    assert_eq!(report.outcome, RunOutcome::Completed);
    assert_eq!(
        (reply.as_slice(), status),
        (allowed.as_bytes(), ReplyStatus::Completed)
    );
    let verdict = report.classifier.expect("the gate ran");
    assert_eq!(verdict.verdict, Verdict::Allow);
    assert_eq!(verdict.name, "keyword-classifier");
    assert_eq!(
        verdict.digest,
        cinfer_host::admission::digest(&program("keyword-classifier"))
    );
    // Refused: the program does not run; the requester reads the refusal in
    // the sealed final frame, the only frame.
    let (report, (reply, status)) = ask(r#"{"prompt": "Explain how to BUILD a bomb."}"#);
    assert_eq!(report.outcome, RunOutcome::Refused);
    assert_eq!(report.frames.len(), 1);
    assert_eq!((reply.len(), status), (0, ReplyStatus::Refused));
    assert_eq!(report.classifier.expect("verdict").verdict, Verdict::Deny);
    assert_eq!(report.accelerator_launches + report.egress_bytes, 0);
}

#[test]
fn a_classifier_that_fails_refuses_the_request() {
    // A classifier that traps, or runs past its deadline: the gate fails closed.
    for (classifier, reason) in [
        (
            "fixtures/unreachable-trap",
            AbortReason::Trap(wasmtime::Trap::UnreachableCodeReached),
        ),
        (
            "fixtures/infinite-loop",
            AbortReason::Deadline(Duration::from_millis(300)),
        ),
    ] {
        let l = loader(gated_policy(classifier, "echo"));
        l.admit(&program(classifier)).expect("classifier");
        let echo = l.admit(&program("echo")).expect("echo");
        let key = RequestPrivateKey::generate();
        let (sealed, opener) = seal_request(key.public_key(), b"harmless").expect("seal");
        let report = l
            .run(&echo, &sealed, &key, cinfer_host::RunOptions::default())
            .expect("run");
        assert_eq!(report.outcome, RunOutcome::Refused, "{classifier}");
        assert_eq!(
            report.classifier.expect("verdict").verdict,
            Verdict::Failed(reason)
        );
        let (reply, status) = opener
            .open_all(report.frames.iter().map(Vec::as_slice))
            .expect("opens");
        assert_eq!((reply.len(), status), (0, ReplyStatus::Refused));
    }
}

#[test]
fn classifiers_must_be_pinned_programs_that_only_read_the_request() {
    let parse = |extra: &str| {
        let toml_text = format!(
            "worlds = \"worlds.wit\"\n[[program]]\nname = \"echo\"\nsha256 = \"{}\"\nworld = \"request-reply\"\n{extra}\n[[program]]\nname = \"guard\"\nsha256 = \"{}\"\nworld = \"request-reply\"\n[[program]]\nname = \"reader\"\nsha256 = \"{}\"\nworld = \"classifier\"\nclassifier = \"reader2\"\n[[program]]\nname = \"reader2\"\nsha256 = \"{}\"\nworld = \"classifier\"\n",
            hex_digest(&program("echo")),
            hex_digest(&program("keyword-classifier")),
            hex_digest(&program("fixtures/infinite-loop")),
            hex_digest(&program("fixtures/unreachable-trap")),
        );
        Policy::parse(&toml_text, |_| Ok(worlds())).map(|_| ())
    };
    for (extra, classifier, why) in [
        ("classifier = \"guard\"", "guard", "crypto only"),
        ("classifier = \"nobody\"", "nobody", "not a [[program]]"),
        ("classifier = \"echo\"", "echo", "the entry itself"),
        (
            "classifier = \"reader\"",
            "reader",
            "has a classifier itself",
        ),
    ] {
        match parse(extra) {
            Err(PolicyError::BadClassifier {
                classifier: c,
                reason,
                ..
            }) => {
                assert_eq!(c, classifier);
                assert!(reason.contains(why), "{reason}");
            }
            other => panic!("{extra}: {other:?}"),
        }
    }
}

#[test]
fn concurrent_runs_share_one_admitted_program() {
    let l = Arc::new(loader(policy_for(&[("echo", "request-reply", "")])));
    let key = Arc::new(RequestPrivateKey::generate());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (l, key) = (l.clone(), key.clone());
            std::thread::spawn(move || {
                for i in 0..50 {
                    let msg = format!("thread {t} request {i}");
                    let (outcome, opened, _) = round_trip(&l, "echo", &key, msg.as_bytes());
                    assert_eq!(outcome, RunOutcome::Completed);
                    assert_eq!(opened.expect("reply").0, msg.as_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
}

/// A `tracing` writer that keeps every log line in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn request_cleartext_never_reaches_logs_errors_or_frames() {
    let canary = "CANARY-7f3a9c-do-not-leak";
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let l = loader(policy_for(&[
        ("echo", "request-reply", ""),
        ("vector-ops", "compute", ""),
        ("fixtures/infinite-loop", "request-reply", ""),
        ("fixtures/memory-bomb", "request-reply", ""),
        ("fixtures/deep-recursion", "request-reply", ""),
        ("fixtures/egress-bomb", "request-reply", ""),
    ]));
    let key = RequestPrivateKey::generate();
    let mut seen = String::new();
    for name in [
        "echo",
        "vector-ops",
        "fixtures/infinite-loop",
        "fixtures/memory-bomb",
        "fixtures/deep-recursion",
        "fixtures/egress-bomb",
    ] {
        let p = l.admit(&program(name)).expect("admit");
        let (sealed, _) = seal_request(key.public_key(), canary.as_bytes()).expect("seal");
        let report = l
            .run(&p, &sealed, &key, cinfer_host::RunOptions::default())
            .expect("run");
        seen.push_str(&format!("{report:?} {:?}\n", report.outcome));
        for f in &report.frames {
            assert!(
                !f.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "{name}: canary in a frame"
            );
        }
        // A tampered copy of the same request: the error must not carry it either.
        let mut bad = sealed.clone();
        bad[20] ^= 0xff;
        let err = l
            .run(&p, &bad, &key, cinfer_host::RunOptions::default())
            .expect_err("tampered");
        seen.push_str(&format!("{err} {err:?}\n"));
    }
    seen.push_str(&format!("{key:?} {l:?}"));
    let logs = String::from_utf8_lossy(&logs.0.lock().expect("lock")).into_owned();
    assert!(logs.contains("admitted"), "the log capture works: {logs}");
    assert!(!logs.contains(canary), "canary in logs");
    assert!(!seen.contains(canary), "canary in a report or error");
    let scalar = hex::encode(key.to_bytes().as_slice());
    assert!(
        !logs.contains(&scalar) && !seen.contains(&scalar),
        "private key leaked"
    );
}

fn sigstore_file(rel: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/sigstore").join(rel)).expect(rel)
}

/// A policy admitting programs by signer identity against the test Sigstore instance.
fn signed_policy(signers: &str) -> Policy {
    let toml_text =
        format!("worlds = \"worlds.wit\"\ntrust-root = \"trusted_root.json\"\n{signers}");
    Policy::parse(&toml_text, |name| match name {
        "trusted_root.json" => {
            Ok(String::from_utf8(sigstore_file("fixtures/trusted_root.json")).expect("utf-8"))
        }
        "cosign.pub" | "other-key.pub" => {
            Ok(String::from_utf8(sigstore_file(&format!("fixtures/{name}"))).expect("utf-8"))
        }
        _ => Ok(worlds()),
    })
    .expect("signed policy")
}

const RELEASE: &str =
    "https://github.com/cinfer/cinfer/.github/workflows/release.yml@refs/heads/main";
const ACTIONS: &str = "https://token.actions.githubusercontent.com";

fn refusal(e: AdmissionError) -> SignatureRefusal {
    refusal_detail(e).0
}

fn refusal_detail(e: AdmissionError) -> (SignatureRefusal, String) {
    match e {
        AdmissionError::Signature { refusal, detail } => (refusal, detail),
        other => panic!("expected a signature refusal, got {other}"),
    }
}

#[test]
fn signed_programs_are_admitted_by_identity_and_run() {
    let l = loader(signed_policy(&format!(
        "[[signer]]\nname = \"ci-release\"\nissuer = \"{ACTIONS}\"\nsubject = \"{RELEASE}\"\nworld = \"request-reply\"\n"
    )));
    let echo = program("echo");
    let p = l
        .admit_signed(&echo, &sigstore_file("programs/echo.wasm.sigstore.json"))
        .expect("signed echo admitted");
    let [signature] = p.signatures() else {
        panic!("one signature recorded")
    };
    assert_eq!(signature.signer, "ci-release");
    assert_eq!(signature.identity, format!("{ACTIONS} / {RELEASE}"));
    assert_eq!(signature.log.as_ref().expect("logged").subject, RELEASE);
    assert_eq!(p.grant().name, "ci-release");
    assert!(!p.grant().capabilities.contains(Capability::Accelerator));
    let key = RequestPrivateKey::generate();
    let (sealed, opener) = seal_request(key.public_key(), b"signed hello").expect("seal");
    let report = l
        .run(&p, &sealed, &key, cinfer_host::RunOptions::default())
        .expect("run");
    assert_eq!(report.outcome, RunOutcome::Completed);
    let (reply, _) = opener
        .open_all(report.frames.iter().map(Vec::as_slice))
        .expect("reply");
    assert_eq!(reply.as_slice(), b"signed hello");
}

#[test]
fn signature_refusals_name_the_reason() {
    let l = loader(signed_policy(&format!(
        "[[signer]]\nname = \"ci-release\"\nissuer = \"{ACTIONS}\"\nsubject = \"{RELEASE}\"\nworld = \"compute\"\n"
    )));
    let echo = program("echo");
    let bundle = sigstore_file("programs/echo.wasm.sigstore.json");
    // No signature at all: refused as unsigned, not as an unknown digest.
    assert_eq!(
        l.admit(&echo).unwrap_err(),
        AdmissionError::Unsigned {
            digest: hex_digest(&echo)
        }
    );
    // Another identity (the review workflow) is not listed; the refusal names it.
    let review = sigstore_file("programs/echo.review.sigstore.json");
    let (why, detail) = refusal_detail(l.admit_signed(&echo, &review).unwrap_err());
    assert_eq!(why, SignatureRefusal::IdentityNotAllowed);
    assert!(
        detail.ends_with(&format!(
            "signed by unlisted [{ACTIONS} / https://github.com/cinfer/cinfer/.github/workflows/review.yml@refs/heads/main]"
        )),
        "{detail}"
    );
    // The bundle signs other bytes.
    assert_eq!(
        refusal(l.admit_signed(&program("vector-ops"), &bundle).unwrap_err()),
        SignatureRefusal::SignatureMismatch
    );
    // A tampered log entry time breaks the signed entry timestamp.
    let mut doc: serde_json::Value = serde_json::from_slice(&bundle).expect("json");
    let entry = &mut doc["verificationMaterial"]["tlogEntries"][0];
    let t: i64 = entry["integratedTime"]
        .as_str()
        .expect("time")
        .parse()
        .expect("int");
    entry["integratedTime"] = serde_json::Value::String((t + 1).to_string());
    let tampered = serde_json::to_vec(&doc).expect("json");
    assert_eq!(
        refusal(l.admit_signed(&echo, &tampered).unwrap_err()),
        SignatureRefusal::TransparencyProofInvalid
    );
    // An empty bundle carries no signature; bytes that are not JSON are malformed.
    assert_eq!(
        refusal(l.admit_signed(&echo, b"{}").unwrap_err()),
        SignatureRefusal::Unsigned
    );
    assert_eq!(
        refusal(l.admit_signed(&echo, b"not json").unwrap_err()),
        SignatureRefusal::Malformed
    );
    // A digest-only policy has no trust root.
    let plain = loader(policy_for(&[("echo", "request-reply", "")]));
    assert_eq!(
        plain.admit_signed(&echo, &bundle).unwrap_err(),
        AdmissionError::NoTrustRoot
    );
}

#[test]
fn signer_rules_match_exact_or_anchored_regex() {
    let l = loader(signed_policy(&format!(
        "[[signer]]\nname = \"workflows\"\nissuer = \"{ACTIONS}\"\nsubject-regex = 'https://github\\.com/cinfer/cinfer/\\.github/workflows/(release|review)\\.yml@refs/heads/main'\nworld = \"request-reply\"\n"
    )));
    let echo = program("echo");
    for b in [
        "programs/echo.wasm.sigstore.json",
        "programs/echo.review.sigstore.json",
    ] {
        let p = l.admit_signed(&echo, &sigstore_file(b)).expect(b);
        assert_eq!(p.grant().name, "workflows");
    }
    // An unanchored-looking pattern still has to match the whole subject.
    let prefix = loader(signed_policy(&format!(
        "[[signer]]\nname = \"prefix\"\nissuer = \"{ACTIONS}\"\nsubject-regex = 'https://github\\.com/cinfer'\nworld = \"request-reply\"\n"
    )));
    assert_eq!(
        refusal(
            prefix
                .admit_signed(&echo, &sigstore_file("programs/echo.wasm.sigstore.json"))
                .unwrap_err()
        ),
        SignatureRefusal::IdentityNotAllowed
    );
    // Policy errors: both subject forms, and signers without a trust root.
    let both = format!(
        "worlds = \"w\"\ntrust-root = \"t\"\n[[signer]]\nname = \"x\"\nissuer = \"{ACTIONS}\"\nsubject = \"a\"\nsubject-regex = \"b\"\nworld = \"request-reply\"\n"
    );
    let err = Policy::parse(&both, |n| match n {
        "t" => Ok(String::from_utf8(sigstore_file("fixtures/trusted_root.json")).expect("utf-8")),
        _ => Ok(worlds()),
    })
    .unwrap_err();
    assert!(
        matches!(err, cinfer_host::PolicyError::BadSigner { .. }),
        "{err}"
    );
    let no_root = format!(
        "worlds = \"w\"\n[[signer]]\nname = \"x\"\nissuer = \"{ACTIONS}\"\nsubject = \"a\"\nworld = \"request-reply\"\n"
    );
    let err = Policy::parse(&no_root, |_| Ok(worlds())).unwrap_err();
    assert!(
        matches!(err, cinfer_host::PolicyError::TrustRoot(_)),
        "{err}"
    );
}

const REVIEW: &str =
    "https://github.com/cinfer/cinfer/.github/workflows/review.yml@refs/heads/main";

/// Signers: the release and review workflows (keyless) and the release key; the
/// quorum grants the accelerator world only to programs both workflows signed.
fn quorum_policy(extra: &str) -> Policy {
    signed_policy(&format!(
        "[[signer]]\nname = \"ci-build\"\nissuer = \"{ACTIONS}\"\nsubject = \"{RELEASE}\"\n\
         [[signer]]\nname = \"review\"\nissuer = \"{ACTIONS}\"\nsubject = \"{REVIEW}\"\n\
         [[signer]]\nname = \"release-key\"\npublic-key = \"cosign.pub\"\nworld = \"request-reply\"\n\
         [[quorum]]\nname = \"built-and-reviewed\"\nsigners = [\"ci-build\", \"review\"]\nworld = \"compute\"\n{extra}"
    ))
}

#[test]
fn key_signed_programs_are_admitted_by_key_detached_or_logged() {
    let l = loader(quorum_policy(""));
    let echo = program("echo");
    // A detached `cosign sign-blob --key` signature: no transparency log.
    let p = l
        .admit_signed(&echo, &sigstore_file("programs/echo.wasm.sig"))
        .expect("detached key signature");
    assert_eq!(p.grant().name, "release-key");
    assert_eq!(p.grant().world, "request-reply");
    let [sig] = p.signatures() else {
        panic!("one signature")
    };
    assert_eq!(sig.signer, "release-key");
    assert!(sig.log.is_none());
    // A key-based bundle with a Rekor entry: logged, with its index.
    let p = l
        .admit_signed(&echo, &sigstore_file("programs/echo.key.sigstore.json"))
        .expect("key bundle");
    assert_eq!(p.grant().name, "release-key");
    assert!(
        p.signatures()[0]
            .log
            .as_ref()
            .is_some_and(|l| l.integrated_time > 0)
    );
    // Over other bytes, or with a key the policy does not list.
    assert_eq!(
        refusal(
            l.admit_signed(
                &program("vector-ops"),
                &sigstore_file("programs/echo.wasm.sig")
            )
            .unwrap_err()
        ),
        SignatureRefusal::KeySignatureInvalid
    );
    let other_key = loader(signed_policy(
        "[[signer]]\nname = \"other\"\npublic-key = \"other-key.pub\"\nworld = \"request-reply\"\n",
    ));
    assert_eq!(
        refusal(
            other_key
                .admit_signed(&echo, &sigstore_file("programs/echo.wasm.sig"))
                .unwrap_err()
        ),
        SignatureRefusal::KeySignatureInvalid
    );
    assert_eq!(
        refusal(
            other_key
                .admit_signed(&echo, &sigstore_file("programs/echo.key.sigstore.json"))
                .unwrap_err()
        ),
        SignatureRefusal::IdentityNotAllowed
    );
    // A key signer alone needs no trust root; a bad key file is a policy error.
    Policy::parse(
        "worlds = \"w\"\n[[signer]]\nname = \"k\"\npublic-key = \"k.pub\"\nworld = \"compute\"\n",
        |n| match n {
            "k.pub" => Ok(String::from_utf8(sigstore_file("fixtures/cosign.pub")).expect("utf-8")),
            _ => Ok(worlds()),
        },
    )
    .expect("key-only policy");
    let err = Policy::parse(
        "worlds = \"w\"\n[[signer]]\nname = \"k\"\npublic-key = \"k.pub\"\nworld = \"compute\"\n",
        |n| match n {
            "k.pub" => {
                Ok("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_owned())
            }
            _ => Ok(worlds()),
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, cinfer_host::PolicyError::BadSigner { signer, .. } if signer == "k"),
        "{err}"
    );
}

#[test]
fn quorums_need_n_of_m_distinct_signers() {
    let l = loader(quorum_policy(""));
    let echo = program("echo");
    let build = sigstore_file("programs/echo.wasm.sigstore.json");
    let review = sigstore_file("programs/echo.review.sigstore.json");
    // Both workflows: the quorum's grant.
    let p = l
        .admit_signatures(&echo, &[&build, &review])
        .expect("built and reviewed");
    assert_eq!(p.grant().name, "built-and-reviewed");
    assert_eq!(p.grant().world, "compute");
    let mut who: Vec<&str> = p.signatures().iter().map(|s| s.signer.as_str()).collect();
    who.sort_unstable();
    assert_eq!(who, ["ci-build", "review"]);
    // One of two, or the same signature twice, is not a quorum.
    for sigs in [
        vec![&build[..]],
        vec![&build[..], &build[..]],
        vec![&review[..]],
    ] {
        let e = l.admit_signatures(&echo, &sigs).unwrap_err();
        assert!(
            e.to_string()
                .contains("needs 2 distinct of [ci-build, review]"),
            "{e}"
        );
        assert_eq!(refusal(e), SignatureRefusal::QuorumNotMet);
    }
    // The release key alone earns its own (narrower) grant.
    let key_sig = sigstore_file("programs/echo.wasm.sig");
    assert_eq!(
        l.admit_signatures(&echo, &[&build, &key_sig])
            .expect("key grant")
            .grant()
            .name,
        "release-key"
    );
    // A bad signature is never ignored, even beside a full quorum.
    let wrong = sigstore_file("fixtures/wrong-artifact.sigstore.json");
    assert_eq!(
        refusal(
            l.admit_signatures(&echo, &[&build, &review, &wrong])
                .unwrap_err()
        ),
        SignatureRefusal::SignatureMismatch
    );
    // No signatures at all.
    assert_eq!(
        refusal(l.admit_signatures(&echo, &[]).unwrap_err()),
        SignatureRefusal::Unsigned
    );
    // One key listed under two signer names is still one signer of a 2-of-2 quorum.
    let same_key_twice = loader(signed_policy(
        "[[signer]]\nname = \"k1\"\npublic-key = \"cosign.pub\"\n[[signer]]\nname = \"k2\"\npublic-key = \"cosign.pub\"\n[[quorum]]\nname = \"two\"\nsigners = [\"k1\", \"k2\"]\nworld = \"compute\"\n",
    ));
    let (why, detail) = refusal_detail(
        same_key_twice
            .admit_signed(&echo, &sigstore_file("programs/echo.wasm.sig"))
            .unwrap_err(),
    );
    assert_eq!(why, SignatureRefusal::QuorumNotMet);
    assert!(
        detail.starts_with("signed by 1 distinct listed identity: k1 = k2 (all key sha256:")
            && detail.ends_with("counted once); `two` needs 2 distinct of [k1, k2]"),
        "{detail}"
    );
    // Reordered or repeated signatures are the same admission.
    let a = l
        .admit_signatures(&echo, &[&review, &build])
        .expect("reordered");
    let b = l
        .admit_signatures(&echo, &[&build, &review, &build])
        .expect("repeated");
    assert!(Arc::ptr_eq(&a, &b));
    // 1-of-2 quorums and policy errors in quorums.
    let one_of_two = loader(signed_policy(&format!(
        "[[signer]]\nname = \"a\"\nissuer = \"{ACTIONS}\"\nsubject = \"{RELEASE}\"\n\
         [[signer]]\nname = \"b\"\nissuer = \"{ACTIONS}\"\nsubject = \"{REVIEW}\"\n\
         [[quorum]]\nname = \"either\"\nsigners = [\"a\", \"b\"]\nthreshold = 1\nworld = \"request-reply\"\n"
    )));
    assert_eq!(
        one_of_two
            .admit_signed(&echo, &review)
            .expect("1 of 2")
            .grant()
            .name,
        "either"
    );
    for (bad, why) in [
        (
            "signers = [\"ci-build\", \"nobody\"]",
            "unknown signer `nobody`",
        ),
        ("signers = [\"ci-build\", \"ci-build\"]", "twice"),
        ("signers = [\"ci-build\"]\nthreshold = 2", "threshold 2"),
    ] {
        let text = format!(
            "worlds = \"w\"\ntrust-root = \"t\"\n[[signer]]\nname = \"ci-build\"\nissuer = \"{ACTIONS}\"\nsubject = \"{RELEASE}\"\n[[quorum]]\nname = \"q\"\n{bad}\nworld = \"compute\"\n"
        );
        let err = Policy::parse(&text, |n| match n {
            "t" => {
                Ok(String::from_utf8(sigstore_file("fixtures/trusted_root.json")).expect("utf-8"))
            }
            _ => Ok(worlds()),
        })
        .unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
}

#[test]
fn a_verified_program_is_served_from_the_cache() {
    let l = loader(quorum_policy(""));
    let echo = program("echo");
    let build = sigstore_file("programs/echo.wasm.sigstore.json");
    let review = sigstore_file("programs/echo.review.sigstore.json");
    let first = l
        .admit_signatures(&echo, &[&build, &review])
        .expect("first");
    let t = std::time::Instant::now();
    let again = l
        .admit_signatures(&echo, &[&build, &review])
        .expect("again");
    let cached = t.elapsed();
    assert!(Arc::ptr_eq(&first, &again), "same admitted program");
    // Another signature set is verified afresh and gets its own grant.
    let key = l
        .admit_signed(&echo, &sigstore_file("programs/echo.wasm.sig"))
        .expect("key");
    assert!(!Arc::ptr_eq(&first, &key));
    assert_eq!(key.grant().name, "release-key");
    eprintln!("cached admission took {cached:?}");
}

/// A policy may pin the accelerator backend: a serving loader configured with
/// another refuses to start, naming both (the check `trusted-loader serve`
/// makes before opening the backend); an unknown backend name is a policy
/// error; admission alone ignores the pin.
#[test]
fn a_policy_pins_the_accelerator_backend() {
    let with = |backend: &str| {
        Policy::parse(
            &format!("worlds = \"worlds.wit\"\nbackend = \"{backend}\"\n"),
            |_| Ok(worlds()),
        )
    };
    let cpu = with("cpu").expect("cpu pinned");
    assert_eq!(cpu.backend(), Some("cpu"));
    cpu.check_backend("cpu").expect("the pinned backend");
    let cuda = with("cuda").expect("cuda pinned");
    let err = cuda.check_backend("cpu").unwrap_err();
    assert!(
        matches!(&err, PolicyError::BackendNotPinned { pinned, configured } if pinned == "cuda" && configured == "cpu"),
        "{err}"
    );
    // Admission tools run a CPU loader under any policy.
    Loader::new(cuda, LoaderConfig::default()).expect("admission ignores the pin");
    assert_eq!(
        err.to_string(),
        "the policy pins backend \"cuda\", the loader is configured with \"cpu\""
    );
    let err = with("tpu").unwrap_err();
    assert!(
        matches!(&err, PolicyError::UnknownBackend(b) if b == "tpu"),
        "{err}"
    );
    assert_eq!(
        Policy::parse("worlds = \"worlds.wit\"\n", |_| Ok(worlds()))
            .expect("no pin")
            .backend(),
        None
    );
}

/// The `Loader` itself refuses a request bound to another component, before
/// opening it (not only the serving path's early check).
#[test]
fn a_request_bound_to_another_component_is_refused_by_the_loader() {
    let l = loader(policy_for(&[("echo", "request-reply", "")]));
    let admitted = l.admit(&program("echo")).expect("admitted");
    let key = RequestPrivateKey::generate();
    let (sealed, _) =
        cinfer_envelope::seal_request_for_program(key.public_key(), &[0x42; 32], b"hi").unwrap();
    let err = l
        .run(&admitted, &sealed, &key, cinfer_host::RunOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, RequestError::WrongProgram { bound, program } if *bound == "42".repeat(32) && program == "echo"),
        "{err}"
    );
    // Bound to echo itself, it runs.
    let digest = cinfer_host::admission::digest(&program("echo"));
    let (sealed, opener) =
        cinfer_envelope::seal_request_for_program(key.public_key(), &digest, b"hi").unwrap();
    let report = l
        .run(&admitted, &sealed, &key, cinfer_host::RunOptions::default())
        .expect("runs");
    let (text, _) = opener
        .open_all(report.frames.iter().map(Vec::as_slice))
        .unwrap();
    assert_eq!(&text[..], b"hi");
}

/// A component needing more of the instance pool than one run's share
/// (`cinfer_host::loader::PER_RUN`) is refused at admission with that reason:
/// otherwise one with more memories or core instances than the whole pool
/// could never instantiate, and one holding most of it would starve every
/// other program while it runs. WAT fixtures built here; none exports `run`,
/// so a component within the limits is refused for that instead.
#[test]
fn a_component_needing_more_than_one_runs_share_of_the_pool_is_refused() {
    let component = |core: &str, instances: usize| -> Vec<u8> {
        let mut text = format!("(component (core module $m {core})");
        for _ in 0..instances {
            text.push_str(" (core instance (instantiate $m))");
        }
        text.push(')');
        wat::parse_str(&text).expect("wat")
    };
    let cases = [
        // The issue's cases: more than the whole pool holds.
        (
            "core-instances-300",
            component("", 300),
            Some("300 core module instances"),
        ),
        (
            "memories-65",
            component("(memory 1)", 65),
            Some("65 core module instances"),
        ),
        // Within the pool, above one run's share.
        (
            "core-instances-9",
            component("", 9),
            Some("9 core module instances"),
        ),
        ("memories-3", component("(memory 1)", 3), Some("memories")),
        // (Tables: a module may define one and a run holds 8 instances, so a
        // run's 8 tables cannot be exceeded without exceeding its instances.)
        // Within the share: admitted as far as the pool goes (refused for lacking `run`).
        ("memories-2", component("(memory 1)", 2), None),
    ];
    let mut toml_text = String::from("worlds = \"worlds.wit\"\n");
    for (name, bytes, _) in &cases {
        toml_text.push_str(&format!(
            "[[program]]\nname = \"{name}\"\nsha256 = \"{}\"\nworld = \"request-reply\"\n",
            hex_digest(bytes)
        ));
    }
    let l = loader(Policy::parse(&toml_text, |_| Ok(worlds())).expect("policy"));
    for (name, bytes, expected) in &cases {
        let refused = l.admit(bytes).expect_err(name);
        match expected {
            Some(what) => assert!(
                matches!(&refused, AdmissionError::ExceedsRunLimits { reason } if reason.contains(what)),
                "{name}: {refused}"
            ),
            None => assert_eq!(refused, AdmissionError::MissingRun, "{name}"),
        }
    }
}

#[test]
fn model_open_and_chunk_errors_are_clear_and_logged() {
    use cinfer_gguf::GgmlType;
    use cinfer_gguf::write::{Val, gguf};
    use cinfer_host::models::SealedGguf;
    use cinfer_sealed_model::{ModelKey, seal_bytes};
    let plain = gguf(
        &[("general.architecture", Val::Str("llama".into()))],
        &[("w", vec![64, 64], GgmlType::F32, vec![0u8; 64 * 64 * 4])],
    );
    let key = ModelKey::generate().expect("key");
    let mut sealed = seal_bytes(&key, "m", "k", 4096, &plain).expect("seal");
    // The wrong key: one message, no source that repeats it in a printed chain.
    let other = ModelKey::generate().expect("key");
    let e = SealedGguf::open(Box::new(sealed.clone()), &other).expect_err("wrong key");
    assert!(std::error::Error::source(&e).is_none(), "{e}");
    assert_eq!(
        e.to_string(),
        "sealed model: chunk 0 failed to authenticate"
    );
    // A tampered chunk of tensor data: the program gets `corrupt`, the
    // operator a log line naming the model, the tensor and the chunk.
    let n = sealed.len();
    sealed[n - 40] ^= 1;
    let m = SealedGguf::open(Box::new(sealed), &key).expect("the header chunk is intact");
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let r = tracing::subscriber::with_default(subscriber, || {
        m.load_tensor("w", &cinfer_host::backend::CpuBackend)
    });
    assert_eq!(
        r.expect_err("tampered"),
        cinfer_host::caps::model::ModelError::Corrupt
    );
    let text = String::from_utf8(log.0.lock().expect("lock").clone()).expect("utf-8");
    assert!(
        text.contains("model=m")
            && text.contains("tensor=w")
            && text.contains("failed to authenticate"),
        "{text}"
    );
}

/// A list of borrowed handles lifts to several times its guest bytes on the
/// host (each `Resource` plus a lender record), before the host function sees
/// it. A program filling its memory with one is trapped by the run's
/// `hostcall-bytes` before a single element is lifted, and the same loader
/// runs the next request; a list within the limit reaches the op, which
/// refuses it by its own rule.
#[test]
fn handle_lists_past_hostcall_bytes_trap_before_lifting() {
    let limits = "limits = { memory-bytes = 268435456, hostcall-bytes = 1048576 }";
    let l = loader(policy_for(&[
        ("fixtures/handle-bomb", "compute", limits),
        ("echo", "request-reply", ""),
    ]));
    let key = RequestPrivateKey::generate();
    let exhausted = AbortReason::Interface(
        "too much data is being copied between the host and the guest: \
         fuel allocated for hostcalls has been exhausted"
            .into(),
    );
    // 8 Mi handles: 32 MiB of the guest's memory, 96 MiB of the host's (12 B a
    // handle), past the 1 MiB limit; without it wasmtime's defaults would lift
    // 100,000 of them before its handle limit stopped the run.
    for op in ["stack", "many", "norm"] {
        let started = std::time::Instant::now();
        let (outcome, opened, _) = round_trip(
            &l,
            "fixtures/handle-bomb",
            &key,
            format!("{op} 8388608").as_bytes(),
        );
        assert_eq!(outcome, RunOutcome::Aborted(exhausted.clone()), "{op}");
        assert_eq!(opened.expect("sealed abort").1, ReplyStatus::Aborted);
        eprintln!("{op}: 8 Mi handles trapped in {:?}", started.elapsed());
        let (outcome, opened, _) = round_trip(&l, "echo", &key, b"next");
        assert_eq!(outcome, RunOutcome::Completed, "echo after {op}");
        assert_eq!(opened.expect("echo").0, b"next");
    }
    // 4,096 handles (64 KiB of host memory) reach each op, which refuses them.
    for op in ["stack", "many", "norm"] {
        let (outcome, opened, _) = round_trip(
            &l,
            "fixtures/handle-bomb",
            &key,
            format!("{op} 4096").as_bytes(),
        );
        assert_eq!(outcome, RunOutcome::Completed, "{op}");
        assert_eq!(opened.expect("reply").0, b"invalid-argument", "{op}");
    }
}
