//! Fails fast while the upstream is down, and probes to find out when it is back.
//!
//! * **Closed**: calls go through, and their outcomes ([`crate::classify`]) fill a window — the
//!   last N calls or the last span of time. Once it holds
//!   [`minimum_calls`](CircuitBreakerLayer::minimum_calls), a failure rate (or slow-call rate)
//!   at or above its threshold opens the breaker.
//! * **Open**: every call is refused at once with
//!   [`RejectionKind::CircuitOpen`](crate::RejectionKind::CircuitOpen) (503) and a
//!   `retry_after` of the time left. An upstream's "not before T" (a 429 with a delay) opens it
//!   until T too — and then closes it at once, without probing: a throttled upstream is not a
//!   failing one.
//! * **Half-open**, once [`open_for`](CircuitBreakerLayer::open_for) has passed: exactly
//!   [`half_open_calls`](CircuitBreakerLayer::half_open_calls) probes go through, however many
//!   requests arrive at that instant; the others are refused. All succeed: closed. One fails:
//!   open again, for longer with [`open_growth`](CircuitBreakerLayer::open_growth). A probe whose
//!   caller gives up gives its place back.
//!
//! Refusals by this crate's other layers inside the breaker (a full queue, a user's limit) say
//! nothing about the upstream and are not counted. With
//! [`keyed_by`](CircuitBreakerLayer::keyed_by) each upstream or model has a breaker of its own.
//! The [handle](CircuitBreakerHandle) reads states and stats, forces the breakers open or closed,
//! and resets them. State changes are `tracing` events.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_llm_queue::circuit_breaker::{BreakerState, Window};
//! use tower_llm_queue::{CircuitBreakerLayer, Rejected, RejectionKind};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let layer = CircuitBreakerLayer::new()
//!     .failure_rate(0.5)
//!     .minimum_calls(4)
//!     .window(Window::Calls(10))
//!     .open_for(Duration::from_secs(10));
//! let breaker = layer.handle();
//! let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(|_: ()| async {
//!     Err::<(), tower::BoxError>("upstream down".into())
//! }));
//!
//! for _ in 0..4 {
//!     assert!(svc.ready().await.unwrap().call(()).await.is_err());
//! }
//! let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
//! let rejected = Rejected::find(&*err).unwrap();
//! assert_eq!(rejected.kind(), RejectionKind::CircuitOpen);
//! assert_eq!(rejected.retry_after(), Some(Duration::from_secs(10)));
//! assert!(matches!(breaker.state(), BreakerState::Open { .. }));
//! # }
//! ```

mod future;
mod layer;
mod service;
mod state;

use std::sync::Arc;
use std::time::Duration;

use crate::key::Key;

pub use self::future::ResponseFuture;
pub use self::layer::{CircuitBreakerLayer, OneBreaker};
pub use self::service::CircuitBreaker;

use self::state::Shared;

/// The calls a breaker's rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `n` calls.
    Calls(usize),
    /// The calls that ended within this span of time.
    Time(Duration),
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// Where a breaker stands. Serializes as `{"state": "open", "remaining_ms": 1500.0}`,
/// `{"state": "closed"}`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused for this long still.
    Open {
        /// Time left before probing.
        #[serde(rename = "remaining_ms", serialize_with = "millis")]
        remaining: Duration,
    },
    /// Probes go through; the rest is refused.
    HalfOpen,
    /// Forced open through the handle: every call is refused.
    ForcedOpen,
    /// Forced closed through the handle: every call goes through.
    ForcedClosed,
}

/// Counters of a [`CircuitBreakerLayer`], all breakers together.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BreakerStats {
    /// Calls let through.
    pub calls: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Calls slower than the slow-call limit.
    pub slow: u64,
    /// Calls refused while open or half-open.
    pub rejected: u64,
    /// Times a breaker opened.
    pub opened: u64,
    /// Times a breaker closed again after probing.
    pub closed: u64,
    /// Breakers in memory now (one per key seen recently; idle closed ones are evicted).
    pub keys: usize,
}

/// Reads and controls the breakers of one [`CircuitBreakerLayer`].
#[derive(Clone, Debug)]
pub struct CircuitBreakerHandle {
    shared: Arc<Shared>,
}

impl CircuitBreakerHandle {
    /// The state of the breaker of a layer without `keyed_by`.
    pub fn state(&self) -> BreakerState {
        self.shared.state(&Key::anonymous())
    }

    /// The state of the breaker for `key`.
    pub fn state_of(&self, key: &Key) -> BreakerState {
        self.shared.state(key)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BreakerStats {
        self.shared.stats()
    }

    /// Refuses every call until [`reset`](Self::reset) or [`force_closed`](Self::force_closed).
    pub fn force_open(&self) {
        self.shared.force(true);
    }

    /// Lets every call through until [`reset`](Self::reset) or [`force_open`](Self::force_open).
    pub fn force_closed(&self) {
        self.shared.force(false);
    }

    /// Ends any forcing and closes every breaker, forgetting their history.
    pub fn reset(&self) {
        self.shared.reset();
    }
}

#[cfg(test)]
mod tests;
