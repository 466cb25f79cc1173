//! Retention (issue 13): rows past a table's retention vanish from queries and the last-value
//! cache at once, writes of them are refused line by line, their files leave the manifest
//! (`system.files`) and the store, and all of it holds across a restart; lengthening the
//! retention does not bring expired rows back. Set by SQL and by InfluxDB 3's configure API.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::harness::{client, eventually, Server};

const FLAGS: [&str; 6] =
    ["--persist-interval", "1s", "--compaction-interval", "0s", "--compaction-grace", "0s"];
const DAY_S: i64 = 86_400;

fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64
}

async fn files(server: &Server, table: &str) -> i64 {
    server
        .count("r", &format!("SELECT count(*) FROM system.files WHERE table_name = '{table}'"))
        .await
}

#[tokio::test]
async fn expired_rows_vanish_at_once_their_files_go_and_writes_of_them_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &FLAGS);
    let now = now_s();
    // Three days ago (a partition of its own) and ten minutes ago; cpu and mem alike.
    let mut body = String::new();
    for (age, host) in [(3 * DAY_S, "old"), (600, "new")] {
        for i in 0..5 {
            body += &format!("cpu,host={host} v={i} {}\n", now - age + i);
            body += &format!("mem,host={host} v={i} {}\n", now - age + i);
        }
    }
    let (status, text) = server.write("/write?db=r&precision=s", body).await;
    assert_eq!(status, 204, "{text}");
    assert!(
        eventually(Duration::from_secs(30), || async { files(&server, "cpu").await == 2 }).await,
        "both of cpu's partitions persisted"
    );
    // A point buffered, not persisted, is just as gone.
    let (status, text) = server
        .write("/write?db=r&precision=s", format!("cpu,host=old2 v=1 {}\n", now - 2 * DAY_S))
        .await;
    assert_eq!(status, 204, "{text}");
    assert_eq!(server.count("r", "SELECT count(*) FROM cpu").await, 11);
    assert_eq!(server.query("r", "SELECT * FROM last_cache('cpu')").await.len(), 3);

    let (status, text) = server.execute("r", "ALTER TABLE cpu SET retention = '1d'").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(server.count("r", "SELECT count(*) FROM cpu").await, 5, "old rows gone at once");
    assert_eq!(server.count("r", "SELECT count(*) FROM cpu WHERE host = 'old'").await, 0);
    assert_eq!(
        server.count("r", "SELECT count(*) FROM mem").await,
        10,
        "another table keeps its rows"
    );
    let last = server.query("r", "SELECT host FROM last_cache('cpu')").await;
    assert_eq!(last, vec![json!({"host": "new"})], "the last-value cache too");
    let retention = server
        .query("r", "SELECT retention, set_on FROM system.retention WHERE table_name = 'cpu'")
        .await;
    assert_eq!(retention, vec![json!({"retention": "1day", "set_on": "table"})]);

    // A write of an expired point is refused with its line and reason; the others are stored.
    let (status, text) = server
        .write(
            "/api/v3/write_lp?db=r&precision=second&accept_partial=true",
            format!("cpu,host=late v=1 {}\ncpu,host=new v=9 {}\n", now - 2 * DAY_S, now),
        )
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("retention") && text.contains("\"line_number\":1"), "{text}");
    assert_eq!(server.count("r", "SELECT count(*) FROM cpu").await, 6);

    // The old partition's file leaves the manifest and the store.
    assert!(
        eventually(Duration::from_secs(90), || async { files(&server, "cpu").await == 1 }).await,
        "the expired file was removed"
    );
    let expired = server
        .query(
            "r",
            "SELECT expired_before IS NOT NULL AS e FROM system.retention WHERE table_name = 'cpu'",
        )
        .await;
    assert_eq!(expired, vec![json!({"e": true})]);

    // Clearing the table's retention does not bring the expired rows back.
    let (status, text) = server.execute("r", "ALTER TABLE cpu RESET retention").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(server.count("r", "SELECT count(*) FROM cpu WHERE host = 'old'").await, 0);

    // Across a restart (the buffered old row is not replayed back either).
    let mut server = server;
    assert_eq!(server.terminate(), Some(0));
    let server = server.restart();
    assert_eq!(server.count("r", "SELECT count(*) FROM cpu").await, 6);
    assert_eq!(server.count("r", "SELECT count(*) FROM cpu WHERE host = 'old2'").await, 0);
    assert_eq!(server.count("r", "SELECT count(*) FROM mem").await, 10);

    // InfluxDB 3's configure API: the database's retention applies to mem.
    let response = client()
        .put(server.url("/api/v3/configure/database"))
        .json(&json!({"db": "r", "retention_period": "2d"}))
        .send()
        .await
        .expect("configure");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(server.count("r", "SELECT count(*) FROM mem").await, 5);
}

