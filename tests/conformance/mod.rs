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
use keygate::store::{
    Actor, AuditAction, AuditEvent, AuditQuery, ClientStore, KeyUpdate, NewKey, OwnerStore, Page,
    StoreError,
};

mod clients;
use keygate::validate::{check, Rules};

/// Runs the whole suite; `open` gives two handles on one empty store.
pub async fn run<S, F, Fut>(open: F)
where
    S: ClientStore + 'static,
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
    case!(every_lifecycle_write_is_audited);
    case!(audit_filters_and_pages);
    case!(replace_keys_revokes_the_owners_keys);
    case!(concurrent_replace_keys_leave_one_working_key);
    case!(owner_and_password);
    case!(credentials_version_moves_on_password_and_disabling);
    case!(clients_create_list_verify_revoke);
    case!(client_by_secret_finds_its_client_only);
    case!(revoke_client_revokes_its_tokens_and_nothing_else);
    case!(rate_bucket_round_trips);
    case!(purge_expired_tokens_removes_only_the_clients_expired_tokens);
    case!(report_leak_revokes_once_and_records_every_report);
}

use clients::{
    client_by_secret_finds_its_client_only, clients_create_list_verify_revoke,
    purge_expired_tokens_removes_only_the_clients_expired_tokens, rate_bucket_round_trips,
    revoke_client_revokes_its_tokens_and_nothing_else,
};

