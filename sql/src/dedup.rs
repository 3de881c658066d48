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
//!
//!   **Restarts.** A device that reboots (or is re-flashed) often starts counting at 1 again
//!   (LoRaWAN servers know it as a "frame counter reset"). With an event-time column
//!   ([`DedupState::with_event_time`]) such a restart is recognised: a reading whose sequence
//!   number is at or below the device's high-water mark but whose event time is newer than every
//!   reading of the device's current run starts a new *run* (counted in
//!   [`DedupStats::restarts`]). The earlier runs are kept (at most [`MAX_EARLIER_RUNS`]), each
//!   with the newest event time it had when it ended, and a later reading goes to the run its
//!   event time falls in: a replay of a reading from before the reboot still finds, and is
//!   dropped by, the run it belongs to. A reading dated between the end of the last earlier run
//!   and the oldest reading of the current one goes to the earlier run when its number continues
//!   that run's counter (taken before the reboot, delivered late), else to the current run (taken
//!   after the reboot, delivered out of order). What this relies on: a replay carries the event time the
//!   reading was taken at (devices that buffer do). A gateway that re-stamps a replay with the
//!   time of sending makes it look like a restart and it is kept; for such fleets use
//!   `dedup_key = 'msg_id'`. A device whose clock also restarts (no real-time clock) cannot be
//!   told from a replay by `(device, seq, time)`: its readings are dropped until the new counter
//!   passes the old high-water mark, as without event time.
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
    /// Intervals forgotten because a device had more than `max_gaps` gaps, or runs forgotten
    /// because it restarted more than [`MAX_EARLIER_RUNS`] times.
    pub forgotten: u64,
    /// Devices seen restarting their sequence numbers (a reboot): their readings are kept.
    pub restarts: u64,
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

    /// The highest sequence number seen.
    fn high(&self) -> i64 {
        match self {
            Seen::One(_, b) => *b,
            Seen::Many(v) => v.last().map_or(i64::MIN, |(_, b)| *b),
        }
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

/// Earlier runs (before a restart) remembered per device; beyond this the oldest is forgotten
/// (counted in [`DedupStats::forgotten`]).
pub const MAX_EARLIER_RUNS: usize = 4;

/// Event time not known (no event-time column, or a NULL time).
const UNKNOWN_TIME: i64 = i64::MIN;

/// One device's state: the sequence numbers of its current run, the oldest and newest event
/// times of that run (µs since the epoch, [`UNKNOWN_TIME`] when none was seen), and its earlier
/// runs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Device {
    seen: Seen,
    oldest_us: i64,
    newest_us: i64,
    /// Runs before restarts, oldest first: the newest event time each had when it ended, and
    /// its sequence numbers. `None` for a device that never restarted; a boxed slice (one word
    /// here), rebuilt at a restart, which is rare.
    earlier: Option<Box<[(i64, Seen)]>>,
}

/// What recording one reading did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marked {
    new: bool,
    forgotten: u64,
    restarted: bool,
}

impl Device {
    fn first(seq: i64, time_us: i64) -> Self {
        Self {
            seen: Seen::One(seq, seq),
            oldest_us: time_us,
            newest_us: time_us,
            earlier: None,
        }
    }

