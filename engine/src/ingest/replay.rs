//! `fleetlake replay <pipeline> [--from TIME] [--to TIME]`: rebuild a pipeline's usable tables
//! from the raw zone with the pipeline's current definition.
//!
//! The raw messages received in the time range decide a range of stream sequences; every raw
//! message in that range on the pipeline's subjects is run through the pipeline again, and each
//! of its tables has the rows of that range replaced in one Delta commit (`replace_where`), so
//! readers see the old rows or the new, never half a replay. Rows that would be quarantined now
//! are counted, not written (the raw zone's quarantine is append-only). A `FAIL` expectation
//! aborts the replay with nothing written.
//!
//! Then each window table over the replayed tables is derived again from all of its input's
//! rows, with its current definition, and replaced in one commit. Replay with the engine
//! stopped: a running engine keeps the open windows it had.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::compute::cast;
use chrono::{DateTime, NaiveDate, Utc};
use datafusion::catalog::TableProvider;
use fleetlake_sql::QueryEngine;
use fleetlake_sql::pipeline::{CheckedWindow, PipelineRunner, check_files, pipeline_files};
use fleetlake_sql::window::WindowOperator;
use fleetlake_zones::{Lake, TableId};
use serde::Serialize;

use crate::config::Config;
use crate::error::{Context, Error};
use crate::ingest::derived::{derive_window, window_kind};
use crate::ingest::pipelines::{load_reference, raw_rows};
use crate::progress::bar;

/// Messages read from the raw zone per step.
const CHUNK: i64 = 20_000;

/// What a replay did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplayReport {
    pub pipeline: String,
    /// Stream sequences replayed (inclusive), if any message was in the range.
    pub sequences: Option<(i64, i64)>,
    pub messages: u64,
    /// Rows written per table.
    pub tables: BTreeMap<String, u64>,
    /// Rows the pipeline quarantines now (not written again).
    pub quarantined: u64,
    /// Rows written per window table over the pipeline's tables (derived again).
    pub windows: BTreeMap<String, u64>,
    /// Retention deleted the raw messages received before this date: they were not replayed.
    pub raw_kept_from: Option<NaiveDate>,
}

/// Refuses a range that starts (or lies wholly) before what retention kept of `raw.telemetry`;
/// returns the first date kept, if retention ever deleted anything.
async fn check_retention(
    lake: &Lake,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Option<NaiveDate>, Error> {
    let raw = TableId::raw_telemetry();
    let Some(horizon) = fleetlake_zones::maintain::retention_horizon(lake, &raw).await? else {
        return Ok(None);
    };
    let kept = horizon
        .kept_from
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let expired = |t: DateTime<Utc>| t < kept;
    if from.is_some_and(expired) || to.is_some_and(|t| t <= kept) {
        let asked = match (from, to) {
            (Some(f), _) => format!("from {}", f.to_rfc3339()),
            (None, Some(t)) => format!("until {}", t.to_rfc3339()),
            (None, None) => unreachable!("a bound was checked"),
        };
        return Err(Error::Invalid(format!(
            "cannot replay {asked}: retention ({} days by {}) deleted the raw messages received before {}; replay --from {} or later, or raise retention.raw_days before the data expires",
            horizon.days, horizon.column, horizon.kept_from, horizon.kept_from
        )));
    }
    Ok(Some(horizon.kept_from))
}

/// `2025-11-23` or an RFC 3339 time.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, Error> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
        .map_err(|_| {
            Error::Invalid(format!(
                "{s:?}: expected a date (2025-11-23) or an RFC 3339 time (2025-11-23T10:00:00Z)"
            ))
        })
}

fn scalar_i64(result: &fleetlake_sql::QueryResult) -> Option<i64> {
    let batch = result.batches.first()?;
    let column = cast(batch.column(0), &arrow::datatypes::DataType::Int64).ok()?;
    let values = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&column);
    (!values.is_empty() && values.is_valid(0)).then(|| values.value(0))
}

