//! Event-time windows over a table's rows, on DataFusion's own aggregate machinery.
//!
//! ```text
//!  rows (stream order) ─► watermark = max event time so far − watermark option
//!      ─► assign windows (tumbling / hopping / session); a row whose window has closed is late:
//!         counted, left out of the window (the usable zone still has it)
//!      ─► the window query, planned by DataFusion, run as AggregateExec(Partial) ─► partial state
//!      ─► merged into the open windows' state (AggregateExec(PartialReduce); sessions that touch
//!         are merged first)
//!      ─► windows whose end + allowed lateness the watermark has passed:
//!         AggregateExec(Final) and the rest of the plan ─► rows of final.<table>
//! ```
//!
//! The query groups by `window_start, window_end` (columns the operator adds to the input) and
//! whatever else it likes; any DataFusion aggregate or UDAF works, because only DataFusion's
//! accumulators ever see the values.
//!
//! Determinism: lateness is decided per row against the watermark of the rows before it, and a
//! window's output row carries the stream sequence of the row whose event time closed it. The
//! output is therefore the same however the stream is cut into micro-batches, which is what makes
//! a replay after a crash commit exactly what the crashed run would have.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, TimestampMicrosecondArray,
    UInt32Array,
};
use arrow::compute::{cast, concat_batches, filter_record_batch, take_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use arrow::row::{RowConverter, SortField};
use datafusion::catalog::{MemorySchemaProvider, TableProvider};
use datafusion::common::TableReference;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::MemTable;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy};
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr, collect};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::{Query, SetExpr, Statement as SqlStatement, TableFactor};
use fleetlake_zones::{TableId, Zone};

use crate::pipeline::run::{PROGRESS_COLUMN, conform, storage_schema};
use crate::pipeline::{WindowDef, WindowKind};
use crate::prepared::{same_tables, with_rows};
use crate::{Error, Result};

/// The columns a window query groups by.
pub const WINDOW_START: &str = "window_start";
pub const WINDOW_END: &str = "window_end";

fn exec(e: datafusion::error::DataFusionError) -> Error {
    Error::Execution(e)
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The table a query reads first (`FROM usable.x …`), if it names one of the lake's tables.
pub fn input_table(query: &Query) -> Option<TableId> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    match select.from.first().map(|t| &t.relation) {
        Some(TableFactor::Table { name, .. }) => TableId::parse(&name.to_string()).ok(),
        _ => None,
    }
}

/// A session where `input` (a lake table) and the reference tables can be read by name.
pub(crate) fn zone_session(
    tables: &[(TableId, Arc<dyn TableProvider>)],
) -> datafusion::error::Result<SessionContext> {
    let mut config = SessionConfig::new().with_target_partitions(1);
    config.options_mut().sql_parser.collect_spans = true;
    // Window and rule plans are run again with other rows (see `with_rows`): no filters that a
    // run derives from its data and pushes into the plan.
    config
        .options_mut()
        .optimizer
        .enable_dynamic_filter_pushdown = false;
    let ctx = crate::session::context(config);
    let catalog = ctx.catalog("datafusion").expect("default catalog");
    for zone in Zone::ALL {
        catalog.register_schema(zone.as_str(), Arc::new(MemorySchemaProvider::new()))?;
    }
    for (id, provider) in tables {
        ctx.register_table(
            TableReference::partial(id.zone.as_str(), id.name.as_str()),
            provider.clone(),
        )?;
    }
    Ok(ctx)
}

/// Plans `query` where `input` holds `rows` (with `schema`) and the reference tables can be read:
/// the session and the physical plan.
pub(crate) async fn plan_over(
    query: &Query,
    input: &TableId,
    schema: &SchemaRef,
    rows: Vec<RecordBatch>,
    references: &[(TableId, Arc<dyn TableProvider>)],
) -> datafusion::error::Result<(SessionContext, Arc<dyn ExecutionPlan>)> {
    let mut tables = references.to_vec();
    tables.push((
        input.clone(),
        Arc::new(MemTable::try_new(schema.clone(), vec![rows])?),
    ));
    let ctx = zone_session(&tables)?;
    let plan = physical_plan(&ctx, query).await?;
    Ok((ctx, plan))
}

