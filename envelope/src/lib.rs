//! Sealed requests and sealed replies, shared by the trusted loader and the client.
//!
//! * A **request** is one HPKE (RFC 9180) message in base mode with the suite
//!   DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, sealed to a request
//!   public key. Its header (version, suite, key id) is bound into both the HPKE
//!   `info` and the AEAD associated data, so changing any header byte makes the
//!   request fail to open. A request may be **bound to a program**
//!   ([`seal_request_for_program`], header version 2): the header then carries
//!   the SHA-256 of the one component allowed to run it, which the loader
//!   compares with the program it was asked to run before opening anything
//!   ([`request_program`]); the untrusted side cannot strip or change it.
//! * A request carries the time it was sealed ([`request_sealed_at`], header
//!   versions 3 and 4: versions 1 and 2 plus a big-endian `u64` of Unix
//!   milliseconds at the end of the header). Like the rest of the header it is
//!   authenticated when the request opens. A serving loader refuses requests
//!   sealed outside its replay window, so the set of requests it remembers
//!   only has to cover that window (`cinfer_host::replay`).
//! * A **reply** is a stream of AES-256-GCM chunks in the STREAM construction
//!   (`aead-stream`'s big-endian 32-bit counter with a last-chunk flag in the
//!   nonce), keyed from the request's HPKE exporter secret. Chunks are numbered
//!   implicitly by the counter, so reordering, replay or dropping a chunk fails
//!   to authenticate; the stream ends with an authenticated final chunk carrying
//!   the run's [`ReplyStatus`], so truncation is detected.
//!
//! Only the holder of the request private key (an attested loader) and the
//! client that sealed the request can read or forge reply chunks.
//!
//! Errors are deliberately coarse where detail would be an oracle: every
//! authentication failure is [`EnvelopeError::AuthenticationFailed`].
#![forbid(unsafe_code)]

use aead_stream::{DecryptorBE32, EncryptorBE32};
use aes_gcm::{Aes256Gcm, KeyInit};
use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::DhP256HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub mod keywrap;

type Kem = DhP256HkdfSha256;

/// Envelope format version of a request header without a program binding.
pub const REQUEST_VERSION: u8 = 1;
/// Envelope format version of a request header bound to a program: version 1's
/// header followed by the component's SHA-256.
pub const REQUEST_VERSION_BOUND: u8 = 2;
/// Envelope format version of a request header carrying its seal time:
/// version 1's header followed by the seal time (Unix milliseconds, `u64` BE).
/// What [`seal_request`] writes.
pub const REQUEST_VERSION_TIMED: u8 = 3;
/// Version 2's header (bound to a program) followed by the seal time. What
/// [`seal_request_for_program`] writes.
pub const REQUEST_VERSION_TIMED_BOUND: u8 = 4;
/// HPKE suite identifiers (RFC 9180 §7): KEM, KDF, AEAD.
pub const SUITE: [u16; 3] = [0x0010, 0x0001, 0x0002];
/// Length of an encapsulated P-256 key (uncompressed SEC1 point).
pub const ENC_LEN: usize = 65;
/// Length of a serialized request private key (P-256 scalar).
pub const PRIVATE_KEY_LEN: usize = 32;
/// Length of a serialized request public key (uncompressed SEC1 point).
pub const PUBLIC_KEY_LEN: usize = 65;
/// AES-GCM tag length added to every sealed payload.
pub const TAG_LEN: usize = 16;
/// Largest key id accepted in a request header.
pub const MAX_KEY_ID_LEN: usize = 64;

const INFO_PREFIX: &[u8] = b"cinfer/request/v1";
const REPLY_SECRET_LABEL: &[u8] = b"cinfer/reply/v2 secret";
const REPLY_KEY_LABEL: &[u8] = b"cinfer/reply/v2 key";
const REPLY_NONCE_LABEL: &[u8] = b"cinfer/reply/v2 nonce";
/// Length of the per-run salt the loader draws and sends (in clear, bound by the
/// key it derives) at the front of a reply's first frame.
pub const REPLY_SALT_LEN: usize = 32;
const FRAME_DATA: u8 = 0;
const FRAME_FINAL: u8 = 1;
const DEV_KEY_TAG: &str = "cinfer-dev-request-key-v1";

