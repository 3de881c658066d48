//! Anomaly detection in SQL: window functions that score a reading against a history or a cohort,
//! and the `mad` aggregate. Every DataFusion session fleetlake makes has them (see
//! [`crate::session`]); their semantics are specified by `sql/tests/anomaly/*.slt`.
//!
//! # Frame functions: the current row against the rows of its window frame
//!
//! `zscore`, `robust_zscore`, `iqr_score`, `spike`, `level_shift`, `percentile_rank` and
//! `cohort_outlier` score the **current row's value** against the values of the rows in its
//! window frame. The frame is the baseline, so one function serves both questions:
//!
//! ```sql
//! -- per series: each reading against the device's previous 20 (itself excluded)
//! robust_zscore(temperature_c) OVER (PARTITION BY device_id ORDER BY ts
//!                                    ROWS BETWEEN 20 PRECEDING AND 1 PRECEDING)
//! -- per cohort: each device's value against every member of its cohort (itself included)
//! robust_zscore(avg_temp) OVER (PARTITION BY model, hw_rev)
//! ```
//!
//! NULL values in the frame are ignored; a NULL current value scores NULL. Too small a
//! baseline scores NULL (each function names its minimum). **Zero spread**: when the baseline's
//! spread is 0 the score is 0 if the value equals the centre and ±infinity otherwise (IEEE
//! division), so `abs(score) > 3` holds for a flat-lined series that jumps. JSON answers show an
//! infinite score as `null` (JSON has no infinity); CSV and Arrow keep `inf`.
//!
//! Cost: each distinct frame is sorted once, O(w log w) for a frame of w rows; a whole-partition
//! frame (no `ORDER BY`) is computed once per partition, except for `level_shift`, whose two
//! sides move with the current row (O(w log w) per row). A cumulative frame (`ORDER BY` without
//! `ROWS`) over a long series costs O(n² log n): give per-series scores a bounded `ROWS` frame.
//!
//! # Recursive functions: the series in order
//!
//! `ewma` and `ewma_zscore` run along the partition in its `ORDER BY` order and ignore the frame.
//!
//! # Aggregate
//!
//! `mad(x)`: the median absolute deviation, unscaled (multiply by 1.4826 for a normal σ).

use std::fmt::Debug;
use std::hash::Hash;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{Result, ScalarValue, internal_err, plan_err};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, PartitionEvaluator, Signature, Volatility, WindowUDF, WindowUDFImpl,
    create_udaf,
};
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_plan::PhysicalExpr;

/// The scale that makes the MAD a consistent estimator of a normal distribution's σ:
/// 1 / Φ⁻¹(3/4) (Rousseeuw & Croux, 1993).
pub const MAD_TO_SIGMA: f64 = 1.4826;

/// The scale for the mean absolute deviation when the MAD is 0: √(π/2), as in IBM's modified
/// z-score (Iglewicz & Hoaglin, "How to Detect and Handle Outliers", 1993).
pub const MEAN_AD_TO_SIGMA: f64 = 1.253314;

/// The robust z above which `cohort_outlier` flags a value by default: Iglewicz & Hoaglin's 3.5.
pub const DEFAULT_OUTLIER_THRESHOLD: f64 = 3.5;

/// Summary statistics of the non-NULL values of a frame. The spreads are computed on first use
/// and kept: a whole-partition frame is scored for every row of the partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    /// The values, ascending.
    sorted: Vec<f64>,
    mean: f64,
    stddev: OnceLock<f64>,
    mad: OnceLock<f64>,
    mean_ad: OnceLock<f64>,
}

