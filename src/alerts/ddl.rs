//! `CREATE ALERT`, `DROP ALERT`, `ALTER ALERT … PAUSE | RESUME` for either protocol and HTTP:
//! every piece checked, and the query planned in its database, before the rule is kept.

use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use super::rule::{self, OnError, OnNoData, Rule, Target};
use super::sql::{Create, RawTarget, Statement};
use super::Error;
use crate::query::QueryEngine;

/// Runs one alert statement in `db`; the command tag on success.
pub async fn execute(
    query: &QueryEngine,
    db: &str,
    statement: Statement,
) -> Result<&'static str, Error> {
    let alerts = query.alerts();
    match statement {
        Statement::Create(create) => {
            let if_not_exists = create.if_not_exists;
            let rule = check(query, db, *create).await?;
            alerts.create(rule, if_not_exists).await?;
            Ok("CREATE ALERT")
        }
        Statement::Drop { names, if_exists } => {
            alerts.drop_rules(db, &names, if_exists).await?;
            Ok("DROP ALERT")
        }
        Statement::Alter { name, paused } => {
            alerts.set_paused(db, &name, paused).await?;
            Ok("ALTER ALERT")
        }
    }
}

fn invalid<T>(message: String) -> Result<T, Error> {
    Err(Error::Invalid(message))
}

fn text_bounded(what: &str, text: &str) -> Result<(), Error> {
    if text.len() > rule::TEXT_BYTES_MAX {
        return Err(Error::Limit(format!(
            "{what} is {} bytes, more than the {} allowed",
            text.len(),
            rule::TEXT_BYTES_MAX
        )));
    }
    Ok(())
}

fn boolean(what: &str, value: &str) -> Result<bool, Error> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" => Ok(true),
        "false" | "off" | "no" => Ok(false),
        _ => invalid(format!("{what} is true or false, not '{value}'")),
    }
}

fn attempts(value: &str) -> Result<u32, Error> {
    value.parse::<u32>().ok().filter(|n| (1..=rule::ATTEMPTS_MAX).contains(n)).ok_or_else(|| {
        Error::Invalid(format!(
            "max_attempts is a number from 1 to {}, not '{value}'",
            rule::ATTEMPTS_MAX
        ))
    })
}

fn http_url(kind: &str, address: &str) -> Result<String, Error> {
    text_bounded(&format!("the {kind} address"), address)?;
    let url = url::Url::parse(address)
        .map_err(|e| Error::Invalid(format!("{kind} '{address}' is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return invalid(format!(
            "{kind} '{address}' is not an http:// or https:// URL with a host"
        ));
    }
    Ok(address.to_string())
}

/// Checks an e-mail address (`name <a@b>` or `a@b`).
fn mailbox(what: &str, address: &str) -> Result<(), Error> {
    address
        .parse::<lettre::message::Mailbox>()
        .map(|_| ())
        .map_err(|e| Error::Invalid(format!("{what} '{address}' is not an e-mail address: {e}")))
}

/// Checks `host:port` (an IPv6 address in brackets: `[::1]:25`).
pub fn host_port(text: &str) -> Result<(String, u16), Error> {
    let bad = || Error::Invalid(format!("smarthost '{text}' is not host:port"));
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
        Some(_) => return Err(bad()),
        None if host.contains(':') => return Err(bad()),
        None => host,
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Checks the name Sundial greets a relay with (it is written into `EHLO` as is).
pub fn hello_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    if ok {
        Ok(())
    } else {
        invalid(format!("hello '{name}' is not a host name"))
    }
}

