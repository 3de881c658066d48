//! `GET /v1/fleet/outliers` and `GET /v1/fleet/root-cause`: fleet questions asked over HTTP.
//! Parameters are checked here (names against the table's columns, numbers against their
//! ranges, each error naming what was wrong and what was expected); the statement is
//! `fleetlake_sql::fleet`'s, run like any `/v1/query`, and returned beside the answer.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetlake_sql::QueryResult;
use fleetlake_sql::fleet::{Event, Outliers, RootCause, Scope, Stat, TimeRange};
use fleetlake_zones::TableId;
use serde_json::json;

use crate::api::auth::Caller;
use crate::api::format::{Format, to_json};
use crate::api::query::{Admission, admit, execute};
use crate::api::respond::error_response;
use crate::api::state::AppState;

/// Rows per page when the request gives no `limit`.
pub const DEFAULT_LIMIT: u64 = 100;
/// The largest `limit`.
pub const MAX_LIMIT: u64 = 10_000;
/// The largest `offset`.
pub const MAX_OFFSET: u64 = 1_000_000_000_000;
/// The longest `window`: 100 years, in microseconds.
const MAX_WINDOW_US: i64 = 100 * 365 * 86_400 * 1_000_000;
/// The longest statement sent in the `Fleetlake-Sql` header (proxies refuse long headers).
const MAX_SQL_HEADER: usize = 8 * 1024;

pub use crate::config::FleetDefaults;

type Params = Vec<(String, String)>;

fn bad(message: impl AsRef<str>) -> Response {
    error_response(StatusCode::BAD_REQUEST, "bad_request", message.as_ref())
}

/// What was wrong with a parameter and what was expected: a 400.
type Refusal = String;

fn refuse(message: impl Into<String>) -> Refusal {
    message.into()
}

/// The request's parameters, each at most once, none unknown.
struct Request<'a> {
    params: std::collections::HashMap<&'a str, &'a str>,
}

impl<'a> Request<'a> {
    fn new(params: &'a Params, own: &[&str], filters: &[String]) -> Result<Self, Refusal> {
        let common = ["table", "window", "from", "to", "limit", "offset"];
        let mut map = std::collections::HashMap::new();
        for (k, v) in params {
            let known = common.contains(&k.as_str())
                || own.contains(&k.as_str())
                || filters.iter().any(|f| f == k);
            if !known {
                let mut accepted: Vec<&str> = common.iter().chain(own).copied().collect();
                accepted.extend(filters.iter().map(String::as_str));
                return Err(refuse(format!(
                    "unknown parameter {k:?}; this endpoint accepts {}",
                    accepted.join(", ")
                )));
            }
            if map.insert(k.as_str(), v.as_str()).is_some() {
                return Err(refuse(format!(
                    "parameter {k:?} given twice; give several values as one comma-separated list"
                )));
            }
        }
        Ok(Self { params: map })
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.params
            .get(key)
            .copied()
            .filter(|v| !v.trim().is_empty())
    }

