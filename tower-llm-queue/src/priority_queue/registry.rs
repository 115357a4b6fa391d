//! Every request of a queue, waiting or running, by id: what `entries()`, `position(id)` and
//! `cancel(id)` read, and where a request's end is counted.
//!
//! The registry is split into shards by id. Consecutive ids fall into different shards, so
//! requests that start and end on different threads rarely meet on one lock, and a request
//! admitted at once touches its own shard only — never the queue's lock. Each shard counts the
//! requests that ended in it; stats add the shards up.
//!
//! # Two places in a shard
//!
//! Each shard keeps two slabs — lists of places with a list of the free ones — and a request's
//! ticket keeps the index of its place: its end, and each look at its cancellation, go straight
//! to that place, with no hashing on the path of any request.
//!
//! A request that waits is kept in the slab of those that waited, from its arrival to its end,
//! with its waiter: the hand-off that the queue, which keeps the waiter too, uses to give it a
//! slot without looking here. The waiter's status tells whether the request waits or runs.
//! A request admitted at once is kept in the slab of those admitted at once, with its
//! cancellation flag and the task to wake.
//!
//! What looks a request up by id — [`PriorityQueueHandle::cancel`],
//! [`position`](super::PriorityQueueHandle::position) — walks the two slabs of the id's shard,
//! which hold at most as many places as requests of that shard were ever in the queue at once;
//! an operation of the handle can afford that.
//!
//! An id is in use while it is in either slab, and a new request with an id in use is refused.
//! Each shard remembers the highest id it has registered since it was last empty: an id above
//! it is free without a look, which is the case of every id from [`RequestId::next`] in a shard
//! that requests enter in the order of their ids. Any other id (an id chosen by a client, or one
//! that lost a race to a later one) is looked for in both slabs.
//!
//! [`PriorityQueueHandle::cancel`]: super::PriorityQueueHandle::cancel
//! [`RequestId::next`]: super::RequestId::next

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};

use tokio::time::Instant;

use crate::admission::Finish;
use crate::key::Key;
use crate::service_time::ServiceTime;
use crate::sharded::{lock, shrink_above, Mutex, MutexGuard, SMALL};
use crate::waiter::Waiter;

use super::schedule::Position;
use super::RequestId;

/// A request that waited, in its shard's slab of those. Its waiter tells its phase: waiting
/// until the queue grants it a slot (under the queue's lock), running after; it also carries a
/// cancellation through the handle, in either phase.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) id: RequestId,
    pub(super) user: Option<Key>,
    pub(super) level: usize,
    /// Its place in the queue while it waits.
    pub(super) position: Position,
    /// When it arrived.
    pub(super) since: Instant,
    pub(super) waiter: Arc<Waiter>,
}

impl Entry {
    /// Cancelled through the handle (a cancelled entry is no longer listed).
    pub(super) fn is_cancelled(&self) -> bool {
        self.waiter.is_cancelled()
    }
}

/// A place in a shard's slab, and the request admitted at once that holds it, if `taken`. A
/// free place holds no user and no task.
#[derive(Debug)]
pub(super) struct Direct {
    taken: bool,
    pub(super) id: RequestId,
    pub(super) user: Option<Key>,
    pub(super) level: usize,
    /// When it was admitted, for the service-time estimate: only sampled requests read the
    /// clock.
    started: Option<Instant>,
    /// Cancelled through the handle.
    pub(super) cancelled: bool,
    /// With a fairness key: whether the schedule has taken it in (see
    /// [`Registry::take_unaccounted`]).
    accounted: bool,
    /// Its place among the requests admitted at once, from the admission word's count.
    seq: u64,
    /// The task to wake once it is cancelled.
    waker: Option<Waker>,
}

/// What ended in one shard, and the requests admitted at once there.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    pub(super) admitted: u64,
    pub(super) rejected: u64,
    pub(super) cancelled: u64,
    pub(super) completed: u64,
    pub(super) failed: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.admitted += other.admitted;
        self.rejected += other.rejected;
        self.cancelled += other.cancelled;
        self.completed += other.completed;
        self.failed += other.failed;
    }
}

