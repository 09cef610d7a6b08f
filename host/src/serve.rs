//! `trusted-loader serve`: measure, then attest and receive keys through the
//! loader's one channel.
//!
//! At start the loader measures what it trusts into one PCR (its own binary, its
//! serve configuration, every policy file, every trust root; [`measurements`]),
//! keeping the event log, then listens on one endpoint ([`cinfer_channel`]). It
//! never opens a connection. The peer (the untrusted inference server, or a test
//! relay) asks it to attest to a keyserver nonce; the loader makes a fresh
//! ephemeral HPKE key pair for that attestation only and answers with a TPM quote
//! binding `SHA-256(nonce || public key)`. The keyserver's answer, relayed back,
//! holds keys HPKE-wrapped to that public key: only this process can unwrap them,
//! the relay sees ciphertext. The ephemeral key is used once (a replayed release
//! finds no pending attestation), and a release is installed all or nothing.

use crate::Policy;
use crate::policy::PolicyFileRole;
use cinfer_attest::{Event, EventKind, Evidence, KeyRelease, ReleasedKeyKind, release_context};
use cinfer_channel::{Frame, FrameError, Kind};
use cinfer_envelope::RequestPrivateKey;
use cinfer_envelope::keywrap::{WrappedSecret, unwrap_key};
use cinfer_sealed_model::ModelKey;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::{Read, Write};

/// Shortest and longest keyserver nonce accepted.
const NONCE_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// The serve configuration (`loader.toml`). It is measured as it is on disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    /// Endpoint to listen on: `tcp:HOST:PORT` or `unix:PATH`.
    pub listen: String,
    /// TPM TCTI: `swtpm:host=127.0.0.1,port=2321`, `device:/dev/tpmrm0`.
    pub tpm: String,
    /// Policy TOML, relative to the configuration's directory (and inside it).
    pub policy: String,
    /// PCR the loader resets and measures into (16 or 23).
    #[serde(default = "default_pcr")]
    pub pcr: u8,
    /// PCRs the quote covers (SHA-256 bank); must include `pcr`. In a VM add the
    /// boot PCRs the keyserver pins (e.g. 0–7).
    #[serde(default = "default_quote_pcrs")]
    pub quote_pcrs: Vec<u8>,
    /// Largest frame payload accepted on the channel.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
}

fn default_pcr() -> u8 {
    cinfer_attest::DEFAULT_PCR
}
fn default_quote_pcrs() -> Vec<u8> {
    vec![cinfer_attest::DEFAULT_PCR]
}
fn default_max_frame() -> u32 {
    cinfer_channel::DEFAULT_MAX_PAYLOAD
}

impl ServeConfig {
    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> Result<Self, ServeError> {
        let c: ServeConfig =
            toml::from_str(text).map_err(|e| ServeError::Config(e.message().to_owned()))?;
        if !c.quote_pcrs.contains(&c.pcr) {
            return Err(ServeError::Config(format!(
                "quote-pcrs {:?} must include the measured pcr {}",
                c.quote_pcrs, c.pcr
            )));
        }
        c.listen
            .parse::<cinfer_channel::Endpoint>()
            .map_err(ServeError::Config)?;
        Ok(c)
    }
}

