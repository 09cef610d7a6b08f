//! Runs as futures: on the calling thread one at a time ([`block_on`]), or
//! many at once as coroutines on one driver thread ([`Driver`]) so that
//! their decode matmuls can share rounds ([`Rounds`]).
//!
//! With cross-request batching, every run is a future on the driver's
//! thread. A run executes Wasm and host calls until it launches a
//! decode-sized matmul; that host call queues the launch and suspends the
//! run (wasmtime runs each call on its own fiber stack). Once no run can go
//! on, the driver executes a round, which wakes the runs it carried, and
//! polls them again. Switching between runs is a fiber switch, not a thread
//! switch: on a machine with few cores, where every run on its own thread
//! would wait for a core at each of its ~120 launches a token, this is what
//! makes batching pay. A run that computes without launching yields to the
//! others at each epoch check ([`crate::loader`]), so none can hold the
//! others up for long. The rounds themselves run on the backend's pool.
//!
//! A panic in one run (a loader bug) is caught where the run is polled and
//! ends that run only ([`crate::loader::AbortReason::HostPanic`] is decided
//! inside the run's future, which catches it first).

use crate::backend::batch::Rounds;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// Sleeping futures, woken by the loader's ticker thread ([`Timers::fire`],
/// every millisecond).
#[derive(Debug, Default)]
pub(crate) struct Timers(Mutex<Vec<(Instant, Waker)>>);

impl Timers {
    /// A future ready at `at` (at most a tick late).
    pub(crate) fn sleep_until(self: &Arc<Self>, at: Instant) -> Sleep {
        Sleep {
            timers: self.clone(),
            at,
        }
    }

    /// Wakes the sleepers whose time has come.
    pub(crate) fn fire(&self, now: Instant) {
        let due: Vec<Waker> = {
            let mut sleepers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            if sleepers.is_empty() {
                return;
            }
            let (due, rest) = std::mem::take(&mut *sleepers)
                .into_iter()
                .partition(|(at, _)| *at <= now);
            *sleepers = rest;
            due.into_iter().map(|(_, w)| w).collect()
        };
        due.into_iter().for_each(Waker::wake);
    }
}

/// See [`Timers::sleep_until`].
pub(crate) struct Sleep {
    timers: Arc<Timers>,
    at: Instant,
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        self.timers
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((self.at, cx.waker().clone()));
        Poll::Pending
    }
}

/// A run's future, built on the driver's thread.
pub(crate) type RunFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// Polls `f` on this thread until it is ready, parking between polls.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// What the driver runs: a constructor of the run's future (called on the
/// driver's thread with its rounds) and where the result goes.
pub(crate) struct Job<T> {
    pub start: Box<dyn FnOnce(Arc<Rounds>) -> RunFuture<T> + Send>,
    pub reply: mpsc::SyncSender<std::thread::Result<T>>,
}

/// Sets a run's flag when it should be polled again, and wakes the driver
/// if it waits for one.
struct Ready {
    flag: AtomicBool,
    driver: std::thread::Thread,
}

impl Wake for Ready {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        self.driver.unpark();
    }
}

struct Active<T> {
    future: RunFuture<T>,
    ready: Arc<Ready>,
    waker: Waker,
    reply: mpsc::SyncSender<std::thread::Result<T>>,
}

/// The driver thread of batched runs.
pub(crate) struct Driver<T: Send + 'static> {
    jobs: mpsc::Sender<Job<T>>,
    rounds: Arc<Rounds>,
    thread: std::thread::Thread,
}

impl<T: Send + 'static> std::fmt::Debug for Driver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("rounds", &self.rounds)
            .finish()
    }
}

