//! The one behaviour every `KeyStore` must have. Each store's test file calls [`run`] with a
//! function that opens two handles on one fresh, empty store whose clock is the given
//! fake clock.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::time::{Duration, SystemTime};

use keygate::clock::{Clock, FakeClock};
use keygate::key::ApiKey;
use keygate::key::Environment;
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::ratelimit::Quota;
use keygate::record::{Restrictions, Scopes, Status};
use keygate::reject::Reason;
use keygate::store::{KeyUpdate, NewKey, OwnerStore, Page, StoreError};
use keygate::validate::{check, Rules};

/// Runs the whole suite; `open` gives two handles on one empty store.
pub async fn run<S, F, Fut>(open: F)
where
    S: OwnerStore + 'static,
    F: Fn(FakeClock) -> Fut,
    Fut: Future<Output = (S, S)>,
{
    macro_rules! case {
        ($name:ident) => {{
            let clock = FakeClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
            let (a, b) = open(clock.clone()).await;
            $name(&a, &b, &clock).await;
        }};
    }
    case!(owners);
    case!(create_and_look_up);
    case!(bad_input_writes_nothing);
    case!(list_pages);
    case!(update_mutable_fields_only);
    case!(disable_enable_delete);
    case!(rotation_with_grace);
    case!(concurrent_rotations_conflict);
    case!(revoke_all);
    case!(last_used_once_a_minute);
    case!(two_handles_see_each_other);
    case!(a_cache_over_the_store_stays_honest);
}

/// What the layers would answer for `secret` through `lookup` at `clock`'s time.
async fn verdict<L: KeyLookup>(
    lookup: &L,
    secret: &ApiKey,
    clock: &FakeClock,
) -> Result<(), Reason> {
    match lookup.lookup(&secret.presented()).await {
        Ok(Some(record)) => check(&record, &Rules::default(), clock.now(), || None, || None),
        Ok(None) => Err(Reason::InvalidApiKey),
        Err(_) => Err(Reason::AuthUnavailable),
    }
}

async fn owner_and_key<S: OwnerStore>(
    store: &S,
    owner: &str,
) -> (keygate::store::CreatedKey, NewKey) {
    store.add_owner(owner, None).await.unwrap();
    let mut new = NewKey::new(owner, "ci", Environment::Live);
    new.scopes = Scopes::parse("read,write");
    let created = store.create(new.clone()).await.unwrap();
    (created, new)
}

async fn owners<S: OwnerStore>(store: &S, _: &S, clock: &FakeClock) {
    let ada = store.add_owner("ada", Some("correct horse")).await.unwrap();
    assert_eq!(ada.name, "ada");
    assert!(ada.active);
    assert_eq!(
        store.add_owner("ada", None).await.unwrap_err(),
        StoreError::OwnerExists("ada".into())
    );
    assert!(matches!(
        store.add_owner(" ", None).await,
        Err(StoreError::Invalid { .. })
    ));
    assert_eq!(
        store.verify_owner("ada", "correct horse").await.unwrap().id,
        ada.id
    );
    for (name, password) in [("ada", "wrong"), ("nobody", "correct horse"), ("ada", "")] {
        assert_eq!(
            store.verify_owner(name, password).await.unwrap_err(),
            StoreError::InvalidCredentials,
            "{name}/{password}"
        );
    }
    store.add_owner("bob", None).await.unwrap();
    assert_eq!(
        store.verify_owner("bob", "").await.unwrap_err(),
        StoreError::InvalidCredentials,
        "an owner without a password cannot log in"
    );

    let key = store
        .create(NewKey::new("ada", "k", Environment::Live))
        .await
        .unwrap();
    store.set_owner_active("ada", false).await.unwrap();
    assert_eq!(
        verdict(store, &key.secret, clock).await,
        Err(Reason::OwnerInactive)
    );
    assert_eq!(
        store
            .verify_owner("ada", "correct horse")
            .await
            .unwrap_err(),
        StoreError::InvalidCredentials
    );
    store.set_owner_active("ada", true).await.unwrap();
    assert_eq!(verdict(store, &key.secret, clock).await, Ok(()));
    assert_eq!(
        store.set_owner_active("nobody", false).await.unwrap_err(),
        StoreError::OwnerNotFound("nobody".into())
    );
}

