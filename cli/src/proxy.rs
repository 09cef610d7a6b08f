//! `cinfer proxy`: an OpenAI-compatible local endpoint in front of a cinfer
//! inference server. Every request is sealed to the verified request key and
//! every reply's receipt is verified (by `cinfer-client`) before the proxy
//! calls the answer good:
//!
//! * `POST /v1/chat/completions` and `POST /v1/completions`: requests are
//!   checked by [`crate::openai`] (unknown fields and out-of-range
//!   parameters are 400s naming the parameter) and mapped to llama-chat's
//!   request with `"format": "events-v1"`, so the program reports the token
//!   counts (`usage`), the `finish_reason` and typed failures inside the
//!   sealed reply. Non-streaming answers only after the receipt verified
//!   (else an error, never the text); with `"stream": true`, text chunks go
//!   out as server-sent events as each sealed frame authenticates, and the
//!   closing chunk (`finish_reason`), the `usage` chunk
//!   (`stream_options.include_usage`) and `[DONE]` only after the receipt
//!   verified — on a failure the stream ends with an `{"error": …}` event
//!   and `[DONE]` instead. A failure before any text (no attested loader,
//!   a prompt longer than the context, an unknown model) is an HTTP error
//!   even when streaming.
//! * `GET /v1/models`, `GET /v1/models/{id}`: the server's model list.
//! * `GET /v1/cinfer/attestation`: what the proxy verified, fetched afresh:
//!   the request-key statement (key id, validity, the pinned keyservers that
//!   signed it), the program pin, and how many receipts verified so far.
//! * `GET /healthz` (the process answers), `GET /readyz` (200 only while the
//!   server relays a statement that verifies against the pinned keyservers;
//!   else 503 with the reason), `GET /metrics` (Prometheus text: requests by
//!   route and status, time to first token, duration, token counts,
//!   receipts verified, verification failures).
//!
//! At start it checks what it can before listening: the server answers and
//! its request-key statement verifies against the pinned keyserver(s)
//! (waiting up to `--startup-check-ms` for a loader to become ready; a
//! statement that does not verify fails at once), and, with a program pin,
//! that the server lists the program with that digest (the server's word:
//! the receipts remain the proof). `--startup-check-ms 0` skips these.
//!
//! A client that hangs up stops its exchange (`Client::chat_until`): the
//! proxy closes its connection to the server, which cancels the run on the
//! loader, rather than reading the reply to its end.
//!
//! Statuses: 400 for a client mistake (parameters, context overflow), 404
//! for an unknown model or route, 405 for a wrong method, 429 (server busy)
//! and 503 (no attested loader) with `Retry-After`, 500 for a program
//! failure that is not the client's, 502 for a reply that failed
//! verification or a program that broke the reply format.
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
use crate::openai::{self, ApiError, Endpoint, EventLines, ProgramEvent, Usage, total_usage};
use crate::proxy_metrics::ProxyMetrics;
use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path as UrlPath, Request, State as Shared};
use axum::http::header::{
    ALLOW, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER,
};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use cinfer_client::{ChatResult, Client, ClientError, ReplyStatus};
use http_body_util::{BodyExt, Limited};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::normalize_path::NormalizePathLayer;
use tower_http::trace::TraceLayer;
use tower_layer::Layer;

/// Largest chat request body accepted.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// hyper's read buffer per connection (a larger request head is refused, 431).
const MAX_HTTP_BUF: usize = 64 * 1024;
/// `Retry-After` of a 429 (server busy) or 503 (no attested loader).
const RETRY_AFTER_SECS: &str = "1";

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
    /// At start, how long to wait for the server to relay a request-key
    /// statement that verifies (a loader may still be attesting), in
    /// milliseconds; 0 skips the startup checks.
    #[arg(long, default_value_t = 30_000)]
    pub startup_check_ms: u64,
    /// A file holding an API key: then every `/v1/` request must carry
    /// `Authorization: Bearer KEY` (else 401). `/healthz`, `/readyz` and
    /// `/metrics` stay open.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// An origin (`https://app.example`) whose pages may call the proxy from a
    /// browser (CORS); repeat for several. None by default: a page of another
    /// origin cannot read the proxy's cleartext answers.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
}

type ProxyBody = Body;

