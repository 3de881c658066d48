//! `fleetlake demo`: the whole system in one command — a NATS server (started as a child process
//! when none answers), the local-folder lake, the engine, the simulator and the HTTP API — with
//! progress while it runs. Stops cleanly on Ctrl-C.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::serve::{Engine, shutdown_signal};
use crate::tools::nats_server::NatsServer;
use crate::tools::simulate::{self, SimConfig};

use crate::error::Error;

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub sim: SimConfig,
    /// Exit by itself once `sim.messages` are published and committed (for scripted runs).
    pub exit_when_done: bool,
}

/// Runs the demo until Ctrl-C (or until done with `exit_when_done`).
/// A fresh admin token named `demo` (an earlier run's is revoked), or a note when
/// authentication is off.
fn demo_token(config: &Config) -> Result<String, Error> {
    use crate::api::auth::{Role, TokenLimits, Tokens};
    if config.get("auth.enabled") != "true" {
        return Ok("(none needed: auth.enabled = false)".into());
    }
    let tokens = Tokens::open(std::path::Path::new(config.get("auth.tokens_file")))?;
    tokens.revoke("demo")?;
    let (_, secret) = tokens.create(
        "demo",
        Role::Admin,
        Vec::new(),
        "demo",
        TokenLimits::default(),
    )?;
    Ok(secret)
}

/// Where the demo keeps what it needs besides the lake (the NATS store, its log, the tokens).
const DEMO_DIR: &str = ".fleetlake-demo";

/// How far back the demo fleet's clocks start, so windows close and rules fire at once.
const HISTORY_MS: i64 = 15 * 60 * 1000;

/// The newest event time (ms) already in the shipped pipelines' usable tables, if any. The demo
/// only asks whether there is one: a run again in the same folder then starts its clocks at the
/// present instead of 15 minutes back (its devices count from 1 again, like devices that
/// rebooted, and their readings must be newer than the earlier run's).
async fn newest_reading_ms(lake: &fleetlake_zones::Lake) -> Option<i64> {
    let engine = fleetlake_sql::QueryEngine::new(lake.clone());
    let mut newest = None;
    for table in [
        "usable.telemetry",
        "usable.cold_chain",
        "usable.device_health",
    ] {
        let sql = format!("SELECT CAST(max(ts) AS BIGINT) FROM {table}");
        let Ok(result) = engine.query(&sql).await else {
            continue;
        };
        let Some(batch) = result.batches.first() else {
            continue;
        };
        let Ok(micros) = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Int64)
        else {
            continue;
        };
        let micros = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&micros);
        if !micros.is_empty() && arrow::array::Array::is_valid(micros, 0) {
            newest = newest.max(Some(micros.value(0) / 1000));
        }
    }
    newest
}

/// Seconds of wall time until the fleet's device clocks have advanced `device_s` seconds from
/// `start_ms` (they run at their own pace while behind the present, at the present's after).
fn wall_seconds(sim: &SimConfig, start_ms: i64, device_s: f64) -> Option<f64> {
    (sim.rate > 0.0).then(|| {
        let device_s_per_s =
            sim.reading_interval_ms as f64 / 1000.0 * sim.rate / sim.devices as f64;
        let behind_s =
            ((chrono::Utc::now().timestamp_millis() - start_ms) as f64 / 1000.0).max(0.0);
        if device_s <= behind_s || device_s_per_s <= 1.0 {
            device_s / device_s_per_s
        } else {
            // Catches up with the present at its own pace, then goes at the present's.
            behind_s / device_s_per_s + (device_s - behind_s)
        }
    })
}

