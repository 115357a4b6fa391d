//! The handlers: seed 003's chat API, the OpenAI-compatible gateway, status and cancellation.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream;
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Number, Value};
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_llm_queue::http::ErrorFormat;
use tower_llm_queue::RequestId;
use tower_llm_queue_servers::upstream::json;
use tower_llm_queue_servers::upstream::sse::estimate_tokens;

use super::app::AppState;
use super::chat::{relay, Update};
use super::errors::{failure, ApiError};
use super::stack::{Estimate, BACKGROUND, INTERACTIVE};
use super::user::{LimitedBytes, UserId};
use tower_llm_queue_servers::upstream::{Level, UpstreamRequest, CHAT_COMPLETIONS};

/// The web page.
pub async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// The longest message accepted, in bytes.
const MAX_MESSAGE: usize = 16 * 1024;

#[derive(Debug, Deserialize)]
struct ChatBody {
    message: String,
    #[serde(default)]
    conversation_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SummarizeBody {
    text: String,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the body is empty: send {shape}"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("the body must be {shape}: {err}")))
}

fn text_field<'a>(text: &'a str, name: &str) -> Result<&'a str, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ApiError::bad_request(format!("`{name}` is empty")));
    }
    if text.len() > MAX_MESSAGE {
        return Err(ApiError::bad_request(format!(
            "`{name}` is longer than {MAX_MESSAGE} bytes"
        )));
    }
    Ok(text)
}

impl AppState {
    /// A chat-completions request to the upstream for `user`, at `level`, with id `id`.
    fn upstream_request(
        &self,
        user: &UserId,
        level: Level,
        id: RequestId,
        mut body: Value,
    ) -> UpstreamRequest {
        let estimate = estimate(&body, self.config.max_tokens);
        if body.get("model").is_none_or(Value::is_null) {
            body["model"] = json!(&*self.model);
        }
        upstream_call(user, level, id, Bytes::from(body.to_string()), estimate)
    }
}

/// What a chat-completions request is estimated to cost: the tokens of each message's
/// `content` written as JSON, and the longest reply it asks for (`max_tokens` when it says
/// none).
fn estimate(body: &Value, max_tokens: u64) -> Estimate {
    let prompt: u64 = body["messages"]
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .map(|m| estimate_tokens(&m["content"].to_string()))
                .sum()
        })
        .unwrap_or(0);
    let max_reply = body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64())
        .unwrap_or(max_tokens);
    Estimate { prompt, max_reply }
}

/// A request to the upstream's `/chat/completions` with `body` as it is, carrying what the
/// layers read: the user, the level, the id and the estimate.
fn upstream_call(
    user: &UserId,
    level: Level,
    id: RequestId,
    body: Bytes,
    estimate: Estimate,
) -> UpstreamRequest {
    let mut request = http::Request::post(http::Uri::from_static(CHAT_COMPLETIONS))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .unwrap_or_default();
    let extensions = request.extensions_mut();
    extensions.insert(user.clone());
    extensions.insert(level);
    extensions.insert(id);
    extensions.insert(estimate);
    request
}

/// The fields of a chat-completions request that the gateway reads, borrowed from its body;
/// the others are skipped unread.
#[derive(Debug, Deserialize)]
struct Completion<'a> {
    #[serde(borrow)]
    messages: Option<Vec<PromptMessage<'a>>>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    max_completion_tokens: Option<Number>,
    max_tokens: Option<Number>,
}

#[derive(Debug, Deserialize)]
struct PromptMessage<'a> {
    #[serde(borrow)]
    content: Option<&'a RawValue>,
}

/// The tokens of a message's `content` as [`estimate`] counts them: of its JSON text, `null`
/// when it has none.
fn content_tokens(content: Option<&RawValue>) -> Option<u64> {
    let Some(content) = content else {
        return Some(estimate_tokens("null"));
    };
    let text = content.get();
    // A string without escapes is written back exactly as it came.
    if text.starts_with('"') && !text.contains('\\') {
        return Some(estimate_tokens(text));
    }
    let value: Value = serde_json::from_str(text).ok()?;
    Some(estimate_tokens(&value.to_string()))
}

