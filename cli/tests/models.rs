//! `cinfer seal-model` as a model owner uses it: the tokenizer image added to
//! the metadata by default, the file sealed byte for byte on request, a model
//! without a readable tokenizer sealed as it is, and a file that is not GGUF
//! refused with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_gguf::GgmlType;
use cinfer_gguf::write::{Val, gguf};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cinfer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cinfer"))
        .args(args)
        .output()
        .expect("run cinfer")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cinfer-models-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny GGUF with one tensor and, if `tokenizer`, a byte-level BPE vocabulary.
fn model(tokenizer: bool) -> Vec<u8> {
    let mut kv = vec![("general.architecture", Val::Str("llama".into()))];
    if tokenizer {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
        for b in 0..=255u8 {
            let printable = (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
            let c = if printable {
                char::from(b)
            } else {
                char::from_u32(256 + u32::from(b)).unwrap()
            };
            tokens.push(c.to_string());
        }
        tokens.push("he".into());
        let types = vec![1; tokens.len()];
        kv.extend([
            ("tokenizer.ggml.model", Val::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Val::Str("smollm".into())),
            ("tokenizer.ggml.tokens", Val::Strs(tokens)),
            ("tokenizer.ggml.token_type", Val::I32s(types)),
            ("tokenizer.ggml.merges", Val::Strs(vec!["h e".into()])),
        ]);
    }
    let data: Vec<u8> = (0..64 * 4 * 4).map(|i| (i % 251) as u8).collect();
    gguf(&kv, &[("w", vec![64, 4], GgmlType::F32, data)])
}

/// Seals `file` (more `args` after the required ones); the plaintext inside.
fn seal(dir: &Path, file: &[u8], args: &[&str]) -> (Output, Option<Vec<u8>>) {
    let (input, key, out) = (dir.join("m.gguf"), dir.join("m.key"), dir.join("m.sealed"));
    std::fs::write(&input, file).unwrap();
    if !key.exists() {
        assert!(
            cinfer(&["dev-model-key", "--out", key.to_str().unwrap()])
                .status
                .success()
        );
    }
    let _ = std::fs::remove_file(&out);
    let mut all = vec![
        "seal-model",
        input.to_str().unwrap(),
        "--model-id",
        "m",
        "--key-id",
        "k",
        "--key",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--chunk-size",
        "4096",
    ];
    all.extend_from_slice(args);
    let o = cinfer(&all);
    if !out.exists() {
        return (o, None);
    }
    let key = cinfer_sealed_model::ModelKey::from_key_file(&std::fs::read_to_string(&key).unwrap())
        .unwrap();
    let opened =
        cinfer_sealed_model::Opened::open(std::fs::File::open(&out).unwrap(), &key).unwrap();
    let mut plain = vec![0u8; opened.header().plaintext_len as usize];
    opened.read_plain(0, &mut plain).unwrap();
    (o, Some(plain))
}

#[test]
fn seal_model_adds_the_tokenizer_image_and_keeps_the_tensors() {
    let dir = scratch("image");
    let file = model(true);
    let (o, plain) = seal(&dir, &file, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("with the tokenizer image"),
        "{}",
        text(&o)
    );
    let plain = plain.expect("sealed");
    let g = cinfer_gguf::parse(&plain).unwrap();
    let image = g
        .array(cinfer_tokenizer::IMAGE_KEY)
        .unwrap()
        .as_bytes()
        .unwrap();
    let built =
        cinfer_tokenizer::Tokenizer::build_from_gguf(&cinfer_gguf::parse(&file).unwrap()).unwrap();
    assert!(image == built.image());
    let old = cinfer_gguf::parse(&file).unwrap();
    let (t_old, t_new) = (old.tensor("w").unwrap(), g.tensor("w").unwrap());
    assert_eq!(
        &plain[(g.data_offset + t_new.offset) as usize..][..t_new.size as usize],
        &file[(old.data_offset + t_old.offset) as usize..][..t_old.size as usize]
    );
    // Asked to, it seals the file byte for byte.
    let (o, plain) = seal(&dir, &file, &["--no-tokenizer-image"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(plain.expect("sealed") == file);
}

#[test]
fn seal_model_seals_a_model_without_a_readable_tokenizer_as_it_is() {
    let dir = scratch("no-tokenizer");
    let file = model(false);
    let (o, plain) = seal(&dir, &file, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(
            "note: no tokenizer image (tokenizer metadata key `tokenizer.ggml.model` is missing)"
        ),
        "{}",
        text(&o)
    );
    assert!(plain.expect("sealed") == file);
}

#[test]
fn seal_model_refuses_a_file_that_is_not_gguf() {
    let dir = scratch("not-gguf");
    let (o, plain) = seal(&dir, b"this is not a model", &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("is not a GGUF model: not a GGUF file (bad magic)"),
        "{}",
        text(&o)
    );
    assert!(plain.is_none(), "nothing is written");
}
