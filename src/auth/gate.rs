//! The shared state of an auth layer and the decisions made with it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use http::{Request, Response, StatusCode};

use super::lockout::{Lockout, Taken};
use crate::bypass::{Bypass, CorsPreflight};
use crate::clock::Clock;
use crate::error::BoxError;
use crate::extract::{Credential, ExtractError, Extractor, Places};
use crate::head::is_grpc;
use crate::head::RequestHead;
use crate::key::{Fingerprint, KeyFormat};
use crate::lookup::{KeyLookup, LookupResult};
use crate::passage::{Accepted, LayerId};
use crate::record::Principal;
use crate::reject::{Reason, Rejection, Responder, ResponseBody};
use crate::validate::{self, ClientIp, Rules, SiteResolver};

/// Everything every clone of an auth layer shares: one `Arc` of it.
pub(crate) struct Gate<L> {
    pub(crate) lookup: L,
    pub(crate) extractor: Extractor,
    pub(crate) format: KeyFormat,
    pub(crate) responder: Responder,
    pub(crate) opaque: bool,
    pub(crate) bypass: Box<dyn Bypass>,
    pub(crate) client_ip: ClientIp,
    pub(crate) site: Option<SiteResolver>,
    pub(crate) lookup_timeout: Option<Duration>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) lockout: Option<Lockout>,
    pub(crate) preflight_warned: AtomicBool,
    /// Names this state in the requests it accepts.
    pub(crate) id: LayerId,
    /// Set once a route variant shares this state: only then do accepted requests carry an
    /// [`Accepted`] marker (an extension insert the plain stack does without).
    pub(crate) nested: AtomicBool,
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
            .field("lockout", &self.lockout.is_some())
            .finish_non_exhaustive()
    }
}

/// What was taken from the failed-attempt budget for a request before its lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// Nothing: the lockout is off, or the key was known good.
    Free,
    /// One attempt: kept when the store says the key is not usable (and when the client
    /// drops the request before the answer: else disconnecting would be a free guess),
    /// given back otherwise.
    Charged(Taken),
}

/// What happens to a request the bypass predicate lets through.
pub(crate) enum Pass {
    /// To the inner service.
    Inner,
    /// A CORS preflight that no CORS layer answered: keygate answers it.
    Preflight,
}

impl<L: KeyLookup> Gate<L> {
    /// When an outer layer sharing this state has accepted the request already (a
    /// `route_layer` inside a `Router::layer`), only the route's rules are left to check.
    pub(crate) fn already_accepted<B>(
        &self,
        req: &Request<B>,
        rules: &Rules,
    ) -> Option<Result<(), Rejection>> {
        if !self.nested.load(Ordering::Relaxed) {
            return None;
        }
        let Accepted(by) = req.extensions().get::<Accepted>()?;
        if *by != self.id {
            return None;
        }
        let record = req.extensions().get::<Principal>()?.record();
        Some(
            validate::check_route(record, rules)
                .map_err(|reason| Rejection::new(reason).with_key_id(record.id.clone())),
        )
    }

    /// Marks every header that may carry a key as sensitive, for a request that passes
    /// without one.
    pub(crate) fn mark_sensitive<B>(&self, req: &mut Request<B>) {
        self.extractor.mark_all_sensitive(req.headers_mut());
    }

    /// Whether the request needs no key, and where it goes then.
    pub(crate) fn bypasses<B>(&self, req: &Request<B>) -> Option<Pass> {
        let head = RequestHead::of(req);
        if !self.bypass.bypass(&head) {
            return None;
        }
        if CorsPreflight::matches(&head) {
            return Some(Pass::Preflight);
        }
        Some(Pass::Inner)
    }

