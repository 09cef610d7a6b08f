//! The cinfer client: talks to an (untrusted) inference server and trusts
//! only what it can verify.
//!
//! 1. [`Client::request_key`] fetches `GET {server}/v1/request-key`, verifies the
//!    keyserver-signed statement under the keyserver identity key the client
//!    pins, checks its validity window against the system clock and that it
//!    names a receipt key, and caches it.
//! 2. [`Client::chat`] seals the request to that key (HPKE), posts it to
//!    `POST {server}/v1/requests?program=NAME`, reads the reply stream record
//!    by record *as it arrives*, opens every sealed frame in order (each is
//!    authenticated: only an attested loader holding the request key, or this
//!    client, can produce one) and hands data chunks to the caller at once.
//!    It requires the authenticated final frame, then verifies the receipt:
//!    signature under the statement's receipt key, the digest of the sealed
//!    request it sent, the digest and count of the sealed frames it received,
//!    and the outcome carried by the final frame.
//!
//! Transport: blocking HTTP/1.1 on `ureq` (keep-alive, `https://` through
//! rustls with the webpki roots, proxies from the environment; see `http.rs`).
//! Confidentiality and integrity of requests and replies do not depend on the
//! transport (sealing and receipts do), but metadata (program name, sizes,
//! timing) is visible on a plain `http://` hop: use `https://` beyond
//! localhost or a trusted network.
//!
//! Errors never carry request or reply plaintext.
#![forbid(unsafe_code)]

mod http;

pub use cinfer_attest::{
    Receipt, RequestKeyStatement, SignedReceipt, SignedRequestKey, StatementError,
};
pub use cinfer_envelope::{EnvelopeError, ReplyStatus};
use cinfer_envelope::{ReplyChunk, RequestPublicKey};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use cinfer_attest::reply_digest;

/// Content type of a reply stream.
pub const REPLY_STREAM_CONTENT_TYPE: &str = "application/vnd.cinfer.reply-stream";
/// Record type: one sealed reply frame.
pub const RECORD_FRAME: u8 = 1;
/// Record type: the `SignedReceipt` JSON (last record of a completed request).
pub const RECORD_RECEIPT: u8 = 2;
/// Record type: JSON `{"error": "..."}` (the stream failed after it started).
pub const RECORD_ERROR: u8 = 3;

/// Largest sealed reply frame record accepted (the loader's frame limit is 16 MiB).
pub const MAX_FRAME_RECORD: usize = 16 * 1024 * 1024 + 64;
/// Largest receipt or error record accepted.
pub const MAX_JSON_RECORD: usize = 1024 * 1024;
/// Largest small JSON response (request key, models, error bodies) accepted.
pub const MAX_JSON_RESPONSE: usize = 1024 * 1024;
/// How much of a server's error text is kept in a [`ClientError`].
const MAX_ERROR_TEXT: usize = 512;

