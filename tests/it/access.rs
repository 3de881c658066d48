//! Access control against a real engine with two tenants' data (acme and globex, from the
//! simulated fleet's registry through the shipped pipelines): bypass attempts by a token bound
//! to one tenant, zones outside a role, write routes, the audit, and every query limit while
//! ingest keeps acknowledging.

use std::time::Duration;

use fleetlake::tools::simulate::{Profile, SimConfig, Simulator};
use fleetlake_tests::{Api, Nats, TestDir, metric, shipped_pipelines, start_engine, test_config};
use reqwest::Method;
use serde_json::{Value, json};

/// Creates a token as the test admin; returns an API client using it.
async fn token(api: &Api, body: Value) -> Api {
    let (status, created) = api
        .send(Method::POST, "/v1/tokens", None, &body.to_string())
        .await;
    assert_eq!(status, 201, "{created}");
    assert!(created.get("sha256").is_none(), "{created}");
    api.with_token(Some(created["token"].as_str().unwrap()))
}

/// 50 devices publishing `messages` readings at 500 a second, in the background.
fn fleet_in_background(
    js: &async_nats::jetstream::Context,
    messages: u64,
) -> tokio::task::JoinHandle<fleetlake::tools::simulate::Report> {
    let js = js.clone();
    tokio::spawn(async move {
        fleetlake_tests::simulate(
            &js,
            SimConfig {
                devices: 50,
                messages,
                rate: 500.0,
                ..Default::default()
            },
        )
        .await
    })
}

/// Waits for the background fleet to finish and for every message it sent to be acknowledged;
/// each is in raw.telemetry once.
async fn every_message_lands(
    admin: &Api,
    publisher: tokio::task::JoinHandle<fleetlake::tools::simulate::Report>,
) {
    let report = publisher.await.unwrap();
    admin.wait_acked(report.total).await;
    assert_eq!(
        scalar(admin, "SELECT count(*) FROM raw.telemetry").await,
        report.total as i64
    );
}

/// An analyst bound to acme.
async fn analyst_of(admin: &Api) -> Api {
    token(
        admin,
        json!({"name": name("acme-lister"), "role": "analyst", "tenants": ["acme"]}),
    )
    .await
}

