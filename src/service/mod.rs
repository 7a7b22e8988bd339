//! The key service (feature `service`): where an API's users get, test and manage their
//! keys, as an axum [`Router`] over any [`ClientStore`], mounted beside your API.
//!
//! | endpoint | does |
//! | --- | --- |
//! | `POST /auth/createkey` | username and password in, a new key out; the owner's earlier keys are revoked in the same transaction |
//! | `GET /auth/testkey` | the key (any configured scheme) checked by the layers' own rules, no token taken |
//! | `POST /auth/session` | username and password in, a 15-minute session token out, for the management API |
//! | `GET`, `POST /v1/keys`; `GET`, `PATCH`, `DELETE /v1/keys/{id}` | the signed-in owner's keys |
//! | `POST /v1/keys/{id}/disable`, `/enable`, `/rotate` | lifecycle |
//! | `GET /v1/audit` | the owner's audit trail, newest first |
//! | `GET /dashboard` | one self-contained page doing all of the above in a browser |
//! | `GET`, `POST /v1/clients`; `DELETE /v1/clients/{id}` | the owner's OAuth2 clients |
//! | `POST /oauth/token`, `/oauth/revoke`, `/oauth/introspect` | OAuth2 client credentials (RFC 6749 §4.4), revocation (RFC 7009), introspection (RFC 7662) |
//! | `POST /v1/keys/revoke` | whoever holds a key (or a client secret) may kill it; always the same 200 |
//! | `POST /v1/keys/leaked` | GitHub secret-scanning alerts, signature checked ([`KeyServiceBuilder::github_public_keys`]) |
//! | `GET /swagger/openapi.json` | OpenAPI 3.1 of the service (and of your API, if given) |
//!
//! ```
//! # #[cfg(feature = "sqlite")] {
//! use axum::{routing::get, Router};
//! use keygate::lookup::CachedLookup;
//! use keygate::service::KeyService;
//! use keygate::store::MemoryStore;
//! use keygate::Keygate;
//!
//! let store = MemoryStore::new();
//! let keygate = Keygate::builder(CachedLookup::over_store(store.clone()))
//!     .default_quota("60/min".parse()?)
//!     .build()?;
//! let api: Router = Router::new()
//!     .route("/v1/health", get(|| async { "ok" }))
//!     .layer(keygate.clone());
//! // `/auth/testkey` runs the same checks as the API, without taking a token.
//! let service = KeyService::builder(store)
//!     .testkey(keygate.route().cost(0).build()?)
//!     .build()?;
//! let app = api.merge(service);
//! # let _ = app;
//! # }
//! # Ok::<_, keygate::ConfigError>(())
//! ```
//!
//! # Security
//!
//! - **Tenants.** Every management call acts for the owner its session names: another
//!   owner's key id answers `404 not_found` exactly like an unknown one.
//! - **Credentials.** Passwords are checked with argon2id on tokio's blocking pool, with the
//!   same work for an unknown user; failed sign-ins are limited per username and per client
//!   IP (10 and 50 an hour by default, tokens given back on success), answered `429
//!   too_many_failed_attempts`. An address the user signed in from in the last 30 days
//!   skips the username's budget, so a stranger cannot lock her out of it. The limits are
//!   per process.
//! - **Secrets** appear in exactly one response: the one that made them (`Cache-Control:
//!   no-store`). Lists and views carry the public id and the prefix only.
//! - **Sessions** are HMAC-SHA256-signed tokens (`kgs_…`), checked in constant time, ending
//!   after 15 minutes, and for good when the owner's password is set or the owner is
//!   disabled ([`Standing`](crate::store::Standing)). Give every instance the same
//!   [`session_secret`](KeyServiceBuilder::session_secret) so that sessions work across
//!   them; the default is random per process.
//! - **Bodies** are JSON objects of known fields only, each given once and not `null`, at
//!   most 16 KiB: anything else is refused (400, 413, 415, 422 naming the field) before
//!   anything is written.
//! - **Audit ids** are opaque: a keyed permutation of the store's sequence, so that their
//!   gaps do not count other owners' events.
//! - **Client IPs** come from the [`ClientIp`] resolver: peers only, unless proxies are
//!   trusted.
//!
//! Mount the service outside keygate's own layer (it authenticates its callers itself),
//! and put a CORS layer, if any, outside both.