/// Everything that can go wrong. No variant carries request or reply plaintext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server URL is not a supported `http://` or `https://` URL.
    #[error("invalid server URL {0}")]
    InvalidUrl(String),
    /// The CA certificate file given for `https://` servers is not usable.
    #[error("CA certificates: {0}")]
    InvalidCaCertificate(String),
    /// The program name is not a plain name (letters, digits, `.`, `_`, `-`).
    #[error("invalid program name {0:?}")]
    InvalidProgram(String),
    /// A program pin is not a hex SHA-256 (64 hex digits).
    #[error("the pinned digest of program {0:?} is not a hex SHA-256")]
    InvalidProgramPin(String),
    /// The pinned keyserver identity key is not a P-256 point.
    #[error("the keyserver identity key is not a P-256 public key")]
    BadIdentityKey,
    /// Connecting, sending or receiving failed.
    #[error("transport: {0}")]
    Io(String),
    /// The server's response is not well-formed HTTP/1.1.
    #[error("malformed HTTP response: {0}")]
    Http(String),
    /// No attested loader is available (`503`): keyserver down, loader
    /// reconnecting, or keys not installed yet.
    #[error("no attested loader available (503): {0}")]
    NoAttestedLoader(String),
    /// The server refused the request with an HTTP error; `message` is the
    /// server's JSON `error` text (or a prefix of its body).
    #[error("server error {status}: {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The server's error text.
        message: String,
    },
    /// A response body is not what the API specifies.
    #[error("malformed server response: {0}")]
    MalformedResponse(String),
    /// The request-key statement's signature does not verify under the pinned identity.
    #[error("request-key statement is not signed by the pinned keyserver identity")]
    StatementSignature,
    /// The signed statement is not a well-formed request-key statement.
    #[error("malformed request-key statement: {0}")]
    StatementMalformed(String),
    /// k-of-n keyservers: fewer than `needed` pinned keyservers state the same
    /// valid request key, so no single keyserver (or the server) can make
    /// this client seal to a key of its choosing.
    #[error(
        "only {agreeing} of the {needed} pinned keyservers needed state the same request key ({detail})"
    )]
    NoKeyserverQuorum {
        /// The most pinned keyservers agreeing on one key.
        agreeing: usize,
        /// The threshold.
        needed: usize,
        /// What the others answered (fingerprints and reasons).
        detail: String,
    },
    /// The keyserver quorum is not satisfiable: threshold 0 or above the
    /// number of distinct identities pinned.
    #[error("keyserver threshold {threshold} with {pinned} distinct identities pinned")]
    BadKeyserverQuorum {
        /// The threshold asked for.
        threshold: usize,
        /// Distinct identities pinned.
        pinned: usize,
    },
    /// The statement is outside its validity window at the client's clock.
    #[error(
        "request-key statement not valid now (valid {not_before}..={not_after}, now {now}; Unix seconds)"
    )]
    StatementNotValid {
        /// Valid from.
        not_before: u64,
        /// Valid until.
        not_after: u64,
        /// The client's clock.
        now: u64,
    },
    /// The statement names no receipt key, so replies could not be verified.
    #[error(
        "request-key statement names no receipt key; refusing (receipts could not be verified)"
    )]
    NoReceiptKey,
    /// Sealing the request failed.
    #[error("sealing the request: {0}")]
    Seal(EnvelopeError),
    /// The reply is not a reply stream.
    #[error("unexpected reply content type {0:?}")]
    UnexpectedContentType(Option<String>),
    /// A sealed reply frame failed to authenticate: tampered, reordered,
    /// replayed, or from another request.
    #[error("reply frame {index} failed authentication (tampered, reordered, replayed or foreign)")]
    ReplyAuthentication {
        /// 0-based index of the frame in the stream.
        index: u64,
    },
    /// A sealed reply frame is malformed (unknown type, bad status, ...).
    #[error("reply frame {index} is malformed: {error}")]
    ReplyFrame {
        /// 0-based index of the frame.
        index: u64,
        /// Why.
        error: EnvelopeError,
    },
    /// A frame arrived after the authenticated final frame.
    #[error("reply frame after the authenticated final frame")]
    FrameAfterEnd,
    /// The reply stream ended (or the receipt came) without the authenticated final frame.
    #[error("reply truncated: no authenticated final frame")]
    Truncated,
    /// The reply ended after the final frame but without a receipt.
    #[error("reply ended without a receipt")]
    MissingReceipt,
    /// The server reported that the stream failed after it started.
    #[error("the server reported a failure mid-stream: {0}")]
    StreamFailed(String),
    /// A record of an unknown type.
    #[error("unknown reply-stream record type {0}")]
    UnknownRecord(u8),
    /// Anything after the receipt.
    #[error("data after the receipt (the receipt must be the last record)")]
    RecordAfterReceipt,
    /// The caller stopped the exchange ([`Client::chat_until`]); the
    /// connection was closed, so the server cancels the run on the loader.
    #[error("the exchange was cancelled by the caller")]
    Cancelled,
    /// The receipt's signature does not verify under the statement's receipt key.
    #[error("receipt is not signed by the attested loaders' receipt key")]
    ReceiptSignature,
    /// The receipt is not well-formed (or the receipt key is not a P-256 point).
    #[error("malformed receipt: {0}")]
    ReceiptMalformed(String),
    /// A verified receipt names another program component than the pinned one
    /// (the server had another admitted program answer).
    #[error("the reply was produced by program sha256 {receipt}, not the expected {expected}")]
    UnexpectedProgram {
        /// The pinned digest (hex, lower case).
        expected: String,
        /// The digest the receipt names.
        receipt: String,
    },
    /// A verified receipt does not match what the client sent or received.
    #[error("receipt does not match this exchange: {field}")]
    ReceiptMismatch {
        /// Which field disagrees (`request_sha256`, `reply_sha256`,
        /// `reply_frames`, `outcome`).
        field: &'static str,
    },
}

impl ClientError {
    /// Whether the error means something failed verification (as opposed to
    /// transport trouble or the server refusing).
    pub fn is_verification_failure(&self) -> bool {
        matches!(
            self,
            Self::StatementSignature
                | Self::StatementMalformed(_)
                | Self::NoKeyserverQuorum { .. }
                | Self::StatementNotValid { .. }
                | Self::NoReceiptKey
                | Self::ReplyAuthentication { .. }
                | Self::ReplyFrame { .. }
                | Self::FrameAfterEnd
                | Self::Truncated
                | Self::MissingReceipt
                | Self::RecordAfterReceipt
                | Self::UnknownRecord(_)
                | Self::ReceiptSignature
                | Self::ReceiptMalformed(_)
                | Self::ReceiptMismatch { .. }
                | Self::UnexpectedProgram { .. }
        )
    }
}

/// The outcome of a verified exchange.
#[derive(Debug, Clone)]
pub struct ChatResult {
    /// How the run ended (authenticated by the final frame, and equal to the
    /// receipt's outcome).
    pub status: ReplyStatus,
    /// The verified receipt.
    pub receipt: Receipt,
    /// The receipt as received (signed bytes and signature), for keeping.
    pub signed_receipt: SignedReceipt,
    /// The verified request-key statement the request was sealed under.
    pub statement: RequestKeyStatement,
}

