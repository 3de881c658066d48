//! Memory for ad-hoc queries: one engine-wide budget that every query draws from, a limit per
//! query within it, and the allocations DataFusion's memory pool does not see brought under it.
//!
//! DataFusion bounds an operator's memory only if the operator reserves it in the session's
//! [`MemoryPool`]. Three kinds of allocation escape that, and each is handled here:
//!
//! - **Operators that buffer without a reservation**: `WindowAggExec` (a window over the whole
//!   partition, `sum(x) OVER ()`) and `BoundedWindowAggExec` keep their input until a partition is
//!   complete (apache/datafusion#12919). [`BoundBuffering`] wraps each of them: the rows that went
//!   in and have not come out are reserved in the query's pool, at twice their size (the buffer and
//!   the copy the operator concatenates) plus 16 bytes per row for each window function (the copy
//!   of a frame's values that fleetlake's anomaly functions and DataFusion's sliding aggregates
//!   keep). When the reservation is refused the query fails with `query_memory_limit`.
//! - **Scalar functions whose output is sized by an argument** (`repeat('x', 1e9)`, `lpad`,
//!   `rpad`, `array_repeat`, `range`/`generate_series` as list functions, `replace`,
//!   `regexp_replace`): [`sized_functions`] replaces them, per query, with versions that reserve
//!   an upper bound of their output (computed from the arguments) before they allocate it.
//! - **Each query having a pool of its own**: [`QueryPool`] draws every reservation from the one
//!   [`EngineMemory`] as well, so all queries together stay within `query.total_memory_mb` and the
//!   rest of the process (ingest) keeps its memory.
//!
//! What remains outside any pool is bounded and documented in the README ("Limits"): an
//! operator's working memory for one batch (a few MiB at the default batch size of 8,192 rows),
//! and the transient results of scalar functions that are not amplifiers (at most a small multiple
//! of their input batch).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, FieldRef, Int64Type, IntervalMonthDayNanoType, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;

const MIB: usize = 1024 * 1024;

/// The memory all ad-hoc queries of one engine may reserve together (`query.total_memory_mb`).
/// Shared by every [`QueryPool`]; what is left of the process's memory is ingest's.
#[derive(Debug)]
pub struct EngineMemory {
    limit: usize,
    used: AtomicUsize,
}

impl EngineMemory {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes reserved by running queries now.
    pub fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The budget, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn try_grow(&self, additional: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(additional).filter(|n| *n <= self.limit)
            })
            .is_ok()
    }
}

/// One query's memory pool: at most `limit` bytes (the caller's `memory_mb`), each byte also
/// drawn from the engine's [`EngineMemory`] when there is one. Nothing spills: a refused
/// reservation fails the query (`query_memory_limit`).
#[derive(Debug)]
pub struct QueryPool {
    engine: Option<Arc<EngineMemory>>,
    limit: Option<usize>,
    used: AtomicUsize,
    /// Whether the last refused reservation was refused because the engine's budget was spent
    /// by other queries (the answer is then "busy, retry"), not by the query's own limit.
    engine_refused: AtomicBool,
}

impl QueryPool {
    /// A pool of at most `limit` bytes (`None`: no limit of its own) drawing from `engine`; never
    /// more than the engine's whole budget, so a query refused because it alone needs more is
    /// told it is too large, not that others are busy.
    pub fn new(limit: Option<usize>, engine: Option<Arc<EngineMemory>>) -> Arc<Self> {
        let limit = match (limit, &engine) {
            (Some(l), Some(e)) => Some(l.min(e.limit)),
            (None, Some(e)) => Some(e.limit),
            (l, None) => l,
        };
        Arc::new(Self {
            engine,
            limit,
            used: AtomicUsize::new(0),
            engine_refused: AtomicBool::new(false),
        })
    }

    /// The most this query may reserve, in bytes (`None`: unlimited).
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// Whether the last refused reservation was refused because all queries together had spent
    /// the engine's budget (rather than this query its own limit).
    pub fn refused_by_engine(&self) -> bool {
        self.engine_refused.load(Ordering::Relaxed)
    }
}

