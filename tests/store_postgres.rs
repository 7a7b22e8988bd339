//! The conformance suite on `SqlStore` over PostgreSQL, and the secrets-at-rest check.
//!
//! Needs `KEYGATE_TEST_POSTGRES_URL` (a database these tests may wipe); `.ci/run` starts
//! PostgreSQL and creates one. Without the variable the tests fail: they never skip.
#![cfg(feature = "test-servers")]

mod conformance;

use keygate::key::Environment;
use keygate::store::{ClientStore, KeyStore, NewClient, NewKey, OwnerStore, SqlStore};
use sqlx::Row;

fn url() -> String {
    std::env::var("KEYGATE_TEST_POSTGRES_URL").expect(
        "KEYGATE_TEST_POSTGRES_URL is not set: point it at a scratch PostgreSQL database \
         (bash .ci/run creates one), e.g. postgres://postgres@127.0.0.1:5432/keygate_test",
    )
}

async fn reset(url: &str) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("connect to KEYGATE_TEST_POSTGRES_URL");
    sqlx::query("DROP TABLE IF EXISTS keygate_audit, keygate_clients, keygate_key_hashes, keygate_keys, keygate_owners CASCADE")
        .execute(&pool)
        .await
        .expect("reset");
    pool.close().await;
}

// One test, so that cases never run against the database at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms_and_keeps_no_secret() {
    let url = url();
    conformance::run(|clock| {
        let url = url.clone();
        async move {
            reset(&url).await;
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

    // Secrets at rest: every stored column of every row, as text, holds no secret.
    reset(&url).await;
    let store = SqlStore::connect(&url).await.unwrap();
    store.add_owner("ada", Some("correct horse")).await.unwrap();
    let mut secrets = Vec::new();
    for i in 0..10 {
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
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect(&url)
        .await
        .unwrap();
    let mut dump = String::new();
    for table in [
        "keygate_owners",
        "keygate_keys",
        "keygate_key_hashes",
        "keygate_audit",
        "keygate_clients",
    ] {
        let rows = sqlx::query(&format!("SELECT row_to_json(t)::text AS j FROM {table} t"))
            .fetch_all(&pool)
            .await
            .unwrap();
        for row in rows {
            dump.push_str(&row.get::<String, _>("j"));
        }
    }
    assert!(dump.contains("argon2id"), "the password is hashed");
    assert!(!dump.contains("correct horse"));
    for secret in &secrets {
        let s = secret.expose_secret();
        assert!(!dump.contains(s), "a whole secret is stored");
        assert!(!dump.contains(&s[8..20]), "part of a secret is stored");
        let hex: String = secret
            .hash()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(dump.contains(&hex), "the hash is what is stored");
    }

    // A database from before the audit trail and the last use IP: the store adds the table
    // and the column on connect, and what was there keeps working.
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
    let found = keygate::lookup::KeyLookup::lookup(&store, &secrets[19].presented())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.last_used_ip, None);
    assert_eq!(found.rate_bucket, None);
    assert!(store
        .audit(keygate::store::AuditQuery::default())
        .await
        .unwrap()
        .is_empty());
    store.revoke_all("ada").await.unwrap();
    assert_eq!(
        store
            .audit(keygate::store::AuditQuery::default())
            .await
            .unwrap()
            .len(),
        10
    );
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
    drop(SqlStore::connect(&url).await.unwrap());
}
