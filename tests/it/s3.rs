//! The server on a real S3-compatible store: moto's server (PyPI `moto[server]`, installed by
//! `scripts/test.sh`) on loopback, reached through a proxy in this test that counts requests
//! and can make the store fail (503), hang, or ignore conditional writes.
//!
//! What is checked: data persisted by one server is read by a fresh server (with an empty data
//! directory and cache) from the store alone; the cache serves a file's second read without a
//! single GET; two servers on one prefix: the second is fenced and stops, nothing acknowledged
//! is lost; a store that fails or hangs during persistence loses and duplicates nothing; a
//! store that is down, or ignores If-None-Match, is refused at start with the reason.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;

use super::harness::{client, eventually, Server};

/// The proxy's behaviour, switched by the test while the server runs.
const PASS: u8 = 0;
const FAIL_503: u8 = 1;
const HANG: u8 = 2;
/// Drops `If-None-Match`, as a store without conditional writes would ignore it.
const NO_CONDITIONAL: u8 = 3;

struct Proxy {
    mode: AtomicU8,
    /// GETs of Parquet files (`…/data/…`).
    data_gets: AtomicU64,
    /// Requests answered 503 or left hanging.
    faulted: AtomicU64,
    /// Manifest commits the store accepted.
    commits: AtomicU64,
    /// Parts of multipart uploads the store accepted.
    parts: AtomicU64,
    upstream: String,
    http: reqwest::Client,
}

