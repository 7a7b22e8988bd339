//! `SqlStore` under faults: a write either happens and says so, or does not happen and
//! says so; a SQLite file that goes missing for a moment does not poison the pool; an
//! unreachable database says what failed.
//!
//! The write faults are made by a trigger that corrupts the row being written, inside the
//! write's own transaction, so that reading the record back fails: the fault that turned
//! committed writes into reported failures when the read-back ran after the commit.
#![cfg(any(feature = "sqlite", feature = "postgres"))]

use std::time::Duration;

use keygate::key::ApiKey;
use keygate::key::Environment;
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::record::{KeyRecord, Status};
use keygate::store::{KeyStore, NewKey, OwnerStore, SqlStore};

/// A store with owner `ada` and one key, and a cache kept honest by the store.
async fn setup(url: &str) -> (SqlStore, CachedLookup<SqlStore>, KeyRecord, ApiKey) {
    let store = SqlStore::connect(url).await.expect("connect");
    store.add_owner("ada", None).await.expect("owner");
    let created = store
        .create(NewKey::new("ada", "k", Environment::Live))
        .await
        .expect("create");
    let cache = CachedLookup::over_store(store.clone());
    let cached = cache
        .lookup(&created.secret.presented())
        .await
        .expect("lookup");
    assert_eq!(cached.expect("found").status, Status::Active);
    (store, cache, created.record, created.secret)
}

