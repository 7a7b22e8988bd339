#![allow(missing_docs)] // criterion_group! generates undocumented items
//! The cost keygate's auth layer adds to a request, beside tower-http's static bearer check,
//! in one run: `cargo bench --bench auth`.
//!
//! Futures are polled with a no-op waker (every path measured here completes in one poll),
//! so no runtime overhead hides in the figures. Requests are built outside the timed part.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use keygate::extract::Extractor;
use keygate::key::Environment;
use keygate::key::{KeyFormat, KeyHash, PresentedKey};
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::validate::PeerAddr;
use keygate::AuthLayer;
use tower::{Layer, Service};
use tower_http::validate_request::ValidateRequestHeaderLayer;

type Body = Full<Bytes>;

fn bare(_: Request<Body>) -> Ready<Result<Response<Body>, Infallible>> {
    ready(Ok(Response::new(Body::default())))
}

/// Drives one request through a service whose future completes at once.
fn drive<S>(svc: &mut S, req: Request<Body>) -> S::Response
where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("service not ready"),
    }
    let future = pin!(svc.call(req));
    match future.poll(&mut cx) {
        Poll::Ready(Ok(res)) => res,
        _ => panic!("future did not complete in one poll"),
    }
}

fn now<F: Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// A request as a server hands it over: headers, and the peer address in the extensions
/// (axum's `ConnectInfo` and tonic's `TcpConnectInfo` are always there in a real server).
fn request(header: &'static str, value: &str) -> Request<Body> {
    let mut req = Request::get("/v1/health")
        .header(header, value)
        .header("user-agent", "bench/1.0")
        .header("accept", "application/json")
        .body(Body::default())
        .expect("request");
    req.extensions_mut().insert(PeerAddr(PEER));
    req
}

const PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 40_000);

fn stacks(c: &mut Criterion) {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| {
            r.with_scopes(["read"])
        })
        .expect("key");
    let secret = key.expose_secret().to_owned();
    let bearer = format!("Bearer {secret}");
    let cached = CachedLookup::new(store.clone());
    // Warm the cache.
    let warm = now(std::future::IntoFuture::into_future(
        cached.lookup(&key.presented()),
    ));
    assert!(matches!(warm, Ok(Some(_))));

    let mut group = c.benchmark_group("auth");
    let mut svc = tower::service_fn(bare);
    group.bench_function("bare service", |b| {
        b.iter_batched(
            || request("x-api-key", &secret),
            |req| drop(black_box(drive(&mut svc, req))),
            BatchSize::SmallInput,
        )
    });
    // Deprecated upstream as "too basic": exactly the static comparison the aim is set against.
    #[allow(deprecated)]
    let mut svc = ValidateRequestHeaderLayer::bearer(&secret).layer(tower::service_fn(bare));
    group.bench_function("tower-http bearer (static)", |b| {
        b.iter_batched(
            || request("authorization", &bearer),
            |req| drop(black_box(drive(&mut svc, req))),
            BatchSize::SmallInput,
        )
    });
    let mut svc = AuthLayer::new(cached.clone()).layer(tower::service_fn(bare));
    group.bench_function("keygate cache hit (x-api-key)", |b| {
        b.iter_batched(
            || request("x-api-key", &secret),
            |req| drop(black_box(drive(&mut svc, req))),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("keygate cache hit (bearer)", |b| {
        b.iter_batched(
            || request("authorization", &bearer),
            |req| drop(black_box(drive(&mut svc, req))),
            BatchSize::SmallInput,
        )
    });
    let mut svc = AuthLayer::new(store.clone()).layer(tower::service_fn(bare));
    group.bench_function("keygate memory store (x-api-key)", |b| {
        b.iter_batched(
            || request("x-api-key", &secret),
            |req| drop(black_box(drive(&mut svc, req))),
            BatchSize::SmallInput,
        )
    });
    let mut svc = AuthLayer::new(cached.clone()).layer(tower::service_fn(bare));
    group.bench_function("keygate rejection (missing key)", |b| {
        b.iter_batched(
            || request("user-agent", "x"),
            |req| drop(black_box(drive(&mut svc, req))),
            BatchSize::SmallInput,
        )
    });
    group.finish();

    // Where the time of a cache hit goes.
    let mut group = c.benchmark_group("breakdown");
    let extractor = Extractor::default();
    let req = request("x-api-key", &secret);
    group.bench_function("extract (x-api-key)", |b| {
        b.iter(|| black_box(extractor.extract(black_box(&req)).map(|c| c.secret().len())))
    });
    let format = KeyFormat::default();
    group.bench_function("format + checksum check", |b| {
        b.iter(|| black_box(format.check(black_box(&secret))))
    });
    group.bench_function("sha-256 of the key", |b| {
        b.iter(|| black_box(KeyHash::of(black_box(&secret))))
    });
    group.bench_function("keyed fingerprint of the key (SipHash-2-4-128)", |b| {
        b.iter(|| black_box(PresentedKey::new(black_box(&secret))))
    });
    let presented = key.presented();
    group.bench_function("cache hit (fingerprint known)", |b| {
        b.iter(|| black_box(cached.lookup(black_box(&presented)).now().ok()))
    });
    group.bench_function("SystemTime::now", |b| {
        b.iter(|| black_box(std::time::SystemTime::now()))
    });
    group.bench_function("CoarseClock::now_nanos", |b| {
        b.iter(|| {
            black_box(keygate::clock::Clock::now_nanos(
                &keygate::clock::CoarseClock,
            ))
        })
    });
    group.bench_function("extensions insert (map holding the peer address)", |b| {
        b.iter_batched(
            || request("x-api-key", &secret),
            |mut req| {
                req.extensions_mut().insert(black_box(7u64));
                req
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, stacks);
criterion_main!(benches);
