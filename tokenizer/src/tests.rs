//! Unit tests on small generated vocabularies.

use super::*;
use cinfer_gguf::write::{Val, gguf};

/// A byte-level vocabulary: four special tokens, the 256 byte chars, then merge results.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    kv: Vec<(&'static str, Val)>,
}

impl Vocab {
    fn new() -> Self {
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]
            .map(String::from)
            .to_vec();
        let mut types = vec![3, 3, 3, 4];
        for b in 0..=255u8 {
            tokens.push(unicode::byte_to_char(b).to_string());
            types.push(1);
        }
        let mut v = Vocab {
            tokens,
            types,
            merges: Vec::new(),
            kv: vec![
                ("tokenizer.ggml.model", Val::Str("gpt2".into())),
                ("tokenizer.ggml.pre", Val::Str("smollm".into())),
                ("tokenizer.ggml.bos_token_id", Val::U32(1)),
                ("tokenizer.ggml.eos_token_id", Val::U32(2)),
                ("tokenizer.ggml.add_bos_token", Val::Bool(false)),
            ],
        };
        for m in [
            "Ġ t", "h e", "Ġt he", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
        ] {
            v.merge(m, true);
        }
        v
    }

    /// Adds a merge, and its result as a token if `token`.
    fn merge(&mut self, m: &str, token: bool) {
        self.merges.push(m.to_owned());
        if token {
            self.tokens.push(m.replace(' ', ""));
            self.types.push(1);
        }
    }

    fn set(&mut self, key: &'static str, val: Val) {
        self.kv.retain(|(k, _)| *k != key);
        self.kv.push((key, val));
    }

    fn bytes(&self) -> Vec<u8> {
        let mut kv = self.kv.clone();
        if !kv.iter().any(|(k, _)| *k == "tokenizer.ggml.tokens") {
            kv.push(("tokenizer.ggml.tokens", Val::Strs(self.tokens.clone())));
        }
        if !kv.iter().any(|(k, _)| *k == "tokenizer.ggml.token_type") {
            kv.push(("tokenizer.ggml.token_type", Val::I32s(self.types.clone())));
        }
        if !kv.iter().any(|(k, _)| *k == "tokenizer.ggml.merges") {
            kv.push(("tokenizer.ggml.merges", Val::Strs(self.merges.clone())));
        }
        kv.retain(|(_, v)| !matches!(v, Val::Str(s) if s == "<remove>"));
        gguf(&kv, &[])
    }

    fn build(&self) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_gguf_bytes(&self.bytes())
    }

    fn tok(&self) -> Tokenizer {
        self.build().expect("tokenizer")
    }
}

/// The stored texts of `ids`.
fn texts(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&id| t.token_text(id).expect("id in range").to_owned())
        .collect()
}

fn ids(t: &Tokenizer, texts: &[&str]) -> Vec<u32> {
    texts
        .iter()
        .map(|s| t.token_id(s).unwrap_or_else(|| panic!("no token {s:?}")))
        .collect()
}

#[test]
fn merges_build_words() {
    let t = Vocab::new().tok();
    let got = t.encode("hello the world", false);
    assert_eq!(texts(&t, &got), ["hello", "Ġthe", "Ġworld"]);
    assert_eq!(t.decode(&got, false), b"hello the world");
    // A word whose merges stop half way.
    assert_eq!(texts(&t, &t.encode("hell", false)), ["he", "ll"]);
    assert_eq!(t.pre_tokenizer(), PreTokenizer::DigitsThenGpt2);
}

#[test]
fn merge_rank_beats_position() {
    let mut v = Vocab::new();
    v.merge("b c", true);
    v.merge("a b", true);
    let t = v.tok();
    assert_eq!(texts(&t, &t.encode("abc", false)), ["a", "bc"]);
    let mut v = Vocab::new();
    v.merge("a b", true);
    v.merge("b c", true);
    let t = v.tok();
    assert_eq!(texts(&t, &t.encode("abc", false)), ["ab", "c"]);
    // Equal ranks: leftmost first.
    let mut v = Vocab::new();
    v.merge("a a", true);
    let t = v.tok();
    assert_eq!(texts(&t, &t.encode("aaa", false)), ["aa", "a"]);
}

