//! The two algorithms and the in-memory state they keep per key.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use crate::key::Key;
use crate::sharded::{shrink, Sharded};

/// How much may start, and over what time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Limit {
    /// At most `limit` cost in any interval of length `window`.
    Window { limit: u64, window: Duration },
    /// GCRA: `interval` per unit of cost, up to `burst` units at once.
    Bucket { interval: Duration, burst: u64 },
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start now.
    Now(u64),
    /// Start at this instant; the place is reserved (wait mode).
    At(Instant, u64),
    /// Not within the allowed wait; this is when it would fit.
    Denied(Duration),
    /// Larger than the limit itself: never.
    TooLarge,
}

#[derive(Debug)]
enum State {
    /// Admitted `(start, cost, id)`, oldest first, and their total.
    Log(VecDeque<(Instant, u64, u64)>, u64),
    /// The theoretical arrival time of the next unit.
    Tat(Instant),
}

impl State {
    fn idle(&self, now: Instant, limit: &Limit) -> bool {
        match (self, limit) {
            (State::Log(log, _), Limit::Window { window, .. }) => {
                log.back().is_none_or(|(at, _, _)| *at + *window <= now)
            }
            (State::Tat(tat), _) => *tat <= now,
            _ => true,
        }
    }
}

#[derive(Debug)]
struct Slot {
    state: State,
    /// The latest instant a decision for this key has used. Decisions never go back before it,
    /// so that a caller whose clock reading is older than the last admission (it read the clock,
    /// then waited for the lock) is not mistaken for one arriving behind a reservation.
    seen: Instant,
}

/// Per-key state in shards. A shard is swept of idle keys once it has taken in as many new keys
/// as it held at its last sweep (and at least [`SWEEP_AT_LEAST`]): each sweep is paid for by
/// the insertions before it, and a shard never holds much more than twice its live keys.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: Limit,
    keys: Sharded<Slot>,
    /// New keys per shard since its last sweep.
    grown: Box<[AtomicUsize]>,
    next_id: AtomicU64,
}

const SWEEP_AT_LEAST: usize = 256;

impl MemoryLimiter {
    pub(crate) fn new(limit: Limit) -> Self {
        MemoryLimiter {
            limit,
            keys: Sharded::new(),
            grown: Box::default(),
            next_id: AtomicU64::new(1),
        }
        .with_counters()
    }

    fn with_counters(mut self) -> Self {
        self.grown = (0..self.keys.shard_count())
            .map(|_| AtomicUsize::new(0))
            .collect();
        self
    }

    pub(crate) fn limit(&self) -> Limit {
        self.limit
    }

    /// Admits `cost` for `key` now, or — with `max_wait` — reserves the earliest instant it
    /// fits, in arrival order.
    pub(crate) fn decide(&self, key: &Key, cost: u64, max_wait: Option<Duration>) -> Decision {
        self.decide_with(key, cost, max_wait, Instant::now)
    }

    /// [`decide`](Self::decide) at a given instant of the caller's clock.
    #[cfg(test)]
    pub(crate) fn decide_at(
        &self,
        key: &Key,
        cost: u64,
        max_wait: Option<Duration>,
        now: Instant,
    ) -> Decision {
        self.decide_with(key, cost, max_wait, || now)
    }

