//! What llama-chat writes back, and how generation stops.
//!
//! Two text formats share one generation loop:
//!
//! * `text` (the default, what `cinfer chat` prints): the completion as it is
//!   produced; a failure is one line `error: REASON`.
//! * `events-v1` (what `cinfer proxy` asks for): one JSON object per line, so
//!   that counts, the stop reason and failures reach the client as data
//!   rather than as text it would have to guess from:
//!
//!   ```text
//!   {"type":"text","text":"Paris"}
//!   {"type":"end","finish_reason":"stop","prompt_tokens":14,"completion_tokens":3}
//!   {"type":"error","code":"context_length_exceeded","message":"…"}
//!   ```
//!
//!   With `"logprobs": true` in the request, each token's text is preceded by
//!   `{"type":"logprobs","content":[{"token":"…","bytes":[…],"logprob":-0.1,
//!   "top_logprobs":[{"token","bytes","logprob"}, …]}]}` (OpenAI's shape; the
//!   model's log-softmax before penalties and sampling; `top_logprobs`
//!   alternatives). Only a client that asks for them gets these events.
//!
//!   `text` events carry whole UTF-8 pieces (never a split character). A run
//!   that completes ends with exactly one `end`; a run that fails emits one
//!   `error` (and no `end`) and ends as failed. `finish_reason` is `stop` (an
//!   end-of-generation token or a stop sequence) or `length` (`max_tokens`, or
//!   the model's context, reached). `completion_tokens` counts every sampled
//!   token, the end-of-generation one included. The format name carries the
//!   version: an incompatible change gets a new name, and a program that does
//!   not know a name refuses it (`unknown variant`).
//!
//! Every line travels inside the sealed reply frames, so the receipt covers
//! the counts and the error codes as it covers the text.

use cinfer_guest::{Error, ModelError, output};
use serde::Serialize;

/// Why a run failed, as the client can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The request is malformed or a parameter is out of range.
    InvalidRequest,
    /// The prompt does not fit the model's context.
    ContextLengthExceeded,
    /// The loader holds no such model, or the policy does not let this program open it.
    ModelNotFound,
    /// The model is not one this program runs (architecture, template, tokenizer).
    UnsupportedModel,
    /// Anything else (accelerator, corrupt model, ...): not the client's fault.
    Internal,
}

impl Code {
    /// The `code` of an `error` event.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidRequest => "invalid_request",
            Code::ContextLengthExceeded => "context_length_exceeded",
            Code::ModelNotFound => "model_not_found",
            Code::UnsupportedModel => "unsupported_model",
            Code::Internal => "internal",
        }
    }
}

/// A failed run: a code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure.
    pub code: Code,
    /// Says what was wrong.
    pub message: String,
}

impl Failure {
    /// A failure of kind `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// A malformed request.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidRequest, message)
    }

    /// A failure to open model `id`.
    pub fn opening_model(id: &str, e: ModelError) -> Self {
        match e {
            ModelError::NotFound | ModelError::NotPermitted => Self::new(
                Code::ModelNotFound,
                format!("model `{id}` is not available to this program ({e:?})"),
            ),
            other => Self::from(Error::Model(other)),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(Code::Internal, e.to_string())
    }
}

impl From<ModelError> for Failure {
    fn from(e: ModelError) -> Self {
        Failure::from(Error::Model(e))
    }
}

impl From<cinfer_guest::AccelError> for Failure {
    fn from(e: cinfer_guest::AccelError) -> Self {
        Failure::from(Error::Accel(e))
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End-of-generation token or stop sequence.
    Stop,
    /// `max_tokens` or the context reached.
    Length,
}

impl Finish {
    /// The OpenAI `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One `events-v1` line.
#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    /// Completion text.
    Text {
        /// A whole UTF-8 piece.
        text: &'a str,
    },
    /// The run completed.
    End {
        /// `stop` or `length`.
        finish_reason: &'static str,
        /// Tokens of the prompt (template included).
        prompt_tokens: u32,
        /// Tokens sampled.
        completion_tokens: u32,
    },
    /// The run failed.
    Error {
        /// A [`Code`] name.
        code: &'static str,
        /// Why.
        message: &'a str,
    },
    /// Log-probabilities of the next token(s), in OpenAI's shape.
    Logprobs {
        /// One entry per token.
        content: Vec<TokenLogprob>,
    },
}

/// One token's log-probability, in OpenAI's shape.
#[derive(Debug, Serialize, PartialEq)]
pub struct TokenLogprob {
    /// The token's text (invalid UTF-8 replaced; `bytes` is exact).
    pub token: String,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// Natural log of its probability.
    pub logprob: f32,
    /// The most likely tokens at this position (empty for alternatives themselves).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<TokenLogprob>>,
}

impl TokenLogprob {
    fn of(tok: &cinfer_tokenizer::Tokenizer, id: u32, logprob: f32) -> Self {
        let bytes = tok.token_bytes(id, false);
        TokenLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
            top_logprobs: None,
        }
    }
}

