//! The OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`.

use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::chat::{header_user, json as json_response, openai_error, refusal_message, respond};
use super::chat::{Dialect, Reply};
use super::state::{Api, Failure, Incoming, Limit, Midway, MockHandle, Refusal};
use super::stream::Pace;
use super::MODEL;

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<Message>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    user: Option<String>,
    response_format: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a string, or parts of which the text ones count.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

impl Message {
    /// The text of the message: its string, or its text parts joined by newlines.
    fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// A request that passed validation.
struct Valid {
    model: String,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
    user: Option<String>,
    contents: Vec<String>,
    prompt: String,
    /// The labels of a structured-output request whose schema has an enum `label`.
    labels: Option<Vec<String>>,
}

/// A 400 in OpenAI's words.
struct Invalid {
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl Invalid {
    fn new(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: Option<&'static str>,
    ) -> Self {
        Invalid {
            message: message.into(),
            param,
            code,
        }
    }
}

fn validate(value: Value) -> Result<Valid, Invalid> {
    let request: ChatRequest = serde_json::from_value(value)
        .map_err(|e| Invalid::new(format!("Invalid request body: {e}."), None, None))?;
    let model = match request.model {
        Some(model) if !model.trim().is_empty() => model,
        _ => {
            return Err(Invalid::new(
                "Missing required parameter: 'model'.",
                Some("model"),
                Some("missing_required_parameter"),
            ))
        }
    };
    let messages = request.messages.ok_or_else(|| {
        Invalid::new(
            "Missing required parameter: 'messages'.",
            Some("messages"),
            Some("missing_required_parameter"),
        )
    })?;
    if messages.is_empty() {
        return Err(Invalid::new(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            Some("messages"),
            Some("empty_array"),
        ));
    }
    let max_tokens = match (request.max_completion_tokens, request.max_tokens) {
        (Some(0), _) => {
            return Err(Invalid::new(
                "Invalid 'max_completion_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
                Some("max_completion_tokens"),
                Some("integer_below_min_value"),
            ))
        }
        (None, Some(0)) => {
            return Err(Invalid::new(
                "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
                Some("max_tokens"),
                Some("integer_below_min_value"),
            ))
        }
        (Some(n), _) | (None, Some(n)) => Some(n),
        (None, None) => None,
    };
    let contents: Vec<String> = messages.iter().map(Message::text).collect();
    let prompt = messages
        .iter()
        .rposition(|m| m.role == "user")
        .or(messages.len().checked_sub(1))
        .and_then(|i| contents.get(i))
        .cloned()
        .unwrap_or_default();
    let labels = request.response_format.as_ref().and_then(schema_labels);
    Ok(Valid {
        labels,
        model,
        stream: request.stream.unwrap_or(false),
        include_usage: request
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        max_tokens,
        user: request.user.filter(|u| !u.trim().is_empty()),
        contents,
        prompt,
    })
}

/// The enum of the `label` property of a `json_schema` response format:
/// `{"type": "json_schema", "json_schema": {"schema": {"properties": {"label": {"enum": [...]}}}}}`.
fn schema_labels(format: &Value) -> Option<Vec<String>> {
    if format.get("type")?.as_str()? != "json_schema" {
        return None;
    }
    let labels: Vec<String> = format
        .pointer("/json_schema/schema/properties/label/enum")?
        .as_array()?
        .iter()
        .filter_map(|label| label.as_str().map(str::to_owned))
        .collect();
    (!labels.is_empty()).then_some(labels)
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(handle): State<MockHandle>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let invalid = |stream: bool, error: Invalid| {
        let user = header_user(&headers).unwrap_or_else(|| "anonymous".to_owned());
        handle.invalid(Api::OpenAi, stream, user, 400);
        let body = openai_error(
            &error.message,
            "invalid_request_error",
            error.param,
            error.code,
        );
        json_response(StatusCode::BAD_REQUEST, &body)
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => {
            let message = format!(
                "We could not parse the JSON body of your request: {e}. The OpenAI API expects a JSON payload."
            );
            return invalid(false, Invalid::new(message, None, None));
        }
    };
    let stream = value
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let request = match validate(value) {
        Ok(request) => request,
        Err(error) => return invalid(stream, error),
    };
    let contents = request.contents.iter().map(String::as_str);
    let reply = match &request.labels {
        Some(labels) => Reply::classified(&request.prompt, labels, contents),
        None => Reply::new(&request.prompt, contents, request.max_tokens),
    };
    let user = request
        .user
        .clone()
        .or_else(|| header_user(&headers))
        .unwrap_or_else(|| "anonymous".to_owned());
    let incoming = Incoming {
        api: Api::OpenAi,
        stream: request.stream,
        user,
        prompt_tokens: reply.prompt_tokens,
        completion_tokens: reply.completion_tokens(),
    };
    let dialect = OpenAi {
        id: next_id(),
        model: request.model,
        include_usage: request.include_usage,
    };
    respond(&handle, &dialect, incoming, reply).await
}

/// A reply id, unique within the process.
fn next_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("chatcmpl-mock-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `GET /v1/models`.
pub(crate) async fn models() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [{ "id": MODEL, "object": "model", "created": 0, "owned_by": "tower-llm-queue" }]
        }),
    )
}