/// The places for requests that waited a shard keeps once it has held that many, about 20 KiB.
const KEPT_ENTRIES: usize = 224;

/// A slab: places reused as requests come and go, with the list of the free ones. It keeps its
/// length — the most requests it held at once — until its last place is freed; then it gives
/// memory back, keeping room for `FLOOR` places.
#[derive(Debug)]
struct Places<T, const FLOOR: usize> {
    items: Vec<T>,
    free: Vec<usize>,
}

impl<T, const FLOOR: usize> Default for Places<T, FLOOR> {
    fn default() -> Self {
        Places {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T, const FLOOR: usize> Places<T, FLOOR> {
    /// A free place, or a new one holding `new()`.
    #[inline(always)]
    fn take(&mut self, new: impl FnOnce() -> T) -> usize {
        match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.items.push(new());
                self.items.len() - 1
            }
        }
    }

    /// Lists the place `slot` as free; once every place is, gives memory back and says so.
    #[inline(always)]
    fn vacate(&mut self, slot: usize) -> bool {
        self.free.push(slot);
        if !self.all_free() {
            return false;
        }
        if self.items.capacity() > FLOOR.max(SMALL) {
            self.give_back();
        }
        true
    }

    /// Gives memory back, all places being free, if there is enough to give.
    #[cold]
    fn give_back(&mut self) {
        if let Some(to) = shrink_above(0, self.items.capacity(), FLOOR) {
            self.items.clear();
            self.free.clear();
            self.items.shrink_to(to);
            self.free.shrink_to(to);
        }
    }

    #[inline]
    fn all_free(&self) -> bool {
        self.free.len() == self.items.len()
    }
}

#[derive(Debug, Default)]
pub(super) struct Book {
    /// The requests that waited, each in a place that holds it until it ends.
    waited: Places<Option<Entry>, KEPT_ENTRIES>,
    /// The requests admitted at once; a free place keeps its fields for the next request.
    slab: Places<Direct, 0>,
    /// No id above this one is in use here; `None`: no id is.
    highest: Option<RequestId>,
    pub(super) counts: Counts,
    starts: u32,
}

impl Book {
    /// The place of a new request `id`; `None` (counted as a rejection) if the id is in use.
    #[inline]
    pub(super) fn vacancy(&mut self, id: RequestId) -> Option<Vacancy<'_>> {
        if self.highest.is_some_and(|highest| id <= highest) && self.in_use(id) {
            self.counts.rejected += 1;
            return None;
        }
        Some(Vacancy { book: self, id })
    }

