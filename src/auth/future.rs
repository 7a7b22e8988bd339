use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::gate::{Attempt, Found, Gate};
use crate::error::BoxError;
use crate::lookup::{KeyLookup, LookupResult};
use crate::reject::ResponseBody;
use crate::validate::Rules;

pin_project! {
    /// The future of [`AuthService`](super::AuthService): the inner service's future, a
    /// rejection ready to return, or a lookup to await first.
    pub struct ResponseFuture<S, ReqBody, ResBody, L>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        L: KeyLookup,
    {
        #[pin]
        kind: Kind<S, ReqBody, ResBody, L>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, ReqBody, ResBody, L>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        L: KeyLookup,
    {
        // Boxed: only an awaited lookup (a cache miss) needs this state, and keeping it out
        // of line keeps the future small on the paths that answer at once.
        Lookup {
            state: Pin<Box<Pending<S, ReqBody, L>>>,
        },
        Inner {
            #[pin]
            future: S::Future,
        },
        Rejected {
            response: Option<Response<ResponseBody<ResBody>>>,
        },
    }
}

pin_project! {
    #[project = PendingProj]
    struct Pending<S, ReqBody, L>
    where
        L: KeyLookup,
    {
        #[pin]
        lookup: L::Future,
        #[pin]
        timer: Option<Sleep>,
        call: Option<(S, Request<ReqBody>)>,
        gate: Arc<Gate<L>>,
        rules: Arc<Rules>,
        found: Found,
        // What the lockout took before the lookup. Dropped unsettled (the client went
        // away), it stays taken: else disconnecting would make every guess free.
        attempt: Attempt,
    }
}

impl<S, ReqBody, ResBody, L> std::fmt::Debug for ResponseFuture<S, ReqBody, ResBody, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    L: KeyLookup,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match &self.kind {
            Kind::Lookup { .. } => "ResponseFuture::Lookup",
            Kind::Inner { .. } => "ResponseFuture::Inner",
            Kind::Rejected { .. } => "ResponseFuture::Rejected",
        })
    }
}

impl<S, ReqBody, ResBody, L> ResponseFuture<S, ReqBody, ResBody, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    L: KeyLookup,
{
    pub(crate) fn inner(future: S::Future) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    pub(crate) fn rejected(response: Response<ResponseBody<ResBody>>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
    }

    pub(crate) fn lookup(
        lookup: L::Future,
        service: S,
        request: Request<ReqBody>,
        gate: Arc<Gate<L>>,
        rules: Arc<Rules>,
        found: Found,
        attempt: Attempt,
    ) -> Self {
        Self {
            kind: Kind::Lookup {
                state: Box::pin(Pending {
                    lookup,
                    timer: None,
                    call: Some((service, request)),
                    gate,
                    rules,
                    found,
                    attempt,
                }),
            },
        }
    }
}

impl<S, ReqBody, ResBody, L> Future for ResponseFuture<S, ReqBody, ResBody, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    L: KeyLookup,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        loop {
            let next = match kind.as_mut().project() {
                KindProj::Inner { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                KindProj::Rejected { response } => {
                    return match response.take() {
                        Some(response) => Poll::Ready(Ok(response)),
                        // Polled after completion: a caller bug, answered without a panic.
                        None => Poll::Ready(Ok(Response::new(ResponseBody::empty()))),
                    };
                }
                KindProj::Lookup { state } => {
                    let PendingProj {
                        lookup,
                        mut timer,
                        call,
                        gate,
                        rules,
                        found,
                        attempt,
                    } = state.as_mut().project();
                    let answer: LookupResult<BoxError> = match lookup.poll(cx) {
                        Poll::Ready(answer) => answer.map_err(Into::into),
                        Poll::Pending => {
                            if timer.is_none() {
                                match gate.lookup_timeout {
                                    Some(limit)
                                        if tokio::runtime::Handle::try_current().is_ok() =>
                                    {
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
                    let Some((mut service, mut request)) = call.take() else {
                        return Poll::Ready(Ok(Response::new(ResponseBody::empty())));
                    };
                    match gate.settle(answer, &mut request, rules, found, *attempt, true) {
                        Ok(()) => Kind::Inner {
                            future: service.call(request),
                        },
                        Err(rejection) => Kind::Rejected {
                            response: Some(gate.reject(rejection, &request)),
                        },
                    }
                }
            };
            kind.set(next);
        }
    }
}

/// A lookup that did not finish in time (logged; the client gets 503 `auth_unavailable`).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the key lookup timed out")]
struct LookupTimeout;
