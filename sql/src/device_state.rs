//! The latest state of every device: for each usable table, the newest reading of each device
//! (every column of its row), when it was last heard from, and its cohort attributes — kept in
//! memory, so a point lookup never scans the lake.
//!
//! ```text
//!  usable rows of a micro-batch ─► DeviceState::update ─► per table: device ─► newest row (chunked Arrow
//!                                                                      batches, compacted), last seen
//!  snapshot (Arrow IPC per table, beside usable.telemetry) + committed rows after it ─► restore
//! ```
//!
//! The newest reading is the row with the greatest (event time `ts`, `stream_seq`): a late
//! reading or a replay never replaces a newer one, and applying the same rows twice changes
//! nothing, so a restore that re-applies rows the snapshot already had is exact. "Last seen" is
//! the arrival of the device's newest message of any event time (received wall-clock time, its
//! stream sequence, and observed stream time — see [`crate::rules::clock`] — which `silent_for`
//! is measured in). Tables without a `device_id` column are not tracked.
//!
//! Memory: one entry per device per table (the device id, 48 bytes of positions and times) plus
//! its row in Arrow form; replaced rows are reclaimed by compaction once they number half the
//! live ones.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray, UInt32Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use fleetlake_zones::TableId;

use crate::{Error, Result};

/// The device column every tracked table has.
pub const DEVICE: &str = "device_id";
/// The event-time column that orders readings (when the table has it; else `stream_seq` alone).
pub const EVENT_TIME: &str = "ts";
/// Cohort columns copied into `final.device_state` when the table has them (`hw_rev` falls back
/// to `hw`).
pub const COHORT: [&str; 5] = ["tenant", "site", "model", "hw_rev", "fw"];

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// Where one device's newest reading is, and when it was last heard from.
#[derive(Debug, Clone, Copy)]
struct Entry {
    chunk: u32,
    row: u32,
    /// Event time (µs) and stream sequence of the newest reading.
    event_us: i64,
    seq: i64,
    /// Arrival of the newest message: received wall clock (µs), stream sequence, observed time.
    seen_wall: i64,
    seen_seq: i64,
    seen_observed: i64,
}

/// One table's devices.
#[derive(Debug)]
struct TableState {
    schema: SchemaRef,
    chunks: Vec<RecordBatch>,
    index: HashMap<String, Entry>,
    /// Rows in `chunks` no entry points at.
    garbage: usize,
}

/// One device's state in one table, as [`DeviceState::lookup`] and [`DeviceState::list`]
/// answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceView {
    pub table: TableId,
    pub device_id: String,
    /// The newest reading: every column of its row, as JSON.
    pub reading: serde_json::Map<String, serde_json::Value>,
    /// Its event time (µs since the epoch; `None` when the table has no `ts` or it was NULL).
    pub event_time: Option<i64>,
    pub stream_seq: i64,
    /// When fleetlake last received a message of the device (µs since the epoch), and its
    /// stream sequence.
    pub last_seen: i64,
    pub last_seen_seq: i64,
    /// Observed stream time since then (seconds).
    pub silent_for_s: f64,
}

/// Filters of [`DeviceState::list`]: each set one must match the cohort column of that name.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub table: Option<TableId>,
    pub cohort: Vec<(String, String)>,
    /// Only devices silent (observed time) for at least this long (µs).
    pub silent_for_us: Option<i64>,
    /// `Some`: only devices whose `tenant` is one of these (a caller bound to tenants); tables
    /// without a tenant column then show none.
    pub tenants: Option<Vec<String>>,
}

/// The latest state of every device of every tracked table (see the module docs).
#[derive(Debug, Default)]
pub struct DeviceState {
    tables: BTreeMap<TableId, TableState>,
    /// Observed stream time as of the last update (µs).
    observed: i64,
    /// Restored after the start: until then it answers nothing (an empty state would say
    /// every device is unknown).
    ready: bool,
}

/// Rows of replaced readings tolerated before a table is compacted, at least.
const COMPACT_MIN: usize = 16_384;

fn text(batch: &RecordBatch, name: &str) -> Option<StringArray> {
    let c = batch.column_by_name(name)?;
    cast(c, &DataType::Utf8)
        .ok()
        .map(|c| c.as_string::<i32>().clone())
}

fn micros(batch: &RecordBatch, name: &str) -> Option<Int64Array> {
    let c = batch.column_by_name(name)?;
    if !matches!(c.data_type(), DataType::Timestamp(_, _)) {
        return None;
    }
    let c = cast(c, &DataType::Timestamp(TimeUnit::Microsecond, None)).ok()?;
    cast(&c, &DataType::Int64)
        .ok()
        .map(|c| c.as_primitive::<Int64Type>().clone())
}

