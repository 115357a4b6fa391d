//! The last step of every layer that decides in its response future: wait for the inner
//! service to be ready, then call it, then wait for the call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

pin_project! {
    /// Polls `inner` until ready, calls it with the request, and resolves to the call's result.
    ///
    /// Generic over the inner future `F` (always `S::Future`) rather than naming `S::Future`
    /// in a field, as tower's futures are: the compiler can then prove the whole future `Send`
    /// in spawned tasks and handlers.
    #[project = StageProj]
    #[project_replace = StageReplace]
    pub(crate) enum CallWhenReady<S, Req, F> {
        /// Waiting for the inner service.
        Ready { inner: S, request: Req },
        /// Called: waiting for the call.
        Running { #[pin] call: F },
        /// Ended, or never to run.
        Done,
    }
}

impl<S, Req, F> CallWhenReady<S, Req, F> {
    pub(crate) fn new(inner: S, request: Req) -> Self {
        CallWhenReady::Ready { inner, request }
    }

    /// A call that never runs: polling it is an error.
    pub(crate) fn none() -> Self {
        CallWhenReady::Done
    }

    /// Whether the inner service has been called.
    pub(crate) fn is_running(&self) -> bool {
        matches!(self, CallWhenReady::Running { .. })
    }
}

impl<S, Req> Future for CallWhenReady<S, Req, S::Future>
where
    S: Service<Req>,
    S::Error: Into<tower::BoxError>,
{
    type Output = Result<S::Response, tower::BoxError>;

    // Inlined into every layer's future: its result then stays in registers, where a copy
    // through memory would stall on the way.
    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                StageProj::Running { call } => {
                    let result = ready!(call.poll(cx));
                    self.set(CallWhenReady::Done);
                    return Poll::Ready(result.map_err(Into::into));
                }
                StageProj::Ready { inner, .. } => {
                    if let Err(err) = ready!(inner.poll_ready(cx)) {
                        self.set(CallWhenReady::Done);
                        return Poll::Ready(Err(err.into()));
                    }
                    let StageReplace::Ready { mut inner, request } =
                        self.as_mut().project_replace(CallWhenReady::Done)
                    else {
                        return Poll::Ready(Err("response future polled after completion".into()));
                    };
                    self.set(CallWhenReady::Running {
                        call: inner.call(request),
                    });
                }
                StageProj::Done => {
                    return Poll::Ready(Err("response future polled after completion".into()));
                }
            }
        }
    }
}

impl<S, Req, F> fmt::Debug for CallWhenReady<S, Req, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallWhenReady")
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}