fn target(raw: RawTarget, smtp: &super::Smtp) -> Result<Target, Error> {
    let mut timeout_ms = u64::try_from(rule::TIMEOUT_DEFAULT.as_millis()).unwrap_or(10_000);
    let mut max_attempts = rule::ATTEMPTS_DEFAULT;
    match raw.kind.as_str() {
        "WEBHOOK" => {
            let url = http_url("WEBHOOK", &raw.address)?;
            let mut send_resolved = true;
            let mut headers = Vec::new();
            for (key, value) in &raw.options {
                match key.to_ascii_lowercase().as_str() {
                    "timeout" => {
                        timeout_ms =
                            rule::bounded("timeout", value, rule::TIMEOUT_MIN, rule::TIMEOUT_MAX)?
                    }
                    "send_resolved" => send_resolved = boolean("send_resolved", value)?,
                    "max_attempts" => max_attempts = attempts(value)?,
                    "header" | "headers" => {
                        text_bounded("a header", value)?;
                        for header in value.split(['\n', ';']).filter(|h| !h.trim().is_empty()) {
                            let (name, v) = header.split_once(':').ok_or_else(|| {
                                Error::Invalid(format!("header '{header}' is not 'Name: value'"))
                            })?;
                            let (name, v) = (name.trim(), v.trim());
                            let ok = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                                .is_ok()
                                && reqwest::header::HeaderValue::from_str(v).is_ok();
                            if !ok {
                                return invalid(format!(
                                    "header '{header}' is not a valid HTTP header"
                                ));
                            }
                            let reserved = [
                                "content-type",
                                "content-length",
                                "content-encoding",
                                "transfer-encoding",
                                "connection",
                                "host",
                                "idempotency-key",
                            ];
                            if reserved.contains(&name.to_ascii_lowercase().as_str()) {
                                return invalid(format!("header {name} is set by Sundial"));
                            }
                            headers.push((name.to_string(), v.to_string()));
                        }
                    }
                    other => {
                        return invalid(format!(
                            "unknown WEBHOOK option \"{other}\"; the options are timeout, \
                             send_resolved, header and max_attempts"
                        ))
                    }
                }
            }
            Ok(Target::Webhook { url, timeout_ms, send_resolved, headers, max_attempts })
        }
        "ALERTMANAGER" => {
            let url = http_url("ALERTMANAGER", &raw.address)?;
            for (key, value) in &raw.options {
                match key.to_ascii_lowercase().as_str() {
                    "timeout" => {
                        timeout_ms =
                            rule::bounded("timeout", value, rule::TIMEOUT_MIN, rule::TIMEOUT_MAX)?
                    }
                    "max_attempts" => max_attempts = attempts(value)?,
                    other => {
                        return invalid(format!(
                            "unknown ALERTMANAGER option \"{other}\"; the options are timeout \
                             and max_attempts"
                        ))
                    }
                }
            }
            Ok(Target::Alertmanager { url, timeout_ms, max_attempts })
        }
        "EMAIL" => {
            text_bounded("the EMAIL address", &raw.address)?;
            mailbox("EMAIL", &raw.address)?;
            let (mut from, mut smarthost, mut hello, mut auth_username, mut auth_password) =
                (None, None, None, None, None);
            let (mut require_tls, mut send_resolved, mut ca_pem) = (None, false, None);
            for (key, value) in &raw.options {
                text_bounded(&format!("EMAIL option {key}"), value)?;
                match key.to_ascii_lowercase().as_str() {
                    "from" => {
                        mailbox("from", value)?;
                        from = Some(value.clone());
                    }
                    "smarthost" => {
                        host_port(value)?;
                        smarthost = Some(value.clone());
                    }
                    "hello" => {
                        hello_name(value)?;
                        hello = Some(value.clone());
                    }
                    "auth_username" => auth_username = Some(value.clone()),
                    "auth_password" => auth_password = Some(value.clone()),
                    "require_tls" => require_tls = Some(boolean("require_tls", value)?),
                    "send_resolved" => send_resolved = boolean("send_resolved", value)?,
                    "ca_pem" => {
                        use tokio_rustls::rustls::pki_types::pem::PemObject;
                        use tokio_rustls::rustls::pki_types::CertificateDer;
                        let certs: Result<Vec<_>, _> =
                            CertificateDer::pem_slice_iter(value.as_bytes()).collect();
                        match certs {
                            Ok(certs) if !certs.is_empty() => ca_pem = Some(value.clone()),
                            _ => {
                                return invalid(
                                    "ca_pem holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                                        .into(),
                                )
                            }
                        }
                    }
                    "timeout" => {
                        timeout_ms =
                            rule::bounded("timeout", value, rule::TIMEOUT_MIN, rule::TIMEOUT_MAX)?
                    }
                    "max_attempts" => max_attempts = attempts(value)?,
                    other => {
                        return invalid(format!(
                            "unknown EMAIL option \"{other}\"; the options are from, smarthost, \
                             hello, auth_username, auth_password, require_tls, send_resolved, \
                             ca_pem, timeout and max_attempts"
                        ))
                    }
                }
            }
            if auth_username.is_some() != auth_password.is_some()
                && (auth_password.is_some() || smtp.auth_password.is_none())
            {
                return invalid("EMAIL needs auth_username and auth_password together".into());
            }
            if from.is_none() && smtp.from.is_none() {
                return invalid(
                    "EMAIL needs a sender: WITH (from = '…') or the server's --smtp-from".into(),
                );
            }
            if smarthost.is_none() && smtp.smarthost.is_none() {
                return invalid(
                    "EMAIL needs a relay: WITH (smarthost = 'host:port') or the server's \
                     --smtp-smarthost"
                        .into(),
                );
            }
            Ok(Target::Email {
                to: raw.address,
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
            })
        }
        other => invalid(format!(
            "unknown notification target {other}: the targets are WEBHOOK 'http://…', \
             ALERTMANAGER 'http://…' and EMAIL 'name@example.com'"
        )),
    }
}

