//! The HTTP API (HTTP/1.1) — see `docs/protocol.md`:
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/requests?program=NAME` (body: sealed request) | 200 `application/vnd.cinfer.reply-stream`, chunked records `type u8 \| len u32 BE \| bytes` (1 reply frame, 2 receipt, 3 `{"error"}`); 400 no/unknown program or refused by the loader; 429 loader busy, 503 loader shutting down (both with `Retry-After`); 408 body not received within `body-timeout`; 413 body too large; 503 no attested loader within `ready-timeout`; 504 no first reply within `request-timeout` |
//! | `GET /v1/request-key` | the first reachable keyserver's answer, verbatim |
//! | `GET /v1/request-keys` | `{"statements": [every reachable keyserver's signed statement, verbatim]}` (k-of-n keyservers: clients verify k of them); 502 when none answered |
//! | `GET /v1/models`, `GET /v1/programs` | `{"models": [ids]}`, `{"programs": [{name, sha256, world}]}` |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | liveness; 200 only with an attested loader holding keys; Prometheus text |
//!
//! Anything else is 404, or 405 for a known path with the wrong method.
//!
//! The response head of `POST /v1/requests` is sent when the loader's first
//! answer arrives: a `Refused` (always before any `Reply`) becomes a 400 with the
//! loader's reason (429 or 503 when the loader is busy or shutting down), so a client sees a refusal as a status, not as a stream.
//! From the first `Reply` on, records are written as frames arrive; a failure
//! after that (loader lost, deadline) ends the stream with an error record.

use crate::config::{Config, ConfigError};
use crate::keyclient::KeyserverClient;
use crate::link::{Event, Link, LinkStatus, Ticket};
use crate::metrics::{Metrics, RequestOutcome};
use axum::Router;
use axum::extract::State as Shared;
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tower_http::trace::TraceLayer;
use tower_service::Service as _;
use tracing::Instrument;

/// Content type of the reply stream.
pub const REPLY_STREAM_TYPE: &str = "application/vnd.cinfer.reply-stream";
/// Record types of the reply stream.
pub const RECORD_FRAME: u8 = 1;
/// The receipt (last record of a completed request).
pub const RECORD_RECEIPT: u8 = 2;
/// `{"error": …}` (last record of a failed stream).
pub const RECORD_ERROR: u8 = 3;
/// Records buffered per response before the pump waits for the client.
const STREAM_BUFFER: usize = 16;

/// A response body: whole, or records from a channel as they come.
#[derive(Debug)]
pub enum ApiBody {
    /// A complete body (taken when sent).
    Full(Option<Bytes>),
    /// Chunks from a request's pump; ends when the pump drops its sender.
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ApiBody::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ApiBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ApiBody::Full(None) => SizeHint::with_exact(0),
            ApiBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// One reply-stream record.
pub fn record(kind: u8, bytes: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + bytes.len());
    out.push(kind);
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
    Bytes::from(out)
}

fn error_json(reason: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": reason })).unwrap_or_default()
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ApiBody> {
    let mut resp = Response::new(ApiBody::Full(Some(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<ApiBody> {
    respond(
        status,
        "application/json",
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    )
}

/// How often a request the loader refused as busy (no in-flight place) is
/// submitted again, and the first wait (doubling).
const BUSY_RETRIES: u32 = 4;
const BUSY_BACKOFF: Duration = Duration::from_millis(10);

/// Whether the loader refused for want of an in-flight place (`host/src/serve.rs`).
fn is_in_flight_busy(reason: &str) -> bool {
    reason.starts_with("busy:") && reason.contains("in flight")
}

/// The status of a loader's refusal, and its `Retry-After` when trying again
/// later can succeed. The channel carries a refusal's reason as text only (a
/// code would change the trusted loader); the two transient ones start with
/// fixed words (`host/src/serve.rs`, `host/src/replay.rs`): `busy:` (every
/// in-flight slot, or the replay window, is full) is 429, `shutting down:` is
/// 503. Every other refusal is about the request itself: 400.
fn refusal_status(reason: &str) -> (StatusCode, Option<&'static str>) {
    if reason.starts_with("busy:") {
        (StatusCode::TOO_MANY_REQUESTS, Some("1"))
    } else if reason.starts_with("shutting down:") {
        (StatusCode::SERVICE_UNAVAILABLE, Some("1"))
    } else {
        (StatusCode::BAD_REQUEST, None)
    }
}

/// Counts and logs a request answered with an error before (or instead of)
/// streaming, and builds that answer.
fn not_served(
    metrics: &Metrics,
    started: Instant,
    outcome: RequestOutcome,
    status: StatusCode,
    reason: &str,
) -> Response<ApiBody> {
    metrics.request(outcome, started.elapsed());
    tracing::info!(
        status = status.as_u16(),
        outcome = outcome.as_str(),
        duration_ms = started.elapsed().as_millis() as u64,
        reason,
        "request not served"
    );
    error(status, reason)
}

fn error(status: StatusCode, reason: &str) -> Response<ApiBody> {
    respond(status, "application/json", Bytes::from(error_json(reason)))
}

/// The 405 of a route that takes only GET.
async fn get_only() -> Response<ApiBody> {
    method_not_allowed("GET")
}

/// The 405 of a route that takes only POST.
async fn post_only() -> Response<ApiBody> {
    method_not_allowed("POST")
}

fn method_not_allowed(allow: &'static str) -> Response<ApiBody> {
    let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

/// `%XX`-decodes a query value (`+` is a space); `None` if malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The `program` query parameter.
/// Why no loader is ready: each loader's last error (named by its endpoint
/// when there are several), `; `-separated.
fn not_ready_reasons(statuses: &[(String, LinkStatus)]) -> String {
    statuses
        .iter()
        .map(|(endpoint, s)| {
            let why = s.last_error.clone().unwrap_or_else(|| "not ready".into());
            if statuses.len() == 1 {
                why
            } else {
                format!("{endpoint}: {why}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn program_param(query: Option<&str>) -> Result<String, &'static str> {
    let value = query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "program")
        .map(|(_, v)| v)
        .ok_or("missing ?program=NAME")?;
    let name = percent_decode(value).ok_or("malformed program name")?;
    if name.is_empty()
        || name.len() > cinfer_channel::Submit::MAX_PROGRAM_LEN
        || name.chars().any(char::is_control)
    {
        return Err("malformed program name");
    }
    Ok(name)
}

/// The inference server; cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Server {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<Config>,
    /// One link per configured loader, each attested on its own.
    links: Vec<Arc<Link>>,
    /// Notified when any link's status changes.
    changed: Arc<tokio::sync::Notify>,
    keyservers: KeyserverClient,
    metrics: Arc<Metrics>,
    /// Places on the loaders (`max-in-flight` each, all loaders together),
    /// handed out in arrival order; a request then goes to the ready loader
    /// with the fewest requests running.
    places: Arc<Semaphore>,
    /// TLS on the listener, when configured.
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Server {
    /// Checks `config` and builds the server; nothing runs until [`serve`].
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let config = Arc::new(config.check()?);
        let keyservers = KeyserverClient::new(
            config.keyserver_timeout,
            config.max_frame_bytes as usize,
            cinfer_tls::client_config(config.keyserver_ca.as_deref())
                .map_err(|e| ConfigError::Tls(e.0))?,
        );
        let metrics = Arc::new(Metrics::default());
        let changed = Arc::new(tokio::sync::Notify::new());
        let links = config
            .loaders
            .iter()
            .map(|endpoint| {
                Arc::new(Link::new(
                    config.clone(),
                    endpoint.clone(),
                    keyservers.clone(),
                    metrics.clone(),
                    changed.clone(),
                ))
            })
            .collect::<Vec<_>>();
        let tls = match &config.tls {
            Some(id) => Some(
                id.server_config()
                    .map_err(|e| crate::config::ConfigError::Tls(e.0))?,
            ),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                tls,
                places: Arc::new(Semaphore::new(
                    config.max_in_flight.saturating_mul(links.len().max(1)),
                )),
                config,
                links,
                changed,
                keyservers,
                metrics,
            }),
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The first loader's link (status, for tests and operators).
    pub fn link(&self) -> &Arc<Link> {
        &self.inner.links[0]
    }

    /// Every loader's link, in configuration order.
    pub fn links(&self) -> &[Arc<Link>] {
        &self.inner.links
    }

    /// The metrics in Prometheus text.
    pub fn metrics_text(&self) -> String {
        let loaders: Vec<crate::metrics::LoaderState> = self
            .inner
            .links
            .iter()
            .map(|l| {
                let status = l.status();
                crate::metrics::LoaderState {
                    endpoint: l.endpoint().to_string(),
                    connected: status.connected,
                    ready: status.ready(),
                    running: l.in_flight(),
                    ready_since: status.ready_since,
                }
            })
            .collect();
        self.inner.metrics.render(&loaders)
    }

    /// The status of a ready loader (else of the first): what `/v1/models`
    /// and `/v1/programs` show.
    fn shown_status(&self) -> LinkStatus {
        let statuses: Vec<LinkStatus> = self.inner.links.iter().map(|l| l.status()).collect();
        statuses
            .iter()
            .find(|s| s.ready())
            .or(statuses.first())
            .cloned()
            .unwrap_or_default()
    }

    /// A ready loader, waiting at most `timeout` for one: of the ready ones,
    /// the one with the fewest requests running, and not `avoid` while
    /// another is ready. Its link, connection and status, or why none.
    async fn pick(
        &self,
        timeout: Duration,
        avoid: Option<&Arc<Link>>,
    ) -> Result<(Arc<Link>, Arc<crate::link::Conn>, LinkStatus), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so a change in between is not missed.
            let changed = self.inner.changed.notified();
            let mut ready: Vec<(Arc<Link>, Arc<crate::link::Conn>, LinkStatus)> = self
                .inner
                .links
                .iter()
                .filter_map(|l| {
                    let status = l.status();
                    status.conn.clone().map(|c| (l.clone(), c, status))
                })
                .collect();
            if ready.len() > 1
                && let Some(avoid) = avoid
            {
                ready.retain(|(l, _, _)| !Arc::ptr_eq(l, avoid));
            }
            if let Some(best) = ready.into_iter().min_by_key(|(l, _, _)| l.in_flight()) {
                return Ok(best);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(not_ready_reasons(&self.link_statuses()));
            }
        }
    }

    /// Every loader's endpoint and status, in configuration order.
    fn link_statuses(&self) -> Vec<(String, LinkStatus)> {
        self.inner
            .links
            .iter()
            .map(|l| (l.endpoint().to_string(), l.status()))
            .collect()
    }

    /// The HTTP API's routes (axum) with request tracing (tower-http).
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/v1/requests",
                post(
                    |Shared(s): Shared<Server>, req: axum::extract::Request| async move {
                        s.inference(req).await
                    },
                )
                .fallback(post_only),
            )
            .route(
                "/v1/request-key",
                get(|Shared(s): Shared<Server>| async move { s.request_key().await })
                    .fallback(get_only),
            )
            .route(
                "/v1/request-keys",
                get(|Shared(s): Shared<Server>| async move { s.request_keys().await })
                    .fallback(get_only),
            )
            .route(
                "/v1/models",
                get(|Shared(s): Shared<Server>| async move {
                    let models = s.shown_status().models;
                    json(StatusCode::OK, &serde_json::json!({ "models": *models }))
                })
                .fallback(get_only),
            )
            .route(
                "/v1/programs",
                get(|Shared(s): Shared<Server>| async move {
                    let programs = s.shown_status().programs.unwrap_or_default();
                    json(
                        StatusCode::OK,
                        &serde_json::json!({ "programs": *programs }),
                    )
                })
                .fallback(get_only),
            )
            .route(
                "/healthz",
                get(|| async { json(StatusCode::OK, &serde_json::json!({"status": "ok"})) })
                    .fallback(get_only),
            )
            .route(
                "/readyz",
                get(|Shared(s): Shared<Server>| async move { s.readyz() }).fallback(get_only),
            )
            .route(
                "/metrics",
                get(|Shared(s): Shared<Server>| async move {
                    respond(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        Bytes::from(s.metrics_text()),
                    )
                })
                .fallback(get_only),
            )
            .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
            .layer(TraceLayer::new_for_http())
            .with_state(self.clone())
    }

    /// Answers one request (what a connection's service does).
    pub async fn handle<B>(&self, req: Request<B>) -> Response<axum::body::Body>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self.router().call(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    /// `GET /readyz`: 200 while a loader is attested and holds keys; each
    /// loader's state either way.
    fn readyz(&self) -> Response<ApiBody> {
        let statuses = self.link_statuses();
        let loaders: Vec<serde_json::Value> = statuses
            .iter()
            .map(|(endpoint, s)| {
                serde_json::json!({
                    "loader": endpoint,
                    "ready": s.ready(),
                    "connected": s.connected,
                    "error": if s.ready() { None } else { s.last_error.clone() },
                })
            })
            .collect();
        if statuses.iter().any(|(_, s)| s.ready()) {
            json(
                StatusCode::OK,
                &serde_json::json!({"status": "ready", "loaders": loaders}),
            )
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({
                    "error": format!("no attested loader: {}", not_ready_reasons(&statuses)),
                    "loader_connected": statuses.iter().any(|(_, s)| s.connected),
                    "loaders": loaders,
                }),
            )
        }
    }

    /// Every keyserver's signed request-key statement: the client, not this
    /// untrusted server, decides whether enough of them agree.
    async fn request_keys(&self) -> Response<ApiBody> {
        let mut statements = Vec::new();
        let mut errors = Vec::new();
        for ks in &self.inner.config.keyservers {
            match self.inner.keyservers.request_key(ks).await {
                Ok(r) if r.status == StatusCode::OK => {
                    match serde_json::from_slice::<serde_json::Value>(&r.body) {
                        Ok(v) => statements.push(v),
                        Err(_) => errors.push(format!("{ks}: not JSON")),
                    }
                }
                Ok(r) => errors.push(format!("{ks}: status {}", r.status.as_u16())),
                Err(e) => errors.push(format!("{ks}: {e}")),
            }
        }
        if statements.is_empty() {
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("no keyserver answered: {}", errors.join("; ")),
            );
        }
        for e in &errors {
            tracing::warn!(error = %e, "request-keys: a keyserver did not answer");
        }
        json(
            StatusCode::OK,
            &serde_json::json!({ "statements": statements }),
        )
    }

    async fn request_key(&self) -> Response<ApiBody> {
        let mut first_answer = None;
        let mut errors = Vec::new();
        for ks in &self.inner.config.keyservers {
            match self.inner.keyservers.request_key(ks).await {
                Ok(r) if r.status == StatusCode::OK => {
                    first_answer = Some(r);
                    break;
                }
                Ok(r) => {
                    tracing::warn!(keyserver = %ks, status = r.status.as_u16(), "request-key: keyserver answered an error");
                    first_answer.get_or_insert(r);
                }
                Err(e) => {
                    tracing::warn!(keyserver = %ks, error = %e, "request-key: keyserver unreachable");
                    errors.push(e.to_string());
                }
            }
        }
        match first_answer {
            Some(r) => {
                let mut resp = Response::new(ApiBody::Full(Some(r.body)));
                *resp.status_mut() = r.status;
                if let Some(ct) = r.content_type {
                    resp.headers_mut().insert(CONTENT_TYPE, ct);
                }
                resp
            }
            None => error(
                StatusCode::BAD_GATEWAY,
                &format!("no keyserver reachable: {}", errors.join("; ")),
            ),
        }
    }

    /// Reads a body of at most `max-request-bytes` within `body-timeout-ms`.
    async fn read_body<B>(
        &self,
        req: Request<B>,
    ) -> Result<Bytes, (StatusCode, RequestOutcome, String)>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let max = self.inner.config.max_request_bytes;
        let too_large = || {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                RequestOutcome::TooLarge,
                format!("request body larger than {max} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return Err(too_large());
        }
        let timeout = self.inner.config.body_timeout;
        match tokio::time::timeout(timeout, Limited::new(req.into_body(), max).collect()).await {
            // What was read so far is dropped here; the connection closes
            // after the 408 (hyper does not read the rest of a body nobody took).
            Err(_) => Err((
                StatusCode::REQUEST_TIMEOUT,
                RequestOutcome::BadRequest,
                format!(
                    "request body not received within {} ms",
                    timeout.as_millis()
                ),
            )),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
            Ok(Err(_)) => Err((
                StatusCode::BAD_REQUEST,
                RequestOutcome::BadRequest,
                "reading the request body".into(),
            )),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    async fn inference<B>(&self, req: Request<B>) -> Response<ApiBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let metrics = &self.inner.metrics;
        let in_flight = metrics.in_flight();
        let finish = |outcome: RequestOutcome, status: StatusCode, reason: &str| {
            not_served(metrics, started, outcome, status, reason)
        };
        let program = match program_param(req.uri().query()) {
            Ok(p) => p,
            Err(reason) => {
                return finish(RequestOutcome::BadRequest, StatusCode::BAD_REQUEST, reason);
            }
        };
        let body = match self.read_body(req).await {
            Ok(b) => b,
            Err((status, outcome, reason)) => {
                let mut resp = finish(outcome, status, &reason);
                if status == StatusCode::REQUEST_TIMEOUT {
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                return resp;
            }
        };
        let deadline = tokio::time::Instant::now() + self.inner.config.request_timeout;

        let (link, conn, status) = match self.pick(self.inner.config.ready_timeout, None).await {
            Ok(c) => c,
            Err(reason) => {
                return finish(
                    RequestOutcome::Unavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("no attested loader available: {reason}"),
                );
            }
        };
        if let Some(programs) = &status.programs
            && !programs.iter().any(|p| p.name == program)
        {
            return finish(
                RequestOutcome::BadRequest,
                StatusCode::BAD_REQUEST,
                &format!("unknown program {program:?}"),
            );
        }
        let (place, waited) = match self.place(deadline).await {
            Ok(p) => p,
            Err((status, outcome, reason)) => {
                let mut resp = finish(outcome, status, &reason);
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                return resp;
            }
        };
        // A request that waited in the queue takes a loader as they are now
        // (connections may have been re-established meanwhile).
        let (link, conn) = if waited {
            match self.pick(self.inner.config.ready_timeout, None).await {
                Ok((l, c, _)) => (l, c),
                Err(reason) => {
                    return finish(
                        RequestOutcome::Unavailable,
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("no attested loader available: {reason}"),
                    );
                }
            }
        } else {
            (link, conn)
        };
        let id = link.next_id();
        let span = tracing::info_span!("request", request_id = id, program = %program);
        let run = Submitted {
            server: self,
            link,
            conn,
            id,
            program: &program,
            body,
            deadline,
            started,
            in_flight: (in_flight, place),
            span: span.clone(),
        };
        run.run().instrument(span).await
    }
}

impl Server {
    /// A place among the loader's `max-in-flight`, and whether the request had
    /// to wait for it (in arrival order, behind at most `max-queued` others,
    /// until its deadline); else the refusal: 429 when the queue is full, 503
    /// when no place came in time (both with `Retry-After`).
    async fn place(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<(OwnedSemaphorePermit, bool), (StatusCode, RequestOutcome, String)> {
        let places = self.inner.places.clone();
        if let Ok(p) = places.clone().try_acquire_owned() {
            self.inner.metrics.queue_wait(Duration::ZERO);
            return Ok((p, false));
        }
        let waiting = Instant::now();
        let config = &self.inner.config;
        let Some(_queued) = self.inner.metrics.enqueue(config.max_queued) else {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                RequestOutcome::Busy,
                format!(
                    "busy: {} requests running on the loader and {} waiting (max-in-flight, max-queued); try again later",
                    config.max_in_flight, config.max_queued
                ),
            ));
        };
        match tokio::time::timeout_at(deadline, places.acquire_owned()).await {
            Ok(Ok(p)) => {
                self.inner.metrics.queue_wait(waiting.elapsed());
                Ok((p, true))
            }
            Ok(Err(_)) | Err(_) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                RequestOutcome::Timeout,
                format!(
                    "no place on the loader within {} ms (request-timeout-ms)",
                    config.request_timeout.as_millis()
                ),
            )),
        }
    }
}

/// A request about to be submitted (runs inside its span).
struct Submitted<'a> {
    server: &'a Server,
    /// The loader it goes to first (another if that one is busy or lost
    /// before the request ran).
    link: Arc<Link>,
    conn: Arc<crate::link::Conn>,
    id: u64,
    program: &'a str,
    body: Bytes,
    deadline: tokio::time::Instant,
    started: Instant,
    /// Held until the request's stream ends: the metric and the loader place.
    in_flight: (crate::metrics::InFlight, OwnedSemaphorePermit),
    span: tracing::Span,
}

impl Submitted<'_> {
    async fn run(self) -> Response<ApiBody> {
        let Submitted {
            server,
            mut link,
            mut conn,
            id,
            program,
            body,
            deadline,
            started,
            in_flight,
            span,
        } = self;
        let metrics = &server.inner.metrics;
        let finish = |outcome: RequestOutcome, status: StatusCode, reason: &str| {
            not_served(metrics, started, outcome, status, reason)
        };
        let request_bytes = body.len();
        let mut id = id;
        let mut busy_retries = 0;
        // Moves to another loader after losing one before the request ran.
        let mut moves = 0;
        let mut running = link.running();
        let (ticket, first) = loop {
            let (ticket, first) = match conn.submit(id, program, body.to_vec()).await {
                Ok(mut ticket) => {
                    tracing::info!(request_bytes, request_id = id, loader = %link.endpoint(), "request submitted");
                    match tokio::time::timeout_at(deadline, ticket.events.recv()).await {
                        Err(_) => {
                            return finish(
                                RequestOutcome::Timeout,
                                StatusCode::GATEWAY_TIMEOUT,
                                &format!(
                                    "no reply within {} ms",
                                    server.inner.config.request_timeout.as_millis()
                                ),
                            );
                        }
                        Ok(None) => (
                            Some(ticket),
                            Event::Lost("the loader connection was lost".into()),
                        ),
                        Ok(Some(e)) => (Some(ticket), e),
                    }
                }
                Err(e) => (None, Event::Lost(e.to_string())),
            };
            // The loader frees a place a moment after its last reply, so a
            // request given that place here may still find it taken there:
            // refused before it ran, it is submitted again, a few times (to
            // another loader when one is ready).
            let busy = matches!(&first, Event::Refused(reason) if is_in_flight_busy(reason));
            if busy && busy_retries < BUSY_RETRIES {
                let backoff = BUSY_BACKOFF * (1 << busy_retries);
                if tokio::time::Instant::now() + backoff < deadline {
                    busy_retries += 1;
                    drop(ticket);
                    tokio::time::sleep(backoff).await;
                    if let Ok((l, c, _)) = server.pick(Duration::ZERO, Some(&link)).await {
                        (link, conn) = (l, c);
                        running = link.running();
                    }
                    id = link.next_id();
                    continue;
                }
            }
            // Lost before any reply: the request never reached a program
            // that answered; another ready loader gets it (each loader has
            // its own replay window, so it runs there once).
            if matches!(first, Event::Lost(_)) && moves < server.inner.links.len() {
                moves += 1;
                drop(ticket);
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let wait = left.min(server.inner.config.ready_timeout);
                if let Ok((l, c, _)) = server.pick(wait, Some(&link)).await {
                    tracing::info!(request_id = id, from = %link.endpoint(), to = %l.endpoint(), "loader lost before the request ran: submitted to another");
                    (link, conn) = (l, c);
                    running = link.running();
                    id = link.next_id();
                    continue;
                }
                break (None, first);
            }
            break (ticket, first);
        };
        drop(body);
        match first {
            Event::Refused(reason) => {
                let (status, retry_after) = refusal_status(&reason);
                let outcome = if status == StatusCode::TOO_MANY_REQUESTS {
                    RequestOutcome::Busy
                } else {
                    RequestOutcome::Refused
                };
                let mut resp = finish(outcome, status, &format!("refused by the loader: {reason}"));
                if let Some(secs) = retry_after {
                    resp.headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from_static(secs));
                }
                resp
            }
            Event::Lost(reason) => finish(
                RequestOutcome::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the loader connection was lost before the request ran: {reason}"),
            ),
            Event::Dropped(reason) => finish(
                RequestOutcome::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                &reason,
            ),
            first @ (Event::Reply(_) | Event::Done(_)) => {
                let Some(ticket) = ticket else {
                    // Replies come only through a ticket.
                    return finish(
                        RequestOutcome::Unavailable,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no loader connection",
                    );
                };
                let (tx, rx) = mpsc::channel(STREAM_BUFFER);
                let pump = Pump {
                    loader: link.endpoint().to_string(),
                    metrics: metrics.clone(),
                    timeout_ms: server.inner.config.request_timeout.as_millis(),
                    deadline,
                    started,
                    tx,
                };
                tokio::spawn(
                    async move {
                        let _in_flight = (in_flight, running);
                        pump.run(first, ticket).await;
                    }
                    .instrument(span),
                );
                let mut resp = Response::new(ApiBody::Stream(rx));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(REPLY_STREAM_TYPE));
                resp
            }
        }
    }
}

