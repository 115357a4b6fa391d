use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::classify::{HttpClassifier, Outcome};

type Response = http::Response<()>;

/// A status and the headers that come with it.
type Answer = (u16, Vec<(&'static str, &'static str)>);

/// An upstream that answers with the given statuses in turn (the last one forever), with
/// optional headers, and records when each attempt came.
#[derive(Clone)]
struct Scripted {
    answers: Arc<Vec<Answer>>,
    attempts: Arc<Mutex<Vec<Instant>>>,
}

impl Scripted {
    fn new(answers: Vec<Answer>) -> Self {
        Scripted {
            answers: Arc::new(answers),
            attempts: Arc::default(),
        }
    }

    fn service<Req: Send + 'static>(
        &self,
    ) -> impl Service<Req, Response = Response, Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        let this = self.clone();
        service_fn(move |_: Req| {
            let mut attempts = this.attempts.lock().unwrap();
            attempts.push(Instant::now());
            let (status, headers) = &this.answers[(attempts.len() - 1).min(this.answers.len() - 1)];
            let mut response = http::Response::builder().status(*status);
            for (k, v) in headers {
                response = response.header(*k, *v);
            }
            let response = response.body(()).unwrap();
            async move { Ok::<_, BoxError>(response) }
        })
    }

    fn gaps(&self) -> Vec<u64> {
        let at = self.attempts.lock().unwrap();
        at.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect()
    }
}

fn seed_000() -> RetryBackoffLayer<HttpClassifier> {
    RetryBackoffLayer::new(3)
        .backoff(Backoff::exponential(
            Duration::from_secs(2),
            2.0,
            Duration::from_secs(60),
        ))
        .classify(HttpClassifier)
}

#[tokio::test(start_paused = true)]
async fn seed_000_retries_after_2_4_and_8_seconds() {
    let up = Scripted::new(vec![(503, vec![])]);
    let layer = seed_000();
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let response = svc.oneshot(()).await.unwrap();
    assert_eq!(response.status(), 503, "the upstream's own last answer");
    assert_eq!(up.gaps(), [2, 4, 8]);
    let stats = handle.stats();
    assert_eq!((stats.calls, stats.retries, stats.failed), (1, 3, 1));
}

