//! TSBS-style benchmarks against the real `sundial` binary over loopback.
//!
//! `cargo bench --bench tsbs -- ingest` posts the cpu-only data set over HTTP line protocol in
//! batches of 5,000 lines with 1, 2 and 4 concurrent writers (100 hosts × 1 day), then 1,000 hosts
//! × 1 day with default settings, and reports rows/s, MB/s, the server's peak RSS and Parquet
//! bytes per row. `cargo bench --bench tsbs -- queries` runs the 15 TSBS query types over the
//! Postgres protocol on 1000 hosts × 13 hours, side by side with DuckDB on the same rows in
//! Parquet (`queries.py`), right after ingest and after a restart. Under `cargo test` (no
//! `--bench`) it runs a small smoke version of both instead, so CI keeps the benchmark working
//! and checks every query type's answers against DuckDB. `cargo bench --bench tsbs -- alerts`
//! runs 1,000 alert rules over a view every 10 s during ingest (`alerts.rs`). `cargo bench
//! --bench tsbs -- s3` puts the same ingest and query suite on SeaweedFS's S3 next to a local
//! directory (`s3.rs`). `cargo bench --bench tsbs -- compaction` persists 1000 hosts × 1 day
//! in small chunks and measures compacting it, with the query suite before and after
//! (`compaction.rs`).

mod alerts;
mod compaction;
mod generate;
mod s3;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use generate::Generator;

const BATCH_LINES: usize = 5_000;

struct Server {
    child: Child,
    addr: String,
    pg_addr: String,
    dir: PathBuf,
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(dir, extra, &[])
    }

    fn start_with_env(dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sundial"))
            .args(["serve", "--http-bind", "127.0.0.1:0", "--pg-bind", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(extra)
            .envs(envs.iter().copied())
            .env("SUNDIAL_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sundial");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut pg_addr = String::new();
        let addr = loop {
            let line = lines.next().expect("server exited before listening").expect("stdout line");
            if let Some(addr) = line.strip_prefix("sundial postgres listening on ") {
                pg_addr = addr.to_string();
            }
            if let Some(addr) = line.strip_prefix("sundial http listening on ") {
                break addr.to_string();
            }
        };
        Server { child, addr, pg_addr, dir: dir.to_path_buf() }
    }

    fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// SIGTERM (which persists the buffer) and wait.
    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// A bench that panics does not leave its server running.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parquet files under `dir` and their bytes.
pub(crate) fn parquet_under(dir: &Path) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return (0, 0) };
    entries.flatten().fold((0, 0), |(files, bytes), e| {
        let p = e.path();
        if p.is_dir() {
            let (f, b) = parquet_under(&p);
            (files + f, bytes + b)
        } else if p.extension().is_some_and(|x| x == "parquet") {
            (files + 1, bytes + e.metadata().map_or(0, |m| m.len()))
        } else {
            (files, bytes)
        }
    })
}

fn parquet_bytes(dir: &Path) -> u64 {
    // A remote store's files are all in the cache too (written through on persist).
    parquet_under(&dir.join("objects")).1 + parquet_under(&dir.join("cache")).1
}

struct Outcome {
    rows: u64,
    seconds: f64,
    body_bytes: u64,
    peak_rss: u64,
    parquet_bytes: u64,
}

/// Ingests `hosts` × `duration_s` with `writers` concurrent clients into a fresh server, and
/// stops it (which persists everything).
fn ingest(
    hosts: usize,
    duration_s: i64,
    writers: usize,
    on_the_fly: bool,
    extra: &[&str],
) -> Outcome {
    ingest_with_env(hosts, duration_s, writers, on_the_fly, extra, &[])
}

fn ingest_with_env(
    hosts: usize,
    duration_s: i64,
    writers: usize,
    on_the_fly: bool,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with_env(&dir.path().join("data"), extra, envs);
    let (rows, seconds, body_bytes, peak_rss) =
        send(&server, hosts, duration_s, writers, on_the_fly);
    let data_dir = server.dir.clone();
    server.stop();
    Outcome { rows, seconds, body_bytes, peak_rss, parquet_bytes: parquet_bytes(&data_dir) }
}

