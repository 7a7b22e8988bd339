//! keyctl repeating what it must never repeat: database URLs (with their password) and
//! owner passwords, when they are typed one character off from where keyctl expects them;
//! and stored text forging lines in its listings. Found by the hunt of issue 7.
#![cfg(feature = "sqlite")]

mod common;

use common::keyctl::keyctl_raw;

fn assert_not_printed(args: &[&str], secret: &str) {
    let o = keyctl_raw(args, None);
    assert_ne!(o.code, 0, "{args:?}");
    for out in [&o.stdout, &o.stderr] {
        assert!(!out.contains(secret), "{args:?} printed {secret:?}: {out}");
    }
}

/// A database URL typed where the command goes (the `--database-url` option forgotten, or
/// `keyctl $KEYGATE_DATABASE_URL list …`): "unknown command \"postgres://admin:PASSWORD@…\"".
#[test]
fn a_database_url_in_the_command_position_is_echoed_with_its_password() {
    assert_not_printed(
        &[
            "postgres://admin:hunter2-pw@db.internal/keys",
            "list",
            "--owner",
            "x",
        ],
        "hunter2",
    );
}

/// The option misspelt (`_` for `-`, a common slip): the whole `--database_url=URL` is
/// echoed as an unknown command.
#[test]
fn a_misspelt_database_url_option_is_echoed_with_its_password() {
    assert_not_printed(
        &[
            "--database_url=postgres://admin:hunter2-pw@db.internal/keys",
            "list",
            "--owner",
            "x",
        ],
        "hunter2",
    );
    assert_not_printed(
        &[
            "list",
            "--owner",
            "x",
            "--db-url=postgres://admin:hunter2-pw@db.internal/keys",
        ],
        "hunter2",
    );
}

/// `--password=…` for `owner add` (instead of `--password-stdin`): the password is printed
/// in "--password=… needs a value".
#[test]
fn an_owner_password_given_as_an_option_is_echoed() {
    let dir = std::env::temp_dir().join(format!("keygate-hunt-kc2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    let o = keyctl_raw(
        &[
            "--database-url",
            &url,
            "owner",
            "add",
            "ada",
            "--password=Tr0ub4dor-3",
        ],
        None,
    );
    let _ = std::fs::remove_dir_all(dir);
    assert_ne!(o.code, 0);
    assert!(
        !o.stderr.contains("Tr0ub4dor") && !o.stdout.contains("Tr0ub4dor"),
        "printed the password: {}",
        o.stderr
    );
}

/// `keyctl list`/`show` print one `ID=… NAME=… … SITES=…` line per key. Whoever may create
/// keys through the library (a self-service key API over `SqlStore`) could put a newline or
/// terminal escapes in a site: the operator's `keyctl list` then showed forged lines
/// (`ID=key_…`) that scripts parsing the output take as real. The store now refuses such
/// text; a record written before that (here: straight into the database) is printed
/// escaped, on one line.
#[tokio::test]
async fn a_site_with_a_newline_forges_lines_in_keyctl_list() {
    use keygate::key::Environment;
    use keygate::record::Restrictions;
    use keygate::store::{KeyStore, NewKey, OwnerStore, SqlStore, StoreError};
    let dir = std::env::temp_dir().join(format!("keygate-hunt-kc3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    let store = SqlStore::connect(&url).await.unwrap();
    store.add_owner("tenant", None).await.unwrap();
    let forged = "example.com\nID=key_forged STATUS=active\n\u{1b}[2K";
    let mut new = NewKey::new("tenant", "mine", Environment::Live);
    new.restrictions = Restrictions {
        ips: vec![],
        sites: vec![forged.into()],
    };
    let refused = store.create(new).await.unwrap_err();
    assert!(
        matches!(refused, StoreError::Invalid { field: "site", .. }),
        "{refused}"
    );
    let created = store
        .create(NewKey::new("tenant", "mine", Environment::Live))
        .await
        .unwrap();
    drop(store);
    // As an older version (or another tool) could have written it.
    let raw = sqlx::sqlite::SqlitePoolOptions::new()
        .connect(&url)
        .await
        .unwrap();
    let restrictions = serde_json::json!({"ips": [], "sites": [forged]}).to_string();
    sqlx::query("UPDATE keygate_keys SET restrictions = ?, name = ? WHERE id = ?")
        .bind(restrictions)
        .bind("line\nID=key_forged2")
        .bind(created.record.id.as_str().to_owned())
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    let o = keyctl_raw(&["--database-url", &url, "list", "--owner", "tenant"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        o.stdout.lines().count(),
        1,
        "one key, one line: {:?}",
        o.stdout
    );
    assert!(!o.stdout.contains('\u{1b}'), "raw escape: {:?}", o.stdout);
}
