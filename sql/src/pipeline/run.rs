//! Running a checked pipeline over one micro-batch: decode the payloads with the source's
//! columns, run each table's query, apply the expectations. Pure Arrow in, Arrow out: the engine
//! does the I/O (reference tables come in as table providers, results go to its writers).
//!
//! ```text
//!  raw rows of the source's subjects ─► decode_json(source columns) ─► source table (+ _stream_seq)
//!      ─► AS SELECT … (joins with reference.*)  ─► expectations: FAIL? stop │ QUARANTINE │ DROP │ WARN
//!      ─► rows for usable.<table> (with stream_seq, so every table resumes exactly once)
//! ```
//!
//! Lineage: every query is rewritten to also return the source's hidden `_stream_seq` column as
//! `stream_seq`, which ties each output row to its message (for quarantine) and is the progress
//! column of the table's exactly-once commits. Queries therefore keep one row per reading: no
//! `GROUP BY`, `DISTINCT` or aggregates (those belong to windows).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{MemorySchemaProvider, TableProvider};
use datafusion::common::TableReference;
use datafusion::common::tree_node::TreeNode;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::{
    Expr, GroupByExpr, Ident, Query, SelectItem, SetExpr, Statement as SqlStatement, TableFactor,
};
use fleetlake_zones::TableId;

use super::{Action, CheckedPipeline, DedupSpec, PipelineError, ReferenceDef, SourceDef, TableDef};
use crate::decode::{JsonRows, decode_json, quarantine_rows};
use crate::dedup::{DedupKey, DedupState};
use crate::prepared::{same_tables, with_rows};
use crate::{Error, Result};

/// The hidden source column that carries each message's stream sequence.
pub const LINEAGE_COLUMN: &str = "_stream_seq";
/// The column every streaming table gets: the message each row came from.
pub const PROGRESS_COLUMN: &str = "stream_seq";

/// Rewrites a table's query so it also returns `<source>._stream_seq AS stream_seq`, refusing
/// queries that do not keep one row per reading.
pub fn with_lineage(table: &TableDef, source: &str) -> Result<Box<Query>, PipelineError> {
    let refuse = |what: &str| {
        PipelineError::new(
            table.pos,
            format!(
                "{}: a streaming table keeps one row per reading, so its query cannot use {what}; aggregate in windows instead",
                table.table
            ),
        )
    };
    let mut query = table.query.clone();
    if query.limit_clause.is_some() {
        return Err(refuse("LIMIT"));
    }
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Err(refuse("UNION, VALUES or a nested query as its body"));
    };
    if select.distinct.is_some() {
        return Err(refuse("DISTINCT"));
    }
    let grouped = match &select.group_by {
        GroupByExpr::All(_) => true,
        GroupByExpr::Expressions(e, _) => !e.is_empty(),
    };
    if grouped || select.having.is_some() {
        return Err(refuse("GROUP BY or HAVING"));
    }
    let first = select.from.first().map(|t| &t.relation);
    let qualifier = match first {
        Some(TableFactor::Table { name, alias, .. })
            if name.to_string().eq_ignore_ascii_case(source) =>
        {
            alias
                .as_ref()
                .map(|a| a.name.value.clone())
                .unwrap_or_else(|| source.to_string())
        }
        Some(TableFactor::Table { name, .. }) => {
            let span = datafusion::sql::sqlparser::ast::Spanned::span(name);
            let at = if span.start.line > 0 {
                super::Pos {
                    line: span.start.line,
                    column: span.start.column,
                }
            } else {
                table.pos
            };
            return Err(PipelineError::new(
                at,
                format!(
                    "{}: the query reads FROM {name}, but the pipeline's source is {source} (read the source first; joins may follow)",
                    table.table
                ),
            ));
        }
        _ => {
            return Err(PipelineError::new(
                table.pos,
                format!(
                    "{}: the query must read FROM the source {source} first (joins may follow)",
                    table.table
                ),
            ));
        }
    };
    select.projection.push(SelectItem::ExprWithAlias {
        expr: Expr::CompoundIdentifier(vec![Ident::new(qualifier), Ident::new(LINEAGE_COLUMN)]),
        alias: Ident::new(PROGRESS_COLUMN),
    });
    Ok(query)
}