    /// The place of a new request `id` above every id in use here, which needs no look; `None`
    /// for any other id (nothing counted: [`Book::vacancy`] decides).
    #[inline]
    pub(super) fn fresh(&mut self, id: RequestId) -> Option<Vacancy<'_>> {
        if self.highest.is_some_and(|highest| id <= highest) {
            return None;
        }
        Some(Vacancy { book: self, id })
    }

    #[cold]
    fn in_use(&self, id: RequestId) -> bool {
        self.find_waited(id).is_some() || self.find(id).is_some()
    }

    /// The request `id` that waited, and its place.
    pub(super) fn find_waited(&self, id: RequestId) -> Option<(usize, &Entry)> {
        self.waited
            .items
            .iter()
            .enumerate()
            .find_map(|(slot, place)| place.as_ref().filter(|e| e.id == id).map(|e| (slot, e)))
    }

    /// The requests that waited.
    pub(super) fn waited(&self) -> impl Iterator<Item = &Entry> {
        self.waited.items.iter().flatten()
    }

    /// The request `id` admitted at once, and its place in the slab.
    pub(super) fn find(&self, id: RequestId) -> Option<(usize, &Direct)> {
        self.slab
            .items
            .iter()
            .enumerate()
            .find(|(_, place)| place.taken && place.id == id)
    }

    /// The requests admitted at once.
    pub(super) fn direct(&self) -> impl Iterator<Item = &Direct> {
        self.slab.items.iter().filter(|place| place.taken)
    }

    /// Takes the request `id` that waited out of place `slot`.
    pub(super) fn remove(&mut self, slot: usize, id: RequestId) -> Option<Entry> {
        let entry = self.waited.items.get_mut(slot)?.take_if(|e| e.id == id)?;
        self.vacate_waited(slot);
        Some(entry)
    }

    /// Frees the place `slot` of a request that waited, which has been taken out. Room for
    /// [`KEPT_ENTRIES`] stays: a queue that fills and drains again and again (bursts of
    /// requests) would otherwise grow and shrink the slab with every burst.
    fn vacate_waited(&mut self, slot: usize) {
        // Once no request is left, no id is in use.
        if self.waited.vacate(slot) && self.slab.all_free() {
            self.highest = None;
        }
    }

    /// Frees the place `slot` of a request admitted at once, whose request has ended: lets its
    /// user and task go.
    #[inline]
    fn vacate(&mut self, slot: usize) {
        let place = &mut self.slab.items[slot];
        place.taken = false;
        place.user = None;
        place.waker = None;
        // Once no request is left, no id is in use.
        if self.slab.vacate(slot) && self.waited.all_free() {
            self.highest = None;
        }
    }

    /// Counts the end of a running request that was not cancelled through the handle.
    fn count_end(&mut self, finish: Finish, panicking: bool) {
        let c = &mut self.counts;
        match (panicking, finish) {
            (true, _) | (false, Finish::Failed) => c.failed += 1,
            (false, Finish::Completed) => c.completed += 1,
            (false, Finish::Dropped) => c.cancelled += 1,
        }
    }
}

/// The place of a new request in its shard, until it is registered there, running or queued.
pub(super) struct Vacancy<'a> {
    book: &'a mut Book,
    id: RequestId,
}

impl Vacancy<'_> {
    #[inline]
    fn taken(&mut self) {
        let highest = self.book.highest.get_or_insert(self.id);
        *highest = (*highest).max(self.id);
    }

    /// Registers a request admitted at once, and gives its place in the slab; only sampled
    /// ones read the clock, for the service-time estimate.
    // Inlined into both callers: it is on the path of every request admitted at once.
    #[inline(always)]
    pub(super) fn run(
        mut self,
        user: Option<Key>,
        level: usize,
        seq: u64,
        service_time: &ServiceTime,
    ) -> usize {
        tracing::trace!(id = %self.id, user = ?user, level = level + 1, "admitted at once");
        self.taken();
        let book = self.book;
        book.starts = book.starts.wrapping_add(1);
        let started = service_time.sampled(book.starts);
        book.counts.admitted += 1;
        let id = self.id;
        let slot = book.slab.take(|| Direct {
            taken: false,
            id,
            user: None,
            level,
            started: None,
            cancelled: false,
            waker: None,
            accounted: false,
            seq,
        });
        let place = &mut book.slab.items[slot];
        place.taken = true;
        place.id = self.id;
        // A free place holds no user: only a user to keep is written.
        if user.is_some() {
            place.user = user;
        }
        place.level = level;
        place.started = started;
        place.cancelled = false;
        place.accounted = false;
        place.seq = seq;
        slot
    }

    /// Registers a request that waits, and gives its place.
    pub(super) fn queue(mut self, entry: Entry) -> usize {
        self.taken();
        let waited = &mut self.book.waited;
        let slot = waited.take(|| None);
        waited.items[slot] = Some(entry);
        slot
    }
}

/// A shard on a cache line of its own, so that two threads working in two shards do not slow
/// each other down.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    book: Mutex<Book>,
    /// Rises with every cancellation of a request admitted at once in this shard: such a
    /// request looks at its flag (under the lock) only when this has moved.
    cancels: AtomicU64,
}

