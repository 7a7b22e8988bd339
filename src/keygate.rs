//! The usual stack in one layer: authentication, then per-key rate limiting.
//!
//! ```
//! use axum::{routing::{get, post}, Router};
//! use keygate::{Keygate, Principal};
//! use keygate::store::MemoryStore;
//!
//! let keygate = Keygate::builder(MemoryStore::new())
//!     .default_quota("60/min".parse()?)
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/v1/health", get(|| async { "ok" }))
//!     .route(
//!         "/v1/messages",
//!         post(|| async { "queued" }).route_layer(
//!             keygate.route().scopes(["messages:write"]).cost(5).build()?,
//!         ),
//!     )
//!     .layer(keygate);
//! # Ok::<_, keygate::ConfigError>(())
//! ```
//!
//! [`Keygate::builder`] returns the very builder [`AuthLayer::builder`] returns, with the
//! rate limit's settings added: every authentication setting is there, by construction.
//!
//! Every request to `/v1/health` takes one token from its key's bucket (60 a minute unless
//! the key's record has quotas of its own). A `POST /v1/messages` takes five in all: the
//! outer layer charges one and the route layer the other four, in the same bucket. A route
//! with [`bucket`](KeygateRoute::bucket) gets a bucket of its own beside the main one.
//!
//! When the route refuses a request the outer layer admitted, what happens to the outer
//! layer's token is decided on purpose:
//!
//! | the route refuses by | the outer layer's token | why |
//! | --- | --- | --- |
//! | its cost (429, same bucket) | given back | the request cost nothing: a client at its route budget does not drain its main budget |
//! | its own bucket (429) | kept | the main bucket counts every request that reached the API |
//! | its rules: scope, environment (403) | kept | the request was authenticated and answered; a key must not hammer routes it may not use for free |

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::auth::{AuthBuilder, AuthLayer, AuthService};
use crate::clock::Clock;
use crate::error::ConfigError;
use crate::key::{Environment, KeyId};
use crate::lookup::KeyLookup;
use crate::quota::{nonzero, Quota};
use crate::ratelimit::{
    HeaderStyle, LimiterStore, MemoryLimiter, PerKey, RateLimitLayer, RateLimitService,
};
use crate::record::Scopes;
use crate::reject::Renderer;

/// The bucket key of the per-key limiter: the key id and an optional bucket name.
pub type KeyBucket = (KeyId, Option<Arc<str>>);

/// Builds a [`KeygateLayer`]. See the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct Keygate;

impl Keygate {
    /// Starts from the defaults of [`AuthLayer::new`], 60 requests a minute per key, the
    /// in-memory bucket store, `X-RateLimit-*` headers, and 20 invalid keys a minute per
    /// client IP before it is turned away.
    pub fn builder<L: KeyLookup>(lookup: L) -> KeygateBuilder<L> {
        AuthBuilder::starting(
            lookup,
            Limits {
                quotas: vec![Quota::per_minute(nonzero(60))],
                style: HeaderStyle::default(),
                store: InMemory,
            },
        )
        .failed_attempts(Some(Quota::per_minute(nonzero(20))))
    }
}

/// The builder of a [`KeygateLayer`]: [`AuthBuilder`] with the rate limit's settings, its
/// buckets in `St` ([`InMemory`] until [`limiter_store`](AuthBuilder::limiter_store)).
pub type KeygateBuilder<L, St = InMemory> = AuthBuilder<L, Limits<St>>;

/// The rate limit's settings in a [`KeygateBuilder`].
#[derive(Debug, Clone)]
pub struct Limits<St> {
    quotas: Vec<Quota>,
    style: HeaderStyle,
    store: St,
}

/// The default bucket store of a [`KeygateBuilder`]: a [`MemoryLimiter`] on the builder's
/// clock, made when the layer is built.
#[derive(Debug, Clone, Copy, Default)]
pub struct InMemory;

