//! The inference server's configuration file (TOML). Every key is optional.
//!
//! ```toml
//! listen = "127.0.0.1:8080"               # default: HTTP API address
//! loader = "tcp:127.0.0.1:7300"           # default: the trusted loader's channel (tcp:HOST:PORT or unix:PATH)
//! # loaders = ["tcp:10.0.0.5:7300", "tcp:10.0.0.6:7300"]  # or several loaders (instead of loader): each attested
//!                                         # on its own; requests go to the least busy ready one
//! channel-key = "channel.key"             # no default: the key this server signs the loader's challenge with
//!                                         # (`inference-server keygen`; its public half goes in the loader's server-keys)
//! keyservers = ["http://127.0.0.1:8740"]  # default: keyserver base URLs, tried in order (plain http:// only)
//! max-request-bytes = 1048576             # default (1 MiB): largest sealed request body
//! max-connections = 128                   # default: client connections open at once; more are closed at once
//! max-in-flight = 8                       # default: requests running on each loader at once (set it to the loader's)
//! max-queued = 64                         # default: requests waiting for one of those; more are 429 (Retry-After)
//! header-timeout-ms = 10000               # default: reading a request's headers (or waiting idle for the next one); then the connection is closed
//! body-timeout-ms = 10000                 # default: reading a request's whole body; then 408
//! ready-timeout-ms = 5000                 # default: how long a request waits for an attested loader before 503
//! reconnect-backoff-ms = 200              # default: first retry delay (loader, keyservers); doubles, capped at 5 s
//! max-frame-bytes = 16777216              # default (16 MiB): largest channel frame payload, both directions
//! request-timeout-ms = 120000             # default: whole request, from submission to the last record
//! keyserver-timeout-ms = 5000             # default: one keyserver HTTP call, connect to last body byte
//! loader-timeout-ms = 30000               # default: the loader's answer to Hello/AttestRequest/KeyRelease
//! shutdown-grace-ms = 10000               # default: how long requests in progress may run on after SIGINT/SIGTERM
//! ```
//!
//! Keyservers are reached over plain HTTP in this version (no TLS): what travels
//! is public (nonces, evidence, the signed request key) or HPKE-wrapped to the
//! attested loader (key releases), so the transport adds no confidentiality;
//! put TLS in front if the network needs it.
//!
//! Memory held for request bodies is bounded by `max-connections` ×
//! (`max-request-bytes` + hyper's read buffer of at most
//! [`MAX_HTTP_BUF_BYTES`]), and a slow sender holds its share for at most
//! `header-timeout-ms` + `body-timeout-ms`.

