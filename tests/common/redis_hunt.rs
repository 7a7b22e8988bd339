//! What the Redis limiter's attack suites share: limiters on one Redis or the Cluster, the
//! memory limiter to compare with, a deterministic PRNG, and batches of decisions sent in
//! one script call.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use keygate::clock::FakeClock;
use keygate::ratelimit::{Decision, MemoryLimiter, Quota, RedisLimiter, RedisLimiterError};

use super::servers::{cluster_nodes, redis_url};

/// A clock at a fixed instant of 2023, moved by hand.
pub fn fake_clock() -> FakeClock {
    FakeClock::new(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

/// A plain connection to the Redis at `url`.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Every key whose name starts with `prefix` on the Redis at `url`, sorted.
pub async fn keys_under(url: &str, prefix: &str) -> Vec<String> {
    let mut conn = raw(url).await;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, got): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("scan");
        keys.extend(got);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys
}

/// A limiter on the one Redis (`KEYGATE_TEST_REDIS_URL`).
pub async fn single(prefix: &str, clock: &FakeClock) -> RedisLimiter<String> {
    limiter(false, prefix, clock).await
}

/// A limiter on the Cluster (`KEYGATE_TEST_REDIS_CLUSTER`).
pub async fn cluster(prefix: &str, clock: &FakeClock) -> RedisLimiter<String> {
    limiter(true, prefix, clock).await
}

/// A limiter on the Cluster or the one Redis, with a timeout of 5 s.
pub async fn limiter(on_cluster: bool, prefix: &str, clock: &FakeClock) -> RedisLimiter<String> {
    let builder = if on_cluster {
        RedisLimiter::cluster_builder(cluster_nodes())
    } else {
        RedisLimiter::builder(redis_url())
    };
    builder
        .prefix(prefix)
        .timeout(Duration::from_secs(5))
        .clock(clock.clone())
        .connect()
        .await
        .expect("connect to KEYGATE_TEST_REDIS_URL / KEYGATE_TEST_REDIS_CLUSTER")
}

/// The memory limiter on `clock`: what Redis must decide alike.
pub fn memory(clock: &FakeClock) -> MemoryLimiter<String> {
    MemoryLimiter::builder()
        .clock(clock.clone())
        .build()
        .expect("memory")
}

/// A tiny deterministic PRNG (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Polls every future once, in order, before yielding: on a current-thread runtime each
/// takes its token and enqueues its decision before the batching task runs, so up to 64 of
/// them go out in one script call, in this order (then stably sorted by bucket).
pub async fn all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// One decision of a batch.
#[derive(Debug, Clone)]
pub struct Ask {
    pub key: String,
    pub quotas: Vec<Quota>,
    pub cost: u32,
}

/// Decides `asks` in one batch (one script call on one Redis, one per bucket on a cluster).
pub async fn batch(
    limiter: &RedisLimiter<String>,
    asks: &[Ask],
) -> Vec<Result<Decision, RedisLimiterError>> {
    assert!(asks.len() <= 64, "one call carries at most 64 decisions");
    let futures: Vec<_> = asks
        .iter()
        .map(|a| limiter.decide(&a.key, &a.quotas, a.cost))
        .collect();
    all(futures).await
}
