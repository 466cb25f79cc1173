//! An alert rule as stored: its query, timing, labels, annotation templates, policies and
//! targets. Checked once, at `CREATE ALERT` ([`Rule::check`] and the query's planned schema in
//! `ddl`); everything kept here is valid.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The shortest `EVERY`.
pub const EVERY_MIN: Duration = Duration::from_secs(1);
/// The longest `EVERY`.
pub const EVERY_MAX: Duration = Duration::from_secs(86_400);
/// The longest `FOR` and `KEEP FIRING FOR`.
pub const HOLD_MAX: Duration = Duration::from_secs(7 * 86_400);
/// Rules on the whole server.
pub const RULES_MAX: usize = 10_000;
/// Instances (rows) one evaluation may return; more is an evaluation error.
pub const INSTANCES_MAX: usize = 10_000;
/// Targets, labels and annotations of one rule.
pub const TARGETS_MAX: usize = 16;
pub const LABELS_MAX: usize = 64;
/// Bytes of one label value, annotation template or target address.
pub const TEXT_BYTES_MAX: usize = 16 << 10;
/// Bytes of all of a rule's labels and annotation templates together, and of one instance's
/// labels and values.
pub const RULE_TEXT_BYTES_MAX: usize = 64 << 10;
pub const INSTANCE_BYTES_MAX: usize = 16 << 10;
/// A target's request timeout: default and bounds.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
pub const TIMEOUT_MIN: Duration = Duration::from_millis(100);
pub const TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// Delivery attempts of one notification before it is dead-lettered: default and bound.
pub const ATTEMPTS_DEFAULT: u32 = 12;
pub const ATTEMPTS_MAX: u32 = 100;

/// What an evaluation that returns no rows means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNoData {
    /// Every instance's condition is false (the default, as in Prometheus).
    Ok,
    /// The rule's `nodata` instance fires, in state NoData.
    NoData,
    /// The rule's `nodata` instance fires, in state Alerting.
    Alerting,
    /// Nothing changes.
    KeepLast,
}

/// What an evaluation that fails means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The rule's `error` instance fires, in state Error (the default).
    Error,
    /// The rule's `error` instance fires, in state Alerting.
    Alerting,
    /// Nothing changes (the error is still recorded and shown).
    KeepLast,
}

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// POST of the Alertmanager webhook JSON (version 4).
    Webhook {
        url: String,
        timeout_ms: u64,
        send_resolved: bool,
        headers: Vec<(String, String)>,
        max_attempts: u32,
    },
    /// POST to a Prometheus Alertmanager's `/api/v2/alerts`, firing alerts re-sent as
    /// Prometheus does.
    Alertmanager { url: String, timeout_ms: u64, max_attempts: u32 },
    /// An e-mail over SMTP; what is not set here comes from the server's `--smtp-*` flags at
    /// sending time.
    Email {
        to: String,
        from: Option<String>,
        smarthost: Option<String>,
        hello: Option<String>,
        auth_username: Option<String>,
        auth_password: Option<String>,
        require_tls: Option<bool>,
        send_resolved: bool,
        /// Extra trusted certificates (PEM), for a relay with a private CA.
        ca_pem: Option<String>,
        timeout_ms: u64,
        max_attempts: u32,
    },
}

impl Target {
    /// Where the target's requests go (the unit of its concurrency limit).
    pub fn url(&self) -> &str {
        match self {
            Target::Webhook { url, .. } | Target::Alertmanager { url, .. } => url,
            Target::Email { smarthost: Some(host), .. } => host,
            Target::Email { .. } => "smtp",
        }
    }

    pub fn max_attempts(&self) -> u32 {
        match self {
            Target::Webhook { max_attempts, .. }
            | Target::Alertmanager { max_attempts, .. }
            | Target::Email { max_attempts, .. } => *max_attempts,
        }
    }

    pub fn timeout(&self) -> Duration {
        match self {
            Target::Webhook { timeout_ms, .. }
            | Target::Alertmanager { timeout_ms, .. }
            | Target::Email { timeout_ms, .. } => Duration::from_millis(*timeout_ms),
        }
    }

    /// The target as written in `NOTIFY (…)`, for messages and the system tables, without
    /// what may be a secret (a URL's credentials, path and query).
    pub fn describe(&self) -> String {
        match self {
            Target::Webhook { url, .. } => format!("WEBHOOK '{}'", redact_url(url)),
            Target::Alertmanager { url, .. } => format!("ALERTMANAGER '{}'", redact_url(url)),
            Target::Email { to, .. } => format!("EMAIL '{to}'"),
        }
    }
}

