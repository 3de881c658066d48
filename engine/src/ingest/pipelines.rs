//! The pipeline stage of ingest: routes each message to the declared pipelines whose subject
//! filter matches it and runs them. The writers of their tables are opened here and handed to
//! the committer ([`crate::ingest::commit`]).
//!
//! Reference tables are read from the lake and kept as in-memory tables; each batch checks their
//! Delta version and reloads one that changed, so an upload (`PUT /v1/reference/…`) or any new
//! Delta version is seen by the next batch without a restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use fleetlake_sql::pipeline::{PipelineFailure, PipelineRunner, ReferenceDef};
use fleetlake_sql::{DedupState, QueryEngine};
use fleetlake_zones::lake::TableWriter;
use fleetlake_zones::schema::as_raw_batch;
use fleetlake_zones::{Lake, TableId};

use crate::error::{Context, Error};
use crate::ingest::commit::Snapshot;
use crate::metrics::PipelineCounts;

/// One pipeline; the writers of its tables are the committer's.
pub struct Pipeline {
    pub runner: PipelineRunner,
    /// Replays seen (per the source's `dedup_key`); `None` for `dedup_key = 'none'`.
    pub dedup: Option<DedupState>,
}

impl Pipeline {
    /// The ids of the pipeline's tables, in the order of its `CREATE STREAMING TABLE`s.
    pub fn tables(&self) -> impl Iterator<Item = &TableId> {
        self.runner.tables.iter().map(|t| &t.def.table)
    }
}

/// What the pipelines made of one batch.
pub struct StageOutput {
    /// For each pipeline, for each of its tables: the rows to commit.
    pub tables: Vec<Vec<RecordBatch>>,
    pub quarantine: Vec<RecordBatch>,
    /// What each pipeline did with the batch (recorded once the batch is committed).
    pub counts: Vec<PipelineCounts>,
    /// The reference tables the batch was enriched with (windows and rules read them too).
    pub references: Vec<(TableId, Arc<dyn TableProvider>)>,
}

impl StageOutput {
    /// The same pipelines and tables with no rows yet (and the same reference tables).
    pub fn clone_shape(&self) -> Self {
        Self {
            tables: self
                .tables
                .iter()
                .map(|t| {
                    t.iter()
                        .map(|r| RecordBatch::new_empty(r.schema()))
                        .collect()
                })
                .collect(),
            quarantine: Vec::new(),
            counts: Vec::new(),
            references: self.references.clone(),
        }
    }
}

/// Why the pipeline stage could not process a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StageError {
    /// The reference tables could not be read (an outside system): nothing has changed, the
    /// batch may be retried.
    #[error("reading the reference tables: {0}")]
    Storage(String),
    /// A pipeline failed in a way retrying cannot fix (row-level errors are quarantined, not
    /// reported here); pipelines' state may have advanced, so the batch must not be retried in
    /// this process: ingest stops, and a restart rebuilds the state from the lake.
    #[error("{0}")]
    Failed(String),
}

/// What `serve` runs: the pipelines, and the window tables and rules over their tables.
#[derive(Default, Clone)]
pub struct Declared {
    pub runners: Vec<PipelineRunner>,
    pub windows: Vec<fleetlake_sql::pipeline::CheckedWindow>,
    pub rules: Vec<fleetlake_sql::pipeline::CheckedRule>,
}

/// The reference tables the pipelines declare, each loaded into memory and loaded again only
/// when its Delta version changes.
pub struct References {
    lake: Lake,
    declared: Vec<ReferenceDef>,
    loaded: BTreeMap<TableId, (Option<u64>, Arc<dyn TableProvider>)>,
}

impl References {
    /// The reference tables `runners` declare (each once); nothing is loaded yet.
    pub fn new(lake: &Lake, runners: &[PipelineRunner]) -> Self {
        let mut declared: Vec<ReferenceDef> = Vec::new();
        for r in runners.iter().flat_map(|r| r.references()) {
            if !declared.iter().any(|d| d.table == r.table) {
                declared.push(r.clone());
            }
        }
        Self {
            lake: lake.clone(),
            declared,
            loaded: BTreeMap::new(),
        }
    }

    /// Brings the reference tables up to their latest Delta versions.
    pub async fn refresh(&mut self) -> Result<Vec<(TableId, Arc<dyn TableProvider>)>, Error> {
        for def in &self.declared {
            let info = self.lake.describe(&def.table).await?;
            let version = info.map(|i| i.version);
            let current = self.loaded.get(&def.table).map(|(v, _)| *v);
            if current == Some(version) {
                continue;
            }
            let provider = load_reference(&self.lake, def, version.is_some()).await?;
            tracing::info!(table = %def.table, ?version, "reference table loaded");
            self.loaded.insert(def.table.clone(), (version, provider));
        }
        Ok(self
            .loaded
            .iter()
            .map(|(id, (_, p))| (id.clone(), p.clone()))
            .collect())
    }
}

