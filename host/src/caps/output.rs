//! `cinfer:loader/output`: seals each reply chunk as soon as it is emitted
//! and charges it against the egress budget, and, where the policy sets
//! egress rates, paces the frames ([`crate::egress`]).

use super::PolicyViolation;
use crate::bindings::output::Host;
use crate::egress::Pacing;
use cinfer_envelope::{ReplySealer, TAG_LEN};
use zeroize::Zeroizing;

/// Bytes each data frame adds to its chunk: frame type + AEAD tag.
pub const FRAME_OVERHEAD: u64 = 1 + TAG_LEN as u64;

/// Where sealed frames go (a buffer, or a stream to the untrusted server).
pub type FrameSink = Box<dyn FnMut(Vec<u8>) + Send>;

/// The reply of one run.
pub struct OutputCtx {
    sealer: Option<ReplySealer>,
    sink: FrameSink,
    budget: u64,
    used: u64,
    pacing: Option<Pacing>,
}

impl std::fmt::Debug for OutputCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputCtx")
            .field("budget", &self.budget)
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

impl OutputCtx {
    /// A context sealing with `sealer` into `sink`, allowing `budget` sealed bytes.
    pub fn new(sealer: Option<ReplySealer>, sink: FrameSink, budget: u64) -> Self {
        OutputCtx {
            sealer,
            sink,
            budget,
            used: 0,
            pacing: None,
        }
    }

    /// Paces the frames by `pacing`'s buckets.
    pub(crate) fn with_pacing(mut self, pacing: Pacing) -> Self {
        self.pacing = Some(pacing);
        self
    }

    /// Sealed bytes emitted so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Takes the sealer back to seal the final frame, and the sink to send
    /// it; the buckets it is charged to.
    pub(crate) fn finish(self) -> (Option<ReplySealer>, FrameSink, Option<Pacing>) {
        (self.sealer, self.sink, self.pacing)
    }
}

impl Host for OutputCtx {
    async fn emit(&mut self, chunk: Vec<u8>) -> wasmtime::Result<()> {
        let chunk = Zeroizing::new(chunk);
        // Paced, a chunk larger than a burst leaves as several frames.
        let piece = self.pacing.as_ref().map_or(usize::MAX, |p| {
            p.max_chunk(FRAME_OVERHEAD + cinfer_envelope::REPLY_SALT_LEN as u64)
        });
        let frames = chunk.len().div_ceil(piece).max(1);
        let cost = chunk.len() as u64 + FRAME_OVERHEAD * frames as u64;
        if self.used.saturating_add(cost) > self.budget {
            return Err(wasmtime::Error::new(PolicyViolation::EgressBudget {
                budget: self.budget,
            }));
        }
        let parts: Vec<&[u8]> = if chunk.is_empty() {
            vec![&[]]
        } else {
            chunk.chunks(piece).collect()
        };
        for part in parts {
            let cost = part.len() as u64 + FRAME_OVERHEAD;
            let Some(sealer) = self.sealer.as_mut() else {
                // No requester to seal to (warm-up run): count, but send nothing.
                self.used += cost;
                continue;
            };
            // Paced before it is sealed: a frame sealed is a frame sent (the
            // final frame's sequence must follow the last one sent).
            if let Some(p) = &self.pacing {
                p.wait(sealer.frame_len(part.len()) as u64).await?;
            }
            let frame = sealer
                .seal_chunk(part)
                .map_err(|e| wasmtime::Error::msg(format!("sealing reply chunk: {e}")))?;
            self.used += cost;
            (self.sink)(frame);
        }
        Ok(())
    }
}
