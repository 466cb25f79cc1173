//! Persistence: turns a buffered partition into a sorted, deduplicated Parquet file in the object
//! store and records it in the manifest. The file is durable before the commit that names it,
//! and the commit is durable before the buffer lets go of the rows or the WAL of its records.
//! Only this module and `wal` write to storage: the engine reaches its Parquet files only
//! through `files` (write, read back, decode, delete) and the manifest; queries read the files
//! through DataFusion (`query::files`).

pub mod cache;
pub mod compact;
mod files;
pub mod manifest;
pub mod store;

pub use files::{decode_file, delete_file, location, put_file, read_file, remove_orphans};

use arrow::array::{Array, ArrayRef, TimestampNanosecondArray};
use arrow::compute::{lexsort_to_indices, SortColumn, SortOptions};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::buffer::{adapt, dedup};
use crate::catalog::{TableSchema, SEQ_COLUMN, TIME_COLUMN};

/// Rows per Parquet row group: small enough that a query for one series and hour reads little.
pub const ROW_GROUP_ROWS_MAX: usize = 128 * 1024;

/// Rows per data page: the page index then narrows a query for one series and hour to a few
/// thousand rows of each column it reads.
pub const PAGE_ROWS_MAX: usize = 4096;

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

/// How every data file is written (by persist and compaction alike): sorted by (tags, time),
/// row groups and pages of bounded rows with page statistics, and per-column encodings.
pub fn writer_properties(
    table: &TableSchema,
    schema: &SchemaRef,
) -> Result<WriterProperties, Error> {
    let keys = key_columns(schema, table);
    let sorting = keys
        .iter()
        .map(|&i| SortingColumn { column_idx: i as i32, descending: false, nulls_first: true })
        .collect();
    // Compression: LZ4 for time, `_seq` and numeric fields (on TSBS data within 0.03 bytes per
    // row of zstd, and a zstd column chunk costs every read of it a compression and a
    // decompression context, a sixth of a one-host query's CPU); zstd for string fields, where
    // its ratio matters (log lines); none for tags (dictionary keys in long runs, the file
    // being sorted by them, are tiny already).
    let mut props = WriterProperties::builder()
        .set_compression(Compression::LZ4_RAW)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS_MAX))
        .set_data_page_row_count_limit(PAGE_ROWS_MAX)
        .set_sorting_columns(Some(sorting));
    for name in [TIME_COLUMN, SEQ_COLUMN] {
        let path = ColumnPath::from(name);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
    }
    for column in table.columns() {
        let compression = match column.kind {
            crate::catalog::ColumnKind::Tag => Compression::UNCOMPRESSED,
            crate::catalog::ColumnKind::Field(crate::catalog::FieldType::String) => {
                Compression::ZSTD(ZstdLevel::try_new(3)?)
            }
            _ => continue,
        };
        props = props.set_column_compression(ColumnPath::from(column.name.as_str()), compression);
    }
    Ok(props.build())
}

