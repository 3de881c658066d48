//! [`Lake`]: where the zones live, and [`TableWriter`]: the idempotent commit.
//!
//! Exactly-once works like Spark Structured Streaming's Delta sink: every commit carries a Delta
//! `txn` action (`app_id`, `version`) where the version is the last stream sequence the commit
//! covers. A writer reads that version back when it opens a table and skips every row at or below
//! it, so a batch replayed after a crash is written nowhere twice. delta-rs records the action but
//! does not skip anything by itself: the comparison lives here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder};
use url::Url;

use crate::schema::TableId;
use crate::{Error, Result};

/// Where the lake is and how to reach it. `Debug` hides secret options.
#[derive(Clone, Default)]
pub struct LakeConfig {
    /// `file:///abs/path`, a relative or absolute folder, or `s3://bucket/prefix`.
    pub location: String,
    /// Object-store options (`AWS_ENDPOINT_URL`, `AWS_REGION`, …) passed to delta-rs.
    pub storage_options: HashMap<String, String>,
}

/// The lakehouse root: opens and creates the zone tables. `Debug` hides secret options.
#[derive(Clone)]
pub struct Lake {
    root: Url,
    storage_options: HashMap<String, String>,
}

/// Storage options as they may be shown: the value of any option whose name holds `SECRET`,
/// `TOKEN`, `PASSWORD` or `SESSION` is `<redacted>`.
fn shown_options(options: &HashMap<String, String>) -> std::collections::BTreeMap<&str, &str> {
    options
        .iter()
        .map(|(k, v)| {
            let upper = k.to_uppercase();
            let secret = ["SECRET", "TOKEN", "PASSWORD", "SESSION"]
                .iter()
                .any(|s| upper.contains(s));
            (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
        })
        .collect()
}

impl std::fmt::Debug for LakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeConfig")
            .field("location", &self.location)
            .field("storage_options", &shown_options(&self.storage_options))
            .finish()
    }
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lake")
            .field("root", &self.root.as_str())
            .field("storage_options", &shown_options(&self.storage_options))
            .finish()
    }
}

/// What one table holds, as `GET /v1/tables` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub table: TableId,
    pub version: u64,
    pub rows: u64,
    pub files: u64,
    pub size_bytes: u64,
    /// The version of the newest Delta checkpoint, if any.
    pub last_checkpoint: Option<u64>,
    /// When table maintenance last started a run on it (RFC 3339), if ever.
    pub maintained_at: Option<String>,
}

/// The result of [`TableWriter::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// A new Delta version holding `rows` rows (possibly zero: progress only).
    Committed { version: u64, rows: usize },
    /// The table already recorded this progress: nothing was written.
    AlreadyCommitted,
}

impl Lake {
    /// Resolves the location; a local folder is created if missing.
    pub fn open(config: &LakeConfig) -> Result<Self> {
        let location = config.location.trim();
        let invalid = |reason: &str| Error::InvalidLocation {
            location: location.to_string(),
            reason: reason.to_string(),
        };
        let root = if location.contains("://") {
            Url::parse(location).map_err(|e| invalid(&e.to_string()))?
        } else {
            if location.is_empty() {
                return Err(invalid("it is empty"));
            }
            std::fs::create_dir_all(location).map_err(|source| Error::Io {
                path: location.to_string(),
                source,
            })?;
            let abs = std::fs::canonicalize(location).map_err(|source| Error::Io {
                path: location.to_string(),
                source,
            })?;
            Url::from_directory_path(&abs).map_err(|_| invalid("not an absolute path"))?
        };
        match root.scheme() {
            "file" => {
                let path = root
                    .to_file_path()
                    .map_err(|_| invalid("not a local path"))?;
                std::fs::create_dir_all(&path).map_err(|source| Error::Io {
                    path: path.display().to_string(),
                    source,
                })?;
            }
            "s3" | "s3a" => {
                if root.host_str().unwrap_or("").is_empty() {
                    return Err(invalid("the bucket is missing"));
                }
            }
            "memory" => {}
            other => return Err(invalid(&format!("unsupported scheme {other:?}"))),
        }
        let mut root = root;
        if !root.path().ends_with('/') {
            root.set_path(&format!("{}/", root.path()));
        }
        Ok(Self {
            root,
            storage_options: config.storage_options.clone(),
        })
    }