/// A gateway call's body read by its fields, without building it as a [`Value`]: the same
/// [`estimate`], or the same refusal for want of messages. `None` when it must be read as a
/// `Value` instead: it names no model (which the gateway adds), nests deeply, or has an
/// unusual shape (a field of another type, a key twice).
fn estimate_of_text(body: &[u8], max_tokens: u64) -> Option<Result<Estimate, ApiError>> {
    if !json::shallow(body) {
        return None;
    }
    let request: Completion<'_> = serde_json::from_slice(body).ok()?;
    request.model?;
    let messages = match request.messages {
        Some(messages) if !messages.is_empty() => messages,
        _ => return Some(Err(no_messages())),
    };
    let mut prompt = 0;
    for message in &messages {
        prompt += content_tokens(message.content)?;
    }
    let max_reply = request
        .max_completion_tokens
        .and_then(|n| n.as_u64())
        .or_else(|| request.max_tokens.and_then(|n| n.as_u64()))
        .unwrap_or(max_tokens);
    Some(Ok(Estimate { prompt, max_reply }))
}

fn no_messages() -> ApiError {
    ApiError::bad_request("`messages` must be a non-empty array")
}

fn sse_event(update: Update) -> Result<Event, Infallible> {
    Ok(Event::default().data(update.to_json().to_string()))
}

/// `POST /api/ai/chat` `{"message": "...", "conversation_id": "..."}`: the reply as server-sent
/// events. The first carries the request's id and, while it waits, its place in the queue.
pub async fn chat(
    State(app): State<AppState>,
    Extension(user): Extension<UserId>,
    LimitedBytes(body): LimitedBytes,
) -> Response {
    let shape = r#"JSON like {"message": "..."}"#;
    let chat: ChatBody = match parse(&body, shape) {
        Ok(chat) => chat,
        Err(err) => return err.response(ErrorFormat::Plain),
    };
    let message = match text_field(&chat.message, "message") {
        Ok(message) => message,
        Err(err) => return err.response(ErrorFormat::Plain),
    };
    let id = RequestId::next();
    let body = json!({
        "messages": [{"role": "user", "content": message}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": app.config.max_tokens,
        "user": &*user.0,
    });
    let request = app.upstream_request(&user, INTERACTIVE, id, body);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(relay(app, id, chat.conversation_id, request, tx));
    let updates = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|update| (sse_event(update), rx))
    });
    Sse::new(updates)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// `POST /api/ai/summarize` `{"text": "..."}`: background work at a lower priority, in the same
/// queue; answers `{"id": ..., "summary": "..."}` once done.
pub async fn summarize(
    State(app): State<AppState>,
    Extension(user): Extension<UserId>,
    LimitedBytes(body): LimitedBytes,
) -> Response {
    let summary: SummarizeBody = match parse(&body, r#"JSON like {"text": "..."}"#) {
        Ok(summary) => summary,
        Err(err) => return err.response(ErrorFormat::Plain),
    };
    let text = match text_field(&summary.text, "text") {
        Ok(text) => text,
        Err(err) => return err.response(ErrorFormat::Plain),
    };
    let id = RequestId::next();
    let body = json!({
        "messages": [
            {"role": "system", "content": "Summarize the user's text in two sentences."},
            {"role": "user", "content": text},
        ],
        "max_tokens": app.config.max_tokens,
        "user": &*user.0,
    });
    let request = app.upstream_request(&user, BACKGROUND, id, body);
    let response = match app.llm.clone().oneshot(request).await {
        Ok(response) => response,
        Err(err) => return failure(&err, ErrorFormat::Plain),
    };
    let status = response.status();
    let bytes = match response.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => return failure(&err.into_inner(), ErrorFormat::Plain),
    };
    if !status.is_success() {
        return ApiError::upstream(status, &bytes).response(ErrorFormat::Plain);
    }
    let reply: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let summary = reply
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Json(json!({"id": id, "summary": summary})).into_response()
}

