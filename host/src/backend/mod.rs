//! The virtual accelerator's backends.
//!
//! The `accelerator` capability ([`crate::caps::accelerator`]) validates every
//! launch (shapes, dtypes, memory) once, for all backends; a backend only
//! implements kernels on operands that are already known to fit. The CPU
//! backend is always present and is the reference; a CUDA backend will
//! implement the same trait.

mod cpu;

pub use cpu::CpuBackend;

/// Accelerator memory holding one tensor's elements.
#[derive(Clone)]
#[non_exhaustive]
pub enum DeviceBuffer {
    /// Host memory (CPU backend).
    Host(Vec<f32>),
}

impl std::fmt::Debug for DeviceBuffer {
    // Never print contents: tensors may hold weights or activations.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceBuffer::Host(v) => write!(f, "DeviceBuffer::Host({} elements)", v.len()),
        }
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

/// A backend failure that is not the guest's fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The device could not allocate memory.
    #[error("device out of memory")]
    OutOfMemory,
    /// A buffer belongs to another backend.
    #[error("buffer from another backend")]
    ForeignBuffer,
}

/// Kernels of the op set. Operand shapes are validated by the caller; a
/// backend may assume every length below matches.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Short name for logs ("cpu", "cuda").
    fn name(&self) -> &'static str;
    /// `len` zeros.
    fn zeros(&self, len: usize) -> Result<DeviceBuffer, BackendError>;
    /// Copies host data to the device.
    fn upload(&self, data: &[f32]) -> Result<DeviceBuffer, BackendError>;
    /// Copies device data to the host.
    fn download(&self, buf: &DeviceBuffer) -> Result<Vec<f32>, BackendError>;
    /// `x` [m, k] · `w` [n, k]ᵀ → [m, n].
    fn matmul(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError>;
    /// Elementwise `a op b`; if `b` has `cols` elements it is broadcast over each row of `a`.
    fn binary(
        &self,
        op: BinaryOp,
        a: &DeviceBuffer,
        b: &DeviceBuffer,
        cols: usize,
    ) -> Result<DeviceBuffer, BackendError>;
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
    /// Index of the largest element in each row of `x` [rows, cols] (first on ties; NaN never wins).
    fn argmax(&self, x: &DeviceBuffer, cols: usize) -> Result<Vec<u32>, BackendError>;
}
