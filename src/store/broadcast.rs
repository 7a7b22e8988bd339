//! [`RedisChanges`]: store changes broadcast to every instance over a Redis channel.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_core::Stream;
use redis::aio::{ConnectionManager, PubSubSink, PubSubStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{wire, BackendError, StoreError};
use crate::key::KeyHash;
use crate::lookup::{Change, ChangeFeed};

/// The channel used unless [`RedisChangesBuilder::channel`] names another.
const DEFAULT_CHANNEL: &str = "keygate:changes";

/// Changes waiting to be published, unless [`RedisChangesBuilder::queue_capacity`] says
/// otherwise.
const DEFAULT_QUEUE: usize = 4_096;
/// The most hashes taken from the queue for one round of publishing.
const BATCH: usize = 1_000;
/// The first wait before resubscribing, doubled after each failure up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// A subscription that lived this long was healthy: the next loss starts the backoff over.
const HEALTHY: Duration = Duration::from_secs(10);
/// How long connecting, subscribing, one `PUBLISH` or one `PING` may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How often the subscription is pinged, so that a connection that died silently (no FIN)
/// is noticed.
const PING_EVERY: Duration = Duration::from_secs(15);

/// Store changes shared by every instance through a Redis channel: what this process writes
/// through the store reaches the caches of every other process within moments.
///
/// It listens to a [`ChangeFeed`] (a store) and publishes the hashes of every write made
/// through it in this process ([`Change::Local`]); it subscribes to the channel and hands
/// what other instances publish to the feed as [`Change::Remote`], so that every
/// [`CachedLookup`](crate::lookup::CachedLookup) built with `over_store` on the store (or a
/// clone) drops those keys. What it was told by other instances it never publishes again
/// (no echo between instances), and each message carries a random id of the process that
/// sent it, so that an instance skips its own.
///
/// ```no_run
/// # async fn run() -> Result<(), keygate::store::StoreError> {
/// use keygate::lookup::CachedLookup;
/// use keygate::store::{MemoryStore, RedisChanges};
///
/// let store = MemoryStore::new(); // or a SqlStore shared by every instance
/// let cache = CachedLookup::over_store(store.clone());
/// // Keep it as long as the cache is used: dropping it stops both tasks.
/// let changes = RedisChanges::connect("redis://127.0.0.1/", store).await?;
/// # drop((cache, changes)); Ok(()) }
/// ```
///
/// **Why two mechanisms.** On PostgreSQL,
/// [`SqlStore::listen`](crate::store::SqlStore::listen) is exact: the notification is sent
/// in the write's own transaction, so it goes out if and only if the write commits. This
/// channel works with any store (SQLite shared by several processes, your own), but it is
/// best effort: a change is published after its commit, by a background task. One that
/// cannot be published (Redis down past a retry, the queue full) is not lost silently: as
/// soon as Redis takes a message again, an `All` message tells every instance to empty its
/// caches. A process that dies between a commit and its publish loses that change; the
/// caches' TTL still bounds how long it is served.
///
/// **Never on the request path.** Writes hand their hashes to a bounded queue (4 096 by
/// default) and return; one task publishes them. When the queue is full, new changes are
/// dropped, a warning says how many, and an `All` message follows.
///
/// **Who can publish.** Anyone who can `PUBLISH` on the channel can make every instance
/// drop the keys it names, or empty its caches (an `All`, or a message over Redis's
/// pub/sub output buffer limit, which disconnects every subscriber): a load on the store,
/// never a key accepted that should not be. Keep the channel to keygate's own Redis user
/// (ACL `&keygate:*` channels) where others share the server.
///
/// **A lost subscription.** Messages sent while the subscription is down are lost, so the
/// feed is told [`Change::All`] (the caches empty: for a moment every request reads the
/// store); the subscription is re-established with a backoff (100 ms doubling to 5 s), and
/// the feed is told [`Change::All`] once more when it is back, for what changed in between.
///
/// Dropping it stops both tasks. Nothing it prints (errors, logs, `Debug`) holds the URL,
/// which may hold a password.
#[must_use = "changes are broadcast only while it is kept"]
pub struct RedisChanges {
    channel: Arc<str>,
    instance: Instance,
    /// What the feed's listener publishes through: the listener holds it weakly, so that
    /// dropping this drops the listener at the feed's next change.
    _queue: Arc<mpsc::Sender<KeyHash>>,
    publisher: JoinHandle<()>,
    subscriber: JoinHandle<()>,
}

impl fmt::Debug for RedisChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("RedisChanges")
            .field("channel", &self.channel)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisChanges {
    fn drop(&mut self) {
        self.publisher.abort();
        self.subscriber.abort();
    }
}

/// Settings for [`RedisChanges`], from [`RedisChanges::builder`].
#[must_use]
pub struct RedisChangesBuilder {
    url: String,
    channel: String,
    queue: usize,
}

impl fmt::Debug for RedisChangesBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("RedisChangesBuilder")
            .field("channel", &self.channel)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl RedisChanges {
    /// Connects to Redis at `url` (`redis://…`, or `rediss://…` with the feature `redis-tls`) with the default settings,
    /// and starts broadcasting `feed`'s changes on the channel `keygate:changes`. See
    /// [`RedisChangesBuilder::connect`].
    ///
    /// # Errors
    ///
    /// As [`RedisChangesBuilder::connect`].
    pub async fn connect<S>(url: &str, feed: S) -> Result<Self, StoreError>
    where
        S: ChangeFeed + Clone + Send + Sync + 'static,
    {
        Self::builder(url).connect(feed).await
    }

    /// Settings of your own: the channel, the queue's capacity.
    pub fn builder(url: impl Into<String>) -> RedisChangesBuilder {
        RedisChangesBuilder {
            url: url.into(),
            channel: DEFAULT_CHANNEL.to_owned(),
            queue: DEFAULT_QUEUE,
        }
    }

    /// The channel the changes travel on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Stops broadcasting (as dropping it does).
    pub fn stop(self) {}
}

impl RedisChangesBuilder {
    /// The Redis channel (default `keygate:changes`). Every instance that shares a store
    /// must use the same one; instances of different stores must not.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// How many changes may wait to be published (default 4 096); past it, changes are
    /// dropped with a warning, and every instance is told to empty its caches.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue = capacity;
        self
    }

    /// Connects (one connection to publish, one subscribed to the channel), subscribes, and
    /// starts the tasks that publish `feed`'s changes and announce other instances' to it.
    /// When it returns, messages published by other instances are being received.
    ///
    /// Call it from within a Tokio runtime, once per process and store; keep the result
    /// for as long as the caches are used.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for an empty channel name or a zero queue capacity;
    /// [`StoreError::Backend`] when the URL cannot be parsed or Redis cannot be reached.
    pub async fn connect<S>(self, feed: S) -> Result<RedisChanges, StoreError>
    where
        S: ChangeFeed + Clone + Send + Sync + 'static,
    {
        if self.channel.is_empty() {
            return Err(StoreError::invalid("Redis channel", "it must not be empty"));
        }
        if self.queue == 0 {
            return Err(StoreError::invalid(
                "Redis change queue",
                "its capacity must not be zero",
            ));
        }
        let failed = |context: &'static str| {
            move |e: redis::RedisError| StoreError::Backend(BackendError::caused(context, e))
        };
        let client = redis::Client::open(self.url.as_str()).map_err(failed("invalid Redis URL"))?;
        let channel: Arc<str> = Arc::from(self.channel);
        let instance = Instance::random()?;
        // Subscribing first: one attempt, whose error says what failed (the connection
        // manager retries, and would only time out).
        let subscription = subscribe(&client, &channel)
            .await
            .map_err(failed("cannot subscribe to the Redis channel"))?;
        let publishing = tokio::time::timeout(TIMEOUT, ConnectionManager::new(client.clone()))
            .await
            .map_err(|_| timed_out("cannot reach Redis"))?
            .map_err(failed("cannot reach Redis"))?;

        let (sender, receiver) = mpsc::channel(self.queue);
        let queue = Arc::new(sender);
        let dropped = Arc::new(AtomicU64::new(0));
        let weak = Arc::downgrade(&queue);
        let counter = Arc::clone(&dropped);
        feed.subscribe(Arc::new(move |change: Change<'_>| {
            let Some(queue) = weak.upgrade() else {
                return false;
            };
            // Only this process's own writes: what other instances reported they publish
            // themselves, and `All` is no key.
            if let Change::Local(hash) = change {
                if queue.try_send(*hash).is_err() && counter.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "keygate: the queue of changes to publish to Redis is full; changes \
                         are dropped, and every instance will be told to empty its caches"
                    );
                }
            }
            true
        }));

        let publisher = tokio::spawn(publish(
            publishing,
            Arc::clone(&channel),
            instance,
            receiver,
            dropped,
        ));
        let subscriber = tokio::spawn(listen(
            client,
            Arc::clone(&channel),
            instance,
            feed,
            subscription,
        ));
        Ok(RedisChanges {
            channel,
            instance,
            _queue: queue,
            publisher,
            subscriber,
        })
    }
}

