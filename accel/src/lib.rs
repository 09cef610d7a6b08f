//! `cinfer-accel`: the virtual accelerator.
//!
//! The loader's `accelerator` capability (`cinfer-host`, module
//! `caps::accelerator`) validates every launch (shapes, dtypes, memory) once,
//! for all backends; a backend only implements kernels on operands that are
//! already known to fit. The CPU backend ([`CpuBackend`]) is always present
//! and is the reference; its hot kernels are SIMD (AVX-512 VNNI or AVX2,
//! chosen at run time by [`simd`], with a portable path everywhere else). The
//! CUDA backend (feature `cuda`, module [`cuda`]) implements the same
//! trait with the same semantics. [`backend_from_name`] picks one by
//! configuration.
//!
//! `unsafe` is denied in this crate except in two named modules: [`simd`],
//! where entering a `#[target_feature]` kernel after run-time feature
//! detection needs it, and `cuda::device::ffi` (feature `cuda`), every call into the
//! CUDA libraries. Each block carries a `// SAFETY:` comment.

pub mod batch;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod pack;
pub mod pool;
pub mod quant;
pub mod simd;

pub use cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use cuda::{CudaBackend, CudaBuffer};
use std::sync::Arc;

/// The backend names a configuration or a policy may give.
pub const BACKEND_NAMES: [&str; 2] = ["cpu", "cuda"];

/// The backend configured by name: `"cpu"`, or `"cuda"` (device 0). A CUDA
/// backend in a build without the `cuda` feature, or on a machine without the
/// driver, NVRTC or cuBLAS, is a clear configuration error, never a panic.
pub fn backend_from_name(name: &str) -> Result<Arc<dyn Backend>, BackendError> {
    match name {
        "cpu" => Ok(Arc::new(CpuBackend)),
        "cuda" => cuda_backend(),
        other => Err(BackendError::NotAvailable(format!(
            "unknown backend {other:?} (expected \"cpu\" or \"cuda\")"
        ))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_backend() -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(CudaBackend::open(0)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend() -> Result<Arc<dyn Backend>, BackendError> {
    Err(BackendError::NotAvailable(
        "backend \"cuda\": this loader was built without the cuda feature \
         (cargo build --release -p cinfer-host --features cuda)"
            .into(),
    ))
}
pub use quant::{BlockQ4_1, BlockQ8_0};

/// Element types of device buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    /// f32
    F32,
    /// IEEE half (stored as bits)
    F16,
    /// GGUF Q4_1 blocks of 32
    Q4_1,
    /// GGUF Q8_0 blocks of 32
    Q8_0,
}

impl ElemType {
    /// Bytes of `elems` elements (quantized types: whole blocks of 32).
    pub fn bytes(self, elems: u64) -> u64 {
        match self {
            ElemType::F32 => elems * 4,
            ElemType::F16 => elems * 2,
            ElemType::Q4_1 => elems.div_ceil(32) * 20,
            ElemType::Q8_0 => elems.div_ceil(32) * 34,
        }
    }

    /// Whether element counts must be multiples of 32.
    pub fn is_quantized(self) -> bool {
        matches!(self, ElemType::Q4_1 | ElemType::Q8_0)
    }
}

/// Accelerator memory holding one tensor's elements.
#[derive(Clone)]
#[non_exhaustive]
pub enum DeviceBuffer {
    /// f32 elements in host memory (CPU backend).
    F32(Vec<f32>),
    /// f16 bits in host memory.
    F16(Vec<u16>),
    /// Q4_1 blocks in host memory.
    Q4_1(Vec<BlockQ4_1>),
    /// Q8_0 blocks in host memory.
    Q8_0(Vec<BlockQ8_0>),
    /// A Q4_1 weight matrix in the CPU kernels' grouped layout ([`pack`]).
    PackedQ4_1(Arc<pack::PackedQ4_1>),
    /// A Q8_0 weight matrix in the CPU kernels' grouped layout ([`pack`]).
    PackedQ8_0(Arc<pack::PackedQ8_0>),
    /// A tensor in CUDA device memory (CUDA backend).
    #[cfg(feature = "cuda")]
    Cuda(CudaBuffer),
}

impl DeviceBuffer {
    /// The element type.
    pub fn elem_type(&self) -> ElemType {
        match self {
            DeviceBuffer::F32(_) => ElemType::F32,
            DeviceBuffer::F16(_) => ElemType::F16,
            DeviceBuffer::Q4_1(_) => ElemType::Q4_1,
            DeviceBuffer::Q8_0(_) => ElemType::Q8_0,
            DeviceBuffer::PackedQ4_1(_) => ElemType::Q4_1,
            DeviceBuffer::PackedQ8_0(_) => ElemType::Q8_0,
            #[cfg(feature = "cuda")]
            DeviceBuffer::Cuda(t) => t.elem_type(),
        }
    }

    /// Number of elements.
    pub fn elems(&self) -> usize {
        match self {
            DeviceBuffer::F32(v) => v.len(),
            DeviceBuffer::F16(v) => v.len(),
            DeviceBuffer::Q4_1(v) => v.len() * 32,
            DeviceBuffer::Q8_0(v) => v.len() * 32,
            DeviceBuffer::PackedQ4_1(p) => p.rows() * p.blocks_per_row() * 32,
            DeviceBuffer::PackedQ8_0(p) => p.rows() * p.blocks_per_row() * 32,
            #[cfg(feature = "cuda")]
            DeviceBuffer::Cuda(t) => t.elems(),
        }
    }
}

impl std::fmt::Debug for DeviceBuffer {
    // Never print contents: tensors may hold weights or activations.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({:?}, {} elements)",
            self.elem_type(),
            self.elems()
        )
    }
}

/// An elementwise binary operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    /// a + b
    Add,
    /// a · b
    Mul,
}

