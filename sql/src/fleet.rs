//! Fleet analytics as SQL: the statements behind `GET /v1/fleet/outliers` and
//! `GET /v1/fleet/root-cause`. A request is validated into an [`Outliers`] or [`RootCause`] and
//! written as one read-only statement, which the caller runs like any `/v1/query` and returns
//! beside the answer, so an analyst can take it further.
//!
//! Names are quoted identifiers and values quoted literals: nothing a caller sends is pasted
//! into the statement as SQL. Callers check names against the table's columns first
//! ([`Scope::check_columns`]) to give an error that lists what exists.

use std::fmt::Write;

use fleetlake_zones::TableId;

/// Which rows a fleet question reads: a table, its device and event-time columns, equality
/// filters and a time range.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    pub table: TableId,
    pub device_column: String,
    pub time_column: String,
    /// `column IN (values…)`, all of them (AND).
    pub filters: Vec<(String, Vec<String>)>,
    pub range: TimeRange,
}

/// The event-time range: `window` back from `to`; `to` is the newest event time in the
/// selection when not given. With `from`, the window is `from` to `to`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TimeRange {
    /// Microseconds.
    pub window_us: Option<i64>,
    /// RFC 3339 instants, already validated.
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    pub to: Option<chrono::DateTime<chrono::Utc>>,
}

/// How one device's readings in the window become its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    Avg,
    Median,
    Min,
    Max,
    /// The sample standard deviation of a device's readings: a noisy sensor that is right on
    /// average stands out by its spread, not its mean.
    Stddev,
}

impl Stat {
    /// `avg` (`mean`), `median`, `min`, `max` or `stddev`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "avg" | "mean" => Some(Self::Avg),
            "median" => Some(Self::Median),
            "min" => Some(Self::Min),
            "max" => Some(Self::Max),
            "stddev" => Some(Self::Stddev),
            _ => None,
        }
    }

    fn function(self) -> &'static str {
        match self {
            Self::Avg => "avg",
            Self::Median => "median",
            Self::Min => "min",
            Self::Max => "max",
            Self::Stddev => "stddev",
        }
    }
}

/// Devices whose metric deviates from their cohort's.
#[derive(Debug, Clone, PartialEq)]
pub struct Outliers {
    pub scope: Scope,
    /// A numeric column.
    pub metric: String,
    /// Cohort columns; empty = the whole fleet is one cohort.
    pub by: Vec<String>,
    pub stat: Stat,
    /// |robust z| above which a device is an outlier.
    pub threshold: f64,
    /// Cohorts with fewer devices have no outliers (at least 3).
    pub min_cohort: u64,
    /// Every device with its score, not only outliers.
    pub all: bool,
    pub limit: u64,
    pub offset: u64,
}

/// What counts as an event in a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A boolean column is true.
    True(String),
    /// A column is not NULL (e.g. `crash_report`).
    Present(String),
    /// A column, as text, equals a value (`reboot_reason:watchdog`).
    Equals(String, String),
    /// The device had a firing transition of this rule (`final.alerts`, the rule keyed by
    /// device) in the time range.
    Rule(String),
    /// A message of the device was quarantined by this expectation (`raw.quarantine`; the
    /// device is the last token of the message's subject) in the time range.
    Expectation(String),
}

impl Event {
    /// The column of the table the event reads (None for device-level events).
    pub fn column(&self) -> Option<&str> {
        match self {
            Self::True(c) | Self::Present(c) | Self::Equals(c, _) => Some(c),
            Self::Rule(_) | Self::Expectation(_) => None,
        }
    }

    /// A row's event condition, for events read from the table's own rows.
    fn condition(&self) -> Option<String> {
        match self {
            Self::True(c) => Some(format!("COALESCE({}, false)", ident(c))),
            Self::Present(c) => Some(format!("{} IS NOT NULL", ident(c))),
            Self::Equals(c, v) => Some(format!(
                "COALESCE(CAST({} AS VARCHAR) = {}, false)",
                ident(c),
                literal(v)
            )),
            Self::Rule(_) | Self::Expectation(_) => None,
        }
    }

