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
//!
//! When the TPM has an EK certificate the evidence carries it, with the EK and
//! AK public areas; a keyserver that trusts the AK through it answers with a
//! TPM credential for the AK, and the keys are wrapped (HPKE PSK mode) under
//! the credential's secret, which only `TPM2_ActivateCredential` in this TPM
//! recovers. The loader only reads and activates; the keyserver verifies.

use crate::caps::model::ModelStore;
use crate::caps::output::FrameSink;
use crate::models::SealedGguf;
use crate::peer::{DeadlineReader, PeerError, PeerStream};
use crate::policy::PolicyFileRole;
use crate::replay::ReplayWindow;
use crate::{AbortReason, AdmittedProgram, Loader, LoaderConfig, Policy, RunOutcome};
use cinfer_attest::{
    CREDENTIAL_PSK_ID, Endorsement, Event, EventKind, Evidence, KeyRelease, ReleasedKeyKind,
    credential_binding, credential_psk, release_context,
};
use cinfer_attest::{Receipt, SignedReceipt};
use cinfer_channel::Submit;
use cinfer_channel::{Frame, FrameError, Kind};
use cinfer_envelope::RequestPrivateKey;
use cinfer_envelope::keywrap::{WrappedSecret, unwrap_key, unwrap_key_psk};
use cinfer_sealed_model::ModelKey;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

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
    /// PCRs the quote covers (SHA-256 bank); must include `pcr` [default: the
    /// boot PCRs 0–7 and `pcr`]. The keyserver pins some PCR software cannot
    /// reset (a boot PCR) unless it runs with a development flag; see
    /// [`ServeConfig::quote_pcrs`].
    #[serde(default, rename = "quote-pcrs")]
    quote_pcrs_configured: Option<Vec<u8>>,
    /// Largest frame payload accepted on the channel.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
    /// Requests running at once; more are refused as busy.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Replay window into the past, seconds: requests sealed longer ago are
    /// refused, and every request run within it is remembered
    /// ([`crate::replay`]). Measured with this file.
    #[serde(default = "default_request_max_age_secs")]
    pub request_max_age_secs: u64,
    /// Replay window into the future, seconds: how far a client's clock may
    /// run ahead of the loader's. Measured with this file.
    #[serde(default = "default_request_clock_skew_secs")]
    pub request_clock_skew_secs: u64,
    /// Accelerator backend: `cpu`, or `cuda` (a loader built with the `cuda`
    /// feature, on a machine with the NVIDIA driver). Measured with the rest of
    /// this file, so the keyserver knows which one runs.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Cross-request batching: concurrent runs' matmuls on the same resident
    /// weights run as one launch (`cinfer_accel::batch`; results are bit for
    /// bit those of separate launches). Off by default: on this workplace's
    /// 2-core machines it does not yet pay (BENCHMARKS.md). Measured with
    /// this file.
    #[serde(default = "default_batching")]
    pub batching: bool,
    /// Keyserver identities (hex SEC1, `keyserver public-identity`) whose key
    /// releases this loader installs. Empty: any release that unwraps is
    /// installed (development only: a hostile relay could then install keys of
    /// its own — never read the real ones). Measured with this file.
    #[serde(default)]
    pub keyservers: Vec<String>,
    /// Public keys (hex uncompressed SEC1 P-256, as `inference-server keygen`
    /// prints them) of the inference servers this loader serves: a peer must
    /// sign this connection's challenge with one of them before anything else
    /// ([`crate::peer`]). Required unless `allow-unauthenticated-peers`.
    /// Measured with this file.
    #[serde(default)]
    pub server_keys: Vec<String>,
    /// Serve peers without authentication (development only: then the first
    /// local process to connect is served). Measured with this file, so a
    /// keyserver's reference values tell such a loader apart.
    #[serde(default)]
    pub allow_unauthenticated_peers: bool,
    /// Time a peer has from `Hello` to a verified `Auth`, milliseconds.
    #[serde(default = "default_peer_auth_timeout_ms")]
    pub peer_auth_timeout_ms: u64,
    /// Longest a peer may go without sending a complete frame, milliseconds;
    /// then it is dropped and the next connection served (the server pings).
    #[serde(default = "default_peer_idle_timeout_ms")]
    pub peer_idle_timeout_ms: u64,
    /// Programs served, admitted at start (by signature when `signatures` are
    /// given, else by digest). Not measured: the policy decides what runs.
    #[serde(default, rename = "program")]
    pub programs: Vec<ProgramConfig>,
    /// Sealed models served; each is opened when the keyserver releases its key.
    #[serde(default, rename = "model")]
    pub models: Vec<ModelConfig>,
}

/// A program a serving loader offers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProgramConfig {
    /// Name requests use [default: the file name without `.wasm`].
    pub name: Option<String>,
    /// The component, relative to the configuration's directory.
    pub path: String,
    /// Signature files (Sigstore bundles or detached key signatures).
    #[serde(default)]
    pub signatures: Vec<String>,
}

/// A sealed model a serving loader offers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModelConfig {
    /// Model id (as sealed, and as the keyserver releases its key).
    pub id: String,
    /// The sealed model, relative to the configuration's directory.
    pub path: String,
}

