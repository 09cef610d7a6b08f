//! Byte-level BPE tokenizer (GPT-2 style) that gives exactly llama.cpp's token ids.
//!
//! Programs that run inside the loader use it to turn a prompt into token ids and generated ids
//! back into text, from the vocabulary in a model's GGUF metadata
//! (`tokenizer.ggml.model = "gpt2"`), without the host's help. It follows llama.cpp (reference
//! commit c392e5094deaf2d1a7c18683214f007fad3fe42b) rule for rule: special-token partitioning,
//! the pre-tokenizer regexes of each `tokenizer.ggml.pre` type ([`PreTokenizer`]), its Unicode
//! 15.1 character classes, BPE merge order, the end-of-generation set and the token pieces.
//!
//! What it trusts: nothing about the metadata beyond what it checks. Malformed metadata (missing
//! or mistyped keys, ids out of range, duplicate tokens, merge lines without a separator) is a
//! typed [`TokenizerError`]; any text, and any token id, is handled without panicking. The model
//! file itself is authenticated elsewhere; a well-formed but wrong vocabulary just gives wrong
//! ids. No `unsafe`, no I/O: it runs in `wasm32-unknown-unknown`.
//!
//! ```text
//! text ─► special tokens (longest first) ─► pre-tokenizer passes ─► bytes as GPT-2 chars ─► BPE ─► ids
//! ```
#![forbid(unsafe_code)]

mod bpe;
mod image;
mod pretok;
mod unicode;
#[rustfmt::skip]
mod unicode_table;
mod utf8;

use std::collections::HashMap;
use std::fmt;

use cinfer_gguf::{Array, Gguf, Value};

pub use image::VERSION as IMAGE_VERSION;
pub use pretok::PreTokenizer;

/// The GGUF metadata key under which `cinfer seal-model` stores the tokenizer image (an array
/// of `u8`, see [`Tokenizer::image`]); [`Tokenizer::from_gguf`] uses it when present.
pub const IMAGE_KEY: &str = "cinfer.tokenizer.image";
pub use utf8::Utf8Stream;

