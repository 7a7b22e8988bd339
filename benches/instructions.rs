#![allow(missing_docs)]
//! Instructions per request, counted by valgrind rather than timed: steady on a noisy
//! machine, and the same for the same binary and inputs. Run through
//! `bash scripts/instructions.sh`, which builds this in release and runs it under
//! callgrind counting only inside [`measured`] (N requests), and prints the count divided
//! by N.
//!
//! `instructions N MODE KEYS`: N requests through `MODE`, cycling through KEYS keys with a
//! large stride:
//! - `bare`: the service alone;
//! - `x-api-key`, `bearer`: keygate's auth layer over a warm `CachedLookup`, the key sent
//!   that way;
//! - `stack`: `Keygate` (auth, per-key limit, `X-RateLimit-*` headers) over the same;
//! - `governor`: tower_governor keyed by the `x-api-key` header, its headers on.
//!
//! Without arguments (as `cargo test --benches` runs it) a few requests of each mode, so
//! that it cannot rot.

use std::convert::Infallible;
use std::future::{ready, Future, IntoFuture, Ready};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keygate::key::Environment;
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::ratelimit::Quota;
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::validate::PeerAddr;
use keygate::{AuthLayer, Keygate};
use tower::{Layer, Service};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

type Body = Full<Bytes>;

/// The service every mode wraps. It answers with axum's body, which tower_governor's
/// rejections convert into, so all modes run the same inner service.
fn bare(_: Request<Body>) -> Ready<Result<Response<axum::body::Body>, Infallible>> {
    ready(Ok(Response::new(axum::body::Body::empty())))
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

fn status<S, B>(svc: &mut S, req: Request<Body>) -> StatusCode
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    now(std::future::poll_fn(|cx| svc.poll_ready(cx))).expect("ready");
    now(svc.call(req)).expect("response").status()
}

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

fn run(n: usize, mode: &str, keys: usize) {
    let store = MemoryStore::new();
    let secrets: Vec<String> = (0..keys.max(1))
        .map(|_| {
            store
                .issue(Owner::new("o", "o"), Environment::Live, |r| r)
                .expect("key")
                .expose_secret()
                .to_owned()
        })
        .collect();
    let lookup = CachedLookup::builder(store.clone())
        .capacity(keys.max(1) * 2)
        .ttl(Duration::from_secs(3600))
        .build()
        .expect("cache");
    for secret in &secrets {
        let hash = keygate::key::KeyHash::of(secret);
        now(lookup.lookup(&hash.into()).into_future()).expect("warm");
    }
    // The quota of benches/ratelimit.rs (see there): with few keys a million over 100 ms
    // (the coarse clock moves every few milliseconds, so the burst must outlast a tick's
    // requests), with many 1000, a token back every other visit.
    let (burst, period) = if keys <= 64 {
        (1_000_000u32, Duration::from_millis(100))
    } else {
        (
            1000,
            Duration::from_millis(2) * u32::try_from(keys).expect("keys"),
        )
    };
    let never = Quota::new(NonZeroU32::new(burst).expect("burst"), period).expect("quota");
    let mut auth = AuthLayer::new(lookup.clone()).layer(tower::service_fn(bare));
    // The bucket store's cap four times the keys (at least its default million): a
    // deployment with a million keys in use sizes it above them (see benches/ratelimit.rs).
    let buckets = keygate::ratelimit::MemoryLimiter::builder()
        .max_buckets((keys * 4).max(1_000_000))
        .build()
        .expect("limiter");
    let mut stack = Keygate::builder(lookup)
        .default_quota(never)
        .limiter_store(buckets)
        .build()
        .expect("keygate")
        .layer(tower::service_fn(bare));
    // Built only when measured: governor's clock (quanta) calibrates itself for a while on
    // first use.
    let mut governor = (mode == "governor").then(|| {
        let config = GovernorConfigBuilder::default()
            .per_nanosecond(u64::try_from((period / burst).as_nanos()).expect("ns"))
            .burst_size(burst)
            .key_extractor(HeaderKey)
            .use_headers()
            .finish()
            .expect("governor");
        GovernorLayer::new(config).layer(tower::service_fn(bare))
    });
    let mut plain = tower::service_fn(bare);
    let peer: SocketAddr = "198.51.100.1:4000".parse().expect("peer");
    let request = |secret: &str| {
        let (name, value) = match mode {
            "bearer" => ("authorization", format!("Bearer {secret}")),
            _ => ("x-api-key", secret.to_owned()),
        };
        let mut req = Request::get("/v1/health")
            .header(name, value)
            .header("user-agent", "bench/1.0")
            .header("accept", "application/json")
            .body(Body::default())
            .expect("request");
        req.extensions_mut().insert(PeerAddr(peer));
        req
    };
    let mut one = |secret: &str| {
        let req = request(secret);
        let answer = match (mode, governor.as_mut()) {
            ("bare", _) => status(&mut plain, req),
            ("stack", _) => status(&mut stack, req),
            ("governor", Some(governor)) => status(governor, req),
            _ => status(&mut auth, req),
        };
        answer == StatusCode::OK
    };
    // Every bucket and cache entry made before counting starts.
    for secret in &secrets {
        assert!(one(secret), "warm-up request admitted");
    }
    let ok = measured(n, |i| one(&secrets[i % secrets.len()]));
    assert_eq!(ok, n, "every request admitted");
}

/// The counted part: `n` requests, visiting the keys with a large stride. The script counts
/// only the instructions inside this function (callgrind's `--toggle-collect`), so set-up
/// and one-off work outside it never blur the figure.
#[inline(never)]
fn measured(n: usize, mut one: impl FnMut(usize) -> bool) -> usize {
    let mut ok = 0usize;
    let mut i = 0usize;
    for _ in 0..n {
        i = i.wrapping_add(7919);
        ok += usize::from(one(i));
    }
    ok
}

/// The size of a service's future, of its request and response: what is moved on the way
/// in and out (`instructions sizes`).
fn future_size<S: Service<Request<Body>>>(_: &S) -> usize {
    std::mem::size_of::<S::Future>()
}

fn sizes() {
    let lookup = CachedLookup::new(MemoryStore::new());
    let auth = AuthLayer::new(lookup.clone()).layer(tower::service_fn(bare));
    let layer = Keygate::builder(lookup).build().expect("keygate");
    let stack = layer.layer(tower::service_fn(bare));
    let limit = stack.get_ref();
    println!(
        "request                 {:4} bytes",
        std::mem::size_of::<Request<Body>>()
    );
    println!(
        "response (bare)         {:4} bytes",
        std::mem::size_of::<Response<axum::body::Body>>()
    );
    println!(
        "bare future             {:4} bytes",
        future_size(&tower::service_fn(bare))
    );
    println!("auth-only future        {:4} bytes", future_size(&auth));
    println!("rate-limit future       {:4} bytes", future_size(limit));
    println!("full stack future       {:4} bytes", future_size(&stack));
    println!(
        "ratelimit::Decision     {:4} bytes",
        std::mem::size_of::<keygate::ratelimit::Decision>()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [mode] if mode == "sizes" => sizes(),
        [n, mode, keys] => run(n.parse().expect("N"), mode, keys.parse().expect("KEYS")),
        [n, mode] => run(n.parse().expect("N"), mode, 1),
        _ => {
            for mode in ["bare", "x-api-key", "bearer", "stack", "governor"] {
                run(10, mode, 3);
            }
        }
    }
}