    fn decide_with(
        &self,
        key: &Key,
        cost: u64,
        max_wait: Option<Duration>,
        clock: impl FnOnce() -> Instant,
    ) -> Decision {
        if cost == 0 {
            // Nothing to count: admitted without a record.
            return Decision::Now(self.next_id.fetch_add(1, Relaxed));
        }
        let (index, mut shard) = self.keys.lock_indexed(key);
        // Read under the lock: decisions for one key then see the clock in their own order.
        let now = clock();
        if !shard.contains_key(key) {
            let grown = self.grown[index].fetch_add(1, Relaxed) + 1;
            let kept = (shard.len() + 1).saturating_sub(grown);
            if grown >= SWEEP_AT_LEAST.max(kept) {
                shard.retain(|_, slot| !slot.state.idle(now, &self.limit));
                shrink(&mut shard);
                self.grown[index].store(0, Relaxed);
            }
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let slot = shard.entry(key.clone()).or_insert_with(|| Slot {
            state: match self.limit {
                Limit::Window { .. } => State::Log(VecDeque::new(), 0),
                Limit::Bucket { .. } => State::Tat(now),
            },
            seen: now,
        });
        let now = now.max(slot.seen);
        slot.seen = now;
        match (&mut slot.state, self.limit) {
            (State::Log(log, total), Limit::Window { limit, window }) => {
                if cost > limit {
                    return Decision::TooLarge;
                }
                while log.front().is_some_and(|(at, _, _)| *at + window <= now) {
                    if let Some((_, c, _)) = log.pop_front() {
                        *total -= c;
                    }
                }
                // The earliest start at or after the last admitted one (arrival order) at which
                // the cost still in the window leaves room: walk the oldest entries out.
                let mut start = log.back().map_or(now, |(at, _, _)| (*at).max(now));
                let mut remaining = *total;
                for (at, c, _) in log.iter() {
                    if remaining + cost <= limit {
                        break;
                    }
                    remaining -= c;
                    start = start.max(*at + window);
                }
                if start <= now {
                    log.push_back((now, cost, id));
                    *total += cost;
                    return Decision::Now(id);
                }
                let wait = start - now;
                match max_wait {
                    Some(max) if wait <= max => {
                        log.push_back((start, cost, id));
                        *total += cost;
                        Decision::At(start, id)
                    }
                    _ => Decision::Denied(wait),
                }
            }
            (State::Tat(tat), Limit::Bucket { interval, burst }) => {
                if cost > burst {
                    return Decision::TooLarge;
                }
                let base = (*tat).max(now);
                let next = base + interval.saturating_mul(cost.min(u32::MAX as u64) as u32);
                let tolerance = interval.saturating_mul(burst.min(u32::MAX as u64) as u32);
                let start = next.checked_sub(tolerance).unwrap_or(now).max(now);
                if start <= now {
                    *tat = next;
                    return Decision::Now(id);
                }
                let wait = start - now;
                match max_wait {
                    Some(max) if wait <= max => {
                        *tat = next;
                        Decision::At(start, id)
                    }
                    _ => Decision::Denied(wait),
                }
            }
            _ => Decision::Denied(Duration::ZERO),
        }
    }

    /// Replaces the cost recorded for admission `id` by what the upstream reports it used.
    /// An admission estimated at 0 left no record: its actual cost is recorded now.
    pub(crate) fn reconcile(&self, key: &Key, id: u64, estimated: u64, actual: u64) {
        let mut shard = self.keys.lock(key);
        if estimated == 0 {
            if actual == 0 {
                return;
            }
            let now = Instant::now();
            let slot = shard.entry(key.clone()).or_insert_with(|| Slot {
                state: match self.limit {
                    Limit::Window { .. } => State::Log(VecDeque::new(), 0),
                    Limit::Bucket { .. } => State::Tat(now),
                },
                seen: now,
            });
            let now = now.max(slot.seen);
            match (&mut slot.state, self.limit) {
                (State::Log(log, total), _) => {
                    let at = log
                        .iter()
                        .rposition(|(at, _, _)| *at <= now)
                        .map_or(0, |i| i + 1);
                    log.insert(at, (now, actual, id));
                    *total += actual;
                }
                (State::Tat(tat), Limit::Bucket { interval, .. }) => {
                    let units = interval.saturating_mul(actual.min(u32::MAX as u64) as u32);
                    *tat = (*tat).max(now) + units;
                }
                _ => {}
            }
            return;
        }
        let Some(slot) = shard.get_mut(key) else {
            return;
        };
        match (&mut slot.state, self.limit) {
            (State::Log(log, total), _) => {
                if let Some(entry) = log.iter_mut().find(|(_, _, i)| *i == id) {
                    *total = *total - entry.1 + actual;
                    entry.1 = actual;
                }
            }
            (State::Tat(tat), Limit::Bucket { interval, .. }) => {
                let units = |n: u64| interval.saturating_mul(n.min(u32::MAX as u64) as u32);
                if actual >= estimated {
                    *tat += units(actual - estimated);
                } else {
                    *tat = tat.checked_sub(units(estimated - actual)).unwrap_or(*tat);
                }
            }
            _ => {}
        }
    }

    /// Gives back a reservation whose request left before its start.
    pub(crate) fn release(&self, key: &Key, id: u64, cost: u64) {
        let mut shard = self.keys.lock(key);
        let Some(slot) = shard.get_mut(key) else {
            return;
        };
        match (&mut slot.state, self.limit) {
            (State::Log(log, total), _) => {
                if let Some(at) = log.iter().position(|(_, _, i)| *i == id) {
                    if let Some((_, c, _)) = log.remove(at) {
                        *total -= c;
                    }
                }
            }
            (State::Tat(tat), Limit::Bucket { interval, .. }) => {
                let units = interval.saturating_mul(cost.min(u32::MAX as u64) as u32);
                *tat = tat.checked_sub(units).unwrap_or(*tat);
            }
            _ => {}
        }
    }

    /// The cost admitted for `key` in the current window (sliding window), or the units in use
    /// of the burst (token bucket).
    pub(crate) fn usage(&self, key: &Key) -> u64 {
        let now = Instant::now();
        let shard = self.keys.lock(key);
        match (shard.get(key).map(|s| &s.state), self.limit) {
            (Some(State::Log(log, _)), Limit::Window { window, .. }) => log
                .iter()
                .filter(|(at, _, _)| *at <= now && *at + window > now)
                .map(|(_, c, _)| c)
                .sum(),
            (Some(State::Tat(tat)), Limit::Bucket { interval, .. }) if *tat > now => {
                let ahead = (*tat - now).as_secs_f64() / interval.as_secs_f64().max(1e-12);
                ahead.ceil() as u64
            }
            _ => 0,
        }
    }

    /// The records kept for `key`: window entries, or 1 for a bucket's instant.
    #[cfg(test)]
    pub(crate) fn records(&self, key: &Key) -> usize {
        match self.keys.lock(key).get(key).map(|s| &s.state) {
            Some(State::Log(log, _)) => log.len(),
            Some(State::Tat(_)) => 1,
            None => 0,
        }
    }

    pub(crate) fn keys(&self) -> usize {
        let mut n = 0;
        self.keys.for_each_shard(|shard| n += shard.len());
        n
    }
}
