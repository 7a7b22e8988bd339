use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::gate::Gate;
use super::lockout::Lockout;
use super::service::AuthService;
use crate::bypass::{Bypass, DefaultBypass};
use crate::clock::{Clock, CoarseClock};
use crate::error::ConfigError;
use crate::extract::{Extractor, Scheme};
use crate::key::Environment;
use crate::key::KeyFormat;
use crate::lookup::KeyLookup;
use crate::passage::LayerId;
use crate::quota::Quota;
use crate::record::Scopes;
use crate::reject::{JsonEnvelope, Renderer, Responder};
use crate::validate::{ClientIp, Rules, SiteResolver};

/// Default time a lookup may take before the request is answered 503 `auth_unavailable`.
pub(crate) const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Authenticates API keys in front of a service. See the [module docs](crate::auth).
///
/// Clones share one state (lookup, cache, settings) behind an `Arc`;
/// [`require_scopes`](Self::require_scopes) and
/// [`require_environment`](Self::require_environment) make per-route variants that still
/// share it.
pub struct AuthLayer<L> {
    gate: Arc<Gate<L>>,
    rules: Arc<Rules>,
}

impl<L> Clone for AuthLayer<L> {
    fn clone(&self) -> Self {
        Self {
            gate: Arc::clone(&self.gate),
            rules: Arc::clone(&self.rules),
        }
    }
}

impl<L> fmt::Debug for AuthLayer<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("gate", &self.gate)
            .field("rules", &self.rules)
            .finish()
    }
}

impl<L: KeyLookup> AuthLayer<L> {
    /// A layer with every default: `X-API-KEY`, Bearer and Basic; the `kg_live_`/`kg_test_`
    /// format; the JSON envelope; CORS preflights and `/swagger` bypassed; no trusted
    /// proxies; no failed-attempt limit.
    pub fn new(lookup: L) -> Self {
        // The builder's defaults, which cannot fail: nothing to check.
        let extractor = Extractor::default();
        let responder = Responder::default_for(Arc::new(JsonEnvelope), extractor.uses_bearer());
        let (gate, NoLimits) =
            AuthBuilder::starting(lookup, NoLimits).assemble(extractor, responder);
        Self::from_gate(gate)
    }

    /// A builder starting from the defaults of [`AuthLayer::new`].
    pub fn builder(lookup: L) -> AuthBuilder<L> {
        AuthBuilder::starting(lookup, NoLimits)
    }

    pub(crate) fn from_gate(gate: Gate<L>) -> Self {
        Self {
            gate: Arc::new(gate),
            rules: Arc::new(Rules::default()),
        }
    }

    /// The lookup this layer uses (for instance to invalidate a [`CachedLookup`](crate::lookup::CachedLookup)).
    pub fn lookup(&self) -> &L {
        &self.gate.lookup
    }
}

impl<L> AuthLayer<L> {
    /// A variant of this layer for routes that need these scopes (all of them). It shares
    /// this layer's state.
    #[must_use]
    pub fn require_scopes(&self, scopes: impl Into<Scopes>) -> Self {
        self.gate.nested.store(true, Ordering::Relaxed);
        Self {
            gate: Arc::clone(&self.gate),
            rules: Arc::new((*self.rules).clone().scopes(scopes)),
        }
    }

    /// A variant of this layer for routes that take keys of one environment only. It shares
    /// this layer's state.
    #[must_use]
    pub fn require_environment(&self, environment: Environment) -> Self {
        self.gate.nested.store(true, Ordering::Relaxed);
        Self {
            gate: Arc::clone(&self.gate),
            rules: Arc::new((*self.rules).clone().environment(environment)),
        }
    }

    /// What this layer's routes require.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }
}

impl<S, L> Layer<S> for AuthLayer<L> {
    type Service = AuthService<S, L>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService::new(inner, Arc::clone(&self.gate), Arc::clone(&self.rules))
    }
}

/// What [`AuthLayer::builder`] builds: the auth layer alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLimits;

