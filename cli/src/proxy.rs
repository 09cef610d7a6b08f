//! `cinfer proxy`: an OpenAI-compatible local endpoint in front of a cinfer
//! inference server. Every request is sealed to the verified request key and
//! every reply's receipt is verified (by `cinfer-client`) before the proxy
//! calls the answer good:
//!
//! * `POST /v1/chat/completions`: non-streaming answers only after the
//!   receipt verified (else an error, never the text); with `"stream": true`,
//!   text chunks go out as server-sent events as each sealed frame
//!   authenticates, and the closing chunk (`finish_reason`) and `[DONE]`
//!   only after the receipt verified — on a failure the stream ends with an
//!   `error` event instead.
//! * `GET /v1/models`: the server's model list.
//!
//! Listen on loopback only: the proxy handles request and reply plaintext.
//!
//! Like `cinfer chat`, it accepts replies only from the pinned program
//! component (`--program-sha256`, `--program-file` or `--policy`; a reply whose
//! receipt names another is a 502 `cinfer_verification_failed`), unless
//! started with `--any-program`.
//!
//! At most `--max-connections` connections are open at once (one accepted over
//! the cap is closed at once); a request's headers must arrive within
//! `--read-timeout-ms` (else the connection is closed, also one idle between
//! requests), and then its body within as long again (else 408).

use crate::chat::ServerArgs;
use anyhow::{Context, Result};
use cinfer_client::{ChatResult, Client, ClientError, ReplyStatus};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{CACHE_CONTROL, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};

/// Largest chat request body accepted.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// hyper's read buffer per connection (a larger request head is refused, 431).
const MAX_HTTP_BUF: usize = 64 * 1024;

/// `cinfer proxy` arguments.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Address to listen on (keep it on loopback: the proxy sees plaintext).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Program that serves chat completions.
    #[arg(long, default_value = "llama-chat")]
    pub program: String,
    #[command(flatten)]
    pub pin: crate::chat::ProgramPinArgs,
    /// Client connections open at once; one accepted over the cap is closed at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Time to receive a request's headers (then the connection is closed), and
    /// then its body (then 408), each, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub read_timeout_ms: u64,
}

type ProxyBody = BoxBody<Bytes, Infallible>;

/// A response body fed by a channel (server-sent events as they happen).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

struct State {
    client: Arc<Client>,
    program: String,
    read_timeout: Duration,
}

fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_body(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

fn error_response(status: StatusCode, message: &str, kind: &str) -> Response<ProxyBody> {
    json_response(status, &error_body(message, kind))
}

/// The HTTP status and OpenAI error type for a client error.
fn classify(e: &ClientError) -> (StatusCode, &'static str) {
    if e.is_verification_failure() {
        return (StatusCode::BAD_GATEWAY, "cinfer_verification_failed");
    }
    match e {
        ClientError::NoAttestedLoader(_) => (StatusCode::SERVICE_UNAVAILABLE, "cinfer_unavailable"),
        ClientError::InvalidProgram(_) | ClientError::InvalidProgramPin(_) => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        ClientError::Server { status, .. } if (400..500).contains(status) => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
            "invalid_request_error",
        ),
        _ => (StatusCode::BAD_GATEWAY, "cinfer_upstream_error"),
    }
}

fn client_error_response(e: &ClientError) -> Response<ProxyBody> {
    let (status, kind) = classify(e);
    error_response(status, &e.to_string(), kind)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<InMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    n: Option<u32>,
}

/// Maps an OpenAI chat request to llama-chat's request.
fn llama_request(req: &CompletionRequest) -> Result<Value, String> {
    if req.n.is_some_and(|n| n != 1) {
        return Err("only n = 1 is supported".into());
    }
    if req.messages.is_empty() {
        return Err("messages must not be empty".into());
    }
    let mut messages = Vec::new();
    for m in &req.messages {
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant") => r,
            other => return Err(format!("unsupported message role {other:?}")),
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(format!("unsupported content part type {:?}", p.kind));
                    }
                    text.push_str(p.text.as_deref().unwrap_or(""));
                }
                text
            }
        };
        messages.push(json!({"role": role, "content": content}));
    }
    // As `cinfer chat`: only the system turns the client sends.
    let mut out = json!({"messages": messages, "format": "text", "default_system": false});
    if let Some(obj) = out.as_object_mut() {
        if let Some(model) = req.model.as_deref().filter(|m| !m.is_empty()) {
            obj.insert("model".into(), model.into());
        }
        if let Some(n) = req.max_completion_tokens.or(req.max_tokens) {
            obj.insert("max_tokens".into(), n.into());
        }
        if let Some(t) = req.temperature {
            obj.insert("temperature".into(), t.into());
        }
        if let Some(p) = req.top_p {
            obj.insert("top_p".into(), p.into());
        }
        if let Some(s) = req.seed {
            obj.insert("seed".into(), s.into());
        }
    }
    Ok(out)
}

