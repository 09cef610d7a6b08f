//! Sealed models and the `llama-chat` program.
//!
//! Tests on tiny generated GGUF files always run. Tests on the real
//! SmolLM2-135M-Instruct model need it fetched (`scripts/fetch-model`): they
//! are skipped with a printed reason locally when it is missing, and fail in
//! CI (`CI` set), which fetches it.

use super::{hex_digest, program, worlds};
use cinfer_envelope::RequestPrivateKey;
use cinfer_gguf::GgmlType;
use cinfer_gguf::write::{Val, gguf};
use cinfer_host::backend::{CpuBackend, DeviceBuffer};
use cinfer_host::caps::model::{ModelError, ModelSource, ModelStore};
use cinfer_host::models::{ModelLoadError, SealedGguf};
use cinfer_host::{Loader, Policy, RunOutcome};
use cinfer_sealed_model::{ModelKey, SealError, seal_bytes};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const MODEL_ID: &str = "smollm2-135m-instruct";

fn tiny_gguf() -> Vec<u8> {
    let mut q8 = Vec::new();
    for row in 0..2u8 {
        q8.extend_from_slice(&half_bits(0.5));
        q8.extend((0..32).map(|i| (i as i8 - 16 + row as i8) as u8));
    }
    gguf(
        &[
            ("general.architecture", Val::Str("llama".into())),
            ("general.name", Val::Str("tiny".into())),
        ],
        &[
            ("w", vec![32, 2], GgmlType::Q8_0, q8),
            (
                "norm",
                vec![32],
                GgmlType::F32,
                (0..32).flat_map(|i| (i as f32).to_le_bytes()).collect(),
            ),
        ],
    )
}

fn half_bits(x: f32) -> [u8; 2] {
    // 0.5 in IEEE half: sign 0, exponent 14, mantissa 0.
    assert_eq!(x, 0.5);
    0x3800u16.to_le_bytes()
}

#[test]
fn sealed_gguf_serves_metadata_and_tensors_and_refuses_tampering() {
    let plain = tiny_gguf();
    let key = ModelKey::generate().expect("key");
    let sealed = seal_bytes(&key, "tiny", "k1", 4096, &plain).expect("seal");
    let m = SealedGguf::open(Box::new(sealed.clone()), &key).expect("open");
    assert_eq!(m.model_id(), "tiny");
    let g = cinfer_gguf::parse(&plain).expect("parse");
    assert_eq!(m.metadata().expect("metadata"), plain[..g.kv_end]);
    let (shape, _) = m.tensor_shape("w").expect("shape");
    assert_eq!(shape, vec![2, 32]);
    // The CPU backend keeps a [2, 32] Q8_0 matrix in its grouped SIMD layout.
    match m.load_tensor("w", &CpuBackend).expect("load") {
        DeviceBuffer::PackedQ8_0(p) => {
            assert_eq!((p.rows(), p.blocks_per_row()), (2, 1));
            let blocks = p.unpack();
            assert_eq!(blocks.len(), 2);
            assert_eq!(blocks[1].d(), 0.5);
            assert_eq!(blocks[1].qs[0], -15);
        }
        other => panic!("expected a packed Q8_0 matrix, got {other:?}"),
    }
    match m.load_tensor("norm", &CpuBackend).expect("load") {
        DeviceBuffer::F32(v) => assert_eq!(v[31], 31.0),
        other => panic!("expected F32, got {other:?}"),
    }
    assert_eq!(
        m.load_tensor("nope", &CpuBackend).unwrap_err(),
        ModelError::NoSuchTensor
    );
    // A flipped ciphertext byte: the header chunk fails to authenticate.
    let mut bad = sealed.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        SealedGguf::open(Box::new(bad), &key),
        Err(ModelLoadError::Sealed(SealError::ChunkAuthentication(0)))
    ));
    // The wrong key.
    let other = ModelKey::generate().expect("key");
    assert!(matches!(
        SealedGguf::open(Box::new(sealed), &other),
        Err(ModelLoadError::Sealed(SealError::ChunkAuthentication(0)))
    ));
    // Sealed bytes that are not a GGUF inside.
    let junk = seal_bytes(&key, "junk", "k1", 4096, b"not a gguf at all").expect("seal");
    assert!(matches!(
        SealedGguf::open(Box::new(junk), &key),
        Err(ModelLoadError::Gguf(_))
    ));
}