impl Baseline {
    /// The baseline of `values` (NaN and infinite values are ignored, like NULL).
    pub fn new(values: impl IntoIterator<Item = f64>) -> Self {
        let mut sorted: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let mean = match (sorted.first(), sorted.last()) {
            (None, _) | (_, None) => f64::NAN,
            // Identical values: their mean exactly (a sum of 0.1s is not a multiple of 0.1).
            (Some(lo), Some(hi)) if lo == hi => *lo,
            _ => sorted.iter().sum::<f64>() / sorted.len() as f64,
        };
        Self {
            sorted,
            mean,
            stddev: OnceLock::new(),
            mad: OnceLock::new(),
            mean_ad: OnceLock::new(),
        }
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// True without values.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The arithmetic mean (NaN when empty).
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// The sample standard deviation (n − 1 in the denominator; NaN under 2 values).
    pub fn stddev(&self) -> f64 {
        *self.stddev.get_or_init(|| {
            let n = self.sorted.len();
            if n < 2 {
                return f64::NAN;
            }
            if self.sorted[0] == self.sorted[n - 1] {
                return 0.0;
            }
            let ss: f64 = self.sorted.iter().map(|v| (v - self.mean).powi(2)).sum();
            (ss / (n - 1) as f64).sqrt()
        })
    }

    /// The `q`-quantile (0 ≤ q ≤ 1) by linear interpolation between closest ranks
    /// (Hyndman & Fan type 7, as numpy and `percentile_cont`); NaN when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        quantile_sorted(&self.sorted, q)
    }

    /// The median.
    pub fn median(&self) -> f64 {
        self.quantile(0.5)
    }

    /// The median absolute deviation from the median, unscaled.
    pub fn mad(&self) -> f64 {
        *self.mad.get_or_init(|| {
            let m = self.median();
            let mut dev: Vec<f64> = self.sorted.iter().map(|v| (v - m).abs()).collect();
            dev.sort_by(f64::total_cmp);
            quantile_sorted(&dev, 0.5)
        })
    }

    /// The mean absolute deviation from the median.
    pub fn mean_ad(&self) -> f64 {
        *self.mean_ad.get_or_init(|| {
            let m = self.median();
            self.sorted.iter().map(|v| (v - m).abs()).sum::<f64>() / self.sorted.len() as f64
        })
    }

    /// The share of values below `x`, ties counted half (the mid-rank empirical CDF), in [0, 1].
    pub fn percentile_rank(&self, x: f64) -> f64 {
        let below = self.sorted.partition_point(|v| *v < x);
        let not_above = self.sorted.partition_point(|v| *v <= x);
        (below as f64 + 0.5 * (not_above - below) as f64) / self.sorted.len() as f64
    }

    /// `x`'s standard score: (x − mean) / stddev. NULL (None) under 2 values.
    pub fn zscore(&self, x: f64) -> Option<f64> {
        (self.len() >= 2).then(|| ratio(x - self.mean, self.stddev()))
    }

    /// `x`'s robust z: (x − median) / (1.4826 · MAD); when the MAD is 0,
    /// (x − median) / (1.253314 · mean absolute deviation) (Iglewicz & Hoaglin, 1993; IBM SPSS's
    /// modified z). None under 3 values.
    pub fn robust_zscore(&self, x: f64) -> Option<f64> {
        if self.len() < 3 {
            return None;
        }
        let centre = self.median();
        let mad = self.mad();
        let spread = if mad > 0.0 {
            MAD_TO_SIGMA * mad
        } else {
            MEAN_AD_TO_SIGMA * self.mean_ad()
        };
        Some(ratio(x - centre, spread))
    }

    /// `x`'s distance outside the interquartile range, in IQRs: 0 inside [Q1, Q3],
    /// (x − Q3) / IQR above, (x − Q1) / IQR below (negative). Tukey's fences are ±1.5
    /// ("outlier") and ±3 ("far out"). None under 4 values.
    pub fn iqr_score(&self, x: f64) -> Option<f64> {
        if self.len() < 4 {
            return None;
        }
        let (q1, q3) = (self.quantile(0.25), self.quantile(0.75));
        let iqr = q3 - q1;
        Some(if x > q3 {
            ratio(x - q3, iqr)
        } else if x < q1 {
            ratio(x - q1, iqr)
        } else {
            0.0
        })
    }
}

fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n => {
            let h = (n - 1) as f64 * q.clamp(0.0, 1.0);
            let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
            sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
        }
    }
}

/// `num / spread`, with the zero-spread rule: 0 when `num` is 0, ±infinity otherwise.
fn ratio(num: f64, spread: f64) -> f64 {
    if spread == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            num.signum() * f64::INFINITY
        }
    } else {
        num / spread
    }
}