impl fmt::Display for QueryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QueryPool(used: {})", self.used.load(Ordering::Relaxed))
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "fleetlake_query"
    }

    fn grow(&self, _reservation: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::AcqRel);
        if let Some(engine) = &self.engine {
            engine.used.fetch_add(additional, Ordering::AcqRel);
        }
    }

    fn shrink(&self, _reservation: &MemoryReservation, shrink: usize) {
        self.used.fetch_sub(shrink, Ordering::AcqRel);
        if let Some(engine) = &self.engine {
            engine.used.fetch_sub(shrink, Ordering::AcqRel);
        }
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> DfResult<()> {
        let limit = self.limit.unwrap_or(usize::MAX);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(additional).filter(|n| *n <= limit)
            })
            .map_err(|used| {
                // The last refusal decides what the query is told (an earlier one DataFusion
                // absorbed, e.g. by emitting a partial aggregate early, does not).
                self.engine_refused.store(false, Ordering::Relaxed);
                DataFusionError::ResourcesExhausted(format!(
                    "{} needed {} MiB more with {} MiB of the query's {} MiB in use",
                    reservation.consumer().name(),
                    additional.div_ceil(MIB),
                    used / MIB,
                    limit / MIB
                ))
            })?;
        if let Some(engine) = &self.engine
            && !engine.try_grow(additional)
        {
            self.used.fetch_sub(additional, Ordering::AcqRel);
            self.engine_refused.store(true, Ordering::Relaxed);
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{} needed {} MiB more, and the queries running now hold {} MiB of the {} MiB all queries may use together (query.total_memory_mb)",
                reservation.consumer().name(),
                additional.div_ceil(MIB),
                engine.reserved() / MIB,
                engine.limit / MIB
            )));
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        match self.limit {
            Some(l) => MemoryLimit::Finite(l),
            None => MemoryLimit::Infinite,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operators that buffer

/// Physical optimizer rule: brings every window operator under the query's memory pool (see
/// the module docs). Runs after DataFusion's own rules; the plan's shape and results are
/// unchanged, each window operator gets a [`Buffered`] input and output.
#[derive(Debug, Default)]
pub struct BoundBuffering;

impl PhysicalOptimizerRule for BoundBuffering {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let functions = if let Some(w) = node.downcast_ref::<WindowAggExec>() {
                w.window_expr().len()
            } else if let Some(w) = node.downcast_ref::<BoundedWindowAggExec>() {
                w.window_expr().len()
            } else {
                return Ok(Transformed::no(node));
            };
            let [input] = node.children()[..] else {
                return Ok(Transformed::no(node));
            };
            let ledger = Arc::new(Ledger {
                name: node.name().to_string(),
                extra_per_row: 16 * functions,
                state: Mutex::new(LedgerState::default()),
            });
            let counted = Buffered::new(Arc::clone(input), Arc::clone(&ledger), Side::In);
            // The new child has its old child's properties exactly.
            let node = Arc::clone(&node).replace_children(
                vec![counted],
                ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep),
            )?;
            Ok(Transformed::yes(Buffered::new(node, ledger, Side::Out)))
        })
        .data()
    }

    fn name(&self) -> &str {
        "fleetlake_bound_buffering"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// What a buffering operator holds: rows in minus rows out, reserved in the query's pool.
#[derive(Debug)]
struct Ledger {
    name: String,
    extra_per_row: usize,
    state: Mutex<LedgerState>,
}

#[derive(Debug, Default)]
struct LedgerState {
    reservation: Option<MemoryReservation>,
    rows_in: usize,
    bytes_in: usize,
    rows_out: usize,
}

impl Ledger {
    /// The bytes the operator holds now: twice the rows still inside it (its buffer and the
    /// concatenated copy), plus each function's copy of the frame values.
    fn held(state: &LedgerState, extra_per_row: usize) -> usize {
        let inside = state.rows_in.saturating_sub(state.rows_out);
        if inside == 0 || state.rows_in == 0 {
            return 0;
        }
        let per_row = state.bytes_in / state.rows_in;
        inside.saturating_mul(2 * per_row + extra_per_row)
    }

    fn record(&self, context: &TaskContext, side: Side, batch: &RecordBatch) -> DfResult<()> {
        let mut state = self.state.lock().expect("ledger lock");
        match side {
            Side::In => {
                state.rows_in += batch.num_rows();
                state.bytes_in += batch.get_array_memory_size();
            }
            Side::Out => state.rows_out += batch.num_rows(),
        }
        let held = Self::held(&state, self.extra_per_row);
        let reservation = state.reservation.get_or_insert_with(|| {
            MemoryConsumer::new(format!("{} (buffered input)", self.name))
                .register(context.memory_pool())
        });
        // Only a growing buffer can be refused; rows leaving always shrink it.
        reservation.try_resize(held)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Counts the rows entering the operator (wraps its input).
    In,
    /// Counts the rows leaving it (wraps the operator).
    Out,
}

/// A pass-through node that records each batch in a [`Ledger`]; see [`BoundBuffering`].
#[derive(Debug)]
struct Buffered {
    input: Arc<dyn ExecutionPlan>,
    ledger: Arc<Ledger>,
    side: Side,
    properties: Arc<PlanProperties>,
}

impl Buffered {
    fn new(input: Arc<dyn ExecutionPlan>, ledger: Arc<Ledger>, side: Side) -> Arc<Self> {
        let properties = Arc::clone(input.properties());
        Arc::new(Self {
            input,
            ledger,
            side,
            properties,
        })
    }
}

impl DisplayAs for Buffered {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let side = match self.side {
            Side::In => "in",
            Side::Out => "out",
        };
        write!(f, "ReservedBuffer: {side} of {}", self.ledger.name)
    }
}

impl ExecutionPlan for Buffered {
    fn name(&self) -> &str {
        "ReservedBuffer"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = children.pop().ok_or_else(|| {
            DataFusionError::Internal("ReservedBuffer takes one child".to_string())
        })?;
        Ok(Buffered::new(input, Arc::clone(&self.ledger), self.side))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let stream = self.input.execute(partition, Arc::clone(&context))?;
        let schema = stream.schema();
        let ledger = Arc::clone(&self.ledger);
        let side = self.side;
        let counted = stream.map(move |batch| {
            let batch = batch?;
            ledger.record(&context, side, &batch)?;
            Ok(batch)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, counted)))
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar functions whose output is sized by an argument

/// An upper bound, in bytes, of what a function's call allocates for its output, from its
/// arguments; 0 when it cannot tell (the call then goes ahead unreserved).
/// Scalar arguments come as one-row arrays and stand for every one of the `rows`.
type Estimate = fn(&[ArrayRef], usize) -> usize;

/// DataFusion's amplifying scalar functions, each wrapped to reserve an upper bound of its
/// output in `pool` before it allocates: registered per query over the defaults (the same
/// names), so `repeat('x', 1000000000)` fails with `query_memory_limit` instead of allocating a
/// gigabyte. Functions `registry` lacks are skipped.
pub fn sized_functions(
    registry: &dyn datafusion::execution::FunctionRegistry,
    pool: Arc<dyn MemoryPool>,
) -> Vec<ScalarUDF> {
    let estimates: [(&str, Estimate); 8] = [
        ("repeat", estimate_repeat),
        ("lpad", estimate_pad),
        ("rpad", estimate_pad),
        ("array_repeat", estimate_array_repeat),
        ("range", estimate_range),
        ("generate_series", estimate_range),
        ("replace", estimate_replace),
        ("regexp_replace", estimate_regexp_replace),
    ];
    estimates
        .into_iter()
        .filter_map(|(name, estimate)| {
            let inner = registry.udf(name).ok()?;
            Some(ScalarUDF::new_from_impl(Sized {
                inner,
                pool: Arc::clone(&pool),
                estimate,
            }))
        })
        .collect()
}

#[derive(Debug)]
struct Sized {
    inner: Arc<ScalarUDF>,
    pool: Arc<dyn MemoryPool>,
    estimate: Estimate,
}

impl PartialEq for Sized {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner && Arc::ptr_eq(&self.pool, &other.pool)
    }
}

impl Eq for Sized {}

impl Hash for Sized {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
    }
}

