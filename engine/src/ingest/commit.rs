//! The commit side of ingest: the writer of every table ingest fills, committing one flush's rows
//! in the background while ingest goes on fetching, running pipelines and rules, and publishing
//! alerts.
//!
//! ```text
//!  ingest loop ── flush ──► Job (rows per table, version, last message, snapshots)
//!       │                      │ spawned: commit every table in order ─► snapshots ─► ack
//!       └── keeps processing ◄─┘ (the next flush first waits for this one: one job in flight)
//! ```
//!
//! A job commits its tables in a fixed order (raw, quarantine, usable, the pipelines' tables,
//! window tables, final.alerts) so inputs are committed before what is derived from them, and
//! acks the last message only after every table has committed. A commit that fails is retried
//! with backoff; one that cannot succeed stops ingest.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use async_nats::jetstream;
use fleetlake_zones::lake::TableWriter;
use fleetlake_zones::{CommitOutcome, TableId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Context, Error, Stopped};
use crate::metrics::Metrics;
use crate::metrics::PipelineCounts;

pub(crate) const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Exponential backoff that sleeps unless cancelled.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self(BACKOFF_START)
    }
    /// The next pause (and doubles the one after, up to the maximum).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
    /// Sleeps the next pause; [`Stopped::cancelled`] when `cancel` fires first.
    pub(crate) async fn wait(&mut self, cancel: &CancellationToken) -> Result<(), Stopped> {
        let d = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => Err(Stopped::cancelled()),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }
}

pub(crate) fn storage_failed(metrics: &Metrics, reason: impl std::fmt::Display) {
    let reason = reason.to_string();
    tracing::warn!(%reason, "object storage failed; retrying");
    metrics.storage_errors.fetch_add(1, Ordering::Relaxed);
    metrics.storage_up.store(0, Ordering::Relaxed);
    metrics.set_last_error("storage", &reason);
}

/// State to store beside a table once a job has committed: stored beside `tables[0]`, as of the
/// lowest position the `tables` have committed (the state covers at least that much).
pub struct Snapshot {
    pub tables: Vec<TableId>,
    pub kind: String,
    pub bytes: SnapshotBytes,
}

/// A snapshot's bytes: encoded already, or encoded when stored, on a blocking thread (a large
/// state, copied at the flush, so encoding it does not pause ingest).
pub enum SnapshotBytes {
    Ready(Vec<u8>),
    Deferred(Box<dyn FnOnce() -> Result<Vec<u8>, Error> + Send>),
}

impl From<Vec<u8>> for SnapshotBytes {
    fn from(bytes: Vec<u8>) -> Self {
        SnapshotBytes::Ready(bytes)
    }
}

impl SnapshotBytes {
    async fn encoded(self) -> Result<Vec<u8>, Error> {
        match self {
            SnapshotBytes::Ready(b) => Ok(b),
            SnapshotBytes::Deferred(encode) => tokio::task::spawn_blocking(encode)
                .await
                .context("encoding a snapshot")?,
        }
    }
}

/// What ingest counts once a job's rows are committed.
#[derive(Default)]
pub struct Effects {
    pub pipelines: Vec<PipelineCounts>,
    pub duplicates_dropped: u64,
    pub dedup_forgotten: u64,
    pub dedup_restarts: u64,
    pub dedup_keys: i64,
    pub quarantined: u64,
}

/// One flush: the rows for every table (in the committer's order), the stream sequence they run
/// up to, and the last message, acked once all of them are committed.
pub struct Job {
    pub rows: Vec<RecordBatch>,
    pub version: i64,
    pub last: Option<jetstream::Message>,
    pub messages: usize,
    /// When the first of the job's messages was taken.
    pub started: Instant,
    pub snapshots: Vec<Snapshot>,
    pub effects: Effects,
}

/// The writers of every table ingest fills, in commit order.
pub struct Committer {
    writers: Vec<TableWriter>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    /// How long commits are retried once ingest is cancelled (shutdown).
    grace: Duration,
    /// The end of the grace period, set at the first commit attempt after cancellation: one
    /// deadline for every table and job of the shutdown.
    deadline: Option<Instant>,
    /// The position the state kept in memory is as of: the last job's version.
    position: i64,
}

impl Committer {
    pub fn new(
        writers: Vec<TableWriter>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        grace: Duration,
    ) -> Self {
        let position = writers
            .iter()
            .filter_map(|w| w.committed())
            .max()
            .unwrap_or(0);
        Self {
            writers,
            metrics,
            cancel,
            grace,
            deadline: None,
            position,
        }
    }

