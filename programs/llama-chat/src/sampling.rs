//! Token selection: penalties, then greedy, or top-k → temperature → top-p →
//! seeded draw.

use cinfer_guest::Error;
use cinfer_guest::accel::Tensor;
use std::collections::BTreeMap;

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

    fn k(&self, vocab: u32) -> u32 {
        if self.top_k == 0 {
            vocab
        } else {
            self.top_k.min(vocab)
        }
    }

    /// Picks the next token from `logits` [1, vocab], never one `excluded`,
    /// after `penalties`. Without penalties the accelerator ranks the
    /// vocabulary; with them the logits are downloaded and ranked here.
    pub fn pick(
        &self,
        logits: &Tensor,
        penalties: &Penalties,
        rng: &mut Rng,
        excluded: impl Fn(u32) -> bool,
    ) -> Result<u32, Error> {
        if penalties.active() {
            let mut all = logits.to_vec()?;
            penalties.apply(&mut all);
            if self.temperature <= 0.0 {
                return Ok(best_allowed(&all, &excluded)
                    .or_else(|| best_allowed(&all, |_| false))
                    .unwrap_or(0));
            }
            let cands = top_k(&all, self.k(all.len() as u32), &excluded);
            return Ok(self
                .draw(&cands, rng)
                .or_else(|| best_allowed(&all, |_| false))
                .unwrap_or(0));
        }
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
        let cands: Vec<(u32, f32)> = logits
            .top_k(self.k(vocab))?
            .into_iter()
            .filter(|(id, _)| !excluded(*id))
            .collect();
        match self.draw(&cands, rng) {
            Some(id) => Ok(id),
            None => Ok(logits.argmax()?[0]),
        }
    }

    /// Picks among the tokens `allowed` accepts (constrained decoding), after
    /// `penalties`; `None` when it accepts none. Top-k, temperature and top-p
    /// apply among the allowed tokens: the allowed ones among the `max(k,
    /// 64)` most likely first, and only if none of those is allowed (or with
    /// penalties) the whole vocabulary, ranked here.
    pub fn pick_allowed(
        &self,
        logits: &Tensor,
        penalties: &Penalties,
        rng: &mut Rng,
        allowed: impl Fn(u32) -> bool,
    ) -> Result<Option<u32>, Error> {
        let vocab = logits.shape().last().copied().unwrap_or(1);
        let k = self.k(vocab);
        let mut cands: Vec<(u32, f32)> = Vec::new();
        if !penalties.active() {
            cands = logits
                .top_k(k.max(64).min(vocab))?
                .into_iter()
                .filter(|(id, _)| allowed(*id))
                .take(k as usize)
                .collect();
        }
        if cands.is_empty() {
            let mut all = logits.to_vec()?;
            penalties.apply(&mut all);
            cands = top_k(&all, k, |id| !allowed(id));
        }
        if self.temperature <= 0.0 {
            return Ok(cands.first().map(|(id, _)| *id));
        }
        Ok(self.draw(&cands, rng))
    }

    /// Temperature, top-p and a seeded draw over `cands` (largest first);
    /// `None` when there are none.
    fn draw(&self, cands: &[(u32, f32)], rng: &mut Rng) -> Option<u32> {
        let &(first, max) = cands.first()?;
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
                return Some(*id);
            }
            u -= w;
        }
        Some(cands.get(keep - 1).map_or(first, |(id, _)| *id))
    }
}

/// OpenAI's repetition penalties over the tokens generated so far (not the
/// prompt): `logit[t] -= frequency_penalty * count(t) + presence_penalty *
/// (count(t) > 0)`. Negative values encourage repetition.
#[derive(Debug, Clone, Default)]
pub struct Penalties {
    presence: f32,
    frequency: f32,
    counts: BTreeMap<u32, u32>,
}

impl Penalties {
    /// Penalties of these strengths.
    pub fn new(presence: f32, frequency: f32) -> Self {
        Penalties {
            presence,
            frequency,
            counts: BTreeMap::new(),
        }
    }

    /// Counts a generated token.
    pub fn record(&mut self, id: u32) {
        if self.presence != 0.0 || self.frequency != 0.0 {
            *self.counts.entry(id).or_default() += 1;
        }
    }

    /// Whether any logit would change.
    pub fn active(&self) -> bool {
        (self.presence != 0.0 || self.frequency != 0.0) && !self.counts.is_empty()
    }

    /// Applies the penalties to a logit row.
    pub fn apply(&self, logits: &mut [f32]) {
        for (&id, &n) in &self.counts {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= self.frequency * n as f32 + self.presence;
            }
        }
    }
}

/// The largest logit not `excluded` (the lowest id among equals).
fn best_allowed(logits: &[f32], excluded: impl Fn(u32) -> bool) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (id, &l) in (0u32..).zip(logits) {
        if !excluded(id) && best.is_none_or(|(_, b)| l > b) {
            best = Some((id, l));
        }
    }
    best.map(|(id, _)| id)
}

/// The `k` largest logits not `excluded`, largest first (lower id first among equals).
fn top_k(logits: &[f32], k: u32, excluded: impl Fn(u32) -> bool) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = (0u32..)
        .zip(logits.iter().copied())
        .filter(|(id, _)| !excluded(*id))
        .collect();
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = (k as usize).min(all.len());
    if k < all.len() && k > 0 {
        all.select_nth_unstable_by(k - 1, by_logit);
        all.truncate(k);
    }
    all.sort_by(by_logit);
    all.truncate(k);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_follow_openais_formula_on_generated_tokens_only() {
        let mut p = Penalties::new(0.5, 1.0);
        assert!(!p.active(), "nothing generated yet");
        for id in [2, 2, 0] {
            p.record(id);
        }
        assert!(p.active());
        let mut logits = [1.0, 1.0, 3.0, 1.0];
        p.apply(&mut logits);
        assert_eq!(logits, [1.0 - 1.5, 1.0, 3.0 - 2.5, 1.0]);
        let mut off = Penalties::new(0.0, 0.0);
        off.record(1);
        assert!(
            !off.active(),
            "zero penalties change nothing and download nothing"
        );
    }

    #[test]
    fn host_ranking_matches_the_accelerators_contract() {
        let logits = [0.5, 2.0, 2.0, -1.0, 3.0];
        assert_eq!(top_k(&logits, 3, |_| false), [(4, 3.0), (1, 2.0), (2, 2.0)]);
        assert_eq!(top_k(&logits, 2, |id| id == 4), [(1, 2.0), (2, 2.0)]);
        assert_eq!(top_k(&logits, 9, |_| false).len(), 5);
        assert_eq!(best_allowed(&logits, |_| false), Some(4));
        assert_eq!(best_allowed(&logits, |id| id == 4), Some(1));
        assert_eq!(best_allowed(&logits, |_| true), None);
    }

    #[test]
    fn a_draw_is_seeded_and_top_p_one_token_is_greedy() {
        let s = Sampling::new(1.0, 0, 1.0);
        let cands = [(7, 1.0), (3, 0.9), (5, -2.0)];
        let draws = |seed| {
            let mut rng = Rng::new(seed);
            (0..16)
                .map(|_| s.draw(&cands, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(1), draws(1));
        assert!(draws(1).iter().all(|d| matches!(d, Some(7 | 3 | 5))));
        let narrow = Sampling::new(1.0, 0, 0.01);
        let mut rng = Rng::new(9);
        assert!((0..16).all(|_| narrow.draw(&cands, &mut rng) == Some(7)));
        assert_eq!(s.draw(&[], &mut rng), None);
    }
}
