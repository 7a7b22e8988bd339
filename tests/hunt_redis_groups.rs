//! Attacks on the grouped `RedisLimiter` protocol (commits 720702c and 7bcc12c): tokens are
//! fields of a marker hash `<bucket>:m:<token >> 12>`, a call's decisions go to the script
//! as groups (a run on one bucket, marker hash, mode and spec), the batch is stably sorted
//! by bucket first, and the client rebuilds each decision's TATs from the group's offsets.
//!
//! Attacked: (1) grouped batches with mixed costs (0, above the capacity), mixed and
//! overlapping specs, duplicated windows, three windows, refunds and clock rewinds, decided
//! in one call against the memory limiter deciding one by one; (2) a batch whose tokens
//! cross a marker slot boundary (two marker hashes on one bucket in one call), on one Redis
//! and on the Cluster; (3) three limiters sharing one Redis hammering one key with mixed
//! specs: nothing over-admitted, nothing lost or charged twice; (4) a batch that timed out
//! on a stalled Redis and was settled: every charge given back once, no key without a TTL;
//! (5) the script itself: a token repeated within a group and across groups, a poisoned
//! marker hash, junk and `cancelled` answers, a refund token re-sent, eight windows in a
//! group; (6) a poisoned bucket in the middle of a batch; (7) a fake Redis answering with
//! odd replies (no panic, every decision refused with an error); (8) a call whose answer a
//! proxy drops, re-sent under the same tokens (charged once; its numbers); (9) the order
//! of one bucket's decisions in a batch with other keys interleaved; (10) each decision's
//! numbers its own in sorted batches with mixed costs, windows of ~95 years, cost u32::MAX.
//!
//! Findings (tests whose doc comment starts with `FINDING`), each fixed:
//! - `a_re_sent_decision_reports_its_first_numbers`, `a_re_sent_last_token_is_not_told_to_wait`
//!   (regression of 720702c): a decision re-sent after its answer was lost (status 3) has
//!   its numbers stepped from the bucket that already holds its own charge: remaining one
//!   charge too low (6, 6, 6 where 9, 8, 7 were given and 7 are left), and an admitted last
//!   token reported with a retry-after of a whole window.
//! - `a_reply_at_the_end_of_time_is_an_error_not_a_panic`: an integer reply with `now`
//!   within a minute of u64::MAX ns passes `verdicts` and panics in `gcra::step`.
//! - `a_buckets_decisions_keep_their_order_in_a_batch`: on the Cluster `by_bucket`'s unstable
//!   sort reorders one bucket's decisions within a batch (pre-existing; contradicts the
//!   stable-sort invariant of this change).
//! - `after_a_clock_step_back_redis_and_memory_agree`: after a clock step back memory leaves
//!   later windows unclamped and disagrees with Redis (pre-existing, memory's side; not from
//!   this change).
//!
//! The tests whose doc comment starts with `HELD:` are attacks that held.
//!
//! Needs `KEYGATE_TEST_REDIS_URL`, `KEYGATE_TEST_REDIS_CLUSTER` and `redis-server` on the
//! PATH (for the stalled Redis this test owns).
#![cfg(feature = "test-servers")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis_hunt::{
    all, batch, cluster, fake_clock, keys_under, memory, raw, single, Ask, Rng,
};

use common::servers::{cluster_nodes, redis_url};

use std::net::TcpListener;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use common::servers::{stall, OwnRedis};
use keygate::clock::FakeClock;
use keygate::ratelimit::{Decision, FailurePolicy, Quota, RedisLimiter, RedisLimiterError};
use redis::AsyncCommands;

const SEC: u64 = 1_000_000_000;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// A prefix no other run shares.
fn fresh_prefix() -> String {
    common::servers::fresh_prefix("hg")
}

fn specs() -> Vec<Vec<Quota>> {
    let per_min = Quota::per_minute(nz(10));
    let per_s = Quota::per_second(nz(3));
    let bursty = Quota::parse("7/s;burst=20").unwrap();
    let hourly = Quota::parse("1/hour;burst=50").unwrap();
    // A window of about 95 years: offsets far past 2^53 ns.
    let century = Quota::new(nz(3), Duration::from_secs(3_000_000_000)).unwrap();
    vec![
        vec![per_min],
        vec![per_min, per_s],
        vec![per_s],
        vec![per_min, per_min],
        vec![bursty, per_min, hourly],
        vec![century, per_s],
    ]
}

/// Random runs (a key, a spec, a cost, repeated 1–8 times) making up one batch.
fn random_batch(rng: &mut Rng, keys: &[&str]) -> Vec<Ask> {
    let specs = specs();
    let costs = [1, 1, 1, 2, 3, 0, 11, 25, u32::MAX];
    let mut asks = Vec::new();
    let len = 1 + rng.below(60) as usize;
    while asks.len() < len {
        let key = keys[rng.below(keys.len() as u64) as usize].to_owned();
        let quotas = specs[rng.below(specs.len() as u64) as usize].clone();
        let cost = costs[rng.below(costs.len() as u64) as usize];
        let run = 1 + rng.below(8) as usize;
        for _ in 0..run.min(len - asks.len()) {
            asks.push(Ask {
                key: key.clone(),
                quotas: quotas.clone(),
                cost,
            });
        }
    }
    asks
}