/// The credentials version ends sessions: a new password and a disabling move it on (seen
/// by every handle), enabling again and other writes do not move it back or on.
async fn credentials_version_moves_on_password_and_disabling<S: OwnerStore>(
    store: &S,
    other: &S,
    _: &FakeClock,
) {
    store.add_owner("ada", Some("correct horse")).await.unwrap();
    store.add_owner("bob", Some("x")).await.unwrap();
    let start = other.standing("ada").await.unwrap();
    assert!(start.owner.active);
    let created = store
        .create(NewKey::new("ada", "k", Environment::Live))
        .await
        .unwrap();
    store
        .set_status(&created.record.id, Status::Disabled)
        .await
        .unwrap();
    assert_eq!(
        other.standing("ada").await.unwrap().credentials,
        start.credentials
    );
    store
        .set_owner_password("ada", Some("battery staple"))
        .await
        .unwrap();
    let changed = other.standing("ada").await.unwrap();
    assert!(changed.credentials > start.credentials, "a new password");
    store.set_owner_active("ada", false).await.unwrap();
    let disabled = other.standing("ada").await.unwrap();
    assert!(disabled.credentials > changed.credentials, "disabled");
    assert!(!disabled.owner.active);
    store.set_owner_active("ada", true).await.unwrap();
    let enabled = other.standing("ada").await.unwrap();
    assert_eq!(
        enabled.credentials, disabled.credentials,
        "enabling revives nothing"
    );
    assert!(enabled.owner.active);
    // Another owner's is its own.
    assert_eq!(
        other.standing("bob").await.unwrap().credentials,
        start.credentials
    );
    assert_eq!(
        store.standing("nobody").await.unwrap_err(),
        StoreError::OwnerNotFound("nobody".into())
    );
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
    // The client IP comes from the connection's peer address (the default resolver).
    let send = |peer: &str| {
        let mut req = http::Request::get("/v1/health")
            .header("x-api-key", created.secret.expose_secret())
            .body(String::new())
            .unwrap();
        req.extensions_mut()
            .insert(keygate::validate::PeerAddr(peer.parse().unwrap()));
        let svc = svc.clone();
        async move { svc.oneshot(req).await.unwrap().status() }
    };
    let ip = |text: &str| Some(text.parse::<std::net::IpAddr>().unwrap());
    let before = store.get(id).await.unwrap();
    assert_eq!((before.last_used_at, before.last_used_ip), (None, None));
    assert_eq!(send("192.0.2.7:5000").await, 200);
    store.flush_usage().await.unwrap();
    let first = clock.now();
    let after = store.get(id).await.unwrap();
    assert_eq!(after.last_used_at, Some(first));
    assert_eq!(after.last_used_ip, ip("192.0.2.7"), "the client IP is kept");
    clock.advance(Duration::from_secs(59));
    assert_eq!(send("198.51.100.1:5000").await, 200);
    store.flush_usage().await.unwrap();
    let after = store.get(id).await.unwrap();
    assert_eq!(
        after.last_used_at,
        Some(first),
        "not rewritten within a minute"
    );
    assert_eq!(after.last_used_ip, ip("192.0.2.7"), "nor its IP");
    clock.advance(Duration::from_secs(1));
    assert_eq!(send("[2001:db8::1]:443").await, 200);
    store.flush_usage().await.unwrap();
    let after = store.get(id).await.unwrap();
    assert_eq!(after.last_used_at, Some(clock.now()));
    assert_eq!(
        after.last_used_ip,
        ip("2001:db8::1"),
        "with the IP of that use"
    );
    let listed = store.list("ada", Page::default()).await.unwrap();
    assert_eq!(
        listed[0].last_used_ip,
        ip("2001:db8::1"),
        "list says it too"
    );
    // A looked-up record says it as well, and an edit keeps it.
    let found = store
        .lookup(&created.secret.presented())
        .await
        .ok()
        .flatten()
        .unwrap();
    assert_eq!(found.last_use_ip(), ip("2001:db8::1"));
    store.set_status(id, Status::Disabled).await.unwrap();
    assert_eq!(store.get(id).await.unwrap().last_used_ip, ip("2001:db8::1"));
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

/// The events of `query`, oldest first (easier to read against the writes made).
async fn events<S: OwnerStore>(store: &S, query: AuditQuery) -> Vec<AuditEvent> {
    let mut events = store.audit(query).await.unwrap();
    assert!(
        events.windows(2).all(|w| w[0].id > w[1].id),
        "newest first, ids strictly decreasing"
    );
    events.reverse();
    events
}

/// An event's action, key, old and new status, actor and IP, in one tuple to compare.
type Seen = (
    AuditAction,
    Option<String>,
    Option<Status>,
    Option<Status>,
    String,
    Option<std::net::IpAddr>,
);

fn seen(event: &AuditEvent) -> Seen {
    (
        event.action,
        event.key_id.as_ref().map(|k| k.as_str().to_owned()),
        event.old_status,
        event.new_status,
        event.actor.clone(),
        event.ip,
    )
}

async fn every_lifecycle_write_is_audited<S: OwnerStore>(plain: &S, _: &S, clock: &FakeClock) {
    use AuditAction as A;
    use Status::{Active, Deleted, Disabled, Revoked};
    let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let store = plain.acting(Actor::new("ops:alice").with_ip(ip));
    let start = clock.now();
    let tick = || clock.advance(Duration::from_secs(1));

    store.add_owner("ada", Some("correct horse")).await.unwrap();
    tick();
    store.set_owner_active("ada", false).await.unwrap();
    tick();
    store.set_owner_active("ada", true).await.unwrap();
    tick();
    store
        .set_owner_password("ada", Some("battery staple"))
        .await
        .unwrap();
    tick();
    let one = store
        .create(NewKey::new("ada", "one", Environment::Live))
        .await
        .unwrap()
        .record
        .id;
    tick();
    let mut rename = KeyUpdate::default();
    rename.name = Some("uno".into());
    store.update(&one, rename).await.unwrap();
    tick();
    store.set_status(&one, Disabled).await.unwrap();
    tick();
    store.set_status(&one, Active).await.unwrap();
    tick();
    store.rotate(&one, Duration::ZERO, None).await.unwrap();
    tick();
    let two = store
        .create(NewKey::new("ada", "two", Environment::Test))
        .await
        .unwrap()
        .record
        .id;
    store.set_status(&two, Disabled).await.unwrap();
    tick();
    assert_eq!(store.revoke_all("ada").await.unwrap(), 2);
    tick();
    let three = store
        .create(NewKey::new("ada", "three", Environment::Live))
        .await
        .unwrap()
        .record
        .id;
    store.set_status(&three, Deleted).await.unwrap();

    // Writes that fail record nothing.
    assert!(store.add_owner("ada", None).await.is_err());
    assert!(store.set_status(&three, Active).await.is_err());
    assert!(store.set_status(&one, Active).await.is_err());
    assert!(store.rotate(&one, Duration::ZERO, None).await.is_err());
    let mut immutable = KeyUpdate::default();
    immutable.use_case = Some("x".into());
    assert!(store.update(&three, immutable).await.is_err());
    assert!(store.set_owner_password("nobody", Some("x")).await.is_err());
    assert!(store.revoke_all("nobody").await.is_err());

    let who = "ops:alice".to_owned();
    let k = |id: &keygate::key::KeyId| Some(id.as_str().to_owned());
    let expected: Vec<Seen> = vec![
        (A::OwnerAdded, None, None, None, who.clone(), Some(ip)),
        (A::OwnerDisabled, None, None, None, who.clone(), Some(ip)),
        (A::OwnerEnabled, None, None, None, who.clone(), Some(ip)),
        (A::PasswordSet, None, None, None, who.clone(), Some(ip)),
        (
            A::Created,
            k(&one),
            None,
            Some(Active),
            who.clone(),
            Some(ip),
        ),
        (A::Updated, k(&one), None, None, who.clone(), Some(ip)),
        (
            A::Disabled,
            k(&one),
            Some(Active),
            Some(Disabled),
            who.clone(),
            Some(ip),
        ),
        (
            A::Enabled,
            k(&one),
            Some(Disabled),
            Some(Active),
            who.clone(),
            Some(ip),
        ),
        (A::Rotated, k(&one), None, None, who.clone(), Some(ip)),
        (
            A::Created,
            k(&two),
            None,
            Some(Active),
            who.clone(),
            Some(ip),
        ),
        (
            A::Disabled,
            k(&two),
            Some(Active),
            Some(Disabled),
            who.clone(),
            Some(ip),
        ),
        (
            A::Revoked,
            k(&one),
            Some(Active),
            Some(Revoked),
            who.clone(),
            Some(ip),
        ),
        (
            A::Revoked,
            k(&two),
            Some(Disabled),
            Some(Revoked),
            who.clone(),
            Some(ip),
        ),
        (
            A::Created,
            k(&three),
            None,
            Some(Active),
            who.clone(),
            Some(ip),
        ),
        (
            A::Deleted,
            k(&three),
            Some(Active),
            Some(Deleted),
            who.clone(),
            Some(ip),
        ),
    ];
    let mut all = events(&store, AuditQuery::default()).await;
    // revoke_all's events are in no particular order among themselves.
    all[11..13].sort_by_key(|e| e.key_id.clone());
    let mut want = expected.clone();
    want[11..13].sort_by_key(|e| e.1.clone());
    assert_eq!(all.iter().map(seen).collect::<Vec<_>>(), want);
    assert!(all.iter().all(|e| e.owner == "ada"));
    let times: Vec<u64> = all
        .iter()
        .map(|e| e.at.duration_since(start).unwrap().as_secs())
        .collect();
    assert_eq!(times, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10, 10, 11, 11]);

    // The handle the actor was given to is unchanged: it records "system", no IP.
    let key = plain
        .create(NewKey::new("ada", "four", Environment::Live))
        .await
        .unwrap()
        .record
        .id;
    let newest = plain
        .audit(AuditQuery::default().with_limit(1))
        .await
        .unwrap();
    assert_eq!(newest.len(), 1);
    assert_eq!(
        seen(&newest[0]),
        (
            A::Created,
            k(&key),
            None,
            Some(Active),
            "system".into(),
            None
        )
    );
    // And both handles share one trail.
    assert_eq!(store.audit(AuditQuery::default()).await.unwrap().len(), 16);
}

