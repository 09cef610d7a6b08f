//! The trusted loader's one channel to the outside: frames over one byte stream.
//!
//! The loader never opens a connection. It listens on one endpoint (TCP or a Unix
//! socket in development, vsock in a VM) and everything — attestation, key
//! release, sealed requests and replies — travels as frames through it. The peer
//! (the untrusted inference server, or a test relay) learns nothing from them:
//! evidence is public, released keys are HPKE-wrapped to the key the quote binds,
//! requests and replies are sealed end to end.
//!
//! A frame is an 8-byte header and a payload:
//!
//! ```text
//! version (u8 = 1) | kind (u8) | reserved (u16 = 0) | payload length (u32, big-endian) | payload
//! ```
//!
//! The reader checks the version, the kind and the reserved bytes, and refuses a
//! length above its limit *before* allocating or reading the payload, so a peer
//! cannot make the loader buffer more than the limit. Every refusal is a typed
//! [`FrameError`]; after one the stream is out of sync and must be closed.
//!
//! The peer proves who it is before the loader serves it: `Hello` carries a
//! fresh challenge, the peer answers [`Kind::Auth`] with a [`PeerAuth`]
//! (its P-256 public key and an ECDSA signature over [`auth_message`]), and
//! the loader serves it only if the key is one its measured configuration
//! names. The formats are here; the signature is made and checked by the
//! two ends.
#![forbid(unsafe_code)]

use std::io::{Read, Write};

/// Frame format version written and accepted.
pub const VERSION: u8 = 1;
/// Length of the frame header.
pub const HEADER_LEN: usize = 8;
/// Default largest payload accepted: 16 MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 << 20;

/// What a frame carries. Payload formats are named per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// loader → peer, first frame: JSON `{"protocol": 1, "loader": "<version>", "ak_public": hex}`.
    Hello,
    /// peer → loader: a keyserver nonce (raw bytes) to attest to.
    AttestRequest,
    /// loader → peer: `cinfer_attest::Evidence` JSON.
    Evidence,
    /// peer → loader: a keyserver's `KeyRelease` JSON (keys HPKE-wrapped to the loader).
    KeyRelease,
    /// loader → peer: JSON `{"models": [ids], "request_keys": [key ids]}` now held.
    KeysInstalled,
    /// loader → peer: JSON `{"error": "<reason>"}`; never carries secrets.
    Error,
    /// peer → loader: run a sealed request. Payload: [`Submit`] encoding
    /// (`request id u64 | program name len u16 | name | sealed request`).
    Submit,
    /// loader → peer: one sealed reply frame of a request
    /// (`request id u64 | sealed frame`), in order.
    Reply,
    /// loader → peer: the request finished; its last `Reply` was the sealed final
    /// frame (`request id u64 | receipt JSON`).
    Done,
    /// loader → peer: the request was refused before it ran
    /// (`request id u64 | {"error": "<reason>"}`).
    Refused,
    /// peer → loader: a program to admit ([`ProgramUpload`]); answered by
    /// `Admitted` or `Error` (the policy decides, exactly as for configured programs).
    Program,
    /// loader → peer: JSON `{"name","sha256","world"}` of the program now served.
    Admitted,
    /// peer → loader: stop a running request (`request id u64`), e.g. because
    /// its client went away. No answer of its own: the request ends as usual
    /// (`Done`, outcome `cancelled`) unless it had finished already.
    Cancel,
    /// peer → loader, first frame when `Hello` carries a challenge: a
    /// [`PeerAuth`] (public key and signature over [`auth_message`]).
    Auth,
    /// loader → peer: the `Auth` verified; JSON `{"key": "sha256:<hex>"}`.
    Authenticated,
    /// peer → loader: nothing to say (keeps an idle link inside the loader's
    /// idle timeout, `idle_timeout_ms` in `Hello`). Empty; no answer.
    Ping,
}

