//! Notifications: the Alertmanager webhook JSON (version 4), the Alertmanager API v2 push, the
//! outbox entry that carries either until it is delivered, and one delivery attempt.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::rule::{Rule, Target};
use super::state::{Instance, Notify, State};

/// `endsAt` of a firing alert in the webhook payload (Alertmanager's zero time).
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
/// How often firing alerts are re-sent to an Alertmanager (Prometheus's `resend-delay`).
pub const RESEND_NS: i64 = 60 * 1_000_000_000;
/// Alerts in one payload; more are sent in several.
pub const ALERTS_PER_PAYLOAD: usize = 1000;
/// Delay before a retry: 1 s doubling to at most this, times a jitter of 0.5–1.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Where an outbox entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    Pending,
    Dead,
}

/// One notification to one target, kept (durably) until delivered or dead-lettered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outgoing {
    pub id: u64,
    pub db: String,
    pub rule: String,
    /// The rule's id (a rule dropped and created again is another rule).
    pub rule_id: u64,
    /// Which of the rule's targets (its notifications to one target are sent in order).
    pub target_index: usize,
    pub target: Target,
    /// Stable per rule, target and set of transitions: the `Idempotency-Key` header.
    pub key: String,
    pub body: Value,
    /// Firing and resolved alerts in the body, for the system tables.
    pub firing: usize,
    pub resolved: usize,
    pub created_ns: i64,
    pub attempts: u32,
    pub next_attempt_ns: i64,
    pub status: Delivery,
    pub last_error: Option<String>,
    /// The state generation that must be saved before this entry may be sent (0 once loaded:
    /// what was read back is durable).
    #[serde(skip)]
    pub generation: u64,
}

/// Alertmanager's fingerprint of a label set: FNV-1a (64 bit) over the labels sorted by name,
/// each name and value followed by the byte 255.
pub fn fingerprint(labels: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = labels.iter().collect();
    sorted.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut add = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, value) in sorted {
        add(name.as_bytes());
        add(&[255]);
        add(value.as_bytes());
        add(&[255]);
    }
    format!("{hash:016x}")
}

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        // Whole numbers print as integers (95, not 95.0), as Prometheus prints values.
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The instance's annotations: the rule's templates rendered with its labels and values.
pub fn annotations(rule: &Rule, instance: &Instance) -> Vec<(String, String)> {
    let lookup =
        |name: &str| {
            instance.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).or_else(|| {
                instance.values.iter().find(|(k, _)| k == name).map(|(_, v)| text_of(v))
            })
        };
    let mut out: Vec<(String, String)> =
        rule.annotations.iter().map(|(k, t)| (k.clone(), super::rule::render(t, lookup))).collect();
    if instance.state == State::Error || instance.firing_as == State::Error {
        if let Some((_, message)) = instance.values.iter().find(|(k, _)| k == "error") {
            out.push(("error".to_string(), text_of(message)));
        }
    }
    out
}

fn object(pairs: &[(String, String)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect()
}

/// Where a notification's reader can see the alert: its rows of `system.alerts`.
pub fn generator_url(external_url: &str, rule: &Rule) -> String {
    let sql =
        format!("SELECT * FROM system.alerts WHERE name = '{}'", rule.name.replace('\'', "''"));
    let mut url = format!("{}/api/v3/query_sql", external_url.trim_end_matches('/'));
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("db", &rule.db)
        .append_pair("q", &sql)
        .finish();
    url.push('?');
    url.push_str(&query);
    url
}

/// One alert of a payload.
#[derive(Debug, Clone)]
pub struct Alert {
    pub status: Notify,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    pub starts_ns: i64,
    pub ends_ns: Option<i64>,
    pub fingerprint: String,
}

impl Alert {
    pub fn of(rule: &Rule, instance: &Instance) -> Alert {
        let status = if instance.state.firing() { Notify::Firing } else { Notify::Resolved };
        Alert {
            status,
            labels: instance.labels.clone(),
            annotations: annotations(rule, instance),
            starts_ns: instance.fired_at.or(instance.active_at).unwrap_or_default(),
            ends_ns: if status == Notify::Resolved { instance.resolved_at } else { None },
            fingerprint: fingerprint(&instance.labels),
        }
    }

    fn status(&self) -> &'static str {
        match self.status {
            Notify::Firing => "firing",
            Notify::Resolved => "resolved",
        }
    }
}

