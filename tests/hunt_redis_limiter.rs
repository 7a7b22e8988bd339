//! Attacks on `RedisLimiter`: over-admission across instances, refunds, quota changes,
//! the precision of the script's double arithmetic against `MemoryLimiter`, bucket-name
//! injection (single Redis and Cluster), double charges, failures (killed, slow, paused
//! Redis; the breaker), garbage in Redis, secrets in errors.
//!
//! Tests named `held_*` are attacks that held; the others are findings, fixed since and
//! kept so that they stay fixed.
//!
//! Needs `KEYGATE_TEST_REDIS_URL` and `KEYGATE_TEST_REDIS_CLUSTER`, and `redis-server` on
//! the PATH (some tests start and kill their own).
#![cfg(feature = "test-servers")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis_hunt::Rng;
use common::servers::{cluster_nodes, redis_url};

use std::net::TcpListener;
use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keygate::answer::Answer;
use keygate::clock::FakeClock;
use keygate::key::KeyId;
use keygate::ratelimit::{
    Decision, FailurePolicy, LimiterStore, MemoryLimiter, Quota, RedisLimiter, RedisLimiterError,
};
use redis::AsyncCommands;

const SEC: u64 = 1_000_000_000;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// A prefix no other run shares.
fn fresh_prefix() -> String {
    common::servers::fresh_prefix("hunt")
}

fn fake_clock() -> FakeClock {
    FakeClock::new(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn single_with<K: keygate::ratelimit::RedisBucketKey>(
    prefix: &str,
    clock: Option<FakeClock>,
) -> RedisLimiter<K> {
    let mut b = RedisLimiter::builder(redis_url())
        .prefix(prefix)
        .timeout(Duration::from_secs(5));
    if let Some(c) = clock {
        b = b.clock(c);
    }
    b.connect().await.expect("connect")
}

async fn cluster_with<K: keygate::ratelimit::RedisBucketKey>(
    prefix: &str,
    clock: Option<FakeClock>,
) -> RedisLimiter<K> {
    let mut b = RedisLimiter::cluster_builder(cluster_nodes())
        .prefix(prefix)
        .timeout(Duration::from_secs(5));
    if let Some(c) = clock {
        b = b.clock(c);
    }
    b.connect().await.expect("connect cluster")
}

// ------------------------------------------------------------------------------------------
// Over-admission: several instances (separate connections) on one key.
// ------------------------------------------------------------------------------------------

/// Four limiters (four connections, as four processes would have) hammer one key with two
/// windows and mixed costs: the tokens admitted never exceed the tighter window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_concurrent_instances_never_admit_more_than_the_quota() {
    for on_cluster in [false, true] {
        let prefix = fresh_prefix();
        let mut limiters: Vec<RedisLimiter<String>> = Vec::new();
        for _ in 0..4 {
            limiters.push(if on_cluster {
                cluster_with(&prefix, None).await
            } else {
                single_with(&prefix, None).await
            });
        }
        // A day window of 100 (one token back every 864 s: none during the test).
        let q = [Quota::per_day(nz(1000)), Quota::per_day(nz(100))];
        let mut tasks = Vec::new();
        for (t, limiter) in limiters.iter().cycle().take(8).enumerate() {
            let limiter = limiter.clone();
            tasks.push(tokio::spawn(async move {
                let mut taken = 0u64;
                for i in 0..40u32 {
                    let cost = 1 + (i + t as u32) % 3;
                    let d = limiter
                        .decide(&"hot".to_owned(), &q, cost)
                        .await
                        .expect("decide");
                    if d.allowed {
                        taken += u64::from(cost);
                    }
                }
                taken
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        assert!(
            total <= 100,
            "cluster={on_cluster}: {total} tokens admitted of 100"
        );
        assert!(total >= 98, "cluster={on_cluster}: only {total} admitted");
        // Whatever is left is exactly what the windows say.
        let left = limiters[0]
            .decide(&"hot".to_owned(), &q, 1)
            .await
            .expect("decide");
        assert_eq!(left.allowed, total < 100);
    }
}

/// Charges and refunds racing from several instances: at the end the bucket holds exactly
/// capacity − (charged − refunded); refunds of a key never charged and double refunds
/// never fill a bucket above its capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_refunds_racing_charges_never_give_back_more_than_taken() {
    let prefix = fresh_prefix();
    let mut limiters: Vec<RedisLimiter<String>> = Vec::new();
    for _ in 0..3 {
        limiters.push(single_with(&prefix, None).await);
    }
    let q = [Quota::per_day(nz(60)), Quota::per_day(nz(500))];
    let key = "racy".to_owned();
    // Refunds of a key never charged, twice over: nothing to give back.
    for l in &limiters {
        l.give_back(&key, &q, 7).await.expect("refund");
        l.give_back(&key, &q, 7).await.expect("refund");
    }
    let mut tasks = Vec::new();
    for t in 0..6usize {
        let me = limiters[t % 3].clone();
        let other = limiters[(t + 1) % 3].clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let (mut charged, mut refunded) = (0u64, 0u64);
            for i in 0..30u32 {
                let cost = 1 + (i % 2);
                if me.decide(&key, &q, cost).await.expect("decide").allowed {
                    charged += u64::from(cost);
                    if i % 3 == 0 {
                        other.give_back(&key, &q, cost).await.expect("refund");
                        refunded += u64::from(cost);
                    }
                }
            }
            (charged, refunded)
        }));
    }
    let (mut charged, mut refunded) = (0, 0);
    for t in tasks {
        let (c, r) = t.await.expect("task");
        charged += c;
        refunded += r;
    }
    let net = charged - refunded;
    assert!(net <= 60, "net {net} of 60");
    let mut more = 0;
    while limiters[2]
        .decide(&key, &q, 1)
        .await
        .expect("decide")
        .allowed
    {
        more += 1;
        assert!(more <= 60);
    }
    assert_eq!(more + net, 60, "charged {charged} refunded {refunded}");
    // A fresh key refunded many times then drained: exactly its capacity.
    let fresh = "fresh".to_owned();
    assert!(limiters[0].decide(&fresh, &q, 2).await.unwrap().allowed);
    for _ in 0..5 {
        limiters[1].give_back(&fresh, &q, 3).await.expect("refund");
    }
    let mut n = 0;
    while limiters[0].decide(&fresh, &q, 1).await.unwrap().allowed {
        n += 1;
        assert!(n <= 60);
    }
    assert_eq!(n, 60, "refunds fill a bucket to its capacity, never above");
}

// ------------------------------------------------------------------------------------------
// Same decisions as MemoryLimiter (fake clock).
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Decide(Vec<Quota>, u32),
    Refund(Vec<Quota>, u32),
    Advance(u64),
    Rewind(u64),
}

