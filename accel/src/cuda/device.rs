//! The CUDA device side of the accelerator, through `cudarc` with the
//! CUDA libraries loaded at run time: this module builds (and the loader runs)
//! on machines with no CUDA at all, and [`Device::open`] turns a missing
//! driver, NVRTC or cuBLAS into [`CudaError::NotAvailable`] instead of the
//! panic `cudarc` would raise.
//!
//! It owns the context and one stream, device tensors ([`Tensor`]), weight
//! upload through two pinned staging buffers allocated by the driver, the
//! kernels (`kernels.cu`, embedded and compiled by NVRTC once per process),
//! the cuBLAS handle, and one safe function per op of the accelerator's op
//! set with the CPU backend's semantics (see `crate::cpu`). `unsafe` is
//! denied everywhere but in the private module `cuda::device::ffi`, where
//! every block carries a `// SAFETY:` comment.

mod ffi;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError};
use ffi::{AnyRef, CacheMut, CacheRef, Kernels, Staging};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The kernel source, compiled by NVRTC at first use.
pub const KERNELS_CU: &str = include_str!("kernels.cu");

/// Quantized matmuls with at most this many activation rows run the GEMV
/// kernel (bit-for-bit the CPU backend's block sums); more rows (prompt
/// processing) dequantize weight tiles and run cuBLAS SGEMM.
pub const GEMV_MAX_ROWS: usize = 8;
/// Largest output width for which a decode matmul quantizes its activation
/// inside the GEMV (`gemv_qx`, one launch) rather than in a launch of its own:
/// every thread block (8 output columns) quantizes the whole row again, so
/// for a wide matmul (a vocabulary head) that repeated work outgrows the
/// launch it saves; there the separate `quantize_act` runs once.
pub const GEMV_FUSED_MAX_N: usize = 8192;

/// Bytes of each of the two pinned staging buffers.
const STAGING_BYTES: usize = 8 << 20;

/// f32 elements of one dequantized weight tile for the prompt GEMM (64 MiB).
const TILE_ELEMS: usize = 16 << 20;

/// A CUDA failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// A library or device is missing: a configuration error.
    #[error("CUDA backend not available: {what} ({hint})")]
    NotAvailable {
        /// What is missing.
        what: &'static str,
        /// How to provide it.
        hint: String,
    },
    /// The device ran out of memory.
    #[error("CUDA device out of memory")]
    OutOfMemory,
    /// A driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// NVRTC could not compile the kernels.
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0}")]
    Blas(String),
    /// Operands do not fit the op (a validation bug upstream).
    #[error("bad operands: {0}")]
    Shape(String),
    /// The op does not take this element type.
    #[error("op does not take {0:?} operands")]
    Unsupported(DType),
}

impl CudaError {
    fn driver(e: DriverError) -> Self {
        if e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            CudaError::OutOfMemory
        } else {
            CudaError::Driver(format!("{e:?}"))
        }
    }
}

/// Element types of device tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// f32
    F32,
    /// IEEE half bits
    F16,
    /// GGUF Q4_1 blocks (20 bytes per 32 elements)
    Q4_1,
    /// GGUF Q8_0 blocks (34 bytes per 32 elements)
    Q8_0,
}

impl DType {
    /// The kernels' code for the type.
    fn code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_1 => 2,
            DType::Q8_0 => 3,
        }
    }
}

enum Data {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
    Blocks(CudaSlice<u8>),
}

/// A tensor in device memory: a `CudaSlice`, its element type and length.
pub struct Tensor {
    data: Data,
    dtype: DType,
    len: usize,
}

impl std::fmt::Debug for Tensor {
    // Never print contents: tensors may hold weights or activations.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda::Tensor({:?}, {} elements)", self.dtype, self.len)
    }
}

impl Tensor {
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements (quantized: 32 per block).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn f32(&self) -> Result<&CudaSlice<f32>, CudaError> {
        match &self.data {
            Data::F32(s) => Ok(s),
            _ => Err(CudaError::Unsupported(self.dtype)),
        }
    }
    fn any(&self) -> AnyRef<'_> {
        match &self.data {
            Data::F32(s) => AnyRef::F32(s),
            Data::F16(s) => AnyRef::F16(s),
            Data::Blocks(s) => AnyRef::Bytes(s),
        }
    }
}

