//! Rejections: one table of reasons, rendered by a pluggable [`Renderer`].
//!
//! | reason | HTTP | code | gRPC |
//! | --- | --- | --- | --- |
//! | no key in any configured scheme | 401 | `missing_api_key` | UNAUTHENTICATED (16) |
//! | malformed, bad checksum, unknown, revoked or deleted key | 401 | `invalid_api_key` | UNAUTHENTICATED |
//! | expired key | 401 | `api_key_expired` | UNAUTHENTICATED |
//! | disabled key | 401 | `api_key_disabled` | UNAUTHENTICATED |
//! | owner missing or inactive | 401 | `owner_inactive` | UNAUTHENTICATED |
//! | two different keys in one request | 400 | `ambiguous_credentials` | INVALID_ARGUMENT (3) |
//! | client IP not in the key's allowlist | 403 | `ip_not_allowed` | PERMISSION_DENIED (7) |
//! | site not in the key's allowlist | 403 | `site_not_allowed` | PERMISSION_DENIED |
//! | route scope missing | 403 | `insufficient_scope` | PERMISSION_DENIED |
//! | test key on a live-only route (or the reverse) | 403 | `environment_mismatch` | PERMISSION_DENIED |
//! | rate limit exceeded | 429 | `rate_limited` | RESOURCE_EXHAUSTED (8) |
//! | too many invalid keys from one client IP | 429 | `too_many_failed_attempts` | RESOURCE_EXHAUSTED |
//! | lookup or limiter backend failed or timed out | 503 | `auth_unavailable` | UNAVAILABLE (14) |
//!
//! Whatever the renderer, every rejection response carries `Cache-Control: no-store`, a
//! 401 carries a `WWW-Authenticate` challenge (RFC 6750 for Bearer), the typed
//! [`Rejection`] sits in the response extensions, and a request whose `content-type` starts
//! with `application/grpc` gets a trailers-only gRPC reply with the mapped `grpc-status`.

mod body;
mod render;
mod respond;

pub use body::ResponseBody;
pub use render::{JsonEnvelope, ProblemJson, Renderer};
pub(crate) use respond::Responder;

use http::StatusCode;

use crate::key::KeyId;
use crate::quota::RateLimit;

/// The gRPC status codes the table uses (a subset of gRPC's `Code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum GrpcCode {
    /// `INVALID_ARGUMENT` (3).
    InvalidArgument = 3,
    /// `PERMISSION_DENIED` (7).
    PermissionDenied = 7,
    /// `RESOURCE_EXHAUSTED` (8).
    ResourceExhausted = 8,
    /// `UNAVAILABLE` (14).
    Unavailable = 14,
    /// `UNAUTHENTICATED` (16).
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The code's number, as `grpc-status` carries it.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The code's number as text, for the `grpc-status` header.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "3",
            Self::PermissionDenied => "7",
            Self::ResourceExhausted => "8",
            Self::Unavailable => "14",
            Self::Unauthenticated => "16",
        }
    }
}

/// The rejection table: one row per reason, with its HTTP status, code, gRPC code and
/// message together. Nothing about a reason is written anywhere else.
macro_rules! reasons {
    ($(
        $(#[$doc:meta])*
        $reason:ident => $status:ident, $code:literal, $grpc:ident, $message:literal;
    )*) => {
        /// Why a request was refused. The rows of the table in the [module docs](self).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Reason {
            $($(#[$doc])* $reason,)*
        }

        impl Reason {
            /// Every reason, in table order.
            pub const ALL: &'static [Reason] = &[$(Self::$reason),*];

            /// The HTTP status.
            pub const fn status(self) -> StatusCode {
                match self { $(Self::$reason => StatusCode::$status,)* }
            }

            /// The machine-readable code, e.g. `missing_api_key`.
            pub const fn code(self) -> &'static str {
                match self { $(Self::$reason => $code,)* }
            }

            /// The gRPC status code.
            pub const fn grpc_code(self) -> GrpcCode {
                match self { $(Self::$reason => GrpcCode::$grpc,)* }
            }

            /// A human sentence for the client.
            pub const fn message(self) -> &'static str {
                match self { $(Self::$reason => $message,)* }
            }

            /// `{"code":…,"message":…,"data":null}`, built at compile time.
            pub(crate) const fn static_envelope(self) -> &'static str {
                match self {
                    $(Self::$reason => concat!(
                        "{\"code\":\"", $code, "\",\"message\":\"", $message, "\",\"data\":null}"
                    ),)*
                }
            }
        }
    };
}

