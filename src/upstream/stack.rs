//! The layers around the upstream client: every attempt to call the LLM passes through them.
//! The chat server's gateway and the load harness's `ours` target build the same stack here.
//!
//! ```text
//! retry ─ breaker ─ queue ─ (pace) ─ requests/window ─ tokens/window ─ first token ─ client
//! ```
//!
//! * Retry outermost: a retry sleeps holding nothing, and honours the upstream's `Retry-After`
//!   for everybody (the shared cool-down); a wait beyond [`StackConfig::max_retry_after`] is the
//!   caller's to decide, with the refusal and its `Retry-After`.
//! * The breaker counts every attempt, so an upstream that is down opens it after a few, and
//!   then everybody is told at once.
//! * The queue: [`StackConfig::concurrency`] calls at once, by [`Level`], users taking turns
//!   (by the [`UserId`] extension); each holds its slot until its reply has streamed to the end.
//! * The upstream's quota, inside the queue, so that the queue's order decides who spends it:
//!   requests per window, and tokens per window — an [`Estimate`] reserved up front, corrected
//!   by the usage the upstream reports at the end of the stream ([`UsageMeter`]); optionally
//!   paced by token buckets at the same rates ([`StackConfig::pace`]), so that under sustained
//!   excess starts spread over the window instead of bunching at its start.
//! * The first token: a stream that fails before any text is an error the retry layer retries.

use std::time::Duration;

use axum::body::Body;
use tower::util::Either;
use tower::{BoxError, Layer, ServiceBuilder};
use tower_llm_queue::circuit_breaker::{CircuitBreakerHandle, Window};
use tower_llm_queue::classify::HttpClassifier;
use tower_llm_queue::key::ExtensionKey;
use tower_llm_queue::lease::LeaseHandle;
use tower_llm_queue::priority_queue::RequestIdExtension;
use tower_llm_queue::rate::{MeterBody, Rate, RateHandle};
use tower_llm_queue::retry::{Backoff, Jitter, RetryHandle};
use tower_llm_queue::store::RedisStore;
use tower_llm_queue::{
    CircuitBreakerLayer, PriorityQueueHandle, PriorityQueueLayer, RetryBackoffLayer,
    SlidingWindowLayer, TokenBucketLayer,
};

use super::service::unboxed;
use super::{boxed, FirstTokenLayer, Level, Llm, UpstreamClient, UpstreamRequest, UsageMeter};
use crate::user::UserId;

/// What a request is estimated to cost against the tokens-per-window quota before the upstream
/// says: its prompt, plus the longest reply it may get. Set by whoever builds the request, as an
/// extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Tokens of the prompt, estimated.
    pub prompt: u64,
    /// The longest reply asked for.
    pub max_reply: u64,
}

/// The settings of the stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Upstream calls at once, for everybody.
    pub concurrency: usize,
    /// Requests that may wait for a slot; beyond, refused at once.
    pub queue_capacity: usize,
    /// The longest a request waits in the queue, and the longest it waits for the quota.
    pub timeout: Duration,
    /// Requests the upstream allows per `window`; `None` for no such limit.
    pub rpm: Option<u64>,
    /// Tokens the upstream allows per `window`; `None` for no such limit.
    pub tpm: Option<u64>,
    /// The upstream's window, a minute for the APIs. The stack counts over a window a sixtieth
    /// longer (61 s for a minute): a request's decision here and its arrival there are apart by a
    /// network trip, which differs from one request to the next.
    pub window: Duration,
    /// Retries of a failed call.
    pub retry_attempts: u32,
    /// The first backoff, doubled at each retry up to `backoff_max`, fully jittered.
    pub backoff: Duration,
    /// The longest backoff.
    pub backoff_max: Duration,
    /// The longest upstream `Retry-After` waited for; a longer one is returned at once.
    pub max_retry_after: Duration,
    /// How long the breaker stays open before probing.
    pub breaker_open_for: Duration,
    /// The window over which the breaker counts failures.
    pub breaker_window: Duration,
    /// Whether the quota is also paced: token buckets at the quota's own rates (bursts of
    /// `concurrency` requests, and of a `concurrency`th of the tokens) in front of the windows.
    ///
    /// Without them (the default), a request starts as soon as the windows have room: a burst
    /// after a quiet time is served at once, as far as the upstream's window allows. But under
    /// sustained excess, a window filled in a burst is followed by a pause, and every later
    /// window repeats that burst and that pause (the windows free room as the burst leaves
    /// them): whoever arrives in a pause — at any priority — waits for the next burst, up to
    /// most of a window, or is refused past `timeout`. Paced, starts spread evenly over the
    /// window, the next free unit is never far, and the queue's order decides who takes it;
    /// the price is that a burst beyond `concurrency` is spread too, even when the upstream's
    /// window has room for it.
    pub pace: bool,
    /// With a Redis store, the queue's concurrency and the quota's windows hold for every
    /// instance on the same Redis and prefix: each instance keeps its own queue, order and
    /// fairness, and a call it admits also takes one of the slots leased in Redis. The pacing
    /// buckets stay per instance.
    pub redis: Option<RedisStore>,
}

impl Default for StackConfig {
    /// The chat server's defaults: 5 calls at once, 500 waiting, 300 s, no quota, a minute's
    /// window, 2 retries after 0.5 s to 8 s, `Retry-After` up to 10 s, the breaker open 10 s
    /// after failures over 30 s, no pacing.
    fn default() -> Self {
        StackConfig {
            concurrency: 5,
            queue_capacity: 500,
            timeout: Duration::from_secs(300),
            rpm: None,
            tpm: None,
            window: Duration::from_secs(60),
            retry_attempts: 2,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(10),
            breaker_open_for: Duration::from_secs(10),
            breaker_window: Duration::from_secs(30),
            pace: false,
            redis: None,
        }
    }
}

