//! Materialized views against the real server: a differential test (every view equals its
//! defining query over raw data after every batch of in-order, out-of-order, late, duplicate
//! and overwriting writes, over HTTP and Postgres, across SIGKILL and restart), and the
//! statements' errors with their SQLSTATEs.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::harness::Server;
use crate::pg::connect;

const DB: &str = "views";

/// A view under test: its name, its defining query, and the columns to order both by.
struct Case {
    name: &'static str,
    query: String,
    order: &'static str,
}

fn all_cases(second_all: bool) -> Vec<Case> {
    let all = if second_all {
        // Dropped and created again with another definition.
        "SELECT date_bin(INTERVAL '2 minutes', time) AS b, count(w) AS n, max(w) AS hi FROM cpu \
         GROUP BY b"
    } else {
        "SELECT date_bin(INTERVAL '1 minute', time) AS b, count(*) AS n, sum(u) AS s, min(u) AS \
         lo, max(u) AS hi FROM cpu GROUP BY b"
    };
    vec![
        Case { name: "v_all", query: all.to_string(), order: "b" },
        Case {
            name: "v_host",
            query: "SELECT date_bin(INTERVAL '1 minute', time) AS b, host, avg(u) AS a, count(u) \
                    AS c, last(u, time) AS l, first(w, time) AS f FROM cpu GROUP BY 1, 2"
                .into(),
            order: "b, host",
        },
        Case {
            name: "v_two",
            query: "SELECT time_bucket(INTERVAL '5 minutes', time) AS b, region, host, max(u) AS \
                    m, count(*) AS n FROM cpu WHERE u > 10 GROUP BY b, region, host"
                .into(),
            order: "b, region, host",
        },
        Case {
            name: "v_five",
            query: "SELECT date_bin(INTERVAL '5 minutes', b) AS b5, host, sum(c) AS c, max(a) AS \
                    ma FROM v_host GROUP BY 1, 2"
                .into(),
            order: "b5, host",
        },
    ]
}

/// The late view, created once data exists.
fn late_case() -> Case {
    Case {
        name: "v_late",
        query: "SELECT date_bin(INTERVAL '1 minute', time) AS b, region, sum(w) AS sw FROM cpu \
                GROUP BY b, region"
            .into(),
        order: "b, region",
    }
}

async fn create(server: &Server, case: &Case) {
    let sql = format!(
        "CREATE MATERIALIZED VIEW {} WITH (refresh_interval = '100ms') AS {}",
        case.name, case.query
    );
    let (status, body) = server.execute(DB, &sql).await;
    assert_eq!(status, 200, "{sql}: {body}");
}

/// Lines of one random batch: in order, out of order, late by hours, duplicates, overwrites
/// of one field only. Values are whole numbers, so float sums are exact in any order.
fn batch(rng: &mut fastrand::Rng, now_s: &mut i64) -> String {
    // Tag values with quotes and backslashes: they reach the view's recomputation as literals.
    const HOSTS: [(&str, Option<&str>); 7] = [
        ("a", Some("eu")),
        ("b", Some("eu")),
        ("c", Some("us")),
        ("d", None),
        ("q'x", Some("us")),
        ("a''b", None),
        ("O\\'B", Some("eu")),
    ];
    let mut body = String::new();
    for _ in 0..rng.usize(1..40) {
        *now_s += rng.i64(0..20);
        let time = match rng.u8(0..10) {
            0 => *now_s - rng.i64(3_600..6 * 3_600), // late: hours back
            1 | 2 => *now_s - rng.i64(0..600),       // out of order
            _ => *now_s,
        };
        let (host, region) = HOSTS[rng.usize(0..HOSTS.len())];
        let tags = match region {
            Some(r) => format!("host={host},region={r}"),
            None => format!("host={host}"),
        };
        let fields = match rng.u8(0..4) {
            0 => format!("u={}", rng.i64(0..30)),
            1 => format!("w={}i", rng.i64(-5..5)),
            _ => format!("u={},w={}i", rng.i64(0..30), rng.i64(-5..5)),
        };
        body.push_str(&format!("cpu,{tags} {fields} {time}\n"));
        if rng.u8(0..8) == 0 {
            // The same point again: overwrites its fields.
            body.push_str(&format!("cpu,{tags} u={} {time}\n", rng.i64(0..30)));
        }
    }
    body
}

