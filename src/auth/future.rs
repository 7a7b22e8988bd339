use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::gate::{Attempt, Found, Gate};
use crate::error::BoxError;
use crate::flow::{Decide, Flow};
use crate::lookup::{KeyLookup, LookupResult};
use crate::reject::ResponseBody;
use crate::validate::Rules;

pin_project! {
    /// The future of [`AuthService`](super::AuthService): the inner service's future, a
    /// rejection, or a lookup to await first (the one state that is boxed).
    pub struct ResponseFuture<S, ReqBody, ResBody, L>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        L: KeyLookup,
    {
        #[pin]
        flow: Flow<S, ReqBody, ResBody, Awaited<L>>,
    }
}

impl<S, ReqBody, ResBody, L> ResponseFuture<S, ReqBody, ResBody, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    L: KeyLookup,
{
    pub(crate) fn new(flow: Flow<S, ReqBody, ResBody, Awaited<L>>) -> Self {
        Self { flow }
    }
}

impl<S, ReqBody, ResBody, L> std::fmt::Debug for ResponseFuture<S, ReqBody, ResBody, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    L: KeyLookup,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("state", &self.flow.state())
            .finish()
    }
}

impl<S, ReqBody, ResBody, L> Future for ResponseFuture<S, ReqBody, ResBody, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    L: KeyLookup,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().flow.poll(cx)
    }
}

pin_project! {
    /// A lookup the layer awaits (a cache miss), under its timeout.
    pub(crate) struct Awaited<L>
    where
        L: KeyLookup,
    {
        #[pin]
        lookup: L::Future,
        #[pin]
        timer: Option<Sleep>,
        gate: Arc<Gate<L>>,
        rules: Arc<Rules>,
        found: Found,
        // What the lockout took before the lookup. Dropped unsettled (the client went
        // away), it stays taken: else disconnecting would make every guess free.
        attempt: Attempt,
    }
}

impl<L: KeyLookup> Awaited<L> {
    pub(crate) fn new(
        lookup: L::Future,
        gate: Arc<Gate<L>>,
        rules: Arc<Rules>,
        found: Found,
        attempt: Attempt,
    ) -> Self {
        Self {
            lookup,
            timer: None,
            gate,
            rules,
            found,
            attempt,
        }
    }
}

impl<L: KeyLookup, ReqBody, ResBody> Decide<ReqBody, ResBody> for Awaited<L> {
    type After = ();

    fn poll_decide(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        request: &mut Request<ReqBody>,
    ) -> Poll<Result<(), Response<ResponseBody<ResBody>>>> {
        let this = self.project();
        let answer: LookupResult<BoxError> = match this.lookup.poll(cx) {
            Poll::Ready(answer) => answer.map_err(Into::into),
            Poll::Pending => {
                let mut timer = this.timer;
                if timer.is_none() {
                    match this.gate.lookup_timeout {
                        Some(limit) if tokio::runtime::Handle::try_current().is_ok() => {
                            timer.set(Some(tokio::time::sleep(limit)));
                        }
                        _ => return Poll::Pending,
                    }
                }
                if !timer.as_pin_mut().is_some_and(|t| t.poll(cx).is_ready()) {
                    return Poll::Pending;
                }
                Err(Box::new(LookupTimeout))
            }
        };
        let gate = &**this.gate;
        Poll::Ready(
            gate.settle(answer, request, this.rules, this.found, *this.attempt, true)
                .map_err(|rejection| gate.reject(rejection, request)),
        )
    }
}

/// A lookup that did not finish in time (logged; the client gets 503 `auth_unavailable`).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the key lookup timed out")]
struct LookupTimeout;
