use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The longest window a budget counts over.
const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// How many retries a layer may make: at most `ratio` of the first attempts of the last
/// `window`, plus `min_per_second` for every second of the window, so that a burst of failures
/// cannot multiply the load on an upstream that is already struggling.
///
/// The default allows 20% retries over 10 seconds plus 10 per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    window: Duration,
}

impl RetryBudget {
    /// A budget of `ratio` (0.2 for 20%) of recent first attempts plus `min_per_second`, counted
    /// over `window`.
    ///
    /// `window` is kept between one second and one hour (the ledger keeps a slot per second of
    /// it). A negative or NaN `ratio` counts as 0 (only the floor); an infinite one lifts the
    /// budget, as [`RetryBudget::unlimited`].
    pub fn new(ratio: f64, min_per_second: u32, window: Duration) -> Self {
        let ratio = if ratio.is_nan() { 0.0 } else { ratio.max(0.0) };
        RetryBudget {
            ratio,
            min_per_second,
            window: window.clamp(Duration::from_secs(1), MAX_WINDOW),
        }
    }

    /// No limit but `max_retries` (not recommended in front of a shared upstream).
    pub fn unlimited() -> Self {
        RetryBudget {
            ratio: f64::INFINITY,
            min_per_second: u32::MAX,
            window: Duration::from_secs(1),
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(0.2, 10, Duration::from_secs(10))
    }
}

/// Counts of one second of the window.
#[derive(Debug, Clone, Copy)]
struct Second {
    start: Instant,
    firsts: u64,
    retries: u64,
}

/// First attempts and retries over the last window, in one-second slots.
#[derive(Debug)]
pub(super) struct BudgetLedger {
    budget: RetryBudget,
    seconds: VecDeque<Second>,
}

impl BudgetLedger {
    pub(super) fn new(budget: RetryBudget) -> Self {
        BudgetLedger {
            budget,
            seconds: VecDeque::new(),
        }
    }

    pub(super) fn set(&mut self, budget: RetryBudget) {
        self.budget = budget;
    }

    fn current(&mut self, now: Instant) -> &mut Second {
        while let Some(oldest) = self.seconds.front() {
            if now.saturating_duration_since(oldest.start) >= self.budget.window {
                self.seconds.pop_front();
            } else {
                break;
            }
        }
        let fresh = match self.seconds.back() {
            Some(last) => now.saturating_duration_since(last.start) >= Duration::from_secs(1),
            None => true,
        };
        if fresh {
            self.seconds.push_back(Second {
                start: now,
                firsts: 0,
                retries: 0,
            });
        }
        let len = self.seconds.len();
        &mut self.seconds[len - 1]
    }

    #[cfg(test)]
    pub(super) fn first_attempt(&mut self, now: Instant) {
        self.first_attempts(now, 1);
    }

    /// Takes in `n` first attempts made at `now`.
    pub(super) fn first_attempts(&mut self, now: Instant, n: u64) {
        if n > 0 {
            self.current(now).firsts += n;
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(super) fn try_retry(&mut self, now: Instant) -> bool {
        if self.budget.ratio.is_infinite() {
            return true;
        }
        self.current(now);
        let firsts: u64 = self.seconds.iter().map(|s| s.firsts).sum();
        let retries: u64 = self.seconds.iter().map(|s| s.retries).sum();
        let floor = u64::from(self.budget.min_per_second)
            .saturating_mul(self.budget.window.as_secs().max(1));
        let allowed = floor as f64 + self.budget.ratio * firsts as f64;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        self.current(now).retries += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_is_a_share_of_first_attempts_plus_a_floor() {
        let mut ledger = BudgetLedger::new(RetryBudget::new(0.1, 1, Duration::from_secs(10)));
        let now = Instant::now();
        for _ in 0..100 {
            ledger.first_attempt(now);
        }
        // 10 seconds × 1 per second + 10% of 100.
        let granted = (0..100).filter(|_| ledger.try_retry(now)).count();
        assert_eq!(granted, 20);
        // Once the window has passed, the budget is back to its floor.
        let later = now + Duration::from_secs(10);
        let granted = (0..100).filter(|_| ledger.try_retry(later)).count();
        assert_eq!(granted, 10);
    }
}
