//! Per-user slots. Each user seen lately has a cell, found through a sharded map; a request
//! holds its user's cell, so that ending it touches that cell alone.
//!
//! A cell's state is one word: the slots held, and a flag set while requests wait in the cell's
//! line. While nobody waits, a slot is taken and given back with one compare-and-swap on that
//! word, without the line's lock; that lock is taken only to wait, to leave the line, or to hand a
//! slot to the next in it. The flag changes only under the line's lock, so a slot given back
//! without it can never be owed to a waiter.
//!
//! A cell nobody holds (no request in flight or waiting) stays in the map until it is swept:
//! as new users arrive (each shard sweeps once it has taken in as many new users as it kept,
//! see [`Sharded`]) and whenever the stats are read. Counters are per shard, summed on read:
//! the requests admitted at once in the shard itself, under the lock that found their cell
//! (the compare-and-swap that admits them is made before it is let go), the others in atomics.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::AcqRel, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;

use crate::admission::{Finish, Slot};
use crate::clock::AtomicDuration;
use crate::hold::Guard;
use crate::key::Key;
use crate::rejected::{Rejected, RejectionKind};
use crate::service_time::ServiceTime;
use crate::sharded::{lock, Count, Mutex, Sharded};
use crate::waiter::Waiter;

use super::stats::PerUserStats;

/// The flag of a cell's state word set while its line is not empty; the other bits count the
/// slots held.
const WAITING: usize = 1 << (usize::BITS - 1);

/// One user's slots and line.
#[derive(Debug, Default)]
struct User {
    /// Slots held, and [`WAITING`].
    state: AtomicUsize,
    /// Requests waiting for one of the user's slots, by arrival.
    line: Mutex<VecDeque<Arc<Waiter>>>,
}

impl User {
    /// Gives a slot back: to the first in line if anybody waits, otherwise to the user. Returns
    /// the task to wake.
    fn release(&self) -> Option<std::task::Waker> {
        let mut state = self.state.load(Relaxed);
        while state & WAITING == 0 {
            match self
                .state
                .compare_exchange_weak(state, state - 1, AcqRel, Relaxed)
            {
                Ok(_) => return None,
                Err(actual) => state = actual,
            }
        }
        let mut line = lock(&self.line);
        while let Some(next) = line.pop_front() {
            if let Some(wake) = next.grant() {
                if line.is_empty() {
                    self.state.fetch_and(!WAITING, Relaxed);
                }
                return wake;
            }
        }
        self.state
            .fetch_update(AcqRel, Relaxed, |state| Some((state & !WAITING) - 1))
            .ok();
        None
    }
}

/// What happened in one shard, counted as it happens. (The requests admitted at once are
/// counted in the shard itself, under the lock their admission holds.)
#[derive(Debug, Default)]
#[repr(align(128))]
struct Counters {
    rejected: AtomicU64,
    waited: AtomicU64,
    timed_out: AtomicU64,
    cancelled: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

#[derive(Debug)]
pub(crate) struct Shared {
    max_per_user: AtomicUsize,
    max_waiting: AtomicUsize,
    timeout: AtomicDuration,
    /// Each shard counts the requests admitted at once to its users; the count picks those
    /// sampled for the service-time estimate.
    users: Sharded<Arc<User>, Count>,
    /// One per shard of `users`.
    counters: Box<[Counters]>,
    /// How long a request holds a user's slot, for the `retry_after` of `UserLimit`.
    service_time: ServiceTime,
}

/// A request [`Shared::take_at_once`] could not admit: its user's cell, and the cell's state
/// as last read.
pub(crate) struct Busy {
    user: Arc<User>,
    shard: usize,
    key: Key,
    state: usize,
}

pub(crate) enum Acquired {
    Running(UserSlot),
    Waiting(UserSlot, Option<Duration>),
}

/// One request's claim on a user's slots.
#[derive(Debug)]
pub(crate) struct UserSlot {
    shared: Arc<Shared>,
    user: Arc<User>,
    /// The shard of the user's cell, whose counters count this request. (Four bytes: with the
    /// others, they keep a response future small enough to be moved without a call to
    /// `memcpy`.)
    shard: u32,
    key: Key,
    /// `None` when the slot was taken at once; otherwise the slot is held once this waiter has
    /// been granted.
    waiter: Option<Arc<Waiter>>,
    /// Timed out and already out of the user's line: nothing left to give up.
    released: bool,
    finish: Finish,
    /// When it took its slot, if sampled for the service-time estimate.
    started: Option<tokio::time::Instant>,
}

/// A cell only the map holds: no request of its user is in flight or waiting.
fn unheld(user: &mut Arc<User>) -> bool {
    Arc::strong_count(user) == 1
}

impl Shared {
    pub(crate) fn new(max_per_user: usize) -> Self {
        let users = Sharded::new();
        Shared {
            max_per_user: AtomicUsize::new(max_per_user),
            max_waiting: AtomicUsize::new(0),
            timeout: AtomicDuration::new(None),
            counters: (0..users.shard_count())
                .map(|_| Counters::default())
                .collect(),
            users,
            service_time: ServiceTime::default(),
        }
    }

