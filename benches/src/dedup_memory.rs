//! Memory of the dedup state: bytes per device for a large fleet.
//!
//! ```text
//! cargo run --release -p fleetlake-benches --bin dedup_memory -- --devices 1000000 --readings 20
//! ```
//!
//! Feeds `readings` per device (every 10th device with a lost reading, so it carries one gap)
//! through [`fleetlake_sql::DedupState`], in usable-shaped batches, and reports the resident
//! memory it added (from /proc/self/statm) and the state's own estimate, per device. Prints one
//! JSON line.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use fleetlake_sql::{DedupKey, DedupState};

#[path = "rss.rs"]
mod rss;
use rss::resident_bytes;

/// Resident memory of the dedup state per device.
#[derive(clap::Parser)]
#[command(name = "dedup_memory", about)]
struct Args {
    /// Devices in the fleet.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    devices: u64,
    /// Readings per device.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..))]
    readings: i64,
}

fn main() {
    let Args { devices, readings } = <Args as clap::Parser>::parse();
    let schema = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("msg_id", DataType::Utf8, true),
        Field::new(
            "received_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]));
    let mut state = DedupState::new(
        DedupKey::DeviceSeq,
        fleetlake_sql::dedup::DEFAULT_MAX_GAPS,
        60,
    );
    let before = resident_bytes();
    let chunk = 100_000u64;
    for seq in 1..=readings {
        let mut start = 0;
        while start < devices {
            let end = (start + chunk).min(devices);
            // Every 10th device lost reading 2: it keeps one gap.
            let ids: Vec<u64> = (start..end)
                .filter(|d| !(seq == 2 && d % 10 == 0))
                .collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter_values(
                        ids.iter().map(|d| format!("dev-{d:07}")),
                    )),
                    Arc::new(Int64Array::from(vec![seq; ids.len()])),
                    Arc::new(StringArray::from(vec![None::<&str>; ids.len()])),
                    Arc::new(
                        TimestampMicrosecondArray::from(vec![0; ids.len()]).with_timezone("UTC"),
                    ),
                ],
            )
            .expect("batch");
            state.filter(&batch).expect("dedup");
            start = end;
        }
    }
    let after = resident_bytes();
    let snapshot = state.encode().len();
    let result = serde_json::json!({
        "benchmark": "dedup_memory",
        "devices": devices,
        "readings_per_device": readings,
        "resident_bytes_added": after.saturating_sub(before),
        "resident_bytes_per_device": (after.saturating_sub(before) as f64 / devices as f64).round(),
        "estimated_bytes_per_device": (state.estimated_bytes() as f64 / devices as f64).round(),
        "snapshot_bytes_per_device": (snapshot as f64 / devices as f64).round(),
    });
    println!("{result}");
}
