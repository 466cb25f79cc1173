//! Alert rules in SQL (`CREATE ALERT … ON (<query>) EVERY … NOTIFY (…)`): evaluated on their
//! intervals, their instances moved through Grafana's states ([`state`]), notifications kept
//! in a durable outbox and delivered at least once ([`notify`]), everything saved in
//! `{data-dir}/alerts/state.json` ([`store`]) before it is acknowledged or sent.
//!
//! Three kinds of work run in [`Alerts::run`], never on the WAL writer thread: the scheduler
//! (a 100 ms tick that starts due evaluations, at most [`EVALUATIONS_AT_ONCE`] at a time and
//! never two of one rule), delivery (due outbox entries, at most [`SENDS_PER_TARGET`] per
//! target URL and [`SENDS_AT_ONCE`] in all, so a slow target blocks neither evaluation nor
//! other targets), and saving (group commit: one write covers every change made before it).

pub mod ddl;
pub mod eval;
pub mod notify;
pub mod rule;
pub mod sql;
pub mod state;
pub mod store;
pub mod system;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::pg::sqlstate::SqlState;
use crate::query::QueryEngine;
use notify::{Alert, Delivery, Outgoing};
use rule::{Rule, Target};
use state::{Instance, Notify, Outcome};

/// Evaluations running at once (on the query engine, beside users' queries).
pub const EVALUATIONS_AT_ONCE: usize = 4;
/// Deliveries in flight to one target URL, and in all.
pub const SENDS_PER_TARGET: usize = 4;
pub const SENDS_AT_ONCE: usize = 64;
/// Outbox entries waiting; a rule whose notification finds the outbox full records an error.
pub const OUTBOX_MAX: usize = 10_000;
/// Instances of all rules together.
pub const INSTANCES_TOTAL_MAX: usize = 200_000;
/// Undelivered entries of one rule.
pub const OUTBOX_PER_RULE: usize = 100;
/// Dead-lettered entries kept for `system.alert_notifications` (the newest).
pub const DEAD_KEPT: usize = 1000;
/// Events kept in memory for `system.alert_events` (the newest).
pub const EVENTS_KEPT: usize = 10_000;
/// An outage up to this long keeps Pending timers; after a longer one they start again
/// (Prometheus's `--rules.alert.for-outage-tolerance`).
pub const OUTAGE_TOLERANCE_NS: i64 = 3600 * 1_000_000_000;
/// How often evaluation times alone (no change of state) are saved.
const SOFT_SAVE_EVERY: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("alert \"{0}\" already exists")]
    Duplicate(String),
    #[error("alert \"{0}\" does not exist")]
    Undefined(String),
    #[error("{0}")]
    Limit(String),
    #[error(transparent)]
    Query(#[from] crate::query::Error),
    #[error("the alert state could not be saved, nothing changed: {0}")]
    Storage(String),
}

impl Error {
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind;
        match self {
            Error::Syntax(_) | Error::Invalid(_) | Error::Limit(_) => ErrorKind::InvalidInput,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Duplicate(_) => ErrorKind::AlreadyExists,
            Error::Undefined(_) => ErrorKind::NotFound,
            Error::Query(e) => e.kind(),
            Error::Storage(_) => ErrorKind::Internal,
        }
    }
}

/// The SQLSTATE of an alert statement's error.
pub fn sqlstate_of(error: &Error) -> SqlState {
    match error {
        Error::Syntax(_) => SqlState::SyntaxError,
        Error::Invalid(_) => SqlState::InvalidParameterValue,
        Error::Unsupported(_) => SqlState::FeatureNotSupported,
        Error::Duplicate(_) => SqlState::DuplicateObject,
        Error::Undefined(_) => SqlState::UndefinedObject,
        Error::Limit(_) => SqlState::ProgramLimitExceeded,
        Error::Query(e) => crate::pg::sqlstate_of_query(e),
        Error::Storage(_) => SqlState::InternalError,
    }
}

/// Server-wide alerting settings (flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// The server's address as receivers reach it (`externalURL`, `generatorURL`).
    pub external_url: String,
    pub smtp: Smtp,
}