    pub(crate) fn set_wait(&self, max_waiting: usize, timeout: Duration) {
        self.max_waiting.store(max_waiting, Relaxed);
        self.timeout.set(Some(timeout));
    }

    pub(crate) fn set_reject(&self) {
        self.max_waiting.store(0, Relaxed);
        self.timeout.set(None);
    }

    pub(crate) fn max_per_user(&self) -> usize {
        self.max_per_user.load(Relaxed)
    }

    pub(crate) fn max_waiting(&self) -> usize {
        self.max_waiting.load(Relaxed)
    }

    /// Takes one of the user's slots at once if one is free and nobody of the user waits: the
    /// path of most requests. Otherwise gives back what [`Shared::acquire`] goes on from.
    // Inlined into the service's call, so that the slot is built where the response future
    // keeps it: returned through memory and copied, it would be read back in wider pieces than
    // it was written in, and the copy would stall on the fields just written.
    #[inline(always)]
    pub(crate) fn take_at_once(self: &Arc<Self>, key: Key) -> Result<UserSlot, Busy> {
        let max = self.max_per_user.load(Relaxed);
        let mut place = self.users.lock(&key);
        let user = place.get_or_reuse(unheld, Arc::default).clone();
        let shard = place.index();
        let mut state = user.state.load(Relaxed);
        // A slot taken at once is taken under the shard's lock, which counts it.
        while state & WAITING == 0 && state < max {
            match user
                .state
                .compare_exchange_weak(state, state + 1, AcqRel, Relaxed)
            {
                Ok(_) => {
                    let admitted = place.tally().add(1);
                    drop(place);
                    tracing::trace!(user = %key, "admitted");
                    let started = self.service_time.sampled(admitted as u32);
                    return Ok(self.slot(user, shard, key, None, started));
                }
                Err(actual) => state = actual,
            }
        }
        drop(place);
        Err(Busy {
            user,
            shard,
            key,
            state,
        })
    }

    /// A request's claim on `user`'s slots, built in one piece.
    #[inline(always)]
    fn slot(
        self: &Arc<Self>,
        user: Arc<User>,
        shard: usize,
        key: Key,
        waiter: Option<Arc<Waiter>>,
        started: Option<tokio::time::Instant>,
    ) -> UserSlot {
        UserSlot {
            shared: self.clone(),
            user,
            shard: shard as u32,
            key,
            waiter,
            released: false,
            finish: Finish::Dropped,
            started,
        }
    }

    /// Takes a slot, waits in the user's line or refuses, for a request that
    /// [`Shared::take_at_once`] could not admit.
    #[inline(never)]
    pub(crate) fn acquire(self: &Arc<Self>, busy: Busy) -> Result<Acquired, Rejected> {
        let Busy {
            user,
            shard,
            key,
            mut state,
        } = busy;
        let max = self.max_per_user.load(Relaxed);
        let counters = &self.counters[shard];
        let mut line = None;
        loop {
            if state & WAITING == 0 && state < max {
                match user
                    .state
                    .compare_exchange_weak(state, state + 1, AcqRel, Relaxed)
                {
                    Ok(_) => {
                        // Counted in the shard, under its lock, once the line's is let go.
                        drop(line);
                        let admitted = self.users.lock(&key).tally().add(1);
                        tracing::trace!(user = %key, "admitted");
                        let started = self.service_time.sampled(admitted as u32);
                        return Ok(Acquired::Running(
                            self.slot(user, shard, key, None, started),
                        ));
                    }
                    Err(actual) => state = actual,
                }
                continue;
            }
            // The line's flag changes only under its lock: take it, and look again.
            let Some(waiting) = line.as_mut() else {
                line = Some(lock(&user.line));
                state = user.state.load(Relaxed);
                continue;
            };
            if waiting.len() >= self.max_waiting.load(Relaxed) {
                break;
            }
            if state & WAITING == 0 {
                if let Err(actual) =
                    user.state
                        .compare_exchange_weak(state, state | WAITING, AcqRel, Relaxed)
                {
                    state = actual;
                    continue;
                }
            }
            let waiter = Arc::new(Waiter::new());
            waiting.push_back(waiter.clone());
            drop(line);
            count(&counters.waited);
            tracing::debug!(user = %key, "waiting for one of the user's slots");
            let timeout = self.timeout.get();
            let slot = self.slot(user, shard, key, Some(waiter), None);
            return Ok(Acquired::Waiting(slot, timeout));
        }
        drop(line);
        count(&counters.rejected);
        tracing::debug!(user = %key, max_per_user = max, "rejected: user limit");
        Err(Rejected::new(RejectionKind::UserLimit)
            .with_message(format!(
                "too many concurrent requests: at most {max} per user; \
                 wait for a current one to complete"
            ))
            .with_retry_after(self.service_time.next_free(state & !WAITING)))
    }

