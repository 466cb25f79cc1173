//! Time-bound extraction from pushed-down filters.

use super::*;
use datafusion::prelude::{col, lit};

fn ts(ns: i64) -> Expr {
    lit(ScalarValue::TimestampNanosecond(Some(ns), Some("UTC".into())))
}

#[test]
fn bounds_from_filters() {
    let cases: Vec<(Vec<Expr>, (i64, i64))> = vec![
        (vec![], (i64::MIN, i64::MAX)),
        (vec![col("time").gt_eq(ts(10)), col("time").lt(ts(20))], (10, 19)),
        (vec![col("time").gt(ts(10))], (11, i64::MAX)),
        (vec![ts(10).gt(col("time"))], (i64::MIN, 9)),
        (vec![col("time").eq(ts(5))], (5, 5)),
        (
            vec![col("time").lt_eq(lit(ScalarValue::TimestampSecond(Some(2), None)))],
            (i64::MIN, 2_000_000_000),
        ),
        (
            vec![col("host").eq(lit("a")), col("time").gt_eq(ts(1)).or(col("time").lt(ts(0)))],
            (i64::MIN, i64::MAX),
        ),
    ];
    for (filters, expected) in cases {
        assert_eq!(time_bounds(&filters), expected, "{filters:?}");
    }
}

#[test]
fn key_only_filters() {
    let keys = vec!["host".to_string(), "time".to_string()];
    assert!(only_keys(&col("host").eq(lit("a")), &keys));
    assert!(!only_keys(&col("usage").gt(lit(1.0)), &keys));
}

#[test]
fn split_keeps_order_and_count() {
    assert_eq!(split(vec![1, 2, 3, 4, 5], 2), vec![vec![1, 2, 3], vec![4, 5]]);
    assert_eq!(split(vec![1, 2, 3, 4, 5], 4), vec![vec![1, 2], vec![3], vec![4], vec![5]]);
    assert_eq!(split(vec![1], 4), vec![vec![1]]);
    assert!(split(Vec::<i32>::new(), 2).is_empty());
}

/// A result sliced from one batch is counted once against the query memory pool, not once per
/// slice; separate allocations are each counted.
#[test]
fn result_memory_counts_shared_buffers_once() {
    use arrow::array::{DictionaryArray, Float64Array, StringArray};
    use arrow::datatypes::Int32Type;
    let values: DictionaryArray<Int32Type> = (0..10_000)
        .map(|i| format!("host_{}", i % 100))
        .collect::<Vec<_>>()
        .iter()
        .map(|s| s.as_str())
        .collect();
    let numbers = Float64Array::from((0..10_000).map(f64::from).collect::<Vec<_>>());
    let batch = RecordBatch::try_from_iter([
        ("host", Arc::new(values) as arrow::array::ArrayRef),
        ("v", Arc::new(numbers) as arrow::array::ArrayRef),
    ])
    .expect("batch");
    let mut seen = std::collections::HashSet::new();
    let whole = new_buffer_bytes(&batch, &mut seen);
    assert!(whole >= 10_000 * 8, "the floats at least: {whole}");
    let mut seen = std::collections::HashSet::new();
    let sliced: usize =
        (0..100).map(|i| new_buffer_bytes(&batch.slice(i * 100, 100), &mut seen)).sum();
    assert_eq!(sliced, whole, "a hundred slices hold what the batch holds");
    let per_batch: usize =
        (0..100).map(|i| batch.slice(i * 100, 100).get_array_memory_size()).sum();
    assert!(per_batch > 50 * whole, "what was counted before: {per_batch} vs {whole}");
    let other = RecordBatch::try_from_iter([(
        "s",
        Arc::new(StringArray::from(vec!["x"; 1000])) as arrow::array::ArrayRef,
    )])
    .expect("other");
    assert!(new_buffer_bytes(&other, &mut seen) > 0, "a new allocation counts");
}
