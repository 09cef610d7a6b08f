//! The keyserver's configuration file (TOML).
//!
//! ```toml
//! listen = "127.0.0.1:8740"              # default
//! state-dir = "/var/lib/cinfer-keyserver" # required: encrypted key files
//! kek-file = "/run/credentials/cinfer-keyserver.service/kek" # required (or --kek / $CINFER_KEYSERVER_KEK_FILE)
//! audit-log = "/var/log/cinfer-keyserver/audit.jsonl"        # required
//! nonce-ttl-secs = 60                     # default
//! max-outstanding-nonces = 10000          # default: spent nonces remembered (successful attestations per nonce lifetime)
//! max-body-bytes = 262144                 # default (256 KiB)
//! request-timeout-secs = 10               # default: reading a request's headers (or waiting idle for the next one: then the connection is closed), and reading its body (then 408), each
//! max-connections = 64                    # default: client connections open at once; more are closed at once
//! request-key-validity-secs = 604800      # default (7 days): window of the signed request-key statement
//!
//! reference-file = "reference.toml"       # reference values, or inline as [reference]
//!
//! [release]
//! models = ["smollm2-135m"]               # default: every stored model key
//! request-key = true                      # default
//!
//! [endorsement]                           # optional: trust AKs through their TPM's EK certificate
//! ek-ca-certs = ["ek-ca.pem"]             # manufacturer CA certificates (PEM), the trust anchors
//! ek-intermediate-certs = []              # default: none
//! required = false                        # default: pinned AKs (trusted-aks) are still accepted
//! ```
//!
//! Relative paths are relative to the configuration file's directory.
//!
//! Memory held for request bodies is bounded by `max-connections` ×
//! (`max-body-bytes` + hyper's read buffer of at most [`MAX_HTTP_BUF_BYTES`]),
//! each share held for at most twice `request-timeout-secs` by a slow sender.

use cinfer_attest::ReferenceValues;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8740";
/// Default nonce lifetime, seconds.
pub const DEFAULT_NONCE_TTL_SECS: u64 = 60;
/// Default bound on spent nonces not yet expired (successful attestations
/// within one nonce lifetime; issuing a nonce stores nothing).
pub const DEFAULT_MAX_OUTSTANDING_NONCES: usize = 10_000;
/// Default largest request body, bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;
/// Default time allowed for one whole request, seconds.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 10;
/// Default cap on client connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// hyper's read buffer per connection; a request head larger than this is
/// refused with 431.
pub const MAX_HTTP_BUF_BYTES: usize = 64 * 1024;
/// Default validity of the signed request-key statement, seconds.
pub const DEFAULT_REQUEST_KEY_VALIDITY_SECS: u64 = 7 * 24 * 3600;

/// Where the reference values come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceSource {
    /// Inline `[reference]` table.
    Inline(ReferenceValues),
    /// A separate TOML file.
    File(PathBuf),
}

/// Which keys a verified loader gets.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReleasePolicy {
    /// Model ids whose data keys are released; `None`: every stored model key.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Whether the request private key is released.
    #[serde(default = "yes")]
    pub request_key: bool,
}

