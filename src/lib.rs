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
}
