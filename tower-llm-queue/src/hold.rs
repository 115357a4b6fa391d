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
    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> bool;
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
        if let Some(permit) = this.permit.as_mut() {
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

/// The hold policy of a stage inside a slot layer — the slot that
/// [`PriorityQueueLayer::store`](crate::PriorityQueueLayer::store) and
/// [`PerUserConcurrencyLayer::store`](crate::PerUserConcurrencyLayer::store) lease in Redis —
/// and of the layer around it (feature `redis`).
///
/// The stage holds its slot as the layer's policy says; the layer then adds its own slot to
/// what the stage returns, so that a response holding both is the same type as one holding the
/// layer's slot alone: [`ReleaseOnResponse`] stays itself, and [`HoldUntilBodyEnd`] puts both
/// slots in one [`HeldBody`] with [`AddToHeldBody`].
#[cfg(feature = "redis")]
pub trait NestedHold: Clone {
    /// The policy of the layer around the stage.
    type Outer: Clone;

    /// That policy.
    fn outer(&self) -> Self::Outer;
}

#[cfg(feature = "redis")]
impl NestedHold for ReleaseOnResponse {
    type Outer = ReleaseOnResponse;

    fn outer(&self) -> ReleaseOnResponse {
        ReleaseOnResponse
    }
}

#[cfg(feature = "redis")]
impl NestedHold for HoldUntilBodyEnd {
    type Outer = AddToHeldBody;

    fn outer(&self) -> AddToHeldBody {
        AddToHeldBody
    }
}

/// Adds a slot to a [`HeldBody`] that already holds one, so that the body holds both until it
/// ends or is dropped (feature `redis`). The policy of a layer whose inner stage holds its own
/// slot until the body ends; see [`NestedHold`].
///
/// When the body ends, fails or is dropped, the inner stage's slot is given back first, then the
/// layer's, so that the request the layer admits next finds the inner slot free. A cancellation
/// through either slot's handle ends the body.
#[cfg(feature = "redis")]
#[derive(Debug, Clone, Copy, Default)]
pub struct AddToHeldBody;

#[cfg(feature = "redis")]
impl<B> HoldPolicy<http::Response<HeldBody<B>>> for AddToHeldBody {
    type Output = http::Response<HeldBody<B>>;

    fn attach<G: Into<Permit>>(
        &self,
        response: http::Response<HeldBody<B>>,
        permit: G,
    ) -> Self::Output {
        let outer = permit.into();
        response.map(|mut body| {
            body.permit = Some(match body.permit.take() {
                Some(inner) => Permit::new(Both { inner, outer }),
                None => outer,
            });
            body
        })
    }
}

/// Two slots held together. Fields drop in order: the inner stage's slot first.
#[cfg(feature = "redis")]
struct Both {
    inner: Permit,
    outer: Permit,
}

#[cfg(feature = "redis")]
impl Guard for Both {
    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> bool {
        self.outer.0.poll_cancelled(cx) || self.inner.0.poll_cancelled(cx)
    }
}
