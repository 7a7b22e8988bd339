//! Attacks on the key service (`keygate::service`): tenants, sessions, credentials, bad
//! input, lockout, existence oracles, secrets in output, the dashboard. In process over the
//! memory store (and SQLite where the store matters), plus the quickstart binary for its
//! log. Attacks that hold assert the secure behaviour; findings are `#[ignore]`d with a
//! `// FINDING:` note and assert what should happen. Timings are printed, never asserted.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::Router;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use keygate::clock::FakeClock;
use keygate::key::Environment;
use keygate::lookup::CachedLookup;
use keygate::ratelimit::Quota;
use keygate::store::{KeyStore, MemoryStore, NewKey, OwnerStore, SqlStore};
use keygate::validate::PeerAddr;
use keygate::Keygate;
use serde_json::{json, Value};
use tower::ServiceExt;

const ADA: &str = "ada";
const BOB: &str = "bob";
const CY: &str = "cy"; // an owner without a password
const ADA_PASSWORD: &str = "correct horse battery staple";
const BOB_PASSWORD: &str = "tr0ub4dor&3";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const PEER: &str = "198.51.100.1";

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

    /// Status, body and headers (without `date`), for comparing two replies whole.
    fn shape(&self) -> (StatusCode, String, Vec<(String, String)>) {
        let mut headers: Vec<(String, String)> = self
            .headers
            .iter()
            .filter(|(k, _)| *k != "date")
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect();
        headers.sort();
        (self.status, self.body.clone(), headers)
    }
}

struct Svc<S> {
    router: Router,
    store: S,
    clock: FakeClock,
}

fn quota(n: u32, per: &str) -> Quota {
    Quota::parse(&format!("{n}/{per}")).unwrap()
}

async fn build<S: keygate::store::ClientStore + Send + Sync + 'static>(
    store: S,
    user: u32,
    ip: u32,
) -> Svc<S> {
    store.add_owner(ADA, Some(ADA_PASSWORD)).await.unwrap();
    store.add_owner(BOB, Some(BOB_PASSWORD)).await.unwrap();
    store.add_owner(CY, None).await.unwrap();
    let clock = FakeClock::new(SystemTime::now());
    let keygate = Keygate::builder(CachedLookup::over_store(store.clone()))
        .default_quota(quota(60, "min"))
        .build()
        .unwrap();
    let mut template = NewKey::new("", "from createkey", Environment::Live);
    template.scopes = ["read"].into_iter().collect();
    // A fixed session secret, the given sign-in limits.
    let router = keygate::service::KeyService::builder(store.clone())
        .createkey(template)
        .testkey(keygate.route().cost(0).build().unwrap())
        .login_limits(quota(user, "hour"), quota(ip, "hour"))
        .session_secret(SECRET.to_vec())
        .clock(clock.clone())
        .build()
        .unwrap();
    let api = Router::new()
        .route("/v1/health", axum::routing::get(|| async { "ok" }))
        .layer(keygate);
    Svc {
        router: api.merge(router),
        store,
        clock,
    }
}

async fn memory() -> Svc<MemoryStore> {
    build(MemoryStore::new(), 5, 8).await
}

fn scratch_sqlite() -> String {
    common::scratch_sqlite_url()
}

impl<S: keygate::store::ClientStore + Send + Sync + 'static> Svc<S> {
    async fn raw(&self, ip: &str, req: Request<Body>) -> Reply {
        let mut req = req;
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
        self.raw(ip, builder.body(body.into()).unwrap()).await
    }

    async fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {token}");
        match body {
            Some(body) => {
                self.call_from(
                    PEER,
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
                self.call_from(PEER, method, path, &[("authorization", &auth)], "")
                    .await
            }
        }
    }

    async fn post_json(&self, ip: &str, path: &str, body: &str) -> Reply {
        self.call_from(
            ip,
            Method::POST,
            path,
            &[("content-type", "application/json")],
            body.to_owned(),
        )
        .await
    }

    async fn login(&self, ip: &str, path: &str, user: &str, password: &str) -> Reply {
        self.post_json(
            ip,
            path,
            &json!({"username": user, "password": password}).to_string(),
        )
        .await
    }

    async fn sign_in(&self, user: &str, password: &str) -> String {
        let reply = self.login(PEER, "/auth/session", user, password).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.json()["token"].as_str().unwrap().to_owned()
    }

    async fn create(&self, token: &str, body: Value) -> (String, String) {
        let reply = self.call(Method::POST, "/v1/keys", token, Some(body)).await;
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

    async fn testkey(&self, key: &str) -> Reply {
        self.call_from(
            "198.51.100.9",
            Method::GET,
            "/auth/testkey",
            &[("x-api-key", key)],
            "",
        )
        .await
    }

    /// Everything an owner can read of their own state: the list, every key, the audit
    /// trail.
    async fn snapshot(&self, token: &str) -> String {
        let list = self.call(Method::GET, "/v1/keys", token, None).await;
        let audit = self.call(Method::GET, "/v1/audit", token, None).await;
        let mut keys = String::new();
        for k in list.json()["keys"].as_array().cloned().unwrap_or_default() {
            let id = k["id"].as_str().unwrap();
            keys.push_str(
                &self
                    .call(Method::GET, &format!("/v1/keys/{id}"), token, None)
                    .await
                    .body,
            );
        }
        format!("{}\n{}\n{}", list.body, keys, audit.body)
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------
// Tenant isolation
// ---------------------------------------------------------------------------------------

/// Ada's key id, spelled every odd way, through every endpoint as Bob: never found, never
/// changed, and answered like a key that does not exist.
#[tokio::test]
async fn odd_spellings_of_another_owners_id_reach_nothing() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let bob = svc.sign_in(BOB, BOB_PASSWORD).await;
    let (id, secret) = svc.create(&ada, json!({"name": "ada's"})).await;
    let before = svc.snapshot(&ada).await;
    let encoded: String = id.bytes().map(|b| format!("%{b:02X}")).collect();
    let long = format!("{id}{}", "a".repeat(5000));
    let spellings = vec![
        id.clone(),
        encoded.clone(),
        format!("{id}/"),
        format!("{id}%2F"),
        format!("{id}%00"),
        format!("{id}%20"),
        format!("%20{id}"),
        id.to_uppercase(),
        format!("{id}/.."),
        format!("../keys/{id}"),
        format!("%2E%2E%2Fkeys%2F{id}"),
        format!("{id}%E2%80%8B"),
        "..".to_owned(),
        "%2E%2E".to_owned(),
        "%C3%A9".to_owned(),
        long,
        format!("{id};x"),
        format!("{id}?x=1"),
        format!("{id}#frag"),
    ];
    let actions: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "", None),
        (Method::PATCH, "", Some(json!({"name": "bob's now"}))),
        (Method::DELETE, "", None),
        (Method::POST, "/disable", None),
        (Method::POST, "/enable", None),
        (Method::POST, "/rotate", Some(json!({}))),
    ];
    for spelling in &spellings {
        for (method, tail, body) in &actions {
            let path = format!("/v1/keys/{spelling}{tail}");
            let reply = svc.call(method.clone(), &path, &bob, body.clone()).await;
            assert!(
                reply.status.is_client_error(),
                "{method} {path:.80}: {} {}",
                reply.status,
                reply.body
            );
            assert!(
                !reply.body.contains(&id),
                "{method} {path:.80}: {}",
                reply.body
            );
        }
        let audit = svc
            .call(
                Method::GET,
                &format!("/v1/audit?key={spelling}"),
                &bob,
                None,
            )
            .await;
        assert!(
            audit.status.is_client_error() || audit.json()["events"] == json!([]),
            "audit ?key={spelling:.80}: {}",
            audit.body
        );
        assert!(!audit.body.contains(&id), "{}", audit.body);
    }
    // Ada's own key through percent-encoding is still hers (the path is decoded once).
    let mine = svc
        .call(Method::GET, &format!("/v1/keys/{encoded}"), &ada, None)
        .await;
    assert_eq!(mine.status, StatusCode::OK, "{}", mine.body);
    assert_eq!(svc.snapshot(&ada).await, before, "Bob changed Ada's key");
    assert_eq!(svc.health(&secret).await.status, StatusCode::OK);
}

