//! The HTTP client that calls the upstream: hyper-util's pooled client (a `tower::Service`),
//! with TLS for `https` URLs, that sends every request to the upstream's base URL with its API
//! key.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
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
    /// [`CHAT_COMPLETIONS`] resolved, the path every server calls.
    chat_completions: Uri,
    /// The `Host` header for the base URL, as hyper-util would write it for each request.
    host: Option<HeaderValue>,
}

/// The path of the chat-completions API, under the base URL.
pub const CHAT_COMPLETIONS: &str = "/chat/completions";

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
        let chat_completions = joined(&base, CHAT_COMPLETIONS)?;
        let host = match (base.host(), base.port_u16()) {
            (Some(host), Some(port)) if Some(port) != default_port(&base) => {
                Some(HeaderValue::try_from(format!("{host}:{port}"))?)
            }
            (Some(host), _) => Some(HeaderValue::from_str(host)?),
            (None, _) => None,
        };
        Ok(UpstreamClient(Arc::new(Inner {
            http,
            base,
            authorization,
            chat_completions,
            host,
        })))
    }

    /// The full URI of `path` at the upstream.
    fn resolve(&self, path: Option<&PathAndQuery>) -> Result<Uri, BoxError> {
        let path = path.map_or("/", PathAndQuery::as_str);
        if path == CHAT_COMPLETIONS {
            return Ok(self.0.chat_completions.clone());
        }
        joined(&self.0.base, path)
    }
}

/// `path` under `base`'s path.
fn joined(base: &Uri, path: &str) -> Result<Uri, BoxError> {
    let prefix = base.path().trim_end_matches('/');
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(format!("{prefix}{path}").parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// The port a URL's scheme implies: 80 for http, 443 for https.
fn default_port(uri: &Uri) -> Option<u16> {
    match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => None,
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
        // Written once here, rather than formatted again for every request by hyper-util.
        if let Some(host) = &self.0.host {
            headers.entry(HOST).or_insert_with(|| host.clone());
        }
        headers
            .entry(CONTENT_TYPE)
            .or_insert(HeaderValue::from_static("application/json"));
        let call = self.0.http.request(request);
        Box::pin(async move { call.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chat_path_and_the_host_are_written_once_as_they_would_be_each_time() {
        let cases = [
            ("http://127.0.0.1:8080/v1", "127.0.0.1:8080"),
            ("https://api.openai.com/v1/", "api.openai.com"),
            ("http://localhost:80/v1", "localhost"),
            ("https://example.com:8443", "example.com:8443"),
        ];
        for (base, host) in cases {
            let client = UpstreamClient::new(base.parse().unwrap(), None).unwrap();
            let chat = PathAndQuery::from_static(CHAT_COMPLETIONS);
            assert_eq!(
                client.resolve(Some(&chat)).unwrap(),
                joined(&client.0.base, CHAT_COMPLETIONS).unwrap(),
                "{base}"
            );
            assert_eq!(client.0.host.as_ref().unwrap(), host, "{base}");
        }
        let client = UpstreamClient::new("http://h:1/v1/".parse().unwrap(), None).unwrap();
        let models = PathAndQuery::from_static("/models");
        assert_eq!(
            client.resolve(Some(&models)).unwrap(),
            "http://h:1/v1/models"
        );
        assert_eq!(
            client
                .resolve(Some(&PathAndQuery::from_static(CHAT_COMPLETIONS)))
                .unwrap(),
            "http://h:1/v1/chat/completions"
        );
    }
}
