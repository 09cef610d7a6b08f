//! A small pool of worker threads that spin briefly between launches.
//!
//! Decode launches one matmul after another, each a few microseconds of
//! work on one core: handing it to rayon wakes a sleeping thread each time
//! (tens of µs on this workplace's VMs, measured in BENCHMARKS.md), which
//! costs more than the second core gains. These workers instead spin for
//! [`SPIN`] after each job before they park, so the next launch of the same
//! decode step finds them awake; that is the trade llama.cpp's thread pool
//! makes too.
//!
//! Safe Rust only: a job owns what it reads (`Arc`s) and each task returns
//! its part of the result, so no borrow crosses a thread. One job runs at a
//! time; a launch that finds the pool busy (another run's launch) runs on its
//! own thread, which is the right thing when runs already fill the cores.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
pub const SPIN: Duration = Duration::from_micros(100);

type Task = dyn Fn(usize) -> Vec<f32> + Send + Sync;

struct Job {
    f: Box<Task>,
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    results: Vec<OnceLock<Vec<f32>>>,
}

impl Job {
    /// Runs tasks of this job until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                return;
            }
            // A panicking task still counts as done (the caller waits for
            // every task), and the caller re-raises it.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(i))) {
                Ok(r) => {
                    let _ = self.results[i].set(r);
                }
                Err(_) => self.panicked.store(true, Ordering::Relaxed),
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Shared {
    current: Mutex<Option<Arc<Job>>>,
    epoch: AtomicU64,
    busy: AtomicBool,
    parked: Mutex<usize>,
    wake: Condvar,
}

/// The pool.
pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} workers)", self.workers)
    }
}

/// Threads the CPU backend computes with: `CINFER_THREADS`, else
/// `RAYON_NUM_THREADS`, else the cores available.
pub fn threads() -> usize {
    ["CINFER_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The process-wide pool (`threads() - 1` workers: the caller is the last).
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(threads().saturating_sub(1)))
}

impl Pool {
    /// A pool of `workers` threads besides the caller's.
    pub fn new(workers: usize) -> Self {
        let shared = Arc::new(Shared {
            current: Mutex::new(None),
            epoch: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        });
        let mut started = 0;
        for i in 0..workers {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("cinfer-accel-{i}"))
                .spawn(move || worker(&s));
            if spawned.is_ok() {
                started += 1;
            }
        }
        Pool {
            shared,
            workers: started,
        }
    }

    /// Threads a job runs on (workers and the caller).
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// `f(0..tasks)` on the pool and the calling thread; the results in task
    /// order. Runs on the calling thread alone when the pool has no workers
    /// or is running another job.
    pub fn run(
        &self,
        tasks: usize,
        f: impl Fn(usize) -> Vec<f32> + Send + Sync + 'static,
    ) -> Vec<Vec<f32>> {
        if self.workers == 0
            || tasks < 2
            || self
                .shared
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return (0..tasks).map(f).collect();
        }
        let job = Arc::new(Job {
            f: Box::new(f),
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            results: (0..tasks).map(|_| OnceLock::new()).collect(),
        });
        *lock(&self.shared.current) = Some(job.clone());
        self.shared.epoch.fetch_add(1, Ordering::Release);
        if *lock(&self.shared.parked) > 0 {
            self.shared.wake.notify_all();
        }
        job.work();
        while job.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        *lock(&self.shared.current) = None;
        self.shared.busy.store(false, Ordering::Release);
        if job.panicked.load(Ordering::Relaxed) {
            panic!("an accelerator task panicked on a pool thread");
        }
        // A worker drops its handle on the job right after its last task:
        // wait a moment for that rather than copy every result below.
        for _ in 0..4096 {
            if Arc::strong_count(&job) == 1 {
                break;
            }
            std::hint::spin_loop();
        }
        let job = Arc::try_unwrap(job);
        match job {
            Ok(job) => job
                .results
                .into_iter()
                .map(|r| r.into_inner().unwrap_or_default())
                .collect(),
            // A worker still holds its clone for a moment: copy the results out.
            Err(job) => job
                .results
                .iter()
                .map(|r| r.get().cloned().unwrap_or_default())
                .collect(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values stay consistent even if a task panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn worker(s: &Shared) {
    let mut seen = s.epoch.load(Ordering::Acquire);
    loop {
        // Spin for the next job, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut parked = lock(&s.parked);
                *parked += 1;
                while s.epoch.load(Ordering::Acquire) == seen {
                    parked = s.wake.wait(parked).unwrap_or_else(|p| p.into_inner());
                }
                *parked -= 1;
                drop(parked);
                seen = s.epoch.load(Ordering::Acquire);
                break;
            }
            std::hint::spin_loop();
        }
        let job = lock(&s.current).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_task_order_across_many_jobs() {
        let pool = Pool::new(3);
        for round in 0..200usize {
            let tasks = 1 + round % 9;
            let out = pool.run(tasks, move |i| vec![(round * 100 + i) as f32; i + 1]);
            assert_eq!(out.len(), tasks);
            for (i, r) in out.iter().enumerate() {
                assert_eq!(r, &vec![(round * 100 + i) as f32; i + 1]);
            }
            if round % 50 == 0 {
                // Let the workers park, then wake them with the next job.
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    #[test]
    fn a_panicking_task_is_raised_in_the_caller_and_the_pool_keeps_working() {
        let pool = Pool::new(1);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(4, |i| {
                if i == 2 {
                    panic!("boom")
                } else {
                    vec![i as f32]
                }
            })
        }));
        assert!(r.is_err());
        assert_eq!(
            pool.run(3, |i| vec![i as f32]),
            vec![vec![0.0], vec![1.0], vec![2.0]]
        );
    }

    #[test]
    fn concurrent_callers_each_get_their_own_results() {
        let pool = Arc::new(Pool::new(2));
        std::thread::scope(|s| {
            for c in 0..4usize {
                let pool = pool.clone();
                s.spawn(move || {
                    for r in 0..100usize {
                        let out = pool.run(5, move |i| vec![(c * 1000 + r * 10 + i) as f32]);
                        let want: Vec<Vec<f32>> = (0..5)
                            .map(|i| vec![(c * 1000 + r * 10 + i) as f32])
                            .collect();
                        assert_eq!(out, want);
                    }
                });
            }
        });
    }
}
