//! The assembled stack (`Keygate`): authentication and per-key rate limiting as one layer,
//! per-route costs and buckets from one base, failed-attempt limiting, and no limiter state
//! for keys that never authenticate.

mod common;

use common::layered::{clock, nz, ok, req, Body};
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use keygate::error::BoxError;
use keygate::key::Environment;
use keygate::key::{ApiKey, KeyFormat, KeyHash};
use keygate::lookup::KeyLookup;
use keygate::ratelimit::{HeaderStyle, Quota};
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::Keygate;
use tower::{service_fn, Layer, Service, ServiceExt};

async fn json(
    res: Response<impl http_body::Body<Data = Bytes, Error = Infallible>>,
) -> (http::response::Parts, serde_json::Value) {
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// One request with `key` from a fixed client.
async fn send<S>(svc: &S, key: &str) -> S::Response
where
    S: Service<Request<Body>, Error = Infallible> + Clone,
{
    svc.clone()
        .oneshot(req(key, "198.51.100.1:1"))
        .await
        .unwrap()
}

/// A store behind a lookup that counts its calls.
fn counted(store: MemoryStore) -> (impl KeyLookup, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let lookup = move |hash: KeyHash| {
        let answer = store.lookup(&hash.into()).now().ok().unwrap_or(Ok(None));
        let calls = Arc::clone(&c);
        async move {
            // Counted when polled: when the lookup reaches the store.
            calls.fetch_add(1, Ordering::SeqCst);
            answer.map_err(BoxError::from)
        }
    };
    (lookup, calls)
}

#[tokio::test]
async fn sixty_a_minute_with_headers_then_429() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let c = clock();
    let keygate = Keygate::builder(store).clock(c.clone()).build().unwrap();
    let svc = keygate.layer(service_fn(ok));
    for i in 0..60u64 {
        let res = svc
            .clone()
            .oneshot(req(key.expose_secret(), "198.51.100.1:1"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "request {i}");
        assert_eq!(res.headers()["x-ratelimit-limit"], "60");
        assert_eq!(
            res.headers()["x-ratelimit-remaining"],
            (59 - i).to_string().as_str()
        );
        assert_eq!(
            res.headers()["x-ratelimit-reset"],
            (1_700_000_000 + i + 1).to_string().as_str()
        );
    }
    let (parts, body) = json(
        svc.clone()
            .oneshot(req(key.expose_secret(), "198.51.100.1:1"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(parts.headers["retry-after"], "1");
    assert_eq!(parts.headers["x-ratelimit-remaining"], "0");
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["data"]["limit"], 60);
    assert_eq!(body["data"]["retry_after"], 1);
    c.advance(Duration::from_secs(1));
    let res = svc
        .oneshot(req(key.expose_secret(), "198.51.100.1:1"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn record_quotas_override_the_default_and_several_windows_apply() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| {
            r.with_quotas([Quota::per_second(nz(2)), Quota::per_minute(nz(3))])
        })
        .unwrap();
    let c = clock();
    let svc = Keygate::builder(store)
        .clock(c.clone())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let status = |svc: &_| {
        let svc: &keygate::AuthService<_, _> = svc;
        let svc = svc.clone();
        let key = key.expose_secret().to_owned();
        async move { svc.oneshot(req(&key, "198.51.100.1:1")).await.unwrap() }
    };
    assert_eq!(status(&svc).await.headers()["x-ratelimit-limit"], "2");
    assert_eq!(status(&svc).await.status(), 200);
    assert_eq!(status(&svc).await.status(), 429, "2 a second");
    c.advance(Duration::from_secs(1));
    let res = status(&svc).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["x-ratelimit-limit"],
        "3",
        "the minute window is tighter now"
    );
    c.advance(Duration::from_secs(1));
    let res = status(&svc).await;
    assert_eq!(res.status(), 429, "3 a minute");
    assert_eq!(res.headers()["x-ratelimit-limit"], "3");
}

#[tokio::test]
async fn route_cost_totals_and_own_buckets_share_one_store() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| {
            r.with_scopes(["messages:write"])
        })
        .unwrap();
    let c = clock();
    let base = Keygate::builder(store)
        .default_quota(Quota::per_minute(nz(10)))
        .clock(c.clone())
        .build()
        .unwrap();
    // Outer layer (cost 1) around a route layer (cost 5 in all): 5 per request.
    let expensive = base
        .route()
        .scopes(["messages:write"])
        .cost(5)
        .build()
        .unwrap();
    let nested = base.layer(expensive.layer(service_fn(ok)));
    let plain = base.layer(service_fn(ok));
    let k = key.expose_secret();
    assert_eq!(
        send(&plain, k).await.headers()["x-ratelimit-remaining"],
        "9"
    );
    let res = send(&nested, k).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining"], "4", "5 in all");
    // 4 left: the outer layer takes 1, the route cannot take 4 more and refuses; the
    // outer layer's token goes back.
    let res = send(&nested, k).await;
    assert_eq!(res.status(), 429);
    assert_eq!(
        send(&plain, k).await.headers()["x-ratelimit-remaining"],
        "3"
    );
    c.advance(Duration::from_secs(60));

    // A route with a bucket of its own: 2 a minute there, the main bucket untouched by it.
    c.advance(Duration::from_secs(60));
    let uploads = base
        .route()
        .bucket("uploads", [Quota::per_minute(nz(2))])
        .build()
        .unwrap();
    let svc = uploads.layer(service_fn(ok));
    for _ in 0..2 {
        let res = svc
            .clone()
            .oneshot(req(key.expose_secret(), "198.51.100.1:1"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-ratelimit-limit"], "2");
    }
    assert_eq!(
        svc.clone()
            .oneshot(req(key.expose_secret(), "198.51.100.1:1"))
            .await
            .unwrap()
            .status(),
        429
    );
    let res = send(&plain, k).await;
    assert_eq!(res.headers()["x-ratelimit-remaining"], "9");
    // A probe route (cost 0) reports the budget and takes nothing.
    let probe = base.route().cost(0).build().unwrap();
    let probed = probe.layer(service_fn(ok));
    for _ in 0..2 {
        let res = send(&probed, k).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-ratelimit-remaining"], "9");
    }
    assert!(base.route().bucket("x", []).build().is_err());
}

/// What a refusal further in does to the token the outer layer took, on purpose:
/// refused by the route's rate limit, the token goes back (the request cost nothing, so a
/// client at its route budget does not drain its main one); refused by the route's rules
/// (a scope, an environment: 403), the token stays (the request was authenticated and
/// answered, and a key must not hammer routes it may not use for free).
#[tokio::test]
async fn a_route_refusal_by_its_rules_keeps_the_outer_token() {
    let store = MemoryStore::new();
    let reader = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| {
            r.with_scopes(["read"])
        })
        .unwrap();
    let base = Keygate::builder(store)
        .default_quota(Quota::per_minute(nz(10)))
        .clock(clock())
        .build()
        .unwrap();
    let writes = base
        .route()
        .scopes(["messages:write"])
        .cost(5)
        .build()
        .unwrap();
    let nested = base.layer(writes.layer(service_fn(ok)));
    let plain = base.layer(service_fn(ok));
    let k = reader.expose_secret();
    for _ in 0..3 {
        let res = send(&nested, k).await;
        assert_eq!(res.status(), 403);
        assert_eq!(
            res.headers()["x-ratelimit-limit"],
            "10",
            "the outer layer's numbers"
        );
    }
    assert_eq!(
        send(&plain, k).await.headers()["x-ratelimit-remaining"],
        "6",
        "three refused requests took one token each, this one the fourth"
    );
}

#[tokio::test]
async fn failed_attempts_turn_a_client_away_before_any_lookup() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let (lookup, calls) = counted(store);
    let svc = Keygate::builder(lookup)
        .failed_attempts(Some(Quota::per_minute(nz(5))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let format = KeyFormat::default();
    for _ in 0..5 {
        let unknown = format.generate(Environment::Live).unwrap();
        let res = svc
            .clone()
            .oneshot(req(unknown.expose_secret(), "203.0.113.9:1"))
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }
    let before = calls.load(Ordering::SeqCst);
    let unknown = format.generate(Environment::Live).unwrap();
    let (parts, body) = json(
        svc.clone()
            .oneshot(req(unknown.expose_secret(), "203.0.113.9:1"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 429);
    assert_eq!(body["code"], "too_many_failed_attempts");
    assert!(parts.headers.contains_key("retry-after"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "no lookup for a client turned away"
    );
    // A valid key not known yet from that client waits too (no lookup for it); another
    // client is untouched.
    let res = svc
        .clone()
        .oneshot(req(key.expose_secret(), "203.0.113.9:1"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let res = svc
        .oneshot(req(key.expose_secret(), "198.51.100.1:1"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_known_good_key_passes_a_locked_out_address_and_ipv6_counts_per_64() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let (lookup, calls) = counted(store);
    let svc = Keygate::builder(keygate::lookup::CachedLookup::new(lookup))
        .failed_attempts(Some(Quota::per_minute(nz(3))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    // The valid key is used once from elsewhere: it is now a cache hit.
    let res = svc
        .clone()
        .oneshot(req(key.expose_secret(), "198.51.100.1:1"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Someone behind a shared address floods bad keys, from rotating IPv6 addresses of
    // one /64.
    let format = KeyFormat::default();
    for i in 0..3 {
        let unknown = format.generate(Environment::Live).unwrap();
        let peer = format!("[2001:db8:1:2::{i:x}]:1");
        let res = svc
            .clone()
            .oneshot(req(unknown.expose_secret(), &peer))
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }
    let before = calls.load(Ordering::SeqCst);
    let unknown = format.generate(Environment::Live).unwrap();
    let res = svc
        .clone()
        .oneshot(req(unknown.expose_secret(), "[2001:db8:1:2::ffff]:1"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429, "the whole /64 is one client");
    assert_eq!(calls.load(Ordering::SeqCst), before, "no lookup for it");
    // The neighbour with a valid, known key still gets through.
    let res = svc
        .clone()
        .oneshot(req(key.expose_secret(), "[2001:db8:1:2::beef]:1"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Another /64 is another client.
    let res = svc
        .oneshot(req(unknown.expose_secret(), "[2001:db8:1:3::1]:1"))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

/// Drives a future that completes without waiting (every path here does).
fn now<F: Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("future waited"),
    }
}

#[test]
fn a_million_invalid_keys_leave_no_limiter_state() {
    let store = MemoryStore::new();
    let keygate = Keygate::builder(store)
        .failed_attempts(None)
        .clock(clock())
        .build()
        .unwrap();
    let mut svc = keygate.layer(service_fn(ok));
    let format = KeyFormat::default();
    let mut statuses = [0usize; 2];
    for i in 0..1_000_000u32 {
        // Half well-formed unknown keys (they reach the lookup), half garbage.
        let key: ApiKey = if i % 2 == 0 {
            format.generate(Environment::Live).unwrap()
        } else {
            ApiKey::new(format!("kg_live_{i:030}"))
        };
        let res = now(async {
            std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
            svc.call(req(key.expose_secret(), "203.0.113.9:1"))
                .await
                .unwrap()
        });
        statuses[usize::from(res.status() == 401)] += 1;
    }
    assert_eq!(statuses, [0, 1_000_000]);
    assert!(
        keygate.limiter().is_empty(),
        "{} buckets",
        keygate.limiter().len()
    );
}

#[tokio::test]
async fn ietf_headers_and_grpc_resource_exhausted() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let svc = Keygate::builder(store)
        .default_quota(Quota::per_minute(nz(1)))
        .header_style(HeaderStyle::Both)
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let res = svc
        .clone()
        .oneshot(req(key.expose_secret(), "198.51.100.1:1"))
        .await
        .unwrap();
    assert_eq!(res.headers()["ratelimit-policy"], "\"1/min\";q=1;w=60");
    assert_eq!(res.headers()["ratelimit"], "\"1/min\";r=0;t=60");
    assert_eq!(res.headers()["x-ratelimit-limit"], "1");
    let mut grpc = req(key.expose_secret(), "198.51.100.1:1");
    grpc.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let res = svc.oneshot(grpc).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["grpc-status"], "8");
}

#[tokio::test]
async fn accepted_requests_record_last_use_at_most_once_a_minute() {
    use keygate::store::{KeyStore, NewKey, OwnerStore};
    let c = clock();
    let store = MemoryStore::builder().clock(c.clone()).build();
    store.add_owner("ada", None).await.unwrap();
    let created = store
        .create(NewKey::new("ada", "ci", Environment::Live))
        .await
        .unwrap();
    let svc = Keygate::builder(
        keygate::lookup::CachedLookup::builder(store.clone())
            .clock(c.clone())
            .build_over_store()
            .unwrap(),
    )
    .clock(c.clone())
    .build()
    .unwrap()
    .layer(service_fn(ok));
    let id = &created.record.id;
    let secret = created.secret.expose_secret();
    assert_eq!(store.get(id).await.unwrap().last_used_at, None);
    assert_eq!(
        svc.clone()
            .oneshot(req(secret, "198.51.100.1:1"))
            .await
            .unwrap()
            .status(),
        200
    );
    let first = store.get(id).await.unwrap().last_used_at.expect("recorded");
    c.advance(Duration::from_secs(30));
    svc.clone()
        .oneshot(req(secret, "198.51.100.1:1"))
        .await
        .unwrap();
    assert_eq!(
        store.get(id).await.unwrap().last_used_at,
        Some(first),
        "not within a minute"
    );
    c.advance(Duration::from_secs(31));
    svc.clone()
        .oneshot(req(secret, "198.51.100.1:1"))
        .await
        .unwrap();
    assert!(store.get(id).await.unwrap().last_used_at > Some(first));
    // A refused request is not a use.
    store
        .set_status(id, keygate::record::Status::Disabled)
        .await
        .unwrap();
    let before = store.get(id).await.unwrap().last_used_at;
    c.advance(Duration::from_secs(120));
    assert_eq!(
        svc.oneshot(req(secret, "198.51.100.1:1"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(store.get(id).await.unwrap().last_used_at, before);
}

/// Keys naming one rate bucket (an OAuth2 client's access tokens) draw on one budget: the
/// bucket's, under the quotas of the key presented; other keys keep their own.
#[tokio::test]
async fn keys_sharing_a_rate_bucket_share_one_budget() {
    use keygate::key::KeyId;
    use keygate::store::{ClientStore, KeyStore, NewClient, NewKey, OwnerStore};

    let store = MemoryStore::new();
    store.add_owner("ada", None).await.unwrap();
    let client = store
        .create_client(NewClient::new("ada", "billing"))
        .await
        .unwrap()
        .client;
    let other = store
        .create_client(NewClient::new("ada", "reports"))
        .await
        .unwrap()
        .client;
    let key = |bucket: Option<&str>| {
        let mut new = NewKey::new("ada", "token", Environment::Live);
        new.quotas = vec![Quota::per_minute(nz(10))];
        new.rate_bucket = bucket.map(KeyId::new);
        let store = store.clone();
        async move { store.create(new).await.unwrap().secret }
    };
    let (t1, t2) = (key(Some(&client.id)).await, key(Some(&client.id)).await);
    let (elsewhere, plain) = (key(Some(&other.id)).await, key(None).await);

    let c = clock();
    let keygate = Keygate::builder(store).clock(c.clone()).build().unwrap();
    let svc = keygate.layer(service_fn(ok));
    let mut admitted = 0;
    for i in 0..20 {
        let token = if i % 2 == 0 { &t1 } else { &t2 };
        let res = send(&svc, token.expose_secret()).await;
        if res.status() == 200 {
            admitted += 1;
            assert_eq!(
                res.headers()["x-ratelimit-remaining"],
                (10 - admitted).to_string().as_str(),
                "one count across both tokens"
            );
        } else {
            assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        }
    }
    assert_eq!(admitted, 10, "ten a minute for both tokens together");
    for token in [&t1, &t2] {
        assert_eq!(
            send(&svc, token.expose_secret()).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    for own in [&elsewhere, &plain] {
        let res = send(&svc, own.expose_secret()).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-ratelimit-remaining"], "9");
    }
    c.advance(Duration::from_secs(6));
    assert_eq!(send(&svc, t2.expose_secret()).await.status(), 200);
}
