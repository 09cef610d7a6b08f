//! The OpenAI API as `cinfer proxy` speaks it: typed requests (every field
//! known, each either used, ignored on purpose, or refused with the reason),
//! parameter ranges, the mapping to llama-chat's request, llama-chat's
//! `events-v1` reply lines, and OpenAI-style errors. No I/O here.

use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The llama-chat reply format the proxy asks for (see `programs/llama-chat/src/reply.rs`).
pub const EVENTS_FORMAT: &str = "events-v1";

/// Largest number of stop sequences (OpenAI's limit).
const MAX_STOPS: usize = 4;

/// An error as OpenAI returns it, with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// OpenAI `type` (`invalid_request_error`, ...).
    pub kind: &'static str,
    /// Says what was wrong.
    pub message: String,
    /// The request parameter at fault.
    pub param: Option<&'static str>,
    /// A machine-readable code (`context_length_exceeded`, `model_not_found`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: Some("invalid_value"),
        }
    }

    /// A 400 about the request as a whole.
    pub fn malformed(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// An error of any status.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// `{"error": {message, type, param, code}}`.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    // Known but not supported: refused when set (an assistant message as the
    // SDKs return it carries some of them as null or empty).
    #[serde(default)]
    name: Option<Value>,
    #[serde(default)]
    refusal: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Value>,
    #[serde(default)]
    tool_call_id: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
    #[serde(default)]
    annotations: Option<Value>,
}

impl InMessage {
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        let known: [(&'static str, &Option<Value>); 7] = [
            ("name", &self.name),
            ("refusal", &self.refusal),
            ("tool_calls", &self.tool_calls),
            ("tool_call_id", &self.tool_call_id),
            ("function_call", &self.function_call),
            ("audio", &self.audio),
            ("annotations", &self.annotations),
        ];
        match first_set(&known) {
            Some(name) => Err(ApiError {
                code: Some("unsupported_parameter"),
                ..ApiError::invalid(
                    "messages",
                    format!("a message's `{name}` is not supported by this server"),
                )
            }),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Every parameter of both endpoints besides `messages`/`prompt`. Unknown
/// fields are refused (serde names them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    /// Not OpenAI's; llama-server's and vLLM's.
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    /// An end-user id for abuse monitoring: accepted, not used.
    #[serde(default, rename = "user")]
    _user: Option<String>,
    /// Meaningless without `tools` (which are refused): accepted, not used.
    #[serde(default, rename = "parallel_tool_calls")]
    _parallel_tool_calls: Option<bool>,
    // Known but not supported: refused when set to anything but their default.
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    logit_bias: Option<Value>,
    #[serde(default)]
    echo: Option<Value>,
    #[serde(default)]
    best_of: Option<Value>,
    #[serde(default)]
    suffix: Option<Value>,
}

/// A checked request, ready to seal.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// llama-chat's request.
    pub llama: Value,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// The model asked for, if any.
    pub model: Option<String>,
    /// `logprobs: true` (chat completions).
    pub logprobs: bool,
    /// Choices (`n`): one exchange each.
    pub n: usize,
}

impl Parsed {
    /// llama-chat's request for choice `index`: choice `i` samples with seed
    /// `seed + i` (so `n` choices differ unless greedy, and a given seed
    /// reproduces all of them).
    pub fn request_for_choice(&self, index: usize) -> Vec<u8> {
        let mut llama = self.llama.clone();
        if index > 0
            && let Some(seed) = llama.get("seed").and_then(Value::as_u64)
        {
            llama["seed"] = seed.wrapping_add(index as u64).into();
        }
        llama.to_string().into_bytes()
    }
}

/// Most choices per request: each is its own exchange, run at once (the
/// loader's default `max-in-flight`).
pub const MAX_N: i64 = 8;

/// `response_format.json_schema` (OpenAI's fields; unknown ones refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSchemaFormat {
    name: String,
    #[serde(default, rename = "description")]
    _description: Option<String>,
    #[serde(default)]
    schema: Option<Value>,
    /// Every schema the program accepts is enforced strictly; a schema it
    /// cannot enforce is refused, whatever `strict` says.
    #[serde(default, rename = "strict")]
    _strict: Option<bool>,
}

