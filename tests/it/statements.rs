//! The statement pipeline end to end: the same statement behaves the same on the simple and the
//! extended protocol, inside `COPY (query) TO STDOUT` and over HTTP; and nothing but Sundial's
//! own statements changes anything — no SQL reads or writes a server file or changes another
//! client's session.

use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

use crate::harness::{client, enc, Server};
use crate::pg::connect;

fn rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

async fn copy_out(client: &tokio_postgres::Client, sql: &str) -> String {
    use futures::StreamExt;
    let stream = client.copy_out(sql).await.expect("copy out");
    let chunks: Vec<bytes::Bytes> = stream.map(|c| c.expect("copy data")).collect::<Vec<_>>().await;
    String::from_utf8(chunks.concat()).expect("utf-8")
}

async fn server_with_data() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let body = "cpu,host=a usage=1 1704067200\ncpu,host=a usage=4 1704067380\n\
                cpu,host=b usage=5 1704067260\ncpu,host=b usage=7 1704067270";
    assert_eq!(server.write("/api/v3/write_lp?db=st&precision=s", body).await.0, 204);
    (dir, server)
}

#[tokio::test]
async fn show_set_and_reset_answer_alike_on_both_protocols() {
    let (_dir, server) = server_with_data().await;
    let client = connect(&server, "st").await.expect("connect");
    // Extended protocol (Parse/Describe/Bind/Execute): Sundial's own SHOW, with its column.
    let row = client.query_one("SHOW server_version", &[]).await.expect("show (extended)");
    assert_eq!(row.columns()[0].name(), "server_version");
    assert_eq!(row.get::<_, String>(0), "16.6");
    let simple = client.simple_query("SHOW server_version").await.expect("show (simple)");
    assert_eq!(rows(&simple), vec![vec![Some("16.6".to_string())]]);

    // SET / RESET on the extended protocol change this session's setting, as on the simple.
    client.execute("SET statement_timeout = '2s'", &[]).await.expect("set (extended)");
    let row = client.query_one("SHOW statement_timeout", &[]).await.expect("show");
    assert_eq!(row.get::<_, String>(0), "2000ms");
    client.execute("RESET statement_timeout", &[]).await.expect("reset (extended)");
    let row = client.query_one("SHOW statement_timeout", &[]).await.expect("show");
    assert_eq!(row.get::<_, String>(0), "0");
    client.batch_execute("SET application_name = 'x'; RESET ALL").await.expect("reset all");

    // An unknown setting is an error, as in PostgreSQL, and the session goes on.
    let error = client.query_one("SHOW no_such_setting", &[]).await.expect_err("unknown");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_OBJECT), "{error:?}");
    // A setting that is the protocol's own cannot be changed: no moving to another database.
    for sql in ["SET database = 'other'", "RESET database", "SET user = 'admin'"] {
        let error = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(error.code(), Some(&SqlState::CANT_CHANGE_RUNTIME_PARAM), "{sql}: {error:?}");
    }
    // A SHOW whose name would be SQL inside DataFusion's settings query is only a name here.
    let error = client
        .simple_query(r#"SHOW "datafusion.runtime.'; SELECT 1; --""#)
        .await
        .expect_err("unknown setting");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_OBJECT), "{error:?}");
    let row = client.query_one("SHOW transaction_read_only", &[]).await.expect("driver setting");
    assert_eq!(row.get::<_, String>(0), "off");
    let error = client.batch_execute("SET client_encoding = 'LATIN1'").await.expect_err("utf8");
    assert_eq!(error.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{error:?}");

    // Cursors: the declared query goes through the pipeline; a cursor over a write is refused.
    client
        .batch_execute("BEGIN; DECLARE c CURSOR FOR SELECT host FROM cpu ORDER BY host, time")
        .await
        .expect("declare");
    let fetched = client.simple_query("FETCH 3 FROM c").await.expect("fetch");
    assert_eq!(
        rows(&fetched),
        vec![vec![Some("a".to_string())], vec![Some("a".to_string())], vec![Some("b".to_string())]]
    );
    client.batch_execute("CLOSE c; COMMIT").await.expect("close");
    let error =
        client.batch_execute("DECLARE d CURSOR FOR DELETE FROM cpu").await.expect_err("refused");
    assert_eq!(error.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{error:?}");

    // After an error inside a transaction, both protocols refuse statements until it ends.
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute("SELECT nosuch FROM cpu").await.expect_err("fails");
    let error = client.simple_query("SELECT 1").await.expect_err("aborted (simple)");
    assert_eq!(error.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION), "{error:?}");
    let error = client.query("SELECT 1", &[]).await.expect_err("aborted (extended)");
    assert_eq!(error.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION), "{error:?}");
    client.batch_execute("ROLLBACK").await.expect("rollback");

    // Transactions and savepoints are accepted on both protocols.
    client.batch_execute("BEGIN; SAVEPOINT s; RELEASE SAVEPOINT s; COMMIT").await.expect("tx");
    client.execute("BEGIN", &[]).await.expect("begin (extended)");
    client.execute("COMMIT", &[]).await.expect("commit (extended)");
    assert_eq!(
        client.query_one("SELECT count(*) FROM cpu", &[]).await.unwrap().get::<_, i64>(0),
        4
    );
}

