use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// The failure of a call that several requests shared, given to each of them.
///
/// A call that failed while only one request waited for it gives that request the inner
/// service's own error, untouched. When several waited, each gets a `CallFailed` whose
/// [`source`](Error::source) is that error, so classifiers that walk the source chain (such as
/// [`Rejected::find`](crate::Rejected::find)) still see it. A panic in the inner service is a
/// `CallFailed` for everybody, with [`is_panic`](CallFailed::is_panic) true.
#[derive(Clone)]
pub struct CallFailed {
    cause: Arc<Cause>,
}

enum Cause {
    Error(tower::BoxError),
    Panicked(String),
}

impl CallFailed {
    pub(super) fn error(err: tower::BoxError) -> Self {
        CallFailed {
            cause: Arc::new(Cause::Error(err)),
        }
    }

    pub(super) fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string payload".to_string());
        CallFailed {
            cause: Arc::new(Cause::Panicked(message)),
        }
    }

    /// Whether the inner service panicked (rather than returning an error).
    pub fn is_panic(&self) -> bool {
        matches!(*self.cause, Cause::Panicked(_))
    }
}

impl fmt::Debug for CallFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.cause {
            Cause::Error(e) => f.debug_tuple("CallFailed").field(e).finish(),
            Cause::Panicked(m) => f.debug_tuple("CallFailed::Panicked").field(m).finish(),
        }
    }
}

impl fmt::Display for CallFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.cause {
            Cause::Error(e) => write!(f, "the shared upstream call failed: {e}"),
            Cause::Panicked(m) => write!(f, "the shared upstream call panicked: {m}"),
        }
    }
}

impl Error for CallFailed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &*self.cause {
            Cause::Error(e) => Some(&**e),
            Cause::Panicked(_) => None,
        }
    }
}
