//! A view's live state: materialized rows (in chunks, each row live until a refresh replaces
//! its bucket × group), and the dirty marks writes left since. No I/O and no SQL here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow::array::{Array, AsArray, BooleanArray, StringArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;

use super::changes::{Event, Feed, History};
use super::definition::{Bucket, Definition};
use super::{DIRTY_MARKS_MAX, MATERIALIZED_BYTES_MAX};

/// Appends one group column's value to an encoded group key: `0xff` for NULL, else `0x00`,
/// the length (u32, little endian) and the bytes. Unambiguous for any strings.
pub(super) fn push_key_part(key: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => key.push(0xff),
        Some(v) => {
            key.push(0);
            key.extend_from_slice(&(v.len() as u32).to_le_bytes());
            key.extend_from_slice(v.as_bytes());
        }
    }
}

/// The values of an encoded group key.
pub(super) fn decode_key(mut key: &[u8]) -> Vec<Option<String>> {
    let mut values = Vec::new();
    while let Some((&tag, rest)) = key.split_first() {
        if tag == 0xff {
            values.push(None);
            key = rest;
            continue;
        }
        let Some(len) = rest.get(..4) else { break };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let Some(bytes) = rest.get(4..4 + len) else { break };
        values.push(Some(String::from_utf8_lossy(bytes).into_owned()));
        key = &rest[4 + len..];
    }
    values
}

/// Bucket × group keys touched by one change.
#[derive(Debug, Default, Clone)]
pub(super) struct Marks {
    pub(super) buckets: HashMap<i64, HashSet<Vec<u8>>>,
}

