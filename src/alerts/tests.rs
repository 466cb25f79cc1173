//! The rule registry with a manual clock: evaluations' outcomes applied at set times, the
//! outbox and its deliveries against a local receiver, and restarts from the state file.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::rule::{OnError, OnNoData, Rule, Target};
use super::state::{Outcome, Row, State};
use super::*;
use crate::clock::ManualClock;

const S: i64 = 1_000_000_000;
const T0: i64 = 1_800_000_000 * S;

fn rule(targets: Vec<Target>) -> Rule {
    Rule {
        db: "db".into(),
        name: "high".into(),
        query: "SELECT host FROM cpu".into(),
        every_ms: 10_000,
        for_ms: 30_000,
        keep_firing_for_ms: 0,
        labels: vec![("severity".into(), "page".into())],
        annotations: vec![("summary".into(), "{{host}} at {{v}}".into())],
        no_data: OnNoData::Ok,
        on_error: OnError::Error,
        targets,
        paused: false,
    }
}

fn webhook(url: &str, max_attempts: u32) -> Target {
    Target::Webhook {
        url: url.into(),
        timeout_ms: 2000,
        send_resolved: true,
        headers: vec![("X-Team".into(), "db".into())],
        max_attempts,
    }
}

fn rows(hosts: &[&str]) -> Outcome {
    Outcome::Rows(
        hosts
            .iter()
            .map(|h| Row {
                key: vec![h.to_string()],
                labels: vec![
                    ("alertname".into(), "high".into()),
                    ("severity".into(), "page".into()),
                    ("host".into(), h.to_string()),
                ],
                values: vec![("v".into(), serde_json::json!(97.5))],
            })
            .collect(),
    )
}

fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Arc<Alerts> {
    Alerts::open(dir, Config::for_tests(), clock.clone()).expect("open")
}

fn key() -> (String, String) {
    ("db".to_string(), "high".to_string())
}

/// Evaluates the rule at the clock's time with `outcome`, as the scheduler would.
fn evaluate(alerts: &Alerts, clock: &ManualClock, outcome: Outcome) {
    let id = alerts.lock().rules[&key()].id;
    let now = clock.now_ns();
    alerts.settle(&key(), id, outcome, now, now, Duration::from_millis(3));
}

#[tokio::test]
async fn firing_survives_a_restart_without_a_second_notification() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let alerts = open(dir.path(), &clock);
    assert!(alerts.create(rule(vec![webhook("http://127.0.0.1:9/hook", 3)]), false).await.unwrap());
    assert!(!alerts.create(rule(Vec::new()), true).await.unwrap(), "IF NOT EXISTS");
    assert!(matches!(alerts.create(rule(Vec::new()), false).await, Err(Error::Duplicate(_))));

    evaluate(&alerts, &clock, rows(&["a"]));
    assert!(alerts.outbox_of("db").is_empty(), "pending: nothing to send yet");
    clock.advance(Duration::from_secs(30));
    evaluate(&alerts, &clock, rows(&["a"]));
    let outbox = alerts.outbox_of("db");
    assert_eq!(outbox.len(), 1);
    let body = &outbox[0].body;
    assert_eq!(body["version"], "4");
    assert_eq!(body["status"], "firing");
    assert_eq!(body["alerts"][0]["labels"]["host"], "a");
    assert_eq!(body["alerts"][0]["annotations"]["summary"], "a at 97.5");
    assert_eq!(body["alerts"][0]["endsAt"], notify::ZERO_TIME);
    // Not sent before it is saved.
    assert!(alerts.due_deliveries(clock.now_ns()).is_empty());
    alerts.save_now().await.expect("save");
    let key_before = outbox[0].key.clone();

    // kill -9 here: the state and the outbox are on disk.
    drop(alerts);
    clock.advance(Duration::from_secs(10));
    let alerts = open(dir.path(), &clock);
    let rules = alerts.rules_of("db");
    assert_eq!(rules[0].instances[0].state, State::Alerting);
    let outbox = alerts.outbox_of("db");
    assert_eq!(outbox.len(), 1, "the undelivered notification is still there");
    assert_eq!(outbox[0].key, key_before, "with the same idempotency key");
    assert_eq!(alerts.due_deliveries(clock.now_ns()).len(), 1, "and is sent after the restart");
    // Still true after the restart: no second firing notification.
    evaluate(&alerts, &clock, rows(&["a"]));
    assert_eq!(alerts.outbox_of("db").len(), 1);
    // Resolved: one more.
    clock.advance(Duration::from_secs(10));
    evaluate(&alerts, &clock, rows(&[]));
    let outbox = alerts.outbox_of("db");
    assert_eq!(outbox.len(), 2);
    assert_eq!(outbox[1].body["status"], "resolved");
    assert_ne!(outbox[1].body["alerts"][0]["endsAt"], notify::ZERO_TIME);
}

