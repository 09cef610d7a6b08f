//! The link to the trusted loader: one connection, attestation through every
//! keyserver, and requests multiplexed over it.
//!
//! The link task connects (retrying with capped exponential backoff), reads
//! `Hello`, answers its challenge with `Auth` (signed with the configured
//! `channel-key`; the loader serves only servers its configuration lists) and
//! waits for `Authenticated`, then for each configured keyserver: `POST /v1/nonce` →
//! `AttestRequest(nonce)` → `Evidence` → `POST /v1/attest` (evidence verbatim) →
//! `KeyRelease` (the keyserver's body verbatim) → `KeysInstalled`. The loader is
//! *ready* once it holds a request key after a round: one keyserver's release,
//! or (k-of-n keyservers) the shares of k keyservers; if not, the round is
//! retried after a backoff, and `/readyz` says which keyservers failed and which
//! split keys still wait for shares. When the connection drops, every request in flight
//! gets [`Event::Lost`], the link reconnects and attests again (a restarted
//! loader holds no keys).
//!
//! On one connection four futures run together: a writer draining an mpsc of
//! encoded frames, a reader dispatching `Reply`/`Done`/`Refused` by request id
//! to per-request channels (and attestation answers to the attester), the
//! attester, and a pinger that sends `Ping` every third of the loader's idle
//! timeout (from `Hello`), so an idle but healthy link is not dropped. The
//! first to end ends the connection.

use crate::config::{Config, MAX_BACKOFF};
use crate::frames::read_frame;
use crate::keyclient::KeyserverClient;
use crate::metrics::{AttestOutcome, Metrics};
use cinfer_channel::{Endpoint, Frame, Kind, Submit, encode, split_request_id};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// A program the loader serves, from its `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    /// Policy name (what `?program=` names).
    #[serde(default)]
    pub name: String,
    /// Component digest, hex.
    #[serde(default)]
    pub sha256: String,
    /// Capability world.
    #[serde(default)]
    pub world: String,
}

#[derive(Debug, Deserialize)]
struct Hello {
    #[serde(default)]
    loader: Option<String>,
    /// Absent from loaders that do not list programs yet: then the server does
    /// not check names and the loader refuses unknown ones.
    #[serde(default)]
    programs: Option<Vec<Program>>,
    /// What the server must sign before it is served (hex); absent from a
    /// loader that serves unauthenticated peers (development).
    #[serde(default)]
    challenge: Option<String>,
    /// The loader drops a peer that sends no complete frame for this long.
    #[serde(default)]
    idle_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Installed {
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    request_keys: Vec<String>,
    /// Split keys still waiting for shares (k-of-n keyservers).
    #[serde(default)]
    waiting: Vec<WaitingKey>,
}

#[derive(Debug, Deserialize)]
struct WaitingKey {
    kind: String,
    id: String,
    have: usize,
    need: usize,
}

/// What the link knows now.
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    /// Connected and `Hello` received.
    pub connected: bool,
    /// The connection requests go to; `Some` exactly when ready (attested, keys held).
    pub conn: Option<Arc<Conn>>,
    /// Programs from `Hello` (`None`: not connected, or the loader does not list them).
    pub programs: Option<Arc<Vec<Program>>>,
    /// Model ids from the last `KeysInstalled`.
    pub models: Arc<Vec<String>>,
    /// Why the link is not ready, for `/readyz` and 503 answers (no payloads).
    pub last_error: Option<String>,
    /// When it last became ready; `None` while it is not.
    pub ready_since: Option<std::time::SystemTime>,
}

impl LinkStatus {
    /// Attested, with keys installed.
    pub fn ready(&self) -> bool {
        self.conn.is_some()
    }
}

/// What a request hears from the loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// One sealed reply frame.
    Reply(Vec<u8>),
    /// The request finished; the receipt JSON.
    Done(Vec<u8>),
    /// The loader refused it before it ran; its reason.
    Refused(String),
    /// The loader connection was lost; why.
    Lost(String),
    /// The server dropped the request (its client read too slowly); why.
    Dropped(String),
}

type Pending = HashMap<u64, mpsc::Sender<Event>>;

/// Reply frames buffered for one request whose HTTP client reads too slowly;
/// past this the request is dropped (its stream ends with an error record
/// saying so) rather than buffered without bound. One more slot is kept for
/// the request's last event (`Done`, `Refused` or that error), so it is never
/// lost to a full buffer.
const MAX_BUFFERED_FRAMES: usize = 1024;

