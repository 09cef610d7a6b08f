//! The CUDA backend: the [`Backend`] trait over [`device`] (context, stream,
//! tensors, kernels, cuBLAS), whose FFI is all in its private module `device::ffi`. Semantics are the
//! CPU backend's (see `cinfer-cuda` and `tests/cuda_parity.rs` for the error
//! bounds); tensors live in device memory as [`DeviceBuffer::Cuda`].

use crate::{AttentionShape, Backend, BackendError, BinaryOp, DeviceBuffer, ElemType};
pub mod device;

use device::{Binary, CudaError, DType, Device, Tensor};
use std::sync::Arc;

/// A tensor in CUDA device memory. Cloning shares it (tensors are immutable
/// except KV caches, which are only written while unshared).
#[derive(Clone)]
pub struct CudaBuffer(Arc<Tensor>);

impl CudaBuffer {
    /// The element type.
    pub fn elem_type(&self) -> ElemType {
        match self.0.dtype() {
            DType::F32 => ElemType::F32,
            DType::F16 => ElemType::F16,
            DType::Q4_1 => ElemType::Q4_1,
            DType::Q8_0 => ElemType::Q8_0,
        }
    }

    /// Number of elements.
    pub fn elems(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuffer({:?}, {} elements)",
            self.elem_type(),
            self.elems()
        )
    }
}

fn err(e: CudaError) -> BackendError {
    match e {
        CudaError::OutOfMemory => BackendError::OutOfMemory,
        CudaError::NotAvailable { what, hint } => {
            BackendError::NotAvailable(format!("cuda: {what} is missing ({hint})"))
        }
        CudaError::Unsupported(t) => BackendError::Unsupported(elem(t)),
        other => BackendError::Device(other.to_string()),
    }
}

fn elem(t: DType) -> ElemType {
    match t {
        DType::F32 => ElemType::F32,
        DType::F16 => ElemType::F16,
        DType::Q4_1 => ElemType::Q4_1,
        DType::Q8_0 => ElemType::Q8_0,
    }
}

fn dev(buf: &DeviceBuffer) -> Result<&Tensor, BackendError> {
    match buf {
        DeviceBuffer::Cuda(b) => Ok(&b.0),
        _ => Err(BackendError::WrongBackend(
            "a host tensor given to the CUDA backend (upload it first)",
        )),
    }
}

fn wrap(t: Tensor) -> DeviceBuffer {
    DeviceBuffer::Cuda(CudaBuffer(Arc::new(t)))
}

/// The CUDA backend on one device.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    dev: Arc<Device>,
}

impl CudaBackend {
    /// Opens device `ordinal`; a missing driver, NVRTC or cuBLAS, or no
    /// device, is [`BackendError::NotAvailable`] with the reason.
    pub fn open(ordinal: usize) -> Result<Self, BackendError> {
        Ok(CudaBackend {
            dev: Device::open(ordinal).map_err(err)?,
        })
    }

    /// Whether the CUDA libraries can be opened (without initialising CUDA);
    /// the error says what is missing.
    pub fn probe() -> Result<(), BackendError> {
        device::probe().map_err(err)
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        self.dev.name()
    }

    /// Tests: fill every new output with NaN before its kernel runs.
    pub fn set_poison_outputs(&self, on: bool) {
        self.dev.set_poison_outputs(on);
    }