/// Runs `ops` on a memory limiter and a Redis limiter sharing one fake clock; the
/// decisions that differ.
async fn differences(ops: &[Op], start_ns: u64) -> Vec<String> {
    let clock = fake_clock();
    clock.set(std::time::UNIX_EPOCH + Duration::from_nanos(start_ns));
    let memory: MemoryLimiter<String> = MemoryLimiter::builder()
        .clock(clock.clone())
        .build()
        .expect("memory");
    let prefix = fresh_prefix();
    let redis: RedisLimiter<String> = single_with(&prefix, Some(clock.clone())).await;
    // The buckets' TTLs run on Redis's real clock, the decisions on the fake one: the
    // bucket is kept (PERSIST after each call) so that real time cannot empty it.
    let mut conn = raw().await;
    let bucket = format!("{prefix}{{s:k}}");
    let key = "k".to_owned();
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Decide(q, cost) => {
                let m = memory.decide(&key, q, *cost);
                let r = redis.decide(&key, q, *cost).await;
                match (&m, &r) {
                    (Ok(m), Ok(r)) if m == r => {}
                    _ => out.push(format!("op {i} {op:?}:\n  memory {m:?}\n  redis  {r:?}")),
                }
                let _: bool = conn.persist(&bucket).await.expect("persist");
            }
            Op::Refund(q, cost) => {
                memory.refund(&key, q, *cost);
                redis.give_back(&key, q, *cost).await.expect("refund");
            }
            Op::Advance(ns) => clock.advance(Duration::from_nanos(*ns)),
            Op::Rewind(ns) => clock.rewind(Duration::from_nanos(*ns)),
        }
    }
    out
}

const T0: u64 = 1_700_000_000 * SEC;

/// A long random sequence on one set of windows: costs up to `max_cost`, the clock moving
/// by odd amounts around the windows' intervals, boundaries probed exactly.
fn sequence(q: &[Quota], max_cost: u32, len: usize, seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed);
    // Steps around the shortest interval, at most 30 days (the fake clock must stay far
    // from u64::MAX over the whole sequence).
    let interval =
        (q.iter().map(Quota::interval).min().unwrap().as_nanos() as u64).min(30 * 86_400 * SEC);
    let mut ops = Vec::new();
    for i in 0..len {
        let cost = 1 + rng.below(u64::from(max_cost)) as u32;
        ops.push(Op::Decide(q.to_vec(), cost));
        match rng.below(6) {
            0 => ops.push(Op::Advance(rng.below(interval.max(2) * 3) | 1)),
            1 => ops.push(Op::Advance(interval)),
            2 => ops.push(Op::Advance(interval.saturating_sub(1).max(1))),
            3 if i % 7 == 0 => ops.push(Op::Refund(q.to_vec(), cost)),
            4 => ops.push(Op::Advance(rng.below(999_999_999) | 1)),
            _ => {}
        }
    }
    ops
}

