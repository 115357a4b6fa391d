//! Per-user slots, held in shards; a user with nothing in flight and nobody waiting has no entry.
//!
//! A request hashes its user's key once: the hash picks the shard and finds the user in the
//! shard's table, and the request keeps it to find the user again when it ends. Each shard
//! counts what happened in it, under the lock it takes anyway; stats add the shards up.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Context;
use std::time::Duration;

use hashbrown::HashTable;

use crate::admission::{Finish, Slot};
use crate::clock::AtomicDuration;
use crate::hold::{Guard, Permit};
use crate::key::Key;
use crate::rejected::{Rejected, RejectionKind};
use crate::service_time::ServiceTime;
use crate::sharded::{lock, Hasher};
use crate::waiter::Waiter;

use super::stats::PerUserStats;

#[derive(Debug)]
struct User {
    hash: u64,
    key: Key,
    in_flight: usize,
    waiters: VecDeque<Arc<Waiter>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    admitted: u64,
    rejected: u64,
    waited: u64,
    timed_out: u64,
    cancelled: u64,
    completed: u64,
    failed: u64,
}

#[derive(Debug, Default)]
struct Book {
    users: HashTable<User>,
    counters: Counters,
    starts: u32,
}

impl Book {
    fn find(&mut self, hash: u64, key: &Key) -> Option<&mut User> {
        self.users.find_mut(hash, |u| u.key == *key)
    }

    /// Takes the user out once nothing is left of it.
    fn forget_if_idle(&mut self, hash: u64, key: &Key) {
        if let Ok(entry) = self.users.find_entry(hash, |u| u.key == *key) {
            let user = entry.get();
            if user.in_flight == 0 && user.waiters.is_empty() {
                entry.remove();
                self.shrink();
            }
        }
    }

    /// Gives memory back when the table has become mostly empty (see
    /// [`shrink_to`](crate::sharded::shrink_to)).
    fn shrink(&mut self) {
        if let Some(to) = crate::sharded::shrink_to(self.users.len(), self.users.capacity()) {
            self.users.shrink_to(to, |u| u.hash);
        }
    }
}

/// A shard on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<Book>);

#[derive(Debug)]
pub(crate) struct Shared {
    max_per_user: AtomicUsize,
    max_waiting: AtomicUsize,
    timeout: AtomicDuration,
    shards: Box<[Shard]>,
    hasher: Hasher,
    /// How long a request holds a user's slot, for the `retry_after` of `UserLimit`.
    service_time: ServiceTime,
}

pub(crate) enum Acquired {
    Running(UserSlot),
    Waiting(UserSlot, Option<Duration>),
}

/// One request's claim on a user's slots.
#[derive(Debug)]
pub(crate) struct UserSlot {
    shared: Arc<Shared>,
    key: Key,
    hash: u64,
    /// `None` when the slot was taken at once; otherwise the slot is held once this waiter has
    /// been granted.
    waiter: Option<Arc<Waiter>>,
    /// Timed out and already out of the user's line: nothing left to give up.
    released: bool,
    finish: Finish,
    /// When it took its slot, if sampled for the service-time estimate.
    started: Option<tokio::time::Instant>,
}

