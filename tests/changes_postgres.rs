//! Changes reach every instance on PostgreSQL: two `SqlStore`s on one database (two
//! "instances"), each with its cache and its listener. A write through one drops the key
//! from the other's cache (the delay is printed); a rolled-back write sends nothing; a lost
//! listening connection empties the cache, and changes arrive again after the reconnect; a
//! malformed notification changes nothing; rotation grace holds across instances.
//!
//! Needs `KEYGATE_TEST_POSTGRES_URL`; the test makes its own database on that server
//! (`keygate_changes_test`, dropped and made afresh), so that no other test binary's
//! notifications or tables meet its own.
#![cfg(feature = "test-servers")]

mod common;

use std::time::{Duration, Instant};

use common::servers::{next, spy, status_through, until, Heard};
use keygate::key::{Environment, KeyHash};
use keygate::lookup::CachedLookup;
use keygate::record::Status;
use keygate::store::{KeyStore, KeyUpdate, NewKey, OwnerStore, SqlStore};
use sqlx::postgres::PgPoolOptions;
use sqlx::Row;

const DATABASE: &str = "keygate_changes_test";

fn url() -> String {
    std::env::var("KEYGATE_TEST_POSTGRES_URL").expect(
        "KEYGATE_TEST_POSTGRES_URL is not set: point it at a scratch PostgreSQL database \
         (bash .ci/run creates one), e.g. postgres://postgres@127.0.0.1:5432/keygate_test",
    )
}

/// The URL with another database name.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_end = base
        .find("://")
        .map(|at| at + 3)
        .and_then(|start| base[start..].find('/').map(|slash| start + slash))
        .unwrap_or(base.len());
    format!("{}/{name}{query}", &base[..authority_end])
}

/// A fresh database for this test binary alone.
async fn fresh_database() -> String {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url())
        .await
        .expect("connect to KEYGATE_TEST_POSTGRES_URL");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        .execute(&admin)
        .await
        .expect("drop the test database");
    sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
        .execute(&admin)
        .await
        .expect("create the test database");
    admin.close().await;
    with_database(&url(), DATABASE)
}

