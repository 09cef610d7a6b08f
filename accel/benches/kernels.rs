//! Matmul kernels on SmolLM2-135M's shapes: the GGUF-layout reference
//! kernel against the packed SIMD kernel of the level this CPU runs
//! (`CINFER_SIMD=portable|avx2|avx512` lowers it). Prints a table:
//!
//! ```sh
//! cargo bench -p cinfer-accel --bench kernels
//! ```
#![allow(clippy::expect_used, clippy::unwrap_used)]

use cinfer_accel::quant::{BlockQ4_1, BlockQ8_0};
use cinfer_accel::{Backend, CpuBackend, DeviceBuffer, simd};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(f: impl Fn()) -> Duration {
    f();
    let reps = 9;
    median(
        (0..reps)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let cpu = CpuBackend;
    let xq: Vec<f32> = (0..128 * 576)
        .map(|i| ((i % 97) as f32 - 48.0) / 17.0)
        .collect();
    let t = time(|| {
        std::hint::black_box(cinfer_accel::quant::act_q8_1(&xq));
    });
    println!(
        "activation quantization, 128 x 576: {:.1} µs",
        t.as_secs_f64() * 1e6
    );
    println!(
        "SIMD level: {} (detected {}); rayon threads: {}",
        simd::level().name(),
        simd::detected().name(),
        rayon::current_num_threads()
    );
    println!(
        "| weights [n, k] | m | reference (GGUF layout) | packed SIMD | speed-up | packed GB/s of weights |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut seed = 0x9e37_79b9u32;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for &(name, n, k, q8) in &[
        ("attn_q/o Q4_1", 576usize, 576usize, false),
        ("ffn_up Q4_1", 1536, 576, false),
        ("ffn_down Q4_1", 576, 1536, false),
        ("output Q8_0", 49152, 576, true),
    ] {
        let kb = k / 32;
        let raw = if q8 {
            DeviceBuffer::Q8_0(
                (0..n * kb)
                    .map(|_| BlockQ8_0 {
                        d: half::f16::from_f32(0.01).to_bits(),
                        qs: core::array::from_fn(|_| next() as i8),
                    })
                    .collect(),
            )
        } else {
            DeviceBuffer::Q4_1(
                (0..n * kb)
                    .map(|_| BlockQ4_1 {
                        d: half::f16::from_f32(0.01).to_bits(),
                        m: half::f16::from_f32(-0.08).to_bits(),
                        qs: core::array::from_fn(|_| next() as u8),
                    })
                    .collect(),
            )
        };
        let packed = cpu.upload_weights(raw.clone(), n, k).expect("pack");
        let bytes = (n * kb * if q8 { 34 } else { 20 }) as f64;
        for m in [1usize, 128] {
            if q8 && m > 1 {
                continue; // the output matrix sees one row per token
            }
            let x = DeviceBuffer::F32(
                (0..m * k)
                    .map(|i| ((i % 97) as f32 - 48.0) / 17.0)
                    .collect(),
            );
            let t_ref = time(|| {
                std::hint::black_box(cpu.matmul(&x, &raw, m, k, n).expect("matmul"));
            });
            let t_new = time(|| {
                std::hint::black_box(cpu.matmul(&x, &packed, m, k, n).expect("matmul"));
            });
            println!(
                "| {name} [{n}, {k}] | {m} | {:.1} µs | {:.1} µs | {:.1}× | {:.1} |",
                t_ref.as_secs_f64() * 1e6,
                t_new.as_secs_f64() * 1e6,
                t_ref.as_secs_f64() / t_new.as_secs_f64(),
                bytes / t_new.as_secs_f64() / 1e9,
            );
        }
    }
}
