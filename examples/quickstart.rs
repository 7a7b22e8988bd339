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
//! Set `KEYGATE_ADDR` to listen elsewhere than `127.0.0.1:3000`.

use std::io::Write;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;

use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::{get, post};
use axum::{Json, Router};
use keygate::key::Environment;
use keygate::ratelimit::Quota;
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::{Keygate, Principal};
use serde_json::{json, Value};
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
    let addr = std::env::var("KEYGATE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("KEYGATE_ADDR={addr:?} is not a socket address ({e}); try 127.0.0.1:3000");
            return ExitCode::from(2);
        }
    };

    let store = MemoryStore::new();
    let demo = Owner::new("owner_demo", "demo");
    let sixty = Quota::per_minute(NonZeroU32::MIN.saturating_add(59));
    let keys = store
        .issue(demo.clone(), Environment::Live, |r| {
            r.with_name("full access")
                .with_scopes(["read", "messages:write"])
                .with_quotas([sixty])
        })
        .and_then(|full| {
            let readonly = store.issue(demo, Environment::Test, |r| {
                r.with_name("read only")
                    .with_scopes(["read"])
                    .with_quotas([sixty])
            })?;
            Ok((full, readonly))
        });
    let (full, readonly) = match keys {
        Ok(keys) => keys,
        Err(e) => {
            eprintln!("could not create the demo keys: {e}");
            return ExitCode::FAILURE;
        }
    };

    // Authentication and per-key rate limiting (60 a minute unless a key says otherwise).
    let keygate = Keygate::builder(store).default_quota(sixty).build();
    let (keygate, messages) = match keygate.and_then(|k| {
        let messages = k.route().scopes(["messages:write"]).build()?;
        Ok((k, messages))
    }) {
        Ok(layers) => layers,
        Err(e) => {
            eprintln!("bad keygate configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let app = Router::new()
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
        .layer(CorsLayer::permissive());

    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    println!("KEY_FULL={}", full.expose_secret());
    println!("KEY_READONLY={}", readonly.expose_secret());
    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();

    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("server error: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
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