/// Replays `pipeline` over the raw messages received in `[from, to)`.
pub async fn run(
    config: &Config,
    lake: Lake,
    pipeline: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    progress: bool,
) -> Result<ReplayReport, Error> {
    // A cluster's lake: its positions are per partition (<consumer>-p<N>), whatever this
    // configuration says.
    let partitioned = fleetlake_zones::lake::ProgressReader::default()
        .progress(
            &lake,
            &fleetlake_zones::TableId::raw_telemetry(),
            &[format!("{}-p0", config.consumer())],
        )
        .await?[0]
        .is_some();
    if config.partitions() > 0 || partitioned {
        return Err(Error::Invalid(format!(
            "{} is a cluster's lake (cluster.partitions > 0): replay rewrites a pipeline's tables as of one consumer's positions, \
             and a cluster's are per partition ({}-p<N>). Replaying a cluster's lake is not supported yet; \
             a pipeline change applies to the messages ingested after it",
            lake.root(),
            config.consumer()
        )));
    }
    crate::ingest::heartbeat::refuse_if_running(&lake, config.consumer(), "replaying").await?;
    let Some((dir, _)) = config.pipelines_dir() else {
        return Err(Error::Invalid(
            "pipelines.dir is empty: there are no pipelines to replay".into(),
        ));
    };
    let files = pipeline_files(std::slice::from_ref(&dir))
        .map_err(|e| Error::Invalid(format!("reading {}: {e}", dir.display())))?;
    let reports = check_files(&files).await;
    let errors: Vec<String> = reports.iter().flat_map(|r| r.error_lines()).collect();
    if !errors.is_empty() {
        return Err(Error::Invalid(format!(
            "pipelines do not check:\n{}",
            errors.join("\n")
        )));
    }
    let known: Vec<&str> = reports
        .iter()
        .filter_map(|r| r.pipeline.as_ref())
        .map(|p| p.name.as_str())
        .collect();
    let checked = reports
        .iter()
        .filter_map(|r| r.pipeline.as_ref())
        .find(|p| p.name == pipeline)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "no pipeline {pipeline:?} in {}; there are: {}",
                dir.display(),
                known.join(", ")
            ))
        })?;
    let runner = PipelineRunner::new(checked).map_err(|e| Error::Invalid(e.to_string()))?;
    let raw_kept_from = check_retention(&lake, from, to).await?;
    // A window table is derived again from all of its input's rows: over an input that
    // retention has cut, the windows of the expired days would be lost.
    for w in reports.iter().flat_map(|r| &r.windows) {
        if !runner.tables.iter().any(|t| t.def.table == w.input) {
            continue;
        }
        let horizon = fleetlake_zones::maintain::retention_horizon(&lake, &w.input).await?;
        if let Some(h) = horizon {
            return Err(Error::Invalid(format!(
                "cannot replay {pipeline}: window table {} would be derived again from {}, whose partitions before {} were deleted by retention, and its windows before then would be lost",
                w.def.table, w.input, h.kept_from
            )));
        }
    }
    let query = QueryEngine::new(lake.clone());

    let mut filter = Vec::new();
    if let Some(from) = from {
        filter.push(format!("received_at >= TIMESTAMP '{}'", from.to_rfc3339()));
    }
    if let Some(to) = to {
        filter.push(format!("received_at < TIMESTAMP '{}'", to.to_rfc3339()));
    }
    let filter = if filter.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", filter.join(" AND "))
    };
    let bounds = |agg: &str| format!("SELECT {agg}(stream_seq) FROM raw.telemetry {filter}");
    let lo = scalar_i64(&query.query(&bounds("min")).await?);
    let hi = scalar_i64(&query.query(&bounds("max")).await?);
    let mut report = ReplayReport {
        pipeline: pipeline.to_string(),
        sequences: None,
        messages: 0,
        tables: runner
            .tables
            .iter()
            .map(|t| (t.def.table.to_string(), 0))
            .collect(),
        quarantined: 0,
        windows: BTreeMap::new(),
        raw_kept_from,
    };
    let (Some(lo), Some(hi)) = (lo, hi) else {
        return Ok(report);
    };
    report.sequences = Some((lo, hi));

    // Reference tables as they are now (as the running engine reads them: as declared).
    let mut references: Vec<(TableId, Arc<dyn TableProvider>)> = Vec::new();
    for r in runner.references() {
        let exists = lake.describe(&r.table).await?.is_some();
        references.push((r.table.clone(), load_reference(&lake, r, exists).await?));
    }

    // Replays of readings received before the range are dropped as they were the first time: the
    // dedup state is rebuilt from the pipeline's raw messages before `lo`.
    let mut dedup = runner.new_dedup_state(config.dedup_max_gaps());
    if let Some(state) = dedup.as_mut() {
        let mut start = 1;
        while start < lo {
            let end = (start + CHUNK - 1).min(lo - 1);
            for raw in raw_rows(&query, &runner, start, end, None).await? {
                runner.observe(&raw, state)?;
            }
            start = end + 1;
        }
    }
    let mut outputs: Vec<Vec<RecordBatch>> = vec![Vec::new(); runner.tables.len()];
    let mut start = lo;
    while start <= hi {
        let end = (start + CHUNK - 1).min(hi);
        for raw in raw_rows(&query, &runner, start, end, None).await? {
            report.messages += raw.num_rows() as u64;
            let out = runner
                .run(&raw, &references, dedup.as_mut())
                .await?
                .map_err(|failure| Error::Invalid(format!("{failure}; nothing was replaced")))?;
            report.quarantined += out.quarantine.num_rows() as u64;
            for (i, t) in out.tables.into_iter().enumerate() {
                *report
                    .tables
                    .get_mut(&t.table.to_string())
                    .expect("known table") += t.rows.num_rows() as u64;
                outputs[i].push(t.rows);
            }
        }
        if progress {
            let done = (end - lo + 1) as f64 / (hi - lo + 1) as f64;
            let what = format!(
                "sequences {lo}..={end} of {hi}, {} messages of {pipeline}",
                report.messages
            );
            bar(done, &what);
        }
        start = end + 1;
    }
    if progress {
        eprintln!();
    }
    let predicate = format!("stream_seq >= {lo} AND stream_seq <= {hi}");
    for (table, batches) in runner.tables.iter().zip(outputs) {
        lake.replace_where(&table.def.table, batches, predicate.clone())
            .await?;
    }
    // The window tables over the replayed tables, derived again from them.
    let windows = reports
        .iter()
        .flat_map(|r| &r.windows)
        .filter(|w| runner.tables.iter().any(|t| t.def.table == w.input));
    for w in windows {
        if let Some(rows) = rederive(config, &lake, w, &references, progress).await? {
            report.windows.insert(w.def.table.to_string(), rows);
        }
    }
    Ok(report)
}

