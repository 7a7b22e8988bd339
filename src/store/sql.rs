//! [`SqlStore`]: keys and owners in SQLite (feature `sqlite`) or PostgreSQL (feature
//! `postgres`), through sqlx with runtime queries, so building needs no database.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Connection as _, Row};

use super::audit::Entry;
use super::{
    Actor, AuditAction, AuditEvent, AuditQuery, BackendError, ClientStore, CreatedClient,
    CreatedKey, KeyStore, KeyUpdate, NewClient, NewKey, OAuthClient, OwnerStore, Page, StoreError,
};
use crate::answer::Answer;
use crate::clock::{nanos_since_epoch, Clock, SystemClock};
use crate::key::Environment;
use crate::key::{KeyFormat, KeyHash, KeyId, PresentedKey};
use crate::lookup::{Change, ChangeFeed, ChangeListener};
use crate::lookup::{KeyLookup, LookupResult};
use crate::record::{KeyRecord, Owner, Status};
use crate::record::{UsageSink, LAST_USED_RESOLUTION};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Keys and owners in a SQL database: SQLite (`sqlite://PATH`, created if missing, or
/// `sqlite::memory:`) or PostgreSQL (`postgres://…`).
///
/// Migrations are applied on connect; only key hashes are stored, in an indexed column.
/// The audit trail ([`KeyStore::audit`]) is the table `keygate_audit`, written in the
/// transaction of each write; nothing ever deletes from it (prune it yourself if you must).
/// Clones share one connection pool; two `SqlStore`s on one database see each other's
/// changes at once. A [`CachedLookup`](crate::lookup::CachedLookup) in another process
/// sees them after its TTL, or at once when it listens: on PostgreSQL every write sends
/// `NOTIFY` in its transaction, which [`listen`](SqlStore::listen) hands to the caches; on
/// any database, a Redis channel (`RedisChanges`, feature `redis`) can carry them.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    usage: Arc<SqlUsage>,
    backend: Backend,
    format: KeyFormat,
    clock: Arc<dyn Clock>,
    listeners: Arc<super::Listeners>,
    /// Whom this handle's writes are recorded as made by.
    actor: Arc<Actor>,
    /// The URL, for [`SqlStore::listen`] on PostgreSQL. Never printed: it may hold a
    /// password.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    url: Arc<str>,
}

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &self.backend)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Whose owner row [`SqlStore::hold_owner`] holds: an owner's, or a key's owner's.
#[derive(Clone, Copy)]
enum OwnerOf<'a> {
    Owner(&'a str),
    Key(&'a KeyId),
}

fn db(error: sqlx::Error) -> StoreError {
    StoreError::Backend(BackendError::caused("the database failed", error))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(BackendError::plain(format!(
        "a stored record is corrupt: {what}"
    )))
}

fn to_nanos(time: SystemTime) -> i64 {
    i64::try_from(nanos_since_epoch(time)).unwrap_or(i64::MAX)
}

fn from_nanos(nanos: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

/// The schema, the same on both databases but for the names of the byte-string type and
/// of an auto-increment key. (`keygate_keys.last_used_ip` and `keygate_keys.rate_bucket`
/// are added by [`SqlStore::migrate`] to old and new tables alike.)
fn migrations(bytes_type: &str, serial_key: &str) -> [String; 11] {
    [
        "CREATE TABLE IF NOT EXISTS keygate_owners (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            active BIGINT NOT NULL,
            password TEXT
        )"
        .to_owned(),
        "CREATE TABLE IF NOT EXISTS keygate_keys (
            id TEXT PRIMARY KEY,
            owner_id TEXT NOT NULL REFERENCES keygate_owners(id),
            name TEXT NOT NULL,
            description TEXT NOT NULL,
            use_case TEXT NOT NULL,
            environment TEXT NOT NULL,
            status TEXT NOT NULL,
            expires_at BIGINT,
            scopes TEXT NOT NULL,
            restrictions TEXT NOT NULL,
            quotas TEXT NOT NULL,
            metadata TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            last_used_at BIGINT,
            version BIGINT NOT NULL
        )"
        .to_owned(),
        "CREATE INDEX IF NOT EXISTS keygate_keys_owner ON keygate_keys (owner_id, id)".to_owned(),
        format!(
            "CREATE TABLE IF NOT EXISTS keygate_key_hashes (
                hash {bytes_type} PRIMARY KEY,
                key_id TEXT NOT NULL REFERENCES keygate_keys(id),
                valid_until BIGINT
            )"
        ),
        "CREATE INDEX IF NOT EXISTS keygate_key_hashes_key ON keygate_key_hashes (key_id)"
            .to_owned(),
        // The audit trail: names, not references, so that it outlives what it tells of.
        format!(
            "CREATE TABLE IF NOT EXISTS keygate_audit (
                id {serial_key},
                at BIGINT NOT NULL,
                owner TEXT NOT NULL,
                key_id TEXT,
                actor TEXT NOT NULL,
                ip TEXT,
                action TEXT NOT NULL,
                old_status TEXT,
                new_status TEXT
            )"
        ),
        "CREATE INDEX IF NOT EXISTS keygate_audit_owner ON keygate_audit (owner, id)".to_owned(),
        "CREATE INDEX IF NOT EXISTS keygate_audit_key ON keygate_audit (key_id, id)".to_owned(),
        // OAuth2 clients: the secret's SHA-256 only.
        format!(
            "CREATE TABLE IF NOT EXISTS keygate_clients (
                id TEXT PRIMARY KEY,
                owner_id TEXT NOT NULL REFERENCES keygate_owners(id),
                name TEXT NOT NULL,
                scopes TEXT NOT NULL,
                secret_hash {bytes_type} NOT NULL,
                created_at BIGINT NOT NULL,
                active BIGINT NOT NULL
            )"
        ),
        "CREATE INDEX IF NOT EXISTS keygate_clients_owner ON keygate_clients (owner_id, id)"
            .to_owned(),
        // For `client_by_secret` (a leaked secret's client); added to older databases too.
        "CREATE INDEX IF NOT EXISTS keygate_clients_secret ON keygate_clients (secret_hash)"
            .to_owned(),
    ]
}

const AUDIT_COLUMNS: &str = "id, at, owner, key_id, actor, ip, action, old_status, new_status";

const KEY_COLUMNS: &str = "k.id, k.name, k.description, k.use_case, k.environment, k.status, \
    k.expires_at, k.scopes, k.restrictions, k.quotas, k.metadata, k.created_at, \
    k.last_used_at, k.last_used_ip, k.version, k.rate_bucket, o.id AS owner_id, o.name AS owner_name, o.active AS owner_active";

const CLIENT_COLUMNS: &str = "c.id, c.name, c.scopes, c.created_at, c.active, \
    o.name AS owner_name, o.active AS owner_active";