/// True when a NATS subject filter (`*` one token, `>` the rest) matches a subject.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The source's columns as the decoder reads them (all nullable: missing required fields are
/// reported by name) and as queries see them (with `_stream_seq`).
pub(crate) fn source_schemas(source: &SourceDef) -> (SchemaRef, SchemaRef) {
    let decode: Vec<Field> = source
        .columns
        .iter()
        .map(|c| Field::new(&c.name, c.data_type.clone(), true))
        .collect();
    let mut visible = decode.clone();
    visible.push(Field::new(LINEAGE_COLUMN, DataType::Int64, false));
    (
        Arc::new(Schema::new(decode)),
        Arc::new(Schema::new(visible)),
    )
}

/// A session holding the source rows and the reference tables.
pub(crate) fn session(
    source: &SourceDef,
    rows: RecordBatch,
    references: &[(TableId, Arc<dyn TableProvider>)],
    collect_spans: bool,
) -> datafusion::error::Result<SessionContext> {
    let mut config = no_dynamic_filters();
    config.options_mut().sql_parser.collect_spans = collect_spans;
    let ctx = crate::session::context(config);
    let schema = rows.schema();
    ctx.register_table(
        source.name.as_str(),
        Arc::new(MemTable::try_new(schema, vec![vec![rows]])?),
    )?;
    let catalog = ctx.catalog("datafusion").expect("default catalog");
    catalog.register_schema("reference", Arc::new(MemorySchemaProvider::new()))?;
    for (id, provider) in references {
        ctx.register_table(
            TableReference::partial("reference", id.name.as_str()),
            provider.clone(),
        )?;
    }
    Ok(ctx)
}

/// Empty providers for declared reference tables (for checking, or before any upload).
pub fn declared_references(defs: &[ReferenceDef]) -> Vec<(TableId, Arc<dyn TableProvider>)> {
    defs.iter()
        .map(|r| {
            let empty = MemTable::try_new(r.schema(), vec![vec![]]).expect("schema");
            (r.table.clone(), Arc::new(empty) as Arc<dyn TableProvider>)
        })
        .collect()
}

/// True when a plan aggregates (which would break one row per reading).
pub(crate) fn aggregates(plan: &LogicalPlan) -> bool {
    plan.exists(|n| {
        Ok(matches!(
            n,
            LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(_)
        ))
    })
    .unwrap_or(false)
}