impl TableState {
    fn live(&self) -> usize {
        self.index.len()
    }

    /// Conforms the chunks to `schema` (a table that gained a column) by compacting into it.
    fn evolve(&mut self, schema: &SchemaRef) -> Result<()> {
        let merged = Schema::try_merge([self.schema.as_ref().clone(), schema.as_ref().clone()])
            .map_err(internal)?;
        self.schema = Arc::new(merged);
        self.compact()
    }

    /// Rewrites the live rows into one chunk of the current schema.
    fn compact(&mut self) -> Result<()> {
        let chunks: Vec<RecordBatch> = self
            .chunks
            .iter()
            .map(|c| conform(c, &self.schema))
            .collect::<Result<_>>()?;
        let mut entries: Vec<(&String, &mut Entry)> = self.index.iter_mut().collect();
        entries.sort_by_key(|(_, e)| (e.chunk, e.row));
        let indices: Vec<(usize, usize)> = entries
            .iter()
            .map(|(_, e)| (e.chunk as usize, e.row as usize))
            .collect();
        let refs: Vec<&RecordBatch> = chunks.iter().collect();
        let one = if indices.is_empty() {
            RecordBatch::new_empty(self.schema.clone())
        } else {
            arrow::compute::interleave_record_batch(&refs, &indices).map_err(internal)?
        };
        for (i, (_, e)) in entries.into_iter().enumerate() {
            e.chunk = 0;
            e.row = i as u32;
        }
        self.chunks = vec![one];
        self.garbage = 0;
        Ok(())
    }
}

