//! The failed-attempt lockout, all of it: whom failures count against, the budget taken
//! before a lookup and given back for usable keys and for lookups the store did not
//! answer, the known-good keys that pass a turned-away address. The policy is described in
//! the [auth module docs](super).

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::clock::Clock;
use crate::head::RequestHead;
use crate::key::Fingerprint;
use crate::ratelimit::{LimiterError, MemoryLimiter, Quota};
use crate::record::canonical_ip;
use crate::reject::{Reason, Rejection};
use crate::validate::{ClientIp, Walk};

/// The most keys the lockout remembers as known good.
pub(crate) const KNOWN_GOOD_CAPACITY: usize = 100_000;

/// How many times a client's quota an IPv6 /48, or the overflow bucket, may spend.
const WIDE: u32 = 16;

/// Where a client is counted when the lockout tracks as many clients as it may: an IPv4
/// /16, an IPv6 /32, or the unknown. A bounded number of these (see [`COARSE_CAPACITY`]), so
/// that an attacker filling the tracking starves only its own corner of the address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Coarse {
    V4(u16),
    V6(u32),
    Unknown,
}

/// The most coarse buckets tracked.
const COARSE_CAPACITY: usize = 65_536;

/// One bucket of the lockout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scope {
    /// An IPv4 address, or an IPv6 /64 (one host commonly holds a whole /64).
    Host(IpAddr),
    /// An IPv6 /48 (one site), with a wider budget: rotating through the /64s of a site
    /// does not multiply its budget.
    Site(Ipv6Addr),
    /// Every request whose client and proxy addresses are both unknown.
    Unknown,
}

/// Whom this request's failures count against: its host and, for IPv6, its site; and
/// where it is counted if it cannot be tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Client {
    host: Scope,
    site: Option<Scope>,
    coarse: Coarse,
}

fn masked(v6: Ipv6Addr, bits: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> bits))
}

/// RFC 6052's well-known NAT64 prefix, `64:ff9b::/96`: IPv4 clients of an IPv6-only
/// server behind a NAT64 or SIIT translator arrive as `64:ff9b::a.b.c.d`.
const NAT64: u128 = 0x0064_ff9b_0000_0000_0000_0000_0000_0000;

impl Client {
    fn of(ip: IpAddr) -> Self {
        // An IPv4 client seen through IPv6 (mapped, or translated by NAT64) is that IPv4
        // client: else every IPv4 client of an IPv6-only server would be one /64.
        let ip = match canonical_ip(ip) {
            IpAddr::V6(v6) if u128::from(v6) >> 32 == NAT64 >> 32 => {
                IpAddr::V4(std::net::Ipv4Addr::from(u128::from(v6) as u32))
            }
            other => other,
        };
        match ip {
            IpAddr::V6(v6) => Self {
                host: Scope::Host(IpAddr::V6(masked(v6, 64))),
                site: Some(Scope::Site(masked(v6, 48))),
                coarse: Coarse::V6((u128::from(v6) >> 96) as u32),
            },
            IpAddr::V4(v4) => Self {
                host: Scope::Host(IpAddr::V4(v4)),
                site: None,
                coarse: Coarse::V4((u32::from(v4) >> 16) as u16),
            },
        }
    }

    const UNKNOWN: Self = Self {
        host: Scope::Unknown,
        site: None,
        coarse: Coarse::Unknown,
    };
}

/// The buckets one charge took, so that exactly those can be given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Taken {
    scopes: [Option<Scope>; 2],
    overflow: Option<Coarse>,
}

/// The lockout state of one layer (shared by its clones and route variants).
pub(crate) struct Lockout {
    limiter: MemoryLimiter<Scope>,
    /// Where clients are counted when `limiter` tracks as many as it may.
    overflow: MemoryLimiter<Coarse>,
    host: [Quota; 1],
    wide: [Quota; 1],
    known_good: quick_cache::sync::Cache<Fingerprint, ()>,
    warned: AtomicBool,
    warned_full: AtomicBool,
}

impl Lockout {
    pub(crate) fn new(quota: Quota, clock: Arc<dyn Clock>) -> Self {
        Self::tracking(quota, clock, crate::ratelimit::DEFAULT_MAX_BUCKETS)
    }