use cinfer_channel::Endpoint;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default HTTP listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default loader endpoint (the development loader configuration's).
pub const DEFAULT_LOADER: &str = "tcp:127.0.0.1:7300";
/// Default keyserver.
pub const DEFAULT_KEYSERVER: &str = "http://127.0.0.1:8740";
/// Default largest request body: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;
/// Default cap on client connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
/// Default requests running on the loader at once (the loader's own default).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
/// Default requests waiting for a place on the loader.
pub const DEFAULT_MAX_QUEUED: usize = 64;
/// Default time to receive a request's headers, milliseconds.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// Default time to receive a request's whole body, milliseconds.
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 10_000;
/// hyper's read buffer per connection (request head, body chunks in passing);
/// a request head larger than this is refused with 431.
pub const MAX_HTTP_BUF_BYTES: usize = 64 * 1024;
/// Default wait for readiness, milliseconds.
pub const DEFAULT_READY_TIMEOUT_MS: u64 = 5_000;
/// Default first reconnect delay, milliseconds.
pub const DEFAULT_RECONNECT_BACKOFF_MS: u64 = 200;
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Default request deadline, milliseconds.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 120_000;
/// Default keyserver call deadline, milliseconds.
pub const DEFAULT_KEYSERVER_TIMEOUT_MS: u64 = 5_000;
/// Default deadline for the loader's answers during attestation, milliseconds.
pub const DEFAULT_LOADER_TIMEOUT_MS: u64 = 30_000;
/// Default shutdown grace, milliseconds.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Bytes a `Submit` adds around the sealed request (id, name length, longest name).
pub const SUBMIT_OVERHEAD: usize = 8 + 2 + cinfer_channel::Submit::MAX_PROGRAM_LEN;

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// HTTP API address.
    pub listen: SocketAddr,
    /// The trusted loaders' channel endpoints (`loader`, or `loaders`): at
    /// least one, each a separate link with its own attestation.
    pub loaders: Vec<Endpoint>,
    /// The key this server authenticates itself to the loader with; needed
    /// when the loader asks (a loader whose configuration lists `server-keys`).
    pub channel_key: Option<crate::ChannelKey>,
    /// Keyserver base URLs (`http://host:port` or `https://host:port`, no
    /// trailing slash).
    pub keyservers: Vec<String>,
    /// Extra CA certificates (PEM) trusted for `https://` keyservers, beside
    /// the Mozilla roots (`keyserver-ca-cert`).
    pub keyserver_ca: Option<Vec<u8>>,
    /// Largest sealed request body.
    pub max_request_bytes: usize,
    /// Client connections open at once; a connection over the cap is closed
    /// as soon as it is accepted.
    pub max_connections: usize,
    /// Requests this server has running on the loader at once (the loader's
    /// `max-in-flight`: more would be refused there as busy).
    pub max_in_flight: usize,
    /// Requests waiting, first come first served, for a place among those;
    /// one more is answered 429 with `Retry-After`. 0: no queue.
    pub max_queued: usize,
    /// Time to receive a request's headers (also how long a kept-alive
    /// connection may sit idle); then the connection is closed.
    pub header_timeout: Duration,
    /// Time to receive a request's whole body, from the end of its headers;
    /// then 408.
    pub body_timeout: Duration,
    /// How long a request waits for an attested loader.
    pub ready_timeout: Duration,
    /// First reconnect / re-attest delay (doubles up to [`MAX_BACKOFF`]).
    pub reconnect_backoff: Duration,
    /// Largest channel frame payload.
    pub max_frame_bytes: u32,
    /// Deadline of one request, submission to last record.
    pub request_timeout: Duration,
    /// Deadline of one keyserver HTTP call.
    pub keyserver_timeout: Duration,
    /// Deadline for the loader's answer to a handshake or attestation frame.
    pub loader_timeout: Duration,
    /// How long requests in progress may run on after shutdown is requested.
    pub shutdown_grace: Duration,
    /// Programs this server stores and submits to the loader on every
    /// (re)connection, before attesting; the loader admits them under its policy.
    pub programs: Vec<StoredProgram>,
    /// TLS on the HTTP listener (`tls-cert` and `tls-key`); plain HTTP without.
    pub tls: Option<TlsIdentity>,
}

/// The HTTP listener's TLS identity (`cinfer-tls`, shared with the keyserver).
pub use cinfer_tls::TlsIdentity;

/// A program the server stores: its bytes and signature files, read at start.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredProgram {
    /// The name requests use.
    pub name: String,
    /// The component.
    pub component: Vec<u8>,
    /// Signature files (Sigstore bundles or detached key signatures).
    pub signatures: Vec<Vec<u8>>,
}

impl std::fmt::Debug for StoredProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredProgram")
            .field("name", &self.name)
            .field("bytes", &self.component.len())
            .field("signatures", &self.signatures.len())
            .finish()
    }
}