    /// The answer to a CORS preflight that reached keygate: `204 No Content` without CORS
    /// headers. The inner service never sees it (see [`crate::bypass`]).
    pub(crate) fn preflight<ResB>(&self) -> Response<ResponseBody<ResB>> {
        if !self.preflight_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "keygate",
                "a CORS preflight reached keygate: no CORS layer outside it answered; keygate \
                 answers 204 without CORS headers and does not call the service (put the CORS \
                 layer outside keygate to allow cross-origin calls)"
            );
        }
        let mut res = Response::new(ResponseBody::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        res
    }

    /// Extracts the key and checks its format (shape and checksum): no I/O, no allocation
    /// for header schemes.
    ///
    /// The checksum is checked here, before any lookup, and not skipped for a key the
    /// lookup knows at once: a cache hit does not imply a key that passed this layer's
    /// checksum (a [`KeyFormat::any`] layer sharing the cache fills it with keys of any
    /// checksum, and an in-memory lookup may know imported keys with a wrong one), and a
    /// lookup that answers at once has read its backend by the time it answers.
    pub(crate) fn extract<'r, B>(&self, req: &'r Request<B>) -> Result<Credential<'r>, Rejection> {
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
        Ok(credential)
    }

    /// Before a lookup that must be awaited: takes an attempt from the client's budget
    /// (unless the key is known good), or refuses the request without any lookup.
    pub(crate) fn before_lookup<B>(
        &self,
        req: &Request<B>,
        key: &Fingerprint,
    ) -> Result<Attempt, Rejection> {
        let Some(lockout) = &self.lockout else {
            return Ok(Attempt::Free);
        };
        if lockout.is_known_good(key) {
            return Ok(Attempt::Free);
        }
        let client = lockout.client(&self.client_ip, &RequestHead::of(req));
        Ok(Attempt::Charged(lockout.charge(client)?))
    }

    /// Whether a refusal reads `invalid_api_key` to the client: it counts as a failed
    /// attempt, and a turned-away client gets the same 429 for it as for any other.
    fn is_failure(&self, reason: Reason) -> bool {
        let public = if self.opaque { reason.opaque() } else { reason };
        public == Reason::InvalidApiKey
    }

    /// Turns a lookup answer into an accepted request (the [`Principal`] in its extensions)
    /// or a rejection. `backend` says whether the answer came from an awaited lookup.
    pub(crate) fn settle<B, E: Into<BoxError>>(
        &self,
        answer: LookupResult<E>,
        req: &mut Request<B>,
        rules: &Rules,
        found: &Found,
        attempt: Attempt,
        backend: bool,
    ) -> Result<(), Rejection> {
        let hash = &found.fingerprint;
        let record = match answer {
            Ok(Some(record)) => record,
            Ok(None) => {
                return Err(self.failed(Rejection::new(Reason::InvalidApiKey), hash, req, attempt))
            }
            Err(error) => {
                let error: BoxError = error.into();
                tracing::warn!(target: "keygate", error = %error, "key lookup failed");
                return Err(self.unanswered(req, attempt));
            }
        };
        let head = RequestHead::of(req);
        // The clock read once, in nanoseconds (the coarse clock's own unit); the same
        // instant as `now()` for every time after the epoch.
        let now_ns = self.clock.now_nanos();
        let now = UNIX_EPOCH + Duration::from_nanos(now_ns);
        let verdict = validate::check(
            &record,
            rules,
            now,
            || self.client_ip.resolve(&head),
            || self.site.as_ref().and_then(|s| s.resolve(&head)),
        );
        if let Err(reason) = verdict {
            let rejection = Rejection::new(reason).with_key_id(record.id.clone());
            if self.is_failure(reason) {
                return Err(self.failed(rejection, hash, req, attempt));
            }
            self.usable(
                hash,
                attempt,
                backend && reason.status() == StatusCode::FORBIDDEN,
            );
            return Err(rejection);
        }
        self.usable(hash, attempt, backend);
        tracing::debug!(target: "keygate", key_id = %record.id, outcome = "accepted", "api key accepted");
        // The client IP is resolved only when the use is reported (once a minute a key).
        record.note_use(now_ns, || self.client_ip.resolve(&head));
        self.extractor
            .mark_sensitive(req.headers_mut(), found.places);
        let extensions = req.extensions_mut();
        extensions.insert(Principal::new(record));
        if self.nested.load(Ordering::Relaxed) {
            extensions.insert(Accepted(self.id));
        }
        Ok(())
    }

    /// A lookup the store did not answer: 503, and the attempt it took goes back (store
    /// trouble is no invalid key; at most the quota of lookups are in flight per client, so
    /// a slow store cannot be flooded through this either). A known-good key took no
    /// attempt: it gets what an unknown key would get from this client now, a 429 when the
    /// client is turned away, so that no outage tells the two apart.
    fn unanswered<B>(&self, req: &Request<B>, attempt: Attempt) -> Rejection {
        let unavailable = Rejection::new(Reason::AuthUnavailable);
        let Some(lockout) = &self.lockout else {
            return unavailable;
        };
        let taken = match attempt {
            Attempt::Charged(taken) => taken,
            Attempt::Free => {
                let client = lockout.client(&self.client_ip, &RequestHead::of(req));
                match lockout.charge(client) {
                    Ok(taken) => taken,
                    Err(turned_away) => return turned_away,
                }
            }
        };
        lockout.give_back(taken);
        unavailable
    }

    /// A key that is no guess: the attempt it took goes back, and a key found valid by a
    /// lookup is remembered as known good.
    fn usable(&self, hash: &Fingerprint, attempt: Attempt, remember: bool) {
        let Some(lockout) = &self.lockout else { return };
        if let Attempt::Charged(taken) = attempt {
            lockout.give_back(taken);
        }
        if remember {
            lockout.remember(hash);
        }
    }

    /// A refusal that counts as a failed attempt: charged now unless it was before the
    /// lookup, and turned into 429 when the client's budget is spent.
    fn failed<B>(
        &self,
        rejection: Rejection,
        hash: &Fingerprint,
        req: &Request<B>,
        attempt: Attempt,
    ) -> Rejection {
        let Some(lockout) = &self.lockout else {
            return rejection;
        };
        lockout.forget(hash);
        self.count(rejection, req, attempt)
    }

    /// Counts a failed attempt (unless it was counted before the lookup); the rejection, or
    /// the 429 of a client whose budget is spent.
    fn count<B>(&self, rejection: Rejection, req: &Request<B>, attempt: Attempt) -> Rejection {
        let Some(lockout) = &self.lockout else {
            return rejection;
        };
        if let Attempt::Charged(_) = attempt {
            return rejection;
        }
        let client = lockout.client(&self.client_ip, &RequestHead::of(req));
        match lockout.charge(client) {
            Ok(_) => rejection,
            Err(turned_away) => turned_away,
        }
    }

    /// A refusal before any lookup (no key, a malformed key, two keys): malformed keys count
    /// as failed attempts.
    pub(crate) fn refuse_early<B>(&self, rejection: Rejection, req: &Request<B>) -> Rejection {
        if self.is_failure(rejection.reason()) {
            self.count(rejection, req, Attempt::Free)
        } else {
            rejection
        }
    }

    /// The response for a rejection, logged once here.
    pub(crate) fn reject<B, ResB>(
        &self,
        rejection: Rejection,
        req: &Request<B>,
    ) -> Response<ResponseBody<ResB>> {
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
        self.responder.respond(rejection, is_grpc(req.headers()))
    }
}

/// A well-formed key found in a request: its fingerprint, and the headers that carried it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Found {
    pub(crate) fingerprint: Fingerprint,
    pub(crate) places: Places,
}
