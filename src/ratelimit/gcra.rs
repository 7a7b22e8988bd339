//! The token bucket as a GCRA: one `u64` per window, the *theoretical arrival time* (TAT)
//! in nanoseconds since the Unix epoch. The bucket is full when `TAT <= now` and empty when
//! `TAT >= now + burst`; a request of cost `c` moves TAT forward by `c × interval`.

use crate::quota::Quota;

/// One window's verdict for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) allowed: bool,
    /// The TAT to store when allowed.
    pub(crate) new_tat: u64,
    /// Whole tokens left after this request (allowed) or now (refused).
    pub(crate) remaining: u64,
    /// When the bucket is full again, ns since the epoch.
    pub(crate) full_at: u64,
    /// How long until this request could pass, in ns (0 when allowed).
    pub(crate) retry_after: u64,
}

/// Decides one request of `cost` tokens against a window whose stored TAT is `tat`.
///
/// A TAT further ahead than one burst (the clock stepped backwards) is clamped to one
/// burst ahead: the bucket reads empty, and refills from there, rather than locking the
/// key out for as long as the clock jumped.
pub(crate) fn step(tat: u64, now: u64, quota: &Quota, cost: u32) -> Step {
    let interval = quota.interval_ns();
    let burst = quota.burst_ns();
    let horizon = now.saturating_add(burst);
    let base = tat.min(horizon).max(now);
    let charge = interval.saturating_mul(u64::from(cost));
    let new_tat = base.saturating_add(charge);
    // Quotas refill within 100 years, so these sums never saturate; if one ever did, refuse
    // rather than let a saturated time admit everything.
    if new_tat <= horizon && horizon != u64::MAX && new_tat != u64::MAX {
        Step {
            allowed: true,
            new_tat,
            remaining: (horizon - new_tat) / interval,
            full_at: new_tat,
            retry_after: 0,
        }
    } else {
        Step {
            allowed: false,
            // Nothing is taken; a TAT clamped after a backward clock step is kept.
            new_tat: base.max(tat.min(horizon)),
            remaining: (horizon - base) / interval,
            full_at: base,
            // A cost above the capacity can never pass, and a saturated time (a clock or a
            // reply at the end of time) cannot say when: told to wait a whole period.
            retry_after: if u64::from(cost) > u64::from(quota.capacity().get())
                || horizon == u64::MAX
            {
                burst
            } else {
                new_tat.saturating_sub(horizon)
            },
        }
    }
}

/// Whether a window is full (holds no state worth keeping) at `now`.
pub(crate) fn is_full(tat: u64, now: u64) -> bool {
    tat <= now
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    fn q(n: u32, per: &str) -> Quota {
        Quota::parse(&format!("{n}/{per}")).unwrap()
    }

    /// Runs `cost`-sized requests at `now` until one is refused; the count admitted.
    fn drain(tat: &mut u64, now: u64, quota: &Quota, cost: u32) -> u32 {
        let mut admitted = 0;
        loop {
            let s = step(*tat, now, quota, cost);
            if !s.allowed {
                return admitted;
            }
            *tat = s.new_tat;
            admitted += 1;
        }
    }

    #[test]
    fn a_fresh_bucket_admits_exactly_its_capacity() {
        for (quota, capacity) in [
            (q(60, "min"), 60),
            (q(1, "s"), 1),
            (q(10_000, "day"), 10_000),
        ] {
            let mut tat = 0;
            assert_eq!(drain(&mut tat, T0, &quota, 1), capacity, "{quota}");
        }
    }

    #[test]
    fn exactly_full_and_exactly_empty() {
        let quota = q(60, "min");
        // Full: 60 left; the first request leaves 59 and full again in one interval.
        let s = step(0, T0, &quota, 1);
        assert!(s.allowed);
        assert_eq!(s.remaining, 59);
        assert_eq!(s.full_at, T0 + SEC);
        // Exactly empty: TAT one burst ahead.
        let empty = T0 + 60 * SEC;
        let s = step(empty, T0, &quota, 1);
        assert!(!s.allowed);
        assert_eq!(s.remaining, 0);
        assert_eq!(s.retry_after, SEC);
        assert_eq!(s.full_at, empty);
        // One interval later exactly one token is back.
        let s = step(empty, T0 + SEC, &quota, 1);
        assert!(s.allowed);
        assert_eq!(s.remaining, 0);
        // A nanosecond earlier it is not.
        assert!(!step(empty, T0 + SEC - 1, &quota, 1).allowed);
    }

    #[test]
    fn cost_larger_than_capacity_never_passes_and_takes_nothing() {
        let quota = q(5, "s");
        let s = step(0, T0, &quota, 6);
        assert!(!s.allowed);
        assert!(is_full(s.new_tat, T0), "a refusal takes nothing");
        assert_eq!(s.remaining, 5);
        assert_eq!(s.retry_after, 5 * (SEC / 5));
        // Exactly the capacity passes on a full bucket.
        assert!(step(0, T0, &quota, 5).allowed);
    }

    #[test]
    fn a_clock_stepping_backwards_does_not_lock_the_key_out() {
        let quota = q(60, "min");
        let mut tat = 0;
        drain(&mut tat, T0, &quota, 1);
        // The clock jumps back an hour: the bucket reads empty, not locked for an hour.
        let back = T0 - 3600 * SEC;
        let s = step(tat, back, &quota, 1);
        assert!(!s.allowed);
        assert_eq!(s.retry_after, SEC);
        assert_eq!(
            s.new_tat,
            back + 60 * SEC,
            "the clamped TAT is what gets stored"
        );
        tat = s.new_tat;
        assert!(step(tat, back + SEC, &quota, 1).allowed);
    }

    #[test]
    fn windows_of_a_second_and_a_day() {
        let second = q(10, "s");
        let mut tat = 0;
        assert_eq!(drain(&mut tat, T0, &second, 1), 10);
        assert_eq!(drain(&mut tat, T0 + SEC / 10, &second, 1), 1);
        assert_eq!(drain(&mut tat, T0 + 2 * SEC, &second, 1), 10);

        let day = q(1000, "day");
        let mut tat = 0;
        assert_eq!(drain(&mut tat, T0, &day, 1), 1000);
        let s = step(tat, T0, &day, 1);
        assert_eq!(s.retry_after, 86_400 * SEC / 1000);
        assert_eq!(s.full_at, T0 + 86_400 * SEC);
        assert_eq!(drain(&mut tat, T0 + 86_400 * SEC, &day, 1), 1000);
    }

    #[test]
    fn burst_differs_from_rate() {
        let quota = q(60, "min").with_burst(NonZeroU32::new(5).unwrap());
        let mut tat = 0;
        assert_eq!(drain(&mut tat, T0, &quota, 1), 5);
        assert_eq!(drain(&mut tat, T0 + SEC, &quota, 1), 1);
    }

    #[test]
    fn full_means_no_state() {
        let quota = q(60, "min");
        let s = step(0, T0, &quota, 1);
        assert!(!is_full(s.new_tat, T0));
        assert!(is_full(s.new_tat, T0 + SEC));
    }
}
