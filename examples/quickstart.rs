//! A demo API behind keygate: `cargo run --example quickstart`.
//!
//! Prints two demo keys (`KEY_FULL`, `KEY_READONLY`, 60 requests a minute each) and the
//! address, then serves:
//!
//! | route | needs |
//! | --- | --- |
//! | `GET /v1/health` | any valid key |
//! | `GET /v1/users/me` | any valid key; answers the principal as JSON |
//! | `POST /v1/messages` | scope `messages:write`; answers 202 |
//! | `GET /swagger`, `GET /swagger/openapi.json` | no key |
//! | `OPTIONS *` (CORS preflight) | no key |
//!
//! Settings, from the environment:
//!
//! | variable | effect |
//! | --- | --- |
//! | `KEYGATE_ADDR` | where to listen (default `127.0.0.1:3000`) |
//! | `KEYGATE_DATABASE_URL` | keys in SQLite (`sqlite://FILE`) or PostgreSQL (`postgres://…`, whose changes every instance hears through `LISTEN/NOTIFY`); unset: in memory |
//! | `KEYGATE_REDIS_URL` | buckets on Redis (`redis://…`, or `rediss://…` for TLS; several comma-separated nodes: a Redis Cluster), and changes broadcast on Redis to every instance; unset: buckets in memory |
//! | `KEYGATE_REDIS_POLICY` | what happens while Redis is down: `closed` (503, the default), `open` or `local` |
//! | `KEYGATE_DEMO=off` | no demo owner or keys: for the second and later instances of one service |
//!
//! Several quickstarts given the same PostgreSQL and Redis (and `KEYGATE_DEMO=off` for all
//! but one) are one service: one budget per key across them, and a change made through any
//! of them or through `keyctl` reaches all of them within a second.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post, Route};
use axum::{Json, Router};
use keygate::key::Environment;
use keygate::lookup::CachedLookup;
use keygate::ratelimit::{FailurePolicy, Quota, RedisLimiter};
use keygate::store::{
    CreatedKey, MemoryStore, NewKey, OwnerStore, RedisChanges, SqlStore, StoreError,
};
use keygate::{Keygate, Principal};
use serde_json::{json, Value};
use tower::{Layer, Service};
use tower_http::cors::CorsLayer;

#[tokio::main]
async fn main() -> ExitCode {
    // keygate's warnings (and, with RUST_LOG=keygate=debug, every decision) on stderr.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("keygate=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("{message}");
            ExitCode::from(code)
        }
    }
}

/// An exit code and what to say.
struct Failure(u8, String);

