//! A bounded queue in front of a service: at most `concurrency` requests run at once, and the
//! rest wait for their turn by priority level, then fairly across users, then by arrival.
//!
//! # Behaviour
//!
//! * **Admission.** A request starts at once while fewer than `concurrency` run and nobody
//!   waits. Otherwise it waits; when `capacity` requests already wait it is refused at once with
//!   [`RejectionKind::QueueFull`](crate::RejectionKind::QueueFull) and a `retry_after` estimated
//!   from recent service times.
//! * **Order.** Level 1 before level 2, and so on ([`PriorityQueueLayer::priority`]). Within a
//!   level, with [`fair_by`](PriorityQueueLayer::fair_by), users take turns round robin, so one
//!   user's burst of 100 cannot delay another user's first request by more than one turn;
//!   without it, arrival order. Every 10th admission goes to the request that has waited longest
//!   whatever its level, so low levels progress under a constant stream of high-priority work
//!   ([`longest_waiting_every`](PriorityQueueLayer::longest_waiting_every); 0 gives strict
//!   priority).
//! * **Timeout.** With [`queue_timeout`](PriorityQueueLayer::queue_timeout), a request that
//!   waited that long leaves with [`RejectionKind::QueueTimeout`](crate::RejectionKind::QueueTimeout).
//! * **Cancellation.** [`PriorityQueueHandle::cancel`] takes a queued request out, or drops a
//!   running request's inner future (or ends its held response body); its caller gets
//!   [`RejectionKind::Cancelled`](crate::RejectionKind::Cancelled). Dropping the response future
//!   has the same effect on the queue.
//! * **Ids.** Every request gets a [`RequestId`]: read it from the response future
//!   ([`ResponseFuture::request_id`]), or, for HTTP, let [`RequestIdExtension`] take it from —
//!   or put it into — the request's extensions, so that a handler can hand it to the client.
//! * **Cost.** While nobody waits, a request is admitted with one atomic operation and
//!   registered in one of several shards of requests (by id), in a place its response future
//!   keeps, so that it ends without a lookup; it never takes the queue's lock. Only a request
//!   that must wait, and a release that hands its slot to a waiter, do. Those take O(log n) in
//!   the number of waiting requests. A request that waits has a place in its shard too, kept
//!   by its response future. The handle finds a request by id by walking its shard, O(n) in the
//!   requests that were in the queue at once there.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_llm_queue::PriorityQueueLayer;
//!
//! struct Prompt { user: String, chat: bool }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let layer = PriorityQueueLayer::new(3)                       // 3 upstream calls at once
//!     .capacity(100)
//!     .priority(|p: &Prompt| if p.chat { 1 } else { 3 })       // chat before batch work
//!     .fair_by(|p: &Prompt| p.user.clone())                    // users take turns
//!     .queue_timeout(Duration::from_secs(30));
//! let handle = layer.handle();
//!
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|p: Prompt| async move {
//!         Ok::<_, tower::BoxError>(format!("answer for {}", p.user))
//!     }));
//!
//! let answer = svc.ready().await?.call(Prompt { user: "ada".into(), chat: true }).await?;
//! assert_eq!(answer, "answer for ada");
//! assert_eq!(handle.stats().completed, 1);
//! assert_eq!(handle.stats().running, 0);
//! # Ok(())
//! # }
//! ```

mod future;
mod layer;
mod priority;
mod registry;
mod request_id;
mod schedule;
mod service;
mod state;
mod stats;

use std::sync::Arc;

use crate::key::Key;

pub use self::future::ResponseFuture;
pub use self::layer::PriorityQueueLayer;
pub use self::priority::{
    ArrivalOrder, ExtractPriority, FairBy, FairShare, HeaderPriority, LowestPriority,
};
pub use self::request_id::{AssignRequestId, NewRequestId, RequestId, RequestIdExtension};
pub use self::service::PriorityQueue;
pub use self::stats::{EntryState, QueueEntry, QueueStats};

use self::state::Shared;

/// Reads and controls one queue: stats, the list of entries, and cancellation.
///
/// Obtained from [`PriorityQueueLayer::handle`] or [`PriorityQueue::handle`]; every handle of a
/// layer sees the same queue.
#[derive(Clone, Debug)]
pub struct PriorityQueueHandle {
    shared: Arc<Shared>,
}

impl PriorityQueueHandle {
    /// A snapshot of the queue's counters and wait-time percentiles.
    pub fn stats(&self) -> QueueStats {
        self.shared.stats()
    }

    /// Every request in the queue, waiting or running, ordered by id.
    pub fn entries(&self) -> Vec<QueueEntry> {
        self.shared.entries()
    }

    /// The place of a waiting request in the queue — 0 is admitted next — for a status
    /// indicator; `None` once it runs, or if the queue holds no such request. O(n) in the
    /// requests waiting at its level.
    pub fn position(&self, id: RequestId) -> Option<usize> {
        self.shared.position(id)
    }

    /// Cancels a waiting or running request: its caller gets
    /// [`RejectionKind::Cancelled`](crate::RejectionKind::Cancelled). False if the queue holds
    /// no such request.
    ///
    /// Request ids are not secrets: they are sequential and easy to guess. Where a client names
    /// the request to cancel, use [`cancel_owned`](Self::cancel_owned).
    pub fn cancel(&self, id: RequestId) -> bool {
        self.shared.cancel(id, None)
    }

    /// Cancels a waiting or running request only if it belongs to `owner`, the user that
    /// [`fair_by`](PriorityQueueLayer::fair_by) found for it: what a server's cancel endpoint
    /// needs, so that nobody cancels another user's request by guessing its id. False if the
    /// queue holds no such request of that user (a queue without `fair_by` knows no owners).
    ///
    /// ```
    /// use tower::{service_fn, Service, ServiceBuilder};
    /// use tower_llm_queue::{Key, PriorityQueueLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = PriorityQueueLayer::new(1).fair_by(|(user, _): &(String, u32)| user.clone());
    /// let handle = layer.handle();
    /// let mut svc = ServiceBuilder::new()
    ///     .layer(layer)
    ///     .service(service_fn(|_: (String, u32)| std::future::pending::<Result<(), tower::BoxError>>()));
    /// let call = svc.call(("ada".to_string(), 1));
    /// let id = call.request_id();
    /// assert!(!handle.cancel_owned(id, &Key::from("bob")));
    /// assert!(handle.cancel_owned(id, &Key::from("ada")));
    /// assert!(call.await.is_err());
    /// # }
    /// ```
    pub fn cancel_owned(&self, id: RequestId, owner: &Key) -> bool {
        self.shared.cancel(id, Some(owner))
    }
}

#[cfg(test)]
mod tests;
