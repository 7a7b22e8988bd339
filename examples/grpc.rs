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
//! Set `KEYGATE_ADDR` to listen elsewhere than `127.0.0.1:50051`.

use std::io::Write;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;

use keygate::ratelimit::Quota;
use keygate::record::{Environment, Owner};
use keygate::store::MemoryStore;
use keygate::Keygate;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

#[tokio::main]
async fn main() -> ExitCode {
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
    let server = Server::builder()
        .layer(keygate)
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener));
    if let Err(e) = server.await {
        eprintln!("server error: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