/// Why a request or reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The bytes end before the named field is complete.
    #[error("sealed message truncated: missing {0}")]
    Truncated(&'static str),
    /// The request header names a format version this code does not speak.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// The request header names an HPKE suite other than the one this project uses.
    #[error("unsupported HPKE suite {0:04x}/{1:04x}/{2:04x}")]
    UnsupportedSuite(u16, u16, u16),
    /// The request was sealed to another key than the one offered to open it.
    #[error("request sealed to key id {found:?}, this key is {expected:?}")]
    WrongKey {
        /// Key id in the request header.
        found: String,
        /// Key id of the private key at hand.
        expected: String,
    },
    /// The key id in the header is empty, too long or not printable ASCII.
    #[error("malformed key id in request header")]
    MalformedKeyId,
    /// The encapsulated key is not a valid P-256 point.
    #[error("malformed encapsulated key")]
    MalformedEncapsulatedKey,
    /// Key material (a private or public key) has the wrong form.
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    /// Decryption failed: the ciphertext, header, frame order or key is wrong.
    /// Deliberately carries no detail.
    #[error("authentication failed")]
    AuthenticationFailed,
    /// A reply frame has an unknown type byte.
    #[error("unknown reply frame type {0}")]
    UnknownFrameType(u8),
    /// The final reply chunk does not carry a valid status.
    #[error("malformed reply status")]
    MalformedStatus,
    /// The system's random number generator failed.
    #[error("no system randomness")]
    NoRandomness,
    /// A reply frame arrived after the authenticated final chunk.
    #[error("reply frame after the final chunk")]
    FrameAfterEnd,
    /// The reply stream ended without its authenticated final chunk.
    #[error("reply truncated: no authenticated final chunk")]
    ReplyTruncated,
    /// The reply stream is longer than the STREAM counter allows.
    #[error("reply stream exhausted")]
    StreamExhausted,
}

/// A request private key. Its `Debug` output never shows key material.
#[derive(Clone)]
pub struct RequestPrivateKey {
    sk: <Kem as hpke::Kem>::PrivateKey,
    pk: RequestPublicKey,
}

impl std::fmt::Debug for RequestPrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestPrivateKey")
            .field("key_id", &self.pk.key_id())
            .finish_non_exhaustive()
    }
}

/// A request public key, as published for clients.
#[derive(Clone, PartialEq, Eq)]
pub struct RequestPublicKey {
    pk: <Kem as hpke::Kem>::PublicKey,
}

impl std::fmt::Debug for RequestPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestPublicKey")
            .field("key_id", &self.key_id())
            .finish()
    }
}

impl RequestPrivateKey {
    /// Generates a fresh key pair from the operating system's random source.
    pub fn generate() -> Self {
        let (sk, pk) = Kem::gen_keypair();
        Self {
            sk,
            pk: RequestPublicKey { pk },
        }
    }

    /// Parses a 32-byte big-endian P-256 scalar.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() != PRIVATE_KEY_LEN {
            return Err(EnvelopeError::MalformedKey("private key must be 32 bytes"));
        }
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes)
            .map_err(|_| EnvelopeError::MalformedKey("not a valid P-256 scalar"))?;
        let pk = Kem::sk_to_pk(&sk);
        Ok(Self {
            sk,
            pk: RequestPublicKey { pk },
        })
    }

    /// The scalar, for storing the key. Zeroized on drop.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.sk.to_bytes().to_vec())
    }

    /// The matching public key.
    pub fn public_key(&self) -> &RequestPublicKey {
        &self.pk
    }

    /// Parses a development key file written by [`RequestPrivateKey::to_dev_key_file`].
    pub fn from_dev_key_file(text: &str) -> Result<Self, EnvelopeError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or(EnvelopeError::MalformedKey(
                "no key line in development key file",
            ))?;
        let hex_key =
            line.strip_prefix(DEV_KEY_TAG)
                .map(str::trim)
                .ok_or(EnvelopeError::MalformedKey(
                    "development key line must start with cinfer-dev-request-key-v1",
                ))?;
        let bytes = Zeroizing::new(
            hex::decode(hex_key).map_err(|_| EnvelopeError::MalformedKey("key is not hex"))?,
        );
        Self::from_bytes(&bytes)
    }

    /// Serializes the key as a development key file: clearly marked, never for production.
    pub fn to_dev_key_file(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "# cinfer DEVELOPMENT-ONLY request private key (key id {}).\n\
             # Never use it in production: real request keys are released by the\n\
             # keyserver to attested loaders only.\n{DEV_KEY_TAG} {}\n",
            self.pk.key_id(),
            hex::encode(self.sk.to_bytes())
        ))
    }
}

