//! Deduplication of device replays, before the usable zone.
//!
//! Devices that reconnect replay what they buffered, minutes or hours later and as new publishes,
//! so JetStream's own duplicate window does not catch them. Two keys are offered:
//!
//! - [`DedupKey::DeviceSeq`] (default): `(device_id, seq)`. Per device the state is the set of
//!   sequence numbers seen, kept as sorted, disjoint intervals. A device that counts up without
//!   losing messages needs one interval (16 bytes) whatever its history; every lost-and-never-
//!   replayed reading adds one gap. At most `max_gaps` gaps are kept per device: beyond that the
//!   oldest interval is forgotten, so a replay of those oldest readings would pass (counted in
//!   [`DedupStats::forgotten`]); nothing new is ever dropped by mistake.
//! - [`DedupKey::MsgId`]: the `Nats-Msg-Id` header (rows without one pass), remembered for
//!   `window` of received time as 64-bit hashes in per-minute buckets.
//!
//! The state is a pure in-memory structure; [`DedupState::encode`]/[`DedupState::decode`] turn it
//! into bytes for the snapshots the engine stores beside the usable table, and
//! [`DedupState::observe`] rebuilds it from rows the usable zone already holds.

use std::collections::{HashMap, HashSet, VecDeque};

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};

use crate::{Error, Result};

/// What identifies a reading for deduplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupKey {
    /// `(device_id, seq)`.
    DeviceSeq,
    /// The `Nats-Msg-Id` header.
    MsgId,
    /// No deduplication.
    None,
}

impl DedupKey {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "device_seq" => Some(Self::DeviceSeq),
            "msg_id" => Some(Self::MsgId),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// Counters of what deduplication did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupStats {
    /// Rows dropped as replays.
    pub dropped: u64,
    /// Intervals forgotten because a device had more than `max_gaps` gaps.
    pub forgotten: u64,
}

/// Seen sequence numbers of one device: sorted, disjoint, non-adjacent inclusive intervals.
/// One interval is stored inline, more spill to the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    One(i64, i64),
    Many(Vec<(i64, i64)>),
}

impl Seen {
    /// Records `seq`; false if it was already there.
    fn insert(&mut self, seq: i64, max_gaps: usize) -> (bool, u64) {
        // Fast path: the next reading of a device that counts up.
        if let Seen::One(a, b) = self {
            // Checked: a device may send i64::MAX (there is no next reading then).
            if b.checked_add(1) == Some(seq) {
                *b = seq;
                return (true, 0);
            }
            if (*a..=*b).contains(&seq) {
                return (false, 0);
            }
        }
        let mut v = match std::mem::replace(self, Seen::Many(Vec::new())) {
            Seen::One(a, b) => vec![(a, b)],
            Seen::Many(v) => v,
        };
        let pos = v.partition_point(|(_, b)| *b < seq);
        if pos < v.len() && v[pos].0 <= seq {
            *self = Self::from_vec(v);
            return (false, 0);
        }
        let joins_left = pos > 0 && v[pos - 1].1.checked_add(1) == Some(seq);
        let joins_right = pos < v.len() && v[pos].0.checked_sub(1) == Some(seq);
        match (joins_left, joins_right) {
            (true, true) => {
                v[pos - 1].1 = v[pos].1;
                v.remove(pos);
            }
            (true, false) => v[pos - 1].1 = seq,
            (false, true) => v[pos].0 = seq,
            (false, false) => v.insert(pos, (seq, seq)),
        }
        let mut forgotten = 0;
        while v.len() > max_gaps.saturating_add(1) {
            v.remove(0);
            forgotten += 1;
        }
        *self = Self::from_vec(v);
        (true, forgotten)
    }

    fn from_vec(v: Vec<(i64, i64)>) -> Self {
        if v.len() == 1 {
            Seen::One(v[0].0, v[0].1)
        } else {
            Seen::Many(v)
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Seen::One(..) => 0,
            Seen::Many(v) => v.capacity() * 16,
        }
    }
}

