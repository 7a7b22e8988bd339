use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tower_layer::Layer;

use super::service::RateLimitService;
use super::shared::Shared;
use super::{HeaderStyle, KeyFn, LimiterStore, Quota};
use crate::error::ConfigError;
use crate::passage::LayerId;
use crate::reject::{JsonEnvelope, Renderer, Responder};

/// Limits requests with token buckets. See the [module docs](super).
///
/// Clones share one store; [`cost`](Self::cost) makes a variant for an expensive route
/// that shares it too.
///
/// ```
/// use keygate::head::RequestHead;
/// use keygate::ratelimit::{MemoryLimiter, RateLimitLayer};
/// use keygate::validate::ClientIp;
///
/// let client_ip = ClientIp::new();
/// let per_ip = RateLimitLayer::builder(
///     move |head: &RequestHead<'_>| client_ip.resolve(head),
///     MemoryLimiter::new(),
/// )
/// .quota("10/s".parse()?)
/// .build()?;
/// # let _ = per_ip;
/// # Ok::<_, keygate::ConfigError>(())
/// ```
pub struct RateLimitLayer<F, St> {
    shared: Arc<Shared<F, St>>,
    cost: u32,
}

impl<F, St> Clone for RateLimitLayer<F, St> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            cost: self.cost,
        }
    }
}

impl<F, St> fmt::Debug for RateLimitLayer<F, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("quotas", &self.shared.quotas)
            .field("style", &self.shared.style)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl<F: KeyFn, St: LimiterStore<F::Key>> RateLimitLayer<F, St> {
    /// A layer keyed by `key_fn`, its buckets in `store`.
    pub fn builder(key_fn: F, store: St) -> RateLimitBuilder<F, St> {
        RateLimitBuilder {
            key_fn,
            store,
            quotas: Vec::new(),
            style: HeaderStyle::default(),
            renderer: Arc::new(JsonEnvelope),
            cost: 1,
        }
    }

    /// A variant for routes whose requests cost `cost` tokens (sharing this layer's store).
    /// Inside an outer layer of the same store and bucket, the route's total is `cost`:
    /// only the difference is charged.
    ///
    /// A cost of 0 makes a probe: the bucket is read and reported in the headers, nothing
    /// is taken and nothing refused (a key-test endpoint, `GET /auth/testkey`).
    ///
    /// # Errors
    ///
    /// None today; the `Result` is kept for settings that can be refused.
    pub fn cost(&self, cost: u32) -> Result<Self, ConfigError> {
        if cost > 0 {
            self.shared.nested.store(true, Ordering::Relaxed);
        }
        Ok(Self {
            shared: Arc::clone(&self.shared),
            cost,
        })
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.shared.store
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Shared<F, St> {
        &self.shared
    }
}

impl<S, F, St> Layer<S> for RateLimitLayer<F, St> {
    type Service = RateLimitService<S, F, St>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService::new(inner, Arc::clone(&self.shared), self.cost)
    }
}

/// Settings for a [`RateLimitLayer`], from [`RateLimitLayer::builder`]. Every setter
/// consumes and returns the builder; [`build`](Self::build) checks the whole.
#[must_use]
pub struct RateLimitBuilder<F, St> {
    key_fn: F,
    store: St,
    quotas: Vec<Quota>,
    style: HeaderStyle,
    renderer: Arc<dyn Renderer>,
    cost: u32,
}

impl<F, St> fmt::Debug for RateLimitBuilder<F, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitBuilder")
            .field("quotas", &self.quotas)
            .field("style", &self.style)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl<F: KeyFn, St: LimiterStore<F::Key>> RateLimitBuilder<F, St> {
    /// Adds a window (at least one; at most [`MAX_WINDOWS`](super::MAX_WINDOWS)): the
    /// default for requests whose key carries no quotas of its own. Every window must admit
    /// a request.
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quotas.push(quota);
        self
    }

    /// Sets every window at once, replacing earlier ones.
    pub fn quotas(mut self, quotas: impl IntoIterator<Item = Quota>) -> Self {
        self.quotas = quotas.into_iter().collect();
        self
    }

    /// Tokens each request takes (default 1; 0 reads and reports the bucket without taking
    /// anything). For a route that shares another layer's buckets at another cost, use
    /// [`RateLimitLayer::cost`] on that layer instead.
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// Which headers to send (default [`HeaderStyle::Legacy`]).
    pub fn header_style(mut self, style: HeaderStyle) -> Self {
        self.style = style;
        self
    }

    /// How a 429 (or a 503 when the store fails) is rendered (default [`JsonEnvelope`]).
    pub fn renderer(mut self, renderer: impl Renderer) -> Self {
        self.renderer = Arc::new(renderer);
        self
    }

    pub(crate) fn shared_renderer(mut self, renderer: Arc<dyn Renderer>) -> Self {
        self.renderer = renderer;
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidQuota`] when there is no window, or more than
    /// [`MAX_WINDOWS`](super::MAX_WINDOWS).
    pub fn build(self) -> Result<RateLimitLayer<F, St>, ConfigError> {
        if self.quotas.is_empty() || self.quotas.len() > super::MAX_WINDOWS {
            return Err(ConfigError::InvalidQuota(format!(
                "{} quotas (1 to {} expected)",
                self.quotas.len(),
                super::MAX_WINDOWS
            )));
        }
        Ok(RateLimitLayer {
            shared: Arc::new(Shared {
                key_fn: self.key_fn,
                store: self.store,
                quotas: self.quotas,
                style: self.style,
                responder: Responder::default_for(self.renderer, false),
                id: LayerId::next(),
                nested: AtomicBool::new(false),
            }),
            cost: self.cost,
        })
    }
}
