//! What the end-to-end tests share: an HTTP client that reads JSON, server-sent events and
//! streamed bodies, and Jain's fairness index (the load harness's).

#![allow(dead_code)]

pub mod own_redis;

use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A plain HTTP/1 client for one server.
#[derive(Clone, Debug)]
pub struct Http {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn new(base: impl Into<String>) -> Self {
        Http {
            base: base.into(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn request(&self, method: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
    }

    /// Sends a request and returns the response with its body still streaming.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> http::Response<hyper::body::Incoming> {
        self.client
            .request(request)
            .await
            .expect("the server answers")
    }

    /// Sends a request and reads the whole answer.
    pub async fn call(&self, request: Request<Full<Bytes>>) -> Answer {
        let response = self.send(request).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, user: &str) -> Answer {
        let request = self
            .request("GET", path)
            .header("x-user-id", user)
            .body(Full::default())
            .unwrap();
        self.call(request).await
    }

    pub async fn delete(&self, path: &str, user: &str) -> Answer {
        let request = self
            .request("DELETE", path)
            .header("x-user-id", user)
            .body(Full::default())
            .unwrap();
        self.call(request).await
    }

    pub async fn post_json(&self, path: &str, user: &str, body: &Value) -> Answer {
        let request = self
            .request("POST", path)
            .header("x-user-id", user)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        self.call(request).await
    }
}

/// Reads the `data:` payloads of a server-sent-event body as JSON, one at a time.
pub fn events(body: hyper::body::Incoming) -> impl Stream<Item = Value> + Unpin {
    Box::pin(futures_util::stream::unfold(
        (body, String::new()),
        |(mut body, mut buffer)| async move {
            loop {
                if let Some(end) = buffer.find("\n\n") {
                    let chunk: String = buffer.drain(..end + 2).collect();
                    let data: String = chunk
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(str::trim)
                        .collect();
                    if data.is_empty() {
                        continue;
                    }
                    let value = serde_json::from_str(&data).unwrap_or(Value::String(data));
                    return Some((value, (body, buffer)));
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buffer.push_str(&String::from_utf8_lossy(&data));
                        }
                    }
                    _ => return None,
                }
            }
        },
    ))
}

/// Jain's fairness index, shared with the load harness.
#[allow(unused_imports)]
pub use tower_llm_queue_servers::loadgen::jain;

/// Polls `check` every 20 ms until it holds, for at most `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}
