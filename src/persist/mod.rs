//! Persistence: turns a buffered partition into a sorted, deduplicated Parquet file in the object
//! store and records it in the manifest. The file is durable before the commit that names it,
//! and the commit is durable before the buffer lets go of the rows or the WAL of its records.
//! Only this module and `wal` touch storage.

pub mod manifest;
pub mod store;

use arrow::array::{Array, TimestampNanosecondArray};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::metadata::SortingColumn;
use parquet::schema::types::ColumnPath;

use crate::buffer::{adapt, dedup};
use crate::catalog::{TableSchema, SEQ_COLUMN, TIME_COLUMN};

/// Rows per Parquet row group: small enough that a query for one series and hour reads little.
pub const ROW_GROUP_ROWS_MAX: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("encoding parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arranging rows: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
}

impl Error {
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Internal
    }
}

/// A partition's rows encoded as Parquet.
pub struct Encoded {
    pub bytes: Bytes,
    pub rows: u64,
    pub min_time_ns: i64,
    pub max_time_ns: i64,
}

/// Key columns of a stored batch: tags in schema order, then time.
pub fn key_columns(schema: &SchemaRef, table: &TableSchema) -> Vec<usize> {
    table
        .tags()
        .filter_map(|c| schema.index_of(&c.name).ok())
        .chain(schema.index_of(TIME_COLUMN).ok())
        .collect()
}

/// Sorts by (tags, time), merges duplicate keys when `overlap`, and encodes with zstd, page
/// statistics and delta-encoded time and `_seq`. CPU-heavy: run it off the I/O threads.
pub fn encode(table: &TableSchema, batches: &[RecordBatch], overlap: bool) -> Result<Encoded, Error> {
    let schema = table.arrow_schema_with_seq().clone();
    let adapted: Vec<RecordBatch> = batches.iter().map(|b| adapt(b, &schema)).collect();
    let all = arrow::compute::concat_batches(&schema, &adapted)?;
    drop(adapted);
    let keys = key_columns(&schema, table);
    let seq = schema.index_of(SEQ_COLUMN)?;
    let sorted = dedup::sort_and_merge(&all, &keys, seq, overlap)?;
    drop(all);
    let time_index = schema.index_of(TIME_COLUMN)?;
    let times = sorted
        .column(time_index)
        .as_any()
        .downcast_ref::<TimestampNanosecondArray>()
        .expect("time column type is fixed by the catalog");
    let (min_time_ns, max_time_ns) = (
        arrow::compute::min(times).unwrap_or(0),
        arrow::compute::max(times).unwrap_or(0),
    );
    let sorting = keys
        .iter()
        .map(|&i| SortingColumn { column_idx: i as i32, descending: false, nulls_first: true })
        .collect();
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS_MAX))
        .set_sorting_columns(Some(sorting));
    for name in [TIME_COLUMN, SEQ_COLUMN] {
        let path = ColumnPath::from(name);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
    }
    let mut out = Vec::with_capacity(sorted.get_array_memory_size() / 8);
    let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props.build()))?;
    writer.write(&sorted)?;
    writer.close()?;
    Ok(Encoded { bytes: Bytes::from(out), rows: sorted.num_rows() as u64, min_time_ns, max_time_ns })
}

/// Where a partition's file goes: `data/{db}/{table}/{partition}/{max_seq}-{n}.parquet`.
pub fn file_path(db: &str, table: &str, partition_ns: i64, max_seq: u64, n: u64) -> object_store::path::Path {
    let day = chrono_like_date(partition_ns);
    object_store::path::Path::from_iter([
        "data".to_string(),
        db.to_string(),
        table.to_string(),
        format!("{day}-{partition_ns}"),
        format!("{max_seq:020}-{n}.parquet"),
    ])
}

/// `YYYY-MM-DD` of a UTC timestamp, for readable paths.
fn chrono_like_date(ns: i64) -> String {
    let days = ns.div_euclid(86_400_000_000_000);
    // Civil-from-days (Howard Hinnant), valid for the whole i64 ns range.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}


#[cfg(test)]
mod tests {
    #[test]
    fn dates_in_paths() {
        assert_eq!(super::chrono_like_date(0), "1970-01-01");
        assert_eq!(super::chrono_like_date(1_700_000_000_000_000_000), "2023-11-14");
        assert_eq!(super::chrono_like_date(-1), "1969-12-31");
    }
}