struct State {
    client: Arc<Client>,
    program: String,
    /// The program's pinned component digest (hex), if pinned.
    pin: Option<String>,
    read_timeout: Duration,
    metrics: ProxyMetrics,
    /// SHA-256 of the API key requests must carry, if one is set.
    api_key_sha256: Option<[u8; 32]>,
}

fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut resp = Response::new(Body::from(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The OpenAI error for a client-library error. Only a busy or unavailable
/// server is retryable (429, 503, with `Retry-After`); what the server refused
/// keeps its 4xx; a reply that failed verification is a 502.
fn client_api_error(e: &ClientError) -> ApiError {
    if e.is_verification_failure() {
        return ApiError::new(502, "cinfer_verification_failed", e.to_string());
    }
    match e {
        ClientError::NoAttestedLoader(_) => ApiError::new(503, "cinfer_unavailable", e.to_string()),
        ClientError::Server { status: 429, .. } => ApiError {
            code: Some("rate_limit_exceeded"),
            ..ApiError::new(429, "requests", e.to_string())
        },
        ClientError::InvalidProgram(_) | ClientError::InvalidProgramPin(_) => {
            ApiError::new(400, "invalid_request_error", e.to_string())
        }
        ClientError::Server { status, .. } if (400..500).contains(status) => {
            ApiError::new(*status, "invalid_request_error", e.to_string())
        }
        _ => ApiError::new(502, "cinfer_upstream_error", e.to_string()),
    }
}

fn api_error_response(e: &ApiError) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, &e.body());
    if matches!(e.status, 429 | 503) {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    }
    resp
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

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

fn completion_id(endpoint: Endpoint) -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    format!("{prefix}-{}", hex::encode(b))
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

/// Runs one exchange per request (one per choice) through the blocking
/// client, forwarding each one's events tagged with its choice index.
fn start_chats(state: &State, requests: Vec<Vec<u8>>) -> mpsc::Receiver<(usize, Event)> {
    let (tx, rx) = mpsc::channel(256);
    for (index, request) in requests.into_iter().enumerate() {
        let tx = tx.clone();
        let client = state.client.clone();
        let program = state.program.clone();
        tokio::task::spawn_blocking(move || {
            let result = client.chat_until(&program, &request, |chunk| {
                // The proxy's client went away (its request future or stream
                // task, which holds the receiver, is gone): stop, so the
                // server cancels the generation on the loader.
                match tx.blocking_send((index, Event::Chunk(chunk.to_vec()))) {
                    Ok(()) => std::ops::ControlFlow::Continue(()),
                    Err(_) => std::ops::ControlFlow::Break(()),
                }
            });
            let _ = tx.blocking_send((index, Event::Done(Box::new(result))));
        });
    }
    rx
}

fn not_completed(status: ReplyStatus) -> String {
    format!(
        "the program did not complete: {} (receipt verified)",
        cinfer_client::outcome_name(status)
    )
}

/// What the reply carries for the client, in order.
#[derive(Debug)]
enum Piece {
    Text(String),
    Logprobs(Vec<Value>),
}

/// One exchange's program events, as they arrive.
#[derive(Debug, Default)]
struct Run {
    lines: EventLines,
    end: Option<Usage>,
    error: Option<(String, String)>,
    /// The reply is not well-formed `events-v1`.
    protocol: Option<String>,
}

impl Run {
    /// Adds reply bytes; returns the completion text (and log-probabilities) they carry.
    fn feed(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut texts = Vec::new();
        if self.protocol.is_some() {
            return texts;
        }
        let events = match self.lines.push(bytes) {
            Ok(e) => e,
            Err(e) => {
                self.protocol = Some(e);
                return texts;
            }
        };
        for event in events {
            if self.end.is_some() || self.error.is_some() {
                self.protocol = Some("the program sent an event after its last one".into());
                break;
            }
            match event {
                ProgramEvent::Text { text } => texts.push(Piece::Text(text)),
                ProgramEvent::Logprobs { content } => texts.push(Piece::Logprobs(content)),
                ProgramEvent::End(usage) => self.end = Some(usage),
                ProgramEvent::Error { code, message } => self.error = Some((code, message)),
            }
        }
        texts
    }

    /// Whether the program reported a failure (or broke the format) already.
    fn failed(&self) -> bool {
        self.error.is_some() || self.protocol.is_some()
    }

    /// The verdict on the finished exchange: verification first, then the
    /// program's own account of how it ended.
    fn finish(
        self,
        result: Result<ChatResult, ClientError>,
    ) -> Result<(ChatResult, Usage), ApiError> {
        let result = result.map_err(|e| client_api_error(&e))?;
        let broken = |m: String| ApiError::new(502, "cinfer_program_failed", m);
        if let Some(p) = self.protocol {
            return Err(broken(p));
        }
        if self.lines.has_partial_line() {
            return Err(broken("the program's reply ended inside an event".into()));
        }
        match (result.status, self.end, self.error) {
            (ReplyStatus::Completed, Some(usage), None) => Ok((result, usage)),
            (ReplyStatus::Completed, _, _) => {
                Err(broken("the program completed without its end event".into()))
            }
            (ReplyStatus::ProgramFailed, _, Some((code, message))) => {
                Err(openai::program_error(&code, &message))
            }
            // The classifier's refusal: the request's fault, and all the
            // untrusted side learns too.
            (ReplyStatus::Refused, _, _) => Err(ApiError::new(
                400,
                "cinfer_refused_by_classifier",
                "the loader's safety classifier refused the request (receipt verified)",
            )),
            (status, _, _) => Err(broken(not_completed(status))),
        }
    }
}

/// A finished choice: its verified exchange and the program's account.
type Verdict = Result<(ChatResult, Usage), ApiError>;

/// The response objects of one request.
struct Shape {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// `logprobs: true`: every choice carries `logprobs.content`.
    logprobs: bool,
    /// Choices (`n`).
    n: usize,
}

impl Shape {
    fn chunk_object(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        }
    }

    fn chunk(&self, choice: Value, extension: Option<Value>) -> SseEvent {
        let mut v = json!({
            "id": self.id,
            "object": self.chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let Some(obj) = v.as_object_mut() {
            if self.include_usage {
                obj.insert("usage".into(), Value::Null);
            }
            if let Some(extension) = extension {
                obj.insert("cinfer".into(), extension);
            }
        }
        SseEvent::default().data(v.to_string())
    }

    fn logprobs_of(&self, entries: Vec<Value>) -> Value {
        if self.logprobs {
            json!({"content": entries, "refusal": null})
        } else {
            Value::Null
        }
    }

    fn choice(
        &self,
        index: usize,
        text: Option<&str>,
        finish: Value,
        logprobs: Vec<Value>,
    ) -> Value {
        let logprobs = self.logprobs_of(logprobs);
        match self.endpoint {
            Endpoint::Chat => {
                let delta = text.map_or_else(|| json!({}), |t| json!({"content": t}));
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// The first chunks of a chat stream (each choice's role), none for completions.
    fn opening(&self) -> Vec<SseEvent> {
        if self.endpoint != Endpoint::Chat {
            return Vec::new();
        }
        (0..self.n)
            .map(|index| {
                self.chunk(
                    json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
                    None,
                )
            })
            .collect()
    }

    /// Chunks for choice `index`'s `pieces`: one per text; log-probabilities
    /// go with the text that follows them (`pending` keeps them until it comes).
    fn pieces(&self, index: usize, pending: &mut Vec<Value>, pieces: Vec<Piece>) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Logprobs(entries) => pending.extend(entries),
                Piece::Text(t) => out.push(self.chunk(
                    self.choice(index, Some(&t), Value::Null, std::mem::take(pending)),
                    None,
                )),
            }
        }
        out
    }

    /// Choice `index` finished: its finish reason, with its verified receipt.
    fn finished(
        &self,
        client: &Client,
        index: usize,
        (result, usage): &(ChatResult, Usage),
        pending: Vec<Value>,
    ) -> SseEvent {
        self.chunk(
            self.choice(index, None, json!(usage.finish_reason), pending),
            Some(receipt_extension(client, result)),
        )
    }

    /// The end of a stream: the usage chunk when asked for, and `[DONE]`.
    fn closing(&self, usages: &[&Usage]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if self.include_usage {
            let v = json!({
                "id": self.id,
                "object": self.chunk_object(),
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": total_usage(usages),
            });
            out.push(SseEvent::default().data(v.to_string()));
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }

    /// A failed stream's end: the error event and `[DONE]`.
    fn failed(&self, e: &ApiError) -> Vec<SseEvent> {
        vec![
            SseEvent::default().data(e.body().to_string()),
            SseEvent::default().data("[DONE]"),
        ]
    }

    /// The whole (non-streamed) answer. One choice carries its receipt in the
    /// top-level `cinfer`; several, each in its own.
    fn complete(&self, client: &Client, choices: Vec<(Vec<Piece>, ChatResult, Usage)>) -> Value {
        let usages: Vec<&Usage> = choices.iter().map(|(_, _, u)| u).collect();
        let usage = total_usage(&usages);
        let one = choices.len() == 1;
        let mut top_extension = Value::Null;
        let mut out = Vec::new();
        for (index, (pieces, result, usage)) in choices.iter().enumerate() {
            let mut text = String::new();
            let mut entries = Vec::new();
            for piece in pieces {
                match piece {
                    Piece::Text(t) => text.push_str(t),
                    Piece::Logprobs(e) => entries.extend(e.iter().cloned()),
                }
            }
            let logprobs = self.logprobs_of(entries);
            let mut choice = match self.endpoint {
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": usage.finish_reason,
                }),
                Endpoint::Completions => json!({
                    "index": index, "text": text, "logprobs": logprobs, "finish_reason": usage.finish_reason,
                }),
            };
            let extension = receipt_extension(client, result);
            if one {
                top_extension = extension;
            } else if let Some(obj) = choice.as_object_mut() {
                obj.insert("cinfer".into(), extension);
            }
            out.push(choice);
        }
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completions => "text_completion",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": out,
            "usage": usage,
        });
        if let (false, Some(obj)) = (top_extension.is_null(), v.as_object_mut()) {
            obj.insert("cinfer".into(), top_extension);
        }
        v
    }
}

