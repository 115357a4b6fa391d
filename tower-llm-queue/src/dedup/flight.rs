//! The state one dedup layer shares: the calls in flight, the cache of recent results, counters.

use std::any::{Any, TypeId};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::clock::AtomicDuration;
use crate::sharded::{lock, FastMap, Mutex};

use super::error::CallFailed;
use super::DedupStats;

/// What one waiter receives.
pub(super) type Outcome<R> = Result<R, tower::BoxError>;

/// What one waiter receives, and whether it is the first to receive that call's result — the
/// others get copies (see [`crate::copies`]).
pub(super) type Delivery<R> = (Outcome<R>, bool);

/// The callers that joined a flight after the one that started it, in the order they came,
/// for the response type `R` of the service that started the call; type-erased so that one map
/// holds flights of every response type.
trait Followers: Send {
    fn remove(&mut self, waiter: u64);
    fn len(&self) -> usize;
    fn as_any(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// Each follower's waiter id (rising) and where its answer goes.
type Senders<R> = Vec<(u64, oneshot::Sender<Delivery<R>>)>;

impl<R: Send + 'static> Followers for Senders<R> {
    fn remove(&mut self, waiter: u64) {
        if let Ok(at) = self.binary_search_by_key(&waiter, |(id, _)| *id) {
            Vec::remove(self, at);
        }
        if let Some(to) = crate::sharded::shrink_to(self.len(), self.capacity()) {
            self.shrink_to(to);
        }
    }

    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// How the inner call ended.
pub(super) enum Ended<R> {
    Ok(R),
    /// Found in the shared cache, where it stays this long.
    #[cfg(feature = "redis")]
    Cached(R, Duration),
    Err(tower::BoxError),
    Panicked(CallFailed),
}

/// One call in flight and everybody waiting for it. A waiter that leaves is removed at once,
/// so that a long call joined and left by many holds only its current waiters.
struct Flight {
    id: u64,
    /// The response type of the service that started the call.
    response: TypeId,
    /// Whether the caller that started the call still waits for it. It runs the call in its
    /// own task and takes its answer from the call itself, without a channel.
    leader: bool,
    /// The callers that joined since, once there is one (a [`Senders`] of the response type).
    followers: Option<Box<dyn Followers>>,
    next_waiter: u64,
    abort: Option<AbortHandle>,
}

impl Flight {
    fn waiting(&self) -> usize {
        usize::from(self.leader) + self.followers.as_ref().map_or(0, |f| f.len())
    }

    /// Gives up the seat of `waiter`: waiter 0 is the leader.
    fn remove(&mut self, waiter: u64) {
        match (waiter, &mut self.followers) {
            (0, _) => self.leader = false,
            (_, Some(followers)) => followers.remove(waiter),
            (_, None) => {}
        }
    }
}

#[derive(Clone)]
struct Cached {
    /// `Result<R, CallFailed>`.
    result: Arc<dyn Any + Send + Sync>,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    coalesced: AtomicU64,
    misses: AtomicU64,
    bypassed: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    remote_hits: AtomicU64,
    remote_failures: AtomicU64,
}

pub(super) struct Shared<K> {
    flights: Mutex<FastMap<K, Flight>>,
    cache: OnceLock<quick_cache::sync::Cache<K, Cached>>,
    max_entries: AtomicUsize,
    ttl: AtomicDuration,
    negative_ttl: AtomicDuration,
    next_id: AtomicU64,
    counters: Counters,
    #[cfg(feature = "redis")]
    remote: OnceLock<super::remote::Remote<K>>,
}

/// A request's place among the waiters of a flight.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seat {
    pub(super) flight: u64,
    pub(super) waiter: u64,
}

/// How a request joined the layer's state.
pub(super) enum Joined<R> {
    /// A fresh result from the cache.
    Hit(Outcome<R>),
    /// Waiting for a call in flight.
    Waiting(Seat, oneshot::Receiver<Delivery<R>>),
    /// Nobody runs this call: the caller must start it, as flight `seat.flight`, and takes its
    /// answer from [`Shared::finish`].
    Lead(Seat),
    /// The key is in use by a service of another response type: call without sharing.
    Alone,
}

impl<K> Shared<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    pub(super) fn new() -> Self {
        Shared {
            flights: Mutex::new(FastMap::default()),
            cache: OnceLock::new(),
            max_entries: AtomicUsize::new(10_000),
            ttl: AtomicDuration::new(None),
            negative_ttl: AtomicDuration::new(None),
            next_id: AtomicU64::new(0),
            counters: Counters::default(),
            #[cfg(feature = "redis")]
            remote: OnceLock::new(),
        }
    }

