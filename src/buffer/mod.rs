//! In-memory column buffers: per table, per time partition, a list of Arrow record batches.
//!
//! A write request builds its own batches ([`RowsBuilder`], on the request's task, in parallel
//! with other requests); the WAL writer thread then appends them here in sequence order once
//! they are durable ([`TableBuffer::append`]). Batches are immutable, so a query's snapshot is
//! a list of `Arc` clones taken under a short lock.
//!
//! Deduplication: the same table + tag set + time is one point, and the later write wins field
//! by field. Rather than hash every key, the buffer remembers each series' latest time; a row
//! at or before it *may* repeat a key, and only then is its partition marked `overlap` so that
//! queries and persistence merge it (`dedup`). In-order data, the common case, is never merged.
//!
//! No I/O here; `persist` takes snapshots of partitions and writes them out.

pub mod dedup;
pub mod last;
pub mod sort;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;
use std::sync::Arc;

use arrow::array::{
    new_null_array, ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    StringDictionaryBuilder, TimestampNanosecondArray, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{Field, Int32Type, Schema, SchemaRef};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};

use crate::catalog::{self, SEQ_COLUMN, TIME_COLUMN};
use crate::line_protocol::{FieldValue, Line};

/// Which partition a timestamp falls in: the start of its window, in nanoseconds.
pub fn partition_of(time_ns: i64, partition_ns: i64) -> i64 {
    time_ns.div_euclid(partition_ns).saturating_mul(partition_ns)
}

enum ColumnBuilder {
    Tag(StringDictionaryBuilder<Int32Type>),
    Float(Float64Builder),
    Integer(Int64Builder),
    UInteger(UInt64Builder),
    String(StringBuilder),
    Boolean(BooleanBuilder),
}

impl ColumnBuilder {
    fn for_value(value: &FieldValue<'_>) -> ColumnBuilder {
        match value {
            FieldValue::Float(_) => ColumnBuilder::Float(Float64Builder::new()),
            FieldValue::Integer(_) => ColumnBuilder::Integer(Int64Builder::new()),
            FieldValue::UInteger(_) => ColumnBuilder::UInteger(UInt64Builder::new()),
            FieldValue::String(_) => ColumnBuilder::String(StringBuilder::new()),
            FieldValue::Boolean(_) => ColumnBuilder::Boolean(BooleanBuilder::new()),
        }
    }

    fn len(&self) -> usize {
        use arrow::array::ArrayBuilder;
        match self {
            ColumnBuilder::Tag(b) => b.len(),
            ColumnBuilder::Float(b) => b.len(),
            ColumnBuilder::Integer(b) => b.len(),
            ColumnBuilder::UInteger(b) => b.len(),
            ColumnBuilder::String(b) => b.len(),
            ColumnBuilder::Boolean(b) => b.len(),
        }
    }

    fn pad_to(&mut self, rows: usize) {
        let missing = rows - self.len();
        if missing == 0 {
            return;
        }
        match self {
            ColumnBuilder::Tag(b) => (0..missing).for_each(|_| b.append_null()),
            ColumnBuilder::Float(b) => b.append_nulls(missing),
            ColumnBuilder::Integer(b) => b.append_nulls(missing),
            ColumnBuilder::UInteger(b) => b.append_nulls(missing),
            ColumnBuilder::String(b) => (0..missing).for_each(|_| b.append_null()),
            ColumnBuilder::Boolean(b) => b.append_nulls(missing),
        }
    }

