//! The loader: one wasmtime engine, admitted programs cached by digest, and
//! one fresh [`Store`] per run with the policy's limits.
//!
//! * Components are compiled once per digest and instantiated from an
//!   `InstancePre` on a pooling allocator, so a run costs microseconds.
//! * Every run has a memory limit ([`wasmtime::ResourceLimiter`]; growing past
//!   it traps), a wall-clock deadline (epoch interruption, one tick per
//!   millisecond from a ticker thread; there is always a deadline), a stack
//!   limit, an egress budget and an accelerator memory budget.
//! * A trap ends only that run: the store is dropped and the next run starts
//!   clean.

use crate::admission::{self, AdmissionError, AdmittedProgram};
use crate::backend::batch::Rounds;
use crate::backend::{Backend, CpuBackend};
use crate::bindings::ProgramPre;
use crate::caps::PolicyViolation;
use crate::caps::accelerator::AccelCtx;
use crate::caps::crypto::CryptoCtx;
use crate::caps::model::{ModelCtx, ModelStore, ModelView};
use crate::caps::output::{FrameSink, OutputCtx};
use crate::driver::{Driver, Timers};
use crate::egress::{Bucket, Pacing};
use crate::policy::{Capabilities, Capability, Limits, Policy, ProgramGrant, ceilings};
use cinfer_envelope::{EnvelopeError, ReplyStatus, RequestPrivateKey};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasData, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

/// Epoch tick: the deadline's granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Ticks between two looks at a run's cancellation flag (and its remaining
/// deadline): a cancelled run stops within about this many milliseconds of
/// Wasm execution (a host call in progress finishes first).
const CHECK_TICKS: u64 = 10;

/// The error that ends a cancelled run (mapped to [`AbortReason::Cancelled`]).
#[derive(Debug, thiserror::Error)]
#[error("run cancelled")]
struct RunCancelled;

/// Engine-wide settings (the policy sets per-program limits below these).
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Concurrent runs the instance pool holds.
    pub max_concurrent_runs: u32,
    /// Wasm stack per run, in bytes.
    pub max_wasm_stack: usize,
    /// The accelerator backend.
    pub backend: Arc<dyn Backend>,
    /// The models this loader serves.
    pub models: ModelStore,
    /// Cross-request batching: runs go to one driver thread as coroutines,
    /// and their decode-sized matmuls on the same weights share rounds
    /// ([`crate::driver`], [`crate::backend::batch`]). Off: each run computes
    /// on its caller's thread.
    pub batching: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            max_concurrent_runs: 32,
            max_wasm_stack: 512 << 10,
            backend: Arc::new(CpuBackend),
            models: ModelStore::default(),
            batching: true,
        }
    }
}

/// The loader could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoaderError {
    /// wasmtime refused the engine configuration.
    #[error("engine configuration: {0}")]
    Engine(String),
    /// The driver thread of batched runs did not start.
    #[error("the run driver thread did not start: {0}")]
    Driver(String),
}

/// A request refused before any program code ran. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The sealed request is larger than the program's policy allows.
    #[error("sealed request of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its size.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The envelope did not open (tampered, wrong key, malformed).
    #[error("sealed request refused: {0}")]
    Envelope(#[from] EnvelopeError),
    /// The request is bound to another program component than the one asked
    /// to run it (nothing was opened).
    #[error("the request is bound to program sha256 {bound}, not to {program:?}")]
    WrongProgram {
        /// The component digest the request names (hex).
        bound: String,
        /// The program asked to run it.
        program: String,
    },
    /// Refused by the serving loader's replay window (a replay, or sealed
    /// outside the window); see [`crate::replay`].
    #[error("{0}")]
    Replay(#[from] crate::replay::ReplayError),
    /// No instance slot is free (the pool is exhausted) or instantiation failed.
    #[error("could not instantiate the program: {0}")]
    Instantiate(String),
    /// The driver of batched runs stopped (a loader bug).
    #[error(transparent)]
    Driver(#[from] crate::driver::DriverGone),
    /// The program's safety classifier is not admitted on this loader.
    #[error("the program's classifier `{0}` is not admitted")]
    ClassifierNotAdmitted(String),
}

/// Why the loader stopped a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AbortReason {
    /// The wall-clock deadline passed.
    #[error("deadline of {0:?} exceeded")]
    Deadline(Duration),
    /// The peer cancelled the request (its client went away).
    #[error("cancelled by the peer")]
    Cancelled,
    /// A policy limit was crossed (memory, egress) or a bad handle passed.
    #[error("{0}")]
    Policy(PolicyViolation),
    /// The Wasm call stack overflowed.
    #[error("wasm stack exhausted")]
    StackExhausted,
    /// Another Wasm trap (unreachable, out-of-bounds access, ...).
    #[error("wasm trap: {0}")]
    Trap(wasmtime::Trap),
    /// The program broke the canonical ABI in a call across the interface:
    /// arguments that do not lift (a list past the end of its memory, a
    /// string that is not UTF-8, a stale resource handle), results its
    /// `realloc` cannot take. The program's fault; the cause is wasmtime's
    /// message (positions and lengths, never memory contents).
    #[error("bad call across the interface: {0}")]
    Interface(String),
    /// A host function panicked (a loader bug, caught so that it ends only
    /// this run).
    #[error("host error: a host function panicked")]
    HostPanic,
}

/// How [`Loader::run`] hands out the reply and learns it should stop; all
/// optional (`RunOptions::default()`: collect the frames in the report).
#[derive(Default)]
pub struct RunOptions<'a> {
    sink: Option<FrameSink>,
    cancel: Option<Arc<AtomicBool>>,
    opened: Option<Box<dyn FnOnce() -> Result<(), RequestError> + 'a>>,
}

