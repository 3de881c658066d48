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
fn demo_token(config: &Config) -> Result<String, String> {
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

pub async fn run(
    mut config: Config,
    env: Vec<(String, String)>,
    options: DemoOptions,
) -> Result<(), String> {
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
        let dir = PathBuf::from(".fleetlake-demo");
        eprintln!(
            "· no NATS server at {url}: starting nats-server on 127.0.0.1:{port} (store in {}/nats)",
            dir.display()
        );
        let server =
            NatsServer::start(port, &dir.join("nats"), Some(&dir.join("nats.log"))).await?;
        config
            .set("nats.url", &server.url, "demo")
            .map_err(|e| e.to_string())?;
        child = Some(server);
    } else {
        eprintln!("· using the NATS server at {url}");
    }
    let engine = Engine::start(config.clone(), env, true)
        .await
        .map_err(|e| e.to_string())?;
    // The fleet's registry gives pipelines their cohort columns (tenant, site, model, hw_rev).
    let registry = simulate::Simulator::new(options.sim.clone()).registry_csv();
    let rows = crate::api::reference::parse_rows(Some("text/csv"), registry.as_bytes())?;
    let devices =
        fleetlake_zones::TableId::parse("reference.devices").map_err(|e| e.to_string())?;
    engine
        .lake
        .replace(&devices, rows)
        .await
        .map_err(|e| format!("uploading the device registry: {e}"))?;
    let addr = engine.addr;
    eprintln!("· lake at {}", engine.lake.root());
    eprintln!("· HTTP API on http://{addr}");
    let token = demo_token(&config)?;
    eprintln!();
    eprintln!("Try, in another terminal (the token is an admin's, made for this demo run):");
    eprintln!("  export FLEETLAKE_TOKEN={token}");
    eprintln!("  alias curl='curl -H \"Authorization: Bearer $FLEETLAKE_TOKEN\"'");
    eprintln!("  curl -s http://{addr}/v1/tables");
    eprintln!(
        "  curl -s http://{addr}/v1/query -d '{{\"sql\": \"SELECT device_id, count(*) AS n, avg(temperature) AS avg_t FROM usable.telemetry GROUP BY device_id ORDER BY n DESC LIMIT 5\"}}'"
    );
    eprintln!(
        "  curl -s http://{addr}/v1/query -H 'Accept: text/csv' -d '{{\"sql\": \"SELECT reason, count(*) FROM raw.quarantine GROUP BY reason\"}}'"
    );
    eprintln!(
        "  cargo run -q -- query \"SELECT fw, hw, count(*) FROM usable.telemetry GROUP BY fw, hw ORDER BY 1, 2\""
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
        .map_err(|e| e.to_string())?;
    crate::ingest::source::ensure_stream(&js, &config)
        .await
        .map_err(|e| e.to_string())?;
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
                    let done = publisher.take().expect("checked").await.map_err(|e| e.to_string())??;
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
    stopped.map_err(|reason| format!("stopped with work unfinished: {reason}"))?;
    eprintln!("· stopped");
    Ok(())
}
