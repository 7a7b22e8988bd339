//! API-key authentication and per-key rate limiting for axum, tonic and hyper services, as
//! composable tower layers.
//!
//! ```text
//! request ─▶ Bypass? ─yes────────────────────────────────────▶ inner service
//!              │no
//!              ▼
//!         Extract key (ordered schemes) ─▶ format + checksum check (no I/O)
//!              ▼
//!         Lookup by hash (now or later, behind a cache) ─▶ KeyRecord
//!              ▼
//!         Validate (status, owner, expiry, IP, site, scopes, environment) ─▶ Principal
//!              ▼
//!         Rate limit (per key, per window, per route cost) ─▶ Decision
//!              ▼
//!         inner service ─▶ response + X-RateLimit-* headers
//! Any rejection ─▶ Renderer (JSON envelope | problem+json | gRPC status | custom)
//! ```
//!
//! # Quick look
//!
//! ```
//! use axum::{routing::{get, post}, Router};
//! use keygate::{Keygate, Principal};
//! use keygate::lookup::CachedLookup;
//! use keygate::store::MemoryStore;
//!
//! let keygate = Keygate::builder(CachedLookup::new(MemoryStore::new()))
//!     .default_quota("60/min".parse()?)
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/v1/messages", post(|| async { "sent" })
//!         .route_layer(keygate.route().scopes(["messages:write"]).cost(5).build()?))
//!     .route("/v1/users/me", get(|p: Principal| async move { p.key_id().to_string() }))
//!     .layer(keygate);
//! # Ok::<_, keygate::ConfigError>(())
//! ```
//!
//! A request to `/v1/messages` passes the outer layer (any valid key, one token) and then
//! the route's (scope `messages:write`, four tokens more); both share one cache and one
//! bucket store. Each layer also works alone: [`AuthLayer`] for authentication only,
//! [`ratelimit::RateLimitLayer`] keyed by any function of the request.
//!
//! # Modules, in floors
//!
//! Each module imports only from its own floor and those below; no two modules import
//! each other (`tests/layers.rs` checks it).
//!
//! | floor | module | owns |
//! | --- | --- | --- |
//! | values | [`key`] | the secret, its hash, its id, the key format, the environment |
//! | values | [`record`] | key records, owners, the principal, the usage hook |
//! | values | [`quota`] | quotas and the rate-limit numbers |
//! | values | [`head`] | the head of a request, as policies see it |
//! | values | [`answer`] | "ready now, or a future": what backends return |
//! | values | [`clock`], [`error`] | time, real or fake; configuration errors |
//! | policy | [`extract`] | where keys are read from |
//! | policy | [`bypass`] | requests that need no key |
//! | policy | [`validate`] | the validity rules, client IP and site |
//! | policy | [`reject`] | the rejection table and renderers |
//! | backends | [`lookup`] | the lookup trait and its cache |
//! | backends | [`store`] | where keys live: memory, SQLite, PostgreSQL |
//! | backends, layers | [`ratelimit`] | token buckets and their stores; the rate-limit layer |
//! | layers | [`auth`] | the authentication layer and its failed-attempt lockout |
//! | layers | [`mod@keygate`] | both as one layer, with per-route variants |
//!
//! # Feature flags
//!
//! | feature | default | enables |
//! | --- | --- | --- |
//! | `axum` | yes | [`Principal`] as an axum extractor; the client IP from axum's `ConnectInfo` |
//! | `tonic` | no | the client IP from tonic's `TcpConnectInfo` |
//! | `sqlite` | no | `store::SqlStore` on SQLite (bundled: nothing to install) |
//! | `postgres` | no | `store::SqlStore` on PostgreSQL |
//!
//! # Security notes
//!
//! Secrets are never stored (only [`key::KeyHash`]), never logged (tracing fields carry the
//! public [`key::KeyId`]), and never printed by `Debug`. Hashes are compared in constant
//! time. `X-Forwarded-For` and `Forwarded` are read only from configured trusted proxies.

#![cfg_attr(docsrs, feature(doc_cfg))]
// Library code never unwraps what a request or a caller controls; tests may.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod answer;
pub mod auth;
pub mod bypass;
pub mod clock;
pub mod error;
pub mod extract;
mod flow;
pub mod head;
pub mod key;
pub mod keygate;
pub mod lookup;
mod passage;
pub mod quota;
pub mod ratelimit;
pub mod record;
pub mod reject;
#[cfg(feature = "service")]
#[cfg_attr(docsrs, doc(cfg(feature = "service")))]
pub mod service;
pub mod store;
pub mod validate;

#[cfg(feature = "axum")]
pub mod axum;

// Every Rust snippet of the README is compiled (and, unless marked `no_run`, run) as a
// doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use auth::{AuthLayer, AuthService};
pub use error::{BoxError, ConfigError};
pub use keygate::{Keygate, KeygateLayer};
pub use record::Principal;
