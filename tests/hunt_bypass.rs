//! What a bypassed request carries into the inner service (found by the hunt of issue 7).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use keygate::key::Environment;
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::AuthLayer;
use tower::{service_fn, Layer, ServiceExt};

type Body = Full<Bytes>;

/// The key header is marked sensitive only when keygate accepts the key. A client that sends
/// its key on every request (Swagger UI's "Authorize", an SDK with a default header, curl
/// with a shell alias) also sends it to `/swagger/…`, which keygate hands to the inner
/// service untouched: a trace/log layer or handler inside keygate that prints the headers
/// (`{:?}`) prints the secret in clear, and an HTTP/2 proxy hop may index it.
#[tokio::test]
async fn the_key_header_reaches_a_bypassed_route_unmarked() {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .unwrap();
    let logged = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&logged);
    let svc = AuthLayer::new(store).layer(service_fn(move |req: Request<Body>| {
        // What `tower_http::trace` or a handler's `tracing::debug!(?headers)` would print.
        l.lock().unwrap().push(format!("{:?}", req.headers()));
        async { Ok::<_, Infallible>(Response::new(Body::default())) }
    }));
    for (name, value) in [
        ("x-api-key", key.expose_secret().to_owned()),
        ("authorization", format!("Bearer {}", key.expose_secret())),
    ] {
        let req = Request::get("/swagger/openapi.json")
            .header(name, value)
            .body(Body::default())
            .unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
    }
    for line in logged.lock().unwrap().iter() {
        assert!(
            !line.contains(key.expose_secret()),
            "the inner service saw the key in clear: {line}"
        );
    }
}
