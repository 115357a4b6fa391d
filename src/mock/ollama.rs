//! The Ollama-compatible API: `POST /api/chat` and `GET /api/tags`.

use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::chat::{header_user, json as json_response, nanos, refusal_message, respond};
use super::chat::{Dialect, Reply};
use super::state::{Api, Failure, Incoming, Midway, MockHandle, Refusal};
use super::stream::Pace;
use super::MODEL;

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<Message>>,
    stream: Option<bool>,
    options: Option<Options>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Options {
    num_predict: Option<i64>,
}

/// `{"error": message}`, Ollama's error body.
fn error(message: &str) -> Value {
    json!({ "error": message })
}

/// `POST /api/chat`. Streams by default; `options.num_predict` above 0 truncates the reply.
pub(crate) async fn chat(
    State(handle): State<MockHandle>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let user = header_user(&headers).unwrap_or_else(|| "anonymous".to_owned());
    let invalid = |stream: bool, message: String| {
        handle.invalid(Api::Ollama, stream, user.clone(), 400);
        json_response(StatusCode::BAD_REQUEST, &error(&message))
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => return invalid(true, format!("invalid JSON body: {e}")),
    };
    let stream = value.get("stream").and_then(Value::as_bool).unwrap_or(true);
    let request: ChatRequest = match serde_json::from_value(value) {
        Ok(request) => request,
        Err(e) => return invalid(stream, format!("invalid request: {e}")),
    };
    let model = match request.model {
        Some(model) if !model.trim().is_empty() => model,
        _ => return invalid(stream, "model is required".to_owned()),
    };
    let messages = match request.messages {
        Some(messages) if !messages.is_empty() => messages,
        _ => return invalid(stream, "messages must hold at least one message".to_owned()),
    };
    let contents: Vec<&str> = messages
        .iter()
        .map(|m| m.content.as_deref().unwrap_or(""))
        .collect();
    let prompt = messages
        .iter()
        .rposition(|m| m.role == "user")
        .or(messages.len().checked_sub(1))
        .and_then(|i| contents.get(i).copied())
        .unwrap_or("");
    let max_tokens = request
        .options
        .and_then(|o| o.num_predict)
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0);
    let reply = Reply::new(prompt, contents.iter().copied(), max_tokens);
    let incoming = Incoming {
        api: Api::Ollama,
        stream: request.stream.unwrap_or(true),
        user: user.clone(),
        prompt_tokens: reply.prompt_tokens,
        completion_tokens: reply.completion_tokens(),
    };
    respond(&handle, &Ollama { model }, incoming, reply).await
}

/// `GET /api/tags`: the models, as Ollama lists them.
pub(crate) async fn tags() -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "models": [{ "name": MODEL, "model": MODEL, "size": 0, "digest": "" }] }),
    )
}

struct Ollama {
    model: String,
}

fn timestamp(pace: &Pace, at: Instant) -> String {
    let wall = pace.wall(at).max(std::time::UNIX_EPOCH);
    humantime::format_rfc3339_nanos(wall).to_string()
}

fn line(value: &Value) -> Bytes {
    let mut out = serde_json::to_vec(value).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

impl Ollama {
    /// The closing object: the counts and durations of the reply.
    fn done(&self, reply: &Reply, pace: &Pace, content: String) -> Value {
        let first = pace.due(0);
        let end = pace.due(reply.tokens.len().saturating_sub(1));
        json!({
            "model": self.model,
            "created_at": timestamp(pace, end),
            "message": { "role": "assistant", "content": content },
            "done_reason": reply.finish_reason,
            "done": true,
            "total_duration": nanos(pace.since_arrival(end)),
            "load_duration": 0,
            "prompt_eval_count": reply.prompt_tokens,
            "prompt_eval_duration": nanos(pace.since_arrival(first)),
            "eval_count": reply.completion_tokens(),
            "eval_duration": nanos(end.saturating_duration_since(first)),
        })
    }
}

impl Dialect for Ollama {
    const STREAM_TYPE: &'static str = "application/x-ndjson";

    fn refused(&self, refusal: &Refusal) -> Value {
        error(&refusal_message(refusal))
    }

    fn failed(&self, failure: Failure) -> Value {
        match failure {
            Failure::Overloaded529 => error("server overloaded, please retry later"),
            Failure::Error503 => error("server busy, please try again later"),
            Failure::Error500 | Failure::CutStream | Failure::ErrorEvent => {
                error("an error was encountered while running the model")
            }
        }
    }

    fn stream(
        &self,
        reply: &Reply,
        pace: &Pace,
        sent: usize,
        midway: Option<Midway>,
    ) -> Vec<(Instant, Bytes)> {
        let mut frames = Vec::with_capacity(sent + 1);
        for (i, token) in reply.tokens.iter().take(sent).enumerate() {
            let due = pace.due(i);
            let chunk = json!({
                "model": self.model,
                "created_at": timestamp(pace, due),
                "message": { "role": "assistant", "content": token },
                "done": false,
            });
            frames.push((due, line(&chunk)));
        }
        match midway {
            None => {
                let end = pace.due(reply.tokens.len().saturating_sub(1));
                frames.push((end, line(&self.done(reply, pace, String::new()))));
            }
            Some(Midway::ErrorEvent) => {
                let failed = self.failed(Failure::ErrorEvent);
                frames.push((pace.due(sent), line(&failed)));
            }
            Some(Midway::Cut) => {}
        }
        frames
    }

    fn whole(&self, reply: &Reply, pace: &Pace) -> Value {
        self.done(reply, pace, reply.text())
    }
}
