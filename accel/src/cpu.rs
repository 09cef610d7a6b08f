//! The CPU backend: the reference implementation of every kernel.
//!
//! Quantized weight matrices loaded through [`Backend::upload_weights`] are
//! repacked ([`crate::pack`]) and multiplied by the SIMD kernels of
//! [`crate::simd`] (AVX-512 VNNI, AVX2 or portable, chosen at run time);
//! everything else is safe Rust vectorised by the compiler. Matmuls and
//! attention split work across cores with rayon. Quantized matmuls quantize
//! the activations per 32-block and use integer dot products, like llama.cpp.

use super::pack::{GROUP, PackedQ4_1, PackedQ8_0};
use super::quant::{self, BlockQ8_0, BlockQ8_1};
use super::simd;
use super::{AttentionShape, Backend, BackendError, BinaryOp, DeviceBuffer, ElemType};
use half::f16;
use rayon::prelude::*;
use std::sync::Arc;

/// Weight rows per task in a matmul.
const ROWS_PER_TASK: usize = 16;

/// Below this many multiply-adds a launch runs on the calling thread: handing
/// work to the pool and waiting for it costs more than it saves (decode has
/// ~240 launches per token, most of them small).
const PAR_MIN_WORK: usize = 1 << 20;

/// Fewest (group of 16 rows × block × activation row) steps for which a
/// packed matmul uses the pool (env `CINFER_PAR_MIN_WORK` overrides, for tuning).
fn packed_par_min_work() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("CINFER_PAR_MIN_WORK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
    })
}

/// Elementwise and row-wise ops (silu, add, mul, rmsnorm, rope) run on the
/// calling thread, also for a prompt's activations: they come between
/// matmuls, whose pool threads spin ([`crate::pool::SPIN`]) and hold the
/// other cores just then, so splitting them over rayon's threads made them
/// slower, not faster (BENCHMARKS.md, "Fourth session").
///
/// `f(a_i, b_i)` for every element, a plain loop the compiler vectorizes.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    a.iter().zip(b).map(|(a, b)| f(*a, *b)).collect()
}

/// `f(a, b)` elementwise, `b` of `a`'s length or a row of `cols` repeated.
#[inline(always)]
fn broadcast_zip(a: &[f32], b: &[f32], cols: usize, f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    if a.len() == b.len() {
        zip_map(a, b, f)
    } else {
        map_rows(a, cols, |row, out| {
            out.extend(row.iter().zip(b).map(|(x, y)| f(*x, *y)))
        })
    }
}

/// `f(row)` for every row of `x` (rows of `cols`), concatenated.
fn map_rows(x: &[f32], cols: usize, f: impl Fn(&[f32], &mut Vec<f32>)) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols.max(1)) {
        f(row, &mut out);
    }
    out
}

