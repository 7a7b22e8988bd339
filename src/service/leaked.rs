//! Keys that leaked: `POST /v1/keys/revoke` (whoever holds a key may kill it) and
//! `POST /v1/keys/leaked` (GitHub's secret-scanning partner alerts, signed with ECDSA P-256).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine as _;
use http::StatusCode;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::{Deserialize, Serialize};

use super::fail::{Fail, Input, Json};
use super::{Client, St};
use crate::error::ConfigError;
use crate::key::{KeyHash, KeyId, PresentedKey};
use crate::record::{KeyRecord, Status};
use crate::store::{Actor, ClientStore, KeyStore, StoreError};

/// The largest alert batch read (GitHub may send many matches at once).
const MAX_ALERT_BODY: usize = 1024 * 1024;
/// The most matches one alert may carry.
const MAX_MATCHES: usize = 1000;
/// The actor of revocations by a leak report.
const SCANNER: &str = "github-secret-scanning";

/// A key revoked because it was found in public, as the hook of
/// [`KeyServiceBuilder::on_leak`](super::KeyServiceBuilder::on_leak) sees it. Never the secret.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LeakReport {
    /// The key.
    pub key_id: KeyId,
    /// Its owner's name.
    pub owner: Option<String>,
    /// Where it was found (a public URL; may be empty).
    pub url: String,
    /// What kind of place (`commit`, `content`, `issue_comment`…).
    pub source: String,
    /// The secret type the scanner matched (the name registered with GitHub).
    pub token_type: String,
    /// Whether this report revoked it (false: it was revoked or deleted already).
    pub revoked_now: bool,
}

/// The hook told of every leaked key.
pub(crate) type LeakHook = Arc<dyn Fn(&LeakReport) + Send + Sync>;

/// What the leak endpoint trusts: GitHub's public keys by identifier, and the hook.
#[derive(Clone, Default)]
pub(crate) struct Scanners {
    keys: HashMap<String, VerifyingKey>,
    pub(crate) hook: Option<LeakHook>,
}

impl std::fmt::Debug for Scanners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanners")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

#[derive(Deserialize)]
struct PublicKeys {
    public_keys: Vec<PublicKey>,
}

#[derive(Deserialize)]
struct PublicKey {
    key_identifier: String,
    key: String,
}

impl Scanners {
    /// Adds the keys of a document shaped like GitHub's
    /// `https://api.github.com/meta/public_keys/secret_scanning`.
    pub(crate) fn add_github_keys(&mut self, document: &str) -> Result<(), ConfigError> {
        let bad = || ConfigError::InvalidValue("GitHub secret-scanning public keys");
        let parsed: PublicKeys = serde_json::from_str(document).map_err(|_| bad())?;
        if parsed.public_keys.is_empty() {
            return Err(bad());
        }
        for key in parsed.public_keys {
            let verifying = VerifyingKey::from_public_key_pem(&key.key).map_err(|_| bad())?;
            self.keys.insert(key.key_identifier, verifying);
        }
        Ok(())
    }

    /// Whether `signature` (base64 of a DER ECDSA signature) under the key `identifier`
    /// signs `body`, byte for byte.
    fn verify(&self, identifier: &str, signature: &str, body: &[u8]) -> bool {
        let Some(key) = self.keys.get(identifier) else {
            return false;
        };
        let Ok(der) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
            return false;
        };
        let Ok(signature) = Signature::from_der(&der) else {
            return false;
        };
        key.verify(body, &signature).is_ok()
    }
}

/// `{"key": "<secret>"}`.
#[derive(Deserialize)]
pub(crate) struct RevokeBody {
    key: String,
}

impl std::fmt::Debug for RevokeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RevokeBody(..)")
    }
}

impl Input for RevokeBody {
    const FIELDS: &'static [&'static str] = &["key"];
}

/// The record of a presented secret, in any state. Its `expires_at` is the secret's own
/// end: for an earlier secret of a rotated key, the end of its grace.
async fn find_any<S: KeyStore>(store: &S, secret: &str) -> Result<Option<KeyRecord>, StoreError> {
    if secret.is_empty() || secret.len() > 256 {
        return Ok(None);
    }
    let found = store
        .lookup(&PresentedKey::new(secret))
        .await
        .map_err(|e| {
            let e: crate::error::BoxError = e.into();
            StoreError::Backend(crate::store::BackendError::plain(format!("lookup: {e}")))
        })?;
    Ok(found.map(|record| (*record).clone()))
}