/// The backend's elementwise binary operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// a + b
    Add,
    /// a · b
    Mul,
}

/// Checks that the CUDA driver, NVRTC and cuBLAS libraries can be opened,
/// without initialising CUDA. The error names the first one missing.
pub fn probe() -> Result<(), CudaError> {
    let libs = "LD_LIBRARY_PATH must reach the CUDA 13 libraries (e.g. a Python environment's nvidia/*/lib)";
    if !ffi::driver_present() {
        return Err(CudaError::NotAvailable {
            what: "the NVIDIA driver library libcuda.so",
            hint: "install the NVIDIA driver, or configure backend = \"cpu\"".into(),
        });
    }
    if !ffi::nvrtc_present() {
        return Err(CudaError::NotAvailable {
            what: "NVRTC (libnvrtc.so.13)",
            hint: libs.into(),
        });
    }
    if !ffi::cublas_present() {
        return Err(CudaError::NotAvailable {
            what: "cuBLAS (libcublas.so.13)",
            hint: libs.into(),
        });
    }
    Ok(())
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol in an old driver,
/// say) into a configuration error.
fn no_panic<T>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, CudaError>,
) -> Result<T, CudaError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(CudaError::NotAvailable {
                what,
                hint: format!("the CUDA library failed: {msg}"),
            })
        }
    }
}

/// NVRTC compilation of the kernels for `compute_{major}{minor}`.
fn compile(arch: (i32, i32)) -> Result<cudarc::nvrtc::Ptx, String> {
    let opts = cudarc::nvrtc::CompileOptions {
        // No contraction: the arithmetic follows the CPU backend (fmaf where it uses mul_add).
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        use_fast_math: Some(false),
        options: vec![format!("--gpu-architecture=compute_{}{}", arch.0, arch.1)],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(KERNELS_CU, opts).map_err(|e| format!("{e:?}"))
}

/// Compiles the kernels with NVRTC for `compute_{major}{minor}` without a
/// device (a check for machines with NVRTC but no GPU); the PTX text.
pub fn kernels_ptx(arch: (i32, i32)) -> Result<String, CudaError> {
    if !ffi::nvrtc_present() {
        return Err(CudaError::NotAvailable {
            what: "NVRTC (libnvrtc.so.13)",
            hint: "LD_LIBRARY_PATH must reach it".into(),
        });
    }
    no_panic("NVRTC", || {
        compile(arch)
            .map(|p| p.to_src())
            .map_err(CudaError::Compile)
    })
}

/// The kernels' PTX, compiled once per process (for the first device's architecture).
fn ptx(arch: (i32, i32)) -> Result<cudarc::nvrtc::Ptx, CudaError> {
    static PTX: OnceLock<Result<cudarc::nvrtc::Ptx, String>> = OnceLock::new();
    PTX.get_or_init(|| compile(arch))
        .clone()
        .map_err(CudaError::Compile)
}

/// Device memory reused by every decode-sized quantized matmul for its
/// quantized activations (values, block scales, block sums): allocating and
/// freeing them per launch was most of a decode step's driver calls. All work
/// is on the device's one stream, so each use is ordered after the previous
/// one's kernels; the lock is held while a matmul enqueues them.
#[derive(Default)]
struct ActScratch {
    q: Option<CudaSlice<i8>>,
    d: Option<CudaSlice<f32>>,
    s: Option<CudaSlice<f32>>,
}

/// `slot`'s buffer with at least `len` elements (a larger one replaces it).
fn grown<'a, T: ffi::Pod>(
    stream: &Arc<CudaStream>,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>, CudaError> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = None;
        *slot = Some(ffi::alloc(stream, len.max(1), false)?);
    }
    slot.as_mut()
        .ok_or_else(|| CudaError::Shape("scratch buffer".into()))
}

