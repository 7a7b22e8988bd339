//! The key service's OpenAPI document (`src/service/openapi.json`, served at
//! `/swagger/openapi.json`) tells the truth about the router, with no server:
//!
//! - the document is OpenAPI 3.1 in shape, and every `$ref` in it resolves;
//! - every (method, path) it documents is routed, and every route the router serves (the
//!   `.route(…)` calls of `src/service/mod.rs`, kept below as a list that is checked against
//!   that source) is documented, in both directions, with any other method answered 405;
//! - every request body is a closed object whose properties are exactly the fields the code
//!   reads;
//! - every answer of a signed-in owner's session, its failures included, has a documented
//!   status and a body that matches the documented schema;
//! - the same for the quickstart (its demo API's paths, `examples/quickstart.openapi.json`,
//!   merged in), built here from the example's own `app` and `key_service`.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;

use axum::body::Body;
use axum::Router;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use keygate::key::Environment;
use keygate::lookup::CachedLookup;
use keygate::ratelimit::Quota;
use keygate::service::KeyService;
use keygate::store::{KeyStore, MemoryStore, NewKey, OwnerStore};
use keygate::Keygate;
use serde_json::{json, Value};
use tower::ServiceExt;

/// The quickstart, whose router the demo API's checks build.
#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

/// The document as the crate ships it.
const DOCUMENT: &str = include_str!("../src/service/openapi.json");
/// The demo API's paths, as the quickstart adds them.
const DEMO_PATHS: &str = include_str!("../examples/quickstart.openapi.json");
/// The quickstart's source, whose `.route(…)` calls [`DEMO_ROUTES`] must list.
const QUICKSTART_SOURCE: &str = include_str!("../examples/quickstart.rs");
/// The router's source, whose `.route(…)` calls [`SERVICE_ROUTES`] must list.
const SERVICE_SOURCE: &str = include_str!("../src/service/mod.rs");

/// Every route of `KeyServiceBuilder::build` (and of `testkey`), with its methods: what
/// the router serves, as its `.route(…)` calls say. HEAD is served with every GET by axum
/// and is not listed (nor documented).
const SERVICE_ROUTES: &[(&str, &[&str])] = &[
    ("/auth/createkey", &["POST"]),
    ("/auth/session", &["POST"]),
    ("/auth/testkey", &["GET"]),
    ("/v1/keys", &["GET", "POST"]),
    ("/v1/keys/{id}", &["GET", "PATCH", "DELETE"]),
    ("/v1/keys/{id}/disable", &["POST"]),
    ("/v1/keys/{id}/enable", &["POST"]),
    ("/v1/keys/{id}/rotate", &["POST"]),
    ("/v1/keys/revoke", &["POST"]),
    ("/v1/keys/leaked", &["POST"]),
    ("/v1/clients", &["GET", "POST"]),
    ("/v1/clients/{id}", &["DELETE"]),
    ("/oauth/token", &["POST"]),
    ("/oauth/revoke", &["POST"]),
    ("/oauth/introspect", &["POST"]),
    ("/v1/audit", &["GET"]),
    ("/dashboard", &["GET"]),
    ("/swagger/openapi.json", &["GET"]),
];

/// Every route of the quickstart's demo API (`app` in `examples/quickstart.rs`).
const DEMO_ROUTES: &[(&str, &[&str])] = &[
    ("/v1/health", &["GET"]),
    ("/v1/users/me", &["GET"]),
    ("/v1/messages", &["POST"]),
    ("/swagger", &["GET"]),
];

/// Every method a test tries on a path.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
];

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

const PASSWORD: &str = "correct horse battery staple";

/// The media type of the `/oauth/…` bodies.
const FORM: &str = "application/x-www-form-urlencoded";

/// The JSON bodies that are not closed objects: GitHub's alert (a list of matches, whose
/// other fields are ignored).
const OPEN_BODIES: &[&str] = &["/v1/keys/leaked"];

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("src/service/openapi.json is JSON")
}

fn routes(list: &[(&str, &[&str])]) -> BTreeSet<(String, String)> {
    list.iter()
        .flat_map(|(path, methods)| methods.iter().map(|m| (m.to_string(), path.to_string())))
        .collect()
}

/// The (METHOD, path) pairs a document's `paths` holds.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for method in HTTP_METHODS {
            if item.get(*method).is_some() {
                out.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// The (METHOD, path) pairs of the `.route("path", get(…).post(…))` calls in `source`,
/// comments (the docs' examples) left out.
fn routes_in_source(source: &str) -> BTreeSet<(String, String)> {
    let code: String = source
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .flat_map(|line| [line, "\n"])
        .collect();
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let args = rest.trim_start();
        let Some(args) = args.strip_prefix('"') else {
            continue;
        };
        let end = args.find('"').expect("a path literal ends");
        let path = &args[..end];
        // The rest of the call, to its closing parenthesis.
        let mut depth = 1usize;
        let mut close = args.len();
        for (i, c) in args[end + 1..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = end + 1 + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call = &args[end + 1..close];
        for (i, _) in call.match_indices('(') {
            let before = &call[..i];
            let word_start = before
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(0, |j| j + 1);
            let word = &before[word_start..];
            if HTTP_METHODS.contains(&word) || word == "any" {
                out.insert((word.to_ascii_uppercase(), path.to_owned()));
            }
        }
    }
    out
}

/// A concrete path for a template: every `{param}` filled with a well-formed key id.
fn concrete(template: &str, id: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').expect("a parameter closes") + open;
        out.push_str(&rest[..open]);
        out.push_str(id);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The key that signs the tests' GitHub leak alerts (its public half is trusted by
/// [`service`]), under the identifier [`GITHUB_KEY_ID`].
fn github_key() -> &'static p256::ecdsa::SigningKey {
    static KEY: std::sync::OnceLock<p256::ecdsa::SigningKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng))
}

const GITHUB_KEY_ID: &str = "test-key-1";

/// GitHub's signature of an alert's body: base64 of the DER ECDSA signature.
fn github_signature(body: &[u8]) -> String {
    use base64::Engine as _;
    use p256::ecdsa::signature::Signer as _;
    let signature: p256::ecdsa::Signature = github_key().sign(body);
    base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
}

/// The service over a memory store, with `testkey` behind a keygate layer, as the module's
/// docs build it, trusting [`github_key`] for leak alerts; and the store.
async fn service(login_limit: u32) -> (Router, MemoryStore) {
    let store = MemoryStore::new();
    store.add_owner("ada", Some(PASSWORD)).await.unwrap();
    let keygate = Keygate::builder(CachedLookup::over_store(store.clone()))
        .default_quota("60/min".parse().unwrap())
        .build()
        .unwrap();
    let limit = Quota::per_hour(NonZeroU32::new(login_limit).unwrap());
    let pem = p256::pkcs8::EncodePublicKey::to_public_key_pem(
        github_key().verifying_key(),
        p256::pkcs8::LineEnding::LF,
    )
    .unwrap();
    let github =
        json!({"public_keys": [{"key_identifier": GITHUB_KEY_ID, "key": pem, "is_current": true}]});
    let router = KeyService::builder(store.clone())
        .testkey(keygate)
        .login_limits(limit, Quota::per_hour(NonZeroU32::new(1000).unwrap()))
        .github_public_keys(github.to_string())
        .build()
        .unwrap();
    (router, store)
}

