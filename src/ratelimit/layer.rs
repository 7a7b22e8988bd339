use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Extensions, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{Decision, HeaderStyle, LimiterStore, Quota};
use crate::error::BoxError;
use crate::error::ConfigError;
use crate::head::is_grpc;
use crate::head::RequestHead;
use crate::key::KeyId;
use crate::record::Principal;
use crate::reject::{JsonEnvelope, Reason, Rejection, Renderer, Responder, ResponseBody};

use super::store::BucketKey;

/// What a [`RateLimitLayer`] keys its buckets by.
///
/// Any `Fn(&RequestHead<'_>) -> Option<K>` is one (`None` leaves the request unlimited):
///
/// ```
/// use keygate::head::RequestHead;
/// use keygate::validate::ClientIp;
///
/// let resolver = ClientIp::new();
/// let by_ip = move |head: &RequestHead<'_>| resolver.resolve(head);
/// # fn takes(_: impl keygate::ratelimit::KeyFn) {}
/// # takes(by_ip);
/// ```
///
/// [`PerKey`] keys by the authenticated key and takes the quotas from its record.
pub trait KeyFn: Send + Sync + 'static {
    /// The bucket key.
    type Key: BucketKey;

    /// The request's bucket and the quotas it carries with it (empty: the layer's default).
    fn key<'a>(&self, head: &RequestHead<'a>) -> Option<(Self::Key, &'a [Quota])>;

    /// Tokens an outer layer of the same limiter (`limiter` identifies it) already charged
    /// to this request's bucket.
    fn charged(&self, extensions: &Extensions, limiter: usize) -> u32 {
        let _ = (extensions, limiter);
        0
    }

    /// Notes the tokens `limiter` charged for this request.
    fn note_charge(&self, extensions: &mut Extensions, limiter: usize, cost: u32) {
        let _ = (extensions, limiter, cost);
    }
}

impl<F, K> KeyFn for F
where
    F: Fn(&RequestHead<'_>) -> Option<K> + Send + Sync + 'static,
    K: BucketKey,
{
    type Key = K;

    fn key<'a>(&self, head: &RequestHead<'a>) -> Option<(K, &'a [Quota])> {
        self(head).map(|k| (k, &[][..]))
    }
}

/// Keys buckets by the authenticated key (the [`Principal`] an auth layer put in the
/// request), with the key record's quotas, in the key's main bucket or a named one.
#[derive(Debug, Clone, Default)]
pub struct PerKey {
    bucket: Option<Arc<str>>,
}

impl PerKey {
    /// The key's main bucket.
    pub fn new() -> Self {
        Self::default()
    }

    /// A bucket of its own, e.g. for one expensive route.
    pub fn bucket(name: impl Into<Arc<str>>) -> Self {
        Self {
            bucket: Some(name.into()),
        }
    }
}

impl KeyFn for PerKey {
    type Key = (KeyId, Option<Arc<str>>);

    fn key<'a>(&self, head: &RequestHead<'a>) -> Option<(Self::Key, &'a [Quota])> {
        let principal = head.extensions.get::<Principal>()?;
        let record = principal.record();
        let quotas: &'a [Quota] = if self.bucket.is_some() {
            &[]
        } else {
            &record.quotas
        };
        Some(((record.id.clone(), self.bucket.clone()), quotas))
    }

    fn charged(&self, extensions: &Extensions, limiter: usize) -> u32 {
        match (&self.bucket, extensions.get::<Principal>()) {
            (None, Some(p)) => p.charged(limiter),
            _ => 0,
        }
    }

    fn note_charge(&self, extensions: &mut Extensions, limiter: usize, cost: u32) {
        if let (None, Some(p)) = (&self.bucket, extensions.get_mut::<Principal>()) {
            p.add_charge(limiter, cost);
        }
    }
}

/// Limits requests with token buckets. See the [module docs](super).
///
/// Clones share one store; [`cost`](Self::cost) makes a variant for an expensive route.
pub struct RateLimitLayer<F, St> {
    shared: Arc<Shared<F, St>>,
    cost: u32,
}

struct Shared<F, St> {
    key_fn: F,
    store: St,
    quotas: Vec<Quota>,
    style: HeaderStyle,
    responder: Responder,
}

impl<F, St> Clone for RateLimitLayer<F, St> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            cost: self.cost,
        }
    }
}