/// The receipt's `outcome` string for a status.
pub fn outcome_name(status: ReplyStatus) -> &'static str {
    match status {
        ReplyStatus::Completed => "completed",
        ReplyStatus::ProgramFailed => "program-failed",
        ReplyStatus::Aborted => "aborted",
        ReplyStatus::Refused => "refused",
        _ => "unknown",
    }
}

/// A program the server lists (its word: a name, the component digest, the world).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ServerProgram {
    /// The policy name requests use.
    pub name: String,
    /// The component's SHA-256, hex.
    #[serde(default)]
    pub sha256: String,
    /// Its capability world.
    #[serde(default)]
    pub world: String,
}

/// A client of one inference server, pinned to one keyserver identity.
#[derive(Debug)]
pub struct Client {
    base: http::BaseUrl,
    identity: Vec<u8>,
    http: http::Http,
    timeouts: (Duration, Duration),
    roots: http::Roots,
    cached: Mutex<Option<RequestKeyStatement>>,
    /// k-of-n keyservers: the pinned identities and how many must agree
    /// (`None`: the one identity `identity`).
    quorum: Option<(Vec<Vec<u8>>, usize)>,
    /// Expected component digests (hex), by program name.
    program_pins: std::collections::BTreeMap<String, String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Keeps printable characters of untrusted server text, bounded.
fn sanitize(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_TEXT)
        .collect();
    if text.chars().count() > MAX_ERROR_TEXT {
        out.push('…');
    }
    out
}

/// The `error` text of a JSON error body, or a prefix of the body.
fn error_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct E {
        error: serde_json::Value,
    }
    match serde_json::from_slice::<E>(body) {
        Ok(E {
            error: serde_json::Value::String(s),
        }) => sanitize(&s),
        Ok(E { error }) => sanitize(&error.to_string()),
        Err(_) => sanitize(&String::from_utf8_lossy(body)),
    }
}

fn server_error(mut resp: http::Response) -> ClientError {
    let body = resp
        .body
        .read_limited(MAX_JSON_RESPONSE)
        .unwrap_or_default();
    let message = error_text(&body);
    if resp.status == 503 {
        ClientError::NoAttestedLoader(message)
    } else {
        ClientError::Server {
            status: resp.status,
            message,
        }
    }
}

/// Reads one record; `Ok(None)` at a clean end between records.
fn read_record(r: &mut impl Read) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "stream ended inside a record header",
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let kind = head[0];
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let max = if kind == RECORD_FRAME {
        MAX_FRAME_RECORD
    } else {
        MAX_JSON_RECORD
    };
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("record of {len} bytes over the {max}-byte limit"),
        ));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes)?;
    Ok(Some((kind, bytes)))
}

