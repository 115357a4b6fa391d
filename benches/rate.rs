//! The cost of one rate-limit decision, in memory, globally and keyed over 1,000 keys, beside
//! `governor` and tower's own `RateLimit` in the same run. Every side is a tower service around
//! the same bare upstream, so the figures include one service call each.
//!
//! tower's `RateLimit` is driven differently, as its users must: it is not `Clone` (it keeps the
//! period's count and a timer in the service itself, and makes callers wait in `poll_ready`),
//! so one service is called again and again, `ready().await` then `call`, where the other rows
//! clone a shared service and `oneshot` it (what a server does per request). Its overhead is
//! measured against `bare_ready_call`, the bare upstream driven the same way, not against
//! `bare`.
//!
//! Through Redis (when it can be reached at `REDIS_URL`), in one group so that the figures come
//! from the same run: the token bucket's decisions, and the concurrency limits' acquisition and
//! release of a leased slot, 50 tasks on one connection.

use std::future::{ready, Ready};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use governor::{Quota, RateLimiter};
use tower::util::BoxService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_llm_queue::rate::Rate;
use tower_llm_queue::TokenBucketLayer;
use tower_llm_queue::{PerUserConcurrencyLayer, PriorityQueueLayer};

use tower_llm_queue_servers::bench::{
    current_thread, immediate as upstream, rate_stacks, two_threads, Boxed,
};

type Keyed = RateLimiter<
    u64,
    governor::state::keyed::DefaultKeyedStateStore<u64>,
    governor::clock::DefaultClock,
>;

/// A tower service that asks governor's keyed limiter, then answers.
#[derive(Clone)]
struct Governed {
    limiter: Arc<Keyed>,
    keys: u64,
}

impl Service<u64> for Governed {
    type Response = u64;
    type Error = BoxError;
    type Future = Ready<Result<u64, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, n: u64) -> Self::Future {
        match self.limiter.check_key(&(n % self.keys)) {
            Ok(()) => ready(Ok(n)),
            Err(_) => ready(Err("rate limited".into())),
        }
    }
}

fn decisions(c: &mut Criterion) {
    let runtime = current_thread();
    let mut group = c.benchmark_group("rate_decision");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let huge = NonZeroU32::new(1_000_000_000).unwrap();
    let quota = Quota::per_second(huge).allow_burst(huge);
    let mut stacks: Vec<(String, Boxed)> = vec![
        ("bare", Boxed::new(upstream())),
        (
            "governor_keyed_1000",
            Boxed::new(Governed {
                limiter: Arc::new(RateLimiter::keyed(quota)),
                keys: 1_000,
            }),
        ),
        (
            "governor_global",
            Boxed::new(Governed {
                limiter: Arc::new(RateLimiter::keyed(quota)),
                keys: 1,
            }),
        ),
    ]
    .into_iter()
    .map(|(name, stack): (&str, Boxed)| (name.to_string(), stack))
    .collect();
    stacks.extend(rate_stacks(upstream(), 1_000));
    for (name, svc) in stacks {
        let mut n = 0u64;
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                n += 1;
                svc.clone().oneshot(n)
            })
        });
    }
    // tower's `RateLimit` counts requests in the service and, once a period's are spent, sleeps
    // in `poll_ready`: a clone would count on its own, so it cannot be shared by cloning like
    // the rows above (a server shares it behind a `Buffer`, whose channel and worker task would
    // then be most of the figure). It is called the way its docs show, `ready().await` then
    // `call`, on one service, with `u64::MAX` requests per second: it never waits, and every
    // call still reads the clock and counts. Its future is boxed like the others' (a
    // `BoxService`); `bare_ready_call` is its anchor, the bare upstream driven the same way.
    // (`RateLimit::new` makes its timer at once: it needs the runtime's context.)
    let context = runtime.enter();
    let tower_rows: Vec<(&str, BoxService<u64, u64, BoxError>)> = vec![
        ("bare_ready_call", BoxService::new(upstream())),
        (
            "tower_rate_limit",
            BoxService::new(
                ServiceBuilder::new()
                    .rate_limit(u64::MAX, Duration::from_secs(1))
                    .service(upstream()),
            ),
        ),
    ];
    drop(context);
    for (name, mut svc) in tower_rows {
        let mut n = 0u64;
        group.bench_function(name, |b| {
            // `to_async(..).iter` takes a closure that returns a future, which may not borrow
            // the service mutably; this is the same loop (one `block_on` per sample, the
            // results through `black_box`) with the borrow inside it.
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = std::time::Instant::now();
                    for _ in 0..iters {
                        n += 1;
                        let ready = svc.ready().await.unwrap();
                        black_box(ready.call(n).await.unwrap());
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// Through Redis: 50 concurrent tasks, one connection (a `RedisStore` multiplexes), 1,000
/// requests per iteration, each one rate decision — or one slot acquired and released (two
/// scripts). Skipped when Redis is not reachable.
fn redis_decisions(c: &mut Criterion) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let reachable = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
        .is_ok();
    if !reachable {
        eprintln!("skipping the Redis benchmark: no server at {url}");
        return;
    }
    let runtime = two_threads();
    let mut group = c.benchmark_group("redis_50_tasks");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(10)
        .throughput(criterion::Throughput::Elements(1_000));
    let prefix = format!("tlq-bench:{}", std::process::id());
    let store = tower_llm_queue::store::RedisStore::new(&url, prefix).unwrap();
    let stacks = [
        (
            "token_bucket_keyed",
            Boxed::new(
                ServiceBuilder::new()
                    .layer(
                        TokenBucketLayer::new(Rate::per_second(1_000_000_000), 1_000_000_000)
                            .keyed_by(|n: &u64| n % 1_000)
                            .store(store.scope("bucket")),
                    )
                    .service(upstream()),
            ),
        ),
        // Room for all 50: every request takes a slot at once and gives it back.
        (
            "queue_slot_acquire_release",
            Boxed::new(
                ServiceBuilder::new()
                    .layer(PriorityQueueLayer::new(100).store(store.scope("queue")))
                    .service(upstream()),
            ),
        ),
        (
            "per_user_slot_acquire_release_1000_users",
            Boxed::new(
                ServiceBuilder::new()
                    .layer(
                        PerUserConcurrencyLayer::new(100, |n: &u64| n % 1_000)
                            .store(store.scope("per-user")),
                    )
                    .service(upstream()),
            ),
        ),
    ];
    let stacks = stacks.into_iter().map(|(name, svc)| (name, vec![svc]));
    // Two queues (two processes, as far as Redis knows) of 10 sharing 10 slots, 25 tasks each:
    // half the requests wait in line for a slot the other process frees, woken by pub/sub.
    let contended = (0..2)
        .map(|_| {
            Boxed::new(
                ServiceBuilder::new()
                    .layer(PriorityQueueLayer::new(10).store(store.scope("queue-10")))
                    .service(upstream()),
            )
        })
        .collect();
    let stacks = stacks.chain([("two_queues_sharing_10_slots", contended)]);
    for (name, services) in stacks {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let services = services.clone();
                async move {
                    let tasks: Vec<_> = (0..50u64)
                        .map(|t| {
                            let svc = services[t as usize % services.len()].clone();
                            tokio::spawn(async move {
                                for n in 0..20u64 {
                                    svc.clone().oneshot(t * 20 + n).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decisions, redis_decisions);
criterion_main!(benches);
