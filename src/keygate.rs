//! The usual stack in one layer: authentication, then per-key rate limiting.
//!
//! ```
//! use std::num::NonZeroU32;
//! use axum::{routing::{get, post}, Router};
//! use keygate::{Keygate, Principal};
//! use keygate::ratelimit::Quota;
//! use keygate::store::MemoryStore;
//!
//! let sixty = NonZeroU32::new(60).unwrap();
//! let keygate = Keygate::builder(MemoryStore::new())
//!     .default_quota(Quota::per_minute(sixty))
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
use std::time::Duration;

use tower_layer::Layer;

use crate::auth::{AuthBuilder, AuthLayer, AuthService};
use crate::bypass::Bypass;
use crate::clock::{Clock, CoarseClock};
use crate::error::ConfigError;
use crate::extract::Scheme;
use crate::key::Environment;
use crate::key::{KeyFormat, KeyId};
use crate::lookup::KeyLookup;
use crate::ratelimit::{
    nonzero, HeaderStyle, LimiterStore, MemoryLimiter, PerKey, Quota, RateLimitLayer,
    RateLimitService,
};
use crate::record::Scopes;
use crate::reject::{JsonEnvelope, Renderer};
use crate::validate::{ClientIp, SiteResolver};

/// The bucket key of the per-key limiter: the key id and an optional bucket name.
pub type KeyBucket = (KeyId, Option<Arc<str>>);

/// Builds a [`KeygateLayer`]. See the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct Keygate;

impl Keygate {
    /// Starts from the defaults of [`AuthLayer::new`], 60 requests a minute per key, the
    /// in-memory bucket store, `X-RateLimit-*` headers, and 20 invalid keys a minute per
    /// client IP before it is turned away.
    pub fn builder<L: KeyLookup>(lookup: L) -> KeygateBuilder<L, MemoryLimiter<KeyBucket>> {
        KeygateBuilder {
            auth: AuthLayer::builder(lookup).failed_attempts(Some(Quota::per_minute(nonzero(20)))),
            quotas: vec![Quota::per_minute(nonzero(60))],
            style: HeaderStyle::default(),
            store: None,
            renderer: Arc::new(JsonEnvelope),
            opaque: false,
            clock: Arc::new(CoarseClock),
        }
    }
}

/// Settings for a [`KeygateLayer`]: those of [`AuthBuilder`] and the rate limit's.
#[must_use]
pub struct KeygateBuilder<L, St> {
    auth: AuthBuilder<L>,
    quotas: Vec<Quota>,
    style: HeaderStyle,
    store: Option<St>,
    renderer: Arc<dyn Renderer>,
    opaque: bool,
    clock: Arc<dyn Clock>,
}

impl<L, St> fmt::Debug for KeygateBuilder<L, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeygateBuilder")
            .field("auth", &self.auth)
            .field("quotas", &self.quotas)
            .field("style", &self.style)
            .finish_non_exhaustive()
    }
}

macro_rules! forward {
    ($($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty);)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $ty) -> Self {
                self.auth = self.auth.$name($arg);
                self
            }
        )*
    };
}

impl<L: KeyLookup, St> KeygateBuilder<L, St> {
    forward! {
        /// See [`AuthBuilder::schemes`].
        schemes(schemes: Vec<Scheme>);
        /// See [`AuthBuilder::max_key_len`].
        max_key_len(max_len: usize);
        /// See [`AuthBuilder::format`].
        format(format: KeyFormat);
        /// See [`AuthBuilder::client_ip`].
        client_ip(client_ip: ClientIp);
        /// See [`AuthBuilder::site`].
        site(site: SiteResolver);
        /// See [`AuthBuilder::lookup_timeout`].
        lookup_timeout(timeout: Option<Duration>);
        /// See [`AuthBuilder::realm`].
        realm(realm: String);
        /// See [`AuthBuilder::failed_attempts`] (default 20 a minute; `None` turns it off).
        failed_attempts(quota: Option<Quota>);
    }

    /// See [`AuthBuilder::bypass`].
    pub fn bypass(mut self, bypass: impl Bypass) -> Self {
        self.auth = self.auth.bypass(bypass);
        self
    }

    /// How rejections are rendered, for authentication and rate limiting alike.
    pub fn renderer(mut self, renderer: impl Renderer) -> Self {
        self.renderer = Arc::new(renderer);
        self
    }

