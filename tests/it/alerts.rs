//! Rules and windows end to end, on a real NATS server: a scripted cold-chain scenario — a trailer
//! that stays warm longer than `for`, one that blips and recovers, one whose readings arrive out
//! of order (and one reading far too late) — gives exactly the expected alert transitions on the
//! JetStream alerts stream and exactly the expected final rows; also when the engine is killed
//! (SIGKILL) right after publishing its first alert and restarted. And a window table and a rule
//! that join a reference table (whose upload inferred other types than it declares).

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use fleetlake_tests::{EngineProcess, Nats, wait_for};
use futures::StreamExt;
use serde_json::{Value, json};

const PIPELINE: &str = "
CREATE SOURCE readings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, temp_c DOUBLE)
WITH (subject = 'telemetry.coldchain.>', event_time = 'ts');

CREATE STREAMING TABLE usable.trailers
AS SELECT device_id, seq, ts, temp_c AS temperature_c FROM readings;

CREATE WINDOW TABLE final.trailer_minute
WITH (window = 'tumbling', size = '1m', watermark = '0', allowed_lateness = '30s')
AS SELECT window_start, window_end, device_id, count(*) AS readings, max(temperature_c) AS temp_max
FROM usable.trailers GROUP BY window_start, window_end, device_id;

CREATE RULE warm
WITH (severity = 'critical', key = 'device_id', for = '2m', cool_down = '30m')
AS SELECT device_id, ts, temperature_c, temperature_c > 8 AS firing, temperature_c < 6 AS resolved
FROM usable.trailers;
";

const SLOTS: i64 = 21; // a reading every 30 s from 00:00 to 10:00

/// The temperature of a trailer at slot `i` (00:00 + 30 s × i).
fn temperature(device: &str, i: i64) -> f64 {
    let warm = match device {
        "t-warm" => (2..12).contains(&i), // 01:00 – 05:30: longer than `for`
        "t-blip" => (4..6).contains(&i),  // 02:00 – 02:30: a blip
        "t-late" => (8..18).contains(&i), // 04:00 – 08:30, arriving out of order
        _ => unreachable!(),
    };
    if warm { 10.0 } else { 4.0 }
}

fn time(seconds: i64) -> String {
    format!("2026-01-01T00:{:02}:{:02}Z", seconds / 60, seconds % 60)
}

/// The readings in the order they are published: slot by slot; t-late's come in swapped pairs
/// (slot 2k+1 before 2k); last, a t-late reading from 00:00:10, far too late for its window.
fn schedule() -> Vec<(String, i64, Value)> {
    let mut out = Vec::new();
    let reading = |d: &str, seq: i64, secs: i64, t: f64| {
        (
            d.to_string(),
            seq,
            json!({"device_id": d, "seq": seq, "ts": time(secs), "temp_c": t}),
        )
    };
    for i in 0..SLOTS {
        for d in ["t-warm", "t-blip"] {
            out.push(reading(d, i, i * 30, temperature(d, i)));
        }
        let late = match i {
            i if i % 2 == 1 => vec![i, i - 1],
            i if i == SLOTS - 1 => vec![i],
            _ => vec![],
        };
        for j in late {
            out.push(reading("t-late", j, j * 30, temperature("t-late", j)));
        }
    }
    out.push(reading("t-late", 100, 10, 20.0));
    out
}

/// What the alerts stream must hold: (subject, state, event time).
fn expected_alerts() -> Vec<(String, String, String)> {
    [
        ("t-warm", "firing", 180),   // warm since 01:00, held 2 minutes at 03:00
        ("t-warm", "resolved", 360), // 06:00 is below 6 °C
        ("t-late", "firing", 390),   // 04:00 came after 04:30 and was skipped: held since 04:30
        ("t-late", "resolved", 570), // 09:30 (published before 09:00)
    ]
    .iter()
    .map(|(d, s, t)| {
        (
            format!("alerts.warm.{d}"),
            s.to_string(),
            format!("2026-01-01T00:{:02}:{:02}.000000Z", t / 60, t % 60),
        )
    })
    .collect()
}

