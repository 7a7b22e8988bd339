use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::shared::Shared;
use super::{Decision, HeaderStyle, KeyFn, LimiterStore, Quota};
use crate::flow::{After, Decide, Flow};
use crate::reject::ResponseBody;

pin_project! {
    /// The future of [`RateLimitService`](super::RateLimitService): the inner service's
    /// future (its response gets the rate-limit headers), a refusal, or a decision to await
    /// first (the one state that is boxed).
    pub struct RateLimitFuture<S, ReqBody, ResBody, F, St>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        F: KeyFn,
        St: LimiterStore<F::Key>,
    {
        #[pin]
        flow: Flow<S, ReqBody, ResBody, Checked<F, St>>,
    }
}

impl<S, ReqBody, ResBody, F, St> RateLimitFuture<S, ReqBody, ResBody, F, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    F: KeyFn,
    St: LimiterStore<F::Key>,
{
    pub(crate) fn new(flow: Flow<S, ReqBody, ResBody, Checked<F, St>>) -> Self {
        Self { flow }
    }
}

impl<S, ReqBody, ResBody, F, St> std::fmt::Debug for RateLimitFuture<S, ReqBody, ResBody, F, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    F: KeyFn,
    St: LimiterStore<F::Key>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitFuture")
            .field("state", &self.flow.state())
            .finish()
    }
}

impl<S, ReqBody, ResBody, F, St> Future for RateLimitFuture<S, ReqBody, ResBody, F, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    F: KeyFn,
    St: LimiterStore<F::Key>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().flow.poll(cx)
    }
}

/// The rate-limit headers, put on the inner service's response.
pub(crate) struct Stamp {
    decision: Decision,
    style: HeaderStyle,
}

impl Stamp {
    pub(crate) fn new(decision: Decision, style: HeaderStyle) -> Self {
        Self { decision, style }
    }
}

impl After for Stamp {
    fn apply<B>(self, response: &mut Response<B>) {
        self.style.apply(&self.decision, response.headers_mut());
    }
}

pin_project! {
    /// A decision the layer awaits (a network store).
    pub(crate) struct Checked<F, St>
    where
        F: KeyFn,
        St: LimiterStore<F::Key>,
    {
        #[pin]
        check: St::Future,
        shared: Arc<Shared<F, St>>,
        // What an outer layer charged, to give back if this one refuses.
        refund: Option<(F::Key, Vec<Quota>, u32)>,
        // What this state will have charged in all once this check admits.
        total: u32,
    }
}

impl<F: KeyFn, St: LimiterStore<F::Key>> Checked<F, St> {
    pub(crate) fn new(
        check: St::Future,
        shared: Arc<Shared<F, St>>,
        refund: Option<(F::Key, Vec<Quota>, u32)>,
        total: u32,
    ) -> Self {
        Self {
            check,
            shared,
            refund,
            total,
        }
    }
}

impl<F, St, ReqBody, ResBody> Decide<ReqBody, ResBody> for Checked<F, St>
where
    F: KeyFn,
    St: LimiterStore<F::Key>,
{
    type After = Stamp;

    fn poll_decide(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        request: &mut Request<ReqBody>,
    ) -> Poll<Result<Stamp, Response<ResponseBody<ResBody>>>> {
        let this = self.project();
        let answer = ready!(this.check.poll(cx)).map_err(Into::into);
        let shared = &**this.shared;
        Poll::Ready(match shared.verdict(answer, request.headers()) {
            Ok(decision) => {
                shared.note_charge(request, *this.total);
                Ok(Stamp::new(decision, shared.style))
            }
            Err(response) => {
                if let Some((key, quotas, prior)) = this.refund.take() {
                    shared.store.refund(&key, &quotas, prior);
                }
                Err(response)
            }
        })
    }
}