    /// See [`AuthBuilder::opaque_errors`].
    pub fn opaque_errors(mut self, opaque: bool) -> Self {
        self.opaque = opaque;
        self
    }

    /// The clock of expiry checks, failed attempts and (with the in-memory store) buckets.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The windows of keys whose record has none (default 60 a minute), replacing earlier
    /// ones. Call once per window: `.default_quota(a).and_quota(b)`.
    pub fn default_quota(mut self, quota: Quota) -> Self {
        self.quotas = vec![quota];
        self
    }

    /// Adds a default window.
    pub fn and_quota(mut self, quota: Quota) -> Self {
        self.quotas.push(quota);
        self
    }

    /// Which rate-limit headers to send.
    pub fn header_style(mut self, style: HeaderStyle) -> Self {
        self.style = style;
        self
    }

    /// Keeps buckets in `store` (a network store shared by several instances).
    pub fn limiter_store<St2>(self, store: St2) -> KeygateBuilder<L, St2> {
        KeygateBuilder {
            auth: self.auth,
            quotas: self.quotas,
            style: self.style,
            store: Some(store),
            renderer: self.renderer,
            opaque: self.opaque,
            clock: self.clock,
        }
    }
}

impl<L: KeyLookup> KeygateBuilder<L, MemoryLimiter<KeyBucket>> {
    /// Builds the layer with the in-memory bucket store.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first setting that cannot be used.
    pub fn build(mut self) -> Result<KeygateLayer<L, MemoryLimiter<KeyBucket>>, ConfigError> {
        let store = match self.store.take() {
            Some(store) => store,
            None => MemoryLimiter::new().with_clock(Arc::clone(&self.clock)),
        };
        self.limiter_store(store).build_with_store()
    }
}

impl<L: KeyLookup, St: LimiterStore<KeyBucket> + Clone> KeygateBuilder<L, St> {
    /// Builds the layer with the store given to [`limiter_store`](Self::limiter_store).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first setting that cannot be used, or no store.
    pub fn build_with_store(self) -> Result<KeygateLayer<L, St>, ConfigError> {
        let store = self.store.ok_or(ConfigError::MissingLimiterStore)?;
        let auth = self
            .auth
            .renderer(ArcRenderer(Arc::clone(&self.renderer)))
            .opaque_errors(self.opaque)
            .clock(Arc::clone(&self.clock))
            .build()?;
        let limit = RateLimitLayer::with_options(
            PerKey::new(),
            store,
            self.quotas,
            self.style,
            Arc::clone(&self.renderer),
            self.opaque,
        )?;
        Ok(KeygateLayer {
            auth,
            limit,
            renderer: self.renderer,
            opaque: self.opaque,
        })
    }
}

struct ArcRenderer(Arc<dyn Renderer>);

impl Renderer for ArcRenderer {
    fn render(&self, rejection: &crate::reject::Rejection) -> http::Response<bytes::Bytes> {
        self.0.render(rejection)
    }
}

/// Authentication and per-key rate limiting as one layer. Clones, and the route variants
/// of [`route`](Self::route), share one cache and one bucket store.
pub struct KeygateLayer<L, St> {
    auth: AuthLayer<L>,
    limit: RateLimitLayer<PerKey, St>,
    renderer: Arc<dyn Renderer>,
    opaque: bool,
}

impl<L, St> Clone for KeygateLayer<L, St> {
    fn clone(&self) -> Self {
        Self {
            auth: self.auth.clone(),
            limit: self.limit.clone(),
            renderer: Arc::clone(&self.renderer),
            opaque: self.opaque,
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

    /// What one request to the route costs in all (default 1).
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
    /// [`ConfigError::Zero`] for a zero cost, [`ConfigError::InvalidQuota`] for a bucket
    /// without windows.
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
            Some((name, quotas)) => RateLimitLayer::with_options(
                PerKey::bucket(name),
                self.base.limit.store().clone(),
                quotas,
                self.base.limit.style(),
                Arc::clone(&self.base.renderer),
                self.base.opaque,
            )?
            .cost(self.cost)?,
        };
        Ok(KeygateLayer {
            auth,
            limit,
            renderer: Arc::clone(&self.base.renderer),
            opaque: self.base.opaque,
        })
    }
}
