//! AVX-512 VNNI kernels over the grouped layout (see [`crate::pack`]): one
//! `vpdpbusd` multiplies 4 values of 16 weight rows by 4 broadcast
//! activation values, so the 16 lanes of an accumulator are 16 output
//! columns. No `unsafe` here: loads are `bytemuck` casts of fixed arrays.

use crate::pack::{GROUP, PackedQ4_1, PackedQ8_0};
use crate::quant::ActBlock;
use bytemuck::must_cast;
use core::arch::x86_64::*;

/// Activation rows computed together against one unpacked weight block.
const TILE: usize = 8;
/// How far ahead (bytes of Q4_1 nibbles; twice that of Q8_0 values) to prefetch.
const PREFETCH: usize = 2048;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn load(a: &[u8; 64]) -> __m512i {
    must_cast(*a)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn f16x16(a: &[u16; GROUP]) -> __m512 {
    _mm512_cvtph_ps(must_cast::<[u16; 16], __m256i>(*a))
}

/// Σ over the 8 words of `x` of `vpdpbusd(w[c], broadcast(x word c))`: the
/// exact integer block sums of 16 rows (two chains for latency).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn block_sums(w: &[__m512i; 8], x: &[i8; 32]) -> __m512i {
    let xw: [i32; 8] = must_cast(*x);
    let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(xw[0]));
    let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(xw[1]));
    s0 = _mm512_dpbusd_epi32(s0, w[2], _mm512_set1_epi32(xw[2]));
    s1 = _mm512_dpbusd_epi32(s1, w[3], _mm512_set1_epi32(xw[3]));
    s0 = _mm512_dpbusd_epi32(s0, w[4], _mm512_set1_epi32(xw[4]));
    s1 = _mm512_dpbusd_epi32(s1, w[5], _mm512_set1_epi32(xw[5]));
    s0 = _mm512_dpbusd_epi32(s0, w[6], _mm512_set1_epi32(xw[6]));
    s1 = _mm512_dpbusd_epi32(s1, w[7], _mm512_set1_epi32(xw[7]));
    _mm512_add_epi32(s0, s1)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) fn q4_1_group(w: &PackedQ4_1, g: usize, x: &[ActBlock], m: usize, out: &mut [f32]) {
    let kb = w.blocks_per_row();
    let mut i = 0;
    while i + TILE <= m {
        q4_1_tile::<TILE>(w, g, &x[i * kb..], &mut out[i * GROUP..]);
        i += TILE;
    }
    while i < m {
        q4_1_tile::<1>(w, g, &x[i * kb..], &mut out[i * GROUP..]);
        i += 1;
    }
}

/// `N` activation rows (`x[n · kb..]`) against one group; per row and lane
/// the reference's float operations in its order: `acc = fma(dw · dx, sumi,
/// acc)`, `mins = fma(mw, sx, mins)`, result `acc + mins`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q4_1_tile<const N: usize>(w: &PackedQ4_1, g: usize, x: &[ActBlock], out: &mut [f32]) {
    let kb = w.blocks_per_row();
    let low = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut mins = [_mm512_setzero_ps(); N];
    for b in 0..kb {
        // Weights a few blocks ahead (contiguous across groups): decode reads them from memory.
        let next = (g * kb + b) * 256 + PREFETCH;
        for line in 0..4 {
            super::prefetch(&w.qs, next + 64 * line);
        }
        super::prefetch(&w.d, (next / 256) * GROUP);
        super::prefetch(&w.m, (next / 256) * GROUP);
        let v = w.qs_of(g, b).as_chunks::<64>().0;
        let mut wv = [_mm512_setzero_si512(); 8];
        for c in 0..4 {
            let t = load(&v[c]);
            wv[c] = _mm512_and_si512(t, low);
            wv[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(t), low);
        }
        let dw = f16x16(w.d_of(g, b));
        let mw = f16x16(w.m_of(g, b));
        for n in 0..N {
            let xb = &x[n * kb + b];
            let s = _mm512_cvtepi32_ps(block_sums(&wv, &xb.qs));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d));
            acc[n] = _mm512_fmadd_ps(scale, s, acc[n]);
            mins[n] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb.s), mins[n]);
        }
    }
    for n in 0..N {
        let r: [f32; GROUP] = must_cast(_mm512_add_ps(acc[n], mins[n]));
        out[n * GROUP..(n + 1) * GROUP].copy_from_slice(&r);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) fn q8_0_group(w: &PackedQ8_0, g: usize, x: &[ActBlock], m: usize, out: &mut [f32]) {
    let kb = w.blocks_per_row();
    let mut i = 0;
    while i + TILE <= m {
        q8_0_tile::<TILE>(w, g, &x[i * kb..], &mut out[i * GROUP..]);
        i += TILE;
    }
    while i < m {
        q8_0_tile::<1>(w, g, &x[i * kb..], &mut out[i * GROUP..]);
        i += 1;
    }
}

