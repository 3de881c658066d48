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
}

/// The stream's subject mapping for `partitions` partitions (`None` for 0): every subject
/// `s` is stored as `fleetlake.<nats_partition(s, P)>.s`.
pub fn subject_transform(partitions: u32) -> Option<jetstream::stream::SubjectTransform> {
    (partitions > 0).then(|| jetstream::stream::SubjectTransform {
        source: ">".into(),
        destination: format!("{PREFIX}.{{{{partition({partitions})}}}}.>"),
    })
}

impl From<Partition> for fleetlake_sql::restore::StreamPartition {
    fn from(p: Partition) -> Self {
        Self {
            index: p.index,
            count: p.count,
        }
    }
}
