//! Attacks on the checksum deferral (the auth layer checks a key's checksum after the
//! lookup call, and skips it when the lookup answers at once with a record) and on the
//! route-variant charge lookup of the rate limit.
//!
//! `held_…` tests are attacks that did not break anything; the others failed before their
//! fix.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use common::layered::{clock, nz, ok, req, status_and_body, status_of, Body};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use keygate::answer::Answer;
use keygate::error::BoxError;
use keygate::key::{ApiKey, Environment, FormatError, KeyFormat, KeyHash, KeyId, PresentedKey};
use keygate::lookup::{CachedLookup, KeyLookup, LookupResult};
use keygate::ratelimit::Quota;
use keygate::record::{KeyRecord, Owner};
use keygate::store::MemoryStore;
use keygate::{AuthLayer, Keygate};
use tower::{service_fn, Layer, Service, ServiceExt};

/// `secret` with its last checksum character changed: the right shape, the wrong checksum.
fn mistype(secret: &str) -> String {
    let mut s = secret.to_owned();
    let last = s.pop().unwrap();
    s.push(if last == 'a' { 'b' } else { 'a' });
    assert_eq!(KeyFormat::default().check(&s), Err(FormatError::Checksum));
    s
}

/// A key of the default shape whose checksum is wrong, as an older system may have issued
/// (and a store imported by hash): `kg_live_` and 30 base62 characters.
fn legacy_secret() -> String {
    mistype(
        KeyFormat::default()
            .generate(Environment::Live)
            .unwrap()
            .expose_secret(),
    )
}

fn record(id: &str) -> Arc<KeyRecord> {
    Arc::new(KeyRecord::new(
        KeyId::new(id),
        Owner::new("o", "o"),
        Environment::Live,
    ))
}

/// A database-like lookup (answers later) over a fixed table of hashes, counting the
/// lookups that were polled (reached the database).
#[allow(clippy::type_complexity)]
fn table_lookup(
    known: Vec<(KeyHash, Arc<KeyRecord>)>,
) -> (
    impl Fn(KeyHash) -> Pin<Box<dyn Future<Output = LookupResult<BoxError>> + Send>>
        + Clone
        + Send
        + Sync
        + 'static,
    Arc<AtomicUsize>,
) {
    let polled = Arc::new(AtomicUsize::new(0));
    let table: Arc<HashMap<[u8; 32], Arc<KeyRecord>>> =
        Arc::new(known.into_iter().map(|(h, r)| (*h.as_bytes(), r)).collect());
    let counter = Arc::clone(&polled);
    let lookup = move |hash: KeyHash| {
        let table = Arc::clone(&table);
        let counter = Arc::clone(&counter);
        Box::pin(async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(table.get(hash.as_bytes()).cloned())
        }) as Pin<Box<dyn Future<Output = LookupResult<BoxError>> + Send>>
    };
    (lookup, polled)
}

/// An in-memory lookup (answers at once, as `MemoryStore` does) over a fixed table of
/// keys, counting its calls: every call reads the table.
#[derive(Clone)]
struct InMemoryTable {
    keys: Arc<HashMap<[u8; 32], Arc<KeyRecord>>>,
    calls: Arc<AtomicUsize>,
}

impl KeyLookup for InMemoryTable {
    type Error = BoxError;
    type Future = std::future::Ready<LookupResult<BoxError>>;

    fn lookup(&self, key: &PresentedKey<'_>) -> Answer<LookupResult<BoxError>, Self::Future> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Answer::Now(Ok(self.keys.get(key.hash().as_bytes()).cloned()))
    }
}

fn get(secret: &str) -> Request<Body> {
    req(secret, "203.0.113.7:4000")
}

fn code_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["code"].as_str().unwrap_or_default().to_owned()
}

