//! Where keys live: the [`KeyStore`] trait (keys), its [`OwnerStore`] sub-trait (owners)
//! and that one's [`ClientStore`] sub-trait (OAuth2 clients), and [`MemoryStore`], which keeps both in the process (the fastest
//! [`KeyLookup`] there is); `SqlStore` keeps them in SQLite or PostgreSQL.
//!
//! Many instances: every write names the keys it affects, and two bridges carry those
//! changes to the other instances' caches. On PostgreSQL, `SqlStore` sends `NOTIFY` in the
//! write's own transaction and `SqlStore::listen` receives it: exact (sent if and only if
//! the write commits). For any store, `RedisChanges` (feature `redis`) publishes on a Redis
//! channel after the commit: best effort, a missed change bounded by the cache TTL. Both
//! empty the caches ([`Change::All`], a cold cache for a
//! moment) when their subscription is lost, and again when it is back.
//!
//! Every lifecycle write is recorded in the store's [audit trail](AuditEvent) in the write's own
//! transaction: see [`KeyStore::acting`] and [`KeyStore::audit`].
//!
//! A store knows keys only by their [`KeyHash`](crate::key::KeyHash): the secret is returned
//! once, by [`KeyStore::create`] and [`KeyStore::rotate`], and never again.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use keygate::store::{KeyStore, MemoryStore, NewKey, OwnerStore};
//! use keygate::key::Environment;
//!
//! let store = MemoryStore::new();
//! store.add_owner("ada", Some("correct horse")).await?;
//! let created = store.create(NewKey::new("ada", "ci", Environment::Test)).await?;
//! println!("KEY={}", created.secret.expose_secret()); // the only time it is shown
//! assert_eq!(store.get(&created.record.id).await?.name, "ci");
//! # Ok::<_, keygate::store::StoreError>(())
//! # }).unwrap();
//! ```

mod audit;
#[cfg(feature = "redis")]
mod broadcast;
mod client;
mod memory;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod notify;
mod password;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
mod wire;

pub use audit::{
    Actor, AuditAction, AuditEvent, AuditQuery, UnknownAction, DEFAULT_AUDIT_LIMIT, MAX_ACTOR_LEN,
    MAX_AUDIT_LIMIT,
};
#[cfg(feature = "redis")]
pub use broadcast::{RedisChanges, RedisChangesBuilder};
pub use client::{ClientStore, CreatedClient, NewClient, OAuthClient, TOKEN_USE_CASE};
pub use memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use notify::Listening;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql::{SqlStore, SqlStoreBuilder};

use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::key::Environment;
use crate::key::{ApiKey, KeyId};
use crate::lookup::{Change, ChangeFeed, ChangeListener, KeyLookup};
use crate::quota::Quota;
use crate::record::{KeyRecord, Owner, Restrictions, Scopes, Status};