fn timed_out(context: &'static str) -> StoreError {
    StoreError::Backend(BackendError::plain(format!(
        "{context}: no answer within {TIMEOUT:?}"
    )))
}

/// A random id of this process's broadcaster: its own messages come back, and are skipped.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Instance(u64);

impl Instance {
    fn random() -> Result<Self, StoreError> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| StoreError::Random(crate::key::RandomError(e)))?;
        Ok(Self(u64::from_le_bytes(bytes)))
    }

    fn parse(text: &str) -> Option<Self> {
        if text.len() != 16 {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(Self)
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A message: the sender's instance id, a space, and the hashes as in [`wire`], or `*`:
/// the sender lost changes (Redis was down, or its queue overflowed) and every instance
/// must empty its caches.
fn message(instance: Instance, payload: &str) -> String {
    format!("{instance} {payload}")
}

/// What a message names.
#[derive(Debug, PartialEq, Eq)]
enum Named {
    /// These keys changed.
    Keys(Vec<KeyHash>),
    /// Changes were lost: any key may have changed.
    All,
}

/// The payload of a [`Named::All`] message.
const ALL: &str = "*";

/// What a message says: who sent it, and what it names; `None` when malformed (messages
/// are untrusted: anyone who can reach Redis may publish).
fn read(message: &[u8]) -> Option<(Instance, Named)> {
    let text = std::str::from_utf8(message).ok()?;
    let (instance, payload) = text.split_once(' ')?;
    let named = if payload == ALL {
        Named::All
    } else {
        Named::Keys(wire::parse(payload)?)
    };
    Some((Instance::parse(instance)?, named))
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> Result<(PubSubSink, PubSubStream), redis::RedisError> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub.split())
    };
    tokio::time::timeout(TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "subscribing timed out",
            )))
        })
}