/// Every configuration key, for `inference-server --help` (a test checks
/// that it names every key the parser accepts).
pub const HELP: &str = "Configuration (TOML, every key optional unless said):
  listen = \"127.0.0.1:8080\"              HTTP API address
  loader = \"tcp:127.0.0.1:7300\"          the loader's channel: tcp:HOST:PORT or unix:PATH
  loaders = [\"tcp:10.0.0.5:7300\", ...]   several loaders instead (not with loader): each connected and attested on its own
  channel-key = \"channel.key\"            required: the key this server signs the loader's challenge with
                                         (`inference-server keygen`; the loader lists its public half in server-keys)
  keyservers = [\"http://127.0.0.1:8740\"] keyserver base URLs, each asked at every attestation; https:// for TLS ones
  keyserver-ca-cert = \"ks-ca.pem\"        a private CA trusted for https:// keyservers (beside Mozilla's roots)
  max-request-bytes = 1048576            largest sealed request body (413 above)
  max-connections = 128                  client connections open at once; more are closed at once
  max-in-flight = 8                      requests running on each loader at once (set it to the loader's max-in-flight)
  max-queued = 64                        requests waiting in order for one of those; more are 429 with Retry-After
  header-timeout-ms = 10000              to receive a request's headers (or idle between requests); then the connection is closed
  body-timeout-ms = 10000                to receive a request's whole body; then 408
  ready-timeout-ms = 5000                how long a request waits for an attested loader before 503
  reconnect-backoff-ms = 200             first retry delay (loader, keyservers); doubles, capped at 5 s
  max-frame-bytes = 16777216             largest channel frame payload
  request-timeout-ms = 120000            per request; on expiry the stream ends with an error record
  keyserver-timeout-ms = 5000            one keyserver HTTP call, connect to last byte
  loader-timeout-ms = 30000              the loader's answer to Hello/AttestRequest/KeyRelease
  shutdown-grace-ms = 10000              how long requests in progress may run on after SIGINT/SIGTERM
  tls-cert = \"server.pem\"                TLS on the listener: PEM certificate chain, leaf first (no default: plain HTTP)
  tls-key = \"server.key\"                 its PEM private key (tls-cert and tls-key go together)
  [[program]]                            a program stored here and submitted to every loader on every connection:
  name = \"llama-chat\"                    its policy name (default: the file name without .wasm)
  path = \"llama-chat.wasm\"               the component (relative paths: to this file's directory)
  signatures = [\"llama-chat.wasm.sig\"]   its signatures or Sigstore bundles, submitted with it

Environment: CINFER_LOG (log filter, default info; else RUST_LOG), CINFER_LOG_FORMAT (text or json).";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawProgram {
    name: Option<String>,
    path: PathBuf,
    #[serde(default)]
    signatures: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawConfig {
    listen: Option<SocketAddr>,
    loader: Option<String>,
    loaders: Option<Vec<String>>,
    channel_key: Option<PathBuf>,
    keyservers: Option<Vec<String>>,
    keyserver_ca_cert: Option<PathBuf>,
    max_request_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_in_flight: Option<usize>,
    max_queued: Option<usize>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    ready_timeout_ms: Option<u64>,
    reconnect_backoff_ms: Option<u64>,
    max_frame_bytes: Option<u32>,
    request_timeout_ms: Option<u64>,
    keyserver_timeout_ms: Option<u64>,
    loader_timeout_ms: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default, rename = "program")]
    programs: Vec<RawProgram>,
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
    /// A value is out of range or malformed.
    #[error("{0}")]
    Invalid(String),
    /// The TLS certificate or key does not load.
    #[error("{0}")]
    Tls(String),
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            loaders: vec![Endpoint::Tcp("127.0.0.1:7300".into())],
            channel_key: None,
            keyservers: vec![DEFAULT_KEYSERVER.into()],
            keyserver_ca: None,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_queued: DEFAULT_MAX_QUEUED,
            header_timeout: Duration::from_millis(DEFAULT_HEADER_TIMEOUT_MS),
            body_timeout: Duration::from_millis(DEFAULT_BODY_TIMEOUT_MS),
            ready_timeout: Duration::from_millis(DEFAULT_READY_TIMEOUT_MS),
            reconnect_backoff: Duration::from_millis(DEFAULT_RECONNECT_BACKOFF_MS),
            max_frame_bytes: cinfer_channel::DEFAULT_MAX_PAYLOAD,
            request_timeout: Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS),
            keyserver_timeout: Duration::from_millis(DEFAULT_KEYSERVER_TIMEOUT_MS),
            loader_timeout: Duration::from_millis(DEFAULT_LOADER_TIMEOUT_MS),
            shutdown_grace: Duration::from_millis(DEFAULT_SHUTDOWN_GRACE_MS),
            programs: Vec::new(),
            tls: None,
        }
    }
}