/// Runs rounds of random grouped batches (or the same decisions one call each) on `redis`,
/// with the clock moving on (and, with `rewinds`, sometimes back), and, one by one in the
/// order sent, on the memory limiter: the decisions that differ (each bucket's decisions keep their order
/// in a batch, and buckets do not interact, so memory's order is a valid one).
async fn grouped_differences(
    redis: &RedisLimiter<String>,
    clock: &FakeClock,
    seed: u64,
    rounds: usize,
    one_by_one: bool,
    rewinds: bool,
) -> Vec<String> {
    let memory = memory(clock);
    let mut rng = Rng(seed);
    let keys = ["a", "b", "a0", "c"];
    let mut out = Vec::new();
    let mut calls_over = 0;
    for round in 0..rounds {
        let asks = random_batch(&mut rng, &keys);
        let before = redis.stats().calls;
        let got = if one_by_one {
            let mut got = Vec::new();
            for a in &asks {
                got.push(redis.decide(&a.key, &a.quotas, a.cost).await);
            }
            got
        } else {
            batch(redis, &asks).await
        };
        if !one_by_one && redis.stats().calls != before + 1 {
            calls_over += 1;
        }
        for (i, (ask, got)) in asks.iter().zip(&got).enumerate() {
            let want = memory.decide(&ask.key, &ask.quotas, ask.cost);
            match (&want, got) {
                (Ok(w), Ok(g)) if w == g => {}
                _ => out.push(format!(
                    "round {round} decision {i} {ask:?}:\n  memory {want:?}\n  redis  {got:?}"
                )),
            }
        }
        // The clock moves on by odd amounts; sometimes back; sometimes a refund.
        match rng.below(10) {
            0 if rewinds => clock.rewind(Duration::from_nanos(rng.below(40 * SEC))),
            1 => {
                let ask = &asks[0];
                memory.refund(&ask.key, &ask.quotas, ask.cost);
                redis
                    .give_back(&ask.key, &ask.quotas, ask.cost)
                    .await
                    .expect("refund");
            }
            _ => clock.advance(Duration::from_nanos(rng.below(3 * SEC) + 7)),
        }
    }
    assert!(
        calls_over <= rounds / 10,
        "the batches did not go out as one call each ({calls_over} of {rounds})"
    );
    out
}

