//! `system.views`: one row per materialized view of the database, read live
//! (`query::system` serves it).

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, StringArray, TimestampNanosecondArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::error::Result as DfResult;

use super::Views;

fn schema() -> SchemaRef {
    let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    let count = |name: &str| Field::new(name, DataType::UInt64, false);
    let time = DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        text("name", false),
        text("database", false),
        text("base", false),
        text("definition", false),
        text("status", false),
        text("reason", true),
        count("base_seq"),
        count("marked_seq"),
        count("materialized_seq"),
        Field::new("materialized", DataType::Boolean, false),
        count("dirty_buckets"),
        count("dirty_marks"),
        count("rows"),
        count("bytes"),
        count("refreshes"),
        Field::new("last_refresh", time, true),
        Field::new("last_refresh_ms", DataType::Float64, true),
    ]))
}

/// `system.views` of `db`.
pub fn views_table(views: &Views, db: &str) -> DfResult<RecordBatch> {
    let all: Vec<_> = views.statuses().into_iter().filter(|s| s.db == db).collect();
    let text = |f: &dyn Fn(&super::Status) -> String| -> ArrayRef {
        Arc::new(StringArray::from(all.iter().map(f).collect::<Vec<_>>()))
    };
    let count = |f: &dyn Fn(&super::Status) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from(all.iter().map(f).collect::<Vec<_>>()))
    };
    let status = |s: &super::Status| {
        if s.status == "ok" && !views.has_rows_source(db, &s.base) {
            "waiting".to_string()
        } else {
            s.status.clone()
        }
    };
    let columns: Vec<ArrayRef> = vec![
        text(&|s| s.name.clone()),
        text(&|s| s.db.clone()),
        text(&|s| s.base.clone()),
        text(&|s| s.sql.clone()),
        text(&status),
        Arc::new(StringArray::from(all.iter().map(|s| s.reason.clone()).collect::<Vec<_>>())),
        count(&|s| s.base_seq),
        count(&|s| s.marked_seq),
        count(&|s| s.materialized_seq),
        Arc::new(BooleanArray::from(all.iter().map(|s| s.materialized).collect::<Vec<_>>())),
        count(&|s| s.dirty_buckets as u64),
        count(&|s| s.dirty_marks as u64),
        count(&|s| s.rows as u64),
        count(&|s| s.bytes as u64),
        count(&|s| s.refreshes),
        Arc::new(
            TimestampNanosecondArray::from(
                all.iter()
                    .map(|s| {
                        s.last_refresh.and_then(|t| {
                            let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
                            i64::try_from(d.as_nanos()).ok()
                        })
                    })
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(arrow::array::Float64Array::from(
            all.iter()
                .map(|s| s.last_refresh_duration.map(|d| d.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>(),
        )),
    ];
    Ok(RecordBatch::try_new(schema(), columns)?)
}