/// Sorts by (tags, time), merges duplicate keys when `overlap`, and encodes with zstd, page
/// statistics and delta-encoded time and `_seq`. CPU-heavy: run it off the I/O threads.
///
/// Memory: in-order rows (no `overlap`) are never copied whole. Only the key columns are
/// concatenated and sorted; each row group is then gathered from the source batches with
/// `interleave` and written, so a persist needs about the size of its keys plus one row group.
pub fn encode(
    table: &TableSchema,
    batches: &[RecordBatch],
    overlap: bool,
) -> Result<Encoded, Error> {
    let schema = table.arrow_schema_with_seq().clone();
    let adapted: Vec<RecordBatch> = batches.iter().map(|b| adapt(b, &schema)).collect();
    let keys = key_columns(&schema, table);
    let seq = schema.index_of(SEQ_COLUMN)?;
    let time_index = schema.index_of(TIME_COLUMN)?;
    let mut out = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut out, schema.clone(), Some(writer_properties(table, &schema)?))?;
    let (rows, min_time_ns, max_time_ns) = if overlap {
        let all = arrow::compute::concat_batches(&schema, &adapted)?;
        drop(adapted);
        let sorted = dedup::sort_and_merge(&all, &keys, seq, true)?;
        drop(all);
        let (lo, hi) = time_range(sorted.column(time_index));
        writer.write(&sorted)?;
        (sorted.num_rows(), lo, hi)
    } else {
        let concat_column = |i: usize| -> Result<ArrayRef, Error> {
            let parts: Vec<&dyn Array> = adapted.iter().map(|b| b.column(i).as_ref()).collect();
            Ok(arrow::compute::concat(&parts)?)
        };
        let sort_keys: Vec<ArrayRef> = keys
            .iter()
            .chain(std::iter::once(&seq))
            .map(|&i| concat_column(i))
            .collect::<Result<_, _>>()?;
        let ascending = SortOptions { descending: false, nulls_first: true };
        let sort_columns: Vec<SortColumn> = sort_keys
            .iter()
            .map(|a| SortColumn { values: a.clone(), options: Some(ascending) })
            .collect();
        let order = lexsort_to_indices(&sort_columns, None)?;
        let (lo, hi) = time_range(&sort_keys[keys.len() - 1]);
        drop(sort_columns);
        drop(sort_keys);
        // Row i of the concatenation is row `r` of batch `b`.
        let mut location: Vec<(u32, u32)> = Vec::with_capacity(order.len());
        for (b, batch) in adapted.iter().enumerate() {
            location.extend((0..batch.num_rows() as u32).map(|r| (b as u32, r)));
        }
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(ROW_GROUP_ROWS_MAX);
        for chunk in order.values().chunks(ROW_GROUP_ROWS_MAX) {
            picks.clear();
            picks.extend(chunk.iter().map(|&i| {
                let (b, r) = location[i as usize];
                (b as usize, r as usize)
            }));
            let columns = (0..schema.fields().len())
                .map(|c| {
                    let parts: Vec<&dyn Array> =
                        adapted.iter().map(|b| b.column(c).as_ref()).collect();
                    arrow::compute::interleave(&parts, &picks)
                })
                .collect::<Result<Vec<_>, _>>()?;
            writer.write(&RecordBatch::try_new(schema.clone(), columns)?)?;
        }
        (order.len(), lo, hi)
    };
    writer.close()?;
    Ok(Encoded { bytes: Bytes::from(out), rows: rows as u64, min_time_ns, max_time_ns })
}

fn time_range(times: &ArrayRef) -> (i64, i64) {
    let times = times
        .as_any()
        .downcast_ref::<TimestampNanosecondArray>()
        .expect("time column type is fixed by the catalog");
    (arrow::compute::min(times).unwrap_or(0), arrow::compute::max(times).unwrap_or(0))
}

/// Where a partition's file goes:
/// `data/{database id}/{table id}/{YYYY-MM-DD}-{partition}/{max_seq}-{n}-{wal id}.parquet`.
/// Only ids and numbers, never a user's name, so any name is stored and the path is plain
/// ASCII; the WAL id keeps two servers wrongly sharing a store from ever writing one path.
pub fn file_path(
    ids: (u64, u64),
    partition_ns: i64,
    max_seq: u64,
    n: u64,
    wal: &str,
) -> object_store::path::Path {
    in_partition(ids, partition_ns, format!("{max_seq:020}-{n}-{wal}.parquet"))
}

/// Where a compaction's `n`th output goes: beside the partition's other files, named
/// `{max_seq}-c{nonce}-{n}-{wal id}.parquet` (`nonce` random per compaction, so an output never
/// lands on the path of a file it replaces, which has the same `max_seq`).
pub fn compacted_file_path(
    ids: (u64, u64),
    partition_ns: i64,
    max_seq: u64,
    nonce: &str,
    n: u32,
    wal: &str,
) -> object_store::path::Path {
    in_partition(ids, partition_ns, format!("{max_seq:020}-c{nonce}-{n}-{wal}.parquet"))
}

