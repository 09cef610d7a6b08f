//! AVX2 kernels over the grouped layout (see [`crate::pack`]): a group's 16
//! lanes are two halves of 8 rows; `vpmaddubsw` multiplies 4 values of 8
//! rows by 4 broadcast activation values into 16-bit pair sums. No `unsafe`
//! here: loads are `bytemuck` casts of fixed arrays.

use crate::pack::{GROUP, PackedQ4_1, PackedQ8_0};
use crate::quant::ActBlock;
use bytemuck::must_cast;
use core::arch::x86_64::*;

/// Rows of a half group.
const HALF: usize = GROUP / 2;
/// Activation rows computed together against one unpacked weight block.
const TILE: usize = 2;
/// How far ahead (bytes of Q4_1 nibbles; twice that of Q8_0 values) to prefetch.
const PREFETCH: usize = 2048;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_half(a: &[u8; 64], h: usize) -> __m256i {
    let halves: [[u8; 32]; 2] = must_cast(*a);
    must_cast(halves[h])
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16x8(a: &[u16; GROUP], h: usize) -> __m256 {
    let halves: [[u16; 8]; 2] = must_cast(*a);
    _mm256_cvtph_ps(must_cast::<[u16; 8], __m128i>(halves[h]))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q4_1_group(w: &PackedQ4_1, g: usize, x: &[ActBlock], m: usize, out: &mut [f32]) {
    let kb = w.blocks_per_row();
    for h in 0..2 {
        let mut i = 0;
        while i + TILE <= m {
            q4_1_tile::<TILE>(w, g, h, &x[i * kb..], &mut out[i * GROUP..]);
            i += TILE;
        }
        while i < m {
            q4_1_tile::<1>(w, g, h, &x[i * kb..], &mut out[i * GROUP..]);
            i += 1;
        }
    }
}

/// Half `h` of a group against `N` activation rows. The 16-bit sums of the
/// 8 pair products per lane stay below 8 · 2 · 15 · 127 = 30480: exact.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_1_tile<const N: usize>(w: &PackedQ4_1, g: usize, h: usize, x: &[ActBlock], out: &mut [f32]) {
    let kb = w.blocks_per_row();
    let low = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut mins = [_mm256_setzero_ps(); N];
    for b in 0..kb {
        if h == 0 {
            // Weights a few blocks ahead (contiguous across groups).
            let next = (g * kb + b) * 256 + PREFETCH;
            for line in 0..4 {
                super::prefetch(&w.qs, next + 64 * line);
            }
            super::prefetch(&w.d, (next / 256) * GROUP);
            super::prefetch(&w.m, (next / 256) * GROUP);
        }
        let v = w.qs_of(g, b).as_chunks::<64>().0;
        let mut wv = [_mm256_setzero_si256(); 8];
        for c in 0..4 {
            let t = load_half(&v[c], h);
            wv[c] = _mm256_and_si256(t, low);
            wv[c + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(t), low);
        }
        let dw = f16x8(w.d_of(g, b), h);
        let mw = f16x8(w.m_of(g, b), h);
        for n in 0..N {
            let xb = &x[n * kb + b];
            let xw: [i32; 8] = must_cast(xb.qs);
            let mut s16 = _mm256_maddubs_epi16(wv[0], _mm256_set1_epi32(xw[0]));
            for c in 1..8 {
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv[c], _mm256_set1_epi32(xw[c])));
            }
            let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
            acc[n] = _mm256_fmadd_ps(scale, s, acc[n]);
            mins[n] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb.s), mins[n]);
        }
    }
    for n in 0..N {
        let r: [f32; HALF] = must_cast(_mm256_add_ps(acc[n], mins[n]));
        out[n * GROUP + h * HALF..][..HALF].copy_from_slice(&r);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q8_0_group(w: &PackedQ8_0, g: usize, x: &[ActBlock], m: usize, out: &mut [f32]) {
    let kb = w.blocks_per_row();
    for h in 0..2 {
        let mut i = 0;
        while i + TILE <= m {
            q8_0_tile::<TILE>(w, g, h, &x[i * kb..], &mut out[i * GROUP..]);
            i += TILE;
        }
        while i < m {
            q8_0_tile::<1>(w, g, h, &x[i * kb..], &mut out[i * GROUP..]);
            i += 1;
        }
    }
}

/// Q8_0: the stored `q + 128` is turned back into `q`; `vpmaddubsw` of
/// `|q|` and `x` with `q`'s sign stays below 2 · 128 · 127 per pair: exact.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_tile<const N: usize>(w: &PackedQ8_0, g: usize, h: usize, x: &[ActBlock], out: &mut [f32]) {
    let kb = w.blocks_per_row();
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..kb {
        if h == 0 {
            let next = (g * kb + b) * 512 + 2 * PREFETCH;
            for line in 0..8 {
                super::prefetch(&w.qs, next + 64 * line);
            }
            super::prefetch(&w.d, (next / 512) * GROUP);
        }
        let v = w.qs_of(g, b).as_chunks::<64>().0;
        let mut wq = [_mm256_setzero_si256(); 8];
        let mut wa = [_mm256_setzero_si256(); 8];
        for c in 0..8 {
            wq[c] = _mm256_xor_si256(load_half(&v[c], h), flip);
            wa[c] = _mm256_abs_epi8(wq[c]);
        }
        let dw = f16x8(w.d_of(g, b), h);
        for n in 0..N {
            let xb = &x[n * kb + b];
            let xw: [i32; 8] = must_cast(xb.qs);
            let mut s = _mm256_setzero_si256();
            for c in 0..8 {
                let xs = _mm256_sign_epi8(_mm256_set1_epi32(xw[c]), wq[c]);
                s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(wa[c], xs), ones));
            }
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
            acc[n] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc[n]);
        }
    }
    for n in 0..N {
        let r: [f32; HALF] = must_cast(acc[n]);
        out[n * GROUP + h * HALF..][..HALF].copy_from_slice(&r);
    }
}

