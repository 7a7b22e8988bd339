//! The failed-attempt lockout under attack: a bad neighbour behind a shared address, a burst
//! of concurrent made-up keys, deleted keys told from unknown ones, clients whose address
//! cannot be learned. Each test here failed on the lockout as it was first written.

mod common;

use common::capture::Capture;
use common::layered::{clock, nz, ok, unknown, Body};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use keygate::clock::{Clock, FakeClock};
use keygate::error::BoxError;
use keygate::key::Environment;
use keygate::key::{ApiKey, KeyHash};
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::ratelimit::Quota;
use keygate::record::{KeyRecord, Owner, Status};
use keygate::store::MemoryStore;
use keygate::validate::{ClientIp, PeerAddr};
use keygate::{AuthLayer, Keygate};
use tower::{service_fn, Layer, Service, ServiceExt};

fn req(key: &str, peer: Option<&str>, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get("/v1/health").header("x-api-key", key);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let mut req = builder.body(Body::default()).unwrap();
    if let Some(peer) = peer {
        req.extensions_mut()
            .insert(PeerAddr(peer.parse::<SocketAddr>().unwrap()));
    }
    req
}

/// Everything a client can observe of a reply.
#[derive(Debug, PartialEq)]
struct Seen {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: String,
}

async fn seen<S, B>(svc: &S, req: Request<Body>) -> Seen
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    headers.sort();
    Seen {
        status: parts.status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// A backend that answers from `store` but never at once (as a database does), counting
/// its calls when they are made.
fn awaited(store: MemoryStore) -> (impl KeyLookup + Clone, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let lookup = move |hash: KeyHash| {
        let answer = store.lookup(&hash.into()).now().ok().unwrap_or(Ok(None));
        let calls = Arc::clone(&c);
        async move {
            // Counted when it reaches the store: when it is polled.
            calls.fetch_add(1, Ordering::SeqCst);
            // Pending once, so that concurrent requests are all in flight together.
            tokio::task::yield_now().await;
            answer.map_err(BoxError::from)
        }
    };
    (lookup, calls)
}

/// A legitimate user shares an address with a client that sends one invalid key every
/// 3 s, after a first burst: the user's valid key keeps working long after its cache
/// entry (30 s) has expired, and the neighbour's keys still never reach the store.
#[tokio::test]
async fn a_bad_neighbour_never_locks_out_a_good_key() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let (backend, calls) = awaited(store);
    let clock = clock();
    let cache = CachedLookup::builder(backend)
        .clock(clock.clone())
        .build()
        .unwrap();
    let svc = Keygate::builder(cache.clone())
        .failed_attempts(Some(Quota::per_minute(nz(20))))
        .default_quota(Quota::per_minute(nz(1000)))
        .clock(clock.clone())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let shared = Some("203.0.113.7:40000");
    assert_eq!(
        seen(&svc, req(good.expose_secret(), shared, &[]))
            .await
            .status,
        200
    );
    for _ in 0..20 {
        let s = seen(&svc, req(unknown().expose_secret(), shared, &[])).await;
        assert_eq!(s.status, 401);
    }
    let mut store_calls_by_neighbour = 0;
    for tick in 1..=100u32 {
        clock.advance(Duration::from_secs(3));
        let before = calls.load(Ordering::SeqCst);
        let s = seen(&svc, req(unknown().expose_secret(), shared, &[])).await;
        assert!(matches!(s.status.as_u16(), 401 | 429), "{s:?}");
        store_calls_by_neighbour += calls.load(Ordering::SeqCst) - before;
        if tick % 7 == 0 {
            let s = seen(&svc, req(good.expose_secret(), shared, &[])).await;
            assert_eq!(s.status, 200, "at {} s: {s:?}", tick * 3);
        }
    }
    // One attempt refills every 3 s: the neighbour reaches the store at most that often.
    assert!(
        store_calls_by_neighbour <= 100,
        "{store_calls_by_neighbour}"
    );
    // Dropped from the cache on purpose: still known good.
    cache.invalidate(&good.hash());
    assert_eq!(
        seen(&svc, req(good.expose_secret(), shared, &[]))
            .await
            .status,
        200
    );
}

