//! `INSERT INTO t …` writes through the same path as line protocol: the rows DataFusion hands
//! over are rendered as line protocol (the WAL's own payload format) and stored with
//! `Engine::write_lp`, so they are checked against the catalog, logged, synced and
//! deduplicated exactly like HTTP writes. A row needs at least one non-NULL field; a missing
//! `time` is the time of the insert.

use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float64Type, Int64Type, SchemaRef, TimestampNanosecondType, UInt64Type,
};
use async_trait::async_trait;
use datafusion::datasource::sink::DataSink;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType};
use futures::StreamExt;

use crate::catalog::{ColumnKind, TableSchema, TIME_COLUMN};
use crate::engine::{Engine, WriteOptions};
use crate::line_protocol::Precision;

#[derive(Debug)]
pub struct LineProtocolSink {
    pub engine: Arc<Engine>,
    pub db: String,
    pub table: Arc<TableSchema>,
    pub schema: SchemaRef,
}

impl DisplayAs for LineProtocolSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LineProtocolSink: table={}", self.table.name)
    }
}

fn escape(out: &mut String, text: &str, specials: &[char]) -> Result<()> {
    for c in text.chars() {
        if c == '\n' || c == '\r' {
            return Err(DataFusionError::Execution(
                "line breaks cannot be stored in tag values, field names or string fields".into(),
            ));
        }
        if c == '\\' || specials.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
    Ok(())
}

const NAME_SPECIALS: &[char] = &[',', '=', ' '];

/// Appends the rows of `batch` as line protocol (nanosecond timestamps).
pub fn render(
    table: &TableSchema,
    batch: &RecordBatch,
    default_time_ns: i64,
    out: &mut String,
) -> Result<usize> {
    let schema = batch.schema();
    let plain: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Dictionary(_, _) => arrow::compute::cast(c, &DataType::Utf8),
            _ => Ok(c.clone()),
        })
        .collect::<std::result::Result<_, _>>()?;
    let mut measurement = String::new();
    escape(&mut measurement, &table.name, &[',', ' '])?;
    for row in 0..batch.num_rows() {
        let start = out.len();
        out.push_str(&measurement);
        let mut time_ns = default_time_ns;
        let mut fields = 0;
        for (i, field) in schema.fields().iter().enumerate() {
            let array = &plain[i];
            if array.is_null(row) {
                continue;
            }
            let name = field.name();
            if name == TIME_COLUMN {
                time_ns = array.as_primitive::<TimestampNanosecondType>().value(row);
                continue;
            }
            if table.column(name).map(|c| c.kind) == Some(ColumnKind::Tag) {
                // An empty tag value is the same as no tag, as in line protocol.
                let value = array.as_string::<i32>().value(row);
                if !value.is_empty() {
                    out.push(',');
                    escape(out, name, NAME_SPECIALS)?;
                    out.push('=');
                    escape(out, value, NAME_SPECIALS)?;
                }
            }
        }
        for (i, field) in schema.fields().iter().enumerate() {
            let array = &plain[i];
            let name = field.name();
            if array.is_null(row)
                || name == TIME_COLUMN
                || table.column(name).map(|c| c.kind) == Some(ColumnKind::Tag)
            {
                continue;
            }
            out.push(if fields == 0 { ' ' } else { ',' });
            escape(out, name, NAME_SPECIALS)?;
            out.push('=');
            match array.data_type() {
                DataType::Float64 => {
                    let v = array.as_primitive::<Float64Type>().value(row);
                    if !v.is_finite() {
                        return Err(DataFusionError::Execution(format!(
                            "field \"{name}\" cannot store {v}"
                        )));
                    }
                    let _ = write!(out, "{v:?}");
                }
                DataType::Int64 => {
                    let _ = write!(out, "{}i", array.as_primitive::<Int64Type>().value(row));
                }
                DataType::UInt64 => {
                    let _ = write!(out, "{}u", array.as_primitive::<UInt64Type>().value(row));
                }
                DataType::Boolean => {
                    out.push_str(if array.as_boolean().value(row) { "t" } else { "f" })
                }
                DataType::Utf8 => {
                    out.push('"');
                    escape(out, array.as_string::<i32>().value(row), &['"'])?;
                    out.push('"');
                }
                other => {
                    return Err(DataFusionError::Execution(format!(
                        "field \"{name}\" has unsupported type {other}"
                    )))
                }
            }
            fields += 1;
        }
        if fields == 0 {
            out.truncate(start);
            return Err(DataFusionError::Execution(format!(
                "a row inserted into \"{}\" needs at least one non-NULL field",
                table.name
            )));
        }
        let _ = writeln!(out, " {time_ns}");
    }
    Ok(batch.num_rows())
}

#[async_trait]
impl DataSink for LineProtocolSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(
        &self,
        mut data: SendableRecordBatchStream,
        _context: &Arc<TaskContext>,
    ) -> Result<u64> {
        let default_time_ns = self.engine.clock().now_ns();
        // One request per batch keeps each write within the WAL's record limit.
        let mut rows = 0u64;
        while let Some(batch) = data.next().await {
            let batch = batch?;
            let mut text = String::new();
            render(&self.table, &batch, default_time_ns, &mut text)?;
            if text.is_empty() {
                continue;
            }
            let options = WriteOptions {
                precision: Precision::Nanosecond,
                accept_partial: false,
                no_sync: false,
                default_time_ns,
            };
            match self.engine.write_lp(&self.db, text.as_bytes(), options).await {
                Ok(outcome) => rows += outcome.lines_stored as u64,
                Err(crate::engine::Error::Rejected(lines)) => {
                    let reasons: Vec<_> =
                        lines.lines.iter().map(|l| l.error_message.clone()).collect();
                    return Err(DataFusionError::Execution(format!(
                        "insert rejected, {}: {}",
                        lines.summary(),
                        reasons.join("; ")
                    )));
                }
                Err(e) => return Err(DataFusionError::External(Box::new(e))),
            }
        }
        Ok(rows)
    }
}
