//! The key service over HTTP, as its users and their attackers meet it: tenants, credentials,
//! bad input, secrets shown once, sessions, testkey. In process, on the memory store and on
//! SQLite; each request carries the peer address a server would give it.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::Router;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use keygate::clock::FakeClock;
use keygate::key::Environment;
use keygate::lookup::CachedLookup;
use keygate::ratelimit::Quota;
use keygate::record::Status;
use keygate::service::KeyService;
use keygate::store::{KeyStore, MemoryStore, NewKey, OwnerStore, SqlStore};
use keygate::validate::PeerAddr;
use keygate::Keygate;
use serde_json::{json, Value};
use tower::ServiceExt;

const ADA: &str = "ada";
const BOB: &str = "bob";
const ADA_PASSWORD: &str = "correct horse battery staple";
const BOB_PASSWORD: &str = "tr0ub4dor&3";

/// A reply, read whole.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }
}

struct Service<S> {
    router: Router,
    store: S,
    clock: FakeClock,
}

fn quota(n: u32, per: &str) -> Quota {
    Quota::parse(&format!("{n}/{per}")).unwrap()
}

async fn service<S: keygate::store::ClientStore + Send + Sync + 'static>(store: S) -> Service<S> {
    store.add_owner(ADA, Some(ADA_PASSWORD)).await.unwrap();
    store.add_owner(BOB, Some(BOB_PASSWORD)).await.unwrap();
    let clock = FakeClock::new(SystemTime::now());
    let keygate = Keygate::builder(CachedLookup::over_store(store.clone()))
        .default_quota(quota(60, "min"))
        .build()
        .unwrap();
    let mut template = NewKey::new("", "from createkey", Environment::Live);
    template.scopes = ["read"].into_iter().collect();
    let router = KeyService::builder(store.clone())
        .createkey(template)
        .testkey(keygate.route().cost(0).build().unwrap())
        .login_limits(quota(5, "hour"), quota(8, "hour"))
        .clock(clock.clone())
        .build()
        .unwrap();
    let api = Router::new()
        .route("/v1/health", axum::routing::get(|| async { "ok" }))
        .layer(keygate);
    Service {
        router: api.merge(router),
        store,
        clock,
    }
}

async fn memory() -> Service<MemoryStore> {
    service(MemoryStore::new()).await
}

impl<S> Service<S> {
    async fn call_from(
        &self,
        ip: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut req = builder.body(body.into()).unwrap();
        let ip: IpAddr = ip.parse().unwrap();
        req.extensions_mut()
            .insert(PeerAddr(SocketAddr::new(ip, 40_000)));
        let res = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {token}");
        match body {
            Some(body) => {
                self.call_from(
                    "198.51.100.1",
                    method,
                    path,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    body.to_string(),
                )
                .await
            }
            None => {
                self.call_from(
                    "198.51.100.1",
                    method,
                    path,
                    &[("authorization", &auth)],
                    "",
                )
                .await
            }
        }
    }