#[tokio::test]
async fn pending_timers_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let alerts = open(dir.path(), &clock);
    alerts.create(rule(vec![webhook("http://127.0.0.1:9/hook", 3)]), false).await.unwrap();
    evaluate(&alerts, &clock, rows(&["a"]));
    alerts.save_now().await.expect("save");
    drop(alerts);
    clock.advance(Duration::from_secs(30));
    let alerts = open(dir.path(), &clock);
    assert_eq!(alerts.rules_of("db")[0].instances[0].state, State::Pending);
    evaluate(&alerts, &clock, rows(&["a"]));
    assert_eq!(alerts.rules_of("db")[0].instances[0].state, State::Alerting, "30 s after it began");
}

#[tokio::test]
async fn drop_pause_and_a_broken_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let alerts = open(dir.path(), &clock);
    alerts.create(rule(vec![webhook("http://127.0.0.1:9/hook", 3)]), false).await.unwrap();
    alerts.set_paused("db", "high", true).await.unwrap();
    assert!(alerts.due(clock.now_ns() + 100 * S).is_empty(), "a paused rule is not due");
    alerts.set_paused("db", "high", false).await.unwrap();
    assert_eq!(alerts.due(clock.now_ns()).len(), 1);
    assert!(matches!(alerts.set_paused("db", "nope", true).await, Err(Error::Undefined(_))));
    assert!(matches!(
        alerts.drop_rules("db", &["high".into(), "nope".into()], false).await,
        Err(Error::Undefined(_))
    ));
    assert_eq!(alerts.rules_of("db").len(), 1, "nothing dropped when one name is unknown");
    alerts.drop_rules("db", &["high".into(), "nope".into()], true).await.unwrap();
    assert!(alerts.rules_of("db").is_empty());
    drop(alerts);
    assert!(open(dir.path(), &clock).rules_of("db").is_empty(), "the drop is durable");
    std::fs::write(store::path(dir.path()), b"{\"format\": 1, \"rules\": [tru").unwrap();
    let error = Alerts::open(dir.path(), Config::for_tests(), clock.clone()).unwrap_err();
    assert!(error.to_string().contains("move it away"), "{error}");
}

/// A receiver that answers `500` to the first `failures` requests, then `200`.
async fn receiver(
    failures: usize,
) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<(String, String)>>>) {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c, s) = (count.clone(), seen.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (c, s) = (c.clone(), s.clone());
            async move {
                let n = c.fetch_add(1, Ordering::SeqCst);
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                assert_eq!(headers.get("x-team").and_then(|v| v.to_str().ok()), Some("db"));
                s.lock().unwrap().push((key, body));
                if n < failures {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), count, seen)
}

async fn deliver_due(alerts: &Arc<Alerts>, clock: &ManualClock) -> usize {
    let due = alerts.due_deliveries(clock.now_ns());
    let n = due.len();
    for entry in due {
        alerts.deliver(entry).await;
    }
    n
}