mod clients;
mod cursor;
mod fail;
mod leaked;
mod login;
mod oauth;
mod session;
mod views;

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, Route};
use axum::Router;
use http::header::{AUTHORIZATION, CACHE_CONTROL};
use http::request::Parts;
use http::{HeaderValue, StatusCode};
use serde_json::{json, Value};
use tower_layer::Layer;
use tower_service::Service;

use self::cursor::EventIds;
use self::fail::{Fail, Json};
use self::login::Logins;
use self::session::Signer;
use self::views::{
    AuditPage, AuditQueryParams, AuditView, Create, Created, Credentials, KeyPage, KeyView,
    ListQuery, NewApiKey, Patch, RateLimitView, Rotate, SessionView, TestKeyView,
};
use crate::clock::{Clock, SystemClock};
use crate::error::ConfigError;
use crate::head::RequestHead;
use crate::key::{Environment, KeyFormat, KeyId};
use crate::quota::Quota;
use crate::record::{KeyRecord, Owner, Principal, Status};
use crate::store::{Actor, AuditQuery, ClientStore, KeyStore, NewKey, Page};

pub use self::leaked::LeakReport;
use crate::validate::ClientIp;

/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(900);
/// The most store pages one list call reads past hidden records.
const LIST_SCANS: usize = 20;
/// The longest password read.
const MAX_CREDENTIAL: usize = 1024;
/// The longest username read: an owner's name is at most 256 bytes, and a longer one would
/// only hold memory in the sign-in limiter.
const MAX_USERNAME: usize = 256;

/// The key service. Start with [`KeyService::builder`].
#[derive(Debug, Clone, Copy)]
pub struct KeyService;

impl KeyService {
    /// A service over `store`.
    pub fn builder<S: ClientStore + Send + Sync + 'static>(store: S) -> KeyServiceBuilder<S> {
        KeyServiceBuilder {
            store,
            template: NewKey::new("", "created by /auth/createkey", Environment::Live),
            format: KeyFormat::default(),
            client_ip: ClientIp::new(),
            secret: None,
            user_quota: Quota::per_hour(nonzero(10)),
            ip_quota: Quota::per_hour(nonzero(50)),
            clock: Arc::new(SystemClock),
            testkey: None,
            api_paths: None,
            oauth_body_credentials: false,
            oauth_quotas: Vec::new(),
            oauth_issue_quota: Quota::per_hour(nonzero(100)),
            github_keys: Vec::new(),
            on_leak: None,
        }
    }
}

const fn nonzero(n: u32) -> std::num::NonZeroU32 {
    match std::num::NonZeroU32::new(n) {
        Some(n) => n,
        None => std::num::NonZeroU32::MIN,
    }
}

/// Settings of a [`KeyService`]; [`build`](Self::build) makes its [`Router`].
pub struct KeyServiceBuilder<S> {
    store: S,
    template: NewKey,
    format: KeyFormat,
    client_ip: ClientIp,
    secret: Option<Vec<u8>>,
    user_quota: Quota,
    ip_quota: Quota,
    clock: Arc<dyn Clock>,
    testkey: Option<Router>,
    api_paths: Option<Value>,
    oauth_body_credentials: bool,
    oauth_quotas: Vec<Quota>,
    oauth_issue_quota: Quota,
    github_keys: Vec<String>,
    on_leak: Option<leaked::LeakHook>,
}

