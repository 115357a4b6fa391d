//! Composable [Tower](https://docs.rs/tower) middleware that lets one server share a
//! rate-limited upstream — an LLM API such as Gemini, Bedrock, OpenAI, Anthropic or Ollama —
//! among many users at once.
//!
//! Every layer wraps any `tower::Service`, stacks with the others in any order, and keeps one
//! shared state however often it is cloned. Everything a layer refuses itself is a
//! [`Rejected`] with a [`RejectionKind`] and an optional retry delay; errors of the inner service
//! pass through untouched. [`http::handle_error`] turns both into HTTP responses for axum.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod admission;
pub mod hold;
pub mod http;
pub mod key;
pub mod per_user;
pub mod priority_queue;
mod rejected;
mod sharded;
mod waiter;

pub use key::{ExtractKey, Key};
pub use per_user::{PerUserConcurrencyLayer, PerUserHandle};
pub use priority_queue::{PriorityQueueHandle, PriorityQueueLayer, RequestId};
pub use rejected::{Rejected, RejectionKind};