    fn number<T: std::str::FromStr>(
        &self,
        key: &str,
        default: T,
        expected: &str,
    ) -> Result<T, Refusal> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| refuse(format!("{key}={v}: expected {expected}"))),
        }
    }

    fn list(&self, key: &str, default: &[String]) -> Vec<String> {
        match self.params.get(key) {
            None => default.to_vec(),
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }

    fn instant(&self, key: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, Refusal> {
        self.get(key)
            .map(|v| {
                chrono::DateTime::parse_from_rfc3339(v.trim())
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .map_err(|e| {
                        refuse(format!(
                            "{key}={v}: expected an RFC 3339 time such as 2026-11-30T08:00:00Z ({e})"
                        ))
                    })
            })
            .transpose()
    }

    /// The table, filters, time range and page of the request.
    fn scope(
        &self,
        defaults: &FleetDefaults,
        table: &str,
        window: &str,
    ) -> Result<(Scope, u64, u64), Refusal> {
        let table = self.get("table").unwrap_or(table);
        let table = TableId::parse(table).map_err(|_| {
            refuse(format!(
                "table={table}: expected <zone>.<table>, e.g. usable.cold_chain"
            ))
        })?;
        let window = self.get("window").unwrap_or(window);
        let window_us = if window == "all" {
            None
        } else {
            Some(
                fleetlake_sql::pipeline::parse::parse_duration(window)
                    .filter(|us| *us <= MAX_WINDOW_US)
                    .ok_or_else(|| {
                        refuse(format!(
                            "window={window}: expected a duration such as 15m, 1h or 7d (at most 100 years), or all"
                        ))
                    })?,
            )
        };
        let (from, to) = (self.instant("from")?, self.instant("to")?);
        if let (Some(f), Some(t)) = (from, to)
            && f > t
        {
            return Err(refuse(format!("from={f} is after to={t}")));
        }
        let limit = self.number("limit", DEFAULT_LIMIT, "a number of rows")?;
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(refuse(format!("limit={limit}: expected 1 to {MAX_LIMIT}")));
        }
        let offset = self.number("offset", 0u64, "a number of rows to skip")?;
        if offset > MAX_OFFSET {
            return Err(refuse(format!(
                "offset={offset}: expected at most {MAX_OFFSET}"
            )));
        }
        let mut filters = Vec::new();
        for column in &defaults.filters {
            if !self.params.contains_key(column.as_str()) {
                continue;
            }
            let values = self.list(column, &[]);
            if values.is_empty() {
                return Err(refuse(format!(
                    "{column}=: expected one or more comma-separated values"
                )));
            }
            if let Some(v) = values.iter().find(|v| v.chars().any(char::is_control)) {
                return Err(refuse(format!(
                    "{column}={v:?}: control characters are not attribute values"
                )));
            }
            filters.push((column.clone(), values));
        }
        Ok((
            Scope {
                table,
                device_column: defaults.device_column.clone(),
                time_column: defaults.time_column.clone(),
                filters,
                range: TimeRange {
                    window_us,
                    from,
                    to,
                },
            },
            limit,
            offset,
        ))
    }
}

