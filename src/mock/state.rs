//! The shared state of one mock: its settings, limits, fault generator and statistics.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::config::MockConfig;
use super::limits::{LimitState, RateHeaders, WindowLog};
use super::stats::{Arrival, MockStats};
use super::MAX_ARRIVALS;

/// The API a request called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    OpenAi,
    Ollama,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Ollama => "ollama",
        }
    }
}

/// What the mock knows of a well-formed request when it arrives.
#[derive(Clone, Debug)]
pub(crate) struct Incoming {
    pub(crate) api: Api,
    pub(crate) stream: bool,
    pub(crate) user: String,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
}

/// The limit a refused request hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limit {
    Requests,
    Tokens,
    Concurrency,
}

impl Limit {
    fn name(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
            Limit::Concurrency => "concurrency",
        }
    }
}

/// A request refused by a limit.
#[derive(Clone, Debug)]
pub(crate) struct Refusal {
    pub(crate) limit: Limit,
    /// When a retry would be admitted if nothing else arrived; `None` for a request larger
    /// than the token limit, which never will be.
    pub(crate) retry_after: Option<Duration>,
    /// The limit's figure and what is in use, for the message.
    pub(crate) allowed: u64,
    pub(crate) used: u64,
    pub(crate) requested: u64,
    pub(crate) headers: RateHeaders,
}

/// A limit a request hits, and how long until it would not.
struct Hit {
    limit: Limit,
    wait: Option<Duration>,
    allowed: u64,
    used: u64,
    requested: u64,
}

/// An injected failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    Error500,
    Error503,
    Overloaded529,
    CutStream,
    ErrorEvent,
}

impl Failure {
    fn name(self) -> &'static str {
        match self {
            Failure::Error500 => "error_500",
            Failure::Error503 => "error_503",
            Failure::Overloaded529 => "overloaded_529",
            Failure::CutStream => "cut_stream",
            Failure::ErrorEvent => "error_event",
        }
    }

    pub(crate) fn status(self) -> u16 {
        match self {
            Failure::Error500 | Failure::ErrorEvent => 500,
            Failure::Error503 => 503,
            Failure::Overloaded529 => 529,
            Failure::CutStream => 200,
        }
    }
}

/// A failure that strikes halfway through a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Midway {
    /// The connection is closed.
    Cut,
    /// An error is sent in the stream, which then ends.
    ErrorEvent,
}

/// An admitted request that produces a reply (perhaps cut or broken by a fault).
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(crate) arrival: Instant,
    /// When the first token is due: the time to first token and any added latency after the
    /// arrival.
    pub(crate) first_token: Instant,
    pub(crate) tokens_per_second: f64,
    pub(crate) midway: Option<Midway>,
    pub(crate) headers: RateHeaders,
    pub(crate) guard: InFlight,
}

/// What the mock decided for a well-formed request.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Refused by a limit: 429.
    Refused(Refusal),
    /// Admitted and failed at once with 500, 503 or 529.
    Failed {
        failure: Failure,
        headers: RateHeaders,
    },
    /// Admitted: produce the reply.
    Admitted(Ticket),
}

/// How an admitted request ended, when it ended on the mock's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    Served,
    Faulted { status: u16 },
}

/// One mock's mutable state.
#[derive(Debug)]
struct State {
    config: MockConfig,
    rng: fastrand::Rng,
    /// The instant arrivals are timed from: the start or the last reset.
    base: Instant,
    /// Bumped by every reset, so that requests from before it do not count after it.
    generation: u64,
    window: WindowLog,
    received: u64,
    served: u64,
    throttled: u64,
    faulted: u64,
    invalid: u64,
    cancelled: u64,
    in_flight: usize,
    peak_concurrency: usize,
    peak_requests: u64,
    peak_tokens: u64,
    per_user: BTreeMap<String, u64>,
    arrivals: VecDeque<Arrival>,
}

impl State {
    fn new(config: MockConfig) -> Self {
        State {
            rng: fastrand::Rng::with_seed(config.seed),
            window: WindowLog::new(config.window),
            config,
            base: Instant::now(),
            generation: 0,
            received: 0,
            served: 0,
            throttled: 0,
            faulted: 0,
            invalid: 0,
            cancelled: 0,
            in_flight: 0,
            peak_concurrency: 0,
            peak_requests: 0,
            peak_tokens: 0,
            per_user: BTreeMap::new(),
            arrivals: VecDeque::new(),
        }
    }

