//! Who a request belongs to: the `x-user-id` header, else the OpenAI `user` field of a JSON
//! body, else the client's address (see `tower_llm_queue_servers::user`).

use std::convert::Infallible;
use std::fmt;
use std::future::ready;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::request::Parts;
use axum::response::Response;
use futures_util::future::{BoxFuture, Either};
use http_body::Body as _;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use tower::{Layer, Service};
use tower_llm_queue_servers::user::{self, usable};

pub use tower_llm_queue_servers::user::UserId;

use super::app::AppState;
use super::errors::{format_for, ApiError};

/// Finds the user of every request, and puts a [`UserId`] into its extensions for the layers
/// and the handlers. With an `x-user-id` header, the request goes on at once, its body left to
/// the handler ([`LimitedBytes`]): only a body that declares a length over `MAX_BODY_BYTES` is
/// refused here. Without one, the body is read (and put back), up to `MAX_BODY_BYTES`, to find
/// the `user` field.
#[derive(Debug, Clone)]
pub struct IdentifyLayer(pub AppState);

impl<S> Layer<S> for IdentifyLayer {
    type Service = Identify<S>;

    fn layer(&self, inner: S) -> Identify<S> {
        Identify {
            inner,
            app: self.0.clone(),
        }
    }
}

/// The service of [`IdentifyLayer`].
#[derive(Debug, Clone)]
pub struct Identify<S> {
    inner: S,
    app: AppState,
}

impl<S> Service<Request> for Identify<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let format = format_for(request.uri().path());
        let refused = |err: ApiError| -> Self::Future {
            Either::Right(Box::pin(ready(Ok(err.response(format)))))
        };
        let (mut parts, body) = request.into_parts();
        let limit = self.app.config.max_body_bytes as usize;
        match user::from_header(&parts) {
            Ok(Some(_)) if body.size_hint().lower() > limit as u64 => {
                refused(ApiError::too_large(limit))
            }
            Ok(Some(user)) => {
                parts.extensions.insert(user);
                Either::Left(self.inner.call(Request::from_parts(parts, body)))
            }
            Err(err) => refused(err),
            Ok(None) => {
                // The service that was made ready goes into the future; a clone stays.
                let mut ready = self.inner.clone();
                std::mem::swap(&mut ready, &mut self.inner);
                Either::Right(Box::pin(async move {
                    match by_body(parts, body, limit).await {
                        Ok(request) => ready.call(request).await,
                        Err(err) => Ok(err.response(format)),
                    }
                }))
            }
        }
    }
}

/// The request with its user found from its body (or its address), the body put back.
async fn by_body(mut parts: Parts, body: Body, limit: usize) -> Result<Request, ApiError> {
    let bytes = read_limited(body, limit).await?;
    let user = user::identify(&parts, || user_field(&bytes))?;
    parts.extensions.insert(user);
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// The body of a request, read up to `MAX_BODY_BYTES`: a longer one is a 413, in the error
/// format of the request's path.
#[derive(Debug)]
pub struct LimitedBytes(pub Bytes);

impl FromRequest<AppState> for LimitedBytes {
    type Rejection = Response;

    async fn from_request(request: Request, app: &AppState) -> Result<Self, Response> {
        let format = format_for(request.uri().path());
        read_limited(request.into_body(), app.config.max_body_bytes as usize)
            .await
            .map(LimitedBytes)
            .map_err(|err| err.response(format))
    }
}

/// A body read whole, up to `limit` bytes: a longer one is a 413.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))
}

/// The OpenAI `user` field of a JSON object, when it is a string that can name a user; the
/// rest of the body is checked as JSON and skipped unread.
fn user_field(body: &[u8]) -> Option<String> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let raw = UserField.deserialize(&mut json).ok()?;
    json.end().ok()?;
    let text = raw?.get();
    // A string without escapes is its text between the quotes.
    let name = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(plain) if !plain.contains('\\') => plain.to_string(),
        _ => serde_json::from_str::<String>(text).ok()?,
    };
    usable(&name).map(str::to_string)
}

/// Reads a JSON object for its `user` member, as written (the last one, if the key comes
/// twice, as a `serde_json::Value` keeps it); anything but an object is an error.
struct UserField;

impl<'de> DeserializeSeed<'de> for UserField {
    type Value = Option<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, json: D) -> Result<Self::Value, D::Error> {
        json.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for UserField {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut user = None;
        while let Some(is_user) = map.next_key_seed(IsUser)? {
            if is_user {
                user = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(user)
    }
}

/// Reads a key: whether it is `user`, escapes decoded.
struct IsUser;

impl<'de> DeserializeSeed<'de> for IsUser {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, json: D) -> Result<bool, D::Error> {
        json.deserialize_str(self)
    }
}

impl Visitor<'_> for IsUser {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == "user")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_field_is_read_as_a_value_reads_it() {
        let bodies = [
            r#"{"model": "m", "user": "ada", "messages": [{"content": "hi"}]}"#,
            r#"{"user": "  bob  "}"#,
            r#"{"user": "caf\u00e9 \"q\""}"#,
            r#"{"us\u0065r": "eve"}"#,
            r#"{"user": "ada", "user": "bob"}"#,
            r#"{"user": 5}"#,
            r#"{"user": null}"#,
            r#"{"user": ""}"#,
            r#"{"user": "   "}"#,
            r#"{"user": {"name": "ada"}}"#,
            r#"{"name": "ada"}"#,
            r#"["ada"]"#,
            r#""ada""#,
            r#"{"user": "ada"} trailing"#,
            r#"{"user": "ada", "x": [1, 2,]}"#,
            r#"{not json"#,
            "",
        ];
        for body in bodies {
            let by_value = serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("user")?.as_str().and_then(usable).map(str::to_string));
            assert_eq!(user_field(body.as_bytes()), by_value, "{body}");
        }
        assert_eq!(user_field(br#"{"user": " ada "}"#).as_deref(), Some("ada"));
        // Where a `Value` gives up (nested over 128 deep), the skipped members are still read
        // to their end, and the user found.
        let deep = format!(
            r#"{{"user": "ada", "x": {}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(user_field(deep.as_bytes()).as_deref(), Some("ada"));
    }
}
