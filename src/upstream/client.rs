//! The HTTP client that calls the upstream: hyper-util's pooled client (a `tower::Service`),
//! with TLS for `https` URLs, that sends every request to the upstream's base URL with its API
//! key.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::uri::{PathAndQuery, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::BoxError;

/// The body of an upstream response: streamed as it arrives.
pub type UpstreamBody = hyper::body::Incoming;

/// Sends requests whose URI is a path (`/chat/completions`) to the upstream's base URL
/// (`https://api.openai.com/v1`), with `Authorization: Bearer <key>` when a key is set.
///
/// Cloning is one reference count (the stack around it is cloned for every call) and shares
/// the connection pool.
#[derive(Clone, Debug)]
pub struct UpstreamClient(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: Uri,
    authorization: Option<HeaderValue>,
}

impl UpstreamClient {
    /// A client for `base` (scheme, host, port and path prefix), with an optional API key.
    pub fn new(base: Uri, api_key: Option<&str>) -> Result<Self, BoxError> {
        let authorization = match api_key {
            Some(key) => {
                let mut value = HeaderValue::try_from(format!("Bearer {key}"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        // A request's head and body are two writes: without TCP_NODELAY the body waits for
        // the upstream's delayed ACK of the head.
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Ok(UpstreamClient(Arc::new(Inner {
            http,
            base,
            authorization,
        })))
    }

    /// The full URI of `path` at the upstream.
    fn resolve(&self, path: Option<&PathAndQuery>) -> Result<Uri, BoxError> {
        let prefix = self.0.base.path().trim_end_matches('/');
        let path = path.map_or("/", PathAndQuery::as_str);
        let mut parts = self.0.base.clone().into_parts();
        parts.path_and_query = Some(format!("{prefix}{path}").parse()?);
        Ok(Uri::from_parts(parts)?)
    }
}

impl tower::Service<http::Request<Full<Bytes>>> for UpstreamClient {
    type Response = http::Response<UpstreamBody>;
    type Error = BoxError;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::<http::Request<Full<Bytes>>>::poll_ready(&mut &self.0.http, cx)
            .map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<Full<Bytes>>) -> Self::Future {
        let uri = match self.resolve(request.uri().path_and_query()) {
            Ok(uri) => uri,
            Err(err) => return Box::pin(async move { Err(err) }),
        };
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        if let Some(authorization) = &self.0.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        headers
            .entry(CONTENT_TYPE)
            .or_insert(HeaderValue::from_static("application/json"));
        let call = self.0.http.request(request);
        Box::pin(async move { call.await.map_err(Into::into) })
    }
}
