#![allow(missing_docs)]
//! Instructions per request, counted by valgrind rather than timed: steady on a noisy
//! machine, and the same for the same binary and inputs. Run through
//! `bash scripts/instructions.sh`, which builds this in release and runs it under
//! callgrind with 0 and N requests per mode, and prints the difference divided by N.
//!
//! `instructions N MODE`: N requests (cache hits) through `MODE`: `bare` (the service
//! alone), `x-api-key` or `bearer` (keygate's auth layer over a warm `CachedLookup`).
//! Without arguments (as `cargo test --benches` runs it) a few requests of each mode, so
//! that it cannot rot.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keygate::key::Environment;
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::validate::PeerAddr;
use keygate::AuthLayer;
use tower::{Layer, Service};

type Body = Full<Bytes>;

fn bare(_: Request<Body>) -> Ready<Result<Response<Body>, Infallible>> {
    ready(Ok(Response::new(Body::default())))
}

fn now<F: Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

fn run(n: usize, mode: &str) {
    let store = MemoryStore::new();
    let key = store
        .issue(Owner::new("o", "o"), Environment::Live, |r| r)
        .expect("key");
    let lookup = CachedLookup::new(store);
    now(std::future::IntoFuture::into_future(
        lookup.lookup(&key.hash()),
    ))
    .expect("warm");
    let (name, value) = match mode {
        "bearer" => ("authorization", format!("Bearer {}", key.expose_secret())),
        _ => ("x-api-key", key.expose_secret().to_owned()),
    };
    let mut auth = AuthLayer::new(lookup).layer(tower::service_fn(bare));
    let mut plain = tower::service_fn(bare);
    let peer: SocketAddr = "198.51.100.1:4000".parse().expect("peer");
    let mut ok = 0usize;
    for _ in 0..n {
        let mut req = Request::get("/v1/health")
            .header(name, value.as_str())
            .header("user-agent", "bench/1.0")
            .header("accept", "application/json")
            .body(Body::default())
            .expect("request");
        req.extensions_mut().insert(PeerAddr(peer));
        let status = if mode == "bare" {
            now(plain.call(req)).map(|r| r.status())
        } else {
            now(auth.call(req)).map(|r| r.status())
        };
        ok += usize::from(status == Ok(StatusCode::OK));
    }
    assert_eq!(ok, n, "every request admitted");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [n, mode] => run(n.parse().expect("N"), mode),
        _ => {
            for mode in ["bare", "x-api-key", "bearer"] {
                run(10, mode);
            }
        }
    }
}