/// An answer, read whole.
struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn content_type(&self) -> Option<&str> {
        self.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok())
    }

    /// axum's own answer for a path no route matches (404) or a method the route does
    /// not serve (405): no content type, no body. The service's `not_found` is JSON.
    /// The router's own answer for a request no route takes: axum's bare 404, or the
    /// service's 405 `method_not_allowed` (a known path, another method).
    fn unrouted(&self) -> bool {
        let bare = self.content_type().is_none() && self.body.is_empty();
        match self.status.as_u16() {
            404 => bare,
            // A HEAD answer loses its body on the way out.
            405 => {
                self.body.is_empty()
                    || serde_json::from_slice::<Value>(&self.body)
                        .is_ok_and(|v| v["code"] == "method_not_allowed")
            }
            _ => false,
        }
    }
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn bare(method: &str, path: &str) -> Request<Body> {
    Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path)
        .body(Body::empty())
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// The document's shape.

/// The value a local `$ref` (`#/a/b`) points at.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    doc.pointer(pointer)
}

fn refs<'a>(value: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    if let Some(r) = v.as_str() {
                        out.push((at.clone(), r));
                    }
                } else {
                    refs(v, format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                refs(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// What makes an OpenAPI 3.1 document well formed, as far as this one uses it; every JSON
/// request body a closed object, except on `open_bodies` (which take other JSON); every
/// form body (`/oauth/…`) an object, open: RFC 6749 §3.1 has unknown parameters ignored.
fn check_shape(doc: &Value, open_bodies: &[&str]) {
    let version = doc["openapi"].as_str().expect("`openapi` is a string");
    assert!(version.starts_with("3.1."), "openapi {version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let mut all = Vec::new();
    refs(doc, String::new(), &mut all);
    assert!(!all.is_empty());
    for (at, reference) in &all {
        assert!(
            resolve(doc, reference).is_some(),
            "{at}: $ref {reference} does not resolve"
        );
    }
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes");
    let mut operation_ids = BTreeSet::new();
    let item_keys: BTreeSet<&str> = HTTP_METHODS
        .iter()
        .copied()
        .chain(["summary", "description", "parameters", "servers", "$ref"])
        .collect();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        assert!(path.starts_with('/'), "{path}");
        for key in item.as_object().expect("a path item is an object").keys() {
            assert!(item_keys.contains(key.as_str()), "{path}: `{key}`");
        }
        // Every template parameter is declared, in the path, required.
        let names: Vec<&str> = path
            .split('{')
            .skip(1)
            .map(|s| s.split('}').next().unwrap())
            .collect();
        for method in HTTP_METHODS {
            let Some(op) = item.get(*method) else {
                continue;
            };
            let id = op["operationId"].as_str().expect("operationId");
            assert!(
                operation_ids.insert(id.to_owned()),
                "operationId {id} twice"
            );
            let params: Vec<&Value> = item["parameters"]
                .as_array()
                .into_iter()
                .chain(op["parameters"].as_array())
                .flatten()
                .map(|p| match p.get("$ref") {
                    Some(r) => resolve(doc, r.as_str().unwrap()).unwrap(),
                    None => p,
                })
                .collect();
            for name in &names {
                assert!(
                    params
                        .iter()
                        .any(|p| p["name"] == *name && p["in"] == "path" && p["required"] == true),
                    "{method} {path}: path parameter {name} not declared"
                );
            }
            for p in &params {
                assert!(
                    p["name"].is_string() && p["schema"].is_object(),
                    "{method} {path}"
                );
                assert!(
                    ["path", "query", "header", "cookie"].contains(&p["in"].as_str().unwrap()),
                    "{method} {path}"
                );
            }
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path}: no responses");
            for (status, response) in responses {
                assert!(
                    status.len() == 3
                        && status.parse::<u16>().is_ok_and(|s| (100..600).contains(&s)),
                    "{method} {path}: status {status}"
                );
                let response = match response.get("$ref") {
                    Some(r) => resolve(doc, r.as_str().unwrap()).unwrap(),
                    None => response,
                };
                assert!(
                    response["description"].is_string(),
                    "{method} {path} {status}"
                );
            }
            let security = op["security"].as_array().expect("security, even if empty");
            for requirement in security {
                for scheme in requirement.as_object().unwrap().keys() {
                    assert!(schemes.contains_key(scheme), "{method} {path}: {scheme}");
                }
            }
            // Request bodies: closed JSON objects, or form parameters.
            if let Some(body) = op.get("requestBody") {
                let content = body["content"].as_object().expect("a body's content");
                assert_eq!(content.len(), 1, "{method} {path}: one media type");
                if let Some(form) = content.get(FORM) {
                    let schema = schema_of(doc, &form["schema"]);
                    assert_eq!(schema["type"], "object", "{method} {path}");
                    assert_ne!(
                        schema["additionalProperties"], false,
                        "{method} {path}: unknown form parameters are ignored"
                    );
                    continue;
                }
                if open_bodies.contains(&path.as_str()) {
                    continue;
                }
                let schema = &content["application/json"]["schema"];
                let schema = schema_of(doc, schema);
                assert_eq!(schema["type"], "object", "{method} {path}");
                assert_eq!(
                    schema["additionalProperties"], false,
                    "{method} {path}: a body takes known fields only"
                );
            }
        }
    }
}

fn schema_of<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => schema_of(doc, resolve(doc, r).expect("resolves")),
        None => schema,
    }
}

#[test]
fn the_document_is_openapi_3_1_and_every_ref_resolves() {
    let doc = document();
    check_shape(&doc, OPEN_BODIES);
    // The shape check can fail: a dangling $ref, a path parameter not declared.
    let mut broken = doc.clone();
    broken["paths"]["/v1/audit"]["get"]["responses"]["200"] =
        json!({"$ref": "#/components/responses/Nothing"});
    assert!(std::panic::catch_unwind(|| check_shape(&broken, OPEN_BODIES)).is_err());
    let mut broken = doc.clone();
    broken["paths"]["/v1/keys/{id}"]
        .as_object_mut()
        .unwrap()
        .remove("parameters");
    assert!(std::panic::catch_unwind(|| check_shape(&broken, OPEN_BODIES)).is_err());
    // A JSON body left open, a form body closed.
    let mut broken = doc.clone();
    broken["components"]["schemas"]["NewClient"]
        .as_object_mut()
        .unwrap()
        .remove("additionalProperties");
    assert!(std::panic::catch_unwind(|| check_shape(&broken, OPEN_BODIES)).is_err());
    let mut broken = doc.clone();
    broken["components"]["schemas"]["TokenRequest"]["additionalProperties"] = json!(false);
    assert!(std::panic::catch_unwind(|| check_shape(&broken, OPEN_BODIES)).is_err());
}

