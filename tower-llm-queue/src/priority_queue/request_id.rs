use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Identifies one request in a [`PriorityQueueLayer`](super::PriorityQueueLayer), for
/// [`PriorityQueueHandle::cancel`](super::PriorityQueueHandle::cancel) and
/// [`entries`](super::PriorityQueueHandle::entries).
///
/// [`RequestId::next`] hands out ids unique within the process. An id parses from and prints as
/// a decimal number, so it can travel in a header or a URL.
///
/// Ids are sequential, hence easy to guess: they name a request, they do not prove that the
/// caller may act on it. A cancel endpoint should use
/// [`PriorityQueueHandle::cancel_owned`](super::PriorityQueueHandle::cancel_owned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct RequestId(u64);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl RequestId {
    /// A new id, never handed out before in this process.
    pub fn next() -> Self {
        RequestId(NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }

    /// The id with this number (for ids that come from elsewhere, such as a client).
    pub fn from_u64(n: u64) -> Self {
        RequestId(n)
    }

    /// The id's number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for RequestId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse().map(RequestId)
    }
}

/// Decides a request's [`RequestId`], and may record it in the request so that the inner service
/// sees it.
///
/// Implemented by [`NewRequestId`] (the default), [`RequestIdExtension`] for `http::Request`, and
/// every `Fn(&mut Req) -> RequestId`.
pub trait AssignRequestId<Req> {
    /// The id of this request.
    fn assign(&self, request: &mut Req) -> RequestId;
}

impl<F, Req> AssignRequestId<Req> for F
where
    F: Fn(&mut Req) -> RequestId,
{
    fn assign(&self, request: &mut Req) -> RequestId {
        self(request)
    }
}

/// Gives every request a fresh [`RequestId::next`]; the caller reads it from the response future
/// ([`ResponseFuture::request_id`](super::ResponseFuture::request_id)).
#[derive(Debug, Clone, Copy, Default)]
pub struct NewRequestId;

impl<Req> AssignRequestId<Req> for NewRequestId {
    fn assign(&self, _: &mut Req) -> RequestId {
        RequestId::next()
    }
}

/// For `http::Request`: uses the [`RequestId`] extension when an earlier middleware or the
/// caller put one there, and otherwise inserts a fresh one, so that handlers can read it with
/// `Extension<RequestId>` (for instance to return it to the client for a later cancel).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdExtension;

impl<B> AssignRequestId<http::Request<B>> for RequestIdExtension {
    fn assign(&self, request: &mut http::Request<B>) -> RequestId {
        *request.extensions_mut().get_or_insert_with(RequestId::next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_is_kept_or_inserted() {
        let mut req = http::Request::new(());
        req.extensions_mut().insert(RequestId::from_u64(77));
        assert_eq!(RequestIdExtension.assign(&mut req).get(), 77);

        let mut req = http::Request::new(());
        let id = RequestIdExtension.assign(&mut req);
        assert_eq!(req.extensions().get::<RequestId>(), Some(&id));
    }

    #[test]
    fn ids_parse_and_print() {
        let id: RequestId = " 42 ".parse().unwrap();
        assert_eq!(id.to_string(), "42");
        assert!("x".parse::<RequestId>().is_err());
        assert_ne!(RequestId::next(), RequestId::next());
    }
}