async fn audit_filters_and_pages<S: OwnerStore>(store: &S, other: &S, _: &FakeClock) {
    let (ada1, _) = owner_and_key(store, "ada").await;
    let ada2 = store
        .create(NewKey::new("ada", "two", Environment::Live))
        .await
        .unwrap();
    let (bob1, _) = owner_and_key(store, "bob").await;
    for i in 0..4 {
        let mut rename = KeyUpdate::default();
        rename.name = Some(format!("n{i}"));
        store.update(&ada1.record.id, rename.clone()).await.unwrap();
        other.update(&bob1.record.id, rename).await.unwrap();
    }
    store
        .set_status(&ada2.record.id, Status::Disabled)
        .await
        .unwrap();

    let ada = events(store, AuditQuery::default().with_owner("ada")).await;
    assert_eq!(
        ada.len(),
        1 + 2 + 4 + 1,
        "owner added, two created, updates, disable"
    );
    assert!(ada.iter().all(|e| e.owner == "ada"));
    let bob = events(other, AuditQuery::default().with_owner("bob")).await;
    assert_eq!(bob.len(), 1 + 1 + 4);
    assert!(bob.iter().all(|e| e.owner == "bob"));

    let one = events(
        store,
        AuditQuery::default().with_key(ada1.record.id.clone()),
    )
    .await;
    assert_eq!(
        one.iter().map(|e| e.action).collect::<Vec<_>>(),
        [
            AuditAction::Created,
            AuditAction::Updated,
            AuditAction::Updated,
            AuditAction::Updated,
            AuditAction::Updated
        ]
    );
    assert!(one
        .iter()
        .all(|e| e.key_id.as_ref() == Some(&ada1.record.id)));
    // Owner and key together: the key's events if it is the owner's, else none.
    let both = AuditQuery::default()
        .with_owner("ada")
        .with_key(ada2.record.id.clone());
    assert_eq!(events(store, both).await.len(), 2);
    let mismatch = AuditQuery::default()
        .with_owner("bob")
        .with_key(ada2.record.id.clone());
    assert!(events(store, mismatch).await.is_empty());
    assert!(events(store, AuditQuery::default().with_owner("nobody"))
        .await
        .is_empty());

    // Pages of 3 by the `before` cursor: every event once, newest first.
    let all = store.audit(AuditQuery::default()).await.unwrap();
    assert_eq!(all.len(), ada.len() + bob.len());
    let mut paged: Vec<AuditEvent> = Vec::new();
    let mut query = AuditQuery::default().with_limit(3);
    loop {
        let page = store.audit(query.clone()).await.unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        query = query.with_before(last.id);
        paged.extend(page);
    }
    assert_eq!(paged, all);
    // Paging within one owner's events.
    let newest_two = store
        .audit(AuditQuery::default().with_owner("bob").with_limit(2))
        .await
        .unwrap();
    let rest = store
        .audit(
            AuditQuery::default()
                .with_owner("bob")
                .with_before(newest_two[1].id),
        )
        .await
        .unwrap();
    assert_eq!(newest_two.len() + rest.len(), bob.len());
    assert!(rest
        .iter()
        .all(|e| e.id < newest_two[1].id && e.owner == "bob"));

    // A limit of 0 is 100; a larger limit is capped at 1000.
    for i in 0..100 {
        let mut rename = KeyUpdate::default();
        rename.name = Some(format!("m{i}"));
        store.update(&ada1.record.id, rename).await.unwrap();
    }
    let total = all.len() + 100;
    assert_eq!(store.audit(AuditQuery::default()).await.unwrap().len(), 100);
    assert_eq!(
        store
            .audit(AuditQuery::default().with_limit(5000))
            .await
            .unwrap()
            .len(),
        total
    );
}

