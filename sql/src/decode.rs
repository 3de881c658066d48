//! The built-in pipeline: decode the default telemetry envelope into typed rows.
//!
//! The envelope is a JSON object with `device_id` (string), `seq` (integer ≥ 0), `ts` (RFC 3339
//! string or epoch milliseconds), optional `fw` and `hw` strings and numeric metrics
//! (`temperature`, `humidity`, `battery`). Unknown fields are ignored.
//!
//! Decoding is vectorized: the payloads of a whole micro-batch go through one arrow-json
//! [`Decoder`](arrow::json::reader::Decoder). A payload that arrow cannot decode (bad JSON, a value
//! of the wrong type) fails the whole decode, so a failing set of messages is split and decoded
//! again until each bad message stands alone; good messages are never lost with the bad ones and the
//! common case (no bad message) costs one pass. Field checks (required fields, ranges) are then
//! applied column by column.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, RecordBatch, StringArray,
    UInt32Array,
};
use arrow::compute::{cast, concat_batches, filter_record_batch, take, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::json::ReaderBuilder;
use fleetlake_zones::schema::{RAW_QUARANTINE, RAW_TELEMETRY, USABLE_TELEMETRY};

use crate::{Error, Result};

/// What the JSON decoder is asked for; everything nullable so that missing fields are reported by
/// name rather than as a decoder error.
static ENVELOPE: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, true),
        Field::new("seq", DataType::Int64, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("fw", DataType::Utf8, true),
        Field::new("hw", DataType::Utf8, true),
        Field::new("temperature", DataType::Float64, true),
        Field::new("humidity", DataType::Float64, true),
        Field::new("battery", DataType::Float64, true),
    ]))
});

/// Accepted ranges: a reading outside them is quarantined.
pub const TEMPERATURE_RANGE: (f64, f64) = (-90.0, 150.0);
pub const HUMIDITY_RANGE: (f64, f64) = (0.0, 100.0);
pub const BATTERY_RANGE: (f64, f64) = (0.0, 100.0);
/// Device timestamps must fall in [2000-01-01, 2100-01-01).
pub const TS_RANGE_MS: (i64, i64) = (946_684_800_000, 4_102_444_800_000);

/// The result of decoding one raw batch: every input row is in exactly one of the two.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// Rows for `usable.telemetry`.
    pub usable: RecordBatch,
    /// Rows for `raw.quarantine`, each with its reason.
    pub quarantine: RecordBatch,
}

/// Decodes a `raw.telemetry` batch into usable rows and quarantined rows.
pub fn decode_envelope(raw: &RecordBatch) -> Result<Decoded> {
    let json = decode_json(raw, &ENVELOPE)?;
    let mut rejected = json.rejected;
    let problems = check_fields(&json.decoded).map_err(internal)?;
    let mut keep: Vec<u32> = Vec::with_capacity(json.rows.len());
    let mut keep_raw: Vec<u32> = Vec::with_capacity(json.rows.len());
    for (pos, raw_row) in json.rows.iter().enumerate() {
        match &problems[pos] {
            None => {
                keep.push(pos as u32);
                keep_raw.push(*raw_row);
            }
            Some(reason) => rejected.push((*raw_row, reason.clone())),
        }
    }
    let usable = build_usable(raw, &json.decoded, &keep, &keep_raw).map_err(internal)?;
    rejected.sort_by_key(|(i, _)| *i);
    let quarantine = quarantine_rows(raw, &rejected)?;
    Ok(Decoded { usable, quarantine })
}

/// Payloads decoded against a schema: the rows that decoded (with the raw row each came from)
/// and the raw rows that did not, with the reason.
#[derive(Debug, Clone)]
pub struct JsonRows {
    pub decoded: RecordBatch,
    /// For each decoded row, its row in the raw batch.
    pub rows: Vec<u32>,
    pub rejected: Vec<(u32, String)>,
}

