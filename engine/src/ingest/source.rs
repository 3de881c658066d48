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
    /// The stream sequence this source was asked to start at (the lake's position).
    pub start: u64,
    /// The first stream sequence it can deliver: `start`, or the stream's first message when
    /// its retention has removed the messages before.
    pub first: u64,
    /// The stream, for reading a message by its sequence.
    stream: stream::Stream,
    /// The consumer, for what the server says it delivered.
    consumer: consumer::PullConsumer,
}

/// Why the source will not open: the stream is not the one the lake's positions refer to.
/// Retrying cannot fix it; an operator must decide (see the README, "A recreated stream").
#[derive(Debug, thiserror::Error)]
#[error(
    "stream {stream} ends at sequence {last}, but the lake has committed messages up to sequence {committed} from it: \
     the stream was deleted and created again (or is another stream), and consuming it would skip its first {committed} messages. \
     Nothing was consumed. To take the new stream from its start, run serve with a new consumer name \
     (--set nats.consumer=<new name>): its positions start at sequence 1, the tables keep their rows"
)]
pub struct StreamMismatch {
    pub stream: String,
    pub last: u64,
    pub committed: u64,
}

/// Why [`Source::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// NATS is unreachable or failing: retried with backoff.
    #[error(transparent)]
    Nats(#[from] SourceError),
    /// Retrying cannot help: ingest stops.
    #[error(transparent)]
    Mismatch(#[from] StreamMismatch),
}

/// A message read by its stream sequence (see [`Source::fetch`]).
pub struct Fetched {
    pub subject: String,
    pub payload: Vec<u8>,
    pub msg_id: Option<String>,
}

impl Source {
    /// (Re)creates the durable pull consumer at `start` (a stream sequence, 1-based) and opens
    /// its message stream.
    ///
    /// Refuses ([`OpenError::Mismatch`]) a stream that ends before `start - 1`: the lake has
    /// committed messages this stream never held, so it is not the stream the lake's positions
    /// refer to (it was deleted and created again). Messages the stream no longer holds (its
    /// retention removed them before they were consumed) are logged as lost.
    pub async fn open(config: &Config, start: u64) -> Result<Self, OpenError> {
        let started = std::time::Instant::now();
        let js = connect(config.nats_url()).await?;
        let mut stream = ensure_stream(&js, config).await?;
        let state = stream
            .info()
            .await
            .map_err(|e| err("reading the stream's state")(&e))?
            .state
            .clone();
        let committed = start.saturating_sub(1);
        if committed > state.last_sequence {
            return Err(StreamMismatch {
                stream: config.stream().to_string(),
                last: state.last_sequence,
                committed,
            }
            .into());
        }
        let first = if state.messages > 0 {
            start.max(state.first_sequence)
        } else {
            start
        };
        if first > start {
            tracing::error!(
                from = start,
                to = state.first_sequence - 1,
                "the stream no longer holds these messages (its retention removed them before fleetlake consumed them): they are not in the lake"
            );
        }
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
        Ok(Self {
            messages,
            start,
            first,
            stream,
            consumer,
        })
    }

    /// The highest stream sequence the server has delivered to this consumer (whether or not
    /// the client library handed it over).
    pub async fn delivered(&self) -> Result<u64, SourceError> {
        self.consumer
            .get_info()
            .await
            .map(|info| info.delivered.stream_sequence)
            .map_err(|e| err("reading the consumer's state")(&e))
    }

    /// Reads the message at stream sequence `seq` directly (not through the consumer): for a
    /// message the client library did not deliver (it drops one whose subject or headers it
    /// cannot parse). `None` when the stream holds no message there (deleted).
    pub async fn fetch(&self, seq: u64) -> Result<Option<Fetched>, SourceError> {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        match self.stream.get_raw_message(seq).await {
            Ok(m) => Ok(Some(Fetched {
                subject: m.subject.to_string(),
                payload: m.payload.to_vec(),
                msg_id: m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str().to_string()),
            })),
            Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(err("reading a message by its sequence")(&e)),
        }
    }

    /// The next message, or an error when the consumer is lost.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, SourceError>> {
        self.messages
            .next()
            .await
            .map(|r| r.map_err(|e| err("receiving")(&e)))
    }
}
