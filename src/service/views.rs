//! What the service reads and writes: request bodies (typed, every field known) and the
//! views of keys and audit events (never a secret).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::fail::{Fail, Input};
use crate::key::{Environment, KeyFormat};
use crate::quota::Quota;
use crate::record::{KeyRecord, Restrictions, Scopes, Status};
use crate::store::{AuditEvent, CreatedKey, KeyUpdate, NewKey};

/// The longest lifetime `expires_in` may ask for: ten years.
const MAX_EXPIRES_IN: u64 = 10 * 365 * 86_400;
/// The longest grace a rotation may give the old secret: thirty days.
const MAX_GRACE: u64 = 30 * 86_400;
/// The most scopes, networks or sites in one list.
const MAX_LIST: usize = 64;

/// A time as RFC 3339 in UTC, to the second.
pub(crate) fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

fn time_opt(at: Option<SystemTime>) -> Option<String> {
    at.map(time)
}

/// A key as its owner sees it. Never the secret, never its hash.
#[derive(Debug, Serialize)]
pub(crate) struct KeyView {
    id: String,
    name: String,
    description: String,
    use_case: String,
    environment: Environment,
    status: Status,
    prefix: String,
    scopes: Vec<String>,
    rates: Vec<String>,
    ips: Vec<String>,
    sites: Vec<String>,
    expires_at: Option<String>,
    created_at: Option<String>,
    last_used_at: Option<String>,
    last_used_ip: Option<IpAddr>,
}

impl KeyView {
    pub(crate) fn of(record: &KeyRecord, format: &KeyFormat) -> Self {
        Self {
            id: record.id.as_str().to_owned(),
            name: record.name.clone(),
            description: record.description.clone(),
            use_case: record.use_case.clone(),
            environment: record.environment,
            status: record.status,
            prefix: format.prefix(record.environment).to_owned(),
            scopes: record.scopes.iter().map(str::to_owned).collect(),
            rates: record.quotas.iter().map(ToString::to_string).collect(),
            ips: record
                .restrictions
                .ips
                .iter()
                .map(ToString::to_string)
                .collect(),
            sites: record.restrictions.sites.clone(),
            expires_at: time_opt(record.expires_at),
            created_at: time_opt(record.created_at),
            last_used_at: time_opt(record.last_use()),
            last_used_ip: record.last_used_ip,
        }
    }
}

/// A key just made or rotated: its view and its secret, the one time it is shown.
#[derive(Debug, Serialize)]
pub(crate) struct Created<'a> {
    pub(crate) key: KeyView,
    pub(crate) secret: &'a str,
}

impl<'a> Created<'a> {
    pub(crate) fn of(created: &'a CreatedKey, format: &KeyFormat) -> Self {
        Self {
            key: KeyView::of(&created.record, format),
            secret: created.secret.expose_secret(),
        }
    }
}

/// `POST /auth/createkey`'s answer, in the seed's spelling.
#[derive(Debug, Serialize)]
pub(crate) struct NewApiKey<'a> {
    #[serde(rename = "apiKey")]
    pub(crate) api_key: &'a str,
    #[serde(rename = "keyId")]
    pub(crate) key_id: &'a str,
}

/// `POST /auth/session`'s answer.
#[derive(Debug, Serialize)]
pub(crate) struct SessionView<'a> {
    pub(crate) token: &'a str,
    pub(crate) expires_in: u64,
    pub(crate) owner: &'a str,
}

/// `GET /auth/testkey`'s answer for a key the layers accepted.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TestKeyView {
    valid: bool,
    key_id: String,
    name: String,
    owner: Option<String>,
    environment: Environment,
    scopes: Vec<String>,
    expires_at: Option<String>,
    pub(crate) rate_limit: Option<RateLimitView>,
}

impl TestKeyView {
    pub(crate) fn of(record: &KeyRecord) -> Self {
        Self {
            valid: true,
            key_id: record.id.as_str().to_owned(),
            name: record.name.clone(),
            owner: record.owner.as_ref().map(|o| o.name.clone()),
            environment: record.environment,
            scopes: record.scopes.iter().map(str::to_owned).collect(),
            expires_at: time_opt(record.expires_at),
            rate_limit: None,
        }
    }
}

/// A key's budget as `testkey` reports it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RateLimitView {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: u64,
}

/// A page of `GET /v1/keys`. (Structs, not `json!` maps, for every answer: the fields come
/// out in the documented order, the same in every answer.)
#[derive(Debug, Serialize)]
pub(crate) struct KeyPage {
    pub(crate) keys: Vec<KeyView>,
    pub(crate) next: Option<String>,
}