/// The schema's own JSON text in the request body: llama-chat writes
/// properties in the schema's order, which a parsed `Value` (a sorted map
/// here) would lose.
fn raw_schema(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow, default)]
        response_format: Option<Format<'a>>,
    }
    #[derive(Deserialize)]
    struct Format<'a> {
        #[serde(borrow, default)]
        json_schema: Option<Schema<'a>>,
    }
    #[derive(Deserialize)]
    struct Schema<'a> {
        #[serde(borrow, default)]
        schema: Option<&'a serde_json::value::RawValue>,
    }
    let body: Body<'_> = serde_json::from_slice(body).ok()?;
    Some(body.response_format?.json_schema?.schema?.get().to_owned())
}

/// `response_format`: `text` (the default: nothing to ask), `json_object`
/// (the program samples only tokens that keep the output one JSON object), or
/// `json_schema` (only tokens that keep it a value the schema admits; the
/// program checks the schema and refuses what it cannot enforce). Returns
/// llama-chat's `response_format` and, for `json_schema`, the schema's text.
fn response_format(
    v: Option<&Value>,
    body: &[u8],
) -> Result<Option<(&'static str, Option<String>)>, ApiError> {
    let kind = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o.get("type").and_then(Value::as_str),
        Some(_) => None,
    };
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(("json_object", None))),
        Some("json_schema") => {
            let spec = v
                .and_then(|v| v.get("json_schema"))
                .cloned()
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format",
                        "response_format json_schema needs `json_schema` ({\"name\": ..., \"schema\": ...})",
                    )
                })?;
            let spec: JsonSchemaFormat = serde_json::from_value(spec).map_err(|e| {
                ApiError::invalid(
                    "response_format",
                    format!("response_format.json_schema: {e}"),
                )
            })?;
            let name_ok = (1..=64).contains(&spec.name.len())
                && spec
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return Err(ApiError::invalid(
                    "response_format",
                    "response_format.json_schema.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -",
                ));
            }
            match spec.schema {
                // No schema: any JSON object, as json_object.
                None => Ok(Some(("json_object", None))),
                Some(schema) => Ok(Some((
                    "json_schema",
                    Some(raw_schema(body).unwrap_or_else(|| schema.to_string())),
                ))),
            }
        }
        _ => Err(ApiError::invalid(
            "response_format",
            "response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": {...}}",
        )),
    }
}

/// Most alternatives per token (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;

/// Chat's `logprobs` (a boolean) and `top_logprobs` (0..=20, needs `logprobs`).
/// The completions endpoint's `logprobs` is a count with another reply shape:
/// not supported there.
fn logprobs(endpoint: Endpoint, p: &Params) -> Result<(bool, i64), ApiError> {
    if endpoint == Endpoint::Completions {
        for (name, v) in [("logprobs", &p.logprobs), ("top_logprobs", &p.top_logprobs)] {
            if v.as_ref().is_some_and(|v| is_set(name, v)) {
                return Err(ApiError {
                    code: Some("unsupported_parameter"),
                    ..ApiError::invalid(
                        name,
                        format!(
                            "`{name}` is not supported on /v1/completions (use /v1/chat/completions)"
                        ),
                    )
                });
            }
        }
        return Ok((false, 0));
    }
    let on = match &p.logprobs {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be a boolean, not {other}"),
            ));
        }
    };
    let top = match &p.top_logprobs {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_i64() {
            Some(n) if (0..=MAX_TOP_LOGPROBS).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs = {v}: must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
                ));
            }
        },
    };
    if top > 0 && !on {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ));
    }
    Ok((on, top))
}

