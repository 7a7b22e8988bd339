//! Attacks on the batching `RedisLimiter` (commit 2487aa5: concurrent decisions share one
//! script call through a batching task): over-admission under heavy concurrency, poisoned
//! neighbours, refunds racing batched charges, stalls and hangs, the task's life (dropped
//! limiter, runtime shut down, runtime idle), a stalled cluster node.
//!
//! Tests named `held_*` are attacks that held (regression tests); the others are the four
//! findings, each failing on the code they were written against and fixed since: a limiter
//! built in an idle runtime never decided (the task now starts with the first decision), a
//! stall longer than the settling bound charged refused requests (settling now retries for
//! a minute), one stalled cluster node held the queue for every key (no shared in-flight
//! cap on a cluster), and a batch that ran but lost its reply stayed charged (every failure
//! that may have run is settled).
//!
//! Needs `KEYGATE_TEST_REDIS_URL` and `KEYGATE_TEST_REDIS_CLUSTER`, `redis-server` on the
//! PATH, and `bash scripts/redis-cluster.sh` for the test that owns its cluster.
#![cfg(feature = "test-servers")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis_hunt::Rng;
use common::servers::{cluster_nodes, redis_url};

use std::collections::HashMap;
use std::net::TcpListener;
use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::ratelimit::{FailurePolicy, Quota, RedisLimiter, RedisLimiterError};
use redis::AsyncCommands;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// A prefix no other run shares.
fn fresh_prefix() -> String {
    common::servers::fresh_prefix("hb")
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// A Redis server this test owns (its pid too, to stop and continue it).
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
        for _ in 0..200 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"PING\r\n");
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

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success());
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
        // A stopped process must be continued to die cleanly.
        if self.child.is_some() {
            self.signal("CONT");
        }
        self.kill();
    }
}

async fn decide(l: &RedisLimiter<String>, key: &str, q: &[Quota], cost: u32) -> bool {
    l.decide(&key.to_owned(), q, cost)
        .await
        .expect("decide")
        .allowed
}

// ------------------------------------------------------------------------------------------
// Over-admission under heavy concurrency.
// ------------------------------------------------------------------------------------------

/// Three instances (three connections, three batching tasks) on one Redis, then on the
/// cluster; 300 tasks; 6 keys; two windows (a tight hourly one and a loose minute one);
/// costs 1 to 3. Per key, the tokens admitted never exceed the hourly capacity, and the
/// budget is used up (requests of cost 1 keep coming until the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_many_instances_mixed_costs_windows_and_keys_never_over_admit() {
    for on_cluster in [false, true] {
        let prefix = fresh_prefix();
        let mut limiters = Vec::new();
        for _ in 0..3 {
            let b = if on_cluster {
                RedisLimiter::<String>::cluster_builder(cluster_nodes())
            } else {
                RedisLimiter::<String>::builder(redis_url())
            };
            limiters.push(
                b.prefix(prefix.clone())
                    .timeout(Duration::from_secs(10))
                    .connect()
                    .await
                    .expect("connect"),
            );
        }
        const CAP: u32 = 120;
        let q = [Quota::per_hour(nz(CAP)), Quota::per_minute(nz(10_000))];
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..300u64 {
            let l = limiters[(t % 3) as usize].clone();
            tasks.spawn(async move {
                let mut rng = Rng(t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
                let mut taken: HashMap<String, u32> = HashMap::new();
                for i in 0..12 {
                    let key = format!("k{}", rng.below(6));
                    // The last requests are all of cost 1: they use up what is left.
                    let cost = if i >= 9 { 1 } else { 1 + rng.below(3) as u32 };
                    let d = l.decide(&key, &q, cost).await.expect("decide");
                    if d.allowed {
                        *taken.entry(key).or_default() += cost;
                    }
                }
                taken
            });
        }
        let mut total: HashMap<String, u32> = HashMap::new();
        while let Some(done) = tasks.join_next().await {
            for (k, n) in done.expect("task") {
                *total.entry(k).or_default() += n;
            }
        }
        assert_eq!(total.len(), 6, "{total:?}");
        for (k, n) in &total {
            assert!(*n <= CAP, "cluster {on_cluster}: {k} took {n} of {CAP}");
            // About 600 requests per key: the budget is used up.
            assert!(
                *n >= CAP - 2,
                "cluster {on_cluster}: {k} took only {n} of {CAP}"
            );
        }
        let calls: u64 = limiters.iter().map(|l| l.stats().calls).sum();
        let decided: u64 = limiters.iter().map(|l| l.stats().decided).sum();
        assert_eq!(decided, 3600);
        eprintln!("cluster {on_cluster}: {decided} decisions in {calls} calls");
    }
}

