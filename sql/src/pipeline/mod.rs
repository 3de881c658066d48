//! The pipeline language: SQL files that say where telemetry comes from, how it becomes rows of
//! the usable zone, and which expectations those rows must meet.
//!
//! ```sql
//! CREATE SOURCE readings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, temp_f DOUBLE)
//! WITH (subject = 'telemetry.coldchain.>', format = 'json', event_time = 'ts');
//!
//! CREATE STREAMING TABLE usable.cold_chain (
//!     CONSTRAINT plausible EXPECT (temperature_c BETWEEN -40 AND 40) ON VIOLATION QUARANTINE
//! )
//! PARTITIONED BY (event_date)
//! AS SELECT device_id, seq, ts, (temp_f - 32) * 5 / 9 AS temperature_c, CAST(ts AS DATE) AS event_date
//! FROM readings;
//! ```
//!
//! The statements are DataFusion's SQL (the `AS SELECT` and the `EXPECT` conditions are planned by
//! DataFusion) plus the smallest extension that reads like Flink SQL, RisingWave or Databricks'
//! declarative pipelines: `CREATE SOURCE … WITH (…)`, `CREATE STREAMING TABLE … AS SELECT` with
//! `CONSTRAINT … EXPECT (…) ON VIOLATION {WARN | DROP | QUARANTINE | FAIL}`, and
//! `CREATE REFERENCE TABLE` to declare the columns of a reference table. The language is specified
//! by example in `pipelines/README.md` and `sql/tests/pipelines/`.
//!
//! - [`parse`]: text → [`PipelineFile`], with positions (line:column) on everything;
//! - [`check`]: plans every table and expectation without running anything;
//! - [`run`]: runs a checked pipeline over a micro-batch (pure Arrow in and out).

pub mod check;
pub mod parse;
pub mod run;

use std::fmt;

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::sql::sqlparser::ast::{Expr, Query};
use fleetlake_zones::TableId;

pub use check::{
    CheckedPipeline, CheckedRule, CheckedWindow, FileReport, check_files, check_texts,
    pipeline_files,
};
pub use parse::parse_file;
pub use run::{PipelineFailure, PipelineOutput, PipelineRunner};

/// A position in a pipeline file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A mistake in a pipeline file: where, and what was wrong and expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineError {
    pub pos: Pos,
    pub message: String,
}

impl PipelineError {
    pub fn new(pos: Pos, message: impl Into<String>) -> Self {
        Self {
            pos,
            message: message.into(),
        }
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pos, self.message)
    }
}

/// A declared column.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub data_type: DataType,
    pub nullable: bool,
    pub pos: Pos,
}

/// How replays are recognised (`dedup_key` option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupSpec {
    /// Columns that identify a reading, e.g. `device_id, seq`.
    Columns(Vec<String>),
    /// The `Nats-Msg-Id` header.
    MsgId,
    None,
}

/// `CREATE SOURCE name (columns) WITH (options)`.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceDef {
    pub name: String,
    pub pos: Pos,
    pub columns: Vec<Column>,
    /// NATS subject filter, e.g. `telemetry.coldchain.>`.
    pub subject: String,
    /// Payload format; `json` is the one there is.
    pub format: String,
    pub dedup: DedupSpec,
    /// Minutes a replay is remembered.
    pub dedup_window_minutes: i64,
    /// The column that is event time, if any.
    pub event_time: Option<(String, Pos)>,
    /// Where each option was written, for errors found while checking.
    pub option_pos: Vec<(String, Pos)>,
}

/// What happens to a row that violates an expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Keep the row, count the violation.
    Warn,
    /// Drop the row, count it.
    Drop,
    /// Move the row to `raw.quarantine` with the expectation's name.
    Quarantine,
    /// Stop the pipeline; nothing of the batch is written.
    Fail,
}

/// `CONSTRAINT name EXPECT (condition) ON VIOLATION action`.
#[derive(Debug, Clone, PartialEq)]
pub struct Expectation {
    pub name: String,
    pub condition: Expr,
    pub action: Action,
    pub pos: Pos,
}

/// `CREATE STREAMING TABLE usable.name (expectations) PARTITIONED BY (…) AS SELECT …`.
#[derive(Debug, Clone, PartialEq)]
pub struct TableDef {
    pub table: TableId,
    pub pos: Pos,
    pub expectations: Vec<Expectation>,
    pub partitioned_by: Vec<(String, Pos)>,
    pub query: Box<Query>,
}