/// E-mail defaults for `EMAIL` targets that do not set them (`--smtp-*`).
#[derive(Clone, Default)]
pub struct Smtp {
    pub smarthost: Option<String>,
    pub from: Option<String>,
    pub hello: Option<String>,
    pub auth_username: Option<String>,
    pub auth_password: Option<String>,
    pub require_tls: bool,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp")
            .field("smarthost", &self.smarthost)
            .field("from", &self.from)
            .field("auth_username", &self.auth_username)
            .field("require_tls", &self.require_tls)
            .finish_non_exhaustive()
    }
}

impl Config {
    #[cfg(test)]
    pub fn for_tests() -> Config {
        Config {
            external_url: "http://127.0.0.1:8086".into(),
            smtp: Smtp { require_tls: true, ..Smtp::default() },
        }
    }
}

/// One transition, notification attempt or evaluation error (`system.alert_events`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub time_ns: i64,
    pub db: String,
    pub rule: String,
    /// `transition`, `notification` or `evaluation`.
    pub kind: String,
    /// The instance's labels as a JSON object.
    pub labels: Option<String>,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    pub target: Option<String>,
    /// `delivered`, `retry`, `dead`, `error`.
    pub outcome: Option<String>,
    /// The HTTP status or the SMTP reply code.
    pub status: Option<u16>,
    pub attempt: Option<u32>,
    pub message: Option<String>,
    pub key: Option<String>,
}

impl Event {
    fn new(time_ns: i64, db: &str, rule: &str, kind: &str) -> Event {
        Event {
            time_ns,
            db: db.to_string(),
            rule: rule.to_string(),
            kind: kind.to_string(),
            labels: None,
            from_state: None,
            to_state: None,
            target: None,
            outcome: None,
            status: None,
            attempt: None,
            message: None,
            key: None,
        }
    }
}

