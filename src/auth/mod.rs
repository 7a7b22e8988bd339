//! The authentication layer: [`AuthLayer`], [`AuthService`], [`ResponseFuture`].
//!
//! For each request: bypass? (OPTIONS, `/swagger`) → extract the key → check its format
//! and checksum (no I/O) → look it up by hash (at once on a cache hit, else awaited with a
//! timeout) → validate it against the route's [`Rules`](crate::validate::Rules) → put the
//! [`Principal`](crate::Principal) into the request extensions and call the inner service.
//! Any failure is answered in `call` with a rendered [`Rejection`](crate::reject::Rejection);
//! `Error` stays the inner service's error, so `Infallible` stays `Infallible`.
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use keygate::{AuthLayer, Principal};
//! use keygate::record::{KeyRecord, Owner};
//! use keygate::key::{Environment};
//! use keygate::store::MemoryStore;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # tokio_test_block_on(async {
//! let store = MemoryStore::new();
//! let key = store.issue(Owner::new("o1", "ada"), Environment::Live, |r| r.with_scopes(["read"]))?;
//!
//! let service = ServiceBuilder::new()
//!     .layer(AuthLayer::new(store.clone()))
//!     .service_fn(|req: Request<String>| async move {
//!         let who = req.extensions().get::<Principal>().map(|p| p.key_id().to_string());
//!         Ok::<_, Infallible>(Response::new(who.unwrap_or_default()))
//!     });
//!
//! let ok = Request::get("/v1/health").header("x-api-key", key.expose_secret()).body(String::new())?;
//! assert_eq!(service.clone().oneshot(ok).await?.status(), StatusCode::OK);
//!
//! let missing = Request::get("/v1/health").body(String::new())?;
//! let res = service.clone().oneshot(missing).await?;
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(res.headers()["www-authenticate"], "Bearer realm=\"api\"");
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

//!
//! # Failed attempts
//!
//! With [`AuthBuilder::failed_attempts`] (on by default in [`Keygate`](crate::Keygate), 20 a
//! minute), a client that sends too many invalid keys is turned away with 429
//! `too_many_failed_attempts` before its keys reach the lookup.
//!
//! - **Whom it counts.** An IPv4 address, or an IPv6 /64 (one host commonly holds a whole
//!   /64). An IPv4 client seen through IPv6 (`::ffff:a.b.c.d`, or `64:ff9b::a.b.c.d` behind
//!   a NAT64 translator) is that IPv4 address. An IPv6 /48 has a budget of its own, sixteen
//!   times a host's, charged first: rotating through the /64s of a /48 does not multiply
//!   its budget. The price, as with IPv4 behind carrier-grade NAT: a /48 may hold many
//!   subscribers of one ISP, and one of them spending its budget makes the others' unseen
//!   keys wait too (their known-good keys pass).
//! - **The budget is taken before the lookup.** A key the layer cannot answer at once (a
//!   cache miss) takes one attempt from its client's budget first; a client without one
//!   left gets 429 and no lookup. The attempt goes back when the key turns out usable, and
//!   when the store fails to answer (an error or a timeout is a 503, never an invalid key).
//!   A request dropped by its client before the answer keeps it: else disconnecting would
//!   make every guess free. So however concurrent a burst of made-up keys, at most the
//!   quota of them is in flight to the store per client. A key answered at once (a cache
//!   hit, an in-memory store) costs an attempt only when it is refused.
//! - **Every refusal that reads `invalid_api_key` counts**, whatever stands behind it
//!   (unknown, malformed, deleted, revoked; with opaque errors also expired, disabled and
//!   owner-inactive keys), and a turned-away client gets the same 429 for all of them: the
//!   lockout cannot tell a deleted key from one that never existed.
//! - **Known-good keys pass.** The layer remembers, in bounded memory (100 000 keys), the
//!   hashes of keys its lookups found usable, however long ago; such a key is looked up
//!   without touching the budget, so a valid key keeps working from an address shared with
//!   an attacker whatever the cache holds. A remembered key found unusable later is
//!   forgotten and counted like any other. A key this layer has never found usable,
//!   presented by a client that is turned away, waits like the rest (telling it from a
//!   guess would take the very lookup the lockout withholds); it passes once its client's
//!   budget refills, or at once from any other address.
//! - **Unknown clients are not let off.** When the client IP cannot be learned (no peer
//!   address in the request; a trusted proxy forwarding a hop that does not parse, such as
//!   `X-Forwarded-For: unknown`), the layer warns once at `warn` level and counts such
//!   requests together: under the nearest trusted proxy's address, or, without any peer
//!   address, in one bucket for all of them. Give the layer the peer address: axum's
//!   `into_make_service_with_connect_info::<SocketAddr>()`, keygate's `tonic` feature (tonic
//!   over TCP), or [`PeerAddr`](crate::validate::PeerAddr) inserted per connection (hyper;
//!   tonic over TLS, whose `TlsConnectInfo` keygate does not read).
//! - **Bounded memory.** The lockout tracks at most 1 000 000 clients. A client it cannot
//!   track any more is bounded by its /48's budget (IPv6), or counted with every other
//!   untracked client of its IPv4 /16 or IPv6 /32 (sixteen times a host's budget); past
//!   that, 503 `auth_unavailable` until buckets refill. An attacker filling the tracking thus
//!   starves only its own corners of the address space; cached and known-good keys are
//!   never affected.
//! - **What stays observable.** Status, headers and body never tell a deleted key from an
//!   unknown one. One timing difference remains, on purpose: from a turned-away client, a
//!   key this layer once found usable and that was deleted since costs one lookup before
//!   its 429 (the layer must ask whether it is still usable), where an unknown key's 429
//!   comes at once. It tells the holder of that very secret that it once worked; it tells
//!   nothing about any key the prober does not hold.
//! - A missing key or two different keys are not counted (there is nothing to guess with).
//!
//! # CORS preflights
//!
//! A real CORS preflight that reaches the layer is answered `204 No Content` by keygate
//! itself, without calling the inner service; see [`crate::bypass`].

mod future;
mod gate;
mod layer;
mod lockout;
mod service;

pub use future::ResponseFuture;
pub use layer::{AuthBuilder, AuthLayer, NoLimits};
pub use service::AuthService;

#[cfg(test)]
mod tests;
