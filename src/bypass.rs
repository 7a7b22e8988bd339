//! Requests that need no key.
//!
//! The default, [`DefaultBypass`], lets through real CORS preflights ([`CorsPreflight`]) and
//! the API documentation under `/swagger`. Path matching is on whole segments (`/swaggerx`
//! is not `/swagger`) and refuses to bypass any path a router or a proxy might read
//! differently: `.` or `..` segments (plain or percent-encoded), an encoded `/` or `\`, a
//! backslash, an empty segment (`//`), a `;` (path parameters, which some servers strip:
//! `/swagger/..;/admin`), or a control character such as NUL (`%00`).
//!
//! # CORS preflights
//!
//! Only a *real* preflight passes: `OPTIONS` with both `Origin` and
//! `Access-Control-Request-Method`, and not a gRPC request. Any other `OPTIONS` needs a key
//! like any other method, and a gRPC request is never let through by its method: tonic
//! routes by path alone, and axum's `any()` routes, `.options()` handlers and fallbacks run
//! for `OPTIONS` too.
//!
//! Put the CORS layer *outside* keygate: it answers preflights before keygate sees them, and
//! it adds the CORS headers to keygate's 401s and 429s, which a browser could not read
//! otherwise. A preflight that reaches keygate therefore found no CORS layer to answer it.
//! keygate answers it itself, `204 No Content` with no `Access-Control-*` header (so the
//! browser refuses the cross-origin call, as an API without CORS wants), logs a warning
//! once, and **never hands it to the inner service**: a handler would run without a key.
//!
//! Predicates compose with [`BypassExt::or`], [`BypassExt::and`] and [`BypassExt::not`],
//! and any `Fn(&RequestHead<'_>) -> bool` is one:
//!
//! ```
//! use keygate::bypass::{Bypass, BypassExt, DefaultBypass, PathPrefix};
//! use keygate::head::{RequestHead};
//!
//! let bypass = DefaultBypass::default()
//!     .or(PathPrefix::new("/metrics").unwrap())
//!     .or(|head: &RequestHead<'_>| head.uri.path() == "/healthz");
//!
//! let req = http::Request::get("/metrics/process").body(()).unwrap();
//! assert!(bypass.bypass(&RequestHead::of(&req)));
//! let req = http::Request::get("/swagger/../v1/users").body(()).unwrap();
//! assert!(!bypass.bypass(&RequestHead::of(&req)));
//! ```

use http::header::{ACCESS_CONTROL_REQUEST_METHOD, ORIGIN};
use http::Method;
#[cfg(test)]
use http::Request;

use crate::error::ConfigError;
use crate::head::is_grpc;
use crate::head::RequestHead;

/// Decides whether a request skips authentication.
pub trait Bypass: Send + Sync + 'static {
    /// `true` to pass the request to the inner service without a key.
    fn bypass(&self, head: &RequestHead<'_>) -> bool;
}

impl<F> Bypass for F
where
    F: Fn(&RequestHead<'_>) -> bool + Send + Sync + 'static,
{
    fn bypass(&self, head: &RequestHead<'_>) -> bool {
        self(head)
    }
}

/// Combinators for [`Bypass`] predicates.
pub trait BypassExt: Bypass + Sized {
    /// Bypass when either predicate says so.
    fn or<O: Bypass>(self, other: O) -> Or<Self, O> {
        Or(self, other)
    }

    /// Bypass only when both predicates say so.
    fn and<O: Bypass>(self, other: O) -> And<Self, O> {
        And(self, other)
    }

    /// Bypass exactly when this predicate says not to.
    fn not(self) -> Not<Self> {
        Not(self)
    }
}

impl<T: Bypass> BypassExt for T {}

/// See [`BypassExt::or`].
#[derive(Debug, Clone, Copy)]
pub struct Or<A, B>(A, B);

impl<A: Bypass, B: Bypass> Bypass for Or<A, B> {
    fn bypass(&self, head: &RequestHead<'_>) -> bool {
        self.0.bypass(head) || self.1.bypass(head)
    }
}

/// See [`BypassExt::and`].
#[derive(Debug, Clone, Copy)]
pub struct And<A, B>(A, B);

impl<A: Bypass, B: Bypass> Bypass for And<A, B> {
    fn bypass(&self, head: &RequestHead<'_>) -> bool {
        self.0.bypass(head) && self.1.bypass(head)
    }
}

/// See [`BypassExt::not`].
#[derive(Debug, Clone, Copy)]
pub struct Not<A>(A);

impl<A: Bypass> Bypass for Not<A> {
    fn bypass(&self, head: &RequestHead<'_>) -> bool {
        !self.0.bypass(head)
    }
}

/// Never bypass: every request needs a key, preflights included.
#[derive(Debug, Clone, Copy, Default)]
pub struct Never;

impl Bypass for Never {
    fn bypass(&self, _: &RequestHead<'_>) -> bool {
        false
    }
}

/// A real CORS preflight, on any path: `OPTIONS` carrying both `Origin` and
/// `Access-Control-Request-Method`, and not a gRPC request (whose content type is
/// `application/grpc…`). See the [module docs](self) for what the auth layer does with one.
#[derive(Debug, Clone, Copy, Default)]
pub struct CorsPreflight;

impl CorsPreflight {
    /// Whether the request is a real CORS preflight.
    pub fn matches(head: &RequestHead<'_>) -> bool {
        head.method == Method::OPTIONS
            && head.headers.contains_key(ORIGIN)
            && head.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
            && is_grpc(head.headers).is_none()
    }
}

impl Bypass for CorsPreflight {
    fn bypass(&self, head: &RequestHead<'_>) -> bool {
        Self::matches(head)
    }
}

/// Bypass a path and everything below it, on whole segments: `PathPrefix::new("/swagger")`
/// matches `/swagger`, `/swagger/` and `/swagger/openapi.json`, never `/swaggerx`, and
/// never a path a router or a proxy could read differently (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct PathPrefix {
    prefix: Box<str>,
}