/// One alert rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub db: String,
    pub name: String,
    /// The `SELECT` whose rows are the rule's firing instances, as sqlparser prints it.
    pub query: String,
    pub every_ms: u64,
    pub for_ms: u64,
    pub keep_firing_for_ms: u64,
    /// The rule's own labels, in the order written.
    pub labels: Vec<(String, String)>,
    /// Annotation templates (`{{column}}`, `{{label}}`), in the order written.
    pub annotations: Vec<(String, String)>,
    pub no_data: OnNoData,
    pub on_error: OnError,
    pub targets: Vec<Target>,
    pub paused: bool,
}

/// A URL as shown to readers: scheme, host and port, with `/…` for a path or query (webhook
/// URLs of chat and paging services carry their tokens there).
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(url) => {
            let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
            if let Some(port) = url.port() {
                shown += &format!(":{port}");
            }
            if url.path() != "/" || url.query().is_some() {
                shown += "/…";
            }
            shown
        }
        Err(_) => "…".to_string(),
    }
}

/// Header values are not shown (they are usually credentials).
const HIDDEN: &str = "********";

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn duration_text(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string().replace(' ', "")
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn ident(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

impl Rule {
    pub fn every(&self) -> Duration {
        Duration::from_millis(self.every_ms)
    }

    /// `EVERY` in nanoseconds, at least 1 (also for a state file edited by hand).
    pub fn every_ns(&self) -> i64 {
        i64::try_from(self.every_ms).unwrap_or(i64::MAX).saturating_mul(1_000_000).max(1)
    }

    pub fn for_ns(&self) -> i64 {
        i64::try_from(self.for_ms).unwrap_or(i64::MAX / 2_000_000).saturating_mul(1_000_000)
    }

    pub fn keep_firing_for_ns(&self) -> i64 {
        i64::try_from(self.keep_firing_for_ms)
            .unwrap_or(i64::MAX / 2_000_000)
            .saturating_mul(1_000_000)
    }

    /// The rule as a `CREATE ALERT` statement, for `system.alert_rules` and `SHOW ALERTS`:
    /// it parses back, with secrets (URL paths and queries, header values, passwords) hidden.
    pub fn sql(&self) -> String {
        let mut sql = format!(
            "CREATE ALERT {} ON ({}) EVERY '{}'",
            ident(&self.name),
            self.query,
            duration_text(self.every_ms)
        );
        if self.for_ms > 0 {
            sql += &format!(" FOR '{}'", duration_text(self.for_ms));
        }
        if self.keep_firing_for_ms > 0 {
            sql += &format!(" KEEP FIRING FOR '{}'", duration_text(self.keep_firing_for_ms));
        }
        let pairs = |pairs: &[(String, String)]| {
            pairs.iter().map(|(k, v)| format!("{k} = {}", quote(v))).collect::<Vec<_>>().join(", ")
        };
        if !self.labels.is_empty() {
            sql += &format!(" LABELS ({})", pairs(&self.labels));
        }
        if !self.annotations.is_empty() {
            sql += &format!(" ANNOTATIONS ({})", pairs(&self.annotations));
        }
        let no_data = match self.no_data {
            OnNoData::Ok => None,
            OnNoData::NoData => Some("nodata"),
            OnNoData::Alerting => Some("alerting"),
            OnNoData::KeepLast => Some("keep_last"),
        };
        if let Some(p) = no_data {
            sql += &format!(" NO DATA AS {p}");
        }
        let on_error = match self.on_error {
            OnError::Error => None,
            OnError::Alerting => Some("alerting"),
            OnError::KeepLast => Some("keep_last"),
        };
        if let Some(p) = on_error {
            sql += &format!(" ERROR AS {p}");
        }
        let targets: Vec<String> = self
            .targets
            .iter()
            .map(|t| match t {
                Target::Webhook { url, timeout_ms, send_resolved, headers, max_attempts } => {
                    let mut options = vec![format!("timeout = '{}'", duration_text(*timeout_ms))];
                    options.push(format!("send_resolved = {send_resolved}"));
                    options.push(format!("max_attempts = {max_attempts}"));
                    for (name, _) in headers {
                        options.push(format!("header = {}", quote(&format!("{name}: {HIDDEN}"))));
                    }
                    format!("WEBHOOK {} WITH ({})", quote(&redact_url(url)), options.join(", "))
                }
                Target::Alertmanager { url, timeout_ms, max_attempts } => format!(
                    "ALERTMANAGER {} WITH (timeout = '{}', max_attempts = {max_attempts})",
                    quote(&redact_url(url)),
                    duration_text(*timeout_ms)
                ),
                Target::Email {
                    to,
                    from,
                    smarthost,
                    hello,
                    auth_username,
                    auth_password,
                    require_tls,
                    send_resolved,
                    ca_pem,
                    timeout_ms,
                    max_attempts,
                } => {
                    let mut options = Vec::new();
                    let mut text = |key: &str, value: &Option<String>| {
                        if let Some(v) = value {
                            options.push(format!("{key} = {}", quote(v)));
                        }
                    };
                    text("from", from);
                    text("smarthost", smarthost);
                    text("hello", hello);
                    text("auth_username", auth_username);
                    // The password is never shown.
                    text("auth_password", &auth_password.as_ref().map(|_| HIDDEN.to_string()));
                    text("ca_pem", &ca_pem.as_ref().map(|_| "(certificate)".to_string()));
                    if let Some(tls) = require_tls {
                        options.push(format!("require_tls = {tls}"));
                    }
                    options.push(format!("send_resolved = {send_resolved}"));
                    options.push(format!("timeout = '{}'", duration_text(*timeout_ms)));
                    options.push(format!("max_attempts = {max_attempts}"));
                    format!("EMAIL {} WITH ({})", quote(to), options.join(", "))
                }
            })
            .collect();
        sql += &format!(" NOTIFY ({})", targets.join(", "));
        sql
    }
}

/// A duration as rules write it: `'30s'`, `'2m'`, `'1h 30m'` or `INTERVAL '30 seconds'`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let compact: String = text.split_whitespace().collect();
    if compact.is_empty() {
        return None;
    }
    humantime::parse_duration(&compact).ok()
}

/// Checks a duration against its bounds; `what` names it in the message.
pub fn bounded(what: &str, text: &str, min: Duration, max: Duration) -> Result<u64, super::Error> {
    let d = parse_duration(text).ok_or_else(|| {
        super::Error::Invalid(format!(
            "{what} '{text}' is not a duration (write it as '30s', '2m' or INTERVAL '30 seconds')"
        ))
    })?;
    if d < min || d > max {
        return Err(super::Error::Invalid(format!(
            "{what} '{text}' is out of range: from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        )));
    }
    Ok(ms(d))
}

/// Whether `name` is a label or annotation name as Prometheus has them.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The names a template refers to (`{{ name }}`), or why it is malformed.
pub fn template_names(template: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let close =
            after.find("}}").ok_or_else(|| format!("\"{{{{\" without \"}}}}\" in '{template}'"))?;
        let name = after[..close].trim();
        if name.is_empty() {
            return Err(format!("an empty {{{{ }}}} in '{template}'"));
        }
        names.push(name.to_string());
        rest = &after[close + 2..];
    }
    Ok(names)
}

/// `template` with each `{{ name }}` replaced by `lookup(name)` (empty when it has none), cut
/// at [`TEXT_BYTES_MAX`].
pub fn render(template: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        if out.len() > TEXT_BYTES_MAX {
            break;
        }
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        match after.find("}}") {
            Some(close) => {
                out.push_str(&lookup(after[..close].trim()).unwrap_or_default());
                rest = &after[close + 2..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    if out.len() > TEXT_BYTES_MAX {
        let mut end = TEXT_BYTES_MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_spelling() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("30 seconds"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1 hour 30 minutes"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("-5s"), None);
        assert!(bounded("EVERY", "0s", EVERY_MIN, EVERY_MAX).is_err());
        assert!(bounded("EVERY", "999ms", EVERY_MIN, EVERY_MAX).is_err());
        assert_eq!(bounded("EVERY", "1s", EVERY_MIN, EVERY_MAX).ok(), Some(1000));
    }

    #[test]
    fn templates() {
        assert_eq!(template_names("{{host}} at {{ avg }}%").unwrap(), ["host", "avg"]);
        assert!(template_names("{{host").is_err());
        assert!(template_names("{{ }}").is_err());
        let text = render("{{host}} at {{ avg }}% {{gone}}", |n| match n {
            "host" => Some("a".into()),
            "avg" => Some("91.5".into()),
            _ => None,
        });
        assert_eq!(text, "a at 91.5% ");
        assert!(valid_label_name("severity") && valid_label_name("_x1"));
        assert!(!valid_label_name("1x") && !valid_label_name("a-b") && !valid_label_name(""));
    }
}
