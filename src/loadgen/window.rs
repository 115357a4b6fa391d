//! Counting events over a sliding window, as the upstream's per-minute limits count them.

use std::time::Duration;

/// Events (admissions, with a weight such as their tokens) at times since the start of a run,
/// counted over a sliding window the way a per-minute limit counts them: an event at `t`
/// counts for the windows `(end - window, end]` that hold it.
#[derive(Debug, Clone)]
pub struct WindowCounter {
    window: Duration,
    /// Sorted by time.
    events: Vec<(Duration, u64)>,
}

impl WindowCounter {
    /// Counts `events`, in any order, over `window`.
    pub fn new(window: Duration, mut events: Vec<(Duration, u64)>) -> Self {
        events.sort_by_key(|&(at, _)| at);
        WindowCounter { window, events }
    }

    /// The number and total weight of the events in the window that ends at `end`.
    pub fn at(&self, end: Duration) -> (u64, u64) {
        let from = end.checked_sub(self.window);
        let first = match from {
            Some(from) => self.events.partition_point(|&(at, _)| at <= from),
            None => 0,
        };
        let last = self.events.partition_point(|&(at, _)| at <= end);
        let inside = &self.events[first..last.max(first)];
        (inside.len() as u64, inside.iter().map(|&(_, w)| w).sum())
    }

    /// The most events, and the most weight, in any one window (each maximum over its own
    /// windows). A window holding the most starts just before one of the events, so only those
    /// windows are looked at.
    pub fn peak(&self) -> (u64, u64) {
        let mut peak = (0, 0);
        let (mut weight, mut first) = (0u64, 0usize);
        for (last, &(end, w)) in self.events.iter().enumerate() {
            weight += w;
            while end.saturating_sub(self.events[first].0) >= self.window {
                weight -= self.events[first].1;
                first += 1;
            }
            peak.0 = peak.0.max((last + 1 - first) as u64);
            peak.1 = peak.1.max(weight);
        }
        peak
    }

    /// The mean over the windows ending every `step` from `from + window` to `to` of
    /// `(count / limit_count, weight / limit_weight)`: how much of a limit the events used over
    /// `from..to`, in whole windows. `None` when no whole window fits in the interval.
    pub fn mean_share(
        &self,
        from: Duration,
        to: Duration,
        step: Duration,
        limits: (u64, u64),
    ) -> Option<(f64, f64)> {
        let step = step.max(Duration::from_millis(1));
        let mut end = from + self.window;
        let (mut sum, mut n) = ((0.0, 0.0), 0u32);
        while end <= to {
            let (count, weight) = self.at(end);
            sum.0 += count as f64 / limits.0.max(1) as f64;
            sum.1 += weight as f64 / limits.1.max(1) as f64;
            n += 1;
            end += step;
        }
        (n > 0).then(|| (sum.0 / f64::from(n), sum.1 / f64::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_event_counts_until_a_window_after_it() {
        let counter = WindowCounter::new(ms(1000), vec![(ms(500), 7), (ms(100), 3), (ms(900), 1)]);
        assert_eq!(counter.at(ms(50)), (0, 0));
        assert_eq!(counter.at(ms(100)), (1, 3));
        assert_eq!(counter.at(ms(950)), (3, 11));
        assert_eq!(counter.at(ms(1099)), (3, 11));
        assert_eq!(counter.at(ms(1100)), (2, 8), "the first left at 100 + 1000");
        assert_eq!(counter.at(ms(1900)), (0, 0));
    }

    #[test]
    fn the_peak_is_over_any_window() {
        let events = vec![
            (ms(0), 1),
            (ms(400), 1),
            (ms(999), 50),
            (ms(1000), 1),
            (ms(1300), 1),
        ];
        let counter = WindowCounter::new(ms(1000), events);
        // 400, 999, 1000, 1300 fit in (300, 1300]; 0..999 hold 52 tokens.
        assert_eq!(counter.peak(), (4, 53));
        assert_eq!(WindowCounter::new(ms(10), vec![]).peak(), (0, 0));
    }

    #[test]
    fn the_mean_share_covers_whole_windows_only() {
        // One event every 100 ms: 10 in every window of a second.
        let events = (0..50).map(|i| (ms(i * 100), 2)).collect();
        let counter = WindowCounter::new(ms(1000), events);
        let share = counter
            .mean_share(ms(0), ms(4000), ms(100), (10, 40))
            .unwrap();
        assert_eq!(share, (1.0, 0.5));
        assert_eq!(counter.mean_share(ms(0), ms(999), ms(100), (10, 40)), None);
    }
}
