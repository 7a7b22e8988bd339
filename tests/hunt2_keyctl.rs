//! Second hunt on keyctl: option values repeated in error messages, and a panic where one
//! clear line was promised. Needs the example built (`cargo build --example keyctl`, which
//! plain `cargo test` does).
#![cfg(feature = "sqlite")]

mod common;

use common::keyctl::keyctl_raw;

fn scratch(tag: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("keygate-hunt2-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    (dir, url)
}

/// keyctl's own comment on `--name=value`: "only the name is ever shown", and the brief of
/// the first fixes: keyctl never echoes `--x=value` values. Yet a value that fails to parse
/// is quoted back in full by `--ip`, `--rate`, `--env`, `--expires-in` and `--grace` (and
/// `--owner` through "no owner named …"). A password pasted into the wrong option (a shell
/// variable mix-up, `--rate=$PGPASSWORD`) lands on the terminal and in CI logs. The
/// password here is not key-shaped and holds no `://`, so the secret filters do not stop it.
#[test]
fn option_values_are_echoed_in_error_messages() {
    let (dir, url) = scratch("values");
    let o = keyctl_raw(&["--database-url", &url, "owner", "add", "ada"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let pw = "Tr0ub4dor&3";
    let flag = |name: &str| format!("--{name}={pw}");
    let cases: Vec<Vec<String>> = vec![
        vec![
            "create".into(),
            "--owner".into(),
            "ada".into(),
            "--name".into(),
            "ci".into(),
            flag("ip"),
        ],
        vec![
            "create".into(),
            "--owner".into(),
            "ada".into(),
            "--name".into(),
            "ci".into(),
            flag("rate"),
        ],
        vec![
            "create".into(),
            "--owner".into(),
            "ada".into(),
            "--name".into(),
            "ci".into(),
            flag("env"),
        ],
        vec![
            "create".into(),
            "--owner".into(),
            "ada".into(),
            "--name".into(),
            "ci".into(),
            flag("expires-in"),
        ],
        vec!["create".into(), flag("owner"), "--name".into(), "ci".into()],
        vec!["rotate".into(), "key_abc".into(), flag("grace")],
    ];
    let mut echoed = Vec::new();
    for case in &cases {
        let mut args = vec!["--database-url", url.as_str()];
        args.extend(case.iter().map(String::as_str));
        let o = keyctl_raw(&args, None);
        assert_ne!(o.code, 0, "{case:?}");
        if o.stderr.contains("Tr0ub4dor") || o.stdout.contains("Tr0ub4dor") {
            echoed.push(format!("{} -> {}", case.join(" "), o.stderr.trim()));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    assert!(echoed.is_empty(), "values repeated:\n{}", echoed.join("\n"));
}

/// "Bad input is one clear line on stderr and exit status 2." A large `--expires-in`
/// overflows `SystemTime + Duration` and panics: exit 101 and a backtrace.
#[test]
fn a_huge_expires_in_panics() {
    let (dir, url) = scratch("expiry");
    let o = keyctl_raw(&["--database-url", &url, "owner", "add", "ada"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = keyctl_raw(
        &[
            "--database-url",
            &url,
            "create",
            "--owner",
            "ada",
            "--name",
            "ci",
            "--expires-in",
            "18446744073709551615",
        ],
        None,
    );
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(
        (o.code, o.stderr.lines().count()),
        (2, 1),
        "stderr: {}",
        o.stderr.lines().take(3).collect::<Vec<_>>().join(" | ")
    );
}

/// A database URL whose password is a passphrase, pasted unquoted
/// (`--database-url $URL` with spaces in the password): the option takes
/// `postgres://admin:correct`, and the passphrase's next word becomes the command, which
/// keyctl repeats because it is a plain word: `unknown command "horse"`.
#[test]
fn a_passphrase_split_from_its_url_is_echoed_as_the_command() {
    let o = keyctl_raw(
        &[
            "--database-url",
            "postgres://admin:correct",
            "horse",
            "battery",
            "staple@db.internal/keys",
            "list",
            "--owner",
            "x",
        ],
        None,
    );
    assert_ne!(o.code, 0);
    assert!(
        !o.stderr.contains("horse") && !o.stdout.contains("horse"),
        "printed a word of the password: {}",
        o.stderr.trim()
    );
}
