//! The rules that turn a [`KeyRecord`] and the facts of a request into an accepted key or a
//! [`Reason`] to refuse it.
//!
//! In order: the key is not deleted or revoked (else `invalid_api_key`: existence never
//! leaks), not disabled, not expired, its owner exists and is active, the client IP is in
//! the key's allowlist, the site is in the key's allowlist, the route's environment matches,
//! and the key holds every scope the route requires.
//!
//! ```
//! use std::time::SystemTime;
//! use keygate::key::KeyId;
//! use keygate::record::{KeyRecord, Owner};
//! use keygate::key::{Environment};
//! use keygate::reject::Reason;
//! use keygate::validate::{check, Rules};
//!
//! let record = KeyRecord::new(KeyId::new("key_1"), Owner::new("o1", "ada"), Environment::Test)
//!     .with_scopes(["read"]);
//! let rules = Rules::default().scopes(["messages:write"]);
//! let verdict = check(&record, &rules, SystemTime::now(), || None, || None);
//! assert_eq!(verdict, Err(Reason::InsufficientScope));
//! ```

mod client_ip;
mod site;

pub(crate) use client_ip::Walk;
pub use client_ip::{ClientIp, ClientIpBuilder, ForwardedHeader, PeerAddr};
pub use site::SiteResolver;

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::SystemTime;

use crate::key::Environment;
use crate::record::{KeyRecord, Scopes, Status};
use crate::reject::Reason;

/// What a route asks of a key beyond being valid: scopes and an environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Rules {
    scopes: Scopes,
    environment: Option<Environment>,
}

impl Rules {
    /// Requires every one of `scopes` (replacing earlier ones).
    pub fn scopes(mut self, scopes: impl Into<Scopes>) -> Self {
        self.scopes = scopes.into();
        self
    }

    /// Requires keys of one environment (`environment_mismatch` otherwise).
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = Some(environment);
        self
    }

    /// The required scopes.
    pub fn required_scopes(&self) -> &Scopes {
        &self.scopes
    }

    /// The required environment, if any.
    pub fn required_environment(&self) -> Option<Environment> {
        self.environment
    }
}

/// Checks a record against the rules at time `now`. The client IP and the site are asked
/// for only when the key is restricted by them.
///
/// # Errors
///
/// The [`Reason`] of the first rule the request fails.
pub fn check<'a>(
    record: &KeyRecord,
    rules: &Rules,
    now: SystemTime,
    client_ip: impl FnOnce() -> Option<IpAddr>,
    site: impl FnOnce() -> Option<Cow<'a, str>>,
) -> Result<(), Reason> {
    match record.status {
        Status::Active => {}
        Status::Deleted | Status::Revoked => return Err(Reason::InvalidApiKey),
        Status::Disabled => return Err(Reason::ApiKeyDisabled),
    }
    if record.expires_at.is_some_and(|at| now >= at) {
        return Err(Reason::ApiKeyExpired);
    }
    if !record.owner.as_ref().is_some_and(|o| o.active) {
        return Err(Reason::OwnerInactive);
    }
    let restrictions = &record.restrictions;
    if !restrictions.ips.is_empty() && !client_ip().is_some_and(|ip| restrictions.allows_ip(ip)) {
        return Err(Reason::IpNotAllowed);
    }
    if !restrictions.sites.is_empty() && !site().is_some_and(|s| restrictions.allows_site(&s)) {
        return Err(Reason::SiteNotAllowed);
    }
    check_route(record, rules)
}

