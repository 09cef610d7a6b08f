//! SmolLM2-135M through the backend trait natively (no Wasm): prompt
//! processing and decode tokens/s on the CUDA backend beside the CPU backend.
//! Prints `skipped: <reason>` without a GPU or without the model.
//!
//! ```sh
//! cargo bench -p cinfer-host --features cuda --bench cuda
//! ```
#![allow(clippy::expect_used, clippy::unwrap_used)]

use cinfer_host::backend::{
    AttentionShape, Backend, BinaryOp, CpuBackend, CudaBackend, DeviceBuffer, ElemType,
};
use cinfer_host::caps::model::ModelSource;
use cinfer_host::models::SealedGguf;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LAYERS: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

struct Model {
    layers: Vec<Vec<DeviceBuffer>>,
    embd: DeviceBuffer,
    out_norm: DeviceBuffer,
    output: DeviceBuffer,
    dim: usize,
    heads: usize,
    kvh: usize,
    ffn: usize,
    vocab: usize,
    theta: f32,
    eps: f32,
}

fn load(b: &dyn Backend, m: &SealedGguf) -> Model {
    let meta = m.metadata().expect("metadata");
    let g = cinfer_gguf::parse_metadata(&meta).expect("gguf");
    let u = |k: &str| g.u64(&format!("llama.{k}")).expect("hparam") as usize;
    let t = |n: &str| m.load_tensor(n, b).expect(n);
    let embd = t("token_embd.weight");
    Model {
        layers: (0..u("block_count"))
            .map(|l| {
                LAYERS
                    .iter()
                    .map(|n| t(&format!("blk.{l}.{n}.weight")))
                    .collect()
            })
            .collect(),
        output: m
            .tensor_shape("output.weight")
            .map(|_| t("output.weight"))
            .unwrap_or_else(|_| embd.clone()),
        vocab: m.tensor_shape("token_embd.weight").expect("embd").0[0] as usize,
        embd,
        out_norm: t("output_norm.weight"),
        dim: u("embedding_length"),
        heads: u("attention.head_count"),
        kvh: u("attention.head_count_kv"),
        ffn: u("feed_forward_length"),
        theta: g.f32("llama.rope.freq_base").expect("theta"),
        eps: g
            .f32("llama.attention.layer_norm_rms_epsilon")
            .expect("eps"),
    }
}

/// Prompt time (to the first token) and decode time for `n` more tokens.
/// Prompt time, decode time, and the decode steps' host time split: until
/// the argmax launch (enqueuing every op: on a GPU the launches and
/// allocations) and in the argmax (on a GPU: waiting for the queued work,
/// then the copy back).
fn run(
    b: &dyn Backend,
    m: &Model,
    prompt: &[u32],
    n: usize,
) -> (Duration, Duration, [Duration; 2]) {
    let (dim, hd) = (m.dim, m.dim / m.heads);
    let ctx = prompt.len() + n + 1;
    let mut caches: Vec<(DeviceBuffer, DeviceBuffer)> = (0..m.layers.len())
        .map(|_| {
            let z = || b.zeros(ElemType::F16, ctx * m.kvh * hd).expect("cache");
            (z(), z())
        })
        .collect();
    let mut ids = prompt.to_vec();
    let mut pos = 0;
    let start = Instant::now();
    let mut first = None;
    let mut split = [Duration::ZERO; 2];
    for _ in 0..=n {
        let step = Instant::now();
        let seq = ids.len();
        let mm = |x: &DeviceBuffer, w: &DeviceBuffer, k: usize, n: usize| {
            b.matmul(x, w, seq, k, n).expect("matmul")
        };
        let mut x = b.embedding(&m.embd, dim, &ids).expect("embedding");
        for (l, (kc, vc)) in m.layers.iter().zip(caches.iter_mut()) {
            let h = b.rmsnorm(&x, &l[0], dim, m.eps).expect("norm");
            let q = b
                .rope(&mm(&h, &l[1], dim, dim), m.heads, hd, pos as u32, m.theta)
                .expect("rope");
            let k = b
                .rope(
                    &mm(&h, &l[2], dim, m.kvh * hd),
                    m.kvh,
                    hd,
                    pos as u32,
                    m.theta,
                )
                .expect("rope");
            let v = mm(&h, &l[3], dim, m.kvh * hd);
            let shape = AttentionShape {
                seq,
                heads: m.heads,
                kv_heads: m.kvh,
                head_dim: hd,
                pos,
            };
            let a = b.attention(&q, &k, &v, kc, vc, shape).expect("attention");
            x = b
                .binary(BinaryOp::Add, &x, &mm(&a, &l[4], dim, dim), dim)
                .expect("add");
            let h = b.rmsnorm(&x, &l[5], dim, m.eps).expect("norm");
            let gate = b.silu(&mm(&h, &l[6], dim, m.ffn)).expect("silu");
            let f = b
                .binary(BinaryOp::Mul, &gate, &mm(&h, &l[7], dim, m.ffn), m.ffn)
                .expect("mul");
            x = b
                .binary(BinaryOp::Add, &x, &mm(&f, &l[8], m.ffn, dim), dim)
                .expect("add");
        }
        let last = b.copy_range(&x, (seq - 1) * dim..seq * dim).expect("last");
        let h = b.rmsnorm(&last, &m.out_norm, dim, m.eps).expect("norm");
        let logits = b.matmul(&h, &m.output, 1, dim, m.vocab).expect("logits");
        // The argmax downloads: each step ends synchronised with the device.
        let enqueued = Instant::now();
        let next = b.argmax(&logits, m.vocab).expect("argmax")[0];
        if first.is_none() {
            first = Some(start.elapsed());
        } else {
            split[0] += enqueued - step;
            split[1] += enqueued.elapsed();
        }
        pos += seq;
        ids = vec![next];
    }
    let first = first.expect("one step");
    (first, start.elapsed() - first, split)
}