/// Welch's t statistic of `after` against `before`: (mean_a − mean_b) / √(s_a²/n_a + s_b²/n_b)
/// (Welch, 1947). A level shift at the current row shows as a large |t|; one spike moves one
/// value of one side and is diluted. None when a side has fewer than 2 values.
pub fn welch_t(before: &Baseline, after: &Baseline) -> Option<f64> {
    if before.len() < 2 || after.len() < 2 {
        return None;
    }
    let se = (before.stddev().powi(2) / before.len() as f64
        + after.stddev().powi(2) / after.len() as f64)
        .sqrt();
    Some(ratio(after.mean() - before.mean(), se))
}

/// The exponentially weighted moving average and standard deviation of a series, by the
/// incremental update of Finch, "Incremental calculation of weighted mean and variance" (2009):
/// δ = x − μ; μ ← μ + αδ; σ² ← (1 − α)(σ² + αδ²).
#[derive(Debug, Clone, Default)]
pub struct Ewma {
    alpha: f64,
    mean: Option<f64>,
    var: f64,
    seen: u64,
}

impl Ewma {
    /// An EWMA with smoothing factor `alpha` in (0, 1] (the weight of the newest value).
    pub fn new(alpha: f64) -> Self {
        Self {
            alpha,
            ..Default::default()
        }
    }

    /// The mean after taking `x` in, and `x`'s z against the state before it (None for the first two values:
    /// no spread yet), then takes `x` in.
    pub fn step(&mut self, x: f64) -> (Option<f64>, Option<f64>) {
        let before = self.mean;
        let z = match before {
            Some(m) if self.seen >= 2 => Some(ratio(x - m, self.var.sqrt())),
            _ => None,
        };
        match self.mean {
            None => self.mean = Some(x),
            Some(m) => {
                let delta = x - m;
                self.mean = Some(m + self.alpha * delta);
                self.var = (1.0 - self.alpha) * (self.var + self.alpha * delta * delta);
            }
        }
        self.seen += 1;
        (self.mean, z)
    }
}

/// Which anomaly function a window function computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Function {
    ZScore,
    RobustZScore,
    Iqr,
    PercentileRank,
    /// 'spike' / 'dip' / 'none' by robust z against a threshold.
    Spike,
    /// Welch's t of the current-and-following rows against the preceding rows of the frame.
    LevelShift,
    /// A boolean: robust z beyond a threshold, in a frame of at least a minimum size.
    CohortOutlier,
    Ewma,
    EwmaZScore,
}

impl Function {
    fn name(self) -> &'static str {
        match self {
            Self::ZScore => "zscore",
            Self::RobustZScore => "robust_zscore",
            Self::Iqr => "iqr_score",
            Self::PercentileRank => "percentile_rank",
            Self::Spike => "spike",
            Self::LevelShift => "level_shift",
            Self::CohortOutlier => "cohort_outlier",
            Self::Ewma => "ewma",
            Self::EwmaZScore => "ewma_zscore",
        }
    }

    /// The constant arguments after the value: (name, required).
    fn parameters(self) -> &'static [(&'static str, bool)] {
        match self {
            Self::Spike => &[("threshold", true)],
            Self::CohortOutlier => &[("min_size", true), ("threshold", false)],
            Self::Ewma | Self::EwmaZScore => &[("alpha", true)],
            _ => &[],
        }
    }

    fn output(self) -> DataType {
        match self {
            Self::Spike => DataType::Utf8,
            Self::CohortOutlier => DataType::Boolean,
            _ => DataType::Float64,
        }
    }

    fn uses_frame(self) -> bool {
        !matches!(self, Self::Ewma | Self::EwmaZScore)
    }
}

/// One anomaly window function (see the module documentation).
#[derive(Debug, PartialEq, Eq, Hash)]
struct AnomalyWindow {
    function: Function,
    signature: Signature,
}

impl AnomalyWindow {
    fn new(function: Function) -> Self {
        let params = function.parameters();
        let required = 1 + params.iter().filter(|(_, r)| *r).count();
        let signatures = (required..=1 + params.len())
            .map(|n| datafusion::logical_expr::TypeSignature::Exact(vec![DataType::Float64; n]))
            .collect();
        Self {
            function,
            signature: Signature::one_of(signatures, Volatility::Immutable),
        }
    }
}

