//! Shared code for the reference servers, tests and benchmarks of `tower-llm-queue`.
//!
//! This package is not published. It holds what the examples in `examples/`, the tests in
//! `tests/` and the benchmarks in `benches/` have in common.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod config;
pub mod errors;
pub mod loadgen;
pub mod mock;
pub mod scale_out;
pub mod serve;
pub mod upstream;
pub mod user;

pub mod bench {
    //! The upstreams and runtimes the benchmarks share, so that every layer is measured
    //! against the same anchor.

    use tower::{service_fn, BoxError, Service};

    /// A boxed, cloneable service of the benchmarks' shape.
    pub type Boxed = tower::util::BoxCloneService<u64, u64, BoxError>;

    /// An upstream that answers at once with its request: what remains is the layers' own cost.
    pub fn immediate(
    ) -> impl Service<u64, Response = u64, Error = BoxError, Future = impl Send> + Clone + Send + 'static
    {
        service_fn(|n: u64| async move { Ok::<_, BoxError>(n) })
    }

    /// An upstream that yields to the scheduler `times` times before answering, a stand-in for
    /// I/O that lets other tasks run.
    pub fn yielding(
        times: u32,
    ) -> impl Service<u64, Response = u64, Error = BoxError, Future = impl Send> + Clone + Send + 'static
    {
        service_fn(move |n: u64| async move {
            for _ in 0..times {
                tokio::task::yield_now().await;
            }
            Ok::<_, BoxError>(n)
        })
    }