    /// The lake root, always ending in `/`.
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// Where a table lives.
    pub fn table_url(&self, id: &TableId) -> Url {
        self.root
            .join(&format!("{}/", id.path()))
            .expect("table paths are validated identifiers")
    }

    fn builder(&self, id: &TableId) -> Result<DeltaTableBuilder> {
        DeltaTableBuilder::from_url(self.table_url(id))
            .map(|b| b.with_storage_options(self.storage_options.clone()))
            .map_err(|source| Error::Delta {
                action: "opening",
                table: id.to_string(),
                source: Box::new(source),
            })
    }

    /// Opens a table at its latest version; `None` when no Delta table exists there yet.
    pub async fn load(&self, id: &TableId) -> Result<Option<DeltaTable>> {
        if let Ok(path) = self.table_url(id).to_file_path()
            && !path.join("_delta_log").exists()
        {
            return Ok(None);
        }
        let mut table = self.builder(id)?.build().map_err(|source| Error::Delta {
            action: "opening",
            table: id.to_string(),
            source: Box::new(source),
        })?;
        match table.load().await {
            Ok(()) => Ok(Some(table)),
            Err(deltalake::DeltaTableError::NotATable(_)) => Ok(None),
            Err(source) => Err(Error::Delta {
                action: "loading",
                table: id.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Opens a table, creating it empty with `schema` and `partitions` when it does not exist.
    pub async fn ensure_table(
        &self,
        id: &TableId,
        schema: &SchemaRef,
        partitions: &[&str],
    ) -> Result<DeltaTable> {
        if let Some(table) = self.load(id).await? {
            return Ok(table);
        }
        if self.root.scheme() == "file" {
            let url = self.table_url(id);
            let path = url.to_file_path().expect("file lake");
            create_dir(&path)?;
        }
        let table = self.builder(id)?.build().map_err(|source| Error::Delta {
            action: "creating",
            table: id.to_string(),
            source: Box::new(source),
        })?;
        let created = table
            .write(vec![RecordBatch::new_empty(schema.clone())])
            .with_save_mode(SaveMode::Append)
            .with_partition_columns(partitions.iter().map(|p| p.to_string()))
            .with_configuration([
                (
                    "delta.checkpointInterval",
                    Some(crate::maintain::DEFAULT_CHECKPOINT_INTERVAL.to_string()),
                ),
                // Log cleanup is maintenance's (with its own retention), not every commit's:
                // delta-rs's own commits (e.g. VACUUM START) would otherwise list the log.
                ("delta.enableExpiredLogCleanup", Some("false".to_string())),
            ])
            .with_commit_properties(no_log_cleanup())
            .await;
        match created {
            Ok(table) => Ok(table),
            // Another writer created it first: use theirs.
            Err(_) if self.load(id).await?.is_some() => {
                Ok(self.load(id).await?.expect("just seen"))
            }
            Err(source) => Err(Error::Delta {
                action: "creating",
                table: id.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Replaces a table's content (and schema) with `batch` in one commit, creating the table if
    /// needed: readers see the old rows or the new, never a mix. For slowly changing tables such
    /// as the reference zone's.
    pub async fn replace(&self, id: &TableId, batch: RecordBatch) -> Result<TableInfo> {
        if self.root.scheme() == "file" {
            let url = self.table_url(id);
            create_dir(&url.to_file_path().expect("file lake"))?;
        }
        let table = match self.load(id).await? {
            Some(t) => t,
            None => self.builder(id)?.build().map_err(|source| Error::Delta {
                action: "creating",
                table: id.to_string(),
                source: Box::new(source),
            })?,
        };
        self.overwrite(id, table, vec![batch], None).await
    }

    /// Replaces, in one commit, the rows of a table that match `predicate` (SQL over the table's
    /// columns, e.g. `stream_seq BETWEEN 10 AND 99`) with `batches`, whose rows must all match it.
    /// Readers see the old rows or the new, never half of a replacement.
    pub async fn replace_where(
        &self,
        id: &TableId,
        batches: Vec<RecordBatch>,
        predicate: String,
    ) -> Result<TableInfo> {
        let table = self
            .load(id)
            .await?
            .ok_or_else(|| Error::UnknownTable(id.to_string()))?;
        self.overwrite(id, table, batches, Some(predicate)).await
    }

    /// One overwriting commit: the whole table (and its schema), or the rows matching
    /// `predicate` (new columns merged in).
    async fn overwrite(
        &self,
        id: &TableId,
        table: DeltaTable,
        batches: Vec<RecordBatch>,
        predicate: Option<String>,
    ) -> Result<TableInfo> {
        use deltalake::operations::write::SchemaMode;
        let write = table
            .write(batches)
            .with_save_mode(SaveMode::Overwrite)
            .with_commit_properties(no_log_cleanup());
        let write = match predicate {
            Some(p) => write
                .with_replace_where(p)
                .with_schema_mode(SchemaMode::Merge),
            None => write.with_schema_mode(SchemaMode::Overwrite),
        };
        write.await.map_err(|source| Error::Delta {
            action: "replacing rows of",
            table: id.to_string(),
            source: Box::new(source),
        })?;
        self.describe(id)
            .await?
            .ok_or_else(|| Error::UnknownTable(id.to_string()))
    }

    /// The object store at the lake's root.
    fn root_store(&self, action: &'static str) -> Result<Arc<dyn object_store::ObjectStore>> {
        Ok(DeltaTableBuilder::from_url(self.root.clone())
            .map(|b| b.with_storage_options(self.storage_options.clone()))
            .and_then(|b| b.build_storage())
            .map_err(|source| Error::Delta {
                action,
                table: SIDE_DIR.to_string(),
                source: Box::new(source),
            })?
            .object_store(None))
    }

    /// Writes (or replaces) fleetlake's own file `name` at `<lake>/_fleetlake/<name>`: state
    /// of the lake as a whole (the running engine's heartbeat), hidden from every table.
    pub async fn put_lake_file(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let store = self.root_store("writing")?;
        let path = object_store::path::Path::from(format!("{SIDE_DIR}/{name}"));
        object_store::ObjectStoreExt::put(store.as_ref(), &path, bytes.into())
            .await
            .map_err(|e| lake_file_error("writing", e))?;
        Ok(())
    }

    /// Reads fleetlake's own file `name` (see [`Lake::put_lake_file`]); `None` when absent.
    pub async fn get_lake_file(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let store = self.root_store("reading")?;
        let path = object_store::path::Path::from(format!("{SIDE_DIR}/{name}"));
        match object_store::ObjectStoreExt::get(store.as_ref(), &path).await {
            Ok(got) => Ok(Some(
                got.bytes()
                    .await
                    .map_err(|e| lake_file_error("reading", e))?
                    .to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(lake_file_error("reading", e)),
        }
    }

    /// Deletes fleetlake's own file `name`; absent is fine.
    pub async fn delete_lake_file(&self, name: &str) -> Result<()> {
        let store = self.root_store("deleting")?;
        let path = object_store::path::Path::from(format!("{SIDE_DIR}/{name}"));
        match object_store::ObjectStoreExt::delete(store.as_ref(), &path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(lake_file_error("deleting", e)),
        }
    }

    /// The tables of a zone that exist in the lake, by name.
    pub async fn tables(&self, zone: crate::Zone) -> Result<Vec<TableId>> {
        let store = DeltaTableBuilder::from_url(self.root.clone())
            .map(|b| b.with_storage_options(self.storage_options.clone()))
            .and_then(|b| b.build_storage())
            .map_err(|source| Error::Delta {
                action: "listing",
                table: format!("{}.*", zone.as_str()),
                source: Box::new(source),
            })?
            .object_store(None);
        let prefix = object_store::path::Path::from(zone.as_str());
        let listed = match store.list_with_delimiter(Some(&prefix)).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Delta {
                    action: "listing",
                    table: format!("{}.*", zone.as_str()),
                    source: Box::new(deltalake::DeltaTableError::ObjectStore { source: e }),
                });
            }
        };
        let mut ids: Vec<TableId> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename())
            .filter_map(|name| TableId::parse(&format!("{}.{name}", zone.as_str())).ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every table of the lake: the built-in ones first (whether written yet or not), then the
    /// others of each zone found in storage.
    pub async fn all_tables(&self) -> Result<Vec<TableId>> {
        let mut ids: Vec<TableId> = crate::schema::builtin_tables()
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        for zone in crate::Zone::ALL {
            for id in self.tables(zone).await? {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// Version, rows, files and bytes of a table; `None` if it does not exist.
    pub async fn describe(&self, id: &TableId) -> Result<Option<TableInfo>> {
        let Some(table) = self.load(id).await? else {
            return Ok(None);
        };
        let totals = crate::maintain::totals(&table)?;
        let last_checkpoint = crate::maintain::last_checkpoint(&table, id).await?;
        let maintained_at = crate::maintain::state_of(&table, id)
            .await?
            .and_then(|s| s.last)
            .map(|r| r.started_at);
        Ok(Some(TableInfo {
            table: id.clone(),
            version: totals.version,
            rows: totals.rows,
            files: totals.files,
            size_bytes: totals.bytes,
            last_checkpoint,
            maintained_at,
        }))
    }

    /// Opens (or creates) a table for an idempotent writer identified by `app_id`.
    pub async fn writer(
        &self,
        id: TableId,
        schema: SchemaRef,
        partitions: Vec<String>,
        app_id: impl Into<String>,
    ) -> Result<TableWriter> {
        let names: Vec<&str> = partitions.iter().map(String::as_str).collect();
        let table = self.ensure_table(&id, &schema, &names).await?;
        let mut writer = TableWriter {
            lake: self.clone(),
            id,
            schema,
            partitions,
            app_id: app_id.into(),
            table,
            committed: None,
            stale: false,
        };
        writer.committed = writer.read_committed().await?;
        Ok(writer)
    }
}

/// Commit properties of every write: a checkpoint every `delta.checkpointInterval` commits (as
/// delta-rs does by default), but no log cleanup on commit. Cleaning the log lists the whole
/// `_delta_log` folder, which grows by one entry per commit; maintenance does it once per run
/// (see [`crate::maintain`]).
fn no_log_cleanup() -> CommitProperties {
    CommitProperties::default().with_cleanup_expired_logs(Some(false))
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Appends to one table exactly once per progress version.
///
/// Reads the progress (Delta `txn` versions) other writers record in tables, again and again:
/// each table is loaded once and then brought up to date with the log entries added since.
#[derive(Default)]
pub struct ProgressReader {
    tables: std::collections::HashMap<TableId, DeltaTable>,
}

impl ProgressReader {
    /// The progress each of `app_ids` has recorded in table `id`, as of its latest version:
    /// `None` for an application id that never committed to it, all `None` when the table does
    /// not exist.
    pub async fn progress(
        &mut self,
        lake: &Lake,
        id: &TableId,
        app_ids: &[String],
    ) -> Result<Vec<Option<i64>>> {
        let delta = |action, source| Error::Delta {
            action,
            table: id.to_string(),
            source: Box::new(source),
        };
        let fresh = match self.tables.get_mut(id) {
            // Log entries since cleaned away (maintenance): load it again.
            Some(table) => table.update_state().await.is_ok(),
            None => false,
        };
        if !fresh {
            let Some(table) = lake.load(id).await? else {
                return Ok(vec![None; app_ids.len()]);
            };
            self.tables.insert(id.clone(), table);
        }
        let table = &self.tables[id];
        let snapshot = table.snapshot().map_err(|e| delta("reading", e))?;
        let mut out = Vec::new();
        for app_id in app_ids {
            out.push(
                snapshot
                    .transaction_version(table.log_store().as_ref(), app_id)
                    .await
                    .map_err(|e| delta("reading progress of", e))?,
            );
        }
        Ok(out)
    }
}

/// Rows carry a monotonically increasing progress column (`stream_seq`); a commit covering
/// progress up to `version` records `txn(app_id, version)`, and any later commit drops rows at or
/// below the recorded version before writing.
#[derive(Debug)]
pub struct TableWriter {
    lake: Lake,
    id: TableId,
    schema: SchemaRef,
    partitions: Vec<String>,
    app_id: String,
    table: DeltaTable,
    committed: Option<i64>,
    /// Set after a failed commit: the outcome is unknown until the log is read again.
    stale: bool,
}

/// How many times delta-rs retries a commit that lost a race before giving up; the engine retries
/// again with backoff after that.
const COMMIT_RETRIES: usize = 50;

impl TableWriter {
    pub fn id(&self) -> &TableId {
        &self.id
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The last progress version this table holds for the writer's application id.
    pub fn committed(&self) -> Option<i64> {
        self.committed
    }

    async fn read_committed(&self) -> Result<Option<i64>> {
        let snapshot = self
            .table
            .snapshot()
            .map_err(|source| self.delta("reading", source))?;
        snapshot
            .transaction_version(self.table.log_store().as_ref(), &self.app_id)
            .await
            .map_err(|source| self.delta("reading progress of", source))
    }

    fn delta(&self, action: &'static str, source: deltalake::DeltaTableError) -> Error {
        Error::Delta {
            action,
            table: self.id.to_string(),
            source: Box::new(source),
        }
    }

    /// Re-reads the log: after a failed commit whose outcome is unknown, or to see other writers.
    /// When the entries after the version this writer last read are gone (maintenance cleaned
    /// the log of a table this writer had not touched for longer than the log retention), the
    /// table is opened again from its newest checkpoint.
    pub async fn refresh(&mut self) -> Result<()> {
        if let Err(source) = self.table.update_state().await {
            tracing::info!(table = %self.id, error = %source, "reading the log from its newest checkpoint");
            self.table = self
                .lake
                .load(&self.id)
                .await?
                .ok_or_else(|| Error::UnknownTable(self.id.to_string()))?;
        }
        self.committed = self.read_committed().await?;
        self.stale = false;
        Ok(())
    }

    /// Commits the rows of `batch` whose `progress_column` is above the recorded version, and
    /// records `version` as the new progress. A zero-row commit still records progress.
    pub async fn commit(
        &mut self,
        batch: &RecordBatch,
        progress_column: &str,
        version: i64,
    ) -> Result<CommitOutcome> {
        self.commit_retrying(batch, Some(progress_column), version)
            .await
    }

    /// Commits every row of `batch` and records `version` as this writer's progress, unless the
    /// table already recorded `version` or later (then nothing is written). For rows whose own
    /// positions are not this writer's progress (alerts raised between messages, written under
    /// an application id of their own whose versions only count such commits).
    pub async fn commit_all(&mut self, batch: &RecordBatch, version: i64) -> Result<CommitOutcome> {
        self.commit_retrying(batch, None, version).await
    }

    async fn commit_retrying(
        &mut self,
        batch: &RecordBatch,
        progress_column: Option<&str>,
        version: i64,
    ) -> Result<CommitOutcome> {
        if self.stale {
            self.refresh().await?;
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.commit_once(batch, progress_column, version).await {
                // The log this writer read was cleaned, or another writer (maintenance's
                // retention deleting expired partitions) committed something delta-rs counts
                // as conflicting with a blind append: nothing of this commit landed. Read the log
                // again and try once more (the progress check skips what did land).
                Err(Error::Delta { source, .. }) if attempts < 4 && retry_at_once(&source) => {
                    tracing::info!(table = %self.id, error = %source, "committing again after another writer's commit");
                    self.refresh().await?;
                }
                other => return other,
            }
        }
    }

    async fn commit_once(
        &mut self,
        batch: &RecordBatch,
        progress_column: Option<&str>,
        version: i64,
    ) -> Result<CommitOutcome> {
        if self.committed.is_some_and(|c| c >= version) {
            return Ok(CommitOutcome::AlreadyCommitted);
        }
        let batch = match (self.committed, progress_column) {
            (Some(done), Some(progress_column)) => rows_after(batch, progress_column, done)
                .map_err(|source| Error::Schema {
                    table: self.id.to_string(),
                    source,
                })?,
            _ => batch.clone(),
        };
        let rows = batch.num_rows();
        // A pipeline that starts returning a new column adds it (nullable) to its table.
        self.write(batch, false, version, "committing to").await?;
        let version = self.table.version().unwrap_or_default();
        Ok(CommitOutcome::Committed { version, rows })
    }

    /// One commit of `batch` that records `version` as this writer's progress: appended (new
    /// columns merged in), or replacing the table's rows and schema.
    async fn write(
        &mut self,
        batch: RecordBatch,
        overwrite: bool,
        version: i64,
        action: &'static str,
    ) -> Result<()> {
        use deltalake::operations::write::SchemaMode;
        let (save, schema) = match overwrite {
            true => (SaveMode::Overwrite, SchemaMode::Overwrite),
            false => (SaveMode::Append, SchemaMode::Merge),
        };
        let result = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(save)
            .with_schema_mode(schema)
            .with_partition_columns(self.partitions.clone())
            .with_commit_properties(self.progress(version))
            .await;
        match result {
            Ok(table) => {
                self.table = table;
                self.committed = Some(version);
                Ok(())
            }
            Err(source) => {
                self.stale = true;
                Err(self.delta(action, source))
            }
        }
    }

    /// Commit properties that record `version` as this writer's progress (Delta `txn`).
    fn progress(&self, version: i64) -> CommitProperties {
        no_log_cleanup()
            .with_application_transaction(Transaction::new(&self.app_id, version))
            .with_max_retries(COMMIT_RETRIES)
    }

    /// Replaces the whole table (rows and schema) with `batch` in one commit that records
    /// `version` as the writer's progress: for re-deriving a table from its input. Readers see the
    /// old rows or the new, never a mix.
    pub async fn replace_all(&mut self, batch: &RecordBatch, version: i64) -> Result<()> {
        if self.stale {
            self.refresh().await?;
        }
        self.write(batch.clone(), true, version, "replacing").await
    }

    /// The lake this writer belongs to.
    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    fn side_path(name: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("{SIDE_DIR}/{name}"))
    }

    fn storage(&self, action: &'static str, source: object_store::Error) -> Error {
        self.delta(action, deltalake::DeltaTableError::ObjectStore { source })
    }

    /// Stores `bytes` as version `version` of the side file `kind` (e.g. a dedup snapshot),
    /// under `_fleetlake/` in the table's folder: hidden from Delta readers and from VACUUM.
    pub async fn put_side_file(&self, kind: &str, version: i64, bytes: Vec<u8>) -> Result<()> {
        let store = self.table.log_store().object_store(None);
        let path = Self::side_path(&format!("{kind}-{version:020}.bin"));
        object_store::ObjectStoreExt::put(store.as_ref(), &path, bytes.into())
            .await
            .map_err(|e| self.storage("writing a side file of", e))?;
        Ok(())
    }

    /// Versions of the side file `kind` stored so far, ascending.
    pub async fn side_file_versions(&self, kind: &str) -> Result<Vec<i64>> {
        use futures::TryStreamExt;
        let store = self.table.log_store().object_store(None);
        let prefix = object_store::path::Path::from(SIDE_DIR);
        let listed: Vec<_> = store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.storage("listing side files of", e))?;
        let mut versions: Vec<i64> = listed
            .iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?;
                name.strip_prefix(&format!("{kind}-"))?
                    .strip_suffix(".bin")?
                    .parse()
                    .ok()
            })
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    /// Reads one version of a side file.
    pub async fn get_side_file(&self, kind: &str, version: i64) -> Result<Vec<u8>> {
        let store = self.table.log_store().object_store(None);
        let path = Self::side_path(&format!("{kind}-{version:020}.bin"));
        let got = object_store::ObjectStoreExt::get(store.as_ref(), &path)
            .await
            .map_err(|e| self.storage("reading a side file of", e))?;
        let bytes = got
            .bytes()
            .await
            .map_err(|e| self.storage("reading a side file of", e))?;
        Ok(bytes.to_vec())
    }

    /// The newest version of side file `kind` at or below `at_most`, with its bytes: the
    /// snapshot to restore state from when the table has committed up to `at_most`.
    pub async fn latest_side_file(
        &self,
        kind: &str,
        at_most: i64,
    ) -> Result<Option<(i64, Vec<u8>)>> {
        let versions = self.side_file_versions(kind).await?;
        let Some(&v) = versions.iter().rev().find(|v| **v <= at_most) else {
            return Ok(None);
        };
        Ok(Some((v, self.get_side_file(kind, v).await?)))
    }

    /// Stores a snapshot as version `version` of side file `kind` and keeps only the newest
    /// two. A failure only means a longer rebuild after a restart, so it is logged, not returned.
    pub async fn store_snapshot(&self, kind: &str, version: i64, bytes: Vec<u8>) {
        if let Err(e) = self.put_side_file(kind, version, bytes).await {
            tracing::warn!(table = %self.id, kind, error = %e, "storing a snapshot failed");
            return;
        }
        if let Err(e) = self.prune_side_files(kind, 2).await {
            tracing::warn!(table = %self.id, kind, error = %e, "pruning old snapshots failed");
        }
    }

    /// Deletes all but the newest `keep` versions of a side file.
    pub async fn prune_side_files(&self, kind: &str, keep: usize) -> Result<()> {
        let versions = self.side_file_versions(kind).await?;
        let store = self.table.log_store().object_store(None);
        for v in versions.iter().take(versions.len().saturating_sub(keep)) {
            let path = Self::side_path(&format!("{kind}-{v:020}.bin"));
            object_store::ObjectStoreExt::delete(store.as_ref(), &path)
                .await
                .map_err(|e| self.storage("pruning side files of", e))?;
        }
        Ok(())
    }
}

/// Errors after which a commit is tried again at once: the log was cleaned under the writer, or
/// a concurrent commit conflicted (in both cases nothing of the commit landed).
fn retry_at_once(e: &deltalake::DeltaTableError) -> bool {
    use deltalake::kernel::transaction::TransactionError as T;
    matches!(
        e,
        deltalake::DeltaTableError::InvalidVersion(_)
            | deltalake::DeltaTableError::Transaction {
                source: T::CommitConflict(_)
            }
    )
}

/// Folder of fleetlake's own files beside a table's data, and at the lake's root (a leading `_`
/// hides it from Delta and from the zones' listings).
const SIDE_DIR: &str = "_fleetlake";

fn lake_file_error(action: &'static str, source: object_store::Error) -> Error {
    Error::Delta {
        action,
        table: SIDE_DIR.to_string(),
        source: Box::new(deltalake::DeltaTableError::ObjectStore { source }),
    }
}

/// Keeps the rows whose `column` (Int64) is greater than `after`.
fn rows_after(
    batch: &RecordBatch,
    column: &str,
    after: i64,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let values = batch
        .column_by_name(column)
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
        .ok_or_else(|| {
            arrow::error::ArrowError::SchemaError(format!("no Int64 column {column:?}"))
        })?;
    if values.null_count() == 0 && values.values().iter().all(|v| *v > after) {
        return Ok(batch.clone());
    }
    let keep: BooleanArray = values
        .iter()
        .map(|v| Some(v.is_some_and(|v| v > after)))
        .collect();
    filter_record_batch(batch, &keep)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::schema::{RAW_TELEMETRY, TableId};
    use arrow::array::{BinaryArray, Date32Array, StringArray, TimestampMicrosecondArray};
    use std::sync::Arc;

    fn raw_batch(seqs: &[i64]) -> RecordBatch {
        raw_batch_on(seqs, 19_000)
    }

    /// `raw.telemetry` rows with these stream sequences, received on `day` (days since 1970).
    pub(crate) fn raw_batch_on(seqs: &[i64], day: i32) -> RecordBatch {
        let n = seqs.len();
        RecordBatch::try_new(
            RAW_TELEMETRY.clone(),
            vec![
                Arc::new(BinaryArray::from_iter_values(seqs.iter().map(|_| b"{}"))),
                Arc::new(StringArray::from_iter_values(
                    seqs.iter().map(|_| "telemetry.x"),
                )),
                Arc::new(Int64Array::from(seqs.to_vec())),
                Arc::new(StringArray::from(vec![None::<&str>; n])),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![1_700_000_000_000_000; n])
                        .with_timezone("UTC"),
                ),
                Arc::new(Date32Array::from(vec![day; n])),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn replayed_batches_are_written_once_and_progress_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(&LakeConfig {
            location: dir.path().display().to_string(),
            ..Default::default()
        })
        .unwrap();
        let id = TableId::raw_telemetry();
        let mut w = lake
            .writer(
                id.clone(),
                RAW_TELEMETRY.clone(),
                vec!["ingest_date".into()],
                "app",
            )
            .await
            .unwrap();
        assert_eq!(w.committed(), None);
        let first = w
            .commit(&raw_batch(&[1, 2, 3]), "stream_seq", 3)
            .await
            .unwrap();
        assert!(matches!(first, CommitOutcome::Committed { rows: 3, .. }));
        // The same batch again: nothing written.
        assert_eq!(
            w.commit(&raw_batch(&[1, 2, 3]), "stream_seq", 3)
                .await
                .unwrap(),
            CommitOutcome::AlreadyCommitted
        );
        // A new writer (a restarted engine) sees the progress and skips the overlap.
        let mut w2 = lake
            .writer(
                id.clone(),
                RAW_TELEMETRY.clone(),
                vec!["ingest_date".into()],
                "app",
            )
            .await
            .unwrap();
        assert_eq!(w2.committed(), Some(3));
        let again = w2
            .commit(&raw_batch(&[2, 3, 4, 5]), "stream_seq", 5)
            .await
            .unwrap();
        assert!(
            matches!(again, CommitOutcome::Committed { rows: 2, .. }),
            "{again:?}"
        );
        // Progress only: a commit with no rows still moves the version.
        let empty = w2.commit(&raw_batch(&[]), "stream_seq", 9).await.unwrap();
        assert!(
            matches!(empty, CommitOutcome::Committed { rows: 0, .. }),
            "{empty:?}"
        );
        let info = lake.describe(&id).await.unwrap().unwrap();
        assert_eq!(info.rows, 5);
        let w3 = lake
            .writer(id, RAW_TELEMETRY.clone(), vec!["ingest_date".into()], "app")
            .await
            .unwrap();
        assert_eq!(w3.committed(), Some(9));
    }

    #[tokio::test]
    async fn side_files_are_listed_read_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(&LakeConfig {
            location: dir.path().display().to_string(),
            ..Default::default()
        })
        .unwrap();
        let w = lake
            .writer(
                TableId::raw_telemetry(),
                RAW_TELEMETRY.clone(),
                vec!["ingest_date".into()],
                "app",
            )
            .await
            .unwrap();
        for v in [7, 30, 12] {
            w.put_side_file("dedup-app", v, vec![v as u8])
                .await
                .unwrap();
        }
        w.put_side_file("other", 99, vec![]).await.unwrap();
        assert_eq!(
            w.side_file_versions("dedup-app").await.unwrap(),
            vec![7, 12, 30]
        );
        assert_eq!(w.get_side_file("dedup-app", 12).await.unwrap(), vec![12]);
        w.prune_side_files("dedup-app", 2).await.unwrap();
        assert_eq!(
            w.side_file_versions("dedup-app").await.unwrap(),
            vec![12, 30]
        );
        // Delta readers do not see them.
        assert_eq!(
            lake.describe(&TableId::raw_telemetry())
                .await
                .unwrap()
                .unwrap()
                .files,
            0
        );
    }

    #[test]
    fn bad_locations_are_explained() {
        let err = Lake::open(&LakeConfig {
            location: "ftp://x/y".into(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("unsupported scheme"), "{err}");
        let err = Lake::open(&LakeConfig {
            location: "s3:///nobucket".into(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("bucket is missing"), "{err}");
    }
}
