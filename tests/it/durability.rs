//! Crash recovery for real: SIGKILL at seeded random moments under concurrent writers, named
//! crash points around persistence, torn and corrupt WAL files, clean shutdown.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::{client, eventually, parquet_files, Server};

const LINES_PER_BATCH: i64 = 50;

/// Counts rows per (writer, batch) tag pair.
async fn batch_counts(server: &Server, db: &str) -> BTreeMap<(i64, i64), i64> {
    let (status, body) = server
        .query_raw(
            db,
            "SELECT writer, batch, count(*) AS n FROM crash GROUP BY writer, batch",
            "json",
        )
        .await;
    if status == 404 || (status == 400 && body.contains("not found")) {
        return BTreeMap::new();
    }
    assert_eq!(status, 200, "{body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).expect("json");
    rows.iter()
        .map(|r| {
            let n = |k: &str| {
                r[k].as_str()
                    .and_then(|s| s.parse().ok())
                    .or_else(|| r[k].as_i64())
                    .expect("number")
            };
            ((n("writer"), n("batch")), n("n"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_write() {
    let iterations: u64 =
        std::env::var("SUNDIAL_CRASH_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let seed: u64 = std::env::var("SUNDIAL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("crash test seed {seed} (rerun with SUNDIAL_CRASH_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A small buffer and segment size so persistence and WAL truncation run during the test.
    let args =
        ["--buffer-memory-max", "2MiB", "--wal-segment-size", "256KiB", "--persist-interval", "2s"];
    let mut server = Server::start(&data, &args);
    let acked: Arc<Mutex<Vec<(i64, i64)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut next_batch = 0i64;
    for iteration in 0..iterations {
        let writers = 3;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for writer in 0..writers {
            let url = server.url("/api/v3/write_lp?db=crash&precision=ns");
            let acked = acked.clone();
            let stop = stop.clone();
            let first = next_batch + writer * 1_000;
            tasks.push(tokio::spawn(async move {
                let mut batch = first;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body: String = (0..LINES_PER_BATCH)
                        .map(|i| {
                            format!(
                                "crash,writer={writer},batch={batch} v={i}i,pad=\"{}\" {}\n",
                                "p".repeat(40),
                                batch * 1_000 + i
                            )
                        })
                        .collect();
                    match client().post(&url).body(body).send().await {
                        Ok(r) if r.status() == 204 => {
                            acked.lock().expect("lock").push((writer, batch))
                        }
                        Ok(r) if r.status() == 503 => {
                            tokio::time::sleep(Duration::from_millis(5)).await
                        }
                        Ok(r) => panic!("unexpected status {} (seed {seed})", r.status()),
                        Err(_) => break, // the server died under us: this batch is unacknowledged
                    }
                    batch += 1;
                }
            }));
        }
        let delay = rng.u64(20..400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            t.await.expect("writer task");
        }
        next_batch += writers * 1_000;
        server = server.restart();
        let counts = batch_counts(&server, "crash").await;
        let acked_now = acked.lock().expect("lock").clone();
        for key in &acked_now {
            assert_eq!(
                counts.get(key),
                Some(&LINES_PER_BATCH),
                "iteration {iteration}: acknowledged batch {key:?} (seed {seed})"
            );
        }
        for (key, n) in &counts {
            assert_eq!(
                *n, LINES_PER_BATCH,
                "iteration {iteration}: batch {key:?} is half present (seed {seed})"
            );
        }
    }
    assert!(
        acked.lock().expect("lock").len() > iterations as usize,
        "the writers made progress (seed {seed})"
    );
    assert!(!parquet_files(&data).is_empty(), "persistence ran during the test (seed {seed})");
}

async fn crash_at_point(point: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::start_with_env(
        &data,
        &["--persist-interval", "1s"],
        &[("SUNDIAL_CRASH_POINT", point)],
    );
    let body: String =
        (0..100).map(|i| format!("m,host=h{} v={i} {}\n", i % 10, 1_000 + i)).collect();
    assert_eq!(server.write("/write?db=cp&precision=s", body).await.0, 204);
    assert!(server.wait_exit(Duration::from_secs(30)), "the server reached {point} and aborted");
    assert!(server.stderr().contains(&format!("crash point {point} reached")));
    let server = server.restart();
    assert_eq!(
        server.count("cp", "SELECT count(*) FROM m").await,
        100,
        "{point}: every row exactly once"
    );
    assert_eq!(server.count("cp", "SELECT count(DISTINCT v) FROM m").await, 100);
    // Persisting again after recovery still yields every row once.
    assert!(
        eventually(Duration::from_secs(30), || async { !parquet_files(&data).is_empty() }).await
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            server.count("cp", "SELECT count(*) FROM m").await == 100
        })
        .await
    );
}

#[tokio::test]
async fn crash_between_parquet_write_and_manifest_commit() {
    crash_at_point("persist_after_parquet_write").await;
}

#[tokio::test]
async fn crash_after_manifest_commit_before_buffer_release() {
    crash_at_point("persist_after_manifest_commit").await;
}

#[tokio::test]
async fn crash_after_wal_write_before_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server =
        Server::start_with_env(&data, &[], &[("SUNDIAL_CRASH_POINT", "wal_before_sync")]);
    let result = client().post(server.url("/write?db=ws")).body("m v=1 1").send().await;
    assert!(
        result.is_err() || result.expect("response").status() != 204,
        "an unsynced write is never acknowledged"
    );
    assert!(server.wait_exit(Duration::from_secs(30)));
    let server = server.restart();
    // Written but not synced: after a process crash the OS still has it, so it may be there;
    // what matters is that it is whole.
    let (status, body) = server.query_raw("ws", "SELECT count(*) AS n FROM m", "json").await;
    assert!(status == 200 || status == 404, "{status} {body}");
}

fn wal_segments(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut segments: Vec<_> = std::fs::read_dir(data.join("wal"))
        .expect("wal dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segments.sort();
    segments
}

#[tokio::test]
async fn torn_wal_tail_is_cut_and_corruption_stops_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    for i in 0..5 {
        assert_eq!(server.write("/write?db=t", format!("m,i={i} v=1 {i}")).await.0, 204);
    }
    server.kill9();
    // A torn tail: half a record header after the last good record.
    let segments = wal_segments(&data);
    let last = segments
        .iter()
        .rev()
        .find(|p| std::fs::metadata(p).map(|m| m.len() > 32).unwrap_or(false))
        .expect("a segment with records")
        .clone();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .expect("open")
        .write_all(&[0x20, 0, 0, 0, 0xde, 0xad])
        .expect("append");
    // Remove newer (empty) segments so the torn one is the last.
    for s in segments.iter().filter(|s| **s > last) {
        std::fs::remove_file(s).expect("remove");
    }
    let mut server = server.restart();
    assert_eq!(server.count("t", "SELECT count(*) FROM m").await, 5);
    assert!(server.stderr().contains("cutting torn wal tail"), "{}", server.stderr());
    server.kill9();

    // Corruption in the middle: flip a byte in the first record's payload.
    let segments = wal_segments(&data);
    let first = segments
        .iter()
        .find(|p| std::fs::metadata(p).map(|m| m.len() > 32).unwrap_or(false))
        .expect("segment")
        .clone();
    let mut bytes = std::fs::read(&first).expect("read");
    bytes[32 + 17 + 12] ^= 0xff;
    std::fs::write(&first, &bytes).expect("write");
    let failure = Server::spawn(data.clone(), Vec::new(), Vec::new())
        .err()
        .expect("startup must refuse a corrupt WAL");
    assert!(
        failure.contains("corrupt wal segment") && failure.contains("refusing to start"),
        "{failure}"
    );
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly_and_restart_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    let body: String = (0..1000).map(|i| format!("m,host=h{} v={i} {i}\n", i % 7)).collect();
    assert_eq!(server.write("/write?db=st", body).await.0, 204);
    assert_eq!(server.terminate(), Some(0));
    assert!(server.stderr().contains("shutdown complete"));
    let server = server.restart();
    assert_eq!(server.count("st", "SELECT count(*) FROM m").await, 1000);
}

/// Issue 10.3, as reproduced: a drop in a database its first write created, then the table
/// rewritten with another type, then SIGTERM (which persists) or SIGKILL (which does not):
/// the server comes up every time, with only the row written after the drop.
#[tokio::test]
async fn restart_after_drop_and_retyped_rewrite_in_an_implicit_database() {
    for kill in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut server = Server::start(&data, &[]);
        assert_eq!(server.write("/write?db=fresh", "gone,host=a v=1 1000").await.0, 204);
        let (status, body) = server.execute("fresh", "DROP TABLE gone").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(server.write("/write?db=fresh", "gone,host=a v=1i 2000").await.0, 204);
        if kill {
            server.kill9();
        } else {
            assert_eq!(server.terminate(), Some(0));
        }
        let mut server = server.restart();
        let rows = server.query("fresh", "SELECT v, time FROM gone").await;
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["v"], 1, "the integer row written after the drop");
        let (status, body) = server.execute("fresh", "DROP TABLE gone").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(server.terminate(), Some(0));
        let server = server.restart();
        let (status, body) = server.query_raw("fresh", "SELECT 1 AS one", "json").await;
        assert_eq!(status, 200, "the database outlives its last table: {body}");
    }
}

/// Issue 10.4: names of any characters (but control characters) up to the catalog's limit
/// are stored, persisted and read back after a restart; files are named by ids.
#[tokio::test]
async fn any_name_is_persisted_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    let long = "n".repeat(300);
    let longest = "m".repeat(512);
    let names = [
        "cpu#1",
        "température",
        "a%b",
        "q?x",
        "%25",
        "my-table.v1/x",
        r"back\slash",
        "..",
        "Ω ≈ ç",
        long.as_str(),
        longest.as_str(),
    ];
    for (i, name) in names.iter().enumerate() {
        // Line protocol escapes spaces and commas in a measurement.
        let measurement = name.replace(' ', r"\ ").replace(',', r"\,");
        let line = format!("{measurement},host=h v={i} {}", 1_000 + i);
        let (status, body) = server.write("/write?db=names", line).await;
        assert_eq!(status, 204, "{name}: {body}");
    }
    let too_long = format!("{} v=1 1", "x".repeat(513));
    let (status, body) = server.write("/write?db=names", too_long).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("longer than 512 bytes"), "{body}");

    assert_eq!(server.terminate(), Some(0));
    let files = parquet_files(&data);
    assert_eq!(files.len(), names.len(), "each table persisted at shutdown: {files:?}");
    for file in &files {
        let relative = file.strip_prefix(&data).expect("under the data directory");
        assert!(
            relative.to_str().is_some_and(|p| p.bytes().all(|b| b.is_ascii_graphic())),
            "a file path of ids and numbers only: {relative:?}"
        );
    }
    let server = server.restart();
    for (i, name) in names.iter().enumerate() {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let rows = server.query("names", &format!("SELECT v FROM {quoted}")).await;
        assert_eq!(rows.len(), 1, "{name}: {rows:?}");
        assert_eq!(rows[0]["v"], i as f64, "{name}");
    }
    assert!(!server.stderr().contains("ERROR"), "{}", server.stderr());
}

