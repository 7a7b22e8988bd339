//! The standard gRPC health service behind keygate: `cargo run --example grpc`.
//!
//! Prints the address and a demo key (`KEY_FULL`, scope `read`, 60 requests a minute),
//! then serves
//! `grpc.health.v1.Health`. The key is read from the `x-api-key` metadata entry or from
//! `authorization: Bearer <key>`; without a valid one, any gRPC client sees
//! `UNAUTHENTICATED`, and past 60 calls in a minute `RESOURCE_EXHAUSTED`.
//!
//! ```text
//! grpcurl -plaintext -H "x-api-key: $KEY_FULL" 127.0.0.1:50051 grpc.health.v1.Health/Check
//! ```
//!
//! Set `KEYGATE_ADDR` to listen elsewhere than `127.0.0.1:50051`. A client that sends more
//! than 20 invalid keys a minute gets `RESOURCE_EXHAUSTED` before its keys are looked up;
//! for that keygate needs the client's address, which this example hands it from tonic's
//! `TcpConnectInfo` (with keygate's `tonic` feature on, keygate reads it by itself).
//! Warnings go to stderr (`RUST_LOG=keygate=debug` for every decision).

use std::io::Write;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;

use keygate::key::Environment;
use keygate::ratelimit::Quota;
use keygate::record::Owner;
use keygate::store::MemoryStore;
use keygate::validate::PeerAddr;
use keygate::Keygate;
use tonic::transport::server::{TcpConnectInfo, TcpIncoming};
use tonic::transport::Server;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("keygate=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let addr = std::env::var("KEYGATE_ADDR").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("KEYGATE_ADDR={addr:?} is not a socket address ({e}); try 127.0.0.1:50051");
            return ExitCode::from(2);
        }
    };

    let store = MemoryStore::new();
    let full = match store.issue(Owner::new("owner_demo", "demo"), Environment::Live, |r| {
        r.with_name("full access").with_scopes(["read"])
    }) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("could not create the demo key: {e}");
            return ExitCode::FAILURE;
        }
    };

    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    println!("KEY_FULL={}", full.expose_secret());
    println!("listening on {local}");
    let _ = std::io::stdout().flush();

    // Authentication and 60 requests a minute per key; past it, RESOURCE_EXHAUSTED.
    let keygate = match Keygate::builder(store)
        .default_quota(Quota::per_minute(NonZeroU32::MIN.saturating_add(59)))
        .build()
    {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("bad keygate configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (_reporter, health) = tonic_health::server::health_reporter();
    // The peer address, for IP allowlists and the failed-attempt limiter. With keygate's
    // `tonic` feature this layer is not needed.
    let peer = tower::ServiceBuilder::new().map_request(|mut req: http::Request<_>| {
        let addr = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr);
        if let Some(addr) = addr {
            req.extensions_mut().insert(PeerAddr(addr));
        }
        req
    });
    // Reflection, so that grpcurl needs no .proto file (it sits behind keygate too).
    let reflection = match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        Ok(service) => service,
        Err(e) => {
            eprintln!("cannot build the reflection service: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = Server::builder()
        .layer(peer)
        .layer(keygate)
        .add_service(health)
        .add_service(reflection)
        .serve_with_incoming(TcpIncoming::from(listener));
    if let Err(e) = server.await {
        eprintln!("server error: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