    /// For device-level events: the devices with the event, as `__device`, in `scope`'s range.
    fn devices(&self, scope: &Scope) -> Option<String> {
        let (select, from, mut conditions, time) = match self {
            Self::Rule(rule) => (
                "\"key\"",
                "final.alerts",
                vec![
                    format!("\"rule\" = {}", literal(rule)),
                    "\"state\" = 'firing'".to_string(),
                ],
                "event_time",
            ),
            Self::Expectation(name) => (
                "regexp_replace(\"subject\", '^.*[.]', '')",
                "raw.quarantine",
                vec![format!(
                    "strpos(\"reason\", {}) > 0",
                    literal(&format!("expectation {name} of "))
                )],
                "received_at",
            ),
            _ => return None,
        };
        conditions.extend(scope.range_conditions(&ident(time)));
        Some(format!(
            "SELECT DISTINCT {select} AS __device FROM {from}\n  WHERE {}",
            conditions.join("\n    AND ")
        ))
    }
}

/// Attribute combinations where an event is over-represented.
#[derive(Debug, Clone, PartialEq)]
pub struct RootCause {
    pub scope: Scope,
    pub event: Event,
    /// The attributes combined (e.g. `fw`, `hw_rev`).
    pub dimensions: Vec<String>,
    /// Combinations with fewer devices are left out of the answer (not of the fleet rate).
    pub min_devices: u64,
    pub limit: u64,
    pub offset: u64,
}

/// A quoted SQL identifier (`"name"`, with `"` doubled).
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A quoted SQL string literal (`'value'`, with `'` doubled).
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn timestamp(t: &chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "CAST({} AS TIMESTAMP)",
        literal(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    )
}

impl Scope {
    /// Every column this scope and `more` name that `columns` (the table's) lacks, as an
    /// error listing the table's columns.
    pub fn check_columns<'a>(
        &'a self,
        more: impl IntoIterator<Item = &'a str>,
        columns: &[String],
    ) -> Result<(), String> {
        let named = [self.device_column.as_str(), self.time_column.as_str()]
            .into_iter()
            .chain(self.filters.iter().map(|(c, _)| c.as_str()))
            .chain(more);
        let missing: Vec<&str> = named.filter(|n| !columns.iter().any(|c| c == n)).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} has no column {}; its columns are {}",
                self.table,
                missing
                    .iter()
                    .map(|m| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                columns.join(", ")
            ))
        }
    }

    /// `time > to - window` when the range is a window back from `to` (the newest event time
    /// in `readings` when `to` is not given).
    fn window_condition(&self, time: &str) -> Option<String> {
        let to = match &self.range.to {
            Some(to) => timestamp(to),
            None => "(SELECT max(ts) FROM readings)".to_string(),
        };
        match (self.range.window_us, &self.range.from) {
            (Some(us), None) => Some(format!("{time} > {to} - INTERVAL '{us} microseconds'")),
            _ => None,
        }
    }

    /// The range's conditions on another table's time column (`time`, an identifier): the
    /// same `from`, `to` and window as the rows'.
    fn range_conditions(&self, time: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(from) = &self.range.from {
            out.push(format!("{time} >= {}", timestamp(from)));
        }
        match &self.range.to {
            Some(to) => out.push(format!("{time} <= {}", timestamp(to))),
            None if self.range.window_us.is_some() && self.range.from.is_none() => {
                out.push(format!("{time} <= (SELECT max(ts) FROM readings)"))
            }
            None => {}
        }
        out.extend(self.window_condition(time));
        out
    }

    /// `readings` (device, the given columns as themselves, ts) filtered, then `recent`: the
    /// rows of the time range.
    fn ctes(&self, columns: &[(String, String)], condition: Option<String>) -> String {
        let mut select = format!("{} AS device_id", ident(&self.device_column));
        for (expr, alias) in columns {
            write!(select, ", {expr} AS {}", ident(alias)).expect("string");
        }
        write!(select, ", {} AS ts", ident(&self.time_column)).expect("string");
        let mut conditions: Vec<String> = condition.into_iter().collect();
        conditions.push(format!("{} IS NOT NULL", ident(&self.time_column)));
        for (column, values) in &self.filters {
            let list: Vec<String> = values.iter().map(|v| literal(v)).collect();
            conditions.push(format!(
                "CAST({} AS VARCHAR) IN ({})",
                ident(column),
                list.join(", ")
            ));
        }
        if let Some(from) = &self.range.from {
            conditions.push(format!(
                "{} >= {}",
                ident(&self.time_column),
                timestamp(from)
            ));
        }
        match &self.range.to {
            Some(to) => {
                conditions.push(format!("{} <= {}", ident(&self.time_column), timestamp(to)))
            }
            // A device whose clock runs ahead does not move the window into the future.
            None => conditions.push(format!("{} <= now()", ident(&self.time_column))),
        }
        let recent = match self.window_condition("ts") {
            Some(w) => format!("SELECT * FROM readings WHERE {w}"),
            None => "SELECT * FROM readings".to_string(),
        };
        format!(
            "WITH readings AS (\n  SELECT {select}\n  FROM {}\n  WHERE {}\n),\nrecent AS (\n  {recent}\n)",
            self.table,
            conditions.join("\n    AND ")
        )
    }
}