impl<T: Send + 'static> Driver<T> {
    /// Starts the driver thread; it ends when the driver is dropped and its
    /// last run finished.
    pub(crate) fn start(rounds: Arc<Rounds>) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job<T>>();
        let r = rounds.clone();
        let handle = std::thread::Builder::new()
            .name("cinfer-driver".into())
            .spawn(move || drive(rx, r))?;
        Ok(Driver {
            jobs,
            rounds,
            thread: handle.thread().clone(),
        })
    }

    /// The rounds the driver's runs share.
    pub(crate) fn rounds(&self) -> &Arc<Rounds> {
        &self.rounds
    }

    /// Runs `start`'s future on the driver thread beside the others and
    /// waits for its output; a panic in it is resumed here.
    pub(crate) fn run(
        &self,
        start: Box<dyn FnOnce(Arc<Rounds>) -> RunFuture<T> + Send>,
    ) -> Result<T, DriverGone> {
        let (reply, result) = mpsc::sync_channel(1);
        self.jobs
            .send(Job { start, reply })
            .map_err(|_| DriverGone)?;
        self.thread.unpark();
        match result.recv() {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => Err(DriverGone),
        }
    }
}

/// The driver thread is gone (it panicked outside a run: a loader bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the loader's run driver stopped")]
pub struct DriverGone;

/// The driver loop: take new runs, poll the runs that were woken, and when
/// none was, execute a round.
fn drive<T: Send + 'static>(jobs: mpsc::Receiver<Job<T>>, rounds: Arc<Rounds>) {
    let backend = rounds.backend().clone();
    let me = std::thread::current();
    let mut active: Vec<Active<T>> = Vec::new();
    let mut open = true;
    loop {
        // New runs: wait for one when idle, else take what has arrived.
        let add = |job: Job<T>, active: &mut Vec<Active<T>>| {
            if active.is_empty() {
                // The driver is the one thread launching for all its runs.
                backend.run_started();
            }
            let start = job.start;
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start(rounds.clone()))) {
                Ok(future) => {
                    let ready = Arc::new(Ready {
                        flag: AtomicBool::new(true),
                        driver: me.clone(),
                    });
                    active.push(Active {
                        future,
                        waker: Waker::from(ready.clone()),
                        ready,
                        reply: job.reply,
                    });
                }
                Err(panic) => {
                    let _ = job.reply.send(Err(panic));
                    if active.is_empty() {
                        backend.run_ended();
                    }
                }
            }
        };
        if active.is_empty() {
            if !open {
                return;
            }
            match jobs.recv() {
                Ok(job) => add(job, &mut active),
                Err(_) => return,
            }
        }
        while open {
            match jobs.try_recv() {
                Ok(job) => add(job, &mut active),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        rounds.set_runs(active.len());
        // Poll every woken run once.
        let mut progressed = false;
        let mut i = 0;
        while i < active.len() {
            let run = &mut active[i];
            if !run.ready.flag.swap(false, Ordering::Acquire) {
                i += 1;
                continue;
            }
            progressed = true;
            let mut cx = Context::from_waker(&run.waker);
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run.future.as_mut().poll(&mut cx)
            }));
            let done = match polled {
                Ok(Poll::Pending) => None,
                Ok(Poll::Ready(v)) => Some(Ok(v)),
                Err(panic) => Some(Err(panic)),
            };
            match done {
                None => i += 1,
                Some(result) => {
                    let run = active.swap_remove(i);
                    // Its store (and everything the run held) is gone before
                    // the caller hears of the result.
                    drop(run.future);
                    let _ = run.reply.send(result);
                    rounds.set_runs(active.len());
                    if active.is_empty() {
                        backend.run_ended();
                    }
                }
            }
        }
        if progressed || active.is_empty() {
            continue;
        }
        // Nobody can go on: a round wakes the runs it carries.
        if !rounds.run_round() {
            // Every run waits for something else than a round (a paced frame,
            // a timer): sleep until a waker or a new job unparks the driver
            // (the timeout only bounds a missed wake-up).
            std::thread::park_timeout(Duration::from_millis(5));
        }
    }
}
