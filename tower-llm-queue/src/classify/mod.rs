//! Outcome classification, shared by [`RetryBackoffLayer`](crate::RetryBackoffLayer) and
//! [`CircuitBreakerLayer`](crate::CircuitBreakerLayer): did a call succeed, and if not, is it
//! worth trying again, and not before when?
//!
//! * [`DefaultClassifier`] works for any service: `Ok` is a success; an error is a retryable
//!   failure, except this crate's own refusals that a retry cannot fix.
//! * [`HttpClassifier`] reads `http::Response` statuses and the upstreams' "come back later"
//!   headers (see [`retry_delay`]).
//! * Any `Fn(Result<&Res, &BoxError>) -> Outcome` is a classifier too, for cases such as a
//!   content-policy refusal hidden in a 200 body.
//!
//! ```
//! use tower_llm_queue::classify::{Classify, HttpClassifier, Outcome};
//! use std::time::Duration;
//!
//! let throttled = http::Response::builder()
//!     .status(429)
//!     .header("retry-after", "7")
//!     .body(())
//!     .unwrap();
//! assert_eq!(
//!     HttpClassifier.classify(Ok(&throttled)),
//!     Outcome::Failure { retryable: true, not_before: Some(Duration::from_secs(7)) },
//! );
//! let bad = http::Response::builder().status(400).body(()).unwrap();
//! assert_eq!(HttpClassifier.classify(Ok(&bad)), Outcome::ClientError);
//! ```

mod headers;

use std::time::Duration;

use crate::rejected::{Rejected, RejectionKind};

pub use self::headers::{response_delay, retry_delay, retry_delay_in_text};

/// What a call's result means for retries and for the upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The call succeeded.
    Success,
    /// The call failed, and says something about the upstream: it is overloaded, down or
    /// slow (a 429 or 5xx, a timeout, a transport error).
    Failure {
        /// Whether trying again may succeed.
        retryable: bool,
        /// The upstream asked not to be called again before this delay has passed.
        not_before: Option<Duration>,
    },
    /// The request itself was at fault (a 4xx other than 429): a retry would fail the same
    /// way, and the upstream, which answered, is healthy. Not retried, and not counted by the
    /// circuit breaker unless it is told to
    /// ([`count_client_errors`](crate::CircuitBreakerLayer::count_client_errors)).
    ClientError,
}

impl Outcome {
    /// A failure that a retry may fix, with no delay asked for.
    pub const RETRYABLE: Outcome = Outcome::Failure {
        retryable: true,
        not_before: None,
    };

    /// A failure that a retry cannot fix.
    pub const FATAL: Outcome = Outcome::Failure {
        retryable: false,
        not_before: None,
    };

    /// Whether this is a failure (of the upstream or of the request).
    pub fn is_failure(&self) -> bool {
        !matches!(self, Outcome::Success)
    }
}

/// Decides what a call's result means. See the [module docs](self).
pub trait Classify<Response> {
    /// Classifies the result of one call.
    fn classify(&self, result: Result<&Response, &tower::BoxError>) -> Outcome;
}

impl<F, Response> Classify<Response> for F
where
    F: Fn(Result<&Response, &tower::BoxError>) -> Outcome,
{
    fn classify(&self, result: Result<&Response, &tower::BoxError>) -> Outcome {
        self(result)
    }
}

/// Classifies any service's results: `Ok` succeeds, errors are retryable failures — except this
/// crate's own refusals that a retry cannot fix.
///
/// | error | outcome |
/// |---|---|
/// | [`Rejected`] `QueueFull`, `QueueTimeout`, `RateLimited` | retryable, not before its `retry_after` |
/// | [`Rejected`] `UserLimit`, `CircuitOpen`, `Cancelled`, `MissingKey` | not retryable |
/// | anything else (timeouts, connection errors, ...) | retryable |
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl DefaultClassifier {
    /// The outcome of an error, as the table above says.
    pub fn classify_error(err: &tower::BoxError) -> Outcome {
        let Some(rejected) = Rejected::find(&**err) else {
            return Outcome::RETRYABLE;
        };
        match rejected.kind() {
            RejectionKind::QueueFull | RejectionKind::QueueTimeout | RejectionKind::RateLimited => {
                Outcome::Failure {
                    retryable: true,
                    not_before: rejected.retry_after(),
                }
            }
            _ => Outcome::FATAL,
        }
    }
}

