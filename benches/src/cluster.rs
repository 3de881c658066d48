//! Scale-out: the drain rate of 1, 2 and 3 `fleetlake serve` instances sharing one partitioned
//! stream on a 3-node NATS cluster (replicas 3), and the time from an instance's SIGKILL to its
//! partitions being consumed again.
//!
//! ```text
//! cargo build --release -p fleetlake-benches --bin cluster -p fleetlake --bin fleetlake
//! PATH=$PWD/.venv/bin:$PATH target/release/cluster [--messages 200000] [--partitions 6]
//! ```
//!
//! One stream is filled once (the mixed fleet: envelope, cold-chain and health devices; 5%
//! replays, 1% malformed); each drain is a fresh consumer name (so fresh partition consumers and
//! Delta transaction ids) and a fresh lake folder, timed from starting the processes until every
//! partition's consumer has nothing pending and nothing unacknowledged (fleetlake acknowledges
//! only what every table has committed). The instances run the shipped pipelines
//! (`cluster.fleet_wide = skip`). CPU: the cores the instances and the three nats-servers used
//! over the drain, from `/proc`: on one machine the instances share its cores, so more
//! instances add throughput only while cores are idle.
//!
//! Takeover: three instances drain a fresh consumer; once the partitions are spread, one is
//! killed; measured are the time until the survivors hold its partitions (their leases) and until
//! each of its partitions is consumed again (the new owner's consumer, made at the lake's
//! position when it starts consuming, exists), for each `--ttl` (`cluster.lease_ttl_s`).

#[path = "rss.rs"]
#[allow(dead_code)]
mod rss;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use fleetlake::tools::simulate::{self, Profile, SimConfig};
use fleetlake_tests::{EngineProcess, NatsCluster, TestDir, partition_consumers, wait_for};
use tokio_util::sync::CancellationToken;

#[derive(clap::Parser)]
#[command(
    name = "cluster",
    about = "Drain rate of 1, 2 and 3 instances on a partitioned stream (3-node NATS cluster), and the takeover time after a SIGKILL"
)]
struct Args {
    /// Messages in the pre-filled stream.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Devices of the simulated fleet.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    devices: u64,
    /// Partitions of the stream (`cluster.partitions`).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=1024))]
    partitions: u32,
    /// Instance counts to drain with, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2, 3])]
    instances: Vec<usize>,
    /// Lease TTLs (seconds) to measure the takeover with, comma-separated; none to skip it.
    #[arg(long, value_delimiter = ',', default_values_t = vec![3, 10])]
    ttl: Vec<u64>,
}

struct Bench {
    cluster: NatsCluster,
    dir: TestDir,
    pipelines: std::path::PathBuf,
    partitions: u32,
}

