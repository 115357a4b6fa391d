use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::admission::Admission;
use crate::hold::HoldPolicy;
use crate::key::ExtractKey;

use super::future::ResponseFuture;
use super::state::{Acquired, Shared};
use super::PerUserHandle;

/// Limits how many requests each user has in flight. Built by
/// [`PerUserConcurrencyLayer`](super::PerUserConcurrencyLayer).
///
/// `poll_ready` is always ready: the response future takes the user's slot (or waits for one),
/// then waits for the inner service's readiness, then calls it.
#[derive(Clone)]
pub struct PerUserConcurrency<S, E, H> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared>,
    pub(super) user: E,
    pub(super) hold: H,
}

impl<S, E, H> PerUserConcurrency<S, E, H> {
    /// Reads the limits' stats.
    pub fn handle(&self) -> PerUserHandle {
        PerUserHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, Req, E, H> Service<Req> for PerUserConcurrency<S, E, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<tower::BoxError>,
    E: ExtractKey<Req>,
    H: HoldPolicy<S::Response> + Clone,
{
    type Response = H::Output;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S, Req, S::Future, H>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let hold = self.hold.clone();
        let key = match self.user.extract(&request) {
            Ok(key) => key,
            Err(rejected) => return ResponseFuture::new(Admission::rejected(rejected, hold)),
        };
        let busy = match self.shared.take_at_once(key) {
            Ok(slot) => {
                let admission = Admission::admitted(slot, self.inner.clone(), request, hold);
                return ResponseFuture::new(admission);
            }
            Err(busy) => busy,
        };
        ResponseFuture::new(match self.shared.acquire(busy) {
            Ok(Acquired::Running(slot)) => {
                Admission::admitted(slot, self.inner.clone(), request, hold)
            }
            Ok(Acquired::Waiting(slot, timeout)) => {
                Admission::waiting(slot, timeout, self.inner.clone(), request, hold)
            }
            Err(rejected) => Admission::rejected(rejected, hold),
        })
    }
}

impl<S: fmt::Debug, E, H> fmt::Debug for PerUserConcurrency<S, E, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerUserConcurrency")
            .field("inner", &self.inner)
            .field("max_per_user", &self.shared.max_per_user())
            .finish_non_exhaustive()
    }
}