/// Q8_0: weights are stored as `q + 128`, so `vpdpbusd` gives
/// `Σ q·x + 128 · Σx`; the second term is subtracted exactly.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q8_0_tile<const N: usize>(w: &PackedQ8_0, g: usize, x: &[ActBlock], out: &mut [f32]) {
    let kb = w.blocks_per_row();
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..kb {
        let next = (g * kb + b) * 512 + 2 * PREFETCH;
        for line in 0..8 {
            super::prefetch(&w.qs, next + 64 * line);
        }
        super::prefetch(&w.d, (next / 512) * GROUP);
        let v = w.qs_of(g, b).as_chunks::<64>().0;
        let mut wv = [_mm512_setzero_si512(); 8];
        for c in 0..8 {
            wv[c] = load(&v[c]);
        }
        let dw = f16x16(w.d_of(g, b));
        for n in 0..N {
            let xb = &x[n * kb + b];
            let raw = block_sums(&wv, &xb.qs);
            let s = _mm512_cvtepi32_ps(_mm512_sub_epi32(raw, _mm512_set1_epi32(128 * xb.sum)));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d));
            acc[n] = _mm512_fmadd_ps(scale, s, acc[n]);
        }
    }
    for n in 0..N {
        let r: [f32; GROUP] = must_cast(acc[n]);
        out[n * GROUP..(n + 1) * GROUP].copy_from_slice(&r);
    }
}

/// One activation block quantized as [`crate::quant::act_q8_1`] does, bit
/// for bit: NaN is ignored by the absolute maximum and quantizes to 0,
/// products are rounded to nearest-even and saturated like `as i8`.
/// [`super::act_blocks`] at this level.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) fn act_blocks(x: &[f32], q8_1: bool) -> Vec<ActBlock> {
    super::act_blocks_with(
        x,
        q8_1,
        |b| quantize_block(b),
        |v| super::avx2::round_f16(v),
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) fn quantize_block(x: &[f32; 32]) -> (f32, [i8; 32], i32) {
    let halves: [[f32; 16]; 2] = must_cast(*x);
    let v = [must_cast::<_, __m512>(halves[0]), must_cast(halves[1])];
    // maxps returns its second operand when either is NaN: NaN lanes keep the running max.
    let mut amax = _mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_setzero_ps());
    amax = _mm512_max_ps(_mm512_abs_ps(v[1]), amax);
    let amax = _mm512_reduce_max_ps(amax);
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let mut qs = [0i8; 32];
    let mut sum = _mm512_setzero_si512();
    for (h, half) in v.iter().enumerate() {
        let p = _mm512_mul_ps(*half, id);
        let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p);
        let c = _mm512_min_ps(
            _mm512_max_ps(p, _mm512_set1_ps(-128.0)),
            _mm512_set1_ps(127.0),
        );
        let q = _mm512_maskz_mov_epi32(ordered, _mm512_cvtps_epi32(c));
        sum = _mm512_add_epi32(sum, q);
        let b: [i8; 16] = must_cast(_mm512_cvtepi32_epi8(q));
        qs[h * 16..h * 16 + 16].copy_from_slice(&b);
    }
    (d, qs, _mm512_reduce_add_epi32(sum))
}