/// Plans a query to a physical plan.
async fn physical_plan(
    ctx: &SessionContext,
    query: &Query,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    let state = ctx.state();
    let statement = Statement::Statement(Box::new(SqlStatement::Query(Box::new(query.clone()))));
    let logical = state.statement_to_plan(statement).await?;
    state.create_physical_plan(&logical).await
}

/// The parts of a planned aggregation: what to group by, the aggregates, and their input.
struct Aggregation {
    group_by: Arc<PhysicalGroupBy>,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    input: Arc<dyn ExecutionPlan>,
    input_schema: SchemaRef,
}

fn find_aggregate(plan: &Arc<dyn ExecutionPlan>) -> Option<&AggregateExec> {
    if let Some(a) = plan.downcast_ref::<AggregateExec>() {
        return Some(a);
    }
    plan.children().into_iter().find_map(find_aggregate)
}

/// The top aggregation of a plan (the raw-input side of it when planned in two phases).
fn aggregation(plan: &Arc<dyn ExecutionPlan>) -> Option<Aggregation> {
    let mut agg = find_aggregate(plan)?;
    if matches!(
        agg.mode(),
        AggregateMode::Final | AggregateMode::FinalPartitioned
    ) {
        agg = find_aggregate(agg.input())?;
    }
    Some(Aggregation {
        group_by: Arc::new(agg.group_expr().clone()),
        aggregates: agg.aggr_expr().to_vec(),
        filters: agg.filter_expr().to_vec(),
        input: agg.input().clone(),
        input_schema: agg.input_schema(),
    })
}

impl Aggregation {
    fn exec(
        &self,
        mode: AggregateMode,
        input: Arc<dyn ExecutionPlan>,
    ) -> datafusion::error::Result<AggregateExec> {
        let group_by = match mode {
            AggregateMode::Partial => self.group_by.as_ref().clone(),
            _ => self.group_by.as_final(),
        };
        AggregateExec::try_new(
            mode,
            group_by,
            self.aggregates.clone(),
            self.filters.clone(),
            input,
            self.input_schema.clone(),
        )
    }
}

/// Checks a window query against its input's columns: it must group by `window_start` and
/// `window_end` and return `window_end`. Returns the output schema (with `stream_seq`) and the
/// input schema the operator feeds it (the input's columns plus the window columns).
pub async fn plan_window(
    def: &WindowDef,
    input: &TableId,
    input_schema: &SchemaRef,
    references: &[(TableId, Arc<dyn TableProvider>)],
) -> std::result::Result<PlannedWindow, String> {
    let exploded = exploded_schema(input_schema);
    let (_, plan) = plan_over(&def.query, input, &exploded, Vec::new(), references)
        .await
        .map_err(|e| e.strip_backtrace())?;
    let agg = aggregation(&plan).ok_or_else(|| {
        "a window table's query aggregates: GROUP BY window_start, window_end[, …] with aggregates such as count(*), avg(x)".to_string()
    })?;
    let grouped: Vec<&str> = agg
        .group_by
        .expr()
        .iter()
        .map(|(_, n)| n.as_str())
        .collect();
    for w in [WINDOW_START, WINDOW_END] {
        if !grouped.contains(&w) {
            return Err(format!(
                "a window table's query must GROUP BY {WINDOW_START}, {WINDOW_END} (it groups by {})",
                if grouped.is_empty() {
                    "nothing".to_string()
                } else {
                    grouped.join(", ")
                }
            ));
        }
    }
    let out = plan.schema();
    match out.field_with_name(WINDOW_END) {
        Ok(f) if matches!(f.data_type(), DataType::Timestamp(_, _)) => {}
        _ => {
            return Err(format!(
                "a window table's query must return {WINDOW_END} (each row says which window it is)"
            ));
        }
    }
    if out.field_with_name(PROGRESS_COLUMN).is_ok() {
        return Err(format!(
            "{PROGRESS_COLUMN} is added to every window table; the query cannot return it"
        ));
    }
    let mut fields: Vec<Field> = out.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(PROGRESS_COLUMN, DataType::Int64, false));
    Ok(PlannedWindow {
        schema: storage_schema(&Schema::new(fields)),
        exploded,
        plan,
    })
}

/// A window query that checks, planned over no rows.
pub struct PlannedWindow {
    /// How the table is stored: the query's columns and `stream_seq`.
    pub schema: SchemaRef,
    /// What the query reads: the input's columns and the window columns.
    pub exploded: SchemaRef,
    /// The physical plan: its aggregation and what follows it.
    plan: Arc<dyn ExecutionPlan>,
}

