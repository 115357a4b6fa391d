//! gRPC: the layers in a tonic server, and a classifier for gRPC answers (feature `tonic`).
//!
//! A tonic server's requests are `http::Request`s at the tower level, so every layer of this
//! crate goes into `Server::builder().layer(...)` as it is, and the ready-made extractors read
//! gRPC metadata: `x-user-id` metadata is the `x-user-id` header for
//! [`HeaderKey`](crate::key::HeaderKey), and the method is the request's path
//! (`/classify.v1.Classifier/Classify`) for a priority closure.
//!
//! Put [`StatusLayer`] outermost: it answers every refusal as a gRPC status — a trailers-only
//! response with `grpc-status`, the delay as `google.rpc.RetryInfo` in the status details and as
//! `retry-after` metadata — which clients understand, where an error would otherwise end the
//! call without one. It also gives every response tonic's body type, so a layer that holds its
//! slot until the body ends ([`hold_until_body_end`](crate::PriorityQueueLayer::hold_until_body_end))
//! needs no `map_response`.
//!
//! | refusal | status |
//! |---|---|
//! | `UserLimit`, `RateLimited` | `RESOURCE_EXHAUSTED` |
//! | `QueueFull`, `CircuitOpen`, tower's `Overloaded` | `UNAVAILABLE` |
//! | `QueueTimeout`, tower's timeout `Elapsed` | `DEADLINE_EXCEEDED` |
//! | `Cancelled` | `CANCELLED` |
//! | `MissingKey` | `INVALID_ARGUMENT` |
//! | a request body over a [`BufferRequestLayer`](crate::buffer::BufferRequestLayer)'s limit | `RESOURCE_EXHAUSTED` |
//! | a `tonic::Status` | itself |
//! | anything else | `INTERNAL`, with no detail of the error |
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_queue::grpc::StatusLayer;
//! use tower_llm_queue::key::HeaderKey;
//! use tower_llm_queue::rate::Rate;
//! use tower_llm_queue::{PerUserConcurrencyLayer, PriorityQueueLayer, TokenBucketLayer};
//!
//! let server = tonic::transport::Server::builder()
//!     .layer(StatusLayer::new())
//!     .layer(TokenBucketLayer::new(Rate::per_second(100), 200))
//!     .layer(PerUserConcurrencyLayer::new(2, HeaderKey::new("x-user-id")).hold_until_body_end())
//!     .layer(
//!         PriorityQueueLayer::new(50)
//!             .priority(|req: &http::Request<tonic::body::Body>| match req.uri().path() {
//!                 "/grpc.health.v1.Health/Check" => 1,
//!                 _ => 3,
//!             })
//!             .queue_timeout(Duration::from_secs(30)),
//!     );
//! # let _ = server;
//! ```
//!
//! [`GrpcClassifier`] is to a gRPC upstream what [`HttpClassifier`]
//! is to an HTTP one, for retries and the breaker around a tonic client.

use std::convert::Infallible;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower_layer::Layer;
use tower_service::Service;

use crate::call::CallWhenReady;
use crate::classify::{Classify, DefaultClassifier, HttpClassifier, Outcome};
use crate::rejected::{Rejected, RejectionKind};

/// The gRPC code of a refusal of this kind.
pub fn code_for(kind: RejectionKind) -> Code {
    match kind {
        RejectionKind::UserLimit | RejectionKind::RateLimited => Code::ResourceExhausted,
        RejectionKind::QueueFull | RejectionKind::CircuitOpen => Code::Unavailable,
        RejectionKind::QueueTimeout => Code::DeadlineExceeded,
        RejectionKind::Cancelled => Code::Cancelled,
        RejectionKind::MissingKey => Code::InvalidArgument,
    }
}

/// The status for an error, as the table in the [module docs](self) says.
pub fn status(err: &(dyn Error + 'static)) -> Status {
    if let Some(rejected) = Rejected::find(err) {
        return with_delay(
            code_for(rejected.kind()),
            rejected.message(),
            rejected.retry_after(),
        );
    }
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(status) = e.downcast_ref::<Status>() {
            return status.clone();
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return Status::deadline_exceeded("the call did not complete in time");
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            return Status::unavailable("the service is overloaded");
        }
        if let Some(too_large) = e.downcast_ref::<crate::buffer::BodyTooLarge>() {
            if too_large.is_request() {
                return Status::resource_exhausted(too_large.to_string());
            }
        }
        current = e.source();
    }
    tracing::warn!(error = %err, "request failed");
    Status::internal("internal error")
}

/// A status with the delay as `google.rpc.RetryInfo` and as `retry-after` metadata (whole
/// seconds, rounded up).
fn with_delay(code: Code, message: &str, retry_after: Option<Duration>) -> Status {
    let Some(delay) = retry_after else {
        return Status::new(code, message);
    };
    let mut status =
        Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(delay)));
    let seconds = crate::http::retry_after_seconds(delay);
    if let Ok(value) = seconds.to_string().parse() {
        status.metadata_mut().insert("retry-after", value);
    }
    status
}

/// Answers errors as gRPC statuses, and gives every response tonic's body. See the
/// [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusLayer;

impl StatusLayer {
    /// The layer.
    pub fn new() -> Self {
        StatusLayer
    }
}

impl<S> Layer<S> for StatusLayer {
    type Service = StatusService<S>;

    fn layer(&self, inner: S) -> StatusService<S> {
        StatusService { inner }
    }
}

/// The service of [`StatusLayer`]. Always ready: the response future waits for the inner
/// service, so that its failure too becomes a status.
#[derive(Debug, Clone)]
pub struct StatusService<S> {
    inner: S,
}

