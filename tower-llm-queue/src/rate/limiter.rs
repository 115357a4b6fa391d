//! The two algorithms and the in-memory state they keep per key.
//!
//! Time is counted in nanoseconds since the limiter was made (a "tick"), as integers: instants
//! as `u64` (584 years), and the products of a cost and an interval — which can exceed that —
//! as `u128`. Every sum saturates, so no input panics or wraps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use super::{MAX_COST, MAX_PERIOD};
use crate::key::Key;
use crate::sharded::{Count, Place, Sharded};

/// The longest `retry_after` a refusal reports: 2^53 − 1 µs, about 285 years.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_micros(MAX_COST);

/// How much may start, and over what time. Built by [`Limit::window`] and [`Limit::bucket`],
/// which bring every number into its accepted range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Limit {
    /// At most `limit` cost in any interval of length `window`.
    Window { limit: u64, window: Duration },
    /// GCRA: `interval` per unit of cost, up to `burst` units at once.
    Bucket { interval: Duration, burst: u64 },
}

impl Limit {
    /// A sliding window: `limit` at most [`MAX_COST`], `window` between 1 ns and
    /// [`MAX_PERIOD`].
    pub(crate) fn window(limit: u64, window: Duration) -> Limit {
        Limit::Window {
            limit: limit.min(MAX_COST),
            window: period(window),
        }
    }

    /// A token bucket: `interval` between 1 ns and [`MAX_PERIOD`], `burst` between 1 and
    /// [`MAX_COST`], and at most as many intervals as fit in `MAX_PERIOD` (so that a whole
    /// burst, and every cost it admits, spans at most `MAX_PERIOD`).
    pub(crate) fn bucket(interval: Duration, burst: u64) -> Limit {
        let interval = period(interval);
        let fit = nanos(MAX_PERIOD) / nanos(interval).max(1);
        Limit::Bucket {
            interval,
            burst: burst.min(MAX_COST).min(fit).max(1),
        }
    }
}

/// A window or interval in its accepted range: 1 ns to [`MAX_PERIOD`].
pub(crate) fn period(duration: Duration) -> Duration {
    duration.clamp(Duration::from_nanos(1), MAX_PERIOD)
}

/// A duration in ticks, saturating.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A wait of `ticks` as a refusal reports it: at most [`MAX_RETRY_AFTER`].
fn retry_after(ticks: u128) -> Duration {
    let max = MAX_RETRY_AFTER.as_nanos();
    Duration::from_nanos(u64::try_from(ticks.min(max)).unwrap_or(u64::MAX))
}

/// `cost` units of `interval` ticks.
fn units(cost: u64, interval: u64) -> u128 {
    u128::from(cost) * u128::from(interval)
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

/// One admission in a window log: 24 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u64,
    cost: u64,
    id: u64,
}

/// The latest admission folded into [`Gcra::settled`], kept so that it can be corrected or
/// given back exactly.
#[derive(Debug, Clone, Copy)]
struct Last {
    /// `settled` before it was folded in.
    before: u128,
    start: u64,
    cost: u64,
    id: u64,
}

/// GCRA as a schedule: the theoretical arrival time (TAT) is the fold, in start order, of
/// `tat = max(tat, start) + cost × interval` over the admissions. Those that have started are
/// folded into `settled`; reservations that have not are kept apart, so that one given back is
/// taken out of the fold exactly, and the schedule of the others stays as the GCRA allows.
#[derive(Debug, Default)]
struct Gcra {
    /// The TAT after every admission that has started.
    settled: u128,
    last: Option<Last>,
    /// Reservations not started yet, in start order (which is arrival order).
    pending: VecDeque<Entry>,
}

impl Gcra {
    fn fold(&mut self, entry: Entry, interval: u64) {
        self.last = Some(Last {
            before: self.settled,
            start: entry.start,
            cost: entry.cost,
            id: entry.id,
        });
        self.settled = self
            .settled
            .max(u128::from(entry.start))
            .saturating_add(units(entry.cost, interval));
    }

    /// Folds in the reservations that have started by `now`.
    fn settle(&mut self, now: u64, interval: u64) {
        while let Some(entry) = self.pending.front().copied() {
            if entry.start > now {
                break;
            }
            self.pending.pop_front();
            self.fold(entry, interval);
        }
    }

