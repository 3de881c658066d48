//! Soak: does the lake stay fast after hours of one-second commits? Two lakes side by side in one
//! run, fed the same steady stream, one with table maintenance and one without.
//!
//! ```text
//! cargo run --release -p fleetlake-benches --bin soak -- --minutes 30 --rate 300
//! ```
//!
//! Starts two nats-servers and two engines in this process (local-folder lakes, the shipped
//! pipelines, commits every second), and publishes the mixed fleet (5% replays, 1% malformed) at
//! `--rate` messages per second to each. Lake A runs maintenance every `--interval-s` seconds with
//! the defaults, except the log retention (`--log-retention-hours`, 0 by default so that a
//! 30-minute soak shows what days of the default retention do); lake B runs none.
//!
//! Every `--report-every-s` seconds it measures, for each lake: the live data files and Delta log
//! entries of every table (summed in the Markdown table, per table in the JSON), the time to open
//! each table and read its `txn` progress (what an engine does first when it starts), and the
//! latency of a fixed set of queries. Prints a Markdown table as it goes and one JSON line per sample at the end.
//! Both lakes are measured in the same moments on the same machine: compare them, not absolute
//! numbers from different days.

use std::time::{Duration, Instant};

use fleetlake::config::Config;
use fleetlake::serve::Engine;
use fleetlake::tools::simulate::{self, Profile, SimConfig};
use fleetlake_sql::QueryEngine;
use fleetlake_tests::Nats;
use fleetlake_zones::{Lake, TableId};
use futures::TryStreamExt;
use tokio_util::sync::CancellationToken;

/// Two lakes, with and without maintenance, under the same steady load.
#[derive(clap::Parser)]
#[command(name = "soak", about)]
struct Args {
    /// How long to publish, minutes.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    minutes: u64,
    /// Messages per second to each lake.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Simulated devices.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    devices: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(10..))]
    report_every_s: u64,
    /// `maintenance.interval_s` of lake A.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    interval_s: u64,
    /// `maintenance.log_retention_hours` of lake A.
    #[arg(long, default_value_t = 0)]
    log_retention_hours: u64,
}

/// The fixed queries timed at every sample.
const QUERIES: [&str; 3] = [
    "SELECT count(*) FROM usable.telemetry",
    "SELECT avg(temperature) FROM usable.telemetry WHERE device_id = 'dev-00042'",
    "SELECT count(*) FROM raw.telemetry WHERE stream_seq % 1000 = 0",
];

struct Side {
    name: &'static str,
    _nats: Nats,
    engine: Engine,
    lake: Lake,
    publisher: tokio::task::JoinHandle<()>,
}

