//! The derived stage of ingest: window tables (the final zone) and rules (alerts), fed with the
//! rows the pipelines made of each fetched micro-batch.
//!
//! ```text
//!  pipeline rows of a micro-batch ─► windows ─► rows of closed windows (final.<table>, at flush)
//!                      │                 └───────────┐
//!                      └──────────► rules ◄──────────┘ ─► transitions ─► JetStream alerts.<rule>.<key>
//!                                                                       (published now, Nats-Msg-Id = alert id)
//!                                                                     ─► final.alerts (at flush)
//! ```
//!
//! Exactly once: every window table and final.alerts commit with the ingest's txn like any
//! table (their writers are the committer's, [`crate::ingest::commit`]). Window and rule state is snapshotted beside its table (`_fleetlake/`) and, on start,
//! restored from the newest snapshot at or below the table's committed position, then brought
//! up to it by replaying the committed rows of the input table. Re-processed messages then give
//! the same transitions with the same ids, which JetStream drops within
//! `alerts.duplicate_window_s`.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::DataType;
use async_nats::jetstream;
use datafusion::catalog::TableProvider;
use fleetlake_sql::QueryEngine;
use fleetlake_sql::pipeline::{CheckedRule, CheckedWindow};
use fleetlake_sql::rules::clock::StreamClock;
use fleetlake_sql::rules::{RuleRunner, Transition};
use fleetlake_sql::window::WindowOperator;
use fleetlake_zones::lake::TableWriter;
use fleetlake_zones::{Lake, TableId};

use tokio::sync::oneshot;

use crate::config::Config;
use crate::config::partition::Partition;
use crate::error::{Context, Error};
use crate::ingest::alertmanager::Alertmanager;
use crate::ingest::commit::Snapshot;
use crate::metrics::Metrics;

pub use crate::ingest::alert_table::{alerts_schema, alerts_table, table_exists};

mod restore;

use crate::ingest::alerts::send;
pub use crate::ingest::alerts::{MAX_SUBJECT_TOKEN, alert_json, alert_subject, subject_token};
use restore::*;
pub(crate) use restore::{committed_rows, derive_window, open_idle_alerts, window_kind};

/// What ingest is asked to do with its rules (sent by the rules API, `/v1/rules`, and applied
/// between micro-batches).
pub enum RuleUpdate {
    /// Add the rule, or replace the one of the same name.
    Upsert(Box<CheckedRule>),
    Remove(String),
}

/// A rule change for ingest, and where to say whether it was applied.
pub struct RuleChange {
    pub update: RuleUpdate,
    pub done: oneshot::Sender<Result<(), Error>>,
}

/// What the derived stage made of one micro-batch (or of an idle tick: no window rows).
#[derive(Default)]
pub struct DerivedOutput {
    /// Rows for each window table (in declaration order).
    pub windows: Vec<RecordBatch>,
    /// Every transition, for final.alerts: each key's, and the cohort alerts of grouped rules.
    pub transitions: Vec<Transition>,
    /// What is published (JetStream, Alertmanager): for grouped rules, cohort alerts stand for
    /// their members' transitions (see `fleetlake_sql::rules::group`).
    pub publish: Vec<Transition>,
    pub late: u64,
}

/// The window operators and rules; the writers of their tables are the committer's.
pub struct DerivedStage {
    windows: Vec<WindowOperator>,
    rules: Vec<RuleRunner>,
    /// Whether final.alerts is written (there are rules).
    alerts: bool,
    app_id: String,
    js: Option<jetstream::Context>,
    stream: String,
    duplicate_window: Duration,
    nats: crate::ingest::source::NatsConnection,
    /// Replicas of the alerts stream when it is created (`nats.replicas`).
    replicas: usize,
    /// Observed stream time, which silence rules measure silence with.
    clock: StreamClock,
    /// Where published transitions also go (`alerts.alertmanager_url`).
    alertmanager: Option<Alertmanager>,
    /// The column naming a row's tenant (`auth.tenant_column`), carried into alerts.
    tenant_column: String,
}

