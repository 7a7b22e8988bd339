//! Attacks on the failed-attempt lockout, found by the hunt of issue 7 (each failed on the
//! lockout as first written): store trouble counted as invalid keys, a forwarded-for line
//! spoiled by one byte, the client-tracking cap filled from IPv6 /64s.

mod common;

use common::layered::{clock, nz, ok, req, status_and_body, unknown, Body};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request};
use keygate::error::BoxError;
use keygate::key::Environment;
use keygate::key::{ApiKey, KeyHash};
use keygate::lookup::KeyLookup;
use keygate::ratelimit::Quota;
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::validate::{ClientIp, PeerAddr};
use keygate::{AuthLayer, Keygate};
use tower::{service_fn, Layer, Service};

/// A database-like backend (never answers at once) that fails while `down` is set.
fn flaky(store: MemoryStore) -> (impl KeyLookup + Clone, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (d, c) = (Arc::clone(&down), Arc::clone(&calls));
    let lookup = move |hash: KeyHash| {
        let failing = d.load(Ordering::SeqCst);
        let answer = store.lookup(&hash.into()).now().ok().unwrap_or(Ok(None));
        let calls = Arc::clone(&c);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            if failing {
                return Err(BoxError::from("connection reset by peer"));
            }
            answer.map_err(BoxError::from)
        }
    };
    (lookup, down, calls)
}