/// `batch` with `schema`'s columns: missing ones NULL, the rest cast.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema() == *schema {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) => cast(c, f.data_type()).map_err(internal),
            None => Ok(arrow::array::new_null_array(
                f.data_type(),
                batch.num_rows(),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let nullable = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(nullable, columns).map_err(internal)
}

impl DeviceState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the state has been restored after the start (see [`Self::mark_ready`]).
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Says the state is restored and may be answered from.
    pub fn mark_ready(&mut self) {
        self.ready = true;
    }

    /// The error to answer while the state is not [`Self::is_ready`].
    pub fn not_ready() -> Error {
        Error::NotReady(
            "the device state is being restored after a start (snapshot and the rows committed since); try again in a moment".into(),
        )
    }

    /// Observed stream time (µs) as of the last update.
    pub fn observed(&self) -> i64 {
        self.observed
    }

    /// Sets the observed stream time (it never goes back).
    pub fn observe(&mut self, observed: i64) {
        self.observed = self.observed.max(observed);
    }

    /// The tables with device state.
    pub fn tables(&self) -> Vec<TableId> {
        self.tables.keys().cloned().collect()
    }

    /// Devices tracked, over all tables (a device in two tables counts twice).
    pub fn len(&self) -> usize {
        self.tables.values().map(TableState::live).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies rows of `table` (any order). `received_us` is when each row's message arrived
    /// (µs since the epoch): one value for all, or a column aligned with the rows. Rows without
    /// a device are skipped; a table without `device_id` or `stream_seq` is not tracked.
    pub fn update(
        &mut self,
        table: &TableId,
        rows: &RecordBatch,
        received_us: Received,
    ) -> Result<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let (Some(devices), Some(seqs)) = (text(rows, DEVICE), rows.column_by_name("stream_seq"))
        else {
            return Ok(());
        };
        let seqs = cast(seqs, &DataType::Int64).map_err(internal)?;
        let seqs = seqs.as_primitive::<Int64Type>();
        let times = micros(rows, EVENT_TIME);
        let observed = self.observed;
        let state = self
            .tables
            .entry(table.clone())
            .or_insert_with(|| TableState {
                schema: rows.schema(),
                chunks: Vec::new(),
                index: HashMap::new(),
                garbage: 0,
            });
        // A table that gained a column (new firmware's field): the kept rows take it too.
        let schema = rows.schema();
        if schema != state.schema
            && schema
                .fields()
                .iter()
                .any(|f| state.schema.field_with_name(f.name()).is_err())
        {
            state.evolve(&schema)?;
        }
        // First without changing anything (a failure leaves the state as it was): the newest
        // row of each device in these rows if newer than what is kept, and the newest arrival.
        let order = |j: usize| {
            let t = times
                .as_ref()
                .filter(|t| t.is_valid(j))
                .map_or(i64::MIN, |t| t.value(j));
            (t, seqs.value(j))
        };
        let mut winners: HashMap<&str, usize> = HashMap::new();
        let mut arrivals: HashMap<&str, (i64, i64)> = HashMap::new();
        for i in 0..rows.num_rows() {
            if devices.is_null(i) || seqs.is_null(i) {
                continue;
            }
            let device = devices.value(i);
            let seen = match &received_us {
                Received::All(us) => *us,
                Received::Each(c) => c.value(i),
            };
            let (t, seq) = order(i);
            let arrival = arrivals.entry(device).or_insert((i64::MIN, 0));
            if seq > arrival.0 {
                *arrival = (seq, seen);
            }
            if state
                .index
                .get(device)
                .is_some_and(|e| (t, seq) <= (e.event_us, e.seq))
            {
                continue;
            }
            match winners.get(device) {
                Some(&w) if order(w) >= (t, seq) => {}
                _ => {
                    winners.insert(device, i);
                }
            }
        }
        let mut taken: Vec<(&str, usize)> = winners.into_iter().collect();
        taken.sort_by_key(|(_, i)| *i);
        let chunk = if taken.is_empty() {
            None
        } else {
            let indices = UInt32Array::from_iter_values(taken.iter().map(|(_, i)| *i as u32));
            Some(conform(
                &arrow::compute::take_record_batch(rows, &indices).map_err(internal)?,
                &state.schema,
            )?)
        };
        // Then apply.
        for (device, (seq, seen)) in arrivals {
            match state.index.get_mut(device) {
                Some(e) if seq > e.seen_seq => {
                    e.seen_seq = seq;
                    e.seen_wall = seen;
                    e.seen_observed = observed;
                }
                Some(_) => {}
                None => {
                    state.index.insert(
                        device.to_string(),
                        Entry {
                            chunk: u32::MAX,
                            row: 0,
                            event_us: i64::MIN,
                            seq: i64::MIN,
                            seen_wall: seen,
                            seen_seq: seq,
                            seen_observed: observed,
                        },
                    );
                }
            }
        }
        let Some(chunk) = chunk else {
            return Ok(());
        };
        let chunk_no = state.chunks.len() as u32;
        for (row, (device, i)) in taken.iter().enumerate() {
            let e = state.index.get_mut(*device).expect("inserted above");
            if e.chunk != u32::MAX {
                state.garbage += 1;
            }
            let (t, seq) = order(*i);
            e.chunk = chunk_no;
            e.row = row as u32;
            e.event_us = t;
            e.seq = seq;
        }
        state.chunks.push(chunk);
        if state.garbage > COMPACT_MIN.max(state.live() / 2) || state.chunks.len() > 4096 {
            state.compact()?;
        }
        Ok(())
    }

    fn view(&self, table: &TableId, device: &str, state: &TableState, e: &Entry) -> DeviceView {
        let row = state.chunks[e.chunk as usize].slice(e.row as usize, 1);
        DeviceView {
            table: table.clone(),
            device_id: device.to_string(),
            reading: row_json(&row),
            event_time: (e.event_us != i64::MIN).then_some(e.event_us),
            stream_seq: e.seq,
            last_seen: e.seen_wall,
            last_seen_seq: e.seen_seq,
            silent_for_s: (self.observed - e.seen_observed).max(0) as f64 / 1e6,
        }
    }

    /// The device's state in every table that has it (none: an unknown device).
    pub fn lookup(&self, device: &str) -> Vec<DeviceView> {
        self.lookup_for(device, None)
    }

    /// [`Self::lookup`] seen by a caller bound to `tenants` (`None`: every tenant): tables where
    /// the device's `tenant` is not one of them, or that have no tenant column, are left out.
    pub fn lookup_for(&self, device: &str, tenants: Option<&[String]>) -> Vec<DeviceView> {
        self.tables
            .iter()
            .filter_map(|(id, s)| {
                let e = s.index.get(device)?;
                if let Some(tenants) = tenants {
                    let tenant = s
                        .chunks
                        .get(e.chunk as usize)
                        .and_then(|ch| cohort_column(ch, "tenant"))
                        .filter(|c| c.is_valid(e.row as usize))
                        .map(|c| c.value(e.row as usize).to_string())?;
                    if !tenants.contains(&tenant) {
                        return None;
                    }
                }
                Some(self.view(id, device, s, e))
            })
            .collect()
    }

    /// Devices matching `filter`, ordered by table and device id: `offset` skipped, at most
    /// `limit` returned, and how many matched in all.
    pub fn list(
        &self,
        filter: &DeviceFilter,
        offset: usize,
        limit: usize,
    ) -> (Vec<DeviceView>, usize) {
        let mut out = Vec::new();
        let mut matched = 0;
        for (id, s) in &self.tables {
            if filter.table.as_ref().is_some_and(|t| t != id) {
                continue;
            }
            let columns: Vec<(Vec<Option<StringArray>>, &String)> = filter
                .cohort
                .iter()
                .map(|(c, v)| (s.chunks.iter().map(|ch| cohort_column(ch, c)).collect(), v))
                .collect();
            let tenant_column: Vec<Option<StringArray>> = match &filter.tenants {
                Some(_) => s
                    .chunks
                    .iter()
                    .map(|ch| cohort_column(ch, "tenant"))
                    .collect(),
                None => Vec::new(),
            };
            let mut devices: Vec<(&String, &Entry)> = s
                .index
                .iter()
                .filter(|(_, e)| e.chunk != u32::MAX)
                .filter(|(_, e)| {
                    filter
                        .silent_for_us
                        .is_none_or(|d| self.observed - e.seen_observed >= d)
                })
                .filter(|(_, e)| {
                    filter.tenants.as_ref().is_none_or(|tenants| {
                        tenant_column[e.chunk as usize].as_ref().is_some_and(|c| {
                            c.is_valid(e.row as usize)
                                && tenants.iter().any(|t| t == c.value(e.row as usize))
                        })
                    })
                })
                .filter(|(_, e)| {
                    columns.iter().all(|(chunks, value)| {
                        chunks[e.chunk as usize].as_ref().is_some_and(|c| {
                            c.is_valid(e.row as usize) && c.value(e.row as usize) == value.as_str()
                        })
                    })
                })
                .collect();
            devices.sort_by(|a, b| a.0.cmp(b.0));
            for (device, e) in devices {
                if matched >= offset && out.len() < limit {
                    out.push(self.view(id, device, s, e));
                }
                matched += 1;
            }
        }
        (out, matched)
    }

    /// The schema of [`Self::table`] (`final.device_state`).
    pub fn table_schema() -> SchemaRef {
        let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let mut fields = vec![
            Field::new("table_name", DataType::Utf8, false),
            Field::new(DEVICE, DataType::Utf8, false),
        ];
        fields.extend(COHORT.iter().map(|c| Field::new(*c, DataType::Utf8, true)));
        fields.extend([
            Field::new(EVENT_TIME, ts(), true),
            Field::new("stream_seq", DataType::Int64, false),
            Field::new("last_seen", ts(), false),
            Field::new("last_seen_seq", DataType::Int64, false),
            Field::new("silent_for_s", DataType::Float64, false),
            Field::new("reading", DataType::Utf8, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    /// What [`DeviceStateView::table`] needs, copied out so the table is built without holding
    /// up ingest: the chunks (shared, not copied) and each live device's entry, by chunk.
    pub fn view_all(&self) -> DeviceStateView {
        DeviceStateView {
            observed: self.observed,
            tables: self
                .tables
                .iter()
                .map(|(id, s)| {
                    let mut by_chunk: Vec<Vec<(String, Entry)>> = vec![Vec::new(); s.chunks.len()];
                    for (d, e) in &s.index {
                        if let Some(rows) = by_chunk.get_mut(e.chunk as usize) {
                            rows.push((d.clone(), *e));
                        }
                    }
                    (id.clone(), s.chunks.clone(), by_chunk)
                })
                .collect(),
        }
    }

    /// `final.device_state` as of now (see [`DeviceStateView::table`]).
    pub fn table(&self) -> Result<Vec<RecordBatch>> {
        self.view_all().table()
    }

    /// The state as bytes (see [`DeviceStateView::encode`]).
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.view_all().encode()
    }

    /// Restores [`Self::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = bytes;
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(internal)?;
        if &magic != MAGIC {
            return Err(internal("not a device state snapshot"));
        }
        let mut state = DeviceState {
            observed: read_i64(&mut r)?,
            ..Default::default()
        };
        let tables = read_u32(&mut r)?;
        for _ in 0..tables {
            let len = read_u32(&mut r)? as usize;
            let name = std::str::from_utf8(r.get(..len).ok_or_else(|| internal("truncated"))?)
                .map_err(internal)?
                .to_string();
            r = &r[len..];
            let id = TableId::parse(&name).map_err(internal)?;
            let len = read_u64(&mut r)? as usize;
            let ipc = r.get(..len).ok_or_else(|| internal("truncated"))?;
            r = &r[len..];
            let mut reader =
                arrow::ipc::reader::StreamReader::try_new(ipc, None).map_err(internal)?;
            let batch = match reader.next() {
                Some(b) => b.map_err(internal)?,
                None => continue,
            };
            let column = |name: &str| -> Result<Int64Array> {
                Ok(batch
                    .column_by_name(name)
                    .ok_or_else(|| internal(format!("snapshot lacks {name}")))?
                    .as_primitive::<Int64Type>()
                    .clone())
            };
            let (event, seq, wall, seen_seq, observed) = (
                column("__event_us")?,
                column("__seq")?,
                column("__seen_wall")?,
                column("__seen_seq")?,
                column("__seen_observed")?,
            );
            let keep: Vec<usize> = batch
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| !f.name().starts_with("__"))
                .map(|(i, _)| i)
                .collect();
            let rows = batch.project(&keep).map_err(internal)?;
            let devices =
                text(&rows, DEVICE).ok_or_else(|| internal("snapshot lacks device_id"))?;
            let mut index = HashMap::with_capacity(rows.num_rows());
            for i in 0..rows.num_rows() {
                index.insert(
                    devices.value(i).to_string(),
                    Entry {
                        chunk: 0,
                        row: i as u32,
                        event_us: event.value(i),
                        seq: seq.value(i),
                        seen_wall: wall.value(i),
                        seen_seq: seen_seq.value(i),
                        seen_observed: observed.value(i),
                    },
                );
            }
            state.tables.insert(
                id,
                TableState {
                    schema: rows.schema(),
                    chunks: vec![rows],
                    index,
                    garbage: 0,
                },
            );
        }
        Ok(state)
    }
}

/// A copy of the device state's live entries over its (shared) chunks, from
/// [`DeviceState::view_all`].
pub struct DeviceStateView {
    observed: i64,
    tables: Vec<TableView>,
}

/// One table in a [`DeviceStateView`]: its chunks, and its live devices by chunk.
type TableView = (TableId, Vec<RecordBatch>, Vec<Vec<(String, Entry)>>);

impl DeviceStateView {
    /// The state as bytes: a header (magic, observed time, table count), then per table its
    /// name and its live rows with the arrival columns, as an Arrow IPC stream. Restored by
    /// [`DeviceState::decode`].
    pub fn encode(self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.observed.to_le_bytes());
        out.extend_from_slice(&(self.tables.len() as u32).to_le_bytes());
        for (id, chunks, by_chunk) in &self.tables {
            let mut entries: Vec<&(String, Entry)> = by_chunk.iter().flatten().collect();
            entries.sort_by_key(|(_, e)| (e.chunk, e.row));
            let schema = chunks
                .last()
                .map(|c| c.schema())
                .unwrap_or_else(|| Arc::new(Schema::empty()));
            let conformed: Vec<RecordBatch> = chunks
                .iter()
                .map(|c| conform(c, &schema))
                .collect::<Result<_>>()?;
            let refs: Vec<&RecordBatch> = conformed.iter().collect();
            let indices: Vec<(usize, usize)> = entries
                .iter()
                .map(|(_, e)| (e.chunk as usize, e.row as usize))
                .collect();
            let rows = if indices.is_empty() {
                RecordBatch::new_empty(schema.clone())
            } else {
                arrow::compute::interleave_record_batch(&refs, &indices).map_err(internal)?
            };
            let extra = |f: fn(&Entry) -> i64| {
                Arc::new(Int64Array::from_iter_values(
                    entries.iter().map(|(_, e)| f(e)),
                )) as ArrayRef
            };
            let mut fields = rows.schema().fields().iter().cloned().collect::<Vec<_>>();
            let mut columns = rows.columns().to_vec();
            for (name, column) in [
                ("__event_us", extra(|e| e.event_us)),
                ("__seq", extra(|e| e.seq)),
                ("__seen_wall", extra(|e| e.seen_wall)),
                ("__seen_seq", extra(|e| e.seen_seq)),
                ("__seen_observed", extra(|e| e.seen_observed)),
            ] {
                fields.push(Arc::new(Field::new(name, DataType::Int64, false)));
                columns.push(column);
            }
            let batch =
                RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(internal)?;
            let mut ipc = Vec::new();
            {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &batch.schema())
                    .map_err(internal)?;
                w.write(&batch).map_err(internal)?;
                w.finish().map_err(internal)?;
            }
            let name = id.to_string();
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.write_all(name.as_bytes()).map_err(internal)?;
            out.extend_from_slice(&(ipc.len() as u64).to_le_bytes());
            out.extend_from_slice(&ipc);
        }
        Ok(out)
    }

    /// `final.device_state`: one row per device per table, in the shape of
    /// [`DeviceState::table_schema`]: the table, the device, its cohort columns, the newest
    /// reading's event time and stream sequence, when it was last seen, the observed seconds
    /// since, and the newest reading as JSON.
    pub fn table(mut self) -> Result<Vec<RecordBatch>> {
        let schema = DeviceState::table_schema();
        let mut out = Vec::new();
        for (id, chunks, by_chunk) in &mut self.tables {
            for (chunk, rows) in chunks.iter().zip(by_chunk.iter_mut()) {
                if rows.is_empty() {
                    continue;
                }
                rows.sort_by_key(|(_, e)| e.row);
                let indices = UInt32Array::from_iter_values(rows.iter().map(|(_, e)| e.row));
                let live = arrow::compute::take_record_batch(chunk, &indices).map_err(internal)?;
                let n = live.num_rows();
                let mut columns: Vec<ArrayRef> = vec![
                    Arc::new(StringArray::from(vec![id.to_string(); n])),
                    Arc::new(StringArray::from_iter_values(
                        rows.iter().map(|(d, _)| d.as_str()),
                    )),
                ];
                for c in COHORT {
                    columns.push(match cohort_column(&live, c) {
                        Some(a) => Arc::new(a),
                        None => arrow::array::new_null_array(&DataType::Utf8, n),
                    });
                }
                let ts = |v: Vec<Option<i64>>| {
                    Arc::new(arrow::array::TimestampMicrosecondArray::from(v).with_timezone("UTC"))
                        as ArrayRef
                };
                columns.push(ts(rows
                    .iter()
                    .map(|(_, e)| (e.event_us != i64::MIN).then_some(e.event_us))
                    .collect()));
                columns.push(Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|(_, e)| e.seq),
                )));
                columns.push(ts(rows.iter().map(|(_, e)| Some(e.seen_wall)).collect()));
                columns.push(Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|(_, e)| e.seen_seq),
                )));
                let observed = self.observed;
                columns
                    .push(Arc::new(Float64Array::from_iter_values(rows.iter().map(
                        |(_, e)| (observed - e.seen_observed).max(0) as f64 / 1e6,
                    ))));
                columns.push(Arc::new(json_lines(&live)?));
                out.push(RecordBatch::try_new(schema.clone(), columns).map_err(internal)?);
            }
        }
        Ok(out)
    }
}

