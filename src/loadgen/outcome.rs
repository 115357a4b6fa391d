//! What a user got for one request: a reply (when its first token came, how many tokens it
//! cost) or an error of a kind that reads the same for every target.

use std::error::Error as StdError;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::BoxError;
use tower_llm_queue::Rejected;

use crate::upstream::sse::{Event, SseParser};
use crate::upstream::UpstreamStreamFailed;

/// How one request ended, for its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A whole reply.
    Served {
        /// When its first token arrived (the whole reply's arrival, for one not streamed).
        first_token: Instant,
        /// The tokens it cost, as the upstream reported them (0 if it did not).
        tokens: u64,
    },
    /// An error, by kind: `upstream_429`, `upstream_503` (an upstream status that reached the
    /// user), `unreachable`, `stream_failed`, `timeout` (the user gave up, or a timeout layer
    /// did), this crate's refusals by name (`queue_full`, `queue_timeout`, `user_limit`,
    /// `rate_limited`, `circuit_open`, `cancelled`), `overloaded`, `bad_reply` or `other`.
    Failed(String),
}

impl Outcome {
    fn failed(kind: &str) -> Outcome {
        Outcome::Failed(kind.to_string())
    }
}

/// The kind of an error of an in-process stack.
pub fn error_kind(err: &(dyn StdError + 'static)) -> String {
    if let Some(rejected) = Rejected::find(err) {
        return rejected.kind().as_str().to_string();
    }
    let mut cause: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cause {
        if e.is::<tower::timeout::error::Elapsed>() {
            return "timeout".into();
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            return "overloaded".into();
        }
        if e.is::<UpstreamStreamFailed>() {
            return "stream_failed".into();
        }
        if e.is::<hyper_util::client::legacy::Error>() {
            return "unreachable".into();
        }
        cause = e.source();
    }
    "other".into()
}

/// The kind of a refusal answered over HTTP with `status` and an OpenAI-style error `body`: the
/// gateway's own refusals by their `code`, an upstream status passed through as
/// `upstream_<status>`.
pub fn status_kind(status: http::StatusCode, body: &[u8]) -> String {
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    match code.as_deref() {
        Some(
            kind @ ("queue_full" | "queue_timeout" | "user_limit" | "rate_limited" | "circuit_open"
            | "cancelled" | "timeout"),
        ) => kind.to_string(),
        Some("upstream_unreachable") => "unreachable".into(),
        Some("upstream_error") => "stream_failed".into(),
        _ => format!("upstream_{}", status.as_u16()),
    }
}

/// Reads a reply to its end: a stream event by event (its first token timed as it arrives), a
/// JSON reply whole; any other status is a failure of its [`status_kind`].
pub async fn read_reply<B>(response: http::Response<B>, stream: bool) -> Outcome
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let status = response.status();
    let mut body = std::pin::pin!(response.into_body());
    if !status.is_success() {
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        return Outcome::Failed(status_kind(status, &bytes));
    }
    if !stream {
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => return Outcome::Failed(body_error_kind(err.into())),
        };
        let reply: serde_json::Value = match serde_json::from_slice(&bytes) {
            Ok(reply) => reply,
            Err(_) => return Outcome::failed("bad_reply"),
        };
        if reply.pointer("/choices/0/message/content").is_none() {
            return Outcome::failed("bad_reply");
        }
        let tokens = reply["usage"]["total_tokens"].as_u64().unwrap_or(0);
        return Outcome::Served {
            first_token: Instant::now(),
            tokens,
        };
    }
    let mut parser = SseParser::new();
    let (mut first_token, mut tokens, mut done, mut error) = (None, 0, false, false);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(err) => return Outcome::Failed(body_error_kind(err.into())),
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        parser.push(data, |event| match event {
            Event::Delta(_) => {
                first_token.get_or_insert_with(Instant::now);
            }
            Event::Usage { prompt, completion } => tokens = prompt + completion,
            Event::Error(_) => error = true,
            Event::Done => done = true,
        });
        if error {
            return Outcome::failed("stream_failed");
        }
    }
    match (first_token, done) {
        (Some(first_token), true) => Outcome::Served {
            first_token,
            tokens,
        },
        _ => Outcome::failed("stream_failed"),
    }
}

/// The kind of an error that ended a body: this crate's refusal (a cancellation) by name, any
/// other break of the stream `stream_failed`.
fn body_error_kind(err: BoxError) -> String {
    match Rejected::find(&*err) {
        Some(rejected) => rejected.kind().as_str().to_string(),
        None => "stream_failed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn reply(status: u16, body: &str) -> http::Response<Full<Bytes>> {
        http::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    #[tokio::test]
    async fn replies_and_refusals() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        let served = read_reply(reply(200, stream), true).await;
        assert!(
            matches!(served, Outcome::Served { tokens: 5, .. }),
            "{served:?}"
        );
        let cut = &stream[..stream.len() - 14];
        assert_eq!(
            read_reply(reply(200, cut), true).await,
            Outcome::failed("stream_failed")
        );
        let error = "data: {\"error\":{\"message\":\"boom\"}}\n\n";
        assert_eq!(
            read_reply(reply(200, error), true).await,
            Outcome::failed("stream_failed")
        );
        let whole = r#"{"choices":[{"message":{"content":"Hi"}}],"usage":{"total_tokens":9}}"#;
        assert!(matches!(
            read_reply(reply(200, whole), false).await,
            Outcome::Served { tokens: 9, .. }
        ));
        assert_eq!(
            read_reply(reply(200, "{}"), false).await,
            Outcome::failed("bad_reply")
        );

        let upstream = r#"{"error":{"type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            read_reply(reply(429, upstream), true).await,
            Outcome::failed("upstream_429")
        );
        let ours = r#"{"error":{"type":"rate_limit_error","code":"user_limit"}}"#;
        assert_eq!(
            read_reply(reply(429, ours), true).await,
            Outcome::failed("user_limit")
        );
        assert_eq!(
            read_reply(reply(503, "not json"), false).await,
            Outcome::failed("upstream_503")
        );
        let unreachable = r#"{"error":{"code":"upstream_unreachable"}}"#;
        assert_eq!(
            status_kind(http::StatusCode::BAD_GATEWAY, unreachable.as_bytes()),
            "unreachable"
        );
    }

    #[test]
    fn kinds_of_in_process_errors() {
        use tower_llm_queue::RejectionKind;
        let err: BoxError = Box::new(Rejected::new(RejectionKind::QueueFull));
        assert_eq!(error_kind(&*err), "queue_full");
        let err: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(error_kind(&*err), "timeout");
        let err: BoxError = "something else".into();
        assert_eq!(error_kind(&*err), "other");
    }
}
