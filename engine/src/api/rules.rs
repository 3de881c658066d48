//! Rules at runtime: `/v1/rules` lists, creates, changes and deletes rules while the engine runs.
//!
//! ```text
//!  PUT /v1/rules/<name> (the CREATE RULE text, X-Fleetlake-Author)
//!    ─► parse ─► plan with every pipeline file (as `fleetlake check` does) ─► 400 with line:column
//!    ─► final.rule_audit (who, when, what, versions before and after)
//!    ─► <pipelines.dir>/rules/<name>.sql (written atomically: the next start loads it)
//!    ─► ingest: commits what it took so far, then swaps the rule in between micro-batches
//! ```
//!
//! A rule managed here is one file, `rules/<name>.sql` under `pipelines.dir`, holding one
//! `CREATE RULE`. A rule declared in another file is listed but not changed here (409): edit that
//! file and restart. A new or changed rule starts from the messages after the change, with no
//! state; its version is the hash of its definition.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use axum::http::StatusCode;
use fleetlake_sql::pipeline::{CheckedRule, check_texts, parse_file, pipeline_files};
use fleetlake_sql::rules::rule_version;
use fleetlake_zones::lake::TableWriter;
use fleetlake_zones::{Lake, TableId, Zone};
use serde_json::json;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::Error;
use crate::ingest::derived::{RuleChange, RuleUpdate};

/// `final.rule_audit`: every change made over `/v1/rules`.
pub fn audit_table() -> TableId {
    TableId::new(Zone::Final, "rule_audit")
}

fn audit_schema() -> SchemaRef {
    let s = |name: &str| Field::new(name, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        Field::new(
            "changed_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        s("author"),
        s("action"),
        s("rule"),
        s("version"),
        s("previous_version"),
        s("sql"),
        s("previous_sql"),
        // Strictly increasing; the table's progress column.
        Field::new("change_seq", DataType::Int64, false),
    ]))
}

/// How long a change waits for ingest to swap it in before answering "applies later".
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest rule text accepted.
pub const MAX_RULE_BYTES: usize = 64 * 1024;

/// A declared rule and the file it lives in.
#[derive(Clone)]
pub struct RuleEntry {
    pub rule: CheckedRule,
    pub file: PathBuf,
    /// The file's text, for rules managed here.
    pub sql: Option<String>,
}

/// A refused request: status, code and what was wrong.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        status,
        code,
        message: message.into(),
    }
}

struct State {
    rules: BTreeMap<String, RuleEntry>,
    audit: Option<TableWriter>,
    last_seq: i64,
}

/// The rules of a running engine and the way to change them.
pub struct Rules {
    dir: PathBuf,
    lake: Lake,
    app_id: String,
    changes: mpsc::Sender<RuleChange>,
    /// Why changes are not handed to ingest (in a cluster each partition runs its own rules):
    /// they apply at the next start.
    frozen: Option<String>,
    /// One change at a time.
    state: Mutex<State>,
}

/// Whether `name` can name a rule managed here (it becomes a file name and a NATS subject token).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn seconds(us: i64) -> f64 {
    us as f64 / 1e6
}

impl Rules {
    pub fn new(
        dir: PathBuf,
        lake: Lake,
        app_id: &str,
        declared: Vec<RuleEntry>,
        changes: mpsc::Sender<RuleChange>,
    ) -> Self {
        let rules = declared
            .into_iter()
            .map(|e| (e.rule.def.name.clone(), e))
            .collect();
        Self {
            dir,
            lake,
            app_id: format!("{app_id}-rules"),
            changes,
            frozen: None,
            state: Mutex::new(State {
                rules,
                audit: None,
                last_seq: 0,
            }),
        }
    }

    /// Where the rule `name` lives when it is managed here.
    fn managed_path(&self, name: &str) -> PathBuf {
        self.dir.join("rules").join(format!("{name}.sql"))
    }

    fn describe(&self, e: &RuleEntry) -> serde_json::Value {
        let d = &e.rule.def;
        let file = e.file.strip_prefix(&self.dir).unwrap_or(&e.file);
        json!({
            "name": d.name,
            "version": rule_version(d),
            "severity": d.severity,
            "key": d.key,
            "for_s": seconds(d.for_duration),
            "cool_down_s": seconds(d.cool_down),
            "event_time": d.event_time,
            "kind": e.rule.kind,
            "group_by": d.group_by,
            "group_min": (!d.group_by.is_empty()).then_some(d.group_min),
            "group_wait_s": (!d.group_by.is_empty()).then(|| seconds(d.group_wait)),
            "input": e.rule.input.to_string(),
            "file": file.display().to_string(),
            "managed": e.file == self.managed_path(&d.name),
            "sql": e.sql,
        })
    }

