//! Helpers of the tests against real servers: a Redis server a test owns (to kill and
//! restart it), and a spy on what a store is told from other instances.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keygate::key::{ApiKey, KeyHash};
use keygate::lookup::{Change, ChangeFeed, KeyLookup};
use keygate::record::Status;
use tokio::sync::mpsc;

/// `KEYGATE_TEST_REDIS_URL`, a scratch Redis; fails loudly when unset.
pub fn redis_url() -> String {
    std::env::var("KEYGATE_TEST_REDIS_URL").expect(
        "KEYGATE_TEST_REDIS_URL is not set: point it at a scratch Redis \
         (bash .ci/run starts one), e.g. redis://127.0.0.1:6379/",
    )
}

/// The nodes of `KEYGATE_TEST_REDIS_CLUSTER`, a scratch Redis Cluster; fails loudly when
/// unset.
pub fn cluster_nodes() -> Vec<String> {
    std::env::var("KEYGATE_TEST_REDIS_CLUSTER")
        .expect(
            "KEYGATE_TEST_REDIS_CLUSTER is not set: comma-separated nodes of a scratch Redis \
             Cluster (bash .ci/run starts one), e.g. redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        )
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A key prefix no other run shares: `keygate:<tag>:<12 random hex digits>:`.
pub fn fresh_prefix(tag: &str) -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("random");
    let random: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("keygate:{tag}:{random}:")
}

/// The failure bound of every wait for an announcement: nothing should take more than
/// moments.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A Redis server a test owns, on a free loopback port (nothing kept on disk).
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts one and waits until it answers `PING`.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let mut own = Self { port, child: None };
        own.restart();
        own
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts it (again, on the same port) and waits until it answers (bounded).
    pub fn restart(&mut self) {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // `DEBUG SLEEP`, for tests that stall it.
                "--enable-debug-command",
                "yes",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("url");
        for _ in 0..200 {
            if let Ok(mut c) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a store is told from elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    Remote(String),
    All,
}

/// Everything a store is told from elsewhere (its own writes are left out).
pub fn spy(feed: &impl ChangeFeed) -> mpsc::UnboundedReceiver<Heard> {
    let (tx, rx) = mpsc::unbounded_channel();
    feed.subscribe(Arc::new(move |change: Change<'_>| {
        let heard = match change {
            Change::Remote(hash) => Heard::Remote(hash.to_hex()),
            Change::All => Heard::All,
            _ => return true,
        };
        tx.send(heard).is_ok()
    }));
    rx
}

/// The next announcement, within [`PATIENCE`].
pub async fn next(rx: &mut mpsc::UnboundedReceiver<Heard>, waiting_for: &str) -> Heard {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("nothing heard within {PATIENCE:?}: {waiting_for}"))
        .expect("the spy is subscribed")
}

/// Reads announcements until this hash is heard, and returns what came before it.
pub async fn until(rx: &mut mpsc::UnboundedReceiver<Heard>, hash: &KeyHash) -> Vec<Heard> {
    let want = Heard::Remote(hash.to_hex());
    let mut before = Vec::new();
    loop {
        let heard = next(rx, "a change made on the other instance").await;
        if heard == want {
            return before;
        }
        before.push(heard);
    }
}

/// The status a lookup (a cache, a store) answers for this key.
pub async fn status_through<L: KeyLookup>(cache: &L, key: &ApiKey) -> Option<Status> {
    match cache.lookup(&key.presented()) {
        keygate::answer::Answer::Now(result) => result,
        keygate::answer::Answer::Later(future) => future.await,
    }
    .map_err(Into::<keygate::error::BoxError>::into)
    .expect("lookup")
    .map(|record| record.status)
}

/// Stalls the Redis at `url` for `seconds` (`DEBUG SLEEP`, so it needs
/// `--enable-debug-command`, as [`OwnRedis`] starts it) and returns once it is asleep (a
/// `PING` goes unanswered; bounded): the handle ends when it wakes.
pub async fn stall(url: &str, seconds: u64) -> tokio::task::JoinHandle<()> {
    let client = redis::Client::open(url).expect("url");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut probe = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let sleeper = tokio::spawn(async move {
        let _: redis::RedisResult<()> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(seconds)
            .query_async(&mut admin)
            .await;
    });
    let started = std::time::Instant::now();
    loop {
        let ping = redis::cmd("PING");
        let answer = ping.query_async::<String>(&mut probe);
        if tokio::time::timeout(Duration::from_millis(50), answer)
            .await
            .is_err()
        {
            return sleeper;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "Redis never slept"
        );
    }
}