#[tokio::test(start_paused = true)]
async fn what_cannot_succeed_is_not_retried() {
    for status in [400, 401, 403, 404, 409, 422] {
        let up = Scripted::new(vec![(status, vec![])]);
        let svc = ServiceBuilder::new()
            .layer(seed_000())
            .service(up.service());
        assert_eq!(svc.oneshot(()).await.unwrap().status(), status);
        assert_eq!(up.attempts.lock().unwrap().len(), 1, "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_upstreams_delay_wins_over_the_backoff() {
    for headers in [
        vec![("retry-after", "10")],
        vec![("retry-after-ms", "10000")],
        vec![("x-ratelimit-reset-requests", "10s")],
    ] {
        let up = Scripted::new(vec![(429, headers.clone()), (200, vec![])]);
        let svc = ServiceBuilder::new()
            .layer(seed_000().cooldown(false))
            .service(up.service());
        assert_eq!(svc.oneshot(()).await.unwrap().status(), 200);
        assert_eq!(up.gaps(), [10], "{headers:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_delay_beyond_the_cap_returns_at_once() {
    let up = Scripted::new(vec![(429, vec![("retry-after", "3600")])]);
    let layer = seed_000().max_retry_after(Duration::from_secs(30));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let started = Instant::now();
    assert_eq!(svc.oneshot(()).await.unwrap().status(), 429);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(handle.stats().retry_after_too_long, 1);
}

#[tokio::test(start_paused = true)]
async fn a_cooldown_holds_back_first_attempts_too() {
    let up = Scripted::new(vec![(429, vec![("retry-after", "5")]), (200, vec![])]);
    let layer = seed_000();
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let started = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A new request arrives while the upstream said "not before 5 s".
    assert_eq!(svc.oneshot(()).await.unwrap().status(), 200);
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    let attempts = up.attempts.lock().unwrap();
    assert_eq!(attempts.len(), 3);
    assert!(attempts[1..]
        .iter()
        .all(|at| *at - started >= Duration::from_secs(5)));
    assert!(handle.stats().cooled_down >= 1);
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_a_storm() {
    let up = Scripted::new(vec![(503, vec![])]);
    let layer = RetryBackoffLayer::new(5)
        .classify(HttpClassifier)
        .budget(RetryBudget::new(0.1, 1, Duration::from_secs(10)));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let calls: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(())))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 503);
    }
    let stats = handle.stats();
    // Without a budget: 100 × 5 retries. With it: 10 (floor) + 10% of 100.
    assert!(stats.retries <= 20, "{stats:?}");
    assert_eq!(
        up.attempts.lock().unwrap().len() as u64,
        100 + stats.retries
    );
    assert!(stats.budget_exhausted >= 80);
}

#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::SeqCst);
        Counted(self.0.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn the_request_is_cloned_once_per_attempt() {
    let up = Scripted::new(vec![(503, vec![]), (503, vec![]), (200, vec![])]);
    let svc = ServiceBuilder::new()
        .layer(seed_000())
        .service(up.service::<Counted>());
    let clones = Arc::new(AtomicUsize::new(0));
    let response = svc.oneshot(Counted(clones.clone())).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(up.attempts.lock().unwrap().len(), 3);
    assert_eq!(clones.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn errors_are_retried_and_the_last_one_returned() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let svc = ServiceBuilder::new()
        .layer(RetryBackoffLayer::new(2))
        .service(service_fn(move |_: ()| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move { Err::<(), BoxError>(format!("connection reset {n}").into()) }
        }));
    let err = svc.oneshot(()).await.unwrap_err();
    assert_eq!(err.to_string(), "connection reset 2");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_for_one_key_delays_only_that_request() {
    // Per-user windows inside the retry layer: ada has spent hers, bob has not.
    let layer = RetryBackoffLayer::new(2);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(
            crate::SlidingWindowLayer::new(1, Duration::from_secs(60))
                .keyed_by(|user: &&'static str| *user),
        )
        .service(service_fn(|user: &'static str| async move {
            Ok::<_, BoxError>(user)
        }));
    svc.clone().oneshot("ada").await.unwrap();
    let ada = tokio::spawn(svc.clone().oneshot("ada"));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let started = Instant::now();
    assert_eq!(svc.clone().oneshot("bob").await.unwrap(), "bob");
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "bob does not wait for ada's window"
    );
    assert_eq!(handle.stats().cooldown_remaining, Duration::ZERO);
    // Ada's request itself waits for her window, then succeeds.
    assert_eq!(ada.await.unwrap().unwrap(), "ada");
}

#[tokio::test(start_paused = true)]
async fn a_discarded_failure_releases_its_slot_before_the_backoff() {
    // A queue that holds its slot until the body ends, inside the retry layer: the 503's body
    // must be gone while the retry sleeps, or the slot stays taken.
    let queue = crate::PriorityQueueLayer::new(1).hold_until_body_end();
    let stats = queue.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(
            RetryBackoffLayer::new(1)
                .backoff(Backoff::exponential(
                    Duration::from_secs(10),
                    1.0,
                    Duration::from_secs(10),
                ))
                .classify(HttpClassifier),
        )
        .layer(queue)
        .service(service_fn(move |_: ()| {
            let status = if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                503
            } else {
                200
            };
            async move {
                Ok::<_, BoxError>(
                    http::Response::builder()
                        .status(status)
                        .body(http_body_util::Full::new(bytes::Bytes::from("x")))
                        .unwrap(),
                )
            }
        }));
    let call = tokio::spawn(svc.oneshot(()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(stats.stats().running, 0, "the discarded 503 holds no slot");
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// A service whose first `poll_ready` fails: tower's contract is that the instance that failed
/// is discarded, never polled again.
#[derive(Clone)]
struct FailsReadyOnce {
    failed: bool,
    fail_next: Arc<std::sync::atomic::AtomicBool>,
    polled_after_failure: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Service<()> for FailsReadyOnce {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        if self.failed {
            self.polled_after_failure.fetch_add(1, Ordering::SeqCst);
            return std::task::Poll::Ready(Ok(()));
        }
        if self.fail_next.swap(false, Ordering::SeqCst) {
            self.failed = true;
            return std::task::Poll::Ready(Err("not ready".into()));
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_service_that_failed_poll_ready_is_replaced() {
    let inner = FailsReadyOnce {
        failed: false,
        fail_next: Arc::new(true.into()),
        polled_after_failure: Arc::default(),
        calls: Arc::default(),
    };
    let svc = ServiceBuilder::new()
        .layer(RetryBackoffLayer::new(2))
        .service(inner.clone());
    svc.oneshot(()).await.unwrap();
    assert_eq!(inner.polled_after_failure.load(Ordering::SeqCst), 0);
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn huge_delays_and_budgets_do_not_overflow() {
    // Headers cap their delays at a week; a classifier of one's own may ask for anything.
    let forever = |result: Result<&Response, &BoxError>| match result {
        Ok(r) if r.status() == 429 => Outcome::Failure {
            retryable: true,
            not_before: Some(Duration::MAX),
        },
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::RETRYABLE,
    };
    let up = Scripted::new(vec![(429, vec![]), (200, vec![])]);
    let layer = seed_000()
        .classify(forever)
        .max_retry_after(Duration::MAX)
        .budget(RetryBudget::new(f64::NAN, u32::MAX, Duration::MAX));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let call = tokio::spawn(svc.oneshot(()));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!call.is_finished(), "it waits as the upstream asked");
    assert!(handle.stats().cooldown_remaining > Duration::from_secs(3600));
    call.abort();

    for ratio in [f64::INFINITY, f64::NEG_INFINITY, -1.0, f64::MAX] {
        let up = Scripted::new(vec![(503, vec![]), (200, vec![])]);
        let layer = seed_000().budget(RetryBudget::new(ratio, u32::MAX, Duration::MAX));
        let svc = ServiceBuilder::new().layer(layer).service(up.service());
        assert_eq!(svc.oneshot(()).await.unwrap().status(), 200, "{ratio}");
    }
}

#[tokio::test(start_paused = true)]
async fn settings_apply_to_every_clone_and_service() {
    let layer = seed_000();
    let up = Scripted::new(vec![(429, vec![("retry-after", "30")]), (200, vec![])]);
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(up.service());
    // Changed through a clone after the service was built: the service follows.
    let _ = layer.max_retry_after(Duration::from_secs(10));
    let started = Instant::now();
    assert_eq!(svc.oneshot(()).await.unwrap().status(), 429);
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "30 s is beyond the new cap"
    );
}