    /// Records reading `seq` taken at `time_us` (or [`UNKNOWN_TIME`]).
    fn insert(&mut self, seq: i64, time_us: i64, max_gaps: usize) -> Marked {
        let known = time_us != UNKNOWN_TIME;
        if let (true, Some(earlier)) = (known, self.earlier.as_deref_mut()) {
            // A reading from before the current run's restart belongs to the run its time falls
            // in; one between the last earlier run and the current run's oldest reading to the
            // earlier run when it continues that run's counter (taken before the reboot,
            // delivered late), else to the current run (taken after the reboot, out of order).
            let within = (0..earlier.len())
                .rev()
                .take_while(|k| time_us <= earlier[*k].0)
                .last();
            let last = earlier.len() - 1;
            let run = within.or_else(|| {
                (self.oldest_us != UNKNOWN_TIME
                    && time_us < self.oldest_us
                    && seq > earlier[last].1.high())
                .then_some(last)
            });
            if let Some(run) = run {
                let (new, forgotten) = earlier[run].1.insert(seq, max_gaps);
                return Marked {
                    new,
                    forgotten,
                    restarted: false,
                };
            }
        }
        if known
            && self.newest_us != UNKNOWN_TIME
            && time_us > self.newest_us
            && seq <= self.seen.high()
        {
            // Counted again from below the high-water mark, later than anything of this run:
            // the device restarted. The run so far becomes an earlier one.
            let ended = std::mem::replace(&mut self.seen, Seen::One(seq, seq));
            let mut earlier = self.earlier.take().map(Vec::from).unwrap_or_default();
            earlier.push((self.newest_us, ended));
            let mut forgotten = 0;
            if earlier.len() > MAX_EARLIER_RUNS {
                earlier.remove(0);
                forgotten = 1;
            }
            self.earlier = Some(earlier.into_boxed_slice());
            self.oldest_us = time_us;
            self.newest_us = time_us;
            return Marked {
                new: true,
                forgotten,
                restarted: true,
            };
        }
        let (new, forgotten) = self.seen.insert(seq, max_gaps);
        if new && known {
            if time_us > self.newest_us {
                self.newest_us = time_us;
            }
            if self.oldest_us == UNKNOWN_TIME || time_us < self.oldest_us {
                self.oldest_us = time_us;
            }
        }
        Marked {
            new,
            forgotten,
            restarted: false,
        }
    }

    fn heap_bytes(&self) -> usize {
        self.seen.heap_bytes()
            + self.earlier.as_ref().map_or(0, |e| {
                e.len() * std::mem::size_of::<(i64, Seen)>()
                    + e.iter().map(|(_, s)| s.heap_bytes()).sum::<usize>()
            })
    }
}

/// Deduplication state for one consumer.
#[derive(Debug, Clone)]
pub struct DedupState {
    key: DedupKey,
    /// DeviceSeq: the columns holding the device and its sequence number.
    columns: (String, String),
    /// DeviceSeq: the event-time column, when restarts are recognised.
    event_time: Option<String>,
    max_gaps: usize,
    devices: HashMap<Box<str>, Device>,
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
            event_time: None,
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

