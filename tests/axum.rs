//! keygate in axum 0.8: `Router::layer` for every route, `route_layer` for scopes, the
//! `Principal` extractor, and the client IP from `ConnectInfo`, over a real socket.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::{any, get, options, post};
use axum::{Json, Router};
use common::send;
use http::{Method, StatusCode};
use keygate::error::BoxError;
use keygate::key::Environment;
use keygate::key::{ApiKey, KeyHash};
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::record::{Owner, Restrictions};
use keygate::store::MemoryStore;
use keygate::{AuthLayer, Principal};

struct App {
    addr: SocketAddr,
    full: ApiKey,
    readonly: ApiKey,
    local_only: ApiKey,
    elsewhere_only: ApiKey,
    lookups: Arc<AtomicUsize>,
}

async fn serve() -> App {
    let store = MemoryStore::new();
    let owner = Owner::new("o1", "ada");
    let issue = |env, scopes: &[&str], ips: &[&str]| {
        let scopes = scopes.to_vec();
        let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        store
            .issue(owner.clone(), env, |r| {
                r.with_scopes(scopes)
                    .with_restrictions(Restrictions { ips, sites: vec![] })
            })
            .unwrap()
    };
    let full = issue(Environment::Live, &["read", "messages:write"], &[]);
    let readonly = issue(Environment::Test, &["read"], &[]);
    let local_only = issue(Environment::Live, &["read"], &["127.0.0.0/8", "::1/128"]);
    let elsewhere_only = issue(Environment::Live, &["read"], &["10.0.0.0/8"]);

    // Count the backend calls behind the cache.
    let lookups = Arc::new(AtomicUsize::new(0));
    let counting = {
        let lookups = Arc::clone(&lookups);
        move |hash: KeyHash| {
            lookups.fetch_add(1, Ordering::SeqCst);
            let answer = store.lookup(&hash.into()).now().ok().unwrap_or(Ok(None));
            async move { answer.map_err(BoxError::from) }
        }
    };
    let auth = AuthLayer::new(CachedLookup::new(counting));
    let app = Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/v1/users/me", get(|p: Principal| async move { Json(p) }))
        .route(
            "/v1/messages",
            post(|| async { StatusCode::ACCEPTED })
                .route_layer(auth.require_scopes(["messages:write"])),
        )
        .route(
            "/v1/live-only",
            get(|| async { "live" }).route_layer(auth.require_environment(Environment::Live)),
        )
        .route("/swagger", get(|| async { "docs" }))
        // Routes that run for OPTIONS too: never without a key.
        .route("/v1/any", any(|| async { "any" }))
        .route("/v1/options", options(|| async { "options" }))
        .fallback(|| async { "fallback" })
        .layer(auth)
        // CORS outside keygate: it answers preflights and puts its headers on rejections.
        .layer(tower_http::cors::CorsLayer::permissive());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    App {
        addr,
        full,
        readonly,
        local_only,
        elsewhere_only,
        lookups,
    }
}

#[tokio::test]
async fn routes_layers_and_route_layers() {
    let app = serve().await;
    let full = app.full.expose_secret();
    let readonly = app.readonly.expose_secret();
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{full}:")
        )
    );
    let bearer_ro = format!("Bearer {readonly}");
    type Case<'a> = (
        &'a str,
        Method,
        &'a str,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "health, x-api-key",
            Method::GET,
            "/v1/health",
            vec![("x-api-key", full)],
            200,
            "",
        ),
        (
            "health, basic",
            Method::GET,
            "/v1/health",
            vec![("authorization", &basic)],
            200,
            "",
        ),
        (
            "health, no key",
            Method::GET,
            "/v1/health",
            vec![],
            401,
            "missing_api_key",
        ),
        (
            "messages, full",
            Method::POST,
            "/v1/messages",
            vec![("x-api-key", full)],
            202,
            "",
        ),
        (
            "messages, readonly",
            Method::POST,
            "/v1/messages",
            vec![("authorization", &bearer_ro)],
            403,
            "insufficient_scope",
        ),
        (
            "messages, no key",
            Method::POST,
            "/v1/messages",
            vec![],
            401,
            "missing_api_key",
        ),
        (
            "live-only, live key",
            Method::GET,
            "/v1/live-only",
            vec![("x-api-key", full)],
            200,
            "",
        ),
        (
            "live-only, test key",
            Method::GET,
            "/v1/live-only",
            vec![("x-api-key", readonly)],
            403,
            "environment_mismatch",
        ),
        ("swagger", Method::GET, "/swagger", vec![], 200, ""),
        (
            "preflight",
            Method::OPTIONS,
            "/v1/messages",
            vec![
                ("origin", "https://a.example"),
                ("access-control-request-method", "POST"),
            ],
            200,
            "",
        ),
        (
            "a 401 a browser can read",
            Method::GET,
            "/v1/health",
            vec![("origin", "https://a.example")],
            401,
            "missing_api_key",
        ),
        // tower-http's CORS layer answers every OPTIONS itself: the handlers never run
        // (checked below: empty bodies). Without it keygate demands a key: see
        // `options_never_runs_a_handler_without_a_key`.
        (
            "bare OPTIONS, any()",
            Method::OPTIONS,
            "/v1/any",
            vec![],
            200,
            "",
        ),
        (
            "bare OPTIONS, .options()",
            Method::OPTIONS,
            "/v1/options",
            vec![],
            200,
            "",
        ),
        (
            "bare OPTIONS, fallback",
            Method::OPTIONS,
            "/nowhere",
            vec![],
            200,
            "",
        ),
        (
            "ip allowed",
            Method::GET,
            "/v1/health",
            vec![("x-api-key", app.local_only.expose_secret())],
            200,
            "",
        ),
        (
            "ip refused",
            Method::GET,
            "/v1/health",
            vec![("x-api-key", app.elsewhere_only.expose_secret())],
            403,
            "ip_not_allowed",
        ),
        (
            "forged xff ignored",
            Method::GET,
            "/v1/health",
            vec![
                ("x-api-key", app.elsewhere_only.expose_secret()),
                ("x-forwarded-for", "10.0.0.1"),
            ],
            403,
            "ip_not_allowed",
        ),
    ];
    for (name, method, path, headers, status, code) in cases {
        let reply = send(app.addr, method.clone(), path, &headers, "").await;
        assert_eq!(reply.status.as_u16(), status, "{name}: {}", reply.body);
        if headers.iter().any(|(n, _)| *n == "origin") {
            assert_eq!(reply.headers["access-control-allow-origin"], "*", "{name}");
        }
        if !code.is_empty() {
            assert_eq!(reply.code(), code, "{name}");
        }
        if method == Method::OPTIONS {
            assert!(
                reply.body.is_empty(),
                "{name}: a handler ran: {}",
                reply.body
            );
        }
    }
}

