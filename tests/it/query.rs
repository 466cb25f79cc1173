//! SQL over HTTP: formats, errors, catalog views, pruning of persisted files, dedup across
//! Parquet and the buffer, queries during ingest.

use std::time::Duration;

use serde_json::json;

use crate::harness::{client, enc, eventually, parquet_files, Server};

const DAY_S: i64 = 86_400;

#[tokio::test]
async fn result_formats_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let (status, _) = server
        .write(
            "/api/v3/write_lp?db=f&precision=s",
            "cpu,host=a u=1.5,n=2i,ok=t 10\ncpu,host=b u=2 20",
        )
        .await;
    assert_eq!(status, 204);
    let sql = "SELECT host, u, n, ok, time FROM cpu ORDER BY host";
    let (_, csv) = server.query_raw("f", sql, "csv").await;
    assert_eq!(
        csv,
        "host,u,n,ok,time\na,1.5,2,true,1970-01-01T00:00:10Z\nb,2.0,,,1970-01-01T00:00:20Z\n"
    );
    let (_, jsonl) = server.query_raw("f", sql, "jsonl").await;
    assert_eq!(jsonl.lines().count(), 2);
    let (_, pretty) = server.query_raw("f", sql, "pretty").await;
    assert!(pretty.contains("| a    | 1.5 | 2 | true | 1970-01-01T00:00:10Z |"), "{pretty}");
    let parquet = client()
        .get(format!("{}?db=f&format=parquet&q={}", server.url("/api/v3/query_sql"), enc(sql)))
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(&parquet[..4], b"PAR1");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(parquet)
        .expect("parquet")
        .build()
        .expect("reader");
    assert_eq!(reader.map(|b| b.expect("batch").num_rows()).sum::<usize>(), 2);
    let arrow_bytes = client()
        .get(format!("{}?db=f&q={}", server.url("/api/v3/query_sql"), enc(sql)))
        .header("Accept", "application/vnd.apache.arrow.stream")
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes");
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow_bytes), None)
        .expect("arrow stream");
    assert_eq!(reader.map(|b| b.expect("batch").num_rows()).sum::<usize>(), 2);
    // POST with a JSON body.
    let posted: serde_json::Value = client()
        .post(server.url("/api/v3/query_sql"))
        .json(&json!({"db": "f", "q": "SELECT count(*) AS c FROM cpu"}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(posted, json!([{"c": 2}]));

    let (status, body) = server.query_raw("f", "SELEC 1", "json").await;
    assert_eq!(status, 400);
    assert!(body.contains("SQL error"), "{body}");
    let (status, body) = server.query_raw("f", "SELECT nope FROM cpu", "json").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.query_raw("f", "SELECT * FROM missing", "json").await;
    assert_eq!(status, 400);
    assert!(body.contains("missing"), "{body}");
    let (status, _) = server.query_raw("nodb", "SELECT 1", "json").await;
    assert_eq!(status, 404);
    let (status, _) = server.query_raw("f", "SELECT 1", "yaml").await;
    assert_eq!(status, 400);

    let tables = server.query("f", "SHOW TABLES").await;
    assert!(tables.iter().any(|t| t["table_name"] == "cpu" && t["table_schema"] == "public"));
    let columns = server.query("f", "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'cpu' ORDER BY ordinal_position").await;
    let names: Vec<_> = columns.iter().map(|c| c["column_name"].as_str().expect("name")).collect();
    assert_eq!(names, ["host", "u", "n", "ok", "time"]);
    let shown = server.query("f", "SHOW COLUMNS FROM cpu").await;
    assert_eq!(shown.len(), 5);
}

#[tokio::test]
async fn persisted_files_are_pruned_by_time_and_merged_with_the_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--persist-interval", "1s"]);
    let day0 = 1_700_006_400; // 2023-11-15T00:00:00Z
    let body: String = (0..3)
        .flat_map(|d| {
            (0..10).map(move |i| format!("cpu,host=h{i} u={i},s=1 {}\n", day0 + d * DAY_S + 60))
        })
        .collect();
    assert_eq!(server.write("/write?db=pr&precision=s", body).await.0, 204);
    assert!(
        eventually(Duration::from_secs(30), || async { parquet_files(&data).len() == 3 }).await,
        "three days, three files"
    );

    // A query for the last day's hour opens only that day's file.
    let last = format!(
        "time >= to_timestamp({}) AND time < to_timestamp({})",
        day0 + 2 * DAY_S,
        day0 + 2 * DAY_S + 3600
    );
    let plan = server.query("pr", &format!("EXPLAIN SELECT count(*) FROM cpu WHERE {last}")).await;
    let physical = plan.iter().find(|r| r["plan_type"] == "physical_plan").expect("physical plan")
        ["plan"]
        .as_str()
        .expect("text")
        .to_string();
    assert_eq!(physical.matches(".parquet").count(), 1, "{physical}");
    assert!(physical.contains("2023-11-17"), "{physical}");
    assert_eq!(server.count("pr", &format!("SELECT count(*) FROM cpu WHERE {last}")).await, 10);

    // Overwrite one field of a persisted point: the buffer row merges with the file's row.
    assert_eq!(
        server.write("/write?db=pr&precision=s", format!("cpu,host=h3 s=99 {}", day0 + 60)).await.0,
        204
    );
    let rows = server
        .query(
            "pr",
            &format!(
                "SELECT u, s FROM cpu WHERE host = 'h3' AND time = to_timestamp({})",
                day0 + 60
            ),
        )
        .await;
    assert_eq!(rows, vec![json!({"u": 3.0, "s": 99.0})]);
    // A filter on the overwritten field sees the merged value, not the stale one.
    assert_eq!(server.count("pr", "SELECT count(*) FROM cpu WHERE s = 1").await, 29);
    assert_eq!(server.count("pr", "SELECT count(*) FROM cpu").await, 30);
    // Once that is persisted too, files overlap; the answer stays the same, also after restart.
    assert!(
        eventually(Duration::from_secs(30), || async { parquet_files(&data).len() == 4 }).await
    );
    assert_eq!(server.count("pr", "SELECT count(*) FROM cpu").await, 30);
    let mut server = server;
    server.terminate();
    let server = server.restart();
    let rows = server
        .query(
            "pr",
            &format!(
                "SELECT u, s FROM cpu WHERE host = 'h3' AND time = to_timestamp({})",
                day0 + 60
            ),
        )
        .await;
    assert_eq!(rows, vec![json!({"u": 3.0, "s": 99.0})]);
    assert_eq!(server.count("pr", "SELECT count(*) FROM cpu").await, 30);
}