impl<S> std::fmt::Debug for KeyServiceBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyServiceBuilder")
            .field("createkey", &self.template)
            .field("client_ip", &self.client_ip)
            .field("login_quota_per_user", &self.user_quota)
            .field("login_quota_per_ip", &self.ip_quota)
            .field("testkey", &self.testkey.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: ClientStore + Send + Sync + 'static> KeyServiceBuilder<S> {
    /// The key `POST /auth/createkey` makes (its owner is the caller): name, environment,
    /// scopes, rates… Default: a live key named "created by /auth/createkey" with no
    /// scopes and the layer's default rate.
    pub fn createkey(mut self, template: NewKey) -> Self {
        self.template = template;
        self
    }

    /// The key format of the store's keys, for the `prefix` of key views (default
    /// `kg_live_` / `kg_test_`).
    pub fn format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// Where client IPs come from (for the sign-in limits, the audit trail): the peer
    /// address by default; trust your proxies here.
    pub fn client_ip(mut self, client_ip: ClientIp) -> Self {
        self.client_ip = client_ip;
        self
    }

    /// The secret that signs session tokens, at least 32 bytes. Give every instance of one
    /// service the same secret; by default a random one is made per process (sessions then
    /// end with it).
    pub fn session_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Failed sign-ins allowed per username and per client IP (default 10 and 50 an hour).
    pub fn login_limits(mut self, per_user: Quota, per_ip: Quota) -> Self {
        self.user_quota = per_user;
        self.ip_quota = per_ip;
        self
    }

    /// Reads time from `clock` (session expiry, key expiry from `expires_in`).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Serves `GET /auth/testkey` behind `layer`: your API's keygate layer as a route layer
    /// that takes no token, `keygate.route().cost(0).build()?`, so the answer is what your
    /// API would say. Without it the route is not served.
    pub fn testkey<L>(mut self, layer: L) -> Self
    where
        L: Layer<Route> + Clone + Send + Sync + 'static,
        L::Service: Service<Request, Error = Infallible> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request>>::Response: IntoResponse + 'static,
        <L::Service as Service<Request>>::Future: Send + 'static,
    {
        self.testkey = Some(
            Router::new().route(
                "/auth/testkey",
                get(testkey)
                    .route_layer(layer)
                    .layer(axum::middleware::map_response(rate_limit_into_body)),
            ),
        );
        self
    }

    /// Whether `POST /oauth/token` (and revoke, introspect) also take `client_id` and
    /// `client_secret` in the body. Off by default: RFC 6749 §2.3.1 does not recommend it,
    /// and HTTP Basic is always taken. A request never may use both.
    pub fn oauth_body_credentials(mut self, allowed: bool) -> Self {
        self.oauth_body_credentials = allowed;
        self
    }

    /// The rate-limit windows of OAuth2 access tokens, shared by every token of one client
    /// (default: none, the layer's default quota).
    pub fn oauth_token_quotas(mut self, quotas: impl IntoIterator<Item = Quota>) -> Self {
        self.oauth_token_quotas_set(quotas.into_iter().collect());
        self
    }

    fn oauth_token_quotas_set(&mut self, quotas: Vec<Quota>) {
        self.oauth_quotas = quotas;
    }

    /// How many access tokens one client may be issued (default 100 an hour): each is a
    /// stored key, and a client needs about one an hour. Past it, `429 slow_down`.
    pub fn oauth_token_issue_quota(mut self, quota: Quota) -> Self {
        self.oauth_issue_quota = quota;
        self
    }

    /// Trusts GitHub's secret-scanning public keys for `POST /v1/keys/leaked`: the JSON
    /// document of `https://api.github.com/meta/public_keys/secret_scanning`
    /// (`{"public_keys": [{"key_identifier", "key", …}]}`), fetched by you (for tests, one
    /// of your own). Without any, every alert is refused as unsigned.
    pub fn github_public_keys(mut self, document: impl Into<String>) -> Self {
        self.github_keys.push(document.into());
        self
    }

    /// Called for every key a leak report revoked (or found revoked already): to e-mail
    /// its owner, say. It runs on the request; hand slow work to a task.
    pub fn on_leak(mut self, hook: impl Fn(&LeakReport) + Send + Sync + 'static) -> Self {
        self.on_leak = Some(Arc::new(hook));
        self
    }

    /// Adds your API's OpenAPI `paths` object to `/swagger/openapi.json`.
    pub fn api_paths(mut self, paths: Value) -> Self {
        self.api_paths = Some(paths);
        self
    }

    /// The router.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidValue`] when the session secret is shorter than 32 bytes, when
    /// no random secret could be made, or when a GitHub public-key document does not parse.
    pub fn build(self) -> Result<Router, ConfigError> {
        let mut scanners = leaked::Scanners::default();
        for document in &self.github_keys {
            scanners.add_github_keys(document)?;
        }
        scanners.hook = self.on_leak;
        let secret = match self.secret {
            Some(secret) if secret.len() >= 32 => secret,
            Some(_) => {
                return Err(ConfigError::InvalidValue(
                    "session secret (32 bytes at least)",
                ))
            }
            None => {
                let mut secret = vec![0u8; 32];
                getrandom::fill(&mut secret)
                    .map_err(|_| ConfigError::InvalidValue("session secret (no randomness)"))?;
                secret
            }
        };
        let clock = self.clock;
        let shared = Arc::new(Shared {
            store: self.store,
            template: self.template,
            format: self.format,
            client_ip: self.client_ip,
            ids: EventIds::new(&secret),
            signer: Signer::new(secret),
            logins: Logins::new(self.user_quota, self.ip_quota, Arc::clone(&clock)),
            clock: Arc::clone(&clock),
            openapi: openapi_document(self.api_paths),
            oauth_body_credentials: self.oauth_body_credentials,
            oauth_quotas: self.oauth_quotas,
            oauth_issue: crate::ratelimit::MemoryLimiter::builder()
                .clock(Arc::clone(&clock))
                .max_buckets(login::MAX_BUCKETS)
                .build()
                .unwrap_or_default(),
            oauth_issue_quota: self.oauth_issue_quota,
            scanners,
        });
        let router = Router::new()
            .route("/auth/createkey", post(createkey::<S>))
            .route("/auth/session", post(start_session::<S>))
            .route("/v1/keys", get(list::<S>).post(create::<S>))
            .route(
                "/v1/keys/{id}",
                get(show::<S>).patch(patch::<S>).delete(delete::<S>),
            )
            .route("/v1/keys/{id}/disable", post(disable::<S>))
            .route("/v1/keys/{id}/enable", post(enable::<S>))
            .route("/v1/keys/{id}/rotate", post(rotate::<S>))
            .route("/v1/keys/revoke", post(leaked::revoke_by_key::<S>))
            .route("/v1/keys/leaked", post(leaked::leaked::<S>))
            .route(
                "/v1/clients",
                get(clients::list::<S>).post(clients::create::<S>),
            )
            .route(
                "/v1/clients/{id}",
                axum::routing::delete(clients::revoke::<S>),
            )
            .route("/oauth/token", post(oauth::token::<S>))
            .route("/oauth/revoke", post(oauth::revoke::<S>))
            .route("/oauth/introspect", post(oauth::introspect::<S>))
            .route("/v1/audit", get(audit::<S>))
            .route("/dashboard", get(dashboard))
            .route("/swagger/openapi.json", get(openapi::<S>))
            .with_state(shared);
        let router = match self.testkey {
            Some(testkey) => router.merge(testkey),
            None => router,
        };
        // A known path with another method: 405 in the envelope (axum adds `Allow`). Unknown
        // paths are left to the application's own fallback.
        Ok(router.method_not_allowed_fallback(|| async {
            Fail::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "This path does not take this method; `Allow` lists those it takes.",
            )
        }))
    }
}