impl Default for ReleasePolicy {
    fn default() -> Self {
        Self {
            models: None,
            request_key: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// How AKs are trusted through their TPM's endorsement (`[endorsement]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EndorsementPolicy {
    /// PEM files of manufacturer CA certificates: the trust anchors of EK
    /// certificates. Empty: endorsements are not checked (AKs must be pinned).
    #[serde(default)]
    pub ek_ca_certs: Vec<PathBuf>,
    /// PEM files of intermediate CA certificates.
    #[serde(default)]
    pub ek_intermediate_certs: Vec<PathBuf>,
    /// Refuse AKs trusted only because `trusted-aks` pins them.
    #[serde(default)]
    pub required: bool,
}

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of encrypted key files.
    pub state_dir: PathBuf,
    /// File holding the key-encryption key.
    pub kek_file: PathBuf,
    /// Append-only JSON-lines audit log.
    pub audit_log: PathBuf,
    /// Nonce lifetime, seconds.
    pub nonce_ttl_secs: u64,
    /// Bound on spent nonces not yet expired: successful attestations within
    /// one nonce lifetime (issuing a nonce stores nothing).
    pub max_outstanding_nonces: usize,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Time allowed for a request's headers, and then for its body, seconds.
    pub request_timeout_secs: u64,
    /// Client connections open at once; one accepted over the cap is closed
    /// at once.
    pub max_connections: usize,
    /// Validity window of the signed request-key statement, seconds.
    pub request_key_validity_secs: u64,
    /// Reference values the evidence is checked against.
    pub reference: ReferenceSource,
    /// Which keys are released.
    pub release: ReleasePolicy,
    /// AK trust through EK certificates.
    pub endorsement: EndorsementPolicy,
    /// TLS on the listener (`tls-cert` and `tls-key`); plain HTTP without.
    pub tls: Option<cinfer_tls::TlsIdentity>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    state_dir: PathBuf,
    kek_file: Option<PathBuf>,
    audit_log: PathBuf,
    #[serde(default = "default_ttl")]
    nonce_ttl_secs: u64,
    #[serde(default = "default_max_nonces")]
    max_outstanding_nonces: usize,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_timeout")]
    request_timeout_secs: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_validity")]
    request_key_validity_secs: u64,
    reference: Option<ReferenceValues>,
    reference_file: Option<PathBuf>,
    #[serde(default)]
    release: ReleasePolicy,
    #[serde(default)]
    endorsement: EndorsementPolicy,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8740))
}
fn default_ttl() -> u64 {
    DEFAULT_NONCE_TTL_SECS
}
fn default_max_nonces() -> usize {
    DEFAULT_MAX_OUTSTANDING_NONCES
}
fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_timeout() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_SECS
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_validity() -> u64 {
    DEFAULT_REQUEST_KEY_VALIDITY_SECS
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (in the message, not as a `source`, so that a printed error
        /// chain does not say it twice).
        error: std::io::Error,
    },
    /// The TOML does not parse or has unknown keys.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range or missing.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses configuration text; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let reference = match (raw.reference, raw.reference_file) {
            (Some(r), None) => ReferenceSource::Inline(r),
            (None, Some(f)) => ReferenceSource::File(abs(f)),
            _ => {
                return Err(ConfigError::Invalid(
                    "give reference values either inline ([reference]) or as reference-file, exactly one".into(),
                ));
            }
        };
        if raw.nonce_ttl_secs == 0
            || raw.max_outstanding_nonces == 0
            || raw.max_body_bytes == 0
            || raw.max_connections == 0
        {
            return Err(ConfigError::Invalid(
                "nonce-ttl-secs, max-outstanding-nonces, max-body-bytes and max-connections must be positive".into(),
            ));
        }
        if raw.endorsement.required && raw.endorsement.ek_ca_certs.is_empty() {
            return Err(ConfigError::Invalid(
                "endorsement.required needs at least one endorsement.ek-ca-certs file".into(),
            ));
        }
        let endorsement = EndorsementPolicy {
            ek_ca_certs: raw.endorsement.ek_ca_certs.into_iter().map(abs).collect(),
            ek_intermediate_certs: raw
                .endorsement
                .ek_intermediate_certs
                .into_iter()
                .map(abs)
                .collect(),
            required: raw.endorsement.required,
        };
        let tls = match (raw.tls_cert, raw.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let read = |p: PathBuf| {
                    let path = abs(p);
                    std::fs::read(&path).map_err(|error| ConfigError::Read { path, error })
                };
                Some(
                    cinfer_tls::TlsIdentity::from_pem(read(cert)?, read(key)?)
                        .map_err(|e| ConfigError::Invalid(e.0))?,
                )
            }
            _ => {
                return Err(ConfigError::Invalid(
                    "tls-cert and tls-key go together (or neither: plain HTTP)".into(),
                ));
            }
        };
        Ok(Self {
            listen: raw.listen,
            state_dir: abs(raw.state_dir),
            kek_file: raw.kek_file.map(abs).unwrap_or_default(),
            audit_log: abs(raw.audit_log),
            nonce_ttl_secs: raw.nonce_ttl_secs,
            max_outstanding_nonces: raw.max_outstanding_nonces,
            max_body_bytes: raw.max_body_bytes,
            request_timeout_secs: raw.request_timeout_secs.max(1),
            max_connections: raw.max_connections,
            request_key_validity_secs: raw.request_key_validity_secs,
            reference,
            release: raw.release,
            endorsement,
            tls,
        })
    }

    /// A configuration with every default, for tests and embedding.
    pub fn new(
        state_dir: PathBuf,
        kek_file: PathBuf,
        audit_log: PathBuf,
        reference: ReferenceValues,
    ) -> Self {
        Self {
            listen: default_listen(),
            state_dir,
            kek_file,
            audit_log,
            nonce_ttl_secs: DEFAULT_NONCE_TTL_SECS,
            max_outstanding_nonces: DEFAULT_MAX_OUTSTANDING_NONCES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            request_key_validity_secs: DEFAULT_REQUEST_KEY_VALIDITY_SECS,
            reference: ReferenceSource::Inline(reference),
            release: ReleasePolicy::default(),
            endorsement: EndorsementPolicy::default(),
            tls: None,
        }
    }

    /// The reference values (reading the separate file if configured), checked.
    pub fn reference_values(&self) -> Result<ReferenceValues, ConfigError> {
        let refs = match &self.reference {
            ReferenceSource::Inline(r) => r.clone(),
            ReferenceSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.clone(),
                    error,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
        };
        // With EK CAs configured, AKs need not be pinned.
        refs.check_with(self.endorsement.ek_ca_certs.is_empty())
            .map_err(|e| ConfigError::Invalid(format!("reference values: {e}")))?;
        Ok(refs)
    }

    /// The EK trust anchors and intermediates, read from their PEM files.
    pub fn ek_trust(&self) -> Result<crate::endorsement::EkTrust, ConfigError> {
        let read = |paths: &[PathBuf]| -> Result<Vec<Vec<u8>>, ConfigError> {
            let mut out = Vec::new();
            for path in paths {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.clone(),
                    error,
                })?;
                out.extend(crate::endorsement::certificates_from_pem(&text).map_err(
                    |message| ConfigError::Parse {
                        path: path.clone(),
                        message,
                    },
                )?);
            }
            Ok(out)
        };
        crate::endorsement::EkTrust::new(
            &read(&self.endorsement.ek_ca_certs)?,
            &read(&self.endorsement.ek_intermediate_certs)?,
        )
        .map_err(ConfigError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AK: &str = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c2964fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";

    fn reference() -> String {
        let d = "11".repeat(32);
        format!(
            "[reference]\ntrusted-aks = [\"{AK}\"]\n[reference.events]\nloader-binary = [\"{d}\"]\nconfig = [\"{d}\"]\npolicy = [\"{d}\"]\n[reference.pcrs]\n0 = \"{d}\"\n"
        )
    }

    #[test]
    fn defaults_and_relative_paths() {
        let text = format!(
            "state-dir = \"state\"\nkek-file = \"/run/kek\"\naudit-log = \"audit.jsonl\"\n{}",
            reference()
        );
        let c = Config::parse(&text, Path::new("/etc/ks")).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.state_dir, Path::new("/etc/ks/state"));
        assert_eq!(c.kek_file, Path::new("/run/kek"));
        assert_eq!(c.audit_log, Path::new("/etc/ks/audit.jsonl"));
        assert_eq!(c.nonce_ttl_secs, 60);
        assert_eq!(c.max_body_bytes, 256 * 1024);
        assert_eq!(c.max_connections, 64);
        assert_eq!(c.request_timeout_secs, 10);
        let capped = Config::parse(
            &text.replace("audit-log", "max-connections = 3\naudit-log"),
            Path::new("/etc/ks"),
        )
        .unwrap();
        assert_eq!(capped.max_connections, 3);
        let zero = Config::parse(
            &text.replace("audit-log", "max-connections = 0\naudit-log"),
            Path::new("/etc/ks"),
        )
        .unwrap_err()
        .to_string();
        assert!(zero.contains("max-connections must be positive"), "{zero}");
        assert_eq!(c.release, ReleasePolicy::default());
        let refs = c.reference_values().unwrap();
        assert_eq!(refs.measured_pcr, 23);

        // Values pinning no boot PCR are refused at startup, with the reason.
        let unpinned = text.replace("[reference.pcrs]\n0 = ", "[reference.pcrs]\n16 = ");
        let c = Config::parse(&unpinned, Path::new("/etc/ks")).unwrap();
        let err = c.reference_values().unwrap_err().to_string();
        assert!(err.contains("no measured boot PCR is pinned"), "{err}");
        let dev = unpinned.replace(
            "[reference.events]",
            "allow-resettable-pcrs-only = true\n[reference.events]",
        );
        let c = Config::parse(&dev, Path::new("/etc/ks")).unwrap();
        assert!(c.reference_values().unwrap().allow_resettable_pcrs_only);
    }

    #[test]
    fn refuses_unknown_keys_and_missing_reference() {
        let base = "state-dir = \"s\"\naudit-log = \"a\"\n";
        assert!(matches!(
            Config::parse(base, Path::new(".")),
            Err(ConfigError::Invalid(_))
        ));
        let typo = format!("{base}nonce-ttl = 5\n{}", reference());
        assert!(matches!(
            Config::parse(&typo, Path::new(".")),
            Err(ConfigError::Parse { .. })
        ));
        let both = format!("{base}reference-file = \"r.toml\"\n{}", reference());
        assert!(matches!(
            Config::parse(&both, Path::new(".")),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn endorsement_section_and_pins() {
        let base = "state-dir = \"s\"\naudit-log = \"a\"\n";
        let text = format!(
            "{base}{}[endorsement]\nek-ca-certs = [\"ca/root.pem\"]\nrequired = true\n",
            reference()
        );
        let c = Config::parse(&text, Path::new("/etc/ks")).unwrap();
        assert_eq!(
            c.endorsement.ek_ca_certs,
            [Path::new("/etc/ks/ca/root.pem")]
        );
        assert!(c.endorsement.ek_intermediate_certs.is_empty());
        assert!(c.endorsement.required);
        // With EK CAs, no AK need be pinned; without, one must.
        let no_pins = text.replace(&format!("[\"{AK}\"]"), "[]");
        let c = Config::parse(&no_pins, Path::new("/etc/ks")).unwrap();
        assert!(c.reference_values().unwrap().trusted_aks.is_empty());
        let without_ca = format!("{base}{}", reference()).replace(&format!("[\"{AK}\"]"), "[]");
        let c = Config::parse(&without_ca, Path::new("/etc/ks")).unwrap();
        assert!(c.reference_values().is_err());
        // Requiring endorsement without a CA, or a typo, is refused.
        let no_ca = format!("{base}{}[endorsement]\nrequired = true\n", reference());
        let err = Config::parse(&no_ca, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("endorsement.required needs"), "{err}");
        let typo = format!("{base}{}[endorsement]\nek-ca = []\n", reference());
        assert!(matches!(
            Config::parse(&typo, Path::new(".")),
            Err(ConfigError::Parse { .. })
        ));
        // A CA file that is not PEM is refused with its path.
        let dir = std::env::temp_dir().join(format!("cinfer-ks-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.pem"), "not a certificate").unwrap();
        let bad = format!(
            "{base}{}[endorsement]\nek-ca-certs = [\"bad.pem\"]\n",
            reference()
        );
        let err = Config::parse(&bad, &dir)
            .unwrap()
            .ek_trust()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
