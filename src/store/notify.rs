//! Changes between instances on PostgreSQL: every write of a [`SqlStore`](super::SqlStore)
//! sends `NOTIFY keygate_changes` in its own transaction, and [`Listening`] hands what other
//! instances wrote to this instance's caches.
//!
//! A payload is the affected hashes as [`wire`](super::wire) writes them (at most 6 499
//! bytes, well under PostgreSQL's 8 000): a write that touches more keys sends several.

use std::fmt;

/// The channel every store writes to and every listener listens on.
pub(crate) const CHANNEL: &str = "keygate_changes";

/// A running listener on PostgreSQL, from [`SqlStore::listen`](super::SqlStore::listen):
/// what other instances write reaches this store's caches as
/// [`Change::Remote`](crate::lookup::Change::Remote), and a lost connection as
/// [`Change::All`](crate::lookup::Change::All) (before and again after it reconnects).
///
/// Dropping it (or [`stop`](Listening::stop)) stops listening; the caches then see other
/// instances' changes after their TTL only.
#[must_use = "listening stops when the handle is dropped"]
pub struct Listening {
    task: tokio::task::JoinHandle<()>,
    /// Sends the pings the listening task waits for.
    pinger: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// Stops listening (as dropping the handle does).
    pub fn stop(self) {}

    /// Whether the listening task is still running (it runs until stopped: a lost
    /// connection is reconnected, not given up).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
        self.pinger.abort();
    }
}

impl fmt::Debug for Listening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("Listening")
            .field("channel", &CHANNEL)
            .field("running", &self.is_running())
            .finish()
    }
}

#[cfg(feature = "postgres")]
pub(crate) use postgres::listen;

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use sqlx::postgres::PgListener;
    use sqlx::AnyPool;

    use super::{Listening, CHANNEL};
    use crate::lookup::Change;
    use crate::store::wire::parse;
    use crate::store::{BackendError, Listeners, StoreError};

    /// The first wait before reconnecting, doubled after each failure up to [`MAX_DELAY`].
    const FIRST_DELAY: Duration = Duration::from_millis(100);
    const MAX_DELAY: Duration = Duration::from_secs(5);
    /// A connection that lived this long was healthy: the next loss starts the backoff over.
    const HEALTHY: Duration = Duration::from_secs(10);
    /// How long one connection attempt may take.
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// How often a ping goes out (through the store's pool) to this listener's own channel.
    const PING_EVERY: Duration = Duration::from_secs(5);
    /// A listener that heard no ping for this long is taken for dead: a connection that
    /// died silently (a NAT or firewall dropping it without a reset) never errors.
    const SILENT: Duration = Duration::from_secs(15);

    /// Connects, listens, and spawns the task that tells `listeners` and the one that pings
    /// it.
    pub(crate) async fn listen(
        url: Arc<str>,
        listeners: Arc<Listeners>,
        pool: AnyPool,
    ) -> Result<Listening, StoreError> {
        let mut tag = [0u8; 8];
        getrandom::fill(&mut tag)
            .map_err(|_| StoreError::Backend(BackendError::plain("the OS random source failed")))?;
        let ping: Arc<str> = format!("keygate_ping_{:016x}", u64::from_le_bytes(tag)).into();
        let listener = connect(&url, &ping).await.map_err(|e| {
            StoreError::Backend(BackendError::caused("cannot listen for changes", e))
        })?;
        let task = tokio::spawn(run(listener, url, listeners, Arc::clone(&ping)));
        let pinger = tokio::spawn(pings(pool, ping));
        Ok(Listening { task, pinger })
    }

    /// Notifies the listener's own channel every [`PING_EVERY`], through the pool.
    async fn pings(pool: AnyPool, channel: Arc<str>) {
        let mut every = tokio::time::interval(PING_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let ping = sqlx::query("SELECT pg_notify($1, '')::text")
                .bind(channel.to_string())
                .execute(&pool);
            // A failed ping is simply not heard: the listener reconnects.
            let _ = tokio::time::timeout(PING_EVERY, ping).await;
        }
    }

    async fn connect(url: &str, ping: &str) -> Result<PgListener, sqlx::Error> {
        let attempt = async {
            let mut listener = PgListener::connect(url).await?;
            // A lost connection is ours to reconnect: we announce `All` around it.
            listener.eager_reconnect(false);
            listener.listen_all([CHANNEL, ping]).await?;
            Ok(listener)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    }

    async fn run(
        mut listener: PgListener,
        url: Arc<str>,
        listeners: Arc<Listeners>,
        ping: Arc<str>,
    ) {
        let mut delay = FIRST_DELAY;
        let mut since = Instant::now();
        let mut pinged = Instant::now();
        loop {
            // Waiting for a notification is abandoned only with the listener itself: a
            // half-read message can never be read on.
            let overdue = tokio::time::sleep_until((pinged + SILENT).into());
            let next = tokio::select! {
                next = listener.try_recv() => Some(next),
                () = overdue => None,
            };
            match next {
                Some(Ok(Some(notification))) if notification.channel() == &*ping => {
                    pinged = Instant::now();
                }
                Some(Ok(Some(notification))) => tell(&listeners, notification.payload()),
                lost => {
                    match lost {
                        Some(Err(error)) => tracing::warn!(
                            %error,
                            "keygate: lost the connection listening for changes"
                        ),
                        None => tracing::warn!(
                            silent_s = SILENT.as_secs(),
                            "keygate: the connection listening for changes stopped answering"
                        ),
                        _ => tracing::warn!("keygate: lost the connection listening for changes"),
                    }
                    // Changes sent while nobody listens are lost: nothing cached can be
                    // trusted until we listen again.
                    listeners.announce(Change::All);
                    drop(listener);
                    if since.elapsed() >= HEALTHY {
                        delay = FIRST_DELAY;
                    }
                    listener = loop {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(MAX_DELAY);
                        match connect(&url, &ping).await {
                            Ok(listener) => break listener,
                            Err(error) => tracing::warn!(
                                %error,
                                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                                "keygate: cannot listen for changes again yet"
                            ),
                        }
                    };
                    since = Instant::now();
                    pinged = Instant::now();
                    // A change committed after the first `All` and before `LISTEN` took
                    // effect may have been cached since: empty the caches once more.
                    listeners.announce(Change::All);
                    tracing::info!("keygate: listening for changes again");
                }
            }
        }
    }

    fn tell(listeners: &Listeners, payload: &str) {
        match parse(payload) {
            Some(hashes) => {
                for hash in &hashes {
                    listeners.announce(Change::Remote(hash));
                }
            }
            None => tracing::warn!(
                len = payload.len(),
                "keygate: ignored a malformed change notification on {CHANNEL}"
            ),
        }
    }
}
