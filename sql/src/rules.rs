//! Continuous rules: a SQL query over a table's rows (a pipeline's usable table or a window
//! table) that says, per row, whether a condition holds for a key; and the noise control that
//! turns those rows into alert transitions.
//!
//! ```text
//!  rows (stream order) ─► the rule's query (DataFusion) ─► key, event time, firing[, resolved], values
//!      ─► per key, in stream order (a row older than the key's newest is skipped):
//!         ok ──firing──► pending(since) ──firing for `for`, cool-down over──► FIRING  (transition)
//!          ▲                │ not firing (a blip: no alert)                    │ resolved
//!          └────────────────┘◄──────────────────────────────── RESOLVED ◄──────┘ (transition)
//! ```
//!
//! A **silence rule** returns `silent_after_s` instead of `firing`: each row says its key was
//! heard from and how long (seconds) it may then stay silent. A key fires when it has sent no row
//! for that long (plus `for`) in observed stream time ([`clock`]), and resolves with its next row.
//!
//! Grouping (`group_by`, [`group`]): firing keys of one cohort are held for `group_wait`; when at
//! least `group_min` of them fire together, one cohort alert is published instead of one per key.
//!
//! Hysteresis: a firing key resolves on the `resolved` column (e.g. `temperature_c < 6` for a rule
//! that fires above 8), or when `firing` turns false if the query has no `resolved` column.
//! Everything is event time, so replaying the same rows gives the same transitions with the same
//! ids — which is what lets JetStream drop an alert republished after a crash.

pub mod clock;
pub mod group;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, SchemaRef, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::catalog::TableProvider;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::sql::sqlparser::ast::{Expr, Ident, SelectItem, SetExpr};
use fleetlake_zones::TableId;
use serde::{Deserialize, Serialize};

use crate::pipeline::RuleDef;
use crate::pipeline::run::PROGRESS_COLUMN;
use crate::window::{WINDOW_END, WINDOW_START, plan_over};
use crate::{Error, Result};

/// The hidden column that carries each rule row's stream sequence.
const RULE_SEQ: &str = "__rule_stream_seq";
/// The column that says the condition holds.
pub const FIRING: &str = "firing";
/// The optional column that says a firing key is back to normal.
pub const RESOLVED: &str = "resolved";
/// The column of a silence rule: how long (seconds) its key may send nothing before it fires.
pub const SILENT_AFTER: &str = "silent_after_s";

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// The version of a rule: a hash of its definition (the query as normalized SQL, so where it is
/// written and its spacing do not matter), so a change is a new version.
pub fn rule_version(def: &RuleDef) -> String {
    let mut text = format!(
        "{}|{}|{:?}|{}|{}|{}|{}",
        def.name, def.severity, def.key, def.for_duration, def.cool_down, def.event_time, def.query
    );
    if !def.group_by.is_empty() {
        // Only grouped rules add this, so the versions of rules written before it stay.
        text.push_str(&format!(
            "|{:?}|{}|{}",
            def.group_by, def.group_min, def.group_wait
        ));
    }
    format!("{:016x}", crate::hash::stable_hash(&[&text]))
}

/// A firing or resolved alert for one key, or for a cohort of keys (`members`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// Deterministic: the same rule version, key, state and event time give the same id.
    pub alert_id: String,
    pub rule: String,
    pub rule_version: String,
    pub severity: String,
    pub key: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// The window of the row, for rules over window tables (µs since the epoch).
    pub window_start: Option<i64>,
    pub window_end: Option<i64>,
    /// The row's other columns (what triggered the transition).
    pub values: serde_json::Map<String, serde_json::Value>,
    /// Event time of the row that caused the transition (µs since the epoch).
    pub event_time: i64,
    /// The message the row came from. A silence rule's firing is detected between messages:
    /// it carries the sequence after the last one processed.
    pub stream_seq: i64,
    /// The cohort the key belongs to (the rule's `group_by` values joined with `/`), for a
    /// grouped rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cohort: Option<String>,
    /// For a cohort alert: the keys it stands for (its `key` is the cohort); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// When fleetlake made the transition (µs since the epoch; 0 until stamped by ingest): the
    /// `emit_time` of the published alert and of its `final.alerts` row alike.
    #[serde(default)]
    pub emitted_us: i64,
    /// The tenant whose rows raised it: the rule's tenant column (`auth.tenant_column`), among
    /// its values or its key columns; `None` when the rule does not select one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Ok,
    Pending { since: i64 },
    Firing,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyState {
    phase: Phase,
    /// The newest event time seen for the key.
    last_t: i64,
    /// When the key last fired: event time, or observed time for a silence rule.
    last_fired: Option<i64>,
    /// The cohort the key fired in (grouped rules): its resolve goes to the same cohort, even
    /// if the key's `group_by` values changed meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fired_cohort: Option<String>,
    /// A silence rule's watch over the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    silence: Option<Silence>,
}

/// When a silence rule's key was last heard from and what it said.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Silence {
    /// Observed time (µs, [`clock`]) of the key's last row.
    seen_at: i64,
    /// How long (µs) the key may send nothing.
    after: i64,
    /// The last row's values (the alert's values when it fires).
    values: serde_json::Map<String, serde_json::Value>,
    cohort: Option<String>,
    /// The deadline (observed µs) the key is scheduled at: its silence deadline, or the end of
    /// its cool-down. A scheduled entry that is not this one is stale and ignored.
    #[serde(default)]
    due: i64,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: String,
    position: i64,
    keys: BTreeMap<String, KeyState>,
    /// Observed time as of the snapshot (silence rules).
    #[serde(default)]
    clock: i64,
    #[serde(default)]
    groups: group::Grouper,
}

/// A query's plan and the reference tables it was planned with.
type Planned = (
    Vec<(TableId, Arc<dyn TableProvider>)>,
    Arc<dyn ExecutionPlan>,
);

