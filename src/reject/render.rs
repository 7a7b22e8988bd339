use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response};

#[cfg(test)]
use super::Reason;
use super::Rejection;

/// Turns a [`Rejection`] into a response body and headers.
///
/// The auth layer adds `Cache-Control: no-store`, `WWW-Authenticate` and the rate-limit
/// headers itself, and answers gRPC requests with a gRPC status whatever the renderer, so a
/// renderer only decides the HTTP body and its content type. The status it returns is kept;
/// returning [`Rejection::status`] is the sensible default.
///
/// A struct:
///
/// ```
/// use bytes::Bytes;
/// use http::Response;
/// use keygate::reject::{Rejection, Renderer};
///
/// struct PlainText;
///
/// impl Renderer for PlainText {
///     fn render(&self, rejection: &Rejection) -> Response<Bytes> {
///         let mut res = Response::new(Bytes::from_static(rejection.message().as_bytes()));
///         *res.status_mut() = rejection.status();
///         res
///     }
/// }
/// ```
///
/// or a closure, here the Mobivate shape `{"code":401,"message":"…"}`:
///
/// ```
/// use bytes::Bytes;
/// use http::Response;
/// use keygate::reject::{Rejection, Renderer};
///
/// let renderer = |rejection: &Rejection| {
///     let body = serde_json::json!({
///         "code": rejection.status().as_u16(),
///         "message": rejection.message(),
///     });
///     let mut res = Response::new(Bytes::from(body.to_string()));
///     *res.status_mut() = rejection.status();
///     res
/// };
/// # fn takes(_: impl Renderer) {}
/// # takes(renderer);
/// ```
pub trait Renderer: Send + Sync + 'static {
    /// Renders the HTTP response for a rejection.
    fn render(&self, rejection: &Rejection) -> Response<Bytes>;
}

impl<F> Renderer for F
where
    F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
{
    fn render(&self, rejection: &Rejection) -> Response<Bytes> {
        self(rejection)
    }
}

/// The default: `{"code": "...", "message": "...", "data": ...}` as `application/json`.
///
/// `data` is `null`, except on 429, where it holds `limit`, `remaining`, `reset` and
/// `retry_after`. Bodies without data are static: rendering them allocates nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonEnvelope;

impl Renderer for JsonEnvelope {
    fn render(&self, rejection: &Rejection) -> Response<Bytes> {
        let body = match rejection.rate_limit() {
            // A struct, not a JSON map: the keys come out in the documented order.
            Some(info) => serde_json::to_vec(&Envelope {
                code: rejection.code(),
                message: rejection.message(),
                data: info,
            })
            .map_or_else(
                |_| Bytes::from_static(rejection.public_reason().static_envelope().as_bytes()),
                Bytes::from,
            ),
            None => Bytes::from_static(rejection.public_reason().static_envelope().as_bytes()),
        };
        let mut res = Response::new(body);
        *res.status_mut() = rejection.status();
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        res
    }
}

/// The envelope, keys in the order `code`, `message`, `data`.
#[derive(serde::Serialize)]
struct Envelope<'a, D> {
    code: &'a str,
    message: &'a str,
    data: D,
}

/// RFC 9457 `application/problem+json`: `type`, `title`, `status`, `detail`, and the
/// extension members `code` (and the 429 numbers when there are any).
#[derive(Debug, Clone, Default)]
pub struct ProblemJson {
    type_base: Option<String>,
}

impl ProblemJson {
    /// Problems typed `about:blank`, titled with the HTTP reason phrase.
    pub fn new() -> Self {
        Self::default()
    }

    /// Problems typed `<base><code>`, e.g. `https://api.example.com/errors/` gives
    /// `https://api.example.com/errors/invalid_api_key`.
    #[must_use]
    pub fn type_base(mut self, base: impl Into<String>) -> Self {
        self.type_base = Some(base.into());
        self
    }
}

impl Renderer for ProblemJson {
    fn render(&self, rejection: &Rejection) -> Response<Bytes> {
        let status = rejection.status();
        let mut body = serde_json::json!({
            "type": match &self.type_base {
                Some(base) => format!("{base}{}", rejection.code()),
                None => "about:blank".to_owned(),
            },
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": rejection.message(),
            "code": rejection.code(),
        });
        if let (Some(info), Some(map)) = (rejection.rate_limit(), body.as_object_mut()) {
            map.insert("limit".into(), info.limit.into());
            map.insert("remaining".into(), info.remaining.into());
            map.insert("reset".into(), info.reset.into());
            map.insert("retry_after".into(), info.retry_after.into());
        }
        let mut res = Response::new(Bytes::from(body.to_string()));
        *res.status_mut() = status;
        res.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::RateLimit;

    #[test]
    fn envelope_for_every_reason() {
        for &reason in Reason::ALL {
            let res = JsonEnvelope.render(&Rejection::new(reason));
            assert_eq!(res.status(), reason.status());
            assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
            let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"code": reason.code(), "message": reason.message(), "data": null})
            );
        }
    }

    #[test]
    fn envelope_429_carries_the_numbers() {
        let info = RateLimit {
            limit: 60,
            remaining: 0,
            reset: 1_708_345_200,
            retry_after: 2,
        };
        let res = JsonEnvelope.render(&Rejection::new(Reason::RateLimited).with_rate_limit(info));
        let text = std::str::from_utf8(res.body()).unwrap();
        assert!(
            text.starts_with(r#"{"code":"rate_limited","message":"#),
            "keys in the documented order: {text}"
        );
        assert!(
            text.contains(
                r#"","data":{"limit":60,"remaining":0,"reset":1708345200,"retry_after":2}}"#
            ),
            "{text}"
        );
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(body["code"], "rate_limited");
        assert_eq!(
            body["data"],
            serde_json::json!({"limit": 60, "remaining": 0, "reset": 1_708_345_200u64, "retry_after": 2})
        );
    }

    #[test]
    fn problem_json() {
        let res = ProblemJson::new()
            .type_base("https://api.example.com/errors/")
            .render(&Rejection::new(Reason::InsufficientScope));
        assert_eq!(res.status(), 403);
        assert_eq!(res.headers()[CONTENT_TYPE], "application/problem+json");
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(
            body["type"],
            "https://api.example.com/errors/insufficient_scope"
        );
        assert_eq!(body["title"], "Forbidden");
        assert_eq!(body["status"], 403);
        assert_eq!(body["code"], "insufficient_scope");
        let res = ProblemJson::new().render(&Rejection::new(Reason::MissingApiKey));
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(body["type"], "about:blank");
        assert_eq!(body["title"], "Unauthorized");
    }

    #[test]
    fn opaque_envelope() {
        let res = JsonEnvelope.render(&Rejection::new(Reason::ApiKeyDisabled).opaque(true));
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(body["code"], "invalid_api_key");
    }
}
