//! OAuth2 client credentials (RFC 6749 §4.4, §2.3.1, §5), revocation (RFC 7009) and
//! introspection (RFC 7662) through the key service, the self-revoke endpoint and GitHub's
//! leak alerts: in process over the memory store, and over a real socket with the `oauth2`
//! crate, a client no one here wrote.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::Router;
use base64::Engine as _;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use keygate::clock::FakeClock;
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::ratelimit::Quota;
use keygate::service::{KeyService, LeakReport};
use keygate::store::{AuditQuery, ClientStore, KeyStore, MemoryStore, NewClient, OwnerStore};
use keygate::validate::PeerAddr;
use keygate::Keygate;
use serde_json::{json, Value};
use tower::ServiceExt;

const ADA_PASSWORD: &str = "correct horse battery staple";

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
}

struct Server {
    app: Router,
    store: MemoryStore,
    clock: FakeClock,
    client_id: String,
    client_secret: String,
    leaks: Arc<Mutex<Vec<LeakReport>>>,
    signing: p256::ecdsa::SigningKey,
}

fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

async fn server_with(body_credentials: bool) -> Server {
    let store = MemoryStore::new();
    store.add_owner("ada", Some(ADA_PASSWORD)).await.unwrap();
    store
        .add_owner("bob", Some("bob's password"))
        .await
        .unwrap();
    let mut client = NewClient::new("ada", "reports");
    client.scopes = ["read", "reports:write"].into_iter().collect();
    let created = store.create_client(client).await.unwrap();
    let clock = FakeClock::new(SystemTime::now());
    let keygate = Keygate::builder(
        CachedLookup::builder(store.clone())
            .clock(clock.clone())
            .build_over_store()
            .unwrap(),
    )
    .clock(clock.clone())
    .default_quota(Quota::parse("60/min").unwrap())
    .build()
    .unwrap();
    let signing = p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let pem = p256::pkcs8::EncodePublicKey::to_public_key_pem(
        signing.verifying_key(),
        p256::pkcs8::LineEnding::LF,
    )
    .unwrap();
    let keys =
        json!({"public_keys": [{"key_identifier": "test-key-1", "key": pem, "is_current": true}]});
    let leaks = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&leaks);
    let service = KeyService::builder(store.clone())
        .clock(clock.clone())
        .oauth_body_credentials(body_credentials)
        .oauth_token_quotas([Quota::parse("3/min").unwrap()])
        .github_public_keys(keys.to_string())
        .on_leak(move |report| seen.lock().unwrap().push(report.clone()))
        .login_limits(
            Quota::parse("5/hour").unwrap(),
            Quota::parse("50/hour").unwrap(),
        )
        .build()
        .unwrap();
    let api = Router::new()
        .route("/v1/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/v1/reports",
            axum::routing::post(|| async { "made" })
                .route_layer(keygate.route().scopes(["reports:write"]).build().unwrap()),
        )
        .layer(keygate);
    Server {
        app: api.merge(service),
        store,
        clock,
        client_id: created.client.id.clone(),
        client_secret: created.secret.expose_secret().to_owned(),
        leaks,
        signing,
    }
}

async fn server() -> Server {
    server_with(false).await
}

