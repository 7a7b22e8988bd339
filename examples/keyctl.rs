//! `keyctl`: manage keys in a real store from a shell.
//!
//! ```text
//! cargo run --features sqlite,postgres --example keyctl -- [--database-url URL] COMMAND
//! cargo run --features sqlite,postgres --example keyctl -- --help
//! ```
//!
//! `URL` is `sqlite://PATH` (created if missing) or `postgres://…`; without the option
//! (which may come anywhere), `KEYGATE_DATABASE_URL`, else `sqlite://keygate.db`. The
//! commands are in [`USAGE`], which `--help` prints.
//!
//! Secrets: a secret is taken only as `verify`'s KEY (or on stdin with `verify -`) and
//! printed only by `create`, `rotate` and `client create` (its `CLIENT_SECRET=`). An argument anywhere else that looks like a key
//! is refused without being repeated, and nothing prints a database URL.
//!
//! Errors are one clear line on stderr and exit status 2; nothing is half-written.
//!
//! Every write is recorded in the store's audit trail as made by `keyctl:$USER` (or
//! `keyctl` when `USER` is unset or odd); `keyctl audit [ID]` prints the trail.

use std::io::Read;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate::key::Environment;
use keygate::key::{KeyFormat, KeyId};
use keygate::lookup::KeyLookup;
use keygate::ratelimit::Quota;
use keygate::record::{KeyRecord, Restrictions, Scopes, Status};
use keygate::reject::Reason;
use keygate::store::{
    Actor, AuditEvent, AuditQuery, ClientStore, KeyStore, KeyUpdate, NewClient, NewKey,
    OAuthClient, OwnerStore, Page, SqlStore, StoreError,
};
use keygate::validate::{check, Rules};

/// A failure to report: the message, and the exit status.
struct Fail(String, u8);

/// Store errors, told without repeating what the user typed (an owner name could be
/// anything, a password typed in the wrong place among them).
impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        let message = match e {
            StoreError::OwnerNotFound(_) => "no such owner".to_owned(),
            StoreError::OwnerExists(_) => "an owner of that name exists already".to_owned(),
            StoreError::ClientNotFound(_) => "no such client".to_owned(),
            other => other.to_string(),
        };
        Fail(message, 2)
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail(format!("cannot read stdin: {e}"), 2)
    }
}

fn fail<T>(message: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(message.into(), 2))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(message, code)) => {
            if !message.is_empty() {
                eprintln!("keyctl: {message}");
            }
            ExitCode::from(code)
        }
    }
}

/// Options after the command's positional words.
#[derive(Default)]
struct Opts {
    positional: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

impl Opts {
    fn parse(args: &[String], switches: &[&str]) -> Result<Self, Fail> {
        let mut opts = Opts::default();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if let Some(flag) = arg.strip_prefix("--") {
                // `--name=value` or `--name value`; only the name is ever shown.
                let (name, inline) = match flag.split_once('=') {
                    Some((name, value)) => (name, Some(value.to_owned())),
                    None => (flag, None),
                };
                if switches.contains(&name) {
                    if inline.is_some() {
                        return fail(format!("{} takes no value", shown_flag(name)));
                    }
                    opts.flags.push((name.to_owned(), None));
                } else {
                    let value = match inline {
                        Some(value) => value,
                        None => iter.next().cloned().ok_or_else(|| {
                            Fail(format!("{} needs a value", shown_flag(name)), 2)
                        })?,
                    };
                    opts.flags.push((name.to_owned(), Some(value)));
                }
            } else {
                opts.positional.push(arg.clone());
            }
        }
        Ok(opts)
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.flags
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }

    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
    }

    fn only(&self, allowed: &[&str]) -> Result<(), Fail> {
        for (name, _) in &self.flags {
            if !allowed.contains(&name.as_str()) {
                return fail(format!("unknown option {}", shown_flag(name)));
            }
        }
        Ok(())
    }

    fn id(&self) -> Result<KeyId, Fail> {
        match self.positional.as_slice() {
            [id] => key_id(id),
            _ => fail("expected one key id"),
        }
    }
}