async fn create_and_look_up<S: OwnerStore>(store: &S, _: &S, clock: &FakeClock) {
    store.add_owner("ada", None).await.unwrap();
    let mut new = NewKey::new("ada", "billing", Environment::Test);
    new.description = "nightly export".into();
    new.use_case = "export".into();
    new.scopes = Scopes::parse("read");
    new.restrictions = Restrictions {
        ips: vec!["10.0.0.0/8".parse().unwrap()],
        sites: vec!["shop".into()],
    };
    new.quotas = vec![Quota::parse("60/min").unwrap()];
    new.expires_at = Some(clock.now() + Duration::from_secs(3600));
    new.metadata = serde_json::json!({"plan": "pro"});
    let created = store.create(new).await.unwrap();
    let record = &created.record;
    assert!(created.secret.expose_secret().starts_with("kg_test_"));
    assert_eq!(record.name, "billing");
    assert_eq!(record.description, "nightly export");
    assert_eq!(record.use_case, "export");
    assert_eq!(record.environment, Environment::Test);
    assert_eq!(record.owner.as_ref().unwrap().name, "ada");
    assert_eq!(record.created_at, Some(clock.now()));
    let found = store
        .lookup(&created.secret.presented())
        .await
        .ok()
        .flatten()
        .unwrap();
    assert_eq!(*found, *record);
    assert_eq!(store.get(&record.id).await.unwrap(), *record);
    // Expiry.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(
        verdict(store, &created.secret, clock).await,
        Err(Reason::ApiKeyExpired)
    );
    // Unknown keys and ids.
    let stranger = keygate::key::KeyFormat::default()
        .generate(Environment::Live)
        .unwrap();
    assert!(matches!(
        store.lookup(&stranger.presented()).await,
        Ok(None)
    ));
    let missing = keygate::key::KeyId::new("key_missing");
    assert_eq!(
        store.get(&missing).await.unwrap_err(),
        StoreError::KeyNotFound(missing)
    );
}

async fn bad_input_writes_nothing<S: OwnerStore>(store: &S, _: &S, _: &FakeClock) {
    assert_eq!(
        store
            .create(NewKey::new("ghost", "k", Environment::Live))
            .await
            .unwrap_err(),
        StoreError::OwnerNotFound("ghost".into())
    );
    store.add_owner("ada", None).await.unwrap();
    assert!(matches!(
        store
            .create(NewKey::new("ada", "  ", Environment::Live))
            .await,
        Err(StoreError::Invalid { field: "name", .. })
    ));
    let mut nine = NewKey::new("ada", "k", Environment::Live);
    nine.quotas = vec![Quota::parse("1/s").unwrap(); 9];
    assert!(matches!(
        store.create(nine).await,
        Err(StoreError::Invalid {
            field: "quotas",
            ..
        })
    ));
    // Nothing that could forge lines or escape sequences where a record is shown.
    let forged = "x\nID=key_forged STATUS=active\n\u{1b}[2K";
    type Edit<'a> = Box<dyn Fn(&mut NewKey) + 'a>;
    let edits: [(&str, Edit); 6] = [
        ("name", Box::new(|k| k.name = forged.into())),
        (
            "description",
            Box::new(|k| k.description = "a\u{1b}[2Kb".into()),
        ),
        ("use case", Box::new(|k| k.use_case = forged.into())),
        ("scope", Box::new(|k| k.scopes = Scopes::from([forged]))),
        (
            "scope",
            Box::new(|k| k.scopes = Scopes::from(["two words"])),
        ),
        (
            "site",
            Box::new(|k| k.restrictions.sites = vec![forged.to_owned()]),
        ),
    ];
    for (field, edit) in edits {
        let mut new = NewKey::new("ada", "k", Environment::Live);
        edit(&mut new);
        let err = store.create(new).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Invalid { field: f, .. } if f == field),
            "{field}: {err}"
        );
    }
    let mut multiline = NewKey::new("ada", "k", Environment::Live);
    multiline.description = "two\nlines".into();
    let created = store.create(multiline).await.unwrap();
    let mut bad = KeyUpdate::default();
    bad.restrictions = Some(Restrictions {
        ips: vec![],
        sites: vec![forged.to_owned()],
    });
    assert!(store.update(&created.record.id, bad).await.is_err());
    assert!(store.add_owner("eve\u{1b}[2K", None).await.is_err());
    let keys = store.list("ada", Page::default()).await.unwrap();
    assert_eq!(keys.len(), 1, "only the valid key was written");
    assert!(keys[0].restrictions.sites.is_empty());
}

