//! Composable [Tower](https://docs.rs/tower) middleware that lets one server share a
//! rate-limited upstream — an LLM API such as Gemini, Bedrock, OpenAI, Anthropic or Ollama —
//! among many users at once.
//!
//! Every layer wraps any `tower::Service`, stacks with the others in any order, and keeps one
//! shared state however often it is cloned. Everything a layer refuses itself is a
//! [`Rejected`] with a [`RejectionKind`] and an optional retry delay; errors of the inner service
//! pass through untouched. [`http::handle_error`] turns both into HTTP responses for axum.
//!
//! | layer | decides | on excess |
//! |---|---|---|
//! | [`PriorityQueueLayer`] | how many run at once; who runs next (priority, then fair across users, then arrival) | waits in a bounded queue; full → [`RejectionKind::QueueFull`] |
//! | [`PerUserConcurrencyLayer`] | how many one user may have in flight | [`RejectionKind::UserLimit`] at once, or waits |
//! | [`RetryBackoffLayer`] | whether and when to try again | backoff with jitter, the upstream's delay, a budget, a shared cool-down |
//! | [`DedupLayer`] | whether an identical request is running or cached | joins it, or gets the cached result |
//! | [`CircuitBreakerLayer`] | whether the upstream is healthy enough to call | [`RejectionKind::CircuitOpen`] at once until probes succeed |
//!
//! # Settings and state
//!
//! A layer is a handle to one shared state, made by its `new`. Its *settings* — limits,
//! capacities, timeouts, modes, budgets — live in that state: a setting changed through any
//! clone of a layer applies to all its clones and to the services already built from them.
//! Configure a layer before you share it, and make two layers for two configurations. What a
//! builder method changes the *type* of — a key extractor, a priority, a cost, a classifier, the
//! hold policy — belongs to the layer value it returns: a type cannot be shared.
//!
//! [`classify`] decides what a result means for retries and the breaker; [`buffer`] makes HTTP
//! bodies cloneable for them; [`key`] finds who a request belongs to; [`hold`] keeps a slot while
//! a streamed reply is read.
//!
//! # Example
//!
//! Two layers stacked around an upstream that answers prompts; the same stack goes into an axum
//! `Router` with `.layer(...)` behind a `HandleErrorLayer` (see [`http`]).
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_llm_queue::{PerUserConcurrencyLayer, PriorityQueueLayer};
//!
//! #[derive(Clone)]
//! struct Prompt { user: u64, text: String, interactive: bool }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let queue = PriorityQueueLayer::new(3)
//!     .capacity(1_000)
//!     .priority(|p: &Prompt| if p.interactive { 1 } else { 5 })
//!     .fair_by(|p: &Prompt| p.user)
//!     .queue_timeout(Duration::from_secs(30));
//! let stats = queue.handle();
//!
//! let mut llm = ServiceBuilder::new()
//!     .layer(PerUserConcurrencyLayer::new(2, |p: &Prompt| p.user))
//!     .layer(queue)
//!     .service(service_fn(|p: Prompt| async move {
//!         Ok::<_, tower::BoxError>(format!("echo: {}", p.text))
//!     }));
//!
//! let prompt = Prompt { user: 7, text: "hi".into(), interactive: true };
//! let answer = llm.ready().await?.call(prompt).await?;
//! assert_eq!(answer, "echo: hi");
//! assert_eq!(stats.stats().completed, 1);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod admission;
mod boxed;
pub mod buffer;
mod call;
pub mod circuit_breaker;
pub mod classify;
mod clock;
mod copies;
pub mod dedup;
#[cfg(feature = "tonic")]
pub mod grpc;
pub mod hold;
pub mod http;
pub mod key;
pub mod lease;
pub mod per_user;
pub mod priority_queue;
pub mod rate;
mod rejected;
pub mod retry;
mod service_time;
mod sharded;
#[cfg(feature = "redis")]
pub mod store;
mod waiter;

pub use boxed::BoxedFuture;
pub use circuit_breaker::CircuitBreakerLayer;
pub use dedup::DedupLayer;
pub use key::{ExtractKey, Key};
pub use per_user::{PerUserConcurrencyLayer, PerUserHandle};
pub use priority_queue::{PriorityQueueHandle, PriorityQueueLayer, RequestId};
pub use rate::{SlidingWindowLayer, TokenBucketLayer};
pub use rejected::{Rejected, RejectionKind};
pub use retry::RetryBackoffLayer;

#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