/// Issue 10.8: restarting with another --partition-duration (or a lower --request-max) keeps
/// every acknowledged row exactly once, also when rows are both in a file and in the WAL.
#[tokio::test]
async fn flags_changed_between_restarts_keep_every_row_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::start_with_env(
        &data,
        &["--partition-duration", "1d", "--persist-interval", "1s"],
        &[("SUNDIAL_CRASH_POINT", "persist_after_manifest_commit")],
    );
    let hour = 3_600_000_000_000i64;
    // 48 hours in two days, and a write larger than the later --request-max.
    let mut body: String = (0..48).map(|h| format!("m,host=a v={h} {}\n", h * hour)).collect();
    body.extend((0..20_000).map(|i| format!("m,host=b v={i} {}\n", 1 + i)));
    assert!(body.len() > 300 << 10);
    assert_eq!(server.write("/write?db=f", body).await.0, 204);
    // The first file is committed, then the server dies: its rows are in a file and the WAL.
    assert!(server.wait_exit(Duration::from_secs(30)), "the crash point was reached");
    assert_eq!(parquet_files(&data).len(), 1);
    let args = ["--partition-duration", "1h", "--request-max", "100KiB"];
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut server = Server::spawn(data.clone(), args, Vec::new()).expect("starts, other flags");
    assert_eq!(server.count("f", "SELECT count(*) FROM m").await, 20_048);
    assert!(server.stderr().contains("keeping the stored one"), "{}", server.stderr());
    assert_eq!(server.terminate(), Some(0));
    let server = server.restart();
    assert_eq!(server.count("f", "SELECT count(*) FROM m").await, 20_048, "after persisting");
    let rows = server
        .query("f", "SELECT count(DISTINCT date_bin(INTERVAL '1 day', time)) AS days FROM m")
        .await;
    assert_eq!(rows[0]["days"], 2);
}

