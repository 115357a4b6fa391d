//! Per-user slots, held in shards; a user with nothing in flight and nobody waiting has no entry.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;

use crate::admission::{Finish, Slot};
use crate::clock::AtomicDuration;
use crate::hold::{Guard, Permit};
use crate::key::Key;
use crate::rejected::{Rejected, RejectionKind};
use crate::service_time::ServiceTime;
use crate::sharded::{shrink, Sharded};
use crate::waiter::Waiter;

use super::stats::PerUserStats;

#[derive(Debug, Default)]
struct User {
    in_flight: usize,
    waiters: VecDeque<Arc<Waiter>>,
}

#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    rejected: AtomicU64,
    waited: AtomicU64,
    timed_out: AtomicU64,
    cancelled: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    max_per_user: AtomicUsize,
    max_waiting: AtomicUsize,
    timeout: AtomicDuration,
    users: Sharded<User>,
    counters: Counters,
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
        Shared {
            max_per_user: AtomicUsize::new(max_per_user),
            max_waiting: AtomicUsize::new(0),
            timeout: AtomicDuration::new(None),
            users: Sharded::new(),
            counters: Counters::default(),
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

    pub(crate) fn acquire(self: &Arc<Self>, key: Key) -> Result<Acquired, Rejected> {
        let max = self.max_per_user.load(Relaxed);
        let max_waiting = self.max_waiting.load(Relaxed);
        let mut shard = self.users.lock(&key);
        let user = shard.entry(key.clone()).or_default();
        if user.in_flight < max && user.waiters.is_empty() {
            user.in_flight += 1;
            drop(shard);
            self.counters.admitted.fetch_add(1, Relaxed);
            tracing::trace!(user = %key, "admitted");
            return Ok(Acquired::Running(self.slot(key, None)));
        }
        if user.waiters.len() < max_waiting {
            let waiter = Arc::new(Waiter::new());
            user.waiters.push_back(waiter.clone());
            drop(shard);
            self.counters.waited.fetch_add(1, Relaxed);
            tracing::debug!(user = %key, "waiting for one of the user's slots");
            let timeout = self.timeout.get();
            return Ok(Acquired::Waiting(self.slot(key, Some(waiter)), timeout));
        }
        let in_flight = user.in_flight;
        if user.in_flight == 0 && user.waiters.is_empty() {
            shard.remove(&key);
        }
        drop(shard);
        self.counters.rejected.fetch_add(1, Relaxed);
        tracing::debug!(user = %key, max_per_user = max, "rejected: user limit");
        Err(Rejected::new(RejectionKind::UserLimit)
            .with_message(format!(
                "too many concurrent requests: at most {max} per user; \
                 wait for a current one to complete"
            ))
            .with_retry_after(self.service_time.next_free(in_flight)))
    }

    fn slot(self: &Arc<Self>, key: Key, waiter: Option<Arc<Waiter>>) -> UserSlot {
        UserSlot {
            shared: self.clone(),
            key,
            started: waiter
                .is_none()
                .then(|| self.service_time.sample())
                .flatten(),
            waiter,
            released: false,
            finish: Finish::Dropped,
        }
    }

    /// Gives a finished request's slot to the user's next waiter, or frees it.
    fn release(&self, key: &Key) {
        let mut shard = self.users.lock(key);
        let Some(user) = shard.get_mut(key) else {
            return;
        };
        while let Some(next) = user.waiters.pop_front() {
            if next.grant() {
                return;
            }
        }
        user.in_flight -= 1;
        if user.in_flight == 0 {
            shard.remove(key);
            shrink(&mut shard);
        }
    }

    /// A waiter gives up; true if it left before it was granted a slot.
    fn leave(&self, key: &Key, waiter: &Arc<Waiter>) -> bool {
        let mut shard = self.users.lock(key);
        if !waiter.leave() {
            return false;
        }
        if let Some(user) = shard.get_mut(key) {
            if let Some(at) = user.waiters.iter().position(|w| Arc::ptr_eq(w, waiter)) {
                user.waiters.remove(at);
            }
            if user.in_flight == 0 && user.waiters.is_empty() {
                shard.remove(key);
                shrink(&mut shard);
            }
        }
        true
    }

    pub(crate) fn in_flight_of(&self, key: &Key) -> usize {
        self.users.lock(key).get(key).map_or(0, |u| u.in_flight)
    }

    pub(crate) fn stats(&self) -> PerUserStats {
        let (mut users, mut in_flight, mut waiting) = (0, 0, 0);
        self.users.for_each_shard(|shard| {
            users += shard.len();
            for user in shard.values() {
                in_flight += user.in_flight;
                waiting += user.waiters.len();
            }
        });
        let c = &self.counters;
        PerUserStats {
            max_per_user: self.max_per_user(),
            max_waiting_per_user: self.max_waiting(),
            users,
            in_flight,
            waiting,
            admitted: c.admitted.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            waited: c.waited.load(Relaxed),
            timed_out: c.timed_out.load(Relaxed),
            cancelled: c.cancelled.load(Relaxed),
            completed: c.completed.load(Relaxed),
            failed: c.failed.load(Relaxed),
        }
    }
}

impl Slot for UserSlot {
    fn waiter(&self) -> Option<&Waiter> {
        self.waiter.as_deref()
    }

    fn time_out(&mut self) -> Option<Rejected> {
        let waiter = self.waiter.as_ref()?;
        if !self.shared.leave(&self.key, waiter) {
            return None;
        }
        self.shared.counters.timed_out.fetch_add(1, Relaxed);
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
            if self.shared.leave(&self.key, waiter) {
                self.shared.counters.cancelled.fetch_add(1, Relaxed);
                return;
            }
        }
        let c = &self.shared.counters;
        match (std::thread::panicking(), self.finish) {
            (true, _) | (false, Finish::Failed) => c.failed.fetch_add(1, Relaxed),
            (false, Finish::Completed) => c.completed.fetch_add(1, Relaxed),
            (false, Finish::Dropped) => c.cancelled.fetch_add(1, Relaxed),
        };
        if let Some(started) = self.started {
            self.shared.service_time.observe(started);
        }
        self.shared.release(&self.key);
    }
}

impl Guard for UserSlot {
    fn poll_cancelled(&self, _: &mut Context<'_>) -> bool {
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
        (self.users.capacity(), self.users.shard_count())
    }
}
