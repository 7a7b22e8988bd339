//! The whole product on the embedded default: `cargo run --example quickstart`.
//!
//! Keys live in SQLite (`keygate.db` in the current directory). At each start the demo owner
//! `demo` gets a fresh password and two fresh keys (the earlier demo keys are revoked), and
//! the example prints them (`KEY_FULL`, `KEY_READONLY`, `OWNER`, `OWNER_PASSWORD`, and an
//! OAuth2 client's `CLIENT_ID` and `CLIENT_SECRET`, scope `read`) with its address, then
//! serves the demo API and the key service:
//!
//! | route | needs |
//! | --- | --- |
//! | `GET /v1/health` | any valid key |
//! | `GET /v1/users/me` | any valid key; answers the principal as JSON |
//! | `POST /v1/messages` | scope `messages:write`; answers 202 |
//! | `GET /swagger`, `GET /swagger/openapi.json` | no key |
//! | `OPTIONS *` (CORS preflight) | no key |
//! | `POST /auth/createkey`, `POST /auth/session` | the owner's username and password |
//! | `GET /auth/testkey` | the key to test |
//! | `/v1/keys…`, `/v1/clients…`, `GET /v1/audit` | a session token (`Authorization: Bearer`) |
//! | `POST /oauth/token`, `/oauth/revoke`, `/oauth/introspect` | the client's id and secret (HTTP Basic) |
//! | `POST /v1/keys/revoke` | the key to revoke, in the body |
//! | `POST /v1/keys/leaked` | a GitHub secret-scanning signature (see `KEYGATE_GITHUB_PUBLIC_KEYS`) |
//! | `GET /dashboard` | nothing: it signs in itself |
//!
//! Settings, from the environment:
//!
//! | variable | effect |
//! | --- | --- |
//! | `KEYGATE_ADDR` | where to listen (default `127.0.0.1:3000`) |
//! | `KEYGATE_DATABASE_URL` | where keys live: `sqlite://FILE` (default `sqlite://keygate.db`) or PostgreSQL (`postgres://…`, whose changes every instance hears through `LISTEN/NOTIFY`) |
//! | `KEYGATE_REDIS_URL` | buckets on Redis (`redis://…`, or `rediss://…` for TLS; several comma-separated nodes: a Redis Cluster), and changes broadcast on Redis to every instance; unset: buckets in memory |
//! | `KEYGATE_REDIS_POLICY` | what happens while Redis is down: `closed` (503, the default), `open` or `local` |
//! | `KEYGATE_SESSION_SECRET` | the secret signing dashboard and management sessions (32 bytes or more); give every instance the same one. Unset: random per start |
//! | `KEYGATE_GITHUB_PUBLIC_KEYS` | a file holding GitHub's secret-scanning public keys (the JSON of `https://api.github.com/meta/public_keys/secret_scanning`), trusted by `POST /v1/keys/leaked` |
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
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use keygate::key::Environment;
use keygate::lookup::CachedLookup;
use keygate::ratelimit::{FailurePolicy, Quota, RedisLimiter};
use keygate::service::KeyService;
use keygate::store::{
    Actor, ClientStore, CreatedClient, CreatedKey, NewClient, NewKey, RedisChanges, SqlStore,
    StoreError,
};
use keygate::{Keygate, Principal};
use serde_json::{json, Value};
use tower::{Layer, Service};
use tower_http::cors::CorsLayer;
use zeroize::Zeroizing;

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
    let settings = Settings {
        addr,
        demo,
        redis: var("KEYGATE_REDIS_URL"),
        policy,
        session_secret: var("KEYGATE_SESSION_SECRET"),
        github_keys: match var("KEYGATE_GITHUB_PUBLIC_KEYS") {
            None => None,
            Some(path) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| Failure(2, format!("KEYGATE_GITHUB_PUBLIC_KEYS={path:?}: {e}")))?,
            ),
        },
    };
    let url = var("KEYGATE_DATABASE_URL").unwrap_or_else(|| "sqlite://keygate.db".to_owned());
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
    serve(store, settings).await
}

/// What the environment asked for.
struct Settings {
    addr: SocketAddr,
    demo: bool,
    redis: Option<String>,
    policy: FailurePolicy,
    session_secret: Option<String>,
    github_keys: Option<String>,
}

