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
    ///
    /// `F` is the inner service's future: naming it as a parameter, as tower's futures do,
    /// keeps the compiler able to prove the future `Send` inside spawned tasks and handlers.
    pub struct ResponseFuture<S, Req, F, H> {
        #[pin]
        inner: Admission<S, Req, F, H, Ticket>,
        id: RequestId,
    }
}

impl<S, Req, F, H> ResponseFuture<S, Req, F, H> {
    pub(super) fn new(inner: Admission<S, Req, F, H, Ticket>, id: RequestId) -> Self {
        ResponseFuture { inner, id }
    }

    /// The id of this request, for [`PriorityQueueHandle::cancel`](super::PriorityQueueHandle::cancel).
    pub fn request_id(&self) -> RequestId {
        self.id
    }
}

impl<S, Req, H> Future for ResponseFuture<S, Req, S::Future, H>
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

impl<S, Req, F, H> fmt::Debug for ResponseFuture<S, Req, F, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("id", &self.id)
            .field("inner", &self.inner)
            .finish()
    }
}
