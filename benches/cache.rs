#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Why `CachedLookup` sits on quick_cache: a hit on 10 000 cached keys with moka's and
//! quick_cache's synchronous caches, and through `CachedLookup`, in one run; and a million
//! keys in use in turn through a cache of fixed size (100 000, the old default) and through
//! one that grows to hold them (the default): `cargo bench --bench cache`.
//! `KEYGATE_BENCH_KEYS=N` sets the keys in use of the second group (default 1 000 000).

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keygate::key::Environment;
use keygate::key::{ApiKey, KeyHash, KeyId};
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::record::{KeyRecord, Owner};
use keygate::store::MemoryStore;

const KEYS: usize = 10_000;

fn caches(c: &mut Criterion) {
    let record = Arc::new(KeyRecord::new(
        KeyId::new("key_1"),
        Owner::new("o", "o"),
        Environment::Live,
    ));
    let store = MemoryStore::new();
    let secrets: Vec<ApiKey> = (0..KEYS)
        .map(|_| {
            store
                .issue(Owner::new("o", "o"), Environment::Live, |r| r)
                .expect("key")
        })
        .collect();
    let hashes: Vec<KeyHash> = secrets.iter().map(ApiKey::hash).collect();

    let moka: moka::sync::Cache<KeyHash, Option<Arc<KeyRecord>>> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(Duration::from_secs(30))
        .build();
    let quick: quick_cache::sync::Cache<KeyHash, Option<Arc<KeyRecord>>> =
        quick_cache::sync::Cache::new(100_000);
    for hash in &hashes {
        moka.insert(*hash, Some(Arc::clone(&record)));
        quick.insert(*hash, Some(Arc::clone(&record)));
    }
    let cached = CachedLookup::new(store.clone());
    for secret in &secrets {
        let _ = cached.lookup(&secret.presented()).now().ok();
    }
    moka.run_pending_tasks();

    let mut group = c.benchmark_group("cache hit, 10k keys");
    let mut i = 0usize;
    let mut next_index = || {
        i = (i + 7919) % KEYS;
        i
    };
    group.bench_function("moka::sync::Cache::get", |b| {
        b.iter(|| black_box(moka.get(&hashes[next_index()])))
    });
    group.bench_function("quick_cache::sync::Cache::get", |b| {
        b.iter(|| black_box(quick.get(&hashes[next_index()])))
    });
    // From the secret, as the auth layer calls them: the cache fingerprints the secret
    // (SipHash), the store hashes it (SHA-256).
    group.bench_function("CachedLookup::lookup (fingerprint + get)", |b| {
        b.iter(|| {
            let key = secrets[next_index()].presented();
            black_box(cached.lookup(&key).now().ok().map(|r| r.is_ok()))
        })
    });
    group.bench_function("MemoryStore (SHA-256 + RwLock<HashMap>)", |b| {
        b.iter(|| {
            let key = secrets[next_index()].presented();
            black_box(store.lookup(&key).now().ok().map(|r| r.is_ok()))
        })
    });
    group.finish();
}

/// Looks `key` up, awaiting a miss (over a `MemoryStore`, it completes in one poll).
fn look(cache: &CachedLookup<MemoryStore>, key: &ApiKey) -> bool {
    match cache.lookup(&key.presented()).now() {
        Ok(hit) => hit.is_ok_and(|r| r.is_some()),
        Err(miss) => {
            let mut cx = Context::from_waker(Waker::noop());
            match pin!(miss).poll(&mut cx) {
                Poll::Ready(answer) => answer.is_ok_and(|r| r.is_some()),
                Poll::Pending => panic!("a miss over a MemoryStore completes in one poll"),
            }
        }
    }
}

/// Keys in use, visited in turn, more than the old fixed default of 100 000 entries.
fn working_set(c: &mut Criterion) {
    let n: usize = std::env::var("KEYGATE_BENCH_KEYS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1_000_000);
    let store = MemoryStore::new();
    let secrets: Vec<ApiKey> = (0..n)
        .map(|_| {
            store
                .issue(Owner::new("o", "o"), Environment::Live, |r| r)
                .expect("key")
        })
        .collect();
    let fixed = CachedLookup::builder(store.clone())
        .max_capacity(100_000)
        .build()
        .expect("cache");
    let growing = CachedLookup::new(store.clone());
    let mut group = c.benchmark_group(format!("{n} keys in use, in turn"));
    for (name, cache) in [
        ("CachedLookup fixed at 100 000 entries", &fixed),
        ("CachedLookup, default (grows to 1 000 000)", &growing),
    ] {
        // Three rounds over every key: time for the growing cache to grow.
        for _ in 0..3 {
            for secret in &secrets {
                assert!(look(cache, secret));
            }
        }
        eprintln!("{name}: {} entries of room", cache.capacity());
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                black_box(look(cache, &secrets[i]))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, caches, working_set);
criterion_main!(benches);