fn page(sql: &mut String, limit: u64, offset: u64) {
    // One row more than asked: the caller tells whether there is a next page.
    write!(sql, "\nLIMIT {} OFFSET {offset}", limit + 1).expect("string");
}

impl Outliers {
    /// The statement: one row per device (and cohort) with `value`, `readings`, `last_seen`,
    /// `score` (robust z against the cohort), `cohort_size`, `cohort_median` and
    /// `cohort_spread` (1.4826 × MAD: a robust σ), ranked by |score|.
    pub fn sql(&self) -> String {
        let cohort: Vec<String> = self.by.iter().map(|c| ident(c)).collect();
        let columns: Vec<(String, String)> = self
            .by
            .iter()
            .map(|c| (ident(c), c.clone()))
            .chain([(
                format!("CAST({} AS DOUBLE)", ident(&self.metric)),
                "value".to_string(),
            )])
            .collect();
        let mut sql = self.scope.ctes(
            &columns,
            Some(format!("{} IS NOT NULL", ident(&self.metric))),
        );
        let keys = std::iter::once("device_id".to_string())
            .chain(cohort.iter().cloned())
            .collect::<Vec<_>>()
            .join(", ");
        let partition = if cohort.is_empty() {
            String::new()
        } else {
            format!("PARTITION BY {}", cohort.join(", "))
        };
        write!(
            sql,
            ",\ndevices AS (\n  SELECT {keys}, {}(value) AS value, count(*) AS readings, max(ts) AS last_seen\n  FROM recent GROUP BY {keys}\n),\n\
             scored AS (\n  SELECT *,\n    robust_zscore(value) OVER c AS score,\n    count(value) OVER c AS cohort_size,\n    \
             median(value) OVER c AS cohort_median,\n    1.4826 * mad(value) OVER c AS cohort_spread,\n    \
             cohort_outlier(value, {}, {}) OVER c AS outlier\n  FROM devices\n  WINDOW c AS ({partition})\n)\n\
             SELECT {keys}, value, readings, last_seen, score, cohort_size, cohort_median, cohort_spread, outlier\nFROM scored",
            self.stat.function(),
            self.min_cohort,
            self.threshold,
        )
        .expect("string");
        if !self.all {
            sql.push_str("\nWHERE outlier");
        }
        write!(sql, "\nORDER BY abs(score) DESC NULLS LAST, {keys}").expect("string");
        page(&mut sql, self.limit, self.offset);
        sql
    }
}