/// Why GGUF metadata does not give a usable tokenizer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The bytes are not GGUF (from [`Tokenizer::from_gguf_bytes`]).
    #[error(transparent)]
    Gguf(#[from] cinfer_gguf::GgufError),
    /// A required key is absent.
    #[error("tokenizer metadata key `{0}` is missing")]
    MissingKey(&'static str),
    /// A key has another type than llama.cpp reads it as.
    #[error("tokenizer metadata key `{key}`: expected {expected}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// What it should hold.
        expected: &'static str,
    },
    /// `tokenizer.ggml.model` is not `gpt2` (byte-level BPE).
    #[error("unsupported tokenizer model `{0}` (only `gpt2`, byte-level BPE)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not reproduce.
    #[error("unsupported pre-tokenizer `{0}`")]
    UnsupportedPreTokenizer(String),
    /// `tokenizer.ggml.tokens` is empty.
    #[error("the vocabulary is empty")]
    EmptyVocabulary,
    /// More tokens than `i32` ids can number (llama.cpp's token type).
    #[error("the vocabulary has {0} tokens, more than token ids can number")]
    VocabularyTooLarge(usize),
    /// Two tokens have the same text (llama.cpp refuses such a vocabulary too).
    #[error("token {index} has the same text as token {first}")]
    DuplicateToken {
        /// The later token.
        index: u32,
        /// The earlier one.
        first: u32,
    },
    /// A per-token array does not have one entry per token.
    #[error("`{key}` has {len} entries for {n_vocab} tokens")]
    LengthMismatch {
        /// The key.
        key: &'static str,
        /// Its length.
        len: usize,
        /// The number of tokens.
        n_vocab: usize,
    },
    /// A line of `tokenizer.ggml.merges` has no space separating its two sides.
    #[error("merge {index} has no space separating its two sides")]
    BadMerge {
        /// Its index (its rank).
        index: usize,
    },
    /// A special token id key (bos, eos, eot, eom) is not a token of the vocabulary.
    #[error("`{key}` = {id} is out of range for a vocabulary of {n_vocab} tokens")]
    IdOutOfRange {
        /// The key.
        key: &'static str,
        /// Its value.
        id: u64,
        /// The number of tokens.
        n_vocab: usize,
    },
    /// A tokenizer image (see [`Tokenizer::from_image`]) is malformed or of another version.
    #[error("tokenizer image: {0}")]
    BadImage(&'static str),
    /// llama.cpp's per-model rules need a token that the vocabulary lacks.
    #[error("token `{token}` is required ({why}) but not in the vocabulary")]
    MissingToken {
        /// The token text.
        token: &'static str,
        /// Which rule needs it.
        why: &'static str,
    },
}

// llama.cpp's token attributes (`llama_token_attr`), as set from `tokenizer.ggml.token_type`.
const UNKNOWN: u16 = 1 << 0;
const UNUSED: u16 = 1 << 1;
const NORMAL: u16 = 1 << 2;
const CONTROL: u16 = 1 << 3;
const USER_DEFINED: u16 = 1 << 4;
const BYTE: u16 = 1 << 5;
const LSTRIP: u16 = 1 << 7;
const RSTRIP: u16 = 1 << 8;

/// Types whose text is matched in the input as a whole token (when `parse_special`, or always for
/// user-defined ones) and printed verbatim.
const SPECIAL: u16 = CONTROL | USER_DEFINED | UNKNOWN;

fn attr_of_type(t: Option<u64>) -> u16 {
    match t {
        Some(1) => NORMAL,
        Some(2) => UNKNOWN,
        Some(3) => CONTROL,
        Some(4) => USER_DEFINED,
        Some(5) => UNUSED,
        Some(6) => BYTE,
        _ => 0, // undefined
    }
}

const K_MODEL: &str = "tokenizer.ggml.model";
const K_PRE: &str = "tokenizer.ggml.pre";
const K_TOKENS: &str = "tokenizer.ggml.tokens";
const K_TYPES: &str = "tokenizer.ggml.token_type";
const K_MERGES: &str = "tokenizer.ggml.merges";
const K_BOS: &str = "tokenizer.ggml.bos_token_id";
const K_EOS: &str = "tokenizer.ggml.eos_token_id";
const K_EOT: &str = "tokenizer.ggml.eot_token_id";
const K_EOM: &str = "tokenizer.ggml.eom_token_id";
const K_UNK: &str = "tokenizer.ggml.unknown_token_id";
const K_PAD: &str = "tokenizer.ggml.padding_token_id";
const K_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const K_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";

/// The FIM token keys (current names, then the deprecated ones for the first three) and the
/// texts llama.cpp recognises each by when its key is absent.
const FIM: [(&str, &str, &[&str]); 6] = [
    (
        "tokenizer.ggml.fim_pre_token_id",
        "tokenizer.ggml.prefix_token_id",
        &["<|fim_prefix|>", "<fim-prefix>", "<｜fim▁begin｜>", "<PRE>"],
    ),
    (
        "tokenizer.ggml.fim_suf_token_id",
        "tokenizer.ggml.suffix_token_id",
        &["<|fim_suffix|>", "<fim-suffix>", "<｜fim▁hole｜>", "<SUF>"],
    ),
    (
        "tokenizer.ggml.fim_mid_token_id",
        "tokenizer.ggml.middle_token_id",
        &["<|fim_middle|>", "<fim-middle>", "<｜fim▁end｜>", "<MID>"],
    ),
    (
        "tokenizer.ggml.fim_pad_token_id",
        "",
        &["<|fim_pad|>", "<fim-pad>", "<PAD>"],
    ),
    (
        "tokenizer.ggml.fim_rep_token_id",
        "",
        &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>"],
    ),
    ("tokenizer.ggml.fim_sep_token_id", "", &["<|file_sep|>"]),
];

/// Texts llama.cpp takes as the end-of-turn token when `eot_token_id` is absent.
const EOT_TEXTS: [&str; 7] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// Texts that always end generation.
const EOG_TEXTS: [&str; 7] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
];

