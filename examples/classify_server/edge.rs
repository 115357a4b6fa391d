//! The layers around both servers — the same values, so that HTTP and gRPC share one limit:
//!
//! ```text
//! shutdown gate ─ timeout (tower's) ─ token bucket ─ handlers ─ workers' queue ─ upstream
//! ```
//!
//! The token bucket refuses the excess at once (429 / `RESOURCE_EXHAUSTED`); health checks cost
//! nothing against it, so that a server under load still answers them. While the server shuts
//! down, the gate answers 503 / `UNAVAILABLE`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tower::filter::FilterLayer;
use tower::timeout::TimeoutLayer;
use tower_llm_queue::rate::{Cost, Global, Rate};
use tower_llm_queue::{Rejected, RejectionKind, TokenBucketLayer};

use super::config::ClassifyConfig;

/// Whether a path is a health or status check, over either protocol.
pub fn is_health(path: &str) -> bool {
    matches!(path, "/health" | "/status" | "/queue/health") || path.starts_with("/grpc.health.")
}

/// What a request costs against the token bucket: nothing for a health check, 1 otherwise —
/// for a request of either protocol.
#[derive(Debug, Clone, Copy)]
pub struct HealthFree;

impl<B> Cost<http::Request<B>> for HealthFree {
    fn cost(&self, request: &http::Request<B>) -> u64 {
        u64::from(!is_health(request.uri().path()))
    }
}

/// The layers both servers share, and the switch that starts the shutdown.
#[derive(Debug, Clone)]
pub struct Edge {
    draining: Arc<AtomicBool>,
    /// Seed 004's token bucket.
    pub bucket: TokenBucketLayer<Global, HealthFree>,
    /// Seed 004's request timeout.
    pub timeout: TimeoutLayer,
}

/// The refusal of a request that arrives while the server shuts down.
fn shutting_down() -> Rejected {
    Rejected::new(RejectionKind::QueueFull).with_message("the server is shutting down")
}

impl Edge {
    /// The layers for `config`.
    pub fn new(config: &ClassifyConfig) -> Self {
        let rate = Rate::per_second(u32::try_from(config.rate_per_second).unwrap_or(u32::MAX));
        Edge {
            draining: Arc::default(),
            bucket: TokenBucketLayer::new(rate, config.burst).cost(HealthFree),
            timeout: TimeoutLayer::new(config.request_timeout),
        }
    }

    /// These layers, or none with `LAYERS=off`.
    pub fn layers(&self, on: bool) -> Option<&Edge> {
        on.then_some(self)
    }

    /// Refuses every request from now on: the server is shutting down.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The gate that refuses requests once [`Edge::drain`] was called.
    pub fn gate<B>(
        &self,
    ) -> FilterLayer<impl Fn(http::Request<B>) -> Result<http::Request<B>, Rejected> + Clone> {
        let draining = self.draining.clone();
        FilterLayer::new(move |request| match draining.load(Ordering::SeqCst) {
            true => Err(shutting_down()),
            false => Ok(request),
        })
    }
}