/// Shape of an attention launch (validated by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// New positions (rows of q, k, v).
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Position of the first new row.
    pub pos: usize,
}

/// A backend failure that is not the guest's fault.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The device could not allocate memory.
    #[error("device out of memory")]
    OutOfMemory,
    /// An operand has an element type this kernel does not take (a validation bug).
    #[error("kernel does not take {0:?} operands")]
    Unsupported(ElemType),
    /// The configured backend cannot run here (a configuration error).
    #[error("accelerator backend not available: {0}")]
    NotAvailable(String),
    /// An operand lives on another backend's device (a configuration bug).
    #[error("buffer belongs to another backend: {0}")]
    WrongBackend(&'static str),
    /// The device failed.
    #[error("device error: {0}")]
    Device(String),
}

/// [`Backend::matmul_many`] as one [`Backend::matmul`] per matrix: the
/// default, and what a backend falls back to for weights it cannot fuse.
pub fn matmul_each<B: Backend + ?Sized>(
    backend: &B,
    x: &DeviceBuffer,
    ws: &[(&DeviceBuffer, usize)],
    m: usize,
    k: usize,
) -> Result<Vec<DeviceBuffer>, BackendError> {
    ws.iter()
        .map(|&(w, n)| backend.matmul(x, w, m, k, n))
        .collect()
}