/// All declared pipelines, their writers and the reference tables they read.
pub struct PipelineStage {
    pub pipelines: Vec<Pipeline>,
    lake: Lake,
    references: References,
    app_id: String,
    /// The partition ingest consumes, if it consumes one: state is rebuilt from its rows only.
    partition: Option<crate::config::partition::Partition>,
}

fn snapshot_kind(app_id: &str, pipeline: &str) -> String {
    format!("dedup-{app_id}-{pipeline}")
}

/// A pipeline's dedup state as of stream sequence `upto` (the position every table has
/// committed: the consumer resumes after it, and the messages after it must be judged again as
/// they were the first time, for the tables that are behind): the newest snapshot at or below
/// it, then the raw messages of the pipeline up to `upto` after that snapshot, decoded again.
async fn load_dedup(
    lake: &Lake,
    app_id: &str,
    p: &mut Pipeline,
    first: &TableWriter,
    upto: i64,
    partition: Option<crate::config::partition::Partition>,
) -> Result<(), Error> {
    let Some(state) = p.dedup.as_mut() else {
        return Ok(());
    };
    let kind = snapshot_kind(app_id, &p.runner.name);
    let mut since = 0;
    let snapshot = first.latest_side_file(&kind, upto).await?;
    if let Some((v, bytes)) = snapshot {
        match state.restore(&bytes) {
            Ok(restored) => {
                *state = restored;
                since = v;
            }
            Err(e) => {
                tracing::warn!(pipeline = %p.runner.name, error = %e, "ignoring a dedup snapshot; rebuilding")
            }
        }
    }
    if upto > since {
        let query = QueryEngine::new(lake.clone());
        for raw in raw_rows(&query, &p.runner, since + 1, upto, partition).await? {
            p.runner.observe(&raw, state)?;
        }
        tracing::info!(pipeline = %p.runner.name, since, upto, "pipeline dedup state rebuilt from raw.telemetry");
    }
    Ok(())
}

impl PipelineStage {
    pub async fn open(
        lake: &Lake,
        runners: &[PipelineRunner],
        app_id: &str,
        max_gaps: usize,
        partition: Option<crate::config::partition::Partition>,
    ) -> Result<(Self, Vec<TableWriter>), Error> {
        let mut pipelines = Vec::new();
        let mut all_writers = Vec::new();
        for runner in runners {
            let mut writers = Vec::new();
            for table in &runner.tables {
                writers.push(
                    lake.writer(
                        table.def.table.clone(),
                        table.schema.clone(),
                        table.partitions(),
                        app_id,
                    )
                    .await?,
                );
            }
            pipelines.push(Pipeline {
                runner: runner.clone(),
                dedup: runner.new_dedup_state(max_gaps),
            });
            all_writers.extend(writers);
        }
        let stage = Self {
            pipelines,
            lake: lake.clone(),
            references: References::new(lake, runners),
            app_id: app_id.to_string(),
            partition,
        };
        Ok((stage, all_writers))
    }

    /// Loads each pipeline's dedup state as of `upto`, the position every table has committed
    /// (see [`load_dedup`]); `writers` are the committer's, which hold the snapshots.
    pub async fn load_dedup(&mut self, writers: &[&TableWriter], upto: i64) -> Result<(), Error> {
        for p in &mut self.pipelines {
            let Some(first) = p.runner.tables.first().map(|t| &t.def.table) else {
                continue;
            };
            let Some(writer) = writers.iter().find(|w| w.id() == first) else {
                continue;
            };
            load_dedup(&self.lake, &self.app_id, p, writer, upto, self.partition).await?;
        }
        Ok(())
    }