/// A rule, its per-key state and its position in the stream.
pub struct RuleRunner {
    pub def: RuleDef,
    pub version: String,
    /// The table whose rows the rule reads.
    pub input: TableId,
    input_schema: SchemaRef,
    keys: BTreeMap<String, KeyState>,
    position: i64,
    /// Rows skipped because they were older than their key's newest row.
    pub out_of_order: u64,
    /// The query planned once over no rows, with the reference tables it was planned with.
    planned: Option<Planned>,
    /// Observed stream time (µs, [`clock`]) as of the last micro-batch or tick.
    clock: i64,
    /// Silence deadlines (observed µs) of the keys that are not firing.
    deadlines: BTreeSet<(i64, String)>,
    groups: group::Grouper,
    /// The column naming a row's tenant, carried into each transition.
    tenant_column: String,
}

impl RuleRunner {
    /// Names the column that holds a row's tenant (default `tenant`); a transition carries the
    /// value its row had there, so a token bound to that tenant sees its own alerts.
    pub fn with_tenant_column(mut self, column: &str) -> Self {
        self.tenant_column = column.to_string();
        self
    }

    pub fn new(def: &RuleDef, input: TableId, input_schema: SchemaRef) -> Self {
        Self {
            version: rule_version(def),
            def: def.clone(),
            input,
            input_schema,
            keys: BTreeMap::new(),
            position: 0,
            out_of_order: 0,
            planned: None,
            clock: 0,
            deadlines: BTreeSet::new(),
            groups: group::Grouper::default(),
            tenant_column: "tenant".into(),
        }
    }

    /// Whether the rule groups its keys' alerts by cohort.
    pub fn grouped(&self) -> bool {
        !self.def.group_by.is_empty()
    }

    /// Sets the observed stream time ([`clock`]) that the next rows are seen at and that
    /// [`Self::tick`] measures silence with; it never goes back.
    pub fn observe(&mut self, observed: i64) {
        self.clock = self.clock.max(observed);
    }

    /// Observed stream time as of the rule's state.
    pub fn clock(&self) -> i64 {
        self.clock
    }

    /// A silence rule's firings as of the observed time set by [`Self::observe`]: each key
    /// silent for its `silent_after_s` plus `for`, and past its cool-down. Firing is detected
    /// between messages, so the transition carries the sequence after the rule's position; its
    /// event time (and so its id) is that of the key's last row, which a replay gives again.
    pub fn tick(&mut self) -> Vec<Transition> {
        let mut out = Vec::new();
        while let Some(first) = self.deadlines.first() {
            if first.0 > self.clock {
                break;
            }
            let (due, key) = self.deadlines.pop_first().expect("not empty");
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            let Some(silence) = &mut state.silence else {
                continue;
            };
            if state.phase == Phase::Firing || silence.due != due {
                continue;
            }
            if let Some(f) = state.last_fired
                && self.clock.saturating_sub(f) < self.def.cool_down
            {
                silence.due = f.saturating_add(self.def.cool_down);
                self.deadlines.insert((silence.due, key));
                continue;
            }
            state.phase = Phase::Firing;
            state.last_fired = Some(self.clock);
            state.fired_cohort = silence.cohort.clone();
            let mut values = silence.values.clone();
            values.insert(
                "silent_for_s".into(),
                serde_json::json!((self.clock - silence.seen_at) as f64 / 1e6),
            );
            let cohort = silence.cohort.clone();
            let t = state.last_t;
            out.push(self.transition(key, "firing", t, self.position + 1, values, cohort));
        }
        out
    }

    /// What to publish of `transitions` (this rule's, from [`Self::process`] and
    /// [`Self::tick`]): all of them for a rule without `group_by`; for a grouped rule, see
    /// [`group`]. Cohort alerts are among the returned transitions (with `members`).
    pub fn route(&mut self, transitions: &[Transition]) -> Vec<Transition> {
        if !self.grouped() {
            return transitions.to_vec();
        }
        let mut groups = std::mem::take(&mut self.groups);
        let out = groups.route(self, transitions);
        self.groups = groups;
        out
    }