/// Cohort or dimension columns: each once, none named like a column of the answer itself.
fn attribute_columns(
    param: &str,
    columns: Vec<String>,
    reserved: &[&str],
) -> Result<Vec<String>, Refusal> {
    let mut out: Vec<String> = Vec::new();
    for c in columns {
        if reserved.contains(&c.as_str()) {
            return Err(refuse(format!(
                "{param}={c}: the answer has a column of its own named {c}; expected an attribute column such as model or fw"
            )));
        }
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// The answer columns of `/v1/fleet/outliers` (and the statement's own), which a cohort column
/// may not be named.
const OUTLIER_COLUMNS: &[&str] = &[
    "device_id",
    "ts",
    "value",
    "readings",
    "last_seen",
    "score",
    "cohort_size",
    "cohort_median",
    "cohort_spread",
    "outlier",
];

/// The answer columns of `/v1/fleet/root-cause` (and the statement's own).
const ROOT_CAUSE_COLUMNS: &[&str] = &[
    "device_id",
    "ts",
    "hit",
    "devices",
    "affected_devices",
    "events",
    "reports",
    "device_rate",
    "rate",
    "fleet_rate",
    "lift",
    "z",
    "fleet_devices",
    "fleet_affected",
    "__device",
    "__k",
    "__n",
    "__fleet_k",
    "__fleet_n",
];

/// The table's columns, by a query that reads no rows.
async fn columns(
    state: &AppState,
    caller: &Caller,
    admission: &Admission,
    table: &TableId,
) -> Result<Vec<(String, arrow::datatypes::DataType)>, Response> {
    let result = execute(
        state,
        caller,
        admission,
        format!("SELECT * FROM {table} LIMIT 0"),
    )
    .await?;
    Ok(result
        .schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect())
}

/// The first `limit` rows of `result`.
fn first_rows(result: QueryResult, limit: usize) -> QueryResult {
    let mut left = limit;
    let mut batches = Vec::new();
    for batch in &result.batches {
        if left == 0 {
            break;
        }
        let take = batch.num_rows().min(left);
        batches.push(batch.slice(0, take));
        left -= take;
    }
    result.with_batches(batches)
}

/// Runs `sql` and answers in the requested format with the statement: in the JSON body
/// (`sql`, `next_offset`), or as the `Fleetlake-Sql` and `Fleetlake-Next-Offset` headers.
/// Why an answer may be empty: a statement returning one number, and what to say when it is
/// below a bound (`(sql, bound, message)`; the message gets the number appended).
type EmptyNote = Option<(String, u64, String)>;

async fn answer(
    state: &AppState,
    caller: &Caller,
    admission: &Admission,
    headers: &HeaderMap,
    sql: String,
    (limit, offset): (u64, u64),
    empty_note: EmptyNote,
) -> Response {
    let result = match execute(state, caller, admission, sql.clone()).await {
        Ok(r) => r,
        Err(response) => return response,
    };
    // An empty answer says why when it can: e.g. every cohort under min_cohort.
    let mut note = None;
    if result.row_count() == 0
        && let Some((check, bound, message)) = empty_note
        && let Ok(checked) = execute(state, caller, admission, check).await
    {
        let largest = checked
            .batches
            .first()
            .filter(|b| b.num_rows() > 0)
            .and_then(|b| {
                arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64).ok()
            })
            .map(|c| {
                let c = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&c);
                if arrow::array::Array::is_valid(c, 0) {
                    c.value(0)
                } else {
                    0
                }
            })
            .unwrap_or(0);
        if (largest.max(0) as u64) < bound {
            note = Some(format!("{message}{largest}"));
        }
    }
    let more = result.row_count() as u64 > limit;
    let result = first_rows(result, limit as usize);
    let next_offset = more.then_some(offset + limit);
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let encoded = match format {
        Format::Json => to_json(&result).map(|mut body| {
            body["sql"] = json!(sql);
            body["next_offset"] = json!(next_offset);
            if let Some(note) = &note {
                body["note"] = json!(note);
            }
            serde_json::to_vec(&body).expect("JSON values")
        }),
        other => other.encode(&result),
    };
    let body = match encoded {
        Ok(body) => body,
        Err(e) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding",
                &e.to_string(),
            );
        }
    };
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, format.content_type())],
        body,
    )
        .into_response();
    // The statement's line breaks are layout only (values with control characters are
    // refused), so one line is the same statement.
    let one_line = sql.replace('\n', " ");
    if one_line.len() <= MAX_SQL_HEADER
        && let Ok(v) = HeaderValue::from_str(&one_line)
    {
        response.headers_mut().insert("fleetlake-sql", v);
    }
    if let Some(next) = next_offset {
        response
            .headers_mut()
            .insert("fleetlake-next-offset", HeaderValue::from(next));
    }
    response
}

/// `GET /v1/fleet/outliers`: see the README ("Fleet anomaly analytics").
pub async fn outliers(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    // One admission for the request's two statements (its columns, then the answer).
    let admission = match admit(&state, &caller) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let defaults = state.fleet.clone();
    let own = ["metric", "by", "stat", "threshold", "min_cohort", "all"];
    let request = match Request::new(&params, &own, &defaults.filters) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let query = match outliers_query(&request, &defaults) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    let columns = match columns(&state, &caller, &admission, &query.scope.table).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
    let named = query
        .by
        .iter()
        .map(String::as_str)
        .chain([query.metric.as_str()]);
    if let Err(message) = query.scope.check_columns(named, &names) {
        return bad(message);
    }
    if let Some((_, t)) = columns.iter().find(|(n, _)| *n == query.metric)
        && !t.is_numeric()
    {
        return bad(format!(
            "metric={}: a {t} column; expected a numeric one",
            query.metric
        ));
    }
    let every_cohort = Outliers {
        all: true,
        limit: 1_000_000_000,
        offset: 0,
        ..query.clone()
    };
    let note = (
        format!(
            "SELECT max(cohort_size) FROM ({}) cohorts",
            every_cohort.sql()
        ),
        query.min_cohort,
        format!(
            "no outliers: a cohort needs min_cohort = {} devices with readings in the window to have any, and the largest has ",
            query.min_cohort
        ),
    );
    answer(
        &state,
        &caller,
        &admission,
        &headers,
        query.sql(),
        (query.limit, query.offset),
        Some(note),
    )
    .await
}

