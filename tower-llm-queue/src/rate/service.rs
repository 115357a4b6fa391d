use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use crate::clock::AtomicDuration;
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
    /// How long a request over the limit may wait; `None` refuses it.
    max_wait: AtomicDuration,
}

impl Shared {
    pub(crate) fn new(limit: Limit) -> Self {
        Shared {
            limiter: MemoryLimiter::new(limit),
            #[cfg(feature = "redis")]
            remote: std::sync::OnceLock::new(),
            counters: Counters::default(),
            max_wait: AtomicDuration::new(None),
        }
    }

    /// Sets how long a request over the limit may wait (`None`: refuse it at once).
    pub(crate) fn set_max_wait(&self, max_wait: Option<Duration>) {
        self.max_wait
            .set(max_wait.map(|wait| wait.min(super::MAX_PERIOD)));
    }

    /// How long a request over the limit may wait (`None`: it is refused at once).
    pub(crate) fn max_wait(&self) -> Option<Duration> {
        self.max_wait.get()
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

    /// Decides for one request: in memory at once, or with Redis in a boxed round trip. The
    /// reservation of an admission gives it back if the request leaves before it starts.
    pub(super) fn admit(self: &Arc<Self>, key: Key, cost: u64) -> Admit {
        #[cfg(feature = "redis")]
        if self.remote.get().is_some() {
            return Admit::Remote(Box::pin(self.clone().admit_remote(key, cost)));
        }
        let decision = self.limiter.decide(&key, cost, self.max_wait());
        Admit::Decided(self.conclude(decision, key, cost, Backend::Memory))
    }

    /// Decides in Redis. The reservation exists before the round trip, so that a caller
    /// leaving during it, or a decision that fails or times out (and may still run in Redis),
    /// sends Redis a release for its admission id.
    #[cfg(feature = "redis")]
    async fn admit_remote(self: Arc<Self>, key: Key, cost: u64) -> Result<Admitted, Rejected> {
        let max_wait = self.max_wait();
        let Some(remote) = self.remote.get() else {
            return Err(Rejected::new(RejectionKind::RateLimited)
                .with_message("the rate limit's store is not set"));
        };
        let id = fastrand::u64(..);
        let mut reservation = Reservation {
            shared: self.clone(),
            key,
            id,
            backend: Backend::Redis,
            cost,
            armed: cost > 0,
        };
        if cost == 0 {
            // Admitted without a record (the memory limiter does the same); a reconciliation
            // records the actual cost in Redis.
            let key = reservation.disarm();
            return self.conclude(Decision::Now(id), key, cost, Backend::Redis);
        }
        let limit = self.limiter.limit();
        let key = reservation.key.clone();
        match remote.store.decide(limit, &key, id, cost, max_wait).await {
            Ok(decision) => {
                drop(reservation.disarm());
                self.conclude(decision, key, cost, Backend::Redis)
            }
            Err(err) => {
                // The script may have run, or may still run: undo it.
                reservation.give_back();
                match remote.store.failure_mode() {
                    super::OnRedisFailure::LocalShare => {
                        tracing::warn!(key = %key, error = %err, "rate: Redis failed; deciding with the local share");
                        let decision = remote.fallback.decide(&key, cost, max_wait);
                        self.conclude(decision, key, cost, Backend::Fallback)
                    }
                    super::OnRedisFailure::Refuse => {
                        tracing::warn!(key = %key, error = %err, "rate: Redis failed; refusing");
                        Err(Rejected::new(RejectionKind::RateLimited)
                            .with_message("the rate limit cannot be checked right now")
                            .with_retry_after(Duration::from_secs(1)))
                    }
                }
            }
        }
    }

    /// Counts a decision made in `backend`: a request that starts now gets its admission, one
    /// with a place reserved ahead a reservation, armed until it starts.
    fn conclude(
        self: &Arc<Self>,
        decision: Decision,
        key: Key,
        cost: u64,
        backend: Backend,
    ) -> Result<Admitted, Rejected> {
        let counters = &self.counters;
        match decision {
            Decision::Now(id) => {
                counters.admitted.fetch_add(1, Relaxed);
                Ok(Admitted::Now(Admission {
                    key,
                    id,
                    backend,
                    cost,
                }))
            }
            Decision::At(at, id) => {
                counters.admitted.fetch_add(1, Relaxed);
                counters.waited.fetch_add(1, Relaxed);
                let wait_ms = millis(at.saturating_duration_since(tokio::time::Instant::now()));
                tracing::debug!(key = %key, cost, wait_ms, "rate: waiting for a reserved start");
                let reservation = Reservation {
                    shared: self.clone(),
                    key,
                    id,
                    backend,
                    cost,
                    armed: true,
                };
                Ok(Admitted::At(reservation, at))
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

    /// Corrects the cost of an admission that started, where it was decided. A Redis
    /// correction is sent from a task of the current Tokio runtime, returned.
    pub(super) fn settle(
        self: &Arc<Self>,
        admission: Admission,
        actual: u64,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let Admission {
            key,
            id,
            backend,
            cost,
        } = admission;
        match backend {
            #[cfg(feature = "redis")]
            Backend::Redis => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    tracing::warn!(key = %key, "rate: no runtime to send a correction to Redis");
                    return None;
                };
                let shared = self.clone();
                Some(runtime.spawn(async move {
                    if let Some(remote) = shared.remote.get() {
                        let limit = shared.limiter.limit();
                        remote.store.correct(limit, &key, id, cost, actual).await;
                    }
                }))
            }
            backend => {
                self.limiter(backend).reconcile(&key, id, cost, actual);
                None
            }
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

/// A decision for one request.
pub(super) enum Admit {
    /// Made in memory.
    Decided(Result<Admitted, Rejected>),
    /// On its way from Redis.
    #[cfg(feature = "redis")]
    Remote(std::pin::Pin<Box<dyn std::future::Future<Output = Result<Admitted, Rejected>> + Send>>),
}

/// An admission: to start now, or at a reserved instant (wait mode).
pub(super) enum Admitted {
    Now(Admission),
    At(Reservation, tokio::time::Instant),
}

/// An admission, given back if its request leaves before starting: armed while the decision is
/// pending (with Redis, from before the round trip) and while a reserved start is ahead;
/// disarmed once the request starts, or when nothing was recorded.
pub(super) struct Reservation {
    shared: Arc<Shared>,
    key: Key,
    id: u64,
    backend: Backend,
    cost: u64,
    armed: bool,
}

impl Reservation {
    /// Gives the admission back, once. A Redis release is sent from a task of the current
    /// Tokio runtime; without one, it cannot be sent.
    fn give_back(&mut self) {
        if !std::mem::take(&mut self.armed) {
            return;
        }
        match self.backend {
            #[cfg(feature = "redis")]
            Backend::Redis => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (shared, key) = (self.shared.clone(), self.key.clone());
                    let (id, cost) = (self.id, self.cost);
                    runtime.spawn(async move {
                        if let Some(remote) = shared.remote.get() {
                            let limit = shared.limiter.limit();
                            remote.store.release(limit, &key, id, cost).await;
                        }
                    });
                } else {
                    tracing::warn!(key = %self.key, "rate: no runtime to give an admission back to Redis");
                }
            }
            backend => self.shared.limiter(backend).release(&self.key, self.id),
        }
    }
}

impl Reservation {
    /// Nothing to give back any more: the key, taken out.
    fn disarm(mut self) -> Key {
        self.armed = false;
        std::mem::replace(&mut self.key, Key::anonymous())
    }

    /// The request starts: nothing to give back any more, only its cost to correct.
    pub(super) fn started(self) -> Admission {
        let (id, backend, cost) = (self.id, self.backend, self.cost);
        Admission {
            key: self.disarm(),
            id,
            backend,
            cost,
        }
    }
}

/// A request that started, for corrections of its cost.
#[derive(Debug)]
pub(super) struct Admission {
    pub(super) key: Key,
    id: u64,
    backend: Backend,
    pub(super) cost: u64,
}

impl Admission {
    /// Whether it was decided in a store shared with other processes.
    pub(super) fn is_shared(&self) -> bool {
        match self.backend {
            #[cfg(feature = "redis")]
            Backend::Redis => true,
            _ => false,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl<S, E, C, R, Req> Service<Req> for RateLimit<S, E, C, R>
where
    S: Service<Req> + Clone,
    S::Error: Into<tower::BoxError>,
    E: ExtractKey<Req>,
    C: Cost<Req>,
    R: Reconcile<Req, S::Response> + Clone,
{
    type Response = R::Output;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S, Req, S::Future, R, R::Pending, R::Output>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let reconcile = self.reconcile.clone();
        let key = match self.key.extract(&request) {
            Ok(key) => key,
            Err(rejected) => return ResponseFuture::refused(reconcile, rejected),
        };
        let cost = self.cost.cost(&request).min(super::MAX_COST);
        let pending = reconcile.prepare(&request);
        let (inner, shared) = (self.inner.clone(), self.shared.clone());
        ResponseFuture::new(inner, request, shared, reconcile, key, cost, pending)
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
