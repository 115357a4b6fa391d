//! Instants far ahead, computed without overflow.

use std::time::Duration;

use tokio::time::Instant;

/// The furthest any layer looks ahead: about 30 years, as tokio's own timers do.
pub(crate) const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `base + delay`, with any delay beyond [`FAR`] cut to it: never an overflow, whatever the
/// delay.
pub(crate) fn later(base: Instant, delay: Duration) -> Instant {
    base.checked_add(delay.min(FAR)).unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_delays_saturate() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::MAX), now + FAR);
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
