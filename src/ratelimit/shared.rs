//! The state one rate-limit layer shares with its services and futures.

use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response};

use super::{Decision, HeaderStyle, KeyFn, LimiterStore, Quota};
use crate::error::BoxError;
use crate::head::is_grpc;
use crate::passage::{Charged, LayerId};
use crate::reject::{Reason, Rejection, Responder, ResponseBody};

pub(crate) struct Shared<F, St> {
    pub(crate) key_fn: F,
    pub(crate) store: St,
    pub(crate) quotas: Vec<Quota>,
    pub(crate) style: HeaderStyle,
    pub(crate) responder: Responder,
    /// Names this state in the requests it charges.
    pub(crate) id: LayerId,
    /// Set once a route variant shares this state: only then do charged requests carry a
    /// `Charged` marker.
    pub(crate) nested: AtomicBool,
}

impl<F: KeyFn, St: LimiterStore<F::Key>> Shared<F, St> {
    /// An admission, or the response of a refusal (429, or 503 when the store failed). The
    /// refusal is returned by value, once: boxing it would put an allocation on the
    /// rejection path.
    #[allow(clippy::result_large_err)]
    pub(crate) fn verdict<ResBody>(
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

    /// Notes, for route variants further in, what this limiter charged the request so far.
    pub(crate) fn note_charge<B>(&self, req: &mut Request<B>, total: u32) {
        if !self.nested.load(Ordering::Relaxed) {
            return;
        }
        let extensions = req.extensions_mut();
        match extensions.get_mut::<Charged>() {
            Some(charged) => {
                *charged = Charged {
                    by: self.id,
                    tokens: total,
                }
            }
            None => {
                extensions.insert(Charged {
                    by: self.id,
                    tokens: total,
                });
            }
        }
    }
}
