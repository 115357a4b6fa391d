//! The upstream behind a server's layers, as one type that handlers share.

use axum::body::Body;
use bytes::Bytes;
use http_body_util::Full;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};

/// A request to the upstream, as a server's handlers build it: a path such as
/// `/chat/completions` and a buffered body, so that retries can send it again.
pub type UpstreamRequest = http::Request<Full<Bytes>>;

/// The upstream behind every layer: cloneable, `Send` and `Sync` for axum's state, its reply
/// body streamed.
pub type Llm = BoxCloneSyncService<UpstreamRequest, http::Response<Body>, BoxError>;

/// Boxes a stack of layers around the upstream client into an [`Llm`].
pub fn boxed<S, B>(service: S) -> Llm
where
    S: tower::Service<UpstreamRequest, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(unboxed(service))
}

/// `service` answering as an [`Llm`] does, without the box: either of two such services is one
/// service.
pub(crate) fn unboxed<S, B>(
    service: S,
) -> impl tower::Service<
    UpstreamRequest,
    Response = http::Response<Body>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static
where
    S: tower::Service<UpstreamRequest, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    service
        .map_response(|response| response.map(Body::new))
        .map_err(Into::into)
}

/// The priority level of an upstream request, carried as its extension for a
/// [`PriorityQueueLayer`](tower_llm_queue::PriorityQueueLayer)'s priority closure: 1 is the
/// highest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level(pub u8);

impl Level {
    /// The level of a request, for a queue's `priority`: its extension, else the lowest.
    pub fn of(request: &UpstreamRequest) -> u8 {
        request
            .extensions()
            .get::<Level>()
            .map_or(u8::MAX, |level| level.0)
    }
}