/// Whether an unsupported parameter was set to something other than "off".
/// The first of `fields` (name, value) that is present and [`is_set`].
fn first_set(fields: &[(&'static str, &Option<Value>)]) -> Option<&'static str> {
    fields
        .iter()
        .find(|(name, v)| v.as_ref().is_some_and(|v| is_set(name, v)))
        .map(|(name, _)| *name)
}

fn is_set(name: &str, v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Number(n) if name == "best_of" => n.as_i64() != Some(1),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => {
            // `{"type": "text"}` is the default response format.
            !(o.is_empty()
                || (name == "response_format"
                    && o.len() == 1
                    && o.get("type") == Some(&json!("text"))))
        }
        Value::String(s) => !(s.is_empty() || (name == "tool_choice" && s == "none")),
        Value::Bool(true) => true,
    }
}

/// Reads and checks a request body for `endpoint`; `seed` is used when the
/// request names none (the caller draws it at random, as OpenAI's sampling
/// is not reproducible unless asked).
pub fn parse(body: &[u8], endpoint: Endpoint, seed: u64) -> Result<Parsed, ApiError> {
    let mut map: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed(format!("the request body is not a JSON object: {e}")))?;
    let mut llama = Map::new();
    match endpoint {
        Endpoint::Chat => {
            let messages = map
                .remove("messages")
                .ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?;
            let messages: Vec<InMessage> = serde_json::from_value(messages)
                .map_err(|e| ApiError::invalid("messages", format!("messages: {e}")))?;
            llama.insert("messages".into(), chat_messages(&messages)?);
            // As `cinfer chat`: only the system turns the client sends.
            llama.insert("default_system".into(), false.into());
        }
        Endpoint::Completions => {
            let prompt = map
                .remove("prompt")
                .ok_or_else(|| ApiError::invalid("prompt", "`prompt` is required"))?;
            let prompt = match serde_json::from_value::<OneOrMany>(prompt) {
                Ok(OneOrMany::One(p)) => p,
                Ok(OneOrMany::Many(mut ps)) if ps.len() == 1 => ps.remove(0),
                _ => {
                    return Err(ApiError::invalid(
                        "prompt",
                        "prompt must be a string (or a list of exactly one string; token arrays are not supported)",
                    ));
                }
            };
            if prompt.is_empty() {
                return Err(ApiError::invalid("prompt", "prompt must not be empty"));
            }
            llama.insert("prompt".into(), prompt.into());
        }
    }
    let params: Params = serde_json::from_value(Value::Object(map))
        .map_err(|e| ApiError::malformed(format!("invalid request: {e}")))?;
    refuse_unsupported(&params)?;
    let (want_logprobs, top_logprobs) = logprobs(endpoint, &params)?;
    if let Some((format, schema)) = response_format(params.response_format.as_ref(), body)? {
        llama.insert("response_format".into(), format.into());
        if let Some(schema) = schema {
            llama.insert("json_schema".into(), schema.into());
        }
    }
    let stream = params.stream.unwrap_or(false);
    let include_usage = match &params.stream_options {
        Some(_) if !stream => {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        Some(o) => o.include_usage.unwrap_or(false),
        None => false,
    };
    let n = params.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n = {n}: must be in [1, {MAX_N}]"),
        ));
    }
    llama.insert("format".into(), EVENTS_FORMAT.into());
    let model = params.model.clone().filter(|m| !m.is_empty());
    if let Some(m) = &model {
        llama.insert("model".into(), m.clone().into());
    }
    let max_tokens = match (params.max_completion_tokens, params.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    if let Some((name, n)) = max_tokens {
        if !(1..=i64::from(u32::MAX)).contains(&n) {
            return Err(ApiError::invalid(
                name,
                format!("{name} = {n}: must be at least 1"),
            ));
        }
        llama.insert("max_tokens".into(), n.into());
    }
    if let Some(t) = params.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature = {t}: must be in [0, 2]"),
            ));
        }
        llama.insert("temperature".into(), t.into());
    }
    if let Some(p) = params.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p = {p}: must be in (0, 1]"),
            ));
        }
        llama.insert("top_p".into(), p.into());
    }
    if let Some(k) = params.top_k {
        if !(0..=i64::from(u32::MAX)).contains(&k) {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k = {k}: must be >= 0 (0: the whole vocabulary)"),
            ));
        }
        llama.insert("top_k".into(), k.into());
    }
    for (name, v) in [
        ("presence_penalty", params.presence_penalty),
        ("frequency_penalty", params.frequency_penalty),
    ] {
        if let Some(v) = v {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} = {v}: must be in [-2, 2]"),
                ));
            }
            if v != 0.0 {
                llama.insert(name.into(), v.into());
            }
        }
    }
    let stops = match params.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stops.len() > MAX_STOPS || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            format!("stop takes at most {MAX_STOPS} non-empty strings"),
        ));
    }
    if !stops.is_empty() {
        llama.insert("stop".into(), stops.into());
    }
    // OpenAI's seed is a signed integer; the program's generator takes its bits.
    let seed = params.seed.map_or(seed, |s| s as u64);
    llama.insert("seed".into(), seed.into());
    if want_logprobs {
        llama.insert("logprobs".into(), true.into());
        if top_logprobs > 0 {
            llama.insert("top_logprobs".into(), top_logprobs.into());
        }
    }
    Ok(Parsed {
        llama: Value::Object(llama),
        stream,
        include_usage,
        model,
        logprobs: want_logprobs,
        n: n as usize,
    })
}

