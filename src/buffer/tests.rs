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
    let all: Vec<Schema> = batches.iter().map(|b| b.schema().as_ref().clone()).collect();
    Arc::new(Schema::try_merge(all).expect("compatible"))
}

fn merged(buffer: &TableBuffer, partition: i64) -> String {
    let p = &buffer.partitions[&partition];
    let schema = schema_of(&p.batches);
    let adapted: Vec<_> = p.batches.iter().map(|b| adapt(b, &schema)).collect();
    let all = arrow::compute::concat_batches(&schema, &adapted).expect("concat");
    let keys: Vec<usize> = ["host", "time"].iter().map(|n| schema.index_of(n).expect("key")).collect();
    let seq = schema.index_of(SEQ_COLUMN).expect("seq");
    let out = dedup::sort_and_merge(&all, &keys, seq, p.overlap).expect("merge");
    pretty_format_batches(&[out]).expect("format").to_string()
}

#[test]
fn builds_one_batch_per_table_and_partition() {
    let batches = build("cpu,host=a u=1 10\nmem free=2i 20\ncpu,host=b u=3,x=\"s\" 30\ncpu,host=a u=4 86400000000001");
    let summary: Vec<_> = batches.iter().map(|b| (b.table.as_str(), b.partition, b.batch.num_rows())).collect();
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
    for (seq, body) in ["cpu,host=a u=1 10\ncpu,host=b u=1 10", "cpu,host=a u=2 20\ncpu,host=b u=2 20"].iter().enumerate() {
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
    let writes = ["cpu,host=a u=1,s=10 100\ncpu,host=b u=5 100", "cpu,host=a u=2 100", "cpu,host=a s=30 100"];
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
