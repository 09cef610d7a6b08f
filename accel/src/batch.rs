//! Cross-request batching: concurrent runs that multiply by the same
//! resident weight matrix share one launch.
//!
//! Decode multiplies one activation row by every weight matrix in turn, so
//! its speed is the speed at which weights stream through the cores. When
//! several runs decode at once, [`Batching`] queues each `matmul` (and each
//! `matmul_many`, by its list of matrices) by weight buffer, and one of the
//! runs waiting on that buffer executes every queued launch as one matmul
//! over all their rows (weights streamed once); each run gets its own rows
//! back.
//!
//! **When a round starts.** The runs that have made a batched launch form the
//! cohort (a run leaves it when it launches an unbatched matmul, e.g. a long
//! prompt, or ends). A round starts once every cohort run is waiting in some
//! queue — nobody else can join it — and then only on the queue of the least
//! advanced launch (each run counts its matmul launches): runs ahead wait for
//! the runs behind, which therefore catch up and fall in step with them,
//! after which every round carries all of them (on 8 identical streams, 7.9
//! launches a round). A launch never waits longer than the window
//! ([`DEFAULT_WINDOW`], [`Batching::with_window`]) for that moment: after it,
//! its queue executes whatever is pending.
//!
//! - **Same numbers.** Every output row of the CPU kernels depends only on
//!   its own activation row and the weights: batched and unbatched results
//!   are bit for bit equal (tested).
//! - **Isolation.** Rows are copied in and copied out; no run holds another
//!   run's tensor, and the fused launch is only a computation. The run that
//!   executes a batch reads the weights through its own reference (a batch
//!   only ever holds launches on the one buffer it holds).
//! - **Timing.** A launch waits at most the window, then for the round in
//!   progress on the same weights (one matmul) plus its own round; a run alone
//!   never waits. What a run can learn from the timing is that other runs
//!   exist and roughly how far along they are, which the loader's throughput
//!   shows anyway; it learns nothing of their content.
//!
//! Launches whose operands are not host f32 activations (a CUDA backend's
//! tensors) go straight to the inner backend.

use super::{AttentionShape, Backend, BackendError, BinaryOp, DeviceBuffer, ElemType};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Rows one fused launch takes at most (bounds the copy).
pub const MAX_BATCH_ROWS: usize = 64;

/// Each matrix's rows of a launch's result.
type Reply = Arc<OnceLock<Result<Vec<Vec<f32>>, BackendError>>>;

/// A queued launch: its rows and where its result goes.
struct Launch {
    x: Vec<f32>,
    m: usize,
    k: usize,
    /// Matmul launches its run had made before this one (its progress).
    step: u64,
    reply: Reply,
}

/// The weight buffers of a launch, by address (equal while both launches
/// hold a reference means the same buffers, in the same order).
type Key = Vec<usize>;

/// The launches queued on one weight buffer.
#[derive(Default)]
struct Queue {
    pending: Vec<Launch>,
    /// A run is executing a round on this buffer.
    executing: bool,
}

/// The batcher's shared state.
#[derive(Default)]
struct State {
    /// Per list of weight buffers.
    queues: HashMap<Key, Queue>,
    /// Runs that are decoding through the queues (their thread made a batched
    /// launch and has not left since): the runs a launch waits for.
    cohort: usize,
    /// Cohort runs waiting in a queue right now.
    waiting: usize,
}

impl State {
    /// The least progress among the pending launches.
    fn least_step(&self) -> u64 {
        self.queues
            .values()
            .flat_map(|q| q.pending.iter().map(|l| l.step))
            .min()
            .unwrap_or(0)
    }
}

