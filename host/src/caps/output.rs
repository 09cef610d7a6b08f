//! `cinfer:loader/output`: seals each reply chunk as soon as it is emitted
//! and charges it against the egress budget.

use super::PolicyViolation;
use crate::bindings::output::Host;
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
        }
    }

    /// Sealed bytes emitted so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Takes the sealer back to seal the final frame, and the sink to send it.
    pub fn finish(self) -> (Option<ReplySealer>, FrameSink) {
        (self.sealer, self.sink)
    }
}

impl Host for OutputCtx {
    fn emit(&mut self, chunk: Vec<u8>) -> wasmtime::Result<()> {
        let chunk = Zeroizing::new(chunk);
        let cost = chunk.len() as u64 + FRAME_OVERHEAD;
        if self.used.saturating_add(cost) > self.budget {
            return Err(wasmtime::Error::new(PolicyViolation::EgressBudget {
                budget: self.budget,
            }));
        }
        self.used += cost;
        let Some(sealer) = self.sealer.as_mut() else {
            // No requester to seal to (warm-up run): count, but send nothing.
            return Ok(());
        };
        let frame = sealer
            .seal_chunk(&chunk)
            .map_err(|e| wasmtime::Error::msg(format!("sealing reply chunk: {e}")))?;
        (self.sink)(frame);
        Ok(())
    }
}