#[test]
fn the_route_lists_are_the_routers() {
    for (source, list) in [
        (SERVICE_SOURCE, SERVICE_ROUTES),
        (QUICKSTART_SOURCE, DEMO_ROUTES),
    ] {
        let listed = routes(list);
        let in_source = routes_in_source(source);
        assert_eq!(in_source, listed, "the source's .route(…) calls");
    }
    // The scan sees what it should: a route added to a source is found.
    let grown = format!("{SERVICE_SOURCE}\n    .route(\"/v1/extra\", get(x).put(y))\n");
    assert_eq!(
        routes_in_source(&grown).len(),
        routes(SERVICE_ROUTES).len() + 2
    );
}

/// The quickstart's whole document: the service's with the demo API's paths.
fn quickstart_document() -> Value {
    let mut doc = document();
    let demo: Value = serde_json::from_str(DEMO_PATHS).expect("quickstart.openapi.json is JSON");
    for (path, item) in demo.as_object().expect("a paths object") {
        assert!(
            doc["paths"].get(path).is_none(),
            "{path} is the service's already"
        );
        doc["paths"][path] = item.clone();
    }
    doc
}

#[test]
fn the_quickstarts_document_holds_exactly_its_routes() {
    let doc = quickstart_document();
    // The demo's `POST /v1/messages` takes any JSON (it reads a string `text` if there is one).
    check_shape(&doc, &["/v1/messages", OPEN_BODIES[0]]);
    let listed: BTreeSet<_> = routes(SERVICE_ROUTES)
        .union(&routes(DEMO_ROUTES))
        .cloned()
        .collect();
    assert_eq!(documented(&doc), listed);
}

#[test]
fn the_document_holds_exactly_the_routes() {
    let doc = document();
    let listed = routes(SERVICE_ROUTES);
    let documented = documented(&doc);
    let missing: Vec<_> = listed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&listed).collect();
    assert!(missing.is_empty(), "routed, not documented: {missing:?}");
    assert!(extra.is_empty(), "documented, not routed: {extra:?}");
}

