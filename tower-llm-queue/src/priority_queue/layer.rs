use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::hold::{HoldUntilBodyEnd, ReleaseOnResponse};

use super::priority::{ArrivalOrder, FairBy, LowestPriority};
use super::state::{Config, Shared};
use super::{NewRequestId, PriorityQueue, PriorityQueueHandle};

/// Applies a [`PriorityQueue`] to services: at most `concurrency` requests run at once, the rest
/// wait in one bounded queue ordered by priority level, then fairly across users, then by
/// arrival. See the [module docs](super) for the whole behaviour.
///
/// Every service this layer builds, and every clone of the layer, shares one queue.
#[derive(Clone)]
pub struct PriorityQueueLayer<
    P = LowestPriority,
    F = ArrivalOrder,
    I = NewRequestId,
    H = ReleaseOnResponse,
> {
    pub(super) shared: Arc<Shared>,
    pub(super) priority: P,
    pub(super) fair: F,
    pub(super) ids: I,
    pub(super) hold: H,
}

impl PriorityQueueLayer {
    /// A queue that runs at most `concurrency` requests at once, with room for 1,000 waiting
    /// requests in 5 priority levels, every request at the lowest level, in arrival order, no
    /// queue timeout, and every 10th admission given to the longest-waiting request.
    ///
    /// # Panics
    ///
    /// When `concurrency` is 0: such a queue could never admit anything.
    pub fn new(concurrency: usize) -> Self {
        assert!(concurrency > 0, "a queue needs a concurrency of at least 1");
        PriorityQueueLayer {
            shared: Arc::new(Shared::new(Config {
                concurrency,
                capacity: 1000,
                levels: 5,
                queue_timeout: None,
                oldest_every: 10,
            })),
            priority: LowestPriority,
            fair: ArrivalOrder,
            ids: NewRequestId,
            hold: ReleaseOnResponse,
        }
    }
}

impl<P, F, I, H> PriorityQueueLayer<P, F, I, H> {
    /// At most `capacity` requests wait; a request that finds the queue full is refused at once
    /// with [`RejectionKind::QueueFull`](crate::RejectionKind::QueueFull). Default 1,000; 0 means
    /// that a request that cannot start at once is refused.
    pub fn capacity(self, capacity: usize) -> Self {
        self.shared.configure(|c| c.capacity = capacity);
        self
    }

    /// The number of priority levels, 1 (the highest) to `levels` (the lowest). Default 5.
    ///
    /// # Panics
    ///
    /// When `levels` is 0 or more than 255, or when requests are already queued.
    pub fn levels(self, levels: usize) -> Self {
        assert!(
            (1..=255).contains(&levels),
            "levels must be between 1 and 255"
        );
        assert!(
            self.shared.configure(|c| c.levels = levels),
            "levels cannot change while requests are queued"
        );
        self
    }

    /// A request that has waited this long leaves the queue with
    /// [`RejectionKind::QueueTimeout`](crate::RejectionKind::QueueTimeout). Default: no limit.
    pub fn queue_timeout(self, timeout: Duration) -> Self {
        self.shared.configure(|c| c.queue_timeout = Some(timeout));
        self
    }

    /// Every `n`-th admission from the queue goes to the request that has waited longest,
    /// whatever its level, so that a constant stream of high-priority work cannot starve the
    /// lower levels forever. Default 10; 0 gives strict priority.
    pub fn longest_waiting_every(self, n: u32) -> Self {
        self.shared.configure(|c| c.oldest_every = n);
        self
    }

    /// How a request's priority level is found: a closure `Fn(&Req) -> u8` (1 is the highest),
    /// or [`HeaderPriority`](super::HeaderPriority). Default: every request at the lowest level.
    pub fn priority<P2>(self, priority: P2) -> PriorityQueueLayer<P2, F, I, H> {
        PriorityQueueLayer {
            shared: self.shared,
            priority,
            fair: self.fair,
            ids: self.ids,
            hold: self.hold,
        }
    }

    /// Within a level, serves the users this [`ExtractKey`](crate::ExtractKey) finds round robin:
    /// a user's burst never delays another user's first request by more than one turn.
    /// Without it, a level is served in arrival order.
    pub fn fair_by<E>(self, user: E) -> PriorityQueueLayer<P, FairBy<E>, I, H> {
        PriorityQueueLayer {
            shared: self.shared,
            priority: self.priority,
            fair: FairBy(user),
            ids: self.ids,
            hold: self.hold,
        }
    }

    /// How a request's [`RequestId`](super::RequestId) is chosen:
    /// [`RequestIdExtension`](super::RequestIdExtension) for HTTP, or a closure
    /// `Fn(&mut Req) -> RequestId`. Default: a fresh id, readable from the response future.
    pub fn request_id<I2>(self, ids: I2) -> PriorityQueueLayer<P, F, I2, H> {
        PriorityQueueLayer {
            shared: self.shared,
            priority: self.priority,
            fair: self.fair,
            ids,
            hold: self.hold,
        }
    }

    /// For `http::Response`s: keeps the slot until the response body has been read to its end or
    /// dropped, not only until the headers arrive. See [`crate::hold`].
    pub fn hold_until_body_end(self) -> PriorityQueueLayer<P, F, I, HoldUntilBodyEnd> {
        PriorityQueueLayer {
            shared: self.shared,
            priority: self.priority,
            fair: self.fair,
            ids: self.ids,
            hold: HoldUntilBodyEnd,
        }
    }

    /// Reads the queue's stats and entries and cancels requests.
    pub fn handle(&self) -> PriorityQueueHandle {
        PriorityQueueHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, P: Clone, F: Clone, I: Clone, H: Clone> Layer<S> for PriorityQueueLayer<P, F, I, H> {
    type Service = PriorityQueue<S, P, F, I, H>;

    fn layer(&self, inner: S) -> Self::Service {
        PriorityQueue {
            inner,
            shared: self.shared.clone(),
            priority: self.priority.clone(),
            fair: self.fair.clone(),
            ids: self.ids.clone(),
            hold: self.hold.clone(),
        }
    }
}

impl<P, F, I, H> fmt::Debug for PriorityQueueLayer<P, F, I, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PriorityQueueLayer")
            .field("config", &self.shared.config())
            .finish_non_exhaustive()
    }
}
