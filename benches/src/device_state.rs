//! The device state at fleet scale: point-lookup latency and the memory it takes.
//!
//! ```text
//! cargo run --release -p fleetlake-benches --bin device_state -- --devices 1000000 --rounds 3
//! ```
//!
//! Feeds `rounds` readings per device through [`fleetlake_sql::device_state::DeviceState`] in
//! micro-batches of 10,000 rows shaped like `usable.cold_chain` (14 columns: device, sequence,
//! time, temperature, door, position, battery, firmware, tenant, site, model, hardware revision,
//! date, stream sequence), each round replacing every device's reading (so compaction runs).
//! Reports the update rate, the resident memory the state added (from /proc/self/statm) per
//! device, the p50/p99/max of `lookup` (what `GET /v1/devices/{id}` does before writing JSON) over
//! 100,000 random devices, the time to build `final.device_state` for a query, and the snapshot's
//! size, the copy a flush makes on the ingest loop, and the encode (on a blocking thread) and
//! decode times. Prints one JSON line.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use fleetlake_sql::device_state::{DeviceState, Received};
use fleetlake_zones::TableId;

#[path = "rss.rs"]
mod rss;
use rss::resident_bytes;

/// Lookup latency and memory of the device state.
#[derive(clap::Parser)]
#[command(name = "device_state", about)]
struct Args {
    /// Devices in the fleet.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    devices: u64,
    /// Readings per device (each replaces the last).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i64).range(1..))]
    rounds: i64,
}

fn batch(
    schema: &Arc<Schema>,
    devices: std::ops::Range<u64>,
    round: i64,
    seq0: i64,
) -> RecordBatch {
    let n = devices.end - devices.start;
    let ids: Vec<String> = devices.clone().map(|d| format!("dev-{d:07}")).collect();
    let text = |f: &dyn Fn(u64) -> String| {
        Arc::new(StringArray::from_iter_values(devices.clone().map(f))) as ArrayRef
    };
    let float = |f: &dyn Fn(u64) -> f64| {
        Arc::new(Float64Array::from_iter_values(devices.clone().map(f))) as ArrayRef
    };
    let ts = 1_767_225_600_000_000 + round * 60_000_000;
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(ids.iter())),
            Arc::new(Int64Array::from_iter_values(std::iter::repeat_n(
                round, n as usize,
            ))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(std::iter::repeat_n(ts, n as usize))
                    .with_timezone("UTC"),
            ),
            float(&|d| (d % 100) as f64 / 10.0 + round as f64),
            Arc::new(BooleanArray::from_iter(
                devices.clone().map(|d| Some(d % 7 == 0)),
            )),
            float(&|d| 51.9 + (d % 1000) as f64 / 1e4),
            float(&|d| 4.4 + (d % 1000) as f64 / 1e4),
            float(&|d| 100.0 - (d % 50) as f64),
            text(&|d| format!("2.{}.0", d % 4)),
            text(&|d| format!("tenant-{}", d % 20)),
            text(&|d| format!("site-{}", d % 500)),
            text(&|d| ["RT-100", "RT-200", "RT-300"][(d % 3) as usize].to_string()),
            text(&|d| ["rev-A", "rev-B", "rev-C"][(d % 3) as usize].to_string()),
            Arc::new(Date32Array::from_iter_values(std::iter::repeat_n(
                20454, n as usize,
            ))),
            Arc::new(Int64Array::from_iter_values(
                (0..n as i64).map(|i| seq0 + i),
            )),
        ],
    )
    .expect("cold chain batch")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let Args { devices, rounds } = <Args as clap::Parser>::parse();
    let text = |n: &str| Field::new(n, DataType::Utf8, true);
    let double = |n: &str| Field::new(n, DataType::Float64, true);
    let schema = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        double("temperature_c"),
        Field::new("door_open", DataType::Boolean, true),
        double("lat"),
        double("lon"),
        double("battery"),
        text("fw"),
        text("tenant"),
        text("site"),
        text("model"),
        text("hw_rev"),
        Field::new("event_date", DataType::Date32, true),
        Field::new("stream_seq", DataType::Int64, false),
    ]));
    let table = TableId::parse("usable.cold_chain").expect("table");
    let mut state = DeviceState::new();
    let before = resident_bytes();
    let started = Instant::now();
    let step = 10_000u64;
    let mut seq = 1i64;
    for round in 1..=rounds {
        let mut d = 0;
        while d < devices {
            let end = (d + step).min(devices);
            let b = batch(&schema, d..end, round, seq);
            seq += (end - d) as i64;
            state
                .update(&table, &b, Received::All(round))
                .expect("update");
            d = end;
        }
        eprintln!("round {round} of {rounds}: {} devices", state.len());
    }
    let update_s = started.elapsed().as_secs_f64();
    let rss = resident_bytes().saturating_sub(before);
    // Point lookups of random devices (a fixed LCG, so runs compare).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut lat = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let id = format!("dev-{:07}", (x >> 33) % devices);
        let t = Instant::now();
        let v = state.lookup(&id);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(v.len(), 1);
    }
    lat.sort_by(f64::total_cmp);
    let t = Instant::now();
    let rows: usize = state
        .table()
        .expect("table")
        .iter()
        .map(|b| b.num_rows())
        .sum();
    let table_ms = t.elapsed().as_secs_f64() * 1e3;
    // What a flush does on the ingest loop (the rest is encoded on a blocking thread).
    let t = Instant::now();
    let view = state.view_all();
    let copy_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let bytes = view.encode().expect("encode");
    let encode_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let restored = DeviceState::decode(&bytes).expect("decode");
    let decode_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(restored.len(), state.len());
    assert_eq!(rows as u64, devices);
    println!(
        "{}",
        serde_json::json!({
            "devices": devices,
            "rounds": rounds,
            "updates_per_s": (devices as f64 * rounds as f64 / update_s).round(),
            "rss_bytes": rss,
            "rss_bytes_per_device": (rss as f64 / devices as f64).round(),
            "lookup_us": {"p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99), "max": lat[lat.len() - 1]},
            "device_state_table_ms": table_ms.round(),
            "snapshot_bytes": bytes.len(),
            "snapshot_copy_ms": copy_ms.round(),
            "snapshot_encode_ms": encode_ms.round(),
            "snapshot_decode_ms": decode_ms.round(),
        })
    );
}
