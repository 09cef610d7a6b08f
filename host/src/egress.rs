//! Egress pacing: token buckets over the sealed bytes that leave the loader,
//! one per grant that sets `egress-rate-bytes-per-sec` and one for the whole
//! loader (the policy's `[egress]`), shared by every run.
//!
//! An `emit` takes its frame's bytes from each bucket that applies, all at
//! once; while they do not hold enough, the run waits (a suspended future,
//! woken by the loader's 1 ms ticker) — up to its deadline: a frame that
//! could not leave before it ends the run with
//! [`PolicyViolation::EgressRate`]. So over any interval of length t, the
//! sealed bytes leaving under one bucket stay within `burst + rate · t`,
//! plus the final frames of runs that ended (a run's end is always sealed
//! and sent; it is charged, which the next frames then wait out).
//!
//! Hand-written: a token bucket is a few lines, and the rate-limiting crates
//! (e.g. `governor`) bring their own clocks and a dozen dependencies into
//! the loader for what these lines do.

use crate::caps::PolicyViolation;
use crate::driver::Timers;
use crate::policy::EgressRate;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One token bucket.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: EgressRate,
    /// Tokens (bytes) and when they were counted; negative after a final
    /// frame was charged beyond what was there.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn new(rate: EgressRate) -> Self {
        Bucket {
            rate,
            state: Mutex::new((rate.burst_bytes as f64, Instant::now())),
        }
    }
}

/// Tokens of `b` at `now`, updated.
fn refill(b: &Bucket, st: &mut (f64, Instant), now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(st.1).as_secs_f64();
    st.0 = (st.0 + elapsed * b.rate.bytes_per_sec as f64).min(b.rate.burst_bytes as f64);
    st.1 = now.max(st.1);
    st.0
}

/// Takes `cost` bytes from every bucket at once if each holds them at `now`;
/// otherwise takes nothing and says how long until they all could.
/// (Buckets are always listed grant first, loader second, so two runs never
/// lock them in opposite orders.)
pub(crate) fn take(buckets: &[Arc<Bucket>], cost: u64, now: Instant) -> Result<(), Duration> {
    let mut states: Vec<_> = buckets
        .iter()
        .map(|b| b.state.lock().unwrap_or_else(PoisonError::into_inner))
        .collect();
    let mut wait = 0f64;
    for (b, st) in buckets.iter().zip(states.iter_mut()) {
        let short = cost as f64 - refill(b, st, now);
        if short > 0.0 {
            wait = wait.max(short / b.rate.bytes_per_sec as f64);
        }
    }
    if wait > 0.0 {
        return Err(Duration::from_secs_f64(wait).max(Duration::from_micros(1)));
    }
    for st in &mut states {
        st.0 -= cost as f64;
    }
    Ok(())
}

/// Charges `cost` bytes without waiting (a run's final frame).
pub(crate) fn charge(buckets: &[Arc<Bucket>], cost: u64) {
    let now = Instant::now();
    for b in buckets {
        let mut st = b.state.lock().unwrap_or_else(PoisonError::into_inner);
        refill(b, &mut st, now);
        st.0 -= cost as f64;
    }
}

/// How one run's frames are paced.
#[derive(Debug)]
pub(crate) struct Pacing {
    /// The grant's bucket, then the loader's (either may be absent).
    pub(crate) buckets: Vec<Arc<Bucket>>,
    pub(crate) timers: Arc<Timers>,
    pub(crate) deadline: Instant,
    pub(crate) cancel: Option<Arc<AtomicBool>>,
}

/// The run was cancelled while its frame waited (mapped like a cancellation
/// at an epoch check).
#[derive(Debug, thiserror::Error)]
#[error("run cancelled")]
pub(crate) struct CancelledWhilePaced;

impl Pacing {
    /// Largest chunk one frame may carry: every frame must fit each burst.
    pub(crate) fn max_chunk(&self, overhead: u64) -> usize {
        let burst = self
            .buckets
            .iter()
            .map(|b| b.rate.burst_bytes)
            .min()
            .unwrap_or(u64::MAX);
        usize::try_from(burst.saturating_sub(overhead).max(1)).unwrap_or(usize::MAX)
    }

    /// Waits until a frame of `cost` bytes may leave, and takes its bytes.
    pub(crate) async fn wait(&self, cost: u64) -> wasmtime::Result<()> {
        loop {
            let now = Instant::now();
            let Err(wait) = take(&self.buckets, cost, now) else {
                return Ok(());
            };
            if now + wait > self.deadline {
                let slowest = self
                    .buckets
                    .iter()
                    .map(|b| b.rate.bytes_per_sec)
                    .min()
                    .unwrap_or(0);
                return Err(wasmtime::Error::new(PolicyViolation::EgressRate {
                    bytes_per_sec: slowest,
                }));
            }
            if self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(wasmtime::Error::new(CancelledWhilePaced));
            }
            // Look at the cancellation flag at least every 10 ms.
            let until = now + wait.min(Duration::from_millis(10));
            self.timers.sleep_until(until).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(rate: u64, burst: u64) -> Arc<Bucket> {
        Arc::new(Bucket::new(EgressRate {
            bytes_per_sec: rate,
            burst_bytes: burst,
        }))
    }

    #[test]
    fn a_bucket_holds_its_burst_and_refills_at_its_rate() {
        let b = bucket(1000, 4000);
        let t0 = b.state.lock().expect("lock").1;
        assert_eq!(take(std::slice::from_ref(&b), 3000, t0), Ok(()));
        // 1000 left: 1500 more need 0.5 s.
        let wait = take(std::slice::from_ref(&b), 1500, t0).expect_err("short");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(
            take(
                std::slice::from_ref(&b),
                1500,
                t0 + Duration::from_millis(500)
            ),
            Ok(())
        );
        // Never more than the burst, however long it rested.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(take(std::slice::from_ref(&b), 4000, later), Ok(()));
        assert!(take(std::slice::from_ref(&b), 1, later).is_err());
    }

    #[test]
    fn a_frame_takes_from_every_bucket_or_from_none() {
        let (grant, total) = (bucket(1000, 2000), bucket(100, 1500));
        let t0 = Instant::now();
        let both = [grant.clone(), total.clone()];
        assert_eq!(take(&both, 1500, t0), Ok(()));
        // The total bucket is empty: nothing is taken from the grant's either.
        let wait = take(&both, 500, t0).expect_err("total is short");
        assert!(wait >= Duration::from_secs(5), "{wait:?}");
        assert_eq!(
            take(std::slice::from_ref(&grant), 500, t0),
            Ok(()),
            "the grant kept its 500"
        );
        // A final frame is charged into debt, and later frames wait it out.
        charge(std::slice::from_ref(&total), 100);
        let debt = total.state.lock().expect("lock").0;
        assert!(debt < 0.0 && debt > -101.0, "{debt}");
    }
}
