//! Buckets on Redis, shared by every instance: [`RedisLimiter`].

use std::fmt::{self, Write as _};
use std::future::Future;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::decision::{most_restrictive, Decision};
use super::gcra::step;
use super::memory::{LimiterError, MemoryLimiter};
use super::store::{BucketKey, LimiterStore};
use crate::answer::Answer;
use crate::clock::Clock;
use crate::error::ConfigError;
use crate::key::KeyId;
use crate::quota::{Quota, MAX_WINDOWS};

/// The decision script: every window of one bucket, the cost, refunds, Redis's clock.
const SCRIPT: &str = include_str!("redis.lua");

const SEC: u64 = 1_000_000_000;

/// A timed-out decision's token, written before the script could run: the script then
/// charges nothing.
const CANCELLED: &str = "cancelled";

/// What a [`RedisLimiter`] does when Redis does not answer in time, fails, or its breaker
/// is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Refuse: the layers answer 503 `auth_unavailable`. The default: no key gets more than
    /// its budget, at the price of the API while Redis is down.
    #[default]
    Closed,
    /// Admit, as if every window were full (so only a cost above a window's capacity is
    /// refused), and say so: a `WARN` event (at most one a
    /// second per limiter) with the field `keygate_limiter_fail_open` counting the requests
    /// admitted unlimited since the last event, and [`RedisLimiterStats::fail_open`].
    Open,
    /// Decide in this instance's own memory ([`MemoryLimiter`]): each instance gives every
    /// key its whole budget while Redis is down, so N instances admit up to N times it.
    Local,
}

/// Why a [`RedisLimiter`] could not decide (under [`FailurePolicy::Closed`]; the other
/// policies decide anyway).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisLimiterError {
    /// No quota, or more than [`MAX_WINDOWS`].
    #[error("a bucket needs between 1 and 8 quotas, got {0}")]
    Windows(usize),
    /// Redis did not answer within the limiter's timeout.
    #[error("Redis did not answer the rate-limit decision within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("Redis failed the rate-limit decision ({0})")]
    Redis(#[source] redis::RedisError),
    /// The script answered something it never writes.
    #[error("Redis answered the rate-limit decision with something unexpected")]
    Reply,
    /// Recent calls failed, and Redis is left alone for a while (the breaker is open).
    #[error("Redis is skipped after repeated failures (the breaker is open)")]
    BreakerOpen,
    /// The local fallback ([`FailurePolicy::Local`]) could not decide.
    #[error(transparent)]
    Local(#[from] LimiterError),
}

/// What a bucket key is called on Redis: a stable text form, the same in every instance.
///
/// Implemented for the per-key buckets of [`PerKey`](super::PerKey), IP addresses,
/// strings and integers. Each kind has its own tag (`k:`, `ip:`, `s:`, `n:`) and the text is
/// escaped, so that no key can pick another's hash slot or name another kind's bucket;
/// values that mean the same share a bucket (the strings `String`, `Arc<str>` and `&str`,
/// the integers `u32` and `u64`). Give limiters that must not share buckets their own
/// [`prefix`](RedisLimiterBuilder::prefix).
pub trait RedisBucketKey: BucketKey {
    /// Appends this key's name to `out`.
    fn write_redis_key(&self, out: &mut String);
}

/// Appends `text` with `%`, `{`, `}` and `/` escaped.
fn escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
}

impl RedisBucketKey for (KeyId, Option<Arc<str>>) {
    fn write_redis_key(&self, out: &mut String) {
        out.push_str("k:");
        escaped(out, self.0.as_str());
        if let Some(bucket) = &self.1 {
            out.push('/');
            escaped(out, bucket);
        }
    }
}

impl RedisBucketKey for IpAddr {
    fn write_redis_key(&self, out: &mut String) {
        let _ = write!(out, "ip:{self}");
    }
}

/// Strings of every kind share the tag `s:` (the same text, the same bucket).
macro_rules! text_keys {
    ($($ty:ty),*) => {$(
        impl RedisBucketKey for $ty {
            fn write_redis_key(&self, out: &mut String) {
                out.push_str("s:");
                escaped(out, self);
            }
        }
    )*};
}

/// Integers of every width share the tag `n:` (the same number, the same bucket).
macro_rules! number_keys {
    ($($ty:ty),*) => {$(
        impl RedisBucketKey for $ty {
            fn write_redis_key(&self, out: &mut String) {
                let _ = write!(out, "n:{self}");
            }
        }
    )*};
}

text_keys!(String, Arc<str>, &'static str);
number_keys!(u32, u64);

/// One Redis, or a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where to connect.
#[derive(Clone)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

/// Counts of what a [`RedisLimiter`] did, since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisLimiterStats {
    /// Decisions Redis took.
    pub decided: u64,
    /// Script calls sent to Redis: decisions, refunds, and the re-sends after a `NOSCRIPT`
    /// or a dropped connection. Decisions of concurrent requests share a call, so under
    /// load this is well below `decided`.
    pub calls: u64,
    /// Decisions Redis could not take (errors, timeouts, unreadable answers), including
    /// the errors about one key's data that the breaker does not count.
    pub failures: u64,
    /// Requests decided by the failure policy because the breaker was open (Redis not
    /// asked).
    pub skipped: u64,
    /// Requests refused because Redis could not decide ([`FailurePolicy::Closed`]).
    pub fail_closed: u64,
    /// Requests admitted unlimited ([`FailurePolicy::Open`]).
    pub fail_open: u64,
    /// Requests decided in local memory ([`FailurePolicy::Local`]).
    pub fail_local: u64,
    /// Times the breaker opened (from closed, or again after a failed probe).
    pub breaker_opened: u64,
    /// Failed decisions being settled now: cancelled on Redis, or their charge given
    /// back, in the background (see [`FailurePolicy`]).
    pub settling: u64,
}

#[derive(Default)]
struct Counters {
    decided: AtomicU64,
    failures: AtomicU64,
    skipped: AtomicU64,
    fail_closed: AtomicU64,
    fail_open: AtomicU64,
    fail_local: AtomicU64,
    breaker_opened: AtomicU64,
    settling: AtomicU64,
    /// Open-policy admissions not yet reported in a warning.
    unreported_open: AtomicU64,
    /// When the last open-policy warning went out (ms since the limiter's start).
    last_open_warning: AtomicU64,
}

/// Closed while Redis answers; open (Redis skipped) for a cool-down after `threshold`
/// failures in a row; then one request at a time probes Redis until one succeeds.
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    /// Until when Redis is skipped, in ms since `start` (0: closed).
    open_until: AtomicU64,
    /// When the current probe started, in ms since `start` (0: none).
    probe_since: AtomicU64,
    start: Instant,
}

enum Gate {
    /// Call Redis.
    Call,
    /// Skip it: decide by the policy.
    Skip,
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        // +1 so that 0 can mean "never".
        u64::try_from(self.start.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn gate(&self, timeout: Duration) -> Gate {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Gate::Call;
        }
        let now = self.now_ms();
        if now < until {
            return Gate::Skip;
        }
        // Cool-down over: one probe at a time (a probe whose request was dropped before it
        // finished is given up after twice the timeout).
        let since = self.probe_since.load(Ordering::Acquire);
        let stale = since != 0 && now.saturating_sub(since) > millis(timeout).saturating_mul(2);
        if (since == 0 || stale)
            && self
                .probe_since
                .compare_exchange(since, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            Gate::Call
        } else {
            Gate::Skip
        }
    }

    fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Release);
            self.probe_since.store(0, Ordering::Release);
            tracing::info!(
                keygate_limiter = "redis",
                "Redis answers again: the rate limiter's breaker is closed"
            );
        }
    }

    /// Counts a failure; whether the breaker opened now (from closed, or again after a
    /// failed probe). Calls sent before it opened and failing during its cool-down change
    /// nothing.
    fn failure(&self) -> bool {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures < self.threshold {
            return false;
        }
        let now = self.now_ms();
        let open = self.open_until.load(Ordering::Acquire);
        if open != 0 && now < open {
            return false;
        }
        let until = now.saturating_add(millis(self.cooldown)).max(1);
        self.open_until.store(until, Ordering::Release);
        self.probe_since.store(0, Ordering::Release);
        true
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Inner<K> {
    caller: Arc<Caller>,
    /// The batching task's queue. The task is started by the first decision, in the
    /// runtime that makes it, and started again if that runtime ended.
    queue: RwLock<Option<mpsc::UnboundedSender<Queued>>>,
    cluster: bool,
    prefix: String,
    policy: FailurePolicy,
    timeout: Duration,
    breaker: Breaker,
    local: MemoryLimiter<K>,
    seed: u64,
    sequence: AtomicU64,
    counters: Counters,
}

/// Token buckets on Redis or Redis Cluster, shared by every instance that points at it:
/// a key gets its budget once, whichever instance it calls.
///
/// - **One round trip per decision, at most**: a server-side script checks and charges every window
///   of the key (and the route's cost) atomically, on Redis's own clock, so no instance's
///   clock can skew a budget. It is called by its hash (`EVALSHA`); after a `NOSCRIPT`
///   (the first call on a node, a restart, a failover) the call is sent once more as
///   `EVAL` with the script, which loads it.
/// - **Concurrent decisions share a call**: a task sends every decision queued since its
///   last call (up to 64, with up to 4 calls in flight on one Redis) in one script call,
///   which Redis runs in order, each decision seeing the charges before it, exactly as
///   separate calls would. On a cluster a call carries one bucket's decisions (its keys
///   must share a hash slot). [`stats`](RedisLimiter::stats) counts decisions and calls.
///   The task is started by the first decision, in the runtime that makes it, and again
///   in the current runtime if that one has ended; outside any runtime each decision goes
///   on its own call. Use one limiter per runtime that serves requests: a runtime that
///   made the first decision and then stopped being driven (but was not dropped) would
///   hold the task.
/// - **State only for active keys**: a bucket is one Redis hash (one field per window)
///   that expires when its emptiest window is full again, plus each decision's token, a
///   field of a small marker hash next to the bucket (one per 4096 decisions of an
///   instance) kept for at least the timeout plus a second after its last decision. A
///   decision's keys share a hash slot: it works on Redis Cluster as on one Redis.
/// - **The same numbers as [`MemoryLimiter`]**: the script returns the windows' state and
///   the decision is computed by the same code, so headers and 429 bodies match.
/// - **Failures**: each decision (its retries included) has a timeout; [`FailurePolicy`]
///   says what happens when it
///   fails; a breaker stops calling Redis after repeated failures (so an outage does not
///   add the timeout to every request) and probes it again after a cool-down, recovering
///   without a restart.
/// - **No double charge**: a call is retried once after a dropped connection (and the
///   cluster client re-sends, up to twice, on redirects and connection errors), so each
///   decision carries a random token; the
///   script keeps its verdict under that token for the timeout plus a second (longer once
///   it is being settled, below), and a re-sent call gets the first verdict (with the
///   bucket as it is then) instead of a second charge.
/// - **No charge for a refused request**: a decision that failed but may have run on Redis
///   all the same (it timed out, its connection dropped after it was sent, its answer was
///   unreadable) is settled in the background: cancelled under its token if it has not run,
///   its charge given back if it has. Settling is retried for up to a minute while Redis is
///   stalled or unreachable ([`RedisLimiterStats::settling`] counts those in progress).
///   One window is left: a decision whose call ran but whose connection dropped before
///   the answer came back, with Redis then unreachable for longer than the timeout plus a
///   second, stays charged (its marker is gone when settling can read it): the key loses
///   those tokens, never gains any.
///
/// Clones share the connection. Build one per application and share it between layers.
pub struct RedisLimiter<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for RedisLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K> fmt::Debug for RedisLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.inner.prefix)
            .field("policy", &self.inner.policy)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// Settings for a [`RedisLimiter`], from [`RedisLimiter::builder`] or
/// [`RedisLimiter::cluster_builder`].
#[must_use]
pub struct RedisLimiterBuilder<K> {
    target: Target,
    key: PhantomData<fn() -> K>,
    prefix: String,
    policy: FailurePolicy,
    timeout: Duration,
    threshold: u32,
    cooldown: Duration,
    clock: Option<Arc<dyn Clock>>,
    max_local_buckets: Option<usize>,
}

impl<K> fmt::Debug for RedisLimiterBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URLs may hold a password: not printed.
        f.debug_struct("RedisLimiterBuilder")
            .field("prefix", &self.prefix)
            .field("policy", &self.policy)
            .field("timeout", &self.timeout)
            .field("breaker_threshold", &self.threshold)
            .field("breaker_cooldown", &self.cooldown)
            .finish_non_exhaustive()
    }
}

impl<K: RedisBucketKey> RedisLimiterBuilder<K> {
    fn new(target: Target) -> Self {
        Self {
            target,
            key: PhantomData,
            prefix: "keygate:rl:".to_owned(),
            policy: FailurePolicy::Closed,
            timeout: Duration::from_millis(100),
            threshold: 3,
            cooldown: Duration::from_secs(1),
            clock: None,
            max_local_buckets: None,
        }
    }

    /// What every Redis key of this limiter starts with (default `keygate:rl:`). Give two
    /// limiters that must not share buckets (a per-key one and a per-IP one) different
    /// prefixes.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// What happens when Redis cannot decide (default [`FailurePolicy::Closed`]).
    pub fn policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How long one decision may wait for Redis, reconnecting included (default 100 ms, at
    /// most 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The breaker: after `failures` failed calls in a row, Redis is not called for
    /// `cooldown` (at most an hour); then one request at a time tries it (default 3
    /// failures, 1 s).
    pub fn breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.threshold = failures;
        self.cooldown = cooldown;
        self
    }

    /// Decides on this clock instead of Redis's (`TIME`). For tests only (a
    /// [`FakeClock`](crate::clock::FakeClock)): in production every instance must use
    /// Redis's clock, or instances whose clocks differ give keys different budgets.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The most buckets the local fallback ([`FailurePolicy::Local`]) tracks (default as
    /// [`MemoryLimiter`]'s).
    pub fn max_local_buckets(mut self, max: usize) -> Self {
        self.max_local_buckets = Some(max);
        self
    }

