//! Token selection: greedy, or top-k → temperature → top-p → seeded draw.

use cinfer_guest::Error;
use cinfer_guest::accel::Tensor;

/// splitmix64: a small, seedable generator (programs get no randomness from
/// the host; the request's seed makes sampling reproducible).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sampler settings.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    temperature: f32,
    top_k: u32,
    top_p: f32,
}

impl Sampling {
    /// `temperature <= 0` is greedy; `top_k == 0` means the whole vocabulary.
    pub fn new(temperature: f32, top_k: u32, top_p: f32) -> Self {
        Sampling {
            temperature,
            top_k,
            top_p: if top_p > 0.0 && top_p <= 1.0 {
                top_p
            } else {
                1.0
            },
        }
    }

    /// Picks the next token from `logits` [1, vocab], never one `excluded`.
    pub fn pick(
        &self,
        logits: &Tensor,
        rng: &mut Rng,
        excluded: impl Fn(u32) -> bool,
    ) -> Result<u32, Error> {
        if self.temperature <= 0.0 {
            let best = logits.argmax()?[0];
            if !excluded(best) {
                return Ok(best);
            }
            // Rare (ignore-eos): take the best allowed among the top few.
            let top = logits.top_k(16)?;
            return Ok(top
                .iter()
                .find(|(id, _)| !excluded(*id))
                .map_or(best, |(id, _)| *id));
        }
        let vocab = logits.shape().last().copied().unwrap_or(1);
        let k = if self.top_k == 0 {
            vocab
        } else {
            self.top_k.min(vocab)
        };
        let cands: Vec<(u32, f32)> = logits
            .top_k(k)?
            .into_iter()
            .filter(|(id, _)| !excluded(*id))
            .collect();
        let Some(&(first, max)) = cands.first() else {
            return Ok(logits.argmax()?[0]);
        };
        let t = f64::from(self.temperature);
        let weights: Vec<f64> = cands
            .iter()
            .map(|(_, l)| (f64::from(l - max) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // Top-p: the smallest prefix whose probability reaches top_p.
        let mut keep = 0;
        let mut cum = 0.0;
        for w in &weights {
            keep += 1;
            cum += w / total;
            if cum >= f64::from(self.top_p) {
                break;
            }
        }
        let kept_total: f64 = weights[..keep].iter().sum();
        let mut u = rng.next_f64() * kept_total;
        for ((id, _), w) in cands.iter().zip(&weights[..keep]) {
            if u < *w {
                return Ok(*id);
            }
            u -= w;
        }
        Ok(cands.get(keep - 1).map_or(first, |(id, _)| *id))
    }
}