/// Labels (or annotations) every alert has with the same value.
fn common(sets: &[&[(String, String)]]) -> Vec<(String, String)> {
    let Some((first, rest)) = sets.split_first() else { return Vec::new() };
    first.iter().filter(|pair| rest.iter().all(|s| s.contains(pair))).cloned().collect()
}

/// The Alertmanager webhook payload, version 4, for `alerts` of `rule`.
pub fn webhook_body(rule: &Rule, alerts: &[Alert], external_url: &str) -> Value {
    let generator = generator_url(external_url, rule);
    let firing = alerts.iter().any(|a| a.status == Notify::Firing);
    let labels: Vec<&[(String, String)]> = alerts.iter().map(|a| a.labels.as_slice()).collect();
    let annotations: Vec<&[(String, String)]> =
        alerts.iter().map(|a| a.annotations.as_slice()).collect();
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{}\"}}", rule.name.replace('"', "\\\"")),
        "truncatedAlerts": 0,
        "status": if firing { "firing" } else { "resolved" },
        "receiver": rule.name,
        "groupLabels": { "alertname": rule.name },
        "commonLabels": object(&common(&labels)),
        "commonAnnotations": object(&common(&annotations)),
        "externalURL": external_url,
        "alerts": alerts.iter().map(|a| json!({
            "status": a.status(),
            "labels": object(&a.labels),
            "annotations": object(&a.annotations),
            "startsAt": rfc3339(a.starts_ns),
            "endsAt": a.ends_ns.map_or(ZERO_TIME.to_string(), rfc3339),
            "generatorURL": generator,
            "fingerprint": a.fingerprint,
        })).collect::<Vec<_>>(),
    })
}