/// `CREATE REFERENCE TABLE reference.name (columns)`: the columns a reference table has.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceDef {
    pub table: TableId,
    pub pos: Pos,
    pub columns: Vec<Column>,
}

impl ReferenceDef {
    pub fn schema(&self) -> SchemaRef {
        schema_of(&self.columns)
    }
}

/// How rows are grouped into event-time windows (all durations in microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Fixed, non-overlapping windows of `size`.
    Tumbling { size: i64 },
    /// Windows of `size` starting every `slide`; a row belongs to `size / slide` of them.
    Hopping { size: i64, slide: i64 },
    /// Per group: rows closer than `gap` to each other share a window.
    Session { gap: i64 },
}

/// `CREATE WINDOW TABLE final.name WITH (window = 'tumbling', size = '1m', …) AS SELECT …`.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowDef {
    pub table: TableId,
    pub pos: Pos,
    pub kind: WindowKind,
    /// How far behind the newest event time the watermark trails (bounded out-of-orderness).
    pub watermark: i64,
    /// How long after the watermark passes its end a window still takes rows.
    pub allowed_lateness: i64,
    /// The input's event-time column.
    pub event_time: String,
    pub option_pos: Vec<(String, Pos)>,
    pub query: Box<Query>,
}

impl WindowDef {
    /// Whether the query groups by the column `column` (unqualified or qualified, any case): a
    /// window table grouped by the partition key (`device_id`) is computed whole inside one
    /// partition of a cluster; one that is not sums up rows of many partitions.
    pub fn groups_by(&self, column: &str) -> bool {
        use datafusion::sql::sqlparser::ast::{GroupByExpr, SetExpr};
        let SetExpr::Select(select) = self.query.body.as_ref() else {
            return false;
        };
        let GroupByExpr::Expressions(exprs, _) = &select.group_by else {
            return false;
        };
        exprs.iter().any(|e| match e {
            Expr::Identifier(i) => i.value.eq_ignore_ascii_case(column),
            Expr::CompoundIdentifier(parts) => parts
                .last()
                .is_some_and(|i| i.value.eq_ignore_ascii_case(column)),
            _ => false,
        })
    }
}

/// When a rule's key moves between states, and how often it may repeat.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleDef {
    pub name: String,
    pub pos: Pos,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// The columns that say what an alert is about (a device, a site, a cohort).
    pub key: Vec<String>,
    /// How long (µs, event time) the condition must hold before the rule fires.
    pub for_duration: i64,
    /// The least time (µs, event time) between two firings of one key.
    pub cool_down: i64,
    /// The event-time column of the rule's rows.
    pub event_time: String,
    /// Cohort grouping: the columns that name a cohort (`'tenant, site'`); empty for none.
    /// When at least `group_min` keys of one cohort fire within `group_wait`, one alert for the
    /// cohort is published instead of one per key (each key's transition is still recorded).
    pub group_by: Vec<String>,
    /// The least number of keys firing together that makes a cohort alert (≥ 2).
    pub group_min: usize,
    /// How long (µs of observed stream time) a firing key is held back to see whether its
    /// cohort fires with it.
    pub group_wait: i64,
    pub option_pos: Vec<(String, Pos)>,
    pub query: Box<Query>,
}

/// `group_min` when `group_by` is set and it is not.
pub const DEFAULT_GROUP_MIN: usize = 10;
/// `group_wait` when `group_by` is set and it is not: 30 s.
pub const DEFAULT_GROUP_WAIT_US: i64 = 30_000_000;

/// Everything one file declares.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PipelineFile {
    pub sources: Vec<SourceDef>,
    pub tables: Vec<TableDef>,
    pub references: Vec<ReferenceDef>,
    pub windows: Vec<WindowDef>,
    pub rules: Vec<RuleDef>,
}

/// An Arrow schema from declared columns.
pub fn schema_of(columns: &[Column]) -> SchemaRef {
    std::sync::Arc::new(arrow::datatypes::Schema::new(
        columns
            .iter()
            .map(|c| arrow::datatypes::Field::new(&c.name, c.data_type.clone(), c.nullable))
            .collect::<Vec<_>>(),
    ))
}
