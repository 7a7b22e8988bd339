//! OAuth2 for machine clients: `POST /oauth/token` (RFC 6749 §4.4, client credentials),
//! `POST /oauth/revoke` (RFC 7009) and `POST /oauth/introspect` (RFC 7662).
//!
//! An access token is a keygate key: made by the store with the granted scopes, an hour's
//! life, and its client as its rate-limit bucket, so the layers accept it as `Authorization:
//! Bearer` like any key (refused as `api_key_expired` once expired), every token of one
//! client shares one budget, and revoking it reaches every instance as a disabled key does.
//! Only its hash is stored.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Serialize;

use super::fail::{read_body, MAX_BODY};
use super::{Client, St};
use crate::key::{Environment, KeyId, PresentedKey};
use crate::record::{KeyRecord, Status};
use crate::store::{Actor, ClientStore, NewKey, OAuthClient, StoreError};

/// How long an access token lives.
pub(crate) const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The use case of the keys that are access tokens (hidden from the owner's key list).
pub(crate) use crate::store::TOKEN_USE_CASE;
/// How long after its expiry a token is removed, at the client's next token request.
const PURGE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// At most this many expired tokens removed per token request.
const PURGE_LIMIT: usize = 100;

/// An error of RFC 6749 §5.2 (and RFC 7009 / 7662, which use the same shape).
#[derive(Debug)]
pub(crate) struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: Cow<'static, str>,
    /// Whether to ask for HTTP Basic (`WWW-Authenticate`), on a 401.
    challenge: bool,
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
}

impl OAuthError {
    fn new(
        status: StatusCode,
        error: &'static str,
        description: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            challenge: false,
            retry_after: None,
        }
    }

    fn invalid_request(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// The client could not be authenticated: 401 with a Basic challenge.
    fn invalid_client() -> Self {
        let mut error = Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed.",
        );
        error.challenge = true;
        error
    }

    fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "The authorization server is unavailable; try again.",
        )
    }
}

impl From<StoreError> for OAuthError {
    fn from(error: StoreError) -> Self {
        match error {
            // A client revoked while its token was being made is no client any more.
            StoreError::InvalidCredentials
            | StoreError::ClientNotFound(_)
            | StoreError::InvalidState(..) => Self::invalid_client(),
            other => {
                tracing::error!(target: "keygate", error = %other, "oauth: store failed");
                Self::unavailable()
            }
        }
    }
}

/// No-store on every answer of these endpoints (RFC 6749 §5.1: they carry tokens).
fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorBody {
            error: self.error,
            error_description: &self.description,
        })
        .unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.challenge && self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"keygate\", charset=\"UTF-8\""),
            );
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        no_store(response)
    }
}

/// A form body (`application/x-www-form-urlencoded`, at most 16 KiB), with its parameters
/// (RFC 6749 §3.2: a parameter sent twice is refused, an empty one counts as absent), and the
/// request's headers for client authentication.
pub(crate) struct Form {
    params: HashMap<String, String>,
    headers: HeaderMap,
}

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = OAuthError;

    async fn from_request(req: Request, _: &S) -> Result<Self, OAuthError> {
        let (parts, body) = req.into_parts();
        let form = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !form {
            return Err(OAuthError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request",
                "Send the parameters as application/x-www-form-urlencoded.",
            ));
        }
        let bytes = read_body(Body::new(body)).await.map_err(|_| {
            OAuthError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                format!("The body must be at most {MAX_BODY} bytes."),
            )
        })?;
        let mut params = HashMap::new();
        for (name, value) in form_urlencoded::parse(&bytes) {
            if value.is_empty() {
                continue;
            }
            if params
                .insert(name.to_string(), value.into_owned())
                .is_some()
            {
                return Err(OAuthError::invalid_request(format!(
                    "The parameter `{}` is given twice.",
                    name.chars().take(64).collect::<String>().escape_default()
                )));
            }
        }
        Ok(Self {
            params,
            headers: parts.headers,
        })
    }
}