/// Sixteen keys of `avx2::score_block` at once: the same eight chains over d
/// (lane i of chain c sums q[8j + c]·k[8j + c] in j order), the same pairwise
/// reduction and tail, so each lane is bit for bit that key's score.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn score_block16(q: &[f32], kt: &[f32], stride: usize, t: usize, scale: f32) -> [f32; 16] {
    let col = |d: usize| -> __m512 {
        let (c, _) = kt[d * stride + t..][..16].as_chunks::<16>();
        must_cast(c[0])
    };
    let (cq, rq) = q.as_chunks::<8>();
    let mut acc = [_mm512_setzero_ps(); 8];
    for (c, qc) in cq.iter().enumerate() {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(_mm512_set1_ps(qc[i]), col(8 * c + i), *a);
        }
    }
    let mut sum = _mm512_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[4]), _mm512_add_ps(acc[1], acc[5])),
        _mm512_add_ps(_mm512_add_ps(acc[2], acc[6]), _mm512_add_ps(acc[3], acc[7])),
    );
    for (i, qd) in rq.iter().enumerate() {
        let d = 8 * cq.len() + i;
        sum = _mm512_add_ps(sum, _mm512_mul_ps(_mm512_set1_ps(*qd), col(d)));
    }
    must_cast(_mm512_mul_ps(sum, _mm512_set1_ps(scale)))
}

/// `avx2::scores` sixteen keys at a time (half the loads of `q`'s
/// broadcasts and of the key columns per key); what is left of the keys goes
/// to `avx2::scores`. Bit for bit the same scores.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) fn scores(q: &[f32], kt: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let n = out.len();
    let cols = super::readable_cols(q.len(), kt.len(), stride);
    let mut t = 0;
    while t < n && t + 16 <= cols {
        let s = score_block16(q, kt, stride, t, scale);
        let keep = (n - t).min(16);
        out[t..t + keep].copy_from_slice(&s[..keep]);
        t += keep;
    }
    if t < n {
        super::avx2::scores(q, &kt[t..], stride, scale, &mut out[t..]);
    }
}

/// `R · 16` outputs from `j`, kept in registers over all rows: per lane the
/// fused `p·v + o` of `avx2::weighted_block`, in the same row order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn weighted_block16<const R: usize>(p: &[f32], v: &[f32], stride: usize, j: usize, o: &mut [f32]) {
    let mut acc = [_mm512_setzero_ps(); R];
    for (t, pt) in p.iter().enumerate() {
        let pv = _mm512_set1_ps(*pt);
        let (row, _) = v[t * stride + j..][..16 * R].as_chunks::<16>();
        for (a, r) in acc.iter_mut().zip(row) {
            *a = _mm512_fmadd_ps(pv, must_cast(*r), *a);
        }
    }
    let (dst, _) = o[j..j + 16 * R].as_chunks_mut::<16>();
    for (d, a) in dst.iter_mut().zip(acc) {
        *d = must_cast(a);
    }
}

/// `avx2::weighted_rows` with 64 or 32 outputs in 16-lane registers; the
/// rest of the outputs go to `avx2::weighted_rows`. Bit for bit the same.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) fn weighted_rows(p: &[f32], v: &[f32], stride: usize, o: &mut [f32]) {
    let hd = o.len();
    let mut j = 0;
    while j + 64 <= hd {
        weighted_block16::<4>(p, v, stride, j, o);
        j += 64;
    }
    while j + 32 <= hd {
        weighted_block16::<2>(p, v, stride, j, o);
        j += 32;
    }
    if j < hd {
        super::avx2::weighted_rows(p, &v[j..], stride, &mut o[j..]);
    }
}
