use std::future::Future;
use std::hash::Hash;

use super::{Decision, Quota};
use crate::error::BoxError;

/// Where buckets live. The in-memory store ([`MemoryLimiter`](super::MemoryLimiter))
/// answers at once; a network store (Redis) returns a future, and the layers await it
/// without any change.
///
/// `check` charges `cost` tokens to every window of `key`'s bucket if every window can
/// take them, and charges nothing otherwise.
pub trait LimiterStore<K>: Send + Sync + 'static {
    /// The backend's error: the layers answer 503 `auth_unavailable`.
    type Error: Into<BoxError>;
    /// The future of one decision.
    type Future: Future<Output = Result<Decision, Self::Error>> + Send + 'static;

    /// Decides a request. `quotas` is not empty.
    fn check(&self, key: &K, quotas: &[Quota], cost: u32) -> Self::Future;

    /// Decides at once when the store can (an in-memory store always can), so the layers
    /// skip the asynchronous path. The default never does.
    fn check_ready(
        &self,
        key: &K,
        quotas: &[Quota],
        cost: u32,
    ) -> Option<Result<Decision, Self::Error>> {
        let _ = (key, quotas, cost);
        None
    }

    /// Gives back `cost` tokens charged earlier to every window (best effort), when a
    /// request admitted here is refused further in. The default does nothing.
    fn refund(&self, key: &K, quotas: &[Quota], cost: u32) {
        let _ = (key, quotas, cost);
    }
}

/// What a bucket can be keyed by: cheap to hash, compare and clone.
pub trait BucketKey: Hash + Eq + Clone + Send + Sync + 'static {}

impl<T: Hash + Eq + Clone + Send + Sync + 'static> BucketKey for T {}
