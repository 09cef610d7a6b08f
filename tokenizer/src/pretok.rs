//! Pre-tokenization: splitting text into the words that BPE then runs on, exactly as llama.cpp
//! does for the pre-tokenizer types supported here.
//!
//! llama.cpp runs a list of regexes one after the other; each one splits every piece the previous
//! ones produced (a piece boundary is an end of text for the next regex: nothing matches across
//! it). A regex splits a piece into its matches and the stretches between them. The two big
//! regexes (GPT-2's and Llama 3's) have hand-written matchers there; the small ones (`\p{N}`,
//! `[0-9][0-9][0-9]`, punctuation runs) run through `std::regex` on a text where each non-ASCII
//! code point is replaced by a stand-in byte for its category. Both are reproduced here by hand.

use crate::unicode::{Category, Flags};

/// Which pre-tokenizer (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`) a vocabulary uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreTokenizer {
    /// `LLAMA_VOCAB_PRE_TYPE_DEFAULT` (`tokenizer.ggml.pre` = `default` or missing): punctuation
    /// runs, then the GPT-2 regex, then `\p{N}+`, then `[0-9][0-9][0-9]`.
    Default,
    /// The plain GPT-2 regex (`gpt-2`, `phi-2`, `roberta-bpe`, `gigachat`, `jina-es`, `jina-de`,
    /// `jina-v1-en`, `jina-v2-*`, `mpt`, `olmo`, `jais`).
    Gpt2,
    /// Every `\p{N}` on its own, then the GPT-2 regex (`smollm`, `starcoder`, `refact`,
    /// `command-r`, `codeshell`, `exaone`, `minerva-7b`).
    DigitsThenGpt2,
    /// Punctuation runs (with backtick), the GPT-2 regex, `[0-9][0-9][0-9]` (`falcon`).
    Falcon,
    /// The Llama 3 regex, numbers in groups of up to three (`llama3`, `llama-v3`, `llama-bpe`,
    /// `falcon3`, `dbrx`, `smaug-bpe`, `chatglm-bpe`).
    Llama3,
    /// The Llama 3 regex with single-digit numbers (`qwen2`, `deepseek-r1-qwen`, `stablelm2`,
    /// `megrez`).
    Qwen2,
}

/// One splitting pass.
#[derive(Clone, Copy, Debug)]
enum Pass {
    /// `[\p{P}…]+`: maximal runs of punctuation, or of one of these ASCII symbols.
    PunctRuns(&'static str),
    /// `\p{N}`: each number on its own.
    EachNumber,
    /// `\p{N}+`.
    NumberRuns,
    /// `[0-9][0-9][0-9]`.
    AsciiDigitTriples,
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,k}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    Llama3 { max_digits: usize },
}

impl PreTokenizer {
    /// The `tokenizer.ggml.pre` names llama.cpp maps to each type.
    pub(crate) fn from_name(name: Option<&str>) -> Option<Self> {
        use PreTokenizer::*;
        Some(match name {
            None | Some("default") => Default,
            Some(n) => match n {
                "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v1-en"
                | "jina-v2-es" | "jina-v2-de" | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo"
                | "jais" => Gpt2,
                "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
                | "minerva-7b" => DigitsThenGpt2,
                "falcon" => Falcon,
                "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe"
                | "chatglm-bpe" => Llama3,
                "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => Qwen2,
                _ => return None,
            },
        })
    }

    fn passes(self) -> &'static [Pass] {
        use Pass::*;
        match self {
            PreTokenizer::Default => &[PunctRuns("$+<=>^~|"), Gpt2, NumberRuns, AsciiDigitTriples],
            PreTokenizer::Gpt2 => &[Gpt2],
            PreTokenizer::DigitsThenGpt2 => &[EachNumber, Gpt2],
            PreTokenizer::Falcon => &[PunctRuns("$+<=>^~|`"), Gpt2, AsciiDigitTriples],
            PreTokenizer::Llama3 => &[Llama3 { max_digits: 3 }],
            PreTokenizer::Qwen2 => &[Llama3 { max_digits: 1 }],
        }
    }

    /// Splits `text` into words (non-empty, in order, covering all of `text`).
    pub(crate) fn split(self, text: &str) -> Vec<&str> {
        let mut offsets = Vec::with_capacity(text.len() + 1);
        let mut chars = Vec::with_capacity(text.len());
        for (i, c) in text.char_indices() {
            offsets.push(i);
            chars.push(c);
        }
        offsets.push(text.len());
        let flags: Vec<Flags> = chars.iter().map(|&c| Flags::of(c)).collect();
        let t = Text {
            chars: &chars,
            flags: &flags,
        };

        let mut pieces = if chars.is_empty() {
            Vec::new()
        } else {
            vec![(0, chars.len())]
        };
        for pass in self.passes() {
            let mut out = Vec::with_capacity(pieces.len() * 2);
            for &(start, end) in &pieces {
                let mut sink = Sink {
                    out: &mut out,
                    prev: start,
                };
                t.run(*pass, start, end, &mut sink);
                sink.cut(end);
            }
            pieces = out;
        }
        pieces
            .into_iter()
            .filter_map(|(s, e)| text.get(offsets[s]..offsets[e]))
            .collect()
    }
}