    /// Appends a field value; the catalog has already checked that its type matches.
    fn append_field(&mut self, value: &FieldValue<'_>) {
        match (self, value) {
            (ColumnBuilder::Float(b), FieldValue::Float(v)) => b.append_value(*v),
            (ColumnBuilder::Integer(b), FieldValue::Integer(v)) => b.append_value(*v),
            (ColumnBuilder::UInteger(b), FieldValue::UInteger(v)) => b.append_value(*v),
            (ColumnBuilder::String(b), FieldValue::String(v)) => b.append_value(v),
            (ColumnBuilder::Boolean(b), FieldValue::Boolean(v)) => b.append_value(*v),
            _ => unreachable!("field types are checked against the catalog before building"),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Tag(b) => Arc::new(b.finish()),
            ColumnBuilder::Float(b) => Arc::new(b.finish()),
            ColumnBuilder::Integer(b) => Arc::new(b.finish()),
            ColumnBuilder::UInteger(b) => Arc::new(b.finish()),
            ColumnBuilder::String(b) => Arc::new(b.finish()),
            ColumnBuilder::Boolean(b) => Arc::new(b.finish()),
        }
    }
}

/// Rows of one table and partition being built from a request's lines.
struct TableRows {
    names: Vec<String>,
    columns: Vec<ColumnBuilder>,
    index: HashMap<String, usize>,
    times: Vec<i64>,
    series: Vec<u64>,
}

impl TableRows {
    fn new() -> TableRows {
        TableRows {
            names: Vec::new(),
            columns: Vec::new(),
            index: HashMap::new(),
            times: Vec::new(),
            series: Vec::new(),
        }
    }

    /// The builder for column `name`. `guess` is where the previous line had the column at
    /// this position; checking it first avoids hashing when lines share a layout.
    fn column(
        &mut self,
        name: &str,
        guess: usize,
        make: impl FnOnce() -> ColumnBuilder,
    ) -> &mut ColumnBuilder {
        if self.names.get(guess).is_some_and(|n| n == name) {
            return &mut self.columns[guess];
        }
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                let i = self.columns.len();
                self.names.push(name.to_string());
                self.columns.push(make());
                self.index.insert(name.to_string(), i);
                i
            }
        };
        &mut self.columns[i]
    }
}

/// A request's rows for one table and partition, ready to append once a sequence number is known.
pub struct PendingBatch {
    pub table: String,
    pub partition: i64,
    /// Columns present in these lines and `time`; no `_seq` yet.
    pub batch: RecordBatch,
    /// Per row, a hash of its tag set (see [`series_hash`]).
    pub series: Vec<u64>,
}

