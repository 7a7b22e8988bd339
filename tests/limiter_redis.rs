//! `RedisLimiter` against real servers: the limiter conformance suite on one Redis and on a
//! Redis Cluster (the fake clock passed to the script), the same numbers as the memory
//! store, no double charge, expiry, `NOSCRIPT`, and the failure policies against a Redis
//! this test starts and kills itself.
//!
//! Needs `KEYGATE_TEST_REDIS_URL` and `KEYGATE_TEST_REDIS_CLUSTER` (comma-separated nodes);
//! `bash .ci/run` starts both. Without them the tests fail: they never skip.
#![cfg(feature = "test-servers")]

mod common;

use common::servers::{cluster_nodes, redis_url};
mod limiter_conformance;

use std::time::Duration;

use common::servers::OwnRedis;
use keygate::clock::FakeClock;
use keygate::ratelimit::{
    Decision, FailurePolicy, MemoryLimiter, Quota, RedisLimiter, RedisLimiterError,
};
use redis::AsyncCommands;

/// A prefix no other run shares.
fn fresh_prefix() -> String {
    common::servers::fresh_prefix("test")
}

struct OnRedis(RedisLimiter<String>);

impl limiter_conformance::Subject for OnRedis {
    async fn decide(&self, key: &str, quotas: &[Quota], cost: u32) -> Decision {
        self.0
            .decide(&key.to_owned(), quotas, cost)
            .await
            .expect("Redis decides")
    }

    async fn refund(&self, key: &str, quotas: &[Quota], cost: u32) {
        self.0
            .give_back(&key.to_owned(), quotas, cost)
            .await
            .expect("Redis gives back");
    }
}

async fn single() -> (OnRedis, FakeClock) {
    let clock = limiter_conformance::clock();
    let limiter = RedisLimiter::builder(redis_url())
        .prefix(fresh_prefix())
        .timeout(Duration::from_secs(5))
        .clock(clock.clone())
        .connect()
        .await
        .expect("connect to KEYGATE_TEST_REDIS_URL");
    (OnRedis(limiter), clock)
}

async fn cluster() -> (OnRedis, FakeClock) {
    let clock = limiter_conformance::clock();
    let limiter = RedisLimiter::cluster_builder(cluster_nodes())
        .prefix(fresh_prefix())
        .timeout(Duration::from_secs(5))
        .clock(clock.clone())
        .connect()
        .await
        .expect("connect to KEYGATE_TEST_REDIS_CLUSTER");
    (OnRedis(limiter), clock)
}

mod on_one_redis {
    use super::*;
    limiter_conformance!(single);
}

mod on_a_cluster {
    use super::*;
    limiter_conformance!(cluster);
}

struct Memory(MemoryLimiter<String>);

impl limiter_conformance::Subject for Memory {
    async fn decide(&self, key: &str, quotas: &[Quota], cost: u32) -> Decision {
        self.0
            .decide(&key.to_owned(), quotas, cost)
            .expect("memory")
    }
    async fn refund(&self, key: &str, quotas: &[Quota], cost: u32) {
        self.0.refund(&key.to_owned(), quotas, cost);
    }
}

#[tokio::test]
async fn the_same_numbers_as_the_memory_store() {
    let clock = limiter_conformance::clock();
    let memory = Memory(
        MemoryLimiter::builder()
            .clock(clock.clone())
            .build()
            .expect("memory"),
    );
    let expected = limiter_conformance::transcript(&memory, &clock, "t").await;
    for (subject, clock) in [single().await, cluster().await] {
        let got = limiter_conformance::transcript(&subject, &clock, "t").await;
        assert_eq!(got.len(), expected.len());
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "decision {i}");
        }
    }
    assert!(
        expected.iter().any(|d| !d.allowed) && expected.iter().any(|d| d.allowed),
        "the transcript has both verdicts"
    );
}

