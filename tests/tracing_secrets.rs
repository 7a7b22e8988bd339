//! Nothing logs a secret: every request cycle the auth layer can run (accepted, and every
//! rejection it can produce, over a plain store, a `CachedLookup`, a failing and a hanging
//! lookup) is run under a `tracing` subscriber at TRACE level that writes into memory. The
//! log must name the key ids of the keys that were found, and must contain no secret: not
//! the full key, not the part after its prefix, not any ten characters of that part, not
//! the Basic encoding of it.

// Test code: a failed `unwrap` is a failed test, which is what we want.

mod common;

use common::capture::Capture;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate::error::BoxError;
use keygate::key::Environment;
use keygate::key::{ApiKey, KeyFormat, KeyHash, KeyId};
use keygate::lookup::{CachedLookup, KeyLookup, LookupResult};
use keygate::record::{KeyRecord, Owner, Restrictions, Status};
use keygate::reject::{Reason, Rejection};
use keygate::store::MemoryStore;
use keygate::validate::{PeerAddr, SiteResolver};
use keygate::{AuthLayer, Principal};
use tower::{service_fn, Layer, ServiceExt};

// ---------------------------------------------------------------------------------------
// Capturing the log
// ---------------------------------------------------------------------------------------

/// The ways a secret could leak into a log.
fn leaks(secret: &str) -> Vec<String> {
    let mut out = vec![
        secret.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(format!("{secret}:")),
    ];
    let format = KeyFormat::default();
    let body = [Environment::Live, Environment::Test]
        .into_iter()
        .find_map(|env| secret.strip_prefix(format.prefix(env)))
        .unwrap_or(secret);
    out.push(body.to_owned());
    // Any ten consecutive characters of the random part (a truncated secret is a leak).
    if body.len() >= 10 {
        for start in 0..=body.len() - 10 {
            out.push(body[start..start + 10].to_owned());
        }
    }
    out
}