/// The device state shared between ingest (which updates it) and queries (which read it).
pub type SharedDeviceState = Arc<std::sync::RwLock<DeviceState>>;

/// `final.device_state` for the query engine: [`DeviceState::table`] as of each query.
#[derive(Debug, Clone)]
pub struct DeviceStateTable(pub SharedDeviceState);

impl DeviceStateTable {
    /// `final.device_state`.
    pub fn id() -> TableId {
        TableId::new(fleetlake_zones::Zone::Final, "device_state")
    }
}

impl crate::query::LiveTables for DeviceStateTable {
    fn ids(&self) -> Vec<TableId> {
        vec![Self::id()]
    }

    fn provider(
        &self,
        id: &TableId,
    ) -> Option<Result<Arc<dyn datafusion::catalog::TableProvider>>> {
        if *id != Self::id() {
            return None;
        }
        // Copied out under the lock (cheap), built without it: ingest is not held up.
        let view = {
            let state = self.0.read().expect("device state lock");
            if !state.is_ready() {
                return Some(Err(DeviceState::not_ready()));
            }
            state.view_all()
        };
        Some(view.table().and_then(|b| {
            datafusion::datasource::MemTable::try_new(DeviceState::table_schema(), vec![b])
                .map(|t| Arc::new(t) as Arc<dyn datafusion::catalog::TableProvider>)
                .map_err(|e| internal(e.to_string()))
        }))
    }
}