/// What every handler shares.
struct Shared<S> {
    store: S,
    template: NewKey,
    format: KeyFormat,
    client_ip: ClientIp,
    signer: Signer,
    ids: EventIds,
    logins: Logins,
    clock: Arc<dyn Clock>,
    openapi: Value,
    oauth_body_credentials: bool,
    oauth_quotas: Vec<Quota>,
    oauth_issue: crate::ratelimit::MemoryLimiter<String>,
    oauth_issue_quota: Quota,
    scanners: leaked::Scanners,
}

type St<S> = State<Arc<Shared<S>>>;

/// The client's address, as the resolver knows it.
#[derive(Debug, Clone, Copy)]
struct Client(Option<IpAddr>);

impl<S: Send + Sync + 'static> FromRequestParts<Arc<Shared<S>>> for Client {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared<S>>,
    ) -> Result<Self, Infallible> {
        let head = RequestHead {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        };
        Ok(Self(shared.client_ip.resolve(&head)))
    }
}

/// The `{id}` of a key's path. One that cannot be read (not UTF-8) names no key: 404,
/// like any unknown id, in the service's envelope.
struct KeyPath(String);

impl<St: Send + Sync> FromRequestParts<St> for KeyPath {
    type Rejection = Fail;

    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, Fail> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Self(id))
            .map_err(|_| Fail::not_found())
    }
}

