//! `cinfer:loader/accelerator`: tensors in accelerator memory and the op set.
//!
//! Every launch is validated here, once for all backends: handles, ranks,
//! shapes, dtypes, argument ranges, the accelerator memory budget and a cap on
//! the work of one launch (host calls are not interrupted by the epoch
//! deadline, so one launch must stay short). A bad launch is a guest-visible
//! [`AccelError`], never a host panic.
//!
//! Weight tensors (loaded by the model capability) are never downloadable and
//! never writable (they cannot serve as a KV cache). Activations computed from
//! them are ordinary tensors: a signed program that deliberately reconstructs
//! weights through ops (an identity matmul, an embedding of every row) is
//! stopped by review and signing, not by this layer.

use super::PolicyViolation;
use crate::backend::batch::Rounds;
use crate::backend::{AttentionShape, Backend, BackendError, BinaryOp, DeviceBuffer, ElemType};
pub use crate::bindings::accelerator::{AccelError, Dtype};
use crate::bindings::accelerator::{Host, HostTensor};
use std::sync::Arc;
use wasmtime::component::{Resource, ResourceTable};

/// Largest tensor rank.
pub const MAX_RANK: usize = 4;
/// Most multiply-adds one matmul or attention launch may do (a few seconds on one core).
pub const MAX_LAUNCH_WORK: u64 = 1 << 34;
/// Most weight matrices one `matmul-many` launch takes (the WIT says so).
const MAX_MATMUL_MANY: usize = 8;
/// Multiply-adds per second that the CPU backend's kernels sustain on one core
/// at the AVX2 and AVX-512 levels (its f32/f16 and GGUF-layout paths are the
/// slowest, ~2·10^9 on this workplace's machines; the packed quantized kernels
/// run 10–50× faster). On a CPU without AVX2 the portable path can be slower,
/// and a launch can then still overrun by up to its own length. A launch whose work would take
/// longer than the time left before the run's deadline at this rate is not
/// started: host calls are not interrupted by the epoch deadline, so the run
/// ends now ([`LaunchPastDeadline`], reported as the deadline) instead of
/// overrunning it by up to the whole launch.
pub const MIN_WORK_PER_SEC: u64 = 1_000_000_000;

/// The run's deadline would pass during this launch (see [`MIN_WORK_PER_SEC`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "an accelerator launch of {work} multiply-adds cannot finish in the {left:?} left before the deadline"
)]
pub struct LaunchPastDeadline {
    /// The launch's multiply-adds.
    pub work: u128,
    /// Time left before the deadline when it was asked for.
    pub left: std::time::Duration,
}

/// Most live tensors per run.
pub const MAX_TENSORS: usize = 1 << 16;
/// Longest attention context (positions); bounds the kernel's per-task
/// scratch (4 bytes a position) and the length of one launch.
pub const MAX_CONTEXT: u32 = 1 << 20;

/// A tensor: shape, device memory (which knows its element type), and whether
/// the guest may read it back.
#[derive(Debug)]
pub struct Tensor {
    shape: Vec<u32>,
    /// Shared for weights (one resident copy serves every run), unique otherwise.
    buf: Arc<DeviceBuffer>,
    bytes: u64,
    downloadable: bool,
}

/// The accelerator state of one run.
#[derive(Debug)]
pub struct AccelCtx {
    _run: Option<RunOnBackend>,
    backend: Arc<dyn Backend>,
    /// Where decode-sized matmuls go when the run is batched with others.
    rounds: Option<Arc<Rounds>>,
    /// Matmul launches so far (a batched launch's progress).
    matmul_steps: u64,
    table: ResourceTable,
    live: usize,
    in_use: u64,
    limit: u64,
    guest_memory_bytes: u64,
    launches: u64,
    deadline: Option<std::time::Instant>,
}

/// The sizes of one checked `decoder-layer` launch.
struct LayerPlan {
    m: usize,
    dim: usize,
    ffn: usize,
    shape: AttentionShape,
    /// Multiply-adds of the whole layer.
    work: u128,
}

/// Most layers one `decoder-stack` launch takes.
const MAX_STACK_LAYERS: usize = 256;

/// A backend that returned another number of products than matrices it was
/// given (a loader bug: the run traps, as for any backend failure).
fn miscounted(want: usize, got: usize) -> BackendError {
    BackendError::Device(format!("{got} products for {want} matrices"))
}

/// WIT dtype ↔ backend element type.
pub fn elem_type(d: Dtype) -> ElemType {
    match d {
        Dtype::F32 => ElemType::F32,
        Dtype::F16 => ElemType::F16,
        Dtype::Q41 => ElemType::Q4_1,
        Dtype::Q80 => ElemType::Q8_0,
    }
}

fn dtype(e: ElemType) -> Dtype {
    match e {
        ElemType::F32 => Dtype::F32,
        ElemType::F16 => Dtype::F16,
        ElemType::Q4_1 => Dtype::Q41,
        ElemType::Q8_0 => Dtype::Q80,
    }
}

/// Validates a shape and returns its element count.
pub(crate) fn numel(shape: &[u32]) -> Result<usize, AccelError> {
    if shape.is_empty() || shape.len() > MAX_RANK || shape.contains(&0) {
        return Err(AccelError::InvalidShape);
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .filter(|n| (*n as u64) < (1u64 << 40))
        .ok_or(AccelError::InvalidShape)
}

/// A RoPE base `rope` and `rope-attention` accept: finite and above 1.
fn rope_theta_ok(theta: f32) -> bool {
    theta.is_finite() && theta > 1.0
}

fn last_dim(shape: &[u32]) -> usize {
    shape.last().map_or(1, |d| *d as usize)
}

/// Guest error, or trap for failures that are not the guest's.
type OpResult<T> = wasmtime::Result<Result<T, AccelError>>;

fn backend_err<T>(e: BackendError) -> OpResult<T> {
    match e {
        BackendError::OutOfMemory => Ok(Err(AccelError::OutOfMemory)),
        other => Err(wasmtime::Error::msg(format!(
            "accelerator backend failure: {other}"
        ))),
    }
}

/// Evaluates a guest-error expression inside an `OpResult` function.
macro_rules! guest_try {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        }
    };
}

/// Evaluates a backend call inside an `OpResult` function.
macro_rules! backend_try {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return backend_err(e),
        }
    };
}

/// Tells the backend a thread launches for a run on it from creation until
/// drop (see [`Backend::run_started`]).
struct RunOnBackend(Arc<dyn Backend>);

impl std::fmt::Debug for RunOnBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunOnBackend")
    }
}

impl RunOnBackend {
    fn new(backend: Arc<dyn Backend>) -> Self {
        backend.run_started();
        RunOnBackend(backend)
    }
}

impl Drop for RunOnBackend {
    fn drop(&mut self) {
        self.0.run_ended();
    }
}

impl AccelCtx {
    /// A context on `backend` allowing `limit` bytes of live tensors, for a
    /// guest whose linear memory is limited to `guest_memory_bytes`.
    pub fn new(backend: Arc<dyn Backend>, limit: u64, guest_memory_bytes: u64) -> Self {
        Self::on(backend, None, limit, guest_memory_bytes)
    }

    /// A context like [`AccelCtx::new`] on the backend of `rounds`, for a run
    /// that the loader's driver runs beside others as a coroutine: its
    /// decode-sized matmuls wait for a round that carries the other runs'
    /// launches on the same weights too (the driver, not the run, counts as
    /// the thread launching on the backend).
    pub fn batched(rounds: Arc<Rounds>, limit: u64, guest_memory_bytes: u64) -> Self {
        Self::on(
            rounds.backend().clone(),
            Some(rounds),
            limit,
            guest_memory_bytes,
        )
    }

    fn on(
        backend: Arc<dyn Backend>,
        rounds: Option<Arc<Rounds>>,
        limit: u64,
        guest_memory_bytes: u64,
    ) -> Self {
        AccelCtx {
            _run: rounds.is_none().then(|| RunOnBackend::new(backend.clone())),
            backend,
            rounds,
            matmul_steps: 0,
            table: ResourceTable::new(),
            live: 0,
            in_use: 0,
            limit,
            guest_memory_bytes,
            launches: 0,
            deadline: None,
        }
    }

    /// `matmul_many(x, ws)` on the backend, or as a launch in the next round
    /// on `ws` when the run is batched and the launch is decode-sized (the
    /// run is suspended until then).
    async fn multiply(
        &mut self,
        x: &DeviceBuffer,
        ws: Vec<(Arc<DeviceBuffer>, usize)>,
        m: usize,
        k: usize,
    ) -> Result<Vec<DeviceBuffer>, BackendError> {
        let step = self.matmul_steps;
        self.matmul_steps += 1;
        let want = ws.len();
        let out = if let Some(rounds) = &self.rounds
            && let DeviceBuffer::F32(xs) = x
            && rounds.takes(x, m)
        {
            rounds.launch(xs.clone(), ws, m, k, step).await?
        } else {
            let pairs: Vec<(&DeviceBuffer, usize)> = ws.iter().map(|(w, n)| (&**w, *n)).collect();
            match pairs.as_slice() {
                [(w, n)] => vec![self.backend.matmul(x, w, m, k, *n)?],
                _ => self.backend.matmul_many(x, &pairs, m, k)?,
            }
        };
        // One result per matrix, whoever computed them.
        if out.len() != want {
            return Err(miscounted(want, out.len()));
        }
        Ok(out)
    }

    /// [`multiply`](Self::multiply) by exactly `N` matrices, as an array.
    async fn multiply_n<const N: usize>(
        &mut self,
        x: &DeviceBuffer,
        ws: [(Arc<DeviceBuffer>, usize); N],
        m: usize,
        k: usize,
    ) -> Result<[DeviceBuffer; N], BackendError> {
        let out = self.multiply(x, ws.into(), m, k).await?;
        <[DeviceBuffer; N]>::try_from(out).map_err(|out| miscounted(N, out.len()))
    }

    /// `x · wᵀ + r` on checked buffers: through the next round when the run
    /// is batched and the launch is decode-sized (the product from the round,
    /// then the residual add: what the fused kernel computes, bit for bit,
    /// tested), else the backend's fused kernel.
    async fn matmul_add_launch(
        &mut self,
        x: &DeviceBuffer,
        w: Arc<DeviceBuffer>,
        r: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        self.launches += 1;
        if self
            .rounds
            .as_ref()
            .is_some_and(|rounds| rounds.takes(x, m))
        {
            let [p] = self.multiply_n(x, [(w, n)], m, k).await?;
            self.backend.binary(BinaryOp::Add, r, &p, n)
        } else {
            self.matmul_steps += 1;
            self.backend.matmul_add(x, &w, r, m, k, n)
        }
    }

