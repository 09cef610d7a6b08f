//! SmolLM2 benchmarks through the confidential path (sealed weights, Wasm
//! program, sealed request and reply); prints a table. Needs the model
//! (`scripts/fetch-model`) and the programs (`cargo run --release -p build-programs`):
//!
//! ```sh
//! cargo bench -p cinfer-host --bench llama
//! ```
#![allow(clippy::expect_used, clippy::unwrap_used)]

use cinfer_envelope::{RequestPrivateKey, seal_request};
use cinfer_host::backend::{AttentionShape, Backend, BinaryOp, CpuBackend, DeviceBuffer, ElemType};
use cinfer_host::caps::model::{ModelSource, ModelStore};
use cinfer_host::models::SealedGguf;
use cinfer_host::{Loader, LoaderConfig, Policy, RunOutcome};
use cinfer_sealed_model::{ModelKey, seal_bytes};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model_path = std::env::var_os("CINFER_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/cinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let Ok(plain) = std::fs::read(&model_path) else {
        println!(
            "skipped: {} not found; run scripts/fetch-model",
            model_path.display()
        );
        return;
    };
    let program = std::fs::read(root.join("target/programs/llama-chat.wasm"))
        .expect("build the programs first");
    let key = ModelKey::generate().expect("key");
    let sealed = seal_bytes(&key, "smollm2-135m-instruct", "bench", 1 << 20, &plain).expect("seal");
    let size = plain.len() as f64;
    drop(plain);

    // Sealed model load: open (decrypt the GGUF header) + decrypt and parse every tensor.
    let mut load_times = Vec::new();
    for _ in 0..5 {
        let copy = Box::new(sealed.clone());
        let start = Instant::now();
        let m = SealedGguf::open(copy, &key).expect("open");
        let names: Vec<String> = m.tensor_names().into_iter().map(str::to_owned).collect();
        for n in &names {
            std::hint::black_box(m.load_tensor(n, &CpuBackend).expect("load"));
        }
        load_times.push(start.elapsed());
    }
    load_times.sort();
    let load = load_times[2];

    let sealed_model = Arc::new(SealedGguf::open(Box::new(sealed), &key).expect("open"));
    let native = Native::new(&sealed_model);
    let mut models = ModelStore::default();
    models.insert("smollm2-135m-instruct", sealed_model);
    let worlds = std::fs::read_to_string(root.join("policies/worlds.wit")).expect("worlds");
    let toml_text = format!(
        "worlds = \"worlds.wit\"\n[[program]]\nname = \"llama-chat\"\nsha256 = \"{}\"\nworld = \"inference\"\nmodels = [\"smollm2-135m-instruct\"]\nlimits = {{ memory-bytes = 268435456, deadline-ms = 600000, accelerator-bytes = 1073741824, egress-bytes = 16777216 }}\n",
        hex::encode(cinfer_host::admission::digest(&program))
    );
    let policy = Policy::parse(&toml_text, |_| Ok(worlds.clone())).expect("policy");
    let loader = Loader::new(
        policy,
        LoaderConfig {
            models,
            ..LoaderConfig::default()
        },
    )
    .expect("loader");
    let admitted = loader.admit(&program).expect("admit");
    let rk = RequestPrivateKey::generate();
    let run = |req: String| -> Duration {
        let (s, _) = seal_request(rk.public_key(), req.as_bytes()).expect("seal");
        let r = loader.run(&admitted, &s, &rk).expect("run");
        assert_eq!(r.outcome, RunOutcome::Completed);
        r.elapsed
    };
    let median = |f: &dyn Fn() -> Duration, n: usize| {
        let mut t: Vec<Duration> = (0..n).map(|_| f()).collect();
        t.sort();
        t[n / 2]
    };
    // 128 prompt tokens: "a" repeated with spaces tokenizes to one token per " a".
    let long_prompt = format!("a{}", " a".repeat(127));
    let req = |prompt: &str, n: u32| {
        format!(
            "{{\"prompt\": {}, \"max_tokens\": {n}, \"ignore_eos\": true, \"format\": \"ids\"}}",
            serde_json_string(prompt)
        )
    };
    let t_short_1 = median(&|| run(req("Once", 1)), 5);
    let t_short_65 = median(&|| run(req("Once", 65)), 3);
    let t_long_1 = median(&|| run(req(&long_prompt, 1)), 3);
    let decode = 64.0 / (t_short_65 - t_short_1).as_secs_f64();
    let native_1 = median(&|| native.decode(0), 5);
    let native_65 = median(&|| native.decode(64), 3);
    let native_decode = 64.0 / (native_65 - native_1).as_secs_f64();
    let prefill = 127.0 / (t_long_1 - t_short_1).as_secs_f64();

    println!("| benchmark (SmolLM2-135M Q4_1, CPU backend) | value | note");
    println!("|---|---:|---");
    println!(
        "| sealed model load (decrypt + parse all 272 tensors) | {:.2} GB/s | {:.0} ms for {:.1} MB, median of 5",
        size / load.as_secs_f64() / 1e9,
        load.as_secs_f64() * 1e3,
        size / 1e6
    );
    println!(
        "| request with a 1-token prompt and 1 new token | {:.0} ms | metadata + tokenizer setup in the program, resident weights, 1 step |",
        t_short_1.as_secs_f64() * 1e3
    );
    println!(
        "| decode (tg64), confidential path | {decode:.1} tok/s | (t(65 new) - t(1 new)) / 64 |"
    );
    println!(
        "| decode (tg64), same ops driven natively | {native_decode:.1} tok/s | confidential path at {:.1}% of native |",
        100.0 * decode / native_decode
    );
    println!(
        "| prompt processing (pp128) | {prefill:.1} tok/s | (t(128-token prompt) - t(1-token prompt)) / 127 |"
    );
}