impl<Response> Classify<Response> for DefaultClassifier {
    #[inline]
    fn classify(&self, result: Result<&Response, &tower::BoxError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(err) => DefaultClassifier::classify_error(err),
        }
    }
}

/// Classifies `http::Response`s by status, with the retry delay from the headers:
///
/// | status | outcome |
/// |---|---|
/// | 1xx, 2xx, 3xx | success |
/// | 429, 500, 502, 503, 504, 529 | retryable, not before the delay the response asks for ([`response_delay`]) |
/// | any other 5xx (501, 505, ...) | not retryable |
/// | any other 4xx (400, 401, 403, 404, 409, 422, ...) | [`Outcome::ClientError`]: not retryable, not the upstream's fault |
///
/// Errors (transport failures, timeouts, this crate's refusals) are classified as by
/// [`DefaultClassifier`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpClassifier;

impl<B> Classify<http::Response<B>> for HttpClassifier {
    #[inline]
    fn classify(&self, result: Result<&http::Response<B>, &tower::BoxError>) -> Outcome {
        let response = match result {
            Ok(response) => response,
            Err(err) => return DefaultClassifier::classify_error(err),
        };
        match response.status().as_u16() {
            100..=399 => Outcome::Success,
            429 | 500 | 502 | 503 | 504 | 529 => Outcome::Failure {
                retryable: true,
                not_before: response_delay(response),
            },
            400..=499 => Outcome::ClientError,
            _ => Outcome::FATAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> http::Response<()> {
        http::Response::builder().status(code).body(()).unwrap()
    }

    #[test]
    fn statuses() {
        for code in [200, 201, 204, 301] {
            assert_eq!(HttpClassifier.classify(Ok(&status(code))), Outcome::Success);
        }
        for code in [429, 500, 502, 503, 504, 529] {
            assert_eq!(
                HttpClassifier.classify(Ok(&status(code))),
                Outcome::RETRYABLE,
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 409, 422] {
            assert_eq!(
                HttpClassifier.classify(Ok(&status(code))),
                Outcome::ClientError,
                "{code}"
            );
        }
        for code in [501, 505] {
            assert_eq!(
                HttpClassifier.classify(Ok(&status(code))),
                Outcome::FATAL,
                "{code}"
            );
        }
    }

    #[test]
    fn errors() {
        let timeout: tower::BoxError = tower::timeout::error::Elapsed::new().into();
        assert_eq!(
            DefaultClassifier::classify_error(&timeout),
            Outcome::RETRYABLE
        );
        let io: tower::BoxError = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert_eq!(
            Classify::<http::Response<()>>::classify(&HttpClassifier, Err(&io)),
            Outcome::RETRYABLE
        );
        let limited: tower::BoxError = Rejected::new(RejectionKind::RateLimited)
            .with_retry_after(Duration::from_secs(3))
            .into();
        assert_eq!(
            DefaultClassifier::classify_error(&limited),
            Outcome::Failure {
                retryable: true,
                not_before: Some(Duration::from_secs(3))
            }
        );
        for kind in [
            RejectionKind::UserLimit,
            RejectionKind::CircuitOpen,
            RejectionKind::Cancelled,
            RejectionKind::MissingKey,
        ] {
            let err: tower::BoxError = Rejected::new(kind).into();
            assert_eq!(
                DefaultClassifier::classify_error(&err),
                Outcome::FATAL,
                "{kind}"
            );
        }
    }
}
