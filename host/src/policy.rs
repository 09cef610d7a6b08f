//! Policies: which programs may run, with which capabilities and limits.
//!
//! A policy is a TOML file plus a WIT file of capability *worlds* (package
//! `cinfer:policies`). Each world imports a subset of the `cinfer:loader`
//! interfaces; a program entry binds a program (for now by name and SHA-256
//! digest of its component bytes) to one world and to limits.
//!
//! ```toml
//! worlds = "worlds.wit"          # relative to the policy file, inside its directory
//!
//! [limits]                       # defaults for every program
//! memory-bytes = 67108864
//! deadline-ms = 5000
//!
//! [[program]]
//! name = "echo"
//! sha256 = "91133f70…"
//! world = "request-reply"
//! limits = { egress-bytes = 65536 }
//! ```
//!
//! Files are read through a [`crate::dir::Dir`] handle: a policy can only name
//! files beside it or below it, never `..` or an absolute path.

use crate::LOADER_WIT;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The package the policy worlds must import from.
const LOADER_PACKAGE_PREFIX: &str = "cinfer:loader/";

/// One capability of the program world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// `cinfer:loader/crypto`: the opened request.
    Crypto,
    /// `cinfer:loader/accelerator`: tensors and the op set.
    Accelerator,
    /// `cinfer:loader/model`: sealed models.
    Model,
    /// `cinfer:loader/output`: the sealed reply.
    Output,
}

impl Capability {
    /// Every capability, in WIT order.
    pub const ALL: [Capability; 4] = [
        Capability::Crypto,
        Capability::Accelerator,
        Capability::Model,
        Capability::Output,
    ];

    /// The fully qualified interface name a component imports.
    pub fn interface(self) -> &'static str {
        match self {
            Capability::Crypto => "cinfer:loader/crypto@0.1.0",
            Capability::Accelerator => "cinfer:loader/accelerator@0.1.0",
            Capability::Model => "cinfer:loader/model@0.1.0",
            Capability::Output => "cinfer:loader/output@0.1.0",
        }
    }

    /// The capability a fully qualified interface name denotes, if any.
    pub fn from_interface(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.interface() == name)
    }
}

/// A set of capabilities (a policy world).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    bits: u8,
}

impl Capabilities {
    /// The empty set.
    pub const NONE: Capabilities = Capabilities { bits: 0 };

    fn bit(c: Capability) -> u8 {
        1 << (c as u8)
    }

    /// Adds a capability.
    #[must_use]
    pub fn with(mut self, c: Capability) -> Self {
        self.bits |= Self::bit(c);
        self
    }

    /// Whether the set holds `c`.
    pub fn contains(self, c: Capability) -> bool {
        self.bits & Self::bit(c) != 0
    }

    /// The capabilities in the set.
    pub fn iter(self) -> impl Iterator<Item = Capability> {
        Capability::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Capability::interface).collect();
        if names.is_empty() {
            f.write_str("(none)")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// Resource limits for one run of a program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory (and table) a run may grow to, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock deadline for one run (always set).
    pub deadline: Duration,
    /// Sealed reply bytes a run may emit (chunk length + 17 bytes of framing each).
    pub egress_bytes: u64,
    /// Accelerator memory a run may hold at once, in bytes.
    pub accelerator_bytes: u64,
    /// Largest sealed request accepted for this program, in bytes.
    pub request_bytes: u64,
    /// Host memory one call from the program may make the loader allocate
    /// for its arguments (wasmtime's hostcall fuel: a list of `n` values
    /// costs `n` times their size on the host, so a list of borrowed handles
    /// costs more than its bytes in the guest). Checked before any element is
    /// lifted; a call past it traps the run.
    pub hostcall_bytes: u64,
    /// Sustained rate and burst of sealed bytes all runs of this grant may
    /// emit together (none: only the loader-wide rate applies).
    pub egress_rate: Option<EgressRate>,
}

/// A token bucket's parameters: sealed bytes per second sustained, and the
/// most that may leave at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressRate {
    /// Sustained rate, sealed bytes per second.
    pub bytes_per_sec: u64,
    /// Burst, sealed bytes (a frame larger than this is split into frames that fit).
    pub burst_bytes: u64,
}

/// The smallest burst a policy may set: frames of at least 1 KiB fit.
pub const MIN_EGRESS_BURST: u64 = 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_secs(5),
            egress_bytes: 1 << 20,
            accelerator_bytes: 256 << 20,
            request_bytes: 1 << 20,
            hostcall_bytes: 16 << 20,
            egress_rate: None,
        }
    }
}