async fn read_body(state: &State, req: Request) -> Result<Bytes, Response<ProxyBody>> {
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(state.read_timeout, collect).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(_)) => Err(api_error_response(&ApiError::new(
            413,
            "invalid_request_error",
            "request body too large or unreadable",
        ))),
        Err(_) => {
            // The rest of the body is never read: close rather than wait for it.
            let mut resp = api_error_response(&ApiError::new(
                408,
                "invalid_request_error",
                format!(
                    "request body not received within {} ms",
                    state.read_timeout.as_millis()
                ),
            ));
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            Err(resp)
        }
    }
}

fn internal_error() -> Response<ProxyBody> {
    api_error_response(&ApiError::new(
        500,
        "cinfer_internal_error",
        "the client task ended",
    ))
}

/// The metrics route name of `endpoint`.
fn route_name(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Chat => "chat_completions",
        Endpoint::Completions => "completions",
    }
}

/// One completion's clock: its first token, its verdicts, its end.
struct Timing {
    state: Arc<State>,
    route: &'static str,
    started: Instant,
    /// Time to the first text, once it came.
    first_token: Option<Duration>,
    /// Choices verified, their tokens, and the first failure's status.
    verified: usize,
    completion_tokens: u64,
    failed: Option<u16>,
}

impl Timing {
    /// A completion that arrived at `started` begins (in flight until dropped).
    fn start(state: Arc<State>, route: &'static str, started: Instant) -> Self {
        state.metrics.completion_started();
        Timing {
            state,
            route,
            started,
            first_token: None,
            verified: 0,
            completion_tokens: 0,
            failed: None,
        }
    }

