//! Exactly once across crashes and outages: the real `fleetlake serve` binary is killed with
//! SIGKILL at (seeded) random moments while the simulator publishes 5% device replays, and
//! restarted each time; object storage is stopped for seconds, or NATS restarted, mid-run.
//! Afterwards every table holds each message exactly once and usable each reading exactly once.
//! With maintenance on, the engines also compact, checkpoint and clean the log of every table
//! every second while they ingest and are killed; a last `fleetlake maintain` then vacuums, and
//! the rows, each writer's `txn` progress and what other readers see are checked again.

use std::time::Duration;

use fleetlake::tools::simulate::{self, Report, SimConfig};
use fleetlake_sql::QueryEngine;
use fleetlake_tests::{EngineProcess, Nats, Seaweed, txn_progress, wait_for, wait_stream_acked};
use fleetlake_zones::{Lake, LakeConfig};
use tokio_util::sync::CancellationToken;

/// Something that goes wrong mid-run, besides the kills.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Disruption {
    None,
    StorageOutage,
    NatsRestart,
    /// Table maintenance every second (a second writer), on a local folder or on SeaweedFS.
    Maintenance {
        s3: bool,
    },
}

/// Maintenance that finds work every second: every partition is quiet at once, two small files
/// are enough, the log is cleaned as soon as a checkpoint exists, and a killed engine's lease
/// expires in 3 s.
const BUSY_MAINTENANCE: [(&str, &str); 6] = [
    ("FLEETLAKE_MAINTENANCE_INTERVAL_S", "1"),
    ("FLEETLAKE_MAINTENANCE_QUIET_MINUTES", "0"),
    ("FLEETLAKE_MAINTENANCE_MIN_SMALL_FILES", "2"),
    ("FLEETLAKE_MAINTENANCE_CHECKPOINT_INTERVAL", "5"),
    ("FLEETLAKE_MAINTENANCE_LOG_RETENTION_HOURS", "0"),
    ("FLEETLAKE_MAINTENANCE_LEASE_TTL_S", "3"),
];

const KILLS: usize = 6;

/// Seeded pauses between 0.8 and 3.0 s, so a failure can be replayed.
struct Pauses(u64);
impl Pauses {
    fn next(&mut self) -> Duration {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Duration::from_millis(800 + (self.0 >> 33) % 2200)
    }
}

async fn count(engine: &QueryEngine, sql: &str) -> i64 {
    let r = engine
        .query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let text = arrow::util::pretty::pretty_format_batches(&r.batches)
        .unwrap()
        .to_string();
    let col = r.batches[0].column(0);
    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(col.as_ref())
        .values()
        .first()
        .copied()
        .unwrap_or_else(|| panic!("{sql}: {text}"))
}