#[test]
fn model_user_reads_sealed_metadata_through_the_capability() {
    let plain = tiny_gguf();
    let key = ModelKey::generate().expect("key");
    let sealed = seal_bytes(&key, "smollm2-135m-instruct", "k1", 4096, &plain).expect("seal");
    let mut models = ModelStore::default();
    models.insert(
        "smollm2-135m-instruct",
        Arc::new(SealedGguf::open(Box::new(sealed), &key).expect("open")),
    );
    let policy = super::policy_for(&[(
        "fixtures/model-user",
        "inference",
        "models = [\"smollm2-135m-instruct\"]",
    )]);
    let l = super::loader_with(policy, models);
    let rk = RequestPrivateKey::generate();
    let (outcome, opened, _) = super::round_trip(&l, "fixtures/model-user", &rk, b"");
    assert_eq!(outcome, RunOutcome::Completed);
    let g = cinfer_gguf::parse(&plain).expect("parse");
    assert_eq!(opened.expect("reply").0, plain[..g.kv_end]);
}

/// The real model's path, or None (with the reason printed) when it is not fetched.
fn real_model() -> Option<PathBuf> {
    let path = std::env::var_os("CINFER_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dir = std::env::var_os("CINFER_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/cinfer/models")
                });
            dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: CI must run scripts/fetch-model",
        path.display()
    );
    println!(
        "skipped: {} not found; run scripts/fetch-model",
        path.display()
    );
    None
}

struct Chat {
    loader: Loader,
    key: RequestPrivateKey,
}

/// One loader serving the sealed real model to llama-chat, shared by the
/// tests (the default configuration: cross-request batching on, so tests
/// running at once share rounds).
fn chat() -> Option<&'static Chat> {
    static CHAT: OnceLock<Option<Chat>> = OnceLock::new();
    CHAT.get_or_init(|| new_chat(true)).as_ref()
}

/// A loader serving the sealed real model to llama-chat.
fn new_chat(batching: bool) -> Option<Chat> {
    {
        let path = real_model()?;
        let plain = std::fs::read(&path).expect("model");
        let key = ModelKey::generate().expect("key");
        let sealed = seal_bytes(&key, MODEL_ID, "test-key", 1 << 20, &plain).expect("seal");
        drop(plain);
        let mut models = ModelStore::default();
        models.insert(
            MODEL_ID,
            Arc::new(SealedGguf::open(Box::new(sealed), &key).expect("open")),
        );
        let toml_text = format!(
            "worlds = \"worlds.wit\"\n[[program]]\nname = \"llama-chat\"\nsha256 = \"{}\"\nworld = \"inference\"\nmodels = [\"{MODEL_ID}\"]\nlimits = {{ memory-bytes = 268435456, deadline-ms = 300000, accelerator-bytes = 1073741824 }}\n",
            hex_digest(&program("llama-chat"))
        );
        let policy = Policy::parse(&toml_text, |_| Ok(worlds())).expect("policy");
        let loader = super::loader_configured(policy, models, batching);
        Some(Chat {
            loader,
            key: RequestPrivateKey::generate(),
        })
    }
}

impl Chat {
    fn ask(&self, request: &Value) -> (RunOutcome, String) {
        let (outcome, opened, _) = super::round_trip(
            &self.loader,
            "llama-chat",
            &self.key,
            request.to_string().as_bytes(),
        );
        let text = String::from_utf8(opened.expect("reply opens").0).expect("utf-8 reply");
        (outcome, text)
    }
}

/// `$CINFER_REFERENCE_DIR`, else `../shared/reference` beside the checkout
/// when present (it may hold more cases), else the copy in `tests/reference`.
fn reference_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CINFER_REFERENCE_DIR") {
        return d.into();
    }
    let shared = super::root().join("../shared/reference");
    if shared.is_dir() {
        return shared;
    }
    super::root().join("tests/reference")
}

fn reference(name: &str) -> Vec<Value> {
    let path = reference_dir().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Largest top-1/top-2 log-probability margin (nats) at which our first
/// divergence from llama.cpp's greedy sequence is accepted. Justification
/// (BENCHMARKS.md / issue note): on the first position of "Once upon a time",
/// an exact f32 forward pass differs from llama.cpp's logprobs by 0.11 RMS
/// (0.38 max) over the top-100 tokens, and this implementation (llama.cpp's
/// Q8_1/Q8_0 activation quantization plus an f16 KV cache) by 0.17 RMS; the
/// model is that sensitive to rounding. A step whose margin is below 0.25 can
/// therefore flip between two correct implementations; every divergence seen
/// here was at a margin of 0.04–0.11.
const NEAR_TIE_NATS: f64 = 0.25;

#[test]
fn greedy_generation_matches_llama_cpp_up_to_near_ties() {
    let Some(chat) = chat() else { return };
    let margins: Vec<Value> = reference("smollm2-greedy-top10-logprobs.jsonl");
    let mut complete_cases = 0;
    for case in reference("smollm2-greedy.jsonl") {
        let name = case["case"].as_str().expect("case");
        let want: Vec<u64> = case["generated_token_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let request = serde_json::json!({
            "prompt": case["prompt"],
            "max_tokens": want.len(),
            "format": "ids",
            "ignore_eos": case["mode"] == "raw_ignore_eos",
        });
        let (outcome, text) = chat.ask(&request);
        assert_eq!(outcome, RunOutcome::Completed, "{name}");
        let got: Vec<u64> = text
            .split_whitespace()
            .map(|t| t.parse().expect("id"))
            .collect();
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        if same < want.len() {
            let steps = margins
                .iter()
                .find(|m| m["case"] == name)
                .and_then(|m| m["steps"].as_array())
                .expect("margins for the case");
            let margin = steps[same]["top1_top2_margin"].as_f64().expect("margin");
            println!(
                "{name}: first divergence at step {same} of {} (reference margin {margin:.4})",
                want.len()
            );
            assert!(
                margin < NEAR_TIE_NATS,
                "{name}: diverged at step {same} where llama.cpp's top-1/top-2 margin is {margin:.4} nats (got {:?}, want {:?})",
                &got[same..],
                &want[same..]
            );
        } else {
            assert_eq!(
                got.len(),
                want.len(),
                "{name}: generated more tokens than the reference"
            );
            println!("{name}: all {} tokens match", want.len());
            complete_cases += 1;
        }
    }
    assert!(
        complete_cases >= 1,
        "no case reproduced its whole reference sequence"
    );
}