/// Another owner's id as the list cursor or the audit filter tells nothing: the list from
/// it is the same as from a made-up id next to it, the audit filter reads as unknown.
#[tokio::test]
async fn cursors_and_filters_with_another_owners_id_tell_nothing() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let bob = svc.sign_in(BOB, BOB_PASSWORD).await;
    let (ada_id, _) = svc.create(&ada, json!({"name": "a"})).await;
    let (deleted_id, _) = svc.create(&ada, json!({"name": "gone"})).await;
    svc.call(
        Method::DELETE,
        &format!("/v1/keys/{deleted_id}"),
        &ada,
        None,
    )
    .await;
    for i in 0..4 {
        svc.create(&bob, json!({"name": format!("b{i}")})).await;
    }
    for target in [&ada_id, &deleted_id] {
        let from_theirs = svc
            .call(Method::GET, &format!("/v1/keys?after={target}"), &bob, None)
            .await;
        let from_nothing = svc
            .call(
                Method::GET,
                &format!("/v1/keys?after={target}0"),
                &bob,
                None,
            )
            .await;
        assert_eq!(from_theirs.status, StatusCode::OK);
        assert_eq!(from_theirs.body, from_nothing.body);
        for k in from_theirs.json()["keys"].as_array().unwrap() {
            assert!(k["name"].as_str().unwrap().starts_with('b'), "{k}");
        }
        let theirs = svc
            .call(Method::GET, &format!("/v1/audit?key={target}"), &bob, None)
            .await;
        let unknown = svc
            .call(
                Method::GET,
                "/v1/audit?key=key_000000000000000000000000",
                &bob,
                None,
            )
            .await;
        assert_eq!(theirs.shape(), unknown.shape());
        assert_eq!(theirs.status, StatusCode::NOT_FOUND);
    }
    // Bob's whole audit trail shows none of Ada's events.
    let all = svc
        .call(Method::GET, "/v1/audit?limit=100", &bob, None)
        .await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert!(!all.body.contains(&ada_id) && !all.body.contains(&deleted_id));
    assert!(!all.body.contains("\"ada\""), "{}", all.body);
}

/// A deleted key of one's own, another owner's key (live or deleted) and an id that never
/// existed answer alike: status, body and headers.
#[tokio::test]
async fn deleted_foreign_and_unknown_ids_answer_alike() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let bob = svc.sign_in(BOB, BOB_PASSWORD).await;
    let (mine_deleted, _) = svc.create(&bob, json!({"name": "x"})).await;
    svc.call(
        Method::DELETE,
        &format!("/v1/keys/{mine_deleted}"),
        &bob,
        None,
    )
    .await;
    let (theirs, _) = svc.create(&ada, json!({"name": "y"})).await;
    let (theirs_deleted, _) = svc.create(&ada, json!({"name": "z"})).await;
    svc.call(
        Method::DELETE,
        &format!("/v1/keys/{theirs_deleted}"),
        &ada,
        None,
    )
    .await;
    let unknown = "key_000000000000000000000000".to_owned();
    let actions: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "", None),
        (Method::PATCH, "", Some(json!({"name": "n"}))),
        (Method::DELETE, "", None),
        (Method::POST, "/disable", None),
        (Method::POST, "/enable", None),
        (Method::POST, "/rotate", Some(json!({"grace_seconds": 5}))),
    ];
    for (method, tail, body) in &actions {
        let mut shapes = Vec::new();
        for id in [&mine_deleted, &theirs, &theirs_deleted, &unknown] {
            let path = format!("/v1/keys/{id}{tail}");
            shapes.push(
                svc.call(method.clone(), &path, &bob, body.clone())
                    .await
                    .shape(),
            );
        }
        assert_eq!(shapes[0].0, StatusCode::NOT_FOUND, "{method} {tail}");
        for s in &shapes[1..] {
            assert_eq!(s, &shapes[0], "{method} {tail}");
        }
    }
    // Timing: other owner's key vs unknown id (GET), medians of 200.
    let mut t_theirs = Vec::new();
    let mut t_unknown = Vec::new();
    let mut t_deleted = Vec::new();
    for _ in 0..200 {
        for (id, into) in [
            (&theirs, &mut t_theirs),
            (&unknown, &mut t_unknown),
            (&mine_deleted, &mut t_deleted),
        ] {
            let path = format!("/v1/keys/{id}");
            let start = Instant::now();
            svc.call(Method::GET, &path, &bob, None).await;
            into.push(start.elapsed());
        }
    }
    println!(
        "TIMING GET /v1/keys/{{id}} (memory store, median of 200): other owner's {:?}, \
         unknown {:?}, own deleted {:?}",
        median(t_theirs),
        median(t_unknown),
        median(t_deleted)
    );
}

// ---------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------

