//! How many messages one micro-batch may take, so that commits keep their cadence while a
//! backlog is caught up, without giving up throughput.
//!
//! When messages are always ready (a start on a backlog, the end of an outage) the loop never
//! waits, so the commit interval is checked between micro-batches, and a micro-batch must be
//! small enough that processing it does not outlast the interval. Processing a micro-batch of
//! `n` messages costs about `a + b·n`: a fixed part (planning and running every pipeline,
//! window and rule once) and a part per message. The budget fits `a` and `b` by least squares
//! over the micro-batches seen, weighting each older one by [`FORGET`] (exponential forgetting,
//! as in recursive least squares), and allows
//!
//! ```text
//! n = max((T − a) / b, a / b)      T = half the commit interval
//! ```
//!
//! clamped to `[MIN_ROWS, commit_rows]`: as many messages as fit in `T`, but never so few that
//! the fixed part is more than half the time (when `a ≥ T` the interval cannot be met, and
//! smaller batches would only fall further behind). Successive budgets alternate ±[`DITHER`]
//! around `n`, so the sizes vary enough to tell `a` from `b`. Before two micro-batches are seen
//! it allows one fetch's worth (`ingest.fetch_batch`).

use std::time::Duration;

/// The smallest micro-batch allowed.
pub(crate) const MIN_ROWS: usize = 100;

/// Weight of a micro-batch one step older in the fit.
const FORGET: f64 = 0.9;

/// Relative variation of successive budgets, so that the fit sees different sizes.
const DITHER: f64 = 0.2;

/// The micro-batch size budget (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    /// Processing time allowed per micro-batch (seconds): half the commit interval.
    target: f64,
    first: usize,
    max: usize,
    /// Exponentially weighted sums for the fit of seconds = a + b·rows.
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    /// Micro-batches recorded (for the dither's phase and the first budgets).
    seen: u64,
}

impl Budget {
    /// A budget for a commit interval, a first micro-batch of `first` messages, and at most `max`.
    pub(crate) fn new(commit_interval: Duration, first: usize, max: usize) -> Self {
        let max = max.max(1);
        Self {
            target: commit_interval.as_secs_f64() / 2.0,
            first: first.clamp(1, max),
            max,
            w: 0.0,
            x: 0.0,
            y: 0.0,
            xx: 0.0,
            xy: 0.0,
            seen: 0,
        }
    }

    /// The fitted fixed cost `a` and cost per message `b` (seconds), once they can be told apart.
    fn fit(&self) -> Option<(f64, f64)> {
        if self.seen < 2 || self.w <= 0.0 {
            return None;
        }
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let var = self.xx / self.w - mx * mx;
        let cov = self.xy / self.w - mx * my;
        if var <= (mx * 0.01).powi(2) {
            return None;
        }
        let b = cov / var;
        let a = my - b * mx;
        Some((a.max(0.0), b))
    }

    /// Messages the next micro-batch may take.
    pub(crate) fn rows(&self) -> usize {
        let lowest = MIN_ROWS.min(self.max);
        let n = match self.fit() {
            // Larger batches were not slower: nothing to gain from small ones.
            Some((_, b)) if b <= 0.0 => self.max as f64,
            Some((a, b)) => ((self.target - a) / b).max(a / b),
            // One measurement (or sizes too alike): all of it per message, as if a were 0.
            None if self.seen > 0 && self.w > 0.0 && self.y > 0.0 => {
                self.target / (self.y / self.x)
            }
            None if self.seen > 0 => self.max as f64,
            None => return self.first,
        };
        let phase = if self.seen.is_multiple_of(2) {
            1.0 + DITHER
        } else {
            1.0 - DITHER
        };
        ((n * phase).min(self.max as f64) as usize).clamp(lowest, self.max)
    }

    /// Records that processing `rows` messages took `elapsed`.
    pub(crate) fn record(&mut self, rows: usize, elapsed: Duration) {
        if rows == 0 {
            return;
        }
        let (x, y) = (rows as f64, elapsed.as_secs_f64());
        self.w = self.w * FORGET + 1.0;
        self.x = self.x * FORGET + x;
        self.y = self.y * FORGET + y;
        self.xx = self.xx * FORGET + x * x;
        self.xy = self.xy * FORGET + x * y;
        self.seen += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the budget against a cost of `a + b·n` seconds for `steps` micro-batches; the sizes
    /// it chose last (two, for the dither).
    fn settle(budget: &mut Budget, a: f64, b: f64, steps: usize) -> (usize, usize) {
        let mut last = (0, 0);
        for _ in 0..steps {
            let n = budget.rows();
            budget.record(n, Duration::from_secs_f64(a + b * n as f64));
            last = (last.1, n);
        }
        last
    }

    fn mean(p: (usize, usize)) -> f64 {
        (p.0 + p.1) as f64 / 2.0
    }

    #[test]
    fn a_cost_per_message_fits_half_the_interval() {
        // 0.5 ms a message, nothing fixed: 500 ms hold 1,000 messages.
        let mut b = Budget::new(Duration::from_secs(1), 1000, 20_000);
        assert_eq!(b.rows(), 1000);
        let n = mean(settle(&mut b, 0.0, 0.0005, 40));
        assert!((n - 1000.0).abs() < 60.0, "{n}");
    }

    #[test]
    fn a_fixed_cost_is_taken_off_the_interval() {
        // 100 ms fixed, 0.1 ms a message, 500 ms allowed: (0.5 − 0.1) / 0.0001 = 4,000.
        let mut b = Budget::new(Duration::from_secs(1), 1000, 20_000);
        let n = mean(settle(&mut b, 0.1, 0.0001, 40));
        assert!((n - 4000.0).abs() < 200.0, "{n}");
    }

    #[test]
    fn when_the_interval_cannot_be_met_batches_stay_large_enough_to_keep_up() {
        // 1 s fixed (a debug build on a loaded machine, every pipeline, window and rule), 0.3 ms a
        // message, 250 ms allowed: the fixed part is at most half, n = a / b = 3,333 (a budget
        // sized for the interval would shrink to the minimum and fall ever further behind).
        let mut b = Budget::new(Duration::from_millis(500), 1000, 20_000);
        let n = mean(settle(&mut b, 1.0, 0.0003, 40));
        assert!((n - 3333.0).abs() < 200.0, "{n}");
    }

    #[test]
    fn fast_processing_takes_commit_rows() {
        let mut b = Budget::new(Duration::from_secs(1), 1000, 20_000);
        let (x, y) = settle(&mut b, 0.01, 0.00001, 40);
        assert_eq!((x.max(y)), 20_000);
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
        assert!(tiny.rows() <= 20);
    }
}