    /// Waits for all queued device work (benchmarks).
    pub fn synchronize(&self) -> Result<(), BackendError> {
        self.dev.synchronize().map_err(err)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn zeros(&self, ty: ElemType, len: usize) -> Result<DeviceBuffer, BackendError> {
        let t = match ty {
            ElemType::F32 => DType::F32,
            ElemType::F16 => DType::F16,
            other => return Err(BackendError::Unsupported(other)),
        };
        self.dev.zeros(t, len).map(wrap).map_err(err)
    }

    fn upload(&self, data: &[f32]) -> Result<DeviceBuffer, BackendError> {
        self.dev.upload_f32(data).map(wrap).map_err(err)
    }

    fn upload_buffer(&self, buf: DeviceBuffer) -> Result<DeviceBuffer, BackendError> {
        // A matrix the CPU backend packed goes up in GGUF layout again.
        let buf = match buf {
            DeviceBuffer::PackedQ4_1(p) => DeviceBuffer::Q4_1(p.unpack()),
            DeviceBuffer::PackedQ8_0(p) => DeviceBuffer::Q8_0(p.unpack()),
            other => other,
        };
        // Host bytes go through the pinned staging buffers in GGUF layout.
        let t = match &buf {
            DeviceBuffer::F32(v) => self.dev.upload_staged(DType::F32, v.len(), |first, out| {
                for (o, x) in out.chunks_exact_mut(4).zip(&v[first..]) {
                    o.copy_from_slice(&x.to_le_bytes());
                }
            }),
            DeviceBuffer::F16(v) => self.dev.upload_staged(DType::F16, v.len(), |first, out| {
                for (o, x) in out.chunks_exact_mut(2).zip(&v[first..]) {
                    o.copy_from_slice(&x.to_le_bytes());
                }
            }),
            DeviceBuffer::Q4_1(v) => {
                self.dev
                    .upload_staged(DType::Q4_1, v.len() * 32, |first, out| {
                        for (o, b) in out.chunks_exact_mut(20).zip(&v[first..]) {
                            o[0..2].copy_from_slice(&b.d.to_le_bytes());
                            o[2..4].copy_from_slice(&b.m.to_le_bytes());
                            o[4..20].copy_from_slice(&b.qs);
                        }
                    })
            }
            DeviceBuffer::Q8_0(v) => {
                self.dev
                    .upload_staged(DType::Q8_0, v.len() * 32, |first, out| {
                        for (o, b) in out.chunks_exact_mut(34).zip(&v[first..]) {
                            o[0..2].copy_from_slice(&b.d.to_le_bytes());
                            for (dst, q) in o[2..34].iter_mut().zip(&b.qs) {
                                *dst = *q as u8;
                            }
                        }
                    })
            }
            DeviceBuffer::Cuda(_) => return Ok(buf),
            DeviceBuffer::PackedQ4_1(_) | DeviceBuffer::PackedQ8_0(_) => {
                return Err(BackendError::Unsupported(buf.elem_type()));
            }
        };
        t.map(wrap).map_err(err)
    }

    fn download(&self, buf: &DeviceBuffer) -> Result<Vec<f32>, BackendError> {
        self.dev.download(dev(buf)?).map_err(err)
    }

    fn copy_range(
        &self,
        buf: &DeviceBuffer,
        range: std::ops::Range<usize>,
    ) -> Result<DeviceBuffer, BackendError> {
        self.dev.copy_range(dev(buf)?, range).map(wrap).map_err(err)
    }

    fn matmul(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        self.dev
            .matmul(dev(x)?, dev(w)?, m, k, n)
            .map(wrap)
            .map_err(err)
    }

    fn embedding(
        &self,
        table: &DeviceBuffer,
        d: usize,
        ids: &[u32],
    ) -> Result<DeviceBuffer, BackendError> {
        self.dev
            .embedding(dev(table)?, d, ids)
            .map(wrap)
            .map_err(err)
    }

    fn binary(
        &self,
        op: BinaryOp,
        a: &DeviceBuffer,
        b: &DeviceBuffer,
        cols: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let op = match op {
            BinaryOp::Add => Binary::Add,
            BinaryOp::Mul => Binary::Mul,
        };
        self.dev
            .binary(op, dev(a)?, dev(b)?, cols)
            .map(wrap)
            .map_err(err)
    }

    fn rmsnorm(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        cols: usize,
        eps: f32,
    ) -> Result<DeviceBuffer, BackendError> {
        self.dev
            .rmsnorm(dev(x)?, dev(w)?, cols, eps)
            .map(wrap)
            .map_err(err)
    }

    fn softmax(&self, x: &DeviceBuffer, cols: usize) -> Result<DeviceBuffer, BackendError> {
        self.dev.softmax(dev(x)?, cols).map(wrap).map_err(err)
    }

    fn silu(&self, x: &DeviceBuffer) -> Result<DeviceBuffer, BackendError> {
        self.dev.silu(dev(x)?).map(wrap).map_err(err)
    }

    fn rope(
        &self,
        x: &DeviceBuffer,
        heads: usize,
        head_dim: usize,
        pos: u32,
        theta: f32,
    ) -> Result<DeviceBuffer, BackendError> {
        self.dev
            .rope(dev(x)?, heads, head_dim, pos, theta)
            .map(wrap)
            .map_err(err)
    }

    fn attention(
        &self,
        q: &DeviceBuffer,
        k: &DeviceBuffer,
        v: &DeviceBuffer,
        k_cache: &mut DeviceBuffer,
        v_cache: &mut DeviceBuffer,
        s: AttentionShape,
    ) -> Result<DeviceBuffer, BackendError> {
        let shared = || BackendError::Device("a KV cache is shared: it cannot be written".into());
        let (DeviceBuffer::Cuda(kc), DeviceBuffer::Cuda(vc)) = (k_cache, v_cache) else {
            return Err(BackendError::WrongBackend(
                "a host KV cache given to the CUDA backend",
            ));
        };
        let kc = Arc::get_mut(&mut kc.0).ok_or_else(shared)?;
        let vc = Arc::get_mut(&mut vc.0).ok_or_else(shared)?;
        self.dev
            .attention(
                dev(q)?,
                dev(k)?,
                dev(v)?,
                kc,
                vc,
                s.seq,
                s.heads,
                s.kv_heads,
                s.head_dim,
                s.pos,
            )
            .map(wrap)
            .map_err(err)
    }

    fn argmax(&self, x: &DeviceBuffer, cols: usize) -> Result<Vec<u32>, BackendError> {
        self.dev.argmax(dev(x)?, cols).map_err(err)
    }

    fn top_k(
        &self,
        x: &DeviceBuffer,
        cols: usize,
        k: usize,
    ) -> Result<Vec<(u32, f32)>, BackendError> {
        self.dev.top_k(dev(x)?, cols, k).map_err(err)
    }
}