/// A token signed with another secret, or any byte of a real one changed, or the real one
/// re-encoded, is refused; odd Authorization forms are refused or read exactly once.
#[tokio::test]
async fn forged_altered_and_oddly_sent_tokens_are_refused() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    // Another service, another secret, the same store: its tokens are not ours.
    let other_secret = keygate::service::KeyService::builder(svc.store.clone())
        .session_secret(vec![9u8; 32])
        .build()
        .unwrap();
    let req = Request::post("/auth/session")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"username": ADA, "password": ADA_PASSWORD}).to_string(),
        ))
        .unwrap();
    let res = other_secret.oneshot(req).await.unwrap();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let foreign: Value = serde_json::from_slice(&bytes).unwrap();
    let foreign = foreign["token"].as_str().unwrap().to_owned();
    let (payload, tag) = ada.strip_prefix("kgs_").unwrap().split_once('.').unwrap();
    let raw = URL_SAFE_NO_PAD.decode(payload).unwrap();
    let mut as_bob = raw.clone();
    as_bob.truncate(9);
    as_bob.extend_from_slice(BOB.as_bytes());
    let mut later = raw.clone();
    later[1] = 0x7f;
    let mut v2 = raw.clone();
    v2[0] = 2;
    let std_b64 = format!("kgs_{}.{}", STANDARD.encode(&raw), tag);
    let mut bad = vec![
        foreign.clone(),
        format!("kgs_{}.{tag}", URL_SAFE_NO_PAD.encode(&as_bob)),
        format!("kgs_{}.{tag}", URL_SAFE_NO_PAD.encode(&later)),
        format!("kgs_{}.{tag}", URL_SAFE_NO_PAD.encode(&v2)),
        format!("KGS_{payload}.{tag}"),
        format!("kgs_{payload}.{tag}="),
        format!("kgs_{payload}=.{tag}"),
        format!("kgs_{payload}.{tag}.{tag}"),
        format!("kgs_{payload}.{}", &tag[..tag.len() - 1]),
        format!("kgs_{payload}."),
        format!("kgs_.{tag}"),
        format!("kgs_{payload}"),
        format!("{payload}.{tag}"),
        std_b64,
    ];
    // Every single character of the token changed in turn.
    for i in 4..ada.len() {
        let mut chars: Vec<char> = ada.chars().collect();
        if chars[i] == '.' {
            continue;
        }
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        bad.push(chars.into_iter().collect());
    }
    for token in &bad {
        if token == &ada {
            continue;
        }
        let reply = svc.call(Method::GET, "/v1/keys", token, None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{token}");
        assert_eq!(reply.code(), "unauthorized");
    }
    // Authorization forms: only `Bearer <token>` (scheme in any case) is a session.
    let basic = format!("Basic {}", STANDARD.encode(format!("{ada}:")));
    let basic_user = format!("Basic {}", STANDARD.encode(format!("{ADA}:{ada}")));
    let refused = [
        ada.clone(),
        format!("Token {ada}"),
        format!("Bearer{ada}"),
        format!("Bearer\t{ada}"),
        format!("Bearer {ada} {ada}"),
        format!("Bearer ,{ada}"),
        format!("Bearer \"{ada}\""),
        basic,
        basic_user,
    ];
    for value in &refused {
        let reply = svc
            .call_from(
                PEER,
                Method::GET,
                "/v1/keys",
                &[("authorization", value)],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{value:.40}");
    }
    for header in ["x-api-key", "cookie", "x-session-token"] {
        let reply = svc
            .call_from(PEER, Method::GET, "/v1/keys", &[(header, &ada)], "")
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{header}");
    }
    let reply = svc
        .call_from(
            PEER,
            Method::GET,
            &format!("/v1/keys?access_token={ada}"),
            &[],
            "",
        )
        .await;
    assert!(reply.status.is_client_error());
    // Two Authorization headers, a bad one first: not signed in by the second.
    let good = format!("Bearer {ada}");
    let reply = svc
        .call_from(
            PEER,
            Method::GET,
            "/v1/keys",
            &[
                ("authorization", "Bearer kgs_nope.nope"),
                ("authorization", &good),
            ],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Accepted: scheme case, surrounding spaces.
    for value in [
        format!("bearer {ada}"),
        format!("BEARER {ada}"),
        format!("Bearer  {ada} "),
    ] {
        let reply = svc
            .call_from(
                PEER,
                Method::GET,
                "/v1/keys",
                &[("authorization", &value)],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{value:.20}");
    }
}

/// A session token is not an API key, anywhere keys are read; an API key is not a session
/// in any form.
#[tokio::test]
async fn sessions_and_api_keys_do_not_stand_in_for_each_other() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (_, secret) = svc.create(&ada, json!({"name": "k"})).await;
    let bearer = format!("Bearer {ada}");
    let basic = format!("Basic {}", STANDARD.encode(format!("{ada}:")));
    for path in ["/v1/health", "/auth/testkey"] {
        for (h, v) in [
            ("x-api-key", ada.as_str()),
            ("authorization", bearer.as_str()),
            ("authorization", basic.as_str()),
        ] {
            let reply = svc
                .call_from("198.51.100.9", Method::GET, path, &[(h, v)], "")
                .await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path} {h}");
            assert_eq!(
                reply.code(),
                "invalid_api_key",
                "{path} {h}: {}",
                reply.body
            );
            assert!(!reply.body.contains(&ada));
        }
    }
    let basic_key = format!("Basic {}", STANDARD.encode(format!("{secret}:")));
    for value in [format!("Bearer {secret}"), basic_key] {
        let reply = svc
            .call_from(
                PEER,
                Method::GET,
                "/v1/keys",
                &[("authorization", &value)],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let reply = svc
        .call_from(PEER, Method::GET, "/v1/keys", &[("x-api-key", &secret)], "")
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

/// A session of a disabled owner stays dead when the owner is enabled again within its 15
/// minutes (disabling is what an operator does when an owner's account is compromised).
// FINDING: sessions are stateless and only check `owner.active` on each call, so enabling
// the owner again brings every session issued before the disabling back to life, the
// attacker's stolen one included, until its 15 minutes are up.
#[tokio::test]
async fn a_session_ended_by_disabling_stays_ended() {
    let svc = memory().await;
    let stolen = svc.sign_in(ADA, ADA_PASSWORD).await;
    svc.store.set_owner_active(ADA, false).await.unwrap();
    let reply = svc.call(Method::GET, "/v1/keys", &stolen, None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    svc.clock.advance(Duration::from_secs(60));
    svc.store.set_owner_active(ADA, true).await.unwrap();
    let reply = svc.call(Method::GET, "/v1/keys", &stolen, None).await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "the session from before the disabling works again"
    );
}

/// A password change ends the sessions signed in with the old password.
// FINDING: `set_owner_password` leaves every earlier session working for up to 15 minutes:
// an owner who resets a leaked password cannot end the attacker's session (only disabling
// the owner does, and see the finding above for re-enabling).
#[tokio::test]
async fn a_password_change_ends_earlier_sessions() {
    let svc = memory().await;
    let stolen = svc.sign_in(ADA, ADA_PASSWORD).await;
    svc.store
        .set_owner_password(ADA, Some("a brand new password"))
        .await
        .unwrap();
    let reply = svc.call(Method::GET, "/v1/keys", &stolen, None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.body);
}

/// A session for an owner without a password cannot be had; one for an owner name that
/// does not exist (forged with the right secret, say from a leaked secret of a test
/// instance) finds nothing.
#[tokio::test]
async fn passwordless_and_unknown_owners_have_no_session() {
    let svc = build(MemoryStore::new(), 100, 100).await;
    for password in ["", "keygate dummy password", "x"] {
        let reply = svc.login(PEER, "/auth/session", CY, password).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{password:?}");
        let reply = svc.login(PEER, "/auth/createkey", CY, password).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{password:?}");
    }
    // The documented dummy password of the unknown-user path signs nobody in.
    let reply = svc
        .login(
            "203.0.113.50",
            "/auth/session",
            "nobody",
            "keygate dummy password",
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------------
// Credentials and sign-in limits
// ---------------------------------------------------------------------------------------

/// Once ada's budget is spent, no spelling of "ada" signs in as ada, and none of them has
/// a budget of its own that reaches ada's password check.
#[tokio::test]
async fn username_spellings_neither_escape_nor_share_the_limit() {
    spellings_against(build(MemoryStore::new(), 5, 1000).await).await;
    let store = SqlStore::connect(&scratch_sqlite()).await.unwrap();
    spellings_against(build(store, 5, 1000).await).await;
}

async fn spellings_against<S: keygate::store::ClientStore + Send + Sync + 'static>(svc: Svc<S>) {
    for i in 0..5 {
        let reply = svc
            .login(&format!("203.0.113.{i}"), "/auth/session", ADA, "guess")
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let reply = svc
        .login("203.0.113.99", "/auth/session", ADA, ADA_PASSWORD)
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let spellings = [
        "Ada",
        "ADA",
        " ada",
        "ada ",
        "ada\t",
        "ada\n",
        "ada\u{0}",
        "\u{feff}ada",
        "ada\u{200b}",
        "ａｄａ",
        "a\u{0301}da",
        "ÁDA",
        "ada\u{0130}",
        "ad\u{0430}", // Cyrillic a
        "ada/",
        "ada%00",
    ];
    for (i, name) in spellings.iter().enumerate() {
        let reply = svc
            .login(
                &format!("203.0.114.{i}"),
                "/auth/session",
                name,
                ADA_PASSWORD,
            )
            .await;
        assert!(
            reply.status == StatusCode::UNAUTHORIZED
                || reply.status == StatusCode::TOO_MANY_REQUESTS
                || reply.status == StatusCode::UNPROCESSABLE_ENTITY,
            "{name:?} signed in: {}",
            reply.body
        );
        assert!(!reply.body.contains("kgs_"), "{name:?}: {}", reply.body);
    }
}

/// Usernames over 256 bytes (no owner's name is longer) and passwords over 1024 bytes are
/// refused before any work; a 256-byte username with a 1024-byte password is checked (and
/// counted).
#[tokio::test]
async fn oversized_credentials_are_refused_cheaply() {
    let svc = memory().await;
    let long = "a".repeat(1025);
    let mut t_long = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let reply = svc.login("203.0.113.7", "/auth/session", &long, "x").await;
        t_long.push(start.elapsed());
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reply.json()["data"]["field"], "username");
        assert!(!reply.body.contains(&long[..100]));
        let reply = svc.login("203.0.113.7", "/auth/session", ADA, &long).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reply.json()["data"]["field"], "password");
    }
    // Those took no token from the address (8 an hour here): it can still try.
    let reply = svc
        .login("203.0.113.7", "/auth/session", ADA, ADA_PASSWORD)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let (name, max) = ("a".repeat(256), "a".repeat(1024));
    let start = Instant::now();
    let reply = svc.login("203.0.113.8", "/auth/session", &name, &max).await;
    let t_max = start.elapsed();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    println!(
        "TIMING sign-in: 1025-byte username refused in {:?} (median), 256-byte username \
         and 1024-byte password checked in {t_max:?}",
        median(t_long)
    );
}

/// Rotating through one IPv6 /64 (and an IPv4 address in its IPv6-mapped form) meets one
/// address budget.
#[tokio::test]
async fn ipv6_rotation_within_a_64_meets_one_budget() {
    let svc = memory().await; // 8 failures per address
    for i in 0..8u32 {
        let ip = format!("2001:db8:1:2:{:x}:{:x}::{:x}", i * 7919, i, i + 1);
        let reply = svc
            .login(&ip, "/auth/session", &format!("user{i}"), "x")
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{ip}");
    }
    let reply = svc
        .login(
            "2001:db8:1:2:ffff:ffff:ffff:ffff",
            "/auth/session",
            BOB,
            BOB_PASSWORD,
        )
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    // The next /64 is another client.
    let reply = svc
        .login("2001:db8:1:3::1", "/auth/session", BOB, BOB_PASSWORD)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // IPv4 and its mapped form are one client.
    for i in 0..4 {
        svc.login("192.0.2.33", "/auth/session", &format!("v{i}"), "x")
            .await;
        svc.login("::ffff:192.0.2.33", "/auth/session", &format!("m{i}"), "x")
            .await;
    }
    let reply = svc
        .login("::ffff:192.0.2.33", "/auth/session", BOB, BOB_PASSWORD)
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
}

/// With no proxy trusted, forwarding headers change neither the address budget nor the
/// address the audit trail records.
#[tokio::test]
async fn forwarding_headers_are_not_trusted_by_default() {
    let svc = memory().await;
    for i in 0..8 {
        let spoof = format!("10.9.8.{i}");
        let forwarded = format!("for={spoof}");
        let reply = svc
            .call_from(
                "192.0.2.9",
                Method::POST,
                "/auth/session",
                &[
                    ("content-type", "application/json"),
                    ("x-forwarded-for", &spoof),
                    ("x-real-ip", &spoof),
                    ("forwarded", &forwarded),
                    ("true-client-ip", &spoof),
                    ("cf-connecting-ip", &spoof),
                ],
                json!({"username": format!("u{i}"), "password": "x"}).to_string(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let reply = svc
        .call_from(
            "192.0.2.9",
            Method::POST,
            "/auth/session",
            &[
                ("content-type", "application/json"),
                ("x-forwarded-for", "10.0.0.99"),
            ],
            json!({"username": BOB, "password": BOB_PASSWORD}).to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    // The audit trail records the peer, not what the client claimed.
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let reply = svc
        .call_from(
            "198.51.100.77",
            Method::POST,
            "/v1/keys",
            &[
                ("authorization", &format!("Bearer {ada}")),
                ("content-type", "application/json"),
                ("x-forwarded-for", "6.6.6.6"),
                ("forwarded", "for=6.6.6.6"),
            ],
            json!({"name": "k"}).to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let audit = svc.call(Method::GET, "/v1/audit", &ada, None).await;
    assert_eq!(audit.json()["events"][0]["ip"], "198.51.100.77");
    assert!(!audit.body.contains("6.6.6.6"));
}

/// Unknown user, wrong password, disabled owner, owner without a password: one status,
/// one body, one set of headers, on both sign-in endpoints. Timings printed.
#[tokio::test]
async fn failed_sign_ins_look_alike_and_are_timed() {
    let svc = build(MemoryStore::new(), 1000, 1000).await;
    svc.store.add_owner("dis", Some("right")).await.unwrap();
    svc.store.set_owner_active("dis", false).await.unwrap();
    let cases = [
        ("unknown user", "nobody", "whatever"),
        ("wrong password", ADA, "whatever"),
        ("disabled owner, right password", "dis", "right"),
        ("owner without a password", CY, "whatever"),
    ];
    for path in ["/auth/session", "/auth/createkey"] {
        let mut shapes = Vec::new();
        let mut times = Vec::new();
        for (what, user, password) in cases {
            let mut t = Vec::new();
            let mut shape = None;
            for i in 0..15 {
                let start = Instant::now();
                let reply = svc
                    .login(&format!("203.0.113.{i}"), path, user, password)
                    .await;
                t.push(start.elapsed());
                shape = Some(reply.shape());
            }
            shapes.push((what, shape.unwrap()));
            times.push((what, median(t)));
        }
        for (what, shape) in &shapes[1..] {
            assert_eq!(shape, &shapes[0].1, "{path}: {what} vs {}", shapes[0].0);
        }
        assert_eq!(shapes[0].1 .0, StatusCode::UNAUTHORIZED);
        println!("TIMING {path} failures (median of 15, memory store): {times:?}");
    }
    // A success, for scale.
    let mut t = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        svc.login(PEER, "/auth/session", ADA, ADA_PASSWORD).await;
        t.push(start.elapsed());
    }
    println!(
        "TIMING /auth/session success (median of 15): {:?}",
        median(t)
    );
}

/// The 429 for a user who exists reads exactly like the 429 for one who does not.
#[tokio::test]
async fn the_429_does_not_tell_whether_the_user_exists() {
    let svc = memory().await;
    let mut replies = Vec::new();
    for user in [ADA, "nobody"] {
        for i in 0..5 {
            svc.login(&format!("203.0.113.{i}"), "/auth/session", user, "x")
                .await;
        }
        replies.push(
            svc.login("203.0.113.200", "/auth/session", user, "x")
                .await
                .shape(),
        );
    }
    assert_eq!(replies[0].0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(replies[0], replies[1]);
}

/// How cheaply an attacker locks a victim out of sign-in and createkey: failed attempts
/// from addresses of their choosing. Asserts what the design promises (the username's
/// budget, from anywhere) and prints the cost.
#[tokio::test]
async fn lockout_costs_the_attacker_one_budget_of_requests() {
    // The defaults: 10 per username, 50 per address, an hour.
    let store = MemoryStore::new();
    store.add_owner(ADA, Some(ADA_PASSWORD)).await.unwrap();
    let clock = FakeClock::new(SystemTime::now());
    let router = keygate::service::KeyService::builder(store.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    let svc = Svc {
        router,
        store,
        clock,
    };
    let mut spent = 0;
    loop {
        let reply = svc
            .login("203.0.113.66", "/auth/session", ADA, "wrong")
            .await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        spent += 1;
        assert!(spent < 100);
    }
    let victim = svc
        .login("198.51.100.200", "/auth/createkey", ADA, ADA_PASSWORD)
        .await;
    assert_eq!(victim.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = victim.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The username's bucket refills one attempt per hour/10 = 360 s (the limiter reads the
    // system clock, not the service's, so this is not advanced here): the attacker spends
    // one request per refill to keep the door shut.
    println!(
        "LOCKOUT: {spent} failed requests from ONE address lock the owner out of \
         /auth/session and /auth/createkey; retry-after {retry}s; 1 request per 360 s \
         keeps it locked (240 requests a day)"
    );
}

// ---------------------------------------------------------------------------------------
// createkey
// ---------------------------------------------------------------------------------------

/// createkey revokes the caller's keys only: another owner's keys, sessions and audit
/// trail are untouched.
#[tokio::test]
async fn createkey_touches_no_other_owner() {
    let svc = memory().await;
    let bob = svc.sign_in(BOB, BOB_PASSWORD).await;
    let (_, bob_key) = svc.create(&bob, json!({"name": "bob's"})).await;
    let bob_before = svc.snapshot(&bob).await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    svc.create(&ada, json!({"name": "ada's"})).await;
    for i in 0..3 {
        let reply = svc
            .login(
                &format!("203.0.113.{i}"),
                "/auth/createkey",
                ADA,
                ADA_PASSWORD,
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(svc.snapshot(&bob).await, bob_before);
    assert_eq!(svc.health(&bob_key).await.status, StatusCode::OK);
}

/// A refused createkey (every way it can be refused) writes nothing: no key revoked, no
/// event.
#[tokio::test]
async fn a_refused_createkey_changes_nothing() {
    let svc = memory().await;
    svc.store.add_owner("dis", Some("right")).await.unwrap();
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (_, key) = svc.create(&ada, json!({"name": "keep"})).await;
    let before = svc.snapshot(&ada).await;
    let long = "a".repeat(2000);
    let bodies = vec![
        json!({"username": ADA, "password": "wrong"}).to_string(),
        json!({"username": ADA}).to_string(),
        json!({"username": ADA, "password": ADA_PASSWORD, "extra": 1}).to_string(),
        json!({"username": ADA, "password": null}).to_string(),
        json!({"username": ADA, "password": 5}).to_string(),
        json!({"username": ADA, "password": long}).to_string(),
        json!({"username": [ADA], "password": ADA_PASSWORD}).to_string(),
        json!({"username": "ada ", "password": ADA_PASSWORD}).to_string(),
        json!({"username": "Ada", "password": ADA_PASSWORD}).to_string(),
        format!("{{\"username\": \"{ADA}\", \"password\": \"{ADA_PASSWORD}\""),
        "[]".to_owned(),
        "null".to_owned(),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let reply = svc
            .post_json(&format!("203.0.113.{i}"), "/auth/createkey", body)
            .await;
        assert!(reply.status.is_client_error(), "{body:.60}: {}", reply.body);
        assert!(!reply.body.contains("apiKey"));
    }
    let reply = svc
        .call_from(
            PEER,
            Method::POST,
            "/auth/createkey",
            &[("content-type", "text/plain")],
            json!({"username": ADA, "password": ADA_PASSWORD}).to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let reply = svc
        .call_from(
            PEER,
            Method::GET,
            &format!("/auth/createkey?username={ADA}&password=x"),
            &[],
            "",
        )
        .await;
    assert!(reply.status.is_client_error());
    assert_eq!(svc.snapshot(&ada).await, before);
    assert_eq!(svc.health(&key).await.status, StatusCode::OK);
}

/// Sixteen concurrent createkeys on SQLite (many threads): exactly one working key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_createkeys_leave_one_key_on_sqlite() {
    let store = SqlStore::connect(&scratch_sqlite()).await.unwrap();
    let svc = Arc::new(build(store, 100, 100).await);
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    svc.create(&ada, json!({"name": "before"})).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let svc = Arc::clone(&svc);
        tasks.push(tokio::spawn(async move {
            svc.login(
                &format!("203.0.113.{i}"),
                "/auth/createkey",
                ADA,
                ADA_PASSWORD,
            )
            .await
        }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        keys.push(reply.json()["apiKey"].as_str().unwrap().to_owned());
    }
    let mut working = 0;
    for k in &keys {
        if svc.health(k).await.status == StatusCode::OK {
            working += 1;
        }
    }
    assert_eq!(working, 1);
    let list = svc.call(Method::GET, "/v1/keys", &ada, None).await;
    let active = list.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["status"] == "active")
        .count();
    assert_eq!(active, 1, "{}", list.body);
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

/// Bodies of every odd shape, on every endpoint that reads one: refused with a clear
/// envelope, nothing changed.
#[tokio::test]
async fn odd_bodies_are_refused_and_change_nothing() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, _) = svc.create(&ada, json!({"name": "keep"})).await;
    let before = svc.snapshot(&ada).await;
    let key = format!("/v1/keys/{id}");
    let rotate = format!("{key}/rotate");
    let deep = format!("{}{}", "[".repeat(6000), "]".repeat(6000));
    let deep_obj = format!("{}1{}", "{\"a\":".repeat(3000), "}".repeat(3000));
    let deep_field = format!(
        "{{\"name\":\"x\",\"scopes\":{}{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let bodies: Vec<(&str, String)> =
        vec![
        ("truncated", "{\"name\":".into()),
        ("trailing garbage", "{\"name\":\"x\"} x".into()),
        ("two objects", "{\"name\":\"x\"}{\"name\":\"y\"}".into()),
        ("depth bomb array", deep),
        ("depth bomb object", deep_obj),
        ("depth bomb in field", deep_field),
        ("huge number", "{\"expires_in\": 1e400}".into()),
        ("u64 overflow", "{\"expires_in\": 18446744073709551616}".into()),
        ("negative", "{\"expires_in\": -1}".into()),
        ("float", "{\"expires_in\": 3600.5}".into()),
        ("string number", "{\"expires_in\": \"3600\"}".into()),
        ("lone surrogate", "{\"name\": \"\\ud800\"}".into()),
        ("NaN", "{\"expires_in\": NaN}".into()),
        ("comment", "{/* c */\"name\":\"x\"}".into()),
        ("single quotes", "{'name':'x'}".into()),
        ("bare string", "\"x\"".into()),
        ("null", "null".into()),
        ("empty", String::new()),
        ("BOM", "\u{feff}{\"name\":\"x\"}".into()),
        ("unknown field", "{\"name\":\"x\",\"status\":\"active\"}".into()),
        ("proto", "{\"name\":\"x\",\"__proto__\":{}}".into()),
        ("scopes not list", "{\"name\":\"x\",\"scopes\":\"read\"}".into()),
        ("scopes of numbers", "{\"name\":\"x\",\"scopes\":[1]}".into()),
        ("scopes with null", "{\"name\":\"x\",\"scopes\":[null]}".into()),
        ("rates null item", "{\"name\":\"x\",\"rates\":[null]}".into()),
        (
            "too many scopes",
            json!({"name": "x", "scopes": (0..65).map(|i| format!("s{i}")).collect::<Vec<_>>()})
                .to_string(),
        ),
        ("control char", json!({"name": "a\u{7}b"}).to_string()),
        ("scope with space", json!({"name": "x", "scopes": ["a b"]}).to_string()),
        ("site with comma", json!({"name": "x", "sites": ["a,b"]}).to_string()),
        ("long name", json!({"name": "n".repeat(5000)}).to_string()),
    ];
    let auth = format!("Bearer {ada}");
    for (what, body) in &bodies {
        for (method, path) in [
            (Method::POST, "/v1/keys"),
            (Method::PATCH, key.as_str()),
            (Method::POST, rotate.as_str()),
        ] {
            if what == &"empty" && path == rotate {
                continue; // an empty rotate body with no content type is `{}`
            }
            let reply = svc
                .call_from(
                    PEER,
                    method.clone(),
                    path,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    body.clone(),
                )
                .await;
            assert!(
                matches!(reply.status.as_u16(), 400 | 413 | 415 | 422),
                "{what}: {method} {path}: {} {}",
                reply.status,
                reply.body
            );
            let v = reply.json();
            assert!(v["code"].is_string() && v["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        for path in ["/auth/session", "/auth/createkey"] {
            let reply = svc.post_json("203.0.113.250", path, body).await;
            assert!(
                matches!(reply.status.as_u16(), 400 | 413 | 415 | 422),
                "{what}: {path}: {} {}",
                reply.status,
                reply.body
            );
        }
    }
    // Bytes that are not UTF-8 inside a string.
    for (method, path) in [
        (Method::POST, "/v1/keys"),
        (Method::PATCH, key.as_str()),
        (Method::POST, "/auth/session"),
    ] {
        let reply = svc
            .call_from(
                PEER,
                method.clone(),
                path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                b"{\"name\": \"\xff\xfe\"}".to_vec(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{method} {path}");
    }
    assert_eq!(svc.snapshot(&ada).await, before);
}

/// Content types: `application/json` with parameters and in any case is JSON; anything
/// else is 415.
#[tokio::test]
async fn content_type_variants() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let before = svc.snapshot(&ada).await;
    let auth = format!("Bearer {ada}");
    for ct in [
        "text/plain",
        "text/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/vnd.api+json",
        "application/jsonp",
        "application/json, text/plain",
        "application /json",
        "json",
        "*/*",
        "",
    ] {
        let reply = svc
            .call_from(
                PEER,
                Method::POST,
                "/v1/keys",
                &[("authorization", &auth), ("content-type", ct)],
                json!({"name": "x"}).to_string(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        assert_eq!(reply.code(), "unsupported_media_type");
    }
    assert_eq!(svc.snapshot(&ada).await, before);
    for ct in [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        " application/json ",
    ] {
        let reply = svc
            .call_from(
                PEER,
                Method::POST,
                "/v1/keys",
                &[("authorization", &auth), ("content-type", ct)],
                json!({"name": "x"}).to_string(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{ct:?}: {}", reply.body);
    }
    // A charset that is not UTF-8 is not read as UTF-8 silently.
    let utf16: Vec<u8> = "{\"name\":\"x\"}"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let reply = svc
        .call_from(
            PEER,
            Method::POST,
            "/v1/keys",
            &[
                ("authorization", &auth),
                ("content-type", "application/json; charset=utf-16"),
            ],
            utf16,
        )
        .await;
    assert!(reply.status.is_client_error(), "{}", reply.body);
}

/// 16 KiB exactly is read; one byte more is 413, whether the length is declared or the
/// body comes in chunks; on every endpoint with a body.
#[tokio::test]
async fn bodies_at_the_16_kib_edge() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, _) = svc.create(&ada, json!({"name": "keep"})).await;
    let auth = format!("Bearer {ada}");
    let padded = |inner: &str, size: usize| {
        let pad = size - inner.len();
        format!("{}{inner}", " ".repeat(pad))
    };
    let cases = [
        (
            Method::PATCH,
            format!("/v1/keys/{id}"),
            "{\"name\":\"p\"}".to_owned(),
        ),
        (
            Method::POST,
            format!("/v1/keys/{id}/rotate"),
            "{}".to_owned(),
        ),
        (
            Method::POST,
            "/v1/keys".to_owned(),
            "{\"name\":\"n\"}".to_owned(),
        ),
        (
            Method::POST,
            "/auth/session".to_owned(),
            json!({"username": ADA, "password": ADA_PASSWORD}).to_string(),
        ),
    ];
    for (method, path, inner) in &cases {
        let under = padded(inner, 16 * 1024);
        let over = padded(inner, 16 * 1024 + 1);
        let reply = svc
            .call_from(
                PEER,
                method.clone(),
                path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                under.clone(),
            )
            .await;
        assert!(
            reply.status.is_success(),
            "{method} {path} 16384: {}",
            reply.body
        );
        let reply = svc
            .call_from(
                PEER,
                method.clone(),
                path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                over.clone(),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{method} {path}"
        );
        // Chunked, no length: the same edge.
        for (body, ok) in [(under, true), (over, false)] {
            let bytes = body.into_bytes();
            let (a, b) = bytes.split_at(bytes.len() / 2);
            let chunks = futures_util_stream(vec![a.to_vec(), b.to_vec()]);
            let reply = svc
                .call_from(
                    PEER,
                    method.clone(),
                    path,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    Body::from_stream(chunks),
                )
                .await;
            assert_eq!(
                reply.status.is_success(),
                ok,
                "{method} {path} chunked: {}",
                reply.body
            );
        }
        // A declared length over the limit is refused before reading.
        let req = Request::builder()
            .method(method.clone())
            .uri(path.as_str())
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .header("content-length", "99999999")
            .body(Body::from(inner.clone()))
            .unwrap();
        let reply = svc.raw(PEER, req).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}

fn futures_util_stream(
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

/// Immutable fields in every spelling: refused, nothing written.
#[tokio::test]
async fn immutable_fields_through_odd_spellings() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, _) = svc
        .create(
            &ada,
            json!({"name": "k", "environment": "test", "use_case": "ci"}),
        )
        .await;
    let path = format!("/v1/keys/{id}");
    let before = svc.snapshot(&ada).await;
    let auth = format!("Bearer {ada}");
    let bodies = [
        r#"{"environment":"live"}"#,
        r#"{"environm\u0065nt":"live"}"#,
        r#"{"Environment":"live"}"#,
        r#"{"ENVIRONMENT":"live"}"#,
        r#"{"environment ":"live"}"#,
        r#"{"use_case":"prod"}"#,
        r#"{"useCase":"prod"}"#,
        r#"{"use-case":"prod"}"#,
        r#"{"expires_at":"2099-01-01T00:00:00Z"}"#,
        r#"{"expires_in":1}"#,
        r#"{"expiresAt":null}"#,
        r#"{"id":"key_x"}"#,
        r#"{"prefix":"kg_live_"}"#,
        r#"{"created_at":null}"#,
        r#"{"status":"active"}"#,
        r#"{"owner":"bob"}"#,
        r#"{"owner_id":"x"}"#,
        r#"{"secret":"x"}"#,
        r#"{"hash":"x"}"#,
        r#"{"version":0}"#,
        r#"{"last_used_at":null}"#,
        r#"{"name":"ok","environment":"live"}"#,
        r#"{"environment":"live","name":"ok"}"#,
        r#"{"name":"ok","name":"ok2","environment":"live"}"#,
    ];
    for body in bodies {
        let reply = svc
            .call_from(
                PEER,
                Method::PATCH,
                &path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(
            matches!(reply.code().as_str(), "immutable_field" | "invalid_field"),
            "{body}: {}",
            reply.body
        );
        assert!(reply.json()["data"]["field"].is_string(), "{body}");
    }
    // The real names say `immutable_field`, escaped or not.
    for body in [
        r#"{"environm\u0065nt":"live"}"#,
        r#"{"use_case":"x"}"#,
        r#"{"expires_in":1}"#,
    ] {
        let reply = svc
            .call_from(
                PEER,
                Method::PATCH,
                &path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await;
        assert_eq!(reply.code(), "immutable_field", "{body}");
    }
    assert_eq!(svc.snapshot(&ada).await, before);
}

/// A field sent twice in one object is refused: a proxy, a log or a WAF reading the first
/// must not see another request than the service, which reads the last.
// FINDING: bodies go through `serde_json::Value`, whose map keeps the LAST of duplicate
// keys silently: `{"name":"shown","name":"used"}` makes a key named "used";
// `{"username":"nobody","username":"ada",...}` signs in ada. Parser differential with
// anything in front that reads the first.
#[tokio::test]
async fn duplicate_fields_are_refused() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let before = svc.snapshot(&ada).await;
    let auth = format!("Bearer {ada}");
    let reply = svc
        .call_from(
            PEER,
            Method::POST,
            "/v1/keys",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"name":"shown","name":"used"}"#,
        )
        .await;
    let created = reply.status == StatusCode::CREATED;
    let reply2 = svc
        .post_json(
            "203.0.113.9",
            "/auth/session",
            &format!(r#"{{"username":"nobody","username":"{ADA}","password":"{ADA_PASSWORD}"}}"#),
        )
        .await;
    assert!(!created, "created: {}", reply.body);
    // Refused as a field the body cannot have twice: 422 naming it.
    for (reply, field) in [(&reply, "name"), (&reply2, "username")] {
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            reply.body
        );
        assert_eq!(reply.json()["code"], "invalid_field", "{}", reply.body);
        assert_eq!(reply.json()["data"]["field"], field, "{}", reply.body);
    }
    assert_eq!(svc.snapshot(&ada).await, before);
}

/// `null` for a field is refused like any other wrong type, and a PATCH that changes
/// nothing writes nothing.
// FINDING: every optional field is `Option<T>`, so `null` reads as "absent":
// `PATCH {"name": null}` and `PATCH {}` answer 200 and write an `updated` audit event
// for a change that did not happen; `POST /v1/keys {"name":"x",
// "scopes": null}` is taken as no scopes. The contract says bodies of known, well-typed
// fields only.
#[tokio::test]
async fn nulls_are_refused_and_empty_patches_write_nothing() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, _) = svc.create(&ada, json!({"name": "k"})).await;
    let path = format!("/v1/keys/{id}");
    let before = svc.snapshot(&ada).await;
    let mut statuses = Vec::new();
    for body in [
        json!({"name": null}),
        json!({"description": null}),
        json!({"scopes": null}),
        json!({}),
    ] {
        let reply = svc
            .call(Method::PATCH, &path, &ada, Some(body.clone()))
            .await;
        statuses.push((body.to_string(), reply.status));
    }
    let created = svc
        .call(
            Method::POST,
            "/v1/keys",
            &ada,
            Some(json!({"name": "x", "scopes": null})),
        )
        .await;
    let after = svc.snapshot(&ada).await;
    for (body, status) in &statuses[..3] {
        assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY, "PATCH {body}");
    }
    assert_eq!(
        created.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        created.body
    );
    assert_eq!(after, before, "a no-op PATCH changed the audit trail");
}

/// Query strings: unknown parameters, huge and negative numbers, repeated parameters.
#[tokio::test]
async fn odd_query_strings_are_refused() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    for path in [
        "/v1/keys?limit=99999999999999999999999",
        "/v1/keys?limit=-1",
        "/v1/keys?limit=101",
        "/v1/keys?limit=1e2",
        "/v1/keys?owner=bob",
        "/v1/keys?limit=1&limit=2",
        "/v1/audit?before=-1",
        "/v1/audit?before=99999999999999999999999",
        "/v1/audit?limit=1000",
        "/v1/audit?owner=bob",
        "/v1/audit?key=a&key=b",
    ] {
        let reply = svc.call(Method::GET, path, &ada, None).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {}",
            reply.body
        );
        assert_eq!(reply.code(), "invalid_field", "{path}");
    }
}

// ---------------------------------------------------------------------------------------
// The runtime
// ---------------------------------------------------------------------------------------

/// A failed sign-in does not hold the async runtime while argon2 works: other requests
/// (the API behind keygate, other users' calls) go on meanwhile. On a current-thread
/// runtime a ticker task counts how often it ran during one failed sign-in.
// FINDING: `verify_owner` runs argon2id (19 MiB, tens of ms) inline in the async handler
// (no spawn_blocking anywhere), so every sign-in attempt, even for an unknown user, blocks
// a runtime worker for the whole hash. One address may make 50 attempts at once (its
// hourly budget, taken before the hash): with a few workers the whole server (the
// protected API too) stalls, and each concurrent hash holds 19 MiB.
#[tokio::test(flavor = "current_thread")]
async fn a_sign_in_does_not_block_the_runtime() {
    let svc = build(MemoryStore::new(), 1000, 1000).await;
    let done = Arc::new(AtomicBool::new(false));
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = {
        let done = Arc::clone(&done);
        let ticks = Arc::clone(&ticks);
        async move {
            while !done.load(Ordering::Acquire) {
                ticks.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    };
    let sign_in = async {
        let reply = svc
            .login("203.0.113.1", "/auth/session", "nobody", "whatever")
            .await;
        done.store(true, Ordering::Release);
        reply
    };
    let start = Instant::now();
    let (reply, ()) = tokio::join!(sign_in, ticker);
    let took = start.elapsed();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let n = ticks.load(Ordering::Relaxed);
    println!("RUNTIME: one failed sign-in took {took:?}; other tasks ran {n} times meanwhile");
    assert!(
        n > 100,
        "the runtime was held for the whole hash ({n} ticks in {took:?})"
    );
}

/// The cost of that, measured: latency of the protected API while concurrent failed
/// sign-ins run, on a 2-worker runtime. Printed only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_latency_under_concurrent_sign_ins_is_measured() {
    let svc = Arc::new(build(MemoryStore::new(), 1000, 1000).await);
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (_, key) = svc
        .create(&ada, json!({"name": "k", "rates": ["100000/s"]}))
        .await;
    let mut quiet = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        svc.health(&key).await;
        quiet.push(start.elapsed());
    }
    let left = Arc::new(AtomicU64::new(16));
    let mut attackers = Vec::new();
    for i in 0..16 {
        let svc = Arc::clone(&svc);
        let left = Arc::clone(&left);
        attackers.push(tokio::spawn(async move {
            let reply = svc
                .login("203.0.113.1", "/auth/session", &format!("u{i}"), "x")
                .await;
            left.fetch_sub(1, Ordering::AcqRel);
            reply
        }));
    }
    // Probes of the API, one after another, from worker tasks, while sign-ins are left.
    let mut busy = Vec::new();
    let start = Instant::now();
    while left.load(Ordering::Acquire) > 0 {
        let svc = Arc::clone(&svc);
        let key = key.clone();
        // Timed from the caller: waiting for a free worker counts.
        let asked = Instant::now();
        let status = tokio::spawn(async move { svc.health(&key).await.status })
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        busy.push(asked.elapsed());
    }
    let drained = start.elapsed();
    for a in attackers {
        assert_eq!(a.await.unwrap().status, StatusCode::UNAUTHORIZED);
    }
    let worst = busy.iter().max().copied().unwrap_or_default();
    println!(
        "RUNTIME: /v1/health median {:?} quiet; while 16 failed sign-ins from one address \
         ran on 2 workers ({drained:?}): {} probes, median {:?}, worst {worst:?}",
        median(quiet),
        busy.len(),
        if busy.is_empty() {
            Duration::ZERO
        } else {
            median(busy.clone())
        },
    );
}

// ---------------------------------------------------------------------------------------
// Secrets in output
// ---------------------------------------------------------------------------------------

/// A session token appears only in the response that made it; a key's secret only in
/// its creating (or rotating, or createkey) response; never in an error, a view, the
/// audit trail, or a header.
#[tokio::test]
async fn secrets_and_tokens_appear_once() {
    let svc = memory().await;
    let reply = svc.login(PEER, "/auth/session", ADA, ADA_PASSWORD).await;
    let ada = reply.json()["token"].as_str().unwrap().to_owned();
    let created = svc
        .login(PEER, "/auth/createkey", ADA, ADA_PASSWORD)
        .await
        .json();
    let ck = created["apiKey"].as_str().unwrap().to_owned();
    let ck_id = created["keyId"].as_str().unwrap().to_owned();
    let (id, secret) = svc.create(&ada, json!({"name": "k"})).await;
    let rotated = svc
        .call(
            Method::POST,
            &format!("/v1/keys/{id}/rotate"),
            &ada,
            Some(json!({"grace_seconds": 60})),
        )
        .await
        .json();
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    let mut replies = Vec::new();
    for path in [
        "/v1/keys".to_owned(),
        format!("/v1/keys/{id}"),
        format!("/v1/keys/{ck_id}"),
        "/v1/audit".to_owned(),
        format!("/v1/audit?key={id}"),
        "/swagger/openapi.json".to_owned(),
    ] {
        replies.push(svc.call(Method::GET, &path, &ada, None).await);
    }
    for k in [&secret, &new_secret, &ck] {
        replies.push(svc.testkey(k).await);
        replies.push(svc.health(k).await);
        // Keys and tokens in wrong places: never echoed.
        replies.push(
            svc.call(Method::GET, &format!("/v1/keys/{k}"), &ada, None)
                .await,
        );
        replies.push(
            svc.call(Method::GET, &format!("/v1/audit?key={k}"), &ada, None)
                .await,
        );
        for field in ["expires_in", "environment", "rates", "ips"] {
            replies.push(
                svc.call(
                    Method::POST,
                    "/v1/keys",
                    &ada,
                    Some(json!({"name": "x", field: k})),
                )
                .await,
            );
            replies.push(
                svc.call(
                    Method::POST,
                    "/v1/keys",
                    &ada,
                    Some(json!({"name": "x", field: [k]})),
                )
                .await,
            );
        }
        replies.push(svc.login("203.0.113.5", "/auth/session", k, k).await);
    }
    replies.push(svc.call(Method::GET, "/v1/keys", &secret, None).await);
    replies.push(
        svc.call(
            Method::PATCH,
            &format!("/v1/keys/{id}"),
            &ada,
            Some(json!({"expires_in": ada.clone()})),
        )
        .await,
    );
    replies.push(
        svc.call(
            Method::PATCH,
            &format!("/v1/keys/{id}"),
            &ada,
            Some(json!({"environment": ada.clone()})),
        )
        .await,
    );
    replies.push(
        svc.login(
            "203.0.113.6",
            "/auth/session",
            ADA,
            "expected a wrong password",
        )
        .await,
    );
    replies.push(
        svc.post_json(
            "203.0.113.6",
            "/auth/session",
            &json!({"username": ADA, "password": 5}).to_string(),
        )
        .await,
    );
    replies.push(
        svc.post_json(
            "203.0.113.6",
            "/auth/session",
            &json!({"username": ADA_PASSWORD, "password": ["x"]}).to_string(),
        )
        .await,
    );
    for r in &replies {
        let headers = format!("{:?}", r.headers);
        for s in [&ada, &secret, &new_secret, &ck] {
            let tail = &s[s.len() - 16..];
            assert!(!r.body.contains(tail), "{s:.12} in {}", r.body);
            assert!(!headers.contains(tail), "{s:.12} in headers {headers}");
        }
        assert!(!r.body.contains(ADA_PASSWORD), "{}", r.body);
    }
}

/// Nothing secret in keygate's log at TRACE level during the whole life of a key through
/// the service: passwords, session tokens, secrets (in process, this thread's log).
#[tokio::test(flavor = "current_thread")]
async fn nothing_secret_in_the_log_at_trace() {
    use tracing_subscriber::fmt::MakeWriter;
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);
    struct W(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for W {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Capture {
        type Writer = W;
        fn make_writer(&'a self) -> W {
            W(Arc::clone(&self.0))
        }
    }
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_ansi(false)
        .with_writer(capture.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let ck = svc
        .login(PEER, "/auth/createkey", ADA, ADA_PASSWORD)
        .await
        .json()["apiKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let (id, secret) = svc.create(&ada, json!({"name": "k"})).await;
    let rotated = svc
        .call(
            Method::POST,
            &format!("/v1/keys/{id}/rotate"),
            &ada,
            Some(json!({"grace_seconds": 60})),
        )
        .await
        .json()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    for k in [&ck, &secret, &rotated, &ada] {
        svc.testkey(k).await;
        svc.health(k).await;
    }
    svc.login(PEER, "/auth/session", ADA, "a wrong password")
        .await;
    svc.login(PEER, "/auth/session", &ada, &secret).await;
    svc.call(Method::GET, "/v1/keys", &secret, None).await;
    svc.store.flush_usage().await.unwrap();
    let log = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(!log.is_empty());
    for s in [&ada, &ck, &secret, &rotated] {
        let tail = &s[s.len() - 16..];
        assert!(!log.contains(tail), "{s:.12} in the log");
    }
    for p in [ADA_PASSWORD, "a wrong password"] {
        assert!(!log.contains(p), "a password in the log");
    }
}

/// The quickstart at `RUST_LOG=debug` (everything, not only keygate): its log holds no
/// password, session token or secret after the whole service has been used.
#[tokio::test]
async fn the_quickstart_log_at_debug_holds_no_secret() {
    let q = common::example("quickstart", &[("RUST_LOG", "trace")]).await;
    let password = q.vars["OWNER_PASSWORD"].clone();
    let full = q.vars["KEY_FULL"].clone();
    let a = q.addr;
    let body = json!({"username": "demo", "password": password}).to_string();
    let json_ct = [("content-type", "application/json")];
    let r = common::send(a, Method::POST, "/auth/session", &json_ct, &body).await;
    let token = r.json()["token"].as_str().unwrap().to_owned();
    let r = common::send(a, Method::POST, "/auth/createkey", &json_ct, &body).await;
    let created = r.json()["apiKey"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");
    let r = common::send(
        a,
        Method::POST,
        "/v1/keys",
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        r#"{"name":"n"}"#,
    )
    .await;
    let secret = r.json()["secret"].as_str().unwrap().to_owned();
    for k in [&created, &secret, &full, &token] {
        common::send(a, Method::GET, "/auth/testkey", &[("x-api-key", k)], "").await;
        common::send(a, Method::GET, "/v1/health", &[("x-api-key", k)], "").await;
    }
    common::send(
        a,
        Method::GET,
        "/v1/keys",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    let wrong = json!({"username": "demo", "password": "a wrong password"}).to_string();
    common::send(a, Method::POST, "/auth/session", &json_ct, &wrong).await;
    // The log is read from a pipe: the last request's lines follow promptly, and the
    // checks below only look for what must NOT be there.
    let log = q.log();
    for s in [&token, &created, &secret] {
        let tail = &s[s.len() - 16..];
        assert!(!log.contains(tail), "{s:.12} in the quickstart's log");
    }
    assert!(!log.contains(&password), "the owner password in the log");
    assert!(!log.contains("a wrong password"));
}

// ---------------------------------------------------------------------------------------
// The dashboard
// ---------------------------------------------------------------------------------------

/// The dashboard never turns data into markup: no HTML sink in its script, every value
/// set as text; and its policy forbids scripts other than its own.
#[tokio::test]
async fn the_dashboard_has_no_html_sink_for_data() {
    let svc = memory().await;
    let reply = svc
        .call_from(PEER, Method::GET, "/dashboard", &[], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let page = &reply.body;
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "setTimeout(\"",
        "javascript:",
        ".href =",
        ".src =",
        "createContextualFragment",
        "DOMParser",
        "srcdoc",
    ] {
        assert!(!page.contains(sink), "the dashboard uses {sink}");
    }
    let h = &reply.headers;
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-store");
    let csp = h["content-security-policy"].to_str().unwrap();
    for d in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    ] {
        assert!(csp.contains(d), "{csp}");
    }
}

/// The dashboard's Content-Security-Policy allows its own script only (by hash or nonce),
/// not any inline script.
// FINDING: the policy is `script-src 'unsafe-inline'` (the handler's doc comment says "its
// script allowed by hash"): any markup that ever reaches the page (a future innerHTML, a
// browser extension's injection, an HTML-injection bug) runs as script with the session
// token in reach. A `'sha256-…'` of the one inline script is enough.
#[tokio::test]
async fn the_dashboard_csp_allows_only_its_own_script() {
    let svc = memory().await;
    let reply = svc
        .call_from(PEER, Method::GET, "/dashboard", &[], "")
        .await;
    let csp = reply.headers["content-security-policy"].to_str().unwrap();
    let script_src = csp
        .split(';')
        .map(str::trim)
        .find(|d| d.starts_with("script-src"))
        .unwrap_or("");
    assert!(!script_src.contains("'unsafe-inline'"), "{csp}");
    assert!(
        script_src.contains("'sha256-") || script_src.contains("'nonce-"),
        "{csp}"
    );
}

/// Keys whose every free-text field is markup or script go through the API unchanged
/// (JSON-escaped, `application/json`, `nosniff`-safe content type) and the dashboard's
/// rendering code sets them as text only.
#[tokio::test]
async fn markup_in_key_fields_stays_data() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let xss = "<img src=x onerror=alert(1)></td><script>alert(2)</script>";
    let word = "\"><svg/onload=alert(3)>";
    let reply = svc
        .call(
            Method::POST,
            "/v1/keys",
            &ada,
            Some(json!({"name": xss, "description": xss, "use_case": xss,
                        "scopes": [word], "sites": [word]})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let created = reply.json();
    let view = &created["key"];
    assert_eq!(view["name"], xss, "{}", reply.body);
    assert_eq!(view["scopes"], json!([word]));
    let list = svc.call(Method::GET, "/v1/keys", &ada, None).await;
    assert!(list.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    // testkey shows the name to whoever holds the key: JSON too.
    let secret = reply.json()["secret"].as_str().unwrap().to_owned();
    let t = svc.testkey(&secret).await;
    assert!(t.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    // (Refused here for its site list; the refusal does not echo the key's fields.)
    assert!(!t.body.contains("<"), "{}", t.body);
}

/// Unknown routes and wrong methods under the service answer in its envelope (the
/// contract: all JSON), and never act.
// FINDING (low): axum's own 404 (a trailing slash, `/v1/keys/ID/x`) and 405 (`PUT
// /v1/keys/ID`) come back with an empty body, outside the `{"code","message","data"}`
// contract: clients and the dashboard see "HTTP 404" with no code.
#[tokio::test]
async fn unrouted_requests_answer_in_the_envelope() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, _) = svc.create(&ada, json!({"name": "k"})).await;
    // A known path with another method: 405 in the envelope, with `Allow`.
    for (method, path, allow) in [
        (Method::PUT, format!("/v1/keys/{id}"), "GET,PATCH,DELETE"),
        (Method::POST, "/v1/audit".to_owned(), "GET,HEAD"),
        (Method::GET, "/auth/session".to_owned(), "POST"),
    ] {
        let reply = svc.call(method.clone(), &path, &ada, None).await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        let v: Value = serde_json::from_str(&reply.body)
            .unwrap_or_else(|_| panic!("{method} {path}: {} {:?}", reply.status, reply.body));
        assert_eq!(v["code"], "method_not_allowed", "{method} {path}");
        let sent: Vec<String> = reply.headers["allow"]
            .to_str()
            .unwrap()
            .split(',')
            .map(|m| m.trim().to_owned())
            .collect();
        for m in allow.split(',') {
            assert!(
                sent.iter().any(|s| s == m),
                "{method} {path}: Allow {sent:?}"
            );
        }
    }
    // An unknown path is the application's: the service does not claim it, so the app's
    // own fallback (behind keygate, in the quickstart) answers.
    let app = svc
        .router
        .clone()
        .fallback(|| async { (StatusCode::NOT_FOUND, "the app's fallback") });
    for path in [
        format!("/v1/keys/{id}/"),
        format!("/v1/keys/{id}/x"),
        "/v1/keys/".to_owned(),
    ] {
        let req = http::Request::get(&path)
            .header("authorization", format!("Bearer {ada}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let res = tower::ServiceExt::oneshot(app.clone(), req).await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
    }
}

// ---------------------------------------------------------------------------------------
// testkey oracles
// ---------------------------------------------------------------------------------------

/// testkey for an unknown key and for a deleted one read alike (and are timed); for a
/// revoked or disabled one the holder learns the state, which they could learn from the
/// API anyway.
#[tokio::test]
async fn testkey_unknown_and_deleted_read_alike() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let (id, deleted) = svc.create(&ada, json!({"name": "d"})).await;
    svc.call(Method::DELETE, &format!("/v1/keys/{id}"), &ada, None)
        .await;
    let (id2, revoked) = svc.create(&ada, json!({"name": "r"})).await;
    let _ = id2;
    svc.login(PEER, "/auth/createkey", ADA, ADA_PASSWORD).await; // revokes r
                                                                 // An unknown key of the same shape as a real one.
    let mut unknown: Vec<char> = deleted.chars().collect();
    let n = unknown.len();
    for c in &mut unknown[n - 10..] {
        *c = if *c == 'A' { 'B' } else { 'A' };
    }
    let unknown: String = unknown.into_iter().collect();
    let a = svc.testkey(&unknown).await;
    let b = svc.testkey(&deleted).await;
    assert_eq!(a.shape(), b.shape());
    let c = svc.testkey(&revoked).await;
    println!(
        "TESTKEY codes: unknown {} / deleted {} / revoked {}",
        a.code(),
        b.code(),
        c.code()
    );
    let mut t = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..200 {
        for (i, k) in [&unknown, &deleted, &revoked].into_iter().enumerate() {
            let start = Instant::now();
            svc.testkey(k).await;
            t[i].push(start.elapsed());
        }
    }
    let [t0, t1, t2] = t;
    println!(
        "TIMING /auth/testkey (median of 200): unknown {:?}, deleted {:?}, revoked {:?}",
        median(t0),
        median(t1),
        median(t2)
    );
}

/// An owner's audit trail tells nothing of other owners' activity.
// FINDING (low): audit event ids are one global sequence shared by every owner, and each
// owner sees the ids of their own events: the gap between two of Ada's events is exactly
// how many lifecycle events all other tenants caused meanwhile (a tenant-activity side
// channel). Per-owner or opaque cursors would close it.
#[tokio::test]
async fn audit_ids_do_not_count_other_owners_events() {
    let svc = memory().await;
    let ada = svc.sign_in(ADA, ADA_PASSWORD).await;
    let bob = svc.sign_in(BOB, BOB_PASSWORD).await;
    svc.create(&ada, json!({"name": "a1"})).await;
    for i in 0..7 {
        svc.create(&bob, json!({"name": format!("b{i}")})).await;
    }
    svc.create(&ada, json!({"name": "a2"})).await;
    let audit = svc.call(Method::GET, "/v1/audit", &ada, None).await.json();
    let ids: Vec<String> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "created")
        .map(|e| e["id"].as_str().expect("an opaque string id").to_owned())
        .collect();
    assert_eq!(ids.len(), 2);
    // Opaque: 16 hex digits that neither count nor order anything a client can read.
    for id in &ids {
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    // And still a cursor: one event a page, newest first, then the end.
    let first = svc
        .call(Method::GET, "/v1/audit?limit=1", &ada, None)
        .await
        .json();
    assert_eq!(first["events"][0]["id"], ids[0].as_str());
    let next = first["next"].as_str().unwrap().to_owned();
    let second = svc
        .call(
            Method::GET,
            &format!("/v1/audit?limit=1&before={next}"),
            &ada,
            None,
        )
        .await
        .json();
    assert_eq!(second["events"][0]["id"], ids[1].as_str());
    // A made-up cursor is refused, not read as a number.
    let reply = svc
        .call(
            Method::GET,
            "/v1/audit?before=18446744073709551615",
            &ada,
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// Lockout by a stranger: spending a username's sign-in budget from other addresses locks
/// the owner out only of addresses she never signed in from.
#[tokio::test]
async fn a_stranger_cannot_lock_the_owner_out_of_her_usual_address() {
    let svc = memory().await;
    let home = "198.51.100.77";
    let ok = svc.login(home, "/auth/session", ADA, ADA_PASSWORD).await;
    assert_eq!(ok.status, StatusCode::OK);
    for i in 0..40 {
        let ip = format!("203.0.113.{}", 100 + i);
        svc.login(&ip, "/auth/session", ADA, "guess").await;
    }
    let stranger = svc
        .login("203.0.113.250", "/auth/session", ADA, ADA_PASSWORD)
        .await;
    assert_eq!(
        stranger.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        stranger.body
    );
    let again = svc.login(home, "/auth/createkey", ADA, ADA_PASSWORD).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
}