/// A unique token name for this test process.
fn name(base: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{base}-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// `sql` as soon as the token has a free place: a query cancelled by its timeout keeps its
/// token's place until it has really stopped, which takes until its current batch is done.
async fn query_when_free(api: &Api, sql: &str) -> (u16, Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = api.query(sql).await;
        if body["error"]["code"] != "too_many_concurrent_queries"
            || std::time::Instant::now() > deadline
        {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The single integer `sql` answers (status 200 required).
async fn scalar(api: &Api, sql: &str) -> i64 {
    let (status, body) = api.query(sql).await;
    assert_eq!(status, 200, "{sql}: {body}");
    body["rows"][0][0]
        .as_i64()
        .unwrap_or_else(|| panic!("{sql}: {body}"))
}

/// The status and error code of `sql`.
async fn refused(api: &Api, sql: &str) -> (u16, String) {
    let (status, body) = api.query(sql).await;
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

/// Every value of the answer's rows, as text.
async fn values(api: &Api, sql: &str) -> Vec<String> {
    let (status, body) = api.query(sql).await;
    assert_eq!(status, 200, "{sql}: {body}");
    body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().clone())
        .map(|v| v.as_str().map(str::to_string).unwrap_or(v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bound_to_a_tenant_never_sees_another_tenants_rows() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let pipelines = shipped_pipelines(dir.path()).display().to_string();
    let lake = dir.path().join("lake").display().to_string();
    let config = test_config(nats.url(), &lake, &[("pipelines.dir", &pipelines)]);
    let (engine, admin, js) = start_engine(&config).await;
    let sim = SimConfig {
        profile: Profile::Mixed,
        seed: 5,
        devices: 300,
        messages: 3_000,
        start_ms: Some(1_764_489_600_000),
        ..Default::default()
    };
    let r = admin
        .http(Method::PUT, format!("{}/v1/reference/devices", admin.base))
        .header("content-type", "text/csv")
        .body(Simulator::new(sim.clone()).registry_csv())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let report = fleetlake_tests::simulate(&js, sim.clone()).await;
    // An hour later, a trailer of each tenant stays warm for six minutes (trailer_too_warm fires)
    // and a health device of each reports: the first hour's windows and the fleet's sessions
    // close, so every shipped final table has rows of both tenants.
    let simulator = Simulator::new(sim.clone());
    let of_tenant = |tenant: &str, kind: u64| {
        (0..sim.devices)
            .filter(|d| d % 3 == kind)
            .map(|d| simulator.device_info(d))
            .find(|i| i.tenant == tenant)
            .unwrap()
            .device_id
    };
    let later = |minute: i64| {
        chrono::DateTime::from_timestamp_millis(1_764_489_600_000 + 3_600_000 + minute * 60_000)
            .unwrap()
            .to_rfc3339()
    };
    let mut extra = 0;
    for tenant in ["acme", "globex"] {
        let trailer = of_tenant(tenant, 1);
        for (k, minute) in [0i64, 3, 6].into_iter().enumerate() {
            let reading = json!({"device_id": trailer, "seq": 1_000_000 + k, "ts": later(minute), "temp_c": 12.0, "fw": "2.0.1"});
            js.publish(
                format!("telemetry.coldchain.{trailer}"),
                reading.to_string().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
            extra += 1;
        }
        let health = of_tenant(tenant, 2);
        let report = json!({"device_id": health, "seq": 1_000_000, "ts": later(7), "cpu_pct": 50.0, "mem_mb": 300.0, "uptime_s": 10, "fw": "1.8.2", "hw": "rev-A"});
        js.publish(
            format!("telemetry.health.{health}"),
            report.to_string().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        extra += 1;
    }
    admin.wait_acked(report.total + extra).await;

    // The truth, as an unbound admin sees it.
    let count = |t: &str| format!("SELECT count(*) FROM usable.cold_chain WHERE tenant = '{t}'");
    let acme = scalar(&admin, &count("acme")).await;
    let globex = scalar(&admin, &count("globex")).await;
    assert!(acme > 0 && globex > 0, "{acme} {globex}");
    let acme_health = scalar(
        &admin,
        "SELECT count(*) FROM usable.device_health WHERE tenant = 'acme'",
    )
    .await;
    let acme_max_ts = values(
        &admin,
        "SELECT CAST(max(ts) AS VARCHAR) FROM usable.cold_chain WHERE tenant = 'acme'",
    )
    .await;

    let analyst = token(
        &admin,
        json!({"name": name("acme-analyst"), "role": "analyst", "tenants": ["acme"]}),
    )
    .await;
    let engineer = token(
        &admin,
        json!({"name": name("acme-engineer"), "role": "engineer", "tenants": ["acme"]}),
    )
    .await;
    let unbound_analyst = token(&admin, json!({"name": name("analyst"), "role": "analyst"})).await;

    // SHOW TABLES and information_schema list the lake's tables, each caller the ones it may
    // read: an admin every zone, an analyst bound to acme neither raw nor a table without a
    // tenant column (final.audit is an admin's only).
    let listed = |rows: Vec<String>| -> Vec<String> {
        rows.chunks(2)
            .map(|c| format!("{}.{}", c[0], c[1]))
            .collect()
    };
    let tables = "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema IN ('raw', 'usable', 'final', 'reference') ORDER BY 1, 2";
    let all = listed(values(&admin, tables).await);
    for t in [
        "raw.telemetry",
        "usable.cold_chain",
        "final.audit",
        "final.device_state",
    ] {
        assert!(all.contains(&t.to_string()), "{t} not in {all:?}");
    }
    let (status, body) = admin.query("SHOW TABLES").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.to_string().contains("cold_chain"), "{body}");
    let seen = listed(values(&analyst_of(&admin).await, tables).await);
    assert!(seen.contains(&"usable.cold_chain".to_string()), "{seen:?}");
    assert!(
        !seen
            .iter()
            .any(|t| t.starts_with("raw.") || t == "final.audit"),
        "{seen:?}"
    );
    let columns = values(
        &admin,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'usable' AND table_name = 'cold_chain'",
    )
    .await;
    assert!(columns.contains(&"tenant".to_string()), "{columns:?}");

    // Every way of naming the table's rows counts acme's only.
    for sql in [
        "SELECT count(*) FROM usable.cold_chain".to_string(),
        "WITH x AS (SELECT * FROM usable.cold_chain) SELECT count(*) FROM x".into(),
        "SELECT count(*) FROM (SELECT * FROM (SELECT * FROM usable.cold_chain) a) b".into(),
        "SELECT count(*) FROM usable.cold_chain WHERE device_id IN (SELECT device_id FROM usable.cold_chain)".into(),
        "SELECT count(*) FROM (SELECT tenant FROM usable.cold_chain UNION ALL SELECT tenant FROM usable.cold_chain WHERE tenant = 'globex') u".into(),
        "SELECT max(n) FROM (SELECT count(*) OVER () AS n FROM usable.cold_chain) w".into(),
        "SELECT count(*) FROM USABLE.Cold_Chain".into(),
        "SELECT count(*) FROM \"usable\".\"cold_chain\"".into(),
        "SELECT count(*) FROM datafusion.usable.cold_chain".into(),
        // A predicate that fails on any globex row: it never sees one.
        "SELECT count(*) FROM usable.cold_chain WHERE CASE WHEN tenant = 'globex' THEN CAST(device_id AS INT) ELSE 1 END = 1".into(),
        format!(
            "SELECT count(*) FROM usable.cold_chain WHERE device_id NOT IN ({})",
            (0..3000).map(|i| format!("'x{i}'")).collect::<Vec<_>>().join(", ")
        ),
        // Subqueries nested 15 deep.
        format!(
            "SELECT count(*) FROM {}",
            (0..15).fold("usable.cold_chain".to_string(), |inner, i| format!(
                "(SELECT * FROM {inner}) t{i}"
            ))
        ),
    ] {
        assert_eq!(scalar(&analyst, &sql).await, acme, "{sql}");
    }
    // Plans that execute a scan again (a recursive CTE runs its recursive term once per step):
    // the bound token's answer equals the admin's with the tenant filtered by hand, at every step.
    let walk = |filter: &str| {
        format!(
            "WITH RECURSIVE walk(device_id, seq, depth) AS (\
               SELECT device_id, min(seq), 1 FROM usable.cold_chain {filter} GROUP BY device_id \
               UNION ALL \
               SELECT c.device_id, c.seq, w.depth + 1 FROM walk w JOIN usable.cold_chain c \
                 ON c.device_id = w.device_id AND c.seq = w.seq + 1 {and} WHERE w.depth < 6\
             ) SELECT count(*) * 1000 + max(depth) FROM walk",
            and = if filter.is_empty() {
                String::new()
            } else {
                format!("AND c.{}", &filter[6..])
            }
        )
    };
    let by_hand = scalar(&admin, &walk("WHERE tenant = 'acme'")).await;
    assert!(by_hand % 1000 > 1, "the walk recursed: {by_hand}");
    assert_eq!(scalar(&analyst, &walk("")).await, by_hand, "{}", walk(""));

    // Every shipped final table and final.alerts carry the tenant: the bound token reads its own
    // rows of each, as many as the admin counts for acme, and none of another tenant's.
    for table in [
        "final.alerts",
        "final.device_minute",
        "final.device_hour",
        "final.fleet_hour",
        "final.device_health_hour",
        "final.firmware_hour",
        "final.device_sessions",
    ] {
        let own = scalar(
            &admin,
            &format!("SELECT count(*) FROM {table} WHERE tenant = 'acme'"),
        )
        .await;
        let others = scalar(
            &admin,
            &format!("SELECT count(*) FROM {table} WHERE tenant IS DISTINCT FROM 'acme'"),
        )
        .await;
        assert!(
            own > 0 && others > 0,
            "{table}: acme {own}, others {others}"
        );
        assert_eq!(
            scalar(&analyst, &format!("SELECT count(*) FROM {table}")).await,
            own,
            "{table}"
        );
        assert_eq!(
            scalar(
                &analyst,
                &format!("SELECT count(*) FROM {table} WHERE tenant IS DISTINCT FROM 'acme'")
            )
            .await,
            0,
            "{table}"
        );
    }
    assert_eq!(
        scalar(
            &analyst,
            "SELECT count(*) FROM final.alerts WHERE rule = 'trailer_too_warm' AND state = 'firing'"
        )
        .await,
        1
    );

    // One table named two ways in one statement.
    assert_eq!(
        scalar(
            &analyst,
            "SELECT (SELECT count(*) FROM usable.cold_chain) + (SELECT count(*) FROM datafusion.usable.cold_chain)",
        )
        .await,
        2 * acme
    );
    for sql in [
        "SELECT count(*) FROM usable.cold_chain WHERE tenant <> 'acme'",
        "SELECT count(*) FROM usable.cold_chain WHERE tenant = 'globex' OR tenant IS NULL",
        "SELECT count(*) FROM usable.device_health WHERE tenant = 'globex'",
        "SELECT count(*) FROM final.fleet_hour WHERE tenant = 'globex'",
        "SELECT count(*) FROM final.device_state WHERE tenant = 'globex'",
    ] {
        assert_eq!(scalar(&analyst, sql).await, 0, "{sql}");
    }
    assert_eq!(
        scalar(&analyst, "SELECT count(*) FROM usable.device_health").await,
        acme_health
    );
    assert_eq!(
        values(
            &analyst,
            "SELECT CAST(max(ts) AS VARCHAR) FROM usable.cold_chain"
        )
        .await,
        acme_max_ts
    );
    for sql in [
        "SELECT DISTINCT tenant FROM usable.cold_chain",
        "SELECT tenant FROM usable.cold_chain UNION SELECT tenant FROM usable.device_health",
        "SELECT DISTINCT tenant FROM usable.device_health",
        "SELECT DISTINCT tenant FROM final.device_state",
    ] {
        assert_eq!(values(&analyst, sql).await, ["acme"], "{sql}");
    }
    // The engineer joins the registry: scoped as well.
    assert_eq!(
        values(
            &engineer,
            "SELECT DISTINCT d.tenant FROM reference.devices d JOIN usable.cold_chain c ON c.device_id = d.device_id",
        )
        .await,
        ["acme"]
    );
    assert_eq!(
        scalar(
            &engineer,
            "SELECT count(*) FROM reference.devices WHERE tenant = 'globex'"
        )
        .await,
        0
    );

    // What cannot be scoped is refused: tables without a tenant column, plans, raw (no tenant
    // column either) — and writes, for everyone.
    for (sql, status, code) in [
        ("SELECT count(*) FROM usable.telemetry", 403, "forbidden"),
        (
            "EXPLAIN SELECT count(*) FROM usable.cold_chain",
            403,
            "forbidden",
        ),
        (
            "EXPLAIN ANALYZE SELECT count(*) FROM usable.cold_chain",
            403,
            "forbidden",
        ),
        ("SELECT count(*) FROM raw.telemetry", 403, "forbidden"),
        (
            "SELECT 1 UNION ALL SELECT count(*) FROM raw.quarantine",
            403,
            "forbidden",
        ),
        (
            "WITH r AS (SELECT * FROM \"raw\".\"telemetry\") SELECT count(*) FROM r",
            403,
            "forbidden",
        ),
        ("SELECT count(*) FROM reference.devices", 403, "forbidden"),
        ("SELECT count(*) FROM final.audit", 403, "forbidden"),
        ("SELECT count(*) FROM final.\"AUDIT\"", 403, "forbidden"),
        ("SELECT count(*) FROM final.rule_audit", 403, "forbidden"),
        (
            "COPY (SELECT * FROM usable.cold_chain) TO '/tmp/fleetlake-leak.csv'",
            400,
            "read_only",
        ),
        (
            "CREATE TABLE x AS SELECT * FROM usable.cold_chain",
            400,
            "read_only",
        ),
        ("DROP TABLE usable.cold_chain", 400, "read_only"),
        ("SET datafusion.execution.batch_size = 1", 400, "read_only"),
    ] {
        assert_eq!(
            refused(&analyst, sql).await,
            (status, code.to_string()),
            "{sql}"
        );
    }
    assert!(!std::path::Path::new("/tmp/fleetlake-leak.csv").exists());
    // information_schema lists only what the caller may read: each listed table answers it.
    let listed = values(
        &analyst,
        "SELECT table_schema || '.' || table_name FROM information_schema.tables WHERE table_schema IN ('raw', 'usable', 'final', 'reference')",
    )
    .await;
    assert!(!listed.is_empty());
    for table in &listed {
        let (status, body) = analyst
            .query(&format!("SELECT count(*) FROM {table}"))
            .await;
        assert_eq!(status, 200, "{table} is listed: {body}");
    }
    assert!(
        values(&analyst, "SELECT count(*) FROM generate_series(1, 3)")
            .await
            .contains(&"3".to_string())
    );

    // An unbound analyst: every tenant, still no raw zone.
    assert_eq!(
        scalar(&unbound_analyst, "SELECT count(*) FROM usable.cold_chain").await,
        acme + globex
    );
    assert_eq!(
        refused(&unbound_analyst, "SELECT * FROM raw.telemetry LIMIT 1").await,
        (403, "forbidden".into())
    );

    // The other routes: table listing without counts or raw tables, devices and fleet
    // endpoints scoped.
    let (_, tables) = analyst.get("/v1/tables").await;
    let tables: Value = serde_json::from_str(&tables).unwrap();
    for t in tables["tables"].as_array().unwrap() {
        assert!(
            matches!(t["zone"].as_str(), Some("usable" | "final")),
            "{t}"
        );
        assert!(t["rows"].is_null(), "{t}");
        assert_ne!(t["table"], "final.audit");
    }
    let (status, devices) = analyst.get("/v1/devices?limit=1000").await;
    assert_eq!(status, 200, "{devices}");
    let devices: Value = serde_json::from_str(&devices).unwrap();
    let list = devices["devices"].as_array().unwrap();
    assert!(!list.is_empty());
    for d in list {
        assert_eq!(d["reading"]["tenant"], "acme", "{d}");
    }
    let simulator = Simulator::new(sim.clone());
    let globex_device = (0..sim.devices)
        .map(|d| simulator.device_info(d))
        .find(|i| i.tenant == "globex")
        .unwrap();
    let (status, _) = admin
        .get(&format!("/v1/devices/{}", globex_device.device_id))
        .await;
    if status == 200 {
        let (status, _) = analyst
            .get(&format!("/v1/devices/{}", globex_device.device_id))
            .await;
        assert_eq!(status, 404);
    }
    let (status, body) = analyst
        .get("/v1/fleet/root-cause?window=all&tenant=globex")
        .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["rows"].as_array().unwrap().len(), 0, "{body}");

    // Write routes refuse a token without the scope, or bound to a tenant; no token, a wrong
    // or revoked one is 401.
    let csv = "device_id,tenant,site,model,hw_rev\nx,acme,s,m,h\n";
    for (api, method, path, status) in [
        (&analyst, Method::PUT, "/v1/reference/devices", 403),
        (&engineer, Method::PUT, "/v1/reference/devices", 403),
        (&analyst, Method::PUT, "/v1/rules/x", 403),
        (&engineer, Method::PUT, "/v1/rules/x", 403),
        (&engineer, Method::DELETE, "/v1/rules/x", 403),
        (&unbound_analyst, Method::POST, "/v1/tokens", 403),
        (&engineer, Method::GET, "/v1/tokens", 403),
        (&engineer, Method::GET, "/v1/rules", 403),
        (&engineer, Method::GET, "/v1/pipelines", 403),
        (&engineer, Method::GET, "/metrics", 403),
        (&analyst, Method::GET, "/v1/pipelines", 403),
        (&analyst, Method::GET, "/metrics", 403),
    ] {
        let r = api
            .http(method.clone(), format!("{}{path}", api.base))
            .header("content-type", "text/csv")
            .body(csv)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
    }
    let anonymous = admin.with_token(None);
    let (status, body) = anonymous.query("SELECT 1").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, json!("unauthorized"))
    );
    let (status, _) = admin
        .with_token(Some("flk_00000000_nope"))
        .query("SELECT 1")
        .await;
    assert_eq!(status, 401);
    let (status, _) = anonymous.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(
        scalar(
            &admin,
            "SELECT count(*) FROM reference.devices WHERE device_id = 'x'"
        )
        .await,
        0
    );

    // The audit: who created which token, who read raw, from where.
    let raw_reader = token(
        &admin,
        json!({"name": name("raw-reader"), "role": "engineer"}),
    )
    .await;
    assert!(scalar(&raw_reader, "SELECT count(*) FROM raw.telemetry").await > 0);
    let (_, audit) = admin
        .query("SELECT actor, role, action, target, address FROM final.audit ORDER BY audit_seq")
        .await;
    let rows = audit["rows"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r[0] == "test-admin" && r[2] == "token.create"),
        "{audit}"
    );
    assert!(
        rows.iter()
            .any(|r| r[0] == "test-admin" && r[2] == "reference.replace"),
        "{audit}"
    );
    let raw_read = rows
        .iter()
        .find(|r| r[2] == "raw.read")
        .unwrap_or_else(|| panic!("{audit}"));
    assert!(raw_read[0].as_str().unwrap().starts_with("raw-reader"));
    assert_eq!(raw_read[3], "raw.telemetry");
    assert_eq!(raw_read[4], "127.0.0.1");

    // Revoked: refused at once.
    let (status, listed) = admin.send(Method::GET, "/v1/tokens", None, "").await;
    assert_eq!(status, 200);
    let id = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap().starts_with("raw-reader"))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = admin
        .send(Method::DELETE, &format!("/v1/tokens/{id}"), None, "")
        .await;
    assert_eq!(status, 200);
    let (status, _) = raw_reader.query("SELECT 1").await;
    assert_eq!(status, 401);
    engine.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_query_limit_answers_its_error_while_ingest_keeps_acknowledging() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let lake = dir.path().join("lake").display().to_string();
    let config = test_config(nats.url(), &lake, &[("query.max_body_kb", "8")]);
    let (engine, admin, js) = start_engine(&config).await;
    let heavy = token(
        &admin,
        json!({"name": name("heavy"), "role": "analyst",
               "limits": {"memory_mb": 16, "timeout_s": 2, "max_rows": 100, "max_concurrent": 1}}),
    )
    .await;
    // The memory limit alone: on a loaded machine the grouping below can outlast 2 s before it
    // outgrows 16 MiB, and the time limit would answer first.
    let hungry = token(
        &admin,
        json!({"name": name("hungry"), "role": "analyst",
               "limits": {"memory_mb": 16, "timeout_s": 120, "max_rows": 100, "max_concurrent": 1}}),
    )
    .await;
    let chatty = token(
        &admin,
        json!({"name": name("chatty"), "role": "analyst", "limits": {"rate_per_minute": 3}}),
    )
    .await;

    // Ingest runs all along: a fleet publishing 500 messages a second.
    let publisher = fleet_in_background(&js, 15_000);
    let acked = || metric(&admin, "fleetlake_messages_acked_total");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = acked().await;

    // Memory: a grouping into millions of groups needs far more than 16 MiB.
    let (status, body) = hungry
        .query("SELECT v % 5000000 AS k, count(*) AS n FROM generate_series(1, 20000000) t(v) GROUP BY k ORDER BY n DESC LIMIT 3")
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("query_memory_limit")),
        "{body}"
    );
    // Time: counting 10^11 rows takes far longer than 2 s; the query is cancelled.
    let started = std::time::Instant::now();
    let slow = "SELECT count(*) FROM generate_series(1, 100000000000)";
    let (status, body) = heavy.query(slow).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (408, Some("query_timeout")),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // The answer's own memory counts too: 50 rows of a megabyte each.
    let (status, body) = query_when_free(
        &heavy,
        "SELECT v, repeat('x', 1000000) AS big FROM generate_series(1, 50) t(v)",
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("query_memory_limit")),
        "{body}"
    );
    // Rows: 1,000 rows for a token allowed 100.
    let (status, body) = heavy.query("SELECT * FROM generate_series(1, 1000)").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("query_row_limit")),
        "{body}"
    );
    assert_eq!(
        scalar(&heavy, "SELECT count(*) FROM generate_series(1, 1000)").await,
        1000
    );
    // Concurrency: one at a time for this token; a second while the first runs gets 429.
    assert_eq!(query_when_free(&heavy, "SELECT 1").await.0, 200);
    let running = {
        let heavy = heavy.clone();
        tokio::spawn(async move { heavy.query(slow).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = heavy.query("SELECT 1").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_concurrent_queries")),
        "{body}"
    );
    assert_eq!(running.await.unwrap().0, 408);
    // Rate: three a minute.
    for _ in 0..3 {
        assert_eq!(scalar(&chatty, "SELECT 1").await, 1);
    }
    let r = chatty
        .http(Method::POST, format!("{}/v1/query", chatty.base))
        .json(&json!({"sql": "SELECT 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    // Body size: more than 8 KiB.
    let long = format!("SELECT 1 -- {}", "x".repeat(10_000));
    let (status, body) = admin.query(&long).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{body}"
    );

    // Ingest acknowledged messages meanwhile, and lands every one.
    let after = acked().await;
    assert!(
        after > before,
        "acked {before} before the queries, {after} after"
    );
    every_message_lands(&admin, publisher).await;
    engine.shutdown().await.expect("clean shutdown");
}

/// This process's resident memory now and at its peak since the last [`reset_peak`], in MiB.
fn resident_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Starts measuring the peak resident memory afresh (`5` to `clear_refs`, proc(5)).
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("/proc/self/clear_refs");
}

/// Operators that buffer without reserving (window functions, the anomaly functions), scalar
/// functions asked for one huge value, and a cross join, each run by a token allowed 16 MiB:
/// each is refused or cut off, the engine's (this process's) resident memory stays within the
/// pool plus the documented margin (README, "Limits"), and ingest acknowledges throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffering_operators_and_huge_values_stay_within_the_pool_while_ingest_acknowledges() {
    const POOL_MIB: u64 = 16;
    const MARGIN_MIB: u64 = 128;
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let lake = dir.path().join("lake").display().to_string();
    let config = test_config(nats.url(), &lake, &[]);
    let (engine, admin, js) = start_engine(&config).await;
    let small = token(
        &admin,
        json!({"name": name("small"), "role": "analyst",
               "limits": {"memory_mb": POOL_MIB, "timeout_s": 120}}),
    )
    .await;
    let brief = token(
        &admin,
        json!({"name": name("brief"), "role": "analyst",
               "limits": {"memory_mb": POOL_MIB, "timeout_s": 2}}),
    )
    .await;
    let publisher = fleet_in_background(&js, 20_000);
    let acked = || metric(&admin, "fleetlake_messages_acked_total");
    // Ingest's own memory settles before the peak is measured.
    admin.wait_acked(2_000).await;

    let refused = [
        // DataFusion's whole-partition window buffers its input without a reservation.
        "SELECT max(s) FROM (SELECT sum(v) OVER () AS s FROM generate_series(1, 30000000) t(v))",
        // fleetlake's anomaly function over the same.
        "SELECT max(z) FROM (SELECT robust_zscore(CAST(v AS DOUBLE)) OVER () AS z FROM generate_series(1, 30000000) t(v))",
        // One value of 1.5 GB, and a list of 500 million numbers.
        "SELECT length(repeat('x', 1500000000))",
        "SELECT cardinality(range(500000000))",
        "SELECT length(rpad('x', 400000000, 'yz'))",
    ];
    reset_peak();
    let (baseline, _) = resident_mib();
    let mut progress = vec![acked().await];
    for sql in refused {
        let (status, body) = small.query(sql).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("query_memory_limit")),
            "{sql}: {body}"
        );
        progress.push(acked().await);
    }
    // A cross join streams: it is cut off by the time limit, holding little.
    let (status, body) = brief
        .query("SELECT count(*) FROM range(100000) a, range(100000) b")
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (408, Some("query_timeout")),
        "{body}"
    );
    let (_, peak) = resident_mib();
    eprintln!("resident memory: {baseline} MiB before the queries, peak {peak} MiB");
    // Every refused query gives its reservations back to the budget all queries share (the
    // cancelled cross join once its task has really ended).
    fleetlake_tests::wait_for("queries' memory released", Duration::from_secs(60), || {
        let admin = admin.clone();
        async move {
            (metric(&admin, "fleetlake_query_memory_reserved_bytes").await == 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        metric(&admin, "fleetlake_query_memory_limit_bytes").await,
        2048 << 20
    );
    assert!(
        peak <= baseline + POOL_MIB + MARGIN_MIB,
        "resident memory peaked at {peak} MiB from {baseline} MiB: more than the {POOL_MIB} MiB pool and the {MARGIN_MIB} MiB margin"
    );
    // Ingest acknowledged messages all along, and lands every one.
    progress.push(acked().await);
    assert!(
        progress.first() < progress.last(),
        "acked counts while the queries ran: {progress:?}"
    );
    every_message_lands(&admin, publisher).await;
    engine.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_served_over_https_with_the_configured_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = TestDir::new();
    crate::nats_auth::certificates(certs.path());
    let file = |name: &str| certs.path().join(name).display().to_string();
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let lake = dir.path().join("lake").display().to_string();
    let config = test_config(
        nats.url(),
        &lake,
        &[
            ("http.tls_cert", &file("server.pem")),
            ("http.tls_key", &file("server-key.pem")),
        ],
    );
    let (engine, api, _js) = start_engine(&config).await;

    // A client trusting the test CA gets an answer over TLS, with the bearer token.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(file("ca.pem")).unwrap();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let get = |path: &str, token: Option<&str>| {
        let connector = connector.clone();
        let addr = engine.addr;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n{}Connection: close\r\n\r\n",
            token
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default()
        );
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            let _ = tls.read_to_string(&mut answer).await;
            answer
        }
    };
    // (Health may still say "degraded" while ingest connects: any answer of it will do.)
    let healthz = get("/healthz", None).await;
    assert!(healthz.starts_with("HTTP/1.1 "), "{healthz}");
    assert!(healthz.contains("\"status\""), "{healthz}");
    let token = fleetlake_tests::test_tokens().1.clone();
    let tables = get("/v1/tables", Some(&token)).await;
    assert!(tables.starts_with("HTTP/1.1 200"), "{tables}");
    assert!(get("/v1/tables", None).await.starts_with("HTTP/1.1 401"));
    // Plain HTTP to the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("{}/healthz", api.base))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
    engine.shutdown().await.expect("clean shutdown");
}
