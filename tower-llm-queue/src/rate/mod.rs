//! Rate limits: how much — requests or tokens — may start per window of time, globally or per
//! key. Two algorithms share one service and one in-memory store:
//!
//! * [`SlidingWindowLayer`] — **exact**: in no interval of length `window` does the admitted cost
//!   of one key exceed `limit`. It keeps a log of `(start, cost)` per key for the last window,
//!   so memory per key grows with the requests of one window (24 bytes each): the price of
//!   exactness, and the right one for upstream quotas such as "30 requests in any 60 seconds"
//!   (seed 002).
//! * [`TokenBucketLayer`] — a steady [`Rate`] with a burst (GCRA): per key, one instant for the
//!   admissions that have started, plus the reservations still waiting (wait mode), so that a
//!   reservation given back leaves the schedule exactly as if it had never been made: no two
//!   starts ever come closer than the GCRA allows. Seed 004's "100 per second, bursts of 200" is
//!   `TokenBucketLayer::new(Rate::per_second(100), 200)`.
//!
//! Over the limit, a request is refused at once with
//! [`RejectionKind::RateLimited`](crate::RejectionKind::RateLimited) (429) and the exact time
//! until it would fit as `retry_after`; with `.wait(max_wait)` it instead reserves the earliest
//! instant it fits — in arrival order per key, each waiter woken by its own timer, never by
//! polling — if that comes within `max_wait`. A waiter that goes away gives its reservation
//! back. A request that costs more than the whole limit is refused at once: it could never fit.
//! A refusal's `retry_after` is at most 2^53 − 1 µs (about 285 years).
//!
//! Every number is kept in a range where the arithmetic is exact, in memory and in Redis (whose
//! Lua scripts compute in doubles, exact up to 2^53): windows, intervals and waits up to
//! [`MAX_PERIOD`] (100 years), costs, limits and bursts up to [`MAX_COST`] (2^53 − 1), and a
//! burst spans at most `MAX_PERIOD`. A value beyond its range counts as the nearest bound; no
//! input panics or wraps. Only reconciled costs can take a sum past 2^53 (a window's total, or a
//! bucket's schedule in microseconds): Redis then rounds, while such a key is far over its limit
//! anyway.
//!
//! A layer is a handle to one shared state, and its settings (`wait` or `reject`) live there:
//! changed on any clone of the layer, they apply to every service built from it, even before.
//! Keys that have been idle for a window are swept out, so memory stays bounded however many
//! distinct keys pass.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_llm_queue::rate::{Rate, TokenBucketLayer};
//! use tower_llm_queue::{Rejected, RejectionKind, SlidingWindowLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // Seed 003: 20 requests per minute per user.
//! let per_user = SlidingWindowLayer::new(20, Duration::from_secs(60))
//!     .keyed_by(|req: &(String, u64)| req.0.clone());
//! // Seed 004: 100 per second with bursts of 200, for everybody.
//! let global = TokenBucketLayer::new(Rate::per_second(100), 200);
//! let mut svc = ServiceBuilder::new()
//!     .layer(per_user)
//!     .layer(global)
//!     .service(service_fn(|req: (String, u64)| async move { Ok::<_, tower::BoxError>(req.1) }));
//!
//! for n in 0..20 {
//!     svc.ready().await.unwrap().call(("ada".into(), n)).await.unwrap();
//! }
//! let err = svc.ready().await.unwrap().call(("ada".into(), 20)).await.unwrap_err();
//! let rejected = Rejected::find(&*err).unwrap();
//! assert_eq!(rejected.kind(), RejectionKind::RateLimited);
//! assert_eq!(rejected.retry_after(), Some(Duration::from_secs(60)));
//! // Another user has a window of its own.
//! svc.ready().await.unwrap().call(("bob".into(), 0)).await.unwrap();
//! # }
//! ```

mod future;
mod layers;
mod limiter;
mod reconcile;
#[cfg(feature = "redis")]
mod redis;
mod service;

use std::sync::Arc;
use std::time::Duration;

use crate::key::{ExtractKey, Key};

