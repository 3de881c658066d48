//! Window semantics by example: each `tests/windows/*.slt` file declares a window table over
//! `usable.readings (device_id, ts, v, stream_seq)`, feeds it micro-batches of rows and says
//! which window rows each batch closes and how many readings were late (format: the comment at
//! the top of `tumbling.slt`).
//!
//! Every file is also run twice more — every row its own micro-batch, and all rows in one — and
//! must produce the same rows in total: the output does not depend on how the stream is cut.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use fleetlake_sql::pipeline::parse_file;
use fleetlake_sql::window::WindowOperator;
use fleetlake_zones::TableId;

fn input_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("v", DataType::Float64, true),
        Field::new("stream_seq", DataType::Int64, false),
    ]))
}

enum Step {
    Rows(Vec<String>),
    Closes(Vec<String>, usize),
    Late(u64, usize),
}

struct Spec {
    statement: String,
    steps: Vec<Step>,
}

fn parse(text: &str) -> Spec {
    let mut lines = text.lines().enumerate().peekable();
    let mut statement = String::new();
    let mut steps = Vec::new();
    let block = |lines: &mut std::iter::Peekable<std::iter::Enumerate<std::str::Lines<'_>>>| {
        let mut out = Vec::new();
        while let Some((_, l)) = lines.peek() {
            if l.trim().is_empty() {
                break;
            }
            out.push(l.trim().to_string());
            lines.next();
        }
        out
    };
    while let Some((n, line)) = lines.next() {
        let line = line.trim();
        let n = n + 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line {
            "statement" => statement = block(&mut lines).join("\n"),
            "rows" => steps.push(Step::Rows(block(&mut lines))),
            "closes nothing" => steps.push(Step::Closes(Vec::new(), n)),
            "closes" => steps.push(Step::Closes(block(&mut lines), n)),
            l if l.starts_with("late ") => {
                steps.push(Step::Late(l[5..].trim().parse().expect("late N"), n))
            }
            other => panic!("line {n}: unexpected {other:?}"),
        }
    }
    Spec { statement, steps }
}

fn batch(rows: &[String]) -> RecordBatch {
    let (mut seq, mut dev, mut ts, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        let f: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(f.len(), 4, "a row is: stream_seq device_id ts v, not {r:?}");
        seq.push(f[0].parse::<i64>().unwrap());
        dev.push(f[1].to_string());
        ts.push(if f[2] == "NULL" {
            None
        } else {
            let t = chrono::NaiveDateTime::parse_from_str(f[2], "%Y-%m-%dT%H:%M:%S").unwrap();
            Some(t.and_utc().timestamp_micros())
        });
        v.push(f[3].parse::<f64>().ok());
    }
    RecordBatch::try_new(
        input_schema(),
        vec![
            Arc::new(StringArray::from(dev)),
            Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
            Arc::new(Float64Array::from(v)),
            Arc::new(Int64Array::from(seq)),
        ],
    )
    .unwrap()
}