    /// Each pipeline's dedup state, to store beside its first table once committed.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.pipelines
            .iter()
            .filter_map(|p| {
                Some(Snapshot {
                    tables: p.tables().cloned().collect(),
                    kind: snapshot_kind(&self.app_id, &p.runner.name),
                    bytes: p.dedup.as_ref()?.encode().into(),
                })
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.pipelines.is_empty()
    }

    /// Rows of `raw` that some pipeline claims.
    pub fn claimed(&self, subjects: &arrow::array::StringArray) -> Vec<bool> {
        (0..subjects.len())
            .map(|i| {
                self.pipelines
                    .iter()
                    .any(|p| p.runner.claims(subjects.value(i)))
            })
            .collect()
    }

    /// Brings the reference tables up to their latest Delta versions.
    pub async fn refresh_references(
        &mut self,
    ) -> Result<Vec<(TableId, Arc<dyn TableProvider>)>, Error> {
        self.references.refresh().await
    }

    /// Runs every pipeline over the rows of `raw` it claims. `Err` is an outside failure (the
    /// reference tables could not be read); `Ok(Err)` a `FAIL` expectation.
    pub async fn process(
        &mut self,
        raw: &RecordBatch,
    ) -> Result<Result<StageOutput, PipelineFailure>, StageError> {
        // Reading the reference tables is the only step that may fail for an outside reason,
        // and it comes before any pipeline's state (dedup) is touched: retrying it is safe.
        let references = self
            .refresh_references()
            .await
            .map_err(|e| StageError::Storage(e.to_string()))?;
        let mut out = StageOutput {
            tables: Vec::new(),
            quarantine: Vec::new(),
            counts: Vec::new(),
            references: references.clone(),
        };
        for p in &mut self.pipelines {
            let failed = |e: fleetlake_sql::Error| {
                StageError::Failed(format!("pipeline {}: {e}", p.runner.name))
            };
            let rows = p.runner.claimed_rows(raw).map_err(failed)?;
            let result = p
                .runner
                .run(&rows, &out.references, p.dedup.as_mut())
                .await
                .map_err(failed)?;
            let output = match result {
                Ok(o) => o,
                Err(failure) => return Ok(Err(failure)),
            };
            out.counts.push(PipelineCounts {
                name: p.runner.name.clone(),
                rows_in: output.rows_in,
                deduplicated: output.deduplicated,
                restarts: output.restarts,
                rows_out: output.tables.iter().map(|t| t.rows.num_rows() as u64).sum(),
                quarantined: output.quarantine.num_rows() as u64,
                dropped: output.tables.iter().map(|t| t.dropped).sum(),
                warned: output.tables.iter().map(|t| t.warned).sum(),
                expectations: output.expectations,
            });
            out.quarantine.push(output.quarantine);
            out.tables
                .push(output.tables.into_iter().map(|t| t.rows).collect());
        }
        Ok(Ok(out))
    }
}

/// A reference table as an in-memory table of its declared columns ([`conform`]); empty when it
/// does not `exist` yet.
pub async fn load_reference(
    lake: &Lake,
    def: &ReferenceDef,
    exists: bool,
) -> Result<Arc<dyn TableProvider>, Error> {
    let schema = def.schema();
    let mut batches = Vec::new();
    if exists {
        let rows = QueryEngine::new(lake.clone())
            .query(&format!("SELECT * FROM {}", def.table))
            .await
            .context(format!("reading {}", def.table))?;
        for b in &rows.batches {
            batches.push(conform(b, &schema, &def.table)?);
        }
    }
    Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
}

/// Rows of a reference table as its `CREATE REFERENCE TABLE` declares them: the declared columns,
/// in order, cast to the declared types (an upload infers its types: `5` is an integer even where
/// `DOUBLE` is declared). Queries were planned against the declaration, so they keep working
/// whatever an upload inferred. A declared column the upload lacks reads NULL; a value that does
/// not cast reads NULL too (both are logged).
fn conform(
    batch: &RecordBatch,
    schema: &arrow::datatypes::SchemaRef,
    table: &TableId,
) -> Result<RecordBatch, Error> {
    let options = arrow::compute::CastOptions {
        safe: true,
        ..Default::default()
    };
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) => {
                let cast = arrow::compute::cast_with_options(c, f.data_type(), &options)
                    .context(format!("{table}.{}", f.name()))?;
                if cast.null_count() > c.null_count() {
                    tracing::warn!(%table, column = %f.name(), "values that are not {} read NULL", f.data_type());
                }
                Ok(cast)
            }
            None => {
                tracing::warn!(%table, column = %f.name(), "the uploaded rows lack a declared column; it reads NULL");
                Ok(arrow::array::new_null_array(f.data_type(), batch.num_rows()))
            }
        })
        .collect::<Result<Vec<_>, Error>>()?;
    RecordBatch::try_new(schema.clone(), columns).context(table)
}

/// The raw messages of `runner`'s subjects with stream sequences in `[start, end]`, in order
/// (only `partition`'s, when ingest consumes one).
pub async fn raw_rows(
    query: &QueryEngine,
    runner: &PipelineRunner,
    start: i64,
    end: i64,
    partition: Option<crate::config::partition::Partition>,
) -> Result<Vec<RecordBatch>, Error> {
    // The partition's own messages: raw's own subjects decide.
    let batches = fleetlake_sql::restore::Committed::of(&TableId::raw_telemetry())
        .columns(&[
            "payload",
            "subject",
            "stream_seq",
            "msg_id",
            "received_at",
            "ingest_date",
        ])
        .range(start - 1, end)
        .partition(partition.map(Into::into))
        .read(query)
        .await?;
    let mut out = Vec::new();
    for batch in &batches {
        let raw = as_raw_batch(batch)?;
        let raw = runner.claimed_rows(&raw)?;
        if raw.num_rows() > 0 {
            out.push(raw);
        }
    }
    Ok(out)
}
