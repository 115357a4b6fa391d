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

use crate::hold::Permit;
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
pub(crate) trait Slot: Into<Permit> {
    /// The hand-off with the layer; `None` for a slot taken at once that cannot be cancelled.
    fn waiter(&self) -> Option<&Waiter>;

    /// The wait has lasted too long: leave, and say why, unless the slot was granted meanwhile.
    fn time_out(&mut self) -> Option<Rejected>;

    fn set_finish(&mut self, finish: Finish);
}

pin_project! {
    /// Waits for a slot, then for the inner service, then runs the call, and hands the slot to
    /// the response's hold policy.
    pub(crate) struct Admission<S, Req, F, H, T> {
        #[pin]
        running: Option<F>,
        deadline: Option<Pin<Box<Sleep>>>,
        ticket: Option<T>,
        admitted: bool,
        inner: Option<S>,
        request: Option<Req>,
        rejected: Option<Rejected>,
        hold: H,
    }
}

impl<S, Req, F, H, T> Admission<S, Req, F, H, T> {
    pub(crate) fn admitted(ticket: T, inner: S, request: Req, hold: H) -> Self {
        Admission {
            running: None,
            deadline: None,
            ticket: Some(ticket),
            admitted: true,
            inner: Some(inner),
            request: Some(request),
            rejected: None,
            hold,
        }
    }

    pub(crate) fn waiting(
        ticket: T,
        timeout: Option<Duration>,
        inner: S,
        request: Req,
        hold: H,
    ) -> Self {
        Admission {
            running: None,
            deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
            ticket: Some(ticket),
            admitted: false,
            inner: Some(inner),
            request: Some(request),
            rejected: None,
            hold,
        }
    }

    pub(crate) fn rejected(rejected: Rejected, hold: H) -> Self {
        Admission {
            running: None,
            deadline: None,
            ticket: None,
            admitted: false,
            inner: None,
            request: None,
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
        loop {
            let Some(ticket) = this.ticket.as_mut() else {
                return Poll::Ready(Err(polled_after_completion()));
            };

            let waiter = ticket.waiter();
            if let Some(call) = this.running.as_mut().as_pin_mut() {
                if waiter.is_some_and(|w| w.poll_cancelled(cx)) {
                    this.running.set(None);
                    this.ticket.take();
                    return Poll::Ready(Err(cancelled()));
                }
                let result = ready!(call.poll(cx));
                this.running.set(None);
                let Some(mut ticket) = this.ticket.take() else {
                    return Poll::Ready(Err(polled_after_completion()));
                };
                return Poll::Ready(match result {
                    Ok(response) => {
                        ticket.set_finish(Finish::Completed);
                        Ok(this.hold.attach(response, ticket))
                    }
                    Err(err) => {
                        ticket.set_finish(Finish::Failed);
                        Err(err.into())
                    }
                });
            }

            if !*this.admitted {
                let outcome = waiter.map_or(Poll::Ready(Outcome::Granted), |w| w.poll(cx));
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
                        let Some(deadline) = this.deadline.as_mut() else {
                            return Poll::Pending;
                        };
                        ready!(deadline.as_mut().poll(cx));
                        *this.deadline = None;
                        if let Some(rejected) = ticket.time_out() {
                            this.ticket.take();
                            return Poll::Ready(Err(rejected.into()));
                        }
                        continue;
                    }
                }
            }

            if ticket.waiter().is_some_and(|w| w.poll_cancelled(cx)) {
                this.ticket.take();
                return Poll::Ready(Err(cancelled()));
            }
            let (Some(inner), Some(_)) = (this.inner.as_mut(), this.request.as_ref()) else {
                return Poll::Ready(Err(polled_after_completion()));
            };
            if let Err(err) = ready!(inner.poll_ready(cx)) {
                ticket.set_finish(Finish::Failed);
                this.ticket.take();
                return Poll::Ready(Err(err.into()));
            }
            let Some(request) = this.request.take() else {
                return Poll::Ready(Err(polled_after_completion()));
            };
            let call = inner.call(request);
            this.inner.take();
            this.running.set(Some(call));
        }
    }
}

impl<S, Req, F, H, T> fmt::Debug for Admission<S, Req, F, H, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("admitted", &self.admitted)
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}
