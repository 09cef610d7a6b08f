//! `cinfer-host`: the trusted loader.
//!
//! This crate is the only place where request cleartext exists. It is a
//! wasmtime host that
//!
//! 1. **admits** a program (a Wasm component) only if a [`Policy`] lists its
//!    digest and every import the program makes lies inside the capability
//!    world the policy grants it ([`admission`]);
//! 2. **runs** an admitted program once per sealed request, in a fresh
//!    [`wasmtime::Store`] with the policy's memory limit, wall-clock deadline
//!    and egress budget ([`loader`]);
//! 3. gives the program nothing but the four capabilities of
//!    `wit/loader.wit`, one module each under [`caps`]: `crypto` (the opened
//!    request), `accelerator` (tensors and a fixed op set, [`backend`]),
//!    `model` (sealed weights straight into accelerator memory) and `output`
//!    (reply chunks, sealed here before they leave).
//!
//! What it trusts: its own binary, the policy files it was started with, the
//! request private key it holds. What it does not trust: the program bytes
//! (admission checks them), the sealed request and everything the untrusted
//! inference server sends. No WASI is linked; the crate forbids `unsafe`.
#![forbid(unsafe_code)]

pub mod admission;
/// The virtual accelerator (crate `cinfer-accel`): kernels live there, validation here.
pub use cinfer_accel as backend;
mod bindings;
pub mod caps;
pub mod dir;
mod driver;
mod egress;
pub mod loader;
pub mod measure;
pub mod models;
pub mod peer;
pub mod policy;
pub mod replay;
pub mod report;
pub mod serve;
pub mod signatures;

pub use admission::{AdmissionError, AdmittedProgram};
pub use driver::DriverGone;
pub use loader::{
    AbortReason, ClassifierVerdict, Loader, LoaderConfig, LoaderError, RequestError, RunOptions,
    RunOutcome, RunReport, Verdict,
};
pub use policy::{
    Capabilities, Capability, ClassifierRef, EgressRate, Limits, Policy, PolicyError,
};

/// Opens the directory holding `path` with ambient authority and returns it with
/// the file's name inside it. The loader's only ambient file access (its
/// command-line files, at start-up) goes through here; everything after is
/// relative to the returned capability, which cannot reach outside it.
pub fn open_parent_dir(path: &std::path::Path) -> std::io::Result<(dir::Dir, &str)> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let name = path.file_name().and_then(|f| f.to_str()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a UTF-8 file path")
    })?;
    let dir = dir::Dir::open_ambient(parent)?;
    Ok((dir, name))
}

/// The loader's WIT package, embedded so the binary measures what it enforces.
pub const LOADER_WIT: &str = include_str!("../../wit/loader.wit");