impl Marks {
    pub(super) fn insert(&mut self, bucket: i64, key: &[u8]) {
        let keys = self.buckets.entry(bucket).or_default();
        if !keys.contains(key) {
            keys.insert(key.to_vec());
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// These marks as a view over this one sees them: its bucket of each bucket, and its
    /// groups (`groups[i]`: the position of its i-th group among this view's).
    pub(super) fn lift(&self, bucket: &Bucket, groups: &[usize]) -> Marks {
        let mut lifted = Marks::default();
        let mut key = Vec::new();
        for (&b, keys) in &self.buckets {
            let up = bucket.of(b);
            for k in keys {
                let values = decode_key(k);
                key.clear();
                for &g in groups {
                    push_key_part(&mut key, values.get(g).and_then(|v| v.as_deref()));
                }
                lifted.insert(up, &key);
            }
        }
        lifted
    }
}

/// Materialized rows of a view: the rows, and per row its bucket, its group values and
/// whether it is still the view's row for its bucket × group.
#[derive(Clone)]
pub(super) struct Chunk {
    pub(super) batch: RecordBatch,
    buckets: Arc<Vec<i64>>,
    groups: Arc<Vec<StringArray>>,
    live: Arc<Vec<bool>>,
    live_rows: usize,
}

impl Chunk {
    /// `None` if `batch` lacks the bucket or a group column.
    fn new(batch: RecordBatch, definition: &Definition) -> Option<Chunk> {
        let buckets = bucket_values(&batch, definition)?;
        let groups = group_values(&batch, definition)?;
        let rows = batch.num_rows();
        Some(Chunk {
            batch,
            buckets: Arc::new(buckets),
            groups: Arc::new(groups),
            live: Arc::new(vec![true; rows]),
            live_rows: rows,
        })
    }

    fn key(&self, row: usize, key: &mut Vec<u8>) {
        key.clear();
        for g in self.groups.iter() {
            push_key_part(key, (!g.is_null(row)).then(|| g.value(row)));
        }
    }

    /// The live rows `dirty` covers (what a refresh of `dirty` replaces).
    pub(super) fn covered_live(&self, dirty: &Dirty) -> Option<RecordBatch> {
        let mut key = Vec::new();
        let mask: BooleanArray = (0..self.batch.num_rows())
            .map(|row| {
                Some(
                    self.live[row]
                        && dirty.covers(self.buckets[row], || {
                            self.key(row, &mut key);
                            key.as_slice()
                        }),
                )
            })
            .collect();
        let batch = arrow::compute::filter_record_batch(&self.batch, &mask).ok()?;
        (batch.num_rows() > 0).then_some(batch)
    }

    /// The live rows.
    pub(super) fn live_rows(&self) -> Option<RecordBatch> {
        let mask = BooleanArray::from(self.live.as_ref().clone());
        let batch = arrow::compute::filter_record_batch(&self.batch, &mask).ok()?;
        (batch.num_rows() > 0).then_some(batch)
    }

    /// The live rows with buckets in `[lo, hi]` that `dirty` does not cover.
    pub(super) fn clean(&self, dirty: &Dirty, lo: i64, hi: i64) -> Option<RecordBatch> {
        let mut key = Vec::new();
        let mask: BooleanArray = (0..self.batch.num_rows())
            .map(|row| {
                let b = self.buckets[row];
                Some(
                    self.live[row]
                        && b >= lo
                        && b <= hi
                        && !dirty.covers(b, || {
                            self.key(row, &mut key);
                            key.as_slice()
                        }),
                )
            })
            .collect();
        let batch = arrow::compute::filter_record_batch(&self.batch, &mask).ok()?;
        (batch.num_rows() > 0).then_some(batch)
    }
}

/// The bucket × group key of each of a view's rows.
pub(super) fn row_keys(
    batch: &RecordBatch,
    definition: &Definition,
) -> Option<Vec<(i64, Vec<u8>)>> {
    let buckets = bucket_values(batch, definition)?;
    let groups = group_values(batch, definition)?;
    Some(
        buckets
            .into_iter()
            .enumerate()
            .map(|(row, b)| {
                let mut key = Vec::new();
                for g in &groups {
                    push_key_part(&mut key, (!g.is_null(row)).then(|| g.value(row)));
                }
                (b, key)
            })
            .collect(),
    )
}

/// The bucket starts of a view's rows.
fn bucket_values(batch: &RecordBatch, definition: &Definition) -> Option<Vec<i64>> {
    let column = batch.column_by_name(&definition.bucket.output)?;
    let ints = arrow::compute::cast(column, &DataType::Int64).ok()?;
    let ints = ints.as_primitive::<arrow::datatypes::Int64Type>();
    Some((0..ints.len()).map(|i| if ints.is_null(i) { i64::MIN } else { ints.value(i) }).collect())
}

/// The group columns of a view's rows, as text.
fn group_values(batch: &RecordBatch, definition: &Definition) -> Option<Vec<StringArray>> {
    definition
        .groups
        .iter()
        .map(|g| {
            let column = batch.column_by_name(&g.output)?;
            let text = arrow::compute::cast(column, &DataType::Utf8).ok()?;
            Some(text.as_string::<i32>().clone())
        })
        .collect()
}

/// The rows of `batches` (a view's rows, freshly computed) whose bucket × group `dirty`
/// covers.
pub(super) fn covered(
    batches: Vec<RecordBatch>,
    dirty: &Dirty,
    definition: &Definition,
) -> Option<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for batch in batches {
        let chunk = Chunk::new(batch, definition)?;
        let mut key = Vec::new();
        let mask: BooleanArray = (0..chunk.batch.num_rows())
            .map(|row| {
                Some(dirty.covers(chunk.buckets[row], || {
                    chunk.key(row, &mut key);
                    key.as_slice()
                }))
            })
            .collect();
        let kept = arrow::compute::filter_record_batch(&chunk.batch, &mask).ok()?;
        if kept.num_rows() > 0 {
            out.push(kept);
        }
    }
    Some(out)
}

/// Dirty marks: per bucket, the group keys written since the bucket was last materialized,
/// each with the generation of its latest mark.
#[derive(Debug, Clone, Default)]
pub(super) struct Dirty {
    pub(super) buckets: BTreeMap<i64, HashMap<Vec<u8>, u64>>,
}

impl Dirty {
    pub(super) fn covers<'k>(&self, bucket: i64, key: impl FnOnce() -> &'k [u8]) -> bool {
        match self.buckets.get(&bucket) {
            None => false,
            Some(keys) => keys.contains_key(key()),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.buckets.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The marks with buckets in `[lo, hi]`, at most `buckets_max` buckets of them.
    pub(super) fn range(&self, lo: i64, hi: i64, buckets_max: usize) -> Dirty {
        if lo > hi {
            return Dirty::default();
        }
        Dirty {
            buckets: self
                .buckets
                .range(lo..=hi)
                .take(buckets_max)
                .map(|(b, k)| (*b, k.clone()))
                .collect(),
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    /// The chunks hold every bucket × group that is not dirty.
    pub(super) complete: bool,
    /// Bumped by every reset: a refresh that started before one installs nothing.
    pub(super) epoch: u64,
    pub(super) generation: u64,
    pub(super) chunks: Vec<Chunk>,
    pub(super) schema: Option<SchemaRef>,
    pub(super) dirty: Dirty,
    pub(super) dirty_marks: usize,
    /// The sequence number of the latest write that marked this view.
    pub(super) marked_seq: u64,
    /// Every mark of writes up to this sequence number is materialized.
    pub(super) materialized_seq: u64,
    pub(super) failure: Option<String>,
    pub(super) over_limit: bool,
    pub(super) refreshes: u64,
    pub(super) last_refresh: Option<SystemTime>,
    pub(super) last_refresh_duration: Option<Duration>,
    /// The view's change feed (shared with the `View`) and its history.
    pub(super) feed: Arc<Feed>,
    pub(super) history: History,
}

/// What a refresh or a query works from, taken under the state's lock.
pub(super) enum Plan {
    /// Nothing materialized yet (or forgotten): compute the view from raw.
    Full { epoch: u64, marked_seq: u64 },
    /// Materialized rows that are clean, and the dirty marks to recompute.
    Partial { epoch: u64, marked_seq: u64, chunks: Vec<Chunk>, dirty: Dirty },
}

impl State {
    pub(super) fn mark(&mut self, marks: &Marks, seq: u64) {
        self.marked_seq = self.marked_seq.max(seq);
        self.generation += 1;
        for (&bucket, keys) in &marks.buckets {
            let entry = self.dirty.buckets.entry(bucket).or_default();
            for key in keys {
                if entry.insert(key.clone(), self.generation).is_none() {
                    self.dirty_marks += 1;
                }
            }
        }
        if self.dirty_marks > DIRTY_MARKS_MAX {
            self.reset(seq);
        }
    }

    /// Forgets every materialized row and mark: the view is computed from raw until rebuilt.
    /// Subscribers are told to take a new snapshot.
    pub(super) fn reset(&mut self, seq: u64) {
        self.marked_seq = self.marked_seq.max(seq);
        let feed = self.feed.clone();
        self.history.publish(&feed, self.marked_seq, vec![Event::Reset]);
        self.complete = false;
        self.epoch += 1;
        self.chunks.clear();
        self.dirty = Dirty::default();
        self.dirty_marks = 0;
        self.schema = None;
        self.over_limit = false;
    }

    /// What a query for buckets in `[lo, hi]` reads.
    pub(super) fn plan_query(&self, lo: i64, hi: i64) -> Plan {
        if !self.complete {
            return Plan::Full { epoch: self.epoch, marked_seq: self.marked_seq };
        }
        Plan::Partial {
            epoch: self.epoch,
            marked_seq: self.marked_seq,
            chunks: self.chunks.clone(),
            dirty: self.dirty.range(lo, hi, usize::MAX),
        }
    }

    /// What a refresh recomputes: everything (forgetting marks, since the whole view is
    /// computed from here on), or up to `buckets_max` dirty buckets.
    pub(super) fn plan_refresh(&mut self, buckets_max: usize) -> Plan {
        if !self.complete {
            self.dirty = Dirty::default();
            self.dirty_marks = 0;
            return Plan::Full { epoch: self.epoch, marked_seq: self.marked_seq };
        }
        Plan::Partial {
            epoch: self.epoch,
            marked_seq: self.marked_seq,
            chunks: self.chunks.clone(),
            dirty: self.dirty.range(i64::MIN, i64::MAX, buckets_max),
        }
    }

    pub(super) fn rows(&self) -> usize {
        self.chunks.iter().map(|c| c.live_rows).sum()
    }

    pub(super) fn bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.batch.get_array_memory_size()).sum()
    }

    /// Installs a whole computed view (a `Plan::Full` refresh). `false` if a reset happened
    /// since the plan, or the rows do not fit the definition.
    pub(super) fn install_full(
        &mut self,
        epoch: u64,
        marked_seq: u64,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        definition: &Definition,
    ) -> bool {
        if epoch != self.epoch {
            return false;
        }
        let Some(chunks) = batches
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| Chunk::new(b, definition))
            .collect::<Option<Vec<_>>>()
        else {
            return false;
        };
        self.chunks = chunks;
        self.schema = Some(schema);
        self.complete = true;
        self.materialized_seq = marked_seq;
        self.check_limit();
        true
    }

    /// Installs `chunks` (from [`replaced`]: the rows of `dirty`'s bucket × groups recomputed)
    /// after a `Plan::Partial` refresh, and clears each mark of `dirty` unless a write marked
    /// it again meanwhile. `events` (what the replacement changes) go to the change feed.
    /// `false` if a reset happened since the plan (only refreshes, which take turns, change
    /// the chunks otherwise, so `chunks` was computed from the current ones).
    pub(super) fn install_partial(
        &mut self,
        epoch: u64,
        marked_seq: u64,
        dirty: &Dirty,
        chunks: Vec<Chunk>,
        events: Vec<Event>,
    ) -> bool {
        if epoch != self.epoch || !self.complete {
            return false;
        }
        self.chunks = chunks;
        for (bucket, keys) in &dirty.buckets {
            let Some(current) = self.dirty.buckets.get_mut(bucket) else { continue };
            for (k, generation) in keys {
                if current.get(k) == Some(generation) {
                    current.remove(k);
                    self.dirty_marks = self.dirty_marks.saturating_sub(1);
                }
            }
            if current.is_empty() {
                self.dirty.buckets.remove(bucket);
            }
        }
        if self.dirty.is_empty() {
            self.materialized_seq = marked_seq;
        }
        let feed = self.feed.clone();
        self.history.publish(&feed, marked_seq, events);
        self.check_limit();
        true
    }

    /// Every live materialized row.
    pub(super) fn all_rows(&self) -> Vec<RecordBatch> {
        self.chunks.iter().filter_map(|c| c.live_rows()).collect()
    }

    fn check_limit(&mut self) {
        if self.bytes() > MATERIALIZED_BYTES_MAX {
            self.chunks.clear();
            self.complete = false;
            self.over_limit = true;
            // Subscribers cannot follow rows that are no longer kept.
            let feed = self.feed.clone();
            self.history.publish(&feed, self.marked_seq, vec![Event::Reset]);
        }
    }
}

/// `chunks` with the live rows of `dirty`'s bucket × groups replaced by `fresh` (their rows
/// recomputed), rewritten into one chunk when most rows are replaced ones. Run outside the
/// state's lock: it reads every materialized row.
pub(super) fn replaced(
    mut chunks: Vec<Chunk>,
    dirty: &Dirty,
    fresh: Vec<RecordBatch>,
    definition: &Definition,
) -> Option<Vec<Chunk>> {
    let fresh = fresh
        .into_iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| Chunk::new(b, definition))
        .collect::<Option<Vec<_>>>()?;
    let mut key = Vec::new();
    for chunk in &mut chunks {
        let mut live_rows = chunk.live_rows;
        let groups = chunk.groups.clone();
        let buckets = chunk.buckets.clone();
        let live = Arc::make_mut(&mut chunk.live);
        for (row, alive) in live.iter_mut().enumerate() {
            if *alive
                && dirty.covers(buckets[row], || {
                    key.clear();
                    for g in groups.iter() {
                        push_key_part(&mut key, (!g.is_null(row)).then(|| g.value(row)));
                    }
                    key.as_slice()
                })
            {
                *alive = false;
                live_rows -= 1;
            }
        }
        chunk.live_rows = live_rows;
    }
    chunks.retain(|c| c.live_rows > 0);
    chunks.extend(fresh);
    compact(&mut chunks);
    Some(chunks)
}