impl Event<'_> {
    /// The event as one line (JSON escapes newlines, so a line is an event).
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"event encoding"}"#.into()
        });
        s.push('\n');
        s
    }
}

/// Writes the reply in the requested format.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    /// `events-v1` rather than plain text.
    pub events: bool,
}

impl Reply {
    /// Completion text (nothing for an empty piece).
    pub fn text(&self, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.events {
            output::emit_str(&Event::Text { text }.line());
        } else {
            output::emit_str(text);
        }
    }

    /// The end of a completed run (`events-v1` only; plain text just ends).
    pub fn end(&self, finish: Finish, prompt_tokens: u32, completion_tokens: u32) {
        if self.events {
            output::emit_str(
                &Event::End {
                    finish_reason: finish.as_str(),
                    prompt_tokens,
                    completion_tokens,
                }
                .line(),
            );
        }
    }

    /// The log-probability of token `id` and the top alternatives (events only).
    pub fn logprobs(
        &self,
        tok: &cinfer_tokenizer::Tokenizer,
        id: u32,
        logprob: f32,
        top: &[(u32, f32)],
    ) {
        if !self.events {
            return;
        }
        let mut entry = TokenLogprob::of(tok, id, logprob);
        entry.top_logprobs = Some(
            top.iter()
                .map(|&(t, lp)| TokenLogprob::of(tok, t, lp))
                .collect(),
        );
        output::emit_str(
            &Event::Logprobs {
                content: vec![entry],
            }
            .line(),
        );
    }

    /// Reports a failure.
    pub fn error(&self, f: &Failure) {
        if self.events {
            output::emit_str(
                &Event::Error {
                    code: f.code.as_str(),
                    message: &f.message,
                }
                .line(),
            );
        } else {
            output::emit_str(&format!("error: {}\n", f.message));
        }
    }
}

/// Stop sequences: text that could still become one is held back, so a stop
/// sequence is never emitted, not even in part, and generation stops at the
/// token that completes it (done here, where the text is produced, so the
/// count of generated tokens and `finish_reason` are right and no token is
/// computed past it).
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text; returns the text that is safe to emit, and
    /// whether a stop sequence completed (then nothing after it is returned).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out: String = self.pending.drain(..cut).collect();
        (out, false)
    }

    /// What is still held back (generation ended without a stop sequence).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            n <= text.len()
                && stop.is_char_boundary(n)
                && text.is_char_boundary(text.len() - n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| (*s).to_owned()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let (text, stopped) = m.push(p);
            out.push(text);
            if stopped {
                return (out, true, String::new());
            }
        }
        (out, false, m.finish())
    }

    #[test]
    fn a_stop_sequence_split_over_pieces_is_never_emitted() {
        let (out, stopped, rest) = run(&["\n\n"], &["Paris", ".\n", "\nNext"]);
        assert_eq!(out, ["Paris", ".", ""]);
        assert!(stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn held_back_text_that_does_not_become_a_stop_is_emitted() {
        let (out, stopped, rest) = run(&["END"], &["a E", "Nd", " EN"]);
        assert_eq!(out, ["a ", "ENd", " "]);
        assert!(!stopped);
        assert_eq!(rest, "EN", "held back at the end, given by finish");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_cut_on_characters() {
        let (out, stopped, _) = run(&["b", "é!"], &["xé", "é!ab"]);
        assert_eq!(out, ["x", "é"]);
        assert!(stopped);
        let (out, stopped, _) = run(&["ab", "b"], &["cab"]);
        assert_eq!(out, ["c"]);
        assert!(stopped);
        // No stops: everything passes at once.
        let (out, stopped, rest) = run(&[""], &["a", "b"]);
        assert_eq!(
            (out, stopped, rest),
            (vec!["a".into(), "b".into()], false, String::new())
        );
    }

    #[test]
    fn events_are_one_json_line_each() {
        assert_eq!(
            Event::Text { text: "a\"\nb" }.line(),
            "{\"type\":\"text\",\"text\":\"a\\\"\\nb\"}\n"
        );
        assert_eq!(
            Event::End {
                finish_reason: Finish::Length.as_str(),
                prompt_tokens: 5,
                completion_tokens: 2
            }
            .line(),
            "{\"type\":\"end\",\"finish_reason\":\"length\",\"prompt_tokens\":5,\"completion_tokens\":2}\n"
        );
        assert_eq!(
            Event::Error {
                code: Code::ContextLengthExceeded.as_str(),
                message: "too long"
            }
            .line(),
            "{\"type\":\"error\",\"code\":\"context_length_exceeded\",\"message\":\"too long\"}\n"
        );
    }
}
