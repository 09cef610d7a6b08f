//! The audit log: one JSON line per key release and per refusal, appended to a
//! file and echoed to `tracing`. Lines name keys by id and AKs by fingerprint;
//! they never carry key material.

use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One audit line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Unix seconds.
    pub time: u64,
    /// The peer's address.
    pub peer: String,
    /// `released` or `refused`.
    pub outcome: &'static str,
    /// Why it was refused (an [`cinfer_attest::EvidenceError`] or nonce message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The nonce the evidence answered (public).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Fingerprint of the attestation key presented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ak_fingerprint: Option<String>,
    /// The measured PCR's value (released only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_pcr_value: Option<String>,
    /// The TPM's reset count at quote time (released only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm_reset_count: Option<u32>,
    /// The TPM's clock at quote time, ms (released only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm_clock: Option<u64>,
    /// How the AK was trusted: `"pinned"`, or `"endorsed"` (EK certificate and
    /// credential).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ak_trust: Option<&'static str>,
    /// Hex SHA-256 of the EK certificate, when the AK was trusted through it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ek_certificate_fingerprint: Option<String>,
    /// The TD's TCB status, when a TD quote was required and verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tdx_tcb_status: Option<String>,
    /// Hex MRTD of that TD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tdx_mrtd: Option<String>,
    /// Released keys, as `kind:id`.
    pub keys: Vec<String>,
}

/// The append-only audit file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens (creating, mode 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut opts = std::fs::OpenOptions::new();
        opts.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(opts.open(path)?),
        })
    }

    /// Appends one line and logs it. A failure to write is logged as an error
    /// (the decision already stands; the line still reaches `tracing`).
    pub fn record(&self, record: &AuditRecord) {
        let mut line = serde_json::to_string(record).unwrap_or_default();
        tracing::info!(target: "cinfer_keyserver::audit", "{line}");
        line.push('\n');
        let result = match self.file.lock() {
            Ok(mut f) => f.write_all(line.as_bytes()),
            Err(_) => Err(std::io::Error::other("audit log lock poisoned")),
        };
        if let Err(e) = result {
            tracing::error!("writing audit log {}: {e}", self.path.display());
        }
    }
}
