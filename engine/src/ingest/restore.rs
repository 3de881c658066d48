//! Opening ingest at the lake's position: every table's writer, and the state of the stages
//! (dedup, pipelines, windows, rules, devices) rebuilt as of what the tables committed, from the
//! newest snapshot and the rows committed after it.

use super::*;
use fleetlake_sql::restore::Committed;

/// Opens every table (raw, quarantine, usable, the pipelines', the window tables, final.alerts:
/// the committer's order) and rebuilds the stages' state as of what they committed.
pub(super) async fn open(
    lake: &Lake,
    config: &Config,
    declared: &Declared,
    metrics: &Arc<Metrics>,
    cancel: &CancellationToken,
) -> Result<(Stages, Committer), OpenError> {
    let app_id = config.consumer();
    let mut writers = Vec::new();
    for (id, schema, partitions) in builtin_tables() {
        let partitions = partitions.into_iter().map(String::from).collect();
        writers.push(lake.writer(id, schema, partitions, app_id).await?);
    }
    debug_assert_eq!(writers[RAW].id(), &TableId::raw_telemetry());
    let (mut stage, pipeline_writers) = PipelineStage::open(
        lake,
        &declared.runners,
        app_id,
        config.dedup_max_gaps(),
        config.partition(),
    )
    .await?;
    writers.extend(pipeline_writers);
    let references = stage.refresh_references().await?;
    // What usable.telemetry and the pipelines' tables hold: a new window table is backfilled
    // from it.
    let inputs: Vec<(TableId, i64)> = writers[USABLE..]
        .iter()
        .map(|w| (w.id().clone(), w.committed().unwrap_or(0)))
        .collect();
    let (derived, derived_writers) = DerivedStage::open(
        lake,
        config,
        metrics,
        &declared.windows,
        &declared.rules,
        &references,
        &inputs,
    )
    .await?;
    writers.extend(derived_writers);
    let committer = Committer::new(
        writers,
        metrics.clone(),
        cancel.clone(),
        config.shutdown_grace(),
    );
    // Dedup state as of where the consumer resumes (every table's position), not as of the
    // usable tables': messages after it come again for the tables that are behind (a crash
    // between two tables' commits) and must be judged as they were the first time.
    stage
        .load_dedup(&committer.writers(), committer.resume_at() as i64 - 1)
        .await?;
    let stages = Stages {
        stage,
        derived,
        changes: None,
    };
    Ok((stages, committer))
}

/// Positions of the built-in tables among the committer's writers.
pub(super) const RAW: usize = 0;

pub(super) const USABLE: usize = 2;

/// Side-file kind of the dedup snapshots of one consumer.
pub(super) fn snapshot_kind(consumer: &str) -> String {
    format!("dedup-{consumer}")
}

/// The dedup state as of usable's committed position: the newest snapshot at or below it, plus
/// the usable rows committed after that snapshot.
pub(super) async fn load_dedup(
    config: &Config,
    lake: &Lake,
    committer: &Committer,
) -> Result<DedupState, Error> {
    let usable = committer.writer(USABLE);
    // As of where the consumer resumes (see `open`), not as of usable.telemetry's position.
    let committed = committer.resume_at() as i64 - 1;
    let (key, gaps, window) = (
        config.dedup_key(),
        config.dedup_max_gaps(),
        config.dedup_window_minutes(),
    );
    // The envelope's `ts` is its event time: a device that restarts its sequence is recognised.
    let mut state = DedupState::new(key, gaps, window).with_event_time("ts");
    if key == DedupKey::None {
        return Ok(state);
    }
    let kind = snapshot_kind(config.consumer());
    let snapshot = usable.latest_side_file(&kind, committed).await?;
    let mut since = 0;
    if let Some((v, bytes)) = snapshot {
        match state.restore(&bytes) {
            Ok(s) => {
                state = s;
                since = v;
            }
            Err(e) => tracing::warn!(error = %e, "ignoring a dedup snapshot; rebuilding"),
        }
    }
    if committed > since {
        // In the order they were first seen, so devices' sequences arrive mostly in order.
        let batches = Committed::of(&TableId::usable_telemetry())
            .columns(&["device_id", "seq", "ts", "msg_id", "received_at"])
            .range(since, committed)
            .partition(config.partition().map(Into::into))
            .read(&QueryEngine::new(lake.clone()))
            .await
            .context("rebuilding the dedup state")?;
        let mut rows = 0;
        for batch in &batches {
            state.observe(batch)?;
            rows += batch.num_rows();
        }
        tracing::info!(since, rows, "dedup state rebuilt from usable.telemetry");
    }
    Ok(state)
}

/// Stream sequences read per step when the device state is rebuilt from the lake.
pub(super) const DEVICE_RESTORE_STEP: i64 = 200_000;

/// Side-file kind of the device state snapshots of one consumer.
pub(super) fn devices_kind(consumer: &str) -> String {
    format!("devices-{consumer}")
}

/// The device state as of what the usable tables committed: the newest snapshot (beside
/// usable.telemetry), then each usable table's rows committed after it, with the time their
/// messages arrived (raw.telemetry's `received_at`). Re-applying rows the snapshot already had
/// changes nothing (see `fleetlake_sql::device_state`).
pub(super) async fn load_devices(
    config: &Config,
    lake: &Lake,
    committer: &Committer,
    observed: i64,
) -> Result<DeviceState, Error> {
    let usable = committer.writer(USABLE);
    let kind = devices_kind(config.consumer());
    let mut state = DeviceState::new();
    let mut since = 0;
    if let Some((v, bytes)) = usable
        .latest_side_file(&kind, usable.committed().unwrap_or(0))
        .await?
    {
        match DeviceState::decode(&bytes) {
            Ok(s) => {
                state = s;
                since = v;
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a damaged device state snapshot; rebuilding")
            }
        }
    }
    state.observe(observed);
    for w in committer.writers() {
        let (table, committed) = (w.id(), w.committed().unwrap_or(0));
        if table.zone != fleetlake_zones::Zone::Usable || committed <= since {
            continue;
        }
        // In steps of stream sequences, so a first start over a large lake (no snapshot yet)
        // never holds more than one step's rows.
        let (mut from, mut total) = (since, 0usize);
        while from < committed {
            let to = from.saturating_add(DEVICE_RESTORE_STEP).min(committed);
            let batches = Committed::of(table)
                .range(from, to)
                .partition(config.partition().map(Into::into))
                .with_arrival()
                .read(&QueryEngine::new(lake.clone()))
                .await
                .context(format!("rebuilding the device state from {table}"))?;
            let now = chrono::Utc::now().timestamp_micros();
            for batch in &batches {
                let at = batch.num_columns() - 1;
                let received: arrow::array::Int64Array = arrow::array::AsArray::as_primitive::<
                    arrow::datatypes::Int64Type,
                >(batch.column(at))
                .iter()
                .map(|v| Some(v.unwrap_or(now)))
                .collect();
                let keep: Vec<usize> = (0..at).collect();
                let rows = batch.project(&keep)?;
                state.update(table, &rows, Received::Each(&received))?;
            }
            total += batches.iter().map(|b| b.num_rows()).sum::<usize>();
            from = to;
            if committed - since > DEVICE_RESTORE_STEP {
                tracing::info!(%table, stream_seq = to, of = committed, rows = total, "rebuilding the device state");
            }
        }
        tracing::info!(%table, since, committed, rows = total, "device state rebuilt");
    }
    Ok(state)
}
