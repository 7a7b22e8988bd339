//! The service's refusals: one type, rendered as keygate's envelope
//! (`{"code","message","data"}`, keys in that order), and the JSON bodies it reads.

use std::borrow::Cow;

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::store::StoreError;

/// The largest request body the service reads.
pub(crate) const MAX_BODY: usize = 16 * 1024;

/// A refusal: status, code, a sentence, and data.
#[derive(Debug)]
pub(crate) struct Fail {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
    data: Value,
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    code: &'a str,
    message: &'a str,
    data: &'a Value,
}

impl Fail {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            data: Value::Null,
            retry_after: None,
        }
    }

    /// 422: a field that cannot be taken, named in `data.field`.
    pub(crate) fn field(field: impl Into<String>, message: impl Into<Cow<'static, str>>) -> Self {
        let field = field.into();
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
            .with_data(serde_json::json!({ "field": field }))
    }

    /// 422: a field fixed when the key was made.
    pub(crate) fn immutable(field: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "immutable_field",
            format!("{field} is fixed when the key is created and cannot be changed"),
        )
        .with_data(serde_json::json!({ "field": field }))
    }

    /// 404, the same for an unknown id and for another owner's key.
    pub(crate) fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "No such key.")
    }

    /// 401 for a management call without a valid session.
    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Sign in with POST /auth/session and send the token as `Authorization: Bearer`.",
        )
    }

    /// 401 for a wrong username or password (which one is never said).
    pub(crate) fn credentials() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "The username or password is wrong.",
        )
    }

    /// 429 after too many failed sign-ins.
    pub(crate) fn too_many(retry_after: u64) -> Self {
        let mut fail = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_failed_attempts",
            "Too many failed attempts from here; try again later.",
        )
        .with_data(serde_json::json!({ "retry_after": retry_after }));
        fail.retry_after = Some(retry_after);
        fail
    }

    /// 503: the store failed. What failed is logged, not told.
    pub(crate) fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "auth_unavailable",
            "The key service is unavailable; try again.",
        )
    }

    pub(crate) fn with_data(mut self, data: Value) -> Self {
        self.data = data;
        self
    }
}

impl From<StoreError> for Fail {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::KeyNotFound(_) => Self::not_found(),
            StoreError::ClientNotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", "No such client.")
            }
            // A deleted key is gone as far as its owner's API is concerned.
            StoreError::InvalidState("deleted", _) => Self::not_found(),
            StoreError::InvalidState(state, reason) => {
                Self::new(StatusCode::CONFLICT, "invalid_state", reason)
                    .with_data(serde_json::json!({ "status": state }))
            }
            StoreError::Conflict => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "The key was changed at the same time; read it again and retry.",
            ),
            StoreError::Immutable(field) => Self::immutable(&field.replace(' ', "_")),
            StoreError::Invalid { field, reason } => Self::field(
                field.replace(' ', "_"),
                format!("invalid {field}: {reason}"),
            ),
            StoreError::InvalidCredentials => Self::credentials(),
            // The session's owner is gone: sign in again.
            StoreError::OwnerNotFound(_) => Self::unauthorized(),
            StoreError::OwnerExists(_) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "An owner with this name exists already.",
            ),
            other => {
                tracing::error!(target: "keygate", error = %other, "key service: store failed");
                Self::unavailable()
            }
        }
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&Envelope {
            code: self.code,
            message: &self.message,
            data: &self.data,
        })
        .unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::UNAUTHORIZED && self.code == "unauthorized" {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keygate\""),
            );
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A JSON request body the service understands: its fields, and those that must never be
/// sent (fixed at creation).
pub(crate) trait Input: DeserializeOwned {
    /// Every field the body may have.
    const FIELDS: &'static [&'static str];
    /// Fields refused with `immutable_field`.
    const IMMUTABLE: &'static [&'static str] = &[];
    /// Whether an empty body (no content type, no bytes) reads as `{}`.
    const MAY_BE_EMPTY: bool = false;
}

/// A JSON body: `application/json`, at most [`MAX_BODY`] bytes, an object whose every field
/// is known and well-typed. Anything else is refused before a handler runs: 415, 413, 400
/// (not JSON), or 422 naming the field.
#[derive(Debug)]
pub(crate) struct Json<T>(pub(crate) T);

impl<T: Input, St: Send + Sync> FromRequest<St> for Json<T> {
    type Rejection = Fail;