fn default_backend() -> String {
    "cpu".to_owned()
}

fn default_batching() -> bool {
    false
}

fn default_max_in_flight() -> usize {
    8
}

fn default_request_max_age_secs() -> u64 {
    300
}

fn default_request_clock_skew_secs() -> u64 {
    5
}

fn default_peer_auth_timeout_ms() -> u64 {
    5_000
}

fn default_peer_idle_timeout_ms() -> u64 {
    60_000
}

/// The system clock in Unix milliseconds (0 before 1970).
fn unix_millis_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn default_pcr() -> u8 {
    cinfer_attest::DEFAULT_PCR
}
/// The boot PCRs quoted by default (firmware, boot loader, kernel and their
/// configuration in a measured-boot VM).
pub const DEFAULT_BOOT_PCRS: std::ops::RangeInclusive<u8> = 0..=7;
fn default_max_frame() -> u32 {
    cinfer_channel::DEFAULT_MAX_PAYLOAD
}

impl ServeConfig {
    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> Result<Self, ServeError> {
        let c: ServeConfig =
            toml::from_str(text).map_err(|e| ServeError::Config(e.message().to_owned()))?;
        let quote_pcrs = c.quote_pcrs();
        if !quote_pcrs.contains(&c.pcr) {
            return Err(ServeError::Config(format!(
                "quote-pcrs {quote_pcrs:?} must include the measured pcr {}",
                c.pcr
            )));
        }
        if let Some(bad) = quote_pcrs.iter().find(|p| **p > 23) {
            return Err(ServeError::Config(format!(
                "quote-pcrs: {bad} is not a PCR (0..=23)"
            )));
        }
        c.listen
            .parse::<cinfer_channel::Endpoint>()
            .map_err(ServeError::Config)?;
        c.pinned_keyservers()?;
        c.peer_policy()?;
        Ok(c)
    }

