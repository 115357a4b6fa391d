//! The state one queue shares among its layer, services, futures and handle.

use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::Duration;

use tokio::time::Instant;

use crate::admission::{Finish, Slot};
use crate::hold::{Guard, Permit};
use crate::key::Key;
use crate::rejected::{Rejected, RejectionKind};
use crate::service_time::ServiceTime;
use crate::sharded::{lock, FastMap};
use crate::waiter::Waiter;

use super::schedule::{Position, Schedule};
use super::stats::{EntryState, QueueEntry, QueueStats, RecentWaits};
use super::RequestId;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) concurrency: usize,
    pub(crate) capacity: usize,
    pub(crate) levels: usize,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) oldest_every: u32,
}

impl Config {
    fn level_index(&self, priority: u8) -> usize {
        (priority.max(1) as usize).min(self.levels) - 1
    }
}

#[derive(Debug)]
enum Phase {
    Queued {
        position: Position,
        since: Instant,
    },
    Running {
        waited: Duration,
        /// When it was admitted, for the service-time estimate: requests that waited read the
        /// clock anyway; of those admitted at once, only sampled ones do.
        started: Option<Instant>,
    },
}

#[derive(Debug)]
struct Entry {
    user: Option<Key>,
    level: usize,
    phase: Phase,
    waiter: Arc<Waiter>,
}

#[derive(Debug, Default)]
struct Counters {
    admitted: u64,
    rejected: u64,
    timed_out: u64,
    cancelled: u64,
    completed: u64,
    failed: u64,
}

#[derive(Debug)]
struct State {
    config: Config,
    schedule: Schedule,
    entries: FastMap<RequestId, Entry>,
    running: usize,
    counters: Counters,
    waits: RecentWaits,
    /// How long a request holds its slot, for the `retry_after` of `QueueFull`.
    service_time: ServiceTime,
}

#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
}

/// A request's registration in the queue. Dropping it — at any moment — takes the request out of
/// the queue or gives its slot to the next waiter.
#[derive(Debug)]
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    id: RequestId,
    waiter: Arc<Waiter>,
    finish: Finish,
    released: bool,
}

