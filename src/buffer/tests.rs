//! Building batches from lines, overlap detection and the field-by-field merge.

use super::*;
use crate::line_protocol::{lines, parse_line, Line};
use arrow::util::pretty::pretty_format_batches;

const DAY: i64 = 86_400_000_000_000;

fn build(body: &str) -> Vec<PendingBatch> {
    let mut builder = RowsBuilder::new(DAY);
    let mut line = Line::default();
    for (n, bytes) in lines(body.as_bytes()) {
        parse_line(n, bytes, &mut line).expect("well formed");
        builder.push(&line, line.timestamp.expect("test lines have timestamps"));
    }
    let mut batches = builder.finish();
    batches.sort_by_key(|b| (b.table.clone(), b.partition));
    batches
}

fn schema_of(batches: &[RecordBatch]) -> SchemaRef {
    let all: Vec<Schema> = batches
        .iter()
        .map(|b| b.schema().as_ref().clone().with_metadata(Default::default()))
        .collect();
    Arc::new(Schema::try_merge(all).expect("compatible"))
}

fn merged(buffer: &TableBuffer, partition: i64) -> String {
    let p = &buffer.partitions[&partition];
    let schema = schema_of(&p.batches);
    let adapted: Vec<_> = p.batches.iter().map(|b| adapt(b, &schema)).collect();
    let all = arrow::compute::concat_batches(&schema, &adapted).expect("concat");
    let keys: Vec<usize> =
        ["host", "time"].iter().map(|n| schema.index_of(n).expect("key")).collect();
    let seq = schema.index_of(SEQ_COLUMN).expect("seq");
    let out = dedup::sort_and_merge(&all, &keys, seq, p.overlap).expect("merge");
    pretty_format_batches(&[out]).expect("format").to_string()
}

#[test]
fn builds_one_batch_per_table_and_partition() {
    let batches = build("cpu,host=a u=1 10\nmem free=2i 20\ncpu,host=b u=3,x=\"s\" 30\ncpu,host=a u=4 86400000000001");
    let summary: Vec<_> =
        batches.iter().map(|b| (b.table.as_str(), b.partition, b.batch.num_rows())).collect();
    assert_eq!(summary, vec![("cpu", 0, 2), ("cpu", DAY, 1), ("mem", 0, 1)]);
    let cpu = &batches[0].batch;
    let names: Vec<_> = cpu.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["host", "u", "x", "time"]);
    assert_eq!(cpu.column(2).null_count(), 1, "x is null where it was not written");
}

#[test]
fn in_order_writes_never_overlap() {
    let mut buffer = TableBuffer::new(i64::MIN);
    let schema = Arc::new(Schema::empty());
    for (seq, body) in
        ["cpu,host=a u=1 10\ncpu,host=b u=1 10", "cpu,host=a u=2 20\ncpu,host=b u=2 20"]
            .iter()
            .enumerate()
    {
        for p in build(body) {
            buffer.append(&p, seq as u64 + 1, &schema);
        }
    }
    assert!(!buffer.partitions[&0].overlap);
    assert_eq!(buffer.min_unpersisted_seq(), 1);
}

#[test]
fn later_write_wins_field_by_field() {
    let mut buffer = TableBuffer::new(i64::MIN);
    let schema = Arc::new(Schema::empty());
    let writes = [
        "cpu,host=a u=1,s=10 100\ncpu,host=b u=5 100",
        "cpu,host=a u=2 100",
        "cpu,host=a s=30 100",
    ];
    for (seq, body) in writes.iter().enumerate() {
        for p in build(body) {
            buffer.append(&p, seq as u64 + 1, &schema);
        }
    }
    assert!(buffer.partitions[&0].overlap);
    let expected = "\
+------+-----+------+--------------------------------+------+
| host | u   | s    | time                           | _seq |
+------+-----+------+--------------------------------+------+
| a    | 2.0 | 30.0 | 1970-01-01T00:00:00.000000100Z | 3    |
| b    | 5.0 |      | 1970-01-01T00:00:00.000000100Z | 1    |
+------+-----+------+--------------------------------+------+";
    assert_eq!(merged(&buffer, 0), expected);
}