/// When rows' messages arrived (µs since the epoch).
pub enum Received<'a> {
    /// One time for every row (a micro-batch just received).
    All(i64),
    /// Per row, aligned with the rows (rows read back with `raw.telemetry`'s `received_at`).
    Each(&'a Int64Array),
}

const MAGIC: &[u8; 8] = b"FLDEVST1";

fn read_u32(r: &mut &[u8]) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(internal)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut &[u8]) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(internal)?;
    Ok(u64::from_le_bytes(b))
}

fn read_i64(r: &mut &[u8]) -> Result<i64> {
    Ok(read_u64(r)? as i64)
}

/// A cohort column of `batch` as text (`hw_rev` falls back to `hw`).
fn cohort_column(batch: &RecordBatch, name: &str) -> Option<StringArray> {
    text(batch, name).or_else(|| (name == "hw_rev").then(|| text(batch, "hw")).flatten())
}

/// Each row of `batch` as one line of JSON.
fn json_lines(batch: &RecordBatch) -> Result<StringArray> {
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
        w.write(batch).map_err(internal)?;
        w.finish().map_err(internal)?;
    }
    let text = String::from_utf8(buf).map_err(internal)?;
    Ok(StringArray::from_iter_values(
        text.lines().collect::<Vec<_>>(),
    ))
}