/// A hash of a tag set that does not depend on the order tags were written in. Equal tag sets
/// hash equal; a collision only costs an unneeded merge, never a wrong answer. Two hardware
/// CRC32C lanes with different seeds make 64 bits, much cheaper than SipHash on long tag sets.
pub fn series_hash(tags: &[(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)]) -> u64 {
    tags.iter().fold(0x9e37_79b9_7f4a_7c15u64, |acc, (k, v)| {
        let lane = |seed: u32| {
            let h = crc32c::crc32c_append(seed, k.as_bytes());
            crc32c::crc32c_append(h ^ 0xff, v.as_bytes())
        };
        let h = (u64::from(lane(0x1234_5678)) << 32) | u64::from(lane(0x8765_4321));
        acc.wrapping_add(h.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    })
}

/// A hasher for keys that are hashes already (series hashes).
#[derive(Default, Clone, Copy)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type SeriesMap = HashMap<u64, SeriesTimes, std::hash::BuildHasherDefault<PassThroughHasher>>;

/// How many of a series' latest times are remembered exactly: rows that arrive a little out
/// of order (concurrent writers) at a new time do not mark their partition as overlapping.
const RECENT_TIMES: usize = 16;

/// The times a series has been written at, as far as overlap detection needs: every time is
/// at or below `floor`, or in `recent` (sorted, all above `floor`).
#[derive(Debug, Clone)]
struct SeriesTimes {
    floor: i64,
    recent: Vec<i64>,
}

impl Default for SeriesTimes {
    fn default() -> SeriesTimes {
        SeriesTimes { floor: i64::MIN, recent: Vec::new() }
    }
}

impl SeriesTimes {
    /// Records `time`; `true` if the series may already have a row at it.
    fn record(&mut self, time: i64) -> bool {
        if time <= self.floor {
            return true;
        }
        match self.recent.binary_search(&time) {
            Ok(_) => true,
            Err(at) => {
                self.recent.insert(at, time);
                if self.recent.len() > RECENT_TIMES {
                    self.floor = self.recent.remove(0);
                }
                false
            }
        }
    }
}

/// Builds Arrow batches from one request's accepted lines, grouped by table and partition.
pub struct RowsBuilder {
    partition_ns: i64,
    groups: Vec<(String, i64, TableRows)>,
    /// The group of the previous line: consecutive lines mostly share table and partition.
    last: usize,
    rows: usize,
}

impl RowsBuilder {
    pub fn new(partition_ns: i64) -> RowsBuilder {
        RowsBuilder { partition_ns, groups: Vec::new(), last: 0, rows: 0 }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Adds a line whose schema the catalog accepted; `time_ns` is its timestamp in ns.
    pub fn push(&mut self, line: &Line<'_>, time_ns: i64) {
        let partition = partition_of(time_ns, self.partition_ns);
        let same =
            |g: &(String, i64, TableRows)| g.1 == partition && g.0 == line.measurement.as_ref();
        if !self.groups.get(self.last).is_some_and(same) {
            self.last = match self.groups.iter().position(same) {
                Some(i) => i,
                None => {
                    self.groups.push((line.measurement.to_string(), partition, TableRows::new()));
                    self.groups.len() - 1
                }
            };
        }
        let rows = &mut self.groups[self.last].2;
        let row = rows.times.len();
        for (position, (key, value)) in line.tags.iter().enumerate() {
            let column =
                rows.column(key, position, || ColumnBuilder::Tag(StringDictionaryBuilder::new()));
            column.pad_to(row);
            if let ColumnBuilder::Tag(b) = column {
                b.append_value(value);
            }
        }
        let superseded = line.superseded_fields();
        for (index, (key, value)) in line.fields.iter().enumerate() {
            if superseded.as_ref().is_some_and(|s| s[index]) {
                continue; // a later occurrence of the same field wins
            }
            let column =
                rows.column(key, line.tags.len() + index, || ColumnBuilder::for_value(value));
            column.pad_to(row);
            column.append_field(value);
        }
        rows.times.push(time_ns);
        rows.series.push(series_hash(&line.tags));
        self.rows += 1;
    }

    pub fn finish(self) -> Vec<PendingBatch> {
        let mut out = Vec::with_capacity(self.groups.len());
        for (table, partition, mut rows) in self.groups {
            let n = rows.times.len();
            let mut fields = Vec::with_capacity(rows.columns.len() + 1);
            let mut arrays = Vec::with_capacity(rows.columns.len() + 1);
            for (name, column) in rows.names.iter().zip(rows.columns.iter_mut()) {
                column.pad_to(n);
                let array = column.finish();
                fields.push(Field::new(name, array.data_type().clone(), true));
                arrays.push(array);
            }
            fields.push(Field::new(TIME_COLUMN, catalog::time_data_type(), false));
            arrays.push(Arc::new(
                TimestampNanosecondArray::from(std::mem::take(&mut rows.times))
                    .with_timezone("UTC"),
            ));
            let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
                .expect("columns are built to the same length with matching types");
            out.push(PendingBatch { table, partition, batch, series: rows.series });
        }
        out
    }
}

/// Adds the `_seq` column to a batch.
pub fn with_seq(batch: &RecordBatch, seq: u64) -> RecordBatch {
    let mut fields: Vec<Field> =
        batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(SEQ_COLUMN, arrow::datatypes::DataType::UInt64, false));
    let mut arrays = batch.columns().to_vec();
    arrays.push(Arc::new(UInt64Array::from_value(seq, batch.num_rows())));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).expect("same row count")
}

const MIN_TIME_KEY: &str = "sundial.min_time_ns";
const MAX_TIME_KEY: &str = "sundial.max_time_ns";