/// Short windows, odd rates and bursts: Redis and memory agree decision for decision.
#[tokio::test]
async fn held_short_odd_windows_match_memory_exactly() {
    let cases: Vec<(Vec<Quota>, u32)> = vec![
        (vec![Quota::per_second(nz(7))], 3),
        (vec![Quota::per_minute(nz(13))], 4),
        (vec![Quota::per_day(nz(1))], 1),
        (vec![Quota::per_second(nz(u32::MAX))], 1_000_000_000),
        (vec![Quota::per_minute(nz(60)).with_burst(nz(5))], 2),
        (
            vec![Quota::new(nz(3), Duration::from_nanos(7_000_000_001)).unwrap()],
            2,
        ),
        (
            vec![
                Quota::per_second(nz(7)),
                Quota::per_minute(nz(13)),
                Quota::per_hour(nz(97)).with_burst(nz(11)),
            ],
            3,
        ),
    ];
    let mut all = Vec::new();
    for (n, (q, max_cost)) in cases.iter().enumerate() {
        let mut ops = sequence(q, *max_cost, 150, 0x9E37_79B9_7F4A_7C15 ^ n as u64);
        if q[0].capacity().get() == u32::MAX {
            // 1 ns a token: charges of at least a second, so that the bucket's TTL (on
            // Redis's real clock) cannot run out between a write and the PERSIST after it.
            for op in &mut ops {
                if let Op::Decide(_, c) | Op::Refund(_, c) = op {
                    *c += 1_000_000_000;
                }
            }
        }
        let diffs = differences(&ops, T0 + 123_456_789).await;
        if !diffs.is_empty() {
            all.push(format!(
                "{q:?}: {} differ, first: {}",
                diffs.len(),
                diffs[0]
            ));
        }
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}

/// FINDING, fixed (precision): windows whose burst is longer than 2^53 ns (~104 days) — 1000 a
/// year, u32::MAX a century, 1 a century — are computed in doubles by the script; its
/// decisions and numbers drift from MemoryLimiter's (u64) on the same sequence.
#[tokio::test]
async fn long_windows_match_memory_exactly() {
    let year = Duration::from_secs(365 * 86_400);
    let cases: Vec<(Vec<Quota>, u32)> = vec![
        (vec![Quota::new(nz(1000), year).unwrap()], 5),
        (
            vec![Quota::new(nz(u32::MAX), year * 100).unwrap()],
            1_000_000,
        ),
        (vec![Quota::new(nz(1), year * 100).unwrap()], 1),
        (
            vec![Quota::new(nz(7), year * 3 + Duration::from_nanos(1)).unwrap()],
            2,
        ),
        (vec![Quota::per_day(nz(1)).with_burst(nz(36_500))], 50),
    ];
    let mut all = Vec::new();
    for (n, (q, max_cost)) in cases.iter().enumerate() {
        let ops = sequence(q, *max_cost, 200, 0xD1B5_4A32_D192_ED03 ^ n as u64);
        let diffs = differences(&ops, T0 + 123_456_789).await;
        if !diffs.is_empty() {
            all.push(format!(
                "{q:?}: {} of 200 differ, first: {}",
                diffs.len(),
                diffs[0]
            ));
        }
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}

/// FINDING, fixed (precision, boundary): drain a 1000-a-year window at an odd nanosecond, then ask
/// exactly one nanosecond before a token is back: memory refuses, Redis must too.
#[tokio::test]
async fn a_long_window_does_not_refill_early() {
    let q = vec![Quota::new(nz(1000), Duration::from_secs(365 * 86_400)).unwrap()];
    let interval = q[0].interval().as_nanos() as u64;
    let mut ops = vec![Op::Decide(q.clone(), 1); 1001];
    for k in 1..=20u64 {
        ops.push(Op::Advance(interval - 1));
        ops.push(Op::Decide(q.clone(), 1));
        ops.push(Op::Advance(1));
        ops.push(Op::Decide(q.clone(), 1));
        ops.push(Op::Advance(k * 3 + 1));
    }
    let diffs = differences(&ops, T0 + 999_999_999).await;
    assert!(
        diffs.is_empty(),
        "{} differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// FINDING, fixed (precision, over-admission by up to ~256 ns): a 1-a-century window admits its
/// second request before the century is over: the script's doubles round the TAT offset
/// (3.15e18 ns, ulp 512 ns).
#[tokio::test]
async fn a_century_window_never_admits_early() {
    let q = vec![Quota::new(nz(1), Duration::from_secs(100 * 365 * 86_400)).unwrap()];
    let interval = q[0].interval().as_nanos() as u64;
    let ops = vec![
        Op::Decide(q.clone(), 1),
        Op::Advance(interval - 300),
        Op::Decide(q.clone(), 1),
        Op::Advance(44),
        Op::Decide(q.clone(), 1),
        Op::Advance(255),
        Op::Decide(q.clone(), 1),
        Op::Advance(1),
        Op::Decide(q.clone(), 1),
    ];
    let diffs = differences(&ops, T0 + 1).await;
    assert!(
        diffs.is_empty(),
        "{} differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// A key's windows change between calls ([60/min] → [60/min, 10/s] → [60/min] → [10/s] →
/// …), with costs and the clock moving: Redis decides as memory does.
#[tokio::test]
async fn held_changing_windows_decide_as_memory_does() {
    let a = vec![Quota::per_minute(nz(60))];
    let b = vec![Quota::per_minute(nz(60)), Quota::per_second(nz(10))];
    let c = vec![Quota::per_second(nz(10))];
    let d = vec![
        Quota::per_second(nz(10)),
        Quota::per_minute(nz(60)),
        Quota::per_second(nz(10)),
    ];
    let mut rng = Rng(42);
    let mut ops = Vec::new();
    for i in 0..300 {
        let q = match (i / 13) % 4 {
            0 => a.clone(),
            1 => b.clone(),
            2 => c.clone(),
            _ => d.clone(),
        };
        ops.push(Op::Decide(q, 1 + rng.below(3) as u32));
        if i % 3 == 0 {
            ops.push(Op::Advance(rng.below(400_000_000) | 1));
        }
    }
    let diffs = differences(&ops, T0 + 17).await;
    assert!(
        diffs.is_empty(),
        "{} differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// FINDING, fixed (divergence): a refund naming windows the bucket was never charged on (the
/// key's quotas changed between the charge and the refund). MemoryLimiter gives nothing
/// back when the bucket lacks one of the windows; Redis gives back to the windows it has.
/// The two stores must agree (the conformance promise: "the same numbers whichever store").
#[tokio::test]
async fn refunds_after_a_quota_change_agree_with_memory() {
    let a = vec![Quota::per_minute(nz(60))];
    let b = vec![Quota::per_minute(nz(60)), Quota::per_second(nz(10))];
    let mut ops = Vec::new();
    for _ in 0..5 {
        ops.push(Op::Decide(a.clone(), 3));
    }
    ops.push(Op::Refund(b.clone(), 3));
    ops.push(Op::Decide(a.clone(), 1));
    // And a refund with a clock stepped back (TATs further than a burst ahead).
    ops.push(Op::Rewind(3600 * SEC));
    ops.push(Op::Refund(a.clone(), 2));
    ops.push(Op::Decide(a.clone(), 1));
    ops.push(Op::Advance(3600 * SEC));
    ops.push(Op::Decide(a.clone(), 1));
    let diffs = differences(&ops, T0).await;
    assert!(
        diffs.is_empty(),
        "{} differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

// ------------------------------------------------------------------------------------------
// Bucket names: injection, collisions, cluster slots.
// ------------------------------------------------------------------------------------------

fn nasty_strings() -> Vec<String> {
    let mut v: Vec<String> = [
        "a",
        "a}",
        "{a}",
        "}{",
        "{",
        "}",
        "a%7D",
        "a%257D",
        "%",
        "%25",
        "/",
        "%2F",
        ":",
        "",
        ":d:0000000000000000",
        "x}:d:0000000000000000",
        "a\nb",
        "a\r\n*3\r\n$3\r\nDEL\r\n",
        "é🔥\u{0}\u{202e}",
        "k:a",
        "s:a",
        "ip:127.0.0.1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.push("x".repeat(100_000));
    v.push("{".repeat(1000) + &"}".repeat(1000));
    v
}

/// Every nasty key has its own bucket (2 a minute each: exactly 2 pass each, whatever the
/// others took), on one Redis and on a Cluster (no CROSSSLOT), and nothing lands outside
/// the prefix.
#[tokio::test]
async fn held_nasty_bucket_names_never_collide_or_cross_slots() {
    for on_cluster in [false, true] {
        let prefix = fresh_prefix();
        let clock = fake_clock();
        let strings: RedisLimiter<String> = if on_cluster {
            cluster_with(&prefix, Some(clock.clone())).await
        } else {
            single_with(&prefix, Some(clock.clone())).await
        };
        let ids: RedisLimiter<(KeyId, Option<Arc<str>>)> = if on_cluster {
            cluster_with(&prefix, Some(clock.clone())).await
        } else {
            single_with(&prefix, Some(clock.clone())).await
        };
        let q = [Quota::per_minute(nz(2)), Quota::per_hour(nz(50))];
        for key in nasty_strings() {
            let mut n = 0;
            for _ in 0..4 {
                let d = strings
                    .decide(&key, &q, 1)
                    .await
                    .unwrap_or_else(|e| panic!("cluster={on_cluster} {key:?}: {e}"));
                n += u32::from(d.allowed);
            }
            assert_eq!(
                n,
                2,
                "cluster={on_cluster} string {:?}",
                &key[..key.len().min(40)]
            );
        }
        let mut id_keys: Vec<(KeyId, Option<Arc<str>>)> = Vec::new();
        for s in nasty_strings() {
            id_keys.push((KeyId::new(s.as_str()), None));
            id_keys.push((KeyId::new(s.as_str()), Some(Arc::from(""))));
            id_keys.push((KeyId::new("a"), Some(Arc::from(s.as_str()))));
            id_keys.push((KeyId::new(format!("a/{s}")), None));
        }
        id_keys.sort();
        id_keys.dedup();
        for key in &id_keys {
            let mut n = 0;
            for _ in 0..3 {
                let d = ids
                    .decide(key, &q, 1)
                    .await
                    .unwrap_or_else(|e| panic!("cluster={on_cluster} {key:?}: {e}"));
                n += u32::from(d.allowed);
            }
            assert_eq!(n, 2, "cluster={on_cluster} id {:?}", key.1);
        }
        // Refunds land on the right bucket too (and on the cluster in the right slot).
        for key in nasty_strings() {
            strings.give_back(&key, &q, 1).await.expect("refund");
            assert!(strings.decide(&key, &q, 1).await.unwrap().allowed);
        }
        if !on_cluster {
            // Every Redis key this limiter made starts with its prefix and holds one
            // hashtag: `prefix{name}` or `prefix{name}:m:<hex>` (its decisions' tokens).
            let mut conn = raw().await;
            let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut conn)
                .await
                .expect("keys");
            for k in &keys {
                let k = String::from_utf8_lossy(k);
                let rest = k.strip_prefix(&prefix).expect("prefix");
                assert!(rest.starts_with('{'), "{rest:.60}");
                let close = rest.find('}').expect("a closing brace");
                let tail = &rest[close + 1..];
                assert!(
                    tail.is_empty()
                        || (tail.len() > 3
                            && tail.len() <= 16
                            && tail.starts_with(":m:")
                            && tail[3..].bytes().all(|b| b.is_ascii_hexdigit())),
                    "{k:.80}"
                );
                assert!(!rest[1..close].contains('{'));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Double charge.
// ------------------------------------------------------------------------------------------

/// Decision tokens never collide between instances: three limiters deciding on one key
/// leave one token per decision.
#[tokio::test]
async fn held_decision_tokens_do_not_collide_between_instances() {
    let prefix = fresh_prefix();
    let mut limiters: Vec<RedisLimiter<String>> = Vec::new();
    for _ in 0..3 {
        limiters.push(single_with(&prefix, None).await);
    }
    let q = [Quota::per_day(nz(10_000))];
    let mut tasks = Vec::new();
    for l in &limiters {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                assert!(l.decide(&"t".to_owned(), &q, 1).await.unwrap().allowed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut conn = raw().await;
    let hashes: Vec<String> = conn.keys(format!("{prefix}*:m:*")).await.unwrap();
    let mut markers = 0;
    for hash in &hashes {
        let fields: usize = conn.hlen(hash).await.unwrap();
        markers += fields;
    }
    assert_eq!(markers, 300, "{hashes:?}");
    let d = limiters[0].decide(&"t".to_owned(), &q, 1).await.unwrap();
    assert_eq!(d.numbers.remaining, 10_000 - 301);
}

/// FINDING, fixed (public API): `decide` with cost 0 on a fresh key writes a bucket hash that
/// never expires (the script sets a TTL only when something was charged): every distinct
/// key asked at cost 0 stays in Redis forever.
#[tokio::test]
async fn a_cost_zero_decision_leaves_nothing_forever() {
    let prefix = fresh_prefix();
    let limiter: RedisLimiter<String> = single_with(&prefix, None).await;
    let q = [Quota::per_minute(nz(60))];
    let d = limiter.decide(&"free".to_owned(), &q, 0).await;
    let mut conn = raw().await;
    let bucket = format!("{prefix}{{s:free}}");
    let exists: bool = conn.exists(&bucket).await.unwrap();
    let ttl: i64 = conn.pttl(&bucket).await.unwrap();
    let _: () = conn.del(&bucket).await.unwrap();
    assert!(
        !exists || ttl > 0,
        "decision {d:?} left {bucket} with no TTL ({ttl})"
    );
}

// ------------------------------------------------------------------------------------------
// Failures.
// ------------------------------------------------------------------------------------------

struct OwnRedis {
    port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl OwnRedis {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut own = Self {
            port,
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        own.restart();
        own
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn restart(&mut self) {
        let mut args = vec![
            "--port".to_owned(),
            self.port.to_string(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
            "--enable-debug-command".to_owned(),
            "yes".to_owned(),
        ];
        args.extend(self.extra.iter().cloned());
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let pass = self
            .extra
            .iter()
            .position(|a| a == "--requirepass")
            .map(|i| self.extra[i + 1].clone());
        for _ in 0..200 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let cmd = match &pass {
                    Some(p) => format!("AUTH {p}\r\nPING\r\n"),
                    None => "PING\r\n".to_owned(),
                };
                let _ = s.write_all(cmd.as_bytes());
                let mut buf = [0u8; 64];
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                if let Ok(n) = s.read(&mut buf) {
                    if n > 0 && !buf[..n].starts_with(b"-LOADING") {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not start on {}", self.port);
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Redis killed under load, then restarted: every decision answers within the timeout
/// (plus slack), nothing panics, the limiter comes back without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_redis_killed_mid_load_answers_in_time_and_recovers() {
    let mut own = OwnRedis::start();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
        .timeout(Duration::from_millis(150))
        .breaker(3, Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let q = [Quota::per_second(nz(1_000_000))];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let l = limiter.clone();
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let (mut ok, mut err) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = std::time::Instant::now();
                match l.decide(&format!("k{t}"), &q, 1).await {
                    Ok(_) => ok += 1,
                    Err(_) => err += 1,
                }
                slowest = slowest.max(started.elapsed());
                tokio::task::yield_now().await;
            }
            (slowest, ok, err)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    own.kill();
    tokio::time::sleep(Duration::from_millis(800)).await;
    own.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let (slowest, ok, err) = t.await.expect("no panic");
        assert!(slowest < Duration::from_millis(900), "slowest {slowest:?}");
        assert!(ok > 0 && err > 0, "ok {ok} err {err}");
    }
    let s = limiter.stats();
    assert!(s.breaker_opened >= 1, "{s:?}");
    // Back on Redis.
    let mut back = false;
    for _ in 0..100 {
        if limiter.decide(&"after".to_owned(), &q, 1).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "{:?}", limiter.stats());
}

/// Redis paused (`CLIENT PAUSE`): decisions time out within the limiter's timeout, the
/// breaker opens and spares Redis (not one call per request), and it closes again after
/// the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_a_paused_redis_is_not_called_for_every_request_and_recovers() {
    let own = OwnRedis::start();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
        .timeout(Duration::from_millis(100))
        .breaker(2, Duration::from_millis(400))
        .connect()
        .await
        .unwrap();
    let q = [Quota::per_second(nz(1_000_000))];
    assert!(
        limiter
            .decide(&"w".to_owned(), &q, 1)
            .await
            .unwrap()
            .allowed
    );
    let mut admin = own.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut requests = 0u64;
    while started.elapsed() < Duration::from_millis(1800) {
        let t = std::time::Instant::now();
        let r = limiter.decide(&"w".to_owned(), &q, 1).await;
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "took {:?}",
            t.elapsed()
        );
        assert!(r.is_err(), "{r:?}");
        requests += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = limiter.stats();
    // 2 failures open it; then at most one probe per cool-down (1.8 s / 0.4 s).
    assert!(s.failures <= 2 + 6, "{requests} requests, {s:?}");
    assert!(s.skipped + s.failures >= requests, "{s:?}");
    // After the pause: back within a cool-down or two.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut back = false;
    for _ in 0..60 {
        if limiter.decide(&"w".to_owned(), &q, 1).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "{:?}", limiter.stats());
}

/// The breaker's probe is claimed when `check` is called; a caller that drops the answer
/// without polling it leaves the probe claimed. The breaker must still close (after twice
/// the timeout), not stay open forever.
#[tokio::test]
async fn held_a_dropped_probe_does_not_keep_the_breaker_open() {
    let mut own = OwnRedis::start();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
        .timeout(Duration::from_millis(100))
        .breaker(1, Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let q = [Quota::per_second(nz(1000))];
    let key = "p".to_owned();
    assert!(limiter.decide(&key, &q, 1).await.is_ok());
    own.kill();
    assert!(limiter.decide(&key, &q, 1).await.is_err());
    assert_eq!(limiter.stats().breaker_opened, 1);
    own.restart();
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The probe, claimed and dropped unpolled (a request cancelled early) — many times.
    for _ in 0..3 {
        match LimiterStore::check(&limiter, &key, &q, 1) {
            Answer::Later(f) => drop(f),
            Answer::Now(_) => {}
        }
    }
    let started = std::time::Instant::now();
    loop {
        if limiter.decide(&key, &q, 1).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still open: {:?}",
            limiter.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// FINDING, fixed (charge without answer): when Redis is slow (`DEBUG SLEEP`), a decision times
/// out and the caller is refused (503 under `Closed`), but the script still runs when Redis
/// wakes up and charges the key: tokens are taken for requests that were never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_decision_does_not_charge_the_key() {
    let own = OwnRedis::start();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
        .timeout(Duration::from_millis(150))
        .breaker(100, Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let q = [Quota::per_day(nz(10))];
    let key = "slow".to_owned();
    assert!(limiter.decide(&key, &q, 1).await.unwrap().allowed);
    let mut admin = own.conn().await;
    let sleeper = tokio::spawn(async move {
        let _: redis::RedisResult<()> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(1)
            .query_async(&mut admin)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut refused = 0;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let r = limiter.decide(&key, &q, 1).await;
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "timeout honoured: {:?}",
            t.elapsed()
        );
        assert!(matches!(r, Err(RedisLimiterError::Timeout(_))), "{r:?}");
        refused += 1;
    }
    sleeper.await.unwrap();
    // Redis is awake: the limiter decides on it again (bounded).
    let awake = std::time::Instant::now();
    let mut errors = Vec::new();
    let mut admitted = loop {
        match limiter.decide(&key, &q, 1).await {
            Ok(d) => break u32::from(d.allowed),
            Err(e) => errors.push(format!("{:?} {e}", awake.elapsed())),
        }
        assert!(awake.elapsed() < Duration::from_secs(10), "{errors:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("back on Redis after {:?}: {errors:?}", awake.elapsed());
    for _ in 0..20 {
        if limiter.decide(&key, &q, 1).await.unwrap().allowed {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 9,
        "1 served before, {refused} refused with a timeout: 9 should be left"
    );
}

/// FINDING, fixed (config): a huge timeout (e.g. `Duration::MAX`, "no timeout") is accepted by the
/// builder, and then every decision panics (`Instant + Duration` overflows) — or, a little
/// below that, the marker's `PX` overflows in the script after the bucket was written.
#[tokio::test]
async fn a_huge_timeout_is_refused_or_works() {
    let mut bad = Vec::new();
    for timeout in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 4),
        Duration::from_secs(10_000_000_000_000_000),
    ] {
        let prefix = fresh_prefix();
        let built = RedisLimiter::<String>::builder(redis_url())
            .prefix(prefix.clone())
            .timeout(timeout)
            .connect()
            .await;
        let Ok(limiter) = built else { continue };
        let q = [Quota::per_minute(nz(5))];
        let outcome =
            tokio::spawn(async move { limiter.decide(&"h".to_owned(), &q, 1).await }).await;
        match outcome {
            Err(join) => bad.push(format!("{timeout:?}: the decision panicked: {join}")),
            Ok(Err(e)) => {
                let mut conn = raw().await;
                let charged: bool = conn.exists(format!("{prefix}{{s:h}}")).await.unwrap();
                bad.push(format!(
                    "{timeout:?}: the decision failed ({e}); bucket charged anyway: {charged}"
                ));
            }
            Ok(Ok(d)) => assert!(d.allowed),
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

// ------------------------------------------------------------------------------------------
// Garbage in Redis.
// ------------------------------------------------------------------------------------------

/// Hand-written garbage in a bucket's field: the key fails closed (refused, never more than
/// its capacity), never errors, and refills from there.
#[tokio::test]
async fn held_corrupt_fields_fail_closed_and_recover() {
    let prefix = fresh_prefix();
    let clock = fake_clock();
    let limiter: RedisLimiter<String> = single_with(&prefix, Some(clock.clone())).await;
    let q = [Quota::per_minute(nz(5))];
    let field = "w:5:12000000000";
    let garbage = [
        "garbage".to_owned(),
        String::new(),
        "1:2:3".to_owned(),
        "-5:0".to_owned(),
        "1700000000.5:0".to_owned(),
        "1700000000:0\n".to_owned(),
        " 1700000000:0".to_owned(),
        "nan:0".to_owned(),
        "inf:0".to_owned(),
        "0x10:0".to_owned(),
        "99999999999999999999:0".to_owned(),
        format!("{}:0", "9".repeat(400)),
        format!("1700000000:{}", "9".repeat(400)),
        "1700000001:99999999999".to_owned(),
        "1700000000:1e30".to_owned(),
    ];
    let mut conn = raw().await;
    for (n, g) in garbage.iter().enumerate() {
        let key = format!("g{n}");
        let bucket = format!("{prefix}{{s:{key}}}");
        let _: () = conn.hset(&bucket, field, g).await.unwrap();
        let mut admitted = 0;
        for _ in 0..10 {
            let d = limiter
                .decide(&key, &q, 1)
                .await
                .unwrap_or_else(|e| panic!("{g:?}: {e}"));
            admitted += u32::from(d.allowed);
        }
        assert_eq!(admitted, 0, "{g:.40?}: garbage reads as an empty bucket");
        let ttl: i64 = conn.pttl(&bucket).await.unwrap();
        assert!(ttl > 0, "{g:.40?}: the repaired bucket expires ({ttl})");
    }
    clock.advance(Duration::from_secs(12));
    for (n, g) in garbage.iter().enumerate() {
        let key = format!("g{n}");
        let mut admitted = 0;
        for _ in 0..10 {
            admitted += u32::from(limiter.decide(&key, &q, 1).await.unwrap().allowed);
        }
        assert_eq!(admitted, 1, "{g:.40?}: one interval, one token");
    }
    clock.advance(Duration::from_secs(600));
    for (n, g) in garbage.iter().enumerate() {
        let key = format!("g{n}");
        let mut admitted = 0;
        for _ in 0..10 {
            admitted += u32::from(limiter.decide(&key, &q, 1).await.unwrap().allowed);
        }
        assert_eq!(admitted, 5, "{g:.40?}: full again, never above");
    }
}

/// FINDING, fixed (permanent per-key outage): a value of the wrong type at a bucket's name (a
/// string left by anything else on that Redis, with no TTL) makes every decision for that
/// key fail with WRONGTYPE, forever: the script never repairs it.
#[tokio::test]
async fn a_wrong_type_at_the_bucket_is_not_a_permanent_outage() {
    let prefix = fresh_prefix();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(redis_url())
        .prefix(prefix.clone())
        .timeout(Duration::from_secs(2))
        .breaker(1000, Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let mut conn = raw().await;
    let bucket = format!("{prefix}{{s:poison}}");
    let _: () = conn.set(&bucket, "not a hash").await.unwrap();
    let q = [Quota::per_minute(nz(5))];
    let mut errors = Vec::new();
    for _ in 0..5 {
        if let Err(e) = limiter.decide(&"poison".to_owned(), &q, 1).await {
            errors.push(e.to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refund = limiter.give_back(&"poison".to_owned(), &q, 1).await;
    let _: () = conn.del(&bucket).await.unwrap();
    assert!(
        errors.is_empty() && refund.is_ok(),
        "every decision failed: {errors:?}; refund {refund:?}"
    );
}

/// FINDING, fixed (one key takes down every key): per-key WRONGTYPE errors count as Redis
/// failures, so three requests for one poisoned key open the breaker, and every other
/// key's requests are refused (`Closed`: 503 for the whole API) — repeatedly, as long as
/// the poisoned key is asked.
#[tokio::test]
async fn one_poisoned_key_does_not_open_the_breaker_for_every_key() {
    let prefix = fresh_prefix();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(redis_url())
        .prefix(prefix.clone())
        .timeout(Duration::from_secs(2))
        .breaker(3, Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut conn = raw().await;
    let bucket = format!("{prefix}{{s:poison}}");
    let _: () = conn.set(&bucket, "x").await.unwrap();
    let q = [Quota::per_minute(nz(100))];
    for _ in 0..3 {
        let _ = limiter.decide(&"poison".to_owned(), &q, 1).await;
    }
    let innocent = limiter.decide(&"innocent".to_owned(), &q, 1).await;
    let _: () = conn.del(&bucket).await.unwrap();
    assert!(
        matches!(&innocent, Ok(d) if d.allowed),
        "an unrelated key: {innocent:?} ({:?})",
        limiter.stats()
    );
}

/// FINDING, fixed (garbage admits unlimited): under `FailurePolicy::Open`, a poisoned key
/// (WRONGTYPE at its bucket) is admitted without any limit, forever.
#[tokio::test]
async fn a_poisoned_key_is_not_admitted_unlimited() {
    let prefix = fresh_prefix();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(redis_url())
        .prefix(prefix.clone())
        .policy(FailurePolicy::Open)
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let mut conn = raw().await;
    let bucket = format!("{prefix}{{s:poison}}");
    let _: () = conn.lpush(&bucket, "x").await.unwrap();
    let q = [Quota::per_minute(nz(2))];
    let mut admitted = 0;
    for _ in 0..20 {
        if let Ok(d) = limiter.decide(&"poison".to_owned(), &q, 1).await {
            admitted += u32::from(d.allowed);
        }
    }
    let _: () = conn.del(&bucket).await.unwrap();
    assert!(
        admitted <= 2,
        "{admitted} of 20 admitted against 2 a minute"
    );
}

// ------------------------------------------------------------------------------------------
// Secrets.
// ------------------------------------------------------------------------------------------

/// No error or Debug output shows a password from a Redis URL: malformed URLs, unreachable
/// hosts, a wrong password against a real server, cluster nodes.
#[tokio::test]
async fn held_no_error_prints_the_password() {
    let secret = "hunter2-Sekrit";
    let urls = [
        format!("redis://:{secret}@127.0.0.1:99999/"),
        format!("redis://user:{secret}@/"),
        format!("redis://:{secret}@127.0.0.1:6379/abc"),
        format!("redis://:{secret}@127.0.0.1:6379/-1"),
        format!("rediss://:{secret}@127.0.0.1:1/"),
        format!("redis+unix:///nonexistent/sock?pass={secret}"),
        format!("unix:///nonexistent/sock?pass={secret}"),
        format!("redis://:{secret}@[::1/"),
        format!("redis://:{secret}@no-such-host.invalid:6379/"),
        format!("http://:{secret}@127.0.0.1:6379/"),
        format!("redis://:{secret}@127.0.0.1:6379/?protocol=bogus"),
        secret.to_string(),
    ];
    let q = [Quota::per_minute(nz(2))];
    let mut leaks = Vec::new();
    for url in &urls {
        let b = RedisLimiter::<String>::builder(url.clone()).timeout(Duration::from_millis(300));
        if format!("{b:?}").contains(secret) {
            leaks.push(format!("builder Debug {url}"));
        }
        match b.connect().await {
            Err(e) => {
                let text = format!("{e} {e:?} {:?}", std::error::Error::source(&e));
                if text.contains(secret) {
                    leaks.push(format!("connect {url}: {text}"));
                }
            }
            Ok(l) => {
                if format!("{l:?}").contains(secret) {
                    leaks.push(format!("limiter Debug {url}"));
                }
                if let Err(e) = l.decide(&"x".to_owned(), &q, 1).await {
                    let text = format!("{e} {e:?} {:?}", std::error::Error::source(&e));
                    if text.contains(secret) {
                        leaks.push(format!("decide {url}: {text}"));
                    }
                }
            }
        }
        let c = RedisLimiter::<String>::cluster_builder([url.clone()])
            .timeout(Duration::from_millis(300));
        if format!("{c:?}").contains(secret) {
            leaks.push(format!("cluster builder Debug {url}"));
        }
        if let Err(e) = c.connect().await {
            let text = format!("{e} {e:?} {:?}", std::error::Error::source(&e));
            if text.contains(secret) {
                leaks.push(format!("cluster connect {url}: {text}"));
            }
        }
    }
    // A real server with a password, given the wrong one.
    let own = OwnRedis::start_with(&["--requirepass", "right-pass"]);
    let url = format!("redis://:{secret}@127.0.0.1:{}/", own.port);
    let l = RedisLimiter::<String>::builder(url.clone())
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    match l.decide(&"x".to_owned(), &q, 1).await {
        Err(e) => {
            let text = format!("{e} {e:?} {:?}", std::error::Error::source(&e));
            if text.contains(secret) {
                leaks.push(format!("wrong password: {text}"));
            }
        }
        Ok(d) => leaks.push(format!("a wrong password decided: {d:?}")),
    }
    let c = RedisLimiter::<String>::cluster_builder([url])
        .timeout(Duration::from_millis(500))
        .connect()
        .await;
    if let Err(e) = c {
        let text = format!("{e} {e:?} {:?}", std::error::Error::source(&e));
        if text.contains(secret) {
            leaks.push(format!("cluster wrong password: {text}"));
        }
    }
    assert!(leaks.is_empty(), "{}", leaks.join("\n"));
}

#[allow(dead_code)]
fn _uses(_: Decision) {}