    /// Refuses (traps) launches that could not finish before `end`.
    pub fn with_deadline(mut self, end: std::time::Instant) -> Self {
        self.deadline = Some(end);
        self
    }

    /// A trap if `work` multiply-adds cannot finish before the deadline.
    fn check_deadline(&self, work: u128) -> wasmtime::Result<()> {
        let Some(end) = self.deadline else {
            return Ok(());
        };
        let left = end.saturating_duration_since(std::time::Instant::now());
        let allowed = left.as_secs_f64() * MIN_WORK_PER_SEC as f64;
        if work as f64 > allowed {
            return Err(wasmtime::Error::new(LaunchPastDeadline { work, left }));
        }
        Ok(())
    }

    /// Number of op launches so far.
    pub fn launches(&self) -> u64 {
        self.launches
    }

    /// Accelerator bytes held by live tensors.
    pub fn bytes_in_use(&self) -> u64 {
        self.in_use
    }

    fn get(&self, t: &Resource<Tensor>) -> wasmtime::Result<&Tensor> {
        self.table
            .get(t)
            .map_err(|_| wasmtime::Error::new(PolicyViolation::BadHandle("tensor")))
    }

    fn get_mut(&mut self, t: &Resource<Tensor>) -> wasmtime::Result<&mut Tensor> {
        self.table
            .get_mut(t)
            .map_err(|_| wasmtime::Error::new(PolicyViolation::BadHandle("tensor")))
    }

    /// Checks that `bytes` more fit in the budget.
    fn reserve(&self, bytes: u64) -> Result<(), AccelError> {
        if self.live >= MAX_TENSORS || self.in_use.saturating_add(bytes) > self.limit {
            return Err(AccelError::OutOfMemory);
        }
        Ok(())
    }

    /// Validates `shape` for element type `ty` and checks room for it.
    pub(crate) fn check_alloc(&self, shape: &[u32], ty: ElemType) -> Result<(), AccelError> {
        let elems = numel(shape)? as u64;
        if ty.is_quantized() && !last_dim(shape).is_multiple_of(32) {
            return Err(AccelError::ShapeMismatch);
        }
        self.reserve(ty.bytes(elems))
    }

    /// Registers a new tensor. `buf` must hold exactly `shape`'s elements.
    pub(crate) fn insert(
        &mut self,
        shape: Vec<u32>,
        buf: DeviceBuffer,
        downloadable: bool,
    ) -> wasmtime::Result<Result<Resource<Tensor>, AccelError>> {
        self.insert_shared(shape, Arc::new(buf), downloadable)
    }

    /// Registers a tensor over a buffer that may be shared (resident weights).
    pub(crate) fn insert_shared(
        &mut self,
        shape: Vec<u32>,
        buf: Arc<DeviceBuffer>,
        downloadable: bool,
    ) -> wasmtime::Result<Result<Resource<Tensor>, AccelError>> {
        let ty = buf.elem_type();
        guest_try!(self.check_alloc(&shape, ty));
        let elems = numel(&shape).unwrap_or(0);
        if buf.elems() != elems {
            return Err(wasmtime::Error::msg(
                "accelerator: buffer does not match its shape",
            ));
        }
        let bytes = ty.bytes(elems as u64);
        let res = self.table.push(Tensor {
            shape,
            buf,
            bytes,
            downloadable,
        })?;
        self.in_use += bytes;
        self.live += 1;
        Ok(Ok(res))
    }

    pub(crate) fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Runs an op producing an f32 tensor of `shape`: reserves, computes, registers.
    fn produce(
        &mut self,
        shape: Vec<u32>,
        compute: impl FnOnce(&Self) -> Result<DeviceBuffer, BackendError>,
    ) -> OpResult<Resource<Tensor>> {
        self.produce_as(shape, ElemType::F32, true, compute)
    }

    fn produce_as(
        &mut self,
        shape: Vec<u32>,
        ty: ElemType,
        downloadable: bool,
        compute: impl FnOnce(&Self) -> Result<DeviceBuffer, BackendError>,
    ) -> OpResult<Resource<Tensor>> {
        guest_try!(self.check_alloc(&shape, ty));
        self.launches += 1;
        let buf = backend_try!(compute(self));
        self.insert(shape, buf, downloadable)
    }

    /// Shape of an operand of one of the element types `allowed`, or the guest error.
    fn operand(
        &self,
        t: &Resource<Tensor>,
        allowed: &[ElemType],
    ) -> wasmtime::Result<Result<(Vec<u32>, ElemType), AccelError>> {
        let t = self.get(t)?;
        let ty = t.buf.elem_type();
        if !allowed.contains(&ty) {
            return Ok(Err(AccelError::DtypeMismatch));
        }
        Ok(Ok((t.shape.clone(), ty)))
    }

