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
    pub(crate) struct CallWhenReady<S, Req, F> {
        #[pin]
        running: Option<F>,
        inner: Option<S>,
        request: Option<Req>,
    }
}

impl<S, Req, F> CallWhenReady<S, Req, F> {
    pub(crate) fn new(inner: S, request: Req) -> Self {
        CallWhenReady {
            running: None,
            inner: Some(inner),
            request: Some(request),
        }
    }

    /// A call that never runs: polling it is an error.
    pub(crate) fn none() -> Self {
        CallWhenReady {
            running: None,
            inner: None,
            request: None,
        }
    }

    /// Whether the inner service has been called.
    pub(crate) fn is_running(&self) -> bool {
        self.running.is_some()
    }
}

impl<S, Req> Future for CallWhenReady<S, Req, S::Future>
where
    S: Service<Req>,
    S::Error: Into<tower::BoxError>,
{
    type Output = Result<S::Response, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(call) = this.running.as_mut().as_pin_mut() {
                let result = ready!(call.poll(cx));
                this.running.set(None);
                return Poll::Ready(result.map_err(Into::into));
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(Err("response future polled after completion".into()));
            };
            let ready = ready!(inner.poll_ready(cx));
            let (Some(mut inner), Some(request)) = (this.inner.take(), this.request.take()) else {
                return Poll::Ready(Err("response future polled after completion".into()));
            };
            if let Err(err) = ready {
                return Poll::Ready(Err(err.into()));
            }
            this.running.set(Some(inner.call(request)));
        }
    }
}

impl<S, Req, F> fmt::Debug for CallWhenReady<S, Req, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallWhenReady")
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}
