//! Replay protection for sealed requests: a serving loader runs each sealed
//! request at most once.
//!
//! Every honest request is a fresh HPKE encapsulation, so the same sealed bytes
//! twice are a replay by the untrusted side. Remembering every request forever
//! is impossible and a bounded set that forgets the oldest entries can be
//! flushed (send enough requests and a captured one is forgotten). So the
//! guarantee rests on time instead:
//!
//! * every request carries the time it was sealed, authenticated with the rest
//!   of its header ([`cinfer_envelope::request_sealed_at`]);
//! * the loader accepts a request only while it is inside the **replay window**
//!   `[now - max_age, now + max_skew]` (and not sealed before this process
//!   started, see below), and refuses requests without a seal time;
//! * a request is recorded only once its envelope opened, i.e. only requests
//!   sealed to a released request key count, never junk copying a header;
//! * an entry is forgotten only once its seal time has left the window, when
//!   the request would be refused as too old anyway. When the set holds
//!   `capacity` requests still inside the window, new requests are refused
//!   ([`ReplayError::WindowFull`]) rather than evicting one: the loader runs
//!   fewer requests, never one twice.
//!
//! The clock is a parameter (the caller reads it); it never runs backwards
//! here (the latest `now` seen is used), so setting the system clock back
//! cannot bring a forgotten request back into the window.
//!
//! Across restarts the set starts empty: the loader refuses requests sealed
//! before it started (`not_before`). A previous process could have run a
//! request stamped up to `max_skew` after its own last moment, so this holds
//! exactly for clients whose clocks are not ahead of the loader's; a client
//! running `d` ahead can see a request replayed into a loader restarted less
//! than `d` after that request ran.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

/// Why a request was refused by the replay window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The request header carries no seal time (envelope version 1 or 2).
    #[error(
        "request carries no seal time (envelope version 1 or 2): a serving loader cannot bound its replay"
    )]
    Untimed,
    /// Sealed longer ago than the window covers.
    #[error("request sealed at {sealed_at_ms} ms is older than the replay window of {max_age:?}")]
    TooOld {
        /// Its seal time (Unix milliseconds).
        sealed_at_ms: u64,
        /// The window's length into the past.
        max_age: Duration,
    },
    /// Sealed further in the future than the allowed clock skew.
    #[error(
        "request sealed at {sealed_at_ms} ms is {ahead_ms} ms in the future (allowed clock skew {max_skew:?})"
    )]
    InTheFuture {
        /// Its seal time (Unix milliseconds).
        sealed_at_ms: u64,
        /// How far ahead of the loader's clock.
        ahead_ms: u64,
        /// The skew allowed.
        max_skew: Duration,
    },
    /// Sealed before this loader started: it may have run in a previous process.
    #[error("request sealed at {sealed_at_ms} ms, before this loader started ({started_ms} ms)")]
    BeforeStart {
        /// Its seal time (Unix milliseconds).
        sealed_at_ms: u64,
        /// When the loader started (Unix milliseconds).
        started_ms: u64,
    },
    /// This sealed request was already run.
    #[error("replayed request: this sealed request was already run")]
    Replayed,
    /// The window already holds as many requests as it can remember.
    #[error(
        "busy: {capacity} requests already run within the replay window of {max_age:?}; try again later"
    )]
    WindowFull {
        /// How many requests the window remembers.
        capacity: usize,
        /// The window's length into the past.
        max_age: Duration,
    },
}

/// The requests run within the replay window (see the module docs).
#[derive(Debug)]
pub struct ReplayWindow {
    max_age_ms: u64,
    max_skew_ms: u64,
    not_before_ms: u64,
    capacity: usize,
    /// The latest `now` seen: the window never moves back.
    latest_now_ms: u64,
    /// Digests run, for lookup.
    digests: HashSet<[u8; 32]>,
    /// The same, ordered by seal time, for forgetting those that left the window.
    by_time: BTreeSet<(u64, [u8; 32])>,
}

impl ReplayWindow {
    /// Default number of requests remembered (about 6 MB of digests).
    pub const DEFAULT_CAPACITY: usize = 1 << 16;