/// One activation block quantized bit for bit as the scalar code does (see
/// the AVX-512 version).
/// [`super::act_blocks`] at this level.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn act_blocks(x: &[f32], q8_1: bool) -> Vec<ActBlock> {
    super::act_blocks_with(x, q8_1, |b| quantize_block(b), |v| round_f16(v))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quantize_block(x: &[f32; 32]) -> (f32, [i8; 32], i32) {
    let parts: [[f32; 8]; 4] = must_cast(*x);
    let v: [__m256; 4] = [
        must_cast(parts[0]),
        must_cast(parts[1]),
        must_cast(parts[2]),
        must_cast(parts[3]),
    ];
    let mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut amax = _mm256_setzero_ps();
    for p in v {
        // maxps returns its second operand when either is NaN.
        amax = _mm256_max_ps(_mm256_and_ps(p, mask), amax);
    }
    let lanes: [f32; 8] = must_cast(amax);
    let amax = lanes.iter().fold(0f32, |a, b| a.max(*b));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let mut q = [_mm256_setzero_si256(); 4];
    for (qi, p) in q.iter_mut().zip(v) {
        let p = _mm256_mul_ps(p, id);
        let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(p, p));
        let c = _mm256_min_ps(
            _mm256_max_ps(p, _mm256_set1_ps(-128.0)),
            _mm256_set1_ps(127.0),
        );
        *qi = _mm256_and_si256(_mm256_cvtps_epi32(c), ordered);
    }
    let w16 = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    // packs work per 128-bit lane: put the 4-byte groups back in order.
    let ordered = _mm256_permutevar8x32_epi32(w16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let lanes: [i32; 8] = must_cast(_mm256_add_epi32(
        _mm256_add_epi32(q[0], q[1]),
        _mm256_add_epi32(q[2], q[3]),
    ));
    (d, must_cast(ordered), lanes.iter().sum())
}

/// `x` rounded through f16 (nearest, ties to even): what the `half` crate's
/// F16C path computes, in one instruction each way.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn round_f16(x: f32) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
        _mm_set_ss(x),
    )))
}

