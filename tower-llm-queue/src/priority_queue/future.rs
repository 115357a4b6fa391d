use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::admission::Admission;
use crate::hold::HoldPolicy;

use super::state::Ticket;
use super::RequestId;

pin_project! {
    /// The response future of [`PriorityQueue`](super::PriorityQueue): waits for the request's
    /// turn, then for the inner service, then runs the call. Dropping it at any point gives up the
    /// request's place or slot.
    pub struct ResponseFuture<S, Req, H>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: Admission<S, Req, H, Ticket>,
        id: RequestId,
    }
}

impl<S, Req, H> ResponseFuture<S, Req, H>
where
    S: Service<Req>,
{
    pub(super) fn new(inner: Admission<S, Req, H, Ticket>, id: RequestId) -> Self {
        ResponseFuture { inner, id }
    }

    /// The id of this request, for [`PriorityQueueHandle::cancel`](super::PriorityQueueHandle::cancel).
    pub fn request_id(&self) -> RequestId {
        self.id
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
            .field("id", &self.id)
            .field("inner", &self.inner)
            .finish()
    }
}
