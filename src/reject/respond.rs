use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue, Response, StatusCode};

use super::{Reason, Rejection, Renderer, ResponseBody};
use crate::error::ConfigError;
#[cfg(test)]
use crate::head::is_grpc;

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Everything needed to turn a [`Rejection`] into a response, set up once.
#[derive(Clone)]
pub(crate) struct Responder {
    renderer: Arc<dyn Renderer>,
    opaque: bool,
    /// Challenges, rendered once: without a token, with an invalid token, with too few
    /// scopes.
    challenge_missing: HeaderValue,
    challenge_invalid: HeaderValue,
    challenge_scope: Option<HeaderValue>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("opaque", &self.opaque)
            .field("challenge", &self.challenge_missing)
            .finish_non_exhaustive()
    }
}

impl Responder {
    pub(crate) fn new(
        renderer: Arc<dyn Renderer>,
        opaque: bool,
        bearer: bool,
        realm: &str,
    ) -> Result<Self, ConfigError> {
        if realm.is_empty()
            || !realm
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            return Err(ConfigError::InvalidValue("realm"));
        }
        let scheme = if bearer { "Bearer" } else { "ApiKey" };
        let value = |extra: &str| {
            HeaderValue::from_str(&format!("{scheme} realm=\"{realm}\"{extra}"))
                .map_err(|_| ConfigError::InvalidValue("realm"))
        };
        Ok(Self {
            renderer,
            opaque,
            challenge_missing: value("")?,
            challenge_invalid: value(", error=\"invalid_token\"")?,
            challenge_scope: if bearer {
                Some(value(", error=\"insufficient_scope\"")?)
            } else {
                None
            },
        })
    }

    /// The responder for the default realm `api`: infallible.
    pub(crate) fn default_for(renderer: Arc<dyn Renderer>, bearer: bool) -> Self {
        let (missing, invalid, scope) = if bearer {
            (
                HeaderValue::from_static("Bearer realm=\"api\""),
                HeaderValue::from_static("Bearer realm=\"api\", error=\"invalid_token\""),
                Some(HeaderValue::from_static(
                    "Bearer realm=\"api\", error=\"insufficient_scope\"",
                )),
            )
        } else {
            (
                HeaderValue::from_static("ApiKey realm=\"api\""),
                HeaderValue::from_static("ApiKey realm=\"api\", error=\"invalid_token\""),
                None,
            )
        };
        Self {
            renderer,
            opaque: false,
            challenge_missing: missing,
            challenge_invalid: invalid,
            challenge_scope: scope,
        }
    }

    /// The full response for a rejection.
    pub(crate) fn respond<B>(
        &self,
        rejection: Rejection,
        grpc: Option<HeaderValue>,
    ) -> Response<ResponseBody<B>> {
        let rejection = rejection.opaque(self.opaque);
        let mut res = if let Some(content_type) = grpc {
            grpc_response(&rejection, content_type)
        } else {
            let (parts, body) = self.renderer.render(&rejection).into_parts();
            let mut res = Response::from_parts(parts, ResponseBody::full(body));
            if rejection.status() == StatusCode::UNAUTHORIZED {
                let challenge = if rejection.credentials_sent() {
                    &self.challenge_invalid
                } else {
                    &self.challenge_missing
                };
                res.headers_mut()
                    .insert(WWW_AUTHENTICATE, challenge.clone());
            } else if let (Reason::InsufficientScope, Some(challenge)) =
                (rejection.public_reason(), &self.challenge_scope)
            {
                res.headers_mut()
                    .insert(WWW_AUTHENTICATE, challenge.clone());
            }
            res
        };
        let headers = res.headers_mut();
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(info) = rejection.rate_limit() {
            headers.insert(RETRY_AFTER, HeaderValue::from(info.retry_after));
        }
        res.extensions_mut().insert(rejection);
        res
    }
}

/// A trailers-only gRPC reply: HTTP 200 with `grpc-status` and `grpc-message` in the
/// headers and an empty body.
fn grpc_response<B>(rejection: &Rejection, content_type: HeaderValue) -> Response<ResponseBody<B>> {
    let mut res = Response::new(ResponseBody::empty());
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, content_type);
    headers.insert(
        GRPC_STATUS.clone(),
        HeaderValue::from_static(rejection.grpc_code().as_str()),
    );
    headers.insert(
        GRPC_MESSAGE.clone(),
        grpc_message_value(rejection.message()),
    );
    res
}