    /// Every rule, by name.
    pub async fn list(&self) -> serde_json::Value {
        let state = self.state.lock().await;
        let rules: Vec<_> = state.rules.values().map(|e| self.describe(e)).collect();
        json!({ "rules": rules })
    }

    pub async fn get(&self, name: &str) -> Result<serde_json::Value, Refused> {
        let state = self.state.lock().await;
        state
            .rules
            .get(name)
            .map(|e| self.describe(e))
            .ok_or_else(|| not_found(name))
    }

    /// Creates or replaces the rule `name` from `sql` (one `CREATE RULE name …`). Answers 201
    /// for a new rule, 200 for a changed or unchanged one.
    pub async fn put(
        &self,
        name: &str,
        sql: &str,
        author: &str,
    ) -> Result<(StatusCode, serde_json::Value), Refused> {
        check_name(name)?;
        let path = self.managed_path(name);
        let shown = path.strip_prefix(&self.dir).unwrap_or(&path).to_path_buf();
        // Too deep to plan safely: refused before parsing (as `/v1/query` does).
        fleetlake_sql::query::check_size(sql).map_err(|e| {
            refused(
                StatusCode::BAD_REQUEST,
                "invalid_rule",
                format!("{}: {e}", shown.display()),
            )
        })?;
        let file = parse_file(sql).map_err(|e| {
            refused(
                StatusCode::BAD_REQUEST,
                "invalid_rule",
                format!("{}:{e}", shown.display()),
            )
        })?;
        let only_rule = file.sources.is_empty()
            && file.tables.is_empty()
            && file.references.is_empty()
            && file.windows.is_empty()
            && file.rules.len() == 1;
        if !only_rule {
            return Err(refused(
                StatusCode::BAD_REQUEST,
                "invalid_rule",
                format!(
                    "expected exactly one CREATE RULE {name} WITH (…) AS SELECT … and nothing else; \
                     pipelines, windows and reference tables are files under pipelines.dir"
                ),
            ));
        }
        if file.rules[0].name != name {
            return Err(refused(
                StatusCode::BAD_REQUEST,
                "invalid_rule",
                format!(
                    "the statement creates rule {} but the URL names {name}: they must be the same",
                    file.rules[0].name
                ),
            ));
        }
        // What checks but may surprise: window functions see one micro-batch.
        let warnings: Vec<String> =
            fleetlake_sql::pipeline::check::per_batch_window_functions(&file)
                .iter()
                .map(|w| format!("{}:{w}", shown.display()))
                .collect();
        let mut state = self.state.lock().await;
        let previous = state.rules.get(name).cloned();
        if let Some(p) = &previous
            && p.file != path
        {
            return Err(declared_elsewhere(&self.dir, name, &p.file));
        }
        let rule = self.check(&path, sql).await?;
        let version = rule_version(&rule.def);
        let previous_version = previous.as_ref().map(|p| rule_version(&p.rule.def));
        if previous_version.as_deref() == Some(version.as_str()) {
            let mut body = self.describe(previous.as_ref().expect("unchanged"));
            body["changed"] = json!(false);
            body["applied"] = json!(true);
            body["warnings"] = json!(warnings);
            return Ok((StatusCode::OK, body));
        }
        let action = if previous.is_some() {
            "changed"
        } else {
            "created"
        };
        let audit = AuditRow {
            author,
            action,
            rule: name,
            version: Some(&version),
            previous_version: previous_version.as_deref(),
            sql: Some(sql),
            previous_sql: previous.as_ref().and_then(|p| p.sql.as_deref()),
        };
        // The text is written beside the file first, so the step after the audit row is a
        // rename: the audit never records a change whose file could not be written.
        let write_failed = |e: std::io::Error| {
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "write_failed",
                format!("writing {}: {e}; nothing was changed", path.display()),
            )
        };
        let staged = stage(&path, sql).map_err(write_failed)?;
        if let Err(refusal) = self.record(&mut state, audit).await {
            let _ = std::fs::remove_file(&staged);
            return Err(refusal);
        }
        std::fs::rename(&staged, &path).map_err(write_failed)?;
        let entry = RuleEntry {
            rule: rule.clone(),
            file: path,
            sql: Some(sql.to_string()),
        };
        state.rules.insert(name.to_string(), entry.clone());
        drop(state);
        let applied = self.apply(RuleUpdate::Upsert(Box::new(rule))).await;
        let mut body = self.describe(&entry);
        body["changed"] = json!(true);
        body["action"] = json!(action);
        body["warnings"] = json!(warnings);
        add_applied(&mut body, applied);
        let status = if previous.is_some() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok((status, body))
    }

    /// Deletes the rule `name`.
    pub async fn delete(&self, name: &str, author: &str) -> Result<serde_json::Value, Refused> {
        check_name(name)?;
        let mut state = self.state.lock().await;
        let previous = state
            .rules
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))?;
        let path = self.managed_path(name);
        if previous.file != path {
            return Err(declared_elsewhere(&self.dir, name, &previous.file));
        }
        let previous_version = rule_version(&previous.rule.def);
        let audit = AuditRow {
            author,
            action: "deleted",
            rule: name,
            version: None,
            previous_version: Some(&previous_version),
            sql: None,
            previous_sql: previous.sql.as_deref(),
        };
        self.record(&mut state, audit).await?;
        std::fs::remove_file(&path).map_err(|e| {
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "write_failed",
                format!("removing {}: {e}", path.display()),
            )
        })?;
        state.rules.remove(name);
        drop(state);
        let applied = self.apply(RuleUpdate::Remove(name.to_string())).await;
        let mut body = json!({
            "name": name,
            "action": "deleted",
            "previous_version": previous_version,
        });
        add_applied(&mut body, applied);
        Ok(body)
    }

    /// Plans the rule with every pipeline file, the rule's own file replaced by `sql`.
    async fn check(&self, path: &Path, sql: &str) -> Result<CheckedRule, Refused> {
        let mut files = if self.dir.is_dir() {
            pipeline_files(std::slice::from_ref(&self.dir)).map_err(|e| {
                refused(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "read_failed",
                    format!("reading {}: {e}", self.dir.display()),
                )
            })?
        } else {
            Vec::new()
        };
        files.retain(|f| f != path);
        let mut texts: Vec<(PathBuf, Result<String, String>)> = files
            .into_iter()
            .map(|f| {
                let text =
                    std::fs::read_to_string(&f).map_err(|e| format!("reading the file: {e}"));
                (f, text)
            })
            .collect();
        texts.push((path.to_path_buf(), Ok(sql.to_string())));
        let reports = check_texts(texts).await;
        let mut errors = Vec::new();
        for r in &reports {
            let shown = r.path.strip_prefix(&self.dir).unwrap_or(&r.path);
            errors.extend(r.errors.iter().map(|e| format!("{}:{e}", shown.display())));
        }
        if !errors.is_empty() {
            return Err(refused(
                StatusCode::BAD_REQUEST,
                "invalid_rule",
                errors.join("\n"),
            ));
        }
        for warning in reports
            .iter()
            .filter(|r| r.path == path)
            .flat_map(|r| r.warning_lines())
        {
            tracing::warn!("{warning}");
        }
        reports
            .into_iter()
            .find(|r| r.path == path)
            .and_then(|r| r.rules.into_iter().next())
            .ok_or_else(|| {
                refused(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the rule checked but was not returned by the checker",
                )
            })
    }

    /// Appends a row to final.rule_audit; the change goes no further if this fails.
    async fn record(&self, state: &mut State, row: AuditRow<'_>) -> Result<(), Refused> {
        let unavailable = |e: String| {
            refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                format!(
                    "recording the change in {}: {e}; nothing was changed",
                    audit_table()
                ),
            )
        };
        if state.audit.is_none() {
            let writer = self
                .lake
                .writer(audit_table(), audit_schema(), Vec::new(), &self.app_id)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            state.last_seq = writer.committed().unwrap_or(0);
            state.audit = Some(writer);
        }
        let now = chrono::Utc::now().timestamp_micros();
        let seq = now.max(state.last_seq + 1);
        let batch = row.batch(now, seq);
        let writer = state.audit.as_mut().expect("opened");
        writer
            .commit(&batch, "change_seq", seq)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        state.last_seq = seq;
        Ok(())
    }

    /// Changes are written to the rule files but not handed to ingest, for `reason`: they apply
    /// at the next start.
    pub fn frozen(mut self, reason: String) -> Self {
        self.frozen = Some(reason);
        self
    }

    /// Hands a change to ingest and waits until it is swapped in (or says why it is not yet).
    async fn apply(&self, update: RuleUpdate) -> Result<(), Error> {
        if let Some(reason) = &self.frozen {
            return Err(Error::Unavailable(reason.clone()));
        }
        let (done, applied) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + APPLY_TIMEOUT;
        let waited = APPLY_TIMEOUT.as_secs();
        match tokio::time::timeout_at(deadline, self.changes.send(RuleChange { update, done }))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(Error::Unavailable(
                    "ingest is not running; the change applies at the next start".into(),
                ));
            }
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "ingest has not taken earlier changes for {waited} s (NATS or storage down?); \
                     this one applies at the next start"
                )));
            }
        }
        match tokio::time::timeout_at(deadline, applied).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Unavailable(
                "ingest stopped; the change applies at the next start".into(),
            )),
            Err(_) => Err(Error::Unavailable(format!(
                "ingest did not take the change within {waited} s (NATS or storage down?); it \
                 applies when ingest resumes"
            ))),
        }
    }
}

