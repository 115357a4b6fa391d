//! The response future of the layers whose work is a sequence of awaits (a shared call, a
//! decision that may wait, reading a body), written as `async` code and boxed.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type Boxed<R> = Pin<Box<dyn Future<Output = Result<R, tower::BoxError>> + Send>>;

/// A boxed response future. [`dedup::ResponseFuture`](crate::dedup::ResponseFuture) and
/// [`buffer::BufferFuture`](crate::buffer::BufferFuture) are this type.
///
/// Dropping it drops the work in progress, as any future.
pub struct BoxedFuture<R> {
    inner: Boxed<R>,
}

impl<R> BoxedFuture<R> {
    pub(crate) fn new(
        inner: impl Future<Output = Result<R, tower::BoxError>> + Send + 'static,
    ) -> Self {
        BoxedFuture {
            inner: Box::pin(inner),
        }
    }
}

impl<R> Future for BoxedFuture<R> {
    type Output = Result<R, tower::BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<R> fmt::Debug for BoxedFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxedFuture").finish_non_exhaustive()
    }
}