#[test]
fn floor_marks_rows_that_may_repeat_persisted_keys() {
    let mut buffer = TableBuffer::new(50);
    let schema = Arc::new(Schema::empty());
    for p in build("cpu,host=a u=1 40") {
        buffer.append(&p, 1, &schema);
    }
    assert!(buffer.partitions[&0].overlap);
}

#[test]
fn persist_moves_rows_and_abort_restores_them() {
    let mut buffer = TableBuffer::new(i64::MIN);
    let schema = Arc::new(Schema::empty());
    for p in build("cpu,host=a u=1 10") {
        buffer.append(&p, 7, &schema);
    }
    let (rows, overlap) = buffer.start_persist(0, usize::MAX).expect("something to persist");
    assert_eq!((rows.len(), overlap), (1, false));
    assert!(buffer.start_persist(0, usize::MAX).is_none(), "one persist per partition at a time");
    assert_eq!(buffer.min_unpersisted_seq(), 7);
    buffer.abort_persist(0);
    assert_eq!(buffer.partitions[&0].batches.len(), 1);
    buffer.start_persist(0, usize::MAX).expect("again");
    buffer.finish_persist(0);
    assert!(buffer.partitions.is_empty());
    assert_eq!(buffer.min_unpersisted_seq(), u64::MAX);
    assert_eq!(buffer.bytes(), 0);
}

#[test]
fn persist_takes_a_bounded_prefix_in_sequence_order() {
    let mut buffer = TableBuffer::new(i64::MIN);
    let schema = Arc::new(Schema::empty());
    for seq in 1..=4u64 {
        for p in build(&format!("cpu,host=a u={seq} {}", seq * 10)) {
            buffer.append(&p, seq, &schema);
        }
    }
    let one = buffer.partitions[&0].batches[0].get_array_memory_size();
    let (rows, _) = buffer.start_persist(0, one * 2).expect("a prefix");
    assert_eq!(rows.len(), 2);
    assert_eq!(buffer.min_unpersisted_seq(), 1, "the persisting rows are not persisted yet");
    buffer.finish_persist(0);
    assert_eq!(buffer.min_unpersisted_seq(), 3);
    assert_eq!(buffer.partitions[&0].batches.len(), 2);
}

#[test]
fn a_little_out_of_order_is_not_overlap_but_a_repeat_is() {
    let mut times = SeriesTimes::default();
    for t in [10, 30, 20, 40] {
        assert!(!times.record(t), "new time {t}");
    }
    assert!(times.record(20), "a time seen before");
    for t in 100..100 + RECENT_TIMES as i64 {
        assert!(!times.record(t));
    }
    // 10..40 have fallen below the remembered window: anything there may repeat.
    assert!(times.record(25), "below the floor is treated as a possible repeat");
    assert!(!times.record(99 + RECENT_TIMES as i64 + 1));
}

fn stored(bodies: &[&str]) -> (Vec<RecordBatch>, SchemaRef) {
    let mut buffer = TableBuffer::new(i64::MIN);
    let mut batches = Vec::new();
    for (seq, body) in bodies.iter().enumerate() {
        for p in build(body) {
            batches.push(buffer.append(&p, seq as u64 + 1, &Arc::new(Schema::empty())));
        }
    }
    let schema = schema_of(&batches);
    (batches, schema)
}

fn rows_text(batch: &RecordBatch) -> Vec<String> {
    let plain = crate::query::plain(&batch.schema(), std::slice::from_ref(batch)).expect("plain").1;
    let text = pretty_format_batches(&plain).expect("format").to_string();
    text.lines().skip(3).filter(|l| l.starts_with('|')).map(str::to_string).collect()
}

