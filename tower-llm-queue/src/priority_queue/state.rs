//! The state one queue shares among its layer, services, futures and handle.
//!
//! # Admission
//!
//! One atomic word holds the number of running requests, a flag that says that requests wait,
//! and a count of the requests admitted at once. While nobody waits, a request is admitted with
//! one compare-and-swap on that word and registered in its shard of the [`Registry`]; it ends
//! the same way. Only a request that must wait takes the queue's lock, and so does a release
//! that finds the flag set: it hands its slot to the next waiter under the lock, so that the
//! running count never exceeds the concurrency and no waiter is forgotten.
//!
//! The flag changes only under the queue's lock, and is set only while every slot is taken; the
//! compare-and-swap of a request admitted at once, and of a release without the lock, fails
//! whenever the flag is set. Lock order: the queue, then a registry shard; no path holds two
//! shards. A request that waits takes its place in the schedule under the queue's lock and is
//! registered in its shard after that lock is let go, so that the lock is held only as long as
//! the schedule needs it.
//!
//! With a fairness key, a request admitted at once is registered the same way, with its place
//! among those admitted at once; the schedule takes in its user's turn only once the flag is
//! set (or the stats or settings are read), from the registry, in the order of admission (see
//! `account_direct`). Its end tells the schedule only if the schedule took it in.
//!
//! The queue keeps each waiting request's waiter and arrival time, so that a release hands the
//! slot over under the queue's lock alone; the registry learns of it from the waiter.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::time::Instant;

use crate::admission::{Finish, Slot};
use crate::hold::Guard;
use crate::key::Key;
use crate::rejected::{Rejected, RejectionKind};
use crate::service_time::ServiceTime;
use crate::sharded::{lock, FastMap, Mutex, MutexGuard, Padded};
use crate::waiter::{Registered, Waiter};

use super::registry::{Accounted, Book, Ended, Entry, Registry};
use super::schedule::{Position, Schedule, UserHasher};
use super::stats::{EntryState, QueueEntry, QueueStats, RecentWaits};
use super::RequestId;

/// The admission word: running requests in the low bits, then the flag, then a count of the
/// requests admitted at once, which wraps around.
const RUNNING_BITS: u32 = 24;
const RUNNING: u64 = (1 << RUNNING_BITS) - 1;
const WAITING: u64 = 1 << RUNNING_BITS;
const AT_ONCE: u64 = WAITING << 1;
const AT_ONCE_MODULUS: u64 = 1 << (64 - RUNNING_BITS - 1);

/// A word's count of the requests admitted at once.
fn at_once(word: u64) -> u64 {
    word >> (RUNNING_BITS + 1)
}

/// The most requests the word can count as running; a larger concurrency is this one.
const MAX_CONCURRENCY: usize = RUNNING as usize;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) concurrency: usize,
    pub(crate) capacity: usize,
    pub(crate) levels: usize,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) oldest_every: u32,
}

#[inline]
fn level_index(levels: usize, priority: u8) -> usize {
    (priority.max(1) as usize).min(levels) - 1
}

/// A waiting request, as the queue keeps it: what its turn needs to hand it the slot without
/// looking it up in the registry.
#[derive(Debug)]
pub(crate) struct Waiting {
    id: RequestId,
    waiter: Arc<Waiter>,
    since: Instant,
}

/// Counts kept under the queue's lock; the registry's shards keep the others.
#[derive(Debug, Default)]
struct Counters {
    /// Admitted after waiting.
    admitted: u64,
    rejected: u64,
    timed_out: u64,
}

/// What only requests that wait need, under one lock.
#[derive(Debug)]
struct Queue {
    config: Config,
    schedule: Schedule<Waiting>,
    counters: Counters,
    waits: RecentWaits,
    /// Waiters of requests that waited and have ended while others waited, for the next
    /// requests that wait: a steady queue allocates none.
    spare: Vec<Arc<Waiter>>,
}

/// The most waiters a queue keeps for reuse.
const SPARE_WAITERS: usize = 1024;

