//! The llama forward pass driven natively through the backend, in the same op
//! order as `programs/llama-chat` (prompt as one batch, then one token at a
//! time). Shared by the tests (a token-for-token reference for the program)
//! and the benchmark (the native baseline of the confidential path).

use cinfer_host::backend::{AttentionShape, Backend, CpuBackend, DeviceBuffer, ElemType};
use cinfer_host::caps::model::ModelSource;
use cinfer_host::models::SealedGguf;

const LAYER_TENSORS: [&str; 9] = [
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

/// A model's weights and hyperparameters, loaded for native use.
pub struct NativeLlama {
    layers: Vec<Vec<DeviceBuffer>>,
    embd: DeviceBuffer,
    out_norm: DeviceBuffer,
    output: DeviceBuffer,
    dim: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    theta: f32,
    eps: f32,
}

impl NativeLlama {
    /// Loads every tensor of `model` (reads hyperparameters from its metadata).
    pub fn new(model: &SealedGguf) -> Self {
        let meta = model.metadata().expect("metadata");
        let g = cinfer_gguf::parse_metadata(&meta).expect("gguf");
        let u = |k: &str| g.u64(&format!("llama.{k}")).expect("hparam") as usize;
        let t = |name: &str| model.load_tensor(name, &CpuBackend).expect(name);
        let embd = t("token_embd.weight");
        NativeLlama {
            layers: (0..u("block_count"))
                .map(|l| {
                    LAYER_TENSORS
                        .iter()
                        .map(|n| t(&format!("blk.{l}.{n}.weight")))
                        .collect()
                })
                .collect(),
            output: model
                .tensor_shape("output.weight")
                .map(|_| t("output.weight"))
                .unwrap_or_else(|_| embd.clone()),
            vocab: model.tensor_shape("token_embd.weight").expect("embd").0[0] as usize,
            embd,
            out_norm: t("output_norm.weight"),
            dim: u("embedding_length"),
            heads: u("attention.head_count"),
            kv_heads: u("attention.head_count_kv"),
            ffn: u("feed_forward_length"),
            theta: g.f32("llama.rope.freq_base").expect("theta"),
            eps: g
                .f32("llama.attention.layer_norm_rms_epsilon")
                .expect("eps"),
        }
    }

    /// Greedily generates `n` tokens after `prompt`, never choosing an
    /// `excluded` id (as llama-chat's `ignore_eos`).
    pub fn generate(&self, prompt: &[u32], n: usize, excluded: impl Fn(u32) -> bool) -> Vec<u32> {
        self.generate_timed(prompt, n, excluded, &mut OpTimes::default())
    }

    /// [`Self::generate`], adding the wall time of each kind of launch to `times`
    /// (for profiling; the timer costs ~20 ns a launch).
    pub fn generate_timed(
        &self,
        prompt: &[u32],
        n: usize,
        excluded: impl Fn(u32) -> bool,
        times: &mut OpTimes,
    ) -> Vec<u32> {
        let b = CpuBackend;
        let (dim, ffn, eps, theta) = (self.dim, self.ffn, self.eps, self.theta);
        let (heads, kvh, hd) = (self.heads, self.kv_heads, self.dim / self.heads);
        let ctx = prompt.len() + n;
        let mut caches: Vec<(DeviceBuffer, DeviceBuffer)> = (0..self.layers.len())
            .map(|_| {
                let zeros = || b.zeros(ElemType::F16, ctx * kvh * hd).expect("cache");
                (zeros(), zeros())
            })
            .collect();
        let mut ids: Vec<u32> = prompt.to_vec();
        let (mut pos, mut generated) = (0usize, Vec::with_capacity(n));
        while generated.len() < n {
            let seq = ids.len();
            macro_rules! timed {
                ($kind:expr, $e:expr) => {{
                    let start = std::time::Instant::now();
                    let out = $e;
                    times.add($kind, start.elapsed());
                    out
                }};
            }
            let mut x = timed!(
                "embedding",
                b.embedding(&self.embd, dim, &ids).expect("embedding")
            );
            for (l, (kc, vc)) in self.layers.iter().zip(caches.iter_mut()) {
                let h = timed!("rmsnorm", b.rmsnorm(&x, &l[0], dim, eps).expect("norm"));
                // Q, K and V in one launch, as llama-chat does.
                let [q, k, v] = <[DeviceBuffer; 3]>::try_from(timed!(
                    "matmul qkv",
                    b.matmul_many(
                        &h,
                        &[(&l[1], dim), (&l[2], kvh * hd), (&l[3], kvh * hd)],
                        seq,
                        dim,
                    )
                    .expect("qkv")
                ))
                .expect("three");
                let q = timed!(
                    "rope",
                    b.rope(&q, heads, hd, pos as u32, theta).expect("rope")
                );
                let k = timed!(
                    "rope",
                    b.rope(&k, kvh, hd, pos as u32, theta).expect("rope")
                );
                let shape = AttentionShape {
                    seq,
                    heads,
                    kv_heads: kvh,
                    head_dim: hd,
                    pos,
                };
                let a = timed!(
                    "attention",
                    b.attention(&q, &k, &v, kc, vc, shape).expect("attention")
                );
                // Projection and residual in one launch, as llama-chat's matmul-add.
                x = timed!(
                    "matmul o + add",
                    b.matmul_add(&a, &l[4], &x, seq, dim, dim).expect("o")
                );
                let h = timed!("rmsnorm", b.rmsnorm(&x, &l[5], dim, eps).expect("norm"));
                let [gate, up] = <[DeviceBuffer; 2]>::try_from(timed!(
                    "matmul gate/up",
                    b.matmul_many(&h, &[(&l[6], ffn), (&l[7], ffn)], seq, dim)
                        .expect("gate/up")
                ))
                .expect("two");
                let f = timed!("silu mul", b.silu_mul(&gate, &up).expect("silu mul"));
                x = timed!(
                    "matmul down + add",
                    b.matmul_add(&f, &l[8], &x, seq, ffn, dim).expect("down")
                );
            }
            // As llama-chat: the last row (x itself for one token), then the
            // head's rmsnorm and matmul.
            let last = if seq == 1 {
                x
            } else {
                b.copy_range(&x, (seq - 1) * dim..seq * dim)
                    .expect("last row")
            };
            let h = b.rmsnorm(&last, &self.out_norm, dim, eps).expect("norm");
            let logits = timed!(
                "matmul logits",
                b.matmul(&h, &self.output, 1, dim, self.vocab)
                    .expect("logits")
            );
            // As llama-chat's greedy pick: the argmax, or the best allowed among the top 16.
            let best = b.argmax(&logits, self.vocab).expect("argmax")[0];
            let next = if excluded(best) {
                let top = b.top_k(&logits, self.vocab, 16).expect("top-k");
                top.iter()
                    .map(|(id, _)| *id)
                    .find(|id| !excluded(*id))
                    .expect("an allowed token")
            } else {
                best
            };
            generated.push(next);
            pos += seq;
            ids = vec![next];
        }
        generated
    }
}

/// Wall time per kind of launch, in first-seen order.
#[derive(Debug, Default)]
pub struct OpTimes(pub Vec<(&'static str, std::time::Duration, usize)>);

impl OpTimes {
    fn add(&mut self, kind: &'static str, t: std::time::Duration) {
        match self.0.iter_mut().find(|(k, ..)| *k == kind) {
            Some((_, total, count)) => {
                *total += t;
                *count += 1;
            }
            None => self.0.push((kind, t, 1)),
        }
    }
}
