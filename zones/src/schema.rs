//! The zones and the schemas of the tables fleetlake writes itself.
//!
//! Delta has no unsigned integers and stores timestamps as microseconds in UTC, so stream
//! sequences are `Int64` and times are `Timestamp(Microsecond, "UTC")`.

use std::fmt;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BinaryArray, Date32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// A zone of the lakehouse (see DESIGN.md, "The zones").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Zone {
    Raw,
    Usable,
    Final,
    Reference,
}

impl Zone {
    pub const ALL: [Zone; 4] = [Zone::Raw, Zone::Usable, Zone::Final, Zone::Reference];

    pub fn as_str(self) -> &'static str {
        match self {
            Zone::Raw => "raw",
            Zone::Usable => "usable",
            Zone::Final => "final",
            Zone::Reference => "reference",
        }
    }

    pub fn parse(s: &str) -> Option<Zone> {
        Zone::ALL.into_iter().find(|z| z.as_str() == s)
    }
}

/// A table of the lake: `<zone>.<name>`, stored at `<lake>/<zone>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId {
    pub zone: Zone,
    pub name: String,
}

impl TableId {
    pub fn new(zone: Zone, name: impl Into<String>) -> Self {
        Self {
            zone,
            name: name.into(),
        }
    }

    /// `raw.telemetry`: every message as received.
    pub fn raw_telemetry() -> Self {
        Self::new(Zone::Raw, "telemetry")
    }

    /// `raw.quarantine`: messages that could not be decoded, with the reason.
    pub fn raw_quarantine() -> Self {
        Self::new(Zone::Raw, "quarantine")
    }

    /// `usable.telemetry`: decoded, typed telemetry rows.
    pub fn usable_telemetry() -> Self {
        Self::new(Zone::Usable, "telemetry")
    }

    /// Parses `zone.table`.
    pub fn parse(s: &str) -> crate::Result<Self> {
        let (zone, name) = s
            .split_once('.')
            .ok_or_else(|| crate::Error::UnknownTable(s.to_string()))?;
        let zone = Zone::parse(zone).ok_or_else(|| crate::Error::UnknownTable(s.to_string()))?;
        let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(crate::Error::UnknownTable(s.to_string()));
        }
        Ok(Self::new(zone, name))
    }

    /// The table's folder below the lake root.
    pub fn path(&self) -> String {
        format!("{}/{}", self.zone.as_str(), self.name)
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.zone.as_str(), self.name)
    }
}

/// Timestamp type used in every table: microseconds, UTC (Delta's `timestamp`).
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Columns shared by every table derived from a message: where it came from in the stream.
fn origin_fields() -> Vec<Field> {
    vec![
        Field::new("subject", DataType::Utf8, false),
        Field::new("stream_seq", DataType::Int64, false),
        Field::new("msg_id", DataType::Utf8, true),
        Field::new("received_at", timestamp_type(), false),
    ]
}

/// `raw.telemetry`: payload bytes, subject, stream sequence, `Nats-Msg-Id`, received time,
/// partitioned by `ingest_date` (the UTC date of `received_at`).
pub static RAW_TELEMETRY: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![Field::new("payload", DataType::Binary, false)];
    fields.extend(origin_fields());
    fields.push(Field::new("ingest_date", DataType::Date32, false));
    Arc::new(Schema::new(fields))
});

/// `raw.quarantine`: the raw columns plus the readable reason the message was refused, and
/// the reason's kind (the reason without the values it quotes, for `GROUP BY`; last: added after
/// the table existed, so an older table gains it, nullable).
pub static RAW_QUARANTINE: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![Field::new("payload", DataType::Binary, false)];
    fields.extend(origin_fields());
    fields.push(Field::new("reason", DataType::Utf8, false));
    fields.push(Field::new("ingest_date", DataType::Date32, false));
    fields.push(Field::new("reason_kind", DataType::Utf8, true));
    Arc::new(Schema::new(fields))
});

/// `usable.telemetry`: the default envelope, typed, partitioned by `event_date` (UTC date of `ts`).
pub static USABLE_TELEMETRY: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("ts", timestamp_type(), false),
        Field::new("fw", DataType::Utf8, true),
        Field::new("hw", DataType::Utf8, true),
        Field::new("temperature", DataType::Float64, true),
        Field::new("humidity", DataType::Float64, true),
        Field::new("battery", DataType::Float64, true),
    ];
    fields.extend(origin_fields());
    fields.push(Field::new("event_date", DataType::Date32, false));
    Arc::new(Schema::new(fields))
});

/// One message as the ingest stage received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub payload: Vec<u8>,
    pub subject: String,
    pub stream_seq: i64,
    pub msg_id: Option<String>,
    /// Received time, microseconds since the epoch (UTC).
    pub received_at_us: i64,
}

/// Builds a `raw.telemetry` batch from received messages.
pub fn raw_batch(messages: &[RawMessage]) -> RecordBatch {
    let day = |us: i64| us.div_euclid(86_400_000_000) as i32;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(BinaryArray::from_iter_values(
            messages.iter().map(|m| m.payload.as_slice()),
        )),
        Arc::new(StringArray::from_iter_values(
            messages.iter().map(|m| m.subject.as_str()),
        )),
        Arc::new(Int64Array::from_iter_values(
            messages.iter().map(|m| m.stream_seq),
        )),
        Arc::new(StringArray::from_iter(
            messages.iter().map(|m| m.msg_id.as_deref()),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(messages.iter().map(|m| m.received_at_us))
                .with_timezone("UTC"),
        ),
        Arc::new(Date32Array::from_iter_values(
            messages.iter().map(|m| day(m.received_at_us)),
        )),
    ];
    RecordBatch::try_new(RAW_TELEMETRY.clone(), columns).expect("columns match RAW_TELEMETRY")
}

/// A batch with the columns of `raw.telemetry` (by name, cast to its types), e.g. the answer of a
/// query over the raw zone, which may use view types.
pub fn as_raw_batch(batch: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    let columns = RAW_TELEMETRY
        .fields()
        .iter()
        .map(|f| {
            let c = batch.column_by_name(f.name()).ok_or_else(|| {
                arrow::error::ArrowError::SchemaError(format!("raw rows lack {}", f.name()))
            })?;
            arrow::compute::cast(c, f.data_type())
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(RAW_TELEMETRY.clone(), columns)
}

/// The built-in tables: identifier, schema and partition columns.
pub fn builtin_tables() -> Vec<(TableId, SchemaRef, Vec<&'static str>)> {
    vec![
        (
            TableId::raw_telemetry(),
            RAW_TELEMETRY.clone(),
            vec!["ingest_date"],
        ),
        (
            TableId::raw_quarantine(),
            RAW_QUARANTINE.clone(),
            vec!["ingest_date"],
        ),
        (
            TableId::usable_telemetry(),
            USABLE_TELEMETRY.clone(),
            vec!["event_date"],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_ids_parse_and_refuse() {
        assert_eq!(
            TableId::parse("usable.telemetry").unwrap(),
            TableId::usable_telemetry()
        );
        for bad in ["telemetry", "gold.telemetry", "raw.", "raw.a/b", "raw.../x"] {
            let err = TableId::parse(bad).unwrap_err().to_string();
            assert!(err.contains("expected <zone>.<table>"), "{bad}: {err}");
        }
    }
}