impl Queue {
    /// A waiter for a new request that waits: a spare one if there is one.
    fn waiter(&mut self) -> Arc<Waiter> {
        self.spare.pop().unwrap_or_default()
    }

    /// Keeps the waiter of an ended request for reuse, if nothing else holds it.
    fn recycle(&mut self, mut waiter: Arc<Waiter>) {
        if self.spare.len() < SPARE_WAITERS {
            if let Some(w) = Arc::get_mut(&mut waiter) {
                w.reset();
                self.spare.push(waiter);
            }
        }
    }
}

/// The admission word on a cache line of its own.
#[derive(Debug)]
#[repr(align(128))]
struct Word(AtomicU64);

#[derive(Debug)]
pub(crate) struct Shared {
    word: Word,
    /// The concurrency the word enforces.
    concurrency: u64,
    /// The number of levels, readable without the lock.
    levels: AtomicUsize,
    /// On lines of its own: it changes hands with every request that waits, and the fields
    /// read on every request must not move with it.
    queue: Padded<Mutex<Queue>>,
    registry: Registry,
    /// Hashes fairness keys for the schedule, before the queue's lock is taken.
    users: UserHasher,
    /// How long a request holds its slot, for the `retry_after` of `QueueFull`.
    service_time: Padded<ServiceTime>,
}

/// A request's registration in the queue. Dropping it — at any moment — takes the request out of
/// the queue or gives its slot to the next waiter.
#[derive(Debug)]
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    id: RequestId,
    /// The hand-off with the queue, for a request that waited.
    waiter: Option<Arc<Waiter>>,
    /// Its place in its shard: among the requests admitted at once, or among those that
    /// waited. (Four bytes: with the others, they keep a response future small enough to be
    /// moved without a call to `memcpy`. No shard holds four billion requests.)
    slot: u32,
    /// For a request admitted at once: its shard's cancellation count when it last looked at
    /// its flag.
    cancels_seen: AtomicU64,
    /// The task it last registered to be woken by a cancellation. While that task polls, the
    /// registration stands: a request that waited only looks at its status, and one admitted at
    /// once looks at its flag only when a request of its shard was cancelled since.
    registered: Registered,
    finish: Finish,
    released: bool,
}

pub(crate) enum Enqueued {
    /// Admitted at once.
    Running(Ticket),
    /// Waiting for its turn, at most this long.
    Waiting(Ticket, Option<Duration>),
}