impl std::fmt::Debug for RunOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("streams", &self.sink.is_some())
            .field("cancellable", &self.cancel.is_some())
            .field("on_opened", &self.opened.is_some())
            .finish()
    }
}

impl<'a> RunOptions<'a> {
    /// Hands each sealed frame to `sink` as soon as it exists (the report's
    /// `frames` stay empty); the last frame is the authenticated end of the
    /// reply.
    pub fn stream_to(mut self, sink: FrameSink) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Stops the run soon after `flag` is set (aborted,
    /// [`AbortReason::Cancelled`]; the final frame is still sealed).
    pub fn cancel_on(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Calls `f` once the envelope opened (the request is authenticated) and
    /// before any program code runs; its error refuses the request (the
    /// serving loader records the request in its replay window there,
    /// [`crate::replay`]).
    pub fn on_opened(mut self, f: impl FnOnce() -> Result<(), RequestError> + 'a) -> Self {
        self.opened = Some(Box::new(f));
        self
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// `run` returned `ok`.
    Completed,
    /// `run` returned `err`; the program told the requester why (sealed).
    ProgramFailed,
    /// The loader stopped the program.
    Aborted(AbortReason),
    /// The program's safety classifier did not allow the request (it refused
    /// it, or failed: the gate fails closed); the program did not run.
    Refused,
}

/// What a program's safety classifier said about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassifierVerdict {
    /// The classifier's policy entry.
    pub name: String,
    /// Its component digest.
    pub digest: [u8; 32],
    /// Its verdict.
    pub verdict: Verdict,
}

/// A classifier's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `run` returned ok: the program runs.
    Allow,
    /// `run` returned err: refused.
    Deny,
    /// The classifier was stopped (a trap, its deadline): refused.
    Failed(AbortReason),
}

impl Verdict {
    /// `allow`, `deny` or `failed` (the receipt's word).
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::Completed => f.write_str("completed"),
            RunOutcome::ProgramFailed => f.write_str("program failed"),
            RunOutcome::Aborted(reason) => write!(f, "aborted: {reason}"),
            RunOutcome::Refused => f.write_str("refused by the safety classifier"),
        }
    }
}

impl RunOutcome {
    fn status(&self) -> ReplyStatus {
        match self {
            RunOutcome::Completed => ReplyStatus::Completed,
            RunOutcome::ProgramFailed => ReplyStatus::ProgramFailed,
            RunOutcome::Aborted(_) => ReplyStatus::Aborted,
            RunOutcome::Refused => ReplyStatus::Refused,
        }
    }
}

/// What a run produced: sealed frames and metadata safe to show the untrusted side.
#[derive(Debug)]
pub struct RunReport {
    /// Sealed reply frames, the last one the authenticated end (when collected).
    pub frames: Vec<Vec<u8>>,
    /// How the run ended.
    pub outcome: RunOutcome,
    /// Sealed bytes emitted (excluding the final frame).
    pub egress_bytes: u64,
    /// Accelerator op launches.
    pub accelerator_launches: u64,
    /// Wall-clock time of instantiate + run.
    pub elapsed: Duration,
    /// The safety classifier's verdict, when the program's grant has one.
    pub classifier: Option<ClassifierVerdict>,
}