fn valid_program(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Client {
    /// A client of the server at `server_base_url` (`http://host:port` or
    /// `https://host[:port]`, optionally with a base path), trusting request keys signed by the keyserver identity
    /// `keyserver_identity_sec1` (the SEC1 point `keyserver public-identity`
    /// prints, hex-decoded).
    pub fn new(
        server_base_url: &str,
        keyserver_identity_sec1: Vec<u8>,
    ) -> Result<Self, ClientError> {
        let base = http::BaseUrl::parse(server_base_url)?;
        // Refuse a malformed pin up front (the statement check would refuse anyway).
        let probe = SignedRequestKey {
            statement_json: String::new(),
            signature: vec![0; 64],
        };
        if matches!(
            probe.verify(&keyserver_identity_sec1),
            Err(StatementError::BadIdentityKey)
        ) {
            return Err(ClientError::BadIdentityKey);
        }
        Ok(Self {
            base,
            identity: keyserver_identity_sec1,
            http: http::Http::new(
                Duration::from_secs(10),
                Duration::from_secs(300),
                &http::Roots::WebPki,
            ),
            timeouts: (Duration::from_secs(10), Duration::from_secs(300)),
            roots: http::Roots::WebPki,
            cached: Mutex::new(None),
            quorum: None,
            program_pins: std::collections::BTreeMap::new(),
        })
    }

    /// k-of-n keyservers: trusts a request key only when `threshold` of the
    /// keyserver `identities` (SEC1) state it, with valid signatures, and a
    /// reply only when its receipt names at least `threshold` of them as the
    /// keyservers whose shares opened the request. Replaces the single
    /// identity given to [`Client::new`].
    pub fn with_keyserver_quorum(
        mut self,
        identities: Vec<Vec<u8>>,
        threshold: usize,
    ) -> Result<Self, ClientError> {
        let probe = SignedRequestKey {
            statement_json: String::new(),
            signature: vec![0; 64],
        };
        if identities
            .iter()
            .any(|i| matches!(probe.verify(i), Err(StatementError::BadIdentityKey)))
        {
            return Err(ClientError::BadIdentityKey);
        }
        let mut distinct = identities.clone();
        distinct.sort();
        distinct.dedup();
        if threshold == 0 || threshold > distinct.len() {
            return Err(ClientError::BadKeyserverQuorum {
                threshold,
                pinned: distinct.len(),
            });
        }
        if let Some(first) = distinct.first() {
            self.identity = first.clone();
        }
        self.quorum = Some((distinct, threshold));
        Ok(self)
    }

    /// Pins the component digest (hex SHA-256, e.g. of the signed release) that
    /// must run `program`. The request is sealed bound to it (envelope header
    /// version 2), so a loader asked by the server to run it with any other
    /// component refuses before opening it; and a receipt naming any other
    /// component fails `chat` with `UnexpectedProgram`.
    /// A pin that is not 64 hex digits fails `chat` with `InvalidProgramPin`.
    pub fn with_program_pin(mut self, program: &str, sha256_hex: &str) -> Self {
        self.program_pins
            .insert(program.to_owned(), sha256_hex.to_ascii_lowercase());
        self
    }

    /// Sets the connect timeout and the read/write inactivity timeout
    /// (defaults 10 s and 300 s: generation may pause between tokens).
    pub fn with_timeouts(mut self, connect: Duration, io: Duration) -> Self {
        self.timeouts = (connect, io);
        self.http = http::Http::new(connect, io, &self.roots);
        self
    }

    /// Trusts only the certificate authorities in `pem` (a PEM file of one or
    /// more certificates, e.g. a deployment's private CA) for `https://`
    /// servers, instead of Mozilla's roots.
    pub fn with_root_certificates(mut self, pem: &[u8]) -> Result<Self, ClientError> {
        self.roots = http::Roots::from_pem(pem)?;
        self.http = http::Http::new(self.timeouts.0, self.timeouts.1, &self.roots);
        Ok(self)
    }

    /// The server base URL.
    pub fn server(&self) -> String {
        self.base.to_string()
    }

    /// k-of-n keyservers: how many pinned keyservers must agree, when the
    /// client has a quorum ([`Client::with_keyserver_quorum`]).
    pub fn keyserver_threshold(&self) -> Option<usize> {
        self.quorum.as_ref().map(|(_, k)| *k)
    }

    /// `sha256:` and the hex SHA-256 of the pinned identity key's SEC1 bytes;
    /// with a keyserver quorum, `K of N keyservers` and their fingerprints.
    pub fn identity_fingerprint(&self) -> String {
        match &self.quorum {
            Some((ids, k)) => format!(
                "{k} of {} keyservers ({})",
                ids.len(),
                ids.iter()
                    .map(|i| fingerprint(i)[..23].to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => fingerprint(&self.identity),
        }
    }

    fn get_json(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut resp = self.http.send(&self.base, "GET", path, None)?;
        if resp.status != 200 {
            return Err(server_error(resp));
        }
        resp.body
            .read_limited(MAX_JSON_RESPONSE)
            .map_err(|e| ClientError::Io(format!("{}{path}: {e}", self.base)))
    }

    /// Fetches, verifies and caches the request-key statement (always asks
    /// the server). With a keyserver quorum, fetches every keyserver's
    /// statement and requires `threshold` pinned ones to agree.
    pub fn request_key(&self) -> Result<RequestKeyStatement, ClientError> {
        let statement = match &self.quorum {
            Some((identities, threshold)) => {
                #[derive(serde::Deserialize)]
                struct All {
                    statements: Vec<SignedRequestKey>,
                }
                let body = self.get_json("/v1/request-keys")?;
                let all: All = serde_json::from_slice(&body).map_err(|e| {
                    ClientError::MalformedResponse(format!("/v1/request-keys: {e}"))
                })?;
                verify_quorum(&all.statements, identities, *threshold, unix_now())?
            }
            None => {
                let body = self.get_json("/v1/request-key")?;
                let signed: SignedRequestKey = serde_json::from_slice(&body).map_err(|e| {
                    ClientError::MalformedResponse(format!(
                        "/v1/request-key is not a SignedRequestKey: {e}"
                    ))
                })?;
                verify_statement(&signed, &self.identity, unix_now())?
            }
        };
        if let Ok(mut c) = self.cached.lock() {
            *c = Some(statement.clone());
        }
        Ok(statement)
    }

    /// The cached statement while it is valid, else a freshly fetched one.
    fn current_statement(&self) -> Result<RequestKeyStatement, ClientError> {
        let cached = self.cached.lock().ok().and_then(|c| c.clone());
        match cached {
            Some(s) if s.is_valid_at(unix_now()) => Ok(s),
            _ => self.request_key(),
        }
    }

    /// The programs the server says its loader admitted (`GET /v1/programs`:
    /// the server's word, not verified — receipts name the component that ran).
    pub fn programs(&self) -> Result<Vec<ServerProgram>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Programs {
            programs: Vec<ServerProgram>,
        }
        let body = self.get_json("/v1/programs")?;
        let p: Programs = serde_json::from_slice(&body)
            .map_err(|e| ClientError::MalformedResponse(format!("/v1/programs: {e}")))?;
        Ok(p.programs)
    }

    /// The model ids the server's attested loader holds keys for (`GET /v1/models`;
    /// the server's word, not verified — receipts name the models that ran).
    pub fn models(&self) -> Result<Vec<String>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Models {
            models: Vec<String>,
        }
        let body = self.get_json("/v1/models")?;
        let m: Models = serde_json::from_slice(&body)
            .map_err(|e| ClientError::MalformedResponse(format!("/v1/models: {e}")))?;
        Ok(m.models)
    }

    /// Runs `program` on `request` (sealed to the verified request key) and
    /// streams the reply: `on_chunk` gets each authenticated data chunk as it
    /// arrives. Returns only after the final frame and the receipt verified;
    /// on error, chunks already delivered came from authenticated frames but
    /// the exchange as a whole is not vouched for.
    pub fn chat(
        &self,
        program: &str,
        request: &[u8],
        mut on_chunk: impl FnMut(&[u8]),
    ) -> Result<ChatResult, ClientError> {
        self.chat_until(program, request, |chunk| {
            on_chunk(chunk);
            std::ops::ControlFlow::Continue(())
        })
    }

    /// [`Client::chat`], but `on_chunk` may stop the exchange
    /// (`ControlFlow::Break`, e.g. when whoever wanted the answer went away):
    /// the connection to the server is closed at once, which makes the server
    /// cancel the run on the loader, and the result is
    /// [`ClientError::Cancelled`].
    pub fn chat_until(
        &self,
        program: &str,
        request: &[u8],
        mut on_chunk: impl FnMut(&[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<ChatResult, ClientError> {
        if !valid_program(program) {
            return Err(ClientError::InvalidProgram(sanitize(program)));
        }
        let statement = self.current_statement()?;
        let public = RequestPublicKey::from_bytes(&statement.public_key)
            .map_err(|e| ClientError::StatementMalformed(e.to_string()))?;
        let (sealed, mut opener) = match self.program_pins.get(program) {
            Some(pin) => {
                let digest: [u8; 32] = hex::decode(pin)
                    .ok()
                    .and_then(|d| d.try_into().ok())
                    .ok_or_else(|| ClientError::InvalidProgramPin(program.to_owned()))?;
                cinfer_envelope::seal_request_for_program(&public, &digest, request)
            }
            None => cinfer_envelope::seal_request(&public, request),
        }
        .map_err(ClientError::Seal)?;
        let request_sha256 = hex::encode(Sha256::digest(&sealed));
        let path = format!("/v1/requests?program={program}");
        let resp = self.http.send(
            &self.base,
            "POST",
            &path,
            Some(("application/octet-stream", &sealed)),
        )?;
        if resp.status != 200 {
            return Err(server_error(resp));
        }
        let ok_type = resp.content_type.as_deref().is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case(REPLY_STREAM_CONTENT_TYPE))
        });
        if !ok_type {
            return Err(ClientError::UnexpectedContentType(
                resp.content_type.as_deref().map(sanitize),
            ));
        }
        let mut body = resp.body;
        let mut digest = cinfer_attest::ReplyDigest::default();
        let mut ended: Option<ReplyStatus> = None;
        loop {
            let record = match read_record(&mut body) {
                Ok(r) => r,
                Err(e) if ended.is_none() => {
                    // A cut stream before the final frame is truncation,
                    // whatever the transport says.
                    let _ = e;
                    return Err(ClientError::Truncated);
                }
                Err(e) => return Err(ClientError::Io(format!("reading the receipt: {e}"))),
            };
            let Some((kind, bytes)) = record else {
                return Err(if ended.is_none() {
                    ClientError::Truncated
                } else {
                    ClientError::MissingReceipt
                });
            };
            match kind {
                RECORD_FRAME => {
                    let index = digest.frames();
                    digest.update(&bytes);
                    match opener.open(&bytes) {
                        Ok(ReplyChunk::Data(d)) => {
                            if on_chunk(&d).is_break() {
                                // Dropping the body closes the connection.
                                return Err(ClientError::Cancelled);
                            }
                        }
                        Ok(ReplyChunk::End(s)) => ended = Some(s),
                        Err(EnvelopeError::AuthenticationFailed) => {
                            return Err(ClientError::ReplyAuthentication { index });
                        }
                        Err(EnvelopeError::FrameAfterEnd) => {
                            return Err(ClientError::FrameAfterEnd);
                        }
                        Err(error) => return Err(ClientError::ReplyFrame { index, error }),
                    }
                }
                RECORD_RECEIPT => {
                    let status = opener.finish().map_err(|_| ClientError::Truncated)?;
                    // The receipt is the last record: the body must end here.
                    let mut probe = [0u8; 1];
                    match body.read(&mut probe) {
                        Ok(0) => {}
                        Ok(_) => return Err(ClientError::RecordAfterReceipt),
                        Err(e) => {
                            return Err(ClientError::Io(format!("after the receipt: {e}")));
                        }
                    }
                    let signed: SignedReceipt = serde_json::from_slice(&bytes)
                        .map_err(|e| ClientError::ReceiptMalformed(e.to_string()))?;
                    let receipt = verify_receipt(
                        &signed,
                        &statement,
                        &request_sha256,
                        &hex::encode(digest.finish()),
                        digest.frames(),
                        status,
                    )?;
                    if let Some((identities, threshold)) = &self.quorum {
                        let named = receipt
                            .keyservers
                            .iter()
                            .filter_map(|k| hex::decode(k).ok())
                            .filter(|k| identities.contains(k))
                            .collect::<std::collections::BTreeSet<_>>()
                            .len();
                        if named < *threshold {
                            return Err(ClientError::ReceiptMismatch {
                                field: "keyservers",
                            });
                        }
                    }
                    if let Some(pin) = self.program_pins.get(program)
                        && !receipt.program_sha256.eq_ignore_ascii_case(pin)
                    {
                        return Err(ClientError::UnexpectedProgram {
                            expected: pin.to_ascii_lowercase(),
                            receipt: receipt.program_sha256.clone(),
                        });
                    }
                    return Ok(ChatResult {
                        status,
                        receipt,
                        signed_receipt: signed,
                        statement,
                    });
                }
                RECORD_ERROR => return Err(ClientError::StreamFailed(error_text(&bytes))),
                other => return Err(ClientError::UnknownRecord(other)),
            }
        }
    }
}

/// `sha256:` and the hex SHA-256 of a key's bytes.
pub fn fingerprint(key: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key)))
}