impl Kind {
    /// The wire byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Kind::Hello => 1,
            Kind::AttestRequest => 2,
            Kind::Evidence => 3,
            Kind::KeyRelease => 4,
            Kind::KeysInstalled => 5,
            Kind::Error => 6,
            Kind::Submit => 7,
            Kind::Reply => 8,
            Kind::Done => 9,
            Kind::Refused => 10,
            Kind::Program => 11,
            Kind::Admitted => 12,
            Kind::Cancel => 13,
            Kind::Auth => 14,
            Kind::Authenticated => 15,
            Kind::Ping => 16,
        }
    }

    /// The kind for a wire byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::AttestRequest,
            3 => Kind::Evidence,
            4 => Kind::KeyRelease,
            5 => Kind::KeysInstalled,
            6 => Kind::Error,
            7 => Kind::Submit,
            8 => Kind::Reply,
            9 => Kind::Done,
            10 => Kind::Refused,
            11 => Kind::Program,
            12 => Kind::Admitted,
            13 => Kind::Cancel,
            14 => Kind::Auth,
            15 => Kind::Authenticated,
            16 => Kind::Ping,
            _ => return None,
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Why a frame was refused or could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream failed.
    #[error("channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The header names another format version.
    #[error("unsupported frame version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// The header names a kind this side does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The reserved header bytes are not zero.
    #[error("reserved frame header bytes are not zero")]
    ReservedNotZero,
    /// The payload is longer than the limit (checked before reading it).
    #[error("frame payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Length the header announced (or the payload given to write).
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("channel closed inside a frame")]
    Truncated,
}

/// A request id prefix (`u64`, big-endian) and the rest of a payload, for the
/// request-scoped kinds (`Reply`, `Done`, `Refused`).
pub fn split_request_id(payload: &[u8]) -> Option<(u64, &[u8])> {
    let (id, rest) = payload.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*id), rest))
}

/// `request id || bytes`.
pub fn with_request_id(id: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + bytes.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// A `Submit` payload: which program runs which sealed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submit {
    /// Chosen by the peer; echoed in every answer.
    pub request_id: u64,
    /// The program's policy name.
    pub program: String,
    /// The HPKE-sealed request.
    pub sealed: Vec<u8>,
}

impl Submit {
    /// Largest program name.
    pub const MAX_PROGRAM_LEN: usize = 128;

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.program.as_bytes();
        let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        let mut out = Vec::with_capacity(10 + name.len() + self.sealed.len());
        out.extend_from_slice(&self.request_id.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&name[..usize::from(len)]);
        out.extend_from_slice(&self.sealed);
        out
    }

    /// Decodes a payload; `None` if it is malformed (short, name too long or not UTF-8).
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let (request_id, rest) = split_request_id(payload)?;
        let (len, rest) = rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        if len == 0 || len > Self::MAX_PROGRAM_LEN || rest.len() < len {
            return None;
        }
        let program = std::str::from_utf8(&rest[..len]).ok()?.to_owned();
        Some(Submit {
            request_id,
            program,
            sealed: rest[len..].to_vec(),
        })
    }
}

/// A `Program` payload: a component the peer stores and asks the loader to
/// admit, with its signatures (Sigstore bundles or detached key signatures).
/// Encoding: `name len u16 | name | component len u32 | component |
/// signature count u16 | (len u32 | signature)*`, nothing after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramUpload {
    /// The name requests will use.
    pub name: String,
    /// The component bytes.
    pub component: Vec<u8>,
    /// Signature files.
    pub signatures: Vec<Vec<u8>>,
}