/// The value of a constant argument, as f64.
fn constant(
    exprs: &[Arc<dyn PhysicalExpr>],
    index: usize,
    function: &str,
    name: &str,
) -> Result<Option<f64>> {
    let Some(expr) = exprs.get(index) else {
        return Ok(None);
    };
    let Some(literal) = expr.downcast_ref::<Literal>() else {
        return plan_err!("{function}: {name} must be a constant, got {expr}");
    };
    match literal.value().cast_to(&DataType::Float64)? {
        ScalarValue::Float64(Some(v)) if v.is_finite() => Ok(Some(v)),
        other => plan_err!("{function}: {name} must be a finite number, got {other}"),
    }
}

impl WindowUDFImpl for AnomalyWindow {
    fn name(&self) -> &str {
        self.function.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(
        &self,
        args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        let name = self.function.name();
        let exprs = args.input_exprs();
        let mut params = Vec::new();
        for (i, (param, required)) in self.function.parameters().iter().enumerate() {
            let value = constant(exprs, i + 1, name, param)?;
            if *required && value.is_none() {
                return plan_err!("{name} needs its {param} argument");
            }
            params.push(value);
        }
        let evaluator = match self.function {
            Function::Ewma | Function::EwmaZScore => {
                let alpha = params[0].expect("required");
                if !(alpha > 0.0 && alpha <= 1.0) {
                    return plan_err!(
                        "{name}: alpha is {alpha}, expected a smoothing factor in (0, 1]"
                    );
                }
                Params::Alpha(alpha)
            }
            Function::Spike => {
                let threshold = params[0].expect("required");
                if threshold <= 0.0 {
                    return plan_err!(
                        "{name}: threshold is {threshold}, expected a robust z above 0"
                    );
                }
                Params::Threshold(threshold)
            }
            Function::CohortOutlier => {
                let min_size = params[0].expect("required");
                if min_size < 3.0 || min_size.fract() != 0.0 {
                    return plan_err!(
                        "{name}: min_size is {min_size}, expected a whole number of at least 3 (a smaller cohort has no outliers)"
                    );
                }
                let threshold = params[1].unwrap_or(DEFAULT_OUTLIER_THRESHOLD);
                if threshold <= 0.0 {
                    return plan_err!(
                        "{name}: threshold is {threshold}, expected a robust z above 0"
                    );
                }
                Params::Outlier {
                    min_size: min_size as usize,
                    threshold,
                }
            }
            _ => Params::None,
        };
        Ok(Box::new(Evaluator {
            function: self.function,
            params: evaluator,
            row: 0,
            cached: None,
        }))
    }

    fn field(&self, field_args: WindowUDFFieldArgs) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(
            field_args.name(),
            self.function.output(),
            true,
        )))
    }
}

#[derive(Debug, Clone, Copy)]
enum Params {
    None,
    Alpha(f64),
    Threshold(f64),
    Outlier { min_size: usize, threshold: f64 },
}

/// Evaluates one partition. DataFusion calls [`PartitionEvaluator::evaluate`] once per row, in
/// order (these functions do not support bounded execution), so `row` is the current row.
#[derive(Debug)]
struct Evaluator {
    function: Function,
    params: Params,
    row: usize,
    /// The last frame's baseline: a whole-partition frame is summarised once.
    cached: Option<(Range<usize>, Baseline)>,
}

fn values_in(values: &Float64Array, range: Range<usize>) -> impl Iterator<Item = f64> + '_ {
    range
        .filter(|i| values.is_valid(*i))
        .map(|i| values.value(i))
}

impl Evaluator {
    fn baseline(&mut self, values: &Float64Array, range: &Range<usize>) -> &Baseline {
        let stale = self.cached.as_ref().is_none_or(|(r, _)| r != range);
        if stale {
            self.cached = Some((
                range.clone(),
                Baseline::new(values_in(values, range.clone())),
            ));
        }
        &self.cached.as_ref().expect("just set").1
    }
}