impl RootCause {
    /// The statement: one row per combination of `dimensions` with `devices`,
    /// `affected_devices` (with at least one event), `events`, `reports`, `device_rate`
    /// (affected / devices), `rate`, `fleet_rate`, `lift` (rate / fleet rate) and `z`: the
    /// two-proportion z-test of the combination's rate against the rest of the fleet's, pooled
    /// (z = (p₁ − p₂) / √(p(1 − p)(1/n₁ + 1/n₂)), p the fleet rate). Ranked by z, so three devices
    /// with two crashes do not outrank three thousand with six hundred.
    ///
    /// `rate` is per report for events read from the table's rows (events / reports, n the
    /// reports): a share of devices with at least one event saturates at 1.0 once events are
    /// common, and then ranks nothing (every combination at rate 1, z undefined). For
    /// device-level events (`rule:`, `expectation:`) there is no count per report, and `rate` is
    /// the share of devices (n the devices). Reports of one device are not independent, so `z`
    /// overstates significance for a fleet whose devices differ much; it ranks, it is not a test.
    ///
    /// The unit is a device in a combination: a device that reported with two firmware versions
    /// in the range counts once in each (the fleet's totals are the sums over combinations), so
    /// every unit is in exactly one combination and "the rest of the fleet" is well defined.
    /// The totals are window sums over the combinations, so the one expensive aggregation (the
    /// distinct devices per combination) is planned once: DataFusion inlines a CTE at every
    /// reference.
    pub fn sql(&self) -> String {
        let dims: Vec<String> = self.dimensions.iter().map(|c| ident(c)).collect();
        let mut columns: Vec<(String, String)> = self
            .dimensions
            .iter()
            .map(|c| (ident(c), c.clone()))
            .collect();
        if let Some(condition) = self.event.condition() {
            columns.push((condition, "hit".to_string()));
        }
        let mut sql = self.scope.ctes(&columns, None);
        // `hits`: the rows of the range, each with whether it is (or its device had) an event.
        // (events, the successes counted, the trials they are counted of)
        let (events, hits, trials) = match self.event.devices(&self.scope) {
            Some(devices) => {
                write!(
                    sql,
                    ",\ndevice_events AS (\n  {devices}\n),\nhits AS (\n  SELECT r.*, e.__device IS NOT NULL AS hit\n  \
                     FROM recent r LEFT JOIN device_events e ON CAST(r.device_id AS VARCHAR) = e.__device\n)"
                )
                .expect("string");
                // A device either had the event or not: no rows to count.
                ("CAST(NULL AS BIGINT)", "affected_devices", "devices")
            }
            None => {
                sql.push_str(",\nhits AS (SELECT * FROM recent)");
                ("sum(CASE WHEN hit THEN 1 ELSE 0 END)", "events", "reports")
            }
        };
        let group = dims.join(", ");
        write!(
            sql,
            ",\ncohorts AS (\n  SELECT {group},\n    count(DISTINCT device_id) AS devices,\n    \
             count(DISTINCT CASE WHEN hit THEN device_id END) AS affected_devices,\n    \
             {events} AS events,\n    count(*) AS reports\n  FROM hits GROUP BY {group}\n),\n\
             fleet AS (\n  SELECT *, {hits} AS __k, {trials} AS __n,\n    \
             sum({hits}) OVER () AS __fleet_k, sum({trials}) OVER () AS __fleet_n\n  FROM cohorts\n),\n\
             rates AS (\n  SELECT *,\n    CAST(affected_devices AS DOUBLE) / devices AS device_rate,\n    \
             CAST(__k AS DOUBLE) / __n AS rate,\n    \
             CAST(__fleet_k AS DOUBLE) / __fleet_n AS fleet_rate\n  FROM fleet\n)\n\
             SELECT {group}, devices, affected_devices, events, reports, device_rate, rate, fleet_rate,\n  \
             CASE WHEN fleet_rate > 0 THEN rate / fleet_rate END AS lift,\n  \
             CASE WHEN __fleet_n > __n AND fleet_rate > 0 AND fleet_rate < 1 THEN\n    \
             (rate - CAST(__fleet_k - __k AS DOUBLE) / (__fleet_n - __n))\n    \
             / sqrt(fleet_rate * (1 - fleet_rate) * (1.0 / __n + 1.0 / (__fleet_n - __n)))\n  END AS z\n\
             FROM rates\nWHERE devices >= {}\nORDER BY z DESC NULLS LAST, {hits} DESC, {group}",
            self.min_devices,
        )
        .expect("string");
        page(&mut sql, self.limit, self.offset);
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope {
            table: TableId::parse("usable.cold_chain").unwrap(),
            device_column: "device_id".into(),
            time_column: "ts".into(),
            filters: vec![("tenant".into(), vec!["o'hara".into(), "acme".into()])],
            range: TimeRange {
                window_us: Some(3_600_000_000),
                ..Default::default()
            },
        }
    }

