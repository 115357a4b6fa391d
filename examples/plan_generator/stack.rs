//! The layers around the upstream client: every generation passes through them.
//!
//! ```text
//! breaker ─ timeout ─ retry ─ client
//! ```
//!
//! This server answers an unavailable upstream with an offline plan rather than an error, and
//! that decides the order — the breaker outside the retry layer, where the README's general
//! advice puts it inside:
//!
//! * The breaker outermost: open, it refuses at once, and the offline plan is served at once.
//!   Inside the retry layer, a request would first wait out the retry layer's shared cool-down
//!   (up to `PLAN_MAX_RETRY_WAIT_MS`) only to meet the open breaker. It counts whole
//!   generations: one that still fails after its retries, or runs out of time, is one failure,
//!   and 5 in a minute, half of them failed, open it for `BREAKER_OPEN_MS`; then its probes go
//!   through. An upstream's "not before T" beyond what the retry layer waits for opens it until
//!   T.
//! * The timeout bounds a generation, retries included (`PLAN_TIMEOUT_MS`), and one out of time
//!   counts against the upstream.
//! * Retry innermost: backoff, and the upstream's `Retry-After` honoured up to
//!   `PLAN_MAX_RETRY_WAIT_MS` — for everybody (the shared cool-down), so that a short throttle
//!   delays plans by a moment instead of turning them into offline ones. A longer wait is given
//!   up at once: the offline plan.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::Full;
use tower::timeout::TimeoutLayer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_llm_queue::circuit_breaker::{CircuitBreakerHandle, Window};
use tower_llm_queue::classify::HttpClassifier;
use tower_llm_queue::retry::{Backoff, Jitter, RetryHandle};
use tower_llm_queue::{CircuitBreakerLayer, RetryBackoffLayer};
use tower_llm_queue_servers::upstream::UpstreamClient;

use super::config::PlanConfig;

/// A request to the upstream.
pub type UpstreamRequest = http::Request<Full<Bytes>>;

/// The upstream behind its layers: cloneable, and `Send` and `Sync` for axum's state.
pub type Llm = BoxCloneSyncService<UpstreamRequest, http::Response<Body>, BoxError>;

/// Reads the upstream layers.
#[derive(Debug, Clone)]
pub struct UpstreamHandles {
    /// The retries.
    pub retry: RetryHandle,
    /// The breaker.
    pub breaker: CircuitBreakerHandle,
}

/// Builds the upstream stack around `client`.
pub fn upstream(config: &PlanConfig, client: UpstreamClient) -> (Llm, UpstreamHandles) {
    let retry = RetryBackoffLayer::new(config.retry_attempts)
        .classify(HttpClassifier)
        .max_retry_after(config.max_retry_wait)
        .backoff(
            Backoff::exponential(config.retry_backoff, 2.0, Duration::from_secs(8))
                .jitter(Jitter::Full),
        );
    let breaker = CircuitBreakerLayer::new()
        .classify(HttpClassifier)
        .minimum_calls(5)
        .window(Window::Time(Duration::from_secs(60)))
        .open_for(config.breaker_open_for);
    let handles = UpstreamHandles {
        retry: retry.handle(),
        breaker: breaker.handle(),
    };
    let llm = ServiceBuilder::new()
        .layer(breaker)
        .layer(TimeoutLayer::new(config.plan_timeout))
        .layer(retry)
        .service(client)
        .map_response(|response| response.map(Body::new));
    (BoxCloneSyncService::new(llm), handles)
}