// ------------------------------------------------------------------------------------------
// Poisoned neighbours.
// ------------------------------------------------------------------------------------------

/// Buckets holding the wrong type, huge or garbage values, decided in the same batches as
/// healthy keys: every healthy key gets exactly its budget, nothing fails, the poisoned keys
/// are refused for a burst (never admitted unlimited) and nothing errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_poisoned_buckets_do_not_fail_or_slow_their_batch_neighbours() {
    let prefix = fresh_prefix();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(redis_url())
        .prefix(prefix.clone())
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let q = [Quota::per_hour(nz(5))];
    let field = format!("w:5:{}", 720 * 1_000_000_000u64);
    let mut admin = raw(&redis_url()).await;
    let huge_digits = "9".repeat(4 << 20);
    let _: () = admin
        .set(format!("{prefix}{{s:p0}}"), "not a hash")
        .await
        .unwrap();
    let _: () = admin
        .rpush(format!("{prefix}{{s:p1}}"), "a list")
        .await
        .unwrap();
    let _: () = admin
        .hset(format!("{prefix}{{s:p2}}"), &field, &huge_digits)
        .await
        .unwrap();
    let _: () = admin
        .hset(
            format!("{prefix}{{s:p3}}"),
            &field,
            format!("{huge_digits}:1"),
        )
        .await
        .unwrap();
    let _: () = admin
        .hset(format!("{prefix}{{s:p4}}"), &field, "-5:-1")
        .await
        .unwrap();
    let _: () = admin
        .hset(format!("{prefix}{{s:p5}}"), &field, "1e308:0")
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..240u32 {
        let l = limiter.clone();
        tasks.spawn(async move {
            // 20 healthy keys, 6 poisoned ones, interleaved.
            let key = if i % 4 == 0 {
                format!("p{}", (i / 4) % 6)
            } else {
                format!("h{}", i % 20)
            };
            let started = Instant::now();
            let d = l.decide(&key, &q, 1).await;
            (key, d.map(|d| d.allowed), started.elapsed())
        });
    }
    let mut admitted: HashMap<String, u32> = HashMap::new();
    let mut slowest = Duration::ZERO;
    while let Some(done) = tasks.join_next().await {
        let (key, d, took) = done.unwrap();
        slowest = slowest.max(took);
        let allowed = d.unwrap_or_else(|e| panic!("{key}: {e}"));
        *admitted.entry(key).or_default() += u32::from(allowed);
    }
    for i in 0..20 {
        let n = admitted.get(&format!("h{i}")).copied().unwrap_or(0);
        // 9 requests (i%4 != 0 keys get 9 or so), 5 admitted.
        assert!(n <= 5, "h{i}: {n}");
    }
    for i in 0..6 {
        let n = admitted.get(&format!("p{i}")).copied().unwrap_or(0);
        assert!(n <= 5, "poisoned p{i} admitted {n}: more than its budget");
    }
    assert!(slowest < Duration::from_secs(2), "slowest {slowest:?}");
    assert_eq!(limiter.stats().failures, 0, "{:?}", limiter.stats());
    let mut keys: Vec<String> = admin.keys(format!("{prefix}*")).await.unwrap();
    keys.retain(|k| !k.contains(":m:"));
    let _: () = admin.del(keys).await.unwrap();
}

// ------------------------------------------------------------------------------------------
// Refunds racing batched charges.
// ------------------------------------------------------------------------------------------

