//! Shared code for the reference servers, tests and benchmarks of `tower-llm-queue`.
//!
//! This package is not published. It holds what the examples in `examples/`, the tests in
//! `tests/` and the benchmarks in `benches/` have in common.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
