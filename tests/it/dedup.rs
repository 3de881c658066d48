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