/// Settings for a [`SqlStore`], from [`SqlStore::builder`].
#[must_use]
pub struct SqlStoreBuilder {
    url: String,
    format: KeyFormat,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for SqlStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("SqlStoreBuilder")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl SqlStoreBuilder {
    /// Issues keys in `format` (default `kg_live_`/`kg_test_`).
    pub fn format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// Reads the time (creation, grace periods, last use) from `clock`.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Connects and applies the migrations.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for a URL that is neither `sqlite:` nor `postgres:` (or whose
    /// feature is off); [`StoreError::Backend`] when the database cannot be reached.
    pub async fn connect(self) -> Result<SqlStore, StoreError> {
        let mut store = SqlStore::open(&self.url).await?;
        store.format = self.format;
        store.clock = self.clock;
        Ok(store)
    }
}

impl SqlStore {
    /// Connects to `url` with the default settings and applies the migrations.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for a URL that is neither `sqlite:` nor `postgres:` (or whose
    /// feature is off); [`StoreError::Backend`] when the database cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::open(url).await
    }

    /// A store with settings of your own: its key format, its clock.
    pub fn builder(url: impl Into<String>) -> SqlStoreBuilder {
        SqlStoreBuilder {
            url: url.into(),
            format: KeyFormat::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Listens for the changes other instances write to this PostgreSQL database, and
    /// hands them to this store's caches: each affected key is announced as
    /// [`Change::Remote`], so every [`CachedLookup`](crate::lookup::CachedLookup) built with
    /// `over_store` on this store (or a clone) drops it within moments of the commit.
    ///
    /// Every write through a `SqlStore` on PostgreSQL sends `NOTIFY keygate_changes` in its
    /// own transaction, so a notification is sent exactly when the write commits, never for
    /// a write rolled back. Notifications are delivered only to listening connections, so
    /// when the listening connection is lost the caches are emptied ([`Change::All`]: a cold
    /// cache, every key read from the database once more), the connection is re-established
    /// with a backoff (100 ms doubling to 5 s), and the caches are emptied once more when
    /// it listens again, for the changes made in between. Malformed notifications (anyone
    /// who can connect may send one) are ignored with a warning.
    ///
    /// A separate connection (not one of the pool's) is held while listening. Writes through
    /// this very store come back as notifications too; dropping those keys again is
    /// harmless. Call it once per process and keep the handle: dropping it stops listening.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] on SQLite, which has no `LISTEN`/`NOTIFY` (bridge instances
    /// over one SQLite file with `RedisChanges`, feature `redis`);
    /// [`StoreError::Backend`] when the listening connection cannot be made.
    pub async fn listen(&self) -> Result<super::Listening, StoreError> {
        match self.backend {
            #[cfg(feature = "postgres")]
            Backend::Postgres => {
                super::notify::listen(
                    Arc::clone(&self.url),
                    Arc::clone(&self.listeners),
                    self.pool.clone(),
                )
                .await
            }
            _ => Err(StoreError::invalid(
                "database for listen",
                "SQLite has no LISTEN/NOTIFY: share changes between instances with \
                 RedisChanges (feature `redis`)",
            )),
        }
    }

    async fn open(url: &str) -> Result<Self, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            if !cfg!(feature = "sqlite") {
                return Err(StoreError::invalid(
                    "database URL",
                    "built without the `sqlite` feature",
                ));
            }
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            if !cfg!(feature = "postgres") {
                return Err(StoreError::invalid(
                    "database URL",
                    "built without the `postgres` feature",
                ));
            }
            Backend::Postgres
        } else {
            // Never echo the URL: it may hold a password.
            let scheme = url
                .split_once(':')
                .map(|(scheme, _)| scheme)
                .filter(|s| {
                    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+')
                })
                .map_or_else(|| "no scheme".to_owned(), |s| format!("scheme {s:?}"));
            return Err(StoreError::invalid(
                "database URL",
                format!("{scheme}: expected sqlite://PATH, sqlite::memory: or postgres://…"),
            ));
        };
        // Drivers are process-wide; if the application installed its own set, keep it.
        let _ = sqlx::any::install_drivers(&[
            #[cfg(feature = "postgres")]
            sqlx::postgres::any::DRIVER,
            #[cfg(feature = "sqlite")]
            sqlx::sqlite::any::DRIVER,
        ]);
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(5));
        let url = match backend {
            Backend::Sqlite if url.contains(":memory:") => {
                // Every connection to :memory: is its own database: keep one.
                options = options.max_connections(1);
                url.to_owned()
            }
            Backend::Sqlite if !url.contains("mode=") => {
                // The file is created here, once. The pool's connections open it read-write
                // only: one opened while the file is briefly missing fails, instead of
                // creating an empty database and failing every query for its lifetime.
                let created = open_once(&with_param(url, "mode=rwc")).await?;
                created.close().await.map_err(db)?;
                with_param(url, "mode=rw")
            }
            _ => {
                // One connection first: its error says what failed (refused, unknown host,
                // bad password), where the pool would only say that it timed out.
                let first = open_once(url).await?;
                first.close().await.map_err(db)?;
                url.to_owned()
            }
        };
        let pool = options.connect(&url).await.map_err(|e| {
            StoreError::Backend(BackendError::caused("cannot open the database", e))
        })?;
        let store = Self {
            usage: SqlUsage::new(pool.clone()),
            pool,
            backend,
            format: KeyFormat::default(),
            clock: Arc::new(SystemClock),
            listeners: Arc::default(),
            actor: Arc::new(Actor::system()),
            url: Arc::from(url.as_str()),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let steps = match self.backend {
            Backend::Sqlite => migrations("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT"),
            Backend::Postgres => migrations("BYTEA", "BIGSERIAL PRIMARY KEY"),
        };
        let mut tx = self.begin().await?;
        if self.backend == Backend::Postgres {
            // Two instances starting at once must not race on CREATE TABLE.
            sqlx::query("SELECT pg_advisory_xact_lock(7172736564)")
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        for step in &steps {
            sqlx::query(step).execute(&mut *tx).await.map_err(db)?;
        }
        // Added after the first release: databases made before get them here.
        for (table, column, kind) in [
            ("keygate_keys", "last_used_ip", "TEXT"),
            (
                "keygate_owners",
                "credentials_version",
                "BIGINT NOT NULL DEFAULT 0",
            ),
            ("keygate_keys", "rate_bucket", "TEXT"),
        ] {
            self.add_column(&mut tx, table, column, kind).await?;
        }
        // After the column: a client's tokens are found by it.
        sqlx::query(
            "CREATE INDEX IF NOT EXISTS keygate_keys_rate_bucket ON keygate_keys (rate_bucket)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// Adds `column` to `table` unless it is there (the names are this file's constants).
    async fn add_column(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        table: &str,
        column: &str,
        kind: &str,
    ) -> Result<(), StoreError> {
        match self.backend {
            Backend::Postgres => {
                sqlx::query(&format!(
                    "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}"
                ))
                .execute(&mut **tx)
                .await
                .map_err(db)?;
            }
            Backend::Sqlite => {
                let row = sqlx::query(&format!(
                    "SELECT COUNT(*) AS n FROM pragma_table_info('{table}') WHERE name = '{column}'"
                ))
                .fetch_one(&mut **tx)
                .await
                .map_err(db)?;
                if row.try_get::<i64, _>("n").map_err(db)? == 0 {
                    sqlx::query(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))
                        .execute(&mut **tx)
                        .await
                        .map_err(db)?;
                }
            }
        }
        Ok(())
    }

    /// A write transaction. On SQLite the write lock is taken at once (`BEGIN IMMEDIATE`),
    /// so that two writes that read before they write run one after the other, instead of
    /// both reading and one failing (or both acting on what they read); PostgreSQL writes
    /// lock the rows they depend on.
    async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db),
            Backend::Postgres => self.pool.begin().await.map_err(db),
        }
    }

    /// Records an audit event in the write's transaction, as made by this handle's actor.
    async fn log(&self, tx: &mut Tx<'_>, entry: Entry, at: SystemTime) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO keygate_audit \
             (at, owner, key_id, actor, ip, action, old_status, new_status) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(to_nanos(at))
        .bind(entry.owner)
        .bind(entry.key_id.map(|k| k.as_str().to_owned()))
        .bind(self.actor.who.clone())
        .bind(self.actor.ip.map(|ip| ip.to_string()))
        .bind(entry.action.as_str())
        .bind(entry.old_status.map(|s| s.as_str().to_owned()))
        .bind(entry.new_status.map(|s| s.as_str().to_owned()))
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// On PostgreSQL, locks the owner's row for the rest of the transaction against every
    /// other write for the owner's keys (`replace_keys`, `revoke_all`, a key created, a
    /// rotation), so that those that read the owner's keys before they write run one after
    /// the other. (SQLite runs one writer at a time: [`SqlStore::begin`].)
    async fn lock_owner(&self, tx: &mut Tx<'_>, owner_id: &str) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        sqlx::query("SELECT id FROM keygate_owners WHERE id = $1 FOR UPDATE")
            .bind(owner_id.to_owned())
            .fetch_all(&mut **tx)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Revokes every key of the owner not yet revoked or deleted, in `tx` (whose owner row
    /// is locked), with one audit event each; how many, and their hashes.
    async fn revoke_in(
        &self,
        tx: &mut Tx<'_>,
        owner_id: &str,
        owner_name: &str,
        at: SystemTime,
    ) -> Result<(usize, Vec<KeyHash>), StoreError> {
        let lock = if self.backend == Backend::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let rows = sqlx::query(&format!(
            "SELECT id, status FROM keygate_keys \
             WHERE owner_id = $1 AND status IN ('active', 'disabled') ORDER BY id{lock}"
        ))
        .bind(owner_id.to_owned())
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?;
        let mut hashes = Vec::new();
        for row in &rows {
            let id = KeyId::new(row.try_get::<String, _>("id").map_err(db)?);
            let old = status_from(&row.try_get::<String, _>("status").map_err(db)?)?;
            sqlx::query(
                "UPDATE keygate_keys SET status = 'revoked', version = version + 1 WHERE id = $1",
            )
            .bind(id.as_str().to_owned())
            .execute(&mut **tx)
            .await
            .map_err(db)?;
            hashes.extend(hashes_in(tx, &id).await?);
            let entry = Entry::status(
                owner_name,
                &id,
                AuditAction::Revoked,
                Some(old),
                Status::Revoked,
            );
            self.log(tx, entry, at).await?;
        }
        Ok((rows.len(), hashes))
    }

    /// Inserts a new key's row and its secret's hash, in `tx`.
    async fn insert_key(
        &self,
        tx: &mut Tx<'_>,
        id: &KeyId,
        owner_id: &str,
        new: &NewKey,
        hash: &KeyHash,
        at: SystemTime,
    ) -> Result<(), StoreError> {
        if let Some(bucket) = &new.rate_bucket {
            self.bucket_open(tx, bucket).await?;
        }
        sqlx::query(
            "INSERT INTO keygate_keys (id, owner_id, name, description, use_case, environment, \
             status, expires_at, scopes, restrictions, quotas, metadata, created_at, version, \
             rate_bucket) \
             VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8, $9, $10, $11, $12, 0, $13)",
        )
        .bind(id.as_str().to_owned())
        .bind(owner_id.to_owned())
        .bind(new.name.clone())
        .bind(new.description.clone())
        .bind(new.use_case.clone())
        .bind(new.environment.as_str().to_owned())
        .bind(new.expires_at.map(to_nanos))
        .bind(json(&new.scopes)?)
        .bind(json(&new.restrictions)?)
        .bind(json(&new.quotas)?)
        .bind(json(&new.metadata)?)
        .bind(to_nanos(at))
        .bind(new.rate_bucket.as_ref().map(|b| b.as_str().to_owned()))
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        insert_hash(tx, hash, id).await?;
        let entry = Entry::status(&new.owner, id, AuditAction::Created, None, Status::Active);
        self.log(tx, entry, at).await
    }

    /// Refuses a new key whose rate bucket names a revoked client. On PostgreSQL the
    /// client's row is held (`FOR SHARE`) until the key commits, against a concurrent
    /// `revoke_client` (which locks it `FOR UPDATE`): either the revocation waits and then
    /// finds the new token, or the token waits and then finds the client revoked. (SQLite
    /// runs one writer at a time.)
    async fn bucket_open(&self, tx: &mut Tx<'_>, bucket: &KeyId) -> Result<(), StoreError> {
        let lock = if self.backend == Backend::Postgres {
            " FOR SHARE"
        } else {
            ""
        };
        let row = sqlx::query(&format!(
            "SELECT active FROM keygate_clients WHERE id = $1{lock}"
        ))
        .bind(bucket.as_str().to_owned())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?;
        match row {
            Some(row) if row.try_get::<i64, _>("active").map_err(db)? == 0 => {
                Err(super::client::REVOKED)
            }
            _ => Ok(()),
        }
    }

    /// Tells the listeners (caches) that these hashes' answers changed.
    fn notify(&self, hashes: &[KeyHash]) {
        self.listeners.notify(hashes);
    }

    /// Commits a write and tells the caches which hashes it touched: other instances' (on
    /// PostgreSQL) through `NOTIFY` in the transaction, this process's after the commit.
    async fn commit(&self, mut tx: Tx<'_>, changed: &[KeyHash]) -> Result<(), StoreError> {
        self.publish(&mut tx, changed).await?;
        self.finish(tx, changed).await
    }

    /// On PostgreSQL, holds the owner's row against a concurrent owner change until this
    /// transaction ends. A write that adds a hash takes it first: else an owner disabled
    /// meanwhile lists the owner's hashes before this one commits, and another instance,
    /// reading the new key after its own notification but before the disable commits,
    /// caches it as usable until the TTL. (SQLite runs one writer at a time: the disable's
    /// list is taken under the same write lock.)
    async fn hold_owner(
        &self,
        tx: &mut Tx<'_>,
        key_or_owner: OwnerOf<'_>,
    ) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        let query = match key_or_owner {
            OwnerOf::Owner(id) => {
                sqlx::query("SELECT id FROM keygate_owners WHERE id = $1 FOR SHARE")
                    .bind(id.to_owned())
            }
            OwnerOf::Key(id) => sqlx::query(
                "SELECT id FROM keygate_owners WHERE id = \
                 (SELECT owner_id FROM keygate_keys WHERE id = $1) FOR SHARE",
            )
            .bind(id.as_str().to_owned()),
        };
        query.fetch_all(&mut **tx).await.map_err(db)?;
        Ok(())
    }

    /// On PostgreSQL, `NOTIFY`s the changed hashes inside the transaction, so that other
    /// instances hear of the write exactly when it commits (a rolled-back write sends
    /// nothing). A notification that cannot be sent fails the write: nothing is committed.
    async fn publish(&self, tx: &mut Tx<'_>, changed: &[KeyHash]) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        for payload in super::wire::payloads(changed) {
            // `::text`: `pg_notify` returns `void`, which the Any driver has no type for.
            sqlx::query("SELECT pg_notify($1, $2)::text")
                .bind(super::notify::CHANNEL)
                .bind(payload)
                .execute(&mut **tx)
                .await
                .map_err(|e| {
                    StoreError::Backend(BackendError::caused(
                        "cannot notify other instances; nothing was written",
                        e,
                    ))
                })?;
        }
        Ok(())
    }

    /// Commits a transaction whose changes are published, and tells the caches in this
    /// process. They are told whatever the commit answers: dropping an entry is always
    /// safe, and a commit whose answer was lost may well have happened. Nothing fallible
    /// runs after the commit, so a committed change is never reported as a failure by work
    /// that came later.
    async fn finish(&self, tx: Tx<'_>, changed: &[KeyHash]) -> Result<(), StoreError> {
        let committed = tx.commit().await;
        self.notify(changed);
        committed.map_err(|e| {
            StoreError::Backend(BackendError::caused(
                "the commit's outcome is unknown (check the key)",
                e,
            ))
        })
    }

    /// After a commit that answered with an error: whether the new secret's hash is on
    /// file, which says for certain whether the commit happened (the hash is new).
    async fn committed_after_all(
        &self,
        hash: &KeyHash,
        error: StoreError,
    ) -> Result<(), StoreError> {
        let row = sqlx::query("SELECT key_id FROM keygate_key_hashes WHERE hash = $1")
            .bind(hash.as_bytes().to_vec())
            .fetch_optional(&self.pool)
            .await;
        match row {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(StoreError::Backend(BackendError::plain(
                "the change was not committed; nothing was written",
            ))),
            Err(_) => Err(error),
        }
    }

    async fn find_hash(&self, hash: KeyHash) -> LookupResult<StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS}, h.valid_until FROM keygate_key_hashes h \
             JOIN keygate_keys k ON k.id = h.key_id \
             JOIN keygate_owners o ON o.id = k.owner_id WHERE h.hash = $1"
        );
        let row = sqlx::query(&sql)
            .bind(hash.as_bytes().to_vec())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let mut record = record_from(&row)?.with_usage(self.usage.clone());
        let valid_until: Option<i64> = row.try_get("valid_until").map_err(db)?;
        if let Some(until) = valid_until.map(from_nanos) {
            record.expires_at = Some(record.expires_at.map_or(until, |e| e.min(until)));
        }
        Ok(Some(Arc::new(record)))
    }

    async fn owner_id(&self, name: &str) -> Result<String, StoreError> {
        let row = sqlx::query("SELECT id FROM keygate_owners WHERE name = $1")
            .bind(name.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        match row {
            Some(row) => row.try_get("id").map_err(db),
            None => Err(StoreError::OwnerNotFound(name.to_owned())),
        }
    }

    /// Writes a record's mutable columns and status if its version is still `version`, with
    /// its audit events, and returns the record as committed. A record not `changed` is
    /// written back as it was, its version too, and nobody is notified: the write only
    /// checks (and on PostgreSQL locks) the version its events were made from.
    async fn write_record(
        &self,
        record: &KeyRecord,
        version: u64,
        changed: bool,
        entries: Vec<Entry>,
    ) -> Result<KeyRecord, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE keygate_keys SET name = $1, description = $2, status = $3, scopes = $4, \
             restrictions = $5, quotas = $6, metadata = $7, version = version + $10 \
             WHERE id = $8 AND version = $9",
        )
        .bind(record.name.clone())
        .bind(record.description.clone())
        .bind(record.status.as_str().to_owned())
        .bind(json(&record.scopes)?)
        .bind(json(&record.restrictions)?)
        .bind(json(&record.quotas)?)
        .bind(json(&record.metadata)?)
        .bind(record.id.as_str().to_owned())
        .bind(i64::try_from(version).unwrap_or(i64::MAX))
        .bind(i64::from(changed))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        let now = self.clock.now();
        for entry in entries {
            self.log(&mut tx, entry, now).await?;
        }
        let hashes = if changed {
            hashes_in(&mut tx, &record.id).await?
        } else {
            Vec::new()
        };
        let written = get_in(&mut tx, &record.id).await?;
        self.commit(tx, &hashes).await?;
        Ok(written)
    }

    /// Edits a key's record (if it has not changed since it was read) and records the
    /// events `audit` makes of the owner's name, the status before and the record after.
    /// An edit that answers `false` changed nothing: see [`write_record`](Self::write_record).
    async fn edit(
        &self,
        id: &KeyId,
        edit: impl FnOnce(&mut KeyRecord) -> Result<bool, StoreError>,
        audit: impl FnOnce(&str, Status, &KeyRecord) -> Vec<Entry>,
    ) -> Result<KeyRecord, StoreError> {
        let mut record = self.get(id).await?;
        let (version, before) = (record.version, record.status);
        let changed = edit(&mut record)?;
        let owner = record.owner.as_ref().map_or("", |o| o.name.as_str());
        let entries = audit(owner, before, &record);
        self.write_record(&record, version, changed, entries).await
    }
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// How many times [`KeyStore::report_leak`] tries again after a conflict.
const LEAK_TRIES: u32 = 4;

