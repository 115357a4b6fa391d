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

    /// Keeps the cache in Redis too (feature `redis`), so that a result computed by one process
    /// is served by every process whose store has the same prefix until it expires: the
    /// result, turned into bytes by `codec`, is stored under the key encoded as JSON (keys
    /// must be `serde::Serialize`, and encode alike in every process), for the [`ttl`](Self::ttl)
    /// (without a TTL nothing is cached, here or there).
    ///
    /// The call that a request starts looks in Redis first (one round trip, within the store's
    /// timeout); a result found there is served, and cached in memory for as long as it has
    /// left in Redis. A result the inner service returns is stored after it has been handed to
    /// its waiters. Failures are never stored in Redis (`negative_ttl` caches them in memory
    /// only), nor are responses the codec does not encode. Calls in flight are shared within a
    /// process only: two processes that miss the same key at once both call. When Redis
    /// fails or does not answer in time, the in-memory cache and the inner service answer, as
    /// without a store (whatever the store's [`OnRedisFailure`](crate::store::OnRedisFailure));
    /// [`DedupStats::remote_failures`](super::DedupStats::remote_failures) counts it. A
    /// service whose response type is not the codec's does not use Redis.
    ///
    /// A second store is ignored (and logged): the first stays.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_llm_queue::dedup::JsonCodec;
    /// use tower_llm_queue::store::RedisStore;
    /// use tower_llm_queue::DedupLayer;
    ///
    /// #[derive(Clone, serde::Serialize, serde::Deserialize)]
    /// struct Plan { text: String }
    ///
    /// let store = RedisStore::new("redis://127.0.0.1:6379", "plans:cache")?;
    /// let layer = DedupLayer::new(|(user, prompt): &(u64, String)| Some((*user, prompt.clone())))
    ///     .ttl(Duration::from_secs(300))
    ///     .store(store, JsonCodec::<Plan>::new());
    /// # Ok::<(), redis::RedisError>(())
    /// ```
    #[cfg(feature = "redis")]
    pub fn store<C>(self, store: crate::store::RedisStore, codec: C) -> Self
    where
        K: serde::Serialize,
        C: super::Codec,
    {
        if !self
            .shared
            .set_remote(super::remote::Remote::new(store, codec))
        {
            tracing::warn!("dedup: the layer already has a store; the new one is ignored");
        }
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
