//! Engine round trips in-process: write, persist, reopen (manifest + WAL replay), dedup.

use super::*;

fn options() -> WriteOptions {
    WriteOptions {
        precision: Precision::Nanosecond,
        accept_partial: true,
        no_sync: false,
        default_time_ns: 1_000,
    }
}

fn rows(engine: &Engine, table: &str) -> (usize, usize) {
    let snap = engine.snapshot("db", table, i64::MIN, i64::MAX).expect("table exists");
    let buffered = snap.partitions.iter().flat_map(|p| &p.batches).map(|b| b.num_rows()).sum();
    let persisted = snap.files.iter().map(|f| f.rows as usize).sum();
    (buffered, persisted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_rows_in_parquet_and_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_tests(dir.path().to_path_buf());
    let engine = Engine::open(config.clone()).await.expect("open");
    engine.write_lp("db", b"cpu,host=a u=1 10\ncpu,host=b u=2 10", options()).await.expect("write");
    assert_eq!(engine.persist_all().await.expect("persist"), 1);
    engine.write_lp("db", b"cpu,host=a u=3 20\nmem free=1i 5", options()).await.expect("write");
    assert_eq!(rows(&engine, "cpu"), (1, 2));
    engine.close();
    drop(engine);

    let engine = Engine::open(config.clone()).await.expect("reopen");
    assert_eq!(rows(&engine, "cpu"), (1, 2), "persisted rows are not replayed again");
    assert_eq!(rows(&engine, "mem"), (1, 0));
    // Persist everything, restart: nothing left to replay, and the WAL holds no old segments.
    engine.persist_all().await.expect("persist");
    engine.close();
    drop(engine);
    let engine = Engine::open(config).await.expect("reopen again");
    assert_eq!(rows(&engine, "cpu"), (0, 3));
    assert_eq!(rows(&engine, "mem"), (0, 1));
    engine.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_lines_leave_no_trace_without_accept_partial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(Config::for_tests(dir.path().to_path_buf())).await.expect("open");
    let strict = WriteOptions { accept_partial: false, ..options() };
    let err =
        engine.write_lp("db", b"cpu u=1 1\ncpu u=2i 2", strict).await.expect_err("type conflict");
    match err {
        Error::Rejected(rejected) => assert_eq!(rejected.lines[0].line_number, 2),
        other => panic!("unexpected {other}"),
    }
    assert!(engine.catalog().table("db", "cpu").is_none(), "nothing of the request was stored");
    let outcome =
        engine.write_lp("db", b"cpu u=1 1\ncpu u=2i 2", options()).await.expect("partial");
    assert_eq!((outcome.lines_stored, outcome.rejected.total), (1, 1));
    engine.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_durable_writes_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(Config::for_tests(dir.path().to_path_buf())).await.expect("open");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    engine.subscribe(Arc::new(move |w: &CommittedWrite<'_>| {
        let rows: usize = w.tables.iter().map(|(_, b)| b.num_rows()).sum();
        sink.lock().expect("lock").push((w.seq, rows));
    }));
    engine.write_lp("db", b"cpu u=1 1\ncpu u=2 2", options()).await.expect("write");
    engine.write_lp("db", b"mem u=1 1", options()).await.expect("write");
    assert_eq!(*seen.lock().expect("lock"), vec![(1, 2), (2, 1)]);
    engine.close();
}

