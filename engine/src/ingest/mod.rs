//! The ingest stage: JetStream → micro-batches → raw, quarantine, usable and final Delta tables
//! → ack.
//!
//! ```text
//!  Source (pull consumer) ──► micro-batch (what one fetch made ready)
//!        ▲                      │ pipelines ─► windows ─► rules ─► alerts published now
//!        │                      ▼
//!        │                    buffer (≤ commit_rows or commit_interval) ─► flush: decode_envelope, dedup
//!        │                                                                  │ Job (rows per table)
//!        │ ack (AckPolicy::All, last message) ◄── committer task: raw ─► quarantine ─► usable ─► …
//! ```
//!
//! Guarantees: a message is acknowledged only after every table that needs it has committed; each
//! commit records `txn(consumer, last stream sequence)`, and a restarted engine starts the
//! consumer after the lowest recorded sequence and skips rows a table already holds. A flush is
//! committed on its own task ([`crate::ingest::commit`]) while the loop goes on fetching and running
//! rules, so alerts do not wait for the lake; the next flush waits for it (one in flight). A
//! failing commit is retried with backoff (pulling stops at the next flush, JetStream keeps the
//! backlog); a lost consumer is reopened from the lake's position.

//!
//! Layout: [`source`] (the JetStream consumer, reading a message by its sequence), this module
//! (the micro-batch loop), `budget` (how many messages a micro-batch may take, so commits keep
//! their interval while a backlog is caught up), [`pipelines`] (the declared pipelines' stage),
//! [`derived`] (windows, rules and alerts), [`commit`] (the tables' writers, committing a flush in
//! the background), [`heartbeat`] (the engine's heartbeat in the lake), [`replay`] (re-running a
//! pipeline over the raw zone, offline; refused while a heartbeat is fresh). May call [`crate::metrics`],
//! [`crate::config`], `fleetlake_sql` and `fleetlake_zones`; never the API.

