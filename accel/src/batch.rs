//! Cross-request batching: concurrent runs that multiply by the same
//! resident weight matrix share one launch.
//!
//! Decode multiplies one activation row by every weight matrix in turn, so
//! its speed is the speed at which weights stream through the cores. When
//! several runs decode at once, [`Batching`] lets the first `matmul` on a
//! weight buffer (the leader) wait a short *window* for the others: every
//! launch on the same buffer, with the same `k` and `n`, that arrives in the
//! window adds its rows; the leader then runs one matmul over all rows
//! (weights streamed once) and hands each run its own rows back.
//!
//! - **Same numbers.** Every output row of the CPU kernels depends only on
//!   its own activation row and the weights: batched and unbatched results
//!   are bit for bit equal (tested).
//! - **Isolation.** Rows are copied in and copied out; no run holds another
//!   run's tensor, and the fused launch is only a computation.
//! - **Timing.** A launch may wait up to the window (default 300 µs) for
//!   company, and only while another run is active on this backend
//!   ([`Backend::run_started`]); it stops waiting as soon as every active run
//!   has joined. A run alone never waits. What a run can learn from the
//!   timing is that other runs exist, which the loader's throughput shows
//!   anyway; it learns nothing of their content.
//!
//! Launches whose operands are not host f32 activations (a CUDA backend's
//! tensors) go straight to the inner backend.

use super::{AttentionShape, Backend, BackendError, BinaryOp, DeviceBuffer, ElemType};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Rows one fused launch takes at most (bounds the copy and the wait).
pub const MAX_BATCH_ROWS: usize = 64;

/// A joined launch: its rows and where its result goes.
struct Member {
    x: Vec<f32>,
    m: usize,
    reply: mpsc::Sender<Result<Vec<f32>, BackendError>>,
}

/// A batch being gathered by its leader.
struct Open {
    id: u64,
    /// Address of the weight buffer: equal addresses while both launches
    /// hold a reference are the same buffer.
    weights: usize,
    k: usize,
    n: usize,
    rows: usize,
    members: Vec<Member>,
}

/// Counts of what the batcher did (for benchmarks and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// Fused launches that carried rows of more than one run.
    pub fused: u64,
    /// Launches that joined another run's batch.
    pub joined: u64,
}

/// A [`Backend`] that coalesces concurrent matmuls on shared weights.
pub struct Batching {
    inner: Arc<dyn Backend>,
    window: Duration,
    runs: AtomicUsize,
    next_id: AtomicU64,
    open: Mutex<Vec<Open>>,
    joined_cv: Condvar,
    fused: AtomicU64,
    joined: AtomicU64,
}