    /// The first stream sequence not yet in every table.
    pub fn resume_at(&self) -> u64 {
        self.writers
            .iter()
            .map(|w| w.committed().unwrap_or(0))
            .min()
            .unwrap_or(0) as u64
            + 1
    }

    /// The highest stream sequence any table has committed (0 for none).
    pub fn highest_committed(&self) -> u64 {
        self.writers
            .iter()
            .filter_map(|w| w.committed())
            .max()
            .unwrap_or(0)
            .max(0) as u64
    }

    /// Every writer, in commit order.
    pub fn writers(&self) -> Vec<&TableWriter> {
        self.writers.iter().collect()
    }

    /// The `i`th writer in commit order.
    pub fn writer(&self, i: usize) -> &TableWriter {
        &self.writers[i]
    }

    /// Commits every table, stores the snapshots, records the effects and acks. [`Stopped`] if
    /// a table could not be committed (ingest is stopping; nothing was acked, so the messages
    /// come back after a restart).
    pub async fn run(&mut self, job: Job) -> Result<(), Stopped> {
        debug_assert_eq!(job.rows.len(), self.writers.len());
        for (writer, rows) in self.writers.iter_mut().zip(&job.rows) {
            commit(
                &self.metrics,
                &self.cancel,
                (self.grace, &mut self.deadline),
                writer,
                rows,
                job.version,
            )
            .await?;
        }
        self.position = job.version;
        self.store(job.snapshots).await;
        let m = &self.metrics;
        for counts in &job.effects.pipelines {
            m.record_pipeline(counts);
        }
        let e = &job.effects;
        m.duplicates_dropped
            .fetch_add(e.duplicates_dropped, Ordering::Relaxed);
        m.dedup_forgotten
            .fetch_add(e.dedup_forgotten, Ordering::Relaxed);
        m.dedup_restarts
            .fetch_add(e.dedup_restarts, Ordering::Relaxed);
        m.dedup_keys.store(e.dedup_keys, Ordering::Relaxed);
        m.quarantined.fetch_add(e.quarantined, Ordering::Relaxed);
        if let Some(last) = job.last {
            match last.ack().await {
                Ok(()) => {
                    m.messages_acked
                        .fetch_add(job.messages as u64, Ordering::Relaxed);
                }
                // Not fatal: the lake holds the progress, and a redelivery is skipped.
                Err(e) => tracing::warn!(error = %e, "ack failed"),
            }
        }
        m.batch_latency.observe(job.started.elapsed());
        Ok(())
    }

    /// Adds a table (last in commit order); returns its position.
    pub fn push(&mut self, writer: TableWriter) -> usize {
        self.writers.push(writer);
        self.writers.len() - 1
    }

    /// Commits one table alone (e.g. raw only, when the rest of a batch cannot be made).
    pub async fn commit_one(
        &mut self,
        i: usize,
        rows: &RecordBatch,
        version: i64,
    ) -> Result<(), Stopped> {
        commit(
            &self.metrics,
            &self.cancel,
            (self.grace, &mut self.deadline),
            &mut self.writers[i],
            rows,
            version,
        )
        .await
    }

    /// Stores snapshots beside their tables. A failure only means a longer rebuild after a
    /// restart, so it is logged, not retried.
    pub async fn store(&self, snapshots: Vec<Snapshot>) {
        // A table another writer with the same application id moved past this state (an earlier
        // owner of a partition that had not yet noticed it lost it): a snapshot would be labelled
        // with a position its state is not as of.
        if let Some(w) = self
            .writers
            .iter()
            .find(|w| w.committed().is_some_and(|c| c > self.position))
        {
            tracing::warn!(
                table = %w.id(),
                committed = w.committed(),
                state = self.position,
                "another writer committed past this state: its snapshots are not stored"
            );
            return;
        }
        for s in snapshots {
            let writers: Vec<&TableWriter> = s
                .tables
                .iter()
                .filter_map(|t| self.writers.iter().find(|w| w.id() == t))
                .collect();
            let (Some(first), Some(committed)) = (
                writers.first(),
                writers.iter().map(|w| w.committed()).min().flatten(),
            ) else {
                continue;
            };
            match s.bytes.encoded().await {
                Ok(bytes) => first.store_snapshot(&s.kind, committed, bytes).await,
                Err(e) => tracing::warn!(kind = %s.kind, error = %e, "a snapshot was not stored"),
            }
        }
    }
}