thread_local! {
    /// The batcher (by address) whose cohort this thread's run is in; 0 for none.
    static COHORT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// (batcher address, matmul launches of this thread's run on it so far).
    static STEPS: std::cell::Cell<(usize, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Default bound on how long a launch waits for the other decoding runs to
/// queue theirs (a few of their inter-launch gaps at 8 runs on 2 cores).
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(500);

/// Counts of what the batcher did (for benchmarks and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// Fused launches that carried rows of more than one run.
    pub fused: u64,
    /// Launches executed by another run than their own.
    pub joined: u64,
}

/// A [`Backend`] that coalesces concurrent matmuls on shared weights.
pub struct Batching {
    inner: Arc<dyn Backend>,
    runs: AtomicUsize,
    state: Mutex<State>,
    window: Duration,
    fused: AtomicU64,
    joined: AtomicU64,
}

impl std::fmt::Debug for Batching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batching")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Batching {
    /// Batches launches on `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Batching {
            inner,
            runs: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            window: DEFAULT_WINDOW,
            fused: AtomicU64::new(0),
            joined: AtomicU64::new(0),
        }
    }

    /// Whether a launch of `m` rows goes through the queues: small launches
    /// while several runs are on the backend.
    fn batches(&self, m: usize) -> bool {
        m <= MAX_BATCH_ROWS / 2 && self.runs.load(Ordering::Relaxed) > 1
    }

    /// What the batcher has done so far.
    pub fn stats(&self) -> BatchStats {
        BatchStats {
            fused: self.fused.load(Ordering::Relaxed),
            joined: self.joined.load(Ordering::Relaxed),
        }
    }

    /// Sets how long a launch waits at most for the other decoding runs to
    /// queue theirs (default [`DEFAULT_WINDOW`]); zero never waits.
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves only plain data behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// Counts a matmul launch of this thread's run; returns how many it made before.
    fn next_step(&self) -> u64 {
        let (owner, n) = STEPS.get();
        let n = if owner == self.id() { n } else { 0 };
        STEPS.set((self.id(), n + 1));
        n
    }

    /// This thread's run stops being waited for (it launches unbatched work,
    /// or it ended).
    fn leave_cohort(&self) {
        if COHORT.get() == self.id() {
            COHORT.set(0);
            let mut st = self.lock();
            st.cohort = st.cohort.saturating_sub(1);
        }
    }

    /// `matmul_many(x, ws)` through the queue of `ws`: executed alone or
    /// with the queued launches of other runs on the same weights.
    fn batched(
        &self,
        x: &[f32],
        ws: &[(&DeviceBuffer, usize)],
        m: usize,
        k: usize,
    ) -> Result<Vec<DeviceBuffer>, BackendError> {
        let key: Key = ws
            .iter()
            .map(|(w, _)| std::ptr::from_ref(*w) as usize)
            .collect();
        let reply: Reply = Arc::new(OnceLock::new());
        let step = self.next_step();
        let mut st = self.lock();
        if COHORT.get() != self.id() {
            COHORT.set(self.id());
            st.cohort += 1;
        }
        st.queues
            .entry(key.clone())
            .or_default()
            .pending
            .push(Launch {
                x: x.to_vec(),
                m,
                k,
                step,
                reply: reply.clone(),
            });
        st.waiting += 1;
        let deadline = Instant::now() + self.window;
        loop {
            // Whoever executed the round took this launch off `waiting`.
            if let Some(r) = reply.get() {
                return r
                    .clone()
                    .map(|outs| outs.into_iter().map(DeviceBuffer::F32).collect());
            }
            // A round can start on these weights when nobody executes one and
            // launches are pending (the queue holds only launches on `ws`,
            // which this call holds). It starts once every decoding run is
            // waiting somewhere (no one else can join) if this launch is among
            // the least advanced ones, so that runs further ahead wait for the
            // ones behind and fall in step with them; or when the window is over.
            let ready = st
                .queues
                .get(&key)
                .is_some_and(|q| !q.executing && !q.pending.is_empty());
            let now = Instant::now();
            // (The cohort never counts more runs than are on the backend, in
            // case a run ended on another thread than the one it decoded on.)
            let all_waiting = st.waiting >= st.cohort.min(self.runs.load(Ordering::Relaxed));
            let go = now >= deadline || (all_waiting && step <= st.least_step());
            if ready && go {
                let q = st.queues.entry(key.clone()).or_default();
                q.executing = true;
                let round = take_round(&mut q.pending, k);
                // The round's runs are no longer waiting (they will be back
                // with their next launch; until then the others wait for them).
                st.waiting -= round.len();
                drop(st);
                self.execute(round, ws, &reply);
                st = self.lock();
                if let Some(q) = st.queues.get_mut(&key) {
                    q.executing = false;
                    if q.pending.is_empty() {
                        st.queues.remove(&key);
                    }
                }
                continue;
            }
            // Let the other runs (and a round in progress) have the core. A
            // condition variable would cost a wake-up per run and round, an
            // interrupt each on a VM: measured far slower (BENCHMARKS.md).
            drop(st);
            std::thread::yield_now();
            st = self.lock();
        }
    }

    /// Runs one round: all its rows in one launch, each launch's rows back.
    fn execute(&self, round: Vec<Launch>, ws: &[(&DeviceBuffer, usize)], mine: &Reply) {
        let k = round[0].k;
        let total: usize = round.iter().map(|l| l.m).sum();
        let stacked = if round.len() == 1 {
            round[0].x.clone()
        } else {
            self.fused.fetch_add(1, Ordering::Relaxed);
            let mut stacked = Vec::with_capacity(total * k);
            for l in &round {
                stacked.extend_from_slice(&l.x);
            }
            stacked
        };
        let x = DeviceBuffer::F32(stacked);
        let result = match ws {
            [(w, n)] => self.inner.matmul(&x, w, total, k, *n).map(|o| vec![o]),
            _ => self.inner.matmul_many(&x, ws, total, k),
        };
        let others = round
            .iter()
            .filter(|l| !Arc::ptr_eq(&l.reply, mine))
            .count();
        self.joined.fetch_add(others as u64, Ordering::Relaxed);
        let outs: Result<Vec<Vec<f32>>, BackendError> = result.and_then(|outs| {
            outs.into_iter()
                .map(|o| match o {
                    DeviceBuffer::F32(v) => Ok(v),
                    other => Err(BackendError::Unsupported(other.elem_type())),
                })
                .collect()
        });
        match outs {
            Ok(outs) => {
                // Launch i's rows of matrix j start at (rows before i) × n_j.
                let mut row = 0;
                for l in round {
                    let mine = outs
                        .iter()
                        .zip(ws)
                        .map(|(o, (_, n))| o[row * n..(row + l.m) * n].to_vec())
                        .collect();
                    row += l.m;
                    let _ = l.reply.set(Ok(mine));
                }
            }
            Err(e) => round.into_iter().for_each(|l| {
                let _ = l.reply.set(Err(e.clone()));
            }),
        }
    }
}