/// One row as a JSON object.
fn row_json(row: &RecordBatch) -> serde_json::Map<String, serde_json::Value> {
    json_lines(row)
        .ok()
        .and_then(|l| (l.len() == 1).then(|| l.value(0).to_string()))
        .and_then(|l| serde_json::from_str(&l).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::TimestampMicrosecondArray;

    const S: i64 = 1_000_000;

    fn rows(r: &[(i64, &str, i64, f64, &str)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("temperature_c", DataType::Float64, true),
            Field::new("site", DataType::Utf8, true),
            Field::new("stream_seq", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.1))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(r.iter().map(|x| x.2 * S))
                        .with_timezone("UTC"),
                ),
                Arc::new(Float64Array::from_iter_values(r.iter().map(|x| x.3))),
                Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.4))),
                Arc::new(Int64Array::from_iter_values(r.iter().map(|x| x.0))),
            ],
        )
        .unwrap()
    }

    fn table() -> TableId {
        TableId::parse("usable.cold_chain").unwrap()
    }

    fn temperature(s: &DeviceState, d: &str) -> (f64, i64, i64) {
        let v = &s.lookup(d)[0];
        (
            v.reading["temperature_c"].as_f64().unwrap(),
            v.stream_seq,
            v.last_seen_seq,
        )
    }

    #[test]
    fn the_newest_reading_wins_whatever_the_order_and_replays_change_nothing() {
        let mut s = DeviceState::new();
        s.update(
            &table(),
            &rows(&[
                (1, "a", 100, 5.0, "x"),
                (2, "a", 110, 6.0, "x"),
                (3, "b", 100, 1.0, "y"),
            ]),
            Received::All(1),
        )
        .unwrap();
        assert_eq!(temperature(&s, "a"), (6.0, 2, 2));
        // A late reading (older event time): kept out, but the device was heard from.
        s.update(
            &table(),
            &rows(&[(4, "a", 50, 99.0, "x")]),
            Received::All(2),
        )
        .unwrap();
        assert_eq!(temperature(&s, "a"), (6.0, 2, 4));
        assert_eq!(s.lookup("a")[0].last_seen, 2);
        // The same rows again (a restore that re-applies them): nothing moves back.
        s.update(
            &table(),
            &rows(&[(1, "a", 100, 5.0, "x"), (2, "a", 110, 6.0, "x")]),
            Received::All(3),
        )
        .unwrap();
        assert_eq!(temperature(&s, "a"), (6.0, 2, 4));
        assert_eq!(s.lookup("a")[0].last_seen, 2);
        // Two readings of one device in one batch: the newer, even when it comes first.
        s.update(
            &table(),
            &rows(&[(6, "b", 130, 3.0, "y"), (5, "b", 120, 2.0, "y")]),
            Received::All(4),
        )
        .unwrap();
        assert_eq!(temperature(&s, "b"), (3.0, 6, 6));
        assert!(s.lookup("nobody").is_empty());
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_snapshot_restores_every_device_exactly() {
        let mut s = DeviceState::new();
        s.observe(7 * S);
        let mut batch = Vec::new();
        for i in 0..(COMPACT_MIN as i64 + 500) {
            // Each device twice: the second replaces the first (and compaction runs).
            batch.push((2 * i + 1, format!("d{}", i % 1000), i, i as f64, "x"));
        }
        for chunk in batch.chunks(97) {
            let r: Vec<(i64, &str, i64, f64, &str)> = chunk
                .iter()
                .map(|(a, b, c, d, e)| (*a, b.as_str(), *c, *d, *e))
                .collect();
            s.update(&table(), &rows(&r), Received::All(5)).unwrap();
        }
        let before: Vec<DeviceView> = s.list(&DeviceFilter::default(), 0, usize::MAX).0;
        assert_eq!(before.len(), 1000);
        let restored = DeviceState::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(
            restored.list(&DeviceFilter::default(), 0, usize::MAX).0,
            before
        );
        assert_eq!(restored.observed(), 7 * S);
        let t = restored.table().unwrap();
        assert_eq!(t.iter().map(|b| b.num_rows()).sum::<usize>(), 1000);
    }

    /// Random readings (late ones, replays, schema as ingest makes it) applied in random
    /// micro-batches, with a snapshot and restore at random points and rows re-applied after it
    /// (as a restart does): the state equals the newest reading of each device by a full scan.
    #[test]
    fn random_batches_restores_and_reapplied_rows_give_the_newest_reading() {
        let mut x: u64 = 7;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % n
        };
        for round in 0..40 {
            let n = 200 + next(800) as i64;
            let all: Vec<(i64, String, i64, f64, &str)> = (1..=n)
                .map(|seq| {
                    let d = next(30);
                    (seq, format!("d{d}"), next(50) as i64, seq as f64, "x")
                })
                .collect();
            let mut state = DeviceState::new();
            let mut at = 0usize;
            while at < all.len() {
                let len = 1 + next(60) as usize;
                let end = (at + len).min(all.len());
                let part: Vec<(i64, &str, i64, f64, &str)> = all[at..end]
                    .iter()
                    .map(|(a, b, c, d, e)| (*a, b.as_str(), *c, *d, *e))
                    .collect();
                state
                    .update(&table(), &rows(&part), Received::All(1))
                    .unwrap();
                if next(4) == 0 {
                    // A restart: restore, then re-apply some rows already applied.
                    state = DeviceState::decode(&state.encode().unwrap()).unwrap();
                    let back = next(end as u64 + 1) as usize;
                    let again: Vec<(i64, &str, i64, f64, &str)> = all[back..end]
                        .iter()
                        .map(|(a, b, c, d, e)| (*a, b.as_str(), *c, *d, *e))
                        .collect();
                    state
                        .update(&table(), &rows(&again), Received::All(2))
                        .unwrap();
                }
                at = end;
            }
            let mut newest: BTreeMap<String, (i64, i64)> = BTreeMap::new();
            for (seq, d, t, _, _) in &all {
                let e = newest.entry(d.clone()).or_insert((i64::MIN, i64::MIN));
                *e = (*e).max((*t * S, *seq));
            }
            let got: BTreeMap<String, (i64, i64)> = state
                .list(&DeviceFilter::default(), 0, usize::MAX)
                .0
                .into_iter()
                .map(|v| {
                    assert_eq!(
                        v.reading["temperature_c"].as_f64().unwrap(),
                        v.stream_seq as f64
                    );
                    (v.device_id, (v.event_time.unwrap(), v.stream_seq))
                })
                .collect();
            assert_eq!(got, newest, "round {round}");
            let table_rows: usize = state.table().unwrap().iter().map(|b| b.num_rows()).sum();
            assert_eq!(table_rows, newest.len());
        }
    }

    #[test]
    fn devices_are_listed_by_cohort_and_silence() {
        let mut s = DeviceState::new();
        s.observe(0);
        s.update(
            &table(),
            &rows(&[(1, "a", 1, 1.0, "x"), (2, "b", 1, 1.0, "y")]),
            Received::All(1),
        )
        .unwrap();
        s.observe(60 * S);
        s.update(&table(), &rows(&[(3, "c", 2, 1.0, "x")]), Received::All(2))
            .unwrap();
        s.observe(90 * S);
        let ids = |f: DeviceFilter| {
            s.list(&f, 0, 10)
                .0
                .into_iter()
                .map(|v| v.device_id)
                .collect::<Vec<_>>()
        };
        let site = |v: &str| vec![("site".to_string(), v.to_string())];
        assert_eq!(
            ids(DeviceFilter {
                cohort: site("x"),
                ..Default::default()
            }),
            vec!["a", "c"]
        );
        assert_eq!(
            ids(DeviceFilter {
                silent_for_us: Some(60 * S),
                ..Default::default()
            }),
            vec!["a", "b"]
        );
        assert_eq!(
            ids(DeviceFilter {
                cohort: site("x"),
                silent_for_us: Some(60 * S),
                ..Default::default()
            }),
            vec!["a"]
        );
        assert_eq!(s.lookup("c")[0].silent_for_s, 30.0);
        let (page, total) = s.list(&DeviceFilter::default(), 1, 1);
        assert_eq!((page[0].device_id.as_str(), total), ("b", 3));
    }
}