/// Runs the write-fault checks; `corrupt_on` installs a trigger that corrupts the key's
/// row when the named event happens (`status` update, `hash` insert), `heal` drops it,
/// `raw_status` reads the status column directly.
async fn writes_are_atomic<F, H, R>(url: &str, corrupt_on: F, heal: H, raw_status: R)
where
    F: AsyncFn(&'static str),
    H: AsyncFn(),
    R: AsyncFn(&str) -> String,
{
    let (store, cache, record, secret) = setup(url).await;

    // A status change whose read-back fails is not applied, and says so.
    corrupt_on("status").await;
    let result = store.set_status(&record.id, Status::Disabled).await;
    assert!(result.is_err(), "reported success: {result:?}");
    assert_eq!(
        raw_status(record.id.as_str()).await,
        "active",
        "applied after all"
    );
    heal().await;
    // The cache was not told of a change that did not happen, and still agrees.
    let seen = cache.lookup(&secret.presented()).await.unwrap().unwrap();
    assert_eq!(seen.status, Status::Active);

    // A rotation whose read-back fails leaves the old secret working.
    corrupt_on("hash").await;
    let result = store.rotate(&record.id, Duration::ZERO, None).await;
    assert!(result.is_err(), "reported success");
    heal().await;
    let found = store.lookup(&secret.presented()).await.unwrap();
    assert!(
        found.is_some(),
        "the old secret died, and no new one was handed out"
    );

    // Healed, the same writes succeed and reach the cache at once.
    let disabled = store
        .set_status(&record.id, Status::Disabled)
        .await
        .unwrap();
    assert_eq!(disabled.status, Status::Disabled, "the record as committed");
    let seen = cache.lookup(&secret.presented()).await.unwrap().unwrap();
    assert_eq!(seen.status, Status::Disabled);
    let rotated = store
        .rotate(&record.id, Duration::ZERO, None)
        .await
        .unwrap();
    assert!(cache.lookup(&secret.presented()).await.unwrap().is_none());
    assert!(cache
        .lookup(&rotated.secret.presented())
        .await
        .unwrap()
        .is_some());
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use sqlx::sqlite::SqlitePoolOptions;
    use sqlx::Row;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("keygate-faults-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[tokio::test]
    async fn sqlite_writes_are_atomic() {
        let dir = scratch("atomic");
        let url = format!("sqlite://{}", dir.join("keys.db").display());
        let raw = SqlitePoolOptions::new()
            .max_connections(1)
            .connect(&format!("{url}?mode=rwc"))
            .await
            .unwrap();
        writes_are_atomic(
            &url,
            async |event| {
                // Applied to the pool's connection via the schema: every connection sees it.
                let sql = match event {
                    "status" => "CREATE TRIGGER corrupt AFTER UPDATE OF status ON keygate_keys \
                                 BEGIN UPDATE keygate_keys SET scopes = 'corrupt' WHERE id = NEW.id; END",
                    _ => "CREATE TRIGGER corrupt AFTER INSERT ON keygate_key_hashes \
                          BEGIN UPDATE keygate_keys SET scopes = 'corrupt' WHERE id = NEW.key_id; END",
                };
                sqlx::query(sql).execute(&raw).await.unwrap();
            },
            async || {
                sqlx::query("DROP TRIGGER corrupt").execute(&raw).await.unwrap();
            },
            async |id| {
                sqlx::query("SELECT status FROM keygate_keys WHERE id = ?")
                    .bind(id.to_owned())
                    .fetch_one(&raw)
                    .await
                    .unwrap()
                    .get::<String, _>("status")
            },
        )
        .await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The database file vanishes for a moment (a restore: remove, then move a copy in).
    /// Connections opened meanwhile must not create an empty database there: once the file
    /// is back, every operation works again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_briefly_missing_file_does_not_poison_the_pool() {
        use sqlx::Connection as _;

        let dir = scratch("missing");
        let path = dir.join("keys.db");
        let url = format!("sqlite://{}", path.display());
        let (store, _cache, record, _secret) = setup(&url).await;
        let backup = dir.join("backup.db");
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(&format!("VACUUM INTO '{}'", backup.display()))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();

        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        // Meanwhile the pool grows: new connections must fail, not create the file.
        let attempts: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                let id = record.id.clone();
                tokio::spawn(async move { store.get(&id).await })
            })
            .collect();
        for attempt in attempts {
            if let Err(error) = attempt.await.unwrap() {
                assert!(!error.to_string().contains("no such table"), "{error}");
            }
        }
        assert!(!path.exists(), "a connection created an empty database");

        std::fs::rename(&backup, &path).unwrap();
        for _ in 0..10 {
            let rounds: Vec<_> = (0..8)
                .map(|_| {
                    let store = store.clone();
                    let id = record.id.clone();
                    tokio::spawn(async move { store.get(&id).await })
                })
                .collect();
            for round in rounds {
                let got = round.await.unwrap();
                assert!(got.is_ok(), "{got:?}");
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(feature = "test-servers")]
mod postgres {
    use super::*;
    use sqlx::Row;

    fn url() -> String {
        std::env::var("KEYGATE_TEST_POSTGRES_URL")
            .expect("KEYGATE_TEST_POSTGRES_URL is not set (bash .ci/run sets it)")
    }

    async fn admin() -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url())
            .await
            .expect("connect to KEYGATE_TEST_POSTGRES_URL")
    }

    fn scratch_name() -> String {
        format!("keygate_faults_{}", std::process::id())
    }

    /// A database of its own, so that this test's triggers never meet the conformance run.
    async fn scratch_database() -> String {
        let base = url();
        let admin = admin().await;
        let name = scratch_name();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&admin)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("KEYGATE_TEST_POSTGRES_URL has no database name"),
        }
    }

    #[tokio::test]
    async fn postgres_writes_are_atomic() {
        let url = scratch_database().await;
        let raw = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        writes_are_atomic(
            &url,
            async |event| {
                let column = if event == "status" { "id" } else { "key_id" };
                sqlx::query(&format!(
                    "CREATE OR REPLACE FUNCTION keygate_corrupt() RETURNS trigger AS $$ \
                     BEGIN UPDATE keygate_keys SET scopes = 'corrupt' WHERE id = NEW.{column}; \
                     RETURN NULL; END $$ LANGUAGE plpgsql"
                ))
                .execute(&raw)
                .await
                .unwrap();
                let sql = match event {
                    "status" => {
                        "CREATE TRIGGER corrupt AFTER UPDATE OF status ON keygate_keys \
                                 FOR EACH ROW WHEN (pg_trigger_depth() = 0) \
                                 EXECUTE FUNCTION keygate_corrupt()"
                    }
                    _ => {
                        "CREATE TRIGGER corrupt AFTER INSERT ON keygate_key_hashes \
                          FOR EACH ROW EXECUTE FUNCTION keygate_corrupt()"
                    }
                };
                sqlx::query(sql).execute(&raw).await.unwrap();
            },
            async || {
                for sql in [
                    "DROP TRIGGER IF EXISTS corrupt ON keygate_keys",
                    "DROP TRIGGER IF EXISTS corrupt ON keygate_key_hashes",
                ] {
                    sqlx::query(sql).execute(&raw).await.unwrap();
                }
            },
            async |id| {
                sqlx::query("SELECT status FROM keygate_keys WHERE id = $1")
                    .bind(id.to_owned())
                    .fetch_one(&raw)
                    .await
                    .unwrap()
                    .get::<String, _>("status")
            },
        )
        .await;
        raw.close().await;
        let admin = admin().await;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            scratch_name()
        ))
        .execute(&admin)
        .await
        .unwrap();
    }

    /// Nothing listens on port 1: the error says the connection was refused, not that a
    /// pool timed out.
    #[tokio::test]
    async fn an_unreachable_server_says_what_failed() {
        let error = SqlStore::connect("postgres://keygate:s3cr3t-pw@127.0.0.1:1/keygate")
            .await
            .unwrap_err()
            .to_string();
        assert!(error.to_lowercase().contains("refused"), "{error}");
        assert!(!error.contains("timed out"), "{error}");
        assert!(!error.contains("s3cr3t-pw"), "{error}");
    }
}