    /// Pieces of the reply arrived (authenticated).
    fn saw(&mut self, pieces: &[Piece]) {
        if self.first_token.is_none() && pieces.iter().any(|p| matches!(p, Piece::Text(_))) {
            let took = self.started.elapsed();
            self.first_token = Some(took);
            self.state.metrics.first_token(took);
        }
    }

    /// A choice's verdict, counted.
    fn verdict(&mut self, v: Verdict) -> Verdict {
        self.state
            .metrics
            .verdict(v.as_ref().map(|(_, usage)| usage));
        match &v {
            Ok((_, usage)) => {
                self.verified += 1;
                self.completion_tokens += usage.completion_tokens;
            }
            Err(e) => {
                self.failed.get_or_insert(e.status);
            }
        }
        v
    }
}

/// The completion is over: answered, failed, its stream ended or its client
/// went away.
impl Drop for Timing {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        self.state.metrics.completion_done(self.route, took);
        // Counts and times only: never the prompt or the text.
        tracing::info!(
            route = self.route,
            choices_verified = self.verified,
            completion_tokens = self.completion_tokens,
            failed_status = self.failed,
            first_token_ms = self.first_token.map(|d| d.as_millis() as u64),
            duration_ms = took.as_millis() as u64,
            "completion"
        );
    }
}

