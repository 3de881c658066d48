//! The HTTP API (axum): SQL over the zones, fleet analytics, table listing, reference uploads,
//! rules, health and metrics.
//!
//! The handlers depend on the [`Lakehouse`] trait, not on the engine, so they can be served over
//! any implementation; the binary wires in [`fleetlake_sql::QueryEngine`]. Beside the routes:
//! [`format`] (answers as JSON, CSV, NDJSON or Arrow), [`fleet`] (the fleet endpoints' parameters
//! and answers), [`reference`] (parsing uploads and holding
//! them to declared types) and [`rules`] (changing rules at runtime; the change itself reaches
//! ingest as an [`crate::ingest::derived::RuleChange`]).
//!
//! May call: [`crate::metrics`], [`crate::config`] (the fleet endpoints' defaults),
//! [`crate::ingest::derived`] (the rule-change message),
//! `fleetlake_sql`, `fleetlake_zones`. Nothing in ingest calls into it.

pub mod devices;
pub mod fleet;
pub mod format;
pub mod reference;
pub mod rules;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::array::RecordBatch;
use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use crate::api::rules::{Refused, Rules};
use fleetlake_sql::{ErrorKind, QueryEngine, QueryResult};
use fleetlake_zones::{TableId, TableInfo};
use futures::future::BoxFuture;
use serde_json::json;

use crate::api::format::Format;
use crate::metrics::Metrics;

/// What the HTTP layer needs from the lake.
pub trait Lakehouse: Send + Sync + 'static {
    fn query(&self, sql: String) -> BoxFuture<'static, fleetlake_sql::Result<QueryResult>>;
    fn tables(&self) -> BoxFuture<'static, fleetlake_sql::Result<Vec<TableInfo>>>;
    /// Replaces `reference.<name>` with `rows`.
    fn replace_reference(
        &self,
        name: String,
        rows: RecordBatch,
    ) -> BoxFuture<'static, fleetlake_sql::Result<TableInfo>>;
}

impl Lakehouse for QueryEngine {
    fn query(&self, sql: String) -> BoxFuture<'static, fleetlake_sql::Result<QueryResult>> {
        let engine = self.clone();
        Box::pin(async move { QueryEngine::query(&engine, &sql).await })
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
    pub fleet: Arc<crate::api::fleet::FleetDefaults>,
    /// The latest state of every device (`None` when this process does not ingest).
    pub devices: Option<fleetlake_sql::device_state::SharedDeviceState>,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/query", post(query))
        .route("/v1/tables", get(tables))
        .route("/v1/pipelines", get(pipelines))
        .route(
            "/v1/reference/{table}",
            put(put_reference).layer(axum::extract::DefaultBodyLimit::max(
                crate::api::reference::MAX_BODY_BYTES,
            )),
        )
        .route("/v1/rules", get(list_rules))
        .route(
            "/v1/rules/{name}",
            get(get_rule).put(put_rule).delete(delete_rule).layer(
                axum::extract::DefaultBodyLimit::max(crate::api::rules::MAX_RULE_BYTES),
            ),
        )
        .route("/v1/devices", get(crate::api::devices::devices))
        .route("/v1/devices/{id}", get(crate::api::devices::device))
        .route("/v1/fleet/outliers", get(crate::api::fleet::outliers))
        .route("/v1/fleet/root-cause", get(crate::api::fleet::root_cause))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Any other path: a 404 in the API's error shape, naming the path.
async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!(
            "no route {}; the routes are listed in the README's \"HTTP API\" section",
            uri.path()
        ),
    )
}

/// `{"error":{"code":…,"message":…}}` with a status.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": {"code": code, "message": message}}).to_string(),
    )
        .into_response()
}

pub(crate) fn sql_error(e: &fleetlake_sql::Error) -> Response {
    let status = match e.kind() {
        ErrorKind::User => StatusCode::BAD_REQUEST,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, e.code(), &e.to_string())
}

async fn query(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Request {
        sql: String,
    }
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("expected a JSON body {{\"sql\": \"SELECT …\"}}: {e}"),
            );
        }
    };
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    match state.lake.query(request.sql).await {
        Ok(result) => match format.encode(&result) {
            Ok(body) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, format.content_type())],
                body,
            )
                .into_response(),
            Err(e) => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding",
                &e.to_string(),
            ),
        },
        Err(e) => sql_error(&e),
    }
}

fn table_json(t: &TableInfo) -> serde_json::Value {
    json!({
        "table": t.table.to_string(),
        "zone": t.table.zone.as_str(),
        "version": t.version,
        "rows": t.rows,
        "files": t.files,
        "size_bytes": t.size_bytes,
        "last_checkpoint": t.last_checkpoint,
        "maintained_at": t.maintained_at,
    })
}

async fn put_reference(
    State(state): State<AppState>,
    Path(table): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let rows = match crate::api::reference::parse_rows(content_type, &body) {
        Ok(rows) => rows,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, "bad_rows", &message),
    };
    let id = format!("reference.{table}");
    if let Some(def) = state.references.iter().find(|d| d.table.to_string() == id)
        && let Err(message) = crate::api::reference::check_declared(&rows, &def.schema())
    {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_rows",
            &format!("{id} is declared in the pipelines: {message}"),
        );
    }
    match state.lake.replace_reference(table, rows).await {
        Ok(info) => axum::Json(table_json(&info)).into_response(),
        Err(e) => sql_error(&e),
    }
}

