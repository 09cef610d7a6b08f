//! What a loader measures at start: its serve configuration and the policy it
//! names, read through the configuration's directory, and the event log they
//! and the loader binary extend into the measured PCR
//! ([`crate::serve::measurements`]). `trusted-loader serve` measures itself
//! with this; operators compute the same log off the machine with
//! `cinfer measure-loader` (which also builds the keyserver's reference values:
//! that code is not in the loader).

use std::path::{Path, PathBuf};

use cinfer_attest::Event;

use crate::serve::{ServeConfig, ServeError, measurements};
use crate::{Policy, PolicyError};

/// A loader's configuration, policy and event log.
#[derive(Debug)]
pub struct Measured {
    /// The parsed serve configuration.
    pub cfg: ServeConfig,
    /// The policy it names.
    pub policy: Policy,
    /// The configuration's directory (policy files are read through it).
    pub dir: crate::dir::Dir,
    /// The event log, in the order the loader extends it.
    pub events: Vec<Event>,
}

/// Why a configuration could not be measured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeasureError {
    /// The configuration file could not be opened or read.
    #[error("reading {path}: {source}")]
    Read {
        /// The configuration's path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration is not UTF-8 text.
    #[error("{0} is not UTF-8")]
    NotUtf8(PathBuf),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ServeError),
    /// The policy it names is invalid.
    #[error("loading the policy: {0}")]
    Policy(#[from] PolicyError),
}

/// Reads the serve configuration at `config` and its policy, and computes the
/// event log of a loader whose binary is `binary`.
pub fn measure(config: &Path, binary: &[u8]) -> Result<Measured, MeasureError> {
    let read = |source| MeasureError::Read {
        path: config.to_owned(),
        source,
    };
    let (dir, name) = crate::open_parent_dir(config).map_err(read)?;
    let config_bytes = dir.read(name).map_err(read)?;
    let text =
        std::str::from_utf8(&config_bytes).map_err(|_| MeasureError::NotUtf8(config.to_owned()))?;
    let cfg = ServeConfig::parse(text)?;
    let policy = Policy::load(&dir, &cfg.policy)?;
    let events = measurements(cfg.pcr, binary, name, &config_bytes, &policy);
    Ok(Measured {
        cfg,
        policy,
        dir,
        events,
    })
}