#[test]
// `vec![1..6]` is one range of rows, meant as such.
#[allow(clippy::single_range_in_vec_init)]
fn sorting_by_series_keeps_every_row_and_orders_by_tags_then_time() {
    // Two tags, dictionaries in different orders per batch, a null tag, a tag added later,
    // a repeated key (same series and time, later _seq).
    let bodies = [
        "cpu,host=b,dc=x u=1 30\ncpu,host=a,dc=y u=2 10\ncpu,host=a,dc=x u=3 20",
        "cpu,dc=x u=4 40\ncpu,host=a,dc=x u=5 5\ncpu,host=b,dc=x u=6 30",
        "cpu,host=a,dc=x,rack=r1 u=7 50\ncpu,host=a,dc=x u=8 1",
    ];
    let (batches, schema) = stored(&bodies);
    for radix in [true, false] {
        let sorted = sort::sort_with(&batches, &schema, radix).expect("sort");
        assert!(sort::is_sorted(&sorted));
        assert_eq!(time_range(&sorted), Some((1, 50)));
        let lines = rows_text(&sorted);
        let expected = [
            "|      | x  | 4.0 | 1970-01-01T00:00:00.000000040Z | 2    |      |",
            "| a    | x  | 8.0 | 1970-01-01T00:00:00.000000001Z | 3    |      |",
            "| a    | x  | 5.0 | 1970-01-01T00:00:00.000000005Z | 2    |      |",
            "| a    | x  | 3.0 | 1970-01-01T00:00:00.000000020Z | 1    |      |",
            "| a    | x  | 7.0 | 1970-01-01T00:00:00.000000050Z | 3    | r1   |",
            "| a    | y  | 2.0 | 1970-01-01T00:00:00.000000010Z | 1    |      |",
            "| b    | x  | 1.0 | 1970-01-01T00:00:00.000000030Z | 1    |      |",
            "| b    | x  | 6.0 | 1970-01-01T00:00:00.000000030Z | 2    |      |",
        ];
        assert_eq!(
            sorted.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(),
            ["host", "dc", "u", "time", "_seq", "rack"]
        );
        assert_eq!(lines, expected, "radix {radix}");
        // Rows of a value of the first tag by binary search; values absent find nothing.
        let want = |values: &[&str]| {
            sort::ranges_of(
                &sorted,
                "host",
                &values.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(want(&["a"]), Some(vec![1..6]));
        assert_eq!(want(&["b", "zz", "a", "b"]), Some(vec![1..6, 6..8]));
        assert_eq!(want(&["c"]), Some(vec![]));
        assert_eq!(
            sort::ranges_of(&sorted, "dc", &["x".to_string()]),
            None,
            "dc is not the first tag"
        );
    }
    assert_eq!(sort::ranges_of(&batches[0], "host", &["a".to_string()]), None, "not sorted");
}

#[test]
fn a_sorted_run_replaces_its_batches_only_where_they_still_are() {
    let mut buffer = TableBuffer::new(i64::MIN);
    let empty = Arc::new(Schema::empty());
    let mut schema = empty.clone();
    let mut seq = 0;
    while buffer.unsorted_run(SORT_ROWS_MIN).is_none() {
        // Batches too large to be merged as small ones.
        let body: String = (0..SMALL_BATCH_ROWS)
            .map(|i| format!("cpu,host=h{} u={i} {}\n", i % 7, seq * SMALL_BATCH_ROWS + i))
            .collect();
        seq += 1;
        for p in build(&body) {
            let batch = buffer.append(&p, seq as u64, &empty);
            schema = batch.schema();
        }
    }
    let (partition, start, run) = buffer.unsorted_run(SORT_ROWS_MIN).expect("a run");
    assert_eq!((partition, start), (0, 0));
    assert_eq!(
        run.iter().map(|b| b.num_rows()).sum::<usize>(),
        SORT_ROWS_MIN.div_ceil(SMALL_BATCH_ROWS) * SMALL_BATCH_ROWS
    );
    let schema = Arc::new(Schema::new(schema.fields().clone()));
    let sorted = sort::sort_by_series(&run, &schema).expect("sort");
    // Once persisting took the batches away, the sorted copy is not put back.
    let mut moved = TableBuffer::new(i64::MIN);
    moved.partitions.insert(0, Partition { batches: run[1..].to_vec(), ..Default::default() });
    assert!(!moved.replace_run(0, start, &run, sorted.clone()));
    let rows = buffer.partitions[&0].rows;
    assert!(buffer.replace_run(0, start, &run, sorted));
    let p = &buffer.partitions[&0];
    assert_eq!(p.batches.len(), 1);
    assert_eq!((p.rows, p.batches[0].num_rows()), (rows, rows));
    assert_eq!(buffer.bytes(), p.bytes);
    assert!(buffer.unsorted_run(SORT_ROWS_MIN).is_none(), "a sorted batch is not sorted again");
}