/// Claim (d): a cache hit implies a key that passed the checksum. A `KeyFormat::any()`
/// layer (for keys imported from an older system) that shares its `CachedLookup` with a
/// checked layer caches an imported key whose checksum is wrong; the checked layer then
/// takes the hit and accepts the key it refuses while the cache is cold.
#[tokio::test]
async fn a_key_cached_by_an_any_format_layer_skips_the_checked_layers_checksum() {
    let legacy = legacy_secret();
    let (backend, _polled) = table_lookup(vec![(KeyHash::of(&legacy), record("legacy"))]);
    let cache = CachedLookup::new(backend);
    let checked = AuthLayer::new(cache.clone()).layer(service_fn(ok));
    let imported = AuthLayer::builder(cache.clone())
        .format(KeyFormat::any())
        .build()
        .unwrap()
        .layer(service_fn(ok));

    let (status, body) = status_and_body(&checked, get(&legacy)).await;
    assert_eq!(
        (status.as_u16(), code_of(&body).as_str()),
        (401, "invalid_api_key")
    );
    // The legacy route accepts it, as it should: the cache now holds it.
    assert_eq!(status_of(&imported, get(&legacy)).await, 200);
    let (status, body) = status_and_body(&checked, get(&legacy)).await;
    assert_eq!(
        (status.as_u16(), code_of(&body).as_str()),
        (401, "invalid_api_key"),
        "the checked layer accepted a key with a wrong checksum from the cache"
    );
}

/// Claim (a) for a lookup that answers at once (an in-memory table, as `MemoryStore` is):
/// the lookup is called, its table read (and, for `MemoryStore`, the SHA-256 computed and
/// the store's lock taken) for a key whose checksum is wrong; and a key it knows with a
/// wrong checksum is accepted by a layer that checks the format.
#[tokio::test]
async fn an_in_memory_lookup_is_read_for_a_wrong_checksum_and_its_answer_skips_the_check() {
    let legacy = legacy_secret();
    let table = InMemoryTable {
        keys: Arc::new(HashMap::from([(
            *KeyHash::of(&legacy).as_bytes(),
            record("legacy"),
        )])),
        calls: Arc::default(),
    };
    let checked = AuthLayer::new(table.clone()).layer(service_fn(ok));

    let (status, _) = status_and_body(&checked, get(&legacy_secret())).await;
    assert_eq!(status, 401);
    assert_eq!(
        table.calls.load(Ordering::SeqCst),
        0,
        "the in-memory backend was read for a key with a wrong checksum"
    );
    let (status, body) = status_and_body(&checked, get(&legacy)).await;
    assert_eq!(
        (status.as_u16(), code_of(&body).as_str()),
        (401, "invalid_api_key"),
        "a key with a wrong checksum was accepted"
    );
    assert_eq!(table.calls.load(Ordering::SeqCst), 0);
}

