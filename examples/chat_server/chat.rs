//! One chat reply, relayed from the upstream to the browser as it streams, with the request's
//! place in the queue while it waits.

use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_llm_queue::classify::response_delay;
use tower_llm_queue::http::ErrorFormat;
use tower_llm_queue::{Rejected, RejectionKind, RequestId};
use tower_llm_queue_servers::upstream::sse::{Event, SseParser};

use super::app::AppState;
use super::errors::{failure, ApiError};
use super::metrics::Ending;
use tower_llm_queue_servers::upstream::UpstreamRequest;

/// What the browser is told about its request, one server-sent event each.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// First, and while it waits: the request's id and its place in the queue (0: next), or
    /// `None` when it is not in the queue (running, or about to enter it).
    Queued {
        /// The request's id, for a cancel.
        id: RequestId,
        /// Its conversation, as the client named it.
        conversation_id: Option<String>,
        /// Its place.
        position: Option<usize>,
    },
    /// The reply begins.
    Started,
    /// Text of the reply.
    Token(String),
    /// The reply is complete.
    Done {
        /// Tokens of the prompt and of the reply, as the upstream counted them.
        usage: Option<(u64, u64)>,
    },
    /// The request failed or was refused: an HTTP status, a short code, a message and, when
    /// known, when to try again.
    Error {
        /// The status an HTTP answer would have had.
        status: u16,
        /// A short name, as in the JSON errors.
        code: String,
        /// What happened.
        message: String,
        /// When to try again, if known.
        retry_after_ms: Option<u64>,
    },
}

impl Update {
    /// The event's data.
    pub fn to_json(&self) -> Value {
        match self {
            Update::Queued {
                id,
                conversation_id,
                position,
            } => json!({
                "type": "queued", "id": id, "conversation_id": conversation_id, "position": position,
            }),
            Update::Started => json!({"type": "started"}),
            Update::Token(text) => json!({"type": "token", "text": text}),
            Update::Done { usage } => json!({
                "type": "done",
                "usage": usage.map(|(p, c)| json!({"prompt_tokens": p, "completion_tokens": c})),
            }),
            Update::Error {
                status,
                code,
                message,
                retry_after_ms,
            } => json!({
                "type": "error", "status": status, "error": code, "message": message,
                "retry_after_ms": retry_after_ms,
            }),
        }
    }
}

/// The update for an error of the layers or the upstream, as an HTTP answer would have said it.
async fn error_update(err: &tower::BoxError) -> Update {
    let response = failure(err, ErrorFormat::Plain);
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    Update::Error {
        status,
        code: body["error"].as_str().unwrap_or("internal").to_string(),
        message: body["message"].as_str().unwrap_or_default().to_string(),
        retry_after_ms: body["retry_after_ms"].as_u64(),
    }
}

fn ending_of(err: &tower::BoxError) -> Ending {
    match Rejected::find(&**err).map(Rejected::kind) {
        Some(RejectionKind::Cancelled) => Ending::Cancelled,
        Some(_) => Ending::Rejected,
        None => Ending::Failed,
    }
}

/// How often a waiting request's place is looked up.
const POSITION_EVERY: Duration = Duration::from_millis(250);

/// Calls the upstream for one chat message and relays what happens to `tx`, until the reply
/// ends, fails, runs out of time, or the browser goes away (`tx` closed) — which drops the
/// upstream call at once and frees its slots.
pub async fn relay(
    app: AppState,
    id: RequestId,
    conversation_id: Option<String>,
    request: UpstreamRequest,
    tx: mpsc::Sender<Update>,
) {
    let deadline = Instant::now() + app.config.chat_timeout;
    let asked = Instant::now();
    let relayed = tokio::time::timeout_at(
        deadline,
        relay_until_done(&app, id, conversation_id, request, &tx, asked),
    )
    .await;
    let (ending, started) = match relayed {
        Ok(Some(outcome)) => outcome,
        Ok(None) => (Ending::Cancelled, None),
        Err(_) => {
            let timeout = Update::Error {
                status: 504,
                code: "timeout".into(),
                message: format!(
                    "no complete reply within {} s",
                    app.config.chat_timeout.as_secs()
                ),
                retry_after_ms: None,
            };
            let _ = tx.send(timeout).await;
            (Ending::Failed, None)
        }
    };
    app.metrics
        .ended(ending, started.map(|s: Instant| s.elapsed()));
}