async fn tables(State(state): State<AppState>) -> Response {
    match state.lake.tables().await {
        Ok(tables) => {
            let tables: Vec<_> = tables.iter().map(table_json).collect();
            axum::Json(json!({ "tables": tables })).into_response()
        }
        Err(e) => sql_error(&e),
    }
}

async fn pipelines(State(state): State<AppState>) -> Response {
    let counters = state.metrics.pipelines();
    let list: Vec<serde_json::Value> = state
        .pipelines
        .iter()
        .map(|p| {
            let mut p = p.clone();
            let name = p["name"].as_str().unwrap_or_default().to_string();
            let c = counters.get(&name).cloned().unwrap_or_default();
            p["rows"] = json!({
                "in": c.rows_in, "deduplicated": c.deduplicated, "out": c.rows_out, "quarantined": c.quarantined,
                "dropped": c.dropped, "warned": c.warned,
            });
            p["expectations"] = json!(c.expectations.values().collect::<Vec<_>>());
            p
        })
        .collect();
    axum::Json(json!({ "pipelines": list })).into_response()
}

fn refused(r: Refused) -> Response {
    error_response(r.status, r.code, &r.message)
}

fn rules_of(state: &AppState) -> Result<&Rules, Refused> {
    state.rules.as_deref().ok_or_else(|| Refused {
        status: StatusCode::NOT_FOUND,
        code: "rules_disabled",
        message:
            "rules are managed by a process that ingests (fleetlake serve) with a pipelines.dir"
                .into(),
    })
}

/// Who makes a change, for final.rule_audit.
const AUTHOR_HEADER: &str = "x-fleetlake-author";

fn author(headers: &HeaderMap) -> Result<String, Refused> {
    let author = headers
        .get(AUTHOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if author.is_empty() || author.len() > 200 {
        return Err(Refused {
            status: StatusCode::BAD_REQUEST,
            code: "missing_author",
            message: "expected an X-Fleetlake-Author header (1 to 200 characters) saying who makes the change: it is recorded in final.rule_audit".into(),
        });
    }
    Ok(author.to_string())
}

async fn list_rules(State(state): State<AppState>) -> Response {
    let rules = match rules_of(&state) {
        Ok(rules) => rules,
        Err(r) => return refused(r),
    };
    let mut list = rules.list().await;
    let counters = state.metrics.rules();
    for rule in list["rules"].as_array_mut().into_iter().flatten() {
        with_counters(&counters, rule);
    }
    axum::Json(list).into_response()
}

/// Adds what the rule did since the start (`/metrics`' per-rule counters) to its description.
fn with_counters(
    counters: &std::collections::BTreeMap<String, crate::metrics::RuleCounters>,
    rule: &mut serde_json::Value,
) {
    let name = rule["name"].as_str().unwrap_or_default();
    let c = counters.get(name).cloned().unwrap_or_default();
    rule["firing_keys"] = json!(c.firing_keys);
    rule["alerts_since_start"] = json!({"firing": c.fired, "resolved": c.resolved});
}

async fn get_rule(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let rules = match rules_of(&state) {
        Ok(r) => r,
        Err(r) => return refused(r),
    };
    match rules.get(&name).await {
        Ok(mut body) => {
            with_counters(&state.metrics.rules(), &mut body);
            axum::Json(body).into_response()
        }
        Err(r) => refused(r),
    }
}

async fn put_rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (rules, author) = match (rules_of(&state), author(&headers)) {
        (Ok(r), Ok(a)) => (r, a),
        (Err(r), _) | (_, Err(r)) => return refused(r),
    };
    let Ok(sql) = std::str::from_utf8(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected the rule as UTF-8 text: CREATE RULE name WITH (…) AS SELECT …",
        );
    };
    match rules.put(&name, sql, &author).await {
        Ok((status, body)) => (status, axum::Json(body)).into_response(),
        Err(r) => refused(r),
    }
}

async fn delete_rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (rules, author) = match (rules_of(&state), author(&headers)) {
        (Ok(r), Ok(a)) => (r, a),
        (Err(r), _) | (_, Err(r)) => return refused(r),
    };
    match rules.delete(&name, &author).await {
        Ok(body) => axum::Json(body).into_response(),
        Err(r) => refused(r),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    let storage_up = m.storage_up.load(Ordering::Relaxed) == 1;
    let source_up = !state.ingesting || m.source_up.load(Ordering::Relaxed) == 1;
    let component = |up: bool, name: &str| {
        let last = m
            .last_error(name)
            .map(|(reason, at)| json!({"message": reason, "at": at.to_rfc3339()}));
        json!({"up": up, "last_error": last})
    };
    let pipelines_up = m.pipeline_failed.load(Ordering::Relaxed) == 0;
    let ingest_up = m.ingest_stopped.load(Ordering::Relaxed) == 0;
    let healthy = storage_up && source_up && pipelines_up && ingest_up;
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "storage": component(storage_up, "storage"),
        "nats": component(source_up, "source"),
        "pipelines": component(pipelines_up, "pipeline"),
        "ingest": component(ingest_up, "ingest"),
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
