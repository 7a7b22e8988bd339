//! The failed-attempt lockout, all of it: whom failures count against, the budget taken
//! before a lookup and given back for usable keys, the known-good keys that pass a
//! turned-away address. The policy is described in the [auth module docs](super).

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::bypass::RequestHead;
use crate::clock::Clock;
use crate::key::KeyHash;
use crate::ratelimit::{MemoryLimiter, Quota};
use crate::reject::{Reason, Rejection};
use crate::validate::{ClientIp, Walk};

/// The most keys the lockout remembers as known good.
pub(crate) const KNOWN_GOOD_CAPACITY: usize = 100_000;

/// Whom failures are counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Client {
    /// An IPv4 address, or an IPv6 /64 (one host commonly holds a whole /64, and could
    /// otherwise rotate through it).
    Ip(IpAddr),
    /// Every request whose client and proxy addresses are both unknown.
    Unknown,
}

impl Client {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                Self::Ip(IpAddr::V6(Ipv6Addr::from(bits)))
            }
            v4 => Self::Ip(v4),
        }
    }
}

/// The lockout state of one layer (shared by its clones and route variants).
pub(crate) struct Lockout {
    limiter: MemoryLimiter<Client>,
    quota: [Quota; 1],
    known_good: quick_cache::sync::Cache<KeyHash, ()>,
    warned: AtomicBool,
}

impl Lockout {
    pub(crate) fn new(quota: Quota, clock: Arc<dyn Clock>) -> Self {
        Self {
            limiter: MemoryLimiter::new().with_clock(clock),
            quota: [quota],
            known_good: quick_cache::sync::Cache::new(KNOWN_GOOD_CAPACITY),
            warned: AtomicBool::new(false),
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
                     together; serve axum with `into_make_service_with_connect_info`, enable \
                     the `tonic` feature, or insert `keygate::validate::PeerAddr`",
                );
                Client::Unknown
            }
        }
    }

    fn warn_once(&self, message: &'static str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(target: "keygate", "{message}");
        }
    }

    /// Takes one attempt from `client`'s budget.
    ///
    /// # Errors
    ///
    /// 429 `too_many_failed_attempts` when none is left; 503 `auth_unavailable` when the
    /// limiter tracks as many clients as it can (it fails closed).
    pub(crate) fn charge(&self, client: Client) -> Result<(), Rejection> {
        match self.limiter.decide(&client, &self.quota, 1) {
            Ok(decision) if decision.allowed => Ok(()),
            Ok(decision) => {
                Err(Rejection::new(Reason::TooManyFailedAttempts).with_rate_limit(decision.info()))
            }
            Err(error) => {
                tracing::warn!(target: "keygate", error = %error, "failed-attempt limiter cannot track the client");
                Err(Rejection::new(Reason::AuthUnavailable))
            }
        }
    }

    /// Gives back an attempt taken by [`charge`](Self::charge).
    pub(crate) fn refund(&self, client: Client) {
        self.limiter.refund(&client, &self.quota, 1);
    }

    /// Whether a lookup found this key usable before.
    pub(crate) fn is_known_good(&self, hash: &KeyHash) -> bool {
        self.known_good.get(hash).is_some()
    }

    /// Remembers a key found usable.
    pub(crate) fn remember(&self, hash: &KeyHash) {
        self.known_good.insert(*hash, ());
    }

    /// Forgets a key found unusable.
    pub(crate) fn forget(&self, hash: &KeyHash) {
        self.known_good.remove(hash);
    }
}