    /// `(m, k, n)` of `x · wᵀ` for `x` of shape `sx` (f32, checked by the
    /// caller) and weights `w` of any element type, with the work cap: the
    /// checks of `matmul`, and of each matrix of `matmul-many`.
    fn matmul_shape(
        &self,
        sx: &[u32],
        w: &Resource<Tensor>,
    ) -> wasmtime::Result<Result<(usize, usize, usize), AccelError>> {
        let (sw, wty) = guest_try!(self.operand(
            w,
            &[ElemType::F32, ElemType::F16, ElemType::Q4_1, ElemType::Q8_0]
        )?);
        let ([m, k], [n, kw]) = (sx, sw.as_slice()) else {
            return Ok(Err(AccelError::ShapeMismatch));
        };
        if k != kw || (wty.is_quantized() && k % 32 != 0) {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        let (m, k, n) = (*m as usize, *k as usize, *n as usize);
        if (m as u64) * (k as u64) * (n as u64) > MAX_LAUNCH_WORK {
            return Ok(Err(AccelError::InvalidArgument));
        }
        Ok(Ok((m, k, n)))
    }

    fn f32_operand(&self, t: &Resource<Tensor>) -> wasmtime::Result<Result<Vec<u32>, AccelError>> {
        Ok(self.operand(t, &[ElemType::F32])?.map(|(s, _)| s))
    }

    fn binary(
        &mut self,
        op: BinaryOp,
        a: Resource<Tensor>,
        b: Resource<Tensor>,
    ) -> OpResult<Resource<Tensor>> {
        let sa = guest_try!(self.f32_operand(&a)?);
        let sb = guest_try!(self.f32_operand(&b)?);
        let cols = last_dim(&sa);
        if sb != sa && sb != [cols as u32] {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        let (a, b) = (a.rep(), b.rep());
        self.produce(sa, |c| {
            let (ta, tb) = (c.buf_by_rep(a), c.buf_by_rep(b));
            c.backend.binary(op, ta, tb, cols)
        })
    }

    /// `matmul-many`, on `rmsnorm(x, weight, eps)` when `norm` is given.
    async fn matmul_many_launch(
        &mut self,
        x: Resource<Tensor>,
        norm: Option<(Resource<Tensor>, f32)>,
        ws: Vec<Resource<Tensor>>,
    ) -> OpResult<Vec<Resource<Tensor>>> {
        if ws.is_empty() || ws.len() > MAX_MATMUL_MANY {
            return Ok(Err(AccelError::InvalidArgument));
        }
        let sx = guest_try!(self.f32_operand(&x)?);
        if let Some((weight, eps)) = &norm {
            guest_try!(self.norm_args(&sx, weight, *eps)?);
        }
        // Every check a separate `matmul` makes, for each matrix, before anything runs.
        // (`sx` is the same for every matrix, so m and k are too.)
        let mut shapes = Vec::with_capacity(ws.len());
        for w in &ws {
            shapes.push(guest_try!(self.matmul_shape(&sx, w)?));
        }
        let (m, k) = (shapes[0].0, shapes[0].1);
        let ns: Vec<usize> = shapes.iter().map(|s| s.2).collect();
        let work = ns
            .iter()
            .map(|&n| (m as u128) * (k as u128) * (n as u128))
            .sum::<u128>();
        // The outputs must fit together, not just one by one.
        let total = ns.iter().map(|n| m as u64 * *n as u64).sum::<u64>();
        if self.live + ns.len() > MAX_TENSORS {
            return Ok(Err(AccelError::OutOfMemory));
        }
        // With a norm, the normalised `x` is a temporary beside the outputs.
        let temp = if norm.is_some() { (m * k) as u64 } else { 0 };
        guest_try!(self.reserve(ElemType::F32.bytes(total + temp)));
        self.check_deadline(work)?;
        let bufs = {
            let xb = self.get(&x)?.buf.clone();
            let wbs = ws
                .iter()
                .zip(&ns)
                .map(|(w, n)| Ok((self.get(w)?.buf.clone(), *n)))
                .collect::<wasmtime::Result<Vec<_>>>()?;
            self.launches += 1;
            match &norm {
                None => backend_try!(self.multiply(&xb, wbs, m, k).await),
                Some((weight, eps)) => {
                    let h =
                        backend_try!(self.backend.rmsnorm(&xb, &self.get(weight)?.buf, k, *eps));
                    backend_try!(self.multiply(&h, wbs, m, k).await)
                }
            }
        };
        let mut out = Vec::with_capacity(ns.len());
        for (buf, n) in bufs.into_iter().zip(ns) {
            match self.insert(vec![m as u32, n as u32], buf, true)? {
                Ok(t) => out.push(t),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(out))
    }

    /// The checks of `rmsnorm` on `x` of shape `sx`: `weight` f32 [d] for
    /// `x`'s last dimension d, `eps` finite and not negative.
    fn norm_args(
        &self,
        sx: &[u32],
        weight: &Resource<Tensor>,
        eps: f32,
    ) -> wasmtime::Result<Result<(), AccelError>> {
        let sw = guest_try!(self.f32_operand(weight)?);
        if sw != [last_dim(sx) as u32] {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        if !eps.is_finite() || eps < 0.0 {
            return Ok(Err(AccelError::InvalidArgument));
        }
        Ok(Ok(()))
    }

    /// The shapes of attention's q, k and k-cache, with the checks both
    /// attention launches make: q, k, v f32; caches f32 or f16 of one type;
    /// v shaped as k and the v-cache as the k-cache.
    fn attention_operands(
        &self,
        q: &Resource<Tensor>,
        k: &Resource<Tensor>,
        v: &Resource<Tensor>,
        k_cache: &Resource<Tensor>,
        v_cache: &Resource<Tensor>,
    ) -> OpResult<(Vec<u32>, Vec<u32>, Vec<u32>)> {
        let sq = guest_try!(self.f32_operand(q)?);
        let sk = guest_try!(self.f32_operand(k)?);
        let sv = guest_try!(self.f32_operand(v)?);
        let (skc, kty) = guest_try!(self.operand(k_cache, &[ElemType::F32, ElemType::F16])?);
        let (svc, vty) = guest_try!(self.operand(v_cache, &[ElemType::F32, ElemType::F16])?);
        if sv != sk || svc != skc || kty != vty {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        Ok(Ok((sq, sk, skc)))
    }

    /// The cache checks of an attention launch on caches of `ctx` rows:
    /// neither cache aliases the other or an operand (`inputs`, handle
    /// numbers), both writable, the visible rows within the caches and
    /// [`MAX_CONTEXT`], the work cap. Returns the launch's work.
    fn cache_args(
        &self,
        inputs: &[u32],
        k_cache: &Resource<Tensor>,
        v_cache: &Resource<Tensor>,
        ctx: u32,
        shape: &AttentionShape,
    ) -> OpResult<u128> {
        let (kr, vr) = (k_cache.rep(), v_cache.rep());
        let caches_aliased = kr == vr || inputs.contains(&kr) || inputs.contains(&vr);
        let caches_writable = self.get(k_cache)?.downloadable && self.get(v_cache)?.downloadable;
        let (seq, pos) = (shape.seq as u32, shape.pos as u32);
        let visible = pos.checked_add(seq);
        if caches_aliased
            || !caches_writable
            || visible.is_none_or(|end| end > ctx || end > MAX_CONTEXT)
        {
            return Ok(Err(AccelError::InvalidArgument));
        }
        // Per visible row: a dot product and a weighted sum of head_dim each,
        // plus a constant for the softmax and conversions.
        let work = u128::from(seq)
            * u128::from(pos + seq)
            * shape.heads as u128
            * (2 * shape.head_dim as u128 + 16);
        if work > u128::from(MAX_LAUNCH_WORK) {
            return Ok(Err(AccelError::InvalidArgument));
        }
        Ok(Ok(work))
    }

    /// Runs `attention` on checked operands `[q, k, v, k-cache, v-cache]`
    /// (caches of `ctx` rows), rotating q and k first when `rope` gives a
    /// theta: the cache checks, the work cap and the launch.
    fn attention_launch(
        &mut self,
        operands: [Resource<Tensor>; 5],
        ctx: u32,
        shape: AttentionShape,
        rope: Option<f32>,
        out_shape: Vec<u32>,
    ) -> OpResult<Resource<Tensor>> {
        let [q, k, v, k_cache, v_cache] = operands;
        let inputs = [q.rep(), k.rep(), v.rep()];
        let work = guest_try!(self.cache_args(&inputs, &k_cache, &v_cache, ctx, &shape)?);
        self.check_deadline(work)?;
        guest_try!(self.check_alloc(&out_shape, ElemType::F32));
        if rope.is_some() {
            // The rotated q and k are temporaries beside the result.
            let q_elems = numel(&out_shape).unwrap_or(0) as u64;
            let k_elems = (shape.seq * shape.kv_heads * shape.head_dim) as u64;
            guest_try!(self.reserve(ElemType::F32.bytes(2 * q_elems + k_elems)));
        }
        let [qb, kb, vb] = [&q, &k, &v].map(|t| self.get(t).map(|t| t.buf.clone()));
        let (qb, kb, vb) = (qb?, kb?, vb?);
        let out = backend_try!(self.attend(&qb, &kb, &vb, &k_cache, &v_cache, shape, rope)?);
        self.insert(out_shape, out, true)
    }

    /// Attention on checked buffers, after RoPE on q and k when `rope` gives
    /// a theta, writing k and v into the caches.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        q: &DeviceBuffer,
        k: &DeviceBuffer,
        v: &DeviceBuffer,
        k_cache: &Resource<Tensor>,
        v_cache: &Resource<Tensor>,
        shape: AttentionShape,
        rope: Option<f32>,
    ) -> wasmtime::Result<Result<DeviceBuffer, BackendError>> {
        // Take the caches out of the table while the kernel writes them
        // (they are activations, never shared, so make_mut does not copy).
        let empty = || Arc::new(DeviceBuffer::F32(Vec::new()));
        let mut kc = std::mem::replace(&mut self.get_mut(k_cache)?.buf, empty());
        let mut vc = std::mem::replace(&mut self.get_mut(v_cache)?.buf, empty());
        self.launches += 1;
        let (kcb, vcb) = (Arc::make_mut(&mut kc), Arc::make_mut(&mut vc));
        let result = match rope {
            None => self.backend.attention(q, k, v, kcb, vcb, shape),
            Some(theta) => (|| {
                let (hd, p) = (shape.head_dim, shape.pos as u32);
                let qr = self.backend.rope(q, shape.heads, hd, p, theta)?;
                let kr = self.backend.rope(k, shape.kv_heads, hd, p, theta)?;
                self.backend.attention(&qr, &kr, v, kcb, vcb, shape)
            })(),
        };
        self.get_mut(k_cache)?.buf = kc;
        self.get_mut(v_cache)?.buf = vc;
        Ok(result)
    }

    /// Every check the six launches of `decoder-layer` make one by one,
    /// made before any of them runs, so that a refused layer changes nothing
    /// (its caches included), and room for every intermediate at once (a
    /// bound on the peak) and the output. The caller checks the deadline
    /// against the plan's `work`.
    #[allow(clippy::too_many_arguments)]
    fn layer_plan(
        &self,
        x: &Resource<Tensor>,
        ws: &[Resource<Tensor>; 9],
        k_cache: &Resource<Tensor>,
        v_cache: &Resource<Tensor>,
        pos: u32,
        eps: f32,
        theta: f32,
    ) -> OpResult<LayerPlan> {
        let [attn_norm, wq, wk, wv, wo, ffn_norm, gate, up, down] = ws;
        let sx = guest_try!(self.f32_operand(x)?);
        guest_try!(self.norm_args(&sx, attn_norm, eps)?);
        let (m, dim, nq) = guest_try!(self.matmul_shape(&sx, wq)?);
        let (_, _, nk) = guest_try!(self.matmul_shape(&sx, wk)?);
        let (_, _, nv) = guest_try!(self.matmul_shape(&sx, wv)?);
        let (skc, kty) = guest_try!(self.operand(k_cache, &[ElemType::F32, ElemType::F16])?);
        let (svc, vty) = guest_try!(self.operand(v_cache, &[ElemType::F32, ElemType::F16])?);
        let [ctx, kvh, hd] = skc.as_slice() else {
            return Ok(Err(AccelError::ShapeMismatch));
        };
        let (ctx, kvh, hd) = (*ctx, *kvh as usize, *hd as usize);
        if nv != nk
            || svc != skc
            || kty != vty
            || hd % 2 != 0
            || nq % hd != 0
            || nk != kvh * hd
            || (nq / hd) % kvh != 0
        {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        if !rope_theta_ok(theta) {
            return Ok(Err(AccelError::InvalidArgument));
        }
        let shape = AttentionShape {
            seq: m,
            heads: nq / hd,
            kv_heads: kvh,
            head_dim: hd,
            pos: pos as usize,
        };
        let attention = guest_try!(self.cache_args(&[], k_cache, v_cache, ctx, &shape)?);
        let (_, _, no) = guest_try!(self.matmul_shape(&[m as u32, nq as u32], wo)?);
        guest_try!(self.norm_args(&sx, ffn_norm, eps)?);
        let (_, _, ffn) = guest_try!(self.matmul_shape(&sx, gate)?);
        let (_, _, nu) = guest_try!(self.matmul_shape(&sx, up)?);
        let (_, _, nd) = guest_try!(self.matmul_shape(&[m as u32, ffn as u32], down)?);
        // The residuals have x's shape; silu-mul takes gate and up alike.
        if no != dim || nu != ffn || nd != dim {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        let [m, d, q, kv, f] = [m, dim, nq, nk, ffn].map(|n| n as u64);
        // normed x, q k v, rotated q k, attention, h and its product, normed
        // h, gate and up, silu-mul, the output and its product.
        let elems = m * (d + (q + 2 * kv) + (q + kv) + q + 2 * d + d + 2 * f + f + 2 * d);
        guest_try!(self.reserve(ElemType::F32.bytes(elems)));
        let [m, d, q, kv, f] = [m, d, q, kv, f].map(u128::from);
        let matmuls = m * d * (q + 2 * kv) + m * q * d + m * d * 2 * f + m * f * d;
        Ok(Ok(LayerPlan {
            m: m as usize,
            dim,
            ffn,
            shape,
            work: matmuls + attention + 2 * m * d,
        }))
    }

    /// The six launches of a planned decoder layer on `x`, on buffers:
    /// norm-matmul-many (Q, K, V), rope-attention, matmul-add (output +
    /// residual), norm-matmul-many (gate, up), silu-mul, matmul-add (down +
    /// residual). Intermediates never enter the tensor table; the plan
    /// checked room for them. A backend failure is the guest's out-of-memory
    /// or a trap, as for any launch (`backend_err`).
    async fn layer_run(
        &mut self,
        x: &DeviceBuffer,
        ws: &[Resource<Tensor>; 9],
        [k_cache, v_cache]: [&Resource<Tensor>; 2],
        l: &LayerPlan,
        eps: f32,
        theta: f32,
    ) -> OpResult<DeviceBuffer> {
        let (m, dim, ffn) = (l.m, l.dim, l.ffn);
        let (nq, nkv) = (
            l.shape.heads * l.shape.head_dim,
            l.shape.kv_heads * l.shape.head_dim,
        );
        let [attn_norm, wq, wk, wv, wo, ffn_norm, gate, up, down] =
            ws.each_ref().map(|w| self.get(w).map(|t| t.buf.clone()));
        let (attn_norm, ffn_norm) = (attn_norm?, ffn_norm?);
        self.launches += 1;
        let h = backend_try!(self.backend.rmsnorm(x, &attn_norm, dim, eps));
        let qkv = [(wq?, nq), (wk?, nkv), (wv?, nkv)];
        let [q, k, v] = backend_try!(self.multiply_n(&h, qkv, m, dim).await);
        let a = backend_try!(self.attend(&q, &k, &v, k_cache, v_cache, l.shape, Some(theta))?);
        let h = backend_try!(self.matmul_add_launch(&a, wo?, x, m, nq, dim).await);
        self.launches += 1;
        let n = backend_try!(self.backend.rmsnorm(&h, &ffn_norm, dim, eps));
        let [g, u] = backend_try!(
            self.multiply_n(&n, [(gate?, ffn), (up?, ffn)], m, dim)
                .await
        );
        self.launches += 1;
        let s = backend_try!(self.backend.silu_mul(&g, &u));
        let out = backend_try!(self.matmul_add_launch(&s, down?, &h, m, ffn, dim).await);
        Ok(Ok(out))
    }

    /// The buffer of a live tensor by handle number (validated by the caller).
    fn buf_by_rep(&self, rep: u32) -> &DeviceBuffer {
        match self.table.get(&Resource::<Tensor>::new_borrow(rep)) {
            Ok(t) => &t.buf,
            // Unreachable: every caller looked the handle up first.
            Err(_) => &EMPTY,
        }
    }

    fn unary(
        &mut self,
        x: Resource<Tensor>,
        f: impl FnOnce(&dyn Backend, &DeviceBuffer, usize) -> Result<DeviceBuffer, BackendError>,
    ) -> OpResult<Resource<Tensor>> {
        let shape = guest_try!(self.f32_operand(&x)?);
        let cols = last_dim(&shape);
        let rep = x.rep();
        self.produce(shape, |c| f(c.backend.as_ref(), c.buf_by_rep(rep), cols))
    }
}

static EMPTY: DeviceBuffer = DeviceBuffer::F32(Vec::new());

impl HostTensor for AccelCtx {
    fn shape(&mut self, t: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.get(&t)?.shape.clone())
    }

    fn dtype(&mut self, t: Resource<Tensor>) -> wasmtime::Result<Dtype> {
        Ok(dtype(self.get(&t)?.buf.elem_type()))
    }

    fn drop(&mut self, t: Resource<Tensor>) -> wasmtime::Result<()> {
        let t = self
            .table
            .delete(t)
            .map_err(|_| wasmtime::Error::new(PolicyViolation::BadHandle("tensor")))?;
        self.in_use -= t.bytes;
        self.live -= 1;
        Ok(())
    }
}

impl Host for AccelCtx {
    fn zeros(&mut self, ty: Dtype, shape: Vec<u32>) -> OpResult<Resource<Tensor>> {
        let ty = elem_type(ty);
        if ty.is_quantized() {
            return Ok(Err(AccelError::DtypeMismatch));
        }
        let n = guest_try!(numel(&shape));
        self.produce_as(shape, ty, true, |c| c.backend.zeros(ty, n))
    }

    fn upload(&mut self, shape: Vec<u32>, data: Vec<f32>) -> OpResult<Resource<Tensor>> {
        let n = guest_try!(numel(&shape));
        if n != data.len() {
            return Ok(Err(AccelError::LengthMismatch));
        }
        self.produce(shape, |c| c.backend.upload(&data))
    }

    fn download(&mut self, t: Resource<Tensor>) -> OpResult<Vec<f32>> {
        let tensor = self.get(&t)?;
        if !tensor.downloadable {
            return Ok(Err(AccelError::NotDownloadable));
        }
        let (shape, _) = guest_try!(self.operand(&t, &[ElemType::F32, ElemType::F16])?);
        // The copy lands in guest memory: refuse before building it on the host
        // when it cannot fit there.
        let bytes = numel(&shape).unwrap_or(0) as u64 * 4;
        if bytes > self.guest_memory_bytes {
            return Ok(Err(AccelError::OutOfMemory));
        }
        Ok(Ok(backend_try!(self.backend.download(&self.get(&t)?.buf))))
    }

    fn reshape(&mut self, x: Resource<Tensor>, shape: Vec<u32>) -> OpResult<Resource<Tensor>> {
        let (sx, _) = guest_try!(self.operand(&x, &[ElemType::F32, ElemType::F16])?);
        let n = guest_try!(numel(&shape));
        if n != numel(&sx).unwrap_or(0) {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        // Row-major data does not move: the new tensor shares the buffer
        // (copy-on-write: an attention cache write copies a shared buffer first).
        let src = self.get(&x)?;
        let (buf, downloadable) = (src.buf.clone(), src.downloadable);
        self.launches += 1;
        self.insert_shared(shape, buf, downloadable)
    }

    fn rows(&mut self, x: Resource<Tensor>, start: u32, count: u32) -> OpResult<Resource<Tensor>> {
        let (sx, ty) = guest_try!(self.operand(&x, &[ElemType::F32, ElemType::F16])?);
        let cols = last_dim(&sx);
        let total_rows = numel(&sx).unwrap_or(0) / cols;
        if count == 0 || (start as usize).saturating_add(count as usize) > total_rows {
            return Ok(Err(AccelError::InvalidArgument));
        }
        let downloadable = self.get(&x)?.downloadable;
        let range = start as usize * cols..(start as usize + count as usize) * cols;
        let rep = x.rep();
        self.produce_as(vec![count, cols as u32], ty, downloadable, |c| {
            c.backend.copy_range(c.buf_by_rep(rep), range)
        })
    }

    async fn matmul(
        &mut self,
        x: Resource<Tensor>,
        w: Resource<Tensor>,
    ) -> OpResult<Resource<Tensor>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        let (m, k, n) = guest_try!(self.matmul_shape(&sx, &w)?);
        self.check_deadline((m as u128) * (k as u128) * (n as u128))?;
        let shape = vec![m as u32, n as u32];
        guest_try!(self.check_alloc(&shape, ElemType::F32));
        let (xb, wb) = (self.get(&x)?.buf.clone(), self.get(&w)?.buf.clone());
        self.launches += 1;
        let [buf] = backend_try!(self.multiply_n(&xb, [(wb, n)], m, k).await);
        self.insert(shape, buf, true)
    }

    async fn matmul_many(
        &mut self,
        x: Resource<Tensor>,
        ws: Vec<Resource<Tensor>>,
    ) -> OpResult<Vec<Resource<Tensor>>> {
        self.matmul_many_launch(x, None, ws).await
    }

    async fn norm_matmul_many(
        &mut self,
        x: Resource<Tensor>,
        weight: Resource<Tensor>,
        eps: f32,
        ws: Vec<Resource<Tensor>>,
    ) -> OpResult<Vec<Resource<Tensor>>> {
        self.matmul_many_launch(x, Some((weight, eps)), ws).await
    }

    async fn matmul_add(
        &mut self,
        x: Resource<Tensor>,
        w: Resource<Tensor>,
        r: Resource<Tensor>,
    ) -> OpResult<Resource<Tensor>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        let (m, k, n) = guest_try!(self.matmul_shape(&sx, &w)?);
        let sr = guest_try!(self.f32_operand(&r)?);
        if sr != [m as u32, n as u32] {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        // The product is a temporary beside the result.
        guest_try!(self.reserve(ElemType::F32.bytes(2 * (m * n) as u64)));
        self.check_deadline((m as u128) * (k as u128) * (n as u128) + (m * n) as u128)?;
        let (xb, wb, rb) = (
            self.get(&x)?.buf.clone(),
            self.get(&w)?.buf.clone(),
            self.get(&r)?.buf.clone(),
        );
        let buf = backend_try!(self.matmul_add_launch(&xb, wb, &rb, m, k, n).await);
        self.insert(sr, buf, true)
    }

    async fn decoder_layer(
        &mut self,
        x: Resource<Tensor>,
        ws: Vec<Resource<Tensor>>,
        k_cache: Resource<Tensor>,
        v_cache: Resource<Tensor>,
        pos: u32,
        eps: f32,
        theta: f32,
    ) -> OpResult<Resource<Tensor>> {
        let Ok(ws) = <[Resource<Tensor>; 9]>::try_from(ws) else {
            return Ok(Err(AccelError::InvalidArgument));
        };
        let l = guest_try!(self.layer_plan(&x, &ws, &k_cache, &v_cache, pos, eps, theta)?);
        self.check_deadline(l.work)?;
        let xb = self.get(&x)?.buf.clone();
        let out = guest_try!(
            self.layer_run(&xb, &ws, [&k_cache, &v_cache], &l, eps, theta)
                .await?
        );
        self.insert(vec![l.m as u32, l.dim as u32], out, true)
    }

    async fn decoder_stack(
        &mut self,
        x: Resource<Tensor>,
        ws: Vec<Resource<Tensor>>,
        caches: Vec<Resource<Tensor>>,
        pos: u32,
        eps: f32,
        theta: f32,
    ) -> OpResult<Resource<Tensor>> {
        // Layer i: the weights ws[9i..9i+9], the caches caches[2i..2i+2].
        let (layer_ws, ws_rest) = ws.as_chunks::<9>();
        let (layer_caches, caches_rest) = caches.as_chunks::<2>();
        let layers = layer_caches.len();
        if layers == 0
            || layers > MAX_STACK_LAYERS
            || layer_ws.len() != layers
            || !ws_rest.is_empty()
            || !caches_rest.is_empty()
        {
            return Ok(Err(AccelError::InvalidArgument));
        }
        // Every layer checked (against x's shape, which each layer keeps)
        // before any launch runs; the deadline against the whole stack.
        let mut plans = Vec::with_capacity(layers);
        for (w, [kc, vc]) in layer_ws.iter().zip(layer_caches) {
            plans.push(guest_try!(self.layer_plan(&x, w, kc, vc, pos, eps, theta)?));
        }
        self.check_deadline(plans.iter().map(|l| l.work).sum())?;
        let mut xb = self.get(&x)?.buf.clone();
        for ((w, c), l) in layer_ws.iter().zip(layer_caches).zip(&plans) {
            let c = c.each_ref();
            xb = Arc::new(guest_try!(self.layer_run(&xb, w, c, l, eps, theta).await?));
        }
        let shape = vec![plans[0].m as u32, plans[0].dim as u32];
        self.insert_shared(shape, xb, true)
    }

    fn embedding(&mut self, table: Resource<Tensor>, ids: Vec<u32>) -> OpResult<Resource<Tensor>> {
        let (st, _) = guest_try!(self.operand(
            &table,
            &[ElemType::F32, ElemType::F16, ElemType::Q4_1, ElemType::Q8_0]
        )?);
        let [rows, d] = st.as_slice() else {
            return Ok(Err(AccelError::ShapeMismatch));
        };
        if ids.is_empty() || ids.len() > u32::MAX as usize || ids.iter().any(|i| i >= rows) {
            return Ok(Err(AccelError::InvalidArgument));
        }
        let (d, tr) = (*d as usize, table.rep());
        self.produce(vec![ids.len() as u32, d as u32], |c| {
            c.backend.embedding(c.buf_by_rep(tr), d, &ids)
        })
    }

    fn attention(
        &mut self,
        q: Resource<Tensor>,
        k: Resource<Tensor>,
        v: Resource<Tensor>,
        k_cache: Resource<Tensor>,
        v_cache: Resource<Tensor>,
        pos: u32,
    ) -> OpResult<Resource<Tensor>> {
        let (sq, sk, skc) = guest_try!(self.attention_operands(&q, &k, &v, &k_cache, &v_cache)?);
        let ([seq, heads, hd], [kseq, kvh, khd], [_, ckvh, chd]) =
            (sq.as_slice(), sk.as_slice(), skc.as_slice())
        else {
            return Ok(Err(AccelError::ShapeMismatch));
        };
        if kseq != seq || khd != hd || chd != hd || ckvh != kvh || heads % kvh != 0 {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        let shape = AttentionShape {
            seq: *seq as usize,
            heads: *heads as usize,
            kv_heads: *kvh as usize,
            head_dim: *hd as usize,
            pos: pos as usize,
        };
        let operands = [q, k, v, k_cache, v_cache];
        self.attention_launch(operands, skc[0], shape, None, sq.clone())
    }

    fn rope_attention(
        &mut self,
        q: Resource<Tensor>,
        k: Resource<Tensor>,
        v: Resource<Tensor>,
        k_cache: Resource<Tensor>,
        v_cache: Resource<Tensor>,
        pos: u32,
        theta: f32,
    ) -> OpResult<Resource<Tensor>> {
        let (sq, sk, skc) = guest_try!(self.attention_operands(&q, &k, &v, &k_cache, &v_cache)?);
        let ([seq, qcols], [kseq, kcols], [ctx, kvh, hd]) =
            (sq.as_slice(), sk.as_slice(), skc.as_slice())
        else {
            return Ok(Err(AccelError::ShapeMismatch));
        };
        let heads = qcols / hd;
        if kseq != seq
            || hd % 2 != 0
            || qcols % hd != 0
            || u64::from(*kcols) != u64::from(*kvh) * u64::from(*hd)
            || heads % kvh != 0
        {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        if !rope_theta_ok(theta) {
            return Ok(Err(AccelError::InvalidArgument));
        }
        let shape = AttentionShape {
            seq: *seq as usize,
            heads: heads as usize,
            kv_heads: *kvh as usize,
            head_dim: *hd as usize,
            pos: pos as usize,
        };
        let operands = [q, k, v, k_cache, v_cache];
        self.attention_launch(operands, *ctx, shape, Some(theta), sq.clone())
    }

    fn add(&mut self, a: Resource<Tensor>, b: Resource<Tensor>) -> OpResult<Resource<Tensor>> {
        self.binary(BinaryOp::Add, a, b)
    }

    fn mul(&mut self, a: Resource<Tensor>, b: Resource<Tensor>) -> OpResult<Resource<Tensor>> {
        self.binary(BinaryOp::Mul, a, b)
    }

    fn rmsnorm(
        &mut self,
        x: Resource<Tensor>,
        weight: Resource<Tensor>,
        eps: f32,
    ) -> OpResult<Resource<Tensor>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        guest_try!(self.norm_args(&sx, &weight, eps)?);
        let cols = last_dim(&sx);
        let (xr, wr) = (x.rep(), weight.rep());
        self.produce(sx, |c| {
            c.backend
                .rmsnorm(c.buf_by_rep(xr), c.buf_by_rep(wr), cols, eps)
        })
    }

    fn softmax(&mut self, x: Resource<Tensor>) -> OpResult<Resource<Tensor>> {
        self.unary(x, |b, buf, cols| b.softmax(buf, cols))
    }

    fn silu(&mut self, x: Resource<Tensor>) -> OpResult<Resource<Tensor>> {
        self.unary(x, |b, buf, _| b.silu(buf))
    }

    fn silu_mul(
        &mut self,
        gate: Resource<Tensor>,
        up: Resource<Tensor>,
    ) -> OpResult<Resource<Tensor>> {
        let sg = guest_try!(self.f32_operand(&gate)?);
        let su = guest_try!(self.f32_operand(&up)?);
        if su != sg {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        // silu(gate) may be a temporary beside the result (a backend without
        // a one-pass kernel): both must fit, as for matmul-add.
        let elems = numel(&sg).unwrap_or(0) as u64;
        guest_try!(self.reserve(ElemType::F32.bytes(2 * elems)));
        let (gr, ur) = (gate.rep(), up.rep());
        self.produce(sg, |c| {
            c.backend.silu_mul(c.buf_by_rep(gr), c.buf_by_rep(ur))
        })
    }

    fn rope(&mut self, x: Resource<Tensor>, pos: u32, theta: f32) -> OpResult<Resource<Tensor>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        let [seq, heads, head_dim] = sx.as_slice() else {
            return Ok(Err(AccelError::ShapeMismatch));
        };
        if head_dim % 2 != 0 {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        if !rope_theta_ok(theta) || pos.checked_add(*seq).is_none() {
            return Ok(Err(AccelError::InvalidArgument));
        }
        let (heads, head_dim) = (*heads as usize, *head_dim as usize);
        self.unary(x, |b, buf, _| b.rope(buf, heads, head_dim, pos, theta))
    }

    fn argmax(&mut self, x: Resource<Tensor>) -> OpResult<Vec<u32>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        self.launches += 1;
        Ok(Ok(backend_try!(
            self.backend.argmax(&self.get(&x)?.buf, last_dim(&sx))
        )))
    }

    fn top_k(&mut self, x: Resource<Tensor>, k: u32) -> OpResult<Vec<(u32, f32)>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        if k == 0 {
            return Ok(Err(AccelError::InvalidArgument));
        }
        self.launches += 1;
        Ok(Ok(backend_try!(self.backend.top_k(
            &self.get(&x)?.buf,
            last_dim(&sx),
            k as usize
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    fn ctx(limit: u64) -> AccelCtx {
        AccelCtx::new(Arc::new(CpuBackend), limit, 1 << 30)
    }

    /// The output of a launch future that does not suspend (no rounds).
    fn now<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        match f
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("an unbatched launch suspended"),
        }
    }

    fn ok<T>(r: OpResult<T>) -> T {
        match r {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("guest error {e:?}"),
            Err(e) => panic!("trap {e}"),
        }
    }

    /// A launch that could not finish before the run's deadline traps at
    /// once with [`LaunchPastDeadline`] (the loader reports the deadline)
    /// instead of running past it; small launches still run.
    #[test]
    fn a_launch_that_would_overrun_the_deadline_is_not_started() {
        let end = std::time::Instant::now() + std::time::Duration::from_millis(200);
        let mut c = ctx(64 << 20).with_deadline(end);
        let x = ok(c.zeros(Dtype::F32, vec![256, 1024]));
        let w = ok(c.zeros(Dtype::F32, vec![1024, 1024]));
        let small = ok(c.zeros(Dtype::F32, vec![1, 1024]));
        // 1024 · 1024 multiply-adds: well within the time left.
        ok(now(c.matmul(borrow(&small), borrow(&w))));
        let launches = c.launches();
        // 2^28 multiply-adds need 268 ms at MIN_WORK_PER_SEC; 200 ms are left.
        let started = std::time::Instant::now();
        let trap = now(c.matmul(borrow(&x), borrow(&w))).expect_err("trap");
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
        let why = trap
            .downcast_ref::<LaunchPastDeadline>()
            .unwrap_or_else(|| panic!("not a deadline refusal: {trap}"));
        assert_eq!(why.work, 256 * 1024 * 1024);
        assert!(why.left <= std::time::Duration::from_millis(200), "{why}");
        assert_eq!(c.launches(), launches, "the refused launch ran");
        // Without a deadline the same launch is within the work cap and runs.
        let mut free = ctx(64 << 20);
        let x = ok(free.zeros(Dtype::F32, vec![256, 1024]));
        let w = ok(free.zeros(Dtype::F32, vec![1024, 1024]));
        ok(now(free.matmul(borrow(&x), borrow(&w))));
    }

    fn guest_err<T: std::fmt::Debug>(r: OpResult<T>) -> AccelError {
        match r {
            Ok(Err(e)) => e,
            other => panic!("expected a guest error, got {other:?}"),
        }
    }

    fn t(c: &mut AccelCtx, shape: &[u32], data: &[f32]) -> Resource<Tensor> {
        ok(c.upload(shape.to_vec(), data.to_vec()))
    }

    fn borrow(r: &Resource<Tensor>) -> Resource<Tensor> {
        Resource::new_borrow(r.rep())
    }

    /// A xorshift stream of values in [-1, 1] (deterministic test data).
    fn xorshift(mut seed: u64) -> impl FnMut(u32) -> Vec<f32> {
        move |n| {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 2001) as f32 / 1000.0 - 1.0
                })
                .collect()
        }
    }

    /// The shapes of a decoder layer's nine weights (`decoder-layer`'s order)
    /// for width `dim`, `kv` key/value columns and `ffn` hidden units.
    fn layer_shapes(dim: u32, kv: u32, ffn: u32) -> [Vec<u32>; 9] {
        [
            vec![dim],
            vec![dim, dim],
            vec![kv, dim],
            vec![kv, dim],
            vec![dim, dim],
            vec![dim],
            vec![ffn, dim],
            vec![ffn, dim],
            vec![dim, ffn],
        ]
    }

    /// `decoder-layer` is the six launches made one by one, bit for bit, on
    /// random weights of a small GQA layer, at two positions (the caches
    /// updated the same); it drops every intermediate; a wrong weight list
    /// or shape is refused with the reason a single launch gives.
    #[test]
    fn a_decoder_layer_is_its_six_launches_bit_for_bit() {
        // 4 query heads and 2 KV heads of 16.
        let (dim, kvh, hd, ffn, ctxlen) = (64u32, 2u32, 16u32, 96u32, 8u32);
        let mut rnd = xorshift(0x2545_f491_4f6c_dd1d);
        let mut one = ctx(64 << 20);
        let mut six = ctx(64 << 20);
        let shapes = layer_shapes(dim, kvh * hd, ffn);
        let data: Vec<Vec<f32>> = shapes.iter().map(|s| rnd(s.iter().product())).collect();
        let load = |c: &mut AccelCtx| -> Vec<Resource<Tensor>> {
            shapes.iter().zip(&data).map(|(s, d)| t(c, s, d)).collect()
        };
        let (w1, w6) = (load(&mut one), load(&mut six));
        let caches =
            |c: &mut AccelCtx| [0, 1].map(|_| ok(c.zeros(Dtype::F16, vec![ctxlen, kvh, hd])));
        let ([k1, v1], [k6, v6]) = (caches(&mut one), caches(&mut six));
        let (eps, theta) = (1e-5f32, 10000.0f32);
        let x0 = rnd(3 * dim);
        let (mut x1, mut x6) = (t(&mut one, &[3, dim], &x0), t(&mut six, &[3, dim], &x0));
        for (pos, seq) in [(0u32, 3u32), (3, 1)] {
            if pos > 0 {
                let next = rnd(dim);
                x1 = t(&mut one, &[seq, dim], &next);
                x6 = t(&mut six, &[seq, dim], &next);
            }
            let live = one.live;
            let got = ok(now(one.decoder_layer(
                borrow(&x1),
                w1.iter().map(borrow).collect(),
                borrow(&k1),
                borrow(&v1),
                pos,
                eps,
                theta,
            )));
            assert_eq!(one.live, live + 1, "only the output stays");
            let w = |i: usize| borrow(&w6[i]);
            let qkv = ok(now(six.norm_matmul_many(
                borrow(&x6),
                w(0),
                eps,
                vec![w(1), w(2), w(3)],
            )));
            let a = ok(six.rope_attention(
                borrow(&qkv[0]),
                borrow(&qkv[1]),
                borrow(&qkv[2]),
                borrow(&k6),
                borrow(&v6),
                pos,
                theta,
            ));
            let h = ok(now(six.matmul_add(borrow(&a), w(4), borrow(&x6))));
            let gu = ok(now(six.norm_matmul_many(
                borrow(&h),
                w(5),
                eps,
                vec![w(6), w(7)],
            )));
            let sm = ok(six.silu_mul(borrow(&gu[0]), borrow(&gu[1])));
            let want = ok(now(six.matmul_add(borrow(&sm), w(8), borrow(&h))));
            let bits = |c: &mut AccelCtx, r: &Resource<Tensor>| -> Vec<u32> {
                ok(c.download(borrow(r)))
                    .iter()
                    .map(|f| f.to_bits())
                    .collect()
            };
            assert_eq!(bits(&mut one, &got), bits(&mut six, &want), "pos {pos}");
        }
        assert_eq!(
            ok(one.download(borrow(&k1))),
            ok(six.download(borrow(&k6))),
            "the caches hold the same keys"
        );
        // Eight weights, or a weight of the wrong shape: refused, nothing kept.
        let live = one.live;
        let eight: Vec<Resource<Tensor>> = w1[..8].iter().map(borrow).collect();
        assert_eq!(
            guest_err(now(one.decoder_layer(
                borrow(&x1),
                eight,
                borrow(&k1),
                borrow(&v1),
                4,
                eps,
                theta
            ))),
            AccelError::InvalidArgument
        );
        // The wrong weight is the gate, checked after attention would have
        // run: the layer is refused before any launch, its caches unchanged.
        let caches_before = [&k1, &v1].map(|c| ok(one.download(borrow(c))));
        let mut swapped: Vec<Resource<Tensor>> = w1.iter().map(borrow).collect();
        swapped.swap(6, 8);
        assert_eq!(
            guest_err(now(one.decoder_layer(
                borrow(&x1),
                swapped,
                borrow(&k1),
                borrow(&v1),
                4,
                eps,
                theta
            ))),
            AccelError::ShapeMismatch
        );
        assert_eq!(one.live, live, "a refused layer leaves no tensor behind");
        assert_eq!(
            [&k1, &v1].map(|c| ok(one.download(borrow(c)))),
            caches_before,
            "a refused layer writes nothing into its caches"
        );
    }

    /// `decoder-stack` over three layers is `decoder-layer` three times, bit
    /// for bit (outputs and caches), at two positions; a stack with one bad
    /// layer, or lists of the wrong lengths, is refused before anything runs.
    #[test]
    fn a_decoder_stack_is_its_layers_one_by_one_bit_for_bit() {
        let (dim, kvh, hd, ffn, ctxlen, layers) = (64u32, 2u32, 16u32, 96u32, 8u32, 3usize);
        let mut rnd = xorshift(0x9e37_79b9_7f4a_7c15);
        let shapes = layer_shapes(dim, kvh * hd, ffn);
        let data: Vec<Vec<f32>> = (0..layers)
            .flat_map(|_| shapes.iter().map(|s| s.iter().product::<u32>()))
            .map(&mut rnd)
            .collect();
        let (mut stack, mut each) = (ctx(64 << 20), ctx(64 << 20));
        let load = |c: &mut AccelCtx| -> (Vec<Resource<Tensor>>, Vec<Resource<Tensor>>) {
            let ws = data
                .iter()
                .enumerate()
                .map(|(i, d)| t(c, &shapes[i % 9], d))
                .collect();
            let caches = (0..2 * layers)
                .map(|_| ok(c.zeros(Dtype::F16, vec![ctxlen, kvh, hd])))
                .collect();
            (ws, caches)
        };
        let ((ws, caches), (ws1, caches1)) = (load(&mut stack), load(&mut each));
        let (eps, theta) = (1e-5f32, 10000.0f32);
        let bits = |c: &mut AccelCtx, r: &Resource<Tensor>| -> Vec<u32> {
            ok(c.download(borrow(r)))
                .iter()
                .map(|f| f.to_bits())
                .collect()
        };
        for (pos, seq) in [(0u32, 3u32), (3, 1)] {
            let x0 = rnd(seq * dim);
            let (x, x1) = (
                t(&mut stack, &[seq, dim], &x0),
                t(&mut each, &[seq, dim], &x0),
            );
            let live = stack.live;
            let got = ok(now(stack.decoder_stack(
                borrow(&x),
                ws.iter().map(borrow).collect(),
                caches.iter().map(borrow).collect(),
                pos,
                eps,
                theta,
            )));
            assert_eq!(stack.live, live + 1, "only the output stays");
            let mut want = borrow(&x1);
            for l in 0..layers {
                want = ok(now(each.decoder_layer(
                    want,
                    ws1[9 * l..9 * l + 9].iter().map(borrow).collect(),
                    borrow(&caches1[2 * l]),
                    borrow(&caches1[2 * l + 1]),
                    pos,
                    eps,
                    theta,
                )));
            }
            assert_eq!(bits(&mut stack, &got), bits(&mut each, &want), "pos {pos}");
        }
        for (a, b) in caches.iter().zip(&caches1) {
            assert_eq!(
                bits(&mut stack, a),
                bits(&mut each, b),
                "the caches hold the same"
            );
        }
        // The last layer's down weight swapped for its gate: refused before
        // the first layer runs, no cache written, no tensor left.
        let x = t(&mut stack, &[1, dim], &rnd(dim));
        let before: Vec<Vec<u32>> = caches.iter().map(|c| bits(&mut stack, c)).collect();
        let live = stack.live;
        let mut bad: Vec<Resource<Tensor>> = ws.iter().map(borrow).collect();
        bad.swap(9 * (layers - 1) + 6, 9 * (layers - 1) + 8);
        let call = |c: &mut AccelCtx, ws: Vec<Resource<Tensor>>, caches: Vec<Resource<Tensor>>| {
            guest_err(now(c.decoder_stack(borrow(&x), ws, caches, 4, eps, theta)))
        };
        let all =
            |v: &[Resource<Tensor>]| -> Vec<Resource<Tensor>> { v.iter().map(borrow).collect() };
        assert_eq!(
            call(&mut stack, bad, all(&caches)),
            AccelError::ShapeMismatch
        );
        // Lists of the wrong lengths, or none at all.
        assert_eq!(
            call(&mut stack, all(&ws[..26]), all(&caches)),
            AccelError::InvalidArgument
        );
        assert_eq!(
            call(&mut stack, all(&ws), all(&caches[..5])),
            AccelError::InvalidArgument
        );
        assert_eq!(
            call(&mut stack, Vec::new(), Vec::new()),
            AccelError::InvalidArgument
        );
        // A layer whose caches are one tensor.
        let mut same = all(&caches);
        same[3] = borrow(&caches[2]);
        assert_eq!(
            call(&mut stack, all(&ws), same),
            AccelError::InvalidArgument
        );
        assert_eq!(stack.live, live, "a refused stack leaves no tensor behind");
        let after: Vec<Vec<u32>> = caches.iter().map(|c| bits(&mut stack, c)).collect();
        assert_eq!(after, before, "a refused stack writes no cache");
    }

    #[test]
    fn shapes_are_checked_on_every_launch() {
        let mut c = ctx(1 << 20);
        let a = t(&mut c, &[2, 3], &[1.0; 6]);
        let b = t(&mut c, &[2, 2], &[1.0; 4]);
        assert_eq!(
            guest_err(now(c.matmul(borrow(&a), borrow(&b)))),
            AccelError::ShapeMismatch
        );
        assert_eq!(
            guest_err(c.add(borrow(&a), borrow(&b))),
            AccelError::ShapeMismatch
        );
        assert_eq!(
            guest_err(c.rmsnorm(borrow(&a), borrow(&b), 1e-5)),
            AccelError::ShapeMismatch
        );
        assert_eq!(
            guest_err(c.rope(borrow(&a), 0, 10000.0)),
            AccelError::ShapeMismatch
        );
        let odd = t(&mut c, &[1, 1, 3], &[1.0; 3]);
        assert_eq!(
            guest_err(c.rope(borrow(&odd), 0, 10000.0)),
            AccelError::ShapeMismatch
        );
        let even = t(&mut c, &[1, 1, 2], &[1.0; 2]);
        assert_eq!(
            guest_err(c.rope(borrow(&even), u32::MAX, 10000.0)),
            AccelError::InvalidArgument
        );
        assert_eq!(
            guest_err(c.rope(borrow(&even), 0, f32::NAN)),
            AccelError::InvalidArgument
        );
        let w = t(&mut c, &[3], &[1.0; 3]);
        assert_eq!(
            guest_err(c.rmsnorm(borrow(&a), borrow(&w), -1.0)),
            AccelError::InvalidArgument
        );
        assert_eq!(
            guest_err(c.upload(vec![2, 2], vec![1.0; 3])),
            AccelError::LengthMismatch
        );
        assert_eq!(
            guest_err(c.upload(vec![], vec![])),
            AccelError::InvalidShape
        );
        assert_eq!(
            guest_err(c.upload(vec![0, 4], vec![])),
            AccelError::InvalidShape
        );
        assert_eq!(
            guest_err(c.zeros(Dtype::F32, vec![1, 1, 1, 1, 1])),
            AccelError::InvalidShape
        );
        assert_eq!(
            guest_err(c.zeros(Dtype::F32, vec![u32::MAX, u32::MAX, u32::MAX])),
            AccelError::InvalidShape
        );
    }

    #[test]
    fn memory_budget_is_enforced_and_released_on_drop() {
        let mut c = ctx(64);
        let a = ok(c.zeros(Dtype::F32, vec![16]));
        assert_eq!(c.bytes_in_use(), 64);
        assert_eq!(
            guest_err(c.zeros(Dtype::F32, vec![1])),
            AccelError::OutOfMemory
        );
        assert_eq!(guest_err(c.silu(borrow(&a))), AccelError::OutOfMemory);
        c.drop(a).expect("drop");
        assert_eq!(c.bytes_in_use(), 0);
        ok(c.zeros(Dtype::F32, vec![16]));
    }

    #[test]
    fn oversized_matmul_is_refused_before_work() {
        let mut c = ctx(u64::MAX);
        let x = ok(c.zeros(Dtype::F32, vec![4096, 4096]));
        let w = ok(c.zeros(Dtype::F32, vec![4096, 4096]));
        assert_eq!(
            guest_err(now(c.matmul(borrow(&x), borrow(&w)))),
            AccelError::InvalidArgument
        );
    }

    #[test]
    fn ops_compute_through_the_backend() {
        let mut c = ctx(1 << 20);
        let x = t(&mut c, &[1, 2], &[1.0, 2.0]);
        let w = t(&mut c, &[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let y = ok(now(c.matmul(borrow(&x), borrow(&w))));
        assert_eq!(ok(c.shape(borrow(&y)).map(Ok)), vec![1, 3]);
        assert_eq!(ok(c.download(borrow(&y))), vec![1.0, 2.0, 3.0]);
        assert_eq!(ok(c.argmax(borrow(&y))), vec![2]);
        assert!(c.launches() >= 3);
    }

    #[test]
    fn matmul_many_is_checked_as_a_whole_and_equals_separate_launches() {
        let mut c = ctx(1 << 20);
        let x = t(&mut c, &[1, 2], &[1.0, 2.0]);
        let w1 = t(&mut c, &[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let w2 = t(&mut c, &[1, 2], &[-1.0, 0.5]);
        let bad = t(&mut c, &[2, 3], &[1.0; 6]);
        let out = ok(now(
            c.matmul_many(borrow(&x), vec![borrow(&w1), borrow(&w2)])
        ));
        assert_eq!(out.len(), 2);
        assert_eq!(ok(c.download(borrow(&out[0]))), vec![1.0, 2.0, 3.0]);
        assert_eq!(ok(c.download(borrow(&out[1]))), vec![0.0]);
        // Nothing is computed (no launch, no tensor) when any matrix is wrong,
        // when there are none or more than eight, or when the outputs do not
        // fit together.
        let (launches, in_use) = (c.launches(), c.bytes_in_use());
        assert_eq!(
            guest_err(now(
                c.matmul_many(borrow(&x), vec![borrow(&w1), borrow(&bad)])
            )),
            AccelError::ShapeMismatch
        );
        assert_eq!(
            guest_err(now(c.matmul_many(borrow(&x), vec![]))),
            AccelError::InvalidArgument
        );
        assert_eq!(
            guest_err(now(
                c.matmul_many(borrow(&x), (0..9).map(|_| borrow(&w2)).collect())
            )),
            AccelError::InvalidArgument
        );
        // x (8 bytes) and w1 (24) held; room for one [1, 3] output (12), not two.
        let mut tight = ctx(8 + 24 + 12 + 6);
        let x = t(&mut tight, &[1, 2], &[1.0, 2.0]);
        let w1 = t(&mut tight, &[3, 2], &[1.0; 6]);
        assert_eq!(
            guest_err(now(
                tight.matmul_many(borrow(&x), vec![borrow(&w1), borrow(&w1)])
            )),
            AccelError::OutOfMemory
        );
        ok(now(tight.matmul_many(borrow(&x), vec![borrow(&w1)])));
        assert_eq!((c.launches(), c.bytes_in_use()), (launches, in_use));
    }

    /// Deterministic values in [-2, 2) (a 64-bit LCG; no RNG crate needed).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn fused_ops_equal_the_separate_launches_bit_for_bit() {
        // A llama layer at odd sizes: seq 3 at position 2, 6 heads over 2 kv
        // heads of dim 4, model dim 24, ffn 40. f32 weights: the fused ops
        // compose the same backend launches for every weight type.
        let (seq, heads, kvh, hd, dim, ffn, pos) = (3u32, 6u32, 2u32, 4u32, 24u32, 40u32, 2u32);
        let mut c = ctx(1 << 26);
        let x = t(&mut c, &[seq, dim], &values((seq * dim) as usize, 1));
        let norm = t(&mut c, &[dim], &values(dim as usize, 2));
        let wq = t(
            &mut c,
            &[heads * hd, dim],
            &values((heads * hd * dim) as usize, 3),
        );
        let wk = t(
            &mut c,
            &[kvh * hd, dim],
            &values((kvh * hd * dim) as usize, 4),
        );
        let wo = t(&mut c, &[dim, dim], &values((dim * dim) as usize, 5));
        let caches = |c: &mut AccelCtx| {
            let kc = ok(c.zeros(Dtype::F16, vec![8, kvh, hd]));
            let vc = ok(c.zeros(Dtype::F16, vec![8, kvh, hd]));
            // Earlier positions already hold keys and values.
            let first = t(c, &[2, kvh, hd], &values((2 * kvh * hd) as usize, 7));
            let q0 = t(c, &[2, heads, hd], &values((2 * heads * hd) as usize, 8));
            ok(c.attention(
                borrow(&q0),
                borrow(&first),
                borrow(&first),
                borrow(&kc),
                borrow(&vc),
                0,
            ));
            (kc, vc)
        };
        let read = |c: &mut AccelCtx, r: &Resource<Tensor>| ok(c.download(borrow(r)));

        // norm-matmul-many = rmsnorm, then matmul-many.
        let fused = ok(now(c.norm_matmul_many(
            borrow(&x),
            borrow(&norm),
            1e-5,
            vec![borrow(&wq), borrow(&wk), borrow(&wk)],
        )));
        let h = ok(c.rmsnorm(borrow(&x), borrow(&norm), 1e-5));
        let separate = ok(now(
            c.matmul_many(borrow(&h), vec![borrow(&wq), borrow(&wk), borrow(&wk)])
        ));
        for (f, s) in fused.iter().zip(&separate) {
            assert_eq!(read(&mut c, f), read(&mut c, s));
        }
        let [q, k, v] = <[Resource<Tensor>; 3]>::try_from(fused).unwrap();

        // rope-attention = reshape, rope, attention, reshape.
        let (kc1, vc1) = caches(&mut c);
        let fused_a = ok(c.rope_attention(
            borrow(&q),
            borrow(&k),
            borrow(&v),
            borrow(&kc1),
            borrow(&vc1),
            pos,
            10000.0,
        ));
        assert_eq!(c.shape(borrow(&fused_a)).unwrap(), vec![seq, heads * hd]);
        let (kc2, vc2) = caches(&mut c);
        let q3 = ok(c.reshape(borrow(&q), vec![seq, heads, hd]));
        let k3 = ok(c.reshape(borrow(&k), vec![seq, kvh, hd]));
        let v3 = ok(c.reshape(borrow(&v), vec![seq, kvh, hd]));
        let qr = ok(c.rope(borrow(&q3), pos, 10000.0));
        let kr = ok(c.rope(borrow(&k3), pos, 10000.0));
        let sep_a = ok(c.attention(
            borrow(&qr),
            borrow(&kr),
            borrow(&v3),
            borrow(&kc2),
            borrow(&vc2),
            pos,
        ));
        assert_eq!(read(&mut c, &fused_a), read(&mut c, &sep_a));
        // The caches were written the same way.
        assert_eq!(read(&mut c, &kc1), read(&mut c, &kc2));
        assert_eq!(read(&mut c, &vc1), read(&mut c, &vc2));

        // matmul-add = matmul, then add with the residual first.
        let fused_o = ok(now(c.matmul_add(borrow(&fused_a), borrow(&wo), borrow(&x))));
        let o = ok(now(c.matmul(borrow(&fused_a), borrow(&wo))));
        let sep_o = ok(c.add(borrow(&x), borrow(&o)));
        assert_eq!(read(&mut c, &fused_o), read(&mut c, &sep_o));

        // silu-mul = silu, then mul.
        let g = t(&mut c, &[seq, ffn], &values((seq * ffn) as usize, 9));
        let u = t(&mut c, &[seq, ffn], &values((seq * ffn) as usize, 10));
        let fused_f = ok(c.silu_mul(borrow(&g), borrow(&u)));
        let sg = ok(c.silu(borrow(&g)));
        let sep_f = ok(c.mul(borrow(&sg), borrow(&u)));
        assert_eq!(read(&mut c, &fused_f), read(&mut c, &sep_f));
    }

    #[test]
    fn fused_ops_refuse_what_the_separate_ops_refuse_and_launch_nothing() {
        let mut c = ctx(1 << 20);
        let x = t(&mut c, &[2, 8], &values(16, 1));
        let norm = t(&mut c, &[8], &values(8, 2));
        let short_norm = t(&mut c, &[4], &values(4, 3));
        let w = t(&mut c, &[8, 8], &values(64, 4));
        let w_wide = t(&mut c, &[8, 4], &values(32, 5));
        let kc = ok(c.zeros(Dtype::F16, vec![4, 2, 4]));
        let vc = ok(c.zeros(Dtype::F16, vec![4, 2, 4]));
        let kv = t(&mut c, &[2, 8], &values(16, 6));
        let odd = t(&mut c, &[2, 7], &values(14, 7));
        let q3 = t(&mut c, &[2, 2, 4], &values(16, 8));
        let (launches, in_use) = (c.launches(), c.bytes_in_use());
        let cases: Vec<(AccelError, OpResult<()>)> = vec![
            (
                AccelError::ShapeMismatch,
                now(c.norm_matmul_many(borrow(&x), borrow(&short_norm), 1e-5, vec![borrow(&w)]))
                    .map(|r| r.map(drop)),
            ),
            (
                AccelError::InvalidArgument,
                now(c.norm_matmul_many(borrow(&x), borrow(&norm), f32::NAN, vec![borrow(&w)]))
                    .map(|r| r.map(drop)),
            ),
            (
                AccelError::InvalidArgument,
                now(c.norm_matmul_many(borrow(&x), borrow(&norm), 1e-5, vec![]))
                    .map(|r| r.map(drop)),
            ),
            (
                AccelError::ShapeMismatch,
                now(c.norm_matmul_many(
                    borrow(&x),
                    borrow(&norm),
                    1e-5,
                    vec![borrow(&w), borrow(&w_wide)],
                ))
                .map(|r| r.map(drop)),
            ),
            // The residual must have the product's shape.
            (
                AccelError::ShapeMismatch,
                now(c.matmul_add(borrow(&x), borrow(&w), borrow(&norm))).map(|r| r.map(drop)),
            ),
            (
                AccelError::ShapeMismatch,
                now(c.matmul_add(borrow(&x), borrow(&w_wide), borrow(&x))).map(|r| r.map(drop)),
            ),
            (
                AccelError::ShapeMismatch,
                c.silu_mul(borrow(&x), borrow(&odd)).map(|r| r.map(drop)),
            ),
            // 2 heads of 4 over caches of 2 kv heads of 4: q columns must be whole heads,
            (
                AccelError::ShapeMismatch,
                c.rope_attention(
                    borrow(&odd),
                    borrow(&kv),
                    borrow(&kv),
                    borrow(&kc),
                    borrow(&vc),
                    0,
                    1e4,
                )
                .map(|r| r.map(drop)),
            ),
            // k's columns must be kv-heads × head-dim,
            (
                AccelError::ShapeMismatch,
                c.rope_attention(
                    borrow(&x),
                    borrow(&odd),
                    borrow(&odd),
                    borrow(&kc),
                    borrow(&vc),
                    0,
                    1e4,
                )
                .map(|r| r.map(drop)),
            ),
            // q, k and v must be 2-D,
            (
                AccelError::ShapeMismatch,
                c.rope_attention(
                    borrow(&q3),
                    borrow(&kv),
                    borrow(&kv),
                    borrow(&kc),
                    borrow(&vc),
                    0,
                    1e4,
                )
                .map(|r| r.map(drop)),
            ),
            // theta as for rope,
            (
                AccelError::InvalidArgument,
                c.rope_attention(
                    borrow(&x),
                    borrow(&kv),
                    borrow(&kv),
                    borrow(&kc),
                    borrow(&vc),
                    0,
                    1.0,
                )
                .map(|r| r.map(drop)),
            ),
            (
                AccelError::InvalidArgument,
                c.rope_attention(
                    borrow(&x),
                    borrow(&kv),
                    borrow(&kv),
                    borrow(&kc),
                    borrow(&vc),
                    0,
                    f32::INFINITY,
                )
                .map(|r| r.map(drop)),
            ),
            // the caches as for attention: not aliased, not past their end.
            (
                AccelError::InvalidArgument,
                c.rope_attention(
                    borrow(&x),
                    borrow(&kv),
                    borrow(&kv),
                    borrow(&kc),
                    borrow(&kc),
                    0,
                    1e4,
                )
                .map(|r| r.map(drop)),
            ),
            (
                AccelError::InvalidArgument,
                c.rope_attention(
                    borrow(&x),
                    borrow(&kv),
                    borrow(&kv),
                    borrow(&kc),
                    borrow(&vc),
                    3,
                    1e4,
                )
                .map(|r| r.map(drop)),
            ),
        ];
        for (i, (want, got)) in cases.into_iter().enumerate() {
            assert_eq!(guest_err(got), want, "case {i}");
        }
        assert_eq!((c.launches(), c.bytes_in_use()), (launches, in_use));
        // In range, each runs.
        ok(c.rope_attention(
            borrow(&x),
            borrow(&kv),
            borrow(&kv),
            borrow(&kc),
            borrow(&vc),
            2,
            1e4,
        ));
        // A fused launch's temporary counts with its result: gate and up (8
        // bytes each) held, room for one more [1, 2] tensor but not two.
        let mut tight = ctx(8 + 8 + 8 + 4);
        let gate = t(&mut tight, &[1, 2], &[1.0, 2.0]);
        let up = t(&mut tight, &[1, 2], &[3.0, 4.0]);
        assert_eq!(
            guest_err(tight.silu_mul(borrow(&gate), borrow(&up))),
            AccelError::OutOfMemory
        );
        ok(tight.silu(borrow(&gate)));
    }

    #[test]
    fn weights_cannot_be_downloaded() {
        let mut c = ctx(1 << 20);
        let w = ok(c.insert(vec![2], DeviceBuffer::F32(vec![0.5, 0.25]), false));
        assert_eq!(
            guest_err(c.download(borrow(&w))),
            AccelError::NotDownloadable
        );
        // Ops on weights still work, and their results are activations.
        let y = ok(c.silu(borrow(&w)));
        assert_eq!(ok(c.download(borrow(&y))).len(), 2);
    }

    #[test]
    fn reshape_shares_data_but_cache_writes_do_not_leak_into_views() {
        let mut c = ctx(1 << 20);
        let kc = ok(c.zeros(Dtype::F16, vec![4, 1, 2]));
        let vc = ok(c.zeros(Dtype::F16, vec![4, 1, 2]));
        let view = ok(c.reshape(borrow(&kc), vec![8]));
        let q = t(&mut c, &[1, 1, 2], &[1.0, 0.0]);
        let k = t(&mut c, &[1, 1, 2], &[0.5, 0.5]);
        let v = t(&mut c, &[1, 1, 2], &[2.0, 3.0]);
        let out = ok(c.attention(
            borrow(&q),
            borrow(&k),
            borrow(&v),
            borrow(&kc),
            borrow(&vc),
            0,
        ));
        assert_eq!(ok(c.download(borrow(&out))), vec![2.0, 3.0]);
        assert_eq!(ok(c.download(borrow(&kc)))[..2], [0.5, 0.5]);
        assert_eq!(
            ok(c.download(borrow(&view))),
            vec![0.0; 8],
            "the view kept the old data"
        );
        // A cache aliased with an input, or two aliased caches, is refused.
        assert_eq!(
            guest_err(c.attention(
                borrow(&q),
                borrow(&k),
                borrow(&v),
                borrow(&kc),
                borrow(&kc),
                1
            )),
            AccelError::InvalidArgument
        );
        assert_eq!(
            guest_err(c.attention(
                borrow(&q),
                borrow(&k),
                borrow(&v),
                borrow(&kc),
                borrow(&vc),
                4
            )),
            AccelError::InvalidArgument,
            "position past the cache"
        );
    }

    #[test]
    fn rows_at_the_end_of_a_huge_tensor_do_not_overflow() {
        // 2^32 rows (8 GiB of f16, reserved lazily): start + count == 2^32.
        let mut c = ctx(16 << 30);
        let big = ok(c.zeros(Dtype::F16, vec![65536, 65536, 1]));
        let last = ok(c.rows(borrow(&big), u32::MAX, 1));
        assert_eq!(ok(c.shape(borrow(&last)).map(Ok)), vec![1, 1]);
        assert_eq!(
            guest_err(c.rows(borrow(&big), u32::MAX, 2)),
            AccelError::InvalidArgument
        );
        // Downloading it could never fit in guest memory: refused before any copy.
        assert_eq!(guest_err(c.download(borrow(&big))), AccelError::OutOfMemory);
    }

    #[test]
    fn attention_context_and_work_are_bounded() {
        let mut c = ctx(4 << 30);
        let n = MAX_CONTEXT + 1;
        let kc = ok(c.zeros(Dtype::F16, vec![n, 1, 2]));
        let vc = ok(c.zeros(Dtype::F16, vec![n, 1, 2]));
        let q = t(&mut c, &[1, 1, 2], &[1.0, 0.0]);
        let k = t(&mut c, &[1, 1, 2], &[0.5, 0.5]);
        let v = t(&mut c, &[1, 1, 2], &[2.0, 3.0]);
        assert_eq!(
            guest_err(c.attention(
                borrow(&q),
                borrow(&k),
                borrow(&v),
                borrow(&kc),
                borrow(&vc),
                MAX_CONTEXT
            )),
            AccelError::InvalidArgument,
            "a context past MAX_CONTEXT"
        );
        ok(c.attention(
            borrow(&q),
            borrow(&k),
            borrow(&v),
            borrow(&kc),
            borrow(&vc),
            MAX_CONTEXT - 1,
        ));
    }

    #[test]
    fn stale_handles_trap() {
        let mut c = ctx(1 << 20);
        let a = ok(c.zeros(Dtype::F32, vec![1]));
        let stale = borrow(&a);
        c.drop(a).expect("drop");
        let err = c.silu(stale).unwrap_err();
        assert_eq!(
            err.downcast_ref::<PolicyViolation>(),
            Some(&PolicyViolation::BadHandle("tensor"))
        );
    }
}
