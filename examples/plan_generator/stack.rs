//! The layers around the upstream client: every attempt to call the LLM passes through them.
//!
//! ```text
//! timeout ─ retry ─ breaker ─ client
//! ```
//!
//! * The timeout bounds a whole generation, retries included (`PLAN_TIMEOUT_MS`).
//! * Retry outside the breaker: a retry sleeps holding nothing, honours the upstream's
//!   `Retry-After` up to `PLAN_MAX_RETRY_WAIT_MS` (and makes every request wait that long: the
//!   shared cool-down), and gives up at once beyond it — the offline plan is then served.
//! * The breaker counts every attempt, so an upstream that fails opens it after a few; open, it
//!   refuses at once (and the offline plan is served) until its probes succeed. An upstream's
//!   "not before T" opens it until T.

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
        .layer(TimeoutLayer::new(config.plan_timeout))
        .layer(retry)
        .layer(breaker)
        .service(client)
        .map_response(|response| response.map(Body::new));
    (BoxCloneSyncService::new(llm), handles)
}
