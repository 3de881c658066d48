//! Golden tests of the shipped pipelines: input messages → expected usable rows and quarantine
//! rows (see `tests/pipelines/golden/README.md` for the file formats).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use fleetlake_sql::pipeline::{PipelineRunner, check_files};
use fleetlake_zones::TableId;
use fleetlake_zones::schema::{RawMessage, raw_batch};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn to_csv(batch: &RecordBatch) -> String {
    let mut out = Vec::new();
    {
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut out);
        w.write(batch).unwrap();
    }
    String::from_utf8(out).unwrap()
}

/// The columns of `batch` named in the first line of `expected`, as CSV.
fn project(batch: &RecordBatch, expected: &str) -> String {
    let names: Vec<&str> = expected.lines().next().unwrap().split(',').collect();
    let indices: Vec<usize> = names
        .iter()
        .map(|n| {
            batch
                .schema()
                .index_of(n)
                .unwrap_or_else(|_| panic!("no column {n}"))
        })
        .collect();
    // In stream order (a join does not keep it).
    let seq = batch.column_by_name("stream_seq").expect("stream_seq");
    let order = arrow::compute::sort_to_indices(seq, None, None).unwrap();
    let sorted = arrow::compute::take_record_batch(batch, &order).unwrap();
    let projected = sorted.project(&indices).unwrap();
    if projected.num_rows() == 0 {
        return format!("{}\n", names.join(","));
    }
    to_csv(&projected)
}

async fn golden(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let pipelines = root().join("../pipelines");
    let reports = check_files(&[
        pipelines.join("reference.sql"),
        pipelines.join(format!("{name}.sql")),
    ])
    .await;
    let checked = reports
        .iter()
        .find_map(|r| r.pipeline.clone())
        .expect("the pipeline checks");
    let runner = PipelineRunner::new(&checked).unwrap();

    let messages: Vec<RawMessage> = std::fs::read_to_string(dir.join("input.ndjson"))
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let payload = match v.get("raw") {
                Some(raw) => raw.as_str().unwrap().as_bytes().to_vec(),
                None => v["payload"].to_string().into_bytes(),
            };
            RawMessage {
                payload,
                subject: v["subject"].as_str().unwrap().to_string(),
                stream_seq: i as i64 + 1,
                msg_id: None,
                received_at_us: 1_763_892_000_000_000,
            }
        })
        .collect();
    let mut references: Vec<(TableId, Arc<dyn TableProvider>)> = Vec::new();
    for r in runner.references() {
        let file = dir.join(format!("{}.{}.csv", r.table.zone.as_str(), r.table.name));
        let schema: Arc<Schema> = r.schema();
        let reader = arrow::csv::ReaderBuilder::new(schema.clone())
            .with_header(true)
            .build(std::fs::File::open(&file).unwrap())
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        references.push((
            r.table.clone(),
            Arc::new(MemTable::try_new(schema, vec![batches]).unwrap()),
        ));
    }
    let mut dedup = runner.new_dedup_state(64);
    let out = runner
        .run(&raw_batch(&messages), &references, dedup.as_mut())
        .await
        .unwrap()
        .expect("no FAIL expectation");

    let mut mismatches = Vec::new();
    for table in &out.tables {
        let file = dir.join(format!("expected.{}.csv", table.table));
        let expected = std::fs::read_to_string(&file).unwrap();
        let actual = project(&table.rows, &expected);
        if actual != expected {
            mismatches.push(format!(
                "{}:\n--- expected\n{expected}--- actual\n{actual}",
                file.display()
            ));
        }
    }
    let file = dir.join("expected.quarantine.csv");
    let expected = std::fs::read_to_string(&file).unwrap();
    let actual = project(&out.quarantine, &expected);
    if actual != expected {
        mismatches.push(format!(
            "{}:\n--- expected\n{expected}--- actual\n{actual}",
            file.display()
        ));
    }
    mismatches
}

#[tokio::test]
async fn shipped_pipelines_turn_golden_inputs_into_golden_rows() {
    let dirs = [
        root().join("tests/pipelines/golden/cold_chain"),
        root().join("tests/pipelines/golden/device_health"),
    ];
    let mut mismatches = Vec::new();
    for dir in &dirs {
        mismatches.extend(golden(dir).await);
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
