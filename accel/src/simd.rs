//! Run-time SIMD dispatch: the one module of this crate with `unsafe`.
//!
//! The kernels (`avx512`, `avx2`) are safe `#[target_feature]` functions
//! (no `unsafe` inside: loads go through `bytemuck` casts of fixed-size
//! arrays). Calling one from code compiled without those features is what
//! needs `unsafe`: the caller promises the CPU has them. Every such call is
//! here, behind a check of [`detected`] in the same `match` arm, so a wrong
//! [`Level`] passed in cannot reach an instruction the CPU lacks: it falls
//! back to the portable path.
//!
//! [`level`] is the level the CPU backend uses: the best one [`detected`],
//! unless `CINFER_SIMD` (`portable`, `avx2`, `avx512`) asks for a lower one
//! (for benchmarks and tests; a higher one than the CPU has is ignored).
#![allow(unsafe_code)]

use crate::pack::{GROUP, PackedQ4_1, PackedQ8_0};
use crate::quant::ActBlock;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

/// A family of kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 + FMA + F16C (`vpmaddubsw`).
    Avx2,
    /// x86-64 AVX-512 F/BW with VNNI (`vpdpbusd` on 512 bits), and the AVX2
    /// level's features.
    Avx512Vnni,
}

impl Level {
    /// Short name for logs and benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// The best level this CPU supports (detected once).
pub fn detected() -> Level {
    static DETECTED: OnceLock<Level> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    let avx2 = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    if avx2
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
    {
        Level::Avx512Vnni
    } else if avx2 {
        Level::Avx2
    } else {
        Level::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Portable
}

/// The level the CPU backend runs: [`detected`], lowered by `CINFER_SIMD`.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let wanted = match std::env::var("CINFER_SIMD").as_deref() {
            Ok("portable") => Level::Portable,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512Vnni,
        };
        wanted.min(detected())
    })
}

/// Every level this CPU can run, lowest first (for parity tests).
pub fn available() -> Vec<Level> {
    [Level::Portable, Level::Avx2, Level::Avx512Vnni]
        .into_iter()
        .filter(|l| *l <= detected())
        .collect()
}

