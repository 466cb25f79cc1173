//! Compaction's merge: files of one partition, each sorted by (tags, time), read as streams
//! and merged into one sorted stream in which rows that share a key become one (for each
//! field the value of the latest write that has one, as everywhere: `buffer::dedup`), written
//! out as files of about a target size. What to compact and when is the engine's business
//! (`engine::compact`); this does the reading, merging and writing.
//!
//! Memory: one decoded batch per input, the rows gathered for the next output batch, and one
//! output file being encoded (about the target size) — never a whole partition.
//!
//! The inputs must be a run of files consecutive in write order (`max_seq`): the merge of a
//! key keeps one `_seq` for the row (the highest), which is only right next to rows of other
//! files whose sequence numbers are all below or all above the run's.

use arrow::array::{new_null_array, ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::compute::SortOptions;
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter, Rows, SortField};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use futures::StreamExt;
use object_store::path::Path;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStream};
use parquet::arrow::{ArrowWriter, ParquetRecordBatchStreamBuilder};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::store::Store;
use super::{key_columns, writer_properties, Error};
use crate::catalog::{TableSchema, SEQ_COLUMN, TIME_COLUMN};

/// Rows read per input batch, and gathered per output batch.
const BATCH_ROWS: usize = 8192;

/// One input file: its location and size (from the manifest).
pub struct Input {
    pub path: Path,
    pub bytes: u64,
}

/// A file the merge wrote (durably) to the store.
#[derive(Debug, Clone)]
pub struct Written {
    pub path: Path,
    pub rows: u64,
    pub bytes: u64,
    pub min_time_ns: i64,
    pub max_time_ns: i64,
}

/// Why a merge stopped.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Persist(#[from] Error),
    #[error("{path} is not sorted by series and time; it is left as it is")]
    Unsorted { path: String },
    #[error("stopped: the server is shutting down")]
    Cancelled,
    #[error("the compaction thread failed: {0}")]
    Thread(String),
}

impl From<parquet::errors::ParquetError> for MergeError {
    fn from(e: parquet::errors::ParquetError) -> Self {
        MergeError::Persist(e.into())
    }
}

impl From<arrow::error::ArrowError> for MergeError {
    fn from(e: arrow::error::ArrowError) -> Self {
        MergeError::Persist(e.into())
    }
}

