use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::limiter::Limit;
use super::service::{RateLimit, Shared};
use super::{Global, NoReconcile, Rate, RateHandle, Unit};

macro_rules! rate_layer_builders {
    ($layer:ident) => {
        impl<E, C, R> $layer<E, C, R> {
            /// One limit per key that this [`ExtractKey`](crate::ExtractKey) finds — per user,
            /// API key or organisation — instead of one for all.
            pub fn keyed_by<E2>(self, key: E2) -> $layer<E2, C, R> {
                $layer {
                    shared: self.shared,
                    key,
                    cost: self.cost,
                    reconcile: self.reconcile,
                }
            }

            /// What a request costs: a closure `Fn(&Req) -> u64`, such as its estimated tokens.
            /// Default 1: the limit counts requests.
            ///
            /// A cost of 0 is admitted at once and leaves no record (in memory or in Redis);
            /// with [`reconcile`](Self::reconcile), the cost the response reports is recorded
            /// when the response arrives. A cost above [`MAX_COST`](super::MAX_COST) (2^53 − 1)
            /// counts as `MAX_COST`, in memory as in Redis.
            pub fn cost<C2>(self, cost: C2) -> $layer<E, C2, R> {
                $layer {
                    shared: self.shared,
                    key: self.key,
                    cost,
                    reconcile: self.reconcile,
                }
            }

            /// Replaces the estimated cost by what the upstream reports it used, once the
            /// response is known: a closure `Fn(&Response) -> Option<u64>`, such as
            /// `usage.total_tokens`, or — when only the end of a streamed body tells —
            /// [`MeterBody`](super::MeterBody), which reads the body through a
            /// [`Meter`](super::Meter) and settles when the body ends, fails or is dropped.
            ///
            /// A reported cost above [`MAX_COST`](super::MAX_COST) counts as `MAX_COST`. A
            /// correction raises or lowers what the window holds, or moves the bucket's schedule,
            /// after the fact: admissions decided in between are not revisited. In a token
            /// bucket, the correction of a reservation still waiting or of the latest admission
            /// to have started is exact; that of an older one moves the schedule by the
            /// difference as if no idle time had passed since it (idle gaps are not kept), and
            /// never past the latest start's own spacing.
            pub fn reconcile<R2>(self, reconcile: R2) -> $layer<E, C, R2> {
                $layer {
                    shared: self.shared,
                    key: self.key,
                    cost: self.cost,
                    reconcile,
                }
            }

            /// Refuses a request over the limit at once with
            /// [`RejectionKind::RateLimited`](crate::RejectionKind::RateLimited) and the exact
            /// time until it would fit as `retry_after` (the default).
            ///
            /// This is a setting of the shared state: it applies to every clone of this layer
            /// and to every service built from any of them, including services built before.
            pub fn reject(self) -> Self {
                self.shared.set_max_wait(None);
                self
            }

            /// Lets a request over the limit wait for its turn — in arrival order per key, each
            /// woken at the instant it fits — when that comes within `max_wait`; otherwise it is
            /// refused at once. A `max_wait` above [`MAX_PERIOD`](super::MAX_PERIOD) (100 years)
            /// counts as `MAX_PERIOD`.
            ///
            /// This is a setting of the shared state: it applies to every clone of this layer
            /// and to every service built from any of them, including services built before.
            pub fn wait(self, max_wait: Duration) -> Self {
                self.shared.set_max_wait(Some(max_wait));
                self
            }

            /// Keeps the limit in Redis, shared by every process whose store has the same
            /// prefix (feature `redis`). Without it the limit lives in this process's memory.
            ///
            /// # Panics
            ///
            /// When the layer already has a store.
            #[cfg(feature = "redis")]
            pub fn store(self, store: super::RedisStore) -> Self {
                assert!(
                    self.shared.set_store(store),
                    "the layer already has a store"
                );
                self
            }

            /// Reads the limit's stats and usage.
            pub fn handle(&self) -> RateHandle {
                RateHandle {
                    shared: self.shared.clone(),
                }
            }
        }

        impl<S, E: Clone, C: Clone, R: Clone> Layer<S> for $layer<E, C, R> {
            type Service = RateLimit<S, E, C, R>;

            fn layer(&self, inner: S) -> Self::Service {
                RateLimit {
                    inner,
                    shared: self.shared.clone(),
                    key: self.key.clone(),
                    cost: self.cost.clone(),
                    reconcile: self.reconcile.clone(),
                }
            }
        }

        impl<E, C, R> fmt::Debug for $layer<E, C, R> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($layer))
                    .field("limit", &self.shared.limiter.limit())
                    .field("max_wait", &self.shared.max_wait())
                    .finish_non_exhaustive()
            }
        }
    };
}

/// Admits at most `limit` cost in any interval of length `window`, globally or per key. See the
/// [module docs](super).
#[derive(Clone)]
pub struct SlidingWindowLayer<E = Global, C = Unit, R = NoReconcile> {
    shared: Arc<Shared>,
    key: E,
    cost: C,
    reconcile: R,
}

impl SlidingWindowLayer {
    /// At most `limit` requests (or cost units, with [`cost`](Self::cost)) in any interval of
    /// length `window`. A `limit` of 0 refuses everything.
    ///
    /// `limit` is at most [`MAX_COST`](super::MAX_COST) (2^53 − 1) and `window` between 1 ns
    /// and [`MAX_PERIOD`](super::MAX_PERIOD) (100 years); values beyond count as the nearest
    /// bound. A Redis store counts the window in whole microseconds (at least 1 µs).
    pub fn new(limit: u64, window: Duration) -> Self {
        SlidingWindowLayer {
            shared: Arc::new(Shared::new(Limit::window(limit, window))),
            key: Global,
            cost: Unit,
            reconcile: NoReconcile,
        }
    }
}

rate_layer_builders!(SlidingWindowLayer);

/// Admits a steady [`Rate`] with a burst allowance (GCRA), globally or per key. See the
/// [module docs](super).
#[derive(Clone)]
pub struct TokenBucketLayer<E = Global, C = Unit, R = NoReconcile> {
    shared: Arc<Shared>,
    key: E,
    cost: C,
    reconcile: R,
}

impl TokenBucketLayer {
    /// A steady `rate` with a burst of `burst` requests (or cost units) at once. Seed 004's
    /// "100 per second, bursts of 200" is `TokenBucketLayer::new(Rate::per_second(100), 200)`.
    ///
    /// `burst` is at least 1 and at most [`MAX_COST`](super::MAX_COST) (2^53 − 1), and a whole
    /// burst spans at most [`MAX_PERIOD`](super::MAX_PERIOD): `burst × interval` is capped at
    /// 100 years (a `burst` of 0 counts as 1; a larger one as the largest that fits). The
    /// interval is [`Rate`]'s, between 1 ns and `MAX_PERIOD`.
    pub fn new(rate: Rate, burst: u64) -> Self {
        TokenBucketLayer {
            shared: Arc::new(Shared::new(Limit::bucket(rate.interval(), burst))),
            key: Global,
            cost: Unit,
            reconcile: NoReconcile,
        }
    }
}

rate_layer_builders!(TokenBucketLayer);