/// The schema a table is stored with: the query's columns, all nullable, timestamps as
/// microseconds in UTC (Delta's `timestamp`), view types as their plain forms; `stream_seq` last.
pub fn storage_schema(planned: &Schema) -> SchemaRef {
    let fields: Vec<Field> = planned
        .fields()
        .iter()
        .map(|f| {
            let t = match f.data_type() {
                DataType::Timestamp(_, _) => {
                    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
                }
                DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
                DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
                other => other.clone(),
            };
            Field::new(f.name(), t, f.name() != PROGRESS_COLUMN)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// A table of a pipeline, ready to run.
#[derive(Debug, Clone)]
pub struct PreparedTable {
    pub def: TableDef,
    query: Box<Query>,
    /// How the table is stored (see [`storage_schema`]).
    pub schema: SchemaRef,
}

impl PreparedTable {
    pub fn partitions(&self) -> Vec<String> {
        self.def
            .partitioned_by
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    }
}

/// Violations of one expectation in one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectationCount {
    pub table: TableId,
    pub expectation: String,
    pub action: Action,
    pub violations: u64,
}

/// What running the tables' queries over a batch made: each table's rows, the expectations'
/// counts, and the quarantine reasons per raw row.
type TablesRun = (
    Vec<TableOutput>,
    Vec<ExpectationCount>,
    HashMap<u32, Vec<String>>,
);

/// Rows for one table.
#[derive(Debug, Clone)]
pub struct TableOutput {
    pub table: TableId,
    pub rows: RecordBatch,
    /// Rows dropped by `DROP` expectations.
    pub dropped: u64,
    /// Rows kept despite a `WARN` expectation.
    pub warned: u64,
}

/// What a pipeline made of one batch.
#[derive(Debug, Clone)]
pub struct PipelineOutput {
    pub rows_in: u64,
    /// Replays dropped before the query.
    pub deduplicated: u64,
    /// Devices seen restarting their sequence numbers (their readings kept).
    pub restarts: u64,
    pub tables: Vec<TableOutput>,
    /// `raw.quarantine` rows: undecodable messages and rows that failed a `QUARANTINE`
    /// expectation.
    pub quarantine: RecordBatch,
    pub expectations: Vec<ExpectationCount>,
}

/// A `FAIL` expectation was violated: nothing of the batch may be written.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "pipeline {pipeline} stopped: expectation {expectation} of {table} failed for {violations} row(s), e.g. stream sequence {example}"
)]
pub struct PipelineFailure {
    pub pipeline: String,
    pub table: TableId,
    pub expectation: String,
    pub violations: u64,
    pub example: i64,
}

/// A checked pipeline, prepared to run batch after batch.
#[derive(Debug, Clone)]
pub struct PipelineRunner {
    pub name: String,
    pub source: SourceDef,
    decode_schema: SchemaRef,
    pub tables: Vec<PreparedTable>,
    references: Vec<ReferenceDef>,
    /// The tables' queries and expectations, planned once per set of reference tables.
    plans: Arc<std::sync::Mutex<Option<Plans>>>,
}

/// The physical plans of a pipeline, made over empty inputs (see [`crate::prepared`]).
struct Plans {
    references: Vec<(TableId, Arc<dyn TableProvider>)>,
    /// Per table: its query over the source.
    tables: Vec<Arc<dyn ExecutionPlan>>,
    /// Per table, per expectation: `SELECT (condition) AS ok` over the table's rows.
    expectations: Vec<Vec<Arc<dyn ExecutionPlan>>>,
}

impl std::fmt::Debug for Plans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Plans")
    }
}

impl PipelineRunner {
    /// Prepares a pipeline that [`super::check_files`] accepted.
    pub fn new(pipeline: &CheckedPipeline) -> Result<Self, PipelineError> {
        let (decode_schema, _) = source_schemas(&pipeline.source);
        let mut tables = Vec::new();
        for (def, planned) in &pipeline.tables {
            tables.push(PreparedTable {
                def: def.clone(),
                query: with_lineage(def, &pipeline.source.name)?,
                schema: storage_schema(planned),
            });
        }
        Ok(Self {
            name: pipeline.name.clone(),
            source: pipeline.source.clone(),
            decode_schema,
            tables,
            references: pipeline.references.clone(),
            plans: Arc::default(),
        })
    }

    /// The reference tables declared with this pipeline.
    pub fn references(&self) -> &[ReferenceDef] {
        &self.references
    }

    /// Decodes the payloads and checks the required (NOT NULL) columns: the decoded rows (with
    /// the rejected raw rows and their reasons) and which decoded rows passed.
    fn decode_required(&self, raw: &RecordBatch) -> Result<(JsonRows, Vec<bool>)> {
        let mut json = decode_json(raw, &self.decode_schema)?;
        let mut rejected = std::mem::take(&mut json.rejected);
        let mut keep = vec![true; json.decoded.num_rows()];
        for c in self.source.columns.iter().filter(|c| !c.nullable) {
            let column = json
                .decoded
                .column_by_name(&c.name)
                .expect("decoded schema");
            for (i, k) in keep.iter_mut().enumerate() {
                if *k && column.is_null(i) {
                    *k = false;
                    rejected.push((
                        json.rows[i],
                        format!("pipeline {}: missing required field {}", self.name, c.name),
                    ));
                }
            }
        }
        json.rejected = rejected;
        Ok((json, keep))
    }

