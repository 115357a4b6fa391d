use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::hold::{HoldUntilBodyEnd, ReleaseOnResponse};
use crate::lease::Local;

use super::priority::{ArrivalOrder, FairBy, LowestPriority};
use super::state::{Config, Shared};
use super::{NewRequestId, PriorityQueue, PriorityQueueHandle};

/// Applies a [`PriorityQueue`] to services: at most `concurrency` requests run at once, the rest
/// wait in one bounded queue ordered by priority level, then fairly across users, then by
/// arrival. See the [module docs](super) for the whole behaviour.
///
/// Every service this layer builds, and every clone of the layer, shares one queue.
///
/// With `store` (feature `redis`), the concurrency holds across every process
/// that shares the store: see [`lease`](crate::lease).
#[derive(Clone)]
pub struct PriorityQueueLayer<
    P = LowestPriority,
    F = ArrivalOrder,
    I = NewRequestId,
    H = ReleaseOnResponse,
    G = Local,
> {
    pub(super) shared: Arc<Shared>,
    pub(super) priority: P,
    pub(super) fair: F,
    pub(super) ids: I,
    pub(super) hold: H,
    pub(super) global: G,
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
            global: Local,
        }
    }
}

impl<P, F, I, H, G> PriorityQueueLayer<P, F, I, H, G> {
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
    pub fn priority<P2>(self, priority: P2) -> PriorityQueueLayer<P2, F, I, H, G> {
        PriorityQueueLayer {
            shared: self.shared,
            priority,
            fair: self.fair,
            ids: self.ids,
            hold: self.hold,
            global: self.global,
        }
    }

    /// Within a level, serves the users this [`ExtractKey`](crate::ExtractKey) finds round robin:
    /// a user's burst never delays another user's first request by more than one turn.
    /// Without it, a level is served in arrival order.
    pub fn fair_by<E>(self, user: E) -> PriorityQueueLayer<P, FairBy<E>, I, H, G> {
        PriorityQueueLayer {
            shared: self.shared,
            priority: self.priority,
            fair: FairBy(user),
            ids: self.ids,
            hold: self.hold,
            global: self.global,
        }
    }

    /// How a request's [`RequestId`](super::RequestId) is chosen:
    /// [`RequestIdExtension`](super::RequestIdExtension) for HTTP, or a closure
    /// `Fn(&mut Req) -> RequestId`. Default: a fresh id, readable from the response future.
    pub fn request_id<I2>(self, ids: I2) -> PriorityQueueLayer<P, F, I2, H, G> {
        PriorityQueueLayer {
            shared: self.shared,
            priority: self.priority,
            fair: self.fair,
            ids,
            hold: self.hold,
            global: self.global,
        }
    }

    /// For `http::Response`s: keeps the slot until the response body has been read to its end or
    /// dropped, not only until the headers arrive. See [`crate::hold`].
    pub fn hold_until_body_end(self) -> PriorityQueueLayer<P, F, I, HoldUntilBodyEnd, G> {
        PriorityQueueLayer {
            shared: self.shared,
            priority: self.priority,
            fair: self.fair,
            ids: self.ids,
            hold: HoldUntilBodyEnd,
            global: self.global,
        }
    }

    /// Reads the queue's stats and entries and cancels requests.
    pub fn handle(&self) -> PriorityQueueHandle {
        PriorityQueueHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<P, F, I, H> PriorityQueueLayer<P, F, I, H, Local> {
    /// Makes the concurrency hold across every process whose store has the same prefix
    /// (feature `redis`): a request this queue admits must also hold one of the `concurrency`
    /// slots leased in Redis before it runs, and keeps it as long as it keeps its place here
    /// (until the response, or with [`hold_until_body_end`](Self::hold_until_body_end) the
    /// body's end). Each process keeps its own queue, order and fairness. A request waits for
    /// its shared slot at most `queue_timeout` more ([`QueueTimeout`]); with a capacity of 0 it
    /// is refused at once ([`QueueFull`]). See [`lease`](crate::lease) for the leases, the
    /// fairness between processes and what happens while Redis fails.
    ///
    /// [`QueueTimeout`]: crate::RejectionKind::QueueTimeout
    /// [`QueueFull`]: crate::RejectionKind::QueueFull
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_llm_queue::store::RedisStore;
    /// use tower_llm_queue::PriorityQueueLayer;
    ///
    /// let store = RedisStore::new("redis://127.0.0.1:6379", "llm:queue")?.instances(3);
    /// let queue = PriorityQueueLayer::new(5)
    ///     .queue_timeout(Duration::from_secs(30))
    ///     .store(store)
    ///     .hold_until_body_end();
    /// # Ok::<(), redis::RedisError>(())
    /// ```
    #[cfg(feature = "redis")]
    pub fn store(
        self,
        store: crate::store::RedisStore,
    ) -> PriorityQueueLayer<P, F, I, H, crate::lease::Leased> {
        PriorityQueueLayer {
            shared: self.shared,
            priority: self.priority,
            fair: self.fair,
            ids: self.ids,
            hold: self.hold,
            global: crate::lease::Leased::new(store, crate::lease::Kind::Queue),
        }
    }
}

#[cfg(feature = "redis")]
impl<P, F, I, H> PriorityQueueLayer<P, F, I, H, crate::lease::Leased> {
    /// Reads the layer's leases in Redis (feature `redis`).
    pub fn lease_handle(&self) -> crate::lease::LeaseHandle {
        self.global.handle()
    }
}

#[cfg(feature = "redis")]
impl<S, P, F, I, H> Layer<S> for PriorityQueueLayer<P, F, I, H, crate::lease::Leased>
where
    P: Clone,
    F: Clone,
    I: Clone,
    H: crate::hold::NestedHold,
{
    type Service =
        PriorityQueue<crate::lease::GlobalSlot<S, crate::rate::Global, H>, P, F, I, H::Outer>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = self.shared.clone();
        let policy: crate::lease::PolicySource = Arc::new(move || {
            let config = shared.config();
            crate::lease::Policy {
                limit: config.concurrency,
                wait: config.capacity > 0,
                timeout: config.queue_timeout,
            }
        });
        let global = crate::lease::GlobalSlot::new(
            inner,
            self.global.state.clone(),
            crate::rate::Global,
            policy,
            self.hold.clone(),
        );
        PriorityQueue {
            inner: global,
            shared: self.shared.clone(),
            priority: self.priority.clone(),
            fair: self.fair.clone(),
            ids: self.ids.clone(),
            hold: self.hold.outer(),
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

impl<P, F, I, H, G: fmt::Debug> fmt::Debug for PriorityQueueLayer<P, F, I, H, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PriorityQueueLayer")
            .field("config", &self.shared.config())
            .field("global", &self.global)
            .finish_non_exhaustive()
    }
}