async fn side(
    name: &'static str,
    maintenance: bool,
    args: &Args,
    dir: &std::path::Path,
    stop: CancellationToken,
) -> Side {
    let nats = Nats::start().await;
    let shipped = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../pipelines"));
    let flags: Vec<(String, String)> = [
        ("nats.url", nats.url().to_string()),
        ("lake.location", dir.join(name).display().to_string()),
        ("http.listen", "127.0.0.1:0".to_string()),
        ("pipelines.dir", shipped.display().to_string()),
        ("maintenance.enabled", maintenance.to_string()),
        ("maintenance.interval_s", args.interval_s.to_string()),
        (
            "maintenance.log_retention_hours",
            args.log_retention_hours.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = Config::load(None, Vec::new(), &flags).expect("configuration");
    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .expect("engine");
    let lake = engine.lake.clone();
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .expect("NATS");
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .expect("stream");
    let sim = SimConfig {
        profile: Profile::Mixed,
        seed: 7,
        devices: args.devices,
        messages: args.rate * args.minutes * 60,
        rate: args.rate as f64,
        duplicates: 0.05,
        malformed: 0.01,
        late: 0.05,
        ..Default::default()
    };
    let publisher = tokio::spawn(async move {
        simulate::publish(&js, sim, stop, |_| {})
            .await
            .expect("publishing");
    });
    Side {
        name,
        _nats: nats,
        engine,
        lake,
        publisher,
    }
}

/// Live data files, Delta log entries and their bytes of one table.
async fn shape(lake: &Lake, id: &TableId) -> (u64, u64, u64) {
    let Some(table) = lake.load(id).await.expect("loading a table") else {
        return (0, 0, 0);
    };
    let files = table
        .snapshot()
        .map(|s| s.log_data().num_files())
        .unwrap_or(0) as u64;
    let store = table.log_store().object_store(None);
    let log: Vec<_> = store
        .list(Some(&object_store::path::Path::from("_delta_log")))
        .try_collect()
        .await
        .expect("listing the log");
    let bytes = log.iter().map(|m| m.size).sum();
    (files, log.len() as u64, bytes)
}

async fn sample(side: &Side, minute: f64) -> serde_json::Value {
    let ids = side.lake.all_tables().await.expect("listing tables");
    let (mut files, mut log, mut log_bytes) = (0, 0, 0);
    let mut usable = (0, 0, 0);
    let mut per_table = serde_json::Map::new();
    for id in &ids {
        let s = shape(&side.lake, id).await;
        files += s.0;
        log += s.1;
        log_bytes += s.2;
        if id == &TableId::usable_telemetry() {
            usable = s;
        }
        per_table.insert(
            id.to_string(),
            serde_json::json!({"data_files": s.0, "log_entries": s.1, "log_bytes": s.2}),
        );
    }
    // What a starting engine does first: open every table and read its progress.
    let started = Instant::now();
    for id in &ids {
        let one = Instant::now();
        if let Some(table) = side.lake.load(id).await.expect("loading") {
            let snapshot = table.snapshot().expect("snapshot");
            let _ = snapshot
                .transaction_version(table.log_store().as_ref(), "fleetlake")
                .await;
        }
        let ms = (one.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
        if let Some(t) = per_table.get_mut(&id.to_string()) {
            t["open_ms"] = ms.into();
        }
    }
    let open_ms = started.elapsed().as_secs_f64() * 1000.0;
    let query = QueryEngine::new(side.lake.clone());
    let mut query_ms = Vec::new();
    for sql in QUERIES {
        let started = Instant::now();
        query.query(sql).await.expect("a soak query");
        query_ms.push((started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0);
    }
    serde_json::json!({
        "lake": side.name,
        "minute": (minute * 10.0).round() / 10.0,
        "tables": ids.len(),
        "data_files": files,
        "log_entries": log,
        "log_bytes": log_bytes,
        "usable_telemetry_files": usable.0,
        "usable_telemetry_log_entries": usable.1,
        "open_all_tables_ms": (open_ms * 10.0).round() / 10.0,
        "query_ms": query_ms,
        "messages_acked": side.engine.metrics.messages_acked.load(std::sync::atomic::Ordering::Relaxed),
        "per_table": per_table,
    })
}

#[tokio::main]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = CancellationToken::new();
    eprintln!(
        "soak: {} msg/s to each of two lakes for {} min (A: maintenance every {} s, B: none); lakes in {}",
        args.rate,
        args.minutes,
        args.interval_s,
        dir.path().display()
    );
    let sides = [
        side("A_maintained", true, &args, dir.path(), stop.clone()).await,
        side("B_unmaintained", false, &args, dir.path(), stop.clone()).await,
    ];
    println!(
        "| minute | lake | data files | log entries | usable.telemetry files | open all tables ms | query ms ({}) | acked |",
        QUERIES.len()
    );
    println!("|---|---|---|---|---|---|---|---|");
    let started = Instant::now();
    let end = started + Duration::from_secs(args.minutes * 60);
    let mut samples = Vec::new();
    loop {
        let next = (Instant::now() + Duration::from_secs(args.report_every_s)).min(end);
        tokio::time::sleep_until(next.into()).await;
        let minute = started.elapsed().as_secs_f64() / 60.0;
        for side in &sides {
            let s = sample(side, minute).await;
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                s["minute"],
                s["lake"].as_str().unwrap_or(""),
                s["data_files"],
                s["log_entries"],
                s["usable_telemetry_files"],
                s["open_all_tables_ms"],
                s["query_ms"],
                s["messages_acked"]
            );
            samples.push(s);
        }
        if Instant::now() >= end {
            break;
        }
    }
    stop.cancel();
    let [a, b] = sides;
    for side in [a, b] {
        let _ = side.publisher.await;
        side.engine.shutdown().await.expect("a clean shutdown");
    }
    for s in &samples {
        let mut s = s.clone();
        s["benchmark"] = "soak".into();
        s["profile"] = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into();
        s["rate"] = args.rate.into();
        println!("{s}");
    }
}
