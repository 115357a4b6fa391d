use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::admission::Admission;
use crate::hold::HoldPolicy;

use super::future::ResponseFuture;
use super::priority::{ExtractPriority, FairShare};
use super::state::{Enqueued, Shared};
use super::{AssignRequestId, PriorityQueueHandle};

/// Runs at most a fixed number of requests at once and queues the rest by priority, fairly
/// across users. Built by [`PriorityQueueLayer`](super::PriorityQueueLayer).
///
/// `poll_ready` is always ready: admission happens in the response future, which waits for its
/// turn, then for the inner service's readiness, then calls it.
#[derive(Clone)]
pub struct PriorityQueue<S, P, F, I, H> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared>,
    pub(super) priority: P,
    pub(super) fair: F,
    pub(super) ids: I,
    pub(super) hold: H,
}

impl<S, P, F, I, H> PriorityQueue<S, P, F, I, H> {
    /// Reads the queue's stats and entries and cancels requests.
    pub fn handle(&self) -> PriorityQueueHandle {
        PriorityQueueHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, Req, P, F, I, H> Service<Req> for PriorityQueue<S, P, F, I, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<tower::BoxError>,
    P: ExtractPriority<Req>,
    F: FairShare<Req>,
    I: AssignRequestId<Req>,
    H: HoldPolicy<S::Response> + Clone,
{
    type Response = H::Output;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S, Req, S::Future, H>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Req) -> Self::Future {
        let id = self.ids.assign(&mut request);
        let priority = self.priority.priority(&request);
        let hold = self.hold.clone();
        let mut user = match self.fair.user(&request) {
            Ok(user) => user,
            Err(rejected) => return ResponseFuture::new(Admission::rejected(rejected, hold), id),
        };
        if let Some(ticket) = self.shared.admit_at_once(id, &mut user, priority) {
            let admission = Admission::admitted(ticket, self.inner.clone(), request, hold);
            return ResponseFuture::new(admission, id);
        }
        let admission = match self.shared.enqueue(id, user, priority) {
            Ok(Enqueued::Running(ticket)) => {
                Admission::admitted(ticket, self.inner.clone(), request, hold)
            }
            Ok(Enqueued::Waiting(ticket, timeout)) => {
                Admission::waiting(ticket, timeout, self.inner.clone(), request, hold)
            }
            Err(rejected) => Admission::rejected(rejected, hold),
        };
        ResponseFuture::new(admission, id)
    }
}

impl<S: fmt::Debug, P, F, I, H> fmt::Debug for PriorityQueue<S, P, F, I, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PriorityQueue")
            .field("inner", &self.inner)
            .field("config", &self.shared.config())
            .finish_non_exhaustive()
    }
}
