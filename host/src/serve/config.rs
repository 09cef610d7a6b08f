//! The serve configuration (`loader.toml`), measured byte for byte.

use super::*;

/// The serve configuration (`loader.toml`). It is measured as it is on disk.
/// Every serve configuration key, for `trusted-loader --help` (a test checks
/// that it names every key the parser accepts).
pub const HELP: &str = "\
Configuration (TOML; listen and policy required; measured byte for byte):
  listen = \"tcp:127.0.0.1:7300\"     the channel: tcp:HOST:PORT or unix:PATH (one peer at a time)
  policy = \"policy.toml\"            the admission policy (relative paths: to this file)
  tpm = \"device:/dev/tpmrm0\"        the TPM (device:PATH or swtpm:host=H,port=P); leave out for TD-only evidence
  pcr = 23                          the PCR the event log is extended into
  quote-pcrs = [0, 7, 23]           PCRs quoted (default: the measured PCR only)
  backend = \"cpu\"                   the accelerator: cpu or cuda (when built with it)
  batching = true                   coalesce concurrent runs' matmuls on shared weights
  max-in-flight = 8                 requests running at once; more are refused as busy
  max-frame-bytes = 16777216        largest channel frame payload
  request-max-age-secs = 300        requests older than this are refused (replay window)
  request-clock-skew-secs = 5       how far in the future a request's time may be
  keyservers = [\"<hex SEC1>\"]       keyserver identities keys are accepted from (k-of-n: with shares)
  keyserver-threshold = 1           how many of them must agree (shares of a split key)
  server-keys = [\"<hex>\"]           inference servers' channel keys (`inference-server keygen`)
  allow-unauthenticated-peers = false   serve any peer without server-keys (development only)
  peer-auth-timeout-ms = 5000       for a peer to answer the challenge
  peer-idle-timeout-ms = 60000      an authenticated peer silent this long is disconnected
  [[program]]                       a program stored with the loader: name, path, signatures = [...]
  [[model]]                         a sealed model: id, path
  [tdx]                             TD evidence (configfs-tsm), keys below:
  report-dir = \"/sys/kernel/config/tsm/report\"
  measurements-dir = \"/sys/class/misc/tdx_guest/measurements\"
  rtmr = 3                          the RTMR the event log is extended into (2 or 3)
  quote-timeout-ms = 10000          for the quote provider
";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    /// Endpoint to listen on: `tcp:HOST:PORT` or `unix:PATH`.
    pub listen: String,
    /// TPM TCTI: `swtpm:host=127.0.0.1,port=2321`, `device:/dev/tpmrm0`.
    /// Absent: no TPM evidence (then `[tdx]` must be given: a TD without a
    /// vTPM attests with its TD quote alone).
    #[serde(default)]
    pub tpm: Option<String>,
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
    /// Cross-request batching: runs are driven as coroutines on one thread
    /// and their decode matmuls on the same resident weights run as one
    /// launch (`cinfer_accel::batch`; results are bit for bit those of
    /// separate launches). Measured with this file.
    #[serde(default = "default_batching")]
    pub batching: bool,
    /// Keyserver identities (hex SEC1, `keyserver public-identity`) whose key
    /// releases this loader installs. Empty: any release that unwraps is
    /// installed (development only: a hostile relay could then install keys of
    /// its own — never read the real ones). Measured with this file.
    #[serde(default)]
    pub keyservers: Vec<String>,
    /// k-of-n keyservers: how many different pinned keyservers' shares a key
    /// needs (`cinfer split-key`). From 2 on, whole keys are refused, so no
    /// single keyserver can hand this loader a key. Default 1: any one
    /// pinned keyserver's release is installed. Measured with this file.
    #[serde(default = "default_keyserver_threshold")]
    pub keyserver_threshold: u8,
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
    /// In an Intel TDX guest: also extend the event log into an RTMR and send
    /// a TD quote with every evidence ([`super::tdx`]). Absent: TPM evidence
    /// only. Measured with this file.
    #[serde(default)]
    pub tdx: Option<super::tdx::TdxConfig>,
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
    true
}

fn default_keyserver_threshold() -> u8 {
    1
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
pub(super) fn unix_millis_now() -> u64 {
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

/// Why a serve configuration, or what it names, cannot be served. Messages
/// name the key or file; none carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not TOML of this shape (unknown key, wrong type, …): the parser's message.
    #[error("{0}")]
    Toml(String),
    /// `quote-pcrs` leaves out the measured PCR.
    #[error("quote-pcrs {quote_pcrs:?} must include the measured pcr {pcr}")]
    MeasuredPcrNotQuoted {
        /// The PCRs each quote would cover.
        quote_pcrs: Vec<u8>,
        /// The measured PCR.
        pcr: u8,
    },
    /// A `quote-pcrs` entry above 23.
    #[error("quote-pcrs: {0} is not a PCR (0..=23)")]
    NotAPcr(u8),
    /// `listen` is not an endpoint (`tcp:` or `unix:`).
    #[error("listen: {0}")]
    Listen(String),
    /// A `server-keys` entry is not a hex uncompressed P-256 key.
    #[error("server-keys: {0:?} is not a hex uncompressed P-256 key")]
    BadServerKey(String),
    /// No `server-keys` and no `allow-unauthenticated-peers = true`.
    #[error(
        "server-keys: no inference server key is configured; list the server's channel key \
         (`inference-server keygen` prints it), or set allow-unauthenticated-peers = true \
         (development only: any local process could then take the channel)"
    )]
    NoServerKeys,
    /// Both `server-keys` and `allow-unauthenticated-peers = true`.
    #[error("server-keys and allow-unauthenticated-peers = true contradict each other")]
    ServerKeysAndUnauthenticatedPeers,
    /// A peer timeout of zero.
    #[error("peer-auth-timeout-ms and peer-idle-timeout-ms must be positive")]
    ZeroPeerTimeout,
    /// Neither `tpm` nor `[tdx]`: the loader could prove nothing.
    #[error("no evidence to attest with: give tpm, [tdx], or both")]
    NoEvidence,
    /// `keyserver-threshold` is 0, or larger than the keyservers pinned.
    #[error(
        "keyserver-threshold = {threshold} needs at least that many keyservers pinned (keyservers lists {pinned})"
    )]
    KeyserverThreshold {
        /// The configured threshold.
        threshold: u8,
        /// Keyservers pinned.
        pinned: usize,
    },
    /// A `keyservers` entry is not a hex uncompressed P-256 key.
    #[error("keyservers: {0:?} is not a hex uncompressed P-256 key")]
    BadKeyserverKey(String),
    /// The policy does not allow the configured backend.
    #[error(transparent)]
    BackendNotAllowed(crate::PolicyError),
    /// The configured backend is not available in this build or on this machine.
    #[error("backend: {0}")]
    Backend(crate::backend::BackendError),
    /// The loader could not be built from the policy.
    #[error(transparent)]
    Loader(crate::LoaderError),
    /// A file the configuration names could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The path, relative to the configuration's directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A configured program was refused.
    #[error("program {name}: {source}")]
    Program {
        /// The program's name.
        name: String,
        /// Why it was refused.
        source: crate::AdmissionError,
    },
    /// Two configured programs have the same name.
    #[error("two programs are named {0}")]
    DuplicateProgram(String),
    /// A configured sealed model could not be opened.
    #[error("opening model {path}: {source}")]
    OpenModel {
        /// The model file's path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A sealed model's file could not be read again to open it with its key.
    #[error("model {id}: {source}")]
    ReopenModel {
        /// The model id.
        id: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl ServeConfig {
    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> Result<Self, ServeError> {
        let c: ServeConfig =
            toml::from_str(text).map_err(|e| ConfigError::Toml(e.message().to_owned()))?;
        let quote_pcrs = c.quote_pcrs();
        if !quote_pcrs.contains(&c.pcr) {
            return Err(ConfigError::MeasuredPcrNotQuoted {
                quote_pcrs,
                pcr: c.pcr,
            }
            .into());
        }
        if let Some(bad) = quote_pcrs.iter().find(|p| **p > 23) {
            return Err(ConfigError::NotAPcr(*bad).into());
        }
        c.listen
            .parse::<cinfer_channel::Endpoint>()
            .map_err(ConfigError::Listen)?;
        let pinned = c.pinned_keyservers()?;
        let distinct = pinned
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if c.keyserver_threshold == 0
            || (c.keyserver_threshold >= 2 && distinct < usize::from(c.keyserver_threshold))
        {
            return Err(ConfigError::KeyserverThreshold {
                threshold: c.keyserver_threshold,
                pinned: distinct,
            }
            .into());
        }
        c.peer_policy()?;
        if c.tpm.is_none() && c.tdx.is_none() {
            return Err(ConfigError::NoEvidence.into());
        }
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
                    .ok_or_else(|| ConfigError::BadServerKey(k.clone()))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        match (keys.is_empty(), self.allow_unauthenticated_peers) {
            (true, false) => {
                return Err(ConfigError::NoServerKeys.into());
            }
            (false, true) => {
                return Err(ConfigError::ServerKeysAndUnauthenticatedPeers.into());
            }
            _ => {}
        }
        if self.peer_auth_timeout_ms == 0 || self.peer_idle_timeout_ms == 0 {
            return Err(ConfigError::ZeroPeerTimeout.into());
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
                    .ok_or_else(|| ConfigError::BadKeyserverKey(k.clone()).into())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_names_every_key() {
        use serde_aux::serde_introspection::serde_introspect;
        let tables = ["program", "model", "tdx"];
        let keys = serde_introspect::<ServeConfig>()
            .iter()
            .chain(serde_introspect::<ProgramConfig>())
            .chain(serde_introspect::<ModelConfig>())
            .chain(serde_introspect::<super::super::tdx::TdxConfig>());
        for key in keys {
            let listed = match *key {
                "program" => "  [[program]]".to_owned(),
                "model" => "  [[model]]".to_owned(),
                k if tables.contains(&k) => format!("  [{k}]"),
                // [[program]] and [[model]] list their keys on one line.
                "name" | "path" | "signatures" | "id" => (*key).to_owned(),
                k => format!("  {k} = "),
            };
            assert!(HELP.contains(&listed), "{key} is not in --help");
        }
    }
}