/// Why a store refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A thread panicked while holding the store's lock.
    #[error("the in-memory store's lock is poisoned")]
    Poisoned,
    /// The OS random source failed (a new secret or id could not be made).
    #[error(transparent)]
    Random(#[from] crate::key::RandomError),
    /// No key with this id (or it is deleted).
    #[error("no key with id {0}")]
    KeyNotFound(KeyId),
    /// No owner with this name.
    #[error("no owner named {0:?}")]
    OwnerNotFound(String),
    /// No OAuth2 client with this id.
    #[error("no client with id {0:?}")]
    ClientNotFound(String),
    /// An owner with this name exists already.
    #[error("an owner named {0:?} exists already")]
    OwnerExists(String),
    /// The username or password is wrong (which one is never said).
    #[error("invalid credentials")]
    InvalidCredentials,
    /// An attempt to change a field that is fixed at creation.
    #[error("{0} is immutable: it is fixed when the key is created")]
    Immutable(&'static str),
    /// The key changed under this operation (two rotations racing): retry.
    #[error("the key was changed concurrently; retry")]
    Conflict,
    /// The operation does not apply to the key in its state (enabling a revoked key).
    #[error("the key is {0}: {1}")]
    InvalidState(&'static str, &'static str),
    /// Input that cannot be stored: an empty name, a quota list too long…
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The database failed; its own error is the [`source`](std::error::Error::source).
    #[error("store backend: {0}")]
    Backend(BackendError),
}

/// What failed in a store's backend, with the driver's error as its source.
#[derive(Debug, Clone)]
pub struct BackendError {
    context: std::borrow::Cow<'static, str>,
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    /// `context` ("cannot open the database"), caused by `source`.
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub(crate) fn caused(
        context: impl Into<std::borrow::Cow<'static, str>>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            context: context.into(),
            source: Some(std::sync::Arc::new(source)),
        }
    }

    /// A failure found by the store itself (a corrupt record).
    pub(crate) fn plain(context: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self {
            context: context.into(),
            source: None,
        }
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.context),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Two backend errors are equal when they say the same.
impl PartialEq for BackendError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for BackendError {}

impl StoreError {
    /// A deleted key: kept for audit (`get` and `list` show it), never changed again.
    pub(crate) const DELETED: Self = Self::InvalidState(
        "deleted",
        "a deleted key is kept for audit and cannot be changed",
    );

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// What [`KeyStore::create`] needs. Start from [`NewKey::new`] and set the public fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NewKey {
    /// The owner's name; the owner must exist.
    pub owner: String,
    /// A name, not empty.
    pub name: String,
    /// A description.
    pub description: String,
    /// The use case (immutable once created).
    pub use_case: String,
    /// Live or test (immutable).
    pub environment: Environment,
    /// Scopes.
    pub scopes: Scopes,
    /// IP and site allowlists.
    pub restrictions: Restrictions,
    /// Rate-limit windows (empty: the layer's default; at most 8).
    pub quotas: Vec<Quota>,
    /// When the key expires (immutable).
    pub expires_at: Option<SystemTime>,
    /// Free-form data.
    pub metadata: serde_json::Value,
    /// The key whose rate-limit bucket this one shares (immutable): an OAuth2 access token
    /// names its client (`KeyId::new(client id)`). A key naming a revoked client is refused
    /// ([`StoreError::InvalidState`]), so that no token outlives its client's revocation.
    pub rate_bucket: Option<KeyId>,
}

impl NewKey {
    /// A key for `owner` named `name`, with nothing else set.
    pub fn new(
        owner: impl Into<String>,
        name: impl Into<String>,
        environment: Environment,
    ) -> Self {
        Self {
            owner: owner.into(),
            name: name.into(),
            description: String::new(),
            use_case: String::new(),
            environment,
            scopes: Scopes::none(),
            restrictions: Restrictions::default(),
            quotas: Vec::new(),
            expires_at: None,
            metadata: serde_json::Value::Null,
            rate_bucket: None,
        }
    }

    pub(crate) fn check(&self) -> Result<(), StoreError> {
        check_name(&self.name)?;
        if let Some(bucket) = &self.rate_bucket {
            check_word("rate bucket", bucket.as_str())?;
        }
        check_text("description", &self.description, true)?;
        check_text("use case", &self.use_case, false)?;
        check_scopes(&self.scopes)?;
        check_restrictions(&self.restrictions)?;
        check_quotas(&self.quotas)
    }
}

/// The longest name, scope or site a store takes, in bytes.
const MAX_WORD: usize = 128;
/// The longest free text (a description) a store takes, in bytes.
const MAX_TEXT: usize = 4096;

fn check_name(name: &str) -> Result<(), StoreError> {
    if name.trim().is_empty() {
        return Err(StoreError::invalid("name", "it must not be empty"));
    }
    check_text("name", name, false)
}

/// Free text: bounded, and no control characters (a newline only where `lines` allows it),
/// so that nothing a key's owner writes can forge lines or escape sequences wherever the
/// record is shown (keyctl, logs, a dashboard).
fn check_text(field: &'static str, text: &str, lines: bool) -> Result<(), StoreError> {
    let most = if lines { MAX_TEXT } else { MAX_WORD * 2 };
    if text.len() > most {
        return Err(StoreError::invalid(field, format!("at most {most} bytes")));
    }
    if text
        .chars()
        .any(|c| c.is_control() && !(lines && (c == '\n' || c == '\t')))
    {
        return Err(StoreError::invalid(
            field,
            "control characters are not allowed",
        ));
    }
    Ok(())
}

/// A scope or a site: one word of visible ASCII.
pub(crate) fn check_word(field: &'static str, word: &str) -> Result<(), StoreError> {
    if word.is_empty() || word.len() > MAX_WORD {
        return Err(StoreError::invalid(
            field,
            format!("1 to {MAX_WORD} bytes each"),
        ));
    }
    if !word.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(StoreError::invalid(
            field,
            "visible ASCII only, no spaces or commas",
        ));
    }
    Ok(())
}

