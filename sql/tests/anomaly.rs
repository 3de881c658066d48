//! The anomaly functions' semantics, by example: every `tests/anomaly/*.slt` file runs in a
//! fresh fleetlake session (the one ad-hoc queries, pipelines, windows and rules get), in the
//! sqllogictest format (<https://www.sqlite.org/sqllogictest/doc/trunk/about.wiki>):
//! `statement ok` runs a statement, `query <types>` compares rows after `----`; `R` is a float
//! column, `T` text, `I` integer, `B` boolean. Floats print as Rust prints them (`inf` for
//! infinity); NULL prints as `NULL`.

use std::path::PathBuf;

use arrow::array::{Array, RecordBatch};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::{SessionConfig, SessionContext};
use sqllogictest::{DBOutput, DefaultColumnType};

struct Fleetlake {
    ctx: SessionContext,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

fn cell(batch: &RecordBatch, column: usize, row: usize) -> String {
    let array = batch.column(column);
    if array.is_null(row) {
        return "NULL".into();
    }
    if let Some(f) = array.as_any().downcast_ref::<arrow::array::Float64Array>() {
        return format!("{}", f.value(row));
    }
    let options = FormatOptions::default();
    ArrayFormatter::try_new(array.as_ref(), &options)
        .expect("a formatter for every type")
        .value(row)
        .to_string()
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for Fleetlake {
    type Error = Failure;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, Failure> {
        let df = self
            .ctx
            .sql(sql)
            .await
            .map_err(|e| Failure(e.to_string()))?;
        let batches = df.collect().await.map_err(|e| Failure(e.to_string()))?;
        let Some(first) = batches.first() else {
            return Ok(DBOutput::StatementComplete(0));
        };
        let types = vec![DefaultColumnType::Any; first.num_columns()];
        let mut rows = Vec::new();
        for batch in &batches {
            for row in 0..batch.num_rows() {
                rows.push(
                    (0..batch.num_columns())
                        .map(|c| cell(batch, c, row))
                        .collect(),
                );
            }
        }
        Ok(DBOutput::Rows { types, rows })
    }

    fn engine_name(&self) -> &str {
        "fleetlake"
    }

    async fn shutdown(&mut self) {}
}

#[tokio::test]
async fn anomaly_functions_follow_their_slt_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/anomaly");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/anomaly")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    for file in files {
        let mut runner = sqllogictest::Runner::new(|| async {
            Ok(Fleetlake {
                ctx: fleetlake_sql::session::context(
                    SessionConfig::new().with_target_partitions(1),
                ),
            })
        });
        if let Err(e) = runner.run_file_async(&file).await {
            panic!("{}: {e}", file.display());
        }
    }
}
