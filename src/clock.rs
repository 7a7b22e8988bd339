//! Time, behind a trait so that tests can hold it still.
//!
//! Key expiry, rotation grace and rate-limit buckets all read the time through [`Clock`].
//! [`SystemClock`] is the wall clock; [`FakeClock`] moves only when a test says so.
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//! use keygate::clock::{Clock, FakeClock};
//!
//! let clock = FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
//! let shared = clock.clone(); // clones share one time
//! clock.advance(Duration::from_secs(60));
//! assert_eq!(shared.now(), UNIX_EPOCH + Duration::from_secs(1_700_000_060));
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;

    /// The current time as nanoseconds since the Unix epoch (0 before the epoch, saturating
    /// in the year 2554).
    fn now_nanos(&self) -> u64 {
        nanos_since_epoch(self.now())
    }
}

/// Nanoseconds since the Unix epoch, 0 before it, saturating at `u64::MAX`.
pub(crate) fn nanos_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The wall clock read at the kernel's tick resolution (1 to 4 ms on Linux, through
/// `CLOCK_REALTIME_COARSE`), for a fraction of the cost of a precise read: the default of
/// the layers, the cache and the in-memory limiter, which read the time on every request.
/// Key expiry, cache TTLs and token refills at millisecond resolution lose nothing that
/// matters; use [`SystemClock`] where they must be exact. Other platforms read the precise
/// clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoarseClock;

impl Clock for CoarseClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.now_nanos())
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn now_nanos(&self) -> u64 {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
        secs.saturating_mul(1_000_000_000).saturating_add(nanos)
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn now_nanos(&self) -> u64 {
        nanos_since_epoch(SystemTime::now())
    }
}

/// A clock that moves only when told to. Clones share one time.
#[derive(Clone)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    /// A clock stopped at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(Arc::new(AtomicU64::new(nanos_since_epoch(start))))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(by))
            });
    }

    /// Moves the clock backward, as an NTP step can.
    pub fn rewind(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_sub(by))
            });
    }

    /// Sets the clock.
    pub fn set(&self, to: SystemTime) {
        self.0.store(nanos_since_epoch(to), Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }

    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for FakeClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FakeClock").field(&self.now()).finish()
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> SystemTime {
        (**self).now()
    }

    fn now_nanos(&self) -> u64 {
        (**self).now_nanos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clock_follows_the_wall_clock() {
        let precise = SystemClock.now_nanos();
        let coarse = CoarseClock.now_nanos();
        // Within the tick (a few ms) plus scheduling noise.
        assert!(
            coarse.abs_diff(precise) < 1_000_000_000,
            "{coarse} {precise}"
        );
        assert!(CoarseClock.now() > UNIX_EPOCH);
    }
}