    /// A dedup state for this pipeline's source (`None` when its `dedup_key` is `none`).
    pub fn new_dedup_state(&self, max_gaps: usize) -> Option<DedupState> {
        match &self.source.dedup {
            DedupSpec::None => None,
            DedupSpec::MsgId => Some(DedupState::new(
                DedupKey::MsgId,
                max_gaps,
                self.source.dedup_window_minutes,
            )),
            DedupSpec::Columns(c) => {
                let state = DedupState::new(
                    DedupKey::DeviceSeq,
                    max_gaps,
                    self.source.dedup_window_minutes,
                )
                .with_columns(&c[0], &c[1]);
                // With an event time, a device that restarts its sequence keeps its readings.
                Some(match &self.source.event_time {
                    Some((time, _)) => state.with_event_time(time),
                    None => state,
                })
            }
        }
    }

    /// Records in `state` the messages of `raw` as the pipeline saw them (rebuilding the state
    /// after a restart from raw messages the pipeline already committed).
    pub fn observe(&self, raw: &RecordBatch, state: &mut DedupState) -> Result<()> {
        if state.key() == DedupKey::MsgId {
            return state.observe(raw);
        }
        let (json, keep) = self.decode_required(raw)?;
        let decoded =
            filter_record_batch(&json.decoded, &BooleanArray::from(keep)).map_err(internal)?;
        state.observe(&decoded)
    }