    /// Who may be served, and the peer timeouts.
    pub fn peer_policy(&self) -> Result<crate::peer::PeerPolicy, ServeError> {
        let keys = self
            .server_keys
            .iter()
            .map(|k| {
                hex::decode(k)
                    .ok()
                    .filter(|b| b.len() == 65 && b[0] == 4)
                    .and_then(|b| p256::ecdsa::VerifyingKey::from_sec1_bytes(&b).ok())
                    .ok_or_else(|| {
                        ServeError::Config(format!(
                            "server-keys: {k:?} is not a hex uncompressed P-256 key"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        match (keys.is_empty(), self.allow_unauthenticated_peers) {
            (true, false) => {
                return Err(ServeError::Config(
                    "server-keys: no inference server key is configured; list the server's channel key \
                     (`inference-server keygen` prints it), or set allow-unauthenticated-peers = true \
                     (development only: any local process could then take the channel)"
                        .into(),
                ));
            }
            (false, true) => {
                return Err(ServeError::Config(
                    "server-keys and allow-unauthenticated-peers = true contradict each other"
                        .into(),
                ));
            }
            _ => {}
        }
        if self.peer_auth_timeout_ms == 0 || self.peer_idle_timeout_ms == 0 {
            return Err(ServeError::Config(
                "peer-auth-timeout-ms and peer-idle-timeout-ms must be positive".into(),
            ));
        }
        Ok(crate::peer::PeerPolicy {
            keys,
            auth_timeout: std::time::Duration::from_millis(self.peer_auth_timeout_ms),
            idle_timeout: std::time::Duration::from_millis(self.peer_idle_timeout_ms),
        })
    }

    /// The PCRs each quote covers, sorted: `quote-pcrs` as configured, else the
    /// boot PCRs 0–7 and the measured one.
    pub fn quote_pcrs(&self) -> Vec<u8> {
        let mut pcrs = match &self.quote_pcrs_configured {
            Some(p) => p.clone(),
            None => DEFAULT_BOOT_PCRS.chain([self.pcr]).collect(),
        };
        pcrs.sort_unstable();
        pcrs.dedup();
        pcrs
    }

    /// The pinned keyserver identities, decoded.
    pub fn pinned_keyservers(&self) -> Result<Vec<Vec<u8>>, ServeError> {
        self.keyservers
            .iter()
            .map(|k| {
                hex::decode(k)
                    .ok()
                    .filter(|b| b.len() == 65 && b[0] == 4)
                    .ok_or_else(|| {
                        ServeError::Config(format!(
                            "keyservers: {k:?} is not a hex uncompressed P-256 key"
                        ))
                    })
            })
            .collect()
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
    /// A program submitted by the peer was malformed or refused by the policy.
    #[error("{0}")]
    Program(String),
    /// The peer did not authenticate, or went idle: it was dropped.
    #[error("peer dropped: {0}")]
    Peer(#[from] crate::peer::PeerError),
    /// A frame of a kind the loader does not accept from its peer.
    #[error("unexpected {0:?} frame from the peer")]
    UnexpectedFrame(Kind),
    /// The nonce to attest to is too short or too long.
    #[error("nonce of {0} bytes (16 to 64 accepted)")]
    BadNonce(usize),
    /// The key release is not signed by a keyserver this loader pins.
    #[error("key release not signed by a pinned keyserver: {0}")]
    UntrustedRelease(cinfer_attest::StatementError),
    /// A key release arrived with no attestation waiting for it (or a second time).
    #[error("key release without a pending attestation (each attestation's key is used once)")]
    NoPendingAttestation,
    /// The key release answers another nonce than the pending attestation's.
    #[error("key release answers another nonce than the pending attestation")]
    NonceMismatch,
    /// The key release does not parse or has another version.
    #[error("malformed key release: {0}")]
    MalformedRelease(String),
    /// The key release carries a TPM credential but this loader sent no
    /// endorsement (its TPM has no EK certificate).
    #[error("key release carries a TPM credential but this loader has no endorsement")]
    UnexpectedCredential,
    /// The secret the TPM recovered from the release's credential does not
    /// bind this attestation's nonce: a credential of another attestation
    /// (replayed or spliced in).
    #[error("the TPM credential is not for this attestation (replayed or spliced in)")]
    CredentialNotForThisAttestation,
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
/// reference values with the same function (`cinfer measure-loader`).
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
#[derive(Default, Clone)]
pub struct InstalledKeys {
    /// Request private keys, by key id, each with the receipt signing key of
    /// the release (so of the keyserver) it came with: a request sealed to a
    /// keyserver's request key gets a receipt that keyserver's clients verify.
    pub request: BTreeMap<String, RequestKeys>,
    /// Model data keys, by model id.
    pub models: BTreeMap<String, ModelKey>,
}

/// A request key and the receipt key released with it. Its `Debug` output
/// shows no key material.
#[derive(Clone)]
pub struct RequestKeys {
    /// Opens requests sealed to this key id.
    pub request: RequestPrivateKey,
    /// Signs the receipts of those requests.
    pub receipt: p256::ecdsa::SigningKey,
}

impl std::fmt::Debug for RequestKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestKeys")
            .field("key_id", &self.request.public_key().key_id())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for InstalledKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstalledKeys")
            .field("request", &self.request.keys().collect::<Vec<_>>())
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A key release verified and unwrapped, not installed yet
/// ([`Attestor::stage`], [`Attestor::commit`]). Never printed.
pub struct StagedRelease {
    keys: InstalledKeys,
}

impl std::fmt::Debug for StagedRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedRelease")
            .field("keys", &self.keys)
            .finish()
    }
}

impl StagedRelease {
    /// The keys it would install.
    pub fn keys(&self) -> &InstalledKeys {
        &self.keys
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
    /// The TPM's EK certificate, EK and AK areas, sent with every evidence;
    /// `None` when the TPM has no EK certificate (then only a keyserver that
    /// pins the AK releases keys).
    endorsement: Option<Endorsement>,
    events: Vec<Event>,
    quote_pcrs: Vec<u8>,
    pending: Option<Pending>,
    keys: InstalledKeys,
    pinned: Vec<Vec<u8>>,
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
    programs: &'a [ProgramInfo],
    /// Present when the peer must authenticate: what it signs (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    challenge: Option<String>,
    /// The peer is dropped after this long without a complete frame.
    idle_timeout_ms: u64,
}

/// A served program as the peer sees it (`Hello`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramInfo {
    /// The name requests use.
    pub name: String,
    /// SHA-256 of the component.
    pub sha256: String,
    /// The capability world it was granted.
    pub world: String,
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
        let endorsement = match tpm.endorsement() {
            Ok(e) => Some(e),
            Err(cinfer_tpm::TpmError::NoEkCertificate { nv_index, .. }) => {
                tracing::info!(
                    nv_index = format_args!("{nv_index:#010x}"),
                    "the TPM has no EK certificate: only keyservers that pin the AK will release keys"
                );
                None
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            tpm,
            endorsement,
            events,
            quote_pcrs,
            pending: None,
            keys: InstalledKeys::default(),
            pinned: Vec::new(),
        })
    }

    /// Installs only releases signed by one of these keyserver identities (SEC1).
    pub fn pin_keyservers(mut self, identities: Vec<Vec<u8>>) -> Self {
        self.pinned = identities;
        self
    }

    /// The event log.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The endorsement sent with every evidence, if the TPM has an EK certificate.
    pub fn endorsement(&self) -> Option<&Endorsement> {
        self.endorsement.as_ref()
    }

    /// The keys received so far.
    pub fn keys(&self) -> &InstalledKeys {
        &self.keys
    }

    /// The first frame on a new connection: the AK, the measured PCR, the
    /// programs served, the challenge the peer must sign (if it must) and the
    /// idle timeout it must stay within.
    pub fn hello(
        &self,
        programs: &[ProgramInfo],
        challenge: Option<&[u8; cinfer_channel::CHALLENGE_LEN]>,
        idle_timeout: std::time::Duration,
    ) -> Frame {
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
                programs,
                challenge: challenge.map(hex::encode),
                idle_timeout_ms: u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX),
            })
            .unwrap_or_default(),
        }
    }

    /// Handles one frame from the peer and returns the answer (a key release
    /// is staged and committed at once: see [`Service`] for the serving path,
    /// which opens the models in between).
    pub fn handle(&mut self, frame: &Frame) -> Result<Frame, ServeError> {
        match frame.kind {
            Kind::AttestRequest => self.attest(&frame.payload),
            Kind::KeyRelease => {
                let staged = self.stage(&frame.payload)?;
                Ok(self.commit(staged))
            }
            other => Err(ServeError::UnexpectedFrame(other)),
        }
    }

    fn attest(&mut self, nonce: &[u8]) -> Result<Frame, ServeError> {
        if !NONCE_LEN.contains(&nonce.len()) {
            return Err(ServeError::BadNonce(nonce.len()));
        }
        let key = RequestPrivateKey::generate();
        let mut evidence: Evidence = self.tpm.quote(
            &self.quote_pcrs,
            nonce,
            &key.public_key().to_bytes(),
            &self.events,
        )?;
        evidence.endorsement = self.endorsement.clone();
        self.pending = Some(Pending {
            nonce: nonce.to_vec(),
            key,
        });
        Ok(Frame {
            kind: Kind::Evidence,
            payload: evidence.to_json(),
        })
    }

    /// Verifies and unwraps a key release without installing anything: the
    /// attestation's ephemeral key is spent once the release passed its
    /// format and signature checks, whatever happens next.
    pub fn stage(&mut self, payload: &[u8]) -> Result<StagedRelease, ServeError> {
        let release: KeyRelease = serde_json::from_slice(payload)
            .map_err(|e| ServeError::MalformedRelease(e.to_string()))?;
        if release.version != cinfer_attest::KEY_RELEASE_VERSION {
            return Err(ServeError::MalformedRelease(format!(
                "version {}",
                release.version
            )));
        }
        if !self.pinned.is_empty() {
            release
                .verify(&self.pinned)
                .map_err(ServeError::UntrustedRelease)?;
        }
        // The attestation's key is spent whatever happens next.
        let pending = self
            .pending
            .take()
            .ok_or(ServeError::NoPendingAttestation)?;
        if release.nonce != pending.nonce {
            return Err(ServeError::NonceMismatch);
        }
        // An endorsed AK: the keys are wrapped under the credential's secret,
        // which only this TPM (its EK, with this AK loaded) recovers.
        let psk = match &release.credential {
            None => None,
            Some(credential) => {
                if self.endorsement.is_none() {
                    return Err(ServeError::UnexpectedCredential);
                }
                let secret = self
                    .tpm
                    .activate_credential(&credential.id_object, &credential.encrypted_secret)?;
                let expected = credential_binding(&secret, &release.nonce);
                if !constant_time_eq(&expected, &credential.binding) {
                    return Err(ServeError::CredentialNotForThisAttestation);
                }
                Some(credential_psk(&secret, &release.nonce))
            }
        };
        let mut requests = BTreeMap::new();
        let mut receipt = None;
        let mut keys = InstalledKeys::default();
        for k in &release.keys {
            let context = release_context(k.kind, &k.id);
            let wrapped = WrappedSecret {
                enc: k.enc.clone(),
                ciphertext: k.ciphertext.clone(),
            };
            let secret = match &psk {
                Some(psk) => unwrap_key_psk(
                    &pending.key,
                    &context,
                    &release.nonce,
                    &wrapped,
                    psk.as_ref(),
                    CREDENTIAL_PSK_ID,
                ),
                None => unwrap_key(&pending.key, &context, &release.nonce, &wrapped),
            }
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
                    requests.insert(k.id.clone(), key);
                }
                ReleasedKeyKind::Model => {
                    let key = ModelKey::from_bytes(&secret).map_err(|e| bad(e.to_string()))?;
                    keys.models.insert(k.id.clone(), key);
                }
                ReleasedKeyKind::Receipt => {
                    let key = p256::ecdsa::SigningKey::from_slice(&secret)
                        .map_err(|_| bad("not a P-256 scalar".into()))?;
                    receipt = Some(key);
                }
            }
        }
        if !requests.is_empty() {
            // A request key is usable only with its keyserver's receipt key.
            let receipt = receipt.ok_or_else(|| {
                ServeError::MalformedRelease("request keys without a receipt key".into())
            })?;
            keys.request = requests
                .into_iter()
                .map(|(id, request)| {
                    let receipt = receipt.clone();
                    (id, RequestKeys { request, receipt })
                })
                .collect();
        }
        Ok(StagedRelease { keys })
    }

