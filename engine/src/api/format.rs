//! Encodings of query answers: JSON (columns + rows), CSV, NDJSON, Arrow IPC stream and a
//! terminal table.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::SchemaRef;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use fleetlake_sql::QueryResult;
use serde_json::{Value, json};

/// The answer formats `POST /v1/query` offers, chosen by the `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    NdJson,
    ArrowStream,
}

impl Format {
    /// Picks the first supported media type in an `Accept` header; JSON otherwise.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Json;
        };
        for part in accept.split(',') {
            let media = part.split(';').next().unwrap_or("").trim();
            match media {
                "text/csv" => return Format::Csv,
                "application/x-ndjson" | "application/jsonl" => return Format::NdJson,
                "application/vnd.apache.arrow.stream" => return Format::ArrowStream,
                "application/json" | "*/*" => return Format::Json,
                _ => {}
            }
        }
        Format::Json
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::NdJson => "application/x-ndjson",
            Format::ArrowStream => "application/vnd.apache.arrow.stream",
        }
    }

    pub fn encode(self, result: &QueryResult) -> Result<Vec<u8>, arrow::error::ArrowError> {
        match self {
            Format::Json => Ok(serde_json::to_vec(&to_json(result)?).expect("JSON values")),
            Format::Csv => {
                let mut out = Vec::new();
                {
                    let mut w = arrow::csv::WriterBuilder::new()
                        .with_header(true)
                        .build(&mut out);
                    for b in &result.batches {
                        w.write(b)?;
                    }
                }
                if result.batches.is_empty() || result.row_count() == 0 {
                    out = header_line(&result.schema).into_bytes();
                }
                Ok(out)
            }
            Format::NdJson => {
                let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
                for b in &result.batches {
                    w.write(b)?;
                }
                w.finish()?;
                Ok(w.into_inner())
            }
            Format::ArrowStream => {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &result.schema)?;
                for b in &result.batches {
                    w.write(b)?;
                }
                w.finish()?;
                w.into_inner()
            }
        }
    }
}

fn header_line(schema: &SchemaRef) -> String {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    format!("{}\n", names.join(","))
}

/// `{"columns":[{"name":…,"type":…}],"rows":[[…]],"row_count":N}`.
pub fn to_json(result: &QueryResult) -> Result<Value, arrow::error::ArrowError> {
    let columns: Vec<Value> = result
        .schema
        .fields()
        .iter()
        .map(|f| json!({"name": f.name(), "type": type_name(f.data_type())}))
        .collect();
    let mut rows: Vec<Value> = Vec::with_capacity(result.row_count());
    for batch in &result.batches {
        let cells: Vec<Vec<Value>> = batch
            .columns()
            .iter()
            .map(column_values)
            .collect::<Result<_, _>>()?;
        for r in 0..batch.num_rows() {
            rows.push(Value::Array(cells.iter().map(|c| c[r].clone()).collect()));
        }
    }
    Ok(json!({"columns": columns, "rows": rows, "row_count": result.row_count()}))
}

/// The type a user sees: Arrow's name, with the view layouts (an execution detail) shown as the
/// plain types they hold.
fn type_name(data_type: &arrow::datatypes::DataType) -> String {
    use arrow::datatypes::DataType;
    match data_type {
        DataType::Utf8View => "Utf8".into(),
        DataType::BinaryView => "Binary".into(),
        other => other.to_string(),
    }
}

