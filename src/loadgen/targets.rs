//! The in-process targets a workload is played against, all around the same upstream client:
//! `direct` (no protection, seed 002's naive retry), `tower` (the best of tower's own layers) and
//! `ours` (this crate's layers, as the chat server stacks them). The fourth, `gateway`, is the
//! chat server over HTTP, started by the load harness's example.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_llm_queue::key::ExtensionKey;
use tower_llm_queue::{PerUserConcurrencyLayer, SlidingWindowLayer};

use super::outcome::{error_kind, read_reply, Outcome};
use super::scenario::{Edge, Quota, Scale};
use super::workload::Ask;
use crate::upstream::stack::{layered, Handles, StackConfig};
use crate::upstream::{boxed, Estimate, Level, Llm, UpstreamClient, UpstreamRequest};
use crate::user::UserId;

/// Sends one request the way a target does and reads the reply to its end.
pub type Sender = Arc<dyn Fn(Ask) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// The model asked for.
pub const MODEL: &str = "mock-llm";

/// The upstream request for `ask`: its body, and as extensions its user, its level and its
/// exact token estimate (an application that calls the upstream in-process counts its prompt's
/// tokens).
pub fn upstream_request(ask: &Ask) -> UpstreamRequest {
    let body = ask.body(MODEL).to_string();
    let mut request = http::Request::post("/chat/completions")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap_or_default();
    let extensions = request.extensions_mut();
    extensions.insert(UserId(ask.user_name.clone()));
    extensions.insert(Level(ask.class.level()));
    extensions.insert(Estimate {
        prompt: ask.prompt_tokens,
        max_reply: ask.max_tokens,
    });
    request
}

/// A [`Sender`] that calls `llm` in process.
pub fn in_process(llm: Llm) -> Sender {
    Arc::new(move |ask: Ask| {
        let llm = llm.clone();
        Box::pin(async move {
            match llm.oneshot(upstream_request(&ask)).await {
                Ok(response) => read_reply(response, ask.stream).await,
                Err(err) => Outcome::Failed(error_kind(&*err)),
            }
        })
    })
}

/// What the targets need to know of a scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetSettings {
    /// How much faster than scenario time the run goes.
    pub scale: Scale,
    /// The upstream's quota.
    pub quota: Quota,
    /// How long a user waits for a request, in scenario seconds.
    pub patience_s: f64,
    /// The mean tokens of a request of the workload (prompt and reply), for a rate limit that
    /// counts requests only.
    pub mean_tokens: f64,
    /// Per-user limits at the edge, if the scenario has them.
    pub edge: Option<Edge>,
}

impl TargetSettings {
    /// The longest `ours` and the gateway let a request wait for the upstream, in scenario
    /// seconds: nine tenths of the user's patience. A call started later would reach its user
    /// only in the last moments of that patience, if at all; refused instead, it leaves the
    /// upstream to a call whose user still waits.
    pub fn longest_wait_s(&self) -> f64 {
        self.patience_s * 0.9
    }
}

/// How many times seed 002's client tries a request: once, then after 1, 2 and 4 seconds.
pub const NAIVE_ATTEMPTS: u32 = 4;

/// `direct`: every user calls the upstream with no protection, and on a 429, a 5xx or a failed
/// connection tries again after `2^attempt` seconds (1, 2, 4; no jitter, the upstream's delay
/// ignored), as seed 002's client does.
pub fn direct(client: UpstreamClient, settings: &TargetSettings) -> Llm {
    let scale = settings.scale;
    let naive = service_fn(move |request: UpstreamRequest| {
        let client = client.clone();
        async move {
            let mut attempt = 0;
            loop {
                let result = client.clone().oneshot(request.clone()).await;
                let again = match &result {
                    Ok(response) => {
                        response.status() == http::StatusCode::TOO_MANY_REQUESTS
                            || response.status().is_server_error()
                    }
                    Err(_) => true,
                };
                if !again || attempt + 1 >= NAIVE_ATTEMPTS {
                    return result;
                }
                drop(result);
                tokio::time::sleep(scale.real(f64::from(1u32 << attempt))).await;
                attempt += 1;
            }
        }
    });
    boxed(naive)
}