/// 200 tasks charge one key (costs 1–3, batched) and give back about half of what they
/// were admitted (directly, racing the batches). Afterwards the key has exactly its
/// capacity minus what was kept (one token of refill slack): refunds neither vanish nor
/// give back more than was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_refunds_racing_batched_charges_balance_exactly() {
    for on_cluster in [false, true] {
        let b = if on_cluster {
            RedisLimiter::<String>::cluster_builder(cluster_nodes())
        } else {
            RedisLimiter::<String>::builder(redis_url())
        };
        let limiter = b
            .prefix(fresh_prefix())
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        const CAP: u32 = 100;
        let q = [Quota::per_hour(nz(CAP))];
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..200u64 {
            let l = limiter.clone();
            tasks.spawn(async move {
                let mut rng = Rng(t.wrapping_mul(0x2545_F491) | 1);
                let cost = 1 + rng.below(3) as u32;
                let key = "r".to_owned();
                let d = l.decide(&key, &q, cost).await.expect("decide");
                if !d.allowed {
                    return 0;
                }
                if rng.below(2) == 0 {
                    l.give_back(&key, &q, cost).await.expect("give back");
                    0
                } else {
                    cost
                }
            });
        }
        let mut kept = 0;
        while let Some(n) = tasks.join_next().await {
            kept += n.unwrap();
        }
        assert!(kept <= CAP, "{kept}");
        let mut more = 0;
        while decide(&limiter, "r", &q, 1).await {
            more += 1;
            assert!(more <= CAP);
        }
        assert!(
            (CAP - kept..=CAP - kept + 1).contains(&more),
            "cluster {on_cluster}: kept {kept}, then {more} more of {CAP}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// The batching task's life.
// ------------------------------------------------------------------------------------------

async fn clients(admin: &mut redis::aio::MultiplexedConnection) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(admin)
        .await
        .unwrap();
    list.lines().filter(|l| !l.trim().is_empty()).count()
}

/// Dropping every clone of a limiter ends its batching task: the connection to Redis is
/// closed (nothing leaks, nothing hangs), also after it decided under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_dropping_the_limiter_ends_its_task_and_closes_its_connection() {
    let own = OwnRedis::start();
    let mut admin = raw(&own.url()).await;
    let alone = clients(&mut admin).await;
    let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let q = [Quota::per_second(nz(100_000))];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let l = limiter.clone();
        tasks.spawn(async move { decide(&l, &format!("d{}", i % 7), &q, 1).await });
    }
    while let Some(d) = tasks.join_next().await {
        assert!(d.unwrap());
    }
    assert!(clients(&mut admin).await > alone);
    drop(limiter);
    let started = Instant::now();
    loop {
        if clients(&mut admin).await == alone {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the limiter's connection is still open after it was dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The runtime the limiter was built in (its batching task's) shuts down while decisions
/// from another runtime wait in it: every one still gets an answer, and the key is charged
/// exactly once per admitted request (no double charge, no charge without an answer).
#[test]
fn held_the_tasks_runtime_shutting_down_mid_batch_charges_each_decision_once() {
    for round in 0..5 {
        let prefix = fresh_prefix();
        let home = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let limiter: RedisLimiter<String> = home
            .block_on(
                RedisLimiter::builder(redis_url())
                    .prefix(prefix)
                    .timeout(Duration::from_secs(5))
                    .connect(),
            )
            .unwrap();
        // Warm: the task's connection is up.
        let q = [Quota::per_hour(nz(50))];
        let away = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let results = away.block_on(async {
            assert!(decide(&limiter, "warm", &q, 1).await);
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..120 {
                let l = limiter.clone();
                tasks.spawn(async move { l.decide(&"s".to_owned(), &q, 1).await });
            }
            // Shut the home runtime down while they are queued or in flight.
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_micros(300 * round));
                home.shutdown_background();
            })
            .await
            .unwrap();
            let mut admitted = 0u32;
            let mut errors = Vec::new();
            while let Some(d) = tasks.join_next().await {
                match d.unwrap() {
                    Ok(d) => admitted += u32::from(d.allowed),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            let mut more = 0u32;
            while decide(&limiter, "s", &q, 1).await {
                more += 1;
                assert!(more <= 50);
            }
            (admitted, more, errors)
        });
        let (admitted, more, errors) = results;
        assert!(errors.is_empty(), "round {round}: {errors:?}");
        assert_eq!(
            admitted + more,
            50,
            "round {round}: {admitted} admitted, then {more} more: charges lost or doubled"
        );
    }
}