/// The header with which a gateway call asks for a queue level: 1 (the default, as a chat) to
/// 5.
pub const PRIORITY_HEADER: &str = "x-priority";

/// The header as a name, so that a lookup need not parse it.
static PRIORITY: header::HeaderName = header::HeaderName::from_static(PRIORITY_HEADER);

/// The level a gateway call asks for with [`PRIORITY_HEADER`]: [`INTERACTIVE`] without it. An
/// extractor that reads that one header; a level it cannot read is a 400 in OpenAI's format.
pub struct GatewayLevel(Level);

impl<S: Sync> FromRequestParts<S> for GatewayLevel {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let Some(value) = parts.headers.get(&PRIORITY) else {
            return Ok(GatewayLevel(INTERACTIVE));
        };
        value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u8>().ok())
            .filter(|level| (1..=5).contains(level))
            .map(|level| GatewayLevel(Level(level)))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "the {PRIORITY_HEADER} header must be a level from 1 (first) to 5"
                ))
                .response(ErrorFormat::OpenAi)
            })
    }
}

/// `POST /v1/chat/completions`: the OpenAI-compatible gateway. The body goes to the upstream
/// through the same layers, and the upstream's answer — JSON or a stream — comes back as it is.
/// `x-priority: 3` puts a call at the level of background work ([`BACKGROUND`]).
pub async fn completions(
    State(app): State<AppState>,
    Extension(user): Extension<UserId>,
    GatewayLevel(level): GatewayLevel,
    LimitedBytes(body): LimitedBytes,
) -> Response {
    let openai = ErrorFormat::OpenAi;
    // The body goes on as the client wrote it, unless it must be read as a whole.
    let upstream = match estimate_of_text(&body, app.config.max_tokens) {
        Some(Ok(estimate)) => upstream_call(&user, level, RequestId::next(), body, estimate),
        Some(Err(err)) => return err.response(openai),
        None => {
            let request: Value = match parse(&body, "a chat-completions request in JSON") {
                Ok(request) => request,
                Err(err) => return err.response(openai),
            };
            if request["messages"].as_array().is_none_or(Vec::is_empty) {
                return no_messages().response(openai);
            }
            app.upstream_request(&user, level, RequestId::next(), request)
        }
    };
    match app.llm.clone().oneshot(upstream).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            for hop in [header::CONNECTION, header::TRANSFER_ENCODING] {
                parts.headers.remove(hop);
            }
            Response::from_parts(parts, Body::new(body))
        }
        Err(err) => failure(&err, openai),
    }
}

/// `GET /v1/models`: the model this gateway serves.
pub async fn models(State(app): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": &*app.model, "object": "model", "owned_by": "tower-llm-queue"}],
    }))
}

/// `GET /api/ai/status`: the queue, the limits, the breaker, times and outcomes.
pub async fn status(State(app): State<AppState>) -> Json<Value> {
    let queue = app.handles.queue.stats();
    Json(json!({
        "upstream": &*app.upstream,
        "running": queue.running,
        "waiting": queue.waiting,
        "waiting_per_level": queue.waiting_per_level,
        "queue": queue,
        "requests": app.metrics.snapshot(),
        "users": app.users.stats(),
        "breaker": {
            "state": app.handles.breaker.state(),
            "stats": app.handles.breaker.stats(),
        },
        "retries": app.handles.retry.stats(),
        "upstream_rpm": app.handles.rpm.as_ref().map(|h| h.stats()),
        "upstream_tpm": app.handles.tpm.as_ref().map(|h| h.stats()),
        "shared": app.config.redis.as_ref().map(|store| json!({
            "prefix": store.prefix(),
            "queue": app.handles.queue_leases.as_ref().map(|h| h.stats()),
            "users": app.user_leases.as_ref().map(|h| h.stats()),
        })),
    }))
}