struct OpenAi {
    id: String,
    model: String,
    include_usage: bool,
}

impl OpenAi {
    fn usage(reply: &Reply) -> Value {
        let completion = reply.completion_tokens();
        json!({
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": reply.prompt_tokens.saturating_add(completion),
        })
    }

    fn chunk(&self, pace: &Pace, delta: Value, finish_reason: Option<&str>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": pace.created(),
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }
}

/// One server-sent event carrying `value`.
fn event(value: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend(serde_json::to_vec(value).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

impl Dialect for OpenAi {
    const STREAM_TYPE: &'static str = "text/event-stream";

    fn refused(&self, refusal: &Refusal) -> Value {
        let kind = match refusal.limit {
            Limit::Tokens => "tokens",
            Limit::Requests | Limit::Concurrency => "requests",
        };
        openai_error(
            &refusal_message(refusal),
            kind,
            None,
            Some("rate_limit_exceeded"),
        )
    }

    fn failed(&self, failure: Failure) -> Value {
        match failure {
            Failure::Overloaded529 => json!({
                "type": "error",
                "error": { "type": "overloaded_error", "message": "Overloaded" }
            }),
            Failure::Error503 => openai_error(
                "The engine is currently overloaded, please try again later.",
                "server_error",
                None,
                None,
            ),
            Failure::Error500 | Failure::CutStream | Failure::ErrorEvent => openai_error(
                "The server had an error while processing your request.",
                "server_error",
                None,
                None,
            ),
        }
    }

    fn stream(
        &self,
        reply: &Reply,
        pace: &Pace,
        sent: usize,
        midway: Option<Midway>,
    ) -> Vec<(Instant, Bytes)> {
        let mut frames = Vec::with_capacity(sent + 3);
        for (i, token) in reply.tokens.iter().take(sent).enumerate() {
            let delta = if i == 0 {
                json!({ "role": "assistant", "content": token })
            } else {
                json!({ "content": token })
            };
            frames.push((pace.due(i), event(&self.chunk(pace, delta, None))));
        }
        match midway {
            None => {
                let end = pace.due(reply.tokens.len().saturating_sub(1));
                let last = self.chunk(pace, json!({}), Some(reply.finish_reason));
                frames.push((end, event(&last)));
                if self.include_usage {
                    let usage = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": pace.created(),
                        "model": self.model,
                        "system_fingerprint": null,
                        "choices": [],
                        "usage": Self::usage(reply),
                    });
                    frames.push((end, event(&usage)));
                }
                frames.push((end, Bytes::from_static(b"data: [DONE]\n\n")));
            }
            Some(Midway::ErrorEvent) => {
                let error = openai_error(
                    "The server had an error while processing your request.",
                    "server_error",
                    None,
                    None,
                );
                frames.push((pace.due(sent), event(&error)));
            }
            Some(Midway::Cut) => {}
        }
        frames
    }

    fn whole(&self, reply: &Reply, pace: &Pace) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": pace.created(),
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": reply.text(), "refusal": null },
                "logprobs": null,
                "finish_reason": reply.finish_reason,
            }],
            "usage": Self::usage(reply),
        })
    }
}
