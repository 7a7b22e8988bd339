//! Finding a key's record: the async [`KeyLookup`] trait, and [`CachedLookup`] in front of
//! any implementation.
//!
//! A lookup gets only the [`KeyHash`]; it never sees the secret. Implement it on a struct
//! over your database client:
//!
//! ```
//! use std::future::Future;
//! use std::pin::Pin;
//! use std::sync::Arc;
//! use keygate::key::KeyHash;
//! use keygate::lookup::{KeyLookup};
//! use keygate::error::{BoxError};
//! use keygate::record::KeyRecord;
//!
//! #[derive(Clone)]
//! struct Db { /* a pool */ }
//!
//! impl Db {
//!     async fn find(&self, hash: KeyHash) -> Result<Option<KeyRecord>, BoxError> {
//!         let _ = hash; // SELECT … WHERE key_hash = $1
//!         Ok(None)
//!     }
//! }
//!
//! impl KeyLookup for Db {
//!     type Error = BoxError;
//!     type Future = Pin<Box<dyn Future<Output = Result<Option<Arc<KeyRecord>>, BoxError>> + Send>>;
//!
//!     fn lookup(&self, hash: &KeyHash) -> Self::Future {
//!         let db = self.clone();
//!         let hash = *hash;
//!         Box::pin(async move { Ok(db.find(hash).await?.map(Arc::new)) })
//!     }
//! }
//! ```
//!
//! or pass a closure:
//!
//! ```
//! use std::sync::Arc;
//! use keygate::key::KeyHash;
//! use keygate::lookup::{KeyLookup};
//! use keygate::error::{BoxError};
//! use keygate::record::KeyRecord;
//!
//! let lookup = |hash: KeyHash| async move {
//!     let _ = hash;
//!     Ok::<Option<Arc<KeyRecord>>, BoxError>(None)
//! };
//! # fn takes(_: impl KeyLookup) {}
//! # takes(lookup);
//! ```

mod cache;

pub use cache::{CachedFuture, CachedLookup, CachedLookupBuilder};

use std::future::Future;
use std::sync::Arc;

use crate::error::BoxError;
use crate::key::KeyHash;
use crate::record::KeyRecord;

/// What a lookup answers: the record, `None` for an unknown key, or a backend error (which
/// the layers turn into 503 `auth_unavailable`, never into a 401).
pub type LookupResult<E> = Result<Option<Arc<KeyRecord>>, E>;

/// Finds a key's record by its hash.
///
/// Shared by every clone of a layer; implementations hold their own `Arc`s so that the
/// futures they return are `'static`.
pub trait KeyLookup: Send + Sync + 'static {
    /// The backend's error.
    type Error: Into<BoxError>;
    /// The future of one lookup.
    type Future: Future<Output = LookupResult<Self::Error>> + Send + 'static;

    /// Looks a key up.
    fn lookup(&self, hash: &KeyHash) -> Self::Future;

    /// Answers at once when the answer is at hand (an in-memory store, a cache hit), so that
    /// the layer can skip the asynchronous path altogether. The default never does.
    fn lookup_ready(&self, hash: &KeyHash) -> Option<LookupResult<Self::Error>> {
        let _ = hash;
        None
    }

    /// Told of every request a key was accepted for, so that a store can keep
    /// `last_used_at`. Called on the request path: implementations must return at once
    /// (throttle, then write in the background). The default does nothing.
    fn touch(&self, record: &KeyRecord, now: std::time::SystemTime) {
        let _ = (record, now);
    }
}

/// Decides, cheaply and in bounded memory, when a key's last use is due to be written again
/// (at most once per [`LAST_USED_RESOLUTION`](crate::store::LAST_USED_RESOLUTION)).
pub(crate) struct UseThrottle {
    written: quick_cache::sync::Cache<crate::key::KeyId, u64>,
}

impl UseThrottle {
    pub(crate) fn new() -> Self {
        Self {
            written: quick_cache::sync::Cache::new(100_000),
        }
    }

    /// Whether to write now; if so, remembers that it was.
    pub(crate) fn due(&self, record: &KeyRecord, now: std::time::SystemTime) -> bool {
        let resolution = crate::store::LAST_USED_RESOLUTION;
        // The record itself may already say it was used lately.
        let recent = |at: std::time::SystemTime| {
            now.duration_since(at).is_ok_and(|since| since < resolution)
        };
        if record.last_used_at.is_some_and(recent) {
            return false;
        }
        let now_ns = crate::clock::nanos_since_epoch(now);
        let window = u64::try_from(resolution.as_nanos()).unwrap_or(u64::MAX);
        if let Some(last) = self.written.get(&record.id) {
            if now_ns.saturating_sub(last) < window && now_ns >= last {
                return false;
            }
        }
        self.written.insert(record.id.clone(), now_ns);
        true
    }
}

impl<F, Fut, E> KeyLookup for F
where
    F: Fn(KeyHash) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = LookupResult<E>> + Send + 'static,
    E: Into<BoxError>,
{
    type Error = E;
    type Future = Fut;

    fn lookup(&self, hash: &KeyHash) -> Fut {
        self(*hash)
    }
}

/// A lookup that did not finish in time.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the key lookup timed out")]
pub struct LookupTimeout;