#[tokio::test]
async fn every_documented_route_is_routed_and_other_methods_get_405() {
    let (app, _) = service(10).await;
    let doc = document();
    check_routing(&app, &doc, None, false).await;
    // What an unrouted request looks like, so that the checks above can fail.
    for path in ["/v1/keyz", "/v1/keys/key_x/frobnicate", "/auth", "/swagger"] {
        assert!(send(&app, bare("GET", path)).await.unrouted(), "{path}");
    }
    // The service's own 404 is a routed answer.
    let (status, session) = sign_in(&app).await;
    assert_eq!(status, StatusCode::OK);
    let answer = send(
        &app,
        Request::get("/v1/keys/key_nope")
            .header(AUTHORIZATION, format!("Bearer {session}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(!answer.unrouted());
}

/// Every documented (method, path) of `doc` is routed by `app`, and every other method on
/// its paths is answered 405 with the documented methods in `Allow`. `key`, when given, is
/// sent in `X-API-KEY` (a router behind keygate turns away keyless requests first). With
/// `cors`, a CORS layer outside everything answers every `OPTIONS` itself.
/// The quickstart's own API, behind its CORS layer (the key service beside it is not:
/// its sign-in endpoints are for this origin).
fn demo_api(template: &str) -> bool {
    matches!(
        template,
        "/v1/health" | "/v1/users/me" | "/v1/messages" | "/swagger"
    )
}

async fn check_routing(app: &Router, doc: &Value, key: Option<&str>, cors: bool) {
    let mut by_path: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (method, path) in documented(doc) {
        by_path.entry(path).or_default().insert(method);
    }
    for (template, methods) in &by_path {
        let path = concrete(template, "key_0000000000000000");
        for method in METHODS {
            let mut request = bare(method, &path);
            if let Some(key) = key {
                request
                    .headers_mut()
                    .insert("x-api-key", key.parse().unwrap());
            }
            let answer = send(app, request).await;
            if cors && *method == "OPTIONS" && demo_api(template) {
                assert_eq!(answer.status, StatusCode::OK, "OPTIONS {template}");
                assert!(
                    answer.headers.contains_key("access-control-allow-methods"),
                    "OPTIONS {template}: answered by CORS"
                );
                continue;
            }
            let served =
                methods.contains(*method) || (*method == "HEAD" && methods.contains("GET"));
            if served {
                assert!(
                    !answer.unrouted(),
                    "{method} {template}: documented, but the router has no such route ({})",
                    answer.status
                );
            } else {
                assert_eq!(
                    answer.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {template}: not documented, yet answered"
                );
                assert!(answer.unrouted(), "{method} {template}");
                // The methods the route says it serves are the documented ones.
                let allow: BTreeSet<String> = answer.headers[ALLOW]
                    .to_str()
                    .unwrap()
                    .split(',')
                    .map(|m| m.trim().to_owned())
                    .filter(|m| m != "HEAD")
                    .collect();
                assert_eq!(&allow, methods, "{template}: Allow");
            }
        }
    }
}

#[tokio::test]
async fn the_served_document_is_the_file_with_the_apis_paths() {
    let store = MemoryStore::new();
    let extra = json!({"/v1/health": {"get": {"responses": {"200": {"description": "ok"}}}},
                       "/v1/keys": {"delete": {"responses": {"200": {"description": "must not replace"}}}}});
    let app = KeyService::builder(store).api_paths(extra).build().unwrap();
    let answer = send(&app, bare("GET", "/swagger/openapi.json")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let served = answer.json();
    let mut expected = document();
    expected["paths"]["/v1/health"] = json!({"get": {"responses": {"200": {"description": "ok"}}}});
    assert_eq!(served, expected);
}

// ---------------------------------------------------------------------------------------
// Request bodies: exactly the fields the code reads.

/// The properties of an operation's JSON body.
fn body_properties(doc: &Value, method: &str, path: &str) -> BTreeSet<String> {
    let op = &doc["paths"][path][method.to_ascii_lowercase()];
    let schema = schema_of(
        doc,
        &op["requestBody"]["content"]["application/json"]["schema"],
    );
    schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// The fields the code names when it refuses an unknown one.
fn fields_known_by_code(answer: &Answer) -> BTreeSet<String> {
    let body = answer.json();
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "invalid_field", "{body}");
    let message = body["message"].as_str().unwrap();
    let list = message
        .split("expected one of: ")
        .nth(1)
        .unwrap_or_else(|| panic!("{message}"))
        .trim_end_matches('.');
    list.split(", ").map(str::to_owned).collect()
}

fn json_request(method: &str, path: &str, session: Option<&str>, body: &Value) -> Request<Body> {
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path)
        .header(CONTENT_TYPE, "application/json");
    if let Some(session) = session {
        request = request.header(AUTHORIZATION, format!("Bearer {session}"));
    }
    request.body(Body::from(body.to_string())).unwrap()
}

async fn sign_in(app: &Router) -> (StatusCode, String) {
    let answer = send(
        app,
        json_request(
            "POST",
            "/auth/session",
            None,
            &json!({"username": "ada", "password": PASSWORD}),
        ),
    )
    .await;
    let token = answer.json()["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (answer.status, token)
}

#[tokio::test]
async fn every_body_documents_exactly_the_fields_the_code_reads() {
    let (app, _) = service(10).await;
    let doc = document();
    let (_, session) = sign_in(&app).await;
    let created = send(
        &app,
        json_request("POST", "/v1/keys", Some(&session), &json!({"name": "k"})),
    )
    .await;
    let id = created.json()["key"]["id"].as_str().unwrap().to_owned();
    let bodies = [
        ("POST", "/auth/createkey"),
        ("POST", "/auth/session"),
        ("POST", "/v1/keys"),
        ("PATCH", "/v1/keys/{id}"),
        ("POST", "/v1/keys/{id}/rotate"),
        ("POST", "/v1/keys/revoke"),
        ("POST", "/v1/clients"),
    ];
    // The closed JSON bodies (the form bodies of `/oauth/…` and GitHub's alert are open).
    let with_body: BTreeSet<(String, String)> = documented(&doc)
        .into_iter()
        .filter(|(m, p)| {
            doc["paths"][p][m.to_ascii_lowercase()]["requestBody"]["content"]["application/json"]
                .is_object()
                && !OPEN_BODIES.contains(&p.as_str())
        })
        .collect();
    assert_eq!(
        with_body,
        bodies
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect()
    );
    for (method, template) in bodies {
        let path = concrete(template, &id);
        let answer = send(
            &app,
            json_request(
                method,
                &path,
                Some(&session),
                &json!({"surely_not_a_field": 1}),
            ),
        )
        .await;
        assert_eq!(
            fields_known_by_code(&answer),
            body_properties(&doc, method, template),
            "{method} {template}"
        );
        // `required` is what the code cannot do without.
        let op = &doc["paths"][template][method.to_ascii_lowercase()];
        let schema = schema_of(
            &doc,
            &op["requestBody"]["content"]["application/json"]["schema"],
        );
        let required: BTreeSet<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap())
            .collect();
        for field in body_properties(&doc, method, template) {
            if !required.contains(field.as_str()) {
                continue;
            }
            let mut body = json!({"name": "k", "username": "x", "password": "y"});
            body.as_object_mut()
                .unwrap()
                .retain(|k, _| required.contains(k.as_str()));
            body.as_object_mut().unwrap().remove(&field);
            let answer = send(&app, json_request(method, &path, Some(&session), &body)).await;
            assert_eq!(
                answer.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{method} {template} without {field}"
            );
        }
    }
    // PATCH: the fields fixed at creation are refused by name.
    for field in ["use_case", "environment", "expires_at", "expires_in"] {
        let answer = send(
            &app,
            json_request(
                "PATCH",
                &format!("/v1/keys/{id}"),
                Some(&session),
                &json!({field: "x"}),
            ),
        )
        .await;
        let body = answer.json();
        assert_eq!(body["code"], "immutable_field", "{field}: {body}");
        assert_eq!(body["data"]["field"], field);
    }
}

// ---------------------------------------------------------------------------------------
// Answers against the documented responses.

/// Whether `value` matches `schema` (types, properties, required, additionalProperties,
/// items, enum, const, anyOf/allOf/oneOf, minimum/maximum); `Err` says where it does not.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return validate(doc, resolve(doc, r).ok_or(format!("{r}?"))?, value, at);
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => return Err(format!("{at}: bad type")),
        };
        let ok = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "number" => value.is_number(),
            "integer" => value.is_u64() || value.is_i64(),
            _ => false,
        });
        if !ok {
            return Err(format!("{at}: {value} is not {types:?}"));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!("{at}: {value} not in {options:?}"));
        }
    }
    if let Some(constant) = schema.get("const") {
        if constant != value {
            return Err(format!("{at}: {value} is not {constant}"));
        }
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n < min {
            return Err(format!("{at}: {n} < {min}"));
        }
    }
    if let (Some(max), Some(n)) = (
        schema.get("maximum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n > max {
            return Err(format!("{at}: {n} > {max}"));
        }
    }
    if let Value::Object(map) = value {
        let properties = schema.get("properties").and_then(Value::as_object);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !map.contains_key(name.as_str().unwrap()) {
                return Err(format!("{at}: {name} missing"));
            }
        }
        for (name, v) in map {
            match properties.and_then(|p| p.get(name)) {
                Some(s) => validate(doc, s, v, &format!("{at}.{name}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}: {name} not documented"))
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            validate(doc, s, v, &format!("{at}[{i}]"))?;
        }
    }
    for all in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        validate(doc, all, value, at)?;
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        let errors: Vec<String> = any
            .iter()
            .filter_map(|s| validate(doc, s, value, at).err())
            .collect();
        if errors.len() == any.len() {
            return Err(errors.join("; "));
        }
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let matching = one
            .iter()
            .filter(|s| validate(doc, s, value, at).is_ok())
            .count();
        if matching != 1 {
            return Err(format!("{at}: {matching} of oneOf match"));
        }
    }
    Ok(())
}

/// Checks an answer against the document: its status is documented for the operation,
/// its content type and body match, its required headers are there.
fn conforms(doc: &Value, method: &str, template: &str, answer: &Answer) {
    let op = &doc["paths"][template][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {template} is not documented");
    let status = answer.status.as_str();
    let Some(response) = op["responses"].get(status) else {
        panic!(
            "{method} {template}: status {status} is not documented ({})",
            String::from_utf8_lossy(&answer.body)
        );
    };
    let response = schema_of(doc, response);
    for (name, header) in response["headers"].as_object().into_iter().flatten() {
        let header = schema_of(doc, header);
        if header["required"] == true {
            assert!(
                answer.headers.contains_key(name.as_str()),
                "{method} {template} {status}: header {name} missing"
            );
        }
    }
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        assert!(
            answer.body.is_empty(),
            "{method} {template} {status}: a body"
        );
        return;
    };
    let media = answer
        .content_type()
        .map(|c| c.split(';').next().unwrap().trim().to_owned())
        .unwrap_or_default();
    let Some(media_type) = content.get(&media) else {
        panic!("{method} {template} {status}: content type {media:?} is not documented");
    };
    if media == "application/json" {
        let body = answer.json();
        if let Err(e) = validate(doc, &media_type["schema"], &body, "body") {
            panic!("{method} {template} {status}: {e}\n{body}");
        }
    }
}

