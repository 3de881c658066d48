//! The fleet endpoints' latency over a large usable table, beside DuckDB over the same table's
//! Parquet files, in one run.
//!
//! ```text
//! cargo run --release -p fleetlake-benches --bin fleet_query -- --rows 20000000
//! ```
//!
//! Writes `usable.fleet_bench` (device_id, ts, temperature_c, cpu_pct, crashed, fw, hw_rev, model,
//! tenant, site; `--devices` devices reading once a minute, a drifting 0.1% and one crashing
//! firmware × hardware revision) into a fresh local lake with fleetlake's own writer, starts a
//! query-only engine and times `GET /v1/fleet/outliers` and `GET /v1/fleet/root-cause`
//! (`--runs` times each, after one warm-up), then has DuckDB (Python package, `benches/python/
//! fleet_duckdb.py`) run the same questions over the Parquet files the Delta log lists: the
//! root-cause statement fleetlake answered with, as it is; the outliers statement with DuckDB's
//! `median`/`mad` in place of fleetlake's `robust_zscore` and `cohort_outlier`. Prints a Markdown
//! table and one JSON line with the medians and the ratios.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use clap::Parser;
use fleetlake::config::Config;
use fleetlake::serve::Engine;
use fleetlake_zones::{Lake, LakeConfig, TableId};

#[derive(Parser)]
#[command(about = "Fleet endpoint latency over a large usable table, beside DuckDB")]
struct Args {
    /// Rows in the table.
    #[arg(long, default_value_t = 20_000_000)]
    rows: u64,
    /// Devices in the fleet (each reads rows / devices times).
    #[arg(long, default_value_t = 100_000)]
    devices: u64,
    /// Timed runs per question (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Rows per commit while writing the table.
    #[arg(long, default_value_t = 1_000_000)]
    batch: u64,
}

const FIRMWARE: [&str; 4] = ["1.8.2", "1.9.0", "2.0.1", "2.1.0"];
const HARDWARE: [&str; 3] = ["rev-A", "rev-B", "rev-C"];
const MODELS: [&str; 3] = ["RT-100", "RT-200", "RT-300"];

/// SplitMix64 (the simulator's generator).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(seed: u64) -> f64 {
    (mix(seed) >> 11) as f64 / (1u64 << 53) as f64
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("temperature_c", DataType::Float64, true),
        Field::new("cpu_pct", DataType::Float64, true),
        Field::new("crashed", DataType::Boolean, false),
        Field::new("fw", DataType::Utf8, true),
        Field::new("hw_rev", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, true),
        Field::new("tenant", DataType::Utf8, true),
        Field::new("site", DataType::Utf8, true),
        Field::new("stream_seq", DataType::Int64, false),
        Field::new("event_date", DataType::Date32, false),
    ]))
}

/// Rows `from..to` of the table: row i is reading i / devices of device i % devices.
fn rows(from: u64, to: u64, devices: u64) -> RecordBatch {
    let start_us: i64 = 1_764_460_800_000_000; // 2025-11-30T00:00:00Z
    let n = (to - from) as usize;
    let (mut dev, mut ts, mut temp, mut cpu, mut crashed) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut fw, mut hw, mut model, mut tenant, mut site, mut seq, mut date) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for i in from..to {
        let d = i % devices;
        let reading = i / devices;
        let t = start_us + reading as i64 * 60_000_000 + (d % 60_000) as i64 * 1_000;
        let (f, h) = (FIRMWARE[(d % 4) as usize], HARDWARE[((d / 4) % 3) as usize]);
        let drifting = d % 1000 == 7;
        let base = 2.0 + unit(d) * 6.0;
        let drift = if drifting {
            (reading as f64 * 0.5).min(20.0)
        } else {
            0.0
        };
        let crash_rate = if f == "2.0.1" && h == "rev-B" {
            0.02
        } else {
            0.002
        };
        dev.push(format!("dev-{d:07}"));
        ts.push(t);
        temp.push(base + drift + (unit(i ^ 0x5555) - 0.5));
        cpu.push(5.0 + unit(i ^ 0xAAAA) * 90.0);
        crashed.push(unit(i ^ 0x3333) < crash_rate);
        fw.push(f);
        hw.push(h);
        model.push(MODELS[((d / 12) % 3) as usize]);
        tenant.push(if (d / 36).is_multiple_of(2) {
            "acme"
        } else {
            "globex"
        });
        site.push(format!("site-{:02}", (d / 72) % 10));
        seq.push(i as i64 + 1);
        date.push((t / 86_400_000_000) as i32);
    }
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from(dev)),
            Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
            Arc::new(Float64Array::from(temp)),
            Arc::new(Float64Array::from(cpu)),
            Arc::new(BooleanArray::from(crashed)),
            Arc::new(StringArray::from(fw)),
            Arc::new(StringArray::from(hw)),
            Arc::new(StringArray::from(model)),
            Arc::new(StringArray::from(tenant)),
            Arc::new(StringArray::from(site)),
            Arc::new(Int64Array::from(seq)),
            Arc::new(Date32Array::from(date)),
        ],
    )
    .expect("bench rows")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `GET path` `runs` times after one warm-up: the latencies (ms) and the last answer.