impl<F, St> fmt::Debug for RateLimitLayer<F, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("quotas", &self.shared.quotas)
            .field("style", &self.shared.style)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl<F: KeyFn, St: LimiterStore<F::Key>> RateLimitLayer<F, St> {
    /// Limits requests keyed by `key_fn` to `quotas` (the default when the key carries
    /// none; at most [`MAX_WINDOWS`](super::MAX_WINDOWS)), with `X-RateLimit-*` headers and
    /// JSON envelope rejections.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidQuota`] when `quotas` is empty or too long.
    pub fn new(
        key_fn: F,
        store: St,
        quotas: impl IntoIterator<Item = Quota>,
    ) -> Result<Self, ConfigError> {
        Self::with_options(
            key_fn,
            store,
            quotas,
            HeaderStyle::default(),
            Arc::new(JsonEnvelope),
            false,
        )
    }

    pub(crate) fn with_options(
        key_fn: F,
        store: St,
        quotas: impl IntoIterator<Item = Quota>,
        style: HeaderStyle,
        renderer: Arc<dyn Renderer>,
        opaque: bool,
    ) -> Result<Self, ConfigError> {
        let quotas: Vec<Quota> = quotas.into_iter().collect();
        if quotas.is_empty() || quotas.len() > super::MAX_WINDOWS {
            return Err(ConfigError::InvalidQuota(format!(
                "{} quotas (1 to {} expected)",
                quotas.len(),
                super::MAX_WINDOWS
            )));
        }
        let mut responder = Responder::default_for(renderer, false);
        responder.set_opaque(opaque);
        Ok(Self {
            shared: Arc::new(Shared {
                key_fn,
                store,
                quotas,
                style,
                responder,
            }),
            cost: 1,
        })
    }

    /// Which headers to send (default [`HeaderStyle::Legacy`]). Applies to every clone
    /// made after this call.
    #[must_use]
    pub fn header_style(self, style: HeaderStyle) -> Self
    where
        F: Clone,
        St: Clone,
    {
        Self {
            shared: Arc::new(Shared {
                key_fn: self.shared.key_fn.clone(),
                store: self.shared.store.clone(),
                quotas: self.shared.quotas.clone(),
                style,
                responder: self.shared.responder.clone(),
            }),
            cost: self.cost,
        }
    }

    /// A variant for routes whose requests cost `cost` tokens (sharing this layer's store).
    /// Inside an outer layer of the same store and bucket, the route's total is `cost`:
    /// only the difference is charged.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] when `cost` is 0.
    pub fn cost(&self, cost: u32) -> Result<Self, ConfigError> {
        if cost == 0 {
            return Err(ConfigError::Zero("cost"));
        }
        Ok(Self {
            shared: Arc::clone(&self.shared),
            cost,
        })
    }

    pub(crate) fn style(&self) -> HeaderStyle {
        self.shared.style
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.shared.store
    }
}

impl<S, F, St> Layer<S> for RateLimitLayer<F, St> {
    type Service = RateLimitService<S, F, St>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            shared: Arc::clone(&self.shared),
            cost: self.cost,
        }
    }
}

/// The service made by [`RateLimitLayer`].
pub struct RateLimitService<S, F, St> {
    inner: S,
    shared: Arc<Shared<F, St>>,
    cost: u32,
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

impl<F: KeyFn, St: LimiterStore<F::Key>> Shared<F, St> {
    // The refusal is the response itself, returned once by value: boxing it would put an
    // allocation on the rejection path.
    #[allow(clippy::result_large_err)]
    fn verdict<ResBody>(
        &self,
        answer: Result<Decision, BoxError>,
        headers: &http::HeaderMap,
    ) -> Result<Decision, Response<ResponseBody<ResBody>>> {
        match answer {
            Ok(decision) if decision.allowed => Ok(decision),
            Ok(decision) => {
                tracing::debug!(target: "keygate", outcome = "rate_limited", "request rate limited");
                let rejection =
                    Rejection::new(Reason::RateLimited).with_rate_limit(decision.numbers);
                let mut res = self.responder.respond(rejection, is_grpc(headers));
                self.style.apply(&decision, res.headers_mut());
                Err(res)
            }
            Err(error) => {
                tracing::warn!(target: "keygate", error = %error, "rate limiter failed");
                Err(self
                    .responder
                    .respond(Rejection::new(Reason::AuthUnavailable), is_grpc(headers)))
            }
        }
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
            return RateLimitFuture::inner(self.inner.call(req), None, shared.style);
        };
        let quotas: &[Quota] = if own.is_empty() { &shared.quotas } else { own };
        // Route variants of one layer share this state: its address names the limiter.
        let limiter = std::ptr::from_ref(shared).cast::<()>() as usize;
        let prior = shared.key_fn.charged(req.extensions(), limiter);
        let cost = self.cost.saturating_sub(prior);
        if cost == 0 {
            // An outer layer of this store charged this request in full already.
            return RateLimitFuture::inner(self.inner.call(req), None, shared.style);
        }
        match shared.store.check_ready(&key, quotas, cost) {
            Some(answer) => match shared.verdict(answer.map_err(Into::into), req.headers()) {
                Ok(decision) => {
                    shared
                        .key_fn
                        .note_charge(req.extensions_mut(), limiter, cost);
                    RateLimitFuture::inner(self.inner.call(req), Some(decision), shared.style)
                }
                Err(response) => {
                    // Refused here: what an outer layer took for this request goes back.
                    if prior > 0 {
                        shared.store.refund(&key, quotas, prior);
                    }
                    RateLimitFuture::rejected(response)
                }
            },
            None => {
                let check = shared.store.check(&key, quotas, cost);
                let refund = (prior > 0).then(|| (key, quotas.to_vec(), prior));
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                RateLimitFuture {
                    kind: Kind::Pending {
                        state: Box::pin(Pending {
                            check,
                            call: Some((ready, req)),
                            shared: Arc::clone(&self.shared),
                            refund,
                            cost,
                        }),
                    },
                }
            }
        }
    }
}