pub mod alert_table;
pub mod alertmanager;
mod budget;
pub mod commit;
pub mod derived;
pub mod fleet;
pub mod heartbeat;
pub mod pipelines;
pub mod replay;
pub mod source;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use fleetlake_sql::device_state::{DeviceState, Received, SharedDeviceState};
use fleetlake_sql::{DedupKey, DedupState, QueryEngine, decode_envelope};
use fleetlake_zones::schema::{RawMessage, builtin_tables, raw_batch};
use fleetlake_zones::{Lake, TableId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::commit::{
    Backoff, Commits, Committer, Effects, Job, Snapshot, SnapshotBytes, storage_failed,
};
use crate::ingest::derived::{DerivedOutput, DerivedStage, OpenError};
use crate::ingest::derived::{RuleChange, RuleUpdate};
use crate::ingest::pipelines::{Declared, PipelineStage, StageError, StageOutput};
use crate::ingest::source::Source;
use crate::metrics::Metrics;

/// What ingest runs over each micro-batch; the tables' writers are the committer's.
struct Stages {
    /// The declared pipelines.
    stage: PipelineStage,
    /// Window tables and rules over the pipelines' tables.
    derived: DerivedStage,
    /// Rule changes made over HTTP (`/v1/rules`), applied between micro-batches.
    changes: Option<mpsc::Receiver<RuleChange>>,
}

/// Opens every table (raw, quarantine, usable, the pipelines', the window tables, final.alerts:
/// the committer's order) and rebuilds the stages' state as of what they committed.
async fn open(
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
        writers.push(
            lake.writer(id, schema, partitions, app_id)
                .await
                .map_err(|e| e.to_string())?,
        );
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
const RAW: usize = 0;
const USABLE: usize = 2;

/// Runs the ingest stage until `cancel` fires; in-flight messages are committed and acked first.
/// `devices` is kept up to date with every processed micro-batch (restored first).
pub async fn run(
    config: Config,
    lake: Lake,
    declared: Declared,
    changes: mpsc::Receiver<RuleChange>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    devices: SharedDeviceState,
) {
    let mut backoff = Backoff::new();
    let (mut stages, committer) = loop {
        match open(&lake, &config, &declared, &metrics, &cancel).await {
            Ok(w) => break w,
            Err(OpenError::Invalid(e)) => {
                metrics.stop_ingest(&format!("ingest stopped: {e}"));
                return;
            }
            Err(OpenError::Storage(e)) => {
                storage_failed(&metrics, &e);
                if !backoff.wait(&cancel).await {
                    return;
                }
            }
        }
    };
    let dedup = loop {
        match load_dedup(&config, &lake, &committer).await {
            Ok(d) => break d,
            Err(e) => {
                storage_failed(&metrics, &e);
                if !backoff.wait(&cancel).await {
                    return;
                }
            }
        }
    };
    let restored = loop {
        match load_devices(&config, &lake, &committer, stages.derived.observed()).await {
            Ok(d) => break d,
            Err(e) => {
                storage_failed(&metrics, &e);
                if !backoff.wait(&cancel).await {
                    return;
                }
            }
        }
    };
    // The rules' observed clock stays theirs (moving it on would count the time between the
    // two snapshots as silence of the keys the rules replayed); the device state's never goes
    // back, so its silent_for_s holds still until the rules' clock passes it.
    let mut restored = restored;
    restored.mark_ready();
    *devices.write().expect("device state lock") = restored;
    metrics.storage_up.store(1, Ordering::Relaxed);
    metrics.record_rules(&[], &stages.derived.firing());
    stages.changes = Some(changes);
    let lag = config.partition().map(|p| metrics.partition_lag(p.index));
    let budget = budget::Budget::new(
        config.commit_interval(),
        config.fetch_batch(),
        config.commit_rows(),
    );
    let mut ingest = Ingest {
        config,
        metrics,
        lag,
        cancel,
        dedup,
        last_snapshot: Instant::now(),
        commits: Commits::new(committer),
        lake,
        devices,
        unrecorded: Vec::new(),
        budget,
        idle_alerts: None,
    };
    loop {
        if ingest.cancel.is_cancelled() {
            return;
        }
        let (committer, _) = ingest.commits.idle().await;
        let (start, committed) = (committer.resume_at(), committer.highest_committed());
        let watched = Some(ingest.metrics.clone());
        let mut source =
            match Source::open(&ingest.config, &ingest.lake, start, committed, watched).await {
                Ok(source) => source,
                Err(
                    e @ (crate::ingest::source::OpenError::Mismatch(_)
                    | crate::ingest::source::OpenError::Mapping(_)),
                ) => {
                    // Consuming would silently skip the new stream's first messages, or read a
                    // partitioned stream's subjects as no pipeline's: say so and wait for an
                    // operator (`serve` exits non-zero).
                    ingest.metrics.set_last_error("source", &e.to_string());
                    ingest.metrics.source_up.store(0, Ordering::Relaxed);
                    ingest.metrics.stop_ingest(&format!("ingest stopped: {e}"));
                    return;
                }
                Err(e) => {
                    ingest.source_failed(&e.to_string());
                    if !backoff.wait(&ingest.cancel).await {
                        return;
                    }
                    continue;
                }
            };
        tracing::info!(start, "consuming");
        if let Some(p) = ingest.config.partition() {
            ingest.metrics.partition_consuming(p.index);
        }
        ingest.metrics.source_up.store(1, Ordering::Relaxed);
        backoff = Backoff::new();
        match ingest.pump(&mut source, &mut stages).await {
            Pumped::Stopped => return,
            Pumped::Reopen(reason) => {
                tracing::warn!(%reason, "reopening the consumer at the lake's position");
            }
            Pumped::SourceLost(reason) => {
                ingest.source_failed(&reason);
                if !backoff.wait(&ingest.cancel).await {
                    return;
                }
            }
        }
    }
}

/// The next rule change, or never when there is no channel (or it is closed).
async fn next_change(changes: &mut Option<mpsc::Receiver<RuleChange>>) -> Option<RuleChange> {
    match changes {
        Some(rx) => match rx.recv().await {
            Some(c) => Some(c),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

enum Pumped {
    Stopped,
    SourceLost(String),
    /// Everything taken is committed; the consumer must be recreated at the lake's position.
    Reopen(String),
}

struct Ingest {
    config: Config,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    dedup: DedupState,
    last_snapshot: Instant,
    commits: Commits,
    lake: Lake,
    /// The latest state of every device (`final.device_state`, `/v1/devices`).
    devices: SharedDeviceState,
    /// Transitions published while idle and not yet recorded in final.alerts, kept across a
    /// consumer that is reopened (they go with the next commit).
    unrecorded: Vec<fleetlake_sql::rules::Transition>,
    /// A partition's lag gauge (`None`: the whole stream's is `consumer_lag`).
    lag: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// Messages one micro-batch may take, so commits keep their interval during a catch-up.
    budget: budget::Budget,
    /// The writer of alerts raised while the stream is idle (opened at the first such alert).
    idle_alerts: Option<fleetlake_zones::lake::TableWriter>,
}

/// The pipelines' outputs of a flush's micro-batches as one (`None` without pipelines): each
/// table's rows concatenated once.
fn merge_stage(parts: Vec<StageOutput>) -> Option<StageOutput> {
    let mut merged = parts.first()?.clone_shape();
    for (i, tables) in merged.tables.iter_mut().enumerate() {
        for (j, rows) in tables.iter_mut().enumerate() {
            let all: Vec<&arrow::array::RecordBatch> =
                parts.iter().map(|p| &p.tables[i][j]).collect();
            *rows = arrow::compute::concat_batches(&rows.schema(), all)
                .expect("a table's batches share a schema");
        }
    }
    for part in parts {
        merged.quarantine.extend(part.quarantine);
        merged.counts.extend(part.counts);
    }
    Some(merged)
}

/// The highest stream sequence of `messages` (the progress a flush records).
fn raw_version(messages: &[RawMessage]) -> i64 {
    messages.iter().map(|m| m.stream_seq).max().unwrap_or(0)
}

/// One batch of the (non-empty) parts, which share a schema.
fn concat(parts: &[arrow::array::RecordBatch]) -> arrow::array::RecordBatch {
    arrow::compute::concat_batches(&parts[0].schema(), parts).expect("parts share a schema")
}

/// Side-file kind of the dedup snapshots of one consumer.
fn snapshot_kind(consumer: &str) -> String {
    format!("dedup-{consumer}")
}

/// The dedup state as of usable's committed position: the newest snapshot at or below it, plus
/// the usable rows committed after that snapshot.
async fn load_dedup(
    config: &Config,
    lake: &Lake,
    committer: &Committer,
) -> Result<DedupState, String> {
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
    let snapshot = usable
        .latest_side_file(&kind, committed)
        .await
        .map_err(|e| e.to_string())?;
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
        let sql = format!(
            "SELECT device_id, seq, ts, msg_id, received_at FROM usable.telemetry WHERE stream_seq > {since} AND stream_seq <= {committed}{} ORDER BY stream_seq",
            crate::config::partition::scope(config.partition(), "stream_seq", since, committed)
        );
        let rows = QueryEngine::new(lake.clone())
            .query(&sql)
            .await
            .map_err(|e| format!("rebuilding the dedup state: {e}"))?;
        for batch in &rows.batches {
            state.observe(batch).map_err(|e| e.to_string())?;
        }
        tracing::info!(
            since,
            rows = rows.row_count(),
            "dedup state rebuilt from usable.telemetry"
        );
    }
    Ok(state)
}

/// Stream sequences read per step when the device state is rebuilt from the lake.
const DEVICE_RESTORE_STEP: i64 = 200_000;

/// Side-file kind of the device state snapshots of one consumer.
fn devices_kind(consumer: &str) -> String {
    format!("devices-{consumer}")
}

/// The device state as of what the usable tables committed: the newest snapshot (beside
/// usable.telemetry), then each usable table's rows committed after it, with the time their
/// messages arrived (raw.telemetry's `received_at`). Re-applying rows the snapshot already had
/// changes nothing (see `fleetlake_sql::device_state`).
async fn load_devices(
    config: &Config,
    lake: &Lake,
    committer: &Committer,
    observed: i64,
) -> Result<DeviceState, String> {
    let usable = committer.writer(USABLE);
    let kind = devices_kind(config.consumer());
    let mut state = DeviceState::new();
    let mut since = 0;
    if let Some((v, bytes)) = usable
        .latest_side_file(&kind, usable.committed().unwrap_or(0))
        .await
        .map_err(|e| e.to_string())?
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
    let raw = TableId::raw_telemetry();
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
            let sql = format!(
                "SELECT u.*, CAST(r.received_at AS BIGINT) AS __received_us FROM {table} u \
                 LEFT JOIN {raw} r ON r.stream_seq = u.stream_seq \
                 AND r.stream_seq > {from} AND r.stream_seq <= {to} \
                 WHERE u.stream_seq > {from} AND u.stream_seq <= {to}{}",
                crate::config::partition::scope(config.partition(), "u.stream_seq", from, to)
            );
            let rows = QueryEngine::new(lake.clone())
                .query(&sql)
                .await
                .map_err(|e| format!("rebuilding the device state from {table}: {e}"))?;
            let now = chrono::Utc::now().timestamp_micros();
            for batch in &rows.batches {
                let at = batch.num_columns() - 1;
                let received: arrow::array::Int64Array = arrow::array::AsArray::as_primitive::<
                    arrow::datatypes::Int64Type,
                >(batch.column(at))
                .iter()
                .map(|v| Some(v.unwrap_or(now)))
                .collect();
                let keep: Vec<usize> = (0..at).collect();
                let rows = batch.project(&keep).map_err(|e| e.to_string())?;
                state
                    .update(table, &rows, Received::Each(&received))
                    .map_err(|e| e.to_string())?;
            }
            total += rows.row_count();
            from = to;
            if committed - since > DEVICE_RESTORE_STEP {
                tracing::info!(%table, stream_seq = to, of = committed, rows = total, "rebuilding the device state");
            }
        }
        tracing::info!(%table, since, committed, rows = total, "device state rebuilt");
    }
    Ok(state)
}

/// Messages taken from the source and not yet committed, and what the pipelines, windows and
/// rules made of them so far.
#[derive(Default)]
struct Buffer {
    messages: Vec<RawMessage>,
    last: Option<jetstream::Message>,
    first_at: Option<Instant>,
    /// How many of `messages` have been processed.
    processed: usize,
    /// The pipelines' output per processed micro-batch.
    stage: Vec<StageOutput>,
    /// What the built-in decoder made of the messages no pipeline claims, per micro-batch:
    /// usable.telemetry rows (replays removed) and quarantined rows.
    usable: Vec<arrow::array::RecordBatch>,
    quarantine: Vec<arrow::array::RecordBatch>,
    duplicates_dropped: u64,
    dedup_forgotten: u64,
    dedup_restarts: u64,
    /// Rows of closed windows per window table, per micro-batch.
    windows: Vec<Vec<arrow::array::RecordBatch>>,
    transitions: Vec<fleetlake_sql::rules::Transition>,
}

impl Buffer {
    fn clear(&mut self) {
        *self = Buffer::default();
    }
}

impl Ingest {
    fn source_failed(&self, reason: &str) {
        tracing::warn!(%reason, "NATS consumer failed; reopening");
        self.metrics.source_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.source_up.store(0, Ordering::Relaxed);
        self.metrics.set_last_error("source", reason);
    }

    /// Consumes `source` until it fails or ingest is cancelled. Returns with no commit in
    /// flight.
    async fn pump(&mut self, source: &mut Source, stages: &mut Stages) -> Pumped {
        let pumped = self.pump_until(source, stages).await;
        // Until the consumer is healthy again, time is not observed (silence rules).
        stages.derived.interrupt();
        self.commits.settle().await;
        pumped
    }

    async fn pump_until(&mut self, source: &mut Source, stages: &mut Stages) -> Pumped {
        let mut buffer = Buffer::default();
        // Redeliveries (ack wait expired during a long outage) are at or below this.
        let mut highest_seen = source.first.saturating_sub(1);
        // The highest sequence taken when the server was last seen to have delivered more.
        let mut undelivered_at: Option<u64> = None;
        let interval = self.config.commit_interval();
        loop {
            let wait = match buffer.first_at {
                Some(t) => interval.saturating_sub(t.elapsed()),
                None => interval,
            };
            let next = tokio::select! {
                _ = self.cancel.cancelled() => {
                    // Graceful shutdown: stop pulling, commit what is in flight, ack, and
                    // snapshot the state so the next start need not rebuild it.
                    // A silence firing detected while idle is recorded in final.alerts with
                    // the next message's commit: with none, the rules' state is not stored,
                    // so the next start detects it again (same id, dropped by JetStream) and
                    // records it then.
                    let unrecorded = buffer.messages.is_empty()
                        && !(buffer.transitions.is_empty() && self.unrecorded.is_empty());
                    if self.flush(&mut buffer, stages).await && !unrecorded {
                        let snapshots = self.snapshots(stages);
                        let (committer, ok) = self.commits.idle().await;
                        if ok {
                            committer.store(snapshots).await;
                        }
                    }
                    return Pumped::Stopped;
                }
                Some(change) = next_change(&mut stages.changes) => {
                let position = highest_seen as i64;
                let applied = self.apply(change.update, &mut buffer, stages, position).await;
                let stopping = applied.is_err() && self.cancel.is_cancelled();
                let _ = change.done.send(applied);
                if stopping {
                    return Pumped::Stopped;
                }
                continue;
            }
            next = tokio::time::timeout(wait, source.next()) => next,
            };
            match next {
                Err(_elapsed) => {
                    if !self.flush(&mut buffer, stages).await {
                        return Pumped::Stopped;
                    }
                    // Idle: did the server deliver messages the client library never handed
                    // over (it drops a delivery it cannot parse, and what came with it)?
                    let Ok(undelivered) = source.undelivered(highest_seen).await else {
                        continue;
                    };
                    let Some(delivered) = undelivered else {
                        undelivered_at = None;
                        // The server answered and has nothing more: an observation of a
                        // healthy, caught-up stream, which is how silence rules and the device
                        // state see time pass.
                        let idle = stages.derived.idle(highest_seen as i64);
                        self.devices
                            .write()
                            .expect("device state lock")
                            .observe(stages.derived.observed());
                        if !self.deliver(idle, &mut buffer, stages).await {
                            return Pumped::Stopped;
                        }
                        continue;
                    };
                    // Seen twice, a commit interval apart: not merely still in flight.
                    if undelivered_at != Some(highest_seen) {
                        undelivered_at = Some(highest_seen);
                        continue;
                    }
                    let from = highest_seen + 1;
                    if let Err(e) = self
                        .fetch_before(source, delivered + 1, &mut buffer, &mut highest_seen)
                        .await
                    {
                        return self.lose_source(&mut buffer, stages, e).await;
                    }
                    if !self.flush(&mut buffer, stages).await {
                        return Pumped::Stopped;
                    }
                    // They are committed with nothing to acknowledge them by: the consumer is
                    // recreated after the lake's position.
                    return Pumped::Reopen(format!(
                        "stream sequences {from}..={delivered} were delivered but not handed over by the NATS client; read them by sequence"
                    ));
                }
                Ok(None) => {
                    self.flush(&mut buffer, stages).await;
                    return Pumped::SourceLost("the message stream ended".into());
                }
                Ok(Some(Err(e))) => {
                    return self.lose_source(&mut buffer, stages, e.to_string()).await;
                }
                Ok(Some(Ok(message))) => {
                    match self
                        .take_contiguous(source, message, &mut buffer, &mut highest_seen)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => return self.lose_source(&mut buffer, stages, e).await,
                    }
                    // The rest of what was fetched, without waiting: one micro-batch, as large
                    // as processing it within half the commit interval allows.
                    let limit =
                        (buffer.processed + self.budget.rows()).min(self.config.commit_rows());
                    while buffer.messages.len() < limit {
                        match tokio::time::timeout(Duration::ZERO, source.next()).await {
                            Ok(Some(Ok(message))) => {
                                let taken = self
                                    .take_contiguous(
                                        source,
                                        message,
                                        &mut buffer,
                                        &mut highest_seen,
                                    )
                                    .await;
                                if let Err(e) = taken {
                                    return self.lose_source(&mut buffer, stages, e).await;
                                }
                            }
                            Ok(Some(Err(e))) => {
                                return self.lose_source(&mut buffer, stages, e.to_string()).await;
                            }
                            Ok(None) | Err(_) => break,
                        }
                    }
                    // Rules see every micro-batch now, not at the commit cadence.
                    let (rows, started) =
                        (buffer.messages.len() - buffer.processed, Instant::now());
                    if !self.process(&mut buffer, stages).await {
                        return Pumped::Stopped;
                    }
                    self.budget.record(rows, started.elapsed());
                    // Commit on time also when messages are always ready (a catch-up), where
                    // the receive above never times out.
                    let due = buffer.first_at.is_some_and(|t| t.elapsed() >= interval);
                    if (due || buffer.messages.len() >= self.config.commit_rows())
                        && !self.flush(&mut buffer, stages).await
                    {
                        return Pumped::Stopped;
                    }
                }
            }
        }
    }

    /// Applies a rule change between micro-batches: what was taken so far is committed first,
    /// so a new rule starts exactly after it (and restarts where it started).
    async fn apply(
        &mut self,
        change: RuleUpdate,
        buffer: &mut Buffer,
        stages: &mut Stages,
        highest_seen: i64,
    ) -> Result<(), String> {
        let stopping = || "ingest is stopping; the change applies at the next start".to_string();
        if !self.flush(buffer, stages).await {
            return Err(stopping());
        }
        let (committer, ok) = self.commits.idle().await;
        if !ok {
            return Err(stopping());
        }
        match change {
            RuleUpdate::Remove(name) => {
                stages.derived.remove_rule(&name);
                tracing::info!(rule = %name, "rule removed");
            }
            RuleUpdate::Upsert(rule) => {
                let position = highest_seen.max(committer.resume_at() as i64 - 1);
                let (snapshot, alerts) = stages
                    .derived
                    .upsert_rule(&self.lake, &rule, position)
                    .await?;
                if let Some(writer) = alerts {
                    // Recorded as up to date, so it does not pull the resume point back.
                    let empty = arrow::array::RecordBatch::new_empty(writer.schema().clone());
                    let at = committer.push(writer);
                    if !committer.commit_one(at, &empty, position).await {
                        return Err(stopping());
                    }
                }
                committer.store(vec![snapshot]).await;
            }
        }
        self.metrics.record_rules(&[], &stages.derived.firing());
        Ok(())
    }

    /// Records that the engine stops (cancelled) with messages taken but not committed, because
    /// `reason` kept failing: they are not acknowledged and come back at the next start, and
    /// `serve` exits non-zero saying so.
    fn unfinished(&self, buffer: &Buffer, reason: &str) {
        if buffer.messages.is_empty() {
            return;
        }
        let first = buffer.messages.first().map_or(0, |m| m.stream_seq);
        let last = buffer.messages.last().map_or(0, |m| m.stream_seq);
        self.metrics.stop_ingest(&format!(
            "shutdown: stream sequences {first}..={last} were not committed ({reason}); they are not acknowledged and come back at the next start"
        ));
    }

    /// Takes `message` after the messages the client did not deliver before it (see
    /// [`Ingest::fill_gap`]): false for a redelivery of one already taken.
    async fn take_contiguous(
        &mut self,
        source: &Source,
        message: jetstream::Message,
        buffer: &mut Buffer,
        highest_seen: &mut u64,
    ) -> Result<bool, String> {
        self.fill_gap(source, &message, buffer, highest_seen)
            .await?;
        Ok(self.take(source, message, buffer, highest_seen))
    }

    /// The consumer failed (`reason`): commits what was taken, then reopens it.
    async fn lose_source(
        &mut self,
        buffer: &mut Buffer,
        stages: &mut Stages,
        reason: String,
    ) -> Pumped {
        if !self.flush(buffer, stages).await {
            return Pumped::Stopped;
        }
        Pumped::SourceLost(reason)
    }

    /// Keeps what ingest takes contiguous: when `message` is ahead of the next stream sequence
    /// expected, the messages in between were not delivered (async-nats drops a delivery whose
    /// subject or headers it cannot parse, without an error), so each is read directly by its
    /// sequence and taken as received; one the stream no longer holds (deleted) is skipped. An
    /// error reading one is returned: nothing at or past it may be acknowledged.
    async fn fill_gap(
        &self,
        source: &Source,
        message: &jetstream::Message,
        buffer: &mut Buffer,
        highest_seen: &mut u64,
    ) -> Result<(), String> {
        let Ok(info) = message.info() else {
            return Ok(());
        };
        // A partition's stream sequences have gaps (the other partitions' messages): only a
        // gap in its deliveries means one was dropped.
        if source.is_partition() {
            let in_order = source.delivered_in_order(info.consumer_sequence);
            if info.stream_sequence <= *highest_seen {
                // A redelivery says nothing of a delivery dropped before it: the next new
                // message is checked by sequence.
                if !in_order {
                    source.mark_suspect();
                }
                return Ok(());
            }
            if in_order && !source.take_suspect() {
                return Ok(());
            }
        }
        self.fetch_before(source, info.stream_sequence, buffer, highest_seen)
            .await
    }

    /// Reads the messages after `highest_seen` and before stream sequence `next` directly (see
    /// [`Ingest::fill_gap`]). Sequences the stream no longer holds (deleted, purged, removed by
    /// its limits before they were read) are skipped in one request each run, logged and
    /// counted, never taken for delivered-and-lost.
    async fn fetch_before(
        &self,
        source: &Source,
        next: u64,
        buffer: &mut Buffer,
        highest_seen: &mut u64,
    ) -> Result<(), String> {
        while *highest_seen + 1 < next {
            if self.cancel.is_cancelled() {
                return Err("ingest is stopping".into());
            }
            let seq = *highest_seen + 1;
            let found = source.fetch(seq).await.map_err(|e| {
                format!("stream sequence {seq} was not delivered and could not be read: {e}")
            })?;
            let (at, fetched) = match found {
                Some((at, fetched)) if at < next => (at, Some(fetched)),
                _ => (next, None),
            };
            if at > seq && !source.is_partition() {
                tracing::warn!(
                    from = seq,
                    to = at - 1,
                    "these stream sequences are no longer in the stream (deleted, purged or removed by its limits before fleetlake read them)"
                );
                self.metrics
                    .messages_missing
                    .fetch_add(at - seq, Ordering::Relaxed);
            }
            let Some(fetched) = fetched else {
                *highest_seen = next - 1;
                break;
            };
            tracing::warn!(
                seq = at,
                subject = %fetched.subject.escape_debug(),
                "the NATS client did not deliver this message; read it by its stream sequence"
            );
            self.metrics.messages_pulled.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .messages_refetched
                .fetch_add(1, Ordering::Relaxed);
            buffer.messages.push(RawMessage {
                payload: fetched.payload,
                subject: fetched.subject,
                stream_seq: at as i64,
                msg_id: fetched.msg_id,
                received_at_us: chrono::Utc::now().timestamp_micros(),
            });
            buffer.first_at.get_or_insert_with(Instant::now);
            *highest_seen = at;
        }
        Ok(())
    }

    /// Adds a message to the buffer, unless it is a redelivery of one already taken.
    fn take(
        &self,
        source: &Source,
        message: jetstream::Message,
        buffer: &mut Buffer,
        highest_seen: &mut u64,
    ) -> bool {
        let Ok(info) = message.info() else {
            return false;
        };
        let seq = info.stream_sequence;
        match &self.lag {
            Some(lag) => lag.store(info.pending as i64, Ordering::Relaxed),
            None => self
                .metrics
                .consumer_lag
                .store(info.pending as i64, Ordering::Relaxed),
        }
        if seq <= *highest_seen {
            return false;
        }
        *highest_seen = seq;
        self.metrics.messages_pulled.fetch_add(1, Ordering::Relaxed);
        let msg_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string());
        buffer.messages.push(RawMessage {
            payload: message.payload.to_vec(),
            subject: source.published(&message.subject).to_string(),
            stream_seq: seq as i64,
            msg_id,
            received_at_us: chrono::Utc::now().timestamp_micros(),
        });
        buffer.first_at.get_or_insert_with(Instant::now);
        buffer.last = Some(message);
        true
    }

    /// Runs the pipelines, the built-in decoder (with dedup), windows and rules over the
    /// messages not processed yet, and publishes the alert transitions. Returns false when
    /// ingest must stop (a `FAIL` expectation, a failing decoder, window or rule, or cancelled
    /// while NATS or storage were failing).
    async fn process(&mut self, buffer: &mut Buffer, stages: &mut Stages) -> bool {
        if buffer.processed == buffer.messages.len() {
            return true;
        }
        let raw = raw_batch(&buffer.messages[buffer.processed..]);
        // Declared pipelines take the messages on their subjects; the built-in decoder the rest.
        let out = if stages.stage.is_empty() {
            None
        } else {
            let Some(out) = self.run_pipelines(&raw, buffer, stages).await else {
                return false;
            };
            Some(out)
        };
        let builtin_raw = match &out {
            None => raw,
            Some(_) => {
                let subjects = raw
                    .column_by_name("subject")
                    .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
                    .expect("raw schema")
                    .clone();
                let claimed = stages.stage.claimed(&subjects);
                let unclaimed: arrow::array::BooleanArray =
                    claimed.iter().map(|c| Some(!c)).collect();
                arrow::compute::filter_record_batch(&raw, &unclaimed).expect("same length")
            }
        };
        let decoded = match decode_envelope(&builtin_raw) {
            Ok(d) => d,
            Err(e) => {
                // A bug in decoding must not lose data: keep the raw rows and stop here.
                self.metrics.stop_ingest(&format!(
                    "ingest stopped: decoding failed (a bug; the raw rows are kept): {e}"
                ));
                let raw = raw_batch(&buffer.messages);
                let version = raw_version(&buffer.messages);
                let (committer, ok) = self.commits.idle().await;
                if ok {
                    committer.commit_one(RAW, &raw, version).await;
                }
                self.cancel.cancel();
                return false;
            }
        };
        let before = self.dedup.stats();
        let usable = match self.dedup.filter(&decoded.usable) {
            Ok(u) => u,
            Err(e) => {
                self.metrics
                    .stop_ingest(&format!("ingest stopped: deduplication failed: {e}"));
                self.cancel.cancel();
                return false;
            }
        };
        let after = self.dedup.stats();
        buffer.duplicates_dropped += after.dropped - before.dropped;
        buffer.dedup_forgotten += after.forgotten - before.forgotten;
        buffer.dedup_restarts += after.restarts - before.restarts;
        // The micro-batch is an observation of the stream (silence rules, device state).
        let observed = stages.derived.observe();
        let mut tables = vec![(TableId::usable_telemetry(), usable.clone())];
        let mut references = Vec::new();
        if let Some(out) = &out {
            for (pipeline, rows) in stages.stage.pipelines.iter().zip(&out.tables) {
                for (table, rows) in pipeline.tables().zip(rows) {
                    tables.push((table.clone(), rows.clone()));
                }
            }
            references = out.references.clone();
        }
        {
            // Each row's arrival is its message's (as raw.telemetry records it, which a restore
            // reads back).
            let arrived: std::collections::HashMap<i64, i64> = buffer.messages[buffer.processed..]
                .iter()
                .map(|m| (m.stream_seq, m.received_at_us))
                .collect();
            let now = chrono::Utc::now().timestamp_micros();
            let mut devices = self.devices.write().expect("device state lock");
            devices.observe(observed);
            for (table, rows) in &tables {
                let Some(seqs) = rows.column_by_name("stream_seq") else {
                    continue;
                };
                let received: arrow::array::Int64Array =
                    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(seqs)
                        .iter()
                        .map(|s| Some(s.and_then(|s| arrived.get(&s).copied()).unwrap_or(now)))
                        .collect();
                if let Err(e) = devices.update(table, rows, Received::Each(&received)) {
                    tracing::warn!(%table, error = %e, "updating the device state failed");
                }
            }
        }
        if !stages.derived.is_empty() {
            let upto = raw_version(&buffer.messages);
            let mut derived = match stages.derived.process(&tables, &references, upto).await {
                Ok(d) => d,
                Err(e) => {
                    self.metrics
                        .stop_ingest(&format!("ingest stopped: window or rule failed: {e}"));
                    self.cancel.cancel();
                    return false;
                }
            };
            self.metrics
                .late_rows
                .fetch_add(derived.late, Ordering::Relaxed);
            buffer.windows.push(std::mem::take(&mut derived.windows));
            if !self.deliver(derived, buffer, stages).await {
                return false;
            }
        }
        buffer.usable.push(usable);
        buffer.quarantine.push(decoded.quarantine);
        buffer.stage.extend(out);
        buffer.processed = buffer.messages.len();
        true
    }

    /// Publishes what the derived stage made of a micro-batch or an idle tick (retrying while
    /// NATS refuses) and keeps its transitions for final.alerts at the next flush. False when
    /// ingest is stopping with them unpublished.
    async fn deliver(
        &mut self,
        derived: DerivedOutput,
        buffer: &mut Buffer,
        stages: &mut Stages,
    ) -> bool {
        let mut backoff = Backoff::new();
        while let Err(e) = stages.derived.publish(&derived.publish).await {
            self.source_failed(&e);
            if !backoff.wait(&self.cancel).await {
                self.unfinished(buffer, &format!("alerts could not be published: {e}"));
                return false;
            }
        }
        self.metrics
            .alerts_published
            .fetch_add(derived.publish.len() as u64, Ordering::Relaxed);
        // Keys start and stop firing only with transitions: count them only then. What is
        // counted per rule is what was published (a cohort alert once, not its members).
        if !derived.transitions.is_empty() || !derived.publish.is_empty() {
            self.metrics
                .record_rules(&derived.publish, &stages.derived.firing());
        }
        buffer.transitions.extend(derived.transitions);
        true
    }

    /// Hands the buffer to the committer, which commits it to every table and then acks while
    /// ingest goes on. Returns false if ingest must stop (a previous commit failed, or
    /// processing failed); nothing of an uncommitted batch is acked then, so the messages come
    /// back after a restart.
    async fn flush(&mut self, buffer: &mut Buffer, stages: &mut Stages) -> bool {
        if buffer.messages.is_empty() {
            if !buffer.transitions.is_empty() && self.record_idle(&buffer.transitions).await {
                buffer.transitions.clear();
            }
            // Idle firings not recorded wait for the next message's commit, also across a
            // reopened consumer.
            self.unrecorded.append(&mut buffer.transitions);
            return true;
        }
        if !self.unrecorded.is_empty() {
            let mut earlier = std::mem::take(&mut self.unrecorded);
            earlier.append(&mut buffer.transitions);
            buffer.transitions = earlier;
        }
        if !self.process(buffer, stages).await {
            return false;
        }
        let started = buffer.first_at.unwrap_or_else(Instant::now);
        let raw = raw_batch(&buffer.messages);
        let version = raw_version(&buffer.messages);
        let stage = merge_stage(std::mem::take(&mut buffer.stage));
        let mut quarantine = std::mem::take(&mut buffer.quarantine);
        quarantine.extend(stage.iter().flat_map(|s| s.quarantine.iter().cloned()));
        let quarantine = concat(&quarantine);
        let usable = concat(&buffer.usable);
        let effects = Effects {
            pipelines: stage.iter().flat_map(|s| s.counts.clone()).collect(),
            duplicates_dropped: buffer.duplicates_dropped,
            dedup_forgotten: buffer.dedup_forgotten,
            dedup_restarts: buffer.dedup_restarts,
            dedup_keys: self.dedup.len() as i64,
            quarantined: quarantine.num_rows() as u64,
        };
        let mut rows = vec![raw, quarantine, usable];
        if let Some(stage) = stage {
            rows.extend(stage.tables.into_iter().flatten());
        }
        rows.extend(
            stages
                .derived
                .flush_rows(&buffer.windows, &buffer.transitions),
        );
        let snapshots = if self.last_snapshot.elapsed() >= self.config.dedup_snapshot_interval() {
            self.last_snapshot = Instant::now();
            self.snapshots(stages)
        } else {
            Vec::new()
        };
        let job = Job {
            rows,
            version,
            last: buffer.last.take(),
            messages: buffer.messages.len(),
            started,
            snapshots,
            effects,
        };
        buffer.clear();
        self.commits.submit(job).await
    }

    /// Records alerts raised while the stream is idle (a silence rule's firings when a whole
    /// fleet stops) in final.alerts at once, with the idle writer (see
    /// `derived::open_idle_alerts`; its version is the wall clock in µs, increasing). A restart
    /// learns from final.alerts that they were recorded (`recorded_since`), so they are not
    /// raised again. False (they wait for the next message's commit, as before) in a cluster
    /// partition, whose restore reads only rows of messages it holds, or when the commit fails.
    async fn record_idle(&mut self, transitions: &[fleetlake_sql::rules::Transition]) -> bool {
        if self.config.partition().is_some() {
            return false;
        }
        if self.idle_alerts.is_none() {
            match crate::ingest::derived::open_idle_alerts(&self.lake, self.config.consumer()).await
            {
                Ok(w) => self.idle_alerts = Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "alerts raised while idle wait for the next commit");
                    return false;
                }
            }
        }
        let writer = self.idle_alerts.as_mut().expect("opened");
        let rows = crate::ingest::derived::DerivedStage::alert_rows(transitions);
        let version = chrono::Utc::now()
            .timestamp_micros()
            .max(writer.committed().unwrap_or(0) + 1);
        let started = Instant::now();
        match writer.commit_all(&rows, version).await {
            Ok(outcome) => {
                if let fleetlake_zones::lake::CommitOutcome::Committed { rows, .. } = outcome {
                    let table = self.metrics.table(&writer.id().to_string());
                    table.rows.fetch_add(rows as u64, Ordering::Relaxed);
                    table.commits.fetch_add(1, Ordering::Relaxed);
                    table.latency.observe(started.elapsed());
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "recording alerts raised while idle failed; they go with the next commit");
                // Read the table again before the next attempt.
                self.idle_alerts = None;
                false
            }
        }
    }

    /// Runs the declared pipelines over a batch, retrying while the reference tables cannot be
    /// read. `None` when the batch must not be committed: a `FAIL` expectation stopped the
    /// pipelines (ingest stops, nothing of the batch is written), or the engine is stopping.
    async fn run_pipelines(
        &self,
        raw: &arrow::array::RecordBatch,
        buffer: &Buffer,
        stages: &mut Stages,
    ) -> Option<StageOutput> {
        let mut backoff = Backoff::new();
        loop {
            match stages.stage.process(raw).await {
                Ok(Ok(out)) => return Some(out),
                Ok(Err(failure)) => {
                    tracing::error!(%failure, "pipeline failed; ingest stops, nothing of the batch is written");
                    self.metrics
                        .set_last_error("pipeline", &failure.to_string());
                    self.metrics.pipeline_failed.store(1, Ordering::Relaxed);
                    self.cancel.cancel();
                    return None;
                }
                Err(StageError::Storage(e)) => {
                    storage_failed(&self.metrics, &e);
                    if !backoff.wait(&self.cancel).await {
                        self.unfinished(buffer, &e);
                        return None;
                    }
                }
                Err(StageError::Failed(e)) => {
                    self.metrics.stop_ingest(&format!("ingest stopped: {e}"));
                    self.cancel.cancel();
                    return None;
                }
            }
        }
    }

    /// The state of the dedup filter, the pipelines, windows and rules as of everything taken
    /// so far, to store beside their tables once committed.
    fn snapshots(&self, stages: &Stages) -> Vec<Snapshot> {
        let mut out = stages.stage.snapshots();
        out.extend(stages.derived.snapshots());
        // Stored once every usable table has committed this far (beside usable.telemetry).
        let mut usable = vec![TableId::usable_telemetry()];
        usable.extend(
            stages
                .stage
                .pipelines
                .iter()
                .flat_map(|p| p.tables().cloned()),
        );
        // Copied now (as of this flush), encoded when stored, off the ingest loop.
        let view = self.devices.read().expect("device state lock").view_all();
        out.push(Snapshot {
            tables: usable,
            kind: devices_kind(self.config.consumer()),
            bytes: SnapshotBytes::Deferred(Box::new(move || {
                view.encode().map_err(|e| e.to_string())
            })),
        });
        if self.dedup.key() != DedupKey::None {
            out.push(Snapshot {
                tables: vec![TableId::usable_telemetry()],
                kind: snapshot_kind(self.config.consumer()),
                bytes: self.dedup.encode().into(),
            });
        }
        out
    }
}