/// `f(index, chunk)` over `out.chunks_mut(chunk)`, on the rayon pool only when
/// `work` is worth it.
fn for_each_chunk(
    out: &mut [f32],
    chunk: usize,
    work: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if work >= PAR_MIN_WORK {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// The CPU backend.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend;

/// Runs on CPU backends in this process ([`Backend::run_started`]).
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn f32s(buf: &DeviceBuffer) -> Result<&[f32], BackendError> {
    match buf {
        DeviceBuffer::F32(v) => Ok(v),
        other => Err(refuse(other)),
    }
}

/// The error for an operand this backend does not take: a CUDA buffer is
/// another backend's, anything else an element type the kernel does not take.
fn refuse(buf: &DeviceBuffer) -> BackendError {
    #[cfg(feature = "cuda")]
    if let DeviceBuffer::Cuda(_) = buf {
        return BackendError::WrongBackend(
            "a CUDA tensor given to the CPU backend (download it first)",
        );
    }
    BackendError::Unsupported(buf.elem_type())
}

/// Σ a·b (8 fused lanes; the SIMD level's kernel, bit for bit the scalar one).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    simd::dot(simd::level(), a, b)
}

fn f16_to_f32(bits: &[u16], out: &mut [f32]) {
    simd::f16_to_f32(simd::level(), bits, out)
}

/// Activations prepared for one weight type.
enum Prepared {
    F32(Vec<f32>),
    Q8_1(Vec<BlockQ8_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// `x` [m, k] · packed matrices `w_j` [n_j, k]ᵀ → [m, n_j] for each j, split
/// over their groups of 16 weight rows, all matrices in one job on the
/// spinning pool ([`crate::pool`]); `kernel(j, g, out)` fills `out[i · 16 + r]`
/// for row `16g + r` of matrix j. `ns[j]` is n_j.
fn grouped(
    m: usize,
    kb: usize,
    ns: &[usize],
    kernel: impl Fn(usize, usize, &mut [f32]) + Send + Sync + 'static,
) -> Vec<Vec<f32>> {
    let pool = crate::pool::global();
    // Group index → (matrix, group in it), as offsets.
    let starts: Vec<usize> = ns
        .iter()
        .scan(0, |at, n| {
            let s = *at;
            *at += n.div_ceil(GROUP);
            Some(s)
        })
        .collect();
    let groups = ns.iter().map(|n| n.div_ceil(GROUP)).sum::<usize>();
    // With several runs on the backend their threads already fill the cores;
    // the pool then only takes prompt-sized launches. (A batched round of up
    // to 64 rows stays on its thread: the pool's worker would compete for a
    // core with the runs waiting for the round, measured slower.)
    let alone = RUNS.load(std::sync::atomic::Ordering::Relaxed) <= 1;
    let tasks = if (alone || m > crate::batch::MAX_BATCH_ROWS)
        && groups * m * kb >= packed_par_min_work()
    {
        (pool.threads() * 2).min(groups)
    } else {
        1
    };
    let owners = starts.clone();
    let parts = pool.run(tasks, move |t| {
        let range = groups * t / tasks..groups * (t + 1) / tasks;
        let mut part = vec![0f32; range.len() * m * GROUP];
        for (flat, chunk) in range.zip(part.chunks_mut(m * GROUP)) {
            let j = owners.partition_point(|&s| s <= flat) - 1;
            kernel(j, flat - owners[j], chunk);
        }
        part
    });
    let parts = match <[Vec<f32>; 1]>::try_from(parts) {
        // One part, one row, one matrix (a lone decode launch): the groups'
        // rows are the output.
        Ok([mut one]) if ns.len() == 1 && m == 1 => {
            one.truncate(ns[0]);
            return vec![one];
        }
        Ok([one]) => vec![one],
        Err(parts) => parts,
    };
    // The tile (m rows of 16) of flat group f, in the part that computed it.
    let bounds: Vec<usize> = (0..parts.len()).map(|t| groups * t / parts.len()).collect();
    let tile = |f: usize| -> &[f32] {
        let t = bounds.partition_point(|&b| b <= f) - 1;
        &parts[t][(f - bounds[t]) * m * GROUP..][..m * GROUP]
    };
    ns.iter()
        .zip(&starts)
        .map(|(&n, &start)| {
            let mut out = vec![0f32; m * n];
            for g in 0..n.div_ceil(GROUP) {
                let cols = (n - g * GROUP).min(GROUP);
                let rows = tile(start + g).as_chunks::<GROUP>().0;
                if cols == GROUP {
                    // Whole groups as fixed-size moves (a `copy_from_slice` of
                    // 16 floats is a `memcpy` call each: 12,288 of them for a
                    // [128, 1536] result).
                    for (o, row) in out[g * GROUP..].chunks_mut(n).zip(rows) {
                        // Every chunk has the group's 16 columns (cols == 16).
                        if let Some(o) = o.first_chunk_mut::<GROUP>() {
                            *o = *row;
                        }
                    }
                } else {
                    for (i, row) in rows.iter().enumerate() {
                        out[i * n + g * GROUP..][..cols].copy_from_slice(&row[..cols]);
                    }
                }
            }
            out
        })
        .collect()
}

/// A packed weight matrix that fits a launch of width k.
enum PackedRef {
    Q4_1(Arc<PackedQ4_1>),
    Q8_0(Arc<PackedQ8_0>),
}

impl PackedRef {
    fn of(w: &DeviceBuffer, n: usize, k: usize) -> Option<Self> {
        match w {
            DeviceBuffer::PackedQ4_1(p) if p.rows() == n && p.blocks_per_row() * quant::QK == k => {
                Some(PackedRef::Q4_1(p.clone()))
            }
            DeviceBuffer::PackedQ8_0(p) if p.rows() == n && p.blocks_per_row() * quant::QK == k => {
                Some(PackedRef::Q8_0(p.clone()))
            }
            _ => None,
        }
    }
}

/// `x` [m, k] · each packed matrix: the activations quantized once per
/// weight type, every matrix's groups in one pool job.
fn packed_many(x: &[f32], ws: Vec<(PackedRef, usize)>, m: usize, k: usize) -> Vec<Vec<f32>> {
    let level = simd::level();
    let q8_1 = ws
        .iter()
        .any(|(w, _)| matches!(w, PackedRef::Q4_1(_)))
        .then(|| quant::act_q8_1(x));
    let q8_0 = ws
        .iter()
        .any(|(w, _)| matches!(w, PackedRef::Q8_0(_)))
        .then(|| quant::act_q8_0(x));
    let ns: Vec<usize> = ws.iter().map(|(_, n)| *n).collect();
    grouped(m, k / quant::QK, &ns, move |j, g, out| {
        match (&ws[j].0, &q8_1, &q8_0) {
            (PackedRef::Q4_1(p), Some(acts), _) => simd::q4_1_group(level, p, g, acts, m, out),
            (PackedRef::Q8_0(p), _, Some(acts)) => simd::q8_0_group(level, p, g, acts, m, out),
            _ => unreachable!("activations are prepared for every weight type present"),
        }
    })
}

/// `out[j][i] = dot(w_row_j, x_row_i)` computed as [n, m], in parallel over weight rows.
fn matmul_transposed(
    x: &Prepared,
    w: &DeviceBuffer,
    m: usize,
    k: usize,
    n: usize,
) -> Result<Vec<f32>, BackendError> {
    let mut out_t = vec![0f32; n * m];
    let kb = k / quant::QK;
    match (w, x) {
        (DeviceBuffer::F32(w), Prepared::F32(x)) => {
            for_each_chunk(&mut out_t, m * ROWS_PER_TASK, m * k * n, |t, chunk| {
                for (r, o) in chunk.chunks_mut(m).enumerate() {
                    let wr = &w[(t * ROWS_PER_TASK + r) * k..][..k];
                    for (i, oi) in o.iter_mut().enumerate() {
                        *oi = dot(wr, &x[i * k..][..k]);
                    }
                }
            });
        }
        (DeviceBuffer::F16(w), Prepared::F32(x)) => {
            for_each_chunk(&mut out_t, m * ROWS_PER_TASK, m * k * n, |t, chunk| {
                let mut wr = vec![0f32; k];
                for (r, o) in chunk.chunks_mut(m).enumerate() {
                    f16_to_f32(&w[(t * ROWS_PER_TASK + r) * k..][..k], &mut wr);
                    for (i, oi) in o.iter_mut().enumerate() {
                        *oi = dot(&wr, &x[i * k..][..k]);
                    }
                }
            });
        }
        (DeviceBuffer::Q4_1(w), Prepared::Q8_1(x)) if m == 1 => {
            for_each_chunk(&mut out_t, ROWS_PER_TASK, m * k * n, |t, chunk| {
                for (r, o) in chunk.iter_mut().enumerate() {
                    *o = quant::dot_q4_1_q8_1(&w[(t * ROWS_PER_TASK + r) * kb..][..kb], x);
                }
            });
        }
        (DeviceBuffer::Q8_0(w), Prepared::Q8_0(x)) if m == 1 => {
            for_each_chunk(&mut out_t, ROWS_PER_TASK, m * k * n, |t, chunk| {
                for (r, o) in chunk.iter_mut().enumerate() {
                    *o = quant::dot_q8_0_q8_0(&w[(t * ROWS_PER_TASK + r) * kb..][..kb], x);
                }
            });
        }
        // Several activation rows (prompt processing): each task unpacks a
        // tile of weight rows once (it stays in L2) and streams every
        // activation row past it.
        (DeviceBuffer::Q4_1(w), Prepared::Q8_1(x)) => {
            let xs: Vec<quant::PreparedRow> = x
                .chunks_exact(kb)
                .map(quant::PreparedRow::from_q8_1)
                .collect();
            tiled(&mut out_t, m, m * k * n, &xs, |r| {
                quant::UnpackedRow::from_q4_1(&w[r * kb..][..kb])
            });
        }
        (DeviceBuffer::Q8_0(w), Prepared::Q8_0(x)) => {
            let xs: Vec<quant::PreparedRow> = x
                .chunks_exact(kb)
                .map(quant::PreparedRow::from_q8_0)
                .collect();
            tiled(&mut out_t, m, m * k * n, &xs, |r| {
                quant::UnpackedRow::from_q8_0(&w[r * kb..][..kb])
            });
        }
        (w, _) => return Err(refuse(w)),
    }
    Ok(out_t)
}

/// `out_t[r][i] = unpack(r) · xs[i]`, in parallel over tiles of weight rows.
fn tiled(
    out_t: &mut [f32],
    m: usize,
    work: usize,
    xs: &[quant::PreparedRow],
    unpack: impl Fn(usize) -> quant::UnpackedRow + Sync,
) {
    for_each_chunk(out_t, m * ROWS_PER_TASK, work, |t, chunk| {
        let rows: Vec<quant::UnpackedRow> = (0..chunk.len() / m)
            .map(|r| unpack(t * ROWS_PER_TASK + r))
            .collect();
        for (i, xi) in xs.iter().enumerate() {
            for (r, row) in rows.iter().enumerate() {
                chunk[r * m + i] = row.dot(xi);
            }
        }
    });
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn run_started(&self) {
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn run_ended(&self) {
        let _ = RUNS.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |r| r.checked_sub(1),
        );
    }

    fn zeros(&self, ty: ElemType, len: usize) -> Result<DeviceBuffer, BackendError> {
        match ty {
            ElemType::F32 => Ok(DeviceBuffer::F32(vec![0.0; len])),
            ElemType::F16 => Ok(DeviceBuffer::F16(vec![0; len])),
            other => Err(BackendError::Unsupported(other)),
        }
    }

    fn upload(&self, data: &[f32]) -> Result<DeviceBuffer, BackendError> {
        Ok(DeviceBuffer::F32(data.to_vec()))
    }

    fn upload_buffer(&self, buf: DeviceBuffer) -> Result<DeviceBuffer, BackendError> {
        #[cfg(feature = "cuda")]
        if let DeviceBuffer::Cuda(_) = buf {
            return Err(refuse(&buf));
        }
        Ok(buf)
    }

    fn upload_weights(
        &self,
        buf: DeviceBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let buf = self.upload_buffer(buf)?;
        if cols == 0 || !cols.is_multiple_of(quant::QK) {
            return Ok(buf);
        }
        let kb = cols / quant::QK;
        Ok(match buf {
            DeviceBuffer::Q4_1(b) if b.len() == rows * kb => {
                DeviceBuffer::PackedQ4_1(Arc::new(PackedQ4_1::new(&b, rows, kb)))
            }
            DeviceBuffer::Q8_0(b) if b.len() == rows * kb => {
                DeviceBuffer::PackedQ8_0(Arc::new(PackedQ8_0::new(&b, rows, kb)))
            }
            other => other,
        })
    }

    fn download(&self, buf: &DeviceBuffer) -> Result<Vec<f32>, BackendError> {
        match buf {
            DeviceBuffer::F32(v) => Ok(v.clone()),
            DeviceBuffer::F16(v) => {
                let mut out = vec![0f32; v.len()];
                f16_to_f32(v, &mut out);
                Ok(out)
            }
            other => Err(refuse(other)),
        }
    }

    fn copy_range(
        &self,
        buf: &DeviceBuffer,
        range: std::ops::Range<usize>,
    ) -> Result<DeviceBuffer, BackendError> {
        match buf {
            DeviceBuffer::F32(v) => Ok(DeviceBuffer::F32(v[range].to_vec())),
            DeviceBuffer::F16(v) => Ok(DeviceBuffer::F16(v[range].to_vec())),
            other => Err(refuse(other)),
        }
    }

    fn matmul(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let x_buf = x;
        let x = f32s(x)?;
        if let Some(p) = PackedRef::of(w, n, k) {
            let [out] = <[Vec<f32>; 1]>::try_from(packed_many(x, vec![(p, n)], m, k))
                .map_err(|_| BackendError::Unsupported(w.elem_type()))?;
            return Ok(DeviceBuffer::F32(out));
        }
        let prepared = match w {
            // A view of a packed matrix under another shape (a reshape):
            // the reference kernels on the blocks in GGUF order.
            DeviceBuffer::PackedQ4_1(p) => {
                return self.matmul(x_buf, &DeviceBuffer::Q4_1(p.unpack()), m, k, n);
            }
            DeviceBuffer::PackedQ8_0(p) => {
                return self.matmul(x_buf, &DeviceBuffer::Q8_0(p.unpack()), m, k, n);
            }
            DeviceBuffer::F32(_) | DeviceBuffer::F16(_) => Prepared::F32(match w {
                // f16 weights: llama.cpp rounds the activations to f16 too.
                DeviceBuffer::F16(_) => x.iter().map(|v| quant::round_f16(*v)).collect(),
                _ => x.to_vec(),
            }),
            DeviceBuffer::Q4_1(_) => {
                Prepared::Q8_1(x.chunks_exact(k).flat_map(quant::quantize_q8_1).collect())
            }
            DeviceBuffer::Q8_0(_) => {
                Prepared::Q8_0(x.chunks_exact(k).flat_map(quant::quantize_q8_0).collect())
            }
            #[cfg(feature = "cuda")]
            other @ DeviceBuffer::Cuda(_) => return Err(refuse(other)),
        };
        let out_t = matmul_transposed(&prepared, w, m, k, n)?;
        if m == 1 {
            return Ok(DeviceBuffer::F32(out_t));
        }
        let mut out = vec![0f32; m * n];
        for (j, col) in out_t.chunks_exact(m).enumerate() {
            for (i, v) in col.iter().enumerate() {
                out[i * n + j] = *v;
            }
        }
        Ok(DeviceBuffer::F32(out))
    }

    fn matmul_many(
        &self,
        x: &DeviceBuffer,
        ws: &[(&DeviceBuffer, usize)],
        m: usize,
        k: usize,
    ) -> Result<Vec<DeviceBuffer>, BackendError> {
        // Packed weights share one launch; anything else is matmul by matmul.
        let packed: Option<Vec<(PackedRef, usize)>> = ws
            .iter()
            .map(|&(w, n)| PackedRef::of(w, n, k).map(|p| (p, n)))
            .collect();
        match packed {
            Some(packed) if ws.len() > 1 => Ok(packed_many(f32s(x)?, packed, m, k)
                .into_iter()
                .map(DeviceBuffer::F32)
                .collect()),
            _ => super::matmul_each(self, x, ws, m, k),
        }
    }

    fn embedding(
        &self,
        table: &DeviceBuffer,
        d: usize,
        ids: &[u32],
    ) -> Result<DeviceBuffer, BackendError> {
        let mut out = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            let r = id as usize;
            match table {
                DeviceBuffer::F32(t) => out.extend_from_slice(&t[r * d..][..d]),
                DeviceBuffer::F16(t) => {
                    out.extend(t[r * d..][..d].iter().map(|b| f16::from_bits(*b).to_f32()))
                }
                DeviceBuffer::Q4_1(t) => quant::dequant_q4_1(&t[r * d / 32..][..d / 32], &mut out),
                DeviceBuffer::Q8_0(t) => quant::dequant_q8_0(&t[r * d / 32..][..d / 32], &mut out),
                DeviceBuffer::PackedQ4_1(t) => {
                    let blocks: Vec<_> =
                        (r * d / 32..(r + 1) * d / 32).map(|i| t.block(i)).collect();
                    quant::dequant_q4_1(&blocks, &mut out)
                }
                DeviceBuffer::PackedQ8_0(t) => {
                    let blocks: Vec<_> =
                        (r * d / 32..(r + 1) * d / 32).map(|i| t.block(i)).collect();
                    quant::dequant_q8_0(&blocks, &mut out)
                }
                #[cfg(feature = "cuda")]
                other @ DeviceBuffer::Cuda(_) => return Err(refuse(other)),
            }
        }
        Ok(DeviceBuffer::F32(out))
    }

    fn binary(
        &self,
        op: BinaryOp,
        a: &DeviceBuffer,
        b: &DeviceBuffer,
        cols: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let (a, b) = (f32s(a)?, f32s(b)?);
        // One monomorphized loop per op (a closure chosen by `match` would
        // become a function pointer: an indirect call per element, ~8× slower).
        let out = match op {
            BinaryOp::Add => broadcast_zip(a, b, cols, |x, y| x + y),
            BinaryOp::Mul => broadcast_zip(a, b, cols, |x, y| x * y),
        };
        Ok(DeviceBuffer::F32(out))
    }

    fn rmsnorm(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        cols: usize,
        eps: f32,
    ) -> Result<DeviceBuffer, BackendError> {
        let (x, w) = (f32s(x)?, f32s(w)?);
        Ok(DeviceBuffer::F32(map_rows(x, cols, |row, out| {
            // Sum of squares in f64, as ggml does.
            let sum: f64 = row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
            let mean = (sum / cols as f64) as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            out.extend(row.iter().zip(w).map(|(v, g)| (v * scale) * g));
        })))
    }

    fn softmax(&self, x: &DeviceBuffer, cols: usize) -> Result<DeviceBuffer, BackendError> {
        let x = f32s(x)?;
        let mut out = x.to_vec();
        for row in out.chunks_exact_mut(cols) {
            softmax_in_place(row);
        }
        Ok(DeviceBuffer::F32(out))
    }

    fn silu(&self, x: &DeviceBuffer) -> Result<DeviceBuffer, BackendError> {
        let x = f32s(x)?;
        let mut out = vec![0f32; x.len()];
        simd::silu(simd::level(), x, &mut out);
        Ok(DeviceBuffer::F32(out))
    }

    fn silu_mul(
        &self,
        gate: &DeviceBuffer,
        up: &DeviceBuffer,
    ) -> Result<DeviceBuffer, BackendError> {
        let (gate, up) = (f32s(gate)?, f32s(up)?);
        let mut out = vec![0f32; gate.len()];
        simd::silu(simd::level(), gate, &mut out);
        // The product in place: the same multiplication `binary` makes.
        for (o, u) in out.iter_mut().zip(up) {
            *o *= u;
        }
        Ok(DeviceBuffer::F32(out))
    }

    fn matmul_add(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        r: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let r = f32s(r)?;
        let mut product = self.matmul(x, w, m, k, n)?;
        match &mut product {
            DeviceBuffer::F32(out) => {
                // The residual first, as `binary(Add, r, product)` adds (with
                // two NaNs, x86 keeps the first operand's payload).
                #[allow(clippy::assign_op_pattern)]
                for (o, r) in out.iter_mut().zip(r) {
                    *o = r + *o;
                }
                Ok(product)
            }
            other => Err(BackendError::Unsupported(other.elem_type())),
        }
    }

    fn rope(
        &self,
        x: &DeviceBuffer,
        heads: usize,
        head_dim: usize,
        pos: u32,
        theta: f32,
    ) -> Result<DeviceBuffer, BackendError> {
        let mut out = f32s(x)?.to_vec();
        // As ggml: theta_i = p · base^(-2i/d), built by repeated multiplication in f32.
        let theta_scale = theta.powf(-2.0 / head_dim as f32);
        let rotate = |(s, row): (usize, &mut [f32])| {
            let p = pos as f32 + s as f32;
            let mut rot = Vec::with_capacity(head_dim / 2);
            let mut t = p;
            for _ in 0..head_dim / 2 {
                rot.push((t.cos(), t.sin()));
                t *= theta_scale;
            }
            for head in row.chunks_exact_mut(head_dim) {
                for (pair, (c, sn)) in head.chunks_exact_mut(2).zip(&rot) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * sn;
                    pair[1] = a * sn + b * c;
                }
            }
        };
        out.chunks_exact_mut(heads * head_dim)
            .enumerate()
            .for_each(rotate);
        Ok(DeviceBuffer::F32(out))
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
        let (q, k, v) = (f32s(q)?, f32s(k)?, f32s(v)?);
        let row = s.kv_heads * s.head_dim;
        let start = s.pos * row;
        // Append to the caches (rounding to f16 for f16 caches, as llama.cpp's F16 KV cache).
        for (cache, new) in [(&mut *k_cache, k), (&mut *v_cache, v)] {
            match cache {
                DeviceBuffer::F32(c) => c[start..start + s.seq * row].copy_from_slice(new),
                DeviceBuffer::F16(c) => {
                    for (dst, src) in c[start..start + s.seq * row].iter_mut().zip(new) {
                        *dst = f16::from_f32(*src).to_bits();
                    }
                }
                other => return Err(refuse(other)),
            }
        }
        let (kc, vc): (&DeviceBuffer, &DeviceBuffer) = (k_cache, v_cache);
        let f16_cache = matches!(kc, DeviceBuffer::F16(_));
        // The visible rows of both caches as f32, converted once per launch
        // rather than once per (query, head) that reads them (f16 → f32 is
        // exact: the same values either way).
        let visible_all = (s.pos + s.seq) * row;
        let as_f32 = |c: &DeviceBuffer| -> Vec<f32> {
            match c {
                DeviceBuffer::F32(c) => c[..visible_all].to_vec(),
                DeviceBuffer::F16(c) => {
                    let mut out = vec![0f32; visible_all];
                    f16_to_f32(&c[..visible_all], &mut out);
                    out
                }
                // Validated above: caches are f32 or f16.
                _ => Vec::new(),
            }
        };
        let (kf, vf) = (as_f32(kc), as_f32(vc));
        let hd = s.head_dim;
        // K transposed per KV head (`kt[h][d][t]`), so that the scores of a
        // query against all its keys are SIMD lanes; rows padded to a
        // multiple of 8 keys for the kernel's last block.
        let n = (s.pos + s.seq).next_multiple_of(8);
        let mut kt = vec![0f32; s.kv_heads * hd * n];
        for (t, krow) in kf.chunks_exact(row).enumerate() {
            for (i, v) in krow.iter().enumerate() {
                kt[i * n + t] = *v;
            }
        }
        let job = AttentionJob {
            q: q.to_vec(),
            kt,
            vf,
            n,
            row,
            s,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            f16_cache,
            level: simd::level(),
        };
        let width = s.heads * hd;
        // One task per query row, on the pool (the matmuls' threads, still
        // spinning from the launch before) when the work is worth it.
        let work = s.seq * s.heads * (s.pos + s.seq) * hd * 2;
        let out = if work >= PAR_MIN_WORK && s.seq > 1 {
            let job = std::sync::Arc::new(job);
            crate::pool::global()
                .run(s.seq, move |i| {
                    let mut o = vec![0f32; width];
                    job.query_row(i, &mut o);
                    o
                })
                .concat()
        } else {
            let mut out = vec![0f32; s.seq * width];
            for (i, o) in out.chunks_exact_mut(width).enumerate() {
                job.query_row(i, o);
            }
            out
        };
        Ok(DeviceBuffer::F32(out))
    }

    fn argmax(&self, x: &DeviceBuffer, cols: usize) -> Result<Vec<u32>, BackendError> {
        let x = f32s(x)?;
        Ok(x.chunks_exact(cols)
            .map(|row| {
                let mut best = 0usize;
                let mut best_v = f32::NEG_INFINITY;
                for (i, v) in row.iter().enumerate() {
                    if *v > best_v {
                        best = i;
                        best_v = *v;
                    }
                }
                best as u32 // cols fits u32: shapes are lists of u32
            })
            .collect())
    }

    fn top_k(
        &self,
        x: &DeviceBuffer,
        cols: usize,
        k: usize,
    ) -> Result<Vec<(u32, f32)>, BackendError> {
        let x = f32s(x)?;
        let last = &x[x.len() - cols..];
        let mut idx: Vec<(u32, f32)> = last
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, v)| (i as u32, *v))
            .collect();
        let k = k.min(idx.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let by_value = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        idx.select_nth_unstable_by(k - 1, by_value);
        idx.truncate(k);
        idx.sort_by(by_value);
        Ok(idx)
    }
}