/// Settings for an [`AuthLayer`] or, with rate limits (`X` = the rate limit's settings),
/// for a [`KeygateLayer`](crate::KeygateLayer): one builder, so both take the same
/// authentication settings by construction. Every setter consumes and returns the
/// builder; `build` checks the whole and names the first setting that cannot be used.
#[must_use]
pub struct AuthBuilder<L, X = NoLimits> {
    lookup: L,
    schemes: Option<Vec<Scheme>>,
    max_len: Option<usize>,
    format: KeyFormat,
    renderer: Arc<dyn Renderer>,
    bypass: Box<dyn Bypass>,
    client_ip: ClientIp,
    site: Option<SiteResolver>,
    lookup_timeout: Option<Duration>,
    opaque: bool,
    realm: String,
    clock: Arc<dyn Clock>,
    failed: Option<Quota>,
    /// The rate limit's settings, for the stack.
    pub(crate) limits: X,
}

impl<L, X: fmt::Debug> fmt::Debug for AuthBuilder<L, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthBuilder")
            .field("schemes", &self.schemes)
            .field("format", &self.format)
            .field("client_ip", &self.client_ip)
            .field("site", &self.site)
            .field("lookup_timeout", &self.lookup_timeout)
            .field("opaque", &self.opaque)
            .field("realm", &self.realm)
            .field("failed_attempts", &self.failed)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<L, X> AuthBuilder<L, X> {
    pub(crate) fn starting(lookup: L, limits: X) -> Self {
        Self {
            lookup,
            schemes: None,
            max_len: None,
            format: KeyFormat::default(),
            renderer: Arc::new(JsonEnvelope),
            bypass: Box::new(DefaultBypass::default()),
            client_ip: ClientIp::default(),
            site: None,
            lookup_timeout: Some(DEFAULT_LOOKUP_TIMEOUT),
            opaque: false,
            realm: "api".to_owned(),
            clock: Arc::new(CoarseClock),
            failed: None,
            limits,
        }
    }

    /// Reads the key from these schemes, in order (replacing the default `X-API-KEY`,
    /// Bearer, Basic).
    pub fn schemes(mut self, schemes: impl IntoIterator<Item = Scheme>) -> Self {
        self.schemes = Some(schemes.into_iter().collect());
        self
    }

    /// The longest key accepted, in bytes (default 256).
    pub fn max_key_len(mut self, max_len: usize) -> Self {
        self.max_len = Some(max_len);
        self
    }

    /// The key format checked before any lookup (default `kg_live_`/`kg_test_` with
    /// checksum; [`KeyFormat::any`] for keys from another system).
    pub fn format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// How rejections are rendered (default [`JsonEnvelope`]); in the stack, the rate
    /// limit's too.
    pub fn renderer(mut self, renderer: impl Renderer) -> Self {
        self.renderer = Arc::new(renderer);
        self
    }

    /// Which requests need no key (default: real CORS preflights and `/swagger`).
    pub fn bypass(mut self, bypass: impl Bypass) -> Self {
        self.bypass = Box::new(bypass);
        self
    }

    /// How the client IP is found (default: the peer address, no proxy trusted).
    pub fn client_ip(mut self, client_ip: ClientIp) -> Self {
        self.client_ip = client_ip;
        self
    }

    /// Where the site of a request comes from, for keys limited to sites.
    pub fn site(mut self, site: SiteResolver) -> Self {
        self.site = Some(site);
        self
    }

    /// How long a lookup may take (default 2 s; `None` waits forever). Past it the request
    /// gets 503 `auth_unavailable`. The timer needs a Tokio runtime with time enabled; with
    /// no Tokio runtime at hand, lookups run without one.
    pub fn lookup_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    /// Folds `api_key_expired`, `api_key_disabled` and `owner_inactive` into
    /// `invalid_api_key` in responses, for operators who want opaque errors.
    pub fn opaque_errors(mut self, opaque: bool) -> Self {
        self.opaque = opaque;
        self
    }

    /// The realm of the `WWW-Authenticate` challenge (default `api`).
    pub fn realm(mut self, realm: impl Into<String>) -> Self {
        self.realm = realm.into();
        self
    }

    /// Turns away, with 429 `too_many_failed_attempts` and before any lookup, a client IP
    /// (an IPv6 /64) that sent more invalid keys than `quota` allows (e.g. 20 a minute), so
    /// that a key-guessing flood never reaches the store. Off by default in an
    /// [`AuthLayer`]; 20 a minute in [`Keygate`](crate::Keygate) (`None` turns it off).
    ///
    /// The budget is taken before a lookup and given back when the key is usable, so at most
    /// `quota` made-up keys reach the store however concurrent the burst. Keys the layer has
    /// found usable before keep working from a turned-away address. A deleted key is counted
    /// and refused exactly like an unknown one. The client IP comes from
    /// [`client_ip`](Self::client_ip); when it cannot be learned the layer warns once and
    /// counts such requests together rather than not at all. The whole policy is in the
    /// [module docs](crate::auth#failed-attempts).
    pub fn failed_attempts(mut self, quota: Option<Quota>) -> Self {
        self.failed = quota;
        self
    }

    /// The clock of expiry checks and failed attempts (and, in the stack, of in-memory
    /// buckets): a [`FakeClock`](crate::clock::FakeClock) in tests.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    pub(crate) fn shared_clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    pub(crate) fn shared_renderer(&self) -> Arc<dyn Renderer> {
        Arc::clone(&self.renderer)
    }

    /// Swaps the rate limit's settings (the stack's builder changes its store's type).
    pub(crate) fn with_limits<Y>(self, limits: impl FnOnce(X) -> Y) -> AuthBuilder<L, Y> {
        AuthBuilder {
            lookup: self.lookup,
            schemes: self.schemes,
            max_len: self.max_len,
            format: self.format,
            renderer: self.renderer,
            bypass: self.bypass,
            client_ip: self.client_ip,
            site: self.site,
            lookup_timeout: self.lookup_timeout,
            opaque: self.opaque,
            realm: self.realm,
            clock: self.clock,
            failed: self.failed,
            limits: limits(self.limits),
        }
    }

    /// Checks the authentication settings and makes the layer's state; the rate limit's
    /// settings come back as they are.
    pub(crate) fn try_into_gate(mut self) -> Result<(Gate<L>, X), ConfigError> {
        let mut extractor = Extractor::builder();
        if let Some(schemes) = self.schemes.take() {
            extractor = extractor.schemes(schemes);
        }
        if let Some(max_len) = self.max_len {
            extractor = extractor.max_len(max_len);
        }
        let extractor = extractor.build()?;
        if self.lookup_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::Zero("lookup timeout"));
        }
        let responder = Responder::new(
            Arc::clone(&self.renderer),
            self.opaque,
            extractor.uses_bearer(),
            &self.realm,
        )?;
        Ok(self.assemble(extractor, responder))
    }

    /// The layer's state from these settings, with the parts that needed checking.
    fn assemble(self, extractor: Extractor, responder: Responder) -> (Gate<L>, X) {
        let gate = Gate {
            lookup: self.lookup,
            extractor,
            format: self.format,
            responder,
            opaque: self.opaque,
            bypass: self.bypass,
            client_ip: self.client_ip,
            site: self.site,
            lookup_timeout: self.lookup_timeout,
            lockout: self
                .failed
                .map(|quota| Lockout::new(quota, Arc::clone(&self.clock))),
            clock: self.clock,
            preflight_warned: AtomicBool::new(false),
            id: LayerId::next(),
            nested: AtomicBool::new(false),
        };
        (gate, self.limits)
    }
}

impl<L: KeyLookup> AuthBuilder<L, NoLimits> {
    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first setting that cannot be used.
    pub fn build(self) -> Result<AuthLayer<L>, ConfigError> {
        let (gate, NoLimits) = self.try_into_gate()?;
        Ok(AuthLayer::from_gate(gate))
    }
}
