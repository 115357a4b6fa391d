use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::classify::DefaultClassifier;

use super::state::Shared;
use super::{Backoff, Config, RetryBackoff, RetryBudget, RetryHandle};

/// Applies [`RetryBackoff`] to services. See the [module docs](super).
///
/// Every service this layer builds, and every clone of the layer, shares one retry budget and
/// one cool-down.
#[derive(Clone)]
pub struct RetryBackoffLayer<C = DefaultClassifier> {
    shared: Arc<Shared>,
    classify: C,
}

impl RetryBackoffLayer {
    /// Tries a failed call again up to `max_retries` times, with the default [`Backoff`]
    /// (500 ms doubling to at most 30 s, full jitter), the default [`RetryBudget`], a shared
    /// cool-down, and upstream delays of up to 60 seconds honoured.
    pub fn new(max_retries: u32) -> Self {
        RetryBackoffLayer {
            shared: Arc::new(Shared::new(Config {
                max_retries,
                backoff: Backoff::default(),
                max_retry_after: Duration::from_secs(60),
                cooldown: true,
            })),
            classify: DefaultClassifier,
        }
    }
}

impl<C> RetryBackoffLayer<C> {
    /// How the delay grows between attempts.
    pub fn backoff(self, backoff: Backoff) -> Self {
        self.shared.configure(|c| c.backoff = backoff);
        self
    }

    /// Decides which results are failures worth retrying, and the upstream's delay:
    /// [`HttpClassifier`](crate::classify::HttpClassifier) for HTTP, or your own.
    pub fn classify<C2>(self, classify: C2) -> RetryBackoffLayer<C2> {
        RetryBackoffLayer {
            shared: self.shared,
            classify,
        }
    }

    /// When the upstream asks to wait longer than `limit`, give up at once and return its answer
    /// instead of sleeping (default 60 s).
    pub fn max_retry_after(self, limit: Duration) -> Self {
        self.shared.configure(|c| c.max_retry_after = limit);
        self
    }

    /// Limits retries to a share of recent first attempts; see [`RetryBudget`].
    pub fn budget(self, budget: RetryBudget) -> Self {
        self.shared.set_budget(budget);
        self
    }

    /// Whether a "not before" from the upstream makes every request through this layer — first
    /// attempts included — wait until then (default `true`). This is what ends a retry storm:
    /// nobody hits a throttled upstream again before it said to.
    pub fn cooldown(self, enabled: bool) -> Self {
        self.shared.configure(|c| c.cooldown = enabled);
        self
    }

    /// Reads the layer's stats.
    pub fn handle(&self) -> RetryHandle {
        RetryHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C: Clone> Layer<S> for RetryBackoffLayer<C> {
    type Service = RetryBackoff<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryBackoff {
            inner,
            shared: self.shared.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<C> fmt::Debug for RetryBackoffLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBackoffLayer")
            .field("config", &self.shared.config())
            .finish_non_exhaustive()
    }
}
