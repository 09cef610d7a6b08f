//! Code point classes as llama.cpp's pre-tokenizers see them, and the GPT-2 byte↔char map.
//!
//! llama.cpp gives each code point one major general category (from UnicodeData.txt of Unicode
//! 15.1.0, with unassigned code points apart) and, separately, a "whitespace" bit for a fixed list
//! of 25 code points. `\p{L}`, `\p{N}`, `\s`, … in its regexes mean exactly these sets.

use crate::unicode_table::CATEGORY_RANGES;

/// Major general category of a code point (`\p{X}` classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Category {
    /// `Cn`: not assigned in Unicode 15.1.
    Unassigned,
    /// `Cc`, `Cf`, `Co`, `Cs`.
    Control,
    /// `\p{L}`.
    Letter,
    /// `\p{M}`.
    Mark,
    /// `\p{N}`.
    Number,
    /// `\p{P}`.
    Punctuation,
    /// `\p{S}`.
    Symbol,
    /// `\p{Z}`.
    Separator,
}

const fn lookup(cp: u32) -> Category {
    // Binary search for the last range starting at or before `cp` (the first starts at 0).
    let (mut lo, mut hi) = (0usize, CATEGORY_RANGES.len());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if CATEGORY_RANGES[mid].0 <= cp {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    CATEGORY_RANGES[lo].1
}

static ASCII: [Category; 128] = {
    let mut t = [Category::Unassigned; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = lookup(i as u32);
        i += 1;
    }
    t
};

/// The category of `c`.
pub(crate) fn category(c: char) -> Category {
    match ASCII.get(c as usize) {
        Some(cat) => *cat,
        None => lookup(c as u32),
    }
}

/// llama.cpp's `\s`: the Unicode `White_Space` property (its fixed list of 25 code points).
pub(crate) fn is_whitespace(c: char) -> bool {
    matches!(
        c as u32,
        0x09..=0x0D
            | 0x20
            | 0x85
            | 0xA0
            | 0x1680
            | 0x2000..=0x200A
            | 0x2028
            | 0x2029
            | 0x202F
            | 0x205F
            | 0x3000
    )
}

/// What the pre-tokenizers ask about one code point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Flags {
    pub(crate) cat: Category,
    pub(crate) ws: bool,
}

impl Flags {
    pub(crate) fn of(c: char) -> Self {
        Flags {
            cat: category(c),
            ws: is_whitespace(c),
        }
    }
    pub(crate) fn letter(self) -> bool {
        self.cat == Category::Letter
    }
    pub(crate) fn number(self) -> bool {
        self.cat == Category::Number
    }
    /// `[^\s\p{L}\p{N}]`.
    pub(crate) fn other(self) -> bool {
        !(self.ws || self.letter() || self.number())
    }
}

/// Bytes that GPT-2's byte-level encoding keeps as the code point of the same value.
const fn printable(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// GPT-2's `bytes_to_unicode`: printable bytes stand for themselves; the other 68 are given
/// U+0100, U+0101, … in byte order.
static BYTE_TO_CHAR: [char; 256] = {
    let mut t = ['\0'; 256];
    let mut n = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let cp = if printable(b as u8) {
            b as u32
        } else {
            n += 1;
            255 + n
        };
        t[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0', // unreachable: every value is below U+0144
        };
        b += 1;
    }
    t
};

/// The remapped bytes, indexed by `code point - 0x100`.
static REMAPPED: [u8; 68] = {
    let mut t = [0u8; 68];
    let mut n = 0;
    let mut b = 0usize;
    while b < 256 {
        if !printable(b as u8) {
            t[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    t
};

/// The char that stands for byte `b` in byte-level BPE token texts.
pub(crate) fn byte_to_char(b: u8) -> char {
    BYTE_TO_CHAR[usize::from(b)]
}

/// The byte a byte-level char stands for, if it is one of the 256.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 0x100 {
        let b = cp as u8;
        return printable(b).then_some(b);
    }
    REMAPPED.get(usize::try_from(cp - 0x100).ok()?).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0xAD), 'Ń');
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte('€'), None);
    }

    #[test]
    fn categories() {
        assert_eq!(category('a'), Category::Letter);
        assert_eq!(category('7'), Category::Number);
        assert_eq!(category('²'), Category::Number);
        assert_eq!(category('٣'), Category::Number);
        assert_eq!(category('$'), Category::Symbol);
        assert_eq!(category('_'), Category::Punctuation);
        assert_eq!(category('\u{301}'), Category::Mark);
        assert_eq!(category('\u{200B}'), Category::Control);
        assert_eq!(category('\u{A0}'), Category::Separator);
        assert_eq!(category('😀'), Category::Symbol);
        assert_eq!(category('日'), Category::Letter);
        assert_eq!(category('\u{0378}'), Category::Unassigned);
        // Assigned in Unicode 15.1 (CJK Extension I), not in 15.0.
        assert_eq!(category('\u{2EBF0}'), Category::Letter);
        // Assigned only in Unicode 16.
        assert_eq!(category('\u{1CC00}'), Category::Unassigned);
        assert_eq!(category('\u{10FFFF}'), Category::Unassigned);
        assert!(is_whitespace('\u{3000}') && is_whitespace('\u{85}') && is_whitespace('\u{B}'));
        assert!(!is_whitespace('\u{200B}') && !is_whitespace('\u{1C}'));
    }
}
