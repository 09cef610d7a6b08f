//! The client library, `cinfer chat` and `cinfer proxy` against a FAKE
//! inference server that plays the untrusted server and the attested loader
//! in one: it holds the request private key, the receipt key and the
//! keyserver identity key, opens requests with `cinfer_envelope`, streams
//! sealed frames and a signed receipt — honestly, or with one attack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_attest::release::{REQUEST_KEY_STATEMENT_TYPE, REQUEST_KEY_SUITE};
use cinfer_attest::{
    RECEIPT_TYPE, Receipt, RequestKeyStatement, SignedReceipt, SignedRequestKey, reply_digest,
};
use cinfer_client::{Client, ClientError, ReplyStatus};
use cinfer_envelope::{ReplyStatus as Status, RequestPrivateKey, open_request, seal_request};
use p256::ecdsa::SigningKey;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MODEL: &str = "smollm2-135m-instruct";
/// The component the fake's receipts name.
static FAKE_PROGRAM: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| "ab".repeat(32));

/// What the fake does wrong (or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Honest,
    TamperFrame,
    ReorderFrames,
    DropFinal,
    CutAfterFirst,
    ReplayForeignFrame,
    ReceiptOtherKey,
    ReceiptWrongRequest,
    ReceiptWrongFrames,
    RecordAfterReceipt,
    Unavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatementMode {
    Good,
    OtherIdentity,
    Expired,
    NoReceiptKey,
}

fn key(byte: u8) -> SigningKey {
    SigningKey::from_slice(&[byte; 32]).unwrap()
}

fn public(k: &SigningKey) -> Vec<u8> {
    k.verifying_key().to_sec1_point(false).as_bytes().to_vec()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Fake {
    addr: SocketAddr,
    identity: Vec<u8>,
    /// Request plaintexts the fake opened (to check what clients send).
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The program each sealed request was bound to (None: unbound).
    bound: Arc<Mutex<Vec<Option<[u8; 32]>>>>,
    /// Set when the gate timed out (the client did not see the first chunk
    /// before the body ended).
    gate_timed_out: Arc<Mutex<bool>>,
    /// Set when writing a reply failed: the client closed the connection mid-reply.
    hung_up: Arc<std::sync::atomic::AtomicBool>,
}

impl Fake {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn identity_hex(&self) -> String {
        hex::encode(&self.identity)
    }

    fn client(&self) -> Client {
        Client::new(&self.url(), self.identity.clone()).unwrap()
    }

    /// Starts a fake. With `gate`, a streamed reply pauses after the first
    /// frame until the gate is opened (the client saw the first chunk).
    fn start(mode: Mode, statement_mode: StatementMode, gate: Option<mpsc::Receiver<()>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let identity = key(0x11);
        let receipt_key = key(0x22);
        let request_key = RequestPrivateKey::generate();
        let t = now();
        let (not_before, not_after) = match statement_mode {
            StatementMode::Expired => (t - 7200, t - 3600),
            _ => (t - 60, t + 3600),
        };
        let statement = RequestKeyStatement {
            statement_type: REQUEST_KEY_STATEMENT_TYPE.into(),
            key_id: request_key.public_key().key_id(),
            suite: REQUEST_KEY_SUITE.into(),
            public_key: request_key.public_key().to_bytes(),
            not_before,
            not_after,
            receipt_public_key: if statement_mode == StatementMode::NoReceiptKey {
                Vec::new()
            } else {
                public(&receipt_key)
            },
        };
        let signer = if statement_mode == StatementMode::OtherIdentity {
            key(0x44)
        } else {
            identity.clone()
        };
        let signed_statement =
            serde_json::to_string(&SignedRequestKey::sign(&statement, &signer)).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let bound = Arc::new(Mutex::new(Vec::new()));
        let gate_timed_out = Arc::new(Mutex::new(false));
        let hung_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ctx = Arc::new(ServerCtx {
            mode,
            signed_statement,
            request_key,
            receipt_key,
            gate: Mutex::new(gate),
            requests: requests.clone(),
            bound: bound.clone(),
            gate_timed_out: gate_timed_out.clone(),
            hung_up: hung_up.clone(),
        });
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let ctx = ctx.clone();
                std::thread::spawn(move || {
                    let _ = serve(&ctx, conn);
                });
            }
        });
        Self {
            addr,
            identity: public(&identity),
            requests,
            bound,
            gate_timed_out,
            hung_up,
        }
    }
}

struct ServerCtx {
    mode: Mode,
    signed_statement: String,
    request_key: RequestPrivateKey,
    receipt_key: SigningKey,
    gate: Mutex<Option<mpsc::Receiver<()>>>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    bound: Arc<Mutex<Vec<Option<[u8; 32]>>>>,
    gate_timed_out: Arc<Mutex<bool>>,
    hung_up: Arc<std::sync::atomic::AtomicBool>,
}

fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

fn record(kind: u8, bytes: &[u8]) -> Vec<u8> {
    let mut r = vec![kind];
    r.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    r.extend_from_slice(bytes);
    r
}

fn write_chunk(conn: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    write!(conn, "{:x}\r\n", data.len())?;
    conn.write_all(data)?;
    conn.write_all(b"\r\n")?;
    conn.flush()
}

/// A frame sealed for another request (same key, other sender).
fn foreign_frame(key: &RequestPrivateKey) -> Vec<u8> {
    let (sealed, _) = seal_request(key.public_key(), b"{}").unwrap();
    let (_, mut sealer) = open_request(key, &sealed).unwrap();
    sealer.seal_chunk(b"Hello").unwrap()
}

/// What the fake loader's program answers, chosen by the request: plain
/// text as llama-chat's `text` format, or `events-v1` lines when asked for
/// them, with behaviours picked by the last message's content (or the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// `text`: "Hello", " world".
    Text,
    /// `events-v1`: the same text, then `end` (stop, 9 + 3 tokens).
    Events,
    /// `events-v1`, cut by max_tokens: `end` with `length`.
    Length,
    /// A prompt longer than the context: an `error` event, failed.
    Overflow,
    /// A model the program may not open: an `error` event, failed.
    UnknownModel,
    /// Text, then a failure mid-stream.
    FailMidway,
    /// A program that does not speak `events-v1` (an older llama-chat).
    Old,
    /// The server refuses: 429.
    Busy,
    /// `logprobs: true`: a `logprobs` event before each text.
    Logprobs,
    /// 300 text events, 20 ms apart (a long generation).
    Slow,
}