/// Relays one reply; `None` if the browser went away, otherwise how it ended and when the
/// reply started.
async fn relay_until_done(
    app: &AppState,
    id: RequestId,
    conversation_id: Option<String>,
    request: UpstreamRequest,
    tx: &mpsc::Sender<Update>,
    asked: Instant,
) -> Option<(Ending, Option<Instant>)> {
    let mut call = app.llm.clone().oneshot(request);
    let mut ticks = tokio::time::interval(POSITION_EVERY);
    let mut told: Option<Option<usize>> = None;
    let answer = loop {
        tokio::select! {
            biased;
            answer = &mut call => break answer,
            _ = ticks.tick() => {
                let position = app.handles.queue.position(id);
                if told != Some(position) {
                    told = Some(position);
                    let update = Update::Queued {
                        id,
                        conversation_id: conversation_id.clone(),
                        position,
                    };
                    tx.send(update).await.ok()?;
                }
            }
            _ = tx.closed() => return None,
        }
    };
    if told.is_none() {
        let update = Update::Queued {
            id,
            conversation_id,
            position: None,
        };
        tx.send(update).await.ok()?;
    }
    let response = match answer {
        Ok(response) => response,
        Err(err) => {
            tx.send(error_update(&err).await).await.ok()?;
            return Some((ending_of(&err), None));
        }
    };
    let started = Instant::now();
    app.metrics
        .started(started - asked, app.handles.queue.stats().running);
    if !response.status().is_success() {
        let status = response.status();
        let retry_after_ms = response_delay(&response).map(|d| d.as_millis() as u64);
        let body = response.into_body().collect().await.map(|c| c.to_bytes());
        let failed = ApiError::upstream(status, &body.unwrap_or_default());
        let update = Update::Error {
            status: failed.status().as_u16(),
            code: "upstream_error".into(),
            message: failed.message().to_string(),
            retry_after_ms,
        };
        tx.send(update).await.ok()?;
        return Some((Ending::Failed, Some(started)));
    }
    tx.send(Update::Started).await.ok()?;
    let ending = stream_reply(response.into_body(), tx).await?;
    Some((ending, Some(started)))
}

/// Forwards the reply's text; `None` if the browser went away.
async fn stream_reply(mut body: Body, tx: &mpsc::Sender<Update>) -> Option<Ending> {
    let mut parser = SseParser::new();
    let mut usage = None;
    loop {
        let frame = tokio::select! {
            biased;
            _ = tx.closed() => return None,
            frame = body.frame() => frame,
        };
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(err)) => {
                let update = error_update(&err.into_inner()).await;
                let ending = match &update {
                    Update::Error { code, .. } if code == "cancelled" => Ending::Cancelled,
                    _ => Ending::Failed,
                };
                let update = match update {
                    Update::Error { code, .. } if code == "internal" => Update::Error {
                        status: 502,
                        code: "upstream_error".into(),
                        message: "the upstream's reply was cut off".into(),
                        retry_after_ms: None,
                    },
                    other => other,
                };
                tx.send(update).await.ok()?;
                return Some(ending);
            }
        };
        let mut events = Vec::new();
        parser.push(&data, |event| events.push(event));
        for event in events {
            match event {
                Event::Delta(text) => tx.send(Update::Token(text)).await.ok()?,
                Event::Usage { prompt, completion } => usage = Some((prompt, completion)),
                Event::Error(message) => {
                    let update = Update::Error {
                        status: 502,
                        code: "upstream_error".into(),
                        message: format!("the upstream failed mid-reply: {message}"),
                        retry_after_ms: None,
                    };
                    tx.send(update).await.ok()?;
                    return Some(Ending::Failed);
                }
                Event::Done => {}
            }
        }
    }
    tx.send(Update::Done { usage }).await.ok()?;
    Some(Ending::Completed)
}
