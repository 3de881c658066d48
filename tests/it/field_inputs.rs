//! Field inputs modelled on public bug reports against Arrow, DataFusion, NATS clients and stream
//! processors, each of which used to lose, corrupt or stall data silently. Every message lands
//! exactly once or is quarantined with its reason, and `/healthz` tells the truth.
//!
//! Subjects `telemetry.t1.<dev>` reach the built-in decoder; `telemetry.coldchain.<dev>` the
//! shipped cold-chain pipeline (the engines here run the shipped `pipelines/`).

use std::time::Duration;

use fleetlake_tests::{
    Api, EngineProcess, Nats, TestDir, metric, publish_raw, shipped_pipelines, start_engine,
    test_config, wait_for, wait_stream_acked,
};
use serde_json::json;

/// 2026-05-01T00:00:00Z in epoch milliseconds.
const T: i64 = 1_777_593_600_000;

/// An in-process engine running the shipped pipelines (plus `extra` files), with its lake in
/// `dir`.
async fn engine_with_pipelines(
    nats: &Nats,
    dir: &TestDir,
    extra: &[(&str, &str)],
) -> (
    fleetlake::serve::Engine,
    Api,
    async_nats::jetstream::Context,
) {
    let pipelines = shipped_pipelines(dir.path());
    for (name, text) in extra {
        std::fs::write(pipelines.join(name), text).unwrap();
    }
    let lake = dir.path().join("lake").display().to_string();
    let config = test_config(
        nats.url(),
        &lake,
        &[("pipelines.dir", pipelines.to_str().unwrap())],
    );
    start_engine(&config).await
}