/// HELD: grouped batches (mixed costs 0, 1–3 and above the capacity, mixed specs sharing a
/// window, a duplicated window, three windows, keys whose bucket names sort oddly) decided
/// in one script call give, decision for decision, the memory limiter's numbers.
#[tokio::test]
async fn held_grouped_batches_decide_as_memory_does_one_by_one() {
    let clock = fake_clock();
    let redis = single(&fresh_prefix(), &clock).await;
    let diffs = grouped_differences(&redis, &clock, 0x5eed_0001, 150, false, false).await;
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// FINDING (fixed: memory clamps every later window on a refusal, as the script does): after the clock steps back, Redis and memory disagree (not from this change:
/// the memory limiter's side; the same with one decision per call, and on 8f20dfb). A request whose first
/// window refuses (its TAT clamped to one burst ahead) leaves memory's later windows
/// unexamined and unclamped, so memory keeps them empty for as long as the clock jumped,
/// while the script clamps every window it reads (as `gcra::step` documents: "rather than
/// locking the key out for as long as the clock jumped") and they refill within a burst:
/// here [3/s] is admitted by Redis and refused by memory 2 s after a 30 s step back. Fix:
/// memory clamps (best effort) every window whose TAT is past the horizon when it
/// refuses, not only the one that refused.
#[tokio::test]
async fn after_a_clock_step_back_redis_and_memory_agree() {
    let clock = fake_clock();
    let redis = single(&fresh_prefix(), &clock).await;
    let memory = memory(&clock);
    let minute = Quota::per_minute(nz(10));
    let second = Quota::per_second(nz(3));
    let key = "k".to_owned();
    let mut got = Vec::new();
    let mut want = Vec::new();
    let steps: [(&[Quota], u32, i64); 4] = [
        (&[second], 3, 0),
        (&[minute], 10, 0),
        (&[minute, second], 1, -30),
        (&[second], 1, 2),
    ];
    for (quotas, cost, move_s) in steps {
        if move_s < 0 {
            clock.rewind(Duration::from_secs(move_s.unsigned_abs()));
        } else {
            clock.advance(Duration::from_secs(move_s.unsigned_abs()));
        }
        got.push(redis.decide(&key, quotas, cost).await.unwrap());
        want.push(memory.decide(&key, quotas, cost).unwrap());
    }
    assert!(
        got[3].allowed,
        "Redis: the 3/s window refilled: {:?}",
        got[3]
    );
    assert_eq!(got, want, "the same numbers whichever store");
}

/// HELD: random grouped batches with the clock also stepping back, one decision per call:
/// the only divergence is the clamping one above (kept as a check that the batched runs
/// diverge no more than single calls do).
#[tokio::test]
async fn held_with_rewinds_groups_diverge_no_more_than_single_calls() {
    let clock = fake_clock();
    let redis = single(&fresh_prefix(), &clock).await;
    let grouped = grouped_differences(&redis, &clock, 0x5eed_0003, 100, false, true).await;
    let clock = fake_clock();
    let redis = single(&fresh_prefix(), &clock).await;
    let single_calls = grouped_differences(&redis, &clock, 0x5eed_0003, 100, true, true).await;
    assert_eq!(grouped, single_calls);
}

/// HELD: the same on the Cluster (one call per bucket: groups from the unstable split).
#[tokio::test]
async fn held_grouped_batches_decide_as_memory_does_on_a_cluster() {
    let clock = fake_clock();
    let redis = cluster(&fresh_prefix(), &clock).await;
    let memory = memory(&clock);
    let mut rng = Rng(0x5eed_0002);
    let keys = ["a", "b"];
    let mut diffs = Vec::new();
    for round in 0..60 {
        // One key per batch: a cluster call carries one bucket, in the order sent.
        let key = keys[round % 2];
        let mut asks = random_batch(&mut rng, &[key]);
        asks.truncate(64);
        let got = batch(&redis, &asks).await;
        for (i, (ask, got)) in asks.iter().zip(&got).enumerate() {
            let want = memory.decide(&ask.key, &ask.quotas, ask.cost);
            match (&want, got) {
                (Ok(w), Ok(g)) if w == g => {}
                _ => diffs.push(format!(
                    "round {round} decision {i} {ask:?}:\n  memory {want:?}\n  redis  {got:?}"
                )),
            }
        }
        clock.advance(Duration::from_nanos(rng.below(3 * SEC) + 7));
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// Checks that each admitted decision's numbers are its own: over a fixed clock and one
/// window, sorting a key's admitted decisions by `remaining` (descending) must give
/// remaining = capacity − the running sum of their own costs; refused ones must not fit.
fn assert_numbers_match_own_costs(asks: &[Ask], got: &[Decision], key: &str, capacity: u64) {
    let mut admitted: Vec<(u64, u64)> = asks
        .iter()
        .zip(got)
        .filter(|(a, d)| a.key == key && d.allowed)
        .map(|(a, d)| (d.numbers.remaining, u64::from(a.cost)))
        .collect();
    admitted.sort_by_key(|x| std::cmp::Reverse(x.0));
    let mut used = 0;
    for (remaining, cost) in &admitted {
        used += cost;
        assert_eq!(
            *remaining,
            capacity - used,
            "{key}: an admitted decision's numbers are another's: {admitted:?}"
        );
    }
    for (a, d) in asks.iter().zip(got) {
        if a.key == key && !d.allowed {
            assert!(u64::from(a.cost) > d.numbers.remaining, "{a:?} {d:?}");
        }
    }
}

/// HELD: interleaved keys with mixed costs in one batch (sorted by bucket, grouped by cost):
/// every decision's answer is its own, on one Redis and on the Cluster (split by bucket).
#[tokio::test]
async fn held_each_decision_in_a_sorted_batch_gets_its_own_answer() {
    for on_cluster in [false, true] {
        let clock = fake_clock();
        let prefix = fresh_prefix();
        let limiter = if on_cluster {
            cluster(&prefix, &clock).await
        } else {
            single(&prefix, &clock).await
        };
        let q = vec![Quota::per_minute(nz(50))];
        let mut rng = Rng(0xa77_0001);
        for round in 0..10 {
            let keys = [
                format!("x{round}"),
                format!("y{round}"),
                format!("z{round}"),
            ];
            let asks: Vec<Ask> = (0..64)
                .map(|_| Ask {
                    key: keys[rng.below(3) as usize].clone(),
                    quotas: q.clone(),
                    cost: 1 + rng.below(4) as u32,
                })
                .collect();
            let got: Vec<Decision> = batch(&limiter, &asks)
                .await
                .into_iter()
                .map(|d| d.expect("decided"))
                .collect();
            for key in &keys {
                assert_numbers_match_own_costs(&asks, &got, key, 50);
            }
        }
    }
}

/// The limiter's next token's sequence position, read from the marker hash of a probe
/// decision on `probe` (its one field is the token).
async fn last_token(urls: &[String], prefix: &str, probe: &str) -> u64 {
    for url in urls {
        let mut conn = raw(url).await;
        for key in keys_under(url, &format!("{prefix}{{s:{probe}}}:m:")).await {
            let fields: Vec<String> = conn.hkeys(&key).await.expect("hkeys");
            if let Some(token) = fields
                .iter()
                .filter_map(|f| u64::from_str_radix(f, 16).ok())
                .max()
            {
                return token;
            }
        }
    }
    panic!("no marker hash for the probe decision");
}

/// Drives `limiter` (its marker slots) up to `before` decisions short of its next slot
/// boundary, then decides 2 × `before` on `hot` in one batch: the batch's tokens cross the
/// boundary (two marker hashes on one bucket in one call). The decisions, in order.
async fn across_a_slot_boundary(
    limiter: &RedisLimiter<String>,
    urls: &[String],
    prefix: &str,
    quotas: &[Quota],
    before: u64,
) -> Vec<Decision> {
    let probe = "probe".to_owned();
    limiter.decide(&probe, quotas, 1).await.expect("probe");
    let token = last_token(urls, prefix, "probe").await;
    let next = token + 1;
    let to_boundary = 4096 - (next % 4096);
    let mut burn = (to_boundary + 4096 - before) % 4096;
    let burner = "burn".to_owned();
    let zero = [Quota::per_second(nz(1))];
    while burn > 0 {
        let n = burn.min(64);
        let futures: Vec<_> = (0..n).map(|_| limiter.decide(&burner, &zero, 0)).collect();
        for d in all(futures).await {
            d.expect("burn");
        }
        burn -= n;
    }
    let hot = "hot".to_owned();
    let futures: Vec<_> = (0..2 * before)
        .map(|_| limiter.decide(&hot, quotas, 1))
        .collect();
    all(futures)
        .await
        .into_iter()
        .map(|d| d.expect("decide"))
        .collect()
}

/// The admitted decisions of one window over a fixed clock must say capacity−1, …, 0 in
/// order, the refused ones 0 left: each decision's numbers are its own.
fn assert_each_decision_its_own(decisions: &[Decision], capacity: u64) {
    let allowed: Vec<u64> = decisions
        .iter()
        .filter(|d| d.allowed)
        .map(|d| d.numbers.remaining)
        .collect();
    let expected: Vec<u64> = (0..capacity).rev().collect();
    assert_eq!(allowed, expected, "each admitted decision's remaining");
    assert!(decisions
        .iter()
        .filter(|d| !d.allowed)
        .all(|d| d.numbers.remaining == 0));
    let first_refused = decisions.iter().position(|d| !d.allowed).unwrap();
    assert!(
        decisions[first_refused..].iter().all(|d| !d.allowed),
        "admitted in order, then refused"
    );
}

/// HELD: a batch whose tokens cross a marker slot boundary is two groups on one bucket (two
/// marker hashes in one call): it admits exactly the capacity, each decision gets its own
/// numbers, each marker hash holds its half of the tokens and expires.
#[tokio::test]
async fn held_a_batch_across_a_marker_slot_boundary_charges_once_each() {
    let clock = fake_clock();
    let prefix = fresh_prefix();
    let limiter = single(&prefix, &clock).await;
    let quotas = [Quota::per_minute(nz(40))];
    let decisions = across_a_slot_boundary(&limiter, &[redis_url()], &prefix, &quotas, 30).await;
    assert_eq!(decisions.len(), 60);
    assert_each_decision_its_own(&decisions, 40);
    let markers = keys_under(&redis_url(), &format!("{prefix}{{s:hot}}:m:")).await;
    assert_eq!(markers.len(), 2, "two marker hashes: {markers:?}");
    let mut conn = raw(&redis_url()).await;
    for m in &markers {
        let n: usize = conn.hlen(m).await.unwrap();
        assert_eq!(n, 30, "{m}");
        let ttl: i64 = conn.pttl(m).await.unwrap();
        assert!(ttl > 0 && ttl <= 6000, "{m}: {ttl}");
    }
}

/// HELD: the same on the Cluster: no CROSSSLOT, exact numbers.
#[tokio::test]
async fn held_a_batch_across_a_marker_slot_boundary_on_a_cluster() {
    let clock = fake_clock();
    let prefix = fresh_prefix();
    let limiter = cluster(&prefix, &clock).await;
    let quotas = [Quota::per_minute(nz(40))];
    let nodes = cluster_nodes();
    let decisions = across_a_slot_boundary(&limiter, &nodes, &prefix, &quotas, 30).await;
    assert_eq!(decisions.len(), 60);
    assert_each_decision_its_own(&decisions, 40);
    assert_eq!(limiter.stats().failures, 0);
}

/// HELD: three limiters (three connections, as three instances) on one Redis and on the
/// Cluster hammer one key with mixed specs and costs at a fixed time: the tokens admitted
/// never exceed a window, and afterwards each window holds exactly what was admitted on it
/// (nothing lost, nothing charged twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_three_instances_admit_exactly_what_they_charge() {
    for on_cluster in [false, true] {
        let clock = fake_clock();
        let prefix = fresh_prefix();
        let mut limiters = Vec::new();
        for _ in 0..3 {
            limiters.push(if on_cluster {
                cluster(&prefix, &clock).await
            } else {
                single(&prefix, &clock).await
            });
        }
        let wide = Quota::per_minute(nz(300));
        let narrow = Quota::per_second(nz(100));
        let specs: Vec<(Vec<Quota>, u32)> = vec![
            (vec![wide], 1),
            (vec![wide], 3),
            (vec![wide, narrow], 1),
            (vec![narrow], 2),
            (vec![wide], 0),
            (vec![wide, narrow], 400),
        ];
        let specs = Arc::new(specs);
        let mut tasks = Vec::new();
        for (i, limiter) in limiters.iter().enumerate() {
            for t in 0..6u64 {
                let limiter = limiter.clone();
                let specs = Arc::clone(&specs);
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0xabc0 + i as u64 * 31 + t);
                    let (mut on_wide, mut on_narrow) = (0u64, 0u64);
                    for _ in 0..60 {
                        let (q, cost) = &specs[rng.below(specs.len() as u64) as usize];
                        let d = limiter.decide(&"hot".to_owned(), q, *cost).await.unwrap();
                        if d.allowed {
                            if q.contains(&Quota::per_minute(nz(300))) {
                                on_wide += u64::from(*cost);
                            }
                            if q.contains(&Quota::per_second(nz(100))) {
                                on_narrow += u64::from(*cost);
                            }
                        }
                    }
                    (on_wide, on_narrow)
                }));
            }
        }
        let (mut wide_total, mut narrow_total) = (0, 0);
        for task in tasks {
            let (w, n) = task.await.unwrap();
            wide_total += w;
            narrow_total += n;
        }
        assert!(
            wide_total <= 300,
            "cluster {on_cluster}: {wide_total} > 300"
        );
        assert!(
            narrow_total <= 100,
            "cluster {on_cluster}: {narrow_total} > 100"
        );
        // What is left is exactly what was not admitted.
        let left = limiters[0]
            .decide(&"hot".to_owned(), &[wide], 0)
            .await
            .unwrap();
        assert_eq!(
            left.numbers.remaining,
            300 - wide_total,
            "cluster {on_cluster}"
        );
        let left = limiters[1]
            .decide(&"hot".to_owned(), &[narrow], 0)
            .await
            .unwrap();
        assert_eq!(
            left.numbers.remaining,
            100 - narrow_total,
            "cluster {on_cluster}"
        );
    }
}

