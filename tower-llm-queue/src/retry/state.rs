use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::sharded::lock;

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

/// The settings and the budget's ledger, read together under one lock when a call starts.
#[derive(Debug)]
struct Book {
    config: Config,
    ledger: BudgetLedger,
}

/// What every service of one retry layer shares: the settings, the budget, the cool-down and the
/// counters.
#[derive(Debug)]
pub(crate) struct Shared {
    book: Mutex<Book>,
    cooldown_until: Mutex<Option<Instant>>,
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
            }),
            cooldown_until: Mutex::new(None),
            counters: Counters::default(),
        }
    }

    pub(super) fn set_budget(&self, budget: RetryBudget) {
        lock(&self.book).ledger.set(budget);
    }

    pub(super) fn configure(&self, f: impl FnOnce(&mut Config)) {
        f(&mut lock(&self.book).config);
    }

    pub(super) fn config(&self) -> Config {
        lock(&self.book).config
    }

    /// Counts a call's first attempt, and gives the settings it runs with.
    pub(super) fn first_attempt(&self) -> Config {
        self.counters.calls.fetch_add(1, Relaxed);
        let mut book = lock(&self.book);
        book.ledger.first_attempt(Instant::now());
        book.config
    }

    pub(super) fn try_retry(&self) -> bool {
        let granted = lock(&self.book).ledger.try_retry(Instant::now());
        if granted {
            self.counters.retries.fetch_add(1, Relaxed);
        }
        granted
    }

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
        let until = crate::clock::later(Instant::now(), delay);
        let mut current = lock(&self.cooldown_until);
        if current.is_none_or(|c| c < until) {
            *current = Some(until);
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "retry: upstream cool-down"
            );
        }
    }

    /// When the cool-down ends, if one is in force.
    pub(super) fn cooldown(&self) -> Option<Instant> {
        let mut current = lock(&self.cooldown_until);
        match *current {
            Some(until) if until > Instant::now() => Some(until),
            Some(_) => {
                *current = None;
                None
            }
            None => None,
        }
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
