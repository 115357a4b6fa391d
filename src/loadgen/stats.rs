//! Percentiles of samples.

use std::time::Duration;

/// The 50th, 95th and 99th percentiles of a set of durations, in milliseconds, and how many
/// there were.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    /// How many samples.
    pub count: usize,
    /// The median.
    pub p50_ms: f64,
    /// The 95th percentile.
    pub p95_ms: f64,
    /// The 99th percentile.
    pub p99_ms: f64,
}

impl Percentiles {
    /// The percentiles of `samples` (nearest rank); all zero when there are none.
    pub fn of(samples: impl IntoIterator<Item = Duration>) -> Self {
        let mut sorted: Vec<Duration> = samples.into_iter().collect();
        sorted.sort_unstable();
        let ms = |q: f64| percentile(&sorted, q).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        Percentiles {
            count: sorted.len(),
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
        }
    }
}

/// The `q`-quantile (0.0 to 1.0) of `sorted` by nearest rank: the smallest sample with at least
/// a share `q` of the samples at or below it.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.max(1) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(samples.iter().rev().copied());
        assert_eq!(
            (p.count, p.p50_ms, p.p95_ms, p.p99_ms),
            (100, 50.0, 95.0, 99.0)
        );
        assert_eq!(percentile(&samples, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&samples, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(Percentiles::of([]), Percentiles::default());
        let one = Percentiles::of([Duration::from_millis(7)]);
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
    }
}
