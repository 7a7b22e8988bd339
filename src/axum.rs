//! axum extractors (feature `axum`): take the [`Principal`] in a handler.
//!
//! ```
//! use axum::{routing::get, Json, Router};
//! use keygate::{AuthLayer, Principal};
//! use keygate::store::MemoryStore;
//!
//! async fn me(principal: Principal) -> Json<Principal> {
//!     Json(principal)
//! }
//!
//! async fn maybe(principal: Option<Principal>) -> String {
//!     principal.map(|p| p.key_id().to_string()).unwrap_or_else(|| "anonymous".into())
//! }
//!
//! let app: Router = Router::new()
//!     .route("/v1/users/me", get(me))
//!     .route("/public", get(maybe))
//!     .layer(AuthLayer::new(MemoryStore::new()));
//! ```

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::StatusCode;

use crate::record::Principal;

/// The handler asked for a [`Principal`] but no auth layer put one in the request: the
/// route is not behind an [`AuthLayer`](crate::AuthLayer), or it is bypassed. A server
/// configuration error, answered 500.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no authenticated principal: is this route behind keygate's AuthLayer?")]
pub struct MissingPrincipal;

impl IntoResponse for MissingPrincipal {
    fn into_response(self) -> Response {
        tracing::error!(target: "keygate", "{self}");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(http::header::CONTENT_TYPE, "application/json")],
            r#"{"code":"internal_error","message":"The server is misconfigured.","data":null}"#,
        )
            .into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = MissingPrincipal;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or(MissingPrincipal)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Principal {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Principal>().cloned())
    }
}
