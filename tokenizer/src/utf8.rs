//! Turning a stream of token bytes into text without splitting a character.

/// Incremental UTF-8 decoding for emitting text token by token.
///
/// A byte-level BPE token may end in the middle of a character (an emoji is often three tokens).
/// [`push`](Utf8Stream::push) returns only complete text and holds back an incomplete sequence at
/// the end until the bytes that complete it arrive; bytes that can never be valid UTF-8 become
/// U+FFFD at once (one per maximal invalid sequence, as [`String::from_utf8_lossy`] does).
/// [`finish`](Utf8Stream::finish) returns what is held back, an incomplete sequence as U+FFFD.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes`; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = after.get(n..).unwrap_or_default();
                        }
                        // An incomplete sequence at the end: keep it for the next push.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        self.pending.drain(..self.pending.len() - keep);
        out
    }

    /// Whether bytes are held back waiting for the rest of a character.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: what is held back, an incomplete sequence replaced by U+FFFD.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_an_emoji_across_pushes() {
        let bytes = "a😀b".as_bytes();
        let mut s = Utf8Stream::new();
        assert_eq!(s.push(&bytes[..2]), "a");
        assert!(s.has_pending());
        assert_eq!(s.push(&bytes[2..3]), "");
        assert_eq!(s.push(&bytes[3..4]), "");
        assert_eq!(s.push(&bytes[4..]), "😀b");
        assert!(!s.has_pending());
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let text = "héllo 日本語 🇫🇷 👍🏽 ok";
        let mut s = Utf8Stream::new();
        let mut out = String::new();
        for b in text.as_bytes() {
            out += &s.push(std::slice::from_ref(b));
        }
        out += &s.finish();
        assert_eq!(out, text);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut s = Utf8Stream::new();
        assert_eq!(s.push(b"a\xffb"), "a\u{FFFD}b");
        // A lead byte followed by a non-continuation: invalid at once.
        assert_eq!(s.push(b"\xe2x"), "\u{FFFD}x");
        // Incomplete at the end: held back, then replaced by finish().
        assert_eq!(s.push(b"c\xf0\x9f"), "c");
        assert_eq!(s.finish(), "\u{FFFD}");
    }
}
