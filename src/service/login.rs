//! Failed sign-ins, limited per username and per client IP (an IPv6 address counts as its
//! /64).
//!
//! Each attempt takes a token from both buckets before the password is checked, so a burst
//! of concurrent guesses gets no more checks than the budget; a successful sign-in gives
//! its tokens back. Guessing one user's password from many addresses meets the username's
//! bucket; guessing many users' from one address meets the address's.
//!
//! A stranger's failures must not lock the owner out: an address the user signed in from
//! before (within 30 days) does not meet the username's bucket, only its own address's. So
//! an attacker spending a username's budget locks out only the addresses the user never
//! signed in from.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::quota::Quota;
use crate::ratelimit::MemoryLimiter;

/// The most buckets each of the service's in-memory limiters holds (usernames, addresses,
/// token issues): a flood of made-up names cannot grow them past it (the limiter refuses,
/// and the service answers 429, rather than grow).
pub(crate) const MAX_BUCKETS: usize = 100_000;
/// How long an address stays known good for a user after a successful sign-in.
const KNOWN_GOOD_FOR: Duration = Duration::from_secs(30 * 86_400);
/// The most (user, address) pairs remembered.
const KNOWN_GOOD_CAPACITY: usize = 100_000;

/// The two budgets, and the addresses each user signed in from.
#[derive(Clone)]
pub(crate) struct Logins {
    by_user: MemoryLimiter<String>,
    by_ip: MemoryLimiter<IpAddr>,
    user_quota: [Quota; 1],
    ip_quota: [Quota; 1],
    /// (user, address) → when the user last signed in from there (nanoseconds).
    known_good: Arc<quick_cache::sync::Cache<(String, IpAddr), u64>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logins")
            .field("per_user", &self.user_quota[0])
            .field("per_ip", &self.ip_quota[0])
            .finish_non_exhaustive()
    }
}

/// Tokens taken for one attempt, to give back if it succeeds.
#[derive(Debug)]
pub(crate) struct Attempt {
    user: String,
    ip: Option<IpAddr>,
    /// Whether the username's bucket was charged (not for a known-good address).
    charged_user: bool,
}

impl Logins {
    pub(crate) fn new(user_quota: Quota, ip_quota: Quota, clock: Arc<dyn Clock>) -> Self {
        Self::with_cap(user_quota, ip_quota, clock, MAX_BUCKETS)
    }

    fn with_cap(user_quota: Quota, ip_quota: Quota, clock: Arc<dyn Clock>, cap: usize) -> Self {
        fn limiter<K: crate::ratelimit::BucketKey>(
            clock: &Arc<dyn Clock>,
            cap: usize,
        ) -> MemoryLimiter<K> {
            // The builder refuses only a cap of 0.
            MemoryLimiter::builder()
                .clock(Arc::clone(clock))
                .max_buckets(cap.max(1))
                .build()
                .unwrap_or_default()
        }
        Self {
            by_user: limiter(&clock, cap),
            by_ip: limiter(&clock, cap),
            user_quota: [user_quota],
            ip_quota: [ip_quota],
            known_good: Arc::new(quick_cache::sync::Cache::new(KNOWN_GOOD_CAPACITY)),
            clock,
        }
    }

    fn is_known_good(&self, user: &str, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip else { return false };
        let window = u64::try_from(KNOWN_GOOD_FOR.as_nanos()).unwrap_or(u64::MAX);
        self.known_good
            .get(&(user.to_owned(), ip))
            .is_some_and(|at| self.clock.now_nanos().saturating_sub(at) < window)
    }

    /// Takes one attempt from the username's and the address's budgets, or says how many
    /// seconds to wait.
    pub(crate) fn begin(&self, user: &str, ip: Option<IpAddr>) -> Result<Attempt, u64> {
        let ip = Some(client(ip));
        let user = user.to_owned();
        if let Some(ip) = ip {
            match self.by_ip.decide(&ip, &self.ip_quota, 1) {
                Ok(d) if d.allowed => {}
                Ok(d) => return Err(d.numbers.retry_after.max(1)),
                // The limiter is full of other addresses: refuse rather than go unlimited.
                Err(_) => return Err(1),
            }
        }
        if self.is_known_good(&user, ip) {
            return Ok(Attempt {
                user,
                ip,
                charged_user: false,
            });
        }
        match self.by_user.decide(&user, &self.user_quota, 1) {
            Ok(d) if d.allowed => Ok(Attempt {
                user,
                ip,
                charged_user: true,
            }),
            other => {
                if let Some(ip) = ip {
                    self.by_ip.refund(&ip, &self.ip_quota, 1);
                }
                Err(other.map_or(1, |d| d.numbers.retry_after.max(1)))
            }
        }
    }

    /// The attempt succeeded: its tokens go back, and its address is known good for the
    /// user from now on.
    pub(crate) fn succeeded(&self, attempt: Attempt) {
        self.given_back(&attempt);
        // An unknown address is no address: it never becomes known good.
        if let Some(ip) = attempt.ip.filter(|ip| !ip.is_unspecified()) {
            self.known_good
                .insert((attempt.user, ip), self.clock.now_nanos());
        }
    }

    /// Takes one attempt from the address's budget only (for endpoints that name no user:
    /// a guess at a key to revoke), or says how many seconds to wait.
    pub(crate) fn begin_address(&self, ip: Option<IpAddr>) -> Result<Option<IpAddr>, u64> {
        let ip = client(ip);
        match self.by_ip.decide(&ip, &self.ip_quota, 1) {
            Ok(d) if d.allowed => Ok(Some(ip)),
            Ok(d) => Err(d.numbers.retry_after.max(1)),
            Err(_) => Err(1),
        }
    }