impl RequestPublicKey {
    /// Parses an uncompressed SEC1 P-256 point (65 bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() != PUBLIC_KEY_LEN {
            return Err(EnvelopeError::MalformedKey("public key must be 65 bytes"));
        }
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(bytes)
            .map_err(|_| EnvelopeError::MalformedKey("not a valid P-256 point"))?;
        Ok(Self { pk })
    }

    /// The uncompressed SEC1 encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.pk.to_bytes().to_vec()
    }

    /// Short, stable identifier: hex of the first 8 bytes of SHA-256 of the encoding.
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.pk.to_bytes())[..8])
    }
}

/// The parsed, still-sealed parts of a request.
struct RequestParts<'a> {
    header: &'a [u8],
    key_id: &'a str,
    program: Option<[u8; 32]>,
    sealed_at_ms: Option<u64>,
    enc: &'a [u8],
    ciphertext: &'a [u8],
}

fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], EnvelopeError> {
    if bytes.len() < n {
        return Err(EnvelopeError::Truncated(what));
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Ok(head)
}

fn parse_request(sealed: &[u8]) -> Result<RequestParts<'_>, EnvelopeError> {
    let mut rest = sealed;
    let version = take(&mut rest, 1, "version")?[0];
    let (bound, timed) = match version {
        REQUEST_VERSION => (false, false),
        REQUEST_VERSION_BOUND => (true, false),
        REQUEST_VERSION_TIMED => (false, true),
        REQUEST_VERSION_TIMED_BOUND => (true, true),
        _ => return Err(EnvelopeError::UnsupportedVersion(version)),
    };
    let suite = take(&mut rest, 6, "suite")?;
    let ids = [
        u16::from_be_bytes([suite[0], suite[1]]),
        u16::from_be_bytes([suite[2], suite[3]]),
        u16::from_be_bytes([suite[4], suite[5]]),
    ];
    if ids != SUITE {
        return Err(EnvelopeError::UnsupportedSuite(ids[0], ids[1], ids[2]));
    }
    let key_id_len = usize::from(take(&mut rest, 1, "key id length")?[0]);
    if key_id_len == 0 || key_id_len > MAX_KEY_ID_LEN {
        return Err(EnvelopeError::MalformedKeyId);
    }
    let key_id = take(&mut rest, key_id_len, "key id")?;
    if !key_id.iter().all(|b| b.is_ascii_graphic()) {
        return Err(EnvelopeError::MalformedKeyId);
    }
    let key_id = std::str::from_utf8(key_id).map_err(|_| EnvelopeError::MalformedKeyId)?;
    let program = if bound {
        let d = take(&mut rest, 32, "program digest")?;
        let mut digest = [0u8; 32];
        digest.copy_from_slice(d);
        Some(digest)
    } else {
        None
    };
    let sealed_at_ms = if timed {
        let t = take(&mut rest, 8, "seal time")?;
        let mut be = [0u8; 8];
        be.copy_from_slice(t);
        Some(u64::from_be_bytes(be))
    } else {
        None
    };
    let header = &sealed[..sealed.len() - rest.len()];
    let enc = take(&mut rest, ENC_LEN, "encapsulated key")?;
    if rest.len() < TAG_LEN {
        return Err(EnvelopeError::Truncated("ciphertext"));
    }
    Ok(RequestParts {
        header,
        key_id,
        program,
        sealed_at_ms,
        enc,
        ciphertext: rest,
    })
}

fn encode_header(
    key_id: &str,
    program: Option<&[u8; 32]>,
    sealed_at_ms: u64,
) -> Result<Vec<u8>, EnvelopeError> {
    if key_id.is_empty()
        || key_id.len() > MAX_KEY_ID_LEN
        || !key_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(EnvelopeError::MalformedKeyId);
    }
    let mut header = Vec::with_capacity(8 + key_id.len() + 32 + 8);
    header.push(if program.is_some() {
        REQUEST_VERSION_TIMED_BOUND
    } else {
        REQUEST_VERSION_TIMED
    });
    for id in SUITE {
        header.extend_from_slice(&id.to_be_bytes());
    }
    header.push(key_id.len() as u8); // checked <= MAX_KEY_ID_LEN above
    header.extend_from_slice(key_id.as_bytes());
    if let Some(digest) = program {
        header.extend_from_slice(digest);
    }
    header.extend_from_slice(&sealed_at_ms.to_be_bytes());
    Ok(header)
}