    /// Connects. To a single Redis the connection is made on first use and remade after a
    /// failure, so the limiter can be built while Redis is down (decisions then follow the
    /// policy); to a cluster, the nodes are asked for the slot map now.
    ///
    /// # Errors
    ///
    /// [`RedisLimiterBuildError`]: a URL that does not parse, a cluster that cannot be
    /// reached, a zero timeout, threshold or cool-down, a timeout over 60 s or a cool-down
    /// over an hour, a prefix holding `{` or `}`, or a failing OS random source.
    pub async fn connect(self) -> Result<RedisLimiter<K>, RedisLimiterBuildError> {
        if self.timeout.is_zero() {
            return Err(ConfigError::Zero("redis limiter timeout").into());
        }
        if self.timeout > MAX_TIMEOUT || self.cooldown > MAX_COOLDOWN {
            return Err(RedisLimiterBuildError::TooLong);
        }
        if self.threshold == 0 {
            return Err(ConfigError::Zero("redis limiter breaker threshold").into());
        }
        if self.cooldown.is_zero() {
            return Err(ConfigError::Zero("redis limiter breaker cool-down").into());
        }
        if self.prefix.contains(['{', '}']) {
            return Err(RedisLimiterBuildError::Prefix);
        }
        let conn = match &self.target {
            Target::Single(url) => {
                // Nagle's algorithm off (redis-rs leaves it on): a call written while the one
                // before is unanswered must not wait for that answer's ACK.
                let info = url
                    .as_str()
                    .into_connection_info()
                    .map_err(build_error)?
                    .set_tcp_settings(TcpSettings::default().set_nodelay(true));
                let client = redis::Client::open(info).map_err(build_error)?;
                // The decisions have their own timeout. The connection's is longer, so that a
                // slow Redis keeps it (and the order of what was sent on it), while one that
                // stopped answering altogether is replaced.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(
                        self.timeout.saturating_mul(10).max(Duration::from_secs(2)),
                    ))
                    .set_number_of_retries(1)
                    .set_max_delay(self.cooldown);
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client, config).map_err(build_error)?,
                )
            }
            Target::Cluster(nodes) => {
                let client = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .tcp_settings(TcpSettings::default().set_nodelay(true))
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout.saturating_mul(10).max(Duration::from_secs(2)))
                    .retries(2)
                    .build()
                    .map_err(build_error)?;
                Conn::Cluster(client.get_async_connection().await.map_err(build_error)?)
            }
        };
        let mut local = MemoryLimiter::builder();
        if let Some(max) = self.max_local_buckets {
            local = local.max_buckets(max);
        }
        let local = local.build()?;
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|_| RedisLimiterBuildError::Random)?;
        let cluster = matches!(conn, Conn::Cluster(_));
        let caller = Arc::new(Caller {
            conn,
            hash: redis::Script::new(SCRIPT).get_hash().to_owned(),
            marker_ms: millis(self.timeout).saturating_add(1000),
            clock: self.clock,
            calls: AtomicU64::new(0),
            timeout: self.timeout,
        });
        Ok(RedisLimiter {
            inner: Arc::new(Inner {
                caller,
                queue: RwLock::new(None),
                cluster,
                prefix: self.prefix,
                policy: self.policy,
                timeout: self.timeout,
                breaker: Breaker {
                    threshold: self.threshold,
                    cooldown: self.cooldown,
                    failures: AtomicU32::new(0),
                    open_until: AtomicU64::new(0),
                    probe_since: AtomicU64::new(0),
                    start: Instant::now(),
                },
                local,
                seed: u64::from_le_bytes(seed),
                sequence: AtomicU64::new(0),
                counters: Counters::default(),
            }),
        })
    }
}

/// Why a [`RedisLimiter`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisLimiterBuildError {
    /// A setting out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A key prefix holding `{` or `}` (they would pick the keys' cluster hash slot).
    #[error("the Redis key prefix must not contain '{{' or '}}'")]
    Prefix,
    /// The URL does not parse, or the cluster cannot be reached.
    #[error("Redis: {0}")]
    Redis(#[source] redis::RedisError),
    /// The OS random source failed.
    #[error("the OS random source failed")]
    Random,
    /// A timeout over a minute or a breaker cool-down over an hour.
    #[error("the Redis limiter's timeout must be at most 60 s, its breaker cool-down at most 1 h")]
    TooLong,
}

/// The longest timeout a decision may wait (a request waits for it).
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest breaker cool-down.
const MAX_COOLDOWN: Duration = Duration::from_secs(3600);

fn build_error(error: redis::RedisError) -> RedisLimiterBuildError {
    RedisLimiterBuildError::Redis(error)
}

impl<K: RedisBucketKey> RedisLimiter<K> {
    /// Settings for a limiter on one Redis (`redis://[:password@]host:port[/db]` or
    /// `rediss://…` with the feature `redis-tls`).
    pub fn builder(url: impl Into<String>) -> RedisLimiterBuilder<K> {
        RedisLimiterBuilder::new(Target::Single(url.into()))
    }

