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

/// What a TD must be for keys to be released to a loader inside it
/// (`[tdx]`). When the table is present, every evidence must carry a TD quote
/// as well as the TPM quote (both kinds required); absent, TPM evidence alone
/// suffices and a TD quote is not looked at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TdxPolicy {
    /// The root CA (DER or PEM) the PCK chain and the collateral's signers
    /// chain to: Intel's SGX Root CA in production.
    pub root_ca: PathBuf,
    /// Collateral for the platforms' FMSPCs, as Intel's PCS or a PCCS serves
    /// it, assembled as one JSON object (`dcap-qvl`'s `QuoteCollateralV3`:
    /// PCK CRL and its issuer chain, root CA CRL, TCB info and QE identity
    /// with their signatures and issuer chains). Read at start; checked for
    /// validity at every attestation, so refresh it (and restart) before its
    /// next update date.
    pub collateral: PathBuf,
    /// MRTD (hex, 48 bytes): the TD's initial memory (its firmware).
    pub mrtd: String,
    /// RTMR0 (firmware configuration), where pinned (hex).
    #[serde(default)]
    pub rtmr0: Option<String>,
    /// RTMR1 (kernel, command line), where pinned (hex).
    #[serde(default)]
    pub rtmr1: Option<String>,
    /// RTMR2, where pinned (hex); not the event RTMR.
    #[serde(default)]
    pub rtmr2: Option<String>,
    /// MRCONFIGID, where pinned (hex).
    #[serde(default)]
    pub mrconfigid: Option<String>,
    /// MROWNER, where pinned (hex).
    #[serde(default)]
    pub mrowner: Option<String>,
    /// The RTMR the loader extends its event log into (its `tdx.rtmr`).
    #[serde(default = "default_event_rtmr")]
    pub event_rtmr: u8,
    /// TCB statuses accepted [default: `UpToDate` only].
    #[serde(default = "default_tcb_statuses")]
    pub allowed_tcb_statuses: Vec<String>,
}

fn default_event_rtmr() -> u8 {
    cinfer_attest::TDX_EVENT_RTMR
}

fn default_tcb_statuses() -> Vec<String> {
    vec!["UpToDate".to_owned()]
}

/// TCB statuses Intel's collateral gives a platform.
pub const TCB_STATUSES: [&str; 7] = [
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
];

/// The TDX trust the keyserver checks TD quotes against.
#[derive(Debug, Clone)]
pub struct TdxTrust {
    /// Root CA, measurement pins, TCB policy, event RTMR.
    pub refs: cinfer_attest::tdx::TdxReferenceValues,
    /// The collateral the quotes are verified with.
    pub collateral: cinfer_attest::tdx::TdxCollateral,
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
    /// TD quotes required, and what they must show (`[tdx]`): a release
    /// needs a TD quote exactly when this is given.
    pub tdx: Option<TdxPolicy>,
    /// Whether a release needs a TPM quote (`evidence` lists `tpm`; the
    /// default). At least one of this and `tdx`.
    pub tpm_evidence: bool,
}