impl Script {
    fn of(plain: &[u8]) -> Self {
        let req: serde_json::Value = serde_json::from_slice(plain).unwrap_or_default();
        if req["format"] != "events-v1" {
            return Script::Text;
        }
        let last = req["messages"]
            .as_array()
            .and_then(|m| m.last())
            .map_or_else(|| req["prompt"].clone(), |m| m["content"].clone());
        if req["model"] == "gpt-4" {
            return Script::UnknownModel;
        }
        if req["logprobs"] == true {
            return Script::Logprobs;
        }
        match last.as_str().unwrap_or("") {
            "overflow" => Script::Overflow,
            "long" => Script::Length,
            "midway" => Script::FailMidway,
            "old" => Script::Old,
            "busy" => Script::Busy,
            "slow" => Script::Slow,
            _ => Script::Events,
        }
    }

    fn reply(self) -> (Vec<Vec<u8>>, Status) {
        let text =
            |t: &str| format!("{}\n", serde_json::json!({"type": "text", "text": t})).into_bytes();
        let end = |finish: &str| {
            format!(
                "{}\n",
                serde_json::json!({"type": "end", "finish_reason": finish, "prompt_tokens": 9, "completion_tokens": 3})
            )
            .into_bytes()
        };
        let error = |code: &str, message: &str| {
            format!(
                "{}\n",
                serde_json::json!({"type": "error", "code": code, "message": message})
            )
            .into_bytes()
        };
        match self {
            Script::Text => (
                vec![b"Hello".to_vec(), b" world".to_vec()],
                Status::Completed,
            ),
            Script::Events => (
                vec![text("Hello"), text(" world"), end("stop")],
                Status::Completed,
            ),
            Script::Length => (
                vec![text("Hello"), text(" world"), end("length")],
                Status::Completed,
            ),
            Script::Overflow => (
                vec![error(
                    "context_length_exceeded",
                    "the prompt is 9000 tokens; the model's context is 8192 tokens",
                )],
                Status::ProgramFailed,
            ),
            Script::UnknownModel => (
                vec![error(
                    "model_not_found",
                    "model `gpt-4` is not available to this program (NotFound)",
                )],
                Status::ProgramFailed,
            ),
            Script::FailMidway => (
                vec![text("Hello"), error("internal", "accelerator: OutOfMemory")],
                Status::ProgramFailed,
            ),
            Script::Old => (
                vec![b"error: bad request JSON: unknown variant `events-v1`\n".to_vec()],
                Status::ProgramFailed,
            ),
            Script::Busy => (Vec::new(), Status::ProgramFailed),
            Script::Slow => {
                let mut frames: Vec<Vec<u8>> = (0..300).map(|_| text("tick ")).collect();
                frames.push(end("length"));
                (frames, Status::Completed)
            }
            Script::Logprobs => {
                let lp = |t: &str, lp: f32| {
                    let entry = serde_json::json!({"token": t, "bytes": t.as_bytes(), "logprob": lp,
                        "top_logprobs": [{"token": t, "bytes": t.as_bytes(), "logprob": lp}]});
                    format!(
                        "{}\n",
                        serde_json::json!({"type": "logprobs", "content": [entry]})
                    )
                    .into_bytes()
                };
                (
                    vec![
                        lp("Hello", -0.5),
                        text("Hello"),
                        lp(" world", -0.25),
                        text(" world"),
                        end("stop"),
                    ],
                    Status::Completed,
                )
            }
        }
    }
}

fn serve(ctx: &ServerCtx, mut conn: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split(' ').nth(1).unwrap_or("").to_owned();
    let method = line.split(' ').next().unwrap_or("").to_owned();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':')
            && n.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    match (method.as_str(), target.as_str()) {
        ("GET", "/v1/request-key") => respond(&mut conn, "200 OK", &ctx.signed_statement),
        ("GET", "/v1/programs") => respond(
            &mut conn,
            "200 OK",
            &serde_json::json!({"programs": [
                {"name": "llama-chat", "sha256": *FAKE_PROGRAM, "world": "inference"}
            ]})
            .to_string(),
        ),
        ("GET", "/v1/models") => respond(
            &mut conn,
            "200 OK",
            &serde_json::json!({ "models": [MODEL] }).to_string(),
        ),
        ("POST", "/v1/requests?program=llama-chat") => {
            if ctx.mode == Mode::Unavailable {
                return respond(
                    &mut conn,
                    "503 Service Unavailable",
                    r#"{"error":"no attested loader (keyserver unreachable)"}"#,
                );
            }
            let (plain, mut sealer) = match open_request(&ctx.request_key, &body) {
                Ok(x) => x,
                Err(e) => {
                    return respond(
                        &mut conn,
                        "400 Bad Request",
                        &serde_json::json!({ "error": e.to_string() }).to_string(),
                    );
                }
            };
            ctx.requests.lock().unwrap().push(plain.to_vec());
            ctx.bound
                .lock()
                .unwrap()
                .push(cinfer_envelope::request_program(&body).unwrap());
            let script = Script::of(&plain);
            if script == Script::Busy {
                return respond(
                    &mut conn,
                    "429 Too Many Requests",
                    r#"{"error":"refused by the loader: busy: 8 requests in flight"}"#,
                );
            }
            let (chunks, status) = script.reply();
            let mut frames: Vec<Vec<u8>> = chunks
                .iter()
                .map(|c| sealer.seal_chunk(c).unwrap())
                .collect();
            frames.push(sealer.finish(status).unwrap());
            // The honest receipt covers what the loader sealed.
            let mut receipt = Receipt {
                receipt_type: RECEIPT_TYPE.into(),
                request_sha256: hex::encode(Sha256::digest(&body)),
                program_sha256: FAKE_PROGRAM.clone(),
                policy_sha256: "cd".repeat(32),
                model_sha256: [(MODEL.to_owned(), "ef".repeat(32))].into(),
                reply_sha256: hex::encode(reply_digest(frames.iter().map(Vec::as_slice))),
                reply_frames: frames.len() as u64,
                outcome: if status == Status::Completed {
                    "completed".into()
                } else {
                    "program-failed".into()
                },
                classifier: None,
                keyservers: Vec::new(),
            };
            let mut receipt_key = ctx.receipt_key.clone();
            match ctx.mode {
                Mode::TamperFrame => frames[1][3] ^= 1,
                Mode::ReorderFrames => frames.swap(0, 1),
                Mode::DropFinal => {
                    frames.pop();
                }
                Mode::ReplayForeignFrame => frames[0] = foreign_frame(&ctx.request_key),
                Mode::ReceiptOtherKey => receipt_key = key(0x55),
                Mode::ReceiptWrongRequest => receipt.request_sha256 = "00".repeat(32),
                Mode::ReceiptWrongFrames => receipt.reply_frames += 1,
                _ => {}
            }
            let signed = serde_json::to_vec(&SignedReceipt::sign(&receipt, &receipt_key)).unwrap();
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.cinfer.reply-stream\r\n\
                 Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )?;
            conn.flush()?;
            let gate = ctx.gate.lock().unwrap().take();
            for (i, f) in frames.iter().enumerate() {
                if script == Script::Slow {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Err(e) = write_chunk(&mut conn, &record(1, f)) {
                    ctx.hung_up.store(true, std::sync::atomic::Ordering::SeqCst);
                    return Err(e);
                }
                if i == 0 {
                    if ctx.mode == Mode::CutAfterFirst {
                        return Ok(()); // connection closes mid-body
                    }
                    if let Some(gate) = &gate
                        && gate.recv_timeout(Duration::from_secs(20)).is_err()
                    {
                        *ctx.gate_timed_out.lock().unwrap() = true;
                        return Ok(());
                    }
                }
            }
            write_chunk(&mut conn, &record(2, &signed))?;
            if ctx.mode == Mode::RecordAfterReceipt {
                write_chunk(&mut conn, &record(1, &frames[0]))?;
            }
            conn.write_all(b"0\r\n\r\n")?;
            conn.flush()
        }
        _ => respond(&mut conn, "404 Not Found", r#"{"error":"no route"}"#),
    }
}