    async fn sign_in(&self, user: &str, password: &str) -> String {
        let reply = self
            .call_from(
                "198.51.100.1",
                Method::POST,
                "/auth/session",
                &[("content-type", "application/json")],
                json!({"username": user, "password": password}).to_string(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.headers["cache-control"], "no-store");
        assert_eq!(reply.json()["expires_in"], 900);
        reply.json()["token"].as_str().unwrap().to_owned()
    }

    /// Creates a key through the API; its id and secret.
    async fn create(&self, token: &str, name: &str) -> (String, String) {
        let reply = self
            .call(Method::POST, "/v1/keys", token, Some(json!({"name": name})))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        let v = reply.json();
        (
            v["key"]["id"].as_str().unwrap().to_owned(),
            v["secret"].as_str().unwrap().to_owned(),
        )
    }

    async fn health(&self, key: &str) -> Reply {
        self.call_from(
            "198.51.100.9",
            Method::GET,
            "/v1/health",
            &[("x-api-key", key)],
            "",
        )
        .await
    }
}

#[tokio::test]
async fn an_owner_never_reaches_another_owners_keys() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let bob = svc.sign_in(BOB, BOB_PASSWORD).await;
    let (id, secret) = svc.create(&ada, "ada's key").await;
    let before = svc
        .call(Method::GET, &format!("/v1/keys/{id}"), &ada, None)
        .await;
    assert_eq!(before.status, StatusCode::OK);
    let unknown = "key_000000000000000000000000";
    let attempts: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/keys/{}".into(), None),
        (
            Method::PATCH,
            "/v1/keys/{}".into(),
            Some(json!({"name": "mine now"})),
        ),
        (Method::DELETE, "/v1/keys/{}".into(), None),
        (Method::POST, "/v1/keys/{}/disable".into(), None),
        (Method::POST, "/v1/keys/{}/enable".into(), None),
        (Method::POST, "/v1/keys/{}/rotate".into(), Some(json!({}))),
        (Method::GET, "/v1/audit?key={}".into(), None),
    ];
    for (method, path, body) in attempts {
        let theirs = svc
            .call(method.clone(), &path.replace("{}", &id), &bob, body.clone())
            .await;
        let nobody = svc
            .call(method.clone(), &path.replace("{}", unknown), &bob, body)
            .await;
        assert_eq!(
            theirs.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            theirs.body
        );
        // Indistinguishable from an id that does not exist.
        assert_eq!(theirs.body, nobody.body, "{method} {path}");
        assert_eq!(theirs.status, nobody.status, "{method} {path}");
    }
    // Nothing changed, and the key still works.
    let after = svc
        .call(Method::GET, &format!("/v1/keys/{id}"), &ada, None)
        .await;
    assert_eq!(before.body, after.body);
    assert_eq!(svc.health(&secret).await.status, StatusCode::OK);
    // Bob's list and audit trail show nothing of Ada's.
    let list = svc.call(Method::GET, "/v1/keys", &bob, None).await;
    assert_eq!(list.json()["keys"], json!([]));
    let audit = svc.call(Method::GET, "/v1/audit", &bob, None).await;
    assert!(!audit.body.contains(&id), "{}", audit.body);
    // Ada's audit shows only Ada's doings: her key's creation, no failed attempt by Bob
    // changed anything.
    let audit = svc
        .call(Method::GET, &format!("/v1/audit?key={id}"), &ada, None)
        .await;
    let events = audit.json()["events"].as_array().unwrap().clone();
    assert_eq!(events.len(), 1, "{}", audit.body);
    assert_eq!(events[0]["action"], "created");
    assert_eq!(events[0]["actor"], ADA);
    assert_eq!(events[0]["ip"], "198.51.100.1");
}