/// Deduplication state for one consumer.
#[derive(Debug, Clone)]
pub struct DedupState {
    key: DedupKey,
    /// DeviceSeq: the columns holding the device and its sequence number.
    columns: (String, String),
    max_gaps: usize,
    devices: HashMap<Box<str>, Seen>,
    /// MsgId mode: buckets of hashes per received minute, oldest first.
    buckets: VecDeque<(i64, HashSet<u64>)>,
    window_minutes: i64,
    stats: DedupStats,
}

/// Default number of gaps remembered per device.
pub const DEFAULT_MAX_GAPS: usize = 64;

impl DedupState {
    pub fn new(key: DedupKey, max_gaps: usize, window_minutes: i64) -> Self {
        Self {
            key,
            columns: ("device_id".into(), "seq".into()),
            max_gaps,
            devices: HashMap::new(),
            buckets: VecDeque::new(),
            window_minutes: window_minutes.max(1),
            stats: DedupStats::default(),
        }
    }

    pub fn key(&self) -> DedupKey {
        self.key
    }

    /// DeviceSeq over other columns: `device` (any type, compared as text) and `seq` (an integer).
    pub fn with_columns(mut self, device: &str, seq: &str) -> Self {
        self.columns = (device.to_string(), seq.to_string());
        self
    }

    pub fn stats(&self) -> DedupStats {
        self.stats
    }

