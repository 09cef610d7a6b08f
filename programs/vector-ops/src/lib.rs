//! `vector-ops`: a tiny MLP on the virtual accelerator.
//!
//! Request: whitespace-separated numbers (the input vector, 1 to 64 values).
//! Reply: one line per layer output, then the argmax, e.g. `argmax 3`.
//! The weights are derived deterministically, so a requester can recompute
//! the answer: layer 1 is `rmsnorm → matmul(W1) + b1 → silu`, layer 2 is
//! `matmul(W2) → softmax`.
use cinfer_guest::accel::Tensor;
use cinfer_guest::{Error, Program, output, request};

const HIDDEN: u32 = 16;
const CLASSES: u32 = 4;

/// Deterministic weights in [-0.5, 0.5): a small linear congruential sequence.
pub fn weights(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn parse(body: &[u8]) -> Option<Vec<f32>> {
    let text = core::str::from_utf8(body).ok()?;
    let v: Vec<f32> = text
        .split_whitespace()
        .map(str::parse::<f32>)
        .collect::<Result<_, _>>()
        .ok()?;
    (1..=64).contains(&v.len()).then_some(v)
}

fn format_row(label: &str, v: &[f32]) -> String {
    let mut line = String::from(label);
    for x in v {
        line.push_str(&format!(" {x:.6}"));
    }
    line.push('\n');
    line
}

struct VectorOps;

impl Program for VectorOps {
    fn run() -> Result<(), Error> {
        let body = request::open()?;
        let Some(input) = parse(&body) else {
            output::emit_str("error: expected 1 to 64 whitespace-separated numbers\n");
            return Err(Error::BadRequest);
        };
        let d = input.len() as u32;
        let x = Tensor::from_f32(&[1, d], &input)?;
        let norm_w = Tensor::from_f32(&[d], &vec![1.0; d as usize])?;
        let w1 = Tensor::from_f32(&[HIDDEN, d], &weights((HIDDEN * d) as usize, 1))?;
        let b1 = Tensor::from_f32(&[HIDDEN], &weights(HIDDEN as usize, 2))?;
        let w2 = Tensor::from_f32(&[CLASSES, HIDDEN], &weights((CLASSES * HIDDEN) as usize, 3))?;

        let h = x.rmsnorm(&norm_w, 1e-6)?.matmul(&w1)?.add(&b1)?.silu()?;
        output::emit_str(&format_row("hidden", &h.to_vec()?));
        let p = h.matmul(&w2)?.softmax()?;
        output::emit_str(&format_row("probs", &p.to_vec()?));
        let best = p.argmax()?;
        output::emit_str(&format!("argmax {}\n", best[0]));
        Ok(())
    }
}

cinfer_guest::program!(VectorOps);