    /// A single-threaded runtime for overhead measurements.
    pub fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    }

    /// A two-thread runtime for measurements under contention.
    pub fn two_threads() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    }

    /// The scheduling layers beside their anchors, each around `inner` and each with a limit of
    /// 50, by name: `bare`, tower's `concurrency_limit`, the queue without and with `fair_by`,
    /// and the per-user limit over 100 users taking turns, over users who each arrive once
    /// (the request's number is its user), and over one user.
    pub fn scheduling_stacks<S>(inner: S) -> Vec<(&'static str, Boxed)>
    where
        S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        use tower::ServiceBuilder;
        use tower_llm_queue::{PerUserConcurrencyLayer, PriorityQueueLayer};
        vec![
            ("bare", Boxed::new(inner.clone())),
            (
                "concurrency_limit",
                Boxed::new(
                    ServiceBuilder::new()
                        .concurrency_limit(50)
                        .service(inner.clone()),
                ),
            ),
            (
                "priority_queue",
                Boxed::new(
                    ServiceBuilder::new()
                        .layer(PriorityQueueLayer::new(50).capacity(10_000))
                        .service(inner.clone()),
                ),
            ),
            (
                "priority_queue_fair_100_users",
                Boxed::new(
                    ServiceBuilder::new()
                        .layer(
                            PriorityQueueLayer::new(50)
                                .capacity(10_000)
                                .fair_by(|n: &u64| n % 100),
                        )
                        .service(inner.clone()),
                ),
            ),
            (
                "per_user_100_users",
                Boxed::new(
                    ServiceBuilder::new()
                        .layer(PerUserConcurrencyLayer::new(50, |n: &u64| n % 100))
                        .service(inner.clone()),
                ),
            ),
            (
                "per_user_distinct_users",
                Boxed::new(
                    ServiceBuilder::new()
                        .layer(PerUserConcurrencyLayer::new(50, |n: &u64| *n))
                        .service(inner.clone()),
                ),
            ),
            (
                "per_user_one_user",
                Boxed::new(
                    ServiceBuilder::new()
                        .layer(PerUserConcurrencyLayer::new(50, |_: &u64| 0u64))
                        .service(inner),
                ),
            ),
        ]
    }

    /// The rate limits around `inner`, by name: the token bucket and the sliding window, global
    /// and keyed over `keys` keys (the request's number modulo `keys`), with quotas far above
    /// what a benchmark spends, so that every decision is made and none waits or refuses. The
    /// window is 10 ms, for the reason given at [`full_stack`].
    pub fn rate_stacks<S>(inner: S, keys: u64) -> Vec<(String, Boxed)>
    where
        S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        use std::time::Duration;
        use tower::ServiceBuilder;
        use tower_llm_queue::rate::Rate;
        use tower_llm_queue::{SlidingWindowLayer, TokenBucketLayer};
        let bucket = || TokenBucketLayer::new(Rate::per_second(1_000_000_000), 1_000_000_000);
        let window = || SlidingWindowLayer::new(1_000_000_000, Duration::from_millis(10));
        let keyed = move |n: &u64| n % keys;
        let around = || ServiceBuilder::new();
        vec![
            (
                "token_bucket_global".into(),
                Boxed::new(around().layer(bucket()).service(inner.clone())),
            ),
            (
                format!("token_bucket_keyed_{keys}"),
                Boxed::new(
                    around()
                        .layer(bucket().keyed_by(keyed))
                        .service(inner.clone()),
                ),
            ),
            (
                "sliding_window_global".into(),
                Boxed::new(around().layer(window()).service(inner.clone())),
            ),
            (
                format!("sliding_window_keyed_{keys}"),
                Boxed::new(around().layer(window().keyed_by(keyed)).service(inner)),
            ),
        ]
    }

    /// tower's own `Retry`, with a policy that retries errors up to three times: the anchor of
    /// the retry and breaker layers.
    pub fn tower_retry<S>(inner: S) -> Boxed
    where
        S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        Boxed::new(
            tower::ServiceBuilder::new()
                .retry(Attempts(3))
                .service(inner),
        )
    }

    #[derive(Clone)]
    struct Attempts(u32);

    impl tower::retry::Policy<u64, u64, BoxError> for Attempts {
        type Future = std::future::Ready<()>;

        fn retry(
            &mut self,
            _: &mut u64,
            result: &mut Result<u64, BoxError>,
        ) -> Option<Self::Future> {
            match result {
                Err(_) if self.0 > 0 => {
                    self.0 -= 1;
                    Some(std::future::ready(()))
                }
                _ => None,
            }
        }

        fn clone_request(&mut self, req: &u64) -> Option<u64> {
            Some(*req)
        }
    }

    /// The README's stack around the upstream client ("Where the layers go"): retry, circuit
    /// breaker, queue and token bucket, with a quota far above what a benchmark can spend, so
    /// that every decision is made and none waits.
    pub fn upstream_stack<S>(inner: S) -> Boxed
    where
        S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        Boxed::new(upstream_layers(inner))
    }

    /// The README's recommended order in full: the edge layers — at most 2 in flight per user
    /// (100 users, the request's number modulo 100), a per-user sliding window and dedup — then
    /// [`upstream_stack`]'s layers, unboxed in between. Every decision is made and none waits
    /// or refuses, one request at a time: the window's quota is far above what a benchmark
    /// spends, and dedup is keyed by the request's number, so that every request is a miss
    /// that registers its call and runs it (the worst case: a hit would skip everything
    /// inside).
    ///
    /// The window is 10 ms: a sliding window keeps one entry per admission still in it, so a
    /// longer one would grow with the benchmark's millions of requests (a window of a minute
    /// holds what a minute brings, as in production).
    pub fn full_stack<S>(inner: S) -> Boxed
    where
        S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        use std::time::Duration;
        use tower::ServiceBuilder;
        use tower_llm_queue::{DedupLayer, PerUserConcurrencyLayer, SlidingWindowLayer};
        Boxed::new(
            ServiceBuilder::new()
                .layer(PerUserConcurrencyLayer::new(2, |n: &u64| n % 100))
                .layer(
                    SlidingWindowLayer::new(1_000_000_000, Duration::from_millis(10))
                        .keyed_by(|n: &u64| n % 100),
                )
                .layer(DedupLayer::new(|n: &u64| Some(*n)))
                .service(upstream_layers(inner)),
        )
    }

    /// The layers of [`upstream_stack`] around `inner`, unboxed, so that [`full_stack`] wraps
    /// the very same configuration.
    fn upstream_layers<S>(
        inner: S,
    ) -> impl Service<u64, Response = u64, Error = BoxError, Future = impl Send + 'static>
           + Clone
           + Send
           + 'static
    where
        S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        use std::time::Duration;
        use tower::ServiceBuilder;
        use tower_llm_queue::rate::Rate;
        use tower_llm_queue::{
            CircuitBreakerLayer, PriorityQueueLayer, RetryBackoffLayer, TokenBucketLayer,
        };
        ServiceBuilder::new()
            .layer(RetryBackoffLayer::new(3))
            .layer(CircuitBreakerLayer::new())
            .layer(PriorityQueueLayer::new(5).queue_timeout(Duration::from_secs(30)))
            .layer(
                TokenBucketLayer::new(Rate::per_second(1_000_000_000), 1_000_000)
                    .wait(Duration::from_secs(5)),
            )
            .service(inner)
    }
}
