//! The latest state of every device (`final.device_state`, `GET /v1/devices`) against a full scan
//! of the usable table, on a real NATS server, after a run with late readings, replays and two
//! SIGKILLs (with a backlog published while the engine was down), and again after a clean restart.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetlake_tests::{Api, EngineProcess, Nats};
use serde_json::{Value, json};

use crate::alerts::{env, publish, stream_ready};

const PIPELINE: &str = "
CREATE SOURCE readings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, temp_c DOUBLE, site VARCHAR)
WITH (subject = 'telemetry.coldchain.>', event_time = 'ts');

CREATE STREAMING TABLE usable.trailers
AS SELECT device_id, seq, ts, temp_c AS temperature_c, site FROM readings;
";

const DEVICES: i64 = 300;
const READINGS: i64 = 12;

/// Every reading in publish order: devices interleaved; each device's every 4th reading held
/// back and published two readings later (late: older event time than what came before it);
/// every 5th published twice (a replay); last, one reading per device from long before.
fn schedule() -> Vec<(String, i64, Value)> {
    let mut out = Vec::new();
    let mut held: BTreeMap<i64, Vec<(String, i64, Value)>> = BTreeMap::new();
    for seq in 1..=READINGS {
        for d in 0..DEVICES {
            let device = format!("t-{d:03}");
            let ts = format!("2026-01-01T00:{:02}:{:02}Z", seq * 10 / 60, seq * 10 % 60);
            let reading = (
                device.clone(),
                seq,
                json!({"device_id": device, "seq": seq, "ts": ts,
                       "temp_c": (d * 100 + seq) as f64 / 10.0, "site": format!("site-{}", d % 3)}),
            );
            if seq % 4 == 0 && seq < READINGS - 2 {
                held.entry(seq + 2).or_default().push(reading);
                continue;
            }
            if seq % 5 == 0 {
                out.push(reading.clone());
            }
            out.push(reading);
        }
        out.extend(held.remove(&seq).unwrap_or_default());
    }
    // Last, a reading of each device from long before: the newest stays the newest.
    for d in 0..DEVICES {
        let device = format!("t-{d:03}");
        out.push((
            device.clone(),
            100,
            json!({"device_id": device, "seq": 100, "ts": "2026-01-01T00:00:05Z",
                   "temp_c": -99.0, "site": format!("site-{}", d % 3)}),
        ));
    }
    out
}

/// The newest reading of each device by a full scan: (ts, stream_seq, temperature).
async fn scanned(api: &Api) -> BTreeMap<String, (String, i64, f64)> {
    let (status, v) = api
        .query(
            "SELECT device_id, CAST(ts AS VARCHAR), stream_seq, temperature_c FROM ( \
               SELECT *, row_number() OVER (PARTITION BY device_id ORDER BY ts DESC, stream_seq DESC) AS rn \
               FROM usable.trailers) WHERE rn = 1",
        )
        .await;
    assert_eq!(status, 200, "{v}");
    rows(&v)
}

/// The same from `final.device_state`.
async fn kept(api: &Api) -> BTreeMap<String, (String, i64, f64)> {
    let (status, v) = api
        .query(
            "SELECT device_id, CAST(ts AS VARCHAR), stream_seq, \
               CAST(json_extract_temp AS DOUBLE) FROM ( \
               SELECT device_id, ts, stream_seq, \
                 CAST(regexp_match(reading, '\"temperature_c\":([-0-9.e]+)')[1] AS DOUBLE) AS json_extract_temp \
               FROM final.device_state WHERE table_name = 'usable.trailers')",
        )
        .await;
    assert_eq!(status, 200, "{v}");
    rows(&v)
}

fn rows(v: &Value) -> BTreeMap<String, (String, i64, f64)> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                (
                    r[1].as_str().unwrap().to_string(),
                    r[2].as_i64().unwrap(),
                    r[3].as_f64().unwrap(),
                ),
            )
        })
        .collect()
}

