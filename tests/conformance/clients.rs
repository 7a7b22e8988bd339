//! OAuth2 clients and the rate bucket their tokens share.

use keygate::clock::{Clock, FakeClock};
use keygate::key::ApiKey;
use keygate::key::{Environment, KeyId};
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::record::{Scopes, Status};
use keygate::reject::Reason;
use std::time::Duration;

use keygate::store::{
    AuditAction, AuditQuery, ClientStore, KeyUpdate, NewClient, NewKey, Page, StoreError,
    TOKEN_USE_CASE,
};

use super::{events, verdict};

/// Clients are made for existing owners with checked names and scopes, read back by id and
/// by owner (never a secret), verified in one way for every failure, and revoked for good.
pub async fn clients_create_list_verify_revoke<S: ClientStore>(
    store: &S,
    other: &S,
    clock: &FakeClock,
) {
    store.add_owner("ada", None).await.unwrap();
    store.add_owner("bob", None).await.unwrap();
    let created = store
        .create_client(NewClient::new("ada", "billing").with_scopes(["read", "write"]))
        .await
        .unwrap();
    let client = created.client.clone();
    let secret = created.secret.expose_secret().to_owned();
    assert!(
        client.id.starts_with("kgc_") && client.id.len() == 24,
        "{}",
        client.id
    );
    assert!(client.id[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
    assert!(secret.starts_with("kgcs_") && secret.len() == 37);
    assert!(secret[5..].bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(client.owner, "ada");
    assert_eq!(client.name, "billing");
    assert_eq!(client.scopes, Scopes::parse("read,write"));
    assert_eq!(client.created_at, Some(clock.now()));
    assert!(client.active);
    assert!(!format!("{:?}", client).contains(&secret));

    // Bad input writes nothing.
    assert_eq!(
        store
            .create_client(NewClient::new("nobody", "x"))
            .await
            .unwrap_err(),
        StoreError::OwnerNotFound("nobody".into())
    );
    for bad in [
        NewClient::new("ada", " "),
        NewClient::new("ada", "a\nb"),
        NewClient::new("ada", "ok").with_scopes(["a b"]),
    ] {
        assert!(matches!(
            store.create_client(bad).await,
            Err(StoreError::Invalid { .. })
        ));
    }

    let second = store
        .create_client(NewClient::new("ada", "reports"))
        .await
        .unwrap();
    assert_ne!(second.client.id, client.id);
    assert_ne!(second.secret.expose_secret(), secret);

    // Read back through the other handle.
    assert_eq!(other.client(&client.id).await.unwrap(), client);
    assert_eq!(
        other.client("kgc_unknown").await.unwrap_err(),
        StoreError::ClientNotFound("kgc_unknown".into())
    );
    let mut expected = vec![client.clone(), second.client.clone()];
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(other.clients("ada").await.unwrap(), expected);
    assert!(other.clients("bob").await.unwrap().is_empty());
    assert_eq!(
        other.clients("nobody").await.unwrap_err(),
        StoreError::OwnerNotFound("nobody".into())
    );

    // Verification: one answer for every failure.
    assert_eq!(
        other.verify_client(&client.id, &secret).await.unwrap(),
        client
    );
    let wrong = [
        (client.id.as_str(), "kgcs_wrong"),
        (client.id.as_str(), ""),
        (client.id.as_str(), second.secret.expose_secret()),
        ("kgc_unknown", secret.as_str()),
        ("", secret.as_str()),
        (second.client.id.as_str(), secret.as_str()),
    ];
    for (id, presented) in wrong {
        assert_eq!(
            other.verify_client(id, presented).await,
            Err(StoreError::InvalidCredentials)
        );
    }
    // An inactive owner's clients fail alike, until the owner is enabled again.
    store.set_owner_active("ada", false).await.unwrap();
    assert_eq!(
        other.verify_client(&client.id, &secret).await,
        Err(StoreError::InvalidCredentials)
    );
    store.set_owner_active("ada", true).await.unwrap();
    assert!(other.verify_client(&client.id, &secret).await.is_ok());

    // Revoked for good, idempotently.
    let revoked = store.revoke_client(&client.id).await.unwrap();
    assert!(!revoked.active);
    assert_eq!(revoked.id, client.id);
    assert_eq!(
        other.verify_client(&client.id, &secret).await,
        Err(StoreError::InvalidCredentials)
    );
    assert!(!other.client(&client.id).await.unwrap().active);
    assert!(!store.revoke_client(&client.id).await.unwrap().active);
    assert_eq!(
        store.revoke_client("kgc_unknown").await.unwrap_err(),
        StoreError::ClientNotFound("kgc_unknown".into())
    );
    // The other client is untouched.
    assert!(other
        .verify_client(&second.client.id, second.secret.expose_secret())
        .await
        .is_ok());
    assert_eq!(other.clients("ada").await.unwrap().len(), 2);

    // Audit: created, then revoked once, under the client's id.
    let trail = events(
        other,
        AuditQuery::default().with_key(KeyId::new(client.id.as_str())),
    )
    .await;
    let actions: Vec<_> = trail.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [AuditAction::ClientCreated, AuditAction::ClientRevoked]
    );
    assert!(trail.iter().all(|e| e.owner == "ada"));
}

/// `client_by_secret` finds the client a secret belongs to (revoked ones too, as they now
/// stand) and nothing for any other string: another secret's near miss, a client id, an
/// overlong string.
pub async fn client_by_secret_finds_its_client_only<S: ClientStore>(
    store: &S,
    other: &S,
    _: &FakeClock,
) {
    store.add_owner("ada", None).await.unwrap();
    store.add_owner("bob", None).await.unwrap();
    let one = store
        .create_client(NewClient::new("ada", "one"))
        .await
        .unwrap();
    let two = store
        .create_client(NewClient::new("bob", "two"))
        .await
        .unwrap();
    let secret = one.secret.expose_secret().to_owned();
    assert_eq!(
        other.client_by_secret(&secret).await.unwrap(),
        Some(one.client.clone())
    );
    assert_eq!(
        other
            .client_by_secret(two.secret.expose_secret())
            .await
            .unwrap(),
        Some(two.client.clone())
    );
    let long = "k".repeat(257);
    let near = [
        "",
        "kgcs_wrong",
        one.client.id.as_str(),
        two.client.id.as_str(),
        &secret[..secret.len() - 1],
        &format!("{secret}x"),
        &secret.to_uppercase(),
        &long,
        &format!("{secret}{long}"),
    ];
    for wrong in near {
        assert_eq!(
            other.client_by_secret(wrong).await.unwrap(),
            None,
            "{wrong}"
        );
    }

    // Revoked: still found, as it is now.
    store.revoke_client(&one.client.id).await.unwrap();
    let found = other.client_by_secret(&secret).await.unwrap().unwrap();
    assert!(!found.active);
    assert_eq!(found, other.client(&one.client.id).await.unwrap());
    assert!(
        other
            .client_by_secret(two.secret.expose_secret())
            .await
            .unwrap()
            .unwrap()
            .active
    );
}

/// `revoke_client` revokes the keys whose rate bucket is the client (its tokens), every
/// cache drops them, and nothing else changes; no token can be made for it afterwards.
pub async fn revoke_client_revokes_its_tokens_and_nothing_else<S: ClientStore>(
    store: &S,
    other: &S,
    clock: &FakeClock,
) {
    store.add_owner("ada", None).await.unwrap();
    store.add_owner("bob", None).await.unwrap();
    let one = store
        .create_client(NewClient::new("ada", "one"))
        .await
        .unwrap()
        .client;
    let two = store
        .create_client(NewClient::new("bob", "two"))
        .await
        .unwrap()
        .client;
    let token = |owner: &str, client: &str| {
        let mut new = NewKey::new(owner, "token", Environment::Live);
        new.use_case = "keygate:oauth2".into();
        new.rate_bucket = Some(KeyId::new(client));
        new
    };
    let t1 = store.create(token("ada", &one.id)).await.unwrap();
    let t2 = store.create(token("ada", &one.id)).await.unwrap();
    let t3 = store.create(token("ada", &one.id)).await.unwrap();
    let other_client = store.create(token("bob", &two.id)).await.unwrap();
    let plain = store
        .create(NewKey::new("ada", "plain", Environment::Live))
        .await
        .unwrap();
    store
        .set_status(&t2.record.id, Status::Disabled)
        .await
        .unwrap();
    store
        .set_status(&t3.record.id, Status::Deleted)
        .await
        .unwrap();

    // A cache over the store holding the token: told of the revocation.
    let cache = CachedLookup::builder(store.clone())
        .clock(clock.clone())
        .build_over_store()
        .unwrap();
    assert_eq!(verdict(&cache, &t1.secret, clock).await, Ok(()));
    assert_eq!(verdict(&cache, &plain.secret, clock).await, Ok(()));

    store.revoke_client(&one.id).await.unwrap();
    assert_eq!(
        verdict(&cache, &t1.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
    assert_eq!(
        verdict(other, &t2.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
    for (id, status) in [
        (&t1.record.id, Status::Revoked),
        (&t2.record.id, Status::Revoked),
        (&t3.record.id, Status::Deleted),
        (&other_client.record.id, Status::Active),
        (&plain.record.id, Status::Active),
    ] {
        assert_eq!(other.get(id).await.unwrap().status, status, "{id}");
    }
    assert_eq!(verdict(&cache, &plain.secret, clock).await, Ok(()));
    assert_eq!(verdict(other, &other_client.secret, clock).await, Ok(()));

    // One `Revoked` per token (the deleted one stays deleted), from active and disabled.
    for (key, old) in [(&t1, Status::Active), (&t2, Status::Disabled)] {
        let trail = events(other, AuditQuery::default().with_key(key.record.id.clone())).await;
        let last = trail.last().unwrap();
        assert_eq!(last.action, AuditAction::Revoked);
        assert_eq!(last.old_status, Some(old));
        assert_eq!(last.new_status, Some(Status::Revoked));
        assert_eq!(last.owner, "ada");
    }
    let revoked = events(other, AuditQuery::default().with_owner("ada"))
        .await
        .iter()
        .filter(|e| e.action == AuditAction::Revoked)
        .count();
    assert_eq!(revoked, 2);

    // No new token for a revoked client, and nothing written; plain keys still can be made.
    let before = other.list("ada", Page::default()).await.unwrap().len();
    assert!(matches!(
        store.create(token("ada", &one.id)).await,
        Err(StoreError::InvalidState(..))
    ));
    assert!(matches!(
        store.replace_keys(token("ada", &one.id)).await,
        Err(StoreError::InvalidState(..))
    ));
    assert_eq!(
        other.list("ada", Page::default()).await.unwrap().len(),
        before
    );
    assert_eq!(
        verdict(other, &plain.secret, clock).await,
        Ok(()),
        "replace_keys wrote nothing"
    );
    assert!(store.create(token("bob", &two.id)).await.is_ok());
}

/// A key's rate bucket is stored with it and comes back on every read, unchanged by edits.
pub async fn rate_bucket_round_trips<S: ClientStore>(store: &S, other: &S, _: &FakeClock) {
    store.add_owner("ada", None).await.unwrap();
    let bucket = KeyId::new("kgc_0123456789abcdefghij");
    let mut new = NewKey::new("ada", "token", Environment::Test);
    new.rate_bucket = Some(bucket.clone());
    let created = store.create(new.clone()).await.unwrap();
    assert_eq!(created.record.rate_bucket, Some(bucket.clone()));
    let id = created.record.id.clone();
    let plain = store
        .create(NewKey::new("ada", "plain", Environment::Test))
        .await
        .unwrap();
    assert_eq!(plain.record.rate_bucket, None);

    assert_eq!(
        other.get(&id).await.unwrap().rate_bucket,
        Some(bucket.clone())
    );
    assert_eq!(other.get(&plain.record.id).await.unwrap().rate_bucket, None);
    let looked_up = other
        .lookup(&created.secret.presented())
        .await
        .ok()
        .flatten()
        .unwrap();
    assert_eq!(looked_up.rate_bucket, Some(bucket.clone()));
    let listed = other.list("ada", Page::default()).await.unwrap();
    let mine = listed.iter().find(|r| r.id == id).unwrap();
    assert_eq!(mine.rate_bucket, Some(bucket.clone()));

    let mut update = KeyUpdate::default();
    update.name = Some("renamed".into());
    assert_eq!(
        store.update(&id, update).await.unwrap().rate_bucket,
        Some(bucket.clone())
    );
    assert_eq!(
        store
            .set_status(&id, Status::Disabled)
            .await
            .unwrap()
            .rate_bucket,
        Some(bucket.clone())
    );
    let rotated = store
        .rotate(&id, std::time::Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(rotated.record.rate_bucket, Some(bucket.clone()));

    let replaced = store.replace_keys(new).await.unwrap();
    assert_eq!(replaced.record.rate_bucket, Some(bucket.clone()));
    assert_eq!(
        other.get(&replaced.record.id).await.unwrap().rate_bucket,
        Some(bucket.clone())
    );

    // A bucket that is not a plain word is refused, as scopes are.
    let mut bad = NewKey::new("ada", "bad", Environment::Test);
    bad.rate_bucket = Some(KeyId::new("a b"));
    assert!(matches!(
        store.create(bad).await,
        Err(StoreError::Invalid { .. })
    ));
}

/// `purge_expired_tokens` removes, for good, only the client's tokens that expired before
/// the time given, at most `limit` of them, with their hashes; their audit events stay.
pub async fn purge_expired_tokens_removes_only_the_clients_expired_tokens<S: ClientStore>(
    store: &S,
    other: &S,
    clock: &FakeClock,
) {
    store.add_owner("ada", None).await.unwrap();
    store.add_owner("bob", None).await.unwrap();
    let one = store
        .create_client(NewClient::new("ada", "one"))
        .await
        .unwrap()
        .client;
    let two = store
        .create_client(NewClient::new("bob", "two"))
        .await
        .unwrap()
        .client;
    let start = clock.now();
    let minutes = |m: u64| start + Duration::from_secs(60 * m);
    let token = |owner: &str, client: &str, expires: u64| {
        let mut new = NewKey::new(owner, "token", Environment::Live);
        new.use_case = TOKEN_USE_CASE.into();
        new.rate_bucket = Some(KeyId::new(client));
        new.expires_at = Some(minutes(expires));
        new
    };
    // The first client's tokens: three expire (at 10, 20, 30 minutes), one at 30 exactly
    // (not before 30), one lives on.
    let mut expired = Vec::new();
    for m in [20, 10, 25] {
        expired.push(store.create(token("ada", &one.id, m)).await.unwrap());
    }
    let at_cutoff = store.create(token("ada", &one.id, 30)).await.unwrap();
    let live = store.create(token("ada", &one.id, 120)).await.unwrap();
    // Keys that are not the first client's tokens, expired as well.
    let theirs = store.create(token("bob", &two.id, 10)).await.unwrap();
    let mut plain = NewKey::new("ada", "plain", Environment::Live);
    plain.expires_at = Some(minutes(10));
    let plain = store.create(plain).await.unwrap();
    let mut same_bucket = token("ada", &one.id, 10);
    same_bucket.use_case = "other".into();
    let same_bucket = store.create(same_bucket).await.unwrap();
    // A rotated token: its old secret's hash goes with it.
    let rotated_old = expired[2].secret.clone();
    let rotated = store
        .rotate(&expired[2].record.id, Duration::from_secs(60), None)
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60 * 60));

    // A cache over the store that has seen a token: told of the purge.
    let cache = CachedLookup::builder(store.clone())
        .clock(clock.clone())
        .build_over_store()
        .unwrap();
    assert!(known(&cache, &expired[1].secret).await.is_some());

    // Nothing for an unknown client, nothing with a zero limit.
    assert_eq!(
        store
            .purge_expired_tokens("kgc_unknown", minutes(30), 100)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .purge_expired_tokens(&one.id, minutes(30), 0)
            .await
            .unwrap(),
        0
    );
    // The limit: the two that expired first (10, then 20).
    assert_eq!(
        store
            .purge_expired_tokens(&one.id, minutes(30), 2)
            .await
            .unwrap(),
        2
    );
    for gone in [&expired[0], &expired[1]] {
        let id = gone.record.id.clone();
        assert_eq!(
            other.get(&id).await.unwrap_err(),
            StoreError::KeyNotFound(id)
        );
        assert!(known(other, &gone.secret).await.is_none());
    }
    assert!(known(&cache, &expired[1].secret).await.is_none());
    assert!(other.get(&expired[2].record.id).await.is_ok());
    // Then the rest (one left before 30 minutes), with both its hashes.
    assert_eq!(
        store
            .purge_expired_tokens(&one.id, minutes(30), 100)
            .await
            .unwrap(),
        1
    );
    let id = expired[2].record.id.clone();
    assert_eq!(
        other.get(&id).await.unwrap_err(),
        StoreError::KeyNotFound(id.clone())
    );
    for secret in [&rotated_old, &rotated.secret] {
        assert!(known(other, secret).await.is_none());
    }
    assert_eq!(
        store
            .purge_expired_tokens(&one.id, minutes(30), 100)
            .await
            .unwrap(),
        0
    );

    // Everything else stands, found by id and by secret.
    for kept in [&at_cutoff, &live, &theirs, &plain, &same_bucket] {
        assert_eq!(other.get(&kept.record.id).await.unwrap().id, kept.record.id);
        assert_eq!(known(other, &kept.secret).await.unwrap(), kept.record.id);
    }
    // The purged tokens' audit events stay.
    for gone in &expired {
        let trail = events(
            other,
            AuditQuery::default().with_key(gone.record.id.clone()),
        )
        .await;
        assert_eq!(trail[0].action, AuditAction::Created, "{:?}", trail);
    }
    // The other client's turn: only its token goes.
    assert_eq!(
        store
            .purge_expired_tokens(&two.id, minutes(120), 100)
            .await
            .unwrap(),
        1
    );
    assert!(other.get(&theirs.record.id).await.is_err());
    assert!(other.get(&plain.record.id).await.is_ok());
    assert!(other.get(&same_bucket.record.id).await.is_ok());
    assert!(other.get(&at_cutoff.record.id).await.is_ok());
}

/// The id of the key a secret looks up as, if any (a failed lookup fails the test).
async fn known<L: KeyLookup>(lookup: &L, secret: &ApiKey) -> Option<KeyId> {
    match lookup.lookup(&secret.presented()).await {
        Ok(found) => found.map(|record| record.id.clone()),
        Err(_) => panic!("the lookup failed"),
    }
}
