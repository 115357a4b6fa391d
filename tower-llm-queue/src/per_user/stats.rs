use serde::Serialize;

/// A snapshot of a [`PerUserConcurrencyLayer`](super::PerUserConcurrencyLayer)'s state, for
/// health endpoints and dashboards.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PerUserStats {
    /// Requests one user may have in flight.
    pub max_per_user: usize,
    /// Requests one user may have waiting (0: the excess is refused at once).
    pub max_waiting_per_user: usize,
    /// Users with a request in flight or waiting now.
    pub users: usize,
    /// Requests in flight now, all users together.
    pub in_flight: usize,
    /// Requests waiting now, all users together.
    pub waiting: usize,
    /// Requests admitted at once so far (waiters that got a slot later are not counted here).
    pub admitted: u64,
    /// Requests refused at once so far.
    pub rejected: u64,
    /// Requests that had to wait so far.
    pub waited: u64,
    /// Waiting requests refused after the wait timeout so far.
    pub timed_out: u64,
    /// Requests dropped by their caller so far.
    pub cancelled: u64,
    /// Requests whose inner call succeeded so far.
    pub completed: u64,
    /// Requests whose inner call failed or panicked so far.
    pub failed: u64,
}
