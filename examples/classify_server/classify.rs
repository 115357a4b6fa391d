//! Classification by the upstream LLM, shared by the HTTP and gRPC APIs: one queue of workers,
//! and seed 004's metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_llm_queue::priority_queue::RequestIdExtension;
use tower_llm_queue::{PriorityQueueHandle, PriorityQueueLayer, RequestId};
use tower_llm_queue_servers::upstream::{boxed, Level, Llm, UpstreamClient, UpstreamRequest};

use super::config::ClassifyConfig;

/// The level of a single classification.
pub const CLASSIFY: Level = Level(3);
/// The level of the items of a batch: after single classifications that wait.
pub const BATCH: Level = Level(4);

/// What a classification found, and what it took.
#[derive(Debug, Clone, Serialize)]
pub struct Classification {
    /// One of the configured labels.
    pub label: String,
    /// How sure the upstream was, 0 to 1.
    pub confidence: f64,
    /// The id the queue knew it by.
    pub request_id: RequestId,
    /// Time spent waiting for a worker, in milliseconds.
    pub queue_wait_ms: f64,
    /// Time the upstream took, in milliseconds.
    pub processing_ms: f64,
}

/// A text that cannot be classified as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

/// The instant a worker took an item, recorded by the layer inside the queue.
#[derive(Debug, Clone, Default)]
struct Started(Arc<OnceLock<Instant>>);

/// Seed 004's queue metrics, for `/queue/health`.
#[derive(Debug, Default)]
pub struct Metrics {
    total: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    /// Summed waits and processing times of processed items, in microseconds.
    waited_us: AtomicU64,
    processing_us: AtomicU64,
    last_updated: Mutex<Option<SystemTime>>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Metrics {
    fn ended(&self, outcome: Option<(Duration, Duration)>) {
        match outcome {
            Some((waited, processing)) => {
                self.processed.fetch_add(1, Relaxed);
                self.waited_us.fetch_add(micros(waited), Relaxed);
                self.processing_us.fetch_add(micros(processing), Relaxed);
            }
            None => {
                self.failed.fetch_add(1, Relaxed);
            }
        }
        *self.last_updated.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
    }
}

/// Classifies texts through the queue of workers.
#[derive(Debug, Clone)]
pub struct Classifier {
    llm: Llm,
    queue: PriorityQueueHandle,
    labels: Arc<[String]>,
    model: Arc<str>,
    max_text_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Classifier {
    /// The workers' queue around `client`: `WORKERS` upstream calls at once, `QUEUE_SIZE`
    /// waiting, single classifications before batch items, each slot held until the upstream's
    /// answer has been read whole (none with `LAYERS=off`).
    pub fn new(config: &ClassifyConfig, client: UpstreamClient, model: &str) -> Self {
        let queue = PriorityQueueLayer::new(config.workers as usize)
            .capacity(config.queue_size as usize)
            .queue_timeout(config.request_timeout)
            .priority(Level::of)
            .request_id(RequestIdExtension)
            .hold_until_body_end();
        let handle = queue.handle();
        let stamped = ServiceBuilder::new()
            .map_request(|request: UpstreamRequest| {
                if let Some(Started(at)) = request.extensions().get::<Started>() {
                    let _ = at.set(Instant::now());
                }
                request
            })
            .service(client);
        let llm = match config.layers {
            true => boxed(queue.layer(stamped)),
            false => boxed(stamped),
        };
        Classifier {
            llm,
            queue: handle,
            labels: config.labels.iter().cloned().collect(),
            model: model.into(),
            max_text_bytes: config.max_text_bytes as usize,
            metrics: Arc::default(),
        }
    }

    /// The queue's handle.
    pub fn queue(&self) -> &PriorityQueueHandle {
        &self.queue
    }

    /// Seed 004's metrics: total, processed and failed items, average wait and processing
    /// times, active workers, items waiting, and when they last changed.
    pub fn queue_health(&self) -> Value {
        let m = &self.metrics;
        let processed = m.processed.load(Relaxed);
        let average = |us: &AtomicU64| match processed {
            0 => 0.0,
            n => us.load(Relaxed) as f64 / n as f64 / 1000.0,
        };
        let stats = self.queue.stats();
        let last_updated = m
            .last_updated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| humantime::format_rfc3339_millis(at).to_string());
        json!({
            "total_requests": m.total.load(Relaxed),
            "processed_requests": processed,
            "failed_requests": m.failed.load(Relaxed),
            "average_wait_time_ms": average(&m.waited_us),
            "average_process_time_ms": average(&m.processing_us),
            "active_workers": stats.running,
            "queue_size": stats.waiting,
            "last_updated": last_updated,
        })
    }

    /// Checks a text before it costs a queue place.
    pub fn check(&self, text: &str) -> Result<(), Invalid> {
        if text.trim().is_empty() {
            return Err(Invalid("`text` is empty".into()));
        }
        if text.len() > self.max_text_bytes {
            return Err(Invalid(format!(
                "`text` is longer than {} bytes",
                self.max_text_bytes
            )));
        }
        Ok(())
    }

    /// Classifies one checked text at `level`.
    pub async fn classify(&self, text: &str, level: Level) -> Result<Classification, BoxError> {
        self.metrics.total.fetch_add(1, Relaxed);
        let asked = Instant::now();
        let started = Started::default();
        let id = RequestId::next();
        let request = self.request(text, level, id, started.clone());
        let result = self.call(request).await;
        let ended = Instant::now();
        let start = started.0.get().copied().unwrap_or(ended);
        let (waited, processing) = (start - asked, ended - start);
        self.metrics
            .ended(result.is_ok().then_some((waited, processing)));
        let (label, confidence) = result?;
        Ok(Classification {
            label,
            confidence,
            request_id: id,
            queue_wait_ms: waited.as_secs_f64() * 1000.0,
            processing_ms: processing.as_secs_f64() * 1000.0,
        })
    }

    fn request(
        &self,
        text: &str,
        level: Level,
        id: RequestId,
        started: Started,
    ) -> UpstreamRequest {
        let body = json!({
            "model": &*self.model,
            "messages": [
                {"role": "system", "content": format!(
                    "Classify the user's text as one of: {}. Answer with JSON.",
                    self.labels.join(", ")
                )},
                {"role": "user", "content": text},
            ],
            "max_tokens": 64,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "classification",
                    "strict": true,
                    "schema": {
                        "type": "object",
                        "properties": {
                            "label": {"type": "string", "enum": &*self.labels},
                            "confidence": {"type": "number"},
                        },
                        "required": ["label", "confidence"],
                        "additionalProperties": false,
                    },
                },
            },
        });
        let mut request = http::Request::post("/chat/completions")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_default();
        let extensions = request.extensions_mut();
        extensions.insert(level);
        extensions.insert(id);
        extensions.insert(started);
        request
    }

    async fn call(&self, request: UpstreamRequest) -> Result<(String, f64), BoxError> {
        let response = self.llm.clone().oneshot(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(format!("the upstream answered {status}").into());
        }
        let reply: Value = serde_json::from_slice(&body)?;
        let content = reply
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or("the upstream's reply has no content")?;
        let answer: Value = serde_json::from_str(content)?;
        let label = answer["label"].as_str().unwrap_or_default();
        if !self.labels.iter().any(|l| l == label) {
            return Err(format!("the upstream answered an unknown label {label:?}").into());
        }
        let confidence = answer["confidence"].as_f64().unwrap_or(0.0).clamp(0.0, 1.0);
        Ok((label.to_string(), confidence))
    }
}