/// The publishing task: the queue's hashes, in batches, one `PUBLISH` per [`wire`] payload.
///
/// A `PUBLISH` that fails is tried once more after a pause (the connection manager
/// reconnects meanwhile: Redis closes idle connections, restarts, fails over). Changes that
/// still cannot be published, or that the full queue dropped, are not lost silently: an
/// `All` message goes out as soon as Redis takes one, and every instance empties its caches.
async fn publish(
    mut connection: ConnectionManager,
    channel: Arc<str>,
    instance: Instance,
    mut queue: mpsc::Receiver<KeyHash>,
    dropped: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut owed = false;
    loop {
        let lost = dropped.load(Ordering::Relaxed);
        if owed || lost > 0 {
            if send(&mut connection, &channel, &message(instance, ALL))
                .await
                .is_ok()
            {
                owed = false;
                dropped.fetch_sub(lost, Ordering::Relaxed);
                tracing::warn!(
                    lost,
                    "keygate: changes were lost on the way to Redis; every instance was told \
                     to empty its caches"
                );
            } else {
                owed = true;
            }
        }
        let received = if owed {
            // Try the `All` again soon, even if no change comes.
            match tokio::time::timeout(RETRY, queue.recv_many(&mut batch, BATCH)).await {
                Ok(received) => received,
                Err(_) => continue,
            }
        } else {
            queue.recv_many(&mut batch, BATCH).await
        };
        if received == 0 {
            return;
        }
        for payload in wire::payloads(&batch) {
            let text = message(instance, &payload);
            if send(&mut connection, &channel, &text).await.is_ok() {
                continue;
            }
            tokio::time::sleep(RETRY).await;
            if let Err(error) = send(&mut connection, &channel, &text).await {
                tracing::warn!(
                    %error,
                    "keygate: cannot publish changes to Redis; every instance will be told to \
                     empty its caches once Redis answers"
                );
                owed = true;
            }
        }
        batch.clear();
    }
}