    /// The tenant of a transition: its value of the tenant column, or the key's part for it
    /// when the tenant is one of the key columns (parts are joined with `/`).
    fn tenant_of(
        &self,
        key: &str,
        values: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<String> {
        if let Some(v) = values.get(&self.tenant_column) {
            return v.as_str().map(str::to_string);
        }
        let at = self.def.key.iter().position(|k| *k == self.tenant_column)?;
        let parts: Vec<&str> = key.split('/').collect();
        (parts.len() == self.def.key.len()).then(|| parts[at].to_string())
    }

    fn transition(
        &self,
        key: String,
        state: &str,
        event_time: i64,
        stream_seq: i64,
        values: serde_json::Map<String, serde_json::Value>,
        cohort: Option<String>,
    ) -> Transition {
        let tenant = self.tenant_of(&key, &values);
        Transition {
            tenant,
            alert_id: format!(
                "{}-{:016x}",
                self.def.name,
                crate::hash::stable_hash(&[&self.version, &key, state, &event_time.to_string()])
            ),
            rule: self.def.name.clone(),
            rule_version: self.version.clone(),
            severity: self.def.severity.clone(),
            key,
            state: state.to_string(),
            window_start: None,
            window_end: None,
            values,
            event_time,
            stream_seq,
            cohort,
            members: Vec::new(),
            emitted_us: 0,
        }
    }

    fn silence_deadline(&self, s: &Silence) -> i64 {
        s.seen_at
            .saturating_add(s.after)
            .saturating_add(self.def.for_duration)
    }

    pub fn position(&self) -> i64 {
        self.position
    }

    /// Keys currently firing.
    pub fn firing(&self) -> usize {
        self.keys
            .values()
            .filter(|k| k.phase == Phase::Firing)
            .count()
    }

    /// Runs the rule's query over rows of its input table (stream order; rows at or below the
    /// position are skipped) and returns the transitions, in stream order.
    pub async fn process(
        &mut self,
        rows: &RecordBatch,
        references: &[(TableId, Arc<dyn TableProvider>)],
    ) -> Result<Vec<Transition>> {
        let rows = if rows.schema() == self.input_schema {
            rows.clone()
        } else {
            crate::pipeline::run::conform(&self.input_schema, std::slice::from_ref(rows))?
        };
        let planned = match &self.planned {
            Some((refs, plan)) if crate::prepared::same_tables(refs, references) => plan.clone(),
            // Planned once, and again when a reference table changed; each micro-batch's rows
            // then take the place of the input's empty scan, without planning the SQL again.
            _ => {
                let (_, plan) = plan_over(
                    &*rule_query(&self.def)?,
                    &self.input,
                    &self.input_schema,
                    Vec::new(),
                    references,
                )
                .await
                .map_err(Error::Execution)?;
                self.planned = Some((references.to_vec(), plan.clone()));
                plan
            }
        };
        let plan = crate::prepared::with_rows(&planned, &self.input_schema, rows)?;
        let schema = plan.schema();
        let batches = datafusion::physical_plan::collect(
            plan,
            datafusion::prelude::SessionContext::new().task_ctx(),
        )
        .await
        .map_err(Error::Execution)?;
        let out = arrow::compute::concat_batches(&schema, &batches).map_err(internal)?;
        self.apply(&out)
    }

    fn apply(&mut self, out: &RecordBatch) -> Result<Vec<Transition>> {
        let out = &crate::window::in_stream_order(out, RULE_SEQ)?;
        let column = |name: &str| {
            out.column_by_name(name)
                .ok_or_else(|| internal(format!("rule {} returns no {name}", self.def.name)))
        };
        let seqs = column(RULE_SEQ)?.as_primitive::<Int64Type>().clone();
        let times = cast(
            column(&self.def.event_time)?,
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )
        .map_err(internal)?;
        let times = times.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        // A silence rule says per row how long its key may then stay silent.
        let silent_after = match out.column_by_name(SILENT_AFTER) {
            Some(c) => Some(
                cast(c, &DataType::Float64)
                    .map_err(internal)?
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .clone(),
            ),
            None => None,
        };
        let firing = match &silent_after {
            Some(_) => None,
            None => Some(column(FIRING)?.as_boolean().clone()),
        };
        let resolved = out.column_by_name(RESOLVED).map(|c| c.as_boolean().clone());
        let window = |name: &str| {
            out.column_by_name(name).and_then(|c| {
                cast(c, &DataType::Timestamp(TimeUnit::Microsecond, None))
                    .ok()
                    .map(|c| {
                        c.as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                            .clone()
                    })
            })
        };
        let (wstart, wend) = (window(WINDOW_START), window(WINDOW_END));
        let options = FormatOptions::default();
        let formatters = |names: &[String]| {
            names
                .iter()
                .map(|k| ArrayFormatter::try_new(column(k)?.as_ref(), &options).map_err(internal))
                .collect::<Result<Vec<_>>>()
        };
        let key_formatters = formatters(&self.def.key)?;
        let cohort_formatters = formatters(&self.def.group_by)?;
        let joined = |fs: &[ArrayFormatter], i: usize| {
            fs.iter()
                .map(|f| f.value(i).to_string())
                .collect::<Vec<_>>()
                .join("/")
        };
        let key_columns = self.def.key.clone();
        let values_of = |i: usize| {
            let mut values = serde_json::Map::new();
            for (f, c) in out.schema().fields().iter().zip(out.columns()) {
                let name = f.name().as_str();
                if name == RULE_SEQ || key_columns.iter().any(|k| k == name) {
                    continue;
                }
                values.insert(name.to_string(), json_value(c.as_ref(), i));
            }
            values
        };
        let mut order: Vec<usize> = (0..out.num_rows()).collect();
        order.sort_by_key(|i| seqs.value(*i));
        let mut transitions = Vec::new();
        for i in order {
            let seq = seqs.value(i);
            if seq <= self.position || times.is_null(i) {
                continue;
            }
            let t = times.value(i);
            let key = joined(&key_formatters, i);
            let cohort = (!cohort_formatters.is_empty()).then(|| joined(&cohort_formatters, i));
            if let Some(after) = &silent_after {
                let after = (after.is_valid(i) && after.value(i) > 0.0)
                    .then(|| (after.value(i) * 1e6).min(i64::MAX as f64) as i64);
                transitions.extend(self.heard_from(key, t, seq, after, values_of(i), cohort));
                continue;
            }
            let firing = firing.as_ref().expect("a condition rule");
            let fires = firing.is_valid(i) && firing.value(i);
            let resolves = match &resolved {
                Some(r) => r.is_valid(i) && r.value(i),
                None => !fires,
            };
            let state = self.keys.entry(key.clone()).or_insert(KeyState {
                phase: Phase::Ok,
                last_t: i64::MIN,
                last_fired: None,
                fired_cohort: None,
                silence: None,
            });
            if t < state.last_t {
                self.out_of_order += 1;
                continue;
            }
            state.last_t = t;
            let (for_duration, cool_down) = (self.def.for_duration, self.def.cool_down);
            let fired = match state.phase {
                Phase::Firing => {
                    if resolves {
                        state.phase = Phase::Ok;
                        Some("resolved")
                    } else {
                        None
                    }
                }
                Phase::Ok | Phase::Pending { .. } if !fires => {
                    state.phase = Phase::Ok;
                    None
                }
                Phase::Ok | Phase::Pending { .. } => {
                    let since = match state.phase {
                        Phase::Pending { since } => since,
                        _ => t,
                    };
                    let cooled = state
                        .last_fired
                        .is_none_or(|f| t.saturating_sub(f) >= cool_down);
                    if t.saturating_sub(since) >= for_duration && cooled {
                        state.phase = Phase::Firing;
                        state.last_fired = Some(t);
                        Some("firing")
                    } else {
                        state.phase = Phase::Pending { since };
                        None
                    }
                }
            };
            let Some(new_state) = fired else { continue };
            let cohort = if new_state == "firing" {
                state.fired_cohort = cohort.clone();
                cohort
            } else {
                state.fired_cohort.take().or(cohort)
            };
            let mut transition = self.transition(key, new_state, t, seq, values_of(i), cohort);
            transition.window_start = wstart
                .as_ref()
                .filter(|w| w.is_valid(i))
                .map(|w| w.value(i));
            transition.window_end = wend.as_ref().filter(|w| w.is_valid(i)).map(|w| w.value(i));
            transitions.push(transition);
        }
        if let Some(max) = (0..seqs.len()).map(|i| seqs.value(i)).max() {
            self.position = self.position.max(max);
        }
        Ok(transitions)
    }

    /// A silence rule's row for `key`: the key was heard from now (observed time), so a firing
    /// key resolves, and it may stay silent for `after` µs (the row's `silent_after_s`; NULL
    /// keeps the key's previous one, and a key that never had one is not watched). A row older
    /// than the key's newest still counts as heard from, but its values are not kept.
    fn heard_from(
        &mut self,
        key: String,
        t: i64,
        seq: i64,
        after: Option<i64>,
        values: serde_json::Map<String, serde_json::Value>,
        cohort: Option<String>,
    ) -> Option<Transition> {
        let clock = self.clock;
        let state = self.keys.entry(key.clone()).or_insert(KeyState {
            phase: Phase::Ok,
            last_t: i64::MIN,
            last_fired: None,
            fired_cohort: None,
            silence: None,
        });
        let newer = t >= state.last_t;
        if !newer {
            self.out_of_order += 1;
        }
        state.last_t = state.last_t.max(t);
        let resolves = state.phase == Phase::Firing;
        state.phase = Phase::Ok;
        let previous = state.silence.take();
        let after = after.or(previous.as_ref().map(|p| p.after));
        let (kept_values, kept_cohort) = match &previous {
            Some(p) if !newer => (p.values.clone(), p.cohort.clone()),
            _ => (values.clone(), cohort.clone()),
        };
        if let Some(p) = &previous {
            self.deadlines.remove(&(p.due, key.clone()));
        }
        let fired_cohort = if resolves {
            self.keys.get_mut(&key).and_then(|k| k.fired_cohort.take())
        } else {
            None
        };
        if let Some(after) = after {
            let mut s = Silence {
                seen_at: clock,
                after,
                values: kept_values,
                cohort: kept_cohort,
                due: 0,
            };
            s.due = self.silence_deadline(&s);
            self.deadlines.insert((s.due, key.clone()));
            self.keys.get_mut(&key).expect("inserted").silence = Some(s);
        }
        resolves.then(|| self.transition(key, "resolved", t, seq, values, fired_cohort.or(cohort)))
    }

    /// Applies a silence rule's transition that `final.alerts` recorded after the rule's
    /// snapshot (on a restart): firings are detected between rows, so replaying the rows does not
    /// give them again, and without this the key would fire a second time. Keys the rule does
    /// not watch (a cohort alert's key) are left alone.
    pub fn recorded(&mut self, key: &str, state: &str) {
        let clock = self.clock;
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        let Some(silence) = &mut k.silence else {
            return;
        };
        match state {
            "firing" => {
                k.phase = Phase::Firing;
                k.last_fired = Some(clock);
                k.fired_cohort = silence.cohort.clone();
                self.deadlines.remove(&(silence.due, key.to_string()));
            }
            _ => k.phase = Phase::Ok,
        }
    }

    /// Marks everything up to `position` as seen (after a rebuild that had no rows to read).
    pub fn advance(&mut self, position: i64) {
        self.position = self.position.max(position);
    }

    /// The per-key state as bytes (JSON).
    pub fn encode(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct SnapshotRef<'a> {
            version: &'a str,
            position: i64,
            keys: &'a BTreeMap<String, KeyState>,
            clock: i64,
            groups: &'a group::Grouper,
        }
        serde_json::to_vec(&SnapshotRef {
            version: &self.version,
            position: self.position,
            keys: &self.keys,
            clock: self.clock,
            groups: &self.groups,
        })
        .expect("serializable")
    }