fn check_scopes(scopes: &Scopes) -> Result<(), StoreError> {
    scopes.iter().try_for_each(|s| check_word("scope", s))
}

fn check_restrictions(restrictions: &Restrictions) -> Result<(), StoreError> {
    restrictions
        .sites
        .iter()
        .try_for_each(|s| check_word("site", s))
}

fn check_quotas(quotas: &[Quota]) -> Result<(), StoreError> {
    if quotas.len() > crate::quota::MAX_WINDOWS {
        return Err(StoreError::invalid(
            "quotas",
            format!("at most {} windows", crate::quota::MAX_WINDOWS),
        ));
    }
    Ok(())
}

/// A change to a key's mutable fields; `None` leaves a field as it is. Setting an
/// immutable field (use case, environment, expiry) is refused with
/// [`StoreError::Immutable`], never ignored.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct KeyUpdate {
    /// New name (not empty).
    pub name: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New scopes.
    pub scopes: Option<Scopes>,
    /// New restrictions.
    pub restrictions: Option<Restrictions>,
    /// New rate-limit windows.
    pub quotas: Option<Vec<Quota>>,
    /// New metadata.
    pub metadata: Option<serde_json::Value>,
    /// Immutable: any value is refused.
    pub use_case: Option<String>,
    /// Immutable: any value is refused.
    pub environment: Option<Environment>,
    /// Immutable: any value is refused.
    pub expires_at: Option<Option<SystemTime>>,
}

impl KeyUpdate {
    /// Refuses immutable fields and bad values before anything is written.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        if self.use_case.is_some() {
            return Err(StoreError::Immutable("use case"));
        }
        if self.environment.is_some() {
            return Err(StoreError::Immutable("environment"));
        }
        if self.expires_at.is_some() {
            return Err(StoreError::Immutable("expiry"));
        }
        if let Some(name) = &self.name {
            check_name(name)?;
        }
        if let Some(description) = &self.description {
            check_text("description", description, true)?;
        }
        if let Some(scopes) = &self.scopes {
            check_scopes(scopes)?;
        }
        if let Some(restrictions) = &self.restrictions {
            check_restrictions(restrictions)?;
        }
        if let Some(quotas) = &self.quotas {
            check_quotas(quotas)?;
        }
        Ok(())
    }

    /// Applies the change; a deleted key cannot be changed.
    pub(crate) fn apply(self, record: &mut KeyRecord) -> Result<(), StoreError> {
        if record.status == Status::Deleted {
            return Err(StoreError::DELETED);
        }
        if let Some(name) = self.name {
            record.name = name;
        }
        if let Some(description) = self.description {
            record.description = description;
        }
        if let Some(scopes) = self.scopes {
            record.scopes = scopes;
        }
        if let Some(restrictions) = self.restrictions {
            record.restrictions = restrictions;
        }
        if let Some(quotas) = self.quotas {
            record.quotas = quotas;
        }
        if let Some(metadata) = self.metadata {
            record.metadata = metadata;
        }
        Ok(())
    }
}

/// A key just made: its record, and its secret (shown once).
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The record as stored.
    pub record: KeyRecord,
    /// The secret. Show it to its owner once; it cannot be read back.
    pub secret: ApiKey,
}