/// Whether the presented secret is past its end (the key's expiry, or the grace of a
/// rotation): such a secret opens nothing, and must not kill the key that replaced it.
fn spent(record: &KeyRecord, now: std::time::SystemTime) -> bool {
    record.expires_at.is_some_and(|at| at <= now)
}

/// The record a presented secret still opens: active or disabled, not spent. Anything
/// else (unknown, deleted, revoked, spent) reads alike.
async fn find<S: KeyStore>(
    store: &S,
    secret: &str,
    now: std::time::SystemTime,
) -> Result<Option<KeyRecord>, StoreError> {
    Ok(find_any(store, secret).await?.filter(|record| {
        matches!(record.status, Status::Active | Status::Disabled) && !spent(record, now)
    }))
}

/// Revokes `record` unless it is revoked or deleted already; whether it did.
async fn kill<S: KeyStore>(store: &S, record: &KeyRecord) -> Result<bool, StoreError> {
    if matches!(record.status, Status::Revoked | Status::Deleted) {
        return Ok(false);
    }
    match store.set_status(&record.id, Status::Revoked).await {
        Ok(_) => Ok(true),
        // Revoked or deleted meanwhile.
        Err(StoreError::InvalidState(..) | StoreError::KeyNotFound(_)) => Ok(false),
        Err(other) => Err(other),
    }
}

#[derive(Serialize)]
struct Revoked {
    revoked: bool,
}

/// `POST /v1/keys/revoke`: always the same 200, known key or not. Unknown keys count
/// against the caller's address like failed sign-ins, so the endpoint is no guessing oracle.
pub(crate) async fn revoke_by_key<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    Client(ip): Client,
    Json(body): Json<RevokeBody>,
) -> Result<Response, Fail> {
    let attempt = shared.logins.begin_address(ip).map_err(Fail::too_many)?;
    let store = shared.store.acting(Actor::new("self-revoke").with_ip(ip));
    match find(&store, &body.key, shared.clock.now()).await {
        Ok(Some(record)) => {
            shared.logins.address_ok(attempt);
            kill(&store, &record).await?;
        }
        // Not a key: perhaps an OAuth2 client's secret, which kills the client.
        Ok(None) => match store.client_by_secret(&body.key).await {
            Ok(Some(client)) if client.active => {
                shared.logins.address_ok(attempt);
                store.revoke_client(&client.id).await?;
            }
            Ok(_) => {}
            Err(error) => {
                shared.logins.address_ok(attempt);
                return Err(error.into());
            }
        },
        Err(error) => {
            shared.logins.address_ok(attempt);
            return Err(error.into());
        }
    }
    Ok(super::private(StatusCode::OK, &Revoked { revoked: true }))
}

/// One match of a GitHub alert.
#[derive(Deserialize)]
struct Match {
    token: String,
    #[serde(rename = "type", default)]
    token_type: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    source: String,
}

/// The partner feedback for one match.
#[derive(Serialize)]
struct Feedback {
    token_hash: String,
    token_type: String,
    label: &'static str,
}

fn unsigned() -> Fail {
    Fail::new(
        StatusCode::UNAUTHORIZED,
        "invalid_signature",
        "The alert's signature does not verify against a configured GitHub public key.",
    )
}

