//! Correcting an estimated cost with the actual one, once the response — or, for a streamed
//! reply, its whole body — says what it was.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::service::{Admission, Shared};

/// Replaces the estimated cost of an admitted request by the actual one, when it is known.
///
/// Implemented by [`NoReconcile`] (the default: the estimate stands), by every
/// `Fn(&Response) -> Option<u64>` (the actual cost is in the response, such as a `usage` field
/// of a JSON reply), and by [`MeterBody`] (the actual cost is known only at the end of a
/// streamed body).
pub trait Reconcile<Req, Response> {
    /// What is kept from the request until the response arrives.
    type Pending: Send + 'static;
    /// The response the layer returns.
    type Output;

    /// Reads what it needs from the request, before the request goes to the inner service.
    fn prepare(&self, request: &Req) -> Self::Pending;

    /// Takes the response, and tells the actual cost through `settle`, now or later. A
    /// [`Settle`] dropped unused leaves the estimate.
    fn settle(&self, pending: Self::Pending, response: Response, settle: Settle) -> Self::Output;
}

impl<F, Req, Response> Reconcile<Req, Response> for F
where
    F: Fn(&Response) -> Option<u64>,
{
    type Pending = ();
    type Output = Response;

    fn prepare(&self, _: &Req) {}

    fn settle(&self, _: (), response: Response, settle: Settle) -> Response {
        if let Some(actual) = self(&response) {
            settle.actual(actual);
        }
        response
    }
}

/// The estimated cost stands.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReconcile;

impl<Req, Response> Reconcile<Req, Response> for NoReconcile {
    type Pending = ();
    type Output = Response;

    fn prepare(&self, _: &Req) {}

    fn settle(&self, _: (), response: Response, _: Settle) -> Response {
        response
    }
}

/// A correction sent to a shared store, which the response future waits for when it was made
/// before the response is returned.
pub(super) type Sent = Arc<crate::sharded::Mutex<Option<tokio::task::JoinHandle<()>>>>;

/// Tells a rate limit what an admitted request actually cost. See [`Reconcile`].
pub struct Settle {
    shared: Arc<Shared>,
    admission: Admission,
    sent: Option<Sent>,
}

impl Settle {
    pub(super) fn new(shared: Arc<Shared>, admission: Admission, sent: Option<Sent>) -> Self {
        Settle {
            shared,
            admission,
            sent,
        }
    }

    /// The cost charged when the request was admitted.
    pub fn estimated(&self) -> u64 {
        self.admission.cost
    }

    /// Replaces the charged cost by `actual` (at most [`MAX_COST`](super::MAX_COST)). With a
    /// Redis store, the correction is sent from a task of the current Tokio runtime.
    pub fn actual(self, actual: u64) {
        let task = self
            .shared
            .settle(self.admission, actual.min(super::MAX_COST));
        if let (Some(task), Some(sent)) = (task, self.sent) {
            *crate::sharded::lock(&sent) = Some(task);
        }
    }
}

impl fmt::Debug for Settle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settle")
            .field("key", &self.admission.key)
            .field("estimated", &self.admission.cost)
            .finish_non_exhaustive()
    }
}

/// Measures a streamed body as it passes, and tells its actual cost at its end.
pub trait Meter: Send + 'static {
    /// Sees the bytes of each data frame, in order.
    fn observe(&mut self, data: &[u8]);

    /// The actual cost, once the body has been read to its end, has failed, or has been dropped
    /// (for a stream cut short, what it carried so far); `None` leaves the estimate. Called once.
    fn finish(&mut self) -> Option<u64>;
}

/// A [`Reconcile`] for `http::Response`s whose cost is known only at the end of their body,
/// such as a streamed LLM reply whose last event reports the tokens used: each response's body
/// is read through a [`Meter`] made for its request by `make`, and the cost is corrected when
/// the body ends — read to its end, failed, or dropped.
///
/// ```
/// use std::time::Duration;
/// use tower_llm_queue::rate::{Meter, MeterBody};
/// use tower_llm_queue::SlidingWindowLayer;
///
/// /// Counts the bytes of the reply, plus the request's own estimate.
/// struct Bytes { total: u64 }
///
/// impl Meter for Bytes {
///     fn observe(&mut self, data: &[u8]) { self.total += data.len() as u64; }
///     fn finish(&mut self) -> Option<u64> { Some(self.total) }
/// }
///
/// let per_minute = SlidingWindowLayer::new(100_000, Duration::from_secs(60))
///     .cost(|_: &http::Request<String>| 4_096)
///     .reconcile(MeterBody::new(|req: &http::Request<String>| Bytes { total: req.body().len() as u64 }));
/// # let _ = per_minute;
/// ```
#[derive(Clone, Copy)]
pub struct MeterBody<F> {
    make: F,
}

impl<F> MeterBody<F> {
    /// Meters every body with a [`Meter`] that `make` builds from the request.
    pub fn new(make: F) -> Self {
        MeterBody { make }
    }
}

impl<F> fmt::Debug for MeterBody<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeterBody").finish_non_exhaustive()
    }
}

impl<F, M, Req, B> Reconcile<Req, http::Response<B>> for MeterBody<F>
where
    F: Fn(&Req) -> M,
    M: Meter,
{
    type Pending = M;
    type Output = http::Response<Metered<B, M>>;

    fn prepare(&self, request: &Req) -> M {
        (self.make)(request)
    }

    fn settle(&self, meter: M, response: http::Response<B>, settle: Settle) -> Self::Output {
        response.map(|inner| Metered {
            inner,
            account: Account {
                meter,
                settle: Some(settle),
            },
        })
    }
}

/// A meter and the admission it settles, settled once: at the body's end, or when dropped.
struct Account<M: Meter> {
    meter: M,
    settle: Option<Settle>,
}

impl<M: Meter> Account<M> {
    fn close(&mut self) {
        if let Some(settle) = self.settle.take() {
            if let Some(actual) = self.meter.finish() {
                settle.actual(actual);
            }
        }
    }
}

impl<M: Meter> Drop for Account<M> {
    fn drop(&mut self) {
        self.close();
    }
}

pin_project! {
    /// A response body read through a [`Meter`]; see [`MeterBody`].
    pub struct Metered<B, M: Meter> {
        #[pin]
        inner: B,
        account: Account<M>,
    }
}

impl<B: fmt::Debug, M: Meter> fmt::Debug for Metered<B, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered")
            .field("inner", &self.inner)
            .field("settled", &self.account.settle.is_none())
            .finish()
    }
}

impl<B, M> Body for Metered<B, M>
where
    B: Body,
    B::Data: AsRef<[u8]>,
    M: Meter,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.account.meter.observe(data.as_ref());
                }
            }
            Some(Err(_)) | None => this.account.close(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
