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

pub mod audit;
pub mod auth;
pub mod devices;
pub mod fleet;
pub mod format;
pub mod health;
pub mod query;
pub mod reference;
pub mod respond;
pub mod rules;
pub mod state;
pub mod tls;
pub mod tokens;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use crate::api::rules::{Refused, Rules};
use fleetlake_zones::TableInfo;
use serde_json::json;

use crate::api::auth::{Auth, Caller, Requirement};
use crate::api::health::{cluster, healthz, metrics, pipelines};
use crate::api::query::admit;
pub use crate::api::respond::error_response;
use crate::api::respond::json_body;
pub(crate) use crate::api::respond::{denied, sql_error};
pub use crate::api::state::{AppState, Lakehouse, QueryRuntime, query_runtime};

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/query",
            post(query::query).layer(axum::extract::DefaultBodyLimit::max(state.max_query_body)),
        )
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/tables", get(tables))
        .route("/v1/pipelines", get(pipelines))
        .route("/v1/cluster", get(cluster))
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::middleware::from_fn(explain_method_not_allowed))
        .with_state(state)
}

/// A route asked with a method it does not take answers 405 in the API's error shape, naming the
/// methods it takes (also in `Allow`), instead of an empty body.
async fn explain_method_not_allowed(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let allowed = allow
        .as_ref()
        .and_then(|a| a.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let hint = if path == "/v1/query" {
        r#": send the SQL as POST /v1/query with the body {"sql": "SELECT …"}"#
    } else {
        ""
    };
    let mut answer = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("{path} does not take {method}; it takes {allowed}{hint}"),
    );
    if let Some(allow) = allow {
        answer.headers_mut().insert(header::ALLOW, allow);
    }
    answer
}

/// Every request: the route's requirement ([`auth::requirement`]) is met or the request is
/// answered 401/403 here; handlers find the [`Caller`] in the request's extensions.
async fn authenticate(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let requirement = auth::requirement(
        request.method(),
        request.uri().path(),
        state.auth.public_metrics,
    );
    if requirement == Requirement::Public {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let principal = match state.auth.authenticate(presented) {
        Ok(p) => p,
        Err(d) => return denied(d),
    };
    if let Err(d) = Auth::authorize(&principal, requirement) {
        return denied(d);
    }
    let address = request
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::api::tls::Peer>>()
        .map(|c| c.0.0);
    request
        .extensions_mut()
        .insert(Caller { principal, address });
    next.run(request).await
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
    axum::Extension(caller): axum::Extension<Caller>,
    Path(table): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let id = format!("reference.{table}");
    let declared = state
        .references
        .iter()
        .find(|d| d.table.to_string() == id)
        .map(|d| d.schema());
    // Where the pipelines declare reference tables, an upload to another name is a typo far
    // more often than a new table: it would create a table nothing reads.
    if declared.is_none() && !state.references.is_empty() {
        let names: Vec<String> = state
            .references
            .iter()
            .map(|d| d.table.to_string())
            .collect();
        let closest = names
            .iter()
            .map(|n| (strsim::jaro_winkler(&id, n), n))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .filter(|(score, _)| *score >= 0.85)
            .map(|(_, n)| format!("did you mean {n}? "))
            .unwrap_or_default();
        return error_response(
            StatusCode::NOT_FOUND,
            "unknown_reference_table",
            &format!(
                "{id} is not declared in the pipelines: {closest}the declared reference tables are {} (declare a new one with CREATE REFERENCE TABLE in a pipeline file)",
                names.join(", ")
            ),
        );
    }
    let rows = match crate::api::reference::parse_rows(content_type, &body, declared.as_ref()) {
        Ok(rows) => rows,
        Err(message) if declared.is_some() => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_rows",
                &format!("{id} is declared in the pipelines: {message}"),
            );
        }
        Err(message) => {
            return error_response(StatusCode::BAD_REQUEST, "bad_rows", &message.to_string());
        }
    };
    if let Err(r) = record(
        &state,
        &caller,
        "reference.replace",
        &id,
        &format!("{} rows", rows.num_rows()),
    )
    .await
    {
        return r;
    }
    match state.lake.replace_reference(table, rows).await {
        Ok(info) => axum::Json(table_json(&info)).into_response(),
        Err(e) => sql_error(&e),
    }
}

/// Records a change in `final.audit` before it is made; a 503 if it cannot be recorded.
pub(crate) async fn record(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), Response> {
    let event = crate::api::audit::Event {
        principal: &caller.principal,
        address: caller.address,
        action,
        target,
        detail,
    };
    state.audit.record(event).await.map_err(|e| {
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            &format!("a change is recorded in final.audit before it is made, and recording failed: {e}; nothing was changed"),
        )
    })
}

