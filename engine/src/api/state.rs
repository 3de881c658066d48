//! What every handler shares: the [`AppState`], the [`Lakehouse`] the SQL routes read through,
//! and the query runtime.

use std::sync::Arc;

use arrow::array::RecordBatch;
use fleetlake_sql::access::Access;
use fleetlake_sql::{QueryEngine, QueryResult};
use fleetlake_zones::{TableId, TableInfo};
use futures::future::BoxFuture;

use crate::api::auth::Auth;
use crate::metrics::Metrics;

/// What the HTTP layer needs from the lake.
pub trait Lakehouse: Send + Sync + 'static {
    /// Runs read-only `sql` as `access` allows (see [`QueryEngine::query_with`]).
    fn query(
        &self,
        sql: String,
        access: Access,
    ) -> BoxFuture<'static, fleetlake_sql::Result<QueryResult>>;
    fn tables(&self) -> BoxFuture<'static, fleetlake_sql::Result<Vec<TableInfo>>>;
    /// Replaces `reference.<name>` with `rows`.
    fn replace_reference(
        &self,
        name: String,
        rows: RecordBatch,
    ) -> BoxFuture<'static, fleetlake_sql::Result<TableInfo>>;
}

impl Lakehouse for QueryEngine {
    fn query(
        &self,
        sql: String,
        access: Access,
    ) -> BoxFuture<'static, fleetlake_sql::Result<QueryResult>> {
        let engine = self.clone();
        Box::pin(async move { QueryEngine::query_with(&engine, &sql, &access).await })
    }

    fn tables(&self) -> BoxFuture<'static, fleetlake_sql::Result<Vec<TableInfo>>> {
        let lake = self.lake().clone();
        Box::pin(async move {
            // Every table in the lake, zone by zone: built-in, pipeline, window and reference.
            let mut out = Vec::new();
            for id in lake.all_tables().await? {
                if let Some(info) = lake.describe(&id).await? {
                    out.push(info);
                }
            }
            Ok(out)
        })
    }

    fn replace_reference(
        &self,
        name: String,
        rows: RecordBatch,
    ) -> BoxFuture<'static, fleetlake_sql::Result<TableInfo>> {
        let lake = self.lake().clone();
        Box::pin(async move {
            let id = TableId::parse(&format!("reference.{name}"))?;
            Ok(lake.replace(&id, rows).await?)
        })
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub lake: Arc<dyn Lakehouse>,
    pub metrics: Arc<Metrics>,
    /// False for a process that only serves queries (no ingest): health ignores the source.
    pub ingesting: bool,
    /// The declared pipelines: name, source subject, tables and expectations.
    pub pipelines: Arc<Vec<serde_json::Value>>,
    /// The rules, changeable at runtime (`None` when this process does not ingest).
    pub rules: Option<Arc<crate::api::rules::Rules>>,
    /// The reference tables the pipelines declare: uploads are held to their types.
    pub references: Arc<Vec<fleetlake_sql::pipeline::ReferenceDef>>,
    /// What the fleet endpoints read when a request does not say.
    pub fleet: Arc<crate::config::FleetDefaults>,
    /// The latest state of every device (`None` when this process does not ingest).
    pub devices: Option<fleetlake_sql::device_state::SharedDeviceState>,
    /// Tokens, route requirements and per-token query admission.
    pub auth: Arc<Auth>,
    /// `final.audit`.
    pub audit: Arc<crate::api::audit::Audit>,
    /// The runtime queries run on, apart from ingest's (see [`query_runtime`]).
    pub queries: tokio::runtime::Handle,
    /// The largest `POST /v1/query` body, in bytes.
    pub max_query_body: usize,
}

/// Starts the runtime queries run on: `threads` worker threads of their own, so that a heavy
/// query competes with ingest for the CPU as one more thread, never by occupying the
/// ingest runtime's workers. The runtime lives on a thread of its own and ends when the
/// returned guard is dropped.
pub fn query_runtime(threads: usize) -> (tokio::runtime::Handle, QueryRuntime) {
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("fleetlake-queries".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .thread_name("fleetlake-query")
                // DataFusion plans recursively: as much stack as the main runtime's threads.
                .thread_stack_size(16 * 1024 * 1024)
                .enable_all()
                .build()
                .expect("starting the query runtime");
            let _ = handle_tx.send(runtime.handle().clone());
            runtime.block_on(async {
                let _ = stopped.await;
            });
            runtime.shutdown_background();
        })
        .expect("starting the query runtime's thread");
    let handle = handle_rx.recv().expect("the query runtime starts");
    (handle, QueryRuntime { _stop: stop })
}

/// Keeps the query runtime alive; dropping it stops the runtime (queries still running are
/// abandoned).
pub struct QueryRuntime {
    _stop: tokio::sync::oneshot::Sender<()>,
}
