//! Fleet analytics end to end: a simulated fleet of 10,000 devices with planted faults, sent
//! through real NATS and the shipped pipelines, must be told apart by `/v1/fleet/outliers` and
//! `/v1/fleet/root-cause`: the drifting sensors found (precision and recall at least 0.9), the
//! crashing firmware × hardware revision ranked first above a small beta cohort with a higher
//! rate, the noisy but healthy model not reported.

use std::collections::HashSet;
use std::time::Duration;

use fleetlake::tools::simulate::{BETA_FIRMWARE, Faults, Profile, SimConfig, Simulator};
use fleetlake_tests::{Api, Nats, TestDir, shipped_pipelines, start_engine, test_config, wait_for};
use serde_json::Value;

async fn get_json(api: &Api, path: &str) -> (u16, Value) {
    let (status, body) = api.get(path).await;
    let value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
    (status, value)
}

/// The answer's rows as objects keyed by column name.
fn rows(answer: &Value) -> Vec<serde_json::Map<String, Value>> {
    let names: Vec<&str> = answer["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    answer["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            names
                .iter()
                .zip(r.as_array().expect("row"))
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_faults_are_found_and_healthy_noise_is_not() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let pipelines = shipped_pipelines(dir.path()).display().to_string();
    let lake = dir.path().join("lake").display().to_string();
    let config = test_config(
        nats.url(),
        &lake,
        &[
            ("pipelines.dir", &pipelines),
            ("ingest.commit_rows", "50000"),
            ("ingest.commit_interval_ms", "1000"),
        ],
    );
    let (engine, api, js) = start_engine(&config).await;
    let sim = SimConfig {
        profile: Profile::Mixed,
        seed: 11,
        devices: 10_000,
        messages: 150_000,
        duplicates: 0.02,
        malformed: 0.01,
        faults: Faults {
            drift: 60,
            ..Faults::demo()
        },
        start_ms: Some(1_764_489_600_000),
        ..Default::default()
    };
    // The registry first: the cold-chain pipeline takes model and hw_rev from it.
    let registry = Simulator::new(sim.clone()).registry_csv();
    let r = api
        .http(
            reqwest::Method::PUT,
            format!("{}/v1/reference/devices", api.base),
        )
        .header("content-type", "text/csv")
        .body(registry)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Device-level events on top: five RT-100 trailers report an implausible temperature once
    // (quarantined by the cold-chain pipeline's temperature_plausible), three RT-200 trailers
    // stay warm for six minutes (trailer_too_warm fires for each).
    let simulator = Simulator::new(sim.clone());
    let cold_of_model = |model: &str, n: usize| -> Vec<String> {
        (0..sim.devices)
            .filter(|d| d % 3 == 1)
            .map(|d| simulator.device_info(d))
            .filter(|i| i.model == model)
            .take(n)
            .map(|i| i.device_id)
            .collect()
    };
    let (implausible, warm) = (cold_of_model("RT-100", 5), cold_of_model("RT-200", 3));
    let late_ts = |minute: i64| {
        chrono::DateTime::from_timestamp_millis(1_764_489_600_000 + 3_600_000 + minute * 60_000)
            .unwrap()
            .to_rfc3339()
    };
    let mut extra = Vec::new();
    for (i, id) in implausible.iter().enumerate() {
        extra.push((id.clone(), serde_json::json!({"device_id": id, "seq": 1_000_000 + i, "ts": late_ts(0), "temp_c": 80.0, "fw": "2.0.1"})));
    }
    for id in &warm {
        for (k, minute) in [0i64, 3, 6].into_iter().enumerate() {
            extra.push((id.clone(), serde_json::json!({"device_id": id, "seq": 1_000_000 + k, "ts": late_ts(minute), "temp_c": 12.0, "fw": "2.0.1"})));
        }
    }
    // A health device whose clock runs 70 years ahead must not drag the default window along.
    let health_device = simulator.device_info(2).device_id;
    let future = serde_json::json!({"device_id": health_device, "seq": 1_000_000, "ts": "2099-01-01T00:00:00Z", "cpu_pct": 50.0, "mem_mb": 300.0, "uptime_s": 10, "fw": "1.8.2", "hw": "rev-A"});
    let report = fleetlake_tests::simulate(&js, sim).await;
    js.publish(
        format!("telemetry.health.{health_device}"),
        future.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    for (id, payload) in &extra {
        js.publish(
            format!("telemetry.coldchain.{id}"),
            payload.to_string().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let report = fleetlake::tools::simulate::Report {
        total: report.total + extra.len() as u64 + 1,
        ..report
    };
    let planted = report.planted.clone().expect("faults were planted");
    wait_for(
        &format!("{} messages acked", report.total),
        Duration::from_secs(300),
        || {
            let api = api.clone();
            async move {
                (fleetlake_tests::metric(&api, "fleetlake_messages_acked_total").await
                    >= report.total)
                    .then_some(())
            }
        },
    )
    .await;

    // Outliers: the defaults read usable.cold_chain's temperature_c by model × hw_rev.
    let (status, answer) = get_json(&api, "/v1/fleet/outliers?window=all&limit=1000").await;
    assert_eq!(status, 200, "{answer}");
    let found = rows(&answer);
    let reported: HashSet<String> = found
        .iter()
        .map(|r| r["device_id"].as_str().unwrap().to_string())
        .collect();
    let truth: HashSet<String> = planted.drifting.iter().cloned().collect();
    let hits = reported.intersection(&truth).count() as f64;
    let (precision, recall) = (
        hits / reported.len().max(1) as f64,
        hits / truth.len() as f64,
    );
    eprintln!(
        "outliers: {} reported, {} planted, precision {precision:.3}, recall {recall:.3}",
        reported.len(),
        truth.len()
    );
    assert!(
        precision >= 0.9 && recall >= 0.9,
        "precision {precision}, recall {recall}: {answer}"
    );
    let noisy = planted.noisy_model.as_deref().unwrap();
    assert!(
        found.iter().all(|r| r["model"] != noisy),
        "the noisy model was reported: {answer}"
    );
    // Each row has its evidence: the device's value, its cohort's size, median and spread.
    let first = &found[0];
    for column in [
        "value",
        "readings",
        "score",
        "cohort_size",
        "cohort_median",
        "cohort_spread",
        "model",
        "hw_rev",
    ] {
        assert!(!first[column].is_null(), "{column}: {first:?}");
    }
    assert!(first["score"].as_f64().unwrap().abs() > 3.5, "{first:?}");

    // The noise is real: per reading, against the whole fleet, the noisy model's readings are
    // the ones far from the rest; only its own cohort's spread tells that they are normal.
    let fleet_wide = api
        .scalar(&format!(
            "SELECT count(*) FROM (SELECT model, robust_zscore(temperature_c) OVER () AS z FROM usable.cold_chain) \
             WHERE abs(z) > 3.5 AND model = '{noisy}'"
        ))
        .await;
    assert!(
        fleet_wide > 100,
        "{fleet_wide} noisy readings beyond 3.5 fleet-wide"
    );

    // The SQL comes with the answer and gives the same rows in /v1/query.
    let sql = answer["sql"].as_str().expect("sql");
    let (status, again) = api.query(sql).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["rows"].as_array().unwrap().len(), found.len());

    // Filters and pages: one model, two rows a page, then the next page.
    let (_, page1) = get_json(&api, "/v1/fleet/outliers?window=all&model=RT-100&limit=2").await;
    let (_, page2) = get_json(
        &api,
        "/v1/fleet/outliers?window=all&model=RT-100&limit=2&offset=2",
    )
    .await;
    assert_eq!(page1["next_offset"], 2, "{page1}");
    for page in [&page1, &page2] {
        assert_eq!(page["rows"].as_array().unwrap().len(), 2, "{page}");
        assert!(rows(page).iter().all(|r| r["model"] == "RT-100"), "{page}");
    }
    assert_ne!(page1["rows"][0], page2["rows"][0]);

    // The noisy model is right on average but not in its spread: ranked by the standard deviation
    // of each device's readings against the whole fleet, the top outliers are all RT-300s.
    let noisy: HashSet<String> = (0..10_000u64)
        .filter(|d| d % 3 == 1)
        .map(|d| simulator.device_info(d))
        .filter(|i| i.model == "RT-300")
        .map(|i| i.device_id)
        .collect();
    assert!(!noisy.is_empty());
    let (status, spread) = get_json(
        &api,
        "/v1/fleet/outliers?table=usable.cold_chain&metric=temperature_c&stat=stddev&by=&window=all&limit=20",
    )
    .await;
    assert_eq!(status, 200, "{spread}");
    let spread = rows(&spread);
    assert_eq!(spread.len(), 20, "{spread:?}");
    assert!(
        spread
            .iter()
            .all(|r| noisy.contains(r["device_id"].as_str().unwrap())),
        "{spread:?}"
    );

    // No outliers because no cohort is big enough: the answer says so.
    let (status, none) = get_json(&api, "/v1/fleet/outliers?window=all&min_cohort=1000000").await;
    assert_eq!(status, 200, "{none}");
    assert_eq!(none["rows"].as_array().unwrap().len(), 0, "{none}");
    let note = none["note"].as_str().unwrap_or_default();
    assert!(note.contains("min_cohort = 1000000"), "{none}");

    // Root cause: the defaults count usable.device_health's crashes by fw × hw_rev.
    let (status, answer) = get_json(&api, "/v1/fleet/root-cause?window=all").await;
    assert_eq!(status, 200, "{answer}");
    let ranked = rows(&answer);
    let crash = planted.crash_cohort.clone().unwrap();
    assert_eq!(ranked[0]["fw"], crash["fw"], "{answer}");
    assert_eq!(ranked[0]["hw_rev"], crash["hw_rev"], "{answer}");
    let beta: Vec<_> = ranked.iter().filter(|r| r["fw"] == BETA_FIRMWARE).collect();
    assert!(!beta.is_empty(), "{answer}");
    // The beta cohort has the higher crash rate; its few devices must not outrank the many.
    let rate = |r: &serde_json::Map<String, Value>| r["rate"].as_f64().unwrap();
    assert!(beta.iter().all(|b| rate(b) > rate(&ranked[0])), "{answer}");
    assert!(
        beta.iter().all(|b| b["devices"].as_i64().unwrap() <= 3),
        "{answer}"
    );
    assert!(ranked[0]["lift"].as_f64().unwrap() > 2.0, "{answer}");

    // The default window (24 hours back from the newest reading not in the future) holds the
    // whole simulated day: the same leader as window=all.
    let (status, default_window) = get_json(&api, "/v1/fleet/root-cause").await;
    assert_eq!(status, 200, "{default_window}");
    assert_eq!(
        rows(&default_window)[0]["fw"],
        crash["fw"],
        "{default_window}"
    );
    assert_eq!(
        rows(&default_window)[0]["hw_rev"],
        crash["hw_rev"],
        "{default_window}"
    );

    // Device-level events: an expectation's quarantines and a rule's firings, by model.
    for (event, model, devices) in [
        (
            "expectation:temperature_plausible",
            "RT-100",
            implausible.len(),
        ),
        ("rule:trailer_too_warm", "RT-200", warm.len()),
    ] {
        let path = format!(
            "/v1/fleet/root-cause?table=usable.cold_chain&event={event}&dimensions=model&window=all"
        );
        let (status, answer) = get_json(&api, &path).await;
        assert_eq!(status, 200, "{path}: {answer}");
        let ranked = rows(&answer);
        assert_eq!(ranked[0]["model"], model, "{path}: {answer}");
        assert_eq!(
            ranked[0]["affected_devices"], devices as i64,
            "{path}: {answer}"
        );
        let total: i64 = ranked
            .iter()
            .map(|r| r["affected_devices"].as_i64().unwrap())
            .sum();
        assert_eq!(total, devices as i64, "{path}: {answer}");
    }

    // Bad requests say what was wrong and what was expected.
    for (path, says) in [
        ("/v1/fleet/outliers?metric=nope", "no column \"nope\""),
        (
            "/v1/fleet/outliers?metric=device_id",
            "expected a numeric one",
        ),
        (
            "/v1/fleet/outliers?threshold=-1",
            "expected a robust z above 0",
        ),
        ("/v1/fleet/outliers?min_cohort=2", "at least 3"),
        ("/v1/fleet/outliers?window=soon", "expected a duration"),
        ("/v1/fleet/outliers?colour=red", "unknown parameter"),
        ("/v1/fleet/outliers?table=usable.nothing", "usable.nothing"),
        (
            "/v1/fleet/root-cause?dimensions=fw,planet",
            "no column \"planet\"",
        ),
        ("/v1/fleet/root-cause?from=yesterday", "RFC 3339"),
        (
            "/v1/fleet/outliers?by=model,value",
            "a column of its own named value",
        ),
        (
            "/v1/fleet/root-cause?event=cpu_pct",
            "expected a boolean column",
        ),
        ("/v1/fleet/outliers?model=", "expected one or more"),
        (
            "/v1/fleet/outliers?offset=99999999999999999",
            "expected at most",
        ),
        ("/v1/fleet/outliers?window=1000000d", "at most 100 years"),
    ] {
        let (status, body) = get_json(&api, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{path}: {body}");
    }

    // CSV answers carry the statement in a header.
    let r = api
        .http(
            reqwest::Method::GET,
            format!("{}/v1/fleet/root-cause?window=all&limit=3", api.base),
        )
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["fleetlake-sql"]
            .to_str()
            .unwrap()
            .starts_with("WITH readings AS")
    );
    let csv = r.text().await.unwrap();
    assert!(
        csv.starts_with("fw,hw_rev,devices,affected_devices"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 4, "{csv}");

    engine.shutdown().await.unwrap();
}