/// Every configuration key, for `keyserver --help` (a test checks that it
/// names every key the parser accepts).
pub const HELP: &str = "Configuration (TOML; state-dir and audit-log required):
  listen = \"127.0.0.1:8740\"                HTTP API address
  state-dir = \"/var/lib/cinfer-ks\"         identity, request key, model keys and shares (encrypted under the KEK)
  kek-file = \"/run/credentials/kek\"        the key-encryption key (else --kek or $CINFER_KEYSERVER_KEK_FILE)
  audit-log = \"audit.jsonl\"                one JSON line per release or refusal (no key bytes)
  nonce-ttl-secs = 60                      how long a nonce may be used
  max-outstanding-nonces = 10000           spent nonces remembered until they expire; at the cap attestations are refused (503)
  max-body-bytes = 262144                  largest evidence body (413 above)
  request-timeout-secs = 10                to receive a request (and a TLS handshake)
  max-connections = 64                     connections open at once; more are closed at once
  request-key-validity-secs = 604800       validity of the signed request-key statement
  reference-file = \"reference.toml\"        the loader's reference values (`cinfer measure-loader`), or inline:
  [reference]                              trusted-aks, measured-pcr, [reference.events], [reference.pcrs]
  tls-cert = \"ks.pem\"                      TLS on the listener: PEM chain, leaf first (with tls-key; else plain HTTP)
  tls-key = \"ks.key\"                       its PEM private key
  evidence = [\"tpm\"]                       kinds a release needs: [\"tpm\"] (default), [\"tpm\", \"tdx\"] with [tdx], [\"tdx\"]
  [release]                                which keys a verified loader gets:
  models = [\"smollm2-135m-instruct\"]       model ids (default: every stored model key)
  request-key = true                       the request private key (or this keyserver's share of it)
  [endorsement]                            trusting AKs through their TPM's EK certificate:
  ek-ca-certs = [\"ek-ca.pem\"]              manufacturer CA certificates (PEM)
  ek-intermediate-certs = []               intermediate CA certificates (PEM)
  required = false                         refuse AKs that are only pinned (trusted-aks)
  [tdx]                                    TD quotes (Intel TDX), verified offline with dcap-qvl:
  root-ca = \"intel-sgx-root-ca.der\"        the PCK chain's root (DER or PEM)
  collateral = \"collateral.json\"           CRLs, TCB info, QE identity; read at start, checked at every attestation
  mrtd = \"<96 hex>\"                        the TD's firmware (`cinfer measure-loader --tdx-measurements`)
  rtmr0 = \"<96 hex>\"                       optional pins: rtmr0, rtmr1, rtmr2, mrconfigid, mrowner
  rtmr1 = \"...\"
  rtmr2 = \"...\"
  mrconfigid = \"...\"
  mrowner = \"...\"
  event-rtmr = 3                           the RTMR the loader extends its event log into (replayed, not pinned)
  allowed-tcb-statuses = [\"UpToDate\"]      TCB statuses accepted

Environment: CINFER_KEYSERVER_KEK_FILE (the KEK file), CINFER_LOG (log filter, default info; else RUST_LOG),
CINFER_LOG_FORMAT (text or json).";

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
    tdx: Option<TdxPolicy>,
    evidence: Option<Vec<String>>,
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
        // (tpm, tdx) as `evidence` lists them; default: tpm, and tdx with [tdx].
        let (tpm_evidence, tdx_listed) = match &raw.evidence {
            None => (true, raw.tdx.is_some()),
            Some(kinds) => {
                if let Some(bad) = kinds.iter().find(|k| *k != "tpm" && *k != "tdx") {
                    return Err(ConfigError::Invalid(format!(
                        "evidence: unknown kind {bad:?} (tpm, tdx)"
                    )));
                }
                let (tpm, tdx) = (
                    kinds.iter().any(|k| k == "tpm"),
                    kinds.iter().any(|k| k == "tdx"),
                );
                if !tpm && !tdx {
                    return Err(ConfigError::Invalid(
                        "evidence is empty: list tpm, tdx or both".into(),
                    ));
                }
                (tpm, tdx)
            }
        };
        if tdx_listed != raw.tdx.is_some() {
            return Err(ConfigError::Invalid(if tdx_listed {
                "evidence lists tdx but there is no [tdx] table (root-ca, collateral, mrtd)".into()
            } else {
                "[tdx] is given but evidence does not list tdx".into()
            }));
        }
        if !tpm_evidence && raw.endorsement.required {
            return Err(ConfigError::Invalid(
                "endorsement.required needs tpm evidence".into(),
            ));
        }
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
            tdx: raw.tdx.map(|t| TdxPolicy {
                root_ca: abs(t.root_ca),
                collateral: abs(t.collateral),
                ..t
            }),
            tpm_evidence,
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
            tdx: None,
            tpm_evidence: true,
        }
    }

    /// The kinds of evidence a release needs, as `evidence` names them.
    pub fn evidence_kinds(&self) -> Vec<&'static str> {
        [(self.tpm_evidence, "tpm"), (self.tdx.is_some(), "tdx")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect()
    }

    /// The TDX trust (`[tdx]`): root CA and collateral read from their files,
    /// pins parsed and checked. `None` without a `[tdx]` table.
    pub fn tdx_trust(&self) -> Result<Option<TdxTrust>, ConfigError> {
        let Some(t) = &self.tdx else {
            return Ok(None);
        };
        let invalid = |m: String| ConfigError::Invalid(format!("tdx: {m}"));
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|error| ConfigError::Read {
                path: path.clone(),
                error,
            })
        };
        let root = read(&t.root_ca)?;
        let root_ca_der = if root.starts_with(b"-----BEGIN") {
            let text = String::from_utf8_lossy(&root);
            let mut certs =
                crate::endorsement::certificates_from_pem(&text).map_err(|message| {
                    ConfigError::Parse {
                        path: t.root_ca.clone(),
                        message,
                    }
                })?;
            if certs.len() != 1 {
                return Err(invalid(format!(
                    "root-ca {} holds {} certificates, not one",
                    t.root_ca.display(),
                    certs.len()
                )));
            }
            certs.remove(0)
        } else {
            root
        };
        let collateral =
            cinfer_attest::tdx::parse_collateral(&read(&t.collateral)?).map_err(|e| {
                ConfigError::Parse {
                    path: t.collateral.clone(),
                    message: e.to_string(),
                }
            })?;
        let measurement = |key: &str, hex_value: &str| -> Result<[u8; 48], ConfigError> {
            let mut out = [0u8; 48];
            hex::decode_to_slice(hex_value.trim(), &mut out)
                .map_err(|e| invalid(format!("{key} is not 48 bytes of hex: {e}")))?;
            Ok(out)
        };
        let optional =
            |key: &str, v: &Option<String>| v.as_deref().map(|h| measurement(key, h)).transpose();
        if !(2..=3).contains(&t.event_rtmr) {
            return Err(invalid(format!(
                "event-rtmr = {}: a loader extends RTMR2 or RTMR3 only",
                t.event_rtmr
            )));
        }
        if t.event_rtmr == 2 && t.rtmr2.is_some() {
            return Err(invalid(
                "rtmr2 is the event RTMR: it is replayed from the event log, not pinned".into(),
            ));
        }
        if t.allowed_tcb_statuses.is_empty() {
            return Err(invalid(
                "allowed-tcb-statuses is empty: nothing could verify".into(),
            ));
        }
        if let Some(bad) = t
            .allowed_tcb_statuses
            .iter()
            .find(|s| !TCB_STATUSES.contains(&s.as_str()))
        {
            return Err(invalid(format!(
                "unknown TCB status {bad:?} in allowed-tcb-statuses (known: {})",
                TCB_STATUSES.join(", ")
            )));
        }
        let mut refs =
            cinfer_attest::tdx::TdxReferenceValues::new(root_ca_der, measurement("mrtd", &t.mrtd)?);
        refs.rtmrs = [
            optional("rtmr0", &t.rtmr0)?,
            optional("rtmr1", &t.rtmr1)?,
            optional("rtmr2", &t.rtmr2)?,
            None,
        ];
        refs.mr_config_id = optional("mrconfigid", &t.mrconfigid)?;
        refs.mr_owner = optional("mrowner", &t.mrowner)?;
        refs.event_rtmr = t.event_rtmr;
        refs.allowed_tcb_statuses = t.allowed_tcb_statuses.clone();
        Ok(Some(TdxTrust { refs, collateral }))
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
        // With EK CAs configured, AKs need not be pinned; without TPM
        // evidence, AKs and PCRs are not used at all.
        if self.tpm_evidence {
            refs.check_with(self.endorsement.ek_ca_certs.is_empty())
        } else {
            refs.check_events()
        }
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

    #[test]
    fn help_names_every_key() {
        use serde_aux::serde_introspection::serde_introspect;
        let tables = ["release", "endorsement", "tdx", "reference"];
        for key in serde_introspect::<RawConfig>()
            .iter()
            .chain(serde_introspect::<ReleasePolicy>())
            .chain(serde_introspect::<EndorsementPolicy>())
            .chain(serde_introspect::<TdxPolicy>())
        {
            let listed = if tables.contains(key) {
                format!("  [{key}]")
            } else {
                format!("  {key} = ")
            };
            assert!(HELP.contains(&listed), "{key} is not in --help");
        }
    }

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

    /// `[tdx]`: the root CA (DER or PEM) and collateral read relative to the
    /// configuration, the pins parsed; each mistake refused with its key.
    #[test]
    fn tdx_table_reads_its_trust_and_refuses_each_mistake() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../attest/tests/fixtures/tdx");
        let m = "ab".repeat(48);
        let base = format!(
            "state-dir = \"s\"\naudit-log = \"a\"\n{}[tdx]\nroot-ca = \"intel-sgx-root-ca.der\"\ncollateral = \"tdx_quote_collateral.json\"\nmrtd = \"{m}\"\n",
            reference()
        );
        let trust = |text: &str| Config::parse(text, &fixtures).and_then(|c| c.tdx_trust());
        let t = trust(&base).unwrap().expect("[tdx] given");
        assert_eq!(t.refs.mr_td, [0xab; 48]);
        assert_eq!(t.refs.event_rtmr, 3);
        assert_eq!(t.refs.allowed_tcb_statuses, ["UpToDate"]);
        assert_eq!(t.refs.rtmrs, [None; 4]);
        assert_eq!(
            t.refs.root_ca_der,
            std::fs::read(fixtures.join("intel-sgx-root-ca.der")).unwrap()
        );
        let pinned = trust(&format!(
            "{base}rtmr0 = \"{m}\"\nmrowner = \"{m}\"\nallowed-tcb-statuses = [\"UpToDate\", \"SWHardeningNeeded\"]\n"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(pinned.refs.rtmrs[0], Some([0xab; 48]));
        assert_eq!(pinned.refs.mr_owner, Some([0xab; 48]));
        assert_eq!(pinned.refs.allowed_tcb_statuses.len(), 2);
        // Without the table: no TD quote required.
        let none = format!("state-dir = \"s\"\naudit-log = \"a\"\n{}", reference());
        assert!(trust(&none).unwrap().is_none());

        for (edit, expected) in [
            (format!("{base}event-rtmr = 1\n"), "event-rtmr = 1"),
            (
                format!("{base}event-rtmr = 2\nrtmr2 = \"{m}\"\n"),
                "rtmr2 is the event RTMR",
            ),
            (
                base.replace(&format!("mrtd = \"{m}\""), "mrtd = \"abcd\""),
                "mrtd is not 48 bytes of hex",
            ),
            (
                format!("{base}rtmr1 = \"zz\"\n"),
                "rtmr1 is not 48 bytes of hex",
            ),
            (
                format!("{base}allowed-tcb-statuses = [\"UpToDat\"]\n"),
                "unknown TCB status \"UpToDat\"",
            ),
            (
                format!("{base}allowed-tcb-statuses = []\n"),
                "allowed-tcb-statuses is empty",
            ),
            (
                base.replace("tdx_quote_collateral.json", "missing.json"),
                "missing.json",
            ),
            (
                base.replace("tdx_quote_collateral.json", "intel-sgx-root-ca.der"),
                "intel-sgx-root-ca.der",
            ),
        ] {
            let err = trust(&edit).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        assert!(matches!(
            Config::parse(&format!("{base}mrtdd = \"{m}\"\n"), &fixtures),
            Err(ConfigError::Parse { .. })
        ));
    }

    /// `evidence`: which kinds a release needs. Default `tpm`, plus `tdx`
    /// with a `[tdx]` table; TD quotes alone need no pinned AK or PCR.
    #[test]
    fn evidence_kinds_default_and_refusals() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../attest/tests/fixtures/tdx");
        let head = "state-dir = \"s\"\naudit-log = \"a\"\n";
        let tdx = format!(
            "[tdx]\nroot-ca = \"intel-sgx-root-ca.der\"\ncollateral = \"tdx_quote_collateral.json\"\nmrtd = \"{}\"\n",
            "ab".repeat(48)
        );
        let kinds = |text: &str| Config::parse(text, &fixtures).map(|c| c.evidence_kinds());
        assert_eq!(kinds(&format!("{head}{}", reference())).unwrap(), ["tpm"]);
        assert_eq!(
            kinds(&format!("{head}{}{tdx}", reference())).unwrap(),
            ["tpm", "tdx"]
        );
        // TD quotes alone: reference values without AKs or boot PCRs do.
        let events_only = reference().replace(&format!("[\"{AK}\"]"), "[]").replace(
            &format!("[reference.pcrs]\n0 = \"{}\"\n", "11".repeat(32)),
            "",
        );
        let td_only = Config::parse(
            &format!("{head}evidence = [\"tdx\"]\n{events_only}{tdx}"),
            &fixtures,
        )
        .unwrap();
        assert_eq!(td_only.evidence_kinds(), ["tdx"]);
        td_only.reference_values().unwrap();
        let tpm_too = Config::parse(&format!("{head}{events_only}{tdx}"), &fixtures).unwrap();
        assert!(tpm_too.reference_values().is_err(), "a TPM needs pins");
        for (text, expected) in [
            (
                format!("{head}evidence = [\"tdx\"]\n{}", reference()),
                "no [tdx] table",
            ),
            (
                format!("{head}evidence = [\"tpm\"]\n{}{tdx}", reference()),
                "[tdx] is given but evidence does not list tdx",
            ),
            (
                format!("{head}evidence = []\n{}", reference()),
                "evidence is empty",
            ),
            (
                format!("{head}evidence = [\"sev\"]\n{}", reference()),
                "unknown kind \"sev\"",
            ),
            (
                format!(
                    "{head}evidence = [\"tdx\"]\n{}[endorsement]\nek-ca-certs = [\"x.pem\"]\nrequired = true\n{tdx}",
                    reference()
                ),
                "endorsement.required needs tpm evidence",
            ),
        ] {
            let err = Config::parse(&text, &fixtures).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
