use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::classify::DefaultClassifier;
use crate::key::Key;

use super::state::{Config, Shared};
use super::{CircuitBreaker, CircuitBreakerHandle, Window};

/// The key of a layer without [`keyed_by`](CircuitBreakerLayer::keyed_by): one breaker for all.
#[derive(Debug, Clone, Copy, Default)]
pub struct OneBreaker;

impl<Req> crate::key::ExtractKey<Req> for OneBreaker {
    fn extract(&self, _: &Req) -> Result<Key, crate::Rejected> {
        Ok(Key::anonymous())
    }
}

/// Applies [`CircuitBreaker`] to services. See the [module docs](super).
///
/// Every service this layer builds, and every clone of the layer, shares the same breakers.
#[derive(Clone)]
pub struct CircuitBreakerLayer<C = DefaultClassifier, E = OneBreaker> {
    shared: Arc<Shared>,
    classify: C,
    key: E,
}

impl CircuitBreakerLayer {
    /// A breaker that opens when at least half of the last 100 calls failed (once 20 calls have
    /// been seen), stays open 30 seconds, then lets 3 probes through; a "not before" from the
    /// upstream opens it until then.
    pub fn new() -> Self {
        CircuitBreakerLayer {
            shared: Arc::new(Shared::new(Config {
                failure_rate: 0.5,
                slow_call: None,
                minimum_calls: 20,
                window: Window::Calls(100),
                open_for: Duration::from_secs(30),
                open_growth: 1.0,
                max_open_for: Duration::from_secs(30),
                half_open_calls: 3,
                open_on_not_before: true,
                count_client_errors: false,
            })),
            classify: DefaultClassifier,
            key: OneBreaker,
        }
    }
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C, E> CircuitBreakerLayer<C, E> {
    /// Opens when this share of the calls in the window failed (default 0.5).
    pub fn failure_rate(self, rate: f64) -> Self {
        self.shared
            .configure(|c| c.failure_rate = rate.clamp(0.0, 1.0));
        self
    }

    /// Also opens when `rate` of the calls in the window took `limit` or longer.
    pub fn slow_call(self, limit: Duration, rate: f64) -> Self {
        self.shared
            .configure(|c| c.slow_call = Some((limit, rate.clamp(0.0, 1.0))));
        self
    }

    /// Decides nothing before the window holds this many calls (default 20).
    pub fn minimum_calls(self, n: usize) -> Self {
        self.shared.configure(|c| c.minimum_calls = n.max(1));
        self
    }

    /// The calls the rates are computed over: the last `n`, or those of the last span of time
    /// (default: the last 100 calls).
    pub fn window(self, window: Window) -> Self {
        self.shared.configure(|c| c.window = window);
        self
    }

    /// How long the breaker stays open before probing (default 30 s).
    pub fn open_for(self, duration: Duration) -> Self {
        self.shared.configure(|c| {
            c.open_for = duration;
            c.max_open_for = c.max_open_for.max(duration);
        });
        self
    }

    /// Makes each consecutive trip stay open `factor` times longer than the last, up to `max`
    /// (default: always `open_for`). A full recovery starts over.
    pub fn open_growth(self, factor: f64, max: Duration) -> Self {
        let factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            1.0
        };
        self.shared.configure(|c| {
            c.open_growth = factor;
            c.max_open_for = max;
        });
        self
    }

    /// How many probes half-open lets through — exactly that many, however many requests
    /// arrive — and how many must succeed to close (default 3).
    pub fn half_open_calls(self, n: u32) -> Self {
        self.shared.configure(|c| c.half_open_calls = n.max(1));
        self
    }

    /// Whether an upstream's "not before T" opens the breaker until T (default `true`).
    pub fn open_on_not_before(self, enabled: bool) -> Self {
        self.shared.configure(|c| c.open_on_not_before = enabled);
        self
    }

    /// Whether a client error ([`Outcome::ClientError`](crate::classify::Outcome::ClientError):
    /// a 400, 401, 404, 422, ...) counts as a failure (default `false`). It says nothing about
    /// the upstream's health — four bad requests should not shut the upstream off for
    /// everybody — so by default it counts neither way.
    pub fn count_client_errors(self, enabled: bool) -> Self {
        self.shared.configure(|c| c.count_client_errors = enabled);
        self
    }

    /// Decides which results are failures: [`HttpClassifier`](crate::classify::HttpClassifier)
    /// for HTTP, or your own.
    pub fn classify<C2>(self, classify: C2) -> CircuitBreakerLayer<C2, E> {
        CircuitBreakerLayer {
            shared: self.shared,
            classify,
            key: self.key,
        }
    }

    /// One breaker per key — per upstream, region or model — instead of one for all.
    pub fn keyed_by<E2>(self, key: E2) -> CircuitBreakerLayer<C, E2> {
        CircuitBreakerLayer {
            shared: self.shared,
            classify: self.classify,
            key,
        }
    }

    /// Reads and controls the breakers.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C: Clone, E: Clone> Layer<S> for CircuitBreakerLayer<C, E> {
    type Service = CircuitBreaker<S, C, E>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            key: self.key.clone(),
        }
    }
}

impl<C, E> fmt::Debug for CircuitBreakerLayer<C, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("config", &self.shared.config())
            .finish_non_exhaustive()
    }
}