fn chat(fake: &Fake) -> (Result<cinfer_client::ChatResult, ClientError>, String) {
    let mut text = Vec::new();
    let r = fake.client().chat(
        "llama-chat",
        br#"{"messages":[{"role":"user","content":"hi"}]}"#,
        |c| text.extend_from_slice(c),
    );
    (r, String::from_utf8(text).unwrap())
}

#[test]
fn happy_path_streams_chunks_before_the_body_ends_and_verifies_the_receipt() {
    let (open_gate, gate) = mpsc::channel();
    let fake = Fake::start(Mode::Honest, StatementMode::Good, Some(gate));
    let client = fake.client();
    let statement = client.request_key().unwrap();
    assert!(!statement.receipt_public_key.is_empty());
    let mut chunks = Vec::new();
    let result = client
        .chat(
            "llama-chat",
            br#"{"messages":[{"role":"user","content":"hi"}]}"#,
            |c| {
                if chunks.is_empty() {
                    // The fake waits here, mid-body, until we have seen chunk one.
                    let _ = open_gate.send(());
                }
                chunks.push(String::from_utf8(c.to_vec()).unwrap());
            },
        )
        .unwrap();
    assert!(!*fake.gate_timed_out.lock().unwrap());
    assert_eq!(chunks, ["Hello", " world"]);
    assert_eq!(result.status, ReplyStatus::Completed);
    assert_eq!(result.receipt.reply_frames, 3);
    assert_eq!(result.receipt.outcome, "completed");
    assert_eq!(result.receipt.model_sha256[MODEL], "ef".repeat(32));
    assert_eq!(result.statement, statement);
    assert_eq!(
        fake.requests.lock().unwrap()[0],
        br#"{"messages":[{"role":"user","content":"hi"}]}"#
    );
    assert_eq!(client.models().unwrap(), [MODEL]);
}

