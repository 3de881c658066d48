//! The cost of one micro-batch in a window table: the time of `WindowOperator::process` for
//! micro-batches of 1, 100 and 2,000 readings (1,000 devices, one-minute tumbling windows with
//! count, min, max, avg and last_value). The 1-reading time is the fixed cost per micro-batch
//! and window.
//!
//! ```text
//! cargo run --release -p fleetlake-benches --bin window_step
//! ```
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use fleetlake_sql::pipeline::parse_file;
use fleetlake_sql::window::WindowOperator;
use fleetlake_zones::TableId;

#[tokio::main]
async fn main() {
    let schema = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("v", DataType::Float64, true),
        Field::new("stream_seq", DataType::Int64, false),
    ]));
    let file = parse_file("CREATE WINDOW TABLE final.w WITH (window = 'tumbling', size = '1m', event_time = 'ts') AS SELECT window_start, window_end, device_id, count(*) AS n, min(v) AS lo, max(v) AS hi, avg(v) AS a, last_value(v ORDER BY ts) AS l FROM usable.r GROUP BY window_start, window_end, device_id").unwrap();
    let def = &file.windows[0];
    let mut op = WindowOperator::new(def, TableId::parse("usable.r").unwrap(), &schema, &[])
        .await
        .unwrap();
    let mut seq = 0i64;
    for rows in [1usize, 100, 2000] {
        let n = 200;
        let start = Instant::now();
        for _ in 0..n {
            let mut dev = Vec::new();
            let mut ts = Vec::new();
            let mut v = Vec::new();
            let mut s = Vec::new();
            for i in 0..rows {
                seq += 1;
                dev.push(format!("d{}", i % 1000));
                ts.push(1_700_000_000_000_000 + seq * 1_000);
                v.push(i as f64);
                s.push(seq);
            }
            let b = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(dev)),
                    Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
                    Arc::new(Float64Array::from(v)),
                    Arc::new(Int64Array::from(s)),
                ],
            )
            .unwrap();
            op.process(&b, &[]).await.unwrap();
        }
        println!(
            "{rows} rows/batch: {:.3} ms per process()",
            start.elapsed().as_secs_f64() * 1000.0 / n as f64
        );
    }
}
