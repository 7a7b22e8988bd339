use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::answer::Answer;
use crate::clock::FakeClock;
use crate::error::BoxError;
use crate::extract::Scheme;
use crate::key::Environment;
use crate::key::{ApiKey, KeyFormat, KeyHash, PresentedKey};
use crate::lookup::{CachedLookup, KeyLookup, LookupResult};
use crate::record::{KeyRecord, Owner, Principal, Restrictions, Status};
use crate::reject::{ProblemJson, Rejection};
use crate::store::MemoryStore;
use crate::validate::{PeerAddr, SiteResolver};

type Body = Full<Bytes>;

async fn echo(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let who = req
        .extensions()
        .get::<Principal>()
        .map(|p| p.key_id().to_string())
        .unwrap_or_else(|| "anonymous".into());
    Ok(Response::new(Full::new(Bytes::from(who))))
}

struct Fixture {
    store: MemoryStore,
    clock: FakeClock,
    keys: std::collections::HashMap<&'static str, ApiKey>,
}

fn fixture() -> Fixture {
    let store = MemoryStore::new();
    let clock = FakeClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let now = clock.now_for_tests();
    let owner = Owner::new("o1", "ada");
    let mut inactive = owner.clone();
    inactive.active = false;
    let mut keys = std::collections::HashMap::new();
    let mut add = |name, env, owner: Owner, edit: &dyn Fn(KeyRecord) -> KeyRecord| {
        let key = store
            .issue(owner, env, |r| edit(r.with_name(name)))
            .unwrap();
        keys.insert(name, key);
    };
    add("full", Environment::Live, owner.clone(), &|r| {
        r.with_scopes(["read", "messages:write"])
    });
    add("test_env", Environment::Test, owner.clone(), &|r| {
        r.with_scopes(["read"])
    });
    add("disabled", Environment::Live, owner.clone(), &|r| {
        r.with_status(Status::Disabled)
    });
    add("deleted", Environment::Live, owner.clone(), &|r| {
        r.with_status(Status::Deleted)
    });
    add("revoked", Environment::Live, owner.clone(), &|r| {
        r.with_status(Status::Revoked)
    });
    add("expired", Environment::Live, owner.clone(), &|r| {
        r.with_expiry(now - Duration::from_secs(1))
    });
    add("inactive_owner", Environment::Live, inactive, &|r| r);
    add("ip_restricted", Environment::Live, owner.clone(), &|r| {
        r.with_restrictions(Restrictions {
            ips: vec!["10.0.0.0/8".parse().unwrap()],
            sites: vec![],
        })
    });
    add("site_restricted", Environment::Live, owner, &|r| {
        r.with_restrictions(Restrictions {
            ips: vec![],
            sites: vec!["123".into()],
        })
    });
    Fixture { store, clock, keys }
}

impl FakeClock {
    fn now_for_tests(&self) -> SystemTime {
        crate::clock::Clock::now(self)
    }
}

fn layer(f: &Fixture) -> AuthLayer<MemoryStore> {
    AuthLayer::builder(f.store.clone())
        .site(SiteResolver::PathSegment(1))
        .clock(f.clock.clone())
        .build()
        .unwrap()
}

async fn send<S>(
    svc: S,
    req: Request<Body>,
) -> (StatusCode, http::HeaderMap, String, Option<Rejection>)
where
    S: Service<
        Request<Body>,
        Response = Response<crate::reject::ResponseBody<Body>>,
        Error = Infallible,
    >,
{
    let res = svc.oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).unwrap(),
        parts.extensions.get::<Rejection>().cloned(),
    )
}