/// One loader connection: where frames are written and who waits for answers.
#[derive(Debug)]
pub struct Conn {
    writer: mpsc::Sender<Vec<u8>>,
    /// `None` once the connection is gone.
    pending: Mutex<Option<Pending>>,
    max_frame: u32,
}

/// A submitted request: its id and its answers. Dropping it forgets the id.
#[derive(Debug)]
pub struct Ticket {
    /// The request id on the channel.
    pub id: u64,
    /// `Reply`…`Done`, `Refused`, `Lost` or `Dropped`.
    pub events: mpsc::Receiver<Event>,
    conn: Arc<Conn>,
}

impl Drop for Ticket {
    /// Forgets the id; a request still running (no last event yet: its client
    /// went away, or it was dropped as too slow) is cancelled on the loader.
    fn drop(&mut self) {
        let unfinished = self
            .conn
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.as_mut().map(|p| p.remove(&self.id).is_some()))
            .unwrap_or(false);
        if unfinished {
            self.conn.cancel(self.id);
        }
    }
}

/// Why a request could not be submitted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The connection went away.
    #[error("the loader connection was lost")]
    Lost,
    /// The frame could not be built (too large).
    #[error("{0}")]
    Frame(#[from] cinfer_channel::FrameError),
}

impl Conn {
    fn new(writer: mpsc::Sender<Vec<u8>>, max_frame: u32) -> Self {
        Self {
            writer,
            pending: Mutex::new(Some(HashMap::new())),
            max_frame,
        }
    }

    /// Asks the loader to stop request `id` (best effort: a full write queue
    /// drops the Cancel, and the request runs to its end).
    fn cancel(&self, id: u64) {
        match encode(Kind::Cancel, &id.to_be_bytes(), self.max_frame) {
            Ok(bytes) => {
                if self.writer.try_send(bytes).is_err() {
                    tracing::debug!(request_id = id, "cancel not sent (connection busy or gone)");
                }
            }
            Err(e) => tracing::warn!(request_id = id, error = %e, "cancel frame"),
        }
    }

    async fn send(&self, kind: Kind, payload: &[u8]) -> Result<(), SubmitError> {
        let bytes = encode(kind, payload, self.max_frame)?;
        self.writer.send(bytes).await.map_err(|_| SubmitError::Lost)
    }

    /// Registers `id`, then sends its `Submit`.
    pub async fn submit(
        self: &Arc<Self>,
        id: u64,
        program: &str,
        sealed: Vec<u8>,
    ) -> Result<Ticket, SubmitError> {
        let (tx, rx) = mpsc::channel(MAX_BUFFERED_FRAMES + 1);
        {
            let mut pending = self.pending.lock().map_err(|_| SubmitError::Lost)?;
            pending.as_mut().ok_or(SubmitError::Lost)?.insert(id, tx);
        }
        let ticket = Ticket {
            id,
            events: rx,
            conn: self.clone(),
        };
        let payload = Submit {
            request_id: id,
            program: program.to_owned(),
            sealed,
        }
        .encode();
        self.send(Kind::Submit, &payload).await?;
        Ok(ticket)
    }

    /// Routes a request-scoped frame; `false` if it is malformed.
    fn dispatch(&self, kind: Kind, payload: &[u8]) -> bool {
        let Some((id, rest)) = split_request_id(payload) else {
            return false;
        };
        let event = match kind {
            Kind::Reply => Event::Reply(rest.to_vec()),
            Kind::Done => Event::Done(rest.to_vec()),
            _ => Event::Refused(error_text(rest)),
        };
        let last = !matches!(event, Event::Reply(_));
        let Ok(mut pending) = self.pending.lock() else {
            return true;
        };
        let Some(pending) = pending.as_mut() else {
            return true;
        };
        let delivered = if last {
            pending.remove(&id).map(|tx| tx.try_send(event).is_ok())
        } else {
            match pending.get(&id) {
                Some(tx) if tx.capacity() <= 1 => {
                    // The last slot is the terminal event's: end the stream.
                    let _ = tx.try_send(Event::Dropped(format!(
                        "the client read too slowly: {MAX_BUFFERED_FRAMES} reply frames buffered, request dropped"
                    )));
                    pending.remove(&id);
                    tracing::warn!(
                        request_id = id,
                        "client too slow: {MAX_BUFFERED_FRAMES} frames buffered, request dropped"
                    );
                    self.cancel(id);
                    Some(false)
                }
                Some(tx) => Some(tx.try_send(event).is_ok()),
                None => None,
            }
        };
        if delivered != Some(true) {
            // The client went away (or the id is unknown): nothing to do.
            tracing::debug!(request_id = id, kind = ?kind, "frame for no waiting request");
        }
        true
    }

