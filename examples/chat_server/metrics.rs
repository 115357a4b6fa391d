//! What the status endpoint reports beyond the layers' own stats: times, outcomes, what the
//! upstream answered.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// The last 1,024 durations of one kind.
#[derive(Debug, Default)]
struct Recent(Mutex<VecDeque<Duration>>);

impl Recent {
    fn record(&self, d: Duration) {
        let mut recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == 1024 {
            recent.pop_front();
        }
        recent.push_back(d);
    }

    /// Average and 95th percentile, in milliseconds.
    fn summary(&self) -> (f64, f64) {
        let mut all: Vec<Duration> = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        if all.is_empty() {
            return (0.0, 0.0);
        }
        all.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let average = all.iter().map(|d| ms(*d)).sum::<f64>() / all.len() as f64;
        (average, ms(all[(all.len() - 1) * 95 / 100]))
    }
}

/// Counters and recent times of the chat server.
#[derive(Debug, Default)]
pub struct Metrics {
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    rejected: AtomicU64,
    upstream_calls: AtomicU64,
    upstream_429: AtomicU64,
    upstream_5xx: AtomicU64,
    peak_running: AtomicUsize,
    waits: Recent,
    processing: Recent,
}

/// How a chat ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The whole reply was sent.
    Completed,
    /// The upstream failed, or the time ran out.
    Failed,
    /// The user cancelled it, or went away.
    Cancelled,
    /// A layer refused it (a limit, a full queue, an open breaker).
    Rejected,
}

/// The metrics, as the status endpoint shows them.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsSnapshot {
    /// Replies sent whole.
    pub completed: u64,
    /// Replies that failed.
    pub failed: u64,
    /// Replies cancelled by their user or dropped by their client.
    pub cancelled: u64,
    /// Requests refused by a limit.
    pub rejected: u64,
    /// Calls the upstream answered.
    pub upstream_calls: u64,
    /// 429s the upstream sent.
    pub upstream_429s: u64,
    /// 5xx the upstream sent.
    pub upstream_5xx: u64,
    /// The most upstream calls seen running at once.
    pub peak_running: usize,
    /// Average wait before the upstream call started, in milliseconds.
    pub average_wait_ms: f64,
    /// 95th percentile of that wait.
    pub p95_wait_ms: f64,
    /// Average time from admission to the end of the reply, in milliseconds.
    pub average_processing_ms: f64,
    /// 95th percentile of that time.
    pub p95_processing_ms: f64,
}

impl Metrics {
    /// The upstream answered with `status`.
    pub fn upstream_answered(&self, status: http::StatusCode) {
        self.upstream_calls.fetch_add(1, Relaxed);
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            self.upstream_429.fetch_add(1, Relaxed);
        } else if status.is_server_error() {
            self.upstream_5xx.fetch_add(1, Relaxed);
        }
    }

    /// A request started after waiting `waited`, with `running` calls running.
    pub fn started(&self, waited: Duration, running: usize) {
        self.waits.record(waited);
        self.peak_running.fetch_max(running, Relaxed);
    }

    /// A request ended; `processing` is the time since it started, if it did.
    pub fn ended(&self, ending: Ending, processing: Option<Duration>) {
        let counter = match ending {
            Ending::Completed => &self.completed,
            Ending::Failed => &self.failed,
            Ending::Cancelled => &self.cancelled,
            Ending::Rejected => &self.rejected,
        };
        counter.fetch_add(1, Relaxed);
        if let Some(d) = processing {
            self.processing.record(d);
        }
    }

    /// A snapshot for the status endpoint.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let (average_wait_ms, p95_wait_ms) = self.waits.summary();
        let (average_processing_ms, p95_processing_ms) = self.processing.summary();
        MetricsSnapshot {
            completed: self.completed.load(Relaxed),
            failed: self.failed.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            upstream_calls: self.upstream_calls.load(Relaxed),
            upstream_429s: self.upstream_429.load(Relaxed),
            upstream_5xx: self.upstream_5xx.load(Relaxed),
            peak_running: self.peak_running.load(Relaxed),
            average_wait_ms,
            p95_wait_ms,
            average_processing_ms,
            p95_processing_ms,
        }
    }
}