/// Rows as text, the same for both sides: JSON over HTTP.
async fn http_rows(server: &Server, sql: &str) -> Vec<String> {
    let rows = server.query(DB, sql).await;
    rows.iter().map(|r| r.to_string()).collect()
}

async fn pg_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    for message in client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")) {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            let values: Vec<String> =
                (0..row.len()).map(|i| row.get(i).unwrap_or("NULL").to_string()).collect();
            out.push(values.join("|"));
        }
    }
    out
}

async fn check(server: &Server, cases: &[Case], seed: u64, step: &str) {
    let client = connect(server, DB).await.expect("pg connects");
    for case in cases {
        let view = format!("SELECT * FROM {} ORDER BY {}", case.name, case.order);
        let raw = format!("SELECT * FROM ({}) AS q ORDER BY {}", case.query, case.order);
        // Until a column the view reads has been written (a batch of lines with `w` only),
        // the defining query fails on raw data: so must the view.
        let (raw_status, raw_body) = server.query_raw(DB, &raw, "json").await;
        if raw_status != 200 {
            let (view_status, view_body) = server.query_raw(DB, &view, "json").await;
            assert_ne!(
                view_status, 200,
                "seed {seed}, {step}: raw fails ({raw_body}), view answers {view_body}"
            );
            continue;
        }
        let (got, want) = (http_rows(server, &view).await, http_rows(server, &raw).await);
        assert_eq!(got, want, "seed {seed}, {step}: view {} over HTTP", case.name);
        let (got, want) = (pg_rows(&client, &view).await, pg_rows(&client, &raw).await);
        assert_eq!(got, want, "seed {seed}, {step}: view {} over Postgres", case.name);
    }
}

#[tokio::test]
async fn views_equal_their_definitions_through_late_overwritten_data_and_sigkill() {
    let seed = std::env::var("SUNDIAL_VIEWS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("views differential test seed {seed} (SUNDIAL_VIEWS_SEED to repeat)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(&dir.path().join("data"), &[]);
    let (status, body) = server.execute(DB, &format!("CREATE DATABASE {DB}")).await;
    assert_eq!(status, 200, "{body}");
    let mut cases = all_cases(false);
    for case in &cases {
        create(&server, case).await;
    }
    let mut now_s = 1_700_000_000i64;
    for step in 0..14 {
        let body = batch(&mut rng, &mut now_s);
        let (status, answer) =
            server.write(&format!("/api/v3/write_lp?db={DB}&precision=s"), body).await;
        assert!(status == 204 || status == 200, "write: {status} {answer}");
        if step == 3 {
            let late = late_case();
            create(&server, &late).await;
            cases.push(late);
        }
        if step == 6 {
            // v_five reads v_host, not v_all: v_all can go and come back with another shape.
            let (status, body) = server.execute(DB, "DROP MATERIALIZED VIEW v_all").await;
            assert_eq!(status, 200, "{body}");
            let again = all_cases(true).remove(0);
            create(&server, &again).await;
            cases[0] = again;
        }
        // Right after the acknowledgement (read-your-writes), and sometimes after a refresh.
        check(&server, &cases, seed, &format!("step {step}, at once")).await;
        if rng.bool() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            check(&server, &cases, seed, &format!("step {step}, refreshed")).await;
        }
        if rng.u8(0..4) == 0 {
            server.kill9();
            server = server.restart();
            check(&server, &cases, seed, &format!("step {step}, after SIGKILL")).await;
        }
    }
    // Every view got materialized and says it caught up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let statuses = server
        .query(DB, "SELECT name, status, materialized, dirty_marks FROM system.views ORDER BY name")
        .await;
    assert_eq!(statuses.len(), cases.len(), "{statuses:?}");
    for status in &statuses {
        assert_eq!(status["status"], "ok", "{status}");
        assert_eq!(status["materialized"], true, "{status}");
    }
    check(&server, &cases, seed, "end").await;
}

