//! `final.audit`: an append-only record of every token, rule and reference change and every
//! raw-zone read — who (the token's name and id), when, from which address, what.
//!
//! A change or a raw read is recorded before it is made or answered; when the record cannot be
//! written, the request is refused (503) and nothing happens. Only admins may read the table.

use std::net::SocketAddr;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use fleetlake_zones::Lake;
use fleetlake_zones::lake::TableWriter;

use crate::api::auth::Principal;

pub use crate::api::auth::audit_table;
use crate::error::Error;

/// `at` (UTC µs), `actor`, `token_id`, `role`, `address`, `action`, `target`, `detail`, and
/// `audit_seq` (strictly increasing; the table's progress column).
pub fn audit_schema() -> SchemaRef {
    let s = |name: &str| Field::new(name, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        s("actor"),
        s("token_id"),
        s("role"),
        s("address"),
        s("action"),
        s("target"),
        s("detail"),
        Field::new("audit_seq", DataType::Int64, false),
    ]))
}

/// The longest `detail` kept (a query's SQL, a rule's text): longer ones are cut, marked `…`.
const MAX_DETAIL_CHARS: usize = 4000;

/// The audit table's writer.
pub struct Audit {
    lake: Lake,
    app_id: String,
    state: tokio::sync::Mutex<(Option<TableWriter>, i64)>,
}

/// One audited action.
pub struct Event<'a> {
    pub principal: &'a Principal,
    pub address: Option<SocketAddr>,
    /// `token.create`, `token.revoke`, `rule.put`, `rule.delete`, `reference.replace`,
    /// `raw.read`.
    pub action: &'a str,
    /// What it acted on: a token id, a rule, a table.
    pub target: &'a str,
    pub detail: &'a str,
}

impl Audit {
    /// `app_id` is the Delta transaction id the writer records its progress under.
    pub fn new(lake: Lake, app_id: &str) -> Self {
        Self {
            lake,
            app_id: format!("{app_id}-audit"),
            state: tokio::sync::Mutex::new((None, 0)),
        }
    }

    /// Appends one row, committed before this returns. Errors: the lake cannot be written.
    pub async fn record(&self, event: Event<'_>) -> Result<(), Error> {
        let mut state = self.state.lock().await;
        if state.0.is_none() {
            let writer = self
                .lake
                .writer(audit_table(), audit_schema(), Vec::new(), &self.app_id)
                .await
                .map_err(|e| Error::from(e).context(format!("opening {}", audit_table())))?;
            state.1 = writer.committed().unwrap_or(0);
            state.0 = Some(writer);
        }
        let now = chrono::Utc::now().timestamp_micros();
        let seq = now.max(state.1 + 1);
        let detail: String = if event.detail.chars().count() > MAX_DETAIL_CHARS {
            let mut cut: String = event.detail.chars().take(MAX_DETAIL_CHARS).collect();
            cut.push('…');
            cut
        } else {
            event.detail.to_string()
        };
        let text = |v: &str| Arc::new(StringArray::from(vec![Some(v.to_string())]));
        let batch = RecordBatch::try_new(
            audit_schema(),
            vec![
                Arc::new(TimestampMicrosecondArray::from(vec![now]).with_timezone("UTC")),
                text(&event.principal.name),
                text(&event.principal.id),
                text(event.principal.role.as_str()),
                Arc::new(StringArray::from(vec![
                    event.address.map(|a| a.ip().to_string()),
                ])),
                text(event.action),
                text(event.target),
                text(&detail),
                Arc::new(Int64Array::from(vec![seq])),
            ],
        )
        .map_err(|e| Error::Bug(format!("building the audit row: {e}")))?;
        let writer = state.0.as_mut().expect("opened");
        if let Err(e) = writer.commit(&batch, "audit_seq", seq).await {
            // The outcome is unknown: open the table again next time.
            state.0 = None;
            return Err(Error::from(e).context(format!("writing {}", audit_table())));
        }
        state.1 = seq;
        Ok(())
    }
}
