//! Retries with exponential backoff and jitter that respect what the upstream says: its
//! `Retry-After` (in every form LLM APIs use), a retry budget, and a cool-down shared by every
//! request, so that throttled clients stop retrying in lockstep.
//!
//! For each call:
//!
//! 1. While a cool-down is in force (an upstream said "not before T"), wait until T — first
//!    attempts too.
//! 2. Call the inner service with a clone of the request (one clone per attempt) and classify
//!    the result ([`crate::classify`]).
//! 3. A success, a failure that is not retryable, or the last allowed attempt returns the
//!    upstream's own answer: outer layers and the user see the real cause.
//! 4. A retryable failure whose delay exceeds [`max_retry_after`](RetryBackoffLayer::max_retry_after)
//!    returns at once; one that finds the [`RetryBudget`] spent returns too.
//! 5. Otherwise wait the larger of the backoff and the upstream's delay — never less than it
//!    asked — and go back to 1.
//!
//! The shared cool-down of step 1 is for the upstream's own throttling. A delay carried by a
//! refusal of this crate's layers inside this one (a user's spent window, a full queue) concerns
//! that request or its key only: it delays that request's retry, and nobody else's. A discarded
//! failure is dropped before the wait, so a streamed body — and any slot held with it — is
//! released at once; a service whose `poll_ready` failed is replaced by a fresh clone.
//!
//! Requests must be `Clone`; for an `http::Request` whose body is not, put a
//! [`BufferRequestLayer`](crate::buffer::BufferRequestLayer) outside this layer.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_llm_queue::retry::{Backoff, Jitter};
//! use tower_llm_queue::classify::HttpClassifier;
//! use tower_llm_queue::RetryBackoffLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // Seed 000: three retries after 2, 4 and 8 seconds on 429/5xx, none on 400/401.
//! let layer = RetryBackoffLayer::new(3)
//!     .backoff(Backoff::exponential(Duration::from_secs(2), 2.0, Duration::from_secs(60)))
//!     .classify(HttpClassifier);
//! let stats = layer.handle();
//! let mut calls = 0;
//! let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(move |_: ()| {
//!     calls += 1;
//!     let status = if calls < 3 { 503 } else { 200 };
//!     async move { Ok::<_, tower::BoxError>(http::Response::builder().status(status).body(()).unwrap()) }
//! }));
//!
//! let started = tokio::time::Instant::now();
//! let response = svc.ready().await?.call(()).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(started.elapsed(), Duration::from_secs(2 + 4));
//! assert_eq!(stats.stats().retries, 2);
//! # Ok(())
//! # }
//! ```

mod backoff;
mod budget;
mod future;
mod layer;
mod service;
mod state;

use std::sync::Arc;
use std::time::Duration;

pub use self::backoff::{Backoff, Jitter};
pub use self::budget::RetryBudget;
pub use self::future::ResponseFuture;
pub use self::layer::RetryBackoffLayer;
pub use self::service::RetryBackoff;

use self::state::Shared;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    max_retries: u32,
    backoff: Backoff,
    max_retry_after: Duration,
    cooldown: bool,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// Counters of a [`RetryBackoffLayer`], for health endpoints and dashboards.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetryStats {
    /// Calls made through the layer (first attempts).
    pub calls: u64,
    /// Retries made.
    pub retries: u64,
    /// Calls that ended in a success.
    pub succeeded: u64,
    /// Calls that ended in a failure not retryable, or after the last allowed retry.
    pub failed: u64,
    /// Calls that returned their failure because the retry budget was spent.
    pub budget_exhausted: u64,
    /// Calls that returned their failure because the upstream asked to wait too long.
    pub retry_after_too_long: u64,
    /// Attempts that waited for a shared cool-down.
    pub cooled_down: u64,
    /// Time left in the current cool-down.
    #[serde(rename = "cooldown_remaining_ms", serialize_with = "millis")]
    pub cooldown_remaining: Duration,
}

/// Reads the state of one [`RetryBackoffLayer`].
#[derive(Clone, Debug)]
pub struct RetryHandle {
    shared: Arc<Shared>,
}

impl RetryHandle {
    /// A snapshot of the counters.
    pub fn stats(&self) -> RetryStats {
        self.shared.stats()
    }
}

#[cfg(test)]
mod tests;
