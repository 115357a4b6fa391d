use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use crate::sharded::{lock, Mutex};

use super::budget::{BudgetLedger, RetryBudget};
use super::{Config, RetryStats};

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    retries: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    budget_exhausted: AtomicU64,
    retry_after_too_long: AtomicU64,
    cooled_down: AtomicU64,
}

/// The budget's ledger takes in the first attempts counted since it last looked every this many
/// calls, and before every retry: a first attempt costs no lock and no clock read.
const FIRSTS_EVERY: u64 = 16;

/// The settings and the budget's ledger, under one lock.
#[derive(Debug)]
struct Book {
    config: Config,
    ledger: BudgetLedger,
    /// First attempts the ledger has taken in.
    firsts_seen: u64,
}

impl Book {
    /// Takes in the first attempts counted since the last look, as made now.
    fn catch_up(&mut self, calls: u64, now: Instant) {
        let new = calls.saturating_sub(self.firsts_seen);
        self.firsts_seen = self.firsts_seen.max(calls);
        self.ledger.first_attempts(now, new);
    }
}

/// What every service of one retry layer shares: the settings, the budget, the cool-down and the
/// counters.
///
/// A call that succeeds at once touches two counters and reads one word for the cool-down; the
/// lock is for failures (the settings are read under it then) and for the budget.
#[derive(Debug)]
pub(crate) struct Shared {
    book: Mutex<Book>,
    /// The end of the cool-down, in nanoseconds after `cooldown_base` (plus one); 0 for none.
    /// Stays 0 while the cool-down is disabled.
    cooldown_until: AtomicU64,
    cooldown_base: OnceLock<Instant>,
    counters: Counters,
}

/// How a call through the retry layer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    Succeeded,
    /// Failed for good: not retryable, or `max_retries` reached.
    Failed,
    BudgetExhausted,
    RetryAfterTooLong,
}

impl Shared {
    pub(super) fn new(config: Config) -> Self {
        Shared {
            book: Mutex::new(Book {
                config,
                ledger: BudgetLedger::new(RetryBudget::default()),
                firsts_seen: 0,
            }),
            cooldown_until: AtomicU64::new(0),
            cooldown_base: OnceLock::new(),
            counters: Counters::default(),
        }
    }

    pub(super) fn set_budget(&self, budget: RetryBudget) {
        lock(&self.book).ledger.set(budget);
    }

    pub(super) fn configure(&self, f: impl FnOnce(&mut Config)) {
        let mut book = lock(&self.book);
        f(&mut book.config);
        if !book.config.cooldown {
            self.cooldown_until.store(0, Relaxed);
        }
    }

    /// The settings, as a failed attempt reads them.
    pub(super) fn config(&self) -> Config {
        lock(&self.book).config
    }

    /// Counts a call's first attempt.
    #[inline]
    pub(super) fn first_attempt(&self) {
        let calls = self.counters.calls.fetch_add(1, Relaxed) + 1;
        if calls % FIRSTS_EVERY == 0 {
            lock(&self.book).catch_up(calls, Instant::now());
        }
    }

    pub(super) fn try_retry(&self) -> bool {
        let now = Instant::now();
        let mut book = lock(&self.book);
        book.catch_up(self.counters.calls.load(Relaxed), now);
        let granted = book.ledger.try_retry(now);
        drop(book);
        if granted {
            self.counters.retries.fetch_add(1, Relaxed);
        }
        granted
    }

    #[inline]
    pub(super) fn ended(&self, ending: Ending) {
        let c = &self.counters;
        match ending {
            Ending::Succeeded => &c.succeeded,
            Ending::Failed => &c.failed,
            Ending::BudgetExhausted => &c.budget_exhausted,
            Ending::RetryAfterTooLong => &c.retry_after_too_long,
        }
        .fetch_add(1, Relaxed);
    }

    /// The upstream asked not to be called before `delay` from now: every request through the
    /// layer waits until then.
    pub(super) fn cool_down(&self, delay: Duration) {
        let now = Instant::now();
        let base = *self.cooldown_base.get_or_init(|| now);
        let until = crate::clock::later(now, delay);
        let nanos = u64::try_from(until.saturating_duration_since(base).as_nanos())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let before = self.cooldown_until.fetch_max(nanos, Relaxed);
        if before < nanos {
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "retry: upstream cool-down"
            );
        }
    }

    /// When the cool-down ends, if one is in force.
    #[inline]
    pub(super) fn cooldown(&self) -> Option<Instant> {
        match self.cooldown_until.load(Relaxed) {
            0 => None,
            nanos => self.cooldown_at(nanos),
        }
    }

    /// The end of the cool-down written as `nanos`, unless it has passed.
    #[cold]
    fn cooldown_at(&self, nanos: u64) -> Option<Instant> {
        let base = *self.cooldown_base.get()?;
        let until = base + Duration::from_nanos(nanos - 1);
        if until > Instant::now() {
            return Some(until);
        }
        let _ = self
            .cooldown_until
            .compare_exchange(nanos, 0, Relaxed, Relaxed);
        None
    }

    pub(super) fn waited_for_cooldown(&self) {
        self.counters.cooled_down.fetch_add(1, Relaxed);
    }

    pub(super) fn stats(&self) -> RetryStats {
        let c = &self.counters;
        let now = Instant::now();
        RetryStats {
            calls: c.calls.load(Relaxed),
            retries: c.retries.load(Relaxed),
            succeeded: c.succeeded.load(Relaxed),
            failed: c.failed.load(Relaxed),
            budget_exhausted: c.budget_exhausted.load(Relaxed),
            retry_after_too_long: c.retry_after_too_long.load(Relaxed),
            cooled_down: c.cooled_down.load(Relaxed),
            cooldown_remaining: self
                .cooldown()
                .map_or(Duration::ZERO, |until| until.saturating_duration_since(now)),
        }
    }
}