fn fail(message: impl std::fmt::Display) -> Failure {
    Failure(1, message.to_string())
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

async fn run() -> Result<(), Failure> {
    let addr = var("KEYGATE_ADDR").unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let addr: SocketAddr = addr.parse().map_err(|e| {
        Failure(
            2,
            format!("KEYGATE_ADDR={addr:?} is not a socket address ({e}); try 127.0.0.1:3000"),
        )
    })?;
    let demo = match var("KEYGATE_DEMO").as_deref() {
        None | Some("on") => true,
        Some("off") => false,
        Some(other) => {
            return Err(Failure(
                2,
                format!("KEYGATE_DEMO={other:?}: expected on or off"),
            ))
        }
    };
    let policy = match var("KEYGATE_REDIS_POLICY").as_deref() {
        None | Some("closed") => FailurePolicy::Closed,
        Some("open") => FailurePolicy::Open,
        Some("local") => FailurePolicy::Local,
        Some(other) => {
            return Err(Failure(
                2,
                format!("KEYGATE_REDIS_POLICY={other:?}: expected closed, open or local"),
            ))
        }
    };
    let redis = var("KEYGATE_REDIS_URL");
    match var("KEYGATE_DATABASE_URL") {
        None => serve(MemoryStore::new(), addr, demo, redis, policy).await,
        Some(url) => {
            let store = SqlStore::connect(&url)
                .await
                .map_err(|e| fail(format!("database: {e}")))?;
            // On PostgreSQL every instance hears every change (NOTIFY in the same transaction).
            let _listening = if url.starts_with("postgres") {
                Some(
                    store
                        .listen()
                        .await
                        .map_err(|e| fail(format!("database: {e}")))?,
                )
            } else {
                None
            };
            serve(store, addr, demo, redis, policy).await
        }
    }
}

async fn serve<S: OwnerStore + Send + Sync + 'static>(
    store: S,
    addr: SocketAddr,
    demo: bool,
    redis: Option<String>,
    policy: FailurePolicy,
) -> Result<(), Failure> {
    let keys = if demo {
        Some(
            demo_keys(&store)
                .await
                .map_err(|e| fail(format!("could not create the demo keys: {e}")))?,
        )
    } else {
        None
    };
    let sixty = Quota::per_minute(NonZeroU32::MIN.saturating_add(59));
    // A cache over the store, which the store (and, with Redis or PostgreSQL, every other
    // instance) keeps honest.
    let lookup = CachedLookup::over_store(store.clone());
    let keygate = Keygate::builder(lookup).default_quota(sixty);
    let (app, _changes) = match redis {
        None => {
            let keygate = keygate
                .build()
                .map_err(|e| fail(format!("bad keygate configuration: {e}")))?;
            let messages = keygate.route().scopes(["messages:write"]).build();
            let messages = messages.map_err(|e| fail(format!("bad keygate configuration: {e}")))?;
            (app(keygate, messages), None)
        }
        Some(redis) => {
            let nodes: Vec<&str> = redis.split(',').map(str::trim).collect();
            let limiter = if nodes.len() > 1 {
                RedisLimiter::cluster_builder(nodes.iter().copied())
            } else {
                RedisLimiter::builder(redis.trim())
            };
            let limiter = limiter
                .policy(policy)
                .connect()
                .await
                .map_err(|e| fail(format!("KEYGATE_REDIS_URL: {e}")))?;
            // Pub/sub reaches every node of a cluster: the first one serves.
            let changes = RedisChanges::connect(nodes[0], store.clone())
                .await
                .map_err(|e| fail(format!("KEYGATE_REDIS_URL: {e}")))?;
            let keygate = keygate
                .limiter_store(limiter)
                .build()
                .map_err(|e| fail(format!("bad keygate configuration: {e}")))?;
            let messages = keygate.route().scopes(["messages:write"]).build();
            let messages = messages.map_err(|e| fail(format!("bad keygate configuration: {e}")))?;
            (app(keygate, messages), Some(changes))
        }
    };

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| fail(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().unwrap_or(addr);
    if let Some((full, readonly)) = keys {
        println!("KEY_FULL={}", full.secret.expose_secret());
        println!("KEY_READONLY={}", readonly.secret.expose_secret());
    }
    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();

    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .await
        .map_err(|e| fail(format!("server error: {e}")))
}

/// The demo owner `demo` and two fresh keys; the demo keys of an earlier start are revoked.
async fn demo_keys<S: OwnerStore>(store: &S) -> Result<(CreatedKey, CreatedKey), StoreError> {
    match store.add_owner("demo", None).await {
        Ok(_) | Err(StoreError::OwnerExists(_)) => {}
        Err(e) => return Err(e),
    }
    store.revoke_all("demo").await?;
    let sixty = Quota::per_minute(NonZeroU32::MIN.saturating_add(59));
    let mut full = NewKey::new("demo", "full access", Environment::Live);
    full.scopes = ["read", "messages:write"].into_iter().collect();
    full.quotas = vec![sixty];
    let mut readonly = NewKey::new("demo", "read only", Environment::Test);
    readonly.scopes = ["read"].into_iter().collect();
    readonly.quotas = vec![sixty];
    Ok((store.create(full).await?, store.create(readonly).await?))
}

/// The demo API behind `keygate` (and `messages` on the route that needs its scope).
fn app<K, M>(keygate: K, messages: M) -> Router
where
    K: Layer<Route> + Clone + Send + Sync + 'static,
    K::Service: Service<Request, Error = Infallible> + Clone + Send + Sync + 'static,
    <K::Service as Service<Request>>::Response: IntoResponse + 'static,
    <K::Service as Service<Request>>::Future: Send + 'static,
    M: Layer<Route> + Clone + Send + Sync + 'static,
    M::Service: Service<Request, Error = Infallible> + Clone + Send + Sync + 'static,
    <M::Service as Service<Request>>::Response: IntoResponse + 'static,
    <M::Service as Service<Request>>::Future: Send + 'static,
{
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/v1/users/me", get(me))
        .route("/v1/messages", post(send_message).route_layer(messages))
        .route("/swagger", get(swagger_ui))
        .route("/swagger/openapi.json", get(openapi))
        .layer(keygate)
        // CORS goes outside keygate: it answers preflights itself, and it puts its headers
        // on keygate's 401s and 429s too, which a browser could not read otherwise ("Failed
        // to fetch"). A preflight that got past it would be answered 204 by keygate with no
        // CORS headers, and never handed to a handler.
        .layer(CorsLayer::permissive())
}

async fn me(principal: Principal) -> Json<Principal> {
    Json(principal)
}

async fn send_message(
    principal: Principal,
    body: Option<Json<Value>>,
) -> (StatusCode, Json<Value>) {
    let text = body
        .and_then(|Json(v)| v.get("text").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default();
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "queued", "key_id": principal.key_id(), "text": text})),
    )
}

async fn swagger_ui() -> Html<&'static str> {
    Html(
        "<!doctype html><title>keygate demo API</title>\
         <p>OpenAPI document: <a href=\"/swagger/openapi.json\">/swagger/openapi.json</a></p>",
    )
}

async fn openapi() -> Json<Value> {
    let error = json!({"$ref": "#/components/schemas/Error"});
    Json(json!({
        "openapi": "3.1.0",
        "info": {"title": "keygate demo API", "version": "1.0.0"},
        "security": [{"ApiKey": []}, {"Bearer": []}],
        "paths": {
            "/v1/health": {"get": {"responses": {"200": {"description": "ok"}, "401": {"description": "no valid key", "content": {"application/json": {"schema": error}}}}}},
            "/v1/users/me": {"get": {"responses": {"200": {"description": "the caller's key"}}}},
            "/v1/messages": {"post": {"responses": {"202": {"description": "queued"}, "403": {"description": "scope messages:write missing"}}}},
        },
        "components": {
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {"Error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}, "data": {"type": ["object", "null"]}
            }}},
        },
    }))
}
