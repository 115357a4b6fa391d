use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::flight::Shared;
use super::{Dedup, DedupHandle};

/// Applies [`Dedup`] to services. See the [module docs](super).
///
/// Every service this layer builds, and every clone of the layer, shares one set of calls in
/// flight and one cache.
#[derive(Clone)]
pub struct DedupLayer<F, K> {
    shared: Arc<Shared<K>>,
    key_fn: F,
}

impl<F, K> DedupLayer<F, K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Requests for which `key_fn` returns the same `Some(key)` while a call for that key is in
    /// flight share that call; `None` is never shared. Without [`ttl`](Self::ttl) nothing is
    /// cached.
    pub fn new<Req>(key_fn: F) -> Self
    where
        F: Fn(&Req) -> Option<K>,
    {
        DedupLayer {
            shared: Arc::new(Shared::new()),
            key_fn,
        }
    }

    /// Serves a successful result from the cache for `ttl` after it arrived.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.shared.set_ttl(ttl);
        self
    }

    /// Serves a failure from the cache for `ttl` too (by default failures are never cached), as
    /// a [`CallFailed`](super::CallFailed). Panics are never cached.
    pub fn negative_ttl(self, ttl: Duration) -> Self {
        self.shared.set_negative_ttl(ttl);
        self
    }

    /// Keeps at most `n` results in the cache (default 10,000), evicting the least useful
    /// first. Set it before the first request.
    pub fn max_entries(self, n: usize) -> Self {
        self.shared.set_max_entries(n);
        self
    }

    /// Reads the layer's stats.
    pub fn handle(&self) -> DedupHandle<K> {
        DedupHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, F: Clone, K> Layer<S> for DedupLayer<F, K> {
    type Service = Dedup<S, F, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Dedup {
            inner,
            shared: self.shared.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

impl<F, K> fmt::Debug for DedupLayer<F, K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupLayer")
            .field("ttl", &self.shared.ttl())
            .field("max_entries", &self.shared.max_entries())
            .finish_non_exhaustive()
    }
}
