//! Constrained decoding for `"response_format": "json_object"`: a recogniser
//! of JSON text (RFC 8259) that says whether a byte string can still be the
//! start of one JSON object. The sampler only ever picks tokens whose bytes
//! keep the output such a prefix, and generation ends when the object is
//! complete, so the output is a JSON object by construction (unless
//! `max_tokens` cuts it: `finish_reason` `length`).
//!
//! The state is `Copy` (the container stack is a bit set), so trying a token
//! costs no allocation: a step may try every token of the vocabulary.

/// Deepest nesting accepted (objects and arrays).
pub const MAX_DEPTH: u8 = 64;
/// Longest run of whitespace between two tokens of the JSON text: models
/// indent, but must not be able to loop on spaces forever.
pub const MAX_WHITESPACE_RUN: u8 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    /// After `-`.
    Minus,
    /// A leading `0`.
    Zero,
    /// Integer digits.
    Int,
    /// After `.`.
    Dot,
    /// Fraction digits.
    Frac,
    /// After `e`/`E`.
    Exp,
    /// After the exponent's sign.
    ExpSign,
    /// Exponent digits.
    ExpDigits,
}

impl Num {
    fn can_end(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    /// Plain string content.
    None,
    /// After `\`.
    Backslash,
    /// Hex digits of `\u` still to come.
    Hex(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the top-level object.
    Start,
    /// A value is expected (after `:`, `[` or `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or the container's end.
    CommaOrEnd,
    /// Inside a string (a key when `key`).
    Str { key: bool, esc: Esc },
    /// Inside a number.
    Number(Num),
    /// Inside `true`/`false`/`null`: which, and how many bytes are matched.
    Literal { which: u8, matched: u8 },
    /// The top-level object is complete.
    Done,
}

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// How far a byte string got as the start of one JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonPrefix {
    state: State,
    /// Bit i set: the container at depth i is an object (else an array).
    stack: u64,
    depth: u8,
    whitespace_run: u8,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        JsonPrefix {
            state: State::Start,
            stack: 0,
            depth: 0,
            whitespace_run: 0,
        }
    }
}

impl JsonPrefix {
    /// Whether the object is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// This prefix followed by `bytes`, if that can still start (or is) one
    /// JSON object.
    pub fn after(mut self, bytes: &[u8]) -> Option<Self> {
        for &b in bytes {
            self = self.step(b)?;
        }
        Some(self)
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && self.stack & (1 << (self.depth - 1)) != 0
    }