/// Asks the CPU to start fetching the cache line of `bytes[at]` (a hint;
/// nothing when `at` is out of range or off x86-64). Decode streams weights
/// from memory: the kernels prefetch a few blocks ahead.
#[inline(always)]
pub(crate) fn prefetch<T>(items: &[T], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(item) = items.get(at) {
        // SAFETY: `prefetcht0` (SSE, part of every x86-64) is a hint: it never
        // faults and changes no memory or register state; the address is of
        // an element in bounds.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                std::ptr::from_ref(item).cast(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (items, at);
}

/// The activation blocks of `x` (a multiple of 32 long) for Q4_1 weights
/// (`q8_1`: with `s = d · Σq` rounded to f16) or Q8_0 weights (`s = 0`), the
/// numbers of [`crate::quant::quantize_q8_1`] / [`crate::quant::quantize_q8_0`].
/// One call per launch, on the calling thread: per block it is a few
/// nanoseconds, less than handing it to other threads costs (and rayon's
/// threads would contend with the matmul pool's spinning workers).
pub(crate) fn act_blocks(level: Level, x: &[f32], q8_1: bool) -> Vec<ActBlock> {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni if detected() >= Level::Avx512Vnni => {
            // SAFETY: `detected()` found avx512f, avx512bw, avx512vnni, avx2,
            // fma and f16c, the features `avx512::act_blocks` is compiled with.
            unsafe { avx512::act_blocks(x, q8_1) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::act_blocks` is compiled with.
            unsafe { avx2::act_blocks(x, q8_1) }
        }
        _ => act_blocks_with(x, q8_1, portable::quantize_block, crate::quant::round_f16),
    }
}

/// [`act_blocks`] with one level's block quantizer (scale, values, their
/// sum) and f16 rounding; inlined into each level's
/// `act_blocks`, so the whole loop is compiled with that level's features.
#[inline(always)]
fn act_blocks_with(
    x: &[f32],
    q8_1: bool,
    quantize: impl Fn(&[f32; 32]) -> (f32, [i8; 32], i32),
    round_f16: impl Fn(f32) -> f32,
) -> Vec<ActBlock> {
    let blocks = x.as_chunks::<32>().0;
    let mut out = Vec::with_capacity(blocks.len());
    for b in blocks {
        let (d, qs, sum) = quantize(b);
        out.push(ActBlock {
            d: round_f16(d),
            s: if q8_1 { round_f16(d * sum as f32) } else { 0.0 },
            sum,
            qs,
        });
    }
    out
}

/// Σ a·b of two equal-length f32 slices, bit for bit the CPU backend's
/// scalar order (8 fused lanes, a fixed pairwise sum, the tail in order).
pub(crate) fn dot(level: Level, a: &[f32], b: &[f32]) -> f32 {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::dot` is compiled with.
            unsafe { avx2::dot(a, b) }
        }
        _ => portable::dot(a, b),
    }
}

/// The constants of the kernels' e^x (Cephes' `expf`: range reduction by
/// ln 2 in two parts, a degree-5 polynomial, the exponent put in by hand;
/// within 2 ulp of the correctly rounded value over the clamped range, the
/// same scheme as ggml's vectorized `expf`). Inputs are clamped to
/// `lo..=hi` (e^lo is the smallest normal f32, e^hi about f32::MAX / 2, so
/// that the exponent put in is at most 127): no infinities, no subnormals.
pub(crate) struct ExpConsts {
    pub(crate) lo: f32,
    pub(crate) hi: f32,
    pub(crate) log2e: f32,
    pub(crate) c1: f32,
    pub(crate) c2: f32,
    pub(crate) p: [f32; 6],
}

pub(crate) const EXP: ExpConsts = ExpConsts {
    lo: -87.336_54,
    hi: 88.0,
    log2e: std::f32::consts::LOG2_E,
    c1: 0.693_359_4,
    c2: -2.121_944_4e-4,
    p: [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ],
};

/// Columns of a transposed K (`hd` rows of `stride`, `kt_len` values in all)
/// readable in every row: what the SIMD score kernels may load past the keys.
fn readable_cols(hd: usize, kt_len: usize, stride: usize) -> usize {
    match hd {
        0 => 0,
        hd => stride.min(kt_len.saturating_sub((hd - 1) * stride)),
    }
}

/// `out[t] = dot(q, column t of kt) · scale`: attention scores against a
/// transposed K (keys along a row, so each SIMD lane is one key and no
/// horizontal sum is needed), each in [`dot`]'s summation order — the order
/// of the per-key dot this replaced, which the model's greedy output against
/// llama.cpp is sensitive to (a sequential sum over d flipped a token of the
/// reference test). Bit for bit the same at every level. Give `kt` columns
/// past the keys (`stride` and the last row's length a multiple of 8 beyond
/// `out.len()`, any values): the SIMD kernel then computes a last partial
/// block on them, lanes being independent, instead of key by key.
pub(crate) fn scores(
    level: Level,
    q: &[f32],
    kt: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni if detected() >= Level::Avx512Vnni => {
            // SAFETY: `detected()` found avx512f, avx512bw, avx512vnni, avx2,
            // fma and f16c, the features `avx512::scores` is compiled with.
            unsafe { avx512::scores(q, kt, stride, scale, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::scores` is compiled with.
            unsafe { avx2::scores(q, kt, stride, scale, out) }
        }
        _ => portable::scores(q, kt, stride, scale, out),
    }
}

/// `o[j] = Σ_t p[t]·v[t·stride + j]`, fused in `t` order: bit for bit
/// `o[j] = p·v[j] + o[j]` for each row from zeros, with the outputs kept in
/// registers.
pub(crate) fn weighted_rows(level: Level, p: &[f32], v: &[f32], stride: usize, o: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni if detected() >= Level::Avx512Vnni => {
            // SAFETY: `detected()` found avx512f, avx512bw, avx512vnni, avx2,
            // fma and f16c, the features `avx512::weighted_rows` is compiled with.
            unsafe { avx512::weighted_rows(p, v, stride, o) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::weighted_rows` is compiled with.
            unsafe { avx2::weighted_rows(p, v, stride, o) }
        }
        _ => portable::weighted_rows(p, v, stride, o),
    }
}

/// e^x in place ([`EXP`]); bit for bit the same at every level.
pub(crate) fn exp_in_place(level: Level, x: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::exp_in_place` is compiled with.
            unsafe { avx2::exp_in_place(x) }
        }
        _ => portable::exp_in_place(x),
    }
}

/// `out = x / (1 + e^-x)` with [`EXP`]'s e^x; bit for bit the same at every level.
pub(crate) fn silu(level: Level, x: &[f32], out: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::silu` is compiled with.
            unsafe { avx2::silu(x, out) }
        }
        _ => portable::silu(x, out),
    }
}