    /// Fails every waiting request and refuses new ones.
    fn close(&self, reason: &str) -> usize {
        let taken = self.pending.lock().ok().and_then(|mut p| p.take());
        let n = taken.as_ref().map_or(0, HashMap::len);
        for (_, tx) in taken.into_iter().flatten() {
            let _ = tx.try_send(Event::Lost(reason.to_owned()));
        }
        n
    }
}

/// `{"error": "…"}` → its text (printable, truncated); anything else → a placeholder.
fn error_text(json: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .map(|s| s.chars().filter(|c| !c.is_control()).take(200).collect())
        .unwrap_or_else(|| "(no reason given)".into())
}

/// Shared by the link task and the HTTP handlers.
#[derive(Debug)]
pub struct Link {
    config: Arc<Config>,
    /// The loader this link connects to.
    endpoint: Endpoint,
    /// Notified on every status change (the server waits on it for any of
    /// its loaders to become ready).
    changed: Arc<tokio::sync::Notify>,
    /// Requests this server has running on this loader now.
    in_flight: std::sync::atomic::AtomicUsize,
    keyservers: KeyserverClient,
    metrics: Arc<Metrics>,
    status: watch::Sender<LinkStatus>,
    next_id: AtomicU64,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(endpoint: &Endpoint) -> std::io::Result<Box<dyn Stream>> {
    Ok(match endpoint {
        Endpoint::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr.as_str()).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        #[cfg(unix)]
        Endpoint::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        #[cfg(not(unix))]
        Endpoint::Unix(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "unix sockets are not available on this platform",
            ));
        }
    })
}

