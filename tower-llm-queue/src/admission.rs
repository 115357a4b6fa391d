//! The response future shared by the layers that hold slots: wait for a slot, then for the
//! inner service, then call it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::hold::HoldPolicy;
use crate::rejected::{Rejected, RejectionKind};
use crate::waiter::Outcome;

use crate::call::CallWhenReady;
use crate::hold::{Guard, Permit};
use crate::waiter::Waiter;

/// How a request that held a slot ended, as its slot records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// The caller dropped the request before it finished.
    Dropped,
    Completed,
    Failed,
}

/// A request's place in a layer's shared state: waiting, then holding a slot. Dropping it at any
/// moment gives the place or the slot up.
///
/// Once the slot is held, [`Guard::poll_cancelled`] tells whether the request was cancelled
/// through a handle and registers the task to be woken if it is.
pub(crate) trait Slot: Guard {
    /// The hand-off with the layer while the request waits; `None` for a slot taken at once.
    fn waiter(&self) -> Option<&Waiter>;

    /// Whether the running request was cancelled through a handle, without registering for a
    /// wake-up: the cheap check made before each poll of the call.
    fn is_cancelled(&self) -> bool;

    /// The wait has lasted too long: leave, and say why, unless the slot was granted meanwhile.
    fn time_out(&mut self) -> Option<Rejected>;

    fn set_finish(&mut self, finish: Finish);
}

/// Where a request stands: waiting for its slot, with how long it may still wait, or holding
/// it. (One field for both: with the others, it keeps a response future small enough to be
/// moved without a call to `memcpy`.)
enum Phase {
    /// Waiting for its slot as long as it takes.
    Waiting,
    /// Waiting for its slot at most this long from the first poll that finds it waiting.
    WaitingAtMost(Duration),
    /// Waiting for its slot until this timer fires.
    WaitingUntil(Pin<Box<Sleep>>),
    /// Holding its slot: about to run, or running.
    Admitted,
}

impl Phase {
    /// Ready once the wait has lasted its time, and never without one; the timer starts on the
    /// first poll, so that a future built outside a runtime does not need one until then.
    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self {
                Phase::Waiting | Phase::Admitted => return Poll::Pending,
                Phase::WaitingAtMost(timeout) => {
                    *self = Phase::WaitingUntil(Box::pin(tokio::time::sleep(*timeout)));
                }
                Phase::WaitingUntil(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    *self = Phase::Waiting;
                    return Poll::Ready(());
                }
            }
        }
    }
}

pin_project! {
    /// Waits for a slot, then for the inner service, then runs the call, and hands the slot to
    /// the response's hold policy.
    pub(crate) struct Admission<S, Req, F, H, T> {
        #[pin]
        call: CallWhenReady<S, Req, F>,
        phase: Phase,
        ticket: Option<T>,
        // Boxed: a future is moved, often into a box of its own, on every request, and a
        // rejection is rare.
        rejected: Option<tower::BoxError>,
        hold: H,
    }
}

impl<S, Req, F, H, T> Admission<S, Req, F, H, T> {
    pub(crate) fn admitted(ticket: T, inner: S, request: Req, hold: H) -> Self {
        Admission {
            call: CallWhenReady::new(inner, request),
            phase: Phase::Admitted,
            ticket: Some(ticket),
            rejected: None,
            hold,
        }
    }

    /// Waits for its slot, at most `timeout`; the timer starts on the first poll, so that a
    /// future built outside a runtime does not need one until it is polled.
    pub(crate) fn waiting(
        ticket: T,
        timeout: Option<Duration>,
        inner: S,
        request: Req,
        hold: H,
    ) -> Self {
        Admission {
            call: CallWhenReady::new(inner, request),
            phase: timeout.map_or(Phase::Waiting, Phase::WaitingAtMost),
            ticket: Some(ticket),
            rejected: None,
            hold,
        }
    }

    pub(crate) fn rejected(rejected: Rejected, hold: H) -> Self {
        let rejected: tower::BoxError = Box::new(rejected);
        Admission {
            call: CallWhenReady::none(),
            phase: Phase::Waiting,
            ticket: None,
            rejected: Some(rejected),
            hold,
        }
    }
}

fn cancelled() -> tower::BoxError {
    Rejected::new(RejectionKind::Cancelled).into()
}