#[tokio::test]
async fn view_statements_say_what_is_allowed_with_sqlstates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let (status, body) = server.execute("vdb", "CREATE DATABASE vdb").await;
    assert_eq!(status, 200, "{body}");
    let client = connect(&server, "vdb").await.expect("pg connects");
    let bucket = "date_bin(INTERVAL '1 minute', time) AS b";
    let refused = [
        (format!("SELECT {bucket}, count(*) FROM cpu JOIN mem ON true GROUP BY b"), "joins"),
        (
            format!("SELECT {bucket}, count(*) FROM cpu WHERE u IN (SELECT 1) GROUP BY b"),
            "subqueries",
        ),
        (format!("SELECT {bucket}, sum(u) OVER () FROM cpu GROUP BY b"), "window"),
        (format!("SELECT {bucket}, count(*) FROM cpu GROUP BY b ORDER BY b"), "ORDER BY"),
        (format!("SELECT {bucket}, count(*) FROM cpu GROUP BY b HAVING count(*) > 1"), "HAVING"),
        (format!("SELECT {bucket}, count(*) FROM cpu WHERE time > now() GROUP BY b"), "now()"),
        (format!("SELECT {bucket}, random() FROM cpu GROUP BY b"), "random()"),
        ("SELECT host, count(*) FROM cpu GROUP BY host".to_string(), "time bucket"),
        (format!("SELECT {bucket}, count(*) FROM cpu"), "GROUP BY its time bucket"),
    ];
    for (query, says) in &refused {
        let sql = format!("CREATE MATERIALIZED VIEW bad AS {query}");
        let error = client.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(error.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{sql}: {error:?}");
        let message = error.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
        assert!(message.contains(says), "{sql}: {message}");
        assert!(message.contains("A materialized view is SELECT"), "{message}");
    }

    // A view before its table: it waits, says so, and fills once the table appears.
    let view = format!("CREATE MATERIALIZED VIEW early AS SELECT {bucket}, host, count(*) AS n FROM cpu GROUP BY b, host");
    client.batch_execute(&view).await.expect("a view before its table");
    let error = client.simple_query("SELECT * FROM early").await.expect_err("no table yet");
    assert_eq!(error.code(), Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE), "{error:?}");
    let rows = server.query("vdb", "SELECT status FROM system.views WHERE name = 'early'").await;
    assert_eq!(rows[0]["status"], "waiting");
    // Catalog listings still work, and list it as a view.
    let listed = pg_rows(
        &client,
        "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .await;
    assert_eq!(listed, ["early|VIEW"], "{listed:?}");
    let defined = pg_rows(
        &client,
        "SELECT table_name, definition FROM information_schema.views WHERE table_schema = 'public'",
    )
    .await;
    assert_eq!(defined.len(), 1, "{defined:?}");
    assert!(defined[0].starts_with("early|CREATE MATERIALIZED VIEW early"), "{defined:?}");
    let (status, body) =
        server.write("/api/v3/write_lp?db=vdb&precision=s", "cpu,host=a u=1 60\n").await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(server.count("vdb", "SELECT sum(n) FROM early").await, 1);

    // Names: one namespace for tables and views.
    let error = client.batch_execute(&view).await.expect_err("exists");
    assert_eq!(error.code(), Some(&SqlState::DUPLICATE_TABLE), "{error:?}");
    client
        .batch_execute(&view.replace("VIEW early", "VIEW IF NOT EXISTS early"))
        .await
        .expect("IF NOT EXISTS");
    let on_table =
        format!("CREATE MATERIALIZED VIEW cpu AS SELECT {bucket}, count(*) FROM cpu GROUP BY b");
    let error = client.batch_execute(&on_table).await.expect_err("a table's name");
    assert_eq!(error.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "reads itself: {error:?}");
    let on_table =
        format!("CREATE MATERIALIZED VIEW cpu2 AS SELECT {bucket}, count(*) FROM cpu GROUP BY b");
    client.batch_execute(&on_table).await.expect("second view");
    let error = client
        .batch_execute("CREATE TABLE cpu2 (host TEXT, v DOUBLE PRECISION, PRIMARY KEY (host))")
        .await
        .expect_err("a view's name");
    assert_eq!(error.code(), Some(&SqlState::DUPLICATE_TABLE), "{error:?}");
    let (status, body) =
        server.write("/api/v3/write_lp?db=vdb&precision=s", "cpu2,host=a u=1 60\n").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("materialized view"), "{body}");

    // A view over a view: groups it lacks are refused; dropping the base it reads is refused.
    let over = "CREATE MATERIALIZED VIEW hourly AS SELECT date_bin(INTERVAL '1 hour', b) AS h, \
                region, sum(n) FROM early GROUP BY h, region";
    let error = client.batch_execute(over).await.expect_err("a group the base lacks");
    assert_eq!(error.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{error:?}");
    let over = over.replace("region, sum(n)", "host, sum(n)").replace("h, region", "h, host");
    client.batch_execute(&over).await.expect("view over a view");
    let error = client.batch_execute("DROP MATERIALIZED VIEW early").await.expect_err("read");
    assert_eq!(error.code(), Some(&SqlState::DEPENDENT_OBJECTS_STILL_EXIST), "{error:?}");
    client.batch_execute("DROP MATERIALIZED VIEW hourly, early").await.expect("drop both");
    let error = client.batch_execute("DROP MATERIALIZED VIEW early").await.expect_err("gone");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_TABLE), "{error:?}");
    client.batch_execute("DROP MATERIALIZED VIEW IF EXISTS early").await.expect("if exists");

    // SHOW and REFRESH, on both protocols.
    let rows = pg_rows(&client, "SHOW MATERIALIZED VIEWS").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].starts_with("cpu2|ok|"), "{rows:?}");
    client.batch_execute("REFRESH MATERIALIZED VIEW cpu2").await.expect("refresh");
    let (status, body) = server.execute("vdb", "REFRESH MATERIALIZED VIEW cpu2").await;
    assert_eq!(status, 200, "{body}");
    let rows = server.query("vdb", "SELECT materialized, rows FROM system.views").await;
    assert_eq!(rows[0]["materialized"], true, "{rows:?}");
    assert_eq!(rows[0]["rows"], 1, "{rows:?}");
    let error = client.batch_execute("REFRESH MATERIALIZED VIEW nope").await.expect_err("none");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_TABLE), "{error:?}");

    // Dropping the base table empties its views; they fill again with the next write.
    client.batch_execute("DROP TABLE cpu").await.expect("drop table");
    let error = client.simple_query("SELECT * FROM cpu2").await.expect_err("no table again");
    assert_eq!(error.code(), Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE), "{error:?}");
    let (status, body) =
        server.write("/api/v3/write_lp?db=vdb&precision=s", "cpu,host=b u=1 60\n").await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(server.count("vdb", "SELECT count(*) FROM cpu2").await, 1);
}

