//! Second hunt on the failed-attempt lockout (issue 7), after the fixes of the first: the
//! tracking cap filled from far fewer /48s than documented (now: untracked clients are
//! counted per IPv4 /16 or IPv6 /32, not in one bucket), IPv4 clients that reach an
//! IPv6-only server through NAT64 counted as one client (now: unwrapped like `::ffff:`), a
//! /48 shared by unrelated subscribers (a documented trade-off, checked here as such), and a
//! deleted key that was once known good telling itself from an unknown one (its status now
//! never differs; the remaining timing difference is documented), or cached longer (now: as
//! long as an unknown key).

mod common;

use common::layered::{clock, nz, ok, req, req_at, status_and_body, unknown};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keygate::error::BoxError;
use keygate::key::Environment;
use keygate::key::KeyHash;
use keygate::lookup::KeyLookup;
use keygate::ratelimit::Quota;
use keygate::record::{Owner, Status};
use keygate::store::{KeyStore, MemoryStore};
use keygate::{AuthLayer, Keygate};
use tower::{service_fn, Layer, Service};

/// A database-like backend: never answers at once, takes `delay` (under tokio's clock),
/// fails while `down` is set.
fn database(store: MemoryStore, delay: Duration) -> (impl KeyLookup + Clone, Arc<AtomicBool>) {
    let down = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&down);
    let lookup = move |hash: KeyHash| {
        let failing = d.load(Ordering::SeqCst);
        let store = store.clone();
        async move {
            if delay.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(delay).await;
            }
            if failing {
                return Err(BoxError::from("connection reset by peer"));
            }
            store
                .lookup(&hash.into())
                .now()
                .ok()
                .unwrap_or(Ok(None))
                .map_err(BoxError::from)
        }
    };
    (lookup, down)
}