/// A signed-in owner (a valid, unexpired session whose owner is active), and the store
/// acting for them.
struct Session<S> {
    owner: Owner,
    store: S,
}

impl<S: ClientStore + Send + Sync + 'static> FromRequestParts<Arc<Shared<S>>> for Session<S> {
    type Rejection = Fail;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared<S>>) -> Result<Self, Fail> {
        let Client(ip) = Client::from_request_parts(parts, shared)
            .await
            .unwrap_or(Client(None));
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(Fail::unauthorized)?;
        let (name, credentials) = shared
            .signer
            .verify(token, shared.clock.now())
            .ok_or_else(Fail::unauthorized)?;
        // The owner as it stands now: active, and with the credentials the session was
        // granted on (a new password or a disabling since ends it).
        let owner = match shared.store.standing(&name).await {
            Ok(standing) if standing.owner.active && standing.credentials == credentials => {
                standing.owner
            }
            Ok(_) | Err(crate::store::StoreError::OwnerNotFound(_)) => {
                return Err(Fail::unauthorized())
            }
            Err(other) => return Err(other.into()),
        };
        let store = shared
            .store
            .acting(Actor::new(owner.name.clone()).with_ip(ip));
        Ok(Self { owner, store })
    }
}

impl<S: KeyStore> Session<S> {
    /// The key `id` if it is this owner's and not deleted; 404 otherwise, the same for an
    /// id that does not exist, one that is not well formed, a deleted key and another
    /// owner's.
    async fn key(&self, id: &str) -> Result<KeyRecord, Fail> {
        let record = self.key_kept(id).await?;
        // Deleted keys are gone; OAuth2 access tokens are managed through their client.
        if record.status == Status::Deleted || record.use_case == oauth::TOKEN_USE_CASE {
            return Err(Fail::not_found());
        }
        Ok(record)
    }

    /// The key `id` if it is this owner's, deleted or not (its audit trail stays readable).
    async fn key_kept(&self, id: &str) -> Result<KeyRecord, Fail> {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Fail::not_found());
        }
        let record = self.store.get(&KeyId::new(id)).await?;
        let mine = record
            .owner
            .as_ref()
            .is_some_and(|owner| owner.id == self.owner.id);
        if !mine {
            return Err(Fail::not_found());
        }
        Ok(record)
    }
}

/// The `limit` of a page: 50 unless given, 1 to 100.
fn page_limit(asked: Option<usize>) -> Result<usize, Fail> {
    match asked {
        None => Ok(50),
        Some(n @ 1..=100) => Ok(n),
        Some(_) => Err(Fail::field("limit", "1 to 100")),
    }
}