    /// Restores [`Self::encode`]'s bytes; `false` (state untouched) when they belong to another
    /// version of the rule.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<bool> {
        let s: Snapshot = serde_json::from_slice(bytes).map_err(internal)?;
        if s.version != self.version {
            return Ok(false);
        }
        self.position = s.position;
        self.keys = s.keys;
        self.clock = s.clock;
        self.groups = s.groups;
        self.deadlines = self
            .keys
            .iter()
            .filter(|(_, k)| k.phase != Phase::Firing)
            .filter_map(|(key, k)| {
                let s = k.silence.as_ref()?;
                Some((s.due, key.clone()))
            })
            .collect();
        Ok(true)
    }
}

/// One value of an alert's `values`: integers as JSON integers (exact, also beyond 2^53, where a
/// double would round), floats as numbers (NULL for NaN and infinities), the rest as text.
fn json_value(c: &dyn Array, i: usize) -> serde_json::Value {
    use serde_json::Value;
    if c.is_null(i) {
        return Value::Null;
    }
    match c.data_type() {
        DataType::Boolean => Value::Bool(c.as_boolean().value(i)),
        t if t.is_signed_integer() => cast(&c.slice(i, 1), &DataType::Int64)
            .ok()
            .map(|v| Value::from(v.as_primitive::<arrow::datatypes::Int64Type>().value(0)))
            .unwrap_or(Value::Null),
        t if t.is_unsigned_integer() => cast(&c.slice(i, 1), &DataType::UInt64)
            .ok()
            .map(|v| Value::from(v.as_primitive::<arrow::datatypes::UInt64Type>().value(0)))
            .unwrap_or(Value::Null),
        t if t.is_floating() => cast(&c.slice(i, 1), &DataType::Float64)
            .ok()
            .and_then(|f| {
                serde_json::Number::from_f64(
                    f.as_primitive::<arrow::datatypes::Float64Type>().value(0),
                )
            })
            .map(Value::Number)
            .unwrap_or(Value::Null),
        _ => ArrayFormatter::try_new(c, &FormatOptions::default())
            .map(|f| Value::String(f.value(i).to_string()))
            .unwrap_or(Value::Null),
    }
}