/// Merges `inputs` (consecutive files of one partition of `table`) into files of about
/// `target_bytes`, each at a path `next_path` names, and returns them in key order. Blocking:
/// call it on a thread of its own; `handle` runs the store's I/O. Stops with `Cancelled` once
/// `stop` is cancelled, having written what it wrote (the caller deletes it: nothing names it).
/// `written` sees every file once it is durable, so a caller can delete them on any error.
#[allow(clippy::too_many_arguments)]
pub fn merge(
    handle: &Handle,
    store: &Store,
    table: &TableSchema,
    inputs: &[Input],
    target_bytes: u64,
    mut next_path: impl FnMut() -> Path,
    written: &mut Vec<Written>,
    stop: &CancellationToken,
) -> Result<(), MergeError> {
    let schema = table.arrow_schema_with_seq().clone();
    let keys = key_columns(&schema, table);
    let seq = schema.index_of(SEQ_COLUMN)?;
    let time = schema.index_of(TIME_COLUMN)?;
    let sort_columns: Vec<usize> = keys.iter().copied().chain(std::iter::once(seq)).collect();
    let ascending = SortOptions { descending: false, nulls_first: true };
    let converter = RowConverter::new(
        sort_columns
            .iter()
            .map(|&i| SortField::new_with_options(schema.field(i).data_type().clone(), ascending))
            .collect(),
    )?;
    let mut streams = Vec::with_capacity(inputs.len());
    for input in inputs {
        let reader =
            FileReader { store: store.reader(), path: input.path.clone(), size: input.bytes };
        let stream = handle.block_on(async {
            ParquetRecordBatchStreamBuilder::new(reader).await?.with_batch_size(BATCH_ROWS).build()
        })?;
        let mut source = Source {
            path: input.path.to_string(),
            stream,
            batch: None,
            rows: None,
            pos: 0,
            last: None,
        };
        if source.fill(handle, &schema, &converter, &sort_columns)? {
            streams.push(source);
        }
    }
    let mut out = Output::new(table, &schema, target_bytes, time);
    // Slices of input batches in merged order, not yet written.
    let mut gathered: Vec<RecordBatch> = Vec::new();
    let mut gathered_rows = 0;
    // Rows of the last key of the previous output batch: the next may hold more of it.
    let mut carry: Option<RecordBatch> = None;
    while !streams.is_empty() {
        if stop.is_cancelled() {
            return Err(MergeError::Cancelled);
        }
        // The input whose current row is smallest, and the next smallest current row.
        let mut best = 0;
        for i in 1..streams.len() {
            if streams[i].current() < streams[best].current() {
                best = i;
            }
        }
        let second = (0..streams.len())
            .filter(|&i| i != best)
            .min_by(|&a, &b| streams[a].current().cmp(&streams[b].current()));
        let source = &streams[best];
        let (rows, start) = (source.rows.as_ref().expect("filled"), source.pos);
        let end = match second {
            // Every row of `best` up to the other inputs' smallest goes next, in one slice.
            Some(second) => {
                let bound = streams[second].current();
                let (mut lo, mut hi) = (start + 1, rows.num_rows());
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    if rows.row(mid) <= bound {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                lo
            }
            None => rows.num_rows(),
        };
        let batch = streams[best].batch.as_ref().expect("filled");
        gathered.push(batch.slice(start, end - start));
        gathered_rows += end - start;
        streams[best].pos = end;
        if !streams[best].fill(handle, &schema, &converter, &sort_columns)? {
            streams.swap_remove(best);
        }
        if gathered_rows >= BATCH_ROWS {
            let batch = arrow::compute::concat_batches(&schema, carry.iter().chain(&gathered))?;
            gathered.clear();
            gathered_rows = 0;
            // Hold the last key's rows back: the next slices may continue it.
            let key_arrays: Vec<ArrayRef> = keys.iter().map(|&k| batch.column(k).clone()).collect();
            let last_start =
                arrow::compute::partition(&key_arrays)?.ranges().last().map_or(0, |r| r.start);
            carry = Some(batch.slice(last_start, batch.num_rows() - last_start));
            let ready = batch.slice(0, last_start);
            let merged = crate::buffer::dedup::merge_sorted(&ready, &keys, seq)?;
            out.write(handle, store, &merged, &mut next_path, written)?;
        }
    }
    let rest = arrow::compute::concat_batches(&schema, carry.iter().chain(&gathered))?;
    let merged = crate::buffer::dedup::merge_sorted(&rest, &keys, seq)?;
    out.write(handle, store, &merged, &mut next_path, written)?;
    out.finish(handle, store, &mut next_path, written)?;
    Ok(())
}

/// One input file being read: its current batch (adapted to the table's schema), the batch's
/// sort keys as rows, and the position of the next row to merge.
struct Source {
    path: String,
    stream: ParquetRecordBatchStream<FileReader>,
    batch: Option<RecordBatch>,
    rows: Option<Rows>,
    pos: usize,
    /// The last row of the previous batch, to check that batches follow each other in order.
    last: Option<OwnedRow>,
}

impl Source {
    fn current(&self) -> arrow::row::Row<'_> {
        self.rows.as_ref().expect("filled").row(self.pos)
    }

    /// Makes a current row available, reading the next batch when this one is used up;
    /// `false` once the file is exhausted. A file not sorted by its keys is refused (merging it
    /// would leave keys apart that must become one row).
    fn fill(
        &mut self,
        handle: &Handle,
        schema: &SchemaRef,
        converter: &RowConverter,
        sort_columns: &[usize],
    ) -> Result<bool, MergeError> {
        while self.rows.as_ref().is_none_or(|r| self.pos >= r.num_rows()) {
            if let Some(rows) = &self.rows {
                if rows.num_rows() > 0 {
                    self.last = Some(rows.row(rows.num_rows() - 1).owned());
                }
            }
            let Some(next) = handle.block_on(self.stream.next()) else {
                self.batch = None;
                self.rows = None;
                return Ok(false);
            };
            let batch = conform(&next?, schema)?;
            let columns: Vec<ArrayRef> =
                sort_columns.iter().map(|&i| batch.column(i).clone()).collect();
            let rows = converter.convert_columns(&columns)?;
            let after_last = match (&self.last, rows.num_rows()) {
                (Some(last), n) if n > 0 => last.row() <= rows.row(0),
                _ => true,
            };
            let sorted = (1..rows.num_rows()).all(|i| rows.row(i - 1) <= rows.row(i));
            if !after_last || !sorted {
                return Err(MergeError::Unsorted { path: self.path.clone() });
            }
            self.batch = Some(batch);
            self.rows = Some(rows);
            self.pos = 0;
        }
        Ok(true)
    }
}