/// Issue 10.8: a full disk (injected: write(2) or fsync fails with ENOSPC) refuses writes with
/// 503 and `/health` fails, with no server path in either; once the disk has room the WAL
/// cuts back to what is on disk and writes again without a restart. A server also starts on
/// a full disk. After SIGKILL every acknowledged row is there and no refused one.
#[tokio::test]
async fn a_full_disk_refuses_writes_until_it_has_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let faults = dir.path().join("faults");
    std::fs::create_dir_all(&faults).expect("faults dir");
    let env = [("SUNDIAL_FAULT_DIR", faults.to_str().expect("utf-8"))];
    // Full from the start: the server comes up and answers queries.
    std::fs::write(faults.join("wal_write"), b"").expect("fault");
    let mut server = Server::start_with_env(&data, &[], &env);
    let health = || async {
        let response = client().get(server.url("/health")).send().await.expect("health");
        (response.status().as_u16(), response.text().await.expect("body"))
    };
    let write = |line: &'static str| server.write("/api/v3/write_lp?db=disk", line);
    let (status, body) = write("m,k=refused0 v=0 1").await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = health().await;
    assert_eq!(status, 503);
    assert!(body.contains("\"fail\"") && body.contains("No space left"), "{body}");
    let root = data.to_str().expect("utf-8");
    assert!(!body.contains(root), "no server path in answers: {body}");
    std::fs::remove_file(faults.join("wal_write")).expect("room again");
    let written = |line: &'static str| async move {
        eventually(Duration::from_secs(10), || async { write(line).await.0 == 204 }).await
    };
    assert!(written("m,k=a v=1 1").await);
    assert_eq!(health().await.0, 200);

    // fsync fails: the write is refused, a no_sync write before it stays (it was answered).
    std::fs::write(faults.join("wal_sync"), b"").expect("fault");
    let (status, _) = server.write("/api/v3/write_lp?db=disk&no_sync=true", "m,k=f v=1 1").await;
    assert_eq!(status, 204, "no_sync is answered after write(2)");
    let (status, body) = write("m,k=refused1 v=1 1").await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains(root), "{body}");
    assert_eq!(health().await.0, 503);
    std::fs::remove_file(faults.join("wal_sync")).expect("room again");
    assert!(written("m,k=c v=1 1").await);

    // write(2) fails mid-log.
    std::fs::write(faults.join("wal_write"), b"").expect("fault");
    assert_eq!(write("m,k=refused2 v=1 1").await.0, 503);
    std::fs::remove_file(faults.join("wal_write")).expect("room again");
    assert!(written("m,k=e v=1 1").await);
    assert_eq!(health().await.0, 200);

    // Killed while failed, before any retry: the refused write is not replayed.
    std::fs::write(faults.join("wal_sync"), b"").expect("fault");
    assert_eq!(write("m,k=refused3 v=1 1").await.0, 503);
    server.kill9();
    std::fs::remove_file(faults.join("wal_sync")).expect("room again");
    let server = server.restart();
    let rows = server.query("disk", "SELECT k FROM m ORDER BY k").await;
    let keys: Vec<&str> = rows.iter().map(|r| r["k"].as_str().expect("k")).collect();
    assert_eq!(keys, ["a", "c", "e", "f"]);
}

