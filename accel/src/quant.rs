//! GGUF block quantization: the weight formats Q4_1 and Q8_0, and the
//! activation formats llama.cpp pairs them with (Q8_1 for Q4_1, Q8_0 for
//! Q8_0), so integer dot products give the same numbers llama.cpp gives.
//!
//! Scales are stored in the files as f16 and kept here as the exact f32 of
//! that f16. Activation quantization follows ggml's AVX2 path: `q =
//! round_ties_even(x · 127 / amax)`, scale `amax / 127` rounded to f16, and
//! for Q8_1 the block sum `s = scale · Σq` rounded to f16.

use half::f16;
use rayon::prelude::*;

/// Elements per block.
pub const QK: usize = 32;

/// A Q4_1 block: `x = d · q + m`, q in 0..16 (low nibbles: elements 0..16,
/// high nibbles: 16..32). Scales stay f16 as in the file (20 bytes a block:
/// decode is memory-bound, so the block size is the speed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ4_1 {
    /// Scale (f16 bits).
    pub d: u16,
    /// Minimum (f16 bits).
    pub m: u16,
    /// Packed 4-bit values.
    pub qs: [u8; 16],
}

impl BlockQ4_1 {
    /// The scale.
    #[inline]
    pub fn d(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }
    /// The minimum.
    #[inline]
    pub fn m(&self) -> f32 {
        f16::from_bits(self.m).to_f32()
    }
}

/// A Q8_0 block: `x = d · q`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ8_0 {
    /// Scale (f16 bits).
    pub d: u16,
    /// Values.
    pub qs: [i8; 32],
}

impl BlockQ8_0 {
    /// The scale.
    #[inline]
    pub fn d(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }
}

/// A Q8_1 activation block: `x ≈ d · q`, with `s = d · Σq`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: f32,
    /// Scale times the sum of the values.
    pub s: f32,
    /// Values.
    pub qs: [i8; 32],
}

/// A quantized activation block as the SIMD kernels take it: the Q8_1
/// fields (`s` is 0 for Q8_0 activations) and the exact sum of the values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActBlock {
    /// Scale (the exact f32 of an f16).
    pub d: f32,
    /// Q8_1: `d · Σq` rounded to f16; Q8_0: 0.
    pub s: f32,
    /// Σq.
    pub sum: i32,
    /// Values.
    pub qs: [i8; 32],
}

/// Quantizes activation rows (length a multiple of 32) for Q4_1 weights:
/// the numbers of [`quantize_q8_1`].
pub fn act_q8_1(x: &[f32]) -> Vec<ActBlock> {
    crate::simd::act_blocks(crate::simd::level(), x, true)
}

/// Quantizes activation rows for Q8_0 weights: the numbers of [`quantize_q8_0`].
pub fn act_q8_0(x: &[f32]) -> Vec<ActBlock> {
    crate::simd::act_blocks(crate::simd::level(), x, false)
}

/// Rounds an f32 through f16 (what storing it in an f16 field does).
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Parses GGUF Q4_1 bytes (20 per block). The length must be a multiple of 20.
pub fn parse_q4_1(bytes: &[u8]) -> Vec<BlockQ4_1> {
    bytes
        .par_chunks_exact(20)
        .map(|b| {
            let mut qs = [0u8; 16];
            qs.copy_from_slice(&b[4..20]);
            BlockQ4_1 {
                d: u16::from_le_bytes([b[0], b[1]]),
                m: u16::from_le_bytes([b[2], b[3]]),
                qs,
            }
        })
        .collect()
}

/// Parses GGUF Q8_0 bytes (34 per block).
pub fn parse_q8_0(bytes: &[u8]) -> Vec<BlockQ8_0> {
    bytes
        .par_chunks_exact(34)
        .map(|b| {
            let mut qs = [0i8; 32];
            for (q, byte) in qs.iter_mut().zip(&b[2..34]) {
                *q = *byte as i8;
            }
            BlockQ8_0 {
                d: u16::from_le_bytes([b[0], b[1]]),
                qs,
            }
        })
        .collect()
}

/// Parses f16 bytes into bits.
pub fn parse_f16(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Parses f32 bytes.
pub fn parse_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The scalar reference of activation quantization (one block of 32).
pub fn quantize_block(x: &[f32]) -> (f32, [i8; 32]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; 32];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
    }
    (d, qs)
}