async fn publish(js: &async_nats::jetstream::Context, subject: &str, payload: &str) {
    js.publish(subject.to_string(), payload.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The quarantine reason of the message with `stream_seq`.
async fn reason(api: &Api, stream_seq: i64) -> String {
    let (status, body) = api
        .query(&format!(
            "SELECT reason FROM raw.quarantine WHERE stream_seq = {stream_seq}"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    body["rows"][0][0]
        .as_str()
        .unwrap_or_else(|| panic!("stream sequence {stream_seq} is not quarantined: {body}"))
        .to_string()
}

async fn healthy(api: &Api) {
    let (status, body) = api.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
}

const EVERY_TYPE: &str = "
CREATE SOURCE typed (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, n INT, d DATE, ts TIMESTAMP, x DOUBLE, f FLOAT, b BOOLEAN)
WITH (subject = 'telemetry.typed.>', event_time = 'ts');

CREATE STREAMING TABLE usable.typed AS SELECT device_id, seq, n, d, ts, x, f, b FROM typed;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_not_of_its_declared_type_is_quarantined_never_truncated() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let (engine, api, js) = engine_with_pipelines(&nats, &dir, &[("typed.sql", EVERY_TYPE)]).await;
    // Built-in decoder (the issue's example).
    let t1 = "telemetry.t1.d1";
    publish(
        &js,
        t1,
        &format!(r#"{{"device_id":"d1","seq":2,"ts":{T},"temperature":2.0}}"#),
    )
    .await;
    publish(
        &js,
        t1,
        &format!(
            r#"{{"device_id":"d1","seq":2.5,"ts":{},"temperature":2.5}}"#,
            T + 1000
        ),
    )
    .await;
    publish(
        &js,
        t1,
        &format!(
            r#"{{"device_id":"d1","seq":3.9,"ts":{},"temperature":3.9}}"#,
            T + 2000
        ),
    )
    .await;
    publish(
        &js,
        t1,
        &format!(
            r#"{{"device_id":"d1","seq":3,"ts":{},"temperature":3.0}}"#,
            T + 3000
        ),
    )
    .await;
    // The shipped cold-chain pipeline: seq is BIGINT there too.
    let cc = "telemetry.coldchain.c1";
    publish(
        &js,
        cc,
        &format!(r#"{{"device_id":"c1","seq":1.5,"ts":{T},"temp_c":4.0}}"#),
    )
    .await;
    publish(
        &js,
        cc,
        &format!(r#"{{"device_id":"c1","seq":1,"ts":{T},"temp_c":4.0}}"#),
    )
    .await;
    // Every source column type a pipeline can declare.
    let ty = "telemetry.typed.y1";
    let good =
        json!({"device_id":"y1","seq":1,"n":7,"d":"2026-05-01","ts":T,"x":1.5,"f":2.5,"b":true});
    publish(&js, ty, &good.to_string()).await; // 7
    for (i, (column, bad)) in [
        ("n", json!(7.5)),
        ("n", json!(3_000_000_000i64)),
        ("d", json!(20000.5)),
        ("ts", json!(1_777_593_600_000.5)),
        ("f", json!(1e39)),
        ("b", json!("yes")),
        ("device_id", json!(42)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut payload = good.clone();
        payload["seq"] = json!(i as i64 + 2);
        payload[column] = bad;
        publish(&js, ty, &payload.to_string()).await; // 8..=14
    }
    wait_stream_acked(nats.url(), Duration::from_secs(60)).await;

    let (_, rows) = api
        .query("SELECT seq, temperature FROM usable.telemetry ORDER BY seq")
        .await;
    assert_eq!(rows["rows"], json!([[2, 2.0], [3, 3.0]]), "{rows}");
    assert!(
        reason(&api, 2)
            .await
            .contains("seq is 2.5, expected an integer")
    );
    assert!(reason(&api, 3).await.contains("seq is 3.9"));
    assert!(reason(&api, 5).await.contains("seq is 1.5"));
    assert_eq!(
        api.scalar("SELECT count(*) FROM usable.cold_chain").await,
        1
    );
    assert_eq!(api.scalar("SELECT count(*) FROM usable.typed").await, 1);
    for (seq, column) in (8..=14).zip(["n", "n", "d", "ts", "f", "b", "device_id"]) {
        let r = reason(&api, seq).await;
        assert!(r.contains(column), "stream sequence {seq}: {r}");
    }
    assert_eq!(api.scalar("SELECT count(*) FROM raw.quarantine").await, 10);
    healthy(&api).await;
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_numbers_at_the_integer_limit_are_usable_and_ingest_goes_on() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let (engine, api, js) = engine_with_pipelines(&nats, &dir, &[]).await;
    let max = i64::MAX;
    publish(
        &js,
        "telemetry.t1.m",
        &format!(r#"{{"device_id":"m","seq":{max},"ts":{T},"temperature":1}}"#),
    )
    .await;
    publish(
        &js,
        "telemetry.t1.m",
        &format!(
            r#"{{"device_id":"m","seq":1,"ts":{},"temperature":1}}"#,
            T + 1000
        ),
    )
    .await;
    // The same through a pipeline's dedup, and a replay of the limit.
    let cc = "telemetry.coldchain.m";
    publish(
        &js,
        cc,
        &format!(r#"{{"device_id":"m","seq":{max},"ts":{T},"temp_c":4}}"#),
    )
    .await;
    publish(
        &js,
        cc,
        &format!(r#"{{"device_id":"m","seq":1,"ts":{T},"temp_c":4}}"#),
    )
    .await;
    publish(
        &js,
        cc,
        &format!(r#"{{"device_id":"m","seq":{max},"ts":{T},"temp_c":4}}"#),
    )
    .await;
    wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    let (_, rows) = api
        .query("SELECT seq FROM usable.telemetry ORDER BY seq")
        .await;
    assert_eq!(rows["rows"], json!([[1], [max]]), "{rows}");
    let (_, rows) = api
        .query("SELECT seq FROM usable.cold_chain ORDER BY seq")
        .await;
    assert_eq!(rows["rows"], json!([[1], [max]]), "{rows}");
    healthy(&api).await;
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_fails_a_pipeline_query_is_quarantined_and_its_batch_lands() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let (engine, api, js) = engine_with_pipelines(&nats, &dir, &[]).await;
    // One burst, so the three share a micro-batch: CAST(ts AS DATE) fails for the second.
    let cc = "telemetry.coldchain.p".to_string();
    let mut acks = Vec::new();
    for payload in [
        r#"{"device_id":"p","seq":1,"ts":"2026-05-01T10:00:00Z","temp_c":4.0}"#,
        r#"{"device_id":"p","seq":2,"ts":8640000000000000,"temp_c":4.0}"#,
        r#"{"device_id":"p","seq":3,"ts":"2026-05-01T10:01:00Z","temp_c":4.0}"#,
    ] {
        acks.push(js.publish(cc.clone(), payload.into()).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
    wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    let (_, rows) = api
        .query("SELECT seq FROM usable.cold_chain ORDER BY seq")
        .await;
    assert_eq!(rows["rows"], json!([[1], [3]]), "{rows}");
    let r = reason(&api, 2).await;
    assert!(r.starts_with("pipeline cold_chain:"), "{r}");
    assert_eq!(api.scalar("SELECT count(*) FROM raw.quarantine").await, 1);
    // A row's error is the data's fault, never reported as a storage failure.
    assert_eq!(metric(&api, "fleetlake_storage_errors_total").await, 0);
    healthy(&api).await;
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_for_a_very_long_key_goes_out_on_a_bounded_subject_and_ingest_goes_on() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let (engine, api, js) = engine_with_pipelines(&nats, &dir, &[]).await;
    let device = "d".repeat(20_000);
    let subject = format!("telemetry.coldchain.{}", "k".repeat(100));
    for (seq, minute) in [(1, 0), (2, 5)] {
        let payload =
            json!({"device_id": device, "seq": seq, "ts": T + minute * 60_000, "temp_c": 9.0});
        publish(&js, &subject, &payload.to_string()).await;
    }
    let alert = wait_for("the alert", Duration::from_secs(60), || {
        let js = js.clone();
        async move { crate::alerts::alerts(&js).await.into_iter().next() }
    })
    .await;
    let (alert_subject, state, _, body) = alert;
    assert_eq!(state, "firing");
    assert!(alert_subject.len() < 300, "{} bytes", alert_subject.len());
    assert!(
        alert_subject.starts_with("alerts.trailer_too_warm.ddd"),
        "{alert_subject}"
    );
    assert_eq!(body["key"].as_str(), Some(device.as_str()));
    // Ingest goes on: a later message is committed.
    publish(
        &js,
        "telemetry.t1.after",
        &format!(r#"{{"device_id":"after","seq":1,"ts":{T}}}"#),
    )
    .await;
    wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    assert_eq!(api.scalar("SELECT count(*) FROM usable.telemetry").await, 1);
    assert_eq!(api.scalar("SELECT count(*) FROM final.alerts").await, 1);
    healthy(&api).await;
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_client_library_cannot_parse_is_read_by_its_sequence() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let pipelines = shipped_pipelines(dir.path());
    let env = crate::alerts::env(&nats, &dir.path().join("lake"), &pipelines);
    let engine = EngineProcess::start(&env, &dir.path().join("engine.log")).await;
    let api = engine.api.clone();
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    crate::alerts::stream_ready(&js).await;
    let odd = "telemetry.t1.trailer\u{a0}042";
    let reading = |seq: i64| format!(r#"{{"device_id":"trailer 042","seq":{seq},"ts":{T}}}"#);
    publish_raw(
        nats.url(),
        odd,
        &[("Nats-Msg-Id", "odd-1")],
        reading(1).as_bytes(),
    )
    .await;
    publish(&js, "telemetry.t1.plain", &reading(2)).await;
    // A header name async-nats refuses (and would refuse when reading it by sequence too).
    publish_raw(
        nats.url(),
        "telemetry.t1.hdr",
        &[("Ger\u{e4}t", "1"), ("Nats-Msg-Id", "hdr-3")],
        reading(3).as_bytes(),
    )
    .await;
    publish(&js, "telemetry.t1.plain", &reading(4)).await;
    wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    let (_, rows) = api
        .query("SELECT stream_seq, subject, msg_id FROM raw.telemetry ORDER BY stream_seq")
        .await;
    assert_eq!(
        rows["rows"],
        json!([
            [1, odd, "odd-1"],
            [2, "telemetry.t1.plain", null],
            [3, "telemetry.t1.hdr", "hdr-3"],
            [4, "telemetry.t1.plain", null]
        ]),
        "{rows}"
    );
    assert_eq!(api.scalar("SELECT count(*) FROM usable.telemetry").await, 4);
    assert!(metric(&api, "fleetlake_messages_refetched_total").await >= 1);
    healthy(&api).await;
    assert!(engine.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_is_reported_and_taken_only_when_an_operator_says_so() {
    // The new stream holds fewer messages than the lake's position, then more: each is told
    // apart from the stream the lake consumed.
    for new_messages in [3, 12] {
        recreated_stream(new_messages).await;
    }
}

/// Five messages consumed, the stream deleted and created again with `new_messages`: ingest
/// takes none of them until an operator chooses a new consumer name, which takes them all.
async fn recreated_stream(new_messages: i64) {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let lake = dir.path().join("lake").display().to_string();
    let config = test_config(nats.url(), &lake, &[]);
    let (engine, api, js) = start_engine(&config).await;
    let reading = |seq: i64| format!(r#"{{"device_id":"r","seq":{seq},"ts":{T}}}"#);
    for seq in 1..=5 {
        publish(&js, "telemetry.t1.r", &reading(seq)).await;
    }
    wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    js.delete_stream("TELEMETRY").await.unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    for seq in 6..6 + new_messages {
        publish(&js, "telemetry.t1.r", &reading(seq)).await;
    }
    let body = wait_for(
        "/healthz to report the recreated stream",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let (status, body) = api.get("/healthz").await;
                (status == 503 && body.contains("created again")).then_some(body)
            }
        },
    )
    .await;
    assert!(body.contains("nats.consumer"), "says what to do: {body}");
    assert_eq!(api.scalar("SELECT count(*) FROM raw.telemetry").await, 5);
    let stopped = engine.shutdown().await.expect_err("reported as a stop");
    assert!(stopped.reason.contains("created again"), "{stopped}");

    // The documented operator action: a new consumer name takes the new stream from its start.
    let config = test_config(nats.url(), &lake, &[("nats.consumer", "fleetlake-2")]);
    let (engine, api, _js) = start_engine(&config).await;
    fleetlake_tests::wait_stream_acked_by(nats.url(), "fleetlake-2", Duration::from_secs(60)).await;
    let all = 5 + new_messages;
    assert_eq!(api.scalar("SELECT count(*) FROM raw.telemetry").await, all);
    assert_eq!(
        api.scalar("SELECT count(*) FROM usable.telemetry").await,
        all
    );
    healthy(&api).await;
    engine.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_query_takes_the_engine_down() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let env: Vec<(String, String)> = [
        ("FLEETLAKE_NATS_URL", nats.url().to_string()),
        (
            "FLEETLAKE_LAKE_LOCATION",
            dir.path().join("lake").display().to_string(),
        ),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .to_vec();
    let engine = EngineProcess::start(&env, &dir.path().join("engine.log")).await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    crate::alerts::stream_ready(&js).await;
    publish(
        &js,
        "telemetry.t1.x1",
        &format!(r#"{{"device_id":"x1","seq":1,"ts":{T}}}"#),
    )
    .await;
    wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    let ids: Vec<String> = (0..2000).map(|i| format!("'x{i}'")).collect();
    let in_list = format!(
        "SELECT count(*) FROM usable.telemetry WHERE device_id IN ({})",
        ids.join(", ")
    );
    let or_chain = format!(
        "SELECT count(*) FROM usable.telemetry WHERE {}",
        ids.iter()
            .map(|i| format!("device_id = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    );
    let nested = format!("SELECT {}1{} AS n", "(".repeat(5000), ")".repeat(5000));
    let (status, body) = engine.api.query(&in_list).await;
    assert_eq!((status, &body["rows"]), (200, &json!([[1]])), "{body}");
    for sql in [&or_chain, &nested] {
        let (status, body) = engine.api.query(sql).await;
        assert_eq!(status, 400, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("too"), "{body}");
    }
    // A body beyond the limit (query.max_body_kb, 1 MiB) is refused with 413. One byte over,
    // so the server reads all of it and its answer is not lost to a reset of a connection with
    // unread data.
    let body = vec![b' '; 1024 * 1024 + 1];
    let head = format!(
        "POST /v1/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        fleetlake_tests::test_tokens().1,
        body.len()
    );
    let addr = engine.api.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut conn, head.as_bytes())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut conn, &body)
        .await
        .unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read(&mut conn, &mut answer),
    )
    .await
    .expect("an answer")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    healthy(&engine.api).await;
    let status = engine.terminate().await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_removed_from_the_stream_before_they_were_read_are_skipped_and_counted() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let lake = dir.path().join("lake").display().to_string();
    let config = test_config(nats.url(), &lake, &[]);
    let (engine, _api, js) = start_engine(&config).await;
    let reading = |seq: i64| format!(r#"{{"device_id":"g","seq":{seq},"ts":{T}}}"#);
    for seq in 1..=3 {
        publish(&js, "telemetry.t1.g", &reading(seq)).await;
    }
    wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    engine.shutdown().await.expect("a clean shutdown");
    for seq in 4..=10 {
        publish(&js, "telemetry.t1.g", &reading(seq)).await;
    }
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    for seq in 4..=8 {
        stream.delete_message(seq).await.unwrap();
    }
    let (engine, api, _js) = start_engine(&config).await;
    wait_stream_acked(nats.url(), Duration::from_secs(60)).await;
    let (_, rows) = api
        .query("SELECT stream_seq FROM raw.telemetry ORDER BY stream_seq")
        .await;
    assert_eq!(rows["rows"], json!([[1], [2], [3], [9], [10]]), "{rows}");
    assert_eq!(metric(&api, "fleetlake_messages_missing_total").await, 5);
    healthy(&api).await;
    engine.shutdown().await.expect("a clean shutdown");
}
