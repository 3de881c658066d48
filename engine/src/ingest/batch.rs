//! A micro-batch's way from messages to a flush: the [`Buffer`] of messages taken and what the
//! stages made of them, processing (pipelines, built-in decoder, windows, rules), publishing
//! alerts, and the flush handed to the committer.

use super::*;

/// The pipelines' outputs of a flush's micro-batches as one (`None` without pipelines): each
/// table's rows concatenated once.
pub(super) fn merge_stage(parts: Vec<StageOutput>) -> Option<StageOutput> {
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
pub(super) fn raw_version(messages: &[RawMessage]) -> i64 {
    messages.iter().map(|m| m.stream_seq).max().unwrap_or(0)
}

/// One batch of the (non-empty) parts, which share a schema.
pub(super) fn concat(parts: &[arrow::array::RecordBatch]) -> arrow::array::RecordBatch {
    arrow::compute::concat_batches(&parts[0].schema(), parts).expect("parts share a schema")
}

/// Messages taken from the source and not yet committed, and what the pipelines, windows and
/// rules made of them so far.
#[derive(Default)]
pub(super) struct Buffer {
    pub(super) messages: Vec<RawMessage>,
    pub(super) last: Option<jetstream::Message>,
    pub(super) first_at: Option<Instant>,
    /// How many of `messages` have been processed.
    pub(super) processed: usize,
    /// The pipelines' output per processed micro-batch.
    pub(super) stage: Vec<StageOutput>,
    /// What the built-in decoder made of the messages no pipeline claims, per micro-batch:
    /// usable.telemetry rows (replays removed) and quarantined rows.
    pub(super) usable: Vec<arrow::array::RecordBatch>,
    pub(super) quarantine: Vec<arrow::array::RecordBatch>,
    pub(super) duplicates_dropped: u64,
    pub(super) dedup_forgotten: u64,
    pub(super) dedup_restarts: u64,
    /// Rows of closed windows per window table, per micro-batch.
    pub(super) windows: Vec<Vec<arrow::array::RecordBatch>>,
    pub(super) transitions: Vec<fleetlake_sql::rules::Transition>,
}

impl Buffer {
    fn clear(&mut self) {
        *self = Buffer::default();
    }
}

impl Ingest {
    /// Runs the pipelines, the built-in decoder (with dedup), windows and rules over the
    /// messages not processed yet, and publishes the alert transitions. [`Stopped`] when
    /// ingest must stop (a `FAIL` expectation, a failing decoder, window or rule, or cancelled
    /// while NATS or storage were failing).
    pub(super) async fn process(
        &mut self,
        buffer: &mut Buffer,
        stages: &mut Stages,
    ) -> Result<(), Stopped> {
        if buffer.processed == buffer.messages.len() {
            return Ok(());
        }
        let raw = raw_batch(&buffer.messages[buffer.processed..]);
        // Declared pipelines take the messages on their subjects; the built-in decoder the rest.
        let out = if stages.stage.is_empty() {
            None
        } else {
            Some(self.run_pipelines(&raw, buffer, stages).await?)
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
                let stopped = Stopped::because(
                    &self.metrics,
                    format!("ingest stopped: decoding failed (a bug; the raw rows are kept): {e}"),
                );
                let raw = raw_batch(&buffer.messages);
                let version = raw_version(&buffer.messages);
                let (committer, settled) = self.commits.idle().await;
                if settled.is_ok() {
                    // Its own failure is recorded by the commit; the decoding failure stands.
                    let _ = committer.commit_one(RAW, &raw, version).await;
                }
                self.cancel.cancel();
                return Err(stopped);
            }
        };
        let before = self.dedup.stats();
        let usable = match self.dedup.filter(&decoded.usable) {
            Ok(u) => u,
            Err(e) => {
                let stopped = Stopped::because(
                    &self.metrics,
                    format!("ingest stopped: deduplication failed: {e}"),
                );
                self.cancel.cancel();
                return Err(stopped);
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
                    let stopped = Stopped::because(
                        &self.metrics,
                        format!("ingest stopped: window or rule failed: {e}"),
                    );
                    self.cancel.cancel();
                    return Err(stopped);
                }
            };
            self.metrics
                .late_rows
                .fetch_add(derived.late, Ordering::Relaxed);
            buffer.windows.push(std::mem::take(&mut derived.windows));
            self.deliver(derived, buffer, stages).await?;
        }
        buffer.usable.push(usable);
        buffer.quarantine.push(decoded.quarantine);
        buffer.stage.extend(out);
        buffer.processed = buffer.messages.len();
        Ok(())
    }

    /// Publishes what the derived stage made of a micro-batch or an idle tick (retrying while
    /// NATS refuses) and keeps its transitions for final.alerts at the next flush. [`Stopped`]
    /// when ingest is stopping with them unpublished.
    pub(super) async fn deliver(
        &mut self,
        derived: DerivedOutput,
        buffer: &mut Buffer,
        stages: &mut Stages,
    ) -> Result<(), Stopped> {
        let mut backoff = Backoff::new();
        while let Err(e) = stages.derived.publish(&derived.publish).await {
            self.source_failed(&e);
            if backoff.wait(&self.cancel).await.is_err() {
                return Err(self.unfinished(buffer, &format!("alerts could not be published: {e}")));
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
        Ok(())
    }

    /// Hands the buffer to the committer, which commits it to every table and then acks while
    /// ingest goes on. [`Stopped`] if ingest must stop (a previous commit failed, or
    /// processing failed); nothing of an uncommitted batch is acked then, so the messages come
    /// back after a restart.
    pub(super) async fn flush(
        &mut self,
        buffer: &mut Buffer,
        stages: &mut Stages,
    ) -> Result<(), Stopped> {
        if buffer.messages.is_empty() {
            if !buffer.transitions.is_empty() && self.record_idle(&buffer.transitions).await {
                buffer.transitions.clear();
            }
            // Idle firings not recorded wait for the next message's commit, also across a
            // reopened consumer.
            self.unrecorded.append(&mut buffer.transitions);
            return Ok(());
        }
        if !self.unrecorded.is_empty() {
            let mut earlier = std::mem::take(&mut self.unrecorded);
            earlier.append(&mut buffer.transitions);
            buffer.transitions = earlier;
        }
        self.process(buffer, stages).await?;
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
    pub(super) async fn record_idle(
        &mut self,
        transitions: &[fleetlake_sql::rules::Transition],
    ) -> bool {
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
    /// read. [`Stopped`] when the batch must not be committed: a `FAIL` expectation stopped the
    /// pipelines (ingest stops, nothing of the batch is written), or the engine is stopping.
    pub(super) async fn run_pipelines(
        &self,
        raw: &arrow::array::RecordBatch,
        buffer: &Buffer,
        stages: &mut Stages,
    ) -> Result<StageOutput, Stopped> {
        let mut backoff = Backoff::new();
        loop {
            match stages.stage.process(raw).await {
                Ok(Ok(out)) => return Ok(out),
                Ok(Err(failure)) => {
                    let stopped = Stopped::pipeline_failed(&self.metrics, failure);
                    self.cancel.cancel();
                    return Err(stopped);
                }
                Err(StageError::Storage(e)) => {
                    storage_failed(&self.metrics, &e);
                    if backoff.wait(&self.cancel).await.is_err() {
                        return Err(self.unfinished(buffer, &e));
                    }
                }
                Err(StageError::Failed(e)) => {
                    let stopped = Stopped::because(&self.metrics, format!("ingest stopped: {e}"));
                    self.cancel.cancel();
                    return Err(stopped);
                }
            }
        }
    }

    /// The state of the dedup filter, the pipelines, windows and rules as of everything taken
    /// so far, to store beside their tables once committed.
    pub(super) fn snapshots(&self, stages: &Stages) -> Vec<Snapshot> {
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
            bytes: SnapshotBytes::Deferred(Box::new(move || view.encode().map_err(Error::from))),
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