fn add_applied(body: &mut serde_json::Value, applied: Result<(), Error>) {
    match applied {
        Ok(()) => body["applied"] = json!(true),
        Err(reason) => {
            body["applied"] = json!(false);
            body["pending"] = json!(reason.to_string());
        }
    }
}

fn check_name(name: &str) -> Result<(), Refused> {
    if valid_name(name) {
        return Ok(());
    }
    Err(refused(
        StatusCode::BAD_REQUEST,
        "bad_name",
        format!(
            "rule name {name:?}: expected 1 to 64 lowercase letters, digits and _ (it becomes a file name and part of a NATS subject)"
        ),
    ))
}

fn not_found(name: &str) -> Refused {
    refused(
        StatusCode::NOT_FOUND,
        "no_such_rule",
        format!("there is no rule {name:?} (GET /v1/rules lists them)"),
    )
}

fn declared_elsewhere(dir: &Path, name: &str, file: &Path) -> Refused {
    let shown = file.strip_prefix(dir).unwrap_or(file);
    refused(
        StatusCode::CONFLICT,
        "declared_in_file",
        format!(
            "rule {name} is declared in {}, not in rules/{name}.sql on its own: change it there \
             and restart, or move it to rules/{name}.sql (one CREATE RULE {name} per file) to \
             manage it over HTTP",
            shown.display()
        ),
    )
}

