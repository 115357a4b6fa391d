//! A small axum server that shares one slow, streaming fake LLM among many users.
//!
//! Run with `cargo run --example basic_server`, then:
//!
//! ```text
//! curl -N -H 'x-user-id: ada' -H 'x-priority: 1' localhost:3000/ask?prompt=hello
//! curl localhost:3000/queue/health
//! curl -X DELETE -H 'x-user-id: ada' localhost:3000/requests/7
//! ```
//!
//! At most 3 replies stream at once (each holds its slot until its last token), at most 2 per
//! user; the rest wait in a queue of 100 by priority (`x-priority`, 1 highest) and take turns
//! across users. Environment: `ADDR` (default `127.0.0.1:3000`).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use tower::ServiceBuilder;
use tower_llm_queue::key::ExtractKey;
use tower_llm_queue::key::HeaderKey;
use tower_llm_queue::priority_queue::{HeaderPriority, RequestIdExtension};
use tower_llm_queue::{
    PerUserConcurrencyLayer, PerUserHandle, PriorityQueueHandle, PriorityQueueLayer, RequestId,
};

#[derive(Clone)]
struct Handles {
    queue: PriorityQueueHandle,
    users: PerUserHandle,
}

#[derive(serde::Deserialize)]
struct Ask {
    prompt: Option<String>,
}

/// The fake upstream: streams one word of the answer every 100 ms.
async fn ask(Extension(id): Extension<RequestId>, Query(q): Query<Ask>) -> Response {
    let prompt = q.prompt.unwrap_or_else(|| "nothing".into());
    let words: Vec<String> =
        format!("request {id}: you asked about {prompt}, and the answer is 42\n")
            .split_inclusive(' ')
            .map(str::to_owned)
            .collect();
    let stream = futures_util::stream::unfold(words.into_iter(), |mut words| async move {
        let word = words.next()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, Infallible>(Bytes::from(word)), words))
    });
    let mut response = Body::from_stream(stream).into_response();
    if let Ok(value) = id.to_string().parse() {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn health(State(h): State<Handles>) -> impl IntoResponse {
    Json(serde_json::json!({
        "queue": h.queue.stats(),
        "users": h.users.stats(),
        "entries": h.queue.entries(),
    }))
}

/// Cancels one of the caller's own requests: ids are easy to guess, so the owner is checked.
async fn cancel(
    State(h): State<Handles>,
    Path(id): Path<u64>,
    request: axum::extract::Request,
) -> StatusCode {
    let Ok(owner) = HeaderKey::new("x-user-id").extract(&request) else {
        return StatusCode::BAD_REQUEST;
    };
    match h.queue.cancel_owned(RequestId::from_u64(id), &owner) {
        true => StatusCode::NO_CONTENT,
        false => StatusCode::NOT_FOUND,
    }
}

fn app() -> Router {
    let queue = PriorityQueueLayer::new(3)
        .capacity(100)
        .queue_timeout(Duration::from_secs(30))
        .priority(HeaderPriority::new("x-priority"))
        .fair_by(HeaderKey::new("x-user-id"))
        .request_id(RequestIdExtension)
        .hold_until_body_end();
    let per_user = PerUserConcurrencyLayer::new(2, HeaderKey::new("x-user-id"))
        .wait(5, Duration::from_secs(30))
        .hold_until_body_end();
    let handles = Handles {
        queue: queue.handle(),
        users: per_user.handle(),
    };

    let llm = Router::new().route("/ask", get(ask)).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(tower_llm_queue::http::handle_error))
            .layer(per_user)
            .layer(queue),
    );
    Router::new()
        .route("/queue/health", get(health))
        .route("/requests/{id}", delete(cancel))
        .with_state(handles)
        .merge(llm)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_llm_queue=debug".into()),
        )
        .init();

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
    tracing::info!("listening on http://{addr}");
    axum::serve(listener, app()).await.expect("server error");
}
