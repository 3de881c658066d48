//! Table maintenance: retention, compaction, checkpoints, log cleanup and vacuum, safe beside the
//! stream's commits.
//!
//! Every flush appends one small Parquet file and one log entry per table. [`maintain`] keeps a
//! table fast to open and to query, in this order:
//!
//! 1. **Retention**: when a table keeps `retention_days`, the partitions of its first `DATE`
//!    partition column older than that are deleted in one commit (whole files, nothing rewritten),
//!    and the horizon is recorded beside the table (`_fleetlake/retention.json`, see
//!    [`retention_horizon`]) so that a replay of an expired range can say so.
//! 2. **Compaction**, per partition (see [`plan`]): a partition still being written (a file younger
//!    than `quiet_for`) is bin-packed once it holds `min_small_files` files smaller than the target
//!    size; a quiet partition of a table with cluster columns (`device_id`, `ts`) is rewritten once,
//!    Z-ordered, into files of the target size, so that a query for one device reads few files; a
//!    quiet partition without cluster columns is bin-packed when it holds more files than its size
//!    needs. Compaction commits only `remove`/`add` actions with `dataChange = false`: delta-rs's
//!    conflict checker lets the stream's blind appends commit beside it, and no `txn` action is
//!    touched, so every writer's progress is intact.
//! 3. **Checkpoint** when `checkpoint_interval` commits or more were made since the last one
//!    (tables also carry `delta.checkpointInterval`, which makes every writer checkpoint on its own).
//! 4. **Log cleanup**: log entries older than `log_retention` and older than a checkpoint are
//!    deleted (delta-rs's `cleanup_expired_logs_for`): opening a table reads the last checkpoint
//!    and the entries after it. Writers do not clean the log on every commit (that lists the whole
//!    `_delta_log` folder each time).
//! 5. **Vacuum**: data files that no version newer than `vacuum_retention` references are
//!    deleted. The lite mode reads them from the log's `remove` actions; the full mode, at most
//!    every `full_vacuum_every`, lists the table's folder and also finds the Parquet files of
//!    commits that never completed. Files under `_fleetlake/` are hidden from both.
//!
//! Each step is one Delta operation that leaves the table valid if the process dies in its
//! middle: files written by an unfinished compaction are unreferenced and vacuumed later.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::optimize::OptimizeType;
use deltalake::operations::vacuum::VacuumMode;
use deltalake::{DeltaTable, FilterOp, FilterValue};
use serde::{Deserialize, Serialize};

use crate::schema::TableId;
use crate::{Error, Lake, Result};

/// What maintenance may do to one table, and its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Size of the files compaction writes, bytes; files at least this large are left alone.
    pub target_file_size: u64,
    /// A partition still being written is compacted once it holds this many small files.
    pub min_small_files: u64,
    /// A partition with no file younger than this is quiet (no longer being written).
    pub quiet_for: Duration,
    /// At most this many partitions are rewritten per table per run (the busiest first).
    pub max_partitions: usize,
    /// Columns a quiet partition is Z-ordered by; empty: bin-packing only.
    pub cluster_by: Vec<String>,
    /// Whether partitions are rewritten at all. Off for tables replaced wholesale while the
    /// engine runs (the reference zone): delta-rs does not see a compaction's removes
    /// (`dataChange = false`) as conflicting with an overwrite, which would keep both copies.
    pub compact: bool,
    /// Checkpoint when at least this many commits were made since the last checkpoint.
    pub checkpoint_interval: u64,
    /// Log entries older than this (and older than a checkpoint) are deleted.
    pub log_retention: Duration,
    /// Unreferenced data files older than this are deleted; `None`: no vacuum.
    pub vacuum_retention: Option<Duration>,
    /// A full vacuum (listing every file of the table) at most this often, a lite one (the log's
    /// `remove` actions) in between; `None`: full every time.
    pub full_vacuum_every: Option<Duration>,
    /// Partitions of the first `DATE` partition column older than this many days (UTC) are
    /// deleted; `None`: kept forever.
    pub retention_days: Option<u32>,
    /// Plan and report, change nothing.
    pub dry_run: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            target_file_size: 128 * 1024 * 1024,
            min_small_files: 16,
            quiet_for: Duration::from_secs(15 * 60),
            max_partitions: 8,
            cluster_by: Vec::new(),
            compact: true,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            log_retention: Duration::from_secs(7 * 24 * 3600),
            vacuum_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            full_vacuum_every: Some(Duration::from_secs(24 * 3600)),
            retention_days: None,
            dry_run: false,
        }
    }
}

