//! Cross-request batching: concurrent runs that multiply by the same
//! resident weight matrix share one launch.
//!
//! Decode multiplies one activation row by every weight matrix in turn, so
//! its speed is the speed at which weights stream through the cores. When
//! several runs decode at once, each `matmul` (and each `matmul_many`, by its
//! list of matrices) is queued in [`Rounds`] by weight buffer and the run
//! waits for the result as a suspended coroutine ([`Ticket`] is a future);
//! whoever drives the runs (the loader's driver thread, one thread for all
//! batched runs) calls [`Rounds::run_round`] once none of them can go on,
//! which executes the queued launches on one list of weights as one matmul
//! over all their rows (weights streamed once) and hands each its rows.
//!
//! **Which round.** The queue holding the least advanced launch (each run
//! counts its matmul launches) goes first: runs ahead wait for the runs
//! behind, which therefore catch up and fall in step with them, after which
//! every round carries all of them. Nothing waits on a clock: a round starts
//! as soon as no run can make progress without one, so a lone run never
//! waits, and no launch waits for runs that are busy elsewhere.
//!
//! - **Same numbers.** Every output row of the CPU kernels depends only on
//!   its own activation row and the weights: batched and unbatched results
//!   are bit for bit equal (tested).
//! - **Isolation.** Rows are copied in and copied out; no run holds another
//!   run's tensor, and the fused launch is only a computation.
//! - **Timing.** A run that decodes beside others waits for their launches
//!   on the same weights (one matmul) and for the runs behind it to catch up;
//!   what it can learn from that is that other runs exist and roughly how far
//!   along they are, which the loader's throughput shows anyway; it learns
//!   nothing of their content.
//!
//! Launches whose operands are not host f32 activations (a CUDA backend's
//! tensors), and prompt-sized ones, are not queued: the caller runs them on
//! the backend directly ([`Rounds::takes`]).

use super::{Backend, BackendError, DeviceBuffer};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// Rows one fused launch takes at most (bounds the copy).
pub const MAX_BATCH_ROWS: usize = 64;

/// Where a queued launch's result goes, and whom to wake.
#[derive(Default)]
struct Slot(Mutex<SlotState>);

