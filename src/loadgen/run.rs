//! Playing a scenario's workload against one target, on the real clock divided by the scale,
//! with the mock provider as the upstream — stopped and started again for the scenario's
//! outages — and recording what every user got and what the upstream saw.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use super::outcome::Outcome;
use super::scenario::{Class, Scale, Scenario};
use super::targets::Sender;
use super::workload::{exponential, Ask, User};
use crate::mock::{Faults, MockConfig, MockHandle, MockProvider, RunningMock};

/// The mock provider's settings for a scenario: Q per window of the scaled minute, its speed
/// scaled, its 503s, its seed.
pub fn mock_config(scenario: &Scenario, scale: Scale) -> MockConfig {
    let upstream = &scenario.upstream;
    MockConfig {
        rpm: Some(scenario.quota.rpm),
        tpm: Some(scenario.quota.tpm),
        window: scale.window(),
        concurrency: Some(scenario.quota.concurrency),
        tokens_per_second: upstream.tokens_per_second * scale.factor(),
        time_to_first_token: scale.real(upstream.time_to_first_token_ms as f64 / 1000.0),
        faults: Faults {
            error_503: upstream.error_503,
            latency_amount: scale.real(2.0),
            ..Faults::default()
        },
        seed: scenario.seed,
    }
}

/// The mock upstream of one run, on one address for its whole life, down during outages.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    config: MockConfig,
    running: tokio::sync::Mutex<Option<RunningMock>>,
    /// Every instance started, with the instant its arrivals are timed from.
    instances: Mutex<Vec<(MockHandle, Instant)>>,
    current: Mutex<Option<MockHandle>>,
}

/// One request the upstream received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// When it arrived, since the run's start.
    pub at: Duration,
    /// The request's tag (the OpenAI `user` field): which user request it belongs to.
    pub tag: String,
    /// What became of it, as the mock says: `served`, `throttled`, `faulted`, `cancelled`, ...
    pub outcome: String,
    /// Its prompt and reply tokens, as charged at arrival.
    pub tokens: u64,
    /// For a 429, the limit it hit: `requests`, `tokens` or `concurrency`.
    pub limit: Option<String>,
}

impl Attempt {
    /// Whether the upstream admitted it (it counts against the quota).
    pub fn admitted(&self) -> bool {
        self.outcome != "throttled" && self.outcome != "invalid"
    }
}

impl MockUpstream {
    /// Starts a mock with `config` on a free port of the loopback.
    pub async fn start(config: MockConfig) -> std::io::Result<MockUpstream> {
        let running = MockProvider::start(config.clone(), ([127, 0, 0, 1], 0).into()).await?;
        let upstream = MockUpstream {
            addr: running.addr(),
            config,
            running: tokio::sync::Mutex::new(None),
            instances: Mutex::new(Vec::new()),
            current: Mutex::new(None),
        };
        upstream.adopt(running).await;
        Ok(upstream)
    }

    async fn adopt(&self, running: RunningMock) {
        let handle = running.handle();
        handle.reset();
        let base = Instant::now();
        lock(&self.instances).push((handle.clone(), base));
        *lock(&self.current) = Some(handle);
        *self.running.lock().await = Some(running);
    }

    /// Its OpenAI base URL, `/v1` included.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops it: open streams end abruptly and connections are refused.
    pub async fn down(&self) {
        *lock(&self.current) = None;
        if let Some(running) = self.running.lock().await.take() {
            running.stop().await;
        }
    }

    /// Starts it again on the same address, with a new generator of faults.
    pub async fn up(&self) -> std::io::Result<()> {
        if self.running.lock().await.is_some() {
            return Ok(());
        }
        let running = MockProvider::start(self.config.clone(), self.addr).await?;
        self.adopt(running).await;
        Ok(())
    }

    /// Requests it is serving now (none while down).
    pub fn in_flight(&self) -> usize {
        lock(&self.current)
            .as_ref()
            .map_or(0, |handle| handle.snapshot(false).in_flight)
    }

    /// Every request it received since `start`, in order.
    pub fn attempts(&self, start: Instant) -> Vec<Attempt> {
        let instances = lock(&self.instances).clone();
        let mut attempts = Vec::new();
        for (handle, base) in instances {
            for arrival in handle.stats().arrivals {
                let at = base + Duration::from_millis(arrival.at_ms);
                attempts.push(Attempt {
                    at: at.saturating_duration_since(start),
                    tag: arrival.user,
                    outcome: arrival.outcome,
                    tokens: arrival.prompt_tokens + arrival.completion_tokens,
                    limit: arrival.limit,
                });
            }
        }
        attempts.sort_by_key(|a| a.at);
        attempts
    }

    /// Stops it for good.
    pub async fn stop(self) {
        self.down().await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What one user request gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The user's index.
    pub user: usize,
    /// The tag that names it to the upstream.
    pub tag: String,
    /// The user's class.
    pub class: Class,
    /// Whether it streamed.
    pub stream: bool,
    /// When it was sent, since the run's start.
    pub issued: Duration,
    /// When its reply ended, or its error came.
    pub ended: Duration,
    /// When its first token came, if it was served.
    pub first_token: Option<Duration>,
    /// `None` if served; otherwise the error's kind.
    pub error: Option<String>,
    /// The tokens it asked of the quota (prompt and reply).
    pub tokens: u64,
}

/// A look at the run taken at regular times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Since the run's start.
    pub at: Duration,
    /// Requests sent and not yet answered to the end.
    pub outstanding: usize,
    /// Requests the upstream is serving.
    pub upstream_in_flight: usize,
    /// Requests sent so far.
    pub issued: u64,
    /// Requests served so far.
    pub served: u64,
}