/// Reads an input's bytes from the store (through its cache), the size known from the
/// manifest: the footer is one ranged read, the row groups' column chunks one each.
struct FileReader {
    store: std::sync::Arc<dyn object_store::ObjectStore>,
    path: Path,
    size: u64,
}

impl AsyncFileReader for FileReader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            object_store::ObjectStoreExt::get_range(&self.store, &self.path, range)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<std::sync::Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new().load_and_finish(self, size).await?;
            Ok(std::sync::Arc::new(metadata))
        }
        .boxed()
    }
}

/// A file's batch in the table's current schema: columns it lacks (added since it was written)
/// are null, and a column read back as another Arrow type is cast to the table's.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, MergeError> {
    let source = batch.schema();
    // A column the table does not have would be lost: refuse rather than drop it.
    if let Some(extra) = source.fields().iter().find(|f| schema.index_of(f.name()).is_err()) {
        return Err(Error::Arrow(arrow::error::ArrowError::SchemaError(format!(
            "a file has column \"{}\", which the table does not",
            extra.name()
        )))
        .into());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match source.index_of(field.name()) {
            Ok(i) if batch.column(i).data_type() == field.data_type() => {
                Ok(batch.column(i).clone())
            }
            Ok(i) => arrow::compute::cast(batch.column(i), field.data_type()),
            Err(_) => Ok(new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(schema.clone(), columns, &options)?)
}

/// The output file being written, rolled over to a new one at the target size.
struct Output<'a> {
    table: &'a TableSchema,
    schema: SchemaRef,
    target_bytes: u64,
    time: usize,
    writer: Option<ArrowWriter<Vec<u8>>>,
    rows: u64,
    min_time_ns: i64,
    max_time_ns: i64,
}