fn refuse_unsupported(p: &Params) -> Result<(), ApiError> {
    let known: [(&'static str, &Option<Value>); 8] = [
        ("tools", &p.tools),
        ("tool_choice", &p.tool_choice),
        ("functions", &p.functions),
        ("function_call", &p.function_call),
        ("logit_bias", &p.logit_bias),
        ("echo", &p.echo),
        ("best_of", &p.best_of),
        ("suffix", &p.suffix),
    ];
    match first_set(&known) {
        Some(name) => Err(ApiError {
            code: Some("unsupported_parameter"),
            ..ApiError::invalid(
                name,
                format!(
                    "`{name}` is not supported by this server (see the parameter table in cinfer's README)"
                ),
            )
        }),
        None => Ok(()),
    }
}

fn chat_messages(messages: &[InMessage]) -> Result<Value, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut out = Vec::new();
    for m in messages {
        m.refuse_unsupported()?;
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant") => r,
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("unsupported message role {other:?}"),
                ));
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            "messages",
                            format!("unsupported content part type {:?}", p.kind),
                        ));
                    }
                    text.push_str(p.text.as_deref().unwrap_or(""));
                }
                text
            }
        };
        out.push(json!({"role": role, "content": content}));
    }
    Ok(Value::Array(out))
}

/// One `events-v1` line of llama-chat's reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProgramEvent {
    /// Completion text.
    Text {
        /// Whole UTF-8.
        text: String,
    },
    /// The run completed.
    End(Usage),
    /// The run failed.
    Error {
        /// llama-chat's code.
        code: String,
        /// Why.
        message: String,
    },
    /// Log-probabilities of the next token(s), already in OpenAI's shape
    /// (`{token, bytes, logprob, top_logprobs}`).
    Logprobs {
        /// One entry per token.
        content: Vec<Value>,
    },
}

/// How a completed run ended.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Usage {
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Sampled tokens.
    pub completion_tokens: u64,
}