impl ProgramUpload {
    /// Most signatures one upload may carry.
    pub const MAX_SIGNATURES: usize = 16;

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let mut out = Vec::with_capacity(12 + name.len() + self.component.len());
        out.extend_from_slice(&(name.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        out.extend_from_slice(&name[..name.len().min(usize::from(u16::MAX))]);
        out.extend_from_slice(&(self.component.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.component);
        out.extend_from_slice(&(self.signatures.len() as u16).to_be_bytes());
        for s in &self.signatures {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s);
        }
        out
    }

    /// Decodes a payload; `None` if malformed (short, trailing bytes, a bad
    /// name, too many signatures).
    pub fn decode(payload: &[u8]) -> Option<Self> {
        fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if rest.len() < n {
                return None;
            }
            let (head, tail) = rest.split_at(n);
            *rest = tail;
            Some(head)
        }
        fn u16_at(rest: &mut &[u8]) -> Option<usize> {
            take(rest, 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
        fn u32_at(rest: &mut &[u8]) -> Option<usize> {
            take(rest, 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        }
        let mut rest = payload;
        let name_len = u16_at(&mut rest)?;
        if name_len == 0 || name_len > Submit::MAX_PROGRAM_LEN {
            return None;
        }
        let name = std::str::from_utf8(take(&mut rest, name_len)?)
            .ok()?
            .to_owned();
        let component_len = u32_at(&mut rest)?;
        let component = take(&mut rest, component_len)?.to_vec();
        let count = u16_at(&mut rest)?;
        if count > Self::MAX_SIGNATURES {
            return None;
        }
        let mut signatures = Vec::with_capacity(count);
        for _ in 0..count {
            let len = u32_at(&mut rest)?;
            signatures.push(take(&mut rest, len)?.to_vec());
        }
        rest.is_empty().then_some(Self {
            name,
            component,
            signatures,
        })
    }
}

/// Length of the challenge in `Hello`.
pub const CHALLENGE_LEN: usize = 32;

/// What the peer signs to authenticate: a domain-separation label and the
/// challenge from this connection's `Hello`.
pub fn auth_message(challenge: &[u8; CHALLENGE_LEN]) -> Vec<u8> {
    const LABEL: &[u8] = b"cinfer/channel/peer-auth/v1\0";
    let mut out = Vec::with_capacity(LABEL.len() + CHALLENGE_LEN);
    out.extend_from_slice(LABEL);
    out.extend_from_slice(challenge);
    out
}

/// An `Auth` payload: `public key (65 bytes, uncompressed SEC1 P-256) |
/// signature (64 bytes, ECDSA P-256 / SHA-256, r || s)`, nothing after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuth {
    /// The peer's public key, uncompressed SEC1.
    pub public_key: [u8; 65],
    /// Its signature over [`auth_message`], `r || s`.
    pub signature: [u8; 64],
}

impl PeerAuth {
    /// Length of the payload.
    pub const LEN: usize = 65 + 64;

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes a payload; `None` unless it is exactly [`PeerAuth::LEN`] bytes.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let payload: &[u8; Self::LEN] = payload.try_into().ok()?;
        let (key, sig) = payload.split_at(65);
        Some(Self {
            public_key: key.try_into().ok()?,
            signature: sig.try_into().ok()?,
        })
    }
}

impl FrameError {
    /// The error of a failed payload read: the stream ending early is
    /// [`FrameError::Truncated`] (for blocking and async readers alike).
    pub fn reading_payload(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    }
}

/// Parses a header: the kind and payload length, checked against `max_payload`.
pub fn decode_header(
    header: &[u8; HEADER_LEN],
    max_payload: u32,
) -> Result<(Kind, u32), FrameError> {
    if header[0] != VERSION {
        return Err(FrameError::UnsupportedVersion(header[0]));
    }
    let kind = Kind::from_byte(header[1]).ok_or(FrameError::UnknownKind(header[1]))?;
    if header[2] != 0 || header[3] != 0 {
        return Err(FrameError::ReservedNotZero);
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len > max_payload {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max: max_payload,
        });
    }
    Ok((kind, len))
}

