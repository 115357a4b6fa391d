//! Overhead of `DedupLayer` on a miss and on a cache hit beside a bare service, and 1,000
//! concurrent identical callers with and without the layer, in the same run.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_queue::DedupLayer;

use tower_llm_queue_servers::bench::{current_thread, yielding};

fn upstream(
) -> impl tower::Service<u64, Response = u64, Error = tower::BoxError, Future = impl Send>
       + Clone
       + Send
       + 'static {
    yielding(1)
}

fn overhead(c: &mut Criterion) {
    let runtime = current_thread();
    let mut group = c.benchmark_group("dedup");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let bare = upstream();
    group.bench_function("bare", |b| {
        b.to_async(&runtime).iter(|| bare.clone().oneshot(1))
    });

    let miss = ServiceBuilder::new()
        .layer(DedupLayer::new(|n: &u64| Some(*n)))
        .service(upstream());
    let mut n = 0u64;
    group.bench_function("miss", |b| {
        b.to_async(&runtime).iter(|| {
            n += 1;
            miss.clone().oneshot(n)
        })
    });

    let hit = ServiceBuilder::new()
        .layer(DedupLayer::new(|n: &u64| Some(*n)).ttl(Duration::from_secs(3600)))
        .service(upstream());
    group.bench_function("hit", |b| {
        b.to_async(&runtime).iter(|| hit.clone().oneshot(7))
    });
    group.finish();

    let mut group = c.benchmark_group("dedup_1000_identical_callers");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .throughput(Throughput::Elements(1_000));
    let shared = ServiceBuilder::new()
        .layer(DedupLayer::new(|n: &u64| Some(*n)))
        .service(upstream());
    for (name, svc) in [
        ("bare", tower::util::BoxCloneService::new(upstream())),
        ("dedup", tower::util::BoxCloneService::new(shared)),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let svc = svc.clone();
                async move {
                    let tasks: Vec<_> = (0..1_000)
                        .map(|_| tokio::spawn(svc.clone().oneshot(42)))
                        .collect();
                    for t in tasks {
                        t.await.unwrap().unwrap();
                    }
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
