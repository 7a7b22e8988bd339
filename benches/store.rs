#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Key lookups on SQLite and PostgreSQL, with and without `CachedLookup`, in one run:
//! `cargo bench --features sqlite,postgres --bench store`. PostgreSQL is measured when
//! `KEYGATE_BENCH_POSTGRES_URL` (or `KEYGATE_TEST_POSTGRES_URL`) names a database the
//! bench may fill; the SQLite file goes to the temp directory.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keygate::key::Environment;
use keygate::key::KeyHash;
use keygate::lookup::{CachedLookup, KeyLookup};
use std::future::IntoFuture;

use keygate::store::{MemoryStore, NewKey, OwnerStore, SqlStore};

const KEYS: usize = 1000;

async fn fill<S: OwnerStore>(store: &S) -> Vec<KeyHash> {
    let owner = format!("bench{}", std::process::id());
    store.add_owner(&owner, None).await.expect("owner");
    let mut hashes = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        let created = store
            .create(NewKey::new(
                owner.as_str(),
                format!("k{i}"),
                Environment::Live,
            ))
            .await
            .expect("create");
        hashes.push(created.secret.hash());
    }
    hashes
}

fn bench_store<S: OwnerStore>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: S,
) {
    let hashes = rt.block_on(fill(&store));
    let cached = CachedLookup::over_store(store.clone());
    let mut group = c.benchmark_group(format!("store lookup/{name}"));
    let mut i = 0usize;
    group.bench_function("direct", |b| {
        b.iter(|| {
            i = (i + 7) % KEYS;
            black_box(
                rt.block_on(store.lookup(&hashes[i].into()).into_future())
                    .is_ok(),
            )
        })
    });
    for hash in &hashes {
        let key = (*hash).into();
        rt.block_on(cached.lookup(&key).into_future())
            .expect("warm");
        // What is measured below must be hits, not fast misses.
        assert!(matches!(cached.lookup(&key).now().ok(), Some(Ok(Some(_)))));
    }
    group.bench_function("CachedLookup, warm", |b| {
        b.iter(|| {
            i = (i + 7) % KEYS;
            black_box(
                cached
                    .lookup(&hashes[i].into())
                    .now()
                    .ok()
                    .map(|r| r.is_ok()),
            )
        })
    });
    group.finish();
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    bench_store(c, &rt, "memory", MemoryStore::new());
    let path = std::env::temp_dir().join(format!("keygate-bench-{}.db", std::process::id()));
    let sqlite = rt
        .block_on(SqlStore::connect(&format!("sqlite://{}", path.display())))
        .expect("sqlite");
    bench_store(c, &rt, "sqlite", sqlite);
    let _ = std::fs::remove_file(&path);
    let pg = std::env::var("KEYGATE_BENCH_POSTGRES_URL")
        .or_else(|_| std::env::var("KEYGATE_TEST_POSTGRES_URL"));
    match pg {
        Ok(url) => {
            let store = rt.block_on(SqlStore::connect(&url)).expect("postgres");
            bench_store(c, &rt, "postgres", store);
        }
        Err(_) => eprintln!("PostgreSQL skipped: set KEYGATE_BENCH_POSTGRES_URL"),
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = stores
}
criterion_main!(benches);