    /// DeviceSeq: recognise restarted sequences by the event time in column `time` (a
    /// timestamp); see the module docs for what this guarantees.
    pub fn with_event_time(mut self, time: &str) -> Self {
        self.event_time = Some(time.to_string());
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
        let slot = std::mem::size_of::<(Box<str>, Device)>() + 1;
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
                let times = match &self.event_time {
                    Some(name) => Some(event_times(column(name)?)?),
                    None => None,
                };
                for i in 0..n {
                    if devices.is_null(i) || seqs.is_null(i) {
                        keep.push(true);
                        continue;
                    }
                    let (device, seq) = (devices.value(i), seqs.value(i));
                    let time = match &times {
                        Some(t) if t.is_valid(i) => t.value(i),
                        _ => UNKNOWN_TIME,
                    };
                    // Rebuilding (observing committed rows) never forgets: rows may come in any
                    // order, and the state must end up holding all of them.
                    let max_gaps = if count_forgotten {
                        self.max_gaps
                    } else {
                        usize::MAX
                    };
                    let marked = match self.devices.get_mut(device) {
                        Some(state) => state.insert(seq, time, max_gaps),
                        None => {
                            self.devices.insert(device.into(), Device::first(seq, time));
                            Marked {
                                new: true,
                                forgotten: 0,
                                restarted: false,
                            }
                        }
                    };
                    if count_forgotten {
                        self.stats.forgotten += marked.forgotten;
                        self.stats.restarts += u64::from(marked.restarted);
                    }
                    keep.push(marked.new);
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

    /// Serializes the state (snapshot format version 2, little-endian): per device its name,
    /// the oldest and newest event times of its current run, the run's intervals, then its earlier runs
    /// (end time and intervals each). Version 1 snapshots (no times) are refused by
    /// [`DedupState::decode`], so the engine rebuilds the state from the usable rows once.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.devices.len() * 40);
        out.extend_from_slice(b"FLDEDUP2");
        out.push(match self.key {
            DedupKey::DeviceSeq => 0,
            DedupKey::MsgId => 1,
            DedupKey::None => 2,
        });
        out.extend_from_slice(&(self.devices.len() as u64).to_le_bytes());
        let put_seen = |out: &mut Vec<u8>, seen: &Seen| {
            let intervals = seen_vec(seen);
            out.extend_from_slice(&(intervals.len() as u32).to_le_bytes());
            for (a, b) in intervals {
                out.extend_from_slice(&a.to_le_bytes());
                out.extend_from_slice(&b.to_le_bytes());
            }
        };
        for (name, device) in &self.devices {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&device.oldest_us.to_le_bytes());
            out.extend_from_slice(&device.newest_us.to_le_bytes());
            put_seen(&mut out, &device.seen);
            let earlier = device.earlier.as_deref().unwrap_or_default();
            out.extend_from_slice(&(earlier.len() as u32).to_le_bytes());
            for (ended, seen) in earlier {
                out.extend_from_slice(&ended.to_le_bytes());
                put_seen(&mut out, seen);
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
        state.event_time = self.event_time.clone();
        Ok(state)
    }

    /// Reads a snapshot written by [`DedupState::encode`] into a state with these settings.
    pub fn decode(bytes: &[u8], max_gaps: usize, window_minutes: i64) -> Result<Self> {
        let bad = |what: &str| Error::Internal(format!("dedup snapshot is damaged: {what}"));
        let mut r = Reader { bytes, pos: 0 };
        match r.take(8).ok_or_else(|| bad("too short"))? {
            b"FLDEDUP2" => {}
            b"FLDEDUP1" => return Err(bad("version 1 (without event times): rebuilt once")),
            _ => return Err(bad("unknown format")),
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
            let oldest_us = r.i64().ok_or_else(|| bad("oldest time"))?;
            let newest_us = r.i64().ok_or_else(|| bad("newest time"))?;
            let seen = read_seen(&mut r).ok_or_else(|| bad("intervals"))?;
            let runs = r.u32().ok_or_else(|| bad("earlier runs"))? as usize;
            let mut earlier = Vec::with_capacity(runs);
            for _ in 0..runs {
                let ended = r.i64().ok_or_else(|| bad("earlier run"))?;
                earlier.push((ended, read_seen(&mut r).ok_or_else(|| bad("earlier run"))?));
            }
            let device = Device {
                seen,
                oldest_us,
                newest_us,
                earlier: (!earlier.is_empty()).then(|| earlier.into_boxed_slice()),
            };
            state.devices.insert(name.into(), device);
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

/// Intervals as [`DedupState::encode`] writes them: a count, then `(from, to)` pairs; `None`
/// when damaged or empty.
fn read_seen(r: &mut Reader<'_>) -> Option<Seen> {
    let count = r.u32()? as usize;
    let mut v = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        v.push((r.i64()?, r.i64()?));
    }
    (!v.is_empty()).then(|| Seen::from_vec(v))
}

/// An event-time column as microseconds since the epoch (any timestamp unit or zone).
fn event_times(column: &arrow::array::ArrayRef) -> Result<arrow::array::Int64Array> {
    use arrow::datatypes::{DataType, TimeUnit};
    let internal = |e: arrow::error::ArrowError| Error::Internal(e.to_string());
    let micros = arrow::compute::cast(column, &DataType::Timestamp(TimeUnit::Microsecond, None))
        .map_err(internal)?;
    let ints = arrow::compute::cast(&micros, &DataType::Int64).map_err(internal)?;
    Ok(ints.as_primitive::<Int64Type>().clone())
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
        assert_eq!(s.devices["b"].seen, Seen::One(1, 5));
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
        assert_eq!(s.devices["a"].seen, Seen::One(1, 40));
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

    /// Rows `(device, seq, event time in seconds)` with an event-time column `ts`.
    fn timed(rows: &[(&str, i64, i64)]) -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("seq", DataType::Int64, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                true,
            ),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(
                    arrow::array::TimestampMillisecondArray::from_iter_values(
                        rows.iter().map(|r| r.2 * 1000),
                    )
                    .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap()
    }

    fn kept_timed(state: &mut DedupState, rows: &[(&str, i64, i64)]) -> Vec<(i64, i64)> {
        let out = state.filter(&timed(rows)).unwrap();
        let seqs = out.column(1).as_primitive::<Int64Type>().values().to_vec();
        let times = out
            .column(2)
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        seqs.into_iter()
            .zip(times.values().iter().map(|t| t / 1000))
            .collect()
    }

    #[test]
    fn a_device_that_restarts_its_sequence_keeps_its_readings_and_replays_are_still_dropped() {
        let mut s = DedupState::new(DedupKey::DeviceSeq, 8, 60).with_event_time("ts");
        // Boot 1: seq 1..=5 at t = 100..=104.
        let boot1: Vec<_> = (1..=5).map(|i| ("d", i, 99 + i)).collect();
        assert_eq!(kept_timed(&mut s, &boot1).len(), 5);
        // Reboot: seq 1..=3 again, later in time; a replay of boot 1 in between.
        assert_eq!(
            kept_timed(
                &mut s,
                &[("d", 1, 200), ("d", 3, 102), ("d", 2, 201), ("d", 3, 202)]
            ),
            vec![(1, 200), (2, 201), (3, 202)]
        );
        assert_eq!(s.stats().restarts, 1);
        // Replays of either run are dropped; a reading of boot 1 never seen is kept.
        assert_eq!(
            kept_timed(
                &mut s,
                &[("d", 2, 101), ("d", 2, 201), ("d", 6, 105), ("d", 4, 203)]
            ),
            vec![(6, 105), (4, 203)]
        );
        assert_eq!(s.stats().dropped, 3);
        assert_eq!(s.stats().restarts, 1);
        // The state survives a snapshot, runs and all.
        let mut back = s.restore(&s.encode()).unwrap();
        assert_eq!(back.devices, s.devices);
        assert_eq!(
            kept_timed(&mut back, &[("d", 3, 102), ("d", 4, 203), ("d", 5, 204)]),
            vec![(5, 204)]
        );
    }

    #[test]
    fn late_readings_out_of_order_are_not_restarts() {
        let mut s = DedupState::new(DedupKey::DeviceSeq, 8, 60).with_event_time("ts");
        // seq 3 arrives before 2 (older time): a late reading, then its replay.
        assert_eq!(
            kept_timed(
                &mut s,
                &[("d", 1, 10), ("d", 3, 12), ("d", 2, 11), ("d", 2, 11)]
            ),
            vec![(1, 10), (3, 12), (2, 11)]
        );
        // A replay re-sent with the same time is a replay, not a restart.
        assert_eq!(kept_timed(&mut s, &[("d", 3, 12)]), vec![]);
        assert_eq!(s.stats().restarts, 0);
        // After a reboot the first readings may arrive out of order too.
        assert_eq!(
            kept_timed(&mut s, &[("d", 2, 21), ("d", 1, 20), ("d", 3, 22)]),
            vec![(2, 21), (1, 20), (3, 22)]
        );
        assert_eq!(s.stats().restarts, 1);
    }

    #[test]
    fn earlier_runs_are_bounded() {
        let mut s = DedupState::new(DedupKey::DeviceSeq, 8, 60).with_event_time("ts");
        for boot in 0..(MAX_EARLIER_RUNS as i64 + 3) {
            let rows: Vec<_> = (1..=3).map(|i| ("d", i, boot * 100 + i)).collect();
            assert_eq!(kept_timed(&mut s, &rows).len(), 3);
        }
        let device = &s.devices["d"];
        assert_eq!(device.earlier.as_ref().unwrap().len(), MAX_EARLIER_RUNS);
        assert_eq!(s.stats().forgotten, 2);
        assert_eq!(s.stats().restarts, MAX_EARLIER_RUNS as u64 + 2);
    }

    #[test]
    fn version_1_snapshots_are_refused_so_the_state_is_rebuilt() {
        let mut v1 = b"FLDEDUP1".to_vec();
        v1.push(0);
        v1.extend_from_slice(&0u64.to_le_bytes());
        v1.extend_from_slice(&0u64.to_le_bytes());
        let err = DedupState::decode(&v1, 8, 60).unwrap_err().to_string();
        assert!(err.contains("version 1"), "{err}");
    }
}
