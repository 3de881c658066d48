//! A cluster's fleet-wide windows and rules: the window tables not grouped by `device_id`, and
//! the rules over them (or grouping cohorts), which no partition can compute alone.
//!
//! ```text
//!  partitions' ingest ──► usable.<table> (committed, acked) ──┐
//!  each partition's txn progress + its next message ──────────┴─► safe position S
//!  fleet ingest (one instance, under the lease "fleet") ── rows (done, S] in stream order ─►
//!      windows ─► final.<table>;  rules ─► alerts.<rule>.<key>, final.alerts   (txn <consumer>-fleet, S)
//! ```
//!
//! The elected instance ([`crate::cluster`]) reads the committed rows of the usable tables these
//! windows and rules read, in stream order, up to the highest stream sequence every partition
//! has committed entirely ([`safe_position`]: each partition's progress in those tables, and its
//! next message in the stream after it). A
//! single instance runs its windows and rules over the same rows in the same order, with the
//! same watermark (the whole fleet's), so the rows and alerts are the same; they come later,
//! by the time the slowest partition takes to commit. Its progress is its own Delta `txn`
//! application id (`<nats.consumer>-fleet`), its state is snapshotted beside its tables, and a
//! takeover resumes where its last commit ended.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use async_nats::jetstream;
use fleetlake_zones::lake::ProgressReader;
use fleetlake_zones::{Lake, TableId};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Context, Error, Stopped};
use crate::ingest::commit::{Backoff, Committer, Effects, Job, storage_failed};
use crate::ingest::derived::{DerivedStage, OpenError, committed_rows};
use crate::ingest::pipelines::{Declared, References};
use crate::metrics::Metrics;

/// Stream sequences read per step.
const STEP: i64 = 200_000;

/// The highest stream sequence S such that every one of the `partitions` partitions has
/// committed all of its messages up to S to every table of `inputs`: the lowest progress V its
/// application id (`<base>-p<N>`) records in them, and then the partition's first message after
/// V in the stream, F (`STREAM.MSG.GET` by its subjects): the partition has nothing uncommitted
/// before F. S is the lowest F − 1, or the stream's last sequence (read first) where a partition
/// has nothing after V. Exact: it relies on the lake and the stream, not on consumer counters.
pub async fn safe_position(
    js: &jetstream::Context,
    lake: &Lake,
    reader: &mut ProgressReader,
    stream: &str,
    base: &str,
    partitions: u32,
    inputs: &[TableId],
) -> Result<u64, Error> {
    let last = js
        .get_stream(stream)
        .await
        .context("reading the stream")?
        .info()
        .await
        .context("reading the stream")?
        .state
        .last_sequence;
    let app_ids: Vec<String> = (0..partitions).map(|p| format!("{base}-p{p}")).collect();
    let mut done = vec![i64::MAX; partitions as usize];
    for table in inputs {
        let progress = reader.progress(lake, table, &app_ids).await?;
        for (d, v) in done.iter_mut().zip(progress) {
            *d = (*d).min(v.unwrap_or(0));
        }
    }
    let client = js.client();
    let mut safe = last;
    for (p, d) in done.iter().enumerate() {
        let filter = crate::config::partition::Partition {
            index: p as u32,
            count: partitions,
        }
        .filter_subject();
        let after = (*d).clamp(0, last as i64) as u64;
        if let Some((next, _)) =
            crate::ingest::source::next_message(&client, stream, after + 1, &filter).await?
        {
            safe = safe.min(next - 1);
        }
    }
    Ok(safe)
}