/// Rounds each value through f16 (what storing it in an f16 field does): bit
/// for bit [`crate::quant::round_f16`] at every level.
pub(crate) fn round_f16_in_place(level: Level, x: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::round_f16_in_place` is compiled with.
            unsafe { avx2::round_f16_in_place(x) }
        }
        _ => portable::round_f16_in_place(x),
    }
}

/// The largest value of `x` (`f32::NEG_INFINITY` when empty): the same at
/// every level, max being exact (inputs hold no NaN).
pub(crate) fn max(level: Level, x: &[f32]) -> f32 {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::max` is compiled with.
            unsafe { avx2::max(x) }
        }
        _ => portable::max(x),
    }
}

/// f16 bits to f32 (exact).
pub(crate) fn f16_to_f32(level: Level, bits: &[u16], out: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::f16_to_f32` is compiled with.
            unsafe { avx2::f16_to_f32(bits, out) }
        }
        _ => portable::f16_to_f32(bits, out),
    }
}

/// Rows `16g..16g+16` of `w` times the `m` activation rows `x` (`m · kb`
/// blocks): `out[i · 16 + r]` = row `16g + r` · activation row `i`
/// (padding rows give 0). `out.len() == m · 16`.
pub(crate) fn q4_1_group(
    level: Level,
    w: &PackedQ4_1,
    g: usize,
    x: &[ActBlock],
    m: usize,
    out: &mut [f32],
) {
    debug_assert_eq!(out.len(), m * GROUP);
    debug_assert_eq!(x.len(), m * w.blocks_per_row());
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni if detected() >= Level::Avx512Vnni => {
            // SAFETY: `detected()` found avx512f, avx512bw, avx512vnni, avx2,
            // fma and f16c on this CPU, the features `avx512::q4_1_group` is compiled with.
            unsafe { avx512::q4_1_group(w, g, x, m, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::q4_1_group` is compiled with.
            unsafe { avx2::q4_1_group(w, g, x, m, out) }
        }
        _ => portable::q4_1_group(w, g, x, m, out),
    }
}