fn info_for(header: &[u8]) -> Vec<u8> {
    [INFO_PREFIX, header].concat()
}

/// The request's reply secret, from the HPKE exporter.
fn reply_secret<F>(export: F) -> Result<Zeroizing<[u8; 32]>, EnvelopeError>
where
    F: Fn(&[u8], &mut [u8]) -> Result<(), hpke::HpkeError>,
{
    let mut secret = Zeroizing::new([0u8; 32]);
    export(REPLY_SECRET_LABEL, secret.as_mut_slice())
        .map_err(|_| EnvelopeError::AuthenticationFailed)?;
    Ok(secret)
}

/// The reply stream's key and nonce prefix for one run: the request's secret
/// mixed with the run's salt. The loader draws a fresh salt for every run, so
/// running the same sealed request twice (a replay by the untrusted side) never
/// reuses a key and nonce. SHA-256 over labelled, fixed-length inputs with a
/// uniformly random 32-byte secret is the key derivation here (the `hkdf`
/// crate in the tree is built for another `digest` version than `sha2` 0.10).
fn reply_stream_keys(
    secret: &[u8; 32],
    salt: &[u8; REPLY_SALT_LEN],
) -> (Zeroizing<[u8; 32]>, [u8; 7]) {
    let derive = |label: &[u8]| -> Zeroizing<[u8; 32]> {
        let mut h = Sha256::new();
        h.update(label);
        h.update(secret);
        h.update(salt);
        Zeroizing::new(h.finalize().into())
    };
    let key = derive(REPLY_KEY_LABEL);
    let mut nonce = [0u8; 7];
    nonce.copy_from_slice(&derive(REPLY_NONCE_LABEL)[..7]);
    (key, nonce)
}

fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(key.into())
}

/// Seals `plaintext` to `public_key`, stamped with the current time. Returns
/// the sealed request and the state the client needs to open the reply.
pub fn seal_request(
    public_key: &RequestPublicKey,
    plaintext: &[u8],
) -> Result<(Vec<u8>, ReplyOpener), EnvelopeError> {
    seal(public_key, None, unix_millis_now(), plaintext)
}

/// Seals `plaintext` to `public_key` (bound to the component `program` when
/// given) with an explicit seal time in Unix milliseconds: for callers with
/// their own clock, and tests of the loader's replay window.
pub fn seal_request_at(
    public_key: &RequestPublicKey,
    program: Option<&[u8; 32]>,
    sealed_at_ms: u64,
    plaintext: &[u8],
) -> Result<(Vec<u8>, ReplyOpener), EnvelopeError> {
    seal(public_key, program, sealed_at_ms, plaintext)
}

/// The system clock in Unix milliseconds (0 before 1970).
fn unix_millis_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seals `plaintext` to `public_key` for one program only: the component whose
/// SHA-256 is `program_sha256`. A loader asked to run it with any other
/// program refuses before opening it ([`request_program`]).
pub fn seal_request_for_program(
    public_key: &RequestPublicKey,
    program_sha256: &[u8; 32],
    plaintext: &[u8],
) -> Result<(Vec<u8>, ReplyOpener), EnvelopeError> {
    seal(
        public_key,
        Some(program_sha256),
        unix_millis_now(),
        plaintext,
    )
}

fn seal(
    public_key: &RequestPublicKey,
    program: Option<&[u8; 32]>,
    sealed_at_ms: u64,
    plaintext: &[u8],
) -> Result<(Vec<u8>, ReplyOpener), EnvelopeError> {
    let header = encode_header(&public_key.key_id(), program, sealed_at_ms)?;
    let (enc, mut ctx) = hpke::setup_sender::<AesGcm256, HkdfSha256, Kem>(
        &OpModeS::Base,
        &public_key.pk,
        &info_for(&header),
    )
    .map_err(|_| EnvelopeError::MalformedKey("public key rejected by HPKE"))?;
    let ciphertext = ctx
        .seal(plaintext, &header)
        .map_err(|_| EnvelopeError::StreamExhausted)?;
    let secret = reply_secret(|label, out| ctx.export(label, out))?;
    let mut sealed = header;
    sealed.extend_from_slice(&enc.to_bytes());
    sealed.extend_from_slice(&ciphertext);
    Ok((
        sealed,
        ReplyOpener {
            secret,
            decryptor: None,
            started: false,
            ended: None,
        },
    ))
}

