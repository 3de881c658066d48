//! The stream's partitions (`cluster.partitions`): which stored subjects a partition holds, how
//! NATS maps a subject to one, and the rows of a partition in the lake. Settings, imported by the
//! source, the runner and the cluster alike.

use async_nats::jetstream;
use serde::Serialize;

/// The first token of a stored subject, before the partition number.
pub const PREFIX: &str = "fleetlake";

/// One partition of the stream: `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// The stored subjects of this partition: `fleetlake.<index>.>`.
    pub fn filter_subject(&self) -> String {
        format!("{PREFIX}.{}.>", self.index)
    }

    /// The subject a message was published on, from the subject the stream stored
    /// (`fleetlake.<index>.<published>`); a subject without the prefix is returned as it is.
    pub fn published<'a>(&self, stored: &'a str) -> &'a str {
        stored
            .strip_prefix(PREFIX)
            .and_then(|s| s.strip_prefix('.'))
            .and_then(|s| s.split_once('.'))
            .filter(|(n, _)| n.parse::<u32>().is_ok())
            .map_or(stored, |(_, rest)| rest)
    }

    /// A SQL condition (starting with ` AND`) keeping the rows whose `column` (a stream
    /// sequence) is a message of this partition with a sequence in `(after, upto]`: the
    /// messages' subjects in raw.telemetry, mapped as NATS maps them (`nats_partition`).
    pub fn scope(&self, column: &str, after: i64, upto: i64) -> String {
        format!(
            " AND {column} IN (SELECT stream_seq FROM raw.telemetry WHERE stream_seq > {after} \
             AND stream_seq <= {upto} AND nats_partition(subject, {}) = {})",
            self.count, self.index
        )
    }
}

/// [`Partition::scope`] for an optional partition: empty without one (the whole stream).
pub fn scope(partition: Option<Partition>, column: &str, after: i64, upto: i64) -> String {
    partition
        .map(|p| p.scope(column, after, upto))
        .unwrap_or_default()
}

/// The stream's subject mapping for `partitions` partitions (`None` for 0): every subject
/// `s` is stored as `fleetlake.<nats_partition(s, P)>.s`.
pub fn subject_transform(partitions: u32) -> Option<jetstream::stream::SubjectTransform> {
    (partitions > 0).then(|| jetstream::stream::SubjectTransform {
        source: ">".into(),
        destination: format!("{PREFIX}.{{{{partition({partitions})}}}}.>"),
    })
}