fn exploded_schema(input: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = input
        .fields()
        .iter()
        .filter(|f| f.name() != WINDOW_START && f.name() != WINDOW_END)
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(WINDOW_START, ts_type(), false));
    fields.push(Field::new(WINDOW_END, ts_type(), false));
    Arc::new(Schema::new(fields))
}

/// What one call of [`WindowOperator::process`] produced.
#[derive(Debug)]
pub struct WindowOutput {
    /// Rows of closed windows, in the table's storage schema (with `stream_seq`).
    pub rows: RecordBatch,
    /// Rows that arrived after their window had closed.
    pub late: u64,
}

/// The open windows of one window table.
pub struct WindowOperator {
    pub def: WindowDef,
    /// The table the windows read.
    pub input: TableId,
    exploded: SchemaRef,
    /// How the table is stored: the query's columns and `stream_seq`.
    pub schema: SchemaRef,
    /// The plan of the query over no rows: its aggregation and what follows it.
    template: Arc<dyn ExecutionPlan>,
    agg: Aggregation,
    partial_schema: SchemaRef,
    /// What the aggregation reads (the query below it), planned once over no rows with the
    /// reference tables of `planned_refs`; each micro-batch runs it with its rows put in.
    partial_input: Arc<dyn ExecutionPlan>,
    planned_refs: Vec<(TableId, Arc<dyn TableProvider>)>,
    /// Partial aggregate state of the open windows (group columns, then accumulator state).
    state: Vec<RecordBatch>,
    compacted_rows: usize,
    /// A lower bound of the ends of the windows in `state` (`None`: not known, e.g. after a
    /// restore). While even it is not closable, closing skips looking at the state: without
    /// this, every micro-batch concatenated and scanned the whole state, which with 1,000,000
    /// devices' open windows cost most of ingest's time.
    open_ends_from: Option<i64>,
    max_event_time: Option<i64>,
    /// The last stream sequence applied; rows at or below it were seen already.
    position: i64,
    /// Rows left out of windows because they came late, since the start.
    pub late_total: u64,
}

impl WindowOperator {
    /// Prepares the operator for a checked window table whose input has `input_schema`.
    pub async fn new(
        def: &WindowDef,
        input: TableId,
        input_schema: &SchemaRef,
        references: &[(TableId, Arc<dyn TableProvider>)],
    ) -> Result<Self> {
        let PlannedWindow {
            schema,
            exploded,
            plan: template,
        } = plan_window(def, &input, input_schema, references)
            .await
            .map_err(|e| Error::Internal(format!("{}: {e}", def.table)))?;
        let agg = aggregation(&template).expect("checked: the query aggregates");
        let partial_schema = agg
            .exec(AggregateMode::Partial, agg.input.clone())
            .map_err(exec)?
            .schema();
        let partial_input = agg.input.clone();
        Ok(Self {
            def: def.clone(),
            input,
            exploded,
            schema,
            template,
            agg,
            partial_schema,
            partial_input,
            planned_refs: references.to_vec(),
            state: Vec::new(),
            compacted_rows: 0,
            open_ends_from: None,
            max_event_time: None,
            position: 0,
            late_total: 0,
        })
    }

    /// The last stream sequence the windows have taken in.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// The watermark: the newest event time seen less the allowed out-of-orderness (µs).
    pub fn watermark(&self) -> Option<i64> {
        self.max_event_time
            .map(|t| t.saturating_sub(self.def.watermark))
    }

    /// Open (group, window) pairs held as partial state.
    pub fn open_groups(&self) -> usize {
        self.state.iter().map(|b| b.num_rows()).sum()
    }

