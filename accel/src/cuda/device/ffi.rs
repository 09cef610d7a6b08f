//! Every call into CUDA that Rust cannot check: library probing, uninitialised
//! allocations, pinned staging copies, kernel launches and cuBLAS. The only
//! module of the trusted code where `unsafe` is allowed; each block says why it
//! is sound. Launch wrappers check, right before launching, that every buffer
//! holds at least the elements the kernel will touch for the sizes passed
//! (kernels index only below those sizes: see kernels.cu).
#![allow(unsafe_code)]

use super::CudaError;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use std::sync::Arc;

/// Whether the driver library (libcuda) can be opened.
pub(crate) fn driver_present() -> bool {
    // SAFETY: opens the library with dlopen and closes it; runs no CUDA code.
    // Library initialisers of libcuda are trusted as the driver itself is.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC can be opened.
pub(crate) fn nvrtc_present() -> bool {
    // SAFETY: as `driver_present`, for libnvrtc.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether cuBLAS can be opened.
pub(crate) fn cublas_present() -> bool {
    // SAFETY: as `driver_present`, for libcublas.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// A context for device `ordinal` whose buffers do not track their uses with
/// CUDA events. cudarc's tracking gives every allocation two events (created
/// with it, destroyed with it: four driver calls an allocation) to order
/// uses across streams; this backend uses one stream per context (its
/// default stream, which cuBLAS shares) and orders its host copies with its
/// own events (`Staging`), so the tracking only costs time: about a fifth
/// of a decode step's host time on an H200, where decode is bound by the
/// host's launches and allocations.
pub(crate) fn single_stream_context(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    let ctx = CudaContext::new(ordinal).map_err(CudaError::driver)?;
    // SAFETY: called before any buffer of this context exists, and the
    // context never gets a second stream (`Device` uses `default_stream`
    // only; `new_stream` is never called), so no buffer is ever used on a
    // stream other than the one that allocated it, frees it and orders every
    // use of it: the synchronization the events would provide is the
    // stream's own order.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// Element types whose every bit pattern is a valid value, so uninitialised
/// device memory read back is still a valid (if meaningless) value.
pub(crate) trait Pod: DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy {}
impl Pod for f32 {}
impl Pod for u16 {}
impl Pod for u8 {}
impl Pod for i8 {}
impl Pod for u32 {}

/// `len` elements of device memory, not initialised (kernels overwrite them;
/// with `poison` every byte is set to 0xff first: NaN for f32 and f16).
pub(crate) fn alloc<T: Pod>(
    stream: &Arc<CudaStream>,
    len: usize,
    poison: bool,
) -> Result<CudaSlice<T>, CudaError> {
    // SAFETY: `T: Pod`: any bytes are a valid `T`, so contents left by a
    // previous allocation are harmless; the slice owns its allocation.
    let mut s = unsafe { stream.alloc::<T>(len.max(1)) }.map_err(CudaError::driver)?;
    if poison {
        let bytes = s.num_bytes();
        let (ptr, _sync) = s.device_ptr_mut(stream);
        // SAFETY: `ptr` addresses `bytes` bytes owned by `s`, which outlives
        // the stream-ordered memset (`_sync` orders it before any later use).
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }
            .map_err(CudaError::driver)?;
    }
    Ok(s)
}

/// Two pinned, write-combined host buffers allocated by the driver
/// (`cuMemHostAlloc`), each with an event recorded after its last copy.
pub(crate) struct Staging {
    bufs: [(PinnedHostSlice<u8>, CudaEvent); 2],
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Staging(2 × {} bytes)", self.bufs[0].0.len())
    }
}

impl Staging {
    pub(crate) fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, CudaError> {
        let one = || -> Result<(PinnedHostSlice<u8>, CudaEvent), CudaError> {
            // SAFETY: the memory is uninitialised bytes; it is only ever
            // written (by `upload`) before a copy reads it.
            let p = unsafe { ctx.alloc_pinned::<u8>(bytes) }.map_err(CudaError::driver)?;
            let e = ctx.new_event(None).map_err(CudaError::driver)?;
            Ok((p, e))
        };
        Ok(Staging {
            bufs: [one()?, one()?],
        })
    }

    /// Fills `dst` chunk by chunk: `fill(unit_index, chunk)` writes whole
    /// units of `unit` bytes; while one buffer is copied the other is filled.
    pub(crate) fn upload<T: Pod>(
        &mut self,
        stream: &Arc<CudaStream>,
        dst: &mut CudaSlice<T>,
        total: usize,
        unit: usize,
        mut fill: impl FnMut(usize, &mut [u8]),
    ) -> Result<(), CudaError> {
        let cap = self.bufs[0].0.len();
        let chunk = (cap / unit.max(1)) * unit;
        if unit == 0 || chunk == 0 || !total.is_multiple_of(unit) || total > dst.num_bytes() {
            return Err(CudaError::Shape("staged upload: bad sizes".into()));
        }
        let (base, _sync) = dst.device_ptr_mut(stream);
        let mut off = 0usize;
        let mut which = 0usize;
        while off < total {
            let n = chunk.min(total - off);
            let (pinned, event) = &mut self.bufs[which];
            // Wait until the previous copy out of this buffer has finished.
            event.synchronize().map_err(CudaError::driver)?;
            let host = pinned.as_mut_slice().map_err(CudaError::driver)?;
            let part = &mut host[..n];
            fill(off / unit, part);
            // SAFETY: `base + off .. + n` lies inside `dst` (off + n ≤ total ≤
            // its bytes, checked), which outlives the stream-ordered copy
            // (`_sync` orders later uses after it); `part` is `n` bytes of
            // pinned memory not written again before `event`, recorded right
            // after this copy, has completed (waited above).
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    base + off as u64,
                    &*part,
                    stream.cu_stream(),
                )
            }
            .map_err(CudaError::driver)?;
            event.record(stream).map_err(CudaError::driver)?;
            off += n;
            which ^= 1;
        }
        Ok(())
    }
}