impl ScalarUDFImpl for Sized {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> DfResult<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows.max(1);
        // Scalars stay one row here (never broadcast before anything is reserved); the
        // function itself may broadcast them to every row, which is counted too.
        let mut broadcast = 0usize;
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| match a {
                ColumnarValue::Array(a) => Ok(Arc::clone(a)),
                ColumnarValue::Scalar(v) => {
                    if rows > 1 {
                        broadcast = broadcast.saturating_add(v.size().saturating_mul(rows));
                    }
                    v.to_array_of_size(1)
                }
            })
            .collect::<DfResult<_>>()?;
        let bound = (self.estimate)(&arrays, rows).saturating_add(broadcast);
        let reservation =
            MemoryConsumer::new(format!("{}()", self.inner.name())).register(&self.pool);
        reservation.try_grow(bound)?;
        let out = self.inner.invoke_with_args(args);
        reservation.free();
        out
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> DfResult<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

/// Each of `rows` rows' value of `a` as an i64 (NULL or not an integer: 0); a one-row `a` (a
/// scalar) stands for every row.
fn ints(a: &ArrayRef, rows: usize) -> Vec<i64> {
    let Ok(cast) = arrow::compute::cast(a, &DataType::Int64) else {
        return vec![0; rows];
    };
    let cast = cast.as_primitive::<Int64Type>();
    let at = |i: usize| {
        let i = if cast.len() == 1 { 0 } else { i };
        if i >= cast.len() || cast.is_null(i) {
            0
        } else {
            cast.value(i)
        }
    };
    (0..rows).map(at).collect()
}