    /// Installs a staged release (later keys with the same id replace earlier ones).
    pub fn commit(&mut self, staged: StagedRelease) -> Frame {
        let mut keys = staged.keys;
        self.keys.request.append(&mut keys.request);
        self.keys.models.append(&mut keys.models);
        tracing::info!(keys = ?self.keys, "keys installed");
        Frame {
            kind: Kind::KeysInstalled,
            payload: serde_json::to_vec(&Installed {
                models: self.keys.models.keys().map(String::as_str).collect(),
                request_keys: self.keys.request.keys().map(String::as_str).collect(),
            })
            .unwrap_or_default(),
        }
    }
}

/// Compares two byte strings in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A serving loader: the attestor, the wasmtime loader, the admitted programs and
/// the sealed models waiting for their keys.
pub struct Service {
    attestor: Attestor,
    loader: Arc<Loader>,
    policy_sha256: String,
    /// What is served now: the configured programs and this peer's uploads.
    programs: HashMap<String, Arc<AdmittedProgram>>,
    program_list: Vec<ProgramInfo>,
    /// The configured programs, restored when a peer leaves (its uploads go with it).
    configured: (HashMap<String, Arc<AdmittedProgram>>, Vec<ProgramInfo>),
    peers: crate::peer::PeerPolicy,
    sealed_models: Vec<(String, std::fs::File)>,
    model_sha256: Arc<RwLock<BTreeMap<String, String>>>,
    max_frame: u32,
    max_in_flight: usize,
    in_flight: Arc<AtomicUsize>,
    draining: Arc<AtomicBool>,
    replay: Arc<Mutex<ReplayWindow>>,
    running: Running,
}