/// The body of `POST /api/v2/alerts`: firing alerts end `valid_until_ns` unless re-sent (as
/// Prometheus sets them: 4 × max(interval, resend delay) ahead), resolved ones when they did.
pub fn alertmanager_body(rule: &Rule, alerts: &[Alert], external_url: &str, now: i64) -> Value {
    let generator = generator_url(external_url, rule);
    let ahead = rule.every_ns().max(RESEND_NS).saturating_mul(4);
    Value::Array(
        alerts
            .iter()
            .map(|a| {
                json!({
                    "labels": object(&a.labels),
                    "annotations": object(&a.annotations),
                    "startsAt": rfc3339(a.starts_ns),
                    "endsAt": rfc3339(a.ends_ns.unwrap_or(now.saturating_add(ahead))),
                    "generatorURL": generator,
                })
            })
            .collect(),
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An e-mail: `subject`, `text` and `html`, as Alertmanager's default templates shape them
/// (subject `[FIRING:n] name (common labels)` or `[RESOLVED] name …`).
pub fn email_body(rule: &Rule, alerts: &[Alert], external_url: &str) -> Value {
    let firing: Vec<&Alert> = alerts.iter().filter(|a| a.status == Notify::Firing).collect();
    let resolved: Vec<&Alert> = alerts.iter().filter(|a| a.status == Notify::Resolved).collect();
    let labels: Vec<&[(String, String)]> = alerts.iter().map(|a| a.labels.as_slice()).collect();
    let common: Vec<String> =
        common(&labels).into_iter().filter(|(k, _)| k != "alertname").map(|(_, v)| v).collect();
    let mut subject = if firing.is_empty() {
        format!("[RESOLVED] {}", rule.name)
    } else {
        format!("[FIRING:{}] {}", firing.len(), rule.name)
    };
    if !common.is_empty() {
        subject += &format!(" ({})", common.join(" "));
    }
    let link = generator_url(external_url, rule);
    let mut text = String::new();
    let mut html = format!(
        "<html><body><h2>{}</h2><p><a href=\"{}\">View in Sundial</a></p>",
        escape(&subject),
        escape(&link)
    );
    for (title, group) in [("Firing", &firing), ("Resolved", &resolved)] {
        if group.is_empty() {
            continue;
        }
        text += &format!("{title} ({}):\n", group.len());
        html += &format!("<h3>{title} ({})</h3><ul>", group.len());
        for a in group.iter() {
            let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            text +=
                &format!("- Labels: {}\n  Since: {}\n", labels.join(", "), rfc3339(a.starts_ns));
            html += &format!(
                "<li><b>Labels:</b> {}<br><b>Since:</b> {}",
                escape(&labels.join(", ")),
                rfc3339(a.starts_ns)
            );
            for (k, v) in &a.annotations {
                text += &format!("  {k}: {v}\n");
                html += &format!("<br><b>{}:</b> {}", escape(k), escape(v));
            }
            html += "</li>";
        }
        text += "\n";
        html += "</ul>";
    }
    text += &format!("Source: {link}\n");
    html += "</body></html>";
    json!({ "subject": subject, "text": text, "html": html })
}

/// The idempotency key of a notification: the same for the same rule, target and
/// transitions, whoever sends it how often.
pub fn idempotency_key(rule_id: u64, target: usize, alerts: &[Alert], extra: &str) -> String {
    use ring::digest::{digest, SHA256};
    let mut text = format!("{rule_id}/{target}/{extra}");
    for a in alerts {
        text += &format!("/{}:{}:{}", a.fingerprint, a.status(), a.starts_ns);
    }
    hex::encode(&digest(&SHA256, text.as_bytes()).as_ref()[..16])
}

/// The delay before attempt `attempts + 1`, with a jitter from `seed`.
pub fn backoff(attempts: u32, seed: u64) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    let base = base.min(BACKOFF_MAX);
    // splitmix64 of the seed: a fraction in [0.5, 1).
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let fraction = 0.5 + (z >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
    base.mul_f64(fraction)
}

/// How one attempt went.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub status: Option<u16>,
    /// `None` when delivered.
    pub error: Option<String>,
    /// An answer no retry can change (a 4xx other than 408 and 429).
    pub permanent: bool,
}

/// The URL a target is posted to.
pub fn endpoint(target: &Target) -> String {
    match target {
        Target::Webhook { url, .. } | Target::Email { smarthost: Some(url), .. } => url.clone(),
        Target::Email { .. } => String::new(),
        Target::Alertmanager { url, .. } => {
            let base = url.trim_end_matches('/');
            if base.ends_with("/api/v2/alerts") {
                base.to_string()
            } else {
                format!("{base}/api/v2/alerts")
            }
        }
    }
}

/// One delivery attempt of `entry`.
pub async fn send(client: &reqwest::Client, smtp: &super::Smtp, entry: &Outgoing) -> Attempt {
    if let Target::Email { .. } = &entry.target {
        return send_email(smtp, entry).await;
    }
    let mut request = client
        .post(endpoint(&entry.target))
        .timeout(entry.target.timeout())
        .header("Idempotency-Key", &entry.key)
        .json(&entry.body);
    if let Target::Webhook { headers, .. } = &entry.target {
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            let code = Some(status.as_u16());
            if status.is_success() {
                return Attempt { status: code, error: None, permanent: false };
            }
            // At most the first KiB of an error's body: a target cannot make us hold more.
            let mut response = response;
            let mut head = Vec::new();
            while head.len() < 1024 {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        let room = 1024 - head.len();
                        head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    _ => break,
                }
            }
            let body: String = String::from_utf8_lossy(&head).chars().take(200).collect();
            let permanent = status.is_client_error()
                && status != reqwest::StatusCode::REQUEST_TIMEOUT
                && status != reqwest::StatusCode::TOO_MANY_REQUESTS;
            Attempt { status: code, error: Some(format!("HTTP {status}: {body}")), permanent }
        }
        Err(e) => {
            let what = if e.is_timeout() {
                format!("timed out after {}", humantime::format_duration(entry.target.timeout()))
            } else if e.is_connect() {
                "connection failed".to_string()
            } else {
                "request failed".to_string()
            };
            let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            let mut detail = String::new();
            while let Some(s) = source {
                detail = s.to_string();
                source = s.source();
            }
            let error = if detail.is_empty() { what } else { format!("{what}: {detail}") };
            Attempt { status: None, error: Some(error), permanent: false }
        }
    }
}

