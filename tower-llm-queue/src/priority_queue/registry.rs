//! Every request of a queue, waiting or running, by id: what `entries()`, `position(id)` and
//! `cancel(id)` read, and where a request's end is counted.
//!
//! The registry is split into shards by id. Consecutive ids fall into different shards, so
//! requests that start and end on different threads rarely meet on one lock, and a request
//! admitted at once touches its own shard only — never the queue's lock. Each shard counts the
//! requests that ended in it; stats add the shards up.

use std::collections::hash_map;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::time::Instant;

use crate::admission::Finish;
use crate::key::Key;
use crate::sharded::{lock, shrink, FastMap};
use crate::waiter::Waiter;

use super::schedule::Position;
use super::RequestId;

/// How a running request learns that it was cancelled through the handle.
#[derive(Debug)]
pub(super) enum Cancel {
    /// It waited: its hand-off with the queue carries the cancellation too.
    Waiter(Arc<Waiter>),
    /// It was admitted at once: the flag lives here, and the task to wake once it is set.
    Direct {
        cancelled: bool,
        waker: Option<Waker>,
    },
}

impl Cancel {
    fn is_cancelled(&self) -> bool {
        match self {
            Cancel::Waiter(waiter) => waiter.is_cancelled(),
            Cancel::Direct { cancelled, .. } => *cancelled,
        }
    }
}

#[derive(Debug)]
pub(super) enum Phase {
    Queued {
        position: Position,
        since: Instant,
        waiter: Arc<Waiter>,
    },
    Running {
        waited: Duration,
        /// When it was admitted, for the service-time estimate: requests that waited read the
        /// clock anyway; of those admitted at once, only sampled ones do.
        started: Option<Instant>,
        cancel: Cancel,
    },
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) user: Option<Key>,
    pub(super) level: usize,
    pub(super) phase: Phase,
}

impl Entry {
    /// Cancelled through the handle (a cancelled entry is no longer listed).
    pub(super) fn is_cancelled(&self) -> bool {
        match &self.phase {
            Phase::Queued { waiter, .. } => waiter.is_cancelled(),
            Phase::Running { cancel, .. } => cancel.is_cancelled(),
        }
    }
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

#[derive(Debug, Default)]
pub(super) struct Book {
    pub(super) entries: FastMap<RequestId, Entry>,
    pub(super) counts: Counts,
    starts: u32,
}

impl Book {
    /// The place of a new request `id`, found with one lookup; `None` (counted as a
    /// rejection) if the id is in use.
    #[inline]
    pub(super) fn vacancy(&mut self, id: RequestId) -> Option<Vacancy<'_>> {
        match self.entries.entry(id) {
            hash_map::Entry::Occupied(_) => {
                self.counts.rejected += 1;
                None
            }
            hash_map::Entry::Vacant(place) => Some(Vacancy {
                place,
                counts: &mut self.counts,
                starts: &mut self.starts,
            }),
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
    place: hash_map::VacantEntry<'a, RequestId, Entry>,
    counts: &'a mut Counts,
    starts: &'a mut u32,
}

impl Vacancy<'_> {
    /// Registers a request admitted at once; only sampled ones read the clock, for the
    /// service-time estimate.
    // Inlined into both callers: it is on the path of every request admitted at once.
    #[inline(always)]
    pub(super) fn run(self, user: Option<Key>, level: usize) {
        tracing::trace!(id = %self.place.key(), user = ?user, level = level + 1, "admitted at once");
        *self.starts = self.starts.wrapping_add(1);
        let started = crate::service_time::sampled(*self.starts);
        self.counts.admitted += 1;
        self.place.insert(Entry {
            user,
            level,
            phase: Phase::Running {
                waited: Duration::ZERO,
                started,
                cancel: Cancel::Direct {
                    cancelled: false,
                    waker: None,
                },
            },
        });
    }

    /// Registers a request that waits.
    pub(super) fn queue(self, entry: Entry) {
        self.place.insert(entry);
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

/// A running request's end, as the registry saw it.
#[derive(Debug)]
pub(super) struct Ended {
    pub(super) user: Option<Key>,
    pub(super) level: usize,
    pub(super) started: Option<Instant>,
}

/// The registry's shards. A request's shard is its id's lowest bits: ids are handed out in
/// sequence, so consecutive requests take turns over the shards. (Ids chosen by clients may
/// crowd one shard; each shard's map is still randomly seeded.)
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

    fn shard(&self, id: RequestId) -> &Shard {
        &self.shards[id.get() as usize & (self.shards.len() - 1)]
    }

    /// The locked shard of `id`.
    pub(super) fn lock(&self, id: RequestId) -> MutexGuard<'_, Book> {
        lock(&self.shard(id).book)
    }

    /// The cancellation count of `id`'s shard, before a look at its flag.
    pub(super) fn cancels(&self, id: RequestId) -> u64 {
        self.shard(id).cancels.load(Ordering::Acquire)
    }

    /// Cancels a running request admitted at once: sets its flag, and gives the task to wake
    /// (if it registered one). `None` if there is no such request, or it was cancelled before.
    pub(super) fn cancel_direct(&self, id: RequestId, book: &mut Book) -> Option<Option<Waker>> {
        let entry = book.entries.get_mut(&id)?;
        let Phase::Running {
            cancel: Cancel::Direct { cancelled, waker },
            ..
        } = &mut entry.phase
        else {
            return None;
        };
        if *cancelled {
            return None;
        }
        *cancelled = true;
        book.counts.cancelled += 1;
        self.shard(id).cancels.fetch_add(1, Ordering::Release);
        Some(waker.take())
    }

    /// Whether the running request `id`, admitted at once, was cancelled; with `cx`, registers
    /// its task to be woken when it is.
    pub(super) fn direct_cancelled(&self, id: RequestId, cx: Option<&mut Context<'_>>) -> bool {
        let mut book = self.lock(id);
        let Some(Entry {
            phase:
                Phase::Running {
                    cancel: Cancel::Direct { cancelled, waker },
                    ..
                },
            ..
        }) = book.entries.get_mut(&id)
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

    /// Takes a running request out and counts how it ended (unless the handle cancelled it,
    /// which counted it then). `None` if it is not there: it was waiting, and cancelled.
    pub(super) fn end(&self, id: RequestId, finish: Finish, panicking: bool) -> Option<Ended> {
        let mut book = self.lock(id);
        let entry = book.entries.remove(&id)?;
        let Phase::Running {
            started, cancel, ..
        } = entry.phase
        else {
            book.entries.insert(id, entry);
            return None;
        };
        if !cancel.is_cancelled() {
            book.count_end(finish, panicking);
        }
        shrink(&mut book.entries);
        drop(book);
        Some(Ended {
            user: entry.user,
            level: entry.level,
            started,
        })
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