    fn tracking(quota: Quota, clock: Arc<dyn Clock>, most: usize) -> Self {
        let wide = Quota::new(
            quota.capacity().saturating_mul(crate::quota::nonzero(WIDE)),
            quota.period(),
        )
        .unwrap_or(quota);
        Self {
            limiter: MemoryLimiter::build(most.max(1), Arc::clone(&clock)),
            overflow: MemoryLimiter::build(COARSE_CAPACITY, Arc::clone(&clock)),
            host: [quota],
            wide: [wide],
            known_good: quick_cache::sync::Cache::new(KNOWN_GOOD_CAPACITY),
            warned: AtomicBool::new(false),
            warned_full: AtomicBool::new(false),
        }
    }

    /// Whom this request's failures count against.
    pub(crate) fn client(&self, resolver: &ClientIp, head: &RequestHead<'_>) -> Client {
        match resolver.walk(head) {
            Walk::Client(ip) => Client::of(ip),
            Walk::Unreadable(proxy) => {
                self.warn_once(
                    "a trusted proxy forwarded a client address that does not parse: failed \
                     attempts of such requests are counted together under the proxy's address",
                );
                Client::of(proxy)
            }
            Walk::NoPeer => {
                self.warn_once(
                    "the failed-attempt limiter cannot learn the client IP (no peer address \
                     in the request): failed attempts of all such requests are counted \
                     together. axum: serve with `into_make_service_with_connect_info`; tonic \
                     over TCP: keygate's `tonic` feature; tonic over TLS and hyper: insert \
                     `keygate::validate::PeerAddr`",
                );
                Client::UNKNOWN
            }
        }
    }

