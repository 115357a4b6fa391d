//! The sliding window of admissions (60 seconds unless configured) and the rate-limit headers it
//! yields.

use std::collections::VecDeque;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

/// The default length of the window of the per-minute limits.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// The admissions of the last window, oldest first, each with the tokens it was charged. An
/// admission at `t` counts for the windows that end before `t + length`.
#[derive(Debug)]
pub(crate) struct WindowLog {
    entries: VecDeque<(Instant, u64)>,
    tokens: u64,
    length: Duration,
}

impl WindowLog {
    /// An empty log of a window of `length` (at least a millisecond).
    pub(crate) fn new(length: Duration) -> Self {
        WindowLog {
            entries: VecDeque::new(),
            tokens: 0,
            length: length.max(Duration::from_millis(1)),
        }
    }

    /// Changes the window's length for the decisions from now on.
    pub(crate) fn set_length(&mut self, length: Duration) {
        self.length = length.max(Duration::from_millis(1));
    }

    /// Forgets the admissions that left the window ending at `now`.
    pub(crate) fn prune(&mut self, now: Instant) {
        while let Some(&(at, tokens)) = self.entries.front() {
            if now.saturating_duration_since(at) < self.length {
                break;
            }
            self.entries.pop_front();
            self.tokens = self.tokens.saturating_sub(tokens);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.tokens = 0;
    }

    pub(crate) fn push(&mut self, now: Instant, tokens: u64) {
        self.entries.push_back((now, tokens));
        self.tokens = self.tokens.saturating_add(tokens);
    }

    /// Admissions in the window.
    pub(crate) fn requests(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Tokens charged in the window.
    pub(crate) fn tokens(&self) -> u64 {
        self.tokens
    }

    /// How long until fewer than `limit` admissions are in the window.
    pub(crate) fn wait_for_requests(&self, limit: u64, now: Instant) -> Duration {
        let len = self.entries.len() as u64;
        if len < limit {
            return Duration::ZERO;
        }
        let index = usize::try_from(len - limit).unwrap_or(usize::MAX);
        self.entries
            .get(index)
            .map_or(Duration::ZERO, |&(at, _)| self.leaves(at, now))
    }

    /// How long until `cost` more tokens fit under `limit`; `None` if they never will.
    pub(crate) fn wait_for_tokens(&self, limit: u64, cost: u64, now: Instant) -> Option<Duration> {
        if cost > limit {
            return None;
        }
        let mut left = self.tokens;
        if left.saturating_add(cost) <= limit {
            return Some(Duration::ZERO);
        }
        for &(at, tokens) in &self.entries {
            left = left.saturating_sub(tokens);
            if left.saturating_add(cost) <= limit {
                return Some(self.leaves(at, now));
            }
        }
        Some(Duration::ZERO)
    }

    /// How long until the oldest admission leaves the window (zero when it is empty).
    pub(crate) fn next_release(&self, now: Instant) -> Duration {
        self.entries
            .front()
            .map_or(Duration::ZERO, |&(at, _)| self.leaves(at, now))
    }

    /// How long until an admission at `at` leaves the window, seen at `now`.
    fn leaves(&self, at: Instant, now: Instant) -> Duration {
        self.length
            .saturating_sub(now.saturating_duration_since(at))
    }
}

/// The state of one per-minute limit, as the `x-ratelimit-*` headers tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LimitState {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

/// The `x-ratelimit-*` headers of a response: one set per limit that is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RateHeaders {
    pub(crate) requests: Option<LimitState>,
    pub(crate) tokens: Option<LimitState>,
}

impl RateHeaders {
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for (kind, state) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(state) = state else { continue };
            let mut put = |what: &str, value: String| {
                let name = HeaderName::try_from(format!("x-ratelimit-{what}-{kind}"));
                if let (Ok(name), Ok(value)) = (name, HeaderValue::try_from(value)) {
                    headers.insert(name, value);
                }
            };
            put("limit", state.limit.to_string());
            put("remaining", state.remaining.to_string());
            put("reset", go_duration(state.reset));
        }
    }
}

/// Puts `Retry-After` (whole seconds, rounded up) and `retry-after-ms` (rounded up) in
/// `headers`.
pub(crate) fn apply_retry_after(headers: &mut HeaderMap, wait: Duration) {
    let ms = ceil_millis(wait);
    let secs = ms.div_ceil(1000);
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    headers.insert("retry-after-ms", HeaderValue::from(ms));
}

/// Whole milliseconds in `d`, rounded up.
pub(crate) fn ceil_millis(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// `d` rounded up to the millisecond and written as Go's `time.Duration` writes it, the form
/// OpenAI uses in `x-ratelimit-reset-*`: `120ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = ceil_millis(d);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = ms / 60_000 % 60;
    let seconds = ms / 1000 % 60;
    let millis = ms % 1000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&seconds.to_string());
    if millis > 0 {
        let fraction = format!("{millis:03}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('s');
    out
}
