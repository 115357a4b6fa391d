//! Seed 001's plan generator (PlanSpark): business plans written by an LLM for many users at
//! once — identical requests merged, a per-user limit, a per-address rate limit, an offline
//! plan when the upstream is throttled or down, and every plan stored in a real database.
//!
//! ```text
//! cargo run --example plan_generator      # then POST to http://127.0.0.1:8081/api/plans
//! ```
//!
//! With no configuration it starts the mock provider in-process and stores plans in SQLite
//! (`plan_generator.db` in the OS's temporary directory); `OPENAI_BASE_URL` (and
//! `OPENAI_API_KEY`) or `OLLAMA_URL` point it at a real upstream, and a `postgres://`
//! `DATABASE_URL` at PostgreSQL. Every setting is an environment variable with a default; see
//! `config.rs` and the README.
//!
//! The user is the `x-user-id` header, else the client's address (seed 001's
//! `user?.id || clientIp`).
//!
//! Where the layers sit, in the order a request meets them, and why (seed 001's "rate check →
//! user limit check → cache check → generate"):
//!
//! ```text
//!   client
//!     │
//!   identify the user (x-user-id │ client address)
//!   requests per client address (RATE_LIMIT_PER_MINUTE)  ┐ the edge: who may ask; refused
//!   plans in flight per user (2, seed 001's 429)          ┘ here, a request costs nothing
//!     │
//!   handler: body size (413), every field checked (400), the request's fingerprint
//!     │
//!   dedup (user, fingerprint), cache PLAN_CACHE_TTL_MS     ─ merges what is already paid for
//!     │
//!   generate: ask the upstream, read the five sections, store (ON CONFLICT)
//!     │                   └─ upstream unavailable → offline plan from templates, stored
//!     │                      only where no plan is (never cached)
//!   circuit breaker (BREAKER_OPEN_MS)                      ┐ the upstream: whether and
//!   timeout (PLAN_TIMEOUT_MS)                              │ when to call it
//!   retry (PLAN_RETRY_ATTEMPTS, its Retry-After)           ┘
//!     │
//!   HTTP client ── the LLM API (or the mock)
//! ```
//!
//! * The per-address window stands outermost: it is the cheapest check, and it counts every
//!   attempt from an address, the ones the per-user limit then refuses included.
//! * The per-user limit stands outside the dedup layer, so that a user's identical requests
//!   each hold one of the user's two slots while they share one call (seed 001 counts them so).
//! * The dedup layer stands outside generation and storage: the cache holds the stored plan,
//!   id included, so that a repeat costs neither an upstream call nor a write. It caches
//!   successes only; an offline plan comes from a failure, outside it, and is never cached.
//! * The breaker outside the timeout and the retry layer — where the README's general advice
//!   puts it inside the retry layer: open, it must answer at once so that the offline plan is
//!   served at once, not after the retry layer's shared cool-down (see `stack.rs`). The timeout
//!   bounds a generation, retries included.

mod app;
mod config;
mod db;
mod generate;
mod offline;
mod plan;
mod request;
mod routes;
mod stack;

use tower_llm_queue_servers::config::{or_exit, Env};
use tower_llm_queue_servers::serve::{finish, init_tracing, shutdown_signal};
use tower_llm_queue_servers::upstream::Upstream;

pub use self::app::{router, AppState, TOO_MANY_MESSAGE};
pub use self::config::{DatabaseUrl, PlanConfig};
pub use self::db::{NewPlan, Plans, Source};
pub use self::offline::offline_plan;
pub use self::plan::Plan;
pub use self::request::PlanRequest;

/// A plan generator bound to its address, ready to serve.
pub type Bound = tower_llm_queue_servers::serve::Bound<AppState>;

/// Opens the database (creating its schema), starts the upstream (the mock, unless one is
/// configured) and binds the server's address.
pub async fn bind(config: PlanConfig) -> Result<Bound, tower::BoxError> {
    let plans = Plans::open(&config.database, config.cache_ttl).await?;
    let upstream = Upstream::start(config.upstream.clone(), config.mock.clone()).await?;
    tracing::info!("upstream: {}", upstream.describe());
    tracing::info!("database: {} at {}", plans.backend(), config.database);
    tracing::info!(
        per_user = config.max_concurrent_per_user,
        per_address_per_minute = config.rate_limit_per_minute,
        cache_ttl_ms = config.cache_ttl.as_millis() as u64,
        "limits"
    );
    let (addr, grace) = (config.addr, config.shutdown_grace);
    let (app, state) = router(config, &upstream, plans);
    let bound = Bound::bind(addr, app, state, upstream, grace).await?;
    tracing::info!("plan generator on http://{}", bound.addr());
    Ok(bound)
}

#[tokio::main]
async fn main() {
    init_tracing();
    let config = or_exit(PlanConfig::from_env(&Env::process()));
    let redis = config.redis.clone();
    let served = async {
        let (served, state) = bind(config).await?.serve(shutdown_signal()).await;
        state.plans.close().await;
        // The last requests' shared slots go back to the other instances now, not at lease end.
        if let Some(store) = redis {
            store.flush().await;
        }
        Ok(served?)
    };
    finish("plan generator", served.await);
}
