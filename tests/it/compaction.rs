//! Compaction (issue 13): a partition's many small files, overlapping ones among them
//! (overwritten and late points), become one file with the same answers, across restarts and a
//! crash at each of its crash points; `system.files` and `system.compactions` show it.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{eventually, parquet_files, Server};

/// 2023-11-15T00:00:00Z, in seconds: partitions long over, so compaction merges from two files.
const DAY0: i64 = 1_700_006_400;
const DAY_S: i64 = 86_400;

/// Compaction off: every write below becomes a file of its own.
const NO_COMPACTION: [&str; 4] = ["--persist-interval", "1s", "--compaction-interval", "0s"];
/// Compaction every second, replaced files deleted at the next run.
const COMPACTION: [&str; 6] =
    ["--persist-interval", "1s", "--compaction-interval", "1s", "--compaction-grace", "0s"];

fn args(flags: &[&str]) -> Vec<String> {
    flags.iter().map(|s| s.to_string()).collect()
}

async fn committed_files(server: &Server) -> i64 {
    let (status, body) =
        server.query_raw("c", "SELECT count(*) AS n FROM system.files", "json").await;
    // Before the first write the database does not exist.
    if status != 200 {
        return 0;
    }
    let rows: Vec<Value> = serde_json::from_str(&body).expect("json");
    rows[0]["n"].as_i64().expect("count")
}

/// Writes `body` and waits until it is in a file of its own (the count of committed files
/// grows).
async fn write_file(server: &Server, body: String) {
    let before = committed_files(server).await;
    let (status, text) = server.write("/write?db=c&precision=s", body).await;
    assert_eq!(status, 204, "{text}");
    assert!(
        eventually(Duration::from_secs(30), || async { committed_files(server).await > before })
            .await,
        "the write was persisted"
    );
}

/// Files in two partitions: day 0 has seven, one overwriting fields of points in another and
/// one of late points (both mark overlap), a new tag and a new field in later ones; day 1 two.
async fn write_many_files(server: &Server) {
    for k in 0..4 {
        let body = (0..20)
            .map(|i| format!("cpu,host=h{} u={k}.{i},n={i}i {}\n", i % 5, DAY0 + k * 100 + i))
            .collect();
        write_file(server, body).await;
    }
    // Overwrite one field of points in the first file; the other fields stay.
    let overwrite =
        (0..5).map(|i| format!("cpu,host=h{i} u=99 {}\n", DAY0 + i)).collect::<String>();
    write_file(server, overwrite).await;
    // Late points, between earlier ones of their series, and a point with a new tag.
    let late = (0..5).map(|i| format!("cpu,host=h{i} u=-1,s=\"late\" {}\n", DAY0 + 50 + i));
    write_file(server, late.chain([format!("cpu,host=h1,dc=x u=7 {}\n", DAY0 + 7)]).collect())
        .await;
    // A point written twice within one file, the later line winning.
    write_file(
        server,
        format!("cpu,host=h2 u=1 {t}\ncpu,host=h2 u=2,n=5i {t}\n", t = DAY0 + 5_000),
    )
    .await;
    for k in 0..2 {
        let body = (0..10)
            .map(|i| format!("cpu,host=h{i} u={k} {}\n", DAY0 + DAY_S + k * 10 + i))
            .collect();
        write_file(server, body).await;
    }
}

/// Answers that must not change when the files of `write_many_files` are compacted.
const QUERIES: [&str; 5] = [
    "SELECT host, dc, u, n, s, time FROM cpu ORDER BY host, dc, time",
    "SELECT count(*) AS n, sum(u) AS u, sum(n) AS s FROM cpu",
    "SELECT host, count(*) AS n, max(u) AS u FROM cpu GROUP BY host ORDER BY host",
    "SELECT u, n FROM cpu WHERE host = 'h2' AND time = to_timestamp(1700011400)",
    "SELECT count(*) AS n FROM cpu WHERE u = 99",
];

async fn answers(server: &Server, queries: &[&str]) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    for sql in queries {
        out.push(server.query("c", sql).await);
    }
    out
}

async fn files(server: &Server) -> Vec<Value> {
    server
        .query("c", "SELECT partition, rows, overlap, level FROM system.files ORDER BY partition")
        .await
}