impl Form {
    fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// The client's credentials, from HTTP Basic (RFC 6749 §2.3.1: each part form-urlencoded
/// before base64) or, if allowed, from the body; never both.
fn credentials(form: &Form, body_allowed: bool) -> Result<(String, String, bool), OAuthError> {
    if form.headers.get_all(AUTHORIZATION).iter().nth(1).is_some() {
        return Err(OAuthError::invalid_request(
            "Send one Authorization header, not several.",
        ));
    }
    let basic = form.headers.get(AUTHORIZATION).map(|value| {
        let text = value.to_str().ok()?;
        let (scheme, encoded) = text.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        let unescape = |s: &str| -> String {
            form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        Some((unescape(id), unescape(secret)))
    });
    let in_body = form.get("client_id").is_some() || form.get("client_secret").is_some();
    match basic {
        Some(_) if in_body => Err(OAuthError::invalid_request(
            "Authenticate the client one way: HTTP Basic or the body, not both.",
        )),
        Some(Some((id, secret))) => Ok((id, secret, true)),
        // An Authorization header that is not readable Basic.
        Some(None) => Err(OAuthError::invalid_client()),
        None if in_body && body_allowed => match (form.get("client_id"), form.get("client_secret"))
        {
            (Some(id), Some(secret)) => Ok((id.to_owned(), secret.to_owned(), false)),
            _ => Err(OAuthError::invalid_client()),
        },
        None => Err(OAuthError::invalid_client()),
    }
}

/// Authenticates the client, within the sign-in limits (per client id and per address).
async fn authenticate<S: ClientStore + Send + Sync + 'static>(
    shared: &super::Shared<S>,
    ip: Option<IpAddr>,
    form: &Form,
) -> Result<OAuthClient, OAuthError> {
    let (id, secret, basic) = credentials(form, shared.oauth_body_credentials)?;
    let answer = |mut error: OAuthError| {
        // RFC 6749 §5.2: a challenge when the client tried Basic; a client that tried the
        // body gets the 401 without one.
        error.challenge = basic;
        error
    };
    if id.len() > 256 || secret.len() > 256 {
        return Err(answer(OAuthError::invalid_client()));
    }
    // Client ids have their own budgets, apart from usernames (which cannot hold a NUL).
    let attempt = shared
        .logins
        .begin(&format!("\0client:{id}"), ip)
        .map_err(|retry| {
            let mut error = OAuthError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "invalid_client",
                "Too many failed client authentications; retry later.",
            );
            error.retry_after = Some(retry);
            error
        })?;
    match shared.store.verify_client(&id, &secret).await {
        Ok(client) => {
            shared.logins.succeeded(attempt);
            Ok(client)
        }
        Err(StoreError::InvalidCredentials | StoreError::ClientNotFound(_)) => {
            Err(answer(OAuthError::invalid_client()))
        }
        Err(other) => {
            shared.logins.void(attempt);
            Err(other.into())
        }
    }
}

#[derive(Serialize)]
struct TokenBody<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: u64,
    scope: String,
}

/// `POST /oauth/token`.
pub(crate) async fn token<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    Client(ip): Client,
    form: Form,
) -> Result<Response, OAuthError> {
    let client = authenticate(&shared, ip, &form).await?;
    match form.get("grant_type") {
        None => return Err(OAuthError::invalid_request("`grant_type` is required.")),
        Some("client_credentials") => {}
        Some(_) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Only the client_credentials grant is supported.",
            ))
        }
    }
    if client.scopes.is_empty() {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "This client has no scope to grant.",
        ));
    }
    // The scopes asked for (all the client's when none), each one of the client's.
    let granted: Vec<String> = match form.get("scope") {
        None => client.scopes.iter().map(str::to_owned).collect(),
        Some(asked) => {
            let mut granted: Vec<String> = Vec::new();
            for scope in asked.split(' ').filter(|s| !s.is_empty()) {
                if !client.scopes.contains(scope) {
                    return Err(OAuthError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_scope",
                        "A requested scope is not one this client may ask for.",
                    ));
                }
                if !granted.iter().any(|g| g == scope) {
                    granted.push(scope.to_owned());
                }
            }
            granted
        }
    };
    // Each token is a stored key: a client mints a bounded number (its budget refills).
    match shared.oauth_issue.decide(
        &client.id,
        std::slice::from_ref(&shared.oauth_issue_quota),
        1,
    ) {
        Ok(decision) if decision.allowed => {}
        Ok(decision) => {
            let mut error = OAuthError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "slow_down",
                "This client asked for too many tokens; reuse the one it has until it expires.",
            );
            error.retry_after = Some(decision.numbers.retry_after.max(1));
            return Err(error);
        }
        Err(_) => return Err(OAuthError::unavailable()),
    }
    let now = shared.clock.now();
    let mut new = NewKey::new(
        client.owner.clone(),
        format!("OAuth2 token of {}", client.name),
        Environment::Live,
    );
    new.use_case = TOKEN_USE_CASE.to_owned();
    new.scopes = granted.iter().map(String::as_str).collect();
    new.expires_at = Some(now + TOKEN_TTL);
    new.quotas = shared.oauth_quotas.clone();
    new.rate_bucket = Some(KeyId::new(client.id.as_str()));
    new.metadata = serde_json::json!({ "client_id": client.id });
    let created = shared
        .store
        .acting(Actor::new(format!("oauth2:{}", client.id)).with_ip(ip))
        .create(new)
        .await?;
    // The client's tokens that expired over a day ago are of no more use: each token
    // request removes a few, so that the keys table does not grow by one row per token
    // forever. A purge that fails is tried again at the next request; the token stands.
    let before = now
        .checked_sub(PURGE_AFTER)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if let Err(error) = shared
        .store
        .purge_expired_tokens(&client.id, before, PURGE_LIMIT)
        .await
    {
        tracing::debug!(%error, client = %client.id, "purging expired OAuth2 tokens failed");
    }
    let body = TokenBody {
        access_token: created.secret.expose_secret(),
        token_type: "bearer",
        expires_in: TOKEN_TTL.as_secs(),
        scope: granted.join(" "),
    };
    Ok(no_store(axum::Json(body).into_response()))
}

