//! Memory per tracked bucket: keygate's `MemoryLimiter` beside governor's keyed limiter
//! (what tower_governor uses), 1 000 000 keys each; and per entry of the key cache
//! (`CachedLookup`), 1 000 000 keys: `cargo bench --bench memory`.
//!
//! Resident memory is read from `/proc/self/statm` before and after the buckets are made;
//! the keys themselves are made beforehand and not counted (keygate's bucket key shares the
//! key id the record already holds).

use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use keygate::key::{Environment, KeyId};
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::ratelimit::{MemoryLimiter, Quota};
use keygate::record::Owner;
use keygate::store::MemoryStore;

const N: usize = 1_000_000;

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn per_key(before: usize, after: usize) -> f64 {
    after.saturating_sub(before) as f64 / N as f64
}

/// Each measurement runs in a process of its own: freed memory stays resident, so a second
/// measurement in the same process would reuse the first one's pages.
fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` asks benches to list or run tests: nothing to do.
    }
    match std::env::var("KEYGATE_MEMORY_MODE").ok().as_deref() {
        Some(mode) => measure(mode),
        None => {
            let exe = std::env::current_exe().expect("own path");
            for mode in ["keygate-1", "keygate-2", "governor", "cache"] {
                let status = std::process::Command::new(&exe)
                    .env("KEYGATE_MEMORY_MODE", mode)
                    .status()
                    .expect("run a measurement");
                assert!(status.success(), "{mode} failed");
            }
        }
    }
}

fn measure(mode: &str) {
    let nz = |n| NonZeroU32::new(n).expect("non-zero");
    // Windows slow enough that no bucket is full (and evicted) before the count is taken.
    let one = [Quota::per_day(nz(60))];
    let two = [Quota::per_hour(nz(10)), Quota::per_day(nz(1000))];

    let ids: Vec<(KeyId, Option<Arc<str>>)> = (0..N)
        .map(|i| (KeyId::new(format!("key_{i:016}")), None))
        .collect();
    let strings: Vec<String> = (0..N).map(|i| format!("kg_live_{i:030}")).collect();

    if mode == "cache" {
        return cache();
    }
    let before = rss_bytes();
    match mode {
        "keygate-1" | "keygate-2" => {
            let quotas: &[Quota] = if mode == "keygate-1" { &one } else { &two };
            let limiter = MemoryLimiter::builder()
                .max_buckets(2 * N)
                .build()
                .expect("cap");
            for id in &ids {
                black_box(limiter.decide(id, quotas, 1).expect("decide"));
            }
            assert_eq!(limiter.len(), N);
            println!(
                "keygate MemoryLimiter, {} window(s): {:6.1} bytes per tracked bucket",
                quotas.len(),
                per_key(before, rss_bytes())
            );
            black_box(limiter);
        }
        _ => {
            let governor = governor::RateLimiter::keyed(governor::Quota::per_minute(nz(60)));
            for key in &strings {
                black_box(governor.check_key(key).is_ok());
            }
            println!(
                "governor keyed limiter (String keys): {:6.1} bytes per tracked key (key clones included)",
                per_key(before, rss_bytes())
            );
            black_box(governor);
        }
    }
    black_box((ids, strings));
}

/// Bytes per entry of a `CachedLookup` holding 1 000 000 keys: the entry, its index line and
/// quick_cache's own. The records are the store's (a `MemoryStore` hands out its own `Arc`s)
/// and not counted; over an SQL store each cached record adds its own size.
fn cache() {
    let store = MemoryStore::new();
    let secrets: Vec<_> = (0..N)
        .map(|_| {
            store
                .issue(Owner::new("o", "o"), Environment::Live, |r| r)
                .expect("key")
        })
        .collect();
    let before = rss_bytes();
    let cache = CachedLookup::builder(store)
        .capacity(N)
        .max_capacity(N)
        .build()
        .expect("cache");
    let mut cx = Context::from_waker(Waker::noop());
    for secret in &secrets {
        if let Err(miss) = cache.lookup(&secret.presented()).now() {
            assert!(matches!(pin!(miss).poll(&mut cx), Poll::Ready(Ok(Some(_)))));
        }
    }
    assert!(cache.len() > N * 99 / 100, "{} cached", cache.len());
    println!(
        "keygate CachedLookup: {:6.1} bytes per cached key (records not counted)",
        after_per(before, rss_bytes(), cache.len())
    );
    black_box((cache, secrets));
}

fn after_per(before: usize, after: usize, n: usize) -> f64 {
    after.saturating_sub(before) as f64 / n as f64
}
