use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::{Awaited, ResponseFuture};
use super::gate::{Attempt, Found, Gate, Pass};
use crate::answer::Answer;
use crate::flow::Flow;
use crate::key::PresentedKey;
use crate::lookup::KeyLookup;
use crate::reject::ResponseBody;
use crate::validate::Rules;

/// The service made by [`AuthLayer`](super::AuthLayer).
pub struct AuthService<S, L> {
    inner: S,
    gate: Arc<Gate<L>>,
    rules: Arc<Rules>,
}

impl<S, L> AuthService<S, L> {
    pub(crate) fn new(inner: S, gate: Arc<Gate<L>>, rules: Arc<Rules>) -> Self {
        Self { inner, gate, rules }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, L> Clone for AuthService<S, L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            gate: Arc::clone(&self.gate),
            rules: Arc::clone(&self.rules),
        }
    }
}

impl<S: fmt::Debug, L> fmt::Debug for AuthService<S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthService")
            .field("inner", &self.inner)
            .field("gate", &self.gate)
            .field("rules", &self.rules)
            .finish()
    }
}

impl<S, L, ReqBody, ResBody> Service<Request<ReqBody>> for AuthService<S, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    L: KeyLookup,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody, L>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let gate = &*self.gate;
        let answer = |response| ResponseFuture::new(Flow::answer(response));
        match gate.bypasses(&req) {
            Some(Pass::Inner) => {
                // A client that sends its key everywhere sends it to /swagger too.
                gate.mark_sensitive(&mut req);
                return ResponseFuture::new(Flow::call(self.inner.call(req), None));
            }
            Some(Pass::Preflight) => return answer(gate.preflight()),
            None => {}
        }
        if let Some(verdict) = gate.already_accepted(&req, &self.rules) {
            return match verdict {
                Ok(()) => ResponseFuture::new(Flow::call(self.inner.call(req), None)),
                Err(rejection) => answer(gate.reject(rejection, &req)),
            };
        }
        let (lookup, found) = match gate.extract(&req) {
            Ok(credential) => {
                let key = PresentedKey::new(credential.secret());
                let found = Found {
                    fingerprint: key.fingerprint(),
                    places: credential.places(),
                };
                (gate.lookup.lookup(&key), found)
            }
            Err(rejection) => {
                let rejection = gate.refuse_early(rejection, &req);
                return answer(gate.reject(rejection, &req));
            }
        };
        let later = match lookup {
            // Answered at once (cache hit, in-memory store): no state to carry.
            Answer::Now(lookup) => {
                let settled =
                    gate.settle(lookup, &mut req, &self.rules, &found, Attempt::Free, false);
                return match settled {
                    Ok(()) => ResponseFuture::new(Flow::call(self.inner.call(req), None)),
                    Err(rejection) => answer(gate.reject(rejection, &req)),
                };
            }
            Answer::Later(future) => future,
        };
        // The lookup must be awaited: the failed-attempt budget is taken first, so that a
        // burst of made-up keys cannot all reach the backend at once (the future was not
        // polled yet: nothing reached the backend).
        let attempt = match gate.before_lookup(&req, &found.fingerprint) {
            Ok(attempt) => attempt,
            Err(rejection) => return answer(gate.reject(rejection, &req)),
        };
        // Carry the ready service into the future and keep a fresh clone here (tower's rule
        // for services that call later).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let awaited = Awaited::new(
            later,
            Arc::clone(&self.gate),
            Arc::clone(&self.rules),
            found,
            attempt,
        );
        ResponseFuture::new(Flow::decide(awaited, ready, req))
    }
}
