//! Responses as bytes, for a dedup cache kept outside the process (see
//! [`DedupLayer::store`](super::DedupLayer::store)).

use std::fmt;
use std::marker::PhantomData;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Full};

/// Turns responses into bytes and back.
///
/// Implemented by [`HttpResponseCodec`] for buffered HTTP responses and [`JsonCodec`] for
/// `serde` types; implement it for a response type of your own. Neither direction may panic: a
/// response that cannot be encoded is not stored (`None`), and bytes that cannot be decoded —
/// written by another version of the server, say — are a cache miss.
///
/// ```
/// use tower_llm_queue::dedup::Codec;
///
/// /// A reply that is plain text.
/// struct Text;
///
/// impl Codec for Text {
///     type Response = String;
///
///     fn encode(&self, response: &String) -> Option<Vec<u8>> {
///         Some(response.as_bytes().to_vec())
///     }
///
///     fn decode(&self, bytes: &[u8]) -> Option<String> {
///         String::from_utf8(bytes.to_vec()).ok()
///     }
/// }
///
/// assert_eq!(Text.decode(&Text.encode(&"hi".to_string()).unwrap()).unwrap(), "hi");
/// ```
pub trait Codec: Send + Sync + 'static {
    /// The response type it encodes.
    type Response;

    /// The response as bytes, or `None` if it is not to be stored.
    fn encode(&self, response: &Self::Response) -> Option<Vec<u8>>;

    /// The response back from its bytes, or `None` if they cannot be read.
    fn decode(&self, bytes: &[u8]) -> Option<Self::Response>;
}

/// Encodes `http::Response<Full<Bytes>>` — what
/// [`BufferResponseLayer`](crate::buffer::BufferResponseLayer) gives — as its status, its
/// headers and its body. The HTTP version and the extensions are not kept: a decoded response
/// has the default version and no extensions.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower_llm_queue::dedup::{Codec, HttpResponseCodec};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let response = http::Response::builder()
///     .status(201)
///     .header("content-type", "application/json")
///     .body(Full::new(Bytes::from_static(b"{}")))
///     .unwrap();
/// let bytes = HttpResponseCodec.encode(&response).unwrap();
/// let back = HttpResponseCodec.decode(&bytes).unwrap();
/// assert_eq!(back.status(), 201);
/// assert_eq!(back.headers()["content-type"], "application/json");
/// assert_eq!(back.into_body().collect().await.unwrap().to_bytes(), "{}");
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpResponseCodec;

/// The format's first byte: its version.
const HTTP_FORMAT: u8 = 1;

impl Codec for HttpResponseCodec {
    type Response = http::Response<Full<Bytes>>;

    fn encode(&self, response: &Self::Response) -> Option<Vec<u8>> {
        // A `Full` body yields its one frame at once.
        let body = response
            .body()
            .clone()
            .collect()
            .now_or_never()?
            .ok()?
            .to_bytes();
        let mut out = Vec::with_capacity(body.len() + 64);
        out.push(HTTP_FORMAT);
        out.extend_from_slice(&response.status().as_u16().to_be_bytes());
        out.extend_from_slice(&u32::try_from(response.headers().len()).ok()?.to_be_bytes());
        for (name, value) in response.headers() {
            for part in [name.as_str().as_bytes(), value.as_bytes()] {
                out.extend_from_slice(&u32::try_from(part.len()).ok()?.to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decode(&self, bytes: &[u8]) -> Option<Self::Response> {
        let mut reader = Reader(bytes);
        if reader.take(1)? != [HTTP_FORMAT] {
            return None;
        }
        let status = u16::from_be_bytes(reader.take(2)?.try_into().ok()?);
        let mut response = http::Response::new(Full::new(Bytes::new()));
        *response.status_mut() = http::StatusCode::from_u16(status).ok()?;
        let count = reader.length()?;
        for _ in 0..count {
            let name = reader.take_prefixed()?;
            let value = reader.take_prefixed()?;
            response.headers_mut().append(
                http::HeaderName::from_bytes(name).ok()?,
                http::HeaderValue::from_bytes(value).ok()?,
            );
        }
        *response.body_mut() = Full::new(Bytes::copy_from_slice(reader.0));
        Some(response)
    }
}

/// Reads the HTTP format, never past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn length(&mut self) -> Option<usize> {
        let n = u32::from_be_bytes(self.take(4)?.try_into().ok()?);
        usize::try_from(n).ok()
    }

    fn take_prefixed(&mut self) -> Option<&'a [u8]> {
        let n = self.length()?;
        self.take(n)
    }
}

/// Encodes any `serde` type as JSON.
///
/// ```
/// use tower_llm_queue::dedup::{Codec, JsonCodec};
///
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// struct Plan { title: String, steps: Vec<String> }
///
/// let codec = JsonCodec::<Plan>::new();
/// let plan = Plan { title: "bakery".into(), steps: vec!["rent".into()] };
/// assert_eq!(codec.decode(&codec.encode(&plan).unwrap()), Some(plan));
/// assert_eq!(codec.decode(b"not json"), None);
/// ```
pub struct JsonCodec<T>(PhantomData<fn() -> T>);

impl<T> JsonCodec<T> {
    /// A codec for `T`.
    pub fn new() -> Self {
        JsonCodec(PhantomData)
    }
}

impl<T> Default for JsonCodec<T> {
    fn default() -> Self {
        JsonCodec::new()
    }
}

impl<T> Clone for JsonCodec<T> {
    fn clone(&self) -> Self {
        JsonCodec::new()
    }
}

impl<T> fmt::Debug for JsonCodec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonCodec")
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> Codec for JsonCodec<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + 'static,
{
    type Response = T;

    fn encode(&self, response: &T) -> Option<Vec<u8>> {
        serde_json::to_vec(response).ok()
    }

    fn decode(&self, bytes: &[u8]) -> Option<T> {
        serde_json::from_slice(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_responses_keep_status_headers_and_body() {
        let response = http::Response::builder()
            .status(429)
            .header("retry-after", "3")
            .header("x-many", "a")
            .header("x-many", "b")
            .body(Full::new(Bytes::from_static(b"slow down \xff")))
            .unwrap();
        let bytes = HttpResponseCodec.encode(&response).unwrap();
        let back = HttpResponseCodec.decode(&bytes).unwrap();
        assert_eq!(back.status(), 429);
        assert_eq!(back.headers(), response.headers());
        let body = back.into_body().collect().now_or_never().unwrap().unwrap();
        assert_eq!(body.to_bytes(), Bytes::from_static(b"slow down \xff"));
    }

    #[test]
    fn malformed_bytes_are_a_miss_never_a_panic() {
        let response = http::Response::builder()
            .header("a", "b")
            .body(Full::new(Bytes::from_static(b"body")))
            .unwrap();
        let bytes = HttpResponseCodec.encode(&response).unwrap();
        // Every cut short of the headers' end, and every garbled start.
        for end in 0..bytes.len() - 4 {
            assert!(HttpResponseCodec.decode(&bytes[..end]).is_none(), "{end}");
        }
        for n in 0..=255u8 {
            let mut garbled = bytes.clone();
            garbled[0] = n;
            assert_eq!(
                HttpResponseCodec.decode(&garbled).is_some(),
                n == HTTP_FORMAT
            );
        }
        let mut huge = vec![HTTP_FORMAT, 0, 200];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(HttpResponseCodec.decode(&huge).is_none());
        let mut bad_status = bytes.clone();
        bad_status[1..3].copy_from_slice(&1000u16.to_be_bytes());
        assert!(HttpResponseCodec.decode(&bad_status).is_none());
    }
}