/// The rule's query with the input's stream sequence added as a hidden column.
fn rule_query(def: &RuleDef) -> Result<Box<datafusion::sql::sqlparser::ast::Query>> {
    let mut query = def.query.clone();
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Err(Error::Plan(format!(
            "rule {}: the query must be a SELECT … FROM a table",
            def.name
        )));
    };
    let qualifier = match select.from.first().map(|t| &t.relation) {
        Some(datafusion::sql::sqlparser::ast::TableFactor::Table { name, alias, .. }) => alias
            .as_ref()
            .map(|a| vec![Ident::new(a.name.value.clone())])
            .unwrap_or_else(|| {
                name.0
                    .iter()
                    .filter_map(|p| p.as_ident().cloned())
                    .collect()
            }),
        _ => {
            return Err(Error::Plan(format!(
                "rule {}: the query must read FROM a usable or final table",
                def.name
            )));
        }
    };
    let mut path = qualifier;
    path.push(Ident::new(PROGRESS_COLUMN));
    select.projection.push(SelectItem::ExprWithAlias {
        expr: Expr::CompoundIdentifier(path),
        alias: Ident::new(RULE_SEQ),
    });
    Ok(query)
}

/// Runs a rule's query over rows of its input.
async fn run_query(
    def: &RuleDef,
    input: &TableId,
    input_schema: &SchemaRef,
    rows: &RecordBatch,
    references: &[(TableId, Arc<dyn TableProvider>)],
) -> Result<RecordBatch> {
    // Rows read back from the lake come with view types; cast them to the input's schema.
    let rows = if rows.schema() == *input_schema {
        rows.clone()
    } else {
        crate::pipeline::run::conform(input_schema, std::slice::from_ref(rows))?
    };
    let (ctx, plan) = plan_over(
        &*rule_query(def)?,
        input,
        input_schema,
        vec![rows],
        references,
    )
    .await
    .map_err(Error::Execution)?;
    let schema = plan.schema();
    let batches = datafusion::physical_plan::collect(plan, ctx.task_ctx())
        .await
        .map_err(Error::Execution)?;
    arrow::compute::concat_batches(&schema, &batches).map_err(internal)
}

/// What a rule watches: a condition over its rows, or its keys' silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// The query returns `firing` (and optionally `resolved`).
    Condition,
    /// The query returns `silent_after_s`.
    Silence,
}