    /// Logs an arrival, keeping the last [`MAX_ARRIVALS`]; returns its number.
    fn log(&mut self, now: Instant, incoming: &Incoming, outcome: &str, status: u16) -> u64 {
        self.received += 1;
        let seq = self.received;
        let at = now.saturating_duration_since(self.base).as_millis();
        if self.arrivals.len() >= MAX_ARRIVALS {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(Arrival {
            seq,
            at_ms: u64::try_from(at).unwrap_or(u64::MAX),
            user: incoming.user.clone(),
            api: incoming.api.name().to_owned(),
            stream: incoming.stream,
            outcome: outcome.to_owned(),
            status,
            limit: None,
            fault: None,
            delayed: false,
            prompt_tokens: incoming.prompt_tokens,
            completion_tokens: incoming.completion_tokens,
        });
        seq
    }

    fn arrival_mut(&mut self, seq: u64) -> Option<&mut Arrival> {
        let first = self.arrivals.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.arrivals.get_mut(index)
    }

    /// The `x-ratelimit-*` headers as the window stands, `refused` naming the limit whose reset
    /// is the given wait rather than the next release.
    fn rate_headers(&self, now: Instant, refused: Option<(Limit, Duration)>) -> RateHeaders {
        let release = self.window.next_release(now);
        let reset_of = |limit: Limit| match refused {
            Some((l, wait)) if l == limit => wait,
            _ => release,
        };
        RateHeaders {
            requests: self.config.rpm.map(|limit| LimitState {
                limit,
                remaining: limit.saturating_sub(self.window.requests()),
                reset: reset_of(Limit::Requests),
            }),
            tokens: self.config.tpm.map(|limit| LimitState {
                limit,
                remaining: limit.saturating_sub(self.window.tokens()),
                reset: reset_of(Limit::Tokens),
            }),
        }
    }

    /// The limit that refuses a request of `cost` tokens now, if any: of several, the one with
    /// the longest wait, so that a retry after it is admitted.
    fn refusal(&self, now: Instant, cost: u64) -> Option<Refusal> {
        let mut hits = Vec::new();
        if let Some(limit) = self.config.concurrency {
            if self.in_flight >= limit {
                hits.push(Hit {
                    limit: Limit::Concurrency,
                    wait: Some(self.config.window / 60),
                    allowed: limit as u64,
                    used: self.in_flight as u64,
                    requested: 1,
                });
            }
        }
        if let Some(limit) = self.config.rpm {
            let used = self.window.requests();
            if used >= limit {
                hits.push(Hit {
                    limit: Limit::Requests,
                    wait: Some(self.window.wait_for_requests(limit, now)),
                    allowed: limit,
                    used,
                    requested: 1,
                });
            }
        }
        if let Some(limit) = self.config.tpm {
            let used = self.window.tokens();
            if used.saturating_add(cost) > limit {
                hits.push(Hit {
                    limit: Limit::Tokens,
                    wait: self.window.wait_for_tokens(limit, cost, now),
                    allowed: limit,
                    used,
                    requested: cost,
                });
            }
        }
        // The first of those with the longest wait; never (`None`) is the longest.
        let worst = hits
            .into_iter()
            .rev()
            .max_by_key(|hit| hit.wait.unwrap_or(Duration::MAX))?;
        let reset = worst.wait.unwrap_or_else(|| self.window.next_release(now));
        Some(Refusal {
            limit: worst.limit,
            retry_after: worst.wait,
            allowed: worst.allowed,
            used: worst.used,
            requested: worst.requested,
            headers: self.rate_headers(now, Some((worst.limit, reset))),
        })
    }

    /// Draws the faults of one admitted request: always two numbers, so that the sequence of
    /// faults depends on the seed and the number of admissions alone.
    fn draw_faults(&mut self) -> (Option<Failure>, bool) {
        let pick = self.rng.f64();
        let slow = self.rng.f64();
        let faults = &self.config.faults;
        let mut edge = 0.0;
        let mut failure = None;
        for (share, kind) in [
            (faults.error_500, Failure::Error500),
            (faults.error_503, Failure::Error503),
            (faults.overloaded_529, Failure::Overloaded529),
            (faults.cut_stream, Failure::CutStream),
            (faults.error_event, Failure::ErrorEvent),
        ] {
            if share > 0.0 {
                edge += share;
            }
            if share > 0.0 && pick < edge {
                failure = Some(kind);
                break;
            }
        }
        (failure, slow < faults.latency)
    }

    /// Records the end of an admitted request of `generation`.
    fn settle(&mut self, generation: u64, seq: u64, ending: Option<Ending>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if generation != self.generation {
            return;
        }
        let (outcome, status) = match ending {
            Some(Ending::Served) => {
                self.served += 1;
                ("served", None)
            }
            Some(Ending::Faulted { status }) => {
                self.faulted += 1;
                ("faulted", Some(status))
            }
            None => {
                self.cancelled += 1;
                ("cancelled", None)
            }
        };
        if let Some(arrival) = self.arrival_mut(seq) {
            arrival.outcome = outcome.to_owned();
            if let Some(status) = status {
                arrival.status = status;
            }
        }
    }
}

/// The state shared by a mock's server, its router and its handles.
struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

/// A handle on one mock's shared state: its statistics, and control over its settings.
/// Clones share the same mock.
#[derive(Clone)]
pub struct MockHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for MockHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MockHandle")
            .field("config", &state.config)
            .field("received", &state.received)
            .field("in_flight", &state.in_flight)
            .finish_non_exhaustive()
    }
}