#[tokio::test]
async fn small_and_overlapping_files_become_one_with_the_same_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::spawn(data.clone(), args(&NO_COMPACTION), Vec::new()).expect("starts");
    write_many_files(&server).await;
    let before = answers(&server, &QUERIES).await;
    assert_eq!(before[3][0]["u"], 2.0, "the later line of one write wins: {:?}", before[3]);
    assert_eq!(before[4][0]["n"], 5, "five points overwritten");
    assert_eq!(files(&server).await.len(), 9);
    assert_eq!(server.terminate(), Some(0));

    let mut server = Server::spawn(data.clone(), args(&COMPACTION), Vec::new()).expect("starts");
    assert!(
        eventually(Duration::from_secs(60), || async { files(&server).await.len() == 2 }).await,
        "each partition compacted to one file: {:?}\n{}",
        files(&server).await,
        server.stderr()
    );
    let after = files(&server).await;
    for file in &after {
        assert_eq!(file["overlap"], false, "{after:?}");
        assert_eq!(file["level"], 1, "{after:?}");
    }
    assert_eq!(after[0]["rows"], 4 * 20 + 5 + 1 + 1, "keys merged: {after:?}");
    assert_eq!(answers(&server, &QUERIES).await, before, "the same answers after compaction");
    let jobs = server
        .query(
            "c",
            "SELECT status, input_files, output_files, input_rows, output_rows FROM \
             system.compactions ORDER BY partition",
        )
        .await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!(jobs[0]["status"], "ok");
    assert_eq!(jobs[0]["input_files"], 7);
    assert_eq!(jobs[0]["output_files"], 1);
    assert_eq!(jobs[0]["input_rows"], 4 * 20 + 5 + 6 + 1);
    assert_eq!(jobs[0]["output_rows"], 4 * 20 + 5 + 1 + 1);
    assert_eq!(jobs[1]["input_files"], 2);
    // The replaced files are deleted once their grace period is over.
    assert!(
        eventually(Duration::from_secs(30), || async { parquet_files(&data).len() == 2 }).await,
        "{:?}",
        parquet_files(&data)
    );
    // Late data after compaction: the partition overlaps again, answers merge it, and the next
    // compaction clears it.
    let (status, _) =
        server.write("/write?db=c&precision=s", format!("cpu,host=h0 u=5 {}", DAY0 + 100)).await;
    assert_eq!(status, 204);
    let rows = server
        .query(
            "c",
            &format!(
                "SELECT u, n FROM cpu WHERE host = 'h0' AND time = to_timestamp({})",
                DAY0 + 100
            ),
        )
        .await;
    assert_eq!(rows, vec![serde_json::json!({"u": 5.0, "n": 0})]);
    assert!(
        eventually(Duration::from_secs(60), || async {
            let f = files(&server).await;
            f.len() == 2 && f[0]["level"] == 2 && f[0]["overlap"] == false
        })
        .await,
        "{:?}",
        files(&server).await
    );
    let totals = server.query("c", QUERIES[1]).await;
    assert_eq!(totals[0]["n"], before[1][0]["n"], "an overwrite adds no row");
    assert_eq!(server.terminate(), Some(0));
    let server = server.restart();
    assert_eq!(server.query("c", QUERIES[1]).await, totals, "the same after a restart");
    assert!(!server.stderr().contains("ERROR"), "{}", server.stderr());
}

/// Stops at `point` during the first compaction; after a restart every row is there once,
/// compaction completes, and only the files the manifest names stay on disk.
async fn crash_during_compaction(point: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::spawn(data.clone(), args(&NO_COMPACTION), Vec::new()).expect("starts");
    for k in 0..3 {
        let body =
            (0..10).map(|i| format!("cpu,host=h{i} u={k} {}\n", DAY0 + k * 10 + i)).collect();
        write_file(&server, body).await;
    }
    // One overwrite, so merging keys matters.
    write_file(&server, format!("cpu,host=h0 u=42 {DAY0}\n")).await;
    let queries = [
        "SELECT host, u, time FROM cpu ORDER BY host, time",
        "SELECT count(*) AS n, sum(u) AS u FROM cpu",
    ];
    let before = answers(&server, &queries).await;
    assert_eq!(before[1][0]["n"], 30);
    assert_eq!(server.terminate(), Some(0));

    let envs = vec![("SUNDIAL_CRASH_POINT".to_string(), point.to_string())];
    let mut crashing = Server::spawn(data.clone(), args(&COMPACTION), envs).expect("starts");
    assert!(crashing.wait_exit(Duration::from_secs(60)), "{point} reached");
    assert!(crashing.stderr().contains(&format!("crash point {point} reached")));

    // What the crash left, with compaction off: before the commit the four inputs, after it
    // the one output; the others were orphans, removed at the start.
    let mut server = Server::spawn(data.clone(), args(&NO_COMPACTION), Vec::new()).expect("starts");
    let (files_left, level) = match point {
        "compact_after_output_write" => (4, 0),
        _ => (1, 1),
    };
    let left = files(&server).await;
    assert_eq!(left.len(), files_left, "{point}: {left:?}");
    assert!(left.iter().all(|f| f["level"] == level), "{point}: {left:?}");
    assert_eq!(parquet_files(&data).len(), files_left, "{point}: orphans removed at the start");
    assert_eq!(
        answers(&server, &queries).await,
        before,
        "{point}: every row once, after the restart"
    );
    assert_eq!(server.terminate(), Some(0));

    let server = Server::spawn(data.clone(), args(&COMPACTION), Vec::new()).expect("starts");
    assert!(
        eventually(Duration::from_secs(60), || async {
            files(&server).await.len() == 1 && parquet_files(&data).len() == 1
        })
        .await,
        "{point}: compacted, replaced files gone: {:?} {:?}",
        files(&server).await,
        parquet_files(&data)
    );
    assert_eq!(answers(&server, &queries).await, before, "{point}: the same after compaction");
    assert!(!server.stderr().contains("ERROR"), "{point}: {}", server.stderr());
}

#[tokio::test]
async fn crash_after_compaction_output_is_written() {
    crash_during_compaction("compact_after_output_write").await;
}

#[tokio::test]
async fn crash_after_compaction_commit() {
    crash_during_compaction("compact_after_commit").await;
}

#[tokio::test]
async fn crash_while_deleting_replaced_files() {
    crash_during_compaction("compact_during_delete").await;
}
