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
