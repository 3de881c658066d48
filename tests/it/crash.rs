//! Exactly once across crashes and outages: the real `fleetlake serve` binary is killed with
//! SIGKILL at (seeded) random moments while the simulator publishes 5% device replays, and
//! restarted each time; object storage is stopped for seconds, or NATS restarted, mid-run.
//! Afterwards every table holds each message exactly once and usable each reading exactly once.

use std::time::Duration;

use fleetlake::tools::simulate::{self, Report, SimConfig};
use fleetlake_sql::QueryEngine;
use fleetlake_tests::{EngineProcess, Nats, Seaweed, wait_for, wait_stream_acked};
use fleetlake_zones::{Lake, LakeConfig};
use tokio_util::sync::CancellationToken;

/// Something that goes wrong mid-run, besides the kills.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Disruption {
    None,
    StorageOutage,
    NatsRestart,
}

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
        Disruption::StorageOutage => Some(Seaweed::start().await),
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
    for round in 0..KILLS {
        let engine = EngineProcess::start(&env, &log).await;
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
                    nats.restart().await;
                    tokio::time::sleep(pauses.next()).await;
                }
                Disruption::None => {}
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
    let status = engine.terminate().await;
    assert!(status.success(), "fleetlake exited with {status}");

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