pub use self::future::ResponseFuture;
pub use self::layers::{SlidingWindowLayer, TokenBucketLayer};
pub use self::reconcile::{Meter, MeterBody, Metered, NoReconcile, Reconcile, Settle};
pub use self::service::RateLimit;
#[cfg(feature = "redis")]
pub use crate::store::{OnRedisFailure, RedisStore};

use self::service::Shared;

/// The longest window, interval or wait a rate limit accepts: 100 years of 365 days. Longer
/// ones count as this. It keeps every instant and every product of a cost and an interval
/// representable, and every duration exact in Redis, which computes in microseconds held in
/// doubles (exact up to 2^53 µs, about 285 years).
pub const MAX_PERIOD: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The largest cost, limit or burst a rate limit accepts: 2^53 − 1, the largest integer Redis's
/// Lua numbers (doubles) hold exactly. Larger ones count as this, in memory as in Redis, so that
/// both decide alike.
pub const MAX_COST: u64 = (1 << 53) - 1;

/// A steady rate, named so that "per second" cannot be mistaken for "one every n seconds".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    interval: Duration,
}

impl Rate {
    /// `n` per second. Zero means practically never (one per 34 years).
    pub fn per_second(n: u32) -> Self {
        Rate::per(n, Duration::from_secs(1))
    }

    /// `n` per minute.
    pub fn per_minute(n: u32) -> Self {
        Rate::per(n, Duration::from_secs(60))
    }

    /// `n` per `period`: one every `period / n`, kept between 1 ns and [`MAX_PERIOD`]. Zero
    /// means practically never (one per 34 years).
    pub fn per(n: u32, period: Duration) -> Self {
        let interval = if n == 0 {
            Duration::from_secs(1 << 30)
        } else {
            period / n
        };
        Rate::one_every(interval)
    }

    /// One every `interval`, kept between 1 ns and [`MAX_PERIOD`] (a longer one counts as
    /// `MAX_PERIOD`). A Redis store counts in whole microseconds: there, an interval below
    /// 1 µs counts as 1 µs.
    pub fn one_every(interval: Duration) -> Self {
        Rate {
            interval: limiter::period(interval),
        }
    }

    pub(crate) fn interval(self) -> Duration {
        self.interval
    }
}

/// What a request costs against a rate limit.
///
/// Implemented by [`Unit`] (every request costs 1: the default) and every `Fn(&Req) -> u64`.
pub trait Cost<Req> {
    /// The request's cost.
    fn cost(&self, request: &Req) -> u64;
}

impl<F, Req> Cost<Req> for F
where
    F: Fn(&Req) -> u64,
{
    fn cost(&self, request: &Req) -> u64 {
        self(request)
    }
}

/// Every request costs 1: the limit counts requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unit;

impl<Req> Cost<Req> for Unit {
    fn cost(&self, _: &Req) -> u64 {
        1
    }
}

/// One limit for all requests: the key of a layer without `keyed_by`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl<Req> ExtractKey<Req> for Global {
    fn extract(&self, _: &Req) -> Result<Key, crate::Rejected> {
        Ok(Key::anonymous())
    }
}

/// Counters of a rate-limit layer.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RateStats {
    /// Requests admitted, at once or after waiting.
    pub admitted: u64,
    /// Requests that waited for their turn.
    pub waited: u64,
    /// Requests refused.
    pub rejected: u64,
    /// Keys with state in memory now.
    pub keys: usize,
}

/// Reads the state of one rate-limit layer.
#[derive(Clone, Debug)]
pub struct RateHandle {
    shared: Arc<Shared>,
}

impl RateHandle {
    /// A snapshot of the counters.
    pub fn stats(&self) -> RateStats {
        self.shared.stats()
    }

    /// The cost admitted for `key` in the current window (sliding window), or the units of the
    /// burst in use (token bucket), as this process's memory holds it (with a Redis store, the
    /// shared count lives in Redis). [`Key::anonymous`] is the key of a layer without
    /// `keyed_by`.
    pub fn usage(&self, key: &Key) -> u64 {
        self.shared.limiter.usage(key)
    }
}

#[cfg(test)]
mod tests;
