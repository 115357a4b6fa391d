//! The layers around the upstream client: every attempt to call the LLM passes through them.
//!
//! ```text
//! retry ─ breaker ─ queue ─ requests/min ─ tokens/min ─ first token ─ client
//! ```
//!
//! * Retry outermost: a retry sleeps holding nothing, and honours the upstream's `Retry-After`
//!   for everybody (the shared cool-down); a wait beyond 10 s is the user's to decide, with the
//!   refusal and its `Retry-After`.
//! * The breaker counts every attempt, so an upstream that is down opens it after a few, and
//!   then everybody is told at once.
//! * The queue: `MAX_CONCURRENT_CHATS` calls at once, chat before background work, users taking
//!   turns; each holds its slot until its reply has streamed to the end.
//! * The upstream's quota, inside the queue, so that the queue's order decides who spends it:
//!   requests per minute, and tokens per minute — an estimate reserved up front, corrected by the
//!   usage the upstream reports at the end of the stream.
//! * The first token: a stream that fails before any text is an error the retry layer retries.
//!
//! With `REDIS_URL`, the queue's concurrency and the quota hold for every instance on the same
//! Redis and prefix: each instance keeps its own queue, order and fairness, and a call it admits
//! also takes one of the slots leased in Redis.

use std::sync::Arc;
use std::time::Duration;

use tower::{Layer, ServiceBuilder};
use tower_llm_queue::circuit_breaker::{CircuitBreakerHandle, Window};
use tower_llm_queue::classify::HttpClassifier;
use tower_llm_queue::key::ExtensionKey;
use tower_llm_queue::lease::LeaseHandle;
use tower_llm_queue::priority_queue::RequestIdExtension;
use tower_llm_queue::rate::{MeterBody, RateHandle};
use tower_llm_queue::retry::{Backoff, Jitter, RetryHandle};
use tower_llm_queue::{
    CircuitBreakerLayer, PriorityQueueHandle, PriorityQueueLayer, RetryBackoffLayer,
    SlidingWindowLayer,
};
use tower_llm_queue_servers::upstream::{
    boxed, FirstTokenLayer, Level, Llm, UpstreamClient, UpstreamRequest, UsageMeter,
};

use super::config::ChatConfig;
use super::metrics::Metrics;
use super::user::UserId;

/// The level of what someone waits for: a chat message, a gateway call.
pub const INTERACTIVE: Level = Level(1);

/// The level of background work: summaries.
pub const BACKGROUND: Level = Level(3);

/// What a request is estimated to cost against the tokens-per-minute quota before the upstream
/// says: its prompt, plus the longest reply it may get. Set by the handler that builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Tokens of the prompt, estimated.
    pub prompt: u64,
    /// The longest reply asked for.
    pub max_reply: u64,
}

/// Reads and controls the layers.
#[derive(Debug, Clone)]
pub struct Handles {
    /// The queue of upstream calls.
    pub queue: PriorityQueueHandle,
    /// Its slots shared with the other instances, with Redis.
    pub queue_leases: Option<LeaseHandle>,
    /// The breaker in front of the upstream.
    pub breaker: CircuitBreakerHandle,
    /// The retries.
    pub retry: RetryHandle,
    /// The upstream's requests-per-minute quota, when set.
    pub rpm: Option<RateHandle>,
    /// The upstream's tokens-per-minute quota, when set.
    pub tpm: Option<RateHandle>,
}

/// Builds the upstream stack around `client`.
pub fn upstream(
    config: &ChatConfig,
    client: UpstreamClient,
    metrics: Arc<Metrics>,
) -> (Llm, Handles) {
    let counted = ServiceBuilder::new()
        .map_response(move |response: http::Response<_>| {
            metrics.upstream_answered(response.status());
            response
        })
        .layer(FirstTokenLayer)
        .service(client);

    // The upstream's quota; without one configured, no layer at all. The window is a second
    // longer than the upstream's minute: a request's decision here and its arrival there are
    // apart by a network trip, which differs from one request to the next.
    let window = Duration::from_secs(61);
    let max_wait = config.chat_timeout;
    let tpm = config.upstream_tpm.map(|tpm| {
        SlidingWindowLayer::new(tpm, window)
            .cost(|request: &UpstreamRequest| {
                request
                    .extensions()
                    .get::<Estimate>()
                    .map_or(1, |e| e.prompt + e.max_reply)
            })
            .reconcile(MeterBody::new(|request: &UpstreamRequest| {
                let prompt = request
                    .extensions()
                    .get::<Estimate>()
                    .map_or(0, |e| e.prompt);
                UsageMeter::new(prompt)
            }))
            .wait(max_wait)
    });
    let rpm = config
        .upstream_rpm
        .map(|rpm| SlidingWindowLayer::new(rpm, window).wait(max_wait));
    // With Redis, the quota is the upstream's for every instance together.
    let (tpm, rpm) = match &config.redis {
        Some(store) => (
            tpm.map(|layer| layer.store(store.scope("upstream-tpm"))),
            rpm.map(|layer| layer.store(store.scope("upstream-rpm"))),
        ),
        None => (tpm, rpm),
    };
    let tpm_handle = tpm.as_ref().map(|l| l.handle());
    let rpm_handle = rpm.as_ref().map(|l| l.handle());
    let metered = match tpm {
        Some(layer) => boxed(layer.layer(counted)),
        None => boxed(counted),
    };
    let quota = match rpm {
        Some(layer) => boxed(layer.layer(metered)),
        None => metered,
    };

    let queue = PriorityQueueLayer::new(config.max_concurrent_chats as usize)
        .capacity(config.queue_capacity as usize)
        .queue_timeout(config.chat_timeout)
        .priority(|request: &UpstreamRequest| {
            request
                .extensions()
                .get::<Level>()
                .map_or(5, |level| level.0)
        })
        .fair_by(ExtensionKey::<UserId>::new())
        .request_id(RequestIdExtension)
        .hold_until_body_end();
    let breaker = CircuitBreakerLayer::new()
        .classify(HttpClassifier)
        .minimum_calls(5)
        .window(Window::Time(Duration::from_secs(30)))
        .open_for(config.breaker_open_for);
    // A wait longer than 10 s is not worth holding a chat open for: the user gets the refusal
    // with its `Retry-After` instead.
    let retry = RetryBackoffLayer::new(config.retry_attempts)
        .classify(HttpClassifier)
        .max_retry_after(Duration::from_secs(10))
        .backoff(
            Backoff::exponential(Duration::from_millis(500), 2.0, Duration::from_secs(8))
                .jitter(Jitter::Full),
        );
    // With Redis, MAX_CONCURRENT_CHATS holds for every instance together: a call this
    // instance's queue admits also takes one of the slots leased there.
    let (queued, queue_leases) = match &config.redis {
        Some(store) => {
            let queue = queue.clone().store(store.scope("queue"));
            let leases = queue.lease_handle();
            (boxed(queue.layer(quota)), Some(leases))
        }
        None => (boxed(queue.layer(quota)), None),
    };
    let handles = Handles {
        queue: queue.handle(),
        queue_leases,
        breaker: breaker.handle(),
        retry: retry.handle(),
        rpm: rpm_handle,
        tpm: tpm_handle,
    };
    let llm = boxed(
        ServiceBuilder::new()
            .layer(retry)
            .layer(breaker)
            .service(queued),
    );
    (llm, handles)
}
