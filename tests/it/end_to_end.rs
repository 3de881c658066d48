//! The foundation path: simulated telemetry on JetStream → raw, quarantine and usable Delta
//! tables → read back over HTTP, with polars, and with deltalake for Python and DuckDB.

use std::time::Duration;

use fleetlake::config::Config;
use fleetlake::serve::Engine;
use fleetlake::tools::simulate::{self, SimConfig};
use fleetlake_tests::{Api, Nats, Seaweed, polars_frame, read_with_python, wait_for};
use fleetlake_zones::Lake;
use tokio_util::sync::CancellationToken;

const MESSAGES: u64 = 20_000;

fn engine_config(nats: &Nats, lake: &str) -> Config {
    fleetlake_tests::test_config(nats.url(), lake, &[("ingest.commit_interval_ms", "300")])
}

/// Publishes 20,000 messages (1% malformed) and checks every table through the API, polars and
/// the Python readers.
async fn end_to_end(lake_location: &str, env: Vec<(String, String)>) {
    let nats = Nats::start().await;
    let config = engine_config(&nats, lake_location);
    let engine = Engine::start(config.clone(), env.clone(), true)
        .await
        .expect("engine starts");
    let api = Api::new(engine.addr);

    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .expect("NATS");
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .expect("stream");
    let report = simulate::publish(
        &js,
        SimConfig {
            seed: 2026,
            devices: 200,
            messages: MESSAGES,
            malformed: 0.01,
            late: 0.05,
            start_ms: Some(1_763_900_000_000),
            ..Default::default()
        },
        CancellationToken::new(),
        |_| {},
    )
    .await
    .expect("publishing");
    assert_eq!(report.total, MESSAGES);
    assert_eq!(report.malformed, 200);
    assert_eq!(report.distinct, MESSAGES - 200);

    let count = |table: &str| format!("SELECT count(*) FROM {table}");
    wait_for(
        "every message in raw.telemetry",
        Duration::from_secs(240),
        || {
            let api = api.clone();
            let sql = count("raw.telemetry");
            async move {
                let (status, body) = api.query(&sql).await;
                (status == 200 && body["rows"][0][0].as_i64() == Some(MESSAGES as i64))
                    .then_some(())
            }
        },
    )
    .await;
    // The three tables are committed one after the other: wait for the last.
    api.wait_scalar(
        &count("usable.telemetry"),
        report.distinct as i64,
        Duration::from_secs(60),
    )
    .await;

    // Through the HTTP API.
    assert_eq!(api.scalar(&count("raw.telemetry")).await, 20_000);
    assert_eq!(
        api.scalar("SELECT count(DISTINCT stream_seq) FROM raw.telemetry")
            .await,
        20_000
    );
    assert_eq!(api.scalar(&count("usable.telemetry")).await, 19_800);
    assert_eq!(
        api.scalar("SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM usable.telemetry)")
            .await,
        19_800
    );
    assert_eq!(api.scalar(&count("raw.quarantine")).await, 200);
    assert_eq!(
        api.scalar(
            "SELECT count(*) FROM raw.quarantine WHERE reason IS NULL OR length(reason) < 10"
        )
        .await,
        0
    );
    // Every message is in exactly one of usable and quarantine.
    assert_eq!(
        api.scalar(
            "SELECT count(*) FROM (SELECT stream_seq FROM usable.telemetry UNION ALL SELECT stream_seq FROM raw.quarantine) u \
             JOIN raw.telemetry r USING (stream_seq)"
        )
        .await,
        20_000
    );
    let (status, reasons) = api
        .query("SELECT reason, count(*) AS n FROM raw.quarantine GROUP BY reason ORDER BY n DESC")
        .await;
    assert_eq!(status, 200);
    let reasons = reasons["rows"].to_string();
    for expected in [
        "not a JSON object",
        "missing required field device_id",
        "battery is 250",
        "not valid UTF-8",
        "does not decode",
    ] {
        assert!(
            reasons.contains(expected),
            "no quarantine reason {expected:?} in {reasons}"
        );
    }
    // The kinds of mistakes, without the values: a handful of groups, not one per payload.
    let kinds = api
        .scalar("SELECT count(DISTINCT reason_kind) FROM raw.quarantine")
        .await;
    let distinct = api
        .scalar("SELECT count(DISTINCT reason) FROM raw.quarantine")
        .await;
    assert!(
        kinds >= 5 && kinds < distinct && kinds <= 20,
        "{kinds} kinds, {distinct} reasons"
    );

    // Read again with polars, from the Parquet files the Delta logs list.
    let lake = Lake::open(&config.lake(env.clone())).expect("lake");
    let raw = polars_frame(&lake, "raw.telemetry").await;
    assert_eq!(raw.height(), 20_000);
    assert_eq!(
        raw.column("stream_seq").unwrap().n_unique().unwrap(),
        20_000
    );
    let usable = polars_frame(&lake, "usable.telemetry").await;
    assert_eq!(usable.height(), 19_800);
    let keys = usable
        .select(["device_id", "seq"])
        .unwrap()
        .unique_stable(None, polars::prelude::UniqueKeepStrategy::First, None)
        .unwrap();
    assert_eq!(keys.height(), 19_800);
    let quarantine = polars_frame(&lake, "raw.quarantine").await;
    assert_eq!(quarantine.height(), 200);
    assert_eq!(quarantine.column("reason").unwrap().null_count(), 0);

    // And with deltalake for Python and DuckDB.
    let readers = read_with_python(
        lake.root().as_str(),
        &["raw.telemetry", "usable.telemetry", "raw.quarantine"],
        &env,
    );
    for (table, rows) in [
        ("raw.telemetry", 20_000),
        ("usable.telemetry", 19_800),
        ("raw.quarantine", 200),
    ] {
        assert_eq!(readers[table]["deltalake_rows"], rows, "{readers}");
        assert_eq!(readers[table]["duckdb_rows"], rows, "{readers}");
    }

    // The rest of the API.
    let (status, tables) = api.get("/v1/tables").await;
    assert_eq!(status, 200);
    let tables: serde_json::Value = serde_json::from_str(&tables).unwrap();
    let raw_info = tables["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "raw.telemetry")
        .expect("raw.telemetry listed")
        .clone();
    assert_eq!(raw_info["rows"], 20_000);
    assert!(
        raw_info["version"].as_u64().unwrap() >= 1 && raw_info["size_bytes"].as_u64().unwrap() > 0
    );
    let (status, metrics) = api.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("fleetlake_rows_committed_total{table=\"raw.telemetry\"} 20000"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetlake_quarantined_total 200"),
        "{metrics}"
    );
    let (status, health) = api.get("/healthz").await;
    assert_eq!(status, 200, "{health}");

    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_folder_lake_holds_every_message_exactly_once() {
    let dir = fleetlake_tests::TestDir::new();
    end_to_end(&dir.path().join("lake").display().to_string(), Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_lake_on_seaweedfs_holds_every_message_exactly_once() {
    let mut s3 = Seaweed::start().await;
    let location = format!("s3://{}/fleet", s3.bucket);
    end_to_end(&location, s3.env()).await;
    s3.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_api_answers_in_every_format_and_refuses_writes() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let config = engine_config(&nats, &dir.path().join("lake").display().to_string());
    let (engine, api, js) = fleetlake_tests::start_engine(&config).await;
    fleetlake_tests::simulate(
        &js,
        SimConfig {
            messages: 50,
            devices: 5,
            start_ms: Some(1_763_900_000_000),
            ..Default::default()
        },
    )
    .await;
    api.wait_scalar(
        "SELECT count(*) FROM usable.telemetry",
        50,
        Duration::from_secs(60),
    )
    .await;
    let sql = "SELECT device_id, count(*) AS n FROM usable.telemetry GROUP BY device_id ORDER BY device_id";
    let (status, body) = api.query(sql).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["columns"][0],
        serde_json::json!({"name": "device_id", "type": "Utf8"})
    );
    assert_eq!(
        body["columns"][1],
        serde_json::json!({"name": "n", "type": "Int64"})
    );
    assert_eq!(body["row_count"], 5);
    let total: i64 = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_i64().unwrap())
        .sum();
    assert_eq!(total, 50);

    let (status, csv) = api.query_as(sql, "text/csv").await;
    assert_eq!(status, 200);
    let csv = String::from_utf8(csv).unwrap();
    assert_eq!(csv.lines().next(), Some("device_id,n"));
    assert_eq!(csv.lines().count(), 6);
    let (status, nd) = api.query_as(sql, "application/x-ndjson").await;
    assert_eq!(status, 200);
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8(nd).unwrap().lines().next().unwrap()).unwrap();
    assert!(
        first["device_id"].is_string() && first["n"].is_number(),
        "{first}"
    );
    let (status, ipc) = api
        .query_as(sql, "application/vnd.apache.arrow.stream")
        .await;
    assert_eq!(status, 200);
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None).unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 5);

    for (sql, code) in [
        ("SELEC nonsense", "sql_syntax"),
        ("SELECT missing_column FROM usable.telemetry", "sql_plan"),
        ("DELETE FROM usable.telemetry", "read_only"),
        ("COPY (SELECT 1) TO 'out.csv'", "read_only"),
        (
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc'",
            "read_only",
        ),
    ] {
        let (status, body) = api.query(sql).await;
        assert_eq!(status, 400, "{sql}: {body}");
        assert_eq!(body["error"]["code"], code, "{sql}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().len() > 5,
            "{body}"
        );
    }
    let r = api
        .http(reqwest::Method::POST, format!("{}/v1/query", api.base))
        .body("SELECT 1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    engine.shutdown().await.expect("a clean shutdown");
}