    /// A window of `max_age` into the past and `max_skew` into the future,
    /// for a loader that started at `started_ms` (Unix milliseconds), holding
    /// at most `capacity` requests.
    pub fn new(max_age: Duration, max_skew: Duration, started_ms: u64, capacity: usize) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            max_age_ms: ms(max_age),
            max_skew_ms: ms(max_skew),
            not_before_ms: started_ms,
            capacity,
            latest_now_ms: started_ms,
            digests: HashSet::new(),
            by_time: BTreeSet::new(),
        }
    }

    /// How many requests are remembered now.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    fn now(&self, now_ms: u64) -> u64 {
        now_ms.max(self.latest_now_ms)
    }

    /// Whether a request sealed at `sealed_at_ms` is inside the window at
    /// `now_ms`. Cheap; call it before opening the envelope (the seal time is
    /// not yet authenticated then, [`ReplayWindow::record`] checks it again).
    pub fn check_time(&self, sealed_at_ms: Option<u64>, now_ms: u64) -> Result<(), ReplayError> {
        let sealed_at_ms = sealed_at_ms.ok_or(ReplayError::Untimed)?;
        let now = self.now(now_ms);
        if sealed_at_ms < self.not_before_ms {
            return Err(ReplayError::BeforeStart {
                sealed_at_ms,
                started_ms: self.not_before_ms,
            });
        }
        if sealed_at_ms < now.saturating_sub(self.max_age_ms) {
            return Err(ReplayError::TooOld {
                sealed_at_ms,
                max_age: Duration::from_millis(self.max_age_ms),
            });
        }
        if sealed_at_ms > now.saturating_add(self.max_skew_ms) {
            return Err(ReplayError::InTheFuture {
                sealed_at_ms,
                ahead_ms: sealed_at_ms - now,
                max_skew: Duration::from_millis(self.max_skew_ms),
            });
        }
        Ok(())
    }

    /// Records an **authenticated** request (its envelope opened): its SHA-256
    /// and seal time. Refuses it if it is outside the window, was recorded
    /// before, or the window is full of requests it must still remember.
    pub fn record(
        &mut self,
        digest: [u8; 32],
        sealed_at_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<(), ReplayError> {
        self.check_time(sealed_at_ms, now_ms)?;
        let sealed_at_ms = sealed_at_ms.ok_or(ReplayError::Untimed)?;
        let now = self.now(now_ms);
        self.latest_now_ms = now;
        // Forget what left the window: check_time refuses it from now on.
        let oldest = now.saturating_sub(self.max_age_ms);
        while let Some(&(t, d)) = self.by_time.first()
            && t < oldest
        {
            self.by_time.pop_first();
            self.digests.remove(&d);
        }
        if self.digests.contains(&digest) {
            return Err(ReplayError::Replayed);
        }
        if self.digests.len() >= self.capacity {
            return Err(ReplayError::WindowFull {
                capacity: self.capacity,
                max_age: Duration::from_millis(self.max_age_ms),
            });
        }
        self.digests.insert(digest);
        self.by_time.insert((sealed_at_ms, digest));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: u64 = 1_700_000_000_000;
    const AGE: Duration = Duration::from_secs(300);
    const SKEW: Duration = Duration::from_secs(5);

    fn d(i: u32) -> [u8; 32] {
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&i.to_be_bytes());
        d
    }

    #[test]
    fn a_full_window_refuses_new_requests_instead_of_forgetting_old_ones() {
        let mut w = ReplayWindow::new(AGE, SKEW, START, 4);
        for i in 0..4 {
            w.record(d(i), Some(START + 10), START + 20).unwrap();
        }
        assert_eq!(
            w.record(d(99), Some(START + 11), START + 21),
            Err(ReplayError::WindowFull {
                capacity: 4,
                max_age: AGE
            })
        );
        // Every request recorded is still refused as a replay.
        for i in 0..4 {
            assert_eq!(
                w.record(d(i), Some(START + 10), START + 30),
                Err(ReplayError::Replayed)
            );
        }
        // Once they leave the window they are forgotten — and refused as too old.
        let later = START + 10 + 300_001;
        assert_eq!(
            w.record(d(0), Some(START + 10), later),
            Err(ReplayError::TooOld {
                sealed_at_ms: START + 10,
                max_age: AGE
            })
        );
        w.record(d(5), Some(later), later).unwrap();
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn requests_outside_the_window_are_refused_with_the_reason() {
        let mut w = ReplayWindow::new(AGE, SKEW, START, 4);
        let now = START + 1_000_000;
        assert_eq!(w.record(d(1), None, now), Err(ReplayError::Untimed));
        assert_eq!(
            w.record(d(1), Some(START - 1), now),
            Err(ReplayError::BeforeStart {
                sealed_at_ms: START - 1,
                started_ms: START
            })
        );
        assert!(matches!(
            w.record(d(1), Some(now - 300_001), now),
            Err(ReplayError::TooOld { .. })
        ));
        assert_eq!(
            w.record(d(1), Some(now + 5_001), now),
            Err(ReplayError::InTheFuture {
                sealed_at_ms: now + 5_001,
                ahead_ms: 5_001,
                max_skew: SKEW
            })
        );
        w.record(d(1), Some(now + 5_000), now).unwrap();
        w.record(d(2), Some(now - 300_000), now).unwrap();
        assert!(w.record(d(2), Some(now - 300_000), now).is_err());
    }

    #[test]
    fn setting_the_clock_back_does_not_bring_a_forgotten_request_back() {
        let mut w = ReplayWindow::new(AGE, SKEW, START, 4);
        w.record(d(1), Some(START + 1), START + 1).unwrap();
        let later = START + 400_000;
        w.record(d(2), Some(later), later).unwrap(); // forgets d(1)
        // The clock is set back to when d(1) was fresh: still too old.
        assert!(matches!(
            w.record(d(1), Some(START + 1), START + 2),
            Err(ReplayError::TooOld { .. })
        ));
    }
}
