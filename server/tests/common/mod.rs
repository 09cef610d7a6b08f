//! A fake trusted loader (speaking the channel protocol), a fake keyserver
//! (hyper), a raw HTTP/1.1 client that reads reply streams record by record,
//! and captured logs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use cinfer_channel::{Kind, Submit, with_request_id};
use cinfer_server::frames::{read_frame, write_frame};
use cinfer_server::{Config, Server};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

pub const MAX_FRAME: u32 = 1 << 20;
/// The keyserver's canned release; the fake loader installs only exactly this.
pub const RELEASE: &str = r#"{"version":1,"nonce":"00","keys":[]}"#;
pub const REQUEST_KEY: &str = r#"{"statement":"canned signed request key","signature":"ab"}"#;
/// Frames the fake loader sends per request (then `Done`).
pub const FRAMES: usize = 3;

// ---------------------------------------------------------------- logs

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line (all levels) of this test binary.
pub fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .init();
    });
}

pub fn logs() -> Vec<u8> {
    LOGS.lock().unwrap().clone()
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------- fake keyserver

#[derive(Default)]
pub struct FakeKeyserver {
    pub addr: OnceLock<SocketAddr>,
    pub nonces: AtomicUsize,
    pub attests: AtomicUsize,
    pub evidence: Mutex<Vec<Vec<u8>>>,
}

impl FakeKeyserver {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr.get().unwrap())
    }
}

