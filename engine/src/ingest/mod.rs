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
//! (the micro-batch loop), `batch` (a micro-batch's way from messages to a flush), `gaps`
//! (contiguity: redeliveries and gaps filled by sequence), `restore` (opening at the lake's
//! position), `budget` (how many messages a micro-batch may take, so commits keep
//! their interval while a backlog is caught up), [`pipelines`] (the declared pipelines' stage),
//! [`derived`] (windows and rules), [`alerts`] (alert messages on NATS), [`alert_table`]
//! (`final.alerts`), [`alertmanager`] (delivery), [`commit`] (the tables' writers, committing a
//! flush in the background), [`heartbeat`] (the engine's heartbeat in the lake), [`fleet`] (a
//! cluster's fleet-wide stage), [`replay`] (re-running a pipeline over the raw zone, offline;
//! refused while a heartbeat is fresh). May call [`crate::metrics`],
//! [`crate::config`], `fleetlake_sql` and `fleetlake_zones`; never the API.

pub mod alert_table;
pub mod alertmanager;
pub mod alerts;
mod batch;
mod budget;
pub mod commit;
pub mod derived;
pub mod fleet;
mod gaps;
pub mod heartbeat;
pub mod pipelines;
pub mod replay;
mod restore;
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
use crate::error::{Context, Error, Stopped};
use crate::ingest::commit::{
    Backoff, Commits, Committer, Effects, Job, Snapshot, SnapshotBytes, storage_failed,
};
use crate::ingest::derived::{DerivedOutput, DerivedStage, OpenError};
use crate::ingest::derived::{RuleChange, RuleUpdate};
use crate::ingest::pipelines::{Declared, PipelineStage, StageError, StageOutput};
use crate::ingest::source::Source;
use crate::metrics::Metrics;
use batch::*;
use restore::*;

/// What ingest runs over each micro-batch; the tables' writers are the committer's.
struct Stages {
    /// The declared pipelines.
    stage: PipelineStage,
    /// Window tables and rules over the pipelines' tables.
    derived: DerivedStage,
    /// Rule changes made over HTTP (`/v1/rules`), applied between micro-batches.
    changes: Option<mpsc::Receiver<RuleChange>>,
}

