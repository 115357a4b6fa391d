//! Reading an HTTP body into memory, up to a size limit, so that the message can be cloned:
//! a request for [`RetryBackoffLayer`](crate::RetryBackoffLayer), which sends it once per
//! attempt, and a response for [`DedupLayer`](crate::DedupLayer), which hands it to several
//! callers.
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_llm_queue::buffer::{BufferRequestLayer, BufferResponseLayer};
//!
//! // Requests up to 1 MiB can be retried; replies up to 4 MiB can be shared.
//! let layers = ServiceBuilder::new()
//!     .layer(BufferRequestLayer::new(1 << 20))
//!     .layer(BufferResponseLayer::new(4 << 20));
//! # let _ = layers;
//! ```

use std::error::Error;
use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower_layer::Layer;
use tower_service::Service;

/// A body over the limit of a [`BufferRequestLayer`] (HTTP 413 through
/// [`handle_error`](crate::http::handle_error)) or a [`BufferResponseLayer`] (HTTP 502).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTooLarge {
    limit: usize,
    request: bool,
}

impl BodyTooLarge {
    /// Whether the body was a request's (else a response's).
    pub fn is_request(&self) -> bool {
        self.request
    }
}

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let which = if self.request { "request" } else { "response" };
        write!(f, "the {which} body is larger than {} bytes", self.limit)
    }
}

impl Error for BodyTooLarge {}

async fn collect<B>(body: B, limit: usize, request: bool) -> Result<Full<Bytes>, tower::BoxError>
where
    B: Body,
    B::Error: Into<tower::BoxError>,
{
    let collected = Limited::new(body, limit).collect().await.map_err(|err| {
        if err.is::<LengthLimitError>() {
            Box::new(BodyTooLarge { limit, request }) as tower::BoxError
        } else {
            err
        }
    })?;
    Ok(Full::new(collected.to_bytes()))
}

/// Reads an `http::Request` body into memory, up to `limit` bytes, so that the request can be
/// cloned — what [`RetryBackoffLayer`](crate::RetryBackoffLayer) needs to send it again. Put it
/// *outside* the retry layer. A larger body is refused with [`BodyTooLarge`] before any call.
#[derive(Debug, Clone, Copy)]
pub struct BufferRequestLayer {
    limit: usize,
}

impl BufferRequestLayer {
    /// Buffers request bodies of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        BufferRequestLayer { limit }
    }
}

impl<S> Layer<S> for BufferRequestLayer {
    type Service = BufferRequest<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferRequest {
            inner,
            limit: self.limit,
        }
    }
}

/// The service built by [`BufferRequestLayer`].
#[derive(Debug, Clone)]
pub struct BufferRequest<S> {
    inner: S,
    limit: usize,
}

impl<S, B> Service<http::Request<B>> for BufferRequest<S>
where
    S: Service<http::Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tower::BoxError>,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = BufferFuture<S::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let limit = self.limit;
        BufferFuture::new(async move {
            let (parts, body) = request.into_parts();
            let body = collect(body, limit, true).await?;
            let request = http::Request::from_parts(parts, body);
            tower::ServiceExt::oneshot(inner, request)
                .await
                .map_err(Into::into)
        })
    }
}

/// Reads an `http::Response` body into memory, up to `limit` bytes, so that the response can be
/// cloned — what [`DedupLayer`](crate::DedupLayer) needs to hand one reply to several callers.
/// Put it *inside* the dedup layer: a streamed reply is then buffered whole before anybody gets
/// it. A larger body fails the call with [`BodyTooLarge`].
#[derive(Debug, Clone, Copy)]
pub struct BufferResponseLayer {
    limit: usize,
}

impl BufferResponseLayer {
    /// Buffers response bodies of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        BufferResponseLayer { limit }
    }
}

impl<S> Layer<S> for BufferResponseLayer {
    type Service = BufferResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferResponse {
            inner,
            limit: self.limit,
        }
    }
}

/// The service built by [`BufferResponseLayer`].
#[derive(Debug, Clone)]
pub struct BufferResponse<S> {
    inner: S,
    limit: usize,
}

/// The response future of [`BufferRequest`] and [`BufferResponse`].
pub type BufferFuture<R> = crate::boxed::BoxedFuture<R>;

impl<S, Req, B> Service<Req> for BufferResponse<S>
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
    type Future = BufferFuture<http::Response<Full<Bytes>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let call = self.inner.call(request);
        let limit = self.limit;
        BufferFuture::new(async move {
            let (parts, body) = call.await.map_err(Into::into)?.into_parts();
            let body = collect(body, limit, false).await?;
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    #[tokio::test]
    async fn requests_are_buffered_or_refused_clearly() {
        let echo = service_fn(|req: http::Request<Full<Bytes>>| async move {
            let copy = req.clone();
            let body = copy.into_body().collect().await?.to_bytes();
            Ok::<_, tower::BoxError>(body)
        });
        let svc = ServiceBuilder::new()
            .layer(BufferRequestLayer::new(5))
            .service(echo);
        let small = http::Request::new(Full::new(Bytes::from("hello")));
        assert_eq!(svc.clone().oneshot(small).await.unwrap(), "hello");

        let big = http::Request::new(Full::new(Bytes::from("hello!")));
        let err = svc.oneshot(big).await.unwrap_err();
        let too_large = err.downcast_ref::<BodyTooLarge>().unwrap();
        assert!(too_large.is_request());
        let response: http::Response<Full<Bytes>> = crate::http::error_response(&*err);
        assert_eq!(response.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
    }
}