    /// The rows of a raw batch on this pipeline's subjects.
    pub fn claimed_rows(&self, raw: &RecordBatch) -> Result<RecordBatch> {
        let subjects = raw
            .column_by_name("subject")
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| Error::Internal("raw rows without a subject column".into()))?;
        let mine: BooleanArray = (0..subjects.len())
            .map(|i| Some(self.claims(subjects.value(i))))
            .collect();
        filter_record_batch(raw, &mine).map_err(internal)
    }

    /// True when messages on `subject` belong to this pipeline.
    pub fn claims(&self, subject: &str) -> bool {
        subject_matches(&self.source.subject, subject)
    }

    /// Runs the pipeline over `raw` (rows of `raw.telemetry` on this pipeline's subjects).
    pub async fn run(
        &self,
        raw: &RecordBatch,
        references: &[(TableId, Arc<dyn TableProvider>)],
        mut dedup: Option<&mut DedupState>,
    ) -> Result<Result<PipelineOutput, PipelineFailure>> {
        // Replays by message id are known before decoding.
        let mut deduplicated = 0u64;
        let restarts_before = dedup.as_deref().map_or(0, |s| s.stats().restarts);
        let filtered;
        let raw = match dedup.as_deref_mut() {
            Some(state) if state.key() == DedupKey::MsgId => {
                let keep = state.keep_mask(raw)?;
                deduplicated += keep.iter().filter(|k| !**k).count() as u64;
                filtered = filter_record_batch(raw, &BooleanArray::from(keep)).map_err(internal)?;
                &filtered
            }
            _ => raw,
        };
        let (json, mut keep) = self.decode_required(raw)?;
        let mut rejected = json.rejected.clone();
        if let Some(state) = dedup
            .as_deref_mut()
            .filter(|s| s.key() == DedupKey::DeviceSeq)
        {
            let candidates = filter_record_batch(&json.decoded, &BooleanArray::from(keep.clone()))
                .map_err(internal)?;
            let mut fresh = state.keep_mask(&candidates)?.into_iter();
            for k in keep.iter_mut().filter(|k| **k) {
                if !fresh.next().unwrap_or(true) {
                    *k = false;
                    deduplicated += 1;
                }
            }
        }
        let restarts = dedup.as_deref().map_or(0, |s| s.stats().restarts) - restarts_before;
        let keep_mask = BooleanArray::from(keep.clone());
        let decoded = filter_record_batch(&json.decoded, &keep_mask).map_err(internal)?;
        let raw_rows: Vec<u32> = json
            .rows
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(r, _)| *r)
            .collect();
        let seqs = raw
            .column_by_name(PROGRESS_COLUMN)
            .ok_or_else(|| Error::Internal("raw batch without stream_seq".into()))?
            .as_primitive::<arrow::datatypes::Int64Type>();
        let lineage: ArrayRef = Arc::new(arrow::array::Int64Array::from_iter_values(
            raw_rows.iter().map(|r| seqs.value(*r as usize)),
        ));
        let (_, visible) = source_schemas(&self.source);
        let mut columns = decoded.columns().to_vec();
        columns.push(lineage);
        let source_rows = RecordBatch::try_new(visible, columns).map_err(internal)?;
        let row_of_seq: HashMap<i64, u32> = (0..raw.num_rows())
            .map(|i| (seqs.value(i), i as u32))
            .collect();

        let plans = self.plans(references).await?;
        // A query or expectation that fails for some rows (a cast that overflows, say) fails
        // the whole run: the failing rows are isolated by halving and quarantined with the
        // error, and the rest run again.
        let tables = match self.run_tables(&plans, &source_rows, &row_of_seq).await {
            Err(e) if e.is_data_error() => {
                let (good, bad) = self.isolate(&plans, &source_rows, &row_of_seq).await?;
                for (seq, reason) in bad {
                    if let Some(row) = row_of_seq.get(&seq) {
                        rejected.push((*row, format!("pipeline {}: {reason}", self.name)));
                    }
                }
                self.run_tables(&plans, &good, &row_of_seq).await?
            }
            other => other?,
        };
        let (outputs, counts, quarantined) = match tables {
            Ok(t) => t,
            Err(failure) => return Ok(Err(failure)),
        };
        for (row, reasons) in quarantined {
            rejected.push((row, reasons.join("; ")));
        }
        rejected.sort_by_key(|(i, _)| *i);
        rejected.dedup_by_key(|(i, _)| *i);
        let quarantine = quarantine_rows(raw, &rejected)?;
        Ok(Ok(PipelineOutput {
            deduplicated,
            restarts,
            rows_in: raw.num_rows() as u64 + deduplicated,
            tables: outputs,
            quarantine,
            expectations: counts,
        }))
    }
    /// Runs every table's query and expectations over the source rows: each table's rows, the
    /// expectations' counts and the quarantine reasons per raw row; or the `FAIL` expectation
    /// that stopped the batch.
    async fn run_tables(
        &self,
        plans: &PlansRef,
        source_rows: &RecordBatch,
        row_of_seq: &HashMap<i64, u32>,
    ) -> Result<Result<TablesRun, PipelineFailure>> {
        let task = SessionContext::new().task_ctx();
        let mut outputs = Vec::new();
        let mut counts = Vec::new();
        let mut quarantined: HashMap<u32, Vec<String>> = HashMap::new();
        for (t, table) in self.tables.iter().enumerate() {
            let plan = with_rows(&plans.tables[t], &source_rows.schema(), source_rows.clone())?;
            let batches = collect(plan, task.clone())
                .await
                .map_err(Error::Execution)?;
            let out = conform(&table.schema, &batches)?;
            let n = out.num_rows();
            let mut keep = vec![true; n];
            let (mut dropped, mut warned) = (0u64, 0u64);
            let out_seqs = out
                .column_by_name(PROGRESS_COLUMN)
                .expect("lineage column")
                .as_primitive::<arrow::datatypes::Int64Type>()
                .clone();
            for (e, check) in table.def.expectations.iter().zip(&plans.expectations[t]) {
                let ok = evaluate(check, &out).await?;
                let violated: Vec<usize> = (0..n)
                    .filter(|i| !(ok.is_valid(*i) && ok.value(*i)))
                    .collect();
                counts.push(ExpectationCount {
                    table: table.def.table.clone(),
                    expectation: e.name.clone(),
                    action: e.action,
                    violations: violated.len() as u64,
                });
                if violated.is_empty() {
                    continue;
                }
                match e.action {
                    Action::Fail => {
                        return Ok(Err(PipelineFailure {
                            pipeline: self.name.clone(),
                            table: table.def.table.clone(),
                            expectation: e.name.clone(),
                            violations: violated.len() as u64,
                            example: out_seqs.value(violated[0]),
                        }));
                    }
                    Action::Quarantine => {
                        for i in violated {
                            if keep[i] {
                                keep[i] = false;
                            }
                            if let Some(row) = row_of_seq.get(&out_seqs.value(i)) {
                                quarantined.entry(*row).or_default().push(format!(
                                    "pipeline {}: expectation {} of {} failed",
                                    self.name, e.name, table.def.table
                                ));
                            }
                        }
                    }
                    Action::Drop => {
                        for i in violated {
                            if keep[i] {
                                keep[i] = false;
                                dropped += 1;
                            }
                        }
                    }
                    Action::Warn => warned += violated.iter().filter(|i| keep[**i]).count() as u64,
                }
            }
            let rows = filter_record_batch(&out, &BooleanArray::from(keep)).map_err(internal)?;
            outputs.push(TableOutput {
                table: table.def.table.clone(),
                rows,
                dropped,
                warned,
            });
        }
        Ok(Ok((outputs, counts, quarantined)))
    }

    /// Splits `rows` until every row whose run fails with a data error stands alone: the rows
    /// that run, and the stream sequence and error of each that does not.
    async fn isolate(
        &self,
        plans: &PlansRef,
        rows: &RecordBatch,
        row_of_seq: &HashMap<i64, u32>,
    ) -> Result<(RecordBatch, Vec<(i64, String)>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let mut pending = vec![rows.clone()];
        while let Some(part) = pending.pop() {
            if part.num_rows() == 0 {
                continue;
            }
            match self.run_tables(plans, &part, row_of_seq).await {
                Ok(_) => good.push(part),
                Err(e) if e.is_data_error() && part.num_rows() == 1 => {
                    let seq = part
                        .column_by_name(LINEAGE_COLUMN)
                        .expect("lineage column")
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .value(0);
                    bad.push((seq, e.to_string()));
                }
                Err(e) if e.is_data_error() => {
                    let mid = part.num_rows() / 2;
                    // Later rows first on the stack, so rows keep their order in `good`.
                    pending.push(part.slice(mid, part.num_rows() - mid));
                    pending.push(part.slice(0, mid));
                }
                Err(e) => return Err(e),
            }
        }
        let good = concat_batches(&rows.schema(), &good).map_err(internal)?;
        Ok((good, bad))
    }
}