    /// Keeps the cache in Redis too; false if it already was.
    #[cfg(feature = "redis")]
    pub(super) fn set_remote(&self, remote: super::remote::Remote<K>) -> bool {
        self.remote.set(remote).is_ok()
    }

    /// The shared cache's entry for `key`, for responses of type `R`: none without a store or a
    /// TTL, or when the store's codec is for another type.
    #[cfg(feature = "redis")]
    pub(super) fn remote_entry<R: 'static>(&self, key: &K) -> Option<super::remote::Entry<R>> {
        self.ttl.get()?;
        self.remote.get()?.entry(key)
    }

    #[cfg(feature = "redis")]
    pub(super) fn count_remote(&self, hit: bool) {
        let counter = match hit {
            true => &self.counters.remote_hits,
            false => &self.counters.remote_failures,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(super) fn set_ttl(&self, ttl: Duration) {
        self.ttl.set(Some(ttl));
    }

    pub(super) fn set_negative_ttl(&self, ttl: Duration) {
        self.negative_ttl.set(Some(ttl));
    }

    pub(super) fn set_max_entries(&self, n: usize) {
        self.max_entries.store(n.max(1), Relaxed);
    }

    pub(super) fn count_bypass(&self) {
        self.counters.bypassed.fetch_add(1, Relaxed);
    }

    fn cache(&self) -> &quick_cache::sync::Cache<K, Cached> {
        self.cache
            .get_or_init(|| quick_cache::sync::Cache::new(self.max_entries.load(Relaxed)))
    }

    fn caching(&self) -> bool {
        self.ttl.get().is_some() || self.negative_ttl.get().is_some()
    }

    fn cached<R: Clone + 'static>(&self, key: &K) -> Option<Outcome<R>> {
        if !self.caching() {
            return None;
        }
        let cache = self.cache();
        let entry = cache.get(key)?;
        if entry.expires <= Instant::now() {
            cache.remove(key);
            return None;
        }
        let result = entry.result.downcast_ref::<Result<R, CallFailed>>()?;
        Some(result.clone().map_err(Into::into))
    }

    /// Serves from the cache, joins the call in flight, or asks the caller to lead a new one.
    pub(super) fn join<R>(&self, key: &K) -> Joined<R>
    where
        R: Clone + Send + 'static,
    {
        if let Some(hit) = self.cached::<R>(key) {
            self.counters.hits.fetch_add(1, Relaxed);
            tracing::trace!("dedup: served from the cache");
            return Joined::Hit(hit);
        }
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.get_mut(key) {
            if flight.response != TypeId::of::<R>() {
                return Joined::Alone;
            }
            let followers = flight
                .followers
                .get_or_insert_with(|| Box::new(Senders::<R>::new()));
            let Some(senders) = followers.as_any().downcast_mut::<Senders<R>>() else {
                return Joined::Alone;
            };
            let seat = Seat {
                flight: flight.id,
                waiter: flight.next_waiter,
            };
            flight.next_waiter += 1;
            let (tx, rx) = oneshot::channel();
            senders.push((seat.waiter, tx));
            self.counters.coalesced.fetch_add(1, Relaxed);
            tracing::trace!(
                waiting = senders.len() + 1,
                "dedup: joined a call in flight"
            );
            return Joined::Waiting(seat, rx);
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        flights.insert(
            key.clone(),
            Flight {
                id,
                response: TypeId::of::<R>(),
                leader: true,
                followers: None,
                next_waiter: 1,
                abort: None,
            },
        );
        self.counters.misses.fetch_add(1, Relaxed);
        tracing::trace!("dedup: starting a shared call");
        Joined::Lead(Seat {
            flight: id,
            waiter: 0,
        })
    }

    /// Records the task that runs flight `id`, unless every waiter has already gone, in which
    /// case the task is stopped at once.
    pub(super) fn started(&self, key: &K, id: u64, abort: AbortHandle) {
        let mut flights = lock(&self.flights);
        match flights.get_mut(key) {
            Some(flight) if flight.id == id => flight.abort = Some(abort),
            _ => abort.abort(),
        }
    }

    /// The caller that runs the call in its own task gives up its seat before the call is
    /// over. True if others still wait: the call must then go on in a task of its own (and be
    /// [`started`](Shared::started)). False if nobody else waits: the flight is over, and
    /// dropping the call stops it; a request that comes later starts a new one.
    pub(super) fn hand_off(&self, key: &K, seat: Seat) -> bool {
        let mut flights = lock(&self.flights);
        let Some(flight) = flights.get_mut(key) else {
            return false;
        };
        if flight.id != seat.flight {
            return false;
        }
        flight.remove(seat.waiter);
        if flight.waiting() > 0 {
            return true;
        }
        flights.remove(key);
        tracing::debug!("dedup: every waiter left; the shared call is dropped");
        false
    }

    /// A waiter gives up its seat; the last one to go stops the call.
    pub(super) fn leave(&self, key: &K, seat: Seat) {
        let mut flights = lock(&self.flights);
        let Some(flight) = flights.get_mut(key) else {
            return;
        };
        if flight.id != seat.flight {
            return;
        }
        flight.remove(seat.waiter);
        if flight.waiting() == 0 {
            if let Some(flight) = flights.remove(key) {
                if let Some(abort) = flight.abort {
                    abort.abort();
                }
                tracing::debug!("dedup: every waiter left; the shared call is dropped");
            }
        }
    }

    /// Flight `id` is over: caches its result when asked to and hands it to every waiter,
    /// returning the leader's if the leader still waits. A failure seen by one waiter alone
    /// reaches it untouched; several share a [`CallFailed`]. The first waiter served (the
    /// leader, when it waits) gets the result; the others get copies.
    pub(super) fn finish<R>(&self, key: &K, id: u64, ended: Ended<R>) -> Option<Delivery<R>>
    where
        R: Clone + Send + Sync + 'static,
    {
        let (leader, senders, result) = {
            let mut flights = lock(&self.flights);
            match flights.get(key) {
                Some(flight) if flight.id == id => {}
                _ => return None,
            }
            let flight = flights.remove(key)?;
            let (leader, waiting) = (flight.leader, flight.waiting());
            let senders = match flight.followers {
                Some(followers) => *followers.into_any().downcast::<Senders<R>>().ok()?,
                None => Senders::new(),
            };
            let negative_ttl = self.negative_ttl.get();
            let (result, ttl) = match ended {
                Ended::Ok(response) => (Ok(response), self.ttl.get()),
                #[cfg(feature = "redis")]
                Ended::Cached(response, left) => (Ok(response), Some(left)),
                Ended::Err(err) if waiting == 1 && negative_ttl.is_none() => {
                    self.counters.failed.fetch_add(1, Relaxed);
                    drop(flights);
                    if leader {
                        return Some((Err(err), true));
                    }
                    if let Some((_, only)) = senders.into_iter().next() {
                        let _ = only.send((Err(err), true));
                    }
                    return None;
                }
                Ended::Err(err) => {
                    self.counters.failed.fetch_add(1, Relaxed);
                    (Err(CallFailed::error(err)), negative_ttl)
                }
                Ended::Panicked(failed) => {
                    self.counters.failed.fetch_add(1, Relaxed);
                    self.counters.panicked.fetch_add(1, Relaxed);
                    (Err(failed), None)
                }
            };
            if let Some(ttl) = ttl {
                self.cache().insert(
                    key.clone(),
                    Cached {
                        result: Arc::new(result.clone()),
                        expires: crate::clock::later(Instant::now(), ttl),
                    },
                );
            }
            (leader, senders, result)
        };
        let mut first = !leader;
        for (_, tx) in senders {
            if tx.send((result.clone().map_err(Into::into), first)).is_ok() {
                first = false;
            }
        }
        leader.then(|| (result.map_err(Into::into), true))
    }

    pub(super) fn stats(&self) -> DedupStats {
        let c = &self.counters;
        DedupStats {
            hits: c.hits.load(Relaxed),
            coalesced: c.coalesced.load(Relaxed),
            misses: c.misses.load(Relaxed),
            bypassed: c.bypassed.load(Relaxed),
            failed: c.failed.load(Relaxed),
            panicked: c.panicked.load(Relaxed),
            remote_hits: c.remote_hits.load(Relaxed),
            remote_failures: c.remote_failures.load(Relaxed),
            in_flight: lock(&self.flights).len(),
            entries: self.cache.get().map_or(0, |c| c.len()),
        }
    }

    /// The requests waiting for the call in flight for `key`.
    #[cfg(test)]
    pub(super) fn waiters(&self, key: &K) -> usize {
        lock(&self.flights).get(key).map_or(0, Flight::waiting)
    }

    pub(super) fn max_entries(&self) -> usize {
        self.max_entries.load(Relaxed)
    }

    pub(super) fn ttl(&self) -> Option<Duration> {
        self.ttl.get()
    }
}

impl<K> std::fmt::Debug for Shared<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}