pub(crate) enum Enqueued {
    /// Admitted at once.
    Running(Ticket),
    /// Waiting for its turn, at most this long.
    Waiting(Ticket, Option<Duration>),
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        let schedule = Schedule::new(config.levels, config.oldest_every);
        Shared {
            state: Mutex::new(State {
                config,
                schedule,
                entries: FastMap::default(),
                running: 0,
                counters: Counters::default(),
                waits: RecentWaits::default(),
                service_time: ServiceTime::default(),
            }),
        }
    }

    /// Changes the configuration; false (and nothing changed) if the number of levels cannot
    /// change because requests are queued.
    pub(crate) fn configure(&self, f: impl FnOnce(&mut Config)) -> bool {
        let mut state = lock(&self.state);
        let before = state.config.clone();
        f(&mut state.config);
        let (levels, oldest_every) = (state.config.levels, state.config.oldest_every);
        if !state.schedule.reconfigure(levels, oldest_every) {
            state.config = before;
            return false;
        }
        true
    }

    pub(crate) fn config(&self) -> Config {
        lock(&self.state).config.clone()
    }

    pub(crate) fn enqueue(
        self: &Arc<Self>,
        id: RequestId,
        user: Option<Key>,
        priority: u8,
    ) -> Result<Enqueued, Rejected> {
        let mut state = lock(&self.state);
        let level = state.config.level_index(priority);
        if state.entries.contains_key(&id) {
            state.counters.rejected += 1;
            return Err(Rejected::new(RejectionKind::MissingKey)
                .with_message(format!("request id {id} is already in use")));
        }
        if state.running < state.config.concurrency && state.schedule.len() == 0 {
            state.schedule.admit_directly(level, user.as_ref());
            state.running += 1;
            state.counters.admitted += 1;
            state.waits.record(Duration::ZERO);
            tracing::trace!(%id, user = ?user, level = level + 1, "admitted at once");
            let started = state.service_time.sample();
            let entry = Entry {
                user,
                level,
                phase: Phase::Running {
                    waited: Duration::ZERO,
                    started,
                },
                waiter: Arc::new(Waiter::granted()),
            };
            let ticket = self.register(&mut state, id, entry);
            return Ok(Enqueued::Running(ticket));
        }
        if state.schedule.len() >= state.config.capacity {
            state.counters.rejected += 1;
            let retry_after = state.estimate_wait();
            tracing::debug!(%id, user = ?user, level = level + 1, "rejected: queue full");
            return Err(Rejected::new(RejectionKind::QueueFull).with_retry_after(retry_after));
        }
        let pos = state.schedule.push(level, user.as_ref(), id);
        tracing::debug!(%id, user = ?user, level = level + 1, waiting = state.schedule.len(), "queued");
        let entry = Entry {
            user,
            level,
            phase: Phase::Queued {
                position: pos,
                since: Instant::now(),
            },
            waiter: Arc::new(Waiter::new()),
        };
        let ticket = self.register(&mut state, id, entry);
        Ok(Enqueued::Waiting(ticket, state.config.queue_timeout))
    }

    fn register(self: &Arc<Self>, state: &mut State, id: RequestId, entry: Entry) -> Ticket {
        let waiter = entry.waiter.clone();
        state.entries.insert(id, entry);
        Ticket {
            shared: self.clone(),
            id,
            waiter,
            finish: Finish::Dropped,
            released: false,
        }
    }

    /// Cancels a queued or running request — with `owner`, only one of that user. False if no
    /// such request is in the queue.
    pub(crate) fn cancel(&self, id: RequestId, owner: Option<&Key>) -> bool {
        let mut state = lock(&self.state);
        let Some(entry) = state.entries.get(&id) else {
            return false;
        };
        if owner.is_some_and(|owner| entry.user.as_ref() != Some(owner)) {
            return false;
        }
        if !entry.waiter.cancel() {
            return false;
        }
        tracing::debug!(%id, user = ?entry.user, "cancelled through the handle");
        let queued = match entry.phase {
            Phase::Queued { position, .. } => Some(position),
            Phase::Running { .. } => None,
        };
        state.counters.cancelled += 1;
        if let Some(pos) = queued {
            if let Some(entry) = state.entries.remove(&id) {
                state.schedule.remove(pos, entry.user.as_ref());
            }
        }
        true
    }

    pub(crate) fn stats(&self) -> QueueStats {
        let state = lock(&self.state);
        let (p50, p95, p99) = state.waits.percentiles();
        let c = &state.counters;
        QueueStats {
            concurrency: state.config.concurrency,
            capacity: state.config.capacity,
            running: state.running,
            waiting: state.schedule.len(),
            waiting_per_level: (0..state.schedule.levels())
                .map(|l| state.schedule.len_at(l))
                .collect(),
            users: state.schedule.flow_count(),
            admitted: c.admitted,
            rejected: c.rejected,
            timed_out: c.timed_out,
            cancelled: c.cancelled,
            completed: c.completed,
            failed: c.failed,
            wait_p50: p50,
            wait_p95: p95,
            wait_p99: p99,
        }
    }

    /// The place of a waiting request in the queue (0: admitted next).
    pub(crate) fn position(&self, id: RequestId) -> Option<usize> {
        let state = lock(&self.state);
        match state.entries.get(&id)?.phase {
            Phase::Queued { position, .. } => Some(state.schedule.rank(position)),
            Phase::Running { .. } => None,
        }
    }

    pub(crate) fn entries(&self) -> Vec<QueueEntry> {
        let now = Instant::now();
        let state = lock(&self.state);
        let places: FastMap<RequestId, usize> = state
            .schedule
            .order()
            .enumerate()
            .map(|(place, id)| (id, place))
            .collect();
        let mut entries: Vec<QueueEntry> = state
            .entries
            .iter()
            .filter(|(_, e)| !e.waiter.is_cancelled())
            .map(|(id, e)| {
                let (state, waited) = match e.phase {
                    Phase::Queued { since, .. } => {
                        (EntryState::Queued, now.saturating_duration_since(since))
                    }
                    Phase::Running { waited, .. } => (EntryState::Running, waited),
                };
                QueueEntry {
                    id: *id,
                    user: e.user.clone(),
                    level: e.level as u8 + 1,
                    state,
                    waited,
                    position: places.get(id).copied(),
                }
            })
            .collect();
        entries.sort_by_key(|e| e.id);
        entries
    }
}

