//! The breakers of one layer, one per key, and their state machine.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::classify::Outcome;
use crate::key::Key;
use crate::rejected::{Rejected, RejectionKind};
use crate::sharded::{lock, Mutex, MutexGuard, Sharded};

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
    /// The tag of this breaker's first state: a pass with an older tag was let through by a
    /// breaker evicted or reset since, under the same key.
    first_tag: u64,
    /// The tag of the current state. It changes whenever the state does, so that calls let
    /// through under an older state do not count in the new one.
    tag: u64,
    /// Calls let through and not yet recorded: a breaker with some is never evicted.
    in_flight: u32,
    /// Whether a call came since the last sweep of its shard.
    touched: bool,
    state: State,
    records: VecDeque<Record>,
    /// Failed and slow calls among `records`.
    failures: usize,
    slows: usize,
    /// Consecutive trips without a full recovery, for `open_growth`.
    trips: u32,
}

impl Breaker {
    fn new(tag: u64) -> Self {
        Breaker {
            first_tag: tag,
            tag,
            in_flight: 0,
            touched: false,
            state: State::Closed,
            records: VecDeque::new(),
            failures: 0,
            slows: 0,
            trips: 0,
        }
    }

    fn set(&mut self, state: State, tag: u64) {
        self.state = state;
        self.tag = tag;
        self.records.clear();
        self.failures = 0;
        self.slows = 0;
    }

    /// Opens for the time the number of consecutive trips calls for; returns that time.
    fn trip(&mut self, config: &Config, now: Instant, tag: u64) -> Duration {
        let open_for = config.open_for(self.trips);
        self.trips = self.trips.saturating_add(1);
        self.set(
            State::Open {
                until: crate::clock::later(now, open_for),
                asked: false,
            },
            tag,
        );
        open_for
    }

    /// Whether the breaker can be forgotten without changing any decision: closed, nothing in
    /// flight, no failure or slow call remembered, and no call since the last sweep. Clears the
    /// mark of that last call.
    fn idle(&mut self) -> bool {
        let idle = self.clean() && self.in_flight == 0 && !self.touched;
        self.touched = false;
        idle
    }

    /// Closed, with nothing but successes in its window: one more success changes no decision.
    fn clean(&self) -> bool {
        matches!(self.state, State::Closed) && self.failures == 0 && self.slows == 0
    }

    /// Adds a record, and forgets those the window no longer holds.
    fn note(&mut self, record: Record, window: Window, clock: &mut Clock) {
        self.failures += usize::from(record.failed);
        self.slows += usize::from(record.slow);
        self.records.push_back(record);
        match window {
            Window::Calls(n) => {
                while self.records.len() > n.max(1) {
                    self.pop();
                }
            }
            Window::Time(span) => {
                let now = clock.now();
                while self.records.front().is_some_and(|r| {
                    r.at.is_some_and(|at| now.saturating_duration_since(at) > span)
                }) {
                    self.pop();
                }
            }
        }
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

/// The anonymous breaker as calls that take no lock read it, in one word: the tag of its state
/// (the bits from [`TAG_SHIFT`] up), the successes counted since its records were last brought
/// up to date (the bits of [`PENDING_MASK`], saturating), and [`CLEAN`].
///
/// `CLEAN` says that the breaker is closed, has nothing but successes in its window, counts
/// its window in calls, and is not forced open. While it is set, a call is let through and its success counted without
/// the breaker's lock: more successes in a window of successes change no decision, and the
/// successes counted are added to the records, in the order they came relative to any other
/// record, by the next call that takes the lock. A window counted in calls holds the same
/// records either way.
const CLEAN: u64 = 1;
const PENDING_ONE: u64 = 2;
/// At most this many successes wait to be added; a window of more calls keeps to the lock.
const PENDING_MAX: u64 = (1 << 23) - 1;
const PENDING_MASK: u64 = PENDING_MAX << 1;
/// Tags stay below 2^40: a trillion changes of state.
const TAG_SHIFT: u32 = 24;

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
    /// Whether the settings watch for slow calls, for calls let through without a lock.
    watch_slow: AtomicBool,
    forced: AtomicU8,
    /// The breaker of the anonymous key — the only one of a layer without `keyed_by` — apart
    /// from the others: no hashing, no sweeping, and a path without its lock (see [`CLEAN`]).
    anonymous: Mutex<Option<Breaker>>,
    /// The anonymous breaker's word (see [`CLEAN`]).
    fast: AtomicU64,
    /// The count of successes, in the word's [`PENDING_MASK`] bits, from which one more
    /// changes nothing: as many as the window holds.
    saturated: AtomicU64,
    breakers: Sharded<Breaker>,
    /// The last tag handed out.
    tags: AtomicU64,
    counters: Counters,
}

/// The locked place of one key's breaker.
enum Place<'a> {
    Anonymous(Anonymous<'a>),
    Keyed(crate::sharded::Place<'a, Breaker>),
}

/// The anonymous breaker, locked. The successes counted without the lock are added to its
/// records when it is locked, and its word is written again when it is let go.
struct Anonymous<'a> {
    breaker: MutexGuard<'a, Option<Breaker>>,
    shared: &'a Shared,
    window: Window,
}

impl Drop for Anonymous<'_> {
    fn drop(&mut self) {
        self.shared.publish(self.breaker.as_ref(), self.window);
    }
}