/// `batch` with its time range recorded in its schema's metadata, so a query can skip a
/// buffered batch without reading it (see [`time_range`]).
pub fn with_time_range(batch: RecordBatch) -> RecordBatch {
    let Some(times) = batch
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<TimestampNanosecondArray>())
    else {
        return batch;
    };
    let (Some(min), Some(max)) = (arrow::compute::min(times), arrow::compute::max(times)) else {
        return batch;
    };
    let mut metadata = batch.schema().metadata().clone();
    metadata.insert(MIN_TIME_KEY.into(), min.to_string());
    metadata.insert(MAX_TIME_KEY.into(), max.to_string());
    let schema = Arc::new(batch.schema().as_ref().clone().with_metadata(metadata));
    batch.with_schema(schema).expect("only the metadata changed")
}

/// The time range of a buffered batch, when recorded.
pub fn time_range(batch: &RecordBatch) -> Option<(i64, i64)> {
    let schema = batch.schema_ref();
    let min = schema.metadata().get(MIN_TIME_KEY)?.parse().ok()?;
    let max = schema.metadata().get(MAX_TIME_KEY)?.parse().ok()?;
    Some((min, max))
}

/// Reshapes `batch` to `target` by column name: missing columns become nulls, extra columns
/// are dropped. Types match by construction (the catalog never changes a column's type).
pub fn adapt(batch: &RecordBatch, target: &SchemaRef) -> RecordBatch {
    if batch.schema().as_ref() == target.as_ref() {
        return batch.clone();
    }
    let source = batch.schema();
    let arrays = target
        .fields()
        .iter()
        .map(|field| match source.index_of(field.name()) {
            Ok(i) => batch.column(i).clone(),
            Err(_) => new_null_array(field.data_type(), batch.num_rows()),
        })
        .collect();
    RecordBatch::try_new_with_options(
        target.clone(),
        arrays,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
    .expect("catalog column types are stable, so adapted columns match the target schema")
}

/// One time window of one table.
#[derive(Clone)]
pub struct Partition {
    /// Buffered rows, each batch with `_seq`.
    pub batches: Vec<RecordBatch>,
    /// Rows being written to Parquet right now; still visible to queries until the file is.
    pub persisting: Vec<RecordBatch>,
    /// Some key may occur in more than one row of this partition (buffer or files).
    pub overlap: bool,
    pub persisting_overlap: bool,
    pub bytes: usize,
    pub persisting_bytes: usize,
    /// Smallest `_seq` among `batches` (u64::MAX when empty).
    pub min_seq: u64,
    pub persisting_min_seq: u64,
    pub rows: usize,
}

impl Default for Partition {
    /// Empty: no rows, so no smallest sequence number yet.
    fn default() -> Partition {
        Partition {
            batches: Vec::new(),
            persisting: Vec::new(),
            overlap: false,
            persisting_overlap: false,
            bytes: 0,
            persisting_bytes: 0,
            min_seq: u64::MAX,
            persisting_min_seq: u64::MAX,
            rows: 0,
        }
    }
}

impl Partition {
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.persisting.is_empty()
    }
}

/// Every buffered partition of one table, plus what is needed to decide overlaps.
#[derive(Default)]
pub struct TableBuffer {
    pub partitions: BTreeMap<i64, Partition>,
    /// Times written per series hash (see [`SeriesTimes`]); series that share a hash share an
    /// entry, which can only mark more overlap, never less.
    series_last: SeriesMap,
    /// Rows at or before this time may repeat keys of files written before this process
    /// started, whose series are not in `series_last`.
    floor_ns: i64,
    bytes: usize,
}

/// Smallest and largest `_seq` in `batches`; `None` when there are no rows.
pub fn seq_bounds(batches: &[RecordBatch]) -> Option<(u64, u64)> {
    batches
        .iter()
        .filter_map(|b| {
            let seq = b.column_by_name(SEQ_COLUMN)?.as_any().downcast_ref::<UInt64Array>()?;
            Some((arrow::compute::min(seq)?, arrow::compute::max(seq)?))
        })
        .reduce(|(lo, hi), (l, h)| (lo.min(l), hi.max(h)))
}