/// The checkpoint interval fleetlake sets on the tables it creates (`delta.checkpointInterval`),
/// the same as delta-rs's and Spark's default, made explicit.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 100;

/// How a partition is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rewrite {
    /// Small files merged into files of the target size, rows in their order (bin-packing).
    Compact,
    /// Every file of the partition rewritten, rows ordered along a Z-order curve of the cluster
    /// columns, into files of the target size.
    ZOrder,
}

/// One partition rewritten (or, in a dry run, to be rewritten).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRewrite {
    /// Hive-style path (`event_date=2026-11-29`), empty for an unpartitioned table.
    pub partition: String,
    pub kind: Rewrite,
    pub files_before: u64,
    /// Files removed and added by the rewrite; in a dry run, the plan's estimate: for a
    /// compaction the files smaller than the target (when there are two or more) replaced by
    /// their bytes in files of the target size, for a Z-order every file of the partition
    /// replaced by its bytes in files of the target size.
    pub files_removed: u64,
    pub files_added: u64,
}

/// What one run did to one table. Sizes in bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub table: String,
    pub dry_run: bool,
    pub started_at: String,
    pub seconds: f64,
    pub version_before: u64,
    pub version_after: u64,
    pub files_before: u64,
    pub files_after: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub rows_before: u64,
    pub rows_after: u64,
    /// Partitions deleted by retention, and their rows.
    pub expired_partitions: Vec<String>,
    pub rows_expired: u64,
    pub rewrites: Vec<PartitionRewrite>,
    /// Version checkpointed in this run.
    pub checkpoint: Option<u64>,
    pub log_files_removed: u64,
    /// Unreferenced data files deleted (or, in a dry run, that would be). A lite vacuum counts
    /// every expired `remove` of the log, also those whose file an earlier vacuum deleted.
    pub files_vacuumed: u64,
    /// Whether the vacuum listed every file of the table (else it read the log's removes).
    pub full_vacuum: bool,
    /// Steps skipped and why (e.g. a compaction that lost a race with another writer).
    pub notes: Vec<String>,
}

/// What maintenance remembers beside a table (`_fleetlake/maintenance.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// The last run that changed something or not (not dry runs).
    pub last: Option<Report>,
    /// Quiet partitions Z-ordered, with their file count just after: rewritten again only when
    /// later appends (late data) added files.
    #[serde(default)]
    pub clustered: BTreeMap<String, u64>,
    /// When the last full vacuum ran (RFC 3339).
    #[serde(default)]
    pub full_vacuum_at: Option<String>,
}

/// The retention horizon of a table (`_fleetlake/retention.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Horizon {
    /// The `DATE` partition column retention applies to.
    pub column: String,
    /// Partitions before this date were deleted.
    pub kept_from: NaiveDate,
    pub days: u32,
}

/// One partition as the log describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStats {
    /// Hive-style path, empty for an unpartitioned table.
    pub key: String,
    /// Partition column values; `None` when a value is NULL (such partitions are not rewritten).
    pub values: Option<Vec<(String, String)>>,
    pub files: u64,
    /// Files smaller than the target size, and their bytes.
    pub small_files: u64,
    pub small_bytes: u64,
    pub bytes: u64,
    /// Modification time of the newest file, ms since the epoch.
    pub newest_ms: i64,
}

const STATE_FILE: &str = "_fleetlake/maintenance.json";
const HORIZON_FILE: &str = "_fleetlake/retention.json";

/// Commit properties for maintenance's own commits: retries for races with the stream's
/// appends, and no log cleanup on commit (step 4 does it once).
fn commit_properties() -> CommitProperties {
    CommitProperties::default()
        .with_max_retries(50)
        .with_cleanup_expired_logs(Some(false))
}

/// Groups a table's live files by partition.
pub fn partitions(table: &DeltaTable, target_file_size: u64) -> Result<Vec<PartitionStats>> {
    let snapshot = table.snapshot().map_err(|e| delta("reading", table, e))?;
    let columns: Vec<String> = snapshot.metadata().partition_columns().to_vec();
    let mut by_key: BTreeMap<String, PartitionStats> = BTreeMap::new();
    for file in snapshot.log_data().iter() {
        let map = file.partition_values_map();
        let mut values = Some(Vec::new());
        let mut key = Vec::new();
        for column in &columns {
            match map.get(column).cloned().flatten() {
                Some(v) => {
                    key.push(format!("{column}={v}"));
                    if let Some(values) = values.as_mut() {
                        values.push((column.clone(), v));
                    }
                }
                None => {
                    key.push(format!("{column}=__HIVE_DEFAULT_PARTITION__"));
                    values = None;
                }
            }
        }
        let key = key.join("/");
        let size = u64::try_from(file.size()).unwrap_or(0);
        let entry = by_key.entry(key.clone()).or_insert(PartitionStats {
            key,
            values,
            files: 0,
            small_files: 0,
            small_bytes: 0,
            bytes: 0,
            newest_ms: i64::MIN,
        });
        entry.files += 1;
        entry.bytes = entry.bytes.saturating_add(size);
        if size < target_file_size {
            entry.small_files += 1;
            entry.small_bytes = entry.small_bytes.saturating_add(size);
        }
        entry.newest_ms = entry.newest_ms.max(file.modification_time());
    }
    Ok(by_key.into_values().collect())
}