async fn ks_handle(ks: Arc<FakeKeyserver>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let (status, text) = match (method.as_str(), path.as_str()) {
        ("POST", "/v1/nonce") => {
            let n = ks.nonces.fetch_add(1, Ordering::SeqCst) as u8;
            (
                200,
                format!(r#"{{"nonce":"{}","expires_at":0}}"#, hex::encode([n; 32])),
            )
        }
        ("POST", "/v1/attest") => {
            ks.attests.fetch_add(1, Ordering::SeqCst);
            ks.evidence.lock().unwrap().push(body.to_vec());
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if v["fake"] == "evidence" {
                (200, RELEASE.to_owned())
            } else {
                (403, r#"{"error":"evidence refused"}"#.to_owned())
            }
        }
        ("GET", "/v1/request-key") => (200, REQUEST_KEY.to_owned()),
        _ => (404, r#"{"error":"not found"}"#.to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

pub async fn start_keyserver() -> Arc<FakeKeyserver> {
    let ks = Arc::new(FakeKeyserver::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    ks.addr.set(listener.local_addr().unwrap()).unwrap();
    let k = ks.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let k = k.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let k = k.clone();
                    async move { Ok::<_, std::convert::Infallible>(ks_handle(k, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    ks
}

/// A URL where nothing listens (connection refused).
pub async fn closed_port_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// A URL whose server accepts connections and never answers.
pub async fn black_hole_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    format!("http://{addr}")
}

// ---------------------------------------------------------------- fake loader

#[derive(Default)]
pub struct LoaderStats {
    /// When set, a request whose sealed bytes start with `crash` closes the
    /// connection instead of running.
    pub crash_on_submit: std::sync::atomic::AtomicBool,
    pub connections: AtomicUsize,
    pub attest_requests: AtomicUsize,
    pub submits: AtomicUsize,
    pub frames_sent: AtomicUsize,
    /// Request ids the server cancelled (Cancel frames), in order.
    pub cancelled: std::sync::Mutex<Vec<u64>>,
    /// Ping frames received.
    pub pings: AtomicUsize,
    /// Peers that authenticated.
    pub authenticated: AtomicUsize,
}

/// A fake loader that asks its peer to authenticate, as one with `server-keys`.
#[derive(Clone)]
pub struct FakeAuth {
    /// The key the peer must sign with.
    pub key: p256::ecdsa::VerifyingKey,
    /// Sent as `idle_timeout_ms` in Hello (the fake drops nobody).
    pub idle_timeout_ms: u64,
}

/// Checks the peer's `Auth` as the real loader does; the reason if it fails.
async fn check_auth(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    auth: &FakeAuth,
    challenge: &[u8; cinfer_channel::CHALLENGE_LEN],
) -> Result<(), String> {
    use p256::ecdsa::signature::Verifier as _;
    let f = read_frame(rd, MAX_FRAME)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("closed")?;
    if f.kind != Kind::Auth {
        return Err(format!("the first frame is {:?}, not Auth", f.kind));
    }
    let a = cinfer_channel::PeerAuth::decode(&f.payload).ok_or("malformed Auth frame")?;
    if a.public_key.as_slice() != auth.key.to_sec1_point(false).as_bytes() {
        return Err("key is not one of this loader's server-keys".into());
    }
    let sig = p256::ecdsa::Signature::from_slice(&a.signature).map_err(|e| e.to_string())?;
    auth.key
        .verify(&cinfer_channel::auth_message(challenge), &sig)
        .map_err(|_| "the signature over the challenge does not verify".to_owned())
}

/// A fake trusted loader on one TCP port. Requests whose sealed body starts
/// with `gated` send their first frame, then wait for a permit on `gate`.
pub struct FakeLoader {
    pub addr: SocketAddr,
    pub gate: Arc<Semaphore>,
    pub stats: Arc<LoaderStats>,
    task: JoinHandle<()>,
}

type Writer = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

async fn send(w: &Writer, kind: Kind, payload: &[u8]) {
    let mut w = w.lock().await;
    let _ = write_frame(&mut *w, kind, payload, MAX_FRAME).await;
}

async fn run_request(w: Writer, s: Submit, gate: Arc<Semaphore>, stats: Arc<LoaderStats>) {
    if s.program != "echo" {
        let reason = if let Some(why) = s.sealed.strip_prefix(b"reason:") {
            String::from_utf8_lossy(why).into_owned()
        } else if s.program == "refuse-me" {
            "request does not open".to_owned()
        } else {
            format!("unknown program {}", s.program)
        };
        let body = serde_json::to_vec(&serde_json::json!({ "error": reason })).unwrap();
        send(&w, Kind::Refused, &with_request_id(s.request_id, &body)).await;
        return;
    }
    for i in 0..FRAMES {
        if i == 1 && s.sealed.starts_with(b"gated") {
            gate.acquire().await.unwrap().forget();
        }
        let mut frame = s.sealed.clone();
        frame.extend_from_slice(format!("#{i}").as_bytes());
        send(&w, Kind::Reply, &with_request_id(s.request_id, &frame)).await;
        stats.frames_sent.fetch_add(1, Ordering::SeqCst);
    }
    let receipt = format!(r#"{{"receipt":"fake","frames":{FRAMES}}}"#);
    send(
        &w,
        Kind::Done,
        &with_request_id(s.request_id, receipt.as_bytes()),
    )
    .await;
}

async fn serve_loader_connection(
    stream: tokio::net::TcpStream,
    gate: Arc<Semaphore>,
    stats: Arc<LoaderStats>,
    auth: Option<FakeAuth>,
) {
    let (mut rd, wr) = stream.into_split();
    let w: Writer = Arc::new(tokio::sync::Mutex::new(wr));
    let challenge = [0x3c; cinfer_channel::CHALLENGE_LEN];
    let mut hello = serde_json::json!({
        "protocol": 1, "loader": "fake", "ak_public": "00", "pcr": 23,
        "programs": [
            {"name": "echo", "sha256": "aa", "world": "request-reply"},
            {"name": "refuse-me", "sha256": "bb", "world": "request-reply"},
        ],
    });
    if let Some(a) = &auth {
        hello["challenge"] = hex::encode(challenge).into();
        hello["idle_timeout_ms"] = a.idle_timeout_ms.into();
    }
    send(&w, Kind::Hello, &serde_json::to_vec(&hello).unwrap()).await;
    if let Some(a) = &auth {
        if let Err(why) = check_auth(&mut rd, a, &challenge).await {
            let body = serde_json::json!({ "error": format!("peer dropped: {why}") });
            send(&w, Kind::Error, &serde_json::to_vec(&body).unwrap()).await;
            return;
        }
        stats.authenticated.fetch_add(1, Ordering::SeqCst);
        send(&w, Kind::Authenticated, br#"{"key":"sha256:fake"}"#).await;
    }
    let mut requests = JoinSet::new();
    while let Ok(Some(frame)) = read_frame(&mut rd, MAX_FRAME).await {
        match frame.kind {
            Kind::AttestRequest => {
                stats.attest_requests.fetch_add(1, Ordering::SeqCst);
                let ev =
                    serde_json::json!({"fake": "evidence", "nonce": hex::encode(&frame.payload)});
                send(&w, Kind::Evidence, &serde_json::to_vec(&ev).unwrap()).await;
            }
            Kind::KeyRelease => {
                if frame.payload == RELEASE.as_bytes() {
                    send(
                        &w,
                        Kind::KeysInstalled,
                        br#"{"models":["m1"],"request_keys":["k1"]}"#,
                    )
                    .await;
                } else {
                    send(&w, Kind::Error, br#"{"error":"not the canned release"}"#).await;
                }
            }
            Kind::Submit => {
                stats.submits.fetch_add(1, Ordering::SeqCst);
                let s = Submit::decode(&frame.payload).unwrap();
                if s.sealed.starts_with(b"crash") && stats.crash_on_submit.load(Ordering::SeqCst) {
                    // Gone before the request ran (like a loader that died).
                    break;
                }
                requests.spawn(run_request(w.clone(), s, gate.clone(), stats.clone()));
            }
            Kind::Cancel => {
                let id = u64::from_be_bytes(frame.payload.as_slice().try_into().unwrap());
                stats.cancelled.lock().unwrap().push(id);
            }
            Kind::Ping => {
                stats.pings.fetch_add(1, Ordering::SeqCst);
            }
            _ => break,
        }
    }
}

impl FakeLoader {
    /// Listens on `addr` (`127.0.0.1:0` for a fresh port).
    pub async fn start(addr: SocketAddr) -> Self {
        Self::start_with(addr, Arc::new(Semaphore::new(0))).await
    }

    pub async fn start_with(addr: SocketAddr, gate: Arc<Semaphore>) -> Self {
        Self::start_full(addr, gate, None).await
    }

    /// A fresh port; peers must authenticate with `auth.key`.
    pub async fn start_authenticating(auth: FakeAuth) -> Self {
        Self::start_full(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Semaphore::new(0)),
            Some(auth),
        )
        .await
    }

    async fn start_full(addr: SocketAddr, gate: Arc<Semaphore>, auth: Option<FakeAuth>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(LoaderStats::default());
        let (g, st) = (gate.clone(), stats.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            // One peer at a time, like the real loader.
            while let Ok((stream, _)) = listener.accept().await {
                st.connections.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve_loader_connection(
                    stream,
                    g.clone(),
                    st.clone(),
                    auth.clone(),
                ));
                while conns.join_next().await.is_some() {}
            }
        });
        Self {
            addr,
            gate,
            stats,
            task,
        }
    }

    /// Closes the listener and every connection (like a loader that exits).
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

// ---------------------------------------------------------------- the server

pub struct Harness {
    pub addr: SocketAddr,
    pub server: Server,
    pub loader: Option<FakeLoader>,
    pub ks: Arc<FakeKeyserver>,
    pub shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub serve: Option<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = &self.serve {
            s.abort();
        }
        if let Some(l) = &self.loader {
            l.task.abort();
        }
    }
}

pub fn test_config(loader: SocketAddr, keyservers: Vec<String>) -> Config {
    Config {
        loaders: vec![cinfer_channel::Endpoint::Tcp(loader.to_string())],
        keyservers,
        max_request_bytes: 4096,
        max_frame_bytes: MAX_FRAME,
        ready_timeout: Duration::from_millis(2000),
        reconnect_backoff: Duration::from_millis(20),
        request_timeout: Duration::from_secs(10),
        keyserver_timeout: Duration::from_millis(1000),
        loader_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    }
}

/// A fake loader, a fake keyserver and the server on 127.0.0.1:0, `edit`ed.
pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Harness {
    let loader = FakeLoader::start("127.0.0.1:0".parse().unwrap()).await;
    start_with_loader(loader, edit).await
}

/// `loader`, a fake keyserver and the server on 127.0.0.1:0, `edit`ed.
pub async fn start_with_loader(loader: FakeLoader, edit: impl FnOnce(&mut Config)) -> Harness {
    capture_logs();
    let ks = start_keyserver().await;
    let mut config = test_config(loader.addr, vec![ks.url()]);
    edit(&mut config);
    let grace = config.shutdown_grace;
    let server = Server::new(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(cinfer_server::serve(
        listener,
        server.clone(),
        async move {
            let _ = rx.await;
        },
        grace,
    ));
    Harness {
        addr,
        server,
        loader: Some(loader),
        ks,
        shutdown: Some(tx),
        serve: Some(serve),
    }
}

pub async fn start() -> Harness {
    start_with(|_| {}).await
}

/// Polls `/readyz` until it answers 200.
pub async fn wait_ready(addr: SocketAddr) {
    let start = Instant::now();
    loop {
        let (status, body) = get(addr, "/readyz").await;
        if status == 200 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not ready: {}",
            String::from_utf8_lossy(&body)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- raw HTTP client

/// An HTTP/1.1 response read incrementally (chunked or Content-Length).
pub struct Reply {
    stream: tokio::net::TcpStream,
    pub status: u16,
    pub head: String,
    raw: Vec<u8>,
    body: Vec<u8>,
    chunked: bool,
    remaining: Option<usize>,
    done: bool,
}

impl Reply {
    pub async fn send(addr: SocketAddr, head: &str, body: &[u8]) -> Reply {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("{head}\r\nHost: server\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut raw = Vec::new();
        let split = loop {
            if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before the response head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        let lower = head.to_ascii_lowercase();
        let chunked = lower.contains("transfer-encoding: chunked");
        let remaining = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap());
        raw.drain(..split + 4);
        let mut r = Reply {
            stream,
            status,
            head,
            raw,
            body: Vec::new(),
            chunked,
            remaining,
            done: false,
        };
        r.decode();
        r
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    /// Moves what `raw` holds into `body`.
    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            if let Some(n) = self.remaining
                && self.body.len() >= n
            {
                self.done = true;
            }
            return;
        }
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let line = std::str::from_utf8(&self.raw[..eol]).unwrap();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                self.done = true;
                return;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    async fn read_more(&mut self) -> bool {
        if self.done {
            return false;
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(15), self.stream.read(&mut buf))
            .await
            .expect("response stalled")
            .unwrap();
        if n == 0 {
            self.done = true;
            return false;
        }
        self.raw.extend_from_slice(&buf[..n]);
        self.decode();
        true
    }

    /// The next reply-stream record, as soon as it is complete.
    pub async fn next_record(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.body.len() >= 5 {
                let len = u32::from_be_bytes(self.body[1..5].try_into().unwrap()) as usize;
                if self.body.len() >= 5 + len {
                    let kind = self.body[0];
                    let bytes = self.body[5..5 + len].to_vec();
                    self.body.drain(..5 + len);
                    return Some((kind, bytes));
                }
            }
            if !self.read_more().await {
                assert!(self.body.is_empty(), "stream ended inside a record");
                return None;
            }
        }
    }

    /// Every remaining record.
    pub async fn records(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(r) = self.next_record().await {
            out.push(r);
        }
        out
    }

    /// The whole (remaining) body.
    pub async fn body(mut self) -> Vec<u8> {
        while self.read_more().await {}
        self.body
    }
}

pub async fn post_request(addr: SocketAddr, program: &str, body: &[u8]) -> Reply {
    Reply::send(
        addr,
        &format!(
            "POST /v1/requests?program={program} HTTP/1.1\r\nContent-Type: application/octet-stream\r\nContent-Length: {}",
            body.len()
        ),
        body,
    )
    .await
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let r = Reply::send(addr, &format!("GET {path} HTTP/1.1"), b"").await;
    let status = r.status;
    (status, r.body().await)
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

pub fn error_of(body: &[u8]) -> String {
    json(body)["error"].as_str().unwrap().to_owned()
}
