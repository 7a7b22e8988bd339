//! `keyctl` as an operator uses it: the example binary (cargo builds examples before it runs
//! tests) driven through a whole session on a SQLite file and on PostgreSQL, and every kind
//! of bad input answered with a clear message, a non-zero exit and nothing written.
#![cfg(feature = "sqlite")]

mod common;

use common::keyctl::{keyctl_raw, Out};

fn keyctl(url: &str, args: &[&str], stdin: Option<&str>) -> Out {
    let mut all = vec!["--database-url", url];
    all.extend_from_slice(args);
    keyctl_raw(&all, stdin)
}

fn session(url: &str) {
    let owner = format!("ada{}", std::process::id());
    let o = keyctl(
        url,
        &["owner", "add", &owner, "--password-stdin"],
        Some("s3cret\n"),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.value("OWNER").starts_with("own_"));

    let o = keyctl(
        url,
        &[
            "create",
            "--owner",
            &owner,
            "--name",
            "ci",
            "--use-case",
            "build",
            "--scopes",
            "read,messages:write",
            "--rate",
            "60/min",
            "--ip",
            "10.0.0.0/8",
            "--site",
            "shop",
            "--expires-in",
            "86400",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let (key, id) = (o.value("KEY"), o.value("ID"));
    assert!(key.starts_with("kg_live_"));

    let list = keyctl(url, &["list", "--owner", &owner], None);
    assert_eq!(list.code, 0);
    assert!(list.stdout.contains(&id) && list.stdout.contains("PREFIX=kg_live_"));
    assert!(list.stdout.contains("IPS=10.0.0.0/8") && list.stdout.contains("RATES=60/min"));
    let show = keyctl(url, &["show", &id], None);
    for out in [&list, &show] {
        assert!(
            !out.stdout.contains(&key) && !out.stdout.contains(&key[8..20]),
            "a secret was printed"
        );
    }

    let verify = |args: &[&str]| {
        let mut all = vec!["verify", key.as_str()];
        all.extend_from_slice(args);
        let o = keyctl(url, &all, None);
        (o.code, o.stdout.trim().to_owned())
    };
    assert_eq!(
        verify(&["--ip", "10.1.2.3", "--site", "shop", "--scope", "read"]),
        (0, "valid".into())
    );
    assert_eq!(
        verify(&["--ip", "192.0.2.1", "--site", "shop"]),
        (1, "ip_not_allowed".into())
    );
    assert_eq!(
        verify(&["--ip", "10.1.2.3", "--site", "other"]),
        (1, "site_not_allowed".into())
    );
    assert_eq!(
        verify(&["--ip", "10.1.2.3", "--site", "shop", "--scope", "admin"]),
        (1, "insufficient_scope".into())
    );

    for immutable in [
        ["--env", "test"],
        ["--use-case", "x"],
        ["--expires-in", "5"],
    ] {
        let o = keyctl(url, &["update", &id, immutable[0], immutable[1]], None);
        assert_ne!(o.code, 0);
        assert!(o.stderr.contains("immutable"), "{}", o.stderr);
    }
    let o = keyctl(
        url,
        &["update", &id, "--name", "ci-2", "--scopes", "read"],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("NAME=\"ci-2\"") && o.stdout.contains("SCOPES=read "));

    assert_eq!(keyctl(url, &["disable", &id], None).code, 0);
    assert_eq!(
        verify(&["--ip", "10.1.2.3", "--site", "shop"]),
        (1, "api_key_disabled".into())
    );
    assert_eq!(keyctl(url, &["enable", &id], None).code, 0);

    let o = keyctl(url, &["rotate", &id, "--grace", "300"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let new_key = o.value("KEY");
    assert_eq!(o.value("ID"), id);
    assert_eq!(
        verify(&["--ip", "10.1.2.3", "--site", "shop"]),
        (0, "valid".into()),
        "old key in its grace"
    );
    let o = keyctl(
        url,
        &["verify", &new_key, "--ip", "10.1.2.3", "--site", "shop"],
        None,
    );
    assert_eq!((o.code, o.stdout.trim()), (0, "valid"));

    assert_eq!(keyctl(url, &["owner", "disable", &owner], None).code, 0);
    let o = keyctl(
        url,
        &["verify", &new_key, "--ip", "10.1.2.3", "--site", "shop"],
        None,
    );
    assert_eq!((o.code, o.stdout.trim()), (1, "owner_inactive"));
    assert_eq!(keyctl(url, &["owner", "enable", &owner], None).code, 0);

    // The key on stdin, kept out of the process list.
    let o = keyctl(
        url,
        &["verify", "-", "--ip", "10.1.2.3", "--site", "shop"],
        Some(&format!("{new_key}\n")),
    );
    assert_eq!((o.code, o.stdout.trim()), (0, "valid"), "{}", o.stderr);

    // A secret where something else belongs is refused and never repeated.
    secrets_are_never_echoed(url, &new_key, &owner, &id);

    assert_eq!(keyctl(url, &["delete", &id], None).code, 0);
    let o = keyctl(url, &["enable", &id], None);
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("deleted"),
        "says why, not 'no such key': {}",
        o.stderr
    );
    let o = keyctl(url, &["rotate", &id], None);
    assert!(o.code == 2 && o.stderr.contains("deleted"), "{}", o.stderr);
    let o = keyctl(url, &["verify", &new_key], None);
    assert_eq!((o.code, o.stdout.trim()), (1, "invalid_api_key"));
    // The key's trail, newest first, and never a secret.
    let o = keyctl(url, &["audit", &id], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout
            .lines()
            .next()
            .is_some_and(|l| l.contains("ACTION=deleted")),
        "{}",
        o.stdout
    );
    assert!(o
        .stdout
        .lines()
        .last()
        .is_some_and(|l| l.contains("ACTION=created")));
    for secret in [&key, &new_key] {
        assert!(!o.stdout.contains(secret.as_str()) && !o.stdout.contains(&secret[8..20]));
    }
    assert!(
        keyctl(url, &["show", &id], None)
            .stdout
            .contains("STATUS=deleted"),
        "kept for audit"
    );

    // Bad input: a clear message naming the problem, a non-zero exit, nothing written.
    let before = keyctl(url, &["list", "--owner", &owner], None).stdout;
    let bad: &[(&[&str], &str)] = &[
        (
            &["create", "--owner", "ghost-owner", "--name", "x"],
            "no such owner",
        ),
        (&["show", "key_doesnotexist"], "no key with id"),
        (
            &[
                "create",
                "--owner",
                &owner,
                "--name",
                "x",
                "--ip",
                "10.0.0.0/33",
            ],
            "invalid IP network",
        ),
        (
            &["create", "--owner", &owner, "--name", "x", "--ip", "banana"],
            "invalid IP network",
        ),
        (&["create", "--owner", &owner, "--name", ""], "invalid name"),
        (
            &[
                "create", "--owner", &owner, "--name", "x", "--rate", "0/min",
            ],
            "invalid quota",
        ),
        (
            &["create", "--owner", &owner, "--name", "x", "--env", "prod"],
            "unknown environment",
        ),
        (&["rotate", "key_nope"], "no key with id"),
        (&["frobnicate"], "unknown command"),
    ];
    for (args, message) in bad {
        let o = keyctl(url, args, None);
        assert_eq!(o.code, 2, "{args:?}");
        assert!(o.stderr.contains(message), "{args:?}: {}", o.stderr);
    }
    assert_eq!(
        keyctl(url, &["list", "--owner", &owner], None).stdout,
        before,
        "nothing half-written"
    );
}

/// Every place a secret could be typed by mistake: refused, exit 2, and neither the key nor
/// any large part of it on stdout or stderr.
fn secrets_are_never_echoed(url: &str, key: &str, owner: &str, id: &str) {
    let mut typo = key.to_owned();
    let last = if typo.ends_with('A') { "B" } else { "A" };
    typo.replace_range(typo.len() - 1.., last);
    let body = &key[8..];
    let grace_eq = format!("--grace={key}");
    let cases: Vec<Vec<&str>> = vec![
        vec!["show", key],
        vec!["disable", key],
        vec!["enable", key],
        vec!["delete", key],
        vec!["rotate", key],
        vec![key],
        vec![key, "list"],
        vec!["list", "--owner", key],
        vec!["create", "--owner", key, "--name", "x"],
        vec!["create", "--owner", owner, "--name", key],
        vec!["create", "--owner", owner, "--name", "x", "--rate", key],
        vec!["create", "--owner", owner, "--name", "x", "--ip", key],
        vec!["create", "--owner", owner, "--name", "x", "--site", key],
        vec![
            "create",
            "--owner",
            owner,
            "--name",
            "x",
            "--description",
            key,
        ],
        vec!["rotate", id, "--grace", key],
        vec!["rotate", id, &grace_eq],
        vec!["update", id, "--scopes", key],
        vec!["show", &typo],
        vec!["show", body],
        vec!["owner", "add", key],
        vec!["verify", key, "--site", key],
    ];
    for args in &cases {
        let o = keyctl(url, args, None);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        for out in [&o.stdout, &o.stderr] {
            assert!(
                !out.contains(&key[8..20]),
                "{args:?} printed the secret: {out}"
            );
            assert!(
                !out.contains(&typo[8..20]),
                "{args:?} printed the typo: {out}"
            );
        }
    }
}

#[test]
fn secrets_in_urls_are_never_printed() {
    for url in [
        "mysql://admin:hunter2-pw@db.internal/keys",
        "postgres://admin:hunter2-pw@127.0.0.1:1/keys",
        "hunter2-pw",
    ] {
        let o = keyctl_raw(&["list", "--owner", "x", "--database-url", url], None);
        assert_eq!(o.code, 2, "{url}");
        assert!(
            !o.stderr.contains("hunter2") && !o.stdout.contains("hunter2"),
            "{}",
            o.stderr
        );
    }
    // Unreachable: says what failed, not that a pool timed out.
    #[cfg(feature = "postgres")]
    let o = keyctl_raw(
        &[
            "--database-url",
            "postgres://admin:hunter2-pw@127.0.0.1:1/keys",
            "list",
            "--owner",
            "x",
        ],
        None,
    );
    #[cfg(feature = "postgres")]
    assert!(o.stderr.to_lowercase().contains("refused"), "{}", o.stderr);
}

#[test]
fn help_and_the_database_option_anywhere() {
    for args in [&["--help"][..], &["-h"], &["help"], &["create", "--help"]] {
        let o = keyctl_raw(args, None);
        assert_eq!(o.code, 0, "{args:?}");
        assert!(o.stdout.contains("usage: keyctl"), "{args:?}: {}", o.stdout);
    }
    let o = keyctl_raw(&[], None);
    assert_eq!(o.code, 2);
    assert!(o.stdout.contains("usage: keyctl"));

    let dir = std::env::temp_dir().join(format!("keygate-keyctl-opt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    let o = keyctl_raw(&["owner", "add", "zoe", "--database-url", &url], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let eq = format!("--database-url={url}");
    let o = keyctl_raw(&["create", &eq, "--owner", "zoe", "--name", "k"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = keyctl_raw(&["list", "--owner", "zoe", "--database-url", &url], None);
    assert!(o.stdout.contains("NAME=\"k\""), "{}", o.stdout);
    let o = keyctl_raw(&["list", "--owner", "zoe", "--database-url"], None);
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("--database-url needs a value"),
        "{}",
        o.stderr
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_session_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("keygate-keyctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    session(&format!("sqlite://{}", dir.join("keys.db").display()));
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "test-servers")]
#[test]
fn a_session_on_postgres() {
    let url = std::env::var("KEYGATE_TEST_POSTGRES_URL")
        .expect("KEYGATE_TEST_POSTGRES_URL is not set (bash .ci/run sets it)");
    session(&url);
}

#[test]
fn a_malformed_database_url_is_a_clear_error() {
    let o = keyctl("mysql://nope", &["list", "--owner", "x"], None);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("invalid database URL"), "{}", o.stderr);
}

/// `audit [ID]`: one line per event, newest first, the writes recorded as keyctl's; never a
/// secret; bad arguments refused.
#[test]
fn audit_prints_the_trail_newest_first() {
    let dir = std::env::temp_dir().join(format!("keygate-keyctl-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    let url = url.as_str();
    assert_eq!(keyctl(url, &["owner", "add", "ada"], None).code, 0);
    let o = keyctl(url, &["create", "--owner", "ada", "--name", "ci"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let (key, id) = (o.value("KEY"), o.value("ID"));
    assert_eq!(keyctl(url, &["disable", &id], None).code, 0);
    assert_eq!(keyctl(url, &["enable", &id], None).code, 0);
    let o = keyctl(url, &["rotate", &id, "--grace", "60"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let rotated = o.value("KEY");
    let o = keyctl(url, &["create", "--owner", "ada", "--name", "other"], None);
    let other = o.value("ID");
    assert_eq!(keyctl(url, &["owner", "disable", "ada"], None).code, 0);

    let actions = |out: &Out| -> Vec<String> {
        out.stdout
            .lines()
            .map(|line| {
                assert!(line.starts_with("EVENT="), "{line}");
                let field = |name: &str| {
                    line.split(' ')
                        .find_map(|w| w.strip_prefix(&format!("{name}=")))
                        .unwrap_or_else(|| panic!("no {name}= in {line}"))
                        .to_owned()
                };
                assert!(field("ACTOR").starts_with("keyctl"), "{line}");
                assert_eq!(field("IP"), "-");
                assert!(field("AT").parse::<u64>().is_ok(), "{line}");
                format!("{}:{}>{}", field("ACTION"), field("OLD"), field("NEW"))
            })
            .collect()
    };
    let o = keyctl(url, &["audit", &id], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        actions(&o),
        [
            "rotated:->-",
            "enabled:disabled>active",
            "disabled:active>disabled",
            "created:->active",
        ]
    );
    assert!(o
        .stdout
        .lines()
        .all(|l| l.contains(&format!("KEY_ID={id}"))));
    let o = keyctl(url, &["audit"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        actions(&o),
        [
            "owner_disabled:->-",
            "created:->active",
            "rotated:->-",
            "enabled:disabled>active",
            "disabled:active>disabled",
            "created:->active",
            "owner_added:->-",
        ]
    );
    assert!(o.stdout.contains(&format!("KEY_ID={other}")));
    if let Ok(user) = std::env::var("USER") {
        if !user.is_empty() && user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            assert!(
                o.stdout.contains(&format!("ACTOR=keyctl:{user} ")),
                "{}",
                o.stdout
            );
        }
    }
    for secret in [&key, &rotated] {
        assert!(!o.stdout.contains(secret.as_str()) && !o.stdout.contains(&secret[8..20]));
    }
    let o = keyctl(url, &["audit", "--owner", "ada", "--limit", "2"], None);
    assert_eq!(actions(&o), ["owner_disabled:->-", "created:->active"]);
    let o = keyctl(url, &["audit", "--owner", "nobody"], None);
    assert_eq!((o.code, o.stdout.as_str()), (0, ""));
    for bad in [
        &["audit", "not-an-id"][..],
        &["audit", &id, &other],
        &["audit", "--limit", "0"],
        &["audit", "--limit", "x"],
        &["audit", "--grace", "1"],
    ] {
        let o = keyctl(url, bad, None);
        assert_eq!(o.code, 2, "{bad:?}");
        assert!(o.stdout.is_empty(), "{bad:?}");
    }
    let help = keyctl_raw(&["--help"], None);
    assert!(help.stdout.contains("audit [ID]"));
    let _ = std::fs::remove_dir_all(dir);
}

/// `client create|list|revoke`: the secret printed once (`CLIENT_SECRET=`) and never again,
/// not even when typed back in the wrong place; revoking takes the client's tokens with it.
#[test]
fn clients_are_created_listed_and_revoked() {
    use keygate::key::{Environment, KeyId};
    use keygate::record::Status;
    use keygate::store::{KeyStore, NewKey, SqlStore};

    let dir = std::env::temp_dir().join(format!("keygate-keyctl-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    let url = url.as_str();
    assert_eq!(keyctl(url, &["owner", "add", "ada"], None).code, 0);

    let o = keyctl(
        url,
        &[
            "client",
            "create",
            "--owner",
            "ada",
            "--name",
            "billing",
            "--scopes",
            "read,write",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let (id, secret) = (o.value("CLIENT_ID"), o.value("CLIENT_SECRET"));
    assert!(id.starts_with("kgc_") && id.len() == 24, "{id}");
    assert!(secret.starts_with("kgcs_") && secret.len() == 37);
    assert_eq!(o.stdout.lines().count(), 2, "{}", o.stdout);
    // DESIGN's form, without --name.
    let o = keyctl(
        url,
        &["client", "create", "--owner", "ada", "--scopes", "read"],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let second = o.value("CLIENT_ID");

    // A token issued to the client (as the key service makes them).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = runtime.block_on(SqlStore::connect(url)).expect("connect");
    let token = runtime.block_on(async {
        let mut new = NewKey::new("ada", "token", Environment::Live);
        new.rate_bucket = Some(KeyId::new(id.as_str()));
        store.create(new).await.expect("token")
    });
    let plain = runtime
        .block_on(store.create(NewKey::new("ada", "plain", Environment::Live)))
        .expect("key");

    let list = keyctl(url, &["client", "list", "--owner", "ada"], None);
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert_eq!(list.stdout.lines().count(), 2);
    let line = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("CLIENT_ID={id} ")))
        .expect("the client is listed");
    assert!(line.contains("NAME=\"billing\"") && line.contains("OWNER=ada"));
    assert!(line.contains("SCOPES=read,write") && line.contains("ACTIVE=true"));
    assert!(list.stdout.contains(&format!("CLIENT_ID={second} ")));

    let o = keyctl(url, &["client", "revoke", &id], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("ACTIVE=false"), "{}", o.stdout);
    let status = |id: &KeyId| runtime.block_on(store.get(id)).expect("get").status;
    assert_eq!(status(&token.record.id), Status::Revoked);
    assert_eq!(status(&plain.record.id), Status::Active);
    assert_eq!(keyctl(url, &["client", "revoke", &id], None).code, 0);
    let list = keyctl(url, &["client", "list", "--owner", "ada"], None);
    assert!(list.stdout.contains("ACTIVE=false") && list.stdout.contains("ACTIVE=true"));

    let o = keyctl(url, &["audit", &id], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let actions: Vec<&str> = o
        .stdout
        .lines()
        .filter_map(|l| l.split(' ').find_map(|w| w.strip_prefix("ACTION=")))
        .collect();
    assert_eq!(actions, ["client_revoked", "client_created"]);

    // Every output so far, and every refusal below: never the secret, nor part of it.
    let mut outs = vec![list, o];
    let unknown = format!("kgc_{}", "A".repeat(20));
    let secret_eq = format!("--name={secret}");
    for (args, code) in [
        (&["client", "revoke", &unknown][..], 2),
        (&["client", "revoke", "nope"], 2),
        (&["client", "revoke"], 2),
        (&["client"], 2),
        (&["client", "create", "--name", "x"], 2),
        (&["client", "list"], 2),
        (&["client", "list", "--owner", "nobody"], 2),
        (&["client", "revoke", &secret], 2),
        (&["client", "list", "--owner", &secret], 2),
        (
            &["client", "create", "--owner", "ada", "--name", &secret],
            2,
        ),
        (&["client", "create", "--owner", "ada", &secret_eq], 2),
        (&["show", &secret], 2),
        (&["verify", &secret], 1),
    ] {
        let o = keyctl(url, args, None);
        assert_eq!(o.code, code, "{args:?}: {}", o.stderr);
        outs.push(o);
    }
    for o in &outs {
        for out in [&o.stdout, &o.stderr] {
            assert!(
                !out.contains(&secret[5..17]) && !out.contains(&secret[20..]),
                "a client secret was printed: {out}"
            );
        }
    }
    let help = keyctl_raw(&["--help"], None);
    assert!(help.stdout.contains("client create --owner NAME"));
    assert!(help.stdout.contains("client revoke CLIENT_ID"));
    let _ = std::fs::remove_dir_all(dir);
}