#[tokio::test]
async fn management_needs_a_valid_session() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    for token in [
        "",
        "kgs_",
        "nonsense",
        &format!("{ada}x"),
        &ada[..ada.len() - 2],
    ] {
        let reply = svc.call(Method::GET, "/v1/keys", token, None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{token:.12}");
        assert_eq!(reply.code(), "unauthorized");
        assert!(reply.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
    }
    // An API key is not a session.
    let (_, secret) = svc.create(&ada, "k").await;
    let reply = svc.call(Method::GET, "/v1/keys", &secret, None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // A session ends after 15 minutes.
    svc.clock.advance(Duration::from_secs(899));
    assert_eq!(
        svc.call(Method::GET, "/v1/keys", &ada, None).await.status,
        StatusCode::OK
    );
    svc.clock.advance(Duration::from_secs(1));
    assert_eq!(
        svc.call(Method::GET, "/v1/keys", &ada, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    // And at once when its owner is disabled.
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    svc.store.set_owner_active(ADA, false).await.unwrap();
    assert_eq!(
        svc.call(Method::GET, "/v1/keys", &ada, None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

async fn sign_in_from(
    svc: &Service<impl Sized>,
    ip: &str,
    path: &str,
    user: &str,
    password: &str,
) -> Reply {
    svc.call_from(
        ip,
        Method::POST,
        path,
        &[("content-type", "application/json")],
        json!({"username": user, "password": password}).to_string(),
    )
    .await
}

#[tokio::test]
async fn wrong_user_and_wrong_password_read_the_same() {
    let svc = memory().await;
    for path in ["/auth/session", "/auth/createkey"] {
        let wrong_password = sign_in_from(&svc, "203.0.113.1", path, ADA, "nope").await;
        let no_such_user = sign_in_from(&svc, "203.0.113.2", path, "nobody", "nope").await;
        assert_eq!(wrong_password.status, StatusCode::UNAUTHORIZED);
        assert_eq!(wrong_password.code(), "invalid_credentials");
        assert_eq!(wrong_password.status, no_such_user.status);
        assert_eq!(wrong_password.body, no_such_user.body);
        assert!(!wrong_password.body.contains("nope"));
        // A disabled owner's right password reads the same too.
        svc.store.set_owner_active(BOB, false).await.unwrap();
        let disabled = sign_in_from(&svc, "203.0.113.3", path, BOB, BOB_PASSWORD).await;
        assert_eq!(disabled.body, no_such_user.body);
        svc.store.set_owner_active(BOB, true).await.unwrap();
    }
}

#[tokio::test]
async fn failed_sign_ins_are_limited_per_username_and_per_address() {
    let svc = memory().await;
    // Five failures for ada, each from another address: the sixth try is refused even
    // with the right password, before the password is checked.
    for i in 0..5 {
        let reply = sign_in_from(
            &svc,
            &format!("203.0.113.{i}"),
            "/auth/session",
            ADA,
            "guess",
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let reply = sign_in_from(&svc, "203.0.113.200", "/auth/createkey", ADA, ADA_PASSWORD).await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.body
    );
    assert_eq!(reply.code(), "too_many_failed_attempts");
    assert!(reply.headers.contains_key("retry-after"));
    // Bob is not locked out by Ada's attacker.
    let reply = sign_in_from(&svc, "203.0.113.200", "/auth/session", BOB, BOB_PASSWORD).await;
    assert_eq!(reply.status, StatusCode::OK);
    // Eight failures from one address, each for another username: the address is refused.
    for i in 0..8 {
        let reply = sign_in_from(&svc, "192.0.2.7", "/auth/session", &format!("u{i}"), "x").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let reply = sign_in_from(&svc, "192.0.2.7", "/auth/session", BOB, BOB_PASSWORD).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    // Successful sign-ins cost nothing.
    for _ in 0..20 {
        let reply = sign_in_from(&svc, "192.0.2.8", "/auth/session", BOB, BOB_PASSWORD).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn createkey_replaces_the_owners_keys() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (old_id, old) = svc.create(&ada, "old").await;
    let reply = sign_in_from(&svc, "203.0.113.1", "/auth/createkey", ADA, ADA_PASSWORD).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.headers["cache-control"], "no-store");
    let v = reply.json();
    let key = v["apiKey"].as_str().unwrap();
    let id = v["keyId"].as_str().unwrap();
    assert_eq!(svc.health(key).await.status, StatusCode::OK);
    let refused = svc.health(&old).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let old_view = svc
        .call(Method::GET, &format!("/v1/keys/{old_id}"), &ada, None)
        .await;
    assert_eq!(old_view.json()["status"], "revoked");
    let new_view = svc
        .call(Method::GET, &format!("/v1/keys/{id}"), &ada, None)
        .await;
    assert_eq!(new_view.json()["scopes"], json!(["read"]));
}

async fn concurrent_createkey_leaves_one_working_key<
    S: keygate::store::ClientStore + Send + Sync + 'static,
>(
    svc: Service<S>,
) {
    // As many as the username's sign-in budget (5): each attempt holds a token until it
    // succeeds.
    let calls = (0..5).map(|i| {
        let svc = &svc;
        async move {
            sign_in_from(
                svc,
                &format!("203.0.113.{i}"),
                "/auth/createkey",
                ADA,
                ADA_PASSWORD,
            )
            .await
        }
    });
    let replies = futures_util_join_all(calls).await;
    let mut keys = Vec::new();
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        keys.push(reply.json()["apiKey"].as_str().unwrap().to_owned());
    }
    let mut working = 0;
    for key in &keys {
        if svc.health(key).await.status == StatusCode::OK {
            working += 1;
        }
    }
    assert_eq!(working, 1, "exactly one of the concurrent keys works");
    let live: Vec<_> = svc
        .store
        .list(ADA, Default::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.status == Status::Active)
        .collect();
    assert_eq!(live.len(), 1);
}

/// `join_all` without another dependency: every future polled together on this task.
async fn futures_util_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|v| v.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_createkey_on_memory() {
    concurrent_createkey_leaves_one_working_key(memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_createkey_on_sqlite() {
    let dir = std::env::temp_dir().join(format!(
        "keygate-service-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    let store = SqlStore::connect(&url).await.unwrap();
    concurrent_createkey_leaves_one_working_key(service(store).await).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Every malformed request is refused with its own status and changes nothing.
#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, _) = svc.create(&ada, "keep me").await;
    let auth = format!("Bearer {ada}");
    let key_path = format!("/v1/keys/{id}");
    let rotate_path = format!("{key_path}/rotate");
    let before = snapshot(&svc, &ada, &key_path).await;
    let big = format!("{{\"name\": \"{}\"}}", "a".repeat(20_000));
    let json = "application/json";
    let cases: Vec<BadCase<'_>> = vec![
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\": ".into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            None,
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "[1,2]".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some(""),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some("text/plain"),
            "{\"name\":\"x\"}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
        ),
        (
            Method::POST,
            "/v1/keys",
            None,
            "{\"name\":\"x\"}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
        ),
        (
            Method::POST,
            "/v1/keys",
            Some("application/jsonx"),
            "{\"name\":\"x\"}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            big.clone(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            None,
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"owner\":\"bob\"}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("owner"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"rates\":[\"0/min\"]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("rates[0]"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"rates\":[\"60/min\",\"lots\"]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("rates[1]"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"ips\":[\"10.0.0.0/33\"]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("ips[0]"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"ips\":[\"not an ip\"]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("ips[0]"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"environment\":\"prod\"}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("environment"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"expires_in\":0}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("expires_in"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"expires_in\":-5}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("expires_in"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"\"}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"a\\u0007b\"}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"description\":\"no name\"}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":7}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        (
            Method::PATCH,
            &key_path,
            Some(json),
            "{\"use_case\":\"other\"}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "immutable_field",
            Some("use_case"),
        ),
        (
            Method::PATCH,
            &key_path,
            Some(json),
            "{\"name\":\"renamed\",\"environment\":\"test\"}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "immutable_field",
            Some("environment"),
        ),
        (
            Method::PATCH,
            &key_path,
            Some(json),
            "{\"expires_at\":null}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "immutable_field",
            Some("expires_at"),
        ),
        (
            Method::PATCH,
            &key_path,
            Some(json),
            "{\"expires_in\":60}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "immutable_field",
            Some("expires_in"),
        ),
        (
            Method::PATCH,
            &key_path,
            Some(json),
            "{\"name\":\"renamed\",\"rates\":[\"0/s\"]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("rates[0]"),
        ),
        (
            Method::PATCH,
            &key_path,
            Some(json),
            "{\"name\":\"renamed\",\"colour\":\"red\"}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("colour"),
        ),
        (
            Method::PATCH,
            &key_path,
            Some(json),
            big,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            None,
        ),
        (
            Method::POST,
            &rotate_path,
            Some(json),
            "{\"grace_seconds\":99999999}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("grace_seconds"),
        ),
        (
            Method::POST,
            &rotate_path,
            Some("text/plain"),
            "{}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"scopes\":[\"read\",\"a,b\"]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("scopes[1]"),
        ),
        (
            Method::POST,
            "/v1/keys",
            Some(json),
            "{\"name\":\"x\",\"sites\":[\"\"]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("sites[0]"),
        ),
        (
            Method::PATCH,
            &key_path,
            Some(json),
            "{\"sites\":[\"a b\"]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("sites[0]"),
        ),
        (
            Method::GET,
            "/v1/keys/%FF",
            None,
            String::new(),
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            Method::POST,
            "/v1/keys/%C3%28/disable",
            None,
            String::new(),
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            Method::GET,
            "/v1/keys?limit=0",
            None,
            String::new(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("limit"),
        ),
        (
            Method::GET,
            "/v1/keys?limit=many",
            None,
            String::new(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("query"),
        ),
        (
            Method::GET,
            "/v1/audit?before=x",
            None,
            String::new(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("before"),
        ),
    ];
    for (method, path, content_type, body, status, code, field) in cases {
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        let reply = svc
            .call_from("198.51.100.1", method.clone(), path, &headers, body.clone())
            .await;
        let shown: String = body.chars().take(60).collect();
        assert_eq!(
            reply.status, status,
            "{method} {path} {shown}: {}",
            reply.body
        );
        assert_eq!(
            reply.code(),
            code,
            "{method} {path} {shown}: {}",
            reply.body
        );
        assert!(!reply.json()["message"].as_str().unwrap().is_empty());
        if let Some(field) = field {
            assert_eq!(
                reply.json()["data"]["field"],
                field,
                "{method} {path} {shown}"
            );
        }
    }
    // A body sent in chunks with no length is cut off at 16 KiB too.
    let chunks = futures_stream(vec![vec![b' '; 10_000], vec![b' '; 10_000]]);
    let reply = svc
        .call_from(
            "198.51.100.1",
            Method::POST,
            "/v1/keys",
            &[("authorization", &auth), ("content-type", json)],
            Body::from_stream(chunks),
        )
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        snapshot(&svc, &ada, &key_path).await,
        before,
        "a refused request changed something"
    );
}

/// A refused request: method, path, content type, body; then the status, code and
/// `data.field` expected.
type BadCase<'a> = (
    Method,
    &'a str,
    Option<&'a str>,
    String,
    StatusCode,
    &'a str,
    Option<&'a str>,
);

/// What the owner can read: list, the key, the audit trail.
async fn snapshot(
    svc: &Service<MemoryStore>,
    ada: &str,
    key_path: &str,
) -> (String, String, String) {
    let list = svc.call(Method::GET, "/v1/keys", ada, None).await.body;
    let key = svc.call(Method::GET, key_path, ada, None).await.body;
    let audit = svc.call(Method::GET, "/v1/audit", ada, None).await.body;
    (list, key, audit)
}

fn futures_stream(
    chunks: Vec<Vec<u8>>,
) -> impl futures_core::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    struct Chunks(std::vec::IntoIter<Vec<u8>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<bytes::Bytes, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next().map(|c| Ok(bytes::Bytes::from(c))))
        }
    }
    Chunks(chunks.into_iter())
}

#[tokio::test]
async fn a_secret_is_in_exactly_one_response() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let reply = svc
        .call(
            Method::POST,
            "/v1/keys",
            &ada,
            Some(
                json!({"name": "ci", "scopes": ["read"], "rates": ["10/s", "1000/hour"],
                        "ips": ["10.0.0.0/8"], "sites": ["example.com"], "use_case": "ci",
                        "environment": "test", "expires_in": 3600}),
            ),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.headers["cache-control"], "no-store");
    let created = reply.json();
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("kg_test_"));
    let view = &created["key"];
    assert_eq!(view["prefix"], "kg_test_");
    assert_eq!(view["rates"], json!(["10/s", "1000/hour"]));
    assert_eq!(view["ips"], json!(["10.0.0.0/8"]));
    assert_eq!(view["use_case"], "ci");
    assert!(view["expires_at"].as_str().unwrap().ends_with('Z'));
    let fields: Vec<&str> = view
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "id",
        "name",
        "description",
        "use_case",
        "environment",
        "status",
        "prefix",
        "scopes",
        "rates",
        "ips",
        "sites",
        "expires_at",
        "created_at",
        "last_used_at",
        "last_used_ip",
    ];
    expected.sort_unstable();
    let mut fields = fields;
    fields.sort_unstable();
    assert_eq!(fields, expected);
    // Rotated: the new secret once, the old one never again.
    let rotated = svc
        .call(Method::POST, &format!("/v1/keys/{id}/rotate"), &ada, None)
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.body);
    let new_secret = rotated.json()["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, secret);
    // Every other response of the service: no secret in any.
    let mut bodies = Vec::new();
    for path in [
        "/v1/keys".to_owned(),
        format!("/v1/keys/{id}"),
        "/v1/audit".to_owned(),
        format!("/v1/audit?key={id}"),
    ] {
        bodies.push(svc.call(Method::GET, &path, &ada, None).await.body);
    }
    bodies.push(
        svc.call(
            Method::PATCH,
            &format!("/v1/keys/{id}"),
            &ada,
            Some(json!({"name": "ci2"})),
        )
        .await
        .body,
    );
    bodies.push(
        svc.call(Method::POST, &format!("/v1/keys/{id}/disable"), &ada, None)
            .await
            .body,
    );
    for body in bodies {
        for s in [&secret, &new_secret] {
            assert!(!body.contains(s.as_str()), "{body}");
            // Not even the secret's random part.
            assert!(!body.contains(&s[8..24]), "{body}");
        }
    }
}

#[tokio::test]
async fn the_lifecycle_through_the_api() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, secret) = svc.create(&ada, "life").await;
    let path = format!("/v1/keys/{id}");
    assert_eq!(svc.health(&secret).await.status, StatusCode::OK);
    let reply = svc
        .call(Method::POST, &format!("{path}/disable"), &ada, None)
        .await;
    assert_eq!(reply.json()["status"], "disabled");
    let refused = svc.health(&secret).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.code(), "api_key_disabled");
    let reply = svc
        .call(Method::POST, &format!("{path}/enable"), &ada, None)
        .await;
    assert_eq!(reply.json()["status"], "active");
    assert_eq!(svc.health(&secret).await.status, StatusCode::OK);
    // Patching the allowlist: sites survive a patch of ips alone.
    let reply = svc
        .call(
            Method::PATCH,
            &path,
            &ada,
            Some(json!({"sites": ["a.example"]})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let reply = svc
        .call(
            Method::PATCH,
            &path,
            &ada,
            Some(json!({"ips": ["192.0.2.0/24"], "name": "life2"})),
        )
        .await;
    assert_eq!(reply.json()["sites"], json!(["a.example"]));
    assert_eq!(reply.json()["ips"], json!(["192.0.2.0/24"]));
    assert_eq!(reply.json()["name"], "life2");
    // Rotation with grace: both secrets work for the grace.
    let reply = svc
        .call(
            Method::POST,
            &format!("{path}/rotate"),
            &ada,
            Some(json!({"grace_seconds": 60})),
        )
        .await;
    let new_secret = reply.json()["secret"].as_str().unwrap().to_owned();
    svc.call(
        Method::PATCH,
        &path,
        &ada,
        Some(json!({"ips": [], "sites": []})),
    )
    .await;
    assert_eq!(svc.health(&new_secret).await.status, StatusCode::OK);
    assert_eq!(svc.health(&secret).await.status, StatusCode::OK);
    // Delete: 204, then the key is gone from the API and refused as unknown.
    let reply = svc.call(Method::DELETE, &path, &ada, None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(
        svc.call(Method::GET, &path, &ada, None).await.status,
        StatusCode::NOT_FOUND
    );
    let refused = svc.health(&new_secret).await;
    assert_eq!(refused.code(), "invalid_api_key");
    let list = svc.call(Method::GET, "/v1/keys", &ada, None).await;
    assert_eq!(list.json()["keys"], json!([]));
    // The audit trail, newest first.
    let audit = svc
        .call(Method::GET, &format!("/v1/audit?key={id}"), &ada, None)
        .await;
    let actions: Vec<String> = audit.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        actions,
        ["deleted", "updated", "rotated", "updated", "updated", "enabled", "disabled", "created"]
    );
    let audit = audit.json();
    let disabled = &audit["events"][6];
    assert_eq!(disabled["old_status"], "active");
    assert_eq!(disabled["new_status"], "disabled");
    assert_eq!(disabled["ip"], "198.51.100.1");
}

#[tokio::test]
async fn listing_pages_through_every_key() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let mut made = Vec::new();
    for i in 0..7 {
        made.push(svc.create(&ada, &format!("k{i}")).await.0);
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let reply = svc
            .call(
                Method::GET,
                &format!("/v1/keys?limit=3&after={after}"),
                &ada,
                None,
            )
            .await;
        let v = reply.json();
        for key in v["keys"].as_array().unwrap() {
            seen.push(key["id"].as_str().unwrap().to_owned());
        }
        match v["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    made.sort();
    assert_eq!(seen, made);
}

#[tokio::test]
async fn testkey_checks_without_taking_a_token() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let reply = svc
        .call(
            Method::POST,
            "/v1/keys",
            &ada,
            Some(json!({"name": "t", "rates": ["5/min"], "scopes": ["read"]})),
        )
        .await;
    let secret = reply.json()["secret"].as_str().unwrap().to_owned();
    let id = reply.json()["key"]["id"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        let reply = svc
            .call_from(
                "198.51.100.2",
                Method::GET,
                "/auth/testkey",
                &[("x-api-key", &secret)],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let v = reply.json();
        assert_eq!(v["valid"], true);
        assert_eq!(v["key_id"], id);
        assert_eq!(v["owner"], ADA);
        assert_eq!(v["environment"], "live");
        assert_eq!(v["scopes"], json!(["read"]));
        assert_eq!(v["rate_limit"]["limit"], 5);
        assert_eq!(v["rate_limit"]["remaining"], 5, "testkey took a token");
    }
    // Bearer and Basic work too.
    let bearer = format!("Bearer {secret}");
    let reply = svc
        .call_from(
            "198.51.100.2",
            Method::GET,
            "/auth/testkey",
            &[("authorization", &bearer)],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // The API's use does take tokens, and testkey reports them.
    svc.health(&secret).await;
    let reply = svc
        .call_from(
            "198.51.100.2",
            Method::GET,
            "/auth/testkey",
            &[("x-api-key", &secret)],
            "",
        )
        .await;
    assert_eq!(reply.json()["rate_limit"]["remaining"], 4);
    // A refused key gets the rejection envelope with its status.
    svc.call(Method::POST, &format!("/v1/keys/{id}/disable"), &ada, None)
        .await;
    let reply = svc
        .call_from(
            "198.51.100.2",
            Method::GET,
            "/auth/testkey",
            &[("x-api-key", &secret)],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.code(), "api_key_disabled");
    let reply = svc
        .call_from("198.51.100.2", Method::GET, "/auth/testkey", &[], "")
        .await;
    assert_eq!(reply.code(), "missing_api_key");
    let reply = svc
        .call_from(
            "198.51.100.2",
            Method::GET,
            "/auth/testkey",
            &[("x-api-key", "kg_live_nope")],
            "",
        )
        .await;
    assert_eq!(reply.code(), "invalid_api_key");
}

#[tokio::test]
async fn last_use_is_recorded_with_its_address() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, secret) = svc.create(&ada, "used").await;
    let view = svc
        .call(Method::GET, &format!("/v1/keys/{id}"), &ada, None)
        .await
        .json();
    assert_eq!(view["last_used_at"], Value::Null);
    assert_eq!(svc.health(&secret).await.status, StatusCode::OK);
    svc.store.flush_usage().await.unwrap();
    let view = svc
        .call(Method::GET, &format!("/v1/keys/{id}"), &ada, None)
        .await
        .json();
    assert!(view["last_used_at"].is_string(), "{view}");
    assert_eq!(view["last_used_ip"], "198.51.100.9");
}

#[test]
fn a_short_session_secret_is_refused() {
    let built = KeyService::builder(MemoryStore::new())
        .session_secret(vec![1u8; 31])
        .build();
    assert!(built.is_err());
    let _ = NonZeroU32::MIN;
}

#[tokio::test]
async fn a_missing_field_is_named() {
    let svc = memory().await;
    let reply = svc
        .call_from(
            "198.51.100.1",
            Method::POST,
            "/auth/session",
            &[("content-type", "application/json")],
            json!({"username": ADA}).to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.json()["data"]["field"], "password", "{}", reply.body);
}

#[tokio::test]
async fn a_revoked_key_cannot_be_changed() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, _) = svc.create(&ada, "old").await;
    // createkey revokes it.
    let reply = sign_in_from(&svc, "203.0.113.1", "/auth/createkey", ADA, ADA_PASSWORD).await;
    assert_eq!(reply.status, StatusCode::OK);
    let path = format!("/v1/keys/{id}");
    let before = svc.call(Method::GET, &path, &ada, None).await.body;
    for (method, path, body) in [
        (Method::PATCH, path.clone(), Some(json!({"name": "back"}))),
        (Method::POST, format!("{path}/enable"), None),
        (Method::POST, format!("{path}/disable"), None),
        (Method::POST, format!("{path}/rotate"), None),
    ] {
        let reply = svc.call(method.clone(), &path, &ada, body).await;
        assert_eq!(
            reply.status,
            StatusCode::CONFLICT,
            "{method} {path}: {}",
            reply.body
        );
        assert_eq!(reply.code(), "invalid_state");
    }
    assert_eq!(svc.call(Method::GET, &path, &ada, None).await.body, before);
}

#[tokio::test]
async fn a_created_key_reads_like_any_other_view() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let reply = svc
        .call(Method::POST, "/v1/keys", &ada, Some(json!({"name": "k"})))
        .await;
    let id = reply.json()["key"]["id"].as_str().unwrap().to_owned();
    let got = svc
        .call(Method::GET, &format!("/v1/keys/{id}"), &ada, None)
        .await;
    // The same fields in the same order, so clients (and diffs) see one shape; in a list
    // too.
    let list = svc.call(Method::GET, "/v1/keys", &ada, None).await.body;
    assert!(
        list.starts_with(&format!("{{\"keys\":[{{\"id\":\"{id}\",\"name\"")),
        "{list}"
    );
    let created = reply.body.split("\"key\":").nth(1).unwrap();
    let created = &created[..created.rfind(",\"secret\"").unwrap()];
    assert_eq!(created, got.body);
}

#[tokio::test]
async fn the_dashboard_runs_only_its_own_script() {
    let svc = memory().await;
    let reply = svc
        .call_from("198.51.100.1", Method::GET, "/dashboard", &[], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let policy = reply.headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'sha256-"), "{policy}");
    assert!(!policy.contains("script-src 'unsafe-inline'"), "{policy}");
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(!reply.body.contains("http://") && !reply.body.contains("https://"));
}
