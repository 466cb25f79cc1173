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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, StringArray, TimestampNanosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use arrow::record_batch::RecordBatch;

    use super::*;
    use crate::alerts::rule::{OnError, OnNoData};

    fn rule() -> Rule {
        Rule {
            db: "db".into(),
            name: "r".into(),
            query: "SELECT 1".into(),
            every_ms: 1000,
            for_ms: 0,
            keep_firing_for_ms: 0,
            labels: vec![("team".into(), "db".into())],
            annotations: Vec::new(),
            no_data: OnNoData::Ok,
            on_error: OnError::Error,
            targets: Vec::new(),
            paused: false,
        }
    }

    fn batch(hosts: Vec<Option<&str>>) -> (Schema, RecordBatch) {
        let n = hosts.len();
        let schema = Schema::new(vec![
            Field::new("host", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
            Field::new("n", DataType::Int64, false),
            Field::new("t", DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())), false),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(schema.clone()),
            vec![
                Arc::new(StringArray::from(hosts)),
                Arc::new(Float64Array::from(vec![Some(f64::NAN); n])),
                Arc::new(Int64Array::from(vec![7; n])),
                Arc::new(TimestampNanosecondArray::from(vec![0; n]).with_timezone("UTC")),
            ],
        )
        .expect("batch");
        (schema, batch)
    }

    #[test]
    fn text_columns_are_labels_the_rest_values() {
        let (schema, b) = batch(vec![Some("a"), None]);
        let rows = rows(&rule(), &schema, &[b]).expect("rows");
        assert_eq!(rows[0].key, ["r", "a"]);
        assert_eq!(
            rows[0].labels,
            [
                ("alertname".into(), "r".into()),
                ("team".into(), "db".into()),
                ("host".into(), "a".into())
            ]
        );
        // NULL text: no label (as Prometheus drops empty labels).
        assert_eq!(rows[1].labels.len(), 2);
        assert_eq!(rows[0].values[0], ("v".to_string(), Value::String("NaN".into())));
        assert_eq!(rows[0].values[1], ("n".to_string(), serde_json::json!(7.0)));
        assert_eq!(rows[0].values[2].1, Value::String("1970-01-01T00:00:00Z".into()));
    }

    #[test]
    fn duplicate_labels_and_too_many_rows_are_errors() {
        let (schema, b) = batch(vec![Some("a"), Some("b"), Some("a")]);
        let error = rows(&rule(), &schema, &[b]).unwrap_err();
        assert!(error.contains("rows 1 and 3 have the same labels (a)"), "{error}");
        let many: Vec<String> = (0..=INSTANCES_MAX).map(|i| i.to_string()).collect();
        let (schema, b) = batch(many.iter().map(|s| Some(s.as_str())).collect());
        assert!(rows(&rule(), &schema, &[b]).unwrap_err().contains("more than"));
        let long = "x".repeat(super::super::rule::INSTANCE_BYTES_MAX);
        let (schema, b) = batch(vec![Some(long.as_str())]);
        assert!(rows(&rule(), &schema, &[b]).unwrap_err().contains("bytes of labels"));
    }
}