/// HELD: a grouped batch times out on a stalled Redis that runs it when it wakes (charging
/// the capacity): every decision is settled, each charge given back once (the bucket is
/// full again, never above), and every key left has a TTL of at most the settling bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_a_timed_out_group_is_given_back_once_and_expires() {
    let own = OwnRedis::start();
    let clock = fake_clock();
    let prefix = fresh_prefix();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
        .prefix(&prefix)
        .timeout(Duration::from_millis(200))
        .breaker(1000, Duration::from_secs(1))
        .clock(clock.clone())
        .connect()
        .await
        .unwrap();
    let q = [Quota::per_minute(nz(10))];
    let key = "k".to_owned();
    // Warm up the connection and the script.
    assert!(limiter.decide(&key, &q, 0).await.unwrap().allowed);
    let sleeper = stall(&own.url(), 2).await;
    let futures: Vec<_> = (0..30).map(|_| limiter.decide(&key, &q, 1)).collect();
    for d in all(futures).await {
        assert!(matches!(d, Err(RedisLimiterError::Timeout(_))), "{d:?}");
    }
    sleeper.await.unwrap();
    let started = std::time::Instant::now();
    while limiter.stats().settling > 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = limiter.decide(&key, &q, 1).await.unwrap();
    assert!(d.allowed);
    assert_eq!(
        d.numbers.remaining, 9,
        "every failed decision's charge given back, once"
    );
    let mut conn = raw(&own.url()).await;
    let (mut ones, mut refunds) = (0, 0);
    for k in keys_under(&own.url(), &prefix).await {
        let ttl: i64 = conn.pttl(&k).await.unwrap();
        assert!(ttl > 0, "{k}: {ttl}");
        if k.contains(":m:") {
            assert!(ttl <= 121_000, "{k}: {ttl}");
            let answers: Vec<String> = conn.hvals(&k).await.unwrap();
            ones += answers.iter().filter(|a| *a == "1").count();
            refunds += answers.iter().filter(|a| *a == "ok").count();
        }
    }
    // Every charge of the stalled batch given back, once: the answers "1" left are the
    // batch's (each with its refund), the last decision's, and the warm-up's if its marker
    // outlived the stall.
    assert!(refunds <= 10, "{refunds} refunds of at most 10 charges");
    assert!(
        ones == refunds + 1 || ones == refunds + 2,
        "{ones} charged, {refunds} given back"
    );
}

