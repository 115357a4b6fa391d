//! Overhead and throughput of the scheduling layers, beside a bare service and tower's own
//! `ConcurrencyLimit` in the same run.
//!
//! * `uncontended/*`: one request at a time through each stack; overhead = time − bare time.
//!   `readme_upstream_stack` is the README's stack around the upstream client (retry, breaker,
//!   queue, token bucket); `full_stack` is the README's recommended order in full: the edge
//!   layers (per-user limit, per-user sliding window, dedup with every request a miss) around
//!   that stack.
//! * `contended/*`: 1,000 concurrent tasks through a limit of 50, on a two-thread runtime; the
//!   inner call yields three times, as a stand-in for I/O. (Not the per-user limit over one
//!   user: its 1,000 requests are refused beyond the 50th.)

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tower::ServiceExt;

use tower_llm_queue_servers::bench::{
    current_thread, full_stack, immediate, scheduling_stacks, two_threads, upstream_stack, yielding,
};

fn uncontended(c: &mut Criterion) {
    let runtime = current_thread();
    let mut group = c.benchmark_group("uncontended");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut stacks = scheduling_stacks(immediate());
    stacks.push(("readme_upstream_stack", upstream_stack(immediate())));
    stacks.push(("full_stack", full_stack(immediate())));
    for (name, svc) in stacks {
        let mut n = 0u64;
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                n += 1;
                let svc = svc.clone();
                async move { svc.oneshot(n).await.unwrap() }
            })
        });
    }
    group.finish();
}

fn contended(c: &mut Criterion) {
    let runtime = two_threads();
    let mut group = c.benchmark_group("contended_1000_tasks_limit_50");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(20)
        .throughput(Throughput::Elements(1_000));
    for (name, svc) in scheduling_stacks(yielding(3)) {
        // One user's 1,000 requests against a per-user limit of 50 are refused, by design.
        if name == "bare" || name == "per_user_one_user" {
            continue;
        }
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let svc = svc.clone();
                async move {
                    let tasks: Vec<_> = (0..1_000u64)
                        .map(|n| tokio::spawn(svc.clone().oneshot(n)))
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

criterion_group!(benches, uncontended, contended);
criterion_main!(benches);
