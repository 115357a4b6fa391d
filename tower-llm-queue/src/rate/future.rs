use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tower_service::Service;

use crate::call::CallWhenReady;
use crate::key::Key;
use crate::rejected::Rejected;

use super::reconcile::Sent;
use super::service::{Admission, Admit, Admitted, Reservation, Shared};
use super::{Reconcile, Settle};

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit): the decision, the wait for a
    /// reserved start (wait mode), then the call. Dropped before the request starts, it gives
    /// its admission back.
    ///
    /// A decision in memory is made in the first poll, without allocating; a Redis round trip
    /// and a wait are boxed where they happen. `F` is the inner service's future, `P` what the
    /// reconciliation keeps from the request and `O` the response as it returns it, each named
    /// as a parameter as tower's futures do, so that the compiler can prove the whole future
    /// `Send` in spawned tasks and handlers.
    pub struct ResponseFuture<S, Req, F, R, P, O> {
        #[pin]
        call: CallWhenReady<S, Req, F>,
        reconcile: R,
        stage: Stage<P, O>,
    }
}

type Deciding = Pin<Box<dyn Future<Output = Result<Admitted, Rejected>> + Send>>;

/// Where a request is. The layer's state moves from stage to stage with it, and goes into the
/// [`Settle`] of the response at the end.
enum Stage<P, O> {
    /// Refused before any decision (the key could not be read).
    Refused(Rejected),
    /// Not polled yet.
    Decide {
        shared: Arc<Shared>,
        key: Key,
        cost: u64,
        pending: P,
    },
    /// Waits for a decision from Redis.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Deciding {
        shared: Arc<Shared>,
        decision: Deciding,
        pending: P,
    },
    /// Waits for a reserved start.
    Waiting {
        shared: Arc<Shared>,
        sleep: Pin<Box<Sleep>>,
        reservation: Reservation,
        pending: P,
    },
    /// Started: waits for the inner service, then for its response.
    Calling {
        shared: Arc<Shared>,
        admission: Admission,
        sent: Option<Sent>,
        pending: P,
    },
    /// Waits for a correction sent to Redis before the response goes out, so that the caller's
    /// next request sees it.
    Correcting {
        task: JoinHandle<()>,
        output: O,
    },
    Done,
}

impl<S, Req, F, R, P, O> ResponseFuture<S, Req, F, R, P, O> {
    pub(super) fn new(
        inner: S,
        request: Req,
        shared: Arc<Shared>,
        reconcile: R,
        key: Key,
        cost: u64,
        pending: P,
    ) -> Self {
        ResponseFuture {
            call: CallWhenReady::new(inner, request),
            reconcile,
            stage: Stage::Decide {
                shared,
                key,
                cost,
                pending,
            },
        }
    }

    pub(super) fn refused(reconcile: R, rejected: Rejected) -> Self {
        ResponseFuture {
            call: CallWhenReady::none(),
            reconcile,
            stage: Stage::Refused(rejected),
        }
    }
}

/// The stage after a decision: waiting for a reserved start, or started.
fn decided<P, O>(
    shared: Arc<Shared>,
    admitted: Result<Admitted, Rejected>,
    pending: P,
) -> Result<Stage<P, O>, Rejected> {
    Ok(match admitted? {
        Admitted::At(reservation, at) => Stage::Waiting {
            shared,
            sleep: Box::pin(tokio::time::sleep_until(at)),
            reservation,
            pending,
        },
        Admitted::Now(admission) => started(shared, admission, pending),
    })
}

fn started<P, O>(shared: Arc<Shared>, admission: Admission, pending: P) -> Stage<P, O> {
    // A correction made to a shared store before the response goes out is waited for.
    let sent = admission.is_shared().then(Default::default);
    Stage::Calling {
        shared,
        admission,
        sent,
        pending,
    }
}

impl<S, Req, R> Future for ResponseFuture<S, Req, S::Future, R, R::Pending, R::Output>
where
    S: Service<Req>,
    S::Error: Into<tower::BoxError>,
    R: Reconcile<Req, S::Response>,
{
    type Output = Result<R::Output, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match mem::replace(this.stage, Stage::Done) {
                Stage::Refused(rejected) => return Poll::Ready(Err(rejected.into())),
                Stage::Decide {
                    shared,
                    key,
                    cost,
                    pending,
                } => match shared.admit(key, cost) {
                    Admit::Decided(admitted) => decided(shared, admitted, pending),
                    #[cfg(feature = "redis")]
                    Admit::Remote(decision) => Ok(Stage::Deciding {
                        shared,
                        decision,
                        pending,
                    }),
                },
                Stage::Deciding {
                    shared,
                    mut decision,
                    pending,
                } => match decision.as_mut().poll(cx) {
                    Poll::Ready(admitted) => decided(shared, admitted, pending),
                    Poll::Pending => {
                        *this.stage = Stage::Deciding {
                            shared,
                            decision,
                            pending,
                        };
                        return Poll::Pending;
                    }
                },
                Stage::Waiting {
                    shared,
                    mut sleep,
                    reservation,
                    pending,
                } => match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Ok(started(shared, reservation.started(), pending)),
                    Poll::Pending => {
                        *this.stage = Stage::Waiting {
                            shared,
                            sleep,
                            reservation,
                            pending,
                        };
                        return Poll::Pending;
                    }
                },
                Stage::Calling {
                    shared,
                    admission,
                    sent,
                    pending,
                } => match this.call.as_mut().poll(cx) {
                    Poll::Ready(Ok(response)) => {
                        let settle = Settle::new(shared, admission, sent.clone());
                        let output = this.reconcile.settle(pending, response, settle);
                        match sent.and_then(|sent| crate::sharded::lock(&sent).take()) {
                            Some(task) => Ok(Stage::Correcting { task, output }),
                            None => return Poll::Ready(Ok(output)),
                        }
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => {
                        *this.stage = Stage::Calling {
                            shared,
                            admission,
                            sent,
                            pending,
                        };
                        return Poll::Pending;
                    }
                },
                Stage::Correcting { mut task, output } => match Pin::new(&mut task).poll(cx) {
                    Poll::Ready(_) => return Poll::Ready(Ok(output)),
                    Poll::Pending => {
                        *this.stage = Stage::Correcting { task, output };
                        return Poll::Pending;
                    }
                },
                Stage::Done => {
                    return Poll::Ready(Err("response future polled after completion".into()))
                }
            };
            match next {
                Ok(stage) => *this.stage = stage,
                Err(rejected) => return Poll::Ready(Err(rejected.into())),
            }
        }
    }
}

impl<S, Req, F, R, P, O> fmt::Debug for ResponseFuture<S, Req, F, R, P, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match self.stage {
            Stage::Refused(_) => "refused",
            Stage::Decide { .. } => "decide",
            Stage::Deciding { .. } => "deciding",
            Stage::Waiting { .. } => "waiting",
            Stage::Calling { .. } => "calling",
            Stage::Correcting { .. } => "correcting",
            Stage::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("stage", &stage)
            .finish_non_exhaustive()
    }
}