/// Runs the fleet-wide windows and rules of `declared` (only those: see
/// [`split_fleet_wide`]) until `cancel` fires. `config` is the instance's; the
/// partitions' application ids are `<nats.consumer>-p<N>`, this stage's progress is
/// `<nats.consumer>-fleet`. A failure retrying cannot fix stops ingest (`/healthz`).
pub async fn run(
    config: Config,
    lake: Lake,
    declared: Declared,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let base = config.consumer().to_string();
    let partitions = config.partitions();
    let mut own = config.clone();
    own.set_consumer(&format!("{base}-fleet"));
    let mut backoff = Backoff::new();
    let (mut stage, mut committer, js, mut references, inputs) = loop {
        match open(&own, &lake, &declared, &metrics, &cancel, &base, partitions).await {
            Ok(opened) => break opened,
            Err(OpenError::Invalid(e)) => {
                let _stopped = Stopped::because(
                    &metrics,
                    format!("ingest stopped: fleet-wide windows and rules: {e}"),
                );
                return;
            }
            Err(OpenError::Storage(e)) => {
                storage_failed(&metrics, &e);
                if backoff.wait(&cancel).await.is_err() {
                    return;
                }
            }
        }
    };
    let mut done = committer.resume_at() as i64 - 1;
    let position = |done: i64| {
        metrics
            .fleet_wide_position
            .store(done, std::sync::atomic::Ordering::Relaxed)
    };
    position(done);
    tracing::info!(from = done, "fleet-wide windows and rules running");
    let mut last_snapshot = Instant::now();
    let mut backoff = Backoff::new();
    let mut reader = ProgressReader::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(config.commit_interval()) => {}
        }
        let safe = safe_position(
            &js,
            &lake,
            &mut reader,
            config.stream(),
            &base,
            partitions,
            &inputs,
        );
        let safe = match safe.await {
            Ok(s) => s as i64,
            Err(e) => {
                tracing::warn!(error = %e, "fleet-wide windows: reading the partitions' progress failed");
                continue;
            }
        };
        if safe <= done {
            continue;
        }
        let upto = safe.min(done.saturating_add(STEP));
        let started = Instant::now();
        let step = async {
            let references = references.refresh().await?;
            let mut tables: Vec<(TableId, RecordBatch)> = Vec::new();
            for input in &inputs {
                let batches = committed_rows(&lake, input, done, upto, None).await?;
                if let Some(first) = batches.first() {
                    let rows = arrow::compute::concat_batches(&first.schema(), &batches)?;
                    tables.push((input.clone(), rows));
                }
            }
            Ok::<_, Error>((tables, references))
        };
        let (tables, loaded) = match step.await {
            Ok(t) => t,
            Err(e) => {
                storage_failed(&metrics, &e);
                if backoff.wait(&cancel).await.is_err() {
                    break;
                }
                continue;
            }
        };
        backoff = Backoff::new();
        stage.observe();
        let out = match stage.process(&tables, &loaded, upto).await {
            Ok(o) => o,
            Err(e) => {
                let _stopped = Stopped::because(
                    &metrics,
                    format!("ingest stopped: fleet-wide window or rule failed: {e}"),
                );
                return;
            }
        };
        metrics
            .late_rows
            .fetch_add(out.late, std::sync::atomic::Ordering::Relaxed);
        while let Err(e) = stage.publish(&out.publish).await {
            tracing::warn!(error = %e, "publishing fleet-wide alerts failed; retrying");
            if backoff.wait(&cancel).await.is_err() {
                // Not committed: the next owner derives and publishes them again (same ids).
                return;
            }
        }
        metrics.alerts_published.fetch_add(
            out.publish.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let rows = stage.flush_rows(std::slice::from_ref(&out.windows), &out.transitions);
        let snapshots = if last_snapshot.elapsed() >= config.dedup_snapshot_interval() {
            last_snapshot = Instant::now();
            stage.snapshots()
        } else {
            Vec::new()
        };
        let job = Job {
            rows,
            version: upto,
            last: None,
            messages: 0,
            started,
            snapshots,
            effects: Effects {
                dedup_keys: metrics
                    .dedup_keys
                    .load(std::sync::atomic::Ordering::Relaxed),
                ..Default::default()
            },
        };
        if committer.run(job).await.is_err() {
            // Why is recorded where the commit failed (or a shutdown was asked for).
            return;
        }
        done = upto;
        position(done);
    }
    // Stopping: the state as of the last commit, so the next owner need not rebuild it.
    committer.store(stage.snapshots()).await;
    position(0);
}

