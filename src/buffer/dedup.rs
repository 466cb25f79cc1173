//! Sort rows by series key (tags, then time) and merge rows that share a key: for each field,
//! the value from the row with the highest `_seq` that has one (the later write wins, field by
//! field). Used when persisting a partition and by queries over partitions marked `overlap`.

use std::sync::Arc;

use arrow::array::{ArrayRef, UInt32Array};
use arrow::compute::{lexsort_to_indices, take, SortColumn, SortOptions};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

/// Sorts `batch` by `keys` (column indices: tags then time), then `_seq`, then position (rows
/// of one write share a `_seq`: a later line of it is the later write); when `merge`, rows
/// with equal keys become one. The batch must contain a `_seq` column.
pub fn sort_and_merge(
    batch: &RecordBatch,
    keys: &[usize],
    seq: usize,
    merge: bool,
) -> Result<RecordBatch, ArrowError> {
    if batch.num_rows() == 0 {
        return Ok(batch.clone());
    }
    let ascending = SortOptions { descending: false, nulls_first: true };
    let position: ArrayRef = Arc::new(UInt32Array::from_iter_values(0..batch.num_rows() as u32));
    let sort_columns: Vec<SortColumn> = keys
        .iter()
        .chain(std::iter::once(&seq))
        .map(|&i| SortColumn { values: batch.column(i).clone(), options: Some(ascending) })
        .chain(std::iter::once(SortColumn { values: position, options: Some(ascending) }))
        .collect();
    let order = lexsort_to_indices(&sort_columns, None)?;
    let sorted: Vec<ArrayRef> =
        batch.columns().iter().map(|c| take(c, &order, None)).collect::<Result<_, _>>()?;
    let sorted = RecordBatch::try_new(batch.schema(), sorted)?;
    if !merge {
        return Ok(sorted);
    }
    merge_sorted(&sorted, keys, seq)
}

/// Merges rows that share a key in a batch already sorted by `keys`, then `_seq`, then
/// position (as `sort_and_merge` sorts, and as compaction's merge of sorted files yields).
pub fn merge_sorted(
    sorted: &RecordBatch,
    keys: &[usize],
    seq: usize,
) -> Result<RecordBatch, ArrowError> {
    if sorted.num_rows() == 0 {
        return Ok(sorted.clone());
    }
    let key_arrays: Vec<ArrayRef> = keys.iter().map(|&i| sorted.column(i).clone()).collect();
    let ranges = arrow::compute::partition(&key_arrays)?.ranges();
    if ranges.len() == sorted.num_rows() {
        return Ok(sorted.clone());
    }
    let is_key = |i: usize| keys.contains(&i);
    let mut columns = Vec::with_capacity(sorted.num_columns());
    for (i, column) in sorted.columns().iter().enumerate() {
        let indices: UInt32Array = if is_key(i) {
            ranges.iter().map(|r| r.start as u32).collect()
        } else if i == seq {
            ranges.iter().map(|r| (r.end - 1) as u32).collect()
        } else {
            // Within a range rows ascend by _seq: take the last non-null value, if any.
            ranges
                .iter()
                .map(|r| {
                    r.clone().rev().find(|&row| column.is_valid(row)).unwrap_or(r.end - 1) as u32
                })
                .collect()
        };
        columns.push(take(column, &indices, None)?);
    }
    RecordBatch::try_new(sorted.schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn the_later_line_of_one_write_wins() {
        // One key written many times by one write (one `_seq`): the last line's value wins,
        // whatever order an unstable sort would leave equal rows in.
        let n = 5_000;
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Float64, true),
            Field::new("_seq", DataType::UInt64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values((0..n).map(|i| i % 7))),
                Arc::new(Float64Array::from_iter_values((0..n).map(|i| i as f64))),
                Arc::new(UInt64Array::from_iter_values((0..n).map(|_| 9))),
            ],
        )
        .expect("batch");
        let merged = sort_and_merge(&batch, &[0], 2, true).expect("merge");
        let v = merged.column(1).as_any().downcast_ref::<Float64Array>().expect("f64");
        let want: Vec<f64> = (0..7).map(|k| ((n - 1 - k) / 7 * 7 + k) as f64).collect();
        assert_eq!(v.values().to_vec(), want);
    }
}