/// Quantizes an activation row (length a multiple of 32) to Q8_1.
pub fn quantize_q8_1(x: &[f32]) -> Vec<BlockQ8_1> {
    x.chunks_exact(QK)
        .map(|b| {
            let (d, qs) = quantize_block(b);
            let sum: i32 = qs.iter().map(|q| i32::from(*q)).sum();
            BlockQ8_1 {
                d: round_f16(d),
                s: round_f16(d * sum as f32),
                qs,
            }
        })
        .collect()
}

/// Quantizes an activation row (length a multiple of 32) to Q8_0.
pub fn quantize_q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
    x.chunks_exact(QK)
        .map(|b| {
            let (d, qs) = quantize_block(b);
            BlockQ8_0 {
                d: f16::from_f32(d).to_bits(),
                qs,
            }
        })
        .collect()
}

/// Integer dot product of 32 i16 pairs, written as adjacent-pair sums so the
/// compiler emits `vpmaddwd`.
#[inline]
fn dot32_i16(a: &[i16; 32], b: &[i16; 32]) -> i32 {
    let mut s = [0i32; 16];
    for j in 0..16 {
        s[j] = i32::from(a[2 * j]) * i32::from(b[2 * j])
            + i32::from(a[2 * j + 1]) * i32::from(b[2 * j + 1]);
    }
    s.iter().sum()
}

/// The 32 values of a Q4_1 block as i16 (0..16).
#[inline]
pub fn unpack_q4_1(b: &BlockQ4_1) -> [i16; 32] {
    let mut a = [0i16; 32];
    for j in 0..16 {
        a[j] = i16::from(b.qs[j] & 0x0f);
        a[j + 16] = i16::from(b.qs[j] >> 4);
    }
    a
}

/// The 32 values of an i8 block as i16.
#[inline]
pub fn widen(q: &[i8; 32]) -> [i16; 32] {
    core::array::from_fn(|j| i16::from(q[j]))
}

/// Σ over blocks of the Q4_1 · Q8_1 dot product. Per block, in block order:
/// `acc = fma(dw · dx, sumi, acc)` and `mins = fma(mw, sx, mins)` (fused
/// multiply-adds: the SIMD kernels' one instruction each), result `acc + mins`.
/// Every kernel, CPU and CUDA, computes exactly these operations.
#[inline]
pub fn dot_q4_1_q8_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    let mut acc = 0f32;
    let mut mins = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let sumi = dot32_i16(&unpack_q4_1(wb), &widen(&xb.qs));
        acc = (wb.d() * xb.d).mul_add(sumi as f32, acc);
        mins = wb.m().mul_add(xb.s, mins);
    }
    acc + mins
}

/// Σ over blocks of the Q8_0 · Q8_0 dot product: `acc = fma(dw · dx, sumi, acc)`
/// per block, in block order.
#[inline]
pub fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let mut acc = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let sumi = dot32_i16(&widen(&wb.qs), &widen(&xb.qs));
        acc = (wb.d() * xb.d()).mul_add(sumi as f32, acc);
    }
    acc
}

/// A weight row unpacked once for many activation rows (prompt processing):
/// values as i16 blocks plus per-block scale and minimum.
#[derive(Debug)]
pub struct UnpackedRow {
    vals: Vec<[i16; 32]>,
    d: Vec<f32>,
    m: Vec<f32>,
}

impl UnpackedRow {
    /// Unpacks a Q4_1 row.
    pub fn from_q4_1(row: &[BlockQ4_1]) -> Self {
        UnpackedRow {
            vals: row.iter().map(unpack_q4_1).collect(),
            d: row.iter().map(BlockQ4_1::d).collect(),
            m: row.iter().map(BlockQ4_1::m).collect(),
        }
    }

    /// Unpacks a Q8_0 row.
    pub fn from_q8_0(row: &[BlockQ8_0]) -> Self {
        UnpackedRow {
            vals: row.iter().map(|b| widen(&b.qs)).collect(),
            d: row.iter().map(BlockQ8_0::d).collect(),
            m: vec![0.0; row.len()],
        }
    }

    /// Dot with an activation row prepared by [`PreparedRow::new`].
    #[inline]
    pub fn dot(&self, x: &PreparedRow) -> f32 {
        let mut acc = 0f32;
        let mut mins = 0f32;
        let blocks = self.vals.iter().zip(&x.vals);
        let scales = self.d.iter().zip(&self.m).zip(x.d.iter().zip(&x.s));
        for ((wv, xv), ((wd, wm), (xd, xs))) in blocks.zip(scales) {
            let sumi = dot32_i16(wv, xv);
            acc = (wd * xd).mul_add(sumi as f32, acc);
            mins = wm.mul_add(*xs, mins);
        }
        acc + mins
    }
}

