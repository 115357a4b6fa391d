use crate::key::{ExtractKey, Key};
use crate::rejected::Rejected;

/// Finds a request's priority level: 1 is the highest. Values outside `1..=levels` are clamped
/// (0 counts as 1, anything above the lowest level as the lowest).
///
/// Implemented by [`LowestPriority`] (the default), [`HeaderPriority`] and every
/// `Fn(&Req) -> u8`.
pub trait ExtractPriority<Req> {
    /// The request's level.
    fn priority(&self, request: &Req) -> u8;
}

impl<F, Req> ExtractPriority<Req> for F
where
    F: Fn(&Req) -> u8,
{
    fn priority(&self, request: &Req) -> u8 {
        self(request)
    }
}

/// Puts every request at the lowest level.
#[derive(Debug, Clone, Copy, Default)]
pub struct LowestPriority;

impl<Req> ExtractPriority<Req> for LowestPriority {
    fn priority(&self, _: &Req) -> u8 {
        u8::MAX
    }
}

/// Reads the level from a header such as `x-priority: 1`. A missing or malformed value means the
/// lowest level, so a client cannot jump the queue by sending garbage.
#[derive(Debug, Clone)]
pub struct HeaderPriority {
    name: http::HeaderName,
}

impl HeaderPriority {
    /// Reads the header `name`.
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name; this is a programming error caught at start-up.
    pub fn new(name: &str) -> Self {
        let name = http::HeaderName::try_from(name)
            .unwrap_or_else(|_| panic!("{name:?} is not a valid header name"));
        HeaderPriority { name }
    }
}

impl<B> ExtractPriority<http::Request<B>> for HeaderPriority {
    fn priority(&self, request: &http::Request<B>) -> u8 {
        request
            .headers()
            .get(&self.name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(u8::MAX)
    }
}

/// Decides whose turn a waiting request takes within its level; see
/// [`PriorityQueueLayer::fair_by`](super::PriorityQueueLayer::fair_by).
pub trait FairShare<Req> {
    /// The user the request belongs to, `None` for plain arrival order.
    fn user(&self, request: &Req) -> Result<Option<Key>, Rejected>;
}

/// Plain arrival order within a level (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct ArrivalOrder;

impl<Req> FairShare<Req> for ArrivalOrder {
    fn user(&self, _: &Req) -> Result<Option<Key>, Rejected> {
        Ok(None)
    }
}

/// Round robin across the users that an [`ExtractKey`] finds.
#[derive(Debug, Clone, Copy)]
pub struct FairBy<E>(pub(crate) E);

impl<E, Req> FairShare<Req> for FairBy<E>
where
    E: ExtractKey<Req>,
{
    fn user(&self, request: &Req) -> Result<Option<Key>, Rejected> {
        self.0.extract(request).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_priority_defaults_to_lowest() {
        let p = HeaderPriority::new("x-priority");
        let req = http::Request::builder()
            .header("x-priority", "2")
            .body(())
            .unwrap();
        assert_eq!(p.priority(&req), 2);
        let req = http::Request::builder()
            .header("x-priority", "high")
            .body(())
            .unwrap();
        assert_eq!(p.priority(&req), u8::MAX);
        assert_eq!(p.priority(&http::Request::new(())), u8::MAX);
    }
}