async fn list_pages<S: OwnerStore>(store: &S, _: &S, _: &FakeClock) {
    store.add_owner("ada", None).await.unwrap();
    store.add_owner("bob", None).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let created = store
            .create(NewKey::new("ada", format!("k{i}"), Environment::Live))
            .await
            .unwrap();
        ids.push(created.record.id);
        store
            .create(NewKey::new("bob", "other", Environment::Live))
            .await
            .unwrap();
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut page = Page {
        after: None,
        limit: 2,
    };
    loop {
        let keys = store.list("ada", page.clone()).await.unwrap();
        assert!(keys.len() <= 2);
        if keys.is_empty() {
            break;
        }
        page.after = keys.last().map(|k| k.id.clone());
        seen.extend(keys.into_iter().map(|k| k.id));
    }
    assert_eq!(seen, ids, "every key once, in id order");
    assert_eq!(
        store.list("nobody", Page::default()).await.unwrap_err(),
        StoreError::OwnerNotFound("nobody".into())
    );
}

async fn update_mutable_fields_only<S: OwnerStore>(store: &S, _: &S, _: &FakeClock) {
    let (created, _) = owner_and_key(store, "ada").await;
    let id = &created.record.id;
    let mut update = KeyUpdate::default();
    update.name = Some("renamed".into());
    update.description = Some("new description".into());
    update.scopes = Some(Scopes::parse("admin"));
    update.quotas = Some(vec![Quota::parse("10/s").unwrap()]);
    update.metadata = Some(serde_json::json!({"tier": 2}));
    let updated = store.update(id, update).await.unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.scopes, Scopes::parse("admin"));
    assert_eq!(store.get(id).await.unwrap(), updated);

    let mut env = KeyUpdate::default();
    env.environment = Some(Environment::Test);
    env.name = Some("sneaky".into());
    assert_eq!(
        store.update(id, env).await.unwrap_err(),
        StoreError::Immutable("environment")
    );
    let mut use_case = KeyUpdate::default();
    use_case.use_case = Some("x".into());
    assert_eq!(
        store.update(id, use_case).await.unwrap_err(),
        StoreError::Immutable("use case")
    );
    let mut expiry = KeyUpdate::default();
    expiry.expires_at = Some(None);
    assert_eq!(
        store.update(id, expiry).await.unwrap_err(),
        StoreError::Immutable("expiry")
    );
    assert_eq!(
        store.get(id).await.unwrap().name,
        "renamed",
        "nothing half-written"
    );
    let mut empty = KeyUpdate::default();
    empty.name = Some(String::new());
    assert!(matches!(
        store.update(id, empty).await,
        Err(StoreError::Invalid { .. })
    ));
    let missing = keygate::key::KeyId::new("key_missing");
    assert_eq!(
        store
            .update(&missing, KeyUpdate::default())
            .await
            .unwrap_err(),
        StoreError::KeyNotFound(missing)
    );
}

