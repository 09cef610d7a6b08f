//! The tokenizer image: every table a [`Tokenizer`](crate::Tokenizer) looks things up in, laid
//! out in one byte string that is used where it lies, without building anything.
//!
//! Building the tokenizer from GGUF metadata means interning ~100,000 strings into hash maps:
//! tens of milliseconds in a program, on every request. The image is built once (by
//! `cinfer seal-model`, which stores it in the model's metadata under
//! [`IMAGE_KEY`](crate::IMAGE_KEY)), and a program that finds it only checks its header: the
//! vocabulary and merge maps are open-addressing tables inside the bytes, read in place.
//!
//! Layout (version 1), all integers little-endian `u32`:
//!
//! ```text
//! magic "CTKI" | version | n_vocab | n_strings | n_ranks | n_special | n_eog
//! | str_bytes | piece_bytes | hash_cap | rank_cap | bos | eos | eot | unk | pad | flags | pre_len
//! pre-tokenizer name [pre_len], zero-padded to 4 bytes
//! attrs        u16 × n_vocab, zero-padded to 4 bytes
//! special      u32 × n_special (longest text first)
//! eog          u32 × n_eog (ascending)
//! str_off      u32 × (n_strings + 1)   string i is str_blob[str_off[i] .. str_off[i + 1]]
//! piece_off    u32 × (n_vocab + 1)     piece i is piece_blob[piece_off[i] .. piece_off[i + 1]]
//! hash         u32 × hash_cap          0 = empty, else string id + 1; slot fnv1a(text) & (cap - 1)
//! ranks        (u32 a, u32 b, u32 rank) × rank_cap; a = u32::MAX is empty; slot mix(a, b)
//! str_blob     [str_bytes]   token texts (ids < n_vocab), then merge sides that are no token
//! piece_blob   [piece_bytes]
//! ```
//!
//! Both tables probe linearly. Absent ids (bos, …) are `u32::MAX`; flags: bit 0 add_bos,
//! bit 1 add_eos, bit 2 ignore_merges.
//!
//! What a reader trusts: the image sits in the sealed model, authenticated like the weights,
//! and it is only as right as the metadata it was built from. A malformed one still cannot make
//! the tokenizer panic or read out of bounds: the header is checked against the length, every
//! read is bounds-checked, ids are checked against the vocabulary and probing is bounded by the
//! table size; a lookup in garbage gives garbage ids, never a crash. The version is bumped
//! whenever what the tables mean changes, so an old image is refused rather than misread.

use std::collections::HashMap;

use crate::TokenizerError;

const MAGIC: &[u8; 4] = b"CTKI";
/// The image format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// `u32` words after the magic: the version and 16 fields.
const HEADER_WORDS: usize = 17;
/// Marks an absent id, an empty rank slot.
const NONE: u32 = u32::MAX;

