use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::flight::Outcome;

type Boxed<R> = Pin<Box<dyn Future<Output = Outcome<R>> + Send>>;

/// The response future of [`Dedup`](super::Dedup).
///
/// Dropping it leaves the shared call: the call goes on while anybody else waits for it, and is
/// dropped when the last waiter goes.
pub struct ResponseFuture<R> {
    inner: Boxed<R>,
}

impl<R> ResponseFuture<R> {
    pub(super) fn new(inner: Boxed<R>) -> Self {
        ResponseFuture { inner }
    }
}

impl<R> Future for ResponseFuture<R> {
    type Output = Outcome<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<R> fmt::Debug for ResponseFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
