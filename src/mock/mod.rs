//! A mock LLM provider: an HTTP server that speaks the OpenAI and Ollama chat APIs, streams a
//! deterministic reply at a set speed, enforces per-minute and concurrency limits the way hosted
//! APIs do, injects faults from a seeded generator, and counts everything it sees.
//!
//! It is the ground truth of the tests, benchmarks and examples: the limits it enforces are its
//! own (a log of admissions over a sliding window of 60 seconds, or of
//! [`MockConfig::window`]), independent of the library's layers.
//!
//! # Running it
//!
//! On a socket, with any free port:
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use tower_llm_queue_servers::mock::{MockConfig, MockProvider};
//!
//! let mock = MockProvider::start(MockConfig::default(), "127.0.0.1:0".parse().unwrap()).await?;
//! let base_url = format!("{}/v1", mock.url()); // for an OpenAI client
//! // ... send requests ...
//! assert_eq!(mock.handle().stats().throttled, 0);
//! mock.stop().await;
//! # Ok(()) }
//! ```
//!
//! In process, as an axum `Router` (a `tower::Service`), where tests can pause time:
//! [`MockProvider::router`]. Standalone: `cargo run --example mock_provider` (settings from the
//! environment, see [`ENV_VARS`]).
//!
//! # Endpoints
//!
//! - `POST /v1/chat/completions`: OpenAI's chat completions. The prompt is the content of the
//!   last `user` message (of the last message if none is a user's). `max_completion_tokens`, or
//!   else `max_tokens`, truncates the reply (`finish_reason: "length"`). With `"stream": true`
//!   the reply is server-sent events: one `chat.completion.chunk` per token (the first with
//!   `role`), a chunk with `finish_reason`, with `stream_options.include_usage` a chunk with
//!   `usage` and no choices, then `data: [DONE]`. A malformed request gets 400 with an
//!   OpenAI-style error.
//! - `POST /api/chat`: Ollama's chat, streamed by default as NDJSON (one line per token, then a
//!   `done: true` line with `prompt_eval_count` and `eval_count`); `options.num_predict` above
//!   0 truncates the reply. Errors are Ollama's `{"error": "..."}`.
//! - `GET /v1/models` and `GET /api/tags`: one model, [`MODEL`] (any model name is accepted in
//!   requests and echoed back).
//! - `GET /stats`: [`MockStats`] as JSON (`?arrivals=false` leaves out the log of arrivals);
//!   `POST /stats/reset`: [`MockHandle::reset`].
//!
//! # Replies and tokens
//!
//! The reply is [`reply_for`] the prompt, split into the tokens of [`split_tokens`]; prompt
//! tokens are [`count_tokens`] of the content of every message, with no overhead per message
//! (roles and framing cost nothing). The first token is due `time_to_first_token` after the
//! arrival (plus the latency fault), token `i` at `i / tokens_per_second` after it; a
//! non-streamed reply is sent when its last token is due.
//!
//! # Limits
//!
//! Checked at arrival, where the reply is already known: a request is charged its prompt and
//! completion tokens at once. A request is refused with 429 when `concurrency` requests are in
//! progress (a stream until it ends or its client goes away), when `rpm` requests were admitted
//! in the last 60 seconds, or when its tokens would take the last 60 seconds' tokens above
//! `tpm` — or over the last [`MockConfig::window`], when it is set to something else (a load
//! test whose clock runs ten times faster makes it 6 seconds). The 429 carries `Retry-After`
//! (whole seconds, rounded up) and `retry-after-ms`: the exact time after which the same request
//! would be admitted if nothing else arrived (of several limits hit, the longest; for the
//! concurrency limit, a guess: a sixtieth of the window, 1 s by default). A request with
//! more tokens than `tpm` is never admitted; its 429 has no `Retry-After`.
//!
//! Every answer to a well-formed request carries `x-ratelimit-limit-requests`,
//! `x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests` when `rpm` is set, and the
//! same for `-tokens` when `tpm` is set. The reset is written like Go's durations (`120ms`,
//! `1.5s`, `6m0s`): the time until the oldest admission leaves the window (when `remaining`
//! grows again); on a 429 for that limit, the time until the request would be admitted.
//! Refusal bodies are OpenAI's (`type` `"requests"` or `"tokens"`, `code`
//! `"rate_limit_exceeded"`) or Ollama's.
//!
//! # Faults
//!
//! See [`Faults`]. They apply to admitted requests only, so a throttled request is never also
//! faulted, and they come from `fastrand::Rng::with_seed(seed)`: a test that sends the same
//! requests to a mock with the same seed sees the same faults. [`MockHandle::reset`] and
//! [`MockHandle::set_config`] reseed the generator.
//!
//! # Time
//!
//! All waiting is on `tokio::time`, and arrivals are timed with `tokio::time::Instant`, so that
//! tests through [`MockProvider::router`] can run with paused time.

mod chat;
mod config;
mod limits;
mod ollama;
mod openai;
mod server;
mod state;
mod stats;
mod stream;
mod text;

use std::net::SocketAddr;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;

pub use config::{
    addr_from_env, addr_from_lookup, addr_in, ConfigError, EnvVar, Faults, MockConfig, ENV_VARS,
};
pub use server::RunningMock;
pub use state::MockHandle;
pub use stats::{Arrival, MockStats};
pub use text::{classify_for, count_tokens, reply_for, split_tokens};

/// The model the mock lists.
pub const MODEL: &str = "mock-llm";

/// How many arrivals [`MockStats::arrivals`] keeps: the last ones.
pub const MAX_ARRIVALS: usize = 100_000;

/// The mock LLM provider.
#[derive(Debug, Clone, Copy, Default)]
pub struct MockProvider;

impl MockProvider {
    /// Starts a mock on `addr` (port 0 picks a free port) in the current tokio runtime.
    pub async fn start(config: MockConfig, addr: SocketAddr) -> std::io::Result<RunningMock> {
        let (router, handle) = MockProvider::router(config);
        server::spawn(addr, router, handle).await
    }

    /// The mock as an axum `Router`, with the handle on its state, to serve in process (for
    /// instance through `tower::ServiceExt::oneshot` with paused time) or on a server of one's
    /// own.
    pub fn router(config: MockConfig) -> (Router, MockHandle) {
        let handle = MockHandle::new(config);
        let router = Router::new()
            .route("/v1/chat/completions", post(openai::chat_completions))
            .route("/v1/models", get(openai::models))
            .route("/api/chat", post(ollama::chat))
            .route("/api/tags", get(ollama::tags))
            .route("/stats", get(stats))
            .route("/stats/reset", post(reset))
            .with_state(handle.clone());
        (router, handle)
    }
}

#[derive(serde::Deserialize)]
struct StatsQuery {
    arrivals: Option<bool>,
}

async fn stats(State(handle): State<MockHandle>, Query(query): Query<StatsQuery>) -> Response {
    Json(handle.snapshot(query.arrivals.unwrap_or(true))).into_response()
}

async fn reset(State(handle): State<MockHandle>) -> StatusCode {
    handle.reset();
    StatusCode::NO_CONTENT
}
