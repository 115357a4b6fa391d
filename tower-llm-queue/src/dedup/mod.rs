//! Identical requests share one upstream call; recent results are served from a short cache.
//!
//! A key function maps each request to `Some(key)` — requests with equal keys are identical —
//! or `None` (never shared). While a call for a key is in flight, every other request with that
//! key waits for it instead of calling the upstream again, and all get its result. With
//! [`ttl`](DedupLayer::ttl), successful results are also kept in a bounded cache
//! ([`max_entries`](DedupLayer::max_entries), default 10,000) and served until they expire.
//!
//! # The key is yours, and so is what it shares
//!
//! Two requests with the same key get the *same* answer. If answers depend on who asks — a
//! user's own plans, documents or permissions — put the user in the key, as seed 001 does
//! (`(user, prompt)`), or one user's answer is served to another.
//!
//! # Cancellation and failure
//!
//! The shared call runs in the task of the caller who started it, as that caller's future is
//! polled: no task is spawned for it. When that caller goes away before the call is over and
//! others wait for it, the call moves to a task of its own and goes on for them; it is dropped
//! only when every waiter has gone. (A caller that keeps the future but stops polling it holds
//! the others up until it polls again or drops it.) An error reaches every
//! current waiter and is not cached (unless [`negative_ttl`](DedupLayer::negative_ttl) says so);
//! a single waiter gets the inner error untouched, several share a [`CallFailed`]. A panic in
//! the inner service is a [`CallFailed`] for every waiter, and the key is usable again at once.
//!
//! Responses must be `Clone`. For `http::Response`, put a
//! [`BufferResponseLayer`](crate::buffer::BufferResponseLayer) inside this layer:
//! a streamed reply is then buffered whole before it is shared.
//!
//! The cache's expiry follows `tokio::time`, so it can be tested with paused time; the cache
//! itself is [`quick_cache`], which bounds its size and evicts the least useful entries first.
//!
//! # Across processes
//!
//! With `DedupLayer::store` (feature `redis`), the cache is kept in Redis too, so that
//! a result computed by one process is served by the others until it expires; responses are
//! stored as bytes by a [`Codec`] ([`HttpResponseCodec`] for buffered HTTP responses,
//! [`JsonCodec`] for `serde` types). Calls in flight are still shared within one process only,
//! and a Redis that fails or does not answer leaves the in-memory cache to answer alone.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_llm_queue::DedupLayer;
//!
//! #[derive(Clone)]
//! struct PlanRequest { user: u64, goal: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // Seed 001: identical requests of one user share a result for five minutes.
//! let layer = DedupLayer::new(|r: &PlanRequest| Some((r.user, r.goal.clone())))
//!     .ttl(Duration::from_secs(300))
//!     .max_entries(10_000);
//! let stats = layer.handle();
//! let mut planner = ServiceBuilder::new().layer(layer).service(service_fn(|r: PlanRequest| async move {
//!     Ok::<_, tower::BoxError>(format!("a plan to {}", r.goal))
//! }));
//!
//! let ask = || PlanRequest { user: 1, goal: "learn Rust".into() };
//! let first = planner.ready().await?.call(ask()).await?;
//! let again = planner.ready().await?.call(ask()).await?;
//! assert_eq!(first, again);
//! assert_eq!((stats.stats().misses, stats.stats().hits), (1, 1));
//! # Ok(())
//! # }
//! ```

mod codec;
mod error;
mod flight;
mod layer;
#[cfg(feature = "redis")]
mod remote;
mod service;

use std::hash::Hash;
use std::sync::Arc;

pub use self::codec::{Codec, HttpResponseCodec, JsonCodec};
pub use self::error::CallFailed;
/// The response future of [`Dedup`]: dropping it leaves the shared call, which goes on while
/// anybody else waits for it and is dropped when the last waiter goes.
pub type ResponseFuture<R> = crate::boxed::BoxedFuture<R>;
pub use self::layer::DedupLayer;
pub use self::service::Dedup;

use self::flight::Shared;

/// Counters of a [`DedupLayer`], for health endpoints and dashboards.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DedupStats {
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that joined a call already in flight.
    pub coalesced: u64,
    /// Requests that started a call.
    pub misses: u64,
    /// Requests with no key (or outside a tokio runtime), passed straight through.
    pub bypassed: u64,
    /// Shared calls that failed, panics included.
    pub failed: u64,
    /// Shared calls whose inner service panicked.
    pub panicked: u64,
    /// Shared calls answered from the cache in Redis (feature `redis`) instead of the inner
    /// service; each is counted in `misses` too, as the call it answered.
    pub remote_hits: u64,
    /// Lookups and writes of the cache in Redis that failed or timed out (the in-memory cache
    /// and the inner service answered).
    pub remote_failures: u64,
    /// Calls in flight now.
    pub in_flight: usize,
    /// Results in the cache now (expired ones included until they are looked up or evicted).
    pub entries: usize,
}

/// Reads the state of one [`DedupLayer`].
pub struct DedupHandle<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for DedupHandle<K> {
    fn clone(&self) -> Self {
        DedupHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<K> std::fmt::Debug for DedupHandle<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupHandle").finish_non_exhaustive()
    }
}

impl<K> DedupHandle<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// A snapshot of the counters.
    pub fn stats(&self) -> DedupStats {
        self.shared.stats()
    }
}

#[cfg(test)]
mod tests;