/// Checks a rule against its input's columns: it must return `firing` (boolean) or
/// `silent_after_s` (a number), its key columns, its `group_by` columns and its event time (a
/// timestamp); `resolved`, if returned, must be boolean. Returns which kind of rule it is.
pub async fn check_rule(
    def: &RuleDef,
    input: &TableId,
    input_schema: &SchemaRef,
    references: &[(TableId, Arc<dyn TableProvider>)],
) -> std::result::Result<RuleKind, String> {
    let out = run_query(
        def,
        input,
        input_schema,
        &RecordBatch::new_empty(input_schema.clone()),
        references,
    )
    .await
    .map_err(|e| match e {
        Error::Execution(e) => e.strip_backtrace(),
        other => other.to_string(),
    })?;
    let schema = out.schema();
    let returns = || {
        schema
            .fields()
            .iter()
            .filter(|f| f.name() != RULE_SEQ)
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kind = match (
        schema.field_with_name(FIRING).ok(),
        schema.field_with_name(SILENT_AFTER).ok(),
    ) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "a rule returns either {FIRING} (a condition) or {SILENT_AFTER} (a silence rule), not both"
            ));
        }
        (None, Some(f)) => {
            if !f.data_type().is_numeric() {
                return Err(format!(
                    "{SILENT_AFTER} must be a number of seconds, but it is {}",
                    f.data_type()
                ));
            }
            if schema.field_with_name(RESOLVED).is_ok() {
                return Err(format!(
                    "a silence rule resolves when its key sends a row again; it has no {RESOLVED} column"
                ));
            }
            RuleKind::Silence
        }
        (Some(f), None) if f.data_type() == &DataType::Boolean => RuleKind::Condition,
        (Some(f), None) => {
            return Err(format!(
                "{FIRING} must be a boolean condition, but it is {}",
                f.data_type()
            ));
        }
        (None, None) => {
            return Err(format!(
                "a rule's query returns a boolean {FIRING} column (e.g. temperature_c > 8 AS {FIRING}), or for a silence rule {SILENT_AFTER} (e.g. 300 AS {SILENT_AFTER}); it returns {}",
                returns()
            ));
        }
    };
    if let Ok(f) = schema.field_with_name(RESOLVED)
        && f.data_type() != &DataType::Boolean
    {
        return Err(format!(
            "{RESOLVED} must be a boolean condition, but it is {}",
            f.data_type()
        ));
    }
    if !def.group_by.is_empty() && def.group_by.iter().all(|c| def.key.contains(c)) {
        return Err(format!(
            "group_by ({}) names no column beyond the key ({}): every cohort would be one key and never reach group_min; group by what keys share, e.g. group_by = 'site'",
            def.group_by.join(", "),
            def.key.join(", ")
        ));
    }
    for c in &def.group_by {
        if schema.field_with_name(c).is_err() {
            return Err(format!(
                "group_by column {c} is not returned by the query; it returns {}",
                returns()
            ));
        }
    }
    for k in &def.key {
        if schema.field_with_name(k).is_err() {
            return Err(format!(
                "key column {k} is not returned by the query; it returns {}",
                returns()
            ));
        }
    }
    match schema.field_with_name(&def.event_time) {
        Ok(f) if matches!(f.data_type(), DataType::Timestamp(_, _)) => Ok(kind),
        _ => Err(format!(
            "the rule's event time {} must be a timestamp the query returns (set event_time = '…'); it returns {}",
            def.event_time,
            returns()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::parse_file;
    use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};

    const MIN: i64 = 60_000_000;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("temperature_c", DataType::Float64, true),
            Field::new("stream_seq", DataType::Int64, false),
        ]))
    }

    fn rows(r: &[(i64, &str, i64, f64)]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.1))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(r.iter().map(|x| x.2 * MIN))
                        .with_timezone("UTC"),
                ),
                Arc::new(Float64Array::from_iter_values(r.iter().map(|x| x.3))),
                Arc::new(Int64Array::from_iter_values(r.iter().map(|x| x.0))),
            ],
        )
        .unwrap()
    }

    async fn runner() -> RuleRunner {
        let file = parse_file(
            "CREATE RULE warm WITH (severity = 'critical', key = 'device_id', for = '2m', cool_down = '10m') \
             AS SELECT device_id, ts, temperature_c, temperature_c > 8 AS firing, temperature_c < 6 AS resolved \
             FROM usable.readings",
        )
        .unwrap();
        let def = &file.rules[0];
        let input = TableId::parse("usable.readings").unwrap();
        check_rule(def, &input, &schema(), &[]).await.unwrap();
        RuleRunner::new(def, input, schema())
    }

    fn states(t: &[Transition]) -> Vec<(String, String, i64)> {
        t.iter()
            .map(|t| (t.key.clone(), t.state.clone(), t.event_time / MIN))
            .collect()
    }

    #[tokio::test]
    async fn rules_can_use_the_anomaly_functions() {
        // A device unlike the others in the same micro-batch fires (see crate::anomaly).
        let file = parse_file(
            "CREATE RULE odd_one_out WITH (severity = 'warning', key = 'device_id') \
             AS SELECT device_id, ts, temperature_c, \
             cohort_outlier(temperature_c, 3) OVER () AS firing FROM usable.readings",
        )
        .unwrap();
        let def = &file.rules[0];
        let input = TableId::parse("usable.readings").unwrap();
        check_rule(def, &input, &schema(), &[]).await.unwrap();
        let mut r = RuleRunner::new(def, input, schema());
        let out = r
            .process(
                &rows(&[
                    (1, "a", 0, 5.0),
                    (2, "b", 0, 5.1),
                    (3, "c", 0, 4.9),
                    (4, "d", 0, 5.0),
                    (5, "e", 0, 30.0),
                ]),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(states(&out), vec![("e".into(), "firing".into(), 0)]);
    }

    #[tokio::test]
    async fn for_hysteresis_and_cool_down() {
        let mut r = runner().await;
        let out = r
            .process(
                &rows(&[
                    // a warms for 3 minutes: fires once the condition has held 2 minutes.
                    (1, "a", 0, 9.0),
                    (2, "a", 1, 9.5),
                    (3, "a", 2, 10.0),
                    (4, "a", 3, 10.0),
                    // b blips for one minute: nothing.
                    (5, "b", 0, 12.0),
                    (6, "b", 1, 12.0),
                    (7, "b", 2, 4.0),
                    // a between the thresholds stays firing (hysteresis), then resolves.
                    (8, "a", 4, 7.0),
                    (9, "a", 5, 5.0),
                    // a warms again at once: the cool-down (10 minutes after 00:02) holds it back
                    // until 00:12.
                    (10, "a", 6, 9.0),
                    (11, "a", 9, 9.0),
                    (12, "a", 12, 9.0),
                ]),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            states(&out),
            vec![
                ("a".into(), "firing".into(), 2),
                ("a".into(), "resolved".into(), 5),
                ("a".into(), "firing".into(), 12),
            ]
        );
        assert_eq!(out[0].values["temperature_c"], serde_json::json!(10.0));
        assert_eq!(r.firing(), 1);
    }

    /// A rule joining a reference table, fed one micro-batch at a time: each batch is joined
    /// with the reference rows, not with an earlier batch (the plan is reused across batches).
    #[tokio::test]
    async fn a_rule_joining_a_reference_table_sees_each_batch_once() {
        let file = parse_file(
            "CREATE RULE over WITH (key = 'device_id')
             AS SELECT r.device_id, r.ts, r.temperature_c, l.max_c, r.temperature_c > l.max_c AS firing
             FROM usable.readings r JOIN reference.limits l ON r.device_id = l.device_id",
        )
        .unwrap();
        let def = &file.rules[0];
        let input = TableId::parse("usable.readings").unwrap();
        let limits_schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, true),
            Field::new("max_c", DataType::Float64, true),
        ]));
        let limits = RecordBatch::try_new(
            limits_schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(Float64Array::from(vec![5.0, 50.0])),
            ],
        )
        .unwrap();
        let refs: Vec<(TableId, Arc<dyn TableProvider>)> = vec![(
            TableId::parse("reference.limits").unwrap(),
            Arc::new(
                datafusion::datasource::MemTable::try_new(limits_schema, vec![vec![limits]])
                    .unwrap(),
            ),
        )];
        check_rule(def, &input, &schema(), &refs).await.unwrap();
        let mut r = RuleRunner::new(def, input, schema());
        let mut got = Vec::new();
        for batch in [
            rows(&[(1, "a", 0, 10.0)]),
            rows(&[(2, "b", 0, 10.0)]),
            rows(&[(3, "a", 1, 1.0), (4, "b", 1, 60.0)]),
        ] {
            got.extend(r.process(&batch, &refs).await.unwrap());
        }
        assert_eq!(
            states(&got),
            vec![
                ("a".into(), "firing".into(), 0),
                ("a".into(), "resolved".into(), 1),
                ("b".into(), "firing".into(), 1),
            ]
        );
        assert_eq!(got[2].values["max_c"], serde_json::json!(50.0));
    }

    const SEC: i64 = 1_000_000;

    fn site_rows(r: &[(i64, &str, &str, i64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, true),
            Field::new("site", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("stream_seq", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.1))),
                Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.2))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(r.iter().map(|x| x.3 * SEC))
                        .with_timezone("UTC"),
                ),
                Arc::new(Int64Array::from_iter_values(r.iter().map(|x| x.0))),
            ],
        )
        .unwrap()
    }

    async fn silence_rule(options: &str) -> RuleRunner {
        let file = parse_file(&format!(
            "CREATE RULE quiet WITH (key = 'device_id'{options}) \
             AS SELECT device_id, site, ts, 60 AS silent_after_s FROM usable.sites"
        ))
        .unwrap();
        let def = &file.rules[0];
        let input = TableId::parse("usable.sites").unwrap();
        let schema = site_rows(&[]).schema();
        check_rule(def, &input, &schema, &[]).await.unwrap();
        RuleRunner::new(def, input, schema)
    }

    /// Observes `at` seconds of observed time, runs `rows` (if any) and ticks.
    async fn step(r: &mut RuleRunner, at: i64, rows: &[(i64, &str, &str, i64)]) -> Vec<Transition> {
        r.observe(at * SEC);
        let mut out = Vec::new();
        if !rows.is_empty() {
            out.extend(r.process(&site_rows(rows), &[]).await.unwrap());
        }
        out.extend(r.tick());
        r.route(&out)
    }

    fn seen(t: &[Transition]) -> Vec<(String, String)> {
        t.iter().map(|t| (t.key.clone(), t.state.clone())).collect()
    }

    #[tokio::test]
    async fn a_silent_key_fires_once_after_its_time_and_resolves_with_its_next_row() {
        let mut r = silence_rule("").await;
        assert!(
            step(&mut r, 0, &[(1, "a", "x", 100), (2, "b", "x", 100)])
                .await
                .is_empty()
        );
        assert!(step(&mut r, 30, &[(3, "b", "x", 130)]).await.is_empty());
        assert!(step(&mut r, 59, &[]).await.is_empty());
        let fired = step(&mut r, 60, &[]).await;
        assert_eq!(seen(&fired), vec![("a".into(), "firing".into())]);
        // The event time is the last row's, so a replay gives the same id; detected after seq 3.
        assert_eq!((fired[0].event_time, fired[0].stream_seq), (100 * SEC, 4));
        assert_eq!(fired[0].values["silent_for_s"], serde_json::json!(60.0));
        assert!(step(&mut r, 80, &[]).await.is_empty(), "fires once");
        assert_eq!(
            seen(&step(&mut r, 90, &[]).await),
            vec![("b".into(), "firing".into())]
        );
        let back = step(&mut r, 100, &[(4, "a", "x", 200)]).await;
        assert_eq!(seen(&back), vec![("a".into(), "resolved".into())]);
        assert_eq!(r.firing(), 1);
        // Silent again: fires again, with another id.
        let again = step(&mut r, 160, &[]).await;
        assert_eq!(seen(&again), vec![("a".into(), "firing".into())]);
        assert_ne!(again[0].alert_id, fired[0].alert_id);
    }

    #[tokio::test]
    async fn silence_state_survives_a_snapshot() {
        let mut r = silence_rule(", cool_down = '5m'").await;
        step(&mut r, 0, &[(1, "a", "x", 100), (2, "b", "x", 100)]).await;
        step(&mut r, 50, &[(3, "b", "x", 150)]).await;
        let mut restored = silence_rule(", cool_down = '5m'").await;
        assert!(restored.restore(&r.encode()).unwrap());
        for runner in [&mut r, &mut restored] {
            let fired = step(runner, 61, &[]).await;
            assert_eq!(seen(&fired), vec![("a".into(), "firing".into())]);
            assert_eq!(
                seen(&step(runner, 111, &[]).await),
                vec![("b".into(), "firing".into())]
            );
            // a comes back and goes silent again within its cool-down: held until 61 + 300.
            step(runner, 120, &[(4, "a", "x", 220)]).await;
            assert!(step(runner, 200, &[]).await.is_empty());
            assert_eq!(
                seen(&step(runner, 361, &[]).await),
                vec![("a".into(), "firing".into())]
            );
        }
    }

    /// A key deferred by its cool-down that reports again is not fired by the stale deferral.
    #[tokio::test]
    async fn a_cool_down_deferral_does_not_outlive_the_next_row() {
        let mut r = silence_rule(", cool_down = '5m'").await;
        step(&mut r, 0, &[(1, "a", "x", 100)]).await;
        assert_eq!(
            seen(&step(&mut r, 60, &[]).await),
            vec![("a".into(), "firing".into())]
        );
        step(&mut r, 120, &[(2, "a", "x", 220)]).await;
        // Silent again at 180, held by the cool-down until 360; it reports at 330.
        assert!(step(&mut r, 180, &[]).await.is_empty());
        step(&mut r, 330, &[(3, "a", "x", 430)]).await;
        assert!(
            step(&mut r, 361, &[]).await.is_empty(),
            "heard from 31 s ago"
        );
        assert_eq!(
            seen(&step(&mut r, 390, &[]).await),
            vec![("a".into(), "firing".into())]
        );
    }

    /// Keys that come back with other `group_by` values still resolve the cohort they fired in.
    #[tokio::test]
    async fn a_cohort_resolves_when_its_members_come_back_under_another_cohort() {
        let mut r = silence_rule(", group_by = 'site', group_min = 3, group_wait = '0s'").await;
        step(
            &mut r,
            0,
            &[(1, "a", "x", 100), (2, "b", "x", 100), (3, "c", "x", 100)],
        )
        .await;
        assert_eq!(
            seen(&step(&mut r, 60, &[]).await),
            vec![("x".into(), "firing".into())]
        );
        let back = step(
            &mut r,
            70,
            &[(4, "a", "y", 200), (5, "b", "y", 200), (6, "c", "y", 200)],
        )
        .await;
        assert_eq!(seen(&back), vec![("x".into(), "resolved".into())]);
    }

    #[tokio::test]
    async fn a_cohort_that_goes_dark_together_is_one_alert() {
        let mut r = silence_rule(", group_by = 'site', group_min = 3, group_wait = '10s'").await;
        let mut rows = Vec::new();
        for i in 0..5 {
            rows.push((i + 1, format!("x{i}"), "x"));
        }
        rows.push((6, "y0".to_string(), "y"));
        let rows: Vec<(i64, &str, &str, i64)> = rows
            .iter()
            .map(|(s, d, site)| (*s, d.as_str(), *site, 100))
            .collect();
        step(&mut r, 0, &rows).await;
        // x4 and y0 keep reporting a little longer.
        step(&mut r, 5, &[(7, "x4", "x", 105), (8, "y0", "y", 105)]).await;
        // Fired at 60 (four of x) and 65 (x4, y0): x's cohort is held from 60 until 70 (x4
        // joins it while held), y's from 65 until 75.
        assert!(step(&mut r, 60, &[]).await.is_empty());
        assert!(step(&mut r, 65, &[]).await.is_empty());
        let cohort = step(&mut r, 70, &[]).await;
        assert_eq!(seen(&cohort), vec![("x".into(), "firing".into())]);
        assert_eq!(cohort[0].members, vec!["x0", "x1", "x2", "x3", "x4"]);
        assert_eq!(cohort[0].values["count"], serde_json::json!(5));
        assert_eq!(cohort[0].values["site"], serde_json::json!("x"));
        // y's cohort has one key: its own alert is published.
        let late = step(&mut r, 75, &[]).await;
        assert_eq!(seen(&late), vec![("y0".into(), "firing".into())]);
        // The site comes back: one resolved alert once every member has.
        let mut back = Vec::new();
        for (i, d) in ["x0", "x1", "x2", "x3", "x4"].iter().enumerate() {
            back.extend(step(&mut r, 80 + i as i64, &[(10 + i as i64, d, "x", 200)]).await);
        }
        assert_eq!(seen(&back), vec![("x".into(), "resolved".into())]);
        assert_eq!(back[0].members.len(), 5);
        assert_eq!(back[0].values["count"], serde_json::json!(5));
    }

    #[tokio::test]
    async fn a_rule_says_firing_or_silent_after_not_both() {
        let file = parse_file(
            "CREATE RULE both WITH (key = 'device_id') \
             AS SELECT device_id, ts, true AS firing, 60 AS silent_after_s FROM usable.readings",
        )
        .unwrap();
        let input = TableId::parse("usable.readings").unwrap();
        let err = check_rule(&file.rules[0], &input, &schema(), &[])
            .await
            .unwrap_err();
        assert!(err.contains("not both"), "{err}");
        let file = parse_file(
            "CREATE RULE g WITH (key = 'device_id', group_by = 'site') \
             AS SELECT device_id, ts, 60 AS silent_after_s FROM usable.readings",
        )
        .unwrap();
        let err = check_rule(&file.rules[0], &input, &schema(), &[])
            .await
            .unwrap_err();
        assert!(err.contains("group_by column site"), "{err}");
        let file = parse_file(
            "CREATE RULE g WITH (key = 'device_id', group_by = 'device_id') \
             AS SELECT device_id, ts, 60 AS silent_after_s FROM usable.readings",
        )
        .unwrap();
        let err = check_rule(&file.rules[0], &input, &schema(), &[])
            .await
            .unwrap_err();
        assert!(err.contains("beyond the key"), "{err}");
        let err = parse_file(
            "CREATE RULE g WITH (key = 'device_id', group_min = 5) \
             AS SELECT device_id, ts, 60 AS silent_after_s FROM usable.readings",
        )
        .unwrap_err();
        assert!(format!("{err}").contains("group_by"), "{err}");
    }

    #[tokio::test]
    async fn same_rows_same_transitions_and_ids_after_restore() {
        let all = rows(&[
            (1, "a", 0, 9.0),
            (2, "a", 1, 9.0),
            (3, "a", 2, 9.0),
            (4, "a", 3, 1.0),
            (5, "a", 0, 20.0), // older than a's newest reading: skipped
        ]);
        let mut whole = runner().await;
        let expected = whole.process(&all, &[]).await.unwrap();
        assert_eq!(expected.len(), 2);
        assert_eq!(whole.out_of_order, 1);

        let mut first = runner().await;
        let mut got = first.process(&all.slice(0, 2), &[]).await.unwrap();
        let mut second = runner().await;
        assert!(second.restore(&first.encode()).unwrap());
        // Re-fed from the start, as after a restart: rows at or below the position are skipped.
        got.extend(second.process(&all, &[]).await.unwrap());
        assert_eq!(got, expected);
    }

    #[test]
    fn integer_values_are_exact_beyond_two_to_the_53() {
        let big = arrow::array::Int64Array::from(vec![9_007_199_254_740_993i64]);
        assert_eq!(
            json_value(&big, 0).to_string(),
            "9007199254740993",
            "not rounded to a double"
        );
        let small = arrow::array::UInt8Array::from(vec![7u8]);
        assert_eq!(json_value(&small, 0), serde_json::json!(7));
        let float = arrow::array::Float64Array::from(vec![2.5, f64::NAN]);
        assert_eq!(json_value(&float, 0), serde_json::json!(2.5));
        assert_eq!(json_value(&float, 1), serde_json::Value::Null);
    }
}
