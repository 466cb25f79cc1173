//! Alert rules against the real server: `CREATE ALERT` over Postgres and HTTP, notifications
//! received by a local webhook receiver (the v4 payload field by field) and by a real
//! Prometheus Alertmanager, targets that fail, SIGKILL between the state change and the
//! delivery, and every rejection with its SQLSTATE.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio_postgres::error::SqlState;

use crate::harness::{eventually, Server};
use crate::pg::connect;

const DB: &str = "alerting";

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    key: Option<String>,
    body: Value,
}

/// A local HTTP receiver: `/ok` answers 200, `/flaky` 500 to its first request and 200
/// after, `/slow` waits 3 s before answering.
struct Receiver {
    base: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let flaky: Arc<Mutex<usize>> = Arc::default();
        let (g, f) = (got.clone(), flaky.clone());
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let (g, f) = (g.clone(), f.clone());
                async move {
                    let path = uri.path().to_string();
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let body = serde_json::from_str(&body).unwrap_or(Value::Null);
                    g.lock().unwrap().push(Received { path: path.clone(), key, body });
                    match path.as_str() {
                        "/flaky" => {
                            let mut n = f.lock().unwrap();
                            *n += 1;
                            if *n == 1 {
                                return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            axum::http::StatusCode::OK
                        }
                        "/slow" => {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            axum::http::StatusCode::OK
                        }
                        _ => axum::http::StatusCode::OK,
                    }
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { base, got }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn on(&self, path: &str) -> Vec<Received> {
        self.got.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect()
    }

    async fn wait_for(&self, path: &str, n: usize, timeout: Duration) -> Vec<Received> {
        eventually(timeout, || async { self.on(path).len() >= n }).await;
        self.on(path)
    }
}

async fn write(server: &Server, lines: &str) {
    let (status, body) =
        server.write(&format!("/api/v3/write_lp?db={DB}"), lines.to_string()).await;
    assert_eq!(status, 204, "{body}");
}

/// The alerts' rows of `system.alerts`, by name and labels.
async fn states(server: &Server) -> HashMap<(String, String), String> {
    server
        .query(DB, "SELECT name, labels, state FROM system.alerts")
        .await
        .into_iter()
        .map(|r| {
            (
                (
                    r["name"].as_str().unwrap_or_default().to_string(),
                    serde_json::from_str::<Value>(r["labels"].as_str().unwrap_or("null"))
                        .unwrap_or(Value::Null)
                        .to_string(),
                ),
                r["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

const LAST_HIGH: &str = "SELECT host, region, last(u, time) AS u FROM cpu GROUP BY host, region \
                         HAVING last(u, time) > 90";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_notifications_fire_and_resolve_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let receiver = Receiver::start().await;
    let t = now_ns();
    write(&server, &format!("cpu,host=a,region=eu u=95 {t}\ncpu,host=b,region=us u=10 {t}")).await;
    let client = connect(&server, DB).await.expect("connect");
    client
        .batch_execute(&format!(
            "CREATE ALERT high_cpu ON ({LAST_HIGH}) EVERY '1s' FOR '1s' LABELS (severity = \
             'page') ANNOTATIONS (summary = '{{{{host}}}} in {{{{region}}}} at {{{{u}}}}%') \
             ERROR AS keep_last NOTIFY (WEBHOOK '{}' WITH (timeout = '5s', header = 'X-Token: t1'))",
            receiver.url("/ok")
        ))
        .await
        .expect("create alert");
    // A rule over a materialized view works the same way.
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS \
             bucket, host, max(u) AS peak FROM cpu GROUP BY bucket, host",
        )
        .await
        .expect("view");
    client
        .batch_execute(&format!(
            "CREATE ALERT peak ON (SELECT host, max(peak) AS peak FROM cpu_1m WHERE bucket >= \
             now() - INTERVAL '10 minutes' GROUP BY host HAVING max(peak) > 90) EVERY '1s' \
             NOTIFY (WEBHOOK '{}')",
            receiver.url("/view")
        ))
        .await
        .expect("create alert over a view");

    let got = receiver.wait_for("/ok", 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "one firing notification: {got:?}");
    let body = &got[0].body;
    assert_eq!(body["version"], "4");
    assert_eq!(body["status"], "firing");
    assert_eq!(body["receiver"], "high_cpu");
    assert_eq!(body["groupKey"], "{}:{alertname=\"high_cpu\"}");
    assert_eq!(body["groupLabels"], serde_json::json!({ "alertname": "high_cpu" }));
    assert_eq!(body["truncatedAlerts"], 0);
    assert_eq!(body["commonLabels"]["severity"], "page");
    assert_eq!(body["commonLabels"]["host"], "a");
    assert!(body["externalURL"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    let alerts = body["alerts"].as_array().expect("alerts");
    assert_eq!(alerts.len(), 1);
    let alert = &alerts[0];
    assert_eq!(alert["status"], "firing");
    assert_eq!(
        alert["labels"],
        serde_json::json!({"alertname": "high_cpu", "severity": "page", "host": "a", "region": "eu"})
    );
    assert_eq!(alert["annotations"]["summary"], "a in eu at 95%");
    assert_eq!(alert["endsAt"], "0001-01-01T00:00:00Z");
    assert!(alert["startsAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(alert["fingerprint"].as_str().map(str::len), Some(16));
    assert!(alert["generatorURL"].as_str().unwrap().contains("/api/v3/query_sql?db=alerting"));
    assert!(got[0].key.as_deref().is_some_and(|k| k.len() == 32), "an Idempotency-Key");
    assert_eq!(
        states(&server).await.get(&("high_cpu".into(), alert["labels"].to_string())),
        Some(&"alerting".to_string())
    );
    let view = receiver.wait_for("/view", 1, Duration::from_secs(20)).await;
    assert_eq!(view[0].body["alerts"][0]["labels"]["host"], "a");

    // A changing value neither re-notifies nor changes the instance.
    write(&server, &format!("cpu,host=a,region=eu u=97 {}", t + 1)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.on("/ok").len(), 1, "no second notification for a new value");

    // Condition false: resolved, once.
    write(&server, &format!("cpu,host=a,region=eu u=5 {}", t + 2)).await;
    let got = receiver.wait_for("/ok", 2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 2);
    let body = &got[1].body;
    assert_eq!(body["status"], "resolved");
    assert_eq!(body["alerts"][0]["status"], "resolved");
    assert_ne!(body["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    assert_ne!(got[0].key, got[1].key);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.on("/ok").len(), 2, "exactly one firing and one resolved");

    // Visible in SQL over both protocols.
    let rows = client
        .query("SELECT kind, from_state, to_state, outcome FROM system.alert_events WHERE name = 'high_cpu' ORDER BY time", &[])
        .await
        .expect("events");
    type Event = (String, Option<String>, Option<String>, Option<String>);
    let events: Vec<Event> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    let transitions: Vec<_> = events
        .iter()
        .filter(|e| e.0 == "transition")
        .map(|e| (e.1.clone().unwrap_or_default(), e.2.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        transitions,
        [("normal", "pending"), ("pending", "alerting"), ("alerting", "normal")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let delivered = events.iter().filter(|e| e.3.as_deref() == Some("delivered")).count();
    assert_eq!(delivered, 2);
    let shown = client.simple_query("SHOW ALERTS").await.expect("show alerts");
    let names: Vec<String> = shown
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["high_cpu", "peak"]);
    let rules =
        server.query(DB, "SELECT name, evaluations, definition FROM system.alert_rules").await;
    assert!(rules.iter().all(|r| r["evaluations"].as_u64().unwrap_or(0) >= 2), "{rules:?}");
    assert!(rules[0]["definition"]
        .as_str()
        .unwrap()
        .starts_with("CREATE ALERT high_cpu ON (SELECT"));

    // Pause stops evaluation; resume starts it again; drop removes it.
    client.batch_execute("ALTER ALERT high_cpu PAUSE").await.expect("pause");
    let before = server
        .count(DB, "SELECT evaluations FROM system.alert_rules WHERE name = 'high_cpu'")
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let paused = server
        .count(DB, "SELECT evaluations FROM system.alert_rules WHERE name = 'high_cpu'")
        .await;
    assert!(paused <= before + 1, "{before} → {paused} while paused");
    client.batch_execute("ALTER ALERT high_cpu RESUME").await.expect("resume");
    assert!(
        eventually(Duration::from_secs(10), || async {
            server
                .count(DB, "SELECT evaluations FROM system.alert_rules WHERE name = 'high_cpu'")
                .await
                > paused
        })
        .await
    );
    let (status, body) = server.execute(DB, "DROP ALERT high_cpu, peak").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.count(DB, "SELECT count(*) FROM system.alert_rules").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_targets_are_retried_or_dead_lettered_without_holding_up_other_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let receiver = Receiver::start().await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    write(&server, &format!("cpu,host=a,region=eu u=95 {}", now_ns())).await;
    let client = connect(&server, DB).await.expect("connect");
    let rule = |name: &str, target: String| {
        format!(
            "CREATE ALERT {name} ON ({LAST_HIGH}) EVERY '1s' ERROR AS keep_last NOTIFY ({target})"
        )
    };
    for (name, target) in [
        ("flaky", format!("WEBHOOK '{}'", receiver.url("/flaky"))),
        ("refused", format!("WEBHOOK 'http://127.0.0.1:{closed}/x' WITH (max_attempts = 2)")),
        (
            "slow",
            format!(
                "WEBHOOK '{}' WITH (timeout = '500ms', max_attempts = 2)",
                receiver.url("/slow")
            ),
        ),
        ("healthy", format!("WEBHOOK '{}'", receiver.url("/ok"))),
    ] {
        client.batch_execute(&rule(name, target)).await.expect(name);
    }
    // The healthy rule is served at once, whatever the others' targets do.
    let ok = receiver.wait_for("/ok", 1, Duration::from_secs(10)).await;
    assert_eq!(ok.len(), 1);
    // 500 then 200: delivered on the second attempt, with the same key.
    let flaky = receiver.wait_for("/flaky", 2, Duration::from_secs(20)).await;
    assert_eq!(flaky.len(), 2, "{flaky:?}");
    assert_eq!(flaky[0].key, flaky[1].key);
    // Refused and timing out: dead after two attempts, visible in SQL.
    assert!(
        eventually(Duration::from_secs(30), || async {
            server
                .count(DB, "SELECT count(*) FROM system.alert_notifications WHERE status = 'dead'")
                .await
                == 2
        })
        .await,
        "{:?}",
        server.query(DB, "SELECT * FROM system.alert_notifications").await
    );
    let dead = server
        .query(
            DB,
            "SELECT name, attempts, last_error FROM system.alert_notifications ORDER BY name",
        )
        .await;
    assert_eq!(dead[0]["name"], "refused");
    assert_eq!(dead[0]["attempts"], 2);
    assert!(dead[0]["last_error"].as_str().unwrap().contains("connection failed"), "{dead:?}");
    assert_eq!(dead[1]["name"], "slow");
    assert!(dead[1]["last_error"].as_str().unwrap().contains("timed out"), "{dead:?}");
    let attempts = server
        .query(
            DB,
            "SELECT outcome, status, attempt FROM system.alert_events WHERE name = 'flaky' \
             AND kind = 'notification' ORDER BY time",
        )
        .await;
    assert_eq!(attempts[0]["outcome"], "retry");
    assert_eq!(attempts[0]["status"], 500);
    assert_eq!(attempts[1]["outcome"], "delivered");
    assert_eq!(attempts[1]["attempt"], 2);
    // Evaluation went on meanwhile.
    let healthy =
        server.count(DB, "SELECT evaluations FROM system.alert_rules WHERE name = 'healthy'").await;
    assert!(healthy >= 2, "healthy evaluated {healthy} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_between_state_change_and_delivery_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let receiver = Receiver::start().await;
    let mut server =
        Server::start_with_env(&data, &[], &[("SUNDIAL_CRASH_POINT", "alert-before-delivery")]);
    write(&server, &format!("cpu,host=a,region=eu u=95 {}", now_ns())).await;
    // A pending rule (created first: it sends nothing for 6 s), whose timer must survive
    // the restarts.
    let (status, body) = server
        .execute(
            DB,
            &format!(
                "CREATE ALERT slow_burn ON ({LAST_HIGH}) EVERY '1s' FOR '6s' ERROR AS keep_last \
                 NOTIFY (WEBHOOK '{}')",
                receiver.url("/pending")
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Its Pending state is saved before the other rule's delivery kills the process.
    assert!(
        eventually(Duration::from_secs(10), || async {
            server.count(DB, "SELECT count(*) FROM system.alerts WHERE name = 'slow_burn' AND state = 'pending'").await == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = server
        .execute(
            DB,
            &format!(
                "CREATE ALERT high ON ({LAST_HIGH}) EVERY '1s' ERROR AS keep_last NOTIFY \
                 (WEBHOOK '{}')",
                receiver.url("/ok")
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The first delivery is about to start: the process dies there.
    assert!(server.wait_exit(Duration::from_secs(20)), "the crash point was not reached");
    assert!(receiver.on("/ok").is_empty());
    let created = now_ns();

    let mut server = server.restart();
    let got = receiver.wait_for("/ok", 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "delivered after the restart");
    // Delivered, then killed: the restart sends no second firing notification.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill9();
    let server = server.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let keys: std::collections::HashSet<_> =
        receiver.on("/ok").into_iter().map(|r| r.key).collect();
    assert_eq!(keys.len(), 1, "one firing notification, however often it was sent");
    let states = states(&server).await;
    assert!(states.iter().any(|((n, _), s)| n == "high" && s == "alerting"), "{states:?}");
    // The pending rule fired 6 s after it became pending, not 6 s after the last restart.
    let pending = receiver.wait_for("/pending", 1, Duration::from_secs(20)).await;
    assert_eq!(pending.len(), 1);
    let rows = server
        .query(DB, "SELECT active_at, fired_at FROM system.alerts WHERE name = 'slow_burn'")
        .await;
    let parse = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .timestamp_nanos_opt()
            .unwrap()
    };
    let (active, fired) = (parse(&rows[0]["active_at"]), parse(&rows[0]["fired_at"]));
    assert!(active < created + 3_000_000_000, "active_at kept across restarts");
    assert!(
        fired - active >= 6_000_000_000 && fired - active < 20_000_000_000,
        "{}",
        fired - active
    );
}

async fn refused(client: &tokio_postgres::Client, sql: &str, code: &SqlState, words: &str) {
    let error = client.batch_execute(sql).await.expect_err(sql);
    let db = error.as_db_error().unwrap_or_else(|| panic!("{sql}: {error}"));
    assert_eq!(db.code(), code, "{sql}: {}", db.message());
    assert!(db.message().contains(words), "{sql}: {}", db.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_are_refused_with_their_sqlstates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    write(&server, &format!("cpu,host=a,region=eu u=95 {}", now_ns())).await;
    let client = connect(&server, DB).await.expect("connect");
    let hook = "NOTIFY (WEBHOOK 'http://127.0.0.1:9/x')";
    let q = "SELECT host, u FROM cpu";
    for (sql, code, words) in [
        (format!("CREATE ALERT a ON ({q}) EVERY '1s'"), SqlState::SYNTAX_ERROR, "NOTIFY"),
        (format!("CREATE ALERT a ON {q} EVERY '1s' {hook}"), SqlState::SYNTAX_ERROR, "("),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '0s' {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "out of range",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '500ms' {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "out of range",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY 'often' {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "not a duration",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '1s' FOR '30 days' {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "FOR",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '1s' NOTIFY (PAGER 'x')"),
            SqlState::INVALID_PARAMETER_VALUE,
            "unknown notification target",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '1s' NOTIFY (WEBHOOK 'ftp://h/x')"),
            SqlState::INVALID_PARAMETER_VALUE,
            "http",
        ),
        (
            format!(
                "CREATE ALERT a ON ({q}) EVERY '1s' NOTIFY (WEBHOOK 'http://h' WITH (retries = 1))"
            ),
            SqlState::INVALID_PARAMETER_VALUE,
            "unknown WEBHOOK option",
        ),
        (format!("CREATE ALERT a ON ({q}) EVERY '1s' NOTIFY (EMAIL 'ops@example.com')"), SqlState::INVALID_PARAMETER_VALUE, "needs a sender"),
        (format!("CREATE ALERT a ON ({q}) EVERY '1s' NOTIFY (EMAIL 'nobody' WITH (smarthost = 'h:25', from = 'a@b.c'))"), SqlState::INVALID_PARAMETER_VALUE, "not an e-mail address"),
        (format!("CREATE ALERT a ON ({q}) EVERY '1s' NOTIFY (EMAIL 'o@x.y' WITH (smarthost = 'h', from = 'a@b.c'))"), SqlState::INVALID_PARAMETER_VALUE, "host:port"),
        (format!("CREATE ALERT a ON ({q}) EVERY '1s' NOTIFY (EMAIL 'o@x.y' WITH (smarthost = 'h:25', from = 'a@b.c', ca_pem = '/etc/passwd'))"), SqlState::INVALID_PARAMETER_VALUE, "no PEM certificate"),
        (
            format!("CREATE ALERT a ON (SELECT host FROM nope) EVERY '1s' {hook}"),
            SqlState::UNDEFINED_TABLE,
            "nope",
        ),
        (
            format!("CREATE ALERT a ON (SELECT host, nope FROM cpu) EVERY '1s' {hook}"),
            SqlState::UNDEFINED_COLUMN,
            "nope",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '1s' ANNOTATIONS (s = '{{{{cpu}}}}') {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "{{cpu}}",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '1s' ANNOTATIONS (s = '{{{{host') {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "without",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '1s' LABELS (host = 'x') {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "twice",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '1s' LABELS (alertname = 'x') {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "alertname",
        ),
        (
            format!("CREATE ALERT a ON (SELECT upper(host), u FROM cpu) EVERY '1s' {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "AS",
        ),
        (
            format!("CREATE ALERT a ON ({q}) EVERY '1s' NO DATA AS maybe {hook}"),
            SqlState::INVALID_PARAMETER_VALUE,
            "keep_last",
        ),
        ("DROP ALERT nope".to_string(), SqlState::UNDEFINED_OBJECT, "nope"),
        ("ALTER ALERT nope PAUSE".to_string(), SqlState::UNDEFINED_OBJECT, "nope"),
    ] {
        refused(&client, &sql, &code, words).await;
    }
    client
        .batch_execute(&format!("CREATE ALERT a ON ({q}) EVERY '1s' {hook}"))
        .await
        .expect("create");
    // The extended protocol (drivers' prepared statements) runs alert statements too.
    client
        .execute(&format!("CREATE ALERT ext ON ({q}) EVERY '1s' {hook}") as &str, &[])
        .await
        .expect("create over the extended protocol");
    client.execute("ALTER ALERT ext PAUSE", &[]).await.expect("alter, extended");
    client.execute("DROP ALERT ext", &[]).await.expect("drop, extended");
    let error = client.execute("DROP ALERT ext", &[]).await.expect_err("dropped");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_OBJECT));
    // Secrets are not shown to readers.
    client
        .batch_execute(&format!(
            "CREATE ALERT secret ON ({q}) EVERY '1s' NOTIFY (WEBHOOK \
             'https://hooks.example.com/services/T000/B000/XXXX?token=abc' WITH (header = \
             'Authorization: Bearer abc'))"
        ))
        .await
        .expect("create");
    let shown = server
        .query(DB, "SELECT targets, definition FROM system.alert_rules WHERE name = 'secret'")
        .await;
    let text = shown[0].to_string();
    assert!(!text.contains("XXXX") && !text.contains("abc"), "{text}");
    assert!(text.contains("https://hooks.example.com/…"), "{text}");
    refused(
        &client,
        &format!("CREATE ALERT a ON ({q}) EVERY '1s' {hook}"),
        &SqlState::DUPLICATE_OBJECT,
        "already exists",
    )
    .await;
    client
        .batch_execute(&format!("CREATE ALERT IF NOT EXISTS a ON ({q}) EVERY '1s' {hook}"))
        .await
        .expect("if not exists");
    client.batch_execute("DROP ALERT IF EXISTS nope").await.expect("if exists");
    // Over HTTP: 400 with the reason.
    let (status, body) =
        server.execute(DB, &format!("CREATE ALERT b ON ({q}) EVERY '0s' {hook}")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("out of range"), "{body}");
    let (status, _) =
        server.execute("nodb", &format!("CREATE ALERT b ON ({q}) EVERY '1s' {hook}")).await;
    assert_eq!(status, 404);
    // A rule whose query fails later shows the error, in state error.
    client.batch_execute("DROP TABLE cpu").await.expect("drop table");
    assert!(
        eventually(Duration::from_secs(10), || async {
            let rows = server
                .query(DB, "SELECT state, last_error FROM system.alerts WHERE name = 'a'")
                .await;
            rows.iter().any(|r| {
                r["state"] == "error" && r["last_error"].as_str().is_some_and(|e| e.contains("cpu"))
            })
        })
        .await,
        "{:?}",
        server.query(DB, "SELECT * FROM system.alerts").await
    );
}

/// Writes an Alertmanager configuration routing everything to `webhook` and starts Debian's
/// `prometheus-alertmanager` on a free loopback port.
fn start_alertmanager(dir: &std::path::Path, webhook: &str) -> (std::process::Child, String) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            "route:\n  receiver: test\n  group_by: ['alertname']\n  group_wait: 1s\n  \
             group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: test\n    \
             webhook_configs:\n      - url: '{webhook}'\n        send_resolved: true\n"
        ),
    )
    .expect("config");
    let child = std::process::Command::new("prometheus-alertmanager")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.join("am-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus-alertmanager (Debian's package, installed by scripts/test.sh)");
    (child, format!("http://127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_alertmanager_receives_and_routes_the_alerts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start().await;
    let (mut am, am_url) = start_alertmanager(dir.path(), &receiver.url("/routed"));
    let ready = eventually(Duration::from_secs(30), || async {
        crate::harness::client()
            .get(format!("{am_url}/-/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(ready, "alertmanager did not become ready");
    let server = Server::start(&dir.path().join("data"), &[]);
    let t = now_ns();
    write(&server, &format!("cpu,host=a,region=eu u=95 {t}")).await;
    let (status, body) = server
        .execute(
            DB,
            &format!(
                "CREATE ALERT am_high ON ({LAST_HIGH}) EVERY '1s' LABELS (severity = 'page') \
                 ANNOTATIONS (summary = '{{{{host}}}} high') NOTIFY (ALERTMANAGER '{am_url}')"
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let routed = receiver.wait_for("/routed", 1, Duration::from_secs(30)).await;
    let _ = am.kill();
    let _ = am.wait();
    assert!(!routed.is_empty(), "alertmanager routed nothing");
    let body = &routed[0].body;
    assert_eq!(body["status"], "firing");
    assert_eq!(body["receiver"], "test");
    let alert = &body["alerts"][0];
    assert_eq!(alert["labels"]["alertname"], "am_high");
    assert_eq!(alert["labels"]["host"], "a");
    assert_eq!(alert["labels"]["severity"], "page");
    assert_eq!(alert["annotations"]["summary"], "a high");
    assert!(alert["generatorURL"].as_str().unwrap().contains("/api/v3/query_sql"));
}

/// A CA and a certificate it signed for 127.0.0.1 (rustls does not take a self-signed
/// end-entity certificate as its own root), made with the openssl CLI.
fn ca_and_leaf(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.csr",
        "-subj",
        "/CN=sundial test ca",
    ]);
    run(&[
        "x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-out", "ca.pem", "-days", "2",
        "-extfile", "ca.ext",
    ]);
    run(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    (dir.join("ca.pem"), dir.join("leaf.pem"), dir.join("leaf.key"))
}

/// The messages the SMTP sink wrote, in order.
fn mails(dir: &std::path::Path) -> Vec<Value> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.iter().filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_over_starttls_with_auth_reaches_an_smtp_sink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, leaf, key) = ca_and_leaf(dir.path());
    let out = dir.path().join("mail");
    std::fs::create_dir_all(&out).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/smtp_sink.py");
    let mut sink = Killed(
        std::process::Command::new("python3")
            .args([
                script,
                out.to_str().unwrap(),
                &port.to_string(),
                leaf.to_str().unwrap(),
                key.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with aiosmtpd (installed by scripts/test.sh)"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sink.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready", "the SMTP sink did not start");

    let smarthost = format!("127.0.0.1:{port}");
    let server = Server::start(
        &dir.path().join("data"),
        &["--smtp-smarthost", &smarthost, "--smtp-from", "Sundial <alerts@example.com>"],
    );
    write(&server, &format!("cpu,host=a,region=eu u=95 {}", now_ns())).await;
    let ca = std::fs::read_to_string(&ca).unwrap();
    let (status, body) = server
        .execute(
            DB,
            &format!(
                "CREATE ALERT mail_high ON ({LAST_HIGH}) EVERY '1s' LABELS (severity = 'page') \
                 ANNOTATIONS (summary = '{{{{host}}}} at {{{{u}}}}%') ERROR AS keep_last NOTIFY \
                 (EMAIL 'Ops <ops@example.com>' WITH (auth_username = 'alerts', auth_password = \
                 's3cret', ca_pem = '{ca}'))"
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .execute(
            DB,
            &format!(
                "CREATE ALERT mail_bad_password ON ({LAST_HIGH}) EVERY '1s' ERROR AS keep_last \
                 NOTIFY (EMAIL 'ops@example.com' WITH (auth_username = 'alerts', auth_password = \
                 'wrong', ca_pem = '{ca}'))"
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let got = eventually(Duration::from_secs(30), || async { !mails(&out).is_empty() }).await;
    let all = mails(&out);
    assert!(
        got,
        "no mail arrived: {:?}",
        server.query(DB, "SELECT * FROM system.alert_events").await
    );
    let mail = &all[0];
    assert_eq!(mail["authenticated"], true);
    assert_eq!(mail["mail_from"], "alerts@example.com");
    assert_eq!(mail["rcpt_tos"], serde_json::json!(["ops@example.com"]));
    assert_eq!(mail["from"], "Sundial <alerts@example.com>");
    assert_eq!(mail["to"], "Ops <ops@example.com>");
    let subject = mail["subject"].as_str().unwrap();
    assert!(subject.starts_with("[FIRING:1] mail_high ("), "{subject}");
    assert!(subject.contains("page") && subject.contains("eu"), "{subject}");
    assert!(mail["message_id"].as_str().unwrap().ends_with("@sundial>"));
    assert_eq!(mail["content_type"], "multipart/alternative");
    let parts = mail["parts"].as_array().unwrap();
    let part = |t: &str| {
        parts
            .iter()
            .find(|p| p["type"] == t)
            .map(|p| p["body"].as_str().unwrap_or_default().to_string())
    };
    let text = part("text/plain").expect("a text body");
    let html = part("text/html").expect("an HTML body");
    assert!(text.contains("Firing (1)") && text.contains("summary: a at 95%"), "{text}");
    assert!(html.contains("<h3>Firing (1)</h3>") && html.contains("a at 95%"), "{html}");
    assert!(text.contains("host=a") && text.contains("/api/v3/query_sql?db=alerting"), "{text}");

    // A wrong password is a permanent SMTP error: dead at once, with the reply code.
    assert!(
        eventually(Duration::from_secs(20), || async {
            server
                .count(DB, "SELECT count(*) FROM system.alert_notifications WHERE name = 'mail_bad_password' AND status = 'dead'")
                .await
                == 1
        })
        .await
    );
    let events = server
        .query(DB, "SELECT status, outcome FROM system.alert_events WHERE name = 'mail_bad_password' AND kind = 'notification'")
        .await;
    assert_eq!(events[0]["outcome"], "dead");
    assert_eq!(events[0]["status"], 535, "{events:?}");

    // send_resolved = false (the e-mail default): no mail when it resolves.
    write(&server, &format!("cpu,host=a,region=eu u=5 {}", now_ns())).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            server
                .count(DB, "SELECT count(*) FROM system.alert_events WHERE name = 'mail_high' AND to_state = 'normal'")
                .await
                == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(mails(&out).len(), 1, "a resolved alert sends no mail without send_resolved");
    drop(sink);
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