/// The gRPC spec's percent-encoding: every byte outside `0x20..=0x7E`, and `%`.
const GRPC_MESSAGE_SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

fn grpc_message_value(message: &'static str) -> HeaderValue {
    match std::borrow::Cow::from(percent_encoding::utf8_percent_encode(
        message,
        GRPC_MESSAGE_SET,
    )) {
        std::borrow::Cow::Borrowed(s) if s.len() == message.len() => {
            HeaderValue::from_static(message)
        }
        encoded => HeaderValue::from_maybe_shared(Bytes::from(encoded.into_owned()))
            .unwrap_or_else(|_| HeaderValue::from_static("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::RateLimit;
    use crate::reject::JsonEnvelope;
    use http::HeaderMap;

    fn responder(bearer: bool) -> Responder {
        Responder::new(Arc::new(JsonEnvelope), false, bearer, "api").unwrap()
    }

    #[test]
    fn headers_for_every_reason_http_and_grpc() {
        for &reason in Reason::ALL {
            let res: Response<ResponseBody<String>> =
                responder(true).respond(Rejection::new(reason), None);
            assert_eq!(res.status(), reason.status(), "{reason:?}");
            assert_eq!(res.headers()[CACHE_CONTROL], "no-store");
            assert_eq!(
                res.extensions().get::<Rejection>().unwrap().reason(),
                reason
            );
            let challenge = res.headers().get(WWW_AUTHENTICATE);
            match reason {
                Reason::MissingApiKey => {
                    assert_eq!(challenge.unwrap(), "Bearer realm=\"api\"");
                }
                r if r.status() == 401 => {
                    assert_eq!(
                        challenge.unwrap(),
                        "Bearer realm=\"api\", error=\"invalid_token\""
                    );
                }
                Reason::InsufficientScope => assert_eq!(
                    challenge.unwrap(),
                    "Bearer realm=\"api\", error=\"insufficient_scope\""
                ),
                _ => assert!(challenge.is_none(), "{reason:?}"),
            }

            let res: Response<ResponseBody<String>> = responder(true).respond(
                Rejection::new(reason),
                Some(HeaderValue::from_static("application/grpc")),
            );
            assert_eq!(res.status(), 200);
            assert_eq!(res.headers()[CONTENT_TYPE], "application/grpc");
            assert_eq!(
                res.headers()["grpc-status"],
                reason.grpc_code().as_u8().to_string().as_str()
            );
            assert_eq!(res.headers()["grpc-message"], reason.message());
            assert!(res.headers().get(WWW_AUTHENTICATE).is_none());
        }
    }

    #[test]
    fn api_key_challenge_without_bearer() {
        let res: Response<ResponseBody<String>> =
            responder(false).respond(Rejection::new(Reason::MissingApiKey), None);
        assert_eq!(res.headers()[WWW_AUTHENTICATE], "ApiKey realm=\"api\"");
    }

    #[test]
    fn retry_after_on_429() {
        let info = RateLimit {
            limit: 1,
            remaining: 0,
            reset: 10,
            retry_after: 7,
        };
        let res: Response<ResponseBody<String>> = responder(true).respond(
            Rejection::new(Reason::RateLimited).with_rate_limit(info),
            None,
        );
        assert_eq!(res.headers()[RETRY_AFTER], "7");
    }

    #[test]
    fn grpc_web_gets_its_own_content_type_back() {
        let web = HeaderValue::from_static("application/grpc-web+proto");
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, web.clone());
        let res: Response<ResponseBody<String>> =
            responder(true).respond(Rejection::new(Reason::MissingApiKey), is_grpc(&headers));
        assert_eq!(res.headers()[CONTENT_TYPE], web);
        assert_eq!(res.headers()["grpc-status"], "16");
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(is_grpc(&headers).is_none());
    }

    #[test]
    fn grpc_message_encoding() {
        assert_eq!(grpc_message_value("plain text."), "plain text.");
        assert_eq!(grpc_message_value("100% é"), "100%25 %C3%A9");
    }

    #[test]
    fn bad_realms() {
        for realm in ["", "a\"b", "a\\b", "é"] {
            assert!(Responder::new(Arc::new(JsonEnvelope), false, true, realm).is_err());
        }
    }
}