/// Verifies a signed request-key statement under the pinned identity at time
/// `now` (Unix seconds): signature, format, validity window, receipt key, and
/// that `key_id` names `public_key`.
pub fn verify_statement(
    signed: &SignedRequestKey,
    identity: &[u8],
    now: u64,
) -> Result<RequestKeyStatement, ClientError> {
    let statement = signed.verify(identity).map_err(|e| match e {
        StatementError::BadIdentityKey => ClientError::BadIdentityKey,
        StatementError::BadSignature => ClientError::StatementSignature,
        StatementError::Malformed(m) => ClientError::StatementMalformed(m),
        other => ClientError::StatementMalformed(other.to_string()),
    })?;
    if !statement.is_valid_at(now) {
        return Err(ClientError::StatementNotValid {
            not_before: statement.not_before,
            not_after: statement.not_after,
            now,
        });
    }
    if statement.receipt_public_key.is_empty() {
        return Err(ClientError::NoReceiptKey);
    }
    let public = RequestPublicKey::from_bytes(&statement.public_key)
        .map_err(|e| ClientError::StatementMalformed(e.to_string()))?;
    if public.key_id() != statement.key_id {
        return Err(ClientError::StatementMalformed(
            "key_id does not name public_key".into(),
        ));
    }
    Ok(statement)
}

