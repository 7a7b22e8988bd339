//! OAuth2 clients (RFC 6749 §4.4, client credentials): [`ClientStore`], an ability of the
//! stores that keep owners.
//!
//! A client belongs to an owner and has a public id (`kgc_` and 20 base62 characters) and a
//! secret (`kgcs_` and 32 base62 characters) shown once, at creation: the store keeps only
//! its SHA-256 ([`KeyHash`]). The access tokens the key service issues to a client are
//! ordinary keys whose [`rate_bucket`](crate::record::KeyRecord::rate_bucket) is the client's
//! id: they share the client's budget, and [`ClientStore::revoke_client`] revokes them with
//! the client.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use keygate::store::{ClientStore, MemoryStore, NewClient, OwnerStore, StoreError};
//!
//! let store = MemoryStore::new();
//! store.add_owner("ada", None).await?;
//! let created = store.create_client(NewClient::new("ada", "billing")).await?;
//! println!("CLIENT_ID={}", created.client.id);
//! println!("CLIENT_SECRET={}", created.secret.expose_secret()); // the only time it is shown
//! let client = store.verify_client(&created.client.id, created.secret.expose_secret()).await?;
//! assert_eq!(client.name, "billing");
//! store.revoke_client(&client.id).await?;
//! assert_eq!(
//!     store.verify_client(&client.id, created.secret.expose_secret()).await,
//!     Err(StoreError::InvalidCredentials)
//! );
//! # Ok::<_, StoreError>(())
//! # }).unwrap();
//! ```

use std::future::Future;
use std::time::SystemTime;

use serde::Serialize;
use subtle::ConstantTimeEq;

use super::{OwnerStore, StoreError};
use crate::key::{ApiKey, KeyHash};
use crate::record::Scopes;

/// The prefix of a client id.
pub(crate) const CLIENT_ID_PREFIX: &str = "kgc_";
/// The prefix of a client secret.
pub(crate) const CLIENT_SECRET_PREFIX: &str = "kgcs_";
/// The use case of the keys that are a client's access tokens (the key service's
/// `POST /oauth/token` issues them; [`ClientStore::purge_expired_tokens`] removes them).
pub const TOKEN_USE_CASE: &str = "keygate:oauth2";
/// Random base62 characters in a client id.
const CLIENT_ID_LEN: usize = 20;
/// Random base62 characters in a client secret (about 190 bits).
const CLIENT_SECRET_LEN: usize = 32;

/// An OAuth2 client, as a store returns it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OAuthClient {
    /// Public identifier: `kgc_` and 20 base62 characters.
    pub id: String,
    /// The owner's name.
    pub owner: String,
    /// A name, in the owner's words.
    pub name: String,
    /// The scopes the client may be granted.
    pub scopes: Scopes,
    /// When the client was created, as its store knows it.
    pub created_at: Option<SystemTime>,
    /// `false` once revoked (for good).
    pub active: bool,
}

/// What [`ClientStore::create_client`] needs. Start from [`NewClient::new`] and set the
/// public fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NewClient {
    /// The owner's name; the owner must exist.
    pub owner: String,
    /// A name, not empty (checked like a key's name).
    pub name: String,
    /// The scopes the client may be granted (checked like a key's scopes).
    pub scopes: Scopes,
}

impl NewClient {
    /// A client of `owner` named `name`, with no scopes.
    pub fn new(owner: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            owner: owner.into(),
            name: name.into(),
            scopes: Scopes::none(),
        }
    }

    /// The same client, with these scopes.
    #[must_use]
    pub fn with_scopes(mut self, scopes: impl Into<Scopes>) -> Self {
        self.scopes = scopes.into();
        self
    }

    pub(crate) fn check(&self) -> Result<(), StoreError> {
        super::check_name(&self.name)?;
        super::check_scopes(&self.scopes)
    }
}

/// A client just made, and its secret: shown once, it cannot be read back.
#[derive(Debug)]
pub struct CreatedClient {
    /// The client as stored.
    pub client: OAuthClient,
    /// The secret (`kgcs_` and 32 base62 characters); only its SHA-256 is stored.
    pub secret: ApiKey,
}

/// OAuth2 clients and their credentials: an ability of the stores that keep owners (both
/// stores here). Every implementation runs the conformance suite.
pub trait ClientStore: OwnerStore {
    /// Creates a client for an existing owner and returns its secret, the only time it is
    /// seen. Audit: `ClientCreated` (its `key_id` is the client's id).
    ///
    /// # Errors
    ///
    /// [`StoreError::OwnerNotFound`], [`StoreError::Invalid`] (name, scopes).
    fn create_client(
        &self,
        new: NewClient,
    ) -> impl Future<Output = Result<CreatedClient, StoreError>> + Send;

