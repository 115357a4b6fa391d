use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::classify::Classify;

use super::state::Shared;
use super::ResponseFuture;
use super::RetryHandle;

/// Retries failed calls with backoff, honouring the upstream's retry delays, a retry budget and
/// a shared cool-down. Built by [`RetryBackoffLayer`](super::RetryBackoffLayer).
#[derive(Clone)]
pub struct RetryBackoff<S, C> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared>,
    pub(super) classify: C,
}

impl<S, C> RetryBackoff<S, C> {
    /// Reads the layer's stats.
    pub fn handle(&self) -> RetryHandle {
        RetryHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C, Req> Service<Req> for RetryBackoff<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<tower::BoxError>,
    C: Classify<S::Response> + Clone,
    Req: Clone,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S, Req, S::Future, C>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        ResponseFuture::new(
            self.inner.clone(),
            request,
            self.shared.clone(),
            self.classify.clone(),
        )
    }
}

impl<S: fmt::Debug, C> fmt::Debug for RetryBackoff<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBackoff")
            .field("inner", &self.inner)
            .field("config", &self.shared.config())
            .finish_non_exhaustive()
    }
}
