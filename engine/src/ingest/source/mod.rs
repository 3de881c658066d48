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
pub use crate::config::nats::NatsConnection;

mod connect;
mod identity;

pub use connect::{connect, connect_watched, connect_with};
pub use identity::{StreamIdentity, StreamMismatch};

/// Errors talking to NATS (an outside system: retried with backoff).
#[derive(Debug, thiserror::Error)]
#[error("NATS {action}: {reason}")]
pub struct SourceError {
    pub action: &'static str,
    pub reason: String,
}

impl From<SourceError> for crate::error::Error {
    /// NATS failing: an outside system, retried.
    fn from(e: SourceError) -> Self {
        crate::error::Error::Unavailable(e.to_string())
    }
}

fn err(action: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> SourceError {
    move |e| SourceError {
        action,
        reason: e.to_string(),
    }
}

/// The action of the error [`ensure_stream`] returns for a stream without the partition mapping
/// the configuration needs: retrying cannot fix it.
const CHECKING_MAPPING: &str = "checking the stream's partition mapping";

/// Creates the stream if absent (`nats.stream` on `nats.subjects`, file storage,
/// `nats.replicas`), with the partition mapping when `cluster.partitions` is set
/// ([`crate::config::partition::subject_transform`]); an existing stream is returned as it is (a consumer
/// checks its mapping with [`check_mapping`]; a publisher need not).
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &Config,
) -> Result<stream::Stream, SourceError> {
    js.get_or_create_stream(stream::Config {
        name: config.stream().to_string(),
        subjects: config.subjects(),
        storage: stream::StorageType::File,
        num_replicas: config.replicas(),
        subject_transform: crate::config::partition::subject_transform(config.partitions()),
        ..Default::default()
    })
    .await
    .map_err(|e| err("creating the stream")(&e))
}

/// Refuses (action [`CHECKING_MAPPING`]) to consume a stream whose partition mapping is not the
/// configuration's: with `cluster.partitions` set, one not mapped to as many partitions (its
/// messages would reach no partition, or a device would move); without, one fleetlake mapped
/// (its stored subjects carry the partition, so no pipeline would match them).
pub fn check_mapping(info: &stream::Info, config: &Config) -> Result<(), SourceError> {
    let transform = crate::config::partition::subject_transform(config.partitions());
    let has = info
        .config
        .subject_transform
        .as_ref()
        .map(|t| (t.source.clone(), t.destination.clone()));
    let wanted = transform.map(|t| (t.source, t.destination));
    let partitioned = |t: &Option<(String, String)>| {
        t.as_ref().is_some_and(|(_, dest)| {
            dest.starts_with(&format!("{}.", crate::config::partition::PREFIX))
        })
    };
    // Without partitions a stream fleetlake partitioned must not be read either: its stored
    // subjects carry the partition, so no pipeline would match them.
    if has != wanted && (wanted.is_some() || partitioned(&has)) {
        let describe = |t: &Option<(String, String)>| match t {
            Some((src, dest)) => format!("the subject transform {src} -> {dest}"),
            None => "no subject transform (no partitions)".to_string(),
        };
        return Err(SourceError {
            action: CHECKING_MAPPING,
            reason: format!(
                "stream {} has {}, but cluster.partitions = {} needs {}. The number of partitions is fixed for a stream's life, \
                 and fleetlake sets the mapping only on a stream it creates: set cluster.partitions to the stream's, or give the \
                 cluster a new stream (nats.stream, with subjects no other stream has, and a new nats.consumer for its positions)",
                config.stream(),
                describe(&has),
                config.partitions(),
                describe(&wanted),
            ),
        });
    }
    Ok(())
}

/// An open consumer: its message stream.
pub struct Source {
    pub messages: consumer::pull::Stream,
    /// The stream sequence this source was asked to start at (the lake's position).
    pub start: u64,
    /// The first stream sequence it can deliver: `start`, or the stream's first message when
    /// its retention has removed the messages before.
    pub first: u64,
    /// The consumer, for what the server says it delivered.
    consumer: consumer::PullConsumer,
    /// For JetStream API requests answered here rather than by async-nats.
    client: async_nats::Client,
    stream_name: String,
    /// The partition consumed, when this is one partition's source: its consumer filters the
    /// partition's subjects, and stored subjects lose their partition prefix when taken.
    partition: Option<crate::config::partition::Partition>,
    /// The consumer sequence of the last delivery seen (see [`Source::delivered_in_order`]).
    last_delivery: std::sync::atomic::AtomicU64,
    /// A delivery came out of order as a redelivery: one may have been dropped before it, so
    /// the next new message is checked by sequence ([`Source::take_suspect`]).
    suspect: std::sync::atomic::AtomicBool,
}