    /// The TAT after every admission, started or reserved.
    fn tat(&self, interval: u64) -> u128 {
        self.pending.iter().fold(self.settled, |tat, e| {
            tat.max(u128::from(e.start))
                .saturating_add(units(e.cost, interval))
        })
    }

    /// Moves the cost of a folded admission other than the latest by `delta` units, up or
    /// down. The exact effect depends on idle gaps since that admission, which are not kept:
    /// the delta is applied in full before the latest admission, whose own spacing stays.
    fn shift(&mut self, up: bool, delta: u128) {
        let shift = |t: u128| {
            if up {
                t.saturating_add(delta)
            } else {
                t.saturating_sub(delta)
            }
        };
        match &mut self.last {
            Some(last) => {
                let cost = self
                    .settled
                    .saturating_sub(last.before.max(u128::from(last.start)));
                last.before = shift(last.before);
                self.settled = last.before.max(u128::from(last.start)).saturating_add(cost);
            }
            None => self.settled = shift(self.settled),
        }
    }
}

#[derive(Debug)]
enum State {
    /// Admissions in start order (which is arrival order), and the sum of their costs.
    Log(VecDeque<Entry>, u128),
    /// A token bucket's schedule.
    Gcra(Gcra),
}

impl State {
    fn new(limit: &Limit) -> State {
        match limit {
            Limit::Window { .. } => State::Log(VecDeque::new(), 0),
            Limit::Bucket { .. } => State::Gcra(Gcra::default()),
        }
    }

    fn idle(&self, now: u64, limit: &Limit) -> bool {
        match (self, limit) {
            (State::Log(log, _), Limit::Window { window, .. }) => log
                .back()
                .is_none_or(|e| e.start.saturating_add(nanos(*window)) <= now),
            (State::Gcra(gcra), _) => gcra.pending.is_empty() && gcra.settled <= u128::from(now),
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
    seen: u64,
}

/// Per-key state in shards, swept of idle keys as new keys arrive
/// ([`Place::get_or_insert_with`]): a shard never holds much more than twice its live keys.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: Limit,
    /// Tick 0.
    epoch: Instant,
    /// Each shard counts out the ids of its keys' admissions, under its lock: even, rising. An
    /// id names an admission among those of its key, which all take their ids from its shard.
    keys: Sharded<Slot, Count>,
    /// The ids of admissions of no cost, which take no shard's lock: odd, so that they never
    /// meet the even ids the shards give out.
    free_ids: AtomicU64,
}

impl MemoryLimiter {
    /// A limiter for `limit`, whose numbers are brought into their accepted range.
    pub(crate) fn new(limit: Limit) -> Self {
        let limit = match limit {
            Limit::Window { limit, window } => Limit::window(limit, window),
            Limit::Bucket { interval, burst } => Limit::bucket(interval, burst),
        };
        MemoryLimiter {
            limit,
            epoch: Instant::now(),
            keys: Sharded::new(),
            free_ids: AtomicU64::new(1),
        }
    }

    pub(crate) fn limit(&self) -> Limit {
        self.limit
    }