    async fn from_request(req: Request, _: &St) -> Result<Self, Fail> {
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(too_large());
        }
        let content_type = parts.headers.get(CONTENT_TYPE);
        let bytes = read_body(body).await?;
        if content_type.is_none() && bytes.is_empty() && T::MAY_BE_EMPTY {
            return parse::<T>(Value::Object(serde_json::Map::new())).map(Self);
        }
        if !content_type.is_some_and(is_json) {
            return Err(Fail::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Send the body as `Content-Type: application/json`.",
            ));
        }
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Fail::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!(
                    "The body is not valid JSON (line {}, column {}).",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        if let Some(repeated) = repeated_key(&bytes) {
            return Err(Fail::field(
                repeated.chars().take(64).collect::<String>(),
                "This field is given twice; send each field once.",
            ));
        }
        parse::<T>(value).map(Self)
    }
}

/// The first key the body's top-level object repeats, as serde reads it (escapes decoded:
/// `"environm\u0065nt"` is `environment`). serde_json keeps the last of two, while a proxy
/// in front may read the first: one request must not mean two things.
fn repeated_key(bytes: &[u8]) -> Option<String> {
    struct Keys(Option<String>);
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Keys;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut first = None;
            // Read to the end: the parser checks the object is whole once the visitor is done.
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if let Some(again) = seen.replace(key) {
                    first.get_or_insert(again);
                }
            }
            Ok(Keys(first))
        }
    }
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(Visit)
        }
    }
    serde_json::from_slice::<Keys>(bytes).ok().and_then(|k| k.0)
}

fn too_large() -> Fail {
    Fail::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("The body is larger than {MAX_BODY} bytes."),
    )
}

/// The body's bytes, refused past [`MAX_BODY`] whatever the headers said.
pub(crate) async fn read_body(body: Body) -> Result<bytes::Bytes, Fail> {
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(Fail::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "The body could not be read.",
        )),
    }
}

/// `application/json`, any case, with or without parameters (`; charset=utf-8`).
fn is_json(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// A JSON value as `T`: an object, with no unknown or immutable field, every field typed.
pub(crate) fn parse<T: Input>(value: Value) -> Result<T, Fail> {
    let Value::Object(map) = &value else {
        return Err(Fail::field("", "The body must be a JSON object."));
    };
    for name in map.keys() {
        if let Some(fixed) = T::IMMUTABLE.iter().find(|f| **f == name) {
            return Err(Fail::immutable(fixed));
        }
        if map.get(name).is_some_and(Value::is_null) && T::FIELDS.contains(&name.as_str()) {
            return Err(Fail::field(
                name.clone(),
                format!("`{name}` must not be null: leave it out to keep the value as it is."),
            ));
        }
        if !T::FIELDS.contains(&name.as_str()) {
            let shown: String = name.chars().take(64).collect();
            return Err(Fail::field(
                shown.clone(),
                format!(
                    "Unknown field `{}`; expected one of: {}.",
                    shown.escape_default(),
                    T::FIELDS.join(", ")
                ),
            ));
        }
    }
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let message = e.inner().to_string();
        // A missing field is an error of the object around it: name the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_owned());
        let field = match (missing, e.path().to_string()) {
            (Some(name), path) if path == "." => name,
            (Some(name), path) => format!("{path}.{name}"),
            (None, path) => path,
        };
        // serde's sentence says what was expected; the value sent is not repeated back.
        let reason = e.inner().to_string();
        let reason = match reason.rsplit_once("expected ") {
            Some((_, expected)) => format!("expected {expected}"),
            None => reason,
        };
        Fail::field(field.clone(), format!("{field}: {reason}"))
    })
}

#[cfg(test)]
mod tests {
    use super::repeated_key;

    #[test]
    fn a_repeated_top_level_key_is_found() {
        assert_eq!(repeated_key(br#"{"a":1,"b":2}"#), None);
        assert_eq!(repeated_key(br#"{"a":1,"a":2}"#).as_deref(), Some("a"));
        assert_eq!(
            repeated_key(br#"{"username":"nobody","username":"ada","password":"x y"}"#).as_deref(),
            Some("username")
        );
        assert_eq!(
            repeated_key(br#"{"environment":"live","environm\u0065nt":"test"}"#).as_deref(),
            Some("environment")
        );
        // Nested objects are values, not the body's fields.
        assert_eq!(repeated_key(br#"{"a":{"x":1,"x":2}}"#), None);
    }
}
