//! Checks the tokenizer against llama.cpp's own output for SmolLM2-135M-Instruct
//! (`../shared/reference/`, made with stock llama.cpp at c392e5094d).
//!
//! Needs the model (`scripts/fetch-model`): `CINFER_MODEL`, else
//! `${CINFER_MODEL_DIR:-$HOME/.cache/cinfer/models}/SmolLM2-135M-Instruct.Q4_1.gguf`. Without
//! it the tests are skipped, except under CI (`CI` set), where they fail.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cinfer_tokenizer::{PreTokenizer, Tokenizer, Utf8Stream};
use serde_json::Value;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CINFER_MODEL") {
        return p.into();
    }
    let dir = match std::env::var_os("CINFER_MODEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/cinfer/models")
        }
    };
    dir.join(MODEL)
}

/// `$CINFER_REFERENCE_DIR`, else `../shared/reference` beside the checkout
/// when present (it may hold more cases), else the copy in `tests/reference`.
fn reference_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CINFER_REFERENCE_DIR") {
        return d.into();
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference");
    if shared.is_dir() {
        return shared;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference")
}

/// Skips (prints why) or, under CI, fails.
fn missing(what: &str) -> Option<&'static Tokenizer> {
    let msg = format!("{what}; run scripts/fetch-model (or set CINFER_MODEL)");
    if std::env::var_os("CI").is_some() {
        panic!("reference tokenizer test: {msg}");
    }
    println!("skipped: {msg}");
    None
}

fn tokenizer() -> Option<&'static Tokenizer> {
    static TOKENIZER: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let path = model_path();
    let t = TOKENIZER.get_or_init(|| {
        let file = std::fs::File::open(&path).ok()?;
        // The metadata (vocabulary and merges) is in the first few MB; read more if not.
        let mut bytes = Vec::new();
        file.take(16 << 20)
            .read_to_end(&mut bytes)
            .expect("read model");
        let start = std::time::Instant::now();
        let t = match Tokenizer::from_gguf_bytes(&bytes) {
            Ok(t) => {
                println!("tokenizer built in {:?}", start.elapsed());
                t
            }
            Err(_) => {
                let all = std::fs::read(&path).expect("read model");
                Tokenizer::from_gguf_bytes(&all).expect("tokenizer from the model")
            }
        };
        Some(t)
    });
    match t {
        Some(t) => Some(t),
        None => missing(&format!("no model at {}", path.display())),
    }
}

fn jsonl(name: &str) -> Option<Vec<Value>> {
    let path = reference_dir().join(name);
    let Ok(text) = std::fs::read_to_string(&path) else {
        if std::env::var_os("CI").is_some() {
            panic!("reference data missing: {}", path.display());
        }
        println!("skipped: no reference data at {}", path.display());
        return None;
    };
    Some(
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect(),
    )
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("u32 id"))
        .collect()
}

fn text(v: &Value) -> &str {
    v.as_str().expect("string")
}

#[test]
fn metadata() {
    let Some(t) = tokenizer() else { return };
    assert_eq!(t.n_vocab(), 49152);
    assert_eq!(t.pre_tokenizer(), PreTokenizer::DigitsThenGpt2);
    assert_eq!((t.bos(), t.eos(), t.eot()), (Some(1), Some(2), Some(0)));
    assert!(!t.add_bos());
    assert_eq!(t.eog_ids(), [0, 2]);
    assert!(t.is_eog(0) && t.is_eog(2) && !t.is_eog(1) && !t.is_eog(28));
    assert_eq!(t.token_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_id("<|im_end|>"), Some(2));
    assert_eq!(t.token_bytes(2, true), b"<|im_end|>");
    assert!(t.token_bytes(2, false).is_empty());
    assert_eq!(t.token_bytes(28, false), b",");
    assert_eq!(t.token_bytes(1116, false), b"\n\n");
}

#[test]
fn tokenize_matches_llama_cpp() {
    let Some(t) = tokenizer() else { return };
    let Some(cases) = jsonl("smollm2-tokenize.jsonl") else {
        return;
    };
    assert!(!cases.is_empty());
    check_tokenize_cases(t, &cases);
}

/// The model as `cinfer seal-model` stores it, with the tokenizer image in its metadata: the
/// tokenizer read from the image alone gives llama.cpp's ids too.
#[test]
fn embedded_image_matches_llama_cpp() {
    let Some(t) = tokenizer() else { return };
    let Some(cases) = jsonl("smollm2-tokenize.jsonl") else {
        return;
    };
    let plain = std::fs::read(model_path()).expect("read model");
    let embedded = cinfer_tokenizer::embed_image(&plain).expect("embed the image");
    drop(plain);
    let g = cinfer_gguf::parse_metadata(&embedded).expect("metadata");
    let image = g
        .array(cinfer_tokenizer::IMAGE_KEY)
        .expect("image key")
        .as_bytes()
        .expect("u8 array");
    assert!(image == t.image(), "the image is the built tokenizer's");
    let start = std::time::Instant::now();
    let from_image = Tokenizer::from_gguf(&g).expect("tokenizer from the image");
    println!("tokenizer from the image in {:?}", start.elapsed());
    check_tokenize_cases(&from_image, &cases);
}