/// The full answer, headers sorted, for comparing two refusals byte for byte.
async fn whole<S, B>(svc: &S, req: Request<Body>) -> (StatusCode, Vec<(String, Vec<u8>)>, String)
where
    S: Service<Request<Body>, Response = Response<B>, Error = std::convert::Infallible> + Clone,
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let mut headers: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    headers.sort();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Claims (b) and (c): behind a cache holding a valid key (known good to the lockout), its
/// mistyped variants are refused exactly as mistyped unknown keys are, response for
/// response (status, headers, body), and both clients are turned away after the same
/// number of attempts; a mistyped variant never rides on the valid key's known-good mark,
/// while the valid key itself keeps working from the turned-away address.
#[tokio::test]
async fn held_a_mistyped_cached_key_reads_as_a_mistyped_unknown_key_and_counts_alike() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let (backend, polled) = table_lookup(vec![]);
    // The good key through a backend that answers later: the cache, then the lockout's
    // known-good mark, are both filled by a real lookup.
    let store_for_backend = store.clone();
    let backend = move |hash: KeyHash| {
        let found = store_for_backend
            .lookup(&hash.into())
            .now()
            .ok()
            .unwrap_or(Ok(None));
        let miss = backend(hash);
        async move {
            let _ = miss.await;
            found.map_err(BoxError::from)
        }
    };
    let cache = CachedLookup::new(backend);
    let svc = Keygate::builder(cache.clone())
        .failed_attempts(Some(Quota::per_minute(nz(3))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let (a, b) = ("203.0.113.10:1", "198.51.100.20:1");
    // Both clients used the valid key (known good, cached).
    assert_eq!(status_of(&svc, req(good.expose_secret(), a)).await, 200);
    assert_eq!(status_of(&svc, req(good.expose_secret(), b)).await, 200);
    let after_fill = polled.load(Ordering::SeqCst);
    let variant = mistype(good.expose_secret());
    let stranger = legacy_secret();
    for i in 0..5 {
        let of_cached = whole(&svc, req(&variant, a)).await;
        let of_unknown = whole(&svc, req(&stranger, b)).await;
        assert_eq!(of_cached, of_unknown, "attempt {i}");
        let expected = if i < 3 { 401 } else { 429 };
        assert_eq!(
            of_cached.0.as_u16(),
            expected,
            "attempt {i}: {}",
            of_cached.2
        );
    }
    assert_eq!(
        polled.load(Ordering::SeqCst),
        after_fill,
        "a mistyped key was looked up"
    );
    assert_eq!(cache.len(), 1, "a mistyped key was cached");
    // The valid key still works from both turned-away addresses.
    assert_eq!(status_of(&svc, req(good.expose_secret(), a)).await, 200);
    assert_eq!(status_of(&svc, req(good.expose_secret(), b)).await, 200);
}

/// Claim (b) without any cache: a closure lookup, a `MemoryStore`; mistyped keys turn a
/// client away after the failed-attempt budget, and none reaches the closure's backend.
#[tokio::test]
async fn held_mistyped_keys_spend_the_budget_without_a_cache() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let variant = mistype(good.expose_secret());
    let (closure, polled) = table_lookup(vec![(good.hash(), record("k"))]);
    let by_closure = Keygate::builder(closure)
        .failed_attempts(Some(Quota::per_minute(nz(2))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    let by_store = Keygate::builder(store)
        .failed_attempts(Some(Quota::per_minute(nz(2))))
        .clock(clock())
        .build()
        .unwrap()
        .layer(service_fn(ok));
    for (i, expected) in [401, 401, 429, 429].into_iter().enumerate() {
        let one = whole(&by_closure, get(&variant)).await;
        let two = whole(&by_store, get(&variant)).await;
        assert_eq!(one.0.as_u16(), expected, "closure, attempt {i}");
        assert_eq!(one, two, "attempt {i}");
    }
    assert_eq!(polled.load(Ordering::SeqCst), 0);
}

/// Claim (d), the checked paths: route variants sharing one cache, many mistyped keys,
/// valid keys filled in between: the cache holds the valid key and nothing else.
#[tokio::test]
async fn held_a_checked_stack_and_its_variants_cache_nothing_for_a_wrong_checksum() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| {
            r.with_scopes(["read"])
        })
        .unwrap();
    let cache = CachedLookup::over_store(store.clone());
    let stack = Keygate::builder(cache.clone())
        .failed_attempts(None)
        .clock(clock())
        .build()
        .unwrap();
    let variant = stack.route().scopes(["read"]).cost(2).build().unwrap();
    let nested = stack.layer(variant.layer(service_fn(ok)));
    let plain = stack.layer(service_fn(ok));
    for _ in 0..20 {
        assert_eq!(status_of(&nested, get(&legacy_secret())).await, 401);
        assert_eq!(status_of(&plain, get(&legacy_secret())).await, 401);
        assert_eq!(
            status_of(&plain, get(&mistype(good.expose_secret()))).await,
            401
        );
    }
    assert_eq!(cache.len(), 0);
    assert_eq!(status_of(&nested, get(good.expose_secret())).await, 200);
    assert_eq!(cache.len(), 1);
}

/// Claim (e): `KeyFormat::any()` still takes keys of any shape to the lookup.
#[tokio::test]
async fn held_any_format_accepts_any_shape() {
    let odd = [
        "x",
        "abcdef",
        "000000",
        "kg_live_short",
        "kg_live_!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        &legacy_secret(),
        "sk-proj-0123456789",
    ];
    let (lookup, polled) = table_lookup(
        odd.iter()
            .map(|s| (KeyHash::of(s), record(&format!("id-{s}"))))
            .collect(),
    );
    for cached in [false, true] {
        let svc = if cached {
            AuthLayer::builder(CachedLookup::new(lookup.clone()))
                .format(KeyFormat::any())
                .build()
                .unwrap()
                .layer(service_fn(ok))
                .boxed_clone()
        } else {
            AuthLayer::builder(lookup.clone())
                .format(KeyFormat::any())
                .build()
                .unwrap()
                .layer(service_fn(ok))
                .boxed_clone()
        };
        for s in odd {
            let (status, body) = status_and_body(&svc, get(s)).await;
            assert_eq!(status, 200, "{s:?}: {body}");
        }
    }
    assert!(polled.load(Ordering::SeqCst) >= odd.len());
    assert!(KeyFormat::any().check("é").is_ok());
}