impl StackConfig {
    /// The window the quota layers count over: `window` and a sixtieth of it.
    pub fn quota_window(&self) -> Duration {
        self.window + self.window / 60
    }
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
    /// The upstream's requests-per-window quota, when set.
    pub rpm: Option<RateHandle>,
    /// The upstream's tokens-per-window quota, when set.
    pub tpm: Option<RateHandle>,
}

/// The level of a request: its [`Level`] extension, else 5, the lowest.
fn level_of(request: &UpstreamRequest) -> u8 {
    request
        .extensions()
        .get::<Level>()
        .map_or(5, |level| level.0)
}

/// Builds the stack around `client`; `answered` sees the status of every answer the upstream
/// gives (a server's metrics).
pub fn layered(
    config: &StackConfig,
    client: UpstreamClient,
    answered: impl Fn(http::StatusCode) + Clone + Send + Sync + 'static,
) -> (Llm, Handles) {
    let counted = ServiceBuilder::new()
        .map_response(move |response: http::Response<_>| {
            answered(response.status());
            response
        })
        .layer(FirstTokenLayer)
        .service(client);

    // The upstream's quota; without one configured, no layer at all.
    let window = config.quota_window();
    let max_wait = config.timeout;
    let estimate = |request: &UpstreamRequest| {
        request
            .extensions()
            .get::<Estimate>()
            .map_or(1, |e| e.prompt + e.max_reply)
    };
    let meter = || {
        MeterBody::new(|request: &UpstreamRequest| {
            let prompt = request
                .extensions()
                .get::<Estimate>()
                .map_or(0, |e| e.prompt);
            UsageMeter::new(prompt)
        })
    };
    let tpm = config.tpm.map(|tpm| {
        SlidingWindowLayer::new(tpm, window)
            .cost(estimate)
            .reconcile(meter())
            .wait(max_wait)
    });
    let rpm = config
        .rpm
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
    // Without a quota, the client as it is: a box less to clone and to call through.
    if tpm.is_none() && rpm.is_none() {
        return queued(config, Either::Left(unboxed(counted)));
    }
    let mut quota = boxed(counted);
    if let Some(layer) = tpm {
        quota = boxed(layer.layer(quota));
    }
    if let Some(layer) = rpm {
        quota = boxed(layer.layer(quota));
    }
    if config.pace {
        let per_window = |n: u64| Rate::per(u32::try_from(n).unwrap_or(u32::MAX), window);
        let burst = config.concurrency.max(1) as u64;
        if let Some(tpm) = config.tpm {
            let paced = TokenBucketLayer::new(per_window(tpm), (tpm / burst).max(1))
                .cost(estimate)
                .reconcile(meter())
                .wait(max_wait);
            quota = boxed(paced.layer(quota));
        }
        if let Some(rpm) = config.rpm {
            let paced = TokenBucketLayer::new(per_window(rpm), burst).wait(max_wait);
            quota = boxed(paced.layer(quota));
        }
    }
    let (llm, handles) = queued::<Llm>(config, Either::Right(quota));
    let handles = Handles {
        rpm: rpm_handle,
        tpm: tpm_handle,
        ..handles
    };
    (llm, handles)
}

/// The client, or the client behind the quota's layers.
type Quota<S> = Either<S, Llm>;

/// The queue, the breaker and the retries around `quota`, boxed; the handles of all but the
/// quota's (`None` here).
fn queued<S>(config: &StackConfig, quota: Quota<S>) -> (Llm, Handles)
where
    S: tower::Service<UpstreamRequest, Response = http::Response<Body>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let queue = PriorityQueueLayer::new(config.concurrency)
        .capacity(config.queue_capacity)
        .queue_timeout(config.timeout)
        .priority(level_of)
        .fair_by(ExtensionKey::<UserId>::new())
        .request_id(RequestIdExtension)
        .hold_until_body_end();
    let breaker = CircuitBreakerLayer::new()
        .classify(HttpClassifier)
        .minimum_calls(5)
        .window(Window::Time(config.breaker_window))
        .open_for(config.breaker_open_for);
    let retry = RetryBackoffLayer::new(config.retry_attempts)
        .classify(HttpClassifier)
        .max_retry_after(config.max_retry_after)
        .backoff(
            Backoff::exponential(config.backoff, 2.0, config.backoff_max).jitter(Jitter::Full),
        );
    // With Redis, the concurrency holds for every instance together: a call this instance's
    // queue admits also takes one of the slots leased there.
    let (queued, queue_leases) = match &config.redis {
        Some(store) => {
            let leased = queue.clone().store(store.scope("queue"));
            let leases = leased.lease_handle();
            (Either::Left(unboxed(leased.layer(quota))), Some(leases))
        }
        None => (Either::Right(unboxed(queue.clone().layer(quota))), None),
    };
    let handles = Handles {
        queue: queue.handle(),
        queue_leases,
        breaker: breaker.handle(),
        retry: retry.handle(),
        rpm: None,
        tpm: None,
    };
    let llm = boxed(
        ServiceBuilder::new()
            .layer(retry)
            .layer(breaker)
            .service(queued),
    );
    (llm, handles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_counts_a_sixtieth_longer() {
        let config = StackConfig::default();
        assert_eq!(config.quota_window(), Duration::from_secs(61));
        let scaled = StackConfig {
            window: Duration::from_secs(6),
            ..config
        };
        assert_eq!(scaled.quota_window(), Duration::from_millis(6_100));
    }
}