/// The retry policy of the `tower` target: up to three retries of a 429, a 5xx or a failed
/// connection, after an exponential backoff with full jitter (0.5 s doubling to 8 s, scenario
/// time) or the upstream's own `retry-after-ms` or `Retry-After` if longer — what one response
/// can tell —, within tower's `TpsBudget` of retries.
#[derive(Clone)]
pub struct TowerRetry {
    retries_left: u32,
    attempt: u32,
    scale: Scale,
    budget: Arc<TpsBudget>,
}

impl std::fmt::Debug for TowerRetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TowerRetry")
            .field("retries_left", &self.retries_left)
            .finish_non_exhaustive()
    }
}

impl TowerRetry {
    /// Three retries, a budget of 20% of the last 10 s (scenario time) of requests and 10 a
    /// second.
    pub fn new(scale: Scale) -> Self {
        TowerRetry {
            retries_left: 3,
            attempt: 0,
            scale,
            budget: Arc::new(TpsBudget::new(scale.real(10.0), 10, 0.2)),
        }
    }
}

/// The delay the upstream asked for, in the headers of one response.
fn asked_delay(headers: &http::HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    if let Some(ms) = number("retry-after-ms").filter(|ms| ms.is_finite() && *ms >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    number("retry-after")
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

impl<B> tower::retry::Policy<UpstreamRequest, http::Response<B>, BoxError> for TowerRetry {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut UpstreamRequest,
        result: &mut Result<http::Response<B>, BoxError>,
    ) -> Option<Self::Future> {
        let asked = match result {
            Ok(response) if response.status().is_success() => {
                self.budget.deposit();
                return None;
            }
            Ok(response)
                if response.status() == http::StatusCode::TOO_MANY_REQUESTS
                    || response.status().is_server_error() =>
            {
                asked_delay(response.headers())
            }
            Ok(_) => return None,
            Err(err) if err.is::<hyper_util::client::legacy::Error>() => None,
            Err(_) => return None,
        };
        if self.retries_left == 0 || !self.budget.withdraw() {
            return None;
        }
        self.retries_left -= 1;
        let backoff = (0.5 * 2f64.powi(self.attempt as i32)).min(8.0);
        self.attempt += 1;
        let jittered = self.scale.real(backoff * fastrand::f64());
        // The upstream's delay is in real time already: it runs on the same clock.
        let delay = jittered.max(asked.unwrap_or_default());
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, request: &UpstreamRequest) -> Option<UpstreamRequest> {
        Some(request.clone())
    }
}

/// `tower`: the best stack of tower's own layers — a retry (see [`TowerRetry`]), a timeout of
/// the user's patience per attempt, `ConcurrencyLimit` at the upstream's streams, and
/// `RateLimit` shared through a `Buffer` (tower's `RateLimit` is per service clone) that spaces
/// requests evenly at the rate both quotas allow for the workload's mean request: one every
/// `window / min(rpm - 1, tpm / mean_tokens)`, so that no window of the upstream holds more than
/// `rpm`. What tower cannot do: count a request's own tokens, hold a slot until a stream ends
/// (`ConcurrencyLimit` releases when the headers arrive), share a cool-down between requests.
pub fn tower_stack(client: UpstreamClient, settings: &TargetSettings) -> Llm {
    let quota = settings.quota;
    let by_tokens = quota.tpm as f64 / settings.mean_tokens.max(1.0);
    let per_window = (quota.rpm.saturating_sub(1).max(1) as f64)
        .min(by_tokens)
        .max(1.0);
    let every = settings.scale.window().div_f64(per_window);
    let rate_limited = ServiceBuilder::new()
        .buffer(4096)
        .rate_limit(1, every)
        .service(client);
    let stack = ServiceBuilder::new()
        .retry(TowerRetry::new(settings.scale))
        .timeout(settings.scale.real(settings.patience_s))
        .concurrency_limit(quota.concurrency)
        .service(rate_limited);
    boxed(SyncService::new(stack))
}

/// `ours`: the chat server's stack of this crate's layers (`crate::upstream::stack`), with
/// the scenario's quota and every time scaled, and per-user limits in front of it when the
/// scenario has them.
pub fn ours(client: UpstreamClient, settings: &TargetSettings) -> (Llm, Handles) {
    let config = stack_config(settings);
    let (llm, handles) = layered(&config, client, |_| {});
    let Some(edge) = settings.edge else {
        return (llm, handles);
    };
    let user = ExtensionKey::<UserId>::new();
    let llm = match edge.per_user_rpm {
        Some(rpm) => boxed(
            ServiceBuilder::new()
                .layer(SlidingWindowLayer::new(rpm, settings.scale.window()).keyed_by(user.clone()))
                .service(llm),
        ),
        None => llm,
    };
    let llm = match edge.per_user_concurrency {
        Some(n) => boxed(
            ServiceBuilder::new()
                .layer(PerUserConcurrencyLayer::new(n, user).hold_until_body_end())
                .service(llm),
        ),
        None => llm,
    };
    (llm, handles)
}

/// The stack's settings for a scenario: the chat server's defaults, every time divided by the
/// scale, the quota Q, as many calls at once as the upstream allows streams, the longest wait
/// [`TargetSettings::longest_wait_s`], and the quota paced (see [`StackConfig::pace`]: under the
/// sustained excess of most scenarios, it is what lets priority and fairness act).
pub fn stack_config(settings: &TargetSettings) -> StackConfig {
    let scale = settings.scale;
    let defaults = StackConfig::default();
    StackConfig {
        concurrency: settings.quota.concurrency,
        queue_capacity: 1000,
        timeout: scale.real(settings.longest_wait_s()),
        rpm: Some(settings.quota.rpm),
        tpm: Some(settings.quota.tpm),
        window: scale.window(),
        backoff: scale.real_duration(defaults.backoff),
        backoff_max: scale.real_duration(defaults.backoff_max),
        max_retry_after: scale.real_duration(defaults.max_retry_after),
        breaker_open_for: scale.real_duration(defaults.breaker_open_for),
        breaker_window: scale.real_duration(defaults.breaker_window),
        pace: true,
        ..defaults
    }
}

/// A service made `Sync` by a lock around it, for tower's services that are `Send` only: each
/// call clones it out of the lock.
#[derive(Debug)]
struct SyncService<S> {
    inner: Arc<std::sync::Mutex<S>>,
    local: S,
}

impl<S: Clone> SyncService<S> {
    fn new(inner: S) -> Self {
        SyncService {
            local: inner.clone(),
            inner: Arc::new(std::sync::Mutex::new(inner)),
        }
    }
}

impl<S: Clone> Clone for SyncService<S> {
    fn clone(&self) -> Self {
        let local = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        SyncService {
            inner: self.inner.clone(),
            local,
        }
    }
}

impl<S, Req> Service<Req> for SyncService<S>
where
    S: Service<Req> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.local.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> S::Future {
        self.local.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_one_response_asks_for() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(asked_delay(&headers), None);
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(asked_delay(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(asked_delay(&headers), Some(Duration::from_millis(150)));
        headers.insert("retry-after-ms", "-1".parse().unwrap());
        assert_eq!(asked_delay(&headers), Some(Duration::from_secs(2)));
    }

    #[test]
    fn the_stack_runs_on_the_scenarios_clock() {
        let settings = TargetSettings {
            scale: Scale::new(10.0).unwrap(),
            quota: Quota {
                rpm: 240,
                tpm: 60_000,
                concurrency: 8,
            },
            patience_s: 60.0,
            mean_tokens: 200.0,
            edge: None,
        };
        let config = stack_config(&settings);
        assert_eq!(config.window, Duration::from_secs(6));
        // Nine tenths of the user's 60 s of patience, played ten times faster.
        assert_eq!(config.timeout, Duration::from_millis(5400));
        assert_eq!(config.backoff, Duration::from_millis(50));
        assert_eq!((config.rpm, config.concurrency), (Some(240), 8));
    }
}