#[tokio::test]
async fn copy_of_a_query_goes_through_the_same_rewrites() {
    let (_dir, server) = server_with_data().await;
    let client = connect(&server, "st").await.expect("connect");
    // Gap filling inside COPY: every minute of the range, as the plain query gives it.
    let gapfill = "SELECT date_bin_gapfill(INTERVAL '1 minute', time) AS minute, host, \
                   locf(avg(usage)) AS carried FROM cpu \
                   WHERE time >= '2024-01-01T00:00:00Z' AND time < '2024-01-01T00:05:00Z' \
                   GROUP BY 1, host";
    let copied = copy_out(&client, &format!("COPY ({gapfill}) TO STDOUT (FORMAT csv)")).await;
    let lines: Vec<&str> = copied.lines().collect();
    assert_eq!(lines.len(), 10, "5 minutes × 2 hosts: {copied}");
    assert!(lines.contains(&"2024-01-01T00:02:00Z,a,1.0"), "{copied}");
    assert!(lines.contains(&"2024-01-01T00:00:00Z,b,"), "{copied}");
    let direct = client.simple_query(gapfill).await.expect("direct");
    assert_eq!(rows(&direct).len(), 10);

    // The last point per series inside COPY: the cache's rows, the same as the direct query
    // (which EXPLAIN shows reading the cache).
    let lastpoint = "SELECT DISTINCT ON (host) host, usage FROM cpu ORDER BY host, time DESC";
    let explained = client.simple_query(&format!("EXPLAIN {lastpoint}")).await.expect("explain");
    let plan = rows(&explained).concat().into_iter().flatten().collect::<Vec<_>>().join("\n");
    assert!(plan.to_lowercase().contains("last_cache"), "{plan}");
    let copied = copy_out(&client, &format!("COPY ({lastpoint}) TO STDOUT")).await;
    assert_eq!(copied, "a\t4.0\nb\t7.0\n");
    // COPY to or from a server file or program is refused.
    let file = _dir.path().join("stolen.csv");
    for sql in [
        format!("COPY cpu TO '{}'", file.display()),
        format!("COPY (SELECT 1) TO '{}'", file.display()),
        "COPY cpu FROM '/etc/hostname'".to_string(),
        format!("COPY (SELECT 1) TO PROGRAM 'touch {}'", file.display()),
    ] {
        let error = client.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(error.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{sql}: {error:?}");
    }
    assert!(!file.exists(), "no file written");
}

#[tokio::test]
async fn no_sql_touches_server_files_or_other_sessions() {
    let (dir, server) = server_with_data().await;
    let secret = dir.path().join("secret.csv");
    std::fs::write(&secret, "line\nsecret\n").expect("write secret");
    let written = dir.path().join("written.csv");
    let attacks = [
        format!("COPY (SELECT 'x' AS a) TO '{}'", written.display()),
        "CREATE SCHEMA s".to_string(),
        format!(
            "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION '{}'",
            secret.display()
        ),
        format!("CREATE EXTERNAL TABLE public.p STORED AS CSV LOCATION '{}'", secret.display()),
        "CREATE VIEW v AS SELECT 1".to_string(),
        "SET datafusion.runtime.memory_limit = '100G'".to_string(),
        "SET datafusion.execution.target_partitions = 1000".to_string(),
        "UPDATE cpu SET usage = 0".to_string(),
        "DELETE FROM cpu".to_string(),
        "PREPARE p AS SELECT 1".to_string(),
        "INSERT INTO pg_catalog.pg_am SELECT * FROM pg_catalog.pg_am".to_string(),
    ];
    // Over HTTP, by POST: a 400 with the reason, nothing done.
    for sql in &attacks {
        let response = client()
            .post(server.url("/api/v3/query_sql"))
            .json(&serde_json::json!({"db": "st", "q": sql}))
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        assert_eq!(status, 400, "{sql}: {}", response.text().await.unwrap_or_default());
    }
    // Over Postgres, both protocols: 0A000 (or a syntax error for DataFusion's own syntax).
    let pg = connect(&server, "st").await.expect("connect");
    for sql in &attacks {
        let simple = pg.batch_execute(sql).await.expect_err(sql);
        let extended = pg.execute(sql.as_str(), &[]).await.expect_err(sql);
        for error in [simple, extended] {
            let code = error.code().cloned();
            assert!(
                code == Some(SqlState::FEATURE_NOT_SUPPORTED)
                    || code == Some(SqlState::SYNTAX_ERROR),
                "{sql}: {error:?}"
            );
        }
    }
    assert!(!written.exists(), "no file written");
    let error = pg.query("SELECT * FROM p", &[]).await.expect_err("no external table");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_TABLE), "{error:?}");
    // The engine's settings are unchanged for everyone.
    let other = connect(&server, "st").await.expect("connect");
    let row = other
        .query_one("SELECT value FROM information_schema.df_settings WHERE name = 'datafusion.execution.target_partitions'", &[])
        .await
        .expect("settings");
    assert_ne!(row.get::<_, Option<String>>(0).as_deref(), Some("1000"));
    // Session commands over HTTP say they need a session; transactions are no-ops.
    let (status, body) = server.query_raw("st", "SHOW server_version", "json").await;
    assert!(status == 400 && body.contains("Postgres"), "{status} {body}");
    let (status, body) = server.query_raw("st", "BEGIN", "json").await;
    assert_eq!(status, 200, "{body}");
    // The data is all there.
    assert_eq!(server.count("st", "SELECT count(*) FROM cpu").await, 4);
    let response = client()
        .get(format!("{}?db=st&q={}", server.url("/api/v3/query_sql"), enc("SELECT 1; SELECT 2")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 400, "one statement per HTTP query");
    // InfluxQL on v1 /query: retention clauses SQL does not parse still create the database.
    let influxql = enc("CREATE DATABASE \"kept\" WITH DURATION 30d REPLICATION 1");
    let response = client()
        .post(format!("{}?q={influxql}", server.url("/query")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let (status, _) = server.query_raw("kept", "SHOW TABLES", "json").await;
    assert_eq!(status, 200, "database created");
    let response = client()
        .post(format!("{}?q={}", server.url("/query"), enc("DELETE FROM cpu")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 400, "only database statements on /query");
}

#[tokio::test]
async fn browsers_cannot_change_data() {
    let (_dir, server) = server_with_data().await;
    let url = |q: &str| format!("{}?db=st&q={}", server.url("/api/v3/query_sql"), enc(q));
    // A GET (a link, an image, a page's fetch without CORS) never changes anything.
    for q in [
        "DROP TABLE cpu",
        "CREATE TABLE t (host TEXT, v DOUBLE PRECISION, PRIMARY KEY (host))",
        "INSERT INTO cpu (host, usage) VALUES ('x', 1)",
        "EXPLAIN ANALYZE INSERT INTO cpu (host, usage) VALUES ('x', 1)",
    ] {
        let response = client().get(url(q)).send().await.expect("request");
        assert_eq!(response.status().as_u16(), 405, "{q}");
        assert_eq!(response.headers()["allow"], "POST");
    }
    let response = client()
        .get(format!("{}?q={}", server.url("/query"), enc("DROP DATABASE st")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 405);
    let response = client()
        .get(format!("{}?q={}", server.url("/query"), enc("SHOW DATABASES")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200, "reads stay on GET");
    // HEAD is a GET without the body: no change either (a page's no-cors HEAD has no Origin).
    let response = client()
        .head(format!("{}?q={}", server.url("/query"), enc("DROP DATABASE st")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(server.count("st", "SELECT count(*) FROM cpu").await, 4);

    // A web page's POST carries its Origin: another site, or a rebound name, is refused.
    let form = |origin: &str, host: Option<&str>| {
        let mut request = client()
            .post(server.url("/query"))
            .header("Origin", origin)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("q=DROP+DATABASE+st");
        if let Some(host) = host {
            request = request.header("Host", host);
        }
        request
    };
    let port = server.url("/").rsplit(':').next().unwrap_or("").trim_end_matches('/').to_string();
    let attacks = [
        ("http://evil.example", None),
        ("null", None),
        ("http://evil.example", Some(format!("evil.example:{port}"))),
    ];
    for (origin, host) in &attacks {
        let response = form(origin, host.as_deref()).send().await.expect("request");
        assert_eq!(response.status().as_u16(), 403, "{origin} {host:?}");
    }
    for path in ["/api/v3/write_lp?db=st", "/write?db=st"] {
        let response = client()
            .post(server.url(path))
            .header("Origin", "http://evil.example")
            .body("cpu,host=z usage=1 1")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 403, "{path}");
    }
    assert_eq!(server.count("st", "SELECT count(*) FROM cpu").await, 4, "nothing changed");
    // A page's GET carries Sec-Fetch-Site: another site, or a rebound name, cannot read data.
    let read = url("SELECT host FROM cpu");
    let port_host = format!("evil.example:{port}");
    for (site, host) in
        [("cross-site", None), ("same-site", None), ("same-origin", Some(port_host.as_str()))]
    {
        let mut request = client().get(&read).header("Sec-Fetch-Site", site);
        if let Some(host) = host {
            request = request.header("Host", host);
        }
        assert_eq!(request.send().await.expect("request").status().as_u16(), 403, "{site}");
    }
    // An address typed into the browser is the user's own request.
    let response = client().get(&read).header("Sec-Fetch-Site", "none").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // The server's own origin (a page it would serve) is allowed.
    let own = format!("http://127.0.0.1:{port}");
    let response = client()
        .post(format!("{}?q={}", server.url("/query"), enc("SHOW DATABASES")))
        .header("Origin", own.as_str())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
}