/// Runs the ingest stage until `cancel` fires; in-flight messages are committed and acked first.
/// `devices` is kept up to date with every processed micro-batch (restored first).
/// [`Stopped`] says it ended; why is recorded where it stopped ([`Stopped::because`]).
pub async fn run(
    config: Config,
    lake: Lake,
    declared: Declared,
    changes: mpsc::Receiver<RuleChange>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    devices: SharedDeviceState,
) -> Result<(), Stopped> {
    let mut backoff = Backoff::new();
    let (mut stages, committer) = loop {
        match open(&lake, &config, &declared, &metrics, &cancel).await {
            Ok(w) => break w,
            Err(OpenError::Invalid(e)) => {
                return Err(Stopped::because(&metrics, format!("ingest stopped: {e}")));
            }
            Err(OpenError::Storage(e)) => {
                storage_failed(&metrics, &e);
                backoff.wait(&cancel).await?;
            }
        }
    };
    let dedup = loop {
        match load_dedup(&config, &lake, &committer).await {
            Ok(d) => break d,
            Err(e) => {
                storage_failed(&metrics, &e);
                backoff.wait(&cancel).await?;
            }
        }
    };
    let restored = loop {
        match load_devices(&config, &lake, &committer, stages.derived.observed()).await {
            Ok(d) => break d,
            Err(e) => {
                storage_failed(&metrics, &e);
                backoff.wait(&cancel).await?;
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
            return Err(Stopped::cancelled());
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
                    return Err(Stopped::because(
                        &ingest.metrics,
                        format!("ingest stopped: {e}"),
                    ));
                }
                Err(e) => {
                    ingest.source_failed(&e);
                    backoff.wait(&ingest.cancel).await?;
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
            Pumped::Stopped(stopped) => return Err(stopped),
            Pumped::Reopen(reason) => {
                tracing::warn!(%reason, "reopening the consumer at the lake's position");
            }
            Pumped::SourceLost(reason) => {
                ingest.source_failed(&reason);
                backoff.wait(&ingest.cancel).await?;
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
    /// Ingest is stopping (asked to, or for the recorded cause).
    Stopped(Stopped),
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

impl Ingest {
    fn source_failed(&self, reason: impl std::fmt::Display) {
        let reason = reason.to_string();
        tracing::warn!(%reason, "NATS consumer failed; reopening");
        self.metrics.source_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.source_up.store(0, Ordering::Relaxed);
        self.metrics.set_last_error("source", &reason);
    }

    /// Consumes `source` until it fails or ingest is cancelled. Returns with no commit in
    /// flight.
    async fn pump(&mut self, source: &mut Source, stages: &mut Stages) -> Pumped {
        let pumped = self.pump_until(source, stages).await;
        // Until the consumer is healthy again, time is not observed (silence rules).
        stages.derived.interrupt();
        // A failed job's stop is recorded already; the loop ends with `pumped`.
        let _ = self.commits.settle().await;
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
                    if self.flush(&mut buffer, stages).await.is_ok() && !unrecorded {
                        let snapshots = self.snapshots(stages);
                        let (committer, settled) = self.commits.idle().await;
                        if settled.is_ok() {
                            committer.store(snapshots).await;
                        }
                    }
                    return Pumped::Stopped(Stopped::cancelled());
                }
                Some(change) = next_change(&mut stages.changes) => {
                let position = highest_seen as i64;
                let applied = self.apply(change.update, &mut buffer, stages, position).await;
                let stopping = applied.is_err() && self.cancel.is_cancelled();
                let _ = change.done.send(applied);
                if stopping {
                    return Pumped::Stopped(Stopped::cancelled());
                }
                continue;
            }
            next = tokio::time::timeout(wait, source.next()) => next,
            };
            match next {
                Err(_elapsed) => {
                    if let Err(stopped) = self.flush(&mut buffer, stages).await {
                        return Pumped::Stopped(stopped);
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
                        if let Err(stopped) = self.deliver(idle, &mut buffer, stages).await {
                            return Pumped::Stopped(stopped);
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
                        return self.lose_source(&mut buffer, stages, e.to_string()).await;
                    }
                    if let Err(stopped) = self.flush(&mut buffer, stages).await {
                        return Pumped::Stopped(stopped);
                    }
                    // They are committed with nothing to acknowledge them by: the consumer is
                    // recreated after the lake's position.
                    return Pumped::Reopen(format!(
                        "stream sequences {from}..={delivered} were delivered but not handed over by the NATS client; read them by sequence"
                    ));
                }
                Ok(None) => {
                    if let Err(stopped) = self.flush(&mut buffer, stages).await {
                        return Pumped::Stopped(stopped);
                    }
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
                        Err(e) => {
                            return self.lose_source(&mut buffer, stages, e.to_string()).await;
                        }
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
                                    return self
                                        .lose_source(&mut buffer, stages, e.to_string())
                                        .await;
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
                    if let Err(stopped) = self.process(&mut buffer, stages).await {
                        return Pumped::Stopped(stopped);
                    }
                    self.budget.record(rows, started.elapsed());
                    // Commit on time also when messages are always ready (a catch-up), where
                    // the receive above never times out.
                    let due = buffer.first_at.is_some_and(|t| t.elapsed() >= interval);
                    if (due || buffer.messages.len() >= self.config.commit_rows())
                        && let Err(stopped) = self.flush(&mut buffer, stages).await
                    {
                        return Pumped::Stopped(stopped);
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
    ) -> Result<(), Error> {
        let stopping = || {
            Error::Unavailable("ingest is stopping; the change applies at the next start".into())
        };
        if self.flush(buffer, stages).await.is_err() {
            return Err(stopping());
        }
        let (committer, settled) = self.commits.idle().await;
        if settled.is_err() {
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
                    if committer.commit_one(at, &empty, position).await.is_err() {
                        return Err(stopping());
                    }
                }
                committer.store(vec![snapshot]).await;
            }
        }
        self.metrics.record_rules(&[], &stages.derived.firing());
        Ok(())
    }
}
