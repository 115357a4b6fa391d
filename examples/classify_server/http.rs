//! The HTTP API: `POST /v1/classify`, `POST /v1/classify/batch`, and the health endpoints.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tower_llm_queue::http::{error_response, json_error, ErrorFormat};
use tower_llm_queue::Rejected;

use super::app::App;
use super::classify::{Invalid, BATCH, CLASSIFY};

fn invalid(message: &str) -> Response {
    json_error::<Body>(
        ErrorFormat::Plain,
        StatusCode::BAD_REQUEST,
        "bad_request",
        message,
        None,
    )
}

/// The response for a failed classification: a refusal of the layers as the library answers
/// it, anything else as the upstream's failure.
pub fn failure(err: &tower::BoxError) -> Response {
    let ours = Rejected::find(&**err).is_some() || err.is::<tower::timeout::error::Elapsed>();
    match ours {
        true => error_response::<Body>(&**err),
        false => json_error::<Body>(
            ErrorFormat::Plain,
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            &err.to_string(),
            None,
        ),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes, shape: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|err| format!("the body must be {shape}: {err}"))
}

#[derive(Deserialize)]
struct One {
    text: String,
}

#[derive(Deserialize)]
struct Many {
    texts: Vec<String>,
}

async fn classify(State(app): State<App>, body: Bytes) -> Response {
    let one: One = match parse(&body, r#"JSON like {"text": "..."}"#) {
        Ok(one) => one,
        Err(message) => return invalid(&message),
    };
    if let Err(Invalid(message)) = app.classifier.check(&one.text) {
        return invalid(&message);
    }
    match app.classifier.classify(&one.text, CLASSIFY).await {
        Ok(found) => Json(found).into_response(),
        Err(err) => failure(&err),
    }
}

async fn classify_batch(State(app): State<App>, body: Bytes) -> Response {
    let many: Many = match parse(&body, r#"JSON like {"texts": ["...", "..."]}"#) {
        Ok(many) => many,
        Err(message) => return invalid(&message),
    };
    if let Err(Invalid(message)) = app.check_batch(&many.texts) {
        return invalid(&message);
    }
    let items = many
        .texts
        .iter()
        .map(|text| app.classifier.classify(text, BATCH));
    let mut results = Vec::with_capacity(many.texts.len());
    for result in futures_util::future::join_all(items).await {
        match result {
            Ok(found) => results.push(found),
            Err(err) => return failure(&err),
        }
    }
    Json(json!({ "results": results })).into_response()
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn status(State(app): State<App>) -> Json<Value> {
    Json(app.status())
}

async fn queue_health(State(app): State<App>) -> Json<Value> {
    Json(app.classifier.queue_health())
}

/// The HTTP routes, before the shared layers.
pub fn routes(app: App) -> Router {
    Router::new()
        .route("/v1/classify", post(classify))
        .route("/v1/classify/batch", post(classify_batch))
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/queue/health", get(queue_health))
        .with_state(app)
}
