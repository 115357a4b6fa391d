//! Overhead on the success path of `RetryBackoffLayer` and `CircuitBreakerLayer`, beside a bare
//! service and tower's own `Retry`, in the same run.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_queue::{CircuitBreakerLayer, RetryBackoffLayer};

use tower_llm_queue_servers::bench::{current_thread, immediate as upstream, tower_retry, Boxed};

fn success_path(c: &mut Criterion) {
    let runtime = current_thread();
    let mut group = c.benchmark_group("resilience_success_path");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let stacks: Vec<(&str, Boxed)> = vec![
        ("bare", Boxed::new(upstream())),
        ("tower_retry", tower_retry(upstream())),
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