/// The tokenizer image stored in `g` under [`IMAGE_KEY`], if there is one.
fn image_in<'a>(g: &Gguf<'a>) -> Result<Option<&'a [u8]>, TokenizerError> {
    match g.get(IMAGE_KEY) {
        None => Ok(None),
        Some(v) => match v {
            Value::Array(a) => a.as_bytes(),
            _ => None,
        }
        .map(Some)
        .ok_or(TokenizerError::WrongType {
            key: IMAGE_KEY,
            expected: "an array of u8",
        }),
    }
}

/// `file` (a whole GGUF model) with the [image](Tokenizer::image) of its tokenizer stored under
/// [`IMAGE_KEY`], replacing any image it had; the tensors are unchanged. Programs that build
/// their tokenizer with [`Tokenizer::from_gguf`] then skip building the tables on every run.
///
/// For files too large to hold in memory, [`embed_image_header`] does the same from the header.
pub fn embed_image(file: &[u8]) -> Result<Vec<u8>, TokenizerError> {
    Ok(cinfer_gguf::write::set_kv(
        file,
        IMAGE_KEY,
        &image_value(file)?,
    )?)
}

/// The image of the tokenizer built from the GGUF in `bytes`, as a metadata value.
fn image_value(bytes: &[u8]) -> Result<cinfer_gguf::write::Val, TokenizerError> {
    let tok = Tokenizer::build_from_gguf(&cinfer_gguf::parse(bytes)?)?;
    Ok(cinfer_gguf::write::Val::U8s(tok.image().to_vec()))
}

/// [`embed_image`] from `prefix`, the start of a GGUF file up to at least the end of its tensor
/// infos: the new header, padded to its data section, and the offset of the data section in
/// the old file; the new file is the header followed by the old file from that offset.
pub fn embed_image_header(prefix: &[u8]) -> Result<(Vec<u8>, u64), TokenizerError> {
    Ok(cinfer_gguf::write::set_kv_header(
        prefix,
        IMAGE_KEY,
        &image_value(prefix)?,
    )?)
}

/// A byte-level BPE vocabulary with llama.cpp's encoding rules.
///
/// Its tables live in one [image](Self::image): token texts (byte-level chars for normal
/// tokens) and the merge sides that are not tokens, interned to ids (tokens below `n_vocab`);
/// the attributes and pieces (the bytes each token prints as with special tokens rendered) of
/// every token; merge ranks by the interned ids of their two sides; the special tokens
/// (control, user-defined and unknown, longest text first) and the end-of-generation ids.
#[derive(Clone)]
pub struct Tokenizer {
    pre: PreTokenizer,
    img: image::Image,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    ignore_merges: bool,
}

const FLAG_ADD_BOS: u32 = 1;
const FLAG_ADD_EOS: u32 = 2;
const FLAG_IGNORE_MERGES: u32 = 4;

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("pre", &self.pre)
            .field("n_vocab", &self.img.n_vocab)
            .field("n_merges", &self.img.n_ranks)
            .field("n_special", &self.img.special.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("eog", &self.img.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish()
    }
}

/// A piece of the input after special tokens are taken out.
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// C's `isspace` in the "C" locale (what llama.cpp strips around lstrip/rstrip tokens).
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

struct Meta<'g, 'a> {
    g: &'g Gguf<'a>,
}

impl<'a> Meta<'_, 'a> {
    fn str(&self, key: &'static str) -> Result<Option<&'a str>, TokenizerError> {
        match self.g.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(_) => Err(TokenizerError::WrongType {
                key,
                expected: "a string",
            }),
        }
    }
    fn bool(&self, key: &'static str) -> Result<Option<bool>, TokenizerError> {
        match self.g.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(TokenizerError::WrongType {
                key,
                expected: "a bool",
            }),
        }
    }
    fn id(&self, key: &'static str) -> Result<Option<u64>, TokenizerError> {
        match self.g.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(TokenizerError::WrongType {
                key,
                expected: "a non-negative integer",
            }),
        }
    }
    fn array(&self, key: &'static str) -> Result<Option<Array<'a>>, TokenizerError> {
        match self.g.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(*a)),
            Some(_) => Err(TokenizerError::WrongType {
                key,
                expected: "an array",
            }),
        }
    }
    fn strings(&self, key: &'static str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
        match self.array(key)? {
            None => Ok(None),
            Some(a) => a.strings().map(Some).ok_or(TokenizerError::WrongType {
                key,
                expected: "an array of strings",
            }),
        }
    }
}

