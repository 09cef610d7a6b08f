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
