//! HTTP helpers: turning errors into responses for axum's `HandleErrorLayer`.
//!
//! | error | status |
//! |---|---|
//! | [`Rejected`] `UserLimit`, `RateLimited` | 429 Too Many Requests |
//! | [`Rejected`] `QueueFull`, `CircuitOpen` | 503 Service Unavailable |
//! | [`Rejected`] `QueueTimeout`, `tower::timeout::error::Elapsed` | 504 Gateway Timeout |
//! | [`Rejected`] `Cancelled` | 499 Client Closed Request |
//! | [`Rejected`] `MissingKey` | 400 Bad Request |
//! | `tower::load_shed::error::Overloaded` | 503 Service Unavailable |
//! | [`BodyTooLarge`](crate::buffer::BodyTooLarge) of a request / of a response | 413 Payload Too Large / 502 Bad Gateway |
//! | anything else | 500 Internal Server Error, with no detail of the error |
//!
//! `Cancelled` answers 499 because a cancellation comes from the client's side (a user pressing
//! "stop" through a cancel endpoint): the server is healthy and retrying makes no sense, which a
//! 503 would suggest.
//!
//! A known retry delay is sent as `Retry-After` in whole seconds, rounded up, as `retry-after-ms`,
//! and in the JSON body in milliseconds:
//! `{"error": "rate_limited", "message": "...", "retry_after_ms": 1500}`. For an
//! OpenAI-compatible gateway, [`handle_error_openai`] answers the same statuses and headers with
//! OpenAI's error body ([`ErrorFormat::OpenAi`]).
//!
//! ```
//! use axum::{error_handling::HandleErrorLayer, routing::get, Router};
//! use tower::ServiceBuilder;
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(HandleErrorLayer::new(tower_llm_queue::http::handle_error))
//!             .timeout(std::time::Duration::from_secs(30)),
//!     );
//! ```

use std::error::Error;
use std::time::Duration;

use http::{header, HeaderValue, StatusCode};

use crate::rejected::{Rejected, RejectionKind};

/// The status code this crate answers for a rejection of this kind.
pub fn status_for(kind: RejectionKind) -> StatusCode {
    match kind {
        RejectionKind::UserLimit | RejectionKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        RejectionKind::QueueFull | RejectionKind::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
        RejectionKind::QueueTimeout => StatusCode::GATEWAY_TIMEOUT,
        RejectionKind::Cancelled => client_closed_request(),
        RejectionKind::MissingKey => StatusCode::BAD_REQUEST,
    }
}

fn client_closed_request() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// `Retry-After` in whole seconds, rounded up (a delay of 1 ms is sent as 1); the longest
/// delay is `u64::MAX` seconds.
pub fn retry_after_seconds(delay: Duration) -> u64 {
    let secs = delay.as_secs();
    if delay.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs
    }
}

/// What a response says about an error.
struct Described {
    status: StatusCode,
    retry_after: Option<Duration>,
    /// A short `snake_case` name: a [`RejectionKind`]'s, or `timeout`, `internal`, ...
    code: &'static str,
    message: String,
}

fn described(status: StatusCode, code: &'static str, message: impl Into<String>) -> Described {
    Described {
        status,
        retry_after: None,
        code,
        message: message.into(),
    }
}

fn describe(err: &(dyn Error + 'static)) -> Described {
    if let Some(rejected) = Rejected::find(err) {
        return Described {
            status: status_for(rejected.kind()),
            retry_after: rejected.retry_after(),
            code: rejected.kind().as_str(),
            message: rejected.message().to_string(),
        };
    }
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<tower::timeout::error::Elapsed>() {
            let message = "the upstream did not answer in time";
            return described(StatusCode::GATEWAY_TIMEOUT, "timeout", message);
        }
        if let Some(too_large) = e.downcast_ref::<crate::buffer::BodyTooLarge>() {
            return match too_large.is_request() {
                true => described(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    too_large.to_string(),
                ),
                false => described(
                    StatusCode::BAD_GATEWAY,
                    "response_too_large",
                    too_large.to_string(),
                ),
            };
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            let message = "the service is overloaded";
            return described(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message);
        }
        current = e.source();
    }
    let message = "internal server error";
    described(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
}

fn millis(delay: Duration) -> u64 {
    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
}

/// The shape of an error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ErrorFormat {
    /// This crate's own: `{"error": "rate_limited", "message": "...", "retry_after_ms": 1500}`.
    #[default]
    Plain,
    /// OpenAI's, for gateways that OpenAI clients call:
    /// `{"error": {"message": "...", "type": "rate_limit_error", "param": null, "code":
    /// "rate_limited"}}`, with an `x-should-retry` header that the official SDKs obey (false for
    /// what a retry cannot fix: a cancellation, a bad request, a body too large).
    OpenAi,
}

fn openai_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        429 => "rate_limit_error",
        400..=498 => "invalid_request_error",
        499 => "cancelled",
        504 => "timeout",
        _ => "server_error",
    }
}