pin_project! {
    /// The future of [`RateLimitService`].
    pub struct RateLimitFuture<S, ReqBody, ResBody, F, St>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        F: KeyFn,
        St: LimiterStore<F::Key>,
    {
        #[pin]
        kind: Kind<S, ReqBody, ResBody, F, St>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, ReqBody, ResBody, F, St>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        F: KeyFn,
        St: LimiterStore<F::Key>,
    {
        Inner {
            #[pin]
            future: S::Future,
            decision: Option<Decision>,
            style: HeaderStyle,
        },
        Rejected {
            response: Option<Response<ResponseBody<ResBody>>>,
        },
        Pending {
            state: Pin<Box<Pending<S, ReqBody, F, St>>>,
        },
    }
}

pin_project! {
    #[project = PendingProj]
    struct Pending<S, ReqBody, F, St>
    where
        F: KeyFn,
        St: LimiterStore<F::Key>,
    {
        #[pin]
        check: St::Future,
        call: Option<(S, Request<ReqBody>)>,
        shared: Arc<Shared<F, St>>,
        refund: Option<(F::Key, Vec<Quota>, u32)>,
        cost: u32,
    }
}

impl<S, ReqBody, ResBody, F, St> fmt::Debug for RateLimitFuture<S, ReqBody, ResBody, F, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    F: KeyFn,
    St: LimiterStore<F::Key>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RateLimitFuture")
    }
}

impl<S, ReqBody, ResBody, F, St> RateLimitFuture<S, ReqBody, ResBody, F, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    F: KeyFn,
    St: LimiterStore<F::Key>,
{
    fn inner(future: S::Future, decision: Option<Decision>, style: HeaderStyle) -> Self {
        Self {
            kind: Kind::Inner {
                future,
                decision,
                style,
            },
        }
    }

    fn rejected(response: Response<ResponseBody<ResBody>>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
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
        let mut kind = self.project().kind;
        loop {
            let next = match kind.as_mut().project() {
                KindProj::Inner {
                    future,
                    decision,
                    style,
                } => {
                    let mut response = ready!(future.poll(cx))?.map(ResponseBody::inner);
                    if let Some(decision) = decision.take() {
                        style.apply(&decision, response.headers_mut());
                    }
                    return Poll::Ready(Ok(response));
                }
                KindProj::Rejected { response } => {
                    return Poll::Ready(Ok(response
                        .take()
                        .unwrap_or_else(|| Response::new(ResponseBody::empty()))));
                }
                KindProj::Pending { state } => {
                    let PendingProj {
                        check,
                        call,
                        shared,
                        refund,
                        cost,
                    } = state.as_mut().project();
                    let answer = ready!(check.poll(cx)).map_err(Into::into);
                    let Some((mut service, mut request)) = call.take() else {
                        return Poll::Ready(Ok(Response::new(ResponseBody::empty())));
                    };
                    match shared.verdict(answer, request.headers()) {
                        Ok(decision) => {
                            let limiter = std::ptr::from_ref(&**shared).cast::<()>() as usize;
                            shared
                                .key_fn
                                .note_charge(request.extensions_mut(), limiter, *cost);
                            Kind::Inner {
                                future: service.call(request),
                                decision: Some(decision),
                                style: shared.style,
                            }
                        }
                        Err(response) => {
                            if let Some((key, quotas, prior)) = refund.take() {
                                shared.store.refund(&key, &quotas, prior);
                            }
                            Kind::Rejected {
                                response: Some(response),
                            }
                        }
                    }
                }
            };
            kind.set(next);
        }
    }
}
