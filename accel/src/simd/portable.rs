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
                acc += (wb.d() * xb.d) * sumi as f32;
                mins += wb.m() * xb.s;
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
                acc += (wb.d() * xb.d) * block_sum(&wv, &xb.qs) as f32;
            }
            out[i * GROUP + r] = acc;
        }
    }
}

pub(super) fn quantize_block(x: &[f32; 32]) -> (f32, [i8; 32]) {
    crate::quant::quantize_block(x)
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