impl Tokenizer {
    /// Parses the GGUF metadata in `bytes` (a prefix holding the key/value section is enough)
    /// and builds the tokenizer from it.
    pub fn from_gguf_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        Self::from_gguf(&cinfer_gguf::parse_metadata(bytes)?)
    }

    /// The tokenizer of GGUF metadata: from its [image](Self::image) under [`IMAGE_KEY`] when
    /// the metadata holds one (which costs next to nothing), else
    /// [built](Self::build_from_gguf) from the tokenizer keys.
    ///
    /// An image this release cannot read (another [version](IMAGE_VERSION), or malformed) is
    /// passed over when the metadata holds the vocabulary to build from, so a model sealed by
    /// another release still serves; without the vocabulary it is [`TokenizerError::BadImage`].
    pub fn from_gguf(g: &Gguf<'_>) -> Result<Self, TokenizerError> {
        let Some(image) = image_in(g)? else {
            return Self::build_from_gguf(g);
        };
        match Self::from_image(image) {
            Err(TokenizerError::BadImage(_)) if g.get(K_TOKENS).is_some() => {
                Self::build_from_gguf(g)
            }
            other => other,
        }
    }

    /// A tokenizer from its [image](Self::image): checks the header and copies the bytes, but
    /// builds no table, so it takes well under a millisecond for a 49,152-token vocabulary. A
    /// malformed image, or one of another [version](IMAGE_VERSION), is
    /// [`TokenizerError::BadImage`]; a well-formed but wrong one gives wrong ids, never a panic.
    pub fn from_image(bytes: &[u8]) -> Result<Self, TokenizerError> {
        Self::with_image(image::Image::parse(bytes.to_vec(), 0..bytes.len()).map_err(|(e, _)| e)?)
    }

    /// [`from_gguf`](Self::from_gguf) on the GGUF metadata in `meta`, keeping `meta` when it
    /// holds an image, which is then read where it lies: no copy, nothing built. This is how a
    /// program gets its tokenizer fastest (with `metadata-keys` fetching just the keys it needs
    /// and the image).
    pub fn from_metadata(meta: Vec<u8>) -> Result<Self, TokenizerError> {
        let g = cinfer_gguf::parse_metadata(&meta)?;
        let Some(image) = image_in(&g)? else {
            return Self::build_from_gguf(&g);
        };
        // The image's place in `meta` (it borrows from it).
        let start = image.as_ptr() as usize - meta.as_ptr() as usize;
        let range = start..start + image.len();
        let has_vocabulary = g.get(K_TOKENS).is_some();
        drop(g);
        match image::Image::parse(meta, range) {
            Ok(img) => Self::with_image(img),
            // An image this release cannot read: build from the vocabulary if
            // the metadata has it (as `from_gguf` does).
            Err((TokenizerError::BadImage(_), meta)) if has_vocabulary => {
                Self::build_from_gguf(&cinfer_gguf::parse_metadata(&meta)?)
            }
            Err((e, _)) => Err(e),
        }
    }

    fn with_image(img: image::Image) -> Result<Self, TokenizerError> {
        let name = Some(img.pre_name.as_str()).filter(|s| !s.is_empty());
        let pre = PreTokenizer::from_name(name).ok_or_else(|| {
            TokenizerError::UnsupportedPreTokenizer(name.unwrap_or_default().to_owned())
        })?;
        let [bos, eos, eot, unk, pad] = img.ids;
        Ok(Tokenizer {
            pre,
            bos,
            eos,
            eot,
            unk,
            pad,
            add_bos: img.flags & FLAG_ADD_BOS != 0,
            add_eos: img.flags & FLAG_ADD_EOS != 0,
            ignore_merges: img.flags & FLAG_IGNORE_MERGES != 0,
            img,
        })
    }

    /// The image of this tokenizer: every table it uses, in one byte string that
    /// [`from_image`](Self::from_image) reads in place (format in the `image` module; the
    /// same bytes for the same metadata and [`IMAGE_VERSION`]).
    pub fn image(&self) -> &[u8] {
        self.img.bytes()
    }

    /// Builds the tokenizer from GGUF metadata, the way llama.cpp's `llama_vocab::load` does for
    /// `tokenizer.ggml.model = "gpt2"` (ignoring any image in it).
    ///
    /// Reads `tokenizer.ggml.{model, pre, tokens, token_type, merges}`, the special token ids
    /// (`bos`, `eos`, `eot`, `eom`, `unknown`, `padding`, FIM), `add_bos_token` and
    /// `add_eos_token`. As in llama.cpp: bos and eos default to id 11 for this model type when
    /// their keys are absent; end-of-turn, end-of-message and FIM tokens are also found by their
    /// text, and such tokens, like every end-of-generation token, become control tokens.
    /// Stricter than llama.cpp (which warns and keeps a default): a bos/eos/eot/eom id outside
    /// the vocabulary is an error. Padding, unknown and FIM ids out of range are ignored, as
    /// there.
    pub fn build_from_gguf(g: &Gguf<'_>) -> Result<Self, TokenizerError> {
        let m = Meta { g };
        let model = m.str(K_MODEL)?.ok_or(TokenizerError::MissingKey(K_MODEL))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let pre_name = m.str(K_PRE)?.filter(|s| !s.is_empty());
        let pre = PreTokenizer::from_name(pre_name).ok_or_else(|| {
            TokenizerError::UnsupportedPreTokenizer(pre_name.unwrap_or_default().to_owned())
        })?;
        // Per-name flags of llama_vocab::load.
        let (mut add_bos, ignore_merges) = match pre_name {
            Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3") => (true, true),
            _ => (false, false),
        };
        let mut add_eos = false;

        // Tokens.
        let raw = m
            .strings(K_TOKENS)?
            .ok_or(TokenizerError::MissingKey(K_TOKENS))?;
        let n = raw.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        if i32::try_from(n).is_err() {
            return Err(TokenizerError::VocabularyTooLarge(n));
        }
        let mut texts: Vec<Box<str>> = Vec::with_capacity(n);
        let mut strings: HashMap<Box<str>, u32> = HashMap::with_capacity(n);
        for (i, t) in raw.into_iter().enumerate() {
            let i = i as u32; // n fits in i32
            let text: Box<str> = if t.is_empty() {
                format!("[EMPTY_{i}]").into()
            } else {
                t.into()
            };
            if let Some(&first) = strings.get(&text) {
                return Err(TokenizerError::DuplicateToken { index: i, first });
            }
            strings.insert(text.clone(), i);
            texts.push(text);
        }
        let mut attrs = match m.array(K_TYPES)? {
            None => vec![NORMAL; n],
            Some(a) => {
                if a.len() != n {
                    return Err(TokenizerError::LengthMismatch {
                        key: K_TYPES,
                        len: a.len(),
                        n_vocab: n,
                    });
                }
                let mut attrs = Vec::with_capacity(n);
                for v in a.iter() {
                    if matches!(
                        v,
                        Value::Str(_)
                            | Value::Array(_)
                            | Value::Bool(_)
                            | Value::F32(_)
                            | Value::F64(_)
                    ) {
                        return Err(TokenizerError::WrongType {
                            key: K_TYPES,
                            expected: "an array of integers",
                        });
                    }
                    // Negative values are "undefined", as any unknown type is.
                    attrs.push(attr_of_type(v.as_u64()));
                }
                attrs
            }
        };

        // Merges: "left right", split at the first space after the first byte; the first
        // occurrence of a pair sets its rank.
        let merges = m
            .strings(K_MERGES)?
            .ok_or(TokenizerError::MissingKey(K_MERGES))?;
        let mut ranks: HashMap<(u32, u32), u32> = HashMap::with_capacity(merges.len());
        let mut extra: Vec<Box<str>> = Vec::new();
        for (index, line) in merges.iter().enumerate() {
            let split = line
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .map(|p| p + 1)
                .ok_or(TokenizerError::BadMerge { index })?;
            let (left, right) = (&line[..split], &line[split + 1..]);
            let mut intern = |s: &str| -> u32 {
                if let Some(&id) = strings.get(s) {
                    return id;
                }
                let id = u32::try_from(strings.len()).unwrap_or(u32::MAX);
                strings.insert(s.into(), id);
                extra.push(s.into());
                id
            };
            let key = (intern(left), intern(right));
            let rank = u32::try_from(index).unwrap_or(u32::MAX);
            ranks.entry(key).or_insert(rank);
        }

        // Special token ids.
        let checked = |key: &'static str| -> Result<Option<u32>, TokenizerError> {
            match m.id(key)? {
                None => Ok(None),
                Some(id) if id < n as u64 => Ok(Some(id as u32)),
                Some(id) => Err(TokenizerError::IdOutOfRange {
                    key,
                    id,
                    n_vocab: n,
                }),
            }
        };
        let lenient = |key: &'static str| -> Result<Option<u32>, TokenizerError> {
            Ok(m.id(key)?.filter(|&id| id < n as u64).map(|id| id as u32))
        };
        // llama.cpp's defaults for gpt2 vocabularies: bos = eos = 11 (none for chatglm's bos).
        let default_11 = (n > 11).then_some(11);
        let bos = match checked(K_BOS)? {
            Some(id) => Some(id),
            None if pre_name == Some("chatglm-bpe") => None,
            None => default_11,
        };
        let eos = checked(K_EOS)?.or(default_11);
        let mut eot = checked(K_EOT)?;
        let mut eom = checked(K_EOM)?;
        let unk = lenient(K_UNK)?;
        let pad = lenient(K_PAD)?;
        let mut fim = [None; 6];
        for (slot, (key, old_key, _)) in fim.iter_mut().zip(FIM) {
            *slot = lenient(key)?;
            if !old_key.is_empty()
                && let Some(id) = lenient(old_key)?
            {
                *slot = Some(id);
            }
        }
        if let Some(b) = m.bool(K_ADD_BOS)? {
            add_bos = b;
        }
        if let Some(b) = m.bool(K_ADD_EOS)? {
            add_eos = b;
        }

        // Tokens recognised by their text become control tokens. llama.cpp takes the first one
        // its hash map yields; this takes the lowest id (the same when there is one candidate).
        let lowest = |cands: &[&str]| {
            cands
                .iter()
                .filter_map(|t| strings.get(*t).copied())
                .filter(|&id| (id as usize) < n)
                .min()
        };
        if eot.is_none() {
            eot = lowest(&EOT_TEXTS);
            if let Some(id) = eot {
                attrs[id as usize] = CONTROL;
            }
        }
        if eom.is_none() {
            eom = lowest(&["<|eom_id|>"]);
            if let Some(id) = eom {
                attrs[id as usize] = CONTROL;
            }
        }
        for (slot, (_, _, texts_)) in fim.iter_mut().zip(FIM) {
            if slot.is_none() {
                *slot = lowest(texts_);
                if let Some(id) = *slot {
                    attrs[id as usize] = CONTROL;
                }
            }
        }
        let mut eog: Vec<u32> = fim[3..].iter().flatten().copied().collect();
        for t in EOG_TEXTS {
            if let Some(&id) = strings.get(t)
                && (id as usize) < n
            {
                eog.push(id);
                attrs[id as usize] = CONTROL;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();

        // Special tokens, longest first (ties by id; llama.cpp's sort leaves them unspecified).
        let mut special: Vec<u32> = (0..n as u32)
            .filter(|&id| attrs[id as usize] & SPECIAL != 0)
            .collect();
        special.sort_by_key(|&id| std::cmp::Reverse(texts[id as usize].len()));

        // Pieces, before the strip attributes below (which do not change them).
        let pieces = texts
            .iter()
            .zip(&attrs)
            .map(|(t, &a)| piece(t, a))
            .collect();

        // Per-model attributes of llama_vocab::load.
        let need = |token: &'static str, why: &'static str| {
            strings
                .get(token)
                .copied()
                .filter(|&id| (id as usize) < n)
                .ok_or(TokenizerError::MissingToken { token, why })
        };
        if let Some(p) = pre_name
            && ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
                .iter()
                .any(|j| p.contains(j))
        {
            let id = need("<mask>", "jina-v2 pre-tokenizers strip spaces before it")?;
            attrs[id as usize] |= LSTRIP;
        } else if let Some(Value::Str(name)) = g.get("general.name") {
            let name = name.to_ascii_lowercase();
            if name.contains("phi-3") || name.contains("phi3") {
                const WHY: &str = "phi-3 models strip spaces after special tokens";
                for &id in &special {
                    attrs[id as usize] |= RSTRIP;
                }
                attrs[need("</s>", WHY)? as usize] |= RSTRIP;
                for t in ["<unk>", "<s>", "<|endoftext|>"] {
                    attrs[need(t, WHY)? as usize] &= !RSTRIP;
                }
            }
        }

        let pieces: Vec<Box<[u8]>> = pieces;
        let mut all = texts;
        all.append(&mut extra);
        let flags = [
            (add_bos, FLAG_ADD_BOS),
            (add_eos, FLAG_ADD_EOS),
            (ignore_merges, FLAG_IGNORE_MERGES),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |f, (_, bit)| f | bit);
        let bytes = image::build(&image::Parts {
            pre_name: pre_name.unwrap_or_default(),
            strings: &all,
            n_vocab: n,
            attrs: &attrs,
            pieces: &pieces,
            ranks: &ranks,
            special: &special,
            eog: &eog,
            ids: [bos, eos, eot, unk, pad],
            flags,
        })?;
        let len = bytes.len();
        let tok = Self::with_image(image::Image::parse(bytes, 0..len).map_err(|(e, _)| e)?)?;
        debug_assert_eq!(tok.pre, pre);
        Ok(tok)
    }

    /// The interned id of `text` (a token below `n_vocab`, a merge side above).
    fn interned(&self, text: &str) -> Option<u32> {
        self.img.lookup(text.as_bytes())
    }

    /// Token ids of `text` as llama.cpp's `llama_tokenize(.., add_special = true,
    /// parse_special)` gives them: BOS first if the model's `add_bos_token` says so (not for
    /// SmolLM2), EOS last if `add_eos_token` does. With `parse_special`, the texts of control
    /// tokens (e.g. `<|im_start|>`) become their ids; without it they are plain text.
    /// User-defined tokens are matched either way.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        self.encode_with(text, true, parse_special)
    }

    /// Exactly `llama_tokenize(text, add_special, parse_special)`: with `add_special` false,
    /// neither BOS nor EOS is added whatever the model says.
    pub fn encode_with(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special
            && self.add_bos
            && let Some(bos) = self.bos
        {
            out.push(bos);
        }
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(s, e) => self.encode_text(&text[s..e], &mut out),
            }
        }
        if add_special
            && self.add_eos
            && let Some(eos) = self.eos
        {
            out.push(eos);
        }
        out
    }

    /// Takes special tokens out of `text`, longest first (llama.cpp's `tokenizer_st_partition`).
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(0, text.len()));
        let bytes = text.as_bytes();
        for &id in &self.img.special {
            let attr = self.img.attr(id).unwrap_or(0);
            if !parse_special && attr & (CONTROL | UNKNOWN) != 0 {
                continue;
            }
            let Some(needle) = self.token_text(id).filter(|t| !t.is_empty()) else {
                continue;
            };
            if !text.contains(needle) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(mut s, e) = f else {
                    next.push(f);
                    continue;
                };
                while s < e {
                    let Some(m) = text[s..e].find(needle).map(|m| s + m) else {
                        break;
                    };
                    let mut left_end = m;
                    if attr & LSTRIP != 0 {
                        while left_end > s && c_isspace(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > s {
                        next.push(Fragment::Text(s, left_end));
                    }
                    next.push(Fragment::Token(id));
                    s = m + needle.len();
                    if attr & RSTRIP != 0 {
                        while s < e && c_isspace(bytes[s]) {
                            s += 1;
                        }
                    }
                }
                if s < e {
                    next.push(Fragment::Text(s, e));
                }
            }
            frags = next;
        }
        frags
    }

    /// Pre-tokenizes and BPE-encodes text that holds no special tokens.
    fn encode_text(&self, text: &str, out: &mut Vec<u32>) {
        let token = |s: &str| self.token_id(s);
        let mut word = String::new();
        let mut spans = Vec::new();
        for raw in self.pre.split(text) {
            word.clear();
            word.extend(raw.bytes().map(unicode::byte_to_char));
            if self.ignore_merges
                && let Some(id) = token(&word)
            {
                out.push(id);
                continue;
            }
            spans.clear();
            bpe::merge(
                &word,
                |s| self.interned(s),
                |a, b| self.img.rank(a, b),
                &mut spans,
            );
            for &(s, e) in &spans {
                let sym = &word[s..e];
                if let Some(id) = token(sym) {
                    out.push(id);
                } else {
                    // llama.cpp then looks up each byte of the symbol's text as a one-byte
                    // token; only ASCII bytes can be one.
                    for b in sym.bytes().filter(u8::is_ascii) {
                        if let Some(id) = token(char::from(b).encode_utf8(&mut [0; 4])) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    /// The bytes token `id` stands for (llama.cpp's `token_to_piece` without lstrip): for a
    /// normal token its byte-level text decoded to bytes; for control and unknown tokens their
    /// text if `render_special`, else nothing; for user-defined tokens their text. Unused, byte
    /// and undefined tokens, and ids outside the vocabulary, give nothing.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> Vec<u8> {
        self.token_piece(id, render_special).to_vec()
    }

    /// [`token_bytes`](Self::token_bytes) without the copy.
    pub fn token_piece(&self, id: u32, render_special: bool) -> &[u8] {
        match (self.img.attr(id), self.img.piece(id)) {
            (Some(a), Some(p)) if render_special || a & (CONTROL | UNKNOWN) == 0 => p,
            _ => &[],
        }
    }

    /// The concatenated pieces of `ids` (what llama.cpp prints token by token; it does not apply
    /// `llama_detokenize`'s space clean-up, which SmolLM2's vocabulary does not use anyway).
    pub fn decode(&self, ids: &[u32], render_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_piece(id, render_special));
        }
        out
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        self.img.n_vocab
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The end-of-turn token (from `eot_token_id`, or found by its text).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// The unknown token, if the metadata names one.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// The padding token, if the metadata names one.
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// Whether [`encode`](Self::encode) starts with BOS (`add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`encode`](Self::encode) ends with EOS (`add_eos_token`).
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The pre-tokenizer in use.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// Whether generating `id` ends generation (llama.cpp's `llama_vocab_is_eog`): eos, eot,
    /// eom, the FIM pad/repo/separator tokens, and every token whose text is one of
    /// `<|eot_id|>`, `<|im_end|>`, `<|end|>`, `<end_of_turn>`, `<|endoftext|>`, `<|eom_id|>`,
    /// `<EOT>`.
    pub fn is_eog(&self, id: u32) -> bool {
        self.img.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, ascending.
    pub fn eog_ids(&self) -> &[u32] {
        &self.img.eog
    }

    /// Whether `id` is a control token (printed only when special tokens are rendered).
    pub fn is_control(&self, id: u32) -> bool {
        self.img.attr(id).is_some_and(|a| a & CONTROL != 0)
    }

    /// The token whose stored text is exactly `text` (e.g. `"<|im_start|>"`; normal tokens are
    /// stored in byte-level form, e.g. `"Ġthe"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.interned(text)
            .filter(|&id| (id as usize) < self.img.n_vocab)
    }

    /// The stored text of token `id`.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.img
            .string(id)
            .filter(|_| (id as usize) < self.img.n_vocab)
            .and_then(|t| std::str::from_utf8(t).ok())
    }
}

/// What a token prints as with special tokens rendered (llama.cpp's piece cache).
fn piece(text: &str, attr: u16) -> Box<[u8]> {
    if attr & SPECIAL != 0 {
        return text.as_bytes().into();
    }
    if attr & NORMAL == 0 {
        return Box::default();
    }
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match unicode::char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                // llama.cpp's marker for a char outside the byte map (it appends the whole text).
                out.extend_from_slice(b"[UNK_BYTE_0x");
                for b in c.encode_utf8(&mut [0; 4]).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out.into()
}

#[cfg(test)]
mod tests;