/// A request counted on its loader ([`Link::running`]).
#[derive(Debug)]
pub struct RunningGuard(Arc<Link>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why one attestation round failed.
enum AttestError {
    /// The keyserver refused or could not be reached: try the next one, later again.
    Keyserver(String),
    /// The loader answered with an `Error` frame: the connection goes on.
    LoaderRefused(String),
    /// The loader broke the exchange (timeout, wrong frame, gone): reconnect.
    Loader(String),
}

impl Link {
    /// A link to `endpoint` (one of `config`'s loaders; nothing runs until
    /// [`Link::run`]); `changed` is notified on each status change.
    pub fn new(
        config: Arc<Config>,
        endpoint: Endpoint,
        keyservers: KeyserverClient,
        metrics: Arc<Metrics>,
        changed: Arc<tokio::sync::Notify>,
    ) -> Self {
        let (status, _) = watch::channel(LinkStatus {
            last_error: Some("not connected to the loader yet".into()),
            ..LinkStatus::default()
        });
        Self {
            config,
            endpoint,
            changed,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            keyservers,
            metrics,
            status,
            next_id: AtomicU64::new(1),
        }
    }

    /// The loader this link connects to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Requests running on this loader now (through this server).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request on this loader until the guard drops.
    pub fn running(self: &Arc<Self>) -> RunningGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RunningGuard(self.clone())
    }

    fn update(&self, f: impl FnOnce(&mut LinkStatus)) {
        self.status.send_modify(f);
        self.changed.notify_waiters();
    }

    /// The current status.
    pub fn status(&self) -> LinkStatus {
        self.status.borrow().clone()
    }

    /// A fresh request id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn set_error(&self, reason: String) {
        self.update(|s| s.last_error = Some(reason));
    }

    /// Runs forever: connect, attest, serve, reconnect.
    pub async fn run(self: Arc<Self>) {
        let first = self.config.reconnect_backoff;
        let mut backoff = first;
        loop {
            match connect(&self.endpoint).await {
                Ok(stream) => {
                    tracing::info!(loader = %self.endpoint, "connected to the loader");
                    let (reason, handshook) = self.run_connection(stream).await;
                    tracing::warn!(loader = %self.endpoint, %reason, "loader connection closed");
                    self.set_error(format!("loader connection lost: {reason}"));
                    if handshook {
                        backoff = first;
                    }
                }
                Err(e) => {
                    tracing::warn!(loader = %self.endpoint, error = %e, retry_ms = backoff.as_millis() as u64, "cannot connect to the loader");
                    self.set_error(format!(
                        "cannot connect to the loader at {}: {e}",
                        self.endpoint
                    ));
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Serves one connection until it fails; why, and whether `Hello` arrived.
    async fn run_connection(&self, stream: Box<dyn Stream>) -> (String, bool) {
        let max = self.config.max_frame_bytes;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let hello = match tokio::time::timeout(self.config.loader_timeout, read_frame(&mut rd, max))
            .await
        {
            Err(_) => return ("no Hello within loader-timeout".into(), false),
            Ok(Err(e)) => return (format!("reading Hello: {e}"), false),
            Ok(Ok(None)) => return ("closed before Hello".into(), false),
            Ok(Ok(Some(f))) if f.kind != Kind::Hello => {
                return (format!("first frame is {:?}, not Hello", f.kind), false);
            }
            Ok(Ok(Some(f))) => match serde_json::from_slice::<Hello>(&f.payload) {
                Ok(h) => h,
                Err(e) => return (format!("malformed Hello: {e}"), false),
            },
        };
        tracing::info!(
            loader_version = hello.loader.as_deref().unwrap_or("?"),
            programs = hello.programs.as_ref().map(Vec::len),
            authenticates = hello.challenge.is_some(),
            "loader hello"
        );
        if let Err(reason) = self
            .authenticate(hello.challenge.as_deref(), &mut rd, &mut wr)
            .await
        {
            return (reason, false);
        }
        self.update(|s| {
            s.connected = true;
            s.conn = None;
            s.ready_since = None;
            s.programs = hello.programs.map(Arc::new);
            s.models = Arc::default();
            s.last_error = Some("loader connected, attesting".into());
        });

        let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(64);
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<Frame>(4);
        let conn = Arc::new(Conn::new(wtx, max));

        let writer = async move {
            while let Some(bytes) = wrx.recv().await {
                if let Err(e) = async {
                    wr.write_all(&bytes).await?;
                    wr.flush().await
                }
                .await
                {
                    return format!("writing to the loader: {e}");
                }
            }
            "writer closed".to_owned()
        };
        let reader = async {
            loop {
                let frame = match read_frame(&mut rd, max).await {
                    Ok(Some(f)) => f,
                    Ok(None) => return "closed by the loader".to_owned(),
                    Err(e) => return format!("reading from the loader: {e}"),
                };
                match frame.kind {
                    Kind::Reply | Kind::Done | Kind::Refused => {
                        if !conn.dispatch(frame.kind, &frame.payload) {
                            return format!("malformed {:?} frame", frame.kind);
                        }
                    }
                    Kind::Evidence | Kind::KeysInstalled | Kind::Admitted | Kind::Error => {
                        if ctl_tx.try_send(frame).is_err() {
                            return "unsolicited attestation frames".to_owned();
                        }
                    }
                    other => return format!("unexpected {other:?} frame from the loader"),
                }
            }
        };
        // Returns only if the loader broke an attestation exchange.
        let attester = self.attest_all(&conn, &mut ctl_rx);
        let ping_every = hello
            .idle_timeout_ms
            .map(|ms| Duration::from_millis(ms / 3).max(Duration::from_millis(10)));
        let pinger = async {
            let Some(every) = ping_every else {
                return std::future::pending().await;
            };
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if conn.send(Kind::Ping, &[]).await.is_err() {
                    return "writer closed".to_owned();
                }
            }
        };
        let reason = tokio::select! {
            r = writer => r,
            r = reader => r,
            r = attester => r,
            r = pinger => r,
        };
        self.update(|s| {
            s.connected = false;
            s.conn = None;
            s.ready_since = None;
            s.programs = None;
            s.models = Arc::default();
        });
        let failed = conn.close(&reason);
        if failed > 0 {
            tracing::warn!(
                requests = failed,
                "requests in flight failed: loader connection lost"
            );
        }
        (reason, true)
    }

    /// Answers the loader's challenge (if it sent one) with `Auth` signed by the
    /// channel key and waits for `Authenticated`; why not, if it fails.
    async fn authenticate(
        &self,
        challenge: Option<&str>,
        rd: &mut (impl AsyncRead + Unpin),
        wr: &mut (impl AsyncWrite + Unpin),
    ) -> Result<(), String> {
        let Some(challenge) = challenge else {
            tracing::warn!(
                "the loader serves unauthenticated peers (allow-unauthenticated-peers: development only)"
            );
            return Ok(());
        };
        let challenge: [u8; cinfer_channel::CHALLENGE_LEN] = hex::decode(challenge)
            .ok()
            .and_then(|c| c.try_into().ok())
            .ok_or("malformed challenge in Hello")?;
        let key = self.config.channel_key.as_ref().ok_or(
            "the loader serves only servers it lists (server-keys) and no channel-key is configured",
        )?;
        let max = self.config.max_frame_bytes;
        crate::frames::write_frame(wr, Kind::Auth, &key.answer(&challenge).encode(), max)
            .await
            .map_err(|e| format!("sending Auth: {e}"))?;
        match tokio::time::timeout(self.config.loader_timeout, read_frame(rd, max)).await {
            Err(_) => Err("no answer to Auth within loader-timeout".into()),
            Ok(Err(e)) => Err(format!("reading the answer to Auth: {e}")),
            Ok(Ok(None)) => Err("closed by the loader after Auth".into()),
            Ok(Ok(Some(f))) if f.kind == Kind::Authenticated => {
                tracing::info!(key = %key.public_hex(), "authenticated to the loader");
                Ok(())
            }
            Ok(Ok(Some(f))) if f.kind == Kind::Error => Err(format!(
                "the loader refused this server's channel key {}: {}",
                key.public_hex(),
                error_text(&f.payload)
            )),
            Ok(Ok(Some(f))) => Err(format!("expected Authenticated, got {:?}", f.kind)),
        }
    }

    /// Submits every stored program; the loader admits or refuses each under
    /// its policy. A refused program is logged and not served; returns an error
    /// only if the loader broke the exchange.
    async fn upload_all(
        &self,
        conn: &Arc<Conn>,
        ctl: &mut mpsc::Receiver<Frame>,
    ) -> Result<(), String> {
        for p in &self.config.programs {
            let upload = cinfer_channel::ProgramUpload {
                name: p.name.clone(),
                component: p.component.clone(),
                signatures: p.signatures.clone(),
            };
            conn.send(Kind::Program, &upload.encode())
                .await
                .map_err(|_| "connection closed".to_owned())?;
            match self.loader_answer(ctl, Kind::Admitted).await {
                Ok(info) => {
                    let info: Program = serde_json::from_slice(&info)
                        .map_err(|e| format!("malformed Admitted: {e}"))?;
                    tracing::info!(program = %info.name, sha256 = %info.sha256, world = %info.world, "program admitted by the loader");
                    self.update(|s| {
                        let mut list: Vec<Program> =
                            s.programs.as_deref().cloned().unwrap_or_default();
                        list.retain(|q| q.name != info.name);
                        list.push(info);
                        s.programs = Some(Arc::new(list));
                    });
                }
                Err(AttestError::LoaderRefused(e)) => {
                    tracing::warn!(program = %p.name, error = %e, "the loader refused a stored program");
                }
                Err(AttestError::Loader(e) | AttestError::Keyserver(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Submits the stored programs, then attests through every keyserver until
    /// at least one released keys, then waits; returns only if the loader broke
    /// an exchange.
    async fn attest_all(&self, conn: &Arc<Conn>, ctl: &mut mpsc::Receiver<Frame>) -> String {
        if let Err(e) = self.upload_all(conn, ctl).await {
            return e;
        }
        let mut backoff = self.config.reconnect_backoff;
        loop {
            let mut installed: Option<Installed> = None;
            let mut errors = Vec::new();
            for ks in &self.config.keyservers {
                let started = Instant::now();
                let result = self.attest_one(ks, conn, ctl).await;
                let ms = started.elapsed().as_millis() as u64;
                match result {
                    Ok(i) => {
                        self.metrics
                            .attestation(AttestOutcome::Released, started.elapsed());
                        tracing::info!(keyserver = %ks, models = i.models.len(), request_keys = i.request_keys.len(), waiting = i.waiting.len(), duration_ms = ms, outcome = "released", "attested");
                        installed = Some(i);
                    }
                    Err(AttestError::Keyserver(e)) => {
                        self.metrics
                            .attestation(AttestOutcome::KeyserverError, started.elapsed());
                        tracing::warn!(keyserver = %ks, duration_ms = ms, outcome = "keyserver_error", error = %e, "attestation failed");
                        errors.push(e);
                    }
                    Err(AttestError::LoaderRefused(e)) => {
                        self.metrics
                            .attestation(AttestOutcome::LoaderError, started.elapsed());
                        tracing::warn!(keyserver = %ks, duration_ms = ms, outcome = "loader_error", error = %e, "loader refused the attestation frame");
                        errors.push(format!("loader refused: {e}"));
                    }
                    Err(AttestError::Loader(e)) => {
                        self.metrics
                            .attestation(AttestOutcome::LoaderError, started.elapsed());
                        tracing::warn!(keyserver = %ks, duration_ms = ms, outcome = "loader_error", error = %e, "attestation failed");
                        return e;
                    }
                }
            }
            match installed {
                Some(i) if !i.request_keys.is_empty() => {
                    self.update(|s| {
                        s.conn = Some(conn.clone());
                        s.ready_since = Some(std::time::SystemTime::now());
                        s.models = Arc::new(i.models);
                        s.last_error = None;
                    });
                    tracing::info!("loader ready");
                    return std::future::pending().await;
                }
                Some(i) => {
                    let waiting: Vec<String> = i
                        .waiting
                        .iter()
                        .map(|w| {
                            format!(
                                "{} key {} has shares of {} of the {} keyservers it needs",
                                w.kind, w.id, w.have, w.need
                            )
                        })
                        .collect();
                    self.set_error(format!(
                        "the loader holds no request key yet: {}{}{}",
                        waiting.join("; "),
                        if waiting.is_empty() || errors.is_empty() {
                            ""
                        } else {
                            "; "
                        },
                        errors.join("; ")
                    ));
                }
                None => self.set_error(format!(
                    "no keyserver released keys to the loader: {}",
                    errors.join("; ")
                )),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn loader_answer(
        &self,
        ctl: &mut mpsc::Receiver<Frame>,
        want: Kind,
    ) -> Result<Vec<u8>, AttestError> {
        match tokio::time::timeout(self.config.loader_timeout, ctl.recv()).await {
            Err(_) => Err(AttestError::Loader(format!(
                "no {want:?} within loader-timeout"
            ))),
            Ok(None) => Err(AttestError::Loader("connection closed".into())),
            Ok(Some(f)) if f.kind == want => Ok(f.payload),
            Ok(Some(f)) if f.kind == Kind::Error => {
                Err(AttestError::LoaderRefused(error_text(&f.payload)))
            }
            Ok(Some(f)) => Err(AttestError::Loader(format!(
                "expected {want:?}, got {:?}",
                f.kind
            ))),
        }
    }

    async fn attest_one(
        &self,
        ks: &str,
        conn: &Arc<Conn>,
        ctl: &mut mpsc::Receiver<Frame>,
    ) -> Result<Installed, AttestError> {
        let lost = |_| AttestError::Loader("connection closed".into());
        let nonce = self
            .keyservers
            .nonce(ks)
            .await
            .map_err(|e| AttestError::Keyserver(e.to_string()))?;
        conn.send(Kind::AttestRequest, &nonce).await.map_err(lost)?;
        let evidence = self.loader_answer(ctl, Kind::Evidence).await?;
        tracing::debug!(keyserver = %ks, evidence_bytes = evidence.len(), "evidence received");
        let release = self
            .keyservers
            .attest(ks, evidence)
            .await
            .map_err(|e| AttestError::Keyserver(e.to_string()))?;
        tracing::debug!(keyserver = %ks, release_bytes = release.len(), "key release received");
        conn.send(Kind::KeyRelease, &release).await.map_err(lost)?;
        let installed = self.loader_answer(ctl, Kind::KeysInstalled).await?;
        serde_json::from_slice(&installed)
            .map_err(|e| AttestError::Loader(format!("malformed KeysInstalled: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dispatch_and_close() {
        let (tx, mut rx) = mpsc::channel(8);
        let conn = Arc::new(Conn::new(tx, 1 << 20));
        let mut a = conn.submit(1, "p", b"x".to_vec()).await.unwrap();
        let b = conn.submit(2, "p", b"y".to_vec()).await.unwrap();
        let sent = rx.recv().await.unwrap();
        assert_eq!(sent[1], Kind::Submit.to_byte());
        assert!(conn.dispatch(Kind::Reply, &cinfer_channel::with_request_id(1, b"r")));
        assert!(conn.dispatch(Kind::Done, &cinfer_channel::with_request_id(1, b"{}")));
        assert!(conn.dispatch(Kind::Reply, &cinfer_channel::with_request_id(9, b"r")));
        assert!(!conn.dispatch(Kind::Reply, b"short"));
        assert_eq!(a.events.recv().await, Some(Event::Reply(b"r".to_vec())));
        assert_eq!(a.events.recv().await, Some(Event::Done(b"{}".to_vec())));
        assert_eq!(rx.recv().await.unwrap()[1], Kind::Submit.to_byte());
        drop(a);
        drop(b);
        // a had finished; b had not: only b is cancelled on the loader.
        let cancel = rx.recv().await.unwrap();
        assert_eq!(cancel[1], Kind::Cancel.to_byte());
        assert_eq!(cancel[8..], 2u64.to_be_bytes());
        assert!(rx.try_recv().is_err(), "one Cancel only");
        assert_eq!(conn.close("gone"), 0, "b forgot its id when dropped");
        assert!(matches!(
            conn.submit(3, "p", Vec::new()).await,
            Err(SubmitError::Lost)
        ));
    }

    /// A request whose client does not read gets at most MAX_BUFFERED_FRAMES
    /// frames buffered; the next one drops the request (its stream ends without
    /// Done, which the HTTP side turns into an error record) and later frames
    /// for it go nowhere. Other requests are unaffected.
    #[tokio::test]
    async fn a_slow_client_has_a_bounded_buffer_then_its_request_is_dropped() {
        let (tx, mut rx) = mpsc::channel(8);
        let conn = Arc::new(Conn::new(tx, 1 << 20));
        let mut slow = conn.submit(1, "p", b"x".to_vec()).await.unwrap();
        let mut other = conn.submit(2, "p", b"y".to_vec()).await.unwrap();
        for i in 0..=MAX_BUFFERED_FRAMES {
            let frame = cinfer_channel::with_request_id(1, &(i as u32).to_be_bytes());
            assert!(conn.dispatch(Kind::Reply, &frame));
        }
        // Dropped: the id is no longer pending...
        assert!(
            !conn
                .pending
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .contains_key(&1)
        );
        assert!(conn.dispatch(Kind::Done, &cinfer_channel::with_request_id(1, b"{}")));
        // ...the client reads exactly the frames buffered, in order, then why
        // the request ended, then nothing (no Done after the drop).
        for i in 0..MAX_BUFFERED_FRAMES {
            assert_eq!(
                slow.events.recv().await,
                Some(Event::Reply((i as u32).to_be_bytes().to_vec()))
            );
        }
        assert!(matches!(
            slow.events.recv().await,
            Some(Event::Dropped(why)) if why.contains("read too slowly")
        ));
        assert_eq!(slow.events.recv().await, None);
        // ...and the loader is asked to stop it.
        for _ in 0..2 {
            assert_eq!(rx.recv().await.unwrap()[1], Kind::Submit.to_byte());
        }
        let cancel = rx.recv().await.unwrap();
        assert_eq!(cancel[1], Kind::Cancel.to_byte());
        assert_eq!(cancel[8..], 1u64.to_be_bytes());
        // The other request, with a full buffer, still gets its Done (the
        // reserved slot) after its frames.
        for _ in 0..MAX_BUFFERED_FRAMES {
            assert!(conn.dispatch(Kind::Reply, &cinfer_channel::with_request_id(2, b"r")));
        }
        assert!(conn.dispatch(Kind::Done, &cinfer_channel::with_request_id(2, b"{}")));
        for _ in 0..MAX_BUFFERED_FRAMES {
            assert_eq!(other.events.recv().await, Some(Event::Reply(b"r".to_vec())));
        }
        assert_eq!(other.events.recv().await, Some(Event::Done(b"{}".to_vec())));
    }
}
