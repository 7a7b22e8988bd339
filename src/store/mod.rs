//! Where keys live. [`MemoryStore`] keeps them in the process: the quickstart's store, and
//! the fastest [`KeyLookup`](crate::lookup::KeyLookup) there is.

mod memory;

pub use memory::MemoryStore;

/// A store that cannot answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A thread panicked while holding the store's lock.
    #[error("the in-memory store's lock is poisoned")]
    Poisoned,
    /// A bad setting or the OS random source failing.
    #[error(transparent)]
    Config(#[from] crate::error::ConfigError),
}