impl PathPrefix {
    /// A prefix such as `/swagger` or `/docs/api`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidPathPrefix`] when `prefix` does not start with `/` or is not
    /// itself an unambiguous path.
    pub fn new(prefix: &str) -> Result<Self, ConfigError> {
        let trimmed = prefix.trim_end_matches('/');
        if !prefix.starts_with('/') || (!trimmed.is_empty() && !is_unambiguous_path(trimmed)) {
            return Err(ConfigError::InvalidPathPrefix(prefix.to_owned()));
        }
        Ok(Self {
            prefix: trimmed.into(),
        })
    }

    /// Whether `path` is the prefix or below it.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix(&*self.prefix) else {
            return false;
        };
        (rest.is_empty() || rest.starts_with('/')) && is_unambiguous_path(path)
    }
}

impl Bypass for PathPrefix {
    fn bypass(&self, head: &RequestHead<'_>) -> bool {
        self.matches(head.uri.path())
    }
}

/// Whether a path reads the same to every router and proxy: it starts with `/`, and no
/// segment is empty (except a trailing one), `.` or `..` (also percent-encoded), and there is
/// no `\`, `;`, control character, encoded `/`, encoded `\`, encoded `;`, encoded `%` or
/// encoded control character.
pub(crate) fn is_unambiguous_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if path.contains(['\\', ';']) {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            if segments.peek().is_some() {
                return false;
            }
            continue;
        }
        // Decode just enough to see what a decoding router would see.
        let mut len = 0usize;
        let mut dots = 0usize;
        for byte in percent_encoding::percent_decode_str(segment) {
            if matches!(byte, b'/' | b'\\' | b'%' | b';') || byte.is_ascii_control() {
                return false;
            }
            len += 1;
            dots += usize::from(byte == b'.');
        }
        if dots == len && len <= 2 {
            return false;
        }
    }
    true
}

/// The default: [`CorsPreflight`] or [`PathPrefix`] `/swagger`.
#[derive(Debug, Clone)]
pub struct DefaultBypass {
    swagger: PathPrefix,
}

impl Default for DefaultBypass {
    fn default() -> Self {
        Self {
            swagger: PathPrefix {
                prefix: "/swagger".into(),
            },
        }
    }
}