async fn replace_keys_revokes_the_owners_keys<S: OwnerStore>(store: &S, _: &S, clock: &FakeClock) {
    let cache = CachedLookup::builder(store.clone())
        .clock(clock.clone())
        .build_over_store()
        .unwrap();
    let (active, _) = owner_and_key(store, "ada").await;
    let disabled = store
        .create(NewKey::new("ada", "disabled", Environment::Test))
        .await
        .unwrap();
    store
        .set_status(&disabled.record.id, Status::Disabled)
        .await
        .unwrap();
    let deleted = store
        .create(NewKey::new("ada", "deleted", Environment::Live))
        .await
        .unwrap();
    store
        .set_status(&deleted.record.id, Status::Deleted)
        .await
        .unwrap();
    let (bobs, _) = owner_and_key(store, "bob").await;
    assert_eq!(verdict(&cache, &active.secret, clock).await, Ok(()));

    // Refused input and an unknown owner change nothing.
    let before = store.audit(AuditQuery::default()).await.unwrap().len();
    assert!(matches!(
        store
            .replace_keys(NewKey::new("ada", " ", Environment::Live))
            .await,
        Err(StoreError::Invalid { .. })
    ));
    assert_eq!(
        store
            .replace_keys(NewKey::new("nobody", "k", Environment::Live))
            .await
            .unwrap_err(),
        StoreError::OwnerNotFound("nobody".into())
    );
    assert_eq!(
        store.audit(AuditQuery::default()).await.unwrap().len(),
        before
    );
    assert_eq!(verdict(&cache, &active.secret, clock).await, Ok(()));

    let mut new = NewKey::new("ada", "fresh", Environment::Live);
    new.scopes = Scopes::parse("read");
    let fresh = store.replace_keys(new).await.unwrap();
    assert_eq!(fresh.record.name, "fresh");
    assert_eq!(fresh.record.status, Status::Active);
    assert_eq!(fresh.record.owner.as_ref().unwrap().name, "ada");
    assert_eq!(fresh.record.created_at, Some(clock.now()));
    assert_eq!(verdict(&cache, &fresh.secret, clock).await, Ok(()));
    assert_eq!(
        verdict(&cache, &active.secret, clock).await,
        Err(Reason::InvalidApiKey),
        "the cache was told"
    );
    assert_eq!(
        verdict(store, &disabled.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
    let status = |id| async move { store.get(id).await.unwrap().status };
    assert_eq!(status(&active.record.id).await, Status::Revoked);
    assert_eq!(status(&disabled.record.id).await, Status::Revoked);
    assert_eq!(
        status(&deleted.record.id).await,
        Status::Deleted,
        "stays deleted"
    );
    assert_eq!(
        verdict(store, &bobs.secret, clock).await,
        Ok(()),
        "other owners' keys"
    );

    let newest = store
        .audit(AuditQuery::default().with_limit(3))
        .await
        .unwrap();
    assert_eq!(
        (newest[0].action, newest[0].key_id.as_ref()),
        (AuditAction::Created, Some(&fresh.record.id))
    );
    let mut revoked: Vec<_> = newest[1..]
        .iter()
        .map(|e| {
            (
                e.action,
                e.key_id.clone().unwrap(),
                e.old_status,
                e.new_status,
            )
        })
        .collect();
    revoked.sort_by(|a, b| a.1.cmp(&b.1));
    let mut want = vec![
        (
            AuditAction::Revoked,
            active.record.id.clone(),
            Some(Status::Active),
            Some(Status::Revoked),
        ),
        (
            AuditAction::Revoked,
            disabled.record.id.clone(),
            Some(Status::Disabled),
            Some(Status::Revoked),
        ),
    ];
    want.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(revoked, want);

    // Again: the key made by the last call is revoked in turn.
    let again = store
        .replace_keys(NewKey::new("ada", "again", Environment::Live))
        .await
        .unwrap();
    assert_eq!(
        verdict(&cache, &fresh.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
    assert_eq!(verdict(&cache, &again.secret, clock).await, Ok(()));
}

async fn concurrent_replace_keys_leave_one_working_key<S: OwnerStore + 'static>(
    a: &S,
    b: &S,
    clock: &FakeClock,
) {
    owner_and_key(a, "ada").await;
    for round in 0..3 {
        // Eight calls on two handles, released together.
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = if i % 2 == 0 { a.clone() } else { b.clone() };
                let barrier = std::sync::Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .replace_keys(NewKey::new("ada", format!("k{i}"), Environment::Live))
                        .await
                })
            })
            .collect();
        let mut made = Vec::new();
        for task in tasks {
            made.push(
                task.await
                    .unwrap()
                    .expect("every call succeeds, one after another"),
            );
        }
        let mut working = 0;
        for created in &made {
            if verdict(a, &created.secret, clock).await == Ok(()) {
                working += 1;
            }
        }
        assert_eq!(working, 1, "round {round}: exactly one key works");
        let keys = a.list("ada", Page::default()).await.unwrap();
        let active: Vec<_> = keys.iter().filter(|k| k.status == Status::Active).collect();
        assert_eq!(active.len(), 1, "round {round}: exactly one active key");
        assert!(keys
            .iter()
            .all(|k| k.status == Status::Active || k.status == Status::Revoked));
        // Every key but the survivor was revoked exactly once.
        let revocations = a
            .audit(AuditQuery::default().with_owner("ada").with_limit(1000))
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action == AuditAction::Revoked)
            .count();
        assert_eq!(revocations, keys.len() - 1, "round {round}");
    }
}