/// Q4_1 row · prepared activation row, unpacking the weights on the fly
/// (decode: each weight row is used once, the activation row every time).
#[inline]
pub fn dot_q4_1_prepared(w: &[BlockQ4_1], x: &PreparedRow) -> f32 {
    let mut acc = 0f32;
    let mut mins = 0f32;
    let scales = x.d.iter().zip(&x.s);
    for ((wb, xv), (xd, xs)) in w.iter().zip(&x.vals).zip(scales) {
        let sumi = dot32_i16(&unpack_q4_1(wb), xv);
        acc = (wb.d() * xd).mul_add(sumi as f32, acc);
        mins = wb.m().mul_add(*xs, mins);
    }
    acc + mins
}

/// Q8_0 row · prepared activation row.
#[inline]
pub fn dot_q8_0_prepared(w: &[BlockQ8_0], x: &PreparedRow) -> f32 {
    let mut acc = 0f32;
    for ((wb, xv), xd) in w.iter().zip(&x.vals).zip(&x.d) {
        acc = (wb.d() * xd).mul_add(dot32_i16(&widen(&wb.qs), xv) as f32, acc);
    }
    acc
}

/// A quantized activation row widened to i16 for [`UnpackedRow::dot`].
#[derive(Debug)]
pub struct PreparedRow {
    vals: Vec<[i16; 32]>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl PreparedRow {
    /// From Q8_1 blocks.
    pub fn from_q8_1(x: &[BlockQ8_1]) -> Self {
        PreparedRow {
            vals: x.iter().map(|b| widen(&b.qs)).collect(),
            d: x.iter().map(|b| b.d).collect(),
            s: x.iter().map(|b| b.s).collect(),
        }
    }

    /// From Q8_0 blocks.
    pub fn from_q8_0(x: &[BlockQ8_0]) -> Self {
        PreparedRow {
            vals: x.iter().map(|b| widen(&b.qs)).collect(),
            d: x.iter().map(BlockQ8_0::d).collect(),
            s: vec![0.0; x.len()],
        }
    }
}

/// Dequantizes Q4_1 blocks into `out` (32 per block).
pub fn dequant_q4_1(blocks: &[BlockQ4_1], out: &mut Vec<f32>) {
    for b in blocks {
        let start = out.len();
        out.resize(start + 32, 0.0);
        let (d, m) = (b.d(), b.m());
        for j in 0..16 {
            out[start + j] = f32::from(b.qs[j] & 0x0f) * d + m;
            out[start + j + 16] = f32::from(b.qs[j] >> 4) * d + m;
        }
    }
}

/// Dequantizes Q8_0 blocks into `out`.
pub fn dequant_q8_0(blocks: &[BlockQ8_0], out: &mut Vec<f32>) {
    for b in blocks {
        let d = b.d();
        out.extend(b.qs.iter().map(|q| f32::from(*q) * d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_dot_matches_dequantized_dot_up_to_activation_rounding() {
        // One block: d = 0.5, m = -1, nibbles 0..16 / 15..0.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        bytes.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            bytes.push(j | ((15 - j) << 4));
        }
        let w = parse_q4_1(&bytes);
        let mut wf = Vec::new();
        dequant_q4_1(&w, &mut wf);
        assert_eq!(wf[0], -1.0);
        assert_eq!(wf[15], 6.5);
        assert_eq!(wf[16], 6.5);
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 8.0).collect();
        let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
        let q = dot_q4_1_q8_1(&w, &quantize_q8_1(&x));
        assert!(
            (q - exact).abs() < 0.05 * exact.abs().max(1.0),
            "{q} vs {exact}"
        );
    }

    #[test]
    fn q8_0_round_trip_and_dot() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
        let q = quantize_q8_0(&x);
        let mut back = Vec::new();
        dequant_q8_0(&q, &mut back);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 2.0 / 127.0 + 1e-3, "{a} vs {b}");
        }
        let exact: f32 = x.iter().map(|v| v * v).sum();
        let d = dot_q8_0_q8_0(&q, &q);
        assert!((d - exact).abs() < 0.02 * exact, "{d} vs {exact}");
        // An all-zero block quantizes to zeros with scale 0.
        let z = quantize_q8_1(&[0.0; 32]);
        assert_eq!((z[0].d, z[0].s), (0.0, 0.0));
        // The unpacked-row path gives the same numbers as the block dot.
        let xq = quantize_q8_0(&x);
        let row = UnpackedRow::from_q8_0(&q);
        assert_eq!(
            row.dot(&PreparedRow::from_q8_0(&xq)),
            dot_q8_0_q8_0(&q, &xq)
        );
    }
}