/// A page of `GET /v1/audit`.
#[derive(Debug, Serialize)]
pub(crate) struct AuditPage {
    pub(crate) events: Vec<AuditView>,
    pub(crate) next: Option<String>,
}

/// An audit event as the owner sees it.
#[derive(Debug, Serialize)]
pub(crate) struct AuditView {
    id: String,
    at: String,
    key_id: Option<String>,
    owner: String,
    actor: String,
    ip: Option<IpAddr>,
    action: String,
    old_status: Option<Status>,
    new_status: Option<Status>,
}

impl AuditView {
    pub(crate) fn of(event: &AuditEvent, ids: &super::cursor::EventIds) -> Self {
        Self {
            id: ids.show(event.id),
            at: time(event.at),
            key_id: event.key_id.as_ref().map(|id| id.as_str().to_owned()),
            owner: event.owner.clone(),
            actor: event.actor.clone(),
            ip: event.ip,
            action: event.action.to_string(),
            old_status: event.old_status,
            new_status: event.new_status,
        }
    }
}

/// `{"username","password"}` for `/auth/createkey` and `/auth/session`.
#[derive(Deserialize)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Input for Credentials {
    const FIELDS: &'static [&'static str] = &["username", "password"];
}

/// The checks of the mutable fields `POST /v1/keys` and `PATCH /v1/keys/{id}` share.
struct Fields;

impl Fields {
    fn scopes(list: Vec<String>) -> Result<Scopes, Fail> {
        Self::words("scopes", "scope", &list)?;
        Ok(list.into_iter().collect())
    }

    fn words(field: &'static str, one: &'static str, list: &[String]) -> Result<(), Fail> {
        check_words(field, one, list)
    }

    fn quotas(list: &[String]) -> Result<Vec<Quota>, Fail> {
        if list.len() > crate::quota::MAX_WINDOWS {
            return Err(Fail::field(
                "rates",
                format!("at most {} windows", crate::quota::MAX_WINDOWS),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, text)| {
                Quota::parse(text).map_err(|_| {
                    Fail::field(
                        format!("rates[{i}]"),
                        "a rate is a positive count per unit: `60/min`, `10/s`, `1000/hour`, \
                         `5000/day`, `10/s;burst=20`",
                    )
                })
            })
            .collect()
    }

    fn networks(list: &[String]) -> Result<Vec<ipnet::IpNet>, Fail> {
        bounded("ips", list)?;
        list.iter()
            .enumerate()
            .map(|(i, text)| {
                Restrictions::parse_network(text).map_err(|_| {
                    Fail::field(
                        format!("ips[{i}]"),
                        "an IP address or CIDR block: `203.0.113.7`, `10.0.0.0/8`, `2001:db8::/32`",
                    )
                })
            })
            .collect()
    }
}

/// A list of scopes or sites: each one word of visible ASCII, named by its index when it is
/// not.
pub(crate) fn check_words(
    field: &'static str,
    one: &'static str,
    list: &[String],
) -> Result<(), Fail> {
    bounded(field, list)?;
    for (i, word) in list.iter().enumerate() {
        if let Err(crate::store::StoreError::Invalid { reason, .. }) =
            crate::store::check_word(one, word)
        {
            return Err(Fail::field(
                format!("{field}[{i}]"),
                format!("a {one}: {reason}"),
            ));
        }
    }
    Ok(())
}

fn bounded(field: &'static str, list: &[String]) -> Result<(), Fail> {
    if list.len() > MAX_LIST {
        return Err(Fail::field(field, format!("at most {MAX_LIST} entries")));
    }
    Ok(())
}

/// `POST /v1/keys`. (Fields spelled out, not flattened: serde's `flatten` loses the path
/// of a badly typed field, which the 422 must name.)
#[derive(Debug, Deserialize)]
pub(crate) struct Create {
    name: Option<String>,
    description: Option<String>,
    scopes: Option<Vec<String>>,
    rates: Option<Vec<String>>,
    ips: Option<Vec<String>>,
    sites: Option<Vec<String>>,
    use_case: Option<String>,
    environment: Option<Environment>,
    expires_in: Option<u64>,
}

impl Input for Create {
    const FIELDS: &'static [&'static str] = &[
        "name",
        "description",
        "scopes",
        "rates",
        "ips",
        "sites",
        "use_case",
        "environment",
        "expires_in",
    ];
}

