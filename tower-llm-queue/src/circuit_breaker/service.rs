use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::call::CallWhenReady;
use crate::classify::Classify;
use crate::key::ExtractKey;

use super::future::ResponseFuture;
use super::state::Shared;
use super::CircuitBreakerHandle;

/// Fails fast while the upstream is unhealthy. Built by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// `poll_ready` is always ready: the response future of an admitted call waits for the inner
/// service's readiness, then calls it; a refused one is ready at once.
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
    S: Service<Req> + Clone,
    S::Error: Into<tower::BoxError>,
    C: Classify<S::Response> + Clone,
    E: ExtractKey<Req>,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S, Req, S::Future, C>;

    /// Always ready: the decision is made in `call`, so that an open breaker refuses at once,
    /// without waiting for the inner service; the response future waits for it.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let shared = self.shared.clone();
        let classify = self.classify.clone();
        let gate = match self.key.extract(&request) {
            Ok(key) => match shared.admit_at_once(&key) {
                Some(pass) => {
                    let call = CallWhenReady::new(self.inner.clone(), request);
                    return ResponseFuture::new(call, Ok(pass), shared, classify);
                }
                None => shared.admit(key),
            },
            Err(rejected) => Err(rejected),
        };
        let call = match gate {
            Ok(_) => CallWhenReady::new(self.inner.clone(), request),
            Err(_) => CallWhenReady::none(),
        };
        ResponseFuture::new(call, gate, shared, classify)
    }
}

impl<S: fmt::Debug, C, E> fmt::Debug for CircuitBreaker<S, C, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