/// The committed WAL and manifest fixtures load into a working engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_format_fixtures_load() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("storage-format/fixtures");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("wal")).expect("wal dir");
    std::fs::copy(root.join("wal-v1.wal"), dir.path().join("wal/00000000000000000001.wal"))
        .expect("copy wal");
    let log = dir.path().join("objects/manifest/log");
    std::fs::create_dir_all(&log).expect("log dir");
    std::fs::copy(root.join("manifest-commit-v1.json"), log.join("00000000000000000001.json"))
        .expect("copy manifest");
    std::fs::copy(
        root.join("manifest-commit-v1-views.json"),
        log.join("00000000000000000002.json"),
    )
    .expect("copy manifest");
    std::fs::copy(
        root.join("manifest-commit-v1-compaction.json"),
        log.join("00000000000000000003.json"),
    )
    .expect("copy manifest");
    std::fs::copy(
        root.join("manifest-commit-v1-retention.json"),
        log.join("00000000000000000004.json"),
    )
    .expect("copy manifest");
    let engine = Engine::open(Config::for_tests(dir.path().to_path_buf())).await.expect("open");
    let catalog = engine.catalog();
    assert!(catalog.has_database("telegraf"));
    let views: Vec<_> = catalog.views("db").map(|v| v.name.clone()).collect();
    assert_eq!(views, ["cpu_1m"]);
    let view = catalog.view("db", "cpu_1m").expect("view");
    assert!(view.id > 0);
    crate::views::definition::from_sql(&view.sql).expect("a stored definition parses");
    let cpu = catalog.table("db", "cpu").expect("cpu from the manifest");
    assert_eq!(cpu.columns().len(), 6);
    // Commit 3 replaced the file by a compaction's output.
    let files = engine.snapshot("db", "cpu", i64::MIN, i64::MAX).expect("cpu").files;
    assert_eq!(files.len(), 1);
    assert_eq!((files[0].level, files[0].bytes, files[0].overlap), (1, 1300, false));
    assert!(files[0].path.contains("-c9f3a01bc-1-"), "{}", files[0].path);
    // Commit 4: 30 days for the database, forever for cpu, cpu's rows before 2023-07-22 gone.
    use crate::catalog::Retention;
    let thirty_days = Retention::PeriodNs(30 * 86_400 * 1_000_000_000);
    assert_eq!(catalog.retention_setting("db", None), Some(thirty_days));
    assert_eq!(catalog.retention("db", "cpu"), Retention::Infinite);
    assert_eq!(catalog.expired_before("db", "cpu"), Some(1_690_000_000_000_000_000));
    assert_eq!(catalog.cutoff("db", "cpu", i64::MAX), Some(1_690_000_000_000_000_000));
    // The WAL's records are for database "fixture", which no file covers: both replay.
    let fixture = engine.snapshot("fixture", "cpu", i64::MIN, i64::MAX).expect("replayed cpu");
    assert_eq!(
        fixture.partitions.iter().flat_map(|p| &p.batches).map(|b| b.num_rows()).sum::<usize>(),
        1
    );
    assert!(engine.snapshot("fixture", "mem", i64::MIN, i64::MAX).is_some());
    engine.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_tables_outlive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_tests(dir.path().to_path_buf());
    let engine = Engine::open(config.clone()).await.expect("open");
    engine.create_database("db").await.expect("database");
    let columns = vec![
        Column { name: "city".into(), kind: crate::catalog::ColumnKind::Tag },
        Column {
            name: "temp".into(),
            kind: crate::catalog::ColumnKind::Field(crate::catalog::FieldType::Float),
        },
    ];
    assert!(engine.create_table("db", "weather", columns.clone(), false).await.expect("create"));
    assert!(matches!(
        engine.create_table("db", "weather", columns.clone(), false).await,
        Err(Error::TableExists(_))
    ));
    assert!(!engine.create_table("db", "weather", columns, true).await.expect("if not exists"));
    engine.close();
    drop(engine);
    let engine = Engine::open(config).await.expect("reopen");
    let table = engine.catalog().table("db", "weather").cloned().expect("declared table survives");
    assert_eq!(table.columns().len(), 2);
    let err = engine
        .write_lp(
            "db",
            b"weather,city=oslo temp=\"warm\" 1",
            WriteOptions { accept_partial: false, ..options() },
        )
        .await;
    assert!(matches!(err, Err(Error::Rejected(_))), "declared types hold");
    engine.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_tables_stay_dropped_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_tests(dir.path().to_path_buf());
    let engine = Engine::open(config.clone()).await.expect("open");
    engine.write_lp("db", b"cpu,host=a u=1 10\nmem free=1i 5", options()).await.expect("write");
    engine.persist_all().await.expect("persist");
    engine.write_lp("db", b"cpu,host=a u=2 20", options()).await.expect("write");
    let files = engine.snapshot("db", "cpu", i64::MIN, i64::MAX).expect("cpu").files;
    assert_eq!(files.len(), 1);
    let file_path = dir.path().join("objects").join(&files[0].path);
    assert!(file_path.exists());

    assert!(engine.drop_table("db", "cpu").await.expect("drop"));
    assert!(!engine.drop_table("db", "cpu").await.expect("second drop finds nothing"));
    assert!(engine.catalog().table("db", "cpu").is_none());
    assert!(!file_path.exists(), "the dropped table's file is deleted");
    // Recreated with another type for `u`: the old rows and schema are gone for good.
    engine.write_lp("db", b"cpu,host=b u=\"text\" 30", options()).await.expect("recreate");
    engine.close();
    drop(engine);

    let engine = Engine::open(config.clone()).await.expect("reopen");
    assert_eq!(rows(&engine, "cpu"), (1, 0), "only the row written after the drop replays");
    assert_eq!(rows(&engine, "mem"), (0, 1));
    assert!(engine.drop_database("db").await.expect("drop database"));
    assert!(!engine.catalog().has_database("db"));
    engine.close();
    drop(engine);

    let engine = Engine::open(config).await.expect("reopen after dropping the database");
    assert!(!engine.catalog().has_database("db"), "no WAL record brings the database back");
    engine
        .write_lp("db", b"cpu,host=c u=1 40", options())
        .await
        .expect("a new database of the same name");
    assert_eq!(rows(&engine, "cpu"), (1, 0));
    engine.close();
}