    /// Settings for a limiter on a Redis Cluster, given some of its nodes.
    pub fn cluster_builder<I, S>(nodes: I) -> RedisLimiterBuilder<K>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisLimiterBuilder::new(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    /// What this limiter did since it was built.
    pub fn stats(&self) -> RedisLimiterStats {
        let c = &self.inner.counters;
        RedisLimiterStats {
            decided: c.decided.load(Ordering::Relaxed),
            calls: self.inner.caller.calls.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            fail_closed: c.fail_closed.load(Ordering::Relaxed),
            fail_open: c.fail_open.load(Ordering::Relaxed),
            fail_local: c.fail_local.load(Ordering::Relaxed),
            breaker_opened: c.breaker_opened.load(Ordering::Relaxed),
            settling: c.settling.load(Ordering::Relaxed),
        }
    }

    /// The Redis key of `key`'s bucket.
    fn bucket_key(&self, key: &K) -> String {
        let mut out = String::with_capacity(self.inner.prefix.len() + 48);
        out.push_str(&self.inner.prefix);
        out.push('{');
        key.write_redis_key(&mut out);
        out.push('}');
        out
    }

    /// Decides `key`'s request on Redis (or by the failure policy).
    pub async fn decide(
        &self,
        key: &K,
        quotas: &[Quota],
        cost: u32,
    ) -> Result<Decision, RedisLimiterError> {
        match LimiterStore::check(self, key, quotas, cost) {
            Answer::Now(answer) => answer,
            Answer::Later(future) => future.await,
        }
    }

    /// Decides by the failure policy, after Redis could not.
    fn fallback(
        &self,
        key: &K,
        quotas: &[Quota],
        cost: u32,
        error: RedisLimiterError,
    ) -> Result<Decision, RedisLimiterError> {
        let c = &self.inner.counters;
        match self.inner.policy {
            FailurePolicy::Closed => {
                c.fail_closed.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
            FailurePolicy::Local => {
                c.fail_local.fetch_add(1, Ordering::Relaxed);
                Ok(self.inner.local.decide(key, quotas, cost)?)
            }
            FailurePolicy::Open => {
                c.fail_open.fetch_add(1, Ordering::Relaxed);
                c.unreported_open.fetch_add(1, Ordering::Relaxed);
                let now_ms = self.inner.breaker.now_ms();
                let last = c.last_open_warning.load(Ordering::Relaxed);
                if (last == 0 || now_ms.saturating_sub(last) >= 1000)
                    && c.last_open_warning
                        .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    let admitted = c.unreported_open.swap(0, Ordering::Relaxed);
                    tracing::warn!(
                        keygate_limiter = "redis",
                        keygate_limiter_fail_open = admitted,
                        error = %error,
                        "Redis cannot decide: requests are admitted without a rate limit \
                         (failure policy open)"
                    );
                }
                let now = self.now_nanos();
                most_restrictive(quotas.iter().map(|q| (q, step(0, now, q, cost))), now)
                    .ok_or(RedisLimiterError::Windows(0))
            }
        }
    }

    fn now_nanos(&self) -> u64 {
        match &self.inner.caller.clock {
            Some(clock) => clock.now_nanos(),
            None => crate::clock::SystemClock.now_nanos(),
        }
    }

    /// After a decision failed in a way that may have left it running or run (a timeout:
    /// Redis was slow, not gone; a connection that dropped after the call was written; an
    /// answer that could not be read), the request is answered otherwise, and a charge the
    /// script made must not stand. So the decision is cancelled under its token (`HSETNX` in
    /// its marker hash: a script arriving later finds it and charges nothing); if the script
    /// ran first, its verdict is there instead, and a charge it made is given back. Redis may be
    /// stalled or unreachable for a while, so this is retried, with backoff, for up to
    /// [`SETTLE_FOR`]: a call queued on a stalled Redis runs when it wakes, before the
    /// retry sent after it, and its token lives for the timeout plus a second after that.
    /// Skipped when the request was admitted anyway ([`FailurePolicy::Open`]: then the
    /// charge is right).
    fn settle(&self, request: Arc<Request>) {
        if self.inner.policy == FailurePolicy::Open {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        let settling = Settling::start(self);
        runtime.spawn(async move {
            let _settling = settling;
            let mut conn = this.inner.caller.conn.clone();
            let per_try = this
                .inner
                .timeout
                .saturating_mul(10)
                .max(Duration::from_secs(1));
            let give_up = Instant::now() + SETTLE_FOR;
            let mut pause = Duration::from_millis(50);
            // Each step is retried, with backoff, until it is done, fails on the data, or
            // the minute is over.
            macro_rules! retried {
                ($what:literal, $step:expr) => {
                    loop {
                        match tokio::time::timeout(per_try, $step).await {
                            Ok(Ok(done)) => break Some(done),
                            Ok(Err(error)) if is_data_error(&error) => {
                                tracing::debug!(%error, concat!($what, " failed"));
                                break None;
                            }
                            Ok(Err(error)) => {
                                tracing::debug!(%error, concat!($what, " failed; retrying"));
                            }
                            Err(_) => tracing::debug!(concat!($what, " timed out; retrying")),
                        }
                        if Instant::now() + pause >= give_up {
                            tracing::debug!(concat!($what, " given up"));
                            break None;
                        }
                        tokio::time::sleep(pause).await;
                        pause = pause.saturating_mul(2).min(Duration::from_secs(5));
                    }
                };
            }
            let charged = retried!(
                "settling a failed decision",
                this.settle_once(&mut conn, &request)
            );
            if charged == Some(true) {
                // The give-back has a token of its own, kept past the last retry, so that
                // a retry after a lost answer gives back once.
                let mut refund_token = String::with_capacity(18);
                refund_token.push_str(request.token());
                refund_token.push_str(":r");
                let refund = [Call {
                    mode: "r",
                    bucket: request.bucket(),
                    markers: request.markers(),
                    token: &refund_token,
                    quotas: request.quotas(),
                    cost: request.cost,
                }];
                let keep_ms = millis(SETTLE_FOR).saturating_add(60_000);
                let caller = &this.inner.caller;
                let _ = retried!(
                    "giving back a failed decision's tokens",
                    caller.run_keeping(&mut conn, &refund, keep_ms)
                );
            }
        });
    }

    /// Cancels a decision under its token, or reads that it ran: whether it charged.
    /// In one atomic round trip (`MULTI`: `HSETNX`, `PEXPIRE`, `HGET` on its marker hash),
    /// so that no dropped connection can fall between them. The markers, whatever they
    /// hold, are kept for as long as settling may retry and a minute more: a cancelled
    /// decision arriving late still finds its token, and a try whose answer was lost (its
    /// connection dropped, or it timed out on a stalled Redis that then ran it right after
    /// the decision) leaves the decision's answer for the next try to read.
    async fn settle_once(&self, conn: &mut Conn, request: &Request) -> redis::RedisResult<bool> {
        let keep_ms = millis(SETTLE_FOR).saturating_add(60_000);
        let mut settle = redis::pipe();
        settle
            .atomic()
            .cmd("HSETNX")
            .arg(request.markers())
            .arg(request.token())
            .arg(CANCELLED)
            .ignore()
            .cmd("PEXPIRE")
            .arg(request.markers())
            .arg(keep_ms)
            .ignore()
            .cmd("HGET")
            .arg(request.markers())
            .arg(request.token());
        let (answer,): (Option<String>,) = settle.query_async(conn).await?;
        Ok(answer.as_deref() == Some("1"))
    }

    /// Counts a failed call, opening the breaker after enough of them. Only failures of
    /// Redis itself count (no answer, a dropped or refused connection, a cluster without a
    /// leader): an error about one key's data must not take the limiter down for all keys.
    fn failed(&self, error: &RedisLimiterError) {
        let c = &self.inner.counters;
        c.failures.fetch_add(1, Ordering::Relaxed);
        let of_redis = match error {
            RedisLimiterError::Timeout(_) => true,
            RedisLimiterError::Redis(e) => !is_data_error(e),
            _ => false,
        };
        if of_redis && self.inner.breaker.failure() {
            c.breaker_opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                keygate_limiter = "redis",
                error = %error,
                cooldown_ms = millis(self.inner.breaker.cooldown),
                "the rate limiter stops calling Redis for a while (breaker open)"
            );
        }
    }
}

/// What calls the script, shared by the limiter and its batching task.
struct Caller {
    conn: Conn,
    /// The script's SHA-1, for `EVALSHA`.
    hash: String,
    marker_ms: u64,
    clock: Option<Arc<dyn Clock>>,
    /// Script calls sent.
    calls: AtomicU64,
    /// How long a decision waits (a batch's call is given up after it).
    timeout: Duration,
}

/// One decision (or refund) of a script call.
#[derive(Clone, Copy)]
struct Call<'a> {
    mode: &'a str,
    bucket: &'a str,
    /// The hash its token is kept in (the bucket itself when it has no token).
    markers: &'a str,
    /// Empty for a refund that may count twice.
    token: &'a str,
    quotas: &'a [Quota],
    cost: u32,
}

impl Call<'_> {
    fn same_spec(&self, quotas: &[Quota], cost: u32) -> bool {
        self.cost == cost && self.quotas == quotas
    }
}