#[tokio::test]
async fn retention_statements_and_their_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &FLAGS);
    let (status, text) = server.execute("r", "CREATE DATABASE r WITH (retention = '30d')").await;
    assert_eq!(status, 200, "{text}");
    let rows = server
        .query(
            "r",
            "SELECT retention, retention_seconds FROM system.retention WHERE table_name IS NULL",
        )
        .await;
    assert_eq!(rows, vec![json!({"retention": "30days", "retention_seconds": 30 * DAY_S})]);
    let (status, text) = server.execute("r", "CREATE DATABASE r WITH (retention = '30d')").await;
    assert_eq!(status, 409, "{text}");
    for (sql, expected) in [
        ("ALTER TABLE nope SET retention = '1d'", 404),
        ("ALTER DATABASE nope SET retention = '1d'", 404),
        ("ALTER DATABASE r SET retention = 'soon'", 400),
        ("ALTER DATABASE r SET retention = '0s'", 400),
        ("ALTER DATABASE r SET retention = '900000000d'", 400),
        ("ALTER DATABASE r SET retention 7", 400),
    ] {
        let (status, text) = server.execute("r", sql).await;
        assert_eq!(status, expected, "{sql}: {text}");
    }
    // A retention shorter than a point's age refuses it.
    let (status, text) = server.execute("r", "ALTER DATABASE r SET retention = '1h'").await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = server
        .write("/write?db=r&precision=s", format!("cpu,host=a v=1 {}\n", now_s() - 7200))
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("retention period of table \\\"cpu\\\""), "{text}");
    // POST creates with the API's shape; an unknown field is refused.
    let post = |body: serde_json::Value| {
        client().post(server.url("/api/v3/configure/database")).json(&body).send()
    };
    let response = post(json!({"db": "s", "retention_period": "7d"})).await.expect("post");
    assert_eq!(response.status().as_u16(), 201);
    let response = post(json!({"db": "s"})).await.expect("post");
    assert_eq!(response.status().as_u16(), 409);
    let response = post(json!({"db": "t", "retention": "7d"})).await.expect("post");
    assert_eq!(response.status().as_u16(), 400);
    // InfluxQL's CREATE DATABASE … WITH DURATION keeps the duration.
    let response = client()
        .post(server.url("/query"))
        .form(&[("q", "CREATE DATABASE \"telegraf\" WITH DURATION 14d REPLICATION 1")])
        .send()
        .await
        .expect("influxql");
    assert_eq!(response.status().as_u16(), 200);
    let rows = server
        .query("telegraf", "SELECT retention FROM system.retention WHERE table_name IS NULL")
        .await;
    assert_eq!(rows, vec![json!({"retention": "14days"})]);
}

/// A view, and a view over it, equal their queries over the table after a retention cuts the
/// table: hour buckets wholly before the cutoff are gone, the one holding it counts only the
/// rows kept, and the day view above agrees with the raw rows too.
#[tokio::test]
async fn views_stay_exact_under_a_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &FLAGS);
    let now = now_s();
    // A point a minute per host over three days, half a minute off the cutoff's grid, so the
    // cutoff (now − 1 day, moving while the test runs) crosses no point between two queries.
    let mut body = String::new();
    for k in 0..3 * 1440 {
        for host in ["a", "b"] {
            body += &format!("cpu,host={host} v={} {}\n", k % 7, now - k * 60 - 30);
        }
    }
    let (status, text) = server.write("/write?db=r&precision=s", body).await;
    assert_eq!(status, 204, "{text}");
    let hourly = "SELECT date_bin(INTERVAL '1 hour', time) AS b, host, count(*) AS n, sum(v) AS s \
                  FROM cpu GROUP BY b, host";
    let daily_raw =
        "SELECT date_bin(INTERVAL '1 day', time) AS d, host, count(*) AS n, sum(v) AS s \
                     FROM cpu GROUP BY d, host ORDER BY d, host";
    for sql in [
        format!("CREATE MATERIALIZED VIEW cpu_h AS {hourly}"),
        "CREATE MATERIALIZED VIEW cpu_d AS SELECT date_bin(INTERVAL '1 day', b) AS d, host, \
         sum(n) AS n, sum(s) AS s FROM cpu_h GROUP BY d, host"
            .to_string(),
        "REFRESH MATERIALIZED VIEW cpu_h".to_string(),
        "REFRESH MATERIALIZED VIEW cpu_d".to_string(),
    ] {
        let (status, text) = server.execute("r", &sql).await;
        assert_eq!(status, 200, "{sql}: {text}");
    }
    let (status, text) = server.execute("r", "ALTER TABLE cpu SET retention = '1d'").await;
    assert_eq!(status, 200, "{text}");
    let raw = server.query("r", &format!("{hourly} ORDER BY b, host")).await;
    let view = server.query("r", "SELECT b, host, n, s FROM cpu_h ORDER BY b, host").await;
    assert!(raw.len() >= 2 * 24, "a day of hours, per host: {}", raw.len());
    assert_eq!(view, raw);
    let raw = server.query("r", daily_raw).await;
    let view = server.query("r", "SELECT d, host, n, s FROM cpu_d ORDER BY d, host").await;
    assert_eq!(view, raw);
    assert_eq!(server.count("r", "SELECT sum(n) FROM cpu_h").await, 2 * 1440);
}
