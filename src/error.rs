//! Configuration errors: anything a caller can set wrong is reported here, never a panic.

/// A boxed error: what a backend of your own (a lookup, a limiter store) may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A configuration value that keygate cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key prefix that is empty, too long, not visible ASCII, or used for both
    /// environments.
    #[error("invalid key prefix {0:?}: it must be 1 to 32 visible ASCII characters, distinct per environment")]
    InvalidPrefix(String),
    /// A header name that HTTP does not allow.
    #[error("invalid header name {0:?}")]
    InvalidHeaderName(String),
    /// A query parameter name that is empty.
    #[error("the query parameter name must not be empty")]
    EmptyQueryName,
    /// An extractor with no scheme at all.
    #[error("the extractor needs at least one scheme")]
    NoSchemes,
    /// A CIDR block or IP address that does not parse.
    #[error("invalid IP network {0:?}: expected an address or CIDR block such as 10.0.0.0/8 or 2001:db8::/32")]
    InvalidNetwork(String),
    /// A path prefix that does not start with `/` or contains `..`.
    #[error("invalid path prefix {0:?}: it must start with '/' and have no '.' or '..' segments")]
    InvalidPathPrefix(String),
    /// A bound that must be positive.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A quota that does not parse or is zero.
    #[error("invalid quota {0:?}: expected COUNT/UNIT such as 60/min, 10/s, 1000/hour, 5000/day, optionally ;burst=N, all above zero")]
    InvalidQuota(String),
    /// A realm or other value that must be a valid header value.
    #[error("invalid {0}: it must be visible ASCII without quotes or backslashes")]
    InvalidValue(&'static str),
    /// Two settings that contradict each other.
    #[error("conflicting settings: {0}")]
    Conflict(&'static str),
}
