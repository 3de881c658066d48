//! Rules changed at runtime over `/v1/rules`, on a real NATS server and the real binary: a bad
//! rule is refused with where and why, a created rule fires on the next readings, a changed rule
//! fires by its new condition only, a deleted rule falls silent; every change is a file under
//! `pipelines.dir` and a row of `final.rule_audit`, and survives a restart. A rule created at
//! runtime keeps its state (a firing key) across SIGKILL.

use std::time::Duration;

use crate::alerts::env;
use async_nats::jetstream;
use fleetlake_tests::{Api, EngineProcess, Nats, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const PIPELINE: &str = "
CREATE SOURCE readings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, temp_c DOUBLE)
WITH (subject = 'telemetry.coldchain.>', event_time = 'ts');

CREATE STREAMING TABLE usable.trailers
AS SELECT device_id, seq, ts, temp_c AS temperature_c FROM readings;
";

/// A file declaring a rule among other statements (here: a reference table).
const OTHER: &str = "
CREATE REFERENCE TABLE reference.sites (site VARCHAR);

CREATE RULE in_file WITH (key = 'device_id')
AS SELECT device_id, ts, temperature_c < -30 AS firing FROM usable.trailers;
";

fn rule(threshold: i64) -> String {
    format!(
        "-- hot trailers\nCREATE RULE hot WITH (severity = 'critical', key = 'device_id')\n\
         AS SELECT device_id, ts, temperature_c, temperature_c > {threshold} AS firing\n\
         FROM usable.trailers;\n"
    )
}

/// The subjects of the alerts on the ALERTS stream, in order.
async fn alert_subjects(js: &jetstream::Context) -> Vec<String> {
    crate::alerts::alerts(js)
        .await
        .into_iter()
        .map(|a| a.0)
        .collect()
}

/// Waits until `subject` has an alert on the ALERTS stream.
async fn wait_alert(js: &jetstream::Context, subject: &str) {
    wait_for(subject, Duration::from_secs(30), || async {
        alert_subjects(js)
            .await
            .iter()
            .any(|s| s == subject)
            .then_some(())
    })
    .await
}

/// Publishes one reading per device, at increasing times.
async fn publish(js: &jetstream::Context, readings: &[(&str, f64)], seq: &mut i64) {
    let mut out = Vec::new();
    for (device, t) in readings {
        *seq += 1;
        let ts = format!("2026-01-01T00:00:{:02}Z", *seq);
        let payload = json!({"device_id": device, "seq": *seq, "ts": ts, "temp_c": t});
        out.push((device.to_string(), *seq, payload));
    }
    crate::alerts::publish(js, &out).await;
}

/// A running engine over the trailers pipeline (plus `rules`, as files under `rules/`), and
/// what a test needs to restart it.
struct Setup {
    _nats: Nats,
    _dir: fleetlake_tests::TestDir,
    pipelines: std::path::PathBuf,
    env: Vec<(String, String)>,
    log: std::path::PathBuf,
    js: jetstream::Context,
}

async fn start(rules: &[(&str, String)]) -> (Setup, EngineProcess) {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(pipelines.join("rules")).unwrap();
    std::fs::write(pipelines.join("trailers.sql"), PIPELINE).unwrap();
    for (name, text) in rules {
        std::fs::write(pipelines.join(format!("rules/{name}.sql")), text).unwrap();
    }
    let env = env(&nats, &dir.path().join("lake"), &pipelines);
    let log = dir.path().join("engine.log");
    let engine = EngineProcess::start(&env, &log).await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    crate::alerts::stream_ready(&js).await;
    let setup = Setup {
        _nats: nats,
        _dir: dir,
        pipelines,
        env,
        log,
        js,
    };
    (setup, engine)
}

