//! Concurrency limits held across processes: slots leased in Redis (feature `redis`).
//!
//! [`Local`] is the global stage of a layer without a store (the default); everything else in
//! this module needs the feature.
#![cfg_attr(
    feature = "redis",
    doc = r#"
[`PriorityQueueLayer::store`](crate::PriorityQueueLayer::store) and
[`PerUserConcurrencyLayer::store`](crate::PerUserConcurrencyLayer::store) make the queue's
`concurrency`, or the per-user `max_per_user`, hold across every process whose
[`RedisStore`](crate::store::RedisStore) has the same prefix. Each process keeps its own
queue, order and fairness; a request that its local layer admits must then also hold a slot
in Redis before it runs. That second stage is a service of its own, [`GlobalSlot`], which
the layer builds inside its local service: it takes its slot in its response future, holds it
until the response — or, with `hold_until_body_end()`, until the body ends, in the same
[`HeldBody`](crate::hold::HeldBody) as the local slot — and gives it back.

# Leases

A slot is a member of a sorted set in Redis whose score is its expiry, on Redis's clock: the
holder renews every slot it holds every third of the [lease
time](crate::store::RedisStore::lease_time) (default 5 s) while the request runs or its body
streams, and gives it back when the request completes, fails, is cancelled or dropped, or
its inner service panics. A process that dies holding slots gives them back when their
leases end, within the lease time; the others go on.

Every acquisition, release and renewal is one Lua script, atomic in Redis. Under a store with
prefix `p`, the queue keeps `p:q:h:a` (the slots), `p:q:w:a` (the processes in line, by
arrival) and `p:q:x:a` (when each one's place in line ends), and publishes on `p:q:freed`;
the per-user limit keeps the same three per user (`p:u:h:<user>`, ...) and publishes on
`p:u:freed`. Every key expires when nothing renews it.

# Waiting and fairness

A request that finds every slot taken waits in its process's line for the scope (first come,
first served), and its process joins the scope's line in Redis. A slot is granted to a
process only if fewer processes are in line ahead of it than there are free slots; the
process granted leaves the line, and goes to its back if it still has requests waiting. So
processes take the freed slots in turns, and none starves another, whatever its load.

A release publishes the scope's name when a process is in line. Every waiting process
subscribes to the channel, and its first request in line tries again when told; without a
message (lost while its subscription reconnects, or a lease that expired: nobody says so) it
tries again after at most a fifth of the lease time, never more than a second, and no later
than the script says the next slot may free. A place in line lasts a lease time unless
renewed by the next attempt: a process that dies in line holds the others back for at most
that long.

A request waits at most the queue's `queue_timeout` — counted again from when the queue
admitted it — or the per-user limit's wait timeout; a queue with a capacity of 0, or a
per-user limit that rejects, refuses at once when the shared slots are taken. While it
waits for its shared slot, the queue counts the request as running: its local slot is held.

# When Redis fails

Every call has the store's timeout. When Redis cannot be reached, the store's
[`OnRedisFailure`](crate::store::OnRedisFailure) decides: `LocalShare` admits while this
process holds fewer than `limit / instances` slots of the scope (at least one), counting the
slots it already holds in Redis; `Refuse` refuses at once (`QueueFull` for the queue,
`UserLimit` for the per-user limit, with a `retry_after` of 1 s). An attempt whose answer
never came, because Redis failed, the timeout passed or the caller left, is given back: its
script may have run, or may still run.

As soon as Redis answers again, decisions go back to it by themselves. The next renewal
records in Redis the slots that were decided on the local share, and those Redis lost (a
restart without persistence), while there is room; the local share then no longer counts
them, so no slot is counted twice, and none is lost for longer than a lease.

# Example