/// The cancellation flags of the requests running now, by request id.
type Running = Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>>;

/// A running request's entry in [`Running`], removed on drop.
struct RunningEntry {
    running: Running,
    id: u64,
    flag: Arc<AtomicBool>,
}

impl RunningEntry {
    fn register(running: &Running, id: u64) -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, flag.clone());
        Self {
            running: running.clone(),
            id,
            flag,
        }
    }
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        // Only this run's entry (a peer may reuse an id once it finished).
        if running
            .get(&self.id)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flag))
        {
            running.remove(&self.id);
        }
    }
}

/// One running request's slot in the in-flight count, given back on drop.
struct InFlight {
    counter: Arc<AtomicUsize>,
    /// The count including this request.
    count: usize,
}

impl InFlight {
    fn take(counter: &Arc<AtomicUsize>) -> Self {
        let count = counter.fetch_add(1, Ordering::SeqCst) + 1;
        Self {
            counter: counter.clone(),
            count,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Lets another thread stop a [`Service`] taking requests and wait for the
/// ones running to finish (graceful shutdown).
#[derive(Debug, Clone)]
pub struct DrainHandle {
    draining: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
}

impl DrainHandle {
    /// Refuses new requests from now on, then waits until none is running or
    /// `grace` has passed; returns how many were still running.
    pub fn drain(&self, grace: std::time::Duration) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + grace;
        loop {
            let running = self.in_flight.load(Ordering::SeqCst);
            if running == 0 || std::time::Instant::now() >= deadline {
                return running;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("attestor", &self.attestor)
            .field("programs", &self.program_list)
            .finish_non_exhaustive()
    }
}

type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(w: &SharedWriter, kind: Kind, payload: &[u8], max: u32) -> Result<(), FrameError> {
    let mut w = w.lock().unwrap_or_else(PoisonError::into_inner);
    cinfer_channel::write_frame(&mut *w, kind, payload, max)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn error_json(e: &impl std::fmt::Display) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": e.to_string() })).unwrap_or_default()
}

fn outcome_name(o: &RunOutcome) -> &'static str {
    match o {
        RunOutcome::Completed => "completed",
        RunOutcome::ProgramFailed => "program-failed",
        RunOutcome::Aborted(AbortReason::Cancelled) => "cancelled",
        RunOutcome::Aborted(_) => "aborted",
    }
}

impl Service {
    /// Admits the configured programs (read through `dir`, the configuration's
    /// directory) and opens the sealed model files. Fails on the first program
    /// the policy refuses.
    pub fn new(
        attestor: Attestor,
        policy: Policy,
        config: &ServeConfig,
        dir: &cap_std::fs::Dir,
    ) -> Result<Self, ServeError> {
        let policy_sha256 = hex::encode(policy.digest());
        policy
            .check_backend(&config.backend)
            .map_err(|e| ServeError::Config(e.to_string()))?;
        let backend = crate::backend::backend_from_config(&config.backend, config.batching)
            .map_err(|e| ServeError::Config(format!("backend: {e}")))?;
        let loader = Arc::new(
            Loader::new(
                policy,
                LoaderConfig {
                    backend,
                    ..LoaderConfig::default()
                },
            )
            .map_err(|e| ServeError::Config(e.to_string()))?,
        );
        let read = |path: &str| {
            dir.read(path)
                .map_err(|e| ServeError::Config(format!("reading {path}: {e}")))
        };
        let mut programs = HashMap::new();
        let mut program_list = Vec::new();
        for p in &config.programs {
            let name = p.name.clone().unwrap_or_else(|| {
                p.path
                    .rsplit('/')
                    .next()
                    .unwrap_or(&p.path)
                    .trim_end_matches(".wasm")
                    .to_owned()
            });
            let bytes = read(&p.path)?;
            let sigs = p
                .signatures
                .iter()
                .map(|s| read(s))
                .collect::<Result<Vec<_>, _>>()?;
            let admitted = if sigs.is_empty() {
                loader.admit(&bytes)
            } else {
                let refs: Vec<&[u8]> = sigs.iter().map(Vec::as_slice).collect();
                loader.admit_signatures(&bytes, &refs)
            }
            .map_err(|e| ServeError::Config(format!("program {name}: {e}")))?;
            program_list.push(ProgramInfo {
                name: name.clone(),
                sha256: hex::encode(admitted.grant().digest),
                world: admitted.grant().world.clone(),
            });
            if programs.insert(name.clone(), admitted).is_some() {
                return Err(ServeError::Config(format!("two programs are named {name}")));
            }
        }
        let mut sealed_models = Vec::new();
        for m in &config.models {
            let f = dir
                .open(&m.path)
                .map_err(|e| ServeError::Config(format!("opening model {}: {e}", m.path)))?;
            sealed_models.push((m.id.clone(), f.into_std()));
        }
        Ok(Self {
            attestor,
            loader,
            policy_sha256,
            configured: (programs.clone(), program_list.clone()),
            programs,
            program_list,
            peers: config.peer_policy()?,
            sealed_models,
            model_sha256: Arc::default(),
            max_frame: config.max_frame_bytes,
            max_in_flight: config.max_in_flight,
            in_flight: Arc::default(),
            draining: Arc::default(),
            replay: Arc::new(Mutex::new(ReplayWindow::new(
                std::time::Duration::from_secs(config.request_max_age_secs),
                std::time::Duration::from_secs(config.request_clock_skew_secs),
                unix_millis_now(),
                ReplayWindow::DEFAULT_CAPACITY,
            ))),
            running: Arc::default(),
        })
    }

    /// A handle for graceful shutdown.
    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle {
            draining: self.draining.clone(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// The attestation side.
    pub fn attestor(&self) -> &Attestor {
        &self.attestor
    }

    /// Installs a key release all or nothing: verified and unwrapped first,
    /// then every configured model whose key is installed or arriving is
    /// opened; only when all open are the keys installed and the models served.
    fn install_release(&mut self, payload: &[u8]) -> Result<Frame, ServeError> {
        let staged = self.attestor.stage(payload)?;
        let mut models = self.attestor.keys.models.clone();
        models.extend(
            staged
                .keys()
                .models
                .iter()
                .map(|(id, k)| (id.clone(), k.clone())),
        );
        let (store, digests) = self.open_models(&models)?;
        let answer = self.attestor.commit(staged);
        self.loader.set_models(store);
        *self
            .model_sha256
            .write()
            .unwrap_or_else(PoisonError::into_inner) = digests;
        Ok(answer)
    }

    /// Opens every configured model whose key is in `keys`.
    #[allow(clippy::type_complexity)]
    fn open_models(
        &self,
        keys: &BTreeMap<String, ModelKey>,
    ) -> Result<(ModelStore, BTreeMap<String, String>), ServeError> {
        let mut store = ModelStore::default();
        let mut digests = BTreeMap::new();
        for (id, file) in &self.sealed_models {
            let Some(key) = keys.get(id) else {
                continue;
            };
            let source = file
                .try_clone()
                .map_err(|e| ServeError::Config(format!("model {id}: {e}")))?;
            let model =
                SealedGguf::open(Box::new(source), key).map_err(|e| ServeError::BadKey {
                    kind: ReleasedKeyKind::Model,
                    id: id.clone(),
                    reason: e.to_string(),
                })?;
            if model.model_id() != id {
                return Err(ServeError::BadKey {
                    kind: ReleasedKeyKind::Model,
                    id: id.clone(),
                    reason: format!("the sealed file is model {}", model.model_id()),
                });
            }
            digests.insert(id.clone(), hex::encode(model.plaintext_sha256()));
            store.insert(id.clone(), Arc::new(model));
        }
        Ok((store, digests))
    }

    /// Serves one peer until it hangs up, sends a malformed frame, fails to
    /// authenticate or goes idle ([`crate::peer`]). Requests run on their own
    /// threads; their frames interleave with other answers. When the peer
    /// leaves, its running requests are cancelled and its uploaded programs are
    /// no longer served.
    pub fn serve_connection(
        &mut self,
        reader: impl PeerStream,
        writer: Box<dyn Write + Send>,
    ) -> Result<(), ServeError> {
        let writer: SharedWriter = Arc::new(Mutex::new(writer));
        let mut reader = DeadlineReader::new(reader);
        let served = self.serve_peer(&mut reader, &writer);
        if let Err(e @ ServeError::Peer(_)) = &served {
            // Say why before hanging up (best effort: the peer may be gone).
            let _ = send(&writer, Kind::Error, &error_json(e), self.max_frame);
        }
        // The peer is gone: nobody can receive what running requests produce.
        {
            let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            for flag in running.values() {
                flag.store(true, Ordering::Relaxed);
            }
            if !running.is_empty() {
                tracing::info!(
                    requests = running.len(),
                    "peer gone: running requests cancelled"
                );
            }
        }
        // Its uploads go with it: a name it replaced serves the configured program again.
        let uploaded = self
            .program_list
            .iter()
            .filter(|p| {
                !self
                    .configured
                    .1
                    .iter()
                    .any(|c| c.sha256 == p.sha256 && c.name == p.name)
            })
            .count();
        if uploaded > 0 {
            tracing::info!(
                programs = uploaded,
                "peer gone: the programs it uploaded are no longer served"
            );
        }
        self.programs = self.configured.0.clone();
        self.program_list = self.configured.1.clone();
        served
    }

    fn serve_peer<R: PeerStream>(
        &mut self,
        reader: &mut DeadlineReader<R>,
        writer: &SharedWriter,
    ) -> Result<(), ServeError> {
        let max = self.max_frame;
        let challenge = if self.peers.authenticates() {
            Some(crate::peer::PeerPolicy::challenge()?)
        } else {
            None
        };
        let hello = self.attestor.hello(
            &self.program_list,
            challenge.as_ref(),
            self.peers.idle_timeout,
        );
        send(writer, hello.kind, &hello.payload, max)?;
        if let Some(challenge) = &challenge {
            let timeout_ms = millis(self.peers.auth_timeout);
            reader.deadline_in(self.peers.auth_timeout);
            let frame = match cinfer_channel::read_frame(&mut *reader, max) {
                Ok(Some(f)) => f,
                Ok(None) => return Err(PeerError::ClosedBeforeAuth.into()),
                Err(FrameError::Io(e)) if DeadlineReader::<R>::is_timeout(&e) => {
                    return Err(PeerError::AuthTimeout { timeout_ms }.into());
                }
                Err(e) => return Err(e.into()),
            };
            if frame.kind != Kind::Auth {
                return Err(PeerError::NotAuth(frame.kind).into());
            }
            let key = self.peers.verify(challenge, &frame.payload)?;
            tracing::info!(key = %key, "peer authenticated");
            send(
                writer,
                Kind::Authenticated,
                &serde_json::to_vec(&serde_json::json!({ "key": key })).unwrap_or_default(),
                max,
            )?;
        }
        self.serve_frames(reader, writer)
    }

    fn serve_frames<R: PeerStream>(
        &mut self,
        reader: &mut DeadlineReader<R>,
        writer: &SharedWriter,
    ) -> Result<(), ServeError> {
        let max = self.max_frame;
        loop {
            reader.deadline_in(self.peers.idle_timeout);
            let frame = match cinfer_channel::read_frame(&mut *reader, max) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(FrameError::Io(e)) if DeadlineReader::<R>::is_timeout(&e) => {
                    return Err(PeerError::Idle {
                        timeout_ms: millis(self.peers.idle_timeout),
                    }
                    .into());
                }
                Err(e) => return Err(e.into()),
            };
            match frame.kind {
                Kind::Ping => {}
                Kind::Submit => self.submit(&frame.payload, writer),
                Kind::Cancel => {
                    let Ok(id) = <[u8; 8]>::try_from(frame.payload.as_slice()) else {
                        send(
                            writer,
                            Kind::Error,
                            &error_json(&"malformed Cancel frame"),
                            max,
                        )?;
                        continue;
                    };
                    let id = u64::from_be_bytes(id);
                    let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
                    match running.get(&id) {
                        Some(flag) => {
                            flag.store(true, Ordering::Relaxed);
                            tracing::info!(request = id, "request cancelled by the peer");
                        }
                        None => tracing::debug!(request = id, "cancel for no running request"),
                    }
                }
                Kind::Program => {
                    let answer = match self.upload(&frame.payload) {
                        Ok(info) => Frame {
                            kind: Kind::Admitted,
                            payload: serde_json::to_vec(&info).unwrap_or_default(),
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "program refused");
                            Frame {
                                kind: Kind::Error,
                                payload: error_json(&e),
                            }
                        }
                    };
                    send(writer, answer.kind, &answer.payload, max)?;
                }
                _ => {
                    let answer = if frame.kind == Kind::KeyRelease {
                        self.install_release(&frame.payload)
                    } else {
                        self.attestor.handle(&frame)
                    };
                    let answer = answer.unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "frame refused");
                        Frame {
                            kind: Kind::Error,
                            payload: error_json(&e),
                        }
                    });
                    send(writer, answer.kind, &answer.payload, max)?;
                }
            }
        }
    }

