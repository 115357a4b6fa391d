//! Holds a streamed reply back until its first token, so that a failure before it can be
//! retried.
//!
//! An upstream may answer 200 and then send an error event before any text (an overloaded
//! model, a cut connection). Until a token has reached the client, that is the same as a 529 and
//! worth a retry; after it, the stream belongs to the client. [`FirstTokenLayer`] reads a 2xx
//! `text/event-stream` reply up to its first token: an error event, a failed body or an end
//! before it becomes an [`UpstreamStreamFailed`] error, which the retry layer outside retries and
//! the breaker counts; otherwise the reply goes on, the frames read so far first.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tower::BoxError;

use super::sse::{Event, SseParser};

/// The upstream's stream failed before its first token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamStreamFailed {
    message: String,
}

impl fmt::Display for UpstreamStreamFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the upstream stream failed before its first token: {}",
            self.message
        )
    }
}

impl std::error::Error for UpstreamStreamFailed {}

/// Applies [`FirstToken`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstTokenLayer;

impl<S> tower::Layer<S> for FirstTokenLayer {
    type Service = FirstToken<S>;

    fn layer(&self, inner: S) -> FirstToken<S> {
        FirstToken { inner }
    }
}

/// Reads a streamed reply up to its first token. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct FirstToken<S> {
    inner: S,
}

fn is_event_stream<B>(response: &http::Response<B>) -> bool {
    response.status().is_success()
        && response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
}

impl<S, Req, B> tower::Service<Req> for FirstToken<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Prefixed<B>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await.map_err(Into::into)?;
            if !is_event_stream(&response) {
                return Ok(response.map(Prefixed::new));
            }
            let (parts, mut body) = response.into_parts();
            let mut read = VecDeque::new();
            let mut parser = SseParser::new();
            loop {
                let Some(frame) = body.frame().await else {
                    return Err(failed("the stream ended before any text"));
                };
                let frame = frame.map_err(|err| failed(&err.into().to_string()))?;
                let mut first = Ok(false);
                if let Some(data) = frame.data_ref() {
                    parser.push(data, |event| match event {
                        Event::Delta(_) if first == Ok(false) => first = Ok(true),
                        Event::Error(message) if first == Ok(false) => first = Err(message),
                        Event::Done if first == Ok(false) => {
                            first = Err("the stream ended before any text".into())
                        }
                        _ => {}
                    });
                }
                read.push_back(frame);
                match first {
                    Ok(false) => continue,
                    Ok(true) => break,
                    Err(message) => return Err(failed(&message)),
                }
            }
            let body = Prefixed { read, inner: body };
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

fn failed(message: &str) -> BoxError {
    Box::new(UpstreamStreamFailed {
        message: message.to_string(),
    })
}

pin_project! {
    /// A body that yields the frames already read, then the rest of the inner body.
    pub struct Prefixed<B> {
        read: VecDeque<Frame<Bytes>>,
        #[pin]
        inner: B,
    }
}

impl<B> Prefixed<B> {
    fn new(inner: B) -> Self {
        Prefixed {
            read: VecDeque::new(),
            inner,
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for Prefixed<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prefixed")
            .field("read", &self.read.len())
            .field("inner", &self.inner)
            .finish()
    }
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(frame) = this.read.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.inner
            .poll_frame(cx)
            .map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .read
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + read);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + read);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, Layer, ServiceExt};

    fn reply(content_type: &'static str, frames: &[&'static str]) -> http::Response<Full> {
        let body = frames.concat();
        http::Response::builder()
            .header(http::header::CONTENT_TYPE, content_type)
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap()
    }

    type Full = http_body_util::Full<Bytes>;

    async fn through(response: http::Response<Full>) -> Result<String, BoxError> {
        let svc = FirstTokenLayer.layer(service_fn(move |_: ()| {
            let response = response.clone();
            async move { Ok::<_, BoxError>(response) }
        }));
        let response = svc.oneshot(()).await?;
        let body = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }

    const ROLE: &str = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n";
    const TOKEN: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
    const ERROR: &str = "data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[tokio::test]
    async fn a_stream_that_fails_before_its_first_token_is_an_error() {
        for frames in [&[ROLE, ERROR][..], &[ERROR], &[ROLE, DONE], &[ROLE]] {
            let err = through(reply("text/event-stream", frames))
                .await
                .unwrap_err();
            assert!(err.is::<UpstreamStreamFailed>(), "{frames:?}: {err}");
        }
    }

    #[tokio::test]
    async fn after_the_first_token_the_stream_is_the_clients() {
        let frames = [ROLE, TOKEN, ERROR];
        let body = through(reply("text/event-stream", &frames)).await.unwrap();
        assert_eq!(body, frames.concat(), "nothing lost, nothing added");
        // Not a stream: passed on as it is.
        let json = "{\"error\": {\"message\": \"bad\"}}";
        assert_eq!(
            through(reply("application/json", &[json])).await.unwrap(),
            json
        );
    }
}
