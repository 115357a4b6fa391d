//! Cost of joining and leaving a queue that already holds many waiting requests: admission and
//! release must stay O(log n), so 100,000 waiting may cost only a small factor more than 100.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tower::{Service, ServiceBuilder};
use tower_llm_queue::PriorityQueueLayer;

use tower_llm_queue_servers::bench::immediate as upstream;

fn join_and_leave(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue_depth/join_and_leave");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for fair in [false, true] {
        for depth in [100u64, 10_000, 100_000] {
            let layer = PriorityQueueLayer::new(1)
                .capacity(200_000)
                .priority(|n: &u64| (n % 5) as u8 + 1);
            let name = if fair {
                "fair_1000_users"
            } else {
                "arrival_order"
            };
            let mut svc = if fair {
                ServiceBuilder::new()
                    .boxed()
                    .layer(layer.fair_by(|n: &u64| n % 1_000))
                    .service(upstream())
            } else {
                ServiceBuilder::new()
                    .boxed()
                    .layer(layer)
                    .service(upstream())
            };
            // One request holds the only slot; `depth` more wait behind it.
            let waiting: Vec<_> = (0..=depth).map(|n| svc.call(n)).collect();
            let mut n = depth;
            group.bench_with_input(BenchmarkId::new(name, depth), &depth, |b, _| {
                b.iter(|| {
                    n += 1;
                    drop(svc.call(n));
                })
            });
            drop(waiting);
        }
    }
    group.finish();
}

criterion_group!(benches, join_and_leave);
criterion_main!(benches);