/// The per-run store data: one narrow context per capability.
pub struct RunState {
    crypto: CryptoCtx,
    accel: AccelCtx,
    model: ModelCtx,
    output: OutputCtx,
    limiter: MemoryLimiter,
}

impl std::fmt::Debug for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunState").finish_non_exhaustive()
    }
}

/// Memory limits of one run: growing past them traps with the reason.
#[derive(Debug)]
struct MemoryLimiter {
    memory_bytes: u64,
}

/// Bytes of each linear-memory slot kept mapped (and zeroed) between runs.
const KEEP_RESIDENT: usize = 16 << 20;

/// Elements one table may hold (tables are not large in our programs). The
/// pool reserves this many per table slot too, so the limiter, which runs
/// first, is what stops a larger `table.grow`, with the reason.
const MAX_TABLE_ELEMENTS: usize = 20_000;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_bytes {
            return Err(wasmtime::Error::new(PolicyViolation::MemoryLimit {
                limit: self.memory_bytes,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(PolicyViolation::TableLimit {
                limit: MAX_TABLE_ELEMENTS as u64,
            }));
        }
        Ok(true)
    }
}

struct CryptoCap;
impl HasData for CryptoCap {
    type Data<'a> = &'a mut CryptoCtx;
}
struct AccelCap;
impl HasData for AccelCap {
    type Data<'a> = &'a mut AccelCtx;
}
struct ModelCap;
impl HasData for ModelCap {
    type Data<'a> = ModelView<'a>;
}
struct OutputCap;
impl HasData for OutputCap {
    type Data<'a> = &'a mut OutputCtx;
}

/// Builds a linker with exactly the granted capabilities (and never WASI).
fn linker_for(engine: &Engine, caps: Capabilities) -> wasmtime::Result<Linker<RunState>> {
    use crate::bindings::{accelerator, crypto, model, output};
    let mut linker = Linker::new(engine);
    for cap in caps.iter() {
        match cap {
            Capability::Crypto => {
                crypto::add_to_linker::<RunState, CryptoCap>(&mut linker, |s: &mut RunState| {
                    &mut s.crypto
                })?
            }
            Capability::Accelerator => accelerator::add_to_linker::<RunState, AccelCap>(
                &mut linker,
                |s: &mut RunState| &mut s.accel,
            )?,
            Capability::Model => {
                model::add_to_linker::<RunState, ModelCap>(&mut linker, |s: &mut RunState| {
                    ModelView {
                        model: &mut s.model,
                        accel: &mut s.accel,
                    }
                })?
            }
            Capability::Output => {
                output::add_to_linker::<RunState, OutputCap>(&mut linker, |s: &mut RunState| {
                    &mut s.output
                })?
            }
        }
    }
    Ok(linker)
}

/// Increments the engine's epoch and wakes due timers every [`EPOCH_TICK`]
/// until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine, timers: Arc<Timers>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("cinfer-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    timers.fire(Instant::now());
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("epoch ticker did not start: {e}"));
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A signed admission's cache key: SHA-256 over the component digest and every
/// signature presented (length-prefixed, in order).
type SignedKey = [u8; 32];

/// Signed admissions kept in the cache.
const MAX_SIGNED_ADMISSIONS: usize = 1024;

/// The trusted loader: admits programs under one policy and runs requests.
pub struct Loader {
    engine: Engine,
    policy: Policy,
    backend: Arc<dyn Backend>,
    models: std::sync::RwLock<Arc<ModelStore>>,
    linkers: Mutex<HashMap<Capabilities, Arc<Linker<RunState>>>>,
    admitted: Mutex<HashMap<[u8; 32], Arc<AdmittedProgram>>>,
    /// Signed admissions, by digest and signatures: the same bytes with the
    /// same signatures are verified once.
    admitted_signed: Mutex<HashMap<SignedKey, Arc<AdmittedProgram>>>,
    /// With batching: the thread that drives every run.
    driver: Option<Driver<Result<RunReport, RequestError>>>,
    /// Sleeping runs (paced frames), woken by the ticker.
    timers: Arc<Timers>,
    /// The policy's loader-wide egress bucket.
    egress_total: Option<Arc<Bucket>>,
    /// Egress buckets of grants that set a rate, by grant name.
    egress_grants: Mutex<HashMap<String, Arc<Bucket>>>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("policy", &hex::encode(self.policy.digest()))
            .field("backend", &self.backend.name())
            .finish_non_exhaustive()
    }
}

