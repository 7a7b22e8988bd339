//! Decide, then call: the one future of keygate's layers.
//!
//! A layer decides about a request, then either calls the inner service (and may touch its
//! response on the way out: the rate-limit headers) or answers the request itself (a
//! rejection). The decision is taken in `call` when the answer is at hand (a cache hit, an
//! in-memory limiter): then the future is the inner service's future, or the answer,
//! without any allocation. Only a decision that must be awaited (a lookup, a network
//! limiter) puts its state, with the ready inner service and the request, into one box.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::reject::ResponseBody;

/// What a layer does to the inner service's response on its way out.
pub(crate) trait After {
    fn apply<B>(self, response: &mut Response<B>);
}

impl After for () {
    fn apply<B>(self, _: &mut Response<B>) {}
}

/// A decision that must be awaited. Polled with the request, it says go on (with what to do
/// to the response) or answers the request itself.
pub(crate) trait Decide<ReqBody, ResBody> {
    type After: After;

    #[allow(clippy::type_complexity)]
    fn poll_decide(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        request: &mut Request<ReqBody>,
    ) -> Poll<Result<Self::After, Response<ResponseBody<ResBody>>>>;
}

pin_project! {
    /// The future of a layer: see the [module docs](self).
    pub(crate) struct Flow<S, ReqBody, ResBody, D>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        D: Decide<ReqBody, ResBody>,
    {
        #[pin]
        kind: Kind<S, ReqBody, ResBody, D>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, ReqBody, ResBody, D>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        D: Decide<ReqBody, ResBody>,
    {
        Deciding {
            state: Pin<Box<Deciding<S, ReqBody, D>>>,
        },
        Calling {
            #[pin]
            future: S::Future,
            after: Option<D::After>,
        },
        Answered {
            response: Option<Response<ResponseBody<ResBody>>>,
        },
    }
}

pin_project! {
    struct Deciding<S, ReqBody, D> {
        #[pin]
        decide: D,
        call: Option<(S, Request<ReqBody>)>,
    }
}

impl<S, ReqBody, ResBody, D> Flow<S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    D: Decide<ReqBody, ResBody>,
{
    /// Decided at once: go on to the inner service.
    pub(crate) fn call(future: S::Future, after: Option<D::After>) -> Self {
        Self {
            kind: Kind::Calling { future, after },
        }
    }

    /// Decided at once: the layer answers.
    pub(crate) fn answer(response: Response<ResponseBody<ResBody>>) -> Self {
        Self {
            kind: Kind::Answered {
                response: Some(response),
            },
        }
    }

    /// To be decided: `service` is the ready inner service, called once it is.
    pub(crate) fn decide(decide: D, service: S, request: Request<ReqBody>) -> Self {
        Self {
            kind: Kind::Deciding {
                state: Box::pin(Deciding {
                    decide,
                    call: Some((service, request)),
                }),
            },
        }
    }

    pub(crate) fn state(&self) -> &'static str {
        match self.kind {
            Kind::Deciding { .. } => "deciding",
            Kind::Calling { .. } => "calling",
            Kind::Answered { .. } => "answered",
        }
    }
}

impl<S, ReqBody, ResBody, D> Future for Flow<S, ReqBody, ResBody, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    D: Decide<ReqBody, ResBody>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        loop {
            let next = match kind.as_mut().project() {
                KindProj::Calling { future, after } => {
                    let mut response = ready!(future.poll(cx))?.map(ResponseBody::inner);
                    if let Some(after) = after.take() {
                        after.apply(&mut response);
                    }
                    return Poll::Ready(Ok(response));
                }
                KindProj::Answered { response } => {
                    return match response.take() {
                        Some(response) => Poll::Ready(Ok(response)),
                        // As tower-http's futures do: a caller bug, said plainly.
                        None => polled_after_completion(),
                    };
                }
                KindProj::Deciding { state } => {
                    let state = state.as_mut().project();
                    let Some((_, request)) = state.call.as_mut() else {
                        polled_after_completion()
                    };
                    let decided = ready!(state.decide.poll_decide(cx, request));
                    let Some((mut service, request)) = state.call.take() else {
                        polled_after_completion()
                    };
                    match decided {
                        Ok(after) => Kind::Calling {
                            future: service.call(request),
                            after: Some(after),
                        },
                        Err(response) => Kind::Answered {
                            response: Some(response),
                        },
                    }
                }
            };
            kind.set(next);
        }
    }
}

/// A future polled again after it returned `Ready`: the caller broke `Future`'s contract,
/// and is told so plainly, as tower-http's futures do.
#[cold]
#[allow(clippy::panic)]
fn polled_after_completion() -> ! {
    panic!("keygate's response future polled after it completed")
}