#[tokio::test]
async fn queries_answer_during_heavy_ingest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--buffer-memory-max", "16MiB"]);
    let url = server.url("/api/v3/write_lp?db=hi&precision=s");
    let writer = tokio::spawn(async move {
        let mut accepted = 0i64;
        for batch in 0..40 {
            let body: String = (0..2000)
                .map(|i| format!("m,host=h{} v={i} {}\n", i % 50, batch * 10_000 + i))
                .collect();
            let response = client().post(&url).body(body).send().await.expect("write");
            if response.status() == 204 {
                accepted += 2000;
            } else {
                assert_eq!(response.status(), 503, "only backpressure may refuse a good write");
            }
        }
        accepted
    });
    let mut answered = 0;
    while !writer.is_finished() {
        let (status, body) = server.query_raw("hi", "SELECT count(*) FROM m", "json").await;
        assert!(status == 200 || status == 404, "{status} {body}");
        answered += 1;
    }
    let accepted = writer.await.expect("writer");
    assert!(answered > 0);
    assert_eq!(server.count("hi", "SELECT count(*) FROM m").await, accepted);
}

#[tokio::test]
async fn full_buffer_answers_503_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--buffer-memory-max", "1MiB"]);
    // Persistence cannot make progress while a plain file sits where its directory goes.
    let blocker = data.join("objects").join("data");
    std::fs::write(&blocker, b"not a directory").expect("blocker");
    let write = |batch: i64| {
        let body: String = (0..5000)
            .map(|i| {
                format!(
                    "m,host=h{} v={i},w=\"{}\" {}\n",
                    i % 100,
                    "x".repeat(20),
                    batch * 10_000 + i
                )
            })
            .collect();
        client().post(server.url("/api/v3/write_lp?db=full&precision=s")).body(body).send()
    };
    let mut accepted = 0i64;
    let mut batch = 0;
    let refused = loop {
        let response = write(batch).await.expect("write");
        batch += 1;
        match response.status().as_u16() {
            204 => accepted += 5000,
            503 => break response,
            other => panic!("unexpected status {other}"),
        }
        assert!(batch < 100, "a 1 MiB buffer must push back");
    };
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let ping = client().get(server.url("/ping")).send().await.expect("ping");
    assert_eq!(ping.status(), 204, "the server stays up");
    assert_eq!(
        server.count("full", "SELECT count(*) FROM m").await,
        accepted,
        "queries still answer"
    );
    // Unblock: persistence catches up and writes are accepted again.
    std::fs::remove_file(&blocker).expect("unblock");
    assert!(
        eventually(Duration::from_secs(30), || async {
            write(batch).await.expect("write").status() == 204
        })
        .await
    );
    accepted += 5000;
    assert_eq!(server.count("full", "SELECT count(*) FROM m").await, accepted);
    assert!(!parquet_files(&data).is_empty());
}