    /// The windows a row with event time `ts` belongs to, unless late: `(start, end)`.
    fn windows_of(&self, ts: i64, watermark: i64, out: &mut Vec<(i64, i64)>) {
        // Event times come from devices: arithmetic on them saturates, never overflows.
        let open = |end: i64| end.saturating_add(self.def.allowed_lateness) > watermark;
        match self.def.kind {
            WindowKind::Tumbling { size } => {
                let start = ts.div_euclid(size).saturating_mul(size);
                let end = start.saturating_add(size);
                if open(end) {
                    out.push((start, end));
                }
            }
            WindowKind::Hopping { size, slide } => {
                let last = ts.div_euclid(slide).saturating_mul(slide);
                let mut start = last.saturating_sub(size).saturating_add(slide);
                while start <= last {
                    let end = start.saturating_add(size);
                    if open(end) {
                        out.push((start, end));
                    }
                    match start.checked_add(slide) {
                        Some(next) => start = next,
                        None => break,
                    }
                }
            }
            WindowKind::Session { gap } => {
                // A reading is late when its event time is behind the watermark by more than
                // the allowed lateness (it could otherwise reopen a session already closed).
                if ts.saturating_add(self.def.allowed_lateness) >= watermark {
                    out.push((ts, ts.saturating_add(gap)));
                }
            }
        }
    }

    /// Takes in rows of the input table (in stream order; rows at or below the position are
    /// skipped) and returns the rows of the windows they closed.
    pub async fn process(
        &mut self,
        rows: &RecordBatch,
        references: &[(TableId, Arc<dyn TableProvider>)],
    ) -> Result<WindowOutput> {
        let rows = &in_stream_order(rows, PROGRESS_COLUMN)?;
        let seqs = rows
            .column_by_name(PROGRESS_COLUMN)
            .ok_or_else(|| internal(format!("{} rows lack {PROGRESS_COLUMN}", self.input)))?
            .as_primitive::<Int64Type>()
            .clone();
        let times = rows.column_by_name(&self.def.event_time).ok_or_else(|| {
            internal(format!(
                "{} rows lack the event time {}",
                self.input, self.def.event_time
            ))
        })?;
        let times = cast(times, &ts_type()).map_err(internal)?;
        let times = times.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let mut take = Vec::new();
        let (mut starts, mut ends) = (Vec::new(), Vec::new());
        // The watermark after each row, for finding the row that closed a window.
        let mut marks: Vec<(i64, i64)> = Vec::new();
        let mut late = 0u64;
        let mut windows = Vec::new();
        for i in 0..rows.num_rows() {
            let seq = seqs.value(i);
            if seq <= self.position {
                continue;
            }
            self.position = seq;
            if times.is_null(i) {
                late += 1;
                continue;
            }
            let ts = times.value(i);
            self.max_event_time = Some(self.max_event_time.map_or(ts, |m| m.max(ts)));
            let watermark = self
                .max_event_time
                .expect("set")
                .saturating_sub(self.def.watermark);
            marks.push((watermark, seq));
            windows.clear();
            self.windows_of(ts, watermark, &mut windows);
            if windows.is_empty() {
                late += 1;
            }
            for (s, e) in &windows {
                take.push(i as u32);
                starts.push(*s);
                ends.push(*e);
            }
        }
        self.late_total += late;
        if !take.is_empty() {
            let picked = take_record_batch(rows, &UInt32Array::from(take)).map_err(internal)?;
            let mut columns = Vec::new();
            for f in self.exploded.fields() {
                let c: ArrayRef = match f.name().as_str() {
                    WINDOW_START => Arc::new(
                        TimestampMicrosecondArray::from(std::mem::take(&mut starts))
                            .with_timezone("UTC"),
                    ),
                    WINDOW_END => Arc::new(
                        TimestampMicrosecondArray::from(std::mem::take(&mut ends))
                            .with_timezone("UTC"),
                    ),
                    name => {
                        let c = picked
                            .column_by_name(name)
                            .ok_or_else(|| internal(format!("{} rows lack {name}", self.input)))?;
                        cast(c, f.data_type()).map_err(internal)?
                    }
                };
                columns.push(c);
            }
            let exploded =
                RecordBatch::try_new(self.exploded.clone(), columns).map_err(internal)?;
            let partial = self.partial(exploded, references).await?;
            let ends = partial.column(self.group_index(WINDOW_END));
            let first_end = arrow::compute::min(
                ends.as_primitive::<arrow::datatypes::TimestampMicrosecondType>(),
            );
            self.open_ends_from = if self.state.is_empty() {
                first_end
            } else {
                // Unknown stays unknown: the next close looks at the whole state.
                self.open_ends_from
                    .map(|bound| first_end.map_or(bound, |end| bound.min(end)))
            };
            self.state.push(partial);
            if let WindowKind::Session { .. } = self.def.kind {
                self.merge_sessions()?;
                self.compact().await?;
            } else if self.open_groups() > 2 * self.compacted_rows + 4096 {
                self.compact().await?;
            }
        }
        let rows = self.close(&marks).await?;
        Ok(WindowOutput { rows, late })
    }

