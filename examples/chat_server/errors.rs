//! The server's own errors (a malformed request, an unknown id), in the shape of the layers'
//! refusals: this crate's JSON for `/api`, OpenAI's for the gateway under `/v1`.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use tower_llm_queue::http::{error_response_as, json_error, ErrorFormat};
use tower_llm_queue_servers::upstream::UpstreamStreamFailed;

/// The error format of a path: OpenAI's under `/v1`, so that OpenAI clients understand it.
pub fn format_for(path: &str) -> ErrorFormat {
    match path.starts_with("/v1/") {
        true => ErrorFormat::OpenAi,
        false => ErrorFormat::Plain,
    }
}

/// An error the server answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// 400, with what is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    /// 413: the body is over `limit` bytes.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "request_too_large",
            message: format!("the request body is larger than {limit} bytes"),
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }

    /// The upstream's own failure, passed on with its status and message.
    pub fn upstream(status: StatusCode, body: &[u8]) -> Self {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("the upstream answered {status}"));
        ApiError {
            status,
            code: "upstream_error",
            message,
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The response, in `format`.
    pub fn response(&self, format: ErrorFormat) -> Response {
        json_error::<Body>(format, self.status, self.code, &self.message, None)
    }
}

/// The response for an error of the layers or the upstream, in `format`: the layers' refusals
/// as the library answers them, and the upstream's own failures as 502.
pub fn failure(err: &tower::BoxError, format: ErrorFormat) -> Response {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(e) = cause {
        let (code, message) = if let Some(failed) = e.downcast_ref::<UpstreamStreamFailed>() {
            ("upstream_error", failed.to_string())
        } else if e.is::<hyper_util::client::legacy::Error>() {
            let message = format!("the upstream cannot be reached: {e}");
            ("upstream_unreachable", message)
        } else {
            cause = e.source();
            continue;
        };
        return json_error::<Body>(format, StatusCode::BAD_GATEWAY, code, &message, None);
    }
    error_response_as::<Body>(&**err, format)
}