impl<S, Req, B> Service<Req> for StatusService<S>
where
    S: Service<Req, Response = http::Response<B>> + Clone,
    S::Error: Into<tower::BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = StatusFuture<S, Req, S::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        StatusFuture {
            call: CallWhenReady::new(self.inner.clone(), request),
        }
    }
}

pin_project! {
    /// The response future of [`StatusService`].
    pub struct StatusFuture<S, Req, F> {
        #[pin]
        call: CallWhenReady<S, Req, F>,
    }
}

impl<S, Req, F> fmt::Debug for StatusFuture<S, Req, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusFuture").finish_non_exhaustive()
    }
}

impl<S, Req, B> Future for StatusFuture<S, Req, S::Future>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<tower::BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Output = Result<http::Response<tonic::body::Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match ready!(self.project().call.poll(cx)) {
            Ok(response) => response.map(tonic::body::Body::new),
            Err(err) => status(&*err).into_http(),
        }))
    }
}

/// The outcome of a gRPC status code, for retries and the breaker.
///
/// | code | outcome |
/// |---|---|
/// | `OK` | success |
/// | `UNAVAILABLE`, `RESOURCE_EXHAUSTED`, `DEADLINE_EXCEEDED`, `ABORTED` | retryable, not before the `RetryInfo` delay (or `retry-after` metadata) |
/// | `INTERNAL`, `UNKNOWN`, `DATA_LOSS` | a failure of the upstream, not retryable |
/// | any other (`INVALID_ARGUMENT`, `NOT_FOUND`, `UNIMPLEMENTED`, `UNAUTHENTICATED`, `CANCELLED`, ...) | [`Outcome::ClientError`]: the call's own fault |
pub fn outcome_of(status: &Status) -> Outcome {
    match status.code() {
        Code::Ok => Outcome::Success,
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Aborted => {
            let not_before = status
                .get_details_retry_info()
                .and_then(|info| info.retry_delay)
                .or_else(|| crate::classify::retry_delay(status.metadata().as_ref()));
            Outcome::Failure {
                retryable: true,
                not_before,
            }
        }
        Code::Internal | Code::Unknown | Code::DataLoss => Outcome::FATAL,
        _ => Outcome::ClientError,
    }
}

/// Classifies gRPC answers: a response whose headers carry `grpc-status` (a trailers-only
/// answer: how a server refuses or fails a call before any message) by its code, as
/// [`outcome_of`] says; an HTTP failure as [`HttpClassifier`] does; a `tonic::Status` error by
/// its code; other errors as [`DefaultClassifier`] does.
///
/// A status sent in trailers after a message arrives when the body ends; the classifier decides
/// on the headers, so such a call counts as a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcClassifier;

impl<B> Classify<http::Response<B>> for GrpcClassifier {
    fn classify(&self, result: Result<&http::Response<B>, &tower::BoxError>) -> Outcome {
        match result {
            Ok(response) if !response.status().is_success() => {
                HttpClassifier.classify(Ok(response))
            }
            Ok(response) => Status::from_header_map(response.headers())
                .map_or(Outcome::Success, |status| outcome_of(&status)),
            Err(err) => match err.downcast_ref::<Status>() {
                Some(status) => outcome_of(status),
                None => DefaultClassifier::classify_error(err),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_become_statuses_with_their_delay() {
        let err: tower::BoxError = Rejected::new(RejectionKind::QueueFull)
            .with_retry_after(Duration::from_millis(1500))
            .into();
        let status = status(&*err);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "the request queue is full");
        assert_eq!(
            status.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(status.metadata().get("retry-after").unwrap(), "2");
        for (kind, code) in [
            (RejectionKind::UserLimit, Code::ResourceExhausted),
            (RejectionKind::RateLimited, Code::ResourceExhausted),
            (RejectionKind::CircuitOpen, Code::Unavailable),
            (RejectionKind::QueueTimeout, Code::DeadlineExceeded),
            (RejectionKind::Cancelled, Code::Cancelled),
            (RejectionKind::MissingKey, Code::InvalidArgument),
        ] {
            let err: tower::BoxError = Rejected::new(kind).into();
            assert_eq!(super::status(&*err).code(), code, "{kind}");
        }
        let other: tower::BoxError = "a database password in a message".into();
        let status = super::status(&*other);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("password"));
    }

    fn answered(status: Status) -> http::Response<tonic::body::Body> {
        status.into_http()
    }

    #[test]
    fn grpc_answers_are_classified_by_code() {
        let ok = http::Response::new(());
        assert_eq!(GrpcClassifier.classify(Ok(&ok)), Outcome::Success);
        let throttled = with_delay(
            Code::ResourceExhausted,
            "slow down",
            Some(Duration::from_secs(3)),
        );
        assert_eq!(
            GrpcClassifier.classify(Ok(&answered(throttled))),
            Outcome::Failure {
                retryable: true,
                not_before: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(
            GrpcClassifier.classify(Ok(&answered(Status::unavailable("down")))),
            Outcome::RETRYABLE
        );
        assert_eq!(
            GrpcClassifier.classify(Ok(&answered(Status::invalid_argument("bad")))),
            Outcome::ClientError
        );
        assert_eq!(
            GrpcClassifier.classify(Ok(&answered(Status::internal("oops")))),
            Outcome::FATAL
        );
        let err: tower::BoxError = Box::new(Status::deadline_exceeded("late"));
        assert_eq!(
            Classify::<http::Response<()>>::classify(&GrpcClassifier, Err(&err)),
            Outcome::RETRYABLE
        );
    }
}