/// The hashes filed under a key, read inside a transaction.
async fn hashes_in(tx: &mut Tx<'_>, id: &KeyId) -> Result<Vec<KeyHash>, StoreError> {
    let rows = sqlx::query("SELECT hash FROM keygate_key_hashes WHERE key_id = $1")
        .bind(id.as_str().to_owned())
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?;
    rows.iter().map(row_hash).collect()
}

/// One key's record, read inside a transaction (so that a write returns what it committed).
async fn get_in(tx: &mut Tx<'_>, id: &KeyId) -> Result<KeyRecord, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM keygate_keys k \
         JOIN keygate_owners o ON o.id = k.owner_id WHERE k.id = $1"
    );
    let row = sqlx::query(&sql)
        .bind(id.as_str().to_owned())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?;
    match row {
        Some(row) => record_from(&row),
        None => Err(StoreError::KeyNotFound(id.clone())),
    }
}

/// `url` with one more query parameter.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// One connection, with the database's own reason when it cannot be opened.
async fn open_once(url: &str) -> Result<sqlx::AnyConnection, StoreError> {
    sqlx::AnyConnection::connect(url)
        .await
        .map_err(|e| StoreError::Backend(BackendError::caused("cannot open the database", e)))
}

/// Files a key's current secret (by hash) under its id.
async fn insert_hash(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    hash: &KeyHash,
    id: &KeyId,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO keygate_key_hashes (hash, key_id, valid_until) VALUES ($1, $2, NULL)")
        .bind(hash.as_bytes().to_vec())
        .bind(id.as_str().to_owned())
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Backend(BackendError::caused("cannot encode a record", e)))
}

