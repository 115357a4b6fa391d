//! What the mock saw: counters, peaks and the log of arrivals.

use std::collections::BTreeMap;

/// A snapshot of what one mock has seen since it started or was last reset.
///
/// Every request received ends up in exactly one of `served`, `throttled`, `faulted`,
/// `invalid` and `streams_cancelled`, or is still `in_flight`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MockStats {
    /// Requests received on the two chat endpoints, whatever became of them.
    pub received: u64,
    /// Requests answered completely and successfully (a stream up to its end).
    pub served: u64,
    /// Requests refused with 429 by a limit.
    pub throttled: u64,
    /// Requests that met an injected failure: 500, 503, 529, a cut stream or an error event.
    /// Added latency alone is not a failure (it shows in [`Arrival::delayed`]).
    pub faulted: u64,
    /// Malformed requests, answered 400.
    pub invalid: u64,
    /// Admitted requests in progress now: waiting for their first token or streaming. Not
    /// cleared by a reset, since they still run.
    pub in_flight: usize,
    /// The most requests in progress at once.
    pub peak_concurrency: usize,
    /// The most requests admitted in any window of 60 seconds (of the configured window, when
    /// it is not 60 seconds).
    pub peak_requests_per_60s: u64,
    /// The most tokens (prompt and completion) admitted in any window of 60 seconds (of the
    /// configured window, when it is not 60 seconds).
    pub peak_tokens_per_60s: u64,
    /// Admitted requests whose client went away before the end of the reply (for a
    /// non-streamed request, before its reply was ready).
    pub streams_cancelled: u64,
    /// Admitted requests per user: the OpenAI `user` field, else the `x-user-id` header, else
    /// `"anonymous"`.
    pub per_user: BTreeMap<String, u64>,
    /// Every request received, in order of arrival; only the last
    /// [`MAX_ARRIVALS`](super::MAX_ARRIVALS) are kept.
    pub arrivals: Vec<Arrival>,
}

/// One request as the mock received it, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Arrival {
    /// Its number among the requests received since the start or the last reset, from 1.
    pub seq: u64,
    /// When it arrived, in milliseconds since the start or the last reset, on
    /// `tokio::time::Instant` (so paused time in tests gives exact values).
    pub at_ms: u64,
    /// Its user: the OpenAI `user` field, else the `x-user-id` header, else `"anonymous"`
    /// (for a malformed request, the header or `"anonymous"`).
    pub user: String,
    /// The API it called: `"openai"` or `"ollama"`.
    pub api: String,
    /// Whether it asked for a stream.
    pub stream: bool,
    /// What became of it: `"served"`, `"throttled"`, `"faulted"`, `"invalid"`, `"cancelled"`
    /// (its client went away), or `"in_progress"` while it runs.
    pub outcome: String,
    /// The status it was answered with (200 for every stream, even one cut or with an error
    /// event).
    pub status: u16,
    /// For a throttled request, the limit it hit: `"requests"`, `"tokens"` or `"concurrency"`.
    pub limit: Option<String>,
    /// The injected failure, if any: `"error_500"`, `"error_503"`, `"overloaded_529"`,
    /// `"cut_stream"` or `"error_event"`.
    pub fault: Option<String>,
    /// Whether the latency fault delayed its first token.
    pub delayed: bool,
    /// Its prompt tokens (0 for a malformed request).
    pub prompt_tokens: u64,
    /// The tokens of its full reply, as charged at arrival (0 for a malformed request).
    pub completion_tokens: u64,
}