/// Reads Server-Sent Events from a streaming response: (event, id, data) per event.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn next(&mut self, timeout: Duration) -> Option<(String, String, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue; // a heartbeat comment
                }
                return Some((event, id, data));
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await.ok()?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk.ok()??));
        }
    }
}

async fn changes(server: &Server, db: &str, query: &str, last: Option<&str>) -> reqwest::Response {
    let mut request = crate::harness::client()
        .get(server.url(&format!("/api/v3/views/cpu_1m/changes?db={db}{query}")));
    if let Some(id) = last {
        request = request.header("Last-Event-ID", id);
    }
    request.send().await.expect("changes request")
}

#[tokio::test]
async fn view_changes_stream_as_server_sent_events_and_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let db = "feed";
    let write = |body: &'static str| {
        let server = &server;
        async move {
            let (status, answer) =
                server.write(&format!("/api/v3/write_lp?db={db}&precision=s"), body).await;
            assert_eq!(status, 204, "{answer}");
        }
    };
    write("cpu,host=a u=1 60\ncpu,host=b u=2 61\n").await;
    let (status, body) = server
        .execute(
            db,
            "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS \
             minute, host, max(u) AS peak FROM cpu GROUP BY 1, 2",
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let response = changes(&server, db, "&snapshot=true", None).await;
    assert_eq!(response.status().as_u16(), 200);
    let mut events = Events { response, buffer: String::new() };
    let (event, _, data) = events.next(Duration::from_secs(10)).await.expect("snapshot");
    assert_eq!(event, "snapshot");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&data).expect("rows");
    assert_eq!(rows.len(), 2, "{data}");

    // A new bucket × group, then an overwrite that changes a value, then one that changes none.
    let started = std::time::Instant::now();
    write("cpu,host=a u=5 130\n").await;
    let (event, first_id, data) = events.next(Duration::from_secs(5)).await.expect("change");
    let latency = started.elapsed();
    assert_eq!(event, "change", "{data}");
    assert!(data.contains(r#""op":"upsert""#) && data.contains(r#""peak":5.0"#), "{data}");
    assert!(latency < Duration::from_secs(2), "pushed after {latency:?}");
    write("cpu,host=b u=7 61\n").await;
    let (_, second_id, data) = events.next(Duration::from_secs(5)).await.expect("change");
    assert!(data.contains(r#""host":"b""#) && data.contains(r#""peak":7.0"#), "{data}");
    assert!(second_id.parse::<f64>().expect("id") > first_id.parse::<f64>().expect("id"));

    // Resuming after the first change replays the second, then goes on live.
    let response = changes(&server, db, "", Some(&first_id)).await;
    assert_eq!(response.status().as_u16(), 200);
    let mut resumed = Events { response, buffer: String::new() };
    let (_, id, data) = resumed.next(Duration::from_secs(5)).await.expect("backlog");
    assert_eq!(id, second_id, "{data}");
    // A resume point the server never had is refused.
    let response = changes(&server, db, "", Some("999999")).await;
    assert_eq!(response.status().as_u16(), 400);
    let response = changes(&server, db, "", Some("not-an-id")).await;
    assert_eq!(response.status().as_u16(), 400);

    // Rows gone: dropping the table rebuilds the view, which ends the streams.
    let (status, body) = server.execute(db, "DROP TABLE cpu").await;
    assert_eq!(status, 200, "{body}");
    let (event, _, data) = events.next(Duration::from_secs(5)).await.expect("error event");
    assert_eq!(event, "error", "{data}");
    assert!(data.contains("take a new snapshot"), "{data}");
    assert!(events.next(Duration::from_secs(2)).await.is_none(), "the stream ends");
    // Resuming across the rebuild is refused with 410, so an EventSource stops retrying.
    write("cpu,host=a u=1 60\n").await;
    let response = changes(&server, db, "", Some(&first_id)).await;
    assert_eq!(response.status().as_u16(), 410);
    // And a dropped view ends its streams too.
    let response = changes(&server, db, "", None).await;
    let mut fresh = Events { response, buffer: String::new() };
    let (event, _, _) = fresh.next(Duration::from_secs(5)).await.expect("ready");
    assert_eq!(event, "ready");
    let (status, body) = server.execute(db, "DROP MATERIALIZED VIEW cpu_1m").await;
    assert_eq!(status, 200, "{body}");
    let (event, _, data) = fresh.next(Duration::from_secs(5)).await.expect("error event");
    assert_eq!(event, "error", "{data}");
}

#[tokio::test]
async fn copy_subscribe_streams_changes_to_postgres_clients() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let (status, body) =
        server.write("/api/v3/write_lp?db=sub&precision=s", "cpu,host=a u=1 60\n").await;
    assert_eq!(status, 204, "{body}");
    let client = connect(&server, "sub").await.expect("pg connects");
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS \
             minute, host, max(u) AS peak FROM cpu GROUP BY 1, 2",
        )
        .await
        .expect("create view");
    let feed = connect(&server, "sub").await.expect("pg connects");
    let stream = feed
        .copy_out("COPY (SUBSCRIBE cpu_1m WITH (SNAPSHOT)) TO STDOUT")
        .await
        .expect("subscribe");
    let mut stream = Box::pin(stream);
    async fn next(stream: &mut std::pin::Pin<Box<tokio_postgres::CopyOutStream>>) -> String {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        let chunk = chunk.expect("a row in time").expect("open").expect("row");
        String::from_utf8(chunk.to_vec()).expect("text")
    }
    let snapshot = next(&mut stream).await;
    assert!(snapshot.ends_with("\tsnapshot\t1970-01-01T00:01:00Z\ta\t1.0\n"), "{snapshot:?}");
    let (status, body) = server
        .write("/api/v3/write_lp?db=sub&precision=s", "cpu,host=a u=4 61\ncpu,host=b\\ x u=2 125\n")
        .await;
    assert_eq!(status, 204, "{body}");
    let mut rows = vec![next(&mut stream).await, next(&mut stream).await];
    rows.sort();
    assert!(rows[0].ends_with("\tupsert\t1970-01-01T00:01:00Z\ta\t4.0\n"), "{rows:?}");
    assert!(rows[1].ends_with("\tupsert\t1970-01-01T00:02:00Z\tb x\t2.0\n"), "{rows:?}");
    // Over HTTP it is refused with a pointer to the SSE endpoint.
    let (status, body) = server.execute("sub", "COPY (SUBSCRIBE cpu_1m) TO STDOUT").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("/api/v3/views/cpu_1m/changes"), "{body}");
}