/// The scalar `dot` of the CPU backend, bit for bit: lane `i` of 8 fuses
/// the products of elements `i mod 8`, lanes are summed as
/// `((a0+a4)+(a1+a5))+((a2+a6)+(a3+a7))`, and the tail is added in order.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    let mut acc = _mm256_setzero_ps();
    for (x, y) in ca.iter().zip(cb) {
        acc = _mm256_fmadd_ps(must_cast(*x), must_cast(*y), acc);
    }
    let l: [f32; 8] = must_cast(acc);
    let mut sum = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// `o[j] = p · v[j] + o[j]` fused, as `f32::mul_add`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn axpy(p: f32, v: &[f32], o: &mut [f32]) {
    let pv = _mm256_set1_ps(p);
    let (cv, rv) = v.as_chunks::<8>();
    let (co, ro) = o.as_chunks_mut::<8>();
    for (x, y) in cv.iter().zip(co.iter_mut()) {
        *y = must_cast(_mm256_fmadd_ps(pv, must_cast(*x), must_cast(*y)));
    }
    for (x, y) in rv.iter().zip(ro) {
        *y = p.mul_add(*x, *y);
    }
}

/// f16 bits to f32 (exact).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_to_f32(bits: &[u16], out: &mut [f32]) {
    let (cb, rb) = bits.as_chunks::<8>();
    let (co, ro) = out.as_chunks_mut::<8>();
    for (b, o) in cb.iter().zip(co.iter_mut()) {
        *o = must_cast(_mm256_cvtph_ps(must_cast::<[u16; 8], __m128i>(*b)));
    }
    for (b, o) in rb.iter().zip(ro) {
        *o = half::f16::from_bits(*b).to_f32();
    }
}

/// Eight keys from key `t`, each lane [`dot`]'s order for its key: eight
/// accumulators for d mod 8 (eight independent chains), their fixed pairwise
/// sum, then the tail of d in order (multiply, then add), times `scale`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn score_block(q: &[f32], kt: &[f32], stride: usize, t: usize, scale: f32) -> [f32; 8] {
    let col = |d: usize| -> __m256 {
        let (c, _) = kt[d * stride + t..][..8].as_chunks::<8>();
        must_cast(c[0])
    };
    let (cq, rq) = q.as_chunks::<8>();
    let mut acc = [_mm256_setzero_ps(); 8];
    for (c, qc) in cq.iter().enumerate() {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(_mm256_set1_ps(qc[i]), col(8 * c + i), *a);
        }
    }
    let mut sum = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[1], acc[5])),
        _mm256_add_ps(_mm256_add_ps(acc[2], acc[6]), _mm256_add_ps(acc[3], acc[7])),
    );
    for (i, qd) in rq.iter().enumerate() {
        let d = 8 * cq.len() + i;
        sum = _mm256_add_ps(sum, _mm256_mul_ps(_mm256_set1_ps(*qd), col(d)));
    }
    must_cast(_mm256_mul_ps(sum, _mm256_set1_ps(scale)))
}

/// See `portable::scores`: every score in [`dot`]'s order, eight keys at a
/// time; a last partial block is computed on the padding columns that `kt`
/// has past the keys (see [`super::scores`]) and only its first results are
/// kept; without padding the last keys go one by one.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn scores(q: &[f32], kt: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let n = out.len();
    let cols = super::readable_cols(q.len(), kt.len(), stride);
    let mut t = 0;
    while t < n && t + 8 <= cols {
        let s = score_block(q, kt, stride, t, scale);
        let keep = (n - t).min(8);
        out[t..t + keep].copy_from_slice(&s[..keep]);
        t += keep;
    }
    if t < n {
        let mut col = vec![0f32; q.len()];
        for (i, o) in out[t..].iter_mut().enumerate() {
            for (d, c) in col.iter_mut().enumerate() {
                *c = kt[d * stride + t + i];
            }
            *o = dot(q, &col) * scale;
        }
    }
}