/// Claim (f): with prefixes where one starts the other, each key goes to its environment,
/// and a mistyped key of either is refused as a checksum error, never as the other one.
#[tokio::test]
async fn held_nested_prefixes_route_to_their_environment() {
    for (live, test) in [("sk_", "sk_test_"), ("sk_live_x", "sk_live_"), ("a", "ab")] {
        let format = KeyFormat::new(live, test).unwrap();
        let store = MemoryStore::builder().format(format.clone()).build();
        let owner = Owner::new("o", "o");
        let l = store
            .issue(owner.clone(), Environment::Live, |r| r)
            .unwrap();
        let t = store.issue(owner, Environment::Test, |r| r).unwrap();
        assert_eq!(format.check(l.expose_secret()), Ok(Some(Environment::Live)));
        assert_eq!(format.check(t.expose_secret()), Ok(Some(Environment::Test)));
        for key in [&l, &t] {
            let bad = mistype_in(key.expose_secret());
            assert_eq!(
                format.check(&bad),
                Err(FormatError::Checksum),
                "{live} {test}"
            );
        }
        let stack = Keygate::builder(CachedLookup::over_store(store))
            .format(format.clone())
            .clock(clock())
            .build()
            .unwrap();
        let live_only = stack
            .route()
            .environment(Environment::Live)
            .build()
            .unwrap()
            .layer(service_fn(ok));
        let test_only = stack
            .route()
            .environment(Environment::Test)
            .build()
            .unwrap()
            .layer(service_fn(ok));
        for _ in 0..2 {
            assert_eq!(status_of(&live_only, get(l.expose_secret())).await, 200);
            assert_eq!(status_of(&test_only, get(t.expose_secret())).await, 200);
            assert_eq!(status_of(&live_only, get(t.expose_secret())).await, 403);
            assert_eq!(status_of(&test_only, get(l.expose_secret())).await, 403);
            for key in [&l, &t] {
                let (status, body) =
                    status_and_body(&live_only, get(&mistype_in(key.expose_secret()))).await;
                assert_eq!(
                    (status.as_u16(), code_of(&body).as_str()),
                    (401, "invalid_api_key")
                );
            }
        }
    }
}

/// `mistype` without the default-format assertion.
fn mistype_in(secret: &str) -> String {
    let mut s = secret.to_owned();
    let last = s.pop().unwrap();
    s.push(if last == 'a' { 'b' } else { 'a' });
    s
}

/// Claim (g) through the public API and the layer: odd strings (short, exactly six
/// characters, non-ASCII at every place, right length with multi-byte characters) neither
/// panic `KeyFormat::check` nor the layer, and are all refused.
#[tokio::test]
async fn held_odd_inputs_panic_nothing() {
    let formats = [
        KeyFormat::default(),
        KeyFormat::new("sk_", "sk_test_").unwrap(),
    ];
    let good = KeyFormat::default()
        .generate(Environment::Live)
        .unwrap()
        .expose_secret()
        .to_owned();
    let mut inputs: Vec<String> = vec![
        String::new(),
        "a".into(),
        "000000".into(),
        "zzzzzz".into(),
        "kg_live_".into(),
        "kg_live_000000".into(),
        "éééééé".into(),
        "kg_live_".to_owned() + &"é".repeat(15),
        "kg_live_".to_owned() + &"0".repeat(24) + "ééé",
        "kg_live_".to_owned() + &"0".repeat(27) + "é",
        "kg_live_".to_owned() + &"0".repeat(29) + "\u{ff}",
    ];
    for i in 0..good.len() {
        for c in ['é', '\u{0}', 'Z', '_', '€'] {
            let mut s: Vec<char> = good.chars().collect();
            s[i] = c;
            inputs.push(s.into_iter().collect());
        }
        inputs.push(good[..i].to_owned());
    }
    let svc = AuthLayer::new(MemoryStore::new()).layer(service_fn(ok));
    for s in &inputs {
        for f in &formats {
            assert!(f.check(s).is_err() || s == &good, "{s:?}");
        }
        if let Ok(value) = http::HeaderValue::from_bytes(s.as_bytes()) {
            let mut r = Request::get("/").body(Body::default()).unwrap();
            r.headers_mut().insert("x-api-key", value);
            let (status, _) = status_and_body(&svc, r).await;
            assert_eq!(status, 401, "{s:?}");
        }
    }
}