// One test: its steps share the two instances, and run one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_one_instance_reach_the_other() {
    let url = fresh_database().await;
    let a = SqlStore::connect(&url).await.expect("instance A");
    let b = SqlStore::connect(&url).await.expect("instance B");
    let cache_a = CachedLookup::over_store(a.clone());
    let cache_b = CachedLookup::over_store(b.clone());
    let _listening_a = a.listen().await.expect("A listens");
    let listening_b = b.listen().await.expect("B listens");
    assert!(format!("{listening_b:?}").contains("keygate_changes"));
    let mut heard = spy(&b);

    a.add_owner("ada", None).await.unwrap();
    let created = a
        .create(NewKey::new("ada", "main", Environment::Live))
        .await
        .unwrap();
    let key = created.secret;
    let id = created.record.id;
    until(&mut heard, &key.hash()).await;

    // Cached on both; disabled through A; refused through B's cache.
    assert_eq!(status_through(&cache_a, &key).await, Some(Status::Active));
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Active));
    assert_eq!(cache_b.len(), 1);
    let started = Instant::now();
    a.set_status(&id, Status::Disabled).await.unwrap();
    let committed = started.elapsed();
    until(&mut heard, &key.hash()).await;
    let delay = started.elapsed();
    println!(
        "disable through A reached B's cache {:?} after A's write returned \
         ({delay:?} after it began)",
        delay.saturating_sub(committed)
    );
    assert!(cache_b.is_empty(), "B's cache dropped the key");
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Disabled));
    a.set_status(&id, Status::Active).await.unwrap();
    until(&mut heard, &key.hash()).await;
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Active));

    // A write whose transaction rolls back (here its commit is refused by a deferred
    // trigger) sends nothing; neither does a hand-made NOTIFY rolled back.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    for statement in [
        "CREATE FUNCTION keygate_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.name = 'doomed' THEN RAISE EXCEPTION 'refused at commit'; END IF; \
         RETURN NEW; END $$",
        "CREATE CONSTRAINT TRIGGER keygate_test_refuse AFTER UPDATE ON keygate_keys \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION keygate_test_refuse()",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let mut doomed = KeyUpdate::default();
    doomed.name = Some("doomed".to_owned());
    let refused = a.update(&id, doomed).await;
    assert!(refused.is_err(), "the commit is refused: {refused:?}");
    assert_eq!(
        a.get(&id).await.unwrap().name,
        "main",
        "nothing was written"
    );
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_notify('keygate_changes', $1)")
        .bind(key.hash().to_hex())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Active));
    let sentinel = a
        .create(NewKey::new("ada", "sentinel", Environment::Live))
        .await
        .unwrap();
    let before = until(&mut heard, &sentinel.secret.hash()).await;
    assert_eq!(before, vec![], "rolled-back writes sent nothing");
    assert_eq!(cache_b.len(), 1, "B's cached key stayed");

    // Garbage on the channel changes nothing and stops nothing.
    for payload in ["garbage", "", ",", "zz,zz", &"f".repeat(7000)] {
        sqlx::query("SELECT pg_notify('keygate_changes', $1)")
            .bind(payload)
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query("NOTIFY keygate_changes, 'garbage'")
        .execute(&pool)
        .await
        .unwrap();
    let sentinel = a
        .create(NewKey::new("ada", "sentinel 2", Environment::Live))
        .await
        .unwrap();
    let before = until(&mut heard, &sentinel.secret.hash()).await;
    assert_eq!(before, vec![], "malformed notifications announce nothing");
    assert_eq!(cache_b.len(), 1, "B's cached key stayed");
    assert!(listening_b.is_running());

    // Rotation with a grace period: B drops the old secret's entry, and both secrets work
    // through B until the grace ends; rotation without one refuses the old secret at once.
    let rotated = a
        .rotate(&id, Duration::from_secs(3600), None)
        .await
        .unwrap();
    until(&mut heard, &rotated.secret.hash()).await;
    assert!(cache_b.is_empty(), "B dropped the rotated key");
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Active));
    assert_eq!(
        status_through(&cache_b, &rotated.secret).await,
        Some(Status::Active)
    );
    let again = a.rotate(&id, Duration::ZERO, None).await.unwrap();
    until(&mut heard, &again.secret.hash()).await;
    assert_eq!(status_through(&cache_b, &key).await, None);
    assert_eq!(status_through(&cache_b, &rotated.secret).await, None);
    let key = again.secret;
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Active));

    // Revoking hundreds of keys at once: several notifications, every key heard.
    let mut many = Vec::new();
    for i in 0..250 {
        let created = a
            .create(NewKey::new("ada", format!("bulk {i}"), Environment::Live))
            .await
            .unwrap();
        many.push(created.secret.hash());
    }
    until(&mut heard, many.last().unwrap()).await;
    let revoked = a.revoke_all("ada").await.unwrap();
    assert_eq!(revoked, 253);
    let mut missing: std::collections::HashSet<String> = many.iter().map(KeyHash::to_hex).collect();
    missing.insert(key.hash().to_hex());
    while !missing.is_empty() {
        if let Heard::Remote(hash) = next(&mut heard, "every revoked key").await {
            missing.remove(&hash);
        }
    }
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Revoked));

    // The listening connections are killed: B's cache is emptied, B listens again (and
    // empties it once more), and later changes arrive.
    a.add_owner("bob", None).await.unwrap();
    let bob = a
        .create(NewKey::new("bob", "bob", Environment::Live))
        .await
        .unwrap();
    until(&mut heard, &bob.secret.hash()).await;
    assert_eq!(
        status_through(&cache_b, &bob.secret).await,
        Some(Status::Active)
    );
    assert!(!cache_b.is_empty());
    let killed = Instant::now();
    let terminated = sqlx::query(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
    .get::<i64, _>("n");
    assert_eq!(terminated, 2, "A's and B's listening connections");
    assert_eq!(next(&mut heard, "the first All").await, Heard::All);
    assert!(cache_b.is_empty(), "a lost subscription empties the cache");
    // A key cached while nobody listens...
    assert_eq!(
        status_through(&cache_b, &bob.secret).await,
        Some(Status::Active)
    );
    // ...is dropped once more when listening resumes (unless the reconnect came first).
    assert_eq!(
        next(&mut heard, "the All after reconnecting").await,
        Heard::All
    );
    println!(
        "B listened again {:?} after its connection was killed",
        killed.elapsed()
    );
    assert_eq!(
        status_through(&cache_b, &bob.secret).await,
        Some(Status::Active)
    );
    a.set_status(&bob.record.id, Status::Disabled)
        .await
        .unwrap();
    until(&mut heard, &bob.secret.hash()).await;
    assert_eq!(
        status_through(&cache_b, &bob.secret).await,
        Some(Status::Disabled)
    );
    assert!(listening_b.is_running());

    // Stopped: the task ends, and changes reach B after its TTL only.
    listening_b.stop();
    pool.close().await;
}

/// A store on SQLite cannot listen, and says why.
#[tokio::test]
async fn sqlite_cannot_listen() {
    let store = SqlStore::connect("sqlite::memory:").await.unwrap();
    let error = store.listen().await.expect_err("SQLite has no NOTIFY");
    assert!(error.to_string().contains("RedisChanges"), "{error}");
}