/// `R · 8` outputs from `j`, kept in registers over all rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn weighted_block<const R: usize>(p: &[f32], v: &[f32], stride: usize, j: usize, o: &mut [f32]) {
    let mut acc = [_mm256_setzero_ps(); R];
    for (t, pt) in p.iter().enumerate() {
        let pv = _mm256_set1_ps(*pt);
        let (row, _) = v[t * stride + j..][..8 * R].as_chunks::<8>();
        for (a, r) in acc.iter_mut().zip(row) {
            *a = _mm256_fmadd_ps(pv, must_cast(*r), *a);
        }
    }
    let (dst, _) = o[j..j + 8 * R].as_chunks_mut::<8>();
    for (d, a) in dst.iter_mut().zip(acc) {
        *d = must_cast(a);
    }
}

/// See `portable::weighted_rows`: 64 (eight chains) or 32 outputs stay in
/// registers over all rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn weighted_rows(p: &[f32], v: &[f32], stride: usize, o: &mut [f32]) {
    let hd = o.len();
    let mut j = 0;
    while j + 64 <= hd {
        weighted_block::<8>(p, v, stride, j, o);
        j += 64;
    }
    while j + 32 <= hd {
        weighted_block::<4>(p, v, stride, j, o);
        j += 32;
    }
    while j + 8 <= hd {
        weighted_block::<1>(p, v, stride, j, o);
        j += 8;
    }
    if j < hd {
        let rest = &mut o[j..];
        rest.fill(0.0);
        for (t, pt) in p.iter().enumerate() {
            axpy(*pt, &v[t * stride + j..][..rest.len()], rest);
        }
    }
}

/// Eight lanes of `portable::exp`, op for op.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn exp8(x: __m256) -> __m256 {
    use super::EXP as E;
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(E.lo)), _mm256_set1_ps(E.hi));
    let fx = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(E.log2e),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fmadd_ps(fx, _mm256_set1_ps(-E.c1), x);
    let r = _mm256_fmadd_ps(fx, _mm256_set1_ps(-E.c2), r);
    let mut y = _mm256_set1_ps(E.p[0]);
    for p in &E.p[1..] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*p));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvttps_epi32(fx),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn exp_in_place(x: &mut [f32]) {
    let (chunks, rest) = x.as_chunks_mut::<8>();
    for c in chunks {
        *c = must_cast(exp8(must_cast(*c)));
    }
    for v in rest {
        *v = super::portable::exp(*v);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn silu(x: &[f32], out: &mut [f32]) {
    let (cx, rx) = x.as_chunks::<8>();
    let (co, ro) = out.as_chunks_mut::<8>();
    let one = _mm256_set1_ps(1.0);
    let neg = _mm256_set1_ps(-0.0);
    for (o, v) in co.iter_mut().zip(cx) {
        let v: __m256 = must_cast(*v);
        let e = exp8(_mm256_xor_ps(v, neg));
        *o = must_cast(_mm256_div_ps(v, _mm256_add_ps(one, e)));
    }
    for (o, v) in ro.iter_mut().zip(rx) {
        *o = v / (1.0 + super::portable::exp(-v));
    }
}

/// Rounds through f16 in place, eight at a time (`vcvtps2ph` round to
/// nearest even, then back: exact), as `half`'s conversion of each value.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn round_f16_in_place(x: &mut [f32]) {
    let (chunks, rest) = x.as_chunks_mut::<8>();
    for c in chunks {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(must_cast(*c));
        *c = must_cast(_mm256_cvtph_ps(h));
    }
    for v in rest {
        *v = crate::quant::round_f16(*v);
    }
}

/// The largest value (`f32::NEG_INFINITY` for none), eight lanes at a time;
/// max is exact, so the order does not matter (NaN aside, which the callers'
/// inputs never hold).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn max(x: &[f32]) -> f32 {
    let (chunks, rest) = x.as_chunks::<8>();
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in chunks {
        m = _mm256_max_ps(m, must_cast(*c));
    }
    let lanes: [f32; 8] = must_cast(m);
    lanes
        .iter()
        .chain(rest)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}