/// Calls the script directly: one spec per entry of `specs` (windows as (field, burst s,
/// charge s)), then groups of (bucket, markers, mode, spec, tokens); at 1 700 000 000 s.
fn invoke<'a>(
    script: &'a redis::Script,
    specs: &[Vec<(&str, u64, u64)>],
    groups: &[(&str, &str, &str, usize, &[&str])],
) -> redis::ScriptInvocation<'a> {
    let mut inv = script.prepare_invoke();
    for (bucket, markers, _, _, _) in groups {
        inv.key(*bucket).key(*markers);
    }
    inv.arg(5000).arg("1700000000").arg("0").arg(3_600_000);
    inv.arg(specs.len());
    for spec in specs {
        inv.arg(spec.len());
        for (field, burst, charge) in spec {
            inv.arg(*field).arg(*burst).arg(0).arg(*charge).arg(0);
        }
    }
    for (_, _, mode, spec, tokens) in groups {
        inv.arg(*mode).arg(*spec).arg(tokens.len());
        for t in *tokens {
            inv.arg(*t);
        }
    }
    inv
}

const SCRIPT: &str = include_str!("../src/ratelimit/redis.lua");

/// HELD: the script on crafted calls: a token repeated within a group and in a later group
/// charges once; a marker hash that is a string (someone else's) is replaced by a hash with
/// a TTL; a token answered `cancelled` or junk charges nothing; a refund token re-sent
/// gives back once; eight windows in a group are read and charged.
#[tokio::test]
async fn held_the_script_on_crafted_groups() {
    let script = redis::Script::new(SCRIPT);
    let mut conn = raw(&redis_url()).await;
    let p = fresh_prefix();
    let bucket = format!("{p}{{b}}");
    let markers = format!("{p}{{b}}:m:0");
    let other = format!("{p}{{b}}:m:1");
    // 3 a minute: burst 60 s, charge 20 s; 2 a minute as a second spec on a shared field.
    let specs = vec![
        vec![("w:3", 60, 20)],
        vec![("w:3", 60, 20), ("w:2", 60, 30)],
    ];
    let _: () = conn.set(&other, "someone else's").await.unwrap();
    let _: () = conn.hset(&markers, "junk", "what?").await.unwrap();
    let _: () = conn.hset(&markers, "gone", "cancelled").await.unwrap();
    let got: Vec<i64> = invoke(
        &script,
        &specs,
        &[
            (&bucket, &markers, "c", 1, &["t1", "t1", "junk", "gone", ""]),
            (&bucket, &other, "c", 1, &["t2"]),
            (&bucket, &markers, "c", 2, &["t1", "t3", "t4"]),
        ],
    )
    .invoke_async(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        got,
        [
            1_700_000_000,
            0,
            // group 1: empty; t1 charged, t1 again a replay, junk and gone nothing, "" charged
            0,
            0,
            1,
            3,
            -1,
            -1,
            1,
            // group 2: 40 s used; t2 charged
            40,
            0,
            1,
            // group 3: w:3 full (60 s), w:2 empty; t1 a replay, t3 and t4 refused
            60,
            0,
            0,
            0,
            3,
            0,
            0,
        ]
    );
    let kind: String = redis::cmd("TYPE")
        .arg(&other)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "hash");
    for m in [&markers, &other] {
        let ttl: i64 = conn.pttl(m).await.unwrap();
        assert!(ttl > 0 && ttl <= 5000, "{m}: {ttl}");
    }
    // A refund token re-sent gives back once.
    for _ in 0..2 {
        let _: Vec<i64> = invoke(
            &script,
            &specs,
            &[(&bucket, &markers, "r", 1, &["t1:r", "t1:r"])],
        )
        .invoke_async(&mut conn)
        .await
        .unwrap();
    }
    let tat: String = conn.hget(&bucket, "w:3").await.unwrap();
    assert_eq!(tat, "1700000040:0", "one refund of 20 s, not four");
    // Eight windows in one group of three decisions.
    let eight: Vec<(&str, u64, u64)> = vec![
        ("e1", 60, 20),
        ("e2", 60, 20),
        ("e3", 60, 20),
        ("e4", 60, 20),
        ("e5", 60, 20),
        ("e6", 60, 20),
        ("e7", 60, 30),
        ("e8", 60, 20),
    ];
    let b8 = format!("{p}{{e}}");
    let m8 = format!("{p}{{e}}:m:0");
    let got: Vec<i64> = invoke(&script, &[eight], &[(&b8, &m8, "c", 1, &["x", "y", "z"])])
        .invoke_async(&mut conn)
        .await
        .unwrap();
    let mut want = vec![1_700_000_000, 0];
    want.extend([0; 16]);
    want.extend([1, 1, 0]);
    assert_eq!(got, want);
}