/// How long the publisher waits before trying a failed `PUBLISH` again.
const RETRY: Duration = Duration::from_millis(200);

/// One `PUBLISH`, within [`TIMEOUT`].
async fn send(connection: &mut ConnectionManager, channel: &str, text: &str) -> Result<(), String> {
    let sent = tokio::time::timeout(
        TIMEOUT,
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(text)
            .query_async::<i64>(connection),
    )
    .await;
    match sent {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
    }
}

/// The subscribed task: other instances' changes to the feed, and `All` around every
/// resubscription.
async fn listen<S: ChangeFeed>(
    client: redis::Client,
    channel: Arc<str>,
    instance: Instance,
    feed: S,
    subscription: (PubSubSink, PubSubStream),
) {
    let (mut sink, mut stream) = subscription;
    let mut delay = FIRST_DELAY;
    let mut since = Instant::now();
    loop {
        receive(&mut sink, &mut stream, instance, &feed).await;
        tracing::warn!("keygate: lost the Redis subscription to changes");
        // Messages sent while nobody listens are lost: nothing cached can be trusted until
        // the subscription is back.
        feed.announce(Change::All);
        if since.elapsed() >= HEALTHY {
            delay = FIRST_DELAY;
        }
        (sink, stream) = loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_DELAY);
            match subscribe(&client, &channel).await {
                Ok(subscription) => break subscription,
                Err(error) => tracing::warn!(
                    %error,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "keygate: cannot subscribe to Redis changes again yet"
                ),
            }
        };
        since = Instant::now();
        // A change published after the first `All` and before the subscription was back
        // may have been cached since: empty the caches once more.
        feed.announce(Change::All);
        tracing::info!("keygate: subscribed to Redis changes again");
    }
}

/// Hands messages to the feed until the subscription is lost (the stream ends, or a ping
/// goes unanswered).
async fn receive<S: ChangeFeed>(
    sink: &mut PubSubSink,
    stream: &mut PubSubStream,
    instance: Instance,
    feed: &S,
) {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            message = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx)) => {
                let Some(message) = message else { return };
                match read(message.get_payload_bytes()) {
                    Some((from, _)) if from == instance => {}
                    Some((_, Named::Keys(hashes))) => {
                        for hash in &hashes {
                            feed.announce(Change::Remote(hash));
                        }
                    }
                    Some((_, Named::All)) => feed.announce(Change::All),
                    None => tracing::warn!(
                        len = message.get_payload_bytes().len(),
                        "keygate: ignored a malformed message on the Redis changes channel"
                    ),
                }
            }
            _ = ping.tick() => {
                let answered = tokio::time::timeout(TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(answered, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_and_garbage_does_not() {
        let instance = Instance(0x0123_4567_89ab_cdef);
        let hashes = [KeyHash::of("a"), KeyHash::of("b")];
        let payload = wire::payloads(&hashes).next().unwrap();
        let text = message(instance, &payload);
        assert!(text.starts_with("0123456789abcdef "));
        assert_eq!(
            read(text.as_bytes()),
            Some((instance, Named::Keys(hashes.to_vec())))
        );
        let all = message(instance, ALL);
        assert_eq!(read(all.as_bytes()), Some((instance, Named::All)));
        for (case, bad) in [
            ("empty", &b""[..]),
            ("garbage", b"garbage"),
            ("no hashes", b"0123456789abcdef "),
            ("short id", b"0123 aa"),
            ("not utf-8", b"\xff\xfe 00"),
            ("two stars", b"0123456789abcdef **"),
        ] {
            assert_eq!(read(bad), None, "{case}");
        }
        let wrong_id = format!("zz23456789abcdef {payload}");
        assert_eq!(read(wrong_id.as_bytes()), None);
    }
}
