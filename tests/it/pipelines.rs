//! Declared pipelines in the running engine: routing by subject, firmware variants, live
//! reference data, every expectation action, and refusing pipelines that do not check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetlake::config::Config;
use fleetlake::serve::Engine;
use fleetlake_tests::{Api, Nats, wait_for};
use serde_json::json;

fn shipped_pipelines() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines")
}

fn config(nats: &Nats, lake: &Path, pipelines: &Path) -> Config {
    let pipelines = pipelines.display().to_string();
    fleetlake_tests::test_config(
        nats.url(),
        &lake.display().to_string(),
        &[("pipelines.dir", &pipelines)],
    )
}

/// A pipelines folder in `dir` holding one file.
fn one_pipeline(dir: &Path, file: &str, text: &str) -> PathBuf {
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    std::fs::write(pipelines.join(file), text).unwrap();
    pipelines
}

/// Publishes one JSON payload and waits for JetStream to store it.
async fn publish_json(
    js: &async_nats::jetstream::Context,
    subject: &str,
    payload: serde_json::Value,
) {
    js.publish(subject.to_string(), payload.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn put_devices(api: &Api, csv: &str) {
    let r = api
        .http(
            reqwest::Method::PUT,
            format!("{}/v1/reference/devices", api.base),
        )
        .header("content-type", "text/csv")
        .body(csv.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

async fn raw_rows(api: &Api, n: i64) {
    api.wait_scalar(
        "SELECT count(*) FROM raw.telemetry",
        n,
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_chain_pipeline_normalizes_enriches_and_applies_expectations() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let config = config(&nats, &dir.path().join("lake"), &shipped_pipelines());
    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    put_devices(&api, "device_id,tenant,site,model,hw_rev\ntrailer-1,acme,berlin,T-200,rev-B\ntrailer-2,acme,paris,T-300,rev-C\n").await;

    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    let ts = "2025-11-23T10:00:00Z";
    let messages: Vec<(&str, String)> = vec![
        // firmware 1.x reports Fahrenheit, 2.x Celsius
        ("telemetry.coldchain.trailer-1", json!({"device_id":"trailer-1","seq":1,"ts":ts,"temp_f":41.0,"door_open":false,"lat":52.5,"lon":13.4,"battery":90,"fw":"1.9.0"}).to_string()),
        ("telemetry.coldchain.trailer-2", json!({"device_id":"trailer-2","seq":1,"ts":ts,"temp_c":4.5,"lat":48.8,"lon":2.3,"battery":80,"fw":"2.1.0"}).to_string()),
        // no temperature at all → quarantine (temperature_reported)
        ("telemetry.coldchain.trailer-1", json!({"device_id":"trailer-1","seq":2,"ts":ts,"lat":52.5,"lon":13.4}).to_string()),
        // implausible → quarantine (temperature_plausible)
        ("telemetry.coldchain.trailer-1", json!({"device_id":"trailer-1","seq":3,"ts":ts,"temp_c":80.0,"lat":52.5,"lon":13.4}).to_string()),
        // battery out of range → dropped
        ("telemetry.coldchain.trailer-2", json!({"device_id":"trailer-2","seq":2,"ts":ts,"temp_c":4.0,"lat":48.8,"lon":2.3,"battery":150}).to_string()),
        // no position → kept, warned (has_position)
        ("telemetry.coldchain.trailer-2", json!({"device_id":"trailer-2","seq":3,"ts":ts,"temp_c":4.1}).to_string()),
        // not JSON → quarantine
        ("telemetry.coldchain.trailer-1", "not json".to_string()),
        // no device_id → quarantine
        ("telemetry.coldchain.trailer-1", json!({"seq":9,"ts":ts,"temp_c":3.0}).to_string()),
        // unknown device → kept, warned (known_device), no tenant
        ("telemetry.coldchain.trailer-9", json!({"device_id":"trailer-9","seq":1,"ts":ts,"temp_c":2.0,"lat":1.0,"lon":1.0}).to_string()),
        // not a cold-chain subject → the built-in envelope decoder
        ("telemetry.dev-1", json!({"device_id":"dev-1","seq":1,"ts":ts,"temperature":20.0}).to_string()),
    ];
    for (subject, payload) in &messages {
        js.publish(subject.to_string(), payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    raw_rows(&api, 10).await;
    api.wait_acked(10).await;

    let (status, body) = api
        .query("SELECT device_id, seq, temperature_c, tenant, site, hw_rev, stream_seq FROM usable.cold_chain ORDER BY stream_seq")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["rows"],
        json!([
            ["trailer-1", 1, 5.0, "acme", "berlin", "rev-B", 1],
            ["trailer-2", 1, 4.5, "acme", "paris", "rev-C", 2],
            ["trailer-2", 3, 4.1, "acme", "paris", "rev-C", 6],
            ["trailer-9", 1, 2.0, null, null, null, 9],
        ]),
        "{body}"
    );
    let (_, q) = api
        .query("SELECT stream_seq, reason FROM raw.quarantine ORDER BY stream_seq")
        .await;
    let rows = q["rows"].as_array().unwrap();
    let reasons: Vec<(i64, String)> = rows
        .iter()
        .map(|r| (r[0].as_i64().unwrap(), r[1].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        reasons.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![3, 4, 7, 8],
        "{reasons:?}"
    );
    assert!(
        reasons[0]
            .1
            .contains("expectation temperature_reported of usable.cold_chain failed"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].1.contains("expectation temperature_plausible"),
        "{reasons:?}"
    );
    assert!(reasons[2].1.contains("not a JSON object"), "{reasons:?}");
    assert!(
        reasons[3].1.contains("missing required field device_id"),
        "{reasons:?}"
    );
    assert_eq!(api.scalar("SELECT count(*) FROM usable.telemetry").await, 1);

    let (_, pipelines) = api.get("/v1/pipelines").await;
    let pipelines: serde_json::Value = serde_json::from_str(&pipelines).unwrap();
    let cold = pipelines["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "cold_chain")
        .unwrap()
        .clone();
    assert_eq!(
        cold["rows"],
        json!({"in": 9, "deduplicated": 0, "out": 4, "quarantined": 4, "dropped": 1, "warned": 2}),
        "{cold}"
    );
    let violations = |name: &str| {
        cold["expectations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["expectation"] == name)
            .unwrap()["violations"]
            .clone()
    };
    assert_eq!(violations("temperature_reported"), 1);
    assert_eq!(violations("battery_in_range"), 1);
    assert_eq!(violations("has_position"), 1);
    let (_, metrics) = api.get("/metrics").await;
    assert!(
        metrics
            .contains("fleetlake_pipeline_rows_total{pipeline=\"cold_chain\",kind=\"dropped\"} 1"),
        "{metrics}"
    );

    // A reference update is seen by the rows that follow, without a restart; earlier rows keep
    // the enrichment they had.
    put_devices(&api, "device_id,tenant,site,model,hw_rev\ntrailer-1,globex,hamburg,T-200,rev-B\ntrailer-2,acme,paris,T-300,rev-C\n").await;
    publish_json(
        &js,
        "telemetry.coldchain.trailer-1",
        json!({"device_id":"trailer-1","seq":10,"ts":ts,"temp_c":3.0,"lat":53.5,"lon":10.0}),
    )
    .await;
    raw_rows(&api, 11).await;
    api.wait_acked(11).await;
    let (_, body) = api
        .query("SELECT seq, tenant, site FROM usable.cold_chain WHERE device_id = 'trailer-1' ORDER BY seq")
        .await;
    assert_eq!(
        body["rows"],
        json!([[1, "acme", "berlin"], [10, "globex", "hamburg"]]),
        "{body}"
    );
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_expectation_stops_ingest_with_nothing_of_the_batch_written() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let pipelines = one_pipeline(
        dir.path(),
        "strict.sql",
        "CREATE SOURCE r (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, v DOUBLE) WITH (subject = 'telemetry.strict.>');\n\
         CREATE STREAMING TABLE usable.strict (CONSTRAINT v_positive EXPECT (v > 0) ON VIOLATION FAIL)\n\
         AS SELECT device_id, seq, v FROM r;\n",
    );
    let config = config(&nats, &dir.path().join("lake"), &pipelines);
    let (engine, api, js) = fleetlake_tests::start_engine(&config).await;
    let publish = |payload: serde_json::Value| {
        let js = js.clone();
        async move {
            js.publish("telemetry.strict.a", payload.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    publish(json!({"device_id":"a","seq":1,"v":1.0})).await;
    // Acked: every table has it (raw commits first, usable.strict after it).
    api.wait_acked(1).await;
    publish(json!({"device_id":"a","seq":2,"v":-1.0})).await;
    wait_for(
        "/healthz to report the failed pipeline",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let (status, body) = api.get("/healthz").await;
                (status == 503 && body.contains("v_positive")).then_some(())
            }
        },
    )
    .await;
    assert_eq!(api.scalar("SELECT count(*) FROM raw.telemetry").await, 1);
    assert_eq!(api.scalar("SELECT count(*) FROM usable.strict").await, 1);
    let stopped = engine
        .shutdown()
        .await
        .expect_err("a stopped pipeline is reported");
    assert!(stopped.reason.contains("v_positive"), "{stopped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_pipelines_that_do_not_check() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let pipelines = one_pipeline(
        dir.path(),
        "typo.sql",
        "CREATE SOURCE r (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL) WITH (subject = 'a.>', dedup_windw = '1h');\n",
    );
    let config = config(&nats, &dir.path().join("lake"), &pipelines);
    let err = Engine::start(config, Vec::new(), true)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("typo.sql:1:"), "{err}");
    assert!(err.contains("unknown option dedup_windw"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_simulated_fleet_lands_in_every_pipeline_exactly_once() {
    use fleetlake::tools::simulate::{Profile, SimConfig};
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let config = config(&nats, &dir.path().join("lake"), &shipped_pipelines());
    let (engine, api, js) = fleetlake_tests::start_engine(&config).await;
    let report = fleetlake_tests::simulate(
        &js,
        SimConfig {
            profile: Profile::Mixed,
            seed: 77,
            devices: 60,
            messages: 6_000,
            malformed: 0.01,
            duplicates: 0.05,
            late: 0.05,
            start_ms: Some(1_763_900_000_000),
            ..Default::default()
        },
    )
    .await;
    raw_rows(&api, 6_000).await;
    // Every reading in a usable table.
    api.wait_scalar(
        "SELECT (SELECT count(*) FROM usable.telemetry) + (SELECT count(*) FROM usable.cold_chain) + (SELECT count(*) FROM usable.device_health)",
        report.distinct as i64,
        Duration::from_secs(60),
    )
    .await;
    for table in [
        "usable.telemetry",
        "usable.cold_chain",
        "usable.device_health",
    ] {
        let n = api.scalar(&format!("SELECT count(*) FROM {table}")).await;
        assert!(n > 1_000, "{table}: {n}");
    }
    assert_eq!(
        api.scalar("SELECT count(*) FROM raw.quarantine").await,
        report.malformed as i64
    );
    // Both firmware generations end up in Celsius within the plausible range.
    assert_eq!(
        api.scalar("SELECT count(*) FROM usable.cold_chain WHERE temperature_c IS NULL OR temperature_c NOT BETWEEN -40 AND 40").await,
        0
    );
    assert!(
        api.scalar("SELECT count(DISTINCT fw) FROM usable.cold_chain")
            .await
            >= 4
    );
    assert_eq!(
        api.scalar("SELECT count(*) FROM usable.device_health WHERE mem_mb IS NULL")
            .await,
        0
    );
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_that_starts_reading_a_new_field_adds_a_nullable_column() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let v1 = "CREATE SOURCE r (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, v DOUBLE) WITH (subject = 'telemetry.evo.>');\n\
              CREATE STREAMING TABLE usable.evo AS SELECT device_id, seq, v FROM r;\n";
    let pipelines = one_pipeline(dir.path(), "evo.sql", v1);
    let config = config(&nats, &dir.path().join("lake"), &pipelines);
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    let publish = |payload: serde_json::Value| {
        let js = js.clone();
        async move {
            js.publish("telemetry.evo.a", payload.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    // New firmware already sends `w`; the pipeline does not read it yet. The raw zone keeps it.
    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    publish(json!({"device_id":"a","seq":1,"v":1.0,"w":10})).await;
    raw_rows(&api, 1).await;
    api.wait_scalar(
        "SELECT count(*) FROM usable.evo",
        1,
        Duration::from_secs(30),
    )
    .await;
    engine.shutdown().await.expect("a clean shutdown");

    // The pipeline starts reading `w`.
    let v2 = v1
        .replace("v DOUBLE)", "v DOUBLE, w BIGINT)")
        .replace("seq, v FROM", "seq, v, w FROM");
    std::fs::write(pipelines.join("evo.sql"), v2).unwrap();
    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    publish(json!({"device_id":"a","seq":2,"v":2.0,"w":20})).await;
    raw_rows(&api, 2).await;
    api.wait_scalar(
        "SELECT count(*) FROM usable.evo",
        2,
        Duration::from_secs(30),
    )
    .await;
    let (status, body) = api
        .query("SELECT seq, v, w FROM usable.evo ORDER BY seq")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["rows"],
        json!([[1, 1.0, null], [2, 2.0, 20]]),
        "{body}"
    );
    // The raw zone always had the field.
    let (_, raw) = api
        .query(
            "SELECT count(*) FROM raw.telemetry WHERE CAST(payload AS VARCHAR) LIKE '%\"w\":10%'",
        )
        .await;
    assert_eq!(raw["rows"][0][0], 1, "{raw}");
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reproduces_a_pipeline_table_and_applies_a_changed_definition() {
    use fleetlake::tools::simulate::{Profile, SimConfig};
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    for f in ["cold_chain.sql", "reference.sql"] {
        std::fs::copy(shipped_pipelines().join(f), pipelines.join(f)).unwrap();
    }
    // A window table over the pipeline's table: replay derives it again.
    std::fs::write(
        pipelines.join("minutes.sql"),
        "CREATE WINDOW TABLE final.cc_minute
         WITH (window = 'tumbling', size = '1m', watermark = '0', allowed_lateness = '0s')
         AS SELECT window_start, window_end, device_id, count(*) AS readings, max(temperature_c) AS temp_max
         FROM usable.cold_chain GROUP BY window_start, window_end, device_id;",
    )
    .unwrap();
    let config = config(&nats, &dir.path().join("lake"), &pipelines);
    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    put_devices(
        &api,
        "device_id,tenant,site,model,hw_rev\ndev-000001,acme,berlin,T-200,rev-B\n",
    )
    .await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    let report = fleetlake_tests::simulate(
        &js,
        SimConfig {
            profile: Profile::ColdChain,
            seed: 5,
            devices: 20,
            messages: 3_000,
            malformed: 0.01,
            duplicates: 0.05,
            start_ms: Some(1_763_900_000_000),
            ..Default::default()
        },
    )
    .await;
    raw_rows(&api, 3_000).await;
    api.wait_scalar(
        "SELECT count(*) FROM usable.cold_chain",
        report.distinct as i64,
        Duration::from_secs(60),
    )
    .await;
    // Replay refuses while the engine writes the same tables (its heartbeat is in the lake).
    let live = fleetlake_zones::Lake::open(&config.lake(Vec::new())).unwrap();
    let refused = fleetlake::ingest::replay::run(&config, live, "cold_chain", None, None, false)
        .await
        .unwrap_err();
    // Retrying as it is cannot help: the engine must be stopped first.
    assert!(!refused.is_retryable(), "{refused:?}");
    let refused = refused.to_string();
    assert!(refused.contains("an engine is running"), "{refused}");
    assert!(
        refused.contains(&std::process::id().to_string()),
        "names the engine's pid: {refused}"
    );
    engine.shutdown().await.expect("a clean shutdown");

    let lake = fleetlake_zones::Lake::open(&config.lake(Vec::new())).unwrap();
    let query = fleetlake_sql::QueryEngine::new(lake.clone());
    let snapshot = |sql: &'static str| {
        let query = query.clone();
        async move {
            let r = query.query(sql).await.unwrap();
            arrow::util::pretty::pretty_format_batches(&r.batches)
                .unwrap()
                .to_string()
        }
    };
    let all = "SELECT * EXCLUDE (event_date) FROM usable.cold_chain ORDER BY stream_seq";
    let before = snapshot(all).await;
    let minutes = "SELECT * FROM final.cc_minute ORDER BY window_start, device_id";
    let minutes_before = snapshot(minutes).await;
    let id = fleetlake_zones::TableId::parse("usable.cold_chain").unwrap();
    let version_before = lake.describe(&id).await.unwrap().unwrap().version;

    // Unchanged definition: the same rows, in one new version.
    let replayed =
        fleetlake::ingest::replay::run(&config, lake.clone(), "cold_chain", None, None, false)
            .await
            .unwrap();
    assert_eq!(replayed.messages, 3_000);
    assert_eq!(replayed.tables["usable.cold_chain"], report.distinct);
    assert_eq!(replayed.quarantined, report.malformed);
    assert_eq!(snapshot(all).await, before);
    assert_eq!(snapshot(minutes).await, minutes_before);
    assert_eq!(
        lake.describe(&id).await.unwrap().unwrap().version,
        version_before + 1
    );

    let scalar = |sql: &'static str| {
        let query = query.clone();
        async move {
            let r = query.query(sql).await.unwrap();
            let c =
                arrow::compute::cast(r.batches[0].column(0), &arrow::datatypes::DataType::Int64)
                    .unwrap();
            arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&c).value(0)
        }
    };
    let unrounded = "SELECT count(*) FROM final.cc_minute WHERE temp_max <> round(temp_max, 1)";
    assert!(scalar(unrounded).await > 0, "{minutes_before}");

    // A new rule: temperatures are rounded to one decimal, and a Fahrenheit column appears.
    let text = std::fs::read_to_string(pipelines.join("cold_chain.sql")).unwrap();
    let changed = text
        .replace(
            "COALESCE(r.temp_c, (r.temp_f - 32) * 5 / 9) AS temperature_c,",
            "round(COALESCE(r.temp_c, (r.temp_f - 32) * 5 / 9), 1) AS temperature_c,\n    round(COALESCE(r.temp_f, r.temp_c * 9 / 5 + 32), 1) AS temperature_f,",
        );
    assert_ne!(changed, text);
    std::fs::write(pipelines.join("cold_chain.sql"), changed).unwrap();
    let day =
        fleetlake::ingest::replay::parse_time(&chrono::Utc::now().format("%Y-%m-%d").to_string())
            .unwrap();
    let replayed =
        fleetlake::ingest::replay::run(&config, lake.clone(), "cold_chain", Some(day), None, false)
            .await
            .unwrap();
    assert_eq!(replayed.tables["usable.cold_chain"], report.distinct);
    let window_rows = replayed.windows["final.cc_minute"];
    assert_eq!(
        scalar("SELECT count(*) FROM usable.cold_chain").await,
        report.distinct as i64
    );
    assert_eq!(
        scalar("SELECT count(temperature_f) FROM usable.cold_chain").await,
        report.distinct as i64
    );
    assert_eq!(
        scalar(
            "SELECT count(*) FROM usable.cold_chain WHERE temperature_c <> round(temperature_c, 1)"
        )
        .await,
        0
    );
    // The window table was derived again from the changed rows: as many windows, rounded maxima.
    assert!(window_rows > 0);
    assert_eq!(
        scalar("SELECT count(*) FROM final.cc_minute").await,
        window_rows as i64
    );
    assert_eq!(scalar(unrounded).await, 0);
    let unknown = fleetlake::ingest::replay::run(&config, lake, "cold_chian", None, None, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("there are: cold_chain"), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_replays_are_dropped_also_after_restarts() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let config = config(&nats, &dir.path().join("lake"), &shipped_pipelines());
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    let reading = |seq: u64| {
        json!({"device_id":"trailer-1","seq":seq,"ts":"2025-11-23T10:00:00Z","temp_c":4.0,"lat":1.0,"lon":1.0}).to_string()
    };
    let publish = |seq: u64| {
        let js = js.clone();
        let payload = reading(seq);
        async move {
            js.publish("telemetry.coldchain.trailer-1", payload.into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    let rows = |api: Api, n: i64| async move {
        api.wait_scalar(
            "SELECT count(*) FROM usable.cold_chain",
            n,
            Duration::from_secs(30),
        )
        .await
    };
    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    publish(1).await;
    publish(2).await;
    publish(2).await; // a replay within the run
    raw_rows(&api, 3).await;
    rows(api.clone(), 2).await;
    engine.shutdown().await.expect("a clean shutdown"); // snapshots the state

    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    publish(1).await; // caught by the snapshot
    publish(3).await;
    raw_rows(&api, 5).await;
    rows(api.clone(), 3).await;
    engine.shutdown().await.expect("a clean shutdown");

    // Without snapshots the state is rebuilt from the raw zone.
    let side = dir.path().join("lake/usable/cold_chain/_fleetlake");
    std::fs::remove_dir_all(&side).expect("a snapshot was written");
    let engine = Engine::start(config.clone(), Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    publish(2).await; // caught by the rebuilt state
    publish(4).await;
    raw_rows(&api, 7).await;
    rows(api.clone(), 4).await;
    assert_eq!(
        api.scalar("SELECT count(*) FROM (SELECT DISTINCT seq FROM usable.cold_chain)")
            .await,
        4
    );
    api.wait_acked(2).await; // the counts are recorded once every table has committed
    let (_, p) = api.get("/v1/pipelines").await;
    let p: serde_json::Value = serde_json::from_str(&p).unwrap();
    let cold = p["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "cold_chain")
        .unwrap()
        .clone();
    assert_eq!(cold["rows"]["deduplicated"], 1, "{cold}");
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_whose_type_changes_stops_ingest_instead_of_retrying_forever() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let v1 = "CREATE SOURCE r (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, v DOUBLE) WITH (subject = 'telemetry.typ.>');\n\
              CREATE STREAMING TABLE usable.typ AS SELECT device_id, seq, v FROM r;\n";
    let pipelines = one_pipeline(dir.path(), "typ.sql", v1);
    let config = config(&nats, &dir.path().join("lake"), &pipelines);
    let (engine, api, js) = fleetlake_tests::start_engine(&config).await;
    publish_json(
        &js,
        "telemetry.typ.a",
        json!({"device_id":"a","seq":1,"v":1.5}),
    )
    .await;
    api.wait_scalar(
        "SELECT count(*) FROM usable.typ",
        1,
        Duration::from_secs(30),
    )
    .await;
    engine.shutdown().await.expect("a clean shutdown");

    std::fs::write(
        pipelines.join("typ.sql"),
        v1.replace("v DOUBLE", "v VARCHAR"),
    )
    .unwrap();
    let (engine, api, js) = fleetlake_tests::start_engine(&config).await;
    publish_json(
        &js,
        "telemetry.typ.a",
        json!({"device_id":"a","seq":2,"v":"high"}),
    )
    .await;
    wait_for(
        "/healthz to say why ingest stopped",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let (status, body) = api.get("/healthz").await;
                (status == 503 && body.contains("usable.typ") && body.contains("ingest"))
                    .then_some(body)
            }
        },
    )
    .await;
    let (_, metrics) = api.get("/metrics").await;
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fleetlake_storage_errors_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(errors <= 1, "a permanent error was retried {errors} times");
    let stopped = engine
        .shutdown()
        .await
        .expect_err("stopped ingest is reported");
    assert!(stopped.reason.contains("usable.typ"), "{stopped}");
}