/// FINDING 1 (regression of 2487aa5): a limiter built in one runtime and used in another
/// while the first stays alive but idle (a current-thread runtime used for setup, kept in a
/// struct) never decides: the batching task was spawned in the idle runtime, nothing drives
/// it, and every decision waits for it until its timeout. Before the batching, the lazy
/// connection was made in the runtime that used it, and this worked.
#[test]
fn a_limiter_built_in_an_idle_runtime_decides_in_the_runtime_that_uses_it() {
    let setup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limiter: RedisLimiter<String> = setup
        .block_on(
            RedisLimiter::builder(redis_url())
                .prefix(fresh_prefix())
                .timeout(Duration::from_millis(500))
                .connect(),
        )
        .unwrap();
    // `setup` stays alive (not dropped), but nothing drives it any more.
    let serving = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let q = [Quota::per_hour(nz(2))];
    let got: Vec<Result<bool, String>> = serving.block_on(async {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(
                limiter
                    .decide(&"idle".to_owned(), &q, 1)
                    .await
                    .map(|d| d.allowed)
                    .map_err(|e| e.to_string()),
            );
        }
        got
    });
    drop(setup);
    assert_eq!(got, [Ok(true), Ok(true), Ok(false)]);
}

// ------------------------------------------------------------------------------------------
// Hangs and stalls.
// ------------------------------------------------------------------------------------------