fn code_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn every_rejection_row_through_the_layer() {
    let f = fixture();
    let k = |name: &str| f.keys[name].expose_secret().to_owned();
    let wrong_checksum = {
        let mut s = k("full");
        let last = s.pop().unwrap();
        s.push(if last == 'a' { 'b' } else { 'a' });
        s
    };
    let unknown = KeyFormat::default().generate(Environment::Live).unwrap();
    // (name, path, headers, peer, route layer, status, code)
    type Case = (
        &'static str,
        &'static str,
        Vec<(&'static str, String)>,
        Option<&'static str>,
        Option<&'static str>,
        Option<Environment>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "valid",
            "/v1/health",
            vec![("x-api-key", k("full"))],
            None,
            None,
            None,
            200,
            "",
        ),
        (
            "valid bearer",
            "/v1/health",
            vec![("authorization", format!("Bearer {}", k("full")))],
            None,
            None,
            None,
            200,
            "",
        ),
        (
            "missing",
            "/v1/health",
            vec![],
            None,
            None,
            None,
            401,
            "missing_api_key",
        ),
        (
            "malformed",
            "/v1/health",
            vec![("x-api-key", "not a key".into())],
            None,
            None,
            None,
            401,
            "invalid_api_key",
        ),
        (
            "bad checksum",
            "/v1/health",
            vec![("x-api-key", wrong_checksum)],
            None,
            None,
            None,
            401,
            "invalid_api_key",
        ),
        (
            "unknown",
            "/v1/health",
            vec![("x-api-key", unknown.expose_secret().into())],
            None,
            None,
            None,
            401,
            "invalid_api_key",
        ),
        (
            "deleted",
            "/v1/health",
            vec![("x-api-key", k("deleted"))],
            None,
            None,
            None,
            401,
            "invalid_api_key",
        ),
        (
            "revoked",
            "/v1/health",
            vec![("x-api-key", k("revoked"))],
            None,
            None,
            None,
            401,
            "invalid_api_key",
        ),
        (
            "expired",
            "/v1/health",
            vec![("x-api-key", k("expired"))],
            None,
            None,
            None,
            401,
            "api_key_expired",
        ),
        (
            "disabled",
            "/v1/health",
            vec![("x-api-key", k("disabled"))],
            None,
            None,
            None,
            401,
            "api_key_disabled",
        ),
        (
            "owner inactive",
            "/v1/health",
            vec![("x-api-key", k("inactive_owner"))],
            None,
            None,
            None,
            401,
            "owner_inactive",
        ),
        (
            "ambiguous",
            "/v1/health",
            vec![
                ("x-api-key", k("full")),
                ("authorization", format!("Bearer {}", k("test_env"))),
            ],
            None,
            None,
            None,
            400,
            "ambiguous_credentials",
        ),
        (
            "ip allowed",
            "/v1/health",
            vec![("x-api-key", k("ip_restricted"))],
            Some("10.2.3.4:999"),
            None,
            None,
            200,
            "",
        ),
        (
            "ip not allowed",
            "/v1/health",
            vec![("x-api-key", k("ip_restricted"))],
            Some("192.0.2.1:999"),
            None,
            None,
            403,
            "ip_not_allowed",
        ),
        (
            "ip unknown",
            "/v1/health",
            vec![("x-api-key", k("ip_restricted"))],
            None,
            None,
            None,
            403,
            "ip_not_allowed",
        ),
        (
            "site allowed",
            "/api/123/resource",
            vec![("x-api-key", k("site_restricted"))],
            None,
            None,
            None,
            200,
            "",
        ),
        (
            "site not allowed",
            "/api/999/resource",
            vec![("x-api-key", k("site_restricted"))],
            None,
            None,
            None,
            403,
            "site_not_allowed",
        ),
        (
            "scope held",
            "/v1/messages",
            vec![("x-api-key", k("full"))],
            None,
            Some("messages:write"),
            None,
            200,
            "",
        ),
        (
            "scope missing",
            "/v1/messages",
            vec![("x-api-key", k("test_env"))],
            None,
            Some("messages:write"),
            None,
            403,
            "insufficient_scope",
        ),
        (
            "environment matches",
            "/v1/live",
            vec![("x-api-key", k("full"))],
            None,
            None,
            Some(Environment::Live),
            200,
            "",
        ),
        (
            "environment mismatch",
            "/v1/live",
            vec![("x-api-key", k("test_env"))],
            None,
            None,
            Some(Environment::Live),
            403,
            "environment_mismatch",
        ),
    ];
    let base = layer(&f);
    for (name, path, headers, peer, scope, env, status, code) in cases {
        let mut route = base.clone();
        if let Some(scope) = scope {
            route = route.require_scopes([scope]);
        }
        if let Some(env) = env {
            route = route.require_environment(env);
        }
        let svc = route.layer(service_fn(echo));
        let mut builder = Request::get(path);
        for (h, v) in &headers {
            builder = builder.header(*h, v.as_str());
        }
        let mut req = builder.body(Body::default()).unwrap();
        if let Some(peer) = peer {
            req.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
        }
        let (got_status, headers, body, rejection) = send(svc, req).await;
        assert_eq!(got_status.as_u16(), status, "{name}: {body}");
        if status == 200 {
            assert!(
                body.starts_with("key_"),
                "{name}: principal not passed on: {body}"
            );
            assert!(rejection.is_none());
        } else {
            assert_eq!(code_of(&body), code, "{name}");
            assert_eq!(headers["cache-control"], "no-store", "{name}");
            assert_eq!(headers["content-type"], "application/json", "{name}");
            assert_eq!(rejection.unwrap().reason().code(), code, "{name}");
            assert_eq!(
                headers.contains_key("www-authenticate"),
                status == 401 || code == "insufficient_scope",
                "{name}"
            );
        }
    }
}

