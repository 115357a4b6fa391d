//! The dedup cache in Redis: results stored as bytes by a [`Codec`], under their key encoded
//! as JSON, with the cache's TTL as their expiry (feature `redis`).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use crate::store::RedisStore;

use super::codec::Codec;

/// How a key is named in the store: its JSON.
type KeyName<K> = Box<dyn Fn(&K) -> Option<String> + Send + Sync>;

/// The store, how keys are named in it, and the codec, whose response type is known only to
/// the services: `Arc<dyn Codec<Response = R>>` as `Any`.
pub(super) struct Remote<K> {
    store: RedisStore,
    name: KeyName<K>,
    codec: Box<dyn Any + Send + Sync>,
}

impl<K> Remote<K> {
    pub(super) fn new<C>(store: RedisStore, codec: C) -> Self
    where
        K: serde::Serialize,
        C: Codec,
    {
        let codec: Arc<dyn Codec<Response = C::Response>> = Arc::new(codec);
        Remote {
            store,
            name: Box::new(|key: &K| serde_json::to_string(key).ok()),
            codec: Box::new(codec),
        }
    }

    /// The cache entry of `key` for a service whose responses are `R`; `None` if the codec is
    /// for another type, or the key cannot be encoded.
    pub(super) fn entry<R: 'static>(&self, key: &K) -> Option<Entry<R>> {
        let codec = self
            .codec
            .downcast_ref::<Arc<dyn Codec<Response = R>>>()?
            .clone();
        let name = (self.name)(key)?;
        Some(Entry {
            store: self.store.clone(),
            key: self.store.key(&format!("d:{name}")),
            codec,
        })
    }
}

/// One key's entry in Redis, for responses of type `R`.
pub(super) struct Entry<R> {
    store: RedisStore,
    key: String,
    codec: Arc<dyn Codec<Response = R>>,
}

/// What a lookup found.
pub(super) enum Lookup<R> {
    /// A response, and how long it stays in the cache.
    Hit(R, Duration),
    Miss,
    /// Redis failed or did not answer in time.
    Failed(String),
}

impl<R: 'static> Entry<R> {
    pub(super) async fn get(&self) -> Lookup<R> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&self.key).cmd("PTTL").arg(&self.key);
        match self.store.query::<(Option<Vec<u8>>, i64)>(&pipe).await {
            Ok((Some(bytes), left)) if left > 0 => {
                let left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
                match self.codec.decode(&bytes) {
                    Some(response) => Lookup::Hit(response, left),
                    None => {
                        tracing::warn!(
                            "dedup: a cached result in Redis cannot be decoded; calling"
                        );
                        Lookup::Miss
                    }
                }
            }
            Ok(_) => Lookup::Miss,
            Err(err) => Lookup::Failed(err),
        }
    }

    /// The response as bytes, if the codec stores it.
    pub(super) fn encode(&self, response: &R) -> Option<Vec<u8>> {
        self.codec.encode(response)
    }

    /// Stores `bytes` for `ttl`, between a millisecond and
    /// [`MAX_PERIOD`](crate::rate::MAX_PERIOD) (an expiry Redis accepts).
    pub(super) async fn put(&self, bytes: Vec<u8>, ttl: Duration) -> Result<(), String> {
        let ttl = ttl.min(crate::rate::MAX_PERIOD);
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&self.key)
            .arg(bytes)
            .arg("PX")
            .arg(millis)
            .ignore();
        self.store.query::<()>(&pipe).await
    }
}