async fn owner_and_password<S: OwnerStore>(store: &S, other: &S, _: &FakeClock) {
    let ada = store.add_owner("ada", Some("correct horse")).await.unwrap();
    assert_eq!(other.owner("ada").await.unwrap(), ada);
    assert_eq!(
        store.owner("nobody").await.unwrap_err(),
        StoreError::OwnerNotFound("nobody".into())
    );
    store.set_owner_active("ada", false).await.unwrap();
    assert!(!store.owner("ada").await.unwrap().active);
    store.set_owner_active("ada", true).await.unwrap();

    let set = store
        .set_owner_password("ada", Some("battery staple"))
        .await
        .unwrap();
    assert_eq!(set, ada);
    assert_eq!(
        other.verify_owner("ada", "battery staple").await.unwrap(),
        ada,
        "the new password works"
    );
    assert_eq!(
        other
            .verify_owner("ada", "correct horse")
            .await
            .unwrap_err(),
        StoreError::InvalidCredentials,
        "the old one does not"
    );
    store.set_owner_password("ada", None).await.unwrap();
    assert_eq!(
        store
            .verify_owner("ada", "battery staple")
            .await
            .unwrap_err(),
        StoreError::InvalidCredentials,
        "no password: no login"
    );
    assert_eq!(
        store
            .set_owner_password("nobody", Some("x"))
            .await
            .unwrap_err(),
        StoreError::OwnerNotFound("nobody".into())
    );
    let sets = store
        .audit(AuditQuery::default().with_owner("ada"))
        .await
        .unwrap()
        .iter()
        .filter(|e| e.action == AuditAction::PasswordSet)
        .count();
    assert_eq!(sets, 2);
}

