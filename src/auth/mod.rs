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
//! use keygate::record::{Environment, KeyRecord, Owner};
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

mod future;
mod gate;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::{AuthBuilder, AuthLayer, DEFAULT_LOOKUP_TIMEOUT};
pub use service::AuthService;

#[cfg(test)]
mod tests;