/// Why [`Source::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// NATS is unreachable or failing: retried with backoff.
    #[error(transparent)]
    Nats(#[from] SourceError),
    /// The stream's partition mapping is not the configuration's: retrying cannot help.
    #[error("{0}")]
    Mapping(SourceError),
    /// Retrying cannot help: ingest stops.
    #[error(transparent)]
    Mismatch(#[from] StreamMismatch),
    /// The lake (where the stream's identity is kept) could not be read or written: retried.
    #[error("checking which stream the lake's positions belong to: {0}")]
    Lake(String),
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
    /// `committed` is the highest stream sequence any table has committed. Refuses
    /// ([`OpenError::Mismatch`]) a stream that ends before it: the lake has committed messages
    /// this stream never held, so it is not the stream the lake's positions
    /// refer to (it was deleted and created again); so is a stream created at another time than
    /// the one the lake recorded for this consumer ([`StreamIdentity`]), which catches a new
    /// stream that already holds more messages than the lake's position. Messages the stream no longer holds (its
    /// retention removed them before they were consumed) are logged as lost.
    pub async fn open(
        config: &Config,
        lake: &fleetlake_zones::Lake,
        start: u64,
        committed: u64,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Result<Self, OpenError> {
        let started = std::time::Instant::now();
        let js = connect_watched(&config.nats(), metrics).await?;
        let mut stream = ensure_stream(&js, config).await?;
        let info = stream
            .info()
            .await
            .map_err(|e| err("reading the stream's state")(&e))?;
        check_mapping(info, config).map_err(OpenError::Mapping)?;
        let state = info.state.clone();
        if committed > state.last_sequence {
            return Err(StreamMismatch::EndsBefore {
                stream: config.stream().to_string(),
                last: state.last_sequence,
                committed,
            }
            .into());
        }
        let identity = StreamIdentity {
            stream: config.stream().to_string(),
            created: chrono::DateTime::from_timestamp_nanos(
                i64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(i64::MAX),
            )
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        };
        StreamIdentity::check(lake, config.consumer(), &identity, committed).await?;
        // Empty after a purge, the stream's first sequence is the next it will store.
        let first = start.max(state.first_sequence);
        if first > start {
            tracing::error!(
                from = start,
                to = state.first_sequence - 1,
                "the stream no longer holds these messages (its retention removed them before fleetlake consumed them): they are not in the lake"
            );
        }
        tracing::debug!(elapsed = ?started.elapsed(), "stream ready");
        // Deleting a consumer that does not exist is fine: the lake decides where to start.
        let durable = config.durable_name();
        let deleted = stream.delete_consumer(&durable).await;
        tracing::debug!(elapsed = ?started.elapsed(), deleted = deleted.is_ok(), "old consumer deleted");
        if let Some(p) = config.partition() {
            // A partition's earlier owners consumed it under other names (one per lease): their
            // consumers go, so an owner that has not noticed it lost the lease gets nothing more
            // (sharing one consumer, each would skip what the other took).
            let prefix = format!("{}-", config.consumer());
            let mut names = stream.consumer_names();
            let mut stale = Vec::new();
            while let Some(name) = names.next().await {
                let name = name.map_err(|e| err("listing consumers")(&e))?;
                if name != durable
                    && name
                        .strip_prefix(&prefix)
                        .is_some_and(|r| r.parse::<u64>().is_ok())
                {
                    stale.push(name);
                }
            }
            for name in stale {
                tracing::info!(partition = p.index, consumer = %name, "deleting an earlier owner's consumer");
                let _ = stream.delete_consumer(&name).await;
            }
        }
        let deliver_policy = if start <= 1 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            }
        };
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(durable.clone()),
                deliver_policy,
                ack_policy: consumer::AckPolicy::All,
                ack_wait: config.ack_wait(),
                // Backpressure: JetStream stops delivering while this many messages are unacked.
                max_ack_pending: (config.commit_rows() * 2).max(config.fetch_batch() * 2) as i64,
                filter_subject: config
                    .partition()
                    .map(|p| p.filter_subject())
                    .unwrap_or_default(),
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
            consumer,
            client: js.client(),
            stream_name: config.stream().to_string(),
            partition: config.partition(),
            last_delivery: std::sync::atomic::AtomicU64::new(0),
            suspect: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether this source consumes one partition (a filtered consumer): its stream sequences
    /// are not contiguous, only its deliveries are.
    pub fn is_partition(&self) -> bool {
        self.partition.is_some()
    }

    /// The subject a message was published on: the stored subject without the partition prefix
    /// the stream's mapping added (unchanged without partitions).
    pub fn published<'a>(&self, stored: &'a str) -> &'a str {
        match &self.partition {
            Some(p) => p.published(stored),
            None => stored,
        }
    }

    /// For a partition's source: records the delivery with consumer sequence `consumer_seq` and
    /// says whether it directly follows the previous one (nothing was delivered between them
    /// that the client library dropped). The consumer is new (see [`Source::open`]), so its
    /// first delivery is 1.
    pub fn delivered_in_order(&self, consumer_seq: u64) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.last_delivery.swap(consumer_seq, Ordering::Relaxed);
        consumer_seq == last + 1
    }

    /// Marks that a delivery out of order was a redelivery, which says nothing of what was
    /// dropped before it: the next new message is to be checked by sequence.
    pub fn mark_suspect(&self) {
        self.suspect
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a check by sequence is owed (see [`Source::mark_suspect`]); clears it.
    pub fn take_suspect(&self) -> bool {
        self.suspect
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// The next message, or an error when the consumer is lost.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, SourceError>> {
        self.messages
            .next()
            .await
            .map(|r| r.map_err(|e| err("receiving")(&e)))
    }

    /// Whether the server delivered messages the client library never handed over, given the
    /// highest stream sequence taken: `Some(s)`, the highest stream sequence the server has
    /// delivered (the missing ones are at or below it), or `None` when everything delivered was
    /// handed over. A partition's consumer is compared by its deliveries (consumer sequences):
    /// its delivered stream sequence moves past the other partitions' messages.
    pub async fn undelivered(&self, highest_taken: u64) -> Result<Option<u64>, SourceError> {
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|e| err("reading the consumer's state")(&e))?;
        let behind = match self.partition {
            Some(_) => {
                let seen = self
                    .last_delivery
                    .load(std::sync::atomic::Ordering::Relaxed);
                info.delivered.consumer_sequence > seen
            }
            None => info.delivered.stream_sequence > highest_taken,
        };
        Ok(behind.then_some(info.delivered.stream_sequence))
    }

    /// Reads the first message at or after stream sequence `seq` (of this source's partition,
    /// when it is one partition's) directly, not through the consumer: for messages the client
    /// library did not deliver (async-nats drops a delivery whose subject or headers it cannot
    /// parse). See [`next_message`]. Returns the message's sequence and contents (the subject as
    /// published), or `None` when the stream holds nothing at or after `seq`; in the whole
    /// stream, a sequence below the one returned is no longer in the stream (deleted, purged or
    /// removed by its limits).
    pub async fn fetch(&self, seq: u64) -> Result<Option<(u64, Fetched)>, SourceError> {
        let filter = self
            .partition
            .map(|p| p.filter_subject())
            .unwrap_or_else(|| ">".into());
        let found = next_message(&self.client, &self.stream_name, seq, &filter).await?;
        Ok(found.map(|(at, mut fetched)| {
            fetched.subject = self.published(&fetched.subject).to_string();
            (at, fetched)
        }))
    }
}

