//! Contiguity: every stream sequence is taken once and in order. Redeliveries, gaps the client
//! library left (a delivery it dropped, fetched by its sequence) and a source lost mid-batch.

use super::*;

impl Ingest {
    /// Records that the engine stops (cancelled) with messages taken but not committed, because
    /// `reason` kept failing: they are not acknowledged and come back at the next start, and
    /// `serve` exits non-zero saying so.
    pub(super) fn unfinished(&self, buffer: &Buffer, reason: &str) -> Stopped {
        if buffer.messages.is_empty() {
            return Stopped::cancelled();
        }
        let first = buffer.messages.first().map_or(0, |m| m.stream_seq);
        let last = buffer.messages.last().map_or(0, |m| m.stream_seq);
        Stopped::because(
            &self.metrics,
            format!(
                "shutdown: stream sequences {first}..={last} were not committed ({reason}); they are not acknowledged and come back at the next start"
            ),
        )
    }

    /// Takes `message` after the messages the client did not deliver before it (see
    /// [`Ingest::fill_gap`]): false for a redelivery of one already taken.
    pub(super) async fn take_contiguous(
        &mut self,
        source: &Source,
        message: jetstream::Message,
        buffer: &mut Buffer,
        highest_seen: &mut u64,
    ) -> Result<bool, Error> {
        self.fill_gap(source, &message, buffer, highest_seen)
            .await?;
        Ok(self.take(source, message, buffer, highest_seen))
    }

    /// The consumer failed (`reason`): commits what was taken, then reopens it.
    pub(super) async fn lose_source(
        &mut self,
        buffer: &mut Buffer,
        stages: &mut Stages,
        reason: String,
    ) -> Pumped {
        if let Err(stopped) = self.flush(buffer, stages).await {
            return Pumped::Stopped(stopped);
        }
        Pumped::SourceLost(reason)
    }

    /// Keeps what ingest takes contiguous: when `message` is ahead of the next stream sequence
    /// expected, the messages in between were not delivered (async-nats drops a delivery whose
    /// subject or headers it cannot parse, without an error), so each is read directly by its
    /// sequence and taken as received; one the stream no longer holds (deleted) is skipped. An
    /// error reading one is returned: nothing at or past it may be acknowledged.
    pub(super) async fn fill_gap(
        &self,
        source: &Source,
        message: &jetstream::Message,
        buffer: &mut Buffer,
        highest_seen: &mut u64,
    ) -> Result<(), Error> {
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
    pub(super) async fn fetch_before(
        &self,
        source: &Source,
        next: u64,
        buffer: &mut Buffer,
        highest_seen: &mut u64,
    ) -> Result<(), Error> {
        while *highest_seen + 1 < next {
            if self.cancel.is_cancelled() {
                return Err(Error::Unavailable("ingest is stopping".into()));
            }
            let seq = *highest_seen + 1;
            let found = source.fetch(seq).await.context(format!(
                "stream sequence {seq} was not delivered and could not be read"
            ))?;
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
    pub(super) fn take(
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
}
