use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::classify::HttpClassifier;

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