    /// Admits a program the peer stores and submits (`Program` frame): the
    /// policy decides, as for configured programs (by its signatures, else by
    /// digest). A later upload under the same name replaces the earlier one,
    /// for as long as this peer stays connected.
    fn upload(&mut self, payload: &[u8]) -> Result<ProgramInfo, ServeError> {
        let p = cinfer_channel::ProgramUpload::decode(payload)
            .ok_or_else(|| ServeError::Program("malformed Program frame".into()))?;
        let admitted = if p.signatures.is_empty() {
            self.loader.admit(&p.component)
        } else {
            let refs: Vec<&[u8]> = p.signatures.iter().map(Vec::as_slice).collect();
            self.loader.admit_signatures(&p.component, &refs)
        }
        .map_err(|e| ServeError::Program(format!("program {:?} refused: {e}", p.name)))?;
        let info = ProgramInfo {
            name: p.name.clone(),
            sha256: hex::encode(admitted.grant().digest),
            world: admitted.grant().world.clone(),
        };
        tracing::info!(program = %p.name, sha256 = %info.sha256, world = %info.world, "program admitted from the peer");
        self.program_list.retain(|i| i.name != p.name);
        self.program_list.push(info.clone());
        self.programs.insert(p.name, admitted);
        Ok(info)
    }

