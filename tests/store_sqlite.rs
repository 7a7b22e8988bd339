//! The conformance suite on `SqlStore` over SQLite files (two handles: two pools on one
//! file), and the secrets-at-rest check.
#![cfg(feature = "sqlite")]

mod conformance;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use keygate::key::Environment;
use keygate::store::{ClientStore, KeyStore, NewClient, NewKey, OwnerStore, SqlStore};

fn scratch_dir() -> PathBuf {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "keygate-sqlite-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = scratch_dir();
    let counter = AtomicUsize::new(0);
    conformance::run(|clock| {
        let path = dir.join(format!("case{}.db", counter.fetch_add(1, Ordering::SeqCst)));
        async move {
            let url = format!("sqlite://{}", path.display());
            let a = SqlStore::builder(url.as_str())
                .clock(clock.clone())
                .connect()
                .await
                .expect("connect");
            let b = SqlStore::builder(url.as_str())
                .clock(clock)
                .connect()
                .await
                .expect("connect");
            (a, b)
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn secrets_never_reach_the_database_file() {
    let dir = scratch_dir();
    let path = dir.join("keys.db");
    let url = format!("sqlite://{}", path.display());
    let store = SqlStore::connect(&url).await.unwrap();
    store.add_owner("ada", Some("correct horse")).await.unwrap();
    let mut secrets = Vec::new();
    for i in 0..20 {
        let created = store
            .create(NewKey::new("ada", format!("k{i}"), Environment::Live))
            .await
            .unwrap();
        secrets.push(created.secret);
        let rotated = store
            .rotate(&created.record.id, std::time::Duration::from_secs(60), None)
            .await
            .unwrap();
        secrets.push(rotated.secret);
        let client = store
            .create_client(NewClient::new("ada", format!("c{i}")))
            .await
            .unwrap();
        secrets.push(client.secret);
    }
    drop(store);
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    assert!(bytes.len() > 4096, "the database was written");
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for secret in &secrets {
        let s = secret.expose_secret();
        assert!(!contains(s.as_bytes()), "a whole secret is stored");
        assert!(
            !contains(&s.as_bytes()[8..20]),
            "part of a secret is stored"
        );
        assert!(
            contains(secret.hash().as_bytes()),
            "the hash is what is stored"
        );
    }
    assert!(!contains(b"correct horse"), "a password is stored in clear");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn bad_urls_are_clear_errors() {
    for url in ["mysql://x", "", "sqlite", "http://localhost"] {
        let err = SqlStore::connect(url).await.unwrap_err();
        assert!(err.to_string().contains("database URL"), "{url}: {err}");
    }
    let err = SqlStore::connect("sqlite:///nonexistent-dir/deeper/keys.db")
        .await
        .unwrap_err();
    assert!(
        matches!(err, keygate::store::StoreError::Backend(_)),
        "{err}"
    );
}

#[tokio::test]
async fn an_in_memory_sqlite_database_works_too() {
    let store = SqlStore::connect("sqlite::memory:").await.unwrap();
    store.add_owner("ada", None).await.unwrap();
    let created = store
        .create(NewKey::new("ada", "k", Environment::Live))
        .await
        .unwrap();
    let found = keygate::lookup::KeyLookup::lookup(&store, &created.secret.presented())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, created.record.id);
    // Clones share the one connection, so they share the one database.
    let clone = store.clone();
    assert_eq!(clone.get(&created.record.id).await.unwrap().name, "k");
}

/// A database made before the audit trail and the last use IP: the store adds the table and
/// the column on connect, and what was there keeps working.
#[tokio::test]
async fn a_database_from_before_the_audit_trail_keeps_working() {
    use keygate::store::{AuditAction, AuditQuery};
    use sqlx::Row;

    let dir = scratch_dir();
    let url = format!("sqlite://{}", dir.join("old.db").display());
    let store = SqlStore::connect(&url).await.unwrap();
    store.add_owner("ada", None).await.unwrap();
    let created = store
        .create(NewKey::new("ada", "k", Environment::Live))
        .await
        .unwrap();
    drop(store);
    // Back to the old schema.
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    for step in [
        "DROP TABLE keygate_audit",
        "ALTER TABLE keygate_keys DROP COLUMN last_used_ip",
        "DROP TABLE keygate_clients",
        "DROP INDEX keygate_keys_rate_bucket",
        "ALTER TABLE keygate_keys DROP COLUMN rate_bucket",
    ] {
        sqlx::query(step).execute(&pool).await.unwrap();
    }

    let store = SqlStore::connect(&url).await.unwrap();
    let found = keygate::lookup::KeyLookup::lookup(&store, &created.secret.presented())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, created.record.id);
    assert_eq!(found.last_used_ip, None);
    assert!(store.audit(AuditQuery::default()).await.unwrap().is_empty());
    store
        .set_status(&created.record.id, keygate::record::Status::Disabled)
        .await
        .unwrap();
    let events = store.audit(AuditQuery::default()).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].action, AuditAction::Disabled);
    let columns = sqlx::query(
        "SELECT COUNT(*) AS n FROM pragma_table_info('keygate_keys') WHERE name = 'last_used_ip'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(columns.get::<i64, _>("n"), 1);
    assert_eq!(found.rate_bucket, None);
    // Clients and rate buckets work on the upgraded database.
    let client = store
        .create_client(NewClient::new("ada", "after"))
        .await
        .unwrap();
    let mut token = NewKey::new("ada", "token", Environment::Live);
    token.rate_bucket = Some(keygate::key::KeyId::new(client.client.id.as_str()));
    let token = store.create(token).await.unwrap();
    assert_eq!(
        store.get(&token.record.id).await.unwrap().rate_bucket,
        token.record.rate_bucket
    );
    store.revoke_client(&client.client.id).await.unwrap();
    assert_eq!(
        store.get(&token.record.id).await.unwrap().status,
        keygate::record::Status::Revoked
    );
    // A database with clients from before `client_by_secret` gets its index on connect.
    sqlx::query("DROP INDEX keygate_clients_secret")
        .execute(&pool)
        .await
        .unwrap();
    let store = SqlStore::connect(&url).await.unwrap();
    let indexes = sqlx::query(
        "SELECT COUNT(*) AS n FROM sqlite_master \
         WHERE type = 'index' AND name = 'keygate_clients_secret'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(indexes.get::<i64, _>("n"), 1);
    let found = store
        .client_by_secret(client.secret.expose_secret())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, client.client.id);
    assert!(!found.active);
    drop(store);
    // Connecting again changes nothing.
    drop(SqlStore::connect(&url).await.unwrap());
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
}