/// A JSON response that must not be cached (it may hold a secret).
fn private(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Checks a username and password against the sign-in limits and the store: the owner,
/// and the credentials version read *before* the password was checked (so that a session
/// granted on a password changed meanwhile is void from the start).
async fn sign_in<S: ClientStore>(
    shared: &Shared<S>,
    ip: Option<IpAddr>,
    credentials: &Credentials,
) -> Result<(Owner, u64), Fail> {
    if credentials.username.len() > MAX_USERNAME {
        return Err(Fail::field(
            "username",
            format!("at most {MAX_USERNAME} bytes"),
        ));
    }
    if credentials.password.len() > MAX_CREDENTIAL {
        return Err(Fail::field(
            "password",
            format!("at most {MAX_CREDENTIAL} bytes"),
        ));
    }
    let attempt = shared
        .logins
        .begin(&credentials.username, ip)
        .map_err(Fail::too_many)?;
    // An unknown name reads as version 0 here and fails the check below like any other.
    let version = match shared.store.standing(&credentials.username).await {
        Ok(standing) => standing.credentials,
        Err(crate::store::StoreError::OwnerNotFound(_)) => 0,
        Err(other) => {
            shared.logins.void(attempt);
            return Err(other.into());
        }
    };
    match shared
        .store
        .verify_owner(&credentials.username, &credentials.password)
        .await
    {
        Ok(owner) => {
            shared.logins.succeeded(attempt);
            Ok((owner, version))
        }
        Err(crate::store::StoreError::InvalidCredentials) => Err(Fail::credentials()),
        Err(other) => {
            // Not the caller's fault: the attempt does not count.
            shared.logins.void(attempt);
            Err(other.into())
        }
    }
}

async fn createkey<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    Client(ip): Client,
    Json(credentials): Json<Credentials>,
) -> Result<Response, Fail> {
    let (owner, _) = sign_in(&shared, ip, &credentials).await?;
    let mut new = shared.template.clone();
    new.owner = owner.name.clone();
    let created = shared
        .store
        .acting(Actor::new(owner.name).with_ip(ip))
        .replace_keys(new)
        .await?;
    Ok(private(
        StatusCode::OK,
        &NewApiKey {
            api_key: created.secret.expose_secret(),
            key_id: created.record.id.as_str(),
        },
    ))
}

async fn start_session<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    Client(ip): Client,
    Json(credentials): Json<Credentials>,
) -> Result<Response, Fail> {
    let (owner, credentials) = sign_in(&shared, ip, &credentials).await?;
    let expires = session::expiry(shared.clock.now(), SESSION_TTL);
    let token = shared.signer.issue(&owner.name, credentials, expires);
    Ok(private(
        StatusCode::OK,
        &SessionView {
            token: token.as_str(),
            expires_in: SESSION_TTL.as_secs(),
            owner: &owner.name,
        },
    ))
}

/// `GET /auth/testkey` behind the layers: the key's view, handed to
/// [`rate_limit_into_body`] (outside the layers) to be written with its budget.
async fn testkey(principal: Principal) -> Response {
    let mut response = StatusCode::OK.into_response();
    response
        .extensions_mut()
        .insert(TestKeyView::of(principal.record()));
    response
}

