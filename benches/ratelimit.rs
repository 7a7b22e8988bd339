#![allow(missing_docs)] // criterion_group! generates undocumented items
//! The full keygate stack (auth on a cache hit, per-key rate limit, headers) beside
//! tower_governor keyed by the same header with its headers on, in one run:
//! `cargo bench --bench ratelimit`.
//!
//! - one key, 10 000 keys and 1 000 000 keys (requests cycle through the keys with a large
//!   stride, so consecutive requests touch different buckets);
//! - two threads on one key and on distinct keys, beside one thread.
//!
//! Both limiters get the same quota (see `burst` and `period`): refilled fast enough that
//! nothing is refused (the admitted path is what is measured). With 10 000 keys a bucket
//! stays tracked between visits; with a million a visit comes every few seconds, longer
//! than a token takes to come back, so many buckets are full again when visited: keygate's
//! store drops full buckets and makes them again (as it does at a production API's 60 a
//! minute per key), governor's keeps them.
//!
//! "keygate auth + one bucket for every key" puts every request in one bucket: the full
//! stack as it would cost if finding a key's bucket cost nothing, the ceiling of issue 8's
//! lever "one lookup for the record and its bucket".
//! Futures are polled with a no-op waker (every path here completes in one poll).

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Body as AxumBody;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{Request, Response};
use keygate::key::Environment;
use keygate::lookup::CachedLookup;
use keygate::ratelimit::Quota;
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::validate::PeerAddr;
use keygate::Keygate;
use tower::{Layer, Service};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

type ReqBody = String;

fn bare(_: Request<ReqBody>) -> Ready<Result<Response<AxumBody>, Infallible>> {
    ready(Ok(Response::new(AxumBody::empty())))
}

fn drive<S>(svc: &mut S, req: Request<ReqBody>) -> S::Response
where
    S: Service<Request<ReqBody>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("service not ready"),
    }
    match pin!(svc.call(req)).poll(&mut cx) {
        Poll::Ready(Ok(res)) => res,
        _ => panic!("future did not complete in one poll"),
    }
}

/// A request as a server hands it over: headers, and the peer address in the extensions
/// (axum's `ConnectInfo` and tonic's `TcpConnectInfo` are always there in a real server).
fn request(key: &str) -> Request<ReqBody> {
    let mut req = Request::get("/v1/health")
        .header("x-api-key", key)
        .header("user-agent", "bench/1.0")
        .header("accept", "application/json")
        .body(String::new())
        .expect("request");
    req.extensions_mut().insert(PeerAddr(PEER));
    req
}

const PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 40_000);

/// tower_governor keyed by the `x-api-key` header.
#[derive(Clone)]
struct HeaderKey;

impl KeyExtractor for HeaderKey {
    type Key = String;