/// Turns byte chunks into text without splitting a UTF-8 sequence.
#[derive(Debug, Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.0.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.0) {
                Ok(s) => {
                    out.push_str(s);
                    self.0.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.0[..valid]));
                    match e.error_len() {
                        None => {
                            self.0.drain(..valid);
                            return out;
                        }
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.0.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.0).into_owned();
        self.0.clear();
        s
    }
}

enum Event {
    Chunk(Vec<u8>),
    Done(Box<Result<ChatResult, ClientError>>),
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn completion_id() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    format!("chatcmpl-{}", hex::encode(b))
}

/// What the proxy attaches about the verified receipt.
fn receipt_extension(client: &Client, result: &ChatResult) -> Value {
    json!({
        "verified": true,
        "keyserver_identity": client.identity_fingerprint(),
        "request_key_id": result.statement.key_id,
        "receipt": serde_json::to_value(&result.receipt).unwrap_or(Value::Null),
        "signed_receipt": serde_json::to_value(&result.signed_receipt).unwrap_or(Value::Null),
    })
}

/// Runs the chat through the blocking client, forwarding events.
fn start_chat(state: &State, request: Vec<u8>) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(256);
    let client = state.client.clone();
    let program = state.program.clone();
    tokio::task::spawn_blocking(move || {
        let result = client.chat(&program, &request, |chunk| {
            // A gone consumer just stops receiving; the exchange still runs
            // to its end (and its receipt is still checked) here.
            let _ = tx.blocking_send(Event::Chunk(chunk.to_vec()));
        });
        let _ = tx.blocking_send(Event::Done(Box::new(result)));
    });
    rx
}

fn not_completed(status: ReplyStatus) -> String {
    format!(
        "the program did not complete: {} (receipt verified)",
        cinfer_client::outcome_name(status)
    )
}

async fn chat_completions(state: Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(state.read_timeout, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or unreadable",
                "invalid_request_error",
            );
        }
        Err(_) => {
            // The rest of the body is never read: close rather than wait for it.
            let mut resp = error_response(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "request body not received within {} ms",
                    state.read_timeout.as_millis()
                ),
                "invalid_request_error",
            );
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    let parsed: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("malformed chat completion request: {e}"),
                "invalid_request_error",
            );
        }
    };
    let llama = match llama_request(&parsed) {
        Ok(l) => l,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e, "invalid_request_error"),
    };
    let model = parsed
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| state.program.clone());
    let mut rx = start_chat(&state, llama.to_string().into_bytes());
    let id = completion_id();
    let created = now_secs();

    if !parsed.stream.unwrap_or(false) {
        let mut text = Vec::new();
        let result = loop {
            match rx.recv().await {
                Some(Event::Chunk(c)) => text.extend_from_slice(&c),
                Some(Event::Done(r)) => break *r,
                None => {
                    return error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the client task ended",
                        "cinfer_internal_error",
                    );
                }
            }
        };
        let result = match result {
            Ok(r) => r,
            Err(e) => return client_error_response(&e),
        };
        if result.status != ReplyStatus::Completed {
            return error_response(
                StatusCode::BAD_GATEWAY,
                &not_completed(result.status),
                "cinfer_program_failed",
            );
        }
        let content = String::from_utf8_lossy(&text).into_owned();
        return json_response(
            StatusCode::OK,
            &json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
                "cinfer": receipt_extension(&state.client, &result),
            }),
        );
    }

    // Streaming: wait for the first event so that errors before any text
    // (no attested loader, a statement that does not verify) are HTTP errors.
    let first = match rx.recv().await {
        Some(Event::Done(r)) => match *r {
            Err(e) => return client_error_response(&e),
            Ok(r) => Event::Done(Box::new(Ok(r))),
        },
        Some(chunk) => chunk,
        None => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the client task ended",
                "cinfer_internal_error",
            );
        }
    };
    let (tx, body_rx) = mpsc::channel::<Bytes>(256);
    let chunk = move |delta: Value, finish: Value, extra: Option<Value>| -> Bytes {
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if let (Some(extra), Some(obj)) = (extra, v.as_object_mut()) {
            obj.insert("cinfer".into(), extra);
        }
        Bytes::from(format!("data: {v}\n\n"))
    };
    let client = state.client.clone();
    tokio::spawn(async move {
        let mut carry = Utf8Carry::default();
        if tx
            .send(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                None,
            ))
            .await
            .is_err()
        {
            return;
        }
        let mut next = Some(first);
        loop {
            let event = match next.take() {
                Some(e) => Some(e),
                None => rx.recv().await,
            };
            let msg = match event {
                Some(Event::Chunk(c)) => {
                    let text = carry.push(&c);
                    if text.is_empty() {
                        continue;
                    }
                    chunk(json!({"content": text}), Value::Null, None)
                }
                Some(Event::Done(r)) => {
                    let rest = carry.finish();
                    if !rest.is_empty() {
                        let _ = tx
                            .send(chunk(json!({"content": rest}), Value::Null, None))
                            .await;
                    }
                    let end = match *r {
                        Ok(r) if r.status == ReplyStatus::Completed => {
                            let last = chunk(
                                json!({}),
                                json!("stop"),
                                Some(receipt_extension(&client, &r)),
                            );
                            let mut b = last.to_vec();
                            b.extend_from_slice(b"data: [DONE]\n\n");
                            Bytes::from(b)
                        }
                        Ok(r) => Bytes::from(format!(
                            "data: {}\n\n",
                            error_body(&not_completed(r.status), "cinfer_program_failed")
                        )),
                        Err(e) => {
                            let (_, kind) = classify(&e);
                            Bytes::from(format!("data: {}\n\n", error_body(&e.to_string(), kind)))
                        }
                    };
                    let _ = tx.send(end).await;
                    return;
                }
                None => return,
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(ChannelBody(body_rx).boxed());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn models(state: Arc<State>) -> Response<ProxyBody> {
    let client = state.client.clone();
    let result = tokio::task::spawn_blocking(move || client.models()).await;
    match result {
        Ok(Ok(models)) => {
            let data: Vec<Value> = models
                .into_iter()
                .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "cinfer"}))
                .collect();
            json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
        }
        Ok(Err(e)) => client_error_response(&e),
        Err(_) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the client task failed",
            "cinfer_internal_error",
        ),
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/chat/completions") => chat_completions(state, req).await,
        (&Method::GET, "/v1/models") => models(state).await,
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        _ => error_response(
            StatusCode::NOT_FOUND,
            &format!("no route {} {path}", req.method()),
            "invalid_request_error",
        ),
    }
}

