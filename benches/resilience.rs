//! Overhead on the success path of `RetryBackoffLayer` and `CircuitBreakerLayer`, beside a bare
//! service and tower's own `Retry`, in the same run.

use std::future::{ready, Ready};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::retry::Policy;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_llm_queue::{CircuitBreakerLayer, RetryBackoffLayer};

use tower_llm_queue_servers::bench::{current_thread, immediate as upstream, Boxed};

/// tower's `Retry` with a policy that retries errors up to three times.
#[derive(Clone)]
struct Attempts(u32);

impl Policy<u64, u64, BoxError> for Attempts {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut u64, result: &mut Result<u64, BoxError>) -> Option<Self::Future> {
        match result {
            Err(_) if self.0 > 0 => {
                self.0 -= 1;
                Some(ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

fn success_path(c: &mut Criterion) {
    let runtime = current_thread();
    let mut group = c.benchmark_group("resilience_success_path");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let stacks: Vec<(&str, Boxed)> = vec![
        ("bare", Boxed::new(upstream())),
        (
            "tower_retry",
            Boxed::new(ServiceBuilder::new().retry(Attempts(3)).service(upstream())),
        ),
        (
            "retry_backoff",
            Boxed::new(
                ServiceBuilder::new()
                    .layer(RetryBackoffLayer::new(3))
                    .service(upstream()),
            ),
        ),
        (
            "circuit_breaker",
            Boxed::new(
                ServiceBuilder::new()
                    .layer(CircuitBreakerLayer::new())
                    .service(upstream()),
            ),
        ),
    ];
    for (name, svc) in stacks {
        let mut n = 0u64;
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                n += 1;
                svc.clone().oneshot(n)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, success_path);
criterion_main!(benches);