/// Rewrites `chunks` into one when most of their rows are replaced ones.
fn compact(chunks: &mut Vec<Chunk>) {
    let total: usize = chunks.iter().map(|c| c.batch.num_rows()).sum();
    let live: usize = chunks.iter().map(|c| c.live_rows).sum();
    if total - live <= live.max(10_000) {
        return;
    }
    let mut kept = Vec::new();
    for chunk in chunks.iter() {
        let mask = BooleanArray::from(chunk.live.as_ref().clone());
        if let Ok(batch) = arrow::compute::filter_record_batch(&chunk.batch, &mask) {
            kept.push((batch, chunk.clone()));
        }
    }
    let Some(schema) = kept.first().map(|(b, _)| b.schema()) else { return };
    let batches: Vec<RecordBatch> = kept.iter().map(|(b, _)| b.clone()).collect();
    let Ok(batch) = arrow::compute::concat_batches(&schema, &batches) else { return };
    let rows = batch.num_rows();
    let Some(groups) = concat_groups(&kept) else { return };
    let buckets: Vec<i64> = kept
        .iter()
        .flat_map(|(_, c)| {
            c.buckets.iter().zip(c.live.iter()).filter(|(_, l)| **l).map(|(b, _)| *b)
        })
        .collect();
    *chunks = vec![Chunk {
        batch,
        buckets: Arc::new(buckets),
        groups: Arc::new(groups),
        live: Arc::new(vec![true; rows]),
        live_rows: rows,
    }];
}

