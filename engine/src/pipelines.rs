//! The pipeline stage of ingest: routes each message to the declared pipelines whose subject
//! filter matches it, runs them, and holds the writers of their usable tables.
//!
//! Reference tables are read from the lake and kept as in-memory tables; each batch checks their
//! Delta version and reloads one that changed, so an upload (`PUT /v1/reference/…`) or any new
//! Delta version is seen by the next batch without a restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use fleetlake_sql::QueryEngine;
use fleetlake_sql::pipeline::run::ExpectationCount;
use fleetlake_sql::pipeline::{PipelineFailure, PipelineRunner, ReferenceDef};
use fleetlake_zones::lake::TableWriter;
use fleetlake_zones::{Lake, TableId};

/// One pipeline with the writers of its tables (in the order of its `CREATE STREAMING TABLE`s).
pub struct Pipeline {
    pub runner: PipelineRunner,
    pub writers: Vec<TableWriter>,
}

/// What the pipelines made of one batch.
pub struct StageOutput {
    /// For each pipeline, for each of its tables: the rows to commit.
    pub tables: Vec<Vec<RecordBatch>>,
    pub quarantine: Vec<RecordBatch>,
    /// What each pipeline did with the batch (recorded once the batch is committed).
    pub counts: Vec<PipelineCounts>,
}

/// What one pipeline did with one batch.
#[derive(Debug, Clone, Default)]
pub struct PipelineCounts {
    pub name: String,
    pub rows_in: u64,
    pub rows_out: u64,
    pub quarantined: u64,
    pub dropped: u64,
    pub warned: u64,
    pub expectations: Vec<ExpectationCount>,
}

/// All declared pipelines, their writers and the reference tables they read.
pub struct PipelineStage {
    pub pipelines: Vec<Pipeline>,
    lake: Lake,
    declared: Vec<ReferenceDef>,
    references: BTreeMap<TableId, (Option<u64>, Arc<dyn TableProvider>)>,
}

impl PipelineStage {
    pub async fn open(
        lake: &Lake,
        runners: &[PipelineRunner],
        app_id: &str,
    ) -> fleetlake_zones::Result<Self> {
        let mut pipelines = Vec::new();
        let mut declared: Vec<ReferenceDef> = Vec::new();
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
            for r in runner.references() {
                if !declared.iter().any(|d| d.table == r.table) {
                    declared.push(r.clone());
                }
            }
            pipelines.push(Pipeline {
                runner: runner.clone(),
                writers,
            });
        }
        Ok(Self {
            pipelines,
            lake: lake.clone(),
            declared,
            references: BTreeMap::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.pipelines.is_empty()
    }

    /// The lowest progress any pipeline table has recorded (`None` = no tables).
    pub fn committed_min(&self) -> Option<i64> {
        self.pipelines
            .iter()
            .flat_map(|p| &p.writers)
            .map(|w| w.committed().unwrap_or(0))
            .min()
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
    async fn refresh_references(
        &mut self,
    ) -> Result<Vec<(TableId, Arc<dyn TableProvider>)>, String> {
        for def in &self.declared {
            let info = self
                .lake
                .describe(&def.table)
                .await
                .map_err(|e| e.to_string())?;
            let version = info.map(|i| i.version);
            let current = self.references.get(&def.table).map(|(v, _)| *v);
            if current == Some(version) {
                continue;
            }
            let provider: Arc<dyn TableProvider> = match version {
                None => Arc::new(
                    MemTable::try_new(def.schema(), vec![vec![]]).map_err(|e| e.to_string())?,
                ),
                Some(_) => {
                    let rows = QueryEngine::new(self.lake.clone())
                        .query(&format!("SELECT * FROM {}", def.table))
                        .await
                        .map_err(|e| format!("reading {}: {e}", def.table))?;
                    Arc::new(
                        MemTable::try_new(rows.schema, vec![rows.batches])
                            .map_err(|e| e.to_string())?,
                    )
                }
            };
            tracing::info!(table = %def.table, ?version, "reference table loaded");
            self.references
                .insert(def.table.clone(), (version, provider));
        }
        Ok(self
            .references
            .iter()
            .map(|(id, (_, p))| (id.clone(), p.clone()))
            .collect())
    }

    /// Runs every pipeline over the rows of `raw` it claims. `Err` is an outside failure (the
    /// reference tables could not be read); `Ok(Err)` a `FAIL` expectation.
    pub async fn process(
        &mut self,
        raw: &RecordBatch,
    ) -> Result<Result<StageOutput, PipelineFailure>, String> {
        let references = self.refresh_references().await?;
        let subjects = raw
            .column_by_name("subject")
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
            .ok_or("raw batch without subjects")?
            .clone();
        let mut out = StageOutput {
            tables: Vec::new(),
            quarantine: Vec::new(),
            counts: Vec::new(),
        };
        for p in &self.pipelines {
            let mask: BooleanArray = (0..subjects.len())
                .map(|i| Some(p.runner.claims(subjects.value(i))))
                .collect();
            let rows = filter_record_batch(raw, &mask).map_err(|e| e.to_string())?;
            let result = p
                .runner
                .run(&rows, &references)
                .await
                .map_err(|e| format!("pipeline {}: {e}", p.runner.name))?;
            let output = match result {
                Ok(o) => o,
                Err(failure) => return Ok(Err(failure)),
            };
            out.counts.push(PipelineCounts {
                name: p.runner.name.clone(),
                rows_in: output.rows_in,
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