/// Waits up to `limit` for the fake to see its client hang up mid-reply.
fn wait_hung_up(fake: &Fake, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if fake.hung_up.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `chat_until` stops an exchange when told: `Cancelled`, and the connection
/// closes at once (the server then cancels the run on the loader), long
/// before the 6-second reply would have ended.
#[test]
fn a_caller_can_stop_an_exchange_and_the_connection_closes() {
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let started = std::time::Instant::now();
    let mut seen = 0;
    let r = fake.client().chat_until(
        "llama-chat",
        br#"{"format":"events-v1","messages":[{"role":"user","content":"slow"}]}"#,
        |_| {
            seen += 1;
            if seen == 2 {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        },
    );
    assert!(matches!(r, Err(ClientError::Cancelled)), "{r:?}");
    assert_eq!(seen, 2);
    assert!(
        wait_hung_up(&fake, Duration::from_secs(3)),
        "the fake kept writing"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn tampered_frame_fails_authentication() {
    let (r, _) = chat(&Fake::start(Mode::TamperFrame, StatementMode::Good, None));
    assert!(
        matches!(r, Err(ClientError::ReplyAuthentication { index: 1 })),
        "{r:?}"
    );
}

#[test]
fn reordered_frames_fail_authentication() {
    let (r, text) = chat(&Fake::start(Mode::ReorderFrames, StatementMode::Good, None));
    assert!(
        matches!(r, Err(ClientError::ReplyAuthentication { index: 0 })),
        "{r:?}"
    );
    assert_eq!(text, "");
}

#[test]
fn dropped_final_frame_is_truncation() {
    let (r, text) = chat(&Fake::start(Mode::DropFinal, StatementMode::Good, None));
    assert!(matches!(r, Err(ClientError::Truncated)), "{r:?}");
    assert_eq!(text, "Hello world");
    let (r, _) = chat(&Fake::start(Mode::CutAfterFirst, StatementMode::Good, None));
    assert!(matches!(r, Err(ClientError::Truncated)), "{r:?}");
}

#[test]
fn frame_replayed_from_another_request_fails_authentication() {
    let (r, _) = chat(&Fake::start(
        Mode::ReplayForeignFrame,
        StatementMode::Good,
        None,
    ));
    assert!(
        matches!(r, Err(ClientError::ReplyAuthentication { index: 0 })),
        "{r:?}"
    );
}

#[test]
fn receipt_signed_by_another_key_is_refused() {
    let (r, _) = chat(&Fake::start(
        Mode::ReceiptOtherKey,
        StatementMode::Good,
        None,
    ));
    assert!(matches!(r, Err(ClientError::ReceiptSignature)), "{r:?}");
}

#[test]
fn receipt_for_another_request_is_refused() {
    let (r, _) = chat(&Fake::start(
        Mode::ReceiptWrongRequest,
        StatementMode::Good,
        None,
    ));
    assert!(
        matches!(
            r,
            Err(ClientError::ReceiptMismatch {
                field: "request_sha256"
            })
        ),
        "{r:?}"
    );
    let (r, _) = chat(&Fake::start(
        Mode::ReceiptWrongFrames,
        StatementMode::Good,
        None,
    ));
    assert!(
        matches!(
            r,
            Err(ClientError::ReceiptMismatch {
                field: "reply_frames"
            })
        ),
        "{r:?}"
    );
}

#[test]
fn record_after_the_receipt_is_refused() {
    let (r, _) = chat(&Fake::start(
        Mode::RecordAfterReceipt,
        StatementMode::Good,
        None,
    ));
    assert!(matches!(r, Err(ClientError::RecordAfterReceipt)), "{r:?}");
}

#[test]
fn statements_from_another_identity_expired_or_without_receipt_key_are_refused() {
    let fake = Fake::start(Mode::Honest, StatementMode::OtherIdentity, None);
    assert!(matches!(
        fake.client().request_key(),
        Err(ClientError::StatementSignature)
    ));
    let (r, _) = chat(&fake);
    assert!(matches!(r, Err(ClientError::StatementSignature)), "{r:?}");
    assert!(fake.requests.lock().unwrap().is_empty(), "nothing was sent");

    let fake = Fake::start(Mode::Honest, StatementMode::Expired, None);
    let (r, _) = chat(&fake);
    assert!(
        matches!(r, Err(ClientError::StatementNotValid { .. })),
        "{r:?}"
    );
    assert!(fake.requests.lock().unwrap().is_empty(), "nothing was sent");

    let (r, _) = chat(&Fake::start(
        Mode::Honest,
        StatementMode::NoReceiptKey,
        None,
    ));
    assert!(matches!(r, Err(ClientError::NoReceiptKey)), "{r:?}");
}

#[test]
fn unavailable_server_is_a_typed_error_with_the_servers_text() {
    let (r, _) = chat(&Fake::start(Mode::Unavailable, StatementMode::Good, None));
    match r {
        Err(ClientError::NoAttestedLoader(m)) => assert!(m.contains("keyserver unreachable")),
        other => panic!("{other:?}"),
    }
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    match fake.client().chat("other", b"{}", |_| {}) {
        Err(ClientError::Server {
            status: 404,
            message,
        }) => assert_eq!(message, "no route"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        fake.client().chat("a&b", b"{}", |_| {}),
        Err(ClientError::InvalidProgram(_))
    ));
    assert!(matches!(
        Client::new("http://127.0.0.1:1", vec![4; 65]),
        Err(ClientError::BadIdentityKey)
    ));
    match Client::new("ftp://example.test", fake.identity.clone()) {
        Err(ClientError::InvalidUrl(m)) => assert!(m.contains("only http:// and https://"), "{m}"),
        other => panic!("{other:?}"),
    }
    // https:// is spoken: against the fake's plain-HTTP port the TLS handshake
    // fails, a transport error naming the server (no plaintext fallback).
    let tls = fake.url().replacen("http://", "https://", 1);
    match Client::new(&tls, fake.identity.clone())
        .unwrap()
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(5))
        .chat("echo", b"{}", |_| {})
    {
        Err(ClientError::Io(m)) => assert!(m.starts_with(&tls), "{m}"),
        other => panic!("{other:?}"),
    }
}

fn cinfer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cinfer"))
}

#[test]
fn chat_command_reads_its_ca_certificates_and_refuses_a_file_without_one() {
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let dir = std::env::temp_dir().join(format!("cinfer-ca-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "no certificate here").unwrap();
    for (file, reason) in [
        (dir.join("missing.pem"), "reading"),
        (not_pem, "no PEM certificate in it"),
    ] {
        let out = cinfer()
            .args(["chat", "--server", &fake.url(), "--keyserver-identity"])
            .arg(fake.identity_hex())
            .arg("--ca-cert")
            .arg(&file)
            .args(["--program-sha256", &FAKE_PROGRAM, "hi"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(reason), "{}: {err}", file.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chat_command_prints_the_answer_and_the_receipt() {
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let out = cinfer()
        .args(["chat", "--server", &fake.url(), "--keyserver-identity"])
        .arg(fake.identity_hex())
        .args(["--program-sha256", &FAKE_PROGRAM])
        .args(["--max-tokens", "16", "--seed", "7", "--system", "be brief"])
        .args(["--show-receipt", "hi there"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout, "Hello world\n");
    assert!(
        stderr.contains("receipt: verified (signed by an attested loader's receipt key; keyserver identity sha256:"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!(
        "model:        {MODEL} (sha256 {})",
        "ef".repeat(32)
    )));
    assert!(stderr.contains("(3 frames)") && stderr.contains("outcome:      completed"));
    let sent: serde_json::Value =
        serde_json::from_slice(&fake.requests.lock().unwrap()[0]).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi there"}
            ],
            "max_tokens": 16, "temperature": 0.0, "seed": 7, "format": "text", "default_system": false
        })
    );

    // The identity from a file; a tampering server makes it fail.
    let dir = std::env::temp_dir().join(format!("cinfer-client-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let id_file = dir.join("identity.hex");
    std::fs::write(&id_file, format!("{}\n", fake.identity_hex())).unwrap();
    let bad = Fake::start(Mode::TamperFrame, StatementMode::Good, None);
    let out = cinfer()
        .args(["chat", "--server", &bad.url(), "--keyserver-identity-file"])
        .arg(&id_file)
        .args(["--program-sha256", &FAKE_PROGRAM, "hi"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("failed authentication"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("world"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Python with the `openai` package, or why there is none.
fn python_with_openai() -> Result<String, String> {
    let has = |py: &str| {
        Command::new(py)
            .args(["-c", "import openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(home) = std::env::var_os("HOME") {
        let venv = std::path::Path::new(&home).join(".cache/cinfer/sigstore-venv/bin/python");
        if venv.exists() {
            let venv = venv.to_string_lossy().into_owned();
            if has(&venv) {
                return Ok(venv);
            }
            let installed = Command::new(&venv)
                .args(["-m", "pip", "install", "--quiet", "openai"])
                .status()
                .is_ok_and(|s| s.success());
            if installed && has(&venv) {
                return Ok(venv);
            }
        }
    }
    if has("python3") {
        return Ok("python3".into());
    }
    Err("no Python with the `openai` package (pip install openai into ~/.cache/cinfer/sigstore-venv)".into())
}

struct Proxy {
    child: std::process::Child,
    base: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(fake: &Fake) -> Proxy {
    start_proxy_with(fake, &["--program-sha256", &FAKE_PROGRAM])
}

const OPENAI_SCRIPT: &str = r#"
import sys, openai
good, bad = sys.argv[1], sys.argv[2]
c = openai.OpenAI(base_url=good, api_key="unused", max_retries=0)
M = "smollm2-135m-instruct"
msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
def user(t):
    return [{"role": "user", "content": t}]
r = c.chat.completions.create(model=M, messages=msgs, max_tokens=5, temperature=0, seed=1)
assert r.choices[0].message.content == "Hello world", r
assert r.choices[0].finish_reason == "stop", r
assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 3, 12), r
assert r.model_extra["cinfer"]["verified"] is True, r
assert r.model_extra["cinfer"]["receipt"]["reply_frames"] == 4, r
r = c.chat.completions.create(model=M, messages=user("long"), max_tokens=3)
assert r.choices[0].finish_reason == "length", r
assert r.choices[0].logprobs is None, r
# Log-probabilities, in OpenAI's shape, with the text they belong to.
r = c.chat.completions.create(model=M, messages=msgs, logprobs=True, top_logprobs=1)
lp = r.choices[0].logprobs.content
assert [(t.token, t.logprob, t.bytes) for t in lp] == [("Hello", -0.5, list(b"Hello")), (" world", -0.25, list(b" world"))], lp
assert lp[1].top_logprobs[0].token == " world", lp
chunks = [ch.choices[0] for ch in c.chat.completions.create(model=M, messages=msgs, logprobs=True, stream=True) if ch.choices and ch.choices[0].delta.content]
assert [(ch.delta.content, [t.token for t in ch.logprobs.content]) for ch in chunks] == [("Hello", ["Hello"]), (" world", [" world"])], chunks
# Streaming; usage as the last chunk (no choices) when asked for.
parts, finish, usage, usage_choices = [], None, None, None
for ch in c.chat.completions.create(model=M, messages=msgs, stream=True, stream_options={"include_usage": True}):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
    if ch.choices and ch.choices[0].finish_reason:
        finish = ch.choices[0].finish_reason
    if ch.usage:
        usage, usage_choices = ch.usage, ch.choices
assert parts == ["Hello", " world"], parts
assert finish == "stop", finish
assert usage.total_tokens == 12 and usage_choices == [], (usage, usage_choices)
assert all(ch.usage is None for ch in c.chat.completions.create(model=M, messages=msgs, stream=True))
finish = [ch.choices[0].finish_reason for ch in c.chat.completions.create(model=M, messages=user("long"), stream=True) if ch.choices and ch.choices[0].finish_reason]
assert finish == ["length"], finish
# Several choices: one sealed exchange each, each with its receipt.
r = c.chat.completions.create(model=M, messages=msgs, n=3, seed=5)
assert [ch.index for ch in r.choices] == [0, 1, 2], r
assert all(ch.message.content == "Hello world" and ch.finish_reason == "stop" for ch in r.choices), r
assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 9, 18), r.usage
assert all(ch.model_extra["cinfer"]["verified"] is True for ch in r.choices), r
assert "cinfer" not in (r.model_extra or {}), r
by, fin, usage = {}, {}, None
for ch in c.chat.completions.create(model=M, messages=msgs, n=2, stream=True, stream_options={"include_usage": True}):
    for choice in ch.choices:
        if choice.delta.content:
            by.setdefault(choice.index, []).append(choice.delta.content)
        if choice.finish_reason:
            fin[choice.index] = choice.finish_reason
    if ch.usage:
        usage = ch.usage
assert by == {0: ["Hello", " world"], 1: ["Hello", " world"]}, by
assert fin == {0: "stop", 1: "stop"} and usage.completion_tokens == 6, (fin, usage)
# The legacy completions endpoint, the same sealed path.
r = c.completions.create(model=M, prompt="Once", max_tokens=3)
assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("Hello world", "stop", 3), r
texts = [ch.choices[0].text for ch in c.completions.create(model=M, prompt="long", stream=True) if ch.choices]
assert "".join(texts) == "Hello world", texts
# Models.
assert [m.id for m in c.models.list()] == [M]
assert c.models.retrieve(M).id == M
try:
    c.models.retrieve("gpt-4")
    raise SystemExit("an unknown model was retrieved")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
# Client mistakes are 4xx (never a retryable 5xx), with the reason.
def status_of(**kw):
    try:
        c.chat.completions.create(**kw)
        return None, None
    except openai.APIStatusError as e:
        return e.status_code, e.body
tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
for kw, param in [(dict(temperature=5), "temperature"), (dict(temperature=-1), "temperature"),
                  (dict(max_tokens=0), "max_tokens"), (dict(top_p=0), "top_p"), (dict(n=9), "n"),
                  (dict(logprobs=True, top_logprobs=21), "top_logprobs"), (dict(tools=[tool]), "tools"),
                  (dict(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}), "response_format")]:
    for stream in (False, True):
        st, body = status_of(model=M, messages=msgs, stream=stream, **kw)
        assert st == 400 and body["param"] == param, (kw, st, body)
st, body = status_of(model=M, messages=msgs, extra_body={"bogus": 1})
assert st == 400 and "unknown field `bogus`" in body["message"], (st, body)
for stream in (False, True):
    st, body = status_of(model=M, messages=user("overflow"), stream=stream)
    assert st == 400 and body["code"] == "context_length_exceeded", (st, body)
    st, body = status_of(model="gpt-4", messages=msgs, stream=stream)
    assert st == 404 and body["code"] == "model_not_found", (st, body)
st, body = status_of(model=M, messages=user("busy"))
assert st == 429 and "busy" in body["message"], (st, body)
st, body = status_of(model=M, messages=user("old"))
assert st == 502 and "not events-v1" in body["message"], (st, body)
# A program failing mid-stream: an error, not content, after the text before it.
got = []
try:
    for ch in c.chat.completions.create(model=M, messages=user("midway"), stream=True):
        if ch.choices and ch.choices[0].delta.content:
            got.append(ch.choices[0].delta.content)
    raise SystemExit("a failed stream ended as a success")
except openai.APIError as e:
    assert "OutOfMemory" in str(e), e
assert got == ["Hello"], got
b = openai.OpenAI(base_url=bad, api_key="unused", max_retries=0)
try:
    r = b.chat.completions.create(model=M, messages=msgs)
    raise SystemExit("tampered reply was accepted: %r" % r)
except openai.APIStatusError as e:
    assert e.status_code == 502, e
    assert "failed authentication" in str(e), e
got = []
try:
    for ch in b.chat.completions.create(model=M, messages=msgs, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            got.append(ch.choices[0].delta.content)
    raise SystemExit("tampered stream was accepted")
except openai.APIError as e:
    assert "failed authentication" in str(e), e
assert got == ["Hello"], got
print("openai client: OK")
"#;

#[test]
fn proxy_serves_the_openai_client() {
    let python = match python_with_openai() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIPPED proxy_serves_the_openai_client: {why}");
            return;
        }
    };
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let bad_fake = Fake::start(Mode::TamperFrame, StatementMode::Good, None);
    let good = start_proxy(&fake);
    let bad = start_proxy(&bad_fake);
    let out = Command::new(&python)
        .args(["-c", OPENAI_SCRIPT, &good.base, &bad.base])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: serde_json::Value =
        serde_json::from_slice(&fake.requests.lock().unwrap()[0]).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"}
            ],
            "model": MODEL, "max_tokens": 5, "temperature": 0.0, "seed": 1, "format": "events-v1", "default_system": false
        })
    );
    // No seed given: a fresh one each time (OpenAI's sampling is not
    // reproducible unless asked).
    let seeds: Vec<serde_json::Value> = fake.requests.lock().unwrap()[1..3]
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(r).unwrap()["seed"].clone())
        .collect();
    assert!(seeds[0].is_u64() && seeds[0] != seeds[1], "{seeds:?}");
}

/// One raw HTTP exchange with the proxy (`Connection: close`); the status,
/// the head and the de-chunked body.
fn proxy_http(proxy: &Proxy, head: &str, body: &str) -> (u16, String, String) {
    proxy_http_with(proxy, head, "", body)
}

/// [`proxy_http`] with extra header lines (`Name: value\r\n` each).
fn proxy_http_with(proxy: &Proxy, head: &str, headers: &str, body: &str) -> (u16, String, String) {
    let addr = proxy
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned();
    let mut conn = TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "{head} HTTP/1.1\r\nHost: proxy\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let response = read_until_closed(&mut conn, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, raw) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head[9..12].parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = raw;
        loop {
            let (size, after) = rest.split_once("\r\n").expect("chunk size");
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                assert_eq!(after, "\r\n", "the chunked body ends cleanly");
                break;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        out
    } else {
        raw.to_owned()
    };
    (status, head.to_owned(), body)
}

/// A client that hangs up on `cinfer proxy` mid-stream (or before a
/// non-streamed answer) stops the exchange: the proxy closes its connection
/// to the server (which cancels the run on the loader) instead of reading the
/// reply to its end.
#[test]
fn proxy_stops_the_exchange_when_its_client_hangs_up() {
    for stream in [true, false] {
        let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
        let proxy = start_proxy(&fake);
        let addr = proxy
            .base
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .to_owned();
        let body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "slow"}], "stream": stream})
            .to_string();
        let mut conn = TcpStream::connect(&addr).unwrap();
        write!(
            conn,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        if stream {
            // Read until the first text arrived, then hang up.
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains("tick") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "closed before any text");
                seen.extend_from_slice(&buf[..n]);
            }
        } else {
            std::thread::sleep(Duration::from_millis(300));
        }
        drop(conn);
        assert!(
            wait_hung_up(&fake, Duration::from_secs(3)),
            "stream {stream}: the proxy kept reading the reply after its client left"
        );
    }
}

/// Through `cinfer proxy`, in OpenAI's shapes: a program that fails after
/// streaming text ends the stream with an SSE error event (not content) and
/// `[DONE]`, and the chunked body ends cleanly; a busy server is 429 with
/// `Retry-After`; a wrong method is 405 with `Allow`; an error before any text
/// is an HTTP status even when streaming.
#[test]
fn proxy_reports_failures_with_openai_statuses_and_events() {
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let proxy = start_proxy(&fake);
    let chat = |content: &str, stream: bool| {
        serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": stream})
            .to_string()
    };
    let (status, head, body) =
        proxy_http(&proxy, "POST /v1/chat/completions", &chat("midway", true));
    assert_eq!(status, 200, "{head}");
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data events only"))
        .collect();
    assert_eq!(events.len(), 4, "{body}");
    let role: serde_json::Value = serde_json::from_str(events[0]).unwrap();
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    let text: serde_json::Value = serde_json::from_str(events[1]).unwrap();
    assert_eq!(text["choices"][0]["delta"]["content"], "Hello");
    let error: serde_json::Value = serde_json::from_str(events[2]).unwrap();
    assert_eq!(
        error,
        serde_json::json!({"error": {"message": "accelerator: OutOfMemory", "type": "cinfer_program_error", "param": null, "code": null}})
    );
    assert_eq!(events[3], "[DONE]");

    let (status, head, body) =
        proxy_http(&proxy, "POST /v1/chat/completions", &chat("busy", false));
    assert_eq!(status, 429, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");

    let (status, head, body) =
        proxy_http(&proxy, "POST /v1/chat/completions", &chat("overflow", true));
    assert_eq!(status, 400, "{head}");
    assert!(head.contains("application/json"), "{head}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");

    for (head, allow) in [
        ("GET /v1/chat/completions", "POST"),
        ("PUT /v1/completions", "POST"),
        ("POST /v1/models", "GET"),
        ("DELETE /v1/models/x", "GET"),
    ] {
        let (status, response_head, _) = proxy_http(&proxy, head, "");
        assert_eq!(status, 405, "{head}: {response_head}");
        assert!(
            response_head.contains(&format!("allow: {allow}\r\n")),
            "{response_head}"
        );
    }
    assert_eq!(proxy_http(&proxy, "GET /v1/nothing", "").0, 404);
    // Nothing above reached the server as a retry.
    let sent = fake.requests.lock().unwrap().len();
    assert_eq!(sent, 3, "midway, busy and overflow, each once (no retry)");
}

#[test]
fn a_receipt_for_another_program_than_the_pinned_one_is_refused() {
    // The fake loader's receipts name component "ab…ab".
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let request = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let pinned = fake
        .client()
        .with_program_pin("llama-chat", &"AB".repeat(32));
    pinned
        .chat("llama-chat", request, |_| {})
        .expect("the pinned component ran");
    // The pinned request was sealed bound to that component; an unpinned one is not.
    fake.client()
        .chat("llama-chat", request, |_| {})
        .expect("unpinned");
    assert_eq!(*fake.bound.lock().unwrap(), [Some([0xab; 32]), None]);
    // A pin that is not a SHA-256 is refused before anything is sent.
    let r =
        fake.client()
            .with_program_pin("llama-chat", "abcd")
            .chat("llama-chat", request, |_| {});
    assert!(
        matches!(&r, Err(ClientError::InvalidProgramPin(p)) if p == "llama-chat"),
        "{r:?}"
    );
    assert_eq!(fake.bound.lock().unwrap().len(), 2, "nothing sent");
    let other = fake
        .client()
        .with_program_pin("llama-chat", &"cd".repeat(32));
    let r = other.chat("llama-chat", request, |_| {});
    assert!(
        matches!(
            &r,
            Err(ClientError::UnexpectedProgram { expected, receipt })
                if *expected == "cd".repeat(32) && *receipt == *FAKE_PROGRAM
        ),
        "{r:?}"
    );
}

/// `cinfer chat` against a FAKE server whose receipts name component ab…ab,
/// with `args` choosing the expected program; its exit status and stderr.
fn chat_pinned(fake: &Fake, args: &[&str]) -> (bool, String) {
    let out = cinfer()
        .args(["chat", "--server", &fake.url(), "--keyserver-identity"])
        .arg(fake.identity_hex())
        .args(args)
        .arg("hi")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cinfer chat` pins the program by default (issue 16, bug 7): without a
/// source for the expected component it refuses to run; with one (a digest, the
/// component file, or the loader policy's entry) a reply from another
/// component is refused with the reason; `--any-program` opts out.
#[test]
fn chat_refuses_a_reply_from_another_program_unless_told_any_program() {
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let unexpected = |expected: &str| {
        format!(
            "the reply was produced by program sha256 {}, not the expected {expected}",
            *FAKE_PROGRAM
        )
    };
    // No pin source: refused before anything is sent.
    let (ok, stderr) = chat_pinned(&fake, &[]);
    assert!(!ok);
    for option in [
        "--program-sha256",
        "--program-file",
        "--policy",
        "--any-program",
    ] {
        assert!(stderr.contains(option), "{stderr}");
    }
    assert!(fake.requests.lock().unwrap().is_empty(), "nothing sent");
    // A digest.
    let other = "cd".repeat(32);
    let (ok, stderr) = chat_pinned(&fake, &["--program-sha256", &other]);
    assert!(!ok);
    assert!(stderr.contains(&unexpected(&other)), "{stderr}");
    assert!(
        chat_pinned(
            &fake,
            &["--program-sha256", &FAKE_PROGRAM.to_ascii_uppercase()]
        )
        .0
    );
    // A component file (its SHA-256).
    let dir = std::env::temp_dir().join(format!("cinfer-pin-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let component = dir.join("llama-chat.wasm");
    std::fs::write(&component, b"\0asm not the one that ran").unwrap();
    let file_digest = hex::encode(Sha256::digest(b"\0asm not the one that ran"));
    let (ok, stderr) = chat_pinned(&fake, &["--program-file", component.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains(&unexpected(&file_digest)), "{stderr}");
    // A loader policy's entry for the program.
    let policy = dir.join("policy.toml");
    let write_policy = |digest: &str| {
        std::fs::write(
            &policy,
            format!(
                "worlds = \"worlds.wit\"\n[[program]]\nname = \"echo\"\nsha256 = \"{}\"\nworld = \"request-reply\"\n[[program]]\nname = \"llama-chat\"\nsha256 = \"{digest}\"\nworld = \"inference\"\n",
                "ee".repeat(32)
            ),
        )
        .unwrap();
    };
    write_policy(&FAKE_PROGRAM);
    assert!(chat_pinned(&fake, &["--policy", policy.to_str().unwrap()]).0);
    write_policy(&other);
    let (ok, stderr) = chat_pinned(&fake, &["--policy", policy.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains(&unexpected(&other)), "{stderr}");
    std::fs::write(
        &policy,
        "worlds = \"worlds.wit\"\n[[signer]]\nname = \"team\"\npublic-key = \"team.pub\"\nworld = \"inference\"\n",
    )
    .unwrap();
    let (ok, stderr) = chat_pinned(&fake, &["--policy", policy.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("pins no component for program \"llama-chat\""),
        "{stderr}"
    );
    // Two sources at once are refused (which would win?).
    let (ok, stderr) = chat_pinned(&fake, &["--any-program", "--program-sha256", &other]);
    assert!(!ok);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    // The explicit opt-out.
    assert!(chat_pinned(&fake, &["--any-program"]).0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cinfer proxy` pins the program too: it does not start without a source,
/// and a completion answered by another component is a 502 with the reason.
#[test]
fn proxy_refuses_a_reply_from_another_program() {
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let out = cinfer()
        .args(["proxy", "--listen", "127.0.0.1:0", "--server", &fake.url()])
        .arg("--keyserver-identity")
        .arg(fake.identity_hex())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--any-program"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = "cd".repeat(32);
    // The server's program list already names another component: the proxy
    // does not start.
    let out = cinfer()
        .args(["proxy", "--listen", "127.0.0.1:0", "--server", &fake.url()])
        .arg("--keyserver-identity")
        .arg(fake.identity_hex())
        .args(["--program-sha256", &other])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "the server says program `llama-chat` is component sha256 {}, not the pinned {other}",
            *FAKE_PROGRAM
        )),
        "{stderr}"
    );
    // A server that lies in its list is caught by the receipt.
    let proxy = start_proxy_with(
        &fake,
        &["--program-sha256", &other, "--startup-check-ms", "0"],
    );
    let addr = proxy
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned();
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let mut conn = TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let response = read_until_closed(&mut conn, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["type"], "cinfer_verification_failed");
    assert_eq!(
        v["error"]["message"],
        format!(
            "the reply was produced by program sha256 {}, not the expected {other}",
            *FAKE_PROGRAM
        )
    );
    assert!(
        !text.contains("Hello world"),
        "the text of an unexpected program"
    );
}