/// A store outage is a 503, never a 401 — but every 503 keeps the failed-attempt token it
/// took before the lookup. A legitimate client that only ever sent its one valid key, and
/// retried during a short outage, is then refused with 429 `too_many_failed_attempts`
/// ("too many invalid keys") once the store is back, although it never sent an invalid key.
/// Behind a NAT every client of the address that is not yet "known good" (e.g. all of them
/// after a restart) is locked out the same way.
#[tokio::test]
async fn a_store_outage_turns_a_valid_key_into_a_failed_attempt_lockout() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let (backend, down, _calls) = flaky(store);
    let svc = Keygate::builder(backend)
        .failed_attempts(Some(Quota::per_minute(nz(5))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let me = "203.0.113.50:4000";

    down.store(true, Ordering::SeqCst);
    for i in 0..5 {
        let (status, body) = status_and_body(&svc, req(good.expose_secret(), me)).await;
        assert_eq!(status, 503, "retry {i} during the outage: {body}");
    }
    down.store(false, Ordering::SeqCst);

    // The store is back; the client never sent anything but its valid key.
    let (status, body) = status_and_body(&svc, req(good.expose_secret(), me)).await;
    assert_eq!(
        status, 200,
        "a valid key after a store outage is refused: {status} {body}"
    );
}

/// Behind a trusted proxy that appends the client address to the forwarding header (nginx's
/// `$proxy_add_x_forwarded_for`), a client can put one non-ASCII byte into its own
/// `X-Forwarded-For`. The whole header line is then treated as unreadable, although the
/// rightmost hop — written by the trusted proxy — is a perfectly good address. The client's
/// IP is lost: its failed attempts go to the proxy's bucket instead of its own, so a
/// turned-away client simply continues with a fresh budget.
#[tokio::test]
async fn a_non_ascii_byte_in_x_forwarded_for_escapes_the_clients_budget() {
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
    let proxy = "10.0.0.1:443";
    let forwarded = |key: &ApiKey, xff: HeaderValue| {
        let mut r = req(key.expose_secret(), proxy);
        r.headers_mut().insert("x-forwarded-for", xff);
        r
    };
    // The attacker at 203.0.113.9 spends its budget and is turned away.
    for _ in 0..5 {
        let r = forwarded(&unknown(), HeaderValue::from_static("203.0.113.9"));
        assert_eq!(status_and_body(&svc, r).await.0, 401);
    }
    let r = forwarded(&unknown(), HeaderValue::from_static("203.0.113.9"));
    assert_eq!(status_and_body(&svc, r).await.0, 429, "turned away");

    // Same client, same proxy; the client only prefixed its own X-Forwarded-For with a
    // byte that is not visible ASCII, and the proxy appended the real address after it.
    let mut admitted = 0;
    for _ in 0..5 {
        let xff = HeaderValue::from_bytes(b"\xff, 203.0.113.9").unwrap();
        if status_and_body(&svc, forwarded(&unknown(), xff)).await.0 != 429 {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 0,
        "a turned-away client got {admitted} more guesses to the store by adding one byte"
    );
}

/// The same root cause, seen through the public resolver: the trusted proxy's rightmost
/// hop parses, yet no client address is found.
#[test]
fn the_rightmost_hop_is_read_whatever_the_client_put_before_it() {
    let resolver = ClientIp::builder()
        .trusted_proxies(["10.0.0.0/8"])
        .build()
        .unwrap();
    let mut r = Request::get("/").body(()).unwrap();
    r.headers_mut().insert(
        "x-forwarded-for",
        HeaderValue::from_bytes(b"\xe9vil, 203.0.113.9").unwrap(),
    );
    r.extensions_mut()
        .insert(PeerAddr("10.0.0.1:443".parse().unwrap()));
    assert_eq!(
        resolver.resolve(&keygate::head::RequestHead::of(&r)),
        Some("203.0.113.9".parse().unwrap())
    );
}

/// The failed-attempt limiter tracks at most 1 000 000 clients. A client is an IPv6 /64, so
/// one attacker holding a /44 (sixteen /48s) sent one malformed key from each of a million
/// /64s, filled the tracking, and from then on every valid key that was not cached and not
/// "known good" (after a restart: all of them) was refused 503 from every address. Now an
/// IPv6 /48 has a budget of its own (sixteen times a host's), charged first: the /64s of a
/// site cannot multiply its budget, and the attack stops filling anything.
#[tokio::test]
async fn a_million_slash_64s_make_every_new_valid_key_a_503() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let (backend, _down, _calls) = flaky(store);
    let mut svc = AuthLayer::builder(backend)
        .failed_attempts(Some(Quota::per_hour(nz(10))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    for i in 0u64..1_000_000 {
        let peer = std::net::SocketAddr::new(
            std::net::Ipv6Addr::new(0x2001, 0xdb8, (i >> 16) as u16, i as u16, 0, 0, 0, 1).into(),
            1,
        );
        let mut r = Request::get("/v1/health")
            .header("x-api-key", "kg_live_nope")
            .body(Body::default())
            .unwrap();
        r.extensions_mut().insert(PeerAddr(peer));
        let res = svc.call(r).await.unwrap();
        assert!(
            matches!(res.status().as_u16(), 401 | 429),
            "attack request {i}: {}",
            res.status()
        );
    }
    // A legitimate client elsewhere, with its valid key: no invalid key ever sent.
    let (status, body) = status_and_body(&svc, req(good.expose_secret(), "192.0.2.77:5000")).await;
    assert_eq!(status, 200, "{status} {body}");
}

/// The same with timeouts: a store slower than the lookup timeout (2 s) for a moment. Each
/// timed-out lookup of the client's one valid key keeps its failed-attempt token.
#[tokio::test(start_paused = true)]
async fn a_slow_store_turns_a_valid_key_into_a_failed_attempt_lockout() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let slow = Arc::new(AtomicBool::new(true));
    let s = Arc::clone(&slow);
    let backend = move |hash: KeyHash| {
        let slow = s.load(Ordering::SeqCst);
        let answer = store.lookup(&hash.into()).now().ok().unwrap_or(Ok(None));
        async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            tokio::task::yield_now().await;
            answer.map_err(BoxError::from)
        }
    };
    let svc = Keygate::builder(backend)
        .failed_attempts(Some(Quota::per_minute(nz(5))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let me = "203.0.113.51:4000";
    for _ in 0..5 {
        assert_eq!(
            status_and_body(&svc, req(good.expose_secret(), me)).await.0,
            503
        );
    }
    slow.store(false, Ordering::SeqCst);
    let (status, body) = status_and_body(&svc, req(good.expose_secret(), me)).await;
    assert_eq!(status, 200, "{status} {body}");
}