fn parse<T: serde::de::DeserializeOwned>(row: &AnyRow, column: &str) -> Result<T, StoreError> {
    let text: String = row.try_get(column).map_err(db)?;
    serde_json::from_str(&text).map_err(|_| corrupt(column))
}

fn row_hash(row: &AnyRow) -> Result<KeyHash, StoreError> {
    let bytes: Vec<u8> = row.try_get("hash").map_err(db)?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| corrupt("hash"))?;
    Ok(KeyHash::from_bytes(bytes))
}

fn status_from(text: &str) -> Result<Status, StoreError> {
    Ok(match text {
        "active" => Status::Active,
        "disabled" => Status::Disabled,
        "revoked" => Status::Revoked,
        "deleted" => Status::Deleted,
        _ => return Err(corrupt("status")),
    })
}

fn owner_from(row: &AnyRow, name: &str) -> Result<Owner, StoreError> {
    Ok(Owner {
        id: row.try_get("id").map_err(db)?,
        name: name.to_owned(),
        active: row.try_get::<i64, _>("active").map_err(db)? != 0,
    })
}

fn event_from(row: &AnyRow) -> Result<AuditEvent, StoreError> {
    let status = |column: &str| -> Result<Option<Status>, StoreError> {
        row.try_get::<Option<String>, _>(column)
            .map_err(db)?
            .map(|s| status_from(&s))
            .transpose()
    };
    let action: String = row.try_get("action").map_err(db)?;
    let ip: Option<String> = row.try_get("ip").map_err(db)?;
    Ok(AuditEvent {
        id: u64::try_from(row.try_get::<i64, _>("id").map_err(db)?)
            .map_err(|_| corrupt("audit id"))?,
        at: from_nanos(row.try_get("at").map_err(db)?),
        owner: row.try_get("owner").map_err(db)?,
        key_id: row
            .try_get::<Option<String>, _>("key_id")
            .map_err(db)?
            .map(KeyId::new),
        actor: row.try_get("actor").map_err(db)?,
        ip: ip
            .map(|ip| ip.parse().map_err(|_| corrupt("audit ip")))
            .transpose()?,
        action: action.parse().map_err(|_| corrupt("audit action"))?,
        old_status: status("old_status")?,
        new_status: status("new_status")?,
    })
}