/// `cinfer proxy` checks the server before it listens, and then says what it
/// verified (`/v1/cinfer/attestation`), whether it is ready (`/readyz`) and
/// what it served (`/metrics`).
#[test]
fn proxy_checks_the_server_at_start_and_reports_what_it_verified() {
    // A statement signed by another keyserver: refused at once.
    let fake = Fake::start(Mode::Honest, StatementMode::OtherIdentity, None);
    let out = cinfer()
        .args(["proxy", "--listen", "127.0.0.1:0", "--server", &fake.url()])
        .arg("--keyserver-identity")
        .arg(fake.identity_hex())
        .args(["--program-sha256", &FAKE_PROGRAM])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("does not verify against the pinned keyserver"),
        "{stderr}"
    );
    // No server at all: it waits --startup-check-ms, then gives up saying why.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let started = std::time::Instant::now();
    let out = cinfer()
        .args(["proxy", "--listen", "127.0.0.1:0", "--server", &url])
        .arg("--keyserver-identity")
        .arg(fake.identity_hex())
        .args([
            "--program-sha256",
            &FAKE_PROGRAM,
            "--startup-check-ms",
            "1500",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no verified request-key statement from")
            && stderr.contains("within 1500 ms")
            && stderr.contains("waiting for the server"),
        "{stderr}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));

    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    // A pinned program the server does not list: refused before listening.
    let out = cinfer()
        .args(["proxy", "--listen", "127.0.0.1:0", "--server", &fake.url()])
        .arg("--keyserver-identity")
        .arg(fake.identity_hex())
        .args(["--program", "other-chat", "--program-sha256", &FAKE_PROGRAM])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the server lists no program `other-chat` (it lists: llama-chat)"),
        "{stderr}"
    );
    let proxy = start_proxy(&fake);
    let (status, _, body) = proxy_http(&proxy, "GET /readyz", "");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, &ready["status"]),
        (200, &serde_json::json!("ready"))
    );
    let (status, _, body) = proxy_http(&proxy, "GET /v1/cinfer/attestation", "");
    let att: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200, "{att}");
    assert_eq!(att["verified"], true);
    assert_eq!(att["pins"]["program_sha256"], *FAKE_PROGRAM);
    assert_eq!(att["request_key"]["key_id"], ready["request_key_id"]);
    assert!(
        att["request_key"]["receipt_key_sha256"]
            .as_str()
            .is_some_and(|f| f.starts_with("sha256:"))
    );
    let (status, _, _) = proxy_http(
        &proxy,
        "POST /v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200);
    let (status, _, _) = proxy_http(&proxy, "GET /v1/nothing", "");
    assert_eq!(status, 404);
    let (status, head, metrics) = proxy_http(&proxy, "GET /metrics", "");
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    for line in [
        "cinfer_proxy_requests_total{route=\"chat_completions\",status=\"200\"} 1",
        "cinfer_proxy_requests_total{route=\"readyz\",status=\"200\"} 1",
        "cinfer_proxy_requests_total{route=\"unknown\",status=\"404\"} 1",
        "cinfer_proxy_receipts_verified_total 1",
        "cinfer_proxy_time_to_first_token_seconds_count 1",
        "cinfer_proxy_request_duration_seconds_count{route=\"chat_completions\"} 1",
        "cinfer_proxy_verification_failures_total 0",
        "cinfer_proxy_requests_in_flight 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cinfer_proxy_completion_tokens_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// `--api-key-file`: `/v1/` routes need the key (401 otherwise, in OpenAI's
/// shape); health and metrics stay open. `--cors-origin`: only the listed
/// origins get CORS headers, preflights included. Trailing slashes and model
/// ids with slashes route as expected.
#[test]
fn proxy_api_key_and_cors_origins() {
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let dir = std::env::temp_dir().join(format!("cinfer-proxy-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("api.key");
    std::fs::write(&key_file, "sk-test-123\n").unwrap();
    let proxy = start_proxy_with(
        &fake,
        &[
            "--program-sha256",
            &FAKE_PROGRAM,
            "--api-key-file",
            key_file.to_str().unwrap(),
            "--cors-origin",
            "https://app.example",
        ],
    );
    let (status, _, body) = proxy_http(&proxy, "GET /v1/models", "");
    assert_eq!(status, 401, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "invalid_api_key", "{body}");
    let (status, _, _) = proxy_http_with(
        &proxy,
        "GET /v1/models",
        "Authorization: Bearer sk-wrong\r\n",
        "",
    );
    assert_eq!(status, 401);
    let key = "Authorization: Bearer sk-test-123\r\n";
    let (status, _, body) = proxy_http_with(&proxy, "GET /v1/models/", key, "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(MODEL), "{body}");
    let (status, _, body) = proxy_http_with(&proxy, "GET /v1/models/org/not-there", key, "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("`org/not-there` does not exist"), "{body}");
    let (status, _, _) = proxy_http_with(
        &proxy,
        "POST /v1/chat/completions",
        key,
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200);
    for open in ["GET /healthz", "GET /metrics"] {
        assert_eq!(proxy_http(&proxy, open, "").0, 200, "{open}");
    }
    // CORS: the listed origin, a preflight, and another origin.
    let (_, head, _) = proxy_http_with(
        &proxy,
        "GET /v1/models",
        &format!("{key}Origin: https://app.example\r\n"),
        "",
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    let (status, head, _) = proxy_http_with(
        &proxy,
        "OPTIONS /v1/chat/completions",
        "Origin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n",
        "",
    );
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("access-control-allow-methods"),
        "{head}"
    );
    let (_, head, _) = proxy_http_with(
        &proxy,
        "GET /v1/models",
        &format!("{key}Origin: https://evil.example\r\n"),
        "",
    );
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{head}"
    );
    // An empty key file is refused at start.
    std::fs::write(&key_file, "\n").unwrap();
    let out = cinfer()
        .args(["proxy", "--listen", "127.0.0.1:0", "--server", &fake.url()])
        .arg("--keyserver-identity")
        .arg(fake.identity_hex())
        .args(["--program-sha256", &FAKE_PROGRAM, "--api-key-file"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"));
    // A missing key file and an origin that is not one are refused too,
    // before the proxy waits for any server (none listens at this address).
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    for (extra, reason) in [
        (
            vec![
                "--api-key-file".to_owned(),
                dir.join("missing.key").to_str().unwrap().to_owned(),
            ],
            "reading the API key file",
        ),
        (
            vec!["--cors-origin".to_owned(), "app.example".to_owned()],
            "--cors-origin \"app.example\" is not an origin",
        ),
    ] {
        let started = std::time::Instant::now();
        let out = cinfer()
            .args(["proxy", "--listen", "127.0.0.1:0", "--server", &nowhere])
            .arg("--keyserver-identity")
            .arg(fake.identity_hex())
            .args(["--program-sha256", &FAKE_PROGRAM])
            .args(&extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(reason), "{stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "it waited for the server"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn start_proxy_with(fake: &Fake, extra: &[&str]) -> Proxy {
    let mut child = cinfer()
        .args(["proxy", "--listen", "127.0.0.1:0", "--server", &fake.url()])
        .arg("--keyserver-identity")
        .arg(fake.identity_hex())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    // Lines before the start line (a startup check waiting) are skipped.
    let mut seen = String::new();
    let base = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("the proxy exited before listening: {seen:?}");
        }
        if let Some(w) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            break w.trim_end_matches(',').to_owned();
        }
        seen.push_str(&line);
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    Proxy { child, base }
}

/// Everything the peer sends until it closes (a reset counts as closed);
/// panics if it is still open after `limit`.
fn read_until_closed(conn: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let deadline = std::time::Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            !left.is_zero(),
            "the proxy did not close the connection in time"
        );
        conn.set_read_timeout(Some(left)).unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the proxy did not close the connection in time")
            }
            Err(_) => return out,
        }
    }
}

/// Sends a chat-completions head announcing 4096 body bytes, then trickles
/// one byte every 100 ms from another thread.
fn trickle_body(addr: &str) -> TcpStream {
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n"
    )
    .unwrap();
    let mut writer = conn.try_clone().unwrap();
    std::thread::spawn(move || {
        for _ in 0..4096 {
            if writer.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    conn
}

/// `cinfer proxy` (issue 16, bug 9): a trickled body is answered 408 with the
/// reason after `--read-timeout-ms`; with `--max-connections` open, further
/// connections are closed at once unanswered; then it serves again.
#[test]
fn proxy_cuts_off_slow_bodies_with_408_and_caps_connections() {
    let fake = Fake::start(Mode::Honest, StatementMode::Good, None);
    let proxy = start_proxy_with(
        &fake,
        &[
            "--any-program",
            "--max-connections",
            "2",
            "--read-timeout-ms",
            "1500",
        ],
    );
    let addr = proxy
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned();
    let started = std::time::Instant::now();
    let mut held = [trickle_body(&addr), trickle_body(&addr)];
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let mut extra = TcpStream::connect(&addr).unwrap();
        let answer = read_until_closed(&mut extra, Duration::from_secs(3));
        assert_eq!(
            String::from_utf8_lossy(&answer),
            "",
            "an answer over the cap"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "not closed at once: {:?}",
            t.elapsed()
        );
    }
    for conn in &mut held {
        let response = read_until_closed(conn, Duration::from_secs(8));
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
        assert!(head.starts_with("HTTP/1.1 408"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v["error"]["message"],
            "request body not received within 1500 ms"
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // The slots are free again: a real request is served.
    let t = std::time::Instant::now();
    loop {
        let mut probe = TcpStream::connect(&addr).unwrap();
        write!(
            probe,
            "GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        if read_until_closed(&mut probe, Duration::from_secs(3)).starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "not served again");
        std::thread::sleep(Duration::from_millis(20));
    }
}