/// Without a CORS layer in front, an `OPTIONS` request meets keygate: a real preflight is
/// answered 204 by keygate itself and any other needs a key, so `any()` routes,
/// `.options()` handlers and fallbacks never run without one.
#[tokio::test]
async fn options_never_runs_a_handler_without_a_key() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let app = Router::new()
        .route("/v1/any", any(|| async { "any" }))
        .route("/v1/options", options(|| async { "options" }))
        .fallback(|| async { "fallback" })
        .layer(AuthLayer::new(store));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let preflight = [
        ("origin", "https://a.example"),
        ("access-control-request-method", "POST"),
    ];
    for path in ["/v1/any", "/v1/options", "/nowhere"] {
        let reply = send(addr, Method::OPTIONS, path, &[], "").await;
        assert_eq!(reply.status, 401, "{path}: {}", reply.body);
        assert_eq!(reply.code(), "missing_api_key");
        let reply = send(addr, Method::OPTIONS, path, &preflight, "").await;
        assert_eq!(reply.status, 204, "{path}");
        assert!(
            reply.body.is_empty(),
            "{path}: a handler ran: {}",
            reply.body
        );
        let with_key = [("x-api-key", key.expose_secret())];
        let reply = send(addr, Method::OPTIONS, path, &with_key, "").await;
        assert_eq!(reply.status, 200, "{path}");
        assert!(!reply.body.is_empty(), "{path}");
    }
}

#[tokio::test]
async fn principal_extractor_and_one_lookup_for_nested_layers() {
    let app = serve().await;
    let full = app.full.expose_secret();
    let me = send(
        app.addr,
        Method::GET,
        "/v1/users/me",
        &[("x-api-key", full)],
        "",
    )
    .await;
    assert_eq!(me.status, 200);
    let json = me.json();
    assert_eq!(json["environment"], "live");
    assert_eq!(
        json["scopes"],
        serde_json::json!(["read", "messages:write"])
    );
    assert!(json["key_id"].as_str().unwrap().starts_with("key_"));
    assert!(!me.body.contains(full));

    // The outer layer and the route layer share one state: the route layer trusts the
    // outer one's verdict and the cache is asked once.
    let before = app.lookups.load(Ordering::SeqCst);
    let reply = send(
        app.addr,
        Method::POST,
        "/v1/messages",
        &[("x-api-key", app.readonly.expose_secret())],
        "",
    )
    .await;
    assert_eq!(reply.status, 403);
    assert_eq!(app.lookups.load(Ordering::SeqCst), before + 1);
}

#[test]
fn the_router_accepts_the_layer_types() {
    // Compile-time: the stack fits axum's bounds with a plain and a cached lookup.
    let _: Router = Router::new()
        .route("/", get(|| async {}))
        .layer(AuthLayer::new(MemoryStore::new()));
    let _: Router = Router::new()
        .route("/", get(|| async {}))
        .layer(AuthLayer::new(CachedLookup::new(MemoryStore::new())))
        .layer(tower_http::cors::CorsLayer::permissive());
}