#[test]
fn the_validator_can_refuse() {
    let doc = document();
    let view = json!({"$ref": "#/components/schemas/KeyView"});
    assert!(validate(&doc, &view, &json!({}), "").is_err());
    let error = json!({"$ref": "#/components/schemas/Error"});
    assert!(validate(
        &doc,
        &error,
        &json!({"code": "x", "message": "y", "data": null}),
        ""
    )
    .is_ok());
    assert!(validate(
        &doc,
        &error,
        &json!({"code": "x", "message": "y", "data": 1}),
        ""
    )
    .is_err());
    assert!(validate(
        &doc,
        &error,
        &json!({"code": "x", "message": "y", "data": null, "z": 1}),
        ""
    )
    .is_err());
}

#[tokio::test]
async fn a_sessions_answers_match_the_document() {
    let (app, store) = service(2).await;
    let doc = document();
    let call = |method: &'static str, template: &'static str, request: Request<Body>| {
        let app = app.clone();
        let doc = doc.clone();
        async move {
            let answer = send(&app, request).await;
            conforms(&doc, method, template, &answer);
            answer
        }
    };
    let signed = |method: &str, path: &str, session: &str, body: Option<Value>| {
        let mut request = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .header(AUTHORIZATION, format!("Bearer {session}"));
        let body = match body {
            Some(body) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        request.body(body).unwrap()
    };
    let credentials = json!({"username": "ada", "password": PASSWORD});

    // Sign-in.
    let answer = call(
        "POST",
        "/auth/session",
        json_request("POST", "/auth/session", None, &credentials),
    )
    .await;
    assert_eq!(answer.status, 200);
    let session = answer.json()["token"].as_str().unwrap().to_owned();
    let s = session.as_str();

    // The key's life.
    let body = json!({"name": "ci", "description": "a test\nkey", "use_case": "tests",
                      "environment": "test", "scopes": ["read", "messages:write"],
                      "rates": ["60/min", "1000/hour"], "ips": ["10.0.0.0/8", "::1"],
                      "sites": ["example.com"], "expires_in": 3600});
    let answer = call(
        "POST",
        "/v1/keys",
        signed("POST", "/v1/keys", s, Some(body)),
    )
    .await;
    assert_eq!(answer.status, 201);
    let id = answer.json()["key"]["id"].as_str().unwrap().to_owned();
    let one = format!("/v1/keys/{id}");
    let answer = call(
        "POST",
        "/v1/keys",
        signed("POST", "/v1/keys", s, Some(json!({"name": "plain"}))),
    )
    .await;
    assert_eq!(answer.status, 201);
    let plain_secret = answer.json()["secret"].as_str().unwrap().to_owned();
    for path in [
        "/v1/keys",
        "/v1/keys?limit=1",
        "/v1/keys?limit=1&after=key_0",
    ] {
        assert_eq!(
            call("GET", "/v1/keys", signed("GET", path, s, None))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        call("GET", "/v1/keys/{id}", signed("GET", &one, s, None))
            .await
            .status,
        200
    );
    let patch = json!({"name": "ci 2", "scopes": [], "rates": ["10/s;burst=20"], "ips": []});
    assert_eq!(
        call(
            "PATCH",
            "/v1/keys/{id}",
            signed("PATCH", &one, s, Some(patch))
        )
        .await
        .status,
        200
    );
    assert_eq!(
        call(
            "PATCH",
            "/v1/keys/{id}",
            signed("PATCH", &one, s, Some(json!({})))
        )
        .await
        .status,
        200
    );
    let disable = format!("{one}/disable");
    let enable = format!("{one}/enable");
    let rotate = format!("{one}/rotate");
    assert_eq!(
        call(
            "POST",
            "/v1/keys/{id}/disable",
            signed("POST", &disable, s, None)
        )
        .await
        .status,
        200
    );
    assert_eq!(
        call(
            "POST",
            "/v1/keys/{id}/enable",
            signed("POST", &enable, s, None)
        )
        .await
        .status,
        200
    );
    assert_eq!(
        call(
            "POST",
            "/v1/keys/{id}/rotate",
            signed("POST", &rotate, s, None)
        )
        .await
        .status,
        200
    );
    let grace = Some(json!({"grace_seconds": 60}));
    assert_eq!(
        call(
            "POST",
            "/v1/keys/{id}/rotate",
            signed("POST", &rotate, s, grace)
        )
        .await
        .status,
        200
    );
    for path in [
        "/v1/audit".to_owned(),
        "/v1/audit?limit=2".to_owned(),
        format!("/v1/audit?key={id}"),
    ] {
        assert_eq!(
            call("GET", "/v1/audit", signed("GET", &path, s, None))
                .await
                .status,
            200
        );
    }
    let testkey = Request::get("/auth/testkey")
        .header("x-api-key", &plain_secret)
        .body(Body::empty())
        .unwrap();
    let answer = call("GET", "/auth/testkey", testkey).await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.json()["rate_limit"]["limit"].is_u64(),
        "{}",
        answer.json()
    );
    assert_eq!(
        call("DELETE", "/v1/keys/{id}", signed("DELETE", &one, s, None))
            .await
            .status,
        204
    );
    assert_eq!(
        call("GET", "/v1/keys/{id}", signed("GET", &one, s, None))
            .await
            .status,
        404
    );
    assert_eq!(
        call(
            "POST",
            "/v1/keys/{id}/enable",
            signed("POST", &enable, s, None)
        )
        .await
        .status,
        404
    );
    assert_eq!(
        call(
            "GET",
            "/v1/audit",
            signed("GET", &format!("/v1/audit?key={id}"), s, None)
        )
        .await
        .status,
        200
    );

    // A deleted key's audit trail stays readable (above: 200).

    // OAuth2 clients and their tokens.
    let form = |path: &str, authorization: Option<&str>, body: &str| {
        let mut request = Request::post(path).header(CONTENT_TYPE, FORM);
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        request.body(Body::from(body.to_owned())).unwrap()
    };
    let basic = |id: &str, secret: &str| {
        use base64::Engine as _;
        let pair = format!("{id}:{secret}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    };
    let new_client = json!({"name": "reports", "scopes": ["read", "reports:write"]});
    let answer = call(
        "POST",
        "/v1/clients",
        signed("POST", "/v1/clients", s, Some(new_client)),
    )
    .await;
    assert_eq!(answer.status, 201);
    let client_id = answer.json()["client"]["id"].as_str().unwrap().to_owned();
    let client_secret = answer.json()["client_secret"].as_str().unwrap().to_owned();
    let client = basic(&client_id, &client_secret);
    let c = Some(client.as_str());
    let answer = call(
        "POST",
        "/v1/clients",
        signed("POST", "/v1/clients", s, Some(json!({"name": "no scopes"}))),
    )
    .await;
    assert_eq!(answer.status, 201);
    let bare_id = answer.json()["client"]["id"].as_str().unwrap().to_owned();
    let bare_client = basic(&bare_id, answer.json()["client_secret"].as_str().unwrap());
    for bad in [
        json!({"name": ""}),
        json!({"name": "x", "scopes": ["a b"]}),
        json!({"name": "x", "secret": "mine"}),
        json!({"scopes": ["read"]}),
    ] {
        let request = signed("POST", "/v1/clients", s, Some(bad.clone()));
        assert_eq!(
            call("POST", "/v1/clients", request).await.status,
            422,
            "{bad}"
        );
    }
    let answer = call("GET", "/v1/clients", signed("GET", "/v1/clients", s, None)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["clients"].as_array().unwrap().len(), 2);

    let grant = "grant_type=client_credentials";
    let answer = call("POST", "/oauth/token", form("/oauth/token", c, grant)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["scope"], "read reports:write");
    let token = answer.json()["access_token"].as_str().unwrap().to_owned();
    let answer = call(
        "POST",
        "/oauth/token",
        form(
            "/oauth/token",
            c,
            "grant_type=client_credentials&scope=read",
        ),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["scope"], "read");
    // The token is a key: the layers take it as `Authorization: Bearer`.
    let testkey = Request::get("/auth/testkey")
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(call("GET", "/auth/testkey", testkey).await.status, 200);
    let introspect = format!("token={token}");
    let answer = call(
        "POST",
        "/oauth/introspect",
        form("/oauth/introspect", c, &introspect),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["active"], true, "{}", answer.json());
    assert_eq!(answer.json()["client_id"], client_id.as_str());
    for body in [
        "token=kg_live_nonsense",
        "token=x&token_type_hint=access_token",
    ] {
        let answer = call(
            "POST",
            "/oauth/introspect",
            form("/oauth/introspect", c, body),
        )
        .await;
        assert_eq!(answer.json(), json!({"active": false}), "{body}");
    }
    // Another client does not see this one's token.
    let answer = call(
        "POST",
        "/oauth/introspect",
        form("/oauth/introspect", Some(&bare_client), &introspect),
    )
    .await;
    assert_eq!(answer.json(), json!({"active": false}));
    let answer = call(
        "POST",
        "/oauth/revoke",
        form("/oauth/revoke", c, &introspect),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["pragma"], "no-cache");
    let answer = call(
        "POST",
        "/oauth/introspect",
        form("/oauth/introspect", c, &introspect),
    )
    .await;
    assert_eq!(answer.json(), json!({"active": false}));
    assert_eq!(
        call(
            "POST",
            "/oauth/revoke",
            form("/oauth/revoke", c, "token=unknown")
        )
        .await
        .status,
        200
    );

    // OAuth2 refusals: RFC 6749 §5.2's shape.
    let cases: &[(&str, Option<&str>, &str, u16, &str)] = &[
        (
            "/oauth/token",
            c,
            "grant_type=password",
            400,
            "unsupported_grant_type",
        ),
        ("/oauth/token", c, "scope=read", 400, "invalid_request"),
        (
            "/oauth/token",
            c,
            "grant_type=client_credentials&scope=admin",
            400,
            "invalid_scope",
        ),
        (
            "/oauth/token",
            c,
            "grant_type=client_credentials&grant_type=client_credentials",
            400,
            "invalid_request",
        ),
        (
            "/oauth/token",
            c,
            "grant_type=client_credentials&client_id=x&client_secret=y",
            400,
            "invalid_request",
        ),
        (
            "/oauth/token",
            Some(&bare_client),
            grant,
            400,
            "unauthorized_client",
        ),
        ("/oauth/token", None, grant, 401, "invalid_client"),
        (
            "/oauth/token",
            Some("Basic !!"),
            grant,
            401,
            "invalid_client",
        ),
        (
            "/oauth/token",
            Some("Bearer kg_live_x"),
            grant,
            401,
            "invalid_client",
        ),
        (
            "/oauth/token",
            None,
            "grant_type=client_credentials&client_id=x&client_secret=y",
            401,
            "invalid_client",
        ),
        ("/oauth/revoke", c, "", 400, "invalid_request"),
        ("/oauth/revoke", None, "token=x", 401, "invalid_client"),
        (
            "/oauth/introspect",
            c,
            "token_type_hint=access_token",
            400,
            "invalid_request",
        ),
        ("/oauth/introspect", None, "token=x", 401, "invalid_client"),
    ];
    for (path, authorization, body, status, error) in cases {
        let template = *path;
        let answer = call("POST", template, form(path, *authorization, body)).await;
        assert_eq!(answer.status, *status, "{path} {body}");
        assert_eq!(answer.json()["error"], *error, "{path} {body}");
        if *status == 401 {
            assert!(
                answer.headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Basic "),
                "{path} {body}"
            );
        }
    }
    for path in ["/oauth/token", "/oauth/revoke", "/oauth/introspect"] {
        let json = Request::post(path)
            .header(AUTHORIZATION, &client)
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(call("POST", path, json).await.status, 415, "{path}");
        let big = form(path, c, &format!("token={}", "x".repeat(20_000)));
        assert_eq!(call("POST", path, big).await.status, 413, "{path}");
    }
    // A wrong secret: 401 until the client id's budget (2) is spent, then 429.
    let wrong = basic(&bare_id, "kgcs_wrong");
    for expected in [401, 401, 429] {
        let answer = call(
            "POST",
            "/oauth/introspect",
            form("/oauth/introspect", Some(&wrong), "token=x"),
        )
        .await;
        assert_eq!(answer.status, expected);
        assert_eq!(answer.json()["error"], "invalid_client");
    }

    // A client revoked: its tokens with it; unknown ids are 404.
    let answer = call("POST", "/oauth/token", form("/oauth/token", c, grant)).await;
    let token = answer.json()["access_token"].as_str().unwrap().to_owned();
    let one_client = format!("/v1/clients/{client_id}");
    for _ in 0..2 {
        let request = signed("DELETE", &one_client, s, None);
        assert_eq!(
            call("DELETE", "/v1/clients/{id}", request).await.status,
            204
        );
    }
    for id in ["kgc_nope", "key_0000000000000000"] {
        let request = signed("DELETE", &format!("/v1/clients/{id}"), s, None);
        assert_eq!(
            call("DELETE", "/v1/clients/{id}", request).await.status,
            404
        );
    }
    let request = bare("DELETE", &one_client);
    assert_eq!(
        call("DELETE", "/v1/clients/{id}", request).await.status,
        401
    );
    let answer = call("POST", "/oauth/token", form("/oauth/token", c, grant)).await;
    assert_eq!(answer.status, 401);
    let testkey = Request::get("/auth/testkey")
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(call("GET", "/auth/testkey", testkey).await.status, 401);
    let answer = call("GET", "/v1/clients", signed("GET", "/v1/clients", s, None)).await;
    assert!(answer.json()["clients"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["active"] == false));
    let answer = call("GET", "/v1/audit", signed("GET", "/v1/audit", s, None)).await;
    let events = answer.json();
    let actions: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"client_created") && actions.contains(&"client_revoked"));

    // Keys that leaked: by their holder, and by GitHub's alert.
    let revoke = |body: &str| {
        Request::post("/v1/keys/revoke")
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let answer = call(
        "POST",
        "/v1/keys/revoke",
        revoke(&json!({"key": plain_secret}).to_string()),
    )
    .await;
    assert_eq!(answer.status, 200);
    for (body, status) in [
        (r#"{"key":"kg_live_nonsense"}"#, 200),
        (r#"{"key":""}"#, 200),
        ("{}", 422),
        (r#"{"key":"x","id":"y"}"#, 422),
        (r#"{"key":"#, 400),
    ] {
        let answer = call("POST", "/v1/keys/revoke", revoke(body)).await;
        assert_eq!(answer.status, status, "{body}");
    }
    // `revoke` and `leaked` are routes of their own, not key ids: 405 with a key's methods.
    for path in ["/v1/keys/revoke", "/v1/keys/leaked"] {
        let request = signed("GET", path, s, None);
        assert_eq!(call("GET", "/v1/keys/{id}", request).await.status, 405);
    }
    let text = Request::post("/v1/keys/revoke")
        .header(CONTENT_TYPE, "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(call("POST", "/v1/keys/revoke", text).await.status, 415);
    let answer = call(
        "POST",
        "/v1/keys",
        signed("POST", "/v1/keys", s, Some(json!({"name": "pushed"}))),
    )
    .await;
    let pushed = answer.json()["secret"].as_str().unwrap().to_owned();
    let alert = |body: &str, id: Option<&str>, signature: Option<String>| {
        let mut request = Request::post("/v1/keys/leaked").header(CONTENT_TYPE, "application/json");
        if let Some(id) = id {
            request = request.header("github-public-key-identifier", id);
        }
        if let Some(signature) = signature {
            request = request.header("github-public-key-signature", signature);
        }
        request.body(Body::from(body.to_owned())).unwrap()
    };
    let body = json!([
        {"token": pushed, "type": "keygate_api_key", "url": "https://github.com/o/r/blob/x/.env", "source": "content"},
        {"token": "kg_live_nonsense", "type": "keygate_api_key", "url": "", "source": "commit", "extra": 1},
    ])
    .to_string();
    let answer = call(
        "POST",
        "/v1/keys/leaked",
        alert(
            &body,
            Some(GITHUB_KEY_ID),
            Some(github_signature(body.as_bytes())),
        ),
    )
    .await;
    assert_eq!(answer.status, 200);
    let labels: Vec<Value> = answer
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["label"].clone())
        .collect();
    assert_eq!(labels, [json!("true_positive"), json!("false_positive")]);
    let signature = github_signature(body.as_bytes());
    for (id, signature) in [
        (None, None),
        (Some(GITHUB_KEY_ID), None),
        (Some("other-key"), Some(signature.clone())),
        (Some(GITHUB_KEY_ID), Some(github_signature(b"[]"))),
    ] {
        let answer = call("POST", "/v1/keys/leaked", alert(&body, id, signature)).await;
        assert_eq!(answer.status, 401);
    }
    for (body, status) in [("{\"token\": 1}", 400), ("[{}]", 400), ("[]", 200)] {
        let signature = github_signature(body.as_bytes());
        let answer = call(
            "POST",
            "/v1/keys/leaked",
            alert(body, Some(GITHUB_KEY_ID), Some(signature)),
        )
        .await;
        assert_eq!(answer.status, status, "{body}");
    }
    let many = serde_json::to_string(&vec![json!({"token": "x"}); 1001]).unwrap();
    let signature = github_signature(many.as_bytes());
    let answer = call(
        "POST",
        "/v1/keys/leaked",
        alert(&many, Some(GITHUB_KEY_ID), Some(signature)),
    )
    .await;
    assert_eq!(answer.status, 413);

    // Refusals.
    assert_eq!(
        call("GET", "/v1/keys", bare("GET", "/v1/keys"))
            .await
            .status,
        401
    );
    assert_eq!(
        call(
            "GET",
            "/v1/keys",
            signed("GET", "/v1/keys", "kgs_forged.x", None)
        )
        .await
        .status,
        401
    );
    assert_eq!(
        call(
            "GET",
            "/v1/keys",
            signed("GET", "/v1/keys?limit=0", s, None)
        )
        .await
        .status,
        422
    );
    assert_eq!(
        call(
            "GET",
            "/v1/keys",
            signed("GET", "/v1/keys?colour=red", s, None)
        )
        .await
        .status,
        422
    );
    assert_eq!(
        call(
            "GET",
            "/v1/audit",
            signed("GET", "/v1/audit?before=-1", s, None)
        )
        .await
        .status,
        422
    );
    let text = Request::post("/v1/keys")
        .header(AUTHORIZATION, format!("Bearer {s}"))
        .header(CONTENT_TYPE, "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(call("POST", "/v1/keys", text).await.status, 415);
    let broken = Request::post("/v1/keys")
        .header(AUTHORIZATION, format!("Bearer {s}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from("{\"name\":"))
        .unwrap();
    assert_eq!(call("POST", "/v1/keys", broken).await.status, 400);
    let big = json!({"name": "x".repeat(20_000)});
    assert_eq!(
        call("POST", "/v1/keys", signed("POST", "/v1/keys", s, Some(big)))
            .await
            .status,
        413
    );
    for bad in [
        json!({"name": ""}),
        json!({"name": "k", "rates": ["often"]}),
        json!({"name": "k", "ips": ["nowhere"]}),
        json!({"name": "k", "scopes": ["a b"]}),
        json!({"name": "k", "expires_in": 0}),
        json!({"name": 1}),
        json!([]),
    ] {
        assert_eq!(
            call(
                "POST",
                "/v1/keys",
                signed("POST", "/v1/keys", s, Some(bad.clone()))
            )
            .await
            .status,
            422,
            "{bad}"
        );
    }
    let rotate_bad = Some(json!({"grace_seconds": 99_999_999}));
    assert_eq!(
        call(
            "POST",
            "/v1/keys/{id}/rotate",
            signed("POST", "/v1/keys/key_x/rotate", s, rotate_bad)
        )
        .await
        .status,
        422
    );
    let testkey = Request::get("/auth/testkey").body(Body::empty()).unwrap();
    assert_eq!(call("GET", "/auth/testkey", testkey).await.status, 401);
    let testkey = Request::get("/auth/testkey")
        .header(AUTHORIZATION, "Bearer kg_live_nonsense")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call("GET", "/auth/testkey", testkey).await.status, 401);

    // createkey revokes the owner's keys: a revoked key cannot come back (409).
    let answer = call(
        "POST",
        "/auth/createkey",
        json_request("POST", "/auth/createkey", None, &credentials),
    )
    .await;
    assert_eq!(answer.status, 200);
    let page = call("GET", "/v1/keys", signed("GET", "/v1/keys", s, None))
        .await
        .json();
    let revoked = page["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["status"] == "revoked")
        .expect("a revoked key")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let enable = format!("/v1/keys/{revoked}/enable");
    assert_eq!(
        call(
            "POST",
            "/v1/keys/{id}/enable",
            signed("POST", &enable, s, None)
        )
        .await
        .status,
        409
    );
    let rotate = format!("/v1/keys/{revoked}/rotate");
    assert_eq!(
        call(
            "POST",
            "/v1/keys/{id}/rotate",
            signed("POST", &rotate, s, None)
        )
        .await
        .status,
        409
    );

    // Wrong passwords: 401, then 429 once the username's budget (2) is spent.
    let wrong = json!({"username": "ada", "password": "wrong"});
    for expected in [401, 401, 429] {
        let answer = call(
            "POST",
            "/auth/createkey",
            json_request("POST", "/auth/createkey", None, &wrong),
        )
        .await;
        assert_eq!(answer.status, expected);
    }
    let answer = call(
        "POST",
        "/auth/session",
        json_request("POST", "/auth/session", None, &wrong),
    )
    .await;
    assert_eq!(answer.status, 429);
    let answer = call(
        "POST",
        "/auth/session",
        json_request("POST", "/auth/session", None, &json!({"username": "ada"})),
    )
    .await;
    assert_eq!(answer.status, 422);

    // An owner disabled: the session ends.
    store.set_owner_active("ada", false).await.unwrap();
    assert_eq!(
        call("GET", "/v1/keys", signed("GET", "/v1/keys", s, None))
            .await
            .status,
        401
    );

    // The dashboard and the document.
    assert_eq!(
        call("GET", "/dashboard", bare("GET", "/dashboard"))
            .await
            .status,
        200
    );
    assert_eq!(
        call(
            "GET",
            "/swagger/openapi.json",
            bare("GET", "/swagger/openapi.json")
        )
        .await
        .status,
        200
    );
}

// ---------------------------------------------------------------------------------------
// The quickstart: the demo API and the service on one router.

/// A request to the demo API (method, path, headers, body) and the status it gets.
type Case<'a> = (
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Option<&'a str>,
    u16,
);

/// The quickstart's router (its own `app` and `key_service`) over a memory store, and two
/// keys of a generous quota: one with every scope, one with `read` only.
async fn quickstart_app() -> (Router, String, String) {
    let store = MemoryStore::new();
    store.add_owner("ada", Some(PASSWORD)).await.unwrap();
    let keygate = Keygate::builder(CachedLookup::over_store(store.clone()))
        .default_quota("60/min".parse().unwrap())
        .build()
        .unwrap();
    let messages = keygate.route().scopes(["messages:write"]).build().unwrap();
    let testkey = keygate.route().build().unwrap();
    let service = quickstart::key_service(store.clone(), testkey, None, None).unwrap();
    let app = quickstart::app(keygate, messages, service);
    let key = |name: &str, scopes: &[&str]| {
        let mut new = NewKey::new("ada", name, Environment::Live);
        new.scopes = scopes.iter().map(|s| s.to_string()).collect();
        new.quotas = vec!["100000/min".parse().unwrap()];
        new
    };
    let full = store
        .create(key("full", &["read", "messages:write"]))
        .await
        .unwrap();
    let read = store.create(key("read", &["read"])).await.unwrap();
    (
        app,
        full.secret.expose_secret().to_owned(),
        read.secret.expose_secret().to_owned(),
    )
}

#[tokio::test]
async fn the_quickstart_serves_its_document_and_routes_it() {
    let (app, full, read) = quickstart_app().await;
    let doc = quickstart_document();
    let answer = send(&app, bare("GET", "/swagger/openapi.json")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        doc,
        "the quickstart serves its whole document"
    );
    check_routing(&app, &doc, Some(&full), true).await;
    let mut nowhere = bare("GET", "/v1/nowhere");
    nowhere
        .headers_mut()
        .insert("x-api-key", full.parse().unwrap());
    assert!(send(&app, nowhere).await.unrouted());

    // The demo API's answers, against the document.
    let request = |method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>| {
        let mut request = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap()
    };
    let json = ("content-type", "application/json");
    let cases: Vec<Case<'_>> = vec![
        ("GET", "/v1/health", vec![("x-api-key", &full)], None, 200),
        ("GET", "/v1/health", vec![], None, 401),
        (
            "GET",
            "/v1/health",
            vec![("x-api-key", "kg_live_nonsense")],
            None,
            401,
        ),
        (
            "GET",
            "/v1/health",
            vec![
                ("x-api-key", &full),
                ("authorization", "Bearer kg_live_other"),
            ],
            None,
            400,
        ),
        ("GET", "/v1/users/me", vec![("x-api-key", &read)], None, 200),
        (
            "POST",
            "/v1/messages",
            vec![("x-api-key", &full), json],
            Some(r#"{"text":"hi"}"#),
            202,
        ),
        (
            "POST",
            "/v1/messages",
            vec![("x-api-key", &full), json],
            Some("[1, 2]"),
            202,
        ),
        (
            "POST",
            "/v1/messages",
            vec![("x-api-key", &full)],
            None,
            202,
        ),
        (
            "POST",
            "/v1/messages",
            vec![("x-api-key", &full), json],
            Some("{"),
            400,
        ),
        (
            "POST",
            "/v1/messages",
            vec![("x-api-key", &full), ("content-type", "text/plain")],
            Some("hi"),
            415,
        ),
        (
            "POST",
            "/v1/messages",
            vec![("x-api-key", &read), json],
            Some("{}"),
            403,
        ),
        ("GET", "/swagger", vec![], None, 200),
        (
            "GET",
            "/auth/testkey",
            vec![("x-api-key", &read)],
            None,
            200,
        ),
        ("GET", "/dashboard", vec![], None, 200),
    ];
    for (method, path, headers, body, status) in cases {
        let answer = send(&app, request(method, path, &headers, body)).await;
        assert_eq!(answer.status.as_u16(), status, "{method} {path} {body:?}");
        conforms(&doc, method, path, &answer);
    }
}