impl<'a> Output<'a> {
    fn new(
        table: &'a TableSchema,
        schema: &SchemaRef,
        target_bytes: u64,
        time: usize,
    ) -> Output<'a> {
        Output {
            table,
            schema: schema.clone(),
            target_bytes: target_bytes.max(1),
            time,
            writer: None,
            rows: 0,
            min_time_ns: i64::MAX,
            max_time_ns: i64::MIN,
        }
    }

    fn write(
        &mut self,
        handle: &Handle,
        store: &Store,
        batch: &RecordBatch,
        next_path: &mut impl FnMut() -> Path,
        written: &mut Vec<Written>,
    ) -> Result<(), MergeError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.writer.is_none() {
            let props = writer_properties(self.table, &self.schema)?;
            // Room for a whole output up front: no copies as it grows (pages are only
            // touched as they are written).
            let capacity = usize::try_from(self.target_bytes + self.target_bytes / 8).unwrap_or(0);
            let buffer = Vec::with_capacity(capacity.min(1 << 31));
            self.writer = Some(ArrowWriter::try_new(buffer, self.schema.clone(), Some(props))?);
        }
        let writer = self.writer.as_mut().expect("just made");
        writer.write(batch)?;
        self.rows += batch.num_rows() as u64;
        let times = batch
            .column(self.time)
            .as_any()
            .downcast_ref::<arrow::array::TimestampNanosecondArray>()
            .ok_or_else(|| Error::Arrow(arrow::error::ArrowError::SchemaError("time".into())))?;
        if let (Some(lo), Some(hi)) = (arrow::compute::min(times), arrow::compute::max(times)) {
            self.min_time_ns = self.min_time_ns.min(lo);
            self.max_time_ns = self.max_time_ns.max(hi);
        }
        let size = (writer.bytes_written() + writer.in_progress_size()) as u64;
        if size >= self.target_bytes {
            self.finish(handle, store, next_path, written)?;
        }
        Ok(())
    }

    /// Closes the file being written, if any, and puts it in the store.
    fn finish(
        &mut self,
        handle: &Handle,
        store: &Store,
        next_path: &mut impl FnMut() -> Path,
        written: &mut Vec<Written>,
    ) -> Result<(), MergeError> {
        let Some(writer) = self.writer.take() else { return Ok(()) };
        let bytes = Bytes::from(writer.into_inner()?);
        let path = next_path();
        let size = bytes.len() as u64;
        handle.block_on(super::put_file(store, &path, bytes))?;
        written.push(Written {
            path,
            rows: std::mem::take(&mut self.rows),
            bytes: size,
            min_time_ns: std::mem::replace(&mut self.min_time_ns, i64::MAX),
            max_time_ns: std::mem::replace(&mut self.max_time_ns, i64::MIN),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{with_seq, RowsBuilder};
    use crate::catalog::{Column, ColumnKind, FieldType};
    use crate::line_protocol::{lines, parse_line, Line};

    fn batches(body: &str, seq: u64) -> Vec<RecordBatch> {
        let mut builder = RowsBuilder::new(i64::MAX);
        let mut line = Line::default();
        for (n, bytes) in lines(body.as_bytes()) {
            parse_line(n, bytes, &mut line).expect("well formed");
            builder.push(&line, line.timestamp.expect("timestamp"));
        }
        builder.finish().iter().map(|p| with_seq(&p.batch, seq)).collect()
    }

    /// Many batches per input, keys repeated across inputs (overwrites of one field, late
    /// points, a tag added later) and outputs cut small: the merge's files, read back in order,
    /// hold exactly what sorting and merging all the inputs' rows at once gives.
    #[test]
    fn merging_files_equals_merging_their_rows_at_once() {
        let columns = |extra: bool| {
            let mut c = vec![
                Column { name: "host".into(), kind: ColumnKind::Tag },
                Column { name: "u".into(), kind: ColumnKind::Field(FieldType::Float) },
                Column { name: "s".into(), kind: ColumnKind::Field(FieldType::String) },
            ];
            if extra {
                c.push(Column { name: "dc".into(), kind: ColumnKind::Tag });
            }
            c
        };
        let old = TableSchema::new("cpu", columns(false));
        let table = TableSchema::new("cpu", columns(true));
        let hosts = 7;
        let first: String = (0..30_000)
            .map(|i| format!("cpu,host=h{} u={i},s=\"a{i}\" {}\n", i % hosts, i))
            .collect();
        // Every third point of the first file again, u only; and points between them.
        let second: String = (0..30_000)
            .step_by(3)
            .map(|i| format!("cpu,host=h{} u=-{i} {}\n", i % hosts, i))
            .chain((0..3_000).map(|i| format!("cpu,host=h{} u=0.5 {}\n", i % hosts, 40_000 + i)))
            .collect();
        // s of some points again, and a series with a new tag.
        let third: String = (0..30_000)
            .step_by(5)
            .map(|i| format!("cpu,host=h{} s=\"c{i}\" {}\n", i % hosts, i))
            .chain((0..2_000).map(|i| format!("cpu,host=h1,dc=x u=1 {i}\n")))
            .collect();
        let inputs = [(first, 1, &old), (second, 2, &old), (third, 3, &table)];
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let url = url::Url::from_directory_path(dir.path()).expect("absolute");
        let store = Store::open(url.as_str(), &Default::default()).expect("store");
        let mut all = Vec::new();
        let mut files = Vec::new();
        for (n, (body, seq, schema)) in inputs.iter().enumerate() {
            let rows = batches(body, *seq);
            all.extend(rows.iter().map(|b| crate::buffer::adapt(b, table.arrow_schema_with_seq())));
            let encoded = crate::persist::encode(schema, &rows, *seq > 1).expect("encode");
            let path = Path::from(format!("data/in-{n}.parquet"));
            let bytes = encoded.bytes.len() as u64;
            runtime.block_on(store.put(&path, encoded.bytes)).expect("put");
            files.push(Input { path, bytes });
        }
        let mut n = 0;
        let mut written = Vec::new();
        merge(
            runtime.handle(),
            &store,
            &table,
            &files,
            64 << 10,
            || {
                n += 1;
                Path::from(format!("data/out-{n:03}.parquet"))
            },
            &mut written,
            &CancellationToken::new(),
        )
        .expect("merge");
        assert!(written.len() > 2, "outputs cut at the target size: {}", written.len());
        let mut merged = Vec::new();
        for w in &written {
            let bytes = runtime.block_on(store.get(&w.path)).expect("get");
            let read: Vec<RecordBatch> = crate::persist::decode_file(bytes)
                .expect("decode")
                .map(|b| b.expect("batch"))
                .collect();
            assert_eq!(read.iter().map(|b| b.num_rows() as u64).sum::<u64>(), w.rows);
            merged.extend(
                read.iter().map(|b| conform(b, table.arrow_schema_with_seq()).expect("conform")),
            );
        }
        let schema = table.arrow_schema_with_seq().clone();
        let got = arrow::compute::concat_batches(&schema, &merged).expect("concat");
        let all = arrow::compute::concat_batches(&schema, &all).expect("concat");
        let keys = key_columns(&schema, &table);
        let seq = schema.index_of(SEQ_COLUMN).expect("seq");
        let want = crate::buffer::dedup::sort_and_merge(&all, &keys, seq, true).expect("merge");
        assert_eq!(got.num_rows(), 30_000 + 3_000 + 2_000);
        assert_eq!(got, want);
    }
}
