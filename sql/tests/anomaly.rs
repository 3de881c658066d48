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
        // Each file twice: in the session pipelines and rules get, and in an ad-hoc query's
        // (window operators under a bounded memory pool, sized scalar functions), which must
        // answer the same.
        for bounded in [false, true] {
            let mut runner = sqllogictest::Runner::new(|| async move {
                let config = SessionConfig::new().with_target_partitions(1);
                let ctx = if bounded {
                    let engine = fleetlake_sql::memory::EngineMemory::new(256 << 20);
                    let pool = fleetlake_sql::memory::QueryPool::new(Some(64 << 20), Some(engine));
                    fleetlake_sql::session::query_context(config, pool).expect("query session")
                } else {
                    fleetlake_sql::session::context(config)
                };
                Ok(Fleetlake { ctx })
            });
            if let Err(e) = runner.run_file_async(&file).await {
                panic!("{} (bounded pool: {bounded}): {e}", file.display());
            }
        }
    }
}

/// Under a 16 MiB pool, each allocation DataFusion's pool does not see by itself is refused
/// before it grows past the pool: window operators buffering their input (DataFusion's own and
/// fleetlake's anomaly functions) and a scalar function asked for one huge value. The same
/// statements over small inputs still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffering_operators_and_huge_values_are_held_to_the_query_pool() {
    let session = || {
        let engine = fleetlake_sql::memory::EngineMemory::new(1 << 30);
        let pool = fleetlake_sql::memory::QueryPool::new(Some(16 << 20), Some(engine));
        // One partition: no repartitioning between the scan and the window (whose buffers
        // DataFusion reserves itself), as for a table of one file.
        let config = SessionConfig::new().with_target_partitions(1);
        fleetlake_sql::session::query_context(config, pool).expect("query session")
    };
    let run = |sql: String| async move {
        let ctx = session();
        let df = ctx.sql(&sql).await?;
        let batches = df.collect().await?;
        let value = arrow::util::pretty::pretty_format_batches(&batches)?.to_string();
        Ok::<_, datafusion::error::DataFusionError>(value)
    };
    let cases = [
        "SELECT max(s) FROM (SELECT sum(value) OVER () AS s FROM generate_series(1, {n}))",
        "SELECT max(r) FROM (SELECT row_number() OVER (PARTITION BY value % 3 ORDER BY value) AS r FROM generate_series(1, {n}))",
        "SELECT max(z) FROM (SELECT robust_zscore(CAST(value AS DOUBLE)) OVER () AS z FROM generate_series(1, {n}))",
        "SELECT max(z) FROM (SELECT zscore(CAST(value AS DOUBLE)) OVER (PARTITION BY value % 2) AS z FROM generate_series(1, {n}))",
        "SELECT length(repeat('x', {n} * 100))",
        "SELECT length(lpad('x', {n} * 100, 'y'))",
        "SELECT cardinality(range({n} * 1000))",
        "SELECT length(replace(repeat('a', {n}), 'a', repeat('b', 1000)))",
        // A scalar argument the function broadcasts to every row of the batch.
        "SELECT max(length(lpad(CAST(value AS VARCHAR), 5, repeat('x', {n})))) FROM generate_series(1, 10000)",
    ];
    let mut failed = Vec::new();
    for case in cases {
        let small = run(case.replace("{n}", "1000")).await;
        assert!(small.is_ok(), "{case} over 1,000: {small:?}");
        let large = run(case.replace("{n}", "4000000")).await;
        match large {
            Err(e) if e.to_string().contains("Resources exhausted") => {
                eprintln!("{case}: {e}")
            }
            other => failed.push(format!("{case} over 4,000,000 was not refused: {other:?}")),
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
    // Steps of months or days far beyond the nanosecond range are estimated without overflow
    // (a panic before DataFusion's own answer) and as the one element they are, not refused.
    for step in ["4000 months", "200000 days"] {
        let sql = format!(
            "SELECT cardinality(generate_series(TIMESTAMP '2000-01-01', TIMESTAMP '2001-01-01', INTERVAL '{step}'))"
        );
        let answer = format!("{:?}", run(sql).await);
        assert!(!answer.contains("Resources exhausted"), "{step}: {answer}");
    }
}
