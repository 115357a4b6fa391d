//! Runs a number of requests, one at a time, through one stack: the driver for counting
//! instructions per request with callgrind, which, unlike wall-clock time, does not depend on
//! what else the machine is doing.
//!
//! ```text
//! cargo bench --bench instructions --no-run
//! valgrind --tool=callgrind target/release/deps/instructions-* priority_queue 20000
//! ```
//!
//! Run each stack twice with different counts: the difference of the two totals divided by the
//! difference of the counts is the cost of one request, start-up excluded. Without arguments it
//! runs every stack briefly and prints the names. `contended_<stack> <rounds>` runs the
//! contended workload of `benches/queue.rs` instead, for a sampling profiler such as `perf`;
//! `queued_<stack> <rounds>` runs it on one thread, where the count of a round does not move,
//! to count what a request that waits costs.

use tower::ServiceExt;

use tower_llm_queue_servers::bench::{
    current_thread, full_stack, immediate, rate_stacks, scheduling_stacks, tower_retry,
    two_threads, upstream_stack, yielding, Boxed,
};

fn stacks() -> Vec<(String, Boxed)> {
    use tower::ServiceBuilder;
    use tower_llm_queue::{CircuitBreakerLayer, DedupLayer, RetryBackoffLayer};
    let mut stacks: Vec<(String, Boxed)> = scheduling_stacks(immediate())
        .into_iter()
        .map(|(name, stack)| (name.to_string(), stack))
        .collect();
    stacks.extend(rate_stacks(immediate(), 100));
    let others: Vec<(&str, Boxed)> = vec![
        ("tower_retry", tower_retry(immediate())),
        (
            "retry_backoff",
            Boxed::new(
                ServiceBuilder::new()
                    .layer(RetryBackoffLayer::new(3))
                    .service(immediate()),
            ),
        ),
        (
            "circuit_breaker",
            Boxed::new(
                ServiceBuilder::new()
                    .layer(CircuitBreakerLayer::new())
                    .service(immediate()),
            ),
        ),
        ("readme_upstream_stack", upstream_stack(immediate())),
        ("full_stack", full_stack(immediate())),
        ("yielding_bare", Boxed::new(yielding(1))),
        (
            "dedup_miss",
            Boxed::new(
                ServiceBuilder::new()
                    .layer(DedupLayer::new(|n: &u64| Some(*n)))
                    .service(yielding(1)),
            ),
        ),
    ];
    stacks.extend(
        others
            .into_iter()
            .map(|(name, stack)| (name.to_string(), stack)),
    );
    stacks
}

/// The contended workload of `benches/queue.rs`, `rounds` times, on `runtime`: 1,000 tasks at
/// once through a limit of 50, the inner call yielding three times. On two threads it is for a
/// profiler, not for counting: the threads' interleaving moves its instruction counts.
fn contended(name: &str, rounds: u64, runtime: tokio::runtime::Runtime) {
    let Some((_, svc)) = scheduling_stacks(yielding(3))
        .into_iter()
        .find(|(stack, _)| *stack == name)
    else {
        eprintln!("no scheduling stack named {name}");
        std::process::exit(2);
    };
    runtime.block_on(async {
        for _ in 0..rounds {
            let tasks: Vec<_> = (0..1_000u64)
                .map(|n| tokio::spawn(svc.clone().oneshot(n)))
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let only = args.first().cloned();
    let count: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1_000);
    if let Some(stack) = only.as_deref().and_then(|s| s.strip_prefix("contended_")) {
        return contended(stack, count, two_threads());
    }
    if let Some(stack) = only.as_deref().and_then(|s| s.strip_prefix("queued_")) {
        return contended(stack, count, current_thread());
    }
    let runtime = current_thread();
    for (name, svc) in stacks() {
        if only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        runtime.block_on(async {
            for n in 0..count {
                svc.clone().oneshot(n).await.unwrap();
            }
        });
        if only.is_none() {
            println!("{name}");
        }
    }
}