impl MockHandle {
    pub(crate) fn new(config: MockConfig) -> Self {
        MockHandle {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new(config)),
                changed: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn changed(&self) {
        self.shared.changed.notify_waiters();
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> MockStats {
        self.snapshot(true)
    }

    /// A snapshot of the statistics, with or without the log of arrivals.
    pub fn snapshot(&self, with_arrivals: bool) -> MockStats {
        let state = self.lock();
        MockStats {
            received: state.received,
            served: state.served,
            throttled: state.throttled,
            faulted: state.faulted,
            invalid: state.invalid,
            in_flight: state.in_flight,
            peak_concurrency: state.peak_concurrency,
            peak_requests_per_60s: state.peak_requests,
            peak_tokens_per_60s: state.peak_tokens,
            streams_cancelled: state.cancelled,
            per_user: state.per_user.clone(),
            arrivals: if with_arrivals {
                state.arrivals.iter().cloned().collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Puts the counters, peaks, per-user counts, the log of arrivals and the 60-second
    /// windows back to zero, times arrivals from now, and reseeds the fault generator with the
    /// configured seed. Requests in progress keep running and stay in `in_flight` (and in
    /// `peak_concurrency`), but their endings are not counted.
    pub fn reset(&self) {
        let mut state = self.lock();
        state.generation = state.generation.wrapping_add(1);
        state.base = Instant::now();
        state.window.clear();
        state.rng = fastrand::Rng::with_seed(state.config.seed);
        state.received = 0;
        state.served = 0;
        state.throttled = 0;
        state.faulted = 0;
        state.invalid = 0;
        state.cancelled = 0;
        state.peak_concurrency = state.in_flight;
        state.peak_requests = 0;
        state.peak_tokens = 0;
        state.per_user.clear();
        state.arrivals.clear();
        drop(state);
        self.changed();
    }

    /// Replaces the limits, speed and faults for the requests that arrive from now on, and
    /// reseeds the fault generator with the new seed. Counters and windows are kept.
    pub fn set_config(&self, config: MockConfig) {
        let mut state = self.lock();
        state.rng = fastrand::Rng::with_seed(config.seed);
        state.window.set_length(config.window);
        state.config = config;
        drop(state);
        self.changed();
    }

    /// The settings in force.
    pub fn config(&self) -> MockConfig {
        self.lock().config.clone()
    }

    /// Waits until `done` holds for the statistics, checking them after every change, and
    /// returns them. Useful in tests to wait for a stream's end without sleeping; put a
    /// timeout around it.
    pub async fn wait_for<F>(&self, mut done: F) -> MockStats
    where
        F: FnMut(&MockStats) -> bool,
    {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stats = self.stats();
            if done(&stats) {
                return stats;
            }
            notified.await;
        }
    }

    /// Records a malformed request.
    pub(crate) fn invalid(&self, api: Api, stream: bool, user: String, status: u16) {
        let now = Instant::now();
        let mut state = self.lock();
        let incoming = Incoming {
            api,
            stream,
            user,
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        state.log(now, &incoming, "invalid", status);
        state.invalid += 1;
        drop(state);
        tracing::debug!(target: "mock", api = api.name(), "malformed request");
        self.changed();
    }

    /// Decides on a well-formed request as it arrives: refused by a limit, failed at once, or
    /// admitted.
    pub(crate) fn admit(&self, incoming: &Incoming) -> Decision {
        let now = Instant::now();
        let cost = incoming
            .prompt_tokens
            .saturating_add(incoming.completion_tokens);
        let mut state = self.lock();
        state.window.prune(now);
        if let Some(refusal) = state.refusal(now, cost) {
            let seq = state.log(now, incoming, "throttled", 429);
            state.throttled += 1;
            if let Some(arrival) = state.arrival_mut(seq) {
                arrival.limit = Some(refusal.limit.name().to_owned());
            }
            drop(state);
            tracing::debug!(
                target: "mock",
                user = %incoming.user,
                limit = refusal.limit.name(),
                retry_after_ms = refusal.retry_after.map(|d| d.as_millis() as u64),
                "throttled"
            );
            self.changed();
            return Decision::Refused(refusal);
        }

        state.window.push(now, cost);
        state.peak_requests = state.peak_requests.max(state.window.requests());
        state.peak_tokens = state.peak_tokens.max(state.window.tokens());
        *state.per_user.entry(incoming.user.clone()).or_insert(0) += 1;
        let headers = state.rate_headers(now, None);
        let (failure, delayed) = state.draw_faults();
        let immediate = matches!(
            failure,
            Some(Failure::Error500 | Failure::Error503 | Failure::Overloaded529)
        );
        let status = match failure {
            Some(f) if immediate => f.status(),
            _ => 200,
        };
        let outcome = if immediate { "faulted" } else { "in_progress" };
        let seq = state.log(now, incoming, outcome, status);
        let delayed = delayed && !immediate;
        if let Some(arrival) = state.arrival_mut(seq) {
            arrival.fault = failure.map(|f| f.name().to_owned());
            arrival.delayed = delayed;
        }
        if let Some(failure) = failure.filter(|_| immediate) {
            state.faulted += 1;
            drop(state);
            tracing::debug!(target: "mock", user = %incoming.user, fault = failure.name(), "fault");
            self.changed();
            return Decision::Failed { failure, headers };
        }

        state.in_flight += 1;
        state.peak_concurrency = state.peak_concurrency.max(state.in_flight);
        let mut first_token = cap(now, state.config.time_to_first_token);
        if delayed {
            first_token = cap(first_token, state.config.faults.latency_amount);
        }
        let midway = match failure {
            Some(Failure::CutStream) => Some(Midway::Cut),
            Some(Failure::ErrorEvent) => Some(Midway::ErrorEvent),
            _ => None,
        };
        let ticket = Ticket {
            arrival: now,
            first_token,
            tokens_per_second: state.config.tokens_per_second,
            midway,
            headers,
            guard: InFlight {
                handle: self.clone(),
                generation: state.generation,
                seq,
                settled: false,
            },
        };
        drop(state);
        tracing::debug!(
            target: "mock",
            user = %incoming.user,
            fault = failure.map(Failure::name),
            delayed,
            "admitted"
        );
        self.changed();
        Decision::Admitted(ticket)
    }
}

/// `at + d`, with `d` at most a year, so that no setting overflows an instant.
pub(crate) fn cap(at: Instant, d: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    at.checked_add(d.min(YEAR)).unwrap_or(at)
}

/// An admitted request in progress: counts in `in_flight` until it is settled or dropped;
/// dropped unsettled, its client went away.
pub(crate) struct InFlight {
    handle: MockHandle,
    generation: u64,
    seq: u64,
    settled: bool,
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("seq", &self.seq)
            .field("settled", &self.settled)
            .finish()
    }
}

impl InFlight {
    /// Records how the request ended.
    pub(crate) fn finish(mut self, ending: Ending) {
        self.settle(Some(ending));
    }

    fn settle(&mut self, ending: Option<Ending>) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.handle.lock().settle(self.generation, self.seq, ending);
        if ending.is_none() {
            tracing::debug!(target: "mock", seq = self.seq, "client went away");
        }
        self.handle.changed();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.settle(None);
    }
}