/// The live group values of `kept` chunks, concatenated per group column.
fn concat_groups(kept: &[(RecordBatch, Chunk)]) -> Option<Vec<StringArray>> {
    let columns = kept.first()?.1.groups.len();
    (0..columns)
        .map(|g| {
            let parts: Vec<StringArray> = kept
                .iter()
                .map(|(_, c)| {
                    let mask = BooleanArray::from(c.live.as_ref().clone());
                    arrow::compute::filter(&c.groups[g], &mask)
                        .map(|a| a.as_string::<i32>().clone())
                })
                .collect::<Result<_, _>>()
                .ok()?;
            let refs: Vec<&dyn Array> = parts.iter().map(|p| p as &dyn Array).collect();
            let joined = arrow::compute::concat(&refs).ok()?;
            Some(joined.as_string::<i32>().clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys_round_trip() {
        let mut key = Vec::new();
        push_key_part(&mut key, Some("a\u{0}b"));
        push_key_part(&mut key, None);
        push_key_part(&mut key, Some(""));
        assert_eq!(decode_key(&key), vec![Some("a\u{0}b".to_string()), None, Some(String::new())]);
        let mut other = Vec::new();
        push_key_part(&mut other, Some("a"));
        push_key_part(&mut other, Some("\u{0}b"));
        assert_ne!(key, other);
    }

    #[test]
    fn a_refresh_clears_only_the_marks_it_saw() {
        let mut state = State { complete: true, ..Default::default() };
        let mut marks = Marks::default();
        marks.insert(60, b"a");
        marks.insert(60, b"b");
        state.mark(&marks, 1);
        let Plan::Partial { epoch, marked_seq, dirty, .. } = state.plan_refresh(100) else {
            panic!("complete views refresh partially")
        };
        // A write lands while the refresh runs.
        let mut again = Marks::default();
        again.insert(60, b"b");
        state.mark(&again, 2);
        let definition =
            super::super::definition::from_sql("CREATE MATERIALIZED VIEW v AS SELECT date_bin(INTERVAL '1 minute', time) AS b, count(*) FROM t GROUP BY b").expect("valid");
        let chunks = replaced(state.chunks.clone(), &dirty, Vec::new(), &definition).expect("rows");
        assert!(state.install_partial(epoch, marked_seq, &dirty, chunks, Vec::new()));
        let left: Vec<_> = state.dirty.buckets[&60].keys().cloned().collect();
        assert_eq!(left, vec![b"b".to_vec()]);
        assert_eq!(state.dirty_marks, 1);
        // A reset since the plan installs nothing.
        let plan = state.plan_refresh(100);
        state.reset(3);
        let Plan::Partial { epoch, marked_seq, dirty, .. } = plan else { panic!() };
        assert!(!state.install_partial(epoch, marked_seq, &dirty, Vec::new(), Vec::new()));
    }
}
