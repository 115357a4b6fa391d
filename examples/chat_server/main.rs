//! The main example: seed 003's concurrent chat server, with seed 000's queue indicator, as a
//! web page and an OpenAI-compatible gateway, over an LLM that throttles like a real one.
//!
//! ```text
//! cargo run --example chat_server      # then open http://127.0.0.1:3000
//! ```
//!
//! With no configuration it starts the mock provider in-process; `OPENAI_BASE_URL` (and
//! `OPENAI_API_KEY`) or `OLLAMA_URL` point it at a real upstream. Every setting is an
//! environment variable with a default; see `config.rs` and the README.
//!
//! Where the layers sit, and why:
//!
//! ```text
//!   browser / OpenAI client
//!     │
//!   identify user (x-user-id │ OpenAI `user` │ client address)
//!   per-user concurrency (MAX_CONCURRENT_PER_USER, held until the reply ends)   ─ edge:
//!   per-user requests per minute (REQUESTS_PER_MINUTE)                           ─ who
//!     │
//!   handler ── streams the reply, the queue position, cancellation
//!     │
//!   retry (CHAT_RETRY_ATTEMPTS, Retry-After shared by everybody)                 ─ upstream:
//!   circuit breaker                                                              ─ how much,
//!   priority queue (MAX_CONCURRENT_CHATS, chat before summaries, fair)           ─ when
//!   upstream requests per minute, tokens per minute (UPSTREAM_RPM, UPSTREAM_TPM)
//!   first token (an error before any text is retried)
//!     │
//!   HTTP client ── the LLM API (or the mock)
//! ```

mod app;
mod chat;
mod config;
mod errors;
mod metrics;
mod routes;
mod stack;
mod user;

use tower_llm_queue_servers::config::{or_exit, Env};
use tower_llm_queue_servers::serve::{finish, init_tracing, shutdown_signal};
use tower_llm_queue_servers::upstream::Upstream;

pub use self::app::{router, AppState};
pub use self::config::ChatConfig;

/// A chat server bound to its address, ready to serve.
pub type Bound = tower_llm_queue_servers::serve::Bound<AppState>;

/// Starts the upstream (the mock, unless one is configured) and binds the server's address.
pub async fn bind(config: ChatConfig) -> Result<Bound, tower::BoxError> {
    let upstream = Upstream::start(config.upstream.clone(), config.mock.clone()).await?;
    tracing::info!("upstream: {}", upstream.describe());
    tracing::info!(
        chats = config.max_concurrent_chats,
        per_user = config.max_concurrent_per_user,
        per_minute = config.requests_per_minute,
        upstream_rpm = ?config.upstream_rpm,
        upstream_tpm = ?config.upstream_tpm,
        "limits"
    );
    let (addr, grace) = (config.addr, config.shutdown_grace);
    let (app, state) = router(config, &upstream);
    let bound = Bound::bind(addr, app, state, upstream, grace).await?;
    tracing::info!("chat server on http://{}", bound.addr());
    Ok(bound)
}

#[tokio::main]
async fn main() {
    init_tracing();
    let config = or_exit(ChatConfig::from_env(&Env::process()));
    let redis = config.redis.clone();
    let served = async {
        let (served, _) = bind(config).await?.serve(shutdown_signal()).await;
        // The last requests' shared slots go back to the other instances now, not at lease end.
        if let Some(store) = redis {
            store.flush().await;
        }
        Ok(served?)
    };
    finish("chat server", served.await);
}
