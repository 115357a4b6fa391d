use std::collections::VecDeque;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::key::Key;

use super::RequestId;

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// A snapshot of a queue, for health endpoints and dashboards. Serializes to JSON with
/// durations in milliseconds (`wait_p50_ms`, ...).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStats {
    /// Requests allowed to run at once.
    pub concurrency: usize,
    /// Requests allowed to wait at once.
    pub capacity: usize,
    /// Requests running now.
    pub running: usize,
    /// Requests waiting now.
    pub waiting: usize,
    /// Requests waiting now at each level, level 1 first.
    pub waiting_per_level: Vec<usize>,
    /// Users with a request waiting or running (with `fair_by`; otherwise 0).
    pub users: usize,
    /// Requests admitted so far.
    pub admitted: u64,
    /// Requests refused at once (queue full) so far.
    pub rejected: u64,
    /// Requests that left the queue on `queue_timeout` so far.
    pub timed_out: u64,
    /// Requests cancelled through the handle or dropped by their caller so far.
    pub cancelled: u64,
    /// Requests whose inner call succeeded so far.
    pub completed: u64,
    /// Requests whose inner call failed or panicked so far.
    pub failed: u64,
    /// Median wait before admission, over the last 1,024 admissions.
    #[serde(rename = "wait_p50_ms", serialize_with = "millis")]
    pub wait_p50: Duration,
    /// 95th percentile wait before admission, over the last 1,024 admissions.
    #[serde(rename = "wait_p95_ms", serialize_with = "millis")]
    pub wait_p95: Duration,
    /// 99th percentile wait before admission, over the last 1,024 admissions.
    #[serde(rename = "wait_p99_ms", serialize_with = "millis")]
    pub wait_p99: Duration,
}

/// Whether an entry waits or runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// Waiting for its turn.
    Queued,
    /// Admitted: running, or streaming its response while it holds the slot.
    Running,
}

/// One request in a queue, as [`PriorityQueueHandle::entries`](super::PriorityQueueHandle::entries)
/// lists it.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueEntry {
    /// The request's id.
    pub id: RequestId,
    /// The user it belongs to, with `fair_by`.
    pub user: Option<Key>,
    /// Its priority level, 1 the highest.
    pub level: u8,
    /// Waiting or running.
    pub state: EntryState,
    /// How long it has waited (queued) or waited before admission (running).
    #[serde(rename = "waited_ms", serialize_with = "millis")]
    pub waited: Duration,
    /// Its place in the queue while it waits: 0 is admitted next. Every tenth admission going to
    /// the longest-waiting request may overtake this order.
    pub position: Option<usize>,
}

const RECENT: usize = 1024;

/// The most recent admission waits, for percentiles.
///
/// Requests admitted at once waited zero, and are not recorded one by one: the queue only
/// counts them (see [`RecentWaits::admitted_at_once`]). A recorded wait keeps the number of
/// such zeros that came just before it, so that the window is still the last 1,024 admissions
/// in the order they happened.
#[derive(Debug, Default)]
pub(crate) struct RecentWaits {
    /// Recorded waits, oldest first, each with the number of zero waits just before it.
    samples: VecDeque<(Duration, u64)>,
    /// Zero waits since the last recorded wait.
    zeros: u64,
    /// The queue's count of requests admitted at once, as last seen.
    at_once_seen: u64,
}

impl RecentWaits {
    pub(crate) fn record(&mut self, wait: Duration) {
        if self.samples.len() == RECENT {
            self.samples.pop_front();
        }
        self.samples
            .push_back((wait, std::mem::take(&mut self.zeros)));
    }

    /// Catches up with the queue's count of requests admitted at once: a count that wraps
    /// around at `modulus` (a power of two), read from the queue's admission word.
    pub(crate) fn admitted_at_once(&mut self, count: u64, modulus: u64) {
        let new = count.wrapping_sub(self.at_once_seen) & (modulus - 1);
        self.at_once_seen = count;
        self.zeros = self.zeros.saturating_add(new);
    }

    pub(crate) fn percentiles(&self) -> (Duration, Duration, Duration) {
        let zero = |n: u64| usize::try_from(n).unwrap_or(RECENT).min(RECENT);
        let mut zeros = zero(self.zeros);
        let mut waits = Vec::new();
        for &(wait, before) in self.samples.iter().rev() {
            if zeros + waits.len() >= RECENT {
                break;
            }
            waits.push(wait);
            zeros += zero(before).min(RECENT - zeros - waits.len());
        }
        if zeros + waits.len() == 0 {
            return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        }
        waits.sort_unstable();
        let len = zeros + waits.len();
        let at = |p: usize| {
            let place = ((len - 1) * p + 50) / 100;
            place
                .checked_sub(zeros)
                .map_or(Duration::ZERO, |i| waits[i])
        };
        (at(50), at(95), at(99))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_recent_waits() {
        let mut w = RecentWaits::default();
        assert_eq!(w.percentiles().0, Duration::ZERO);
        for ms in 1..=100 {
            w.record(Duration::from_millis(ms));
        }
        let (p50, p95, p99) = w.percentiles();
        assert_eq!(p50, Duration::from_millis(51));
        assert_eq!(p95, Duration::from_millis(95));
        assert_eq!(p99, Duration::from_millis(99));
        for _ in 0..RECENT {
            w.record(Duration::from_millis(7));
        }
        let ms7 = Duration::from_millis(7);
        assert_eq!(w.percentiles(), (ms7, ms7, ms7));
    }

    #[test]
    fn requests_admitted_at_once_count_as_zero_waits_in_order() {
        let mut w = RecentWaits::default();
        for _ in 0..RECENT {
            w.record(Duration::from_millis(9));
        }
        // 600 admitted at once, then 100 that waited 1 ms: 324 waits of 9 ms remain in the
        // window of 1,024.
        w.admitted_at_once(600, 1 << 20);
        for _ in 0..100 {
            w.record(Duration::from_millis(1));
        }
        let (p50, p95, p99) = w.percentiles();
        assert_eq!(p50, Duration::ZERO);
        assert_eq!(
            (p95, p99),
            (Duration::from_millis(9), Duration::from_millis(9))
        );
        // The count wraps around.
        w.admitted_at_once(5, 1 << 20);
        w.admitted_at_once(1 << 20, 1 << 20);
        w.admitted_at_once(1_000, 1 << 20);
        assert_eq!(
            w.percentiles(),
            (Duration::ZERO, Duration::ZERO, Duration::ZERO)
        );
    }
}