    fn push(mut self, object: bool) -> Option<Self> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        if object {
            self.stack |= 1 << self.depth;
        } else {
            self.stack &= !(1 << self.depth);
        }
        self.depth += 1;
        self.state = if object {
            State::KeyOrEnd
        } else {
            State::ValueOrEnd
        };
        Some(self)
    }

    /// Closes the innermost container with `b` (`}` or `]`), if it matches.
    fn close(mut self, b: u8) -> Option<Self> {
        if self.depth == 0 || (b == b'}') != self.in_object() {
            return None;
        }
        self.depth -= 1;
        self.state = self.after_value();
        Some(self)
    }

    fn after_value(&self) -> State {
        if self.depth == 0 {
            State::Done
        } else {
            State::CommaOrEnd
        }
    }

    /// The start of a value.
    fn value(mut self, b: u8) -> Option<Self> {
        self.state = match b {
            b'{' => return self.push(true),
            b'[' => return self.push(false),
            b'"' => State::Str {
                key: false,
                esc: Esc::None,
            },
            b'-' => State::Number(Num::Minus),
            b'0' => State::Number(Num::Zero),
            b'1'..=b'9' => State::Number(Num::Int),
            b't' => State::Literal {
                which: 0,
                matched: 1,
            },
            b'f' => State::Literal {
                which: 1,
                matched: 1,
            },
            b'n' => State::Literal {
                which: 2,
                matched: 1,
            },
            _ => return None,
        };
        Some(self)
    }

    fn step(mut self, b: u8) -> Option<Self> {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let between_tokens = matches!(
            self.state,
            State::Start
                | State::Value
                | State::ValueOrEnd
                | State::KeyOrEnd
                | State::Key
                | State::Colon
                | State::CommaOrEnd
                | State::Done
        );
        if between_tokens && ws {
            if self.whitespace_run >= MAX_WHITESPACE_RUN {
                return None;
            }
            self.whitespace_run += 1;
            return Some(self);
        }
        self.whitespace_run = 0;
        match self.state {
            State::Start => (b == b'{').then(|| self.push(true)).flatten(),
            State::Done => None,
            State::Value => self.value(b),
            State::ValueOrEnd => {
                if b == b']' {
                    self.close(b)
                } else {
                    self.value(b)
                }
            }
            State::KeyOrEnd | State::Key => match b {
                b'"' => {
                    self.state = State::Str {
                        key: true,
                        esc: Esc::None,
                    };
                    Some(self)
                }
                b'}' if self.state == State::KeyOrEnd => self.close(b),
                _ => None,
            },
            State::Colon => (b == b':').then(|| {
                self.state = State::Value;
                self
            }),
            State::CommaOrEnd => match b {
                b',' => {
                    self.state = if self.in_object() {
                        State::Key
                    } else {
                        State::Value
                    };
                    Some(self)
                }
                b'}' | b']' => self.close(b),
                _ => None,
            },
            State::Str { key, esc } => {
                let esc = match esc {
                    Esc::None => match b {
                        b'"' => {
                            self.state = if key {
                                State::Colon
                            } else {
                                self.after_value()
                            };
                            return Some(self);
                        }
                        b'\\' => Esc::Backslash,
                        0..=0x1f => return None,
                        _ => Esc::None,
                    },
                    Esc::Backslash => match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Esc::None,
                        b'u' => Esc::Hex(4),
                        _ => return None,
                    },
                    Esc::Hex(n) => {
                        if !b.is_ascii_hexdigit() {
                            return None;
                        }
                        if n == 1 { Esc::None } else { Esc::Hex(n - 1) }
                    }
                };
                self.state = State::Str { key, esc };
                Some(self)
            }
            State::Number(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Num::Zero,
                    (Num::Minus, b'1'..=b'9') => Num::Int,
                    (Num::Int, b'0'..=b'9') => Num::Int,
                    (Num::Zero | Num::Int, b'.') => Num::Dot,
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
                    (Num::Exp, b'+' | b'-') => Num::ExpSign,
                    (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
                    _ if n.can_end() => {
                        // The number ended: this byte follows a value.
                        self.state = State::CommaOrEnd;
                        return if ws {
                            self.whitespace_run = 1;
                            Some(self)
                        } else {
                            self.step(b)
                        };
                    }
                    _ => return None,
                };
                self.state = State::Number(next);
                Some(self)
            }
            State::Literal { which, matched } => {
                let lit = LITERALS[usize::from(which)];
                if lit.get(usize::from(matched)) != Some(&b) {
                    return None;
                }
                let matched = matched + 1;
                self.state = if usize::from(matched) == lit.len() {
                    self.after_value()
                } else {
                    State::Literal { which, matched }
                };
                Some(self)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Option<JsonPrefix> {
        JsonPrefix::default().after(text.as_bytes())
    }

    #[test]
    fn whole_objects_are_done_and_their_prefixes_are_not() {
        for text in [
            "{}",
            " {\"a\": 1}\n",
            r#"{"a":[1,-2.5e+3,0,true,false,null,{"b":"c\"\\\u00e9\n"}],"d":{}}"#,
            "{\"é\": \"ünï ✓\", \"n\": [ ]}",
        ] {
            let p = run(text).unwrap_or_else(|| panic!("refused {text:?}"));
            assert!(p.is_done(), "{text:?}");
            for cut in (1..text.len()).filter(|&i| text.is_char_boundary(i)) {
                let prefix = &text[..cut];
                let p = run(prefix).unwrap_or_else(|| panic!("refused prefix {prefix:?}"));
                let complete = prefix.trim_end() == text.trim_end();
                assert_eq!(p.is_done(), complete, "{prefix:?}");
            }
        }
    }

    #[test]
    fn what_json_does_not_allow_is_refused_at_the_first_wrong_byte() {
        for text in [
            "[1]",
            "\"a\"",
            "{a:1}",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "{\"a\":01}",
            "{\"a\":1.}x",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":\"x\ny\"}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12g4\"}",
            "{\"a\":[1}",
            "{\"a\":1]",
            "{} {}",
            "{}x",
        ] {
            assert!(run(text).is_none(), "accepted {text:?}");
        }
    }

    #[test]
    fn whitespace_runs_and_depth_are_bounded() {
        let spaces = " ".repeat(usize::from(MAX_WHITESPACE_RUN));
        assert!(run(&format!("{{{spaces}}}")).is_some());
        assert!(run(&format!("{{{spaces} }}")).is_none());
        let deep = format!("{{\"a\":{}", "[".repeat(usize::from(MAX_DEPTH) - 1));
        assert!(run(&deep).is_some());
        assert!(run(&format!("{deep}[")).is_none());
    }

    #[test]
    fn trying_a_token_leaves_the_state_unchanged() {
        let p = run("{\"a\":").unwrap();
        assert!(p.after(b"]").is_none());
        assert_eq!(p.after(b" 12").map(|q| q.is_done()), Some(false));
        assert_eq!(p, run("{\"a\":").unwrap());
    }
}