fn main() {
    let cuda = match CudaBackend::open(0) {
        Ok(c) => c,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    let path = std::env::var_os("CINFER_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CINFER_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/cinfer/models")
                })
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let Ok(plain) = std::fs::read(&path) else {
        println!(
            "skipped: {} not found (set CINFER_MODEL_DIR)",
            path.display()
        );
        return;
    };
    let key = cinfer_sealed_model::ModelKey::generate().expect("key");
    let sealed =
        cinfer_sealed_model::seal_bytes(&key, "smollm2", "bench", 1 << 20, &plain).expect("seal");
    drop(plain);
    let sealed = SealedGguf::open(Box::new(sealed), &key).expect("open");
    let names: Vec<String> = sealed
        .tensor_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + i * 37 % 20000).collect();
    let decode = 128;
    println!("device: {}", cuda.device_name());
    println!("| backend | load (decrypt+upload) | prompt tok/s (128) | decode tok/s |");
    println!("|---|---|---|---|");
    let backends: [(&str, &dyn Backend); 2] = [("cuda", &cuda), ("cpu", &CpuBackend)];
    let mut splits = Vec::new();
    for (name, b) in backends {
        let t = Instant::now();
        for n in &names {
            std::hint::black_box(sealed.load_tensor(n, b).expect("load"));
        }
        if name == "cuda" {
            cuda.synchronize().expect("sync");
        }
        let load_time = t.elapsed();
        let model = load(b, &sealed);
        run(b, &model, &prompt[..8], 4); // warm-up (kernel loading, pools)
        let runs = if name == "cuda" { 5 } else { 2 };
        let mut best = (Duration::MAX, Duration::MAX);
        let mut split = [Duration::MAX; 2];
        for _ in 0..runs {
            let (p, d, s) = run(b, &model, &prompt, decode);
            if d < best.1 {
                split = s;
            }
            best = (best.0.min(p), best.1.min(d));
        }
        splits.push((name, split));
        println!(
            "| {name} | {:.0} ms | {:.0} | {:.1} |",
            load_time.as_secs_f64() * 1e3,
            prompt.len() as f64 / best.0.as_secs_f64(),
            decode as f64 / best.1.as_secs_f64()
        );
    }
    println!();
    for (name, [enqueue, wait]) in splits {
        println!(
            "{name} decode, per token: {:.2} ms enqueuing every op up to argmax, {:.2} ms in argmax \
             (on a GPU: waiting for the queued kernels, then the copy back)",
            enqueue.as_secs_f64() * 1e3 / decode as f64,
            wait.as_secs_f64() * 1e3 / decode as f64
        );
    }
}