/// `GET /api/ai/requests`: this user's requests, waiting or running.
pub async fn list_requests(
    State(app): State<AppState>,
    Extension(user): Extension<UserId>,
) -> Json<Value> {
    let key = user.key();
    let mine: Vec<_> = app
        .handles
        .queue
        .entries()
        .into_iter()
        .filter(|e| e.user.as_ref() == Some(&key))
        .collect();
    Json(json!({ "requests": mine }))
}

/// `DELETE /api/ai/requests/{id}`: cancels one of this user's requests; anybody else's, or an
/// unknown id, is 404.
pub async fn cancel_one(
    State(app): State<AppState>,
    Extension(user): Extension<UserId>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<RequestId>() else {
        return ApiError::bad_request("the request id must be a number")
            .response(ErrorFormat::Plain);
    };
    match app.handles.queue.cancel_owned(id, &user.key()) {
        true => StatusCode::NO_CONTENT.into_response(),
        false => ApiError::not_found(format!("no request {id} of yours is waiting or running"))
            .response(ErrorFormat::Plain),
    }
}

/// `DELETE /api/ai/requests`: cancels all of this user's requests.
pub async fn cancel_all(
    State(app): State<AppState>,
    Extension(user): Extension<UserId>,
) -> Json<Value> {
    let key = user.key();
    let queue = &app.handles.queue;
    let cancelled = queue
        .entries()
        .into_iter()
        .filter(|e| queue.cancel_owned(e.id, &key))
        .count();
    Json(json!({ "cancelled": cancelled }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_read_by_its_fields_is_estimated_as_a_value_is() {
        let deep = format!(
            r#"{{"model": "m", "messages": [], "x": {}{}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        let bodies = [
            r#"{"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 9}"#,
            r#"{"model": "m", "messages": [{"content": "caf\u00e9 \"quoted\"\n"}, {"content": null}, {"role": "system"}]}"#,
            r#"{"model": "m", "messages": [{"content": [{"type": "text", "text": "a  b"}]}, {"content": 1.50}]}"#,
            r#"{"model": "m", "messages": [{"content": "x"}], "max_completion_tokens": 5, "max_tokens": 7}"#,
            r#"{"model": "m", "messages": [{"content": "x"}], "max_completion_tokens": 5.0, "max_tokens": 7}"#,
            r#"{"model": "m", "messages": [{"content": "x"}], "max_tokens": -1}"#,
            r#"{"model": "m", "messages": [{"content": "x"}], "max_tokens": "12"}"#,
            r#"{"model": "m", "messages": ["not an object"]}"#,
            r#"{"model": "m", "messages": [{"content": "a", "content": "bb"}]}"#,
            r#"{"model": null, "messages": [{"content": "x"}]}"#,
            r#"{"messages": [{"content": "x"}]}"#,
            r#"{"model": "m", "messages": []}"#,
            r#"{"model": "m", "messages": {"0": {"content": "x"}}}"#,
            r#"{"model": "m"}"#,
            r#"[1, 2]"#,
            r#"{not json"#,
            &deep,
        ];
        for body in bodies {
            let by_value = serde_json::from_str::<Value>(body)
                .ok()
                .filter(|v| v["messages"].as_array().is_some_and(|m| !m.is_empty()))
                .map(|v| estimate(&v, 99));
            match estimate_of_text(body.as_bytes(), 99) {
                Some(Ok(by_fields)) => assert_eq!(Some(by_fields), by_value, "{body}"),
                Some(Err(_)) => assert_eq!(by_value, None, "{body}"),
                None => {}
            }
        }
        let plain = bodies[0].as_bytes();
        assert_eq!(
            estimate_of_text(plain, 99),
            Some(Ok(Estimate {
                prompt: 2,
                max_reply: 9
            }))
        );
        assert_eq!(
            estimate_of_text(bodies[10].as_bytes(), 99),
            None,
            "no model"
        );
        assert_eq!(estimate_of_text(deep.as_bytes(), 99), None, "deep");
    }
}
