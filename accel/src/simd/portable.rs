//! The portable kernels: the reference formulas over the grouped layout.

use crate::pack::{GROUP, PackedQ4_1, PackedQ8_0};
use crate::quant::{ActBlock, unpack_q4_1};

/// Exact Σ w·x of one block (32 values each).
fn block_sum(w: &[i16; 32], x: &[i8; 32]) -> i32 {
    w.iter()
        .zip(x)
        .map(|(a, b)| i32::from(*a) * i32::from(*b))
        .sum()
}

pub(super) fn q4_1_group(w: &PackedQ4_1, g: usize, x: &[ActBlock], m: usize, out: &mut [f32]) {
    let kb = w.blocks_per_row();
    for r in 0..GROUP {
        let row = g * GROUP + r;
        if row >= w.rows() {
            (0..m).for_each(|i| out[i * GROUP + r] = 0.0);
            continue;
        }
        let blocks: Vec<_> = (0..kb).map(|b| w.block(row * kb + b)).collect();
        for i in 0..m {
            let (mut acc, mut mins) = (0f32, 0f32);
            for (wb, xb) in blocks.iter().zip(&x[i * kb..(i + 1) * kb]) {
                let sumi = block_sum(&unpack_q4_1(wb), &xb.qs);
                acc = (wb.d() * xb.d).mul_add(sumi as f32, acc);
                mins = wb.m().mul_add(xb.s, mins);
            }
            out[i * GROUP + r] = acc + mins;
        }
    }
}

pub(super) fn q8_0_group(w: &PackedQ8_0, g: usize, x: &[ActBlock], m: usize, out: &mut [f32]) {
    let kb = w.blocks_per_row();
    for r in 0..GROUP {
        let row = g * GROUP + r;
        if row >= w.rows() {
            (0..m).for_each(|i| out[i * GROUP + r] = 0.0);
            continue;
        }
        let blocks: Vec<_> = (0..kb).map(|b| w.block(row * kb + b)).collect();
        for i in 0..m {
            let mut acc = 0f32;
            for (wb, xb) in blocks.iter().zip(&x[i * kb..(i + 1) * kb]) {
                let wv: [i16; 32] = core::array::from_fn(|j| i16::from(wb.qs[j]));
                acc = (wb.d() * xb.d).mul_add(block_sum(&wv, &xb.qs) as f32, acc);
            }
            out[i * GROUP + r] = acc;
        }
    }
}

pub(super) fn quantize_block(x: &[f32; 32]) -> (f32, [i8; 32], i32) {
    let (d, qs) = crate::quant::quantize_block(x);
    (d, qs, qs.iter().map(|q| i32::from(*q)).sum())
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

pub(super) fn axpy(p: f32, v: &[f32], o: &mut [f32]) {
    for (x, y) in v.iter().zip(o) {
        *y = p.mul_add(*x, *y);
    }
}

pub(super) fn f16_to_f32(bits: &[u16], out: &mut [f32]) {
    for (b, o) in bits.iter().zip(out) {
        *o = half::f16::from_bits(*b).to_f32();
    }
}

/// `out[t] = dot(q, column t of kt) · scale` for `t < out.len()`: [`dot`]'s
/// order (8 fused lanes over d, a fixed pairwise sum, the tail in order).
pub(super) fn scores(q: &[f32], kt: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let mut col = vec![0f32; q.len()];
    for (t, o) in out.iter_mut().enumerate() {
        for (d, c) in col.iter_mut().enumerate() {
            *c = kt[d * stride + t];
        }
        *o = dot(q, &col) * scale;
    }
}

/// `o[j] = Σ_t p[t]·v[t·stride + j]`, fused, in `t` order (as `axpy` per row
/// from zero).
pub(super) fn weighted_rows(p: &[f32], v: &[f32], stride: usize, o: &mut [f32]) {
    o.fill(0.0);
    for (t, pt) in p.iter().enumerate() {
        axpy(*pt, &v[t * stride..][..o.len()], o);
    }
}

/// e^x of one value by the kernels' formula ([`super::EXP`]), bit for bit what
/// each SIMD lane computes.
pub(super) fn exp(x: f32) -> f32 {
    use super::EXP as E;
    // Not `clamp`: NaN becomes `lo` here, as in `_mm256_max_ps(x, lo)`.
    #[allow(clippy::manual_clamp)]
    let x = x.max(E.lo).min(E.hi);
    let fx = x.mul_add(E.log2e, 0.5).floor();
    let r = fx.mul_add(-E.c1, x);
    let r = fx.mul_add(-E.c2, r);
    let mut y = E.p[0];
    for p in &E.p[1..] {
        y = y.mul_add(r, *p);
    }
    let y = y.mul_add(r * r, r + 1.0);
    // 2^fx: fx lies in -126..=128 after the clamp, a normal exponent.
    y * f32::from_bits(((fx as i32 + 127) as u32) << 23)
}

pub(super) fn exp_in_place(x: &mut [f32]) {
    for v in x {
        *v = exp(*v);
    }
}

pub(super) fn silu(x: &[f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = v / (1.0 + exp(-v));
    }
}

pub(super) fn round_f16_in_place(x: &mut [f32]) {
    for v in x {
        *v = crate::quant::round_f16(*v);
    }
}

pub(super) fn max(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}