/// Buffered rows sorted by series answer tag-filtered queries exactly as before, late and
/// repeated points included; a sorted run is not sorted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_buffers_answer_like_unsorted_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_tests(dir.path().to_path_buf());
    config.sort_rows_min = 8;
    let engine = Engine::open(config).await.expect("open");
    let alerts = crate::alerts::Alerts::open(
        dir.path(),
        crate::alerts::Config::for_tests(),
        engine.config().clock.clone(),
    )
    .expect("alerts");
    let queries =
        crate::query::QueryEngine::new(engine.clone(), crate::query::Config::for_tests(), alerts)
            .expect("query engine");
    let bodies = [
        "cpu,host=b,dc=x u=1 30\ncpu,host=a,dc=y u=2 10\ncpu,host=c,dc=x u=3 20\ncpu,host=a,dc=x u=4 20",
        "cpu,host=a,dc=x u=5 40\ncpu,dc=x u=6 40\ncpu,host=b,dc=x u=7 30\ncpu,host=c,dc=x u=8 10",
        "cpu,host=c,dc=x,rack=r u=9 50\ncpu,host=a,dc=x u=10 5\ncpu,host=b,dc=y u=11 60",
    ];
    let sql = [
        "SELECT host, dc, u, time FROM cpu WHERE host = 'a' ORDER BY time, dc",
        "SELECT host, dc, u, time FROM cpu WHERE host IN ('c', 'b', 'zz') AND dc = 'x' ORDER BY host, time",
        "SELECT host, rack, u FROM cpu WHERE rack = 'r'",
        "SELECT count(*), sum(u) FROM cpu WHERE host IN ('a', 'b', 'c')",
        "SELECT count(*) FROM cpu WHERE host = 'nope'",
    ];
    let answers = || async {
        let mut out = Vec::new();
        for q in sql {
            let (schema, batches) = queries.sql("db", q).await.expect("query");
            let plain = crate::query::plain(&schema, &batches).expect("plain").1;
            out.push(
                arrow::util::pretty::pretty_format_batches(&plain).expect("format").to_string(),
            );
        }
        out
    };
    for body in bodies {
        engine.write_lp("db", body.as_bytes(), options()).await.expect("write");
    }
    let before = answers().await;
    assert!(
        before[0].contains("| a    | x  | 10.0 |") && before[1].contains("| b    | x  | 7.0"),
        "{before:?}"
    );
    assert_eq!(engine.sort_buffers().await.expect("sort"), 1);
    let snap = engine.snapshot("db", "cpu", i64::MIN, i64::MAX).expect("table");
    let sorted: Vec<_> = snap
        .partitions
        .iter()
        .flat_map(|p| &p.batches)
        .map(|b| (b.num_rows(), crate::buffer::sort::is_sorted(b)))
        .collect();
    assert_eq!(sorted, [(8, true), (3, false)], "the first two writes sorted as one run");
    assert_eq!(answers().await, before);
    // The point (b, x, 30) again: the later write wins, sorted or not.
    engine.write_lp("db", b"cpu,host=b,dc=x u=70 30\ncpu,host=a,dc=x u=12 60\ncpu,host=d,dc=x u=1 1\ncpu,host=d,dc=x u=2 2\ncpu,host=a,dc=y u=3 3", options()).await.expect("write");
    let late = answers().await;
    assert!(late[1].contains("| b    | x  | 70.0") && !late[1].contains("| 7.0 "), "{late:?}");
    assert_eq!(engine.sort_buffers().await.expect("sort"), 1);
    assert_eq!(engine.sort_buffers().await.expect("sort"), 0, "nothing left to sort");
    assert_eq!(answers().await, late);
    engine.close();
}

