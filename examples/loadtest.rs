//! The server of `scripts/e2e.sh`: `GET /v1/health` bare (`KEYGATE_MODE=bare`), behind the
//! full keygate stack (`KEYGATE_MODE=stack`: auth on a cached lookup, per-key rate limit
//! set high enough never to refuse, `X-RateLimit-*` headers), or behind the peer,
//! tower_governor keyed by the same `X-API-KEY` header with its headers on and a limit as
//! high (`KEYGATE_MODE=governor`: limits only, no key is checked), or the full stack with
//! its buckets on Redis (`KEYGATE_MODE=redis`: `RedisLimiter` on `KEYGATE_REDIS_URL`, default
//! `redis://127.0.0.1:6379/`; concurrent requests share script calls).
//!
//! Prints `KEY=<key>` and `listening on http://<addr>` (`KEYGATE_ADDR`, default
//! `127.0.0.1:3001`). One runtime thread, so that CPU time per request is easy to read.

use std::io::Write;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;

use axum::routing::get;
use axum::{Json, Router};
use keygate::key::Environment;
use keygate::lookup::CachedLookup;
use keygate::ratelimit::{Quota, RedisLimiter};
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::Keygate;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // keygate's warnings (and, with RUST_LOG=keygate=debug, every decision) on stderr.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("keygate=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let addr = std::env::var("KEYGATE_ADDR").unwrap_or_else(|_| "127.0.0.1:3001".to_owned());
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("KEYGATE_ADDR={addr:?} is not a socket address");
        return ExitCode::from(2);
    };
    let mode = std::env::var("KEYGATE_MODE").unwrap_or_else(|_| "stack".to_owned());
    let store = MemoryStore::new();
    let key = match store.issue(Owner::new("o", "load"), Environment::Live, |r| r) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("cannot create the key: {e}");
            return ExitCode::FAILURE;
        }
    };
    let app = Router::new().route(
        "/v1/health",
        get(|| async { Json(serde_json::json!({"status": "ok"})) }),
    );
    let app = match mode.as_str() {
        "bare" => app,
        "stack" => {
            let layer = Keygate::builder(CachedLookup::new(store))
                .default_quota(Quota::per_second(NonZeroU32::MAX))
                .build();
            match layer {
                Ok(layer) => app.layer(layer),
                Err(e) => {
                    eprintln!("bad configuration: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        "redis" => {
            let url = std::env::var("KEYGATE_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
            let limiter = RedisLimiter::builder(url)
                .prefix("keygate:loadtest:")
                .connect()
                .await;
            let layer = limiter.map_err(|e| e.to_string()).and_then(|limiter| {
                Keygate::builder(CachedLookup::new(store))
                    .default_quota(Quota::per_second(NonZeroU32::MAX))
                    .limiter_store(limiter)
                    .build()
                    .map_err(|e| e.to_string())
            });
            match layer {
                Ok(layer) => app.layer(layer),
                Err(e) => {
                    eprintln!("bad configuration: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        "governor" => {
            let config = tower_governor::governor::GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(u32::MAX)
                .key_extractor(HeaderKey)
                .use_headers()
                .finish();
            match config {
                Some(config) => app.layer(tower_governor::GovernorLayer::new(config)),
                None => {
                    eprintln!("bad governor configuration");
                    return ExitCode::FAILURE;
                }
            }
        }
        other => {
            eprintln!("KEYGATE_MODE={other:?}: expected bare, stack, redis or governor");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("KEY={}", key.expose_secret());
    println!(
        "listening on http://{}",
        listener.local_addr().unwrap_or(addr)
    );
    let _ = std::io::stdout().flush();
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("server error: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// tower_governor's key: the `X-API-KEY` header, as keygate's buckets are keyed by the key.
#[derive(Clone)]
struct HeaderKey;

impl tower_governor::key_extractor::KeyExtractor for HeaderKey {
    type Key = String;

    fn extract<T>(
        &self,
        req: &axum::http::Request<T>,
    ) -> Result<String, tower_governor::GovernorError> {
        req.headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(tower_governor::GovernorError::UnableToExtractKey)
    }
}