/// `data/{database id}/{table id}/{YYYY-MM-DD}-{partition}/{name}`.
fn in_partition(
    (database_id, table_id): (u64, u64),
    partition_ns: i64,
    name: String,
) -> object_store::path::Path {
    object_store::path::Path::from_iter([
        "data".to_string(),
        database_id.to_string(),
        table_id.to_string(),
        format!("{}-{partition_ns}", chrono_like_date(partition_ns)),
        name,
    ])
}

/// `YYYY-MM-DD` of a UTC timestamp, for readable paths.
fn chrono_like_date(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).format("%Y-%m-%d").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{with_seq, RowsBuilder};
    use crate::catalog::{Column, ColumnKind, FieldType};
    use crate::line_protocol::{lines, parse_line, Line};

    fn decode(bytes: Bytes) -> String {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .expect("parquet")
            .build()
            .expect("reader");
        let batches: Vec<RecordBatch> = reader.map(|b| b.expect("batch")).collect();
        arrow::util::pretty::pretty_format_batches(&batches).expect("format").to_string()
    }

    /// Both encoders (gather for in-order rows, merge for overlapping ones) write the same
    /// sorted rows when no key repeats.
    #[test]
    fn stored_paths_are_parsed_not_encoded_again() {
        // A file of an older server stored under a table named `a%b`.
        let file = crate::catalog::ParquetFile {
            path: "data/db/a%25b/x.parquet".into(),
            partition_ns: 0,
            min_time_ns: 0,
            max_time_ns: 0,
            rows: 1,
            bytes: 1,
            max_seq: 1,
            overlap: false,
            wal: None,
            level: 0,
        };
        assert_eq!(location(&file).as_ref(), "data/db/a%25b/x.parquet");
        let path = file_path((3, 17), 0, 5, 1, "0a1b");
        assert_eq!(path.as_ref(), "data/3/17/1970-01-01-0/00000000000000000005-1-0a1b.parquet");
    }

    #[test]
    fn gather_and_merge_encoders_agree() {
        let table = TableSchema::new(
            "cpu",
            vec![
                Column { name: "host".into(), kind: ColumnKind::Tag },
                Column { name: "u".into(), kind: ColumnKind::Field(FieldType::Float) },
                Column { name: "s".into(), kind: ColumnKind::Field(FieldType::String) },
            ],
        );
        let mut batches = Vec::new();
        for (seq, body) in [
            (1, "cpu,host=b u=1 20\ncpu,host=a u=2 30"),
            (2, "cpu,host=a u=3,s=\"x\" 10\ncpu u=4 5"),
        ] {
            let mut builder = RowsBuilder::new(i64::MAX);
            let mut line = Line::default();
            for (n, bytes) in lines(body.as_bytes()) {
                parse_line(n, bytes, &mut line).expect("well formed");
                builder.push(&line, line.timestamp.expect("timestamp"));
            }
            batches.extend(builder.finish().iter().map(|p| with_seq(&p.batch, seq)));
        }
        let gathered = encode(&table, &batches, false).expect("gather");
        let merged = encode(&table, &batches, true).expect("merge");
        assert_eq!((gathered.rows, gathered.min_time_ns, gathered.max_time_ns), (4, 5, 30));
        let expected = "\
+------+-----+---+--------------------------------+------+
| host | u   | s | time                           | _seq |
+------+-----+---+--------------------------------+------+
|      | 4.0 |   | 1970-01-01T00:00:00.000000005Z | 2    |
| a    | 3.0 | x | 1970-01-01T00:00:00.000000010Z | 2    |
| a    | 2.0 |   | 1970-01-01T00:00:00.000000030Z | 1    |
| b    | 1.0 |   | 1970-01-01T00:00:00.000000020Z | 1    |
+------+-----+---+--------------------------------+------+";
        assert_eq!(decode(gathered.bytes), expected);
        assert_eq!(decode(merged.bytes), expected);
    }

    #[test]
    fn dates_in_paths() {
        assert_eq!(super::chrono_like_date(0), "1970-01-01");
        assert_eq!(super::chrono_like_date(1_700_000_000_000_000_000), "2023-11-14");
        assert_eq!(super::chrono_like_date(-1), "1969-12-31");
    }
}
