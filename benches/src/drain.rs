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
//!
//! `--analysts N` measures whether heavy queries slow ingest down: each of `--rounds` rounds
//! drains twice, alone and with N analysts each running a CPU- and memory-heavy query over HTTP
//! in a loop (an analyst token, the default query limits), alternating which goes first; prints
//! one JSON line per drain and one with the median rates and their ratio.

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
    /// Analysts running heavy queries during a second drain of each round (0 = none).
    #[arg(long, default_value_t = 0)]
    analysts: usize,
    /// Rounds of the side-by-side comparison (with --analysts).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
}

/// What a heavy analyst runs in a loop: a grouping of 20 million generated rows into a million
/// groups (CPU and memory in the operators), then a scan of the usable table being written.
const HEAVY_QUERIES: [&str; 2] = [
    "SELECT count(*) FROM (SELECT v % 1000003 AS k, count(*) AS n FROM generate_series(1, 20000000) t(v) GROUP BY k) g",
    "SELECT device_id, count(*) AS n, avg(temperature) AS t FROM usable.telemetry GROUP BY device_id ORDER BY n DESC LIMIT 10",
];

fn parse_profile(name: &str) -> Result<Profile, String> {
    Profile::parse(name)
        .ok_or_else(|| format!("{name:?}: expected envelope, coldchain, health or mixed"))
}

#[tokio::main]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    if args.analysts == 0 {
        println!("{}", drain(&args, 0).await);
        return;
    }
    let (mut alone, mut loaded) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [0, args.analysts]
        } else {
            [args.analysts, 0]
        };
        for analysts in order {
            let result = drain(&args, analysts).await;
            println!("{result}");
            let rate = result["messages_per_second"].as_f64().unwrap_or(0.0);
            if analysts == 0 {
                alone.push(rate);
            } else {
                loaded.push(rate);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (alone, loaded) = (median(&mut alone), median(&mut loaded));
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "drain under query load",
            "analysts": args.analysts,
            "rounds": args.rounds,
            "median_messages_per_second_alone": alone,
            "median_messages_per_second_with_analysts": loaded,
            "ratio": ((loaded / alone) * 1000.0).round() / 1000.0,
        })
    );
}

/// One drain of a freshly filled stream into a fresh lake, with `analysts` running
/// [`HEAVY_QUERIES`] meanwhile; its figures as JSON.
async fn drain(args: &Args, analysts: usize) -> serde_json::Value {
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
    let tokens_file = dir.path().join("tokens.toml");
    let (_, token) = fleetlake::api::auth::Tokens::open(&tokens_file)
        .and_then(|t| {
            t.create(
                "analyst",
                fleetlake::api::auth::Role::Analyst,
                Vec::new(),
                "bench",
                Default::default(),
            )
        })
        .expect("an analyst token");
    let flags: Vec<(String, String)> = [
        ("auth.tokens_file", tokens_file.display().to_string()),
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
    let stop = CancellationToken::new();
    let load: Vec<_> = (0..analysts)
        .map(|i| {
            let (stop, token) = (stop.clone(), token.clone());
            let url = format!("http://{}/v1/query", engine.addr);
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let (mut answered, mut refused) = (0u64, 0u64);
                let mut n = i;
                while !stop.is_cancelled() {
                    let sql = HEAVY_QUERIES[n % HEAVY_QUERIES.len()];
                    n += 1;
                    let sent = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&serde_json::json!({ "sql": sql }))
                        .send();
                    let r = tokio::select! {
                        r = sent => r,
                        _ = stop.cancelled() => break,
                    };
                    match r {
                        Ok(r) if r.status().is_success() => answered += 1,
                        _ => refused += 1,
                    }
                }
                (answered, refused)
            })
        })
        .collect();
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
    stop.cancel();
    let (mut answered, mut refused) = (0, 0);
    for task in load {
        let (a, r) = task.await.expect("analyst");
        answered += a;
        refused += r;
    }
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
        "analysts": analysts,
        "queries_answered": answered,
        "queries_refused": refused,
    });
    result
}