#[tokio::test]
async fn bypass_preflight_and_swagger_but_not_lookalikes() {
    let f = fixture();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let svc = layer(&f).layer(service_fn(move |req: Request<Body>| {
        c.fetch_add(1, Ordering::SeqCst);
        echo(req)
    }));
    let preflight: &[(&str, &str)] = &[
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
    ];
    let grpc_preflight: &[(&str, &str)] = &[
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
        ("content-type", "application/grpc"),
    ];
    // (method, path, headers, status, reaches the service)
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Method, &str, Headers, u16, bool); 11] = [
        (Method::OPTIONS, "/v1/messages", preflight, 204, false),
        (
            Method::OPTIONS,
            "/grpc.health.v1.Health/Check",
            preflight,
            204,
            false,
        ),
        (Method::OPTIONS, "/v1/messages", &[], 401, false),
        (
            Method::OPTIONS,
            "/grpc.health.v1.Health/Check",
            &[],
            401,
            false,
        ),
        // A gRPC request is never a preflight: a trailers-only UNAUTHENTICATED.
        (
            Method::OPTIONS,
            "/grpc.health.v1.Health/Check",
            grpc_preflight,
            200,
            false,
        ),
        (Method::GET, "/swagger", &[], 200, true),
        (Method::GET, "/swagger/openapi.json", &[], 200, true),
        (Method::GET, "/swaggerx", &[], 401, false),
        (Method::GET, "/swagger/../v1/users/me", &[], 401, false),
        (Method::GET, "/swagger/%2e%2e/v1/users/me", &[], 401, false),
        (Method::GET, "/swagger/..;/v1/users/me", &[], 401, false),
    ];
    for (method, path, headers, status, reaches) in cases {
        let mut builder = Request::builder().method(method.clone()).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let before = calls.load(Ordering::SeqCst);
        let (got, h, body, _) = send(svc.clone(), builder.body(Body::default()).unwrap()).await;
        assert_eq!(got.as_u16(), status, "{method} {path} {headers:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst) - before,
            usize::from(reaches),
            "{method} {path}"
        );
        if reaches {
            assert_eq!(body, "anonymous");
        } else if status == 200 {
            assert_eq!(h["grpc-status"], "16");
        }
        if status == 204 {
            assert!(body.is_empty());
            assert!(
                h.keys().all(|k| !k.as_str().starts_with("access-control")),
                "{h:?}"
            );
        }
    }
    // A real preflight carrying a valid key is still answered by keygate, not the service.
    let req = Request::builder()
        .method(Method::OPTIONS)
        .uri("/v1/messages")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("x-api-key", f.keys["full"].expose_secret())
        .body(Body::default())
        .unwrap();
    let before = calls.load(Ordering::SeqCst);
    assert_eq!(send(svc.clone(), req).await.0, StatusCode::NO_CONTENT);
    assert_eq!(calls.load(Ordering::SeqCst), before);
    // A plain OPTIONS with a valid key is an ordinary authenticated request.
    let req = Request::builder()
        .method(Method::OPTIONS)
        .uri("/v1/messages")
        .header("x-api-key", f.keys["full"].expose_secret())
        .body(Body::default())
        .unwrap();
    assert_eq!(send(svc.clone(), req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn the_key_header_is_sensitive_when_the_service_sees_it() {
    let f = fixture();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let svc = layer(&f).layer(service_fn(move |req: Request<Body>| {
        s.lock().unwrap().push(format!("{:?}", req.headers()));
        echo(req)
    }));
    let key = f.keys["full"].expose_secret();
    let bearer = format!("Bearer {key}");
    let cases: [&[(&str, &str)]; 3] = [
        &[("x-api-key", key)],
        &[("authorization", &bearer)],
        // The same key twice under one name and once more in Authorization.
        &[
            ("x-api-key", key),
            ("x-api-key", key),
            ("authorization", &bearer),
        ],
    ];
    for headers in cases {
        let mut builder = Request::get("/v1/health").header("x-other", "visible");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let req = builder.body(Body::default()).unwrap();
        assert_eq!(send(svc.clone(), req).await.0, StatusCode::OK);
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    for debug in seen.iter() {
        assert!(!debug.contains(key), "{debug}");
        assert!(debug.contains("Sensitive"), "{debug}");
        assert!(debug.contains("visible"), "{debug}");
    }
}

#[tokio::test]
async fn www_authenticate_follows_rfc_6750() {
    let f = fixture();
    let svc = layer(&f).layer(service_fn(echo));
    let (_, h, _, _) = send(
        svc.clone(),
        Request::get("/").body(Body::default()).unwrap(),
    )
    .await;
    assert_eq!(h["www-authenticate"], "Bearer realm=\"api\"");
    let req = Request::get("/")
        .header("authorization", "Bearer nope")
        .body(Body::default())
        .unwrap();
    let (_, h, _, _) = send(svc.clone(), req).await;
    assert_eq!(
        h["www-authenticate"],
        "Bearer realm=\"api\", error=\"invalid_token\""
    );

    let only_header = AuthLayer::builder(f.store.clone())
        .schemes([Scheme::header("X-Mobid-Key").unwrap()])
        .realm("mid")
        .build()
        .unwrap()
        .layer(service_fn(echo));
    let (_, h, _, _) = send(
        only_header,
        Request::get("/").body(Body::default()).unwrap(),
    )
    .await;
    assert_eq!(h["www-authenticate"], "ApiKey realm=\"mid\"");
}

#[tokio::test]
async fn grpc_requests_get_a_grpc_status_whatever_the_renderer() {
    let f = fixture();
    let svc = AuthLayer::builder(f.store.clone())
        .renderer(ProblemJson::new())
        .clock(f.clock.clone())
        .build()
        .unwrap()
        .layer(service_fn(echo));
    let cases = [
        (None, "16"),
        (Some(f.keys["disabled"].expose_secret()), "16"),
    ];
    for (key, grpc_status) in cases {
        let mut b = Request::post("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc+proto");
        if let Some(key) = key {
            b = b.header("x-api-key", key);
        }
        let (status, h, body, _) = send(svc.clone(), b.body(Body::default()).unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(h["grpc-status"], grpc_status);
        assert_eq!(h["content-type"], "application/grpc+proto");
        assert!(body.is_empty());
    }
    let (status, h, body, _) = send(svc, Request::get("/").body(Body::default()).unwrap()).await;
    assert_eq!(status, 401);
    assert_eq!(h["content-type"], "application/problem+json");
    assert!(body.contains("\"type\":\"about:blank\""));
}

#[tokio::test]
async fn opaque_errors_fold_the_401_details() {
    let f = fixture();
    let svc = AuthLayer::builder(f.store.clone())
        .opaque_errors(true)
        .clock(f.clock.clone())
        .build()
        .unwrap()
        .layer(service_fn(echo));
    for name in ["expired", "disabled", "inactive_owner", "deleted"] {
        let req = Request::get("/")
            .header("x-api-key", f.keys[name].expose_secret())
            .body(Body::default())
            .unwrap();
        let (status, _, body, rejection) = send(svc.clone(), req).await;
        assert_eq!(status, 401);
        assert_eq!(code_of(&body), "invalid_api_key", "{name}");
        assert_ne!(
            rejection.unwrap().reason(),
            crate::reject::Reason::MissingApiKey
        );
    }
}

#[tokio::test]
async fn custom_header_and_prefix_as_in_the_mid_docs() {
    let store = MemoryStore::builder()
        .format(KeyFormat::new("mid_live_", "qk_").unwrap())
        .build();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Test, |r| r)
        .unwrap();
    assert!(key.expose_secret().starts_with("qk_"));
    let svc = AuthLayer::builder(store)
        .schemes([Scheme::header("X-Mobid-Key").unwrap()])
        .format(KeyFormat::new("mid_live_", "qk_").unwrap())
        .build()
        .unwrap()
        .layer(service_fn(echo));
    let req = Request::get("/v1/health")
        .header("X-Mobid-Key", key.expose_secret())
        .body(Body::default())
        .unwrap();
    assert_eq!(send(svc.clone(), req).await.0, 200);
    let req = Request::get("/v1/health")
        .header("X-API-KEY", key.expose_secret())
        .body(Body::default())
        .unwrap();
    assert_eq!(send(svc, req).await.0, 401);
}

/// A lookup that fails, or never answers.
#[derive(Clone)]
struct Broken {
    hang: bool,
}

impl KeyLookup for Broken {
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = LookupResult<BoxError>> + Send>>;

    fn lookup(&self, _: &PresentedKey<'_>) -> Answer<LookupResult<BoxError>, Self::Future> {
        Answer::Later(if self.hang {
            Box::pin(std::future::pending())
        } else {
            Box::pin(async { Err("connection refused".into()) })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn backend_errors_and_timeouts_are_503_never_401() {
    let key = KeyFormat::default().generate(Environment::Live).unwrap();
    for hang in [false, true] {
        let svc = AuthLayer::builder(Broken { hang })
            .lookup_timeout(Some(Duration::from_millis(250)))
            .build()
            .unwrap()
            .layer(service_fn(echo));
        let req = Request::get("/")
            .header("x-api-key", key.expose_secret())
            .body(Body::default())
            .unwrap();
        let (status, _, body, _) = send(svc, req).await;
        assert_eq!(status, 503, "hang={hang}");
        assert_eq!(code_of(&body), "auth_unavailable");
    }
}

#[tokio::test]
async fn route_variants_share_one_cache() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| {
            r.with_scopes(["read"])
        })
        .unwrap();
    let counting = {
        let calls = Arc::clone(&calls);
        let store = store.clone();
        move |hash: KeyHash| {
            calls.fetch_add(1, Ordering::SeqCst);
            let answer = store.lookup(&hash.into()).now().ok().unwrap_or(Ok(None));
            async move { answer }
        }
    };
    let base = AuthLayer::new(CachedLookup::new(counting));
    let read = base.require_scopes(["read"]).layer(service_fn(echo));
    let write = base.require_scopes(["write"]).layer(service_fn(echo));
    let plain = base.layer(service_fn(echo));
    let req = || {
        Request::get("/")
            .header("x-api-key", key.expose_secret())
            .body(Body::default())
            .unwrap()
    };
    assert_eq!(send(plain, req()).await.0, 200);
    assert_eq!(send(read, req()).await.0, 200);
    assert_eq!(send(write, req()).await.0, 403);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// An inner service that is ready once per `poll_ready`, and counts clones.
struct ReadyOnce {
    ready: bool,
    clones: Arc<AtomicUsize>,
}

impl Clone for ReadyOnce {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Self {
            ready: false,
            clones: Arc::clone(&self.clones),
        }
    }
}

impl Service<Request<Body>> for ReadyOnce {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.ready = true;
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        assert!(self.ready, "called a service that was not made ready");
        self.ready = false;
        std::future::ready(Ok(Response::new(Body::default())))
    }
}

#[tokio::test]
async fn the_ready_service_is_the_one_called() {
    let key = KeyFormat::default().generate(Environment::Live).unwrap();
    let record = KeyRecord::new(
        crate::key::KeyId::new("key_x"),
        Owner::new("o", "o"),
        Environment::Live,
    );
    let record = Arc::new(record);
    let hash = key.hash();
    // An asynchronous lookup, so the service must travel into the future.
    let lookup = move |h: KeyHash| {
        let found = (h == hash).then(|| Arc::clone(&record));
        async move {
            tokio::task::yield_now().await;
            Ok::<_, BoxError>(found)
        }
    };
    let clones = Arc::new(AtomicUsize::new(0));
    let mut svc = AuthLayer::new(lookup).layer(ReadyOnce {
        ready: false,
        clones: Arc::clone(&clones),
    });
    for _ in 0..3 {
        let req = Request::get("/")
            .header("x-api-key", key.expose_secret())
            .body(Body::default())
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(
        clones.load(Ordering::SeqCst),
        3,
        "one clone per awaited lookup"
    );
}

#[test]
fn layers_services_and_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    type Svc = AuthService<
        tower::util::ServiceFn<
            fn(Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>>,
        >,
        CachedLookup<MemoryStore>,
    >;
    send_sync::<AuthLayer<CachedLookup<MemoryStore>>>();
    send_sync::<AuthLayer<MemoryStore>>();
    send_sync::<Svc>();
    send::<<Svc as Service<Request<Body>>>::Future>();
    send_sync::<crate::reject::ResponseBody<Body>>();
    send_sync::<Rejection>();
    send_sync::<Principal>();
}

#[tokio::test]
async fn works_inside_service_builder_with_other_layers() {
    let f = fixture();
    let svc = ServiceBuilder::new()
        .layer(tower_http::validate_request::ValidateRequestHeaderLayer::accept("*/*"))
        .layer(layer(&f))
        .service_fn(echo);
    let req = Request::get("/")
        .header("x-api-key", f.keys["full"].expose_secret())
        .body(Body::default())
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
}

/// Held in the third hunt. A route variant inside an outer layer of the same state
/// trusts the outer acceptance only through the private `Accepted` marker: a `Principal`
/// planted in the request (a key holding the route's scope) neither stands in for a key nor
/// lends its scopes to the key actually presented.
#[tokio::test]
async fn a_planted_principal_lends_no_scopes_to_a_nested_route() {
    let store = MemoryStore::new();
    let reader = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| {
            r.with_scopes(["read"])
        })
        .unwrap();
    let writer = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| {
            r.with_scopes(["read", "write"])
        })
        .unwrap();
    let writer_record = store
        .lookup(&writer.presented())
        .now()
        .ok()
        .unwrap()
        .unwrap()
        .unwrap();
    let base = AuthLayer::new(store.clone());
    let route = base.require_scopes(["write"]);
    let nested = base.layer(route.layer(service_fn(echo)));
    let alone = route.layer(service_fn(echo));
    let planted = |key: Option<&ApiKey>| {
        let mut req = Request::get("/");
        if let Some(key) = key {
            req = req.header("x-api-key", key.expose_secret());
        }
        let mut req = req.body(Body::default()).unwrap();
        req.extensions_mut()
            .insert(Principal::new(Arc::clone(&writer_record)));
        req
    };
    async fn call<S, B>(svc: &S, req: Request<Body>) -> (StatusCode, String)
    where
        S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone,
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let res = svc.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }
    assert_eq!(call(&nested, planted(None)).await.0, 401);
    assert_eq!(call(&alone, planted(None)).await.0, 401);
    assert_eq!(call(&nested, planted(Some(&reader))).await.0, 403);
    assert_eq!(call(&alone, planted(Some(&reader))).await.0, 403);
    let (status, body) = call(&nested, planted(Some(&writer))).await;
    assert_eq!(status, 200);
    assert_eq!(body, writer_record.id.to_string());
}

/// The checksum is checked before any lookup (a cache hit skips nothing: see
/// `tests/hunt_checksum.rs`): a key with one wrong checksum character reaches no lookup's
/// future, behind a cache or not, and is refused as before.
#[tokio::test]
async fn a_wrong_checksum_reaches_no_backend_and_a_cached_key_still_passes() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let mistyped = {
        let mut s = key.expose_secret().to_owned();
        let last = s.pop().unwrap();
        s.push(if last == 'a' { 'b' } else { 'a' });
        s
    };
    assert_eq!(
        KeyFormat::default().check(&mistyped),
        Err(crate::key::FormatError::Checksum)
    );
    let polled = Arc::new(AtomicUsize::new(0));
    let backend = {
        let polled = Arc::clone(&polled);
        let store = store.clone();
        move |hash: KeyHash| {
            let polled = Arc::clone(&polled);
            let store = store.clone();
            async move {
                // Only a polled lookup reaches the backend.
                polled.fetch_add(1, Ordering::SeqCst);
                store.lookup(&hash.into()).now().ok().unwrap_or(Ok(None))
            }
        }
    };
    let cached = AuthLayer::new(CachedLookup::new(backend.clone())).layer(service_fn(echo));
    let uncached = AuthLayer::new(backend).layer(service_fn(echo));
    let req = |secret: &str| {
        Request::get("/v1/health")
            .header("x-api-key", secret)
            .body(Body::default())
            .unwrap()
    };
    let (status, _, body, _) = send(cached.clone(), req(&mistyped)).await;
    assert_eq!(
        (status.as_u16(), code_of(&body).as_str()),
        (401, "invalid_api_key")
    );
    let (status, _, body, _) = send(uncached, req(&mistyped)).await;
    assert_eq!(
        (status.as_u16(), code_of(&body).as_str()),
        (401, "invalid_api_key")
    );
    assert_eq!(
        polled.load(Ordering::SeqCst),
        0,
        "the backend saw a mistyped key"
    );
    // Cached once, then answered from the cache: the mistyped key is still a miss, refused.
    assert_eq!(send(cached.clone(), req(key.expose_secret())).await.0, 200);
    let after_fill = polled.load(Ordering::SeqCst);
    assert_eq!(send(cached.clone(), req(key.expose_secret())).await.0, 200);
    assert_eq!(send(cached, req(&mistyped)).await.0, 401);
    assert_eq!(polled.load(Ordering::SeqCst), after_fill);
}