#[tokio::test]
async fn deliveries_retry_with_backoff_then_succeed_or_dead_letter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let (url, count, seen) = receiver(1).await;
    let alerts = open(dir.path(), &clock);
    let mut r = rule(vec![webhook(&url, 3)]);
    r.for_ms = 0;
    alerts.create(r, false).await.unwrap();
    evaluate(&alerts, &clock, rows(&["a", "b"]));
    alerts.save_now().await.unwrap();
    assert_eq!(deliver_due(&alerts, &clock).await, 1, "both instances in one notification");
    let outbox = alerts.outbox_of("db");
    assert_eq!((outbox[0].attempts, outbox[0].status), (1, notify::Delivery::Pending));
    assert!(outbox[0].next_attempt_ns > clock.now_ns(), "backs off");
    assert_eq!(deliver_due(&alerts, &clock).await, 0, "not before the backoff");
    clock.advance(Duration::from_secs(2));
    assert_eq!(deliver_due(&alerts, &clock).await, 1);
    assert!(alerts.outbox_of("db").is_empty(), "delivered");
    assert_eq!(count.load(Ordering::SeqCst), 2);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].0, seen[1].0, "a retry carries the same idempotency key");
    let body: serde_json::Value = serde_json::from_str(&seen[1].1).unwrap();
    assert_eq!(body["alerts"].as_array().map(Vec::len), Some(2));
    let events = alerts.events_of("db");
    let outcomes: Vec<_> = events.iter().filter_map(|e| e.outcome.clone()).collect();
    assert_eq!(outcomes, ["retry", "delivered"]);

    // A target that always fails is dead-lettered after its attempts.
    let (url, _, _) = receiver(usize::MAX).await;
    let mut r = rule(vec![webhook(&url, 2)]);
    r.name = "dead".into();
    r.for_ms = 0;
    alerts.create(r, false).await.unwrap();
    let id = alerts.lock().rules[&("db".to_string(), "dead".to_string())].id;
    let now = clock.now_ns();
    alerts.settle(&("db".into(), "dead".into()), id, rows(&["a"]), now, now, Duration::ZERO);
    alerts.save_now().await.unwrap();
    deliver_due(&alerts, &clock).await;
    clock.advance(Duration::from_secs(5));
    deliver_due(&alerts, &clock).await;
    let outbox = alerts.outbox_of("db");
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].status, notify::Delivery::Dead);
    assert!(outbox[0].last_error.as_deref().unwrap_or_default().contains("500"));
    clock.advance(Duration::from_secs(600));
    assert_eq!(deliver_due(&alerts, &clock).await, 0, "dead entries are not sent again");
}

/// The committed fixture of `storage-format/alerts.md` loads: a firing instance stays firing,
/// a pending one keeps its timer after a short outage, the undelivered entry waits to be sent.
#[tokio::test]
async fn the_storage_format_fixture_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("storage-format/fixtures");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("alerts")).unwrap();
    std::fs::copy(root.join("alerts-state-v1.json"), store::path(dir.path())).unwrap();
    let clock = Arc::new(ManualClock::new(1_800_000_040 * S));
    let alerts = open(dir.path(), &clock);
    let rules = alerts.rules_of("mydb");
    assert_eq!(rules.len(), 1);
    let r = &rules[0];
    assert_eq!(r.rule.targets.len(), 2);
    assert_eq!(r.rule.keep_firing_for_ms, 20_000);
    let states: Vec<State> = r.instances.iter().map(|i| i.state).collect();
    assert_eq!(states, [State::Alerting, State::Pending]);
    let outbox = alerts.outbox_of("mydb");
    assert_eq!((outbox[0].id, outbox[0].attempts), (3, 1));
    assert_eq!(alerts.due_deliveries(clock.now_ns()).len(), 1);
    assert_eq!(alerts.events_of("mydb").len(), 1);
    assert!(r.rule.sql().starts_with("CREATE ALERT high_cpu ON (SELECT host"));
    // The definition shown in system.alert_rules parses back to the same pieces.
    match super::sql::parse(&r.rule.sql()) {
        Some(Ok(super::sql::Statement::Create(c))) => {
            assert_eq!((c.every.as_str(), c.for_.as_deref()), ("10s", Some("30s")));
            assert_eq!(c.keep_firing_for.as_deref(), Some("20s"));
            assert_eq!(c.targets.len(), 2);
            assert_eq!(c.labels, r.rule.labels);
            assert_eq!(c.annotations, r.rule.annotations);
        }
        other => panic!("{other:?}"),
    }
    // New ids continue after the file's.
    assert_eq!(alerts.lock().take_id(), 4);
}

#[tokio::test]
async fn one_rule_s_notifications_to_a_target_go_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let alerts = open(dir.path(), &clock);
    let mut r =
        rule(vec![webhook("http://127.0.0.1:9/hook", 3), webhook("http://127.0.0.1:9/b", 3)]);
    r.for_ms = 0;
    alerts.create(r, false).await.unwrap();
    evaluate(&alerts, &clock, rows(&["a"]));
    clock.advance(Duration::from_secs(10));
    evaluate(&alerts, &clock, rows(&[]));
    alerts.save_now().await.unwrap();
    assert_eq!(alerts.outbox_of("db").len(), 4, "firing and resolved, to each of two targets");
    let due = alerts.due_deliveries(clock.now_ns());
    // Only the firing notification of each target: its resolved one waits for it.
    assert_eq!(due.len(), 2);
    assert!(due.iter().all(|o| o.body["status"] == "firing"));
    assert_ne!(due[0].target_index, due[1].target_index);
    assert!(alerts.due_deliveries(clock.now_ns()).is_empty(), "in flight: nothing else is due");
}

