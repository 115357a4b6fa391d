use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::call::CallWhenReady;
use crate::classify::{Classify, Outcome};
use crate::rejected::Rejected;

use super::state::{Pass, Shared};

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker): waits for the inner
    /// service, runs the call and records how it ended. Dropped before the end, it records
    /// nothing (and gives a probe's place back).
    ///
    /// `F` is the inner service's future, named as a parameter as tower's futures do.
    pub struct ResponseFuture<S, Req, F, C> {
        #[pin]
        call: CallWhenReady<S, Req, F>,
        // Where the call stands with the breaker: let through (`Ok`, recorded when it ends),
        // refused (`Err`, returned when first polled), or done with (`None`).
        gate: Option<Result<Pass, Rejected>>,
        shared: Arc<Shared>,
        classify: C,
    }

    impl<S, Req, F, C> PinnedDrop for ResponseFuture<S, Req, F, C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(Ok(pass)) = this.gate {
                this.shared.abandon(pass);
            }
        }
    }
}

impl<S, Req, F, C> ResponseFuture<S, Req, F, C> {
    /// The future of a call let through (`Ok`) or refused (`Err`, returned when first polled).
    #[inline]
    pub(super) fn new(
        call: CallWhenReady<S, Req, F>,
        gate: Result<Pass, Rejected>,
        shared: Arc<Shared>,
        classify: C,
    ) -> Self {
        ResponseFuture {
            call,
            gate: Some(gate),
            shared,
            classify,
        }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, S::Future, C>
where
    S: Service<Req>,
    S::Error: Into<tower::BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<S::Response, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if matches!(this.gate, Some(Err(_))) {
            if let Some(Err(rejected)) = this.gate.take() {
                return Poll::Ready(Err(rejected.into()));
            }
        }
        let mut call = this.call;
        let (poll, copy) = crate::copies::watch(|| call.as_mut().poll(cx));
        let result = ready!(poll);
        if let Some(Ok(pass)) = this.gate {
            // A refusal by another of this crate's layers says nothing about the upstream, and
            // a copy of a shared call was counted by the request that made it.
            let ours = matches!(&result, Err(err) if Rejected::find(&**err).is_some());
            if ours || copy {
                this.shared.abandon(pass);
            } else {
                let outcome: Outcome = this.classify.classify(result.as_ref());
                this.shared.record(pass, outcome);
            }
        }
        *this.gate = None;
        Poll::Ready(result)
    }
}

impl<S, Req, F, C> fmt::Debug for ResponseFuture<S, Req, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}