fn outliers_query(request: &Request, defaults: &FleetDefaults) -> Result<Outliers, Refusal> {
    let (scope, limit, offset) = request.scope(defaults, &defaults.metrics_table, "1h")?;
    let stat = match request.get("stat") {
        None => Stat::Avg,
        Some(s) => Stat::parse(s).ok_or_else(|| {
            refuse(format!(
                "stat={s}: expected avg, median, min, max or stddev"
            ))
        })?,
    };
    let threshold: f64 = request.number(
        "threshold",
        fleetlake_sql::anomaly::DEFAULT_OUTLIER_THRESHOLD,
        "a robust z above 0",
    )?;
    if !(threshold > 0.0 && threshold.is_finite()) {
        return Err(refuse(format!(
            "threshold={threshold}: expected a robust z above 0"
        )));
    }
    let min_cohort: u64 = request.number("min_cohort", 5, "a number of devices")?;
    if min_cohort < 3 {
        return Err(refuse(format!(
            "min_cohort={min_cohort}: expected at least 3 (a smaller cohort has no outliers)"
        )));
    }
    let all = request.number("all", false, "true or false")?;
    Ok(Outliers {
        scope,
        metric: request
            .get("metric")
            .unwrap_or(&defaults.metric)
            .to_string(),
        by: attribute_columns("by", request.list("by", &defaults.cohort), OUTLIER_COLUMNS)?,
        stat,
        threshold,
        min_cohort,
        all,
        limit,
        offset,
    })
}

/// `GET /v1/fleet/root-cause`: see the README ("Fleet anomaly analytics").
pub async fn root_cause(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    // One admission for the request's two statements (its columns, then the answer).
    let admission = match admit(&state, &caller) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let defaults = state.fleet.clone();
    let own = ["event", "dimensions", "min_devices"];
    let request = match Request::new(&params, &own, &defaults.filters) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let (scope, limit, offset) = match request.scope(&defaults, &defaults.events_table, "24h") {
        Ok(s) => s,
        Err(e) => return bad(e),
    };
    let dimensions = match attribute_columns(
        "dimensions",
        request.list("dimensions", &defaults.dimensions),
        ROOT_CAUSE_COLUMNS,
    ) {
        Ok(d) => d,
        Err(e) => return bad(e),
    };
    if dimensions.is_empty() {
        return bad("dimensions=: expected one or more columns, e.g. dimensions=fw,hw_rev");
    }
    let min_devices = match request.number("min_devices", 1u64, "a number of devices") {
        Ok(n) => n,
        Err(e) => return bad(e),
    };
    let columns = match columns(&state, &caller, &admission, &scope.table).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let spec = request.get("event").unwrap_or(&defaults.event);
    if spec.chars().any(char::is_control) {
        return bad(format!(
            "event={spec:?}: control characters are not an event"
        ));
    }
    let has = |name: &str| columns.iter().any(|(n, _)| n == name);
    let event = match spec.split_once(':') {
        Some(("rule", name)) if !has("rule") => Event::Rule(name.to_string()),
        Some(("expectation", name)) if !has("expectation") => Event::Expectation(name.to_string()),
        Some((column, value)) => Event::Equals(column.to_string(), value.to_string()),
        None => match columns.iter().find(|(n, _)| n == spec) {
            Some((_, arrow::datatypes::DataType::Boolean)) => Event::True(spec.to_string()),
            // A count or a measurement is not NULL whether or not something happened.
            Some((_, t)) if t.is_numeric() => {
                return bad(format!(
                    "event={spec}: a {t} column; expected a boolean column, a column that is NULL \
                     without an event (e.g. crash_report), column:value, rule:NAME or expectation:NAME"
                ));
            }
            _ => Event::Present(spec.to_string()),
        },
    };
    let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
    let named = dimensions.iter().map(String::as_str).chain(event.column());
    if let Err(message) = scope.check_columns(named, &names) {
        return bad(message);
    }
    let query = RootCause {
        scope,
        event,
        dimensions,
        min_devices,
        limit,
        offset,
    };
    answer(
        &state,
        &caller,
        &admission,
        &headers,
        query.sql(),
        (limit, offset),
        None,
    )
    .await
}
