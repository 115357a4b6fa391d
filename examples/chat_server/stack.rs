//! The layers around the upstream client, from the server's settings: the stack of
//! `tower_llm_queue_servers::upstream::stack`, which the load harness measures too.
//!
//! ```text
//! retry ─ breaker ─ queue ─ requests/min ─ tokens/min ─ first token ─ client
//! ```

use std::sync::Arc;

use tower_llm_queue_servers::upstream::stack::{layered, StackConfig};
use tower_llm_queue_servers::upstream::{Level, Llm, UpstreamClient};

pub use tower_llm_queue_servers::upstream::stack::{Estimate, Handles};

use super::config::ChatConfig;
use super::metrics::Metrics;

/// The level of what someone waits for: a chat message, a gateway call.
pub const INTERACTIVE: Level = Level(1);

/// The level of background work: summaries, and gateway calls that ask for it.
pub const BACKGROUND: Level = Level(3);

/// The stack's settings from the server's: `MAX_CONCURRENT_CHATS` calls at once,
/// `QUEUE_CAPACITY` waiting, `CHAT_TIMEOUT` for the queue and the quota, `UPSTREAM_RPM` and
/// `UPSTREAM_TPM` per `UPSTREAM_WINDOW_MS` (paced with `UPSTREAM_PACE`), `CHAT_RETRY_ATTEMPTS`,
/// `BREAKER_OPEN_MS`; a wait
/// longer than 10 s is not worth holding a chat open for: the user gets the refusal with its
/// `Retry-After` instead.
pub fn settings(config: &ChatConfig) -> StackConfig {
    StackConfig {
        concurrency: config.max_concurrent_chats as usize,
        queue_capacity: config.queue_capacity as usize,
        timeout: config.chat_timeout,
        rpm: config.upstream_rpm,
        tpm: config.upstream_tpm,
        window: config.upstream_window,
        pace: config.upstream_pace,
        retry_attempts: config.retry_attempts,
        breaker_open_for: config.breaker_open_for,
        redis: config.redis.clone(),
        ..StackConfig::default()
    }
}

/// Builds the upstream stack around `client`.
pub fn upstream(
    config: &ChatConfig,
    client: UpstreamClient,
    metrics: Arc<Metrics>,
) -> (Llm, Handles) {
    layered(&settings(config), client, move |status| {
        metrics.upstream_answered(status)
    })
}
