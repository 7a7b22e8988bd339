//! The shared state of an auth layer and the decisions made with it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Request;

use crate::bypass::{Bypass, RequestHead};
use crate::clock::Clock;
use crate::extract::{ExtractError, Extractor};
use crate::key::{KeyFormat, KeyHash};
use crate::lookup::{BoxError, KeyLookup, LookupResult};
use crate::ratelimit::{MemoryLimiter, Quota};
use crate::record::Principal;
use crate::reject::{is_grpc, Reason, Rejection, Responder, ResponseBody};
use crate::validate::{self, ClientIp, Rules, SiteResolver};
use std::net::IpAddr;

/// Everything every clone of an auth layer shares: one `Arc` of it.
pub(crate) struct Gate<L> {
    pub(crate) lookup: L,
    pub(crate) extractor: Extractor,
    pub(crate) format: KeyFormat,
    pub(crate) responder: Responder,
    pub(crate) bypass: Box<dyn Bypass>,
    pub(crate) client_ip: ClientIp,
    pub(crate) site: Option<SiteResolver>,
    pub(crate) lookup_timeout: Option<Duration>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) failed: Option<FailedAttempts>,
}

/// What failures are counted by: the IPv4 address, or the IPv6 /64 (one host commonly
/// holds a whole /64, and could otherwise rotate through it).
fn failing_client(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Counts invalid keys per client IP and turns a client away once it has sent too many.
#[derive(Clone)]
pub(crate) struct FailedAttempts {
    pub(crate) limiter: MemoryLimiter<IpAddr>,
    pub(crate) quota: [Quota; 1],
}

impl FailedAttempts {
    pub(crate) fn new(quota: Quota, clock: Arc<dyn Clock>) -> Self {
        Self {
            limiter: MemoryLimiter::new().with_clock(clock),
            quota: [quota],
        }
    }
}

impl<L> fmt::Debug for Gate<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("extractor", &self.extractor)
            .field("format", &self.format)
            .field("responder", &self.responder)
            .field("client_ip", &self.client_ip)
            .field("site", &self.site)
            .field("lookup_timeout", &self.lookup_timeout)
            .finish_non_exhaustive()
    }
}

impl<L: KeyLookup> Gate<L> {
    /// This state's address: tells its own principals from others'.
    fn origin(&self) -> usize {
        std::ptr::from_ref(self).cast::<()>() as usize
    }

    /// When an outer layer sharing this state has accepted the request already (a
    /// `route_layer` inside a `Router::layer`), only the route's rules are left to check.
    pub(crate) fn already_accepted<B>(
        &self,
        req: &Request<B>,
        rules: &Rules,
    ) -> Option<Result<(), Rejection>> {
        let principal = req.extensions().get::<Principal>()?;
        if principal.origin() != self.origin() {
            return None;
        }
        let record = principal.record();
        Some(
            validate::check_route(record, rules)
                .map_err(|reason| Rejection::new(reason).with_key_id(record.id.clone())),
        )
    }

    /// A client that sent too many invalid keys is turned away before any lookup.
    pub(crate) fn turned_away<B>(&self, req: &Request<B>) -> Option<Rejection> {
        let failed = self.failed.as_ref()?;
        if failed.limiter.is_empty() {
            return None; // No client has failed lately: nothing to look up.
        }
        let ip = failing_client(self.client_ip.resolve(&RequestHead::of(req))?);
        let decision = failed.limiter.peek(&ip, &failed.quota, 1)?;
        (!decision.allowed)
            .then(|| Rejection::new(Reason::TooManyFailedAttempts).with_rate_limit(decision.info()))
    }

    /// Counts an invalid key against its client.
    fn count_failure<B>(&self, req: &Request<B>) {
        let Some(failed) = &self.failed else { return };
        if let Some(ip) = self
            .client_ip
            .resolve(&RequestHead::of(req))
            .map(failing_client)
        {
            if failed.limiter.decide(&ip, &failed.quota, 1).is_err() {
                tracing::warn!(target: "keygate", "failed-attempt limiter at its cap");
            }
        }
    }

    pub(crate) fn bypasses<B>(&self, req: &Request<B>) -> bool {
        self.bypass.bypass(&RequestHead::of(req))
    }

    /// Extracts the key and checks its format: no I/O, no allocation for header schemes.
    pub(crate) fn hash_of<B>(&self, req: &Request<B>) -> Result<KeyHash, Rejection> {
        let credential = self.extractor.extract(req).map_err(|e| {
            Rejection::new(match e {
                ExtractError::Missing => Reason::MissingApiKey,
                ExtractError::Ambiguous => Reason::AmbiguousCredentials,
                ExtractError::Malformed => Reason::InvalidApiKey,
            })
        })?;
        if self.format.check(credential.secret()).is_err() {
            return Err(Rejection::new(Reason::InvalidApiKey));
        }
        Ok(KeyHash::of(credential.secret()))
    }

    /// Turns a lookup answer into an accepted request (the [`Principal`] in its extensions)
    /// or a rejection.
    pub(crate) fn admit<B, E: Into<BoxError>>(
        &self,
        answer: LookupResult<E>,
        req: &mut Request<B>,
        rules: &Rules,
    ) -> Result<(), Rejection> {
        let record = match answer {
            Ok(Some(record)) => record,
            Ok(None) => return Err(Rejection::new(Reason::InvalidApiKey)),
            Err(error) => {
                let error: BoxError = error.into();
                tracing::warn!(target: "keygate", error = %error, "key lookup failed");
                return Err(Rejection::new(Reason::AuthUnavailable));
            }
        };
        let head = RequestHead::of(req);
        let now = self.clock.now();
        let verdict = validate::check(
            &record,
            rules,
            now,
            || self.client_ip.resolve(&head),
            || self.site.as_ref().and_then(|s| s.resolve(&head)),
        );
        match verdict {
            Ok(()) => {
                tracing::debug!(target: "keygate", key_id = %record.id, outcome = "accepted", "api key accepted");
                self.lookup.touch(&record, now);
                req.extensions_mut()
                    .insert(Principal::accepted_by(record, self.origin()));
                Ok(())
            }
            Err(reason) => Err(Rejection::new(reason).with_key_id(record.id.clone())),
        }
    }

    /// The response for a rejection, logged once here.
    pub(crate) fn reject<B, ResB>(
        &self,
        rejection: Rejection,
        req: &Request<B>,
    ) -> http::Response<ResponseBody<ResB>> {
        match rejection.key_id() {
            Some(key_id) => tracing::debug!(
                target: "keygate",
                key_id = %key_id,
                outcome = rejection.reason().code(),
                "api key rejected"
            ),
            None => tracing::debug!(
                target: "keygate",
                outcome = rejection.reason().code(),
                "request rejected"
            ),
        }
        if rejection.reason() == Reason::InvalidApiKey {
            self.count_failure(req);
        }
        self.responder.respond(rejection, is_grpc(req.headers()))
    }
}