impl Shared {
    pub(crate) fn new(max_per_user: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let count = (cores * 4).next_power_of_two();
        Shared {
            max_per_user: AtomicUsize::new(max_per_user),
            max_waiting: AtomicUsize::new(0),
            timeout: AtomicDuration::new(None),
            shards: (0..count).map(|_| Shard::default()).collect(),
            hasher: Hasher::default(),
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

    /// The shard of the key with this hash, locked. The shard comes from the hash's high bits,
    /// the table's buckets from its low ones.
    fn lock(&self, hash: u64) -> MutexGuard<'_, Book> {
        lock(&self.shards[(hash >> 48) as usize & (self.shards.len() - 1)].0)
    }

    pub(crate) fn acquire(self: &Arc<Self>, key: Key) -> Result<Acquired, Rejected> {
        let max = self.max_per_user.load(Relaxed);
        let max_waiting = self.max_waiting.load(Relaxed);
        let hash = self.hasher.hash_one(&key);
        let mut book = self.lock(hash);
        let user = book
            .users
            .entry(hash, |u| u.key == key, |u| u.hash)
            .or_insert_with(|| User {
                hash,
                key: key.clone(),
                in_flight: 0,
                waiters: VecDeque::new(),
            })
            .into_mut();
        if user.in_flight < max && user.waiters.is_empty() {
            user.in_flight += 1;
            book.counters.admitted += 1;
            book.starts = book.starts.wrapping_add(1);
            let starts = book.starts;
            drop(book);
            tracing::trace!(user = %key, "admitted");
            return Ok(Acquired::Running(UserSlot {
                shared: self.clone(),
                key,
                hash,
                waiter: None,
                released: false,
                finish: Finish::Dropped,
                started: crate::service_time::sampled(starts),
            }));
        }
        if user.waiters.len() < max_waiting {
            let waiter = Arc::new(Waiter::new());
            user.waiters.push_back(waiter.clone());
            book.counters.waited += 1;
            drop(book);
            tracing::debug!(user = %key, "waiting for one of the user's slots");
            let timeout = self.timeout.get();
            return Ok(Acquired::Waiting(
                UserSlot {
                    shared: self.clone(),
                    key,
                    hash,
                    waiter: Some(waiter),
                    released: false,
                    finish: Finish::Dropped,
                    started: None,
                },
                timeout,
            ));
        }
        let in_flight = user.in_flight;
        book.forget_if_idle(hash, &key);
        book.counters.rejected += 1;
        drop(book);
        tracing::debug!(user = %key, max_per_user = max, "rejected: user limit");
        Err(Rejected::new(RejectionKind::UserLimit)
            .with_message(format!(
                "too many concurrent requests: at most {max} per user; \
                 wait for a current one to complete"
            ))
            .with_retry_after(self.service_time.next_free(in_flight)))
    }

    /// Counts how a request that held a slot ended, gives its slot to the user's next waiter,
    /// or frees it.
    fn release(&self, hash: u64, key: &Key, count: impl FnOnce(&mut Counters)) {
        let mut book = self.lock(hash);
        count(&mut book.counters);
        let Ok(mut entry) = book.users.find_entry(hash, |u| u.key == *key) else {
            return;
        };
        let user = entry.get_mut();
        while let Some(next) = user.waiters.pop_front() {
            if let Some(wake) = next.grant() {
                drop(book);
                if let Some(waker) = wake {
                    waker.wake();
                }
                return;
            }
        }
        user.in_flight -= 1;
        if user.in_flight == 0 && user.waiters.is_empty() {
            entry.remove();
            book.shrink();
        }
    }

    /// A waiter gives up; true if it left before it was granted a slot.
    fn leave(&self, hash: u64, key: &Key, waiter: &Arc<Waiter>, count: fn(&mut Counters)) -> bool {
        let mut book = self.lock(hash);
        if !waiter.leave() {
            return false;
        }
        count(&mut book.counters);
        if let Some(user) = book.find(hash, key) {
            if let Some(at) = user.waiters.iter().position(|w| Arc::ptr_eq(w, waiter)) {
                user.waiters.remove(at);
            }
            book.forget_if_idle(hash, key);
        }
        true
    }

    pub(crate) fn in_flight_of(&self, key: &Key) -> usize {
        let hash = self.hasher.hash_one(key);
        self.lock(hash).find(hash, key).map_or(0, |u| u.in_flight)
    }

    pub(crate) fn stats(&self) -> PerUserStats {
        let (mut users, mut in_flight, mut waiting) = (0, 0, 0);
        let mut c = Counters::default();
        for shard in self.shards.iter() {
            let book = lock(&shard.0);
            users += book.users.len();
            for user in book.users.iter() {
                in_flight += user.in_flight;
                waiting += user.waiters.len();
            }
            let s = book.counters;
            c.admitted += s.admitted;
            c.rejected += s.rejected;
            c.waited += s.waited;
            c.timed_out += s.timed_out;
            c.cancelled += s.cancelled;
            c.completed += s.completed;
            c.failed += s.failed;
        }
        PerUserStats {
            max_per_user: self.max_per_user(),
            max_waiting_per_user: self.max_waiting(),
            users,
            in_flight,
            waiting,
            admitted: c.admitted,
            rejected: c.rejected,
            waited: c.waited,
            timed_out: c.timed_out,
            cancelled: c.cancelled,
            completed: c.completed,
            failed: c.failed,
        }
    }
}

impl Slot for UserSlot {
    fn waiter(&self) -> Option<&Waiter> {
        self.waiter.as_deref()
    }

    fn time_out(&mut self) -> Option<Rejected> {
        let waiter = self.waiter.as_ref()?;
        if !self
            .shared
            .leave(self.hash, &self.key, waiter, |c| c.timed_out += 1)
        {
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
            if self
                .shared
                .leave(self.hash, &self.key, waiter, |c| c.cancelled += 1)
            {
                return;
            }
        }
        if let Some(started) = self.started {
            self.shared.service_time.observe(started);
        }
        let (panicking, finish) = (std::thread::panicking(), self.finish);
        self.shared
            .release(self.hash, &self.key, |c| match (panicking, finish) {
                (true, _) | (false, Finish::Failed) => c.failed += 1,
                (false, Finish::Completed) => c.completed += 1,
                (false, Finish::Dropped) => c.cancelled += 1,
            });
    }
}

impl Guard for UserSlot {
    fn poll_cancelled(&mut self, _: &mut Context<'_>) -> bool {
        false
    }
}

impl From<UserSlot> for Permit {
    fn from(slot: UserSlot) -> Self {
        Permit::new(slot)
    }
}

#[cfg(test)]
impl Shared {
    /// Room allocated for per-user entries, and the number of shards.
    pub(super) fn user_capacity(&self) -> (usize, usize) {
        let capacity = self
            .shards
            .iter()
            .map(|s| lock(&s.0).users.capacity())
            .sum();
        (capacity, self.shards.len())
    }
}