/// Derives a window table again from all of its input's rows up to what the table holds, with
/// its current definition: the table's rows are replaced in one commit and its open windows'
/// snapshot with the state derived. `None` when the engine has not written the table yet (it is
/// backfilled when the engine starts).
async fn rederive(
    config: &Config,
    lake: &Lake,
    w: &CheckedWindow,
    references: &[(TableId, Arc<dyn TableProvider>)],
    progress: bool,
) -> Result<Option<u64>, Error> {
    let app_id = config.consumer();
    let mut op = WindowOperator::new(&w.def, w.input.clone(), &w.input_schema, references)
        .await
        .context(format!("planning {}", w.def.table))?;
    let mut writer = lake
        .writer(w.def.table.clone(), op.schema.clone(), Vec::new(), app_id)
        .await?;
    let Some(upto) = writer.committed() else {
        return Ok(None);
    };
    let table = w.def.table.to_string();
    let closed = derive_window(lake, &mut op, upto, references, None, |done, rows| {
        if progress {
            bar(
                done as f64 / upto.max(1) as f64,
                &format!("{rows} rows of {} into {table}", w.input),
            );
        }
    })
    .await?;
    if progress {
        eprintln!();
    }
    writer.replace_all(&closed, upto).await?;
    let state = op.encode()?;
    writer
        .store_snapshot(&window_kind(app_id), upto, state)
        .await;
    Ok(Some(closed.num_rows() as u64))
}
