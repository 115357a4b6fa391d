//! The plan generator's state, routes and the layers at its edge.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use http::StatusCode;
use tower::util::Either;
use tower::{BoxError, ServiceBuilder};
use tower_llm_queue::dedup::DedupHandle;
use tower_llm_queue::http::{json_error, ErrorFormat};
use tower_llm_queue::key::{ClientIp, ExtensionKey};
use tower_llm_queue::rate::RateHandle;
use tower_llm_queue::{
    PerUserConcurrencyLayer, PerUserHandle, Rejected, RejectionKind, SlidingWindowLayer,
};
use tower_llm_queue_servers::upstream::Upstream;
use tower_llm_queue_servers::user::{by_header_or_address, UserId};

use super::config::PlanConfig;
use super::db::Plans;
use super::generate::{planner, JobKey, Planner};
use super::routes;
use super::stack::{self, UpstreamHandles};

/// Seed 001's answer to a user with too many plans in progress.
pub const TOO_MANY_MESSAGE: &str =
    "Too many concurrent requests. Please wait for your current plan generation to complete.";

/// Plans served, by who wrote them.
#[derive(Debug, Default)]
pub struct Served {
    /// Plans from the upstream (or the cache).
    pub llm: AtomicU64,
    /// Offline plans.
    pub offline: AtomicU64,
}

impl Served {
    /// Counts one plan served.
    pub fn count(&self, offline: bool) {
        match offline {
            true => self.offline.fetch_add(1, Relaxed),
            false => self.llm.fetch_add(1, Relaxed),
        };
    }
}

/// Reads the layers.
#[derive(Debug, Clone)]
pub struct Handles {
    /// The dedup layer and its cache.
    pub dedup: DedupHandle<JobKey>,
    /// The per-user limit.
    pub per_user: PerUserHandle,
    /// The per-address rate limit.
    pub per_ip: RateHandle,
    /// The retries and the breaker in front of the upstream.
    pub upstream: UpstreamHandles,
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The settings.
    pub config: Arc<PlanConfig>,
    /// Generates plans, behind the dedup layer.
    pub planner: Planner,
    /// The plans' table.
    pub plans: Plans,
    /// The layers' handles.
    pub handles: Handles,
    /// Plans served.
    pub served: Arc<Served>,
    /// What the server runs against, for the status endpoint.
    pub upstream: Arc<str>,
}

/// The refusals of the edge layers, as the library answers them, with seed 001's own words for
/// a user over the limit.
async fn refused(err: BoxError) -> Response {
    match Rejected::find(&*err) {
        Some(rejected) if rejected.kind() == RejectionKind::UserLimit => json_error(
            ErrorFormat::Plain,
            StatusCode::TOO_MANY_REQUESTS,
            RejectionKind::UserLimit.as_str(),
            TOO_MANY_MESSAGE,
            rejected.retry_after(),
        ),
        _ => tower_llm_queue::http::handle_error(err).await,
    }
}

/// The server: its routes over `upstream` and `plans`, with the layers `config` asks for.
pub fn router(config: PlanConfig, upstream: &Upstream, plans: Plans) -> (Router, AppState) {
    let (llm, upstream_handles) = stack::upstream(&config, upstream.client());
    let model: Arc<str> = upstream.config().model.clone().into();
    let (planner, dedup) = planner(
        llm,
        plans.clone(),
        model,
        config.max_tokens,
        config.cache_ttl,
        config.redis.as_ref(),
    );

    // At the edge, around the handler that generates: requests per client address, then plans
    // in flight per user. Refused here, a request costs nothing further.
    let mut per_ip = SlidingWindowLayer::new(config.rate_limit_per_minute, Duration::from_secs(60))
        .keyed_by(ClientIp::new());
    let per_user = PerUserConcurrencyLayer::new(
        config.max_concurrent_per_user as usize,
        ExtensionKey::<UserId>::new().or_reject(),
    );
    let per_user_handle = per_user.handle();
    // With Redis, both hold for every instance together.
    let per_user = match &config.redis {
        Some(store) => {
            per_ip = per_ip.store(store.scope("per-address"));
            Either::Left(per_user.store(store.scope("per-user")))
        }
        None => Either::Right(per_user),
    };
    let state = AppState {
        handles: Handles {
            dedup,
            per_user: per_user_handle,
            per_ip: per_ip.handle(),
            upstream: upstream_handles,
        },
        config: Arc::new(config),
        planner,
        plans,
        served: Arc::default(),
        upstream: upstream.describe().into(),
    };
    let limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refused))
        .layer(per_ip)
        .layer(per_user);

    let router = Router::new()
        .route(
            "/api/plans",
            get(routes::list).merge(post(routes::create).layer(limits)),
        )
        .route("/api/plans/{id}", get(routes::one))
        .route("/health", get(routes::health))
        .route("/status", get(routes::status))
        .layer(axum::middleware::from_fn(by_header_or_address))
        .with_state(state.clone());
    (router, state)
}
