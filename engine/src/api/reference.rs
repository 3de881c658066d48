//! Reference data uploads: `PUT /v1/reference/{table}` turns a body of rows (CSV with a header,
//! a JSON array of objects, or NDJSON) into an Arrow batch that replaces `reference.{table}`.
//!
//! For a table a pipeline declares (`CREATE REFERENCE TABLE`), the declared columns of a CSV are
//! read as the text written and then converted to their declared types ([`apply_declared`]), so
//! nothing inference would change survives into the table changed: `007` stays `007` in a
//! `VARCHAR` column, `2.10` stays `2.10`. Other columns, and every column of an undeclared table,
//! are typed by inference (integers, floats, booleans, strings); a value that does not fit is an
//! error naming the problem. JSON numbers are numbers: a declared `VARCHAR` takes them as JSON
//! writes them back (`2.10` becomes `2.1`); send such values as JSON strings.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Schema, SchemaRef};

use crate::error::Error;

/// The largest body accepted: reference tables are small, slowly changing context.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Parses an upload by its `Content-Type` (`text/csv`, `application/json`,
/// `application/x-ndjson`; JSON when absent). With `declared` (the table's declaration), its
/// columns are converted to their declared types (see [`apply_declared`]).
pub fn parse_rows(
    content_type: Option<&str>,
    body: &[u8],
    declared: Option<&SchemaRef>,
) -> Result<RecordBatch, Error> {
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_else(|| "application/json".into());
    let batch = match media.as_str() {
        "text/csv" => parse_csv(body, declared)?,
        "application/json" | "application/x-ndjson" | "application/jsonl" => parse_json(body)?,
        other => {
            return Err(Error::Invalid(format!(
                "unsupported Content-Type {other:?}: expected text/csv, application/json or application/x-ndjson"
            )));
        }
    };
    if batch.num_rows() == 0 {
        return Err(Error::Invalid("the body holds no rows".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for field in batch.schema().fields() {
        let name = field.name();
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(Error::Invalid(format!(
                "column name {name:?} is not allowed: expected letters, digits and '_', not starting with a digit"
            )));
        }
        if !seen.insert(name.to_lowercase()) {
            return Err(Error::Invalid(format!("column {name:?} appears twice")));
        }
    }
    match declared {
        Some(declared) => apply_declared(&batch, declared),
        None => Ok(batch),
    }
}

/// Holds an upload to the table's `CREATE REFERENCE TABLE` declaration and converts it: every
/// value of a declared column must be of the declared type as it is (`abc` is not a `DOUBLE`,
/// `2.5` is not a `BIGINT`: nothing is truncated or read as NULL), and a `NOT NULL` column must be
/// present and hold no NULL. Returns the rows with each declared column in its declared type;
/// columns the declaration does not name are kept as uploaded. The error names the column, the
/// row (1-based, the header not counted) and the value.
pub fn apply_declared(rows: &RecordBatch, declared: &SchemaRef) -> Result<RecordBatch, Error> {
    check_declared(rows, declared)?;
    let mut fields = Vec::with_capacity(rows.num_columns());
    let mut columns = Vec::with_capacity(rows.num_columns());
    for (field, column) in rows.schema().fields().iter().zip(rows.columns()) {
        match declared.field_with_name(field.name()) {
            Ok(d) if d.data_type() != column.data_type() => {
                let cast = arrow::compute::cast(column, d.data_type())
                    .map_err(|e| Error::Invalid(format!("column {}: {e}", field.name())))?;
                fields.push(arrow::datatypes::Field::new(
                    field.name(),
                    d.data_type().clone(),
                    true,
                ));
                columns.push(cast);
            }
            _ => {
                fields.push(field.as_ref().clone());
                columns.push(column.clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| Error::Invalid(e.to_string()))
}

fn check_declared(rows: &RecordBatch, declared: &SchemaRef) -> Result<(), Error> {
    use arrow::array::{Array, AsArray};
    use arrow::compute::{CastOptions, cast_with_options};
    use arrow::datatypes::DataType;
    for field in declared.fields() {
        let Some(column) = rows.column_by_name(field.name()) else {
            if field.is_nullable() {
                continue;
            }
            return Err(Error::Invalid(format!(
                "column {} is declared NOT NULL ({}) but the upload lacks it",
                field.name(),
                field.data_type()
            )));
        };
        let lenient = CastOptions {
            safe: true,
            ..Default::default()
        };
        let cast = cast_with_options(column, field.data_type(), &lenient).map_err(|e| {
            Error::Invalid(format!(
                "column {} holds {} values, which cannot be read as the declared {}: {e}",
                field.name(),
                column.data_type(),
                field.data_type()
            ))
        })?;
        let text = arrow::compute::cast(column, &DataType::Utf8).ok();
        let value = |row: usize| {
            text.as_ref()
                .map(|t| t.as_string::<i32>().value(row).to_string())
                .unwrap_or_default()
        };
        // A float read into an integer column would be truncated by the cast: refuse fractions.
        let fractional = |row: usize| {
            field.data_type().is_integer()
                && column.data_type().is_floating()
                && column.is_valid(row)
                && arrow::compute::cast(&column.slice(row, 1), &DataType::Float64)
                    .ok()
                    .is_some_and(|f| {
                        f.as_primitive::<arrow::datatypes::Float64Type>()
                            .value(0)
                            .fract()
                            != 0.0
                    })
        };
        // A float beyond the type's range reads as infinity: refuse it as devices' values are.
        let infinite = |row: usize| {
            field.data_type().is_floating()
                && arrow::compute::cast(&cast.slice(row, 1), &DataType::Float64)
                    .ok()
                    .is_some_and(|f| {
                        let v = f.as_primitive::<arrow::datatypes::Float64Type>();
                        v.is_valid(0) && !v.value(0).is_finite()
                    })
        };
        for row in 0..rows.num_rows() {
            if column.is_valid(row) && (cast.is_null(row) || fractional(row) || infinite(row)) {
                return Err(Error::Invalid(format!(
                    "column {}, row {}: {:?} is not a {} (the declared type)",
                    field.name(),
                    row + 1,
                    value(row),
                    field.data_type()
                )));
            }
            if column.is_null(row) && !field.is_nullable() {
                return Err(Error::Invalid(format!(
                    "column {}, row {}: NULL in a NOT NULL column",
                    field.name(),
                    row + 1
                )));
            }
        }
    }
    Ok(())
}

/// Reads a CSV with a header; the columns `declared` names as their text (converted later), the
/// others by inference.
fn parse_csv(body: &[u8], declared: Option<&SchemaRef>) -> Result<RecordBatch, Error> {
    let format = arrow::csv::reader::Format::default().with_header(true);
    let (inferred, _) = format
        .infer_schema(Cursor::new(body), None)
        .map_err(|e| Error::Invalid(format!("reading the CSV header and rows: {e}")))?;
    let schema = Schema::new(
        inferred
            .fields()
            .iter()
            .map(|f| match declared.map(|d| d.field_with_name(f.name())) {
                Some(Ok(_)) => Arc::new(f.as_ref().clone().with_data_type(DataType::Utf8)),
                _ => f.clone(),
            })
            .collect::<Vec<_>>(),
    );
    let reader = arrow::csv::ReaderBuilder::new(Arc::new(schema.clone()))
        .with_format(format)
        .build(Cursor::new(body))
        .map_err(|e| Error::Invalid(format!("reading CSV: {e}")))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("reading CSV: {e}")))?;
    arrow::compute::concat_batches(&Arc::new(schema), &batches)
        .map_err(|e| Error::Invalid(e.to_string()))
}

fn parse_json(body: &[u8]) -> Result<RecordBatch, Error> {
    let text = std::str::from_utf8(body)
        .map_err(|e| Error::Invalid(format!("the body is not UTF-8: {e}")))?;
    let rows: Vec<serde_json::Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
            .map_err(|e| Error::Invalid(format!("reading the JSON array: {e}")))?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| Error::Invalid(format!("line {}: {e}", i + 1)))
            })
            .collect::<Result<_, _>>()?
    };
    if let Some((i, _)) = rows.iter().enumerate().find(|(_, r)| !r.is_object()) {
        return Err(Error::Invalid(format!(
            "row {} is not a JSON object",
            i + 1
        )));
    }
    let inferred: Schema =
        arrow::json::reader::infer_json_schema_from_iterator(rows.iter().map(Ok))
            .map_err(|e| Error::Invalid(format!("inferring column types: {e}")))?;
    // Inference sorts columns by name; keep them in the order the rows first mention them.
    let order = key_order(text)?;
    let mut fields: Vec<_> = inferred.fields().iter().cloned().collect();
    fields.sort_by_key(|f| {
        order
            .iter()
            .position(|k| k == f.name())
            .unwrap_or(usize::MAX)
    });
    let schema = Schema::new(fields);
    let mut decoder = arrow::json::ReaderBuilder::new(Arc::new(schema.clone()))
        .with_batch_size(rows.len().max(1))
        .build_decoder()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    decoder
        .serialize(&rows)
        .map_err(|e| Error::Invalid(format!("reading rows: {e}")))?;
    Ok(decoder
        .flush()
        .map_err(|e| Error::Invalid(format!("reading rows: {e}")))?
        .unwrap_or_else(|| RecordBatch::new_empty(Arc::new(schema))))
}

