//! Who a request belongs to: the `x-user-id` header, else what the server finds elsewhere (the
//! chat server: the OpenAI `user` field of the body), else the client's address.
//!
//! The header is trusted as it comes: these servers stand behind something that authenticates
//! users and sets it. Without the header, every client behind one address (a NAT, a proxy) is
//! one user.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::HeaderName;
use tower_llm_queue::key::{Key, MAX_KEY_LEN};

use crate::errors::ApiError;

/// The header that names the user.
pub const USER_HEADER: &str = "x-user-id";

/// The user a request belongs to, as a request extension for the layers and the handlers; a
/// string in JSON (as in a cache key kept in Redis).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
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

    /// The user's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `text` trimmed, when it can name a user: 1 to [`MAX_KEY_LEN`] bytes.
pub fn usable(text: &str) -> Option<&str> {
    let text = text.trim();
    (!text.is_empty() && text.len() <= MAX_KEY_LEN).then_some(text)
}

/// The header as a name, so that a lookup need not parse it.
static USER_HEADER_NAME: HeaderName = HeaderName::from_static(USER_HEADER);

/// The user the `x-user-id` header names, `None` without the header. A header that is present
/// but cannot name a user is a 400: a client that sends one means to be somebody in particular.
pub fn from_header(parts: &Parts) -> Result<Option<UserId>, ApiError> {
    let Some(value) = parts.headers.get(&USER_HEADER_NAME) else {
        return Ok(None);
    };
    let text = value.to_str().ok().and_then(usable).ok_or_else(|| {
        ApiError::bad_request(format!(
            "the {USER_HEADER} header must be text of 1 to {MAX_KEY_LEN} bytes"
        ))
    })?;
    Ok(Some(UserId(Arc::from(text))))
}

/// Finds the user of a request: the `x-user-id` header ([`from_header`]), else `otherwise()`,
/// else the client's address (from axum's `ConnectInfo<SocketAddr>`), else `"anonymous"`.
pub fn identify(
    parts: &Parts,
    otherwise: impl FnOnce() -> Option<String>,
) -> Result<UserId, ApiError> {
    if let Some(user) = from_header(parts)? {
        return Ok(user);
    }
    let from_peer = || {
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip().to_string())
    };
    let user = otherwise()
        .or_else(from_peer)
        .unwrap_or_else(|| "anonymous".to_string());
    Ok(UserId(Arc::from(user)))
}

/// Middleware for axum's `from_fn`: puts the [`UserId`] of the `x-user-id` header, else of the
/// client's address, into the request's extensions; a malformed header is a 400.
pub async fn by_header_or_address(request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    match identify(&parts, || None) {
        Ok(user) => {
            parts.extensions.insert(user);
            next.run(Request::from_parts(parts, body)).await
        }
        Err(err) => err.into_response(),
    }
}