    fn extract<T>(&self, req: &Request<T>) -> Result<String, GovernorError> {
        req.headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

type Bare =
    tower::util::ServiceFn<fn(Request<ReqBody>) -> Ready<Result<Response<AxumBody>, Infallible>>>;
type Stack = keygate::AuthService<
    keygate::ratelimit::RateLimitService<
        Bare,
        keygate::ratelimit::PerKey,
        keygate::ratelimit::MemoryLimiter<keygate::keygate::KeyBucket>,
    >,
    CachedLookup<MemoryStore>,
>;

type AuthOnly = keygate::AuthService<Bare, CachedLookup<MemoryStore>>;

/// Every request in one bucket: what the full stack would cost if finding a key's bucket
/// cost nothing (the ceiling of issue 8's lever "one lookup for the record and its bucket").
type OneBucketFn = fn(&keygate::head::RequestHead<'_>) -> Option<u8>;
type OneBucket = keygate::AuthService<
    keygate::ratelimit::RateLimitService<Bare, OneBucketFn, keygate::ratelimit::MemoryLimiter<u8>>,
    CachedLookup<MemoryStore>,
>;

fn one_bucket(_: &keygate::head::RequestHead<'_>) -> Option<u8> {
    Some(0)
}

struct Fixture {
    keys: Vec<String>,
    keygate: Stack,
    auth: AuthOnly,
    one_bucket: OneBucket,
}

fn fixture(n: usize) -> Fixture {
    let store = MemoryStore::new();
    let keys: Vec<String> = (0..n)
        .map(|_| {
            store
                .issue(Owner::new("o", "o"), Environment::Live, |r| r)
                .expect("key")
                .expose_secret()
                .to_owned()
        })
        .collect();
    let lookup = CachedLookup::builder(store)
        .capacity(n * 2)
        .ttl(Duration::from_secs(3600))
        .build()
        .expect("cache");
    let auth = keygate::AuthLayer::new(lookup.clone()).layer(tower::service_fn(bare as fn(_) -> _));
    let limit = keygate::ratelimit::RateLimitLayer::builder(
        one_bucket as OneBucketFn,
        keygate::ratelimit::MemoryLimiter::new(),
    )
    .quota(quota(1))
    .build()
    .expect("limit");
    let one_bucket = keygate::AuthLayer::new(lookup.clone())
        .layer(limit.layer(tower::service_fn(bare as fn(_) -> _)));
    // The bucket store's cap four times the keys (at least its default million): a
    // deployment with a million keys in use sizes it above them. At its default cap of a
    // million, the store past half its cap sweeps a shard every 1024 new buckets, and with
    // every bucket in use it would refuse new keys.
    let buckets = keygate::ratelimit::MemoryLimiter::builder()
        .max_buckets((n * 4).max(1_000_000))
        .build()
        .expect("limiter");
    let layer = Keygate::builder(lookup)
        .default_quota(quota(n))
        .limiter_store(buckets)
        .build()
        .expect("keygate");
    let mut keygate = layer.layer(tower::service_fn(bare as fn(_) -> _));
    // Warm the cache and create every bucket.
    for key in &keys {
        let res = drive(&mut keygate, request(key));
        assert_eq!(res.status(), 200);
    }
    Fixture {
        keys,
        keygate,
        auth,
        one_bucket,
    }
}

fn governor(
    keys: &[String],
) -> impl Service<Request<ReqBody>, Response = Response<AxumBody>, Error = Infallible> + Clone + Send
{
    let replenish = period(keys.len()) / burst(keys.len());
    let config = GovernorConfigBuilder::default()
        .per_nanosecond(u64::try_from(replenish.as_nanos()).expect("ns"))
        .burst_size(burst(keys.len()))
        .key_extractor(HeaderKey)
        .use_headers()
        .finish()
        .expect("governor config");
    let mut svc = GovernorLayer::new(config).layer(tower::service_fn(bare));
    for key in keys {
        let res = drive(&mut svc, request(key));
        assert_eq!(res.status(), 200);
    }
    svc
}

fn keys_scaling(c: &mut Criterion) {
    // KEYGATE_BENCH_KEYS=1,10000 skips the slow 1 000 000-key set-up.
    let sizes: Vec<usize> = std::env::var("KEYGATE_BENCH_KEYS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 10_000, 1_000_000]);
    for n in sizes {
        let Fixture {
            keys,
            mut keygate,
            mut auth,
            mut one_bucket,
        } = fixture(n);
        let mut gov = governor(&keys);
        let mut bare_svc = tower::service_fn(bare);
        let mut group = c.benchmark_group(format!("ratelimit/{n} keys"));
        let mut i = 0usize;
        let mut next = || {
            i = (i + 7919) % keys.len();
            request(&keys[i])
        };
        group.bench_function("bare service", |b| {
            b.iter_batched(
                &mut next,
                |req| drop(black_box(drive(&mut bare_svc, req))),
                BatchSize::SmallInput,
            )
        });
        group.bench_function("tower_governor (headers on)", |b| {
            b.iter_batched(
                &mut next,
                |req| drop(black_box(drive(&mut gov, req))),
                BatchSize::SmallInput,
            )
        });
        group.bench_function("keygate auth only (no limit)", |b| {
            b.iter_batched(
                &mut next,
                |req| drop(black_box(drive(&mut auth, req))),
                BatchSize::SmallInput,
            )
        });
        group.bench_function("keygate full stack", |b| {
            b.iter_batched(
                &mut next,
                |req| drop(black_box(drive(&mut keygate, req))),
                BatchSize::SmallInput,
            )
        });
        group.bench_function("keygate auth + one bucket for every key (ceiling)", |b| {
            b.iter_batched(
                &mut next,
                |req| drop(black_box(drive(&mut one_bucket, req))),
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }
}

/// Per-request time with `threads` threads each sending `iters` requests at once
/// (request construction included, for every variant alike).
fn threaded<S>(svc: &S, keys: &[Vec<String>], iters: u64) -> Duration
where
    S: Service<Request<ReqBody>> + Clone + Send,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    std::thread::scope(|scope| {
        for thread_keys in keys {
            let mut svc = svc.clone();
            scope.spawn(move || {
                for i in 0..iters as usize {
                    black_box(drive(
                        &mut svc,
                        request(&thread_keys[i % thread_keys.len()]),
                    ));
                }
            });
        }
    });
    start.elapsed()
}

fn threads(c: &mut Criterion) {
    let Fixture { keys, keygate, .. } = fixture(64);
    let gov = governor(&keys);
    let one = vec![keys[..1].to_vec()];
    let same = vec![keys[..1].to_vec(), keys[..1].to_vec()];
    let distinct = vec![keys[..32].to_vec(), keys[32..].to_vec()];
    let mut group = c.benchmark_group("ratelimit/threads");
    for (name, split) in [
        ("1 thread", &one),
        ("2 threads, one key", &same),
        ("2 threads, distinct keys", &distinct),
    ] {
        group.bench_function(format!("keygate full stack, {name}"), |b| {
            b.iter_custom(|iters| threaded(&keygate, split, iters))
        });
        group.bench_function(format!("tower_governor, {name}"), |b| {
            b.iter_custom(|iters| threaded(&gov, split, iters))
        });
    }
    let bare_svc = tower::service_fn(bare);
    group.bench_function("bare service, 1 thread", |b| {
        b.iter_custom(|iters| threaded(&bare_svc, &one, iters))
    });
    group.bench_function("bare service, 2 threads", |b| {
        b.iter_custom(|iters| threaded(&bare_svc, &same, iters))
    });
    group.finish();
    let _ = Arc::new(());
}

fn breakdown(c: &mut Criterion) {
    use keygate::key::KeyId;
    use keygate::ratelimit::{HeaderStyle, MemoryLimiter};
    let quota = [quota(1)];
    let limiter = MemoryLimiter::new();
    let key: keygate::keygate::KeyBucket = (KeyId::new("key_0123456789abcdef"), None);
    let decision = limiter.decide(&key, &quota, 1).expect("decide");
    let many: Vec<keygate::keygate::KeyBucket> = (0..10_000)
        .map(|i| (KeyId::new(format!("key_{i:016}")), None))
        .collect();
    for k in &many {
        limiter.decide(k, &quota, 1).expect("decide");
    }
    let mut group = c.benchmark_group("ratelimit/breakdown");
    group.bench_function("MemoryLimiter::decide, one key", |b| {
        b.iter(|| black_box(limiter.decide(black_box(&key), &quota, 1)))
    });
    let mut i = 0usize;
    group.bench_function("MemoryLimiter::decide, 10 000 keys", |b| {
        b.iter(|| {
            i = (i + 7919) % many.len();
            black_box(limiter.decide(black_box(&many[i]), &quota, 1))
        })
    });
    group.bench_function("legacy headers onto an empty response", |b| {
        b.iter(|| {
            let mut res = Response::new(());
            HeaderStyle::Legacy.apply(black_box(&decision), res.headers_mut());
            res
        })
    });
    group.bench_function("empty response", |b| {
        b.iter(|| black_box(Response::new(())))
    });
    group.bench_function("3 static headers onto an empty response", |b| {
        b.iter(|| {
            let mut res = Response::new(());
            let h = res.headers_mut();
            h.insert("x-ratelimit-limit", http::HeaderValue::from_static("60"));
            h.insert(
                "x-ratelimit-remaining",
                http::HeaderValue::from_static("59"),
            );
            h.insert(
                "x-ratelimit-reset",
                http::HeaderValue::from_static("1700000000"),
            );
            black_box(res)
        })
    });
    group.bench_function("HeaderValue::from(u64)", |b| {
        b.iter(|| black_box(http::HeaderValue::from(black_box(1_700_000_000u64))))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = keys_scaling, threads, breakdown
}
criterion_main!(benches);

/// The quota both limiters get, `burst(keys)` requests refilled over `period(keys)`.
///
/// With one key (or a few, each sent at over a million requests a second): a million
/// over 100 ms. keygate's default clock is coarse (it moves every few milliseconds), so
/// the burst must outlast the requests of one tick; the refill is ten times the request
/// rate: nothing is refused. With many keys, each visited once every `keys` requests:
/// 1000, as a real API would set, a token back every other visit, so the bucket is never
/// full between visits and stays tracked as real buckets do.
fn burst(keys: usize) -> u32 {
    if keys <= 64 {
        1_000_000
    } else {
        1000
    }
}

fn period(keys: usize) -> Duration {
    if keys <= 64 {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(2) * u32::try_from(keys).expect("keys")
    }
}

fn quota(keys: usize) -> Quota {
    Quota::new(NonZeroU32::new(burst(keys)).expect("burst"), period(keys)).expect("quota")
}