/// The files a rewrite of `part` would remove and add (see [`PartitionRewrite::files_removed`]).
fn planned_files(part: &PartitionStats, kind: Rewrite, target: u64) -> (u64, u64) {
    let into_files = |bytes: u64| bytes.div_ceil(target.max(1)).max(1);
    match kind {
        Rewrite::Compact if part.small_files >= 2 => {
            (part.small_files, into_files(part.small_bytes))
        }
        Rewrite::Compact => (0, 0),
        Rewrite::ZOrder => (part.files, into_files(part.bytes)),
    }
}

/// Decides which partitions to rewrite and how (pure; see the module documentation):
/// - a partition with a file younger than `quiet_for` is bin-packed when it holds at least
///   `min_small_files` small files;
/// - a quiet partition of a table with cluster columns is Z-ordered when it holds two files or
///   more and was not Z-ordered since its last append (`clustered` holds its file count then);
/// - a quiet partition without cluster columns is bin-packed when it holds two small files or
///   more and more files than `ceil(bytes / target) + 1`.
///
/// Partitions with a NULL partition value are left alone. The `max_partitions` with the most
/// small files are returned, in that order.
pub fn plan(
    parts: &[PartitionStats],
    policy: &Policy,
    clustered: &BTreeMap<String, u64>,
    now_ms: i64,
) -> Vec<(PartitionStats, Rewrite)> {
    let quiet_ms = i64::try_from(policy.quiet_for.as_millis()).unwrap_or(i64::MAX);
    let target = policy.target_file_size.max(1);
    let mut chosen: Vec<(PartitionStats, Rewrite)> = parts
        .iter()
        .filter(|p| p.values.is_some())
        .filter_map(|p| {
            let active = now_ms.saturating_sub(p.newest_ms) < quiet_ms;
            let rewrite = if active {
                (p.small_files >= policy.min_small_files.max(2)).then_some(Rewrite::Compact)
            } else if !policy.cluster_by.is_empty() {
                let changed = clustered.get(&p.key).is_none_or(|n| p.files > *n);
                (p.files >= 2 && changed).then_some(Rewrite::ZOrder)
            } else {
                let needed = p.bytes.div_ceil(target).max(1);
                (p.small_files >= 2 && p.files > needed + 1).then_some(Rewrite::Compact)
            };
            rewrite.map(|r| (p.clone(), r))
        })
        .collect();
    chosen.sort_by(|a, b| {
        b.0.small_files
            .cmp(&a.0.small_files)
            .then(a.0.key.cmp(&b.0.key))
    });
    chosen.truncate(policy.max_partitions);
    chosen
}

fn delta(action: &'static str, table: &DeltaTable, source: deltalake::DeltaTableError) -> Error {
    Error::Delta {
        action,
        table: table.table_url().to_string(),
        source: Box::new(source),
    }
}