/// FNV-1a, 64-bit: the string table's hash. Written out because the image
/// format fixes it (a hasher crate may change its output between versions).
fn fnv1a(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The merge table's hash of a pair of string ids (Fibonacci hashing).
fn mix(a: u32, b: u32) -> u64 {
    ((u64::from(a) << 32) | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17
}

/// Everything [`build`] needs, as the GGUF loader computed it.
pub(crate) struct Parts<'a> {
    pub pre_name: &'a str,
    /// Token texts, then the merge sides that are not tokens, in id order.
    pub strings: &'a [Box<str>],
    pub n_vocab: usize,
    pub attrs: &'a [u16],
    pub pieces: &'a [Box<[u8]>],
    pub ranks: &'a HashMap<(u32, u32), u32>,
    pub special: &'a [u32],
    pub eog: &'a [u32],
    pub ids: [Option<u32>; 5],
    pub flags: u32,
}

/// Slots for `n` entries: a power of two at most 3/4 full (linear probing then
/// averages under 3 probes for a hit and under 9 for a miss).
fn table_cap(n: usize) -> usize {
    (n + n.div_ceil(3)).max(2).next_power_of_two()
}

/// Lays out the image. Fails only if a count does not fit in `u32`.
pub(crate) fn build(p: &Parts<'_>) -> Result<Vec<u8>, TokenizerError> {
    let too_large = || TokenizerError::VocabularyTooLarge(p.strings.len());
    let w = |n: usize| u32::try_from(n).map_err(|_| too_large());
    let str_bytes: usize = p.strings.iter().map(|s| s.len()).sum();
    let piece_bytes: usize = p.pieces.iter().map(|s| s.len()).sum();
    let (hash_cap, rank_cap) = (table_cap(p.strings.len()), table_cap(p.ranks.len()));
    let [bos, eos, eot, unk, pad] = p.ids.map(|id| id.unwrap_or(NONE));
    let header = [
        w(p.n_vocab)?,
        w(p.strings.len())?,
        w(p.ranks.len())?,
        w(p.special.len())?,
        w(p.eog.len())?,
        w(str_bytes)?,
        w(piece_bytes)?,
        w(hash_cap)?,
        w(rank_cap)?,
        bos,
        eos,
        eot,
        unk,
        pad,
        p.flags,
        w(p.pre_name.len())?,
    ];
    let mut out = MAGIC.to_vec();
    let put = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
    put(&mut out, VERSION);
    for v in header {
        put(&mut out, v);
    }
    let pad4 = |out: &mut Vec<u8>| out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(p.pre_name.as_bytes());
    pad4(&mut out);
    for a in p.attrs {
        out.extend_from_slice(&a.to_le_bytes());
    }
    pad4(&mut out);
    for &id in p.special.iter().chain(p.eog) {
        put(&mut out, id);
    }
    let offsets = |out: &mut Vec<u8>, items: &mut dyn Iterator<Item = usize>| {
        let mut at = 0usize;
        put(out, 0);
        for len in items {
            at += len;
            put(out, at as u32); // at ≤ str_bytes or piece_bytes, checked above
        }
    };
    offsets(&mut out, &mut p.strings.iter().map(|s| s.len()));
    offsets(&mut out, &mut p.pieces.iter().map(|s| s.len()));
    let mut hash = vec![0u32; hash_cap];
    for (id, s) in p.strings.iter().enumerate() {
        let mut slot = fnv1a(s.as_bytes()) as usize & (hash_cap - 1);
        while hash[slot] != 0 {
            slot = (slot + 1) & (hash_cap - 1);
        }
        hash[slot] = id as u32 + 1; // id < n_strings ≤ u32::MAX
    }
    for v in hash {
        put(&mut out, v);
    }
    let mut ranks = vec![[NONE, 0, 0]; rank_cap];
    // In rank order, so that the same metadata always gives the same bytes.
    let mut by_rank: Vec<_> = p.ranks.iter().map(|(&(a, b), &r)| (r, a, b)).collect();
    by_rank.sort_unstable();
    for (rank, a, b) in by_rank {
        let mut slot = mix(a, b) as usize & (rank_cap - 1);
        while ranks[slot][0] != NONE {
            slot = (slot + 1) & (rank_cap - 1);
        }
        ranks[slot] = [a, b, rank];
    }
    for v in ranks.into_iter().flatten() {
        put(&mut out, v);
    }
    for s in p.strings {
        out.extend_from_slice(s.as_bytes());
    }
    for s in p.pieces {
        out.extend_from_slice(s);
    }
    Ok(out)
}

/// A checked image: `buf[start..end]`, with section offsets into `buf`.
#[derive(Clone)]
pub(crate) struct Image {
    buf: Vec<u8>,
    start: usize,
    pub n_vocab: usize,
    pub n_strings: usize,
    pub n_ranks: usize,
    pub pre_name: String,
    pub ids: [Option<u32>; 5],
    pub flags: u32,
    pub special: Vec<u32>,
    pub eog: Vec<u32>,
    attrs: usize,
    str_off: usize,
    piece_off: usize,
    hash: usize,
    hash_cap: usize,
    ranks: usize,
    rank_cap: usize,
    str_blob: usize,
    piece_blob: usize,
    end: usize,
}

fn bad(why: &'static str) -> TokenizerError {
    TokenizerError::BadImage(why)
}

impl Image {
    /// Checks the header of the image `buf[range]` against its length and
    /// reads the small lists; the tables are not walked, nor copied. On
    /// error, `buf` comes back with the reason.
    pub fn parse(
        buf: Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> Result<Self, (TokenizerError, Vec<u8>)> {
        let checked = match buf.get(range.clone()) {
            Some(bytes) => Self::check(bytes, range.start),
            None => Err(bad("no image magic")),
        };
        match checked {
            Ok(mut img) => {
                img.buf = buf;
                Ok(img)
            }
            Err(e) => Err((e, buf)),
        }
    }

    /// [`parse`](Self::parse) on the image's bytes, found at `start` of the
    /// buffer the image will hold (left empty here).
    fn check(bytes: &[u8], start: usize) -> Result<Self, TokenizerError> {
        let word = |i: usize| -> Option<u32> {
            let b = bytes.get(4 + 4 * i..8 + 4 * i)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if bytes.get(..4) != Some(&MAGIC[..]) {
            return Err(bad("no image magic"));
        }
        match word(0) {
            Some(VERSION) => {}
            Some(_) => return Err(bad("another image version (rebuild it with this release)")),
            None => return Err(bad("truncated header")),
        }
        let mut h = [0usize; HEADER_WORDS - 1];
        for (i, v) in h.iter_mut().enumerate() {
            *v = word(i + 1).ok_or(bad("truncated header"))? as usize;
        }
        let [
            n_vocab,
            n_strings,
            n_ranks,
            n_special,
            n_eog,
            str_bytes,
            piece_bytes,
            hash_cap,
            rank_cap,
            bos,
            eos,
            eot,
            unk,
            pad,
            flags,
            pre_len,
        ] = h;
        if n_vocab == 0 || n_strings < n_vocab {
            return Err(bad("vocabulary counts"));
        }
        if !hash_cap.is_power_of_two()
            || hash_cap <= n_strings
            || !rank_cap.is_power_of_two()
            || rank_cap <= n_ranks
        {
            return Err(bad("table sizes"));
        }
        // Section offsets, each checked for overflow; the total must be the length.
        let mut at = 4 + 4 * HEADER_WORDS;
        let mut section = |len: Option<usize>| -> Result<usize, TokenizerError> {
            let start = at;
            at = len
                .and_then(|l| at.checked_add(l))
                .ok_or(bad("section sizes"))?;
            Ok(start)
        };
        let words = |n: usize, k: usize| n.checked_mul(4 * k);
        let pre = section(Some(pre_len.next_multiple_of(4)))?;
        let attrs = section(n_vocab.checked_mul(2).map(|l| l.next_multiple_of(4)))?;
        let lists = section(n_special.checked_add(n_eog).and_then(|n| words(n, 1)))?;
        let str_off = section(n_strings.checked_add(1).and_then(|n| words(n, 1)))?;
        let piece_off = section(n_vocab.checked_add(1).and_then(|n| words(n, 1)))?;
        let hash = section(words(hash_cap, 1))?;
        let ranks = section(words(rank_cap, 3))?;
        let str_blob = section(Some(str_bytes))?;
        let piece_blob = section(Some(piece_bytes))?;
        if at != bytes.len() {
            return Err(bad("length does not match the header"));
        }
        let end = start + at;
        let pre_name = std::str::from_utf8(&bytes[pre..pre + pre_len])
            .map_err(|_| bad("pre-tokenizer name is not UTF-8"))?
            .to_owned();
        let list = |from: usize, n: usize| -> Result<Vec<u32>, TokenizerError> {
            bytes[from..from + 4 * n]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .map(|id| {
                    (id as usize)
                        .lt(&n_vocab)
                        .then_some(id)
                        .ok_or(bad("token id out of range"))
                })
                .collect()
        };
        let special = list(lists, n_special)?;
        let eog = list(lists + 4 * n_special, n_eog)?;
        let mut ids = [None; 5];
        for (slot, id) in ids.iter_mut().zip([bos, eos, eot, unk, pad]) {
            *slot = match id {
                id if id == NONE as usize => None,
                id if id < n_vocab => Some(id as u32),
                _ => return Err(bad("token id out of range")),
            };
        }
        Ok(Image {
            n_vocab,
            n_strings,
            n_ranks,
            pre_name,
            ids,
            flags: flags as u32,
            special,
            eog,
            attrs: start + attrs,
            str_off: start + str_off,
            piece_off: start + piece_off,
            hash: start + hash,
            hash_cap,
            ranks: start + ranks,
            rank_cap,
            str_blob: start + str_blob,
            piece_blob: start + piece_blob,
            end,
            start,
            buf: Vec::new(),
        })
    }

    /// The image's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn u32_at(&self, at: usize) -> u32 {
        match self.buf.get(at..at + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => NONE,
        }
    }

    /// `blob[off[i] .. off[i + 1]]`, or empty where the offsets are out of order or bounds.
    fn slice(&self, off: usize, blob: usize, blob_end: usize, i: usize) -> &[u8] {
        let (a, b) = (
            self.u32_at(off + 4 * i) as usize,
            self.u32_at(off + 4 * i + 4) as usize,
        );
        let (Some(a), Some(b)) = (blob.checked_add(a), blob.checked_add(b)) else {
            return &[];
        };
        if b > blob_end {
            return &[];
        }
        self.buf.get(a..b).unwrap_or(&[])
    }

    /// The text of interned string `id` (a token below `n_vocab`).
    pub fn string(&self, id: u32) -> Option<&[u8]> {
        ((id as usize) < self.n_strings)
            .then(|| self.slice(self.str_off, self.str_blob, self.piece_blob, id as usize))
    }

    /// The piece of token `id`.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        ((id as usize) < self.n_vocab)
            .then(|| self.slice(self.piece_off, self.piece_blob, self.end, id as usize))
    }

    /// The attributes of token `id`.
    pub fn attr(&self, id: u32) -> Option<u16> {
        let i = id as usize;
        if i >= self.n_vocab {
            return None;
        }
        let b = self.buf.get(self.attrs + 2 * i..self.attrs + 2 * i + 2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    /// The interned id of `text` (a token, or a merge side at or above `n_vocab`).
    pub fn lookup(&self, text: &[u8]) -> Option<u32> {
        let mask = self.hash_cap - 1;
        let mut slot = fnv1a(text) as usize & mask;
        for _ in 0..self.hash_cap {
            match self.u32_at(self.hash + 4 * slot) {
                0 => return None,
                e => {
                    let id = e.wrapping_sub(1);
                    if self.string(id) == Some(text) {
                        return Some(id);
                    }
                }
            }
            slot = (slot + 1) & mask;
        }
        None
    }

    /// The rank of merging interned strings `a` and `b`.
    pub fn rank(&self, a: u32, b: u32) -> Option<u32> {
        if self.n_ranks == 0 {
            return None;
        }
        let mask = self.rank_cap - 1;
        let mut slot = mix(a, b) as usize & mask;
        for _ in 0..self.rank_cap {
            let at = self.ranks + 12 * slot;
            match self.u32_at(at) {
                NONE => return None,
                x if x == a && self.u32_at(at + 4) == b => return Some(self.u32_at(at + 8)),
                _ => slot = (slot + 1) & mask,
            }
        }
        None
    }
}
