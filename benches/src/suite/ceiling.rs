//! The bare ceiling: the fastest a consumer can read and acknowledge the pre-filled stream on
//! this machine, doing nothing else. fleetlake's drain rates are stated as ratios to it.

use async_nats::jetstream::{self, consumer};
use fleetlake_tests::Nats;
use futures::StreamExt;

use crate::{Meter, progress};

/// How the bare consumer acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    /// `AckPolicy::All`, acking every 1,000th message (as fleetlake acks once per commit).
    All,
    /// `AckPolicy::Explicit`, one ack per message.
    Explicit,
}

/// One bare drain.
pub(crate) struct Run {
    pub messages: u64,
    pub seconds: f64,
    pub messages_per_second: f64,
    /// CPU this process and nats-server used (CPU seconds per second).
    pub consumer_cores: f64,
    pub nats_cores: Option<f64>,
    /// Share of the machine's CPU time stolen meanwhile.
    pub steal: f64,
}

/// Reads the default stream (`TELEMETRY`) on `nats_url` from its start with a new durable pull
/// consumer, fetching batches of 1,000 (fleetlake's default `ingest.fetch_batch`) with
/// fleetlake's default `max_ack_pending` (40,000), until `messages` were read and acknowledged.
/// The time includes connecting and creating the consumer.
pub(crate) async fn drain(nats: &Nats, messages: u64, ack: Ack) -> Run {
    progress!("bare consumer ({ack:?} acks)…");
    let meter = Meter::start(nats);
    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let js = jetstream::new(client.clone());
    let stream = js.get_stream("TELEMETRY").await.expect("the stream");
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(format!("ceiling-{ack:?}").to_lowercase()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: match ack {
                Ack::All => consumer::AckPolicy::All,
                Ack::Explicit => consumer::AckPolicy::Explicit,
            },
            max_ack_pending: 40_000,
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let mut batches = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .expect("pulling");
    let mut read = 0u64;
    while read < messages {
        let message = batches
            .next()
            .await
            .expect("the stream ended")
            .expect("a message");
        read += 1;
        if ack == Ack::Explicit || read.is_multiple_of(1000) || read == messages {
            message.ack().await.expect("ack");
        }
    }
    client.flush().await.expect("flush");
    let (seconds, consumer_cores, nats_cores) = meter.stop(None);
    let steal = meter.steal();
    let rate = messages as f64 / seconds;
    progress!(
        "bare consumer ({ack:?} acks): {rate:.0} msg/s, {consumer_cores} cores, nats-server {} cores, steal {steal}",
        nats_cores.map_or("?".into(), |c| c.to_string())
    );
    Run {
        messages,
        seconds,
        messages_per_second: rate,
        consumer_cores,
        nats_cores,
        steal,
    }
}