fn quotas(opts: &Opts) -> Result<Vec<Quota>, Fail> {
    opts.all("rate")
        .into_iter()
        .map(|r| {
            Quota::parse(r).map_err(|_| {
                Fail(
                    "--rate: expected a quota such as 60/min, 10/s or 1000/hour (invalid quota)"
                        .into(),
                    2,
                )
            })
        })
        .collect()
}

fn restrictions(opts: &Opts) -> Result<Restrictions, Fail> {
    Ok(Restrictions {
        ips: opts
            .all("ip")
            .into_iter()
            .map(|ip| {
                Restrictions::parse_network(ip).map_err(|_| {
                    Fail(
                        "--ip: expected an address or CIDR block such as 10.0.0.0/8 (invalid IP \
                         network)"
                            .into(),
                        2,
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        sites: opts.all("site").into_iter().map(str::to_owned).collect(),
    })
}

fn seconds(text: &str, what: &str) -> Result<Duration, Fail> {
    text.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| Fail(format!("{what} must be a whole number of seconds"), 2))
}

fn unix(time: Option<SystemTime>) -> String {
    time.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(|| "-".to_owned(), |d| d.as_secs().to_string())
}

/// A free-text field for a one-line listing: as it is when it is plain, quoted and escaped
/// (`"a\nb"`) otherwise, so that no stored text can forge lines or move the terminal.
fn field(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' && b != b',');
    if plain {
        text.to_owned()
    } else {
        format!("{text:?}")
    }
}

fn describe(record: &KeyRecord) -> String {
    let join = |items: Vec<String>| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(",")
        }
    };
    format!(
        "ID={} NAME={:?} PREFIX={} ENV={} STATUS={} OWNER={} SCOPES={} RATES={} IPS={} SITES={} USE_CASE={:?} EXPIRES={} CREATED={} LAST_USED={} LAST_USED_IP={}",
        field(record.id.as_str()),
        record.name,
        KeyFormat::default().prefix(record.environment),
        record.environment,
        record.status.as_str(),
        record.owner.as_ref().map_or_else(|| "-".to_owned(), |o| field(&o.name)),
        join(record.scopes.iter().map(field).collect()),
        join(record.quotas.iter().map(ToString::to_string).collect()),
        join(record.restrictions.ips.iter().map(ToString::to_string).collect()),
        join(record.restrictions.sites.iter().map(|s| field(s)).collect()),
        record.use_case,
        unix(record.expires_at),
        unix(record.created_at),
        unix(record.last_used_at),
        record.last_used_ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
    )
}

/// One OAuth2 client on one line; never its secret (the store holds none).
fn describe_client(client: &OAuthClient) -> String {
    let scopes: Vec<String> = client.scopes.iter().map(field).collect();
    format!(
        "CLIENT_ID={} NAME={:?} OWNER={} SCOPES={} ACTIVE={} CREATED={}",
        field(&client.id),
        client.name,
        field(&client.owner),
        if scopes.is_empty() {
            "-".to_owned()
        } else {
            scopes.join(",")
        },
        client.active,
        unix(client.created_at),
    )
}

/// One audit event on one line; never a secret (the trail holds none).
fn describe_event(event: &AuditEvent) -> String {
    let status = |s: Option<Status>| s.map_or("-", Status::as_str);
    format!(
        "EVENT={} AT={} ACTION={} OWNER={} KEY_ID={} ACTOR={} IP={} OLD={} NEW={}",
        event.id,
        unix(Some(event.at)),
        event.action,
        field(&event.owner),
        event.key_id.as_ref().map_or("-", |k| k.as_str()),
        field(&event.actor),
        event.ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
        status(event.old_status),
        status(event.new_status),
    )
}

/// Who keyctl's writes are recorded as made by: `keyctl:$USER`, or `keyctl` when `USER` is
/// unset or not a plain name.
fn actor() -> Actor {
    match std::env::var("USER") {
        Ok(user) if safe_to_show(&user) => Actor::new(format!("keyctl:{user}")),
        _ => Actor::new("keyctl"),
    }
}

const USAGE: &str = "\
usage: keyctl [--database-url URL] COMMAND [ARGS]   (--database-url may come anywhere)

URL is sqlite://PATH (created if missing) or postgres://...; without the option,
KEYGATE_DATABASE_URL, else sqlite://keygate.db.

  owner add NAME [--password-stdin]        prints OWNER=<id>
  owner disable NAME | owner enable NAME   every key of a disabled owner fails with owner_inactive
  create --owner NAME --name N [--description D] [--use-case U] [--env live|test]
         [--scopes a,b] [--rate 60/min]... [--ip CIDR]... [--site S]... [--expires-in SECONDS]
                                           prints KEY=<secret> (this once) and ID=<key id>
  list --owner NAME | show ID              ids, names, prefixes, status, restrictions; never a secret
  update ID [--name N] [--description D] [--scopes a,b] [--rate R]... [--ip CIDR]... [--site S]...
                                           use case, environment and expiry are immutable
  disable ID | enable ID | delete ID       delete is soft: the key is kept for audit
  rotate ID [--grace SECONDS]              prints the new KEY= and ID=; every earlier secret ends
                                           within the grace (--grace 0, the default: at once)
  verify KEY [--ip ADDR] [--site S] [--scope S]...
                                           valid (exit 0) or the rejection code (exit 1);
                                           KEY may be - to read it from stdin (keeps it out of ps)
  client create --owner NAME [--name N] [--scopes a,b]
                                           an OAuth2 client: prints CLIENT_ID=<id> and
                                           CLIENT_SECRET=<secret> (this once)
  client list --owner NAME                 the owner's clients; never a secret
  client revoke CLIENT_ID                  the client and every access token it was issued
  audit [ID] [--owner NAME] [--limit N]    the audit trail (of one key or client, of one owner), newest first,
                                           one EVENT= line per event: time, action, owner, key,
                                           actor, IP, old and new status; never a secret

Writes are recorded in the audit trail as made by keyctl:$USER (keyctl when USER is unset).

A secret is taken only as verify's KEY and printed only by create, rotate and client create. Errors are
one line on stderr and exit status 2; nothing is half-written.
";

/// Whether an argument could be an API key secret (or a large piece of one): it passes the
/// key format, carries a key prefix, or holds a long run of letters and digits.
fn looks_secret(arg: &str) -> bool {
    if KeyFormat::default().check(arg).is_ok() {
        return true;
    }
    let lower = arg.to_ascii_lowercase();
    if lower.contains("kg_live_") || lower.contains("kg_test_") || lower.contains("kgcs_") {
        return true;
    }
    // A client id is public, though as long as a secret's body.
    if client_id(arg).is_some() {
        return false;
    }
    arg.split(|c: char| !c.is_ascii_alphanumeric()).any(|run| {
        run.len() >= 20
            && run.bytes().any(|b| b.is_ascii_digit())
            && run.bytes().any(|b| b.is_ascii_alphabetic())
    })
}

/// Whether a word typed by the user may be repeated in a message: short, plain, and
/// nothing like a secret, a URL or an assignment.
fn safe_to_show(word: &str) -> bool {
    !word.is_empty()
        && word.len() <= 32
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !looks_secret(word)
}

/// An option's name for a message: `--name`, or a neutral phrase when the name is odd.
fn shown_flag(name: &str) -> String {
    if safe_to_show(name) {
        format!("--{name}")
    } else {
        "an option (its name is not shown)".to_owned()
    }
}

/// A key id as the store makes them (`key_` and base62), or a refusal that does not
/// repeat the argument.
fn key_id(text: &str) -> Result<KeyId, Fail> {
    let ok = text.strip_prefix("key_").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    if ok {
        Ok(KeyId::new(text))
    } else {
        fail("expected a key id (key_ followed by letters and digits)")
    }
}

/// A client id as the store makes them (`kgc_` and 20 letters and digits).
fn client_id(text: &str) -> Option<&str> {
    text.strip_prefix("kgc_")
        .filter(|rest| rest.len() == 20 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(|_| text)
}

/// The arguments without `--database-url`, and its value (the option may come anywhere).
fn take_database_url(args: Vec<String>) -> Result<(Option<String>, Vec<String>), Fail> {
    let mut url = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    while let Some(arg) = iter.next() {
        if arg == "--database-url" {
            match iter.next() {
                Some(value) => url = Some(value),
                None => return fail("--database-url needs a value"),
            }
        } else if let Some(value) = arg.strip_prefix("--database-url=") {
            url = Some(value.to_owned());
        } else {
            rest.push(arg);
        }
    }
    Ok((url, rest))
}

/// Refuses any argument that looks like a secret, except `verify`'s KEY, before anything
/// runs: a secret typed in the wrong place must not end up in an error message.
fn refuse_stray_secrets(args: &[String]) -> Result<(), Fail> {
    let verify_key = (args.first().map(String::as_str) == Some("verify"))
        .then(|| {
            args.iter()
                .skip(1)
                .position(|a| !a.starts_with("--"))
                .map(|i| i + 1)
        })
        .flatten();
    for (i, arg) in args.iter().enumerate() {
        if Some(i) != verify_key && looks_secret(arg) {
            return fail(format!(
                "argument {} looks like an API key, which keyctl takes only as `verify KEY` \
                 (or `verify -` on stdin); it is not shown here",
                i + 1
            ));
        }
        if arg.contains("://") {
            return fail(format!(
                "argument {} looks like a URL; a database URL goes after --database-url \
                 (it is not shown here)",
                i + 1
            ));
        }
    }
    Ok(())
}

async fn run(args: Vec<String>) -> Result<(), Fail> {
    let (url, args) = take_database_url(args)?;
    if args.is_empty()
        || args.iter().any(|a| a == "--help" || a == "-h")
        || args.first().map(String::as_str) == Some("help")
    {
        print!("{USAGE}");
        return if args.is_empty() {
            Err(Fail("no command (see above)".into(), 2))
        } else {
            Ok(())
        };
    }
    refuse_stray_secrets(&args)?;
    let url = url
        .or_else(|| std::env::var("KEYGATE_DATABASE_URL").ok())
        .unwrap_or_else(|| "sqlite://keygate.db".to_owned());
    let Some((command, rest)) = args.split_first() else {
        return fail("no command; see keyctl --help");
    };
    let known = [
        "owner", "create", "list", "show", "update", "disable", "enable", "delete", "rotate",
        "verify", "audit", "client",
    ];
    if !known.contains(&command.as_str()) {
        // Never repeated: it may be anything (half of a URL, a password).
        return fail(format!(
            "unknown command (not repeated); the commands are {}; see keyctl --help",
            known.join(", ")
        ));
    }
    let store = SqlStore::connect(&url).await?.acting(actor());
    match command.as_str() {
        "owner" => {
            let opts = Opts::parse(rest, &["password-stdin"])?;
            opts.only(&["password-stdin"])?;
            match opts.positional.as_slice() {
                [action, name] if action == "add" => {
                    let password = if opts.has("password-stdin") {
                        let mut text = String::new();
                        std::io::stdin().read_to_string(&mut text)?;
                        Some(text.trim_end_matches(['\n', '\r']).to_owned())
                    } else {
                        None
                    };
                    let owner = store.add_owner(name, password.as_deref()).await?;
                    println!("OWNER={}", owner.id);
                }
                [action, name] if action == "disable" || action == "enable" => {
                    store.set_owner_active(name, action == "enable").await?;
                    println!("OWNER={name} ACTIVE={}", action == "enable");
                }
                _ => return fail("usage: owner add NAME [--password-stdin] | owner disable NAME | owner enable NAME"),
            }
        }
        "create" => {
            let opts = Opts::parse(rest, &[])?;
            opts.only(&[
                "owner",
                "name",
                "description",
                "use-case",
                "env",
                "scopes",
                "rate",
                "ip",
                "site",
                "expires-in",
            ])?;
            let Some(owner) = opts.one("owner") else {
                return fail("create needs --owner NAME");
            };
            let Some(name) = opts.one("name") else {
                return fail("create needs --name N");
            };
            let env: Environment = opts.one("env").unwrap_or("live").parse().map_err(|_| {
                Fail(
                    "--env: expected live or test (unknown environment)".into(),
                    2,
                )
            })?;
            let mut new = NewKey::new(owner, name, env);
            new.description = opts.one("description").unwrap_or_default().to_owned();
            new.use_case = opts.one("use-case").unwrap_or_default().to_owned();
            new.scopes = Scopes::parse(opts.one("scopes").unwrap_or_default());
            new.quotas = quotas(&opts)?;
            new.restrictions = restrictions(&opts)?;
            if let Some(secs) = opts.one("expires-in") {
                let expires = SystemTime::now().checked_add(seconds(secs, "--expires-in")?);
                new.expires_at = Some(
                    expires
                        .ok_or_else(|| Fail("--expires-in is too far in the future".into(), 2))?,
                );
            }
            let created = store.create(new).await?;
            println!("KEY={}", created.secret.expose_secret());
            println!("ID={}", created.record.id);
        }
        "list" => {
            let opts = Opts::parse(rest, &[])?;
            opts.only(&["owner"])?;
            let Some(owner) = opts.one("owner") else {
                return fail("list needs --owner NAME");
            };
            let mut page = Page {
                after: None,
                limit: 100,
            };
            loop {
                let keys = store.list(owner, page.clone()).await?;
                for record in &keys {
                    println!("{}", describe(record));
                }
                match keys.last() {
                    Some(last) if keys.len() == page.limit => page.after = Some(last.id.clone()),
                    _ => break,
                }
            }
        }
        "show" => {
            let opts = Opts::parse(rest, &[])?;
            opts.only(&[])?;
            println!("{}", describe(&store.get(&opts.id()?).await?));
        }
        "update" => {
            let opts = Opts::parse(rest, &[])?;
            for immutable in ["use-case", "env", "expires-in"] {
                if opts.has(immutable) {
                    return fail(format!("--{immutable} cannot be changed: the field is immutable once the key is created"));
                }
            }
            opts.only(&["name", "description", "scopes", "rate", "ip", "site"])?;
            let id = opts.id()?;
            let mut update = KeyUpdate::default();
            update.name = opts.one("name").map(str::to_owned);
            update.description = opts.one("description").map(str::to_owned);
            update.scopes = opts.one("scopes").map(Scopes::parse);
            if opts.has("rate") {
                update.quotas = Some(quotas(&opts)?);
            }
            if opts.has("ip") || opts.has("site") {
                let current = store.get(&id).await?;
                let mut r = restrictions(&opts)?;
                if !opts.has("ip") {
                    r.ips = current.restrictions.ips;
                }
                if !opts.has("site") {
                    r.sites = current.restrictions.sites;
                }
                update.restrictions = Some(r);
            }
            println!("{}", describe(&store.update(&id, update).await?));
        }
        "disable" | "enable" | "delete" => {
            let opts = Opts::parse(rest, &[])?;
            opts.only(&[])?;
            let status = match command.as_str() {
                "disable" => Status::Disabled,
                "enable" => Status::Active,
                _ => Status::Deleted,
            };
            let record = store.set_status(&opts.id()?, status).await?;
            println!("ID={} STATUS={}", record.id, record.status.as_str());
        }
        "rotate" => {
            let opts = Opts::parse(rest, &[])?;
            opts.only(&["grace"])?;
            let grace = opts
                .one("grace")
                .map_or(Ok(Duration::ZERO), |g| seconds(g, "--grace"))?;
            let rotated = store.rotate(&opts.id()?, grace, None).await?;
            println!("KEY={}", rotated.secret.expose_secret());
            println!("ID={}", rotated.record.id);
        }
        "verify" => {
            let opts = Opts::parse(rest, &[])?;
            opts.only(&["ip", "site", "scope"])?;
            let [secret] = opts.positional.as_slice() else {
                return fail("verify needs one KEY (or - to read it from stdin)");
            };
            let secret = if secret == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                zeroize::Zeroizing::new(text.trim().to_owned())
            } else {
                zeroize::Zeroizing::new(secret.clone())
            };
            let secret = secret.as_str();
            let ip: Option<IpAddr> = opts
                .one("ip")
                .map(str::parse)
                .transpose()
                .map_err(|_| Fail("--ip must be an IP address".into(), 2))?;
            let rules = Rules::default().scopes(opts.all("scope").into_iter().collect::<Scopes>());
            // The same steps as the layers: format and checksum, lookup by hash, validation.
            let verdict = if KeyFormat::default().check(secret).is_err() {
                Err(Reason::InvalidApiKey)
            } else {
                match store
                    .lookup(&keygate::key::KeyHash::of(secret).into())
                    .await?
                {
                    None => Err(Reason::InvalidApiKey),
                    Some(record) => check(
                        &record,
                        &rules,
                        SystemTime::now(),
                        || ip,
                        || opts.one("site").map(std::borrow::Cow::Borrowed),
                    ),
                }
            };
            match verdict {
                Ok(()) => println!("valid"),
                Err(reason) => {
                    println!("{}", reason.code());
                    return Err(Fail(String::new(), 1));
                }
            }
        }
        "client" => {
            let opts = Opts::parse(rest, &[])?;
            let usage = "usage: client create --owner NAME [--name N] [--scopes a,b] | \
                         client list --owner NAME | client revoke CLIENT_ID";
            match opts.positional.as_slice() {
                [action] if action == "create" => {
                    opts.only(&["owner", "name", "scopes"])?;
                    let Some(owner) = opts.one("owner") else {
                        return fail("client create needs --owner NAME");
                    };
                    let new = NewClient::new(owner, opts.one("name").unwrap_or("client"))
                        .with_scopes(Scopes::parse(opts.one("scopes").unwrap_or_default()));
                    let created = store.create_client(new).await?;
                    println!("CLIENT_ID={}", created.client.id);
                    println!("CLIENT_SECRET={}", created.secret.expose_secret());
                }
                [action] if action == "list" => {
                    opts.only(&["owner"])?;
                    let Some(owner) = opts.one("owner") else {
                        return fail("client list needs --owner NAME");
                    };
                    for client in store.clients(owner).await? {
                        println!("{}", describe_client(&client));
                    }
                }
                [action, id] if action == "revoke" => {
                    opts.only(&[])?;
                    let Some(id) = client_id(id) else {
                        return fail(
                            "expected a client id (kgc_ followed by 20 letters and digits)",
                        );
                    };
                    println!("{}", describe_client(&store.revoke_client(id).await?));
                }
                _ => return fail(usage),
            }
        }
        "audit" => {
            let opts = Opts::parse(rest, &[])?;
            opts.only(&["owner", "limit"])?;
            let mut query = AuditQuery::default();
            match opts.positional.as_slice() {
                [] => {}
                // A client's events are filed under its id.
                [id] if client_id(id).is_some() => query = query.with_key(KeyId::new(id.as_str())),
                [id] => query = query.with_key(key_id(id)?),
                _ => return fail("usage: audit [ID] [--owner NAME] [--limit N]"),
            }
            if let Some(owner) = opts.one("owner") {
                query = query.with_owner(owner);
            }
            let mut left = match opts.one("limit") {
                Some(n) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| Fail("--limit must be a positive whole number".into(), 2))?,
                None => usize::MAX,
            };
            // Pages of at most 1000, by the `before` cursor, until the trail or --limit ends.
            loop {
                let page = left.min(1000);
                let events = store.audit(query.clone().with_limit(page)).await?;
                for event in &events {
                    println!("{}", describe_event(event));
                }
                left -= events.len();
                match events.last() {
                    Some(last) if events.len() == page && left > 0 => {
                        query = query.with_before(last.id);
                    }
                    _ => break,
                }
            }
        }
        _ => return fail("unknown command; see keyctl --help"),
    }
    Ok(())
}
