//! One evaluation of a rule: its query through the statement pipeline, and its rows as
//! instances (text columns are labels, the other columns values).

use std::collections::HashMap;
use std::time::Duration;

use arrow::array::{Array, ArrayRef, BooleanArray, Float64Array, StringArray};
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::Value;

use super::rule::{Rule, INSTANCES_MAX};
use super::state::{rule_labels, Outcome, Row};
use crate::query::QueryEngine;

/// Whether a column of this type is a label (text: tags and strings).
pub fn is_label(data_type: &DataType) -> bool {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, value) => is_label(value),
        _ => false,
    }
}

fn is_number(data_type: &DataType) -> bool {
    data_type.is_numeric()
}

/// How long one evaluation may take: its interval, from 5 s to 60 s.
pub fn timeout(rule: &Rule) -> Duration {
    rule.every().clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// Runs `rule`'s query now.
pub async fn evaluate(query: &QueryEngine, rule: &Rule) -> Outcome {
    let statement = match crate::statement::command(&rule.query) {
        Ok(Some(crate::statement::Command::Query(statement))) => statement,
        Ok(_) => return Outcome::Error("the rule's query is not a query".into()),
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let limit = timeout(rule);
    match tokio::time::timeout(limit, query.run(&rule.db, *statement)).await {
        Err(_) => Outcome::Error(format!(
            "the evaluation took longer than {}",
            humantime::format_duration(limit)
        )),
        Ok(Err(e)) => Outcome::Error(e.to_string()),
        Ok(Ok(collected)) => match rows(rule, &collected.schema, &collected.batches) {
            Ok(rows) => Outcome::Rows(rows),
            Err(e) => Outcome::Error(e),
        },
    }
}

/// The rows of a result as instances; two rows with the same labels are an error (which of
/// them would the alert be?).
pub fn rows(rule: &Rule, schema: &Schema, batches: &[RecordBatch]) -> Result<Vec<Row>, String> {
    let base = rule_labels(rule);
    let mut out = Vec::new();
    let mut seen: HashMap<Vec<String>, usize> = HashMap::new();
    let format = FormatOptions::default().with_null("");
    for batch in batches {
        let mut labels: Vec<(String, StringArray)> = Vec::new();
        let mut values: Vec<(String, ArrayRef)> = Vec::new();
        for (field, column) in schema.fields().iter().zip(batch.columns()) {
            if is_label(field.data_type()) {
                let text =
                    arrow::compute::cast(column, &DataType::Utf8).map_err(|e| e.to_string())?;
                let text = text
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .cloned()
                    .ok_or_else(|| format!("column \"{}\" is not text", field.name()))?;
                labels.push((field.name().clone(), text));
            } else if is_number(field.data_type()) {
                let number =
                    arrow::compute::cast(column, &DataType::Float64).map_err(|e| e.to_string())?;
                values.push((field.name().clone(), number));
            } else {
                values.push((field.name().clone(), column.clone()));
            }
        }
        let formatters: Vec<Option<ArrayFormatter<'_>>> = values
            .iter()
            .map(|(_, a)| {
                if matches!(a.data_type(), DataType::Float64 | DataType::Boolean) {
                    None
                } else {
                    ArrayFormatter::try_new(a.as_ref(), &format).ok()
                }
            })
            .collect();
        for row in 0..batch.num_rows() {
            if out.len() >= INSTANCES_MAX {
                return Err(format!(
                    "the query returned more than {INSTANCES_MAX} rows; an alert has at most \
                     that many instances"
                ));
            }
            // Row keys begin with "r": never the key of the rule's own nodata/error instances.
            let mut key = Vec::with_capacity(labels.len() + 1);
            key.push("r".to_string());
            let mut row_labels = base.clone();
            for (name, array) in &labels {
                if array.is_null(row) {
                    key.push(String::new());
                } else {
                    let value = array.value(row).to_string();
                    key.push(value.clone());
                    if !value.is_empty() {
                        row_labels.push((name.clone(), value));
                    }
                }
            }
            let mut row_values = Vec::with_capacity(values.len());
            for ((name, array), formatter) in values.iter().zip(&formatters) {
                let value = if array.is_null(row) {
                    Value::Null
                } else if let Some(f) = array.as_any().downcast_ref::<Float64Array>() {
                    let v = f.value(row);
                    serde_json::Number::from_f64(v)
                        .map_or(Value::String(v.to_string()), Value::Number)
                } else if let Some(b) = array.as_any().downcast_ref::<BooleanArray>() {
                    Value::Bool(b.value(row))
                } else {
                    match formatter {
                        Some(f) => Value::String(f.value(row).to_string()),
                        None => Value::Null,
                    }
                };
                row_values.push((name.clone(), value));
            }
            let size: usize = row_labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                + row_values.iter().map(|(k, v)| k.len() + v.to_string().len()).sum::<usize>();
            if size > super::rule::INSTANCE_BYTES_MAX {
                return Err(format!(
                    "row {} has {size} bytes of labels and values, more than the {} an alert \
                     instance may have",
                    out.len() + 1,
                    super::rule::INSTANCE_BYTES_MAX
                ));
            }
            if let Some(first) = seen.insert(key.clone(), out.len()) {
                return Err(format!(
                    "rows {} and {} have the same labels ({}): an alert's rows must differ in \
                     their text columns",
                    first + 1,
                    out.len() + 1,
                    key[1..].join(", ")
                ));
            }
            out.push(Row { key, labels: row_labels, values: row_values });
        }
    }
    Ok(out)
}