async fn time_endpoint(base: &str, path: &str, runs: usize) -> (Vec<f64>, serde_json::Value) {
    let client = reqwest::Client::new();
    let mut times = Vec::new();
    let mut last = serde_json::Value::Null;
    for run in 0..=runs {
        let started = Instant::now();
        let r = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("GET");
        let status = r.status();
        let body: serde_json::Value = r.json().await.expect("JSON answer");
        assert!(status.is_success(), "{path}: {body}");
        if run > 0 {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        last = body;
    }
    (times, last)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let location = dir.path().join("lake").display().to_string();
    let lake = Lake::open(&LakeConfig {
        location: location.clone(),
        ..Default::default()
    })
    .expect("lake");
    let id = TableId::parse("usable.fleet_bench").expect("table id");
    let mut writer = lake
        .writer(id.clone(), schema(), vec!["event_date".into()], "bench")
        .await
        .expect("writer");
    let started = Instant::now();
    let mut from = 0;
    while from < args.rows {
        let to = (from + args.batch).min(args.rows);
        writer
            .commit(&rows(from, to, args.devices), "stream_seq", to as i64)
            .await
            .expect("commit");
        from = to;
        eprintln!(
            "  wrote {from} of {} rows ({:.0} rows/s)",
            args.rows,
            from as f64 / started.elapsed().as_secs_f64()
        );
    }

    let flags: Vec<(String, String)> = [
        ("lake.location", location.clone()),
        ("http.listen", "127.0.0.1:0".to_string()),
        ("fleet.metrics_table", id.to_string()),
        ("fleet.events_table", id.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = Config::load(None, Vec::new(), &flags).expect("configuration");
    let engine = Engine::start(config, Vec::new(), false)
        .await
        .expect("engine");
    let base = format!("http://{}", engine.addr);
    let questions = [
        ("outliers", "/v1/fleet/outliers?window=all&limit=100"),
        ("root-cause", "/v1/fleet/root-cause?window=all&limit=100"),
    ];
    let mut fleetlake = Vec::new();
    for (name, path) in questions {
        eprintln!("fleetlake: {name}…");
        let (times, answer) = time_endpoint(&base, path, args.runs).await;
        fleetlake.push((name, times, answer));
    }
    engine.shutdown().await.expect("a clean shutdown");

    // DuckDB over the files the Delta log lists, in the same run.
    let root_cause_sql = fleetlake[1].2["sql"].as_str().expect("sql").to_string();
    let sql_file = dir.path().join("root_cause.sql");
    std::fs::write(&sql_file, &root_cause_sql).expect("writing the statement");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/fleet_duckdb.py");
    let python = fleetlake_tests::python();
    eprintln!("duckdb: both questions…");
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir.path().join("lake/usable/fleet_bench"))
        .arg(&sql_file)
        .arg(args.runs.to_string())
        .output()
        .expect("running the DuckDB script");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let duck: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("JSON from the script");

    // Both found the same leaders.
    let outliers_fl: Vec<&str> = fleetlake[0].2["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[0].as_str().expect("device_id"))
        .collect();
    let outliers_duck: Vec<&str> = duck["outliers_devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d.as_str().expect("device_id"))
        .collect();
    let mut a = outliers_fl.clone();
    let mut b = outliers_duck.clone();
    a.sort();
    b.sort();
    let same_outliers = a == b;
    let top_fl = &fleetlake[1].2["rows"][0];
    let top_duck = &duck["root_cause_top"];
    let same_top = top_fl[0] == top_duck[0] && top_fl[1] == top_duck[1];

    println!("| question | rows | fleetlake median ms | DuckDB median ms | fleetlake / DuckDB |");
    println!("|---|---|---|---|---|");
    let mut json = serde_json::Map::new();
    for (i, (name, times, _)) in fleetlake.iter().enumerate() {
        let key = if i == 0 {
            "outliers_ms"
        } else {
            "root_cause_ms"
        };
        let duck_times: Vec<f64> = duck[key]
            .as_array()
            .expect("times")
            .iter()
            .map(|t| t.as_f64().expect("ms"))
            .collect();
        let (f, d) = (median(times.clone()), median(duck_times.clone()));
        println!(
            "| {name} | {} | {f:.0} | {d:.0} | {:.2} |",
            args.rows,
            f / d
        );
        json.insert(
            name.to_string(),
            serde_json::json!({"fleetlake_ms": times, "duckdb_ms": duck_times, "ratio": f / d}),
        );
    }
    json.insert("rows".into(), args.rows.into());
    json.insert("devices".into(), args.devices.into());
    json.insert("same_outliers".into(), same_outliers.into());
    json.insert("same_top_root_cause".into(), same_top.into());
    json.insert(
        "profile".into(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
    );
    println!("{}", serde_json::Value::Object(json));
}