reasons! {
    /// No key in any configured scheme.
    MissingApiKey => UNAUTHORIZED, "missing_api_key", Unauthenticated, "No API key was provided.";
    /// Malformed, bad checksum, unknown, revoked or deleted key.
    InvalidApiKey => UNAUTHORIZED, "invalid_api_key", Unauthenticated, "The API key is not valid.";
    /// Expired key.
    ApiKeyExpired => UNAUTHORIZED, "api_key_expired", Unauthenticated, "The API key has expired.";
    /// Disabled key.
    ApiKeyDisabled => UNAUTHORIZED, "api_key_disabled", Unauthenticated, "The API key is disabled.";
    /// Owner missing or inactive.
    OwnerInactive => UNAUTHORIZED, "owner_inactive", Unauthenticated, "The account that owns this API key is not active.";
    /// Two different keys in one request.
    AmbiguousCredentials => BAD_REQUEST, "ambiguous_credentials", InvalidArgument, "The request carries more than one different API key.";
    /// Client IP not in the key's allowlist.
    IpNotAllowed => FORBIDDEN, "ip_not_allowed", PermissionDenied, "The API key may not be used from this IP address.";
    /// Site not in the key's allowlist.
    SiteNotAllowed => FORBIDDEN, "site_not_allowed", PermissionDenied, "The API key may not be used for this site.";
    /// A scope the route requires is missing.
    InsufficientScope => FORBIDDEN, "insufficient_scope", PermissionDenied, "The API key lacks a scope this route requires.";
    /// Test key on a live-only route, or the reverse.
    EnvironmentMismatch => FORBIDDEN, "environment_mismatch", PermissionDenied, "The API key's environment does not match this route.";
    /// Rate limit exceeded.
    RateLimited => TOO_MANY_REQUESTS, "rate_limited", ResourceExhausted, "Too many requests; retry later.";
    /// Too many invalid keys from one client IP.
    TooManyFailedAttempts => TOO_MANY_REQUESTS, "too_many_failed_attempts", ResourceExhausted, "Too many invalid API keys from this client; retry later.";
    /// Lookup or limiter backend failed or timed out.
    AuthUnavailable => SERVICE_UNAVAILABLE, "auth_unavailable", Unavailable, "Authentication is temporarily unavailable; retry later.";
}

impl Reason {
    /// The reason a client sees when 401s are folded into `invalid_api_key`.
    pub const fn opaque(self) -> Self {
        match self {
            Self::ApiKeyExpired | Self::ApiKeyDisabled | Self::OwnerInactive => Self::InvalidApiKey,
            other => other,
        }
    }
}

/// A refused request, as a typed value: rendered into the response and also put into the
/// response extensions, where logging or metrics middleware can read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    reason: Reason,
    opaque: bool,
    credentials_sent: bool,
    key_id: Option<KeyId>,
    rate_limit: Option<RateLimit>,
}

impl Rejection {
    /// A rejection for `reason`.
    pub fn new(reason: Reason) -> Self {
        Self {
            reason,
            opaque: false,
            credentials_sent: !matches!(reason, Reason::MissingApiKey),
            key_id: None,
            rate_limit: None,
        }
    }

    /// Attaches the key's public id (for logs; never rendered).
    #[must_use]
    pub fn with_key_id(mut self, key_id: KeyId) -> Self {
        self.key_id = Some(key_id);
        self
    }

    /// Attaches the rate-limit numbers of a 429.
    #[must_use]
    pub fn with_rate_limit(mut self, info: RateLimit) -> Self {
        self.rate_limit = Some(info);
        self
    }

    /// Folds `api_key_expired`, `api_key_disabled` and `owner_inactive` into
    /// `invalid_api_key` for the client (the true [`reason`](Self::reason) stays readable).
    #[must_use]
    pub fn opaque(mut self, opaque: bool) -> Self {
        self.opaque = opaque;
        self
    }