impl std::fmt::Debug for Batching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batching")
            .field("inner", &self.inner)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Batching {
    /// Batches launches on `inner`, a leader waiting at most `window`.
    pub fn new(inner: Arc<dyn Backend>, window: Duration) -> Self {
        Batching {
            inner,
            window,
            runs: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
            joined_cv: Condvar::new(),
            fused: AtomicU64::new(0),
            joined: AtomicU64::new(0),
        }
    }

    /// What the batcher has done so far.
    pub fn stats(&self) -> BatchStats {
        BatchStats {
            fused: self.fused.load(Ordering::Relaxed),
            joined: self.joined.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Open>> {
        // A panic while holding the lock leaves only plain data behind.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn batched_matmul(
        &self,
        x: &[f32],
        w: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let key = std::ptr::from_ref(w) as usize;
        let mut open = self.lock();
        // Join a batch another run is gathering on these weights.
        if let Some(b) = open
            .iter_mut()
            .find(|b| b.weights == key && b.k == k && b.n == n && b.rows + m <= MAX_BATCH_ROWS)
        {
            let (reply, result) = mpsc::channel();
            b.rows += m;
            b.members.push(Member {
                x: x.to_vec(),
                m,
                reply,
            });
            drop(open);
            self.joined_cv.notify_all();
            self.joined.fetch_add(1, Ordering::Relaxed);
            return match result.recv() {
                Ok(r) => r.map(DeviceBuffer::F32),
                Err(_) => Err(BackendError::Device(
                    "the batched launch this run joined failed".into(),
                )),
            };
        }
        // Lead a new batch: wait for company while other runs are active.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        open.push(Open {
            id,
            weights: key,
            k,
            n,
            rows: m,
            members: Vec::new(),
        });
        let deadline = Instant::now() + self.window;
        loop {
            let others = self.runs.load(Ordering::Relaxed).saturating_sub(1);
            let b = open.iter().find(|b| b.id == id);
            let (joined, rows) = b.map_or((0, 0), |b| (b.members.len(), b.rows));
            let now = Instant::now();
            if joined >= others || rows >= MAX_BATCH_ROWS || now >= deadline {
                break;
            }
            open = self
                .joined_cv
                .wait_timeout(open, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let pos = open.iter().position(|b| b.id == id);
        let batch = pos.map(|p| open.swap_remove(p));
        drop(open);
        let members = batch.map(|b| b.members).unwrap_or_default();
        if members.is_empty() {
            return self
                .inner
                .matmul(&DeviceBuffer::F32(x.to_vec()), w, m, k, n);
        }
        let total: usize = m + members.iter().map(|mb| mb.m).sum::<usize>();
        let mut stacked = Vec::with_capacity(total * k);
        stacked.extend_from_slice(x);
        for mb in &members {
            stacked.extend_from_slice(&mb.x);
        }
        self.fused.fetch_add(1, Ordering::Relaxed);
        match self
            .inner
            .matmul(&DeviceBuffer::F32(stacked), w, total, k, n)
        {
            Ok(DeviceBuffer::F32(out)) => {
                let mut rest = &out[m * n..];
                for mb in members {
                    let (mine, tail) = rest.split_at(mb.m * n);
                    rest = tail;
                    // A member that went away (its run ended) drops its receiver.
                    let _ = mb.reply.send(Ok(mine.to_vec()));
                }
                Ok(DeviceBuffer::F32(out[..m * n].to_vec()))
            }
            Ok(other) => Ok(other), // not reached: x was host f32
            Err(e) => {
                for mb in members {
                    let _ = mb.reply.send(Err(BackendError::Device(format!(
                        "batched launch failed: {e}"
                    ))));
                }
                Err(e)
            }
        }
    }
}

impl Backend for Batching {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn run_started(&self) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.inner.run_started();
    }
    fn run_ended(&self) {
        let _ = self
            .runs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1));
        self.inner.run_ended();
        // A leader waiting for this run stops waiting.
        self.joined_cv.notify_all();
    }
    fn zeros(&self, ty: ElemType, len: usize) -> Result<DeviceBuffer, BackendError> {
        self.inner.zeros(ty, len)
    }
    fn upload(&self, data: &[f32]) -> Result<DeviceBuffer, BackendError> {
        self.inner.upload(data)
    }
    fn upload_buffer(&self, buf: DeviceBuffer) -> Result<DeviceBuffer, BackendError> {
        self.inner.upload_buffer(buf)
    }
    fn upload_weights(
        &self,
        buf: DeviceBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        self.inner.upload_weights(buf, rows, cols)
    }
    fn download(&self, buf: &DeviceBuffer) -> Result<Vec<f32>, BackendError> {
        self.inner.download(buf)
    }
    fn copy_range(
        &self,
        buf: &DeviceBuffer,
        range: std::ops::Range<usize>,
    ) -> Result<DeviceBuffer, BackendError> {
        self.inner.copy_range(buf, range)
    }
    fn matmul(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        match x {
            DeviceBuffer::F32(xs)
                if !self.window.is_zero()
                    && m <= MAX_BATCH_ROWS / 2
                    && self.runs.load(Ordering::Relaxed) > 1 =>
            {
                self.batched_matmul(xs, w, m, k, n)
            }
            _ => self.inner.matmul(x, w, m, k, n),
        }
    }
    fn embedding(
        &self,
        table: &DeviceBuffer,
        d: usize,
        ids: &[u32],
    ) -> Result<DeviceBuffer, BackendError> {
        self.inner.embedding(table, d, ids)
    }
    fn binary(
        &self,
        op: BinaryOp,
        a: &DeviceBuffer,
        b: &DeviceBuffer,
        cols: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        self.inner.binary(op, a, b, cols)
    }
    fn rmsnorm(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        cols: usize,
        eps: f32,
    ) -> Result<DeviceBuffer, BackendError> {
        self.inner.rmsnorm(x, w, cols, eps)
    }
    fn softmax(&self, x: &DeviceBuffer, cols: usize) -> Result<DeviceBuffer, BackendError> {
        self.inner.softmax(x, cols)
    }
    fn silu(&self, x: &DeviceBuffer) -> Result<DeviceBuffer, BackendError> {
        self.inner.silu(x)
    }
    fn rope(
        &self,
        x: &DeviceBuffer,
        heads: usize,
        head_dim: usize,
        pos: u32,
        theta: f32,
    ) -> Result<DeviceBuffer, BackendError> {
        self.inner.rope(x, heads, head_dim, pos, theta)
    }
    fn attention(
        &self,
        q: &DeviceBuffer,
        k: &DeviceBuffer,
        v: &DeviceBuffer,
        k_cache: &mut DeviceBuffer,
        v_cache: &mut DeviceBuffer,
        shape: AttentionShape,
    ) -> Result<DeviceBuffer, BackendError> {
        self.inner.attention(q, k, v, k_cache, v_cache, shape)
    }
    fn argmax(&self, x: &DeviceBuffer, cols: usize) -> Result<Vec<u32>, BackendError> {
        self.inner.argmax(x, cols)
    }
    fn top_k(
        &self,
        x: &DeviceBuffer,
        cols: usize,
        k: usize,
    ) -> Result<Vec<(u32, f32)>, BackendError> {
        self.inner.top_k(x, cols, k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use crate::quant::BlockQ4_1;

    fn weights(n: usize, k: usize) -> DeviceBuffer {
        let blocks: Vec<BlockQ4_1> = (0..n * k / 32)
            .map(|b| BlockQ4_1 {
                d: half::f16::from_f32(0.01 * (1 + b % 7) as f32).to_bits(),
                m: half::f16::from_f32(-0.03 * (b % 5) as f32).to_bits(),
                qs: core::array::from_fn(|j| ((j * 37 + b * 11) % 256) as u8),
            })
            .collect();
        CpuBackend
            .upload_weights(DeviceBuffer::Q4_1(blocks), n, k)
            .expect("pack")
    }

    fn row(k: usize, seed: usize) -> Vec<f32> {
        (0..k)
            .map(|i| (((i * 31 + seed * 17) % 61) as f32 - 30.0) / 13.0)
            .collect()
    }

    #[test]
    fn concurrent_runs_share_launches_and_get_their_own_rows_bit_for_bit() {
        let (n, k, runs) = (80, 96, 6);
        let w = weights(n, k);
        let batching = Arc::new(Batching::new(
            Arc::new(CpuBackend),
            Duration::from_millis(50),
        ));
        let want: Vec<Vec<f32>> = (0..runs)
            .map(|r| {
                match CpuBackend
                    .matmul(&DeviceBuffer::F32(row(k, r)), &w, 1, k, n)
                    .expect("matmul")
                {
                    DeviceBuffer::F32(v) => v,
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        for _ in 0..runs {
            batching.run_started();
        }
        let got: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..runs)
                .map(|r| {
                    let (b, w) = (&batching, &w);
                    s.spawn(move || {
                        let mut last = Vec::new();
                        for _ in 0..20 {
                            match b.matmul(&DeviceBuffer::F32(row(k, r)), w, 1, k, n) {
                                Ok(DeviceBuffer::F32(v)) => last = v,
                                other => panic!("{other:?}"),
                            }
                        }
                        b.run_ended();
                        last
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("run"))
                .collect()
        });
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
                "run {r} got another result batched"
            );
        }
        let stats = batching.stats();
        assert!(stats.fused > 0 && stats.joined > 0, "{stats:?}");
    }

    #[test]
    fn a_run_alone_never_waits() {
        let (n, k) = (32, 64);
        let w = weights(n, k);
        let batching = Batching::new(Arc::new(CpuBackend), Duration::from_secs(5));
        batching.run_started();
        let start = Instant::now();
        for _ in 0..10 {
            batching
                .matmul(&DeviceBuffer::F32(row(k, 0)), &w, 1, k, n)
                .expect("matmul");
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "a lone run waited"
        );
        assert_eq!(batching.stats(), BatchStats::default());
    }
}