/// Each of `rows` rows' byte length of the string `a` (NULL: 0), broadcast like [`ints`].
fn lengths(a: &ArrayRef, rows: usize) -> Vec<i64> {
    match arrow::compute::kernels::length::length(a) {
        Ok(l) => ints(&l, rows),
        Err(_) => vec![0; rows],
    }
}

fn total(per_row: impl Iterator<Item = i64>) -> usize {
    per_row.fold(0usize, |sum, n| {
        sum.saturating_add(usize::try_from(n).unwrap_or(0))
    })
}

/// `repeat(s, n)`: |s| × n bytes per row.
fn estimate_repeat(args: &[ArrayRef], rows: usize) -> usize {
    let [s, n, ..] = args else { return 0 };
    total(
        lengths(s, rows)
            .into_iter()
            .zip(ints(n, rows))
            .map(|(l, n)| l.saturating_mul(n)),
    )
}

/// `lpad(s, n [, fill])`, `rpad`: n characters, at most 4 bytes each.
fn estimate_pad(args: &[ArrayRef], rows: usize) -> usize {
    let [_, n, ..] = args else { return 0 };
    total(ints(n, rows).into_iter().map(|n| n.saturating_mul(4)))
}

/// `array_repeat(element, n)`: n copies of the element (its share of the input's bytes, at
/// least 8) per row.
fn estimate_array_repeat(args: &[ArrayRef], rows: usize) -> usize {
    let [element, n, ..] = args else { return 0 };
    let each = (element.get_array_memory_size() / element.len().max(1)).max(8) as i64;
    total(ints(n, rows).into_iter().map(|n| n.saturating_mul(each)))
}