/// The same forward pass as `programs/llama-chat`, driven natively from Rust
/// on the same backend: the baseline for the cost of the confidential path
/// (Wasm program + host calls + per-launch validation).
struct Native {
    layers: Vec<[DeviceBuffer; 9]>,
    embd: DeviceBuffer,
    out_norm: DeviceBuffer,
    n_layers: usize,
    dim: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    theta: f32,
    eps: f32,
}

impl Native {
    fn new(m: &SealedGguf) -> Self {
        let meta = m.metadata().expect("metadata");
        let g = cinfer_gguf::parse_metadata(&meta).expect("gguf");
        let u = |k: &str| g.u64(&format!("llama.{k}")).expect("hparam") as usize;
        let t = |n: &str| m.load_tensor(n, &CpuBackend).expect("tensor");
        let names = [
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
        let n_layers = u("block_count");
        Native {
            layers: (0..n_layers)
                .map(|i| names.map(|n| t(&format!("blk.{i}.{n}.weight"))))
                .collect(),
            embd: t("token_embd.weight"),
            out_norm: t("output_norm.weight"),
            n_layers,
            dim: u("embedding_length"),
            heads: u("attention.head_count"),
            kv_heads: u("attention.head_count_kv"),
            ffn: u("feed_forward_length"),
            vocab: g.array("tokenizer.ggml.tokens").expect("tokens").len(),
            theta: g.f32("llama.rope.freq_base").expect("theta"),
            eps: g
                .f32("llama.attention.layer_norm_rms_epsilon")
                .expect("eps"),
        }
    }

    /// Greedy-decodes `n` tokens after the one-token prompt; returns the time.
    fn decode(&self, n: usize) -> Duration {
        let b = CpuBackend;
        let (d, hd) = (self.dim, self.dim / self.heads);
        let kvd = self.kv_heads * hd;
        let ctx = n + 2;
        let mut caches: Vec<(DeviceBuffer, DeviceBuffer)> = (0..self.n_layers)
            .map(|_| {
                (
                    b.zeros(ElemType::F16, ctx * kvd).unwrap(),
                    b.zeros(ElemType::F16, ctx * kvd).unwrap(),
                )
            })
            .collect();
        let start = Instant::now();
        let mut token = 6403u32; // "Once"
        for pos in 0..=n {
            let mut x = b.embedding(&self.embd, d, &[token]).unwrap();
            for (l, (kc, vc)) in self.layers.iter().zip(caches.iter_mut()) {
                let h = b.rmsnorm(&x, &l[0], d, self.eps).unwrap();
                let q = b
                    .rope(
                        &b.matmul(&h, &l[1], 1, d, d).unwrap(),
                        self.heads,
                        hd,
                        pos as u32,
                        self.theta,
                    )
                    .unwrap();
                let k = b
                    .rope(
                        &b.matmul(&h, &l[2], 1, d, kvd).unwrap(),
                        self.kv_heads,
                        hd,
                        pos as u32,
                        self.theta,
                    )
                    .unwrap();
                let v = b.matmul(&h, &l[3], 1, d, kvd).unwrap();
                let shape = AttentionShape {
                    seq: 1,
                    heads: self.heads,
                    kv_heads: self.kv_heads,
                    head_dim: hd,
                    pos,
                };
                let a = b.attention(&q, &k, &v, kc, vc, shape).unwrap();
                x = b
                    .binary(BinaryOp::Add, &x, &b.matmul(&a, &l[4], 1, d, d).unwrap(), d)
                    .unwrap();
                let h = b.rmsnorm(&x, &l[5], d, self.eps).unwrap();
                let gate = b
                    .silu(&b.matmul(&h, &l[6], 1, d, self.ffn).unwrap())
                    .unwrap();
                let f = b
                    .binary(
                        BinaryOp::Mul,
                        &gate,
                        &b.matmul(&h, &l[7], 1, d, self.ffn).unwrap(),
                        self.ffn,
                    )
                    .unwrap();
                x = b
                    .binary(
                        BinaryOp::Add,
                        &x,
                        &b.matmul(&f, &l[8], 1, self.ffn, d).unwrap(),
                        d,
                    )
                    .unwrap();
            }
            let h = b.rmsnorm(&x, &self.out_norm, d, self.eps).unwrap();
            token = b
                .argmax(
                    &b.matmul(&h, &self.embd, 1, d, self.vocab).unwrap(),
                    self.vocab,
                )
                .unwrap()[0];
        }
        start.elapsed()
    }
}

fn serde_json_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
