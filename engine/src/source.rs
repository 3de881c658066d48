//! The NATS JetStream source: the stream, the durable pull consumer, and its messages.
//!
//! The lake, not the consumer, holds fleetlake's progress (see `fleetlake_zones::lake`). Each time
//! the source opens it recreates the durable consumer to start right after the lowest position
//! every table has committed, so a crash between a commit and its ack, or between two tables'
//! commits, is resumed exactly where the lake stands.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;

use crate::config::Config;

/// Errors talking to NATS (an outside system: retried with backoff).
#[derive(Debug, thiserror::Error)]
#[error("NATS {action}: {reason}")]
pub struct SourceError {
    pub action: &'static str,
    pub reason: String,
}

fn err(action: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> SourceError {
    move |e| SourceError {
        action,
        reason: e.to_string(),
    }
}

/// Connects to NATS and returns a JetStream context.
pub async fn connect(url: &str) -> Result<jetstream::Context, SourceError> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        // Reconnect quickly after a server restart (the default backs off to several seconds).
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(1_000))
        })
        .connect(url)
        .await
        .map_err(|e| err("connecting")(&e))?;
    Ok(jetstream::new(client))
}

/// Creates the stream if absent (`nats.stream` on `nats.subjects`, file storage).
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &Config,
) -> Result<stream::Stream, SourceError> {
    js.get_or_create_stream(stream::Config {
        name: config.stream().to_string(),
        subjects: config.subjects(),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| err("creating the stream")(&e))
}

/// An open consumer: its message stream.
pub struct Source {
    pub messages: consumer::pull::Stream,
    /// The first stream sequence this source delivers.
    pub start: u64,
}

impl Source {
    /// (Re)creates the durable pull consumer at `start` (a stream sequence, 1-based) and opens
    /// its message stream.
    pub async fn open(config: &Config, start: u64) -> Result<Self, SourceError> {
        let started = std::time::Instant::now();
        let js = connect(config.nats_url()).await?;
        let stream = ensure_stream(&js, config).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "stream ready");
        // Deleting a consumer that does not exist is fine: the lake decides where to start.
        let deleted = stream.delete_consumer(config.consumer()).await;
        tracing::debug!(elapsed = ?started.elapsed(), deleted = deleted.is_ok(), "old consumer deleted");
        let deliver_policy = if start <= 1 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            }
        };
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(config.consumer().to_string()),
                deliver_policy,
                ack_policy: consumer::AckPolicy::All,
                ack_wait: config.ack_wait(),
                // Backpressure: JetStream stops delivering while this many messages are unacked.
                max_ack_pending: (config.commit_rows() * 2).max(config.fetch_batch() * 2) as i64,
                ..Default::default()
            })
            .await
            .map_err(|e| err("creating the consumer")(&e))?;
        tracing::debug!(elapsed = ?started.elapsed(), "consumer created");
        let messages = consumer
            .stream()
            .max_messages_per_batch(config.fetch_batch())
            // Short pulls with frequent heartbeats: a restarted server is noticed in seconds.
            .heartbeat(Duration::from_secs(1))
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| err("pulling")(&e))?;
        Ok(Self { messages, start })
    }

    /// The next message, or an error when the consumer is lost.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, SourceError>> {
        self.messages
            .next()
            .await
            .map(|r| r.map_err(|e| err("receiving")(&e)))
    }
}