impl Create {
    /// The key to make for `owner`.
    pub(crate) fn into_new_key(self, owner: &str, now: SystemTime) -> Result<NewKey, Fail> {
        let Self {
            name,
            description,
            scopes,
            rates,
            ips,
            sites,
            ..
        } = self;
        let Some(name) = name else {
            return Err(Fail::field("name", "a key needs a name"));
        };
        let mut new = NewKey::new(owner, name, self.environment.unwrap_or(Environment::Live));
        new.description = description.unwrap_or_default();
        new.use_case = self.use_case.unwrap_or_default();
        if new.use_case.starts_with("keygate:") {
            return Err(Fail::field(
                "use_case",
                "use cases starting with `keygate:` are keygate's own",
            ));
        }
        if let Some(scopes) = scopes {
            new.scopes = Fields::scopes(scopes)?;
        }
        if let Some(rates) = rates {
            new.quotas = Fields::quotas(&rates)?;
        }
        if let Some(ips) = ips {
            new.restrictions.ips = Fields::networks(&ips)?;
        }
        if let Some(sites) = sites {
            Fields::words("sites", "site", &sites)?;
            new.restrictions.sites = sites;
        }
        if let Some(seconds) = self.expires_in {
            if seconds == 0 || seconds > MAX_EXPIRES_IN {
                return Err(Fail::field(
                    "expires_in",
                    format!("seconds from now, 1 to {MAX_EXPIRES_IN}"),
                ));
            }
            new.expires_at = Some(now + Duration::from_secs(seconds));
        }
        Ok(new)
    }
}

/// `PATCH /v1/keys/{id}`: the mutable fields only.
#[derive(Debug, Deserialize)]
pub(crate) struct Patch {
    name: Option<String>,
    description: Option<String>,
    scopes: Option<Vec<String>>,
    rates: Option<Vec<String>>,
    ips: Option<Vec<String>>,
    sites: Option<Vec<String>>,
}

impl Input for Patch {
    const FIELDS: &'static [&'static str] =
        &["name", "description", "scopes", "rates", "ips", "sites"];
    const IMMUTABLE: &'static [&'static str] = &[
        "use_case",
        "environment",
        "expires_at",
        "expires_in",
        "id",
        "prefix",
        "created_at",
    ];
}

impl Patch {
    /// Whether the patch names no field at all (then nothing is written).
    pub(crate) fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.description.is_none()
            && self.scopes.is_none()
            && self.rates.is_none()
            && self.ips.is_none()
            && self.sites.is_none()
    }

    /// The store's update. The allowlists are one value in the store: a patch that names
    /// only `ips` keeps the sites (and the reverse).
    pub(crate) fn into_update(self, current: &KeyRecord) -> Result<KeyUpdate, Fail> {
        let Self {
            name,
            description,
            scopes,
            rates,
            ips,
            sites,
        } = self;
        let mut update = KeyUpdate {
            name,
            description,
            ..KeyUpdate::default()
        };
        if let Some(scopes) = scopes {
            update.scopes = Some(Fields::scopes(scopes)?);
        }
        if let Some(rates) = rates {
            update.quotas = Some(Fields::quotas(&rates)?);
        }
        if ips.is_some() || sites.is_some() {
            let mut restrictions = current.restrictions.clone();
            if let Some(ips) = ips {
                restrictions.ips = Fields::networks(&ips)?;
            }
            if let Some(sites) = sites {
                Fields::words("sites", "site", &sites)?;
                restrictions.sites = sites;
            }
            update.restrictions = Some(restrictions);
        }
        Ok(update)
    }
}

/// `POST /v1/keys/{id}/rotate`, body optional.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Rotate {
    grace_seconds: Option<u64>,
}

impl Input for Rotate {
    const FIELDS: &'static [&'static str] = &["grace_seconds"];
    const MAY_BE_EMPTY: bool = true;
}

impl Rotate {
    pub(crate) fn grace(&self) -> Result<Duration, Fail> {
        match self.grace_seconds {
            None => Ok(Duration::ZERO),
            Some(s) if s <= MAX_GRACE => Ok(Duration::from_secs(s)),
            Some(_) => Err(Fail::field(
                "grace_seconds",
                format!("0 to {MAX_GRACE} seconds"),
            )),
        }
    }
}

/// `?after=&limit=` of `GET /v1/keys`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    pub(crate) after: Option<String>,
    pub(crate) limit: Option<usize>,
}

/// `?key=&before=&limit=` of `GET /v1/audit`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQueryParams {
    pub(crate) key: Option<String>,
    pub(crate) before: Option<String>,
    pub(crate) limit: Option<usize>,
}
