//! The hand-off between a layer's shared state and one waiting request: a status word and the
//! waker of the task that waits on it.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::task::{Context, Poll, RawWakerVTable, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const CANCELLED: u8 = 2;
const GONE: u8 = 3;

/// What happened to a request that waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It may run: a slot is now its own.
    Granted,
    /// It was cancelled through a handle.
    Cancelled,
}

/// One request's status, shared between its future and the layer's state.
///
/// Transitions: `WAITING → GRANTED`, `WAITING/GRANTED → CANCELLED` (through a handle), and
/// `WAITING → GONE` (the future gave up: dropped or timed out). Whoever makes a transition under
/// the layer's lock owns its consequences, so a grant is never lost and never given twice.
#[derive(Debug, Default)]
pub(crate) struct Waiter {
    status: AtomicU8,
    /// How long it waited, in nanoseconds, once granted through [`Waiter::grant_after`].
    waited: AtomicU64,
    waker: AtomicWaker,
}

impl Waiter {
    pub(crate) fn new() -> Self {
        Waiter::default()
    }

    /// Makes a waiter nobody else holds new again, so that its allocation serves another
    /// request.
    pub(crate) fn reset(&mut self) {
        *self = Waiter::default();
    }

    /// A waiter that already holds its slot.
    #[cfg(test)]
    pub(crate) fn granted() -> Self {
        Waiter {
            status: AtomicU8::new(GRANTED),
            waited: AtomicU64::new(0),
            waker: AtomicWaker::new(),
        }
    }

    /// Gives the slot to this waiter without waking it: the caller wakes the returned task, if
    /// any, once it has let go of its locks. `None` if the waiter had already given up.
    pub(crate) fn grant(&self) -> Option<Option<Waker>> {
        self.status
            .compare_exchange(WAITING, GRANTED, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| self.waker.take())
    }

    /// [`Waiter::grant`], after a wait of `waited`, which [`Waiter::waited`] tells from then on.
    pub(crate) fn grant_after(&self, waited: Duration) -> Option<Option<Waker>> {
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.waited.store(nanos, Ordering::Relaxed);
        self.grant()
    }

    /// How long a request granted through [`Waiter::grant_after`] waited; zero otherwise.
    pub(crate) fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited.load(Ordering::Relaxed))
    }

    /// Marks the request cancelled and wakes it, whether it waits or runs. False if it was
    /// already cancelled or gone.
    pub(crate) fn cancel(&self) -> bool {
        let mut current = self.status.load(Ordering::Acquire);
        loop {
            if current != WAITING && current != GRANTED {
                return false;
            }
            match self.status.compare_exchange(
                current,
                CANCELLED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.waker.wake();
                    return true;
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// The future gives up waiting. False if a grant (or a cancellation) came first.
    pub(crate) fn leave(&self) -> bool {
        self.status
            .compare_exchange(WAITING, GONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Neither granted, cancelled nor gone yet.
    pub(crate) fn is_waiting(&self) -> bool {
        self.status.load(Ordering::Acquire) == WAITING
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.status.load(Ordering::Acquire) == CANCELLED
    }

    /// Pending while waiting; the waker is registered before the status is read again, so a
    /// grant between the two is never missed.
    pub(crate) fn poll(&self, cx: &mut Context<'_>) -> Poll<Outcome> {
        if let Some(outcome) = self.settled() {
            return Poll::Ready(outcome);
        }
        self.waker.register(cx.waker());
        match self.settled() {
            Some(outcome) => Poll::Ready(outcome),
            None => Poll::Pending,
        }
    }

    /// Registers interest in a cancellation of a running request; true once cancelled.
    pub(crate) fn poll_cancelled(&self, cx: &mut Context<'_>) -> bool {
        if self.is_cancelled() {
            return true;
        }
        self.waker.register(cx.waker());
        self.is_cancelled()
    }

    fn settled(&self) -> Option<Outcome> {
        match self.status.load(Ordering::Acquire) {
            GRANTED => Some(Outcome::Granted),
            CANCELLED => Some(Outcome::Cancelled),
            _ => None,
        }
    }
}

/// Which task a request last registered to be woken, told apart as [`Waker::will_wake`] does,
/// without a clone of its waker: the registration (in a waiter, or in a registry) holds the
/// clone, and with it the task whose address this compares.
#[derive(Debug, Default)]
pub(crate) struct Registered(Option<(usize, &'static RawWakerVTable)>);

impl Registered {
    /// Whether `waker` wakes the task registered last; if not, it is the one from now on, and
    /// the caller registers it.
    #[inline]
    pub(crate) fn stands(&mut self, waker: &Waker) -> bool {
        let task = (waker.data() as usize, waker.vtable());
        match self.0 {
            Some((data, vtable)) if data == task.0 && std::ptr::eq(vtable, task.1) => true,
            _ => {
                self.0 = Some(task);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_and_leave_exclude_each_other() {
        let w = Waiter::new();
        assert!(w.grant().is_some());
        assert!(!w.leave());
        assert!(w.grant().is_none());

        let w = Waiter::new();
        assert!(w.leave());
        assert!(w.grant().is_none());
        assert!(!w.cancel());
    }

    #[test]
    fn a_registration_stands_for_its_task_only() {
        let (a, b) = (
            futures_util::task::noop_waker(),
            std::task::Waker::noop().clone(),
        );
        let mut registered = Registered::default();
        assert!(!registered.stands(&a), "nothing was registered yet");
        assert!(registered.stands(&a.clone()));
        assert!(!registered.stands(&b), "another task");
        assert!(registered.stands(&b));
        assert!(
            !registered.stands(&a),
            "the first task again, after another"
        );
    }

    #[test]
    fn cancel_reaches_running_and_waiting() {
        let w = Waiter::granted();
        assert!(w.cancel());
        assert!(w.is_cancelled());
        assert!(!w.cancel());
        let w = Waiter::new();
        assert!(w.cancel());
        assert!(w.grant().is_none());
    }
}