/// The "last point per series" query answers from the last-value cache, and its answer equals
/// the same question asked without it, through late, out-of-order and same-instant writes, a
/// restart (rows then in Parquet) and writes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lastpoint_answers_from_the_cache_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(&dir.path().join("data"), &[]);
    async fn write(server: &Server, body: &'static str) {
        assert_eq!(server.write("/api/v3/write_lp?db=lv&precision=s", body).await.0, 204);
    }
    const CACHED: &str =
        "SELECT DISTINCT ON (host) host, region, u, v, time FROM cpu ORDER BY host, time DESC";
    const REFERENCE: &str =
        "SELECT host, region, u, v, time FROM (SELECT *, row_number() OVER (PARTITION BY host ORDER BY time DESC) AS rn FROM cpu) WHERE rn = 1 ORDER BY host";
    async fn check(server: &Server, label: &str) -> Vec<serde_json::Value> {
        let cached = server.query("lv", CACHED).await;
        assert_eq!(cached, server.query("lv", REFERENCE).await, "{label}");
        cached
    }
    let cached = CACHED;
    write(&server, "cpu,host=a,region=eu u=1,v=10 100\ncpu,host=b,region=us u=5 100\ncpu,host=a,region=eu u=2 110").await;
    let first = check(&server, "first build").await;
    assert_eq!(first[0]["u"], 2.0);
    // An older row changes nothing; a same-instant write merges its fields (later wins); a new
    // series appears; a newer point replaces b's.
    write(&server, "cpu,host=a,region=eu u=100 50\ncpu,host=a,region=eu v=20 110\ncpu,host=c,region=eu u=7 90\ncpu,host=b,region=us v=1 120").await;
    let second = check(&server, "after late and merging writes").await;
    assert_eq!((second[0]["u"].clone(), second[0]["v"].clone()), (json!(2.0), json!(20.0)));
    assert_eq!((second[1]["u"].clone(), second[1]["v"].clone()), (json!(null), json!(1.0)));
    assert_eq!(second.len(), 3);
    // The plan reads the cache.
    let plan = server.query("lv", &format!("EXPLAIN {cached}")).await;
    assert!(serde_json::to_string(&plan).expect("json").contains("last_cache"), "{plan:?}");
    // After a restart the rows are in Parquet: the cache is built from the files.
    assert_eq!(server.terminate(), Some(0));
    server = server.restart();
    assert!(!parquet_files(&dir.path().join("data")).is_empty());
    assert_eq!(check(&server, "after restart").await, second);
    write(&server, "cpu,host=c,region=eu u=8 130").await;
    let third = check(&server, "after a write following the restart").await;
    assert_eq!(third[2]["u"], 8.0);
    // `last_cache('cpu')` is a table of its own, as in InfluxDB 3.
    assert_eq!(server.count("lv", "SELECT count(*) AS n FROM last_cache('cpu')").await, 3);
}

