//! Many instances, one truth: quickstart processes sharing one PostgreSQL and one Redis (or
//! Redis Cluster) admit exactly a key's quota in total, refuse a key disabled by `keyctl`
//! (another process) within a second, and keep their failure policy while their Redis is
//! down and recover when it returns.
//!
//! Needs `KEYGATE_TEST_POSTGRES_URL`, `KEYGATE_TEST_REDIS_URL` and
//! `KEYGATE_TEST_REDIS_CLUSTER`; `bash .ci/run` provides them. Without them the tests fail:
//! they never skip.
#![cfg(feature = "test-servers")]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::keyctl::{keyctl_raw, Out};
use common::servers::OwnRedis;
use common::{example, Example};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

type Http = Client<HttpConnector, Full<Bytes>>;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: bash .ci/run starts the servers and sets it")
    })
}

/// A database of its own on the test PostgreSQL server, dropped at the end.
struct Database {
    admin: String,
    name: String,
    url: String,
}

impl Database {
    async fn create(tag: &str) -> Self {
        let admin = env("KEYGATE_TEST_POSTGRES_URL");
        let name = format!("keygate_instances_{tag}_{}", std::process::id());
        let (base, _) = admin
            .rsplit_once('/')
            .expect("a database URL ends in /NAME");
        let url = format!("{base}/{name}");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin)
            .await
            .expect("connect to KEYGATE_TEST_POSTGRES_URL");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&pool)
            .await
            .expect("drop");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .expect("create database");
        pool.close().await;
        Self { admin, name, url }
    }

    async fn drop_now(self) {
        if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.admin)
            .await
        {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&pool)
            .await;
            pool.close().await;
        }
    }
}

fn keyctl(db: &str, args: &[&str]) -> Out {
    let mut all = vec!["--database-url", db];
    all.extend_from_slice(args);
    let out = keyctl_raw(&all, None);
    assert_eq!(out.code, 0, "keyctl {args:?}: {}", out.stderr);
    out
}

/// A key of a fresh owner, with these rates.
fn new_key(db: &str, owner: &str, rate: &str) -> (String, String) {
    let _ = keyctl_raw(&["--database-url", db, "owner", "add", owner], None);
    let out = keyctl(
        db,
        &["create", "--owner", owner, "--name", "k", "--rate", rate],
    );
    (out.value("KEY"), out.value("ID"))
}

async fn instances(n: usize, db: &str, redis: &str) -> Vec<Example> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            example(
                "quickstart",
                &[
                    ("KEYGATE_DATABASE_URL", db),
                    ("KEYGATE_REDIS_URL", redis),
                    ("KEYGATE_DEMO", "off"),
                ],
            )
            .await,
        );
    }
    out
}