/// Encodes one frame (header + payload).
pub fn encode(kind: Kind, payload: &[u8], max_payload: u32) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= max_payload)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
            max: max_payload,
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&[VERSION, kind.to_byte(), 0, 0]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes the first frame of `buf`. Returns `Ok(None)` when `buf` holds only part
/// of a (so far valid) frame, else the frame and the bytes it used.
pub fn decode(buf: &[u8], max_payload: u32) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let (kind, len) = decode_header(header, max_payload)?;
    let end = HEADER_LEN + len as usize;
    match buf.get(HEADER_LEN..end) {
        Some(payload) => Ok(Some((
            Frame {
                kind,
                payload: payload.to_vec(),
            },
            end,
        ))),
        None => Ok(None),
    }
}

/// Reads one frame. `Ok(None)` when the stream ends cleanly before a header.
pub fn read_frame(r: &mut impl Read, max_payload: u32) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, len) = decode_header(&header, max_payload)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .map_err(FrameError::reading_payload)?;
    Ok(Some(Frame { kind, payload }))
}

/// Writes one frame and flushes.
pub fn write_frame(
    w: &mut impl Write,
    kind: Kind,
    payload: &[u8],
    max_payload: u32,
) -> Result<(), FrameError> {
    w.write_all(&encode(kind, payload, max_payload)?)?;
    w.flush()?;
    Ok(())
}

