use std::future::Future;
use std::hash::Hash;

use super::decision::Decision;
use crate::answer::Answer;
use crate::error::BoxError;
use crate::quota::Quota;

/// Where buckets live. The in-memory store ([`MemoryLimiter`](super::MemoryLimiter))
/// answers at once ([`Answer::Now`]); a network store (Redis) answers later, and the layers
/// await it without any change.
pub trait LimiterStore<K>: Send + Sync + 'static {
    /// The backend's error: the layers answer 503 `auth_unavailable`.
    type Error: Into<BoxError> + Send;
    /// The future of a decision that cannot be taken at once.
    type Future: Future<Output = Result<Decision, Self::Error>> + Send + 'static;

    /// Decides a request: charges `cost` tokens to every window of `key`'s bucket if every
    /// window can take them, and charges nothing otherwise. `quotas` is not empty.
    fn check(
        &self,
        key: &K,
        quotas: &[Quota],
        cost: u32,
    ) -> Answer<Result<Decision, Self::Error>, Self::Future>;

    /// Gives back `cost` tokens charged earlier to every window (best effort), when a
    /// request admitted here is refused further in. The default does nothing.
    fn refund(&self, key: &K, quotas: &[Quota], cost: u32) {
        let _ = (key, quotas, cost);
    }
}

/// What a bucket can be keyed by: cheap to hash, compare and clone.
pub trait BucketKey: Hash + Eq + Clone + Send + Sync + 'static {}

impl<T: Hash + Eq + Clone + Send + Sync + 'static> BucketKey for T {}
