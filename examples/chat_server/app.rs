//! The chat server's state and routes.

use std::ops::Deref;
use std::sync::Arc;

use axum::error_handling::HandleErrorLayer;
use axum::routing::{delete, get, post};
use axum::Router;
use tower::util::Either;
use tower::ServiceBuilder;
use tower_llm_queue::key::ExtensionKey;
use tower_llm_queue::lease::LeaseHandle;
use tower_llm_queue::{PerUserConcurrencyLayer, PerUserHandle, SlidingWindowLayer};
use tower_llm_queue_servers::upstream::Upstream;

use super::config::ChatConfig;
use super::metrics::Metrics;
use super::routes;
use super::stack::{self, Handles};
use super::user::{IdentifyLayer, UserId};
use tower_llm_queue_servers::upstream::Llm;

/// What every handler shares, behind one reference count: axum clones the state for every
/// route it calls and every extractor that reads it, so a clone costs one atomic increment.
/// Its fields are read through [`Deref`] ([`App`]).
#[derive(Debug, Clone)]
pub struct AppState(Arc<App>);

/// The fields of an [`AppState`].
#[derive(Debug)]
pub struct App {
    /// The settings.
    pub config: Arc<ChatConfig>,
    /// The upstream behind its layers.
    pub llm: Llm,
    /// The upstream layers' handles.
    pub handles: Handles,
    /// The per-user limit's handle.
    pub users: PerUserHandle,
    /// Its slots shared with the other instances, with Redis.
    pub user_leases: Option<LeaseHandle>,
    /// Times and outcomes.
    pub metrics: Arc<Metrics>,
    /// What the server runs against, for the status endpoint.
    pub upstream: Arc<str>,
    /// The model asked for.
    pub model: Arc<str>,
}

impl Deref for AppState {
    type Target = App;

    fn deref(&self) -> &App {
        &self.0
    }
}

/// The server: its routes over `upstream`, with the layers `config` asks for.
pub fn router(config: ChatConfig, upstream: &Upstream) -> (Router, AppState) {
    let metrics = Arc::new(Metrics::default());
    let (llm, handles) = stack::upstream(&config, upstream.client(), metrics.clone());

    // At the edge, around the handlers: one user's requests in flight (held until the reply
    // has streamed to its end), and per minute. One layer for all routes: one limit.
    let user = ExtensionKey::<UserId>::new().or_reject();
    let per_user =
        PerUserConcurrencyLayer::new(config.max_concurrent_per_user as usize, user.clone())
            .hold_until_body_end();
    let mut per_minute =
        SlidingWindowLayer::new(config.requests_per_minute, config.rate_window).keyed_by(user);
    let users = per_user.handle();
    // With Redis, both hold for every instance together.
    let (per_user, user_leases) = match &config.redis {
        Some(store) => {
            per_minute = per_minute.store(store.scope("per-minute"));
            let per_user = per_user.store(store.scope("per-user"));
            let leases = per_user.lease_handle();
            (Either::Left(per_user), Some(leases))
        }
        None => (Either::Right(per_user), None),
    };
    let state = AppState(Arc::new(App {
        users,
        user_leases,
        config: Arc::new(config),
        llm,
        handles,
        metrics,
        upstream: upstream.describe().into(),
        model: upstream.config().model.clone().into(),
    }));
    let api_limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(tower_llm_queue::http::handle_error))
        .layer(per_user.clone())
        .layer(per_minute.clone());
    let gateway_limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(
            tower_llm_queue::http::handle_error_openai,
        ))
        .layer(per_user)
        .layer(per_minute);

    let router = Router::new()
        .route("/", get(routes::page))
        .route("/api/ai/chat", post(routes::chat).layer(api_limits.clone()))
        .route(
            "/api/ai/summarize",
            post(routes::summarize).layer(api_limits),
        )
        .route(
            "/v1/chat/completions",
            post(routes::completions).layer(gateway_limits),
        )
        .route("/v1/models", get(routes::models))
        .route("/api/ai/status", get(routes::status))
        .route(
            "/api/ai/requests",
            get(routes::list_requests).delete(routes::cancel_all),
        )
        .route("/api/ai/requests/{id}", delete(routes::cancel_one))
        .route("/health", get(|| async { "ok" }))
        .layer(IdentifyLayer(state.clone()))
        .with_state(state.clone());
    (router, state)
}
