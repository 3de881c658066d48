//! Publish-to-alert latency: how long from a device publishing a reading to the alert it causes
//! arriving at a NATS subscriber, at a steady load.
//!
//! ```text
//! cargo run --release -p fleetlake-benches --bin alert_latency -- --rate 20000 --seconds 30
//! ```
//!
//! Starts its own nats-server on a free loopback port and the engine in-process (local-folder
//! lake) with one pipeline and one rule (`temp_c > 100`, no `for`, no cool-down). Publishes
//! `--rate` readings per second from `--devices` devices for `--seconds`; one reading in
//! `--hot-every` of each device is hot and the next one cool again, so every hot reading raises a `firing`
//! transition (and the next a `resolved`). Each reading carries its send time; a subscriber on
//! `alerts.>` takes the difference when the alert arrives. Prints one JSON line with the
//! percentiles (the first 2 seconds are warm-up and not counted).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetlake::config::Config;
use fleetlake::serve::Engine;
use fleetlake_tests::Nats;
use futures::StreamExt;
use tokio::sync::Mutex;

const PIPELINE: &str = "
CREATE SOURCE readings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, temp_c DOUBLE, sent_us BIGINT)
WITH (subject = 'telemetry.>', dedup_key = 'device_id, seq', event_time = 'ts');

CREATE STREAMING TABLE usable.latency AS SELECT device_id, seq, ts, temp_c, sent_us FROM readings;

CREATE RULE hot WITH (severity = 'critical', key = 'device_id')
AS SELECT device_id, ts, sent_us, temp_c > 100 AS firing FROM usable.latency;
";

/// Publish-to-alert latency at a fixed offered load, in one JSON line.
#[derive(clap::Parser)]
#[command(name = "alert_latency", about)]
struct Args {
    /// Offered load, messages per second.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// How long to publish, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Simulated devices.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    devices: u64,
    /// Every Nth reading is hot (fires the rule); at least 2.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..))]
    hot_every: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[i] * 100.0).round() / 100.0
}

#[tokio::main]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    let nats = Nats::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).expect("pipelines folder");
    std::fs::write(pipelines.join("latency.sql"), PIPELINE).expect("pipeline file");
    let flags: Vec<(String, String)> = [
        ("nats.url", nats.url().to_string()),
        (
            "lake.location",
            dir.path().join("lake").display().to_string(),
        ),
        ("http.listen", "127.0.0.1:0".to_string()),
        ("pipelines.dir", pipelines.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = Config::load(None, Vec::new(), &flags).expect("configuration");
    let engine = Engine::start(config, Vec::new(), true)
        .await
        .expect("engine");

    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let mut alerts = client.subscribe("alerts.>").await.expect("subscribe");
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let counted_from = chrono::Utc::now().timestamp_micros() + 2_000_000;
    let collector = {
        let latencies = latencies.clone();
        tokio::spawn(async move {
            while let Some(m) = alerts.next().await {
                let now = chrono::Utc::now().timestamp_micros();
                let v: serde_json::Value = match serde_json::from_slice(&m.payload) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                let Some(sent) = v["values"]["sent_us"].as_f64() else {
                    continue;
                };
                if (sent as i64) >= counted_from {
                    latencies
                        .lock()
                        .await
                        .push((now - sent as i64) as f64 / 1000.0);
                }
            }
        })
    };

    // Wait for the engine to create the stream before publishing.
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .expect("NATS");
    while js.get_stream("TELEMETRY").await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "publishing {} msg/s from {} devices for {} s…",
        args.rate, args.devices, args.seconds
    );
    let total = args.rate * args.seconds;
    let tick = Duration::from_millis(5);
    let per_tick = (args.rate as f64 * tick.as_secs_f64()).max(1.0) as u64;
    let started = Instant::now();
    let mut interval = tokio::time::interval(tick);
    let mut sent = 0u64;
    let mut seqs = vec![0i64; args.devices as usize];
    while sent < total {
        interval.tick().await;
        for _ in 0..per_tick.min(total - sent) {
            let device = (sent % args.devices) as usize;
            seqs[device] += 1;
            let seq = seqs[device];
            // Staggered across devices, so hot readings are spread evenly over time.
            let hot = (seq as u64 + device as u64).is_multiple_of(args.hot_every);
            let now = chrono::Utc::now();
            let payload = serde_json::json!({
                "device_id": format!("dev-{device:05}"),
                "seq": seq,
                "ts": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "temp_c": if hot { 150.0 } else { 20.0 },
                "sent_us": now.timestamp_micros(),
            });
            client
                .publish(
                    format!("telemetry.bench.dev-{device:05}"),
                    payload.to_string().into(),
                )
                .await
                .expect("publish");
            sent += 1;
        }
    }
    client.flush().await.expect("flush");
    let publish_seconds = started.elapsed().as_secs_f64();
    // Let the last alerts arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    collector.abort();
    let mut l = latencies.lock().await.clone();
    l.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let acked = engine
        .metrics
        .messages_acked
        .load(std::sync::atomic::Ordering::Relaxed);
    engine.shutdown().await.expect("a clean shutdown");
    let result = serde_json::json!({
        "benchmark": "alert_latency",
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "target_rate": args.rate,
        "achieved_rate": (sent as f64 / publish_seconds).round(),
        "messages": sent,
        "messages_committed_by_end": acked,
        "alerts_measured": l.len(),
        "latency_ms": {
            "p50": percentile(&l, 0.50),
            "p90": percentile(&l, 0.90),
            "p99": percentile(&l, 0.99),
            "max": percentile(&l, 1.0),
        },
    });
    println!("{result}");
}
