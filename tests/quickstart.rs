//! The quickstart as the README promises it (its curl walkthrough and routes table), checked
//! against the real example binary (cargo
//! builds examples before it runs tests): addresses, printed keys, every route and
//! rejection a newcomer will try with curl.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::send;
use http::Method;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

struct Quickstart {
    child: Child,
    addr: SocketAddr,
    full: String,
    readonly: String,
}

async fn start() -> Quickstart {
    let exe = std::env::current_exe().expect("test path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = dir
        .join("examples")
        .join(format!("quickstart{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not built: run `cargo test`, which builds examples",
        bin.display()
    );
    let mut child = Command::new(&bin)
        .env("KEYGATE_ADDR", "127.0.0.1:0")
        .env("KEYGATE_DATABASE_URL", common::scratch_sqlite_url())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start quickstart");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut full, mut readonly, mut addr) = (None, None, None);
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(v) = line.strip_prefix("KEY_FULL=") {
                full = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("KEY_READONLY=") {
                readonly = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("listening on http://") {
                addr = Some(v.parse::<SocketAddr>().expect("address"));
                break;
            }
        }
    };
    // A guard against a hung child, not a sleep: it returns as soon as the lines arrive.
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("quickstart did not start");
    Quickstart {
        child,
        addr: addr.expect("listening line"),
        full: full.expect("KEY_FULL line"),
        readonly: readonly.expect("KEY_READONLY line"),
    }
}

#[tokio::test]
async fn the_quickstart_contract() {
    let q = start().await;
    assert!(q.full.starts_with("kg_live_"), "{}", q.full);
    assert!(q.readonly.starts_with("kg_test_"), "{}", q.readonly);
    let a = q.addr;
    let bearer_full = format!("Bearer {}", q.full);
    let bearer_ro = format!("Bearer {}", q.readonly);
    let basic_full = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:", q.full)
        )
    );

    let r = send(a, Method::GET, "/v1/health", &[("x-api-key", &q.full)], "").await;
    assert_eq!(
        (r.status.as_u16(), r.json()),
        (200, serde_json::json!({"status": "ok"}))
    );
    for auth in [&bearer_full, &basic_full] {
        let r = send(a, Method::GET, "/v1/health", &[("authorization", auth)], "").await;
        assert_eq!(r.status, 200, "{auth}");
    }

    let r = send(
        a,
        Method::GET,
        "/v1/users/me",
        &[("authorization", &bearer_ro)],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let me = r.json();
    assert_eq!(me["environment"], "test");
    assert_eq!(me["scopes"], serde_json::json!(["read"]));
    assert!(me["key_id"].is_string() && me["owner"]["id"].is_string());

    let r = send(
        a,
        Method::POST,
        "/v1/messages",
        &[("x-api-key", &q.full), ("content-type", "application/json")],
        r#"{"text":"hi"}"#,
    )
    .await;
    assert_eq!(r.status, 202);
    let r = send(
        a,
        Method::POST,
        "/v1/messages",
        &[("x-api-key", &q.readonly)],
        "",
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "insufficient_scope".into())
    );

    for path in ["/swagger", "/swagger/openapi.json"] {
        assert_eq!(
            send(a, Method::GET, path, &[], "").await.status,
            200,
            "{path}"
        );
    }
    let r = send(
        a,
        Method::OPTIONS,
        "/v1/messages",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert!(r.status.is_success(), "{}", r.status);
    assert!(r.headers.contains_key("access-control-allow-origin"));
    assert!(r.headers.contains_key("access-control-allow-methods"));

    let r = send(a, Method::GET, "/v1/health", &[], "").await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (401, "missing_api_key".into())
    );
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"api\"");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.json()["data"], serde_json::Value::Null);
    let r = send(
        a,
        Method::GET,
        "/v1/health",
        &[("x-api-key", "kg_live_nope")],
        "",
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (401, "invalid_api_key".into())
    );
    let r = send(
        a,
        Method::GET,
        "/v1/health",
        &[("x-api-key", &q.full), ("authorization", &bearer_ro)],
        "",
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (400, "ambiguous_credentials".into())
    );
    let r = send(a, Method::GET, "/swaggerx", &[], "").await;
    assert_eq!(r.status, 401);

    // 60 requests a minute per key, with the headers of the Mindbaz docs. KEY_READONLY has
    // made 3 requests so far (me, messages, the ambiguous one did not count).
    let r = send(
        a,
        Method::GET,
        "/v1/health",
        &[("x-api-key", &q.readonly)],
        "",
    )
    .await;
    assert_eq!(r.headers["x-ratelimit-limit"], "60");
    let remaining: u64 = r.headers["x-ratelimit-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let reset: u64 = r.headers["x-ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining < 60 && reset > 1_700_000_000,
        "{remaining} {reset}"
    );
    let mut last = r;
    for _ in 0..=remaining {
        last = send(
            a,
            Method::GET,
            "/v1/health",
            &[("x-api-key", &q.readonly)],
            "",
        )
        .await;
        if last.status == 429 {
            break;
        }
    }
    assert_eq!(
        (last.status.as_u16(), last.code()),
        (429, "rate_limited".into())
    );
    assert!(last.headers.contains_key("retry-after"));
    assert_eq!(last.json()["data"]["limit"], 60);
    // The other key has its own bucket.
    let r = send(a, Method::GET, "/v1/health", &[("x-api-key", &q.full)], "").await;
    assert_eq!(r.status, 200);
    drop(q.child);
}