    /// Runs the query's aggregation over some rows in Partial mode: their partial state. The
    /// plan is made once (again when a reference table changed): each micro-batch's rows take
    /// the place of the input's empty scan in it, which saves planning the SQL every time.
    async fn partial(
        &mut self,
        exploded: RecordBatch,
        references: &[(TableId, Arc<dyn TableProvider>)],
    ) -> Result<RecordBatch> {
        if !same_tables(&self.planned_refs, references) {
            let (_, plan) = plan_over(
                &self.def.query,
                &self.input,
                &self.exploded,
                Vec::new(),
                references,
            )
            .await
            .map_err(exec)?;
            let agg = aggregation(&plan)
                .ok_or_else(|| internal("the window query lost its aggregate"))?;
            self.partial_input = agg.input;
            self.planned_refs = references.to_vec();
        }
        let input = with_rows(&self.partial_input, &self.exploded, exploded)?;
        let partial = Arc::new(self.agg.exec(AggregateMode::Partial, input).map_err(exec)?);
        let batches = collect(partial, SessionContext::new().task_ctx())
            .await
            .map_err(exec)?;
        self.conform_state(&batches)
    }

    fn conform_state(&self, batches: &[RecordBatch]) -> Result<RecordBatch> {
        let mut out = Vec::new();
        for b in batches {
            out.push(
                RecordBatch::try_new(self.partial_schema.clone(), b.columns().to_vec())
                    .map_err(internal)?,
            );
        }
        concat_batches(&self.partial_schema, &out).map_err(internal)
    }

    fn state_batch(&self) -> Result<RecordBatch> {
        concat_batches(&self.partial_schema, &self.state).map_err(internal)
    }

    /// Merges the partial state into one row per (group, window).
    async fn compact(&mut self) -> Result<()> {
        let state = self.state_batch()?;
        let merged = self.run(AggregateMode::PartialReduce, state).await?;
        let merged = self.conform_state(&merged)?;
        self.compacted_rows = merged.num_rows();
        self.state = vec![merged];
        Ok(())
    }

    async fn run(&self, mode: AggregateMode, state: RecordBatch) -> Result<Vec<RecordBatch>> {
        let input =
            MemorySourceConfig::try_new_exec(&[vec![state]], self.partial_schema.clone(), None)
                .map_err(exec)?;
        let plan = Arc::new(self.agg.exec(mode, input).map_err(exec)?);
        collect(plan, SessionContext::new().task_ctx())
            .await
            .map_err(exec)
    }

    fn group_index(&self, name: &str) -> usize {
        self.agg
            .group_by
            .expr()
            .iter()
            .position(|(_, n)| n == name)
            .expect("checked: grouped by the window columns")
    }

    /// Session windows: gives every state row of a group the bounds of the session it belongs
    /// to (the union of touching `[event time, event time + gap)` ranges).
    fn merge_sessions(&mut self) -> Result<()> {
        let state = self.state_batch()?;
        let (si, ei) = (self.group_index(WINDOW_START), self.group_index(WINDOW_END));
        let groups = self.agg.group_by.expr().len();
        let keys: Vec<usize> = (0..groups).filter(|i| *i != si && *i != ei).collect();
        let converter = RowConverter::new(
            keys.iter()
                .map(|i| SortField::new(state.schema().field(*i).data_type().clone()))
                .collect(),
        )
        .map_err(internal)?;
        let key_rows = converter
            .convert_columns(
                &keys
                    .iter()
                    .map(|i| state.column(*i).clone())
                    .collect::<Vec<_>>(),
            )
            .map_err(internal)?;
        let start = state
            .column(si)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let end = state
            .column(ei)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let mut by_key: HashMap<arrow::row::Row<'_>, Vec<usize>> = HashMap::new();
        for i in 0..state.num_rows() {
            by_key.entry(key_rows.row(i)).or_default().push(i);
        }
        let mut new_start: Vec<i64> = start.values().to_vec();
        let mut new_end: Vec<i64> = end.values().to_vec();
        for (_, mut rows) in by_key {
            rows.sort_by_key(|i| start.value(*i));
            let mut group: Vec<usize> = Vec::new();
            let (mut s, mut e) = (i64::MIN, i64::MIN);
            for i in rows {
                if !group.is_empty() && start.value(i) < e {
                    e = e.max(end.value(i));
                } else {
                    for g in group.drain(..) {
                        new_start[g] = s;
                        new_end[g] = e;
                    }
                    s = start.value(i);
                    e = end.value(i);
                }
                group.push(i);
            }
            for g in group {
                new_start[g] = s;
                new_end[g] = e;
            }
        }
        let mut columns = state.columns().to_vec();
        columns[si] = Arc::new(TimestampMicrosecondArray::from(new_start).with_timezone("UTC"));
        columns[ei] = Arc::new(TimestampMicrosecondArray::from(new_end).with_timezone("UTC"));
        self.state =
            vec![RecordBatch::try_new(self.partial_schema.clone(), columns).map_err(internal)?];
        Ok(())
    }