    /// The true reason (not folded).
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The reason the client sees: folded when [`opaque`](Self::opaque) is set.
    pub fn public_reason(&self) -> Reason {
        if self.opaque {
            self.reason.opaque()
        } else {
            self.reason
        }
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        self.public_reason().status()
    }

    /// Machine-readable code the client sees.
    pub fn code(&self) -> &'static str {
        self.public_reason().code()
    }

    /// Human sentence the client sees.
    pub fn message(&self) -> &'static str {
        self.public_reason().message()
    }

    /// gRPC status code.
    pub fn grpc_code(&self) -> GrpcCode {
        self.public_reason().grpc_code()
    }

    /// Whether the request carried a credential (decides `error="invalid_token"`).
    pub fn credentials_sent(&self) -> bool {
        self.credentials_sent
    }

    /// The key's public id, when the key was found.
    pub fn key_id(&self) -> Option<&KeyId> {
        self.key_id.as_ref()
    }

    /// The rate-limit numbers of a 429.
    pub fn rate_limit(&self) -> Option<&RateLimit> {
        self.rate_limit.as_ref()
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.reason.message())
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        use GrpcCode::*;
        const UNAUTHENTICATED: GrpcCode = Unauthenticated;
        const INVALID_ARGUMENT: GrpcCode = InvalidArgument;
        const PERMISSION_DENIED: GrpcCode = PermissionDenied;
        const RESOURCE_EXHAUSTED: GrpcCode = ResourceExhausted;
        const UNAVAILABLE: GrpcCode = Unavailable;
        let table: [(Reason, u16, &str, GrpcCode); 13] = [
            (
                Reason::MissingApiKey,
                401,
                "missing_api_key",
                UNAUTHENTICATED,
            ),
            (
                Reason::InvalidApiKey,
                401,
                "invalid_api_key",
                UNAUTHENTICATED,
            ),
            (
                Reason::ApiKeyExpired,
                401,
                "api_key_expired",
                UNAUTHENTICATED,
            ),
            (
                Reason::ApiKeyDisabled,
                401,
                "api_key_disabled",
                UNAUTHENTICATED,
            ),
            (
                Reason::OwnerInactive,
                401,
                "owner_inactive",
                UNAUTHENTICATED,
            ),
            (
                Reason::AmbiguousCredentials,
                400,
                "ambiguous_credentials",
                INVALID_ARGUMENT,
            ),
            (
                Reason::IpNotAllowed,
                403,
                "ip_not_allowed",
                PERMISSION_DENIED,
            ),
            (
                Reason::SiteNotAllowed,
                403,
                "site_not_allowed",
                PERMISSION_DENIED,
            ),
            (
                Reason::InsufficientScope,
                403,
                "insufficient_scope",
                PERMISSION_DENIED,
            ),
            (
                Reason::EnvironmentMismatch,
                403,
                "environment_mismatch",
                PERMISSION_DENIED,
            ),
            (Reason::RateLimited, 429, "rate_limited", RESOURCE_EXHAUSTED),
            (
                Reason::TooManyFailedAttempts,
                429,
                "too_many_failed_attempts",
                RESOURCE_EXHAUSTED,
            ),
            (
                Reason::AuthUnavailable,
                503,
                "auth_unavailable",
                UNAVAILABLE,
            ),
        ];
        assert_eq!(table.map(|row| row.0).as_slice(), Reason::ALL);
        for (reason, status, code, grpc) in table {
            assert_eq!(reason.status().as_u16(), status, "{code}");
            assert_eq!(reason.code(), code);
            assert_eq!(reason.grpc_code(), grpc, "{code}");
            assert!(reason.message().ends_with('.'), "{code}");
        }
    }

    #[test]
    fn opaque_folds_only_the_401_details() {
        for &reason in Reason::ALL {
            let r = Rejection::new(reason).opaque(true);
            let expect = match reason {
                Reason::ApiKeyExpired | Reason::ApiKeyDisabled | Reason::OwnerInactive => {
                    "invalid_api_key"
                }
                other => other.code(),
            };
            assert_eq!(r.code(), expect);
            assert_eq!(r.reason(), reason);
        }
    }
}