/// What one run (one component instance) may take from the instance pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunShare {
    /// Core module instances.
    pub core_instances: u32,
    /// Linear memories.
    pub memories: u32,
    /// Tables.
    pub tables: u32,
}

/// Every run's share of the pool. A component built by `wit-component` from
/// one core module uses one memory, a few core instances (the module, its
/// shims) and two tables; these leave headroom for that, and the pool holds
/// `max_concurrent_runs` such shares.
pub const PER_RUN: RunShare = RunShare {
    core_instances: 8,
    memories: 2,
    tables: 8,
};

impl Loader {
    /// Starts a loader enforcing `policy`.
    pub fn new(policy: Policy, config: LoaderConfig) -> Result<Self, LoaderError> {
        let mut pool = PoolingAllocationConfig::default();
        let n = config.max_concurrent_runs.max(1);
        // The pool holds `n` runs' worth of everything, and one run may take
        // at most its share ([`PER_RUN`]): a component needing more is
        // refused at admission ([`AdmissionError::ExceedsRunLimits`]) instead
        // of never instantiating, or starving every other program while it runs.
        pool.total_component_instances(n)
            .total_core_instances(n * PER_RUN.core_instances)
            .total_memories(n * PER_RUN.memories)
            .total_tables(n * PER_RUN.tables)
            .max_core_instances_per_component(PER_RUN.core_instances)
            .max_memories_per_component(PER_RUN.memories)
            .max_tables_per_component(PER_RUN.tables)
            .table_elements(MAX_TABLE_ELEMENTS)
            // A slot's first 16 MiB stay mapped between runs and are zeroed
            // with memset instead of being unmapped: the next run's heap then
            // takes no page faults (~0.5 ms of a short request). Memory a run
            // leaves is never visible to the next one either way (tested).
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .max_memory_size(ceilings::MEMORY_BYTES as usize);
        let mut cfg = Config::new();
        cfg.wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg).map_err(|e| LoaderError::Engine(format!("{e:#}")))?;
        let driver = if config.batching {
            let rounds = Arc::new(Rounds::new(config.backend.clone()));
            Some(Driver::start(rounds).map_err(|e| LoaderError::Driver(e.to_string()))?)
        } else {
            None
        };
        let timers = Arc::new(Timers::default());
        Ok(Loader {
            driver,
            _ticker: EpochTicker::start(engine.clone(), timers.clone()),
            timers,
            egress_total: policy.egress().map(|r| Arc::new(Bucket::new(r))),
            egress_grants: Mutex::new(HashMap::new()),
            engine,
            policy,
            backend: config.backend,
            models: std::sync::RwLock::new(Arc::new(config.models)),
            linkers: Mutex::new(HashMap::new()),
            admitted: Mutex::new(HashMap::new()),
            admitted_signed: Mutex::new(HashMap::new()),
        })
    }

    /// The policy this loader enforces.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn linker(&self, caps: Capabilities) -> Result<Arc<Linker<RunState>>, AdmissionError> {
        let mut linkers = self.linkers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = linkers.get(&caps) {
            return Ok(l.clone());
        }
        let linker = Arc::new(linker_for(&self.engine, caps).map_err(|e| {
            AdmissionError::ImportMismatch {
                reason: format!("building the linker: {e:#}"),
            }
        })?);
        linkers.insert(caps, linker.clone());
        Ok(linker)
    }

    /// Admits component bytes (see [`crate::admission`]). Cached by digest:
    /// admitting the same bytes again costs a hash.
    pub fn admit(&self, bytes: &[u8]) -> Result<Arc<AdmittedProgram>, AdmissionError> {
        admission::check_preamble(bytes)?;
        let digest = admission::digest(bytes);
        if let Some(p) = self
            .admitted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&digest)
        {
            return Ok(p.clone());
        }
        let program = Arc::new(self.compile(bytes, &digest)?);
        self.admitted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(digest, program.clone());
        tracing::info!(program = %program.grant.name, digest = %hex::encode(digest), world = %program.grant.world, "admitted");
        Ok(program)
    }

    /// Admits component bytes signed by one Sigstore bundle or detached
    /// signature; see [`Loader::admit_signatures`].
    pub fn admit_signed(
        &self,
        bytes: &[u8],
        signature: &[u8],
    ) -> Result<Arc<AdmittedProgram>, AdmissionError> {
        self.admit_signatures(bytes, &[signature])
    }

    /// Admits component bytes by who signed them. Each signature is a Sigstore
    /// bundle (keyless: certificate chain at the signing time, SCT, Rekor SET,
    /// inclusion proof and checkpoint, all offline against the policy's trust
    /// root; or key-based with the same log checks) or a detached
    /// `cosign sign-blob --key` signature. Every signature must verify; the
    /// signers the policy lists are then matched against its signed grants
    /// (N-of-M quorums first) and the first satisfied grant's world and limits
    /// are granted, followed by the usual import/export checks. The same bytes
    /// with the same signatures are verified once and then served from a cache.
    pub fn admit_signatures(
        &self,
        bytes: &[u8],
        signatures: &[&[u8]],
    ) -> Result<Arc<AdmittedProgram>, AdmissionError> {
        admission::check_preamble(bytes)?;
        let digest = admission::digest(bytes);
        // The same signatures in another order, or repeated, are the same
        // admission (and one cache entry).
        let mut signatures = signatures.to_vec();
        signatures.sort_unstable();
        signatures.dedup();
        let signatures = signatures.as_slice();
        let key: SignedKey = {
            let mut h = Sha256::new();
            h.update(digest);
            for s in signatures {
                h.update((s.len() as u64).to_be_bytes());
                h.update(s);
            }
            h.finalize().into()
        };
        if let Some(p) = self
            .admitted_signed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(p.clone());
        }
        let (signed, verified) = crate::signatures::admit(&self.policy, bytes, signatures)?;
        let mut grant = signed.grant;
        grant.digest = digest;
        let mut program = self.compile_with(bytes, grant)?;
        for v in &verified {
            tracing::info!(grant = %program.grant.name, signer = %v.signer, identity = %v.identity, log_index = v.log.as_ref().map(|l| l.log_index), digest = %hex::encode(digest), "admitted signed program");
        }
        program.signatures = verified;
        let program = Arc::new(program);
        let mut cache = self
            .admitted_signed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Bounded: valid signature sets are few; a flood of variants starts it afresh.
        if cache.len() >= MAX_SIGNED_ADMISSIONS {
            cache.clear();
        }
        cache.insert(key, program.clone());
        Ok(program)
    }

    /// Replaces the models this loader serves (a serving loader gets its model
    /// keys only after attesting). Runs in progress keep the store they started with.
    pub fn set_models(&self, models: ModelStore) {
        *self.models.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(models);
    }

    /// Admission without the cache (a cold compile every time; for benchmarks).
    pub fn admit_uncached(&self, bytes: &[u8]) -> Result<AdmittedProgram, AdmissionError> {
        admission::check_preamble(bytes)?;
        self.compile(bytes, &admission::digest(bytes))
    }

    fn compile(&self, bytes: &[u8], digest: &[u8; 32]) -> Result<AdmittedProgram, AdmissionError> {
        let grant = match self.policy.grant_for(digest) {
            Some(grant) => grant.clone(),
            // Under a policy that admits by signer, bytes without signatures
            // are refused as unsigned (they might be admitted signed).
            None if !self.policy.signed_grants().is_empty() => {
                return Err(AdmissionError::Unsigned {
                    digest: hex::encode(digest),
                });
            }
            None => {
                return Err(AdmissionError::UnknownDigest {
                    digest: hex::encode(digest),
                });
            }
        };
        self.compile_with(bytes, grant)
    }

    fn compile_with(
        &self,
        bytes: &[u8],
        grant: ProgramGrant,
    ) -> Result<AdmittedProgram, AdmissionError> {
        if let Some(c) = &grant.classifier
            && !self
                .admitted
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&c.digest)
        {
            return Err(AdmissionError::ClassifierNotAdmitted {
                program: grant.name.clone(),
                classifier: c.name.clone(),
            });
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| {
            let reason = format!("{e:#}");
            // wasmtime's pooling allocator checks the per-component limits
            // ([`PER_RUN`]) when the component is created; its message is the
            // only form the refusal takes (pinned by the loader tests).
            if reason.contains("exceeds the configured maximum of") {
                AdmissionError::ExceedsRunLimits { reason }
            } else {
                AdmissionError::InvalidComponent { reason }
            }
        })?;
        let imports = admission::check_imports(&self.engine, &component, &grant)?;
        let linker = self.linker(grant.capabilities)?;
        let instance_pre =
            linker
                .instantiate_pre(&component)
                .map_err(|e| AdmissionError::ImportMismatch {
                    reason: format!("{e:#}"),
                })?;
        if component.get_export_index(None, "run").is_none() {
            return Err(AdmissionError::MissingRun);
        }
        let pre = ProgramPre::new(instance_pre).map_err(|e| AdmissionError::MistypedRun {
            reason: format!("{e:#}"),
        })?;
        Ok(AdmittedProgram {
            grant,
            signatures: Vec::new(),
            pre,
            imports,
        })
    }

    /// Runs one sealed request: opens its envelope, runs the program on it,
    /// seals the reply. By default the sealed reply frames are collected in
    /// the report; [`RunOptions`] can stream them instead, cancel the run and
    /// act once the request authenticated. The only way a request runs.
    pub fn run(
        &self,
        program: &AdmittedProgram,
        sealed_request: &[u8],
        key: &RequestPrivateKey,
        options: RunOptions<'_>,
    ) -> Result<RunReport, RequestError> {
        let RunOptions {
            sink,
            cancel,
            opened,
        } = options;
        let opened = opened.unwrap_or_else(|| Box::new(|| Ok(())));
        let Some(sink) = sink else {
            let frames = Arc::new(Mutex::new(Vec::new()));
            let sink_frames = frames.clone();
            let sink: FrameSink = Box::new(move |f| {
                sink_frames
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(f)
            });
            let mut report =
                self.open_and_execute(program, sealed_request, key, sink, cancel, opened)?;
            report.frames =
                std::mem::take(&mut *frames.lock().unwrap_or_else(PoisonError::into_inner));
            return Ok(report);
        };
        self.open_and_execute(program, sealed_request, key, sink, cancel, opened)
    }

    fn open_and_execute(
        &self,
        program: &AdmittedProgram,
        sealed_request: &[u8],
        key: &RequestPrivateKey,
        sink: FrameSink,
        cancel: Option<Arc<AtomicBool>>,
        opened: impl FnOnce() -> Result<(), RequestError>,
    ) -> Result<RunReport, RequestError> {
        let limits = &program.grant.limits;
        let len = sealed_request.len() as u64;
        if len > limits.request_bytes {
            return Err(RequestError::TooLarge {
                len,
                limit: limits.request_bytes,
            });
        }
        // A request bound to one component runs on that one only; the binding
        // is authenticated when the request opens.
        if let Some(bound) = cinfer_envelope::request_program(sealed_request)?
            && bound != program.grant.digest
        {
            return Err(RequestError::WrongProgram {
                bound: hex::encode(bound),
                program: program.grant.name.clone(),
            });
        }
        let (cleartext, sealer) = cinfer_envelope::open_request(key, sealed_request)?;
        opened()?;
        let Some(c) = &program.grant.classifier else {
            return self.execute(program, Some(cleartext), Some(sealer), sink, cancel);
        };
        // The classifier reads the request first; the program runs only on
        // its `allow`.
        let start = Instant::now();
        let classifier = self
            .admitted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&c.digest)
            .cloned()
            .ok_or_else(|| RequestError::ClassifierNotAdmitted(c.name.clone()))?;
        let verdict = match self
            .execute(
                &classifier,
                Some(cleartext.clone()),
                None,
                Box::new(|_| {}),
                cancel.clone(),
            )?
            .outcome
        {
            RunOutcome::Completed => Verdict::Allow,
            RunOutcome::ProgramFailed | RunOutcome::Refused => Verdict::Deny,
            RunOutcome::Aborted(reason) => Verdict::Failed(reason),
        };
        let verdict = ClassifierVerdict {
            name: c.name.clone(),
            digest: c.digest,
            verdict,
        };
        if verdict.verdict == Verdict::Allow {
            let mut report = self.execute(program, Some(cleartext), Some(sealer), sink, cancel)?;
            report.elapsed = start.elapsed();
            report.classifier = Some(verdict);
            return Ok(report);
        }
        // Refused: the requester reads the refusal in the sealed final frame;
        // the untrusted side learns only that it was refused.
        drop(cleartext);
        tracing::info!(program = %program.grant.name, classifier = %verdict.name, verdict = verdict.verdict.as_str(), "request refused by the classifier");
        send_final_frame(
            sealer,
            ReplyStatus::Refused,
            sink,
            &self.egress_buckets(&program.grant),
        );
        Ok(RunReport {
            frames: Vec::new(),
            outcome: RunOutcome::Refused,
            egress_bytes: 0,
            accelerator_launches: 0,
            elapsed: start.elapsed(),
            classifier: Some(verdict),
        })
    }

    fn execute(
        &self,
        program: &AdmittedProgram,
        request: Option<zeroize::Zeroizing<Vec<u8>>>,
        sealer: Option<cinfer_envelope::ReplySealer>,
        sink: FrameSink,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<RunReport, RequestError> {
        let job = RunJob {
            engine: self.engine.clone(),
            backend: self.backend.clone(),
            models: self
                .models
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            pre: program.pre.clone(),
            grant: program.grant.clone(),
            request,
            sealer,
            sink,
            cancel,
            egress: self.egress_buckets(&program.grant),
            timers: self.timers.clone(),
        };
        match &self.driver {
            Some(driver) => {
                driver.run(Box::new(move |rounds| Box::pin(job.execute(Some(rounds)))))?
            }
            None => crate::driver::block_on(job.execute(None)),
        }
    }

    /// The egress buckets a run of `grant` draws on: its grant's, then the
    /// loader's.
    fn egress_buckets(&self, grant: &ProgramGrant) -> Vec<Arc<Bucket>> {
        let own = grant.limits.egress_rate.map(|rate| {
            self.egress_grants
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(grant.name.clone())
                .or_insert_with(|| Arc::new(Bucket::new(rate)))
                .clone()
        });
        own.into_iter().chain(self.egress_total.clone()).collect()
    }

    /// What cross-request batching has done so far (`None` when it is off).
    pub fn batch_stats(&self) -> Option<crate::backend::batch::BatchStats> {
        self.driver.as_ref().map(|d| d.rounds().stats())
    }
}