#[cold]
#[inline(never)]
fn duplicate(id: RequestId) -> Rejected {
    Rejected::new(RejectionKind::MissingKey)
        .with_message(format!("request id {id} is already in use"))
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        let schedule = Schedule::new(config.levels, config.oldest_every);
        Shared {
            word: Word(AtomicU64::new(0)),
            concurrency: config.concurrency.min(MAX_CONCURRENCY) as u64,
            levels: AtomicUsize::new(config.levels),
            queue: Padded(Mutex::new(Queue {
                config,
                schedule,
                counters: Counters::default(),
                waits: RecentWaits::default(),
                spare: Vec::new(),
            })),
            registry: Registry::new(),
            users: UserHasher::default(),
            service_time: Padded::default(),
        }
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        lock(&self.queue)
    }

    /// Changes the configuration; false (and nothing changed) if the number of levels cannot
    /// change because requests are queued.
    pub(crate) fn configure(&self, f: impl FnOnce(&mut Config)) -> bool {
        let mut queue = self.lock_queue();
        // The users' running requests hold the levels as they are.
        self.account_direct(&mut queue);
        let before = queue.config.clone();
        f(&mut queue.config);
        let (levels, oldest_every) = (queue.config.levels, queue.config.oldest_every);
        if !queue.schedule.reconfigure(levels, oldest_every) {
            queue.config = before;
            return false;
        }
        self.levels.store(levels, Ordering::Relaxed);
        true
    }

    pub(crate) fn config(&self) -> Config {
        self.lock_queue().config.clone()
    }

    /// The admission word, if it shows a free slot and nobody waiting: only then is admission
    /// at once tried.
    #[inline]
    fn may_admit(&self) -> Option<u64> {
        let word = self.word.0.load(Ordering::Relaxed);
        (word & WAITING == 0 && word & RUNNING < self.concurrency).then_some(word)
    }

    /// Takes a slot if one is free and nobody waits; `word` is the word as last read. Gives the
    /// request's place among those admitted at once.
    #[inline]
    fn try_admit(&self, mut word: u64) -> Option<u64> {
        while word & WAITING == 0 && word & RUNNING < self.concurrency {
            match self.word.0.compare_exchange_weak(
                word,
                word.wrapping_add(1 + AT_ONCE),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(at_once(word)),
                Err(actual) => word = actual,
            }
        }
        None
    }

    /// Has the schedule take in the requests admitted at once with a fairness key, in the order
    /// they were admitted, as though each had been taken in as it was admitted: called once
    /// requests start to wait, and before the schedule is read or changed.
    ///
    /// While nobody waits, a user's requests admitted at once touch nothing but the registry.
    /// The schedule's turns matter only to requests that wait, and of what it would have
    /// recorded meanwhile only the running requests' turns are left — a user with nothing
    /// running is forgotten while nobody waits — the same up to a shift of virtual time. One
    /// difference remains: a user whose request from an earlier wait still runs sees virtual
    /// time moved only by the requests still running, so its next turn may come a little later
    /// than had every request admitted meanwhile moved it.
    fn account_direct(&self, queue: &mut Queue) {
        let levels = queue.schedule.levels();
        let mut unaccounted = self.registry.take_unaccounted(levels);
        if unaccounted.is_empty() {
            return;
        }
        // Oldest first: the count wraps, so the age is taken from the count now.
        let now = at_once(self.word.0.load(Ordering::Relaxed));
        unaccounted.sort_unstable_by_key(|&(seq, _, _)| {
            std::cmp::Reverse(now.wrapping_sub(seq) % AT_ONCE_MODULUS)
        });
        for (_, level, user) in unaccounted {
            queue
                .schedule
                .admit_directly(level, Some(self.users.user(&user)));
        }
    }

    /// The ticket of a request that waits, registered in place `slot`.
    fn waiting_ticket(self: &Arc<Self>, id: RequestId, waiter: Arc<Waiter>, slot: usize) -> Ticket {
        Ticket {
            shared: self.clone(),
            id,
            waiter: Some(waiter),
            slot: slot as u32,
            cancels_seen: AtomicU64::new(0),
            registered: Registered::default(),
            finish: Finish::Dropped,
            released: false,
        }
    }

    /// The ticket of a request admitted at once, registered already in place `slot`; called
    /// under its shard's lock, so that no cancellation of it comes before the count it reads.
    #[inline(always)]
    fn running_ticket(self: &Arc<Self>, id: RequestId, slot: usize) -> Ticket {
        // Built in one piece: a ticket changed after it is built is copied on its way out, and
        // the copy stalls on the fields just written.
        Ticket {
            shared: self.clone(),
            id,
            waiter: None,
            slot: slot as u32,
            cancels_seen: AtomicU64::new(self.registry.cancels(id)),
            registered: Registered::default(),
            finish: Finish::Dropped,
            released: false,
        }
    }

    /// Admits a new request at once if a slot is free, nobody waits and its id is above every
    /// id of its shard (as ids from [`RequestId::next`] are): the path of most requests, which
    /// takes only its shard's lock. Otherwise `None`, and [`Shared::enqueue`] decides; `user`
    /// is taken only if the request is admitted.
    // Inlined into the service's call, so that the ticket is built where the response future
    // keeps it: returned through memory and copied, it would be read back in wider pieces than
    // it was written in, and the copy would stall on the fields just written.
    #[inline(always)]
    pub(crate) fn admit_at_once(
        self: &Arc<Self>,
        id: RequestId,
        user: &mut Option<Key>,
        priority: u8,
    ) -> Option<Ticket> {
        let word = self.may_admit()?;
        let level = level_index(self.levels.load(Ordering::Relaxed), priority);
        let mut book = self.registry.lock(id);
        let vacancy = book.fresh(id)?;
        let seq = self.try_admit(word)?;
        let slot = vacancy.run(user.take(), level, seq, &self.service_time);
        Some(self.running_ticket(id, slot))
    }

    /// Admits, queues or refuses a new request that [`Shared::admit_at_once`] did not admit.
    #[inline(never)]
    pub(crate) fn enqueue(
        self: &Arc<Self>,
        id: RequestId,
        mut user: Option<Key>,
        priority: u8,
    ) -> Result<Enqueued, Rejected> {
        let level = level_index(self.levels.load(Ordering::Relaxed), priority);
        let mut since = None;
        loop {
            match self.may_admit() {
                Some(word) => {
                    if let Some(ticket) = self.admit_checked(id, &mut user, level, word)? {
                        return Ok(Enqueued::Running(ticket));
                    }
                }
                // Likely to wait: the clock is read before the queue's lock is taken.
                None => {
                    since.get_or_insert_with(Instant::now);
                }
            }
            if let Some(waiting) = self.wait_in_line(id, &mut user, level, since)? {
                return Ok(waiting);
            }
        }
    }

    /// [`Shared::admit_at_once`] for any id: one in use is refused.
    fn admit_checked(
        self: &Arc<Self>,
        id: RequestId,
        user: &mut Option<Key>,
        level: usize,
        word: u64,
    ) -> Result<Option<Ticket>, Rejected> {
        let mut book = self.registry.lock(id);
        let Some(vacancy) = book.vacancy(id) else {
            return Err(duplicate(id));
        };
        let Some(seq) = self.try_admit(word) else {
            return Ok(None);
        };
        let slot = vacancy.run(user.take(), level, seq, &self.service_time);
        Ok(Some(self.running_ticket(id, slot)))
    }

    /// Queues a request that found no free slot, or refuses it if the queue is full; `since` is
    /// when it arrived, if read already. `None` if a slot has come free meanwhile: the caller
    /// tries again.
    ///
    /// Only the schedule is changed under the queue's lock; the request is registered in its
    /// shard after, before its ticket exists. Until then a cancellation through the handle does
    /// not find it, as though it had come a moment earlier than the request; whatever else
    /// takes a waiting request out of the queue (a timeout, its end) goes through its ticket.
    fn wait_in_line(
        self: &Arc<Self>,
        id: RequestId,
        user: &mut Option<Key>,
        level: usize,
        since: Option<Instant>,
    ) -> Result<Option<Enqueued>, Rejected> {
        let hash = user.as_ref().map_or(0, |user| self.users.hash(user));
        let mut queue = self.lock_queue();
        // The levels may have changed since `level` was picked.
        let level = level.min(queue.schedule.levels() - 1);
        let mut word = self.word.0.load(Ordering::Relaxed);
        loop {
            if word & WAITING == 0 && word & RUNNING < self.concurrency {
                return Ok(None);
            }
            if queue.schedule.len() >= queue.config.capacity {
                queue.counters.rejected += 1;
                let retry_after = self.service_time.next_free((word & RUNNING) as usize);
                tracing::debug!(%id, user = ?user, level = level + 1, "rejected: queue full");
                return Err(Rejected::new(RejectionKind::QueueFull).with_retry_after(retry_after));
            }
            if word & WAITING != 0 {
                break;
            }
            match self.word.0.compare_exchange_weak(
                word,
                word | WAITING,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // Nobody is admitted at once from now on: the schedule takes in those
                    // that were.
                    self.account_direct(&mut queue);
                    break;
                }
                Err(actual) => word = actual,
            }
        }
        let user = user.take();
        let waiter = queue.waiter();
        let since = since.unwrap_or_else(Instant::now);
        let waiting = Waiting {
            id,
            waiter: waiter.clone(),
            since,
        };
        let hashed = user.as_ref().map(|user| UserHasher::known(user, hash));
        let position = queue.schedule.push(level, hashed, waiting);
        tracing::debug!(%id, user = ?user, level = level + 1, waiting = queue.schedule.len(), "queued");
        let timeout = queue.config.queue_timeout;
        drop(queue);
        let mut book = self.registry.lock(id);
        let Some(vacancy) = book.vacancy(id) else {
            drop(book);
            self.withdraw(position, level, user.as_ref(), waiter);
            return Err(duplicate(id));
        };
        let slot = vacancy.queue(Entry {
            id,
            user,
            level,
            position,
            since,
            waiter: waiter.clone(),
        });
        drop(book);
        Ok(Some(Enqueued::Waiting(
            self.waiting_ticket(id, waiter, slot),
            timeout,
        )))
    }

    /// Takes back a request queued under an id that proved to be in use: it leaves the queue,
    /// or, if its turn came meanwhile, gives its slot to the next waiter.
    #[cold]
    fn withdraw(&self, position: Position, level: usize, user: Option<&Key>, waiter: Arc<Waiter>) {
        let mut queue = self.lock_queue();
        if waiter.leave() {
            queue.schedule.remove(position, user);
            self.left(&queue);
            queue.recycle(waiter);
            return;
        }
        // Granted: it never ran, so it is not counted as admitted.
        queue.counters.admitted = queue.counters.admitted.saturating_sub(1);
        queue.schedule.finish(level, position.user(user));
        let wake = self.release_locked(&mut queue, Some(waiter), Instant::now());
        drop(queue);
        if let Some(waker) = wake {
            waker.wake();
        }
    }

    /// Gives a slot back: to the next waiter if there is one, otherwise to the pool. The waiter
    /// of a request that waited, `spent`, is kept for reuse if others wait.
    #[inline]
    fn release(&self, spent: Option<Arc<Waiter>>) {
        let mut word = self.word.0.load(Ordering::Relaxed);
        while word & WAITING == 0 {
            match self.word.0.compare_exchange_weak(
                word,
                word - 1,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
        self.hand_over(spent);
    }

    /// [`Shared::release`] while requests wait.
    #[inline(never)]
    fn hand_over(&self, spent: Option<Arc<Waiter>>) {
        // The clock is read before the lock, to keep the lock's hold short.
        let now = Instant::now();
        let wake = self.release_locked(&mut self.lock_queue(), spent, now);
        if let Some(waker) = wake {
            waker.wake();
        }
    }

    /// [`Shared::release`] under the queue's lock: hands the slot to the next waiter, and
    /// clears the flag once nobody waits; keeps the waiter `spent` for reuse. Returns the task
    /// to wake once the lock is let go.
    #[must_use]
    fn release_locked(
        &self,
        queue: &mut Queue,
        spent: Option<Arc<Waiter>>,
        now: Instant,
    ) -> Option<Waker> {
        if let Some(waiter) = spent {
            queue.recycle(waiter);
        }
        let mut handed = false;
        let mut wake = None;
        while let Some(next) = queue.schedule.pop() {
            let waited = now.saturating_duration_since(next.since);
            if let Some(waker) = next.waiter.grant_after(waited) {
                tracing::debug!(id = %next.id, waited_ms = waited.as_millis() as u64, "admitted");
                wake = waker;
                let at_once = at_once(self.word.0.load(Ordering::Relaxed));
                queue.counters.admitted += 1;
                queue.waits.admitted_at_once(at_once, AT_ONCE_MODULUS);
                queue.waits.record(waited);
                handed = true;
                break;
            }
        }
        let empty = queue.schedule.len() == 0;
        if handed && !empty {
            return wake;
        }
        let mut word = self.word.0.load(Ordering::Relaxed);
        loop {
            let mut new = word;
            if !handed {
                new -= 1;
            }
            if empty {
                new &= !WAITING;
            }
            match self
                .word
                .0
                .compare_exchange_weak(word, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return wake,
                Err(actual) => word = actual,
            }
        }
    }

    /// Clears the flag if the last waiter has gone.
    fn left(&self, queue: &Queue) {
        if queue.schedule.len() == 0 {
            self.word.0.fetch_and(!WAITING, Ordering::Relaxed);
        }
    }

    /// Takes the waiting request `id`, in place `slot`, out of the queue (it left, timed out or
    /// was cancelled).
    fn remove_waiting(&self, queue: &mut Queue, book: &mut Book, slot: usize, id: RequestId) {
        let Some(entry) = book.remove(slot, id) else {
            return;
        };
        queue.schedule.remove(entry.position, entry.user.as_ref());
        self.left(queue);
    }

    /// Cancels a queued or running request — with `owner`, only one of that user. False if no
    /// such request is in the queue.
    pub(crate) fn cancel(&self, id: RequestId, owner: Option<&Key>) -> bool {
        let mut queue = self.lock_queue();
        let mut book = self.registry.lock(id);
        let Some((slot, entry)) = book.find_waited(id) else {
            drop(queue);
            return self.cancel_direct(id, owner, book);
        };
        if owner.is_some_and(|owner| entry.user.as_ref() != Some(owner)) {
            return false;
        }
        // Under the queue's lock, a waiting request is neither granted nor gone meanwhile.
        let queued = entry.waiter.is_waiting();
        if !entry.waiter.cancel() {
            return false;
        }
        tracing::debug!(%id, user = ?entry.user, "cancelled through the handle");
        book.counts.cancelled += 1;
        if queued {
            self.remove_waiting(&mut queue, &mut book, slot, id);
        }
        true
    }

    /// [`Shared::cancel`] of a request admitted at once, found in its shard's slab; wakes its
    /// task once the shard's lock is let go.
    fn cancel_direct(
        &self,
        id: RequestId,
        owner: Option<&Key>,
        mut book: MutexGuard<'_, Book>,
    ) -> bool {
        let Some((slot, direct)) = book.find(id) else {
            return false;
        };
        if owner.is_some_and(|owner| direct.user.as_ref() != Some(owner)) {
            return false;
        }
        tracing::debug!(%id, user = ?direct.user, "cancelled through the handle");
        let Some(waker) = self.registry.cancel_direct(id, slot, &mut book) else {
            return false;
        };
        drop(book);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    pub(crate) fn stats(&self) -> QueueStats {
        let counts = self.registry.counts();
        let mut queue = self.lock_queue();
        let word = self.word.0.load(Ordering::Relaxed);
        queue.waits.admitted_at_once(at_once(word), AT_ONCE_MODULUS);
        let (p50, p95, p99) = queue.waits.percentiles();
        self.account_direct(&mut queue);
        let c = &queue.counters;
        QueueStats {
            concurrency: queue.config.concurrency,
            capacity: queue.config.capacity,
            running: (word & RUNNING) as usize,
            waiting: queue.schedule.len(),
            waiting_per_level: (0..queue.schedule.levels())
                .map(|l| queue.schedule.len_at(l))
                .collect(),
            users: queue.schedule.flow_count(),
            admitted: c.admitted + counts.admitted,
            rejected: c.rejected + counts.rejected,
            timed_out: c.timed_out,
            cancelled: counts.cancelled,
            completed: counts.completed,
            failed: counts.failed,
            wait_p50: p50,
            wait_p95: p95,
            wait_p99: p99,
        }
    }

    /// The place of a waiting request in the queue (0: admitted next).
    pub(crate) fn position(&self, id: RequestId) -> Option<usize> {
        let queue = self.lock_queue();
        let book = self.registry.lock(id);
        let (_, entry) = book.find_waited(id)?;
        entry
            .waiter
            .is_waiting()
            .then(|| queue.schedule.rank(entry.position))
    }

    pub(crate) fn entries(&self) -> Vec<QueueEntry> {
        let now = Instant::now();
        let queue = self.lock_queue();
        let places: FastMap<RequestId, usize> = queue
            .schedule
            .order()
            .enumerate()
            .map(|(place, waiting)| (waiting.id, place))
            .collect();
        let mut entries = Vec::new();
        self.registry.for_each(|book| {
            entries.extend(book.waited().filter(|e| !e.is_cancelled()).map(|e| {
                let (state, waited) = if e.waiter.is_waiting() {
                    (EntryState::Queued, now.saturating_duration_since(e.since))
                } else {
                    (EntryState::Running, e.waiter.waited())
                };
                QueueEntry {
                    id: e.id,
                    user: e.user.clone(),
                    level: e.level as u8 + 1,
                    state,
                    waited,
                    position: places.get(&e.id).copied(),
                }
            }));
            entries.extend(book.direct().filter(|d| !d.cancelled).map(|d| QueueEntry {
                id: d.id,
                user: d.user.clone(),
                level: d.level as u8 + 1,
                state: EntryState::Running,
                waited: Duration::ZERO,
                position: None,
            }));
        });
        drop(queue);
        entries.sort_by_key(|e| e.id);
        entries
    }
}

impl Slot for Ticket {
    fn waiter(&self) -> Option<&Waiter> {
        self.waiter.as_deref()
    }

    fn is_cancelled(&self) -> bool {
        match &self.waiter {
            Some(waiter) => waiter.is_cancelled(),
            None => {
                let registry = &self.shared.registry;
                let cancels = registry.cancels(self.id);
                if cancels == self.cancels_seen.load(Ordering::Relaxed) {
                    return false;
                }
                self.cancels_seen.store(cancels, Ordering::Relaxed);
                registry.direct_cancelled(self.id, self.slot(), None)
            }
        }
    }

    fn set_finish(&mut self, finish: Finish) {
        self.finish = finish;
    }

    /// Takes the request out of the queue, unless it was admitted (or cancelled) meanwhile.
    fn time_out(&mut self) -> Option<Rejected> {
        let waiter = self.waiter.as_ref()?;
        let mut queue = self.shared.lock_queue();
        let mut book = self.shared.registry.lock(self.id);
        if !waiter.leave() {
            return None;
        }
        self.shared
            .remove_waiting(&mut queue, &mut book, self.slot(), self.id);
        queue.counters.timed_out += 1;
        tracing::debug!(id = %self.id, "rejected: queue timeout");
        self.released = true;
        Some(Rejected::new(RejectionKind::QueueTimeout))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let panicking = std::thread::panicking();
        // Each kind of request ends on its own path: merged into one, the end would be copied
        // through memory on the common path, read back in wider pieces than it was written in.
        match self.waiter.take() {
            None => {
                let mut accounted = None;
                let ended = self.shared.registry.end_direct(
                    self.id,
                    self.slot(),
                    (self.finish, panicking),
                    &mut accounted,
                );
                if let Some(ended) = ended {
                    self.shared.ended(ended, accounted.as_ref(), None);
                }
            }
            Some(waiter) => self.end_waited(waiter, panicking),
        }
    }
}

impl Ticket {
    /// Its place in its shard.
    #[inline]
    fn slot(&self) -> usize {
        self.slot as usize
    }

    /// The end of a request that waited: it leaves the queue if it still waits, or gives its
    /// slot back.
    #[inline(never)]
    fn end_waited(&mut self, waiter: Arc<Waiter>, panicking: bool) {
        let shared = &self.shared;
        if waiter.is_waiting() {
            let mut queue = shared.lock_queue();
            let mut book = shared.registry.lock(self.id);
            if waiter.leave() {
                book.counts.cancelled += 1;
                shared.remove_waiting(&mut queue, &mut book, self.slot(), self.id);
                return;
            }
        }
        let mut accounted = None;
        let ended = shared.registry.end(
            self.id,
            self.slot(),
            &waiter,
            (self.finish, panicking),
            &shared.service_time,
            &mut accounted,
        );
        if let Some(ended) = ended {
            // The waiter, for reuse by the next request that waits.
            shared.ended(ended, accounted.as_ref(), Some(waiter));
        }
    }
}

impl Shared {
    /// A running request has ended: tells the schedule if it counts the request (`accounted`),
    /// and gives the slot back. `spent` is the waiter of a request that waited.
    #[inline(always)]
    // `accounted` is borrowed: moved, it would be copied through memory on the common path.
    fn ended(&self, ended: Ended, accounted: Option<&Accounted>, spent: Option<Arc<Waiter>>) {
        if let Some(started) = ended.started {
            self.service_time.observe(started);
        }
        match accounted {
            Some(accounted) => self.end_accounted(accounted, spent),
            None => self.release(spent),
        }
    }

    /// [`Shared::ended`] of a request the schedule took in.
    #[inline(never)]
    fn end_accounted(&self, ended: &Accounted, spent: Option<Arc<Waiter>>) {
        // Likely to hand its slot over: the clock is read before the lock.
        let early = (self.word.0.load(Ordering::Relaxed) & WAITING != 0).then(Instant::now);
        let hash = ended.hash.unwrap_or_else(|| self.users.hash(&ended.user));
        let user = UserHasher::known(&ended.user, hash);
        let mut queue = self.lock_queue();
        queue.schedule.finish(ended.level, Some(user));
        let word = self.word.0.load(Ordering::Relaxed);
        if word & WAITING != 0 {
            let now = early.unwrap_or_else(Instant::now);
            let wake = self.release_locked(&mut queue, spent, now);
            drop(queue);
            if let Some(waker) = wake {
                waker.wake();
            }
            return;
        }
        drop(queue);
        self.release(spent);
    }
}

impl Guard for Ticket {
    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> bool {
        // The task stays registered from one poll to the next while it does not change.
        let standing = self.registered.stands(cx.waker());
        match &self.waiter {
            Some(waiter) if standing => waiter.is_cancelled(),
            Some(waiter) => waiter.poll_cancelled(cx),
            None => {
                let cancels = self.shared.registry.cancels(self.id);
                let seen = self.cancels_seen.get_mut();
                if cancels == *seen && standing {
                    return false;
                }
                *seen = cancels;
                self.shared
                    .registry
                    .direct_cancelled(self.id, self.slot(), Some(cx))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(concurrency: usize) -> Arc<Shared> {
        Arc::new(Shared::new(Config {
            concurrency,
            capacity: 10,
            levels: 1,
            queue_timeout: None,
            oldest_every: 0,
        }))
    }

    #[tokio::test]
    async fn a_refused_request_granted_before_it_was_registered_gives_its_slot_on() {
        let shared = shared(1);
        let user = Key::from(1u64);
        let Ok(Enqueued::Running(first)) = shared.enqueue(RequestId::from_u64(1), None, 1) else {
            panic!("the first request is admitted at once");
        };
        // What `wait_in_line` does for a request whose id proves to be in use, up to the point
        // where it is found out, with the slot handed to it meanwhile.
        let waiter = Arc::new(Waiter::new());
        let position = {
            let mut queue = shared.lock_queue();
            shared.word.0.fetch_or(WAITING, Ordering::Relaxed);
            let waiting = Waiting {
                id: RequestId::from_u64(2),
                waiter: waiter.clone(),
                since: Instant::now(),
            };
            queue
                .schedule
                .push(0, Some(shared.users.user(&user)), waiting)
        };
        drop(first);
        assert!(!waiter.is_waiting(), "the slot went to the waiting request");
        assert_eq!(shared.stats().running, 1);
        shared.withdraw(position, 0, Some(&user), waiter);
        let stats = shared.stats();
        assert_eq!(
            (stats.running, stats.waiting, stats.users),
            (0, 0, 0),
            "{stats:?}"
        );
        assert_eq!((stats.admitted, stats.completed), (1, 0), "{stats:?}");
        assert!(matches!(
            shared.enqueue(RequestId::from_u64(3), None, 1),
            Ok(Enqueued::Running(_))
        ));
    }
}
