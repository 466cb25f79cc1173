//! The Postgres wire protocol with real clients: psql and tokio-postgres (simple and extended
//! protocol, binary types, SQLSTATEs, connection reuse after errors).

use std::process::Command;

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::harness::Server;

pub async fn connect(
    server: &Server,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_addr(&server.pg_addr, db).await
}

pub async fn connect_addr(
    pg_addr: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (host, port) = pg_addr.rsplit_once(':').expect("host:port");
    let config =
        format!("host={host} port={port} user=sundial dbname={db} application_name=sundial-tests");
    let (client, connection) = tokio_postgres::connect(&config, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn psql(server: &Server, db: &str, commands: &[&str]) -> (bool, String) {
    psql_env(server, db, commands, &[])
}

fn psql_env(server: &Server, db: &str, commands: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let (host, port) = server.pg_addr.rsplit_once(':').expect("host:port");
    let mut command = Command::new("psql");
    command.args([
        "-X",
        "-h",
        host,
        "-p",
        port,
        "-U",
        "sundial",
        "-d",
        db,
        "-v",
        "ON_ERROR_STOP=1",
    ]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    let output = command
        .env("PGCONNECT_TIMEOUT", "10")
        .envs(envs.iter().copied())
        .output()
        .expect("psql is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

async fn server_with_cpu() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let body = "cpu,host=a,region=eu usage=1.5,n=3i,ok=t 1700000000\ncpu,host=b,region=us usage=2.5,n=4i,ok=f 1700000010";
    assert_eq!(server.write("/api/v3/write_lp?db=pgdb&precision=s", body).await.0, 204);
    (dir, server)
}

#[tokio::test]
async fn psql_queries_and_lists_tables() {
    let (_dir, server) = server_with_cpu().await;
    let (ok, out) =
        psql(&server, "pgdb", &["SELECT host, usage, n, ok, time FROM cpu ORDER BY host"]);
    assert!(ok, "{out}");
    assert!(out.contains(" a    |   1.5 | 3 | t  | 2023-11-14 22:13:20"), "{out}");
    assert!(out.contains("(2 rows)"), "{out}");
    let (ok, out) = psql(&server, "pgdb", &["\\dt"]);
    assert!(ok, "{out}");
    assert!(out.contains("cpu"), "{out}");
    // psql's describe commands read pg_catalog.
    let (ok, out) = psql(&server, "pgdb", &["\\d cpu"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("Table \"public.cpu\"")
            && out.contains(" time   | timestamp with time zone |"),
        "{out}"
    );
    assert!(
        out.contains(" usage  | double precision") && out.contains(" ok     | boolean"),
        "{out}"
    );
    let (ok, out) = psql(&server, "pgdb", &["\\l", "\\dn", "\\df", "\\d"]);
    assert!(ok, "{out}");
    assert!(out.contains("List of databases") && out.contains(" pgdb "), "{out}");
    assert!(out.contains("List of schemas") && out.contains(" public "), "{out}");
    assert!(out.contains("List of functions") && out.contains("List of relations"), "{out}");
    // psql's \copy out, CSV with a header.
    let csv = std::env::temp_dir().join(format!("sundial-copy-{}.csv", std::process::id()));
    let (ok, out) = psql(
        &server,
        "pgdb",
        &[&format!(
            "\\copy (SELECT host, usage, n FROM cpu ORDER BY host) to '{}' csv header",
            csv.display()
        )],
    );
    assert!(ok && out.contains("COPY 2"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&csv).expect("copied file"),
        "host,usage,n\na,1.5,3\nb,2.5,4\n"
    );
    let _ = std::fs::remove_file(&csv);
    let (ok, out) = psql(&server, "pgdb", &["COPY (SELECT host FROM cpu ORDER BY host) TO STDOUT"]);
    assert!(ok && out.starts_with("a\nb\n"), "{out}");
    let (ok, out) = psql(&server, "pgdb", &["SELECT version()", "SELECT current_database()"]);
    assert!(ok, "{out}");
    assert!(out.contains("pgdb") && out.contains("PostgreSQL 16.6"), "{out}");
    // Several statements in one simple query, and empty ones (Grafana's health checks).
    let (ok, out) = psql(&server, "pgdb", &["SELECT 1 AS one; SELECT 2 AS two;", ";", "-- ping"]);
    assert!(ok, "{out}");
    assert!(out.contains("one") && out.contains("two"), "{out}");
}

#[tokio::test]
async fn copy_from_stdin_in_text_and_csv() {
    let (_dir, server) = server_with_cpu().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // psql's \copy from, text format: tab separated, \N for NULL.
    let text = dir.path().join("rows.tsv");
    std::fs::write(
        &text,
        "c\tasia\t7.5\t\\N\t2023-11-14 22:13:40+00\nd\tasia\t8.5\t9\t2023-11-14T22:13:50Z\n",
    )
    .expect("write");
    let (ok, out) = psql(
        &server,
        "pgdb",
        &[&format!("\\copy cpu (host, region, usage, n, time) from '{}'", text.display())],
    );
    assert!(ok && out.contains("COPY 2"), "{out}");
    // CSV with a header, through COPY … FROM STDIN fed on psql's standard input.
    let csv = dir.path().join("rows.csv");
    std::fs::write(&csv, "host,usage,time\ne,\"10.5\",2023-11-14 22:14:00+00\n").expect("write");
    let (ok, out) = psql(
        &server,
        "pgdb",
        &[&format!("\\copy cpu (host, usage, time) from '{}' csv header", csv.display())],
    );
    assert!(ok && out.contains("COPY 1"), "{out}");
    let (ok, out) =
        psql(&server, "pgdb", &["SELECT host, usage, n FROM cpu WHERE host >= 'c' ORDER BY host"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(" c    |   7.5 |  \n")
            && out.contains(" d    |   8.5 | 9")
            && out.contains(" e    |  10.5 |"),
        "{out}"
    );
    // A bad row stores nothing and names its line; the connection goes on.
    std::fs::write(&text, "f\t1\ng\tlots\n").expect("write");
    let (ok, out) =
        psql(&server, "pgdb", &[&format!("\\copy cpu (host, usage) from '{}'", text.display())]);
    assert!(!ok && out.contains("line 2, column usage"), "{out}");
    // tokio-postgres sends COPY over the extended protocol.
    let client = connect(&server, "pgdb").await.expect("connect");
    let sink = client
        .copy_in("COPY cpu (host, usage, time) FROM STDIN (FORMAT csv)")
        .await
        .expect("copy in");
    futures::pin_mut!(sink);
    use futures::SinkExt;
    sink.send(bytes::Bytes::from_static(b"h,1.25,2023-11-14 22:15:00+00\n")).await.expect("data");
    assert_eq!(sink.finish().await.expect("finish"), 1);
    let count: i64 = client
        .query_one("SELECT count(*) FROM cpu WHERE host IN ('f', 'g', 'h')", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 1, "only the good COPY stored rows");
    // …and COPY TO STDOUT too; a text-format value with a tab comes out escaped.
    client
        .batch_execute(
            "INSERT INTO cpu (host, usage, time) VALUES ('tab\there', 1, '2023-11-14T22:16:00Z')",
        )
        .await
        .expect("insert");
    let stream = client
        .copy_out("COPY (SELECT host FROM cpu WHERE host >= 'h' ORDER BY host) TO STDOUT")
        .await
        .expect("copy out");
    use futures::TryStreamExt;
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.expect("rows");
    assert_eq!(chunks.concat(), b"h\ntab\\there\n");
    let error =
        client.copy_in::<_, bytes::Bytes>("COPY nosuch FROM STDIN").await.err().expect("no table");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_TABLE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_cancels_memory_limits_and_ssl_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--query-memory-max", "16MiB"]);
    assert_eq!(server.write("/api/v3/write_lp?db=pgdb", "m v=1 1").await.0, 204);
    let client = connect(&server, "pgdb").await.expect("connect");
    // A scan that would take minutes: far longer than any timeout below.
    let endless = "SELECT count(*) FROM range(100000000000)";

    // statement_timeout stops the query while it computes, on both protocols.
    client.batch_execute("SET statement_timeout = 300").await.expect("set");
    let started = std::time::Instant::now();
    let error = client.simple_query(endless).await.expect_err("times out");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error:?}");
    let error = client.query(endless, &[]).await.expect_err("times out (extended)");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
    client.batch_execute("RESET statement_timeout").await.expect("reset");
    let shown = client.simple_query("SHOW statement_timeout").await.expect("show");
    assert!(
        matches!(&shown[1], tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("0")),
        "{shown:?}"
    );

    // A CancelRequest from another connection stops it too; the session goes on.
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    let started = std::time::Instant::now();
    let error = client.simple_query(endless).await.expect_err("canceled");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error:?}");
    assert!(error.as_db_error().is_some_and(|e| e.message().contains("user request")), "{error:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    canceller.await.expect("task").expect("cancel request sent");
    let row = client.query_one("SELECT count(*) FROM m", &[]).await.expect("usable after cancel");
    assert_eq!(row.get::<_, i64>(0), 1);

    // A query that needs more than the memory pool fails with 53200; the server stays up.
    let error = client
        .simple_query("SELECT cardinality(array_agg(value)) FROM range(20000000)")
        .await
        .expect_err("out of memory");
    assert_eq!(error.code(), Some(&SqlState::OUT_OF_MEMORY), "{error:?}");
    assert_eq!(
        client.query_one("SELECT 1::BIGINT", &[]).await.expect("still serving").get::<_, i64>(0),
        1
    );

    // SSL is refused cleanly: a client that requires it is told so, one that prefers it goes on.
    let (ok, out) = psql_env(&server, "pgdb", &["SELECT 1"], &[("PGSSLMODE", "require")]);
    assert!(!ok && out.contains("does not support SSL"), "{out}");
    let (ok, out) = psql_env(&server, "pgdb", &["SHOW server_version"], &[("PGSSLMODE", "prefer")]);
    assert!(ok && out.contains("16.6"), "{out}");
}

#[tokio::test]
async fn explain_analyze_shows_pruning_over_postgres() {
    let (_dir, mut server) = server_with_cpu().await;
    assert_eq!(server.terminate(), Some(0), "shutdown persists the rows to Parquet");
    let server = server.restart();
    let client = connect(&server, "pgdb").await.expect("connect");
    let plan = |messages: Vec<tokio_postgres::SimpleQueryMessage>| -> String {
        messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .filter_map(|i| row.get(i).map(String::from))
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                _ => None,
            })
            .collect()
    };
    let sql = "SELECT usage FROM cpu WHERE host = 'a' AND time >= '2023-11-14T22:13:20Z'";
    let explained = plan(client.simple_query(&format!("EXPLAIN {sql}")).await.expect("explain"));
    assert!(
        explained.contains("DataSourceExec")
            && explained.contains(".parquet")
            && explained.contains("pruning_predicate"),
        "{explained}"
    );
    let analyzed = plan(
        client.simple_query(&format!("EXPLAIN ANALYZE {sql}")).await.expect("explain analyze"),
    );
    for metric in [
        "files_ranges_pruned_statistics",
        "row_groups_pruned_statistics",
        "page_index_rows_pruned",
        "output_rows",
    ] {
        assert!(analyzed.contains(metric), "{metric} missing from {analyzed}");
    }
    // The extended protocol answers EXPLAIN ANALYZE as well.
    let rows = client
        .query(&format!("EXPLAIN ANALYZE {sql}"), &[])
        .await
        .expect("extended explain analyze");
    assert!(rows.iter().any(|r| r.get::<_, String>(1).contains("row_groups_pruned_statistics")));
}

#[tokio::test]
async fn pgjdbc_metadata_and_prepared_statements() {
    let (_dir, server) = server_with_cpu().await;
    let (host, port) = server.pg_addr.rsplit_once(':').expect("host:port");
    let program = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/JdbcClient.java");
    let output = Command::new("java")
        .args(["-cp", "/usr/share/java/postgresql.jar", program, host, port, "pgdb"])
        .output()
        .expect("java is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success() && text.contains("jdbc client ok"), "{text}");
}

#[tokio::test]
async fn unknown_database_is_refused_with_3d000() {
    let (_dir, server) = server_with_cpu().await;
    let error = connect(&server, "nope").await.expect_err("no such database");
    assert_eq!(error.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{error:?}");
    let (ok, out) = psql(&server, "nope", &["SELECT 1"]);
    assert!(!ok);
    assert!(out.contains("database \"nope\" does not exist"), "{out}");
}

#[tokio::test]
async fn errors_carry_sqlstates_and_the_connection_stays_usable() {
    let (_dir, server) = server_with_cpu().await;
    let client = connect(&server, "pgdb").await.expect("connect");
    let cases = [
        ("SELEC 1", SqlState::SYNTAX_ERROR),
        ("SELECT * FROM missing_table", SqlState::UNDEFINED_TABLE),
        ("SELECT missing_column FROM cpu", SqlState::UNDEFINED_COLUMN),
        ("SELECT 1 / 0", SqlState::DIVISION_BY_ZERO),
    ];
    for (sql, code) in cases {
        let error = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(error.code(), Some(&code), "{sql}: {error:?}");
        let error = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(error.code(), Some(&code), "extended {sql}: {error:?}");
        // The same connection still answers.
        let rows =
            client.query("SELECT count(*) FROM cpu", &[]).await.expect("good query after an error");
        assert_eq!(rows[0].get::<_, i64>(0), 2);
    }
}

#[tokio::test]
async fn extended_protocol_with_parameters_and_binary_types() {
    let (_dir, server) = server_with_cpu().await;
    let client = connect(&server, "pgdb").await.expect("connect");
    let statement = client
        .prepare("SELECT host, usage, n, ok, time FROM cpu WHERE usage > $1 ORDER BY host")
        .await
        .expect("prepare");
    for _ in 0..10 {
        let rows = client.query(&statement, &[&1.0f64]).await.expect("query");
        assert_eq!(rows.len(), 2);
        let host: &str = rows[0].get(0);
        let usage: f64 = rows[0].get(1);
        let n: i64 = rows[0].get(2);
        let ok: bool = rows[0].get(3);
        assert_eq!((host, usage, n, ok), ("a", 1.5, 3, true));
    }
    let rows = client
        .query("SELECT count(*) FROM cpu WHERE host = $1", &[&"b"])
        .await
        .expect("text parameter");
    assert_eq!(rows[0].get::<_, i64>(0), 1);
}

#[tokio::test]
async fn python_clients_psycopg_asyncpg_sqlalchemy_pandas() {
    let (_dir, server) = server_with_cpu().await;
    let (host, port) = server.pg_addr.rsplit_once(':').expect("host:port");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/python_clients.py");
    let output = Command::new("python3")
        .args([script, host, port, "pgdb"])
        .output()
        .expect("python3 is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{text}\n(scripts/test.sh installs psycopg, asyncpg, sqlalchemy and pandas)"
    );
    assert!(text.contains("python clients ok"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_and_concurrent_clients_during_ingest() {
    let (_dir, server) = server_with_cpu().await;
    // 200 connections opening and closing.
    for round in 0..10 {
        let clients = futures::future::join_all((0..20).map(|_| connect(&server, "pgdb"))).await;
        for client in clients {
            let client = client.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(
                client.query_one("SELECT 1::BIGINT", &[]).await.expect("query").get::<_, i64>(0),
                1
            );
        }
    }
    // 20 clients query while line protocol streams in.
    let url = server.url("/api/v3/write_lp?db=pgdb&precision=s");
    let writer = tokio::spawn(async move {
        for batch in 0..20i64 {
            let body: String = (0..1000)
                .map(|i| {
                    format!("stream,host=h{} v={i} {}\n", i % 10, 1_700_000_000 + batch * 1000 + i)
                })
                .collect();
            assert_eq!(
                crate::harness::client()
                    .post(&url)
                    .body(body)
                    .send()
                    .await
                    .expect("write")
                    .status(),
                204
            );
        }
    });
    let queries = (0..20).map(|_| {
        let addr = server.pg_addr.clone();
        async move {
            let client = connect_addr(&addr, "pgdb").await.expect("connect");
            for _ in 0..10 {
                client
                    .query("SELECT host, count(*) FROM cpu GROUP BY host", &[])
                    .await
                    .expect("query during ingest");
            }
        }
    });
    futures::future::join_all(queries).await;
    writer.await.expect("writer");
    let client = connect(&server, "pgdb").await.expect("connect");
    assert_eq!(
        client.query_one("SELECT count(*) FROM stream", &[]).await.expect("count").get::<_, i64>(0),
        20_000
    );
    // Nothing leaked: the server still accepts and answers.
    let (ok, out) = psql(&server, "pgdb", &["SELECT count(*) FROM stream"]);
    assert!(ok && out.contains("20000"), "{out}");
}

/// Issue 10.8: a timeout or CancelRequest never answers 57014 for an INSERT whose rows were
/// stored: once it writes it runs to the end, and its answer says what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_answers_match_what_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    assert_eq!(server.write("/api/v3/write_lp?db=ins", "cpu,host=x usage=1 1").await.0, 204);
    let client = connect(&server, "ins").await.expect("connect");
    let rows = 100_000;
    let insert = format!(
        "INSERT INTO cpu (host, usage) SELECT concat('h', value), value FROM generate_series(1, {rows})"
    );
    client.batch_execute("SET statement_timeout = 30").await.expect("set");
    let mut expected = 1;
    for extended in [false, true] {
        let answer = if extended {
            client.execute(insert.as_str(), &[]).await.map(|n| n as i64)
        } else {
            client.simple_query(&insert).await.map(|_| rows)
        };
        match answer {
            Ok(n) => {
                assert_eq!(n, rows);
                expected += rows;
            }
            Err(e) => assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e:?}"),
        }
        let stored = server.count("ins", "SELECT count(*) FROM cpu").await;
        assert_eq!(stored, expected, "the answer says what was stored (extended: {extended})");
        // Another host prefix for the second round.
        expected = stored;
    }
}
