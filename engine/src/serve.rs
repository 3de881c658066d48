//! `fleetlake serve`: wires the lake, the ingest stage and the HTTP API together, and shuts them
//! down in order (stop pulling → commit and ack in-flight messages → stop HTTP).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use fleetlake_sql::QueryEngine;
use fleetlake_sql::pipeline::{PipelineRunner, check_files, pipeline_files};
use fleetlake_zones::Lake;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::rules::{RuleEntry, Rules};
use crate::api::{AppState, router};
use crate::config::Config;
use crate::ingest::pipelines::Declared;
use crate::metrics::Metrics;

/// A running engine.
pub struct Engine {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub lake: Lake,
    ingest_stop: CancellationToken,
    http_stop: CancellationToken,
    ingest: JoinSet<()>,
    /// Cancelled once the ingest task has ended, for whatever reason.
    ingest_ended: CancellationToken,
    http: JoinSet<()>,
    /// Ends the query runtime when the engine is dropped.
    _query_runtime: crate::api::QueryRuntime,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Lake(#[from] fleetlake_zones::Error),
    #[error("{0}")]
    Config(String),
    #[error("pipelines do not check:\n{0}")]
    Pipelines(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Engine {
    /// Opens the lake, binds the HTTP address and starts ingesting (when `ingest` is true).
    pub async fn start(
        config: Config,
        env: Vec<(String, String)>,
        ingest: bool,
    ) -> Result<Self, StartError> {
        if ingest
            && config.maintenance_enabled()
            && config.vacuum_retention() < std::time::Duration::from_secs(3600)
        {
            return Err(StartError::Config(format!(
                "maintenance.vacuum_retention_hours is {}: serve needs at least 1, or vacuum could delete the files of a commit still being written (run `fleetlake maintain` with the engine stopped for less)",
                config.vacuum_retention().as_secs() / 3600
            )));
        }
        let lake = Lake::open(&config.lake(env))?;
        let (declared, rule_files) = if ingest {
            load_pipelines(&config).await?
        } else {
            (Declared::default(), Vec::new())
        };
        let cluster = ingest && config.partitions() > 0;
        let runners = &declared.runners;
        let metrics = Arc::new(Metrics::default());
        if cluster {
            // From the first request on, /v1/cluster says this is a member (joining yet).
            metrics.set_cluster(crate::cluster::ClusterStatus {
                instance: config.instance_id(),
                partitions: config.partitions(),
                ..Default::default()
            });
        }
        let addr = config.listen();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Listen { addr, source })?;
        let described: Vec<serde_json::Value> = runners
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "source": r.source.name,
                    "subject": r.source.subject,
                    "tables": r.tables.iter().map(|t| serde_json::json!({
                        "table": t.def.table.to_string(),
                        "expectations": t.def.expectations.iter().map(|e| serde_json::json!({
                            "name": e.name,
                            "action": format!("{:?}", e.action).to_lowercase(),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let (changes, rule_changes) = tokio::sync::mpsc::channel(8);
        let rules = match (ingest, config.pipelines_dir()) {
            (true, Some((dir, _))) => {
                let entries = declared
                    .rules
                    .iter()
                    .zip(rule_files)
                    .map(|(rule, file)| {
                        let managed =
                            file == dir.join("rules").join(format!("{}.sql", rule.def.name));
                        RuleEntry {
                            rule: rule.clone(),
                            sql: managed
                                .then(|| std::fs::read_to_string(&file).ok())
                                .flatten(),
                            file,
                        }
                    })
                    .collect();
                let rules = Rules::new(dir, lake.clone(), config.consumer(), entries, changes);
                Some(Arc::new(if cluster {
                    rules.frozen(format!(
                        "in a cluster (cluster.partitions = {}) each partition runs the rules it started with: the rule file of this instance is changed, and the change applies when each instance restarts with the same file",
                        config.partitions()
                    ))
                } else {
                    rules
                }))
            }
            _ => None,
        };
        let mut references: Vec<fleetlake_sql::pipeline::ReferenceDef> = Vec::new();
        for def in runners.iter().flat_map(|r| r.references()) {
            if !references.iter().any(|d| d.table == def.table) {
                references.push(def.clone());
            }
        }
        // The latest state of every device, kept by ingest; queried as final.device_state and
        // over /v1/devices.
        let devices: fleetlake_sql::device_state::SharedDeviceState = Default::default();
        let query_memory = fleetlake_sql::memory::EngineMemory::new(config.query_total_memory());
        let _ = metrics.query_memory.set(query_memory.clone());
        let mut engine = QueryEngine::new(lake.clone()).with_memory(query_memory);
        // In a cluster each partition keeps its devices' state: there is no whole view here.
        if ingest && !cluster {
            engine = engine.with_live(Arc::new(fleetlake_sql::device_state::DeviceStateTable(
                devices.clone(),
            )));
        }
        let auth = crate::api::auth::Auth::from_config(&config)
            .map_err(|e| StartError::Config(e.to_string()))?;
        match &auth.tokens {
            None => tracing::warn!(
                "auth.enabled = false: every route is open to anyone who can reach {addr}, with an admin's rights"
            ),
            Some(tokens) if tokens.is_empty() => tracing::warn!(
                "no tokens in {}: every route but /healthz answers 401 until one is created with `fleetlake token create --name NAME --role admin --set auth.tokens_file={} --set lake.location={}` (the lake is where the creation is audited)",
                tokens.path().display(),
                std::fs::canonicalize(tokens.path())
                    .unwrap_or_else(|_| tokens.path().to_path_buf())
                    .display(),
                match lake.root().to_file_path() {
                    Ok(p) => p.display().to_string(),
                    Err(()) => lake.root().to_string(),
                }
            ),
            Some(_) => {}
        }
        let (queries, query_runtime) = crate::api::query_runtime(config.query_threads());
        let tls = crate::api::tls::server_config(&config)
            .map_err(|e| StartError::Config(e.to_string()))?;
        let state = AppState {
            auth: Arc::new(auth),
            audit: Arc::new(crate::api::audit::Audit::new(
                lake.clone(),
                config.consumer(),
            )),
            queries,
            max_query_body: config.query_max_body(),
            references: Arc::new(references),
            lake: Arc::new(engine),
            devices: (ingest && !cluster).then(|| devices.clone()),
            metrics: metrics.clone(),
            ingesting: ingest,
            pipelines: Arc::new(described),
            rules,
            fleet: Arc::new(crate::api::fleet::FleetDefaults::from_config(&config)),
        };
        let ingest_stop = CancellationToken::new();
        let http_stop = CancellationToken::new();
        let mut http = JoinSet::new();
        let stop = http_stop.clone();
        let app = router(state).into_make_service_with_connect_info::<crate::api::tls::Peer>();
        http.spawn(async move {
            let served = match tls {
                Some(tls) => {
                    axum::serve(crate::api::tls::TlsListener::new(listener, tls), app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                }
                None => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                }
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        let mut tasks = JoinSet::new();
        let ingest_ended = CancellationToken::new();
        if ingest {
            let run = if cluster {
                tokio::spawn(crate::cluster::run(
                    config.clone(),
                    lake.clone(),
                    declared,
                    metrics.clone(),
                    ingest_stop.clone(),
                ))
            } else {
                let run = crate::ingest::run(
                    config.clone(),
                    lake.clone(),
                    declared,
                    rule_changes,
                    metrics.clone(),
                    ingest_stop.clone(),
                    devices,
                );
                // Why it stopped is recorded where it stopped.
                tokio::spawn(async move {
                    let _ = run.await;
                })
            };
            tasks.spawn(supervise(
                run,
                metrics.clone(),
                ingest_stop.clone(),
                ingest_ended.clone(),
            ));
        }
        if ingest {
            tasks.spawn(crate::ingest::heartbeat::beat(
                lake.clone(),
                config.consumer().to_string(),
                ingest_stop.clone(),
            ));
        }
        if ingest && config.maintenance_enabled() {
            tasks.spawn(crate::maintenance::schedule(
                lake.clone(),
                config.clone(),
                metrics.clone(),
                ingest_stop.clone(),
            ));
        }
        tracing::info!(%addr, lake = %lake.root(), "fleetlake is serving");
        Ok(Self {
            addr,
            metrics,
            lake,
            ingest_stop,
            http_stop,
            ingest: tasks,
            ingest_ended,
            http,
            _query_runtime: query_runtime,
        })
    }

    /// Resolves with the reason once ingest has stopped on its own (a panic, an error that
    /// retrying cannot fix, a `FAIL` expectation, a stream that is not the lake's); never while
    /// it runs. `fleetlake serve` then shuts down and exits non-zero, so a supervisor restarts it.
    pub async fn ingest_failed(&self) -> String {
        loop {
            self.ingest_ended.cancelled().await;
            if let Some(reason) = self.metrics.stopped_reason() {
                return reason;
            }
            if !self.ingest_stop.is_cancelled() {
                return "ingest ended".into();
            }
            // Ended because shutdown was asked for: not a failure.
            std::future::pending::<()>().await;
        }
    }

    /// Stops in order: ingest (commits and acks what is in flight, retrying failed commits for
    /// `ingest.shutdown_grace_s`), then HTTP. An error says what ingest could not finish (the
    /// messages it did not acknowledge come back at the next start); `serve` exits non-zero.
    pub async fn shutdown(mut self) -> Result<(), IngestStopped> {
        self.ingest_stop.cancel();
        while self.ingest.join_next().await.is_some() {}
        self.http_stop.cancel();
        while self.http.join_next().await.is_some() {}
        match self.metrics.stopped_reason() {
            Some(reason) => Err(IngestStopped { reason }),
            None => Ok(()),
        }
    }
}

/// Why ingest stopped on its own before or during a shutdown, as `/healthz` said it (see
/// [`crate::error::Stopped`]): what it could not finish; `serve` exits non-zero with it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct IngestStopped {
    pub reason: String,
}

/// Loads and checks the pipelines of `pipelines.dir`; any error refuses the start. Also returns
/// the file each rule is declared in (in the order of `Declared::rules`).
async fn load_pipelines(config: &Config) -> Result<(Declared, Vec<PathBuf>), StartError> {
    let Some((dir, explicit)) = config.pipelines_dir() else {
        return Ok((Declared::default(), Vec::new()));
    };
    if !dir.exists() {
        if explicit {
            return Err(StartError::Pipelines(format!(
                "pipelines.dir {} does not exist",
                dir.display()
            )));
        }
        return Ok((Declared::default(), Vec::new()));
    }
    let files = pipeline_files(std::slice::from_ref(&dir))
        .map_err(|e| StartError::Pipelines(format!("reading {}: {e}", dir.display())))?;
    let reports = check_files(&files).await;
    let errors: Vec<String> = reports.iter().flat_map(|r| r.error_lines()).collect();
    if !errors.is_empty() {
        return Err(StartError::Pipelines(errors.join("\n")));
    }
    for warning in reports.iter().flat_map(|r| r.warning_lines()) {
        tracing::warn!("{warning}");
    }
    let mut runners = Vec::new();
    for pipeline in reports.iter().filter_map(|r| r.pipeline.as_ref()) {
        let runner =
            PipelineRunner::new(pipeline).map_err(|e| StartError::Pipelines(e.to_string()))?;
        tracing::info!(pipeline = %runner.name, subject = %runner.source.subject, "pipeline loaded");
        runners.push(runner);
    }
    let windows: Vec<_> = reports.iter().flat_map(|r| r.windows.clone()).collect();
    let rules: Vec<_> = reports.iter().flat_map(|r| r.rules.clone()).collect();
    let rule_files = reports
        .iter()
        .flat_map(|r| r.rules.iter().map(|_| r.path.clone()))
        .collect();
    for w in &windows {
        tracing::info!(table = %w.def.table, input = %w.input, "window table loaded");
    }
    for r in &rules {
        tracing::info!(rule = %r.def.name, input = %r.input, "rule loaded");
    }
    let declared = Declared {
        runners,
        windows,
        rules,
    };
    Ok((declared, rule_files))
}

/// Waits for the ingest task and records how it ended: a panic in ingest (or in the commit task
/// it awaits) is recorded as ingest stopping with the panic's message, so `/healthz` says so and
/// `serve` exits non-zero; so is an ingest that ends without being asked to. `ended` is cancelled
/// once it has ended, whatever the reason.
async fn supervise(
    run: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    ended: CancellationToken,
) {
    match run.await {
        Ok(()) if !stop.is_cancelled() && metrics.stopped_reason().is_none() => {
            let _stopped = crate::error::Stopped::because(
                &metrics,
                "ingest ended without being asked to stop",
            );
        }
        Ok(()) => {}
        Err(e) => {
            let reason = match e.try_into_panic() {
                Ok(panic) => format!("ingest panicked: {}", crate::metrics::panic_message(&panic)),
                Err(e) => format!("ingest task failed: {e}"),
            };
            let _stopped = crate::error::Stopped::because(&metrics, &reason);
        }
    }
    ended.cancel();
}

/// Resolves when SIGINT (Ctrl-C) or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn supervised(
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Arc<Metrics> {
        let metrics = Arc::new(Metrics::default());
        let (stop, ended) = (CancellationToken::new(), CancellationToken::new());
        supervise(tokio::spawn(task), metrics.clone(), stop, ended.clone()).await;
        assert!(ended.is_cancelled());
        metrics
    }

    #[tokio::test]
    async fn a_panic_in_ingest_is_reported_with_its_message() {
        let metrics = supervised(async { panic!("attempt to add with overflow") }).await;
        assert_eq!(
            metrics.stopped_reason().as_deref(),
            Some("ingest panicked: attempt to add with overflow")
        );
    }

    #[tokio::test]
    async fn an_ingest_that_ends_unasked_is_reported() {
        let metrics = supervised(async {}).await;
        assert!(
            metrics
                .stopped_reason()
                .unwrap()
                .contains("without being asked")
        );
    }
}
