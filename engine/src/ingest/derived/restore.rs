//! Bringing windows and rules up to their tables' positions: a new window table backfilled from
//! its input's committed rows, the transitions final.alerts recorded since a snapshot, and the
//! writers of final.alerts.

use super::*;
use fleetlake_sql::restore::Committed;

/// Stream sequences read from the input table per step of a backfill.
pub(super) const BACKFILL_CHUNK: i64 = 200_000;

/// Fills a new window table from what its input table already holds (rather than from the
/// stream, which may have dropped it): [`derive_window`] up to `upto`, then one commit of the
/// windows that closed, recorded as progress `upto`.
pub(super) async fn backfill(
    lake: &Lake,
    op: &mut WindowOperator,
    writer: &mut TableWriter,
    upto: i64,
    references: &[(TableId, Arc<dyn TableProvider>)],
    partition: Option<Partition>,
) -> Result<(), OpenError> {
    let table = op.def.table.clone();
    tracing::info!(%table, input = %op.input, upto, "backfilling a new window table from its input");
    let closed = derive_window(lake, op, upto, references, partition, |done, rows| {
        tracing::info!(%table, stream_seq = done, of = upto, rows, "backfilling");
    })
    .await?;
    writer
        .commit(&closed, "stream_seq", upto)
        .await
        .map_err(|e| OpenError::Storage(format!("committing the backfill of {table}: {e}")))?;
    tracing::info!(%table, windows = closed.num_rows(), open = op.open_groups(), "backfilled");
    Ok(())
}

/// Runs a window over every committed row of its input up to stream sequence `upto`, in stream
/// order and in steps (`progress(stream_seq, rows)` after each): the rows of the windows that
/// closed. `op` then holds the windows still open.
pub(crate) async fn derive_window(
    lake: &Lake,
    op: &mut WindowOperator,
    upto: i64,
    references: &[(TableId, Arc<dyn TableProvider>)],
    partition: Option<Partition>,
    mut progress: impl FnMut(i64, usize),
) -> Result<RecordBatch, OpenError> {
    let table = op.def.table.clone();
    let mut closed = Vec::new();
    let (mut from, mut rows) = (op.position(), 0);
    while from < upto {
        let to = from.saturating_add(BACKFILL_CHUNK).min(upto);
        for batch in committed_rows(lake, &op.input, from, to, partition).await? {
            rows += batch.num_rows();
            let out = op.process(&batch, references).await.map_err(|e| {
                OpenError::Invalid(format!("deriving {table} from {}: {e}", op.input))
            })?;
            closed.push(out.rows);
        }
        from = to;
        progress(to, rows);
    }
    arrow::compute::concat_batches(&op.schema, &closed)
        .map_err(|e| OpenError::Invalid(format!("deriving {table}: {e}")))
}

/// The writer of alerts raised between messages (silence rules while the stream is idle): its
/// own application id (`<consumer>-idle`), whose versions count only its commits, so recording
/// them at once never moves the position of the consumer's own commits.
pub(crate) async fn open_idle_alerts(lake: &Lake, consumer: &str) -> Result<TableWriter, Error> {
    open_alerts(lake, &format!("{consumer}-idle")).await
}

pub(super) async fn open_alerts(lake: &Lake, app_id: &str) -> Result<TableWriter, Error> {
    lake.writer(alerts_table(), alerts_schema(), Vec::new(), app_id)
        .await
        .map_err(Error::from)
}

/// Side-file kind of the window snapshots of one consumer.
pub(crate) fn window_kind(app_id: &str) -> String {
    format!("window-{app_id}")
}

pub(super) fn rule_kind(app_id: &str, rule: &str) -> String {
    format!("rule-{app_id}-{rule}")
}

/// The transitions of rule `name` (this version) that final.alerts recorded after stream
/// sequence `after`, in stream order: (key, state).
pub(super) async fn recorded_since(
    lake: &Lake,
    name: &str,
    version: &str,
    after: i64,
    partition: Option<Partition>,
) -> Result<Vec<(String, String)>, Error> {
    let table = alerts_table();
    if !table_exists(lake, &table).await? {
        return Ok(Vec::new());
    }
    let batches = Committed::of(&table)
        .columns(&["key", "state"])
        .range(after, i64::MAX)
        .where_eq("rule", name)
        .where_eq("rule_version", version)
        .then_by("state")
        .partition(partition.map(Into::into))
        .read(&QueryEngine::new(lake.clone()))
        .await
        .context(format!("reading {table} to rebuild rule {name}"))?;
    let mut out = Vec::new();
    for b in &batches {
        let text = |i: usize| {
            arrow::compute::cast(b.column(i), &DataType::Utf8)
                .map(|c| arrow::array::AsArray::as_string::<i32>(&c).clone())
                .map_err(Error::from)
        };
        let (keys, states) = (text(0)?, text(1)?);
        for i in 0..b.num_rows() {
            out.push((keys.value(i).to_string(), states.value(i).to_string()));
        }
    }
    Ok(out)
}

/// Committed rows of `table` with stream sequences in `(after, upto]`, in stream order (only
/// the messages of `partition`, when ingest consumes one).
pub(crate) async fn committed_rows(
    lake: &Lake,
    table: &TableId,
    after: i64,
    upto: i64,
    partition: Option<Partition>,
) -> Result<Vec<RecordBatch>, Error> {
    if upto <= after || !table_exists(lake, table).await? {
        return Ok(Vec::new());
    }
    Committed::of(table)
        .range(after, upto)
        .partition(partition.map(Into::into))
        .read(&QueryEngine::new(lake.clone()))
        .await
        .context(format!("reading {table} to rebuild windows and rules"))
}
