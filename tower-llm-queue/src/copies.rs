//! Results that are copies of one upstream call.
//!
//! When [`DedupLayer`](crate::DedupLayer) hands one call's result to several requests, or
//! serves it from its cache, every copy but one is marked while it is handed out. A layer
//! outside the dedup layer that accounts for upstream calls — the circuit breaker — watches for
//! the mark while it polls its inner future, and counts each upstream call once, whichever
//! order the two layers stand in.
//!
//! The mark is a flag of the current thread, set and read within one synchronous `poll`: the
//! copy is handed out in the very poll that returns it to the watching layer.

use std::cell::Cell;

thread_local! {
    static COPY: Cell<bool> = const { Cell::new(false) };
}

/// Marks the result being returned by the current poll as a copy.
pub(crate) fn mark() {
    COPY.with(|copy| copy.set(true));
}

/// Runs `poll` and tells whether it returned a copy. A watcher further out sees the mark too.
#[inline]
pub(crate) fn watch<T>(poll: impl FnOnce() -> T) -> (T, bool) {
    let outer = COPY.with(|copy| copy.replace(false));
    let out = poll();
    let copied = COPY.with(|copy| copy.replace(outer || copy.get()));
    (out, copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_reach_every_watcher_and_nothing_else() {
        let ((_, inner), outer) = watch(|| watch(mark));
        assert!(inner && outer);
        assert!(!watch(|| ()).1, "a stale mark is not seen");
        let ((_, inner), outer) = watch(|| watch(|| ()));
        assert!(!inner && !outer);
    }
}
