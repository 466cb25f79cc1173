//! Compaction (issue 13): `hosts` × `hours` of the cpu-only set persisted in small chunks (a
//! small buffer, compaction off), the query suite on those files, then a restart with
//! compaction on: its wall time, the server's peak RSS while it runs, files and bytes before
//! and after, and the query suite again on the compacted files. `cargo bench --bench tsbs --
//! compaction`.

use std::time::{Duration, Instant};

use super::{export, parquet_bytes, parquet_under, send, suite, Server};

fn files_in(dir: &std::path::Path) -> usize {
    parquet_under(&dir.join("objects")).0
}

/// One number from a query over HTTP.
fn number(server: &Server, sql: &str) -> f64 {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let url = format!(
        "http://{}/api/v3/query_sql?db=benchmark&q={}",
        server.addr,
        url::form_urlencoded::byte_serialize(sql.as_bytes()).collect::<String>()
    );
    let rows: serde_json::Value = runtime
        .block_on(async { reqwest::get(url).await.expect("query").json().await.expect("json") });
    rows[0].as_object().and_then(|o| o.values().next()).and_then(|v| v.as_f64()).unwrap_or(0.0)
}

pub fn run(hosts: usize, hours: i64, runs: usize) {
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path().join("data");
    let exported = temp.path().join("cpu-parquet");
    // Small chunks: a 128 MiB buffer persists 16 MiB at a time under memory pressure.
    let small = ["--buffer-memory-max", "128MiB", "--compaction-interval", "0s"];
    let server = Server::start(&data, &small);
    let (rows, seconds, _, _) = send(&server, hosts, hours * 3600, 4, true);
    println!(
        "\ningested {rows} rows ({hosts} hosts × {hours} h) in {seconds:.1} s, 128 MiB buffer"
    );
    let parquet = export(&server, &exported, hours);
    server.stop();

    let server = Server::start(&data, &small);
    let (files_before, bytes_before) = (files_in(&data), parquet_bytes(&data));
    suite(&server, &parquet, "persisted in small chunks, before compaction", hosts, hours, runs, 1);
    server.stop();

    // Compaction on, with its defaults but for the interval (and the grace period, so that
    // the replaced files' deletion is part of the measurement).
    let on = ["--compaction-interval", "1s", "--compaction-grace", "0s"];
    let started = Instant::now();
    let server = Server::start(&data, &on);
    // Done when no file has been added or removed for 10 s (two runs found nothing).
    let mut last = (files_in(&data), Instant::now());
    while last.1.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        let now = files_in(&data);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let wall = last.1.duration_since(started).as_secs_f64();
    let peak = server.peak_rss_bytes() as f64 / (1 << 20) as f64;
    let jobs = number(&server, "SELECT count(*) FROM system.compactions WHERE status = 'ok'");
    let failed = number(&server, "SELECT count(*) FROM system.compactions WHERE status <> 'ok'");
    let busy = number(&server, "SELECT sum(duration_ms) FROM system.compactions") / 1e3;
    let (files_after, bytes_after) = (files_in(&data), parquet_bytes(&data));
    println!("\n| compaction of {rows} rows | value |");
    println!("|---|---|");
    println!("| files before → after | {files_before} → {files_after} |");
    println!(
        "| Parquet MiB before → after | {:.0} → {:.0} |",
        bytes_before as f64 / (1 << 20) as f64,
        bytes_after as f64 / (1 << 20) as f64
    );
    println!("| compactions (failed) | {jobs} ({failed}) |");
    println!("| time compacting (sum of jobs), s | {busy:.1} |");
    println!("| wall time from start to the last file change, s | {wall:.1} |");
    println!("| server peak RSS during it, MiB | {peak:.0} |");
    assert_eq!(failed, 0.0, "every compaction succeeded");
    suite(&server, &parquet, "persisted, after compaction", hosts, hours, runs, 1);
    server.stop();
}