fn internal(e: arrow::error::ArrowError) -> Error {
    Error::Internal(e.to_string())
}

/// Casts query output to the table's storage schema (column by column, by name).
pub(crate) fn conform(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let columns = schema
            .fields()
            .iter()
            .map(|f| {
                let c = b
                    .column_by_name(f.name())
                    .ok_or_else(|| Error::Internal(format!("query output lacks {}", f.name())))?;
                // Strict: a value the storage type cannot hold is an error for its row (and
                // quarantined), never a silent NULL.
                let strict = arrow::compute::CastOptions {
                    safe: false,
                    ..Default::default()
                };
                arrow::compute::cast_with_options(c, f.data_type(), &strict).map_err(|e| {
                    Error::Execution(datafusion::error::DataFusionError::Context(
                        format!("storing column {}", f.name()),
                        Box::new(datafusion::error::DataFusionError::ArrowError(
                            Box::new(e),
                            None,
                        )),
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(RecordBatch::try_new(schema.clone(), columns).map_err(internal)?);
    }
    concat_batches(schema, &out).map_err(internal)
}

/// Evaluates a condition over a batch: one boolean per row (null = not met).
/// Runs an expectation's plan over a table's rows: whether each row meets it.
async fn evaluate(check: &Arc<dyn ExecutionPlan>, rows: &RecordBatch) -> Result<BooleanArray> {
    let plan = with_rows(check, &rows.schema(), rows.clone())?;
    let result = collect(plan, SessionContext::new().task_ctx())
        .await
        .map_err(Error::Execution)?;
    let schema = Arc::new(Schema::new(vec![Field::new("ok", DataType::Boolean, true)]));
    let all = concat_batches(&schema, &result).map_err(internal)?;
    Ok(all.column(0).as_boolean().clone())
}

/// Plans a query in `ctx` down to a physical plan.
async fn physical(ctx: &SessionContext, query: Statement) -> Result<Arc<dyn ExecutionPlan>> {
    let state = ctx.state();
    let logical = state
        .statement_to_plan(query)
        .await
        .map_err(Error::Execution)?;
    state
        .create_physical_plan(&logical)
        .await
        .map_err(Error::Execution)
}

impl PipelineRunner {
    /// The pipeline's plans for these reference tables: made on the first batch, and again when
    /// a reference table changed.
    async fn plans(&self, references: &[(TableId, Arc<dyn TableProvider>)]) -> Result<PlansRef> {
        if let Some(p) = self.plans.lock().expect("plans lock").as_ref()
            && same_tables(&p.references, references)
        {
            return Ok(PlansRef {
                tables: p.tables.clone(),
                expectations: p.expectations.clone(),
            });
        }
        let (_, visible) = source_schemas(&self.source);
        let empty = RecordBatch::new_empty(visible);
        let ctx = session(&self.source, empty, references, false).map_err(Error::Execution)?;
        let (mut tables, mut expectations) = (Vec::new(), Vec::new());
        for table in &self.tables {
            let query = Statement::Statement(Box::new(SqlStatement::Query(table.query.clone())));
            tables.push(physical(&ctx, query).await?);
            let rows = crate::session::context(no_dynamic_filters());
            rows.register_table(
                "__rows",
                Arc::new(
                    MemTable::try_new(table.schema.clone(), vec![vec![]])
                        .map_err(Error::Execution)?,
                ),
            )
            .map_err(Error::Execution)?;
            let mut checks = Vec::new();
            for e in &table.def.expectations {
                let sql = format!("SELECT ({}) AS ok FROM __rows", e.condition);
                let check = rows
                    .sql(&sql)
                    .await
                    .map_err(Error::Execution)?
                    .create_physical_plan()
                    .await
                    .map_err(Error::Execution)?;
                checks.push(check);
            }
            expectations.push(checks);
        }
        let plans = Plans {
            references: references.to_vec(),
            tables,
            expectations,
        };
        let out = PlansRef {
            tables: plans.tables.clone(),
            expectations: plans.expectations.clone(),
        };
        *self.plans.lock().expect("plans lock") = Some(plans);
        Ok(out)
    }
}

/// The plans of one run (shared with the cache).
struct PlansRef {
    tables: Vec<Arc<dyn ExecutionPlan>>,
    expectations: Vec<Vec<Arc<dyn ExecutionPlan>>>,
}

/// One partition, and no filters derived from one run's data pushed into the plan (plans are
/// run again with other rows).
fn no_dynamic_filters() -> SessionConfig {
    let mut config = SessionConfig::new().with_target_partitions(1);
    config
        .options_mut()
        .optimizer
        .enable_dynamic_filter_pushdown = false;
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches(
            "telemetry.coldchain.>",
            "telemetry.coldchain.t1"
        ));
        assert!(subject_matches(
            "telemetry.coldchain.>",
            "telemetry.coldchain.eu.t1"
        ));
        assert!(!subject_matches(
            "telemetry.coldchain.>",
            "telemetry.coldchain"
        ));
        assert!(subject_matches("telemetry.*.t1", "telemetry.health.t1"));
        assert!(!subject_matches("telemetry.*.t1", "telemetry.health.t2"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }
}