impl Bypass for DefaultBypass {
    fn bypass(&self, head: &RequestHead<'_>) -> bool {
        CorsPreflight::matches(head) || self.swagger.bypass(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bypass: &impl Bypass, method: Method, uri: &str) -> bool {
        check_with(bypass, method, uri, &[])
    }

    fn check_with(
        bypass: &impl Bypass,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> bool {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let req = builder.body(()).unwrap();
        bypass.bypass(&RequestHead::of(&req))
    }

    const PREFLIGHT: &[(&str, &str)] = &[
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
    ];

    #[test]
    fn only_real_preflights_pass() {
        let bypass = DefaultBypass::default();
        let origin_only: &[(&str, &str)] = &[("origin", "https://app.example")];
        let method_only: &[(&str, &str)] = &[("access-control-request-method", "POST")];
        let grpc: &[(&str, &str)] = &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            ("content-type", "application/grpc"),
        ];
        let grpc_upper: &[(&str, &str)] = &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            ("content-type", "APPLICATION/GRPC+proto"),
        ];
        let grpc_web: &[(&str, &str)] = &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            ("content-type", "application/grpc-web-text"),
        ];
        type Headers<'a> = &'a [(&'a str, &'a str)];
        let cases: [(&str, Method, &str, Headers, bool); 10] = [
            (
                "real preflight",
                Method::OPTIONS,
                "/v1/messages",
                PREFLIGHT,
                true,
            ),
            (
                "real preflight, gRPC path",
                Method::OPTIONS,
                "/grpc.health.v1.Health/Check",
                PREFLIGHT,
                true,
            ),
            ("bare OPTIONS", Method::OPTIONS, "/v1/messages", &[], false),
            (
                "bare OPTIONS on a gRPC path",
                Method::OPTIONS,
                "/grpc.health.v1.Health/Check",
                &[],
                false,
            ),
            ("OPTIONS *", Method::OPTIONS, "*", &[], false),
            ("Origin alone", Method::OPTIONS, "/v1", origin_only, false),
            (
                "request method alone",
                Method::OPTIONS,
                "/v1",
                method_only,
                false,
            ),
            (
                "gRPC is never a preflight",
                Method::OPTIONS,
                "/grpc.health.v1.Health/Check",
                grpc,
                false,
            ),
            (
                "gRPC in capitals neither",
                Method::OPTIONS,
                "/x.Y/Z",
                grpc_upper,
                false,
            ),
            (
                "gRPC-Web neither",
                Method::OPTIONS,
                "/x.Y/Z",
                grpc_web,
                false,
            ),
        ];
        for (name, method, uri, headers, expected) in cases {
            assert_eq!(
                check_with(&bypass, method, uri, headers),
                expected,
                "{name}"
            );
        }
        // The preflight headers do not open other methods.
        assert!(!check_with(&bypass, Method::GET, "/v1", PREFLIGHT));
        assert!(!check_with(&bypass, Method::POST, "/v1", PREFLIGHT));
    }

    #[test]
    fn default_bypass_table() {
        let cases = [
            ("swagger", Method::GET, "/swagger", true),
            ("swagger slash", Method::GET, "/swagger/", true),
            ("swagger file", Method::GET, "/swagger/openapi.json", true),
            ("swagger with query", Method::GET, "/swagger?x=1", true),
            ("swagger deep", Method::GET, "/swagger/a/b/c.css", true),
            ("not a whole segment", Method::GET, "/swaggerx", false),
            ("suffix glued", Method::GET, "/swagger.json", false),
            ("other path", Method::GET, "/v1/health", false),
            ("dotdot", Method::GET, "/swagger/../v1/users", false),
            ("dot", Method::GET, "/swagger/./x", false),
            (
                "encoded dotdot",
                Method::GET,
                "/swagger/%2e%2e/v1/users",
                false,
            ),
            (
                "mixed encoded dotdot",
                Method::GET,
                "/swagger/.%2E/v1",
                false,
            ),
            ("encoded slash", Method::GET, "/swagger%2f..%2fv1", false),
            ("encoded slash lower", Method::GET, "/swagger/a%2Fb", false),
            (
                "encoded backslash",
                Method::GET,
                "/swagger/%5c..%5cv1",
                false,
            ),
            (
                "double encoding",
                Method::GET,
                "/swagger/%252e%252e/v1",
                false,
            ),
            ("backslash", Method::GET, "/swagger\\..\\v1", false),
            ("double slash", Method::GET, "/swagger//v1", false),
            ("leading double slash", Method::GET, "//swagger", false),
            ("case differs", Method::GET, "/Swagger", false),
            ("prefix in the middle", Method::GET, "/v1/swagger", false),
            (
                "path parameter dotdot",
                Method::GET,
                "/swagger/..;/v1/users",
                false,
            ),
            (
                "path parameter",
                Method::GET,
                "/swagger;x=1/openapi.json",
                false,
            ),
            ("encoded semicolon", Method::GET, "/swagger/..%3b/v1", false),
            ("encoded NUL", Method::GET, "/swagger/%00", false),
            (
                "encoded NUL in a segment",
                Method::GET,
                "/swagger/a%00.json",
                false,
            ),
            ("encoded newline", Method::GET, "/swagger/%0a", false),
            ("encoded DEL", Method::GET, "/swagger/%7f", false),
            ("harmless encoding", Method::GET, "/swagger/a%20b", true),
            ("post to swagger", Method::POST, "/swagger", true),
            ("bare OPTIONS to swagger", Method::OPTIONS, "/swagger", true),
        ];
        let bypass = DefaultBypass::default();
        for (name, method, uri, expected) in cases {
            assert_eq!(check(&bypass, method, uri), expected, "{name}");
        }
    }

    #[test]
    fn combinators() {
        let metrics = PathPrefix::new("/metrics/").unwrap();
        let get_only = |h: &RequestHead<'_>| h.method == Method::GET;
        let p = DefaultBypass::default().or(metrics.clone().and(get_only));
        assert!(check(&p, Method::GET, "/metrics"));
        assert!(!check(&p, Method::POST, "/metrics"));
        assert!(check_with(&p, Method::OPTIONS, "/anything", PREFLIGHT));
        assert!(!check(&p, Method::OPTIONS, "/anything"));
        let no_preflight = CorsPreflight.not().and(DefaultBypass::default());
        assert!(!check_with(
            &no_preflight,
            Method::OPTIONS,
            "/v1",
            PREFLIGHT
        ));
        assert!(check(&no_preflight, Method::GET, "/swagger"));
        assert!(!check_with(&Never, Method::OPTIONS, "/swagger", PREFLIGHT));
    }

    #[test]
    fn prefix_validation() {
        for bad in [
            "swagger",
            "/a/../b",
            "/a//b",
            "/a/%2e%2e",
            "",
            "/a;b",
            "/a%00",
        ] {
            assert!(PathPrefix::new(bad).is_err(), "{bad}");
        }
        let root = PathPrefix::new("/").unwrap();
        assert!(root.matches("/anything"));
        assert!(!root.matches("/a/../b"));
    }
}
