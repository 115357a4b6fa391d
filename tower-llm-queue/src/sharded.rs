//! A map from [`Key`] to per-key state, split into independently locked shards so that requests
//! of different keys rarely wait for each other.

use std::collections::HashMap;
use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::key::Key;

/// The hasher of every map in this crate: fast, and seeded at random so that keys chosen by
/// clients cannot be lined up into one bucket.
pub(crate) type Hasher = foldhash::fast::RandomState;

/// A `HashMap` with [`Hasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, Hasher>;

/// The mutex of every lock in this crate: `parking_lot`'s, which takes and lets go of an
/// uncontended lock in one atomic operation each and keeps no poison flag (every critical
/// section here leaves its data consistent before anything that could panic, so a lock whose
/// holder panicked still guards valid state), where the standard library's checks whether the
/// thread is panicking on each.
pub(crate) type Mutex<T> = parking_lot::Mutex<T>;

/// The guard of a locked [`Mutex`].
pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;

/// Locks a mutex.
#[inline]
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock()
}

/// A value on cache lines of its own, so that threads writing it do not slow down those that
/// read or write its neighbours (two lines: CPUs fetch lines in adjacent pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// The fewest new keys a shard takes in between two sweeps.
pub(crate) const SWEEP_AT_LEAST: usize = 256;

/// Whether a map of `len` entries, `new` of them made since its last sweep of idle ones, is due
/// for the next: once the new outnumber those the sweep kept, and at least [`SWEEP_AT_LEAST`]
/// came. Each sweep is then paid for by the insertions before it (amortized O(1)), and a map
/// never holds much more than twice its live keys.
pub(crate) fn sweep_due(new: usize, len: usize) -> bool {
    new >= SWEEP_AT_LEAST.max(len.saturating_sub(new))
}

/// The hash of [`Key::anonymous`] in every map of this module.
const ANONYMOUS_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

/// Per-key state in shards. A key is hashed once per lookup: the hash picks the shard and finds
/// the key in it ([`Sharded::lock`] gives a [`Place`] that keeps both). Entries that have become
/// idle are dropped by the sweeps that new keys bring ([`Place::get_or_insert_with`]).
pub(crate) struct Sharded<V, T = ()> {
    shards: Box<[LockedShard<V, T>]>,
    /// Picks the shard (from the hash's middle bits) and places the key in it (hashbrown reads
    /// the low and the top bits), so that the keys of one shard still spread over its buckets.
    hasher: Hasher,
}

/// A count kept in each shard, under its lock ([`Place::tally`]): it costs no atomic operation,
/// and the shards add up to the exact total.
#[derive(Debug, Default)]
pub(crate) struct Count(u64);

impl Count {
    /// Adds `n`, and gives the new count (which wraps around).
    pub(crate) fn add(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(n);
        self.0
    }

    pub(crate) fn get(&self) -> u64 {
        self.0
    }
}

/// A shard behind its lock, on cache lines of its own.
type LockedShard<V, T> = Padded<Mutex<Shard<V, T>>>;

/// The entries of one shard, each with its key and the key's hash.
pub(crate) struct Shard<V, T = ()> {
    entries: HashTable<(u64, Key, V)>,
    /// Values of swept entries, kept for new keys (see [`Place::get_or_reuse`]).
    spare: Vec<V>,
    /// New keys since the last sweep (see [`Place::get_or_insert_with`]).
    new_keys: usize,
    /// What the caller keeps per shard under its lock, such as counts (see [`Place::tally`]).
    tally: T,
}

impl<V, T> Shard<V, T> {
    /// What the caller keeps in this shard (see [`Place::tally`]).
    pub(crate) fn tally(&self) -> &T {
        &self.tally
    }

    /// The number of keys held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops every entry.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Drops the entries for which `idle` is true, as the sweeps that new keys bring do, and
    /// the values kept for reuse.
    pub(crate) fn sweep(&mut self, idle: impl FnMut(&mut V) -> bool) {
        sweep(&mut self.entries, idle, 0);
        self.spare = Vec::new();
    }

    /// The values held.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.entries.iter().map(|(_, _, value)| value)
    }

    /// Room allocated for entries.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.entries.capacity()
    }
}

