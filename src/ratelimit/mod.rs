//! Per-key rate limiting: token buckets ([`Quota`]) in a [`LimiterStore`], reported in
//! `X-RateLimit-*` (or IETF `RateLimit`) headers.
//!
//! - A key's windows come from its record ([`KeyRecord::quotas`](crate::record::KeyRecord::quotas)),
//!   else from the layer's default; every window must admit a request, and a refused
//!   request takes nothing from any window.
//! - Buckets exist only for authenticated keys: unknown or invalid keys never reach the
//!   limiter, so a flood of made-up keys allocates nothing here.
//! - 429 `rate_limited` goes through the configured renderer with `data` holding `limit`,
//!   `remaining`, `reset` and `retry_after`, and a `Retry-After` header; gRPC requests get
//!   `RESOURCE_EXHAUSTED`.
//!
//! [`RateLimitLayer`] also works on its own, keyed by any function of the request (client
//! IP, a header), for apps without keys.

mod decision;
mod future;
mod gcra;
mod headers;
mod key_fn;
mod layer;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod shared;
mod store;

pub use decision::Decision;
pub use future::RateLimitFuture;
pub use headers::HeaderStyle;
pub use key_fn::{KeyFn, PerKey};
pub use layer::{RateLimitBuilder, RateLimitLayer};
pub(crate) use memory::DEFAULT_MAX_BUCKETS;
pub use memory::{LimiterError, MemoryLimiter, MemoryLimiterBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{
    FailurePolicy, RedisBucketKey, RedisLimiter, RedisLimiterBuildError, RedisLimiterBuilder,
    RedisLimiterError, RedisLimiterStats,
};
pub use service::RateLimitService;
pub use store::{BucketKey, LimiterStore};

pub use crate::quota::{Quota, MAX_WINDOWS};

#[cfg(test)]
mod tests;
