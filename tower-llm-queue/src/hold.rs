//! How long a request keeps its slot: until its response arrives, or — for a streamed HTTP
//! reply — until the body has been read to the end or dropped.
//!
//! An LLM reply occupies the upstream until its last token, so a concurrency slot released when
//! the headers arrive lets far more generations run upstream than the limit says. Layers that
//! hold slots ([`PriorityQueueLayer`](crate::PriorityQueueLayer),
//! [`PerUserConcurrencyLayer`](crate::PerUserConcurrencyLayer)) release on the response by
//! default ([`ReleaseOnResponse`]); their `.hold_until_body_end()` switches to
//! [`HoldUntilBodyEnd`], which wraps the `http::Response` body in a [`HeldBody`].
//!
//! A request cancelled through a handle while its body streams ends the body with a
//! [`Rejected`] of kind [`Cancelled`](crate::RejectionKind::Cancelled).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::rejected::{Rejected, RejectionKind};

/// Something that holds a slot until dropped, and may learn that its request was cancelled.
pub(crate) trait Guard: Send + Sync + 'static {
    /// True once the request was cancelled; otherwise registers the task to be woken then.
    fn poll_cancelled(&self, cx: &mut Context<'_>) -> bool;
}

/// A slot held by a response. Dropping it releases the slot.
pub struct Permit(Box<dyn Guard>);

impl Permit {
    pub(crate) fn new(guard: impl Guard) -> Self {
        Permit(Box::new(guard))
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

/// Decides what a response does with the slot its request held.
pub trait HoldPolicy<Response> {
    /// The response type the layer's service returns.
    type Output;

    /// Attaches the slot to the response, or releases it.
    fn attach<G: Into<Permit>>(&self, response: Response, permit: G) -> Self::Output;
}

/// Releases the slot as soon as the inner service's response future completes (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReleaseOnResponse;

impl<R> HoldPolicy<R> for ReleaseOnResponse {
    type Output = R;

    fn attach<G: Into<Permit>>(&self, response: R, permit: G) -> R {
        drop(permit);
        response
    }
}

/// Keeps the slot until the `http::Response` body has been read to its end, has failed, or has
/// been dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct HoldUntilBodyEnd;

impl<B> HoldPolicy<http::Response<B>> for HoldUntilBodyEnd {
    type Output = http::Response<HeldBody<B>>;

    fn attach<G: Into<Permit>>(&self, response: http::Response<B>, permit: G) -> Self::Output {
        let permit = permit.into();
        response.map(|inner| HeldBody {
            inner,
            permit: Some(permit),
            cancelled: false,
        })
    }
}

pin_project! {
    /// A response body that holds its request's slot until the body ends or is dropped.
    pub struct HeldBody<B> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
        cancelled: bool,
    }
}

impl<B> HeldBody<B> {
    /// Whether the slot is still held.
    pub fn is_holding(&self) -> bool {
        self.permit.is_some()
    }
}

impl<B: fmt::Debug> fmt::Debug for HeldBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldBody")
            .field("inner", &self.inner)
            .field("holding", &self.permit.is_some())
            .finish()
    }
}

impl<B> Body for HeldBody<B>
where
    B: Body,
    B::Error: Into<tower::BoxError>,
{
    type Data = B::Data;
    type Error = tower::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.cancelled {
            return Poll::Ready(None);
        }
        if let Some(permit) = this.permit.as_ref() {
            if permit.0.poll_cancelled(cx) {
                *this.permit = None;
                *this.cancelled = true;
                return Poll::Ready(Some(Err(Rejected::new(RejectionKind::Cancelled).into())));
            }
        }
        let frame = match this.inner.as_ref().is_end_stream() {
            true => None,
            false => std::task::ready!(this.inner.as_mut().poll_frame(cx)),
        };
        match frame {
            Some(Ok(frame)) => {
                if this.inner.is_end_stream() {
                    *this.permit = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(err)) => {
                *this.permit = None;
                Poll::Ready(Some(Err(err.into())))
            }
            None => {
                *this.permit = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.cancelled || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