```no_run
use std::time::Duration;
use tower_llm_queue::store::RedisStore;
use tower_llm_queue::{PerUserConcurrencyLayer, PriorityQueueLayer};

# fn main() -> Result<(), redis::RedisError> {
// Three instances of a server share 5 upstream calls at once, and 2 per user.
let store = RedisStore::new("redis://127.0.0.1:6379", "chat")?
    .instances(3)
    .lease_time(Duration::from_secs(5));
let queue = PriorityQueueLayer::new(5)
    .queue_timeout(Duration::from_secs(30))
    .store(store.scope("queue"));
let per_user = PerUserConcurrencyLayer::new(2, |req: &(String, String)| req.0.clone())
    .store(store.scope("per-user"));
let stats = queue.lease_handle().stats();
# let _ = (per_user, stats);
# Ok(())
# }
```
"#
)]

#[cfg(feature = "redis")]
mod service;
#[cfg(feature = "redis")]
mod state;
#[cfg(all(test, feature = "redis"))]
mod tests;

#[cfg(feature = "redis")]
use std::sync::Arc;

#[cfg(feature = "redis")]
pub use self::service::GlobalSlot;
#[cfg(feature = "redis")]
pub(crate) use self::service::PolicySource;
#[cfg(feature = "redis")]
pub(crate) use self::state::{Kind, LeaseState, Policy};

/// The global stage of a layer without a store: none. The default of
/// [`PriorityQueueLayer`](crate::PriorityQueueLayer) and
/// [`PerUserConcurrencyLayer`](crate::PerUserConcurrencyLayer), whose limits then hold in this
/// process only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

/// The global stage of a layer with a store: its slots leased in Redis (feature `redis`). Made
/// by the layers' `.store(store)`; read it with [`LeaseHandle`].
#[cfg(feature = "redis")]
#[derive(Clone, Debug)]
pub struct Leased {
    pub(crate) state: Arc<LeaseState>,
}

#[cfg(feature = "redis")]
impl Leased {
    pub(crate) fn new(store: crate::store::RedisStore, kind: Kind) -> Self {
        Leased {
            state: Arc::new(LeaseState::new(store, kind)),
        }
    }

    /// Reads the leases' stats.
    pub fn handle(&self) -> LeaseHandle {
        LeaseHandle {
            state: self.state.clone(),
        }
    }
}

/// Reads the leases of one layer in this process (feature `redis`).
///
/// ```no_run
/// use tower_llm_queue::store::RedisStore;
/// use tower_llm_queue::PriorityQueueLayer;
///
/// let queue = PriorityQueueLayer::new(5).store(RedisStore::new("redis://127.0.0.1", "q")?);
/// let leases = queue.lease_handle();
/// assert_eq!(leases.stats().held, 0);
/// # Ok::<(), redis::RedisError>(())
/// ```
#[cfg(feature = "redis")]
#[derive(Clone, Debug)]
pub struct LeaseHandle {
    state: Arc<LeaseState>,
}

#[cfg(feature = "redis")]
impl LeaseHandle {
    /// A snapshot of the counters.
    pub fn stats(&self) -> LeaseStats {
        self.state.stats()
    }
}

/// Counters of one layer's leases in this process (feature `redis`).
#[cfg(feature = "redis")]
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaseStats {
    /// Slots held now and recorded in Redis.
    pub held: usize,
    /// Slots held now on the local share only (decided while Redis could not be reached, or
    /// lost by Redis), until a renewal records them in Redis.
    pub held_locally: usize,
    /// Requests of this process waiting now for a shared slot.
    pub waiting: usize,
    /// Scopes (the queue's, or users) in which this process holds or asks for a slot now.
    pub scopes: usize,
    /// Slots granted by Redis.
    pub acquired: u64,
    /// Requests that had to wait for a shared slot.
    pub waited: u64,
    /// Slots granted on the local share while Redis could not be reached.
    pub local_share: u64,
    /// Requests refused: the shared slots taken (and the layer does not wait), or Redis
    /// unreachable with [`OnRedisFailure::Refuse`](crate::store::OnRedisFailure::Refuse).
    pub refused: u64,
    /// Requests that waited too long for a shared slot.
    pub timed_out: u64,
    /// Attempts that Redis did not answer in time, or failed.
    pub redis_failures: u64,
    /// Slots recorded again in Redis by a renewal: decided on the local share, or lost by Redis.
    pub recorded_again: u64,
    /// Slots Redis lost with no room to record them again.
    pub lost: u64,
}
