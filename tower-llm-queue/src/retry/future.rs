use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::classify::{Classify, Outcome};
use crate::rejected::Rejected;

use super::state::{Ending, Shared};

pin_project! {
    /// The response future of [`RetryBackoff`](super::RetryBackoff): the attempts of one call,
    /// with their waits. Dropping it drops the attempt in flight and makes no further one.
    ///
    /// `F` is the inner service's future: naming it as a parameter, as tower's futures do,
    /// keeps the compiler able to prove the future `Send` inside spawned tasks and handlers.
    pub struct ResponseFuture<S, Req, F, C> {
        // The service as the call found it; each attempt after a failed `poll_ready` starts
        // from a new clone of it.
        template: S,
        inner: S,
        request: Req,
        shared: Arc<Shared>,
        classify: C,
        retries: u32,
        // The last backoff, for decorrelated jitter; zero before the first retry.
        previous: Duration,
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Not polled yet: the first attempt is counted when it starts.
        New,
        // Waits out the cool-down, then makes the attempt. (Timers are boxed: they are large, and
        // most calls never wait.)
        CoolingDown { sleep: Pin<Box<Sleep>> },
        // Waits for the inner service, then calls it.
        Ready,
        Calling { #[pin] future: F },
        // Waits out the backoff before the next attempt.
        BackingOff { sleep: Pin<Box<Sleep>> },
        Done,
    }
}

impl<S, Req, C> ResponseFuture<S, Req, S::Future, C>
where
    S: Service<Req> + Clone,
{
    pub(super) fn new(template: S, request: Req, shared: Arc<Shared>, classify: C) -> Self {
        ResponseFuture {
            inner: template.clone(),
            template,
            request,
            shared,
            classify,
            retries: 0,
            previous: Duration::ZERO,
            state: State::New,
        }
    }
}

/// What to do after an attempt.
enum Next {
    Return,
    RetryAfter(Duration),
}

impl<S, Req, C> Future for ResponseFuture<S, Req, S::Future, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<tower::BoxError>,
    C: Classify<S::Response>,
    Req: Clone,
{
    type Output = Result<S::Response, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let result = match this.state.as_mut().project() {
                StateProj::New => {
                    this.shared.first_attempt();
                    this.state.set(attempt(this.shared));
                    continue;
                }
                StateProj::CoolingDown { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Ready);
                    continue;
                }
                StateProj::Ready => match ready!(this.inner.poll_ready(cx)) {
                    Ok(()) => {
                        let future = this.inner.call(this.request.clone());
                        this.state.set(State::Calling { future });
                        continue;
                    }
                    Err(err) => {
                        // A service whose `poll_ready` failed must not be polled again.
                        *this.inner = this.template.clone();
                        Err(err.into())
                    }
                },
                StateProj::Calling { future } => ready!(future.poll(cx)).map_err(Into::into),
                StateProj::BackingOff { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(attempt(this.shared));
                    continue;
                }
                StateProj::Done => {
                    return Poll::Ready(Err("response future polled after completion".into()))
                }
            };
            match next(
                this.shared,
                this.classify,
                this.retries,
                this.previous,
                &result,
            ) {
                Next::Return => {
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
                Next::RetryAfter(delay) => {
                    // The failure is discarded: whatever it holds (a streamed body and the slot
                    // behind it) is released before the wait, not after.
                    drop(result);
                    let sleep = Box::pin(tokio::time::sleep(delay));
                    this.state.set(State::BackingOff { sleep });
                }
            }
        }
    }
}

/// The state before an attempt: waiting out a shared cool-down if one is in force, otherwise
/// ready to call.
#[inline]
fn attempt<F>(shared: &Shared) -> State<F> {
    match shared.cooldown() {
        Some(until) => cool_down(shared, until),
        None => State::Ready,
    }
}

#[cold]
fn cool_down<F>(shared: &Shared, until: tokio::time::Instant) -> State<F> {
    shared.waited_for_cooldown();
    let sleep = Box::pin(tokio::time::sleep_until(until));
    State::CoolingDown { sleep }
}

/// Classifies an attempt's result and decides whether to return it or to try again, after
/// which delay; counts how the call ended.
fn next<R, C: Classify<R>>(
    shared: &Shared,
    classify: &C,
    retries: &mut u32,
    previous: &mut Duration,
    result: &Result<R, tower::BoxError>,
) -> Next {
    let (retryable, not_before) = match classify.classify(result.as_ref()) {
        Outcome::Success => {
            shared.ended(Ending::Succeeded);
            return Next::Return;
        }
        Outcome::Failure {
            retryable,
            not_before,
        } => (retryable, not_before),
        Outcome::ClientError => (false, None),
    };
    let config = shared.config();
    // A refusal of this crate's own layers (a user's window, a full queue) concerns this
    // request, or its key, only: it delays this request, never the others.
    let from_upstream = !matches!(result, Err(err) if Rejected::find(&**err).is_some());
    if let (Some(delay), true, true) = (not_before, config.cooldown, from_upstream) {
        shared.cool_down(delay.min(config.max_retry_after));
    }
    if !retryable || *retries >= config.max_retries {
        shared.ended(Ending::Failed);
        return Next::Return;
    }
    if not_before.is_some_and(|delay| delay > config.max_retry_after) {
        tracing::debug!(
            ?not_before,
            "retry: the upstream asks for too long a wait; giving up"
        );
        shared.ended(Ending::RetryAfterTooLong);
        return Next::Return;
    }
    if !shared.try_retry() {
        tracing::debug!("retry: budget spent; returning the failure");
        shared.ended(Ending::BudgetExhausted);
        return Next::Return;
    }
    *retries += 1;
    let backoff = config.backoff.delay(*retries, *previous);
    *previous = backoff;
    let delay = backoff.max(not_before.unwrap_or(Duration::ZERO));
    tracing::info!(
        retry = *retries,
        delay_ms = delay.as_millis() as u64,
        "retry: attempt failed; trying again"
    );
    Next::RetryAfter(delay)
}

impl<S, Req, F, C> fmt::Debug for ResponseFuture<S, Req, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}