/// `range(start, stop [, step])`, `generate_series`: (stop − start) / step elements of 8 bytes
/// per row. Integers, and dates or timestamps with an interval step (a month counted as 28
/// days, the shortest).
fn estimate_range(args: &[ArrayRef], rows: usize) -> usize {
    const DAY_NS: i64 = 86_400_000_000_000;
    let (start, stop, step): (Vec<i64>, Vec<i64>, Vec<i64>) = match args {
        [stop] => (vec![0; rows], ints(stop, rows), vec![1; rows]),
        [start, stop] if start.data_type().is_integer() => {
            (ints(start, rows), ints(stop, rows), vec![1; rows])
        }
        [start, stop, step] if start.data_type().is_integer() => {
            (ints(start, rows), ints(stop, rows), ints(step, rows))
        }
        [start, stop, step] => {
            let nanos = |a: &ArrayRef| {
                arrow::compute::cast(a, &DataType::Timestamp(TimeUnit::Nanosecond, None))
                    .map(|t| ints(&t, rows))
                    .unwrap_or_else(|_| vec![0; rows])
            };
            let steps = match step.data_type() {
                DataType::Interval(_) => {
                    let Ok(step) = arrow::compute::cast(
                        step,
                        &DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
                    ) else {
                        return 0;
                    };
                    let step = step.as_primitive::<IntervalMonthDayNanoType>();
                    (0..rows)
                        .map(|i| {
                            let i = if step.len() == 1 { 0 } else { i };
                            if i >= step.len() || step.is_null(i) {
                                return 1;
                            }
                            let v = step.value(i);
                            (v.months as i64)
                                .saturating_mul(28 * DAY_NS)
                                .saturating_add((v.days as i64).saturating_mul(DAY_NS))
                                .saturating_add(v.nanoseconds)
                        })
                        .collect()
                }
                _ => return 0,
            };
            (nanos(start), nanos(stop), steps)
        }
        _ => return 0,
    };
    total(
        start
            .into_iter()
            .zip(stop)
            .zip(step)
            .map(|((start, stop), step)| {
                let span = (stop as i128 - start as i128).unsigned_abs();
                let step = (step as i128).unsigned_abs().max(1);
                i64::try_from((span / step + 1).saturating_mul(8)).unwrap_or(i64::MAX)
            }),
    )
}

/// `replace(s, from, to)`: every occurrence of `from` (at most |s| / |from|) becomes `to`.
fn estimate_replace(args: &[ArrayRef], rows: usize) -> usize {
    let [s, from, to, ..] = args else { return 0 };
    total(
        lengths(s, rows)
            .into_iter()
            .zip(lengths(from, rows))
            .zip(lengths(to, rows))
            .map(|((s, from), to)| s.saturating_add((s / from.max(1) + 1).saturating_mul(to))),
    )
}

/// `regexp_replace(s, pattern, replacement [, flags])`: a pattern may match at every position,
/// the empty string included.
fn estimate_regexp_replace(args: &[ArrayRef], rows: usize) -> usize {
    let [s, _, to, ..] = args else { return 0 };
    total(
        lengths(s, rows)
            .into_iter()
            .zip(lengths(to, rows))
            .map(|(s, to)| s.saturating_add((s + 1).saturating_mul(to))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(limit: usize, engine: &Arc<EngineMemory>) -> Arc<dyn MemoryPool> {
        QueryPool::new(Some(limit), Some(Arc::clone(engine)))
    }

    #[test]
    fn a_query_is_held_to_its_own_limit_and_all_queries_to_the_engines() {
        let engine = EngineMemory::new(100);
        let (a, b) = (pool(60, &engine), pool(60, &engine));
        let ra = MemoryConsumer::new("a").register(&a);
        let rb = MemoryConsumer::new("b").register(&b);
        ra.try_grow(50).unwrap();
        assert!(ra.try_grow(20).is_err(), "over the query's own 60");
        rb.try_grow(50).unwrap();
        let refused = rb.try_grow(5).unwrap_err().to_string();
        assert!(refused.contains("query.total_memory_mb"), "{refused}");
        assert_eq!(engine.reserved(), 100);
        let b = b.downcast_ref::<QueryPool>().unwrap();
        assert!(b.refused_by_engine());
        drop(ra);
        assert_eq!(engine.reserved(), 50);
        rb.try_grow(5).unwrap();
        drop(rb);
        assert_eq!(engine.reserved(), 0);
    }

    #[test]
    fn amplifiers_are_estimated_from_their_arguments() {
        let s: ArrayRef = Arc::new(arrow::array::StringArray::from(vec!["ab", "c"]));
        let n: ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![1_000, -5]));
        assert_eq!(estimate_repeat(&[Arc::clone(&s), Arc::clone(&n)], 2), 2_000);
        assert_eq!(estimate_pad(&[Arc::clone(&s), n], 2), 4_000);
        let stop: ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![999]));
        assert_eq!(estimate_range(&[stop], 1), 8_000);
        let start: ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![0]));
        let stop: ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![i64::MAX]));
        assert!(estimate_range(&[start, stop], 1) > 1 << 60);
    }
}