fn min_seq(batches: &[RecordBatch]) -> u64 {
    seq_bounds(batches).map_or(u64::MAX, |(lo, _)| lo)
}

/// Merges small batches once a partition holds this many, so tiny writes do not pile up.
const BATCHES_BEFORE_MERGE: usize = 64;
const SMALL_BATCH_ROWS: usize = 8_192;
/// Unsorted rows a partition gathers before they are sorted by series into one batch (the
/// default of `--buffer-sort-rows`).
pub const SORT_ROWS_MIN: usize = 256 * 1024;

impl TableBuffer {
    pub fn new(floor_ns: i64) -> TableBuffer {
        TableBuffer { floor_ns, ..Default::default() }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends a request's rows with their sequence number and returns them as stored (with
    /// `_seq`). `schema` is the table's current schema with `_seq`, used when small batches
    /// are merged.
    pub fn append(&mut self, pending: &PendingBatch, seq: u64, schema: &SchemaRef) -> RecordBatch {
        let times = pending.batch.column(pending.batch.num_columns() - 1);
        let times =
            times.as_any().downcast_ref::<TimestampNanosecondArray>().expect("last column is time");
        let mut overlap = false;
        for (&series, &time) in pending.series.iter().zip(times.values().iter()) {
            let seen = self.series_last.entry(series).or_default().record(time);
            if seen || time <= self.floor_ns {
                overlap = true;
            }
        }
        let batch = with_time_range(with_seq(&pending.batch, seq));
        let bytes = batch.get_array_memory_size();
        let partition = self.partitions.entry(pending.partition).or_default();
        partition.overlap |= overlap;
        partition.min_seq = partition.min_seq.min(seq);
        partition.rows += batch.num_rows();
        partition.bytes += bytes;
        self.bytes += bytes;
        partition.batches.push(batch.clone());
        if partition.batches.len() >= BATCHES_BEFORE_MERGE {
            // Merge the trailing run of small batches only, so batches stay in sequence order
            // (a persisted prefix must hold every record up to its highest sequence number).
            let run = partition
                .batches
                .iter()
                .rev()
                .take_while(|b| b.num_rows() < SMALL_BATCH_ROWS)
                .count();
            if run >= BATCHES_BEFORE_MERGE / 2 {
                let start = partition.batches.len() - run;
                let adapted: Vec<_> =
                    partition.batches[start..].iter().map(|b| adapt(b, schema)).collect();
                let merged = with_time_range(
                    arrow::compute::concat_batches(schema, &adapted)
                        .expect("adapted batches share the schema"),
                );
                partition.batches.truncate(start);
                partition.batches.push(merged);
                let before = partition.bytes;
                partition.bytes = partition.batches.iter().map(|b| b.get_array_memory_size()).sum();
                self.bytes = self.bytes - before.min(self.bytes) + partition.bytes;
            }
        }
        batch
    }

    /// Moves the oldest of a partition's buffered batches, up to `bytes_max` (at least one
    /// batch), to `persisting` and returns them with the overlap flag, unless a persist of it
    /// is already running or it holds nothing. Batches are in sequence order, so the moved
    /// prefix holds every buffered record of this partition up to its highest sequence number.
    pub fn start_persist(
        &mut self,
        partition: i64,
        bytes_max: usize,
    ) -> Option<(Vec<RecordBatch>, bool)> {
        let p = self.partitions.get_mut(&partition)?;
        if !p.persisting.is_empty() || p.batches.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut count = 0;
        for b in &p.batches {
            let size = b.get_array_memory_size();
            if count > 0 && bytes + size > bytes_max {
                break;
            }
            bytes += size;
            count += 1;
        }
        let rest = p.batches.split_off(count);
        p.persisting = std::mem::replace(&mut p.batches, rest);
        // Rows left behind may still share keys with the persisted ones: keep the flag on both.
        p.persisting_overlap = p.overlap;
        if p.batches.is_empty() {
            p.overlap = false;
        }
        p.persisting_bytes = bytes;
        p.bytes -= bytes.min(p.bytes);
        p.persisting_min_seq = min_seq(&p.persisting);
        p.min_seq = min_seq(&p.batches);
        p.rows = p.batches.iter().map(|b| b.num_rows()).sum();
        Some((p.persisting.clone(), p.persisting_overlap))
    }

    /// The persist of `partition` is committed: its rows are in a file now.
    pub fn finish_persist(&mut self, partition: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            self.bytes -= p.persisting_bytes.min(self.bytes);
            p.persisting.clear();
            p.persisting_bytes = 0;
            p.persisting_min_seq = u64::MAX;
            p.persisting_overlap = false;
            if p.is_empty() {
                self.partitions.remove(&partition);
            }
        }
    }