    /// Devices (DeviceSeq) or message ids (MsgId) remembered.
    pub fn len(&self) -> usize {
        match self.key {
            DedupKey::DeviceSeq => self.devices.len(),
            DedupKey::MsgId => self.buckets.iter().map(|(_, s)| s.len()).sum(),
            DedupKey::None => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes held, estimated from capacities (the measured figure is in the README).
    pub fn estimated_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(Box<str>, Seen)>() + 1;
        let devices = self.devices.capacity() * slot
            + self
                .devices
                .iter()
                .map(|(k, v)| k.len() + v.heap_bytes())
                .sum::<usize>();
        let ids: usize = self.buckets.iter().map(|(_, s)| s.capacity() * 9).sum();
        devices + ids
    }

    /// Keeps the rows of a usable batch that were not seen before and records them.
    pub fn filter(&mut self, usable: &RecordBatch) -> Result<RecordBatch> {
        if self.key == DedupKey::None || usable.num_rows() == 0 {
            return Ok(usable.clone());
        }
        let keep = self.mark(usable, true)?;
        let dropped = keep.iter().filter(|k| !*k).count() as u64;
        self.stats.dropped += dropped;
        if dropped == 0 {
            return Ok(usable.clone());
        }
        filter_record_batch(usable, &BooleanArray::from(keep))
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Which rows of `batch` are new (true) or replays (false); records them.
    pub fn keep_mask(&mut self, batch: &RecordBatch) -> Result<Vec<bool>> {
        if self.key == DedupKey::None || batch.num_rows() == 0 {
            return Ok(vec![true; batch.num_rows()]);
        }
        let keep = self.mark(batch, true)?;
        self.stats.dropped += keep.iter().filter(|k| !*k).count() as u64;
        Ok(keep)
    }

    /// Records rows the usable zone already holds (rebuilding after a restart).
    pub fn observe(&mut self, usable: &RecordBatch) -> Result<()> {
        if self.key != DedupKey::None {
            self.mark(usable, false)?;
        }
        Ok(())
    }

    fn mark(&mut self, batch: &RecordBatch, count_forgotten: bool) -> Result<Vec<bool>> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| Error::Internal(format!("deduplication needs column {name}")))
        };
        let n = batch.num_rows();
        let mut keep = Vec::with_capacity(n);
        match self.key {
            DedupKey::DeviceSeq => {
                let devices = arrow::compute::cast(
                    column(&self.columns.0)?,
                    &arrow::datatypes::DataType::Utf8,
                )
                .map_err(|e| Error::Internal(e.to_string()))?;
                let devices = devices.as_string::<i32>();
                let seqs = arrow::compute::cast(
                    column(&self.columns.1)?,
                    &arrow::datatypes::DataType::Int64,
                )
                .map_err(|e| Error::Internal(e.to_string()))?;
                let seqs = seqs.as_primitive::<Int64Type>();
                for i in 0..n {
                    if devices.is_null(i) || seqs.is_null(i) {
                        keep.push(true);
                        continue;
                    }
                    let (device, seq) = (devices.value(i), seqs.value(i));
                    // Rebuilding (observing committed rows) never forgets: rows may come in any
                    // order, and the state must end up holding all of them.
                    let max_gaps = if count_forgotten {
                        self.max_gaps
                    } else {
                        usize::MAX
                    };
                    let (new, forgotten) = match self.devices.get_mut(device) {
                        Some(seen) => seen.insert(seq, max_gaps),
                        None => {
                            self.devices.insert(device.into(), Seen::One(seq, seq));
                            (true, 0)
                        }
                    };
                    if count_forgotten {
                        self.stats.forgotten += forgotten;
                    }
                    keep.push(new);
                }
            }
            DedupKey::MsgId => {
                let ids =
                    arrow::compute::cast(column("msg_id")?, &arrow::datatypes::DataType::Utf8)
                        .map_err(|e| Error::Internal(e.to_string()))?;
                let ids = ids.as_string::<i32>();
                let received = column("received_at")?.as_primitive::<TimestampMicrosecondType>();
                for i in 0..n {
                    if ids.is_null(i) {
                        keep.push(true);
                        continue;
                    }
                    let minute = received.value(i).div_euclid(60_000_000);
                    keep.push(self.insert_id(ids.value(i), minute));
                }
            }
            DedupKey::None => keep.resize(n, true),
        }
        Ok(keep)
    }

    fn insert_id(&mut self, id: &str, minute: i64) -> bool {
        // Stable: the hashes are stored in snapshots that outlive the process.
        let hash = crate::hash::fnv1a(id.as_bytes());
        if self.buckets.iter().any(|(_, s)| s.contains(&hash)) {
            return false;
        }
        match self.buckets.back_mut() {
            Some((m, set)) if *m >= minute => {
                set.insert(hash);
            }
            _ => {
                self.buckets.push_back((minute, HashSet::from([hash])));
            }
        }
        let newest = self.buckets.back().map(|(m, _)| *m).unwrap_or(minute);
        while self
            .buckets
            .front()
            .is_some_and(|(m, _)| *m <= newest.saturating_sub(self.window_minutes))
        {
            self.buckets.pop_front();
        }
        true
    }

    /// Serializes the state (snapshot format version 1, little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.devices.len() * 32);
        out.extend_from_slice(b"FLDEDUP1");
        out.push(match self.key {
            DedupKey::DeviceSeq => 0,
            DedupKey::MsgId => 1,
            DedupKey::None => 2,
        });
        out.extend_from_slice(&(self.devices.len() as u64).to_le_bytes());
        for (device, seen) in &self.devices {
            out.extend_from_slice(&(device.len() as u32).to_le_bytes());
            out.extend_from_slice(device.as_bytes());
            let intervals = seen_vec(seen);
            out.extend_from_slice(&(intervals.len() as u32).to_le_bytes());
            for (a, b) in intervals {
                out.extend_from_slice(&a.to_le_bytes());
                out.extend_from_slice(&b.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.buckets.len() as u64).to_le_bytes());
        for (minute, set) in &self.buckets {
            out.extend_from_slice(&minute.to_le_bytes());
            out.extend_from_slice(&(set.len() as u64).to_le_bytes());
            for h in set {
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        out
    }

    /// A snapshot read back with this state's settings (key, columns, gaps, window); an error if
    /// it was taken with another key.
    pub fn restore(&self, bytes: &[u8]) -> Result<Self> {
        let mut state = Self::decode(bytes, self.max_gaps, self.window_minutes)?;
        if state.key != self.key {
            return Err(Error::Internal(
                "dedup snapshot was taken with another key".into(),
            ));
        }
        state.columns = self.columns.clone();
        Ok(state)
    }

    /// Reads a snapshot written by [`DedupState::encode`] into a state with these settings.
    pub fn decode(bytes: &[u8], max_gaps: usize, window_minutes: i64) -> Result<Self> {
        let bad = |what: &str| Error::Internal(format!("dedup snapshot is damaged: {what}"));
        let mut r = Reader { bytes, pos: 0 };
        if r.take(8).ok_or_else(|| bad("too short"))? != b"FLDEDUP1" {
            return Err(bad("unknown format"));
        }
        let key = match r.take(1).ok_or_else(|| bad("no key"))?[0] {
            0 => DedupKey::DeviceSeq,
            1 => DedupKey::MsgId,
            _ => DedupKey::None,
        };
        let mut state = DedupState::new(key, max_gaps, window_minutes);
        let devices = r.u64().ok_or_else(|| bad("no device count"))?;
        state.devices.reserve(devices as usize);
        for _ in 0..devices {
            let len = r.u32().ok_or_else(|| bad("device"))? as usize;
            let name = std::str::from_utf8(r.take(len).ok_or_else(|| bad("device"))?)
                .map_err(|_| bad("device id"))?;
            let count = r.u32().ok_or_else(|| bad("intervals"))? as usize;
            let mut v = Vec::with_capacity(count);
            for _ in 0..count {
                let a = r.i64().ok_or_else(|| bad("interval"))?;
                let b = r.i64().ok_or_else(|| bad("interval"))?;
                v.push((a, b));
            }
            if v.is_empty() {
                return Err(bad("device without intervals"));
            }
            state.devices.insert(name.into(), Seen::from_vec(v));
        }
        let buckets = r.u64().ok_or_else(|| bad("no bucket count"))?;
        for _ in 0..buckets {
            let minute = r.i64().ok_or_else(|| bad("bucket"))?;
            let len = r.u64().ok_or_else(|| bad("bucket"))? as usize;
            let mut set = HashSet::with_capacity(len);
            for _ in 0..len {
                set.insert(r.u64().ok_or_else(|| bad("hash"))?);
            }
            state.buckets.push_back((minute, set));
        }
        if r.pos != bytes.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(state)
    }
}

fn seen_vec(seen: &Seen) -> Vec<(i64, i64)> {
    match seen {
        Seen::One(a, b) => vec![(*a, *b)],
        Seen::Many(v) => v.clone(),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use std::sync::Arc;

    fn batch(rows: &[(&str, i64)]) -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("seq", DataType::Int64, false),
            Field::new("msg_id", DataType::Utf8, true),
            Field::new(
                "received_at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| format!("{}-{}", r.0, r.1)),
                )),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        rows.iter().map(|r| r.1.wrapping_mul(60_000_000)),
                    )
                    .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap()
    }

    fn kept(state: &mut DedupState, rows: &[(&str, i64)]) -> Vec<i64> {
        let out = state.filter(&batch(rows)).unwrap();
        out.column(1).as_primitive::<Int64Type>().values().to_vec()
    }

    #[test]
    fn replays_are_dropped_within_and_across_batches() {
        let mut s = DedupState::new(DedupKey::DeviceSeq, 4, 60);
        assert_eq!(
            kept(&mut s, &[("a", 1), ("a", 2), ("b", 1), ("a", 2)]),
            vec![1, 2, 1]
        );
        assert_eq!(
            kept(&mut s, &[("a", 1), ("a", 3), ("b", 1), ("b", 5)]),
            vec![3, 5]
        );
        // A late reading that fills a gap is new; its replay is not.
        assert_eq!(
            kept(&mut s, &[("b", 3), ("b", 3), ("b", 2), ("b", 4)]),
            vec![3, 2, 4]
        );
        assert_eq!(s.stats().dropped, 4);
        // b is contiguous again: one interval, no heap.
        assert_eq!(s.devices["b"], Seen::One(1, 5));
    }

    #[test]
    fn gaps_are_bounded_and_forgetting_never_drops_new_readings() {
        let mut s = DedupState::new(DedupKey::DeviceSeq, 2, 60);
        // 1, 3, 5, 7: three gaps, one more than allowed: the oldest interval is forgotten.
        assert_eq!(
            kept(&mut s, &[("a", 1), ("a", 3), ("a", 5), ("a", 7)]),
            vec![1, 3, 5, 7]
        );
        assert_eq!(s.stats().forgotten, 1);
        assert_eq!(kept(&mut s, &[("a", 2), ("a", 4), ("a", 6)]), vec![2, 4, 6]);
        assert_eq!(kept(&mut s, &[("a", 3), ("a", 7)]), Vec::<i64>::new());
    }

    #[test]
    fn rebuilding_from_rows_in_any_order_forgets_nothing() {
        let mut s = DedupState::new(DedupKey::DeviceSeq, 2, 60);
        // 1..=40 for one device, interleaved so that many gaps are open at once.
        let order: Vec<i64> = (1..=40)
            .filter(|i| i % 2 == 1)
            .chain((1..=40).filter(|i| i % 2 == 0))
            .collect();
        let rows: Vec<(&str, i64)> = order.iter().map(|i| ("a", *i)).collect();
        s.observe(&batch(&rows)).unwrap();
        assert_eq!(s.devices["a"], Seen::One(1, 40));
        assert_eq!(kept(&mut s, &[("a", 7), ("a", 40), ("a", 41)]), vec![41]);
    }

    #[test]
    fn snapshots_round_trip_exactly() {
        let mut s = DedupState::new(DedupKey::DeviceSeq, 8, 60);
        kept(
            &mut s,
            &[("a", 1), ("a", 2), ("a", 9), ("b", 4), ("ü-ñ", 7)],
        );
        let bytes = s.encode();
        let mut back = DedupState::decode(&bytes, 8, 60).unwrap();
        assert_eq!(back.devices, s.devices);
        assert_eq!(
            kept(&mut back, &[("a", 9), ("a", 3), ("ü-ñ", 7), ("c", 1)]),
            vec![3, 1]
        );
        assert!(DedupState::decode(&bytes[..bytes.len() - 1], 8, 60).is_err());
        assert!(DedupState::decode(b"nonsense", 8, 60).is_err());
    }

    #[test]
    fn message_ids_are_remembered_for_the_window() {
        let mut s = DedupState::new(DedupKey::MsgId, 0, 10);
        // received_at minute = seq in this fixture.
        assert_eq!(kept(&mut s, &[("a", 1), ("a", 1), ("b", 2)]), vec![1, 2]);
        assert_eq!(kept(&mut s, &[("a", 1)]), Vec::<i64>::new());
        // Eleven minutes later the first minute has left the window.
        assert_eq!(kept(&mut s, &[("z", 12), ("a", 1)]), vec![12, 1]);
        let back = DedupState::decode(&s.encode(), 0, 10).unwrap();
        assert_eq!(back.len(), s.len());
    }

    #[test]
    fn sequence_numbers_at_the_edges_of_the_integer_range_do_not_overflow() {
        let mut state = DedupState::new(DedupKey::DeviceSeq, DEFAULT_MAX_GAPS, 60);
        assert_eq!(
            kept(&mut state, &[("m", i64::MAX), ("m", 1)]),
            vec![i64::MAX, 1]
        );
        assert_eq!(
            kept(&mut state, &[("m", i64::MAX), ("m", 2), ("m", 1)]),
            vec![2]
        );
        assert_eq!(
            kept(&mut state, &[("n", i64::MIN), ("n", i64::MIN + 1)]),
            vec![i64::MIN, i64::MIN + 1]
        );
        assert_eq!(kept(&mut state, &[("n", i64::MIN)]), Vec::<i64>::new());
    }
}
