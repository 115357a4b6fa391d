//! What the two chat APIs have in common: the reply, the decision and how it is answered.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::limits::{apply_retry_after, RateHeaders};
use super::state::{Decision, Ending, Failure, Incoming, Midway, MockHandle, Refusal};
use super::stream::{body, halfway, wait_until, End, Pace, Paced};
use super::text::{count_tokens, reply_tokens};

/// The reply to one request, known at its arrival.
#[derive(Clone, Debug)]
pub(crate) struct Reply {
    /// Its tokens, each with the whitespace before it, after truncation.
    pub(crate) tokens: Vec<String>,
    /// `"length"` when truncated by the request's maximum, else `"stop"`.
    pub(crate) finish_reason: &'static str,
    pub(crate) prompt_tokens: u64,
}

impl Reply {
    /// The reply to `prompt`, with `contents` the text of every message of the request.
    pub(crate) fn new<'a>(
        prompt: &str,
        contents: impl IntoIterator<Item = &'a str>,
        max_tokens: Option<u64>,
    ) -> Self {
        let mut tokens = reply_tokens(prompt);
        let max = max_tokens.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let finish_reason = if max < tokens.len() {
            tokens.truncate(max);
            "length"
        } else {
            "stop"
        };
        Reply {
            tokens,
            finish_reason,
            prompt_tokens: contents.into_iter().map(count_tokens).sum(),
        }
    }

    /// The structured answer to a classification request: `{"label": ..., "confidence": ...}`
    /// with one of `labels`, as [`classify_for`](super::classify_for) chooses it.
    pub(crate) fn classified<'a>(
        prompt: &str,
        labels: &[String],
        contents: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let (label, confidence) = super::text::classify_for(prompt, &labels);
        let answer = serde_json::json!({ "label": label, "confidence": confidence }).to_string();
        Reply {
            tokens: super::text::split_tokens(&answer)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            finish_reason: "stop",
            prompt_tokens: contents.into_iter().map(count_tokens).sum(),
        }
    }

    pub(crate) fn completion_tokens(&self) -> u64 {
        self.tokens.len() as u64
    }

    pub(crate) fn text(&self) -> String {
        self.tokens.concat()
    }
}

/// How one API words its answers.
pub(crate) trait Dialect {
    /// The content type of its streams.
    const STREAM_TYPE: &'static str;

    /// The body of a 429.
    fn refused(&self, refusal: &Refusal) -> serde_json::Value;
    /// The body of an injected failure answered with its status.
    fn failed(&self, failure: Failure) -> serde_json::Value;
    /// The frames of a stream that sends the first `sent` tokens; after them, the closing
    /// frames when `midway` is `None`, an error frame for an error event, nothing for a cut.
    fn stream(
        &self,
        reply: &Reply,
        pace: &Pace,
        sent: usize,
        midway: Option<Midway>,
    ) -> Vec<(Instant, Bytes)>;
    /// The body of a complete non-streamed reply.
    fn whole(&self, reply: &Reply, pace: &Pace) -> serde_json::Value;
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An OpenAI-style error body.
pub(crate) fn openai_error(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "error": { "message": message, "type": kind, "param": param, "code": code }
    })
}

/// The `x-user-id` header, if it is there and readable.
pub(crate) fn header_user(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-user-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// The message of a 429.
pub(crate) fn refusal_message(refusal: &Refusal) -> String {
    use super::state::Limit;
    let wait = match refusal.retry_after {
        Some(wait) => format!(" Please try again in {}.", super::limits::go_duration(wait)),
        None => String::new(),
    };
    match refusal.limit {
        Limit::Requests => format!(
            "Rate limit reached for requests per minute (RPM): Limit {}, Used {}, Requested {}.{wait}",
            refusal.allowed, refusal.used, refusal.requested
        ),
        Limit::Tokens if refusal.retry_after.is_none() => format!(
            "Request too large for tokens per minute (TPM): Limit {}, Requested {}. It will never be admitted.",
            refusal.allowed, refusal.requested
        ),
        Limit::Tokens => format!(
            "Rate limit reached for tokens per minute (TPM): Limit {}, Used {}, Requested {}.{wait}",
            refusal.allowed, refusal.used, refusal.requested
        ),
        Limit::Concurrency => format!(
            "Too many concurrent requests: Limit {}, In progress {}.{wait}",
            refusal.allowed, refusal.used
        ),
    }
}

fn with_rate_headers(mut response: Response, headers: &RateHeaders) -> Response {
    headers.apply(response.headers_mut());
    response
}

/// Decides on a well-formed request and answers it in `dialect`.
pub(crate) async fn respond<D: Dialect>(
    handle: &MockHandle,
    dialect: &D,
    incoming: Incoming,
    reply: Reply,
) -> Response {
    let ticket = match handle.admit(&incoming) {
        Decision::Refused(refusal) => {
            let mut response = json(StatusCode::TOO_MANY_REQUESTS, &dialect.refused(&refusal));
            if let Some(wait) = refusal.retry_after {
                apply_retry_after(response.headers_mut(), wait);
            }
            return with_rate_headers(response, &refusal.headers);
        }
        Decision::Failed { failure, headers } => {
            let status =
                StatusCode::from_u16(failure.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return with_rate_headers(json(status, &dialect.failed(failure)), &headers);
        }
        Decision::Admitted(ticket) => ticket,
    };
    let pace = Pace::of(&ticket);
    let tokens = reply.tokens.len();
    let last = pace.due(tokens.saturating_sub(1));
    let rate = ticket.headers;
    let midway = ticket.midway;
    let sent = match midway {
        Some(_) => halfway(tokens),
        None => tokens,
    };

    if incoming.stream {
        let frames = dialect.stream(&reply, &pace, sent, midway);
        let end = match midway {
            Some(Midway::Cut) => End::Cut,
            Some(Midway::ErrorEvent) => End::Faulted,
            None => End::Served,
        };
        let paced = Paced {
            frames: frames.into(),
            end,
            cut_at: Some(pace.due(sent)),
            guard: ticket.guard,
        };
        let mut response = Response::new(body(paced));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(D::STREAM_TYPE),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return with_rate_headers(response, &rate);
    }

    match midway {
        None => {
            wait_until(last).await;
            ticket.guard.finish(Ending::Served);
            with_rate_headers(json(StatusCode::OK, &dialect.whole(&reply, &pace)), &rate)
        }
        Some(Midway::ErrorEvent) => {
            wait_until(pace.due(sent)).await;
            ticket.guard.finish(Ending::Faulted { status: 500 });
            let body = dialect.failed(Failure::ErrorEvent);
            with_rate_headers(json(StatusCode::INTERNAL_SERVER_ERROR, &body), &rate)
        }
        Some(Midway::Cut) => {
            wait_until(pace.due(sent)).await;
            let whole = serde_json::to_vec(&dialect.whole(&reply, &pace)).unwrap_or_default();
            let half = whole.len() / 2;
            let half = Bytes::from(whole).slice(..half);
            let paced = Paced {
                frames: [(Instant::now(), half)].into(),
                end: End::Cut,
                cut_at: None,
                guard: ticket.guard,
            };
            let mut response = Response::new(body(paced));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            with_rate_headers(response, &rate)
        }
    }
}

/// Nanoseconds in `d`, for Ollama's durations.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