/// HELD: a poisoned bucket (a string at its name) in the middle of a batch: that key fails
/// closed (refused, no error), the other keys of the call decide exactly as memory does,
/// and the poisoned key refills after one burst.
#[tokio::test]
async fn held_a_poisoned_bucket_in_a_batch_fails_that_key_alone() {
    let clock = fake_clock();
    let prefix = fresh_prefix();
    let limiter = single(&prefix, &clock).await;
    let memory = memory(&clock);
    let mut conn = raw(&redis_url()).await;
    let _: () = conn
        .set(format!("{prefix}{{s:p}}"), "not a hash")
        .await
        .unwrap();
    let _: () = conn
        .hset(format!("{prefix}{{s:junk}}"), "w:10:6000000000", "12:x")
        .await
        .unwrap();
    let q = vec![Quota::per_minute(nz(10))];
    let mut asks = Vec::new();
    for key in ["q", "p", "junk", "q", "p", "r"] {
        for _ in 0..4 {
            asks.push(Ask {
                key: key.to_owned(),
                quotas: q.clone(),
                cost: 1,
            });
        }
    }
    let got = batch(&limiter, &asks).await;
    for (ask, got) in asks.iter().zip(&got) {
        let got = got.as_ref().expect("decided");
        if ask.key == "p" || ask.key == "junk" {
            assert!(!got.allowed, "{ask:?}");
        } else {
            assert_eq!(
                *got,
                memory.decide(&ask.key, &ask.quotas, ask.cost).unwrap(),
                "{ask:?}"
            );
        }
    }
    clock.advance(Duration::from_secs(60));
    for key in ["p", "junk"] {
        let d = limiter.decide(&key.to_owned(), &q, 1).await.unwrap();
        assert!(d.allowed && d.numbers.remaining == 9, "{key}: {d:?}");
    }
}

/// A fake Redis: answers `EVALSHA`/`EVAL` with `reply` (RESP), everything else `+OK`
/// (`EXEC` with an array), on a port of its own.
fn fake_redis(reply: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            std::thread::spawn(move || serve(stream, reply));
        }
    });
    port
}

