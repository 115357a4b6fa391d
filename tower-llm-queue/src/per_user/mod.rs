//! At most N requests in flight per user, so that one user cannot take every upstream slot.
//!
//! The user comes from an [`ExtractKey`](crate::ExtractKey): a closure over the request, or a
//! ready-made HTTP extractor such as [`HeaderKey`](crate::key::HeaderKey). By default a request
//! over the limit is refused at once with
//! [`RejectionKind::UserLimit`](crate::RejectionKind::UserLimit) (HTTP 429); with
//! [`wait`](PerUserConcurrencyLayer::wait) it waits, in arrival order per user, for one of the
//! user's requests to complete.
//!
//! While nobody of a user waits, a request takes and gives back its slot with one atomic
//! operation on the user's cell; only waiting takes a lock. A user with nothing in flight and
//! nobody waiting keeps a small cell until it is swept: as new users arrive, and whenever the
//! stats are read. Memory stays within about twice what the users active at once need, however
//! many distinct users have come and gone.
//!
//! # Example
//!
//! ```
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_llm_queue::{PerUserConcurrencyLayer, Rejected, RejectionKind};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Seed 001's rule: two plan generations in flight per user.
//! let layer = PerUserConcurrencyLayer::new(2, |req: &(String, String)| req.0.clone());
//! let handle = layer.handle();
//! let (release, wait) = tokio::sync::watch::channel(false);
//! let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(move |_req| {
//!     let mut wait = wait.clone();
//!     async move {
//!         let _ = wait.wait_for(|done| *done).await;
//!         Ok::<_, tower::BoxError>("plan")
//!     }
//! }));
//!
//! let ask = |user: &str| (user.to_string(), "plan my week".to_string());
//! let first = tokio::spawn(svc.ready().await.unwrap().call(ask("ada")));
//! let second = tokio::spawn(svc.ready().await.unwrap().call(ask("ada")));
//! tokio::task::yield_now().await;
//!
//! let third = svc.ready().await.unwrap().call(ask("ada")).await.unwrap_err();
//! assert_eq!(Rejected::find(&*third).unwrap().kind(), RejectionKind::UserLimit);
//! // Another user is not affected.
//! let other = tokio::spawn(svc.ready().await.unwrap().call(ask("bob")));
//!
//! release.send(true).unwrap();
//! assert_eq!(first.await.unwrap().unwrap(), "plan");
//! assert_eq!(second.await.unwrap().unwrap(), "plan");
//! assert_eq!(other.await.unwrap().unwrap(), "plan");
//! assert_eq!(handle.stats().users, 0);
//! # }
//! ```

mod future;
mod layer;
mod service;
mod state;
mod stats;

use std::sync::Arc;

use crate::key::Key;

pub use self::future::ResponseFuture;
pub use self::layer::PerUserConcurrencyLayer;
pub use self::service::PerUserConcurrency;
pub use self::stats::PerUserStats;

use self::state::Shared;

/// Reads the state of one [`PerUserConcurrencyLayer`].
#[derive(Clone, Debug)]
pub struct PerUserHandle {
    shared: Arc<Shared>,
}

impl PerUserHandle {
    /// A snapshot of the counters.
    pub fn stats(&self) -> PerUserStats {
        self.shared.stats()
    }

    /// How many requests `user` has in flight now.
    pub fn in_flight(&self, user: &Key) -> usize {
        self.shared.in_flight_of(user)
    }
}

#[cfg(test)]
mod tests;
