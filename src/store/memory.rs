use std::collections::HashMap;
use std::future::{ready, Ready};
use std::sync::{Arc, RwLock};

use super::StoreError;
use crate::key::{ApiKey, KeyFormat, KeyHash, KeyId};
use crate::lookup::{KeyLookup, LookupResult};
use crate::record::{Environment, KeyRecord, Owner};

/// Keys in memory, by hash. Clones share one map.
///
/// ```
/// use keygate::record::{Environment, Owner};
/// use keygate::store::MemoryStore;
///
/// let store = MemoryStore::new();
/// let key = store.issue(Owner::new("o1", "ada"), Environment::Live, |r| r.with_name("ci"))?;
/// // Shown once; the store keeps only its hash.
/// println!("KEY={}", key.expose_secret());
/// # Ok::<_, keygate::store::StoreError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    keys: Arc<RwLock<HashMap<KeyHash, Arc<KeyRecord>>>>,
    format: KeyFormat,
}

impl MemoryStore {
    /// An empty store issuing keys in the default format.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store issuing keys in `format`.
    pub fn with_format(format: KeyFormat) -> Self {
        Self {
            keys: Arc::default(),
            format,
        }
    }

    /// Generates a key for `owner`, stores its record (shaped by `edit`) under the key's
    /// hash, and returns the secret: the only time it is seen.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the random source fails or the lock is poisoned.
    pub fn issue(
        &self,
        owner: Owner,
        environment: Environment,
        edit: impl FnOnce(KeyRecord) -> KeyRecord,
    ) -> Result<ApiKey, StoreError> {
        let key = self.format.generate(environment)?;
        let record = edit(KeyRecord::new(KeyId::generate()?, owner, environment));
        self.insert(key.hash(), record)?;
        Ok(key)
    }

    /// Stores a record under a hash, replacing any earlier one.
    ///
    /// # Errors
    ///
    /// [`StoreError::Poisoned`] when the lock is poisoned.
    pub fn insert(&self, hash: KeyHash, record: KeyRecord) -> Result<(), StoreError> {
        self.keys
            .write()
            .map_err(|_| StoreError::Poisoned)?
            .insert(hash, Arc::new(record));
        Ok(())
    }

    /// Removes a key.
    ///
    /// # Errors
    ///
    /// [`StoreError::Poisoned`] when the lock is poisoned.
    pub fn remove(&self, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        Ok(self
            .keys
            .write()
            .map_err(|_| StoreError::Poisoned)?
            .remove(hash))
    }

    fn get(&self, hash: &KeyHash) -> LookupResult<StoreError> {
        Ok(self
            .keys
            .read()
            .map_err(|_| StoreError::Poisoned)?
            .get(hash)
            .cloned())
    }
}

impl KeyLookup for MemoryStore {
    type Error = StoreError;
    type Future = Ready<LookupResult<StoreError>>;

    fn lookup(&self, hash: &KeyHash) -> Self::Future {
        ready(self.get(hash))
    }

    fn lookup_ready(&self, hash: &KeyHash) -> Option<LookupResult<StoreError>> {
        Some(self.get(hash))
    }
}
