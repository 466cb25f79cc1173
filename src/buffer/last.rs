//! The last-value cache: for every series of a table, its latest point (the row at its
//! greatest time, fields merged by the dedup rule: the later write wins, field by field).
//!
//! Folding rows in is order-independent: a point at a later time replaces the entry, a point
//! at the same time merges in the fields whose write (`_seq`) is later, an earlier point is
//! ignored. So the engine can build a table's cache from a snapshot (buffer and files, in any
//! order) while the WAL thread folds new writes into the live one, and merge the two.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;

use crate::catalog::{ColumnKind, TableSchema, SEQ_COLUMN, TIME_COLUMN};

/// A series' latest point.
#[derive(Debug, Clone)]
struct Point {
    time_ns: i64,
    /// Field name → (value, sequence number of the write that set it).
    fields: HashMap<String, (ScalarValue, u64)>,
}

impl Point {
    fn merge(&mut self, other: Point) {
        if other.time_ns > self.time_ns {
            *self = other;
        } else if other.time_ns == self.time_ns {
            for (name, (value, seq)) in other.fields {
                match self.fields.get(&name) {
                    Some((_, mine)) if *mine >= seq => {}
                    _ => {
                        self.fields.insert(name, (value, seq));
                    }
                }
            }
        }
    }
}

/// Tag name → value, sorted by name, tags without a value left out.
type SeriesKey = Vec<(String, String)>;

/// The latest point of every series of one table.
#[derive(Debug, Default, Clone)]
pub struct LastValues {
    points: HashMap<SeriesKey, Point>,
}

impl LastValues {
    /// Forgets the series whose latest point is before `cutoff` (expired by retention).
    pub fn forget_before(&mut self, cutoff: i64) {
        self.points.retain(|_, p| p.time_ns >= cutoff);
    }

    /// Folds in another cache of the same table.
    pub fn merge(&mut self, other: LastValues) {
        for (key, point) in other.points {
            match self.points.get_mut(&key) {
                Some(mine) => mine.merge(point),
                None => {
                    self.points.insert(key, point);
                }
            }
        }
    }

    /// Folds in rows of the table (a buffered batch or a batch read from a file, with `_seq`).
    pub fn fold(&mut self, table: &TableSchema, batch: &RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        let (Some(times), Some(seqs)) =
            (batch.column_by_name(TIME_COLUMN), batch.column_by_name(SEQ_COLUMN))
        else {
            return;
        };
        let times = times.as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        let seqs = seqs.as_primitive::<arrow::datatypes::UInt64Type>();
        let mut tags: Vec<(&str, StringArray)> = table
            .tags()
            .filter_map(|tag| {
                let column = batch.column_by_name(&tag.name)?;
                let strings = arrow::compute::cast(column, &DataType::Utf8).ok()?;
                Some((tag.name.as_str(), strings.as_string::<i32>().clone()))
            })
            .collect();
        tags.sort_by(|a, b| a.0.cmp(b.0));
        let fields: Vec<(&str, &ArrayRef)> = table
            .columns()
            .iter()
            .filter(|c| matches!(c.kind, ColumnKind::Field(_)))
            .filter_map(|c| Some((c.name.as_str(), batch.column_by_name(&c.name)?)))
            .collect();
        // Per series in this batch, the rows at its greatest time: only those can matter. Keys
        // borrow from the batch; only the winners' are copied.
        let mut latest: HashMap<Vec<Option<&str>>, (i64, Vec<usize>)> = HashMap::new();
        for row in 0..batch.num_rows() {
            if times.is_null(row) {
                continue;
            }
            let time = times.value(row);
            let key: Vec<Option<&str>> = tags
                .iter()
                .map(|(_, values)| {
                    Some(values.value(row)).filter(|v| values.is_valid(row) && !v.is_empty())
                })
                .collect();
            let entry = latest.entry(key).or_insert((i64::MIN, Vec::new()));
            if time > entry.0 {
                *entry = (time, vec![row]);
            } else if time == entry.0 {
                entry.1.push(row);
            }
        }
        for (values, (time_ns, rows)) in latest {
            let key: SeriesKey = tags
                .iter()
                .zip(values)
                .filter_map(|((name, _), value)| Some((name.to_string(), value?.to_string())))
                .collect();
            let mut point = Point { time_ns, fields: HashMap::new() };
            for row in rows {
                let seq = seqs.value(row);
                for (name, column) in &fields {
                    if column.is_valid(row) {
                        if let Ok(value) = ScalarValue::try_from_array(column, row) {
                            let candidate = Point {
                                time_ns,
                                fields: HashMap::from([(name.to_string(), (value, seq))]),
                            };
                            point.merge(candidate);
                        }
                    }
                }
            }
            match self.points.get_mut(&key) {
                Some(mine) => mine.merge(point),
                None => {
                    self.points.insert(key, point);
                }
            }
        }
    }

