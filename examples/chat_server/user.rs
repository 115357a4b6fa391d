//! Who a request belongs to: the `x-user-id` header, else the OpenAI `user` field of a JSON
//! body, else the client's address (see `tower_llm_queue_servers::user`).

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tower_llm_queue_servers::user::{self, usable};

pub use tower_llm_queue_servers::user::UserId;

use super::app::AppState;
use super::errors::{format_for, ApiError};

/// Finds the user, and puts a [`UserId`] into the request's extensions for the layers and the
/// handlers. Reads (and puts back) the body, up to `MAX_BODY_BYTES`, to find the `user` field.
pub async fn identify(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let format = format_for(request.uri().path());
    match identified(&app, request).await {
        Ok(request) => next.run(request).await,
        Err(err) => err.response(format),
    }
}

async fn identified(app: &AppState, request: Request) -> Result<Request, ApiError> {
    let (mut parts, body) = request.into_parts();
    let limit = app.config.max_body_bytes as usize;
    let bytes: Bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))?;
    let from_body = || {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()?
            .get("user")?
            .as_str()
            .and_then(usable)
            .map(str::to_string)
    };
    let user = user::identify(&parts, from_body)?;
    parts.extensions.insert(user);
    Ok(Request::from_parts(parts, Body::from(bytes)))
}
