//! Paced replies: when each token is due, and bodies that send frames at their times.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use bytes::Bytes;
use tokio::time::Instant;

use super::state::{cap, Ending, InFlight, Ticket};

/// When the tokens of a reply are due.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    arrival: Instant,
    first: Instant,
    /// Seconds between two tokens; 0 for all at once.
    gap: f64,
    /// The wall-clock time of the arrival, for timestamps in replies.
    wall: SystemTime,
}

impl Pace {
    pub(crate) fn of(ticket: &Ticket) -> Self {
        let tps = ticket.tokens_per_second;
        let gap = if tps.is_finite() && tps > 0.0 {
            1.0 / tps
        } else {
            0.0
        };
        Pace {
            arrival: ticket.arrival,
            first: ticket.first_token,
            gap,
            wall: SystemTime::now(),
        }
    }

    /// When token `index` (from 0) is due.
    pub(crate) fn due(&self, index: usize) -> Instant {
        let offset = Duration::try_from_secs_f64(self.gap * index as f64).unwrap_or(Duration::ZERO);
        cap(self.first, offset)
    }

    /// From the arrival to `at`.
    pub(crate) fn since_arrival(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.arrival)
    }

    /// The wall-clock time of `at`.
    pub(crate) fn wall(&self, at: Instant) -> SystemTime {
        self.wall
            .checked_add(self.since_arrival(at))
            .unwrap_or(self.wall)
    }

    /// Unix seconds of the arrival.
    pub(crate) fn created(&self) -> u64 {
        self.wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// The number of tokens sent before a cut or an error event: half, rounded up.
pub(crate) fn halfway(tokens: usize) -> usize {
    tokens.div_ceil(2)
}

/// How a paced body ends after its last frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Cleanly: the request was served.
    Served,
    /// Cleanly, but the request failed (an error event was sent).
    Faulted,
    /// With an error, so that the server closes the connection: a cut stream.
    Cut,
}

/// The frames of a body, each with the instant it is due.
#[derive(Debug)]
pub(crate) struct Paced {
    pub(crate) frames: VecDeque<(Instant, Bytes)>,
    pub(crate) end: End,
    /// When the cut happens, for [`End::Cut`].
    pub(crate) cut_at: Option<Instant>,
    pub(crate) guard: InFlight,
}

/// A body that sends each frame at its time and then ends as `paced.end` says, settling the
/// request; dropped before the end, the request counts as cancelled.
pub(crate) fn body(paced: Paced) -> Body {
    let stream = futures_util::stream::unfold(Some(paced), |state| async move {
        let mut paced = state?;
        if let Some((due, frame)) = paced.frames.pop_front() {
            wait_until(due).await;
            return Some((Ok(frame), Some(paced)));
        }
        match paced.end {
            End::Served => {
                paced.guard.finish(Ending::Served);
                None
            }
            End::Faulted => {
                paced.guard.finish(Ending::Faulted { status: 200 });
                None
            }
            End::Cut => {
                if let Some(at) = paced.cut_at {
                    wait_until(at).await;
                }
                // Lets the server write out what it has before the connection is dropped.
                tokio::task::yield_now().await;
                paced.guard.finish(Ending::Faulted { status: 200 });
                let cut = std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "mock fault: stream cut halfway",
                );
                Some((Err(cut), None))
            }
        }
    });
    Body::from_stream(stream)
}

/// Sleeps until `at`, if it is still to come.
pub(crate) async fn wait_until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}