/// Writes a `testkey` answer: the key's view with the rate-limit numbers the layer put in
/// the headers. Refusals (no view) pass as the layers made them.
async fn rate_limit_into_body(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let Some(mut view) = parts.extensions.remove::<TestKeyView>() else {
        return Response::from_parts(parts, body);
    };
    let number = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let (Some(limit), Some(remaining), Some(reset)) = (
        number("x-ratelimit-limit"),
        number("x-ratelimit-remaining"),
        number("x-ratelimit-reset"),
    ) {
        view.rate_limit = Some(RateLimitView {
            limit,
            remaining,
            reset,
        });
    }
    let mut response = private(StatusCode::OK, &view);
    for (name, value) in &parts.headers {
        if name.as_str().starts_with("x-ratelimit") || name.as_str().starts_with("ratelimit") {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}

async fn list<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    session: Session<S>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Fail> {
    let Query(query) = query.map_err(|e| Fail::field("query", e.body_text()))?;
    let limit = page_limit(query.limit)?;
    let after = query
        .after
        .filter(|a| !a.is_empty())
        .map(|a| KeyId::new(a.as_str()));
    // Deleted keys and access tokens are not shown: read on past them until the page is
    // full (a bounded number of store pages), so that a client minting tokens cannot push
    // the owner's keys behind empty pages.
    let mut keys: Vec<KeyView> = Vec::new();
    let mut cursor = after;
    let mut next = None;
    for _ in 0..LIST_SCANS {
        let page = session
            .store
            .list(
                &session.owner.name,
                Page {
                    after: cursor.clone(),
                    limit,
                },
            )
            .await?;
        let mut read = 0;
        for record in &page {
            if keys.len() == limit {
                break;
            }
            read += 1;
            cursor = Some(record.id.clone());
            if record.status != Status::Deleted && record.use_case != oauth::TOKEN_USE_CASE {
                keys.push(KeyView::of(record, &shared.format));
            }
        }
        // More to read: the store's page was full, or this page stopped inside it.
        let more = page.len() == limit || read < page.len();
        next = more
            .then(|| cursor.as_ref().map(|id| id.as_str().to_owned()))
            .flatten();
        if keys.len() == limit || !more {
            break;
        }
    }
    Ok(private(StatusCode::OK, &KeyPage { keys, next }))
}

async fn create<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    session: Session<S>,
    Json(body): Json<Create>,
) -> Result<Response, Fail> {
    let new = body.into_new_key(&session.owner.name, shared.clock.now())?;
    let created = session.store.create(new).await?;
    Ok(private(
        StatusCode::CREATED,
        &Created::of(&created, &shared.format),
    ))
}

async fn show<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    session: Session<S>,
    KeyPath(id): KeyPath,
) -> Result<Response, Fail> {
    let record = session.key(&id).await?;
    Ok(private(
        StatusCode::OK,
        &KeyView::of(&record, &shared.format),
    ))
}

async fn patch<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    session: Session<S>,
    KeyPath(id): KeyPath,
    Json(body): Json<Patch>,
) -> Result<Response, Fail> {
    let record = session.key(&id).await?;
    if record.status == Status::Revoked {
        // As disable, enable and rotate: a revoked key is over.
        return Err(crate::store::StoreError::InvalidState(
            "revoked",
            "a revoked key cannot be changed",
        )
        .into());
    }
    if body.is_empty() {
        // Nothing to change: nothing written, nothing in the audit trail.
        return Ok(private(
            StatusCode::OK,
            &KeyView::of(&record, &shared.format),
        ));
    }
    let update = body.into_update(&record)?;
    let record = session.store.update(&record.id, update).await?;
    Ok(private(
        StatusCode::OK,
        &KeyView::of(&record, &shared.format),
    ))
}

async fn set_status<S: ClientStore + Send + Sync + 'static>(
    shared: &Shared<S>,
    session: &Session<S>,
    id: &str,
    status: Status,
) -> Result<Response, Fail> {
    let record = session.key(id).await?;
    let record = session.store.set_status(&record.id, status).await?;
    Ok(private(
        StatusCode::OK,
        &KeyView::of(&record, &shared.format),
    ))
}

async fn disable<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    session: Session<S>,
    KeyPath(id): KeyPath,
) -> Result<Response, Fail> {
    set_status(&shared, &session, &id, Status::Disabled).await
}

async fn enable<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    session: Session<S>,
    KeyPath(id): KeyPath,
) -> Result<Response, Fail> {
    set_status(&shared, &session, &id, Status::Active).await
}