/// `POST /v1/keys/leaked`: verifies the signature over the raw body first, then revokes
/// every matching key, records it (the store's audit trail, actor
/// `github-secret-scanning`), tells the hook, and answers GitHub's partner feedback.
pub(crate) async fn leaked<S: ClientStore + Send + Sync + 'static>(
    State(shared): St<S>,
    Client(ip): Client,
    request: Request,
) -> Result<Response, Fail> {
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (Some(identifier), Some(signature)) = (
        header("github-public-key-identifier"),
        header("github-public-key-signature"),
    ) else {
        return Err(unsigned());
    };
    let bytes = match http_body_util::BodyExt::collect(http_body_util::Limited::new(
        Body::new(body),
        MAX_ALERT_BODY,
    ))
    .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(Fail::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("An alert is at most {MAX_ALERT_BODY} bytes."),
            ))
        }
    };
    if !shared.scanners.verify(&identifier, &signature, &bytes) {
        return Err(unsigned());
    }
    let matches: Vec<Match> = serde_json::from_slice(&bytes).map_err(|_| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "An alert is a JSON list of {token, type, url, source}.",
        )
    })?;
    if matches.len() > MAX_MATCHES {
        return Err(Fail::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("An alert carries at most {MAX_MATCHES} matches."),
        ));
    }
    let store = shared.store.acting(Actor::new(SCANNER).with_ip(ip));
    let mut feedback = Vec::with_capacity(matches.len());
    for found in matches {
        let record = find_any(&store, &found.token).await?;
        let label = match &record {
            // A real secret, but spent: nothing to revoke (its key may live on under a new
            // secret, which this report must not kill).
            Some(record) if spent(record, shared.clock.now()) => "true_positive",
            Some(record) => {
                // Revoked (unless it was already) and the report recorded, in one write.
                let revoked_now = match store.report_leak(&record.id).await {
                    Ok((_, revoked_now)) => revoked_now,
                    // Gone meanwhile: nothing left to revoke.
                    Err(StoreError::KeyNotFound(_)) => false,
                    Err(other) => return Err(other.into()),
                };
                tracing::warn!(
                    target: "keygate",
                    key_id = %record.id,
                    revoked_now,
                    source = %found.source.chars().take(64).collect::<String>(),
                    "a key was reported leaked by GitHub secret scanning",
                );
                if let Some(hook) = &shared.scanners.hook {
                    hook(&LeakReport {
                        key_id: record.id.clone(),
                        owner: record.owner.as_ref().map(|o| o.name.clone()),
                        url: found.url.clone(),
                        source: found.source.clone(),
                        token_type: found.token_type.clone(),
                        revoked_now,
                    });
                }
                "true_positive"
            }
            // Not a key: an OAuth2 client's secret is revoked with its client (and every
            // token it holds).
            None => match store.client_by_secret(&found.token).await? {
                Some(client) => {
                    if client.active {
                        store.revoke_client(&client.id).await?;
                        tracing::warn!(
                            target: "keygate",
                            client_id = %client.id,
                            "an OAuth2 client secret was reported leaked by GitHub secret scanning",
                        );
                    }
                    "true_positive"
                }
                None => "false_positive",
            },
        };
        feedback.push(Feedback {
            token_hash: KeyHash::of(&found.token).to_hex(),
            token_type: found.token_type,
            label,
        });
    }
    Ok(super::private(StatusCode::OK, &feedback))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::{EncodePublicKey as _, LineEnding};

    /// GitHub's own published example verifies.
    #[test]
    fn githubs_documented_example_verifies() {
        let document = r#"{"public_keys":[{"key_identifier":"bcb53661c06b4728e59d897fb6165d5c9cda0fd9cdf9d09ead458168deb7518c","key":"-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEYAGMWO8XgCamYKMJS6jc/qgvSlAd\nAjPuDPRcXU22YxgBrz+zoN19MzuRyW87qEt9/AmtoNP5GrobzUvQSyJFVw==\n-----END PUBLIC KEY-----\n","is_current":true}]}"#;
        let mut scanners = Scanners::default();
        scanners.add_github_keys(document).unwrap();
        let body = br#"[{"source":"commit","token":"some_token","type":"some_type","url":"https://example.com/base-repo-url/"}]"#;
        let id = "bcb53661c06b4728e59d897fb6165d5c9cda0fd9cdf9d09ead458168deb7518c";
        let signature = "MEQCIQDaMKqrGnE27S0kgMrEK0eYBmyG0LeZismAEz/BgZyt7AIfXt9fErtRS4XaeSt/AO1RtBY66YcAdjxji410VQV4xg==";
        assert!(scanners.verify(id, signature, body));
        // One byte more, another key id, a mangled signature: refused.
        let mut longer = body.to_vec();
        longer.push(b' ');
        assert!(!scanners.verify(id, signature, &longer));
        assert!(!scanners.verify("other", signature, body));
        assert!(!scanners.verify(id, &signature[4..], body));
        assert!(!scanners.verify(id, "not base64!", body));
    }

    #[test]
    fn a_key_pair_made_here_signs_and_verifies() {
        let signing = SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let pem = signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let document = serde_json::json!({"public_keys": [{"key_identifier": "k1", "key": pem, "is_current": true}]});
        let mut scanners = Scanners::default();
        scanners.add_github_keys(&document.to_string()).unwrap();
        let body = b"[]";
        let signature: Signature = signing.sign(body);
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes());
        assert!(scanners.verify("k1", &encoded, body));
        assert!(Scanners::default().add_github_keys("{}").is_err());
        assert!(Scanners::default()
            .add_github_keys(r#"{"public_keys":[{"key_identifier":"x","key":"not pem"}]}"#)
            .is_err());
    }
}
