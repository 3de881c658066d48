//! Retention per zone on a real lake fed through NATS: only the expired partitions go, in one
//! commit per table, every writer's progress stays, other readers open the tables afterwards,
//! and a replay of a range whose raw data expired is refused with a clear message.
//! (Compaction and vacuum beside SIGKILLed engines are in `crash.rs`.)

use chrono::Utc;
use fleetlake::maintenance::Lease;
use fleetlake::tools::simulate::{Profile, SimConfig};
use fleetlake_tests::{
    Nats, Seaweed, TestDir, fleetlake_cli, read_with_python, shipped_pipelines, simulate,
    start_engine_with_env, test_config, txn_progress,
};
use fleetlake_zones::schema::{RAW_TELEMETRY, RawMessage, raw_batch};
use fleetlake_zones::{Lake, TableId};

const DAY_MS: i64 = 86_400_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_a_folder_drops_only_expired_partitions_and_a_replay_of_them_is_refused() {
    retention_run(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_seaweedfs_drops_only_expired_partitions_and_a_replay_of_them_is_refused() {
    let mut s3 = Seaweed::start().await;
    retention_run(Some(&s3)).await;
    s3.stop().await;
}

async fn retention_run(s3: Option<&Seaweed>) {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let (location, aws) = match s3 {
        Some(s3) => (format!("s3://{}/retention", s3.bucket), s3.env()),
        None => (dir.path().join("lake").display().to_string(), Vec::new()),
    };
    let pipelines = shipped_pipelines(dir.path());
    let config = test_config(
        nats.url(),
        &location,
        &[
            ("pipelines.dir", &pipelines.display().to_string()),
            ("maintenance.enabled", "false"),
            // The two fleets reuse device ids and sequence numbers.
            ("dedup.key", "none"),
        ],
    );
    let (engine, api, js) = start_engine_with_env(&config, aws.clone()).await;
    let now = Utc::now().timestamp_millis();
    let fleet = |profile, seed, start_ms| SimConfig {
        profile,
        seed,
        devices: 10,
        messages: 200,
        start_ms: Some(start_ms),
        ..SimConfig::default()
    };
    // Readings taken 40 days ago (delivered late, today) and readings of today.
    simulate(&js, fleet(Profile::Envelope, 1, now - 40 * DAY_MS)).await;
    simulate(&js, fleet(Profile::Envelope, 2, now - 60_000)).await;
    simulate(&js, fleet(Profile::ColdChain, 3, now - 60_000)).await;
    api.wait_acked(600).await;
    assert_eq!(
        api.scalar("SELECT count(*) FROM usable.telemetry").await,
        400
    );
    engine.shutdown().await.unwrap();

    // The raw zone also holds cold-chain messages received 40 days ago (an older lake).
    let lake = Lake::open(&config.lake(aws.clone())).unwrap();
    let received_us = (now - 40 * DAY_MS) * 1000;
    let old: Vec<RawMessage> = (0..10)
        .map(|i| RawMessage {
            payload: format!(
                r#"{{"device_id":"old-{i}","seq":1,"ts":{},"fw":"2.0.0","temp_c":4.5,"door_open":false}}"#,
                now - 40 * DAY_MS
            )
            .into_bytes(),
            subject: format!("telemetry.coldchain.old-{i}"),
            stream_seq: 1_000_000 + i,
            msg_id: None,
            received_at_us: received_us,
        })
        .collect();
    let mut archive = lake
        .writer(
            TableId::raw_telemetry(),
            RAW_TELEMETRY.clone(),
            vec!["ingest_date".into()],
            "archive",
        )
        .await
        .unwrap();
    archive
        .commit(&raw_batch(&old), "stream_seq", 1_000_009)
        .await
        .unwrap();
    let before = txn_progress(&lake).await;

    let mut env = aws.clone();
    env.extend([
        ("FLEETLAKE_LAKE_LOCATION".to_string(), location.clone()),
        (
            "FLEETLAKE_PIPELINES_DIR".to_string(),
            pipelines.display().to_string(),
        ),
        ("FLEETLAKE_NATS_URL".to_string(), nats.url().to_string()),
    ]);
    let maintain = |dry_run: bool| {
        let mut args = vec!["maintain"];
        if dry_run {
            args.push("--dry-run");
        }
        args.extend([
            "--set",
            "retention.raw_days=30",
            "--set",
            "retention.usable_days=30",
        ]);
        let out = fleetlake_cli(&args, &env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // A dry run says what would go and changes nothing.
    let dry = maintain(true);
    assert_eq!(dry["partitions_expired"], 2, "{dry}");
    // Each rewrite it plans says how many files it would replace, and by how many.
    for rewrite in dry["tables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["rewrites"].as_array().cloned().unwrap_or_default())
    {
        assert!(
            rewrite["files_removed"].as_u64() >= Some(2)
                && rewrite["files_added"].as_u64() >= Some(1),
            "{rewrite}"
        );
    }
    assert_eq!(
        lake.describe(&TableId::raw_telemetry())
            .await
            .unwrap()
            .unwrap()
            .rows,
        610
    );

    let summary = maintain(false);
    let table = |name: &str| {
        summary["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name)
            .unwrap_or_else(|| panic!("{name} in {summary}"))
            .clone()
    };
    let raw = table("raw.telemetry");
    assert_eq!(
        raw["expired_partitions"].as_array().unwrap().len(),
        1,
        "{raw}"
    );
    assert_eq!(raw["rows_expired"], 10);
    assert_eq!(raw["rows_after"], 600);
    let usable = table("usable.telemetry");
    assert_eq!(usable["rows_expired"], 200, "{usable}");
    assert_eq!(usable["rows_after"], 200);
    // Partitions of today are kept.
    assert_eq!(table("usable.cold_chain")["rows_expired"], 0);
    assert_eq!(table("raw.quarantine")["rows_expired"], 0);
    assert_eq!(summary["failed"], 0);

    assert_eq!(txn_progress(&lake).await, before);
    let cold_chain = lake
        .describe(&TableId::parse("usable.cold_chain").unwrap())
        .await
        .unwrap()
        .unwrap()
        .rows;
    assert!(cold_chain > 150, "{cold_chain} cold-chain rows");
    let readers = read_with_python(
        lake.root().as_str(),
        &["raw.telemetry", "usable.telemetry", "usable.cold_chain"],
        &aws,
    );
    assert_eq!(readers["raw.telemetry"]["deltalake_rows"], 600, "{readers}");
    assert_eq!(
        readers["usable.telemetry"]["deltalake_rows"], 200,
        "{readers}"
    );
    assert_eq!(
        readers["usable.cold_chain"]["duckdb_rows"], cold_chain,
        "{readers}"
    );

    // A replay of the expired range is refused, saying why and what can be replayed.
    let kept_from = (Utc::now().date_naive() - chrono::Days::new(30)).to_string();
    let from = (Utc::now().date_naive() - chrono::Days::new(35)).to_string();
    let refused = fleetlake_cli(&["replay", "cold_chain", "--from", &from], &env);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("retention (30 days by ingest_date) deleted the raw messages received before")
            && err.contains(&kept_from),
        "{err}"
    );
    // The range that is kept replays, and the report says where the raw zone starts.
    let today = Utc::now().date_naive().to_string();
    let replayed = fleetlake_cli(&["replay", "cold_chain", "--from", &today], &env);
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&replayed.stdout).unwrap();
    assert_eq!(report["raw_kept_from"], kept_from, "{report}");
    assert_eq!(
        report["tables"]["usable.cold_chain"], cold_chain,
        "{report}"
    );
}

/// One instance at a time: `fleetlake maintain` refuses while another holds the lease, runs once
/// it is released, and also once the lease of a holder that died (never released) has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_instance_maintains_a_lake_at_a_time() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let env = vec![
        (
            "FLEETLAKE_LAKE_LOCATION".to_string(),
            dir.path().join("lake").display().to_string(),
        ),
        ("FLEETLAKE_NATS_URL".to_string(), nats.url().to_string()),
        (
            "FLEETLAKE_MAINTENANCE_LEASE_TTL_S".to_string(),
            "2".to_string(),
        ),
    ];
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    let ttl = std::time::Duration::from_secs(2);
    let lease = Lease::acquire(&js, "fleetlake_maintenance", ttl)
        .await
        .unwrap();
    let refused = fleetlake_cli(&["maintain"], &env);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("another instance holds the maintenance lease"),
        "{err}"
    );
    assert!(matches!(
        Lease::acquire(&js, "fleetlake_maintenance", ttl).await,
        Err(fleetlake::maintenance::LeaseError::Held(_))
    ));
    // A replay replaces tables: not while maintenance may rewrite them.
    let replay = fleetlake_cli(&["replay", "cold_chain"], &env);
    let err = String::from_utf8_lossy(&replay.stderr);
    assert!(
        !replay.status.success() && err.contains("cannot replay while maintenance runs"),
        "{err}"
    );
    lease.release().await;
    let out = fleetlake_cli(&["maintain"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A holder that dies keeps it until the bucket's max age has passed.
    let dead = Lease::acquire(&js, "fleetlake_maintenance", ttl)
        .await
        .unwrap();
    std::mem::forget(dead);
    assert!(!fleetlake_cli(&["maintain"], &env).status.success());
    let mut taken = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if fleetlake_cli(&["maintain"], &env).status.success() {
            taken = true;
            break;
        }
    }
    assert!(taken, "the dead holder's lease never expired");
}