    pub(crate) fn in_flight_of(&self, key: &Key) -> usize {
        self.users
            .lock(key)
            .get()
            .map_or(0, |user| user.state.load(Relaxed) & !WAITING)
    }

    pub(crate) fn stats(&self) -> PerUserStats {
        let (mut users, mut in_flight, mut waiting, mut admitted) = (0, 0, 0, 0u64);
        self.users.for_each_shard(|shard| {
            admitted += shard.tally().get();
            shard.sweep(unheld);
            for user in shard.values() {
                let line = lock(&user.line).len();
                let held = user.state.load(Relaxed) & !WAITING;
                users += usize::from(held > 0 || line > 0);
                in_flight += held;
                waiting += line;
            }
        });
        let sum = |counter: fn(&Counters) -> &AtomicU64| {
            self.counters
                .iter()
                .map(|c| counter(c).load(Relaxed))
                .sum::<u64>()
        };
        PerUserStats {
            max_per_user: self.max_per_user(),
            max_waiting_per_user: self.max_waiting(),
            users,
            in_flight,
            waiting,
            admitted,
            rejected: sum(|c| &c.rejected),
            waited: sum(|c| &c.waited),
            timed_out: sum(|c| &c.timed_out),
            cancelled: sum(|c| &c.cancelled),
            completed: sum(|c| &c.completed),
            failed: sum(|c| &c.failed),
        }
    }
}

impl UserSlot {
    fn counters(&self) -> &Counters {
        &self.shared.counters[self.shard as usize]
    }

    /// The waiter gives up; true if it left before it was granted a slot.
    fn leave(&self, waiter: &Arc<Waiter>, counter: fn(&Counters) -> &AtomicU64) -> bool {
        let mut line = lock(&self.user.line);
        if !waiter.leave() {
            return false;
        }
        if let Some(at) = line.iter().position(|w| Arc::ptr_eq(w, waiter)) {
            line.remove(at);
        }
        if line.is_empty() {
            self.user.state.fetch_and(!WAITING, Relaxed);
        }
        drop(line);
        count(counter(self.counters()));
        true
    }
}

impl Slot for UserSlot {
    fn waiter(&self) -> Option<&Waiter> {
        self.waiter.as_deref()
    }

    fn time_out(&mut self) -> Option<Rejected> {
        let waiter = self.waiter.as_ref()?;
        if !self.leave(waiter, |c| &c.timed_out) {
            return None;
        }
        tracing::debug!(user = %self.key, "rejected: waited too long for a user slot");
        self.released = true;
        Some(
            Rejected::new(RejectionKind::UserLimit)
                .with_message("waited too long for one of this user's requests to complete"),
        )
    }

    fn is_cancelled(&self) -> bool {
        false
    }

    fn set_finish(&mut self, finish: Finish) {
        self.finish = finish;
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Some(waiter) = &self.waiter {
            if self.leave(waiter, |c| &c.cancelled) {
                return;
            }
        }
        if let Some(started) = self.started {
            self.shared.service_time.observe(started);
        }
        let counters = self.counters();
        count(match (self.finish, std::thread::panicking()) {
            (Finish::Failed, _) | (_, true) => &counters.failed,
            (Finish::Completed, false) => &counters.completed,
            (Finish::Dropped, false) => &counters.cancelled,
        });
        if let Some(waker) = self.user.release() {
            waker.wake();
        }
    }
}

impl Guard for UserSlot {
    fn poll_cancelled(&mut self, _: &mut Context<'_>) -> bool {
        false
    }
}

#[cfg(test)]
impl Shared {
    /// Room allocated for per-user entries, and the number of shards.
    pub(super) fn user_capacity(&self) -> (usize, usize) {
        let mut capacity = 0;
        self.users
            .for_each_shard(|shard| capacity += shard.capacity());
        (capacity, self.users.shard_count())
    }
}