/// The first message of `stream` at or after sequence `seq` on a subject matching `filter`:
/// JetStream's `STREAM.MSG.GET` with `next_by_subj`, its JSON answer decoded here, leniently
/// (async-nats's own `get_raw_message` refuses headers a device's client may send). Returns its
/// sequence and contents (the subject as stored), or `None` when there is none.
pub async fn next_message(
    client: &async_nats::Client,
    stream: &str,
    seq: u64,
    filter: &str,
) -> Result<Option<(u64, Fetched)>, SourceError> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    struct Answer {
        message: Option<Stored>,
        error: Option<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct Stored {
        subject: String,
        seq: u64,
        #[serde(default)]
        data: String,
        #[serde(default)]
        hdrs: Option<String>,
    }
    let request = serde_json::json!({"seq": seq, "next_by_subj": filter}).to_string();
    let reply = client
        .request(format!("$JS.API.STREAM.MSG.GET.{stream}"), request.into())
        .await
        .map_err(|e| err("reading a message by its sequence")(&e))?;
    let answer: Answer = serde_json::from_slice(&reply.payload)
        .map_err(|e| err("reading a message by its sequence")(&e))?;
    let Some(stored) = answer.message else {
        let code = answer
            .error
            .as_ref()
            .and_then(|e| e["code"].as_u64())
            .unwrap_or(0);
        if code == 404 {
            return Ok(None);
        }
        return Err(SourceError {
            action: "reading a message by its sequence",
            reason: answer.error.map(|e| e.to_string()).unwrap_or_default(),
        });
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = b64
        .decode(stored.data.as_bytes())
        .map_err(|e| err("decoding a message read by its sequence")(&e))?;
    let headers = stored
        .hdrs
        .as_deref()
        .and_then(|h| b64.decode(h.as_bytes()).ok())
        .unwrap_or_default();
    Ok(Some((
        stored.seq,
        Fetched {
            subject: stored.subject,
            payload,
            msg_id: message_id(&headers),
        },
    )))
}

/// The `Nats-Msg-Id` of a header block (`NATS/1.0` line, then `Name: value` lines), read
/// leniently: names compared without case, the value trimmed as async-nats trims it, bytes that
/// are not UTF-8 replaced. Any other header may be malformed.
fn message_id(block: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(block);
    text.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("Nats-Msg-Id")
            .then(|| value.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_id_is_found_among_malformed_headers() {
        let block = "NATS/1.0\r\nGer\u{e4}t: 1\r\nnats-msg-id:  a-1 \r\n\r\n".as_bytes();
        assert_eq!(message_id(block).as_deref(), Some("a-1"));
        assert_eq!(message_id(b"NATS/1.0\r\nX: y\r\n\r\n"), None);
        assert_eq!(message_id(b"\xff\xfe"), None);
    }
}