impl<V, T: Default> Sharded<V, T> {
    pub(crate) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let count = (cores * 4).next_power_of_two();
        Sharded {
            shards: (0..count)
                .map(|_| {
                    Padded(Mutex::new(Shard {
                        entries: HashTable::new(),
                        spare: Vec::new(),
                        new_keys: 0,
                        tally: T::default(),
                    }))
                })
                .collect(),
            hasher: Hasher::default(),
        }
    }
}

impl<V, T> Sharded<V, T> {
    /// The locked shard that holds `key`, with the key's place in it.
    pub(crate) fn lock<'a>(&'a self, key: &'a Key) -> Place<'a, V, T> {
        // The anonymous key — the only key of a layer without `keyed_by` — is one key alone:
        // any fixed hash serves it, and computing none spares every one of its requests.
        let hash = if key.is_anonymous() {
            ANONYMOUS_HASH
        } else {
            self.hasher.hash_one(key)
        };
        let index = (hash >> 32) as usize & (self.shards.len() - 1);
        Place {
            index,
            hash,
            key,
            shard: lock(&self.shards[index]),
        }
    }

    /// The number of shards: [`Place::index`] is below it.
    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Visits every shard in turn, each locked while `f` runs.
    pub(crate) fn for_each_shard(&self, mut f: impl FnMut(&mut Shard<V, T>)) {
        for shard in self.shards.iter() {
            f(&mut lock(shard));
        }
    }

    /// The number of keys held.
    pub(crate) fn len(&self) -> usize {
        let mut total = 0;
        self.for_each_shard(|shard| total += shard.len());
        total
    }
}

/// One key's place in its locked shard: the entry, if there is one, found by the hash computed
/// when the shard was locked.
pub(crate) struct Place<'a, V, T = ()> {
    index: usize,
    hash: u64,
    key: &'a Key,
    shard: MutexGuard<'a, Shard<V, T>>,
}

impl<V, T> Place<'_, V, T> {
    /// The index of the key's shard, for state a caller keeps per shard beside the map.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// What the caller keeps in the key's shard, under its lock: counts kept here cost no
    /// atomic operation.
    pub(crate) fn tally(&mut self) -> &mut T {
        &mut self.shard.tally
    }

    /// The key's entry.
    pub(crate) fn get(&mut self) -> Option<&mut V> {
        let key = self.key;
        self.shard
            .entries
            .find_mut(self.hash, |(_, k, _)| k == key)
            .map(|(_, _, value)| value)
    }

    /// The key's entry, made with `new` if there is none. Before a new key's entry is made, when
    /// its shard is due for a sweep ([`sweep_due`]), the shard drops the entries for which
    /// `idle` is true. `idle` may update an entry that it keeps.
    pub(crate) fn get_or_insert_with(
        &mut self,
        idle: impl FnMut(&mut V) -> bool,
        new: impl FnOnce() -> V,
    ) -> &mut V {
        self.insert_with(idle, false, new)
    }

    /// [`get_or_insert_with`](Self::get_or_insert_with) for values worth keeping (an
    /// allocation) that an idle entry leaves as good as new: a sweep keeps the values of the
    /// entries it drops, as many as the shard keeps entries (and at least [`SWEEP_AT_LEAST`]),
    /// and a new key takes one of them before it makes one with `new`.
    pub(crate) fn get_or_reuse(
        &mut self,
        idle: impl FnMut(&mut V) -> bool,
        new: impl FnOnce() -> V,
    ) -> &mut V {
        self.insert_with(idle, true, new)
    }

    fn insert_with(
        &mut self,
        mut idle: impl FnMut(&mut V) -> bool,
        reuse: bool,
        new: impl FnOnce() -> V,
    ) -> &mut V {
        let (hash, key) = (self.hash, self.key);
        let Shard {
            entries,
            spare,
            new_keys,
            ..
        } = &mut *self.shard;
        let entries = match entries.find_entry(hash, |(_, k, _)| k == key) {
            Ok(entry) => return &mut entry.into_mut().2,
            Err(absent) => absent.into_table(),
        };
        *new_keys += 1;
        if sweep_due(*new_keys, entries.len() + 1) {
            if reuse {
                let room = SWEEP_AT_LEAST.max(entries.len());
                for (_, _, value) in entries.extract_if(|(_, _, value)| idle(value)) {
                    if spare.len() < room {
                        spare.push(value);
                    }
                }
                shrink_table(entries, SWEEP_AT_LEAST);
            } else {
                sweep(entries, idle, SWEEP_AT_LEAST);
            }
            *new_keys = 0;
        }
        let value = match reuse.then(|| spare.pop()).flatten() {
            Some(value) => value,
            None => new(),
        };
        let entry = entries.insert_unique(hash, (hash, key.clone(), value), |(hash, _, _)| *hash);
        &mut entry.into_mut().2
    }
}

