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

/// Why a request was refused. The rows of the table in the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// No key in any configured scheme.
    MissingApiKey,
    /// Malformed, bad checksum, unknown, revoked or deleted key.
    InvalidApiKey,
    /// Expired key.
    ApiKeyExpired,
    /// Disabled key.
    ApiKeyDisabled,
    /// Owner missing or inactive.
    OwnerInactive,
    /// Two different keys in one request.
    AmbiguousCredentials,
    /// Client IP not in the key's allowlist.
    IpNotAllowed,
    /// Site not in the key's allowlist.
    SiteNotAllowed,
    /// A scope the route requires is missing.
    InsufficientScope,
    /// Test key on a live-only route, or the reverse.
    EnvironmentMismatch,
    /// Rate limit exceeded.
    RateLimited,
    /// Too many invalid keys from one client IP.
    TooManyFailedAttempts,
    /// Lookup or limiter backend failed or timed out.
    AuthUnavailable,
}

/// gRPC status codes used by the table.
pub mod grpc_code {
    /// `INVALID_ARGUMENT`
    pub const INVALID_ARGUMENT: u8 = 3;
    /// `PERMISSION_DENIED`
    pub const PERMISSION_DENIED: u8 = 7;
    /// `RESOURCE_EXHAUSTED`
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    /// `UNAVAILABLE`
    pub const UNAVAILABLE: u8 = 14;
    /// `UNAUTHENTICATED`
    pub const UNAUTHENTICATED: u8 = 16;
}

impl Reason {
    /// Every reason, in table order.
    pub const ALL: [Reason; 13] = [
        Self::MissingApiKey,
        Self::InvalidApiKey,
        Self::ApiKeyExpired,
        Self::ApiKeyDisabled,
        Self::OwnerInactive,
        Self::AmbiguousCredentials,
        Self::IpNotAllowed,
        Self::SiteNotAllowed,
        Self::InsufficientScope,
        Self::EnvironmentMismatch,
        Self::RateLimited,
        Self::TooManyFailedAttempts,
        Self::AuthUnavailable,
    ];

    /// The HTTP status.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::MissingApiKey
            | Self::InvalidApiKey
            | Self::ApiKeyExpired
            | Self::ApiKeyDisabled
            | Self::OwnerInactive => StatusCode::UNAUTHORIZED,
            Self::AmbiguousCredentials => StatusCode::BAD_REQUEST,
            Self::IpNotAllowed
            | Self::SiteNotAllowed
            | Self::InsufficientScope
            | Self::EnvironmentMismatch => StatusCode::FORBIDDEN,
            Self::RateLimited | Self::TooManyFailedAttempts => StatusCode::TOO_MANY_REQUESTS,
            Self::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status code.
    pub const fn grpc_code(self) -> u8 {
        match self {
            Self::MissingApiKey
            | Self::InvalidApiKey
            | Self::ApiKeyExpired
            | Self::ApiKeyDisabled
            | Self::OwnerInactive => grpc_code::UNAUTHENTICATED,
            Self::AmbiguousCredentials => grpc_code::INVALID_ARGUMENT,
            Self::IpNotAllowed
            | Self::SiteNotAllowed
            | Self::InsufficientScope
            | Self::EnvironmentMismatch => grpc_code::PERMISSION_DENIED,
            Self::RateLimited | Self::TooManyFailedAttempts => grpc_code::RESOURCE_EXHAUSTED,
            Self::AuthUnavailable => grpc_code::UNAVAILABLE,
        }
    }

    /// The reason a client sees when 401s are folded into `invalid_api_key`.
    pub const fn opaque(self) -> Self {
        match self {
            Self::ApiKeyExpired | Self::ApiKeyDisabled | Self::OwnerInactive => Self::InvalidApiKey,
            other => other,
        }
    }
}

/// One row per reason: its code and message, and the static JSON envelope made of both.
macro_rules! texts {
    ($($reason:ident => $code:literal, $message:literal;)*) => {
        impl Reason {
            /// The machine-readable code, e.g. `missing_api_key`.
            pub const fn code(self) -> &'static str {
                match self { $(Self::$reason => $code,)* }
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

texts! {
    MissingApiKey => "missing_api_key", "No API key was provided.";
    InvalidApiKey => "invalid_api_key", "The API key is not valid.";
    ApiKeyExpired => "api_key_expired", "The API key has expired.";
    ApiKeyDisabled => "api_key_disabled", "The API key is disabled.";
    OwnerInactive => "owner_inactive", "The account that owns this API key is not active.";
    AmbiguousCredentials => "ambiguous_credentials", "The request carries more than one different API key.";
    IpNotAllowed => "ip_not_allowed", "The API key may not be used from this IP address.";
    SiteNotAllowed => "site_not_allowed", "The API key may not be used for this site.";
    InsufficientScope => "insufficient_scope", "The API key lacks a scope this route requires.";
    EnvironmentMismatch => "environment_mismatch", "The API key's environment does not match this route.";
    RateLimited => "rate_limited", "Too many requests; retry later.";
    TooManyFailedAttempts => "too_many_failed_attempts", "Too many invalid API keys from this client; retry later.";
    AuthUnavailable => "auth_unavailable", "Authentication is temporarily unavailable; retry later.";
}

/// The numbers behind a 429: reported in `data` and in the rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RateLimitInfo {
    /// The window's capacity.
    pub limit: u64,
    /// Requests left now.
    pub remaining: u64,
    /// Unix seconds when the bucket is full again.
    pub reset: u64,
    /// Whole seconds to wait before a retry can succeed (rounded up).
    pub retry_after: u64,
}

/// A refused request, as a typed value: rendered into the response and also put into the
/// response extensions, where logging or metrics middleware can read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    reason: Reason,
    opaque: bool,
    credentials_sent: bool,
    key_id: Option<KeyId>,
    rate_limit: Option<RateLimitInfo>,
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
    pub fn with_rate_limit(mut self, info: RateLimitInfo) -> Self {
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
    pub fn grpc_code(&self) -> u8 {
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
    pub fn rate_limit(&self) -> Option<&RateLimitInfo> {
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
        use grpc_code::*;
        let table: [(Reason, u16, &str, u8); 13] = [
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
        assert_eq!(table.map(|row| row.0), Reason::ALL);
        for (reason, status, code, grpc) in table {
            assert_eq!(reason.status().as_u16(), status, "{code}");
            assert_eq!(reason.code(), code);
            assert_eq!(reason.grpc_code(), grpc, "{code}");
            assert!(reason.message().ends_with('.'), "{code}");
        }
    }

    #[test]
    fn opaque_folds_only_the_401_details() {
        for reason in Reason::ALL {
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