/// One e-mail attempt: the entry's message to its relay (implicit TLS on port 465, STARTTLS
/// when TLS is required, AUTH when credentials are given). The `Message-ID` carries the
/// idempotency key, so repeats can be recognised.
async fn send_email(defaults: &super::Smtp, entry: &Outgoing) -> Attempt {
    use lettre::message::{Mailbox, MultiPart};
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::transport::smtp::extension::ClientId;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
    let Target::Email {
        to,
        from,
        smarthost,
        hello,
        auth_username,
        auth_password,
        require_tls,
        ca_pem,
        timeout_ms,
        ..
    } = &entry.target
    else {
        return Attempt { status: None, error: Some("not an e-mail".into()), permanent: true };
    };
    let fail = |error: String| Attempt { status: None, error: Some(error), permanent: true };
    let Some(smarthost) = smarthost.clone().or_else(|| defaults.smarthost.clone()) else {
        return fail("no smarthost: set it on the target or with --smtp-smarthost".into());
    };
    let Some(from) = from.clone().or_else(|| defaults.from.clone()) else {
        return fail("no sender: set from on the target or --smtp-from".into());
    };
    let (host, port) = match super::ddl::host_port(&smarthost) {
        Ok(hp) => hp,
        Err(e) => return fail(e.to_string()),
    };
    let (Ok(from), Ok(to)) = (from.parse::<Mailbox>(), to.parse::<Mailbox>()) else {
        return fail("the sender or the recipient is not an e-mail address".into());
    };
    let text = |k: &str| entry.body.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let message = lettre::Message::builder()
        .from(from)
        .to(to)
        .subject(text("subject"))
        .message_id(Some(format!("<{}@sundial>", entry.key)))
        .multipart(MultiPart::alternative_plain_html(text("text"), text("html")));
    let message = match message {
        Ok(m) => m,
        Err(e) => return fail(format!("the message cannot be built: {e}")),
    };
    let wrapped = port == 465;
    let tls = if wrapped || require_tls.unwrap_or(defaults.require_tls) {
        let mut tls = TlsParameters::builder(host.clone());
        if let Some(pem) = ca_pem {
            match Certificate::from_pem(pem.as_bytes()) {
                Ok(cert) => tls = tls.add_root_certificate(cert),
                Err(e) => return fail(format!("ca_pem: {e}")),
            }
        }
        // Loading the system's roots blocks: not on a runtime worker. A failure (no CA bundle
        // on the machine) may be fixed there, so it is retried, not dead at once.
        match tokio::task::spawn_blocking(move || tls.build_rustls()).await {
            Ok(Ok(tls)) if wrapped => Tls::Wrapper(tls),
            Ok(Ok(tls)) => Tls::Required(tls),
            Ok(Err(e)) => {
                return Attempt {
                    status: None,
                    error: Some(format!("TLS set-up: {e}")),
                    permanent: false,
                }
            }
            Err(e) => {
                return Attempt {
                    status: None,
                    error: Some(format!("TLS set-up: {e}")),
                    permanent: false,
                }
            }
        }
    } else {
        Tls::None
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
        .port(port)
        .tls(tls)
        .timeout(Some(Duration::from_millis(*timeout_ms)));
    if let Some(name) = hello.clone().or_else(|| defaults.hello.clone()) {
        if super::ddl::hello_name(&name).is_err() {
            return fail(format!("hello '{name}' is not a host name"));
        }
        builder = builder.hello_name(ClientId::Domain(name));
    }
    let user = auth_username.clone().or_else(|| defaults.auth_username.clone());
    let password = auth_password.clone().or_else(|| defaults.auth_password.clone());
    if let (Some(user), Some(password)) = (user, password) {
        builder = builder.credentials(Credentials::new(user, password));
    }
    let transport = builder.build();
    match transport.send(message).await {
        Ok(response) => Attempt {
            status: response.code().to_string().parse().ok(),
            error: None,
            permanent: false,
        },
        Err(e) => {
            let status = e.status().and_then(|c| c.to_string().parse().ok());
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                detail = format!("{detail}: {s}");
                source = s.source();
            }
            Attempt { status, error: Some(format!("SMTP: {detail}")), permanent: e.is_permanent() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_ignore_label_order() {
        let a = vec![("alertname".to_string(), "x".to_string()), ("host".into(), "a".into())];
        let b = vec![a[1].clone(), a[0].clone()];
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 16);
        assert_ne!(fingerprint(&a), fingerprint(&[("alertname".into(), "y".into())]));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stops_growing() {
        for seed in 0..50 {
            let first = backoff(1, seed);
            assert!(first >= Duration::from_millis(500) && first < Duration::from_secs(1));
            let fourth = backoff(4, seed);
            assert!(fourth >= Duration::from_secs(4) && fourth < Duration::from_secs(8));
            assert!(backoff(30, seed) <= BACKOFF_MAX);
        }
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500_000_000), "1970-01-01T00:00:01.500Z");
    }
}