/// Where a channel listens: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address (development; loopback by default).
    Tcp(String),
    /// A Unix socket path.
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("tcp", addr)) if !addr.is_empty() => Ok(Endpoint::Tcp(addr.to_owned())),
            Some(("unix", path)) if !path.is_empty() => Ok(Endpoint::Unix(path.into())),
            Some(("vsock", _)) => {
                Err("vsock endpoints are not built yet; use tcp: or unix:".into())
            }
            _ => Err(format!(
                "endpoint {s:?}: expected tcp:HOST:PORT or unix:PATH"
            )),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 1024;

    #[test]
    fn round_trips_over_a_stream() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Evidence, b"{}", MAX).unwrap();
        write_frame(&mut wire, Kind::AttestRequest, &[7; 32], MAX).unwrap();
        write_frame(&mut wire, Kind::Error, b"", MAX).unwrap();
        let mut r = wire.as_slice();
        assert_eq!(read_frame(&mut r, MAX).unwrap().unwrap().payload, b"{}");
        let f = read_frame(&mut r, MAX).unwrap().unwrap();
        assert_eq!((f.kind, f.payload.len()), (Kind::AttestRequest, 32));
        assert_eq!(read_frame(&mut r, MAX).unwrap().unwrap().kind, Kind::Error);
        assert!(read_frame(&mut r, MAX).unwrap().is_none(), "clean end");
    }

    #[test]
    fn refusals_are_typed() {
        let good = encode(Kind::Hello, b"hi", MAX).unwrap();
        let mut v = good.clone();
        v[0] = 2;
        assert!(matches!(
            decode(&v, MAX),
            Err(FrameError::UnsupportedVersion(2))
        ));
        let mut v = good.clone();
        v[1] = 0xee;
        assert!(matches!(
            decode(&v, MAX),
            Err(FrameError::UnknownKind(0xee))
        ));
        let mut v = good.clone();
        v[3] = 1;
        assert!(matches!(decode(&v, MAX), Err(FrameError::ReservedNotZero)));
        // An oversized frame is refused from its header alone, before any payload.
        let huge = [VERSION, 3, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut &huge[..], MAX),
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                max: MAX
            })
        ));
        assert!(matches!(
            encode(Kind::Hello, &[0; 1025], MAX),
            Err(FrameError::TooLarge { len: 1025, .. })
        ));
        // Truncated inside the header or the payload.
        assert!(matches!(
            read_frame(&mut &good[..3], MAX),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &good[..good.len() - 1], MAX),
            Err(FrameError::Truncated)
        ));
        assert!(decode(&good[..good.len() - 1], MAX).unwrap().is_none());
    }

    /// The stable stand-in for the fuzz target (`fuzz/fuzz_targets/channel_frame.rs`):
    /// random and mutated inputs never panic, never allocate past the limit, and
    /// whatever decodes re-encodes to the same bytes.
    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = encode(Kind::KeyRelease, b"{\"keys\":[]}", MAX).unwrap();
        for i in 0..200_000 {
            let mut buf = if i % 2 == 0 {
                seed.clone()
            } else {
                (0..(next() % 40) as usize).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 4) {
                if !buf.is_empty() {
                    let at = (next() as usize) % buf.len();
                    buf[at] = next() as u8;
                }
            }
            if let Ok(Some((frame, used))) = decode(&buf, MAX) {
                assert!(frame.payload.len() <= MAX as usize);
                assert_eq!(
                    encode(frame.kind, &frame.payload, MAX).unwrap(),
                    buf[..used]
                );
            }
            let _ = read_frame(&mut buf.as_slice(), MAX);
        }
    }

    #[test]
    fn submit_round_trips_and_refuses_malformed() {
        let s = Submit {
            request_id: 7,
            program: "llama-chat".into(),
            sealed: vec![1, 2, 3],
        };
        assert_eq!(Submit::decode(&s.encode()), Some(s.clone()));
        let bytes = s.encode();
        for cut in 0..10 {
            assert_eq!(Submit::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut long = with_request_id(1, &200u16.to_be_bytes());
        long.extend_from_slice(&[b'a'; 200]);
        assert_eq!(Submit::decode(&long), None);
        let mut bad_utf8 = with_request_id(1, &1u16.to_be_bytes());
        bad_utf8.push(0xff);
        assert_eq!(Submit::decode(&bad_utf8), None);
        assert_eq!(
            split_request_id(&with_request_id(9, b"x")),
            Some((9, &b"x"[..]))
        );
    }

    #[test]
    fn program_upload_round_trips_and_refuses_malformed() {
        let p = ProgramUpload {
            name: "llama-chat".into(),
            component: b"\0asm component".to_vec(),
            signatures: vec![b"sig one".to_vec(), b"{}".to_vec()],
        };
        let bytes = p.encode();
        assert_eq!(ProgramUpload::decode(&bytes), Some(p.clone()));
        for cut in 0..bytes.len() {
            assert_eq!(ProgramUpload::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(ProgramUpload::decode(&trailing), None);
        let many = ProgramUpload {
            signatures: vec![Vec::new(); 17],
            ..p
        };
        assert_eq!(ProgramUpload::decode(&many.encode()), None);
    }

    #[test]
    fn peer_auth_round_trips_and_refuses_other_lengths() {
        let a = PeerAuth {
            public_key: [4; 65],
            signature: [9; 64],
        };
        let bytes = a.encode();
        assert_eq!(bytes.len(), PeerAuth::LEN);
        assert_eq!(PeerAuth::decode(&bytes), Some(a));
        assert_eq!(PeerAuth::decode(&bytes[..PeerAuth::LEN - 1]), None);
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(PeerAuth::decode(&long), None);
        // The signed message is labelled and carries the whole challenge.
        let m = auth_message(&[7; CHALLENGE_LEN]);
        assert!(m.starts_with(b"cinfer/channel/peer-auth/v1\0"));
        assert!(m.ends_with(&[7; CHALLENGE_LEN]));
        for k in [Kind::Auth, Kind::Authenticated, Kind::Ping] {
            assert_eq!(Kind::from_byte(k.to_byte()), Some(k));
        }
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "tcp:127.0.0.1:7000".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:7000".into()))
        );
        assert_eq!(
            "unix:/run/l.sock".parse(),
            Ok(Endpoint::Unix("/run/l.sock".into()))
        );
        assert!(
            "vsock:3:5000"
                .parse::<Endpoint>()
                .unwrap_err()
                .contains("not built yet")
        );
        assert!("http://x".parse::<Endpoint>().is_err());
    }
}
