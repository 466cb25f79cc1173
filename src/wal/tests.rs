//! WAL framing, group commit and replay: torn tails are cut at every possible byte, corruption
//! elsewhere stops replay, segments are removed only below the persisted sequence.

use super::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("test runtime")
}

fn write_records(config: &Config, payloads: &[Vec<u8>]) -> Vec<u64> {
    let (wal, handle) = Wal::start(config.clone(), 1).expect("start wal");
    let seqs = runtime().block_on(async {
        let mut seqs = Vec::new();
        for p in payloads {
            seqs.push(wal.append(KIND_LINE_PROTOCOL, p.clone(), true, None).await.expect("append"));
        }
        seqs
    });
    drop(wal);
    handle.join().expect("writer thread");
    seqs
}

fn replay_all(config: &Config) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    let mut got = Vec::new();
    replay(config, |seq, kind, payload| {
        assert_eq!(kind, KIND_LINE_PROTOCOL);
        got.push((seq, payload.to_vec()));
        Ok::<(), String>(())
    })?;
    Ok(got)
}

fn payloads(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("cpu,host=h{i} v={i}").into_bytes()).collect()
}

#[test]
fn round_trip_and_sequence_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_tests(dir.path().join("wal"));
    let seqs = write_records(&config, &payloads(5));
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    let got = replay_all(&config).expect("replay");
    assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), seqs);
    assert_eq!(got[3].1, b"cpu,host=h3 v=3");
}

#[test]
fn torn_tail_is_cut_at_every_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_tests(dir.path().join("wal"));
    let all = payloads(4);
    write_records(&config, &all);
    let segment = list_segments(&config.dir).expect("list")[0].path.clone();
    let full = fs::read(&segment).expect("read segment");
    // Record boundaries: header, then each record.
    let mut ends = vec![SEGMENT_HEADER_BYTES];
    for p in &all {
        ends.push(ends.last().expect("nonempty") + RECORD_HEADER_BYTES + p.len());
    }
    assert_eq!(*ends.last().expect("nonempty"), full.len());
    for cut in 0..full.len() {
        fs::write(&segment, &full[..cut]).expect("write cut");
        let got = replay_all(&config).expect("a torn tail is not an error");
        let complete = ends.iter().filter(|&&e| e <= cut).count().saturating_sub(1);
        assert_eq!(got.len(), complete, "cut at {cut}");
        if cut >= SEGMENT_HEADER_BYTES {
            assert_eq!(
                fs::metadata(&segment).expect("stat").len() as usize,
                ends[complete],
                "truncated at {cut}"
            );
        }
    }
}

#[test]
fn corruption_before_valid_records_is_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_tests(dir.path().join("wal"));
    write_records(&config, &payloads(4));
    let segment = list_segments(&config.dir).expect("list")[0].path.clone();
    let mut bytes = fs::read(&segment).expect("read");
    // Flip a bit inside the second record's payload.
    let offset = SEGMENT_HEADER_BYTES + (RECORD_HEADER_BYTES + 13) + RECORD_HEADER_BYTES + 2;
    bytes[offset] ^= 0x10;
    fs::write(&segment, &bytes).expect("write");
    let err = replay_all(&config).expect_err("mid-log corruption must stop replay");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert!(err.to_string().contains("refusing to start"), "{err}");
}

#[test]
fn corruption_in_an_older_segment_is_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_tests(dir.path().join("wal"));
    config.segment_bytes_max = 64; // one record per segment
    write_records(&config, &payloads(3));
    let segments = list_segments(&config.dir).expect("list");
    assert!(segments.len() >= 3, "{segments:?}");
    let mut bytes = fs::read(&segments[0].path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&segments[0].path, &bytes).expect("write");
    assert!(replay_all(&config).is_err());
}