/// Longest receipt outcome kept (the loader's words are short; a longer one
/// is cut, never logged whole).
const MAX_OUTCOME: usize = 64;

/// The `outcome` a receipt (`SignedReceipt` JSON: the signed `receipt_json`)
/// states: the loader's account of the run, public like the rest of the
/// receipt. `None` when it does not parse (the client, which verifies the
/// receipt, will refuse it).
fn receipt_outcome(receipt: &[u8]) -> Option<String> {
    let signed: serde_json::Value = serde_json::from_slice(receipt).ok()?;
    let inner: serde_json::Value =
        serde_json::from_str(signed.get("receipt_json")?.as_str()?).ok()?;
    let outcome = inner.get("outcome")?.as_str()?;
    Some(outcome.chars().take(MAX_OUTCOME).collect())
}

/// Moves one request's events into its response body.
struct Pump {
    /// The loader it runs on (its endpoint as configured).
    loader: String,
    metrics: Arc<Metrics>,
    timeout_ms: u128,
    deadline: tokio::time::Instant,
    started: Instant,
    tx: mpsc::Sender<Bytes>,
}

impl Pump {
    async fn run(self, first: Event, mut ticket: Ticket) {
        let mut frames = 0u64;
        let mut reply_bytes = 0u64;
        let mut run_outcome = None;
        let mut next = Some(first);
        let outcome = loop {
            let event = match next.take() {
                Some(e) => e,
                None => {
                    tokio::select! {
                        biased;
                        e = tokio::time::timeout_at(self.deadline, ticket.events.recv()) => match e {
                            Err(_) => {
                                let reason = format!("request timed out after {} ms", self.timeout_ms);
                                let _ = self.tx.send(record(RECORD_ERROR, &error_json(&reason))).await;
                                tracing::warn!(reason, "stream failed");
                                break RequestOutcome::StreamError;
                            }
                            Ok(None) => Event::Lost("the loader connection was lost".into()),
                            Ok(Some(e)) => e,
                        },
                        () = self.tx.closed() => break RequestOutcome::ClientGone,
                    }
                }
            };
            let (rec, outcome) = match event {
                Event::Reply(frame) => {
                    if frames == 0 {
                        self.metrics.first_frame(self.started.elapsed());
                    }
                    frames += 1;
                    reply_bytes += frame.len() as u64;
                    self.metrics.reply_frame(frame.len());
                    (record(RECORD_FRAME, &frame), None)
                }
                Event::Done(receipt) => {
                    run_outcome = receipt_outcome(&receipt);
                    let outcome = match run_outcome.as_deref() {
                        None | Some("completed") => RequestOutcome::Completed,
                        Some(_) => RequestOutcome::RunFailed,
                    };
                    (record(RECORD_RECEIPT, &receipt), Some(outcome))
                }
                Event::Refused(reason) => {
                    tracing::warn!(reason, "refused after the stream started");
                    (
                        record(
                            RECORD_ERROR,
                            &error_json(&format!("refused by the loader: {reason}")),
                        ),
                        Some(RequestOutcome::StreamError),
                    )
                }
                Event::Dropped(reason) => {
                    tracing::warn!(reason, "stream dropped");
                    (
                        record(RECORD_ERROR, &error_json(&reason)),
                        Some(RequestOutcome::StreamError),
                    )
                }
                Event::Lost(reason) => {
                    tracing::warn!(reason, "stream failed: loader connection lost");
                    (
                        record(
                            RECORD_ERROR,
                            &error_json(&format!("the loader connection was lost: {reason}")),
                        ),
                        Some(RequestOutcome::StreamError),
                    )
                }
            };
            if self.tx.send(rec).await.is_err() {
                break RequestOutcome::ClientGone;
            }
            if let Some(o) = outcome {
                break o;
            }
        };
        let took = self.started.elapsed();
        self.metrics.request(outcome, took);
        if let Some(run) = &run_outcome {
            self.metrics.loader_run(&self.loader, run, took);
        }
        if outcome == RequestOutcome::Completed {
            self.metrics.reply_frames_of_request(frames);
        }
        tracing::info!(
            outcome = outcome.as_str(),
            run_outcome,
            reply_frames = frames,
            reply_bytes,
            duration_ms = took.as_millis() as u64,
            "request finished"
        );
    }
}