async fn check(api: &Api) {
    // Right after a start the state is being restored: 503 not_ready, never a wrong answer.
    fleetlake_tests::wait_for("the device state", Duration::from_secs(60), || async {
        let (status, body) = api.get("/v1/devices/t-000").await;
        if status == 503 {
            assert!(body.contains("not_ready"), "{body}");
        }
        (status == 200).then_some(())
    })
    .await;
    let scan = scanned(api).await;
    assert_eq!(scan.len(), DEVICES as usize);
    assert_eq!(
        kept(api).await,
        scan,
        "final.device_state against a full scan"
    );
    // Each device over HTTP, for a sample of them.
    for d in (0..DEVICES).step_by(37) {
        let device = format!("t-{d:03}");
        let (status, body) = api.get(&format!("/v1/devices/{device}")).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let t = &v["tables"][0];
        let (_, seq, temp) = &scan[&device];
        assert_eq!(t["table"], "usable.trailers");
        assert_eq!(t["stream_seq"].as_i64().unwrap(), *seq, "{v}");
        assert_eq!(
            t["reading"]["temperature_c"].as_f64().unwrap(),
            *temp,
            "{v}"
        );
        assert_eq!(
            t["reading"]["seq"].as_i64().unwrap(),
            READINGS,
            "the newest reading: {v}"
        );
        // Last heard from with the late reading, though it did not replace the newest.
        assert!(t["last_seen_seq"].as_i64().unwrap() > *seq, "{v}");
        assert_eq!(t["cohort"]["site"], format!("site-{}", d % 3));
    }
    let (status, body) = api.get("/v1/devices?site=site-1&limit=10").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["matched"], 100);
    assert_eq!(v["devices"].as_array().unwrap().len(), 10);
    assert_eq!(v["next_offset"], 10);
    assert_eq!(
        (v["limit"].as_i64(), v["offset"].as_i64()),
        (Some(10), Some(0))
    );
    // A table without device state is a mistake, not "no devices".
    let (status, body) = api.get("/v1/devices?table=raw.telemetry").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("usable.trailers"),
        "names the tables there are: {body}"
    );
    let (status, _) = api.get("/v1/devices/nobody").await;
    assert_eq!(status, 404);
    let (status, body) = api.get("/v1/devices/a/b").await;
    assert_eq!(status, 404);
    assert!(
        body.contains("not_found"),
        "an unknown route answers in the error shape: {body}"
    );
    // A route asked with a method it does not take says which it takes.
    let (status, body) = api.get("/v1/query").await;
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("method_not_allowed"), "{body}");
    assert!(body.contains("POST /v1/query"), "{body}");
    let (status, body) = api.get("/v1/devices?silent_for=soon").await;
    assert_eq!(status, 400);
    assert!(body.contains("silent_for"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_state_agrees_with_a_full_scan_after_sigkills_late_readings_and_replays() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let dir = dir.path();
    let p = dir.join("pipelines");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("trailers.sql"), PIPELINE).unwrap();
    let mut env = env(&nats, &dir.join("lake"), &p);
    // Snapshots every second, so restarts restore from one and rebuild the rest.
    env.push(("FLEETLAKE_DEDUP_SNAPSHOT_INTERVAL_S".into(), "1".into()));
    let log = dir.join("engine.log");
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    let readings = schedule();
    let third = readings.len() / 3;
    let mut engine = EngineProcess::start(&env, &log).await;
    stream_ready(&js).await;
    for part in readings.chunks(third) {
        publish(&js, &part[..part.len() / 2]).await;
        engine.kill().await;
        // A backlog while the engine is down.
        publish(&js, &part[part.len() / 2..]).await;
        engine = EngineProcess::start(&env, &log).await;
    }
    fleetlake_tests::wait_stream_acked(nats.url(), Duration::from_secs(120)).await;
    check(&engine.api).await;
    // A clean stop stores a snapshot; the next start restores it exactly.
    assert!(engine.terminate().await.success());
    let engine = EngineProcess::start(&env, &log).await;
    check(&engine.api).await;
    engine.terminate().await;
}