/// The route's part of [`check`] alone: environment and scopes. For a request that an
/// outer layer sharing the same state has already accepted.
///
/// # Errors
///
/// [`Reason::EnvironmentMismatch`] or [`Reason::InsufficientScope`].
pub(crate) fn check_route(record: &KeyRecord, rules: &Rules) -> Result<(), Reason> {
    if rules
        .environment
        .is_some_and(|env| env != record.environment)
    {
        return Err(Reason::EnvironmentMismatch);
    }
    if record.scopes.first_missing(&rules.scopes).is_some() {
        return Err(Reason::InsufficientScope);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::key::KeyId;
    use crate::record::{Owner, Restrictions};

    fn base() -> KeyRecord {
        KeyRecord::new(
            KeyId::new("key_1"),
            Owner::new("o1", "ada"),
            Environment::Live,
        )
        .with_scopes(["read", "messages:write"])
    }

    #[test]
    fn rules_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let restricted = base().with_restrictions(Restrictions {
            ips: vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            sites: vec!["123".into()],
        });
        let inactive_owner = {
            let mut r = base();
            r.owner.as_mut().unwrap().active = false;
            r
        };
        let no_owner = {
            let mut r = base();
            r.owner = None;
            r
        };
        type Case = (
            &'static str,
            KeyRecord,
            Rules,
            Option<&'static str>,
            Option<&'static str>,
            Result<(), Reason>,
        );
        let cases: Vec<Case> = vec![
            ("valid", base(), Rules::default(), None, None, Ok(())),
            (
                "deleted",
                base().with_status(Status::Deleted),
                Rules::default(),
                None,
                None,
                Err(Reason::InvalidApiKey),
            ),
            (
                "revoked",
                base().with_status(Status::Revoked),
                Rules::default(),
                None,
                None,
                Err(Reason::InvalidApiKey),
            ),
            (
                "deleted beats expired",
                base()
                    .with_status(Status::Deleted)
                    .with_expiry(now - Duration::from_secs(1)),
                Rules::default(),
                None,
                None,
                Err(Reason::InvalidApiKey),
            ),
            (
                "disabled",
                base().with_status(Status::Disabled),
                Rules::default(),
                None,
                None,
                Err(Reason::ApiKeyDisabled),
            ),
            (
                "expired a second ago",
                base().with_expiry(now - Duration::from_secs(1)),
                Rules::default(),
                None,
                None,
                Err(Reason::ApiKeyExpired),
            ),
            (
                "expires exactly now",
                base().with_expiry(now),
                Rules::default(),
                None,
                None,
                Err(Reason::ApiKeyExpired),
            ),
            (
                "expires later",
                base().with_expiry(now + Duration::from_secs(1)),
                Rules::default(),
                None,
                None,
                Ok(()),
            ),
            (
                "owner inactive",
                inactive_owner,
                Rules::default(),
                None,
                None,
                Err(Reason::OwnerInactive),
            ),
            (
                "owner missing",
                no_owner,
                Rules::default(),
                None,
                None,
                Err(Reason::OwnerInactive),
            ),
            (
                "ip and site allowed",
                restricted.clone(),
                Rules::default(),
                Some("10.1.1.1"),
                Some("123"),
                Ok(()),
            ),
            (
                "ipv6 allowed",
                restricted.clone(),
                Rules::default(),
                Some("2001:db8::5"),
                Some("123"),
                Ok(()),
            ),
            (
                "ip outside",
                restricted.clone(),
                Rules::default(),
                Some("192.168.1.1"),
                Some("123"),
                Err(Reason::IpNotAllowed),
            ),
            (
                "ip unknown",
                restricted.clone(),
                Rules::default(),
                None,
                Some("123"),
                Err(Reason::IpNotAllowed),
            ),
            (
                "site outside",
                restricted.clone(),
                Rules::default(),
                Some("10.1.1.1"),
                Some("999"),
                Err(Reason::SiteNotAllowed),
            ),
            (
                "site unknown",
                restricted,
                Rules::default(),
                Some("10.1.1.1"),
                None,
                Err(Reason::SiteNotAllowed),
            ),
            (
                "scope held",
                base(),
                Rules::default().scopes(["messages:write"]),
                None,
                None,
                Ok(()),
            ),
            (
                "scope missing",
                base(),
                Rules::default().scopes(["admin"]),
                None,
                None,
                Err(Reason::InsufficientScope),
            ),
            (
                "environment matches",
                base(),
                Rules::default().environment(Environment::Live),
                None,
                None,
                Ok(()),
            ),
            (
                "environment differs",
                base(),
                Rules::default().environment(Environment::Test),
                None,
                None,
                Err(Reason::EnvironmentMismatch),
            ),
        ];
        for (name, record, rules, ip, site, expected) in cases {
            let got = check(
                &record,
                &rules,
                now,
                || ip.map(|i| i.parse().unwrap()),
                || site.map(Cow::Borrowed),
            );
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn unrestricted_keys_never_resolve_ip_or_site() {
        let got = check(
            &base(),
            &Rules::default(),
            SystemTime::now(),
            || panic!("ip resolved"),
            || panic!("site resolved"),
        );
        assert_eq!(got, Ok(()));
    }

    /// What the cache calls usable (and keeps for the long TTL) is exactly what passes the
    /// checks before the route's own rules.
    #[test]
    fn usable_records_are_exactly_those_that_pass_without_rules() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for status in [
            Status::Active,
            Status::Disabled,
            Status::Revoked,
            Status::Deleted,
        ] {
            for expires_at in [
                None,
                Some(now - Duration::from_secs(1)),
                Some(now),
                Some(now + Duration::from_secs(1)),
            ] {
                for owner in [None, Some(true), Some(false)] {
                    let mut record = base();
                    record.status = status;
                    record.expires_at = expires_at;
                    record.owner = owner.map(|active| {
                        let mut o = Owner::new("o1", "ada");
                        o.active = active;
                        o
                    });
                    assert_eq!(
                        record.usable_at(now),
                        check(&record, &Rules::default(), now, || None, || None).is_ok(),
                        "{status:?} {expires_at:?} {owner:?}"
                    );
                }
            }
        }
    }
}
