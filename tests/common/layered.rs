//! Driving a layer stack in-process: the service under it, a fake clock, requests from a
//! peer, and the answer read whole.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate::clock::FakeClock;
use keygate::key::{ApiKey, Environment, KeyFormat};
use keygate::validate::PeerAddr;
use tower::{Service, ServiceExt};

pub type Body = Full<Bytes>;

pub fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

/// The service every stack wraps: 200, empty.
pub async fn ok(_: Request<Body>) -> Result<Response<Body>, Infallible> {
    Ok(Response::new(Body::default()))
}

/// A fake clock at a fixed, recent time.
pub fn clock() -> FakeClock {
    FakeClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

/// A well-formed key no store has.
pub fn unknown() -> ApiKey {
    KeyFormat::default().generate(Environment::Live).unwrap()
}

/// `GET /v1/health` with `key` in `X-API-KEY`, from `peer`.
pub fn req_at(key: &str, peer: SocketAddr) -> Request<Body> {
    let mut req = Request::get("/v1/health")
        .header("x-api-key", key)
        .body(Body::default())
        .unwrap();
    req.extensions_mut().insert(PeerAddr(peer));
    req
}

/// The same, the peer given as text.
pub fn req(key: &str, peer: &str) -> Request<Body> {
    req_at(key, peer.parse().unwrap())
}

/// The status and the body of `svc`'s answer to `req`.
pub async fn status_and_body<S, B>(svc: &S, req: Request<Body>) -> (StatusCode, String)
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The status of `svc`'s answer to `req`.
pub async fn status_of<S, B>(svc: &S, req: Request<Body>) -> StatusCode
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    status_and_body(svc, req).await.0
}