/// Runs `cinfer proxy` until killed.
pub fn run(args: &ProxyArgs) -> Result<()> {
    let mut client = args.server.client()?;
    let pinned = args.pin.expected(&args.program)?;
    if let Some(pin) = &pinned {
        client = client.with_program_pin(&args.program, pin);
    }
    let client = Arc::new(client);
    let read_timeout = Duration::from_millis(args.read_timeout_ms);
    let state = Arc::new(State {
        client,
        program: args.program.clone(),
        read_timeout,
    });
    let max_connections = args.max_connections as usize;
    let permits = Arc::new(Semaphore::new(max_connections));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let local = listener.local_addr()?;
        eprintln!(
            "cinfer proxy: listening on http://{local}/v1 (OpenAI-compatible), server {}, keyserver identity {}, program {} {}",
            state.client.server(),
            state.client.identity_fingerprint(),
            state.program,
            pinned.as_deref().map_or_else(
                || "(any admitted component: --any-program)".to_owned(),
                |d| format!("sha256 {d}")
            )
        );
        let mut last_warning: Option<Instant> = None;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("cinfer proxy: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                drop(stream);
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    eprintln!(
                        "cinfer proxy: {max_connections} connections open (--max-connections): closing new ones at once"
                    );
                    last_warning = Some(Instant::now());
                }
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, req).await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(read_timeout)
                    .max_buf_size(MAX_HTTP_BUF)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_carry_keeps_sequences_whole() {
        let mut c = Utf8Carry::default();
        let s = "héllo ✓".as_bytes();
        let mut out = String::new();
        for b in s {
            out.push_str(&c.push(std::slice::from_ref(b)));
        }
        out.push_str(&c.finish());
        assert_eq!(out, "héllo ✓");
        assert_eq!(c.push(b"a\xffb"), "a\u{FFFD}b");
    }

    #[test]
    fn maps_openai_requests() {
        let req: CompletionRequest = serde_json::from_value(json!({
            "model": "smollm2-135m-instruct",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}
            ],
            "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stream": true
        }))
        .unwrap();
        let l = llama_request(&req).unwrap();
        assert_eq!(
            l,
            json!({
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"}
                ],
                "format": "text", "default_system": false, "model": "smollm2-135m-instruct",
                "max_tokens": 7, "temperature": 0.5, "top_p": 0.9f32, "seed": 3
            })
        );
    }
}
