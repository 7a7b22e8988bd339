//! Changes reach every instance through a Redis channel, whatever the store: two
//! `SqlStore`s on one SQLite file (two "instances", which SQLite cannot tell of each
//! other's writes), each with its cache, bridged by `RedisChanges`. A write through one drops
//! the key from the other's cache (the delay is printed); an instance skips its own
//! messages and never echoes another's; a killed subscription empties the cache, and
//! changes arrive again after resubscribing; garbage on the channel changes nothing.
//!
//! Needs `KEYGATE_TEST_REDIS_URL`. The channel's name is made afresh for each run, so that
//! other tests on the same Redis never meet this one's messages.
#![cfg(feature = "test-servers")]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::servers::{next, spy, status_through, until, Heard};
use keygate::key::Environment;
use keygate::lookup::CachedLookup;
use keygate::record::Status;
use keygate::store::{KeyStore, NewKey, OwnerStore, RedisChanges, SqlStore};

fn url() -> String {
    std::env::var("KEYGATE_TEST_REDIS_URL").expect(
        "KEYGATE_TEST_REDIS_URL is not set: point it at a scratch Redis (bash .ci/run starts \
         one), e.g. redis://127.0.0.1:6379/",
    )
}

fn unique(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

async fn redis_command(
    connection: &mut redis::aio::MultiplexedConnection,
    args: &[&str],
) -> redis::Value {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query_async(connection).await.expect("redis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_one_instance_reach_the_other_through_redis() {
    let file = std::env::temp_dir().join(format!("{}.db", unique("keygate-changes")));
    let database = format!("sqlite://{}", file.display());
    let channel = unique("keygate:changes:test");
    let a = SqlStore::connect(&database).await.expect("instance A");
    let b = SqlStore::connect(&database).await.expect("instance B");
    let cache_a = CachedLookup::over_store(a.clone());
    let cache_b = CachedLookup::over_store(b.clone());
    let mut heard_a = spy(&a);
    let mut heard_b = spy(&b);
    let changes_a = RedisChanges::builder(url())
        .channel(channel.as_str())
        .connect(a.clone())
        .await
        .expect("A broadcasts");
    let changes_b = RedisChanges::builder(url())
        .channel(channel.as_str())
        .connect(b.clone())
        .await
        .expect("B broadcasts");
    assert_eq!(changes_b.channel(), channel);
    assert!(!format!("{changes_b:?}").contains("redis://"));
    let mut redis = redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to KEYGATE_TEST_REDIS_URL");

    a.add_owner("ada", None).await.unwrap();
    let created = a
        .create(NewKey::new("ada", "main", Environment::Live))
        .await
        .unwrap();
    let key = created.secret;
    let id = created.record.id;
    until(&mut heard_b, &key.hash()).await;

    // Cached on both; disabled through A; refused through B's cache.
    assert_eq!(status_through(&cache_a, &key).await, Some(Status::Active));
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Active));
    let started = Instant::now();
    a.set_status(&id, Status::Disabled).await.unwrap();
    let written = started.elapsed();
    until(&mut heard_b, &key.hash()).await;
    let delay = started.elapsed();
    println!(
        "disable through A reached B's cache through Redis {:?} after A's write returned \
         ({delay:?} after it began)",
        delay.saturating_sub(written)
    );
    assert!(cache_b.is_empty(), "B's cache dropped the key");
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Disabled));

    // A skips its own messages, and B does not echo what it heard: the first thing A hears
    // is B's own write.
    let from_b = b
        .create(NewKey::new("ada", "from b", Environment::Live))
        .await
        .unwrap();
    let before = until(&mut heard_a, &from_b.secret.hash()).await;
    assert_eq!(before, vec![], "A heard neither itself nor an echo");
    assert_eq!(
        status_through(&cache_a, &key).await,
        Some(Status::Disabled),
        "A's own write reached its cache locally"
    );

    // Garbage on the channel changes nothing and stops nothing.
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Disabled));
    let someone = format!("0123456789abcdef {}", key.hash().to_hex());
    let bad_hash = format!("0123456789abcdef {}", "z".repeat(64));
    let bad_id = format!("xyz {}", key.hash().to_hex());
    for message in ["garbage", "", " ", &bad_hash, &bad_id, &"f".repeat(100_000)] {
        redis_command(&mut redis, &["PUBLISH", &channel, message]).await;
    }
    let sentinel = a
        .create(NewKey::new("ada", "sentinel", Environment::Live))
        .await
        .unwrap();
    let before = until(&mut heard_b, &sentinel.secret.hash()).await;
    assert_eq!(before, vec![], "malformed messages announce nothing");
    assert_eq!(cache_b.len(), 1, "B's cached key stayed");
    // A well-formed message from an instance that is not there is taken at its word.
    redis_command(&mut redis, &["PUBLISH", &channel, &someone]).await;
    until(&mut heard_b, &key.hash()).await;
    assert!(cache_b.is_empty());

    // The subscriptions are killed: B's cache is emptied, B subscribes again (and empties
    // it once more), and later changes arrive.
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Disabled));
    let killed = Instant::now();
    let count = redis_command(&mut redis, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert!(
        matches!(count, redis::Value::Int(n) if n >= 2),
        "A's and B's subscriptions: {count:?}"
    );
    assert_eq!(next(&mut heard_b, "the first All").await, Heard::All);
    assert!(cache_b.is_empty(), "a lost subscription empties the cache");
    assert_eq!(
        next(&mut heard_b, "the All after resubscribing").await,
        Heard::All
    );
    println!(
        "B subscribed again {:?} after its subscription was killed",
        killed.elapsed()
    );
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Disabled));
    a.set_status(&id, Status::Active).await.unwrap();
    until(&mut heard_b, &key.hash()).await;
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Active));

    // Rotation with a grace period across instances: both secrets work through B's cache,
    // and after a rotation without one, the old secret is refused at once.
    let rotated = a
        .rotate(&id, Duration::from_secs(3600), None)
        .await
        .unwrap();
    until(&mut heard_b, &rotated.secret.hash()).await;
    assert_eq!(status_through(&cache_b, &key).await, Some(Status::Active));
    assert_eq!(
        status_through(&cache_b, &rotated.secret).await,
        Some(Status::Active)
    );
    let again = a.rotate(&id, Duration::ZERO, None).await.unwrap();
    until(&mut heard_b, &again.secret.hash()).await;
    assert_eq!(status_through(&cache_b, &key).await, None);
    assert_eq!(status_through(&cache_b, &rotated.secret).await, None);

    // Dropped: A's writes no longer reach B.
    drop(changes_a);
    drop(changes_b);
    drop((cache_a, cache_b, a, b));
    let _ = std::fs::remove_file(&file);
}

/// Bad settings are refused before anything connects; an unreachable Redis is an error
/// that never shows the URL's password.
#[tokio::test]
async fn bad_settings_and_unreachable_redis_are_errors() {
    let store = keygate::store::MemoryStore::new();
    let empty = RedisChanges::builder(url())
        .channel("")
        .connect(store.clone())
        .await;
    assert!(empty.is_err());
    let zero = RedisChanges::builder(url())
        .queue_capacity(0)
        .connect(store.clone())
        .await;
    assert!(zero.is_err());
    let error = RedisChanges::connect("redis://:hunter2secret@127.0.0.1:1/", store)
        .await
        .expect_err("nothing listens on port 1");
    let text = format!("{error} {error:?}");
    assert!(!text.contains("hunter2secret"), "{text}");
    assert!(text.contains("refused"), "says what failed: {text}");
}