/// A page of [`KeyStore::list`]: keys after `after` (by id), at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Start after this key id (`None`: from the first).
    pub after: Option<KeyId>,
    /// The most keys returned (0 means 100).
    pub limit: usize,
}

/// Managing keys. Every implementation runs the same conformance suite
/// (`tests/conformance/`); owners are managed through [`OwnerStore`].
///
/// A store is also a [`KeyLookup`] (the layers read keys through it) and a [`ChangeFeed`]:
/// every write names the key hashes it affects, so that a
/// [`CachedLookup::over_store`](crate::lookup::CachedLookup::over_store) in this process
/// drops them at once. Another process sees a change once its cache entry expires (the
/// cache TTL, 30 s by default), or at once through a bridge that
/// [announces](ChangeFeed::announce) it: `SqlStore::listen` on PostgreSQL, `RedisChanges`
/// (feature `redis`) for any store. The records a store hands out carry its
/// [`UsageSink`](crate::record::UsageSink), through which accepted requests record the
/// key's last use.
pub trait KeyStore: KeyLookup + ChangeFeed + Clone {
    /// Creates a key and returns its secret, the only time it is seen.
    fn create(&self, new: NewKey) -> impl Future<Output = Result<CreatedKey, StoreError>> + Send;

    /// One key by id (deleted keys too: the record stays for audit).
    fn get(&self, id: &KeyId) -> impl Future<Output = Result<KeyRecord, StoreError>> + Send;

    /// An owner's keys, by id, a page at a time.
    fn list(
        &self,
        owner: &str,
        page: Page,
    ) -> impl Future<Output = Result<Vec<KeyRecord>, StoreError>> + Send;

    /// Changes the mutable fields.
    fn update(
        &self,
        id: &KeyId,
        update: KeyUpdate,
    ) -> impl Future<Output = Result<KeyRecord, StoreError>> + Send;

    /// Disables, enables or soft-deletes a key. A deleted or revoked key stays so.
    fn set_status(
        &self,
        id: &KeyId,
        status: Status,
    ) -> impl Future<Output = Result<KeyRecord, StoreError>> + Send;

    /// A report that `id`'s secret was found in public (a secret-scanning alert): in one
    /// transaction, the key is revoked unless it is revoked or deleted already, and the report
    /// is recorded as an audit event [`AuditAction::LeakReported`] (`old_status`/`new_status`:
    /// the status before and after; the actor is the handle's actor, as for every write),
    /// plus the usual `Revoked` event when it revoked it. Caches are told when the status
    /// changed, as [`set_status`](KeyStore::set_status) does. Returns the record after, and
    /// whether this report revoked it.
    ///
    /// A deleted key's report is recorded too (`LeakReported`, deleted before and after) and
    /// nothing else changes; nor does anything but the trail for a key revoked already.
    ///
    /// # Errors
    ///
    /// [`StoreError::KeyNotFound`] for an unknown id.
    fn report_leak(
        &self,
        id: &KeyId,
    ) -> impl Future<Output = Result<(KeyRecord, bool), StoreError>> + Send;

    /// A new secret at once; the old one keeps working for `grace` (never past the key's own
    /// expiry).
    ///
    /// The grace applies to every earlier secret still working, not only the last one:
    /// each ends at the earlier of its own end and now + `grace`. So rotating with a zero
    /// grace ends every earlier secret at once (what a leaked key calls for), even one
    /// still in the grace of an earlier rotation, and no rotation ever extends a grace.
    ///
    /// With `expected` set to the [`version`](KeyRecord::version) the caller last read, the
    /// rotation happens only if the key has not changed since: of two rotations racing from
    /// one read, one wins and the other gets [`StoreError::Conflict`], so no caller is handed
    /// a secret that a concurrent rotation has already replaced. Without it, the rotation
    /// still commits atomically against the version it read itself.
    fn rotate(
        &self,
        id: &KeyId,
        grace: Duration,
        expected: Option<u64>,
    ) -> impl Future<Output = Result<CreatedKey, StoreError>> + Send;

