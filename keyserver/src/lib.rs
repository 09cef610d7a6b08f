//! The keyserver: releases keys to attested trusted loaders only.
//!
//! A loader asks for a nonce (`POST /v1/nonce`), has its TPM quote its
//! measurements bound to that nonce and to an ephemeral HPKE public key, and
//! sends the evidence (`POST /v1/attest`). The keyserver consumes the nonce,
//! verifies the evidence against its reference values
//! ([`cinfer_attest::verify()`]) and answers with a [`cinfer_attest::KeyRelease`]:
//! the configured model data keys and the request private key, each wrapped
//! (HPKE, [`cinfer_envelope::keywrap`]) to the ephemeral key. Clients fetch the
//! request public key signed by the keyserver's identity key
//! (`GET /v1/request-key`).
//!
//! It trusts: its configuration and reference values, the KEK it is given, and
//! nothing that arrives over HTTP. Keys are encrypted at rest ([`state`]);
//! every release and refusal is audited ([`audit`]) without key material.
#![forbid(unsafe_code)]

pub mod audit;
pub mod clock;
pub mod config;
pub mod endorsement;
pub mod metrics;
pub mod nonce;
pub mod server;
pub mod state;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Config, ConfigError, EndorsementPolicy, ReleasePolicy};
pub use server::{KeyServer, KeyServerError, serve, serve_until};
pub use state::{StateDir, StateError};
