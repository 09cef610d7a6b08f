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
/// high nibbles: 16..32).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f32,
    /// Minimum.
    pub m: f32,
    /// Packed 4-bit values.
    pub qs: [u8; 16],
}

/// A Q8_0 block: `x = d · q`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f32,
    /// Values.
    pub qs: [i8; 32],
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

fn h(bytes: [u8; 2]) -> f32 {
    f16::from_le_bytes(bytes).to_f32()
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
                d: h([b[0], b[1]]),
                m: h([b[2], b[3]]),
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
                d: h([b[0], b[1]]),
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

fn quantize_block(x: &[f32]) -> (f32, [i8; 32]) {
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
                d: round_f16(d),
                qs,
            }
        })
        .collect()
}

/// Σ over blocks of the Q4_1 · Q8_1 dot product.
#[inline]
pub fn dot_q4_1_q8_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    let mut acc = 0f32;
    let mut mins = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let lo = i32::from(wb.qs[j] & 0x0f);
            let hi = i32::from(wb.qs[j] >> 4);
            sumi += lo * i32::from(xb.qs[j]) + hi * i32::from(xb.qs[j + 16]);
        }
        acc += (wb.d * xb.d) * sumi as f32;
        mins += wb.m * xb.s;
    }
    acc + mins
}

/// Σ over blocks of the Q8_0 · Q8_0 dot product.
#[inline]
pub fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let mut acc = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..32 {
            sumi += i32::from(wb.qs[j]) * i32::from(xb.qs[j]);
        }
        acc += (wb.d * xb.d) * sumi as f32;
    }
    acc
}

/// Dequantizes Q4_1 blocks into `out` (32 per block).
pub fn dequant_q4_1(blocks: &[BlockQ4_1], out: &mut Vec<f32>) {
    for b in blocks {
        let start = out.len();
        out.resize(start + 32, 0.0);
        for j in 0..16 {
            out[start + j] = f32::from(b.qs[j] & 0x0f) * b.d + b.m;
            out[start + j + 16] = f32::from(b.qs[j] >> 4) * b.d + b.m;
        }
    }
}

/// Dequantizes Q8_0 blocks into `out`.
pub fn dequant_q8_0(blocks: &[BlockQ8_0], out: &mut Vec<f32>) {
    for b in blocks {
        out.extend(b.qs.iter().map(|q| f32::from(*q) * b.d));
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
    }
}