/// Decodes the `payload` column of a raw batch as JSON objects with `schema` (fields not in the
/// schema are ignored), vectorized, isolating the messages that do not decode.
pub fn decode_json(raw: &RecordBatch, schema: &SchemaRef) -> Result<JsonRows> {
    let payloads = raw
        .column_by_name("payload")
        .and_then(|c| c.as_binary_opt::<i32>())
        .ok_or_else(|| Error::Internal("raw batch without a binary payload column".into()))?;
    let mut rejected: Vec<(u32, String)> = Vec::new();
    let mut candidates: Vec<u32> = Vec::with_capacity(raw.num_rows());
    for i in 0..payloads.len() {
        match precheck(payloads.value(i)) {
            Ok(()) => candidates.push(i as u32),
            Err(reason) => rejected.push((i as u32, reason)),
        }
    }
    let mut parts: Vec<(Vec<u32>, RecordBatch)> = Vec::new();
    decode_isolating(
        schema,
        payloads,
        &candidates,
        &mut parts,
        &mut rejected,
        false,
    );
    let decoded_batches: Vec<RecordBatch> = parts.iter().map(|(_, b)| b.clone()).collect();
    let decoded = concat_batches(schema, &decoded_batches).map_err(internal)?;
    let rows: Vec<u32> = parts.into_iter().flat_map(|(idx, _)| idx).collect();
    let problems = check_types(schema, payloads, &decoded, &rows)?;
    if problems.iter().all(Option::is_none) {
        return Ok(JsonRows {
            decoded,
            rows,
            rejected,
        });
    }
    let keep: BooleanArray = problems.iter().map(|p| Some(p.is_none())).collect();
    let decoded = filter_record_batch(&decoded, &keep).map_err(internal)?;
    let mut kept = Vec::with_capacity(decoded.num_rows());
    for (row, problem) in rows.into_iter().zip(problems) {
        match problem {
            None => kept.push(row),
            Some(reason) => rejected.push((row, reason)),
        }
    }
    Ok(JsonRows {
        decoded,
        rows: kept,
        rejected,
    })
}

/// Whether arrow-json may have changed a value of this type while decoding it: it truncates a
/// fractional JSON number into an integer, a date (days) or a timestamp (epoch milliseconds).
fn coercible(data_type: &DataType) -> bool {
    data_type.is_integer() || matches!(data_type, DataType::Date32 | DataType::Timestamp(..))
}

