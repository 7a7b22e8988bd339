//! The shipped examples run protected as documented, with plain `cargo run --example NAME`:
//! the grpc and hyper examples cut off a client that sends invalid keys, and the hyper one
//! shares one budget per key across connections (its layer is built once).

mod common;

use common::{example, send};
use http::Method;
use keygate::key::Environment;
use keygate::key::KeyFormat;
use tonic::metadata::MetadataValue;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test]
async fn the_grpc_example_cuts_off_invalid_keys_and_serves_valid_ones() {
    let ex = example("grpc", &[]).await;
    let key = ex.vars["KEY_FULL"].clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", ex.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = HealthClient::new(channel);
    let call = |key: String| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            });
            request
                .metadata_mut()
                .insert("x-api-key", MetadataValue::try_from(key.as_str()).unwrap());
            match client.check(request).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            }
        }
    };
    assert_eq!(call(key.clone()).await, Code::Ok);
    let format = KeyFormat::default();
    let mut codes = Vec::new();
    for _ in 0..100 {
        let unknown = format.generate(Environment::Live).unwrap();
        codes.push(call(unknown.expose_secret().to_owned()).await);
    }
    let unauthenticated = codes
        .iter()
        .filter(|c| **c == Code::Unauthenticated)
        .count();
    let exhausted = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert_eq!((unauthenticated, exhausted), (20, 80), "{codes:?}");
    assert_eq!(call(key).await, Code::Ok, "the valid key still passes");
    // It counted by the client's own address: no warning that it could not.
    assert!(
        !ex.log().contains("cannot learn the client IP"),
        "{}",
        ex.log()
    );
}

#[tokio::test]
async fn the_hyper_example_shares_one_budget_across_connections() {
    let ex = example("hyper", &[]).await;
    let key = ex.vars["KEY_FULL"].clone();
    let mut statuses = Vec::new();
    // `send` opens a new connection for every request.
    for _ in 0..70 {
        let reply = send(
            ex.addr,
            Method::GET,
            "/v1/health",
            &[("x-api-key", &key)],
            "",
        )
        .await;
        statuses.push(reply.status.as_u16());
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((admitted, limited), (60, 10), "{statuses:?}");
    let reply = send(
        ex.addr,
        Method::GET,
        "/v1/health",
        &[("x-api-key", &key)],
        "",
    )
    .await;
    assert_eq!(reply.headers["x-ratelimit-limit"], "60");

    let format = KeyFormat::default();
    let mut codes = Vec::new();
    for _ in 0..25 {
        let unknown = format.generate(Environment::Live).unwrap();
        let reply = send(
            ex.addr,
            Method::GET,
            "/v1/health",
            &[("x-api-key", unknown.expose_secret())],
            "",
        )
        .await;
        codes.push(reply.code());
    }
    let turned_away = codes
        .iter()
        .filter(|c| *c == "too_many_failed_attempts")
        .count();
    assert_eq!(turned_away, 5, "{codes:?}");
    assert!(
        !ex.log().contains("cannot learn the client IP"),
        "{}",
        ex.log()
    );
}