/// k-of-n keyservers: the request key that at least `threshold` of the pinned
/// `identities` state, each statement verified as [`verify_statement`] does
/// (each identity counted once; statements signed by no pinned identity are
/// ignored). The returned statement's validity window is where all of the
/// agreeing statements are valid.
pub fn verify_quorum(
    signed: &[SignedRequestKey],
    identities: &[Vec<u8>],
    threshold: usize,
    now: u64,
) -> Result<RequestKeyStatement, ClientError> {
    type KeyTriple = (String, Vec<u8>, Vec<u8>);
    let mut agree: std::collections::BTreeMap<KeyTriple, Vec<(usize, RequestKeyStatement)>> =
        std::collections::BTreeMap::new();
    let mut notes = Vec::new();
    for (i, identity) in identities.iter().enumerate() {
        let mut found = None;
        let mut last_error = None;
        for s in signed {
            match verify_statement(s, identity, now) {
                Ok(st) => {
                    found = Some(st);
                    break;
                }
                Err(ClientError::StatementSignature) => {}
                Err(e) => last_error = Some(e),
            }
        }
        match found {
            Some(st) => agree
                .entry((
                    st.key_id.clone(),
                    st.public_key.clone(),
                    st.receipt_public_key.clone(),
                ))
                .or_default()
                .push((i, st)),
            None => notes.push(format!(
                "{}: {}",
                &fingerprint(identity)[..23],
                last_error.map_or_else(|| "no statement".to_owned(), |e| e.to_string())
            )),
        }
    }
    let keys_stated = agree.len();
    let best = agree.into_values().max_by_key(Vec::len).unwrap_or_default();
    if best.len() < threshold {
        if keys_stated > 1 {
            notes.push(format!(
                "the keyservers that answered state {keys_stated} different keys"
            ));
        }
        return Err(ClientError::NoKeyserverQuorum {
            agreeing: best.len(),
            needed: threshold,
            detail: if notes.is_empty() {
                "no other answers".into()
            } else {
                notes.join("; ")
            },
        });
    }
    let mut statement = best[0].1.clone();
    for (_, s) in &best[1..] {
        statement.not_before = statement.not_before.max(s.not_before);
        statement.not_after = statement.not_after.min(s.not_after);
    }
    Ok(statement)
}