async fn completions(state: Arc<State>, req: Request, endpoint: Endpoint) -> Response<ProxyBody> {
    let started = Instant::now();
    let body = match read_body(&state, req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let parsed = match openai::parse(&body, endpoint, random_u64()) {
        Ok(p) => p,
        Err(e) => return api_error_response(&e),
    };
    let n = parsed.n;
    let requests: Vec<Vec<u8>> = (0..n).map(|i| parsed.request_for_choice(i)).collect();
    let mut rx = start_chats(&state, requests);
    let mut timing = Timing::start(state.clone(), route_name(endpoint), started);
    let shape = Shape {
        endpoint,
        id: completion_id(endpoint),
        created: now_secs(),
        model: parsed
            .model
            .clone()
            .unwrap_or_else(|| state.program.clone()),
        include_usage: parsed.include_usage,
        logprobs: parsed.logprobs,
        n,
    };
    let mut runs: Vec<Run> = (0..n).map(|_| Run::default()).collect();
    let mut verdicts: Vec<Option<Verdict>> = (0..n).map(|_| None).collect();

    if !parsed.stream {
        let mut pieces: Vec<Vec<Piece>> = (0..n).map(|_| Vec::new()).collect();
        while verdicts.iter().any(Option::is_none) {
            match rx.recv().await {
                Some((i, Event::Chunk(c))) => {
                    let new = runs[i].feed(&c);
                    timing.saw(&new);
                    pieces[i].extend(new);
                }
                Some((i, Event::Done(r))) => {
                    verdicts[i] = Some(timing.verdict(std::mem::take(&mut runs[i]).finish(*r)));
                }
                None => return internal_error(),
            }
        }
        let mut choices = Vec::new();
        for (p, v) in pieces.into_iter().zip(verdicts) {
            match v {
                Some(Ok((result, usage))) => choices.push((p, result, usage)),
                Some(Err(e)) => return api_error_response(&e),
                None => return internal_error(),
            }
        }
        return json_response(StatusCode::OK, &shape.complete(&state.client, choices));
    }

    // Streaming: nothing is sent before the first text, so that failures
    // before it (no attested loader, a statement that does not verify, a
    // program error such as a prompt longer than the context) are HTTP
    // errors with their status.
    let mut first: Vec<(usize, Vec<Piece>)> = Vec::new();
    let has_text = |first: &[(usize, Vec<Piece>)]| {
        first
            .iter()
            .any(|(_, p)| p.iter().any(|p| matches!(p, Piece::Text(_))))
    };
    while !has_text(&first) && verdicts.iter().any(Option::is_none) {
        match rx.recv().await {
            Some((i, Event::Chunk(c))) => {
                let pieces = runs[i].feed(&c);
                if runs[i].failed() {
                    continue;
                }
                timing.saw(&pieces);
                first.push((i, pieces));
            }
            Some((i, Event::Done(r))) => {
                match timing.verdict(std::mem::take(&mut runs[i]).finish(*r)) {
                    Err(e) => {
                        return api_error_response(&e);
                    }
                    Ok(v) => verdicts[i] = Some(Ok(v)),
                }
            }
            None => return internal_error(),
        }
    }
    let (tx, body_rx) = mpsc::channel::<SseEvent>(256);
    let client = state.client.clone();
    tokio::spawn(async move {
        let mut pending: Vec<Vec<Value>> = (0..n).map(|_| Vec::new()).collect();
        let mut out = shape.opening();
        for (i, pieces) in first {
            out.extend(shape.pieces(i, &mut pending[i], pieces));
        }
        // Choices that ended before any text was sent end now.
        for (i, v) in verdicts.iter().enumerate() {
            if let Some(Ok(v)) = v {
                out.push(shape.finished(&client, i, v, std::mem::take(&mut pending[i])));
            }
        }
        for b in out {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        while verdicts.iter().any(Option::is_none) {
            let bytes = match rx.recv().await {
                Some((i, Event::Chunk(c))) => {
                    let pieces = runs[i].feed(&c);
                    timing.saw(&pieces);
                    shape.pieces(i, &mut pending[i], pieces)
                }
                Some((i, Event::Done(r))) => {
                    match timing.verdict(std::mem::take(&mut runs[i]).finish(*r)) {
                        Ok(v) => {
                            let b = shape.finished(&client, i, &v, std::mem::take(&mut pending[i]));
                            verdicts[i] = Some(Ok(v));
                            vec![b]
                        }
                        Err(e) => {
                            // One choice failed: the stream ends with its error
                            // (the others stop when their receiver goes).
                            timing.state.metrics.stream_error();
                            for event in shape.failed(&e) {
                                let _ = tx.send(event).await;
                            }
                            return;
                        }
                    }
                }
                None => return,
            };
            for b in bytes {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
        }
        let usages: Vec<&Usage> = verdicts
            .iter()
            .filter_map(|v| v.as_ref().and_then(|v| v.as_ref().ok()).map(|(_, u)| u))
            .collect();
        for event in shape.closing(&usages) {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    // Server-sent events from the framework; the stream ends when the task
    // drops its sender, and a client that goes away drops the receiver,
    // which stops the exchange.
    let events = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events).into_response()
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "cinfer"})
}

/// `GET /v1/models` (`one`: `None`), or `GET /v1/models/{id}` (404 if the
/// server lists no such model).
async fn models(state: Arc<State>, one: Option<String>) -> Response<ProxyBody> {
    let client = state.client.clone();
    let result = tokio::task::spawn_blocking(move || client.models()).await;
    match (result, one) {
        (Ok(Ok(models)), None) => {
            let data: Vec<Value> = models.iter().map(|id| model_object(id)).collect();
            json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
        }
        (Ok(Ok(models)), Some(id)) => {
            if models.contains(&id) {
                json_response(StatusCode::OK, &model_object(&id))
            } else {
                api_error_response(&ApiError {
                    param: Some("model"),
                    code: Some("model_not_found"),
                    ..ApiError::new(
                        404,
                        "invalid_request_error",
                        format!("the model `{id}` does not exist (the server lists {models:?})"),
                    )
                })
            }
        }
        (Ok(Err(e)), _) => api_error_response(&client_api_error(&e)),
        (Err(_), _) => internal_error(),
    }
}

fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Response<ProxyBody> {
    let mut resp = api_error_response(&ApiError::new(
        405,
        "invalid_request_error",
        format!("{method} is not allowed on {path} (use {allow})"),
    ));
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

/// The metrics label of a matched route (`None`: no route matched).
fn route_label(matched: Option<&str>) -> &'static str {
    match matched {
        Some("/v1/chat/completions") => "chat_completions",
        Some("/v1/completions") => "completions",
        Some("/v1/models") => "models",
        Some("/v1/models/{*id}") => "model",
        Some("/v1/cinfer/attestation") => "attestation",
        Some("/healthz") => "healthz",
        Some("/readyz") => "readyz",
        Some("/metrics") => "metrics",
        _ => "unknown",
    }
}

/// Whether `headers` carry `Authorization: Bearer KEY` for the key whose
/// SHA-256 is `want` (digests compared, so the comparison's timing says
/// nothing about the key).
fn authorized(headers: &HeaderMap, want: &[u8; 32]) -> bool {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| Sha256::digest(key.trim().as_bytes()).as_slice() == want)
}

/// Around every route: the API key (for `/v1/`), then the request counted by
/// route and status.
async fn gate(Shared(state): Shared<Arc<State>>, req: Request, next: Next) -> Response {
    let route = route_label(
        req.extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    let resp = match &state.api_key_sha256 {
        Some(want) if req.uri().path().starts_with("/v1/") && !authorized(req.headers(), want) => {
            api_error_response(&ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::new(
                    401,
                    "invalid_request_error",
                    "missing or incorrect API key (Authorization: Bearer KEY)",
                )
            })
        }
        _ => next.run(req).await,
    };
    state.metrics.request(route, resp.status().as_u16());
    resp
}

/// `method` on a route that takes only `allow`: 405 naming it.
fn only(allow: &'static str, route: MethodRouter<Arc<State>>) -> MethodRouter<Arc<State>> {
    route.fallback(move |method: Method, uri: Uri| async move {
        method_not_allowed(&method, uri.path(), allow)
    })
}

/// The proxy's routes (axum), its request tracing and, when origins are
/// given, CORS for them (tower-http).
fn router(state: Arc<State>, cors_origins: &[HeaderValue]) -> Router {
    let router = Router::new()
        .route(
            "/v1/chat/completions",
            only(
                "POST",
                post(|Shared(s): Shared<Arc<State>>, req: Request| {
                    completions(s, req, Endpoint::Chat)
                }),
            ),
        )
        .route(
            "/v1/completions",
            only(
                "POST",
                post(|Shared(s): Shared<Arc<State>>, req: Request| {
                    completions(s, req, Endpoint::Completions)
                }),
            ),
        )
        .route(
            "/v1/models",
            only("GET", get(|Shared(s): Shared<Arc<State>>| models(s, None))),
        )
        .route(
            "/v1/models/{*id}",
            only(
                "GET",
                get(
                    |Shared(s): Shared<Arc<State>>, UrlPath(id): UrlPath<String>| {
                        models(s, Some(id))
                    },
                ),
            ),
        )
        .route("/v1/cinfer/attestation", only("GET", get(attestation)))
        .route(
            "/healthz",
            only(
                "GET",
                get(|| async { json_response(StatusCode::OK, &json!({"status": "ok"})) }),
            ),
        )
        .route("/readyz", only("GET", get(readyz)))
        .route(
            "/metrics",
            only(
                "GET",
                get(|Shared(s): Shared<Arc<State>>| async move {
                    let mut resp = Response::new(Body::from(s.metrics.render()));
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    resp
                }),
            ),
        )
        .fallback(|method: Method, uri: Uri| async move {
            api_error_response(&ApiError::new(
                404,
                "invalid_request_error",
                format!("no route {method} {}", uri.path()),
            ))
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .layer(TraceLayer::new_for_http())
        .with_state(state);
    if cors_origins.is_empty() {
        return router;
    }
    router.layer(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(cors_origins.iter().cloned()))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([CONTENT_TYPE, AUTHORIZATION]),
    )
}

/// The request-key statement, fetched and verified now (blocking client).
async fn fresh_statement(state: &State) -> Result<cinfer_client::RequestKeyStatement, String> {
    let client = state.client.clone();
    match tokio::task::spawn_blocking(move || client.request_key()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the client task ended".into()),
    }
}

/// `GET /readyz`: ready while the server relays a statement that verifies.
async fn readyz(Shared(state): Shared<Arc<State>>) -> Response<ProxyBody> {
    match fresh_statement(&state).await {
        Ok(s) => json_response(
            StatusCode::OK,
            &json!({"status": "ready", "request_key_id": s.key_id, "not_after": s.not_after}),
        ),
        Err(reason) => {
            let mut resp = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not ready", "reason": reason}),
            );
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            resp
        }
    }
}

/// `GET /v1/cinfer/attestation`: what the proxy verifies, checked now.
async fn attestation(Shared(state): Shared<Arc<State>>) -> Response<ProxyBody> {
    let client = &state.client;
    let trust = json!({
        "server": client.server(),
        "keyservers": client.identity_fingerprint(),
        "keyserver_threshold": client.keyserver_threshold(),
        "program": state.program,
        "program_sha256": state.pin,
        "receipts": "every reply's signed receipt is verified before it is returned (502 otherwise)",
    });
    match fresh_statement(&state).await {
        Ok(s) => json_response(
            StatusCode::OK,
            &json!({
                "verified": true,
                "verified_at": now_secs(),
                "pins": trust,
                "request_key": {
                    "key_id": s.key_id,
                    "suite": s.suite,
                    "not_before": s.not_before,
                    "not_after": s.not_after,
                    "receipt_key_sha256": cinfer_client::fingerprint(&s.receipt_public_key),
                },
            }),
        ),
        Err(reason) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"verified": false, "reason": reason, "pins": trust}),
        ),
    }
}

