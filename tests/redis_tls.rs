//! `rediss://`: the quickstart's buckets and change broadcast on a Redis that speaks only
//! TLS (feature `redis-tls`), trusting the server through `SSL_CERT_FILE`; and refusing a
//! server whose certificate it cannot trust, with a clear error at start.
//!
//! Needs `redis-server` (built with TLS, as Debian's is) and `openssl` on the PATH.
#![cfg(feature = "test-servers")]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{example, send};
use http::{Method, StatusCode};

struct TlsRedis {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority, a server certificate for 127.0.0.1 signed by it, and a Redis
/// listening only with TLS.
fn tls_redis(name: &str) -> TlsRedis {
    let dir = std::env::temp_dir().join(format!("keygate-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=keygate test CA",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let redis = TlsRedis { port, child, dir };
    // Up when it accepts connections (bounded).
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return redis;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the TLS redis-server did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_on_a_tls_redis() {
    let redis = tls_redis("trusted");
    let url = format!("rediss://127.0.0.1:{}/", redis.port);
    let ca = redis.dir.join("ca.pem");
    let db = format!("sqlite://{}", redis.dir.join("keys.db").display());
    let ca_text = ca.display().to_string();
    let server = example(
        "quickstart",
        &[
            ("KEYGATE_DATABASE_URL", &db),
            ("KEYGATE_REDIS_URL", &url),
            ("SSL_CERT_FILE", &ca_text),
        ],
    )
    .await;
    let key = server.vars.get("KEY_FULL").expect("KEY_FULL").clone();
    for remaining in ["59", "58"] {
        let reply = send(
            server.addr,
            Method::GET,
            "/v1/health",
            &[("x-api-key", &key)],
            "",
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(
            reply.headers["x-ratelimit-remaining"], remaining,
            "decided on the TLS Redis"
        );
    }
    // The bucket is on that Redis.
    let out = Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &ca_text,
            "-p",
            &redis.port.to_string(),
            "--scan",
            "--pattern",
            "keygate:rl:*",
        ])
        .output()
        .expect("redis-cli");
    assert!(
        !String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_tls_redis_is_refused_at_start() {
    let redis = tls_redis("untrusted");
    let url = format!("rediss://:hunter2-tls@127.0.0.1:{}/", redis.port);
    let db = format!("sqlite://{}", redis.dir.join("keys2.db").display());
    let exe = std::env::current_exe().expect("test path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("examples")
        .join(format!("quickstart{}", std::env::consts::EXE_SUFFIX));
    let empty = redis.dir.join("no-roots.pem");
    std::fs::write(&empty, "").expect("empty roots");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin)
            .env("KEYGATE_ADDR", "127.0.0.1:0")
            .env("KEYGATE_DATABASE_URL", &db)
            .env("KEYGATE_REDIS_URL", &url)
            .env("SSL_CERT_FILE", &empty)
            .output(),
    )
    .await
    .expect("the quickstart gives up in time")
    .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("KEYGATE_REDIS_URL"), "{stderr}");
    assert!(
        !stderr.contains("hunter2") && !stdout.contains("hunter2"),
        "{stderr}"
    );
    assert!(!stdout.contains("listening"), "{stdout}");
}