/// `api` as the engineer `author` (a token of that name, created once per test process;
/// the author recorded in final.rule_audit is the token's name), or with no token at all.
async fn as_author(api: &Api, author: Option<&str>) -> Api {
    // Held while a token is made, so that two tests never both make "alice".
    static TOKENS: tokio::sync::Mutex<Vec<(String, String)>> =
        tokio::sync::Mutex::const_new(Vec::new());
    let Some(author) = author else {
        return api.with_token(None);
    };
    let mut tokens = TOKENS.lock().await;
    if let Some((_, t)) = tokens.iter().find(|(a, _)| a == author) {
        return api.with_token(Some(t));
    }
    let (status, created) = api
        .send(
            Method::POST,
            "/v1/tokens",
            None,
            &json!({"name": author, "role": "engineer"}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().unwrap().to_string();
    tokens.push((author.to_string(), token.clone()));
    api.with_token(Some(&token))
}

async fn put(api: &Api, name: &str, author: Option<&str>, sql: &str) -> (u16, Value) {
    as_author(api, author)
        .await
        .send(Method::PUT, &format!("/v1/rules/{name}"), None, sql)
        .await
}

async fn delete(api: &Api, name: &str, author: &str) -> (u16, Value) {
    as_author(api, Some(author))
        .await
        .send(Method::DELETE, &format!("/v1/rules/{name}"), None, "")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_created_changed_and_deleted_at_runtime_with_an_audit_trail() {
    let (setup, engine) = start(&[]).await;
    let Setup {
        pipelines,
        env,
        log,
        js,
        ..
    } = &setup;
    let api = engine.api.clone();
    let mut seq = 0;
    let file = pipelines.join("rules/hot.sql");

    let (status, listed) = api.send(Method::GET, "/v1/rules", None, "").await;
    assert_eq!((status, listed), (200, json!({"rules": []})));

    // Refused, with where and why; nothing is written.
    let (status, body) = put(&api, "hot", None, &rule(8)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let bad = rule(8).replace("temperature_c > 8", "temp > 8");
    let (status, body) = put(&api, "hot", Some("alice"), &bad).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("rules/hot.sql:2:"), "{message}");
    assert!(message.contains("temp"), "{message}");
    let (status, body) = put(&api, "cold", Some("alice"), &rule(8)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("creates rule hot but the URL names cold"),
        "{body}"
    );
    let (status, body) = put(&api, "Hot.x", Some("alice"), &rule(8)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_name"))
    );
    assert!(!file.exists());

    // Created: fires on the next warm reading.
    let (status, created) = put(&api, "hot", Some("alice"), &rule(8)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["applied"], true, "{created}");
    assert_eq!(created["warnings"], json!([]), "{created}");
    assert_eq!(created["managed"], true);
    let v1 = created["version"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), rule(8));
    publish(js, &[("t1", 10.0)], &mut seq).await;
    wait_alert(js, "alerts.hot.t1").await;
    // What the rule does now: one key firing, one alert since the start.
    wait_for("hot firing for t1", Duration::from_secs(30), || async {
        let (_, got) = api.send(Method::GET, "/v1/rules/hot", None, "").await;
        (got["firing_keys"] == 1 && got["alerts_since_start"]["firing"] == 1).then_some(())
    })
    .await;
    let (_, metrics) = api.get("/metrics").await;
    assert!(
        metrics.contains("fleetlake_rule_keys_firing{rule=\"hot\"} 1"),
        "{metrics}"
    );
    let (status, same) = put(&api, "hot", Some("alice"), &rule(8)).await;
    assert_eq!((status, &same["changed"]), (200, &json!(false)), "{same}");

    // Changed: 15 °C no longer fires, 25 °C does.
    let (status, changed) = put(&api, "hot", Some("bob"), &rule(20)).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["action"], "changed");
    assert_eq!(changed["applied"], true);
    let v2 = changed["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);
    publish(js, &[("t2", 15.0), ("t3", 25.0)], &mut seq).await;
    wait_alert(js, "alerts.hot.t3").await;

    // Deleted: silent from then on.
    let (status, deleted) = delete(&api, "hot", "carol").await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["applied"], true);
    assert!(!file.exists());
    publish(js, &[("t4", 30.0)], &mut seq).await;
    api.wait_acked(seq as u64).await;
    assert_eq!(
        alert_subjects(js).await,
        vec!["alerts.hot.t1", "alerts.hot.t3"]
    );
    let (status, _) = api.send(Method::GET, "/v1/rules/hot", None, "").await;
    assert_eq!(status, 404);

    // Who, when, what.
    let (_, audit) = api
        .query(
            "SELECT author, action, rule, version, previous_version, sql FROM final.rule_audit ORDER BY change_seq",
        )
        .await;
    let rows = audit["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{audit}");
    assert_eq!(
        rows[0],
        json!(["alice", "created", "hot", v1, null, rule(8)])
    );
    assert_eq!(rows[1], json!(["bob", "changed", "hot", v2, v1, rule(20)]));
    assert_eq!(rows[2], json!(["carol", "deleted", "hot", null, v2, null]));
    let (_, tables) = api.get("/v1/tables").await;
    let tables: Value = serde_json::from_str(&tables).unwrap();
    let names: Vec<&str> = tables["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    for t in ["usable.trailers", "final.alerts", "final.rule_audit"] {
        assert!(names.contains(&t), "GET /v1/tables: {names:?}");
    }

    // A rule created over HTTP is a file: it is there after a restart.
    let (status, _) = put(&api, "hot", Some("alice"), &rule(50)).await;
    assert_eq!(status, 201);
    engine.terminate().await;
    std::fs::write(pipelines.join("other.sql"), OTHER).unwrap();
    let engine = EngineProcess::start(env, log).await;
    let api = engine.api.clone();
    let (status, got) = api.send(Method::GET, "/v1/rules/hot", None, "").await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["sql"], rule(50));
    assert_eq!(
        got["version"],
        put(&api, "hot", Some("a"), &rule(50)).await.1["version"]
    );

    // A rule declared among other statements is listed, not managed here.
    let (_, listed) = api.send(Method::GET, "/v1/rules", None, "").await;
    let names: Vec<&Value> = listed["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["name"])
        .collect();
    assert_eq!(names, [&json!("hot"), &json!("in_file")]);
    assert_eq!(listed["rules"][1]["managed"], false);
    assert_eq!(listed["rules"][1]["file"], "other.sql");
    let in_file = rule(8).replace("RULE hot", "RULE in_file");
    let (status, body) = put(&api, "in_file", Some("alice"), &in_file).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = delete(&api, "in_file", "alice").await;
    assert_eq!(status, 409, "{body}");
    publish(js, &[("t5", 60.0)], &mut seq).await;
    wait_alert(js, "alerts.hot.t5").await;
    engine.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_created_at_runtime_keeps_its_state_across_sigkill() {
    let (setup, engine) = start(&[]).await;
    let Setup { env, log, js, .. } = &setup;
    let mut seq = 0;
    let (status, body) = put(&engine.api, "hot", Some("alice"), &rule(8)).await;
    assert_eq!((status, &body["applied"]), (201, &json!(true)), "{body}");
    publish(js, &[("t1", 10.0)], &mut seq).await;
    wait_alert(js, "alerts.hot.t1").await;
    // Killed right after the alert: the batch may not be committed yet.
    engine.kill().await;
    let engine = EngineProcess::start(env, log).await;
    // t1 is still firing after the restart, so cooling down resolves it; t2 fires.
    publish(js, &[("t1", 4.0), ("t2", 12.0)], &mut seq).await;
    // All three transitions committed (so everything they came from was processed).
    engine
        .api
        .wait_scalar(
            "SELECT count(*) FROM final.alerts",
            3,
            Duration::from_secs(60),
        )
        .await;
    let got: Vec<(String, String)> = crate::alerts::alerts(js)
        .await
        .into_iter()
        .map(|a| (a.0, a.1))
        .collect();
    let expected = [
        ("alerts.hot.t1", "firing"),
        ("alerts.hot.t1", "resolved"),
        ("alerts.hot.t2", "firing"),
    ]
    .map(|(s, st)| (s.to_string(), st.to_string()));
    assert_eq!(got, expected);
    assert_eq!(
        engine.api.scalar("SELECT count(*) FROM final.alerts").await,
        3
    );
    engine.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_stream_is_created_again_when_deleted_while_running() {
    let (setup, engine) = start(&[("hot", rule(8))]).await;
    let js = &setup.js;
    let mut seq = 0;
    publish(js, &[("t1", 10.0)], &mut seq).await;
    wait_alert(js, "alerts.hot.t1").await;
    // An operator deletes the stream: the next alert re-creates it instead of failing forever.
    js.delete_stream("ALERTS").await.unwrap();
    publish(js, &[("t2", 10.0)], &mut seq).await;
    wait_alert(js, "alerts.hot.t2").await;
    assert_eq!(alert_subjects(js).await, ["alerts.hot.t2"]);
    engine.terminate().await;
}
