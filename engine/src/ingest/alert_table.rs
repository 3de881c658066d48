//! `final.alerts`, the table every alert transition is recorded in: its name and schema, shared
//! by the rules' stage ([`crate::ingest::derived`]) and Alertmanager delivery
//! ([`crate::ingest::alertmanager`]).

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use fleetlake_zones::{Lake, TableId, Zone};

use crate::error::Error;

/// `final.alerts`: every alert transition.
pub fn alerts_table() -> TableId {
    TableId::new(Zone::Final, "alerts")
}

pub fn alerts_schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("alert_id", DataType::Utf8, true),
        Field::new("rule", DataType::Utf8, true),
        Field::new("rule_version", DataType::Utf8, true),
        Field::new("severity", DataType::Utf8, true),
        Field::new("key", DataType::Utf8, true),
        Field::new("state", DataType::Utf8, true),
        Field::new("window_start", ts(), true),
        Field::new("window_end", ts(), true),
        Field::new("values", DataType::Utf8, true),
        Field::new("event_time", ts(), true),
        Field::new("emit_time", ts(), true),
        Field::new("stream_seq", DataType::Int64, false),
        // Last: added after the table existed (a lake's older table gains it, nullable).
        Field::new("tenant", DataType::Utf8, true),
    ]))
}

/// Whether `table` exists in the lake.
pub async fn table_exists(lake: &Lake, table: &TableId) -> Result<bool, Error> {
    Ok(lake.describe(table).await?.is_some())
}