impl Place<'_> {
    fn get(&mut self) -> Option<&mut Breaker> {
        match self {
            Place::Anonymous(anonymous) => anonymous.breaker.as_mut(),
            Place::Keyed(place) => place.get(),
        }
    }

    /// The key's breaker, made with `new` if there is none; a new key's shard is swept of idle
    /// breakers first when due.
    fn get_or_insert_with(&mut self, new: impl FnOnce() -> Breaker) -> &mut Breaker {
        match self {
            Place::Anonymous(anonymous) => anonymous.breaker.get_or_insert_with(new),
            Place::Keyed(place) => place.get_or_insert_with(Breaker::idle, new),
        }
    }
}

/// A call let through: normal, or one of the half-open probes.
#[derive(Debug)]
pub(crate) struct Pass {
    key: Key,
    /// The tag of the breaker's state when the call was let through, with the flags
    /// [`PROBE`], [`FAST`] and [`RECORDED`] above it: one word, written at once, which the
    /// future that carries the pass moves without stalling on a part of it.
    tag: u64,
    /// When the call started, when slow calls are watched.
    started: Option<Instant>,
}

/// A [`Pass`] of a half-open probe.
const PROBE: u64 = 1 << 63;
/// A [`Pass`] let through by the anonymous breaker without its lock: not counted in
/// `in_flight`.
const FAST: u64 = 1 << 62;
/// A [`Pass`] whose end has been recorded (or given up).
const RECORDED: u64 = 1 << 61;

impl Pass {
    fn tag(&self) -> u64 {
        self.tag & !(PROBE | FAST | RECORDED)
    }

    fn probe(&self) -> bool {
        self.tag & PROBE != 0
    }

    fn fast(&self) -> bool {
        self.tag & FAST != 0
    }

    fn recorded(&self) -> bool {
        self.tag & RECORDED != 0
    }

    fn set_recorded(&mut self) {
        self.tag |= RECORDED;
    }
}