/// Commits one table, retrying with backoff until it succeeds, or, once ingest is cancelled
/// (shutdown), until the grace period ends: `grace` is its length and `deadline` its end, set at
/// the first attempt after cancellation and shared by every table and job (an attempt still
/// running at the deadline is cut). Then the stop is recorded (`/healthz`, a non-zero exit) with what was
/// not committed.
async fn commit(
    metrics: &Metrics,
    cancel: &CancellationToken,
    (grace, deadline): (Duration, &mut Option<Instant>),
    writer: &mut TableWriter,
    batch: &RecordBatch,
    version: i64,
) -> Result<(), Stopped> {
    let table = metrics.table(&writer.id().to_string());
    let mut backoff = Backoff::new();
    let unfinished = |writer: &TableWriter, reason: &str| {
        format!(
            "shutdown: {} rows up to stream sequence {version} were not committed to {} within ingest.shutdown_grace_s ({} s): {reason}; they are not acknowledged and come back at the next start",
            batch.num_rows(),
            writer.id(),
            grace.as_secs()
        )
    };
    loop {
        let started = Instant::now();
        if cancel.is_cancelled() {
            deadline.get_or_insert(started + grace);
        }
        let attempt = writer.commit(batch, "stream_seq", version);
        let result = match *deadline {
            Some(end) => {
                match tokio::time::timeout(end.saturating_duration_since(started), attempt).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(Stopped::because(
                            metrics,
                            unfinished(writer, "the commit did not finish in time"),
                        ));
                    }
                }
            }
            None => attempt.await,
        };
        match result {
            Ok(outcome) => {
                metrics.storage_up.store(1, Ordering::Relaxed);
                if let CommitOutcome::Committed { rows, .. } = outcome {
                    table.rows.fetch_add(rows as u64, Ordering::Relaxed);
                    table.commits.fetch_add(1, Ordering::Relaxed);
                    table.latency.observe(started.elapsed());
                }
                return Ok(());
            }
            Err(e) if !e.is_transient() => {
                // Retrying cannot help (e.g. a pipeline changed a column's type): stop ingest
                // and say why; nothing of the batch is acked.
                metrics.storage_errors.fetch_add(1, Ordering::Relaxed);
                let stopped = Stopped::because(metrics, format!("ingest stopped: {e}"));
                cancel.cancel();
                return Err(stopped);
            }
            Err(e) => {
                storage_failed(metrics, &e);
                if cancel.is_cancelled() {
                    let end = *deadline.get_or_insert(started + grace);
                    let now = Instant::now();
                    if now >= end {
                        return Err(Stopped::because(
                            metrics,
                            unfinished(writer, &e.to_string()),
                        ));
                    }
                    tokio::time::sleep(backoff.next_delay().min(end - now)).await;
                } else {
                    // Returns early when cancelled; later attempts then count as above.
                    let _ = backoff.wait(cancel).await;
                }
            }
        }
    }
}

/// The committer, idle or committing one job on its own task.
pub struct Commits {
    idle: Option<Committer>,
    busy: Option<JoinHandle<(Committer, Result<(), Stopped>)>>,
}

impl Commits {
    pub fn new(committer: Committer) -> Self {
        Self {
            idle: Some(committer),
            busy: None,
        }
    }

    /// Waits for the job in flight, if any. [`Stopped`] if it failed (ingest is then cancelled).
    pub async fn settle(&mut self) -> Result<(), Stopped> {
        let Some(handle) = self.busy.take() else {
            return Ok(());
        };
        let (committer, ok) = match handle.await {
            Ok(done) => done,
            // The supervisor in `serve` reports the panic with its own message.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        self.idle = Some(committer);
        ok
    }

    /// The committer, after waiting for the job in flight, and whether that job failed.
    pub async fn idle(&mut self) -> (&mut Committer, Result<(), Stopped>) {
        let ok = self.settle().await;
        (self.idle.as_mut().expect("settled"), ok)
    }

    /// Starts committing `job` once the previous job is done. [`Stopped`] if the previous job
    /// failed (then `job` is dropped unacked).
    pub async fn submit(&mut self, job: Job) -> Result<(), Stopped> {
        self.settle().await?;
        let mut committer = self.idle.take().expect("settled");
        self.busy = Some(tokio::spawn(async move {
            let done = committer.run(job).await;
            (committer, done)
        }));
        Ok(())
    }
}