/// Everything one run needs, owned: it may run on the driver's thread.
struct RunJob {
    engine: Engine,
    backend: Arc<dyn Backend>,
    models: Arc<ModelStore>,
    pre: ProgramPre<RunState>,
    grant: ProgramGrant,
    request: Option<zeroize::Zeroizing<Vec<u8>>>,
    sealer: Option<cinfer_envelope::ReplySealer>,
    sink: FrameSink,
    cancel: Option<Arc<AtomicBool>>,
    egress: Vec<Arc<Bucket>>,
    timers: Arc<Timers>,
}

impl RunJob {
    /// Instantiates the program in a fresh store and runs it. With `rounds`
    /// (on the driver's thread) its decode matmuls are batched and it yields
    /// to the other runs at each epoch check.
    async fn execute(self, rounds: Option<Arc<Rounds>>) -> Result<RunReport, RequestError> {
        let RunJob {
            engine,
            backend,
            models,
            pre,
            grant,
            request,
            sealer,
            sink,
            cancel,
            egress,
            timers,
        } = self;
        let limits: &Limits = &grant.limits;
        let start = Instant::now();
        let end = start + limits.deadline;
        let yields = rounds.is_some();
        let accel = match rounds {
            Some(rounds) => {
                AccelCtx::batched(rounds, limits.accelerator_bytes, limits.memory_bytes)
            }
            None => AccelCtx::new(backend, limits.accelerator_bytes, limits.memory_bytes),
        };
        let state = RunState {
            crypto: CryptoCtx::new(request),
            accel: accel.with_deadline(end),
            model: ModelCtx::new(grant.models.clone().into(), models),
            output: {
                let out = OutputCtx::new(sealer, sink, limits.egress_bytes);
                if egress.is_empty() {
                    out
                } else {
                    out.with_pacing(Pacing {
                        buckets: egress,
                        timers,
                        deadline: end,
                        cancel: cancel.clone(),
                    })
                }
            },
            limiter: MemoryLimiter {
                memory_bytes: limits.memory_bytes,
            },
        };
        let mut store = Store::new(&engine, state);
        store.limiter(|s| &mut s.limiter);
        // Bounds what one call's arguments may make the host allocate (a
        // list of borrowed handles lifts to several times its guest bytes);
        // wasmtime checks it before lifting a list's first element.
        store.set_hostcall_fuel(usize::try_from(limits.hostcall_bytes).unwrap_or(usize::MAX));
        // The deadline is a wall-clock instant: at every check (each
        // CHECK_TICKS epochs, or later when a host call ran long) the run is
        // stopped if it was cancelled or the instant has passed; otherwise the
        // next check is at most CHECK_TICKS away and never past the deadline.
        // (Counting ticks per step instead would not charge the time a host
        // call spends between two checks.) A batched run also lets the other
        // runs on the driver go on at each check.
        let ticks_until = move |now: Instant| -> u64 {
            let left = end.saturating_duration_since(now);
            let ticks = left.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
            u64::try_from(ticks)
                .unwrap_or(u64::MAX)
                .clamp(1, CHECK_TICKS)
        };
        store.set_epoch_deadline(ticks_until(Instant::now()));
        store.epoch_deadline_callback(move |_| {
            if cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(wasmtime::Error::new(RunCancelled));
            }
            let now = Instant::now();
            if now >= end {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            Ok(if yields {
                wasmtime::UpdateDeadline::Yield(ticks_until(now))
            } else {
                wasmtime::UpdateDeadline::Continue(ticks_until(now))
            })
        });

        let outcome = match pre.instantiate_async(&mut store).await {
            // A panic in a host function is a loader bug; catch it so it ends
            // this run (sealed as aborted), not the loader.
            Ok(instance) => match CatchUnwind(Box::pin(instance.call_run(&mut store))).await {
                Ok(Ok(Ok(()))) => RunOutcome::Completed,
                Ok(Ok(Err(()))) => RunOutcome::ProgramFailed,
                Ok(Err(e)) => RunOutcome::Aborted(abort_reason(&e, limits)),
                Err(()) => RunOutcome::Aborted(AbortReason::HostPanic),
            },
            Err(e) => match classify_instantiate(&e, limits) {
                Some(reason) => RunOutcome::Aborted(reason),
                None => return Err(RequestError::Instantiate(format!("{e}"))),
            },
        };
        let elapsed = start.elapsed();
        let state = store.into_data();
        let egress_bytes = state.output.used();
        let accelerator_launches = state.accel.launches();
        let (sealer, sink, pacing) = state.output.finish();
        if let Some(sealer) = sealer {
            let buckets = pacing.map(|p| p.buckets).unwrap_or_default();
            send_final_frame(sealer, outcome.status(), sink, &buckets);
        }
        match &outcome {
            RunOutcome::Aborted(reason) => {
                tracing::warn!(program = %grant.name, %reason, "run aborted")
            }
            other => {
                tracing::debug!(program = %grant.name, outcome = ?other, ?elapsed, "run finished")
            }
        }
        Ok(RunReport {
            frames: Vec::new(),
            outcome,
            egress_bytes,
            accelerator_launches,
            elapsed,
            classifier: None,
        })
    }
}

