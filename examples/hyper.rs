//! keygate in front of a plain hyper 1 server, no axum: `cargo run --example hyper`.
//!
//! Prints the address and a demo key (`KEY_FULL`, scope `read`), then serves
//! `GET /v1/health` → 200 `{"status":"ok"}` for any valid key, sent as `X-API-KEY`,
//! `Authorization: Bearer <key>` or Basic (key as username), behind the full stack: 60
//! requests a minute per key (shared across connections), and more than 20 invalid keys a
//! minute from one address turned away.
//!
//! The layer is built **once**, before the accept loop, and cloned per connection: clones
//! share one cache and one bucket store. A layer built per connection would give every
//! connection a fresh budget.
//!
//! ```text
//! curl -H "x-api-key: $KEY_FULL" http://127.0.0.1:3000/v1/health
//! ```
//!
//! Set `KEYGATE_ADDR` to listen elsewhere than `127.0.0.1:3000`.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use keygate::key::Environment;
use keygate::ratelimit::Quota;
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::validate::PeerAddr;
use keygate::Keygate;
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> ExitCode {
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
    let full = match store.issue(Owner::new("owner_demo", "demo"), Environment::Live, |r| {
        r.with_name("full access").with_scopes(["read"])
    }) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("could not create the demo key: {e}");
            return ExitCode::FAILURE;
        }
    };

    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    println!("KEY_FULL={}", full.expose_secret());
    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();

    // Built once: every connection shares its cache and buckets.
    let keygate = match Keygate::builder(store)
        .default_quota(Quota::per_minute(NonZeroU32::MIN.saturating_add(59)))
        .build()
    {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("bad keygate configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // A failed accept (a reset, too many open files) must not stop the server.
                eprintln!("accept failed: {e}");
                continue;
            }
        };
        let service = ServiceBuilder::new()
            // hyper has no `ConnectInfo`: hand keygate the peer address for IP-restricted keys.
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                req
            })
            .layer(keygate.clone())
            .service_fn(route);
        tokio::spawn(async move {
            let service = TowerToHyperService::new(service);
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
}

async fn route(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::default());
    if req.method() == Method::GET && req.uri().path() == "/v1/health" {
        *res.body_mut() = Full::new(Bytes::from_static(br#"{"status":"ok"}"#));
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    } else {
        *res.status_mut() = StatusCode::NOT_FOUND;
    }
    Ok(res)
}
