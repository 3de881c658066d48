//! How many messages one micro-batch may take, so that commits keep their cadence while a
//! backlog is caught up.
//!
//! When messages are always ready (a start on a backlog, the end of an outage) the loop never
//! waits, so the commit interval must be checked between micro-batches, and a micro-batch must
//! be small enough that processing it does not outlast the interval. The budget measures the
//! cost of processing per message (an exponentially weighted moving average, weight
//! [`WEIGHT`] on the newest micro-batch) and allows as many messages as half the commit interval
//! holds at that cost: at least [`MIN_ROWS`], at most `commit_rows`. Before the first
//! measurement it allows one fetch's worth (`ingest.fetch_batch`).

use std::time::Duration;

/// The smallest micro-batch allowed, however slow processing is (per-batch costs dominate below).
pub(crate) const MIN_ROWS: usize = 100;

/// Weight of the newest micro-batch in the moving average of the cost per message.
const WEIGHT: f64 = 0.3;

/// The micro-batch size budget (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    /// Processing time allowed per micro-batch: half the commit interval.
    target: Duration,
    /// Seconds per message, once measured.
    per_message: Option<f64>,
    first: usize,
    max: usize,
}

impl Budget {
    /// A budget for a commit interval, a first micro-batch of `first` messages, and at most `max`.
    pub(crate) fn new(commit_interval: Duration, first: usize, max: usize) -> Self {
        let max = max.max(1);
        Self {
            target: commit_interval / 2,
            per_message: None,
            first: first.clamp(1, max),
            max,
        }
    }

    /// Messages the next micro-batch may take.
    pub(crate) fn rows(&self) -> usize {
        match self.per_message {
            None => self.first,
            Some(cost) if cost <= 0.0 => self.max,
            Some(cost) => {
                let rows = self.target.as_secs_f64() / cost;
                (rows.min(self.max as f64) as usize).clamp(MIN_ROWS.min(self.max), self.max)
            }
        }
    }

    /// Records that processing `rows` messages took `elapsed`.
    pub(crate) fn record(&mut self, rows: usize, elapsed: Duration) {
        if rows == 0 {
            return;
        }
        let cost = elapsed.as_secs_f64() / rows as f64;
        self.per_message = Some(match self.per_message {
            None => cost,
            Some(avg) => avg + WEIGHT * (cost - avg),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_one_fetch_then_fits_half_the_interval() {
        let mut b = Budget::new(Duration::from_secs(1), 1000, 20_000);
        assert_eq!(b.rows(), 1000);
        // 0.5 ms a message (a debug build): 500 ms hold 1,000 messages.
        b.record(1000, Duration::from_millis(500));
        assert_eq!(b.rows(), 1000);
        // Release: 10 µs a message; the average moves towards it.
        for _ in 0..30 {
            b.record(1000, Duration::from_millis(10));
        }
        assert_eq!(b.rows(), 20_000, "capped at commit_rows");
    }

    #[test]
    fn never_below_the_minimum_nor_above_the_maximum() {
        let mut b = Budget::new(Duration::from_millis(100), 1000, 500);
        assert_eq!(b.rows(), 500);
        b.record(10, Duration::from_secs(10));
        assert_eq!(b.rows(), MIN_ROWS);
        let mut tiny = Budget::new(Duration::from_millis(100), 1000, 20);
        tiny.record(10, Duration::from_secs(10));
        assert_eq!(tiny.rows(), 20);
        tiny.record(0, Duration::from_secs(1));
        assert_eq!(tiny.rows(), 20);
    }
}