#[test]
fn first_position_logprobs_match_llama_cpp() {
    let Some(chat) = chat() else { return };
    let path = reference_dir().join("smollm2-once-upon-first-pos.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("json");
    let request =
        serde_json::json!({"prompt": "Once upon a time", "max_tokens": 1, "format": "logprobs"});
    let (outcome, text) = chat.ask(&request);
    assert_eq!(outcome, RunOutcome::Completed);
    let line: Value = serde_json::from_str(text.trim()).expect("logprobs line");
    assert_eq!(line["id"], reference["argmax_id"], "argmax differs");
    let full = &reference["full_logprobs_by_id"];
    for pair in line["top"].as_array().expect("top") {
        let id = pair[0].as_u64().expect("id");
        let ours = pair[1].as_f64().expect("logprob");
        let theirs = full[id.to_string()]
            .as_f64()
            .or_else(|| full[id as usize].as_f64())
            .expect("reference logprob");
        // Tolerance: see NEAR_TIE_NATS; 0.3 nats covers the 0.17 RMS / 0.27 max
        // deviation measured on these ten tokens.
        assert!(
            (ours - theirs).abs() < 0.3,
            "token {id}: {ours:.4} vs llama.cpp {theirs:.4}"
        );
    }
}

#[test]
fn chat_answers_with_the_chatml_template() {
    let Some(chat) = chat() else { return };
    let request = serde_json::json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
        "default_system": false,
    });
    let (outcome, text) = chat.ask(&request);
    assert_eq!(outcome, RunOutcome::Completed);
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn batched_runs_answer_exactly_as_runs_alone() {
    let Some(chat) = chat() else { return };
    let alone = new_chat(false).expect("the model is there");
    let long = "Write a short story about a robot who learns to paint, \
                in the style of a fairy tale, with a happy ending and a moral \
                about patience and practice.";
    let requests: Vec<Value> = [
        "The capital of France is",
        "Once upon a time",
        "1, 2, 3, 4,",
        "def fibonacci(n):",
        // A prompt pass of over 32 rows launches directly, beside the others' rounds.
        long,
    ]
    .iter()
    .map(|p| serde_json::json!({"prompt": p, "max_tokens": 16, "format": "ids"}))
    .chain([
        serde_json::json!({"prompt": "The weather today is", "max_tokens": 16,
        "temperature": 0.9, "top_k": 40, "seed": 3, "format": "ids"}),
    ])
    .collect();
    let want: Vec<(RunOutcome, String)> = requests.iter().map(|r| alone.ask(r)).collect();
    assert!(alone.loader.batch_stats().is_none(), "batching off");
    let before = chat.loader.batch_stats().expect("batching on by default");
    let got: Vec<(RunOutcome, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = requests.iter().map(|r| s.spawn(|| chat.ask(r))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("run"))
            .collect()
    });
    assert_eq!(got, want, "the same tokens, batched or alone");
    assert!(want.iter().all(|(o, _)| *o == RunOutcome::Completed));
    let after = chat.loader.batch_stats().expect("batching on");
    assert!(
        after.fused > before.fused,
        "rounds carried several runs' launches: {before:?} → {after:?}"
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let Some(chat) = chat() else { return };
    let ask = |seed: u64| {
        chat.ask(&serde_json::json!({"prompt": "The weather today is", "max_tokens": 12, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": seed, "format": "ids"})).1
    };
    let a = ask(7);
    assert_eq!(a, ask(7), "same seed, same tokens");
    assert_ne!(a, ask(8), "another seed, other tokens (12 sampled steps)");
}

#[test]
fn llama_chat_refuses_bad_requests_with_a_reason() {
    let Some(chat) = chat() else { return };
    let (outcome, text) = chat.ask(&serde_json::json!({"prompt": "x", "messages": []}));
    assert_eq!(outcome, RunOutcome::ProgramFailed);
    assert!(text.contains("exactly one of"), "{text}");
    let (outcome, text) = chat.ask(&serde_json::json!({"prompt": "x", "bogus": 1}));
    assert_eq!(outcome, RunOutcome::ProgramFailed);
    assert!(text.contains("unknown field"), "{text}");
    let (outcome, _) = chat.ask(&serde_json::json!({"prompt": "x", "model": "other-model"}));
    assert_eq!(
        outcome,
        RunOutcome::ProgramFailed,
        "a model the policy does not list"
    );
}

/// An `events-v1` reply: the text, and the last event (`end` or `error`)
/// (`logprobs` events are skipped; see [`logprob_events`]).
fn events(text: &str) -> (String, Value) {
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .filter(|e| e["type"] != "logprobs")
        .collect();
    let (last, body) = lines.split_last().expect("at least one event");
    let mut out = String::new();
    for e in body {
        assert_eq!(e["type"], "text", "only text before the last event: {e}");
        out.push_str(e["text"].as_str().expect("text"));
    }
    (out, last.clone())
}

/// `events-v1` (what `cinfer proxy` asks for): the prompt's token count (as
/// llama.cpp counts it), the sampled tokens, and `length` when `max_tokens`
/// cut the answer, `stop` when the model ended it; the same text as `text`.
#[test]
fn events_report_token_counts_and_the_finish_reason() {
    let Some(chat) = chat() else { return };
    let case = reference("smollm2-greedy.jsonl")
        .into_iter()
        .find(|c| c["case"] == "raw/once_upon")
        .expect("case");
    let (outcome, text) = chat.ask(&serde_json::json!({
        "prompt": case["prompt"], "max_tokens": 5, "format": "events-v1"
    }));
    assert_eq!(outcome, RunOutcome::Completed);
    let (_, end) = events(&text);
    assert_eq!(
        end,
        serde_json::json!({"type": "end", "finish_reason": "length",
            "prompt_tokens": case["n_prompt_tokens"], "completion_tokens": 5})
    );
    let ask = |format: &str| {
        chat.ask(&serde_json::json!({
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 64, "default_system": false, "format": format,
        }))
    };
    let (outcome, plain) = ask("text");
    assert_eq!(outcome, RunOutcome::Completed);
    let (outcome, text) = ask("events-v1");
    assert_eq!(outcome, RunOutcome::Completed);
    let (answer, end) = events(&text);
    assert_eq!(answer, plain);
    assert_eq!(end["finish_reason"], "stop", "{end}");
    let n = end["completion_tokens"].as_u64().expect("count");
    assert!((1..64).contains(&n), "{end}");
    assert!(end["prompt_tokens"].as_u64().expect("count") > 7, "{end}");
}

/// A stop sequence ends generation in the program: the text up to it, never
/// the sequence, `finish_reason` `stop`, and fewer tokens than without it.
#[test]
fn stop_sequences_end_generation_before_the_sequence() {
    let Some(chat) = chat() else { return };
    let ask = |stop: Value| {
        let (outcome, text) = chat.ask(&serde_json::json!({
            "prompt": "Once upon a time", "max_tokens": 24, "format": "events-v1", "stop": stop
        }));
        assert_eq!(outcome, RunOutcome::Completed);
        events(&text)
    };
    let (full, end) = ask(serde_json::json!([]));
    assert_eq!(end["finish_reason"], "length");
    // The third word of the unstopped answer (and one that never occurs).
    let word = full
        .split_whitespace()
        .nth(2)
        .expect("three words")
        .to_owned();
    let (cut, end) = ask(serde_json::json!(["zzzz-never", word]));
    assert_eq!(
        cut,
        full[..full.find(&word).expect("word")],
        "{full:?} / {word:?}"
    );
    assert_eq!(end["finish_reason"], "stop", "{end}");
    assert!(end["completion_tokens"].as_u64() < Some(24), "{end}");
    // The same in the plain text format.
    let (_, text) = chat.ask(&serde_json::json!({
        "prompt": "Once upon a time", "max_tokens": 24, "stop": [word]
    }));
    assert_eq!(text, cut);
}

/// Presence and frequency penalties (OpenAI's, on generated tokens) steer
/// greedy decoding away from repeating itself; zero penalties change nothing.
#[test]
fn penalties_reduce_repetition() {
    let Some(chat) = chat() else { return };
    let ids = |extra: Value| {
        let mut req = serde_json::json!({
            "prompt": "the the the the the the the the", "max_tokens": 16, "format": "ids"
        });
        for (k, v) in extra.as_object().expect("object") {
            req[k] = v.clone();
        }
        let (outcome, text) = chat.ask(&req);
        assert_eq!(outcome, RunOutcome::Completed);
        text.split_whitespace()
            .map(|t| t.parse::<u32>().expect("id"))
            .collect::<Vec<_>>()
    };
    let most_repeated = |ids: &[u32]| {
        ids.iter()
            .map(|a| ids.iter().filter(|b| *b == a).count())
            .max()
            .unwrap_or(0)
    };
    let plain = ids(serde_json::json!({}));
    assert_eq!(
        plain,
        ids(serde_json::json!({"presence_penalty": 0.0, "frequency_penalty": 0.0}))
    );
    let penalized = ids(serde_json::json!({"frequency_penalty": 2.0}));
    let present = ids(serde_json::json!({"presence_penalty": 2.0}));
    println!(
        "most repeated token: {} plain, {} frequency 2, {} presence 2",
        most_repeated(&plain),
        most_repeated(&penalized),
        most_repeated(&present)
    );
    assert!(
        most_repeated(&penalized) < most_repeated(&plain),
        "{plain:?} vs {penalized:?}"
    );
    assert!(
        most_repeated(&present) < most_repeated(&plain),
        "{plain:?} vs {present:?}"
    );
}

/// The `content` entries of an `events-v1` reply's `logprobs` events.
fn logprob_events(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json line"))
        .filter(|e| e["type"] == "logprobs")
        .flat_map(|e| e["content"].as_array().expect("content").clone())
        .collect()
}

/// `logprobs` events (what the proxy turns into OpenAI's `logprobs`): one
/// entry per generated token, whose bytes make up the text, the chosen
/// token's log-probability first among the alternatives when greedy, and
/// the first position's alternatives as llama.cpp computes them.
#[test]
fn logprob_events_cover_each_token_and_match_llama_cpp() {
    let Some(chat) = chat() else { return };
    let (outcome, text) = chat.ask(&serde_json::json!({
        "prompt": "Once upon a time", "max_tokens": 4, "format": "events-v1",
        "logprobs": true, "top_logprobs": 5
    }));
    assert_eq!(outcome, RunOutcome::Completed);
    let (answer, end) = events(&text);
    let entries = logprob_events(&text);
    assert_eq!(entries.len(), 4, "{text}");
    assert_eq!(end["completion_tokens"], 4);
    let bytes: Vec<u8> = entries
        .iter()
        .flat_map(|e| e["bytes"].as_array().expect("bytes").clone())
        .map(|b| b.as_u64().expect("byte") as u8)
        .collect();
    assert_eq!(String::from_utf8(bytes).expect("utf-8"), answer);
    for e in &entries {
        let top = e["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 5, "{e}");
        assert_eq!(top[0]["token"], e["token"], "greedy takes the most likely");
        assert_eq!(top[0]["logprob"], e["logprob"]);
        let lps: Vec<f64> = top
            .iter()
            .map(|t| t["logprob"].as_f64().expect("lp"))
            .collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0,
            "{lps:?}"
        );
    }
    let path = reference_dir().join("smollm2-once-upon-first-pos.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("json");
    let full = &reference["full_logprobs_by_id"];
    let first = entries[0]["top_logprobs"].as_array().expect("top");
    // Token ids are not in the event; the reference's top ids, spelled by
    // their logprob, must be the same set (tolerance: see NEAR_TIE_NATS).
    let ours: Vec<f64> = first
        .iter()
        .map(|t| t["logprob"].as_f64().expect("lp"))
        .collect();
    let mut theirs: Vec<f64> = full
        .as_object()
        .map(|o| o.values().filter_map(Value::as_f64).collect())
        .or_else(|| {
            full.as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
        })
        .expect("reference logprobs");
    theirs.sort_by(|a, b| b.total_cmp(a));
    for (o, t) in ours.iter().zip(&theirs) {
        assert!(
            (o - t).abs() < 0.3,
            "{ours:?} vs llama.cpp {:?}",
            &theirs[..5]
        );
    }
    // Not asked for: no logprobs events.
    let (_, text) = chat.ask(&serde_json::json!({
        "prompt": "Once upon a time", "max_tokens": 2, "format": "events-v1"
    }));
    assert!(logprob_events(&text).is_empty());
}

/// `response_format: json_object`: the sampler picks only tokens that keep
/// the output the start of a JSON object and ends generation when it is
/// complete, so the answer parses as one, greedy or sampled; cut by
/// `max_tokens` it is an unfinished prefix (`length`). (As with OpenAI's
/// JSON mode the prompt must ask for JSON: unasked, this model rambles on
/// inside the object until `max_tokens`.)
#[test]
fn json_object_output_is_a_json_object_by_construction() {
    let Some(chat) = chat() else { return };
    let ask = |content: &str, extra: Value| {
        let mut req = serde_json::json!({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 160, "format": "events-v1", "response_format": "json_object",
        });
        for (k, v) in extra.as_object().expect("object") {
            req[k] = v.clone();
        }
        let (outcome, text) = chat.ask(&req);
        assert_eq!(outcome, RunOutcome::Completed, "{text}");
        events(&text)
    };
    for (content, extra) in [
        (
            "Describe Paris as JSON with the keys name and country.",
            serde_json::json!({}),
        ),
        (
            "Answer with a JSON object with the key answer: what is the capital of France?",
            serde_json::json!({}),
        ),
        (
            "Describe Paris as JSON with the keys name and country.",
            serde_json::json!({"temperature": 1.0, "seed": 3}),
        ),
    ] {
        let (answer, end) = ask(content, extra.clone());
        println!("{content:?} {extra}: {answer}");
        assert_eq!(end["finish_reason"], "stop", "{answer}");
        let v: Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"));
        assert!(v.is_object(), "{answer}");
    }
    // A question the model answers in prose: constrained, it starts an object.
    let (prose, _) = ask(
        "What is the capital of France?",
        serde_json::json!({"max_tokens": 3, "response_format": "text"}),
    );
    assert!(!prose.trim_start().starts_with('{'), "{prose:?}");
    let (answer, end) = ask(
        "What is the capital of France?",
        serde_json::json!({"max_tokens": 3}),
    );
    assert_eq!(end["finish_reason"], "length");
    assert!(answer.trim_start().starts_with('{'), "{answer:?}");
    assert!(
        serde_json::from_str::<Value>(&answer).is_err(),
        "{answer:?}"
    );
}

/// `response_format: json_schema`: the output is a value the schema admits,
/// greedy or sampled: every required property, in the schema's order, of
/// the schema's types and lengths (the schema's text is passed as a string,
/// as the proxy does, so the order survives).
#[test]
fn json_schema_output_follows_the_schema_by_construction() {
    let Some(chat) = chat() else { return };
    let schema = r#"{"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population_millions": {"type": "number"},
        "is_capital": {"type": "boolean"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 3},
        "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]}
    }, "required": ["name", "country", "population_millions", "is_capital", "landmarks", "continent"],
    "additionalProperties": false}"#;
    for extra in [
        serde_json::json!({}),
        serde_json::json!({"temperature": 1.0, "seed": 5}),
    ] {
        let mut req = serde_json::json!({
            "messages": [{"role": "user", "content": "Describe Paris as JSON."}],
            "max_tokens": 200, "format": "events-v1",
            "response_format": "json_schema", "json_schema": schema,
        });
        for (k, v) in extra.as_object().expect("object") {
            req[k] = v.clone();
        }
        let (outcome, text) = chat.ask(&req);
        assert_eq!(outcome, RunOutcome::Completed, "{text}");
        let (answer, end) = events(&text);
        println!("{extra}: {answer}");
        assert_eq!(end["finish_reason"], "stop", "{answer}");
        // The keys in the order written (this crate's serde_json sorts maps).
        assert_eq!(
            keys_in_order(&answer),
            [
                "name",
                "country",
                "population_millions",
                "is_capital",
                "landmarks",
                "continent"
            ],
            "{answer}"
        );
        let v: Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"));
        let short = |v: &Value, max: usize| v.as_str().is_some_and(|s| s.chars().count() <= max);
        assert!(short(&v["name"], 24) && short(&v["country"], 24), "{v}");
        assert!(
            v["population_millions"].is_number() && v["is_capital"].is_boolean(),
            "{v}"
        );
        let landmarks = v["landmarks"].as_array().expect("landmarks");
        assert!((1..=3).contains(&landmarks.len()), "{v}");
        assert!(landmarks.iter().all(|l| short(l, 40)), "{v}");
        assert!(
            ["Europe", "Asia", "Africa", "America", "Oceania"]
                .contains(&v["continent"].as_str().unwrap_or("")),
            "{v}"
        );
    }
}

/// The keys of a JSON object in the order they are written.
fn keys_in_order(text: &str) -> Vec<String> {
    struct Keys(Vec<String>);
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Keys;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
            let mut keys = Vec::new();
            while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                keys.push(k);
            }
            Ok(Keys(keys))
        }
    }
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(Visit)
        }
    }
    serde_json::from_str::<Keys>(text).map_or_else(|e| panic!("{e}: {text}"), |k| k.0)
}