async fn delete<S: ClientStore + Send + Sync + 'static>(
    session: Session<S>,
    KeyPath(id): KeyPath,
) -> Result<StatusCode, Fail> {
    let record = session.key(&id).await?;
    session
        .store
        .set_status(&record.id, Status::Deleted)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    session: Session<S>,
    KeyPath(id): KeyPath,
    Json(body): Json<Rotate>,
) -> Result<Response, Fail> {
    let grace = body.grace()?;
    let record = session.key(&id).await?;
    let created = session
        .store
        .rotate(&record.id, grace, Some(record.version))
        .await?;
    Ok(private(
        StatusCode::OK,
        &Created::of(&created, &shared.format),
    ))
}

async fn audit<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    session: Session<S>,
    query: Result<Query<AuditQueryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Fail> {
    let Query(query) = query.map_err(|e| Fail::field("query", e.body_text()))?;
    let limit = page_limit(query.limit)?;
    let key = match query.key.filter(|k| !k.is_empty()) {
        // Only the owner's own keys: another's id reads as unknown.
        Some(id) => Some(session.key_kept(&id).await?.id),
        None => None,
    };
    let mut filter = AuditQuery::default()
        .with_owner(session.owner.name.clone())
        .with_limit(limit);
    if let Some(key) = key {
        filter = filter.with_key(key);
    }
    if let Some(before) = query.before {
        let before = shared
            .ids
            .read(&before)
            .ok_or_else(|| Fail::field("before", "the `next` of an earlier page"))?;
        filter = filter.with_before(before);
    }
    let events = session.store.audit(filter).await?;
    let next = (events.len() == limit)
        .then(|| events.last().map(|e| shared.ids.show(e.id)))
        .flatten();
    let events: Vec<AuditView> = events
        .iter()
        .map(|e| AuditView::of(e, &shared.ids))
        .collect();
    Ok(private(StatusCode::OK, &AuditPage { events, next }))
}

/// The dashboard: one page, its inline script allowed by its hash and nothing else loaded.
async fn dashboard() -> Response {
    static PAGE: &str = include_str!("dashboard.html");
    static POLICY: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
    let policy = POLICY.get_or_init(|| content_security_policy(PAGE));
    let mut response = Html(PAGE).into_response();
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(http::header::CONTENT_SECURITY_POLICY, policy.clone());
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// A policy that runs the page's own inline scripts (by their SHA-256) and nothing else:
/// no other script, no inline event handler, no other origin; requests to this origin
/// only; no framing, no form posted anywhere.
fn content_security_policy(page: &str) -> HeaderValue {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut scripts = String::new();
    let mut rest = page;
    while let Some(start) = rest.find("<script>") {
        let body = &rest[start + "<script>".len()..];
        let Some(end) = body.find("</script>") else {
            break;
        };
        let digest = sha2::Sha256::digest(&body.as_bytes()[..end]);
        scripts.push_str(" 'sha256-");
        scripts.push_str(&base64::engine::general_purpose::STANDARD.encode(digest));
        scripts.push('\'');
        rest = &body[end..];
    }
    let policy = format!(
        "default-src 'none'; script-src{scripts}; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    HeaderValue::from_str(&policy)
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
}

async fn openapi<S: Send + Sync + 'static>(State(shared): St<S>) -> Response {
    axum::Json(&shared.openapi).into_response()
}

/// The service's OpenAPI document, with the API's own paths added.
fn openapi_document(api_paths: Option<Value>) -> Value {
    let mut document: Value =
        serde_json::from_str(include_str!("openapi.json")).unwrap_or_else(|_| json!({}));
    if let (Some(Value::Object(extra)), Some(Value::Object(paths))) =
        (api_paths, document.get_mut("paths"))
    {
        for (path, item) in extra {
            paths.entry(path).or_insert(item);
        }
    }
    document
}
