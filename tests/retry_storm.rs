//! The retry storm of seed 002, in process and in paused time: 50 clients share an upstream
//! that allows a fixed number of requests per second and answers 429 with `Retry-After` above
//! it. Naive retries (a short fixed delay, the upstream's delay ignored) against
//! `RetryBackoffLayer` (the upstream's delay, a budget and a shared cool-down).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tower::{service_fn, BoxError, Service, ServiceExt};
use tower_llm_queue::classify::HttpClassifier;
use tower_llm_queue::RetryBackoffLayer;

const CLIENTS: u64 = 50;
const REQUESTS_PER_CLIENT: u64 = 10;
const ALLOWED_PER_SECOND: u64 = 40;
const THINK: Duration = Duration::from_millis(1000);

/// Allows `ALLOWED_PER_SECOND` calls in each one-second window; above it, 429 with the time to
/// the next window in `retry-after-ms`.
#[derive(Clone)]
struct Upstream {
    started: Instant,
    window: Arc<Mutex<(u64, u64)>>,
    attempts: Arc<AtomicU64>,
    successes: Arc<AtomicU64>,
}

impl Upstream {
    fn new() -> Self {
        Upstream {
            started: Instant::now(),
            window: Arc::new(Mutex::new((0, 0))),
            attempts: Arc::default(),
            successes: Arc::default(),
        }
    }

    fn service(
        &self,
    ) -> impl Service<u64, Response = http::Response<()>, Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        let this = self.clone();
        service_fn(move |_: u64| {
            this.attempts.fetch_add(1, Ordering::SeqCst);
            let elapsed = this.started.elapsed();
            let second = elapsed.as_secs();
            let mut window = this.window.lock().unwrap();
            if window.0 != second {
                *window = (second, 0);
            }
            window.1 += 1;
            let allowed = window.1 <= ALLOWED_PER_SECOND;
            let response = if allowed {
                this.successes.fetch_add(1, Ordering::SeqCst);
                http::Response::builder().status(200).body(()).unwrap()
            } else {
                let next = Duration::from_secs(second + 1) - elapsed;
                http::Response::builder()
                    .status(429)
                    .header("retry-after-ms", next.as_millis().max(1).to_string())
                    .body(())
                    .unwrap()
            };
            async move {
                sleep(Duration::from_millis(50)).await;
                Ok::<_, BoxError>(response)
            }
        })
    }
}

struct Report {
    attempts_per_success: f64,
    served: u64,
    drain: Duration,
}

/// Every client sends its requests one after another, with a pause between them, starting at a
/// spread of phases; a request counts as served when it finally got a 200.
async fn run<S>(svc: S, upstream: &Upstream) -> Report
where
    S: Service<u64, Response = http::Response<()>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let started = Instant::now();
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let svc = svc.clone();
            let served = served.clone();
            tokio::spawn(async move {
                sleep(Duration::from_millis(client * 1000 / CLIENTS)).await;
                for n in 0..REQUESTS_PER_CLIENT {
                    let ok = matches!(
                        svc.clone().oneshot(client * 100 + n).await,
                        Ok(r) if r.status() == 200
                    );
                    if ok {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    sleep(THINK).await;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let attempts = upstream.attempts.load(Ordering::SeqCst) as f64;
    let successes = upstream.successes.load(Ordering::SeqCst).max(1) as f64;
    Report {
        attempts_per_success: attempts / successes,
        served: served.load(Ordering::SeqCst),
        drain: started.elapsed(),
    }
}

/// Retries up to 5 times after a fixed 100 ms, whatever the upstream said.
fn naive<S>(
    inner: S,
) -> impl Service<u64, Response = http::Response<()>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + 'static
where
    S: Service<u64, Response = http::Response<()>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    service_fn(move |req: u64| {
        let inner = inner.clone();
        async move {
            let mut last = inner.clone().oneshot(req).await?;
            for _ in 0..5 {
                if last.status() != 429 {
                    break;
                }
                sleep(Duration::from_millis(100)).await;
                last = inner.clone().oneshot(req).await?;
            }
            Ok::<_, BoxError>(last)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn budget_and_cooldown_end_the_storm() {
    let total = CLIENTS * REQUESTS_PER_CLIENT;

    let upstream = Upstream::new();
    let storm = run(naive(upstream.service()), &upstream).await;

    let upstream = Upstream::new();
    let layered = tower::ServiceBuilder::new()
        .layer(
            RetryBackoffLayer::new(5)
                .classify(HttpClassifier)
                .max_retry_after(Duration::from_secs(5)),
        )
        .service(upstream.service());
    let calm = run(layered, &upstream).await;

    println!(
        "naive retries: {:.2} upstream attempts per success, {}/{} served, drained in {:.1} s",
        storm.attempts_per_success,
        storm.served,
        total,
        storm.drain.as_secs_f64()
    );
    println!(
        "RetryBackoffLayer: {:.2} upstream attempts per success, {}/{} served, drained in {:.1} s",
        calm.attempts_per_success,
        calm.served,
        total,
        calm.drain.as_secs_f64()
    );
    assert_eq!(calm.served, total, "every client is served");
    assert!(
        calm.attempts_per_success < 1.2,
        "{:.2}",
        calm.attempts_per_success
    );
    assert!(storm.attempts_per_success > calm.attempts_per_success);
}