fn render(batch: &RecordBatch) -> Vec<String> {
    let options = FormatOptions::default().with_null("NULL");
    let formatters: Vec<ArrayFormatter<'_>> = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
        .collect();
    let mut out: Vec<String> = (0..batch.num_rows())
        .map(|i| {
            formatters
                .iter()
                .map(|f| f.value(i).to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    out.sort();
    out
}

async fn operator(spec: &Spec) -> WindowOperator {
    let file = parse_file(&spec.statement).expect("the statement parses");
    let def = file.windows.first().expect("a CREATE WINDOW TABLE");
    WindowOperator::new(
        def,
        TableId::parse("usable.readings").unwrap(),
        &input_schema(),
        &[],
    )
    .await
    .expect("the window plans")
}

fn files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/windows");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "the window specs are missing");
    files
}

#[tokio::test]
async fn window_specs() {
    for path in files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let spec = parse(&std::fs::read_to_string(&path).unwrap());
        let mut op = operator(&spec).await;
        let mut last = None;
        let mut all_rows = Vec::new();
        let mut all_closed = Vec::new();
        for step in &spec.steps {
            match step {
                Step::Rows(rows) => {
                    all_rows.extend(rows.iter().cloned());
                    let out = op.process(&batch(rows), &[]).await.unwrap();
                    all_closed.extend(render(&out.rows));
                    last = Some(out);
                }
                Step::Closes(expected, line) => {
                    let got = render(&last.as_ref().expect("rows before closes").rows);
                    let mut expected = expected.clone();
                    expected.sort();
                    assert_eq!(got, expected, "{name}:{line}: rows closed");
                }
                Step::Late(n, line) => {
                    let got = last.as_ref().expect("rows before late").late;
                    assert_eq!(got, *n, "{name}:{line}: late rows");
                }
            }
        }
        all_closed.sort();

        // The same stream, cut differently, closes the same windows.
        let mut one_by_one = operator(&spec).await;
        let mut closed = Vec::new();
        for r in &all_rows {
            let out = one_by_one
                .process(&batch(std::slice::from_ref(r)), &[])
                .await
                .unwrap();
            closed.extend(render(&out.rows));
        }
        closed.sort();
        assert_eq!(closed, all_closed, "{name}: one row per batch");

        // Snapshot and restore mid-stream: nothing is lost or repeated.
        let mut first = operator(&spec).await;
        let half = all_rows.len() / 2;
        let mut closed = render(
            &first
                .process(&batch(&all_rows[..half]), &[])
                .await
                .unwrap()
                .rows,
        );
        let mut second = operator(&spec).await;
        second.restore(&first.encode().unwrap()).unwrap();
        // Rows at or below the restored position are skipped, as after a restart.
        closed.extend(render(
            &second.process(&batch(&all_rows), &[]).await.unwrap().rows,
        ));
        closed.sort();
        let whole = render(
            &operator(&spec)
                .await
                .process(&batch(&all_rows), &[])
                .await
                .unwrap()
                .rows,
        );
        assert_eq!(closed, whole, "{name}: snapshot and restore");
        assert_eq!(whole, all_closed, "{name}: all rows in one batch");
    }
}

/// A snapshot taken under one definition is not restored under another (here: another size),
/// even where the state's columns would fit; the engine then rebuilds from the input's rows.
#[tokio::test]
async fn a_snapshot_of_another_definition_is_refused() {
    let statement = |size: &str| Spec {
        statement: format!(
            "CREATE WINDOW TABLE final.w WITH (window = 'tumbling', size = '{size}')
             AS SELECT window_start, window_end, device_id, count(*) AS n
             FROM usable.readings GROUP BY window_start, window_end, device_id"
        ),
        steps: Vec::new(),
    };
    let mut minute = operator(&statement("1m")).await;
    minute
        .process(&batch(&["1 a 2026-01-01T00:00:05 1.0".to_string()]), &[])
        .await
        .unwrap();
    let bytes = minute.encode().unwrap();
    operator(&statement("1m")).await.restore(&bytes).unwrap();
    let err = operator(&statement("5m"))
        .await
        .restore(&bytes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("definition changed"), "{err}");
}

/// A window joining a reference table, fed one micro-batch at a time: each reading is counted
/// once (the plan is made once and run again with each batch's rows).
#[tokio::test]
async fn a_window_joining_a_reference_table_counts_each_reading_once() {
    let file = parse_file(
        "CREATE WINDOW TABLE final.w WITH (window = 'tumbling', size = '1m')
         AS SELECT window_start, window_end, s.site, count(*) AS n, sum(x.v) AS total
         FROM usable.readings x JOIN reference.sites s ON x.device_id = s.device_id
         GROUP BY window_start, window_end, s.site",
    )
    .unwrap();
    let sites_schema = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, true),
        Field::new("site", DataType::Utf8, true),
    ]));
    let sites = RecordBatch::try_new(
        sites_schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["a", "b", "c"])),
            Arc::new(StringArray::from(vec!["north", "north", "south"])),
        ],
    )
    .unwrap();
    let refs: Vec<(TableId, Arc<dyn datafusion::catalog::TableProvider>)> = vec![(
        TableId::parse("reference.sites").unwrap(),
        Arc::new(
            datafusion::datasource::MemTable::try_new(sites_schema, vec![vec![sites]]).unwrap(),
        ),
    )];
    let mut op = WindowOperator::new(
        &file.windows[0],
        TableId::parse("usable.readings").unwrap(),
        &input_schema(),
        &refs,
    )
    .await
    .unwrap();
    let mut closed = Vec::new();
    for rows in [
        vec!["1 a 2026-01-01T00:00:05 1.0"],
        vec!["2 c 2026-01-01T00:00:10 10.0"],
        vec![
            "3 b 2026-01-01T00:00:20 100.0",
            "4 a 2026-01-01T00:00:30 1000.0",
        ],
        vec!["5 a 2026-01-01T00:01:05 0.0"],
    ] {
        let rows: Vec<String> = rows.into_iter().map(String::from).collect();
        closed.extend(render(
            &op.process(&batch(&rows), &refs).await.unwrap().rows,
        ));
    }
    closed.sort();
    assert_eq!(
        closed,
        [
            "2026-01-01T00:00:00Z 2026-01-01T00:01:00Z north 3 1101.0 5",
            "2026-01-01T00:00:00Z 2026-01-01T00:01:00Z south 1 10.0 5",
        ]
    );
}