/// Why the derived stage could not open.
#[derive(Debug)]
pub enum OpenError {
    /// Reading or writing the lake failed: worth retrying.
    Storage(String),
    /// A window or rule cannot run over what is committed (e.g. its input's columns changed
    /// type): retrying cannot help.
    Invalid(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Storage(e) | OpenError::Invalid(e) => f.write_str(e),
        }
    }
}

impl From<String> for OpenError {
    fn from(e: String) -> Self {
        OpenError::Storage(e)
    }
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Storage(m) => Error::Unavailable(m),
            OpenError::Invalid(m) => Error::Invalid(m),
        }
    }
}

impl From<fleetlake_zones::Error> for OpenError {
    fn from(e: fleetlake_zones::Error) -> Self {
        OpenError::Storage(e.to_string())
    }
}

impl From<Error> for OpenError {
    /// Retried, as any failure reading what is committed is (a definition that cannot run is
    /// [`OpenError::Invalid`], made where it is found).
    fn from(e: Error) -> Self {
        OpenError::Storage(e.to_string())
    }
}

/// Stamps transitions made now with the time (a held one keeps its stamp when published later,
/// so the alert and its final.alerts row say the same `emit_time`).
fn stamp(transitions: &mut [Transition]) {
    let now = chrono::Utc::now().timestamp_micros();
    for t in transitions.iter_mut().filter(|t| t.emitted_us == 0) {
        t.emitted_us = now;
    }
}

impl DerivedOutput {
    /// Cohort alerts are recorded in final.alerts too; both lists in stream order.
    fn finish(&mut self) {
        stamp(&mut self.publish);
        let cohorts = self.publish.iter().filter(|t| !t.members.is_empty());
        self.transitions.extend(cohorts.cloned());
        self.transitions.sort_by_key(|t| t.stream_seq);
        self.publish.sort_by_key(|t| t.stream_seq);
    }
}

