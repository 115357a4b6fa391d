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

/// Where a decision was made, so that corrections go to the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Memory,
    #[cfg(feature = "redis")]
    Redis,
    #[cfg(feature = "redis")]
    Fallback,
}

/// A request let through: its admission id, where it was decided, and when it may start.
#[derive(Debug, Clone, Copy)]
struct Admitted {
    id: u64,
    backend: Backend,
    start: Option<tokio::time::Instant>,
}

#[cfg(feature = "redis")]
#[derive(Debug)]
struct Remote {
    store: super::RedisStore,
    fallback: MemoryLimiter,
}

/// What one rate-limit layer shares among its services.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) limiter: MemoryLimiter,
    #[cfg(feature = "redis")]
    remote: std::sync::OnceLock<Remote>,
    counters: Counters,
    /// How long a request over the limit may wait, in nanoseconds; [`REJECT`] refuses it.
    max_wait: AtomicU64,
}

/// The value of [`Shared::max_wait`] that refuses at once.
const REJECT: u64 = u64::MAX;

impl Shared {
    pub(crate) fn new(limit: Limit) -> Self {
        Shared {
            limiter: MemoryLimiter::new(limit),
            #[cfg(feature = "redis")]
            remote: std::sync::OnceLock::new(),
            counters: Counters::default(),
            max_wait: AtomicU64::new(REJECT),
        }
    }

    /// Sets how long a request over the limit may wait (`None`: refuse it at once).
    pub(crate) fn set_max_wait(&self, max_wait: Option<Duration>) {
        // MAX_PERIOD in nanoseconds is far below the REJECT sentinel.
        let nanos = max_wait.map_or(REJECT, |wait| {
            u64::try_from(wait.min(super::MAX_PERIOD).as_nanos()).unwrap_or(REJECT - 1)
        });
        self.max_wait.store(nanos, Relaxed);
    }