impl Sample {
    /// Requests waiting somewhere before the upstream: outstanding, less those it is serving.
    pub fn waiting(&self) -> usize {
        self.outstanding.saturating_sub(self.upstream_in_flight)
    }
}

/// Everything a run recorded.
#[derive(Debug, Clone)]
pub struct RunData {
    /// One record per user request.
    pub records: Vec<Record>,
    /// What the upstream received.
    pub attempts: Vec<Attempt>,
    /// The samples, in order.
    pub samples: Vec<Sample>,
    /// How long the run took, the last answers included.
    pub wall: Duration,
}

#[derive(Debug, Default)]
struct Counters {
    outstanding: AtomicUsize,
    issued: AtomicU64,
    served: AtomicU64,
    records: Mutex<Vec<Record>>,
}

/// Plays `scenario` at `scale` through `send`, against `upstream`; `on_sample` sees a sample
/// every twentieth of the upstream's window (for a progress display).
pub async fn run(
    scenario: &Scenario,
    scale: Scale,
    upstream: Arc<MockUpstream>,
    send: Sender,
    mut on_sample: impl FnMut(&Sample),
) -> RunData {
    let users = User::all(scenario);
    let start = Instant::now();
    let end = start + scale.real(scenario.duration_s);
    let patience = scale.real(scenario.patience_s);
    let counters = Arc::new(Counters::default());

    let mut outages = JoinSet::new();
    for outage in &scenario.upstream.outages {
        let upstream = upstream.clone();
        let (down, up) = (
            start + scale.real(outage.at_s),
            start + scale.real(outage.at_s + outage.for_s),
        );
        outages.spawn(async move {
            sleep_until(down).await;
            upstream.down().await;
            sleep_until(up).await;
            if let Err(error) = upstream.up().await {
                tracing::error!(%error, "the mock could not start again");
            }
        });
    }

    let mut players = JoinSet::new();
    for user in users {
        let (send, counters) = (send.clone(), counters.clone());
        let seed = scenario.seed;
        match user.think() {
            Some((think_s, together)) => {
                players.spawn(async move {
                    let mut timing = user.timing(seed);
                    let first = if together {
                        0.0
                    } else {
                        timing.f64() * think_s
                    };
                    sleep_until(start + scale.real(first)).await;
                    for ask in user.asks(seed) {
                        if Instant::now() >= end {
                            break;
                        }
                        issue(&counters, &send, ask, start, patience).await;
                        let pause = exponential(&mut timing, think_s);
                        tokio::time::sleep(scale.real(pause)).await;
                    }
                });
            }
            None => {
                let times = user.arrivals(scenario);
                players.spawn(async move {
                    let mut requests = JoinSet::new();
                    for (ask, at) in user.asks(seed).zip(times) {
                        sleep_until(start + scale.real(at)).await;
                        let (send, counters) = (send.clone(), counters.clone());
                        requests.spawn(async move {
                            issue(&counters, &send, ask, start, patience).await;
                        });
                    }
                    while requests.join_next().await.is_some() {}
                });
            }
        }
    }

    let mut samples = Vec::new();
    let mut ticks = tokio::time::interval(scale.window() / 20);
    let sample = |upstream: &MockUpstream| Sample {
        at: start.elapsed(),
        outstanding: counters.outstanding.load(Relaxed),
        upstream_in_flight: upstream.in_flight(),
        issued: counters.issued.load(Relaxed),
        served: counters.served.load(Relaxed),
    };
    let all_played = async { while players.join_next().await.is_some() {} };
    tokio::pin!(all_played);
    loop {
        tokio::select! {
            _ = &mut all_played => break,
            _ = ticks.tick() => {
                let now = sample(&upstream);
                on_sample(&now);
                samples.push(now);
            }
        }
    }
    while outages.join_next().await.is_some() {}
    let last = sample(&upstream);
    on_sample(&last);
    samples.push(last);
    let wall = start.elapsed();
    // Let the upstream settle its last streams before reading its log.
    let settle = Instant::now() + Duration::from_secs(2);
    while upstream.in_flight() > 0 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let records = std::mem::take(&mut *lock(&counters.records));
    RunData {
        records,
        attempts: upstream.attempts(start),
        samples,
        wall,
    }
}

/// Sends one request and records what came of it; past the user's patience, it gives up.
async fn issue(counters: &Counters, send: &Sender, ask: Ask, start: Instant, patience: Duration) {
    counters.outstanding.fetch_add(1, Relaxed);
    counters.issued.fetch_add(1, Relaxed);
    let issued = start.elapsed();
    let (user, tag, class, stream, tokens) =
        (ask.user, ask.tag(), ask.class, ask.stream, ask.tokens());
    let outcome = tokio::time::timeout(patience, send(ask))
        .await
        .unwrap_or_else(|_| Outcome::Failed("timeout".into()));
    let ended = start.elapsed();
    let (first_token, error) = match outcome {
        Outcome::Served { first_token, .. } => {
            counters.served.fetch_add(1, Relaxed);
            (Some(first_token.saturating_duration_since(start)), None)
        }
        Outcome::Failed(kind) => (None, Some(kind)),
    };
    lock(&counters.records).push(Record {
        user,
        tag,
        class,
        stream,
        issued,
        ended,
        first_token,
        error,
        tokens,
    });
    counters.outstanding.fetch_sub(1, Relaxed);
}

/// The attempts of each request, by tag.
pub fn attempts_by_tag(attempts: &[Attempt]) -> HashMap<&str, Vec<&Attempt>> {
    let mut by_tag: HashMap<&str, Vec<&Attempt>> = HashMap::new();
    for attempt in attempts {
        by_tag.entry(&attempt.tag).or_default().push(attempt);
    }
    by_tag
}
