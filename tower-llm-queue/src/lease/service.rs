use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::ServiceExt;
use tower_service::Service;

use crate::boxed::BoxedFuture;
use crate::hold::HoldPolicy;
use crate::key::ExtractKey;

use super::state::{Kind, LeaseState, Policy};

/// Reads, at each call, how the layer around the stage wants its slot taken.
pub(crate) type PolicySource = Arc<dyn Fn() -> Policy + Send + Sync>;

/// The stage of a slot layer with a store: takes a slot leased in Redis before the inner
/// service runs, holds it as `H` says, renews it meanwhile, and gives it back (feature
/// `redis`). See the [module docs](super).
///
/// Built inside the local service by
/// [`PriorityQueueLayer::store`](crate::PriorityQueueLayer::store) and
/// [`PerUserConcurrencyLayer::store`](crate::PerUserConcurrencyLayer::store); `E` finds the
/// scope of a request (the user; one scope for the queue).
///
/// `poll_ready` is always ready: the response future takes the slot (or waits for one), then
/// waits for the inner service's readiness, then calls it. Dropping it at any point gives the
/// slot, or the attempt on its way, back.
///
/// ```no_run
/// use tower::{service_fn, ServiceBuilder};
/// use tower_llm_queue::store::RedisStore;
/// use tower_llm_queue::PriorityQueueLayer;
///
/// let queue = PriorityQueueLayer::new(5).store(RedisStore::new("redis://127.0.0.1", "q")?);
/// // A `PriorityQueue` around a `GlobalSlot` around the upstream.
/// let svc = ServiceBuilder::new()
///     .layer(queue)
///     .service(service_fn(|prompt: String| async move { Ok::<_, tower::BoxError>(prompt) }));
/// # Ok::<(), redis::RedisError>(())
/// ```
pub struct GlobalSlot<S, E, H> {
    inner: S,
    state: Arc<LeaseState>,
    key: E,
    policy: PolicySource,
    hold: H,
}

impl<S, E, H> GlobalSlot<S, E, H> {
    pub(crate) fn new(
        inner: S,
        state: Arc<LeaseState>,
        key: E,
        policy: PolicySource,
        hold: H,
    ) -> Self {
        GlobalSlot {
            inner,
            state,
            key,
            policy,
            hold,
        }
    }

    /// Reads the leases' stats.
    pub fn handle(&self) -> super::LeaseHandle {
        super::Leased {
            state: self.state.clone(),
        }
        .handle()
    }
}

impl<S: Clone, E: Clone, H: Clone> Clone for GlobalSlot<S, E, H> {
    fn clone(&self) -> Self {
        GlobalSlot {
            inner: self.inner.clone(),
            state: self.state.clone(),
            key: self.key.clone(),
            policy: self.policy.clone(),
            hold: self.hold.clone(),
        }
    }
}

impl<S, E, H, Req> Service<Req> for GlobalSlot<S, E, H>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<tower::BoxError>,
    E: ExtractKey<Req>,
    H: HoldPolicy<S::Response> + Clone + Send + 'static,
    H::Output: Send + 'static,
    Req: Send + 'static,
{
    type Response = H::Output;
    type Error = tower::BoxError;
    type Future = BoxedFuture<H::Output>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let key = match self.key.extract(&request) {
            Ok(key) => key,
            Err(rejected) => return BoxedFuture::new(async move { Err(rejected.into()) }),
        };
        let policy = (self.policy)();
        let state = self.state.clone();
        let inner = self.inner.clone();
        let hold = self.hold.clone();
        BoxedFuture::new(async move {
            let lease = state.acquire(&key, policy).await?;
            let response = inner.oneshot(request).await.map_err(Into::into)?;
            Ok(hold.attach(response, lease))
        })
    }
}

impl<S: fmt::Debug, E, H> fmt::Debug for GlobalSlot<S, E, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.state_kind() {
            Kind::Queue => "queue",
            Kind::PerUser => "per_user",
        };
        f.debug_struct("GlobalSlot")
            .field("inner", &self.inner)
            .field("kind", &kind)
            .field("store", self.state.store())
            .finish_non_exhaustive()
    }
}

impl<S, E, H> GlobalSlot<S, E, H> {
    fn state_kind(&self) -> Kind {
        self.state.kind()
    }
}