/// The object keys of JSON rows (an array or NDJSON), in order of first appearance.
fn key_order(text: &str) -> Result<Vec<String>, Error> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some((k, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    let rows: Vec<Keys> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(|e| Error::Invalid(e.to_string()))?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Invalid(e.to_string()))?
    };
    let mut order: Vec<String> = Vec::new();
    for key in rows.into_iter().flat_map(|k| k.0) {
        if !order.contains(&key) {
            order.push(key);
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_json_give_the_same_rows() {
        let csv = b"device_id,tenant,site,model,hw_rev\ndev-000001,acme,berlin,T-200,rev-B\ndev-000002,acme,paris,T-300,rev-C\n";
        let a = parse_rows(Some("text/csv"), csv, None).unwrap();
        assert_eq!(a.num_rows(), 2);
        let json = br#"[{"device_id":"dev-000001","tenant":"acme","site":"berlin","model":"T-200","hw_rev":"rev-B"},
                        {"device_id":"dev-000002","tenant":"acme","site":"paris","model":"T-300","hw_rev":"rev-C"}]"#;
        let b = parse_rows(Some("application/json"), json, None).unwrap();
        assert_eq!(b.num_rows(), 2);
        let names = |b: &RecordBatch| {
            b.schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&a), names(&b));
        let nd = parse_rows(
            Some("application/x-ndjson"),
            b"{\"a\":1}\n\n{\"a\":2.5}\n",
            None,
        )
        .unwrap();
        assert_eq!(nd.num_rows(), 2);
    }

    #[test]
    fn bad_uploads_are_explained() {
        for (ct, body, needle) in [
            (Some("text/plain"), &b"x"[..], "unsupported Content-Type"),
            (Some("application/json"), b"[]", "no rows"),
            (
                Some("application/json"),
                b"[1,2]",
                "row 1 is not a JSON object",
            ),
            (Some("application/x-ndjson"), b"{\"a\":1}\n{oops", "line 2"),
            (Some("text/csv"), b"a,a\n1,2\n", "appears twice"),
            (Some("text/csv"), b"bad name,b\n1,2\n", "not allowed"),
        ] {
            let err = parse_rows(ct, body, None).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{ct:?} {:?}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn an_upload_is_held_to_the_declared_types() {
        use arrow::datatypes::{DataType, Field};
        let declared: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("max_c", DataType::Float64, true),
            Field::new("slots", DataType::Int64, true),
        ]));
        let check =
            |csv: &str| parse_rows(Some("text/csv"), csv.as_bytes(), Some(&declared)).map(|_| ());
        assert_eq!(
            check("device_id,max_c,slots,extra\nd1,5,2,x\nd2,7.5,,y\n"),
            Ok(())
        );
        let err = check("device_id,max_c\nd1,5\nd2,warm\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("column max_c, row 2: \"warm\""), "{err}");
        let err = check("device_id,slots\nd1,2\nd2,2.5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("column slots, row 2: \"2.5\""), "{err}");
        let err = check("device_id,max_c\nd1,1e400\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("column max_c, row 1"), "{err}");
        let err = check("max_c\n5\n").unwrap_err().to_string();
        assert!(err.contains("device_id is declared NOT NULL"), "{err}");
    }

    #[test]
    fn declared_text_keeps_what_was_written() {
        use arrow::array::AsArray;
        use arrow::datatypes::Field;
        let declared: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("fw", DataType::Utf8, true),
            Field::new("slots", DataType::Int64, true),
        ]));
        let csv = b"device_id,fw,slots,site\n007,2.10,3,0042\n010,1.0,,0043\n";
        let rows = parse_rows(Some("text/csv"), csv, Some(&declared)).unwrap();
        let text = |name: &str| -> Vec<String> {
            rows.column_by_name(name)
                .unwrap()
                .as_string::<i32>()
                .iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect()
        };
        assert_eq!(text("device_id"), ["007", "010"]);
        assert_eq!(text("fw"), ["2.10", "1.0"]);
        let slots = rows.column_by_name("slots").unwrap();
        assert_eq!(slots.data_type(), &DataType::Int64);
        // An undeclared column is typed by inference, as for an undeclared table.
        assert_eq!(
            rows.column_by_name("site").unwrap().data_type(),
            &DataType::Int64
        );
    }
}
