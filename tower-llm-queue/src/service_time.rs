//! How long requests hold their slots, smoothed, for the `retry_after` of a refusal: when is a
//! slot likely to free?

#[cfg(test)]
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

/// One request in `SAMPLE_EVERY` is measured, to learn how long requests hold their slots, and
/// every one while nothing has been measured yet; the others cost no clock read (about 25 ns
/// each on a virtual machine). Layers count their starts (or ends) where they count anything
/// else (per shard, under a lock they hold anyway) and ask [`ServiceTime::sampled`] or
/// [`ServiceTime::is_sampled`].
const SAMPLE_EVERY: u32 = 32;

/// The estimate while nothing has been measured.
const UNKNOWN: Duration = Duration::from_secs(1);

/// A smoothed time a request holds its slot (each sample weighs 1/8).
#[derive(Debug, Default)]
pub(crate) struct ServiceTime {
    /// Nanoseconds; 0 while nothing has been measured.
    nanos: AtomicU64,
    #[cfg(test)]
    starts: AtomicU32,
}

impl ServiceTime {
    /// When the request starting now started, if it is one of the sampled.
    #[cfg(test)]
    pub(crate) fn sample(&self) -> Option<Instant> {
        self.sampled(self.starts.fetch_add(1, Relaxed).wrapping_add(1))
    }

    /// When the request that is the `count`-th start of its counter started, if it is one of
    /// the sampled.
    #[inline]
    pub(crate) fn sampled(&self, count: u32) -> Option<Instant> {
        self.is_sampled(count).then(Instant::now)
    }

    /// Whether the `count`-th start (or end) of a counter is one of the sampled.
    #[inline]
    pub(crate) fn is_sampled(&self, count: u32) -> bool {
        count % SAMPLE_EVERY == 0 || !self.measured()
    }

    /// Whether anything has been measured yet.
    #[inline]
    fn measured(&self) -> bool {
        self.nanos.load(Relaxed) != 0
    }

    /// A request that started at `started` has released its slot.
    pub(crate) fn observe(&self, started: Instant) {
        let took = u64::try_from(started.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let smoothed = match self.nanos.load(Relaxed) {
            0 => took,
            average => average - average / 8 + took / 8,
        };
        self.nanos.store(smoothed, Relaxed);
    }

    /// When one of `holders` slots, taken at different times, is likely to free: the smoothed
    /// service time divided by their number, at least a millisecond.
    pub(crate) fn next_free(&self, holders: usize) -> Duration {
        let each = match self.nanos.load(Relaxed) {
            0 => UNKNOWN,
            nanos => Duration::from_nanos(nanos),
        };
        let holders = u32::try_from(holders.max(1)).unwrap_or(u32::MAX);
        (each / holders).max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn smoothed_and_divided() {
        let time = ServiceTime::default();
        assert_eq!(time.next_free(4), Duration::from_millis(250));
        // Every start is sampled while nothing has been measured, then one in `SAMPLE_EVERY`.
        let started = time.sample().expect("the first start is sampled");
        assert!(time.sample().is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        time.observe(started);
        let sampled = (0..2 * SAMPLE_EVERY)
            .filter(|_| time.sample().is_some())
            .count();
        assert_eq!(sampled, 2);
        assert_eq!(time.next_free(1), Duration::from_secs(2));
        assert_eq!(time.next_free(2), Duration::from_secs(1));
        assert_eq!(time.next_free(0), Duration::from_secs(2));
    }
}
