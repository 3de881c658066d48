//! Device replays are removed before the usable zone, also when they arrive after a restart.

use std::time::Duration;

use fleetlake::serve::Engine;
use fleetlake_tests::{Api, Nats};

fn reading(device: &str, seq: u64) -> bytes::Bytes {
    format!(
        r#"{{"device_id":"{device}","seq":{seq},"ts":{},"temperature":4.0}}"#,
        1_763_900_000_000u64 + seq * 1000
    )
    .into()
}

async fn usable_rows(api: &Api, n: i64) {
    api.wait_scalar(
        "SELECT count(*) FROM usable.telemetry",
        n,
        Duration::from_secs(60),
    )
    .await;
}

async fn restart_drops_replays(snapshot_on_stop: bool) {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let lake = dir.path().join("lake").display().to_string();
    let config =
        fleetlake_tests::test_config(nats.url(), &lake, &[("dedup.snapshot_interval_s", "3600")]);
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    let publish = |device: &'static str, seq: u64| {
        let js = js.clone();
        async move {
            js.publish(format!("telemetry.{device}"), reading(device, seq))
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    for seq in 1..=3 {
        publish("dev-a", seq).await;
    }
    publish("dev-a", 2).await; // a replay within the run
    usable_rows(&api, 3).await;
    assert_eq!(api.scalar("SELECT count(*) FROM raw.telemetry").await, 4);
    if snapshot_on_stop {
        engine.shutdown().await.expect("a clean shutdown");
    } else {
        // Without a snapshot the state is rebuilt from usable.telemetry: remove the one the
        // graceful stop wrote.
        engine.shutdown().await.expect("a clean shutdown");
        let snapshots = dir.path().join("lake/usable/telemetry/_fleetlake");
        std::fs::remove_dir_all(&snapshots).expect("the graceful stop wrote a snapshot");
    }

    let engine = Engine::start(config, Vec::new(), true).await.unwrap();
    let api = Api::new(engine.addr);
    publish("dev-a", 1).await; // replays arriving after the restart
    publish("dev-a", 3).await;
    publish("dev-a", 4).await; // new
    api.wait_scalar(
        "SELECT count(*) FROM raw.telemetry",
        7,
        Duration::from_secs(60),
    )
    .await;
    usable_rows(&api, 4).await;
    assert_eq!(
        api.scalar(
            "SELECT count(*) FROM usable.telemetry WHERE device_id = 'dev-a' AND seq IN (1, 3)"
        )
        .await,
        2
    );
    let (_, metrics) = api.get("/metrics").await;
    assert!(
        metrics.contains("fleetlake_duplicates_dropped_total 2\n"),
        "{metrics}"
    );
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_a_restart_is_dropped_using_the_snapshot() {
    restart_drops_replays(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_a_restart_is_dropped_rebuilding_from_usable() {
    restart_drops_replays(false).await;
}

/// A reading of `device` taken at `at_ms` (event time, ms since the epoch).
fn reading_at(device: &str, seq: u64, at_ms: u64) -> bytes::Bytes {
    format!(r#"{{"device_id":"{device}","seq":{seq},"ts":{at_ms},"temp_c":4.0,"temperature":4.0}}"#)
        .into()
}

const BOOT1_MS: u64 = 1_763_900_000_000;
const BOOT2_MS: u64 = BOOT1_MS + 3_600_000;
const BOOT3_MS: u64 = BOOT2_MS + 3_600_000;

/// (device, seq, event time ms) in the order published, and whether each is new: three devices
/// report seq 1..=20, reboot (seq back to 1, an hour later) and report 1..=12; dev-1 replays
/// readings of both boots; dev-2 reboots again mid-way (after an engine restart).
fn first_half() -> Vec<(String, u64, u64, bool)> {
    let mut out = Vec::new();
    for d in 0..3 {
        let device = format!("dev-{d}");
        for seq in 1..=20 {
            out.push((device.clone(), seq, BOOT1_MS + seq * 1000, true));
        }
        for seq in 1..=12 {
            out.push((device.clone(), seq, BOOT2_MS + seq * 1000, true));
        }
    }
    // True replays: of the first boot (its original times) and of the second.
    for seq in [3, 15, 20] {
        out.push(("dev-1".into(), seq, BOOT1_MS + seq * 1000, false));
    }
    for seq in [1, 12] {
        out.push(("dev-1".into(), seq, BOOT2_MS + seq * 1000, false));
    }
    out
}

fn second_half() -> Vec<(String, u64, u64, bool)> {
    let mut out = Vec::new();
    // After the engine restarted: replays of both earlier boots are still dropped.
    for (seq, at) in [(5, BOOT1_MS), (5, BOOT2_MS), (12, BOOT2_MS)] {
        out.push(("dev-0".into(), seq, at + seq * 1000, false));
    }
    // dev-0 goes on counting; dev-2 reboots a second time.
    for seq in 13..=15 {
        out.push(("dev-0".into(), seq, BOOT2_MS + seq * 1000, true));
    }
    for seq in 1..=4 {
        out.push(("dev-2".into(), seq, BOOT3_MS + seq * 1000, true));
    }
    out.push(("dev-2".into(), 2, BOOT3_MS + 2000, false));
    out
}

async fn rebooted_devices_keep_their_readings(pipelines: bool, snapshot_on_stop: bool) {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let lake = dir.path().join("lake").display().to_string();
    let mut overrides = vec![("dedup.snapshot_interval_s", "3600")];
    let pipeline_dir = dir.path().join("pipelines");
    let (table, subject) = if pipelines {
        std::fs::create_dir_all(&pipeline_dir).unwrap();
        std::fs::write(
            pipeline_dir.join("trailers.sql"),
            "CREATE SOURCE readings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, temp_c DOUBLE)
             WITH (subject = 'telemetry.coldchain.>', event_time = 'ts');
             CREATE STREAMING TABLE usable.trailers AS SELECT device_id, seq, ts, temp_c FROM readings;",
        )
        .unwrap();
        overrides.push(("pipelines.dir", pipeline_dir.to_str().unwrap()));
        ("usable.trailers", "telemetry.coldchain")
    } else {
        ("usable.telemetry", "telemetry")
    };
    let config = fleetlake_tests::test_config(nats.url(), &lake, &overrides);
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    let publish = |rows: Vec<(String, u64, u64, bool)>| {
        let js = js.clone();
        async move {
            for (device, seq, at, _) in rows {
                js.publish(format!("{subject}.{device}"), reading_at(&device, seq, at))
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
    };
    let new = |rows: &[(String, u64, u64, bool)]| rows.iter().filter(|r| r.3).count() as i64;
    let (first, second) = (first_half(), second_half());
    let total = (first.len() + second.len()) as i64;

    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    publish(first.clone()).await;
    api.wait_scalar(
        &format!("SELECT count(*) FROM {table}"),
        new(&first),
        Duration::from_secs(60),
    )
    .await;
    fleetlake_tests::wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    assert_eq!(
        api.scalar(&format!("SELECT count(*) FROM {table}")).await,
        new(&first)
    );
    let (_, metrics) = api.get("/metrics").await;
    assert!(
        metrics.contains("fleetlake_dedup_restarts_total 3\n"),
        "{metrics}"
    );
    if pipelines {
        let (_, listing) = api.get("/v1/pipelines").await;
        let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
        assert_eq!(listing["pipelines"][0]["sequence_restarts"], 3, "{listing}");
    }
    engine.shutdown().await.expect("a clean shutdown");
    if !snapshot_on_stop {
        let snapshots = dir
            .path()
            .join(format!("lake/{}/_fleetlake", table.replace('.', "/")));
        std::fs::remove_dir_all(&snapshots).expect("the graceful stop wrote a snapshot");
    }

    let engine = Engine::start(config, Vec::new(), true).await.unwrap();
    let api = Api::new(engine.addr);
    publish(second.clone()).await;
    api.wait_scalar(
        "SELECT count(*) FROM raw.telemetry",
        total,
        Duration::from_secs(60),
    )
    .await;
    fleetlake_tests::wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    // Every reading once: (device, event time) is unique, and each expected one is there.
    let expected = new(&first) + new(&second);
    assert_eq!(
        api.scalar(&format!("SELECT count(*) FROM {table}")).await,
        expected
    );
    assert_eq!(
        api.scalar(&format!(
            "SELECT count(*) FROM (SELECT DISTINCT device_id, seq, ts FROM {table})"
        ))
        .await,
        expected
    );
    for (device, seq, at, _) in first.iter().chain(&second).filter(|r| r.3) {
        let sql = format!(
            "SELECT count(*) FROM {table} WHERE device_id = '{device}' AND seq = {seq} AND ts = to_timestamp_millis({at})"
        );
        assert_eq!(api.scalar(&sql).await, 1, "{sql}");
    }
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebooted_devices_keep_their_readings_and_replays_are_dropped_using_the_snapshot() {
    rebooted_devices_keep_their_readings(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebooted_devices_keep_their_readings_rebuilding_from_usable() {
    rebooted_devices_keep_their_readings(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebooted_devices_keep_their_readings_in_a_pipeline_across_a_rebuild() {
    rebooted_devices_keep_their_readings(true, false).await;
}