impl Server {
    async fn send(&self, ip: &str, req: Request<Body>) -> Reply {
        let mut req = req;
        let ip: IpAddr = ip.parse().unwrap();
        req.extensions_mut()
            .insert(PeerAddr(SocketAddr::new(ip, 40_000)));
        let res = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn form(&self, path: &str, auth: Option<&str>, form: &str) -> Reply {
        let mut req =
            Request::post(path).header("content-type", "application/x-www-form-urlencoded");
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        self.send(
            "198.51.100.1",
            req.body(Body::from(form.to_owned())).unwrap(),
        )
        .await
    }

    fn basic(&self) -> String {
        basic(&self.client_id, &self.client_secret)
    }

    async fn token(&self, scope: Option<&str>) -> String {
        let form = match scope {
            Some(s) => format!(
                "grant_type=client_credentials&scope={}",
                s.replace(' ', "+")
            ),
            None => "grant_type=client_credentials".to_owned(),
        };
        let reply = self.form("/oauth/token", Some(&self.basic()), &form).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.json()["access_token"].as_str().unwrap().to_owned()
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        self.send(
            "198.51.100.9",
            Request::get(path)
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }
}

fn code(reply: &Reply) -> String {
    reply.json()["code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_client_gets_a_token_the_layers_accept() {
    let s = server().await;
    let reply = s
        .form(
            "/oauth/token",
            Some(&s.basic()),
            "grant_type=client_credentials&scope=read",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert_eq!(reply.headers["pragma"], "no-cache");
    let v = reply.json();
    assert_eq!(v["token_type"], "bearer");
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(v["scope"], "read");
    assert!(
        v.get("refresh_token").is_none(),
        "no refresh token (§4.4.3)"
    );
    let token = v["access_token"].as_str().unwrap();
    assert_eq!(s.get("/v1/health", token).await.status, StatusCode::OK);
    // The granted scopes, not the client's: `reports:write` was not asked for.
    let reply = s
        .send(
            "198.51.100.9",
            Request::post("/v1/reports")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(code(&reply), "insufficient_scope");
    // Without `scope`, every scope of the client.
    let all = s.token(None).await;
    let reply = s
        .send(
            "198.51.100.9",
            Request::post("/v1/reports")
                .header("authorization", format!("Bearer {all}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // An hour later the token is expired, and says so.
    s.clock.advance(Duration::from_secs(3600));
    let reply = s.get("/v1/health", token).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(code(&reply), "api_key_expired");
    // Tokens are not the owner's keys: the management list does not show them.
    let session = s
        .send(
            "198.51.100.1",
            Request::post("/auth/session")
                .header("content-type", "application/json")
                .body(Body::from(
                    json!({"username": "ada", "password": ADA_PASSWORD}).to_string(),
                ))
                .unwrap(),
        )
        .await;
    let session = session.json()["token"].as_str().unwrap().to_owned();
    let list = s.get("/v1/keys", &session).await;
    assert_eq!(list.json()["keys"], json!([]), "{}", list.body);
}

#[tokio::test]
async fn every_error_of_section_5_2() {
    let s = server().await;
    let good = s.basic();
    let wrong = basic(&s.client_id, "kgcs_wrong");
    let cases: Vec<(&str, Option<&str>, &str, StatusCode, &str)> = vec![
        (
            "no grant_type",
            Some(&good),
            "scope=read",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "a parameter twice",
            Some(&good),
            "grant_type=client_credentials&grant_type=client_credentials",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "Basic and the body",
            Some(&good),
            "grant_type=client_credentials&client_id=x&client_secret=y",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "a wrong secret",
            Some(&wrong),
            "grant_type=client_credentials",
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "no authentication",
            None,
            "grant_type=client_credentials",
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "credentials in the body, not enabled",
            None,
            "grant_type=client_credentials&client_id=a&client_secret=b",
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "another grant",
            Some(&good),
            "grant_type=password&username=a&password=b",
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            "a scope the client lacks",
            Some(&good),
            "grant_type=client_credentials&scope=read+admin",
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
    ];
    for (what, auth, form, status, error) in cases {
        let reply = s.form("/oauth/token", auth, form).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.body);
        assert_eq!(reply.json()["error"], error, "{what}");
        assert!(reply.json()["error_description"].is_string(), "{what}");
        assert_eq!(reply.headers["cache-control"], "no-store", "{what}");
        if error == "invalid_client" && auth.is_some() {
            assert!(
                reply.headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Basic"),
                "{what}"
            );
        }
    }
    // A client with no scope at all may not use the grant.
    let bare = s
        .store
        .create_client(NewClient::new("ada", "bare"))
        .await
        .unwrap();
    let reply = s
        .form(
            "/oauth/token",
            Some(&basic(&bare.client.id, bare.secret.expose_secret())),
            "grant_type=client_credentials",
        )
        .await;
    assert_eq!(
        reply.json()["error"],
        "unauthorized_client",
        "{}",
        reply.body
    );
    // Not a form.
    let reply = s
        .send(
            "198.51.100.1",
            Request::post("/oauth/token")
                .header("authorization", &good)
                .header("content-type", "application/json")
                .body(Body::from("{\"grant_type\":\"client_credentials\"}"))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.json()["error"], "invalid_request");
    // Nothing was issued by any of these: only the successful call below makes a key.
    let keys = s.store.list("ada", Default::default()).await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn credentials_in_the_body_when_enabled_never_both() {
    let s = server_with(true).await;
    let form = format!(
        "grant_type=client_credentials&client_id={}&client_secret={}",
        s.client_id, s.client_secret
    );
    let reply = s.form("/oauth/token", None, &form).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let reply = s.form("/oauth/token", Some(&s.basic()), &form).await;
    assert_eq!(reply.json()["error"], "invalid_request");
    // A wrong secret in the body: 401, and no Basic challenge (Basic was not tried).
    let form = format!(
        "grant_type=client_credentials&client_id={}&client_secret=nope",
        s.client_id
    );
    let reply = s.form("/oauth/token", None, &form).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(!reply.headers.contains_key("www-authenticate"));
}

#[tokio::test]
async fn failed_client_authentications_are_limited() {
    let s = server().await;
    let wrong = basic(&s.client_id, "kgcs_guess");
    for _ in 0..5 {
        let reply = s
            .form(
                "/oauth/token",
                Some(&wrong),
                "grant_type=client_credentials",
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    // The client's budget is spent: refused before the secret is checked, even the right one
    // from another address.
    let reply = s
        .send(
            "203.0.113.50",
            Request::post("/oauth/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("authorization", s.basic())
                .body(Body::from("grant_type=client_credentials"))
                .unwrap(),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.body
    );
    assert!(reply.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn every_token_of_a_client_shares_its_budget() {
    let s = server().await;
    let a = s.token(None).await;
    let b = s.token(None).await;
    let mut statuses = Vec::new();
    for token in [&a, &b, &a, &b] {
        statuses.push(s.get("/v1/health", token).await.status.as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "3 a minute for the client, not per token"
    );
}

#[tokio::test]
async fn revocation_per_rfc_7009() {
    let s = server().await;
    let token = s.token(None).await;
    let other = s
        .store
        .create_client({
            let mut c = NewClient::new("bob", "bob's");
            c.scopes = ["read"].into_iter().collect();
            c
        })
        .await
        .unwrap();
    let bob = basic(&other.client.id, other.secret.expose_secret());
    // Another client cannot revoke it, and is told nothing.
    let reply = s
        .form("/oauth/revoke", Some(&bob), &format!("token={token}"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(s.get("/v1/health", &token).await.status, StatusCode::OK);
    // Unknown tokens: 200 too.
    let reply = s
        .form(
            "/oauth/revoke",
            Some(&s.basic()),
            "token=kg_live_nothing&token_type_hint=access_token",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // Its own client revokes it: refused at once.
    let reply = s
        .form(
            "/oauth/revoke",
            Some(&s.basic()),
            &format!("token={token}&token_type_hint=refresh_token"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(code(&s.get("/v1/health", &token).await), "invalid_api_key");
    // Without client authentication: refused.
    let reply = s
        .form("/oauth/revoke", None, &format!("token={token}"))
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Without a token: invalid_request.
    let reply = s.form("/oauth/revoke", Some(&s.basic()), "").await;
    assert_eq!(reply.json()["error"], "invalid_request");
}

#[tokio::test]
async fn introspection_per_rfc_7662() {
    let s = server().await;
    let token = s.token(Some("read")).await;
    let reply = s
        .form(
            "/oauth/introspect",
            Some(&s.basic()),
            &format!("token={token}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["cache-control"], "no-store");
    let v = reply.json();
    assert_eq!(v["active"], true);
    assert_eq!(v["scope"], "read");
    assert_eq!(v["client_id"], s.client_id.as_str());
    assert_eq!(v["token_type"], "bearer");
    let (exp, iat) = (v["exp"].as_u64().unwrap(), v["iat"].as_u64().unwrap());
    assert!(exp > iat && exp - iat <= 3601, "{v}");
    let inactive = json!({"active": false});
    // Unknown, an API key, another client's view, revoked, expired: all the same answer.
    let key = s
        .store
        .create(keygate::store::NewKey::new(
            "ada",
            "plain key",
            keygate::key::Environment::Live,
        ))
        .await
        .unwrap();
    for probe in ["kg_live_unknown", key.secret.expose_secret()] {
        let reply = s
            .form(
                "/oauth/introspect",
                Some(&s.basic()),
                &format!("token={probe}"),
            )
            .await;
        assert_eq!(reply.json(), inactive);
    }
    let other = s
        .store
        .create_client({
            let mut c = NewClient::new("bob", "bob's");
            c.scopes = ["read"].into_iter().collect();
            c
        })
        .await
        .unwrap();
    let reply = s
        .form(
            "/oauth/introspect",
            Some(&basic(&other.client.id, other.secret.expose_secret())),
            &format!("token={token}"),
        )
        .await;
    assert_eq!(reply.json(), inactive);
    let later = s.token(None).await;
    s.clock.advance(Duration::from_secs(3600));
    let reply = s
        .form(
            "/oauth/introspect",
            Some(&s.basic()),
            &format!("token={later}"),
        )
        .await;
    assert_eq!(reply.json(), inactive);
    s.form("/oauth/revoke", Some(&s.basic()), &format!("token={token}"))
        .await;
    let reply = s
        .form(
            "/oauth/introspect",
            Some(&s.basic()),
            &format!("token={token}"),
        )
        .await;
    assert_eq!(reply.json(), inactive);
}

#[tokio::test]
async fn revoking_a_client_ends_its_tokens() {
    let s = server().await;
    let token = s.token(None).await;
    s.store.revoke_client(&s.client_id).await.unwrap();
    assert_eq!(code(&s.get("/v1/health", &token).await), "invalid_api_key");
    let reply = s
        .form(
            "/oauth/token",
            Some(&s.basic()),
            "grant_type=client_credentials",
        )
        .await;
    assert_eq!(reply.json()["error"], "invalid_client");
}

/// A token request removes the client's tokens that expired over a day ago, and only those.
#[tokio::test]
async fn a_token_request_purges_tokens_expired_over_a_day_ago() {
    let s = server().await;
    let found = |token: String| {
        let store = s.store.clone();
        async move {
            store
                .lookup(&keygate::key::PresentedKey::new(&token))
                .await
                .unwrap()
                .is_some()
        }
    };
    let first = s.token(None).await; // expires at 1h
    s.clock.advance(Duration::from_secs(3600));
    let second = s.token(None).await; // expires at 2h
    s.clock.advance(Duration::from_secs(24 * 3600 + 60));
    assert!(found(first.clone()).await && found(second.clone()).await);
    let third = s.token(None).await; // at 25h01m: the first expired over a day ago
    assert!(!found(first).await, "the first token is purged");
    assert!(
        found(second).await,
        "the second expired less than a day ago"
    );
    assert!(found(third).await);
}

#[tokio::test]
async fn anyone_holding_a_key_can_kill_it() {
    let s = server().await;
    let key = s
        .store
        .create(keygate::store::NewKey::new(
            "ada",
            "leaky",
            keygate::key::Environment::Live,
        ))
        .await
        .unwrap();
    let secret = key.secret.expose_secret().to_owned();
    assert_eq!(s.get("/v1/health", &secret).await.status, StatusCode::OK);
    let revoke = |body: String| {
        Request::post("/v1/keys/revoke")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    let known = s
        .send("203.0.113.5", revoke(json!({"key": secret}).to_string()))
        .await;
    let unknown = s
        .send(
            "203.0.113.6",
            revoke(json!({"key": "kg_live_nobody"}).to_string()),
        )
        .await;
    // The same answer either way.
    assert_eq!((known.status, &known.body), (StatusCode::OK, &unknown.body));
    assert_eq!(known.json(), json!({"revoked": true}));
    assert_eq!(code(&s.get("/v1/health", &secret).await), "invalid_api_key");
    let events = s
        .store
        .audit(AuditQuery::default().with_key(key.record.id.clone()))
        .await
        .unwrap();
    assert_eq!(events[0].actor, "self-revoke");
    assert_eq!(events[0].ip, Some("203.0.113.5".parse().unwrap()));
    // Guessing is limited per address like failed sign-ins (50 an hour here).
    let mut last = StatusCode::OK;
    for i in 0..60 {
        last = s
            .send(
                "192.0.2.1",
                revoke(json!({"key": format!("kg_live_guess{i}")}).to_string()),
            )
            .await
            .status;
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
}

fn sign(key: &p256::ecdsa::SigningKey, body: &[u8]) -> String {
    use p256::ecdsa::signature::Signer as _;
    let signature: p256::ecdsa::Signature = key.sign(body);
    base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
}

#[tokio::test]
async fn a_github_leak_alert_revokes_the_key() {
    let s = server().await;
    let key = s
        .store
        .create(keygate::store::NewKey::new(
            "ada",
            "pushed to github",
            keygate::key::Environment::Live,
        ))
        .await
        .unwrap();
    let secret = key.secret.expose_secret().to_owned();
    let body = json!([
        {"token": secret, "type": "keygate_api_key", "url": "https://github.com/o/r/blob/x/.env", "source": "content"},
        {"token": "kg_live_notakey", "type": "keygate_api_key", "url": "", "source": "commit"},
    ])
    .to_string();
    let alert = |identifier: &str, signature: Option<String>, body: &str| {
        let mut req = Request::post("/v1/keys/leaked")
            .header("content-type", "application/json")
            .header("github-public-key-identifier", identifier);
        if let Some(signature) = signature {
            req = req.header("github-public-key-signature", signature);
        }
        req.body(Body::from(body.to_owned())).unwrap()
    };
    // Unsigned, signed by another key, signed over other bytes, an unknown key id: 401, and
    // the key keeps working.
    let stranger = p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    for (identifier, signature) in [
        ("test-key-1", None),
        ("test-key-1", Some(sign(&stranger, body.as_bytes()))),
        (
            "test-key-1",
            Some(sign(&s.signing, format!("{body} ").as_bytes())),
        ),
        ("another-key", Some(sign(&s.signing, body.as_bytes()))),
        ("test-key-1", Some("bm90IGEgc2lnbmF0dXJl".to_owned())),
    ] {
        let reply = s
            .send("140.82.115.1", alert(identifier, signature, &body))
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.body);
        assert_eq!(code(&reply), "invalid_signature");
    }
    assert_eq!(s.get("/v1/health", &secret).await.status, StatusCode::OK);
    assert!(s.leaks.lock().unwrap().is_empty());
    // Signed: the key is revoked, the report recorded and handed to the hook, and GitHub
    // gets its partner feedback.
    let reply = s
        .send(
            "140.82.115.1",
            alert("test-key-1", Some(sign(&s.signing, body.as_bytes())), &body),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let feedback = reply.json();
    assert_eq!(
        feedback,
        json!([
            {"token_hash": keygate::key::KeyHash::of(&secret).to_hex(), "token_type": "keygate_api_key", "label": "true_positive"},
            {"token_hash": keygate::key::KeyHash::of("kg_live_notakey").to_hex(), "token_type": "keygate_api_key", "label": "false_positive"},
        ])
    );
    assert!(!reply.body.contains(&secret));
    assert_eq!(code(&s.get("/v1/health", &secret).await), "invalid_api_key");
    let events = s
        .store
        .audit(AuditQuery::default().with_key(key.record.id.clone()))
        .await
        .unwrap();
    let actions: Vec<String> = events.iter().map(|e| e.action.to_string()).collect();
    assert!(actions.contains(&"leak_reported".to_owned()), "{actions:?}");
    assert!(actions.contains(&"revoked".to_owned()), "{actions:?}");
    assert!(events
        .iter()
        .filter(|e| e.action.to_string() != "created")
        .all(|e| e.actor == "github-secret-scanning"));
    assert_eq!(events[0].new_status, Some(keygate::record::Status::Revoked));
    let leaks = s.leaks.lock().unwrap().clone();
    assert_eq!(leaks.len(), 1);
    assert_eq!(leaks[0].key_id, key.record.id);
    assert_eq!(leaks[0].owner.as_deref(), Some("ada"));
    assert_eq!(leaks[0].url, "https://github.com/o/r/blob/x/.env");
    assert!(leaks[0].revoked_now);
    // Reported again: still a true positive, not revoked again.
    let reply = s
        .send(
            "140.82.115.1",
            alert("test-key-1", Some(sign(&s.signing, body.as_bytes())), &body),
        )
        .await;
    assert_eq!(reply.json()[0]["label"], "true_positive");
    assert!(!s.leaks.lock().unwrap()[1].revoked_now);
    // Every report is in the audit trail, the second as well.
    let reports = s
        .store
        .audit(AuditQuery::default().with_key(key.record.id.clone()))
        .await
        .unwrap()
        .iter()
        .filter(|e| e.action.to_string() == "leak_reported")
        .count();
    assert_eq!(reports, 2);
    // A signed body that is not an alert: 400.
    let reply = s
        .send(
            "140.82.115.1",
            alert("test-key-1", Some(sign(&s.signing, b"{}")), "{}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn clients_through_the_management_api() {
    let s = server().await;
    let sign_in = |user: &str, password: &str| {
        Request::post("/auth/session")
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"username": user, "password": password}).to_string(),
            ))
            .unwrap()
    };
    let ada = s
        .send("198.51.100.1", sign_in("ada", ADA_PASSWORD))
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bob = s
        .send("198.51.100.2", sign_in("bob", "bob's password"))
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let create = Request::post("/v1/clients")
        .header("authorization", format!("Bearer {ada}"))
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"name": "ci", "scopes": ["read"]}).to_string(),
        ))
        .unwrap();
    let reply = s.send("198.51.100.1", create).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let id = reply.json()["client"]["id"].as_str().unwrap().to_owned();
    let secret = reply.json()["client_secret"].as_str().unwrap().to_owned();
    let list = s.get("/v1/clients", &ada).await;
    assert!(
        list.body.contains(&id) && !list.body.contains(&secret),
        "{}",
        list.body
    );
    assert!(!s.get("/v1/clients", &bob).await.body.contains(&id));
    // Bob cannot revoke it: 404, like an unknown id.
    let delete = |token: &str, id: &str| {
        Request::delete(format!("/v1/clients/{id}"))
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    let theirs = s.send("198.51.100.2", delete(&bob, &id)).await;
    let nobody = s.send("198.51.100.2", delete(&bob, "kgc_nobody")).await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);
    assert_eq!(theirs.body, nobody.body);
    let token = {
        let reply = s
            .form(
                "/oauth/token",
                Some(&basic(&id, &secret)),
                "grant_type=client_credentials",
            )
            .await;
        reply.json()["access_token"].as_str().unwrap().to_owned()
    };
    assert_eq!(s.get("/v1/health", &token).await.status, StatusCode::OK);
    let reply = s.send("198.51.100.1", delete(&ada, &id)).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(code(&s.get("/v1/health", &token).await), "invalid_api_key");
}

/// The `oauth2` crate's client-credentials flow against a real server: a token, then a
/// protected route called with it, then introspection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oauth2_crate_gets_a_token_and_calls_the_api() {
    use oauth2::basic::BasicClient;
    use oauth2::{
        ClientId, ClientSecret, IntrospectionUrl, Scope, TokenIntrospectionResponse, TokenResponse,
        TokenUrl,
    };
    let s = server().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = s.app.clone();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let base = format!("http://{addr}");
    let client = BasicClient::new(ClientId::new(s.client_id.clone()))
        .set_client_secret(ClientSecret::new(s.client_secret.clone()))
        .set_token_uri(TokenUrl::new(format!("{base}/oauth/token")).unwrap())
        .set_introspection_url(IntrospectionUrl::new(format!("{base}/oauth/introspect")).unwrap());
    let http = oauth2::reqwest::ClientBuilder::new()
        .redirect(oauth2::reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let token = client
        .exchange_client_credentials()
        .add_scope(Scope::new("read".into()))
        .request_async(&http)
        .await
        .expect("a token from keygate");
    assert_eq!(token.expires_in(), Some(Duration::from_secs(3600)));
    assert!(token.refresh_token().is_none());
    let secret = token.access_token().secret();
    let reply = http
        .get(format!("{base}/v1/health"))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 200);
    let info = client
        .introspect(token.access_token())
        .request_async(&http)
        .await
        .unwrap();
    assert!(info.active());
    // A wrong secret: the crate reports invalid_client.
    let wrong = BasicClient::new(ClientId::new(s.client_id.clone()))
        .set_client_secret(ClientSecret::new("kgcs_wrong".into()))
        .set_token_uri(TokenUrl::new(format!("{base}/oauth/token")).unwrap());
    let error = wrong
        .exchange_client_credentials()
        .request_async(&http)
        .await
        .unwrap_err();
    assert!(format!("{error:?}").contains("invalid_client"), "{error:?}");
}