    /// One client by id, revoked ones too.
    ///
    /// # Errors
    ///
    /// [`StoreError::ClientNotFound`] for an unknown id.
    fn client(&self, id: &str) -> impl Future<Output = Result<OAuthClient, StoreError>> + Send;

    /// An owner's clients, revoked ones too, by id.
    ///
    /// # Errors
    ///
    /// [`StoreError::OwnerNotFound`] for an unknown owner.
    fn clients(
        &self,
        owner: &str,
    ) -> impl Future<Output = Result<Vec<OAuthClient>, StoreError>> + Send;

    /// Revokes a client for good, and with it every key (its access tokens) whose
    /// [`rate_bucket`](crate::record::KeyRecord::rate_bucket) is `KeyId::new(id)` and that
    /// is not yet revoked or deleted, in one transaction; the caches are told of every
    /// revoked token. From then on no key naming the client can be created. Audit:
    /// `ClientRevoked` (when the client was active) and one `Revoked` per token. Idempotent:
    /// revoking a revoked client succeeds (and revokes any token left).
    ///
    /// # Errors
    ///
    /// [`StoreError::ClientNotFound`] for an unknown id.
    fn revoke_client(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<OAuthClient, StoreError>> + Send;

    /// Checks a client's credentials: the SHA-256 of `secret` compared in constant time with
    /// the stored one, the same work done for an unknown id.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidCredentials`] for an unknown id, a wrong secret, a revoked client
    /// or an inactive owner alike (which one is never said).
    fn verify_client(
        &self,
        id: &str,
        secret: &str,
    ) -> impl Future<Output = Result<OAuthClient, StoreError>> + Send;

    /// The client whose secret this is, if any (active or revoked), found by the secret's
    /// SHA-256 (the only thing stored). For a leaked client secret: a scanner's alert or
    /// its finder can then revoke the client. A string longer than 256 bytes is no secret:
    /// `Ok(None)`, without hashing it.
    ///
    /// # Errors
    ///
    /// Only the backend's.
    fn client_by_secret(
        &self,
        secret: &str,
    ) -> impl Future<Output = Result<Option<OAuthClient>, StoreError>> + Send;

    /// Removes, for good, the client's access tokens (keys with
    /// [`rate_bucket`](crate::record::KeyRecord::rate_bucket) `KeyId::new(client_id)` and use
    /// case [`TOKEN_USE_CASE`]) that expired before `before`, at most `limit` of them (those
    /// that expired first), with their hashes, in one transaction; returns how many. Their
    /// audit events stay (they name the key id); no event is added. Nothing else is touched:
    /// not the client's live tokens, not another client's, not any key that is not a token.
    /// The caches are told of the removed hashes. An unknown client removes nothing.
    ///
    /// # Errors
    ///
    /// Only the backend's.
    fn purge_expired_tokens(
        &self,
        client_id: &str,
        before: SystemTime,
        limit: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
}

/// The longest string [`ClientStore::client_by_secret`] hashes and looks for, in bytes.
pub(crate) const MAX_SECRET_LEN: usize = 256;

/// A new key naming a revoked client as its rate bucket.
pub(crate) const REVOKED: StoreError = StoreError::InvalidState(
    "revoked",
    "the key's rate bucket names a revoked client, which can have no new tokens",
);

/// A fresh client id and secret.
pub(crate) fn generate() -> Result<(String, ApiKey), StoreError> {
    let id = crate::key::random_base62(CLIENT_ID_PREFIX, CLIENT_ID_LEN)?;
    let secret = crate::key::random_base62(CLIENT_SECRET_PREFIX, CLIENT_SECRET_LEN)?;
    Ok((id, ApiKey::new(secret)))
}

/// The client, if `secret` hashes to the stored hash and both the client and its owner are
/// active. `found` is `None` for an unknown id: the secret is hashed and compared all the
/// same (against a hash no secret has), so that every failure costs the same and reads the
/// same.
pub(crate) fn check_secret(
    found: Option<(OAuthClient, KeyHash, bool)>,
    secret: &str,
) -> Result<OAuthClient, StoreError> {
    let presented = KeyHash::of(secret);
    let (client, stored, owner_active) = match found {
        Some((client, stored, owner_active)) => (Some(client), stored, owner_active),
        None => (None, KeyHash::from_bytes([0; 32]), false),
    };
    let matches: bool = presented.as_bytes().ct_eq(stored.as_bytes()).into();
    match client {
        Some(client) if matches && client.active && owner_active => Ok(client),
        _ => Err(StoreError::InvalidCredentials),
    }
}
