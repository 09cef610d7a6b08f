//! One module per capability interface of `wit/loader.wit`, each implemented
//! on a narrow context that holds only that capability's state and checks
//! its own limits.
//!
//! Guest-visible failures are the WIT error variants; policy violations
//! (a [`PolicyViolation`]) and host bugs are traps.

pub mod accelerator;
pub mod crypto;
pub mod model;
pub mod output;

/// A limit the program crossed: the run is trapped with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyViolation {
    /// Linear memory (or a table) would grow past the policy's limit.
    #[error("memory limit of {limit} bytes exceeded")]
    MemoryLimit {
        /// The limit.
        limit: u64,
    },
    /// A table would grow past the loader's per-table element limit.
    #[error("table limit of {limit} elements exceeded")]
    TableLimit {
        /// The limit.
        limit: u64,
    },
    /// The reply would exceed the policy's egress budget.
    #[error("egress budget of {budget} bytes exceeded")]
    EgressBudget {
        /// The budget.
        budget: u64,
    },
    /// A reply frame could not leave before the run's deadline at the
    /// policy's egress rate (the slowest bucket that applies).
    #[error(
        "egress rate of {bytes_per_sec} bytes/s: the reply could not leave before the deadline"
    )]
    EgressRate {
        /// The rate, sealed bytes per second.
        bytes_per_sec: u64,
    },
    /// A handle the guest passed does not name a live host object.
    #[error("invalid {0} handle")]
    BadHandle(&'static str),
    /// An argument is beyond a documented bound of the interface.
    #[error("{0}")]
    ArgumentBound(&'static str),
}
