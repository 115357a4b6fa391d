use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use tokio::sync::oneshot;
use tower::ServiceExt;
use tower_service::Service;
use tracing::Instrument;

use super::error::CallFailed;
use super::flight::{Delivery, Ended, Joined, Outcome, Seat, Shared};
#[cfg(feature = "redis")]
use super::remote::Lookup;
use super::DedupHandle;
use super::ResponseFuture;

/// Lets identical requests share one call to the inner service, and serves recent results from
/// a cache. Built by [`DedupLayer`](super::DedupLayer).
#[derive(Clone)]
pub struct Dedup<S, F, K> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared<K>>,
    pub(super) key_fn: F,
}

impl<S, F, K> Dedup<S, F, K> {
    /// Reads the layer's stats.
    pub fn handle(&self) -> DedupHandle<K> {
        DedupHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, F, K, Req> Service<Req> for Dedup<S, F, K>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Clone + Send + Sync + 'static,
    S::Error: Into<tower::BoxError>,
    Req: Send + 'static,
    F: Fn(&Req) -> Option<K>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let key = (self.key_fn)(&request);
        let shared = self.shared.clone();
        let inner = self.inner.clone();
        ResponseFuture::new(respond(shared, inner, request, key))
    }
}

async fn respond<S, Req, K>(
    shared: Arc<Shared<K>>,
    inner: S,
    request: Req,
    key: Option<K>,
) -> Outcome<S::Response>
where
    S: Service<Req> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Clone + Send + Sync + 'static,
    S::Error: Into<tower::BoxError>,
    Req: Send + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let (Some(key), Ok(runtime)) = (key, tokio::runtime::Handle::try_current()) else {
        shared.count_bypass();
        return inner.oneshot(request).await.map_err(Into::into);
    };
    match shared.join::<S::Response>(&key) {
        Joined::Hit(outcome) => {
            crate::copies::mark();
            outcome
        }
        Joined::Alone => {
            shared.count_bypass();
            inner.oneshot(request).await.map_err(Into::into)
        }
        Joined::Waiting(seat, answer) => wait(shared, key, seat, answer).await,
        Joined::Lead(seat, answer) => {
            #[cfg(feature = "redis")]
            let remote = shared.remote_entry::<S::Response>(&key);
            let task_shared = shared.clone();
            let task_key = key.clone();
            let call = async move {
                #[cfg(feature = "redis")]
                if let Some(entry) = &remote {
                    // The round trips are boxed: their state is large, and would otherwise be
                    // carried by every shared call, with Redis or without.
                    match Box::pin(entry.get()).await {
                        Lookup::Hit(response, left) => {
                            task_shared.count_remote(true);
                            tracing::trace!("dedup: served from the cache in Redis");
                            task_shared.finish(
                                &task_key,
                                seat.flight,
                                Ended::Cached(response, left),
                            );
                            return;
                        }
                        Lookup::Miss => {}
                        Lookup::Failed(err) => {
                            task_shared.count_remote(false);
                            tracing::warn!(error = %err, "dedup: the cache in Redis cannot be read; calling");
                        }
                    }
                }
                let ended = match AssertUnwindSafe(inner.oneshot(request))
                    .catch_unwind()
                    .await
                {
                    Ok(Ok(response)) => Ended::Ok(response),
                    Ok(Err(err)) => Ended::Err(err.into()),
                    Err(payload) => Ended::Panicked(CallFailed::panicked(&*payload)),
                };
                #[cfg(feature = "redis")]
                let stored = match (&ended, &remote) {
                    (Ended::Ok(response), Some(entry)) => entry.encode(response),
                    _ => None,
                };
                task_shared.finish(&task_key, seat.flight, ended);
                #[cfg(feature = "redis")]
                if let (Some(bytes), Some(entry), Some(ttl)) = (stored, &remote, task_shared.ttl())
                {
                    if let Err(err) = Box::pin(entry.put(bytes, ttl)).await {
                        task_shared.count_remote(false);
                        tracing::warn!(error = %err, "dedup: a result cannot be stored in Redis");
                    }
                }
            };
            // The shared call runs in the span of the request that started it.
            let call = Box::pin(call.instrument(tracing::Span::current()));
            lead(shared, key, seat, answer, call, runtime).await
        }
    }
}

/// The shared call, boxed so that it can move into a task of its own.
type Call = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The seat of the caller that started the call and runs it in the caller's task. Dropped
/// before the call is over, it hands the call to a task of its own if anybody else waits for
/// it, and otherwise drops it.
struct Lead<K: Hash + Eq + Clone + Send + Sync + 'static> {
    shared: Arc<Shared<K>>,
    key: K,
    seat: Seat,
    call: Option<Call>,
    runtime: tokio::runtime::Handle,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Drop for Lead<K> {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            self.shared.leave(&self.key, self.seat);
            return;
        };
        if self.shared.hand_off(&self.key, self.seat) {
            tracing::trace!(
                "dedup: the caller that started the call left; it goes on for the others"
            );
            let task = self.runtime.spawn(call);
            self.shared
                .started(&self.key, self.seat.flight, task.abort_handle());
        }
    }
}

/// Runs the shared call in the caller's own task — no task is spawned while the caller stays
/// — and waits for its answer, delivered to every waiter at once.
async fn lead<R, K>(
    shared: Arc<Shared<K>>,
    key: K,
    seat: Seat,
    mut answer: oneshot::Receiver<Delivery<R>>,
    call: Call,
    runtime: tokio::runtime::Handle,
) -> Outcome<R>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let mut lead = Lead {
        shared,
        key,
        seat,
        call: Some(call),
        runtime,
    };
    let delivery = std::future::poll_fn(|cx| {
        if let Some(call) = lead.call.as_mut() {
            if call.as_mut().poll(cx).is_ready() {
                lead.call = None;
            }
        }
        std::pin::Pin::new(&mut answer).poll(cx)
    })
    .await;
    // What the call still does after its answer (storing it in Redis) need not delay the reply.
    if let Some(call) = lead.call.take() {
        lead.runtime.spawn(call);
    }
    drop(lead);
    delivered(delivery)
}

/// Gives up a seat when dropped: whoever drops out — leader or follower — only stops the shared
/// call if nobody else waits for it.
struct Leave<K: Hash + Eq + Clone + Send + Sync + 'static> {
    shared: Arc<Shared<K>>,
    key: K,
    seat: Seat,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Drop for Leave<K> {
    fn drop(&mut self) {
        self.shared.leave(&self.key, self.seat);
    }
}

async fn wait<R, K>(
    shared: Arc<Shared<K>>,
    key: K,
    seat: Seat,
    answer: oneshot::Receiver<Delivery<R>>,
) -> Outcome<R>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let _leave = Leave { shared, key, seat };
    delivered(answer.await)
}

/// A waiter's outcome, from what its seat received.
fn delivered<R>(delivery: Result<Delivery<R>, oneshot::error::RecvError>) -> Outcome<R> {
    match delivery {
        Ok((outcome, first)) => {
            if !first {
                crate::copies::mark();
            }
            outcome
        }
        Err(_) => Err("the shared call ended without an answer".into()),
    }
}

impl<S: fmt::Debug, F, K> fmt::Debug for Dedup<S, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
