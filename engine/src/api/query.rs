//! `POST /v1/query` and the admission and execution every SQL-reading route shares: a token's
//! place among its concurrent queries, the raw-read audit, the query runtime and the time limit.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetlake_sql::QueryResult;

use crate::api::auth::Caller;
use crate::api::format::Format;
use crate::api::respond::*;
use crate::api::state::AppState;

/// Admits one query of `caller` (rate and concurrency limits); the permit is held until it
/// is answered.
pub(crate) fn admit(state: &AppState, caller: &Caller) -> Result<Admission, Box<Response>> {
    state
        .auth
        .admit(&caller.principal)
        .map(Arc::new)
        .map_err(|d| Box::new(denied(d)))
}

/// An admitted query's place among its token's concurrent queries: released when the request
/// has been answered and every query it started has really ended (a cancelled one included).
pub(crate) type Admission = Arc<tokio::sync::OwnedSemaphorePermit>;

/// Runs `sql` for an admitted `caller`: a statement naming a raw-zone table is recorded in
/// `final.audit` first; the query runs on the query runtime with the caller's access and is
/// cancelled after its timeout (408 `query_timeout`).
pub(crate) async fn execute(
    state: &AppState,
    caller: &Caller,
    admission: &Admission,
    sql: String,
) -> Result<QueryResult, Response> {
    let access = state.auth.access(&caller.principal);
    // Only a caller who may read raw can read it: nobody else's statements are parsed here.
    let raw: Vec<String> = if access.zones.contains(&fleetlake_zones::Zone::Raw) {
        fleetlake_sql::query::tables_named(&sql)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.zone == fleetlake_zones::Zone::Raw && access.check_table(t).is_ok())
            .map(|t| t.to_string())
            .collect()
    } else {
        Vec::new()
    };
    if !raw.is_empty() {
        let event = crate::api::audit::Event {
            principal: &caller.principal,
            address: caller.address,
            action: "raw.read",
            target: &raw.join(","),
            detail: &sql,
        };
        if let Err(e) = state.audit.record(event).await {
            return Err(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                &format!(
                    "a raw-zone read is recorded before it is answered, and recording failed: {e}"
                ),
            ));
        }
    }
    let timeout = caller.principal.limits.timeout;
    let held = Arc::clone(admission);
    let query = state.lake.query(sql, access);
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut running = state.queries.spawn({
        let started = Arc::clone(&started);
        async move {
            started.store(true, Ordering::Relaxed);
            let answer = query.await;
            drop(held);
            answer
        }
    });
    match tokio::time::timeout(timeout, &mut running).await {
        Ok(Ok(Ok(result))) => Ok(result),
        Ok(Ok(Err(e))) => Err(sql_error(&e)),
        Ok(Err(e)) => Err(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("the query's task failed: {e}"),
        )),
        Err(_) if !started.load(Ordering::Relaxed) => {
            running.abort();
            Err(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "queries_busy",
                &format!(
                    "the query did not start within {} s: every query thread (query.threads) was busy with other queries; retry later",
                    timeout.as_secs_f64()
                ),
            ))
        }
        Err(_) => {
            running.abort();
            Err(error_response(
                StatusCode::REQUEST_TIMEOUT,
                "query_timeout",
                &format!(
                    "the query ran longer than {} s, the most {} may use (query.timeout_s), and was cancelled",
                    timeout.as_secs_f64(),
                    caller.principal.describe()
                ),
            ))
        }
    }
}

pub(crate) async fn query(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!(
                    "the request body is larger than {} KiB (query.max_body_kb)",
                    state.max_query_body / 1024
                ),
            );
        }
        Err(e) => return error_response(e.status(), "bad_request", &e.body_text()),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Request {
        sql: String,
    }
    let request: Request = match json_body(&body, "{\"sql\": \"SELECT …\"}") {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let admission = match admit(&state, &caller) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match execute(&state, &caller, &admission, request.sql).await {
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
        Err(response) => response,
    }
}