fn need<T>(s: &CudaSlice<T>, n: u64, what: &str) -> Result<(), CudaError> {
    if (s.len() as u64) < n {
        return Err(CudaError::Shape(format!(
            "{what}: buffer of {} elements, kernel needs {n}",
            s.len()
        )));
    }
    Ok(())
}

fn grid(n: u64, block: u32) -> Result<LaunchConfig, CudaError> {
    let blocks = n.div_ceil(u64::from(block)).max(1);
    let blocks = u32::try_from(blocks).map_err(|_| CudaError::Shape("launch too large".into()))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block per row; callers return before launching zero rows.
fn rows_cfg(rows: u32, block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The raw device pointers a kernel gets for a weight or table of any dtype.
pub(crate) enum AnyRef<'a> {
    F32(&'a CudaSlice<f32>),
    F16(&'a CudaSlice<u16>),
    Bytes(&'a CudaSlice<u8>),
}

impl AnyRef<'_> {
    /// Bytes the buffer holds.
    fn bytes(&self) -> u64 {
        match self {
            AnyRef::F32(s) => s.len() as u64 * 4,
            AnyRef::F16(s) => s.len() as u64 * 2,
            AnyRef::Bytes(s) => s.len() as u64,
        }
    }
}

macro_rules! push_any {
    ($b:expr, $a:expr) => {
        match $a {
            AnyRef::F32(s) => $b.arg(*s),
            AnyRef::F16(s) => $b.arg(*s),
            AnyRef::Bytes(s) => $b.arg(*s),
        }
    };
}

/// Bytes of `elems` elements of kernel dtype `dt` (0 f32, 1 f16, 2 Q4_1, 3 Q8_0).
fn dt_bytes(dt: u32, elems: u64) -> u64 {
    match dt {
        0 => elems * 4,
        1 => elems * 2,
        2 => elems.div_ceil(32) * 20,
        _ => elems.div_ceil(32) * 34,
    }
}

/// The kernels of kernels.cu loaded into one context.
pub(crate) struct Kernels {
    f: std::collections::HashMap<&'static str, CudaFunction>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({})", self.f.len())
    }
}

/// What `gemv_q` and `gemv_qx` check alike: a quantized weight type (2:
/// Q4_1, 3: Q8_0), `w` holding n rows of kb blocks and `out` m·n values.
#[allow(clippy::too_many_arguments)]
fn check_gemv(
    kernel: &str,
    w: &CudaSlice<u8>,
    dtype: u32,
    out: &CudaSlice<f32>,
    m: u32,
    n: u32,
    kb: u32,
) -> Result<(), CudaError> {
    if dtype != 2 && dtype != 3 {
        return Err(CudaError::Shape(format!("{kernel} takes Q4_1 or Q8_0")));
    }
    let nn = u64::from(n);
    need(w, dt_bytes(dtype, nn * u64::from(kb) * 32), "gemv w")?;
    need(out, u64::from(m) * nn, "gemv out")
}

/// The GEMV grid: 8 output columns (one a warp) per 256-thread block, one
/// block row per activation row.
fn gemv_cfg(m: u32, n: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(8), m, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes,
    }
}

pub(crate) const KERNEL_NAMES: [&str; 16] = [
    "quantize_act",
    "dequant_act",
    "round_f16_f32",
    "gemv_q",
    "gemv_qx",
    "dequant_tile",
    "embedding",
    "binary",
    "silu",
    "rmsnorm",
    "softmax",
    "rope",
    "kv_append",
    "attention",
    "argmax_rows",
    "top_k",
];

impl Kernels {
    pub(crate) fn load(ctx: &Arc<CudaContext>, ptx: cudarc::nvrtc::Ptx) -> Result<Self, CudaError> {
        let module = ctx.load_module(ptx).map_err(CudaError::driver)?;
        let mut f = std::collections::HashMap::new();
        for n in KERNEL_NAMES {
            f.insert(n, module.load_function(n).map_err(CudaError::driver)?);
        }
        Ok(Kernels { f })
    }

    fn get(&self, n: &str) -> Result<&CudaFunction, CudaError> {
        self.f
            .get(n)
            .ok_or_else(|| CudaError::Driver(format!("kernel {n} not loaded")))
    }

    /// Q8_1/Q8_0 activation quantization of `x` [blocks·32].
    pub(crate) fn quantize_act(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        q: &mut CudaSlice<i8>,
        d: &mut CudaSlice<f32>,
        sums: &mut CudaSlice<f32>,
        blocks: u32,
    ) -> Result<(), CudaError> {
        let b = u64::from(blocks);
        need(x, b * 32, "quantize x")?;
        need(q, b * 32, "quantize q")?;
        need(d, b, "quantize d")?;
        need(sums, b, "quantize s")?;
        let f = self.get("quantize_act")?;
        let mut l = s.launch_builder(f);
        l.arg(x).arg(q).arg(d).arg(sums).arg(&blocks);
        // SAFETY: argument types match the kernel signature; buffers hold
        // `blocks` blocks (checked above) and the kernel touches no more.
        unsafe { l.launch(grid(b * 32, 256)?) }.map_err(CudaError::driver)?;
        Ok(())
    }

    /// x' = d·q [rows, k] (plus block sums in k..k+kb when `with_s`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dequant_act(
        &self,
        s: &Arc<CudaStream>,
        q: &CudaSlice<i8>,
        d: &CudaSlice<f32>,
        sums: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: u32,
        k: u32,
        with_s: bool,
    ) -> Result<(), CudaError> {
        let (r, kk) = (u64::from(rows), u64::from(k));
        let ld = if with_s { kk + kk / 32 } else { kk };
        need(q, r * kk, "dequant_act q")?;
        need(d, r * kk / 32, "dequant_act d")?;
        need(sums, r * kk / 32, "dequant_act s")?;
        need(out, r * ld, "dequant_act out")?;
        let ws = u32::from(with_s);
        let f = self.get("dequant_act")?;
        let mut l = s.launch_builder(f);
        l.arg(q)
            .arg(d)
            .arg(sums)
            .arg(out)
            .arg(&rows)
            .arg(&k)
            .arg(&ws);
        // SAFETY: types match; every buffer holds what `rows`, `k` index (checked).
        unsafe { l.launch(grid(r * ld, 256)?) }.map_err(CudaError::driver)?;
        Ok(())
    }

    pub(crate) fn round_f16(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: u32,
    ) -> Result<(), CudaError> {
        need(x, n.into(), "round x")?;
        need(out, n.into(), "round out")?;
        let f = self.get("round_f16_f32")?;
        let mut l = s.launch_builder(f);
        l.arg(x).arg(out).arg(&n);
        // SAFETY: types match; both buffers hold `n` elements (checked).
        unsafe { l.launch(grid(n.into(), 256)?) }.map_err(CudaError::driver)?;
        Ok(())
    }

    /// Quantized GEMV: out [m, n] from weights `w` (dtype 2 or 3) [n, kb blocks].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemv_q(
        &self,
        s: &Arc<CudaStream>,
        w: &CudaSlice<u8>,
        dtype: u32,
        xq: &CudaSlice<i8>,
        xd: &CudaSlice<f32>,
        xs: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        m: u32,
        n: u32,
        kb: u32,
    ) -> Result<(), CudaError> {
        let (mm, kbb) = (u64::from(m), u64::from(kb));
        check_gemv("gemv_q", w, dtype, out, m, n, kb)?;
        need(xq, mm * kbb * 32, "gemv xq")?;
        need(xd, mm * kbb, "gemv xd")?;
        need(xs, mm * kbb, "gemv xs")?;
        if m == 0 || n == 0 {
            // Nothing to compute (a one-block grid would read row 0 of empty inputs).
            return Ok(());
        }
        let f = self.get("gemv_q")?;
        let mut l = s.launch_builder(f);
        l.arg(w)
            .arg(&dtype)
            .arg(xq)
            .arg(xd)
            .arg(xs)
            .arg(out)
            .arg(&n)
            .arg(&kb);
        let cfg = gemv_cfg(m, n, 0);
        // SAFETY: types match; weights hold n rows of kb blocks, activations m
        // rows, out m·n (checked); the grid covers exactly m × ceil(n/8)·8 rows
        // and the kernel skips j ≥ n.
        unsafe { l.launch(cfg) }.map_err(CudaError::driver)?;
        Ok(())
    }

    /// Dynamic shared memory `gemv_qx` needs for `kb` blocks a row (the
    /// row staged as f32 in 33-float strides, its quantized values, scales
    /// and sums), if within the 48 KiB every device gives a block without
    /// opting in.
    pub(crate) fn gemv_qx_shared_bytes(kb: u32) -> Option<u32> {
        let bytes = u64::from(kb) * (33 * 4 + 32 + 4 + 4);
        u32::try_from(bytes).ok().filter(|b| *b <= 48 * 1024)
    }

    /// out [m, n] = quantize(x) [m, kb·32] · wᵀ in one launch: `gemv_q` with
    /// the activation quantized per thread block in shared memory.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemv_qx(
        &self,
        s: &Arc<CudaStream>,
        w: &CudaSlice<u8>,
        dtype: u32,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        m: u32,
        n: u32,
        kb: u32,
    ) -> Result<(), CudaError> {
        check_gemv("gemv_qx", w, dtype, out, m, n, kb)?;
        let shared = Self::gemv_qx_shared_bytes(kb)
            .ok_or_else(|| CudaError::Shape("gemv_qx: row too long for shared memory".into()))?;
        need(x, u64::from(m) * u64::from(kb) * 32, "gemv_qx x")?;
        if m == 0 || n == 0 || kb == 0 {
            // Nothing to compute (a one-block grid would read row 0 of empty inputs).
            return Ok(());
        }
        let f = self.get("gemv_qx")?;
        let mut l = s.launch_builder(f);
        l.arg(w).arg(&dtype).arg(x).arg(out).arg(&n).arg(&kb);
        let cfg = gemv_cfg(m, n, shared);
        // SAFETY: types match; weights hold n rows of kb blocks, x m rows of
        // kb·32, out m·n (checked); the dynamic shared memory holds 2·kb +
        // 33·kb floats and kb·32 int8, all the kernel indexes (e < kb·32,
        // b < kb); the grid covers m × ceil(n/8)·8 rows and the kernel skips
        // j ≥ n.
        unsafe { l.launch(cfg) }.map_err(CudaError::driver)?;
        Ok(())
    }

    /// Rows `row0..row0+rows` of `w` (dtype 1, 2 or 3) [.., k] as f32 [rows, ld].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dequant_tile(
        &self,
        s: &Arc<CudaStream>,
        w: AnyRef<'_>,
        dtype: u32,
        out: &mut CudaSlice<f32>,
        row0: u32,
        rows: u32,
        k: u32,
    ) -> Result<(), CudaError> {
        let kk = u64::from(k);
        let ld = if dtype == 2 { kk + kk / 32 } else { kk };
        if !(1..=3).contains(&dtype)
            || w.bytes() < dt_bytes(dtype, (u64::from(row0) + u64::from(rows)) * kk)
        {
            return Err(CudaError::Shape("dequant_tile: weights too small".into()));
        }
        need(out, u64::from(rows) * ld, "tile out")?;
        let f = self.get("dequant_tile")?;
        let mut l = s.launch_builder(f);
        push_any!(l, &w);
        l.arg(&dtype).arg(out).arg(&row0).arg(&rows).arg(&k);
        // SAFETY: types match; the weights hold rows up to row0+rows and out
        // holds rows·ld floats (checked).
        unsafe { l.launch(grid(u64::from(rows) * ld, 256)?) }.map_err(CudaError::driver)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn embedding(
        &self,
        s: &Arc<CudaStream>,
        table: AnyRef<'_>,
        dtype: u32,
        table_rows: u64,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        n_ids: u32,
        d: u32,
    ) -> Result<(), CudaError> {
        if table.bytes() < dt_bytes(dtype, table_rows * u64::from(d)) {
            return Err(CudaError::Shape("embedding: table too small".into()));
        }
        need(ids, n_ids.into(), "embedding ids")?;
        need(out, u64::from(n_ids) * u64::from(d), "embedding out")?;
        let f = self.get("embedding")?;
        let mut l = s.launch_builder(f);
        push_any!(l, &table);
        l.arg(&dtype).arg(ids).arg(out).arg(&n_ids).arg(&d);
        // SAFETY: types match; the caller checked every id < table_rows on the
        // host before uploading `ids`, the table holds table_rows rows, out
        // n_ids·d floats (checked).
        unsafe { l.launch(grid(u64::from(n_ids) * u64::from(d), 256)?) }
            .map_err(CudaError::driver)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn binary(
        &self,
        s: &Arc<CudaStream>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: u32,
        bn: u32,
        op: u32,
    ) -> Result<(), CudaError> {
        if bn == 0 {
            return Err(CudaError::Shape("binary: empty operand".into()));
        }
        need(a, n.into(), "binary a")?;
        need(b, bn.into(), "binary b")?;
        need(out, n.into(), "binary out")?;
        let f = self.get("binary")?;
        let mut l = s.launch_builder(f);
        l.arg(a).arg(b).arg(out).arg(&n).arg(&bn).arg(&op);
        // SAFETY: types match; a and out hold n, b holds bn > 0 (checked).
        unsafe { l.launch(grid(n.into(), 256)?) }.map_err(CudaError::driver)?;
        Ok(())
    }

    pub(crate) fn silu(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: u32,
    ) -> Result<(), CudaError> {
        need(x, n.into(), "silu x")?;
        need(out, n.into(), "silu out")?;
        let f = self.get("silu")?;
        let mut l = s.launch_builder(f);
        l.arg(x).arg(out).arg(&n);
        // SAFETY: types match; both hold n (checked).
        unsafe { l.launch(grid(n.into(), 256)?) }.map_err(CudaError::driver)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: u32,
        cols: u32,
        eps: f32,
    ) -> Result<(), CudaError> {
        let n = u64::from(rows) * u64::from(cols);
        need(x, n, "rmsnorm x")?;
        need(w, cols.into(), "rmsnorm w")?;
        need(out, n, "rmsnorm out")?;
        if rows == 0 {
            return Ok(());
        }
        let f = self.get("rmsnorm")?;
        let mut l = s.launch_builder(f);
        l.arg(x).arg(w).arg(out).arg(&cols).arg(&eps);
        // SAFETY: types match; one block per row of `cols` (checked sizes).
        unsafe { l.launch(rows_cfg(rows, 256, 0)) }.map_err(CudaError::driver)?;
        Ok(())
    }

    pub(crate) fn softmax(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: u32,
        cols: u32,
    ) -> Result<(), CudaError> {
        let n = u64::from(rows) * u64::from(cols);
        need(x, n, "softmax x")?;
        need(out, n, "softmax out")?;
        if rows == 0 {
            return Ok(());
        }
        let f = self.get("softmax")?;
        let mut l = s.launch_builder(f);
        l.arg(x).arg(out).arg(&cols);
        // SAFETY: types match; one block per row (checked sizes).
        unsafe { l.launch(rows_cfg(rows, 256, 0)) }.map_err(CudaError::driver)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        seq: u32,
        heads: u32,
        hd: u32,
        pos: u32,
        theta_scale: f32,
    ) -> Result<(), CudaError> {
        let n = u64::from(seq) * u64::from(heads) * u64::from(hd);
        need(x, n, "rope x")?;
        need(out, n, "rope out")?;
        let f = self.get("rope")?;
        let mut l = s.launch_builder(f);
        l.arg(x)
            .arg(out)
            .arg(&seq)
            .arg(&heads)
            .arg(&hd)
            .arg(&pos)
            .arg(&theta_scale);
        // SAFETY: types match; both hold seq·heads·hd (checked).
        unsafe { l.launch(grid(n / 2, 256)?) }.map_err(CudaError::driver)?;
        Ok(())
    }

    /// Writes `src` [n] into a cache (f32, or f16 when `cache` is `F16`) from `start`.
    pub(crate) fn kv_append(
        &self,
        s: &Arc<CudaStream>,
        src: &CudaSlice<f32>,
        cache: &mut CacheMut<'_>,
        start: u64,
        n: u32,
    ) -> Result<(), CudaError> {
        need(src, n.into(), "kv src")?;
        let f = self.get("kv_append")?;
        let mut l = s.launch_builder(f);
        l.arg(src);
        let is_f16: u32 = match cache {
            CacheMut::F32(c) => {
                need(c, start + u64::from(n), "kv cache")?;
                l.arg(&mut **c);
                0
            }
            CacheMut::F16(c) => {
                need(c, start + u64::from(n), "kv cache")?;
                l.arg(&mut **c);
                1
            }
        };
        l.arg(&is_f16).arg(&start).arg(&n);
        // SAFETY: types match; the cache holds start+n elements of the type
        // the flag names, src holds n (checked).
        unsafe { l.launch(grid(n.into(), 256)?) }.map_err(CudaError::driver)?;
        Ok(())
    }

    /// Causal GQA attention over caches holding at least `pos+seq` rows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        s: &Arc<CudaStream>,
        q: &CudaSlice<f32>,
        kc: CacheRef<'_>,
        vc: CacheRef<'_>,
        out: &mut CudaSlice<f32>,
        scratch: &mut CudaSlice<f32>,
        dims: [u32; 5],
        scale: f32,
    ) -> Result<(), CudaError> {
        let [seq, heads, kv_heads, hd, pos] = dims.map(u64::from);
        if kv_heads == 0 || heads % kv_heads != 0 || hd == 0 || hd > 4096 {
            return Err(CudaError::Shape("attention: bad heads or head_dim".into()));
        }
        let cache_elems = (pos + seq) * kv_heads * hd;
        if kc.len() < cache_elems || vc.len() < cache_elems || kc.is_f16() != vc.is_f16() {
            return Err(CudaError::Shape(
                "attention: caches too small or mixed".into(),
            ));
        }
        need(q, seq * heads * hd, "attention q")?;
        need(out, seq * heads * hd, "attention out")?;
        need(scratch, seq * heads * (pos + seq), "attention scratch")?;
        let tasks = u32::try_from(seq * heads)
            .map_err(|_| CudaError::Shape("attention too large".into()))?;
        if tasks == 0 {
            // No query rows (or no heads: the kernel divides by heads).
            return Ok(());
        }
        let f16 = u32::from(kc.is_f16());
        let f = self.get("attention")?;
        let mut l = s.launch_builder(f);
        l.arg(q);
        match kc {
            CacheRef::F32(c) => l.arg(c),
            CacheRef::F16(c) => l.arg(c),
        };
        match vc {
            CacheRef::F32(c) => l.arg(c),
            CacheRef::F16(c) => l.arg(c),
        };
        let [seq32, heads32, kvh32, hd32, pos32] = dims;
        l.arg(&f16)
            .arg(out)
            .arg(scratch)
            .arg(&seq32)
            .arg(&heads32)
            .arg(&kvh32)
            .arg(&hd32)
            .arg(&pos32)
            .arg(&scale);
        // hd ≤ 4096 floats of dynamic shared memory for q: at most 16 KiB.
        let cfg = rows_cfg(tasks, 128, (hd32) * 4);
        // SAFETY: types match; q/out hold seq·heads·hd, both caches
        // (pos+seq)·kv_heads·hd of the flagged type, scratch seq·heads·(pos+seq)
        // (checked); heads is a multiple of kv_heads so kv head indices stay
        // below kv_heads; shared memory holds hd floats.
        unsafe { l.launch(cfg) }.map_err(CudaError::driver)?;
        Ok(())
    }

    pub(crate) fn argmax_rows(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<u32>,
        rows: u32,
        cols: u32,
    ) -> Result<(), CudaError> {
        need(x, u64::from(rows) * u64::from(cols), "argmax x")?;
        need(out, rows.into(), "argmax out")?;
        if rows == 0 {
            return Ok(());
        }
        let f = self.get("argmax_rows")?;
        let mut l = s.launch_builder(f);
        l.arg(x).arg(out).arg(&cols);
        // SAFETY: types match; one block per row of `cols` (checked sizes).
        unsafe { l.launch(rows_cfg(rows, 256, 0)) }.map_err(CudaError::driver)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn top_k(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        row_start: usize,
        cols: u32,
        k: u32,
        idx: &mut CudaSlice<u32>,
        val: &mut CudaSlice<f32>,
        count: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        need(x, row_start as u64 + u64::from(cols), "top_k x")?;
        need(idx, k.into(), "top_k idx")?;
        need(val, k.into(), "top_k val")?;
        need(count, 1, "top_k count")?;
        let row = x.slice(row_start..row_start + cols as usize);
        let f = self.get("top_k")?;
        let mut l = s.launch_builder(f);
        l.arg(&row).arg(&cols).arg(&k).arg(idx).arg(val).arg(count);
        // SAFETY: types match; `row` is a view of `cols` elements, idx and val
        // hold k (checked); one block.
        unsafe { l.launch(rows_cfg(1, 1024, 0)) }.map_err(CudaError::driver)?;
        Ok(())
    }
}

/// A KV cache operand, read-only.
#[derive(Clone, Copy)]
pub(crate) enum CacheRef<'a> {
    F32(&'a CudaSlice<f32>),
    F16(&'a CudaSlice<u16>),
}

impl CacheRef<'_> {
    fn len(&self) -> u64 {
        match self {
            CacheRef::F32(c) => c.len() as u64,
            CacheRef::F16(c) => c.len() as u64,
        }
    }
    fn is_f16(&self) -> bool {
        matches!(self, CacheRef::F16(_))
    }
}

/// A KV cache operand being written.
pub(crate) enum CacheMut<'a> {
    F32(&'a mut CudaSlice<f32>),
    F16(&'a mut CudaSlice<u16>),
}

/// `out` [m, n] (row-major) columns `j0..j0+nt` = `x` [m, kk] · `w` [nt, kk]ᵀ, by cuBLAS SGEMM
/// (column-major: C[nt×m, ldc=n] = op(W)ᵀ·X with both stored k-contiguous).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_nt(
    blas: &CudaBlas,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    w_off: usize,
    out: &mut CudaSlice<f32>,
    m: usize,
    kk: usize,
    n: usize,
    j0: usize,
    nt: usize,
) -> Result<(), CudaError> {
    let int = |v: usize| {
        i32::try_from(v).map_err(|_| CudaError::Shape("matmul too large for cuBLAS".into()))
    };
    if (x.len() as u64) < (m as u64) * (kk as u64)
        || (w.len() as u64) < (w_off as u64) + (nt as u64) * (kk as u64)
        || (out.len() as u64) < (m as u64) * (n as u64)
        || j0 + nt > n
    {
        return Err(CudaError::Shape("sgemm operands too small".into()));
    }
    if m == 0 || nt == 0 {
        return Ok(());
    }
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: int(nt)?,
        n: int(m)?,
        k: int(kk)?,
        alpha: 1.0f32,
        lda: int(kk)?,
        ldb: int(kk)?,
        beta: 0.0f32,
        ldc: int(n)?,
    };
    let wv = w.slice(w_off..w_off + nt * kk);
    // The last column written is (m-1)·n + j0 + nt - 1 < m·n: inside `out`.
    let mut ov = out.slice_mut(j0..m * n);
    // SAFETY: A = wv holds nt·kk floats (lda kk, nt columns), B = x holds m·kk
    // (ldb kk, m columns), C starts at j0 with ldc n over m columns: the last
    // element is at (m-1)·n + nt-1 < m·n - j0, inside the view (checked above).
    unsafe { blas.gemm(cfg, &wv, x, &mut ov) }.map_err(|e| CudaError::Blas(format!("{e:?}")))?;
    Ok(())
}