    /// One row per series whose latest point is at or after `since` (every series with
    /// `None`), in the table's schema (tags, fields, time). A series whose latest point is
    /// older has no row at or after it at all.
    pub fn to_batch(
        &self,
        table: &TableSchema,
        since: Option<i64>,
    ) -> Result<RecordBatch, arrow::error::ArrowError> {
        let schema: SchemaRef = table.arrow_schema().clone();
        let points: Vec<(&SeriesKey, &Point)> =
            self.points.iter().filter(|(_, p)| since.is_none_or(|s| p.time_ns >= s)).collect();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for field in schema.fields() {
            let name = field.name();
            let column: ArrayRef = if name == TIME_COLUMN {
                Arc::new(
                    TimestampNanosecondArray::from_iter_values(
                        points.iter().map(|(_, p)| p.time_ns),
                    )
                    .with_timezone("UTC"),
                )
            } else if table.column(name).map(|c| c.kind) == Some(ColumnKind::Tag) {
                let values: StringArray = points
                    .iter()
                    .map(|(key, _)| {
                        key.iter().find(|(tag, _)| tag == name).map(|(_, v)| v.as_str())
                    })
                    .collect();
                arrow::compute::cast(&values, field.data_type())?
            } else {
                let null = ScalarValue::try_from(field.data_type())
                    .map_err(|e| arrow::error::ArrowError::ComputeError(e.to_string()))?;
                let values = points.iter().map(|(_, p)| {
                    p.fields.get(name).map_or_else(|| null.clone(), |(v, _)| v.clone())
                });
                ScalarValue::iter_to_array(values)
                    .map_err(|e| arrow::error::ArrowError::ComputeError(e.to_string()))?
            };
            columns.push(column);
        }
        RecordBatch::try_new(schema, columns)
    }
}

/// `_seq` of a batch, for tests.
#[cfg(test)]
fn with_seqs(batch: &RecordBatch, seqs: &[u64]) -> RecordBatch {
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(arrow::array::UInt64Array::from(seqs.to_vec())));
    let mut fields: Vec<arrow::datatypes::FieldRef> =
        batch.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(arrow::datatypes::Field::new(SEQ_COLUMN, DataType::UInt64, false)));
    RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns).expect("batch")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Column, FieldType};

    fn table() -> TableSchema {
        TableSchema::new(
            "cpu",
            vec![
                Column { name: "host".into(), kind: ColumnKind::Tag },
                Column { name: "u".into(), kind: ColumnKind::Field(FieldType::Float) },
                Column { name: "v".into(), kind: ColumnKind::Field(FieldType::Float) },
            ],
        )
    }

    fn rows(
        table: &TableSchema,
        hosts: &[&str],
        u: &[Option<f64>],
        v: &[Option<f64>],
        times: &[i64],
        seqs: &[u64],
    ) -> RecordBatch {
        let schema = table.arrow_schema();
        let host =
            arrow::compute::cast(&StringArray::from(hosts.to_vec()), schema.field(0).data_type())
                .expect("dict");
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                host,
                Arc::new(arrow::array::Float64Array::from(u.to_vec())),
                Arc::new(arrow::array::Float64Array::from(v.to_vec())),
                Arc::new(TimestampNanosecondArray::from(times.to_vec()).with_timezone("UTC")),
            ],
        )
        .expect("batch");
        with_seqs(&batch, seqs)
    }

    fn render(last: &LastValues, table: &TableSchema) -> Vec<String> {
        let batch = last.to_batch(table, None).expect("batch");
        let text =
            arrow::util::pretty::pretty_format_batches(&[batch]).expect("pretty").to_string();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("| ") && !l.contains("host"))
            .map(String::from)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn latest_point_per_series_with_fields_merged_in_any_order() {
        let t = table();
        let a = rows(
            &t,
            &["a", "a", "b"],
            &[Some(1.0), Some(2.0), Some(5.0)],
            &[Some(9.0), None, None],
            &[10, 20, 15],
            &[1, 1, 1],
        );
        // Same time as a's latest, a later write: sets v, keeps u. An older row changes nothing.
        let b =
            rows(&t, &["a", "a"], &[None, Some(7.0)], &[Some(3.0), Some(4.0)], &[20, 5], &[2, 2]);
        // A later write to the same point overrides u; b's newer row replaces its point.
        let c = rows(&t, &["a", "b"], &[Some(8.0), None], &[None, Some(6.0)], &[20, 16], &[3, 3]);
        let mut forward = LastValues::default();
        for batch in [&a, &b, &c] {
            forward.fold(&t, batch);
        }
        let mut backward = LastValues::default();
        for batch in [&c, &b, &a] {
            backward.fold(&t, batch);
        }
        let mut split = LastValues::default();
        split.fold(&t, &b);
        let mut other = LastValues::default();
        other.fold(&t, &c);
        other.fold(&t, &a);
        split.merge(other);
        let expected = render(&forward, &t);
        assert_eq!(expected.len(), 2);
        assert!(expected[0].contains("| a    | 8.0 | 3.0 |"), "{expected:?}");
        assert!(expected[1].contains("| b    |     | 6.0 |"), "{expected:?}");
        assert_eq!(render(&backward, &t), expected);
        assert_eq!(render(&split, &t), expected);
    }
}