impl State {
    /// Admits waiting requests while slots are free.
    fn dispatch(&mut self) {
        let now = Instant::now();
        while self.running < self.config.concurrency {
            let Some(id) = self.schedule.pop() else { break };
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            if !entry.waiter.grant() {
                let user = entry.user.clone();
                let level = entry.level;
                self.entries.remove(&id);
                self.schedule.finish(level, user.as_ref());
                continue;
            }
            let waited = match entry.phase {
                Phase::Queued { since, .. } => now.saturating_duration_since(since),
                Phase::Running { waited, .. } => waited,
            };
            entry.phase = Phase::Running {
                waited,
                started: Some(now),
            };
            tracing::debug!(%id, user = ?entry.user, level = entry.level + 1, waited_ms = waited.as_millis() as u64, "admitted");
            self.running += 1;
            self.counters.admitted += 1;
            self.waits.record(waited);
        }
    }

    /// When a waiting place is likely to free: the next time one of the running requests ends.
    fn estimate_wait(&self) -> Duration {
        self.service_time.next_free(self.running)
    }
}

impl Slot for Ticket {
    fn waiter(&self) -> Option<&Waiter> {
        Some(&self.waiter)
    }

    fn set_finish(&mut self, finish: Finish) {
        self.finish = finish;
    }

    /// Takes the request out of the queue, unless it was admitted (or cancelled) meanwhile.
    fn time_out(&mut self) -> Option<Rejected> {
        let mut state = lock(&self.shared.state);
        let entry = state.entries.get(&self.id)?;
        let Phase::Queued { position: pos, .. } = entry.phase else {
            return None;
        };
        if !entry.waiter.leave() {
            return None;
        }
        if let Some(entry) = state.entries.remove(&self.id) {
            state.schedule.remove(pos, entry.user.as_ref());
        }
        state.counters.timed_out += 1;
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
        let mut state = lock(&self.shared.state);
        let Some(entry) = state.entries.remove(&self.id) else {
            return;
        };
        let cancelled_by_handle = entry.waiter.is_cancelled();
        match entry.phase {
            Phase::Queued { position: pos, .. } => {
                entry.waiter.leave();
                state.schedule.remove(pos, entry.user.as_ref());
                if !cancelled_by_handle {
                    state.counters.cancelled += 1;
                }
            }
            Phase::Running { started, .. } => {
                state.running -= 1;
                state.schedule.finish(entry.level, entry.user.as_ref());
                if let Some(started) = started {
                    state.service_time.observe(started);
                }
                if !cancelled_by_handle {
                    let c = &mut state.counters;
                    match (panicking, self.finish) {
                        (true, _) | (false, Finish::Failed) => c.failed += 1,
                        (false, Finish::Completed) => c.completed += 1,
                        (false, Finish::Dropped) => c.cancelled += 1,
                    }
                }
                state.dispatch();
            }
        }
    }
}

impl Guard for Ticket {
    fn poll_cancelled(&self, cx: &mut Context<'_>) -> bool {
        self.waiter.poll_cancelled(cx)
    }
}

impl From<Ticket> for Permit {
    fn from(ticket: Ticket) -> Self {
        Permit::new(ticket)
    }
}