    fn warn_once(&self, message: &'static str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(target: "keygate", "{message}");
        }
    }

    /// Takes one attempt from `client`'s budget: from its site first (a refusal there
    /// creates nothing for the host), then from the host.
    ///
    /// # Errors
    ///
    /// 429 `too_many_failed_attempts` when the budget is spent; 503 `auth_unavailable` when
    /// the client cannot be tracked and its coarse bucket is spent too.
    pub(crate) fn charge(&self, client: Client) -> Result<Taken, Rejection> {
        let mut taken = Taken {
            scopes: [None, None],
            overflow: None,
        };
        let levels = [
            client.site.map(|site| (site, &self.wide)),
            Some((client.host, &self.host)),
        ];
        for (i, (scope, quota)) in levels.into_iter().flatten().enumerate() {
            match self.limiter.decide(&scope, quota, 1) {
                Ok(decision) if decision.allowed => {
                    if let Some(slot) = taken.scopes.get_mut(i) {
                        *slot = Some(scope);
                    }
                }
                Ok(decision) => {
                    self.give_back(taken);
                    return Err(Rejection::new(Reason::TooManyFailedAttempts)
                        .with_rate_limit(decision.numbers));
                }
                Err(LimiterError::Full) if taken.scopes.iter().any(Option::is_some) => {
                    // The host cannot be tracked, its site is: the site's budget bounds it.
                    return Ok(taken);
                }
                Err(_) => return self.charge_overflow(taken, client.coarse),
            }
        }
        Ok(taken)
    }

    /// At the limiter's cap, a client that cannot be tracked is counted in its coarse
    /// bucket (its IPv4 /16 or IPv6 /32), shared with every other untracked client there.
    fn charge_overflow(&self, mut taken: Taken, coarse: Coarse) -> Result<Taken, Rejection> {
        if !self.warned_full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "keygate",
                "the failed-attempt limiter tracks as many clients as it may: new clients are \
                 counted together until buckets refill"
            );
        }
        match self.overflow.decide(&coarse, &self.wide, 1) {
            Ok(decision) if decision.allowed => {
                taken.overflow = Some(coarse);
                Ok(taken)
            }
            _ => {
                self.give_back(taken);
                Err(Rejection::new(Reason::AuthUnavailable))
            }
        }
    }

    /// Gives back what [`charge`](Self::charge) took.
    pub(crate) fn give_back(&self, taken: Taken) {
        for scope in taken.scopes.into_iter().flatten() {
            let quota = match scope {
                Scope::Site(_) => &self.wide,
                Scope::Host(_) | Scope::Unknown => &self.host,
            };
            self.limiter.refund(&scope, quota, 1);
        }
        if let Some(coarse) = taken.overflow {
            self.overflow.refund(&coarse, &self.wide, 1);
        }
    }

    /// Whether a lookup found this key usable before.
    pub(crate) fn is_known_good(&self, key: &Fingerprint) -> bool {
        self.known_good.get(key).is_some()
    }

    /// Remembers a key found usable.
    pub(crate) fn remember(&self, key: &Fingerprint) {
        self.known_good.insert(*key, ());
    }

    /// Forgets a key found unusable.
    pub(crate) fn forget(&self, key: &Fingerprint) {
        self.known_good.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::clock::FakeClock;

    fn lockout(n: u32) -> Lockout {
        let clock = FakeClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        Lockout::new(Quota::per_minute(crate::quota::nonzero(n)), Arc::new(clock))
    }

    fn v6(text: &str) -> Client {
        Client::of(text.parse().unwrap())
    }

    #[test]
    fn a_slash_48_cannot_multiply_its_budget_by_rotating_slash_64s() {
        let l = lockout(2);
        let mut admitted = 0;
        for i in 0..1000u32 {
            let client = v6(&format!("2001:db8:1:{:x}::1", i % 0xffff));
            if l.charge(client).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(
            admitted,
            2 * WIDE,
            "the site's budget, not 1000 hosts' budgets"
        );
        // Another site is untouched.
        assert!(l.charge(v6("2001:db8:2::1")).is_ok());
    }

    #[test]
    fn a_refusal_gives_back_what_the_wider_level_took() {
        let l = lockout(2);
        let host = v6("2001:db8:1:1::1");
        assert!(l.charge(host).is_ok());
        assert!(l.charge(host).is_ok());
        for _ in 0..50 {
            assert!(l.charge(host).is_err(), "host spent");
        }
        // The refused attempts did not spend the site's budget: other hosts of the site
        // still have 2 * WIDE - 2 between them.
        let mut others = 0;
        for i in 2..100u32 {
            if l.charge(v6(&format!("2001:db8:1:{i:x}::1"))).is_ok() {
                others += 1;
            }
        }
        assert_eq!(others, 2 * WIDE - 2);
    }

    /// At the cap, a host that cannot be tracked is bounded by its site's budget (IPv6), or
    /// counted with every other untracked client in the overflow bucket; never let off.
    #[test]
    fn at_the_cap_clients_are_counted_coarser_not_refused_outright() {
        let clock = FakeClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let l = Lockout::tracking(
            Quota::per_minute(crate::quota::nonzero(1)),
            Arc::new(clock),
            4,
        );
        // Fill the tracking with four IPv4 hosts.
        for i in 1..=4 {
            let host = Client::of(format!("198.51.100.{i}").parse().unwrap());
            assert!(l.charge(host).is_ok());
        }
        // A new host: counted in the overflow bucket (16 a minute), then refused with 503.
        let mut admitted = 0;
        let mut refusals = Vec::new();
        for i in 0..40 {
            let host = Client::of(format!("203.0.113.{i}").parse().unwrap());
            match l.charge(host) {
                Ok(_) => admitted += 1,
                Err(r) => refusals.push(r.reason()),
            }
        }
        assert_eq!(admitted, WIDE, "203.0.0.0/16 shares one coarse bucket");
        assert!(refusals.iter().all(|r| *r == Reason::AuthUnavailable));
        // Untracked clients elsewhere have a coarse bucket of their own.
        let elsewhere = Client::of("192.0.2.77".parse().unwrap());
        assert!(l.charge(elsewhere).is_ok());
    }

    #[test]
    fn ipv4_through_ipv6_is_the_ipv4_client() {
        for (seen, meant) in [
            ("::ffff:203.0.113.9", "203.0.113.9"),
            ("64:ff9b::203.0.113.9", "203.0.113.9"),
            ("64:ff9b::c633:6407", "198.51.100.7"),
        ] {
            let seen = Client::of(seen.parse().unwrap());
            assert_eq!(seen, Client::of(meant.parse().unwrap()), "{meant}");
        }
        // Other IPv6 addresses of the same /64 are one host; 64:ff9b:1::/48 is not NAT64's
        // well-known /96.
        assert_ne!(
            Client::of("64:ff9b:1::1".parse().unwrap()),
            Client::of("0.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn refunds_are_exact() {
        let l = lockout(1);
        let client = v6("2001:db8:9::1");
        let taken = l.charge(client).unwrap();
        let refused = l.charge(client).unwrap_err();
        assert_eq!(refused.reason(), Reason::TooManyFailedAttempts);
        l.give_back(taken);
        assert!(l.charge(client).is_ok());
        assert!(l.charge(client).is_err());
    }
}