/// Why serving failed or a frame was refused. Messages carry no key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The serve configuration is invalid.
    #[error("serve configuration: {0}")]
    Config(String),
    /// The TPM refused or failed.
    #[error(transparent)]
    Tpm(#[from] cinfer_tpm::TpmError),
    /// The channel failed or a frame was malformed (the connection is closed).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A frame of a kind the loader does not accept from its peer.
    #[error("unexpected {0:?} frame from the peer")]
    UnexpectedFrame(Kind),
    /// The nonce to attest to is too short or too long.
    #[error("nonce of {0} bytes (16 to 64 accepted)")]
    BadNonce(usize),
    /// A key release arrived with no attestation waiting for it (or a second time).
    #[error("key release without a pending attestation (each attestation's key is used once)")]
    NoPendingAttestation,
    /// The key release answers another nonce than the pending attestation's.
    #[error("key release answers another nonce than the pending attestation")]
    NonceMismatch,
    /// The key release does not parse or has another version.
    #[error("malformed key release: {0}")]
    MalformedRelease(String),
    /// A released key did not unwrap (tampered, or wrapped to another key).
    #[error("released {kind} key `{id}` does not unwrap")]
    Unwrap {
        /// Key kind.
        kind: ReleasedKeyKind,
        /// Model or key id.
        id: String,
    },
    /// A released key unwrapped but is not a valid key of its kind or id.
    #[error("released {kind} key `{id}` is not a valid key: {reason}")]
    BadKey {
        /// Key kind.
        kind: ReleasedKeyKind,
        /// Model or key id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// The event log a loader with this binary, configuration and policy extends
/// into `pcr` at start, in order: binary, configuration, then every policy file
/// (trust roots as `trust-root`, the rest as `policy`). Operators compute
/// reference values with the same function (`trusted-loader measure`).
pub fn measurements(
    pcr: u8,
    binary: &[u8],
    config_name: &str,
    config_bytes: &[u8],
    policy: &Policy,
) -> Vec<Event> {
    let mut events = vec![
        Event::measure(pcr, EventKind::LoaderBinary, "trusted-loader", binary),
        Event::measure(pcr, EventKind::Config, config_name, config_bytes),
    ];
    for f in policy.files() {
        events.push(Event {
            pcr,
            kind: match f.role {
                PolicyFileRole::TrustRoot => EventKind::TrustRoot,
                _ => EventKind::Policy,
            },
            name: f.name.clone(),
            digest: f.sha256,
        });
    }
    events
}

/// Keys received from keyservers, by id. Never printed.
#[derive(Default)]
pub struct InstalledKeys {
    /// Request private keys, by key id.
    pub request: BTreeMap<String, RequestPrivateKey>,
    /// Model data keys, by model id.
    pub models: BTreeMap<String, ModelKey>,
    /// The receipt signing key, once released.
    pub receipt: Option<p256::ecdsa::SigningKey>,
}

impl std::fmt::Debug for InstalledKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstalledKeys")
            .field("request", &self.request.keys().collect::<Vec<_>>())
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .field("receipt", &self.receipt.is_some())
            .finish()
    }
}

struct Pending {
    nonce: Vec<u8>,
    key: RequestPrivateKey,
}

/// The attestation side of a serving loader: its TPM, its event log, the
/// pending attestation and the keys it received.
pub struct Attestor {
    tpm: cinfer_tpm::Tpm,
    events: Vec<Event>,
    quote_pcrs: Vec<u8>,
    pending: Option<Pending>,
    keys: InstalledKeys,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor")
            .field("tpm", &self.tpm)
            .field("events", &self.events.len())
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct Hello<'a> {
    protocol: u8,
    loader: &'a str,
    #[serde(with = "hex::serde")]
    ak_public: &'a [u8],
    pcr: u8,
}

#[derive(serde::Serialize)]
struct Installed<'a> {
    models: Vec<&'a str>,
    request_keys: Vec<&'a str>,
}

impl Attestor {
    /// Resets `pcr` and extends it with `events` (which must all name it).
    pub fn measure(
        mut tpm: cinfer_tpm::Tpm,
        pcr: u8,
        events: Vec<Event>,
        quote_pcrs: Vec<u8>,
    ) -> Result<Self, ServeError> {
        tpm.measure(pcr, &events)?;
        Ok(Self {
            tpm,
            events,
            quote_pcrs,
            pending: None,
            keys: InstalledKeys::default(),
        })
    }

    /// The event log.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The keys received so far.
    pub fn keys(&self) -> &InstalledKeys {
        &self.keys
    }

    /// The first frame on a new connection.
    pub fn hello(&self) -> Frame {
        let pcr = self
            .events
            .first()
            .map_or(cinfer_attest::DEFAULT_PCR, |e| e.pcr);
        Frame {
            kind: Kind::Hello,
            payload: serde_json::to_vec(&Hello {
                protocol: cinfer_channel::VERSION,
                loader: env!("CARGO_PKG_VERSION"),
                ak_public: self.tpm.ak_public(),
                pcr,
            })
            .unwrap_or_default(),
        }
    }

    /// Handles one frame from the peer and returns the answer.
    pub fn handle(&mut self, frame: &Frame) -> Result<Frame, ServeError> {
        match frame.kind {
            Kind::AttestRequest => self.attest(&frame.payload),
            Kind::KeyRelease => self.install(&frame.payload),
            other => Err(ServeError::UnexpectedFrame(other)),
        }
    }

