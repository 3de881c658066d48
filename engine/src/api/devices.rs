//! `GET /v1/devices/{id}` and `GET /v1/devices`: the latest state of devices, answered from
//! memory (`fleetlake_sql::device_state`), never from a lake scan.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleetlake_sql::device_state::{COHORT, DeviceFilter, DeviceView};
use fleetlake_zones::TableId;
use serde_json::{Value, json};

use crate::api::query::admit;
use crate::api::respond::error_response;
use crate::api::state::AppState;

/// Devices per page when the request gives no `limit`, and the most it may ask for.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

fn bad(message: impl AsRef<str>) -> Response {
    error_response(StatusCode::BAD_REQUEST, "bad_request", message.as_ref())
}

fn not_ingesting() -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_device_state",
        "this process does not ingest, or it is one instance of a cluster (cluster.partitions > 0), whose device state is kept per partition: ask a fleetlake that runs ingest alone, or query the usable tables",
    )
}

fn not_ready() -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        &fleetlake_sql::device_state::DeviceState::not_ready().to_string(),
    )
}

fn time(us: i64) -> Value {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
        .unwrap_or(Value::Null)
}

fn view_json(v: &DeviceView) -> Value {
    let mut cohort = serde_json::Map::new();
    for c in COHORT {
        let value = v
            .reading
            .get(c)
            .or_else(|| (c == "hw_rev").then(|| v.reading.get("hw")).flatten())
            .cloned()
            .unwrap_or(Value::Null);
        cohort.insert(c.to_string(), value);
    }
    json!({
        "table": v.table.to_string(),
        "device_id": v.device_id,
        "cohort": cohort,
        "event_time": v.event_time.map(time),
        "stream_seq": v.stream_seq,
        "last_seen": time(v.last_seen),
        "last_seen_seq": v.last_seen_seq,
        "silent_for_s": v.silent_for_s,
        "reading": v.reading,
    })
}

/// `GET /v1/devices/{id}`: the device in every usable table that has it; 404 if none.
pub async fn device(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<crate::api::auth::Caller>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => return bad(format!("the device id in the path: {e}")),
    };
    let _admission = match admit(&state, &caller) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let Some(devices) = &state.devices else {
        return not_ingesting();
    };
    let views = {
        let state = devices.read().expect("device state lock");
        if !state.is_ready() {
            return not_ready();
        }
        state.lookup_for(&id, caller.principal.tenants.as_deref())
    };
    if views.is_empty() {
        return error_response(
            StatusCode::NOT_FOUND,
            "unknown_device",
            &format!("no usable table has a reading of device {id:?}"),
        );
    }
    Json(json!({
        "device_id": id,
        "tables": views.iter().map(view_json).collect::<Vec<_>>(),
    }))
    .into_response()
}

use axum::Json;

/// `GET /v1/devices?site=…&silent_for=5m&table=…&limit=…&offset=…`: devices matching every
/// filter given, by table and device id.
pub async fn devices(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<crate::api::auth::Caller>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let _admission = match admit(&state, &caller) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let Some(devices) = &state.devices else {
        return not_ingesting();
    };
    let accepted = || {
        let mut a = vec!["table", "silent_for", "limit", "offset"];
        a.extend(COHORT);
        a.join(", ")
    };
    let mut filter = DeviceFilter {
        tenants: caller.principal.tenants.clone(),
        ..Default::default()
    };
    let (mut limit, mut offset) = (DEFAULT_LIMIT, 0usize);
    let mut seen = std::collections::BTreeSet::new();
    for (k, v) in &params {
        if !seen.insert(k.as_str()) {
            return bad(format!("parameter {k:?} given twice"));
        }
        match k.as_str() {
            "table" => match TableId::parse(v) {
                Ok(t) => filter.table = Some(t),
                Err(_) => {
                    return bad(format!(
                        "table {v:?}: expected a table such as usable.cold_chain"
                    ));
                }
            },
            "silent_for" => match fleetlake_sql::pipeline::parse::parse_duration(v) {
                Some(d) => filter.silent_for_us = Some(d),
                None => {
                    return bad(format!(
                        "silent_for {v:?}: expected a duration such as 90s, 5m or 2h"
                    ));
                }
            },
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => limit = n,
                _ => {
                    return bad(format!(
                        "limit {v:?}: expected a whole number from 1 to {MAX_LIMIT}"
                    ));
                }
            },
            "offset" => match v.parse::<usize>() {
                Ok(n) => offset = n,
                Err(_) => return bad(format!("offset {v:?}: expected a whole number, 0 or more")),
            },
            c if COHORT.contains(&c) => filter.cohort.push((c.to_string(), v.clone())),
            other => {
                return bad(format!(
                    "unknown parameter {other:?}; this endpoint accepts {}",
                    accepted()
                ));
            }
        }
    }
    let (page, matched) = {
        let state = devices.read().expect("device state lock");
        if !state.is_ready() {
            return not_ready();
        }
        if let Some(t) = &filter.table {
            let tables = state.tables();
            if !tables.contains(t) {
                let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
                return bad(format!(
                    "table {t} has no device state (it is kept for usable tables with a device_id column that have rows); tables with device state: {}",
                    if names.is_empty() {
                        "none yet".to_string()
                    } else {
                        names.join(", ")
                    }
                ));
            }
        }
        state.list(&filter, offset, limit)
    };
    let next = (offset + page.len() < matched).then_some(offset + page.len());
    Json(json!({
        "devices": page.iter().map(view_json).collect::<Vec<_>>(),
        "matched": matched,
        "limit": limit,
        "offset": offset,
        "next_offset": next,
    }))
    .into_response()
}
