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
        Joined::Lead(seat) => {
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
                            let ended = Ended::Cached(response, left);
                            return (task_shared.finish(&task_key, seat.flight, ended), None);
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
                let delivery = task_shared.finish(&task_key, seat.flight, ended);
                #[cfg(feature = "redis")]
                if let (Some(bytes), Some(entry), Some(ttl)) = (stored, remote, task_shared.ttl()) {
                    let store = async move {
                        if let Err(err) = entry.put(bytes, ttl).await {
                            task_shared.count_remote(false);
                            tracing::warn!(error = %err, "dedup: a result cannot be stored in Redis");
                        }
                    };
                    let store: Tail = Box::pin(store.in_current_span());
                    return (delivery, Some(store));
                }
                (delivery, None)
            };
            // The shared call runs in the span of the request that started it.
            let span = tracing::Span::current();
            let call: Call<S::Response> = if span.is_disabled() {
                Box::pin(call)
            } else {
                Box::pin(call.instrument(span))
            };
            lead(shared, key, seat, call, runtime).await
        }
    }
}

/// What a shared call still does after its answer (storing it in Redis), which need not delay
/// the reply.
type Tail = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The shared call, boxed so that it can move into a task of its own: it ends with the answer
/// of the caller that started it, if that caller still waits, and with what remains to do.
type Call<R> = std::pin::Pin<Box<dyn Future<Output = (Option<Delivery<R>>, Option<Tail>)> + Send>>;

/// The seat of the caller that started the call and runs it in the caller's task. Dropped
/// before the call is over, it hands the call to a task of its own if anybody else waits for
/// it, and otherwise drops it.
struct Lead<R: Send + 'static, K: Hash + Eq + Clone + Send + Sync + 'static> {
    shared: Arc<Shared<K>>,
    key: K,
    seat: Seat,
    /// `None` once the call is over, which ended the flight.
    call: Option<Call<R>>,
    runtime: tokio::runtime::Handle,
}

impl<R: Send + 'static, K: Hash + Eq + Clone + Send + Sync + 'static> Drop for Lead<R, K> {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        if self.shared.hand_off(&self.key, self.seat) {
            tracing::trace!(
                "dedup: the caller that started the call left; it goes on for the others"
            );
            let task = self.runtime.spawn(async move {
                if let (_, Some(tail)) = call.await {
                    tail.await;
                }
            });
            self.shared
                .started(&self.key, self.seat.flight, task.abort_handle());
        }
    }
}

/// Runs the shared call in the caller's own task — no task is spawned while the caller stays
/// — and returns the answer the call ends with, delivered to every other waiter at once.
async fn lead<R, K>(
    shared: Arc<Shared<K>>,
    key: K,
    seat: Seat,
    call: Call<R>,
    runtime: tokio::runtime::Handle,
) -> Outcome<R>
where
    R: Send + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let mut lead = Lead {
        shared,
        key,
        seat,
        call: Some(call),
        runtime,
    };
    let (delivery, tail) = std::future::poll_fn(|cx| match lead.call.as_mut() {
        Some(call) => call.as_mut().poll(cx),
        None => Poll::Ready((None, None)),
    })
    .await;
    lead.call = None;
    if let Some(tail) = tail {
        lead.runtime.spawn(tail);
    }
    delivered(delivery.ok_or(NoAnswer))
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
    delivered(answer.await.map_err(NoAnswer::from))
}

/// The shared call ended without an answer for a waiter.
struct NoAnswer;

impl From<oneshot::error::RecvError> for NoAnswer {
    fn from(_: oneshot::error::RecvError) -> Self {
        NoAnswer
    }
}

/// A waiter's outcome, from what its seat received.
fn delivered<R>(delivery: Result<Delivery<R>, NoAnswer>) -> Outcome<R> {
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