fn polled_after_completion() -> tower::BoxError {
    "response future polled after completion".into()
}

impl<S, Req, H, T> Future for Admission<S, Req, S::Future, H, T>
where
    S: Service<Req>,
    S::Error: Into<tower::BoxError>,
    H: HoldPolicy<S::Response>,
    T: Slot,
{
    type Output = Result<H::Output, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(rejected) = this.rejected.take() {
            return Poll::Ready(Err(rejected));
        }
        let Some(ticket) = this.ticket.as_mut() else {
            return Poll::Ready(Err(polled_after_completion()));
        };
        while !matches!(this.phase, Phase::Admitted) {
            let outcome = ticket
                .waiter()
                .map_or(Poll::Ready(Outcome::Granted), |w| w.poll(cx));
            match outcome {
                Poll::Ready(Outcome::Granted) => *this.phase = Phase::Admitted,
                Poll::Ready(Outcome::Cancelled) => {
                    this.ticket.take();
                    return Poll::Ready(Err(cancelled()));
                }
                Poll::Pending => {
                    ready!(this.phase.expired(cx));
                    if let Some(rejected) = ticket.time_out() {
                        this.ticket.take();
                        return Poll::Ready(Err(rejected.into()));
                    }
                }
            }
        }

        // A cancellation is looked for before each poll of the call; the task registers to be
        // woken by one only when the call is pending, and looks again after registering, so
        // that a cancellation that comes meanwhile is not missed.
        if ticket.is_cancelled() {
            this.call.set(CallWhenReady::none());
            this.ticket.take();
            return Poll::Ready(Err(cancelled()));
        }
        let result = match this.call.as_mut().poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                if ticket.poll_cancelled(cx) {
                    this.call.set(CallWhenReady::none());
                    this.ticket.take();
                    return Poll::Ready(Err(cancelled()));
                }
                return Poll::Pending;
            }
        };
        Poll::Ready(match result {
            Ok(response) => match this.ticket.take() {
                Some(ticket) => Ok(this.hold.attach(response, Completed(ticket))),
                None => Err(polled_after_completion()),
            },
            Err(err) => {
                ticket.set_finish(Finish::Failed);
                *this.ticket = None;
                Err(err)
            }
        })
    }
}

/// The slot of a request that completed, on its way to the hold policy. It records the
/// completion as it is dropped, in place: a write into the slot just before it is moved would
/// make the move wait for the write.
struct Completed<T: Slot>(T);

impl<T: Slot> Drop for Completed<T> {
    fn drop(&mut self) {
        self.0.set_finish(Finish::Completed);
    }
}

impl<T: Slot> Guard for Completed<T> {
    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> bool {
        self.0.poll_cancelled(cx)
    }
}

impl<T: Slot> From<Completed<T>> for Permit {
    fn from(slot: Completed<T>) -> Self {
        Permit::new(slot)
    }
}

impl<S, Req, F, H, T> fmt::Debug for Admission<S, Req, F, H, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("admitted", &matches!(self.phase, Phase::Admitted))
            .field("running", &self.call.is_running())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use tower::{service_fn, BoxError, Service, ServiceBuilder};

    use crate::{PerUserConcurrencyLayer, PriorityQueueLayer};

    /// The size of the response future of `layer` around a small service.
    fn future_size<L>(layer: L) -> usize
    where
        L: tower::Layer<
            tower::util::ServiceFn<fn(u64) -> std::future::Ready<Result<u64, BoxError>>>,
        >,
        L::Service: Service<u64>,
    {
        let immediate: fn(u64) -> std::future::Ready<Result<u64, BoxError>> =
            |n| std::future::ready(Ok(n));
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(immediate));
        std::mem::size_of_val(&svc.call(1))
    }

    #[test]
    fn the_response_futures_of_a_small_service_are_moved_without_a_memcpy_call() {
        // A future is moved on every request, often into a box of its own (as axum's routes
        // and tower's `BoxService` do): up to 128 bytes the compiler moves it inline, beyond
        // that it calls `memcpy`, which cost about 20 instructions per request.
        let queue = future_size(PriorityQueueLayer::new(2));
        let per_user = future_size(PerUserConcurrencyLayer::new(2, |n: &u64| *n));
        assert!(queue <= 128, "the queue's: {queue} bytes");
        assert!(per_user <= 128, "the per-user limit's: {per_user} bytes");
    }
}