#[test]
fn secrets_are_not_shown() {
    use super::rule::redact_url;
    assert_eq!(redact_url("https://hooks.slack.com/services/T/B/XXX"), "https://hooks.slack.com/…");
    assert_eq!(redact_url("http://user:pw@am:9093/"), "http://am:9093");
    assert_eq!(redact_url("http://h/x?token=1"), "http://h/…");
    let mut r = rule(vec![webhook("https://h/secret-path", 3)]);
    if let Target::Webhook { headers, .. } = &mut r.targets[0] {
        headers[0].1 = "Bearer very-secret".into();
    }
    let sql = r.sql();
    assert!(!sql.contains("secret"), "{sql}");
    assert!(!r.targets[0].describe().contains("secret"));
}

#[tokio::test]
async fn dropping_a_firing_rule_resolves_its_alerts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let alerts = open(dir.path(), &clock);
    let mut r = rule(vec![webhook("http://127.0.0.1:9/hook", 3)]);
    r.for_ms = 0;
    alerts.create(r, false).await.unwrap();
    evaluate(&alerts, &clock, rows(&["a"]));
    clock.advance(Duration::from_secs(5));
    alerts.drop_rules("db", &["high".into()], false).await.unwrap();
    let outbox = alerts.outbox_of("db");
    assert_eq!(outbox.len(), 1, "the undelivered firing one gives way to the resolution");
    assert_eq!(outbox[0].body["status"], "resolved");
    assert_eq!(outbox[0].body["alerts"][0]["labels"]["host"], "a");
    assert_eq!(alerts.due_deliveries(clock.now_ns()).len(), 1, "saved with the drop");
    drop(alerts);
    let alerts = open(dir.path(), &clock);
    assert!(alerts.rules_of("db").is_empty());
    assert_eq!(alerts.outbox_of("db").len(), 1, "and sent after a restart too");
}

#[tokio::test]
async fn instances_of_all_rules_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let alerts = open(dir.path(), &clock);
    alerts.create(rule(vec![webhook("http://127.0.0.1:9/hook", 3)]), false).await.unwrap();
    let many: Vec<String> = (0..=INSTANCES_TOTAL_MAX).map(|i| format!("h{i}")).collect();
    let hosts: Vec<&str> = many.iter().map(String::as_str).collect();
    evaluate(&alerts, &clock, rows(&hosts));
    let r = &alerts.rules_of("db")[0];
    assert!(r.last_error.as_deref().unwrap_or_default().contains("at most"), "{:?}", r.last_error);
    assert_eq!(r.instances.len(), 1, "only the rule's error instance");
}

/// Whatever text arrives, the alert statement parser, the templates and the address checks
/// answer without panicking.
#[test]
fn hostile_text_never_panics() {
    use proptest::prelude::*;
    let words = proptest::collection::vec(
        prop_oneof![
            Just("CREATE ALERT".to_string()),
            Just("DROP ALERT".to_string()),
            Just("ALTER ALERT".to_string()),
            Just("ON (SELECT 1)".to_string()),
            Just("EVERY '1s'".to_string()),
            Just("FOR".to_string()),
            Just("KEEP FIRING FOR".to_string()),
            Just("NOTIFY (".to_string()),
            Just("WEBHOOK 'http://x'".to_string()),
            Just("WITH (a = 'b')".to_string()),
            Just("LABELS (".to_string()),
            Just(")".to_string()),
            Just(",".to_string()),
            "\\PC{0,12}",
        ],
        0..12,
    );
    proptest!(ProptestConfig::with_cases(2000), |(parts in words, text in "\\PC{0,40}")| {
        let sql = parts.join(" ");
        let _ = super::sql::parse(&sql);
        let _ = super::rule::template_names(&text);
        let _ = super::rule::render(&text, |n| Some(n.repeat(3)));
        let _ = super::rule::parse_duration(&text);
        let _ = super::rule::redact_url(&text);
        let _ = super::ddl::host_port(&text);
        let _ = super::ddl::hello_name(&text);
    });
}