async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let mode = proxy.mode.load(Ordering::SeqCst);
    if mode == FAIL_503 || mode == HANG {
        proxy.faulted.fetch_add(1, Ordering::SeqCst);
        if mode == HANG {
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
        return Response::builder().status(503).body(Body::from("SlowDown")).expect("response");
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let commit = parts.method == axum::http::Method::PUT && path.contains("/manifest/log/");
    let part = parts.method == axum::http::Method::PUT && path.contains("partNumber=");
    if parts.method == axum::http::Method::GET && path.contains("/data/") {
        proxy.data_gets.fetch_add(1, Ordering::SeqCst);
    }
    let body = axum::body::to_bytes(body, usize::MAX).await.expect("request body");
    let mut upstream = proxy.http.request(parts.method, format!("{}{path}", proxy.upstream));
    for (name, value) in &parts.headers {
        if mode == NO_CONDITIONAL && name.as_str().eq_ignore_ascii_case("if-none-match") {
            continue;
        }
        if name != axum::http::header::CONTENT_LENGTH {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.body(body).send().await {
        Ok(answer) => answer,
        Err(error) => {
            return Response::builder()
                .status(502)
                .body(Body::from(error.to_string()))
                .expect("502")
        }
    };
    if commit && answer.status().is_success() {
        proxy.commits.fetch_add(1, Ordering::SeqCst);
    }
    if part && answer.status().is_success() {
        proxy.parts.fetch_add(1, Ordering::SeqCst);
    }
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        response = response.header(name, value);
    }
    response.body(Body::from(answer.bytes().await.unwrap_or_default())).expect("response")
}

/// moto's server and the proxy in front of it, with one bucket.
struct Store {
    moto: std::process::Child,
    proxy: Arc<Proxy>,
    /// The proxy's address, the endpoint the servers are given.
    endpoint: String,
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

async fn start_store(bucket: &str) -> Store {
    let port = free_port();
    let moto = std::process::Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto server (PyPI moto[server], installed by scripts/test.sh)");
    let upstream = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let up = eventually(Duration::from_secs(60), || {
        let http = http.clone();
        let url = format!("{upstream}/moto-api/");
        async move { http.get(url).send().await.is_ok() }
    })
    .await;
    assert!(up, "moto server did not start");
    let created = http.put(format!("{upstream}/{bucket}")).send().await.expect("create bucket");
    assert!(created.status().is_success(), "create bucket: {}", created.status());

    let proxy = Arc::new(Proxy {
        mode: AtomicU8::new(PASS),
        data_gets: AtomicU64::new(0),
        faulted: AtomicU64::new(0),
        commits: AtomicU64::new(0),
        parts: AtomicU64::new(0),
        upstream,
        http,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("proxy addr"));
    let app = axum::Router::new().fallback(forward).with_state(proxy.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Store { moto, proxy, endpoint }
}

const ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "sundial-test"),
    ("AWS_SECRET_ACCESS_KEY", "sundial-test-secret"),
    ("AWS_REGION", "us-east-1"),
];

fn s3_args(store: &Store, prefix: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--object-store",
        prefix,
        "--s3-endpoint",
        &store.endpoint,
        "--s3-allow-http",
        "true",
        "--s3-request-timeout",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn env() -> Vec<(String, String)> {
    ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

async fn start(dir: &Path, store: &Store, prefix: &str, extra: &[&str]) -> Server {
    let (dir, args) = (dir.to_path_buf(), s3_args(store, prefix, extra));
    tokio::task::spawn_blocking(move || Server::spawn(dir, args, env()))
        .await
        .expect("spawn")
        .unwrap_or_else(|stderr| panic!("server did not start: {stderr}"))
}

/// Lines `cpu,host=h{i} v={i}i {t}` for `i` in `range`, one second apart.
fn lines(table: &str, range: std::ops::Range<i64>) -> String {
    let table = table.replace(' ', "\\ ").replace(',', "\\,");
    range
        .map(|i| {
            format!(
                "{table},host=h{} v={i}i {}\n",
                i % 7,
                1_700_000_000_000_000_000 + i * 1_000_000_000
            )
        })
        .collect()
}

async fn write(server: &Server, db: &str, body: String) {
    let (status, text) = server.write(&format!("/api/v3/write_lp?db={db}"), body).await;
    assert_eq!(status, 204, "write: {text}");
}

/// Rows and the sum of `v`, which together catch a lost or duplicated point.
async fn count_and_sum(server: &Server, db: &str, table: &str) -> (i64, i64) {
    let rows =
        server.query(db, &format!("SELECT count(*) AS n, sum(v) AS s FROM \"{table}\"")).await;
    (rows[0]["n"].as_i64().unwrap_or(-1), rows[0]["s"].as_i64().unwrap_or(-1))
}

fn expected(range: std::ops::Range<i64>) -> (i64, i64) {
    (range.end - range.start, range.sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_server_reads_everything_from_s3_and_its_cache_serves_repeat_reads() {
    let store = start_store("bucket-a").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = "s3://bucket-a/some/prefix";
    let mut first = start(&dir.path().join("one"), &store, prefix, &[]).await;
    write(&first, "db", lines("cpu", 0..500)).await;
    write(&first, "db", lines("température #1", 0..50)).await;
    // Overwrites across persisted files: the later write wins.
    write(&first, "db", "cpu,host=h0 v=1000000i 1700000000000000000\n".into()).await;
    assert_eq!(first.terminate(), Some(0), "{}", first.stderr());

    // A new data directory: no WAL, no cache; everything comes from the store.
    let second = start(&dir.path().join("two"), &store, prefix, &[]).await;
    let (n, s) = count_and_sum(&second, "db", "cpu").await;
    assert_eq!((n, s), (500, expected(0..500).1 + 1_000_000), "persisted rows, overwrite applied");
    assert_eq!(count_and_sum(&second, "db", "température #1").await, expected(0..50));
    assert!(store.proxy.data_gets.load(Ordering::SeqCst) > 0, "the first read came from S3");

    // The first read started the downloads; once cached, reads make no request to the store.
    // `system.files` lists what the manifest holds; wait until every file is cached and the
    // downloads are over (no GET for a second).
    let files = second.count("db", "SELECT count(*) FROM system.files").await;
    assert!(files >= 2, "one file per table at least");
    let persisted_rows = second
        .count("db", "SELECT sum(rows) FROM system.files WHERE table_name = 'température #1'")
        .await;
    assert_eq!(persisted_rows, 50);
    let cached = eventually(Duration::from_secs(30), || async {
        let rows = second.query("db", "SELECT cache_files FROM system.object_store").await;
        let gets = store.proxy.data_gets.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        rows[0]["cache_files"].as_i64().unwrap_or(0) == files
            && store.proxy.data_gets.load(Ordering::SeqCst) == gets
    })
    .await;
    assert!(cached, "files were not cached");
    let before = store.proxy.data_gets.load(Ordering::SeqCst);
    assert_eq!(count_and_sum(&second, "db", "cpu").await, (500, expected(0..500).1 + 1_000_000));
    let rows =
        second.query("db", "SELECT v FROM cpu WHERE host = 'h3' ORDER BY time LIMIT 2").await;
    assert_eq!(rows.len(), 2);
    assert_eq!(store.proxy.data_gets.load(Ordering::SeqCst), before, "a cached file was re-read");
    let rows = second.query("db", "SELECT remote, cache_hits FROM system.object_store").await;
    assert_eq!(rows[0]["remote"], true);
    assert!(rows[0]["cache_hits"].as_i64().unwrap_or(0) > 0);

    // A third server, written through: what it persists is in its cache at once.
    drop(second);
    let third =
        start(&dir.path().join("three"), &store, prefix, &["--persist-interval", "1s"]).await;
    write(&third, "db", lines("fresh", 0..100)).await;
    let persisted = eventually(Duration::from_secs(30), || async {
        let rows = third.query("db", "SELECT cache_files FROM system.object_store").await;
        rows[0]["cache_files"].as_i64().unwrap_or(0) >= 1
    })
    .await;
    assert!(persisted, "persisted file not written through to the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_prefix_is_fenced_and_nothing_is_lost() {
    let store = start_store("bucket-b").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = "s3://bucket-b/shared";
    let fast = ["--persist-interval", "1s"];
    let mut a = start(&dir.path().join("a"), &store, prefix, &fast).await;
    let mut b = start(&dir.path().join("b"), &store, prefix, &fast).await;
    write(&a, "db", lines("from_a", 0..100)).await;
    write(&a, "db", lines("shared", 0..100)).await;
    // `a` commits first (the partition width at its start, then its table and its file); `b`
    // then finds its next number taken.
    let committed = eventually(Duration::from_secs(30), || async {
        store.proxy.commits.load(Ordering::SeqCst) >= 5
    })
    .await;
    assert!(committed, "a did not persist");
    // `b` numbers its WAL records from 1 as `a` did, and writes into `a`'s table too: its
    // records must not be taken for the ones `a`'s files hold.
    write(&b, "db", lines("shared", 1000..1080)).await;
    write(&b, "db", lines("from_b", 0..80)).await;
    assert!(b.wait_exit(Duration::from_secs(60)), "b was not fenced");
    let code = b.child.try_wait().ok().flatten().and_then(|s| s.code());
    assert_ne!(code, Some(0), "a fenced server exits with an error");
    assert!(b.stderr().contains("fenced"), "b says why it stopped: {}", b.stderr());
    assert_eq!(count_and_sum(&a, "db", "from_a").await, expected(0..100), "a goes on");

    // Once `a` is gone, `b` starts alone and persists what it acknowledged (kept in its WAL).
    assert_eq!(a.terminate(), Some(0), "{}", a.stderr());
    let b_dir = dir.path().join("b");
    let mut b = start(&b_dir, &store, prefix, &fast).await;
    assert_eq!(count_and_sum(&b, "db", "from_b").await, expected(0..80));
    assert_eq!(count_and_sum(&b, "db", "from_a").await, expected(0..100));
    let shared = (180, expected(0..100).1 + expected(1000..1080).1);
    assert_eq!(count_and_sum(&b, "db", "shared").await, shared, "both servers' rows");
    assert_eq!(b.terminate(), Some(0), "{}", b.stderr());
    let fresh = start(&dir.path().join("c"), &store, prefix, &[]).await;
    assert_eq!(count_and_sum(&fresh, "db", "from_b").await, expected(0..80), "b's rows on S3");
    assert_eq!(count_and_sum(&fresh, "db", "from_a").await, expected(0..100), "a's rows on S3");
    assert_eq!(count_and_sum(&fresh, "db", "shared").await, shared);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hanging_store_loses_and_duplicates_nothing() {
    let store = start_store("bucket-c").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = "s3://bucket-c/p";
    let data = dir.path().join("server");
    let mut server = start(&data, &store, prefix, &["--persist-interval", "1s"]).await;
    write(&server, "db", lines("t", 0..200)).await;

    for (mode, batch) in [(FAIL_503, 200..400), (HANG, 400..600)] {
        store.proxy.mode.store(mode, Ordering::SeqCst);
        let faulted_before = store.proxy.faulted.load(Ordering::SeqCst);
        write(&server, "db", lines("t", batch.clone())).await;
        let failed_before = server.stderr().matches("persist failed").count();
        let tried = eventually(Duration::from_secs(30), || async {
            store.proxy.faulted.load(Ordering::SeqCst) > faulted_before
        })
        .await;
        assert!(tried, "persistence did not reach the failing store");
        // The store stays bad until the client's own retries are spent and a persist has
        // failed (the engine then backs off and tries again).
        let failed = |stderr: String| stderr.matches("persist failed").count();
        let gave_up = eventually(Duration::from_secs(60), || async {
            failed(server.stderr()) > failed_before
        })
        .await;
        assert!(gave_up, "no persist failed while the store was failing");
        // Acknowledged rows stay queryable (buffer and cached files) while the store is down.
        assert_eq!(count_and_sum(&server, "db", "t").await, expected(0..batch.end));
        let commits_before = store.proxy.commits.load(Ordering::SeqCst);
        store.proxy.mode.store(PASS, Ordering::SeqCst);
        // The store is back: the next persist commits everything buffered (one partition).
        let healed = eventually(Duration::from_secs(120), || async {
            store.proxy.commits.load(Ordering::SeqCst) > commits_before
        })
        .await;
        assert!(healed, "did not persist after the store came back: {}", server.stderr());
        assert_eq!(count_and_sum(&server, "db", "t").await, expected(0..batch.end));
    }
    // Persisted, all of it: a server with no WAL and no cache finds every row in the store
    // (the first is killed, so it persists nothing more on the way out) ...
    server.kill9();
    let fresh = start(&dir.path().join("fresh"), &store, prefix, &[]).await;
    assert_eq!(count_and_sum(&fresh, "db", "t").await, expected(0..600));
    drop(fresh);
    // ... and the killed one, restarted on its WAL and the store, has each exactly once.
    let (args, envs) = (server.args.clone(), env());
    let mut restarted = tokio::task::spawn_blocking(move || Server::spawn(data, args, envs))
        .await
        .expect("spawn")
        .expect("restart");
    assert_eq!(count_and_sum(&restarted, "db", "t").await, expected(0..600));
    assert_eq!(restarted.terminate(), Some(0), "{}", restarted.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_or_ignores_conditional_writes_is_refused_at_start() {
    let store = start_store("bucket-d").await;
    let dir = tempfile::tempdir().expect("tempdir");

    store.proxy.mode.store(NO_CONDITIONAL, Ordering::SeqCst);
    let args = s3_args(&store, "s3://bucket-d/p", &[]);
    let refused = Server::spawn(dir.path().join("one"), args, env()).err().expect("refused");
    assert!(refused.contains("conditional writes"), "{refused}");
    store.proxy.mode.store(PASS, Ordering::SeqCst);

    let closed = format!("http://127.0.0.1:{}", free_port());
    let mut args = s3_args(&store, "s3://bucket-d/p", &[]);
    let at = args.iter().position(|a| a == "--s3-endpoint").expect("flag") + 1;
    args[at] = closed;
    let started = std::time::Instant::now();
    let down = Server::spawn(dir.path().join("two"), args, env()).err().expect("refused");
    assert!(down.contains("checking the object store"), "{down}");
    assert!(started.elapsed() < Duration::from_secs(59), "gave up in bounded time");
    assert!(!down.contains("panicked"), "{down}");

    for (url, reason) in [
        ("s3://", "no bucket"),
        ("s3://key:secret@bucket/p", "credentials"),
        ("s3://bucket/p?x=1", "query"),
        ("gs://bucket/p", "not supported"),
    ] {
        let args = vec!["--object-store".to_string(), url.to_string()];
        let refused = Server::spawn(dir.path().join("bad"), args, env()).err().expect("refused");
        assert!(refused.contains(reason), "{url}: {refused}");
    }

    // And the store works once it answers properly.
    let server = start(&dir.path().join("three"), &store, "s3://bucket-d/p", &[]).await;
    write(&server, "db", lines("t", 0..3)).await;
    assert_eq!(count_and_sum(&server, "db", "t").await, expected(0..3));
    let response = client().get(server.url("/health")).send().await.expect("health");
    assert!(response.status().is_success());
}

/// Compaction on S3: while the store answers 503 a compaction fails (recorded in
/// `system.compactions`, nothing changed, every row still answered); once the store is back the
/// partition's files become one, and every row is there exactly once, also for a fresh server
/// that reads the store alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_on_a_failing_store_changes_nothing_until_it_succeeds() {
    let store = start_store("bucket-e").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = "s3://bucket-e/c";
    let data = dir.path().join("server");
    let off = ["--persist-interval", "1s", "--compaction-interval", "0s"];
    let mut server = start(&data, &store, prefix, &off).await;
    // Four files, the last overwriting points of the first (same values: the sums stay).
    // Each waits for its file's commit (not any commit: the table's first is its ids').
    for (n, range) in [0..100, 100..200, 200..300, 0..50].into_iter().enumerate() {
        write(&server, "db", lines("t", range)).await;
        let persisted = eventually(Duration::from_secs(30), || async {
            server.count("db", "SELECT count(*) FROM system.files").await == n as i64 + 1
        })
        .await;
        assert!(persisted, "{}", server.stderr());
    }
    assert_eq!(server.count("db", "SELECT count(*) FROM system.files").await, 4);
    assert_eq!(server.terminate(), Some(0));

    let on =
        ["--persist-interval", "1s", "--compaction-interval", "5s", "--compaction-grace", "0s"];
    // The first compaction comes 5 s after the start; the store fails before.
    let server = start(&data, &store, prefix, &on).await;
    store.proxy.mode.store(FAIL_503, Ordering::SeqCst);
    let failed = eventually(Duration::from_secs(90), || async {
        server.count("db", "SELECT count(*) FROM system.compactions WHERE status = 'failed'").await
            > 0
    })
    .await;
    assert!(failed, "a compaction failed on the failing store: {}", server.stderr());
    assert_eq!(server.count("db", "SELECT count(*) FROM system.files").await, 4);
    assert_eq!(count_and_sum(&server, "db", "t").await, expected(0..300));

    store.proxy.mode.store(PASS, Ordering::SeqCst);
    let compacted = eventually(Duration::from_secs(120), || async {
        server.count("db", "SELECT count(*) FROM system.files").await == 1
    })
    .await;
    assert!(compacted, "compacted once the store was back: {}", server.stderr());
    assert_eq!(count_and_sum(&server, "db", "t").await, expected(0..300));
    let fresh = start(&dir.path().join("fresh"), &store, prefix, &[]).await;
    assert_eq!(count_and_sum(&fresh, "db", "t").await, expected(0..300));
    assert_eq!(fresh.count("db", "SELECT count(*) FROM system.files").await, 1);
}

/// Objects above `--s3-multipart-threshold` go up as multipart uploads, and read back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_go_up_in_parts() {
    let store = start_store("bucket-f").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = "s3://bucket-f/m";
    let flags = ["--persist-interval", "1s", "--s3-multipart-threshold", "5MiB"];
    let server = start(&dir.path().join("server"), &store, prefix, &flags).await;
    // Values that do not compress: a file of several MiB.
    let n = 120_000i64;
    let body: String = (0..n)
        .map(|i| {
            let x = |k: i64| ((i * 7_919 + k * 104_729) as f64 * 0.618_033_988_7).fract();
            format!(
                "big,host=h{} a={},b={},c={},d={},e={},v={i}i {}\n",
                i % 10,
                x(1),
                x(2),
                x(3),
                x(4),
                x(5),
                1_700_000_000_000_000_000 + i * 1_000_000
            )
        })
        .collect();
    write(&server, "db", body).await;
    let uploaded = eventually(Duration::from_secs(60), || async {
        store.proxy.parts.load(Ordering::SeqCst) > 0
            && server.count("db", "SELECT count(*) FROM system.files").await == 1
    })
    .await;
    assert!(uploaded, "a multipart upload: {}", server.stderr());
    let bytes = server.count("db", "SELECT sum(bytes) FROM system.files").await;
    assert!(bytes > 5 << 20, "{bytes} bytes");
    let fresh = start(&dir.path().join("fresh"), &store, prefix, &[]).await;
    assert_eq!(count_and_sum(&fresh, "db", "big").await, expected(0..n));
}