/// The token named by the form, if it is one issued to `client`.
async fn issued_to<S: ClientStore>(
    store: &S,
    client: &OAuthClient,
    form: &Form,
) -> Result<Option<KeyRecord>, OAuthError> {
    let Some(token) = form.get("token") else {
        return Err(OAuthError::invalid_request("`token` is required."));
    };
    if token.len() > 256 {
        return Ok(None);
    }
    let found = store.lookup(&PresentedKey::new(token)).await.map_err(|e| {
        let e: crate::error::BoxError = e.into();
        tracing::error!(target: "keygate", error = %e, "oauth: lookup failed");
        OAuthError::unavailable()
    })?;
    Ok(found
        .filter(|record| {
            record.use_case == TOKEN_USE_CASE
                && record.rate_bucket.as_ref().map(KeyId::as_str) == Some(client.id.as_str())
        })
        .map(|record| (*record).clone()))
}

/// `POST /oauth/revoke` (RFC 7009): 200 whether or not the token existed.
pub(crate) async fn revoke<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    Client(ip): Client,
    form: Form,
) -> Result<Response, OAuthError> {
    let client = authenticate(&shared, ip, &form).await?;
    if let Some(record) = issued_to(&shared.store, &client, &form).await? {
        if record.status == Status::Active || record.status == Status::Disabled {
            let store = shared
                .store
                .acting(Actor::new(format!("oauth2:{}", client.id)).with_ip(ip));
            match store.set_status(&record.id, Status::Revoked).await {
                Ok(_) | Err(StoreError::InvalidState(..)) | Err(StoreError::KeyNotFound(_)) => {}
                Err(other) => return Err(other.into()),
            }
        }
    }
    Ok(no_store(StatusCode::OK.into_response()))
}

#[derive(Serialize)]
struct Introspection {
    active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

fn unix(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST /oauth/introspect` (RFC 7662): only `{"active": false}` for anything not active,
/// or not issued to the asking client.
pub(crate) async fn introspect<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    Client(ip): Client,
    form: Form,
) -> Result<Response, OAuthError> {
    let client = authenticate(&shared, ip, &form).await?;
    let now = shared.clock.now();
    let answer = match issued_to(&shared.store, &client, &form).await? {
        Some(record) if record.usable_at(now) => Introspection {
            active: true,
            scope: Some(record.scopes.iter().collect::<Vec<_>>().join(" ")),
            client_id: Some(client.id.clone()),
            token_type: Some("bearer"),
            exp: record.expires_at.map(unix),
            iat: record.created_at.map(unix),
        },
        _ => Introspection {
            active: false,
            scope: None,
            client_id: None,
            token_type: None,
            exp: None,
            iat: None,
        },
    };
    Ok(no_store(axum::Json(answer).into_response()))
}
