use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::ServiceExt;
use tower_service::Service;

use crate::key::{ExtractKey, Key};
use crate::rejected::{Rejected, RejectionKind};

use super::limiter::{Decision, Limit, MemoryLimiter};
use super::{Cost, RateHandle, RateStats, Reconcile, ResponseFuture};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    admitted: AtomicU64,
    waited: AtomicU64,
    rejected: AtomicU64,
}

/// What one rate-limit layer shares among its services.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) limiter: MemoryLimiter,
    counters: Counters,
}

impl Shared {
    pub(crate) fn new(limit: Limit) -> Self {
        Shared {
            limiter: MemoryLimiter::new(limit),
            counters: Counters::default(),
        }
    }

    pub(crate) fn stats(&self) -> RateStats {
        let c = &self.counters;
        RateStats {
            admitted: c.admitted.load(Relaxed),
            waited: c.waited.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            keys: self.limiter.keys(),
        }
    }
}

/// Starts at most a limited cost per window of time, per key. Built by
/// [`SlidingWindowLayer`](super::SlidingWindowLayer) and
/// [`TokenBucketLayer`](super::TokenBucketLayer).
#[derive(Clone)]
pub struct RateLimit<S, E, C, R> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: E,
    pub(crate) cost: C,
    pub(crate) reconcile: R,
    pub(crate) max_wait: Option<Duration>,
}

impl<S, E, C, R> RateLimit<S, E, C, R> {
    /// Reads the limit's stats and usage.
    pub fn handle(&self) -> RateHandle {
        RateHandle {
            shared: self.shared.clone(),
        }
    }
}

/// Gives a reservation back if its request leaves before starting.
struct Reservation {
    shared: Arc<Shared>,
    key: Key,
    id: u64,
    cost: u64,
    started: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.started {
            self.shared.limiter.release(&self.key, self.id, self.cost);
        }
    }
}

impl<S, E, C, R, Req> Service<Req> for RateLimit<S, E, C, R>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<tower::BoxError>,
    E: ExtractKey<Req>,
    C: Cost<Req>,
    R: Reconcile<S::Response> + Clone + Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let key = match self.key.extract(&request) {
            Ok(key) => key,
            Err(rejected) => return ResponseFuture::new(async move { Err(rejected.into()) }),
        };
        let cost = self.cost.cost(&request);
        let shared = self.shared.clone();
        let decision = shared.limiter.decide(&key, cost, self.max_wait);
        let counters = &shared.counters;
        let (start, id) = match decision {
            Decision::Now(id) => {
                counters.admitted.fetch_add(1, Relaxed);
                (None, id)
            }
            Decision::At(at, id) => {
                counters.admitted.fetch_add(1, Relaxed);
                counters.waited.fetch_add(1, Relaxed);
                (Some(at), id)
            }
            Decision::Denied(retry_after) => {
                counters.rejected.fetch_add(1, Relaxed);
                tracing::debug!(key = %key, cost, retry_after_ms = retry_after.as_millis() as u64, "rejected: rate limited");
                let rejected =
                    Rejected::new(RejectionKind::RateLimited).with_retry_after(retry_after);
                return ResponseFuture::new(async move { Err(rejected.into()) });
            }
            Decision::TooLarge => {
                counters.rejected.fetch_add(1, Relaxed);
                let rejected = Rejected::new(RejectionKind::RateLimited).with_message(format!(
                    "a request costing {cost} exceeds the whole limit and can never be admitted"
                ));
                return ResponseFuture::new(async move { Err(rejected.into()) });
            }
        };
        let inner = self.inner.clone();
        let reconcile = self.reconcile.clone();
        ResponseFuture::new(async move {
            let mut reservation = Reservation {
                shared,
                key,
                id,
                cost,
                started: start.is_none(),
            };
            if let Some(at) = start {
                tokio::time::sleep_until(at).await;
                reservation.started = true;
            }
            let response = inner.oneshot(request).await.map_err(Into::into)?;
            if let Some(actual) = reconcile.actual_cost(&response) {
                let r = &reservation;
                r.shared.limiter.reconcile(&r.key, r.id, cost, actual);
            }
            Ok(response)
        })
    }
}

impl<S: fmt::Debug, E, C, R> fmt::Debug for RateLimit<S, E, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("limit", &self.shared.limiter.limit())
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}
