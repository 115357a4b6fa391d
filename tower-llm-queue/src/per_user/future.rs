use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::admission::Admission;
use crate::hold::HoldPolicy;

use super::state::UserSlot;

pin_project! {
    /// The response future of [`PerUserConcurrency`](super::PerUserConcurrency). Dropping it at
    /// any point gives up the user's slot or place in line.
    pub struct ResponseFuture<S, Req, H>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: Admission<S, Req, H, UserSlot>,
    }
}

impl<S, Req, H> ResponseFuture<S, Req, H>
where
    S: Service<Req>,
{
    pub(super) fn new(inner: Admission<S, Req, H, UserSlot>) -> Self {
        ResponseFuture { inner }
    }
}

impl<S, Req, H> Future for ResponseFuture<S, Req, H>
where
    S: Service<Req>,
    S::Error: Into<tower::BoxError>,
    H: HoldPolicy<S::Response>,
{
    type Output = Result<H::Output, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl<S, Req, H> fmt::Debug for ResponseFuture<S, Req, H>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &self.inner)
            .finish()
    }
}