/// The docs: "it tracks at most a million clients; past that, new clients share an overflow
/// bucket, then get 503 until buckets refill (it takes a million distinct IPv4 addresses or
/// /48s failing within the refill time)". But a /48 does not hold one bucket: it holds its
/// own and one per /64 it charged, up to sixteen times the quota of them (its wider budget),
/// each alive for a host's refill interval. 6 250 /48s (one /35, not a million /48s) with
/// 160 /64s each fill the cap with one request per /64 — 1 000 000 requests, which at
/// `per_hour(10)` may be spread over the six minutes a one-attempt host bucket lives
/// (~2 800 requests a second). The last of them, untracked, empty the overflow bucket, and
/// every new client's valid key is a 503.
#[tokio::test]
async fn a_slash_35_fills_the_tracking_cap_and_new_valid_keys_get_503() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let (backend, _down) = database(store, Duration::ZERO);
    let mut svc = AuthLayer::builder(backend)
        .failed_attempts(Some(Quota::per_hour(nz(10))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let sites: u16 = 6_250;
    let hosts_per_site: u16 = 160; // the /48's budget: 16 × 10
    let mut attack = 0usize;
    for site in 0..sites {
        for host in 0..hosts_per_site {
            // 2001:db8:0:0::/35 holds 8192 /48s: 2001:0db8:0000::/48 .. 2001:0db8:1fff::/48.
            let ip = Ipv6Addr::new(0x2001, 0xdb8, site, host, 0, 0, 0, 1);
            let r = req_at("kg_live_nope", SocketAddr::new(IpAddr::V6(ip), 1));
            let res = svc.call(r).await.unwrap();
            // 401 while the lockout tracks the attacker; past the cap the last /48s land in
            // the overflow bucket (16 × 10), which they empty themselves: then 503.
            assert!(
                matches!(res.status().as_u16(), 401 | 503),
                "attack request {attack}: {}",
                res.status()
            );
            attack += 1;
        }
    }
    // A client elsewhere, with its valid key, that never sent an invalid one.
    let (status, body) = status_and_body(&svc, req(good.expose_secret(), "192.0.2.77:5000")).await;
    assert_eq!(
        status, 200,
        "{attack} requests from {sites} /48s (one /35, not a million /48s) turned every new \
         client away: {status} {body}"
    );
}

/// An IPv6-only server reached by IPv4 clients through NAT64/SIIT sees them as
/// `64:ff9b::a.b.c.d` (RFC 6052's well-known prefix). keygate unwraps `::ffff:a.b.c.d` to the
/// IPv4 address, but masks `64:ff9b::/96` to `64:ff9b::/64`: the whole IPv4 Internet is one
/// client. One IPv4 attacker spends that budget and every IPv4 user whose key is not yet known
/// good is turned away.
#[tokio::test]
async fn ipv4_clients_behind_nat64_share_one_budget() {
    for (label, attacker, victim) in [
        (
            "mapped",
            "[::ffff:203.0.113.9]:4000",
            "[::ffff:198.51.100.7]:5000",
        ),
        (
            "nat64",
            "[64:ff9b::203.0.113.9]:4000",
            "[64:ff9b::198.51.100.7]:5000",
        ),
    ] {
        let store = MemoryStore::new();
        let good = store
            .issue(Owner::new("o", "o"), Environment::Live, |r| r)
            .unwrap();
        let (backend, _down) = database(store, Duration::ZERO);
        let svc = Keygate::builder(backend)
            .failed_attempts(Some(Quota::per_minute(nz(5))))
            .clock(clock())
            .build()
            .unwrap()
            .layer(service_fn(ok));
        for _ in 0..5 {
            let (status, _) = status_and_body(&svc, req(unknown().expose_secret(), attacker)).await;
            assert_eq!(status, 401, "{label}");
        }
        let (status, _) = status_and_body(&svc, req(unknown().expose_secret(), attacker)).await;
        assert_eq!(status, 429, "{label}: the attacker is turned away");
        // Another IPv4 host, its valid key, no invalid key ever sent.
        let (status, body) = status_and_body(&svc, req(good.expose_secret(), victim)).await;
        assert_eq!(
            status, 200,
            "{label}: 198.51.100.7 refused for 203.0.113.9's guesses: {status} {body}"
        );
    }
}

/// ISPs delegate a /56 (Deutsche Telekom, many others), a /60 or a /64 (mobile networks)
/// per subscriber out of shared /48s. The /48 budget (sixteen hosts' worth), charged first,
/// is spent by one subscriber rotating the /64s of its own /56; a different subscriber of the
/// same /48, which never sent a bad key, is then turned away with its valid key: one
/// subscriber locks out hundreds (a /56 per customer) to tens of thousands (a /64 per phone)
/// of others, for 320 requests a minute at the default quota.
#[tokio::test]
async fn one_subscriber_locks_out_every_other_subscriber_of_its_slash_48() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let (backend, _down) = database(store, Duration::ZERO);
    let svc = Keygate::builder(backend)
        .failed_attempts(Some(Quota::per_minute(nz(20))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    // Subscriber A holds 2001:db8:77:1200::/56: sixteen of its /64s, twenty bad keys each.
    for i in 0..16u16 {
        let peer = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0x1200 + i, 0, 0, 0, 1)),
            1,
        );
        for _ in 0..20 {
            let (status, _) = status_and_body(&svc, req_at(unknown().expose_secret(), peer)).await;
            assert_eq!(status, 401);
        }
    }
    // Subscriber B: 2001:db8:77:3400::/56, another customer of the same ISP. The /48's
    // budget is spent: a key B never used here waits like any unseen key from that /48
    // (documented: a /48 may hold many subscribers, as an IPv4 address behind carrier NAT
    // does), while a key known good passes, and the unseen key passes from elsewhere.
    let b = "[2001:db8:77:3400::1]:5000";
    let (status, _) = status_and_body(&svc, req(good.expose_secret(), b)).await;
    assert_eq!(status, 429, "the documented trade-off");
    let (status, _) = status_and_body(&svc, req(good.expose_secret(), "192.0.2.5:1")).await;
    assert_eq!(status, 200, "from another address at once");
    let (status, body) = status_and_body(&svc, req(good.expose_secret(), b)).await;
    assert_eq!(
        status, 200,
        "known good now, it passes B's spent /48: {body}"
    );
}