/// (device, window start minute, readings, max temperature) of every window the watermark
/// (10:00, allowed lateness 30 s) has closed: minutes 0–8 of each trailer.
fn expected_minutes() -> Vec<(String, i64, i64, f64)> {
    let mut out = Vec::new();
    for d in ["t-blip", "t-late", "t-warm"] {
        for m in 0..9 {
            let hi = temperature(d, 2 * m).max(temperature(d, 2 * m + 1));
            out.push((d.to_string(), m, 2, hi));
        }
    }
    out
}

/// Every alert on the ALERTS stream, in order: (subject, state, event time, message).
pub(crate) async fn alerts(js: &jetstream::Context) -> Vec<(String, String, String, Value)> {
    let Ok(stream) = js.get_stream("ALERTS").await else {
        return Vec::new();
    };
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        out.push((
            m.subject.to_string(),
            v["state"].as_str().unwrap().to_string(),
            v["event_time"].as_str().unwrap().to_string(),
            v,
        ));
    }
    out
}

/// The engine's environment: this NATS, lake and pipelines folder, commits every 300 ms.
pub(crate) fn env(nats: &Nats, lake: &Path, pipelines: &Path) -> Vec<(String, String)> {
    [
        ("FLEETLAKE_NATS_URL", nats.url().to_string()),
        ("FLEETLAKE_LAKE_LOCATION", lake.display().to_string()),
        ("FLEETLAKE_PIPELINES_DIR", pipelines.display().to_string()),
        ("FLEETLAKE_INGEST_COMMIT_INTERVAL_MS", "300".to_string()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect()
}

/// Publishes readings on `telemetry.coldchain.<device>`, each stored before the next.
pub(crate) async fn publish(js: &jetstream::Context, readings: &[(String, i64, Value)]) {
    for (device, _, payload) in readings {
        js.publish(
            format!("telemetry.coldchain.{device}"),
            payload.to_string().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

async fn check_outcome(engine: &EngineProcess, js: &jetstream::Context) {
    let api = &engine.api;
    let total = schedule().len() as i64;
    api.wait_scalar(
        "SELECT count(*) FROM usable.trailers",
        total,
        Duration::from_secs(60),
    )
    .await;
    api.wait_scalar(
        "SELECT count(*) FROM final.alerts",
        4,
        Duration::from_secs(30),
    )
    .await;
    let got = alerts(js).await;
    let got_keys: Vec<(String, String, String)> = got
        .iter()
        .map(|(s, st, t, _)| (s.clone(), st.clone(), t.clone()))
        .collect();
    assert_eq!(
        got_keys,
        expected_alerts(),
        "alert transitions on the stream"
    );
    let first = &got[0].3;
    assert_eq!(first["rule"], "warm");
    assert_eq!(first["severity"], "critical");
    assert_eq!(first["key"], "t-warm");
    assert_eq!(first["values"]["temperature_c"], 10.0);
    assert!(first["alert_id"].as_str().unwrap().starts_with("warm-"));

    // final.alerts holds the same transitions, once each.
    let (_, rows) = api
        .query("SELECT key, state, alert_id FROM final.alerts ORDER BY stream_seq")
        .await;
    let rows = rows["rows"].as_array().unwrap().clone();
    let ids: Vec<&str> = got
        .iter()
        .map(|g| g.3["alert_id"].as_str().unwrap())
        .collect();
    let recorded: Vec<&str> = rows.iter().map(|r| r[2].as_str().unwrap()).collect();
    assert_eq!(recorded, ids, "{rows:?}");

    // The windows the watermark closed, each once; the far-too-late reading is in usable only.
    api.wait_scalar(
        "SELECT count(*) FROM final.trailer_minute",
        27,
        Duration::from_secs(30),
    )
    .await;
    let (_, rows) = api
        .query(
            "SELECT device_id, CAST(extract(minute FROM window_start) AS BIGINT) AS m, readings, temp_max \
             FROM final.trailer_minute ORDER BY device_id, window_start",
        )
        .await;
    let got: Vec<(String, i64, i64, f64)> = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_i64().unwrap(),
                r[2].as_i64().unwrap(),
                r[3].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected_minutes());
    assert_eq!(
        api.scalar("SELECT count(*) FROM usable.trailers WHERE seq = 100")
            .await,
        1
    );
}

fn pipelines(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("pipelines");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("trailers.sql"), PIPELINE).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_scenario_gives_exactly_the_expected_alerts_and_final_rows() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let env = env(&nats, &dir.path().join("lake"), &pipelines(dir.path()));
    let log = dir.path().join("engine.log");
    let engine = EngineProcess::start(&env, &log).await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    stream_ready(&js).await;
    publish(&js, &schedule()).await;
    check_outcome(&engine, &js).await;
    engine.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_stay_exactly_once_when_the_engine_is_killed_after_publishing() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let dir = dir.path();
    let env = env(&nats, &dir.join("lake"), &pipelines(dir));
    let log = dir.join("engine.log");
    let engine = EngineProcess::start(&env, &log).await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    stream_ready(&js).await;
    let readings = schedule();
    let (first, rest) = readings.split_at(readings.len() / 2);
    publish(&js, first).await;
    // Kill as soon as the first alert is on the stream: before (or while) its micro-batch
    // commits, so the restarted engine derives and publishes it again.
    wait_for("the first alert", Duration::from_secs(60), || {
        let js = js.clone();
        async move { (!alerts(&js).await.is_empty()).then_some(()) }
    })
    .await;
    engine.kill().await;
    publish(&js, rest).await;
    let engine = EngineProcess::start(&env, &log).await;
    check_outcome(&engine, &js).await;
    // A second crash after everything was committed changes nothing either.
    engine.kill().await;
    let engine = EngineProcess::start(&env, &log).await;
    check_outcome(&engine, &js).await;
    engine.terminate().await;
}

/// A table behind the others (here final.alerts, as after a crash between usable's commit and
/// its own) gets every row again after a restart: the consumer resumes at the lowest position, and
/// the pipeline's dedup state is rebuilt as of that position, so the messages that come again are
/// judged as the first time (it used to be rebuilt as of usable's position and dropped them all as
/// replays, so the rule never saw them and final.alerts lost its transitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_behind_the_others_is_filled_again_after_a_restart() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let dir = dir.path();
    let env = env(&nats, &dir.join("lake"), &pipelines(dir));
    let log = dir.join("engine.log");
    let engine = EngineProcess::start(&env, &log).await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    stream_ready(&js).await;
    publish(&js, &schedule()).await;
    check_outcome(&engine, &js).await;
    assert!(engine.terminate().await.success());
    std::fs::remove_dir_all(dir.join("lake/final/alerts")).unwrap();
    let engine = EngineProcess::start(&env, &log).await;
    check_outcome(&engine, &js).await;
    assert!(engine.terminate().await.success());
}

const WITH_LIMITS: &str = "
CREATE SOURCE readings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, temp_c DOUBLE)
WITH (subject = 'telemetry.coldchain.>', event_time = 'ts');

CREATE STREAMING TABLE usable.trailers
AS SELECT device_id, seq, ts, temp_c AS temperature_c FROM readings;

CREATE REFERENCE TABLE reference.limits (device_id VARCHAR, max_c DOUBLE);

CREATE WINDOW TABLE final.limit_minute
WITH (window = 'tumbling', size = '1m', watermark = '0', allowed_lateness = '0s')
AS SELECT window_start, window_end, t.device_id, max(l.max_c) AS max_c, count(*) AS readings
FROM usable.trailers t JOIN reference.limits l ON t.device_id = l.device_id
GROUP BY window_start, window_end, t.device_id;

CREATE RULE over_limit WITH (key = 'device_id')
AS SELECT t.device_id, t.ts, t.temperature_c, l.max_c, t.temperature_c > l.max_c AS firing
FROM usable.trailers t JOIN reference.limits l ON t.device_id = l.device_id;
";

/// (device, window start minute, max_c, readings) in final.limit_minute, in order.
async fn limit_minutes(api: &fleetlake_tests::Api) -> Value {
    let (_, rows) = api
        .query(
            "SELECT device_id, CAST(extract(minute FROM window_start) AS BIGINT), max_c, readings \
             FROM final.limit_minute ORDER BY window_start, device_id",
        )
        .await;
    rows["rows"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_and_rules_join_reference_tables_also_after_a_restart() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let p = dir.path().join("pipelines");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("limits.sql"), WITH_LIMITS).unwrap();
    let env = env(&nats, &dir.path().join("lake"), &p);
    let log = dir.path().join("engine.log");
    let engine = EngineProcess::start(&env, &log).await;
    let status = engine
        .api
        .http(
            reqwest::Method::PUT,
            format!("{}/v1/reference/limits", engine.api.base),
        )
        .header("content-type", "text/csv")
        .body("device_id,max_c\nt-a,5\nt-b,50\n")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    stream_ready(&js).await;
    let reading = |d: &str, seq: i64, secs: i64| {
        (
            d.to_string(),
            seq,
            json!({"device_id": d, "seq": seq, "ts": time(secs), "temp_c": 10.0}),
        )
    };
    // Minute 0 for both, then 00:01:10 closes it.
    publish(
        &js,
        &[
            reading("t-a", 1, 0),
            reading("t-b", 1, 0),
            reading("t-a", 2, 70),
            reading("t-b", 2, 70),
        ],
    )
    .await;
    engine.api.wait_acked(4).await;
    let subjects: Vec<String> = alerts(&js).await.into_iter().map(|a| a.0).collect();
    assert_eq!(
        subjects,
        ["alerts.over_limit.t-a"],
        "10 °C is over t-a's 5 °C only"
    );
    assert_eq!(
        limit_minutes(&engine.api).await,
        json!([["t-a", 0, 5.0, 1], ["t-b", 0, 50.0, 1]])
    );

    // Killed and restarted: the open minute is rebuilt from usable rows joined with the
    // reference table, and closes with both of its readings counted.
    engine.kill().await;
    let engine = EngineProcess::start(&env, &log).await;
    publish(&js, &[reading("t-a", 3, 140)]).await;
    engine.api.wait_acked(1).await;
    assert_eq!(
        limit_minutes(&engine.api).await.as_array().unwrap()[2..],
        json!([["t-a", 1, 5.0, 1], ["t-b", 1, 50.0, 1]])
            .as_array()
            .unwrap()[..]
    );
    assert_eq!(
        alerts(&js).await.len(),
        1,
        "t-a is still firing: no new transition"
    );
    engine.terminate().await;
}

/// Waits until the engine has created the telemetry stream (ingest does, after HTTP is up).
pub(crate) async fn stream_ready(js: &jetstream::Context) {
    wait_for("the stream", Duration::from_secs(30), || {
        let js = js.clone();
        async move { js.get_stream("TELEMETRY").await.ok().map(|_| ()) }
    })
    .await;
}

/// The value of a counter on `/metrics`.
async fn counter(api: &fleetlake_tests::Api, name: &str) -> u64 {
    let (_, metrics) = api.get("/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_window_table_is_backfilled_from_its_input_not_from_the_stream() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let p = dir.path().join("pipelines");
    std::fs::create_dir_all(&p).unwrap();
    let (pipeline, _) = PIPELINE.split_once("CREATE WINDOW TABLE").unwrap();
    std::fs::write(p.join("trailers.sql"), pipeline).unwrap();
    let env = env(&nats, &dir.path().join("lake"), &p);
    let log = dir.path().join("engine.log");
    let engine = EngineProcess::start(&env, &log).await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    stream_ready(&js).await;
    let reading = |seq: i64, secs: i64| {
        (
            "t-a".to_string(),
            seq,
            json!({"device_id": "t-a", "seq": seq, "ts": time(secs), "temp_c": 4.0}),
        )
    };
    let before: Vec<_> = [0, 30, 60, 90, 130]
        .iter()
        .enumerate()
        .map(|(i, s)| reading(i as i64, *s))
        .collect();
    publish(&js, &before).await;
    engine.api.wait_acked(5).await;
    engine.terminate().await;

    // The window table is new at the restart: it is filled from usable.trailers, and the
    // consumer does not go back to the stream's start for it.
    std::fs::write(
        p.join("minutes.sql"),
        "CREATE WINDOW TABLE final.backfilled
         WITH (window = 'tumbling', size = '1m', watermark = '0', allowed_lateness = '0s')
         AS SELECT window_start, window_end, device_id, count(*) AS readings
         FROM usable.trailers GROUP BY window_start, window_end, device_id;",
    )
    .unwrap();
    let engine = EngineProcess::start(&env, &log).await;
    let api = &engine.api;
    api.wait_scalar(
        "SELECT count(*) FROM final.backfilled",
        2,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(counter(api, "fleetlake_messages_pulled_total").await, 0);

    // Minute 2 was open after the backfill (00:02:10); 00:03:05 closes it.
    publish(&js, &[reading(5, 185)]).await;
    api.wait_acked(1).await;
    let (_, rows) = api
        .query(
            "SELECT CAST(extract(minute FROM window_start) AS BIGINT), readings FROM final.backfilled ORDER BY window_start",
        )
        .await;
    assert_eq!(rows["rows"], json!([[0, 2], [1, 2], [2, 1]]), "{rows}");
    assert_eq!(counter(api, "fleetlake_messages_pulled_total").await, 1);
    engine.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_and_rules_over_the_built_in_decoders_table_see_each_reading_once() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let p = dir.path().join("pipelines");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(
        p.join("telemetry.sql"),
        "CREATE WINDOW TABLE final.tel_minute
         WITH (window = 'tumbling', size = '1m', watermark = '0', allowed_lateness = '0s')
         AS SELECT window_start, window_end, device_id, count(*) AS readings, max(temperature) AS temp_max
         FROM usable.telemetry GROUP BY window_start, window_end, device_id;

         CREATE RULE tel_hot WITH (key = 'device_id')
         AS SELECT device_id, ts, temperature, temperature > 40 AS firing FROM usable.telemetry;",
    )
    .unwrap();
    let env = env(&nats, &dir.path().join("lake"), &p);
    let log = dir.path().join("engine.log");
    let engine = EngineProcess::start(&env, &log).await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    stream_ready(&js).await;
    // The default envelope on any subject no pipeline claims; (d1, 2) is sent twice (a device
    // replay), and one message does not decode.
    let readings = [
        ("d1", 1, 0, 20.0),
        ("d1", 2, 30, 50.0),
        ("d1", 2, 30, 50.0),
        ("d2", 1, 40, 21.0),
        ("d1", 3, 70, 22.0),
    ];
    for (device, seq, secs, t) in readings {
        let payload = json!({"device_id": device, "seq": seq, "ts": time(secs), "temperature": t});
        js.publish(
            format!("telemetry.env.{device}"),
            payload.to_string().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    js.publish("telemetry.env.d3", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let api = &engine.api;
    api.wait_acked(6).await;
    let got: Vec<(String, String)> = alerts(&js).await.into_iter().map(|a| (a.0, a.1)).collect();
    assert_eq!(
        got,
        [
            ("alerts.tel_hot.d1".to_string(), "firing".to_string()),
            ("alerts.tel_hot.d1".to_string(), "resolved".to_string())
        ]
    );
    let (_, rows) = api
        .query("SELECT device_id, readings, temp_max FROM final.tel_minute ORDER BY device_id")
        .await;
    assert_eq!(
        rows["rows"],
        json!([["d1", 2, 50.0], ["d2", 1, 21.0]]),
        "minute 0 without the replay: {rows}"
    );
    assert_eq!(api.scalar("SELECT count(*) FROM raw.quarantine").await, 1);
    engine.terminate().await;
}