    fn submit(&mut self, payload: &[u8], writer: &SharedWriter) {
        let max = self.max_frame;
        let Some(submit) = Submit::decode(payload) else {
            let _ = send(
                writer,
                Kind::Error,
                &error_json(&"malformed Submit frame"),
                max,
            );
            return;
        };
        let id = submit.request_id;
        let refuse = |why: String| {
            tracing::info!(request = id, reason = %why, "request refused");
            let _ = send(
                writer,
                Kind::Refused,
                &cinfer_channel::with_request_id(id, &error_json(&why)),
                max,
            );
        };
        let Some(program) = self.programs.get(&submit.program).cloned() else {
            return refuse(format!("unknown program {:?}", submit.program));
        };
        let key_id = match cinfer_envelope::request_key_id(&submit.sealed) {
            Ok(k) => k.to_owned(),
            Err(e) => return refuse(format!("malformed request: {e}")),
        };
        // A request the client bound to one component runs on that one only
        // (the binding is authenticated when the request opens).
        match cinfer_envelope::request_program(&submit.sealed) {
            Ok(Some(bound)) if bound != program.grant().digest => {
                return refuse(format!(
                    "the request is bound to program sha256 {}, not to {:?} (sha256 {})",
                    hex::encode(bound),
                    submit.program,
                    hex::encode(program.grant().digest)
                ));
            }
            Ok(_) => {}
            Err(e) => return refuse(format!("malformed request: {e}")),
        }
        let Some(RequestKeys {
            request: key,
            receipt: receipt_key,
        }) = self.attestor.keys.request.get(&key_id).cloned()
        else {
            return refuse(format!(
                "no request key {key_id} (not attested yet, or sealed to another keyserver's key)"
            ));
        };
        // Counted before the drain check, so a drain never sees 0 while one starts;
        // the guard gives the slot back however the worker ends.
        let slot = InFlight::take(&self.in_flight);
        if self.draining.load(Ordering::SeqCst) {
            return refuse("shutting down: not taking new requests".into());
        }
        if slot.count > self.max_in_flight {
            return refuse(format!("busy: {} requests in flight", self.max_in_flight));
        }
        if self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&id)
        {
            // Two runs under one id could not be told apart (replies, Cancel).
            return refuse(format!("request id {id} is already running"));
        }
        // Replays: a request outside the replay window is refused here; one
        // inside it is recorded only once its envelope opened (below), so junk
        // copying a real header never takes a place in the window.
        let sealed_at = match cinfer_envelope::request_sealed_at(&submit.sealed) {
            Ok(t) => t,
            Err(e) => return refuse(format!("malformed request: {e}")),
        };
        if let Err(e) = self
            .replay
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check_time(sealed_at, unix_millis_now())
        {
            return refuse(e.to_string());
        }
        let request_sha256: [u8; 32] = Sha256::digest(&submit.sealed).into();
        let replay = self.replay.clone();
        let record = move || {
            replay
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(request_sha256, sealed_at, unix_millis_now())
                .map_err(crate::loader::RequestError::from)
        };
        let (loader, writer) = (self.loader.clone(), writer.clone());
        let entry = RunningEntry::register(&self.running, id);
        // The model digests the receipt names, as they are when the run starts.
        let model_digests = self
            .model_sha256
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let policy_sha256 = self.policy_sha256.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("request-{id}"))
            .spawn(move || {
                let _slot = slot;
                let cancel = entry.flag.clone();
                let _entry = entry;
                let hasher = Arc::new(Mutex::new(cinfer_attest::ReplyDigest::default()));
                let (h, w) = (hasher.clone(), writer.clone());
                let sink: FrameSink = Box::new(move |frame: Vec<u8>| {
                    h.lock().unwrap_or_else(PoisonError::into_inner).update(&frame);
                    let _ = send(&w, Kind::Reply, &cinfer_channel::with_request_id(id, &frame), max);
                });
                let options = crate::RunOptions::default()
                    .stream_to(sink)
                    .cancel_on(cancel)
                    .on_opened(record);
                let answer = match loader.run(&program, &submit.sealed, &key, options) {
                    Ok(report) => {
                        let (digest, frames) = {
                            let h = hasher.lock().unwrap_or_else(PoisonError::into_inner);
                            (h.finish(), h.frames())
                        };
                        let receipt = Receipt {
                            receipt_type: cinfer_attest::RECEIPT_TYPE.into(),
                            request_sha256: hex::encode(request_sha256),
                            program_sha256: hex::encode(program.grant().digest),
                            policy_sha256,
                            model_sha256: program
                                .grant()
                                .models
                                .iter()
                                .filter_map(|m| model_digests.get(m).map(|d| (m.clone(), d.clone())))
                                .collect(),
                            reply_sha256: hex::encode(digest),
                            reply_frames: frames,
                            outcome: outcome_name(&report.outcome).into(),
                        };
                        tracing::info!(request = id, outcome = %report.outcome, frames, elapsed = ?report.elapsed, "request done");
                        let signed = SignedReceipt::sign(&receipt, &receipt_key);
                        (
                            Kind::Done,
                            serde_json::to_vec(&signed).unwrap_or_default(),
                        )
                    }
                    Err(e) => {
                        tracing::info!(request = id, reason = %e, "request refused");
                        (Kind::Refused, error_json(&e))
                    }
                };
                let _ = send(
                    &writer,
                    answer.0,
                    &cinfer_channel::with_request_id(id, &answer.1),
                    max,
                );
            });
        if let Err(e) = spawned {
            refuse(format!("cannot start a worker: {e}"));
        }
    }
}
