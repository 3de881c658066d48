//! Which stream the lake's positions belong to, and the refusal to consume another one (a stream
//! deleted and created again numbers its messages from 1).

use super::*;

/// Why the source will not open: the stream is not the one the lake's positions refer to.
/// Retrying cannot fix it; an operator must decide (see the README, "A recreated stream").
#[derive(Debug, thiserror::Error)]
pub enum StreamMismatch {
    /// The stream ends before the lake's highest committed position.
    #[error(
        "stream {stream} ends at sequence {last}, but the lake has committed messages up to sequence {committed} from it: \
         the stream was deleted and created again (or is another stream), and consuming it would skip its first {committed} messages. \
         Nothing was consumed. {REMEDY}"
    )]
    EndsBefore {
        stream: String,
        last: u64,
        committed: u64,
    },
    /// The stream is not the one whose positions the lake holds (another creation time or
    /// name), though it may already hold more messages than the lake's position.
    #[error(
        "stream {stream} was created at {created}, but the lake's positions (up to sequence {committed}) are of stream {recorded_stream} created at {recorded}: \
         the stream was deleted and created again (or is another stream), and consuming it would skip its first {committed} messages. \
         Nothing was consumed. {REMEDY}"
    )]
    Recreated {
        stream: String,
        created: String,
        recorded_stream: String,
        recorded: String,
        committed: u64,
    },
}

const REMEDY: &str = "To take the new stream from its start, run serve with a new consumer name \
     (--set nats.consumer=<new name>): its positions start at sequence 1, the tables keep their rows";

/// The stream a consumer's positions in the lake are positions of: its name and creation time,
/// kept at `_fleetlake/stream-<consumer>.json`, written when the consumer first takes the
/// stream and checked at every open ([`StreamMismatch::Recreated`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamIdentity {
    pub stream: String,
    /// The stream's creation time as NATS reports it (RFC 3339).
    pub created: String,
}

impl StreamIdentity {
    fn file(consumer: &str) -> String {
        format!("stream-{consumer}.json")
    }

    /// Checks the stream `now` against the identity the lake holds for `consumer`, recording
    /// `now` when there is none yet or nothing has been committed (a new consumer takes the
    /// stream from its start). Errors: [`OpenError::Mismatch`] for another stream,
    /// [`OpenError::Lake`] when the lake cannot be read or written (retried).
    pub async fn check(
        lake: &fleetlake_zones::Lake,
        consumer: &str,
        now: &StreamIdentity,
        committed: u64,
    ) -> Result<(), OpenError> {
        let file = Self::file(consumer);
        let lake_error = |e: fleetlake_zones::Error| OpenError::Lake(e.to_string());
        let recorded = lake.get_lake_file(&file).await.map_err(lake_error)?;
        let recorded: Option<StreamIdentity> =
            recorded.and_then(|bytes| serde_json::from_slice(&bytes).ok());
        match recorded {
            Some(recorded) if recorded == *now => Ok(()),
            Some(recorded) if committed > 0 => Err(StreamMismatch::Recreated {
                stream: now.stream.clone(),
                created: now.created.clone(),
                recorded_stream: recorded.stream,
                recorded: recorded.created,
                committed,
            }
            .into()),
            // First taken by this consumer (or by a version that did not record it).
            _ => {
                let bytes = serde_json::to_vec_pretty(now).expect("serializable");
                lake.put_lake_file(&file, bytes).await.map_err(lake_error)
            }
        }
    }
}