fn assert_no_secret(log: &str, secrets: &[String], context: &str) {
    for secret in secrets {
        for leak in leaks(secret) {
            assert!(
                !log.contains(&leak),
                "{context}: the log shows (part of) a secret: {leak:?}\n--- log ---\n{log}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Driving the layer
// ---------------------------------------------------------------------------------------

type Body = Full<Bytes>;

/// The inner service: 200 naming the principal.
async fn echo(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let who = req
        .extensions()
        .get::<Principal>()
        .map_or_else(|| "anonymous".to_owned(), |p| p.key_id().to_string());
    Ok(Response::new(Full::new(Bytes::from(who))))
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    rejection: Option<Rejection>,
}

impl Reply {
    fn code(&self) -> String {
        let value: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body));
        value["code"].as_str().unwrap_or_default().to_owned()
    }
}

async fn cycle<L: KeyLookup>(layer: &AuthLayer<L>, req: Request<Body>) -> Reply {
    let res = layer.layer(service_fn(echo)).oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        rejection: parts.extensions.get::<Rejection>().cloned(),
        headers: parts.headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

fn get(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::default()).unwrap()
}

fn with_peer(mut req: Request<Body>, peer: &str) -> Request<Body> {
    req.extensions_mut()
        .insert(PeerAddr(peer.parse::<SocketAddr>().unwrap()));
    req
}

fn basic(secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{secret}:"))
    )
}

/// What one request cycle must give.
enum Expect {
    /// 200 from the inner service with this key as the principal.
    Accepted(KeyId),
    /// A rejection; with the key id when the key was found.
    Rejected(Reason, Option<KeyId>),
}

/// Runs one cycle with a fresh log and checks the response and the log; returns the log.
async fn check<L: KeyLookup>(
    name: &str,
    capture: &Capture,
    secrets: &[String],
    layer: &AuthLayer<L>,
    req: Request<Body>,
    expect: Expect,
) -> String {
    let _ = capture.take();
    let reply = cycle(layer, req).await;
    let log = capture.take();
    assert!(!log.trim().is_empty(), "{name}: nothing was logged");
    match expect {
        Expect::Accepted(id) => {
            assert_eq!(reply.status, StatusCode::OK, "{name}: {}", reply.body);
            assert_eq!(reply.body, id.as_str(), "{name}");
            assert!(reply.rejection.is_none(), "{name}");
            assert!(
                log.contains(id.as_str()),
                "{name}: key id not logged:\n{log}"
            );
        }
        Expect::Rejected(reason, id) => {
            assert_eq!(reply.status, reason.status(), "{name}: {}", reply.body);
            assert_eq!(reply.code(), reason.code(), "{name}");
            assert_eq!(
                reply.headers.get("cache-control").unwrap(),
                "no-store",
                "{name}"
            );
            let rejection = reply.rejection.expect("the typed rejection");
            assert_eq!(rejection.reason(), reason, "{name}");
            assert_eq!(rejection.key_id(), id.as_ref(), "{name}");
            assert!(
                log.contains(reason.code()),
                "{name}: outcome not logged:\n{log}"
            );
            if let Some(id) = id {
                assert!(
                    log.contains(id.as_str()),
                    "{name}: key id not logged:\n{log}"
                );
            }
        }
    }
    assert_no_secret(&log, secrets, name);
    log
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

struct Keys {
    store: MemoryStore,
    full: (ApiKey, KeyId),
    test_env: (ApiKey, KeyId),
    disabled: (ApiKey, KeyId),
    deleted: (ApiKey, KeyId),
    revoked: (ApiKey, KeyId),
    expired: (ApiKey, KeyId),
    inactive_owner: (ApiKey, KeyId),
    ip_restricted: (ApiKey, KeyId),
    site_restricted: (ApiKey, KeyId),
    /// Well-formed, never stored.
    unknown: ApiKey,
    /// `full` with its last character changed.
    bad_checksum: String,
}

impl Keys {
    fn new() -> Self {
        let store = MemoryStore::new();
        let owner = Owner::new("o1", "ada");
        let issue = |env: Environment, owner: Owner, edit: &dyn Fn(KeyRecord) -> KeyRecord| {
            let mut id = None;
            let key = store
                .issue(owner, env, |r| {
                    let r = edit(r);
                    id = Some(r.id.clone());
                    r
                })
                .unwrap();
            (key, id.unwrap())
        };
        let live = Environment::Live;
        let full = issue(live, owner.clone(), &|r| {
            r.with_scopes(["read", "messages:write"])
        });
        let mut inactive = owner.clone();
        inactive.active = false;
        let bad_checksum = {
            let mut s = full.0.expose_secret().to_owned();
            let last = s.pop().unwrap();
            s.push(if last == 'a' { 'b' } else { 'a' });
            s
        };
        Self {
            test_env: issue(Environment::Test, owner.clone(), &|r| {
                r.with_scopes(["read"])
            }),
            disabled: issue(live, owner.clone(), &|r| r.with_status(Status::Disabled)),
            deleted: issue(live, owner.clone(), &|r| r.with_status(Status::Deleted)),
            revoked: issue(live, owner.clone(), &|r| r.with_status(Status::Revoked)),
            expired: issue(live, owner.clone(), &|r| {
                r.with_expiry(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
            }),
            inactive_owner: issue(live, inactive, &|r| r),
            ip_restricted: issue(live, owner.clone(), &|r| {
                r.with_restrictions(Restrictions {
                    ips: vec!["10.0.0.0/8".parse().unwrap()],
                    sites: vec![],
                })
            }),
            site_restricted: issue(live, owner, &|r| {
                r.with_restrictions(Restrictions {
                    ips: vec![],
                    sites: vec!["123".into()],
                })
            }),
            full,
            unknown: KeyFormat::default().generate(live).unwrap(),
            bad_checksum,
            store,
        }
    }

    /// Every secret a request of these tests carries.
    fn secrets(&self) -> Vec<String> {
        let mut out: Vec<String> = [
            &self.full,
            &self.test_env,
            &self.disabled,
            &self.deleted,
            &self.revoked,
            &self.expired,
            &self.inactive_owner,
            &self.ip_restricted,
            &self.site_restricted,
        ]
        .iter()
        .map(|(key, _)| key.expose_secret().to_owned())
        .collect();
        out.push(self.unknown.expose_secret().to_owned());
        out.push(self.bad_checksum.clone());
        out
    }
}

fn id(key: &(ApiKey, KeyId)) -> KeyId {
    key.1.clone()
}

fn secret(key: &(ApiKey, KeyId)) -> &str {
    key.0.expose_secret()
}

/// Every outcome the auth layer can produce for a lookup that answers (all but
/// `auth_unavailable`), checked one by one; returns the whole log.
async fn run_every_outcome<L: KeyLookup>(
    keys: &Keys,
    capture: &Capture,
    layer: &AuthLayer<L>,
) -> String {
    use Reason::*;
    let secrets = keys.secrets();
    let scoped = layer.require_scopes(["admin"]);
    let test_only = layer.require_environment(Environment::Test);
    let bearer_full = format!("Bearer {}", secret(&keys.full));
    let bearer_test = format!("Bearer {}", secret(&keys.test_env));
    let basic_full = basic(secret(&keys.full));
    let mut log = String::new();

    let cases: Vec<(&str, &AuthLayer<L>, Request<Body>, Expect)> = vec![
        (
            "accepted",
            layer,
            get("/v1/health", &[("x-api-key", secret(&keys.full))]),
            Expect::Accepted(id(&keys.full)),
        ),
        (
            "accepted bearer",
            layer,
            get("/v1/health", &[("authorization", &bearer_full)]),
            Expect::Accepted(id(&keys.full)),
        ),
        (
            "accepted basic",
            layer,
            get("/v1/health", &[("authorization", &basic_full)]),
            Expect::Accepted(id(&keys.full)),
        ),
        (
            "missing",
            layer,
            get("/v1/health", &[]),
            Expect::Rejected(MissingApiKey, None),
        ),
        (
            "malformed",
            layer,
            get("/v1/health", &[("x-api-key", "not-a-key")]),
            Expect::Rejected(InvalidApiKey, None),
        ),
        (
            "bad checksum",
            layer,
            get("/v1/health", &[("x-api-key", &keys.bad_checksum)]),
            Expect::Rejected(InvalidApiKey, None),
        ),
        (
            "unknown",
            layer,
            get("/v1/health", &[("x-api-key", keys.unknown.expose_secret())]),
            Expect::Rejected(InvalidApiKey, None),
        ),
        (
            "deleted",
            layer,
            get("/v1/health", &[("x-api-key", secret(&keys.deleted))]),
            Expect::Rejected(InvalidApiKey, Some(id(&keys.deleted))),
        ),
        (
            "revoked",
            layer,
            get("/v1/health", &[("x-api-key", secret(&keys.revoked))]),
            Expect::Rejected(InvalidApiKey, Some(id(&keys.revoked))),
        ),
        (
            "expired",
            layer,
            get("/v1/health", &[("x-api-key", secret(&keys.expired))]),
            Expect::Rejected(ApiKeyExpired, Some(id(&keys.expired))),
        ),
        (
            "disabled",
            layer,
            get("/v1/health", &[("x-api-key", secret(&keys.disabled))]),
            Expect::Rejected(ApiKeyDisabled, Some(id(&keys.disabled))),
        ),
        (
            "owner inactive",
            layer,
            get("/v1/health", &[("x-api-key", secret(&keys.inactive_owner))]),
            Expect::Rejected(OwnerInactive, Some(id(&keys.inactive_owner))),
        ),
        (
            "ambiguous",
            layer,
            get(
                "/v1/health",
                &[
                    ("x-api-key", secret(&keys.full)),
                    ("authorization", &bearer_test),
                ],
            ),
            Expect::Rejected(AmbiguousCredentials, None),
        ),
        (
            "ip allowed",
            layer,
            with_peer(
                get("/v1/health", &[("x-api-key", secret(&keys.ip_restricted))]),
                "10.1.2.3:4000",
            ),
            Expect::Accepted(id(&keys.ip_restricted)),
        ),
        (
            "ip not allowed",
            layer,
            with_peer(
                get("/v1/health", &[("x-api-key", secret(&keys.ip_restricted))]),
                "192.0.2.1:4000",
            ),
            Expect::Rejected(IpNotAllowed, Some(id(&keys.ip_restricted))),
        ),
        (
            "site allowed",
            layer,
            get(
                "/api/123/resource",
                &[("x-api-key", secret(&keys.site_restricted))],
            ),
            Expect::Accepted(id(&keys.site_restricted)),
        ),
        (
            "site not allowed",
            layer,
            get(
                "/api/999/resource",
                &[("x-api-key", secret(&keys.site_restricted))],
            ),
            Expect::Rejected(SiteNotAllowed, Some(id(&keys.site_restricted))),
        ),
        (
            "insufficient scope",
            &scoped,
            get("/v1/admin", &[("x-api-key", secret(&keys.full))]),
            Expect::Rejected(InsufficientScope, Some(id(&keys.full))),
        ),
        (
            "environment mismatch",
            &test_only,
            get("/v1/sandbox", &[("x-api-key", secret(&keys.full))]),
            Expect::Rejected(EnvironmentMismatch, Some(id(&keys.full))),
        ),
        (
            "test key on a test route",
            &test_only,
            get("/v1/sandbox", &[("x-api-key", secret(&keys.test_env))]),
            Expect::Accepted(id(&keys.test_env)),
        ),
    ];
    for (name, layer, req, expect) in cases {
        log.push_str(&check(name, capture, &secrets, layer, req, expect).await);
    }

    // A gRPC request gets a gRPC status; its log is as clean.
    let _ = capture.take();
    let req = get(
        "/grpc.health.v1.Health/Check",
        &[
            ("x-api-key", secret(&keys.disabled)),
            ("content-type", "application/grpc"),
        ],
    );
    let reply = cycle(layer, req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["grpc-status"], "16");
    let grpc_log = capture.take();
    assert!(grpc_log.contains(id(&keys.disabled).as_str()), "{grpc_log}");
    assert_no_secret(&grpc_log, &secrets, "grpc");
    log.push_str(&grpc_log);
    log
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn every_outcome_over_the_store_logs_key_ids_and_no_secret() {
    let capture = Capture::default();
    let _guard = capture.install();
    let keys = Keys::new();
    let layer = AuthLayer::builder(keys.store.clone())
        .site(SiteResolver::PathSegment(1))
        .build()
        .unwrap();

    let log = run_every_outcome(&keys, &capture, &layer).await;

    assert!(log.contains("api key accepted"), "{log}");
    assert!(log.contains("api key rejected"), "{log}");
    assert_no_secret(&log, &keys.secrets(), "whole run");
}

#[tokio::test]
async fn every_outcome_through_a_cached_lookup_logs_key_ids_and_no_secret() {
    let capture = Capture::default();
    let _guard = capture.install();
    let keys = Keys::new();
    let secrets = keys.secrets();

    // A cache in front of the store itself (answered at once on a miss too)...
    let direct = AuthLayer::builder(CachedLookup::new(keys.store.clone()))
        .site(SiteResolver::PathSegment(1))
        .build()
        .unwrap();
    let mut log = run_every_outcome(&keys, &capture, &direct).await;
    // ...and run again: every answer now comes from the cache.
    assert!(!direct.lookup().is_empty());
    log.push_str(&run_every_outcome(&keys, &capture, &direct).await);

    // A cache in front of an asynchronous backend: misses go through the awaited path.
    let calls = Arc::new(AtomicUsize::new(0));
    let backend = {
        let store = keys.store.clone();
        let calls = Arc::clone(&calls);
        move |hash: KeyHash| {
            calls.fetch_add(1, Ordering::SeqCst);
            let answer = store.lookup(&hash.into());
            async move {
                tokio::task::yield_now().await;
                answer.await
            }
        }
    };
    let awaited = AuthLayer::builder(CachedLookup::new(backend))
        .site(SiteResolver::PathSegment(1))
        .build()
        .unwrap();
    log.push_str(&run_every_outcome(&keys, &capture, &awaited).await);
    let after_first = calls.load(Ordering::SeqCst);
    assert!(after_first > 0, "the backend was never asked");
    log.push_str(&run_every_outcome(&keys, &capture, &awaited).await);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        after_first,
        "the second run should be served from the cache"
    );

    assert!(log.contains("api key accepted"), "{log}");
    assert_no_secret(&log, &secrets, "whole run");
}

#[tokio::test]
async fn a_failing_lookup_logs_its_error_and_no_secret() {
    let capture = Capture::default();
    let _guard = capture.install();
    let keys = Keys::new();
    let secrets = keys.secrets();
    let failing = |_: KeyHash| async {
        Err::<Option<Arc<KeyRecord>>, BoxError>("key store unreachable".into())
    };
    let layer = AuthLayer::builder(failing).build().unwrap();
    let log = check(
        "lookup error",
        &capture,
        &secrets,
        &layer,
        get("/v1/health", &[("x-api-key", secret(&keys.full))]),
        Expect::Rejected(Reason::AuthUnavailable, None),
    )
    .await;
    assert!(log.contains("key store unreachable"), "{log}");

    // Behind a cache: errors are not cached, and still logged without the secret.
    let cached = AuthLayer::builder(CachedLookup::new(failing))
        .build()
        .unwrap();
    for round in 0..2 {
        let log = check(
            "cached lookup error",
            &capture,
            &secrets,
            &cached,
            get(
                "/v1/health",
                &[("authorization", &basic(secret(&keys.full)))],
            ),
            Expect::Rejected(Reason::AuthUnavailable, None),
        )
        .await;
        assert!(
            log.contains("key store unreachable"),
            "round {round}: {log}"
        );
    }
}

/// Fails, rather than hangs, when the layer never answers (time is paused, so the
/// minute passes at once once nothing else can run).
async fn within_a_virtual_minute<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .expect("the layer never answered")
}

#[tokio::test]
async fn a_lookup_timeout_logs_no_secret_and_takes_no_real_time() {
    tokio::time::pause();
    let capture = Capture::default();
    let _guard = capture.install();
    let keys = Keys::new();
    let secrets = keys.secrets();
    let hanging = |_: KeyHash| std::future::pending::<LookupResult<BoxError>>();
    let timeout = Duration::from_secs(2);
    let layer = AuthLayer::builder(hanging)
        .lookup_timeout(Some(timeout))
        .build()
        .unwrap();

    let virtual_start = tokio::time::Instant::now();
    let real_start = std::time::Instant::now();
    let bearer = format!("Bearer {}", secret(&keys.full));
    let log = within_a_virtual_minute(check(
        "lookup timeout",
        &capture,
        &secrets,
        &layer,
        get("/v1/health", &[("authorization", &bearer)]),
        Expect::Rejected(Reason::AuthUnavailable, None),
    ))
    .await;
    assert!(
        virtual_start.elapsed() >= timeout,
        "answered before the timeout"
    );
    assert!(
        real_start.elapsed() < timeout,
        "the timeout took real time: {:?}",
        real_start.elapsed()
    );
    assert!(log.contains("timed out"), "{log}");

    // The same behind a cache, whose miss waits on the hanging backend.
    let cached = AuthLayer::builder(CachedLookup::new(hanging))
        .lookup_timeout(Some(timeout))
        .build()
        .unwrap();
    let log = within_a_virtual_minute(check(
        "cached lookup timeout",
        &capture,
        &secrets,
        &cached,
        get("/v1/health", &[("x-api-key", secret(&keys.full))]),
        Expect::Rejected(Reason::AuthUnavailable, None),
    ))
    .await;
    assert!(log.contains("timed out"), "{log}");
}