/// Where the group of `calls` that starts at `start` ends. A run of decisions on one bucket,
/// with one marker hash, mode and spec, goes to the script as one group, which reads the
/// bucket's windows once and charges them in a loop.
fn group_end(calls: &[Call<'_>], start: usize) -> usize {
    let Some(first) = calls.get(start) else {
        return start;
    };
    let mut end = start + 1;
    while let Some(next) = calls.get(end) {
        if next.mode != first.mode
            || next.bucket != first.bucket
            || next.markers != first.markers
            || !next.same_spec(first.quotas, first.cost)
        {
            break;
        }
        end += 1;
    }
    end
}

/// What one decision of `cost` charges a window of `quota`, in nanoseconds: a cost above the
/// capacity can never pass, and one nanosecond more than the burst says so without a number
/// too large for the script's doubles.
fn charge_ns(quota: &Quota, cost: u32) -> u64 {
    let burst = quota.burst_ns();
    let charge = u128::from(quota.interval_ns()) * u128::from(cost);
    u64::try_from(charge)
        .ok()
        .filter(|c| *c <= burst)
        .unwrap_or(burst.saturating_add(1))
}

impl Caller {
    /// The script's call: `EVALSHA` (or, after a `NOSCRIPT`, `EVAL` with the script, which
    /// also loads it); each group's bucket and marker hash ([`group_end`]); the markers'
    /// lifetime, now, the extra lifetime; the distinct specs (windows and cost) of the call,
    /// each once, with each window's field, burst and charge (seconds and nanoseconds); then
    /// each group's mode, spec, size and tokens. Built into one buffer, numbers written in
    /// place: no string per argument. A hot key's batch is one group.
    fn command(&self, load: bool, calls: &[Call<'_>], keep_ms: u64) -> Cmd {
        // The groups ([`group_end`]), found once: (start, end) of each.
        let mut groups: Vec<(usize, usize)> = Vec::with_capacity(4);
        let mut at = 0;
        while at < calls.len() {
            let end = group_end(calls, at);
            groups.push((at, end));
            at = end;
        }
        // The distinct specs, in order of first use (a batch has few).
        let mut specs: Vec<Call<'_>> = Vec::with_capacity(4);
        for call in calls {
            if !specs.iter().any(|s| call.same_spec(s.quotas, s.cost)) {
                specs.push(*call);
            }
        }
        let windows: usize = specs.iter().map(|spec| spec.quotas.len()).sum();
        let names: usize = calls
            .iter()
            .map(|call| call.bucket.len() + call.markers.len() + call.token.len())
            .sum();
        // Sized once: a batch's call has hundreds of arguments.
        let mut cmd = Cmd::with_capacity(
            8 + specs.len() + windows * 5 + calls.len() * 5,
            128 + names + windows * 72 + calls.len() * 24 + if load { SCRIPT.len() } else { 0 },
        );
        if load {
            cmd.arg("EVAL").arg(SCRIPT);
        } else {
            cmd.arg("EVALSHA").arg(&self.hash);
        }
        cmd.arg(groups.len().saturating_mul(2));
        for &(start, _) in &groups {
            if let Some(call) = calls.get(start) {
                cmd.arg(call.bucket).arg(call.markers);
            }
        }
        cmd.arg(keep_ms);
        match &self.clock {
            Some(clock) => {
                let now = clock.now_nanos();
                // Redis's real clock expires buckets; a test's fake clock may run ahead of
                // it or behind: keep buckets an hour longer.
                cmd.arg(now / SEC).arg(now % SEC).arg(3_600_000u64);
            }
            None => {
                cmd.arg("").arg("").arg(0u64);
            }
        }
        cmd.arg(specs.len());
        for spec in &specs {
            cmd.arg(spec.quotas.len());
            for quota in spec.quotas {
                let burst = quota.burst_ns();
                let charge = charge_ns(quota, spec.cost);
                // "w:<capacity>:<interval ns>": at most 33 bytes.
                let mut label = [0u8; 48];
                let mut cursor = std::io::Cursor::new(&mut label[..]);
                let _ = std::io::Write::write_fmt(
                    &mut cursor,
                    format_args!("w:{}:{}", quota.capacity(), quota.interval_ns()),
                );
                let written = usize::try_from(cursor.position()).unwrap_or(0);
                cmd.arg(label.get(..written).unwrap_or_default())
                    .arg(burst / SEC)
                    .arg(burst % SEC)
                    .arg(charge / SEC)
                    .arg(charge % SEC);
            }
        }
        for &(start, end) in &groups {
            let Some(call) = calls.get(start) else {
                continue;
            };
            let spec = specs
                .iter()
                .position(|s| call.same_spec(s.quotas, s.cost))
                .unwrap_or(0);
            cmd.arg(call.mode).arg(spec + 1).arg(end - start);
            for call in calls.get(start..end).unwrap_or_default() {
                cmd.arg(call.token);
            }
        }
        cmd
    }

    /// Runs the script once for `calls` (loading it first if Redis lost it): one answer
    /// per call. Markers are kept for the decisions' marker lifetime.
    async fn run(&self, conn: &mut Conn, calls: &[Call<'_>]) -> redis::RedisResult<Vec<i64>> {
        self.run_keeping(conn, calls, self.marker_ms).await
    }

    /// [`run`](Self::run), with the markers kept for `keep_ms`.
    async fn run_keeping(
        &self,
        conn: &mut Conn,
        calls: &[Call<'_>],
        keep_ms: u64,
    ) -> redis::RedisResult<Vec<i64>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match self.command(false, calls, keep_ms).query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.calls.fetch_add(1, Ordering::Relaxed);
                self.command(true, calls, keep_ms).query_async(conn).await
            }
            other => other,
        }
    }

    /// Runs `calls`, once more after a dropped connection: it may or may not have carried
    /// them, and under the same tokens a decision that ran gives its first verdict again
    /// rather than charging twice.
    async fn run_retried(
        &self,
        conn: &mut Conn,
        calls: &[Call<'_>],
    ) -> redis::RedisResult<Vec<i64>> {
        match self.run(conn, calls).await {
            Err(e) if e.is_connection_dropped() || e.is_io_error() => self.run(conn, calls).await,
            other => other,
        }
    }

    /// One decision on its own.
    async fn decide_alone(&self, conn: &mut Conn, request: &Request) -> Reply {
        let calls = [request.call()];
        match self.run_retried(conn, &calls).await {
            Ok(flat) => verdicts(&flat, &calls)
                .and_then(|mut verdicts| verdicts.pop())
                .map_or(Reply::Garbled, Reply::Answer),
            Err(e) => Reply::Failed(e),
        }
    }
}

/// What fills a [`Request`]'s unused quota slots (never read: only the first `windows` are).
const DEFAULT_QUOTA: Quota = Quota::per_second(crate::quota::nonzero(1));

/// A charge waiting for Redis.
struct Request {
    /// The bucket's name followed by `:m:<slot>`: the hash that keeps the decision's token
    /// (tokens are spread over slots of 4096, so that a hot key's markers do not grow one
    /// hash for as long as it stays hot).
    names: String,
    bucket_len: usize,
    /// The decision's token, 16 hex digits.
    token: [u8; 16],
    /// The first `windows` are the decision's quotas (held in place: no allocation of
    /// their own per decision); the rest repeat the first.
    quotas: [Quota; MAX_WINDOWS],
    windows: usize,
    cost: u32,
    /// Set before the decision may be written to Redis: a decision that gave up before it
    /// was ever sent needs no settling.
    sent: AtomicBool,
}

impl Request {
    /// `quotas` holds 1 to [`MAX_WINDOWS`] quotas (checked by the caller; more are cut).
    fn new(bucket: String, token: u64, quotas: &[Quota], cost: u32) -> Self {
        let mut names = bucket;
        let bucket_len = names.len();
        let mut hex = [0u8; 16];
        for (i, digit) in hex.iter_mut().enumerate() {
            let nibble = (token >> (60 - 4 * i)) & 0xf;
            *digit = b"0123456789abcdef"
                .get(usize::try_from(nibble).unwrap_or(0))
                .copied()
                .unwrap_or(b'0');
        }
        // The slot, `token >> 12` in hex without leading zeros (`{:x}`): the token's first 13
        // digits, written without the formatting machinery.
        let slot = hex.get(..13).unwrap_or_default();
        let start = slot.iter().position(|&d| d != b'0').unwrap_or(12);
        names.push_str(":m:");
        names.extend(
            slot.get(start..)
                .unwrap_or_default()
                .iter()
                .map(|&d| char::from(d)),
        );
        let windows = quotas.len().min(MAX_WINDOWS);
        let mut held = [quotas.first().copied().unwrap_or(DEFAULT_QUOTA); MAX_WINDOWS];
        for (slot, quota) in held.iter_mut().zip(quotas) {
            *slot = *quota;
        }
        Self {
            names,
            bucket_len,
            token: hex,
            quotas: held,
            windows,
            cost,
            sent: AtomicBool::new(false),
        }
    }

    fn bucket(&self) -> &str {
        self.names.get(..self.bucket_len).unwrap_or_default()
    }

    fn quotas(&self) -> &[Quota] {
        self.quotas.get(..self.windows).unwrap_or_default()
    }

    fn markers(&self) -> &str {
        &self.names
    }

    fn token(&self) -> &str {
        std::str::from_utf8(&self.token).unwrap_or_default()
    }

    fn call(&self) -> Call<'_> {
        Call {
            mode: "c",
            bucket: self.bucket(),
            markers: self.markers(),
            token: self.token(),
            quotas: self.quotas(),
            cost: self.cost,
        }
    }
}

/// What Redis said of one decision.
enum Reply {
    Answer(Verdict),
    Failed(redis::RedisError),
    /// An answer of the wrong shape.
    Garbled,
}

/// A decision in the batching task's queue, with where its answer goes.
struct Queued {
    request: Arc<Request>,
    reply: oneshot::Sender<Reply>,
}

/// The most decisions in one script call (Redis runs a call's decisions back to back, so
/// this bounds how long one call holds it: at the 5–20 µs a decision measured, about a
/// millisecond at most).
const MAX_BATCH: usize = 64;

/// The most script calls the batching task keeps in flight at once on one Redis. While
/// they are out, decisions queue, and go together in the next call.
const MAX_IN_FLIGHT: usize = 4;

/// The same on a cluster, where calls go to different nodes: high enough that a stalled
/// node's calls never hold the queue for keys on the healthy ones (each call is one
/// bucket's, so this bounds only memory).
const MAX_IN_FLIGHT_CLUSTER: usize = 1024;

/// The batching task: takes every decision queued since it last looked (up to
/// [`MAX_BATCH`]) and sends them in one script call, with up to [`MAX_IN_FLIGHT`] calls
/// out at once. Concurrent requests thus share a round trip, and Redis and this process
/// pay one call's overhead for all of them. On a cluster, a call's keys must share a hash
/// slot: decisions are grouped by bucket. Ends when the limiter is dropped.
async fn batch_calls(
    caller: Arc<Caller>,
    cluster: bool,
    mut queue: mpsc::UnboundedReceiver<Queued>,
) {
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            biased;
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            next = queue.recv(), if in_flight.len() < if cluster { MAX_IN_FLIGHT_CLUSTER } else { MAX_IN_FLIGHT } => {
                let Some(first) = next else { break };
                let mut batch = Vec::with_capacity(8);
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(queued) => batch.push(queued),
                        Err(_) => break,
                    }
                }
                // A request that gave up (timed out, or dropped by its client) is not sent:
                // its answer would go nowhere. Marked sent first, then checked: a request
                // timing out meanwhile either is seen here or sees the mark, and settles.
                batch.retain(|queued| {
                    queued.request.sent.store(true, Ordering::SeqCst);
                    fence(Ordering::SeqCst);
                    !queued.reply.is_closed()
                });
                if cluster {
                    // A call's keys must share a hash slot: one call per bucket.
                    for group in by_bucket(batch) {
                        in_flight.spawn(send_batch(Arc::clone(&caller), group));
                    }
                } else if !batch.is_empty() {
                    in_flight.spawn(send_batch(Arc::clone(&caller), batch));
                }
            }
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Splits decisions into groups of one bucket each, in no particular order.
fn by_bucket(mut batch: Vec<Queued>) -> Vec<Vec<Queued>> {
    // Stable: a bucket's decisions keep the order they came in.
    batch.sort_by(|a, b| a.request.bucket().cmp(b.request.bucket()));
    let mut groups = Vec::new();
    while let Some(last) = batch.last() {
        let last = Arc::clone(&last.request);
        let at = batch.partition_point(|q| q.request.bucket() < last.bucket());
        groups.push(batch.split_off(at));
    }
    groups
}