    fn ticks(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.epoch))
    }

    fn instant(&self, ticks: u64) -> Instant {
        let far = || {
            Instant::now()
                .checked_add(MAX_PERIOD)
                .unwrap_or_else(Instant::now)
        };
        self.epoch
            .checked_add(Duration::from_nanos(ticks))
            .unwrap_or_else(far)
    }

    /// The slot of a key in its locked shard, made on first use (after a sweep of idle keys,
    /// when due), with `now` moved up to the latest instant the key has seen.
    fn slot<'a>(&self, place: &'a mut Place<'_, Slot, Count>, now: &mut u64) -> &'a mut Slot {
        let (limit, at) = (&self.limit, *now);
        let slot = place.get_or_insert_with(
            |slot| slot.state.idle(at, limit),
            || Slot {
                state: State::new(limit),
                seen: at,
            },
        );
        *now = (*now).max(slot.seen);
        slot.seen = *now;
        slot
    }

    /// Admits `cost` for `key` now, or — with `max_wait` — reserves the earliest instant it
    /// fits, in arrival order. A cost of 0 is admitted without a record.
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
        let cost = cost.min(MAX_COST);
        if cost == 0 {
            // Nothing to count: admitted without a record.
            return Decision::Now(self.free_ids.fetch_add(2, Relaxed));
        }
        let max_wait = max_wait.map(|wait| nanos(wait.min(MAX_PERIOD)));
        let mut place = self.keys.lock(key);
        // Read under the lock: decisions for one key then see the clock in their own order.
        let mut now = self.ticks(clock());
        let id = place.tally().add(2);
        let slot = self.slot(&mut place, &mut now);
        match (&mut slot.state, self.limit) {
            (State::Log(log, total), Limit::Window { limit, window }) => {
                if cost > limit {
                    return Decision::TooLarge;
                }
                let window = nanos(window);
                while log
                    .front()
                    .is_some_and(|e| e.start.saturating_add(window) <= now)
                {
                    if let Some(e) = log.pop_front() {
                        *total = total.saturating_sub(u128::from(e.cost));
                    }
                }
                // The earliest start at or after the last admitted one (arrival order) at which
                // the cost still in the window leaves room: walk the oldest entries out.
                let (limit, cost_wide) = (u128::from(limit), u128::from(cost));
                let mut start = log.back().map_or(now, |e| e.start.max(now));
                let mut remaining = *total;
                for e in log.iter() {
                    if remaining + cost_wide <= limit {
                        break;
                    }
                    remaining = remaining.saturating_sub(u128::from(e.cost));
                    start = start.max(e.start.saturating_add(window));
                }
                if start <= now {
                    log.push_back(Entry {
                        start: now,
                        cost,
                        id,
                    });
                    *total += cost_wide;
                    return Decision::Now(id);
                }
                let wait = start - now;
                match max_wait {
                    Some(max) if wait <= max => {
                        log.push_back(Entry { start, cost, id });
                        *total += cost_wide;
                        Decision::At(self.instant(start), id)
                    }
                    _ => Decision::Denied(retry_after(u128::from(wait))),
                }
            }
            (State::Gcra(gcra), Limit::Bucket { interval, burst }) => {
                if cost > burst {
                    return Decision::TooLarge;
                }
                let interval = nanos(interval);
                gcra.settle(now, interval);
                let now_wide = u128::from(now);
                let next = gcra
                    .tat(interval)
                    .max(now_wide)
                    .saturating_add(units(cost, interval));
                // Never before a reservation made earlier: arrival order.
                let after = gcra.pending.back().map_or(now, |e| e.start);
                let start = next
                    .saturating_sub(units(burst, interval))
                    .max(u128::from(after))
                    .max(now_wide);
                if start <= now_wide {
                    // Nothing is pending (a reservation would start after `now`).
                    gcra.fold(
                        Entry {
                            start: now,
                            cost,
                            id,
                        },
                        interval,
                    );
                    return Decision::Now(id);
                }
                let wait = start - now_wide;
                match max_wait {
                    Some(max) if wait <= u128::from(max) => {
                        let start = now.saturating_add(u64::try_from(wait).unwrap_or(max));
                        gcra.pending.push_back(Entry { start, cost, id });
                        Decision::At(self.instant(start), id)
                    }
                    _ => Decision::Denied(retry_after(wait)),
                }
            }
            _ => Decision::Denied(Duration::ZERO),
        }
    }

    /// Replaces the cost recorded for admission `id` by what the upstream reports it used. An
    /// admission estimated at 0 left no record: its actual cost is recorded now.
    pub(crate) fn reconcile(&self, key: &Key, id: u64, estimated: u64, actual: u64) {
        let (estimated, actual) = (estimated.min(MAX_COST), actual.min(MAX_COST));
        let mut place = self.keys.lock(key);
        let mut now = self.ticks(Instant::now());
        if estimated == 0 {
            if actual == 0 {
                return;
            }
            let slot = self.slot(&mut place, &mut now);
            match (&mut slot.state, self.limit) {
                (State::Log(log, total), _) => {
                    let at = log
                        .iter()
                        .rposition(|e| e.start <= now)
                        .map_or(0, |i| i + 1);
                    let entry = Entry {
                        start: now,
                        cost: actual,
                        id,
                    };
                    log.insert(at, entry);
                    *total += u128::from(actual);
                }
                (State::Gcra(gcra), Limit::Bucket { interval, .. }) => {
                    let interval = nanos(interval);
                    gcra.settle(now, interval);
                    let entry = Entry {
                        start: now,
                        cost: actual,
                        id,
                    };
                    gcra.fold(entry, interval);
                }
                _ => {}
            }
            return;
        }
        let Some(slot) = place.get() else {
            return;
        };
        let now = now.max(slot.seen);
        match (&mut slot.state, self.limit) {
            (State::Log(log, total), _) => {
                if let Some(at) = log.iter().rposition(|e| e.id == id) {
                    let entry = &mut log[at];
                    *total = total.saturating_sub(u128::from(entry.cost)) + u128::from(actual);
                    entry.cost = actual;
                    if actual == 0 {
                        log.remove(at);
                    }
                }
            }
            (State::Gcra(gcra), Limit::Bucket { interval, .. }) => {
                let interval = nanos(interval);
                gcra.settle(now, interval);
                if let Some(at) = gcra.pending.iter().position(|e| e.id == id) {
                    gcra.pending[at].cost = actual;
                    if actual == 0 {
                        gcra.pending.remove(at);
                    }
                } else if let Some(last) = gcra.last.as_mut().filter(|l| l.id == id) {
                    last.cost = actual;
                    gcra.settled = last
                        .before
                        .max(u128::from(last.start))
                        .saturating_add(units(actual, interval));
                } else if actual >= estimated {
                    gcra.shift(true, units(actual - estimated, interval));
                } else {
                    gcra.shift(false, units(estimated - actual, interval));
                }
            }
            _ => {}
        }
    }

    /// Gives back admission `id`, whose request left before its start. In a token bucket, an
    /// admission is given back exactly while it is reserved or the latest to have started;
    /// otherwise (it is unknown, or later ones started after it) nothing changes.
    pub(crate) fn release(&self, key: &Key, id: u64) {
        let mut place = self.keys.lock(key);
        let Some(slot) = place.get() else {
            return;
        };
        let now = self.ticks(Instant::now()).max(slot.seen);
        match (&mut slot.state, self.limit) {
            (State::Log(log, total), _) => {
                if let Some(at) = log.iter().rposition(|e| e.id == id) {
                    if let Some(e) = log.remove(at) {
                        *total = total.saturating_sub(u128::from(e.cost));
                    }
                }
            }
            (State::Gcra(gcra), Limit::Bucket { interval, .. }) => {
                gcra.settle(now, nanos(interval));
                if let Some(at) = gcra.pending.iter().position(|e| e.id == id) {
                    gcra.pending.remove(at);
                } else if let Some(last) = gcra.last.filter(|l| l.id == id) {
                    gcra.settled = last.before;
                    gcra.last = None;
                }
            }
            _ => {}
        }
    }

    /// The cost admitted for `key` in the current window (sliding window), or the units in use
    /// of the burst (token bucket).
    pub(crate) fn usage(&self, key: &Key) -> u64 {
        let now = self.ticks(Instant::now());
        let mut place = self.keys.lock(key);
        let used = match (place.get().map(|s| &s.state), self.limit) {
            (Some(State::Log(log, _)), Limit::Window { window, .. }) => {
                let window = nanos(window);
                log.iter()
                    .filter(|e| e.start <= now && e.start.saturating_add(window) > now)
                    .map(|e| u128::from(e.cost))
                    .sum()
            }
            (Some(State::Gcra(gcra)), Limit::Bucket { interval, .. }) => {
                let interval = nanos(interval);
                let ahead = gcra.tat(interval).saturating_sub(u128::from(now));
                ahead.div_ceil(u128::from(interval.max(1)))
            }
            _ => 0,
        };
        u64::try_from(used).unwrap_or(u64::MAX)
    }

    /// The records kept for `key`: window entries, or a bucket's instant and its reservations.
    #[cfg(test)]
    pub(crate) fn records(&self, key: &Key) -> usize {
        match self.keys.lock(key).get().map(|s| &s.state) {
            Some(State::Log(log, _)) => log.len(),
            Some(State::Gcra(gcra)) => 1 + gcra.pending.len(),
            None => 0,
        }
    }

    pub(crate) fn keys(&self) -> usize {
        self.keys.len()
    }
}