/// Kernels of the op set. Operand shapes are validated by the caller; a
/// backend may assume every length below matches.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Short name for logs ("cpu", "cuda").
    fn name(&self) -> &'static str;
    /// A thread starts launching on this backend for a run, or for the
    /// loader's driver of batched runs (the CPU backend keeps small launches
    /// off its pool while several threads launch).
    fn run_started(&self) {}
    /// A run that called [`Backend::run_started`] is over.
    fn run_ended(&self) {}
    /// `len` zeros of type `ty` (f32 or f16).
    fn zeros(&self, ty: ElemType, len: usize) -> Result<DeviceBuffer, BackendError>;
    /// Copies host f32 data to the device.
    fn upload(&self, data: &[f32]) -> Result<DeviceBuffer, BackendError>;
    /// Moves a host-built buffer (decrypted weights) to the device.
    fn upload_buffer(&self, buf: DeviceBuffer) -> Result<DeviceBuffer, BackendError>;
    /// Moves a host-built weight matrix `[rows, cols]` to the device; a
    /// backend may lay it out for its kernels (the CPU backend groups
    /// quantized rows for its SIMD kernels). Every op still sees the same
    /// elements. The default is [`Backend::upload_buffer`].
    fn upload_weights(
        &self,
        buf: DeviceBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let _ = (rows, cols);
        self.upload_buffer(buf)
    }
    /// Copies an f32 or f16 buffer to the host as f32.
    fn download(&self, buf: &DeviceBuffer) -> Result<Vec<f32>, BackendError>;
    /// Copies elements `range` of an f32 or f16 buffer.
    fn copy_range(
        &self,
        buf: &DeviceBuffer,
        range: std::ops::Range<usize>,
    ) -> Result<DeviceBuffer, BackendError>;
    /// `x` f32 [m, k] · `w` [n, k]ᵀ → f32 [m, n]; `w` of any element type.
    fn matmul(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError>;
    /// [`matmul`](Self::matmul) of one `x` [m, k] with each `(w, n)` of `ws`,
    /// bit for bit the separate results; a backend may compute them in one
    /// launch (preparing `x` once, one pass of its workers over every matrix).
    fn matmul_many(
        &self,
        x: &DeviceBuffer,
        ws: &[(&DeviceBuffer, usize)],
        m: usize,
        k: usize,
    ) -> Result<Vec<DeviceBuffer>, BackendError> {
        matmul_each(self, x, ws, m, k)
    }
    /// Rows `ids` of `table` [.., d] as f32 [len(ids), d].
    fn embedding(
        &self,
        table: &DeviceBuffer,
        d: usize,
        ids: &[u32],
    ) -> Result<DeviceBuffer, BackendError>;
    /// Elementwise `a op b`; if `b` has `cols` elements it is broadcast over each row of `a`.
    fn binary(
        &self,
        op: BinaryOp,
        a: &DeviceBuffer,
        b: &DeviceBuffer,
        cols: usize,
    ) -> Result<DeviceBuffer, BackendError>;
    /// `r + x · wᵀ` (`r` f32 [m, n]): bit for bit [`matmul`](Self::matmul)
    /// and then [`binary`](Self::binary) `Add` with `r` first; a backend may
    /// add in place instead of allocating a second result.
    #[allow(clippy::too_many_arguments)]
    fn matmul_add(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        r: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let product = self.matmul(x, w, m, k, n)?;
        self.binary(BinaryOp::Add, r, &product, n)
    }
    /// `silu(gate) · up` elementwise (same lengths): bit for bit
    /// [`silu`](Self::silu) and then [`binary`](Self::binary) `Mul`; a
    /// backend may do it in one pass.
    fn silu_mul(
        &self,
        gate: &DeviceBuffer,
        up: &DeviceBuffer,
    ) -> Result<DeviceBuffer, BackendError> {
        let g = self.silu(gate)?;
        self.binary(BinaryOp::Mul, &g, up, up.elems())
    }
    /// Row-wise RMS normalisation of `x` [rows, cols] scaled by `w` [cols].
    fn rmsnorm(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        cols: usize,
        eps: f32,
    ) -> Result<DeviceBuffer, BackendError>;
    /// Row-wise softmax of `x` [rows, cols].
    fn softmax(&self, x: &DeviceBuffer, cols: usize) -> Result<DeviceBuffer, BackendError>;
    /// x · sigmoid(x).
    fn silu(&self, x: &DeviceBuffer) -> Result<DeviceBuffer, BackendError>;
    /// RoPE on `x` [seq, heads, head_dim] with adjacent pairs; row s has position `pos + s`.
    fn rope(
        &self,
        x: &DeviceBuffer,
        heads: usize,
        head_dim: usize,
        pos: u32,
        theta: f32,
    ) -> Result<DeviceBuffer, BackendError>;
    /// Writes `k`, `v` into the caches at rows `pos..pos+seq` and returns causal
    /// attention of `q` over cache rows `0..=pos+i` (see the WIT docs).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &DeviceBuffer,
        k: &DeviceBuffer,
        v: &DeviceBuffer,
        k_cache: &mut DeviceBuffer,
        v_cache: &mut DeviceBuffer,
        shape: AttentionShape,
    ) -> Result<DeviceBuffer, BackendError>;
    /// Index of the largest element in each row of `x` [rows, cols] (first on ties; NaN never wins).
    fn argmax(&self, x: &DeviceBuffer, cols: usize) -> Result<Vec<u32>, BackendError>;
    /// The `k` largest (index, value) of the last row of `x` [rows, cols], largest first.
    fn top_k(
        &self,
        x: &DeviceBuffer,
        cols: usize,
        k: usize,
    ) -> Result<Vec<(u32, f32)>, BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_are_chosen_by_name_and_a_missing_cuda_is_a_clear_error() {
        assert_eq!(backend_from_name("cpu").expect("cpu").name(), "cpu");
        let e = backend_from_name("tpu").expect_err("unknown");
        assert!(e.to_string().contains("unknown backend"), "{e}");
        match backend_from_name("cuda") {
            Ok(b) => assert_eq!(b.name(), "cuda"),
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, BackendError::NotAvailable(_)), "{msg}");
                if cfg!(feature = "cuda") {
                    assert!(msg.contains("missing"), "{msg}");
                } else {
                    assert!(msg.contains("built without the cuda feature"), "{msg}");
                }
            }
        }
    }
}
