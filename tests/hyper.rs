//! keygate in front of a plain hyper 1 server (no axum), called over a socket by the
//! hyper-util client. The server puts each connection's peer address into the requests as
//! [`PeerAddr`], which is what IP-restricted keys are checked against.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use keygate::error::BoxError;
use keygate::key::ApiKey;
use keygate::key::Environment;
use keygate::record::{KeyRecord, Owner, Restrictions};
use keygate::reject::Reason;
use keygate::store::MemoryStore;
use keygate::validate::PeerAddr;
use keygate::{AuthLayer, Principal};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower::ServiceBuilder;

/// `GET /v1/health`: `{"status":"ok"}` plus the name of the key that was accepted.
async fn health(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET || req.uri().path() != "/v1/health" {
        let mut res = Response::new(Full::default());
        *res.status_mut() = StatusCode::NOT_FOUND;
        return Ok(res);
    }
    let key = req
        .extensions()
        .get::<Principal>()
        .map(|p| p.record().name.clone());
    let body = json!({"status": "ok", "key": key});
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}

/// Serves [`health`] behind `auth` on a fresh port.
async fn serve(auth: AuthLayer<MemoryStore>) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let service = ServiceBuilder::new()
                .map_request(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    req
                })
                .layer(auth.clone())
                .service_fn(health);
            tokio::spawn(async move {
                // Ends when the client closes the connection; its errors are the client's.
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                    .await;
            });
        }
    });
    Ok(addr)
}

/// `GET /v1/health` with these headers: status, headers and the JSON body.
async fn get(
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, HeaderMap, Value), BoxError> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut req = Request::get(format!("http://{addr}/v1/health"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = client.request(req.body(Empty::new())?).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, serde_json::from_slice(&body)?))
}

fn issue(
    store: &MemoryStore,
    name: &str,
    edit: impl FnOnce(KeyRecord) -> KeyRecord,
) -> Result<ApiKey, BoxError> {
    Ok(
        store.issue(Owner::new("o1", "ada"), Environment::Live, |r| {
            edit(r.with_name(name).with_scopes(["read"]))
        })?,
    )
}

fn only_from(network: &str) -> Result<Restrictions, BoxError> {
    Ok(Restrictions {
        ips: vec![Restrictions::parse_network(network)?],
        sites: vec![],
    })
}

#[tokio::test]
async fn no_key_is_401_with_the_json_envelope_and_a_challenge() -> Result<(), BoxError> {
    let addr = serve(AuthLayer::new(MemoryStore::new())).await?;
    let (status, headers, body) = get(addr, &[]).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"api\"");
    assert_eq!(
        body,
        json!({"code": "missing_api_key", "message": Reason::MissingApiKey.message(), "data": null})
    );
    Ok(())
}

#[tokio::test]
async fn a_valid_key_reaches_the_handler() -> Result<(), BoxError> {
    let store = MemoryStore::new();
    let key = issue(&store, "ci", |r| r)?;
    let addr = serve(AuthLayer::new(store)).await?;

    let bearer = format!("Bearer {}", key.expose_secret());
    for (scheme, header) in [
        ("x-api-key", ("x-api-key", key.expose_secret())),
        ("bearer", ("authorization", bearer.as_str())),
    ] {
        let (status, _, body) = get(addr, &[header]).await?;
        assert_eq!(status, StatusCode::OK, "{scheme}");
        // The handler sees the principal keygate put into the request extensions.
        assert_eq!(body, json!({"status": "ok", "key": "ci"}), "{scheme}");
    }
    Ok(())
}

#[tokio::test]
async fn ip_restrictions_are_checked_against_the_peer_address() -> Result<(), BoxError> {
    let store = MemoryStore::new();
    let (office, local) = (only_from("10.0.0.0/8")?, only_from("127.0.0.0/8")?);
    let elsewhere = issue(&store, "office", |r| r.with_restrictions(office))?;
    let loopback = issue(&store, "local", |r| r.with_restrictions(local))?;
    let addr = serve(AuthLayer::new(store)).await?;

    let (status, headers, body) = get(addr, &[("x-api-key", elsewhere.expose_secret())]).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["code"], "ip_not_allowed");
    assert_eq!(body["message"], Reason::IpNotAllowed.message());

    let (status, _, body) = get(addr, &[("x-api-key", loopback.expose_secret())]).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"status": "ok", "key": "local"}));
    Ok(())
}