    fn attest(&mut self, nonce: &[u8]) -> Result<Frame, ServeError> {
        if !NONCE_LEN.contains(&nonce.len()) {
            return Err(ServeError::BadNonce(nonce.len()));
        }
        let key = RequestPrivateKey::generate();
        let evidence: Evidence = self.tpm.quote(
            &self.quote_pcrs,
            nonce,
            &key.public_key().to_bytes(),
            &self.events,
        )?;
        self.pending = Some(Pending {
            nonce: nonce.to_vec(),
            key,
        });
        Ok(Frame {
            kind: Kind::Evidence,
            payload: evidence.to_json(),
        })
    }

    fn install(&mut self, payload: &[u8]) -> Result<Frame, ServeError> {
        let release: KeyRelease = serde_json::from_slice(payload)
            .map_err(|e| ServeError::MalformedRelease(e.to_string()))?;
        if release.version != cinfer_attest::KEY_RELEASE_VERSION {
            return Err(ServeError::MalformedRelease(format!(
                "version {}",
                release.version
            )));
        }
        // The attestation's key is spent whatever happens next.
        let pending = self
            .pending
            .take()
            .ok_or(ServeError::NoPendingAttestation)?;
        if release.nonce != pending.nonce {
            return Err(ServeError::NonceMismatch);
        }
        let mut keys = InstalledKeys::default();
        for k in &release.keys {
            let secret = unwrap_key(
                &pending.key,
                &release_context(k.kind, &k.id),
                &release.nonce,
                &WrappedSecret {
                    enc: k.enc.clone(),
                    ciphertext: k.ciphertext.clone(),
                },
            )
            .map_err(|_| ServeError::Unwrap {
                kind: k.kind,
                id: k.id.clone(),
            })?;
            let bad = |reason: String| ServeError::BadKey {
                kind: k.kind,
                id: k.id.clone(),
                reason,
            };
            match k.kind {
                ReleasedKeyKind::Request => {
                    let key =
                        RequestPrivateKey::from_bytes(&secret).map_err(|e| bad(e.to_string()))?;
                    let key_id = key.public_key().key_id();
                    if key_id != k.id {
                        return Err(bad(format!("its key id is {key_id}")));
                    }
                    keys.request.insert(k.id.clone(), key);
                }
                ReleasedKeyKind::Model => {
                    let key = ModelKey::from_bytes(&secret).map_err(|e| bad(e.to_string()))?;
                    keys.models.insert(k.id.clone(), key);
                }
                ReleasedKeyKind::Receipt => {
                    let key = p256::ecdsa::SigningKey::from_slice(&secret)
                        .map_err(|_| bad("not a P-256 scalar".into()))?;
                    keys.receipt = Some(key);
                }
            }
        }
        self.keys.request.append(&mut keys.request);
        self.keys.models.append(&mut keys.models);
        if keys.receipt.is_some() {
            self.keys.receipt = keys.receipt;
        }
        tracing::info!(keys = ?self.keys, "keys installed");
        Ok(Frame {
            kind: Kind::KeysInstalled,
            payload: serde_json::to_vec(&Installed {
                models: self.keys.models.keys().map(String::as_str).collect(),
                request_keys: self.keys.request.keys().map(String::as_str).collect(),
            })
            .unwrap_or_default(),
        })
    }

    /// Serves one connection until the peer closes it or sends a malformed frame.
    /// A refused frame is answered with an `Error` frame and the connection goes on.
    pub fn serve_connection(
        &mut self,
        mut stream: impl Read + Write,
        max_frame: u32,
    ) -> Result<(), ServeError> {
        let hello = self.hello();
        cinfer_channel::write_frame(&mut stream, hello.kind, &hello.payload, max_frame)?;
        while let Some(frame) = cinfer_channel::read_frame(&mut stream, max_frame)? {
            let answer = self.handle(&frame).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "frame refused");
                Frame {
                    kind: Kind::Error,
                    payload: serde_json::to_vec(&serde_json::json!({ "error": e.to_string() }))
                        .unwrap_or_default(),
                }
            });
            cinfer_channel::write_frame(&mut stream, answer.kind, &answer.payload, max_frame)?;
        }
        Ok(())
    }
}