#[tokio::test]
async fn concurrent_decisions_on_one_key_admit_exactly_the_capacity() {
    for (OnRedis(limiter), _clock) in [single().await, cluster().await] {
        let q = [Quota::per_minute(
            std::num::NonZeroU32::new(500).expect("nz"),
        )];
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    let mut admitted = 0u32;
                    for _ in 0..50 {
                        if limiter
                            .decide(&"hot".to_owned(), &q, 1)
                            .await
                            .expect("decide")
                            .allowed
                        {
                            admitted += 1;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.expect("task");
        }
        assert_eq!(total, 500, "16 × 50 requests against 500: exactly 500 pass");
    }
}

const SCRIPT: &str = include_str!("../src/ratelimit/redis.lua");

/// One script call (see `redis.lua`) at the fixed time 1 700 000 000 s, every decision on
/// one window of 3 a minute (a burst of 60 s, a charge of 20 s): each group is (bucket,
/// marker hash, mode, tokens). Answers: now, then for each group the window's offset
/// before it and each decision's status.
fn invoke_groups<'a>(
    script: &'a redis::Script,
    marker_ms: u64,
    groups: &[(&str, &str, &str, &[&str])],
) -> redis::ScriptInvocation<'a> {
    let mut inv = script.prepare_invoke();
    for (bucket, markers, _, _) in groups {
        inv.key(*bucket).key(*markers);
    }
    inv.arg(marker_ms).arg("1700000000").arg("0").arg("0");
    inv.arg(1).arg(1);
    for a in ["w:3:20000000000", "60", "0", "20", "0"] {
        inv.arg(a);
    }
    for (_, _, mode, tokens) in groups {
        inv.arg(*mode).arg(1).arg(tokens.len());
        for token in *tokens {
            inv.arg(*token);
        }
    }
    inv
}

/// [`invoke_groups`] with each decision a group of its own: each answers its offset before
/// it (seconds, nanoseconds) and its status.
fn invoke<'a>(
    script: &'a redis::Script,
    marker_ms: u64,
    decisions: &[(&str, &str, &str, &str)],
) -> redis::ScriptInvocation<'a> {
    let groups: Vec<(&str, &str, &str, &[&str])> = decisions
        .iter()
        .map(|(bucket, markers, mode, token)| {
            (*bucket, *markers, *mode, std::slice::from_ref(token))
        })
        .collect();
    invoke_groups(script, marker_ms, &groups)
}

/// The script called twice with the same decision token (a re-sent call) charges once, and
/// the second time reports the first verdict with the bucket as it is now.
#[tokio::test]
async fn a_resent_decision_charges_once() {
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let script = redis::Script::new(SCRIPT);
    let prefix = fresh_prefix();
    let bucket = format!("{prefix}{{s:k}}");
    let markers = format!("{bucket}:m:0");
    let call = |token: &str| invoke(&script, 2000, &[(&bucket, &markers, "c", token)]);
    let first: Vec<i64> = call("1").invoke_async(&mut conn).await.expect("eval");
    assert_eq!(first, [1_700_000_000, 0, 0, 0, 1]);
    let again: Vec<i64> = call("1").invoke_async(&mut conn).await.expect("eval");
    assert_eq!(
        again,
        [1_700_000_000, 0, 20, 0, 3],
        "the re-sent call was allowed (3: before, charging nothing now), and the bucket \
         holds one charge"
    );
    // Two more distinct decisions fit (3 a minute), a third does not: the re-send took none.
    for (token, expect) in [("2", 1), ("3", 1), ("4", 0)] {
        let answer: Vec<i64> = call(token).invoke_async(&mut conn).await.expect("eval");
        assert_eq!(answer[4], expect, "{token}: {answer:?}");
    }
    // The markers expire on their own (2 s here), the bucket with its window.
    let marker_ttl: i64 = conn.pttl(&markers).await.expect("pttl");
    assert!((1..=2000).contains(&marker_ttl), "{marker_ttl}");
    let tokens: usize = conn.hlen(&markers).await.expect("hlen");
    assert_eq!(tokens, 4, "one field per decision");
    let _: () = conn.del(&[&bucket, &markers]).await.expect("del");
}

