//! keygate in front of a real tonic server (the standard `grpc.health.v1.Health` service),
//! called over a socket by a real tonic client.
//!
//! Rejections of gRPC requests are trailers-only replies, so a stock client must see the
//! gRPC status of the rejection table, not a transport error.

use std::net::SocketAddr;

use keygate::error::BoxError;
use keygate::key::ApiKey;
use keygate::key::Environment;
use keygate::lookup::CachedLookup;
use keygate::record::{Owner, Status};
use keygate::reject::Reason;
use keygate::store::MemoryStore;
use keygate::{AuthLayer, AuthService};
use tokio::net::TcpListener;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::Service;

/// Serves the health service behind `auth` on a fresh port; a client connected to it.
async fn serve(auth: AuthLayer<MemoryStore>) -> Result<HealthClient<Channel>, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = Server::builder()
        .layer(auth)
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener));
    // Spawning also proves the whole server future is `Send`.
    tokio::spawn(server);
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(HealthClient::new(channel))
}

/// `Check` for the whole server (service `""`) with these metadata entries: the serving
/// status, or the gRPC status the client saw. The outer `Result` is for test set-up errors.
async fn check(
    client: &HealthClient<Channel>,
    metadata: &[(&'static str, &str)],
) -> Result<Result<ServingStatus, tonic::Status>, BoxError> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    for (name, value) in metadata {
        request.metadata_mut().insert(
            MetadataKey::from_static(name),
            MetadataValue::try_from(*value)?,
        );
    }
    Ok(client
        .clone()
        .check(request)
        .await
        .map(|response| response.into_inner().status()))
}

/// The gRPC code of a call: `Ok` when it succeeded.
async fn code(
    client: &HealthClient<Channel>,
    metadata: &[(&'static str, &str)],
) -> Result<Code, BoxError> {
    Ok(match check(client, metadata).await? {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    })
}

fn issue(store: &MemoryStore, scopes: &[&str]) -> Result<ApiKey, BoxError> {
    let scopes = scopes.iter().copied().collect::<keygate::record::Scopes>();
    Ok(
        store.issue(Owner::new("o1", "ada"), Environment::Live, |r| {
            r.with_scopes(scopes)
        })?,
    )
}

#[tokio::test]
async fn no_key_is_unauthenticated() -> Result<(), BoxError> {
    let client = serve(AuthLayer::new(MemoryStore::new())).await?;
    let status = match check(&client, &[]).await? {
        Ok(serving) => return Err(format!("accepted without a key: {serving:?}").into()),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), Reason::MissingApiKey.message());
    Ok(())
}

#[tokio::test]
async fn a_valid_key_in_either_metadata_entry_is_served() -> Result<(), BoxError> {
    let store = MemoryStore::new();
    let key = issue(&store, &["read"])?;
    let client = serve(AuthLayer::new(store)).await?;

    let in_x_api_key = check(&client, &[("x-api-key", key.expose_secret())]).await?;
    assert_eq!(
        in_x_api_key.map_err(|s| s.code()),
        Ok(ServingStatus::Serving)
    );

    let bearer = format!("Bearer {}", key.expose_secret());
    let in_authorization = check(&client, &[("authorization", &bearer)]).await?;
    assert_eq!(
        in_authorization.map_err(|s| s.code()),
        Ok(ServingStatus::Serving)
    );

    // A rejection on one stream leaves the connection usable for the next call.
    assert_eq!(code(&client, &[]).await?, Code::Unauthenticated);
    assert_eq!(
        code(&client, &[("x-api-key", key.expose_secret())]).await?,
        Code::Ok
    );
    Ok(())
}

#[tokio::test]
async fn unknown_and_malformed_keys_are_unauthenticated() -> Result<(), BoxError> {
    let store = MemoryStore::new();
    issue(&store, &["read"])?;
    // Well formed (right prefix, valid checksum) but issued by another store.
    let unknown = issue(&MemoryStore::new(), &["read"])?;
    let client = serve(AuthLayer::new(store)).await?;

    for (name, metadata) in [
        ("unknown", [("x-api-key", unknown.expose_secret())]),
        ("malformed", [("x-api-key", "kg_live_not-a-real-key")]),
    ] {
        let status = match check(&client, &metadata).await? {
            Ok(serving) => return Err(format!("{name} key accepted: {serving:?}").into()),
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::Unauthenticated, "{name}");
        assert_eq!(status.message(), Reason::InvalidApiKey.message(), "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn a_scope_required_by_the_layer_is_enforced() -> Result<(), BoxError> {
    let store = MemoryStore::new();
    let reader = issue(&store, &["read"])?;
    let admin = issue(&store, &["read", "admin"])?;
    let client = serve(AuthLayer::new(store).require_scopes(["admin"])).await?;

    let status = match check(&client, &[("x-api-key", reader.expose_secret())]).await? {
        Ok(serving) => return Err(format!("key without scope accepted: {serving:?}").into()),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), Reason::InsufficientScope.message());

    let served = check(&client, &[("x-api-key", admin.expose_secret())]).await?;
    assert_eq!(served.map_err(|s| s.code()), Ok(ServingStatus::Serving));
    Ok(())
}

#[tokio::test]
async fn a_disabled_key_is_unauthenticated_with_the_table_message() -> Result<(), BoxError> {
    let store = MemoryStore::new();
    let disabled = store.issue(Owner::new("o1", "ada"), Environment::Live, |r| {
        r.with_scopes(["read"]).with_status(Status::Disabled)
    })?;
    let client = serve(AuthLayer::new(store)).await?;

    let status = match check(&client, &[("x-api-key", disabled.expose_secret())]).await? {
        Ok(serving) => return Err(format!("disabled key accepted: {serving:?}").into()),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "The API key is disabled.");
    assert_eq!(status.message(), Reason::ApiKeyDisabled.message());
    Ok(())
}

/// Compile-time: the layered tonic stack can be shared and moved across threads, with the
/// in-memory store and with the cache in front of it.
#[test]
fn the_tonic_stack_is_send_and_sync() {
    type Stack<L> = AuthService<tonic::service::Routes, L>;
    type StackFuture<L> = <Stack<L> as Service<http::Request<tonic::body::Body>>>::Future;
    fn assert_send<T: Send>() {}
    fn assert_sync<T: Sync>() {}

    assert_send::<AuthLayer<MemoryStore>>();
    assert_sync::<AuthLayer<MemoryStore>>();
    assert_send::<Stack<MemoryStore>>();
    assert_sync::<Stack<MemoryStore>>();
    assert_send::<StackFuture<MemoryStore>>();

    assert_send::<AuthLayer<CachedLookup<MemoryStore>>>();
    assert_sync::<AuthLayer<CachedLookup<MemoryStore>>>();
    assert_send::<Stack<CachedLookup<MemoryStore>>>();
    assert_sync::<Stack<CachedLookup<MemoryStore>>>();
    assert_send::<StackFuture<CachedLookup<MemoryStore>>>();
}

/// With the `tonic` feature the client IP comes from tonic's own `TcpConnectInfo`, so
/// IP-restricted keys work with no extra layer.
#[cfg(feature = "tonic")]
#[tokio::test]
async fn the_client_ip_comes_from_tcp_connect_info() -> Result<(), BoxError> {
    use keygate::record::Restrictions;

    let store = MemoryStore::new();
    let restricted = |network: &str| -> Result<ApiKey, BoxError> {
        let restrictions = Restrictions {
            ips: vec![Restrictions::parse_network(network)?],
            sites: vec![],
        };
        Ok(
            store.issue(Owner::new("o1", "ada"), Environment::Live, |r| {
                r.with_restrictions(restrictions)
            })?,
        )
    };
    let local = restricted("127.0.0.0/8")?;
    let remote = restricted("10.0.0.0/8")?;
    let client = serve(AuthLayer::new(store.clone())).await?;
    assert_eq!(
        code(&client, &[("x-api-key", local.expose_secret())]).await?,
        Code::Ok
    );
    assert_eq!(
        code(&client, &[("x-api-key", remote.expose_secret())]).await?,
        Code::PermissionDenied
    );
    Ok(())
}

/// The assembled stack in tonic: past the key's limit a stock client sees
/// RESOURCE_EXHAUSTED, as the grpc example promises.
#[tokio::test]
async fn past_the_limit_is_resource_exhausted() -> Result<(), BoxError> {
    use keygate::ratelimit::Quota;
    use keygate::Keygate;

    let store = MemoryStore::new();
    let key = issue(&store, &["read"])?;
    let two = std::num::NonZeroU32::new(2).ok_or("zero")?;
    let keygate = Keygate::builder(store)
        .default_quota(Quota::per_minute(two))
        .build()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        Server::builder()
            .layer(keygate)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let client = HealthClient::new(channel);
    let metadata = [("x-api-key", key.expose_secret())];
    assert_eq!(code(&client, &metadata).await?, Code::Ok);
    assert_eq!(code(&client, &metadata).await?, Code::Ok);
    let status = check(&client, &metadata)
        .await?
        .err()
        .ok_or("third call passed")?;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), Reason::RateLimited.message());
    assert_eq!(code(&client, &[]).await?, Code::Unauthenticated);
    Ok(())
}

/// tonic routes by path alone, so an `OPTIONS` to a method's path would run the method.
/// Without a key it never does: a bare `OPTIONS` needs a key, a real preflight is answered
/// by keygate itself (204), and a gRPC request is never taken for a preflight.
#[tokio::test]
async fn options_never_runs_a_grpc_method_without_a_key() -> Result<(), BoxError> {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let store = MemoryStore::new();
    let key = issue(&store, &["read"])?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        Server::builder()
            .layer(AuthLayer::new(store))
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    // An empty HealthCheckRequest in a gRPC frame: what the method would happily decode.
    let frame = Bytes::from_static(&[0, 0, 0, 0, 0]);
    let preflight = [
        ("origin", "https://a.example"),
        ("access-control-request-method", "POST"),
    ];
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let with_key = [("x-api-key", key.expose_secret())];
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let cases: [(&str, Headers, u16, Option<&str>); 5] = [
        ("bare", &[], 401, None),
        ("preflight", &preflight, 204, None),
        ("gRPC", &grpc, 200, Some("16")),
        (
            "gRPC with preflight headers",
            &[grpc[0], grpc[1], preflight[0], preflight[1]],
            200,
            Some("16"),
        ),
        ("bare with a key", &with_key, 200, None),
    ];
    for (name, headers, status, grpc_status) in cases {
        let mut builder = http::Request::builder()
            .method(http::Method::OPTIONS)
            .uri(format!("http://{addr}/grpc.health.v1.Health/Check"));
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        let res = client
            .request(builder.body(Full::new(frame.clone()))?)
            .await?;
        assert_eq!(res.status().as_u16(), status, "{name}");
        let (parts, body) = res.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let code = parts
            .headers
            .get("grpc-status")
            .or_else(|| trailers.get("grpc-status"))
            .map(|v| v.to_str().unwrap_or("?").to_owned());
        if name == "bare with a key" {
            // With a key it is an ordinary authenticated call: tonic answers it.
            assert_eq!(code.as_deref(), Some("0"), "{name}");
            continue;
        }
        assert_eq!(code.as_deref(), grpc_status, "{name}: the method ran");
        let body = collected.to_bytes();
        assert!(
            body.is_empty() || body.starts_with(b"{\"code\""),
            "{name}: not keygate's answer: {body:?}"
        );
    }
    Ok(())
}