/// Checks a `CREATE ALERT` in `db` and makes its rule.
pub async fn check(query: &QueryEngine, db: &str, create: Create) -> Result<Rule, Error> {
    let name = create.name;
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return invalid(
            "an alert's name is 1 to 256 characters, none of them control characters".into(),
        );
    }
    let every_ms = rule::bounded("EVERY", &create.every, rule::EVERY_MIN, rule::EVERY_MAX)?;
    let hold = |what: &str, text: &Option<String>| match text {
        Some(text) => rule::bounded(what, text, std::time::Duration::ZERO, rule::HOLD_MAX),
        None => Ok(0),
    };
    let for_ms = hold("FOR", &create.for_)?;
    let keep_firing_for_ms = hold("KEEP FIRING FOR", &create.keep_firing_for)?;
    let no_data = match create.no_data.as_deref() {
        None | Some("ok") => OnNoData::Ok,
        Some("nodata") => OnNoData::NoData,
        Some("alerting") => OnNoData::Alerting,
        Some("keep_last") => OnNoData::KeepLast,
        Some(other) => {
            return invalid(format!(
                "NO DATA AS {other}: the choices are ok, nodata, alerting and keep_last"
            ))
        }
    };
    let on_error = match create.on_error.as_deref() {
        None | Some("error") => OnError::Error,
        Some("alerting") => OnError::Alerting,
        Some("keep_last") => OnError::KeepLast,
        Some(other) => {
            return invalid(format!(
                "ERROR AS {other}: the choices are error, alerting and keep_last"
            ))
        }
    };
    if create.targets.is_empty() || create.targets.len() > rule::TARGETS_MAX {
        return invalid(format!("NOTIFY names 1 to {} targets", rule::TARGETS_MAX));
    }
    let smtp = &query.alerts().smtp();
    let targets =
        create.targets.into_iter().map(|t| target(t, smtp)).collect::<Result<Vec<_>, _>>()?;

    // The query: one read, planned in the database now (it must plan; its columns decide
    // what labels and template names there are).
    if crate::statement::writes(&create.query.body) {
        return invalid("an alert's query reads: it cannot INSERT, UPDATE or DELETE".into());
    }
    let statement = SqlStatement::Query(create.query);
    let text = statement.to_string();
    let ctx = query.context(db)?;
    let plan = query.plan(&ctx, db, statement).await?;
    let mut labels_of_query = Vec::new();
    let mut columns = Vec::new();
    for field in plan.schema().fields() {
        let name = field.name().clone();
        if columns.contains(&name) {
            return invalid(format!(
                "the query has two columns named \"{name}\"; name them apart with AS"
            ));
        }
        if super::eval::is_label(field.data_type()) {
            if !rule::valid_label_name(&name) {
                return invalid(format!(
                    "text column \"{name}\" is a label and needs a label's name (letters, digits \
                     and _, not first a digit): name it with AS"
                ));
            }
            labels_of_query.push(name.clone());
        }
        columns.push(name);
    }
    let reserved = ["alertname", "alertstate"];
    if let Some(name) = labels_of_query.iter().find(|n| reserved.contains(&n.as_str())) {
        return invalid(format!("label \"{name}\" is Sundial's; name the column otherwise"));
    }
    if create.labels.len() > rule::LABELS_MAX || create.annotations.len() > rule::LABELS_MAX {
        return Err(Error::Limit(format!("at most {} LABELS and ANNOTATIONS", rule::LABELS_MAX)));
    }
    let mut seen = Vec::new();
    for (key, value) in &create.labels {
        if !rule::valid_label_name(key) || reserved.contains(&key.as_str()) {
            return invalid(format!("\"{key}\" is not a label name a rule may set"));
        }
        if labels_of_query.contains(key) || seen.contains(key) {
            return invalid(format!("label \"{key}\" is given twice (by LABELS and the query)"));
        }
        text_bounded(&format!("label {key}"), value)?;
        seen.push(key.clone());
    }
    let rule_text: usize =
        create.labels.iter().chain(&create.annotations).map(|(k, v)| k.len() + v.len()).sum();
    if rule_text > rule::RULE_TEXT_BYTES_MAX {
        return Err(Error::Limit(format!(
            "the rule's labels and annotations are {rule_text} bytes, more than the {} allowed",
            rule::RULE_TEXT_BYTES_MAX
        )));
    }
    let mut known: Vec<String> = columns.clone();
    known.extend(seen.iter().cloned());
    known.extend(reserved.iter().map(|s| s.to_string()));
    let mut names = Vec::new();
    for (key, template) in &create.annotations {
        if !rule::valid_label_name(key) || names.contains(key) {
            return invalid(format!("\"{key}\" is not an annotation name, or it is given twice"));
        }
        names.push(key.clone());
        text_bounded(&format!("annotation {key}"), template)?;
        for used in rule::template_names(template).map_err(Error::Invalid)? {
            if !known.contains(&used) {
                return invalid(format!(
                    "annotation {key} refers to {{{{{used}}}}}, which is not a column of the query \
                     or a label (they are: {})",
                    known.join(", ")
                ));
            }
        }
    }
    Ok(Rule {
        db: db.to_string(),
        name,
        query: text.clone(),
        every_ms,
        for_ms,
        keep_firing_for_ms,
        labels: create.labels,
        annotations: create.annotations,
        no_data,
        on_error,
        targets,
        paused: false,
    })
}