fn client_from(row: &AnyRow) -> Result<OAuthClient, StoreError> {
    Ok(OAuthClient {
        id: row.try_get("id").map_err(db)?,
        owner: row.try_get("owner_name").map_err(db)?,
        name: row.try_get("name").map_err(db)?,
        scopes: parse(row, "scopes")?,
        created_at: Some(from_nanos(row.try_get("created_at").map_err(db)?)),
        active: row.try_get::<i64, _>("active").map_err(db)? != 0,
    })
}

fn record_from(row: &AnyRow) -> Result<KeyRecord, StoreError> {
    let id: String = row.try_get("id").map_err(db)?;
    let environment: String = row.try_get("environment").map_err(db)?;
    let environment: Environment = environment.parse().map_err(|_| corrupt("environment"))?;
    let owner = Owner {
        id: row.try_get("owner_id").map_err(db)?,
        name: row.try_get("owner_name").map_err(db)?,
        active: row.try_get::<i64, _>("owner_active").map_err(db)? != 0,
    };
    let mut record = KeyRecord::new(KeyId::new(id), owner, environment);
    record.name = row.try_get("name").map_err(db)?;
    record.description = row.try_get("description").map_err(db)?;
    record.use_case = row.try_get("use_case").map_err(db)?;
    let status: String = row.try_get("status").map_err(db)?;
    record.status = status_from(&status)?;
    record.expires_at = row
        .try_get::<Option<i64>, _>("expires_at")
        .map_err(db)?
        .map(from_nanos);
    record.scopes = parse(row, "scopes")?;
    record.restrictions = parse(row, "restrictions")?;
    record.quotas = parse(row, "quotas")?;
    record.metadata = parse(row, "metadata")?;
    record.created_at = Some(from_nanos(row.try_get("created_at").map_err(db)?));
    record.last_used_at = row
        .try_get::<Option<i64>, _>("last_used_at")
        .map_err(db)?
        .map(from_nanos);
    // Informational: an address that does not parse reads as unknown, never as a failure.
    record.last_used_ip = row
        .try_get::<Option<String>, _>("last_used_ip")
        .map_err(db)?
        .and_then(|ip| ip.parse().ok());
    record.version = u64::try_from(row.try_get::<i64, _>("version").map_err(db)?).unwrap_or(0);
    record.rate_bucket = row
        .try_get::<Option<String>, _>("rate_bucket")
        .map_err(db)?
        .map(KeyId::new);
    Ok(record)
}

impl KeyLookup for SqlStore {
    type Error = StoreError;
    type Future = Pin<Box<dyn Future<Output = LookupResult<StoreError>> + Send>>;

    fn lookup(&self, key: &PresentedKey<'_>) -> Answer<LookupResult<StoreError>, Self::Future> {
        let store = self.clone();
        let hash = *key.hash();
        Answer::Later(Box::pin(async move { store.find_hash(hash).await }))
    }
}

impl ChangeFeed for SqlStore {
    fn subscribe(&self, listener: ChangeListener) {
        self.listeners.add(listener);
    }

    fn announce(&self, change: Change<'_>) {
        self.listeners.announce(change);
    }
}

/// The most last uses waiting to be written; past it new ones are dropped (and said so).
const MAX_PENDING_USES: usize = 100_000;

/// The store's [`UsageSink`]: uses are queued from the request path and written in
/// batches, one transaction each, by a task spawned when the first one of a batch arrives
/// (or by [`KeyStore::flush_usage`]).
struct SqlUsage {
    pool: AnyPool,
    pending: std::sync::Mutex<std::collections::HashMap<KeyId, (SystemTime, Option<IpAddr>)>>,
    scheduled: std::sync::atomic::AtomicBool,
    warned: std::sync::atomic::AtomicBool,
    /// One writer at a time: a flush waits for the batch in flight before its own.
    writer: tokio::sync::Mutex<()>,
    me: std::sync::Weak<SqlUsage>,
}

