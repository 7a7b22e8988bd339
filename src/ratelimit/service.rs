use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::{Checked, RateLimitFuture, Stamp};
use super::shared::Shared;
use super::{KeyFn, LimiterStore, Quota};
use crate::answer::Answer;
use crate::flow::Flow;
use crate::head::RequestHead;
use crate::passage::Charged;
use crate::reject::ResponseBody;

/// The service made by [`RateLimitLayer`](super::RateLimitLayer).
pub struct RateLimitService<S, F, St> {
    inner: S,
    shared: Arc<Shared<F, St>>,
    cost: u32,
}

impl<S, F, St> RateLimitService<S, F, St> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<F, St>>, cost: u32) -> Self {
        Self {
            inner,
            shared,
            cost,
        }
    }
}

impl<S: Clone, F, St> Clone for RateLimitService<S, F, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            cost: self.cost,
        }
    }
}

impl<S: fmt::Debug, F, St> fmt::Debug for RateLimitService<S, F, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitService")
            .field("inner", &self.inner)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl<S, F, St, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimitService<S, F, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    F: KeyFn,
    St: LimiterStore<F::Key>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = RateLimitFuture<S, ReqBody, ResBody, F, St>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let Some((key, own)) = shared.key_fn.key(&RequestHead::of(&req)) else {
            return RateLimitFuture::new(Flow::call(self.inner.call(req), None));
        };
        let quotas: &[Quota] = if own.is_empty() { &shared.quotas } else { own };
        // What an outer layer of this same state charged this request already: only a state
        // that a route variant shares marks what it charged (`note_charge`), and the marker
        // type is private, so without one there is nothing to look up.
        let prior = if shared.nested.load(Ordering::Relaxed) {
            match req.extensions().get::<Charged>() {
                Some(charged) if charged.by == shared.id => charged.tokens,
                _ => 0,
            }
        } else {
            0
        };
        let cost = self.cost.saturating_sub(prior);
        if cost == 0 && self.cost > 0 {
            // Charged in full already.
            return RateLimitFuture::new(Flow::call(self.inner.call(req), None));
        }
        // A cost of 0 (a probe) reads the bucket: it takes nothing and is never refused.
        match shared.store.check(&key, quotas, cost) {
            Answer::Now(answer) => {
                match shared.verdict(answer.map_err(Into::into), req.headers()) {
                    Ok(decision) => {
                        shared.note_charge(&mut req, prior + cost);
                        let stamp = Stamp::new(decision, shared.style);
                        RateLimitFuture::new(Flow::call(self.inner.call(req), Some(stamp)))
                    }
                    Err(response) => {
                        // Refused here: what an outer layer took for this request goes back.
                        if prior > 0 {
                            shared.store.refund(&key, quotas, prior);
                        }
                        RateLimitFuture::new(Flow::answer(response))
                    }
                }
            }
            Answer::Later(check) => {
                let refund = (prior > 0).then(|| (key, quotas.to_vec(), prior));
                let checked = Checked::new(check, Arc::clone(&self.shared), refund, prior + cost);
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                RateLimitFuture::new(Flow::decide(checked, ready, req))
            }
        }
    }
}