/// Logs refused connections at most once a second (a flood must not flood the log).
#[derive(Debug)]
struct RefusalLog {
    last: Option<Instant>,
    since_last: u64,
}

impl RefusalLog {
    fn refused(&mut self, total: u64, max_connections: usize) {
        self.since_last += 1;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(
                max_connections,
                refused = self.since_last,
                refused_total = total,
                "connections closed at once: max-connections are open"
            );
            self.last = Some(Instant::now());
            self.since_last = 0;
        }
    }
}
/// Serves HTTP/1.1 on one accepted connection (plain or TLS) until it
/// closes, or shuts it down gracefully when `stop` turns true.
async fn serve_connection<S>(
    server: Server,
    stream: S,
    header_timeout: Duration,
    stop: &mut watch::Receiver<bool>,
    peer: std::net::SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let router = server.router();
    let service = service_fn(move |req: Request<Incoming>| {
        let mut router = router.clone();
        async move { router.call(req).await }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(crate::config::MAX_HTTP_BUF_BYTES);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection from {peer}: {e}");
    }
}

/// Serves HTTP/1.1 on `listener` and runs the loader link until `shutdown`
/// completes; then stops accepting, lets connections in progress finish for
/// up to `grace`, and stops the link.
///
/// At most `max-connections` client connections are open at once: one
/// accepted beyond that is closed at once (the client sees the connection
/// closed, not a queue). Each connection must send a request's headers within
/// `header-timeout-ms` (hyper closes it otherwise, also when it sits idle
/// between requests) and its body within `body-timeout-ms` (408).
pub async fn serve(
    listener: TcpListener,
    server: Server,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    tokio::pin!(shutdown);
    let links: Vec<_> = server
        .inner
        .links
        .iter()
        .map(|l| tokio::spawn(l.clone().run()))
        .collect();
    let config = server.inner.config.clone();
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut refusals = RefusalLog {
        last: None,
        since_last: 0,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            let total = server.inner.metrics.connection_refused();
            refusals.refused(total, config.max_connections);
            continue;
        };
        let open = server.inner.metrics.connection();
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let mut stop = stop_rx.clone();
        let header_timeout = config.header_timeout;
        connections.spawn(async move {
            let _held = (permit, open);
            match server.inner.tls.clone() {
                None => serve_connection(server, stream, header_timeout, &mut stop, peer).await,
                Some(tls) => {
                    // The handshake gets the header timeout too.
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            serve_connection(server, tls, header_timeout, &mut stop, peer).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake from {peer}: {e}"),
                        Err(_) => tracing::debug!("TLS handshake from {peer}: timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!(
        connections = connections.len(),
        grace_ms = grace.as_millis() as u64,
        "shutting down: no new connections"
    );
    let _ = stop_tx.send(true);
    if tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "grace period over: closing connections"
        );
    }
    connections.abort_all();
    for link in links {
        link.abort();
        let _ = link.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_says_how_the_run_ended() {
        let signed = |outcome: &str| {
            let inner = serde_json::json!({"outcome": outcome, "reply_frames": 1}).to_string();
            serde_json::json!({"receipt_json": inner, "signature": "00"}).to_string()
        };
        assert_eq!(
            receipt_outcome(signed("completed").as_bytes()).as_deref(),
            Some("completed")
        );
        assert_eq!(
            receipt_outcome(signed("program-failed").as_bytes()).as_deref(),
            Some("program-failed")
        );
        assert_eq!(
            receipt_outcome(signed(&"x".repeat(500)).as_bytes()).map(|o| o.len()),
            Some(MAX_OUTCOME)
        );
        assert_eq!(receipt_outcome(br#"{"receipt":"fake"}"#), None);
        assert_eq!(receipt_outcome(b"not json"), None);
    }
}