/// One attention launch's operands, owned (so that pool threads can share it).
struct AttentionJob {
    /// Queries, `[seq][heads][head_dim]`.
    q: Vec<f32>,
    /// Keys transposed per KV head, `[kv_heads][head_dim][n]` (n a multiple of 32).
    kt: Vec<f32>,
    /// Values, `[pos + seq][kv_heads][head_dim]`.
    vf: Vec<f32>,
    n: usize,
    row: usize,
    s: AttentionShape,
    scale: f32,
    f16_cache: bool,
    level: simd::Level,
}

impl AttentionJob {
    /// Every head of query row `i` into `o` (`heads · head_dim`).
    fn query_row(&self, i: usize, o: &mut [f32]) {
        let s = self.s;
        let (hd, group) = (s.head_dim, s.heads / s.kv_heads);
        let visible = s.pos + i + 1;
        let mut qv = vec![0f32; hd];
        let mut scores = vec![0f32; visible];
        for (h, o) in o.chunks_exact_mut(hd).enumerate() {
            let kvh = h / group;
            qv.copy_from_slice(&self.q[(i * s.heads + h) * hd..][..hd]);
            if self.f16_cache {
                // llama.cpp converts Q to f16 for the K·Q product with an f16 cache.
                simd::round_f16_in_place(self.level, &mut qv);
            }
            let kt = &self.kt[kvh * hd * self.n..];
            simd::scores(self.level, &qv, kt, self.n, self.scale, &mut scores);
            softmax_in_place(&mut scores);
            if self.f16_cache {
                simd::round_f16_in_place(self.level, &mut scores);
            }
            simd::weighted_rows(self.level, &scores, &self.vf[kvh * hd..], self.row, o);
        }
    }
}