/// `report_leak`: a live key (active or disabled) is revoked at once, every cache over the
/// store drops it, and the trail has the report and the revocation; a key revoked already or
/// deleted has the report recorded and nothing else changes; an unknown id is refused and
/// records nothing.
async fn report_leak_revokes_once_and_records_every_report<S: OwnerStore>(
    plain: &S,
    other: &S,
    clock: &FakeClock,
) {
    use std::collections::HashSet;
    use AuditAction as A;
    use Status::{Active, Deleted, Disabled, Revoked};
    let store = plain.acting(Actor::new("scanner:github"));
    let cache = CachedLookup::builder(plain.clone())
        .clock(clock.clone())
        .build_over_store()
        .unwrap();
    let (active, _) = owner_and_key(plain, "ada").await;
    let id = &active.record.id;
    // Cached as usable, so that the report must drop the entry.
    assert_eq!(verdict(&cache, &active.secret, clock).await, Ok(()));
    let trail = |id: &keygate::key::KeyId| AuditQuery::default().with_key(id.clone());
    let start = events(plain, trail(id)).await.len();
    let by_scanner = |action, old, new| {
        (
            action,
            Some(id.as_str().to_owned()),
            Some(old),
            Some(new),
            "scanner:github".to_owned(),
            None,
        )
    };

    let (record, revoked) = store.report_leak(id).await.unwrap();
    assert!(revoked);
    assert_eq!(record.status, Revoked);
    assert_eq!(other.get(id).await.unwrap(), record);
    assert_eq!(
        verdict(&cache, &active.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
    assert_eq!(
        verdict(other, &active.secret, clock).await,
        Err(Reason::InvalidApiKey)
    );
    let after: Vec<Seen> = events(other, trail(id)).await[start..]
        .iter()
        .map(seen)
        .collect();
    // One transaction's events: their order among themselves is not promised.
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(
        after.into_iter().collect::<HashSet<_>>(),
        HashSet::from([
            by_scanner(A::LeakReported, Active, Revoked),
            by_scanner(A::Revoked, Active, Revoked),
        ])
    );

    // Reported again: still revoked, unchanged, and the report is on record.
    let (again, revoked) = store.report_leak(id).await.unwrap();
    assert!(!revoked);
    assert_eq!(again.status, Revoked);
    assert_eq!(again.version, record.version);
    let after: Vec<Seen> = events(other, trail(id)).await[start + 2..]
        .iter()
        .map(seen)
        .collect();
    assert_eq!(after, [by_scanner(A::LeakReported, Revoked, Revoked)]);

    // A disabled key is revoked too.
    let disabled = plain
        .create(NewKey::new("ada", "disabled", Environment::Test))
        .await
        .unwrap()
        .record
        .id;
    plain.set_status(&disabled, Disabled).await.unwrap();
    let start = events(plain, trail(&disabled)).await.len();
    let (record, revoked) = store.report_leak(&disabled).await.unwrap();
    assert!(revoked);
    assert_eq!(record.status, Revoked);
    assert_eq!(other.get(&disabled).await.unwrap().status, Revoked);
    let after: HashSet<(AuditAction, Option<Status>, Option<Status>)> =
        events(other, trail(&disabled)).await[start..]
            .iter()
            .map(|e| (e.action, e.old_status, e.new_status))
            .collect();
    assert_eq!(
        after,
        HashSet::from([
            (A::LeakReported, Some(Disabled), Some(Revoked)),
            (A::Revoked, Some(Disabled), Some(Revoked)),
        ])
    );

    // A deleted key: the report is recorded, nothing else changes.
    let deleted = plain
        .create(NewKey::new("ada", "deleted", Environment::Live))
        .await
        .unwrap()
        .record
        .id;
    let before = plain.set_status(&deleted, Deleted).await.unwrap();
    let start = events(plain, trail(&deleted)).await.len();
    let (record, revoked) = store.report_leak(&deleted).await.unwrap();
    assert!(!revoked);
    assert_eq!(record.status, Deleted);
    assert_eq!(record.version, before.version);
    assert_eq!(other.get(&deleted).await.unwrap(), record);
    let after: Vec<_> = events(other, trail(&deleted)).await[start..]
        .iter()
        .map(|e| (e.action, e.old_status, e.new_status, e.actor.clone()))
        .collect();
    assert_eq!(
        after,
        [(
            A::LeakReported,
            Some(Deleted),
            Some(Deleted),
            "scanner:github".to_owned()
        )]
    );

    // An unknown id: refused, nothing recorded.
    let total = plain
        .audit(AuditQuery::default().with_limit(1000))
        .await
        .unwrap()
        .len();
    let missing = keygate::key::KeyId::new("key_nobody");
    assert_eq!(
        store.report_leak(&missing).await.unwrap_err(),
        StoreError::KeyNotFound(missing)
    );
    assert_eq!(
        plain
            .audit(AuditQuery::default().with_limit(1000))
            .await
            .unwrap()
            .len(),
        total
    );
}