/// A running request's end, as the registry saw it: when it started, if sampled for the
/// service-time estimate. (Small enough to be returned in registers: what the schedule must hear
/// of the end, if anything, is written to an [`Accounted`] the caller passes, only then.)
#[derive(Debug, Clone, Copy)]
pub(super) struct Ended {
    pub(super) started: Option<Instant>,
}

/// The user and level of a running request that the schedule counts, with the user's hash if
/// it was computed when the request was queued.
#[derive(Debug)]
pub(super) struct Accounted {
    pub(super) level: usize,
    pub(super) user: Key,
    pub(super) hash: Option<u64>,
}

/// A running request with a fairness key that the schedule has not taken in: its place among
/// the requests admitted at once, its level and its user.
pub(super) type Unaccounted = (u64, usize, Key);

impl Book {
    /// Marks the requests of this shard admitted at once with a fairness key that the schedule
    /// has not taken in as taken in, and adds them to `out`; those at a level beyond `levels`
    /// (picked before the levels changed) are never taken in.
    fn take_unaccounted(&mut self, out: &mut Vec<Unaccounted>, levels: usize) {
        let open = |p: &&mut Direct| p.taken && !p.accounted && p.level < levels;
        for place in self.slab.items.iter_mut().filter(open) {
            if let Some(user) = &place.user {
                place.accounted = true;
                out.push((place.seq, place.level, user.clone()));
            }
        }
    }
}

/// The registry's shards. A request's shard is its id's lowest bits: ids are handed out in
/// sequence, so consecutive requests take turns over the shards. (Ids chosen by clients may
/// crowd one shard, whose walks by id then grow longer.)
#[derive(Debug)]
pub(super) struct Registry {
    shards: Box<[Shard]>,
}