/// Sends `hosts` × `duration_s` with `writers` concurrent clients and checks every row landed:
/// (rows, seconds, body bytes, the server's peak RSS during ingest, before the check's query). Pre-generated batches keep the client's CPU out of the
/// measurement; `on_the_fly` generates while sending (large sets).
fn send(
    server: &Server,
    hosts: usize,
    duration_s: i64,
    writers: usize,
    on_the_fly: bool,
) -> (u64, f64, u64, u64) {
    let expected = Generator::total_rows(hosts, duration_s);
    let generator = Arc::new(Mutex::new(Generator::new(hosts, duration_s, 42)));
    let pregenerated: Arc<Vec<(String, usize)>> = Arc::new(if on_the_fly {
        Vec::new()
    } else {
        let mut g = generator.lock().expect("generator");
        std::iter::from_fn(|| g.next_batch(BATCH_LINES)).collect()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let url = format!("http://{}/api/v3/write_lp?db=benchmark&precision=ns", server.addr);
    let next = Arc::new(AtomicU64::new(0));
    let body_bytes = Arc::new(AtomicU64::new(0));
    let rows = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let tasks: Vec<_> = (0..writers)
            .map(|_| {
                let (client, url, next, body_bytes, rows, generator, pregenerated) = (
                    client.clone(),
                    url.clone(),
                    next.clone(),
                    body_bytes.clone(),
                    rows.clone(),
                    generator.clone(),
                    pregenerated.clone(),
                );
                tokio::spawn(async move {
                    loop {
                        let batch = if on_the_fly {
                            match generator.lock().expect("generator").next_batch(BATCH_LINES) {
                                Some(b) => b,
                                None => break,
                            }
                        } else {
                            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                            match pregenerated.get(i) {
                                Some(b) => b.clone(),
                                None => break,
                            }
                        };
                        let (body, lines) = batch;
                        let len = body.len() as u64;
                        loop {
                            let response =
                                client.post(&url).body(body.clone()).send().await.expect("post");
                            match response.status().as_u16() {
                                204 => break,
                                503 => tokio::time::sleep(Duration::from_millis(50)).await,
                                other => panic!(
                                    "write failed with {other}: {}",
                                    response.text().await.unwrap_or_default()
                                ),
                            }
                        }
                        body_bytes.fetch_add(len, Ordering::Relaxed);
                        rows.fetch_add(lines as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer");
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss = server.peak_rss_bytes();
    let counted: serde_json::Value = runtime.block_on(async {
        let url = format!(
            "http://{}/api/v3/query_sql?db=benchmark&q=SELECT%20count(*)%20AS%20n%20FROM%20cpu",
            server.addr
        );
        reqwest::get(url).await.expect("count").json().await.expect("json")
    });
    assert_eq!(counted[0]["n"].as_u64(), Some(expected), "every row landed");
    (rows.load(Ordering::Relaxed), seconds, body_bytes.load(Ordering::Relaxed), peak_rss)
}

/// The TSBS query suite side by side with DuckDB (`queries.py`), right after ingest (rows in
/// buffers) and after a restart (rows in Parquet, nothing cached).
fn queries(hosts: usize, hours: i64, runs: usize) {
    let pip = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "duckdb",
            "psycopg[binary]",
        ])
        .status()
        .expect("python3");
    assert!(pip.success(), "installing duckdb and psycopg failed");
    // TSBS_DATA_DIR keeps the data set for later runs, which then only measure the persisted
    // state (for working on the query path without re-ingesting).
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = std::env::var_os("TSBS_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| temp.path().to_path_buf());
    let data = dir.join("data");
    let exported = dir.join("cpu-parquet");
    let parquet = exported.join("cpu-*.parquet");
    // A buffer large enough that the data set stays in memory until the restart.
    // The Parquet export for DuckDB (an hour per query) is collected whole; its accounting
    // counts buffers that batches share once per batch, so it gets room.
    let extra =
        ["--buffer-memory-max", "4GiB", "--persist-interval", "1h", "--query-memory-max", "4GiB"];
    let run = |server: &Server, state: &str| suite(server, &parquet, state, hosts, hours, runs, 1);
    if exported.exists() {
        println!("\nreusing the data set in {}", dir.display());
        let server = Server::start(&data, &extra);
        run(&server, "persisted, after a restart");
        server.stop();
        return;
    }
    let server = Server::start(&data, &extra);
    let (rows, seconds, _, _) = send(&server, hosts, hours * 3600, 4, true);
    println!("\ningested {rows} rows ({hosts} hosts × {hours} h) in {seconds:.1} s");
    export(&server, &exported, hours);
    run(&server, "right after ingest");
    server.stop();
    let server = Server::start(&data, &extra);
    run(&server, "persisted, after a restart");
    server.stop();
}

/// The whole `cpu` table as Parquet for DuckDB, one file per hour of the data set in `dir`
/// (one query per hour keeps each result within the query memory limit); returns the glob
/// DuckDB reads them by.
fn export(server: &Server, dir: &Path, hours: i64) -> PathBuf {
    std::fs::create_dir_all(dir).expect("export dir");
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    for hour in 0..hours {
        let from = generate::START_NS + hour * 3_600_000_000_000;
        let to = from + 3_600_000_000_000;
        let sql = format!(
            "SELECT * FROM cpu WHERE time >= to_timestamp_nanos({from}) \
             AND time < to_timestamp_nanos({to})"
        );
        let url = format!(
            "http://{}/api/v3/query_sql?db=benchmark&format=parquet&q={}",
            server.addr,
            url::form_urlencoded::byte_serialize(sql.as_bytes()).collect::<String>()
        );
        let (status, bytes) = runtime.block_on(async {
            let response = reqwest::get(url).await.expect("export");
            (response.status(), response.bytes().await.expect("parquet body"))
        });
        assert!(
            status.is_success() && bytes.starts_with(b"PAR1"),
            "export failed ({status}): {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(2000)])
        );
        std::fs::write(dir.join(format!("cpu-{hour:03}.parquet")), &bytes).expect("write");
    }
    dir.join("cpu-*.parquet")
}

/// Runs `queries.py` against `server`: every query type `runs` times after `warmup` runs,
/// next to DuckDB on `parquet`, answers checked equal.
fn suite(
    server: &Server,
    parquet: &Path,
    state: &str,
    hosts: usize,
    hours: i64,
    runs: usize,
    warmup: usize,
) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/tsbs/queries.py");
    let (host, port) = server.pg_addr.rsplit_once(':').expect("host:port");
    let status = Command::new("python3")
        .arg(script)
        .args([host, port, "benchmark"])
        .arg(parquet)
        .args([
            state,
            &generate::START_NS.to_string(),
            &hosts.to_string(),
            &hours.to_string(),
            &runs.to_string(),
        ])
        .env("TSBS_WARMUP", warmup.to_string())
        .status()
        .expect("python3");
    assert!(status.success(), "the query suite failed ({state})");
}

fn report(label: &str, o: &Outcome) {
    println!(
        "| {label} | {} | {:.1} | {:.0} | {:.1} | {:.0} | {:.2} |",
        o.rows,
        o.seconds,
        o.rows as f64 / o.seconds,
        o.body_bytes as f64 / o.seconds / 1e6,
        o.peak_rss as f64 / (1 << 20) as f64,
        o.parquet_bytes as f64 / o.rows as f64,
    );
}

fn header() {
    println!("| run | rows | seconds | rows/s | MB/s | peak RSS MiB | Parquet bytes/row |");
    println!("|---|---|---|---|---|---|---|");
}

fn main() {
    // reqwest takes its TLS from rustls with the ring provider the server uses.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_default();
    if !benching {
        // Smoke run under `cargo test`: small, but the same code path end to end.
        let o = ingest(10, 600, 2, false, &[]);
        assert_eq!(o.rows, 600);
        assert!(o.parquet_bytes > 0, "shutdown persisted the buffer");
        println!("tsbs smoke: {} rows ingested and persisted", o.rows);
        // Every query type, checked against DuckDB, on 20 hosts × 13 h.
        queries(20, 13, 1);
        // Alert rules during ingest: every trigger notified.
        let report = alerts::run(10, 1, 20, 600, 3);
        report.print();
        assert_eq!(report.notified, report.triggers, "every rule made true notified");
        // Compaction's measurement end to end, on a data set that fits in a few files.
        compaction::run(10, 13, 1);
        return;
    }
    // `ingest` runs both parts; `ingest-small` / `ingest-large` one of them.
    if filter.is_empty() || filter.starts_with("ingest") {
        header();
        if filter != "ingest-large" {
            for writers in [1, 2, 4] {
                report(
                    &format!("100 hosts × 1 day, {writers} writer(s)"),
                    &ingest(100, 86_400, writers, false, &[]),
                );
            }
        }
        if filter != "ingest-small" {
            report(
                "1000 hosts × 1 day, 4 writers, generated while sending",
                &ingest(1_000, 86_400, 4, true, &[]),
            );
        }
    }
    if filter.is_empty() || filter == "queries" {
        queries(1_000, 13, 5);
    }
    if filter.is_empty() || filter == "alerts" {
        // 1,000 rules × 10 instances every 10 s during 1000 hosts × 3 h of ingest.
        alerts::run(1_000, 10, 1_000, 3 * 3600, 5).print();
    }
    if filter.is_empty() || filter == "s3" {
        s3::run(100, 86_400, 1_000, 13, 5);
    }
    if filter.is_empty() || filter == "compaction" {
        compaction::run(1_000, 24, 5);
    }
}