/// Softmax of one row in place: e^(x - max) with the kernels' e^x, summed in f64.
fn softmax_in_place(row: &mut [f32]) {
    let max = simd::max(simd::level(), row);
    row.iter_mut().for_each(|v| *v -= max);
    simd::exp_in_place(simd::level(), row);
    let mut sum = 0f64;
    for v in row.iter() {
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` arbitrary Q4_1 blocks (scales, minimums and nibbles vary with
    /// the block index and `seed`).
    fn q4_1_blocks(count: usize, seed: usize) -> Vec<quant::BlockQ4_1> {
        (0..count)
            .map(|b| quant::BlockQ4_1 {
                d: half::f16::from_f32(0.01 * (1 + (b + seed) % 5) as f32).to_bits(),
                m: half::f16::from_f32(-0.05 * ((b + seed) % 3) as f32).to_bits(),
                qs: core::array::from_fn(|j| ((j * 37 + b * 11 + seed) % 256) as u8),
            })
            .collect()
    }

    /// `count` arbitrary Q8_0 blocks.
    fn q8_0_blocks(count: usize, seed: usize) -> Vec<BlockQ8_0> {
        (0..count)
            .map(|b| BlockQ8_0 {
                d: half::f16::from_f32(0.02 * (1 + (b + seed) % 3) as f32).to_bits(),
                qs: core::array::from_fn(|j| ((j * 53 + b * 7 + seed) % 256) as u8 as i8),
            })
            .collect()
    }

    fn buf(v: &[f32]) -> DeviceBuffer {
        DeviceBuffer::F32(v.to_vec())
    }
    fn get(b: DeviceBuffer) -> Vec<f32> {
        match b {
            DeviceBuffer::F32(v) => v,
            other => panic!("expected f32, got {other:?}"),
        }
    }
    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
        }
    }
    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            }
        }
        want
    }

    #[test]
    fn matmul_f32_matches_naive() {
        let cpu = CpuBackend;
        for &(m, k, n) in &[(1, 3, 2), (3, 17, 5), (64, 130, 200)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let got = get(cpu.matmul(&buf(&x), &buf(&w), m, k, n).expect("matmul"));
            close(&got, &naive(&x, &w, m, k, n), 1e-4);
        }
    }

    #[test]
    fn quantized_matmuls_track_the_dequantized_product() {
        let cpu = CpuBackend;
        let (m, k, n) = (3, 64, 40);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 29) as f32 - 14.0) / 9.0)
            .collect();
        // Q8_0 weights from a quantized f32 matrix.
        let wf: Vec<f32> = (0..n * k)
            .map(|i| ((i * 13 % 31) as f32 - 15.0) / 20.0)
            .collect();
        let wq = quant::quantize_q8_0(&wf);
        let mut wd = Vec::new();
        quant::dequant_q8_0(&wq, &mut wd);
        let got = get(cpu
            .matmul(&buf(&x), &DeviceBuffer::Q8_0(wq), m, k, n)
            .expect("q8_0"));
        close(&got, &naive(&x, &wd, m, k, n), 0.03);
        // Q4_1 weights: arbitrary blocks.
        let blocks = q4_1_blocks(n * k / 32, 0);
        let mut wd = Vec::new();
        quant::dequant_q4_1(&blocks, &mut wd);
        let got = get(cpu
            .matmul(&buf(&x), &DeviceBuffer::Q4_1(blocks), m, k, n)
            .expect("q4_1"));
        close(&got, &naive(&x, &wd, m, k, n), 0.03);
    }

    #[test]
    fn packed_weights_give_the_reference_matmul_bit_for_bit() {
        let cpu = CpuBackend;
        for &(m, k, n) in &[
            (1, 32, 1),
            (1, 96, 37),
            (3, 96, 37),
            (6, 64, 48),
            (9, 160, 17),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 29) as f32 - 14.0) / 9.0)
                .collect();
            let (q4, q8) = (q4_1_blocks(n * k / 32, 0), q8_0_blocks(n * k / 32, 0));
            for raw in [DeviceBuffer::Q4_1(q4), DeviceBuffer::Q8_0(q8)] {
                let packed = cpu.upload_weights(raw.clone(), n, k).expect("pack");
                assert!(matches!(
                    packed,
                    DeviceBuffer::PackedQ4_1(_) | DeviceBuffer::PackedQ8_0(_)
                ));
                let want = get(cpu.matmul(&buf(&x), &raw, m, k, n).expect("raw"));
                let got = get(cpu.matmul(&buf(&x), &packed, m, k, n).expect("packed"));
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "m={m} k={k} n={n} {:?}",
                    raw.elem_type()
                );
                // A view under another shape (a reshape) takes the reference path.
                if k % 64 == 0 {
                    let (k2, n2) = (k / 2, n * 2);
                    let x2 = &x[..k2];
                    assert_eq!(
                        get(cpu.matmul(&buf(x2), &packed, 1, k2, n2).expect("view")),
                        get(cpu.matmul(&buf(x2), &raw, 1, k2, n2).expect("raw view"))
                    );
                }
                // Embedding rows of a packed table are the GGUF rows.
                let ids = [0, (n - 1) as u32];
                assert_eq!(
                    get(cpu.embedding(&packed, k, &ids).expect("embedding")),
                    get(cpu.embedding(&raw, k, &ids).expect("embedding"))
                );
            }
        }
    }

    #[test]
    fn matmul_many_is_each_matmul_bit_for_bit() {
        let cpu = CpuBackend;
        let weights = |n: usize, k: usize, seed: usize| {
            (
                DeviceBuffer::Q4_1(q4_1_blocks(n * k / 32, seed)),
                DeviceBuffer::Q8_0(q8_0_blocks(n * k / 32, seed)),
            )
        };
        for &(m, k) in &[(1, 96), (3, 64), (17, 160)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 29) as f32 - 14.0) / 9.0)
                .collect();
            let x = buf(&x);
            // Odd row counts (partial groups), both weight types, a raw
            // (unpacked) matrix that makes the launch fall back matmul by matmul.
            let (a, _) = weights(40, k, 1);
            let (_, b) = weights(16, k, 2);
            let (c, _) = weights(7, k, 3);
            let pa = cpu.upload_weights(a.clone(), 40, k).expect("pack");
            let pb = cpu.upload_weights(b.clone(), 16, k).expect("pack");
            let pc = cpu.upload_weights(c.clone(), 7, k).expect("pack");
            for ws in [
                vec![(&pa, 40), (&pb, 16), (&pc, 7)],
                vec![(&pa, 40), (&pc, 7)],
                vec![(&pb, 16), (&a, 40)],
            ] {
                let many = cpu.matmul_many(&x, &ws, m, k).expect("matmul_many");
                assert_eq!(many.len(), ws.len());
                for (got, &(w, n)) in many.into_iter().zip(&ws) {
                    let want = get(cpu.matmul(&x, w, m, k, n).expect("matmul"));
                    let got = get(got);
                    assert_eq!(got.len(), m * n);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "m={m} k={k} n={n}"
                    );
                }
            }
        }
    }

    #[test]
    fn elementwise_and_broadcast() {
        let cpu = CpuBackend;
        let a = buf(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            get(cpu
                .binary(BinaryOp::Add, &a, &buf(&[10.0, 20.0]), 2)
                .expect("add")),
            [11.0, 22.0, 13.0, 24.0]
        );
        assert_eq!(
            get(cpu.binary(BinaryOp::Mul, &a, &a, 2).expect("mul")),
            [1.0, 4.0, 9.0, 16.0]
        );
        let s = get(cpu.silu(&buf(&[0.0, 1.0])).expect("silu"));
        close(&s, &[0.0, 0.731_058_6], 1e-6);
    }

    #[test]
    fn rmsnorm_softmax_argmax_topk() {
        let cpu = CpuBackend;
        let r = get(cpu
            .rmsnorm(&buf(&[3.0, 4.0]), &buf(&[1.0, 2.0]), 2, 0.0)
            .expect("rmsnorm"));
        let rms = (12.5f32).sqrt();
        close(&r, &[3.0 / rms, 8.0 / rms], 1e-6);
        let sm = get(cpu
            .softmax(&buf(&[1000.0, 1000.0, 0.0, f32::NEG_INFINITY]), 2)
            .expect("softmax"));
        close(&sm, &[0.5, 0.5, 1.0, 0.0], 1e-6);
        assert_eq!(
            cpu.argmax(&buf(&[1.0, 3.0, 3.0, f32::NAN, -1.0, -2.0]), 3)
                .expect("argmax"),
            [1, 1]
        );
        let tk = cpu
            .top_k(&buf(&[9.0, 0.0, 5.0, 1.0, 5.0, f32::NAN]), 5, 2)
            .expect("top-k");
        // The last row of [rows, 5] is [0, 5, 1, 5, NaN]: ties keep the lower index first.
        assert_eq!(tk, vec![(1, 5.0), (3, 5.0)]);
    }

    #[test]
    fn rope_rotates_adjacent_pairs() {
        let cpu = CpuBackend;
        let out = get(cpu
            .rope(&buf(&[1.0, 0.0, 1.0, 0.0]), 1, 4, 2, 100.0)
            .expect("rope"));
        close(
            &out,
            &[2f32.cos(), 2f32.sin(), 0.2f32.cos(), 0.2f32.sin()],
            1e-5,
        );
        let x = [0.3, -0.7, 1.5, 2.0];
        close(
            &get(cpu.rope(&buf(&x), 1, 4, 0, 10000.0).expect("rope")),
            &x,
            0.0,
        );
    }

    /// SmolLM2's attention shape (9 heads, 3 KV heads, 64 wide) with f16
    /// caches: a 40-token prompt (on the pool), then 40 decode steps, each
    /// query row against a direct f64 computation over the f16-rounded keys
    /// and values.
    #[test]
    fn attention_matches_a_direct_computation_at_model_shapes() {
        let cpu = CpuBackend;
        let (heads, kv_heads, hd, prompt, steps) = (9usize, 3usize, 64usize, 40usize, 40usize);
        let ctx = prompt + steps;
        let row = kv_heads * hd;
        let mut kc = cpu.zeros(ElemType::F16, ctx * row).expect("k cache");
        let mut vc = cpu.zeros(ElemType::F16, ctx * row).expect("v cache");
        let data = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + s * 104_729) % 2003) as f32 - 1001.0) / 400.0)
                .collect()
        };
        let (mut kall, mut vall) = (Vec::new(), Vec::new());
        let mut pos = 0;
        for (step, seq) in std::iter::once(prompt)
            .chain(std::iter::repeat_n(1, steps))
            .enumerate()
        {
            let (q, k, v) = (
                data(seq * heads * hd, 3 * step),
                data(seq * row, 3 * step + 1),
                data(seq * row, 3 * step + 2),
            );
            let shape = AttentionShape {
                seq,
                heads,
                kv_heads,
                head_dim: hd,
                pos,
            };
            let out = get(cpu
                .attention(&buf(&q), &buf(&k), &buf(&v), &mut kc, &mut vc, shape)
                .expect("attention"));
            kall.extend(k.iter().map(|x| quant::round_f16(*x)));
            vall.extend(v.iter().map(|x| quant::round_f16(*x)));
            for i in 0..seq {
                for h in 0..heads {
                    let kvh = h / (heads / kv_heads);
                    let qh = &q[(i * heads + h) * hd..][..hd];
                    let visible = pos + i + 1;
                    let scores: Vec<f64> = (0..visible)
                        .map(|t| {
                            qh.iter()
                                .zip(&kall[t * row + kvh * hd..][..hd])
                                .map(|(a, b)| f64::from(quant::round_f16(*a)) * f64::from(*b))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for j in 0..hd {
                        let want: f64 = (0..visible)
                            .map(|t| e[t] / sum * f64::from(vall[t * row + kvh * hd + j]))
                            .sum();
                        let got = f64::from(out[(i * heads + h) * hd + j]);
                        assert!(
                            (got - want).abs() < 2e-3,
                            "step {step} row {i} head {h} col {j}: {got} vs {want}"
                        );
                    }
                }
            }
            pos += seq;
        }
    }

    #[test]
    fn attention_matches_a_direct_computation_and_is_causal() {
        let cpu = CpuBackend;
        let (heads, kv_heads, hd) = (4, 2, 8);
        let ctx = 6;
        let mut kc = cpu
            .zeros(ElemType::F32, ctx * kv_heads * hd)
            .expect("k cache");
        let mut vc = cpu
            .zeros(ElemType::F32, ctx * kv_heads * hd)
            .expect("v cache");
        let data = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i + s) * 17 % 23) as f32 - 11.0) / 7.0)
                .collect()
        };
        // Prefill 3 positions, then decode 1: the same as prefilling 4.
        let (q3, k3, v3) = (
            data(3 * heads * hd, 1),
            data(3 * kv_heads * hd, 2),
            data(3 * kv_heads * hd, 3),
        );
        let shape = |seq, pos| AttentionShape {
            seq,
            heads,
            kv_heads,
            head_dim: hd,
            pos,
        };
        let a = get(cpu
            .attention(
                &buf(&q3),
                &buf(&k3),
                &buf(&v3),
                &mut kc,
                &mut vc,
                shape(3, 0),
            )
            .expect("prefill"));
        let (q1, k1, v1) = (
            data(heads * hd, 4),
            data(kv_heads * hd, 5),
            data(kv_heads * hd, 6),
        );
        let b = get(cpu
            .attention(
                &buf(&q1),
                &buf(&k1),
                &buf(&v1),
                &mut kc,
                &mut vc,
                shape(1, 3),
            )
            .expect("decode"));
        // Direct computation for the decode row: head h uses kv head h / 2 over 4 positions.
        let kall: Vec<f32> = k3.iter().chain(&k1).copied().collect();
        let vall: Vec<f32> = v3.iter().chain(&v1).copied().collect();
        for h in 0..heads {
            let kvh = h / 2;
            let qh = &q1[h * hd..][..hd];
            let mut s: Vec<f32> = (0..4)
                .map(|t| {
                    qh.iter()
                        .zip(&kall[(t * kv_heads + kvh) * hd..][..hd])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        / (hd as f32).sqrt()
                })
                .collect();
            softmax_in_place(&mut s);
            let want: Vec<f32> = (0..hd)
                .map(|j| {
                    (0..4)
                        .map(|t| s[t] * vall[(t * kv_heads + kvh) * hd + j])
                        .sum()
                })
                .collect();
            close(&b[h * hd..][..hd], &want, 1e-4);
        }
        // Row 0 of the prefill sees only position 0: its output is v at position 0.
        for h in 0..heads {
            close(&a[h * hd..][..hd], &v3[(h / 2) * hd..][..hd], 1e-6);
        }
    }
}