/// Sends one batch and hands each decision its answer.
async fn send_batch(caller: Arc<Caller>, mut batch: Vec<Queued>) {
    let mut conn = caller.conn.clone();
    // Each bucket's decisions together, in the order they came (a stable sort): the order
    // between buckets does not matter, and runs on one bucket go as one group.
    if !batch.is_sorted_by(|a, b| a.request.bucket() <= b.request.bucket()) {
        batch.sort_by(|a, b| a.request.bucket().cmp(b.request.bucket()));
    }
    let calls: Vec<Call<'_>> = batch.iter().map(|queued| queued.request.call()).collect();
    // Bounded by the decisions' timeout: by then every decision of the call has given up
    // (and settles), so a hung connection does not hold an in-flight slot any longer.
    let Ok(result) =
        tokio::time::timeout(caller.timeout, caller.run_retried(&mut conn, &calls)).await
    else {
        return;
    };
    match result {
        Ok(flat) => {
            let verdicts = verdicts(&flat, &calls);
            drop(calls);
            match verdicts {
                Some(verdicts) if verdicts.len() == batch.len() => {
                    for (queued, verdict) in batch.into_iter().zip(verdicts) {
                        let _ = queued.reply.send(Reply::Answer(verdict));
                    }
                }
                _ => {
                    for queued in batch {
                        let _ = queued.reply.send(Reply::Garbled);
                    }
                }
            }
        }
        // The script failed on the data of the call (it writes the buckets and markers
        // only at its end, so it wrote nothing, or all of it): each decision still waited
        // for is sent again on its own, so that one key's bad data fails that key alone;
        // under the same tokens none is charged twice.
        Err(e) if batch.len() > 1 && is_data_error(&e) => {
            drop(calls);
            for queued in batch {
                if queued.reply.is_closed() {
                    continue;
                }
                let reply = caller.decide_alone(&mut conn, &queued.request).await;
                let _ = queued.reply.send(reply);
            }
        }
        Err(e) => {
            for queued in batch {
                let _ = queued.reply.send(Reply::Failed(e.clone()));
            }
        }
    }
}

/// Counts a settling in [`RedisLimiterStats::settling`] while it lives.
struct Settling<K>(RedisLimiter<K>);

impl<K> Settling<K> {
    fn start(limiter: &RedisLimiter<K>) -> Self {
        limiter
            .inner
            .counters
            .settling
            .fetch_add(1, Ordering::Relaxed);
        Self(limiter.clone())
    }
}