fn serve(stream: std::net::TcpStream, reply: &str) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let Some(n) = line
            .trim()
            .strip_prefix('*')
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return;
        };
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            let mut len = String::new();
            if reader.read_line(&mut len).unwrap_or(0) == 0 {
                return;
            }
            let len: usize = len.trim().trim_start_matches('$').parse().unwrap_or(0);
            let mut buf = vec![0u8; len + 2];
            if reader.read_exact(&mut buf).is_err() {
                return;
            }
            buf.truncate(len);
            args.push(String::from_utf8_lossy(&buf).to_uppercase());
        }
        let answer = match args.first().map(String::as_str) {
            Some("EVALSHA" | "EVAL") => reply.to_owned(),
            Some("EXEC") => "*1\r\n$1\r\n0\r\n".to_owned(),
            Some("MULTI") => "+OK\r\n".to_owned(),
            Some("HSETNX" | "PEXPIRE" | "HGET") => "+QUEUED\r\n".to_owned(),
            _ => "+OK\r\n".to_owned(),
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Decides once against a fake Redis answering `reply`.
async fn against_fake(reply: &'static str) -> Result<Decision, RedisLimiterError> {
    let port = fake_redis(reply);
    let clock = fake_clock();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(format!("redis://127.0.0.1:{port}/"))
        .timeout(Duration::from_secs(2))
        .policy(FailurePolicy::Closed)
        .clock(clock)
        .connect()
        .await
        .unwrap();
    limiter
        .decide(&"k".to_owned(), &[Quota::per_minute(nz(60))], 1)
        .await
}

/// HELD: odd replies of the right type (too short, too long, a refund's or an unknown
/// status, nested arrays, strings, a negative offset) are refused with an error, not a
/// panic and not a decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_odd_replies_are_errors() {
    for reply in [
        "*0\r\n",
        "*3\r\n:1700000000\r\n:0\r\n:0\r\n",
        "*6\r\n:1700000000\r\n:0\r\n:0\r\n:0\r\n:1\r\n:1\r\n",
        "*5\r\n:1700000000\r\n:0\r\n:0\r\n:0\r\n:2\r\n",
        "*5\r\n:1700000000\r\n:0\r\n:0\r\n:0\r\n:7\r\n",
        "*5\r\n:1700000000\r\n:0\r\n:-1\r\n:0\r\n:1\r\n",
        "*5\r\n:1700000000\r\n:0\r\n*1\r\n:0\r\n:0\r\n:1\r\n",
        "*5\r\n$2\r\nhi\r\n:0\r\n:0\r\n:0\r\n:1\r\n",
        "$5\r\nhello\r\n",
        ":1\r\n",
    ] {
        let got = against_fake(reply).await;
        assert!(got.is_err(), "{reply:?}: {got:?}");
    }
}

/// FINDING (fixed: `verdicts` refuses a now past 2262, and `gcra::step` no longer underflows on a saturated time): a reply in the range the client accepts (`now` = 18 446 744 014 s, within a
/// minute of u64::MAX nanoseconds, which `verdicts` takes; offset 0; allowed) panics the
/// deciding task with "attempt to subtract with overflow" in `gcra::step` (now + burst
/// saturates to u64::MAX, so the refused branch is taken and computes `new_tat - horizon`
/// with `new_tat < horizon`); in a release build it wraps into a retry-after of ~584 years.
/// Only a broken or hostile Redis (or a fake clock) answers so, but an odd reply must be
/// refused as `Reply`, never panic: bound `now` in `verdicts` (e.g. to u64::MAX minus the
/// longest refill) or saturate in `step`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_at_the_end_of_time_is_an_error_not_a_panic() {
    let got = tokio::spawn(against_fake(
        "*5\r\n:18446744014\r\n:0\r\n:0\r\n:0\r\n:1\r\n",
    ))
    .await;
    let got = got.expect("the decision must not panic");
    assert!(
        matches!(got, Err(RedisLimiterError::Reply)),
        "an answer no Redis clock gives is unreadable: {got:?}"
    );
}

/// A TCP proxy to the test Redis that, when armed, lets the next script call through and
/// then drops the client's connection instead of forwarding the answer (a connection lost
/// after the call ran): the limiter re-sends the call under the same tokens.
struct DroppingProxy {
    port: u16,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl DroppingProxy {
    fn start() -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let upstream = redis_url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let arm = Arc::clone(&armed);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let doomed = Arc::new(AtomicBool::new(false));
                let (mut c_in, mut c_out) = (client.try_clone().unwrap(), client);
                let (mut s_in, mut s_out) = (server.try_clone().unwrap(), server);
                let (arm, doom) = (Arc::clone(&arm), Arc::clone(&doomed));
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let Ok(n) = c_in.read(&mut buf) else { return };
                        if n == 0 {
                            let _ = s_out.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        let chunk = &buf[..n];
                        if chunk.windows(4).any(|w| w.eq_ignore_ascii_case(b"EVAL"))
                            && arm.swap(false, Ordering::SeqCst)
                        {
                            doom.store(true, Ordering::SeqCst);
                        }
                        if s_out.write_all(chunk).is_err() {
                            return;
                        }
                    }
                });
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let Ok(n) = s_in.read(&mut buf) else { return };
                        if n == 0 || doomed.load(Ordering::SeqCst) {
                            let _ = c_out.shutdown(std::net::Shutdown::Both);
                            let _ = s_in.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, armed }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// FINDING (fixed: a decision that charged the first time is stepped at no cost): a decision whose call ran but whose answer was lost (the connection dropped)
