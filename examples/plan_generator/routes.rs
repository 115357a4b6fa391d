//! The handlers: generate a plan, list and read one's plans, health and status.

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use tower::{BoxError, ServiceExt};
use tower_llm_queue_servers::errors::ApiError;
use tower_llm_queue_servers::user::UserId;

use super::app::AppState;
use super::config::Backend;
use super::db::{NewPlan, Source, StoredPlan};
use super::generate::{find, PlanJob, Unavailable};
use super::offline::offline_plan;
use super::request::PlanRequest;

/// The header that says who wrote the plan: `llm` or `offline`.
pub const SOURCE_HEADER: &str = "x-plan-source";

fn plan_response(plan: &StoredPlan) -> Response {
    let mut response = Json(plan.to_json()).into_response();
    response.headers_mut().insert(
        SOURCE_HEADER,
        HeaderValue::from_static(plan.source.as_str()),
    );
    response
}

fn internal(err: &BoxError, doing: &str) -> Response {
    tracing::error!(error = %err, "{doing} failed");
    ApiError::internal().into_response()
}

/// `POST /api/plans`: a plan for the request in the body, from the cache, the upstream, or —
/// the upstream unavailable — the offline templates.
pub async fn create(
    State(app): State<AppState>,
    Extension(user): Extension<UserId>,
    request: Request,
) -> Response {
    let limit = app.config.max_body_bytes as usize;
    let Ok(body) = axum::body::to_bytes(request.into_body(), limit).await else {
        return ApiError::too_large(limit).into_response();
    };
    let request = match PlanRequest::parse(&body) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let job = PlanJob {
        user,
        fingerprint: request.fingerprint().into(),
        request: request.into(),
    };
    let generated = app.planner.clone().oneshot(job.clone()).await;
    let err = match generated {
        Ok(plan) => {
            app.served.count(false);
            return plan_response(&plan);
        }
        Err(err) => err,
    };
    if let Some(unavailable) = find::<Unavailable>(&*err) {
        tracing::warn!(user = job.user.as_str(), reason = %unavailable.0, "serving an offline plan");
        let plan = offline_plan(&job.request);
        let new = NewPlan {
            user: job.user.as_str(),
            fingerprint: &job.fingerprint,
            request: &job.request,
            plan: &plan,
        };
        return match app.plans.store_offline(new).await {
            Ok(stored) => {
                app.served.count(stored.source == Source::Offline);
                plan_response(&stored)
            }
            Err(err) => internal(&err, "storing an offline plan"),
        };
    }
    if let Some(refused) = find::<ApiError>(&*err) {
        return refused.clone().into_response();
    }
    internal(&err, "generating a plan")
}

/// `GET /api/plans`: this user's plans, the most recently written first (at most
/// [`LIST_LIMIT`](super::db::LIST_LIMIT)).
pub async fn list(State(app): State<AppState>, Extension(user): Extension<UserId>) -> Response {
    match app.plans.list(user.as_str()).await {
        Ok(plans) => {
            let plans: Vec<Value> = plans.iter().map(StoredPlan::to_json).collect();
            Json(json!({ "plans": plans })).into_response()
        }
        Err(err) => internal(&err, "listing plans"),
    }
}

/// `GET /api/plans/{id}`: one of this user's plans; anybody else's, or an unknown id, is 404.
pub async fn one(
    State(app): State<AppState>,
    Extension(user): Extension<UserId>,
    Path(id): Path<String>,
) -> Response {
    let not_found = || ApiError::not_found(format!("no plan {id} of yours")).into_response();
    let Ok(number) = id.parse::<i64>() else {
        return not_found();
    };
    match app.plans.get(user.as_str(), number).await {
        Ok(Some(plan)) => plan_response(&plan),
        Ok(None) => not_found(),
        Err(err) => internal(&err, "reading a plan"),
    }
}

/// `GET /health`: 200 while the database answers, 503 otherwise.
pub async fn health(State(app): State<AppState>) -> Response {
    match app.plans.ping().await {
        Ok(()) => Json(json!({"status": "ok"})).into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "health: the database does not answer");
            let body = json!({"status": "unavailable", "database": "not answering"});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// `GET /status`: every layer's stats, and plans served by source.
pub async fn status(State(app): State<AppState>) -> Json<Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let handles = &app.handles;
    let breaker = &handles.upstream.breaker;
    Json(json!({
        "upstream": &*app.upstream,
        "database": match app.plans.backend() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        },
        "plans_served": {
            "llm": app.served.llm.load(Relaxed),
            "offline": app.served.offline.load(Relaxed),
        },
        "dedup": handles.dedup.stats(),
        "per_user": handles.per_user.stats(),
        "rate_limit": handles.per_ip.stats(),
        "breaker": {"state": breaker.state(), "stats": breaker.stats()},
        "retries": handles.upstream.retry.stats(),
    }))
}