fn client() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client whose connections come from `ip` (any address of 127.0.0.0/8 reaches the
/// instances on 127.0.0.1): a client of its own to the instances' failed-attempt limiter.
fn client_from(ip: Ipv4Addr) -> Http {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(IpAddr::V4(ip)));
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn get(http: &Http, addr: SocketAddr, key: &str) -> StatusCode {
    let req = Request::get(format!("http://{addr}/v1/health"))
        .header("x-api-key", key)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let res = http.request(req).await.expect("send");
    let status = res.status();
    let _ = res.into_body().collect().await;
    status
}

/// Three instances hammered at once on one key with a long window: exactly the quota
/// passes in total.
async fn exact_over(redis: &str, tag: &str) {
    let db = Database::create(tag).await;
    let (key, _) = new_key(&db.url, "alice", "100/hour");
    let servers = instances(3, &db.url, redis).await;
    let http = client();
    let mut tasks = Vec::new();
    for server in &servers {
        for _ in 0..8 {
            let (http, key, addr) = (http.clone(), key.clone(), server.addr);
            tasks.push(tokio::spawn(async move {
                let mut counts = (0u32, 0u32);
                for _ in 0..25 {
                    match get(&http, addr, &key).await {
                        StatusCode::OK => counts.0 += 1,
                        StatusCode::TOO_MANY_REQUESTS => counts.1 += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
                counts
            }));
        }
    }
    let (mut ok, mut limited) = (0, 0);
    for task in tasks {
        let (o, l) = task.await.expect("task");
        ok += o;
        limited += l;
    }
    println!("{tag}: 600 requests over 3 instances: {ok} admitted, {limited} refused");
    assert_eq!(
        ok, 100,
        "exactly the quota across the instances, not one more"
    );
    assert_eq!(limited, 500);
    drop(servers);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_one_redis_admit_exactly_the_quota() {
    exact_over(&env("KEYGATE_TEST_REDIS_URL"), "single").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_a_redis_cluster_admit_exactly_the_quota() {
    exact_over(&env("KEYGATE_TEST_REDIS_CLUSTER"), "cluster").await;
}

/// `keyctl disable` in another process: every instance refuses the key, and the time from
/// the command's return to the last accepted request, over many trials, is printed (and
/// bounded well under the cache's 30 s TTL, which is what it would be without the
/// broadcast).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disable_reaches_every_instance_within_a_second() {
    let db = Database::create("revoke").await;
    let servers = instances(3, &db.url, &env("KEYGATE_TEST_REDIS_URL")).await;
    let http = client();
    let mut delays = Vec::new();
    for trial in 0..50 {
        if trial == 25 {
            // The instances' LISTEN connections drop: they empty their caches, listen again,
            // and the trials after this one must pass as the ones before did.
            terminate_listeners(&db).await;
        }
        let (key, id) = new_key(&db.url, "bob", "100000/min");
        for server in &servers {
            assert_eq!(get(&http, server.addr, &key).await, StatusCode::OK, "warm");
        }
        let last_accept: Arc<Mutex<Option<Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut hammers = Vec::new();
        for server in &servers {
            let (http, key, addr) = (http.clone(), key.clone(), server.addr);
            let (last_accept, stop) = (Arc::clone(&last_accept), Arc::clone(&stop));
            hammers.push(tokio::spawn(async move {
                // Until told to stop and refused once (so every instance has refused).
                let mut refused = false;
                while !(refused && stop.load(Ordering::Acquire)) {
                    match get(&http, addr, &key).await {
                        StatusCode::OK => {
                            *last_accept.lock().expect("lock") = Some(Instant::now());
                        }
                        StatusCode::UNAUTHORIZED => refused = true,
                        other => panic!("unexpected {other}"),
                    }
                }
            }));
        }
        let db_url = db.url.clone();
        let returned = tokio::task::spawn_blocking(move || {
            keyctl(&db_url, &["disable", &id]);
            Instant::now()
        })
        .await
        .expect("keyctl");
        stop.store(true, Ordering::Release);
        let all_refused = async {
            for hammer in hammers {
                hammer.await.expect("hammer");
            }
        };
        tokio::time::timeout(Duration::from_secs(10), all_refused)
            .await
            .unwrap_or_else(|_| panic!("trial {trial}: an instance still accepts the key"));
        let last = last_accept.lock().expect("lock").unwrap_or(returned);
        delays.push(last.saturating_duration_since(returned));
    }
    delays.sort();
    let pct = |p: usize| delays[(delays.len() * p / 100).min(delays.len() - 1)];
    println!(
        "revocation delay over {} trials (keyctl's return to the last accepted request; LISTEN connections killed halfway): \
         p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        delays.len(),
        pct(50),
        pct(90),
        pct(99),
        delays[delays.len() - 1]
    );
    assert!(
        delays[delays.len() - 1] < Duration::from_secs(5),
        "the broadcast did not reach an instance: {delays:?}"
    );
    drop(servers);
    db.drop_now().await;
}

/// Ends every session of `db` that is listening (the instances' LISTEN connections).
async fn terminate_listeners(db: &Database) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.admin)
        .await
        .expect("connect");
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND query ILIKE 'LISTEN%'",
    )
    .bind(&db.name)
    .fetch_all(&pool)
    .await
    .expect("terminate");
    pool.close().await;
    assert_eq!(ended.len(), 3, "each of the three instances listens once");
}

/// Redis killed under a running instance: each policy does what it says, every answer comes
/// within the timeout (no request waits on a dead Redis for long), and the instance finds
/// Redis again when it returns, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_policy_while_redis_is_down_and_recovery() {
    let dir = std::env::temp_dir().join(format!("keygate-instances-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let http = client();
    for policy in ["closed", "open", "local"] {
        let mut redis = OwnRedis::start();
        let db = format!("sqlite://{}", dir.join(format!("{policy}.db")).display());
        let server = example(
            "quickstart",
            &[
                ("KEYGATE_DATABASE_URL", &db),
                ("KEYGATE_REDIS_URL", &redis.url()),
                ("KEYGATE_REDIS_POLICY", policy),
            ],
        )
        .await;
        let key = server.vars.get("KEY_FULL").expect("KEY_FULL").clone();
        assert_eq!(get(&http, server.addr, &key).await, StatusCode::OK);
        redis.kill();
        let mut statuses = Vec::new();
        for _ in 0..70 {
            let started = Instant::now();
            statuses.push(get(&http, server.addr, &key).await);
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(2),
                "{policy}: a request took {took:?}"
            );
        }
        match policy {
            "closed" => assert!(
                statuses
                    .iter()
                    .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
                "{statuses:?}"
            ),
            "open" => assert!(
                statuses.iter().all(|s| *s == StatusCode::OK),
                "{statuses:?}"
            ),
            // This instance's own buckets: the key's 60 a minute, then refusals.
            _ => {
                let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
                assert_eq!(ok, 60, "{statuses:?}");
                assert!(statuses[60..]
                    .iter()
                    .all(|s| *s == StatusCode::TOO_MANY_REQUESTS));
            }
        }
        redis.restart();
        // Back on Redis: a decision there leaves a bucket on it (polling, bounded).
        let conn_client = redis::Client::open(redis.url()).expect("url");
        let mut conn = conn_client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let status = get(&http, server.addr, &key).await;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("keygate:rl:*")
                .query_async(&mut conn)
                .await
                .expect("keys");
            if !keys.is_empty() && status == StatusCode::OK {
                break;
            }
            assert!(Instant::now() < end, "{policy}: not recovered: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(server);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends a form to `path` with HTTP Basic; the status and the body.
async fn post_form(
    http: &Http,
    addr: SocketAddr,
    path: &str,
    basic: &str,
    form: &str,
) -> (StatusCode, String) {
    let req = Request::post(format!("http://{addr}{path}"))
        .header("authorization", basic)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form.to_owned())))
        .expect("request");
    let res = http.request(req).await.expect("send");
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An OAuth2 access token revoked through one instance (RFC 7009) is refused by every
/// instance as fast as a disabled key: it is a key, revoked by the same store write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_oauth2_token_is_refused_by_every_instance() {
    let db = Database::create("oauth").await;
    let servers = instances(3, &db.url, &env("KEYGATE_TEST_REDIS_URL")).await;
    let _ = keyctl_raw(&["--database-url", &db.url, "owner", "add", "carol"], None);
    let mut delays = Vec::new();
    for trial in 0..10u8 {
        // Each trial from an address of its own: every hammer's first refusal of a revoked
        // token is a failed attempt of its client IP, and the instances turn an address
        // away after 20 a minute (the quickstart's lockout), which ten trials from one
        // address can reach on a slow machine.
        let http = client_from(Ipv4Addr::new(127, 0, 0, 10 + trial));
        // A client per trial: its tokens' budget (60 a minute) is the trial's own.
        let out = keyctl(
            &db.url,
            &[
                "client", "create", "--owner", "carol", "--name", "c", "--scopes", "read",
            ],
        );
        let basic = format!(
            "Basic {}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{}:{}", out.value("CLIENT_ID"), out.value("CLIENT_SECRET"))
            )
        );
        let (status, body) = post_form(
            &http,
            servers[usize::from(trial) % 3].addr,
            "/oauth/token",
            &basic,
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let token: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let token = token["access_token"].as_str().expect("a token").to_owned();
        let bearer = |addr: SocketAddr| {
            Request::get(format!("http://{addr}/v1/health"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .expect("request")
        };
        for server in &servers {
            let res = http.request(bearer(server.addr)).await.expect("send");
            assert_eq!(res.status(), StatusCode::OK, "warm");
        }
        let last_accept: Arc<Mutex<Option<Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut hammers = Vec::new();
        for server in &servers {
            let (http, addr) = (http.clone(), server.addr);
            let request = bearer(addr);
            let (parts, _) = request.into_parts();
            let (last_accept, stop) = (Arc::clone(&last_accept), Arc::clone(&stop));
            hammers.push(tokio::spawn(async move {
                let mut refused = false;
                while !(refused && stop.load(Ordering::Acquire)) {
                    let mut req = Request::get(parts.uri.clone())
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    *req.headers_mut() = parts.headers.clone();
                    let res = http.request(req).await.expect("send");
                    match res.status() {
                        // Accepted: served, or over the client's budget (60 a minute, the
                        // quickstart's default) after the token passed.
                        StatusCode::OK | StatusCode::TOO_MANY_REQUESTS => {
                            *last_accept.lock().expect("lock") = Some(Instant::now());
                        }
                        StatusCode::UNAUTHORIZED => refused = true,
                        other => panic!("unexpected {other}"),
                    }
                    let _ = res.into_body().collect().await;
                }
            }));
        }
        let (status, _) = post_form(
            &http,
            servers[usize::from(trial + 1) % 3].addr,
            "/oauth/revoke",
            &basic,
            &format!("token={token}"),
        )
        .await;
        let returned = Instant::now();
        assert_eq!(status, StatusCode::OK);
        stop.store(true, Ordering::Release);
        let all_refused = async {
            for hammer in hammers {
                hammer.await.expect("hammer");
            }
        };
        tokio::time::timeout(Duration::from_secs(10), all_refused)
            .await
            .unwrap_or_else(|_| panic!("trial {trial}: an instance still accepts the token"));
        let last = last_accept.lock().expect("lock").unwrap_or(returned);
        delays.push(last.saturating_duration_since(returned));
    }
    delays.sort();
    println!(
        "OAuth2 token revocation over {} trials (the revoke's answer to the last accepted request): \
         median {:?}, max {:?}",
        delays.len(),
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    assert!(
        delays[delays.len() - 1] < Duration::from_secs(5),
        "the revocation did not reach an instance: {delays:?}"
    );
    drop(servers);
    db.drop_now().await;
}