/// JSON values of a column: numbers and booleans as such, everything else as its display text.
fn column_values(array: &ArrayRef) -> Result<Vec<Value>, arrow::error::ArrowError> {
    use arrow::datatypes::*;
    let n = array.len();
    let mut out = Vec::with_capacity(n);
    macro_rules! numbers {
        ($t:ty) => {{
            let a = array.as_primitive::<$t>();
            for i in 0..n {
                out.push(if a.is_null(i) {
                    Value::Null
                } else {
                    json!(a.value(i))
                });
            }
        }};
    }
    match array.data_type() {
        DataType::Int8 => numbers!(Int8Type),
        DataType::Int16 => numbers!(Int16Type),
        DataType::Int32 => numbers!(Int32Type),
        DataType::Int64 => numbers!(Int64Type),
        DataType::UInt8 => numbers!(UInt8Type),
        DataType::UInt16 => numbers!(UInt16Type),
        DataType::UInt32 => numbers!(UInt32Type),
        DataType::UInt64 => numbers!(UInt64Type),
        DataType::Float32 => numbers!(Float32Type),
        DataType::Float64 => {
            let a = array.as_primitive::<Float64Type>();
            for i in 0..n {
                let v = a.value(i);
                out.push(if a.is_null(i) || !v.is_finite() {
                    Value::Null
                } else {
                    json!(v)
                });
            }
        }
        DataType::Boolean => {
            let a = array.as_boolean();
            for i in 0..n {
                out.push(if a.is_null(i) {
                    Value::Null
                } else {
                    json!(a.value(i))
                });
            }
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            // Payloads are mostly text: show them as text (invalid bytes replaced).
            let a = arrow::compute::cast(array, &DataType::LargeBinary)?;
            let a = a.as_binary::<i64>();
            for i in 0..n {
                out.push(if a.is_null(i) {
                    Value::Null
                } else {
                    Value::String(String::from_utf8_lossy(a.value(i)).into_owned())
                });
            }
        }
        _ => {
            let options = FormatOptions::default().with_null("\u{0}");
            let f = ArrayFormatter::try_new(array.as_ref(), &options)?;
            for i in 0..n {
                out.push(if array.is_null(i) {
                    Value::Null
                } else {
                    Value::String(f.value(i).to_string())
                });
            }
        }
    }
    Ok(out)
}

/// A table for the terminal.
pub fn to_table(result: &QueryResult) -> Result<String, arrow::error::ArrowError> {
    if result.row_count() == 0 {
        return Ok(format!("{}(0 rows)", header_line(&result.schema)));
    }
    let table = arrow::util::pretty::pretty_format_batches(&result.batches)?;
    let n = result.row_count();
    Ok(format!(
        "{table}\n({n} row{})",
        if n == 1 { "" } else { "s" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn result() -> QueryResult {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
            Field::new("t", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("d1"), None])),
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
            ],
        )
        .unwrap();
        QueryResult::new(schema, vec![batch])
    }

    #[test]
    fn json_answer_has_columns_rows_and_count() {
        let v = to_json(&result()).unwrap();
        assert_eq!(
            v,
            json!({
                "columns": [{"name":"device_id","type":"Utf8"},{"name":"n","type":"Int64"},{"name":"t","type":"Float64"}],
                "rows": [["d1",1,1.5],[null,2,null]],
                "row_count": 2
            })
        );
    }

    #[test]
    fn accept_header_picks_the_format() {
        assert_eq!(Format::from_accept(None), Format::Json);
        assert_eq!(Format::from_accept(Some("text/csv")), Format::Csv);
        assert_eq!(
            Format::from_accept(Some("application/x-ndjson")),
            Format::NdJson
        );
        assert_eq!(
            Format::from_accept(Some("application/vnd.apache.arrow.stream")),
            Format::ArrowStream
        );
        assert_eq!(
            Format::from_accept(Some("text/html, text/csv;q=0.9")),
            Format::Csv
        );
        let csv = String::from_utf8(Format::Csv.encode(&result()).unwrap()).unwrap();
        assert_eq!(csv, "device_id,n,t\nd1,1,1.5\n,2,\n");
        let nd = String::from_utf8(Format::NdJson.encode(&result()).unwrap()).unwrap();
        assert_eq!(
            nd.lines().next().unwrap(),
            r#"{"device_id":"d1","n":1,"t":1.5}"#
        );
    }
}