impl Registry {
    pub(super) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let count = (cores * 4).next_power_of_two();
        Registry {
            shards: (0..count).map(|_| Shard::default()).collect(),
        }
    }

    #[inline]
    fn index(&self, id: RequestId) -> usize {
        id.get() as usize & (self.shards.len() - 1)
    }

    #[inline]
    fn shard(&self, id: RequestId) -> &Shard {
        &self.shards[self.index(id)]
    }

    /// The locked shard of `id`.
    #[inline]
    pub(super) fn lock(&self, id: RequestId) -> MutexGuard<'_, Book> {
        lock(&self.shard(id).book)
    }

    /// The cancellation count of `id`'s shard, before a look at its flag.
    #[inline]
    pub(super) fn cancels(&self, id: RequestId) -> u64 {
        self.shard(id).cancels.load(Ordering::Acquire)
    }

    /// Cancels the running request in place `slot` of `book`, admitted at once: sets its flag,
    /// and gives the task to wake (if it registered one). `None` if it was cancelled before.
    pub(super) fn cancel_direct(
        &self,
        id: RequestId,
        slot: usize,
        book: &mut Book,
    ) -> Option<Option<Waker>> {
        let direct = book.slab.items.get_mut(slot).filter(|d| d.taken)?;
        if direct.cancelled {
            return None;
        }
        direct.cancelled = true;
        let waker = direct.waker.take();
        book.counts.cancelled += 1;
        self.shard(id).cancels.fetch_add(1, Ordering::Release);
        Some(waker)
    }

    /// Whether the running request `id`, admitted at once into place `slot`, was cancelled;
    /// with `cx`, registers its task to be woken when it is.
    pub(super) fn direct_cancelled(
        &self,
        id: RequestId,
        slot: usize,
        cx: Option<&mut Context<'_>>,
    ) -> bool {
        let mut book = self.lock(id);
        let Some(Direct {
            taken: true,
            cancelled,
            waker,
            ..
        }) = book.slab.items.get_mut(slot)
        else {
            return false;
        };
        if *cancelled {
            return true;
        }
        if let Some(cx) = cx {
            match waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        false
    }

    /// Takes the running request `id` that waited, in place `slot`, out and counts how it
    /// ended (unless the handle cancelled it, which counted it then). `None` if it is not
    /// there: it was cancelled while it waited (and its place may be another request's by now,
    /// which `waiter`, the request's own, tells apart). Only sampled requests give when they started, for the service-time
    /// estimate. If the schedule counts it, its user and level are written to `accounted`.
    pub(super) fn end(
        &self,
        id: RequestId,
        slot: usize,
        waiter: &Arc<Waiter>,
        (finish, panicking): (Finish, bool),
        service_time: &ServiceTime,
        accounted: &mut Option<Accounted>,
    ) -> Option<Ended> {
        let mut book = self.lock(id);
        let place = book.waited.items.get_mut(slot)?;
        let entry = place.take_if(|e| Arc::ptr_eq(&e.waiter, waiter))?;
        book.vacate_waited(slot);
        if !entry.is_cancelled() {
            book.count_end(finish, panicking);
        }
        book.starts = book.starts.wrapping_add(1);
        let sampled = service_time.is_sampled(book.starts);
        drop(book);
        if let Some(user) = entry.user {
            *accounted = Some(Accounted {
                level: entry.level,
                user,
                hash: Some(entry.position.hash()),
            });
        }
        Some(Ended {
            started: sampled.then(|| entry.since + entry.waiter.waited()),
        })
    }

    /// Takes the running request `id`, admitted at once into place `slot`, out, and counts how
    /// it ended (unless the handle cancelled it, which counted it then). If the schedule counts
    /// it, its user and level are written to `accounted`.
    #[inline]
    pub(super) fn end_direct(
        &self,
        id: RequestId,
        slot: usize,
        (finish, panicking): (Finish, bool),
        accounted: &mut Option<Accounted>,
    ) -> Option<Ended> {
        let mut book = self.lock(id);
        let direct = book.slab.items.get_mut(slot).filter(|d| d.taken)?;
        if direct.accounted {
            if let Some(user) = direct.user.take() {
                *accounted = Some(Accounted {
                    level: direct.level,
                    user,
                    hash: None,
                });
            }
        }
        let ended = Ended {
            started: direct.started,
        };
        if !direct.cancelled {
            book.count_end(finish, panicking);
        }
        book.vacate(slot);
        drop(book);
        Some(ended)
    }

    /// Every request admitted at once with a fairness key that the schedule has not taken in,
    /// marked as taken in: called under the queue's lock, which the schedule is under.
    pub(super) fn take_unaccounted(&self, levels: usize) -> Vec<Unaccounted> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            lock(&shard.book).take_unaccounted(&mut out, levels);
        }
        out
    }

    /// Adds up the counts of every shard.
    pub(super) fn counts(&self) -> Counts {
        let mut total = Counts::default();
        for shard in self.shards.iter() {
            total += lock(&shard.book).counts;
        }
        total
    }

    /// Visits every shard in turn, each locked while `f` runs.
    pub(super) fn for_each(&self, mut f: impl FnMut(&Book)) {
        for shard in self.shards.iter() {
            f(&lock(&shard.book));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_reused_and_give_memory_back_once_all_are_free() {
        let mut places = Places::<u32, 100>::default();
        let slots: Vec<usize> = (0..1_000).map(|n| places.take(|| n)).collect();
        assert_eq!(slots, (0..1_000).collect::<Vec<_>>(), "new places in order");
        assert!(!places.vacate(7), "others are still taken");
        assert_eq!(places.take(|| 0), 7, "a freed place is taken again");
        for slot in 0..999 {
            assert!(!places.vacate(slot), "place {slot} freed before the last");
        }
        assert!(places.vacate(999), "the last place freed");
        assert!(places.all_free());
        assert!(places.items.is_empty() && places.free.is_empty());
        assert!(
            (100..1_000).contains(&places.items.capacity()),
            "room kept for the floor, not for the peak: {}",
            places.items.capacity()
        );
        assert_eq!(places.take(|| 5), 0, "places start over from the first");
    }
}
