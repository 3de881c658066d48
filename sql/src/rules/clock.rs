//! Observed stream time: the clock silence rules measure a device's silence with.
//!
//! Wall-clock time is not silence. While NATS is unreachable, while fleetlake is stopped or
//! blocked on storage, and while a backlog is drained after a restart, devices may be reporting
//! but nothing reaches the rules; a wall clock would declare the whole fleet silent. The observed
//! clock advances only while ingest is watching a healthy stream:
//!
//! - each processed micro-batch is an observation (the stream delivered);
//! - while idle, an observation is made only after the NATS server answered a request of the
//!   consumer's and showed it has nothing more for it (connected and caught up);
//! - the wall-clock time between two consecutive observations is credited only when it is at
//!   most `max_gap`. A longer gap (fleetlake was stopped, the connection was down, a commit was
//!   blocked) is not counted, and a known interruption (the consumer failed) ends the run of
//!   observations at once, so the next observation credits nothing.
//!
//! A backlog drained after a restart is processed in stream order, so every device that reported
//! during the outage is seen again within the drain, which takes less observed time than the
//! outage did: draining never makes a device look silent.
//!
//! ```text
//!  wall:     ──obs──obs──obs────── NATS down (no observation) ──────obs──obs──►
//!  observed: ──+1s──+1s──+1s──────────────── +0 ───────────────────+0───+1s──►
//! ```

use serde::{Deserialize, Serialize};

/// Observed stream time in microseconds (see the module docs). Starts at 0 and only grows; it
/// is snapshotted with the state that uses it, so it carries on across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamClock {
    /// Microseconds of observed time.
    observed: i64,
    /// Wall clock (µs since the epoch) of the last observation; none after an interruption or a
    /// restart.
    #[serde(skip)]
    last: Option<i64>,
    /// The longest wall-clock gap (µs) between two observations that is counted.
    #[serde(skip)]
    max_gap: i64,
}

impl StreamClock {
    /// A clock at 0 that counts gaps of up to `max_gap_us` between observations.
    pub fn new(max_gap_us: i64) -> Self {
        Self {
            observed: 0,
            last: None,
            max_gap: max_gap_us.max(0),
        }
    }

    /// The same clock starting at `observed` µs (a restored snapshot's), with no observation
    /// yet: the time until the first observation after a restart is not counted.
    pub fn resumed(observed: i64, max_gap_us: i64) -> Self {
        Self {
            observed: observed.max(0),
            ..Self::new(max_gap_us)
        }
    }

    /// Records an observation of a healthy stream at wall-clock `now_us` (µs since the epoch) and
    /// returns the observed time. The wall-clock time since the previous observation counts when
    /// it is at most `max_gap`; a wall clock that went back counts nothing.
    pub fn observe(&mut self, now_us: i64) -> i64 {
        if let Some(last) = self.last {
            let gap = now_us.saturating_sub(last);
            if gap > 0 && gap <= self.max_gap {
                self.observed = self.observed.saturating_add(gap);
            }
        }
        self.last = Some(self.last.map_or(now_us, |l| l.max(now_us)));
        self.observed
    }

    /// Ends the run of observations: the time until the next one is not counted (the consumer
    /// failed, a commit is being retried, ingest is stopping).
    pub fn interrupt(&mut self) {
        self.last = None;
    }

    /// Observed time (µs).
    pub fn now(&self) -> i64 {
        self.observed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn counts_only_gaps_it_watched() {
        let mut c = StreamClock::new(5 * S);
        assert_eq!(
            c.observe(100 * S),
            0,
            "the first observation starts the run"
        );
        assert_eq!(c.observe(101 * S), S);
        assert_eq!(c.observe(104 * S), 4 * S);
        // Ten minutes without an observation (NATS down): not counted.
        assert_eq!(c.observe(704 * S), 4 * S);
        assert_eq!(c.observe(705 * S), 5 * S);
        // A known interruption: the next observation counts nothing even if it is soon.
        c.interrupt();
        assert_eq!(c.observe(706 * S), 5 * S);
        // A clock that goes back counts nothing, and is not followed backwards.
        assert_eq!(c.observe(700 * S), 5 * S);
        assert_eq!(c.observe(707 * S), 6 * S);
    }

    #[test]
    fn resumes_where_it_was_without_counting_the_restart() {
        let mut c = StreamClock::new(5 * S);
        c.observe(0);
        c.observe(3 * S);
        let bytes = serde_json::to_vec(&c).unwrap();
        let saved: StreamClock = serde_json::from_slice(&bytes).unwrap();
        let mut r = StreamClock::resumed(saved.now(), 5 * S);
        assert_eq!(r.observe(4 * S), 3 * S);
        assert_eq!(r.observe(5 * S), 4 * S);
    }
}
