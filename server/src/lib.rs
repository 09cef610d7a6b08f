//! The untrusted inference server.
//!
//! It moves sealed bytes and never sees cleartext: clients post HPKE-sealed
//! requests over HTTP ([`http`]), the server forwards them as `Submit` frames over
//! the trusted loader's one channel ([`link`]) and streams the sealed reply
//! frames back as they arrive, followed by the loader's signed receipt. Before
//! it can serve, it relays the loader's attestation to the keyservers
//! ([`keyclient`]): nonce → evidence → key release, all opaque to it (evidence is
//! public, released keys are wrapped to the loader's attested ephemeral key).
//!
//! It trusts nothing it relays; what it logs are ids, names, sizes, durations
//! and outcomes, never payload bytes.
#![forbid(unsafe_code)]

pub mod channel_key;
pub mod config;
pub mod frames;
pub mod http;
pub mod keyclient;
pub mod link;
pub mod metrics;

pub use channel_key::ChannelKey;
pub use config::{Config, ConfigError};
pub use http::{Server, serve};
pub use link::{Link, LinkStatus, Program};