/// The declared type decides: per decoded row, the reason it must be quarantined because a value
/// is not of its column's type. arrow-json truncates `2.5` into the integer 2 (and into day 2, or
/// 2 ms): the columns where that can happen are decoded a second time as their JSON text, and a
/// number whose text is not exactly the decoded integer is refused. Floating-point columns refuse
/// a number beyond their range (which would read as infinity).
fn check_types(
    schema: &SchemaRef,
    payloads: &BinaryArray,
    decoded: &RecordBatch,
    rows: &[u32],
) -> Result<Vec<Option<String>>> {
    let n = decoded.num_rows();
    let mut problems: Vec<Option<String>> = vec![None; n];
    for (c, field) in schema.fields().iter().enumerate() {
        let column = decoded.column(c);
        let mut note = |i: usize, text: &str| {
            problems[i].get_or_insert_with(|| {
                format!(
                    "{} is {text}, expected {}",
                    field.name(),
                    expected_type(field.data_type())
                )
            });
        };
        match field.data_type() {
            DataType::Float64 => {
                let values = column.as_primitive::<arrow::datatypes::Float64Type>();
                for (i, v) in values.iter().enumerate() {
                    if v.is_some_and(|v| !v.is_finite()) {
                        note(i, "a number beyond the range of DOUBLE");
                    }
                }
            }
            DataType::Float32 => {
                let values = column.as_primitive::<arrow::datatypes::Float32Type>();
                for (i, v) in values.iter().enumerate() {
                    if v.is_some_and(|v| !v.is_finite()) {
                        note(i, "a number beyond the range of FLOAT");
                    }
                }
            }
            _ => {}
        }
    }
    let strict: Vec<usize> = (0..schema.fields().len())
        .filter(|c| coercible(schema.field(*c).data_type()))
        .collect();
    if strict.is_empty() || n == 0 {
        return Ok(problems);
    }
    // The same payloads, with those columns read as their JSON text.
    let texts = Arc::new(Schema::new(
        strict
            .iter()
            .map(|c| Field::new(schema.field(*c).name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let mut parts: Vec<(Vec<u32>, RecordBatch)> = Vec::new();
    let mut failed: Vec<(u32, String)> = Vec::new();
    decode_isolating(&texts, payloads, rows, &mut parts, &mut failed, true);
    let text_rows: Vec<u32> = parts
        .iter()
        .flat_map(|(idx, _)| idx.iter().copied())
        .collect();
    let text_batch = concat_batches(
        &texts,
        &parts.into_iter().map(|(_, b)| b).collect::<Vec<_>>(),
    )
    .map_err(internal)?;
    let failed: std::collections::HashMap<u32, String> = failed.into_iter().collect();
    // The decoded values as i64 (integers, days, epoch milliseconds).
    let values: Vec<ArrayRef> = strict
        .iter()
        .map(|c| {
            let column = decoded.column(*c);
            match column.data_type() {
                DataType::Date32 => cast(&cast(column, &DataType::Int32)?, &DataType::Int64),
                _ => cast(column, &DataType::Int64),
            }
        })
        .collect::<Result<_, _>>()
        .map_err(internal)?;
    let mut at = 0;
    for (i, row) in rows.iter().enumerate() {
        if let Some(reason) = failed.get(row) {
            problems[i].get_or_insert_with(|| reason.clone());
            continue;
        }
        debug_assert_eq!(text_rows.get(at), Some(row));
        for (t, c) in strict.iter().enumerate() {
            let field = schema.field(*c);
            let values = values[t].as_primitive::<arrow::datatypes::Int64Type>();
            let texts = text_batch.column(t).as_string::<i32>();
            if values.is_null(i) || texts.is_null(at) {
                continue;
            }
            let value = values.value(i);
            let text = texts.value(at);
            // Stored and computed on in microseconds: milliseconds beyond ±i64::MAX / 1000
            // would overflow there (and read as NULL).
            let timestamp_fits = !matches!(field.data_type(), DataType::Timestamp(..))
                || value.checked_mul(1000).is_some();
            if !timestamp_fits || !integer_text_is(text, value, field.data_type().is_integer()) {
                problems[i].get_or_insert_with(|| {
                    format!(
                        "{} is {text}, expected {}",
                        field.name(),
                        expected_type(field.data_type())
                    )
                });
            }
        }
        at += 1;
    }
    Ok(problems)
}

/// True when `text` (a JSON value's text) is exactly the integer `value`: an integer literal, or
/// a number that is an exact integer below 2^53 (`2.0`, `1e3`). A date or time given as a string
/// (`"2026-05-01"`; `integer_only` false) is the parser's business and passes.
fn integer_text_is(text: &str, value: i64, integer_only: bool) -> bool {
    if let Ok(n) = text.parse::<i64>() {
        return n == value;
    }
    match text.parse::<f64>() {
        Ok(f) => {
            f.is_finite()
                && f.fract() == 0.0
                && f.abs() < 9_007_199_254_740_992.0
                && f as i64 == value
        }
        Err(_) => !integer_only,
    }
}

/// How a type is named in a reason.
fn expected_type(data_type: &DataType) -> String {
    match data_type {
        DataType::Int64 => "an integer (BIGINT, -9223372036854775808..9223372036854775807)".into(),
        DataType::Int32 => "an integer (INT, -2147483648..2147483647)".into(),
        DataType::Date32 => "a date (\"YYYY-MM-DD\" or whole days since 1970-01-01)".into(),
        DataType::Timestamp(..) => "a time (RFC 3339 string or whole epoch milliseconds)".into(),
        DataType::Float64 => "a number (DOUBLE)".into(),
        DataType::Float32 => "a number (FLOAT)".into(),
        other => format!("a value of type {other}"),
    }
}

/// The kind of a quarantine reason: the reason with the values it quotes left out — quoted text
/// (`"…"`, `'…'`) becomes `…` and a number `N` — so that `GROUP BY reason_kind` counts kinds of
/// mistakes (`battery is N, expected a value in [N, N]`), not the values devices sent. Digits
/// inside a name (`temp2`) are kept.
pub fn reason_kind(reason: &str) -> String {
    let chars: Vec<char> = reason.chars().collect();
    let mut out = String::with_capacity(reason.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let word = |k: usize| chars[k].is_alphanumeric() || chars[k] == '_';
        // Part of a name: `temp2`, `UTF-8`.
        let after_word = i > 0 && (word(i - 1) || (chars[i - 1] == '-' && i > 1 && word(i - 2)));
        if c == '"' || (c == '\'' && !after_word) {
            // To the matching quote (a backslash escapes), or the end.
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            out.push('…');
            i = j + 1;
            continue;
        }
        let starts_number = c.is_ascii_digit()
            || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()));
        if starts_number && !after_word {
            let mut j = i + 1;
            while j < chars.len()
                && (chars[j].is_ascii_digit()
                    || chars[j] == '.'
                    || ((chars[j] == 'e' || chars[j] == 'E')
                        && chars
                            .get(j + 1)
                            .is_some_and(|d| d.is_ascii_digit() || *d == '-' || *d == '+')))
            {
                j += if chars[j] == 'e' || chars[j] == 'E' {
                    2
                } else {
                    1
                };
            }
            out.push('N');
            i = j;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// `raw.quarantine` rows: the given raw rows with their reasons.
pub fn quarantine_rows(raw: &RecordBatch, rejected: &[(u32, String)]) -> Result<RecordBatch> {
    build_quarantine(raw, rejected).map_err(internal)
}

fn internal(e: arrow::error::ArrowError) -> Error {
    Error::Internal(e.to_string())
}

/// Cheap per-message checks that give clearer reasons than the JSON decoder would.
fn precheck(payload: &[u8]) -> Result<(), String> {
    if let Err(e) = std::str::from_utf8(payload) {
        return Err(format!(
            "payload is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ));
    }
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        None => Err("payload is empty; expected a JSON object".into()),
        Some(b'{') => Ok(()),
        Some(_) => Err(format!(
            "payload is not a JSON object; expected {{\"device_id\": …, \"seq\": …, \"ts\": …}}, got {}",
            snippet(payload)
        )),
    }
}

fn snippet(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    if text.chars().count() > 40 {
        format!("{:?}…", text.chars().take(40).collect::<String>())
    } else {
        format!("{text:?}")
    }
}

/// A decode failure and, when known, the position (within the attempted set) of the culprit.
struct Failure {
    at: Option<usize>,
    reason: String,
}

/// Decodes `rows` in one pass when possible; otherwise splits around failures until every bad
/// message is isolated and rejected with the decoder's reason.
fn decode_isolating(
    schema: &SchemaRef,
    payloads: &BinaryArray,
    rows: &[u32],
    parts: &mut Vec<(Vec<u32>, RecordBatch)>,
    rejected: &mut Vec<(u32, String)>,
    as_text: bool,
) {
    if rows.is_empty() {
        return;
    }
    match decode_rows(schema, payloads, rows, as_text) {
        Ok(batch) => parts.push((rows.to_vec(), batch)),
        Err(Failure { reason, .. }) if rows.len() == 1 => {
            rejected.push((rows[0], format!("payload does not decode: {reason}")))
        }
        Err(Failure {
            at: Some(at),
            reason,
        }) => {
            decode_isolating(schema, payloads, &rows[..at], parts, rejected, as_text);
            rejected.push((rows[at], format!("payload does not decode: {reason}")));
            decode_isolating(schema, payloads, &rows[at + 1..], parts, rejected, as_text);
        }
        Err(Failure { at: None, .. }) => {
            let mid = rows.len() / 2;
            decode_isolating(schema, payloads, &rows[..mid], parts, rejected, as_text);
            decode_isolating(schema, payloads, &rows[mid..], parts, rejected, as_text);
        }
    }
}

/// One arrow-json pass over the given payloads. Each payload must contribute exactly one
/// complete object, so a truncated message can never merge with the next one. `as_text` reads
/// numbers and booleans into string columns as their JSON text.
fn decode_rows(
    schema: &SchemaRef,
    payloads: &BinaryArray,
    rows: &[u32],
    as_text: bool,
) -> Result<RecordBatch, Failure> {
    let mut decoder = ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.len() + 1)
        .with_coerce_primitive(as_text)
        .build_decoder()
        .map_err(|e| Failure {
            at: None,
            reason: e.to_string(),
        })?;
    for (pos, &row) in rows.iter().enumerate() {
        let payload = payloads.value(row as usize);
        let fail = |reason: String| Failure {
            at: Some(pos),
            reason,
        };
        let used = decoder.decode(payload).map_err(|e| fail(e.to_string()))?;
        if used != payload.len() {
            return Err(fail(
                "the payload holds more than the decoder can take".into(),
            ));
        }
        if decoder.has_partial_record() {
            return Err(fail("the JSON object is not complete".into()));
        }
        if decoder.len() > pos + 1 {
            return Err(fail("more than one JSON value in the payload".into()));
        }
        if decoder.len() != pos + 1 {
            return Err(fail("expected exactly one JSON object".into()));
        }
    }
    match decoder.flush() {
        Ok(Some(batch)) => Ok(batch),
        Ok(None) => Err(Failure {
            at: None,
            reason: "no rows decoded".into(),
        }),
        Err(e) => Err(Failure {
            at: None,
            reason: e.to_string(),
        }),
    }
}

/// Per decoded row, the reason it must be quarantined, if any.
fn check_fields(decoded: &RecordBatch) -> Result<Vec<Option<String>>, arrow::error::ArrowError> {
    let n = decoded.num_rows();
    let mut problems: Vec<Option<String>> = vec![None; n];
    let mut note = |i: usize, reason: String| {
        if problems[i].is_none() {
            problems[i] = Some(reason);
        }
    };
    let device = decoded.column(0).as_string::<i32>();
    let seq = decoded
        .column(1)
        .as_primitive::<arrow::datatypes::Int64Type>();
    let ts = decoded.column(2).as_primitive::<TimestampMillisecondType>();
    for i in 0..n {
        if device.is_null(i) {
            note(i, "missing required field device_id (string)".into());
        } else if device.value(i).is_empty() {
            note(i, "device_id is empty".into());
        }
        if seq.is_null(i) {
            note(i, "missing required field seq (integer)".into());
        } else if seq.value(i) < 0 {
            note(
                i,
                format!("seq is {}, expected an integer >= 0", seq.value(i)),
            );
        }
        if ts.is_null(i) {
            note(
                i,
                "missing required field ts (RFC 3339 string or epoch milliseconds)".into(),
            );
        } else if !(TS_RANGE_MS.0..TS_RANGE_MS.1).contains(&ts.value(i)) {
            note(
                i,
                format!(
                    "ts is {} ms since the epoch, expected a time between 2000-01-01 and 2100-01-01",
                    ts.value(i)
                ),
            );
        }
    }
    for (column, name, (lo, hi)) in [
        (5, "temperature", TEMPERATURE_RANGE),
        (6, "humidity", HUMIDITY_RANGE),
        (7, "battery", BATTERY_RANGE),
    ] {
        let values = decoded
            .column(column)
            .as_primitive::<arrow::datatypes::Float64Type>();
        if values.null_count() == values.len() {
            continue;
        }
        for i in 0..n {
            if values.is_valid(i) {
                let v = values.value(i);
                if !(lo..=hi).contains(&v) {
                    note(
                        i,
                        format!("{name} is {v}, expected a value in [{lo}, {hi}]"),
                    );
                }
            }
        }
    }
    Ok(problems)
}

fn build_usable(
    raw: &RecordBatch,
    decoded: &RecordBatch,
    keep: &[u32],
    keep_raw: &[u32],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let keep = UInt32Array::from(keep.to_vec());
    let keep_raw = UInt32Array::from(keep_raw.to_vec());
    let pick = |name: &str| take(decoded.column_by_name(name).expect("envelope"), &keep, None);
    let pick_raw = |name: &str| {
        take(
            raw.column_by_name(name).expect("raw schema"),
            &keep_raw,
            None,
        )
    };
    let ts_ms = pick("ts")?;
    let ts: ArrayRef = cast(&ts_ms, &fleetlake_zones::schema::timestamp_type())?;
    let event_date: ArrayRef = {
        let ms = ts_ms.as_primitive::<TimestampMillisecondType>();
        Arc::new(Date32Array::from_iter_values(
            ms.values().iter().map(|v| v.div_euclid(86_400_000) as i32),
        ))
    };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(USABLE_TELEMETRY.fields().len());
    for field in USABLE_TELEMETRY.fields() {
        let column = match field.name().as_str() {
            "ts" => ts.clone(),
            "event_date" => event_date.clone(),
            name if ENVELOPE.column_with_name(name).is_some() => pick(name)?,
            name => pick_raw(name)?,
        };
        columns.push(column);
    }
    RecordBatch::try_new(USABLE_TELEMETRY.clone(), columns)
}

fn build_quarantine(
    raw: &RecordBatch,
    rejected: &[(u32, String)],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let indices = UInt32Array::from_iter_values(rejected.iter().map(|(i, _)| *i));
    let picked = take_record_batch(raw, &indices)?;
    let reasons: ArrayRef = Arc::new(StringArray::from_iter_values(
        rejected.iter().map(|(_, r)| r.as_str()),
    ));
    let kinds: ArrayRef = Arc::new(StringArray::from_iter_values(
        rejected.iter().map(|(_, r)| reason_kind(r)),
    ));
    let columns = RAW_QUARANTINE
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "reason" => Ok(reasons.clone()),
            "reason_kind" => Ok(kinds.clone()),
            name => picked
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("raw lacks {name}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    debug_assert_eq!(
        RAW_TELEMETRY.fields().len() + 2,
        RAW_QUARANTINE.fields().len()
    );
    RecordBatch::try_new(RAW_QUARANTINE.clone(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_kinds_leave_the_values_out() {
        for (reason, kind) in [
            (
                "battery is 250, expected a value in [0, 100]",
                "battery is N, expected a value in [N, N]",
            ),
            (
                "seq is -2.5e3, expected an integer >= 0",
                "seq is N, expected an integer >= N",
            ),
            (
                r#"temperature is "hot", expected a number"#,
                "temperature is …, expected a number",
            ),
            (
                r#"payload is not a JSON object; expected {"device_id": …}, got "garbage-17""#,
                "payload is not a JSON object; expected {…: …}, got …",
            ),
            (
                "temp2 is 'x\\'y', expected DOUBLE",
                "temp2 is …, expected DOUBLE",
            ),
            (
                "payload is not valid UTF-8 (invalid byte at offset 0)",
                "payload is not valid UTF-8 (invalid byte at offset N)",
            ),
        ] {
            assert_eq!(reason_kind(reason), kind, "{reason}");
        }
    }
    use fleetlake_zones::schema::{RawMessage, raw_batch};

    fn raw(payloads: &[&[u8]]) -> RecordBatch {
        let messages: Vec<RawMessage> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| RawMessage {
                payload: p.to_vec(),
                subject: "telemetry.dev".into(),
                stream_seq: i as i64 + 1,
                msg_id: None,
                received_at_us: 1_763_900_000_000_000,
            })
            .collect();
        raw_batch(&messages)
    }

    fn reasons(d: &Decoded) -> Vec<(i64, String)> {
        let seq = d
            .quarantine
            .column_by_name("stream_seq")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        let reason = d
            .quarantine
            .column_by_name("reason")
            .unwrap()
            .as_string::<i32>();
        (0..d.quarantine.num_rows())
            .map(|i| (seq.value(i), reason.value(i).to_string()))
            .collect()
    }

    #[test]
    fn good_messages_decode_with_both_timestamp_forms_and_unknown_fields_ignored() {
        let d = decode_envelope(&raw(&[
            br#"{"device_id":"d1","seq":1,"ts":"2025-11-23T10:00:00.250Z","temperature":4.5,"extra":{"a":[1]}}"#,
            br#"{"device_id":"d2","seq":7,"ts":1763892000000,"fw":"1.2.0","hw":"B","battery":88,"humidity":40.5}"#,
        ]))
        .unwrap();
        assert_eq!(d.usable.num_rows(), 2);
        assert_eq!(d.quarantine.num_rows(), 0);
        assert_eq!(d.usable.schema(), USABLE_TELEMETRY.clone());
        let ts = d
            .usable
            .column_by_name("ts")
            .unwrap()
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(ts.value(0), 1_763_892_000_250_000);
        assert_eq!(ts.value(1), 1_763_892_000_000_000);
        let date = d
            .usable
            .column_by_name("event_date")
            .unwrap()
            .as_primitive::<arrow::datatypes::Date32Type>();
        assert_eq!(date.value(0), 20415); // 2026-11-23
    }

    #[test]
    fn each_bad_message_is_quarantined_alone_with_a_reason() {
        let good = br#"{"device_id":"d1","seq":1,"ts":1763892000000,"temperature":20}"#;
        let d = decode_envelope(&raw(&[
            good,
            b"not json",
            b"\xff\xfe{",
            br#"{"device_id":"d1","seq":2"#,
            br#"{"device_id":"d1","seq":3,"ts":1763892000000,"temperature":"hot"}"#,
            br#"{"seq":4,"ts":1763892000000}"#,
            br#"{"device_id":"d1","seq":-5,"ts":1763892000000}"#,
            br#"{"device_id":"d1","seq":6,"ts":1763892000000,"battery":140}"#,
            br#"{"device_id":7,"seq":7,"ts":1763892000000}"#,
            good,
            br#"{"device_id":"d1","seq":8,"ts":1} {"device_id":"d1","seq":9,"ts":1}"#,
            b"",
            br#"[1,2]"#,
        ]))
        .unwrap();
        assert_eq!(d.usable.num_rows(), 2, "{:?}", reasons(&d));
        let got = reasons(&d);
        let seqs: Vec<i64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13]);
        let expect = [
            (2, "not a JSON object"),
            (3, "not valid UTF-8"),
            (4, "not complete"),
            (5, "does not decode"),
            (6, "missing required field device_id"),
            (7, "seq is -5"),
            (8, "battery is 140"),
            (9, "does not decode"),
            (11, "more than one JSON value"),
            (12, "payload is empty"),
            (13, "not a JSON object"),
        ];
        for ((seq, reason), (eseq, needle)) in got.iter().zip(expect) {
            assert_eq!(*seq, eseq);
            assert!(
                reason.contains(needle),
                "seq {seq}: {reason:?} lacks {needle:?}"
            );
        }
        // The type error names the field and the value.
        assert!(got[3].1.contains("hot"), "{}", got[3].1);
    }

    #[test]
    fn a_truncated_message_never_merges_with_the_next() {
        let d = decode_envelope(&raw(&[
            br#"{"device_id":"a","seq":1,"ts":"#,
            br#"{"device_id":"b","seq":2,"ts":1763892000000}}"#,
            br#"{"device_id":"c","seq":3,"ts":1763892000000}"#,
        ]))
        .unwrap();
        let devices = d
            .usable
            .column_by_name("device_id")
            .unwrap()
            .as_string::<i32>();
        assert_eq!(d.usable.num_rows(), 1);
        assert_eq!(devices.value(0), "c");
        assert_eq!(d.quarantine.num_rows(), 2);
    }

    /// Untrusted input: random mutations of valid payloads (flipped, dropped and inserted bytes,
    /// truncations, concatenations) never panic, and every message lands in exactly one of
    /// usable and quarantine; the untouched ones always in usable.
    #[test]
    fn mutated_payloads_are_each_accounted_for_exactly_once() {
        let mut state = 0x5EED_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let template = br#"{"device_id":"dev-7","seq":12,"ts":"2025-11-23T10:00:00Z","fw":"1.0","temperature":21.5,"battery":80}"#;
        for round in 0..300 {
            let mut payloads: Vec<Vec<u8>> = Vec::new();
            let mut pristine = Vec::new();
            for i in 0..40 {
                let mut p = template.to_vec();
                let mutations = next() % 4;
                for _ in 0..mutations {
                    let at = (next() as usize) % (p.len() + 1);
                    match next() % 5 {
                        0 if at < p.len() => p[at] = (next() % 256) as u8,
                        1 if at < p.len() => {
                            p.remove(at);
                        }
                        2 => p.insert(at, b"{}[]\",:0e-x\xff"[(next() % 12) as usize]),
                        3 => p.truncate(at),
                        _ => p.extend_from_slice(template),
                    }
                }
                if mutations == 0 {
                    pristine.push(i as i64 + 1);
                }
                payloads.push(p);
            }
            let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
            let d = decode_envelope(&raw(&refs)).unwrap();
            let seqs = |b: &RecordBatch| -> Vec<i64> {
                b.column_by_name("stream_seq")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .values()
                    .to_vec()
            };
            let mut all: Vec<i64> = seqs(&d.usable)
                .into_iter()
                .chain(seqs(&d.quarantine))
                .collect();
            all.sort_unstable();
            assert_eq!(all, (1..=40).collect::<Vec<i64>>(), "round {round}");
            let usable = seqs(&d.usable);
            for p in &pristine {
                assert!(
                    usable.contains(p),
                    "round {round}: untouched message {p} not usable"
                );
            }
        }
    }

    fn usable_seqs(d: &Decoded) -> Vec<i64> {
        d.usable
            .column_by_name("seq")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>()
            .values()
            .to_vec()
    }

    #[test]
    fn a_number_that_is_not_of_the_declared_type_is_quarantined_never_truncated() {
        let d = decode_envelope(&raw(&[
            br#"{"device_id":"d1","seq":2,"ts":1777593600000,"temperature":2.0}"#,
            br#"{"device_id":"d1","seq":2.5,"ts":1777593601000,"temperature":2.5}"#,
            br#"{"device_id":"d1","seq":3.9,"ts":1777593602000,"temperature":3.9}"#,
            br#"{"device_id":"d1","seq":3,"ts":1777593603000,"temperature":3.0}"#,
            br#"{"device_id":"d1","seq":4.0,"ts":1777593604000}"#,
            br#"{"device_id":"d1","seq":"5","ts":1777593605000}"#,
            br#"{"device_id":"d1","seq":9223372036854775807,"ts":1777593606000}"#,
            br#"{"device_id":"d1","seq":9223372036854775808,"ts":1777593607000}"#,
            br#"{"device_id":"d1","seq":1e30,"ts":1777593608000}"#,
            br#"{"device_id":"d1","seq":6,"ts":1777593609000.5}"#,
            br#"{"device_id":"d1","seq":7,"ts":1777593610000,"temperature":1e400}"#,
            br#"{"device_id":"d1","seq":true,"ts":1777593611000}"#,
        ]))
        .unwrap();
        assert_eq!(usable_seqs(&d), vec![2, 3, 4, 5, i64::MAX]);
        let reasons = reasons(&d);
        let reason = |seq: i64| {
            reasons
                .iter()
                .find(|(s, _)| *s == seq)
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| panic!("stream seq {seq} not quarantined: {reasons:?}"))
        };
        assert!(
            reason(2).contains("seq is 2.5, expected an integer"),
            "{}",
            reason(2)
        );
        assert!(reason(3).contains("seq is 3.9"), "{}", reason(3));
        assert!(reason(8).contains("seq"), "{}", reason(8));
        assert!(reason(9).contains("seq"), "{}", reason(9));
        assert!(
            reason(10).contains("ts is 1777593609000.5"),
            "{}",
            reason(10)
        );
        assert!(reason(11).contains("temperature"), "{}", reason(11));
        assert!(reason(12).contains("seq"), "{}", reason(12));
        assert_eq!(reasons.len(), 7, "{reasons:?}");
        // The genuine seq 3 keeps its own values.
        let t = d
            .usable
            .column_by_name("temperature")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!(t.value(1), 3.0);
    }

    #[test]
    fn every_integer_like_column_type_refuses_fractions() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("i", DataType::Int32, true),
            Field::new("d", DataType::Date32, true),
            Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                true,
            ),
            Field::new("f", DataType::Float32, true),
        ]));
        let json = decode_json(
            &raw(&[
                br#"{"i":1,"d":"2026-05-01","t":"2026-05-01T10:00:00Z","f":1.5}"#,
                br#"{"i":1.5}"#,
                br#"{"i":3000000000}"#,
                br#"{"d":20000.5}"#,
                br#"{"d":20000}"#,
                br#"{"t":1.5}"#,
                br#"{"f":1e39}"#,
            ]),
            &schema,
        )
        .unwrap();
        assert_eq!(json.rows, vec![0, 4]);
        let mut rejected: Vec<u32> = json.rejected.iter().map(|(r, _)| *r).collect();
        rejected.sort_unstable();
        assert_eq!(rejected, vec![1, 2, 3, 5, 6], "{:?}", json.rejected);
    }
}