/// Builds the response for an error, with any body type that can be made from bytes.
///
/// This is what [`handle_error`] does, without axum.
pub fn error_response<B>(err: &(dyn Error + 'static)) -> http::Response<B>
where
    B: From<bytes::Bytes>,
{
    error_response_as(err, ErrorFormat::Plain)
}

/// Builds the response for an error with a body of the given format. Both formats send a known
/// delay as `Retry-After` (whole seconds, rounded up) and `retry-after-ms`.
pub fn error_response_as<B>(err: &(dyn Error + 'static), format: ErrorFormat) -> http::Response<B>
where
    B: From<bytes::Bytes>,
{
    let d = describe(err);
    if d.status.is_server_error() {
        tracing::warn!(status = d.status.as_u16(), error = %err, "request failed");
    }
    json_error(format, d.status, d.code, &d.message, d.retry_after)
}

/// An error response of the server's own — a malformed request, an unknown id — in the shape
/// and with the headers of the layers' refusals: `code` is the short name (`bad_request`), and
/// `retry_after`, when known, is sent as `Retry-After` and `retry-after-ms`.
pub fn json_error<B>(
    format: ErrorFormat,
    status: StatusCode,
    code: &str,
    message: &str,
    retry_after: Option<Duration>,
) -> http::Response<B>
where
    B: From<bytes::Bytes>,
{
    let body = match format {
        ErrorFormat::Plain => serde_json::json!({
            "error": code,
            "message": message,
            "retry_after_ms": retry_after.map(millis),
        }),
        ErrorFormat::OpenAi => serde_json::json!({
            "error": {
                "message": message,
                "type": openai_type(status),
                "param": null,
                "code": code,
            }
        }),
    };
    let mut response = http::Response::new(B::from(bytes::Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(delay) = retry_after {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after_seconds(delay)),
        );
        headers.insert("retry-after-ms", HeaderValue::from(millis(delay)));
    }
    if format == ErrorFormat::OpenAi {
        let retry = matches!(status.as_u16(), 429 | 500..=599);
        headers.insert(
            "x-should-retry",
            HeaderValue::from_static(if retry { "true" } else { "false" }),
        );
    }
    response
}

/// The error handler for axum's `HandleErrorLayer`: answers 429, 503, 504, 499 or 400 for a
/// [`Rejected`] (see the table in the [module docs](self)) and 500 with no detail for any other
/// error.
#[cfg(feature = "axum")]
pub async fn handle_error(err: tower::BoxError) -> axum::response::Response {
    error_response::<axum::body::Body>(&*err)
}

/// [`handle_error`] with OpenAI-style error bodies ([`ErrorFormat::OpenAi`]), for an
/// OpenAI-compatible gateway: the official SDKs read the status, `retry-after-ms`,
/// `Retry-After` and `x-should-retry`, and back off as told.
#[cfg(feature = "axum")]
pub async fn handle_error_openai(err: tower::BoxError) -> axum::response::Response {
    error_response_as::<axum::body::Body>(&*err, ErrorFormat::OpenAi)
}

#[cfg(all(test, feature = "axum"))]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn parts(err: tower::BoxError) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = handle_error(err).await;
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, retry, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn rejection_with_delay() {
        let err = Rejected::new(RejectionKind::RateLimited)
            .with_retry_after(Duration::from_millis(1500))
            .into();
        let (status, retry, body) = parts(err).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry.as_deref(), Some("2"));
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["retry_after_ms"], 1500);
        assert_eq!(body["message"], "rate limit exceeded");
    }

    #[tokio::test]
    async fn each_kind_has_its_status() {
        let expect = [
            (RejectionKind::QueueFull, 503),
            (RejectionKind::QueueTimeout, 504),
            (RejectionKind::UserLimit, 429),
            (RejectionKind::RateLimited, 429),
            (RejectionKind::CircuitOpen, 503),
            (RejectionKind::Cancelled, 499),
            (RejectionKind::MissingKey, 400),
        ];
        for (kind, code) in expect {
            let (status, retry, body) = parts(Rejected::new(kind).into()).await;
            assert_eq!(status.as_u16(), code, "{kind}");
            assert_eq!(retry, None);
            assert_eq!(body["error"], kind.as_str());
            assert!(body["retry_after_ms"].is_null());
        }
    }

    #[tokio::test]
    async fn other_errors_leak_nothing() {
        let (status, retry, body) = parts("database password is hunter2".into()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(retry, None);
        assert!(!body.to_string().contains("hunter2"));
    }

    #[tokio::test]
    async fn timeouts_are_504() {
        let (status, _, body) = parts(tower::timeout::error::Elapsed::new().into()).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body["error"], "timeout");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_seconds(Duration::ZERO), 0);
        assert_eq!(retry_after_seconds(Duration::MAX), u64::MAX);
    }

    #[tokio::test]
    async fn the_longest_delay_is_sent_whole() {
        let err: tower::BoxError = Rejected::new(RejectionKind::CircuitOpen)
            .with_retry_after(Duration::MAX)
            .into();
        let (_, retry_after, body) = parts(err).await;
        assert_eq!(retry_after.as_deref(), Some("18446744073709551615"));
        assert_eq!(body["retry_after_ms"], u64::MAX);
    }

    #[tokio::test]
    async fn openai_format() {
        let err: tower::BoxError = Rejected::new(RejectionKind::RateLimited)
            .with_retry_after(Duration::from_millis(1500))
            .into();
        let response = handle_error_openai(err).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let headers = response.headers();
        assert_eq!(headers[header::RETRY_AFTER], "2");
        assert_eq!(headers["retry-after-ms"], "1500");
        assert_eq!(headers["x-should-retry"], "true");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "rate_limited");
        assert_eq!(body["error"]["message"], "rate limit exceeded");

        let cancelled: tower::BoxError = Rejected::new(RejectionKind::Cancelled).into();
        let response = handle_error_openai(cancelled).await;
        assert_eq!(response.status().as_u16(), 499);
        assert_eq!(response.headers()["x-should-retry"], "false");
    }
}
