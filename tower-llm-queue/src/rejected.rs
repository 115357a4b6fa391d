//! The one error type that every layer of this crate uses when it refuses a request itself.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::time::Duration;

/// Why a layer of this crate refused a request.
///
/// New kinds may be added in later versions, so match with a wildcard arm.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionKind {
    /// The queue already held as many waiting requests as it may.
    QueueFull,
    /// The request waited in a queue for longer than the configured timeout.
    QueueTimeout,
    /// The user already has as many requests in flight (or waiting) as allowed.
    UserLimit,
    /// A request or token rate limit was reached.
    RateLimited,
    /// The circuit breaker is open: the upstream is considered unhealthy.
    CircuitOpen,
    /// The request was cancelled through a layer's handle.
    Cancelled,
    /// The request carried no usable key (for example a missing or malformed user header) and the
    /// extractor was configured to refuse such requests.
    MissingKey,
}

impl RejectionKind {
    /// A short `snake_case` name, as used in the JSON body of [`crate::http::handle_error`].
    pub fn as_str(self) -> &'static str {
        match self {
            RejectionKind::QueueFull => "queue_full",
            RejectionKind::QueueTimeout => "queue_timeout",
            RejectionKind::UserLimit => "user_limit",
            RejectionKind::RateLimited => "rate_limited",
            RejectionKind::CircuitOpen => "circuit_open",
            RejectionKind::Cancelled => "cancelled",
            RejectionKind::MissingKey => "missing_key",
        }
    }

    fn default_message(self) -> &'static str {
        match self {
            RejectionKind::QueueFull => "the request queue is full",
            RejectionKind::QueueTimeout => "the request waited too long in the queue",
            RejectionKind::UserLimit => "too many concurrent requests for this user",
            RejectionKind::RateLimited => "rate limit exceeded",
            RejectionKind::CircuitOpen => "the upstream is unavailable (circuit open)",
            RejectionKind::Cancelled => "the request was cancelled",
            RejectionKind::MissingKey => "the request has no usable key",
        }
    }
}

impl fmt::Display for RejectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request refused by one of this crate's layers, with the reason and, when known, how long
/// the caller should wait before trying again.
///
/// Services built by this crate return [`tower::BoxError`]; a refusal is a boxed `Rejected`,
/// while errors of the inner service pass through untouched. Find it with
/// [`Rejected::find`]:
///
/// ```
/// use std::time::Duration;
/// use tower_llm_queue::{Rejected, RejectionKind};
///
/// let err: tower::BoxError = Rejected::new(RejectionKind::RateLimited)
///     .with_retry_after(Duration::from_millis(1500))
///     .into();
/// let rejected = Rejected::find(&*err).expect("a rejection");
/// assert_eq!(rejected.kind(), RejectionKind::RateLimited);
/// assert_eq!(rejected.retry_after(), Some(Duration::from_millis(1500)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    kind: RejectionKind,
    retry_after: Option<Duration>,
    message: Cow<'static, str>,
}

impl Rejected {
    /// A rejection of the given kind with its default message and no retry hint.
    pub fn new(kind: RejectionKind) -> Self {
        Rejected {
            kind,
            retry_after: None,
            message: Cow::Borrowed(kind.default_message()),
        }
    }

    /// Sets how long the caller should wait before trying again.
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Replaces the human-readable message.
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = message.into();
        self
    }

    /// Why the request was refused.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// How long to wait before trying again, when the layer knows.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// A human-readable explanation, safe to show to the end user.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Finds a `Rejected` in an error or anywhere in its chain of [`Error::source`]s.
    ///
    /// Wrappers such as `tower::buffer`'s `ServiceError` keep the original error as their
    /// source, so a rejection stays findable behind them.
    pub fn find<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a Rejected> {
        let mut current: Option<&'a (dyn Error + 'static)> = Some(err);
        while let Some(e) = current {
            if let Some(rejected) = e.downcast_ref::<Rejected>() {
                return Some(rejected);
            }
            current = e.source();
        }
        None
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(after) = self.retry_after {
            write!(f, " (retry after {} ms)", after.as_millis())?;
        }
        Ok(())
    }
}

impl Error for Rejected {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(tower::BoxError);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn found_behind_a_wrapper() {
        let inner: tower::BoxError = Rejected::new(RejectionKind::QueueFull).into();
        let outer = Wrapper(inner);
        let found = Rejected::find(&outer).unwrap();
        assert_eq!(found.kind(), RejectionKind::QueueFull);
        assert_eq!(found.message(), "the request queue is full");
    }

    #[test]
    fn other_errors_are_not_rejections() {
        let err = std::io::Error::other("boom");
        assert!(Rejected::find(&err).is_none());
    }

    #[test]
    fn display_names_kind_and_delay() {
        let r = Rejected::new(RejectionKind::UserLimit)
            .with_message("slow down")
            .with_retry_after(Duration::from_millis(250));
        assert_eq!(r.to_string(), "user_limit: slow down (retry after 250 ms)");
    }
}