/// Returns the key id a sealed request names, without opening it.
pub fn request_key_id(sealed: &[u8]) -> Result<&str, EnvelopeError> {
    parse_request(sealed).map(|p| p.key_id)
}

/// Returns the SHA-256 of the program a sealed request is bound to, if any,
/// without opening it. The header is authenticated when the request is opened:
/// a request whose binding was changed or removed fails to open.
pub fn request_program(sealed: &[u8]) -> Result<Option<[u8; 32]>, EnvelopeError> {
    parse_request(sealed).map(|p| p.program)
}

/// Returns the time a sealed request says it was sealed (Unix milliseconds),
/// or `None` for header versions 1 and 2, without opening it. The time is
/// authenticated when the request opens: a request whose time was changed
/// fails to open.
pub fn request_sealed_at(sealed: &[u8]) -> Result<Option<u64>, EnvelopeError> {
    parse_request(sealed).map(|p| p.sealed_at_ms)
}

/// Opens a sealed request with the private key. Returns the cleartext (zeroized on
/// drop) and the sealer for the reply stream.
pub fn open_request(
    key: &RequestPrivateKey,
    sealed: &[u8],
) -> Result<(Zeroizing<Vec<u8>>, ReplySealer), EnvelopeError> {
    let parts = parse_request(sealed)?;
    let expected = key.pk.key_id();
    if parts.key_id != expected {
        return Err(EnvelopeError::WrongKey {
            found: parts.key_id.to_owned(),
            expected,
        });
    }
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(parts.enc)
        .map_err(|_| EnvelopeError::MalformedEncapsulatedKey)?;
    let mut ctx = hpke::setup_receiver::<AesGcm256, HkdfSha256, Kem>(
        &OpModeR::Base,
        &key.sk,
        &enc,
        &info_for(parts.header),
    )
    .map_err(|_| EnvelopeError::MalformedEncapsulatedKey)?;
    let plaintext = Zeroizing::new(
        ctx.open(parts.ciphertext, parts.header)
            .map_err(|_| EnvelopeError::AuthenticationFailed)?,
    );
    let secret = reply_secret(|label, out| ctx.export(label, out))?;
    let mut salt = [0u8; REPLY_SALT_LEN];
    getrandom::fill(&mut salt).map_err(|_| EnvelopeError::NoRandomness)?;
    let (stream_key, nonce) = reply_stream_keys(&secret, &salt);
    Ok((
        plaintext,
        ReplySealer {
            encryptor: EncryptorBE32::from_aead(cipher(&stream_key), (&nonce).into()),
            salt: Some(salt),
            chunks: 0,
        },
    ))
}

/// How a run ended, carried authenticated in the final reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyStatus {
    /// The program returned success.
    Completed = 0,
    /// The program returned an error.
    ProgramFailed = 1,
    /// The loader stopped the program (a trap: a limit or policy violation).
    Aborted = 2,
    /// The policy's safety classifier refused the request; the program did
    /// not run.
    Refused = 3,
}

impl ReplyStatus {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Completed),
            1 => Some(Self::ProgramFailed),
            2 => Some(Self::Aborted),
            3 => Some(Self::Refused),
            _ => None,
        }
    }
}

/// Seals reply chunks (loader side).
pub struct ReplySealer {
    encryptor: EncryptorBE32<Aes256Gcm>,
    /// The run's salt, until the first frame carries it.
    salt: Option<[u8; REPLY_SALT_LEN]>,
    chunks: u64,
}

impl std::fmt::Debug for ReplySealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplySealer")
            .field("chunks", &self.chunks)
            .finish_non_exhaustive()
    }
}

impl ReplySealer {
    /// Seals one data chunk into a frame.
    pub fn seal_chunk(&mut self, chunk: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let ct = self
            .encryptor
            .encrypt_next(chunk)
            .map_err(|_| EnvelopeError::StreamExhausted)?;
        self.chunks += 1;
        Ok(self.frame(FRAME_DATA, &ct))
    }

    /// Length of the frame [`ReplySealer::seal_chunk`] makes of a chunk of
    /// `chunk_len` bytes next (the first frame also carries the run's salt).
    pub fn frame_len(&self, chunk_len: usize) -> usize {
        let salt = if self.salt.is_some() {
            REPLY_SALT_LEN
        } else {
            0
        };
        1 + salt + chunk_len + TAG_LEN
    }

