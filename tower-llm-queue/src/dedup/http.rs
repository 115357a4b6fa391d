//! Buffering a streamed HTTP response so that [`Dedup`](super::Dedup) can share and cache it.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower_layer::Layer;
use tower_service::Service;

/// Reads an `http::Response` body into memory, up to a size limit, so that the response can be
/// cloned — what [`DedupLayer`](super::DedupLayer) needs to hand one reply to several callers.
///
/// Put it *inside* the dedup layer. A streamed reply is then buffered whole before anybody gets
/// it: sharing a reply costs its streaming. A body over the limit fails the call with
/// [`BodyTooLarge`].
#[derive(Debug, Clone, Copy)]
pub struct BufferBodyLayer {
    limit: usize,
}

impl BufferBodyLayer {
    /// Buffers bodies of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        BufferBodyLayer { limit }
    }
}

impl<S> Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferBody {
            inner,
            limit: self.limit,
        }
    }
}

/// The service built by [`BufferBodyLayer`].
#[derive(Debug, Clone)]
pub struct BufferBody<S> {
    inner: S,
    limit: usize,
}

/// A response body over the limit of a [`BufferBodyLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTooLarge {
    limit: usize,
}

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the response body is larger than {} bytes", self.limit)
    }
}

impl Error for BodyTooLarge {}

type Boxed =
    Pin<Box<dyn Future<Output = Result<http::Response<Full<Bytes>>, tower::BoxError>> + Send>>;

/// The response future of [`BufferBody`].
pub struct BufferFuture {
    inner: Boxed,
}

impl Future for BufferFuture {
    type Output = Result<http::Response<Full<Bytes>>, tower::BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for BufferFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferFuture").finish_non_exhaustive()
    }
}

impl<S, Req, B> Service<Req> for BufferBody<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tower::BoxError>,
{
    type Response = http::Response<Full<Bytes>>;
    type Error = tower::BoxError;
    type Future = BufferFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let call = self.inner.call(request);
        let limit = self.limit;
        BufferFuture {
            inner: Box::pin(async move {
                let (parts, body) = call.await.map_err(Into::into)?.into_parts();
                let collected = Limited::new(body, limit).collect().await.map_err(|err| {
                    if err.is::<LengthLimitError>() {
                        Box::new(BodyTooLarge { limit }) as tower::BoxError
                    } else {
                        err
                    }
                })?;
                Ok(http::Response::from_parts(
                    parts,
                    Full::new(collected.to_bytes()),
                ))
            }),
        }
    }
}
