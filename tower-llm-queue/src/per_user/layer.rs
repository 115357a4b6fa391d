use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::clock::AtomicDuration;
use crate::hold::{HoldUntilBodyEnd, ReleaseOnResponse};
use crate::lease::Local;

use super::state::Shared;
use super::{PerUserConcurrency, PerUserHandle};

/// Applies [`PerUserConcurrency`] to services: at most `max_per_user` requests of one user in
/// flight at once. See the [module docs](super).
///
/// Every service this layer builds, and every clone of the layer, shares one set of limits.
///
/// With `store` (feature `redis`), the limit holds across every process that
/// shares the store: see [`lease`](crate::lease).
#[derive(Clone)]
pub struct PerUserConcurrencyLayer<E, H = ReleaseOnResponse, G = Local> {
    pub(super) shared: Arc<Shared>,
    pub(super) user: E,
    pub(super) hold: H,
    /// How long a request may wait, in wait mode: for the slot shared with other processes.
    pub(super) wait_timeout: Arc<AtomicDuration>,
    pub(super) global: G,
}

impl<E> PerUserConcurrencyLayer<E> {
    /// At most `max_per_user` requests in flight for each user that `user` (an
    /// [`ExtractKey`](crate::ExtractKey)) finds; the excess is refused at once with
    /// [`RejectionKind::UserLimit`](crate::RejectionKind::UserLimit).
    ///
    /// # Panics
    ///
    /// When `max_per_user` is 0: nobody could ever be served.
    pub fn new(max_per_user: usize, user: E) -> Self {
        assert!(max_per_user > 0, "max_per_user must be at least 1");
        PerUserConcurrencyLayer {
            shared: Arc::new(Shared::new(max_per_user)),
            user,
            hold: ReleaseOnResponse,
            wait_timeout: Arc::new(AtomicDuration::new(None)),
            global: Local,
        }
    }
}

impl<E, H, G> PerUserConcurrencyLayer<E, H, G> {
    /// Lets up to `max_waiting_per_user` excess requests of a user wait, in arrival order, for
    /// one of that user's requests to complete; a request that waits longer than `timeout` is
    /// refused with [`RejectionKind::UserLimit`](crate::RejectionKind::UserLimit) (429: the cause
    /// is the user's own load, not the upstream's), and so is one that finds the user's waiting
    /// line full.
    ///
    /// With a `store` (feature `redis`), a request of a user whose slots are
    /// taken on other processes waits up to `timeout` for one of them (and is refused with
    /// `UserLimit` then), whatever `max_waiting_per_user`; in reject mode it is refused at once.
    pub fn wait(self, max_waiting_per_user: usize, timeout: Duration) -> Self {
        self.shared.set_wait(max_waiting_per_user, timeout);
        self.wait_timeout.set(Some(timeout));
        self
    }

    /// Refuses the excess at once (the default).
    pub fn reject(self) -> Self {
        self.shared.set_reject();
        self.wait_timeout.set(None);
        self
    }

    /// For `http::Response`s: keeps the slot until the response body has been read to its end or
    /// dropped. See [`crate::hold`].
    pub fn hold_until_body_end(self) -> PerUserConcurrencyLayer<E, HoldUntilBodyEnd, G> {
        PerUserConcurrencyLayer {
            shared: self.shared,
            user: self.user,
            hold: HoldUntilBodyEnd,
            wait_timeout: self.wait_timeout,
            global: self.global,
        }
    }

    /// Reads the limits' stats.
    pub fn handle(&self) -> PerUserHandle {
        PerUserHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<E, H> PerUserConcurrencyLayer<E, H, Local> {
    /// Makes the limit hold across every process whose store has the same prefix (feature
    /// `redis`): a request this layer admits must also hold one of its user's `max_per_user`
    /// slots leased in Redis before it runs, and keeps it as long as its slot here (until the
    /// response, or with [`hold_until_body_end`](Self::hold_until_body_end) the body's end).
    /// A user with every slot taken on other processes is refused at once with
    /// [`UserLimit`](crate::RejectionKind::UserLimit), or waits for one in
    /// [`wait`](Self::wait) mode. See [`lease`](crate::lease) for the leases and what happens
    /// while Redis fails.
    ///
    /// ```no_run
    /// use tower_llm_queue::key::HeaderKey;
    /// use tower_llm_queue::store::RedisStore;
    /// use tower_llm_queue::PerUserConcurrencyLayer;
    ///
    /// let store = RedisStore::new("redis://127.0.0.1:6379", "llm:per-user")?.instances(3);
    /// let per_user = PerUserConcurrencyLayer::new(2, HeaderKey::new("x-user-id"))
    ///     .store(store)
    ///     .hold_until_body_end();
    /// # Ok::<(), redis::RedisError>(())
    /// ```
    #[cfg(feature = "redis")]
    pub fn store(
        self,
        store: crate::store::RedisStore,
    ) -> PerUserConcurrencyLayer<E, H, crate::lease::Leased> {
        PerUserConcurrencyLayer {
            shared: self.shared,
            user: self.user,
            hold: self.hold,
            wait_timeout: self.wait_timeout,
            global: crate::lease::Leased::new(store, crate::lease::Kind::PerUser),
        }
    }
}

#[cfg(feature = "redis")]
impl<E, H> PerUserConcurrencyLayer<E, H, crate::lease::Leased> {
    /// Reads the layer's leases in Redis (feature `redis`).
    pub fn lease_handle(&self) -> crate::lease::LeaseHandle {
        self.global.handle()
    }
}

#[cfg(feature = "redis")]
impl<S, E, H> Layer<S> for PerUserConcurrencyLayer<E, H, crate::lease::Leased>
where
    E: Clone,
    H: crate::hold::NestedHold,
{
    type Service = PerUserConcurrency<crate::lease::GlobalSlot<S, E, H>, E, H::Outer>;

    fn layer(&self, inner: S) -> Self::Service {
        let (shared, timeout) = (self.shared.clone(), self.wait_timeout.clone());
        let policy: crate::lease::PolicySource = Arc::new(move || {
            let timeout = timeout.get();
            crate::lease::Policy {
                limit: shared.max_per_user(),
                wait: timeout.is_some(),
                timeout,
            }
        });
        let global = crate::lease::GlobalSlot::new(
            inner,
            self.global.state.clone(),
            self.user.clone(),
            policy,
            self.hold.clone(),
        );
        PerUserConcurrency {
            inner: global,
            shared: self.shared.clone(),
            user: self.user.clone(),
            hold: self.hold.outer(),
        }
    }
}

impl<S, E: Clone, H: Clone> Layer<S> for PerUserConcurrencyLayer<E, H> {
    type Service = PerUserConcurrency<S, E, H>;

    fn layer(&self, inner: S) -> Self::Service {
        PerUserConcurrency {
            inner,
            shared: self.shared.clone(),
            user: self.user.clone(),
            hold: self.hold.clone(),
        }
    }
}

impl<E, H, G: fmt::Debug> fmt::Debug for PerUserConcurrencyLayer<E, H, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerUserConcurrencyLayer")
            .field("max_per_user", &self.shared.max_per_user())
            .field("max_waiting_per_user", &self.shared.max_waiting())
            .field("global", &self.global)
            .finish_non_exhaustive()
    }
}