/// [`q4_1_group`] for Q8_0 weights.
pub(crate) fn q8_0_group(
    level: Level,
    w: &PackedQ8_0,
    g: usize,
    x: &[ActBlock],
    m: usize,
    out: &mut [f32],
) {
    debug_assert_eq!(out.len(), m * GROUP);
    debug_assert_eq!(x.len(), m * w.blocks_per_row());
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni if detected() >= Level::Avx512Vnni => {
            // SAFETY: `detected()` found avx512f, avx512bw, avx512vnni, avx2,
            // fma and f16c, the features `avx512::q8_0_group` is compiled with.
            unsafe { avx512::q8_0_group(w, g, x, m, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni if detected() >= Level::Avx2 => {
            // SAFETY: `detected()` found avx2, fma and f16c, the features
            // `avx2::q8_0_group` is compiled with.
            unsafe { avx2::q8_0_group(w, g, x, m, out) }
        }
        _ => portable::q8_0_group(w, g, x, m, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{self, BlockQ4_1, BlockQ8_0};
    use half::f16;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// An f16 scale: mostly ordinary, sometimes 0, subnormal, inf or NaN.
    fn scale(rng: &mut StdRng) -> u16 {
        match rng.random_range(0..40) {
            0 => 0,
            1 => 0x0001, // smallest subnormal
            2 => f16::INFINITY.to_bits(),
            3 => f16::NEG_INFINITY.to_bits(),
            4 => f16::NAN.to_bits(),
            _ => f16::from_f32(rng.random_range(-0.05f32..0.05)).to_bits(),
        }
    }

    fn q4_1_blocks(rng: &mut StdRng, n: usize) -> Vec<BlockQ4_1> {
        (0..n)
            .map(|_| BlockQ4_1 {
                d: scale(rng),
                m: scale(rng),
                qs: core::array::from_fn(|_| rng.random()),
            })
            .collect()
    }

    fn q8_0_blocks(rng: &mut StdRng, n: usize) -> Vec<BlockQ8_0> {
        (0..n)
            .map(|_| BlockQ8_0 {
                d: scale(rng),
                // Files may hold -128 although quantization never makes it.
                qs: core::array::from_fn(|_| rng.random()),
            })
            .collect()
    }

    /// Activations with some all-zero, NaN, inf and huge blocks.
    fn activations(rng: &mut StdRng, len: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        for block in x.chunks_exact_mut(32) {
            match rng.random_range(0..12) {
                0 => block.fill(0.0),
                1 => block[rng.random_range(0..32)] = f32::NAN,
                2 => block[rng.random_range(0..32)] = f32::INFINITY,
                3 => block.fill(f32::NAN),
                4 => block[rng.random_range(0..32)] = 3.0e38,
                _ => {}
            }
        }
        x
    }

    /// Equal bit for bit, any NaN equal to any NaN.
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    const SHAPES: [(usize, usize, usize); 7] = [
        // (activation rows m, weight rows n, blocks per row kb)
        (1, 1, 1),
        (1, 17, 3),
        (2, 16, 18),
        (3, 40, 5),
        (4, 33, 2),
        (5, 15, 7),
        (9, 48, 4),
    ];

    #[test]
    fn activation_blocks_are_the_reference_quantization() {
        let mut rng = StdRng::seed_from_u64(1);
        let x = activations(&mut rng, 32 * 64);
        let (a1, r1) = (quant::act_q8_1(&x), quant::quantize_q8_1(&x));
        let (a0, r0) = (quant::act_q8_0(&x), quant::quantize_q8_0(&x));
        for ((a, r), (b, s)) in a1.iter().zip(&r1).zip(a0.iter().zip(&r0)) {
            assert_eq!(
                (a.qs, a.d.to_bits(), a.s.to_bits()),
                (r.qs, r.d.to_bits(), r.s.to_bits())
            );
            assert_eq!((b.qs, b.d.to_bits()), (s.qs, s.d().to_bits()));
            let sum: i32 = r.qs.iter().map(|q| i32::from(*q)).sum();
            assert_eq!((a.sum, b.sum), (sum, sum));
        }
    }

    #[test]
    fn simd_quantization_is_the_scalar_one_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut x = activations(&mut rng, 32 * 400);
        // Tiny blocks whose 127 / amax overflows to inf, and -0.0.
        x[..32].fill(1.0e-45);
        x[32..64]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = if i % 2 == 0 { -1.0e-44 } else { -0.0 });
        // NaN and inf blocks too.
        x[64] = f32::NAN;
        x[100] = f32::INFINITY;
        x[130] = f32::NEG_INFINITY;
        x[131] = f32::NAN;
        let (r1, r0) = (quant::quantize_q8_1(&x), quant::quantize_q8_0(&x));
        for &level in &available() {
            let (a1, a0) = (act_blocks(level, &x, true), act_blocks(level, &x, false));
            assert_eq!((a1.len(), a0.len()), (r1.len(), r0.len()));
            for (i, b) in x.as_chunks::<32>().0.iter().enumerate() {
                let (rd, rq) = quant::quantize_block(b);
                let sum: i32 = rq.iter().map(|q| i32::from(*q)).sum();
                let want1 = (r1[i].d.to_bits(), r1[i].s.to_bits(), sum, r1[i].qs);
                let got1 = (a1[i].d.to_bits(), a1[i].s.to_bits(), a1[i].sum, a1[i].qs);
                assert_eq!(got1, want1, "{level:?} q8_1 on {b:?}");
                let want0 = (
                    quant::round_f16(rd).to_bits(),
                    0f32.to_bits(),
                    sum,
                    r0[i].qs,
                );
                let got0 = (a0[i].d.to_bits(), a0[i].s.to_bits(), a0[i].sum, a0[i].qs);
                assert_eq!(got0, want0, "{level:?} q8_0 on {b:?}");
                assert_eq!(r0[i].qs, rq);
            }
        }
    }

    #[test]
    fn f32_dot_and_f16_conversions_match_the_scalar_code_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(6);
        for len in [0usize, 1, 7, 8, 9, 64, 100, 1537] {
            let mut a = activations(&mut rng, len.div_ceil(32) * 32);
            a.truncate(len);
            let b: Vec<f32> = (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let bits: Vec<u16> = (0..len).map(|_| rng.random()).collect();
            let mut rounded = b.clone();
            portable::round_f16_in_place(&mut rounded);
            for &level in &available() {
                assert!(
                    same(max(level, &b), portable::max(&b)),
                    "{level:?} max len {len}"
                );
                let mut r = b.clone();
                round_f16_in_place(level, &mut r);
                assert!(
                    r.iter().zip(&rounded).all(|(x, y)| same(*x, *y)),
                    "{level:?} round_f16 len {len}"
                );
                let (d, rd) = (dot(level, &a, &b), portable::dot(&a, &b));
                assert!(same(d, rd), "{level:?} dot len {len}: {d} vs {rd}");
                let (mut f, mut rf) = (vec![0f32; len], vec![0f32; len]);
                f16_to_f32(level, &bits, &mut f);
                portable::f16_to_f32(&bits, &mut rf);
                assert!(
                    f.iter().zip(&rf).all(|(x, y)| same(*x, *y)),
                    "{level:?} f16 len {len}"
                );
            }
        }
    }

    #[test]
    fn attention_kernels_match_the_scalar_code_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(7);
        // Head sizes with and without a tail after the 32- and 8-wide steps.
        // Unpadded rows (the scalar tail runs) and rows padded to 32 keys
        // (the last block is computed on the padding), as attention gives.
        for (hd, keys, stride) in [
            (64usize, 129usize, 134usize),
            (64, 1, 6),
            (40, 37, 42),
            (8, 8, 13),
            (3, 70, 75),
            (64, 100, 104),
            (64, 1, 8),
            (64, 129, 136),
            (40, 77, 80),
            (12, 20, 24),
        ] {
            let q: Vec<f32> = (0..hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let kt: Vec<f32> = (0..hd * stride)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let p: Vec<f32> = (0..keys).map(|_| rng.random_range(0.0f32..1.0)).collect();
            let vstride = hd + 3;
            let v: Vec<f32> = (0..keys * vstride)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let mut rs = vec![0f32; keys];
            portable::scores(&q, &kt, stride, 0.125, &mut rs);
            // The per-key dot of the column, scaled.
            for (t, r) in rs.iter().enumerate() {
                let col: Vec<f32> = (0..hd).map(|d| kt[d * stride + t]).collect();
                assert!(same(*r, portable::dot(&q, &col) * 0.125));
            }
            let mut ro = vec![1f32; hd];
            portable::weighted_rows(&p, &v, vstride, &mut ro);
            let mut expect = vec![0f32; hd];
            for (t, pt) in p.iter().enumerate() {
                for j in 0..hd {
                    expect[j] = pt.mul_add(v[t * vstride + j], expect[j]);
                }
            }
            assert!(ro.iter().zip(&expect).all(|(x, y)| same(*x, *y)));
            for &level in &available() {
                let mut s = vec![0f32; keys];
                scores(level, &q, &kt, stride, 0.125, &mut s);
                assert!(
                    s.iter().zip(&rs).all(|(x, y)| same(*x, *y)),
                    "{level:?} scores {hd}x{keys}"
                );
                let mut o = vec![7f32; hd];
                weighted_rows(level, &p, &v, vstride, &mut o);
                assert!(
                    o.iter().zip(&ro).all(|(x, y)| same(*x, *y)),
                    "{level:?} weighted {hd}x{keys}"
                );
            }
        }
    }

    #[test]
    fn exp_and_silu_are_within_2_ulp_and_the_same_at_every_level() {
        let mut rng = StdRng::seed_from_u64(8);
        let mut x: Vec<f32> = (0..4099)
            .map(|_| rng.random_range(-87.0f32..88.0))
            .collect();
        x.extend([
            0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 88.0, -87.3, 0.5, -20.0, 10.0,
        ]);
        let mut rx = x.clone();
        portable::exp_in_place(&mut rx);
        for (v, e) in x.iter().zip(&rx) {
            let exact = f64::from(*v).exp();
            let ulp = f64::from(f32::EPSILON) * exact.abs();
            assert!(
                (f64::from(*e) - exact).abs() <= 2.0 * ulp,
                "exp({v}) = {e}, exact {exact}"
            );
        }
        // Out of range: clamped, never infinite, NaN-free, never subnormal.
        let mut edge = vec![
            -1000.0f32,
            -88.0,
            89.0,
            1000.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        portable::exp_in_place(&mut edge);
        assert!(edge.iter().all(|e| e.is_normal()), "{edge:?}");
        let mut rs = vec![0f32; x.len()];
        portable::silu(&x, &mut rs);
        for (v, s) in x.iter().zip(&rs) {
            let exact = f64::from(*v) / (1.0 + (-f64::from(*v)).exp());
            assert!(
                (f64::from(*s) - exact).abs()
                    <= 4.0 * f64::from(f32::EPSILON) * exact.abs().max(1e-30),
                "silu({v}) = {s}, exact {exact}"
            );
        }
        for &level in &available() {
            let mut e = x.clone();
            exp_in_place(level, &mut e);
            assert!(
                e.iter().zip(&rx).all(|(a, b)| same(*a, *b)),
                "{level:?} exp"
            );
            let mut s = vec![0f32; x.len()];
            silu(level, &x, &mut s);
            assert!(
                s.iter().zip(&rs).all(|(a, b)| same(*a, *b)),
                "{level:?} silu"
            );
        }
    }

    #[test]
    fn packing_keeps_every_block() {
        let mut rng = StdRng::seed_from_u64(2);
        for (_, n, kb) in SHAPES {
            let w = q4_1_blocks(&mut rng, n * kb);
            assert_eq!(crate::pack::PackedQ4_1::new(&w, n, kb).unpack(), w);
            let w = q8_0_blocks(&mut rng, n * kb);
            assert_eq!(crate::pack::PackedQ8_0::new(&w, n, kb).unpack(), w);
        }
    }

    #[test]
    fn every_level_matches_the_scalar_reference_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(3);
        let levels = available();
        eprintln!("levels on this CPU: {levels:?}");
        for (m, n, kb) in SHAPES {
            let x = activations(&mut rng, m * kb * 32);
            let (a1, r1) = (quant::act_q8_1(&x), quant::quantize_q8_1(&x));
            let (a0, r0) = (quant::act_q8_0(&x), quant::quantize_q8_0(&x));
            let w4 = q4_1_blocks(&mut rng, n * kb);
            let w8 = q8_0_blocks(&mut rng, n * kb);
            let (p4, p8) = (
                crate::pack::PackedQ4_1::new(&w4, n, kb),
                crate::pack::PackedQ8_0::new(&w8, n, kb),
            );
            for &level in &levels {
                for g in 0..n.div_ceil(GROUP) {
                    let mut o4 = vec![0f32; m * GROUP];
                    let mut o8 = vec![0f32; m * GROUP];
                    q4_1_group(level, &p4, g, &a1, m, &mut o4);
                    q8_0_group(level, &p8, g, &a0, m, &mut o8);
                    for r in 0..GROUP.min(n - g * GROUP) {
                        let row = g * GROUP + r;
                        for i in 0..m {
                            let want4 =
                                quant::dot_q4_1_q8_1(&w4[row * kb..][..kb], &r1[i * kb..][..kb]);
                            let want8 =
                                quant::dot_q8_0_q8_0(&w8[row * kb..][..kb], &r0[i * kb..][..kb]);
                            let (got4, got8) = (o4[i * GROUP + r], o8[i * GROUP + r]);
                            assert!(
                                same(got4, want4),
                                "{level:?} q4_1 m={m} n={n} kb={kb} row {row} x {i}: {got4} vs {want4}"
                            );
                            assert!(
                                same(got8, want8),
                                "{level:?} q8_0 m={m} n={n} kb={kb} row {row} x {i}: {got8} vs {want8}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_level_the_cpu_lacks_falls_back_instead_of_faulting() {
        // Whatever this CPU has, asking for the highest level is safe and
        // gives the reference numbers.
        let mut rng = StdRng::seed_from_u64(4);
        let w = q4_1_blocks(&mut rng, 16 * 2);
        let x = activations(&mut rng, 64);
        let p = crate::pack::PackedQ4_1::new(&w, 16, 2);
        let (mut hi, mut lo) = (vec![0f32; 16], vec![0f32; 16]);
        q4_1_group(Level::Avx512Vnni, &p, 0, &quant::act_q8_1(&x), 1, &mut hi);
        q4_1_group(Level::Portable, &p, 0, &quant::act_q8_1(&x), 1, &mut lo);
        assert!(hi.iter().zip(&lo).all(|(a, b)| same(*a, *b)));
        assert!(level() <= detected());
    }
}
