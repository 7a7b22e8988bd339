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
    owner: String,
    password: String,
    client_id: String,
    client_secret: String,
}

async fn start() -> Quickstart {
    start_on(&common::scratch_sqlite_url()).await
}

async fn start_on(database_url: &str) -> Quickstart {
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
        .env("KEYGATE_DATABASE_URL", database_url)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start quickstart");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut full, mut readonly, mut addr) = (None, None, None);
    let (mut owner, mut password) = (None, None);
    let (mut client_id, mut client_secret) = (None, None);
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(v) = line.strip_prefix("KEY_FULL=") {
                full = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("KEY_READONLY=") {
                readonly = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("OWNER=") {
                owner = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("OWNER_PASSWORD=") {
                password = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("CLIENT_ID=") {
                client_id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("CLIENT_SECRET=") {
                client_secret = Some(v.to_owned());
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
        owner: owner.expect("OWNER line"),
        password: password.expect("OWNER_PASSWORD line"),
        client_id: client_id.expect("CLIENT_ID line"),
        client_secret: client_secret.expect("CLIENT_SECRET line"),
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

/// The README's key-service walkthrough: createkey, testkey, a session, the management
/// API, the audit trail, the dashboard and the OpenAPI document; and a restart that
/// re-issues the demo owner's password and keys on the same database.
#[tokio::test]
async fn the_key_service_walkthrough() {
    let url = common::scratch_sqlite_url();
    let q = start_on(&url).await;
    let a = q.addr;
    assert_eq!(q.owner, "demo");
    assert!(q.password.len() >= 20, "a strong password");
    let credentials = serde_json::json!({"username": q.owner, "password": q.password}).to_string();
    let json = ("content-type", "application/json");

    // createkey: a new key, the earlier ones revoked.
    let r = send(a, Method::POST, "/auth/createkey", &[json], &credentials).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let created = r.json();
    let key = created["apiKey"].as_str().unwrap().to_owned();
    let key_id = created["keyId"].as_str().unwrap().to_owned();
    assert!(key.starts_with("kg_live_"));
    let r = send(a, Method::GET, "/v1/health", &[("x-api-key", &q.full)], "").await;
    assert_eq!(
        r.code(),
        "invalid_api_key",
        "KEY_FULL was revoked by createkey"
    );

    // testkey: the key's details and budget, no token taken.
    for _ in 0..2 {
        let r = send(a, Method::GET, "/auth/testkey", &[("x-api-key", &key)], "").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["valid"], true);
        assert_eq!(v["key_id"], key_id.as_str());
        assert_eq!(v["owner"], "demo");
        assert_eq!(v["scopes"], serde_json::json!(["read", "messages:write"]));
        assert_eq!(v["rate_limit"]["limit"], 60);
        assert_eq!(v["rate_limit"]["remaining"], 60);
    }

    // A session for the management API.
    let r = send(a, Method::POST, "/auth/session", &[json], &credentials).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let token = r.json()["token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");
    let auth = ("authorization", bearer.as_str());
    let r = send(a, Method::GET, "/v1/keys", &[auth], "").await;
    assert_eq!(r.status, 200);
    let statuses: Vec<String> = r.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(statuses.iter().filter(|s| *s == "active").count(), 1);
    let r = send(
        a,
        Method::POST,
        "/v1/keys",
        &[auth, json],
        r#"{"name":"ci","environment":"test","scopes":["read"],"rates":["10/min"]}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let ci = r.json();
    let ci_secret = ci["secret"].as_str().unwrap().to_owned();
    let ci_id = ci["key"]["id"].as_str().unwrap().to_owned();
    let r = send(
        a,
        Method::GET,
        "/v1/users/me",
        &[("x-api-key", &ci_secret)],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        a,
        Method::PATCH,
        &format!("/v1/keys/{ci_id}"),
        &[auth, json],
        r#"{"environment":"live"}"#,
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (422, "immutable_field".into())
    );
    let r = send(
        a,
        Method::POST,
        &format!("/v1/keys/{ci_id}/disable"),
        &[auth],
        "",
    )
    .await;
    assert_eq!(r.json()["status"], "disabled");
    let r = send(
        a,
        Method::GET,
        "/v1/users/me",
        &[("x-api-key", &ci_secret)],
        "",
    )
    .await;
    assert_eq!(r.code(), "api_key_disabled");
    let r = send(
        a,
        Method::GET,
        &format!("/v1/audit?key={ci_id}"),
        &[auth],
        "",
    )
    .await;
    let actions: Vec<String> = r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(actions, ["disabled", "created"]);

    // Other sites' scripts may call the API (CORS), not the sign-in endpoints.
    for path in ["/auth/createkey", "/auth/session"] {
        let r = send(
            a,
            Method::OPTIONS,
            path,
            &[
                ("origin", "https://elsewhere.example"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "content-type"),
            ],
            "",
        )
        .await;
        assert!(
            !r.headers.contains_key("access-control-allow-origin"),
            "{path}: {:?}",
            r.headers
        );
    }

    // The dashboard and the document.
    let r = send(a, Method::GET, "/dashboard", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.headers.contains_key("content-security-policy"));
    let r = send(a, Method::GET, "/swagger/openapi.json", &[], "").await;
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/health",
        "/auth/createkey",
        "/v1/keys/{id}",
        "/v1/audit",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} not documented");
    }

    // A restart on the same database: a new password, new demo keys; the old ones are
    // refused.
    let mut q = q;
    q.child.kill().await.expect("stop the quickstart");
    let again = start_on(&url).await;
    assert_ne!(
        again.password,
        serde_json::from_str::<serde_json::Value>(&credentials).unwrap()["password"]
    );
    let r = send(
        again.addr,
        Method::POST,
        "/auth/session",
        &[json],
        &credentials,
    )
    .await;
    assert_eq!(
        r.code(),
        "invalid_credentials",
        "the old password still works"
    );
    let r = send(
        again.addr,
        Method::GET,
        "/v1/health",
        &[("x-api-key", &key)],
        "",
    )
    .await;
    assert_eq!(
        r.code(),
        "invalid_api_key",
        "the demo owner's earlier keys are revoked"
    );
    let r = send(
        again.addr,
        Method::GET,
        "/v1/health",
        &[("x-api-key", &again.full)],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    // keyctl manages the same database, and sees what the service did.
    let out = common::keyctl::keyctl_raw(&["--database-url", &url, "audit", &ci_id], None);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("disabled"), "{}", out.stdout);
    assert!(
        out.stdout.contains("revoked"),
        "the restart revoked it: {}",
        out.stdout
    );
    let out = common::keyctl::keyctl_raw(
        &[
            "--database-url",
            &url,
            "create",
            "--owner",
            "demo",
            "--name",
            "ops",
        ],
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let ops = out.value("KEY");
    let r = send(
        again.addr,
        Method::GET,
        "/v1/users/me",
        &[("x-api-key", &ops)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "made by keyctl: {}", r.body);
}

/// The README's OAuth2 and self-revoke calls against the quickstart.
#[tokio::test]
async fn the_oauth2_walkthrough() {
    let q = start().await;
    let a = q.addr;
    assert!(q.client_id.starts_with("kgc_") && q.client_secret.starts_with("kgcs_"));
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:{}", q.client_id, q.client_secret)
        )
    );
    let form = ("content-type", "application/x-www-form-urlencoded");
    let r = send(
        a,
        Method::POST,
        "/oauth/token",
        &[("authorization", &basic), form],
        "grant_type=client_credentials&scope=read",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["cache-control"], "no-store");
    let token = r.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["scope"], "read");
    let bearer = format!("Bearer {token}");
    let r = send(
        a,
        Method::GET,
        "/v1/health",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        a,
        Method::POST,
        "/oauth/introspect",
        &[("authorization", &basic), form],
        &format!("token={token}"),
    )
    .await;
    assert_eq!(r.json()["active"], true);
    let r = send(
        a,
        Method::POST,
        "/oauth/revoke",
        &[("authorization", &basic), form],
        &format!("token={token}"),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        a,
        Method::GET,
        "/v1/health",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(r.code(), "invalid_api_key");
    let wrong = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:wrong", q.client_id)
        )
    );
    let r = send(
        a,
        Method::POST,
        "/oauth/token",
        &[("authorization", &wrong), form],
        "grant_type=client_credentials",
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    assert_eq!(r.json()["error"], "invalid_client");
    // Self-revoke: KEY_READONLY is dead after it.
    let body = serde_json::json!({"key": q.readonly}).to_string();
    let r = send(
        a,
        Method::POST,
        "/v1/keys/revoke",
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    assert_eq!(r.json(), serde_json::json!({"revoked": true}));
    let r = send(
        a,
        Method::GET,
        "/v1/health",
        &[("x-api-key", &q.readonly)],
        "",
    )
    .await;
    assert_eq!(r.code(), "invalid_api_key");
}