/// Verifies a receipt for one exchange: signature under the statement's
/// receipt key, then every digest and count against what the client saw.
pub fn verify_receipt(
    signed: &SignedReceipt,
    statement: &RequestKeyStatement,
    request_sha256: &str,
    reply_sha256: &str,
    reply_frames: u64,
    status: ReplyStatus,
) -> Result<Receipt, ClientError> {
    let receipt = signed
        .verify(&statement.receipt_public_key)
        .map_err(|e| match e {
            StatementError::BadSignature => ClientError::ReceiptSignature,
            StatementError::BadIdentityKey => {
                ClientError::ReceiptMalformed("the receipt key is not a P-256 point".into())
            }
            StatementError::Malformed(m) => ClientError::ReceiptMalformed(m),
            other => ClientError::ReceiptMalformed(other.to_string()),
        })?;
    if !receipt.request_sha256.eq_ignore_ascii_case(request_sha256) {
        return Err(ClientError::ReceiptMismatch {
            field: "request_sha256",
        });
    }
    if !receipt.reply_sha256.eq_ignore_ascii_case(reply_sha256) {
        return Err(ClientError::ReceiptMismatch {
            field: "reply_sha256",
        });
    }
    if receipt.reply_frames != reply_frames {
        return Err(ClientError::ReceiptMismatch {
            field: "reply_frames",
        });
    }
    // A run the loader stopped because the server cancelled it (its client
    // went away, or a hostile server) is an authenticated abort: the receipt
    // says `cancelled`, the final frame `Aborted`.
    let cancelled = status == ReplyStatus::Aborted && receipt.outcome == "cancelled";
    if receipt.outcome != outcome_name(status) && !cancelled {
        return Err(ClientError::ReceiptMismatch { field: "outcome" });
    }
    // A refusal is the classifier's: the receipt names it and a verdict other
    // than allow; a verdict other than allow means the program did not run.
    let allowed = receipt.classifier.as_ref().map(|c| c.verdict == "allow");
    match (status == ReplyStatus::Refused, allowed) {
        (true, Some(false)) | (false, None | Some(true)) => {}
        _ => {
            return Err(ClientError::ReceiptMismatch {
                field: "classifier",
            });
        }
    }
    Ok(receipt)
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec1(k: &p256::ecdsa::SigningKey) -> Vec<u8> {
        k.verifying_key().to_sec1_point(false).as_bytes().to_vec()
    }

    fn statement_for(request: u8, not_after: u64) -> RequestKeyStatement {
        let key = cinfer_envelope::RequestPrivateKey::from_bytes(&[request; 32]).unwrap();
        let receipt = p256::ecdsa::SigningKey::from_slice(&[request + 1; 32]).unwrap();
        RequestKeyStatement {
            statement_type: cinfer_attest::release::REQUEST_KEY_STATEMENT_TYPE.into(),
            key_id: key.public_key().key_id(),
            suite: cinfer_attest::release::REQUEST_KEY_SUITE.into(),
            public_key: key.public_key().to_bytes(),
            not_before: 10,
            not_after,
            receipt_public_key: sec1(&receipt),
        }
    }

    #[test]
    fn a_request_key_is_trusted_only_when_k_pinned_keyservers_state_it() {
        let ks: Vec<p256::ecdsa::SigningKey> = (1..=4u8)
            .map(|i| p256::ecdsa::SigningKey::from_slice(&[i; 32]).unwrap())
            .collect();
        let pinned: Vec<Vec<u8>> = ks[..3].iter().map(sec1).collect();
        let good = statement_for(7, 100);
        let other = statement_for(9, 100);
        let sign = |s: &RequestKeyStatement, k: usize| SignedRequestKey::sign(s, &ks[k]);

        // Two of three agree (the third states another key): trusted, with
        // the window where both are valid.
        let shorter = RequestKeyStatement {
            not_after: 90,
            ..good.clone()
        };
        let got = verify_quorum(
            &[sign(&good, 0), sign(&shorter, 1), sign(&other, 2)],
            &pinned,
            2,
            50,
        )
        .unwrap();
        assert_eq!(
            (got.key_id.as_str(), got.not_after),
            (good.key_id.as_str(), 90)
        );

        // One pinned keyserver (twice), an unpinned one, and a disagreeing one:
        // not enough, with the reason.
        let err = verify_quorum(
            &[
                sign(&good, 0),
                sign(&good, 0),
                sign(&good, 3),
                sign(&other, 2),
            ],
            &pinned,
            2,
            50,
        )
        .unwrap_err();
        match err {
            ClientError::NoKeyserverQuorum {
                agreeing,
                needed,
                detail,
            } => {
                assert_eq!((agreeing, needed), (1, 2));
                assert!(detail.contains("2 different keys"), "{detail}");
                assert!(detail.contains("no statement"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // Expired statements do not count.
        let err = verify_quorum(&[sign(&good, 0), sign(&good, 1)], &pinned, 2, 101).unwrap_err();
        assert!(
            matches!(err, ClientError::NoKeyserverQuorum { agreeing: 0, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("not valid now"), "{err}");

        // Quorums that cannot be met are refused up front.
        let client = Client::new("http://127.0.0.1:1", pinned[0].clone()).unwrap();
        assert!(matches!(
            client.with_keyserver_quorum(vec![pinned[0].clone(), pinned[0].clone()], 2),
            Err(ClientError::BadKeyserverQuorum {
                threshold: 2,
                pinned: 1
            })
        ));
    }

    #[test]
    fn records_parse_and_bound() {
        let mut bytes = vec![1, 0, 0, 0, 2, b'h', b'i', 2, 0, 0, 0, 0];
        let mut r = &bytes[..];
        assert_eq!(read_record(&mut r).unwrap(), Some((1, b"hi".to_vec())));
        assert_eq!(read_record(&mut r).unwrap(), Some((2, vec![])));
        assert_eq!(read_record(&mut r).unwrap(), None);
        bytes.truncate(3);
        assert!(read_record(&mut &bytes[..]).is_err());
        let huge = [2u8, 0xff, 0xff, 0xff, 0xff];
        assert!(read_record(&mut &huge[..]).is_err());
    }

    #[test]
    fn error_text_is_the_json_error_or_a_bounded_prefix() {
        assert_eq!(
            error_text(br#"{"error":"no attested loader"}"#),
            "no attested loader"
        );
        assert_eq!(error_text(b"plain\ntext"), "plain text");
        assert!(error_text(&[b'x'; 5000]).chars().count() <= MAX_ERROR_TEXT + 1);
    }

    /// A receipt saying `cancelled` verifies with an aborted final frame (the
    /// loader stopped the run when the server cancelled it), and only then.
    #[test]
    fn a_cancelled_receipt_matches_an_aborted_reply_only() {
        let key = p256::ecdsa::SigningKey::from_slice(&[0x22; 32]).unwrap();
        let statement = RequestKeyStatement {
            statement_type: String::new(),
            key_id: String::new(),
            suite: String::new(),
            public_key: Vec::new(),
            not_before: 0,
            not_after: 0,
            receipt_public_key: key.verifying_key().to_sec1_point(false).as_bytes().to_vec(),
        };
        let receipt = |outcome: &str| Receipt {
            receipt_type: cinfer_attest::RECEIPT_TYPE.into(),
            request_sha256: "aa".into(),
            program_sha256: "bb".into(),
            policy_sha256: "cc".into(),
            model_sha256: Default::default(),
            reply_sha256: "dd".into(),
            reply_frames: 3,
            outcome: outcome.into(),
            classifier: None,
            keyservers: Vec::new(),
        };
        let check = |outcome: &str, status: ReplyStatus| {
            let signed = SignedReceipt::sign(&receipt(outcome), &key);
            verify_receipt(&signed, &statement, "aa", "dd", 3, status)
        };
        assert!(check("cancelled", ReplyStatus::Aborted).is_ok());
        // `refused` needs the classifier's deny in the receipt, and a deny needs `refused`.
        let with_verdict = |outcome: &str, verdict: &str, status: ReplyStatus| {
            let mut r = receipt(outcome);
            r.classifier = Some(cinfer_attest::ReceiptClassifier {
                name: "guard".into(),
                sha256: "ee".into(),
                verdict: verdict.into(),
            });
            verify_receipt(
                &SignedReceipt::sign(&r, &key),
                &statement,
                "aa",
                "dd",
                3,
                status,
            )
        };
        assert!(with_verdict("refused", "deny", ReplyStatus::Refused).is_ok());
        assert!(with_verdict("refused", "failed", ReplyStatus::Refused).is_ok());
        assert!(with_verdict("completed", "allow", ReplyStatus::Completed).is_ok());
        for (outcome, verdict, status) in [
            ("refused", "allow", ReplyStatus::Refused),
            ("completed", "deny", ReplyStatus::Completed),
        ] {
            assert!(matches!(
                with_verdict(outcome, verdict, status),
                Err(ClientError::ReceiptMismatch {
                    field: "classifier"
                })
            ));
        }
        assert!(matches!(
            check("refused", ReplyStatus::Refused),
            Err(ClientError::ReceiptMismatch {
                field: "classifier"
            })
        ));
        assert!(check("aborted", ReplyStatus::Aborted).is_ok());
        for status in [ReplyStatus::Completed, ReplyStatus::ProgramFailed] {
            assert!(matches!(
                check("cancelled", status),
                Err(ClientError::ReceiptMismatch { field: "outcome" })
            ));
        }
    }

    #[test]
    fn program_names_are_plain() {
        assert!(valid_program("llama-chat"));
        assert!(!valid_program("a&b=c"));
        assert!(!valid_program(""));
    }
}
