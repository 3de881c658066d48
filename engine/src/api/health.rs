//! Operating the engine: `/healthz`, `/metrics`, `GET /v1/cluster` and `GET /v1/pipelines`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::api::respond::error_response;
use crate::api::state::AppState;

/// `GET /v1/cluster`: this instance's view of its cluster (`cluster.partitions` > 0): its id,
/// the partitions it consumes with their lag, every partition's holder, the members, what is
/// not computed in a cluster, and takeovers. 404 for an instance that is not in a cluster.
pub(crate) async fn cluster(State(state): State<AppState>) -> Response {
    match cluster_view(&state.metrics) {
        Some(view) => axum::Json(view).into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            "not_a_cluster",
            "this instance is not in a cluster (cluster.partitions = 0, or it does not ingest): there is no cluster to show",
        ),
    }
}

/// The cluster as `/v1/cluster` and `/healthz` show it; `None` without partitions.
fn cluster_view(m: &crate::metrics::Metrics) -> Option<serde_json::Value> {
    let c = m.cluster()?;
    let lags = m.partition_lags();
    let mut view = json!(c);
    view["owned"] = json!(
        c.owned
            .iter()
            .map(|o| json!({
                "partition": o.partition,
                "since": o.since,
                "lag": lags.get(&o.partition).copied().unwrap_or(0),
                "consuming": m.is_partition_consuming(o.partition),
            }))
            .collect::<Vec<_>>()
    );
    view["fleet_wide_position"] = json!(m.fleet_wide_position.load(Ordering::Relaxed));
    Some(view)
}

pub(crate) async fn pipelines(State(state): State<AppState>) -> Response {
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
            p["sequence_restarts"] = json!(c.restarts);
            p["expectations"] = json!(c.expectations.values().collect::<Vec<_>>());
            p
        })
        .collect();
    axum::Json(json!({ "pipelines": list })).into_response()
}

pub(crate) async fn healthz(State(state): State<AppState>) -> Response {
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
    // Alerts that cannot reach Alertmanager are a publish that does not succeed (DESIGN:
    // "Health tells the truth"); ingest goes on meanwhile.
    let alertmanager = m.alertmanager_up.load(Ordering::Relaxed);
    let healthy = storage_up && source_up && pipelines_up && ingest_up && alertmanager != 0;
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "storage": component(storage_up, "storage"),
        "nats": component(source_up, "source"),
        "pipelines": component(pipelines_up, "pipeline"),
        "ingest": component(ingest_up, "ingest"),
    });
    let mut body = body;
    if alertmanager >= 0 {
        body["alertmanager"] = component(alertmanager == 1, "alertmanager");
    }
    // Public: only which partitions this instance consumes (GET /v1/cluster has the rest).
    if let Some(c) = m.cluster() {
        body["cluster"] = json!({
            "partitions": c.partitions,
            "owned": c.owned.iter().map(|o| o.partition).collect::<Vec<_>>(),
            "members": c.members.len(),
        });
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