/// One CUDA device: context, stream, kernels, cuBLAS handle, staging buffers.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    blas: Mutex<CudaBlas>,
    staging: Mutex<Staging>,
    act: Mutex<ActScratch>,
    poison: AtomicBool,
    name: String,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda::Device({})", self.name)
    }
}

fn u32_of(v: usize, what: &str) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::Shape(format!("{what} too large: {v}")))
}

fn shape(ok: bool, msg: &str) -> Result<(), CudaError> {
    if ok {
        Ok(())
    } else {
        Err(CudaError::Shape(msg.into()))
    }
}

impl Device {
    /// Opens device `ordinal` after [`probe`]: creates the context and
    /// stream, compiles (once per process) and loads the kernels, creates the
    /// cuBLAS handle and the staging buffers. Never panics.
    pub fn open(ordinal: usize) -> Result<Arc<Device>, CudaError> {
        probe()?;
        no_panic("a usable CUDA device", || {
            let count = CudaContext::device_count().map_err(CudaError::driver)?;
            if count <= ordinal as i32 {
                return Err(CudaError::NotAvailable {
                    what: "a CUDA device",
                    hint: format!("the driver reports {count} device(s)"),
                });
            }
            let ctx = ffi::single_stream_context(ordinal)?;
            let name = ctx.name().map_err(CudaError::driver)?;
            let arch = ctx.compute_capability().map_err(CudaError::driver)?;
            let stream = ctx.default_stream();
            let kernels = Kernels::load(&ctx, ptx(arch)?)?;
            let blas =
                CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas(format!("{e:?}")))?;
            let staging = Staging::new(&ctx, STAGING_BYTES)?;
            Ok(Arc::new(Device {
                ctx,
                stream,
                kernels,
                blas: Mutex::new(blas),
                staging: Mutex::new(staging),
                act: Mutex::new(ActScratch::default()),
                poison: AtomicBool::new(false),
                name,
            }))
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fill every new output with NaN bytes before its kernel runs (tests:
    /// an element a kernel fails to write shows up as NaN).
    pub fn set_poison_outputs(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(CudaError::driver)
    }

    fn out(&self, len: usize) -> Result<CudaSlice<f32>, CudaError> {
        ffi::alloc(&self.stream, len, self.poison.load(Ordering::Relaxed))
    }

    fn scratch<T: ffi::Pod>(&self, len: usize) -> Result<CudaSlice<T>, CudaError> {
        ffi::alloc(&self.stream, len, false)
    }

    fn f32_tensor(data: CudaSlice<f32>, len: usize) -> Tensor {
        Tensor {
            data: Data::F32(data),
            dtype: DType::F32,
            len,
        }
    }

    /// `len` zeros (f32 or f16).
    pub fn zeros(&self, dtype: DType, len: usize) -> Result<Tensor, CudaError> {
        let data = match dtype {
            DType::F32 => Data::F32(
                self.stream
                    .alloc_zeros(len.max(1))
                    .map_err(CudaError::driver)?,
            ),
            DType::F16 => Data::F16(
                self.stream
                    .alloc_zeros(len.max(1))
                    .map_err(CudaError::driver)?,
            ),
            other => return Err(CudaError::Unsupported(other)),
        };
        Ok(Tensor { data, dtype, len })
    }

    /// Copies f32 data to the device.
    pub fn upload_f32(&self, data: &[f32]) -> Result<Tensor, CudaError> {
        let s = self.stream.clone_htod(data).map_err(CudaError::driver)?;
        Ok(Self::f32_tensor(s, data.len()))
    }

    /// Uploads a host tensor of `len` elements of `dtype` through the pinned
    /// staging buffers: `fill(first_unit, bytes)` writes the little-endian
    /// GGUF bytes of whole units (one element for f32/f16, one block for
    /// Q4_1/Q8_0) starting at unit `first_unit`.
    pub fn upload_staged(
        &self,
        dtype: DType,
        len: usize,
        fill: impl FnMut(usize, &mut [u8]),
    ) -> Result<Tensor, CudaError> {
        let (unit, units) = match dtype {
            DType::F32 => (4, len),
            DType::F16 => (2, len),
            DType::Q4_1 => (20, len.div_ceil(32)),
            DType::Q8_0 => (34, len.div_ceil(32)),
        };
        let mut staging = self
            .staging
            .lock()
            .map_err(|_| CudaError::Driver("staging lock poisoned".into()))?;
        let bytes = units * unit;
        let data = match dtype {
            DType::F32 => {
                let mut d = self.scratch::<f32>(len)?;
                if bytes > 0 {
                    staging.upload(&self.stream, &mut d, bytes, unit, fill)?;
                }
                Data::F32(d)
            }
            DType::F16 => {
                let mut d = self.scratch::<u16>(len)?;
                if bytes > 0 {
                    staging.upload(&self.stream, &mut d, bytes, unit, fill)?;
                }
                Data::F16(d)
            }
            DType::Q4_1 | DType::Q8_0 => {
                let mut d = self.scratch::<u8>(bytes)?;
                if bytes > 0 {
                    staging.upload(&self.stream, &mut d, bytes, unit, fill)?;
                }
                Data::Blocks(d)
            }
        };
        Ok(Tensor { data, dtype, len })
    }

    /// An f32 or f16 tensor as f32 on the host.
    pub fn download(&self, t: &Tensor) -> Result<Vec<f32>, CudaError> {
        match &t.data {
            Data::F32(s) => {
                let mut v = self.stream.clone_dtoh(s).map_err(CudaError::driver)?;
                v.truncate(t.len);
                Ok(v)
            }
            Data::F16(s) => {
                let v = self.stream.clone_dtoh(s).map_err(CudaError::driver)?;
                Ok(v[..t.len]
                    .iter()
                    .map(|b| half::f16::from_bits(*b).to_f32())
                    .collect())
            }
            Data::Blocks(_) => Err(CudaError::Unsupported(t.dtype)),
        }
    }

    /// Elements `range` of an f32 or f16 tensor.
    pub fn copy_range(
        &self,
        t: &Tensor,
        range: std::ops::Range<usize>,
    ) -> Result<Tensor, CudaError> {
        shape(
            range.start <= range.end && range.end <= t.len,
            "copy_range out of bounds",
        )?;
        let n = range.len();
        match &t.data {
            Data::F32(s) => {
                let mut out = self.out(n)?;
                let src = s.slice(range);
                let mut dst = out.slice_mut(0..n);
                self.stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(CudaError::driver)?;
                Ok(Self::f32_tensor(out, n))
            }
            Data::F16(s) => {
                let mut out: CudaSlice<u16> = self.scratch(n)?;
                let src = s.slice(range);
                let mut dst = out.slice_mut(0..n);
                self.stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(CudaError::driver)?;
                Ok(Tensor {
                    data: Data::F16(out),
                    dtype: DType::F16,
                    len: n,
                })
            }
            Data::Blocks(_) => Err(CudaError::Unsupported(t.dtype)),
        }
    }

    /// `x` f32 [m, k] · `w` [n, k]ᵀ → f32 [m, n] with the CPU backend's
    /// arithmetic: f32 weights take x as is, f16 weights f16-rounded x,
    /// Q4_1 weights Q8_1-quantized x and Q8_0 weights Q8_0-quantized x.
    pub fn matmul(
        &self,
        x: &Tensor,
        w: &Tensor,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Tensor, CudaError> {
        let xs = x.f32()?;
        shape(
            x.len >= m * k && w.len >= n * k,
            "matmul operands too small",
        )?;
        let mut out = self.out(m * n)?;
        let blas = || {
            self.blas
                .lock()
                .map_err(|_| CudaError::Blas("handle lock poisoned".into()))
        };
        match (&w.data, w.dtype) {
            (Data::F32(ws), _) => {
                ffi::sgemm_nt(&*blas()?, xs, ws, 0, &mut out, m, k, n, 0, n)?;
            }
            (Data::F16(_), _) => {
                let mut xr = self.scratch::<f32>(m * k)?;
                self.kernels
                    .round_f16(&self.stream, xs, &mut xr, u32_of(m * k, "matmul")?)?;
                self.tiled_gemm(&xr, w, &mut out, m, k, k, n)?;
            }
            (Data::Blocks(wb), dt) => {
                shape(
                    k.is_multiple_of(32),
                    "quantized matmul needs k a multiple of 32",
                )?;
                let blocks = m * k / 32;
                let kb = u32_of(k / 32, "k")?;
                if m <= GEMV_MAX_ROWS
                    && n <= GEMV_FUSED_MAX_N
                    && ffi::Kernels::gemv_qx_shared_bytes(kb).is_some()
                {
                    // One launch: the activation is quantized inside.
                    self.kernels.gemv_qx(
                        &self.stream,
                        wb,
                        dt.code(),
                        xs,
                        &mut out,
                        u32_of(m, "m")?,
                        u32_of(n, "n")?,
                        kb,
                    )?;
                } else if m <= GEMV_MAX_ROWS {
                    let mut act = self
                        .act
                        .lock()
                        .map_err(|_| CudaError::Shape("scratch lock poisoned".into()))?;
                    let ActScratch { q, d, s } = &mut *act;
                    let q = grown(&self.stream, q, m * k)?;
                    let d = grown(&self.stream, d, blocks)?;
                    let s = grown(&self.stream, s, blocks)?;
                    self.kernels.quantize_act(
                        &self.stream,
                        xs,
                        q,
                        d,
                        s,
                        u32_of(blocks, "matmul")?,
                    )?;
                    self.kernels.gemv_q(
                        &self.stream,
                        wb,
                        dt.code(),
                        q,
                        d,
                        s,
                        &mut out,
                        u32_of(m, "m")?,
                        u32_of(n, "n")?,
                        kb,
                    )?;
                } else {
                    let mut q = self.scratch::<i8>(m * k)?;
                    let mut d = self.scratch::<f32>(blocks)?;
                    let mut s = self.scratch::<f32>(blocks)?;
                    self.kernels.quantize_act(
                        &self.stream,
                        xs,
                        &mut q,
                        &mut d,
                        &mut s,
                        u32_of(blocks, "matmul")?,
                    )?;
                    let with_s = dt == DType::Q4_1;
                    let ld = if with_s { k + k / 32 } else { k };
                    let mut xd = self.scratch::<f32>(m * ld)?;
                    self.kernels.dequant_act(
                        &self.stream,
                        &q,
                        &d,
                        &s,
                        &mut xd,
                        u32_of(m, "m")?,
                        u32_of(k, "k")?,
                        with_s,
                    )?;
                    self.tiled_gemm(&xd, w, &mut out, m, k, ld, n)?;
                }
            }
        }
        Ok(Self::f32_tensor(out, m * n))
    }

    /// out [m, n] = x [m, ld] · dequant(w)ᵀ, dequantizing `w` a tile of rows at a time.
    #[allow(clippy::too_many_arguments)]
    fn tiled_gemm(
        &self,
        x: &CudaSlice<f32>,
        w: &Tensor,
        out: &mut CudaSlice<f32>,
        m: usize,
        k: usize,
        ld: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        let rows_per_tile = (TILE_ELEMS / ld.max(1)).clamp(1, n.max(1));
        let mut tile = self.scratch::<f32>(rows_per_tile * ld)?;
        let blas = self
            .blas
            .lock()
            .map_err(|_| CudaError::Blas("handle lock poisoned".into()))?;
        let mut j0 = 0;
        while j0 < n {
            let nt = rows_per_tile.min(n - j0);
            self.kernels.dequant_tile(
                &self.stream,
                w.any(),
                w.dtype.code(),
                &mut tile,
                u32_of(j0, "rows")?,
                u32_of(nt, "rows")?,
                u32_of(k, "k")?,
            )?;
            ffi::sgemm_nt(&blas, x, &tile, 0, out, m, ld, n, j0, nt)?;
            j0 += nt;
        }
        Ok(())
    }

    /// Rows `ids` of `table` [rows, d] (any dtype) as f32 [len(ids), d].
    pub fn embedding(&self, table: &Tensor, d: usize, ids: &[u32]) -> Result<Tensor, CudaError> {
        shape(
            d > 0 && (!table.dtype.is_quantized() || d.is_multiple_of(32)),
            "embedding row length",
        )?;
        let rows = table.len / d;
        shape(
            ids.iter().all(|i| (*i as usize) < rows),
            "embedding id out of range",
        )?;
        let ids_dev = self.stream.clone_htod(ids).map_err(CudaError::driver)?;
        let mut out = self.out(ids.len() * d)?;
        self.kernels.embedding(
            &self.stream,
            table.any(),
            table.dtype.code(),
            rows as u64,
            &ids_dev,
            &mut out,
            u32_of(ids.len(), "ids")?,
            u32_of(d, "d")?,
        )?;
        Ok(Self::f32_tensor(out, ids.len() * d))
    }

    /// Elementwise `a op b`, `b` broadcast over rows of `cols` when it is shorter.
    pub fn binary(
        &self,
        op: Binary,
        a: &Tensor,
        b: &Tensor,
        cols: usize,
    ) -> Result<Tensor, CudaError> {
        let (av, bv) = (a.f32()?, b.f32()?);
        let bn = if a.len == b.len { b.len } else { cols };
        shape(
            bn > 0 && bn <= b.len && a.len.is_multiple_of(bn),
            "binary shapes",
        )?;
        let mut out = self.out(a.len)?;
        let code = match op {
            Binary::Add => 0,
            Binary::Mul => 1,
        };
        self.kernels.binary(
            &self.stream,
            av,
            bv,
            &mut out,
            u32_of(a.len, "n")?,
            u32_of(bn, "cols")?,
            code,
        )?;
        Ok(Self::f32_tensor(out, a.len))
    }

    /// x · sigmoid(x).
    pub fn silu(&self, x: &Tensor) -> Result<Tensor, CudaError> {
        let mut out = self.out(x.len)?;
        self.kernels
            .silu(&self.stream, x.f32()?, &mut out, u32_of(x.len, "n")?)?;
        Ok(Self::f32_tensor(out, x.len))
    }

    /// Row-wise RMS normalisation scaled by `w` [cols].
    pub fn rmsnorm(
        &self,
        x: &Tensor,
        w: &Tensor,
        cols: usize,
        eps: f32,
    ) -> Result<Tensor, CudaError> {
        shape(
            cols > 0 && x.len.is_multiple_of(cols) && w.len >= cols,
            "rmsnorm shapes",
        )?;
        let mut out = self.out(x.len)?;
        self.kernels.rmsnorm(
            &self.stream,
            x.f32()?,
            w.f32()?,
            &mut out,
            u32_of(x.len / cols, "rows")?,
            u32_of(cols, "cols")?,
            eps,
        )?;
        Ok(Self::f32_tensor(out, x.len))
    }

    /// Row-wise softmax.
    pub fn softmax(&self, x: &Tensor, cols: usize) -> Result<Tensor, CudaError> {
        shape(cols > 0 && x.len.is_multiple_of(cols), "softmax shapes")?;
        let mut out = self.out(x.len)?;
        self.kernels.softmax(
            &self.stream,
            x.f32()?,
            &mut out,
            u32_of(x.len / cols, "rows")?,
            u32_of(cols, "cols")?,
        )?;
        Ok(Self::f32_tensor(out, x.len))
    }

    /// RoPE on adjacent pairs of `x` [seq, heads, head_dim]; row s at position `pos + s`.
    pub fn rope(
        &self,
        x: &Tensor,
        heads: usize,
        head_dim: usize,
        pos: u32,
        theta: f32,
    ) -> Result<Tensor, CudaError> {
        let row = heads * head_dim;
        shape(
            row > 0 && head_dim.is_multiple_of(2) && x.len.is_multiple_of(row),
            "rope shapes",
        )?;
        // The CPU backend's scale, computed by the same Rust powf.
        let theta_scale = theta.powf(-2.0 / head_dim as f32);
        let mut out = self.out(x.len)?;
        self.kernels.rope(
            &self.stream,
            x.f32()?,
            &mut out,
            u32_of(x.len / row, "seq")?,
            u32_of(heads, "heads")?,
            u32_of(head_dim, "head_dim")?,
            pos,
            theta_scale,
        )?;
        Ok(Self::f32_tensor(out, x.len))
    }

    /// Writes `k`, `v` [seq, kv_heads, head_dim] into the caches at rows
    /// `pos..pos+seq` and returns causal attention of `q` [seq, heads, head_dim]
    /// over cache rows `0..=pos+i` (f16 caches: f16 rounding of q and of the
    /// probabilities, as llama.cpp and the CPU backend).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        k_cache: &mut Tensor,
        v_cache: &mut Tensor,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        pos: usize,
    ) -> Result<Tensor, CudaError> {
        let row = kv_heads * head_dim;
        shape(
            kv_heads > 0 && heads.is_multiple_of(kv_heads) && q.len >= seq * heads * head_dim,
            "attention heads",
        )?;
        shape(k.len >= seq * row && v.len >= seq * row, "attention k/v")?;
        shape(
            k_cache.len >= (pos + seq) * row && v_cache.len >= (pos + seq) * row,
            "attention caches too short",
        )?;
        let n = u32_of(seq * row, "kv")?;
        let start = (pos * row) as u64;
        for (cache, src) in [(&mut *k_cache, k), (&mut *v_cache, v)] {
            let mut c = match &mut cache.data {
                Data::F32(c) => CacheMut::F32(c),
                Data::F16(c) => CacheMut::F16(c),
                Data::Blocks(_) => return Err(CudaError::Unsupported(cache.dtype)),
            };
            self.kernels
                .kv_append(&self.stream, src.f32()?, &mut c, start, n)?;
        }
        fn cref(t: &Tensor) -> Result<CacheRef<'_>, CudaError> {
            match &t.data {
                Data::F32(c) => Ok(CacheRef::F32(c)),
                Data::F16(c) => Ok(CacheRef::F16(c)),
                Data::Blocks(_) => Err(CudaError::Unsupported(t.dtype)),
            }
        }
        let mut out = self.out(seq * heads * head_dim)?;
        let mut scratch = self.scratch::<f32>(seq * heads * (pos + seq))?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        self.kernels.attention(
            &self.stream,
            q.f32()?,
            cref(k_cache)?,
            cref(v_cache)?,
            &mut out,
            &mut scratch,
            [
                u32_of(seq, "seq")?,
                u32_of(heads, "heads")?,
                u32_of(kv_heads, "kv_heads")?,
                u32_of(head_dim, "head_dim")?,
                u32_of(pos, "pos")?,
            ],
            scale,
        )?;
        Ok(Self::f32_tensor(out, seq * heads * head_dim))
    }

    /// Index of the largest element of each row (first on ties; NaN never wins).
    pub fn argmax(&self, x: &Tensor, cols: usize) -> Result<Vec<u32>, CudaError> {
        shape(cols > 0 && x.len.is_multiple_of(cols), "argmax shapes")?;
        let rows = x.len / cols;
        let mut out = self.scratch::<u32>(rows)?;
        self.kernels.argmax_rows(
            &self.stream,
            x.f32()?,
            &mut out,
            u32_of(rows, "rows")?,
            u32_of(cols, "cols")?,
        )?;
        let mut v = self.stream.clone_dtoh(&out).map_err(CudaError::driver)?;
        v.truncate(rows);
        Ok(v)
    }

    /// The `k` largest (index, value) of the last row, largest first (ties:
    /// lower index first; NaN skipped; total order, so +0 ranks above -0).
    pub fn top_k(&self, x: &Tensor, cols: usize, k: usize) -> Result<Vec<(u32, f32)>, CudaError> {
        shape(cols > 0 && x.len >= cols, "top_k shapes")?;
        let k = k.min(cols);
        if k == 0 {
            return Ok(Vec::new());
        }
        let mut idx = self.scratch::<u32>(k)?;
        let mut val = self.scratch::<f32>(k)?;
        let mut count = self.scratch::<u32>(1)?;
        self.kernels.top_k(
            &self.stream,
            x.f32()?,
            x.len - cols,
            u32_of(cols, "cols")?,
            u32_of(k, "k")?,
            &mut idx,
            &mut val,
            &mut count,
        )?;
        let n = self.stream.clone_dtoh(&count).map_err(CudaError::driver)?;
        let n = (n.first().copied().unwrap_or(0) as usize).min(k);
        if n == 0 {
            return Ok(Vec::new());
        }
        // Only the `n` entries the kernel wrote: the rest of the scratch
        // buffers is uninitialized device memory (compute-sanitizer's
        // initcheck flagged copying it back, even though it was dropped).
        let idx = self
            .stream
            .clone_dtoh(&idx.slice(..n))
            .map_err(CudaError::driver)?;
        let val = self
            .stream
            .clone_dtoh(&val.slice(..n))
            .map_err(CudaError::driver)?;
        Ok(idx.into_iter().zip(val).collect())
    }

    /// The context (for diagnostics).
    pub fn compute_capability(&self) -> Result<(i32, i32), CudaError> {
        self.ctx.compute_capability().map_err(CudaError::driver)
    }
}

impl DType {
    fn is_quantized(self) -> bool {
        matches!(self, DType::Q4_1 | DType::Q8_0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where a check may not skip: CI installs NVRTC and ptxas (pip wheels,
    /// scripts/setup) and sets this, so a missing tool fails instead of skipping.
    fn required() -> bool {
        std::env::var_os("CINFER_REQUIRE_NVRTC").is_some_and(|v| v == "1")
    }

    #[test]
    fn missing_libraries_are_a_clear_error_and_kernels_compile_where_nvrtc_is() {
        match Device::open(0) {
            Ok(d) => println!("device: {}", d.name()),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("not available"), "{msg}");
                println!("no device: {msg}");
            }
        }
        match kernels_ptx((9, 0)) {
            Ok(ptx) => {
                // Every kernel the launcher loads is in the PTX.
                for name in ffi::KERNEL_NAMES {
                    assert!(
                        ptx.contains(&format!(".entry {name}(")),
                        "kernel {name} missing from the PTX"
                    );
                }
            }
            Err(CudaError::NotAvailable { .. }) if !required() => {
                println!("skipped: NVRTC not found")
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The PTX assembles for Hopper (sm_90, the H100/H200) with ptxas, and no
    /// kernel spills registers to local memory. ptxas is `$CINFER_PTXAS`, else
    /// `ptxas` on the PATH; skipped (with the reason) where neither is there.
    #[test]
    fn kernels_assemble_for_sm_90_without_spills() {
        let ptxas = std::env::var_os("CINFER_PTXAS").unwrap_or_else(|| "ptxas".into());
        let have_ptxas = std::process::Command::new(&ptxas)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let ptx = match kernels_ptx((9, 0)) {
            Ok(p) if have_ptxas => p,
            Ok(_) | Err(CudaError::NotAvailable { .. }) if !required() => {
                println!("skipped: NVRTC or ptxas not found");
                return;
            }
            Ok(_) => panic!("ptxas not found ({ptxas:?}) where CINFER_REQUIRE_NVRTC=1"),
            Err(e) => panic!("{e}"),
        };
        let dir = std::env::temp_dir().join(format!("cinfer-ptxas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("kernels.ptx");
        std::fs::write(&file, ptx).unwrap_or_else(|e| panic!("{e}"));
        let out = std::process::Command::new(&ptxas)
            .args(["-arch=sm_90", "-v", "-o"])
            .arg(dir.join("kernels.cubin"))
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_dir_all(&dir);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ptxas failed:\n{log}");
        let spills: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("spill") && !l.contains("0 bytes spill stores, 0 bytes spill loads")
            })
            .collect();
        assert!(spills.is_empty(), "register spills:\n{}", spills.join("\n"));
        let functions = log
            .lines()
            .filter(|l| l.contains("Compiling entry function"))
            .count();
        assert_eq!(functions, ffi::KERNEL_NAMES.len(), "{log}");
        println!("{log}");
    }
}