/// Before listening: the server relays a statement that verifies (waiting up
/// to `wait` for a loader to become ready), and lists the pinned program
/// with its digest. Returns what it verified, for the start line.
fn startup_check(
    client: &Client,
    program: &str,
    pin: Option<&str>,
    wait: Duration,
) -> Result<String> {
    let deadline = Instant::now() + wait;
    let statement = loop {
        match client.request_key() {
            Ok(s) => break s,
            Err(e) if e.is_verification_failure() => bail!(
                "startup check: the request-key statement from {} does not verify against the pinned keyserver(s) {}: {e}",
                client.server(),
                client.identity_fingerprint()
            ),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "waiting for the server");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => bail!(
                "startup check: no verified request-key statement from {} within {} ms: {e} (--startup-check-ms 0 skips this check)",
                client.server(),
                wait.as_millis()
            ),
        }
    };
    if let Some(pin) = pin {
        match client.programs() {
            Ok(programs) => match programs.iter().find(|p| p.name == program) {
                Some(p) if p.sha256.eq_ignore_ascii_case(pin) => {}
                Some(p) => bail!(
                    "startup check: the server says program `{program}` is component sha256 {}, not the pinned {pin}: its replies' receipts would be refused",
                    p.sha256
                ),
                None => bail!(
                    "startup check: the server lists no program `{program}` (it lists: {})",
                    programs
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            Err(e) => tracing::warn!(
                error = %e,
                "could not read the server's program list; the receipts still check the pin"
            ),
        }
    }
    Ok(format!(
        "request key {} verified (valid until {})",
        statement.key_id, statement.not_after
    ))
}

/// Runs `cinfer proxy` until killed.
pub fn run(args: &ProxyArgs) -> Result<()> {
    cinfer_log::init("cinfer proxy", cinfer_log::LevelFilter::INFO);
    let mut client = args.server.client()?;
    let pinned = args.pin.expected(&args.program)?;
    if let Some(pin) = &pinned {
        client = client.with_program_pin(&args.program, pin);
    }
    // Its own settings first: a bad one is reported before any wait for the server.
    let api_key_sha256 = match &args.api_key_file {
        None => None,
        Some(path) => {
            let key = std::fs::read_to_string(path)
                .with_context(|| format!("reading the API key file {}", path.display()))?;
            let key = key.trim();
            if key.is_empty() {
                bail!("the API key file {} is empty", path.display());
            }
            Some(Sha256::digest(key.as_bytes()).into())
        }
    };
    let cors_origins = args
        .cors_origins
        .iter()
        .map(|o| {
            HeaderValue::from_str(o)
                .ok()
                .filter(|_| o.starts_with("http://") || o.starts_with("https://"))
                .with_context(|| {
                    format!("--cors-origin {o:?} is not an origin (https://host[:port])")
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let checked = if args.startup_check_ms == 0 {
        "startup checks skipped (--startup-check-ms 0)".to_owned()
    } else {
        startup_check(
            &client,
            &args.program,
            pinned.as_deref(),
            Duration::from_millis(args.startup_check_ms),
        )?
    };
    if !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "not a loopback address: the proxy handles prompts and replies in cleartext; anyone who reaches it reads them"
        );
    }
    let client = Arc::new(client);
    let read_timeout = Duration::from_millis(args.read_timeout_ms);
    let state = Arc::new(State {
        client,
        program: args.program.clone(),
        pin: pinned.clone(),
        read_timeout,
        metrics: ProxyMetrics::default(),
        api_key_sha256,
    });
    // Trailing slashes are trimmed before routing (`/v1/models/` is `/v1/models`).
    let app = NormalizePathLayer::trim_trailing_slash().layer(router(state.clone(), &cors_origins));
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
        tracing::info!(
            "cinfer proxy: listening on http://{local}/v1 (OpenAI-compatible), server {}, keyservers: {}, program {} {}; {checked}",
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
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                drop(stream);
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(
                        max_connections,
                        "connections open at --max-connections: closing new ones at once"
                    );
                    last_warning = Some(Instant::now());
                }
                continue;
            };
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _permit = permit;
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
