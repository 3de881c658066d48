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

use crate::config::Config;
use crate::http::{AppState, router};
use crate::metrics::Metrics;
use crate::pipelines::Declared;
use crate::rules::{RuleEntry, Rules};

/// A running engine.
pub struct Engine {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub lake: Lake,
    ingest_stop: CancellationToken,
    http_stop: CancellationToken,
    ingest: JoinSet<()>,
    http: JoinSet<()>,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Lake(#[from] fleetlake_zones::Error),
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
        let lake = Lake::open(&config.lake(env))?;
        let (declared, rule_files) = if ingest {
            load_pipelines(&config).await?
        } else {
            (Declared::default(), Vec::new())
        };
        let runners = &declared.runners;
        let metrics = Arc::new(Metrics::default());
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
                Some(Arc::new(Rules::new(
                    dir,
                    lake.clone(),
                    config.consumer(),
                    entries,
                    changes,
                )))
            }
            _ => None,
        };
        let state = AppState {
            lake: Arc::new(QueryEngine::new(lake.clone())),
            metrics: metrics.clone(),
            ingesting: ingest,
            pipelines: Arc::new(described),
            rules,
        };
        let ingest_stop = CancellationToken::new();
        let http_stop = CancellationToken::new();
        let mut http = JoinSet::new();
        let stop = http_stop.clone();
        http.spawn(async move {
            let served = axum::serve(listener, router(state))
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        let mut tasks = JoinSet::new();
        if ingest {
            tasks.spawn(crate::ingest::run(
                config,
                lake.clone(),
                declared,
                rule_changes,
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
            http,
        })
    }

    /// Stops in order: ingest (commits and acks what is in flight), then HTTP.
    pub async fn shutdown(mut self) {
        self.ingest_stop.cancel();
        while self.ingest.join_next().await.is_some() {}
        self.http_stop.cancel();
        while self.http.join_next().await.is_some() {}
    }
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