#[test]
fn unmerged_chars_fall_back_to_byte_tokens() {
    let t = Vocab::new().tok();
    // No merges for the emoji: one byte-level token per UTF-8 byte.
    let got = t.encode("😀", false);
    assert_eq!(got.len(), 4);
    let expected: Vec<u32> = "😀"
        .bytes()
        .map(|b| {
            t.token_id(&unicode::byte_to_char(b).to_string())
                .expect("byte token")
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(t.decode(&got, false), "😀".as_bytes());
    // Each token alone is a fragment of the character.
    assert_eq!(t.token_bytes(got[0], false), vec![0xF0]);
}

#[test]
fn merge_result_outside_the_vocabulary() {
    // llama.cpp then looks up the symbol's bytes as one-byte tokens: ASCII ones survive...
    let mut v = Vocab::new();
    v.merge("x y", false);
    let t = v.tok();
    assert_eq!(texts(&t, &t.encode("xy", false)), ["x", "y"]);
    // ...and non-ASCII ones are dropped (as llama.cpp drops them).
    let mut v = Vocab::new();
    v.merge("Ã ©", false);
    let t = v.tok();
    assert_eq!(texts(&t, &t.encode("aé", false)), ["a"]);
}

#[test]
fn special_tokens() {
    let t = Vocab::new().tok();
    let text = "<|im_start|>hello<|im_end|>\n<tool>";
    let parsed = t.encode(text, true);
    let mut want = vec![1];
    want.extend(ids(&t, &["hello"]));
    want.extend([2, t.token_id("Ċ").expect("nl"), 3]);
    assert_eq!(parsed, want);
    // Without parse_special control tokens are text; user-defined ones still match.
    let plain = t.encode(text, false);
    assert!(!plain.contains(&1) && !plain.contains(&2));
    assert_eq!(plain.last(), Some(&3));
    assert_eq!(t.decode(&plain, false), text.as_bytes());
    // Rendering.
    assert_eq!(t.token_bytes(2, true), b"<|im_end|>");
    assert!(t.token_bytes(2, false).is_empty());
    assert_eq!(t.token_bytes(3, false), b"<tool>");
    assert_eq!(
        t.decode(&parsed, true),
        b"<|im_start|>hello<|im_end|>\n<tool>"
    );
    assert_eq!(t.decode(&parsed, false), b"hello\n<tool>");
    assert!(t.token_bytes(999_999, true).is_empty());
    assert_eq!(t.token_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_id("<|nope|>"), None);
    assert!(t.is_control(1) && !t.is_control(3));
    assert!(t.encode("", true).is_empty());
}

#[test]
fn longest_special_token_wins() {
    let mut v = Vocab::new();
    v.tokens.push("<|im_start|>user".into());
    v.types.push(3);
    let t = v.tok();
    let long = t.token_id("<|im_start|>user").expect("long");
    assert_eq!(t.encode("<|im_start|>user<|im_start|>", true), [long, 1]);
}

#[test]
fn end_of_generation() {
    let t = Vocab::new().tok();
    assert!(t.is_eog(0) && t.is_eog(2));
    assert!(!t.is_eog(1) && !t.is_eog(3) && !t.is_eog(100));
    assert_eq!(t.eog_ids(), [0, 2]);
    assert_eq!((t.bos(), t.eos(), t.eot()), (Some(1), Some(2), Some(0)));

    // A normal-typed "<|im_end|>" becomes a control token, as in llama.cpp.
    let mut v = Vocab::new();
    v.types[2] = 1;
    let t = v.tok();
    assert!(t.is_control(2) && t.is_eog(2));
    assert!(t.token_bytes(2, false).is_empty());
    assert!(!t.encode("<|im_end|>", false).contains(&2));

    // Without bos/eos keys llama.cpp falls back to id 11 for gpt2 vocabularies.
    let mut v = Vocab::new();
    v.set("tokenizer.ggml.bos_token_id", Val::Str("<remove>".into()));
    v.set("tokenizer.ggml.eos_token_id", Val::Str("<remove>".into()));
    let t = v.tok();
    assert_eq!((t.bos(), t.eos()), (Some(11), Some(11)));
    assert!(t.is_eog(11));
}

#[test]
fn add_bos_and_eos() {
    let mut v = Vocab::new();
    v.set("tokenizer.ggml.add_bos_token", Val::Bool(true));
    v.set("tokenizer.ggml.add_eos_token", Val::Bool(true));
    let t = v.tok();
    let got = t.encode("hello", true);
    assert_eq!(got.first(), Some(&1));
    assert_eq!(got.last(), Some(&2));
    assert_eq!(got.len(), 3);
    assert_eq!(t.encode_with("hello", false, true).len(), 1);
    assert_eq!(t.encode("", true), [1, 2]);
}

#[test]
fn llama3_takes_whole_words_from_the_vocabulary() {
    let mut v = Vocab::new();
    v.tokens.push("abc".into());
    v.types.push(1);
    v.set("tokenizer.ggml.pre", Val::Str("llama-bpe".into()));
    v.set("tokenizer.ggml.add_bos_token", Val::Str("<remove>".into()));
    let t = v.tok();
    assert_eq!(t.pre_tokenizer(), PreTokenizer::Llama3);
    assert!(t.add_bos(), "llama3 adds BOS by default");
    assert_eq!(texts(&t, &t.encode_with("abc", false, false)), ["abc"]);
    v.set("tokenizer.ggml.pre", Val::Str("dbrx".into()));
    let t = v.tok();
    assert_eq!(texts(&t, &t.encode("abc", false)), ["a", "b", "c"]);
}

#[test]
fn phi3_names_strip_spaces_after_special_tokens() {
    let mut v = Vocab::new();
    for s in ["</s>", "<unk>", "<s>"] {
        v.tokens.push(s.into());
        v.types.push(3);
    }
    v.set("general.name", Val::Str("Phi3 Mini".into()));
    let t = v.tok();
    assert_eq!(
        texts(&t, &t.encode("<|im_start|>  hello", true)),
        ["<|im_start|>", "hello"]
    );
    // <|endoftext|> keeps the spaces after it.
    assert_eq!(
        texts(&t, &t.encode("<|endoftext|> the", true)),
        ["<|endoftext|>", "Ġthe"]
    );
    v.tokens.retain(|s| s != "</s>");
    v.types.pop();
    assert!(matches!(
        v.build(),
        Err(TokenizerError::MissingToken { token: "</s>", .. })
    ));
}

#[test]
fn malformed_metadata() {
    let mut v = Vocab::new();
    v.set("tokenizer.ggml.model", Val::Str("<remove>".into()));
    assert_eq!(
        v.build().unwrap_err(),
        TokenizerError::MissingKey("tokenizer.ggml.model")
    );

    let mut v = Vocab::new();
    v.set("tokenizer.ggml.model", Val::Str("llama".into()));
    assert_eq!(
        v.build().unwrap_err(),
        TokenizerError::UnsupportedModel("llama".into())
    );

    let mut v = Vocab::new();
    v.set("tokenizer.ggml.model", Val::U32(2));
    assert!(matches!(
        v.build(),
        Err(TokenizerError::WrongType {
            key: "tokenizer.ggml.model",
            ..
        })
    ));

    let mut v = Vocab::new();
    v.set("tokenizer.ggml.pre", Val::Str("deepseek-llm".into()));
    assert_eq!(
        v.build().unwrap_err(),
        TokenizerError::UnsupportedPreTokenizer("deepseek-llm".into())
    );

    let mut v = Vocab::new();
    v.merges.insert(3, "nospace".into());
    assert_eq!(
        v.build().unwrap_err(),
        TokenizerError::BadMerge { index: 3 }
    );
    let mut v = Vocab::new();
    v.merges.push(" x".into()); // the space must come after the first byte
    assert!(matches!(v.build(), Err(TokenizerError::BadMerge { .. })));

    let mut v = Vocab::new();
    v.set("tokenizer.ggml.eos_token_id", Val::U32(100_000));
    assert_eq!(
        v.build().unwrap_err(),
        TokenizerError::IdOutOfRange {
            key: "tokenizer.ggml.eos_token_id",
            id: 100_000,
            n_vocab: v.tokens.len()
        }
    );
    let mut v = Vocab::new();
    v.set("tokenizer.ggml.bos_token_id", Val::I32(-1));
    assert!(matches!(
        v.build(),
        Err(TokenizerError::WrongType {
            key: "tokenizer.ggml.bos_token_id",
            ..
        })
    ));
    // An out-of-range padding id is ignored, as llama.cpp ignores it.
    let mut v = Vocab::new();
    v.set("tokenizer.ggml.padding_token_id", Val::U32(100_000));
    assert_eq!(v.tok().pad(), None);

    let mut v = Vocab::new();
    v.types.pop();
    assert!(matches!(
        v.build(),
        Err(TokenizerError::LengthMismatch {
            key: "tokenizer.ggml.token_type",
            ..
        })
    ));

    let mut v = Vocab::new();
    v.set(
        "tokenizer.ggml.token_type",
        Val::F32s(vec![1.0; v.tokens.len()]),
    );
    assert!(matches!(
        v.build(),
        Err(TokenizerError::WrongType {
            key: "tokenizer.ggml.token_type",
            ..
        })
    ));

    let mut v = Vocab::new();
    v.set("tokenizer.ggml.tokens", Val::I32s(vec![1, 2]));
    assert!(matches!(
        v.build(),
        Err(TokenizerError::WrongType {
            key: "tokenizer.ggml.tokens",
            ..
        })
    ));

    let mut v = Vocab::new();
    v.set("tokenizer.ggml.tokens", Val::Strs(Vec::new()));
    assert_eq!(v.build().unwrap_err(), TokenizerError::EmptyVocabulary);

    let mut v = Vocab::new();
    v.tokens.push("Ġthe".into());
    v.types.push(1);
    let first = v.tokens.iter().position(|s| s == "Ġthe").expect("Ġthe") as u32;
    assert_eq!(
        v.build().unwrap_err(),
        TokenizerError::DuplicateToken {
            index: v.tokens.len() as u32 - 1,
            first
        }
    );

    let mut v = Vocab::new();
    v.set("tokenizer.ggml.merges", Val::Str("<remove>".into()));
    assert_eq!(
        v.build().unwrap_err(),
        TokenizerError::MissingKey("tokenizer.ggml.merges")
    );

    let mut v = Vocab::new();
    v.set("tokenizer.ggml.add_bos_token", Val::U32(1));
    assert!(matches!(
        v.build(),
        Err(TokenizerError::WrongType {
            key: "tokenizer.ggml.add_bos_token",
            ..
        })
    ));

    assert!(matches!(
        Tokenizer::from_gguf_bytes(b"GGUF"),
        Err(TokenizerError::Gguf(_))
    ));
}

#[test]
fn every_text_round_trips() {
    let t = Vocab::new().tok();
    for s in [
        "",
        " ",
        "hello world",
        "\r\n\t  x",
        "a\u{a0}b\u{200b}c",
        "日本語 🇫🇷 👍🏽",
        "<|im_start|",
        "x'S 's 123 4,5",
    ] {
        assert_eq!(t.decode(&t.encode(s, false), false), s.as_bytes(), "{s:?}");
    }
}

/// Texts that exercise special tokens, merges, byte fallback and the pre-tokenizer.
const SAMPLES: [&str; 8] = [
    "hello the world",
    "<|im_start|>user\nhello<|im_end|>",
    "😀 日本語 a\u{a0}b",
    "  world  the\n\n",
    "x'S 's 123 4,5 <tool>",
    "",
    "hellohello world",
    "<|endoftext|>the",
];

fn same_tokenizer(a: &Tokenizer, b: &Tokenizer) {
    for s in SAMPLES {
        for special in [false, true] {
            let ids = a.encode(s, special);
            assert_eq!(ids, b.encode(s, special), "{s:?}");
            assert_eq!(a.decode(&ids, special), b.decode(&ids, special));
        }
    }
    for id in 0..a.n_vocab() as u32 + 2 {
        assert_eq!(a.token_text(id), b.token_text(id), "{id}");
        assert_eq!(a.token_bytes(id, true), b.token_bytes(id, true), "{id}");
        assert_eq!(a.is_control(id), b.is_control(id), "{id}");
    }
    assert_eq!(a.eog_ids(), b.eog_ids());
    assert_eq!((a.bos(), a.eos(), a.eot()), (b.bos(), b.eos(), b.eot()));
    assert_eq!((a.add_bos(), a.add_eos()), (b.add_bos(), b.add_eos()));
    assert_eq!(a.pre_tokenizer(), b.pre_tokenizer());
}

#[test]
fn image_round_trips() {
    let mut v = Vocab::new();
    v.merge("wor ld", false); // a merge side that is no token
    v.set("tokenizer.ggml.add_bos_token", Val::Bool(true));
    let t = v.tok();
    let again = Tokenizer::from_image(t.image()).expect("image");
    same_tokenizer(&t, &again);
    assert_eq!(again.image(), t.image(), "the image of an image is itself");
    assert_eq!(again.encode("hello", true)[0], 1, "add_bos survives");
}

#[test]
fn an_embedded_image_is_used_instead_of_the_tables() {
    let plain = Vocab::new().bytes();
    let embedded = embed_image(&plain).expect("embed");
    let g = cinfer_gguf::parse(&embedded).expect("gguf");
    let from_image = Tokenizer::from_gguf(&g).expect("tokenizer");
    same_tokenizer(&Vocab::new().tok(), &from_image);
    // Proof that the image, not the token arrays, is what counts: the image of
    // another vocabulary (one more merge) stored beside these arrays wins.
    let mut other = Vocab::new();
    other.merge("Ġwor ld", false);
    other.merge("w or", true);
    let other_image = other.tok().image().to_vec();
    let swapped =
        cinfer_gguf::write::set_kv(&plain, IMAGE_KEY, &Val::U8s(other_image)).expect("set");
    let t = Tokenizer::from_gguf(&cinfer_gguf::parse(&swapped).expect("gguf")).expect("tok");
    assert_eq!(texts(&t, &t.encode("wor", false)), ["wor"]);
    assert_eq!(
        Tokenizer::build_from_gguf(&cinfer_gguf::parse(&swapped).expect("gguf"))
            .map(|t| texts(&t, &t.encode("wor", false)))
            .expect("tok"),
        ["w", "or"],
        "build_from_gguf ignores the image"
    );
    // Embedding again replaces the image rather than adding a second one.
    let twice = embed_image(&embedded).expect("embed");
    assert_eq!(twice, embedded);
    // An image key of another type is refused by name.
    let wrong = cinfer_gguf::write::set_kv(&plain, IMAGE_KEY, &Val::U32(1)).expect("set");
    assert_eq!(
        Tokenizer::from_gguf(&cinfer_gguf::parse(&wrong).expect("gguf")).unwrap_err(),
        TokenizerError::WrongType {
            key: IMAGE_KEY,
            expected: "an array of u8"
        }
    );
}

#[test]
fn malformed_images_are_refused_or_harmless() {
    let t = Vocab::new().tok();
    let image = t.image().to_vec();
    let err = |b: &[u8]| match Tokenizer::from_image(b) {
        Err(TokenizerError::BadImage(why)) => why,
        other => panic!("expected BadImage, got {other:?}"),
    };
    assert_eq!(err(b""), "no image magic");
    assert_eq!(err(b"CTKI"), "truncated header");
    let mut v2 = image.clone();
    v2[4] = 2;
    assert_eq!(
        err(&v2),
        "another image version (rebuild it with this release)"
    );
    // Every truncation, and one byte more, is refused by the length check.
    for cut in (8..image.len()).step_by(7) {
        assert!(!err(&image[..cut]).is_empty(), "cut {cut}");
    }
    let mut longer = image.clone();
    longer.push(0);
    assert_eq!(err(&longer), "length does not match the header");
    // Counts that overflow the section arithmetic.
    let mut huge = image.clone();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Tokenizer::from_image(&huge),
        Err(TokenizerError::BadImage(_))
    ));
    // A special token id out of range.
    let mut special = image.clone();
    let lists = 4 * 18 + 8 + (2 * t.n_vocab()).next_multiple_of(4); // "smollm" padded to 8
    special[lists..lists + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(err(&special), "token id out of range");
    // Flipping any byte gives an error or a tokenizer that still never panics.
    for at in (0..image.len()).step_by(3) {
        let mut b = image.clone();
        b[at] ^= 0xa5;
        if let Ok(t) = Tokenizer::from_image(&b) {
            for s in SAMPLES {
                let ids = t.encode(s, true);
                let _ = t.decode(&ids, true);
            }
            for id in 0..t.n_vocab() as u32 + 1 {
                let _ = (t.token_text(id), t.token_bytes(id, true), t.is_eog(id));
            }
        }
    }
}

#[test]
fn an_image_of_another_version_is_passed_over_when_the_vocabulary_is_there() {
    let plain = Vocab::new().bytes();
    let mut image = Vocab::new().tok().image().to_vec();
    image[4] = 99; // another image version
    let stale =
        cinfer_gguf::write::set_kv(&plain, IMAGE_KEY, &Val::U8s(image.clone())).expect("set");
    // With the vocabulary arrays: built from them, the same tokenizer.
    let g = cinfer_gguf::parse(&stale).expect("gguf");
    same_tokenizer(
        &Vocab::new().tok(),
        &Tokenizer::from_gguf(&g).expect("from_gguf"),
    );
    let meta = stale[..g.kv_end].to_vec();
    same_tokenizer(
        &Vocab::new().tok(),
        &Tokenizer::from_metadata(meta).expect("from_metadata"),
    );
    // Without them (just the image, as metadata-keys may hand out): the reason.
    let only_image =
        cinfer_gguf::write::metadata_subset(&stale, |k| k == IMAGE_KEY).expect("subset");
    let why = TokenizerError::BadImage("another image version (rebuild it with this release)");
    assert_eq!(
        Tokenizer::from_gguf(&cinfer_gguf::parse_metadata(&only_image).expect("gguf")).unwrap_err(),
        why
    );
    assert_eq!(Tokenizer::from_metadata(only_image).unwrap_err(), why);
}