    /// Finalizes the windows the watermark has closed; `marks` are the (watermark, stream
    /// sequence) after each row of this call, to find the row that closed each window.
    async fn close(&mut self, marks: &[(i64, i64)]) -> Result<RecordBatch> {
        let empty = || RecordBatch::new_empty(self.schema.clone());
        let Some(watermark) = self.watermark() else {
            return Ok(empty());
        };
        if self.state.is_empty() {
            return Ok(empty());
        }
        let lateness = self.def.allowed_lateness;
        let closable = |end: i64| end.saturating_add(lateness) <= watermark;
        if self.open_ends_from.is_some_and(|from| !closable(from)) {
            return Ok(empty());
        }
        let state = self.state_batch()?;
        let ends = state
            .column(self.group_index(WINDOW_END))
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let closing: BooleanArray = ends.iter().map(|e| Some(e.is_some_and(closable))).collect();
        // The ends of the windows that stay open: the new bound, once they are the state.
        // (A NULL end never closes.)
        let open_ends_from = ends.iter().flatten().filter(|e| !closable(*e)).min();
        if closing.true_count() == 0 {
            self.open_ends_from = open_ends_from;
            return Ok(empty());
        }
        let open = arrow::compute::not(&closing).map_err(internal)?;
        let closed = filter_record_batch(&state, &closing).map_err(internal)?;
        let rest = filter_record_batch(&state, &open).map_err(internal)?;
        self.compacted_rows = self.compacted_rows.min(rest.num_rows());
        self.state = if rest.num_rows() > 0 {
            vec![rest]
        } else {
            Vec::new()
        };
        self.open_ends_from = open_ends_from;

        // The template plan with its aggregation replaced by Final over the closed state.
        let input =
            MemorySourceConfig::try_new_exec(&[vec![closed]], self.partial_schema.clone(), None)
                .map_err(exec)?;
        let fin: Arc<dyn ExecutionPlan> =
            Arc::new(self.agg.exec(AggregateMode::Final, input).map_err(exec)?);
        let plan = self
            .template
            .clone()
            .transform_down(|node| {
                if node.downcast_ref::<AggregateExec>().is_some() {
                    Ok(Transformed::new(fin.clone(), true, TreeNodeRecursion::Jump))
                } else {
                    Ok(Transformed::no(node))
                }
            })
            .map_err(exec)?
            .data;
        let batches = collect(plan, SessionContext::new().task_ctx())
            .await
            .map_err(exec)?;
        // Each row's stream_seq: the first row whose watermark reached its window's close.
        let mut out = Vec::new();
        for b in batches {
            let ends = cast(
                b.column_by_name(WINDOW_END)
                    .expect("checked: returns window_end"),
                &ts_type(),
            )
            .map_err(internal)?;
            let ends = ends.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            let last = marks.last().map(|m| m.1).unwrap_or(self.position);
            let seq: Int64Array = ends
                .iter()
                .map(|e| {
                    let threshold = e.unwrap_or(i64::MIN).saturating_add(lateness);
                    let at = marks.partition_point(|(w, _)| *w < threshold);
                    Some(marks.get(at).map(|m| m.1).unwrap_or(last))
                })
                .collect();
            let mut columns = b.columns().to_vec();
            let mut fields: Vec<Field> = b
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            columns.push(Arc::new(seq));
            fields.push(Field::new(PROGRESS_COLUMN, DataType::Int64, false));
            out.push(
                RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(internal)?,
            );
        }
        conform(&self.schema, &out)
    }

