//! Series-sorted buffered batches. Writes arrive as many small batches, each holding rows of
//! many series in arrival order, so a query for one series would have to look at every batch.
//! In the background (see `Engine::sort_buffers`) runs of them are rewritten as one batch
//! sorted by tags (in the table's column order), then time, then `_seq`, whose tag columns
//! carry one dictionary each with unique values in ascending order. A query then finds the
//! rows of a tag value by binary search ([`ranges_of`]) instead of reading every row.
//!
//! Only the order of rows changes: the sorted batch holds exactly the rows of its inputs,
//! `_seq` included, so deduplication and persistence see the same data.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, DictionaryArray, Int32Array, StringArray};
use arrow::datatypes::{DataType, Int32Type, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use super::{adapt, with_time_range};
use crate::catalog::{SEQ_COLUMN, TIME_COLUMN};

const SORTED_KEY: &str = "sundial.sorted";

/// Whether `batch` was produced by [`sort_by_series`].
pub fn is_sorted(batch: &RecordBatch) -> bool {
    batch.schema_ref().metadata().contains_key(SORTED_KEY)
}

fn is_tag(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Dictionary(k, v) if **k == DataType::Int32 && **v == DataType::Utf8)
}

/// One tag column of the output: every input's dictionary keys mapped to ranks in the sorted
/// union of their values (0 is null, so nulls sort first).
struct TagRanks {
    /// Per input batch, the rank of each of its dictionary's values.
    ranks: Vec<Vec<u32>>,
    values: StringArray,
}

fn tag_ranks(columns: &[&ArrayRef]) -> Result<TagRanks, ArrowError> {
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let mut distinct: Vec<&str> = Vec::new();
    let mut local: Vec<Vec<u32>> = Vec::with_capacity(columns.len());
    let mut previous: Option<(&StringArray, usize)> = None;
    for column in columns {
        let dictionary = column
            .as_dictionary_opt::<Int32Type>()
            .ok_or_else(|| ArrowError::SchemaError("tag is not a dictionary".into()))?;
        let values = dictionary
            .values()
            .as_string_opt::<i32>()
            .ok_or_else(|| ArrowError::SchemaError("tag values are not strings".into()))?;
        // Writers usually send the same series in the same order batch after batch: a
        // dictionary equal to the previous one maps the same way.
        if let Some((prev, index)) = previous {
            if prev.len() == values.len()
                && prev.value_offsets() == values.value_offsets()
                && prev.value_data() == values.value_data()
            {
                local.push(local[index].clone());
                continue;
            }
        }
        let map = (0..values.len())
            .map(|i| {
                let value = values.value(i);
                *ids.entry(value).or_insert_with(|| {
                    distinct.push(value);
                    distinct.len() as u32 - 1
                })
            })
            .collect();
        local.push(map);
        previous = Some((values, local.len() - 1));
    }
    let mut order: Vec<u32> = (0..distinct.len() as u32).collect();
    order.sort_unstable_by_key(|&id| distinct[id as usize]);
    let mut rank_of_id = vec![0u32; distinct.len()];
    for (rank, &id) in order.iter().enumerate() {
        rank_of_id[id as usize] = rank as u32 + 1;
    }
    let ranks = local
        .into_iter()
        .map(|ids| ids.into_iter().map(|id| rank_of_id[id as usize]).collect())
        .collect();
    let values = StringArray::from_iter_values(order.iter().map(|&id| distinct[id as usize]));
    Ok(TagRanks { ranks, values })
}

/// The rows of `batches` as one batch of `schema` (the table's, with `_seq`) sorted by series
/// (tags in schema order), time and `_seq`, marked sorted, with its time range recorded.
pub fn sort_by_series(
    batches: &[RecordBatch],
    schema: &SchemaRef,
) -> Result<RecordBatch, ArrowError> {
    sort_with(batches, schema, true)
}