/// One script call carrying several decisions (what the batching task sends) takes them in
/// order, as separate calls would: on one bucket each sees the charges before it, a re-sent
/// token inside the call charges nothing again, and a bucket or a marker hash holding the
/// wrong type fails neither its neighbours nor itself for good.
#[tokio::test]
async fn one_call_takes_several_decisions_in_order() {
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let script = redis::Script::new(SCRIPT);
    let prefix = fresh_prefix();
    let hot = format!("{prefix}{{s:hot}}");
    let other = format!("{prefix}{{s:other}}");
    let poisoned = format!("{prefix}{{s:poisoned}}");
    let odd = format!("{prefix}{{s:odd}}");
    let odd_markers = format!("{odd}:m:0");
    let _: () = conn.set(&poisoned, "not a hash").await.expect("set");
    let _: () = conn.set(&odd_markers, "not a hash").await.expect("set");
    let m = |bucket: &str| format!("{bucket}:m:0");
    let (hot_m, other_m, poisoned_m) = (m(&hot), m(&other), m(&poisoned));
    let decisions = [
        (hot.as_str(), hot_m.as_str(), "c", "1"),
        (&other, &other_m, "c", "1"),
        (&hot, &hot_m, "c", "2"),
        (&hot, &hot_m, "c", "2"), // the same token again: no second charge
        (&poisoned, &poisoned_m, "c", "1"),
        (&hot, &hot_m, "c", "3"),
        (&hot, &hot_m, "c", "4"),
        (&odd, &odd_markers, "c", "1"),
    ];
    let answers: Vec<i64> = invoke(&script, 2000, &decisions)
        .invoke_async(&mut conn)
        .await
        .expect("eval");
    let verdicts: Vec<&[i64]> = answers[2..].chunks(3).collect();
    let statuses: Vec<i64> = verdicts.iter().map(|v| v[2]).collect();
    // The poisoned bucket is dropped and read as empty, and fails closed for one burst.
    assert_eq!(statuses, [1, 1, 1, 3, 0, 1, 0, 1], "{answers:?}");
    assert_eq!(verdicts[0], [0, 0, 1]);
    assert_eq!(verdicts[2], [20, 0, 1]);
    assert_eq!(
        verdicts[3],
        [40, 0, 3],
        "the re-sent token: the bucket as it is"
    );
    assert_eq!(verdicts[5], [40, 0, 1], "and it took nothing");
    let kept: Option<String> = conn.hget(&odd_markers, "1").await.expect("hget");
    assert_eq!(
        kept.as_deref(),
        Some("1"),
        "the odd marker key is a hash again"
    );
    let _: () = conn
        .del(&[
            &hot,
            &other,
            &poisoned,
            &odd,
            &hot_m,
            &other_m,
            &poisoned_m,
            &odd_markers,
        ])
        .await
        .expect("del");
}

/// A group (a run of decisions on one bucket and spec, what a hot key's batch becomes) is
/// charged in order from one reading of the bucket: a token repeated inside it, or sent in
/// an earlier call, charges nothing; once one decision is refused, so are the rest.
#[tokio::test]
async fn a_group_charges_in_order_and_once_per_token() {
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let script = redis::Script::new(SCRIPT);
    let prefix = fresh_prefix();
    let bucket = format!("{prefix}{{s:group}}");
    let markers = format!("{bucket}:m:0");
    let first: Vec<i64> = invoke_groups(
        &script,
        2000,
        &[(&bucket, &markers, "c", &["a", "b", "a", "c", "d"])],
    )
    .invoke_async(&mut conn)
    .await
    .expect("eval");
    assert_eq!(first, [1_700_000_000, 0, 0, 0, 1, 1, 3, 1, 0]);
    let again: Vec<i64> =
        invoke_groups(&script, 2000, &[(&bucket, &markers, "c", &["d", "b", "e"])])
            .invoke_async(&mut conn)
            .await
            .expect("eval");
    assert_eq!(
        again,
        [1_700_000_000, 0, 60, 0, 4, 3, 0],
        "a full bucket (three charges of 20 s), re-sent tokens answered as before"
    );
    let _: () = conn.del(&[&bucket, &markers]).await.expect("del");
}