impl SqlUsage {
    fn new(pool: AnyPool) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            pool,
            pending: std::sync::Mutex::default(),
            scheduled: std::sync::atomic::AtomicBool::new(false),
            warned: std::sync::atomic::AtomicBool::new(false),
            writer: tokio::sync::Mutex::new(()),
            me: me.clone(),
        })
    }

    fn warn_once(&self, message: &str) {
        if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(target: "keygate", "{message}");
        }
    }

    /// Starts a writer unless one is on its way (needs a Tokio runtime; without one, uses
    /// wait for [`KeyStore::flush_usage`]).
    fn schedule(&self) {
        use std::sync::atomic::Ordering;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(usage) = self.me.upgrade() else {
            return;
        };
        runtime.spawn(async move {
            loop {
                // Let the uses of the requests in flight join this batch.
                tokio::task::yield_now().await;
                if let Err(error) = usage.flush().await {
                    tracing::warn!(target: "keygate", error = %error, "could not record keys' last use");
                }
                usage.scheduled.store(false, Ordering::Release);
                let more = usage.pending.lock().map(|p| !p.is_empty()).unwrap_or(false);
                if !more || usage.scheduled.swap(true, Ordering::AcqRel) {
                    break;
                }
            }
        });
    }

    /// Writes every queued use, in one transaction. On failure the uses are queued again.
    async fn flush(&self) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        let batch: Vec<(KeyId, (SystemTime, Option<IpAddr>))> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().collect(),
            Err(_) => return Err(StoreError::Poisoned),
        };
        if batch.is_empty() {
            return Ok(());
        }
        let written = self.write(&batch).await;
        if written.is_err() {
            if let Ok(mut pending) = self.pending.lock() {
                for (id, use_) in batch {
                    // A use reported meanwhile is later: it wins.
                    let use_ = pending.get(&id).map_or(use_, |later| {
                        if later.0 >= use_.0 {
                            *later
                        } else {
                            use_
                        }
                    });
                    pending.insert(id, use_);
                }
            }
        }
        written
    }

    async fn write(
        &self,
        batch: &[(KeyId, (SystemTime, Option<IpAddr>))],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        for (id, (at, ip)) in batch {
            let before = at.checked_sub(LAST_USED_RESOLUTION).unwrap_or(UNIX_EPOCH);
            sqlx::query(
                "UPDATE keygate_keys SET last_used_at = $1, last_used_ip = $2 \
                 WHERE id = $3 AND (last_used_at IS NULL OR last_used_at <= $4)",
            )
            .bind(to_nanos(*at))
            .bind(ip.map(|ip| ip.to_string()))
            .bind(id.as_str().to_owned())
            .bind(to_nanos(before))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }
}

impl UsageSink for SqlUsage {
    fn used(&self, key: &KeyId, at: SystemTime, ip: Option<IpAddr>) {
        {
            let Ok(mut pending) = self.pending.lock() else {
                return;
            };
            if pending.len() >= MAX_PENDING_USES && !pending.contains_key(key) {
                drop(pending);
                self.warn_once("too many last uses waiting to be written: some are dropped");
                return;
            }
            pending.insert(key.clone(), (at, ip));
        }
        self.schedule();
    }
}

impl OwnerStore for SqlStore {
    async fn add_owner(&self, name: &str, password: Option<&str>) -> Result<Owner, StoreError> {
        let (owner, password) = super::new_owner(name, password).await?;
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO keygate_owners (id, name, active, password) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(owner.id.clone())
        .bind(name.to_owned())
        .bind(password)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::OwnerExists(name.to_owned()));
        }
        let entry = Entry::owner(name, AuditAction::OwnerAdded);
        self.log(&mut tx, entry, self.clock.now()).await?;
        self.finish(tx, &[]).await?;
        Ok(owner)
    }

    async fn verify_owner(&self, name: &str, password: &str) -> Result<Owner, StoreError> {
        let row = sqlx::query("SELECT id, active, password FROM keygate_owners WHERE name = $1")
            .bind(name.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        let (owner, stored) = match &row {
            Some(row) => {
                let owner = owner_from(row, name)?;
                let stored: Option<String> = row.try_get("password").map_err(db)?;
                (Some(owner), stored)
            }
            None => (None, None),
        };
        super::check_credentials(owner, stored, password).await
    }

    async fn set_owner_active(&self, name: &str, active: bool) -> Result<Owner, StoreError> {
        let id = self.owner_id(name).await?;
        let mut tx = self.begin().await?;
        // Disabling ends the owner's sessions for good (enabling again does not revive them).
        sqlx::query(
            "UPDATE keygate_owners SET active = $1, \
             credentials_version = credentials_version + $3 WHERE id = $2",
        )
        .bind(i64::from(active))
        .bind(id.clone())
        .bind(i64::from(!active))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let rows = sqlx::query(
            "SELECT h.hash FROM keygate_key_hashes h JOIN keygate_keys k ON k.id = h.key_id \
             WHERE k.owner_id = $1",
        )
        .bind(id.clone())
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let hashes = rows.iter().map(row_hash).collect::<Result<Vec<_>, _>>()?;
        let action = if active {
            AuditAction::OwnerEnabled
        } else {
            AuditAction::OwnerDisabled
        };
        self.log(&mut tx, Entry::owner(name, action), self.clock.now())
            .await?;
        self.commit(tx, &hashes).await?;
        let mut owner = Owner::new(id, name);
        owner.active = active;
        Ok(owner)
    }

    async fn standing(&self, name: &str) -> Result<super::Standing, StoreError> {
        let row = sqlx::query(
            "SELECT id, active, credentials_version FROM keygate_owners WHERE name = $1",
        )
        .bind(name.to_owned())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(row) = row else {
            return Err(StoreError::OwnerNotFound(name.to_owned()));
        };
        let credentials = row.try_get::<i64, _>("credentials_version").map_err(db)?;
        Ok(super::Standing {
            owner: owner_from(&row, name)?,
            credentials: u64::try_from(credentials).map_err(|_| corrupt("credentials version"))?,
        })
    }

    async fn owner(&self, name: &str) -> Result<Owner, StoreError> {
        let row = sqlx::query("SELECT id, active FROM keygate_owners WHERE name = $1")
            .bind(name.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        match row {
            Some(row) => owner_from(&row, name),
            None => Err(StoreError::OwnerNotFound(name.to_owned())),
        }
    }

    async fn set_owner_password(
        &self,
        name: &str,
        password: Option<&str>,
    ) -> Result<Owner, StoreError> {
        // Hashed before the transaction: argon2 is slow on purpose.
        let password = super::password::hash_off_thread(password).await?;
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE keygate_owners SET password = $1, \
             credentials_version = credentials_version + 1 WHERE name = $2",
        )
        .bind(password)
        .bind(name.to_owned())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::OwnerNotFound(name.to_owned()));
        }
        let row = sqlx::query("SELECT id, active FROM keygate_owners WHERE name = $1")
            .bind(name.to_owned())
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let owner = owner_from(&row, name)?;
        let entry = Entry::owner(name, AuditAction::PasswordSet);
        self.log(&mut tx, entry, self.clock.now()).await?;
        self.finish(tx, &[]).await?;
        Ok(owner)
    }
}

