//! "Ready now, or a future": the one return type of keygate's pluggable backends.
//!
//! A backend that can answer at once (an in-memory store, a cache hit) returns
//! [`Answer::Now`] and the layers go on without boxing or polling anything; one that must
//! wait (a database, Redis) returns [`Answer::Later`] with its future. One trait method
//! serves both, and `.await` works on either:
//!
//! ```
//! use keygate::answer::Answer;
//!
//! # async fn demo() {
//! let now: Answer<u32, std::future::Ready<u32>> = Answer::Now(7);
//! assert_eq!(now.await, 7);
//! let later: Answer<u32, _> = Answer::Later(async { 8 });
//! assert_eq!(later.await, 8);
//! # }
//! # futures_lite(demo());
//! # fn futures_lite<F: std::future::Future>(f: F) -> F::Output {
//! #     let mut f = std::pin::pin!(f);
//! #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
//! #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
//! # }
//! ```

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

/// An answer given at once, or a future that gives it later.
#[derive(Debug)]
pub enum Answer<T, F> {
    /// The answer, at hand.
    Now(T),
    /// The answer, to be awaited.
    Later(F),
}

impl<T, F> Answer<T, F> {
    /// The answer if it is at hand, else the future back.
    ///
    /// # Errors
    ///
    /// The future, when the answer is not at hand.
    pub fn now(self) -> Result<T, F> {
        match self {
            Self::Now(value) => Ok(value),
            Self::Later(future) => Err(future),
        }
    }
}

impl<T, F: Future<Output = T>> IntoFuture for Answer<T, F> {
    type Output = T;
    type IntoFuture = AnswerFuture<T, F>;

    fn into_future(self) -> Self::IntoFuture {
        AnswerFuture {
            kind: match self {
                Self::Now(value) => Kind::Now { value: Some(value) },
                Self::Later(future) => Kind::Later { future },
            },
        }
    }
}

pin_project! {
    /// The future of an [`Answer`] (`.await` on one).
    #[derive(Debug)]
    pub struct AnswerFuture<T, F> {
        #[pin]
        kind: Kind<T, F>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<T, F> {
        Now { value: Option<T> },
        Later { #[pin] future: F },
    }
}

impl<T, F: Future<Output = T>> Future for AnswerFuture<T, F> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.project().kind.project() {
            KindProj::Later { future } => future.poll(cx),
            KindProj::Now { value } => match value.take() {
                Some(value) => Poll::Ready(value),
                // Polled after it completed: a caller bug, as with any future.
                #[allow(clippy::panic)]
                None => panic!("AnswerFuture polled after completion"),
            },
        }
    }
}
