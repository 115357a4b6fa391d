use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use crate::classify::{Classify, Outcome};
use crate::rejected::Rejected;

use super::state::{Pass, Shared};

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker): runs the call and
    /// records how it ended. Dropped before the end, it records nothing (and gives a probe's
    /// place back).
    pub struct ResponseFuture<F, C> {
        #[pin]
        call: Option<F>,
        pass: Option<Pass>,
        rejected: Option<Rejected>,
        shared: Arc<Shared>,
        classify: C,
    }

    impl<F, C> PinnedDrop for ResponseFuture<F, C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(pass) = this.pass.as_ref() {
                this.shared.abandon(pass);
            }
        }
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(super) fn running(call: F, pass: Pass, shared: Arc<Shared>, classify: C) -> Self {
        ResponseFuture {
            call: Some(call),
            pass: Some(pass),
            rejected: None,
            shared,
            classify,
        }
    }

    pub(super) fn rejected(rejected: Rejected, shared: Arc<Shared>, classify: C) -> Self {
        ResponseFuture {
            call: None,
            pass: None,
            rejected: Some(rejected),
            shared,
            classify,
        }
    }
}

impl<F, C, R, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<R, E>>,
    E: Into<tower::BoxError>,
    C: Classify<R>,
{
    type Output = Result<R, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(rejected) = this.rejected.take() {
            return Poll::Ready(Err(rejected.into()));
        }
        let Some(call) = this.call.as_mut().as_pin_mut() else {
            return Poll::Ready(Err(
                "CircuitBreaker response future polled after completion".into(),
            ));
        };
        let result = ready!(call.poll(cx)).map_err(Into::into);
        this.call.set(None);
        if let Some(mut pass) = this.pass.take() {
            // A refusal by another of this crate's layers says nothing about the upstream.
            let ours = matches!(&result, Err(err) if Rejected::find(&**err).is_some());
            if ours {
                this.shared.abandon(&pass);
            } else {
                let outcome: Outcome = this.classify.classify(result.as_ref());
                this.shared.record(&mut pass, outcome);
            }
        }
        Poll::Ready(result)
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("key", &self.pass.as_ref().map(|p| p.key()))
            .finish_non_exhaustive()
    }
}