fn storage(action: &'static str, id: &TableId, source: object_store::Error) -> Error {
    Error::Delta {
        action,
        table: id.to_string(),
        source: Box::new(deltalake::DeltaTableError::ObjectStore { source }),
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    table: &DeltaTable,
    id: &TableId,
    file: &str,
) -> Result<Option<T>> {
    let store = table.log_store().object_store(None);
    let path = object_store::path::Path::from(file);
    match object_store::ObjectStoreExt::get(store.as_ref(), &path).await {
        Ok(got) => {
            let bytes = got
                .bytes()
                .await
                .map_err(|e| storage("reading maintenance state of", id, e))?;
            // A file from an older or newer fleetlake that does not parse is treated as absent:
            // at worst a partition is rewritten once more.
            Ok(serde_json::from_slice(&bytes).ok())
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(storage("reading maintenance state of", id, e)),
    }
}

async fn put_json<T: Serialize>(
    table: &DeltaTable,
    id: &TableId,
    file: &str,
    value: &T,
) -> Result<()> {
    let store = table.log_store().object_store(None);
    let path = object_store::path::Path::from(file);
    let bytes = serde_json::to_vec_pretty(value).expect("plain data serializes");
    object_store::ObjectStoreExt::put(store.as_ref(), &path, bytes.into())
        .await
        .map_err(|e| storage("writing maintenance state of", id, e))?;
    Ok(())
}

/// The maintenance state stored beside a table (its last run), if any.
pub async fn state(lake: &Lake, id: &TableId) -> Result<Option<State>> {
    let Some(table) = lake.load(id).await? else {
        return Ok(None);
    };
    state_of(&table, id).await
}

/// [`state`] of a table already open.
pub async fn state_of(table: &DeltaTable, id: &TableId) -> Result<Option<State>> {
    get_json(table, id, STATE_FILE).await
}

/// Where retention left a table: partitions before `kept_from` were deleted. `None` when
/// retention never deleted anything from it.
pub async fn retention_horizon(lake: &Lake, id: &TableId) -> Result<Option<Horizon>> {
    let Some(table) = lake.load(id).await? else {
        return Ok(None);
    };
    get_json(&table, id, HORIZON_FILE).await
}

/// The version of the table's last checkpoint (`_delta_log/_last_checkpoint`), if any.
pub async fn last_checkpoint(table: &DeltaTable, id: &TableId) -> Result<Option<u64>> {
    #[derive(Deserialize)]
    struct LastCheckpoint {
        version: u64,
    }
    Ok(
        get_json::<LastCheckpoint>(table, id, "_delta_log/_last_checkpoint")
            .await?
            .map(|c| c.version),
    )
}

/// Version, live files, their bytes and rows of a table.
pub(crate) struct Totals {
    pub(crate) version: u64,
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    pub(crate) rows: u64,
}

pub(crate) fn totals(table: &DeltaTable) -> Result<Totals> {
    let snapshot = table.snapshot().map_err(|e| delta("reading", table, e))?;
    let mut t = Totals {
        version: snapshot.version(),
        files: 0,
        bytes: 0,
        rows: 0,
    };
    for file in snapshot.log_data().iter() {
        t.files += 1;
        t.bytes = t
            .bytes
            .saturating_add(u64::try_from(file.size()).unwrap_or(0));
        t.rows = t
            .rows
            .saturating_add(file.num_records().unwrap_or(0) as u64);
    }
    Ok(t)
}

/// The first partition column of type `DATE`: the one retention applies to.
fn date_partition(table: &DeltaTable) -> Result<Option<String>> {
    let snapshot = table.snapshot().map_err(|e| delta("reading", table, e))?;
    let schema = snapshot.schema();
    Ok(snapshot
        .metadata()
        .partition_columns()
        .iter()
        .find(|c| {
            schema
                .field(c.as_str())
                .is_some_and(|f| f.data_type() == &deltalake::kernel::DataType::DATE)
        })
        .cloned())
}

/// Runs the maintenance steps on one table (see the module documentation) and records the run
/// beside it. A step that loses a race with another writer is skipped with a note and tried
/// again at the next run; storage errors are returned.
///
/// Retention asked of a table without a `DATE` partition column is skipped with a note.
///
/// Errors: [`Error::UnknownTable`] when no table exists at `id`; [`Error::Delta`] when storage
/// fails.
pub async fn maintain(lake: &Lake, id: &TableId, policy: &Policy) -> Result<Report> {
    let started = std::time::Instant::now();
    let now: DateTime<Utc> = Utc::now();
    let mut table = lake
        .load(id)
        .await?
        .ok_or_else(|| Error::UnknownTable(id.to_string()))?;
    let before = totals(&table)?;
    // Cluster columns the table does not have are left out (a pipeline table without `ts`).
    let policy = &{
        let snapshot = table.snapshot().map_err(|e| delta("reading", &table, e))?;
        let schema = snapshot.schema();
        let mut policy = policy.clone();
        policy
            .cluster_by
            .retain(|c| schema.field(c.as_str()).is_some());
        policy
    };
    let mut state: State = get_json(&table, id, STATE_FILE).await?.unwrap_or_default();
    let mut report = Report {
        table: id.to_string(),
        dry_run: policy.dry_run,
        started_at: now.to_rfc3339(),
        version_before: before.version,
        files_before: before.files,
        bytes_before: before.bytes,
        rows_before: before.rows,
        ..Report::default()
    };

    // 1. Retention.
    if let Some(days) = policy.retention_days {
        table = expire(id, table, days, now, policy.dry_run, &mut report).await?;
    }

    // 2. Compaction.
    let parts = partitions(&table, policy.target_file_size)?;
    let chosen = if policy.compact {
        plan(&parts, policy, &state.clustered, now.timestamp_millis())
    } else {
        Vec::new()
    };
    // Partitions that no longer exist (expired) are forgotten.
    state
        .clustered
        .retain(|k, _| parts.iter().any(|p| &p.key == k));
    let target = NonZeroU64::new(policy.target_file_size.max(1)).expect("at least 1");
    for (part, kind) in chosen {
        let mut rewrite = PartitionRewrite {
            partition: part.key.clone(),
            kind,
            files_before: part.files,
            files_removed: 0,
            files_added: 0,
        };
        if policy.dry_run {
            (rewrite.files_removed, rewrite.files_added) = planned_files(&part, kind, target.get());
            report.rewrites.push(rewrite);
            continue;
        }
        let values = part.values.clone().expect("planned partitions have values");
        let filters: Vec<_> = values
            .iter()
            .map(|(c, v)| (c.as_str(), FilterOp::Eq, FilterValue::Scalar(v.as_str())))
            .collect();
        let optimize_type = match kind {
            Rewrite::Compact => OptimizeType::Compact,
            Rewrite::ZOrder => OptimizeType::ZOrder(policy.cluster_by.clone()),
        };
        let result = table
            .clone()
            .optimize()
            .with_type(optimize_type)
            .with_filters(&filters)
            .with_target_size(target)
            .with_max_concurrent_tasks(1)
            .with_commit_properties(commit_properties())
            .await;
        match result {
            Ok((t, metrics)) => {
                table = t;
                rewrite.files_removed = metrics.num_files_removed;
                rewrite.files_added = metrics.num_files_added;
                match kind {
                    Rewrite::ZOrder => {
                        let after = part.files.saturating_sub(metrics.num_files_removed)
                            + metrics.num_files_added;
                        state.clustered.insert(part.key.clone(), after);
                    }
                    Rewrite::Compact => {
                        state.clustered.remove(&part.key);
                    }
                }
                report.rewrites.push(rewrite);
            }
            Err(e) if is_conflict(&e) => {
                report.notes.push(format!(
                    "compacting {}: another writer changed these files first ({e}); tried again next run",
                    part.key
                ));
                table
                    .update_state()
                    .await
                    .map_err(|e| delta("refreshing", &table, e))?;
            }
            Err(e) => return Err(delta("compacting", &table, e)),
        }
    }

    // 3. Checkpoint.
    table
        .update_state()
        .await
        .map_err(|e| delta("refreshing", &table, e))?;
    let version: u64 = table.version().unwrap_or(0);
    let last = last_checkpoint(&table, id).await?;
    let since = version.saturating_sub(last.unwrap_or(0));
    let due = match last {
        Some(_) => since >= policy.checkpoint_interval.max(1),
        None => version + 1 >= policy.checkpoint_interval.max(1),
    };
    if due && last != Some(version) {
        if !policy.dry_run {
            deltalake::checkpoints::create_checkpoint(&table, None)
                .await
                .map_err(|e| delta("checkpointing", &table, e))?;
        }
        report.checkpoint = Some(version);
    }

    // 4. Log cleanup (needs a checkpoint: delta-rs keeps everything after the newest one that
    // is older than the cutoff).
    if !policy.dry_run {
        let cutoff = Utc::now()
            .timestamp_millis()
            .saturating_sub(i64::try_from(policy.log_retention.as_millis()).unwrap_or(i64::MAX));
        let removed = deltalake::checkpoints::cleanup_expired_logs_for(
            version,
            table.log_store().as_ref(),
            cutoff,
            None,
        )
        .await
        .map_err(|e| delta("cleaning the log of", &table, e))?;
        report.log_files_removed = removed as u64;
        if removed > 0 {
            // The loaded snapshot's log segment may name entries that are gone now.
            table = lake
                .load(id)
                .await?
                .ok_or_else(|| Error::UnknownTable(id.to_string()))?;
        }
    }

    // 5. Vacuum.
    if let Some(retention) = policy.vacuum_retention {
        let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let last_full = state
            .full_vacuum_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
        let full = match (policy.full_vacuum_every, last_full) {
            (Some(every), Some(at)) => {
                now.signed_duration_since(at).to_std().unwrap_or_default() >= every
            }
            _ => true,
        };
        report.full_vacuum = full;
        let result = table
            .clone()
            .vacuum()
            .with_mode(if full {
                VacuumMode::Full
            } else {
                VacuumMode::Lite
            })
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .with_dry_run(policy.dry_run)
            .with_commit_properties(commit_properties())
            .await;
        match result {
            Ok((t, metrics)) => {
                table = t;
                report.files_vacuumed = metrics.files_deleted.len() as u64;
                if full && !policy.dry_run {
                    state.full_vacuum_at = Some(now.to_rfc3339());
                }
            }
            Err(e) if is_conflict(&e) => {
                report
                    .notes
                    .push(format!("vacuum: {e}; tried again next run"));
            }
            Err(e) => return Err(delta("vacuuming", &table, e)),
        }
    }

    table
        .update_state()
        .await
        .map_err(|e| delta("refreshing", &table, e))?;
    let after = totals(&table)?;
    report.version_after = after.version;
    report.files_after = after.files;
    report.bytes_after = after.bytes;
    report.rows_after = after.rows;
    report.seconds = started.elapsed().as_secs_f64();
    if !policy.dry_run {
        state.last = Some(report.clone());
        put_json(&table, id, STATE_FILE, &state).await?;
    }
    Ok(report)
}

/// Deletes the partitions of the first `DATE` partition column before `today - days`, in one
/// commit, and records the horizon.
async fn expire(
    id: &TableId,
    table: DeltaTable,
    days: u32,
    now: DateTime<Utc>,
    dry_run: bool,
    report: &mut Report,
) -> Result<DeltaTable> {
    let Some(column) = date_partition(&table)? else {
        report.notes.push(format!(
            "retention of {days} days not applied: it deletes whole partitions of a DATE partition column, and {id} has none"
        ));
        return Ok(table);
    };
    let kept_from = now.date_naive() - chrono::Days::new(u64::from(days));
    let kept = kept_from.format("%Y-%m-%d").to_string();
    let parts = partitions(&table, u64::MAX)?;
    let snapshot = table.snapshot().map_err(|e| delta("reading", &table, e))?;
    let mut expired = Vec::new();
    let mut rows = 0u64;
    for file in snapshot.log_data().iter() {
        let map = file.partition_values_map();
        if let Some(Some(v)) = map.get(&column)
            && v.as_str() < kept.as_str()
        {
            rows = rows.saturating_add(file.num_records().unwrap_or(0) as u64);
        }
    }
    for p in &parts {
        if let Some(values) = &p.values
            && values
                .iter()
                .any(|(c, v)| c == &column && v.as_str() < kept.as_str())
        {
            expired.push(p.key.clone());
        }
    }
    report.expired_partitions = expired.clone();
    report.rows_expired = rows;
    if dry_run {
        return Ok(table);
    }
    let horizon = Horizon {
        column: column.clone(),
        kept_from,
        days,
    };
    // The horizon is recorded before the delete: if the process dies in between, a replay of the
    // range is refused while its rows still exist, never the other way round.
    let previous: Option<Horizon> = get_json(&table, id, HORIZON_FILE).await?;
    if previous.as_ref().is_none_or(|h| h.kept_from < kept_from) && !expired.is_empty() {
        put_json(&table, id, HORIZON_FILE, &horizon).await?;
    }
    if expired.is_empty() {
        return Ok(table);
    }
    let predicate = format!("\"{column}\" < '{kept}'");
    match table
        .clone()
        .delete()
        .with_predicate(predicate)
        .with_commit_properties(commit_properties())
        .await
    {
        Ok((table, _)) => Ok(table),
        // Late data appended to an expired partition meanwhile: tried again next run.
        Err(e) if is_conflict(&e) => {
            report.notes.push(format!(
                "retention: another writer changed the expired partitions first ({e}); tried again next run"
            ));
            report.expired_partitions.clear();
            report.rows_expired = 0;
            Ok(table)
        }
        Err(e) => Err(Error::Delta {
            action: "deleting expired partitions of",
            table: id.to_string(),
            source: Box::new(e),
        }),
    }
}

/// A commit that lost a race with another writer's (tried again at the next run); not a
/// storage failure.
fn is_conflict(e: &deltalake::DeltaTableError) -> bool {
    use deltalake::DeltaTableError as D;
    use deltalake::kernel::transaction::TransactionError as T;
    matches!(
        e,
        D::Transaction {
            source: T::CommitConflict(_) | T::VersionAlreadyExists(_)
        } | D::VersionAlreadyExists(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(key: &str, files: u64, small: u64, bytes: u64, newest_ms: i64) -> PartitionStats {
        PartitionStats {
            key: key.to_string(),
            values: Some(vec![("d".into(), key.into())]),
            files,
            small_files: small,
            small_bytes: bytes.min(small * 1024),
            bytes,
            newest_ms,
        }
    }

    #[test]
    fn active_partitions_wait_for_enough_small_files_quiet_ones_are_clustered_once() {
        let policy = Policy {
            target_file_size: 100,
            min_small_files: 4,
            quiet_for: Duration::from_secs(60),
            cluster_by: vec!["device_id".into()],
            ..Policy::default()
        };
        let now = 1_000_000;
        let parts = vec![
            part("active_few", 3, 3, 30, now - 1_000),
            part("active_many", 5, 5, 50, now - 1_000),
            part("quiet", 3, 3, 30, now - 120_000),
            part("quiet_one_file", 1, 1, 10, now - 120_000),
        ];
        let mut clustered = BTreeMap::new();
        let chosen = plan(&parts, &policy, &clustered, now);
        let got: Vec<_> = chosen.iter().map(|(p, r)| (p.key.as_str(), *r)).collect();
        assert_eq!(
            got,
            vec![
                ("active_many", Rewrite::Compact),
                ("quiet", Rewrite::ZOrder)
            ]
        );
        // Clustered into 1 file: left alone until late data adds files.
        clustered.insert("quiet".to_string(), 1);
        let parts = vec![part("quiet", 1, 1, 30, now - 120_000)];
        assert!(plan(&parts, &policy, &clustered, now).is_empty());
        let parts = vec![part("quiet", 2, 2, 30, now - 120_000)];
        assert_eq!(plan(&parts, &policy, &clustered, now).len(), 1);
    }

    #[test]
    fn quiet_partitions_without_cluster_columns_are_packed_only_when_they_hold_too_many_files() {
        let policy = Policy {
            target_file_size: 100,
            min_small_files: 4,
            quiet_for: Duration::from_secs(60),
            ..Policy::default()
        };
        let now = 1_000_000;
        let old = now - 120_000;
        // 250 bytes need 3 files; 4 files are tolerated, 5 are not.
        let parts = vec![
            part("fine", 4, 2, 250, old),
            part("too_many", 5, 3, 250, old),
            part("big_files", 5, 1, 450, old),
        ];
        let chosen = plan(&parts, &policy, &BTreeMap::new(), now);
        let got: Vec<_> = chosen.iter().map(|(p, _)| p.key.as_str()).collect();
        assert_eq!(got, vec!["too_many"]);
        // NULL partitions are never planned; the limit keeps the busiest.
        let mut null = part("null", 50, 50, 50, now);
        null.values = None;
        let limited = Policy {
            max_partitions: 1,
            ..policy
        };
        let parts = vec![null, part("a", 9, 9, 9, now), part("b", 20, 20, 20, now)];
        let chosen = plan(&parts, &limited, &BTreeMap::new(), now);
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].0.key, "b");
    }

    async fn file_count(dir: &std::path::Path) -> usize {
        fn walk(dir: &std::path::Path, n: &mut usize) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, n);
                } else if p.extension().is_some_and(|x| x == "parquet")
                    && !p.to_string_lossy().contains("_delta_log")
                {
                    *n += 1;
                }
            }
        }
        let mut n = 0;
        walk(dir, &mut n);
        n
    }

    /// Many small commits on two days, then one run with everything due: the rows and the
    /// writer's progress are unchanged, the files are few, the log is cleaned after a
    /// checkpoint, the replaced files are vacuumed, and the old day expires with its horizon.
    #[tokio::test]
    async fn a_run_compacts_checkpoints_cleans_vacuums_and_expires_keeping_rows_and_progress() {
        use crate::lake::tests::raw_batch_on;
        use crate::schema::RAW_TELEMETRY;
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(&crate::LakeConfig {
            location: dir.path().display().to_string(),
            ..Default::default()
        })
        .unwrap();
        let id = TableId::raw_telemetry();
        let open = || {
            lake.writer(
                id.clone(),
                RAW_TELEMETRY.clone(),
                vec!["ingest_date".into()],
                "app",
            )
        };
        let mut w = open().await.unwrap();
        let today = Utc::now().date_naive();
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        let day = |d: NaiveDate| i32::try_from((d - epoch).num_days()).unwrap();
        let old = day(today - chrono::Days::new(40));
        for i in 0..30i64 {
            let on = if i < 10 { old } else { day(today) };
            w.commit(
                &raw_batch_on(&[i * 2 + 1, i * 2 + 2], on),
                "stream_seq",
                i * 2 + 2,
            )
            .await
            .unwrap();
        }
        let table_dir = dir.path().join("raw/telemetry");
        assert_eq!(file_count(&table_dir).await, 30);
        let policy = Policy {
            target_file_size: 1024 * 1024,
            min_small_files: 4,
            quiet_for: Duration::ZERO,
            cluster_by: vec!["stream_seq".into()],
            checkpoint_interval: 10,
            log_retention: Duration::ZERO,
            vacuum_retention: Some(Duration::ZERO),
            retention_days: None,
            ..Policy::default()
        };
        // A dry run changes nothing.
        let dry = maintain(
            &lake,
            &id,
            &Policy {
                dry_run: true,
                ..policy.clone()
            },
        )
        .await
        .unwrap();
        assert_eq!(dry.rewrites.len(), 2, "{dry:?}");
        assert_eq!(dry.version_after, dry.version_before);
        assert_eq!(file_count(&table_dir).await, 30);

        let report = maintain(&lake, &id, &policy).await.unwrap();
        // The dry run planned what the run then did, file for file.
        assert_eq!(dry.rewrites, report.rewrites, "{dry:?} {report:?}");
        assert_eq!(report.rows_before, 60);
        assert_eq!(report.rows_after, 60);
        assert_eq!(report.files_after, 2, "{report:?}");
        assert!(report.rewrites.iter().all(|r| r.kind == Rewrite::ZOrder));
        assert!(report.checkpoint.is_some());
        assert!(report.log_files_removed > 0, "{report:?}");
        // Z-ordered files replaced the 30: those were vacuumed.
        assert_eq!(report.files_vacuumed, 30, "{report:?}");
        assert!(report.full_vacuum);
        assert_eq!(file_count(&table_dir).await, 2);
        // The writer's progress reads back the same after the log was cleaned.
        assert_eq!(open().await.unwrap().committed(), Some(60));
        // A second run finds nothing to rewrite.
        let again = maintain(&lake, &id, &policy).await.unwrap();
        assert!(again.rewrites.is_empty(), "{again:?}");
        // Within a day of the full vacuum, the next reads the log's removes only.
        assert!(!again.full_vacuum);
        // The writer opened before (a running engine's) still appends, and skips what was
        // committed.
        w.commit(&raw_batch_on(&[59, 60, 61], day(today)), "stream_seq", 61)
            .await
            .unwrap();
        assert_eq!(lake.describe(&id).await.unwrap().unwrap().rows, 61);

        // Retention of 30 days drops the 40-day-old partition only, and records the horizon.
        assert_eq!(retention_horizon(&lake, &id).await.unwrap(), None);
        let expired = maintain(
            &lake,
            &id,
            &Policy {
                retention_days: Some(30),
                ..policy.clone()
            },
        )
        .await
        .unwrap();
        assert_eq!(expired.expired_partitions.len(), 1, "{expired:?}");
        assert_eq!(expired.rows_expired, 20);
        assert_eq!(expired.rows_after, 41);
        // The expired partition's file is a `remove` now: the lite vacuum deletes it (and counts
        // the removes whose files an earlier vacuum deleted too).
        assert!(expired.files_vacuumed >= 3, "{expired:?}");
        let old_dir = table_dir.join(format!("ingest_date={}", today - chrono::Days::new(40)));
        assert_eq!(file_count(&old_dir).await, 0);
        // A full vacuum leaves exactly the live files.
        let full = maintain(
            &lake,
            &id,
            &Policy {
                full_vacuum_every: None,
                ..policy.clone()
            },
        )
        .await
        .unwrap();
        assert!(full.full_vacuum);
        let live = lake.describe(&id).await.unwrap().unwrap().files as usize;
        assert_eq!(file_count(&table_dir).await, live);
        // The running writer's snapshot predates the delete, which delta-rs counts as
        // conflicting with its blind append: the commit is tried again at once and lands.
        w.commit(&raw_batch_on(&[62], day(today)), "stream_seq", 62)
            .await
            .unwrap();
        assert_eq!(lake.describe(&id).await.unwrap().unwrap().rows, 42);
        let horizon = retention_horizon(&lake, &id).await.unwrap().unwrap();
        assert_eq!(horizon.column, "ingest_date");
        assert_eq!(horizon.kept_from, today - chrono::Days::new(30));
        assert_eq!(open().await.unwrap().committed(), Some(62));
        let st = state(&lake, &id).await.unwrap().unwrap();
        assert_eq!(st.last.unwrap().rows_after, 41);
    }
}