#[derive(Default)]
struct SlotState {
    result: Option<Result<Vec<DeviceBuffer>, BackendError>>,
    waker: Option<Waker>,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn complete(&self, r: Result<Vec<DeviceBuffer>, BackendError>) {
        let waker = {
            let mut st = self.lock();
            st.result = Some(r);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A queued launch's result: a future that is ready once a round executed
/// the launch (one buffer per matrix of the launch, its own rows only).
pub struct Ticket(Arc<Slot>);

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("done", &self.0.lock().result.is_some())
            .finish()
    }
}

impl Future for Ticket {
    type Output = Result<Vec<DeviceBuffer>, BackendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.0.lock();
        match st.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A queued launch: its rows and where its result goes.
struct Launch {
    x: Vec<f32>,
    m: usize,
    /// Matmul launches its run had made before this one (its progress).
    step: u64,
    slot: Arc<Slot>,
}

/// The launches queued on one list of weight buffers.
struct Queue {
    /// The weights and each one's output width (held, so the addresses in
    /// the key stay theirs while launches are queued).
    ws: Vec<(Arc<DeviceBuffer>, usize)>,
    k: usize,
    pending: Vec<Launch>,
}

/// A list of weight buffers by address (equal while both are held means the
/// same buffers in the same order).
type Key = Vec<usize>;

/// Counts of what the batcher did (for benchmarks and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// Rounds executed.
    pub rounds: u64,
    /// Launches those rounds carried.
    pub launches: u64,
    /// Rounds that carried rows of more than one launch.
    pub fused: u64,
}

/// Launches queued by weights until a round executes them on `inner`.
pub struct Rounds {
    inner: Arc<dyn Backend>,
    queues: Mutex<HashMap<Key, Queue>>,
    /// Runs sharing the rounds ([`Rounds::set_runs`]).
    runs: AtomicUsize,
    rounds: AtomicU64,
    launches: AtomicU64,
    fused: AtomicU64,
}

impl std::fmt::Debug for Rounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rounds")
            .field("inner", &self.inner)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Rounds {
    /// Batches launches on `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Rounds {
            inner,
            queues: Mutex::new(HashMap::new()),
            runs: AtomicUsize::new(0),
            rounds: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            fused: AtomicU64::new(0),
        }
    }

    /// The backend rounds execute on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    /// Whether a launch of `m` rows of `x` is queued: decode-sized launches
    /// of host f32 activations while more than one run shares the rounds (a
    /// lone run launches directly, as if unbatched).
    pub fn takes(&self, x: &DeviceBuffer, m: usize) -> bool {
        matches!(x, DeviceBuffer::F32(_))
            && m <= MAX_BATCH_ROWS / 2
            && self.runs.load(Ordering::Relaxed) > 1
    }

    /// Tells the batcher how many runs share its rounds now.
    pub fn set_runs(&self, runs: usize) {
        self.runs.store(runs, Ordering::Relaxed);
    }

    /// What the batcher has done so far.
    pub fn stats(&self) -> BatchStats {
        BatchStats {
            rounds: self.rounds.load(Ordering::Relaxed),
            launches: self.launches.load(Ordering::Relaxed),
            fused: self.fused.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Queue>> {
        // A panic while holding the lock leaves only plain data behind.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `matmul_many(x, ws)` (`x` is [m, k]) of a run that made `step`
    /// matmul launches before this one; the ticket is ready once a round
    /// executed it.
    pub fn launch(
        &self,
        x: Vec<f32>,
        ws: Vec<(Arc<DeviceBuffer>, usize)>,
        m: usize,
        k: usize,
        step: u64,
    ) -> Ticket {
        let slot = Arc::new(Slot::default());
        if x.len() != m * k || ws.is_empty() {
            slot.complete(Err(BackendError::Device(
                "batched launch with inconsistent operands".into(),
            )));
            return Ticket(slot);
        }
        let key: Key = ws.iter().map(|(w, _)| Arc::as_ptr(w) as usize).collect();
        let launch = Launch {
            x,
            m,
            step,
            slot: slot.clone(),
        };
        let mut queues = self.lock();
        let q = queues.entry(key).or_insert_with(|| Queue {
            ws,
            k,
            pending: Vec::new(),
        });
        if q.k != k {
            drop(queues);
            slot.complete(Err(BackendError::Device(
                "batched launch with another k on the same weights".into(),
            )));
            return Ticket(slot);
        }
        q.pending.push(launch);
        Ticket(slot)
    }

    /// Launches queued and not yet executed.
    pub fn pending(&self) -> usize {
        self.lock().values().map(|q| q.pending.len()).sum()
    }

    /// Executes one round: the launches queued on the weights of the least
    /// advanced launch (up to [`MAX_BATCH_ROWS`] rows, oldest first) as one
    /// matmul; wakes their runs. Returns whether there was anything to run.
    pub fn run_round(&self) -> bool {
        let (ws, k, round) = {
            let mut queues = self.lock();
            let Some(key) = queues
                .iter()
                .filter_map(|(key, q)| Some((q.pending.iter().map(|l| l.step).min()?, key)))
                .min()
                .map(|(_, key)| key.clone())
            else {
                return false;
            };
            let Some(q) = queues.get_mut(&key) else {
                return false;
            };
            let round = take_round(&mut q.pending);
            let (ws, k) = (q.ws.clone(), q.k);
            if q.pending.is_empty() {
                queues.remove(&key);
            }
            (ws, k, round)
        };
        self.execute(round, &ws, k);
        true
    }

    /// Runs one round: all its rows in one launch, each launch's rows back.
    fn execute(&self, round: Vec<Launch>, ws: &[(Arc<DeviceBuffer>, usize)], k: usize) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        self.launches
            .fetch_add(round.len() as u64, Ordering::Relaxed);
        let total: usize = round.iter().map(|l| l.m).sum();
        let stacked = if let [one] = round.as_slice() {
            one.x.clone()
        } else {
            self.fused.fetch_add(1, Ordering::Relaxed);
            let mut stacked = Vec::with_capacity(total * k);
            for l in &round {
                stacked.extend_from_slice(&l.x);
            }
            stacked
        };
        let x = DeviceBuffer::F32(stacked);
        let pairs: Vec<(&DeviceBuffer, usize)> = ws.iter().map(|(w, n)| (&**w, *n)).collect();
        let result = match pairs.as_slice() {
            [(w, n)] => self.inner.matmul(&x, w, total, k, *n).map(|o| vec![o]),
            _ => self.inner.matmul_many(&x, &pairs, total, k),
        };
        let outs: Result<Vec<Vec<f32>>, BackendError> = result.and_then(|outs| {
            if outs.len() != ws.len() {
                return Err(BackendError::Device(
                    "matmul_many returned another number of results".into(),
                ));
            }
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
                        .map(|(o, (_, n))| DeviceBuffer::F32(o[row * n..(row + l.m) * n].to_vec()))
                        .collect();
                    row += l.m;
                    l.slot.complete(Ok(mine));
                }
            }
            Err(e) => round
                .into_iter()
                .for_each(|l| l.slot.complete(Err(e.clone()))),
        }
    }
}