/// The launches of the next round: the oldest pending ones with the same
/// `k` (the weights, hence the `n`s, are the queue's), up to
/// [`MAX_BATCH_ROWS`] rows (at least one).
fn take_round(pending: &mut Vec<Launch>, k: usize) -> Vec<Launch> {
    let (mut round, mut rest, mut rows) = (Vec::new(), Vec::new(), 0);
    for l in pending.drain(..) {
        if l.k == k && (round.is_empty() || rows + l.m <= MAX_BATCH_ROWS) {
            rows += l.m;
            round.push(l);
        } else {
            rest.push(l);
        }
    }
    *pending = rest;
    round
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
        self.leave_cohort();
        if STEPS.get().0 == self.id() {
            STEPS.set((0, 0));
        }
        let _ = self
            .runs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1));
        self.inner.run_ended();
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
            DeviceBuffer::F32(xs) if self.batches(m) => self
                .batched(xs, &[(w, n)], m, k)?
                .pop()
                .ok_or(BackendError::Device("batch returned no result".into())),
            _ => {
                self.next_step();
                self.leave_cohort();
                self.inner.matmul(x, w, m, k, n)
            }
        }
    }
    fn matmul_many(
        &self,
        x: &DeviceBuffer,
        ws: &[(&DeviceBuffer, usize)],
        m: usize,
        k: usize,
    ) -> Result<Vec<DeviceBuffer>, BackendError> {
        match x {
            DeviceBuffer::F32(xs) if self.batches(m) => self.batched(xs, ws, m, k),
            _ => {
                self.next_step();
                self.leave_cohort();
                self.inner.matmul_many(x, ws, m, k)
            }
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
    fn silu_mul(
        &self,
        gate: &DeviceBuffer,
        up: &DeviceBuffer,
    ) -> Result<DeviceBuffer, BackendError> {
        self.inner.silu_mul(gate, up)
    }
    // `matmul_add` keeps the default: its matmul is batched like any other.
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
    use std::time::Instant;

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

    fn f32s(b: DeviceBuffer) -> Vec<f32> {
        match b {
            DeviceBuffer::F32(v) => v,
            other => panic!("{other:?}"),
        }
    }

    /// `launch(r)` for each of `runs` runs on their own threads, all queued
    /// behind a round in progress on `key` (as if another run were executing
    /// one), so that the next round carries all of them, whatever the
    /// scheduler does. Returns each run's result.
    fn in_one_round<T: Send>(
        batching: &Batching,
        key: Key,
        runs: usize,
        launch: impl Fn(usize) -> T + Sync,
    ) -> Vec<T> {
        for _ in 0..runs {
            batching.run_started();
        }
        batching
            .lock()
            .queues
            .entry(key.clone())
            .or_default()
            .executing = true;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..runs)
                .map(|r| {
                    let launch = &launch;
                    s.spawn(move || {
                        let out = launch(r);
                        batching.run_ended();
                        out
                    })
                })
                .collect();
            while batching
                .lock()
                .queues
                .get(&key)
                .map_or(0, |q| q.pending.len())
                < runs
            {
                std::thread::yield_now();
            }
            batching.lock().queues.entry(key).or_default().executing = false;
            handles
                .into_iter()
                .map(|h| h.join().expect("run"))
                .collect()
        })
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
        let batching = Arc::new(Batching::new(Arc::new(CpuBackend)));
        let want: Vec<Vec<f32>> = (0..runs)
            .map(|r| {
                f32s(
                    CpuBackend
                        .matmul(&DeviceBuffer::F32(row(k, r)), &w, 1, k, n)
                        .expect("matmul"),
                )
            })
            .collect();
        let key: Key = vec![std::ptr::from_ref(&w) as usize];
        let got = in_one_round(&batching, key, runs, |r| {
            f32s(
                batching
                    .matmul(&DeviceBuffer::F32(row(k, r)), &w, 1, k, n)
                    .expect("matmul"),
            )
        });
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
                "run {r} got another result batched"
            );
        }
        // One fused launch of all 6 rows, executed by one run for 5 others.
        assert_eq!(
            batching.stats(),
            BatchStats {
                fused: 1,
                joined: (runs - 1) as u64
            }
        );
    }

    #[test]
    fn concurrent_matmul_many_launches_share_one_round_bit_for_bit() {
        let (k, runs) = (64, 4);
        let (w1, w2) = (weights(48, k), weights(16, k));
        let ws = [(&w1, 48), (&w2, 16)];
        let batching = Arc::new(Batching::new(Arc::new(CpuBackend)));
        let f32s = |outs: Vec<DeviceBuffer>| outs.into_iter().map(f32s).collect::<Vec<_>>();
        // Runs of 1, 2, 1 and 3 rows: each gets its own rows of each matrix.
        let rows = |r: usize| {
            (0..r % 3 + 1)
                .flat_map(|i| row(k, 10 * r + i))
                .collect::<Vec<_>>()
        };
        let want: Vec<Vec<Vec<f32>>> = (0..runs)
            .map(|r| {
                let x = rows(r);
                f32s(
                    CpuBackend
                        .matmul_many(&DeviceBuffer::F32(x.clone()), &ws, x.len() / k, k)
                        .expect("many"),
                )
            })
            .collect();
        let key: Key = ws
            .iter()
            .map(|(w, _)| std::ptr::from_ref(*w) as usize)
            .collect();
        let got = in_one_round(&batching, key, runs, |r| {
            let x = rows(r);
            let m = x.len() / k;
            f32s(
                batching
                    .matmul_many(&DeviceBuffer::F32(x), &ws, m, k)
                    .expect("many"),
            )
        });
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), 2);
            for (gm, wm) in g.iter().zip(w) {
                assert_eq!(gm.len(), wm.len());
                assert!(
                    gm.iter().zip(wm).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "run {r} got another result batched"
                );
            }
        }
        assert_eq!(
            batching.stats(),
            BatchStats {
                fused: 1,
                joined: (runs - 1) as u64
            }
        );
    }

    /// Two runs walking the same weights one after the other fall in step:
    /// whichever is behind executes alone until it catches up, then every
    /// round carries both, and each gets its own results bit for bit.
    #[test]
    fn runs_out_of_step_catch_up_and_then_share_every_round() {
        let (k, layers, tokens) = (64, 4, 8);
        let ws: Vec<DeviceBuffer> = (0..layers).map(|l| weights(32 + 16 * l, k)).collect();
        // A long window: only the least-advanced rule decides (no timeouts).
        let batching = Batching::new(Arc::new(CpuBackend)).with_window(Duration::from_secs(30));
        batching.run_started();
        batching.run_started();
        let first_done = AtomicUsize::new(0);
        let walk = |seed: usize| -> Vec<Vec<f32>> {
            let mut outs = Vec::new();
            for t in 0..tokens {
                for (l, w) in ws.iter().enumerate() {
                    let x = DeviceBuffer::F32(row(k, seed * 100 + t * layers + l));
                    outs.push(f32s(
                        batching.matmul(&x, w, 1, k, 32 + 16 * l).expect("matmul"),
                    ));
                    // The first run, two launches ahead, waits until the
                    // second has queued its first launch (so it is behind).
                    if seed == 1 && first_done.fetch_add(1, Ordering::Relaxed) == 1 {
                        while batching.lock().cohort < 2 {
                            std::thread::yield_now();
                        }
                    }
                }
            }
            batching.run_ended();
            outs
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| walk(1));
            // The second run starts two launches later than the first.
            while first_done.load(Ordering::Relaxed) < 2 {
                std::thread::yield_now();
            }
            let b = s.spawn(|| walk(2));
            (a.join().expect("a"), b.join().expect("b"))
        });
        for (seed, got) in [(1, a), (2, b)] {
            for (i, g) in got.iter().enumerate() {
                let (t, l) = (i / layers, i % layers);
                let x = DeviceBuffer::F32(row(k, seed * 100 + t * layers + l));
                let want = f32s(
                    CpuBackend
                        .matmul(&x, &ws[l], 1, k, 32 + 16 * l)
                        .expect("mm"),
                );
                assert!(g.iter().zip(&want).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
        }
        // 32 launches each: the second run's first two go alone (catching
        // up), every later one shares its round with the first run's.
        assert_eq!(
            batching.stats(),
            BatchStats {
                fused: (layers * tokens - 2) as u64,
                joined: (layers * tokens - 2) as u64
            }
        );
    }

    /// A decoding run that stops launching (here: it sleeps) holds the others
    /// up for at most the window per launch, never longer.
    #[test]
    fn a_launch_waits_for_company_at_most_the_window() {
        let (n, k) = (32, 64);
        let w = weights(n, k);
        let window = Duration::from_millis(20);
        let batching = Batching::new(Arc::new(CpuBackend)).with_window(window);
        batching.run_started();
        batching.run_started();
        let x = DeviceBuffer::F32(row(k, 3));
        let want = f32s(CpuBackend.matmul(&x, &w, 1, k, n).expect("matmul"));
        let (joined, stop) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            s.spawn(|| {
                // One launch, then silence (still a run, still in the cohort).
                batching.matmul(&x, &w, 1, k, n).expect("matmul");
                joined.store(1, Ordering::Relaxed);
                while stop.load(Ordering::Relaxed) == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                batching.run_ended();
            });
            while joined.load(Ordering::Relaxed) == 0 {
                std::thread::yield_now();
            }
            let start = Instant::now();
            for _ in 0..3 {
                let got = f32s(batching.matmul(&x, &w, 1, k, n).expect("matmul"));
                assert_eq!(got, want);
            }
            let took = start.elapsed();
            stop.store(1, Ordering::Relaxed);
            assert!(
                took >= window * 3,
                "did not wait for the silent run: {took:?}"
            );
            assert!(
                took < window * 3 + Duration::from_secs(2),
                "waited past the window: {took:?}"
            );
        });
    }

    #[test]
    fn a_run_alone_never_waits() {
        let (n, k) = (32, 64);
        let w = weights(n, k);
        let batching = Batching::new(Arc::new(CpuBackend));
        batching.run_started();
        let start = Instant::now();
        for _ in 0..10 {
            batching
                .matmul(&DeviceBuffer::F32(row(k, 0)), &w, 1, k, n)
                .expect("matmul");
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(1),
            "a lone run waited"
        );
        assert_eq!(batching.stats(), BatchStats::default());
    }
}