impl PartitionEvaluator for Evaluator {
    fn uses_window_frame(&self) -> bool {
        self.function.uses_frame()
    }

    fn evaluate(&mut self, values: &[ArrayRef], range: &Range<usize>) -> Result<ScalarValue> {
        let row = self.row;
        self.row += 1;
        let column = values[0].as_primitive::<Float64Type>();
        if row >= column.len() {
            return internal_err!(
                "{}: row {row} beyond the partition's {} rows",
                self.function.name(),
                column.len()
            );
        }
        let x = column
            .is_valid(row)
            .then(|| column.value(row))
            .filter(|x| x.is_finite());
        let function = self.function;
        let params = self.params;
        Ok(match function {
            Function::LevelShift => {
                // An inverted frame (`ROWS BETWEEN 1 PRECEDING AND 3 PRECEDING`) is empty.
                let split = row.max(range.start).min(range.end.max(range.start));
                let before = Baseline::new(values_in(column, range.start..split));
                let after = Baseline::new(values_in(column, split..range.end));
                ScalarValue::Float64(x.and_then(|_| welch_t(&before, &after)))
            }
            _ => {
                let Some(x) = x else {
                    return ScalarValue::try_from(&function.output());
                };
                let b = self.baseline(column, range);
                match (function, params) {
                    (Function::ZScore, _) => ScalarValue::Float64(b.zscore(x)),
                    (Function::RobustZScore, _) => ScalarValue::Float64(b.robust_zscore(x)),
                    (Function::Iqr, _) => ScalarValue::Float64(b.iqr_score(x)),
                    (Function::PercentileRank, _) => {
                        ScalarValue::Float64((!b.is_empty()).then(|| b.percentile_rank(x)))
                    }
                    (Function::Spike, Params::Threshold(k)) => {
                        ScalarValue::Utf8(b.robust_zscore(x).map(|z| {
                            if z > k {
                                "spike"
                            } else if z < -k {
                                "dip"
                            } else {
                                "none"
                            }
                            .to_string()
                        }))
                    }
                    (
                        Function::CohortOutlier,
                        Params::Outlier {
                            min_size,
                            threshold,
                        },
                    ) => ScalarValue::Boolean(Some(
                        b.len() >= min_size
                            && b.robust_zscore(x).is_some_and(|z| z.abs() > threshold),
                    )),
                    _ => return internal_err!("{}: parameters do not match", function.name()),
                }
            }
        })
    }

    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> Result<ArrayRef> {
        let Params::Alpha(alpha) = self.params else {
            return internal_err!("{}: evaluated without a frame", self.function.name());
        };
        let column = values[0].as_primitive::<Float64Type>();
        let mut ewma = Ewma::new(alpha);
        let out: Float64Array = (0..num_rows)
            .map(|i| {
                if column.is_null(i) || !column.value(i).is_finite() {
                    return None;
                }
                let (mean, z) = ewma.step(column.value(i));
                if self.function == Function::Ewma {
                    mean
                } else {
                    z
                }
            })
            .collect();
        Ok(Arc::new(out))
    }
}

/// Accumulates values for `mad`.
#[derive(Debug, Default)]
struct MadAccumulator {
    values: Vec<f64>,
}

impl Accumulator for MadAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let column = values[0].as_primitive::<Float64Type>();
        self.values
            .extend(column.iter().flatten().filter(|v| v.is_finite()));
        Ok(())
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        for v in values[0].as_primitive::<Float64Type>().iter().flatten() {
            if let Some(i) = self.values.iter().position(|x| x.total_cmp(&v).is_eq()) {
                self.values.swap_remove(i);
            }
        }
        Ok(())
    }

    fn supports_retract_batch(&self) -> bool {
        true
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let b = Baseline::new(self.values.iter().copied());
        Ok(ScalarValue::Float64((!b.is_empty()).then(|| b.mad())))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.values.capacity() * std::mem::size_of::<f64>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = ScalarValue::new_list_nullable(
            &self
                .values
                .iter()
                .map(|v| ScalarValue::Float64(Some(*v)))
                .collect::<Vec<_>>(),
            &DataType::Float64,
        );
        Ok(vec![ScalarValue::List(list)])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let lists = states[0].as_list::<i32>();
        for list in lists.iter().flatten() {
            self.values
                .extend(list.as_primitive::<Float64Type>().iter().flatten());
        }
        Ok(())
    }
}

