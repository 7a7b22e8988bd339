//! Finding a key's record: the async [`KeyLookup`] trait, and [`CachedLookup`] in front of
//! any implementation.
//!
//! A lookup gets the [`PresentedKey`], and asks it for the [`KeyHash`] to look up: it never
//! sees the secret. Implement it on a struct over your database client:
//!
//! ```
//! use std::future::Future;
//! use std::pin::Pin;
//! use std::sync::Arc;
//! use keygate::answer::Answer;
//! use keygate::error::BoxError;
//! use keygate::key::{KeyHash, PresentedKey};
//! use keygate::lookup::KeyLookup;
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
//!     fn lookup(&self, key: &PresentedKey<'_>) -> Answer<Result<Option<Arc<KeyRecord>>, BoxError>, Self::Future> {
//!         let db = self.clone();
//!         let hash = *key.hash();
//!         Answer::Later(Box::pin(async move { Ok(db.find(hash).await?.map(Arc::new)) }))
//!     }
//! }
//! ```
//!
//! or pass a closure:
//!
//! ```
//! use std::sync::Arc;
//! use keygate::error::BoxError;
//! use keygate::key::KeyHash;
//! use keygate::lookup::KeyLookup;
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

use crate::answer::Answer;
use crate::error::BoxError;
use crate::key::{KeyHash, PresentedKey};
use crate::record::KeyRecord;

/// What a lookup answers: the record, `None` for an unknown key, or a backend error (which
/// the layers turn into 503 `auth_unavailable`, never into a 401).
pub type LookupResult<E> = Result<Option<Arc<KeyRecord>>, E>;

/// Finds a key's record by its hash: at once when the answer is at hand (an in-memory
/// store, a cache hit), as a future otherwise. One method serves both; the layers take the
/// answer at hand without boxing or polling anything.
///
/// Shared by every clone of a layer; implementations hold their own `Arc`s so that the
/// futures they return are `'static`.
pub trait KeyLookup: Send + Sync + 'static {
    /// The backend's error.
    type Error: Into<BoxError> + Send;
    /// The future of a lookup that cannot answer at once.
    type Future: Future<Output = LookupResult<Self::Error>> + Send + 'static;

    /// Looks a key up.
    ///
    /// A future returned here must do nothing until it is polled (as `async` blocks and
    /// database clients' futures do): the auth layer may drop it unpolled, when the
    /// failed-attempt limiter turns the client away, and a lookup that has started by then
    /// has reached the store all the same.
    fn lookup(&self, key: &PresentedKey<'_>) -> Answer<LookupResult<Self::Error>, Self::Future>;
}

impl<F, Fut, E> KeyLookup for F
where
    F: Fn(KeyHash) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = LookupResult<E>> + Send + 'static,
    E: Into<BoxError> + Send,
{
    type Error = E;
    type Future = Fut;

    fn lookup(&self, key: &PresentedKey<'_>) -> Answer<LookupResult<E>, Fut> {
        Answer::Later(self(*key.hash()))
    }
}

/// What a [`ChangeFeed`] tells its listeners: a key whose lookup answer may have changed,
/// and where the news came from, or that any answer may have.
///
/// Caches treat [`Local`](Change::Local) and [`Remote`](Change::Remote) alike (they drop
/// the key); the origin is for bridges, which pass on what this process wrote and nothing
/// they were told, so that two instances never echo a change back and forth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change<'a> {
    /// A write through this process (this store or one of its clones) affected the key.
    Local(&'a KeyHash),
    /// Another instance reported that the key was affected: through PostgreSQL's `NOTIFY`
    /// (`SqlStore::listen`, feature `postgres`) or a Redis channel
    /// (`RedisChanges`, feature `redis`).
    Remote(&'a KeyHash),
    /// Changes may have been missed (a lost subscription): every answer may be stale. A
    /// cache told this empties itself, so for a moment every request reads the backend (a
    /// cold cache) rather than any request trusting an answer that may be out of date.
    All,
}

/// Told of every change that may affect lookup answers. See [`ChangeFeed`]. It answers
/// whether it still listens: `false` once what it served is gone (a dropped cache), and the
/// feed forgets it.
pub type ChangeListener = Arc<dyn Fn(Change<'_>) -> bool + Send + Sync>;

/// A backend that can tell which keys' answers changed: the stores, whose every write names
/// the hashes it affects. [`CachedLookup::over_store`] subscribes, so that the cache drops
/// those keys at once.
///
/// A feed tells its listeners of the writes made through it in this process
/// ([`Change::Local`]); what other instances change reaches it through a bridge that calls
/// [`announce`](ChangeFeed::announce): PostgreSQL's `LISTEN`
/// (`SqlStore::listen`, feature `postgres`), or a Redis channel for any store
/// (`RedisChanges`, feature `redis`).
pub trait ChangeFeed {
    /// Registers a listener, told in this process of every change made through this
    /// backend or its clones, and of every change [announced](ChangeFeed::announce) to it.
    fn subscribe(&self, listener: ChangeListener);

    /// Tells this feed's listeners of a change: how a bridge hands on what another instance
    /// reported ([`Change::Remote`]), or that some changes may have been missed
    /// ([`Change::All`]).
    fn announce(&self, change: Change<'_>);
}