/// Redis hangs (SIGSTOP: the connection stays open, nothing answers) under load from 64
/// tasks: under `Local` and `Open` every decision answers within its timeout (plus slack),
/// the breaker stops the queue from growing (few calls and failures, the rest skipped), and
/// once Redis continues the limiter decides on it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_a_hung_redis_under_local_and_open_answers_in_time_and_stops_queueing() {
    for policy in [FailurePolicy::Local, FailurePolicy::Open] {
        let own = OwnRedis::start();
        let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
            .policy(policy)
            .timeout(Duration::from_millis(100))
            .breaker(3, Duration::from_millis(300))
            .connect()
            .await
            .unwrap();
        let q = [Quota::per_second(nz(1_000_000))];
        assert!(decide(&limiter, "w", &q, 1).await);
        own.signal("STOP");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..64 {
            let l = limiter.clone();
            let stop = Arc::clone(&stop);
            let requests = Arc::clone(&requests);
            tasks.spawn(async move {
                let mut slowest = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let d = l.decide(&format!("k{}", t % 9), &q, 1).await;
                    slowest = slowest.max(started.elapsed());
                    d.expect("the policy decides");
                    requests.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                slowest
            });
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        let mut slowest = Duration::ZERO;
        while let Some(s) = tasks.join_next().await {
            slowest = slowest.max(s.unwrap());
        }
        let s = limiter.stats();
        let n = requests.load(Ordering::Relaxed);
        eprintln!("{policy:?}: {n} requests, slowest {slowest:?}, {s:?}");
        assert!(
            slowest < Duration::from_millis(600),
            "{policy:?}: slowest {slowest:?}"
        );
        // Before the breaker opened at most the 64 in flight failed, then a probe or so per
        // cool-down: the rest never reached the queue.
        assert!(s.failures <= 64 + 2 * 6, "{policy:?}: {s:?}");
        assert!(s.skipped + s.failures >= n, "{policy:?}: {s:?}");
        own.signal("CONT");
        let started = Instant::now();
        let before = limiter.stats().decided;
        loop {
            let _ = limiter.decide(&"back".to_owned(), &q, 1).await;
            if limiter.stats().decided > before {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{policy:?}: not back on Redis: {:?}",
                limiter.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "{policy:?}: back on Redis {:?} after CONT",
            started.elapsed()
        );
    }
}

/// FINDING 2: a decision that timed out is refused (503 under `Closed`), and its settling
/// (`SET NX` of its marker, else give back) is given up after `max(10 × timeout, 1 s)`. When
/// Redis stalls longer than that (here `DEBUG SLEEP 3` with a 150 ms timeout: a slow fork,
/// a big `KEYS`, a paused VM), the script queued before the stall still runs when Redis
/// wakes, charges the key, and nobody gives the tokens back: every request that was refused
/// during the stall costs its key a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_longer_than_the_settle_bound_does_not_charge_refused_decisions() {
    let own = OwnRedis::start();
    let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
        .timeout(Duration::from_millis(150))
        .breaker(1000, Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let q = [Quota::per_day(nz(10))];
    assert!(decide(&limiter, "slow", &q, 1).await);
    let sleeper = common::servers::stall(&own.url(), 3).await;
    let mut refused = 0;
    for _ in 0..3 {
        let r = limiter.decide(&"slow".to_owned(), &q, 1).await;
        assert!(matches!(r, Err(RedisLimiterError::Timeout(_))), "{r:?}");
        refused += 1;
    }
    sleeper.await.unwrap();
    // Redis is awake: decide on it again (bounded), then use up the budget.
    let started = Instant::now();
    let mut admitted = loop {
        if let Ok(d) = limiter.decide(&"slow".to_owned(), &q, 1).await {
            break u32::from(d.allowed);
        }
        assert!(started.elapsed() < Duration::from_secs(15));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for _ in 0..20 {
        if decide(&limiter, "slow", &q, 1).await {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 9,
        "1 served before the stall, {refused} refused during it: 9 should be left"
    );
}

/// FINDING 4: the limiter's connection is killed (`CLIENT KILL`) again and again while 300
/// batched decisions on one key run. A batch whose script ran but whose reply was lost is
/// re-sent once; when the re-send fails too (`broken pipe`: the connection manager has not
/// reconnected yet), every decision of the batch is failed (503 under `Closed`) — but the
/// first send charged them, and no settling runs for connection errors (only for
/// timeouts). Measured: 36 admitted + 0 left of 100 (64 tokens, one whole batch, charged to
/// refused requests); 71 + 0; 42 + 57. Batching makes one lost reply cost up to 64 tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_mid_batch_charge_exactly_the_admitted() {
    let own = OwnRedis::start();
    for round in 0..4 {
        dropped_connections_round(&own, round).await;
    }
}

async fn dropped_connections_round(own: &OwnRedis, round: u32) {
    let limiter: RedisLimiter<String> = RedisLimiter::builder(own.url())
        .timeout(Duration::from_secs(2))
        .breaker(1_000_000, Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    const CAP: u32 = 100;
    let q = [Quota::per_hour(nz(CAP))];
    assert!(decide(&limiter, "warm", &q, 1).await);
    let mut admin = raw(&own.url()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut kills = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n: u64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("normal")
                    .arg("SKIPME")
                    .arg("yes")
                    .query_async(&mut admin)
                    .await
                    .unwrap_or(0);
                kills += n;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            kills
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let l = limiter.clone();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(rand_ms()))).await;
            l.decide(&format!("kill{round}"), &q, 1).await
        });
    }
    let (mut admitted, mut errors) = (0u32, Vec::new());
    while let Some(d) = tasks.join_next().await {
        match d.unwrap() {
            Ok(d) => admitted += u32::from(d.allowed),
            Err(e) => errors.push(e.to_string()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let kills = killer.await.unwrap();
    // Let the settling of failed decisions finish (a bounded poll).
    let started = Instant::now();
    while limiter.stats().settling > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "settling never ends: {:?}",
            limiter.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut more = 0u32;
    let started = Instant::now();
    loop {
        match limiter.decide(&format!("kill{round}"), &q, 1).await {
            Ok(d) if d.allowed => more += 1,
            Ok(_) => break,
            Err(_) => assert!(started.elapsed() < Duration::from_secs(10)),
        }
        assert!(more <= CAP);
    }
    eprintln!(
        "round {round}: {kills} connections killed; {admitted} admitted, {} errors, then {more} more; {:?}",
        errors.len(),
        limiter.stats()
    );
    assert!(admitted <= CAP);
    assert_eq!(
        admitted + more,
        CAP,
        "{admitted} admitted + {more} left != {CAP}: {} errors {:?}",
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>()
    );
}

fn rand_ms() -> u8 {
    let mut b = [0u8; 1];
    getrandom::fill(&mut b).unwrap();
    b[0] % 200
}

// ------------------------------------------------------------------------------------------
// A cluster with one stalled master.
// ------------------------------------------------------------------------------------------

/// A Redis Cluster this test owns (`scripts/redis-cluster.sh`), stopped on drop.
struct OwnCluster {
    dir: String,
    nodes: Vec<String>,
}

impl OwnCluster {
    fn start() -> Self {
        let root = env!("CARGO_MANIFEST_DIR");
        let out = Command::new("bash")
            .arg(format!("{root}/scripts/redis-cluster.sh"))
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut dir = String::new();
        let mut nodes = Vec::new();
        for line in text.lines() {
            if let Some(d) = line.strip_prefix("KEYGATE_REDIS_CLUSTER_DIR=") {
                dir = d.to_owned();
            }
            if let Some(n) = line.strip_prefix("KEYGATE_TEST_REDIS_CLUSTER=") {
                nodes = n.split(',').map(str::to_owned).collect();
            }
        }
        assert!(!dir.is_empty() && nodes.len() == 3, "{text}");
        Self { dir, nodes }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let root = env!("CARGO_MANIFEST_DIR");
        let _ = Command::new("bash")
            .arg(format!("{root}/scripts/redis-cluster.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// The node (its URL) serving `slot`.
async fn node_of(nodes: &[String], slot: u16) -> String {
    let mut c = raw(&nodes[0]).await;
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut c)
        .await
        .unwrap();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() < 9 || !parts[2].contains("master") {
            continue;
        }
        let addr = parts[1].split('@').next().unwrap();
        for range in &parts[8..] {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (a, b): (u16, u16) = (a.parse().unwrap(), b.parse().unwrap());
            if (a..=b).contains(&slot) {
                return format!("redis://{addr}");
            }
        }
    }
    panic!("no node for slot {slot}");
}

async fn slot_of(nodes: &[String], name: &str) -> u16 {
    let mut c = raw(&nodes[0]).await;
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(name)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// FINDING 3 (regression of 2487aa5): on a cluster, one stalled master makes every key
/// fail. The batching task keeps at most 4 calls in flight and drains nothing while 4 are
/// out; calls for the stalled node's buckets hang (up to the response timeout, 10 × the
/// timeout, at least 2 s), so decisions for keys on the two healthy masters wait in the
/// queue behind them and time out. Before the batching each decision went on its own and
/// keys on healthy nodes were decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stalled_cluster_node_does_not_fail_keys_on_the_healthy_ones() {
    let cluster = OwnCluster::start();
    let prefix = fresh_prefix();
    let limiter: RedisLimiter<String> = RedisLimiter::cluster_builder(cluster.nodes.clone())
        .prefix(prefix.clone())
        .timeout(Duration::from_millis(200))
        // The breaker is shared by every key: kept out of the way, so that the queue alone
        // is measured.
        .breaker(1_000_000, Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    // Sort 60 keys by the node holding their bucket.
    let mut by_node: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..60 {
        let key = format!("n{i}");
        let slot = slot_of(&cluster.nodes, &format!("{prefix}{{s:{key}}}")).await;
        by_node
            .entry(node_of(&cluster.nodes, slot).await)
            .or_default()
            .push(key);
    }
    assert_eq!(by_node.len(), 3, "keys on every node");
    let stalled = by_node.keys().next().unwrap().clone();
    let stalled_keys = by_node[&stalled].clone();
    let healthy_keys: Vec<String> = by_node
        .iter()
        .filter(|(n, _)| **n != stalled)
        .flat_map(|(_, k)| k.clone())
        .collect();
    let q = [Quota::per_second(nz(1_000_000))];
    // Warm: connections to every node (a fresh cluster may need a moment).
    for k in stalled_keys.iter().chain(&healthy_keys) {
        let started = Instant::now();
        while limiter.decide(k, &q, 1).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "cluster not up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut admin = raw(&stalled).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2500)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let paused = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16usize {
        let l = limiter.clone();
        let stop = Arc::clone(&stop);
        let keys = if t % 2 == 0 {
            stalled_keys.clone()
        } else {
            healthy_keys.clone()
        };
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                match l.decide(&keys[i % keys.len()], &q, 1).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (t % 2 == 1, ok, failed)
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut healthy_ok, mut healthy_failed, mut stalled_failed) = (0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (healthy, ok, failed) = r.unwrap();
        if healthy {
            healthy_ok += ok;
            healthy_failed += failed;
        } else {
            stalled_failed += failed;
        }
    }
    eprintln!(
        "healthy keys: {healthy_ok} decided, {healthy_failed} failed; stalled keys: \
         {stalled_failed} failed ({:?} into the pause)",
        paused.elapsed()
    );
    assert!(stalled_failed > 0, "the pause took hold");
    assert!(
        healthy_ok > 100,
        "healthy keys decided only {healthy_ok} times"
    );
    assert!(
        healthy_failed * 20 <= healthy_ok,
        "keys on healthy nodes failed {healthy_failed} times (decided {healthy_ok})"
    );
    // Let the pause end before the cluster is stopped.
    while paused.elapsed() < Duration::from_millis(2600) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
