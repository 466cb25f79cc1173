//! Line protocol over HTTP: every endpoint and precision, gzip, partial writes, conflicts,
//! schema evolution, dedup, limits.

use std::io::Write;

use serde_json::json;

use crate::harness::{client, Server};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

#[tokio::test]
async fn every_endpoint_and_precision_lands_at_the_same_instant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    // 2023-11-14T22:13:20Z in each unit.
    let cases = [
        ("/write?db=p&precision=n", "1700000000000000000", "v1n"),
        ("/write?db=p&precision=u", "1700000000000000", "v1u"),
        ("/write?db=p&precision=ms", "1700000000000", "v1ms"),
        ("/write?db=p&precision=s", "1700000000", "v1s"),
        ("/write?db=p&precision=m", "28333333", "v1m"),
        ("/write?db=p&precision=h", "472222", "v1h"),
        ("/write?db=p", "1700000000000000000", "v1default"),
        ("/api/v2/write?bucket=p&org=o&precision=ns", "1700000000000000000", "v2ns"),
        ("/api/v2/write?bucket=p&org=o&precision=us", "1700000000000000", "v2us"),
        ("/api/v2/write?bucket=p&org=o&precision=ms", "1700000000000", "v2ms"),
        ("/api/v2/write?bucket=p&org=o&precision=s", "1700000000", "v2s"),
        ("/api/v3/write_lp?db=p&precision=nanosecond", "1700000000000000000", "v3ns"),
        ("/api/v3/write_lp?db=p&precision=microsecond", "1700000000000000", "v3us"),
        ("/api/v3/write_lp?db=p&precision=millisecond", "1700000000000", "v3ms"),
        ("/api/v3/write_lp?db=p&precision=second", "1700000000", "v3s"),
        ("/api/v3/write_lp?db=p", "1700000000", "v3auto_s"),
        ("/api/v3/write_lp?db=p", "1700000000000", "v3auto_ms"),
    ];
    for (path, ts, name) in cases {
        let (status, body) = server.write(path, format!("t,case={name} v=1 {ts}")).await;
        assert_eq!(status, 204, "{path}: {body}");
    }
    let rows = server.query("p", "SELECT case, time FROM t ORDER BY case").await;
    assert_eq!(rows.len(), cases.len());
    for row in &rows {
        let expected = if row["case"] == "v1m" {
            "2023-11-14T22:13:00Z"
        } else if row["case"] == "v1h" {
            "2023-11-14T22:00:00Z"
        } else {
            "2023-11-14T22:13:20Z"
        };
        assert_eq!(row["time"], expected, "{row}");
    }
    let (status, body) = server.write("/write?db=p&precision=days", "t v=1").await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid precision"), "{body}");
}