/// Hard ceilings no policy can exceed.
pub mod ceilings {
    /// Linear memory per run: the pooling allocator's slot size.
    pub const MEMORY_BYTES: u64 = 1 << 30;
    /// Deadline per run.
    pub const DEADLINE_MS: u64 = 10 * 60 * 1000;
    /// Accelerator memory per run.
    pub const ACCELERATOR_BYTES: u64 = 16 << 30;
    /// Sealed request size.
    pub const REQUEST_BYTES: u64 = 64 << 20;
    /// Host bytes one host call's arguments may take (wasmtime's own default).
    pub const HOSTCALL_BYTES: u64 = 128 << 20;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LimitsToml {
    memory_bytes: Option<u64>,
    deadline_ms: Option<u64>,
    egress_bytes: Option<u64>,
    accelerator_bytes: Option<u64>,
    request_bytes: Option<u64>,
    hostcall_bytes: Option<u64>,
    egress_rate_bytes_per_sec: Option<u64>,
    egress_burst_bytes: Option<u64>,
}

/// The policy's `[egress]` table: the loader-wide rate over every run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct EgressToml {
    rate_bytes_per_sec: u64,
    burst_bytes: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ProgramToml {
    name: String,
    sha256: String,
    world: String,
    #[serde(default)]
    limits: LimitsToml,
    #[serde(default)]
    models: Vec<String>,
    /// A `[[program]]` in the `classifier` world that must allow each request first.
    classifier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SignerToml {
    name: String,
    issuer: Option<String>,
    subject: Option<String>,
    subject_regex: Option<String>,
    public_key: Option<String>,
    world: Option<String>,
    #[serde(default)]
    limits: LimitsToml,
    #[serde(default)]
    models: Vec<String>,
    /// A `[[program]]` in the `classifier` world that must allow each request first.
    classifier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct QuorumToml {
    name: String,
    signers: Vec<String>,
    threshold: Option<usize>,
    world: String,
    #[serde(default)]
    limits: LimitsToml,
    #[serde(default)]
    models: Vec<String>,
    /// A `[[program]]` in the `classifier` world that must allow each request first.
    classifier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PolicyToml {
    worlds: String,
    trust_root: Option<String>,
    /// The accelerator backend the loader must run ("cpu" or "cuda").
    backend: Option<String>,
    #[serde(default)]
    limits: LimitsToml,
    /// The loader-wide egress rate.
    egress: Option<EgressToml>,
    #[serde(default, rename = "program")]
    programs: Vec<ProgramToml>,
    #[serde(default, rename = "signer")]
    signers: Vec<SignerToml>,
    #[serde(default, rename = "quorum")]
    quorums: Vec<QuorumToml>,
}

/// Why a policy was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A policy file could not be read.
    #[error("cannot read policy file {path}")]
    Read {
        /// The file, relative to the policy directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown fields.
    #[error("malformed policy TOML: {0}")]
    Toml(String),
    /// The worlds WIT file does not parse or resolve.
    #[error("malformed policy worlds WIT {path}: {reason}")]
    Wit {
        /// The WIT file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// A policy world imports something other than a `cinfer:loader` interface.
    #[error("policy world `{world}` imports `{import}`, which is not a cinfer:loader capability")]
    ForeignImport {
        /// The world.
        world: String,
        /// The offending import.
        import: String,
    },
    /// A program entry names a world the WIT file does not define.
    #[error("program `{program}` names unknown world `{world}`")]
    UnknownWorld {
        /// The program entry.
        program: String,
        /// The missing world.
        world: String,
    },
    /// A digest is not 64 lowercase hex characters.
    #[error("program `{program}`: sha256 must be 64 lowercase hex characters")]
    BadDigest {
        /// The program entry.
        program: String,
    },
    /// Two entries pin the same digest.
    #[error("programs `{first}` and `{second}` pin the same digest")]
    DuplicateDigest {
        /// First entry.
        first: String,
        /// Second entry.
        second: String,
    },
    /// A signer entry is malformed (no or two subject forms, a bad regex).
    #[error("signer `{signer}`: {reason}")]
    BadSigner {
        /// The signer entry.
        signer: String,
        /// What is wrong.
        reason: String,
    },
    /// Signers are listed but no `trust-root` is given, or it does not parse.
    #[error("trust root: {0}")]
    TrustRoot(String),
    /// `backend` names no backend this loader knows.
    #[error("unknown backend {0:?} (known: \"cpu\", \"cuda\")")]
    UnknownBackend(String),
    /// The policy pins another accelerator backend than the one configured.
    #[error("the policy pins backend {pinned:?}, the loader is configured with {configured:?}")]
    BackendNotPinned {
        /// The policy's `backend`.
        pinned: String,
        /// The backend the serving loader is configured with.
        configured: String,
    },
    /// A `classifier` is not a `[[program]]` entry of the `classifier` kind.
    #[error("`{entry}`: classifier `{classifier}` {reason}")]
    BadClassifier {
        /// The entry naming it.
        entry: String,
        /// The name given.
        classifier: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An egress rate is given without its burst, or the other way round.
    #[error("`{0}` needs both a rate and a burst")]
    EgressRateIncomplete(&'static str),
    /// A limit is zero or above its ceiling.
    #[error("limit `{limit}` = {value} is out of range (1 to {max})")]
    LimitOutOfRange {
        /// The limit's TOML name.
        limit: &'static str,
        /// The value given.
        value: u64,
        /// The ceiling.
        max: u64,
    },
}

/// What the policy grants one program.
#[derive(Debug, Clone)]
pub struct ProgramGrant {
    /// The program's name (for logs and verdicts).
    pub name: String,
    /// SHA-256 of the component bytes.
    pub digest: [u8; 32],
    /// The policy world granted.
    pub world: String,
    /// The capabilities in that world.
    pub capabilities: Capabilities,
    /// Limits for each run.
    pub limits: Limits,
    /// Model ids the program may open.
    pub models: Vec<String>,
    /// The safety classifier that must allow each request before the
    /// program runs on it.
    pub classifier: Option<ClassifierRef>,
}

/// A grant's safety classifier: a `[[program]]` entry pinned by digest whose
/// world imports `crypto` only (it reads the request; it cannot answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassifierRef {
    /// Its `[[program]]` entry's name.
    pub name: String,
    /// Its component digest.
    pub digest: [u8; 32],
}

/// How a signer proves itself.
#[derive(Debug, Clone)]
pub enum SignerKind {
    /// A Sigstore keyless identity: OIDC issuer + certificate subject.
    Keyless(cinfer_signing::IdentityRule),
    /// A public key (ECDSA P-256): key-based Sigstore bundles and detached
    /// `cosign sign-blob --key` signatures.
    Key {
        /// The key, SubjectPublicKeyInfo PEM.
        public_key_pem: Vec<u8>,
        /// Hex SHA-256 of the key's DER SubjectPublicKeyInfo.
        fingerprint: String,
    },
}

/// A signer the policy knows: a name and how it proves itself.
#[derive(Debug, Clone)]
pub struct Signer {
    /// The signer's policy name.
    pub name: String,
    /// Its identity or key.
    pub kind: SignerKind,
}

/// What the policy grants programs carrying valid signatures from at least
/// `threshold` of `signers` (N of M). A `[[signer]]` entry with a `world` is a
/// grant of its own with threshold 1; a `[[quorum]]` entry names several.
#[derive(Debug, Clone)]
pub struct SignedGrant {
    /// Names of the signers that count towards the threshold.
    pub signers: Vec<String>,
    /// How many distinct signers of `signers` must have signed.
    pub threshold: usize,
    /// The world, capabilities, limits and models granted.
    pub grant: ProgramGrant,
}

/// What a policy file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyFileRole {
    /// The policy TOML.
    Policy,
    /// The capability worlds WIT.
    Worlds,
    /// A Sigstore trust root.
    TrustRoot,
    /// A key-based signer's public key.
    SignerKey,
}

/// A file the policy was built from, with its SHA-256 (what the loader measures).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    /// What it is.
    pub role: PolicyFileRole,
    /// The name the policy gives it (relative to the policy directory); the
    /// policy TOML itself is named by [`Policy::load`], or `policy.toml` by [`Policy::parse`].
    pub name: String,
    /// SHA-256 of its bytes.
    pub sha256: [u8; 32],
}

/// A parsed, validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    backend: Option<String>,
    egress: Option<EgressRate>,
    worlds: BTreeMap<String, Capabilities>,
    programs: Vec<ProgramGrant>,
    signers: Vec<Signer>,
    signed_grants: Vec<SignedGrant>,
    trust_root: Option<std::sync::Arc<cinfer_signing::TrustRoot>>,
    files: Vec<PolicyFile>,
    digest: [u8; 32],
}

fn check_limit(limit: &'static str, value: u64, max: u64) -> Result<u64, PolicyError> {
    if value == 0 || value > max {
        return Err(PolicyError::LimitOutOfRange { limit, value, max });
    }
    Ok(value)
}

fn apply_limits(base: &Limits, t: &LimitsToml) -> Result<Limits, PolicyError> {
    let mut l = base.clone();
    if let Some(v) = t.memory_bytes {
        l.memory_bytes = check_limit("memory-bytes", v, ceilings::MEMORY_BYTES)?;
    }
    if let Some(v) = t.deadline_ms {
        l.deadline = Duration::from_millis(check_limit("deadline-ms", v, ceilings::DEADLINE_MS)?);
    }
    if let Some(v) = t.egress_bytes {
        l.egress_bytes = check_limit("egress-bytes", v, u64::MAX)?;
    }
    if let Some(v) = t.accelerator_bytes {
        l.accelerator_bytes = check_limit("accelerator-bytes", v, ceilings::ACCELERATOR_BYTES)?;
    }
    if let Some(v) = t.request_bytes {
        l.request_bytes = check_limit("request-bytes", v, ceilings::REQUEST_BYTES)?;
    }
    if let Some(v) = t.hostcall_bytes {
        l.hostcall_bytes = check_limit("hostcall-bytes", v, ceilings::HOSTCALL_BYTES)?;
    }
    match (t.egress_rate_bytes_per_sec, t.egress_burst_bytes) {
        (None, None) => {}
        (Some(rate), Some(burst)) => {
            l.egress_rate = Some(egress_rate(
                ("egress-rate-bytes-per-sec", rate),
                ("egress-burst-bytes", burst),
            )?)
        }
        _ => return Err(PolicyError::EgressRateIncomplete("limits")),
    }
    Ok(l)
}

/// The classifier `name` of entry `entry`, checked: a `[[program]]` entry
/// (pinned by digest) whose world grants `crypto` only, not itself gated.
fn classifier_ref(
    entry: &str,
    name: Option<&str>,
    programs: &[ProgramGrant],
) -> Result<Option<ClassifierRef>, PolicyError> {
    let Some(name) = name else {
        return Ok(None);
    };
    let bad = |reason| PolicyError::BadClassifier {
        entry: entry.to_owned(),
        classifier: name.to_owned(),
        reason,
    };
    if name == entry {
        return Err(bad("is the entry itself"));
    }
    let c = programs
        .iter()
        .find(|g| g.name == name)
        .ok_or_else(|| bad("is not a [[program]] entry"))?;
    if c.capabilities != Capabilities::NONE.with(Capability::Crypto) {
        return Err(bad(
            "must be in a world that imports crypto only (it reads the request, it cannot answer)",
        ));
    }
    if c.classifier.is_some() {
        return Err(bad("has a classifier itself"));
    }
    Ok(Some(ClassifierRef {
        name: name.to_owned(),
        digest: c.digest,
    }))
}

/// A checked rate: positive, and a burst of at least [`MIN_EGRESS_BURST`].
fn egress_rate(
    (rate_key, rate): (&'static str, u64),
    (burst_key, burst): (&'static str, u64),
) -> Result<EgressRate, PolicyError> {
    let bytes_per_sec = check_limit(rate_key, rate, u64::MAX)?;
    if burst < MIN_EGRESS_BURST {
        return Err(PolicyError::LimitOutOfRange {
            limit: burst_key,
            value: burst,
            max: u64::MAX,
        });
    }
    Ok(EgressRate {
        bytes_per_sec,
        burst_bytes: burst,
    })
}

/// Parses the policy worlds WIT (package `cinfer:policies`) against the loader's WIT.
fn parse_worlds(path: &str, text: &str) -> Result<BTreeMap<String, Capabilities>, PolicyError> {
    let wit_err = |e: anyhow::Error| PolicyError::Wit {
        path: path.to_owned(),
        reason: format!("{e:#}"),
    };
    let mut resolve = wit_parser::Resolve::new();
    resolve
        .push_str("loader.wit", LOADER_WIT)
        .map_err(wit_err)?;
    let pkg = resolve.push_str(path, text).map_err(wit_err)?;
    let mut worlds = BTreeMap::new();
    for (_, world) in resolve
        .worlds
        .iter()
        .filter(|(_, w)| w.package == Some(pkg))
    {
        let mut caps = Capabilities::NONE;
        for key in world.imports.keys() {
            let name = resolve.name_world_key(key);
            match Capability::from_interface(&name) {
                Some(c) if name.starts_with(LOADER_PACKAGE_PREFIX) => caps = caps.with(c),
                _ => {
                    return Err(PolicyError::ForeignImport {
                        world: world.name.clone(),
                        import: name,
                    });
                }
            }
        }
        worlds.insert(world.name.clone(), caps);
    }
    Ok(worlds)
}

fn parse_digest(program: &str, hex_digest: &str) -> Result<[u8; 32], PolicyError> {
    let bad = || PolicyError::BadDigest {
        program: program.to_owned(),
    };
    if hex_digest.len() != 64 || hex_digest.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad());
    }
    let bytes = hex::decode(hex_digest).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

impl Policy {
    /// Parses a policy from the TOML text and the text of the worlds file it names.
    /// `worlds_text` is looked up by the caller (see [`Policy::load`]).
    pub fn parse(
        toml_text: &str,
        read: impl Fn(&str) -> Result<String, PolicyError>,
    ) -> Result<Self, PolicyError> {
        let doc: PolicyToml =
            toml::from_str(toml_text).map_err(|e| PolicyError::Toml(e.message().to_owned()))?;
        if let Some(b) = &doc.backend
            && !crate::backend::BACKEND_NAMES.contains(&b.as_str())
        {
            return Err(PolicyError::UnknownBackend(b.clone()));
        }
        let worlds_text = read(&doc.worlds)?;
        let worlds = parse_worlds(&doc.worlds, &worlds_text)?;
        let defaults = apply_limits(&Limits::default(), &doc.limits)?;
        let egress = doc
            .egress
            .as_ref()
            .map(|e| {
                egress_rate(
                    ("egress.rate-bytes-per-sec", e.rate_bytes_per_sec),
                    ("egress.burst-bytes", e.burst_bytes),
                )
            })
            .transpose()?;
        let mut programs: Vec<ProgramGrant> = Vec::with_capacity(doc.programs.len());
        for p in &doc.programs {
            let capabilities = *worlds
                .get(&p.world)
                .ok_or_else(|| PolicyError::UnknownWorld {
                    program: p.name.clone(),
                    world: p.world.clone(),
                })?;
            let digest = parse_digest(&p.name, &p.sha256)?;
            if let Some(other) = programs.iter().find(|g| g.digest == digest) {
                return Err(PolicyError::DuplicateDigest {
                    first: other.name.clone(),
                    second: p.name.clone(),
                });
            }
            programs.push(ProgramGrant {
                name: p.name.clone(),
                digest,
                world: p.world.clone(),
                capabilities,
                limits: apply_limits(&defaults, &p.limits)?,
                models: p.models.clone(),
                classifier: None,
            });
        }
        // Classifiers name `[[program]]` entries, which may come later in the file.
        let resolved = doc
            .programs
            .iter()
            .map(|p| classifier_ref(&p.name, p.classifier.as_deref(), &programs))
            .collect::<Result<Vec<_>, _>>()?;
        for (g, c) in programs.iter_mut().zip(resolved) {
            g.classifier = c;
        }
        // Checked again now that every entry's classifier is known (a
        // classifier must not have one itself).
        for p in &doc.programs {
            classifier_ref(&p.name, p.classifier.as_deref(), &programs)?;
        }
        let mut files = vec![
            PolicyFile {
                role: PolicyFileRole::Policy,
                name: "policy.toml".to_owned(),
                sha256: Sha256::digest(toml_text.as_bytes()).into(),
            },
            PolicyFile {
                role: PolicyFileRole::Worlds,
                name: doc.worlds.clone(),
                sha256: Sha256::digest(worlds_text.as_bytes()).into(),
            },
        ];
        let world_caps = |entry: &str, world: &str| {
            worlds
                .get(world)
                .copied()
                .ok_or_else(|| PolicyError::UnknownWorld {
                    program: entry.to_owned(),
                    world: world.to_owned(),
                })
        };
        let mut signers: Vec<Signer> = Vec::with_capacity(doc.signers.len());
        let mut single: Vec<SignedGrant> = Vec::new();
        for sg in &doc.signers {
            let bad = |reason: String| PolicyError::BadSigner {
                signer: sg.name.clone(),
                reason,
            };
            if signers.iter().any(|s| s.name == sg.name) {
                return Err(bad("two signers have this name".into()));
            }
            let kind = match (&sg.issuer, &sg.subject, &sg.subject_regex, &sg.public_key) {
                (Some(issuer), subject, regex, None) => {
                    let subject = match (subject, regex) {
                        (Some(s), None) => cinfer_signing::Matcher::exact(s.clone()),
                        (None, Some(r)) => {
                            cinfer_signing::Matcher::regex(r).map_err(|e| bad(e.to_string()))?
                        }
                        _ => {
                            return Err(bad(
                                "give exactly one of `subject` and `subject-regex`".into()
                            ));
                        }
                    };
                    SignerKind::Keyless(cinfer_signing::IdentityRule::new(
                        cinfer_signing::Matcher::exact(issuer.clone()),
                        subject,
                    ))
                }
                (None, None, None, Some(path)) => {
                    let pem = read(path)?;
                    let fingerprint = cinfer_signing::key_fingerprint(pem.as_bytes())
                        .map_err(|e| bad(format!("public-key {path}: {e}")))?;
                    files.push(PolicyFile {
                        role: PolicyFileRole::SignerKey,
                        name: path.clone(),
                        sha256: Sha256::digest(pem.as_bytes()).into(),
                    });
                    SignerKind::Key {
                        public_key_pem: pem.into_bytes(),
                        fingerprint,
                    }
                }
                _ => {
                    return Err(bad(
                        "give either `issuer` with `subject`/`subject-regex` (keyless) or `public-key` (key-based)".into(),
                    ));
                }
            };
            signers.push(Signer {
                name: sg.name.clone(),
                kind,
            });
            if let Some(world) = &sg.world {
                single.push(SignedGrant {
                    signers: vec![sg.name.clone()],
                    threshold: 1,
                    grant: ProgramGrant {
                        name: sg.name.clone(),
                        digest: [0; 32],
                        world: world.clone(),
                        capabilities: world_caps(&sg.name, world)?,
                        limits: apply_limits(&defaults, &sg.limits)?,
                        models: sg.models.clone(),
                        classifier: classifier_ref(&sg.name, sg.classifier.as_deref(), &programs)?,
                    },
                });
            } else if !sg.models.is_empty() || sg.classifier.is_some() {
                return Err(bad(
                    "`models` needs a `world` (or belongs on a quorum)".into()
                ));
            }
        }
        // Quorums are tried before single-signer grants: a program signed by the
        // whole quorum gets the quorum's (usually wider) grant.
        let mut signed_grants = Vec::with_capacity(doc.quorums.len() + single.len());
        for q in &doc.quorums {
            let bad = |reason: String| PolicyError::BadSigner {
                signer: q.name.clone(),
                reason,
            };
            let mut names: Vec<String> = Vec::with_capacity(q.signers.len());
            for n in &q.signers {
                if !signers.iter().any(|s| &s.name == n) {
                    return Err(bad(format!("quorum names unknown signer `{n}`")));
                }
                if names.contains(n) {
                    return Err(bad(format!("quorum names signer `{n}` twice")));
                }
                names.push(n.clone());
            }
            let threshold = q.threshold.unwrap_or(names.len());
            if threshold == 0 || threshold > names.len() {
                return Err(bad(format!(
                    "threshold {threshold} must be between 1 and the {} signers listed",
                    names.len()
                )));
            }
            signed_grants.push(SignedGrant {
                signers: names,
                threshold,
                grant: ProgramGrant {
                    name: q.name.clone(),
                    digest: [0; 32],
                    world: q.world.clone(),
                    capabilities: world_caps(&q.name, &q.world)?,
                    limits: apply_limits(&defaults, &q.limits)?,
                    models: q.models.clone(),
                    classifier: classifier_ref(&q.name, q.classifier.as_deref(), &programs)?,
                },
            });
        }
        signed_grants.extend(single);
        let needs_trust_root = signers
            .iter()
            .any(|s| matches!(s.kind, SignerKind::Keyless(_)));
        let trust_root = match &doc.trust_root {
            Some(path) => {
                let text = read(path)?;
                files.push(PolicyFile {
                    role: PolicyFileRole::TrustRoot,
                    name: path.clone(),
                    sha256: Sha256::digest(text.as_bytes()).into(),
                });
                Some(
                    cinfer_signing::TrustRoot::from_json(text.as_bytes())
                        .map(std::sync::Arc::new)
                        .map_err(|e| PolicyError::TrustRoot(e.to_string()))?,
                )
            }
            None if needs_trust_root => {
                return Err(PolicyError::TrustRoot(
                    "keyless signers are listed but no `trust-root` file is given".into(),
                ));
            }
            None => None,
        };
        let mut h = Sha256::new();
        for f in &files {
            h.update(f.sha256);
        }
        Ok(Policy {
            backend: doc.backend,
            egress,
            worlds,
            programs,
            signers,
            signed_grants,
            trust_root,
            files,
            digest: h.finalize().into(),
        })
    }

    /// Loads `file` (a policy TOML) from `dir`; the worlds file it names is
    /// read from the same directory handle, so it cannot escape it.
    pub fn load(dir: &crate::dir::Dir, file: &str) -> Result<Self, PolicyError> {
        let read = |path: &str| {
            dir.read_to_string(path)
                .map_err(|source| PolicyError::Read {
                    path: path.to_owned(),
                    source,
                })
        };
        let toml_text = read(file)?;
        let mut policy = Self::parse(&toml_text, read)?;
        if let Some(first) = policy.files.first_mut() {
            file.clone_into(&mut first.name);
        }
        Ok(policy)
    }

    /// Opens the directory of `path` with ambient authority (the one place the
    /// loader does so, at start-up) and loads the policy from it.
    pub fn load_path(path: &std::path::Path) -> Result<Self, PolicyError> {
        let (dir, file) = crate::open_parent_dir(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::load(&dir, file)
    }

    /// The grant for a component with this digest, if the policy lists it.
    pub fn grant_for(&self, digest: &[u8; 32]) -> Option<&ProgramGrant> {
        self.programs.iter().find(|g| &g.digest == digest)
    }

    /// Every program entry.
    pub fn programs(&self) -> &[ProgramGrant] {
        &self.programs
    }

    /// Every signer the policy knows.
    pub fn signers(&self) -> &[Signer] {
        &self.signers
    }

    /// Grants for signed programs, in the order admission tries them (quorums
    /// first, then single-signer grants, each in file order).
    pub fn signed_grants(&self) -> &[SignedGrant] {
        &self.signed_grants
    }

    /// The files the policy was built from (TOML, worlds WIT, trust root, signer
    /// keys), in the order they were read, with their SHA-256.
    pub fn files(&self) -> &[PolicyFile] {
        &self.files
    }

    /// The accelerator backend the policy pins (`backend = "cuda"`), if any.
    pub fn backend(&self) -> Option<&str> {
        self.backend.as_deref()
    }

    /// Whether a loader configured with backend `configured` may serve under
    /// this policy: a serving loader checks before it opens the backend and
    /// refuses to start otherwise. (The admission tool,
    /// `cinfer verify`, decides admission only and does not check it.)
    pub fn check_backend(&self, configured: &str) -> Result<(), PolicyError> {
        match self.backend() {
            Some(pinned) if pinned != configured => Err(PolicyError::BackendNotPinned {
                pinned: pinned.to_owned(),
                configured: configured.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// The Sigstore trust root signatures are verified against, if the policy names one.
    pub fn trust_root(&self) -> Option<&cinfer_signing::TrustRoot> {
        self.trust_root.as_deref()
    }

    /// The capability worlds the policy defines.
    pub fn worlds(&self) -> &BTreeMap<String, Capabilities> {
        &self.worlds
    }

    /// The loader-wide egress rate (the `[egress]` table), if any.
    pub fn egress(&self) -> Option<EgressRate> {
        self.egress
    }

    /// SHA-256 over the SHA-256 of each of [`Policy::files`], in order: one value
    /// naming everything the policy was built from.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORLDS: &str = r#"
        package cinfer:policies;
        world request-reply {
            import cinfer:loader/crypto@0.1.0;
            import cinfer:loader/output@0.1.0;
        }
        world inference {
            import cinfer:loader/crypto@0.1.0;
            import cinfer:loader/model@0.1.0;
            import cinfer:loader/output@0.1.0;
        }
    "#;

    fn parse(toml_text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(toml_text, |_| Ok(WORLDS.to_owned()))
    }

    const D: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn worlds_resolve_to_capabilities() {
        let p = parse(&format!(
            "worlds = \"w.wit\"\n[[program]]\nname = \"a\"\nsha256 = \"{D}\"\nworld = \"inference\"\n"
        ))
        .expect("policy");
        let rr = p.worlds()["request-reply"];
        assert!(rr.contains(Capability::Crypto) && rr.contains(Capability::Output));
        assert!(!rr.contains(Capability::Model) && !rr.contains(Capability::Accelerator));
        // `model` uses accelerator types, so granting it brings `accelerator` along.
        assert!(p.worlds()["inference"].contains(Capability::Accelerator));
        assert_eq!(p.programs()[0].limits, Limits::default());
    }

    #[test]
    fn egress_rates_parse_and_validate() {
        let p = parse(&format!(
            "worlds = \"w\"\n[egress]\nrate-bytes-per-sec = 1000000\nburst-bytes = 65536\n[limits]\negress-rate-bytes-per-sec = 5000\negress-burst-bytes = 4096\n[[program]]\nname = \"a\"\nsha256 = \"{D}\"\nworld = \"request-reply\"\n"
        ))
        .expect("policy");
        assert_eq!(
            p.egress(),
            Some(EgressRate {
                bytes_per_sec: 1_000_000,
                burst_bytes: 65536
            })
        );
        assert_eq!(
            p.programs()[0].limits.egress_rate,
            Some(EgressRate {
                bytes_per_sec: 5000,
                burst_bytes: 4096
            })
        );
        let none = parse("worlds = \"w\"\n").expect("policy");
        assert_eq!(none.egress(), None);
        let refused = |toml: &str| parse(&format!("worlds = \"w\"\n{toml}")).unwrap_err();
        assert!(matches!(
            refused("[limits]\negress-rate-bytes-per-sec = 5000\n"),
            PolicyError::EgressRateIncomplete("limits")
        ));
        assert!(matches!(
            refused("[egress]\nrate-bytes-per-sec = 5000\n"),
            PolicyError::Toml(m) if m.contains("burst-bytes")
        ));
        assert!(matches!(
            refused("[egress]\nrate-bytes-per-sec = 0\nburst-bytes = 4096\n"),
            PolicyError::LimitOutOfRange {
                limit: "egress.rate-bytes-per-sec",
                value: 0,
                ..
            }
        ));
        assert!(matches!(
            refused("[egress]\nrate-bytes-per-sec = 10\nburst-bytes = 100\n"),
            PolicyError::LimitOutOfRange {
                limit: "egress.burst-bytes",
                value: 100,
                ..
            }
        ));
    }

    #[test]
    fn limits_override_and_validate() {
        let p = parse(&format!(
            "worlds = \"w\"\n[limits]\ndeadline-ms = 100\n[[program]]\nname = \"a\"\nsha256 = \"{D}\"\nworld = \"request-reply\"\nlimits = {{ egress-bytes = 10 }}\n"
        ))
        .expect("policy");
        let l = &p.programs()[0].limits;
        assert_eq!(l.deadline, Duration::from_millis(100));
        assert_eq!(l.egress_bytes, 10);
        let err = parse("worlds = \"w\"\n[limits]\ndeadline-ms = 0\n").unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::LimitOutOfRange {
                    limit: "deadline-ms",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(l.hostcall_bytes, 16 << 20, "the default");
        let p = parse(&format!(
            "worlds = \"w\"\n[limits]\nhostcall-bytes = 4096\n[[program]]\nname = \"a\"\nsha256 = \"{D}\"\nworld = \"request-reply\"\n"
        ))
        .expect("policy");
        assert_eq!(p.programs()[0].limits.hostcall_bytes, 4096);
        let err = parse("worlds = \"w\"\n[limits]\nhostcall-bytes = 134217729\n").unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::LimitOutOfRange {
                    limit: "hostcall-bytes",
                    max: 134217728,
                    ..
                }
            ),
            "{err}"
        );
        let err = parse("worlds = \"w\"\n[limits]\nmemory-bytes = 99999999999\n").unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::LimitOutOfRange {
                    limit: "memory-bytes",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn refusals_name_the_reason() {
        let err = parse("worlds = \"w\"\nbogus = 1\n").unwrap_err();
        assert!(
            matches!(err, PolicyError::Toml(ref m) if m.contains("bogus")),
            "{err}"
        );
        let err = parse(&format!(
            "worlds = \"w\"\n[[program]]\nname = \"a\"\nsha256 = \"{D}\"\nworld = \"nope\"\n"
        ))
        .unwrap_err();
        assert!(matches!(err, PolicyError::UnknownWorld { ref world, .. } if world == "nope"));
        let err = parse(
            "worlds = \"w\"\n[[program]]\nname = \"a\"\nsha256 = \"xyz\"\nworld = \"inference\"\n",
        )
        .unwrap_err();
        assert!(matches!(err, PolicyError::BadDigest { .. }));
        let err = parse(&format!(
            "worlds = \"w\"\n[[program]]\nname = \"a\"\nsha256 = \"{D}\"\nworld = \"inference\"\n[[program]]\nname = \"b\"\nsha256 = \"{D}\"\nworld = \"inference\"\n"
        ))
        .unwrap_err();
        assert!(matches!(err, PolicyError::DuplicateDigest { .. }));
    }

    #[test]
    fn foreign_imports_in_a_world_are_refused() {
        let worlds =
            "package cinfer:policies;\ninterface fs { read: func(); }\nworld w { import fs; }\n";
        let err = Policy::parse("worlds = \"w\"\n", |_| Ok(worlds.to_owned())).unwrap_err();
        assert!(
            matches!(err, PolicyError::ForeignImport { ref import, .. } if import.contains("fs")),
            "{err}"
        );
        let err =
            Policy::parse("worlds = \"w\"\n", |_| Ok("package x:y; world".to_owned())).unwrap_err();
        assert!(matches!(err, PolicyError::Wit { .. }));
    }

    #[test]
    fn policy_files_cannot_escape_their_directory() {
        let tmp = std::env::temp_dir().join(format!("cinfer-policy-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("policy")).expect("tmp");
        // The file exists, next to the policy's directory: still not readable.
        std::fs::write(tmp.join("outside.wit"), "package a:b;\nworld w {}\n").expect("write");
        std::fs::write(tmp.join("policy/p.toml"), "worlds = \"../outside.wit\"\n").expect("write");
        let err = Policy::load_path(&tmp.join("policy/p.toml")).unwrap_err();
        assert!(
            matches!(err, PolicyError::Read { ref path, ref source }
                if path == "../outside.wit" && source.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error())),
            "{err}"
        );
        std::fs::remove_dir_all(&tmp).ok();
    }
}