impl<K> Drop for Settling<K> {
    fn drop(&mut self) {
        self.0
            .inner
            .counters
            .settling
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a decision that failed may have run on Redis all the same (and charged): it
/// timed out, its connection dropped after it was written, or its answer was unreadable.
/// Not when Redis refused the connection or the script failed on the data.
fn may_have_run(error: &RedisLimiterError) -> bool {
    match error {
        RedisLimiterError::Timeout(_) | RedisLimiterError::Reply => true,
        RedisLimiterError::Redis(e) => !is_data_error(e) && !e.is_connection_refusal(),
        _ => false,
    }
}

/// How long the settling of a failed decision is retried while Redis is stalled or
/// unreachable ([`RedisLimiter::settle`]).
const SETTLE_FOR: Duration = Duration::from_secs(60);

/// An error about the data a call met (or the call itself), not about Redis being
/// unavailable: it does not count towards the breaker.
fn is_data_error(error: &redis::RedisError) -> bool {
    matches!(
        error.kind(),
        redis::ErrorKind::Server(
            redis::ServerErrorKind::ResponseError
                | redis::ServerErrorKind::CrossSlot
                | redis::ServerErrorKind::ExecAbort
        ) | redis::ErrorKind::UnexpectedReturnType
            | redis::ErrorKind::Parse
    )
}

impl<K: RedisBucketKey> RedisLimiter<K> {
    /// Sends one decision: through the batching task, or on its own when there is no
    /// runtime to run that task in.
    async fn send(&self, request: &Arc<Request>) -> Reply {
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            request: Arc::clone(request),
            reply,
        };
        if self.enqueue(queued) {
            if let Ok(reply) = answer.await {
                return reply;
            }
            // The task ended with the decision in hand (its runtime shut down): it may have
            // been sent, so it goes again under the same token, charging once.
        }
        request.sent.store(true, Ordering::SeqCst);
        let mut conn = self.inner.caller.conn.clone();
        self.inner.caller.decide_alone(&mut conn, request).await
    }

    /// Hands a decision to the batching task, starting the task in the current runtime when
    /// there is none yet or the one there was ended with its runtime. False when there is
    /// no runtime.
    fn enqueue(&self, queued: Queued) -> bool {
        let queued = match self.inner.queue.read() {
            Ok(queue) => match queue.as_ref() {
                Some(sender) => match sender.send(queued) {
                    Ok(()) => return true,
                    Err(mpsc::error::SendError(queued)) => queued,
                },
                None => queued,
            },
            Err(_) => return false,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let Ok(mut queue) = self.inner.queue.write() else {
            return false;
        };
        // Another request may have started it meanwhile.
        if let Some(sender) = queue.as_ref().filter(|sender| !sender.is_closed()) {
            return sender.send(queued).is_ok();
        }
        let (sender, calls) = mpsc::unbounded_channel();
        runtime.spawn(batch_calls(
            Arc::clone(&self.inner.caller),
            self.inner.cluster,
            calls,
        ));
        let sent = sender.send(queued).is_ok();
        *queue = Some(sender);
        sent
    }
}

/// What the script said of one decision: its status (1 allowed, 0 refused, 3 and 4 a
/// re-sent decision allowed or refused before, 2 a refund, -1 cancelled or unreadable),
/// Redis's now and each window's TAT before it, in nanoseconds.
struct Verdict {
    status: i64,
    now: u64,
    tats: [u64; MAX_WINDOWS],
}

/// Seconds and nanoseconds as nanoseconds, when both are in range.
fn nanos(secs: i64, nanos: i64) -> Option<u64> {
    let secs = u64::try_from(secs).ok()?;
    let nanos = u64::try_from(nanos).ok().filter(|n| *n < SEC)?;
    secs.checked_mul(SEC)?.checked_add(nanos)
}

/// Reads the script's answer to `calls`, a flat list of integers (see `redis.lua`): now,
/// then for each group its windows' offsets before it and each decision's status. Each
/// decision's TATs are the group's, moved on by the charge of every decision allowed
/// before it, as the script moved them. `None` unless the answer has exactly that shape.
fn verdicts(flat: &[i64], calls: &[Call<'_>]) -> Option<Vec<Verdict>> {
    let (head, mut rest) = flat.split_at_checked(2)?;
    // No clock reads past 2262 (2^63 ns): a later `now` is no Redis's, and would saturate
    // the arithmetic of a window's refill.
    let now = nanos(*head.first()?, *head.get(1)?).filter(|now| *now < 1 << 63)?;
    let mut out = Vec::with_capacity(calls.len());
    let mut at = 0;
    while let Some(first) = calls.get(at) {
        let end = group_end(calls, at);
        let windows = first.quotas.len();
        if windows > MAX_WINDOWS {
            return None;
        }
        let (offsets, tail) = rest.split_at_checked(2 * windows)?;
        let (statuses, tail) = tail.split_at_checked(end - at)?;
        rest = tail;
        let mut current = [0u64; MAX_WINDOWS];
        for (offset, pair) in current.iter_mut().zip(offsets.chunks_exact(2)) {
            *offset = nanos(*pair.first()?, *pair.get(1)?)?;
        }
        for status in statuses {
            let mut tats = [0u64; MAX_WINDOWS];
            for (tat, offset) in tats.iter_mut().zip(&current).take(windows) {
                *tat = now.checked_add(*offset)?;
            }
            out.push(Verdict {
                status: *status,
                now,
                tats,
            });
            if *status == 1 {
                for (offset, quota) in current.iter_mut().zip(first.quotas) {
                    *offset = offset.checked_add(charge_ns(quota, first.cost))?;
                }
            }
        }
        at = end;
    }
    rest.is_empty().then_some(out)
}

/// The decision of a charge's verdict: the windows stepped by the same code as the memory
/// store's, and the script's verdict (the one that charged, or not), which stands.
fn parse_answer(verdict: &Verdict, quotas: &[Quota], cost: u32) -> Option<Decision> {
    let allowed = match verdict.status {
        // charged now, or by the first sending of a re-sent decision
        1 | 3 => true,
        0 | 4 => false,
        _ => return None,
    };
    let now = verdict.now;
    // A re-sent decision that charged the first time: its TATs already hold its charge, so
    // it is stepped at no cost, reporting the bucket as it is now (what is left, no wait).
    let cost = if verdict.status == 3 { 0 } else { cost };
    let steps = quotas
        .iter()
        .zip(verdict.tats)
        .map(|(q, tat)| (q, step(tat, now, q, cost)));
    let mut decision = most_restrictive(steps, now)?;
    decision.allowed = allowed;
    Some(decision)
}

type DecisionFuture = Pin<Box<dyn Future<Output = Result<Decision, RedisLimiterError>> + Send>>;

impl<K: RedisBucketKey> LimiterStore<K> for RedisLimiter<K> {
    type Error = RedisLimiterError;
    type Future = DecisionFuture;

    fn check(
        &self,
        key: &K,
        quotas: &[Quota],
        cost: u32,
    ) -> Answer<Result<Decision, RedisLimiterError>, DecisionFuture> {
        if quotas.is_empty() || quotas.len() > MAX_WINDOWS {
            return Answer::Now(Err(RedisLimiterError::Windows(quotas.len())));
        }
        let inner = &self.inner;
        if let Gate::Skip = inner.breaker.gate(inner.timeout) {
            inner.counters.skipped.fetch_add(1, Ordering::Relaxed);
            return Answer::Now(self.fallback(key, quotas, cost, RedisLimiterError::BreakerOpen));
        }
        let token = inner
            .seed
            .wrapping_add(inner.sequence.fetch_add(1, Ordering::Relaxed));
        let request = Arc::new(Request::new(self.bucket_key(key), token, quotas, cost));
        let this = self.clone();
        let key = key.clone();
        Answer::Later(Box::pin(async move {
            let deadline = Instant::now() + this.inner.timeout;
            let outcome = match tokio::time::timeout_at(deadline, this.send(&request)).await {
                Ok(Reply::Answer(verdict)) => {
                    parse_answer(&verdict, request.quotas(), cost).ok_or(RedisLimiterError::Reply)
                }
                Ok(Reply::Failed(e)) => Err(RedisLimiterError::Redis(e)),
                Ok(Reply::Garbled) => Err(RedisLimiterError::Reply),
                Err(_) => Err(RedisLimiterError::Timeout(this.inner.timeout)),
            };
            let quotas = request.quotas();
            match outcome {
                Ok(decision) => {
                    this.inner.breaker.success();
                    this.inner.counters.decided.fetch_add(1, Ordering::Relaxed);
                    Ok(decision)
                }
                Err(error) => {
                    // The decision's reply channel is gone by now (a timeout dropped it);
                    // the batching task marks a decision sent before it looks at that
                    // channel, so one of the two sees the other (see `batch_calls`).
                    fence(Ordering::SeqCst);
                    if may_have_run(&error) && request.sent.load(Ordering::SeqCst) {
                        this.settle(Arc::clone(&request));
                    }
                    this.failed(&error);
                    this.fallback(&key, quotas, cost, error)
                }
            }
        }))
    }

    /// Gives the tokens back on Redis in the background (best effort: skipped while the
    /// breaker is open or outside a tokio runtime). [`RedisLimiter::give_back`] awaits it.
    fn refund(&self, key: &K, quotas: &[Quota], cost: u32) {
        if self.inner.breaker.open_until.load(Ordering::Acquire) != 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        let key = key.clone();
        let quotas = quotas.to_vec();
        runtime.spawn(async move {
            if let Err(error) = this.give_back(&key, &quotas, cost).await {
                tracing::debug!(%error, "a rate-limit refund failed on Redis");
            }
        });
    }
}

impl<K: RedisBucketKey> RedisLimiter<K> {
    /// Gives `cost` tokens back to every window of `key`'s bucket (each window once, never
    /// above full), and waits for Redis to confirm.
    ///
    /// # Errors
    ///
    /// [`RedisLimiterError`] when Redis fails or does not answer within the timeout (then
    /// the tokens may or may not have been given back).
    pub async fn give_back(
        &self,
        key: &K,
        quotas: &[Quota],
        cost: u32,
    ) -> Result<(), RedisLimiterError> {
        if quotas.is_empty() || quotas.len() > MAX_WINDOWS {
            return Err(RedisLimiterError::Windows(quotas.len()));
        }
        let bucket = self.bucket_key(key);
        let mut conn = self.inner.caller.conn.clone();
        let refund = Call {
            mode: "r",
            bucket: &bucket,
            markers: &bucket,
            token: "",
            quotas,
            cost,
        };
        let calls = [refund];
        let call = self.inner.caller.run(&mut conn, &calls);
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(RedisLimiterError::Redis(e)),
            Err(_) => Err(RedisLimiterError::Timeout(self.inner.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn q(n: u32) -> Quota {
        Quota::per_minute(NonZeroU32::new(n).unwrap())
    }

    /// The marker hash's name is the bucket's, then `:m:` and `token >> 12` in hex without
    /// leading zeros (as `{:x}` writes it), and the token is its 16 hex digits.
    #[test]
    fn a_requests_marker_names_its_slot_as_hex_formatting_would() {
        let mut tokens = vec![0, 1, 0xfff, 0x1000, 0x1fff, 0xffff_ffff, u64::MAX, 1 << 63];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            tokens.push(x >> (x % 64));
        }
        for token in tokens {
            let request = Request::new("kb:{k}".into(), token, &[q(5)], 1);
            assert_eq!(
                request.markers(),
                format!("kb:{{k}}:m:{:x}", token >> 12),
                "{token}"
            );
            assert_eq!(request.bucket(), "kb:{k}");
            assert_eq!(request.token(), format!("{token:016x}"));
        }
    }

    #[test]
    fn answers_that_are_not_the_scripts_are_refused() {
        let quotas = [q(60), q(1000)];
        let request = Request::new("b".to_owned(), 1, &quotas, 1);
        let calls = [request.call()];
        let read = |flat: &[i64]| {
            verdicts(flat, &calls)
                .and_then(|mut v| v.pop())
                .and_then(|v| parse_answer(&v, &quotas, 1))
        };
        let good = read(&[1_700_000_000, 5, 0, 0, 1, 500_000_000, 1]).unwrap();
        assert!(good.allowed);
        assert!(
            !read(&[1_700_000_000, 5, 0, 0, 1, 500_000_000, 0])
                .unwrap()
                .allowed
        );
        for bad in [
            &[][..],
            // a refund's status, or a cancelled decision's, for a charge
            &[1_700_000_000, 5, 0, 0, 0, 0, 2],
            &[1_700_000_000, 5, 0, 0, 0, 0, -1],
            // too short, too long
            &[1_700_000_000, 5, 0, 0, 1],
            &[1_700_000_000, 5, 0, 0, 0, 0, 1, 1],
            // out of range
            &[-1, 5, 0, 0, 0, 0, 1],
            &[1_700_000_000, -5, 0, 0, 0, 0, 1],
            &[1_700_000_000, 1_000_000_000, 0, 0, 0, 0, 1],
            &[1_700_000_000, 5, 0, 1_000_000_000, 0, 0, 1],
            &[1_700_000_000, 5, -1, 0, 0, 0, 1],
            &[i64::MAX, 0, 0, 0, 0, 0, 1],
            &[18_446_744_073, 999_999_999, 999_999_999_999, 0, 0, 0, 1],
        ] {
            assert!(read(bad).is_none(), "{bad:?}");
        }
    }

    /// A run of decisions on one bucket and spec goes as one group, and each decision's
    /// windows are the group's, moved on by the charges allowed before it.
    #[test]
    fn a_groups_decisions_each_start_where_the_last_allowed_one_left() {
        let quotas = [q(60)];
        let other = [q(10)];
        let requests = [
            Request::new("a".to_owned(), 1, &quotas, 1),
            Request::new("a".to_owned(), 2, &quotas, 1),
            Request::new("a".to_owned(), 3, &quotas, 1),
            Request::new("a".to_owned(), 4, &quotas, 1),
            Request::new("a".to_owned(), 5, &other, 1),
            Request::new("b".to_owned(), 6, &quotas, 1),
        ];
        let calls: Vec<Call<'_>> = requests.iter().map(Request::call).collect();
        assert_eq!(group_end(&calls, 0), 4);
        assert_eq!(group_end(&calls, 4), 5);
        assert_eq!(group_end(&calls, 5), 6);
        // 60 a minute: one second a token. Group a: 0.5 s used; allowed, replayed (3),
        // allowed, refused; then a's other spec and b.
        let flat = [
            1_700_000_000,
            0, // now
            0,
            500_000_000,
            1,
            3,
            1,
            0, // group a (60/min)
            2,
            0,
            1, // a (10/min)
            0,
            0,
            1, // b
        ];
        let read = verdicts(&flat, &calls).unwrap();
        let now = 1_700_000_000 * SEC;
        let tats: Vec<u64> = read.iter().map(|v| v.tats[0] - now).collect();
        assert_eq!(
            tats,
            [
                500_000_000,
                1_500_000_000,
                1_500_000_000,
                2_500_000_000,
                2 * SEC,
                0
            ]
        );
        let statuses: Vec<i64> = read.iter().map(|v| v.status).collect();
        assert_eq!(statuses, [1, 3, 1, 0, 1, 1]);
        assert!(verdicts(&flat[..flat.len() - 1], &calls).is_none());
    }

    /// A log sink for the tests.
    #[derive(Clone, Default)]
    struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut log) = self.0.lock() {
                log.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn failing_open_admits_and_says_so_in_a_countable_field() {
        let log = Log::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // Nothing listens on port 1: every call fails at once.
        let limiter: RedisLimiter<String> = RedisLimiter::builder("redis://:hunter2@127.0.0.1:1/")
            .policy(FailurePolicy::Open)
            .connect()
            .await
            .unwrap();
        for _ in 0..5 {
            assert!(
                limiter
                    .decide(&"k".to_owned(), &[q(1)], 1)
                    .await
                    .unwrap()
                    .allowed
            );
        }
        let stats = limiter.stats();
        assert_eq!(stats.fail_open, 5);
        assert!(stats.skipped >= 2, "the breaker spared Redis: {stats:?}");
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("keygate_limiter_fail_open=1"),
            "one warning, counting the first admission: {text}"
        );
        assert_eq!(
            text.matches("keygate_limiter_fail_open").count(),
            1,
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }

    fn breaker(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold,
            cooldown,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probe_since: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    #[test]
    fn calls_failing_while_the_breaker_is_open_neither_reopen_nor_extend_it() {
        let b = breaker(2, Duration::from_secs(3600));
        assert!(!b.failure());
        assert!(b.failure(), "the second failure opens it");
        let until = b.open_until.load(Ordering::Acquire);
        assert!(matches!(b.gate(Duration::from_millis(100)), Gate::Skip));
        // Calls sent before it opened fail during the cool-down: no new opening.
        for _ in 0..5 {
            assert!(!b.failure());
        }
        assert_eq!(b.open_until.load(Ordering::Acquire), until);
        // A success closes it.
        b.success();
        assert!(matches!(b.gate(Duration::from_millis(100)), Gate::Call));
    }

    #[test]
    fn a_clusters_batch_goes_out_one_bucket_per_call() {
        let queued = |bucket: &str, token: u64| {
            let request = Arc::new(Request::new(bucket.to_owned(), token, &[q(1)], 1));
            Queued {
                request,
                reply: oneshot::channel().0,
            }
        };
        let batch = vec![
            queued("p{a}", 1),
            queued("p{b}", 2),
            queued("p{a}", 3),
            queued("p{c}", 4),
            queued("p{a}", 5),
        ];
        let mut groups: Vec<Vec<String>> = by_bucket(batch)
            .into_iter()
            .map(|g| {
                g.iter()
                    .map(|q| format!("{}/{}", q.request.markers(), q.request.token()))
                    .collect()
            })
            .collect();
        for g in &mut groups {
            g.sort();
        }
        groups.sort();
        assert_eq!(
            groups,
            [
                vec![
                    "p{a}:m:0/0000000000000001",
                    "p{a}:m:0/0000000000000003",
                    "p{a}:m:0/0000000000000005"
                ],
                vec!["p{b}:m:0/0000000000000002"],
                vec!["p{c}:m:0/0000000000000004"]
            ]
        );
    }

    #[test]
    fn bucket_names_cannot_pick_another_slot_or_collide() {
        let mut a = String::new();
        (KeyId::new("a}b{c"), Some(Arc::<str>::from("x/y"))).write_redis_key(&mut a);
        assert_eq!(a, "k:a%7Db%7Bc/x%2Fy");
        let mut b = String::new();
        (KeyId::new("a/x"), None).write_redis_key(&mut b);
        let mut c = String::new();
        (KeyId::new("a"), Some(Arc::<str>::from("x"))).write_redis_key(&mut c);
        assert_ne!(b, c);
        let mut s = String::new();
        "k:a".write_redis_key(&mut s);
        assert_ne!(s, "k:a");
    }
}
