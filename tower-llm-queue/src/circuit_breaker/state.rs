//! The breakers of one layer, one per key, and their state machine.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::classify::Outcome;
use crate::key::Key;
use crate::rejected::{Rejected, RejectionKind};
use crate::sharded::{lock, Sharded};

use super::{BreakerState, BreakerStats, Window};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) failure_rate: f64,
    pub(crate) slow_call: Option<(Duration, f64)>,
    pub(crate) minimum_calls: usize,
    pub(crate) window: Window,
    pub(crate) open_for: Duration,
    pub(crate) open_growth: f64,
    pub(crate) max_open_for: Duration,
    pub(crate) half_open_calls: u32,
    pub(crate) open_on_not_before: bool,
    pub(crate) count_client_errors: bool,
}

impl Config {
    fn open_for(&self, trips: u32) -> Duration {
        let grown = self.open_for.as_secs_f64() * self.open_growth.powi(trips.min(64) as i32);
        Duration::try_from_secs_f64(grown)
            .unwrap_or(self.max_open_for)
            .min(self.max_open_for.max(self.open_for))
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    /// Refusing until `until`; then probing, or — when the upstream itself named the instant
    /// (`asked`) — closed again at once: a throttled upstream is not a failing one.
    Open {
        until: Instant,
        asked: bool,
    },
    HalfOpen {
        admitted: u32,
        succeeded: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Record {
    /// When it ended; kept only for a time window.
    at: Option<Instant>,
    failed: bool,
    slow: bool,
}

#[derive(Debug)]
struct Breaker {
    /// Tells this breaker from one evicted earlier under the same key.
    instance: u64,
    /// Calls let through and not yet recorded: a breaker with some is never evicted.
    in_flight: u32,
    /// Whether a call came since the last sweep of its shard.
    touched: bool,
    state: State,
    /// Changes whenever the state does, so that calls admitted under an older state do not
    /// count in the new one.
    generation: u64,
    records: VecDeque<Record>,
    /// Failed and slow calls among `records`.
    failures: usize,
    slows: usize,
    /// Consecutive trips without a full recovery, for `open_growth`.
    trips: u32,
}

impl Breaker {
    fn new(instance: u64) -> Self {
        Breaker {
            instance,
            in_flight: 0,
            touched: false,
            state: State::Closed,
            generation: 0,
            records: VecDeque::new(),
            failures: 0,
            slows: 0,
            trips: 0,
        }
    }

    fn set(&mut self, state: State) {
        self.state = state;
        self.generation += 1;
        self.records.clear();
        self.failures = 0;
        self.slows = 0;
    }

    /// Opens for the time the number of consecutive trips calls for; returns that time.
    fn trip(&mut self, config: &Config, now: Instant) -> Duration {
        let open_for = config.open_for(self.trips);
        self.trips = self.trips.saturating_add(1);
        self.set(State::Open {
            until: crate::clock::later(now, open_for),
            asked: false,
        });
        open_for
    }

    /// Whether the breaker can be forgotten without changing any decision: closed, nothing in
    /// flight, no failure or slow call remembered, and no call since the last sweep. Clears the
    /// mark of that last call.
    fn idle(&mut self) -> bool {
        let idle = matches!(self.state, State::Closed)
            && self.in_flight == 0
            && self.failures == 0
            && self.slows == 0
            && !self.touched;
        self.touched = false;
        idle
    }

    fn push(&mut self, record: Record) {
        self.failures += usize::from(record.failed);
        self.slows += usize::from(record.slow);
        self.records.push_back(record);
    }

    fn pop(&mut self) {
        if let Some(oldest) = self.records.pop_front() {
            self.failures -= usize::from(oldest.failed);
            self.slows -= usize::from(oldest.slow);
        }
    }
}

/// The `retry_after` of a refusal while probes run: their outcome is due soon.
const PROBING: Duration = Duration::from_secs(1);

const NOT_FORCED: u8 = 0;
const FORCED_OPEN: u8 = 1;
const FORCED_CLOSED: u8 = 2;

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
    rejected: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    config: RwLock<Config>,
    /// Rises with every change of the settings, so that services know when to read them again.
    version: AtomicU64,
    forced: AtomicU8,
    /// The breaker of the anonymous key — the only one of a layer without `keyed_by` — apart
    /// from the others: no hashing, no sweeping.
    anonymous: Mutex<Option<Breaker>>,
    breakers: Sharded<Breaker>,
    next_instance: AtomicU64,
    counters: Counters,
}

/// The locked place of one key's breaker.
enum Place<'a> {
    Anonymous(MutexGuard<'a, Option<Breaker>>),
    Keyed(crate::sharded::Place<'a, Breaker>),
}

impl Place<'_> {
    fn get(&mut self) -> Option<&mut Breaker> {
        match self {
            Place::Anonymous(breaker) => breaker.as_mut(),
            Place::Keyed(place) => place.get(),
        }
    }

    /// The key's breaker, made with `new` if there is none; a new key's shard is swept of idle
    /// breakers first when due.
    fn get_or_insert_with(&mut self, new: impl FnOnce() -> Breaker) -> &mut Breaker {
        match self {
            Place::Anonymous(breaker) => breaker.get_or_insert_with(new),
            Place::Keyed(place) => place.get_or_insert_with(Breaker::idle, new),
        }
    }
}

/// A call let through: normal, or one of the half-open probes.
#[derive(Debug)]
pub(crate) struct Pass {
    key: Key,
    instance: u64,
    generation: u64,
    probe: bool,
    /// When the call started; read only when slow calls are watched.
    started: Option<Instant>,
    config: Config,
    recorded: bool,
}

/// Reads the clock at most once, and only if asked.
struct Clock(Option<Instant>);

impl Clock {
    fn now(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        Shared {
            config: RwLock::new(config),
            version: AtomicU64::new(0),
            forced: AtomicU8::new(NOT_FORCED),
            anonymous: Mutex::new(None),
            breakers: Sharded::new(),
            next_instance: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    pub(crate) fn configure(&self, f: impl FnOnce(&mut Config)) {
        let mut config = self.config.write().unwrap_or_else(PoisonError::into_inner);
        f(&mut config);
        self.version.fetch_add(1, Release);
    }

    pub(crate) fn config(&self) -> Config {
        *self.config.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The settings and their version.
    pub(crate) fn settings(&self) -> (Config, u64) {
        let config = self.config.read().unwrap_or_else(PoisonError::into_inner);
        (*config, self.version.load(Acquire))
    }

    /// The settings' version now: a service whose copy is of another version reads them again.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Acquire)
    }

    fn count(&self, counter: impl FnOnce(&Counters) -> &AtomicU64, n: u64) {
        if n > 0 {
            counter(&self.counters).fetch_add(n, Relaxed);
        }
    }

    /// The locked place of `key`'s breaker.
    fn place<'a>(&'a self, key: &'a Key) -> Place<'a> {
        if key.is_anonymous() {
            return Place::Anonymous(lock(&self.anonymous));
        }
        Place::Keyed(self.breakers.lock(key))
    }

    /// Lets a call through, or refuses it with `CircuitOpen`, under the settings `config`.
    pub(crate) fn admit(&self, key: Key, config: Config) -> Result<Pass, Rejected> {
        let mut clock = Clock(None);
        let forced = self.forced.load(Relaxed);
        let mut shard = self.place(&key);
        let breaker =
            shard.get_or_insert_with(|| Breaker::new(self.next_instance.fetch_add(1, Relaxed)));
        breaker.touched = true;
        let refuse = |retry_after: Option<Duration>| {
            let mut rejected = Rejected::new(RejectionKind::CircuitOpen);
            if let Some(after) = retry_after {
                rejected = rejected.with_retry_after(after);
            }
            rejected
        };
        let mut probe = false;
        match forced {
            FORCED_OPEN => {
                drop(shard);
                self.count(|c| &c.rejected, 1);
                return Err(refuse(None));
            }
            FORCED_CLOSED => {}
            _ => {
                if let State::Open { until, asked } = breaker.state {
                    let now = clock.now();
                    if now < until {
                        drop(shard);
                        self.count(|c| &c.rejected, 1);
                        return Err(refuse(Some(until - now)));
                    }
                    if asked {
                        breaker.set(State::Closed);
                        tracing::info!(key = %key, "circuit closed: the upstream's wait is over");
                    } else {
                        breaker.set(State::HalfOpen {
                            admitted: 0,
                            succeeded: 0,
                        });
                        tracing::info!(key = %key, "circuit half-open: probing the upstream");
                    }
                }
                if let State::HalfOpen { admitted, .. } = &mut breaker.state {
                    if *admitted >= config.half_open_calls {
                        drop(shard);
                        self.count(|c| &c.rejected, 1);
                        return Err(refuse(Some(config.open_for.min(PROBING))));
                    }
                    *admitted += 1;
                    probe = true;
                }
            }
        }
        let generation = breaker.generation;
        let instance = breaker.instance;
        breaker.in_flight += 1;
        drop(shard);
        self.count(|c| &c.calls, 1);
        Ok(Pass {
            key,
            instance,
            generation,
            probe,
            started: config.slow_call.map(|_| clock.now()),
            config,
            recorded: false,
        })
    }

    /// Records how a call that was let through ended.
    pub(crate) fn record(&self, pass: &mut Pass, outcome: Outcome) {
        let config = pass.config;
        let (failed, not_before) = match outcome {
            Outcome::Success => (false, None),
            Outcome::Failure { not_before, .. } => (true, not_before),
            Outcome::ClientError if config.count_client_errors => (true, None),
            Outcome::ClientError => return self.abandon(pass),
        };
        pass.recorded = true;
        let mut clock = Clock(None);
        let slow = match (config.slow_call, pass.started) {
            (Some((limit, _)), Some(started)) => {
                clock.now().saturating_duration_since(started) >= limit
            }
            _ => false,
        };
        self.count(|c| &c.failures, u64::from(failed));
        self.count(|c| &c.slow, u64::from(slow));
        let mut shard = self.place(&pass.key);
        let Some(breaker) = shard.get() else {
            return;
        };
        if breaker.instance != pass.instance {
            return;
        }
        breaker.in_flight = breaker.in_flight.saturating_sub(1);
        if let (Some(delay), true) = (not_before, config.open_on_not_before) {
            let until = crate::clock::later(clock.now(), delay);
            let later = match breaker.state {
                State::Open { until: current, .. } => until > current,
                _ => true,
            };
            if later && !delay.is_zero() {
                breaker.set(State::Open { until, asked: true });
                drop(shard);
                self.count(|c| &c.opened, 1);
                tracing::warn!(key = %pass.key, delay_ms = delay.as_millis() as u64, "circuit open: the upstream asked to wait");
                return;
            }
        }
        if breaker.generation != pass.generation {
            return;
        }
        match &mut breaker.state {
            State::HalfOpen { succeeded, .. } if pass.probe => {
                if failed || slow {
                    let open_for = breaker.trip(&config, clock.now());
                    drop(shard);
                    self.count(|c| &c.opened, 1);
                    tracing::warn!(key = %pass.key, open_ms = open_for.as_millis() as u64, "circuit open again: a probe failed");
                    return;
                }
                *succeeded += 1;
                if *succeeded >= config.half_open_calls {
                    breaker.trips = 0;
                    breaker.set(State::Closed);
                    drop(shard);
                    self.count(|c| &c.closed, 1);
                    tracing::info!(key = %pass.key, "circuit closed: the upstream recovered");
                }
            }
            State::Closed => {
                let at = match config.window {
                    Window::Time(_) => Some(clock.now()),
                    Window::Calls(_) => None,
                };
                breaker.push(Record { at, failed, slow });
                match config.window {
                    Window::Calls(n) => {
                        while breaker.records.len() > n.max(1) {
                            breaker.pop();
                        }
                    }
                    Window::Time(span) => {
                        let now = clock.now();
                        while breaker.records.front().is_some_and(|r| {
                            r.at.is_some_and(|at| now.saturating_duration_since(at) > span)
                        }) {
                            breaker.pop();
                        }
                    }
                }
                let total = breaker.records.len();
                if total < config.minimum_calls.max(1) {
                    return;
                }
                let (failures, slows) = (breaker.failures, breaker.slows);
                let failing = failures > 0 && failures as f64 / total as f64 >= config.failure_rate;
                let slowing = slows > 0
                    && config
                        .slow_call
                        .is_some_and(|(_, rate)| slows as f64 / total as f64 >= rate);
                if failing || slowing {
                    let open_for = breaker.trip(&config, clock.now());
                    drop(shard);
                    self.count(|c| &c.opened, 1);
                    tracing::warn!(
                        key = %pass.key,
                        failures,
                        slow = slows,
                        calls = total,
                        open_ms = open_for.as_millis() as u64,
                        "circuit open"
                    );
                }
            }
            _ => {}
        }
    }

    /// A call let through ended without an outcome that says anything about the upstream (its
    /// caller dropped it, another layer refused it, it was a client error or a copy of a call
    /// counted elsewhere): a probe's place is given back, so that probing goes on.
    pub(crate) fn abandon(&self, pass: &mut Pass) {
        if pass.recorded {
            return;
        }
        pass.recorded = true;
        let mut shard = self.place(&pass.key);
        let Some(breaker) = shard.get() else {
            return;
        };
        if breaker.instance != pass.instance {
            return;
        }
        breaker.in_flight = breaker.in_flight.saturating_sub(1);
        if pass.probe && breaker.generation == pass.generation {
            if let State::HalfOpen { admitted, .. } = &mut breaker.state {
                *admitted = admitted.saturating_sub(1);
            }
        }
    }

    pub(crate) fn force(&self, open: bool) {
        let forced = if open { FORCED_OPEN } else { FORCED_CLOSED };
        self.forced.store(forced, Relaxed);
        tracing::info!(open, "circuit forced");
    }

    pub(crate) fn reset(&self) {
        self.forced.store(NOT_FORCED, Relaxed);
        *lock(&self.anonymous) = None;
        self.breakers.for_each_shard(|shard| shard.clear());
        tracing::info!("circuit reset");
    }

    pub(crate) fn state(&self, key: &Key) -> BreakerState {
        match self.forced.load(Relaxed) {
            FORCED_OPEN => return BreakerState::ForcedOpen,
            FORCED_CLOSED => return BreakerState::ForcedClosed,
            _ => {}
        }
        let now = Instant::now();
        let mut shard = self.place(key);
        match shard.get().map(|b| b.state) {
            None | Some(State::Closed) => BreakerState::Closed,
            Some(State::Open { until, .. }) if until > now => BreakerState::Open {
                remaining: until - now,
            },
            Some(State::Open { asked: true, .. }) => BreakerState::Closed,
            Some(State::Open { .. }) | Some(State::HalfOpen { .. }) => BreakerState::HalfOpen,
        }
    }

    pub(crate) fn stats(&self) -> BreakerStats {
        let c = &self.counters;
        BreakerStats {
            calls: c.calls.load(Relaxed),
            failures: c.failures.load(Relaxed),
            slow: c.slow.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            opened: c.opened.load(Relaxed),
            closed: c.closed.load(Relaxed),
            keys: self.breakers.len() + usize::from(lock(&self.anonymous).is_some()),
        }
    }
}

impl Pass {
    pub(crate) fn key(&self) -> &Key {
        &self.key
    }
}