/// What a [`KeygateBuilder`] keeps its buckets in: [`InMemory`], or any [`LimiterStore`].
pub trait BucketStore {
    /// The store the layer gets.
    type Store: LimiterStore<KeyBucket> + Clone;

    /// Makes it, on the builder's clock where it keeps time itself.
    fn into_store(self, clock: Arc<dyn Clock>) -> Self::Store;
}

impl BucketStore for InMemory {
    type Store = MemoryLimiter<KeyBucket>;

    fn into_store(self, clock: Arc<dyn Clock>) -> MemoryLimiter<KeyBucket> {
        MemoryLimiter::build(crate::ratelimit::DEFAULT_MAX_BUCKETS, clock)
    }
}

impl<St: LimiterStore<KeyBucket> + Clone> BucketStore for St {
    type Store = St;

    fn into_store(self, _: Arc<dyn Clock>) -> St {
        self
    }
}

impl<L, St> AuthBuilder<L, Limits<St>> {
    /// The windows of keys whose record has none (default 60 a minute), replacing earlier
    /// ones. Call once per window: `.default_quota(a).and_quota(b)`.
    pub fn default_quota(mut self, quota: Quota) -> Self {
        self.limits.quotas = vec![quota];
        self
    }

    /// Adds a default window.
    pub fn and_quota(mut self, quota: Quota) -> Self {
        self.limits.quotas.push(quota);
        self
    }

    /// Which rate-limit headers to send (default [`HeaderStyle::Legacy`]).
    pub fn header_style(mut self, style: HeaderStyle) -> Self {
        self.limits.style = style;
        self
    }

    /// Keeps buckets in `store` (a network store shared by several instances) instead of
    /// in memory.
    pub fn limiter_store<St2: LimiterStore<KeyBucket> + Clone>(
        self,
        store: St2,
    ) -> AuthBuilder<L, Limits<St2>> {
        self.with_limits(|limits| Limits {
            quotas: limits.quotas,
            style: limits.style,
            store,
        })
    }
}

impl<L: KeyLookup, St: BucketStore> AuthBuilder<L, Limits<St>> {
    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first setting that cannot be used.
    pub fn build(self) -> Result<KeygateLayer<L, St::Store>, ConfigError> {
        let clock = self.shared_clock();
        let renderer = self.shared_renderer();
        let (gate, limits) = self.try_into_gate()?;
        let limit = RateLimitLayer::builder(PerKey::new(), limits.store.into_store(clock))
            .quotas(limits.quotas)
            .header_style(limits.style)
            .shared_renderer(Arc::clone(&renderer))
            .build()?;
        Ok(KeygateLayer {
            auth: AuthLayer::from_gate(gate),
            limit,
            renderer,
            style: limits.style,
        })
    }
}

/// Authentication and per-key rate limiting as one layer. Clones, and the route variants
/// of [`route`](Self::route), share one cache and one bucket store.
pub struct KeygateLayer<L, St> {
    auth: AuthLayer<L>,
    limit: RateLimitLayer<PerKey, St>,
    renderer: Arc<dyn Renderer>,
    style: HeaderStyle,
}

impl<L, St> Clone for KeygateLayer<L, St> {
    fn clone(&self) -> Self {
        Self {
            auth: self.auth.clone(),
            limit: self.limit.clone(),
            renderer: Arc::clone(&self.renderer),
            style: self.style,
        }
    }
}

impl<L, St> fmt::Debug for KeygateLayer<L, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeygateLayer")
            .field("auth", &self.auth)
            .field("limit", &self.limit)
            .finish()
    }
}

impl<L: KeyLookup, St: LimiterStore<KeyBucket> + Clone> KeygateLayer<L, St> {
    /// A variant for one route: scopes, environment, cost, own bucket.
    pub fn route(&self) -> KeygateRoute<'_, L, St> {
        KeygateRoute {
            base: self,
            scopes: None,
            environment: None,
            cost: 1,
            bucket: None,
        }
    }

    /// The auth layer inside.
    pub fn auth(&self) -> &AuthLayer<L> {
        &self.auth
    }

    /// The bucket store.
    pub fn limiter(&self) -> &St {
        self.limit.store()
    }
}