async fn disable_enable_delete<S: OwnerStore>(store: &S, _: &S, clock: &FakeClock) {
    let (created, _) = owner_and_key(store, "ada").await;
    let id = &created.record.id;
    store.set_status(id, Status::Disabled).await.unwrap();
    assert_eq!(
        verdict(store, &created.secret, clock).await,
        Err(Reason::ApiKeyDisabled)
    );
    store.set_status(id, Status::Active).await.unwrap();
    assert_eq!(verdict(store, &created.secret, clock).await, Ok(()));
    store.set_status(id, Status::Deleted).await.unwrap();
    assert_eq!(
        verdict(store, &created.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
    assert_eq!(
        store.get(id).await.unwrap().status,
        Status::Deleted,
        "kept for audit"
    );
    // A deleted key is shown (for audit) and refused as deleted, not as unknown.
    let deleted = |e: StoreError| matches!(e, StoreError::InvalidState("deleted", _));
    for to in [Status::Active, Status::Disabled, Status::Deleted] {
        let err = store.set_status(id, to).await.unwrap_err();
        assert!(deleted(err.clone()), "deleted stays deleted: {err}");
    }
    let err = store.rotate(id, Duration::ZERO, None).await.unwrap_err();
    assert!(deleted(err.clone()), "{err}");
    let mut rename = KeyUpdate::default();
    rename.name = Some("revived".into());
    let err = store.update(id, rename).await.unwrap_err();
    assert!(
        deleted(err.clone()),
        "a deleted key cannot be edited: {err}"
    );
    assert!(err.to_string().contains("deleted"), "{err}");
}

async fn rotation_with_grace<S: OwnerStore>(store: &S, _: &S, clock: &FakeClock) {
    let (created, _) = owner_and_key(store, "ada").await;
    let id = &created.record.id;
    let rotated = store
        .rotate(id, Duration::from_secs(300), None)
        .await
        .unwrap();
    assert_eq!(rotated.record.id, *id);
    assert_ne!(
        rotated.secret.expose_secret(),
        created.secret.expose_secret()
    );
    assert_eq!(verdict(store, &rotated.secret, clock).await, Ok(()));
    assert_eq!(
        verdict(store, &created.secret, clock).await,
        Ok(()),
        "old key in its grace"
    );
    clock.advance(Duration::from_secs(300));
    assert_eq!(
        verdict(store, &created.secret, clock).await,
        Err(Reason::ApiKeyExpired)
    );
    assert_eq!(verdict(store, &rotated.secret, clock).await, Ok(()));

    // Without grace the old key stops at once.
    let again = store.rotate(id, Duration::ZERO, None).await.unwrap();
    assert_eq!(
        verdict(store, &rotated.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
    assert_eq!(verdict(store, &again.secret, clock).await, Ok(()));

    // A rotation during an earlier grace applies its grace to every earlier secret: each
    // ends at the earlier of its own end and now + grace, never later.
    let first = store
        .rotate(id, Duration::from_secs(300), None)
        .await
        .unwrap();
    let second = store
        .rotate(id, Duration::from_secs(600), None)
        .await
        .unwrap();
    clock.advance(Duration::from_secs(300));
    assert_eq!(
        verdict(store, &again.secret, clock).await,
        Err(Reason::ApiKeyExpired)
    );
    assert_eq!(
        verdict(store, &first.secret, clock).await,
        Ok(()),
        "its own 600 s"
    );
    assert_eq!(verdict(store, &second.secret, clock).await, Ok(()));
    // So a rotation without grace ends every earlier secret at once (what a leak needs).
    let third = store.rotate(id, Duration::ZERO, None).await.unwrap();
    for earlier in [&first.secret, &second.secret] {
        assert_eq!(
            verdict(store, earlier, clock).await,
            Err(Reason::InvalidApiKey)
        );
    }
    assert_eq!(verdict(store, &third.secret, clock).await, Ok(()));

    // The grace never outlives the key's own expiry.
    let mut short = NewKey::new("ada", "short", Environment::Live);
    short.expires_at = Some(clock.now() + Duration::from_secs(60));
    let short = store.create(short).await.unwrap();
    let next = store
        .rotate(&short.record.id, Duration::from_secs(3600), None)
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        verdict(store, &short.secret, clock).await,
        Err(Reason::ApiKeyExpired)
    );
    assert_eq!(
        verdict(store, &next.secret, clock).await,
        Err(Reason::ApiKeyExpired)
    );
}

async fn concurrent_rotations_conflict<S: OwnerStore + 'static>(a: &S, b: &S, clock: &FakeClock) {
    let (created, _) = owner_and_key(a, "ada").await;
    let id = created.record.id.clone();

    // Two callers read the key, then both rotate it: one wins, the other conflicts.
    let seen = a.get(&id).await.unwrap().version;
    let first = a.rotate(&id, Duration::ZERO, Some(seen)).await.unwrap();
    assert_eq!(
        b.rotate(&id, Duration::ZERO, Some(seen)).await.unwrap_err(),
        StoreError::Conflict
    );
    assert_eq!(
        verdict(a, &first.secret, clock).await,
        Ok(()),
        "the winner's secret works"
    );

    // Racing on two handles from tasks released together: every race has one winner, and
    // every loser is told so; the last winner's secret is the one that works.
    let mut current = first.secret;
    for _ in 0..50 {
        let seen = a.get(&id).await.unwrap().version;
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let spawn = |store: S| {
            let (id, barrier) = (id.clone(), std::sync::Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                store.rotate(&id, Duration::ZERO, Some(seen)).await
            })
        };
        let (x, y) = (spawn(a.clone()), spawn(b.clone()));
        let results = [x.await.unwrap(), y.await.unwrap()];
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "exactly one of two racing rotations wins");
        current = winners[0].secret.clone();
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(StoreError::Conflict))));
    }
    assert_eq!(verdict(a, &current, clock).await, Ok(()));
    assert_eq!(
        verdict(a, &created.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
}

async fn revoke_all<S: OwnerStore>(store: &S, _: &S, clock: &FakeClock) {
    let (one, _) = owner_and_key(store, "ada").await;
    let two = store
        .create(NewKey::new("ada", "two", Environment::Test))
        .await
        .unwrap();
    let (other, _) = owner_and_key(store, "bob").await;
    assert_eq!(store.revoke_all("ada").await.unwrap(), 2);
    for key in [&one.secret, &two.secret] {
        assert_eq!(verdict(store, key, clock).await, Err(Reason::InvalidApiKey));
    }
    assert_eq!(verdict(store, &other.secret, clock).await, Ok(()));
    assert!(store
        .set_status(&one.record.id, Status::Active)
        .await
        .is_err());
    let fresh = store
        .create(NewKey::new("ada", "after", Environment::Live))
        .await
        .unwrap();
    assert_eq!(verdict(store, &fresh.secret, clock).await, Ok(()));
}

async fn last_used_once_a_minute<S: OwnerStore>(store: &S, _: &S, clock: &FakeClock) {
    use tower::{Layer, ServiceExt};
    let (created, _) = owner_and_key(store, "ada").await;
    let id = &created.record.id;
    // Through the layers, as in production: an accepted request reports the use to the
    // store's hook; the store writes it off the request path (flushed here).
    let svc = keygate::AuthLayer::builder(store.clone())
        .clock(clock.clone())
        .build()
        .unwrap()
        .layer(tower::service_fn(|_: http::Request<String>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        }));
    let send = || {
        let req = http::Request::get("/v1/health")
            .header("x-api-key", created.secret.expose_secret())
            .body(String::new())
            .unwrap();
        let svc = svc.clone();
        async move { svc.oneshot(req).await.unwrap().status() }
    };
    assert_eq!(store.get(id).await.unwrap().last_used_at, None);
    assert_eq!(send().await, 200);
    store.flush_usage().await.unwrap();
    let first = clock.now();
    assert_eq!(store.get(id).await.unwrap().last_used_at, Some(first));
    clock.advance(Duration::from_secs(59));
    assert_eq!(send().await, 200);
    store.flush_usage().await.unwrap();
    assert_eq!(
        store.get(id).await.unwrap().last_used_at,
        Some(first),
        "not rewritten within a minute"
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(send().await, 200);
    store.flush_usage().await.unwrap();
    assert_eq!(store.get(id).await.unwrap().last_used_at, Some(clock.now()));
}

async fn two_handles_see_each_other<S: OwnerStore>(a: &S, b: &S, clock: &FakeClock) {
    a.add_owner("ada", None).await.unwrap();
    let created = b
        .create(NewKey::new("ada", "k", Environment::Live))
        .await
        .unwrap();
    assert_eq!(verdict(a, &created.secret, clock).await, Ok(()));
    a.set_status(&created.record.id, Status::Disabled)
        .await
        .unwrap();
    assert_eq!(
        verdict(b, &created.secret, clock).await,
        Err(Reason::ApiKeyDisabled)
    );
}

async fn a_cache_over_the_store_stays_honest<S: OwnerStore>(store: &S, _: &S, clock: &FakeClock) {
    let cache = CachedLookup::builder(store.clone())
        .clock(clock.clone())
        .build_over_store()
        .unwrap();
    let (created, _) = owner_and_key(store, "ada").await;
    assert_eq!(verdict(&cache, &created.secret, clock).await, Ok(()));
    store
        .set_status(&created.record.id, Status::Disabled)
        .await
        .unwrap();
    assert_eq!(
        verdict(&cache, &created.secret, clock).await,
        Err(Reason::ApiKeyDisabled)
    );
    // A key created after its hash was cached as unknown works at once too.
    store.add_owner("bob", None).await.unwrap();
    let rotated = store
        .rotate(&created.record.id, Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(
        verdict(&cache, &created.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
    assert_eq!(
        verdict(&cache, &rotated.secret, clock).await,
        Err(Reason::ApiKeyDisabled)
    );
    store.set_owner_active("ada", false).await.unwrap();
    assert_eq!(
        verdict(&cache, &rotated.secret, clock).await,
        Err(Reason::ApiKeyDisabled)
    );
    store
        .set_status(&created.record.id, Status::Active)
        .await
        .unwrap();
    assert_eq!(
        verdict(&cache, &rotated.secret, clock).await,
        Err(Reason::OwnerInactive)
    );
}