/// A refund that carries a token of its own (the give-back of a failed decision, retried
/// after a lost answer) gives back once, however often it is sent; one without gives back
/// each time.
#[tokio::test]
async fn a_marked_refund_gives_back_once() {
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let script = redis::Script::new(SCRIPT);
    let prefix = fresh_prefix();
    let bucket = format!("{prefix}{{s:refund}}");
    let markers = format!("{bucket}:m:0");
    let call = |mode: &str, markers: &str, token: &str| {
        invoke(&script, 60_000, &[(&bucket, markers, mode, token)])
    };
    let status = |answer: &[i64]| answer[4];
    for i in 0..3 {
        let charged: Vec<i64> = call("c", &markers, &i.to_string())
            .invoke_async(&mut conn)
            .await
            .expect("charge");
        assert_eq!(status(&charged), 1, "{charged:?}");
    }
    // The same marked refund three times: one token back.
    for _ in 0..3 {
        let refund: Vec<i64> = call("r", &markers, "0:r")
            .invoke_async(&mut conn)
            .await
            .expect("refund");
        assert_eq!(status(&refund), 2, "{refund:?}");
    }
    let after: Vec<i64> = call("c", &markers, "3")
        .invoke_async(&mut conn)
        .await
        .expect("charge");
    assert_eq!(status(&after), 1, "one token was given back: {after:?}");
    let full: Vec<i64> = call("c", &markers, "4")
        .invoke_async(&mut conn)
        .await
        .expect("charge");
    assert_eq!(status(&full), 0, "only one: {full:?}");
    // Unmarked refunds (no token, the bucket in the markers' place) each give back.
    for _ in 0..2 {
        let _: Vec<i64> = call("r", &bucket, "")
            .invoke_async(&mut conn)
            .await
            .expect("refund");
    }
    for i in 5..7 {
        let again: Vec<i64> = call("c", &markers, &i.to_string())
            .invoke_async(&mut conn)
            .await
            .expect("charge");
        assert_eq!(status(&again), 1, "{i}: {again:?}");
    }
    let _: () = conn.del(&[&bucket, &markers]).await.expect("del");
}

/// A bucket lives only while a window is not full; Redis's own clock decides.
#[tokio::test]
async fn buckets_expire_with_their_window_on_redis_time() {
    let prefix = fresh_prefix();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(redis_url())
        .prefix(prefix.clone())
        .connect()
        .await
        .expect("connect");
    let q = [Quota::per_minute(
        std::num::NonZeroU32::new(60).expect("nz"),
    )];
    for _ in 0..3 {
        assert!(
            limiter
                .decide(&"e".to_owned(), &q, 1)
                .await
                .expect("decide")
                .allowed
        );
    }
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let ttl: i64 = conn.pttl(format!("{prefix}{{s:e}}")).await.expect("pttl");
    // Three tokens of 60 a minute: full again in 3 s.
    assert!((2000..=3001).contains(&ttl), "{ttl}");
    // Only this bucket and its decisions' marker hash exist under the prefix: three tokens,
    // kept for the timeout and a second.
    let mut keys: Vec<String> = conn.keys(format!("{prefix}*")).await.expect("keys");
    keys.sort();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let tokens: usize = conn.hlen(&keys[1]).await.expect("hlen");
    assert_eq!(tokens, 3, "{keys:?}");
    let kept: i64 = conn.pttl(&keys[1]).await.expect("pttl");
    assert!((1..=1500).contains(&kept), "{kept}");
}

/// After `SCRIPT FLUSH` (a restart, a failover) the script is loaded again transparently.
#[tokio::test]
async fn noscript_reloads() {
    let (OnRedis(limiter), _clock) = single().await;
    let q = [Quota::per_minute(std::num::NonZeroU32::new(5).expect("nz"))];
    assert!(
        limiter
            .decide(&"n".to_owned(), &q, 1)
            .await
            .expect("first")
            .allowed
    );
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("flush");
    let d = limiter
        .decide(&"n".to_owned(), &q, 1)
        .await
        .expect("after flush");
    assert_eq!(d.numbers.remaining, 3);
}

async fn limiter_on(own: &OwnRedis, policy: FailurePolicy) -> RedisLimiter<String> {
    RedisLimiter::builder(own.url())
        .policy(policy)
        .timeout(Duration::from_millis(200))
        .breaker(2, Duration::from_millis(300))
        .connect()
        .await
        .expect("build")
}