async fn crash_run(disruption: Disruption, seed: u64) {
    let mut nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let mut s3 = match disruption {
        Disruption::StorageOutage | Disruption::Maintenance { s3: true } => {
            Some(Seaweed::start().await)
        }
        _ => None,
    };
    let (location, mut env) = match &s3 {
        Some(s3) => (format!("s3://{}/crash", s3.bucket), s3.env()),
        None => (dir.path().join("lake").display().to_string(), Vec::new()),
    };
    let lake_config = LakeConfig {
        location: location.clone(),
        storage_options: env.iter().cloned().collect(),
    };
    env.extend(
        [
            ("FLEETLAKE_NATS_URL", nats.url().to_string()),
            ("FLEETLAKE_LAKE_LOCATION", location),
            ("FLEETLAKE_INGEST_COMMIT_INTERVAL_MS", "200".into()),
            ("FLEETLAKE_INGEST_COMMIT_ROWS", "2000".into()),
            ("FLEETLAKE_DEDUP_SNAPSHOT_INTERVAL_S", "1".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    if let Disruption::Maintenance { .. } = disruption {
        env.extend(
            BUSY_MAINTENANCE
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
    }
    let log = dir.path().join("engine.log");
    println!(
        "seed {seed}, disruption {disruption:?}, engine log {}",
        log.display()
    );

    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    let config = fleetlake::config::Config::load(
        None,
        vec![("FLEETLAKE_NATS_URL".to_string(), nats.url().to_string())],
        &[],
    )
    .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    let publisher = tokio::spawn(async move {
        simulate::publish(
            &js,
            SimConfig {
                seed,
                devices: 150,
                messages: 24_000,
                rate: 2_000.0,
                duplicates: 0.05,
                malformed: 0.01,
                late: 0.05,
                start_ms: Some(1_763_900_000_000),
                ..Default::default()
            },
            CancellationToken::new(),
            |_| {},
        )
        .await
    });

    let mut pauses = Pauses(seed);
    let stream_done = |url: String| async move {
        // Everything published so far is acknowledged: there is nothing left to commit.
        let js = fleetlake::ingest::source::connect(&url).await.ok()?;
        let mut stream = js.get_stream("TELEMETRY").await.ok()?;
        let last = stream.info().await.ok()?.state.last_sequence;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer("fleetlake").await.ok()?;
        let floor = consumer.info().await.ok()?.ack_floor.stream_sequence;
        (last > 0 && floor >= last).then_some(())
    };
    for round in 0..KILLS {
        let engine = EngineProcess::start(&env, &log).await;
        if round > 0 {
            // The first engine may die anywhere; the others only once they have committed
            // something, so that the next ones resume mid-stream (on a loaded machine the
            // first commits to fresh tables on SeaweedFS take longer than a pause).
            wait_for("the engine to commit", Duration::from_secs(120), || {
                let (api, url) = (engine.api.clone(), nats.url().to_string());
                async move {
                    if fleetlake_tests::metric(&api, "fleetlake_messages_acked_total").await > 0 {
                        return Some(());
                    }
                    stream_done(url).await
                }
            })
            .await;
        }
        tokio::time::sleep(pauses.next()).await;
        if round == 2 {
            match disruption {
                Disruption::StorageOutage => {
                    let s3 = s3.as_mut().unwrap();
                    s3.stop().await;
                    // The engine notices, says so, keeps retrying and does not die.
                    wait_for(
                        "/healthz to report the outage",
                        Duration::from_secs(60),
                        || {
                            let api = engine.api.clone();
                            async move {
                                let (status, body) = api.get("/healthz").await;
                                (status == 503 && body.contains("storage")).then_some(())
                            }
                        },
                    )
                    .await;
                    let (_, metrics) = engine.api.get("/metrics").await;
                    assert!(metrics.contains("fleetlake_storage_up 0"), "{metrics}");
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    s3.start_again().await;
                    wait_for("/healthz to recover", Duration::from_secs(120), || {
                        let api = engine.api.clone();
                        async move { (api.get("/healthz").await.0 == 200).then_some(()) }
                    })
                    .await;
                }
                Disruption::NatsRestart => {
                    nats.stop().await;
                    // Told by the connection itself, not by a pull request timing out later.
                    wait_for(
                        "/healthz to report NATS down",
                        Duration::from_secs(60),
                        || {
                            let api = engine.api.clone();
                            async move {
                                let (status, body) = api.get("/healthz").await;
                                (status == 503 && body.contains("connection to NATS")).then_some(())
                            }
                        },
                    )
                    .await;
                    nats.start_again().await;
                    tokio::time::sleep(pauses.next()).await;
                }
                Disruption::None | Disruption::Maintenance { .. } => {}
            }
        }
        engine.kill().await;
    }
    let report: Report = publisher.await.unwrap().expect("publishing");
    assert_eq!(report.total, 24_000);
    assert!(report.duplicates >= 1_000, "{report:?}");

    // A last engine drains what is left; SIGTERM then commits and acks in-flight messages.
    let engine = EngineProcess::start(&env, &log).await;
    let lake = Lake::open(&lake_config).unwrap();
    let query = QueryEngine::new(lake);
    // Acked means every table has committed (raw commits first: waiting for raw alone raced
    // with quarantine's and usable's commits, and SIGTERM could land before this engine had
    // consumed anything).
    wait_stream_acked(nats.url(), Duration::from_secs(180)).await;
    if let Disruption::Maintenance { .. } = disruption {
        // The killed engines' leases expire; this one maintains the lake at least once.
        wait_for("a maintenance run", Duration::from_secs(180), || {
            let api = engine.api.clone();
            async move {
                let runs = fleetlake_tests::metric(&api, "fleetlake_maintenance_runs_total").await;
                let rewritten =
                    fleetlake_tests::metric(&api, "fleetlake_maintenance_files_rewritten_total")
                        .await;
                (runs >= 1 && rewritten > 0).then_some(())
            }
        })
        .await;
        // What an operator sees.
        let (status, tables) = engine.api.get("/v1/tables").await;
        assert_eq!(status, 200);
        let tables: serde_json::Value = serde_json::from_str(&tables).unwrap();
        let usable = tables["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == "usable.telemetry")
            .unwrap()
            .clone();
        assert!(usable["maintained_at"].is_string(), "{usable}");
        assert!(usable["last_checkpoint"].is_u64(), "{usable}");
        let (_, metrics) = engine.api.get("/metrics").await;
        assert!(
            metrics.contains("fleetlake_table_files{table=\"usable.telemetry\"}"),
            "{metrics}"
        );
    }
    let status = engine.terminate().await;
    assert!(status.success(), "fleetlake exited with {status}");
    let progress = if let Disruption::Maintenance { .. } = disruption {
        Some(maintain_again(&lake_config, &env, &log).await)
    } else {
        None
    };

    let total = report.total as i64;
    assert_eq!(
        count(&query, "SELECT count(*) FROM raw.telemetry").await,
        total
    );
    assert_eq!(
        count(
            &query,
            "SELECT count(DISTINCT stream_seq) FROM raw.telemetry"
        )
        .await,
        total
    );
    assert_eq!(
        count(&query, "SELECT count(*) FROM raw.quarantine").await,
        report.malformed as i64
    );
    assert_eq!(
        count(
            &query,
            "SELECT count(DISTINCT stream_seq) FROM raw.quarantine"
        )
        .await,
        report.malformed as i64
    );
    let usable = count(&query, "SELECT count(*) FROM usable.telemetry").await;
    if usable != report.distinct as i64 {
        // Say which readings are doubled, to make a failure here diagnosable.
        let doubled = query
            .query("SELECT device_id, seq, count(*) AS n, min(stream_seq), max(stream_seq) FROM usable.telemetry GROUP BY device_id, seq HAVING count(*) > 1 ORDER BY device_id, seq LIMIT 20")
            .await
            .unwrap();
        let doubled = arrow::util::pretty::pretty_format_batches(&doubled.batches).unwrap();
        panic!(
            "usable.telemetry holds {usable} rows, {} distinct readings were sent ({report:?}); doubled readings:\n{doubled}\nengine log: {}",
            report.distinct,
            log.display()
        );
    }
    assert_eq!(
        count(
            &query,
            "SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM usable.telemetry)"
        )
        .await,
        report.distinct as i64
    );
    assert_eq!(
        count(
            &query,
            "SELECT count(DISTINCT stream_seq) FROM usable.telemetry"
        )
        .await,
        usable
    );
    if let Some(before) = progress {
        // Maintenance kept every writer's progress, and other readers see the same rows.
        assert_eq!(
            txn_progress(&Lake::open(&lake_config).unwrap()).await,
            before
        );
        let readers = fleetlake_tests::read_with_python(
            Lake::open(&lake_config).unwrap().root().as_str(),
            &["raw.telemetry", "raw.quarantine", "usable.telemetry"],
            &env,
        );
        for (table, rows) in [
            ("raw.telemetry", total),
            ("raw.quarantine", report.malformed as i64),
            ("usable.telemetry", usable),
        ] {
            assert_eq!(readers[table]["deltalake_rows"], rows, "{readers}");
            assert_eq!(readers[table]["duckdb_rows"], rows, "{readers}");
        }
    }
    // The engines resumed mid-stream from the lake's position, not from the beginning.
    let text = std::fs::read_to_string(&log).unwrap();
    let starts: Vec<&str> = text.lines().filter(|l| l.contains("consuming")).collect();
    for l in text
        .lines()
        .filter(|l| {
            l.contains("dedup")
                || l.contains("fleetlake::ingest: NATS")
                || l.contains("fleetlake::ingest::source")
        })
        .take(20)
    {
        println!("{l}");
    }
    println!("{}", starts.join("\n"));
    // (A kill can land before an engine got as far as consuming.)
    let resumed = starts.iter().filter(|l| !l.ends_with("start=1")).count();
    assert!(resumed >= 3, "only {resumed} engines resumed mid-stream");
    if let Some(s3) = s3.as_mut() {
        s3.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    crash_run(Disruption::None, 11).await;
}

/// After the engines: checks that their maintenance ran, then runs `fleetlake maintain` once more
/// with vacuum of every unreferenced file, and checks that it kept the rows and the progress and
/// (on a local folder) left exactly the referenced files. Returns the progress.
async fn maintain_again(
    lake_config: &LakeConfig,
    env: &[(String, String)],
    log: &std::path::Path,
) -> Vec<(String, Option<i64>)> {
    let text = std::fs::read_to_string(log).unwrap();
    let runs = text.matches("maintenance run done").count();
    println!("{runs} maintenance runs finished beside the engines' commits and kills");
    assert!(
        runs > 0,
        "no maintenance run finished: {}",
        fleetlake_tests::tail(log)
    );
    let before = txn_progress(&Lake::open(lake_config).unwrap()).await;
    assert!(before.iter().all(|(_, v)| v.is_some()), "{before:?}");
    let lake = Lake::open(lake_config).unwrap();
    // An orphan (a Parquet file of a commit that never completed) and fleetlake's own side file.
    let local = lake.root().to_file_path().ok();
    if let Some(root) = &local {
        std::fs::write(
            root.join("usable/telemetry/orphan.parquet"),
            b"not referenced",
        )
        .unwrap();
    }
    let out = fleetlake_tests::fleetlake_cli(
        &[
            "maintain",
            "--without-lease",
            "--set",
            "maintenance.vacuum_retention_hours=0",
            "--set",
            "maintenance.quiet_minutes=0",
            "--set",
            "maintenance.min_small_files=2",
        ],
        env,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fleetlake maintain: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["failed"], 0, "{summary}");
    for t in summary["tables"].as_array().unwrap() {
        assert_eq!(t["rows_before"], t["rows_after"], "{t}");
        assert!(
            t["expired_partitions"].as_array().unwrap().is_empty(),
            "{t}"
        );
    }
    let usable = summary["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "usable.telemetry")
        .unwrap();
    // Compacted and Z-ordered: one file per event date at most (the fleet's clocks span a day
    // boundary at most), not hundreds.
    assert!(usable["files_after"].as_u64().unwrap() <= 4, "{usable}");
    if let Some(root) = &local {
        assert!(!root.join("usable/telemetry/orphan.parquet").exists());
        assert!(
            root.join("usable/telemetry/_fleetlake/maintenance.json")
                .exists()
        );
        // On disk: exactly the files the log references.
        for (id, _, _) in fleetlake_zones::schema::builtin_tables() {
            let dir = root.join(id.path());
            let mut on_disk = 0u64;
            let mut stack = vec![dir.clone()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap() {
                    let p = e.unwrap().path();
                    let name = p.file_name().unwrap().to_string_lossy().to_string();
                    if p.is_dir() && !name.starts_with('_') {
                        stack.push(p);
                    } else if name.ends_with(".parquet") {
                        on_disk += 1;
                    }
                }
            }
            let info = lake.describe(&id).await.unwrap().unwrap();
            assert_eq!(on_disk, info.files, "{id}: files on disk vs in the log");
        }
    }
    before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_beside_sigkilled_engines_on_a_folder_loses_and_doubles_nothing() {
    crash_run(Disruption::Maintenance { s3: false }, 14).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_beside_sigkilled_engines_on_seaweedfs_loses_and_doubles_nothing() {
    crash_run(Disruption::Maintenance { s3: true }, 15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_storage_outage_mid_run_loses_and_doubles_nothing() {
    crash_run(Disruption::StorageOutage, 12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_run_loses_and_doubles_nothing() {
    crash_run(Disruption::NatsRestart, 13).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_cannot_commit_exits_non_zero_and_loses_nothing() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let mut s3 = Seaweed::start().await;
    let location = format!("s3://{}/grace", s3.bucket);
    let mut env = s3.env();
    env.extend(
        [
            ("FLEETLAKE_NATS_URL", nats.url().to_string()),
            ("FLEETLAKE_LAKE_LOCATION", location.clone()),
            // Nothing commits before the shutdown does.
            ("FLEETLAKE_INGEST_COMMIT_INTERVAL_MS", "600000".into()),
            ("FLEETLAKE_INGEST_SHUTDOWN_GRACE_S", "2".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let log = dir.path().join("engine.log");
    let engine = EngineProcess::start(&env, &log).await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    wait_for("the stream", Duration::from_secs(30), || {
        let js = js.clone();
        async move { js.get_stream("TELEMETRY").await.ok().map(|_| ()) }
    })
    .await;
    for seq in 1..=10 {
        let payload =
            format!(r#"{{"device_id":"g","seq":{seq},"ts":1777593600000,"temperature":4}}"#);
        js.publish("telemetry.t1.g", payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_for("10 messages pulled", Duration::from_secs(60), || {
        let api = engine.api.clone();
        async move {
            (fleetlake_tests::metric(&api, "fleetlake_messages_pulled_total").await >= 10)
                .then_some(())
        }
    })
    .await;
    s3.stop().await;
    let status = engine.terminate().await;
    assert!(
        !status.success(),
        "exited {status} with 10 messages uncommitted"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("were not committed"),
        "{}",
        fleetlake_tests::tail(&log)
    );

    // Nothing was acknowledged: the next engine (committing at the usual pace) commits every
    // message.
    s3.start_again().await;
    env.retain(|(k, _)| k != "FLEETLAKE_INGEST_COMMIT_INTERVAL_MS");
    let engine = EngineProcess::start(&env, &log).await;
    wait_stream_acked(nats.url(), Duration::from_secs(120)).await;
    assert_eq!(
        engine
            .api
            .scalar("SELECT count(*) FROM usable.telemetry")
            .await,
        10
    );
    assert!(engine.terminate().await.success());
    s3.stop().await;
}