/// [`sort_by_series`]; `radix` false takes the path for tags too many to number with one
/// integer (for tests).
pub(super) fn sort_with(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    radix: bool,
) -> Result<RecordBatch, ArrowError> {
    let adapted: Vec<RecordBatch> = batches.iter().map(|b| adapt(b, schema)).collect();
    let tags: Vec<usize> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| is_tag(f.data_type()))
        .map(|(i, _)| i)
        .collect();
    let time = schema.index_of(TIME_COLUMN)?;
    let seq = schema.index_of(SEQ_COLUMN)?;
    let ranked: Vec<TagRanks> = tags
        .iter()
        .map(|&t| tag_ranks(&adapted.iter().map(|b| b.column(t)).collect::<Vec<_>>()))
        .collect::<Result<_, _>>()?;

    // Each row's series as one integer whose order is the tags' lexicographic order (mixed
    // radix over the ranks), when the tags' cardinalities allow it.
    let radix: Option<Vec<u64>> = {
        let mut weights = vec![0u64; ranked.len()];
        let mut weight: Option<u64> = Some(1);
        for (i, r) in ranked.iter().enumerate().rev() {
            weights[i] = weight.unwrap_or(0);
            weight = weight.and_then(|w| w.checked_mul(r.values.len() as u64 + 1));
        }
        weight.filter(|_| radix).map(|_| weights)
    };
    let rows: usize = adapted.iter().map(|b| b.num_rows()).sum();
    // Rank tuples per row, only without a mixed-radix key (very many distinct tag values):
    // series then get ids in their lexicographic order.
    let mut tuples: Vec<Vec<u32>> = Vec::new();
    // (series, time, seq, batch, row) per row, sorted.
    let mut order: Vec<(u64, i64, u64, u32, u32)> = Vec::with_capacity(rows);
    // Per batch, per tag, each row's rank (0: null): the sort key, and then the output keys.
    let mut ranks_of_batches: Vec<Vec<Vec<u32>>> = Vec::with_capacity(adapted.len());
    for (b, batch) in adapted.iter().enumerate() {
        let n = batch.num_rows();
        let rank_columns: Vec<Vec<u32>> =
            ranked
                .iter()
                .zip(&tags)
                .map(|(r, &t)| {
                    let keys = batch.column(t).as_dictionary::<Int32Type>().keys();
                    (0..n)
                        .map(|row| {
                            if keys.is_null(row) {
                                0
                            } else {
                                r.ranks[b][keys.value(row) as usize]
                            }
                        })
                        .collect()
                })
                .collect();
        let series: Vec<u64> = match &radix {
            Some(weights) => {
                let mut key = vec![0u64; n];
                for (ranks, &w) in rank_columns.iter().zip(weights) {
                    for (k, &r) in key.iter_mut().zip(ranks) {
                        *k += r as u64 * w;
                    }
                }
                key
            }
            None => (0..n)
                .map(|row| {
                    tuples.push(rank_columns.iter().map(|c| c[row]).collect());
                    tuples.len() as u64 - 1
                })
                .collect(),
        };
        let times = batch.column(time).as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        let seqs = batch.column(seq).as_primitive::<arrow::datatypes::UInt64Type>();
        for (row, &key) in series.iter().enumerate() {
            order.push((key, times.value(row), seqs.value(row), b as u32, row as u32));
        }
        ranks_of_batches.push(rank_columns);
    }
    if radix.is_none() {
        let mut by_tuple: Vec<u32> = (0..tuples.len() as u32).collect();
        by_tuple.sort_unstable_by(|&a, &b| tuples[a as usize].cmp(&tuples[b as usize]));
        let mut position = vec![0u64; tuples.len()];
        let mut rank = 0u64;
        for (i, &t) in by_tuple.iter().enumerate() {
            if i > 0 && tuples[t as usize] != tuples[by_tuple[i - 1] as usize] {
                rank += 1;
            }
            position[t as usize] = rank;
        }
        for entry in &mut order {
            entry.0 = position[entry.0 as usize];
        }
    }
    order.sort_unstable();

    let picks: Vec<(usize, usize)> =
        order.iter().map(|&(_, _, _, b, r)| (b as usize, r as usize)).collect();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, _) in schema.fields().iter().enumerate() {
        if let Some(position) = tags.iter().position(|&t| t == i) {
            let keys: Int32Array = picks
                .iter()
                .map(|&(b, row)| {
                    Some(ranks_of_batches[b][position][row])
                        .filter(|&rank| rank > 0)
                        .map(|rank| rank as i32 - 1)
                })
                .collect();
            columns.push(Arc::new(DictionaryArray::<Int32Type>::try_new(
                keys,
                Arc::new(ranked[position].values.clone()),
            )?));
        } else {
            let parts: Vec<&dyn Array> = adapted.iter().map(|b| b.column(i).as_ref()).collect();
            columns.push(arrow::compute::interleave(&parts, &picks)?);
        }
    }
    let mut metadata = schema.metadata().clone();
    metadata.insert(SORTED_KEY.into(), "tags,time,_seq".into());
    let schema = Arc::new(schema.as_ref().clone().with_metadata(metadata));
    Ok(with_time_range(RecordBatch::try_new(schema, columns)?))
}

/// For a sorted batch whose first tag column is `tag`: the row ranges holding each of
/// `values` (rows sorted by that tag, its dictionary sorted and unique). `None` when the batch
/// is not sorted that way, so the caller must look at every row.
pub fn ranges_of(batch: &RecordBatch, tag: &str, values: &[String]) -> Option<Vec<Range<usize>>> {
    if !is_sorted(batch) {
        return None;
    }
    let first = batch.schema_ref().fields().iter().position(|f| is_tag(f.data_type()))?;
    if batch.schema_ref().field(first).name() != tag {
        return None;
    }
    let dictionary = batch.column(first).as_dictionary::<Int32Type>();
    let strings = dictionary.values().as_string::<i32>();
    let keys = dictionary.keys();
    // Nulls sort first; their key slots hold no rank, so skip past them.
    let nulls = keys.null_count();
    let keys = &keys.values()[nulls..];
    let mut ranges: Vec<Range<usize>> = values
        .iter()
        .filter_map(|v| {
            let (mut lo, mut hi) = (0, strings.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                match strings.value(mid).cmp(v.as_str()) {
                    std::cmp::Ordering::Less => lo = mid + 1,
                    std::cmp::Ordering::Greater => hi = mid,
                    std::cmp::Ordering::Equal => return Some(mid as i32),
                }
            }
            None
        })
        .map(|key| {
            let start = keys.partition_point(|&k| k < key);
            let end = keys.partition_point(|&k| k <= key);
            start + nulls..end + nulls
        })
        .filter(|r| !r.is_empty())
        .collect();
    ranges.sort_by_key(|r| r.start);
    ranges.dedup();
    Some(ranges)
}
