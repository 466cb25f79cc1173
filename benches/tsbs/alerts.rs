//! `cargo bench --bench tsbs -- alerts`: alert rules over a materialized view, evaluated while
//! TSBS ingest runs. Reports the evaluation lag (scheduled → done, sampled from
//! `system.alert_rules.lag_ms` every second), the notification latency (a write that makes a
//! rule's condition true acknowledged → its webhook received) and ingest rows/s with the rules
//! running against a fresh server without them, in the same run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{generate, send, Server};

/// What the receiver got: the path (`/r{rule}`), when, and the payload's status.
type Received = Arc<Mutex<Vec<(String, Instant, String)>>>;

/// A webhook receiver on its own thread and runtime.
fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let g = got.clone();
    std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        runtime.block_on(async move {
            let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: String| {
                let g = g.clone();
                async move {
                    let status = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["status"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    g.lock().expect("received").push((
                        uri.path().to_string(),
                        Instant::now(),
                        status,
                    ));
                    axum::http::StatusCode::OK
                }
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("addr");
            let _ = axum::serve(listener, app).await;
        });
    });
    let addr = rx.recv().expect("receiver address");
    (format!("http://{addr}"), got)
}

async fn statement(client: &reqwest::Client, server: &Server, q: &str) {
    let response = client
        .post(format!("http://{}/api/v3/query_sql", server.addr))
        .json(&serde_json::json!({ "db": "benchmark", "q": q }))
        .send()
        .await
        .expect("statement");
    let status = response.status();
    assert!(status.is_success(), "{q}: {}", response.text().await.unwrap_or_default());
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// `rules` rules (10 hosts each) every `every_s` over a per-minute view of `hosts` hosts ×
/// `duration_s` of data; after ingest `triggers` hosts are made to exceed the threshold, and
/// with them every rule over them.
pub fn run(rules: usize, every_s: u64, hosts: usize, duration_s: i64, triggers: usize) -> Report {
    // Without rules: a fresh server, the same data.
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("plain"), &[]);
    let (rows, seconds, _, _) = send(&server, hosts, duration_s, 2, false);
    let plain = rows as f64 / seconds;
    server.stop();

    let server = Server::start(&dir.path().join("rules"), &[]);
    let (hook, got) = receiver();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = reqwest::Client::new();
    runtime.block_on(async {
        statement(&client, &server, "CREATE DATABASE benchmark").await;
        statement(
            &client,
            &server,
            "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS \
             minute, hostname, max(usage_user) AS peak FROM cpu GROUP BY 1, 2",
        )
        .await;
        for i in 0..rules {
            let names: Vec<String> =
                (0..10).map(|k| format!("'host_{}'", (i * 10 + k) % hosts)).collect();
            statement(
                &client,
                &server,
                &format!(
                    "CREATE ALERT r{i} ON (SELECT hostname, max(peak) AS peak FROM cpu_1m WHERE \
                     hostname IN ({}) GROUP BY hostname HAVING max(peak) > 1000) EVERY \
                     '{every_s}s' ERROR AS keep_last NOTIFY (WEBHOOK '{hook}/r{i}')",
                    names.join(", ")
                ),
            )
            .await;
        }
    });
    // Lag samples while ingest runs.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lags: Arc<Mutex<Vec<f64>>> = Arc::default();
    let sampler = {
        let (stop, lags, addr) = (stop.clone(), lags.clone(), server.addr.clone());
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
            rt.block_on(async {
                let client = reqwest::Client::new();
                let url = format!(
                    "http://{addr}/api/v3/query_sql?db=benchmark&q=SELECT%20lag_ms%20FROM%20system.alert_rules%20WHERE%20lag_ms%20IS%20NOT%20NULL"
                );
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(r) = client.get(&url).send().await {
                        if let Ok(rows) = r.json::<Vec<serde_json::Value>>().await {
                            let mut l = lags.lock().expect("lags");
                            l.extend(rows.iter().filter_map(|r| r["lag_ms"].as_f64()));
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        })
    };
    // Let every rule be evaluated at least once before ingest starts.
    std::thread::sleep(Duration::from_secs(every_s + 1));
    let (rows, seconds, _, _) = send(&server, hosts, duration_s, 2, false);
    let with_rules = rows as f64 / seconds;

    // Notification latency: one write per triggered host makes every rule over that host
    // true at its acknowledgement; each such rule's first firing webhook after it counts.
    let end_ns = generate::START_NS + duration_s * 1_000_000_000;
    let mut latencies = Vec::new();
    let mut expected = 0;
    runtime.block_on(async {
        let url = format!("http://{}/api/v3/write_lp?db=benchmark&precision=ns", server.addr);
        let mut triggered: Vec<usize> = (0..triggers).map(|t| (t * 10) % hosts).collect();
        triggered.dedup();
        let mut acked = Vec::new();
        for (t, host) in triggered.iter().enumerate() {
            let line = format!("cpu,hostname=host_{host} usage_user=5000i {}", end_ns + t as i64);
            let response = client.post(&url).body(line).send().await.expect("trigger");
            assert_eq!(response.status().as_u16(), 204);
            let at = Instant::now();
            for rule in (0..rules).filter(|r| (0..10).any(|k| (r * 10 + k) % hosts == *host)) {
                acked.push((format!("/r{rule}"), at));
            }
        }
        expected = acked.len();
        let deadline = Instant::now() + Duration::from_secs(every_s * 3 + 30);
        while Instant::now() < deadline {
            let got = got.lock().expect("received").clone();
            latencies = acked
                .iter()
                .filter_map(|(path, at)| {
                    got.iter()
                        .find(|(p, when, status)| p == path && status == "firing" && when > at)
                        .map(|(_, when, _)| when.duration_since(*at).as_secs_f64() * 1000.0)
                })
                .collect();
            if latencies.len() == acked.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    server.stop();
    let mut lags = lags.lock().expect("lags").clone();
    Report {
        rules,
        every_s,
        rows,
        plain,
        with_rules,
        lag_p50: percentile(&mut lags, 0.5),
        lag_p99: percentile(&mut lags, 0.99),
        notified: latencies.len(),
        triggers: expected,
        latency_p50: percentile(&mut latencies, 0.5),
        latency_p99: percentile(&mut latencies, 0.99),
    }
}

pub struct Report {
    pub rules: usize,
    pub every_s: u64,
    pub rows: u64,
    pub plain: f64,
    pub with_rules: f64,
    pub lag_p50: f64,
    pub lag_p99: f64,
    pub notified: usize,
    pub triggers: usize,
    pub latency_p50: f64,
    pub latency_p99: f64,
}

impl Report {
    pub fn print(&self) {
        println!(
            "| rules | every | rows | ingest rows/s without | with | ratio | lag p50 ms | lag p99 ms | notified | latency p50 ms | latency p99 ms |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} s | {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {}/{} | {:.0} | {:.0} |",
            self.rules,
            self.every_s,
            self.rows,
            self.plain,
            self.with_rules,
            self.with_rules / self.plain,
            self.lag_p50,
            self.lag_p99,
            self.notified,
            self.triggers,
            self.latency_p50,
            self.latency_p99,
        );
    }
}