    /// An address-only attempt that was no guess (the key existed): its token goes back.
    pub(crate) fn address_ok(&self, attempt: Option<IpAddr>) {
        if let Some(ip) = attempt {
            self.by_ip.refund(&ip, &self.ip_quota, 1);
        }
    }

    /// The attempt did not count (the store failed): its tokens go back.
    pub(crate) fn void(&self, attempt: Attempt) {
        self.given_back(&attempt);
    }

    fn given_back(&self, attempt: &Attempt) {
        if attempt.charged_user {
            self.by_user.refund(&attempt.user, &self.user_quota, 1);
        }
        if let Some(ip) = attempt.ip {
            self.by_ip.refund(&ip, &self.ip_quota, 1);
        }
    }
}

/// The bucket of a client address: its network, or, when the address cannot be known (no
/// peer address; a trusted proxy's header that does not parse), one bucket shared by every
/// such request, so that guessing is never unlimited.
fn client(ip: Option<IpAddr>) -> IpAddr {
    ip.map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), network)
}

/// An IPv6 address as its /64 (one subscriber's block); IPv4 (and IPv4-mapped) as itself.
fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn logins(user: u32, ip: u32) -> Logins {
        let q = |n| Quota::per_hour(NonZeroU32::new(n).unwrap());
        Logins::new(q(user), q(ip), Arc::new(crate::clock::SystemClock))
    }

    #[test]
    fn failures_are_counted_per_user_and_per_address() {
        let logins = logins(3, 5);
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "203.0.113.2".parse().unwrap();
        for _ in 0..3 {
            logins.begin("ada", Some(a)).unwrap();
        }
        // ada's budget is spent, from any address.
        assert!(logins.begin("ada", Some(b)).is_err());
        // a has two attempts left, for other users.
        logins.begin("bob", Some(a)).unwrap();
        logins.begin("cy", Some(a)).unwrap();
        assert!(logins.begin("dee", Some(a)).is_err());
        // A refusal by the user's budget gave back the address's token.
        logins.begin("eve", Some(b)).unwrap();
    }

    #[test]
    fn a_success_gives_its_tokens_back() {
        let logins = logins(2, 2);
        let ip: IpAddr = "203.0.113.1".parse().unwrap();
        for _ in 0..10 {
            let attempt = logins.begin("ada", Some(ip)).unwrap();
            logins.succeeded(attempt);
        }
        logins.begin("ada", Some(ip)).unwrap();
    }

    #[test]
    fn an_ipv6_block_is_one_client() {
        let logins = logins(100, 2);
        logins
            .begin("a", Some("2001:db8::1".parse().unwrap()))
            .unwrap();
        logins
            .begin("b", Some("2001:db8::ffff:2".parse().unwrap()))
            .unwrap();
        assert!(logins
            .begin("c", Some("2001:db8::3".parse().unwrap()))
            .is_err());
        logins
            .begin("d", Some("2001:db8:0:1::3".parse().unwrap()))
            .unwrap();
    }

    #[test]
    fn a_stranger_cannot_lock_the_user_out_of_an_address_she_used() {
        use crate::clock::FakeClock;
        let clock = FakeClock::new(std::time::SystemTime::now());
        let q = |n| Quota::per_hour(NonZeroU32::new(n).unwrap());
        let logins = Logins::new(q(3), q(100), Arc::new(clock.clone()));
        let home: IpAddr = "198.51.100.7".parse().unwrap();
        let attempt = logins.begin("ada", Some(home)).unwrap();
        logins.succeeded(attempt);
        // A stranger spends ada's budget from elsewhere.
        for i in 0..3 {
            let ip: IpAddr = format!("203.0.113.{i}").parse().unwrap();
            logins.begin("ada", Some(ip)).unwrap();
        }
        assert!(logins
            .begin("ada", Some("203.0.113.99".parse().unwrap()))
            .is_err());
        // ada, from home, is not refused.
        let attempt = logins.begin("ada", Some(home)).unwrap();
        logins.succeeded(attempt);
        // Known good is per user: another user from ada's home meets the budget.
        for _ in 0..3 {
            logins.begin("bob", Some(home)).unwrap();
        }
        assert!(logins.begin("bob", Some(home)).is_err());
        // After 30 days without a sign-in from home, home is a stranger again.
        clock.advance(KNOWN_GOOD_FOR);
        for i in 0..3 {
            let ip: IpAddr = format!("203.0.113.{i}").parse().unwrap();
            let _ = logins.begin("ada", Some(ip));
        }
        assert!(logins.begin("ada", Some(home)).is_err());
    }

    /// Made-up usernames cannot grow the limiter past its cap: once full of live buckets it
    /// refuses new names (429) rather than grow.
    #[test]
    fn a_flood_of_names_meets_the_cap() {
        let q = |n| Quota::per_hour(NonZeroU32::new(n).unwrap());
        let logins = Logins::with_cap(q(10), q(1000), Arc::new(crate::clock::SystemClock), 3);
        let ip: IpAddr = "203.0.113.1".parse().unwrap();
        for i in 0..3 {
            logins.begin(&format!("u{i}"), Some(ip)).unwrap();
        }
        assert!(logins.begin("u3", Some(ip)).is_err());
        assert!(logins.by_user.len() <= 3);
        // Names it knows still get their budget.
        logins.begin("u0", Some(ip)).unwrap();
    }
}
