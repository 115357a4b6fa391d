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

pin_project! {
    /// Waits for a slot, then for the inner service, then runs the call, and hands the slot to
    /// the response's hold policy.
    pub(crate) struct Admission<S, Req, F, H, T> {
        #[pin]
        call: CallWhenReady<S, Req, F>,
        timeout: Option<Duration>,
        deadline: Option<Pin<Box<Sleep>>>,
        ticket: Option<T>,
        admitted: bool,
        rejected: Option<Rejected>,
        hold: H,
    }
}

impl<S, Req, F, H, T> Admission<S, Req, F, H, T> {
    pub(crate) fn admitted(ticket: T, inner: S, request: Req, hold: H) -> Self {
        Admission {
            call: CallWhenReady::new(inner, request),
            timeout: None,
            deadline: None,
            ticket: Some(ticket),
            admitted: true,
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
            timeout,
            deadline: None,
            ticket: Some(ticket),
            admitted: false,
            rejected: None,
            hold,
        }
    }

    pub(crate) fn rejected(rejected: Rejected, hold: H) -> Self {
        Admission {
            call: CallWhenReady::none(),
            timeout: None,
            deadline: None,
            ticket: None,
            admitted: false,
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
            return Poll::Ready(Err(rejected.into()));
        }
        let Some(ticket) = this.ticket.as_mut() else {
            return Poll::Ready(Err(polled_after_completion()));
        };
        while !*this.admitted {
            let outcome = ticket
                .waiter()
                .map_or(Poll::Ready(Outcome::Granted), |w| w.poll(cx));
            match outcome {
                Poll::Ready(Outcome::Granted) => {
                    *this.admitted = true;
                    *this.deadline = None;
                }
                Poll::Ready(Outcome::Cancelled) => {
                    this.ticket.take();
                    return Poll::Ready(Err(cancelled()));
                }
                Poll::Pending => {
                    let Some(timeout) = *this.timeout else {
                        return Poll::Pending;
                    };
                    let deadline = this
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(deadline.as_mut().poll(cx));
                    *this.deadline = None;
                    *this.timeout = None;
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
            .field("admitted", &self.admitted)
            .field("running", &self.call.is_running())
            .finish_non_exhaustive()
    }
}