async fn serve<S: ClientStore + Send + Sync + 'static>(
    store: S,
    settings: Settings,
) -> Result<(), Failure> {
    let Settings {
        addr,
        demo,
        redis,
        policy,
        session_secret,
        github_keys,
    } = settings;
    if session_secret.as_ref().is_some_and(|s| s.len() < 32) {
        return Err(Failure(
            2,
            "KEYGATE_SESSION_SECRET must be at least 32 bytes".to_owned(),
        ));
    }
    let demo = if demo {
        Some(
            demo_set(&store)
                .await
                .map_err(|e| fail(format!("could not create the demo owner and keys: {e}")))?,
        )
    } else {
        None
    };
    let sixty = Quota::per_minute(NonZeroU32::MIN.saturating_add(59));
    // A cache over the store, which the store (and, with Redis or PostgreSQL, every other
    // instance) keeps honest.
    let lookup = CachedLookup::over_store(store.clone());
    let keygate = Keygate::builder(lookup).default_quota(sixty);
    let bad = |e: keygate::ConfigError| fail(format!("bad keygate configuration: {e}"));
    let (app, _changes) = match redis {
        None => {
            let keygate = keygate.build().map_err(bad)?;
            let messages = keygate.route().scopes(["messages:write"]).build();
            let testkey = keygate.route().cost(0).build().map_err(bad)?;
            let service = key_service(store, testkey, session_secret, github_keys).map_err(bad)?;
            (app(keygate, messages.map_err(bad)?, service), None)
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
            let keygate = keygate.limiter_store(limiter).build().map_err(bad)?;
            let messages = keygate.route().scopes(["messages:write"]).build();
            let testkey = keygate.route().cost(0).build().map_err(bad)?;
            let service = key_service(store, testkey, session_secret, github_keys).map_err(bad)?;
            (app(keygate, messages.map_err(bad)?, service), Some(changes))
        }
    };

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| fail(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().unwrap_or(addr);
    if let Some(demo) = demo {
        println!("KEY_FULL={}", demo.full.secret.expose_secret());
        println!("KEY_READONLY={}", demo.readonly.secret.expose_secret());
        println!("OWNER=demo");
        println!("OWNER_PASSWORD={}", demo.password.as_str());
        println!("CLIENT_ID={}", demo.client.client.id);
        println!("CLIENT_SECRET={}", demo.client.secret.expose_secret());
    }
    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();

    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .await
        .map_err(|e| fail(format!("server error: {e}")))
}

/// The key service over `store`: `/auth/testkey` behind `testkey` (the API's own checks,
/// no token taken), `/auth/createkey` making keys like `KEY_FULL`.
pub(crate) fn key_service<S, L>(
    store: S,
    testkey: L,
    session_secret: Option<String>,
    github_keys: Option<String>,
) -> Result<Router, keygate::ConfigError>
where
    S: ClientStore + Send + Sync + 'static,
    L: Layer<Route> + Clone + Send + Sync + 'static,
    L::Service: Service<Request, Error = Infallible> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request>>::Response: IntoResponse + 'static,
    <L::Service as Service<Request>>::Future: Send + 'static,
{
    let mut template = NewKey::new("", "created by /auth/createkey", Environment::Live);
    template.scopes = ["read", "messages:write"].into_iter().collect();
    template.quotas = vec![Quota::per_minute(NonZeroU32::MIN.saturating_add(59))];
    let mut service = KeyService::builder(store)
        .createkey(template)
        .testkey(testkey)
        .api_paths(demo_paths());
    if let Some(secret) = session_secret {
        service = service.session_secret(secret.into_bytes());
    }
    if let Some(keys) = github_keys {
        service = service
            .github_public_keys(keys)
            .on_leak(|report| eprintln!("leaked key revoked: {}", report.key_id));
    }
    service.build()
}

/// What the demo set-up made: the owner's password and two keys, each shown once.
struct Demo {
    password: Zeroizing<String>,
    full: CreatedKey,
    readonly: CreatedKey,
    client: CreatedClient,
}

/// The demo owner `demo` with a fresh password and two fresh keys; the demo keys of an
/// earlier start are revoked.
async fn demo_set<S: ClientStore>(store: &S) -> Result<Demo, StoreError> {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Random(keygate::key::RandomError(e)))?;
    let password = Zeroizing::new(URL_SAFE_NO_PAD.encode(bytes));
    let store = store.acting(Actor::new("quickstart"));
    match store.add_owner("demo", Some(&password)).await {
        Ok(_) => {}
        Err(StoreError::OwnerExists(_)) => {
            store.set_owner_password("demo", Some(&password)).await?;
            store.set_owner_active("demo", true).await?;
        }
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
    // One OAuth2 client, scope `read`; the earlier demo clients (and their tokens) revoked.
    for earlier in store.clients("demo").await? {
        if earlier.active {
            store.revoke_client(&earlier.id).await?;
        }
    }
    let mut client = NewClient::new("demo", "demo client");
    client.scopes = ["read"].into_iter().collect();
    Ok(Demo {
        password,
        full: store.create(full).await?,
        readonly: store.create(readonly).await?,
        client: store.create_client(client).await?,
    })
}

/// The demo API behind `keygate` (and `messages` on the route that needs its scope), with
/// the key service beside it.
pub(crate) fn app<K, M>(keygate: K, messages: M, service: Router) -> Router
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
    let api = Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/v1/users/me", get(me))
        .route("/v1/messages", post(send_message).route_layer(messages))
        .route("/swagger", get(swagger_ui))
        // Unknown paths are behind keygate too (401 without a key, 404 with one): what
        // exists is not told to callers without a key.
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(keygate)
        // CORS goes outside keygate: it answers preflights itself, and it puts its headers
        // on keygate's 401s and 429s too, which a browser could not read otherwise ("Failed
        // to fetch"). A preflight that got past it would be answered 204 by keygate with no
        // CORS headers, and never handed to a handler.
        .layer(CorsLayer::permissive());
    // The key service authenticates its own callers: it sits beside the API, not behind
    // its layer, and without CORS: its sign-in endpoints are for the dashboard on this
    // origin and for tools, not for scripts on other sites (which could otherwise spread
    // password guesses over their visitors' addresses).
    api.merge(service)
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

/// The demo API's paths (`quickstart.openapi.json`), added to the key service's OpenAPI
/// document; they use its components (the error responses, the security schemes).
fn demo_paths() -> Value {
    serde_json::from_str(include_str!("quickstart.openapi.json"))
        .unwrap_or_else(|e| unreachable!("quickstart.openapi.json is JSON: {e}"))
}
