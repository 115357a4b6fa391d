use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::hold::{HoldUntilBodyEnd, ReleaseOnResponse};

use super::state::Shared;
use super::{PerUserConcurrency, PerUserHandle};

/// Applies [`PerUserConcurrency`] to services: at most `max_per_user` requests of one user in
/// flight at once. See the [module docs](super).
///
/// Every service this layer builds, and every clone of the layer, shares one set of limits.
#[derive(Clone)]
pub struct PerUserConcurrencyLayer<E, H = ReleaseOnResponse> {
    pub(super) shared: Arc<Shared>,
    pub(super) user: E,
    pub(super) hold: H,
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
        }
    }
}

impl<E, H> PerUserConcurrencyLayer<E, H> {
    /// Lets up to `max_waiting_per_user` excess requests of a user wait, in arrival order, for
    /// one of that user's requests to complete; a request that waits longer than `timeout` is
    /// refused with [`RejectionKind::UserLimit`](crate::RejectionKind::UserLimit) (429: the cause
    /// is the user's own load, not the upstream's), and so is one that finds the user's waiting
    /// line full.
    pub fn wait(self, max_waiting_per_user: usize, timeout: Duration) -> Self {
        self.shared.set_wait(max_waiting_per_user, timeout);
        self
    }

    /// Refuses the excess at once (the default).
    pub fn reject(self) -> Self {
        self.shared.set_reject();
        self
    }

    /// For `http::Response`s: keeps the slot until the response body has been read to its end or
    /// dropped. See [`crate::hold`].
    pub fn hold_until_body_end(self) -> PerUserConcurrencyLayer<E, HoldUntilBodyEnd> {
        PerUserConcurrencyLayer {
            shared: self.shared,
            user: self.user,
            hold: HoldUntilBodyEnd,
        }
    }

    /// Reads the limits' stats.
    pub fn handle(&self) -> PerUserHandle {
        PerUserHandle {
            shared: self.shared.clone(),
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

impl<E, H> fmt::Debug for PerUserConcurrencyLayer<E, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerUserConcurrencyLayer")
            .field("max_per_user", &self.shared.max_per_user())
            .field("max_waiting_per_user", &self.shared.max_waiting())
            .finish_non_exhaustive()
    }
}