/// The tables the caller may read; to a caller bound to tenants without the counts (rows,
/// files, bytes), which would tell of other tenants' rows.
async fn tables(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    // Reading every table's log is work: it counts as a query.
    let _admission = match admit(&state, &caller) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let access = state.auth.access(&caller.principal);
    match state.lake.tables().await {
        Ok(tables) => {
            let tables: Vec<_> = tables
                .iter()
                .filter(|t| access.check_table(&t.table).is_ok())
                .map(|t| {
                    let mut j = table_json(t);
                    if access.is_tenant_bound() {
                        for k in ["rows", "files", "size_bytes", "version"] {
                            j[k] = serde_json::Value::Null;
                        }
                    }
                    j
                })
                .collect();
            axum::Json(json!({ "tables": tables })).into_response()
        }
        Err(e) => sql_error(&e),
    }
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

/// Who makes a change, for final.rule_audit: the token's name (with authentication off, an
/// `X-Fleetlake-Author` header if given, else `anonymous`).
const AUTHOR_HEADER: &str = "x-fleetlake-author";

fn author(state: &AppState, caller: &Caller, headers: &HeaderMap) -> Result<String, Refused> {
    if state.auth.tokens.is_some() {
        return Ok(caller.principal.name.clone());
    }
    let author = headers
        .get(AUTHOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if author.len() > 200 {
        return Err(Refused {
            status: StatusCode::BAD_REQUEST,
            code: "bad_author",
            message: "X-Fleetlake-Author is at most 200 characters".into(),
        });
    }
    Ok(if author.is_empty() {
        caller.principal.name.clone()
    } else {
        author.to_string()
    })
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
    axum::Extension(caller): axum::Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (rules, author) = match (rules_of(&state), author(&state, &caller, &headers)) {
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
    if let Err(r) = record(&state, &caller, "rule.put", &name, sql).await {
        return r;
    }
    match rules.put(&name, sql, &author).await {
        Ok((status, body)) => (status, axum::Json(body)).into_response(),
        Err(r) => refused(r),
    }
}

async fn delete_rule(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (rules, author) = match (rules_of(&state), author(&state, &caller, &headers)) {
        (Ok(r), Ok(a)) => (r, a),
        (Err(r), _) | (_, Err(r)) => return refused(r),
    };
    if let Err(r) = record(&state, &caller, "rule.delete", &name, "").await {
        return r;
    }
    match rules.delete(&name, &author).await {
        Ok(body) => axum::Json(body).into_response(),
        Err(r) => refused(r),
    }
}

fn tokens_of(state: &AppState) -> Result<&auth::Tokens, Box<Response>> {
    state.auth.tokens.as_ref().ok_or_else(|| {
        Box::new(error_response(
            StatusCode::NOT_FOUND,
            "auth_disabled",
            "authentication is off (auth.enabled = false): there are no tokens to manage",
        ))
    })
}

/// `GET /v1/tokens`: every token, without its hash.
async fn list_tokens(State(state): State<AppState>) -> Response {
    match tokens_of(&state) {
        Ok(tokens) => axum::Json(json!({
            "tokens": tokens.list().iter().map(auth::TokenRecord::public_json).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(r) => *r,
    }
}

/// `POST /v1/tokens` `{"name": …, "role": …, "tenants": […], "limits": {…}}`: creates a token;
/// the answer holds it, once (201).
async fn create_token(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Request {
        name: String,
        role: String,
        #[serde(default)]
        tenants: Vec<String>,
        #[serde(default)]
        limits: auth::TokenLimits,
    }
    let tokens = match tokens_of(&state) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let request: Request = match json_body(
        &body,
        "{\"name\": \"grafana\", \"role\": \"analyst\", \"tenants\": [\"acme\"]} (limits optional: timeout_s, memory_mb, max_rows, max_concurrent, rate_per_minute)",
    ) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let role = match auth::Role::parse(&request.role) {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    let (created, secret) = match tokens.create(
        &request.name,
        role,
        request.tenants,
        &caller.principal.name,
        request.limits,
    ) {
        Ok(created) => created,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    let detail = format!("role {} tenants {:?}", role.as_str(), created.tenants);
    if let Err(r) = record(&state, &caller, "token.create", &created.id, &detail).await {
        // Not recorded: not created.
        let _ = tokens.revoke(&created.id);
        return r;
    }
    let mut body = created.public_json();
    body["token"] = json!(secret);
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

/// `DELETE /v1/tokens/{id}` (or its name): revokes it at once.
async fn revoke_token(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let tokens = match tokens_of(&state) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let list = tokens.list();
    let Some(found) = list
        .iter()
        .find(|r| r.id == id)
        .or_else(|| list.iter().find(|r| r.name == id))
    else {
        return error_response(
            StatusCode::NOT_FOUND,
            "unknown_token",
            &format!("no token has the id or name {id:?}"),
        );
    };
    if let Err(r) = record(&state, &caller, "token.revoke", &found.id, &found.name).await {
        return r;
    }
    match tokens.revoke(&found.id) {
        Ok(Some(r)) => axum::Json(json!({"revoked": r.public_json()})).into_response(),
        Ok(None) => error_response(
            StatusCode::NOT_FOUND,
            "unknown_token",
            &format!("no token has the id or name {id:?}"),
        ),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "tokens_file",
            &e.to_string(),
        ),
    }
}