impl Bench {
    fn env(&self, consumer: &str, instance: usize, ttl: u64) -> Vec<(String, String)> {
        let lake = self.dir.path().join(format!("lake-{consumer}"));
        [
            ("FLEETLAKE_NATS_URL", self.cluster.url()),
            ("FLEETLAKE_NATS_REPLICAS", "3".into()),
            ("FLEETLAKE_NATS_CONSUMER", consumer.into()),
            ("FLEETLAKE_LAKE_LOCATION", lake.display().to_string()),
            (
                "FLEETLAKE_PIPELINES_DIR",
                self.pipelines.display().to_string(),
            ),
            ("FLEETLAKE_CLUSTER_PARTITIONS", self.partitions.to_string()),
            ("FLEETLAKE_CLUSTER_INSTANCE", format!("i{instance}")),
            ("FLEETLAKE_CLUSTER_LEASE_TTL_S", ttl.to_string()),
            // One bucket per run: its max age (the TTL) is fixed when it is created.
            (
                "FLEETLAKE_CLUSTER_LEASE_BUCKET",
                format!("{consumer}_leases"),
            ),
            ("FLEETLAKE_CLUSTER_FLEET_WIDE", "skip".into()),
            ("FLEETLAKE_MAINTENANCE_ENABLED", "false".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    async fn start(&self, consumer: &str, n: usize, ttl: u64) -> Vec<EngineProcess> {
        let mut out = Vec::new();
        for i in 0..n {
            let log = self.dir.path().join(format!("{consumer}-i{i}.log"));
            out.push(EngineProcess::start(&self.env(consumer, i, ttl), &log).await);
        }
        out
    }

    /// Whether every partition's consumer of `consumer` exists and has consumed and
    /// acknowledged the whole stream.
    async fn drained(&self, js: &jetstream::Context, consumer: &str) -> bool {
        for p in 0..self.partitions {
            let consumers = partition_consumers(js, consumer, p).await;
            if consumers.is_empty() {
                return false;
            }
            for mut c in consumers {
                match c.info().await {
                    Ok(i) if i.num_pending == 0 && i.num_ack_pending == 0 => {}
                    _ => return false,
                }
            }
        }
        true
    }
}

/// The names of partition `p`'s consumers (one per owner).
async fn consumer_names(js: &jetstream::Context, consumer: &str, p: u32) -> Vec<String> {
    let mut out = Vec::new();
    for mut c in partition_consumers(js, consumer, p).await {
        if let Ok(i) = c.info().await {
            out.push(i.name.clone());
        }
    }
    out
}

fn cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| rss::cpu_seconds(*p)).sum()
}

#[tokio::main]
async fn main() {
    let args: Args = clap::Parser::parse();
    eprintln!("starting a 3-node NATS cluster…");
    let cluster = NatsCluster::start(3).await;
    let dir = TestDir::new();
    let pipelines = fleetlake_tests::shipped_pipelines(dir.path());
    let bench = Bench {
        cluster,
        dir,
        pipelines,
        partitions: args.partitions,
    };
    let js = fleetlake::ingest::source::connect(&bench.cluster.url())
        .await
        .expect("NATS");
    let config = fleetlake::config::Config::load(
        None,
        Vec::new(),
        &[
            ("nats.url".into(), bench.cluster.url()),
            ("nats.replicas".into(), "3".into()),
            ("cluster.partitions".into(), args.partitions.to_string()),
        ],
    )
    .expect("configuration");
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .expect("stream");
    eprintln!("filling the stream with {} messages…", args.messages);
    let fill = simulate::publish(
        &js,
        SimConfig {
            profile: Profile::Mixed,
            seed: 1,
            devices: args.devices,
            messages: args.messages,
            duplicates: 0.05,
            malformed: 0.01,
            ..Default::default()
        },
        CancellationToken::new(),
        |_| {},
    )
    .await
    .expect("publishing");
    let nats_pids: Vec<u32> = bench.cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    println!(
        "Stream: {} messages ({} devices, mixed fleet, 5% replays, 1% malformed) on 3 nats-server nodes, replicas 3, {} partitions; filled at {:.0} msg/s.\n",
        fill.total, args.devices, args.partitions, fill.rate
    );
    println!(
        "| instances | drain (s) | msg/s | vs 1 instance | CPU cores: instances | CPU cores: nats-servers |"
    );
    println!("|---|---|---|---|---|---|");
    let mut single = None;
    for &n in &args.instances {
        let consumer = format!("drain{n}");
        eprintln!("draining with {n} instance(s)…");
        let nats_before = cpu(&nats_pids);
        let started = Instant::now();
        let engines = bench.start(&consumer, n, 3).await;
        let pids: Vec<u32> = engines.iter().map(EngineProcess::pid).collect();
        wait_for("the drain", Duration::from_secs(3600), || {
            let (bench, js, consumer) = (&bench, &js, &consumer);
            async move { bench.drained(js, consumer).await.then_some(()) }
        })
        .await;
        let seconds = started.elapsed().as_secs_f64();
        let (engine_cpu, nats_cpu) = (cpu(&pids), cpu(&nats_pids) - nats_before);
        for e in engines {
            e.terminate().await;
        }
        let rate = fill.total as f64 / seconds;
        let base = *single.get_or_insert(rate);
        println!(
            "| {n} | {seconds:.1} | {rate:.0} | {:.2} | {:.2} | {:.2} |",
            rate / base,
            engine_cpu / seconds,
            nats_cpu / seconds
        );
    }
    if !args.ttl.is_empty() {
        println!(
            "\n| lease TTL (s) | partitions moved | leases taken after the kill (s) | consumed again after the kill (s) |"
        );
        println!("|---|---|---|---|");
    }
    for &ttl in &args.ttl {
        let consumer = format!("takeover{ttl}");
        eprintln!("takeover with a {ttl} s lease…");
        let mut engines = bench.start(&consumer, 3, ttl).await;
        let holders = |api: fleetlake_tests::Api| async move {
            let (_, body) = api.get("/v1/cluster").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            v["holders"]
                .as_object()
                .map(|h| {
                    h.iter()
                        .filter_map(|(p, i)| {
                            Some((p.parse::<u32>().ok()?, i.as_str()?.to_string()))
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        let spread = wait_for(
            "the partitions to be spread",
            Duration::from_secs(120),
            || {
                let api = engines[0].api.clone();
                let partitions = bench.partitions as usize;
                async move {
                    let h = holders(api).await;
                    let full = h.len() == partitions
                        && (0..3).all(|i| h.iter().any(|(_, who)| *who == format!("i{i}")));
                    full.then_some(h)
                }
            },
        )
        .await;
        // Draining for a moment, then the third instance dies.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let victim: Vec<u32> = spread
            .iter()
            .filter(|(_, who)| who == "i2")
            .map(|(p, _)| *p)
            .collect();
        let mut before = Vec::new();
        for p in &victim {
            before.push(consumer_names(&js, &consumer, *p).await);
        }
        let killed = Instant::now();
        engines.pop().expect("three").kill().await;
        let mut taken = None;
        let consumed = loop {
            if taken.is_none() {
                let h = holders(engines[0].api.clone()).await;
                if h.len() == bench.partitions as usize && !h.iter().any(|(_, who)| who == "i2") {
                    taken = Some(killed.elapsed());
                }
            }
            // The new owner consumes under a name of its own, made when it starts consuming.
            let mut all = true;
            for (p, old) in victim.iter().zip(&before) {
                let now = consumer_names(&js, &consumer, *p).await;
                all &= now.iter().any(|n| !old.contains(n));
            }
            if all && taken.is_some() {
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < Duration::from_secs(120),
                "no takeover within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        println!(
            "| {ttl} | {} | {:.1} | {:.1} |",
            victim.len(),
            taken.unwrap_or_default().as_secs_f64(),
            consumed.as_secs_f64()
        );
        for e in engines {
            e.terminate().await;
        }
    }
}