/// Buffered runs get sorted by series in the background; tag-filtered queries answer the same
/// before and after, after a late write and an overwrite, and from Parquet; a full scan of the
/// buffer is split over the cores.
#[tokio::test]
async fn series_sorted_buffers_answer_the_same_and_scans_use_every_core() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(&dir.path().join("data"), &["--buffer-sort-rows", "500"]);
    async fn answers(server: &Server) -> Vec<Vec<serde_json::Value>> {
        let questions = [
            ("host = 'h3'", "host || '' = 'h3'"),
            (
                "host IN ('h4', 'h19', 'nope') AND dc = 'd1'",
                "host || '' IN ('h4', 'h19', 'nope') AND dc || '' = 'd1'",
            ),
            (
                "dc = 'd2' AND time >= '1970-01-01T00:20:00Z'",
                "dc || '' = 'd2' AND time >= '1970-01-01T00:20:00Z'",
            ),
        ];
        let mut out = Vec::new();
        for (filter, unfiltered) in questions {
            let sql = |f: &str| {
                format!("SELECT host, dc, count(*) AS n, sum(u) AS u, max(time) AS t FROM cpu WHERE {f} GROUP BY host, dc ORDER BY host, dc")
            };
            let answer = server.query("s", &sql(filter)).await;
            assert_eq!(answer, server.query("s", &sql(unfiltered)).await, "{filter}");
            out.push(answer);
        }
        out
    }
    async fn batches_in_plan(server: &Server) -> (usize, usize, String) {
        let plan =
            serde_json::to_string(&server.query("s", "EXPLAIN SELECT sum(u) FROM cpu").await)
                .expect("json");
        let sizes = plan
            .split("partition_sizes=[")
            .nth(1)
            .and_then(|r| r.split(']').next())
            .unwrap_or_default();
        let batches = sizes.split(", ").filter_map(|n| n.parse::<usize>().ok()).sum();
        let partitions = plan
            .split("DataSourceExec: partitions=")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (batches, partitions, plan)
    }
    // 20 hosts × 100 times in 10 requests of 200 rows, in order.
    for request in 0..10 {
        let body: String = (0..10)
            .flat_map(|t| {
                (0..20).map(move |h| {
                    format!(
                        "cpu,host=h{h},dc=d{} u={},n={}i {}\n",
                        h % 3,
                        request * 10 + t,
                        h,
                        1000 + (request * 10 + t) * 10
                    )
                })
            })
            .collect();
        assert_eq!(server.write("/api/v3/write_lp?db=s&precision=s", body).await.0, 204);
    }
    let before = answers(&server).await;
    assert_eq!(
        before[0],
        vec![json!({"host": "h3", "dc": "d0", "n": 100, "u": 4950.0, "t": "1970-01-01T00:33:10Z"})]
    );
    // Runs of at least 500 rows: three sorted batches of three requests each and the last
    // request as it came, four batches in place of ten.
    let sorted =
        eventually(Duration::from_secs(10), || async { batches_in_plan(&server).await.0 == 4 })
            .await;
    assert!(sorted, "buffered runs were not sorted: {}", batches_in_plan(&server).await.2);
    assert_eq!(answers(&server).await, before);
    // A scan of every buffered row is split over the cores.
    let (_, partitions, plan) = batches_in_plan(&server).await;
    assert_eq!(
        partitions,
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(4),
        "{plan}"
    );
    // An overwritten point (the later write wins) and a late row.
    assert_eq!(
        server
            .write(
                "/api/v3/write_lp?db=s&precision=s",
                "cpu,host=h3,dc=d0 u=1000 1500\ncpu,host=h4,dc=d1 u=-1 5"
            )
            .await
            .0,
        204
    );
    let after = answers(&server).await;
    assert_eq!(
        after[0],
        vec![
            json!({"host": "h3", "dc": "d0", "n": 100, "u": 4950.0 - 50.0 + 1000.0, "t": "1970-01-01T00:33:10Z"})
        ]
    );
    assert_eq!(
        (after[1][1]["host"].clone(), after[1][1]["n"].clone()),
        (json!("h4"), json!(101)),
        "{:?}",
        after[1]
    );
    // Persisted: the same answers from Parquet.
    assert_eq!(server.terminate(), Some(0));
    server = server.restart();
    assert_eq!(answers(&server).await, after);
}

/// Issue 10.6: a result larger than --query-memory-max fails with 400 instead of growing the
/// server until the kernel kills it; the server goes on answering.
#[tokio::test]
async fn http_results_stay_inside_the_query_memory_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server =
        crate::harness::Server::start(&dir.path().join("data"), &["--query-memory-max", "32MiB"]);
    assert_eq!(server.write("/write?db=mem", "m v=1 1").await.0, 204);
    let started = std::time::Instant::now();
    for format in ["json", "csv", "parquet"] {
        let (status, body) =
            server.query_raw("mem", "SELECT * FROM generate_series(1, 2000000000)", format).await;
        assert_eq!(status, 400, "{format}: {body}");
        assert!(body.contains("Resources exhausted") || body.contains("memory"), "{body}");
    }
    // The rows fit, their JSON does not: the encoded body counts as well.
    let (status, body) = server
        .query_raw("mem", "SELECT repeat('x', 100) AS s FROM generate_series(1, 300000)", "json")
        .await;
    assert_eq!(status, 400, "{}", &body[..body.len().min(300)]);
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "{:?}", started.elapsed());
    assert_eq!(server.count("mem", "SELECT count(*) FROM m").await, 1);
}
