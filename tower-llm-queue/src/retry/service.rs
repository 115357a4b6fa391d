use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use crate::classify::{Classify, Outcome};
use crate::rejected::Rejected;

use super::state::{Ending, Shared};
use super::Config;
use super::ResponseFuture;
use super::RetryHandle;

/// Retries failed calls with backoff, honouring the upstream's retry delays, a retry budget and
/// a shared cool-down. Built by [`RetryBackoffLayer`](super::RetryBackoffLayer).
#[derive(Clone)]
pub struct RetryBackoff<S, C> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared>,
    pub(super) classify: C,
    /// The layer's settings as last read, and their version.
    pub(super) settings: (Config, u64),
}

impl<S, C> RetryBackoff<S, C> {
    /// Reads the layer's stats.
    pub fn handle(&self) -> RetryHandle {
        RetryHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C, Req> Service<Req> for RetryBackoff<S, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<tower::BoxError>,
    C: Classify<S::Response> + Clone + Send + 'static,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if self.shared.version() != self.settings.1 {
            self.settings = self.shared.settings();
        }
        ResponseFuture::new(attempts(
            self.inner.clone(),
            request,
            self.shared.clone(),
            self.settings.0,
            self.classify.clone(),
        ))
    }
}

async fn attempts<S, C, Req>(
    template: S,
    request: Req,
    shared: Arc<Shared>,
    config: Config,
    classify: C,
) -> Result<S::Response, tower::BoxError>
where
    S: Service<Req> + Clone,
    S::Error: Into<tower::BoxError>,
    C: Classify<S::Response>,
    Req: Clone,
{
    shared.first_attempt();
    let mut inner = template.clone();
    let mut retries = 0u32;
    let mut previous = config.backoff.initial();
    loop {
        if config.cooldown {
            if let Some(until) = shared.cooldown() {
                shared.waited_for_cooldown();
                // Boxed, as the backoff's sleep below: a timer is large, and held in the state
                // of every call, most of which never wait.
                Box::pin(tokio::time::sleep_until(until)).await;
            }
        }
        let ready: Result<(), tower::BoxError> = std::future::poll_fn(|cx| inner.poll_ready(cx))
            .await
            .map_err(Into::into);
        let result = match ready {
            Ok(()) => inner.call(request.clone()).await.map_err(Into::into),
            Err(err) => {
                // A service whose `poll_ready` failed must not be polled again.
                inner = template.clone();
                Err(err)
            }
        };
        let (retryable, not_before) = match classify.classify(result.as_ref()) {
            Outcome::Success => {
                shared.ended(Ending::Succeeded);
                return result;
            }
            Outcome::Failure {
                retryable,
                not_before,
            } => (retryable, not_before),
            Outcome::ClientError => (false, None),
        };
        // A refusal of this crate's own layers (a user's window, a full queue) concerns this
        // request, or its key, only: it delays this request, never the others.
        let from_upstream = !matches!(&result, Err(err) if Rejected::find(&**err).is_some());
        if let (Some(delay), true, true) = (not_before, config.cooldown, from_upstream) {
            shared.cool_down(delay.min(config.max_retry_after));
        }
        if !retryable || retries >= config.max_retries {
            shared.ended(Ending::Failed);
            return result;
        }
        if not_before.is_some_and(|delay| delay > config.max_retry_after) {
            tracing::debug!(
                ?not_before,
                "retry: the upstream asks for too long a wait; giving up"
            );
            shared.ended(Ending::RetryAfterTooLong);
            return result;
        }
        if !shared.try_retry() {
            tracing::debug!("retry: budget spent; returning the failure");
            shared.ended(Ending::BudgetExhausted);
            return result;
        }
        // The failure is discarded: whatever it holds (a streamed body and the slot behind it)
        // is released before the wait, not after.
        drop(result);
        retries += 1;
        let backoff = config.backoff.delay(retries, previous);
        previous = backoff;
        let delay = backoff.max(not_before.unwrap_or(Duration::ZERO));
        tracing::info!(
            retry = retries,
            delay_ms = delay.as_millis() as u64,
            "retry: attempt failed; trying again"
        );
        Box::pin(tokio::time::sleep(delay)).await;
    }
}

impl<S: fmt::Debug, C> fmt::Debug for RetryBackoff<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBackoff")
            .field("inner", &self.inner)
            .field("config", &self.shared.config())
            .finish_non_exhaustive()
    }
}
