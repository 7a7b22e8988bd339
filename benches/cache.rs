#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Why `CachedLookup` sits on quick_cache: a hit on 10 000 cached keys with moka's and
//! quick_cache's synchronous caches, and through `CachedLookup`, in one run:
//! `cargo bench --bench cache`.

use std::hint::black_box;
use std::sync::Arc;
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

criterion_group!(benches, caches);
criterion_main!(benches);