    /// The open windows as bytes (Arrow IPC; position and watermark in the schema's metadata).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let state = self.state_batch()?;
        let mut meta = HashMap::new();
        meta.insert("position".to_string(), self.position.to_string());
        meta.insert("late_total".to_string(), self.late_total.to_string());
        meta.insert("definition".to_string(), definition(&self.def));
        if let Some(m) = self.max_event_time {
            meta.insert("max_event_time".to_string(), m.to_string());
        }
        let schema = Arc::new(self.partial_schema.as_ref().clone().with_metadata(meta));
        let mut buf = Vec::new();
        {
            let mut w =
                arrow::ipc::writer::StreamWriter::try_new(&mut buf, &schema).map_err(internal)?;
            let b =
                RecordBatch::try_new(schema.clone(), state.columns().to_vec()).map_err(internal)?;
            w.write(&b).map_err(internal)?;
            w.finish().map_err(internal)?;
        }
        Ok(buf)
    }

    /// Restores open windows from [`Self::encode`]'s bytes.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(internal)?;
        let meta = reader.schema().metadata().clone();
        let number = |k: &str| meta.get(k).and_then(|v| v.parse::<i64>().ok());
        if let Some(d) = meta.get("definition")
            && *d != definition(&self.def)
        {
            return Err(internal(
                "the window's definition changed since the snapshot was taken",
            ));
        }
        let mut state = Vec::new();
        for b in reader {
            let b = b.map_err(internal)?;
            state.push(
                RecordBatch::try_new(self.partial_schema.clone(), b.columns().to_vec()).map_err(
                    |e| {
                        internal(format!(
                            "the snapshot does not fit the window query (was it changed?): {e}"
                        ))
                    },
                )?,
            );
        }
        self.position =
            number("position").ok_or_else(|| internal("snapshot without a position"))?;
        self.late_total = number("late_total").unwrap_or(0) as u64;
        self.max_event_time = number("max_event_time");
        self.compacted_rows = state.iter().map(|b| b.num_rows()).sum();
        self.open_ends_from = None;
        self.state = state;
        Ok(())
    }
}

/// A hash of what decides a window's state: a snapshot taken under another definition (another
/// size, watermark or query) is not restored.
fn definition(def: &WindowDef) -> String {
    let text = format!(
        "{:?}|{}|{}|{}|{}",
        def.kind, def.watermark, def.allowed_lateness, def.event_time, def.query
    );
    format!("{:016x}", crate::hash::stable_hash(&[&text]))
}

/// `rows` in stream order: stably sorted by the integer column `column`. A query with a join may
/// return rows in another order than it got them, and windows and rules decide lateness, order
/// and what was seen already row by row in stream order.
pub(crate) fn in_stream_order(rows: &RecordBatch, column: &str) -> Result<RecordBatch> {
    let seqs = rows
        .column_by_name(column)
        .ok_or_else(|| internal(format!("rows lack {column}")))?
        .as_primitive::<Int64Type>();
    let values = seqs.values();
    if values.windows(2).all(|w| w[0] <= w[1]) {
        return Ok(rows.clone());
    }
    let mut order: Vec<u32> = (0..rows.num_rows() as u32).collect();
    order.sort_by_key(|i| values[*i as usize]);
    take_record_batch(rows, &UInt32Array::from(order)).map_err(internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_put_in_stream_order_stably() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("stream_seq", DataType::Int64, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = |seqs: Vec<i64>, ns: Vec<i64>| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(seqs)),
                    Arc::new(Int64Array::from(ns)),
                ],
            )
            .unwrap()
        };
        // As a hash join may return them: the two rows of message 2 keep their order.
        let shuffled = batch(vec![3, 2, 1, 2], vec![30, 20, 10, 21]);
        let sorted = in_stream_order(&shuffled, "stream_seq").unwrap();
        assert_eq!(sorted, batch(vec![1, 2, 2, 3], vec![10, 20, 21, 30]));
        assert_eq!(in_stream_order(&sorted, "stream_seq").unwrap(), sorted);
    }
}