    /// The persist of `partition` failed: its rows go back to the buffer.
    pub fn abort_persist(&mut self, partition: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            let mut batches = std::mem::take(&mut p.persisting);
            batches.append(&mut p.batches);
            p.batches = batches;
            p.overlap |= std::mem::take(&mut p.persisting_overlap);
            p.bytes += std::mem::take(&mut p.persisting_bytes);
            p.min_seq = p.min_seq.min(std::mem::replace(&mut p.persisting_min_seq, u64::MAX));
            p.rows = p.batches.iter().map(|b| b.num_rows()).sum();
        }
    }

    /// The next run of buffered batches to sort by series (see [`sort`]): consecutive
    /// unsorted batches of one partition, at least `rows_min` rows, as (partition, index of
    /// the first batch, the batches).
    pub fn unsorted_run(&self, rows_min: usize) -> Option<(i64, usize, Vec<RecordBatch>)> {
        for (&partition, p) in &self.partitions {
            let mut start = 0;
            let mut rows = 0;
            for (i, batch) in p.batches.iter().enumerate() {
                if sort::is_sorted(batch) {
                    start = i + 1;
                    rows = 0;
                    continue;
                }
                rows += batch.num_rows();
                if rows >= rows_min.max(1) {
                    return Some((partition, start, p.batches[start..=i].to_vec()));
                }
            }
        }
        None
    }

    /// Puts `sorted` in place of `run` (from [`Self::unsorted_run`]) unless those batches
    /// have changed place meanwhile (persisted, merged); returns whether it did.
    pub fn replace_run(
        &mut self,
        partition: i64,
        start: usize,
        run: &[RecordBatch],
        sorted: RecordBatch,
    ) -> bool {
        let Some(p) = self.partitions.get_mut(&partition) else { return false };
        let same = |a: &RecordBatch, b: &RecordBatch| {
            a.num_rows() == b.num_rows() && Arc::ptr_eq(a.column(0), b.column(0))
        };
        let unchanged = p
            .batches
            .get(start..start + run.len())
            .is_some_and(|now| now.iter().zip(run).all(|(a, b)| same(a, b)));
        if !unchanged || sorted.num_rows() != run.iter().map(|b| b.num_rows()).sum::<usize>() {
            return false;
        }
        let before: usize = run.iter().map(|b| b.get_array_memory_size()).sum();
        let after = sorted.get_array_memory_size();
        p.batches.splice(start..start + run.len(), std::iter::once(sorted));
        p.bytes = p.bytes - before.min(p.bytes) + after;
        self.bytes = self.bytes - before.min(self.bytes) + after;
        true
    }

    /// Smallest sequence number still only in memory (u64::MAX when none).
    pub fn min_unpersisted_seq(&self) -> u64 {
        self.partitions
            .values()
            .map(|p| p.min_seq.min(p.persisting_min_seq))
            .min()
            .unwrap_or(u64::MAX)
    }
}