#[test]
fn segments_are_removed_only_below_the_persisted_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_tests(dir.path().join("wal"));
    config.segment_bytes_max = 64;
    let (wal, handle) = Wal::start(config.clone(), 1).expect("start");
    runtime().block_on(async {
        for p in payloads(4) {
            wal.append(KIND_LINE_PROTOCOL, p, true, None).await.expect("append");
        }
    });
    // One record per segment: segments start at 1, 2, 3, 4 and 5 (open, empty). The writer
    // rotates after answering, so wait for the last rotation.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal.segment_count() < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(wal.segment_count(), 5);
    assert_eq!(wal.remove_segments_below(1).expect("remove"), 0);
    assert_eq!(wal.remove_segments_below(3).expect("remove"), 2);
    wal.remove_segments_below(u64::MAX).expect("remove");
    assert_eq!(wal.segment_count(), 1, "the open segment stays");
    drop(wal);
    handle.join().expect("writer");
    let got = replay_all(&config).expect("replay starts at the first remaining segment");
    assert!(got.iter().all(|(seq, _)| *seq >= 4), "{got:?}");
}

#[test]
fn apply_runs_in_sequence_order_before_the_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_tests(dir.path().join("wal"));
    let (wal, handle) = Wal::start(config, 1).expect("start");
    let seen = Arc::new(Mutex::new(Vec::new()));
    runtime().block_on(async {
        let mut answers = Vec::new();
        for (i, p) in payloads(20).into_iter().enumerate() {
            let seen = seen.clone();
            let wal = wal.clone();
            answers.push(tokio::spawn(async move {
                let apply: Apply = Box::new(move |seq| seen.lock().expect("lock").push(seq));
                wal.append(KIND_LINE_PROTOCOL, p, i % 3 != 0, Some(apply)).await.expect("append")
            }));
        }
        for a in answers {
            a.await.expect("task");
        }
    });
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, (1..=20).collect::<Vec<u64>>());
    drop(wal);
    handle.join().expect("writer");
}

/// The committed fixture decodes, and encoding the same records gives the same bytes.
/// `SUNDIAL_WRITE_FIXTURES=1` rewrites it (only when the format version changes).
#[test]
fn golden_fixture_decodes() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("storage-format/fixtures/wal-v1.wal");
    let payloads: [&[u8]; 2] = [
        b"\x03\x00\x00\x5e\xc8\x44\x0e\x97\x17\x07\x00fixturecpu,host=a usage=1.5 1700000000\n",
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x07\x00fixturemem free=7i\n",
    ];
    let mut expected = encode_segment_header(1).to_vec();
    for (i, p) in payloads.iter().enumerate() {
        encode_record(&mut expected, i as u64 + 1, KIND_LINE_PROTOCOL, p);
    }
    if std::env::var("SUNDIAL_WRITE_FIXTURES").is_ok() {
        fs::write(&path, &expected).expect("write fixture");
    }
    let stored = fs::read(&path).expect("fixture present");
    assert_eq!(stored, expected, "the WAL encoding changed: bump the format version");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_tests(dir.path().to_path_buf());
    fs::copy(&path, dir.path().join("00000000000000000001.wal")).expect("copy");
    let got = replay_all(&config).expect("replay");
    assert_eq!(
        got.iter().map(|(s, p)| (*s, p.as_slice())).collect::<Vec<_>>(),
        vec![(1, payloads[0]), (2, payloads[1])]
    );
}

/// A record written under a higher limit replays in full under a lower one (lowering
/// `--request-max` between restarts): the tail is not mistaken for a torn one.
#[test]
fn records_above_a_lowered_limit_still_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_tests(dir.path().join("wal"));
    let big = vec![b'x'; 64 << 10];
    write_records(&config, &[b"small".to_vec(), big.clone()]);
    config.record_bytes_max = 1 << 10;
    let got = replay_all(&config).expect("replay");
    assert_eq!(got.len(), 2, "the large last record is kept");
    assert_eq!(got[1].1, big);
}
