//! End-to-end drain rate: how fast fleetlake empties a pre-filled JetStream stream into the
//! raw, quarantine and usable zones.
//!
//! ```text
//! cargo run --release -p fleetlake-benches --bin drain -- --messages 200000 [--s3] [--profile coldchain]
//! ```
//!
//! `--without-final` leaves out `pipelines/final.sql` and `rules.sql` (window tables and rules):
//! the difference is the final zone's cost.
//!
//! `--profile envelope` (default) drains through the built-in decoder into `usable.telemetry`;
//! `coldchain` through the shipped `pipelines/cold_chain.sql` (decode, query with a reference
//! join, five expectations) into `usable.cold_chain`: the difference is the pipeline stage's cost.
//!
//! It starts its own nats-server (and SeaweedFS with `--s3`) on free loopback ports, publishes
//! the simulated fleet (1% malformed) before the engine starts, then starts the engine and times
//! until every message is committed to raw and decoded into usable or quarantine. Prints one JSON
//! line. Correctness is the tests' job; this only measures.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fleetlake::config::Config;
use fleetlake::serve::Engine;
use fleetlake::tools::simulate::{self, Profile, SimConfig};
use fleetlake_tests::{Nats, Seaweed};
use tokio_util::sync::CancellationToken;

/// Drain rate of a pre-filled stream, in one JSON line.
#[derive(clap::Parser)]
#[command(name = "drain", about)]
struct Args {
    /// Messages to publish before the engine starts.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Simulated devices.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    devices: u64,
    /// The lake on SeaweedFS S3 (started by the benchmark) instead of a local folder.
    #[arg(long)]
    s3: bool,
    /// `ingest.commit_rows`.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    commit_rows: u64,
    /// What the fleet sends: envelope, coldchain, health or mixed.
    #[arg(long, default_value = "envelope", value_parser = parse_profile)]
    profile: Profile,
    /// Leave out the window tables and rules (pipelines/final.sql, rules/).
    #[arg(long)]
    without_final: bool,
}

fn parse_profile(name: &str) -> Result<Profile, String> {
    Profile::parse(name)
        .ok_or_else(|| format!("{name:?}: expected envelope, coldchain, health or mixed"))
}

#[tokio::main]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    let nats = Nats::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s3 = if args.s3 {
        Some(Seaweed::start().await)
    } else {
        None
    };
    let (location, env) = match &s3 {
        Some(s3) => (format!("s3://{}/bench", s3.bucket), s3.env()),
        None => (dir.path().join("lake").display().to_string(), Vec::new()),
    };
    // The shipped pipelines, or all but the final zone and the rules.
    let shipped = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../pipelines"));
    let pipelines = if args.without_final {
        let only = dir.path().join("pipelines");
        std::fs::create_dir_all(&only).expect("pipelines folder");
        for f in ["cold_chain.sql", "device_health.sql", "reference.sql"] {
            std::fs::copy(shipped.join(f), only.join(f)).expect("copying a pipeline");
        }
        only
    } else {
        shipped
    };
    let flags: Vec<(String, String)> = [
        ("nats.url", nats.url().to_string()),
        ("lake.location", location),
        ("http.listen", "127.0.0.1:0".to_string()),
        ("ingest.commit_rows", args.commit_rows.to_string()),
        ("ingest.fetch_batch", "2000".to_string()),
        ("pipelines.dir", pipelines.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = Config::load(None, Vec::new(), &flags).expect("configuration");

    eprintln!("filling the stream with {} messages…", args.messages);
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .expect("NATS");
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .expect("stream");
    let report = simulate::publish(
        &js,
        SimConfig {
            profile: args.profile,
            seed: 1,
            devices: args.devices,
            messages: args.messages,
            malformed: 0.01,
            late: 0.05,
            ..Default::default()
        },
        CancellationToken::new(),
        |_| {},
    )
    .await
    .expect("publishing");
    eprintln!("published at {:.0} msg/s; draining…", report.rate);

    let started = Instant::now();
    let engine = Engine::start(config, env, true).await.expect("engine");
    let m = engine.metrics.clone();
    // Messages are acked only once every table holding them has committed.
    let done =
        |m: &fleetlake::metrics::Metrics| m.messages_acked.load(Ordering::Relaxed) >= args.messages;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while !done(&m) {
        assert!(
            Instant::now() < deadline,
            "drain did not finish in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    engine.shutdown().await.expect("a clean shutdown");
    if let Some(s3) = s3.as_mut() {
        s3.stop().await;
    }
    let result = serde_json::json!({
        "benchmark": "drain",
        "lake": if args.s3 { "s3 (SeaweedFS)" } else { "local folder" },
        "input": format!("{:?}", args.profile).to_lowercase(),
        "final_zone_and_rules": !args.without_final,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "messages": args.messages,
        "commit_rows": args.commit_rows,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "messages_per_second": (args.messages as f64 / seconds).round(),
    });
    println!("{result}");
}
