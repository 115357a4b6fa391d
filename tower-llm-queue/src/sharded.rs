//! A map from [`Key`] to per-key state, split into independently locked shards so that requests
//! of different keys rarely wait for each other.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::key::Key;

/// The hasher of every map in this crate: fast, and seeded at random so that keys chosen by
/// clients cannot be lined up into one bucket.
pub(crate) type Hasher = foldhash::fast::RandomState;

/// A `HashMap` with [`Hasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, Hasher>;

/// Locks a mutex, ignoring poisoning: every critical section in this crate leaves its data
/// consistent before anything that could panic, so a poisoned lock still guards valid state.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fewest new keys a shard takes in between two sweeps.
pub(crate) const SWEEP_AT_LEAST: usize = 256;

/// Per-key state in shards. Callers remove a key's entry as soon as it holds nothing, and call
/// [`shrink`] afterwards so that memory returns to baseline once keys have gone.
pub(crate) struct Sharded<V> {
    shards: Box<[Mutex<FastMap<Key, V>>]>,
    /// New keys per shard since its last sweep (see [`Sharded::lock_sweeping`]).
    grown: Box<[AtomicUsize]>,
    /// Picks the shard; seeded apart from the maps' own hashers, and read from the hash's middle
    /// bits, so that the keys of one shard still spread over its map's buckets.
    hasher: Hasher,
}

impl<V> Sharded<V> {
    pub(crate) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let count = (cores * 4).next_power_of_two();
        Sharded {
            shards: (0..count).map(|_| Mutex::new(FastMap::default())).collect(),
            grown: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            hasher: Hasher::default(),
        }
    }

    /// The locked shard that holds `key`, swept first of the entries for which `idle` is true
    /// when `key` is new to it and the shard has taken in as many new keys as it kept at its
    /// last sweep (and at least [`SWEEP_AT_LEAST`]). Each sweep is paid for by the insertions
    /// before it, so the cost is amortized O(1), and a shard never holds much more than twice
    /// its live keys. `idle` may update an entry that it keeps.
    pub(crate) fn lock_sweeping(
        &self,
        key: &Key,
        idle: impl FnMut(&mut V) -> bool,
    ) -> MutexGuard<'_, FastMap<Key, V>> {
        let (index, mut shard) = self.lock_indexed(key);
        self.sweep_if_due(index, &mut shard, key, idle);
        shard
    }

    /// The sweep of [`Sharded::lock_sweeping`], for a caller that already holds shard `index`
    /// (and must read something, such as the clock, under its lock first).
    pub(crate) fn sweep_if_due(
        &self,
        index: usize,
        shard: &mut FastMap<Key, V>,
        key: &Key,
        mut idle: impl FnMut(&mut V) -> bool,
    ) {
        if shard.contains_key(key) {
            return;
        }
        let grown = self.grown[index].fetch_add(1, Relaxed) + 1;
        let kept = (shard.len() + 1).saturating_sub(grown);
        if grown >= SWEEP_AT_LEAST.max(kept) {
            shard.retain(|_, value| !idle(value));
            shrink(shard);
            self.grown[index].store(0, Relaxed);
        }
    }

    /// The locked shard that holds `key`.
    pub(crate) fn lock(&self, key: &Key) -> MutexGuard<'_, FastMap<Key, V>> {
        self.lock_indexed(key).1
    }

    /// The locked shard that holds `key`, and its index (below [`Sharded::shard_count`]).
    pub(crate) fn lock_indexed(&self, key: &Key) -> (usize, MutexGuard<'_, FastMap<Key, V>>) {
        let index = (self.hasher.hash_one(key) >> 32) as usize & (self.shards.len() - 1);
        (index, lock(&self.shards[index]))
    }

    /// Visits every shard in turn, each locked while `f` runs.
    pub(crate) fn for_each_shard(&self, mut f: impl FnMut(&mut FastMap<Key, V>)) {
        for shard in self.shards.iter() {
            f(&mut lock(shard));
        }
    }
}

impl<V> std::fmt::Debug for Sharded<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharded")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// Gives memory back when a map has become mostly empty. Amortised O(1) per removal.
pub(crate) fn shrink<K, V, S>(map: &mut HashMap<K, V, S>)
where
    K: Eq + std::hash::Hash,
    S: BuildHasher,
{
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

impl<V> Sharded<V> {
    /// The number of keys held.
    pub(crate) fn len(&self) -> usize {
        let mut total = 0;
        self.for_each_shard(|map| total += map.len());
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_returns_after_many_keys() {
        let map: Sharded<u32> = Sharded::new();
        for i in 0..10_000u64 {
            map.lock(&Key::from(i)).insert(Key::from(i), 1);
        }
        assert_eq!(map.len(), 10_000);
        for i in 0..10_000u64 {
            let mut shard = map.lock(&Key::from(i));
            shard.remove(&Key::from(i));
            shrink(&mut shard);
        }
        let mut capacity = 0;
        map.for_each_shard(|m| capacity += m.capacity());
        assert_eq!(map.len(), 0);
        assert!(capacity <= map.shards.len() * 64, "capacity {capacity}");
    }
}
