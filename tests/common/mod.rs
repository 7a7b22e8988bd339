//! Helpers shared by the integration tests: a small HTTP client over a real socket.
#![allow(dead_code, unreachable_pub)]

pub mod capture;
pub mod keyctl;
pub mod layered;
pub mod redis_hunt;
pub mod servers;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `code` of a JSON error envelope.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// Sends one request to `addr` and reads the whole reply.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let res = client.request(req).await.expect("send");
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// A running example binary and what it printed before `listening on`.
pub struct Example {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub vars: std::collections::HashMap<String, String>,
    /// Everything the example wrote to stderr so far (its log).
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Example {
    /// The log so far.
    pub fn log(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Starts `target/…/examples/NAME` on a free port and reads its `NAME=value` lines up to
/// `listening on …`. Cargo builds examples before it runs integration tests.
pub async fn example(name: &str, env: &[(&str, &str)]) -> Example {
    use tokio::io::AsyncBufReadExt;

    let exe = std::env::current_exe().expect("test path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not built: run `cargo test`",
        bin.display()
    );
    let mut command = tokio::process::Command::new(&bin);
    command
        .env("KEYGATE_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if !env.iter().any(|(k, _)| *k == "KEYGATE_DATABASE_URL") {
        // Not the default `keygate.db` in the working directory: each run its own file.
        command.env("KEYGATE_DATABASE_URL", scratch_sqlite_url());
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start example");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut err_lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let sink = std::sync::Arc::clone(&stderr);
    tokio::spawn(async move {
        while let Ok(Some(line)) = err_lines.next_line().await {
            if let Ok(mut log) = sink.lock() {
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut vars = std::collections::HashMap::new();
    let mut addr = None;
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(rest) = line.strip_prefix("listening on ") {
                let rest = rest.trim_start_matches("http://");
                addr = Some(rest.parse::<SocketAddr>().expect("address"));
                break;
            }
            if let Some((k, v)) = line.split_once('=') {
                vars.insert(k.to_owned(), v.to_owned());
            }
        }
    };
    // A guard against a hung child, not a sleep: it returns as soon as the lines arrive.
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("the example did not start");
    Example {
        child,
        addr: addr.expect("a `listening on` line"),
        vars,
        stderr,
    }
}

/// A fresh SQLite file's URL in the temporary directory, for an example's keys.
pub fn scratch_sqlite_url() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let file = std::env::temp_dir().join(format!(
        "keygate-test-{}-{nanos}-{}.db",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    format!("sqlite://{}", file.display())
}