/// A thousand concurrent made-up keys from one address: at most the quota reaches the
/// store, the rest are turned away without a lookup.
#[tokio::test]
async fn a_concurrent_burst_reaches_the_store_at_most_quota_times() {
    let (backend, calls) = awaited(MemoryStore::new());
    let svc = Keygate::builder(backend)
        .failed_attempts(Some(Quota::per_minute(nz(20))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let svc = svc.clone();
        let key = unknown();
        tasks.spawn(async move {
            svc.oneshot(req(key.expose_secret(), Some("198.51.100.20:1"), &[]))
                .await
                .unwrap()
                .status()
        });
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(status) = tasks.join_next().await {
        *statuses.entry(status.unwrap().as_u16()).or_insert(0) += 1;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 20, "{statuses:?}");
    assert_eq!(statuses, [(401, 20), (429, 980)].into_iter().collect());
}

/// The keys of every kind that must read exactly like an unknown key.
struct Zoo {
    store: MemoryStore,
    valid: ApiKey,
    /// Keys refused as `invalid_api_key` whatever the settings.
    always_invalid: Vec<(&'static str, ApiKey)>,
    /// Keys refused with their own code unless errors are opaque.
    folded: Vec<(&'static str, ApiKey)>,
}

fn zoo(now: SystemTime) -> Zoo {
    let store = MemoryStore::new();
    let owner = Owner::new("o1", "ada");
    let mut inactive = Owner::new("o2", "bob");
    inactive.active = false;
    let issue = |owner: Owner, edit: &dyn Fn(KeyRecord) -> KeyRecord| {
        store.issue(owner, Environment::Live, edit).unwrap()
    };
    let valid = issue(owner.clone(), &|r| r);
    let always_invalid = vec![
        (
            "deleted",
            issue(owner.clone(), &|r| r.with_status(Status::Deleted)),
        ),
        (
            "revoked",
            issue(owner.clone(), &|r| r.with_status(Status::Revoked)),
        ),
        ("malformed", ApiKey::new("kg_live_definitely_not_a_key")),
    ];
    let folded = vec![
        (
            "disabled",
            issue(owner.clone(), &|r| r.with_status(Status::Disabled)),
        ),
        (
            "expired",
            issue(owner.clone(), &|r| {
                r.with_expiry(now - Duration::from_secs(1))
            }),
        ),
        ("owner inactive", issue(inactive, &|r| r)),
    ];
    Zoo {
        store,
        valid,
        always_invalid,
        folded,
    }
}

/// Deleted, revoked (and, with opaque errors, disabled, expired, owner-inactive) keys are
/// indistinguishable from unknown ones in every observable: status, headers and body, both
/// before and after the client is turned away, and in how fast they turn it away. Checked
/// over an in-memory store (answered at once) and an awaited backend.
#[tokio::test]
async fn deleted_keys_read_exactly_like_unknown_ones() {
    for opaque in [false, true] {
        let clock = clock();
        let z = zoo(clock.now());
        oracle_case(z.store.clone(), &z, opaque, false, &clock).await;
        let clock = self::clock();
        let z = zoo(clock.now());
        let (backend, _) = awaited(z.store.clone());
        oracle_case(backend, &z, opaque, true, &clock).await;
    }
}

async fn oracle_case<L: KeyLookup>(
    lookup: L,
    z: &Zoo,
    opaque: bool,
    awaited_backend: bool,
    clock: &FakeClock,
) {
    let case = format!("opaque={opaque} awaited={awaited_backend}");
    let lookalikes: Vec<(&str, ApiKey)> = z
        .always_invalid
        .iter()
        .chain(if opaque { z.folded.iter() } else { [].iter() })
        .cloned()
        .collect();
    let quota = 3u32;
    let svc = Keygate::builder(lookup)
        .failed_attempts(Some(Quota::per_minute(nz(quota))))
        .opaque_errors(opaque)
        .clock(clock.clone())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    // One client per kind, each sending that kind only: the replies and the moment of
    // lockout must be the same for all.
    let mut transcripts = Vec::new();
    let kinds = std::iter::once(("unknown", None)).chain(
        lookalikes
            .iter()
            .map(|(name, key)| (*name, Some(key.clone()))),
    );
    for (i, (name, key)) in kinds.enumerate() {
        let peer = format!("198.51.100.{}:1", 100 + i);
        let mut transcript = Vec::new();
        for _ in 0..quota + 2 {
            let key = key.clone().unwrap_or_else(unknown);
            transcript.push(seen(&svc, req(key.expose_secret(), Some(&peer), &[])).await);
        }
        transcripts.push((name, transcript));
    }
    let (_, reference) = &transcripts[0];
    assert_eq!(reference[0].status, 401, "{case}");
    assert_eq!(reference[quota as usize].status, 429, "{case}");
    for (name, transcript) in &transcripts {
        assert_eq!(transcript, reference, "{case}: {name} differs from unknown");
    }
    // Kinds mixed from one client count alike.
    let peer = "198.51.100.200:1";
    for (_, key) in lookalikes.iter().take(quota as usize) {
        let s = seen(&svc, req(key.expose_secret(), Some(peer), &[])).await;
        assert_eq!(s.status, 401, "{case}");
    }
    let next = seen(&svc, req(unknown().expose_secret(), Some(peer), &[])).await;
    assert_eq!(next.status, 429, "{case}");
    // The valid key: answered at once it passes; awaited, it must have been found usable
    // once before (from anywhere) to pass a turned-away client.
    let s = seen(&svc, req(z.valid.expose_secret(), Some(peer), &[])).await;
    let expected = if awaited_backend { 429 } else { 200 };
    assert_eq!(s.status, expected, "{case}");
    let s = seen(&svc, req(z.valid.expose_secret(), Some("192.0.2.1:1"), &[])).await;
    assert_eq!(s.status, 200, "{case}");
    let s = seen(&svc, req(z.valid.expose_secret(), Some(peer), &[])).await;
    assert_eq!(s.status, 200, "{case}: known good now");
}

/// Without a peer address the layer cannot learn the client: it says so once, at warn
/// level, and counts all such requests together instead of not at all.
#[tokio::test]
async fn an_unknown_client_is_counted_and_the_layer_says_so_once() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(capture.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let svc = AuthLayer::builder(store)
        .failed_attempts(Some(Quota::per_minute(nz(5))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    for _ in 0..5 {
        assert_eq!(
            seen(&svc, req(unknown().expose_secret(), None, &[]))
                .await
                .status,
            401
        );
    }
    let s = seen(&svc, req(unknown().expose_secret(), None, &[])).await;
    assert_eq!(s.status, 429, "{s:?}");
    assert!(s.body.contains("too_many_failed_attempts"));
    // A valid key is never refused for it.
    assert_eq!(
        seen(&svc, req(good.expose_secret(), None, &[]))
            .await
            .status,
        200
    );
    let log = capture.text();
    assert_eq!(
        log.matches("cannot learn the client IP").count(),
        1,
        "warned once: {log}"
    );
    assert!(log.contains("WARN"), "{log}");
}

/// A trusted proxy forwarding a hop that does not parse (`X-Forwarded-For: unknown`) does
/// not switch the limiter off: such requests are counted under the proxy's address, and
/// clients the proxy names properly are not affected.
#[tokio::test]
async fn an_unreadable_forwarded_hop_is_counted_under_the_proxy() {
    let svc = AuthLayer::builder(MemoryStore::new())
        .client_ip(
            ClientIp::builder()
                .trusted_proxies(["10.0.0.0/8"])
                .build()
                .unwrap(),
        )
        .failed_attempts(Some(Quota::per_minute(nz(5))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let proxy = Some("10.0.0.1:443");
    let junk = ["unknown", "_hidden", "300.1.2.3", "", "1.2.3.4, bogus"];
    for xff in junk {
        let s = seen(
            &svc,
            req(
                unknown().expose_secret(),
                proxy,
                &[("x-forwarded-for", xff)],
            ),
        )
        .await;
        assert_eq!(s.status, 401, "{xff:?}");
    }
    let s = seen(
        &svc,
        req(
            unknown().expose_secret(),
            proxy,
            &[("x-forwarded-for", "unknown")],
        ),
    )
    .await;
    assert_eq!(s.status, 429);
    let s = seen(
        &svc,
        req(
            unknown().expose_secret(),
            proxy,
            &[("x-forwarded-for", "198.51.100.5")],
        ),
    )
    .await;
    assert_eq!(s.status, 401, "a client named properly is its own");
}

/// A client that drops its requests while their lookups are in flight (a disconnect) does
/// not get its attempts back: else disconnecting would make every guess free. A lookup the
/// store fails to answer, on the other hand, is given back (see `tests/hunt_lockout.rs`).
#[tokio::test]
async fn dropping_requests_mid_lookup_does_not_give_attempts_back() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let never = move |_: KeyHash| {
        let calls = Arc::clone(&c);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<Option<Arc<KeyRecord>>, BoxError>>().await
        }
    };
    let mut svc = Keygate::builder(never)
        .failed_attempts(Some(Quota::per_minute(nz(5))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    for _ in 0..50 {
        let mut future =
            std::pin::pin!(svc.call(req(unknown().expose_secret(), Some("198.51.100.77:1"), &[])));
        // Polled once (the lookup starts), then dropped: the client went away.
        let _ = future.as_mut().poll(&mut cx);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "five lookups, then turned away"
    );
}