    /// Revokes every key of an owner; returns how many. Audit: one `Revoked` per key.
    fn revoke_all(&self, owner: &str) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Revokes every key of `new.owner` not yet revoked or deleted and creates `new`, in one
    /// transaction (what `POST /auth/createkey` does). Concurrent calls for one owner
    /// serialize, so after any number of them exactly one of the owner's keys works: the
    /// last one made. The caches are told of every revoked key. Audit: one `Revoked` per
    /// revoked key and one `Created`.
    ///
    /// # Errors
    ///
    /// As [`create`](KeyStore::create): [`StoreError::OwnerNotFound`],
    /// [`StoreError::Invalid`]…; on any error nothing is revoked.
    fn replace_keys(
        &self,
        new: NewKey,
    ) -> impl Future<Output = Result<CreatedKey, StoreError>> + Send;

    /// A handle on the same store (sharing everything: data, caches' listeners, usage)
    /// whose writes are recorded in the audit trail as made by `actor`. A handle never
    /// given one records [`Actor::system`] (`"system"`, no IP address).
    #[must_use]
    fn acting(&self, actor: Actor) -> Self;

    /// Audit events, newest first (by id, descending): those of `query.owner` and/or
    /// `query.key` when set, with ids below `query.before` when set, at most
    /// `query.limit` (0: 100; never more than 1000). An unknown owner or key has no events
    /// (an empty list, not an error).
    fn audit(
        &self,
        query: AuditQuery,
    ) -> impl Future<Output = Result<Vec<AuditEvent>, StoreError>> + Send;

    /// Writes the last uses reported so far and not yet written (the store batches them off
    /// the request path): call it before shutting down, or in a test before reading
    /// [`last_used_at`](KeyRecord::last_used_at) back.
    fn flush_usage(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// An owner, and the version of its credentials: bumped whenever its password is set or it
/// is disabled, so that whatever was granted on the strength of the earlier credentials (a
/// key service session) can be refused from then on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Standing {
    /// The owner.
    pub owner: Owner,
    /// Bumped by [`OwnerStore::set_owner_password`] and by disabling the owner.
    pub credentials: u64,
}

/// The owners keys belong to: an ability of the stores that keep them (both stores here),
/// apart from the keys themselves.
pub trait OwnerStore: KeyStore {
    /// Adds an owner, with an optional password (hashed with argon2id).
    fn add_owner(
        &self,
        name: &str,
        password: Option<&str>,
    ) -> impl Future<Output = Result<Owner, StoreError>> + Send;

    /// Checks an owner's credentials in constant time; an unknown name and a wrong password
    /// take the same time and give the same [`StoreError::InvalidCredentials`].
    fn verify_owner(
        &self,
        name: &str,
        password: &str,
    ) -> impl Future<Output = Result<Owner, StoreError>> + Send;

    /// Enables or disables an owner (every key of a disabled owner fails with
    /// `owner_inactive`).
    fn set_owner_active(
        &self,
        name: &str,
        active: bool,
    ) -> impl Future<Output = Result<Owner, StoreError>> + Send;

    /// One owner by name.
    ///
    /// # Errors
    ///
    /// [`StoreError::OwnerNotFound`] for an unknown name.
    fn owner(&self, name: &str) -> impl Future<Output = Result<Owner, StoreError>> + Send;

    /// Sets an owner's password (hashed with argon2id, as [`add_owner`](Self::add_owner)
    /// does), or clears it with `None` (the owner can no longer log in). The old password
    /// stops working at once. Audit: `PasswordSet` (never the password).
    ///
    /// # Errors
    ///
    /// [`StoreError::OwnerNotFound`] for an unknown name.
    fn set_owner_password(
        &self,
        name: &str,
        password: Option<&str>,
    ) -> impl Future<Output = Result<Owner, StoreError>> + Send;

