//! Instants far ahead, computed without overflow, and durations every clone of a layer reads
//! without a lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

/// The furthest any layer looks ahead: about 30 years, as tokio's own timers do.
pub(crate) const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `base + delay`, with any delay beyond [`FAR`] cut to it: never an overflow, whatever the
/// delay.
pub(crate) fn later(base: Instant, delay: Duration) -> Instant {
    base.checked_add(delay.min(FAR)).unwrap_or(base)
}

/// An optional duration in an atomic, to the nanosecond; durations beyond 2^64 − 2 nanoseconds
/// (584 years) are cut to that.
#[derive(Debug)]
pub(crate) struct AtomicDuration(AtomicU64);

const UNSET: u64 = u64::MAX;

impl AtomicDuration {
    pub(crate) fn new(duration: Option<Duration>) -> Self {
        AtomicDuration(AtomicU64::new(Self::encode(duration)))
    }

    #[inline]
    fn encode(duration: Option<Duration>) -> u64 {
        duration.map_or(UNSET, |d| u64::try_from(d.as_nanos()).unwrap_or(UNSET - 1))
    }

    pub(crate) fn set(&self, duration: Option<Duration>) {
        self.0.store(Self::encode(duration), Relaxed);
    }

    #[inline]
    pub(crate) fn get(&self) -> Option<Duration> {
        match self.0.load(Relaxed) {
            UNSET => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_durations_keep_nanoseconds_and_saturate() {
        let d = AtomicDuration::new(None);
        assert_eq!(d.get(), None);
        d.set(Some(Duration::from_micros(900)));
        assert_eq!(d.get(), Some(Duration::from_micros(900)));
        d.set(Some(Duration::MAX));
        assert_eq!(d.get(), Some(Duration::from_nanos(u64::MAX - 1)));
    }

    #[test]
    fn huge_delays_saturate() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::MAX), now + FAR);
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
