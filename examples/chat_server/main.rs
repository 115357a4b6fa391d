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

use std::net::SocketAddr;

use tower_llm_queue_servers::config::{or_exit, Env};
use tower_llm_queue_servers::serve::{serve, shutdown_signal};
use tower_llm_queue_servers::upstream::Upstream;

pub use self::app::{router, AppState};
pub use self::config::ChatConfig;

/// A chat server bound to its address, ready to serve.
pub struct Bound {
    listener: tokio::net::TcpListener,
    app: axum::Router,
    state: AppState,
    upstream: Upstream,
    grace: std::time::Duration,
}

impl Bound {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Its state: the layers' handles and metrics.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves; then stops accepting, lets running replies finish, and
    /// returns once they have — or once the grace period is over, dropping those left.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Bound {
            listener,
            app,
            grace,
            upstream,
            ..
        } = self;
        let result = serve(listener, app, shutdown, grace).await;
        drop(upstream);
        result
    }
}

/// Starts the upstream (the mock, unless one is configured) and binds the server's address.
pub async fn bind(config: ChatConfig) -> Result<Bound, tower::BoxError> {
    let upstream = Upstream::start(config.upstream.clone(), config.mock.clone()).await?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", config.addr))?;
    let grace = config.shutdown_grace;
    let addr = listener.local_addr()?;
    tracing::info!("chat server on http://{addr}");
    tracing::info!("upstream: {}", upstream.describe());
    tracing::info!(
        chats = config.max_concurrent_chats,
        per_user = config.max_concurrent_per_user,
        per_minute = config.requests_per_minute,
        upstream_rpm = ?config.upstream_rpm,
        upstream_tpm = ?config.upstream_tpm,
        "limits"
    );
    let (app, state) = router(config, &upstream);
    Ok(Bound {
        listener,
        app,
        state,
        upstream,
        grace,
    })
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_llm_queue=info".into()),
        )
        .init();
    let config = or_exit(ChatConfig::from_env(&Env::process()));
    let served = match bind(config).await {
        Ok(bound) => bound.serve(shutdown_signal()).await.map_err(Into::into),
        Err(err) => Err(err),
    };
    match served {
        Ok(()) => tracing::info!("all replies finished; bye"),
        Err(err) => {
            eprintln!("chat server: {err}");
            std::process::exit(1);
        }
    }
}