/// Claim (a) with `SqlStore` on SQLite: a mistyped key of a stored key reaches no query
/// (the store's lookup future is never polled), cached or not; the stored key passes.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn held_sqlite_sees_no_mistyped_key() {
    use keygate::store::{KeyStore, NewKey, OwnerStore, SqlStore};

    #[derive(Clone)]
    struct Counted(SqlStore, Arc<AtomicUsize>);
    struct Polled<F>(Pin<Box<F>>, Arc<AtomicUsize>);
    impl<F: Future> Future for Polled<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.as_mut().poll(cx)
        }
    }
    impl KeyLookup for Counted {
        type Error = <SqlStore as KeyLookup>::Error;
        type Future = Polled<<SqlStore as KeyLookup>::Future>;
        fn lookup(
            &self,
            key: &PresentedKey<'_>,
        ) -> Answer<LookupResult<Self::Error>, Self::Future> {
            match self.0.lookup(key) {
                Answer::Now(now) => Answer::Now(now),
                Answer::Later(f) => Answer::Later(Polled(Box::pin(f), Arc::clone(&self.1))),
            }
        }
    }

    let store = SqlStore::connect("sqlite::memory:").await.unwrap();
    store.add_owner("ada", None).await.unwrap();
    let created = store
        .create(NewKey::new("ada", "k", Environment::Live))
        .await
        .unwrap();
    let good: ApiKey = created.secret;
    let polls = Arc::new(AtomicUsize::new(0));
    let counted = Counted(store, Arc::clone(&polls));
    let plain = AuthLayer::new(counted.clone()).layer(service_fn(ok));
    let cached = AuthLayer::new(CachedLookup::new(counted)).layer(service_fn(ok));
    let variant = mistype(good.expose_secret());
    assert_eq!(status_of(&plain, get(&variant)).await, 401);
    assert_eq!(status_of(&cached, get(&variant)).await, 401);
    assert_eq!(polls.load(Ordering::SeqCst), 0);
    assert_eq!(status_of(&cached, get(good.expose_secret())).await, 200);
    assert_eq!(status_of(&plain, get(good.expose_secret())).await, 200);
    let after = polls.load(Ordering::SeqCst);
    assert!(after > 0);
    assert_eq!(status_of(&cached, get(&variant)).await, 401);
    assert_eq!(status_of(&plain, get(&variant)).await, 401);
    assert_eq!(polls.load(Ordering::SeqCst), after);
}

/// Claim 2: a route variant (cost 3) inside the stack it was made from charges 3 in all,
/// neither 1 (the outer charge taken for the whole) nor 4 (charged twice); a stack built
/// apart (no variant, its marker never set) charges its own 1 beside it.
#[tokio::test]
async fn held_a_route_variant_inside_its_stack_charges_its_cost_once() {
    let store = MemoryStore::new();
    let good = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let stack = Keygate::builder(store.clone())
        .default_quota(Quota::per_minute(nz(10)))
        .clock(clock())
        .build()
        .unwrap();
    let expensive = stack.route().cost(3).build().unwrap();
    let nested = stack.layer(expensive.layer(service_fn(ok)));
    let plain = stack.layer(service_fn(ok));
    // 3 + 3 + 3 = 9 of 10: a fourth costs 3 more and is refused, its outer token refunded.
    for i in 0..3 {
        assert_eq!(
            status_of(&nested, get(good.expose_secret())).await,
            200,
            "{i}"
        );
    }
    assert_eq!(status_of(&nested, get(good.expose_secret())).await, 429);
    assert_eq!(status_of(&plain, get(good.expose_secret())).await, 200);
    assert_eq!(status_of(&plain, get(good.expose_secret())).await, 429);

    // Two stacks of their own states, one inside the other, both marking their charges
    // (each has a variant): the inner one charges its own token for every request, never
    // taking the outer one's marker for its own.
    let a = Keygate::builder(store.clone())
        .default_quota(Quota::per_minute(nz(10)))
        .clock(clock())
        .build()
        .unwrap();
    let _marks = a.route().cost(3).build().unwrap();
    let b = Keygate::builder(store)
        .default_quota(Quota::per_minute(nz(4)))
        .clock(clock())
        .build()
        .unwrap();
    let _marks_too = b.route().cost(2).build().unwrap();
    let both = a.layer(b.layer(service_fn(ok)));
    for i in 0..4 {
        assert_eq!(
            status_of(&both, get(good.expose_secret())).await,
            200,
            "{i}"
        );
    }
    assert_eq!(status_of(&both, get(good.expose_secret())).await, 429);
    let b_alone = b.layer(service_fn(ok));
    assert_eq!(status_of(&b_alone, get(good.expose_secret())).await, 429);
    let a_alone = a.layer(service_fn(ok));
    assert_eq!(status_of(&a_alone, get(good.expose_secret())).await, 200);
}