/// Seals the reply's final frame with `status` and sends it. A run's end
/// always leaves, however paced; its bytes still count against `buckets`.
fn send_final_frame(
    sealer: cinfer_envelope::ReplySealer,
    status: ReplyStatus,
    mut sink: FrameSink,
    buckets: &[Arc<Bucket>],
) {
    match sealer.finish(status) {
        Ok(frame) => {
            crate::egress::charge(buckets, frame.len() as u64);
            sink(frame)
        }
        Err(e) => tracing::error!("sealing the final reply frame failed: {e}"),
    }
}

/// A future whose panic comes out as `Err(())` (the panic is dropped: a
/// host function's panic message is a loader bug's, not the requester's).
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

/// Maps a trap to its reason. Messages carry no guest data: wasmtime's trap
/// codes, its canonical-ABI messages and our own [`PolicyViolation`]s only.
/// Host functions fail a call only with the types matched here (panics are
/// caught before), so any other error is the canonical ABI refusing what the
/// program passed or returned.
fn abort_reason(e: &wasmtime::Error, limits: &Limits) -> AbortReason {
    if let Some(v) = e.downcast_ref::<PolicyViolation>() {
        return AbortReason::Policy(v.clone());
    }
    if e.downcast_ref::<RunCancelled>().is_some()
        || e.downcast_ref::<crate::egress::CancelledWhilePaced>()
            .is_some()
    {
        return AbortReason::Cancelled;
    }
    // A launch that could not have finished in time: the deadline, reached
    // early instead of overrun.
    if e.downcast_ref::<crate::caps::accelerator::LaunchPastDeadline>()
        .is_some()
    {
        return AbortReason::Deadline(limits.deadline);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => AbortReason::Deadline(limits.deadline),
        Some(Trap::StackOverflow) => AbortReason::StackExhausted,
        Some(t) => AbortReason::Trap(*t),
        // The root cause: the outer layers are wasmtime's backtrace context.
        None => AbortReason::Interface(e.root_cause().to_string()),
    }
}

/// A limit hit while instantiating (e.g. an initial memory above the limit)
/// is the program's fault; anything else (pool exhausted) is the loader's.
fn classify_instantiate(e: &wasmtime::Error, limits: &Limits) -> Option<AbortReason> {
    if e.downcast_ref::<PolicyViolation>().is_some()
        || e.downcast_ref::<Trap>().is_some()
        || e.downcast_ref::<RunCancelled>().is_some()
    {
        Some(abort_reason(e, limits))
    } else {
        None
    }
}
