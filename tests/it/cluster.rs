//! Scale-out: three `fleetlake serve` processes share one partitioned stream on a 3-node NATS
//! cluster (replicas 3) and one lake on SeaweedFS. While the simulator publishes 100,000 messages
//! with 5% device replays, one instance is killed with SIGKILL and, after its partitions were
//! taken over, a fourth joins. Afterwards every zone holds each message exactly once, every
//! alert was published once, and every table equals the one a single instance makes of the same
//! input: the per-device window tables and alerts (computed in each partition) and the
//! fleet-wide ones (computed by one elected instance over every partition's committed rows).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arrow::datatypes::DataType;
use fleetlake::tools::simulate::{self, Faults, Profile, SimConfig};
use fleetlake_sql::QueryEngine;
use fleetlake_sql::hash::nats_partition;
use fleetlake_tests::{
    Api, EngineProcess, Nats, NatsCluster, Seaweed, TestDir, metric, partition_consumers, wait_for,
    wait_stream_acked,
};
use fleetlake_zones::{Lake, LakeConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 6;
const START_MS: i64 = 1_763_900_000_000;

/// 20,000 devices, five readings each: no device's clock (1 s a reading) runs ahead of
/// another's by more than the windows' watermark (30 s), so no reading is late, for the whole
/// fleet or within a partition (checked on the single instance), and windows hold the same rows
/// either way.
fn fleet(rate: f64) -> SimConfig {
    SimConfig {
        profile: Profile::Mixed,
        seed: 17,
        devices: 20_000,
        messages: 100_000,
        rate,
        duplicates: 0.05,
        malformed: 0.01,
        late: 0.0,
        start_ms: Some(START_MS),
        faults: Faults {
            drift: 60,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A rule that fires at once (the shipped `trailer_too_warm` needs 5 minutes of device time).
const TOO_WARM_NOW: &str = "CREATE RULE too_warm_now
WITH (severity = 'warning', key = 'device_id', event_time = 'ts')
AS SELECT device_id, ts, temperature_c, temperature_c > 8 AS firing, temperature_c < 6 AS resolved
FROM usable.cold_chain;
";

/// One cold-chain and one health reading three hours after the fleet's, per partition: every
/// window of every partition (and of the single instance) closes.
async fn publish_closers(js: &async_nats::jetstream::Context) {
    let ts = START_MS + 3 * 3_600_000;
    for kind in ["coldchain", "health"] {
        for p in 0..PARTITIONS {
            let subject = (0..)
                .map(|k| format!("telemetry.{kind}.closer-{k}"))
                .find(|s| nats_partition(s, PARTITIONS) == p)
                .expect("some subject maps to every partition");
            let device = subject.rsplit('.').next().unwrap();
            let payload = match kind {
                "coldchain" => format!(
                    r#"{{"device_id":"{device}","seq":1,"ts":{ts},"temp_c":3.5,"door_open":false,"lat":52.5,"lon":13.4,"battery":90.0,"fw":"2.1.0"}}"#
                ),
                _ => format!(
                    r#"{{"device_id":"{device}","seq":1,"ts":{ts},"cpu_pct":10.0,"mem_mb":200.0,"uptime_s":100,"fw":"2.1.0","hw":"r1"}}"#
                ),
            };
            js.publish(subject, payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

async fn cluster_view(api: &Api) -> Value {
    let (status, body) = api.get("/v1/cluster").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Every partition's holder as `api`'s instance sees them.
async fn holders(api: &Api) -> BTreeMap<String, String> {
    let view = cluster_view(api).await;
    view["holders"]
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(p, h)| Some((p.clone(), h.as_str()?.to_string())))
        .collect()
}

/// Waits until every partition's consumer has acknowledged everything it was delivered and
/// has nothing pending: every table holds every message.
async fn wait_partitions_acked(url: &str, limit: Duration) {
    let js = fleetlake::ingest::source::connect(url).await.unwrap();
    wait_for("every partition to be acked", limit, || {
        let js = js.clone();
        async move {
            for p in 0..PARTITIONS {
                let consumers = partition_consumers(&js, "fleetlake", p).await;
                if consumers.is_empty() {
                    return None;
                }
                for mut consumer in consumers {
                    let info = consumer.info().await.ok()?;
                    if info.num_pending > 0 || info.num_ack_pending > 0 {
                        return None;
                    }
                }
            }
            Some(())
        }
    })
    .await
}

async fn count(q: &QueryEngine, sql: &str) -> i64 {
    let r = q.query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(r.batches[0].column(0))
        .value(0)
}

/// `table`'s rows as text, ordered by every column; floats rounded to 9 digits (partial
/// aggregates merged in another grouping may differ in the last bit), `except` left out.
async fn table_text(q: &QueryEngine, table: &str, except: &[&str], filter: &str) -> String {
    let schema = q
        .query(&format!("SELECT * FROM {table} LIMIT 0"))
        .await
        .unwrap()
        .schema;
    let columns: Vec<String> = schema
        .fields()
        .iter()
        .filter(|f| !except.contains(&f.name().as_str()))
        .map(|f| match f.data_type() {
            DataType::Float64 | DataType::Float32 => {
                format!("round(\"{}\", 9) AS \"{}\"", f.name(), f.name())
            }
            _ => format!("\"{}\"", f.name()),
        })
        .collect();
    let order: Vec<String> = (1..=columns.len()).map(|i| i.to_string()).collect();
    let sql = format!(
        "SELECT {} FROM {table} {filter} ORDER BY {}",
        columns.join(", "),
        order.join(", ")
    );
    let r = q.query(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    arrow::util::pretty::pretty_format_batches(&r.batches)
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_a_partitioned_stream_exactly_once_through_a_kill_and_a_join() {
    let cluster = NatsCluster::start(3).await;
    let s3 = Seaweed::start().await;
    let dir = TestDir::new();
    let pipelines = fleetlake_tests::shipped_pipelines(dir.path());
    std::fs::write(pipelines.join("rules/too_warm_now.sql"), TOO_WARM_NOW).unwrap();
    let location = format!("s3://{}/cluster", s3.bucket);
    let mut base = s3.env();
    base.extend(env(&[
        ("FLEETLAKE_NATS_URL", cluster.url()),
        ("FLEETLAKE_NATS_REPLICAS", "3".into()),
        ("FLEETLAKE_LAKE_LOCATION", location.clone()),
        ("FLEETLAKE_PIPELINES_DIR", pipelines.display().to_string()),
        ("FLEETLAKE_CLUSTER_PARTITIONS", PARTITIONS.to_string()),
        ("FLEETLAKE_CLUSTER_LEASE_TTL_S", "3".into()),
        ("FLEETLAKE_INGEST_COMMIT_INTERVAL_MS", "500".into()),
        // Three debug-build engines, a three-node NATS cluster and SeaweedFS share two cores:
        // while an instance rebuilds the state of partitions it took over, a hand-back's or a
        // stop's last commit has been seen to take longer than the default 30 s (it then stops
        // with the messages unacknowledged, nothing lost). The wait is the setting's to give.
        ("FLEETLAKE_INGEST_SHUTDOWN_GRACE_S", "120".into()),
        ("FLEETLAKE_DEDUP_SNAPSHOT_INTERVAL_S", "1".into()),
        ("FLEETLAKE_MAINTENANCE_ENABLED", "false".into()),
    ]));
    let instance = |id: &str| {
        let mut e = base.clone();
        e.push(("FLEETLAKE_CLUSTER_INSTANCE".into(), id.into()));
        e
    };
    let log = |id: &str| dir.path().join(format!("{id}.log"));
    println!("logs in {}", dir.path().display());

    // The stream, mapped to the partitions, as the first instance would create it.
    let config = fleetlake::config::Config::load(
        None,
        Vec::new(),
        &[
            ("nats.url".into(), cluster.url()),
            ("nats.replicas".into(), "3".into()),
            ("cluster.partitions".into(), PARTITIONS.to_string()),
        ],
    )
    .unwrap();
    let js = fleetlake::ingest::source::connect(&cluster.url())
        .await
        .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            simulate::publish(&js, fleet(5_000.0), CancellationToken::new(), |_| {}).await
        })
    };

    let mut engines: BTreeMap<&str, EngineProcess> = BTreeMap::new();
    for id in ["a", "b", "c"] {
        engines.insert(id, EngineProcess::start(&instance(id), &log(id)).await);
    }
    let api = |engines: &BTreeMap<&str, EngineProcess>, id: &str| engines[id].api.clone();
    // Three members, two partitions each, and one of them computing the fleet-wide results.
    let first = api(&engines, "a");
    let view = wait_for(
        "the partitions to be spread",
        Duration::from_secs(60),
        || {
            let api = first.clone();
            async move {
                let view = cluster_view(&api).await;
                let h = holders(&api).await;
                let per: Vec<usize> = ["a", "b", "c"]
                    .iter()
                    .map(|i| h.values().filter(|v| v == i).count())
                    .collect();
                let spread = h.len() == PARTITIONS as usize && per == [2, 2, 2];
                (spread && view["fleet_wide_by"].is_string()).then_some(view)
            }
        },
    )
    .await;
    let (_, health) = first.get("/healthz").await;
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(
        health["cluster"]["owned"].as_array().unwrap().len(),
        2,
        "{health}"
    );
    let (_, metrics) = first.get("/metrics").await;
    assert!(
        metrics.contains("fleetlake_partition_owned{partition=\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetlake_partition_lag{partition=\""),
        "{metrics}"
    );
    // The fleet-wide windows and rules, and who computes them, where operators look.
    let fleet_wide = view["fleet_wide"].to_string();
    for what in [
        "final.fleet_hour",
        "final.firmware_hour",
        "firmware_crashing",
    ] {
        assert!(fleet_wide.contains(what), "{view}");
    }
    assert_eq!(view["not_computed"], serde_json::json!([]), "{view}");

    // Mid-run, the instance computing the fleet-wide results dies without a chance to commit
    // or ack; the others take its partitions and the fleet-wide results.
    let victim = view["fleet_wide_by"].as_str().unwrap().to_string();
    let survivor = ["a", "b", "c"].into_iter().find(|i| *i != victim).unwrap();
    let victim_api = api(&engines, &victim);
    wait_for("the victim to have consumed some", Duration::from_secs(120), || {
        let api = victim_api.clone();
        async move { (metric(&api, "fleetlake_messages_acked_total").await > 3_000).then_some(()) }
    })
    .await;
    let killed = Instant::now();
    engines.remove(victim.as_str()).unwrap().kill().await;
    let survivor_api = api(&engines, survivor);
    wait_for(
        "the victim's work to be taken over",
        Duration::from_secs(60),
        || {
            let api = survivor_api.clone();
            let victim = victim.clone();
            async move {
                let view = cluster_view(&api).await;
                let h = holders(&api).await;
                let taken = h.len() == PARTITIONS as usize && !h.values().any(|v| *v == victim);
                let fleet = view["fleet_wide_by"]
                    .as_str()
                    .is_some_and(|by| by != victim);
                (taken && fleet).then_some(())
            }
        },
    )
    .await;
    println!(
        "{victim}'s partitions and fleet-wide results taken over {:?} after its SIGKILL",
        killed.elapsed()
    );
    let view = cluster_view(&survivor_api).await;
    assert!(view["takeovers"].as_u64().unwrap() >= 3, "{view}");

    // A new member joins and is given its share.
    engines.insert("d", EngineProcess::start(&instance("d"), &log("d")).await);
    let joined = api(&engines, "d");
    wait_for("d to be given partitions", Duration::from_secs(60), || {
        let api = joined.clone();
        async move {
            let view = cluster_view(&api).await;
            (!view["owned"].as_array()?.is_empty()).then_some(())
        }
    })
    .await;

    let report = publisher.await.unwrap().expect("publishing");
    assert_eq!(report.total, 100_000);
    assert!(report.duplicates >= 4_000, "{report:?}");
    publish_closers(&js).await;
    wait_partitions_acked(&cluster.url(), Duration::from_secs(600)).await;
    // The fleet-wide windows and rules follow every partition's commits.
    let last = js
        .get_stream("TELEMETRY")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence as i64;
    wait_for(
        "the fleet-wide windows to catch up",
        Duration::from_secs(300),
        || {
            let apis: Vec<Api> = engines.values().map(|e| e.api.clone()).collect();
            async move {
                let mut by = None;
                for api in apis {
                    let view = cluster_view(&api).await;
                    if view["fleet_wide_position"].as_i64() >= Some(last) {
                        by = view["instance"].as_str().map(str::to_string);
                    }
                }
                by
            }
        },
    )
    .await;
    for (id, engine) in engines {
        let status = engine.terminate().await;
        assert!(status.success(), "instance {id} exited with {status}");
    }
    // Every alert published once: the alerts stream holds each id once.
    let mut published: Vec<String> = Vec::new();
    let mut alerts = js.get_stream("ALERTS").await.unwrap();
    let last = alerts.info().await.unwrap().state.last_sequence;
    for seq in 1..=last {
        if let Ok(m) = alerts.get_raw_message(seq).await {
            let id = m
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.to_string())
                .unwrap_or_default();
            published.push(id);
        }
    }

    // The same input, one instance, one stream without partitions.
    let single_nats = Nats::start().await;
    let single_js = fleetlake::ingest::source::connect(single_nats.url())
        .await
        .unwrap();
    let single_config = fleetlake::config::Config::load(
        None,
        Vec::new(),
        &[("nats.url".into(), single_nats.url().to_string())],
    )
    .unwrap();
    fleetlake::ingest::source::ensure_stream(&single_js, &single_config)
        .await
        .unwrap();
    let single_report = simulate::publish(&single_js, fleet(0.0), CancellationToken::new(), |_| {})
        .await
        .unwrap();
    assert_eq!(single_report.total, report.total);
    publish_closers(&single_js).await;
    let single_lake = dir.path().join("single-lake");
    let single = EngineProcess::start(
        &env(&[
            ("FLEETLAKE_NATS_URL", single_nats.url().to_string()),
            ("FLEETLAKE_LAKE_LOCATION", single_lake.display().to_string()),
            ("FLEETLAKE_PIPELINES_DIR", pipelines.display().to_string()),
            ("FLEETLAKE_MAINTENANCE_ENABLED", "false".into()),
        ]),
        &log("single"),
    )
    .await;
    wait_stream_acked(single_nats.url(), Duration::from_secs(600)).await;
    // The premise of comparing windows: nothing was late for the whole fleet.
    assert_eq!(metric(&single.api, "fleetlake_late_rows_total").await, 0);
    assert!(single.terminate().await.success());

    let clustered = QueryEngine::new(
        Lake::open(&LakeConfig {
            location,
            storage_options: s3.env().into_iter().collect(),
        })
        .unwrap(),
    );
    let reference = QueryEngine::new(
        Lake::open(&LakeConfig {
            location: single_lake.display().to_string(),
            storage_options: Default::default(),
        })
        .unwrap(),
    );
    let messages = report.total as i64 + 2 * PARTITIONS as i64;
    // Exactly once into every zone.
    for table in [
        "raw.telemetry",
        "raw.quarantine",
        "usable.telemetry",
        "usable.cold_chain",
        "usable.device_health",
    ] {
        let rows = count(&clustered, &format!("SELECT count(*) FROM {table}")).await;
        let distinct = count(
            &clustered,
            &format!("SELECT count(DISTINCT stream_seq) FROM {table}"),
        )
        .await;
        assert_eq!(rows, distinct, "{table} holds a message twice");
        let sql = format!("SELECT count(*) FROM {table}");
        if rows != count(&reference, &sql).await {
            let seqs = |q: &QueryEngine| {
                let sql = format!("SELECT stream_seq FROM {table}");
                let q = q.clone();
                async move {
                    let r = q.query(&sql).await.unwrap();
                    r.batches
                        .iter()
                        .flat_map(|b| {
                            arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(
                                b.column(0),
                            )
                            .values()
                            .to_vec()
                        })
                        .collect::<std::collections::BTreeSet<i64>>()
                }
            };
            let (ours, theirs) = (seqs(&clustered).await, seqs(&reference).await);
            let missing: Vec<_> = theirs.difference(&ours).take(20).collect();
            let extra: Vec<_> = ours.difference(&theirs).take(20).collect();
            let stream = js.get_stream("TELEMETRY").await.unwrap();
            for s in &missing {
                let m = stream.get_raw_message(**s as u64).await.unwrap();
                println!("missing {s}: {}", m.subject);
            }
            panic!(
                "{table}: {} rows, the single instance's {}; missing {missing:?}, extra {extra:?}",
                rows,
                count(&reference, &sql).await
            );
        }
    }
    assert_eq!(
        count(&clustered, "SELECT count(*) FROM raw.telemetry").await,
        messages
    );
    assert!(
        count(&clustered, "SELECT count(*) FROM raw.quarantine").await >= report.malformed as i64
    );
    for table in [
        "usable.telemetry",
        "usable.cold_chain",
        "usable.device_health",
    ] {
        // Each reading once (replays removed), and the same readings a single instance keeps.
        let sql = format!("SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM {table})");
        assert_eq!(
            count(&clustered, &sql).await,
            count(&clustered, &format!("SELECT count(*) FROM {table}")).await,
            "{table} holds a reading twice"
        );
        let rows = |q| table_text(q, table, &["received_at", "ingest_date"], "");
        assert!(
            rows(&clustered).await == rows(&reference).await,
            "{table} differs from a single instance's"
        );
    }
    // The final zone, table by table.
    for table in [
        "final.device_minute",
        "final.device_hour",
        "final.fleet_hour",
        "final.device_health_hour",
        "final.firmware_hour",
        "final.device_sessions",
    ] {
        let (ours, theirs) = (
            table_text(&clustered, table, &["stream_seq"], "").await,
            table_text(&reference, table, &["stream_seq"], "").await,
        );
        assert!(
            theirs.lines().count() > 5,
            "{table} of the single instance is nearly empty:\n{theirs}"
        );
        assert!(ours == theirs, "{table} differs from a single instance's");
    }
    let ours = table_text(&clustered, "final.alerts", &["emit_time"], "").await;
    let theirs = table_text(&reference, "final.alerts", &["emit_time"], "").await;
    assert!(
        ours == theirs,
        "final.alerts differs:\n{ours}\nvs\n{theirs}"
    );
    let fired = count(
        &clustered,
        "SELECT count(*) FROM final.alerts WHERE rule = 'too_warm_now'",
    )
    .await;
    assert!(fired >= 20, "only {fired} alerts");
    let recorded = count(
        &clustered,
        "SELECT count(DISTINCT alert_id) FROM final.alerts",
    )
    .await;
    assert_eq!(
        recorded,
        count(&clustered, "SELECT count(*) FROM final.alerts").await,
        "an alert recorded twice"
    );
    let mut unique = published.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), published.len(), "an alert published twice");
    assert_eq!(
        published.len() as i64,
        recorded,
        "published vs recorded alerts"
    );

    // The stream really is partitioned as fleetlake computes it.
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    for seq in [1u64, 2, 3, 500, 5_000, 50_000] {
        let m = stream.get_raw_message(seq).await.unwrap();
        let (prefix, rest) = m.subject.split_at(m.subject.find(".telemetry.").unwrap());
        let published = &rest[1..];
        assert_eq!(
            prefix,
            format!("fleetlake.{}", nats_partition(published, PARTITIONS)),
            "{}",
            m.subject
        );
    }
}

/// A stream mapped to partitions is read only with the same number of partitions: without
/// partitions its stored subjects would match no pipeline, with another number a device would
/// move. Either way ingest stops and says so, and consumes nothing.
#[tokio::test]
async fn a_stream_mapped_to_other_partitions_is_refused_loudly() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let lake = dir.path().join("lake").display().to_string();
    let partitioned =
        fleetlake_tests::test_config(nats.url(), &lake, &[("cluster.partitions", "4")]);
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &partitioned)
        .await
        .unwrap();
    js.publish("telemetry.coldchain.d1", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for (partitions, wanted) in [("0", "no subject transform"), ("6", "partition(6)")] {
        let config =
            fleetlake_tests::test_config(nats.url(), &lake, &[("cluster.partitions", partitions)]);
        // A publisher may use it; a consumer may not.
        let mut stream = fleetlake::ingest::source::ensure_stream(&js, &config)
            .await
            .unwrap();
        let info = stream.info().await.unwrap();
        let e = fleetlake::ingest::source::check_mapping(info, &config)
            .unwrap_err()
            .to_string();
        assert!(e.contains("partition(4)") && e.contains(wanted), "{e}");
        assert!(e.contains("fixed for a stream's life"), "{e}");
    }
    // A single instance started on it stops ingest, says why, and writes nothing.
    let single = fleetlake_tests::test_config(nats.url(), &lake, &[]);
    let engine = fleetlake::serve::Engine::start(single, Vec::new(), true)
        .await
        .unwrap();
    let api = Api::new(engine.addr);
    let body = wait_for(
        "/healthz to refuse the stream",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let (status, body) = api.get("/healthz").await;
                (status == 503 && body.contains("subject transform")).then_some(body)
            }
        },
    )
    .await;
    assert!(body.contains("cluster.partitions"), "{body}");
    let reason = engine.ingest_failed().await;
    assert!(reason.contains("partition(4)"), "{reason}");
    let _ = engine.shutdown().await;
    let lake = Lake::open(&LakeConfig {
        location: lake,
        storage_options: Default::default(),
    })
    .unwrap();
    let progress = fleetlake_tests::txn_progress(&lake).await;
    assert!(progress.iter().all(|(_, v)| v.is_none()), "{progress:?}");
}

/// Two members with one `cluster.instance` would both take its leases for theirs: the second
/// one waits out the id's announcement and, seeing it renewed, refuses to join.
#[tokio::test]
async fn a_second_instance_with_the_same_id_refuses_to_join() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let env = env(&[
        ("FLEETLAKE_NATS_URL", nats.url().to_string()),
        (
            "FLEETLAKE_LAKE_LOCATION",
            dir.path().join("lake").display().to_string(),
        ),
        ("FLEETLAKE_PIPELINES_DIR", String::new()),
        ("FLEETLAKE_CLUSTER_PARTITIONS", "2".into()),
        ("FLEETLAKE_CLUSTER_LEASE_TTL_S", "2".into()),
        ("FLEETLAKE_CLUSTER_INSTANCE", "same".into()),
        ("FLEETLAKE_MAINTENANCE_ENABLED", "false".into()),
    ]);
    let first = EngineProcess::start(&env, &dir.path().join("first.log")).await;
    wait_for(
        "the first to own both partitions",
        Duration::from_secs(60),
        || {
            let api = first.api.clone();
            async move {
                let view = cluster_view(&api).await;
                (view["owned"].as_array()?.len() == 2).then_some(())
            }
        },
    )
    .await;
    let log = dir.path().join("second.log");
    let second = EngineProcess::start(&env, &log).await;
    // It says why in /healthz while it stops, and in its log (it exits non-zero).
    wait_for("the second to refuse", Duration::from_secs(60), || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("another instance is running with cluster.instance = same: each member of a cluster needs its own id")
                .then_some(())
        }
    })
    .await;
    // The first kept its partitions.
    assert_eq!(
        cluster_view(&first.api).await["owned"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    second.kill().await;
    assert!(first.terminate().await.success());
}