/// Drops the entries for which `idle` is true, and gives memory back if the table has become
/// mostly empty. `idle` may update an entry that it keeps.
fn sweep<V>(
    entries: &mut HashTable<(u64, Key, V)>,
    mut idle: impl FnMut(&mut V) -> bool,
    floor: usize,
) {
    entries.retain(|(_, _, value)| !idle(value));
    shrink_table(entries, floor);
}

/// Gives memory back if the table has become mostly empty (see [`shrink_to`]), keeping room
/// for `floor` entries: a sweep that new keys bring keeps room for those that will come
/// before the next one, rather than growing the table again key by key.
fn shrink_table<V>(entries: &mut HashTable<(u64, Key, V)>, floor: usize) {
    if let Some(to) = shrink_above(entries.len(), entries.capacity(), floor) {
        entries.shrink_to(to, |(hash, _, _)| *hash);
    }
}

/// [`shrink_to`], keeping room for `floor` entries: `None` unless that still gives memory back.
pub(crate) fn shrink_above(len: usize, capacity: usize, floor: usize) -> Option<usize> {
    shrink_to(len, capacity)
        .map(|to| to.max(floor))
        .filter(|&to| to < capacity)
}

impl<V, T> std::fmt::Debug for Sharded<V, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharded")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// The capacity a collection of `len` items in `capacity` places should shrink to, once it has
/// become mostly empty: the rule of every map, table and list in this crate that gives memory
/// back, amortised O(1) per removal.
pub(crate) fn shrink_to(len: usize, capacity: usize) -> Option<usize> {
    (capacity > SMALL && len * 4 < capacity).then_some(len * 2)
}

/// The capacity up to which a collection never gives memory back.
pub(crate) const SMALL: usize = 64;

/// Gives memory back when a map has become mostly empty (see [`shrink_to`]), keeping room for
/// `floor` entries.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn shrink<K, V, S>(map: &mut HashMap<K, V, S>, floor: usize)
where
    K: Eq + std::hash::Hash,
    S: BuildHasher,
{
    if let Some(to) = shrink_above(map.len(), map.capacity(), floor) {
        map.shrink_to(to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adds `key`, sweeping its shard first of the entries `idle` picks.
    fn arrive(map: &Sharded<u32>, key: u64, value: u32, idle: impl FnMut(&mut u32) -> bool) {
        let key = Key::from(key);
        *map.lock(&key).get_or_insert_with(idle, || value) = value;
    }

    #[test]
    fn idle_keys_go_as_new_ones_arrive_and_busy_ones_stay() {
        let map: Sharded<u32> = Sharded::new();
        for key in 0..10_000 {
            arrive(&map, key, 1, |_| false);
        }
        assert_eq!(map.len(), 10_000, "nothing idle, nothing swept");
        for key in 0..10_000 {
            assert_eq!(map.lock(&Key::from(key)).get().copied(), Some(1));
        }
        // The old keys are idle now; enough new ones arrive for every shard to sweep.
        for key in 10_000..50_000 {
            arrive(&map, key, 2, |v| *v == 1);
        }
        for key in 0..10_000 {
            assert!(
                map.lock(&Key::from(key)).get().is_none(),
                "key {key} stayed"
            );
        }
        assert_eq!(map.len(), 40_000);
        for key in 10_000..50_000 {
            assert_eq!(map.lock(&Key::from(key)).get().copied(), Some(2));
        }
    }

    #[test]
    fn a_swept_shard_gives_memory_back() {
        let map: Sharded<u32> = Sharded::new();
        for key in 0..10_000 {
            arrive(&map, key, 1, |_| false);
        }
        let mut capacity = 0;
        map.for_each_shard(|shard| {
            sweep(&mut shard.entries, |_| true, 0);
            capacity += shard.entries.capacity();
        });
        assert_eq!(map.len(), 0);
        assert!(capacity <= map.shards.len() * 64, "capacity {capacity}");
    }
}
