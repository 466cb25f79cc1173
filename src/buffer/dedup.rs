//! Sort rows by series key (tags, then time) and merge rows that share a key: for each field,
//! the value from the row with the highest `_seq` that has one (the later write wins, field by
//! field). Used when persisting a partition and by queries over partitions marked `overlap`.

use arrow::array::{ArrayRef, UInt32Array};
use arrow::compute::{lexsort_to_indices, take, SortColumn, SortOptions};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

/// Sorts `batch` by `keys` (column indices: tags then time) and then `_seq`; when `merge`,
/// rows with equal keys become one. The batch must contain a `_seq` column.
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
    let sort_columns: Vec<SortColumn> = keys
        .iter()
        .chain(std::iter::once(&seq))
        .map(|&i| SortColumn { values: batch.column(i).clone(), options: Some(ascending) })
        .collect();
    let order = lexsort_to_indices(&sort_columns, None)?;
    let sorted: Vec<ArrayRef> =
        batch.columns().iter().map(|c| take(c, &order, None)).collect::<Result<_, _>>()?;
    let sorted = RecordBatch::try_new(batch.schema(), sorted)?;
    if !merge {
        return Ok(sorted);
    }
    let key_arrays: Vec<ArrayRef> = keys.iter().map(|&i| sorted.column(i).clone()).collect();
    let ranges = arrow::compute::partition(&key_arrays)?.ranges();
    if ranges.len() == sorted.num_rows() {
        return Ok(sorted);
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