    /// The owner and the version of its credentials ([`Standing`]).
    fn standing(&self, name: &str) -> impl Future<Output = Result<Standing, StoreError>> + Send;
}

/// The listeners of one store (shared by its clones). A listener whose cache is gone is
/// dropped at the next change, so that building caches over one store never grows it.
#[derive(Default)]
pub(crate) struct Listeners(std::sync::RwLock<Vec<ChangeListener>>);

impl Listeners {
    pub(crate) fn add(&self, listener: ChangeListener) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(listener);
    }

    /// Tells every listener that these hashes' answers may have changed through a write
    /// in this process.
    pub(crate) fn notify(&self, hashes: &[crate::key::KeyHash]) {
        self.tell(hashes.iter().map(Change::Local));
    }

    /// Tells every listener of one change (announced by a bridge).
    pub(crate) fn announce(&self, change: Change<'_>) {
        self.tell(std::iter::once(change));
    }

    fn tell<'a>(&self, changes: impl Iterator<Item = Change<'a>> + Clone) {
        let mut listeners = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        listeners.retain(|listener| {
            // Every change is told, even after a `false`: answers are cheap, and a listener
            // that is gone says so for each.
            changes
                .clone()
                .fold(true, |still, change| listener(change) & still)
        });
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// The status a key moves to, or why it cannot: deleted keys are never changed again,
/// revoked keys never come back.
pub(crate) fn transition(record: &KeyRecord, to: Status) -> Result<Status, StoreError> {
    match (record.status, to) {
        (Status::Deleted, _) => Err(StoreError::DELETED),
        (Status::Revoked, Status::Active | Status::Disabled) => Err(StoreError::InvalidState(
            "revoked",
            "a revoked key cannot come back",
        )),
        _ => Ok(to),
    }
}

/// A leak report's change to a key ([`KeyStore::report_leak`]): revoked unless it is revoked
/// or deleted already. Whether it revoked it.
pub(crate) fn revoke_leaked(record: &mut KeyRecord) -> bool {
    match record.status {
        Status::Revoked | Status::Deleted => false,
        Status::Active | Status::Disabled => {
            record.status = Status::Revoked;
            true
        }
    }
}

/// A leak report's audit events: `LeakReported` with the status before and after, and
/// `Revoked` when the report revoked the key.
pub(crate) fn leak_entries(owner: &str, before: Status, after: &KeyRecord) -> Vec<audit::Entry> {
    let mut entries = vec![audit::Entry::status(
        owner,
        &after.id,
        AuditAction::LeakReported,
        Some(before),
        after.status,
    )];
    if before != after.status {
        let action = AuditAction::of_status(after.status);
        entries.push(audit::Entry::status(
            owner,
            &after.id,
            action,
            Some(before),
            after.status,
        ));
    }
    entries
}

/// Whether a key in this state can be given a new secret.
pub(crate) fn rotatable(record: &KeyRecord) -> Result<(), StoreError> {
    match record.status {
        Status::Active | Status::Disabled => Ok(()),
        Status::Deleted => Err(StoreError::DELETED),
        Status::Revoked => Err(StoreError::InvalidState(
            "revoked",
            "a revoked key cannot be given a new secret",
        )),
    }
}

/// The owner, if the password matches and the owner is active. The same argon2 work is
/// done whether or not the owner exists, and every failure reads the same.
pub(crate) async fn check_credentials(
    owner: Option<Owner>,
    stored: Option<String>,
    password: &str,
) -> Result<Owner, StoreError> {
    let ok = password::verify_off_thread(password, stored).await;
    match owner {
        Some(owner) if ok && owner.active => Ok(owner),
        _ => Err(StoreError::InvalidCredentials),
    }
}

/// A new owner's id, and its password hashed (argon2id), after checking the name.
pub(crate) async fn new_owner(
    name: &str,
    password: Option<&str>,
) -> Result<(Owner, Option<String>), StoreError> {
    if name.trim().is_empty() {
        return Err(StoreError::invalid("owner name", "it must not be empty"));
    }
    check_text("owner name", name, false)?;
    let password = password::hash_off_thread(password).await?;
    let id = KeyId::generate()?.as_str().replacen("key_", "own_", 1);
    Ok((Owner::new(id, name), password))
}