/// Decides until `done` holds, at most for `limit` (polling, not sleeping a fixed time).
async fn until<F: Fn(&RedisLimiter<String>) -> bool>(
    limiter: &RedisLimiter<String>,
    limit: Duration,
    done: F,
) {
    let q = [Quota::per_minute(
        std::num::NonZeroU32::new(1000).expect("nz"),
    )];
    let end = tokio::time::Instant::now() + limit;
    while !done(limiter) {
        assert!(
            tokio::time::Instant::now() < end,
            "not reached within {limit:?}: {:?}",
            limiter.stats()
        );
        let _ = limiter.decide(&"poll".to_owned(), &q, 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_failure_policy_does_what_it_says_and_recovers() {
    let q = [Quota::per_minute(std::num::NonZeroU32::new(2).expect("nz"))];
    for policy in [
        FailurePolicy::Closed,
        FailurePolicy::Open,
        FailurePolicy::Local,
    ] {
        let mut own = OwnRedis::start();
        let limiter = limiter_on(&own, policy).await;
        let key = "p".to_owned();
        assert!(limiter.decide(&key, &q, 1).await.expect("up").allowed);
        own.kill();

        // Down: every decision answers within the timeout (plus scheduling slack), by the
        // policy.
        for i in 0..6 {
            let started = std::time::Instant::now();
            let answer = limiter.decide(&key, &q, 1).await;
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(2),
                "{policy:?} {i}: took {took:?}"
            );
            match policy {
                FailurePolicy::Closed => assert!(
                    matches!(
                        answer,
                        Err(RedisLimiterError::Redis(_)
                            | RedisLimiterError::Timeout(_)
                            | RedisLimiterError::BreakerOpen)
                    ),
                    "{answer:?}"
                ),
                FailurePolicy::Open => assert!(answer.expect("open admits").allowed),
                FailurePolicy::Local => {
                    // The local bucket is fresh: 2 pass, then refused.
                    let d = answer.expect("local decides");
                    assert_eq!(d.allowed, i < 2, "{i}");
                }
                _ => unreachable!(),
            }
        }
        let stats = limiter.stats();
        assert!(stats.breaker_opened >= 1, "{stats:?}");
        assert!(stats.skipped >= 1, "the breaker spared Redis: {stats:?}");
        match policy {
            FailurePolicy::Closed => assert_eq!(stats.fail_closed, 6),
            FailurePolicy::Open => assert_eq!(stats.fail_open, 6),
            FailurePolicy::Local => assert_eq!(stats.fail_local, 6),
            _ => unreachable!(),
        }

        // Back: the limiter finds Redis again without a restart.
        own.restart();
        let before = limiter.stats().decided;
        until(&limiter, Duration::from_secs(20), |l| {
            l.stats().decided > before
        })
        .await;
        // Redis's bucket for the key still holds the one token taken before the outage
        // (Redis kept nothing on disk: a fresh bucket after a restart is what it says).
        let d = limiter.decide(&key, &q, 1).await.expect("decides on Redis");
        assert!(d.allowed);
    }
}

#[tokio::test]
async fn a_builder_error_never_prints_the_password() {
    let err = RedisLimiter::<String>::builder("redis://:hunter2-secret@127.0.0.1:1/notanumber")
        .connect()
        .await;
    if let Err(e) = err {
        let text = format!("{e} {e:?}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    let builder = RedisLimiter::<String>::builder("redis://:hunter2-secret@127.0.0.1:1/");
    assert!(!format!("{builder:?}").contains("hunter2"));
    // Unreachable: the lazy connection fails the decision, and the error hides it too.
    let limiter: RedisLimiter<String> = builder
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect("lazy");
    let q = [Quota::per_minute(std::num::NonZeroU32::new(2).expect("nz"))];
    let e = limiter
        .decide(&"x".to_owned(), &q, 1)
        .await
        .expect_err("nothing listens on port 1");
    let text = format!("{e} {e:?} {:?}", std::error::Error::source(&e));
    assert!(!text.contains("hunter2"), "{text}");
}

fn nz(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).expect("non-zero")
}

/// Decisions of concurrent requests share script calls, and the shared calls admit exactly
/// the quota: 64 requests on one key of 50 an hour, all started before the first call goes
/// out, take one call (two if Redis had to load the script), not 64.
#[tokio::test]
async fn concurrent_decisions_share_calls_and_admit_exactly_the_quota() {
    let limiter: RedisLimiter<String> = RedisLimiter::builder(redis_url())
        .prefix(fresh_prefix())
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    let quota = [Quota::per_hour(nz(50))];
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let limiter = limiter.clone();
        tasks.spawn(async move {
            limiter
                .decide(&"shared".to_owned(), &quota, 1)
                .await
                .expect("decide")
                .allowed
        });
    }
    let mut admitted = 0;
    while let Some(allowed) = tasks.join_next().await {
        admitted += usize::from(allowed.expect("task"));
    }
    assert_eq!(admitted, 50);
    let stats = limiter.stats();
    assert_eq!(stats.decided, 64);
    assert!(
        stats.calls <= 2,
        "64 decisions went in {} calls",
        stats.calls
    );
}

/// On a cluster a call's keys must share a hash slot: concurrent decisions on many keys are
/// grouped by bucket, and none fails with `CROSSSLOT`.
#[tokio::test]
async fn concurrent_decisions_on_many_keys_of_a_cluster_never_cross_slots() {
    let limiter: RedisLimiter<String> = RedisLimiter::cluster_builder(cluster_nodes())
        .prefix(fresh_prefix())
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    let quota = [Quota::per_hour(nz(2))];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..120 {
        let limiter = limiter.clone();
        // 40 keys, three requests each: two pass, one is refused.
        let key = format!("key-{}", i % 40);
        tasks.spawn(async move {
            let decision = limiter.decide(&key, &quota, 1).await;
            (key, decision.expect("decide").allowed)
        });
    }
    let mut admitted = std::collections::HashMap::<String, usize>::new();
    while let Some(done) = tasks.join_next().await {
        let (key, allowed) = done.expect("task");
        *admitted.entry(key).or_default() += usize::from(allowed);
    }
    assert_eq!(admitted.len(), 40);
    assert!(admitted.values().all(|n| *n == 2), "{admitted:?}");
    let stats = limiter.stats();
    assert_eq!((stats.decided, stats.failures), (120, 0));
}

/// A limiter whose runtime ended (its batching task went with it) still decides, each
/// decision on its own call, in the runtime it is used from.
#[test]
fn a_limiter_outliving_the_runtime_it_was_built_in_still_decides() {
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let limiter: RedisLimiter<String> = first
        .block_on(
            RedisLimiter::builder(redis_url())
                .prefix(fresh_prefix())
                .timeout(Duration::from_secs(5))
                .connect(),
        )
        .expect("connect");
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let quota = [Quota::per_hour(nz(2))];
    let allowed: Vec<bool> = second.block_on(async {
        let mut allowed = Vec::new();
        for _ in 0..3 {
            let decision = limiter.decide(&"orphan".to_owned(), &quota, 1).await;
            allowed.push(decision.expect("decide").allowed);
        }
        allowed
    });
    assert_eq!(allowed, [true, true, false]);
}

/// A decision that timed out on a stalled Redis, which then ran it: settling finds the
/// charge and gives it back, and keeps the decision's marker for as long as settling may
/// retry (two minutes), not the timeout plus a second. A settle try whose answer is lost
/// (it timed out too) thus still leaves the answer for the next try to read.
#[tokio::test]
async fn settling_keeps_the_marker_of_a_decision_that_ran_late() {
    let own = OwnRedis::start();
    let prefix = fresh_prefix();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
        .prefix(prefix.clone())
        .timeout(Duration::from_millis(100))
        .breaker(1_000_000, Duration::from_millis(100))
        .connect()
        .await
        .expect("connect");
    let quota = [Quota::per_hour(nz(10))];
    let key = "late".to_owned();
    assert!(
        limiter
            .decide(&key, &quota, 1)
            .await
            .expect("decide")
            .allowed
    );
    let sleeper = common::servers::stall(&own.url(), 1).await;
    let refused = limiter.decide(&key, &quota, 1).await;
    assert!(
        matches!(refused, Err(RedisLimiterError::Timeout(_))),
        "{refused:?}"
    );
    sleeper.await.expect("sleeper");
    // Settling ends (a bounded poll), having given the charge back: 9 left.
    let started = std::time::Instant::now();
    while limiter.stats().settling > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            limiter.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut probe = redis::Client::open(own.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    // The hash of the decisions' tokens (the give-back's token is kept there too).
    let markers: Vec<String> = probe
        .keys(format!("{prefix}{{s:late}}:m:*"))
        .await
        .expect("keys");
    let mut kept = Vec::new();
    for marker in &markers {
        let ttl: i64 = probe.pttl(marker).await.expect("pttl");
        kept.push(ttl);
    }
    assert!(
        kept.iter().any(|ttl| *ttl > 60_000),
        "the late decision's marker is kept while settling may retry: {markers:?} {kept:?}"
    );
    let mut left = 0;
    for _ in 0..12 {
        if limiter
            .decide(&key, &quota, 1)
            .await
            .expect("decide")
            .allowed
        {
            left += 1;
        }
    }
    assert_eq!(left, 9, "the refused request's charge was given back");
}