/// OpenAI's `usage` over the choices of one request: the prompt once, the
/// completions summed.
pub fn total_usage(usages: &[&Usage]) -> Value {
    let prompt = usages.first().map_or(0, |u| u.prompt_tokens);
    let completion: u64 = usages.iter().map(|u| u.completion_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// Splits the reply's bytes into events (a line may span frames).
#[derive(Debug, Default)]
pub struct EventLines {
    buf: Vec<u8>,
}

impl EventLines {
    /// Adds reply bytes; returns the events completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<ProgramEvent>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = &line[..line.len() - 1];
            if line.is_empty() {
                continue;
            }
            let event = serde_json::from_slice(line).map_err(|e| {
                format!(
                    "the program's reply is not {EVENTS_FORMAT} ({e}); is the server running an older llama-chat?"
                )
            })?;
            out.push(event);
        }
        Ok(out)
    }

    /// Whether bytes of an unfinished line are left.
    pub fn has_partial_line(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// The OpenAI error for a failure llama-chat reported.
pub fn program_error(code: &str, message: &str) -> ApiError {
    let (status, kind, param, code) = match code {
        "invalid_request" if message.starts_with("response_format") => {
            (400, "invalid_request_error", Some("response_format"), None)
        }
        "invalid_request" => (400, "invalid_request_error", None, None),
        "context_length_exceeded" => (
            400,
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        "model_not_found" => (
            404,
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
        ),
        "unsupported_model" => (
            400,
            "invalid_request_error",
            Some("model"),
            Some("unsupported_model"),
        ),
        _ => (500, "cinfer_program_error", None, None),
    };
    ApiError {
        status,
        kind,
        message: message.to_owned(),
        param,
        code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<Parsed, ApiError> {
        parse(v.to_string().as_bytes(), Endpoint::Chat, 42)
    }

    fn msgs() -> Value {
        json!([{"role": "user", "content": "hi"}])
    }

    #[test]
    fn maps_openai_requests() {
        let p = chat(json!({
            "model": "smollm2-135m-instruct",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}
            ],
            "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": -1, "stream": true,
            "stream_options": {"include_usage": true}, "stop": "\n", "frequency_penalty": 0.5,
            "presence_penalty": 0, "top_k": 0, "user": "u1", "logprobs": false, "n": 1,
            "response_format": {"type": "text"}, "tools": []
        }))
        .unwrap();
        assert!(p.stream && p.include_usage);
        assert_eq!(p.model.as_deref(), Some("smollm2-135m-instruct"));
        assert_eq!(
            p.llama,
            json!({
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"}
                ],
                "format": "events-v1", "default_system": false, "model": "smollm2-135m-instruct",
                "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 0, "seed": u64::MAX,
                "stop": ["\n"], "frequency_penalty": 0.5
            })
        );
        // The caller's seed when none is given; max_completion_tokens wins.
        let p =
            chat(json!({"messages": msgs(), "max_tokens": 3, "max_completion_tokens": 9})).unwrap();
        assert_eq!(p.llama["seed"], 42);
        assert_eq!(p.llama["max_tokens"], 9);
        assert!(!p.stream && !p.include_usage);
        // JSON mode is the program's constrained sampling.
        let p =
            chat(json!({"messages": msgs(), "response_format": {"type": "json_object"}})).unwrap();
        assert_eq!(p.llama["response_format"], "json_object");
        let e = chat(json!({"messages": msgs(), "response_format": {"type": "yaml"}})).unwrap_err();
        assert_eq!((e.status, e.param), (400, Some("response_format")));
    }

    #[test]
    fn json_schema_travels_as_its_own_text() {
        // The schema's text goes to the program as written: `b` before `a`
        // (a parsed map here would sort them).
        let body = br#"{"messages": [{"role": "user", "content": "hi"}], "response_format":
            {"type": "json_schema", "json_schema": {"name": "pair", "strict": true, "description": "d",
             "schema": {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}}}}"#;
        let p = parse(body, Endpoint::Chat, 1).unwrap();
        assert_eq!(p.llama["response_format"], "json_schema");
        assert_eq!(
            p.llama["json_schema"],
            r#"{"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}"#
        );
        // No schema: any JSON object.
        let p = chat(json!({"messages": msgs(), "response_format":
            {"type": "json_schema", "json_schema": {"name": "x"}}}))
        .unwrap();
        assert_eq!(p.llama["response_format"], "json_object");
        assert_eq!(p.llama.get("json_schema"), None);
        for (format, reason) in [
            (json!({"type": "json_schema"}), "needs `json_schema`"),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}}}),
                "missing field `name`",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
                "must be 1 to 64",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "shema": {}}}),
                "unknown field `shema`",
            ),
        ] {
            let e = chat(json!({"messages": msgs(), "response_format": format})).unwrap_err();
            assert_eq!(
                (e.status, e.param),
                (400, Some("response_format")),
                "{format}"
            );
            assert!(e.message.contains(reason), "{format}: {}", e.message);
        }
        // The program's refusal of a schema it cannot enforce names the parameter.
        let e = program_error(
            "invalid_request",
            "response_format json_schema: #: keyword `pattern` is not supported",
        );
        assert_eq!((e.status, e.param), (400, Some("response_format")));
        // n choices: choice i samples with seed + i.
        let p = chat(json!({"messages": msgs(), "n": 3, "seed": 10})).unwrap();
        assert_eq!(p.n, 3);
        let seed =
            |i| serde_json::from_slice::<Value>(&p.request_for_choice(i)).unwrap()["seed"].clone();
        assert_eq!(
            (seed(0), seed(1), seed(2)),
            (json!(10), json!(11), json!(12))
        );
        let p = parse(
            br#"{"model":"m","prompt":["once"]}"#,
            Endpoint::Completions,
            1,
        )
        .unwrap();
        assert_eq!(
            p.llama,
            json!({"prompt": "once", "format": "events-v1", "model": "m", "seed": 1})
        );
    }

    #[test]
    fn logprobs_on_chat_only_with_at_most_20_alternatives() {
        let p = chat(json!({"messages": msgs(), "logprobs": true, "top_logprobs": 20})).unwrap();
        assert!(p.logprobs);
        assert_eq!(
            (&p.llama["logprobs"], &p.llama["top_logprobs"]),
            (&json!(true), &json!(20))
        );
        let p = chat(json!({"messages": msgs(), "logprobs": false, "top_logprobs": 0})).unwrap();
        assert!(!p.logprobs && p.llama.get("logprobs").is_none());
        for (req, param) in [
            (
                json!({"messages": msgs(), "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (
                json!({"messages": msgs(), "top_logprobs": 2}),
                "top_logprobs",
            ),
            (json!({"messages": msgs(), "logprobs": 3}), "logprobs"),
        ] {
            let e = chat(req).unwrap_err();
            assert_eq!((e.status, e.param), (400, Some(param)), "{e:?}");
        }
        let e = parse(br#"{"prompt":"x","logprobs":2}"#, Endpoint::Completions, 0).unwrap_err();
        assert_eq!(
            (e.param, e.code),
            (Some("logprobs"), Some("unsupported_parameter"))
        );
    }

    #[test]
    fn out_of_range_parameters_are_400_naming_the_parameter() {
        for (field, value) in [
            ("temperature", json!(2.5)),
            ("temperature", json!(-1)),
            ("top_p", json!(0)),
            ("top_p", json!(1.01)),
            ("max_tokens", json!(0)),
            ("max_completion_tokens", json!(-5)),
            ("n", json!(0)),
            ("n", json!(9)),
            ("presence_penalty", json!(2.5)),
            ("frequency_penalty", json!(-3)),
            ("top_k", json!(-1)),
            ("stop", json!(["a", "b", "c", "d", "e"])),
            ("stop", json!([""])),
        ] {
            let mut req = json!({"messages": msgs()});
            req[field] = value.clone();
            let e = chat(req).unwrap_err();
            assert_eq!(
                (e.status, e.kind, e.param),
                (400, "invalid_request_error", Some(field)),
                "{field}={value}: {e:?}"
            );
            assert!(e.message.contains(field), "{e:?}");
        }
    }

    #[test]
    fn unknown_and_unsupported_fields_are_reported_not_dropped() {
        let e = chat(json!({"messages": msgs(), "temprature": 0.5})).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("unknown field `temprature`"), "{e:?}");
        let e = chat(json!({"messages": [{"role": "user", "content": "hi", "nmae": "x"}]}))
            .unwrap_err();
        assert!(e.message.contains("unknown field `nmae`"), "{e:?}");
        for (field, value) in [
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", json!("auto")),
            ("logit_bias", json!({"50256": -100})),
            ("best_of", json!(2)),
        ] {
            let mut req = json!({"messages": msgs()});
            req[field] = value;
            let e = chat(req).unwrap_err();
            assert_eq!(
                (e.status, e.param, e.code),
                (400, Some(field), Some("unsupported_parameter")),
                "{e:?}"
            );
            assert!(
                e.message.contains(&format!("`{field}` is not supported")),
                "{e:?}"
            );
        }
        let e = chat(json!({"messages": msgs(), "stream_options": {"include_usage": true}}))
            .unwrap_err();
        assert_eq!(e.param, Some("stream_options"));
        for bad in [
            json!({}),
            json!({"messages": []}),
            json!({"messages": [{"role": "tool", "content": "x"}]}),
        ] {
            assert_eq!(chat(bad).unwrap_err().param, Some("messages"));
        }
        assert_eq!(chat(json!([1])).unwrap_err().status, 400);
        let e = parse(br#"{"prompt":[1,2]}"#, Endpoint::Completions, 0).unwrap_err();
        assert_eq!(e.param, Some("prompt"));
    }

    #[test]
    fn event_lines_may_span_frames_and_junk_is_an_error() {
        let mut l = EventLines::default();
        assert_eq!(l.push(br#"{"type":"text","te"#).unwrap(), []);
        assert!(l.has_partial_line());
        let got = l
            .push(b"xt\":\"a\\nb\"}\n{\"type\":\"end\",\"finish_reason\":\"length\",\"prompt_tokens\":3,\"completion_tokens\":2}\n")
            .unwrap();
        assert_eq!(
            got,
            [
                ProgramEvent::Text {
                    text: "a\nb".into()
                },
                ProgramEvent::End(Usage {
                    finish_reason: "length".into(),
                    prompt_tokens: 3,
                    completion_tokens: 2
                })
            ]
        );
        assert!(!l.has_partial_line());
        if let ProgramEvent::End(u) = &got[1] {
            let other = Usage {
                completion_tokens: 7,
                ..u.clone()
            };
            assert_eq!(
                total_usage(&[u, &other]),
                json!({"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}),
                "the prompt once, the completions summed"
            );
        }
        let e = l.push(b"error: bad request JSON\n").unwrap_err();
        assert!(e.contains("not events-v1"), "{e}");
    }

    #[test]
    fn program_errors_map_to_client_errors_never_a_retryable_5xx() {
        let e = program_error("context_length_exceeded", "too long");
        assert_eq!(
            (e.status, e.code, e.param),
            (400, Some("context_length_exceeded"), Some("messages"))
        );
        let e = program_error("model_not_found", "no such model");
        assert_eq!((e.status, e.code), (404, Some("model_not_found")));
        assert_eq!(program_error("invalid_request", "x").status, 400);
        assert_eq!(program_error("internal", "accelerator").status, 500);
        assert_eq!(
            e.body(),
            json!({"error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
        );
    }
}
