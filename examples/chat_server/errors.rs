//! The server's own errors (a malformed request, an unknown id), in the shape of the layers'
//! refusals: this crate's JSON for `/api`, OpenAI's for the gateway under `/v1`.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use tower_llm_queue::http::{error_response_as, json_error, ErrorFormat};
pub use tower_llm_queue_servers::errors::ApiError;
use tower_llm_queue_servers::upstream::UpstreamStreamFailed;

/// The error format of a path: OpenAI's under `/v1`, so that OpenAI clients understand it.
pub fn format_for(path: &str) -> ErrorFormat {
    match path.starts_with("/v1/") {
        true => ErrorFormat::OpenAi,
        false => ErrorFormat::Plain,
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