type Opened = (
    DerivedStage,
    Committer,
    jetstream::Context,
    References,
    Vec<TableId>,
);

/// Opens the fleet-wide window tables and final.alerts with this stage's application id, and
/// rebuilds their state as of what they committed. A window table new to it is first filled
/// from the usable rows every partition has committed.
async fn open(
    config: &Config,
    lake: &Lake,
    declared: &Declared,
    metrics: &Arc<Metrics>,
    cancel: &CancellationToken,
    base: &str,
    partitions: u32,
) -> Result<Opened, OpenError> {
    let js = crate::ingest::source::connect_with(&config.nats())
        .await
        .map_err(|e| OpenError::Storage(e.to_string()))?;
    // The tables read that none of these windows makes (the usable tables), each once.
    let mut inputs: Vec<TableId> = Vec::new();
    let read = declared.windows.iter().map(|w| &w.input);
    for t in read.chain(declared.rules.iter().map(|r| &r.input)) {
        if !declared.windows.iter().any(|w| w.def.table == *t) && !inputs.contains(t) {
            inputs.push(t.clone());
        }
    }
    let safe = safe_position(
        &js,
        lake,
        &mut ProgressReader::default(),
        config.stream(),
        base,
        partitions,
        &inputs,
    )
    .await? as i64;
    let mut references = References::new(lake, &declared.runners);
    let loaded = references.refresh().await?;
    let backfill_upto: Vec<(TableId, i64)> = declared
        .windows
        .iter()
        .map(|w| (w.input.clone(), safe))
        .collect();
    let (stage, writers) = DerivedStage::open(
        lake,
        config,
        metrics,
        &declared.windows,
        &declared.rules,
        &loaded,
        &backfill_upto,
    )
    .await?;
    let committer = Committer::new(
        writers,
        metrics.clone(),
        cancel.clone(),
        config.shutdown_grace(),
    );
    Ok((stage, committer, js, references, inputs))
}

/// Splits the declared work between the partitions and the fleet-wide stage
/// (this module): window tables not grouped by `device_id`, rules over them, and
/// rules keyed by something else than `device_id` or grouping cohorts cannot be computed by a
/// partition alone. Returns what a partition runs, what the fleet-wide stage runs (with every
/// pipeline, for their reference tables) and the fleet-wide work's names.
pub fn split_fleet_wide(declared: &Declared) -> (Declared, Declared, Vec<String>) {
    let mut local = declared.clone();
    let mut fleet = Declared {
        runners: declared.runners.clone(),
        ..Default::default()
    };
    let mut names = Vec::new();
    let (windows, rules) = (
        std::mem::take(&mut local.windows),
        std::mem::take(&mut local.rules),
    );
    for w in windows {
        if w.def.groups_by("device_id") {
            local.windows.push(w);
        } else {
            names.push(format!(
                "window table {} (not grouped by device_id)",
                w.def.table
            ));
            fleet.windows.push(w);
        }
    }
    for r in rules {
        let per_device = r
            .def
            .key
            .iter()
            .any(|k| k.eq_ignore_ascii_case("device_id"))
            && r.def.group_by.is_empty();
        if per_device && !fleet.windows.iter().any(|w| w.def.table == r.input) {
            local.rules.push(r);
        } else {
            names.push(format!(
                "rule {} (keyed by {}{})",
                r.def.name,
                r.def.key.join(", "),
                if r.def.group_by.is_empty() {
                    format!(", over {}", r.input)
                } else {
                    format!(", grouped by {}", r.def.group_by.join(", "))
                }
            ));
            fleet.rules.push(r);
        }
    }
    (local, fleet, names)
}