#[tokio::test]
async fn missing_timestamp_means_time_of_receipt_and_gzip_bodies_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    let response = client()
        .post(server.url("/api/v2/write?bucket=g&org=o"))
        .header("Content-Encoding", "gzip")
        .body(gzip(b"# a comment\r\nm,host=a v=1\r\n\r\nm,host=b v=2"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 204);
    let rows =
        server.query("g", "SELECT host, CAST(time AS BIGINT) AS ns FROM m ORDER BY host").await;
    assert_eq!(rows.len(), 2);
    let ns = rows[0]["ns"].as_i64().expect("ns");
    assert!(ns >= before && ns < before + 60_000_000_000, "{ns} vs {before}");
    let response = client()
        .post(server.url("/write?db=g"))
        .header("Content-Encoding", "gzip")
        .body("not gzip")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn ping_health_and_telegraf_create_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let ping = client().get(server.url("/ping")).send().await.expect("ping");
    assert_eq!(ping.status(), 204);
    assert!(ping.headers().contains_key("x-influxdb-version"));
    let head = client().head(server.url("/ping")).send().await.expect("ping");
    assert_eq!(head.status(), 204);
    let health: serde_json::Value = client()
        .get(server.url("/health"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "pass");

    // Telegraf's v1 output: a form-encoded POST before its first write.
    let response = client()
        .post(server.url("/query"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("q=CREATE+DATABASE+%22telegraf%22")
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<serde_json::Value>().await.expect("json"),
        json!({"results": [{"statement_id": 0}]})
    );
    let (status, body) = server.query_raw("telegraf", "SHOW TABLES", "json").await;
    assert_eq!(status, 200, "{body}");
    let shown: serde_json::Value = client()
        .get(server.url("/query?q=SHOW%20DATABASES"))
        .send()
        .await
        .expect("show")
        .json()
        .await
        .expect("json");
    assert_eq!(shown["results"][0]["series"][0]["values"], json!([["telegraf"]]));
    // The created database survives a restart even though nothing was written to it.
    let mut server = server;
    assert_eq!(server.terminate(), Some(0));
    let server = server.restart();
    let (status, body) = server.query_raw("telegraf", "SHOW TABLES", "json").await;
    assert_eq!(status, 200, "{body}");
    // And InfluxQL's DROP DATABASE removes it (answering success when it is already gone).
    for _ in 0..2 {
        let dropped = client()
            .post(server.url("/query?q=DROP%20DATABASE%20telegraf"))
            .send()
            .await
            .expect("drop");
        assert_eq!(dropped.status(), 200);
    }
    let (status, _) = server.query_raw("telegraf", "SHOW TABLES", "json").await;
    assert_eq!(status, 404);

    let (status, body) = server.write("/write", "m v=1").await;
    assert_eq!(status, 400);
    assert!(body.contains(r#"parameter \"db\""#), "{body}");
    let (status, body) = server.write("/api/v2/write?org=o", "m v=1").await;
    assert_eq!(status, 400);
    assert!(body.contains(r#"parameter \"bucket\""#), "{body}");
}

#[tokio::test]
async fn partial_writes_report_every_rejected_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let body =
        "cpu,host=a u=1 1\ncpu,host=b u=oops 2\ncpu,host=c u=3 3\ncpu u=\"text\" 4\ncpu,u=x v=1 5";
    let (status, text) = server.write("/api/v3/write_lp?db=pw", body).await;
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let lines: Vec<i64> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| d["line_number"].as_i64().expect("n"))
        .collect();
    assert_eq!(lines, vec![2, 4, 5]);
    assert_eq!(v["data"][0]["original_line"], "cpu,host=b u=oops 2");
    assert_eq!(
        v["data"][0]["error_message"],
        "line 2, column 14: invalid value \"oops\" for field \"u\""
    );
    assert_eq!(v["data"][1]["error_message"], "field \"u\" is float in table \"cpu\", got string");
    assert_eq!(v["data"][2]["error_message"], "\"u\" is a float field in table \"cpu\", not a tag");
    assert_eq!(server.count("pw", "SELECT count(*) FROM cpu").await, 2);

    // accept_partial=false: nothing of the request is stored.
    let (status, _) = server
        .write(
            "/api/v3/write_lp?db=pw&accept_partial=false",
            "cpu,host=d u=4 6\ncpu,host=e u=bad 7",
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(server.count("pw", "SELECT count(*) FROM cpu").await, 2);
    let (status, _) = server
        .write("/api/v3/write_lp?db=pw&accept_partial=false", "newtable v=1 1\nnewtable v=2i 2")
        .await;
    assert_eq!(status, 400);
    let (status, _) = server.query_raw("pw", "SELECT * FROM newtable", "json").await;
    assert_eq!(status, 400, "the table of a rejected request was not created");
}

#[tokio::test]
async fn schema_evolves_and_later_writes_win_field_by_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let w = |body: &'static str| server.write("/api/v3/write_lp?db=s&precision=s", body);
    assert_eq!(w("m,host=a a=1,b=2 100").await.0, 204);
    assert_eq!(w("m,host=a,dc=x c=\"new\" 200").await.0, 204);
    assert_eq!(w("m,host=a a=10 100").await.0, 204); // overwrite one field of the first point
    assert_eq!(w("m,host=a b=20,a=11,a=12 100").await.0, 204); // the same field twice: the last wins
    let rows = server.query("s", "SELECT host, dc, a, b, c, time FROM m ORDER BY time").await;
    assert_eq!(
        rows,
        vec![
            json!({"host": "a", "a": 12.0, "b": 20.0, "time": "1970-01-01T00:01:40Z"}),
            json!({"host": "a", "dc": "x", "c": "new", "time": "1970-01-01T00:03:20Z"}),
        ]
    );
    // Deduplication also holds across a restart (WAL replay).
    let mut server = server;
    server.terminate();
    let server = server.restart();
    let rows = server.query("s", "SELECT a, b FROM m WHERE dc IS NULL").await;
    assert_eq!(rows, vec![json!({"a": 12.0, "b": 20.0})]);
}

#[tokio::test]
async fn body_limit_gives_413_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--request-max", "1KiB"]);
    let big = "m v=1 1\n".repeat(500);
    let (status, _) = server.write("/write?db=l", big.clone()).await;
    assert_eq!(status, 413);
    let response = client()
        .post(server.url("/write?db=l"))
        .header("Content-Encoding", "gzip")
        .body(gzip(big.as_bytes()))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 413, "the decompressed size counts too");
    assert_eq!(server.write("/write?db=l", "m v=1 1").await.0, 204);
}

/// What InfluxDB 3 accepts and refuses beyond names (issue 10, line protocol): newlines in
/// quoted strings, leading double quotes, receipt time in the request's precision, empty and
/// non-UTF-8 bodies, strings over 1 MiB, tag values ending in a backslash.
#[tokio::test]
async fn line_protocol_as_influxdb_3_reads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let body = "log,host=a msg=\"first\nsecond\" 1\n\"quoted,host=a \"v\"=1i 2\n";
    assert_eq!(server.write("/write?db=lp", body).await, (204, String::new()));
    let rows = server.query("lp", "SELECT msg FROM log").await;
    assert_eq!(rows[0]["msg"], "first\nsecond");
    let rows = server.query("lp", r#"SELECT """v""" FROM """quoted""#).await;
    assert_eq!(rows[0]["\"v\""], 1);

    for (precision, unit) in [("s", 1_000_000_000i64), ("ms", 1_000_000), ("us", 1_000)] {
        let line = format!("receipt,p={precision} v=1");
        let (status, body) =
            server.write(&format!("/write?db=lp&precision={precision}"), line).await;
        assert_eq!(status, 204, "{body}");
        let rows = server
            .query(
                "lp",
                &format!("SELECT CAST(time AS BIGINT) AS ns FROM receipt WHERE p = '{precision}'"),
            )
            .await;
        let ns = rows[0]["ns"].as_i64().expect("ns");
        assert_eq!(ns % unit, 0, "receipt time truncated to {precision}: {ns}");
    }

    for endpoint in ["/write?db=lp", "/api/v2/write?bucket=lp", "/api/v3/write_lp?db=lp"] {
        for empty in ["", "\n\n", "# only a comment\n  \n"] {
            let (status, body) = server.write(endpoint, empty).await;
            assert_eq!(status, 400, "{endpoint} {empty:?}");
            assert!(body.contains("empty write"), "{body}");
        }
        let (status, body) = server.write(endpoint, b"ok v=1 1\nbad,t=\xff v=2 2".to_vec()).await;
        assert_eq!(status, 400, "{endpoint}");
        assert!(body.contains("not valid UTF-8: line 2"), "{body}");
    }
    assert_eq!(
        server
            .count(
                "lp",
                "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'ok'"
            )
            .await,
        0,
        "a non-UTF-8 body is refused whole"
    );

    let huge = format!("big v=\"{}\" 1\nbig v=\"small\" 2\n", "x".repeat((1 << 20) + 1));
    let (status, body) = server.write("/write?db=lp", huge).await;
    assert_eq!(status, 400);
    assert!(body.contains("line 1") && body.contains("longer than 1048576 bytes"), "{body}");
    assert_eq!(server.count("lp", "SELECT count(*) FROM big").await, 1, "the other line is stored");

    let (status, body) = server.write("/write?db=lp", "bs,t=a\\\\ v=1 1\nbs,t=b v=1 2").await;
    assert_eq!(status, 400);
    assert!(body.contains("ends in a backslash"), "{body}");
    assert_eq!(server.count("lp", "SELECT count(*) FROM bs").await, 1);
}