    /// Seals the final frame, which authenticates the end of the stream and its status.
    pub fn finish(self, status: ReplyStatus) -> Result<Vec<u8>, EnvelopeError> {
        let ReplySealer {
            encryptor, salt, ..
        } = self;
        let ct = encryptor
            .encrypt_last(&[status as u8][..])
            .map_err(|_| EnvelopeError::StreamExhausted)?;
        Ok(Self::frame_with(salt, FRAME_FINAL, &ct))
    }

    /// `type || [salt, first frame only] || ciphertext`.
    fn frame(&mut self, kind: u8, ct: &[u8]) -> Vec<u8> {
        Self::frame_with(self.salt.take(), kind, ct)
    }

    fn frame_with(salt: Option<[u8; REPLY_SALT_LEN]>, kind: u8, ct: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(1 + REPLY_SALT_LEN + ct.len());
        frame.push(kind);
        if let Some(salt) = salt {
            frame.extend_from_slice(&salt);
        }
        frame.extend_from_slice(ct);
        frame
    }

    /// Number of data chunks sealed so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }
}

/// One opened reply frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyChunk {
    /// A piece of the reply.
    Data(Zeroizing<Vec<u8>>),
    /// The authenticated end of the reply.
    End(ReplyStatus),
}

/// Opens reply frames in order (client side).
pub struct ReplyOpener {
    secret: Zeroizing<[u8; 32]>,
    decryptor: Option<DecryptorBE32<Aes256Gcm>>,
    /// Whether the first frame (with the run's salt) was seen.
    started: bool,
    ended: Option<ReplyStatus>,
}

impl std::fmt::Debug for ReplyOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyOpener")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl ReplyOpener {
    /// Opens the next frame. Frames must be given in the order they were sealed.
    pub fn open(&mut self, frame: &[u8]) -> Result<ReplyChunk, EnvelopeError> {
        let (&kind, mut ct) = frame
            .split_first()
            .ok_or(EnvelopeError::Truncated("reply frame type"))?;
        if self.ended.is_some() {
            return Err(EnvelopeError::FrameAfterEnd);
        }
        if !self.started {
            let (salt, rest) = ct
                .split_first_chunk::<REPLY_SALT_LEN>()
                // A frame too short to be a first frame: one from elsewhere in the stream.
                .ok_or(EnvelopeError::AuthenticationFailed)?;
            let (key, nonce) = reply_stream_keys(&self.secret, salt);
            self.decryptor = Some(DecryptorBE32::from_aead(cipher(&key), (&nonce).into()));
            self.started = true;
            ct = rest;
        }
        let decryptor = self
            .decryptor
            .as_mut()
            .ok_or(EnvelopeError::FrameAfterEnd)?;
        match kind {
            FRAME_DATA => decryptor
                .decrypt_next(ct)
                .map(|pt| ReplyChunk::Data(Zeroizing::new(pt)))
                .map_err(|_| EnvelopeError::AuthenticationFailed),
            FRAME_FINAL => {
                let decryptor = self.decryptor.take().ok_or(EnvelopeError::FrameAfterEnd)?;
                let pt = match decryptor.decrypt_last(ct) {
                    Ok(pt) => pt,
                    Err(_) => return Err(EnvelopeError::AuthenticationFailed),
                };
                let status = match pt.as_slice() {
                    [b] => ReplyStatus::from_byte(*b).ok_or(EnvelopeError::MalformedStatus)?,
                    _ => return Err(EnvelopeError::MalformedStatus),
                };
                self.ended = Some(status);
                Ok(ReplyChunk::End(status))
            }
            other => Err(EnvelopeError::UnknownFrameType(other)),
        }
    }

    /// Opens a whole reply; fails unless it ends with the authenticated final chunk.
    pub fn open_all<'a>(
        mut self,
        frames: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(Zeroizing<Vec<u8>>, ReplyStatus), EnvelopeError> {
        let mut out = Zeroizing::new(Vec::new());
        for frame in frames {
            match self.open(frame)? {
                ReplyChunk::Data(d) => out.extend_from_slice(&d),
                ReplyChunk::End(_) => {}
            }
        }
        let status = self.finish()?;
        Ok((out, status))
    }

    /// Call when the transport ends: fails if the final chunk never arrived.
    pub fn finish(&self) -> Result<ReplyStatus, EnvelopeError> {
        self.ended.ok_or(EnvelopeError::ReplyTruncated)
    }
}

#[cfg(test)]
mod tests;
