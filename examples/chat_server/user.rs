//! Who a request belongs to: the `x-user-id` header, else the OpenAI `user` field of a JSON
//! body, else the client's address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tower_llm_queue::key::{Key, MAX_KEY_LEN};

use super::app::AppState;
use super::errors::{format_for, ApiError};

/// The user a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(pub Arc<str>);

impl From<UserId> for Key {
    fn from(user: UserId) -> Key {
        Key::from(user.0)
    }
}

impl UserId {
    /// The user as the layers' key.
    pub fn key(&self) -> Key {
        Key::from(self.0.clone())
    }
}

fn usable(text: &str) -> Option<&str> {
    let text = text.trim();
    (!text.is_empty() && text.len() <= MAX_KEY_LEN).then_some(text)
}

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
    let from_header = match parts.headers.get("x-user-id") {
        None => None,
        Some(value) => {
            let text = value.to_str().ok().and_then(usable).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "the x-user-id header must be text of 1 to {MAX_KEY_LEN} bytes"
                ))
            })?;
            Some(text.to_string())
        }
    };
    let from_body = || {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()?
            .get("user")?
            .as_str()
            .and_then(usable)
            .map(str::to_string)
    };
    let from_peer = || {
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip().to_string())
    };
    let user = from_header
        .or_else(from_body)
        .or_else(from_peer)
        .unwrap_or_else(|| "anonymous".to_string());
    parts.extensions.insert(UserId(Arc::from(user)));
    Ok(Request::from_parts(parts, Body::from(bytes)))
}