impl<S, L, St> Layer<S> for KeygateLayer<L, St> {
    type Service = AuthService<RateLimitService<S, PerKey, St>, L>;

    fn layer(&self, inner: S) -> Self::Service {
        self.auth.layer(self.limit.layer(inner))
    }
}

/// A route's variant of a [`KeygateLayer`], from [`KeygateLayer::route`].
#[must_use]
pub struct KeygateRoute<'a, L, St> {
    base: &'a KeygateLayer<L, St>,
    scopes: Option<Scopes>,
    environment: Option<Environment>,
    cost: u32,
    bucket: Option<(Arc<str>, Vec<Quota>)>,
}

impl<L, St> fmt::Debug for KeygateRoute<'_, L, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeygateRoute")
            .field("scopes", &self.scopes)
            .field("environment", &self.environment)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl<L: KeyLookup, St: LimiterStore<KeyBucket> + Clone> KeygateRoute<'_, L, St> {
    /// Requires these scopes.
    pub fn scopes(mut self, scopes: impl Into<Scopes>) -> Self {
        self.scopes = Some(scopes.into());
        self
    }

    /// Requires keys of this environment.
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = Some(environment);
        self
    }

    /// What one request to the route costs in all (default 1). A cost of 0 makes a probe:
    /// the key is checked and its budget reported in the headers, nothing is taken (a
    /// key-test endpoint such as the key service's `GET /auth/testkey`).
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// Gives the route a bucket of its own, with its own windows, beside the key's main one.
    pub fn bucket(mut self, name: &str, quotas: impl IntoIterator<Item = Quota>) -> Self {
        self.bucket = Some((name.into(), quotas.into_iter().collect()));
        self
    }

    /// Builds the route's layer.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidQuota`] for a bucket without windows.
    pub fn build(self) -> Result<KeygateLayer<L, St>, ConfigError> {
        let mut auth = self.base.auth.clone();
        if let Some(scopes) = self.scopes {
            auth = auth.require_scopes(scopes);
        }
        if let Some(environment) = self.environment {
            auth = auth.require_environment(environment);
        }
        let limit = match self.bucket {
            None => self.base.limit.cost(self.cost)?,
            Some((name, quotas)) => {
                RateLimitLayer::builder(PerKey::bucket(name), self.base.limit.store().clone())
                    .quotas(quotas)
                    .header_style(self.base.style)
                    .shared_renderer(Arc::clone(&self.base.renderer))
                    .cost(self.cost)
                    .build()?
            }
        };
        Ok(KeygateLayer {
            auth,
            limit,
            renderer: Arc::clone(&self.base.renderer),
            style: self.base.style,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::lookup::CachedLookup;
    use crate::store::MemoryStore;

    /// A route with its own bucket shares that bucket's state with nothing further in:
    /// its requests carry no charge marker (an extension insert each) for layers that do
    /// not exist. A route at another cost on the default buckets does share them.
    #[test]
    fn only_routes_sharing_the_default_buckets_mark_their_charges() {
        let layer = Keygate::builder(CachedLookup::new(MemoryStore::new()))
            .default_quota(Quota::per_minute(NonZeroU32::MIN))
            .build()
            .unwrap();
        let own = layer
            .route()
            .bucket("export", [Quota::per_hour(NonZeroU32::MIN)])
            .cost(5)
            .build()
            .unwrap();
        assert!(!own.limit.shared().nested.load(Ordering::Relaxed));
        assert!(!layer.limit.shared().nested.load(Ordering::Relaxed));
        let costly = layer.route().cost(5).build().unwrap();
        assert!(costly.limit.shared().nested.load(Ordering::Relaxed));
    }
}