/// The window functions, then the aggregates, fleetlake adds to every session.
pub fn window_functions() -> Vec<WindowUDF> {
    [
        Function::ZScore,
        Function::RobustZScore,
        Function::Iqr,
        Function::PercentileRank,
        Function::Spike,
        Function::LevelShift,
        Function::CohortOutlier,
        Function::Ewma,
        Function::EwmaZScore,
    ]
    .into_iter()
    .map(|s| WindowUDF::new_from_impl(AnomalyWindow::new(s)))
    .collect()
}

/// `mad(x)`: the median absolute deviation of the non-NULL values, unscaled; NULL without values.
/// Usable as a window function too (it retracts values from sliding frames).
pub fn aggregate_functions() -> Vec<AggregateUDF> {
    vec![create_udaf(
        "mad",
        vec![DataType::Float64],
        Arc::new(DataType::Float64),
        Volatility::Immutable,
        Arc::new(|_| Ok(Box::new(MadAccumulator::default()))),
        Arc::new(vec![DataType::List(Arc::new(Field::new_list_field(
            DataType::Float64,
            true,
        )))]),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_between_closest_ranks() {
        let b = Baseline::new([1.0, 2.0, 3.0, 4.0]);
        assert_eq!(b.median(), 2.5);
        assert_eq!(b.quantile(0.25), 1.75);
        assert_eq!(b.quantile(0.75), 3.25);
        assert_eq!(b.quantile(0.0), 1.0);
        assert_eq!(b.quantile(1.0), 4.0);
    }

    #[test]
    fn robust_z_uses_the_scaled_mad_then_the_mean_ad() {
        // median 3, |dev| = 2,1,0,1,2 → MAD 1
        let b = Baseline::new([1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(b.mad(), 1.0);
        assert!((b.robust_zscore(6.0).unwrap() - 3.0 / MAD_TO_SIGMA).abs() < 1e-12);
        // MAD 0 (most values equal): mean absolute deviation instead.
        let flat = Baseline::new([5.0, 5.0, 5.0, 5.0, 9.0]);
        assert_eq!(flat.mad(), 0.0);
        let z = flat.robust_zscore(7.0).unwrap();
        assert!((z - 2.0 / (MEAN_AD_TO_SIGMA * 0.8)).abs() < 1e-12);
        // Everything equal: 0 at the centre, infinite elsewhere.
        let same = Baseline::new([5.0; 4]);
        assert_eq!(same.robust_zscore(5.0), Some(0.0));
        assert_eq!(same.robust_zscore(4.0), Some(f64::NEG_INFINITY));
        assert_eq!(Baseline::new([1.0, 2.0]).robust_zscore(3.0), None);
    }

    #[test]
    fn percentile_rank_counts_ties_half() {
        let b = Baseline::new([1.0, 2.0, 2.0, 3.0]);
        assert_eq!(b.percentile_rank(2.0), 0.5);
        assert_eq!(b.percentile_rank(0.0), 0.0);
        assert_eq!(b.percentile_rank(9.0), 1.0);
    }

    #[test]
    fn ewma_follows_finch() {
        let mut e = Ewma::new(0.5);
        assert_eq!(e.step(10.0), (Some(10.0), None));
        // δ = 2, μ = 11, σ² = 0.5·(0 + 0.5·4) = 1
        assert_eq!(e.step(12.0), (Some(11.0), None));
        // z of 13 against μ 11, σ 1 = 2
        assert_eq!(e.step(13.0).1, Some(2.0));
    }

    #[test]
    fn welch_t_sees_a_level_shift() {
        let before = Baseline::new([1.0, 1.1, 0.9, 1.0]);
        let after = Baseline::new([5.0, 5.1, 4.9, 5.0]);
        assert!(welch_t(&before, &after).unwrap() > 40.0);
        assert_eq!(welch_t(&before, &Baseline::new([5.0])), None);
    }
}