    /// How long a request over the limit may wait (`None`: it is refused at once).
    pub(crate) fn max_wait(&self) -> Option<Duration> {
        match self.max_wait.load(Relaxed) {
            REJECT => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// Keeps the limit in Redis from now on. False if a store was already set.
    #[cfg(feature = "redis")]
    pub(crate) fn set_store(&self, store: super::RedisStore) -> bool {
        let fallback = MemoryLimiter::new(store.local_share(self.limiter.limit()));
        self.remote.set(Remote { store, fallback }).is_ok()
    }

    fn limiter(&self, backend: Backend) -> &MemoryLimiter {
        match backend {
            #[cfg(feature = "redis")]
            Backend::Fallback => self.remote.get().map_or(&self.limiter, |r| &r.fallback),
            _ => &self.limiter,
        }
    }

    async fn decide(
        &self,
        key: &Key,
        cost: u64,
        max_wait: Option<Duration>,
    ) -> Result<(Decision, Backend), Rejected> {
        #[cfg(feature = "redis")]
        if let Some(remote) = self.remote.get() {
            let id = fastrand::u64(..);
            if cost == 0 {
                // Admitted without a record (the memory limiter does the same); a
                // reconciliation records the actual cost in Redis.
                return Ok((Decision::Now(id), Backend::Redis));
            }
            let limit = self.limiter.limit();
            match remote.store.decide(limit, key, id, cost, max_wait).await {
                Ok(decision) => return Ok((decision, Backend::Redis)),
                Err(err) => match remote.store.failure_mode() {
                    super::OnRedisFailure::LocalShare => {
                        tracing::warn!(key = %key, error = %err, "rate: Redis failed; deciding with the local share");
                        return Ok((
                            remote.fallback.decide(key, cost, max_wait),
                            Backend::Fallback,
                        ));
                    }
                    super::OnRedisFailure::Refuse => {
                        tracing::warn!(key = %key, error = %err, "rate: Redis failed; refusing");
                        return Err(Rejected::new(RejectionKind::RateLimited)
                            .with_message("the rate limit cannot be checked right now")
                            .with_retry_after(Duration::from_secs(1)));
                    }
                },
            }
        }
        Ok((self.limiter.decide(key, cost, max_wait), Backend::Memory))
    }

    async fn admit(
        &self,
        key: &Key,
        cost: u64,
        max_wait: Option<Duration>,
    ) -> Result<Admitted, Rejected> {
        let (decision, backend) = self.decide(key, cost, max_wait).await?;
        let counters = &self.counters;
        match decision {
            Decision::Now(id) => {
                counters.admitted.fetch_add(1, Relaxed);
                Ok(Admitted {
                    id,
                    backend,
                    start: None,
                })
            }
            Decision::At(at, id) => {
                counters.admitted.fetch_add(1, Relaxed);
                counters.waited.fetch_add(1, Relaxed);
                let wait_ms = millis(at.saturating_duration_since(tokio::time::Instant::now()));
                tracing::debug!(key = %key, cost, wait_ms, "rate: waiting for a reserved start");
                Ok(Admitted {
                    id,
                    backend,
                    start: Some(at),
                })
            }
            Decision::Denied(retry_after) => {
                counters.rejected.fetch_add(1, Relaxed);
                tracing::debug!(key = %key, cost, retry_after_ms = millis(retry_after), "rejected: rate limited");
                Err(Rejected::new(RejectionKind::RateLimited).with_retry_after(retry_after))
            }
            Decision::TooLarge => {
                counters.rejected.fetch_add(1, Relaxed);
                Err(
                    Rejected::new(RejectionKind::RateLimited).with_message(format!(
                    "a request costing {cost} exceeds the whole limit and can never be admitted"
                )),
                )
            }
        }
    }

    /// Corrects an admission's cost (0 gives it back).
    async fn adjust(&self, key: &Key, admitted: Admitted, old: u64, new: u64) {
        match admitted.backend {
            #[cfg(feature = "redis")]
            Backend::Redis => {
                if let Some(remote) = self.remote.get() {
                    let limit = self.limiter.limit();
                    remote
                        .store
                        .correct(limit, key, admitted.id, old, new)
                        .await;
                }
            }
            backend => self.limiter(backend).reconcile(key, admitted.id, old, new),
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

/// A duration in whole milliseconds, for events.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
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
    admitted: Admitted,
    /// Read by the Redis release only.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    cost: u64,
    started: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.started {
            return;
        }
        match self.admitted.backend {
            #[cfg(feature = "redis")]
            Backend::Redis => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (shared, key) = (self.shared.clone(), self.key.clone());
                    let (admitted, cost) = (self.admitted, self.cost);
                    runtime.spawn(async move {
                        if let Some(remote) = shared.remote.get() {
                            let limit = shared.limiter.limit();
                            remote.store.release(limit, &key, admitted.id, cost).await;
                        }
                    });
                }
            }
            backend => self
                .shared
                .limiter(backend)
                .release(&self.key, self.admitted.id),
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
        let cost = self.cost.cost(&request).min(super::MAX_COST);
        let shared = self.shared.clone();
        let inner = self.inner.clone();
        let reconcile = self.reconcile.clone();
        ResponseFuture::new(async move {
            let admitted = shared.admit(&key, cost, shared.max_wait()).await?;
            let mut reservation = Reservation {
                shared,
                key,
                admitted,
                cost,
                started: admitted.start.is_none(),
            };
            if let Some(at) = admitted.start {
                tokio::time::sleep_until(at).await;
                reservation.started = true;
            }
            let response = inner.oneshot(request).await.map_err(Into::into)?;
            if let Some(actual) = reconcile.actual_cost(&response) {
                let actual = actual.min(super::MAX_COST);
                let r = &reservation;
                r.shared.adjust(&r.key, r.admitted, cost, actual).await;
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
            .field("max_wait", &self.shared.max_wait())
            .finish_non_exhaustive()
    }
}
