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
//! Hysteresis: a firing key resolves on the `resolved` column (e.g. `temperature_c < 6` for a rule
//! that fires above 8), or when `firing` turns false if the query has no `resolved` column.
//! Everything is event time, so replaying the same rows gives the same transitions with the same
//! ids — which is what lets JetStream drop an alert republished after a crash.

use std::collections::BTreeMap;
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

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// The version of a rule: a hash of its definition (the query as normalized SQL, so where it is
/// written and its spacing do not matter), so a change is a new version.
pub fn rule_version(def: &RuleDef) -> String {
    let text = format!(
        "{}|{}|{:?}|{}|{}|{}|{}",
        def.name, def.severity, def.key, def.for_duration, def.cool_down, def.event_time, def.query
    );
    format!("{:016x}", crate::hash::stable_hash(&[&text]))
}

/// A firing or resolved alert for one key.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// The message the row came from.
    pub stream_seq: i64,
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
    last_fired: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: String,
    position: i64,
    keys: BTreeMap<String, KeyState>,
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
}

impl RuleRunner {
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
        }
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
        let firing = column(FIRING)?.as_boolean().clone();
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
        let key_formatters = self
            .def
            .key
            .iter()
            .map(|k| ArrayFormatter::try_new(column(k)?.as_ref(), &options).map_err(internal))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..out.num_rows()).collect();
        order.sort_by_key(|i| seqs.value(*i));
        let mut transitions = Vec::new();
        for i in order {
            let seq = seqs.value(i);
            if seq <= self.position || times.is_null(i) {
                continue;
            }
            let t = times.value(i);
            let key = key_formatters
                .iter()
                .map(|f| f.value(i).to_string())
                .collect::<Vec<_>>()
                .join("/");
            let fires = firing.is_valid(i) && firing.value(i);
            let resolves = match &resolved {
                Some(r) => r.is_valid(i) && r.value(i),
                None => !fires,
            };
            let state = self.keys.entry(key.clone()).or_insert(KeyState {
                phase: Phase::Ok,
                last_t: i64::MIN,
                last_fired: None,
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
            let mut values = serde_json::Map::new();
            for (f, c) in out.schema().fields().iter().zip(out.columns()) {
                let name = f.name().as_str();
                if name == RULE_SEQ || self.def.key.iter().any(|k| k == name) {
                    continue;
                }
                values.insert(name.to_string(), json_value(c.as_ref(), i));
            }
            let alert_id = format!(
                "{}-{:016x}",
                self.def.name,
                crate::hash::stable_hash(&[&self.version, &key, new_state, &t.to_string()])
            );
            transitions.push(Transition {
                alert_id,
                rule: self.def.name.clone(),
                rule_version: self.version.clone(),
                severity: self.def.severity.clone(),
                key,
                state: new_state.to_string(),
                window_start: wstart
                    .as_ref()
                    .filter(|w| w.is_valid(i))
                    .map(|w| w.value(i)),
                window_end: wend.as_ref().filter(|w| w.is_valid(i)).map(|w| w.value(i)),
                values,
                event_time: t,
                stream_seq: seq,
            });
        }
        if let Some(max) = (0..seqs.len()).map(|i| seqs.value(i)).max() {
            self.position = self.position.max(max);
        }
        Ok(transitions)
    }

    /// Marks everything up to `position` as seen (after a rebuild that had no rows to read).
    pub fn advance(&mut self, position: i64) {
        self.position = self.position.max(position);
    }

    /// The per-key state as bytes (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&Snapshot {
            version: self.version.clone(),
            position: self.position,
            keys: self.keys.clone(),
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
        Ok(true)
    }
}

fn json_value(c: &dyn Array, i: usize) -> serde_json::Value {
    use serde_json::Value;
    if c.is_null(i) {
        return Value::Null;
    }
    match c.data_type() {
        DataType::Boolean => Value::Bool(c.as_boolean().value(i)),
        t if t.is_integer() || t.is_floating() => cast(&c.slice(i, 1), &DataType::Float64)
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

/// Checks a rule against its input's columns: it must return `firing` (boolean), its key
/// columns and its event time (a timestamp); `resolved`, if returned, must be boolean.
pub async fn check_rule(
    def: &RuleDef,
    input: &TableId,
    input_schema: &SchemaRef,
    references: &[(TableId, Arc<dyn TableProvider>)],
) -> std::result::Result<(), String> {
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
    match schema.field_with_name(FIRING) {
        Ok(f) if f.data_type() == &DataType::Boolean => {}
        Ok(f) => {
            return Err(format!(
                "{FIRING} must be a boolean condition, but it is {}",
                f.data_type()
            ));
        }
        Err(_) => {
            return Err(format!(
                "a rule's query returns a boolean {FIRING} column (e.g. temperature_c > 8 AS {FIRING}); it returns {}",
                returns()
            ));
        }
    }
    if let Ok(f) = schema.field_with_name(RESOLVED)
        && f.data_type() != &DataType::Boolean
    {
        return Err(format!(
            "{RESOLVED} must be a boolean condition, but it is {}",
            f.data_type()
        ));
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
        Ok(f) if matches!(f.data_type(), DataType::Timestamp(_, _)) => Ok(()),
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
}
