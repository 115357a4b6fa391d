use std::time::Duration;

/// How the delay between attempts grows: `initial × factor^(n−1)` before the n-th retry, at most
/// `max`, spread by a [`Jitter`].
///
/// Seed 000's schedule — 2, 4 and 8 seconds — is
/// `Backoff::exponential(Duration::from_secs(2), 2.0, Duration::from_secs(60))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    factor: f64,
    max: Duration,
    jitter: Jitter,
}

/// How a computed delay is randomized so that clients that failed together do not retry
/// together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Exactly the computed delay.
    None,
    /// Anywhere from zero to the computed delay (the default).
    #[default]
    Full,
    /// Half the computed delay, plus anywhere up to the other half.
    Equal,
    /// Anywhere from `initial` to three times the previous delay, at most `max`; not tied to the
    /// attempt number.
    Decorrelated,
}

impl Backoff {
    /// Exponential backoff without jitter: `initial`, `initial × factor`, ... at most `max`.
    /// A `factor` below 1 (or not a number) counts as 1.
    pub fn exponential(initial: Duration, factor: f64, max: Duration) -> Self {
        let factor = if factor.is_finite() && factor >= 1.0 {
            factor
        } else {
            1.0
        };
        Backoff {
            initial,
            factor,
            max: max.max(initial),
            jitter: Jitter::None,
        }
    }

    /// Spreads every delay with `jitter`.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The delay before retry number `retry` (1 for the first retry), given the previous delay.
    pub fn delay(&self, retry: u32, previous: Duration) -> Duration {
        let exponent = retry.saturating_sub(1).min(64) as i32;
        let grown = self.initial.as_secs_f64() * self.factor.powi(exponent);
        let base = Duration::try_from_secs_f64(grown)
            .unwrap_or(self.max)
            .min(self.max);
        match self.jitter {
            Jitter::None => base,
            Jitter::Full => random_between(Duration::ZERO, base),
            Jitter::Equal => base / 2 + random_between(Duration::ZERO, base - base / 2),
            Jitter::Decorrelated => {
                let upper = previous.max(self.initial).saturating_mul(3).min(self.max);
                random_between(self.initial.min(upper), upper)
            }
        }
    }
}

impl Default for Backoff {
    /// 500 ms, doubling, at most 30 s, with full jitter.
    fn default() -> Self {
        Backoff::exponential(Duration::from_millis(500), 2.0, Duration::from_secs(30))
            .jitter(Jitter::Full)
    }
}

fn random_between(low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    let span = (high - low).as_nanos().min(u64::MAX as u128) as u64;
    low + Duration::from_nanos(fastrand::u64(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seed_000_schedule() {
        let b = Backoff::exponential(Duration::from_secs(2), 2.0, Duration::from_secs(60));
        let delays: Vec<u64> = (1..=4)
            .map(|n| b.delay(n, Duration::ZERO).as_secs())
            .collect();
        assert_eq!(delays, [2, 4, 8, 16]);
        assert_eq!(b.delay(40, Duration::ZERO), Duration::from_secs(60));
    }

    proptest! {
        #[test]
        fn jitter_stays_within_its_bounds(
            initial_ms in 1u64..5_000,
            max_ms in 1u64..120_000,
            factor in 1.0f64..4.0,
            retry in 1u32..40,
            previous_ms in 0u64..200_000,
        ) {
            let (initial, max) = (Duration::from_millis(initial_ms), Duration::from_millis(max_ms));
            let plain = Backoff::exponential(initial, factor, max);
            let base = plain.delay(retry, Duration::ZERO);
            prop_assert!(base >= initial.min(max.max(initial)) && base <= max.max(initial));
            let previous = Duration::from_millis(previous_ms);
            let full = plain.jitter(Jitter::Full).delay(retry, previous);
            prop_assert!(full <= base);
            let equal = plain.jitter(Jitter::Equal).delay(retry, previous);
            prop_assert!(equal >= base / 2 && equal <= base);
            let decorrelated = plain.jitter(Jitter::Decorrelated).delay(retry, previous);
            prop_assert!(decorrelated >= initial.min(max.max(initial)));
            prop_assert!(decorrelated <= max.max(initial));
            prop_assert!(decorrelated <= previous.max(initial) * 3);
        }
    }
}
