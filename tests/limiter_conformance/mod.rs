//! One conformance suite for limiter stores: every store gives the same decisions and the
//! same numbers (headers, 429 bodies) for the same requests at the same times. The memory
//! store runs it on a fake clock; the Redis store with the fake clock passed to its script.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::num::NonZeroU32;
use std::time::Duration;

use keygate::clock::FakeClock;
use keygate::ratelimit::{Decision, Quota};

/// A limiter store under test, keyed by strings.
pub trait Subject {
    /// Decides one request (a store error fails the test).
    fn decide(&self, key: &str, quotas: &[Quota], cost: u32) -> impl Future<Output = Decision>;
    /// Gives tokens back and waits until they are back.
    fn refund(&self, key: &str, quotas: &[Quota], cost: u32) -> impl Future<Output = ()>;
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

pub fn per_minute(n: u32) -> Quota {
    Quota::per_minute(nz(n))
}

pub fn per_second(n: u32) -> Quota {
    Quota::per_second(nz(n))
}

/// The fake clock every suite starts from.
pub fn clock() -> FakeClock {
    FakeClock::new(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

async fn admitted(s: &impl Subject, key: &str, quotas: &[Quota], cost: u32, tries: u32) -> u32 {
    let mut n = 0;
    for _ in 0..tries {
        if s.decide(key, quotas, cost).await.allowed {
            n += 1;
        }
    }
    n
}

/// A fresh bucket admits exactly its capacity, and the numbers say so at each step.
pub async fn capacity_and_numbers(s: &impl Subject, _c: &FakeClock) {
    let q = [per_minute(60)];
    let first = s.decide("cap", &q, 1).await;
    assert!(first.allowed);
    assert_eq!(first.numbers.limit, 60);
    assert_eq!(first.numbers.remaining, 59);
    assert_eq!(first.numbers.reset, 1_700_000_001);
    assert_eq!(first.numbers.retry_after, 0);
    assert_eq!(first.reset_in, 1);
    assert_eq!(first.quota, q[0]);
    assert_eq!(admitted(s, "cap", &q, 1, 100).await, 59);
    let refused = s.decide("cap", &q, 1).await;
    assert!(!refused.allowed);
    assert_eq!(refused.numbers.remaining, 0);
    assert_eq!(refused.numbers.retry_after, 1);
    assert_eq!(refused.numbers.reset, 1_700_000_060);
    assert_eq!(refused.reset_in, 60);
}

/// A refusal takes nothing: one interval later exactly one token is back.
pub async fn a_refusal_takes_nothing(s: &impl Subject, c: &FakeClock) {
    let q = [per_minute(3)];
    assert_eq!(admitted(s, "refuse", &q, 1, 10).await, 3);
    c.advance(Duration::from_millis(19_999));
    assert!(!s.decide("refuse", &q, 1).await.allowed, "a ms early");
    c.advance(Duration::from_millis(1));
    assert_eq!(admitted(s, "refuse", &q, 1, 10).await, 1);
}

/// Every window must admit; a refusal by one takes nothing from the others.
pub async fn every_window_must_admit(s: &impl Subject, c: &FakeClock) {
    let q = [per_second(10), per_minute(15)];
    assert_eq!(admitted(s, "windows", &q, 1, 20).await, 10);
    c.advance(Duration::from_secs(1));
    assert_eq!(
        admitted(s, "windows", &q, 1, 20).await,
        5,
        "the minute caps at 15"
    );
    let d = s.decide("windows", &q, 1).await;
    assert!(!d.allowed);
    assert_eq!(d.quota, q[1], "the refusing window is reported");
    assert_eq!(
        d.numbers.retry_after, 3,
        "15 a minute: a token every 4 s, 1 s in"
    );
}

/// A cost takes that many tokens; a cost above the capacity never passes, takes nothing
/// and is told to wait a whole period.
pub async fn costs(s: &impl Subject, _c: &FakeClock) {
    let q = [per_second(10)];
    let d = s.decide("cost", &q, 4).await;
    assert!(d.allowed);
    assert_eq!(d.numbers.remaining, 6);
    assert_eq!(admitted(s, "cost", &q, 4, 5).await, 1);
    assert!(s.decide("cost", &q, 2).await.allowed);
    let big = s.decide("cost-big", &q, 11).await;
    assert!(!big.allowed);
    assert_eq!(big.numbers.remaining, 10);
    assert_eq!(big.numbers.retry_after, 1);
    assert_eq!(
        admitted(s, "cost-big", &q, 10, 2).await,
        1,
        "nothing was taken"
    );
}

/// Refunds give tokens back to every window, never above full.
pub async fn refunds(s: &impl Subject, _c: &FakeClock) {
    let q = [per_second(5), per_minute(100)];
    assert_eq!(admitted(s, "refund", &q, 1, 10).await, 5);
    s.refund("refund", &q, 2).await;
    assert_eq!(admitted(s, "refund", &q, 1, 10).await, 2);
    s.refund("refund-fresh", &q, 3).await;
    assert_eq!(
        admitted(s, "refund-fresh", &q, 1, 10).await,
        5,
        "a refund never fills a bucket above its capacity"
    );
}

/// Keys are isolated.
pub async fn keys_are_isolated(s: &impl Subject, _c: &FakeClock) {
    let q = [per_minute(2)];
    assert_eq!(admitted(s, "iso-a", &q, 1, 5).await, 2);
    assert_eq!(admitted(s, "iso-b", &q, 1, 5).await, 2);
}

/// A window listed twice is charged once.
pub async fn a_repeated_window_is_charged_once(s: &impl Subject, _c: &FakeClock) {
    let q = [per_minute(4), per_minute(4)];
    assert_eq!(admitted(s, "twice", &q, 1, 10).await, 4);
}

/// A burst above the rate: the burst at once, then the rate.
pub async fn burst_differs_from_rate(s: &impl Subject, c: &FakeClock) {
    let q = [per_minute(60).with_burst(nz(5))];
    assert_eq!(admitted(s, "burst", &q, 1, 10).await, 5);
    c.advance(Duration::from_secs(1));
    assert_eq!(admitted(s, "burst", &q, 1, 10).await, 1);
}

/// A clock that steps back an hour leaves the bucket empty, refilling from there: not
/// locked for an hour.
pub async fn a_clock_stepping_back_does_not_lock_out(s: &impl Subject, c: &FakeClock) {
    let q = [per_minute(60)];
    assert_eq!(admitted(s, "back", &q, 1, 100).await, 60);
    c.rewind(Duration::from_secs(3600));
    let d = s.decide("back", &q, 1).await;
    assert!(!d.allowed);
    assert_eq!(d.numbers.retry_after, 1);
    c.advance(Duration::from_secs(1));
    assert!(s.decide("back", &q, 1).await.allowed);
    c.advance(Duration::from_secs(3600));
}

/// A day window, with refills over hours.
pub async fn a_day_window(s: &impl Subject, c: &FakeClock) {
    let q = [Quota::per_day(nz(1000))];
    assert_eq!(admitted(s, "day", &q, 1, 1001).await, 1000);
    let d = s.decide("day", &q, 1).await;
    assert_eq!(d.numbers.retry_after, 87, "86.4 s rounded up");
    assert_eq!(d.numbers.reset, 1_700_000_000 + 86_400);
    c.advance(Duration::from_secs(864));
    assert_eq!(admitted(s, "day", &q, 1, 20).await, 10);
}

/// The decisions of a mixed sequence, to compare between stores.
pub async fn transcript(s: &impl Subject, c: &FakeClock, key: &str) -> Vec<Decision> {
    let q = [
        per_second(7),
        per_minute(100),
        per_minute(30).with_burst(nz(12)),
    ];
    let mut out = Vec::new();
    for i in 0..200u32 {
        let cost = 1 + i % 3;
        out.push(s.decide(key, &q, cost).await);
        if i % 5 == 0 {
            c.advance(Duration::from_millis(u64::from(137 * (i % 11))));
        }
        if i % 17 == 0 {
            s.refund(key, &q, 1).await;
        }
    }
    out
}

/// Declares the suite's tests in a test file, given an async function returning the
/// subject and its clock.
#[macro_export]
macro_rules! limiter_conformance {
    ($make:path) => {
        mod conformance_suite {
            use super::*;
            #[tokio::test]
            async fn capacity_and_numbers() {
                let (s, c) = $make().await;
                limiter_conformance::capacity_and_numbers(&s, &c).await;
            }
            #[tokio::test]
            async fn a_refusal_takes_nothing() {
                let (s, c) = $make().await;
                limiter_conformance::a_refusal_takes_nothing(&s, &c).await;
            }
            #[tokio::test]
            async fn every_window_must_admit() {
                let (s, c) = $make().await;
                limiter_conformance::every_window_must_admit(&s, &c).await;
            }
            #[tokio::test]
            async fn costs() {
                let (s, c) = $make().await;
                limiter_conformance::costs(&s, &c).await;
            }
            #[tokio::test]
            async fn refunds() {
                let (s, c) = $make().await;
                limiter_conformance::refunds(&s, &c).await;
            }
            #[tokio::test]
            async fn keys_are_isolated() {
                let (s, c) = $make().await;
                limiter_conformance::keys_are_isolated(&s, &c).await;
            }
            #[tokio::test]
            async fn a_repeated_window_is_charged_once() {
                let (s, c) = $make().await;
                limiter_conformance::a_repeated_window_is_charged_once(&s, &c).await;
            }
            #[tokio::test]
            async fn burst_differs_from_rate() {
                let (s, c) = $make().await;
                limiter_conformance::burst_differs_from_rate(&s, &c).await;
            }
            #[tokio::test]
            async fn a_clock_stepping_back_does_not_lock_out() {
                let (s, c) = $make().await;
                limiter_conformance::a_clock_stepping_back_does_not_lock_out(&s, &c).await;
            }
            #[tokio::test]
            async fn a_day_window() {
                let (s, c) = $make().await;
                limiter_conformance::a_day_window(&s, &c).await;
            }
        }
    };
}