/// Checks a keyserver base URL: `http://host[:port][/prefix]`, returned without a
/// trailing slash.
pub fn check_keyserver_url(url: &str) -> Result<String, ConfigError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("keyserver {url:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(ConfigError::Invalid(format!(
                "keyserver {url:?}: expected http://HOST:PORT or https://HOST:PORT"
            )));
        }
    }
    if uri.host().is_none_or(str::is_empty) || uri.query().is_some() {
        return Err(ConfigError::Invalid(format!(
            "keyserver {url:?}: expected http://HOST:PORT"
        )));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

fn read_program(base: &Path, p: &RawProgram) -> Result<StoredProgram, ConfigError> {
    let read = |rel: &Path| {
        let path = base.join(rel);
        std::fs::read(&path).map_err(|error| ConfigError::Read { path, error })
    };
    let name = match &p.name {
        Some(n) => n.clone(),
        None => p
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_owned)
            .ok_or_else(|| ConfigError::Invalid(format!("program {:?}: no name", p.path)))?,
    };
    if name.is_empty()
        || name.len() > cinfer_channel::Submit::MAX_PROGRAM_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ConfigError::Invalid(format!(
            "program name {name:?}: letters, digits, - _ . only"
        )));
    }
    Ok(StoredProgram {
        name,
        component: read(&p.path)?,
        signatures: p
            .signatures
            .iter()
            .map(|s| read(s))
            .collect::<Result<_, _>>()?,
    })
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_in(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_in(text, Path::new("."))
    }

    /// Parses a configuration whose program paths are relative to `base`.
    pub fn parse_in(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.message().to_owned(),
        })?;
        let d = Config::default();
        let ms = Duration::from_millis;
        let config = Self {
            listen: raw.listen.unwrap_or(d.listen),
            loaders: match (raw.loader, raw.loaders) {
                (Some(s), None) => vec![s.parse().map_err(ConfigError::Invalid)?],
                (None, Some(list)) if !list.is_empty() => {
                    let mut out: Vec<Endpoint> = Vec::new();
                    for s in list {
                        let e: Endpoint = s.parse().map_err(ConfigError::Invalid)?;
                        if out.contains(&e) {
                            return Err(ConfigError::Invalid(format!(
                                "loaders: {e} is listed twice"
                            )));
                        }
                        out.push(e);
                    }
                    out
                }
                (None, Some(_)) => {
                    return Err(ConfigError::Invalid("loaders is empty".into()));
                }
                (None, None) => d.loaders,
                (Some(_), Some(_)) => {
                    return Err(ConfigError::Invalid(
                        "give loader or loaders, not both".into(),
                    ));
                }
            },
            channel_key: raw
                .channel_key
                .map(|p| crate::ChannelKey::load(&base.join(p)))
                .transpose()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            keyservers: raw.keyservers.unwrap_or(d.keyservers),
            keyserver_ca: match &raw.keyserver_ca_cert {
                None => None,
                Some(p) => {
                    let path = base.join(p);
                    Some(std::fs::read(&path).map_err(|error| ConfigError::Read { path, error })?)
                }
            },
            max_request_bytes: raw.max_request_bytes.unwrap_or(d.max_request_bytes),
            max_connections: raw.max_connections.unwrap_or(d.max_connections),
            max_in_flight: raw.max_in_flight.unwrap_or(d.max_in_flight),
            max_queued: raw.max_queued.unwrap_or(d.max_queued),
            header_timeout: raw.header_timeout_ms.map_or(d.header_timeout, ms),
            body_timeout: raw.body_timeout_ms.map_or(d.body_timeout, ms),
            ready_timeout: raw.ready_timeout_ms.map_or(d.ready_timeout, ms),
            reconnect_backoff: raw.reconnect_backoff_ms.map_or(d.reconnect_backoff, ms),
            max_frame_bytes: raw.max_frame_bytes.unwrap_or(d.max_frame_bytes),
            request_timeout: raw.request_timeout_ms.map_or(d.request_timeout, ms),
            keyserver_timeout: raw.keyserver_timeout_ms.map_or(d.keyserver_timeout, ms),
            loader_timeout: raw.loader_timeout_ms.map_or(d.loader_timeout, ms),
            shutdown_grace: raw.shutdown_grace_ms.map_or(d.shutdown_grace, ms),
            programs: raw
                .programs
                .iter()
                .map(|p| read_program(base, p))
                .collect::<Result<_, _>>()?,
            tls: match (&raw.tls_cert, &raw.tls_key) {
                (None, None) => None,
                (Some(cert), Some(key)) => {
                    let read = |p: &PathBuf| {
                        let path = base.join(p);
                        std::fs::read(&path).map_err(|error| ConfigError::Read { path, error })
                    };
                    Some(
                        TlsIdentity::from_pem(read(cert)?, read(key)?)
                            .map_err(|e| ConfigError::Tls(e.0))?,
                    )
                }
                _ => {
                    return Err(ConfigError::Tls(
                        "tls-cert and tls-key go together (or neither: plain HTTP)".into(),
                    ));
                }
            },
        };
        config.check()
    }

    /// Checks values (also for configurations built in code) and normalises the
    /// keyserver URLs.
    pub fn check(mut self) -> Result<Self, ConfigError> {
        if self.keyservers.is_empty() {
            return Err(ConfigError::Invalid(
                "keyservers: at least one keyserver is needed".into(),
            ));
        }
        self.keyservers = self
            .keyservers
            .iter()
            .map(|k| check_keyserver_url(k))
            .collect::<Result<_, _>>()?;
        // The HTTPS client's trust must load (a CA file without a certificate
        // is an error, not an empty trust store).
        cinfer_tls::client_config(self.keyserver_ca.as_deref())
            .map_err(|e| ConfigError::Tls(e.0))?;
        if self.max_request_bytes == 0 {
            return Err(ConfigError::Invalid(
                "max-request-bytes must be positive".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "max-connections must be positive".into(),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::Invalid(
                "max-in-flight must be positive".into(),
            ));
        }
        if self.max_request_bytes.saturating_add(SUBMIT_OVERHEAD) > self.max_frame_bytes as usize {
            return Err(ConfigError::Invalid(format!(
                "max-request-bytes ({}) plus {SUBMIT_OVERHEAD} bytes of Submit header must fit max-frame-bytes ({})",
                self.max_request_bytes, self.max_frame_bytes
            )));
        }
        for (name, d) in [
            ("header-timeout-ms", self.header_timeout),
            ("body-timeout-ms", self.body_timeout),
            ("ready-timeout-ms", self.ready_timeout),
            ("reconnect-backoff-ms", self.reconnect_backoff),
            ("request-timeout-ms", self.request_timeout),
            ("keyserver-timeout-ms", self.keyserver_timeout),
            ("loader-timeout-ms", self.loader_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid(format!("{name} must be positive")));
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn help_names_every_key() {
        use serde_aux::serde_introspection::serde_introspect;
        for key in serde_introspect::<RawConfig>()
            .iter()
            .chain(serde_introspect::<RawProgram>())
        {
            let listed = if *key == "program" {
                "[[program]]".to_owned()
            } else {
                format!("  {key} = ")
            };
            assert!(HELP.contains(&listed), "{key} is not in --help");
        }
    }

    use super::*;

    #[test]
    fn stored_programs_are_read_relative_to_the_configuration() {
        let dir = std::env::temp_dir().join(format!("cinfer-server-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.wasm"), b"component").unwrap();
        std::fs::write(dir.join("p.wasm.sig"), b"sig").unwrap();
        let key = crate::ChannelKey::generate().unwrap();
        let _ = std::fs::remove_file(dir.join("channel.key"));
        key.write_new(&dir.join("channel.key")).unwrap();
        let c = Config::parse_in(
            "channel-key = \"channel.key\"\n[[program]]\npath = \"p.wasm\"\nsignatures = [\"p.wasm.sig\"]\n[[program]]\nname = \"q\"\npath = \"p.wasm\"\n",
            &dir,
        )
        .unwrap();
        assert_eq!(c.channel_key, Some(key));
        let no_key = Config::parse_in("channel-key = \"nope.key\"\n", &dir).unwrap_err();
        assert!(no_key.to_string().contains("nope.key"), "{no_key}");
        assert_eq!(c.programs.len(), 2);
        assert_eq!(
            (
                c.programs[0].name.as_str(),
                c.programs[0].component.as_slice()
            ),
            ("p", &b"component"[..])
        );
        assert_eq!(c.programs[0].signatures, vec![b"sig".to_vec()]);
        assert_eq!(c.programs[1].name, "q");
        let missing = Config::parse_in("[[program]]\npath = \"nope.wasm\"\n", &dir).unwrap_err();
        assert!(missing.to_string().contains("nope.wasm"), "{missing}");
        let bad =
            Config::parse_in("[[program]]\nname = \"a b\"\npath = \"p.wasm\"\n", &dir).unwrap_err();
        assert!(bad.to_string().contains("letters, digits"), "{bad}");
        // The keyservers' CA file, read relative to the configuration; a
        // missing one is a read error naming it.
        let test_ca = cinfer_tls::TestCa::new("127.0.0.1").unwrap();
        std::fs::write(dir.join("ks-ca.pem"), &test_ca.ca_pem).unwrap();
        let ca = Config::parse_in("keyserver-ca-cert = \"ks-ca.pem\"\n", &dir).unwrap();
        assert_eq!(ca.keyserver_ca.as_deref(), Some(test_ca.ca_pem.as_slice()));
        std::fs::write(dir.join("broken-ca.pem"), b"-----BEGIN CERTIFICATE-----\n").unwrap();
        let broken = Config::parse_in("keyserver-ca-cert = \"broken-ca.pem\"\n", &dir).unwrap_err();
        assert!(broken.to_string().contains("keyserver-ca-cert"), "{broken}");
        match Config::parse_in("keyserver-ca-cert = \"absent-ca.pem\"\n", &dir) {
            Err(e @ ConfigError::Read { .. }) => {
                assert!(
                    std::error::Error::source(&e).is_none(),
                    "the reason is in the message; as a source too it would print twice"
                );
                let ConfigError::Read { path, error } = e else {
                    unreachable!()
                };
                assert_eq!(path, dir.join("absent-ca.pem"));
                assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected a read error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults_and_every_key() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.loaders.len(), 1);
        assert_eq!(c.loaders[0].to_string(), DEFAULT_LOADER);
        assert_eq!(c.max_connections, 128);
        assert_eq!((c.max_in_flight, c.max_queued), (8, 64));
        assert_eq!(c.header_timeout, Duration::from_secs(10));
        assert_eq!(c.body_timeout, Duration::from_secs(10));
        let c = Config::parse(
            r#"
listen = "0.0.0.0:9000"
loader = "unix:/run/l.sock"
keyservers = ["http://a:1/", "http://b:2"]
max-request-bytes = 10
ready-timeout-ms = 1
reconnect-backoff-ms = 2
max-frame-bytes = 1000
request-timeout-ms = 3
keyserver-timeout-ms = 4
loader-timeout-ms = 5
shutdown-grace-ms = 6
max-connections = 7
header-timeout-ms = 8
body-timeout-ms = 9
max-in-flight = 2
max-queued = 0
"#,
        )
        .unwrap();
        assert_eq!(c.loaders, [Endpoint::Unix("/run/l.sock".into())]);
        assert_eq!(c.keyservers, ["http://a:1", "http://b:2"]);
        assert_eq!(c.request_timeout, Duration::from_millis(3));
        assert_eq!(c.loader_timeout, Duration::from_millis(5));
        assert_eq!(c.shutdown_grace, Duration::from_millis(6));
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.header_timeout, Duration::from_millis(8));
        assert_eq!(c.body_timeout, Duration::from_millis(9));
        assert_eq!((c.max_in_flight, c.max_queued), (2, 0));
        let two = Config::parse("loaders = [\"tcp:10.0.0.5:7300\", \"unix:/run/b.sock\"]").unwrap();
        assert_eq!(
            two.loaders,
            [
                Endpoint::Tcp("10.0.0.5:7300".into()),
                Endpoint::Unix("/run/b.sock".into())
            ]
        );
    }

    #[test]
    fn refusals() {
        for bad in [
            "nope = 1",
            "loader = \"http://x\"",
            "loaders = []",
            "loaders = [\"tcp:a:1\", \"tcp:a:1\"]",
            "loader = \"tcp:a:1\"\nloaders = [\"tcp:b:1\"]",
            "loaders = [\"tcp:a:1\", \"ftp:b\"]",
            "keyservers = []",
            "keyservers = [\"k:1\"]",
            "max-request-bytes = 0",
            "max-frame-bytes = 100",
            "ready-timeout-ms = 0",
            "max-connections = 0",
            "max-in-flight = 0",
            "header-timeout-ms = 0",
            "body-timeout-ms = 0",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
        let https = Config::parse("keyservers = [\"https://k:1\"]").expect("https keyservers");
        assert_eq!(https.keyservers, ["https://k:1"]);
        let e = Config::parse("keyservers = [\"ftp://k:1\"]")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected http://HOST:PORT or https://HOST:PORT"),
            "{e}"
        );
    }
}