impl DerivedStage {
    /// Opens the window tables and final.alerts (their writers are returned, in commit order)
    /// and rebuilds the windows' and rules' state as of what those tables committed.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        lake: &Lake,
        config: &Config,
        metrics: &Arc<Metrics>,
        windows: &[CheckedWindow],
        rules: &[CheckedRule],
        references: &[(TableId, Arc<dyn TableProvider>)],
        inputs: &[(TableId, i64)],
    ) -> Result<(Self, Vec<TableWriter>), OpenError> {
        let app_id = config.consumer().to_string();
        let mut writers = Vec::new();
        let mut stage = Self {
            windows: Vec::new(),
            rules: Vec::new(),
            alerts: !rules.is_empty(),
            app_id: app_id.clone(),
            js: None,
            stream: config.alerts_stream().to_string(),
            duplicate_window: config.alerts_duplicate_window(),
            nats: config.nats(),
            replicas: config.replicas(),
            clock: StreamClock::new(config.silence_max_gap_us()),
            alertmanager: None,
            tenant_column: config.get("auth.tenant_column").to_string(),
        };
        for w in windows {
            let mut op = WindowOperator::new(&w.def, w.input.clone(), &w.input_schema, references)
                .await
                .map_err(|e| OpenError::Invalid(format!("planning {}: {e}", w.def.table)))?;
            let mut writer = lake
                .writer(w.def.table.clone(), op.schema.clone(), Vec::new(), &app_id)
                .await?;
            let input_committed = inputs
                .iter()
                .find(|(t, _)| *t == w.input)
                .map(|(_, c)| *c)
                .unwrap_or(0);
            if writer.committed().is_none() && input_committed > 0 {
                backfill(
                    lake,
                    &mut op,
                    &mut writer,
                    input_committed,
                    references,
                    config.partition(),
                )
                .await?;
                let kind = window_kind(&app_id);
                let bytes = op.encode().map_err(|e| OpenError::Invalid(e.to_string()))?;
                writer.store_snapshot(&kind, input_committed, bytes).await;
            }
            let committed = writer.committed().unwrap_or(0);
            let snapshot = writer
                .latest_side_file(&window_kind(&app_id), committed)
                .await?;
            if let Some((_, bytes)) = snapshot
                && let Err(e) = op.restore(&bytes)
            {
                tracing::warn!(table = %w.def.table, error = %e, "ignoring a window snapshot; rebuilding");
            }
            let from = op.position();
            // The windows this closes again are in the table already.
            derive_window(lake, &mut op, committed, references, config.partition(), |done, rows| {
                if committed - from > BACKFILL_CHUNK {
                    tracing::info!(table = %w.def.table, stream_seq = done, of = committed, rows, "rebuilding window state");
                }
            })
            .await?;
            tracing::info!(table = %w.def.table, from, committed, open = op.open_groups(), "window state rebuilt");
            stage.windows.push(op);
            writers.push(writer);
        }
        if !rules.is_empty() {
            let writer = open_alerts(lake, &app_id).await?;
            let committed = writer.committed().unwrap_or(0);
            for r in rules {
                let mut rule = RuleRunner::new(&r.def, r.input.clone(), r.input_schema.clone())
                    .with_tenant_column(&stage.tenant_column);
                let kind = rule_kind(&app_id, &r.def.name);
                let snapshot = writer.latest_side_file(&kind, committed).await?;
                let restored = match snapshot.map(|(_, bytes)| rule.restore(&bytes)) {
                    Some(Ok(true)) => true,
                    // Rebuilt from the input's committed rows, from the start.
                    Some(Err(e)) => {
                        tracing::warn!(rule = %r.def.name, error = %e, "ignoring a damaged rule snapshot; rebuilding");
                        true
                    }
                    Some(Ok(false)) | None => false,
                };
                if !restored {
                    // A new rule, or one whose definition changed: it starts from the rows
                    // after what is committed, with no state (re-evaluating the past would
                    // take state from transitions that were never published). Its snapshot is
                    // stored at once, so a crash before the next one restores this start.
                    rule.advance(committed);
                    writer.store_snapshot(&kind, committed, rule.encode()).await;
                    tracing::info!(rule = %r.def.name, version = %rule.version, from = committed, "rule starts");
                    stage.rules.push(rule);
                    continue;
                }
                let from = rule.position();
                for batch in
                    committed_rows(lake, &r.input, from, committed, config.partition()).await?
                {
                    let rebuilt = rule.process(&batch, references).await.map_err(|e| {
                        OpenError::Invalid(format!(
                            "rebuilding rule {} from the rows of {}: {e}",
                            r.def.name, r.input
                        ))
                    })?;
                    // Published before the crash; routed so the cohorts are as they were.
                    rule.route(&rebuilt);
                }
                if r.kind == fleetlake_sql::rules::RuleKind::Silence {
                    let recorded =
                        recorded_since(lake, &r.def.name, &rule.version, from, config.partition())
                            .await?;
                    for (key, state) in recorded {
                        rule.recorded(&key, &state);
                    }
                }
                rule.advance(committed);
                // Observed time carries on from the newest of the rules' snapshots; rows
                // replayed here count as seen at it (time since the snapshot is not counted).
                if rule.clock() > stage.clock.now() {
                    stage.clock = StreamClock::resumed(rule.clock(), config.silence_max_gap_us());
                }
                tracing::info!(rule = %r.def.name, from, committed, firing = rule.firing(), "rule state rebuilt");
                stage.rules.push(rule);
            }
            writers.push(writer);
        }
        // After final.alerts is open: the delivery task re-sends what it says is firing.
        stage.alertmanager = config.alertmanager_url().map(|url| {
            Alertmanager::start(
                url,
                config.alertmanager_resend(),
                lake.clone(),
                metrics.clone(),
            )
        });
        Ok((stage, writers))
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.rules.is_empty()
    }

    /// Adds a rule, or replaces the one of the same name, starting after stream sequence
    /// `position` with no state (as a new rule does at start). Returns the new rule's snapshot,
    /// to store at once, and the writer of final.alerts when it was not open yet (it goes last
    /// among the committer's writers).
    pub async fn upsert_rule(
        &mut self,
        lake: &Lake,
        rule: &CheckedRule,
        position: i64,
    ) -> Result<(Snapshot, Option<TableWriter>), Error> {
        let mut runner = RuleRunner::new(&rule.def, rule.input.clone(), rule.input_schema.clone())
            .with_tenant_column(&self.tenant_column);
        runner.advance(position);
        runner.observe(self.clock.now());
        let snapshot = Snapshot {
            tables: vec![alerts_table()],
            kind: rule_kind(&self.app_id, &rule.def.name),
            bytes: runner.encode().into(),
        };
        let writer = if self.alerts {
            None
        } else {
            Some(open_alerts(lake, &self.app_id).await?)
        };
        self.alerts = true;
        match self.rules.iter_mut().find(|r| r.def.name == rule.def.name) {
            Some(r) => *r = runner,
            None => self.rules.push(runner),
        }
        tracing::info!(rule = %rule.def.name, from = position, "rule loaded");
        Ok((snapshot, writer))
    }

    /// Each rule's name and how many of its keys are firing.
    pub fn firing(&self) -> Vec<(String, usize)> {
        self.rules
            .iter()
            .map(|r| (r.def.name.clone(), r.firing()))
            .collect()
    }

    /// Removes a rule; false if there is none of that name. final.alerts stays open.
    pub fn remove_rule(&mut self, name: &str) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.def.name != name);
        before != self.rules.len()
    }

    /// The rows a flush commits, in the order of the writers [`Self::open`] returned: each window table's rows
    /// of the flush's micro-batches (`windows[batch][table]`), then final.alerts.
    pub fn flush_rows(
        &self,
        windows: &[Vec<RecordBatch>],
        transitions: &[Transition],
    ) -> Vec<RecordBatch> {
        let mut out: Vec<RecordBatch> = self
            .windows
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let parts = windows.iter().filter_map(|batch| batch.get(i));
                arrow::compute::concat_batches(&w.schema, parts)
                    .expect("a window table's batches share a schema")
            })
            .collect();
        if self.alerts {
            out.push(Self::alert_rows(transitions));
        }
        out
    }

    /// Observed stream time (µs, see `fleetlake_sql::rules::clock`).
    pub fn observed(&self) -> i64 {
        self.clock.now()
    }

    /// A micro-batch was delivered: an observation of the stream. Returns the observed time.
    pub fn observe(&mut self) -> i64 {
        self.clock.observe(chrono::Utc::now().timestamp_micros())
    }

    /// Ends the current run of observations: the consumer failed, so the time until it is
    /// healthy again is not counted as silence.
    pub fn interrupt(&mut self) {
        self.clock.interrupt();
    }

    /// An observation of a healthy, caught-up stream while no message arrives (the NATS server
    /// answered that it has nothing more): silence rules fire for the keys silent long enough,
    /// and held cohorts are released. `upto` is the highest stream sequence processed.
    pub fn idle(&mut self, upto: i64) -> DerivedOutput {
        let observed = self.clock.observe(chrono::Utc::now().timestamp_micros());
        let mut out = DerivedOutput::default();
        for r in &mut self.rules {
            r.advance(upto);
            r.observe(observed);
            let mut fired = r.tick();
            stamp(&mut fired);
            out.publish.extend(r.route(&fired));
            out.transitions.extend(fired);
        }
        out.finish();
        out
    }

    /// Feeds the rows the pipelines made of a micro-batch (stream sequences up to `upto`) to
    /// the windows, then the rules, at the observed time of [`Self::observe`].
    pub async fn process(
        &mut self,
        tables: &[(TableId, RecordBatch)],
        references: &[(TableId, Arc<dyn TableProvider>)],
        upto: i64,
    ) -> Result<DerivedOutput, Error> {
        let observed = self.clock.now();
        let mut out = DerivedOutput::default();
        let mut produced: Vec<(TableId, RecordBatch)> = Vec::new();
        for w in &mut self.windows {
            let rows = tables
                .iter()
                .chain(produced.iter())
                .find(|(t, _)| *t == w.input)
                .map(|(_, r)| r);
            let result = match rows {
                Some(rows) if rows.num_rows() > 0 => {
                    w.process(rows, references).await.context(&w.def.table)?
                }
                _ => fleetlake_sql::window::WindowOutput {
                    rows: RecordBatch::new_empty(w.schema.clone()),
                    late: 0,
                },
            };
            out.late += result.late;
            produced.push((w.def.table.clone(), result.rows.clone()));
            out.windows.push(result.rows);
        }
        for r in &mut self.rules {
            r.observe(observed);
            let rows = tables
                .iter()
                .chain(produced.iter())
                .find(|(t, _)| *t == r.input)
                .map(|(_, r)| r);
            let mut t = Vec::new();
            if let Some(rows) = rows.filter(|r| r.num_rows() > 0) {
                t = r
                    .process(rows, references)
                    .await
                    .context(format!("rule {}", r.def.name))?;
            }
            r.advance(upto);
            t.extend(r.tick());
            stamp(&mut t);
            out.publish.extend(r.route(&t));
            out.transitions.extend(t);
        }
        out.finish();
        Ok(out)
    }

    /// Publishes transitions to `alerts.<rule>.<key>` and waits until JetStream has stored each;
    /// then hands them to Alertmanager delivery, if configured.
    pub async fn publish(&mut self, transitions: &[Transition]) -> Result<(), Error> {
        if transitions.is_empty() {
            return Ok(());
        }
        if self.js.is_none() {
            let js = crate::ingest::source::connect_with(&self.nats).await?;
            js.get_or_create_stream(jetstream::stream::Config {
                name: self.stream.clone(),
                subjects: vec!["alerts.>".into()],
                storage: jetstream::stream::StorageType::File,
                duplicate_window: self.duplicate_window,
                num_replicas: self.replicas,
                ..Default::default()
            })
            .await
            .context("creating the alerts stream")?;
            self.js = Some(js);
        }
        let js = self.js.as_ref().expect("connected");
        let sent = send(js, transitions).await;
        match &sent {
            Ok(()) => {
                if let Some(am) = &self.alertmanager {
                    am.send(transitions);
                }
            }
            // Connect and create the stream again on the retry (it may have been deleted).
            Err(_) => self.js = None,
        }
        sent
    }

    /// `final.alerts` rows for transitions (a cohort alert's members go into its values).
    pub(crate) fn alert_rows(transitions: &[Transition]) -> RecordBatch {
        let now = chrono::Utc::now().timestamp_micros();
        let s = |f: fn(&Transition) -> &str| {
            Arc::new(StringArray::from_iter_values(transitions.iter().map(f)))
                as arrow::array::ArrayRef
        };
        let ts = |v: Vec<Option<i64>>| {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
                as arrow::array::ArrayRef
        };
        RecordBatch::try_new(
            alerts_schema(),
            vec![
                s(|t| &t.alert_id),
                s(|t| &t.rule),
                s(|t| &t.rule_version),
                s(|t| &t.severity),
                s(|t| &t.key),
                s(|t| &t.state),
                ts(transitions.iter().map(|t| t.window_start).collect()),
                ts(transitions.iter().map(|t| t.window_end).collect()),
                Arc::new(StringArray::from_iter_values(transitions.iter().map(|t| {
                    let mut values = t.values.clone();
                    if !t.members.is_empty() {
                        values.insert("members".into(), serde_json::json!(t.members));
                    }
                    if let Some(c) = &t.cohort {
                        values.insert("cohort".into(), serde_json::json!(c));
                    }
                    serde_json::Value::Object(values).to_string()
                }))),
                ts(transitions.iter().map(|t| Some(t.event_time)).collect()),
                ts(transitions
                    .iter()
                    .map(|t| Some(if t.emitted_us > 0 { t.emitted_us } else { now }))
                    .collect()),
                Arc::new(Int64Array::from_iter_values(
                    transitions.iter().map(|t| t.stream_seq),
                )),
                Arc::new(StringArray::from_iter(
                    transitions.iter().map(|t| t.tenant.as_deref()),
                )),
            ],
        )
        .expect("alerts schema")
    }

    /// Window and rule state, to store beside their tables once committed.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        let mut out = Vec::new();
        for w in &self.windows {
            match w.encode() {
                Ok(bytes) => out.push(Snapshot {
                    tables: vec![w.def.table.clone()],
                    kind: window_kind(&self.app_id),
                    bytes: bytes.into(),
                }),
                Err(e) => {
                    tracing::warn!(table = %w.def.table, error = %e, "encoding the window state failed")
                }
            }
        }
        for r in &self.rules {
            out.push(Snapshot {
                tables: vec![alerts_table()],
                kind: rule_kind(&self.app_id, &r.def.name),
                bytes: r.encode().into(),
            });
        }
        out
    }
}
