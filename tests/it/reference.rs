//! Reference data over HTTP: `PUT /v1/reference/{table}` replaces a reference table, and queries
//! join it with the usable zone at once.

use std::time::Duration;

use fleetlake::tools::simulate::SimConfig;
use fleetlake_tests::{Api, Nats};

async fn put(api: &Api, table: &str, content_type: &str, body: &str) -> (u16, serde_json::Value) {
    let r = api
        .http(
            reqwest::Method::PUT,
            format!("{}/v1/reference/{table}", api.base),
        )
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_uploads_replace_the_table_and_join_with_usable() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let lake = dir.path().join("lake").display().to_string();
    let config = fleetlake_tests::test_config(nats.url(), &lake, &[]);
    let (engine, api, js) = fleetlake_tests::start_engine(&config).await;
    fleetlake_tests::simulate(
        &js,
        SimConfig {
            devices: 3,
            messages: 30,
            start_ms: Some(1_763_900_000_000),
            ..Default::default()
        },
    )
    .await;
    api.wait_scalar(
        "SELECT count(*) FROM usable.telemetry",
        30,
        Duration::from_secs(60),
    )
    .await;

    let csv = "device_id,tenant,site,model\ndev-000000,acme,berlin,T-200\ndev-000001,acme,paris,T-200\ndev-000002,globex,oslo,T-300\n";
    let (status, body) = put(&api, "devices", "text/csv", csv).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["table"], "reference.devices");
    assert_eq!(body["rows"], 3);
    let by_tenant = "SELECT d.tenant, count(*) AS n FROM usable.telemetry u JOIN reference.devices d USING (device_id) GROUP BY d.tenant ORDER BY d.tenant";
    let (status, answer) = api.query(by_tenant).await;
    assert_eq!(status, 200, "{answer}");
    let rows = answer["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 2, "{answer}");
    let total: i64 = rows.iter().map(|r| r[1].as_i64().unwrap()).sum();
    assert_eq!(total, 30);

    // A new version moves dev-000002 to acme: the next query sees it, without a restart.
    let json = r#"[{"device_id":"dev-000000","tenant":"acme","site":"berlin","model":"T-200"},
                   {"device_id":"dev-000001","tenant":"acme","site":"paris","model":"T-200"},
                   {"device_id":"dev-000002","tenant":"acme","site":"oslo","model":"T-300"}]"#;
    let (status, body) = put(&api, "devices", "application/json", json).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["version"].as_u64().unwrap() >= 1, "{body}");
    let (_, answer) = api.query(by_tenant).await;
    assert_eq!(
        answer["rows"],
        serde_json::json!([["acme", 30]]),
        "{answer}"
    );

    let (status, body) = put(&api, "devices", "text/csv", "device_id,device_id\na,b\n").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_rows", "{body}");
    let (status, body) = put(&api, "no-such!", "text/csv", "a\n1\n").await;
    assert_eq!(status, 400, "{body}");
    let (_, tables) = api.get("/v1/tables").await;
    assert!(tables.contains("\"reference.devices\""), "{tables}");
    engine.shutdown().await.expect("a clean shutdown");
}