pub async fn run(
    mut config: Config,
    env: Vec<(String, String)>,
    mut options: DemoOptions,
) -> Result<(), Error> {
    // The demo's tokens live in its own folder, not in the directory it was started from.
    if config.get("auth.tokens_file") == crate::config::default_of("auth.tokens_file") {
        std::fs::create_dir_all(DEMO_DIR)
            .map_err(|e| Error::Invalid(format!("creating {DEMO_DIR}: {e}")))?;
        config
            .set(
                "auth.tokens_file",
                &format!("{DEMO_DIR}/tokens.toml"),
                "demo",
            )
            .map_err(|e| Error::Invalid(e.to_string()))?;
    }
    let url = crate::config::redact_url(config.nats_url());
    let mut child: Option<NatsServer> = None;
    if crate::ingest::source::connect_with(&config.nats())
        .await
        .is_err()
    {
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
            .unwrap_or(4222);
        let dir = PathBuf::from(DEMO_DIR);
        eprintln!(
            "· no NATS server at {url}: starting nats-server on 127.0.0.1:{port} (store in {}/nats)",
            dir.display()
        );
        let server =
            NatsServer::start(port, &dir.join("nats"), Some(&dir.join("nats.log"))).await?;
        config
            .set("nats.url", &server.url, "demo")
            .map_err(|e| Error::Invalid(e.to_string()))?;
        child = Some(server);
    } else {
        eprintln!("· using the NATS server at {url}");
    }
    let engine = Engine::start(config.clone(), env, true)
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?;
    // The fleet's registry gives pipelines their cohort columns (tenant, site, model, hw_rev).
    let registry = simulate::Simulator::new(options.sim.clone()).registry_csv();
    let rows = crate::api::reference::parse_rows(Some("text/csv"), registry.as_bytes(), None)?;
    let devices = fleetlake_zones::TableId::parse("reference.devices")
        .map_err(|e| Error::Invalid(e.to_string()))?;
    engine
        .lake
        .replace(&devices, rows)
        .await
        .map_err(|e| Error::Invalid(format!("uploading the device registry: {e}")))?;
    let addr = engine.addr;
    eprintln!("· lake at {}", engine.lake.root());
    eprintln!("· HTTP API on http://{addr}");
    if options.sim.start_ms.is_none() {
        // A run again in the same folder starts at the present: every reading of an earlier
        // run (also one still waiting in the stream) was stamped at or before the moment it was
        // published, so the new run's readings are later, as a rebooted device's are.
        let now = chrono::Utc::now().timestamp_millis();
        let start = match newest_reading_ms(&engine.lake).await {
            Some(_) => now,
            None => now - HISTORY_MS,
        };
        options.sim.start_ms = Some(start);
    }
    let start = options.sim.start_ms.unwrap_or_default();
    eprintln!(
        "· device clocks start at {} ({} min ago) and advance {} s a reading, never past now",
        chrono::DateTime::from_timestamp_millis(start)
            .unwrap_or_default()
            .format("%H:%M:%S UTC"),
        (chrono::Utc::now().timestamp_millis() - start) / 60_000,
        options.sim.reading_interval_ms as f64 / 1000.0
    );
    // Windows close once device time passes their end plus the watermark (1 min + 30 s);
    // trailer_too_warm needs 5 minutes of warm readings from a drifting sensor.
    if let (Some(windows), Some(alert)) = (
        wall_seconds(&options.sim, start, 90.0),
        wall_seconds(&options.sim, start, 330.0),
    ) {
        eprintln!(
            "· expect the first final.device_minute rows after about {windows:.0} s and the first trailer_too_warm alert after about {alert:.0} s"
        );
    }
    let token = demo_token(&config)?;
    let cli = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "fleetlake".into());
    let lake_location = match engine.lake.root().to_file_path() {
        Ok(path) => path.display().to_string(),
        Err(()) => engine.lake.root().to_string(),
    };
    eprintln!();
    eprintln!("Try, in another terminal (the token is an admin's, made for this demo run):");
    eprintln!("  export FLEETLAKE_TOKEN={token}");
    eprintln!("  export FLEETLAKE_LAKE_LOCATION={lake_location}");
    eprintln!("  alias curl='curl -H \"Authorization: Bearer $FLEETLAKE_TOKEN\"'");
    eprintln!("  curl -s http://{addr}/v1/tables");
    eprintln!(
        "  curl -s http://{addr}/v1/query -d '{{\"sql\": \"SELECT device_id, count(*) AS n, avg(temperature) AS avg_t FROM usable.telemetry GROUP BY device_id ORDER BY n DESC LIMIT 5\"}}'"
    );
    eprintln!(
        "  curl -s http://{addr}/v1/query -H 'Accept: text/csv' -d '{{\"sql\": \"SELECT reason_kind, count(*) FROM raw.quarantine GROUP BY reason_kind ORDER BY 2 DESC\"}}'"
    );
    eprintln!(
        "  {cli} query \"SELECT fw, hw, count(*) FROM usable.telemetry GROUP BY fw, hw ORDER BY 1, 2\""
    );
    eprintln!(
        "  curl -s http://{addr}/v1/query -d '{{\"sql\": \"SELECT window_start, device_id, readings, temperature_max FROM final.device_minute ORDER BY window_start DESC LIMIT 5\"}}'"
    );
    eprintln!(
        "  curl -s http://{addr}/v1/query -d '{{\"sql\": \"SELECT rule, key, state, event_time FROM final.alerts ORDER BY event_time DESC LIMIT 5\"}}'"
    );
    eprintln!("  curl -s http://{addr}/v1/rules");
    if let Some(planted) = simulate::Simulator::new(options.sim.clone()).planted() {
        eprintln!();
        eprintln!(
            "Planted faults (the answers to find): {}",
            serde_json::to_string(&planted).unwrap_or_default()
        );
        eprintln!("  curl -s 'http://{addr}/v1/fleet/outliers?window=all&limit=20'");
        eprintln!("  curl -s 'http://{addr}/v1/fleet/root-cause?window=all&limit=5'");
        eprintln!(
            "  curl -s 'http://{addr}/v1/fleet/outliers?table=usable.device_health&metric=cpu_pct&by=fw&window=15m&all=true&limit=5'"
        );
    }
    eprintln!("  curl -s http://{addr}/metrics | grep ^fleetlake_");
    eprintln!("Press Ctrl-C to stop.");
    eprintln!();

    let js = crate::ingest::source::connect_with(&config.nats())
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?;
    crate::ingest::source::ensure_stream(&js, &config)
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let stop = CancellationToken::new();
    let sim_stop = stop.clone();
    let sim_config = options.sim.clone();
    let publisher =
        tokio::spawn(async move { simulate::publish(&js, sim_config, sim_stop, |_| {}).await });
    let metrics = engine.metrics.clone();
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut published_report = None;
    let mut publisher = Some(publisher);
    loop {
        tokio::select! {
            _ = &mut signal => {
                eprintln!("\n· stopping: committing what is in flight…");
                break;
            }
            _ = ticker.tick() => {
                let raw = metrics.rows_committed("raw.telemetry");
                eprintln!(
                    "  pulled {:>9}  raw {:>9}  usable {:>9}  final {:>7}  alerts {:>5}  quarantined {:>6}  lag {:>7}  storage {}",
                    metrics.messages_pulled.load(Ordering::Relaxed),
                    raw,
                    metrics.rows_committed_in_zone("usable"),
                    metrics.rows_committed_in_zone("final"),
                    metrics.alerts_published.load(Ordering::Relaxed),
                    metrics.quarantined.load(Ordering::Relaxed),
                    metrics.consumer_lag.load(Ordering::Relaxed),
                    if metrics.storage_up.load(Ordering::Relaxed) == 1 { "up" } else { "DOWN" },
                );
                if publisher.as_ref().is_some_and(|p| p.is_finished()) {
                    let done = publisher.take().expect("checked").await.map_err(|e| Error::Invalid(e.to_string()))??;
                    eprintln!("· simulator finished: {}", serde_json::to_string(&done).unwrap_or_default());
                    published_report = Some(done);
                }
                if options.exit_when_done
                    && let Some(r) = &published_report
                    && metrics.messages_acked.load(Ordering::Relaxed) >= r.total
                {
                    eprintln!("· all {} messages committed", r.total);
                    break;
                }
            }
        }
    }
    stop.cancel();
    if let Some(p) = publisher {
        let _ = p.await;
    }
    let stopped = engine.shutdown().await;
    if let Some(mut server) = child {
        server.stop().await;
    }
    stopped.map_err(|reason| Error::Invalid(format!("stopped with work unfinished: {reason}")))?;
    eprintln!("· stopped");
    Ok(())
}