    #[test]
    fn names_and_values_are_quoted_never_pasted() {
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("o'hara"), "'o''hara'");
        let sql = Outliers {
            scope: scope(),
            metric: "temperature_c".into(),
            by: vec!["model".into(), "hw_rev".into()],
            stat: Stat::Avg,
            threshold: 3.5,
            min_cohort: 5,
            all: false,
            limit: 10,
            offset: 20,
        }
        .sql();
        assert!(
            sql.contains("CAST(\"tenant\" AS VARCHAR) IN ('o''hara', 'acme')"),
            "{sql}"
        );
        assert!(
            sql.contains("WINDOW c AS (PARTITION BY \"model\", \"hw_rev\")"),
            "{sql}"
        );
        assert!(sql.contains("cohort_outlier(value, 5, 3.5)"), "{sql}");
        assert!(sql.ends_with("LIMIT 11 OFFSET 20"), "{sql}");
    }

    #[test]
    fn missing_columns_are_named_with_the_table_s_columns() {
        let columns: Vec<String> = ["device_id", "ts", "tenant"].map(String::from).to_vec();
        assert!(scope().check_columns(["tenant"], &columns).is_ok());
        let err = scope().check_columns(["hw_rev"], &columns).unwrap_err();
        assert!(err.contains("no column \"hw_rev\""), "{err}");
        assert!(err.contains("device_id, ts, tenant"), "{err}");
    }

    /// 300 devices in six fw × hw combinations, 100 reports each; 90% of devices crash at least
    /// once (1–2 crashes), and the planted 2.0.1 × B devices crash in 8% of their reports. A
    /// share of devices with an event is ~1.0 everywhere; the rate per report still finds it.
    #[tokio::test]
    async fn root_cause_ranks_the_planted_combination_first_when_most_devices_have_events() {
        use arrow::array::{BooleanArray, RecordBatch, StringArray, TimestampMicrosecondArray};
        use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
        use datafusion::prelude::SessionContext;
        use std::sync::Arc;

        let combos = [
            ("1.0", "A"),
            ("1.0", "B"),
            ("2.0", "A"),
            ("2.0.1", "A"),
            ("2.0.1", "B"),
            ("2.1", "B"),
        ];
        let (mut device, mut fw, mut hw, mut ts, mut crashed) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut with_events = 0;
        for d in 0..300usize {
            let (f, h) = combos[d % combos.len()];
            let planted = (f, h) == ("2.0.1", "B");
            // Every tenth device of the others never crashes; the rest crash once or twice.
            let crashes = if planted {
                8
            } else if d % 10 == 0 {
                0
            } else {
                1 + d % 2
            };
            with_events += usize::from(crashes > 0);
            for r in 0..100usize {
                device.push(format!("dev-{d}"));
                fw.push(f);
                hw.push(h);
                ts.push(1_763_900_000_000_000 + (r as i64) * 60_000_000);
                crashed.push(r < crashes);
            }
        }
        assert!(with_events * 10 >= 300 * 9, "90% of devices have an event");
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("fw", DataType::Utf8, false),
            Field::new("hw_rev", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("crashed", DataType::Boolean, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(device)),
                Arc::new(StringArray::from(fw)),
                Arc::new(StringArray::from(hw)),
                Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
                Arc::new(BooleanArray::from(crashed)),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        ctx.sql("CREATE SCHEMA usable").await.unwrap();
        let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("usable.device_health", Arc::new(table))
            .unwrap();
        let sql = RootCause {
            scope: Scope {
                table: TableId::parse("usable.device_health").unwrap(),
                device_column: "device_id".into(),
                time_column: "ts".into(),
                filters: vec![],
                range: TimeRange::default(),
            },
            event: Event::True("crashed".into()),
            dimensions: vec!["fw".into(), "hw_rev".into()],
            min_devices: 1,
            limit: 10,
            offset: 0,
        }
        .sql();
        let rows = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&rows)
            .unwrap()
            .to_string();
        let first = &rows[0];
        let col = |name: &str| first.column_by_name(name).unwrap().clone();
        let fw = col("fw");
        let hw = col("hw_rev");
        let fw = fw.as_any().downcast_ref::<StringArray>().unwrap();
        let hw = hw.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!((fw.value(0), hw.value(0)), ("2.0.1", "B"), "{text}");
        let z = col("z");
        let z = z
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .unwrap();
        assert!(
            arrow::array::Array::is_valid(z, 0) && z.value(0) > 3.0,
            "{text}"
        );
        let rate = col("rate");
        let rate = rate
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .unwrap();
        assert!((rate.value(0) - 0.08).abs() < 1e-9, "per report: {text}");
        let device_rate = col("device_rate");
        let device_rate = device_rate
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .unwrap();
        assert_eq!(device_rate.value(0), 1.0, "{text}");
    }
}