pub fn labels_json(labels: &[(String, String)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
    serde_json::Value::Object(map).to_string()
}

/// The inverse of one statement's change, applied if its save fails.
type Undo = Box<dyn FnOnce(&mut Inner) + Send>;

/// One notification to queue: for which of the rule's targets, and what.
struct Queued {
    target_index: usize,
    target: Target,
    key: String,
    body: serde_json::Value,
    firing: usize,
    resolved: usize,
}

/// The notifications an evaluation of `rule` calls for: with `transitions`, to every target
/// (webhooks and e-mail without resolved alerts unless `send_resolved`); with `resend` (firing
/// alerts whose last push is a minute old), to its Alertmanagers.
fn notifications(
    rule: &Rule,
    rule_id: u64,
    alerts: &[Alert],
    transitions: bool,
    resend: bool,
    now: i64,
    external_url: &str,
) -> Vec<Queued> {
    let mut queued = Vec::new();
    for (index, target) in rule.targets.iter().enumerate() {
        let (chosen, extra): (Vec<Alert>, String) = match target {
            Target::Webhook { send_resolved, .. } | Target::Email { send_resolved, .. }
                if transitions =>
            {
                let chosen = alerts
                    .iter()
                    .filter(|a| *send_resolved || a.status == Notify::Firing)
                    .cloned()
                    .collect();
                (chosen, String::new())
            }
            Target::Alertmanager { .. } if transitions => (alerts.to_vec(), String::new()),
            Target::Alertmanager { .. } if resend => (alerts.to_vec(), format!("resend {now}")),
            _ => continue,
        };
        if chosen.is_empty() {
            continue;
        }
        for chunk in chosen.chunks(notify::ALERTS_PER_PAYLOAD) {
            let body = match target {
                Target::Webhook { .. } => notify::webhook_body(rule, chunk, external_url),
                Target::Alertmanager { .. } => {
                    notify::alertmanager_body(rule, chunk, external_url, now)
                }
                Target::Email { .. } => notify::email_body(rule, chunk, external_url),
            };
            let firing = chunk.iter().filter(|a| a.status == Notify::Firing).count();
            queued.push(Queued {
                target_index: index,
                target: target.clone(),
                key: notify::idempotency_key(rule_id, index, chunk, &extra),
                body,
                firing,
                resolved: chunk.len() - firing,
            });
        }
    }
    queued
}

/// Removes rules (with their undelivered notifications) and queues a resolved notification
/// for each of their firing alerts, so no receiver is left showing an alert nothing will
/// resolve. The inverse puts the rules and entries back and withdraws the resolutions.
fn remove_rules(
    inner: &mut Inner,
    keys: &[(String, String)],
    now: i64,
    external_url: &str,
) -> Undo {
    let mut removed = Vec::new();
    let mut entries = Vec::new();
    let mut resolutions = Vec::new();
    for key in keys {
        let Some(r) = inner.rules.remove(key) else { continue };
        let ids: Vec<u64> =
            inner.outbox.values().filter(|o| o.rule_id == r.id).map(|o| o.id).collect();
        entries.extend(ids.iter().filter_map(|id| inner.outbox.remove(id)));
        let alerts: Vec<Alert> = r
            .instances
            .values()
            .filter(|i| i.state.firing())
            .map(|i| {
                let mut i = i.clone();
                i.state = state::State::Normal;
                i.resolved_at = Some(now);
                Alert::of(&r.rule, &i)
            })
            .collect();
        if !alerts.is_empty() {
            let queued = notifications(&r.rule, r.id, &alerts, true, false, now, external_url);
            let generation = inner.generation + 1;
            resolutions.extend(inner.enqueue(&key.0, &key.1, r.id, queued, now, generation));
        }
        removed.push(r);
    }
    Box::new(move |inner: &mut Inner| {
        for id in resolutions {
            inner.outbox.remove(&id);
        }
        for mut r in removed {
            r.running = false;
            inner.rules.entry((r.rule.db.clone(), r.rule.name.clone())).or_insert(r);
        }
        for o in entries {
            inner.outbox.entry(o.id).or_insert(o);
        }
    })
}

/// A rule and where its evaluation stands.
#[derive(Debug, Clone)]
struct RuleState {
    id: u64,
    rule: Rule,
    instances: BTreeMap<Vec<String>, Instance>,
    last_evaluation_ns: Option<i64>,
    last_evaluation_ms: Option<f64>,
    /// Scheduled → done of the last evaluation.
    last_lag_ms: Option<f64>,
    last_error: Option<String>,
    last_alertmanager_send_ns: Option<i64>,
    evaluations: u64,
    running: bool,
    next_due_ns: i64,
}

#[derive(Debug, Default)]
struct Inner {
    rules: BTreeMap<(String, String), RuleState>,
    outbox: BTreeMap<u64, Outgoing>,
    events: VecDeque<Event>,
    next_id: u64,
    /// Changes made (durable ones: rules, states, the outbox) and changes saved.
    generation: u64,
    saved: u64,
    /// Only evaluation times changed since the last save.
    soft: bool,
    in_flight: HashSet<u64>,
    save_error: Option<String>,
}

impl Inner {
    fn event(&mut self, event: Event) {
        if self.events.len() >= EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Makes room for `adding` entries of one rule: past [`OUTBOX_PER_RULE`] (or the whole
    /// outbox's [`OUTBOX_MAX`]) its oldest undelivered entries not in flight are dropped — each
    /// notification carries every firing alert of the rule, so the newer ones supersede them.
    fn make_room(&mut self, db: &str, rule: &str, rule_id: u64, adding: usize, now: i64) {
        let pending_all = self.outbox.values().filter(|o| o.status == Delivery::Pending).count();
        // Entries that resolve alerts are kept: no later notification repeats a resolution.
        let mine: Vec<u64> = self
            .outbox
            .values()
            .filter(|o| o.status == Delivery::Pending && o.rule_id == rule_id && o.resolved == 0)
            .filter(|o| !self.in_flight.contains(&o.id))
            .map(|o| o.id)
            .collect();
        let over_rule = (mine.len() + adding).saturating_sub(OUTBOX_PER_RULE);
        let over_all = (pending_all + adding).saturating_sub(OUTBOX_MAX);
        let drop = over_rule.max(over_all).min(mine.len());
        if drop == 0 {
            return;
        }
        for id in &mine[..drop] {
            self.outbox.remove(id);
        }
        let mut event = Event::new(now, db, rule, "notification");
        event.outcome = Some("superseded".into());
        event.message = Some(format!(
            "{drop} undelivered notifications of this rule were dropped for newer ones (at most \
             {OUTBOX_PER_RULE} wait per rule)"
        ));
        self.event(event);
    }

    /// Queues `queued` notifications of one rule, sendable once `generation` is saved; the
    /// new entries' ids.
    fn enqueue(
        &mut self,
        db: &str,
        rule: &str,
        rule_id: u64,
        mut queued: Vec<Queued>,
        now: i64,
        generation: u64,
    ) -> Vec<u64> {
        self.make_room(db, rule, rule_id, queued.len(), now);
        let pending = self.outbox.values().filter(|o| o.status == Delivery::Pending).count();
        if pending + queued.len() > OUTBOX_MAX {
            let mut event = Event::new(now, db, rule, "notification");
            event.outcome = Some("error".into());
            event.message = Some(format!(
                "the outbox holds {pending} undelivered notifications, the most it keeps: {} \
                 notifications were not queued",
                queued.len()
            ));
            self.event(event);
            queued.clear();
        }
        let mut ids = Vec::new();
        for q in queued {
            let id = self.take_id();
            ids.push(id);
            self.outbox.insert(
                id,
                Outgoing {
                    id,
                    db: db.to_string(),
                    rule: rule.to_string(),
                    rule_id,
                    target_index: q.target_index,
                    target: q.target,
                    key: q.key,
                    body: q.body,
                    firing: q.firing,
                    resolved: q.resolved,
                    created_ns: now,
                    attempts: 0,
                    next_attempt_ns: now,
                    status: Delivery::Pending,
                    last_error: None,
                    generation,
                },
            );
        }
        ids
    }

    fn changed(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id.max(1);
        self.next_id = id.saturating_add(1);
        id
    }

    fn saved_form(&self) -> store::Saved {
        let skip = self.events.len().saturating_sub(store::EVENTS_SAVED);
        store::Saved {
            format: store::FORMAT,
            next_id: self.next_id,
            rules: self
                .rules
                .values()
                .map(|r| store::SavedRule {
                    id: r.id,
                    rule: r.rule.clone(),
                    instances: r.instances.values().cloned().collect(),
                    last_evaluation_ns: r.last_evaluation_ns,
                    last_error: r.last_error.clone(),
                    last_alertmanager_send_ns: r.last_alertmanager_send_ns,
                })
                .collect(),
            outbox: self.outbox.values().cloned().collect(),
            events: self.events.iter().skip(skip).cloned().collect(),
        }
    }
}

/// What `system.alert_rules` and `system.alerts` show of one rule.
#[derive(Debug, Clone)]
pub struct RuleView {
    pub rule: Rule,
    pub instances: Vec<Instance>,
    pub last_evaluation_ns: Option<i64>,
    pub last_evaluation_ms: Option<f64>,
    pub last_lag_ms: Option<f64>,
    pub last_error: Option<String>,
    pub evaluations: u64,
}

/// Every alert rule of the server.
pub struct Alerts {
    path: PathBuf,
    config: Config,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
    /// One save at a time; whoever saves writes every change made so far.
    save_lock: tokio::sync::Mutex<()>,
    /// One rule statement at a time (held across its save).
    ddl: tokio::sync::Mutex<()>,
    /// A background save is running (the scheduler starts at most one).
    saving: std::sync::atomic::AtomicBool,
    client: reqwest::Client,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").field("path", &self.path).finish_non_exhaustive()
    }
}

/// A spread of evaluations over the interval, stable per rule (as Prometheus offsets groups).
fn offset_ns(rule: &Rule) -> i64 {
    let every = rule.every_ns();
    let hash = notify::fingerprint(&[(rule.db.clone(), rule.name.clone())]);
    let hash = u64::from_str_radix(&hash, 16).unwrap_or(0);
    i64::try_from(hash % every as u64).unwrap_or(0)
}

impl Alerts {
    /// Opens the alert state of `data_dir` (empty when there is none yet).
    pub fn open(
        data_dir: &std::path::Path,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Alerts>, Error> {
        let path = store::path(data_dir);
        let saved = store::load(&path).map_err(Error::Storage)?;
        let now = clock.now_ns();
        let mut inner = Inner { next_id: saved.next_id.max(1), ..Inner::default() };
        for r in saved.rules {
            let mut instances: BTreeMap<Vec<String>, Instance> =
                r.instances.into_iter().map(|i| (i.key.clone(), i)).collect();
            state::after_restart(&mut instances, r.last_evaluation_ns, now, OUTAGE_TOLERANCE_NS);
            let next_due_ns = now.saturating_add(offset_ns(&r.rule));
            inner.next_id = inner.next_id.max(r.id.saturating_add(1));
            inner.rules.insert(
                (r.rule.db.clone(), r.rule.name.clone()),
                RuleState {
                    id: r.id,
                    rule: r.rule,
                    instances,
                    last_evaluation_ns: r.last_evaluation_ns,
                    last_evaluation_ms: None,
                    last_lag_ms: None,
                    last_error: r.last_error,
                    last_alertmanager_send_ns: r.last_alertmanager_send_ns,
                    evaluations: 0,
                    running: false,
                    next_due_ns,
                },
            );
        }
        for entry in saved.outbox {
            inner.next_id = inner.next_id.max(entry.id.saturating_add(1));
            inner.outbox.insert(entry.id, entry);
        }
        inner.events = saved.events.into();
        // https targets use the rustls (ring) the server already has for its own TLS; this is
        // the process's provider unless one was installed before (then that one serves).
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        // Redirects are not followed: a target is the address the rule names.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Sundial/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Storage(format!("the HTTP client for notifications: {e}")))?;
        Ok(Arc::new(Alerts {
            path,
            config,
            clock,
            inner: Mutex::new(inner),
            save_lock: tokio::sync::Mutex::new(()),
            ddl: tokio::sync::Mutex::new(()),
            saving: std::sync::atomic::AtomicBool::new(false),
            client,
        }))
    }

    pub fn smtp(&self) -> Smtp {
        self.config.smtp.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding it; a poisoned lock still holds consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes every change made so far (and returns once it is durable).
    pub async fn save_now(&self) -> Result<(), String> {
        let _one = self.save_lock.lock().await;
        let (generation, saved) = {
            let mut inner = self.lock();
            if inner.saved >= inner.generation && !inner.soft {
                return Ok(());
            }
            inner.soft = false;
            (inner.generation, inner.saved_form())
        };
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
            store::save(&path, &bytes)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| format!("writing alerts/state.json: {e}")));
        let mut inner = self.lock();
        match written {
            Ok(()) => {
                inner.saved = inner.saved.max(generation);
                inner.save_error = None;
                Ok(())
            }
            Err(e) => {
                if inner.save_error.as_deref() != Some(e.as_str()) {
                    tracing::error!(error = %e, "saving the alert state failed; retrying");
                }
                inner.save_error = Some(e.clone());
                inner.soft = true;
                Err(e)
            }
        }
    }

    /// Applies one statement's `change` and saves it. `change` returns its result and the
    /// inverse of what it did; if the save fails, only that inverse is applied (other changes
    /// made meanwhile stay) and the statement fails. Statements run one at a time.
    async fn durably<T>(
        &self,
        change: impl FnOnce(&mut Inner, i64) -> Result<(T, Undo), Error>,
    ) -> Result<T, Error> {
        let _one = self.ddl.lock().await;
        let (out, undo, generation) = {
            let mut inner = self.lock();
            let now = self.clock.now_ns();
            let (out, undo) = change(&mut inner, now)?;
            (out, undo, inner.changed())
        };
        match self.save_now().await {
            Ok(()) => Ok(out),
            Err(e) => {
                // No save may begin between the check and the undo.
                let _saving = self.save_lock.lock().await;
                let mut inner = self.lock();
                if inner.saved >= generation {
                    // A later save (by the scheduler) holds the change: it is durable, and
                    // may already have been acted on.
                    return Ok(out);
                }
                undo(&mut inner);
                inner.changed();
                Err(Error::Storage(e))
            }
        }
    }

    /// Adds a rule (checked by `ddl`). `false` when it exists and `if_not_exists` was given.
    pub async fn create(&self, rule: Rule, if_not_exists: bool) -> Result<bool, Error> {
        self.durably(|inner, now| {
            let key = (rule.db.clone(), rule.name.clone());
            if inner.rules.contains_key(&key) {
                return if if_not_exists {
                    Ok((false, Box::new(|_: &mut Inner| {}) as Undo))
                } else {
                    Err(Error::Duplicate(rule.name))
                };
            }
            if inner.rules.len() >= rule::RULES_MAX {
                return Err(Error::Limit(format!(
                    "the server has {} alert rules, the most it keeps",
                    rule::RULES_MAX
                )));
            }
            let id = inner.take_id();
            let next_due_ns = now.saturating_add(offset_ns(&rule));
            inner.rules.insert(
                key.clone(),
                RuleState {
                    id,
                    rule,
                    instances: BTreeMap::new(),
                    last_evaluation_ns: None,
                    last_evaluation_ms: None,
                    last_lag_ms: None,
                    last_error: None,
                    last_alertmanager_send_ns: None,
                    evaluations: 0,
                    running: false,
                    next_due_ns,
                },
            );
            let undo: Undo = Box::new(move |inner: &mut Inner| {
                if inner.rules.get(&key).is_some_and(|r| r.id == id) {
                    inner.rules.remove(&key);
                    inner.outbox.retain(|_, o| o.rule_id != id);
                }
            });
            Ok((true, undo))
        })
        .await
    }

    /// Drops rules of `db` (their undelivered notifications with them).
    pub async fn drop_rules(
        &self,
        db: &str,
        names: &[String],
        if_exists: bool,
    ) -> Result<(), Error> {
        let external_url = self.config.external_url.clone();
        self.durably(|inner, now| {
            for name in names {
                if !inner.rules.contains_key(&(db.to_string(), name.clone())) && !if_exists {
                    return Err(Error::Undefined(name.clone()));
                }
            }
            let keys: Vec<_> = names.iter().map(|n| (db.to_string(), n.clone())).collect();
            let undo = remove_rules(inner, &keys, now, &external_url);
            Ok(((), undo))
        })
        .await
    }

    /// `ALTER ALERT name PAUSE | RESUME`: a paused rule is not evaluated; its instances keep
    /// their states.
    pub async fn set_paused(&self, db: &str, name: &str, paused: bool) -> Result<(), Error> {
        self.durably(|inner, now| {
            let rule = inner
                .rules
                .get_mut(&(db.to_string(), name.to_string()))
                .ok_or_else(|| Error::Undefined(name.to_string()))?;
            let was = rule.rule.paused;
            rule.rule.paused = paused;
            if was && !paused {
                rule.next_due_ns = now;
                // A long pause is an outage: Pending timers start again.
                state::after_restart(
                    &mut rule.instances,
                    rule.last_evaluation_ns,
                    now,
                    OUTAGE_TOLERANCE_NS,
                );
            }
            let key = (db.to_string(), name.to_string());
            let undo: Undo = Box::new(move |inner: &mut Inner| {
                if let Some(r) = inner.rules.get_mut(&key) {
                    r.rule.paused = was;
                }
            });
            Ok(((), undo))
        })
        .await
    }

    /// Drops every rule of a dropped database.
    pub async fn forget_database(&self, db: &str) -> Result<(), Error> {
        if !self.lock().rules.keys().any(|(d, _)| d == db) {
            return Ok(());
        }
        let external_url = self.config.external_url.clone();
        self.durably(|inner, now| {
            let keys: Vec<_> = inner.rules.keys().filter(|(d, _)| d == db).cloned().collect();
            let undo = remove_rules(inner, &keys, now, &external_url);
            Ok(((), undo))
        })
        .await
    }

    pub fn rules_of(&self, db: &str) -> Vec<RuleView> {
        let inner = self.lock();
        inner
            .rules
            .values()
            .filter(|r| r.rule.db == db)
            .map(|r| RuleView {
                rule: r.rule.clone(),
                instances: r.instances.values().cloned().collect(),
                last_evaluation_ns: r.last_evaluation_ns,
                last_evaluation_ms: r.last_evaluation_ms,
                last_lag_ms: r.last_lag_ms,
                last_error: r.last_error.clone(),
                evaluations: r.evaluations,
            })
            .collect()
    }

    pub fn events_of(&self, db: &str) -> Vec<Event> {
        self.lock().events.iter().filter(|e| e.db == db).cloned().collect()
    }

    pub fn outbox_of(&self, db: &str) -> Vec<Outgoing> {
        self.lock().outbox.values().filter(|o| o.db == db).cloned().collect()
    }

    /// Runs the scheduler, delivery and saving until `stop`; then saves once more.
    pub async fn run(self: Arc<Self>, query: Arc<QueryEngine>, stop: CancellationToken) {
        let evaluations = Arc::new(tokio::sync::Semaphore::new(EVALUATIONS_AT_ONCE));
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_soft_save = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = self.clock.now_ns();
            for (key, id, rule, scheduled) in self.due(now) {
                let (me, query, evaluations) = (self.clone(), query.clone(), evaluations.clone());
                tokio::spawn(async move {
                    let Ok(_permit) = evaluations.acquire_owned().await else { return };
                    me.evaluate(&query, key, id, rule, scheduled).await;
                });
            }
            for entry in self.due_deliveries(now) {
                let me = self.clone();
                tokio::spawn(async move { me.deliver(entry).await });
            }
            let (hard, soft) = {
                let inner = self.lock();
                (inner.generation > inner.saved, inner.soft)
            };
            if hard || (soft && last_soft_save.elapsed() >= SOFT_SAVE_EVERY) {
                use std::sync::atomic::Ordering;
                // In the background, one at a time: a slow disk delays deliveries (they wait
                // for their save), never the scheduling of evaluations.
                if !self.saving.swap(true, Ordering::AcqRel) {
                    last_soft_save = Instant::now();
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _ = me.save_now().await;
                        me.saving.store(false, Ordering::Release);
                    });
                }
            }
        }
        let _ = self.save_now().await;
    }

    /// Rules due at `now`, marked running.
    fn due(&self, now: i64) -> Vec<((String, String), u64, Rule, i64)> {
        let mut inner = self.lock();
        let mut due = Vec::new();
        for (key, r) in inner.rules.iter_mut() {
            if !r.rule.paused && !r.running && r.next_due_ns <= now {
                r.running = true;
                due.push((key.clone(), r.id, r.rule.clone(), r.next_due_ns));
            }
        }
        due
    }

    async fn evaluate(
        &self,
        query: &QueryEngine,
        key: (String, String),
        id: u64,
        rule: Rule,
        scheduled: i64,
    ) {
        // The evaluation's time is its slot (as Prometheus times evaluations), so `FOR 2s` with
        // `EVERY 1s` fires at the third evaluation whatever the scheduler's jitter.
        let now = scheduled.min(self.clock.now_ns());
        let started = Instant::now();
        let outcome = eval::evaluate(query, &rule).await;
        let took = started.elapsed();
        self.settle(&key, id, outcome, now, scheduled, took);
    }

    /// Applies an evaluation's outcome: states, events, outbox entries, the next due time.
    fn settle(
        &self,
        key: &(String, String),
        id: u64,
        outcome: Outcome,
        now: i64,
        scheduled: i64,
        took: Duration,
    ) {
        let done = self.clock.now_ns();
        let mut guard = self.lock();
        let inner = &mut *guard;
        // Instances of all rules together are bounded: an evaluation that would pass the
        // bound is an error of that rule, not the server's memory.
        let others: usize =
            inner.rules.iter().filter(|(k, _)| *k != key).map(|(_, r)| r.instances.len()).sum();
        let outcome = match outcome {
            Outcome::Rows(rows) if others + rows.len() > INSTANCES_TOTAL_MAX => {
                Outcome::Error(format!(
                    "the server keeps at most {INSTANCES_TOTAL_MAX} alert instances and the \
                     other rules hold {others}: this evaluation's {} rows do not fit",
                    rows.len()
                ))
            }
            outcome => outcome,
        };
        let Some(r) = inner.rules.get_mut(key).filter(|r| r.id == id) else { return };
        let changes = state::apply(&r.rule, &mut r.instances, &outcome, now);
        r.running = false;
        r.evaluations += 1;
        r.last_evaluation_ns = Some(now);
        r.last_evaluation_ms = Some(took.as_secs_f64() * 1000.0);
        r.last_lag_ms = Some(done.saturating_sub(scheduled) as f64 / 1e6);
        let every = r.rule.every_ns();
        let mut next = scheduled.saturating_add(every);
        if next <= done {
            // Missed slots are skipped, keeping the rule's phase.
            next = next
                .saturating_add(((done - next) / every).saturating_add(1).saturating_mul(every));
        }
        r.next_due_ns = next;
        let mut events = Vec::new();
        let error = match &outcome {
            Outcome::Error(e) => Some(e.clone()),
            Outcome::Rows(_) => None,
        };
        if error != r.last_error {
            if let Some(e) = &error {
                let mut event = Event::new(now, &r.rule.db, &r.rule.name, "evaluation");
                event.outcome = Some("error".into());
                event.message = Some(e.clone());
                events.push(event);
            }
            r.last_error = error;
        }
        for c in &changes {
            let mut event = Event::new(now, &r.rule.db, &r.rule.name, "transition");
            event.labels = r.instances.get(&c.key).map(|i| labels_json(&i.labels));
            event.from_state = Some(c.from.name().into());
            event.to_state = Some(c.to.name().into());
            events.push(event);
        }
        // Instances resolved by this evaluation are gone from `instances` only if they were
        // pruned; they stay listed (Normal, resolved_at) for RESOLVED_KEEP.
        let resolved: HashSet<&Vec<String>> =
            changes.iter().filter(|c| c.notify == Some(Notify::Resolved)).map(|c| &c.key).collect();
        let transitions = changes.iter().any(|c| c.notify.is_some());
        let alerts: Vec<Alert> = r
            .instances
            .values()
            .filter(|i| i.state.firing() || resolved.contains(&i.key))
            .map(|i| Alert::of(&r.rule, i))
            .collect();
        let firing = alerts.iter().any(|a| a.status == Notify::Firing);
        let resend_due =
            r.last_alertmanager_send_ns.is_none_or(|t| now.saturating_sub(t) >= notify::RESEND_NS);
        let entries = notifications(
            &r.rule,
            r.id,
            &alerts,
            transitions,
            firing && resend_due,
            now,
            &self.config.external_url,
        );
        if entries.iter().any(|e| matches!(e.target, Target::Alertmanager { .. })) {
            r.last_alertmanager_send_ns = Some(now);
        }
        let (db, name) = (r.rule.db.clone(), r.rule.name.clone());
        let durable = !changes.is_empty() || !entries.is_empty();
        for event in events {
            inner.event(event);
        }
        if durable {
            let generation = inner.changed();
            inner.enqueue(&db, &name, id, entries, now, generation);
        } else {
            inner.soft = true;
        }
    }

    /// Outbox entries to send now (saved, due, not in flight, within the concurrency limits),
    /// marked in flight.
    fn due_deliveries(&self, now: i64) -> Vec<Outgoing> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut per_target: HashMap<String, usize> = HashMap::new();
        for id in &inner.in_flight {
            if let Some(o) = inner.outbox.get(id) {
                *per_target.entry(o.target.url().to_string()).or_default() += 1;
            }
        }
        let mut due = Vec::new();
        let mut in_flight = inner.in_flight.len();
        // Each rule's notifications to one target go in order (ids grow with time): only the
        // oldest undelivered one of each is a candidate, so a retried "firing" can never land
        // after the "resolved" that followed it.
        let mut streams: HashSet<(u64, usize)> = HashSet::new();
        for o in inner.outbox.values() {
            if in_flight >= SENDS_AT_ONCE {
                break;
            }
            if o.status != Delivery::Pending || !streams.insert((o.rule_id, o.target_index)) {
                continue;
            }
            let sending = per_target.entry(o.target.url().to_string()).or_default();
            if o.status == Delivery::Pending
                && o.generation <= inner.saved
                && o.next_attempt_ns <= now
                && !inner.in_flight.contains(&o.id)
                && *sending < SENDS_PER_TARGET
            {
                *sending += 1;
                in_flight += 1;
                due.push(o.clone());
            }
        }
        for o in &due {
            inner.in_flight.insert(o.id);
        }
        due
    }

    async fn deliver(&self, entry: Outgoing) {
        crate::crash_point("alert-before-delivery");
        let attempt = notify::send(&self.client, &self.config.smtp, &entry).await;
        let now = self.clock.now_ns();
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.in_flight.remove(&entry.id);
        let Some(o) = inner.outbox.get_mut(&entry.id) else { return };
        o.attempts = o.attempts.saturating_add(1);
        let mut event = Event::new(now, &o.db, &o.rule, "notification");
        event.target = Some(o.target.describe());
        event.status = attempt.status;
        event.attempt = Some(o.attempts);
        event.key = Some(o.key.clone());
        event.message = attempt.error.clone();
        let delivered = attempt.error.is_none();
        if delivered {
            event.outcome = Some("delivered".into());
            inner.outbox.remove(&entry.id);
        } else if attempt.permanent || o.attempts >= o.target.max_attempts() {
            event.outcome = Some("dead".into());
            o.status = Delivery::Dead;
            o.last_error = attempt.error;
            let dead: Vec<u64> = inner
                .outbox
                .values()
                .filter(|o| o.status == Delivery::Dead)
                .map(|o| o.id)
                .collect();
            for id in dead.iter().take(dead.len().saturating_sub(DEAD_KEPT)) {
                inner.outbox.remove(id);
            }
        } else {
            event.outcome = Some("retry".into());
            let delay = notify::backoff(o.attempts, o.id ^ u64::from(o.attempts) << 32);
            o.next_attempt_ns =
                now.saturating_add(i64::try_from(delay.as_nanos()).unwrap_or(i64::MAX));
            o.last_error = attempt.error;
        }
        inner.event(event);
        inner.changed();
    }
}

#[cfg(test)]
mod tests;