/// Writes `text` to a hidden file beside `path` (not a `.sql` file, so not loaded) and returns
/// it: renaming it onto `path` then replaces the file at once, never leaving a part of it.
fn stage(path: &Path, text: &str) -> std::io::Result<PathBuf> {
    let dir = path.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().expect("a file").to_string_lossy()
    ));
    std::fs::write(&tmp, text)?;
    Ok(tmp)
}

struct AuditRow<'a> {
    author: &'a str,
    action: &'a str,
    rule: &'a str,
    version: Option<&'a str>,
    previous_version: Option<&'a str>,
    sql: Option<&'a str>,
    previous_sql: Option<&'a str>,
}

impl AuditRow<'_> {
    fn batch(&self, at: i64, seq: i64) -> RecordBatch {
        let s = |v: Option<&str>| Arc::new(StringArray::from(vec![v])) as arrow::array::ArrayRef;
        RecordBatch::try_new(
            audit_schema(),
            vec![
                Arc::new(TimestampMicrosecondArray::from(vec![at]).with_timezone("UTC")),
                s(Some(self.author)),
                s(Some(self.action)),
                s(Some(self.rule)),
                s(self.version),
                s(self.previous_version),
                s(self.sql),
                s(self.previous_sql),
                Arc::new(Int64Array::from(vec![seq])),
            ],
        )
        .expect("audit schema")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_can_be_files_and_subject_tokens() {
        assert!(valid_name("trailer_too_warm"));
        assert!(valid_name("r2"));
        for bad in [
            "",
            "Hot",
            "a.b",
            "a b",
            "a-b",
            "../x",
            "a*",
            &"x".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
