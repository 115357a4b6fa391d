use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::classify::Classify;
use crate::key::ExtractKey;

use super::future::ResponseFuture;
use super::state::Shared;
use super::CircuitBreakerHandle;

/// Fails fast while the upstream is unhealthy. Built by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
#[derive(Clone)]
pub struct CircuitBreaker<S, C, E> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared>,
    pub(super) classify: C,
    pub(super) key: E,
}

impl<S, C, E> CircuitBreaker<S, C, E> {
    /// Reads and controls the breakers.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C, E, Req> Service<Req> for CircuitBreaker<S, C, E>
where
    S: Service<Req>,
    S::Error: Into<tower::BoxError>,
    C: Classify<S::Response> + Clone,
    E: ExtractKey<Req>,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let shared = self.shared.clone();
        let classify = self.classify.clone();
        match self.key.extract(&request).and_then(|key| shared.admit(key)) {
            Ok(pass) => {
                let call = self.inner.call(request);
                ResponseFuture::running(call, pass, shared, classify)
            }
            Err(rejected) => ResponseFuture::rejected(rejected, shared, classify),
        }
    }
}

impl<S: fmt::Debug, C, E> fmt::Debug for CircuitBreaker<S, C, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