impl ClientStore for SqlStore {
    async fn create_client(&self, new: NewClient) -> Result<CreatedClient, StoreError> {
        new.check()?;
        let owner_id = self.owner_id(&new.owner).await?;
        let (id, secret) = super::client::generate()?;
        let now = self.clock.now();
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO keygate_clients \
             (id, owner_id, name, scopes, secret_hash, created_at, active) \
             VALUES ($1, $2, $3, $4, $5, $6, 1)",
        )
        .bind(id.clone())
        .bind(owner_id)
        .bind(new.name.clone())
        .bind(json(&new.scopes)?)
        .bind(secret.hash().as_bytes().to_vec())
        .bind(to_nanos(now))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let entry = Entry::key(
            &new.owner,
            &KeyId::new(id.as_str()),
            AuditAction::ClientCreated,
        );
        self.log(&mut tx, entry, now).await?;
        let sql = format!(
            "SELECT {CLIENT_COLUMNS} FROM keygate_clients c \
             JOIN keygate_owners o ON o.id = c.owner_id WHERE c.id = $1"
        );
        let row = sqlx::query(&sql)
            .bind(id.clone())
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let client = client_from(&row)?;
        if let Err(error) = self.finish(tx, &[]).await {
            // The secret exists only here: if the client was stored after all, hand it over.
            match self.client(&id).await {
                Ok(_) => {}
                Err(StoreError::ClientNotFound(_)) => {
                    return Err(StoreError::Backend(BackendError::plain(
                        "the change was not committed; nothing was written",
                    )))
                }
                Err(_) => return Err(error),
            }
        }
        Ok(CreatedClient { client, secret })
    }

    async fn client(&self, id: &str) -> Result<OAuthClient, StoreError> {
        let sql = format!(
            "SELECT {CLIENT_COLUMNS} FROM keygate_clients c \
             JOIN keygate_owners o ON o.id = c.owner_id WHERE c.id = $1"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        match row {
            Some(row) => client_from(&row),
            None => Err(StoreError::ClientNotFound(id.to_owned())),
        }
    }

    async fn clients(&self, owner: &str) -> Result<Vec<OAuthClient>, StoreError> {
        let owner_id = self.owner_id(owner).await?;
        let sql = format!(
            "SELECT {CLIENT_COLUMNS} FROM keygate_clients c \
             JOIN keygate_owners o ON o.id = c.owner_id WHERE c.owner_id = $1 ORDER BY c.id"
        );
        let rows = sqlx::query(&sql)
            .bind(owner_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(client_from).collect()
    }

    async fn revoke_client(&self, id: &str) -> Result<OAuthClient, StoreError> {
        let postgres = self.backend == Backend::Postgres;
        let mut tx = self.begin().await?;
        // On PostgreSQL the client's row is locked first: a token being created for it
        // (which holds the row `FOR SHARE`) commits before this reads the tokens, or waits
        // and then finds the client revoked.
        let sql = format!(
            "SELECT {CLIENT_COLUMNS} FROM keygate_clients c \
             JOIN keygate_owners o ON o.id = c.owner_id WHERE c.id = $1{}",
            if postgres { " FOR UPDATE OF c" } else { "" }
        );
        let row = sqlx::query(&sql)
            .bind(id.to_owned())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Err(StoreError::ClientNotFound(id.to_owned()));
        };
        let mut client = client_from(&row)?;
        let bucket = KeyId::new(id);
        let now = self.clock.now();
        if client.active {
            sqlx::query("UPDATE keygate_clients SET active = 0 WHERE id = $1")
                .bind(id.to_owned())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let entry = Entry::key(&client.owner, &bucket, AuditAction::ClientRevoked);
            self.log(&mut tx, entry, now).await?;
            client.active = false;
        }
        let sql = format!(
            "SELECT k.id, k.status, o.name AS owner_name FROM keygate_keys k \
             JOIN keygate_owners o ON o.id = k.owner_id \
             WHERE k.rate_bucket = $1 AND k.status IN ('active', 'disabled') ORDER BY k.id{}",
            if postgres { " FOR UPDATE OF k" } else { "" }
        );
        let tokens = sqlx::query(&sql)
            .bind(id.to_owned())
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        let mut hashes = Vec::new();
        for row in &tokens {
            let token = KeyId::new(row.try_get::<String, _>("id").map_err(db)?);
            let old = status_from(&row.try_get::<String, _>("status").map_err(db)?)?;
            let owner: String = row.try_get("owner_name").map_err(db)?;
            sqlx::query(
                "UPDATE keygate_keys SET status = 'revoked', version = version + 1 WHERE id = $1",
            )
            .bind(token.as_str().to_owned())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            hashes.extend(hashes_in(&mut tx, &token).await?);
            let entry = Entry::status(
                &owner,
                &token,
                AuditAction::Revoked,
                Some(old),
                Status::Revoked,
            );
            self.log(&mut tx, entry, now).await?;
        }
        self.commit(tx, &hashes).await?;
        Ok(client)
    }

    async fn verify_client(&self, id: &str, secret: &str) -> Result<OAuthClient, StoreError> {
        let sql = format!(
            "SELECT {CLIENT_COLUMNS}, c.secret_hash FROM keygate_clients c \
             JOIN keygate_owners o ON o.id = c.owner_id WHERE c.id = $1"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        let found = match &row {
            Some(row) => {
                let bytes: Vec<u8> = row.try_get("secret_hash").map_err(db)?;
                let bytes: [u8; 32] = bytes.try_into().map_err(|_| corrupt("secret_hash"))?;
                let owner_active = row.try_get::<i64, _>("owner_active").map_err(db)? != 0;
                Some((client_from(row)?, KeyHash::from_bytes(bytes), owner_active))
            }
            None => None,
        };
        super::client::check_secret(found, secret)
    }

    async fn client_by_secret(&self, secret: &str) -> Result<Option<OAuthClient>, StoreError> {
        if secret.len() > super::client::MAX_SECRET_LEN {
            return Ok(None);
        }
        let hash = KeyHash::of(secret);
        let sql = format!(
            "SELECT {CLIENT_COLUMNS} FROM keygate_clients c \
             JOIN keygate_owners o ON o.id = c.owner_id WHERE c.secret_hash = $1"
        );
        let row = sqlx::query(&sql)
            .bind(hash.as_bytes().to_vec())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(client_from).transpose()
    }

    async fn purge_expired_tokens(
        &self,
        client_id: &str,
        before: SystemTime,
        limit: usize,
    ) -> Result<usize, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let mut tx = self.begin().await?;
        // On PostgreSQL the rows are locked: a concurrent write to one of them (a usage
        // flush, a rotation) waits, then finds it gone.
        let sql = format!(
            "SELECT id FROM keygate_keys \
             WHERE rate_bucket = $1 AND use_case = $2 \
             AND expires_at IS NOT NULL AND expires_at < $3 \
             ORDER BY expires_at, id LIMIT $4{}",
            if self.backend == Backend::Postgres {
                " FOR UPDATE"
            } else {
                ""
            }
        );
        let rows = sqlx::query(&sql)
            .bind(client_id.to_owned())
            .bind(super::client::TOKEN_USE_CASE)
            .bind(to_nanos(before))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        let mut hashes = Vec::new();
        for row in &rows {
            let id = KeyId::new(row.try_get::<String, _>("id").map_err(db)?);
            hashes.extend(hashes_in(&mut tx, &id).await?);
            // The hashes first: they reference the key.
            sqlx::query("DELETE FROM keygate_key_hashes WHERE key_id = $1")
                .bind(id.as_str().to_owned())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            sqlx::query("DELETE FROM keygate_keys WHERE id = $1")
                .bind(id.as_str().to_owned())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        self.commit(tx, &hashes).await?;
        Ok(rows.len())
    }
}

impl KeyStore for SqlStore {
    async fn create(&self, new: NewKey) -> Result<CreatedKey, StoreError> {
        new.check()?;
        let owner_id = self.owner_id(&new.owner).await?;
        let secret = self.format.generate(new.environment)?;
        let id = KeyId::generate()?;
        let now = self.clock.now();
        let mut tx = self.begin().await?;
        self.hold_owner(&mut tx, OwnerOf::Owner(&owner_id)).await?;
        self.insert_key(&mut tx, &id, &owner_id, &new, &secret.hash(), now)
            .await?;
        let record = get_in(&mut tx, &id).await?;
        self.publish(&mut tx, &[secret.hash()]).await?;
        if let Err(error) = self.finish(tx, &[secret.hash()]).await {
            // The secret exists only here: if the key was stored after all, hand it over.
            self.committed_after_all(&secret.hash(), error).await?;
        }
        Ok(CreatedKey { record, secret })
    }

    async fn get(&self, id: &KeyId) -> Result<KeyRecord, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keygate_keys k \
             JOIN keygate_owners o ON o.id = k.owner_id WHERE k.id = $1"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str().to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        match row {
            Some(row) => record_from(&row),
            None => Err(StoreError::KeyNotFound(id.clone())),
        }
    }

    async fn list(&self, owner: &str, page: Page) -> Result<Vec<KeyRecord>, StoreError> {
        let owner_id = self.owner_id(owner).await?;
        let limit = if page.limit == 0 { 100 } else { page.limit };
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keygate_keys k \
             JOIN keygate_owners o ON o.id = k.owner_id \
             WHERE k.owner_id = $1 AND k.id > $2 ORDER BY k.id LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(owner_id)
            .bind(
                page.after
                    .map(|a| a.as_str().to_owned())
                    .unwrap_or_default(),
            )
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(record_from).collect()
    }

    async fn update(&self, id: &KeyId, update: KeyUpdate) -> Result<KeyRecord, StoreError> {
        update.check()?;
        self.edit(
            id,
            |record| update.apply(record).map(|()| true),
            |owner, _, record| vec![Entry::key(owner, &record.id, AuditAction::Updated)],
        )
        .await
    }

    async fn set_status(&self, id: &KeyId, status: Status) -> Result<KeyRecord, StoreError> {
        self.edit(
            id,
            |record| {
                record.status = super::transition(record, status)?;
                Ok(true)
            },
            |owner, before, record| {
                let action = AuditAction::of_status(status);
                vec![Entry::status(
                    owner,
                    &record.id,
                    action,
                    Some(before),
                    record.status,
                )]
            },
        )
        .await
    }

    async fn report_leak(&self, id: &KeyId) -> Result<(KeyRecord, bool), StoreError> {
        // A leak must not go unreported for a concurrent edit of the key: a conflict (the
        // key changed between the read and the write) is tried again from a fresh read.
        let mut tries = 0;
        loop {
            let mut revoked = false;
            let written = self
                .edit(
                    id,
                    |record| {
                        revoked = super::revoke_leaked(record);
                        Ok(revoked)
                    },
                    super::leak_entries,
                )
                .await;
            match written {
                Err(StoreError::Conflict) if tries < LEAK_TRIES => tries += 1,
                written => return written.map(|record| (record, revoked)),
            }
        }
    }

    async fn rotate(
        &self,
        id: &KeyId,
        grace: Duration,
        expected: Option<u64>,
    ) -> Result<CreatedKey, StoreError> {
        let record = self.get(id).await?;
        super::rotatable(&record)?;
        if expected.is_some_and(|v| v != record.version) {
            return Err(StoreError::Conflict);
        }
        let secret = self.format.generate(record.environment)?;
        let now = self.clock.now();
        let until = to_nanos(now.checked_add(grace).unwrap_or(now));
        let mut tx = self.begin().await?;
        self.hold_owner(&mut tx, OwnerOf::Key(id)).await?;
        let done = sqlx::query(
            "UPDATE keygate_keys SET version = version + 1 WHERE id = $1 AND version = $2",
        )
        .bind(id.as_str().to_owned())
        .bind(i64::try_from(record.version).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        let mut changed = hashes_in(&mut tx, id).await?;
        if grace.is_zero() {
            sqlx::query("DELETE FROM keygate_key_hashes WHERE key_id = $1")
                .bind(id.as_str().to_owned())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        } else {
            sqlx::query(
                "UPDATE keygate_key_hashes SET valid_until = $1 \
                 WHERE key_id = $2 AND (valid_until IS NULL OR valid_until > $1)",
            )
            .bind(until)
            .bind(id.as_str().to_owned())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        insert_hash(&mut tx, &secret.hash(), id).await?;
        changed.push(secret.hash());
        let owner = record.owner.as_ref().map_or("", |o| o.name.as_str());
        self.log(&mut tx, Entry::key(owner, id, AuditAction::Rotated), now)
            .await?;
        let record = get_in(&mut tx, id).await?;
        self.publish(&mut tx, &changed).await?;
        if let Err(error) = self.finish(tx, &changed).await {
            // The old secret may be gone: if the new one was stored, hand it over.
            self.committed_after_all(&secret.hash(), error).await?;
        }
        Ok(CreatedKey { record, secret })
    }

    async fn revoke_all(&self, owner: &str) -> Result<usize, StoreError> {
        let owner_id = self.owner_id(owner).await?;
        let mut tx = self.begin().await?;
        self.lock_owner(&mut tx, &owner_id).await?;
        let (count, hashes) = self
            .revoke_in(&mut tx, &owner_id, owner, self.clock.now())
            .await?;
        self.commit(tx, &hashes).await?;
        Ok(count)
    }

    async fn replace_keys(&self, new: NewKey) -> Result<CreatedKey, StoreError> {
        new.check()?;
        let owner_id = self.owner_id(&new.owner).await?;
        let secret = self.format.generate(new.environment)?;
        let id = KeyId::generate()?;
        let now = self.clock.now();
        let mut tx = self.begin().await?;
        // Every other replace_keys for this owner waits here until this one commits, and
        // then reads the keys as this one left them.
        self.lock_owner(&mut tx, &owner_id).await?;
        let (_, mut changed) = self.revoke_in(&mut tx, &owner_id, &new.owner, now).await?;
        self.insert_key(&mut tx, &id, &owner_id, &new, &secret.hash(), now)
            .await?;
        changed.push(secret.hash());
        let record = get_in(&mut tx, &id).await?;
        self.publish(&mut tx, &changed).await?;
        if let Err(error) = self.finish(tx, &changed).await {
            // The secret exists only here: if the key was stored after all, hand it over.
            self.committed_after_all(&secret.hash(), error).await?;
        }
        Ok(CreatedKey { record, secret })
    }

    fn acting(&self, actor: Actor) -> Self {
        Self {
            actor: Arc::new(actor),
            ..self.clone()
        }
    }

    async fn audit(&self, query: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM keygate_audit WHERE id < $1");
        let mut n = 1;
        if query.owner.is_some() {
            n += 1;
            sql.push_str(&format!(" AND owner = ${n}"));
        }
        if query.key.is_some() {
            n += 1;
            sql.push_str(&format!(" AND key_id = ${n}"));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", n + 1));
        let before = query
            .before
            .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let mut q = sqlx::query(&sql).bind(before);
        if let Some(owner) = &query.owner {
            q = q.bind(owner.clone());
        }
        if let Some(key) = &query.key {
            q = q.bind(key.as_str().to_owned());
        }
        let limit = i64::try_from(query.page_size()).unwrap_or(i64::MAX);
        let rows = q.bind(limit).fetch_all(&self.pool).await.map_err(db)?;
        rows.iter().map(event_from).collect()
    }

    async fn flush_usage(&self) -> Result<(), StoreError> {
        self.usage.flush().await
    }
}