/// The launches of the next round: the oldest pending ones, up to
/// [`MAX_BATCH_ROWS`] rows (at least one).
fn take_round(pending: &mut Vec<Launch>) -> Vec<Launch> {
    let (mut round, mut rest, mut rows) = (Vec::new(), Vec::new(), 0);
    for l in pending.drain(..) {
        if round.is_empty() || rows + l.m <= MAX_BATCH_ROWS {
            rows += l.m;
            round.push(l);
        } else {
            rest.push(l);
        }
    }
    *pending = rest;
    round
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use crate::quant::BlockQ4_1;
    use std::task::Wake;

    fn weights(n: usize, k: usize) -> Arc<DeviceBuffer> {
        let blocks: Vec<BlockQ4_1> = (0..n * k / 32)
            .map(|b| BlockQ4_1 {
                d: half::f16::from_f32(0.01 * (1 + b % 7) as f32).to_bits(),
                m: half::f16::from_f32(-0.03 * (b % 5) as f32).to_bits(),
                qs: core::array::from_fn(|j| ((j * 37 + b * 11) % 256) as u8),
            })
            .collect();
        Arc::new(
            CpuBackend
                .upload_weights(DeviceBuffer::Q4_1(blocks), n, k)
                .expect("pack"),
        )
    }

    fn f32s(b: &DeviceBuffer) -> Vec<f32> {
        match b {
            DeviceBuffer::F32(v) => v.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn row(k: usize, seed: usize) -> Vec<f32> {
        (0..k)
            .map(|i| (((i * 31 + seed * 17) % 61) as f32 - 30.0) / 13.0)
            .collect()
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicU64);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn poll(t: &mut Ticket, waker: &Waker) -> Poll<Result<Vec<DeviceBuffer>, BackendError>> {
        Pin::new(t).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn queued_launches_share_one_round_and_get_their_own_rows_bit_for_bit() {
        let (k, runs) = (96, 6);
        let (w1, w2) = (weights(80, k), weights(48, k));
        let rounds = Rounds::new(Arc::new(CpuBackend));
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        // Runs of 1 and 2 rows, on [w1] and on [w1, w2].
        for ws in [
            vec![(w1.clone(), 80)],
            vec![(w1.clone(), 80), (w2.clone(), 48)],
        ] {
            let mut tickets: Vec<(Vec<f32>, usize, Ticket)> = (0..runs)
                .map(|r| {
                    let m = 1 + r % 2;
                    let x: Vec<f32> = (0..m).flat_map(|i| row(k, r * 7 + i)).collect();
                    let t = rounds.launch(x.clone(), ws.clone(), m, k, 0);
                    (x, m, t)
                })
                .collect();
            for (_, _, t) in &mut tickets {
                assert!(poll(t, &waker).is_pending(), "nothing ran yet");
            }
            let before = rounds.stats();
            assert!(rounds.run_round());
            assert!(!rounds.run_round(), "one round took every launch");
            let after = rounds.stats();
            assert_eq!(after.rounds - before.rounds, 1);
            assert_eq!(after.launches - before.launches, runs as u64);
            assert_eq!(after.fused - before.fused, 1);
            for (x, m, t) in &mut tickets {
                let Poll::Ready(Ok(outs)) = poll(t, &waker) else {
                    panic!("the round executed the launch");
                };
                assert_eq!(outs.len(), ws.len());
                for ((w, n), out) in ws.iter().zip(&outs) {
                    let alone = CpuBackend
                        .matmul(&DeviceBuffer::F32(x.clone()), w, *m, k, *n)
                        .expect("matmul");
                    assert_eq!(f32s(out), f32s(&alone), "bit for bit");
                }
            }
        }
        // Every pending ticket was woken once when its round completed.
        assert_eq!(count.0.load(Ordering::Relaxed), 2 * runs as u64);
    }

    #[test]
    fn only_decode_sized_host_launches_of_several_runs_are_queued() {
        let rounds = Rounds::new(Arc::new(CpuBackend));
        let x = DeviceBuffer::F32(vec![0.0; 64]);
        assert!(!rounds.takes(&x, 1), "no runs yet");
        rounds.set_runs(1);
        assert!(!rounds.takes(&x, 1), "a lone run launches directly");
        rounds.set_runs(2);
        assert!(rounds.takes(&x, 1));
        assert!(rounds.takes(&x, MAX_BATCH_ROWS / 2));
        assert!(!rounds.takes(&x, MAX_BATCH_ROWS / 2 + 1), "prompt-sized");
        let f16 = DeviceBuffer::F16(vec![0; 64]);
        assert!(!rounds.takes(&f16, 1), "not host f32 activations");
    }

    #[test]
    fn the_least_advanced_launch_goes_first_and_rounds_hold_at_most_64_rows() {
        let k = 64;
        let (wa, wb) = (weights(32, k), weights(32, k));
        let rounds = Rounds::new(Arc::new(CpuBackend));
        let waker = Waker::from(Arc::new(Count::default()));
        // A run ahead (step 9) on wb, two behind (steps 3 and 4) on wa.
        let mut ahead = rounds.launch(row(k, 1), vec![(wb.clone(), 32)], 1, k, 9);
        let mut behind: Vec<Ticket> = (0..2)
            .map(|r| rounds.launch(row(k, r), vec![(wa.clone(), 32)], 1, k, 3 + r as u64))
            .collect();
        assert!(rounds.run_round());
        for t in &mut behind {
            assert!(poll(t, &waker).is_ready(), "the runs behind went first");
        }
        assert!(poll(&mut ahead, &waker).is_pending());
        assert_eq!(rounds.pending(), 1);
        assert!(rounds.run_round());
        assert!(poll(&mut ahead, &waker).is_ready());
        // 40 launches of 2 rows: a round of 32, then one of 8.
        let many: Vec<Ticket> = (0..40)
            .map(|r| {
                let x = [row(k, r), row(k, r + 1)].concat();
                rounds.launch(x, vec![(wa.clone(), 32)], 2, k, 0)
            })
            .collect();
        assert!(rounds.run_round());
        let (mut done, mut left) = (0, Vec::new());
        for mut t in many {
            match poll(&mut t, &waker) {
                Poll::Ready(r) => {
                    r.expect("ok");
                    done += 1;
                }
                Poll::Pending => left.push(t),
            }
        }
        assert_eq!(done, MAX_BATCH_ROWS / 2);
        assert!(rounds.run_round());
        assert!(left.iter_mut().all(|t| poll(t, &waker).is_ready()));
        assert!(!rounds.run_round());
    }

    #[test]
    fn inconsistent_launches_are_refused_and_leave_the_queue_as_it_was() {
        let rounds = Rounds::new(Arc::new(CpuBackend));
        let waker = Waker::from(Arc::new(Count::default()));
        let w = weights(32, 64);
        // x of the wrong length: refused at once, nothing queued.
        let mut bad = rounds.launch(vec![0.0; 10], vec![(w.clone(), 32)], 1, 64, 0);
        assert!(matches!(
            poll(&mut bad, &waker),
            Poll::Ready(Err(BackendError::Device(_)))
        ));
        assert_eq!(rounds.pending(), 0);
        // The same weights with another k are refused, the queue kept.
        let mut ok = rounds.launch(row(64, 0), vec![(w.clone(), 32)], 1, 64, 0);
        let mut other_k = rounds.launch(row(32, 0), vec![(w.clone(), 32)], 1, 32, 0);
        assert!(matches!(
            poll(&mut other_k, &waker),
            Poll::Ready(Err(BackendError::Device(_)))
        ));
        assert!(rounds.run_round());
        assert!(matches!(poll(&mut ok, &waker), Poll::Ready(Ok(_))));
    }
}