#[tokio::test]
async fn a_flood_of_bad_lines_gets_a_bounded_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(Config::for_tests(dir.path().to_path_buf())).await.expect("open");
    let body = "not line protocol\n".repeat(50_000) + "m v=1 1\n";
    let options = WriteOptions {
        precision: Precision::Nanosecond,
        accept_partial: true,
        no_sync: false,
        default_time_ns: 0,
    };
    let outcome = engine.write_lp("db", body.as_bytes(), options).await.expect("partial write");
    assert_eq!(outcome.lines_stored, 1);
    assert_eq!(outcome.rejected.total, 50_000);
    assert_eq!(outcome.rejected.lines.len(), REJECTED_LINES_MAX);
    assert_eq!(outcome.rejected.lines[0].line_number, 1);
    assert!(outcome.rejected.summary().contains("the first 100 listed"));
    engine.close();
}

/// A database created by its first write is recorded like one created explicitly: a drop in
/// it is durable, and a restart after drop + rewrite with another type comes up (issue 10.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_in_an_implicit_database_survive_restarts() {
    for persist_before_restart in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::for_tests(dir.path().to_path_buf());
        let engine = Engine::open(config.clone()).await.expect("open");
        engine.write_lp("db", b"gone,host=a v=1 10\nkept v=1 10", options()).await.expect("write");
        assert!(engine.drop_table("db", "gone").await.expect("drop"));
        engine.write_lp("db", b"gone,host=a v=1i 20", options()).await.expect("rewrite");
        if persist_before_restart {
            engine.persist_all().await.expect("persist");
        }
        engine.close();
        drop(engine);

        let engine = Engine::open(config.clone()).await.expect("restart after drop + rewrite");
        let (buffered, persisted) = rows(&engine, "gone");
        assert_eq!(buffered + persisted, 1, "only the row written after the drop");
        let (buffered, persisted) = rows(&engine, "kept");
        assert_eq!(buffered + persisted, 1);
        // Drop the only table: the database itself stays, across a restart too.
        engine.drop_table("db", "gone").await.expect("drop");
        engine.drop_table("db", "kept").await.expect("drop");
        engine.persist_all().await.expect("persist");
        engine.close();
        drop(engine);
        let engine = Engine::open(config).await.expect("restart");
        assert!(engine.catalog().has_database("db"), "the database outlives its tables");
        assert!(engine.catalog().table("db", "gone").is_none());
        engine.close();
    }
}

/// WAL records an earlier version wrote are read back although today's writes refuse such
/// lines (a string over 1 MiB, a tag value ending in a backslash): a restart after an upgrade
/// comes up with every acknowledged row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_earlier_versions_replay_under_their_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_tests(dir.path().to_path_buf());
    let long = "x".repeat(crate::line_protocol::STRING_BYTES_MAX + 1);
    let lines = format!("old,host=a s=\"{long}\" 10\nold,host=b\\\\ v=1 20\n");
    // Today's write path refuses both lines.
    let engine = Engine::open(config.clone()).await.expect("open");
    let refused = engine.write_lp("db", lines.as_bytes(), options()).await;
    assert!(matches!(refused, Err(Error::Rejected(r)) if r.total == 2), "both refused");
    engine.close();
    drop(engine);
    // An earlier version logged them.
    let wal_config = crate::wal::Config {
        dir: dir.path().join("wal"),
        segment_bytes_max: config.wal_segment_bytes_max,
        record_bytes_max: config.wal_record_bytes_max,
        queue_len_max: 4,
        sync: true,
    };
    let (wal, thread) = crate::wal::Wal::start(wal_config, 1).expect("wal");
    let payload = super::record::LpRecord {
        precision: Precision::Nanosecond,
        default_time_ns: 0,
        database: "db",
        lines: lines.as_bytes(),
    }
    .encode();
    wal.append(crate::wal::KIND_LINE_PROTOCOL, payload, true, None).await.expect("append");
    drop(wal);
    thread.join().expect("wal thread");
    let engine = Engine::open(config).await.expect("an upgrade comes up");
    assert_eq!(rows(&engine, "old"), (2, 0));
    engine.close();
}
