//! Failed sign-ins, limited per username and per client IP (an IPv6 address counts as its
//! /64).
//!
//! Each attempt takes a token from both buckets before the password is checked, so a burst
//! of concurrent guesses gets no more checks than the budget; a successful sign-in gives
//! its tokens back. Guessing one user's password from many addresses meets the username's
//! bucket; guessing many users' from one address meets the address's.

use std::net::{IpAddr, Ipv6Addr};

use crate::quota::Quota;
use crate::ratelimit::MemoryLimiter;

/// The two budgets.
#[derive(Debug, Clone)]
pub(crate) struct Logins {
    by_user: MemoryLimiter<String>,
    by_ip: MemoryLimiter<IpAddr>,
    user_quota: [Quota; 1],
    ip_quota: [Quota; 1],
}

/// Tokens taken for one attempt, to give back if it succeeds.
#[derive(Debug)]
pub(crate) struct Attempt {
    user: String,
    ip: Option<IpAddr>,
}

impl Logins {
    pub(crate) fn new(user_quota: Quota, ip_quota: Quota) -> Self {
        Self {
            by_user: MemoryLimiter::new(),
            by_ip: MemoryLimiter::new(),
            user_quota: [user_quota],
            ip_quota: [ip_quota],
        }
    }

    /// Takes one attempt from the username's and the address's budgets, or says how many
    /// seconds to wait.
    pub(crate) fn begin(&self, user: &str, ip: Option<IpAddr>) -> Result<Attempt, u64> {
        let ip = ip.map(network);
        let user = user.to_owned();
        if let Some(ip) = ip {
            match self.by_ip.decide(&ip, &self.ip_quota, 1) {
                Ok(d) if d.allowed => {}
                Ok(d) => return Err(d.numbers.retry_after.max(1)),
                // The limiter is full of other addresses: refuse rather than go unlimited.
                Err(_) => return Err(1),
            }
        }
        match self.by_user.decide(&user, &self.user_quota, 1) {
            Ok(d) if d.allowed => Ok(Attempt { user, ip }),
            other => {
                if let Some(ip) = ip {
                    self.by_ip.refund(&ip, &self.ip_quota, 1);
                }
                Err(other.map_or(1, |d| d.numbers.retry_after.max(1)))
            }
        }
    }

    /// The attempt succeeded: its tokens go back.
    pub(crate) fn succeeded(&self, attempt: Attempt) {
        self.by_user.refund(&attempt.user, &self.user_quota, 1);
        if let Some(ip) = attempt.ip {
            self.by_ip.refund(&ip, &self.ip_quota, 1);
        }
    }
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
        Logins::new(q(user), q(ip))
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
}