/// Failures are typed `error` events a client can map (never an `end`):
/// a prompt longer than the context, a model the program may not open, and
/// out-of-range parameters.
#[test]
fn events_carry_typed_errors() {
    let Some(chat) = chat() else { return };
    let error = |req: Value| {
        let mut req = req;
        req["format"] = "events-v1".into();
        let (outcome, text) = chat.ask(&req);
        assert_eq!(outcome, RunOutcome::ProgramFailed, "{text}");
        let (before, last) = events(&text);
        assert_eq!(before, "", "no text before the error");
        assert_eq!(last["type"], "error", "{last}");
        (
            last["code"].as_str().expect("code").to_owned(),
            last["message"].as_str().expect("message").to_owned(),
        )
    };
    let long = "hello ".repeat(9000);
    let (code, message) = error(serde_json::json!({"prompt": long}));
    assert_eq!(code, "context_length_exceeded");
    assert!(message.contains("context is 8192 tokens"), "{message}");
    let (code, message) = error(serde_json::json!({"prompt": "x", "model": "gpt-4"}));
    assert_eq!(code, "model_not_found");
    assert!(message.contains("`gpt-4`"), "{message}");
    for (req, needle) in [
        (
            serde_json::json!({"prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            serde_json::json!({"prompt": "x", "temperature": -1.0}),
            "temperature",
        ),
        (serde_json::json!({"prompt": "x", "top_p": 1.5}), "top_p"),
        (
            serde_json::json!({"prompt": "x", "frequency_penalty": 3.0}),
            "frequency_penalty",
        ),
        (
            serde_json::json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
        ),
        (
            serde_json::json!({"prompt": "x", "bogus": 1}),
            "unknown field",
        ),
        (
            serde_json::json!({"prompt": "x", "response_format": "json_schema",
                               "json_schema": {"type": "string", "pattern": "^a"}}),
            "response_format json_schema: #: keyword `pattern` is not supported",
        ),
        (
            serde_json::json!({"prompt": "x", "response_format": "json_schema",
                               "json_schema": "{\"type\": "}),
            "response_format json_schema: not JSON",
        ),
        (
            serde_json::json!({"prompt": "x", "json_schema": {"type": "string"}}),
            "json_schema goes with response_format json_schema",
        ),
    ] {
        let (code, message) = error(req);
        assert_eq!(code, "invalid_request");
        assert!(message.contains(needle), "{message}");
    }
}

/// GPT-2's byte → printable character map (how byte-level BPE vocabularies spell bytes).
fn byte_char(b: u8) -> char {
    let printable =
        |c: u32| (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
    if printable(u32::from(b)) {
        return char::from(b);
    }
    let shift = (0..u32::from(b)).filter(|c| !printable(*c)).count() as u32;
    char::from_u32(256 + shift).expect("valid char")
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(seed: &mut u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed ^= *seed >> 12;
            *seed ^= *seed << 25;
            *seed ^= *seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// Random weights of `ty` for a [rows, cols] matrix, in GGUF encoding.
fn random_weights(seed: &mut u64, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let h = |x: f32| half::f16::from_f32(x).to_le_bytes();
    let blocks = rows * cols / 32;
    match ty {
        GgmlType::Q4_1 => (0..blocks)
            .flat_map(|_| [h(0.02).to_vec(), h(-0.15).to_vec(), noise(seed, 16)].concat())
            .collect(),
        GgmlType::Q8_0 => (0..blocks)
            .flat_map(|_| [h(0.004).to_vec(), noise(seed, 32)].concat())
            .collect(),
        GgmlType::F16 => noise(seed, rows * cols)
            .iter()
            .flat_map(|b| h((f32::from(*b) - 127.5) / 600.0))
            .collect(),
        GgmlType::F32 => noise(seed, rows * cols)
            .iter()
            .flat_map(|b| ((f32::from(*b) - 127.5) / 600.0).to_le_bytes())
            .collect(),
    }
}

/// A tiny random llama: 2 layers, dim 64, ffn 96, `heads` query and `kv_heads` key/value heads,
/// matrices of type `ty`, a byte-level vocabulary of 256 + 3 special tokens.
fn tiny_llama(heads: u32, kv_heads: u32, ty: GgmlType, tied: bool) -> Vec<u8> {
    let (dim, ffn, vocab) = (64usize, 96usize, 259usize);
    let kv_dim = kv_heads as usize * (dim / heads as usize);
    let mut seed = 0x1234_5678_9abc_def1u64 ^ u64::from(heads * 31 + kv_heads);
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    let mut types = vec![1i32; 256];
    types.extend([3, 3, 3]);
    let norm = |seed: &mut u64| {
        noise(seed, dim)
            .iter()
            .flat_map(|b| (0.8 + f32::from(*b) / 640.0).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let mut tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)> = vec![
        (
            "token_embd.weight".into(),
            vec![dim as u64, vocab as u64],
            GgmlType::Q8_0,
            random_weights(&mut seed, GgmlType::Q8_0, vocab, dim),
        ),
        (
            "output_norm.weight".into(),
            vec![dim as u64],
            GgmlType::F32,
            norm(&mut seed),
        ),
    ];
    if !tied {
        tensors.push((
            "output.weight".into(),
            vec![dim as u64, vocab as u64],
            ty,
            random_weights(&mut seed, ty, vocab, dim),
        ));
    }
    for l in 0..2 {
        let mut mat = |name: &str, rows: usize, cols: usize| {
            (
                format!("blk.{l}.{name}.weight"),
                vec![cols as u64, rows as u64],
                ty,
                random_weights(&mut seed, ty, rows, cols),
            )
        };
        let layer = [
            mat("attn_q", dim, dim),
            mat("attn_k", kv_dim, dim),
            mat("attn_v", kv_dim, dim),
            mat("attn_output", dim, dim),
            mat("ffn_gate", ffn, dim),
            mat("ffn_up", ffn, dim),
            mat("ffn_down", dim, ffn),
        ];
        tensors.extend(layer);
        tensors.push((
            format!("blk.{l}.attn_norm.weight"),
            vec![dim as u64],
            GgmlType::F32,
            norm(&mut seed),
        ));
        tensors.push((
            format!("blk.{l}.ffn_norm.weight"),
            vec![dim as u64],
            GgmlType::F32,
            norm(&mut seed),
        ));
    }
    let refs: Vec<(&str, Vec<u64>, GgmlType, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, t, b)| (n.as_str(), d.clone(), *t, b.clone()))
        .collect();
    gguf(
        &[
            ("general.architecture", Val::Str("llama".into())),
            ("llama.block_count", Val::U32(2)),
            ("llama.embedding_length", Val::U32(dim as u32)),
            ("llama.feed_forward_length", Val::U32(ffn as u32)),
            ("llama.attention.head_count", Val::U32(heads)),
            ("llama.attention.head_count_kv", Val::U32(kv_heads)),
            ("llama.rope.freq_base", Val::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5)),
            ("llama.context_length", Val::U32(64)),
            ("tokenizer.ggml.model", Val::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Val::Str("smollm".into())),
            ("tokenizer.ggml.tokens", Val::Strs(tokens)),
            ("tokenizer.ggml.token_type", Val::I32s(types)),
            ("tokenizer.ggml.merges", Val::Strs(Vec::new())),
            ("tokenizer.ggml.bos_token_id", Val::U32(257)),
            ("tokenizer.ggml.eos_token_id", Val::U32(258)),
            ("tokenizer.ggml.add_bos_token", Val::Bool(false)),
        ],
        &refs,
    )
}

/// llama-chat reads every dimension from the metadata: on tiny random models
/// of several shapes and weight types it produces exactly the tokens the same
/// forward pass gives when driven natively. Runs without the model download.
#[test]
fn llama_chat_matches_a_native_forward_on_tiny_random_models() {
    let configs = [
        (4, 2, GgmlType::Q4_1, true), // GQA, quantized, tied head (like SmolLM2)
        (4, 4, GgmlType::Q8_0, false), // multi-head, Q8_0, separate output.weight
        (4, 1, GgmlType::F16, false), // multi-query, f16 weights
        (2, 2, GgmlType::F32, true),  // f32 weights, head_dim 32
    ];
    for (heads, kv_heads, ty, tied) in configs {
        let plain = tiny_llama(heads, kv_heads, ty, tied);
        let key = ModelKey::generate().expect("key");
        let sealed = seal_bytes(&key, "tiny-llama", "k", 4096, &plain).expect("seal");
        let model = Arc::new(SealedGguf::open(Box::new(sealed), &key).expect("open"));
        let tok =
            cinfer_tokenizer::Tokenizer::from_gguf(&cinfer_gguf::parse(&plain).expect("gguf"))
                .expect("tokenizer");
        let prompt = tok.encode("hello, tiny model", true);
        assert_eq!(prompt.len(), 17, "byte-level tokens, no merges");
        let want = super::native_llama::NativeLlama::new(&model)
            .generate(&prompt, 12, |id| tok.is_eog(id));

        let mut models = ModelStore::default();
        models.insert("tiny-llama", model);
        let policy = super::policy_for(&[(
            "llama-chat",
            "inference",
            "models = [\"tiny-llama\"]\nlimits = { memory-bytes = 268435456 }",
        )]);
        let l = super::loader_with(policy, models);
        let request = serde_json::json!({"model": "tiny-llama", "prompt": "hello, tiny model", "max_tokens": 12, "format": "ids", "ignore_eos": true});
        let rk = RequestPrivateKey::generate();
        let (outcome, opened, _) =
            super::round_trip(&l, "llama-chat", &rk, request.to_string().as_bytes());
        assert_eq!(outcome, RunOutcome::Completed, "{heads}/{kv_heads} {ty:?}");
        let text = String::from_utf8(opened.expect("reply").0).expect("utf-8");
        let got: Vec<u32> = text
            .split_whitespace()
            .map(|t| t.parse().expect("id"))
            .collect();
        assert_eq!(got, want, "{heads}/{kv_heads} {ty:?} tied={tied}");
    }
}