/// "A deleted key is indistinguishable from an unknown one in every observable way
/// (status, body, headers, rate of refusal, lockout behaviour)". A key that an awaited lookup
/// once found usable is remembered as known good and skips the budget; deleting it does not
/// forget it. From a turned-away client an unknown key is answered 429 at once, without a
/// lookup; the deleted key still goes to the store first: its 429 comes a store round trip
/// later (here 200 ms), and during a store outage it is a 503 where an unknown key is a 429,
/// as often as the client likes (an error does not forget it).
#[tokio::test(start_paused = true)]
async fn a_deleted_key_that_was_known_good_is_told_from_an_unknown_one() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let id = store
        .lookup(&key.presented())
        .now()
        .ok()
        .unwrap()
        .unwrap()
        .unwrap()
        .id
        .clone();
    let (backend, down) = database(store.clone(), Duration::from_millis(200));
    let svc = Keygate::builder(backend)
        .failed_attempts(Some(Quota::per_minute(nz(3))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    // Used once by its owner, from anywhere: known good.
    let (status, _) = status_and_body(&svc, req(key.expose_secret(), "192.0.2.1:1")).await;
    assert_eq!(status, 200);
    KeyStore::set_status(&store, &id, Status::Deleted)
        .await
        .unwrap();

    // The prober spends its budget and is turned away.
    let prober = "203.0.113.66:1";
    for _ in 0..3 {
        let _ = status_and_body(&svc, req(unknown().expose_secret(), prober)).await;
    }
    let timed = |key: String| {
        let svc = svc.clone();
        async move {
            let start = tokio::time::Instant::now();
            let (status, body) = status_and_body(&svc, req(&key, prober)).await;
            (status, body, start.elapsed())
        }
    };

    // During a store outage: the same probe, twice each.
    down.store(true, Ordering::SeqCst);
    let mut outage = Vec::new();
    for _ in 0..2 {
        let (u, ..) = timed(unknown().expose_secret().to_owned()).await;
        let (d, ..) = timed(key.expose_secret().to_owned()).await;
        outage.push((u, d));
    }
    down.store(false, Ordering::SeqCst);
    // Store up: timing.
    let (u_status, u_body, u_time) = timed(unknown().expose_secret().to_owned()).await;
    let (d_status, d_body, d_time) = timed(key.expose_secret().to_owned()).await;

    for (u, d) in outage {
        assert_eq!(u, d, "store down: unknown key {u}, deleted key {d}");
    }
    assert_eq!((u_status, &u_body), (d_status, &d_body));
    // What is left, and documented: the deleted key's 429 comes one lookup later, because
    // the layer remembered it as good and must ask the store whether it still is. It tells
    // the holder of that very secret that it once worked here; it tells nothing about any
    // key the prober does not hold. Deleting through a store in this process (or, with
    // cross-instance invalidation, in any) could close it; kept as a known limit.
    assert!(u_time <= d_time, "{u_time:?} {d_time:?}");
}

/// The same promise, through the cache. `CachedLookup` keeps a record it found for the
/// positive TTL (30 s) and a miss for the negative TTL (5 s); a deleted key is found — as a
/// record with status `deleted` — so its refusal is cached six times longer than an unknown
/// key's. Sent once, then again 10 s later, an unknown key costs a store round trip the
/// second time and a deleted key does not: the second 401 is measurably faster for a key
/// that exists (and for revoked and rotated-out ones; with opaque errors also disabled,
/// expired and owner-inactive ones). No lockout needed, and it can be repeated every 30 s.
#[tokio::test(start_paused = true)]
async fn a_deleted_key_is_cached_longer_than_an_unknown_one() {
    use keygate::lookup::CachedLookup;
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let id = store
        .lookup(&key.presented())
        .now()
        .ok()
        .unwrap()
        .unwrap()
        .unwrap()
        .id
        .clone();
    KeyStore::set_status(&store, &id, Status::Deleted)
        .await
        .unwrap();
    let (backend, _down) = database(store, Duration::from_millis(200));
    let fake = clock();
    let cache = CachedLookup::builder(backend)
        .clock(fake.clone())
        .build()
        .unwrap();
    let svc = Keygate::builder(cache)
        .failed_attempts(Some(Quota::per_minute(nz(20))))
        .clock(fake.clone())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let probe = |secret: String| {
        let svc = svc.clone();
        async move {
            let start = tokio::time::Instant::now();
            let (status, body) = status_and_body(&svc, req(&secret, "203.0.113.70:1")).await;
            (status, body, start.elapsed())
        }
    };
    let unknown = unknown();
    let first_u = probe(unknown.expose_secret().to_owned()).await;
    let first_d = probe(key.expose_secret().to_owned()).await;
    assert_eq!(first_u, first_d, "first probe");
    fake.advance(Duration::from_secs(10));
    let (u_status, u_body, u_time) = probe(unknown.expose_secret().to_owned()).await;
    let (d_status, d_body, d_time) = probe(key.expose_secret().to_owned()).await;
    assert_eq!((u_status, &u_body), (d_status, &d_body));
    assert_eq!(
        u_time, d_time,
        "10 s later: unknown key answered after {u_time:?}, deleted key after {d_time:?}"
    );
}
