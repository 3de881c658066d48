//! Reading committed rows back, to rebuild state after a start (dedup, device state, windows,
//! rules): a table's rows by stream sequence, optionally only those of one partition of the
//! stream. The SQL is written here, once; callers ask with a [`Committed`] read, by table,
//! range and partition, and never assemble statement text.
//!
//! ```ignore
//! let rows = Committed::of(&TableId::usable_telemetry())
//!     .columns(&["device_id", "seq", "ts"])
//!     .range(since, upto)
//!     .partition(Some(StreamPartition { index: 2, count: 6 }))
//!     .read(&engine)
//!     .await?;
//! ```

use arrow::array::RecordBatch;
use fleetlake_zones::TableId;

use crate::{QueryEngine, Result};

/// One partition of the stream: `index` of `count`, as NATS maps a subject to one
/// (`partition(count)`; [`crate::hash::nats_partition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPartition {
    pub index: u32,
    pub count: u32,
}

/// The column every ingested table records its message's stream sequence in.
pub const STREAM_SEQ: &str = "stream_seq";

/// A read of committed rows (see the module docs): rows of `table` whose stream sequence is in
/// `(after, upto]`, in stream order, with each row's arrival when asked.
#[derive(Debug, Clone)]
pub struct Committed {
    table: TableId,
    columns: Option<Vec<String>>,
    after: i64,
    upto: i64,
    partition: Option<StreamPartition>,
    equal: Vec<(String, String)>,
    then_by: Vec<String>,
    arrival: bool,
}

/// Quotes an identifier for SQL.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a text value for SQL.
fn text(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl Committed {
    /// Every committed row of `table` (narrow it with the other methods).
    pub fn of(table: &TableId) -> Self {
        Self {
            table: table.clone(),
            columns: None,
            // Stream sequences start at 1.
            after: 0,
            upto: i64::MAX,
            partition: None,
            equal: Vec::new(),
            then_by: Vec::new(),
            arrival: false,
        }
    }

    /// Only these columns, in this order (default: all).
    pub fn columns(mut self, columns: &[&str]) -> Self {
        self.columns = Some(columns.iter().map(|c| c.to_string()).collect());
        self
    }

    /// Stream sequences in `(after, upto]`.
    pub fn range(mut self, after: i64, upto: i64) -> Self {
        self.after = after;
        self.upto = upto;
        self
    }

    /// Only rows of messages of `partition` (`None`: the whole stream). For `raw.telemetry` the
    /// row's own subject decides; for any other table, the subject its message has in
    /// `raw.telemetry`.
    pub fn partition(mut self, partition: Option<StreamPartition>) -> Self {
        self.partition = partition;
        self
    }

    /// Only rows whose text `column` equals `value`.
    pub fn where_eq(mut self, column: &str, value: &str) -> Self {
        self.equal.push((column.to_string(), value.to_string()));
        self
    }

    /// Rows of one stream sequence ordered by `column` too.
    pub fn then_by(mut self, column: &str) -> Self {
        self.then_by.push(column.to_string());
        self
    }

    /// Each row with the time its message arrived (`raw.telemetry.received_at`, µs since the
    /// epoch, NULL when raw no longer holds it) as a last BIGINT column `__received_us`.
    pub fn with_arrival(mut self) -> Self {
        self.arrival = true;
        self
    }

    /// The statement the read runs (one place where restore SQL is written).
    pub fn sql(&self) -> String {
        let raw = TableId::raw_telemetry();
        let is_raw = self.table == raw;
        let u = "u";
        let columns = match &self.columns {
            Some(c) => c
                .iter()
                .map(|c| format!("{u}.{}", ident(c)))
                .collect::<Vec<_>>()
                .join(", "),
            None => format!("{u}.*"),
        };
        let seq = format!("{u}.{STREAM_SEQ}");
        let mut conditions = vec![
            format!("{seq} > {}", self.after),
            format!("{seq} <= {}", self.upto),
        ];
        for (column, value) in &self.equal {
            conditions.push(format!("{u}.{} = {}", ident(column), text(value)));
        }
        let range = format!(
            "{STREAM_SEQ} > {} AND {STREAM_SEQ} <= {}",
            self.after, self.upto
        );
        if let Some(p) = self.partition {
            conditions.push(if is_raw {
                format!("nats_partition({u}.subject, {}) = {}", p.count, p.index)
            } else {
                format!(
                    "{seq} IN (SELECT {STREAM_SEQ} FROM {raw} WHERE {range} AND nats_partition(subject, {}) = {})",
                    p.count, p.index
                )
            });
        }
        let (select, from) = if self.arrival {
            (
                format!("{columns}, CAST(r.received_at AS BIGINT) AS __received_us"),
                format!(
                    "{} {u} LEFT JOIN {raw} r ON r.{STREAM_SEQ} = {seq} AND r.{STREAM_SEQ} > {} AND r.{STREAM_SEQ} <= {}",
                    self.table, self.after, self.upto
                ),
            )
        } else {
            (columns, format!("{} {u}", self.table))
        };
        let mut order = vec![seq];
        order.extend(self.then_by.iter().map(|c| format!("{u}.{}", ident(c))));
        format!(
            "SELECT {select} FROM {from} WHERE {} ORDER BY {}",
            conditions.join(" AND "),
            order.join(", ")
        )
    }

    /// Runs the read; no rows when the range is empty.
    pub async fn read(&self, engine: &QueryEngine) -> Result<Vec<RecordBatch>> {
        if self.upto <= self.after {
            return Ok(Vec::new());
        }
        Ok(engine.query(&self.sql()).await?.batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_written_once_with_quoted_names_and_values() {
        let alerts = TableId::parse("final.alerts").unwrap();
        let sql = Committed::of(&alerts)
            .columns(&["key", "state"])
            .range(10, i64::MAX)
            .where_eq("rule", "it's")
            .then_by("state")
            .partition(Some(StreamPartition { index: 1, count: 4 }))
            .sql();
        assert!(sql.contains("u.\"rule\" = 'it''s'"), "{sql}");
        assert!(sql.contains("nats_partition(subject, 4) = 1"), "{sql}");
        assert!(sql.ends_with("ORDER BY u.stream_seq, u.\"state\""), "{sql}");
        let raw = Committed::of(&TableId::raw_telemetry())
            .range(0, 5)
            .partition(Some(StreamPartition { index: 0, count: 2 }))
            .sql();
        assert!(raw.contains("nats_partition(u.subject, 2) = 0"), "{raw}");
        assert!(!raw.contains(" IN (SELECT"), "{raw}");
    }
}