/// is re-sent under the same token and gets status 3 ("allowed before"); the client then
/// computes its numbers from the bucket as it is *now*, which already holds this
/// decision's own charge, and steps it again: `X-RateLimit-Remaining` is one charge too low
/// (the memory limiter, and the first sending, say 9, 8, 7; the re-sent batch says 6, 6,
/// 6, though 7 are left: below even "the bucket as it is then" that the docs promise),
/// and the last token re-sent reports an admitted request with `retry_after` of a whole
/// window. Before 720702c (checked on 8f20dfb: this test passes there) the re-sent decision
/// got its first answer (offsets before its charge) back from its marker. Fix: keep the offsets before
/// the charge in the marker's answer (or, for status 3, step at cost 0 / subtract the
/// decision's own charge before stepping) so that a re-sent decision reports its first
/// verdict's numbers.
#[tokio::test]
async fn a_re_sent_decision_reports_its_first_numbers() {
    let proxy = DroppingProxy::start();
    let clock = fake_clock();
    let memory = memory(&clock);
    let limiter: RedisLimiter<String> = RedisLimiter::builder(proxy.url())
        .prefix(fresh_prefix())
        .timeout(Duration::from_secs(5))
        .clock(clock.clone())
        .connect()
        .await
        .unwrap();
    let q = vec![Quota::per_minute(nz(10))];
    let warm = "warm".to_owned();
    limiter.decide(&warm, &q, 1).await.unwrap();
    memory.decide(&warm, &q, 1).unwrap();
    // A batch of three on one key (one group), its answer lost once.
    let asks: Vec<Ask> = (0..3)
        .map(|_| Ask {
            key: "k".to_owned(),
            quotas: q.clone(),
            cost: 1,
        })
        .collect();
    proxy.arm();
    let got: Vec<Decision> = batch(&limiter, &asks)
        .await
        .into_iter()
        .map(|d| d.expect("re-sent and answered"))
        .collect();
    assert!(
        !proxy.armed.load(std::sync::atomic::Ordering::SeqCst),
        "the proxy dropped the answer"
    );
    let want: Vec<Decision> = asks
        .iter()
        .map(|a| memory.decide(&a.key, &a.quotas, a.cost).unwrap())
        .collect();
    // Charged once each: the next decision sees 3 taken.
    let next = limiter.decide(&"k".to_owned(), &q, 1).await.unwrap();
    assert_eq!(next, memory.decide(&"k".to_owned(), &q, 1).unwrap());
    // Even read as "the bucket as it is now", 7 tokens are left after the three charges:
    // no re-sent decision may report fewer than that.
    for d in &got {
        assert!(
            d.numbers.remaining >= 7,
            "a re-sent decision reports its own charge twice: {got:?}"
        );
    }
    // Fixed: each re-sent decision reports its first verdict with the bucket as it is now,
    // what is left (7), as the docs say; the first sending's numbers (memory's 9, 8, 7)
    // are not kept per decision.
    for (d, w) in got.iter().zip(&want) {
        assert!(d.allowed && w.allowed);
        assert_eq!(d.numbers.remaining, 7, "{got:?}");
        assert_eq!(d.numbers.retry_after, 0, "{got:?}");
        assert_eq!(d.numbers.limit, w.numbers.limit);
    }
}

/// FINDING (fixed, as above): (same cause as the one above) the last token, its answer lost and re-sent: admitted, but
/// reported with a `retry_after` of a whole window (a 200 telling the client to wait).
#[tokio::test]
async fn a_re_sent_last_token_is_not_told_to_wait() {
    let proxy = DroppingProxy::start();
    let clock = fake_clock();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(proxy.url())
        .prefix(fresh_prefix())
        .timeout(Duration::from_secs(5))
        .clock(clock.clone())
        .connect()
        .await
        .unwrap();
    let q = [Quota::per_minute(nz(1))];
    limiter.decide(&"warm".to_owned(), &q, 1).await.unwrap();
    proxy.arm();
    let d = limiter.decide(&"k".to_owned(), &q, 1).await.unwrap();
    assert!(!proxy.armed.load(std::sync::atomic::Ordering::SeqCst));
    assert!(d.allowed, "charged once, by the first sending");
    assert_eq!(d.numbers.remaining, 0);
    assert_eq!(
        d.numbers.retry_after, 0,
        "an admitted request is not told to wait: {d:?}"
    );
    assert!(
        !limiter
            .decide(&"k".to_owned(), &q, 1)
            .await
            .unwrap()
            .allowed,
        "and only once"
    );
}

/// FINDING (fixed: `by_bucket` sorts stably): on the Cluster a batch's decisions on one bucket do not run in the order they
/// came. `send_batch` now sorts stably so that "each bucket's decisions [go] together, in
/// the order they came", and on one Redis they do; but on a cluster `by_bucket` first
/// splits the batch with `sort_unstable_by` (pre-existing), which permutes equal buckets:
/// here a key's first request, costing the whole capacity, is refused (remaining 9)
/// because a later 1-token request of the same key was run before it, unlike separate
/// calls or one Redis. Low impact (the requests were concurrent), but it breaks the stated
/// invariant and fragments groups. Fix: `sort_by` (stable) in `by_bucket`.
#[tokio::test]
async fn a_buckets_decisions_keep_their_order_in_a_batch() {
    for on_cluster in [false, true] {
        let clock = fake_clock();
        let prefix = fresh_prefix();
        let limiter = if on_cluster {
            cluster(&prefix, &clock).await
        } else {
            single(&prefix, &clock).await
        };
        let q = vec![Quota::per_minute(nz(10))];
        let keys = ["m", "a", "z", "k"];
        let mut asks = Vec::new();
        for i in 0..64 {
            asks.push(Ask {
                key: keys[i % 4].to_owned(),
                quotas: q.clone(),
                cost: if i < 4 { 10 } else { 1 },
            });
        }
        let got = batch(&limiter, &asks).await;
        for (i, d) in got.iter().enumerate() {
            let d = d.as_ref().expect("decided");
            assert_eq!(
                d.allowed,
                i < 4,
                "cluster {on_cluster}: decision {i}: {d:?}"
            );
        }
    }
}