/// Collects piece boundaries (char indices) for one input piece.
struct Sink<'a> {
    out: &'a mut Vec<(usize, usize)>,
    prev: usize,
}

impl Sink<'_> {
    /// Ends the current piece at `end` (nothing if it would be empty).
    fn cut(&mut self, end: usize) {
        if end > self.prev {
            self.out.push((self.prev, end));
            self.prev = end;
        }
    }
}

struct Text<'a> {
    chars: &'a [char],
    flags: &'a [Flags],
}

impl Text<'_> {
    fn run(&self, pass: Pass, start: usize, end: usize, sink: &mut Sink<'_>) {
        match pass {
            Pass::PunctRuns(extra) => self.runs(start, end, sink, |c, f| {
                f.cat == Category::Punctuation || (c.is_ascii() && extra.contains(c))
            }),
            Pass::NumberRuns => self.runs(start, end, sink, |_, f| f.number()),
            Pass::EachNumber => {
                for i in start..end {
                    if self.flags[i].number() {
                        sink.cut(i);
                        sink.cut(i + 1);
                    }
                }
            }
            Pass::AsciiDigitTriples => {
                let mut i = start;
                while i + 3 <= end {
                    if self.chars[i..i + 3].iter().all(char::is_ascii_digit) {
                        sink.cut(i);
                        sink.cut(i + 3);
                        i += 3;
                    } else {
                        i += 1;
                    }
                }
            }
            Pass::Gpt2 => self.gpt2(start, end, sink),
            Pass::Llama3 { max_digits } => self.llama3(start, end, max_digits, sink),
        }
    }

    /// `[class]+`: each maximal run is a piece, and so is each stretch between runs.
    fn runs(
        &self,
        start: usize,
        end: usize,
        sink: &mut Sink<'_>,
        class: impl Fn(char, Flags) -> bool,
    ) {
        let mut i = start;
        while i < end {
            if class(self.chars[i], self.flags[i]) {
                sink.cut(i);
                while i < end && class(self.chars[i], self.flags[i]) {
                    i += 1;
                }
                sink.cut(i);
            } else {
                i += 1;
            }
        }
    }

    /// GPT-2's regex over `chars[start..end]`, which is all the text the regex sees.
    fn gpt2(&self, start: usize, end: usize, sink: &mut Sink<'_>) {
        let at = |p: usize| (p < end).then(|| self.flags[p]);
        let mut pos = start;
        while pos < end {
            let c = self.chars[pos];
            // 's 't 're 've 'm 'll 'd (lowercase only)
            if c == '\'' && pos + 1 < end {
                let c1 = self.chars[pos + 1];
                if matches!(c1, 's' | 't' | 'm' | 'd') {
                    pos += 2;
                    sink.cut(pos);
                    continue;
                }
                if pos + 2 < end
                    && matches!(
                        (c1, self.chars[pos + 2]),
                        ('r', 'e') | ('v', 'e') | ('l', 'l')
                    )
                {
                    pos += 3;
                    sink.cut(pos);
                    continue;
                }
            }
            // An optional leading space, then letters, numbers or "others".
            let space = usize::from(c == ' ');
            if let Some(f) = at(pos + space) {
                let same: Option<fn(Flags) -> bool> = if f.letter() {
                    Some(Flags::letter)
                } else if f.number() {
                    Some(Flags::number)
                } else if f.other() {
                    Some(Flags::other)
                } else {
                    None
                };
                if let Some(same) = same {
                    pos += space;
                    while at(pos).is_some_and(same) {
                        pos += 1;
                    }
                    sink.cut(pos);
                    continue;
                }
            }
            // \s+(?!\S) | \s+
            let mut n = 0;
            while at(pos + n).is_some_and(|f| f.ws) {
                n += 1;
            }
            if n > 1 && pos + n < end {
                // Leave the last whitespace to lead the next word.
                pos += n - 1;
            } else {
                pos += n.max(1);
            }
            sink.cut(pos);
        }
    }

    /// Llama 3's regex over `chars[start..end]`, numbers split in groups of `max_digits`.
    fn llama3(&self, start: usize, end: usize, max_digits: usize, sink: &mut Sink<'_>) {
        let at = |p: usize| (p < end).then(|| self.flags[p]);
        let cr_lf = |c: char| c == '\r' || c == '\n';
        let mut pos = start;
        while pos < end {
            let c = self.chars[pos];
            let f = self.flags[pos];
            // (?i:'s|'t|'re|'ve|'m|'ll|'d): no non-ASCII code point lowercases to these letters.
            if c == '\'' && pos + 1 < end {
                let c1 = self.chars[pos + 1].to_ascii_lowercase();
                if matches!(c1, 's' | 't' | 'm' | 'd') {
                    pos += 2;
                    sink.cut(pos);
                    continue;
                }
                if pos + 2 < end {
                    let c2 = self.chars[pos + 2].to_ascii_lowercase();
                    if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                        pos += 3;
                        sink.cut(pos);
                        continue;
                    }
                }
            }
            // [^\r\n\p{L}\p{N}]?\p{L}+
            if !(cr_lf(c) || f.number()) && (f.letter() || at(pos + 1).is_some_and(Flags::letter)) {
                pos += 1;
                while at(pos).is_some_and(Flags::letter) {
                    pos += 1;
                }
                sink.cut(pos);
                continue;
            }
            // \p{N}{1,k}
            if f.number() {
                let mut n = 0;
                while at(pos).is_some_and(Flags::number) {
                    pos += 1;
                    n += 1;
                    if n == max_digits {
                        sink.cut(pos);
                        n = 0;
                    }
                }
                sink.cut(pos);
                continue;
            }
            // ' ?[^\s\p{L}\p{N}]+[\r\n]*' (a space at the very end also ends up here, alone)
            let space = usize::from(c == ' ');
            if at(pos + space).is_none_or(Flags::other) {
                pos += space;
                while at(pos).is_some_and(Flags::other) {
                    pos += 1;
                }
                while pos < end && cr_lf(self.chars[pos]) {
                    pos += 1;
                }
                sink.cut(pos);
                continue;
            }
            // \s*[\r\n]+ | \s+(?!\S) | \s+
            let mut n = 0;
            let mut after_last_cr_lf = None;
            while at(pos + n).is_some_and(|f| f.ws) {
                if cr_lf(self.chars[pos + n]) {
                    after_last_cr_lf = Some(pos + n + 1);
                }
                n += 1;
            }
            if let Some(p) = after_last_cr_lf {
                pos = p;
            } else if n > 1 && pos + n < end {
                pos += n - 1;
            } else {
                pos += n.max(1);
            }
            sink.cut(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PreTokenizer::{self, *};

    fn split(p: PreTokenizer, s: &str) -> Vec<&str> {
        let words = p.split(s);
        assert_eq!(words.concat(), s);
        words
    }

    #[test]
    fn gpt2_regex() {
        assert_eq!(
            split(Gpt2, "Hello world's  end\n\n  x 123 ab12!!"),
            [
                "Hello", " world", "'s", " ", " end", "\n\n ", " x", " 123", " ab", "12", "!!"
            ]
        );
        // Contractions are case-sensitive: 'S is "other" then a letter.
        assert_eq!(split(Gpt2, "IT'S it's"), ["IT", "'", "S", " it", "'s"]);
        assert_eq!(split(Gpt2, "we'll they're"), ["we", "'ll", " they", "'re"]);
        // Trailing whitespace run stays whole; a lone one before a word stays alone.
        assert_eq!(split(Gpt2, "a   "), ["a", "   "]);
        assert_eq!(split(Gpt2, "a\tb"), ["a", "\t", "b"]);
        assert_eq!(split(Gpt2, "a \u{a0}b"), ["a", " ", "\u{a0}", "b"]);
        // Zero-width space is a format character: "other".
        assert_eq!(split(Gpt2, "a\u{200b}b"), ["a", "\u{200b}", "b"]);
        assert_eq!(split(Gpt2, " 😀!"), [" 😀!"]);
        assert_eq!(split(Gpt2, "\r\n"), ["\r\n"]);
        assert!(split(Gpt2, "").is_empty());
    }

    #[test]
    fn digits_split_first() {
        assert_eq!(
            split(DigitsThenGpt2, "and 1,000 x²   7"),
            ["and", " ", "1", ",", "0", "0", "0", " x", "²", "   ", "7"]
        );
        assert_eq!(split(DigitsThenGpt2, "a1b"), ["a", "1", "b"]);
    }

    #[test]
    fn default_passes() {
        assert_eq!(
            split(Default, "x=1234567 (ok)"),
            ["x", "=", "123", "456", "7", " ", "(", "ok", ")"]
        );
    }

    #[test]
    fn llama3_regex() {
        assert_eq!(
            split(Llama3, "I'M 12345 don't\r\n\n  x  !!\n"),
            [
                "I", "'M", " ", "123", "45", " don", "'t", "\r\n\n", " ", " x", " ", " !!\n"
            ]
        );
        assert_eq!(split(Llama3, "(hello"), ["(hello"]);
        assert_eq!(split(Llama3, "a "), ["a", " "]);
        assert_eq!(split(Qwen2, "x 123"), ["x", " ", "1", "2", "3"]);
    }

    #[test]
    fn names() {
        assert_eq!(
            PreTokenizer::from_name(Some("smollm")),
            Some(DigitsThenGpt2)
        );
        assert_eq!(PreTokenizer::from_name(None), Some(Default));
        assert_eq!(PreTokenizer::from_name(Some("deepseek-llm")), None);
    }
}