/// The [`Shared::saturated`] count of a window: its length in calls, in the word's
/// [`PENDING_MASK`] bits (a window in time never counts successes in the word).
fn saturated(window: Window) -> u64 {
    match window {
        Window::Calls(n) => (n as u64).clamp(1, PENDING_MAX) * PENDING_ONE,
        Window::Time(_) => PENDING_MASK,
    }
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
            watch_slow: AtomicBool::new(config.slow_call.is_some()),
            forced: AtomicU8::new(NOT_FORCED),
            anonymous: Mutex::new(None),
            fast: AtomicU64::new(0),
            saturated: AtomicU64::new(saturated(config.window)),
            breakers: Sharded::new(),
            tags: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    pub(crate) fn configure(&self, f: impl FnOnce(&mut Config)) {
        let mut config = self.config.write().unwrap_or_else(PoisonError::into_inner);
        let before = config.window;
        f(&mut config);
        self.saturated.store(saturated(config.window), Relaxed);
        let mut anonymous = lock(&self.anonymous);
        if let Some(breaker) = anonymous.as_mut() {
            self.take_in(breaker, before);
        }
        self.publish(anonymous.as_ref(), config.window);
        self.watch_slow.store(config.slow_call.is_some(), Relaxed);
    }

    pub(crate) fn config(&self) -> Config {
        *self.config.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, counter: impl FnOnce(&Counters) -> &AtomicU64, n: u64) {
        if n > 0 {
            counter(&self.counters).fetch_add(n, Relaxed);
        }
    }

    /// A tag for a new state of a breaker.
    fn tag(&self) -> u64 {
        self.tags.fetch_add(1, Relaxed) + 1
    }

    /// The locked place of `key`'s breaker; `window` is asked for the anonymous breaker only.
    fn place<'a>(&'a self, key: &'a Key, window: impl FnOnce() -> Window) -> Place<'a> {
        if key.is_anonymous() {
            let window = window();
            let mut breaker = lock(&self.anonymous);
            if let Some(breaker) = breaker.as_mut() {
                self.take_in(breaker, window);
            }
            return Place::Anonymous(Anonymous {
                breaker,
                shared: self,
                window,
            });
        }
        Place::Keyed(self.breakers.lock(key))
    }

    /// Adds the successes counted without the lock to the anonymous breaker's records.
    fn take_in(&self, breaker: &mut Breaker, window: Window) {
        let word = self.fast.fetch_and(!PENDING_MASK, Relaxed);
        let pending = (word & PENDING_MASK) / PENDING_ONE;
        if pending == 0 || word >> TAG_SHIFT != breaker.tag {
            return;
        }
        let mut clock = Clock(None);
        let at = match window {
            Window::Time(_) => Some(clock.now()),
            Window::Calls(_) => None,
        };
        let kept = match window {
            Window::Calls(n) => pending.min(n.max(1) as u64),
            Window::Time(_) => pending,
        };
        let success = Record {
            at,
            failed: false,
            slow: false,
        };
        for _ in 0..kept {
            breaker.note(success, window, &mut clock);
        }
    }

    /// Writes the anonymous breaker's word for its state now, keeping the successes counted
    /// under the same tag.
    fn publish(&self, breaker: Option<&Breaker>, window: Window) {
        let fits = matches!(window, Window::Calls(n) if n as u64 <= PENDING_MAX);
        let open = self.forced.load(Relaxed) == FORCED_OPEN;
        let word = match breaker {
            Some(breaker) => {
                (breaker.tag << TAG_SHIFT) | u64::from(fits && !open && breaker.clean())
            }
            None => 0,
        };
        let _ = self.fast.fetch_update(Relaxed, Relaxed, |old| {
            if old & !PENDING_MASK == word {
                return None;
            }
            let same_tag = old >> TAG_SHIFT == word >> TAG_SHIFT;
            Some(word | if same_tag { old & PENDING_MASK } else { 0 })
        });
    }

    /// Counts a success of a call let through without the lock, if the anonymous breaker is
    /// still clean and in the same state; `false` if the call must be recorded under the lock.
    ///
    /// Once a window's worth of successes waits, the word is only read: the success takes its
    /// place among those, where one more changes nothing, as the records are brought up to
    /// date with at most a window of them.
    #[inline]
    fn record_fast(&self, tag: u64) -> bool {
        let mut word = self.fast.load(Relaxed);
        loop {
            if word & CLEAN == 0 || word >> TAG_SHIFT != tag {
                return false;
            }
            if word & PENDING_MASK >= self.saturated.load(Relaxed) {
                return true;
            }
            match self
                .fast
                .compare_exchange_weak(word, word + PENDING_ONE, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => word = actual,
            }
        }
    }

    /// Lets a call of the anonymous key through without the lock, while its breaker is clean;
    /// `None`: the call is for [`admit`](Self::admit).
    #[inline]
    pub(crate) fn admit_at_once(&self, key: &Key) -> Option<Pass> {
        if !key.is_anonymous() {
            return None;
        }
        let word = self.fast.load(Relaxed);
        if word & CLEAN == 0 {
            return None;
        }
        self.counters.calls.fetch_add(1, Relaxed);
        Some(Pass {
            key: Key::anonymous(),
            tag: (word >> TAG_SHIFT) | FAST,
            started: self.watch_slow.load(Relaxed).then(Instant::now),
        })
    }

    /// Lets a call through under the lock of the key's breaker, or refuses it with
    /// `CircuitOpen`.
    pub(crate) fn admit(&self, key: Key) -> Result<Pass, Rejected> {
        let config = &self.config();
        let forced = self.forced.load(Relaxed);
        let mut clock = Clock(None);
        let mut shard = self.place(&key, || config.window);
        let breaker = shard.get_or_insert_with(|| Breaker::new(self.tag()));
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
                        breaker.set(State::Closed, self.tag());
                        tracing::info!(key = %key, "circuit closed: the upstream's wait is over");
                    } else {
                        breaker.set(
                            State::HalfOpen {
                                admitted: 0,
                                succeeded: 0,
                            },
                            self.tag(),
                        );
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
        let tag = breaker.tag;
        breaker.in_flight += 1;
        drop(shard);
        self.count(|c| &c.calls, 1);
        Ok(Pass {
            key,
            tag: if probe { tag | PROBE } else { tag },
            started: config.slow_call.map(|_| clock.now()),
        })
    }

    /// Records how a call that was let through ended.
    #[inline]
    pub(crate) fn record(&self, pass: &mut Pass, outcome: Outcome) {
        let unwatched_success = matches!(outcome, Outcome::Success) && pass.started.is_none();
        if unwatched_success && pass.fast() && self.record_fast(pass.tag()) {
            pass.set_recorded();
            return;
        }
        self.record_locked(pass, outcome)
    }

    /// [`record`](Self::record) under the lock of the key's breaker, unless the call was let
    /// through without it and succeeded in time while the breaker stays clean.
    fn record_locked(&self, pass: &mut Pass, outcome: Outcome) {
        let config = self.config();
        let mut clock = Clock(None);
        let slow = match (pass.started, config.slow_call) {
            (Some(started), Some((limit, _))) => {
                clock.now().saturating_duration_since(started) >= limit
            }
            _ => false,
        };
        let (failed, not_before) = match outcome {
            Outcome::Success if !slow && pass.fast() && self.record_fast(pass.tag()) => {
                pass.set_recorded();
                return;
            }
            Outcome::Success => (false, None),
            Outcome::Failure { not_before, .. } => (true, not_before),
            Outcome::ClientError => (true, None),
        };
        if matches!(outcome, Outcome::ClientError) && !config.count_client_errors {
            return self.abandon(pass);
        }
        pass.set_recorded();
        self.count(|c| &c.failures, u64::from(failed));
        self.count(|c| &c.slow, u64::from(slow));
        let mut shard = self.place(&pass.key, || config.window);
        let Some(breaker) = shard.get() else {
            return;
        };
        if pass.tag() < breaker.first_tag {
            return;
        }
        if !pass.fast() {
            breaker.in_flight = breaker.in_flight.saturating_sub(1);
        }
        if let (Some(delay), true) = (not_before, config.open_on_not_before) {
            let until = crate::clock::later(clock.now(), delay);
            let later = match breaker.state {
                State::Open { until: current, .. } => until > current,
                _ => true,
            };
            if later && !delay.is_zero() {
                breaker.set(State::Open { until, asked: true }, self.tag());
                drop(shard);
                self.count(|c| &c.opened, 1);
                tracing::warn!(key = %pass.key, delay_ms = delay.as_millis() as u64, "circuit open: the upstream asked to wait");
                return;
            }
        }
        if breaker.tag != pass.tag() {
            return;
        }
        match &mut breaker.state {
            State::HalfOpen { succeeded, .. } if pass.probe() => {
                if failed || slow {
                    let open_for = breaker.trip(&config, clock.now(), self.tag());
                    drop(shard);
                    self.count(|c| &c.opened, 1);
                    tracing::warn!(key = %pass.key, open_ms = open_for.as_millis() as u64, "circuit open again: a probe failed");
                    return;
                }
                *succeeded += 1;
                if *succeeded >= config.half_open_calls {
                    breaker.trips = 0;
                    breaker.set(State::Closed, self.tag());
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
                breaker.note(Record { at, failed, slow }, config.window, &mut clock);
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
                    let open_for = breaker.trip(&config, clock.now(), self.tag());
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
        if pass.recorded() {
            return;
        }
        pass.set_recorded();
        if pass.fast() {
            return;
        }
        let mut shard = self.place(&pass.key, || self.config().window);
        let Some(breaker) = shard.get() else {
            return;
        };
        if pass.tag() < breaker.first_tag {
            return;
        }
        breaker.in_flight = breaker.in_flight.saturating_sub(1);
        if pass.probe() && breaker.tag == pass.tag() {
            if let State::HalfOpen { admitted, .. } = &mut breaker.state {
                *admitted = admitted.saturating_sub(1);
            }
        }
    }

    pub(crate) fn force(&self, open: bool) {
        let forced = if open { FORCED_OPEN } else { FORCED_CLOSED };
        self.forced.store(forced, Relaxed);
        let window = self.config().window;
        let anonymous = lock(&self.anonymous);
        self.publish(anonymous.as_ref(), window);
        drop(anonymous);
        tracing::info!(open, "circuit forced");
    }

    pub(crate) fn reset(&self) {
        self.forced.store(NOT_FORCED, Relaxed);
        let mut anonymous = lock(&self.anonymous);
        *anonymous = None;
        self.publish(None, Window::Calls(0));
        drop(anonymous);
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
        let mut shard = self.place(key, || self.config().window);
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