/// Manifest commit paths and the Parquet files they name, read from the store.
fn committed_files(data: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let log = data.join("objects/manifest/log");
    let mut files = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(log).expect("manifest log").flatten() {
        let commit: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entry.path()).expect("commit")).expect("json");
        for op in commit["ops"].as_array().expect("ops") {
            if op["op"] == "add_file" {
                let path = op["file"]["path"].as_str().expect("path");
                files.insert(data.join("objects").join(path));
            }
        }
    }
    files
}

/// Issue 10.8: a manifest commit whose sync fails (the object may exist) does not wedge every
/// later commit as "fenced"; once syncs work again persistence goes on, and the Parquet files
/// the failed attempts left are removed at the next start.
#[tokio::test]
async fn a_failed_manifest_sync_does_not_wedge_later_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let faults = dir.path().join("faults");
    std::fs::create_dir_all(&faults).expect("faults dir");
    let env = [("SUNDIAL_FAULT_DIR", faults.to_str().expect("utf-8"))];
    let mut server = Server::start_with_env(&data, &["--persist-interval", "1s"], &env);
    assert_eq!(server.write("/write?db=mf", "m,host=a v=1 1").await.0, 204);
    assert!(
        eventually(Duration::from_secs(20), || async { parquet_files(&data).len() == 1 }).await
    );

    std::fs::write(faults.join("store_sync_manifest"), b"").expect("fault");
    assert_eq!(server.write("/write?db=mf", "m,host=b v=2 2").await.0, 204);
    // Persist attempts write a file, then fail to commit it.
    assert!(
        eventually(Duration::from_secs(20), || async { parquet_files(&data).len() >= 3 }).await
    );
    assert!(server.stderr().contains("store_sync") || server.stderr().contains("No space left"));
    std::fs::remove_file(faults.join("store_sync_manifest")).expect("syncs work again");
    assert!(
        eventually(Duration::from_secs(20), || async { committed_files(&data).len() == 2 }).await,
        "the next commit succeeds: {}",
        server.stderr()
    );
    assert!(!server.stderr().contains("another server is writing"), "{}", server.stderr());
    assert_eq!(server.count("mf", "SELECT count(*) FROM m").await, 2);
    assert_eq!(server.terminate(), Some(0));
    let server = server.restart();
    assert_eq!(server.count("mf", "SELECT count(*) FROM m").await, 2);
    let on_disk: std::collections::BTreeSet<_> = parquet_files(&data).into_iter().collect();
    assert_eq!(on_disk, committed_files(&data), "orphans removed, every committed file kept");
}