/// More cases in the same format (`text`, `parse_special`, `ids`), e.g. from a differential run
/// against llama.cpp: `CINFER_TOKENIZE_CASES=/path/cases.jsonl`.
#[test]
fn tokenize_matches_extra_cases() {
    let Some(path) = std::env::var_os("CINFER_TOKENIZE_CASES") else {
        return;
    };
    let Some(t) = tokenizer() else { return };
    let file = std::fs::File::open(&path).expect("open CINFER_TOKENIZE_CASES");
    let (mut n, mut bad) = (0, Vec::new());
    for line in std::io::BufRead::lines(std::io::BufReader::new(file)) {
        let line = line.expect("read CINFER_TOKENIZE_CASES");
        if line.trim().is_empty() {
            continue;
        }
        let case: Value = serde_json::from_str(&line).expect("JSON line");
        n += 1;
        let s = text(&case["text"]);
        let parse_special = case["parse_special"].as_bool().expect("parse_special");
        let want = ids(&case["ids"]);
        let got = t.encode(s, parse_special);
        if got != want && bad.len() < 20 {
            bad.push(format!(
                "{s:?} (parse_special {parse_special}):\n  want {want:?}\n  got  {got:?}"
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "mismatches among {n} cases:\n{}",
        bad.join("\n")
    );
    println!("{n} extra tokenize cases match");
}

fn check_tokenize_cases(t: &Tokenizer, cases: &[Value]) {
    let mut failures = Vec::new();
    for case in cases {
        let s = text(&case["text"]);
        let parse_special = case["parse_special"].as_bool().expect("parse_special");
        let want = ids(&case["ids"]);
        let got = t.encode(s, parse_special);
        if got != want {
            failures.push(format!(
                "{s:?} (parse_special {parse_special}):\n  want {want:?}\n  got  {got:?}"
            ));
        }
        // And back: the ids spell the text again, unless llama.cpp's own ids do not (SmolLM2
        // has no token for some bytes, e.g. 0x04 or the lead byte 0xF1, which both then drop).
        if t.decode(&want, true) == s.as_bytes() {
            let back = t.decode(&got, true);
            assert_eq!(String::from_utf8_lossy(&back), s, "round trip of {s:?}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!("{} tokenize cases match", cases.len());
}

#[test]
fn greedy_prompts_and_outputs_match_llama_cpp() {
    let Some(t) = tokenizer() else { return };
    let Some(cases) = jsonl("smollm2-greedy.jsonl") else {
        return;
    };
    assert!(!cases.is_empty());
    for case in &cases {
        let name = case["case"].as_str().unwrap_or("?");
        let prompt = text(&case["prompt"]);
        assert_eq!(
            t.encode(prompt, true),
            ids(&case["prompt_token_ids"]),
            "{name}: prompt ids"
        );
        assert_eq!(t.decode(&t.encode(prompt, true), true), prompt.as_bytes());

        let generated = ids(&case["generated_token_ids"]);
        let plain = t.decode(&generated, false);
        assert_eq!(
            String::from_utf8(plain).expect("UTF-8"),
            text(&case["generated_text"]),
            "{name}: generated text"
        );
        let special = t.decode(&generated, true);
        assert_eq!(
            String::from_utf8(special).expect("UTF-8"),
            text(&case["generated_text_with_special"]),
            "{name}: generated text with special tokens"
        );

        // Token by token through the UTF-8 stream gives the same text.
        let mut stream = Utf8Stream::new();
        let mut streamed = String::new();
        for &id in &generated {
            streamed += &stream.push(&t.token_bytes(id, false));
        }
        streamed += &stream.finish();
        assert_eq!(streamed, text(&case["generated_text"]), "{name}: streamed");

        if case["stop_reason"].as_str() == Some("eog") {
            assert!(t.is_eog(*generated.last().expect("eog id")), "{name}");
        }
        for &id in &generated[..generated.len().saturating_sub(1)] {
            assert!(!t.is_eog(id), "{name}: {id} is not the last id");
        }
        // The generated text tokenizes back to text that decodes the same.
        let gen_text = text(&case["generated_text_with_special"]);
        assert_eq!(
            t.decode(&t.encode(gen_text, true), true),
            gen_text.as_bytes()
        );
    }
}

/// Deterministic pseudo-random text mixing scripts, digits, whitespace, emoji and specials.
fn random_text(seed: &mut u64, len: usize) -> String {
    const PARTS: &[&str] = &[
        " ",
        "  ",
        "\n",
        "\r\n",
        "\t",
        "\u{a0}",
        "\u{200b}",
        "\u{3000}",
        "a",
        "Z",
        "é",
        "ß",
        "ñ",
        "日",
        "本",
        "한",
        "ا",
        "ل",
        "Ж",
        "ж",
        "1",
        "9",
        "²",
        "٣",
        "½",
        "'",
        "'s",
        "'T",
        "'ll",
        "!",
        ".",
        ",",
        "$",
        "😀",
        "👍🏽",
        "🇫🇷",
        "\u{fe0f}",
        "\u{301}",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<",
        "|",
        ">",
        "_",
        "-",
        "(",
        ")",
        "{",
        "}",
        "\\",
        "\"",
        "`",
        "~",
        "\u{378}",
        "\u{e000}",
        "\u{1f9ff}",
        "𝔸",
        "\u{85}",
    ];
    let mut s = String::new();
    for _ in 0..len {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (*seed >> 33) as usize % PARTS.len();
        s.push_str(PARTS[i]);
        if (*seed >> 20).is_multiple_of(3) {
            s.push_str("word");
        }
    }
    s
}

#[test]
fn random_text_round_trips() {
    let Some(t) = tokenizer() else { return };
    let mut seed = 0x5eed;
    for i in 0..500 {
        let s = random_text(&mut seed, 1 + i % 60);
        for parse_special in [false, true] {
            let ids = t.encode(&s, parse_special);
            assert_eq!(
                t.decode(&ids, true),
                s.as_bytes(),
                "{s:?} (parse_special {parse_special})"
            );
            assert!(ids.iter().all(|&id| (id as usize) < t.n_vocab()));
            if !parse_special {
                assert!(ids.iter().all(|&id| !t.is_control(id)), "{s:?}");
            }
        }
    }
}

#[test]
fn long_prompts_are_fast() {
    let Some(t) = tokenizer() else { return };
    let mut seed = 7;
    let mixed = random_text(&mut seed, 20_000);
    let words = "The quick brown fox jumps over the lazy dog. ".repeat(2_000);
    let one_word = "a".repeat(100_000);
    let spaces = " ".repeat(100_000);
    let digits = "1234567890".repeat(10_000);
    for s in [&mixed, &words, &one_word, &spaces, &digits] {
        let start = std::time::Instant::now();
        let ids = t.encode(s, true);
        let took = start.elapsed();
        println!("{} bytes -> {} tokens in {took:?}", s.len(), ids.len());
        assert_eq!(t.decode(&ids, true), s.as_bytes());
        assert!(took.as_secs() < 5, "{} bytes took {took:?}", s.len());
    }
}

/// Compares every token's end-of-generation flag, control flag and pieces with a dump from
/// llama.cpp (`CINFER_TOKENIZER_DUMP`: a first line `bos B eos E eot T add_bos 0|1 add_eos 0|1`,
/// then per id `ID IS_EOG IS_CONTROL PIECE PIECE_WITH_SPECIAL`, pieces in hex, `-` if empty).
#[test]
fn vocabulary_matches_dump() {
    let Some(path) = std::env::var_os("CINFER_TOKENIZER_DUMP") else {
        return;
    };
    let Some(t) = tokenizer() else { return };
    let dump = std::fs::read_to_string(&path).expect("read CINFER_TOKENIZER_DUMP");
    let mut lines = dump.lines();
    let head: Vec<&str> = lines.next().expect("header").split(' ').collect();
    let id = |s: &str| u32::try_from(s.parse::<i64>().expect("id")).ok();
    assert_eq!(t.bos(), id(head[1]), "bos");
    assert_eq!(t.eos(), id(head[3]), "eos");
    assert_eq!(t.eot(), id(head[5]), "eot");
    assert_eq!(t.add_bos(), head[7] == "1", "add_bos");
    assert_eq!(t.add_eos(), head[9] == "1", "add_eos");
    let hex = |s: &str| -> Vec<u8> {
        if s == "-" {
            return Vec::new();
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    };
    let mut n = 0;
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        let i: u32 = f[0].parse().expect("id");
        assert_eq!(t.is_eog(i), f[1] == "1", "is_eog({i})");
        assert_eq!(t.is_control(i), f[2] == "1", "is_control({i})");
        assert_eq!(t.token_bytes(i, false), hex(f[3]), "piece of {i}");
        assert_eq!(t.token_bytes(i, true), hex(f[4]), "special piece of {i}");
        n += 1;
    }
    assert_eq!(n, t.n_vocab());
    println!("{n} tokens match the dump");
}
