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
use cinfer_attest::shares::{ShareError, SharePool, Waiting};
use cinfer_attest::{
    CREDENTIAL_PSK_ID, Endorsement, Event, EventKind, Evidence, KeyRelease, ReleasedKeyKind,
    credential_binding, credential_psk, release_context, share_context,
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
mod attestation;
mod config;
mod service;
pub mod tdx;

pub use attestation::{Attestor, InstalledKeys, ProgramInfo, RequestKeys, StagedRelease};
pub use config::{
    ConfigError, DEFAULT_BOOT_PCRS, HELP as CONFIG_HELP, ModelConfig, ProgramConfig, ServeConfig,
};
pub use service::{DrainHandle, Service};

/// Why serving failed or a frame was refused. Messages carry no key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The serve configuration, or something it names, cannot be served.
    #[error("serve configuration: {0}")]
    Config(#[from] ConfigError),
    /// The TPM refused or failed.
    #[error(transparent)]
    Tpm(#[from] cinfer_tpm::TpmError),
    /// Neither a TPM nor a TD quote provider: nothing to attest with.
    #[error("no evidence to attest with (no TPM and no [tdx])")]
    NoEvidence,
    /// The TD's measurement registers or quote provider failed.
    #[error("tdx: {0}")]
    Tdx(#[from] tdx::TdxError),
    /// The channel failed or a frame was malformed (the connection is closed).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A `Program` frame from the peer does not decode.
    #[error("malformed Program frame")]
    MalformedProgramFrame,
    /// A program submitted by the peer was refused by the policy.
    #[error("program {name:?} refused: {source}")]
    ProgramRefused {
        /// The name the peer gave it.
        name: String,
        /// Why admission refused it.
        source: crate::AdmissionError,
    },
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
    /// The key release does not parse.
    #[error("malformed key release: {0}")]
    MalformedRelease(#[source] serde_json::Error),
    /// The key release has another format version than this loader's.
    #[error("key release of version {found} (this loader reads {expected})")]
    ReleaseVersion {
        /// The release's version.
        found: u32,
        /// The version this loader reads.
        expected: u32,
    },
    /// The release carries request keys but no receipt key to sign their replies with.
    #[error("key release has request keys without a receipt key")]
    RequestKeysWithoutReceiptKey,
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
    /// A whole key was released to a loader that installs keys only from
    /// shares of several keyservers (`keyserver-threshold` ≥ 2).
    #[error(
        "released {kind} key `{id}` is whole, but this loader takes keys only as shares of {threshold} keyservers"
    )]
    WholeKeyUnderThreshold {
        /// Key kind.
        kind: ReleasedKeyKind,
        /// Model or key id.
        id: String,
        /// The loader's `keyserver-threshold`.
        threshold: u8,
    },
    /// A released share was refused (a wrong share names its keyserver).
    #[error(transparent)]
    Share(#[from] cinfer_attest::shares::ShareError),
    /// A released key unwrapped but is not a valid key of its kind or id.
    #[error("released {kind} key `{id}` is not a valid key: {reason}")]
    BadKey {
        /// Key kind.
        kind: ReleasedKeyKind,
        /// Model or key id.
        id: String,
        /// Why.
        reason: BadKeyReason,
    },
}

/// Why a released key that unwrapped is not usable. Messages carry no key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BadKeyReason {
    /// Not an HPKE request key.
    #[error(transparent)]
    Request(cinfer_envelope::EnvelopeError),
    /// The request key's id is not the id it was released under.
    #[error("its key id is {0}")]
    RequestKeyId(String),
    /// Not a model key.
    #[error(transparent)]
    Model(cinfer_sealed_model::SealError),
    /// The model key does not open the configured sealed file.
    #[error(transparent)]
    SealedFile(crate::models::ModelLoadError),
    /// The configured sealed file is another model than the key's id.
    #[error("the sealed file is model {0}")]
    OtherModel(String),
    /// The receipt key is not a P-256 scalar.
    #[error("not a P-256 scalar")]
    ReceiptNotP256,
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
