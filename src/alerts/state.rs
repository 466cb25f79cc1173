//! The states of an alert's instances and how one evaluation moves them, as pure functions of
//! the evaluation's outcome and the time (so timing is tested with any clock).
//!
//! Grafana's names: Normal → Pending (condition true, waiting `FOR`) → Alerting (firing) →
//! Recovering (condition false, within `KEEP FIRING FOR`) → Normal (resolved). The rule's
//! `nodata` and `error` instances fire in states NoData and Error (or Alerting, as the rule's
//! policy says). A transition happens at the first evaluation at which its duration has
//! elapsed; `FOR` and `KEEP FIRING FOR` need not be multiples of `EVERY`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::rule::{OnError, OnNoData, Rule};

/// How long a resolved instance stays listed in `system.alerts`.
pub const RESOLVED_KEEP_NS: i64 = 15 * 60 * 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Normal,
    Pending,
    Alerting,
    Recovering,
    NoData,
    Error,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Normal => "normal",
            State::Pending => "pending",
            State::Alerting => "alerting",
            State::Recovering => "recovering",
            State::NoData => "nodata",
            State::Error => "error",
        }
    }

    /// Whether an instance in this state has been notified as firing and not yet resolved.
    pub fn firing(self) -> bool {
        matches!(self, State::Alerting | State::Recovering | State::NoData | State::Error)
    }
}

/// A value of a row's non-text column, kept for templates and `system.alerts`.
pub type Values = Vec<(String, serde_json::Value)>;

/// One instance of a rule: a distinct set of label values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Identity: the values of the query's text columns, in the order selected (or the name of
    /// the rule's special `nodata`/`error` instance).
    pub key: Vec<String>,
    /// `alertname`, the rule's labels, then the query's text columns.
    pub labels: Vec<(String, String)>,
    /// The last values of the query's other columns.
    pub values: Values,
    pub state: State,
    /// The state this instance is in while firing (Alerting, NoData or Error).
    pub firing_as: State,
    /// When the condition became true (Pending began, or Alerting with no `FOR`).
    pub active_at: Option<i64>,
    pub fired_at: Option<i64>,
    pub recovering_at: Option<i64>,
    pub resolved_at: Option<i64>,
}

/// A notification an evaluation calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Notify {
    Firing,
    Resolved,
}

/// One instance's change of state.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: Vec<String>,
    pub from: State,
    pub to: State,
    pub notify: Option<Notify>,
}

/// A row of the rule's query: its label values and values.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: Vec<String>,
    pub labels: Vec<(String, String)>,
    pub values: Values,
}

/// What one evaluation found.
#[derive(Debug, Clone)]
pub enum Outcome {
    Rows(Vec<Row>),
    Error(String),
}

pub const NODATA_KEY: &str = "\u{0}nodata";
pub const ERROR_KEY: &str = "\u{0}error";

impl Instance {
    fn new(key: Vec<String>, labels: Vec<(String, String)>, firing_as: State) -> Instance {
        Instance {
            key,
            labels,
            values: Vec::new(),
            state: State::Normal,
            firing_as,
            active_at: None,
            fired_at: None,
            recovering_at: None,
            resolved_at: None,
        }
    }

    /// One evaluation of this instance: its condition now. Returns the notification it calls
    /// for, if any.
    pub fn step(&mut self, condition: bool, now: i64, for_ns: i64, keep_ns: i64) -> Option<Notify> {
        let fire = |i: &mut Instance| {
            i.state = i.firing_as;
            i.fired_at = Some(now);
            Some(Notify::Firing)
        };
        let resolve = |i: &mut Instance| {
            i.state = State::Normal;
            i.recovering_at = None;
            i.resolved_at = Some(now);
            Some(Notify::Resolved)
        };
        match (self.state, condition) {
            (State::Normal, true) => {
                self.active_at = Some(now);
                self.fired_at = None;
                self.resolved_at = None;
                if for_ns <= 0 {
                    fire(self)
                } else {
                    self.state = State::Pending;
                    None
                }
            }
            (State::Normal, false) => None,
            (State::Pending, true) => {
                if now.saturating_sub(self.active_at.unwrap_or(now)) >= for_ns {
                    fire(self)
                } else {
                    None
                }
            }
            (State::Pending, false) => {
                // A flap during Pending resets it: the next true starts the wait again.
                self.state = State::Normal;
                self.active_at = None;
                None
            }
            (State::Recovering, true) => {
                self.state = self.firing_as;
                self.recovering_at = None;
                None
            }
            (State::Recovering, false) => {
                if now.saturating_sub(self.recovering_at.unwrap_or(now)) >= keep_ns {
                    resolve(self)
                } else {
                    None
                }
            }
            (_, true) => None,
            (_, false) => {
                if keep_ns <= 0 {
                    resolve(self)
                } else {
                    self.state = State::Recovering;
                    self.recovering_at = Some(now);
                    None
                }
            }
        }
    }
}

/// The labels every instance of `rule` carries: `alertname` and the rule's own.
pub fn rule_labels(rule: &Rule) -> Vec<(String, String)> {
    let mut labels = vec![("alertname".to_string(), rule.name.clone())];
    labels.extend(rule.labels.iter().cloned());
    labels
}

fn special(rule: &Rule, key: &str, state: &str, firing_as: State) -> Instance {
    let mut labels = rule_labels(rule);
    labels.push(("alertstate".to_string(), state.to_string()));
    Instance::new(vec![key.to_string()], labels, firing_as)
}

/// Applies one evaluation's `outcome` at `now` to `instances` (keyed by [`Instance::key`]):
/// every change of state, in key order.
pub fn apply(
    rule: &Rule,
    instances: &mut BTreeMap<Vec<String>, Instance>,
    outcome: &Outcome,
    now: i64,
) -> Vec<Change> {
    let (for_ns, keep_ns) = (rule.for_ns(), rule.keep_firing_for_ns());
    // The condition of each instance this evaluation decides; instances not named keep
    // their state.
    let mut conditions: BTreeMap<Vec<String>, bool> = BTreeMap::new();
    let nodata_key = vec![NODATA_KEY.to_string()];
    let error_key = vec![ERROR_KEY.to_string()];
    match outcome {
        Outcome::Rows(rows) if !rows.is_empty() => {
            for key in instances.keys() {
                conditions.insert(key.clone(), false);
            }
            for row in rows {
                let instance = instances.entry(row.key.clone()).or_insert_with(|| {
                    Instance::new(row.key.clone(), row.labels.clone(), State::Alerting)
                });
                instance.values = row.values.clone();
                conditions.insert(row.key.clone(), true);
            }
        }
        Outcome::Rows(_) => {
            let firing_as = match rule.no_data {
                OnNoData::Ok => None,
                OnNoData::NoData => Some(State::NoData),
                OnNoData::Alerting => Some(State::Alerting),
                OnNoData::KeepLast => {
                    conditions.insert(error_key.clone(), false);
                    None
                }
            };
            if rule.no_data != OnNoData::KeepLast {
                for key in instances.keys() {
                    conditions.insert(key.clone(), false);
                }
            }
            if let Some(firing_as) = firing_as {
                let instance = instances
                    .entry(nodata_key.clone())
                    .or_insert_with(|| special(rule, NODATA_KEY, "nodata", firing_as));
                if instance.state == State::Normal {
                    instance.firing_as = firing_as;
                }
                conditions.insert(nodata_key.clone(), true);
            }
        }
        Outcome::Error(message) => {
            let firing_as = match rule.on_error {
                OnError::Error => Some(State::Error),
                OnError::Alerting => Some(State::Alerting),
                OnError::KeepLast => None,
            };
            if let Some(firing_as) = firing_as {
                let instance = instances
                    .entry(error_key.clone())
                    .or_insert_with(|| special(rule, ERROR_KEY, "error", firing_as));
                if instance.state == State::Normal {
                    instance.firing_as = firing_as;
                }
                instance.values =
                    vec![("error".to_string(), serde_json::Value::from(message.as_str()))];
                conditions.insert(error_key.clone(), true);
            }
        }
    }
    let mut changes = Vec::new();
    for (key, condition) in conditions {
        let Some(instance) = instances.get_mut(&key) else { continue };
        let from = instance.state;
        let notify = instance.step(condition, now, for_ns, keep_ns);
        if instance.state != from || notify.is_some() {
            changes.push(Change { key, from, to: instance.state, notify });
        }
    }
    instances.retain(|_, i| {
        i.state != State::Normal
            || i.resolved_at.is_some_and(|t| now.saturating_sub(t) < RESOLVED_KEEP_NS)
    });
    changes
}

/// After a restart: instances that were Pending when the server stopped keep their timers if
/// the outage was shorter than `tolerance_ns` (Prometheus's for-outage tolerance); after a
/// longer one their wait starts again at the next true evaluation.
pub fn after_restart(
    instances: &mut BTreeMap<Vec<String>, Instance>,
    last_evaluation: Option<i64>,
    now: i64,
    tolerance_ns: i64,
) {
    let outage = last_evaluation.map_or(i64::MAX, |t| now.saturating_sub(t));
    if outage > tolerance_ns {
        instances.retain(|_, i| i.state != State::Pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::rule::Target;

    const S: i64 = 1_000_000_000;

    fn rule(for_s: u64, keep_s: u64) -> Rule {
        Rule {
            db: "db".into(),
            name: "high".into(),
            query: "SELECT host FROM cpu".into(),
            every_ms: 10_000,
            for_ms: for_s * 1000,
            keep_firing_for_ms: keep_s * 1000,
            labels: vec![("severity".into(), "page".into())],
            annotations: Vec::new(),
            no_data: OnNoData::Ok,
            on_error: OnError::Error,
            targets: vec![Target::Webhook {
                url: "http://x".into(),
                timeout_ms: 1000,
                send_resolved: true,
                headers: Vec::new(),
                max_attempts: 3,
            }],
            paused: false,
        }
    }

    fn rows(hosts: &[&str]) -> Outcome {
        Outcome::Rows(
            hosts
                .iter()
                .map(|h| Row {
                    key: vec![h.to_string()],
                    labels: vec![("host".into(), h.to_string())],
                    values: vec![("v".into(), serde_json::json!(95.0))],
                })
                .collect(),
        )
    }

    /// Runs evaluations every 10 s from t = 0 with the given hosts true at each, and returns
    /// (time in s, change) for every change.
    fn run(rule: &Rule, steps: &[&[&str]]) -> Vec<(i64, Vec<String>, State, Option<Notify>)> {
        let mut instances = BTreeMap::new();
        let mut out = Vec::new();
        for (i, hosts) in steps.iter().enumerate() {
            let now = i as i64 * 10 * S;
            for c in apply(rule, &mut instances, &rows(hosts), now) {
                out.push((now / S, c.key, c.to, c.notify));
            }
        }
        out
    }

    #[test]
    fn every_10s_for_30s_keep_firing_for_20s() {
        let r = rule(30, 20);
        let a = || vec!["a".to_string()];
        let changes = run(&r, &[&["a"], &["a"], &["a"], &["a"], &["a"], &[], &[], &[], &[]]);
        assert_eq!(
            changes,
            vec![
                (0, a(), State::Pending, None),
                // 30 s after the condition became true: the evaluation at t = 30 fires.
                (30, a(), State::Alerting, Some(Notify::Firing)),
                (50, a(), State::Recovering, None),
                // Recovering since 50; the evaluation at 70 is the first 20 s later.
                (70, a(), State::Normal, Some(Notify::Resolved)),
            ]
        );
        let notifications = changes.iter().filter(|c| c.3.is_some()).count();
        assert_eq!(notifications, 2, "exactly one firing and one resolved");
    }

    #[test]
    fn a_flap_during_pending_resets_it_and_recovering_returns_to_alerting_silently() {
        let r = rule(30, 20);
        let a = || vec!["a".to_string()];
        let changes =
            run(&r, &[&["a"], &["a"], &[], &["a"], &["a"], &["a"], &["a"], &[], &["a"], &["a"]]);
        assert_eq!(
            changes,
            vec![
                (0, a(), State::Pending, None),
                (20, a(), State::Normal, None),
                (30, a(), State::Pending, None),
                (60, a(), State::Alerting, Some(Notify::Firing)),
                (70, a(), State::Recovering, None),
                (80, a(), State::Alerting, None),
            ]
        );
    }

    #[test]
    fn durations_that_are_not_multiples_of_every() {
        // FOR 25 s with EVERY 10 s: fires at the first evaluation 25 s after (t = 30).
        let r = rule(25, 0);
        let changes = run(&r, &[&["a"], &["a"], &["a"], &["a"], &[]]);
        assert_eq!(changes[1].0, 30);
        assert_eq!(changes[1].3, Some(Notify::Firing));
        // No KEEP FIRING FOR: resolved at the first false evaluation.
        assert_eq!(
            (changes[2].0, changes[2].2, changes[2].3),
            (40, State::Normal, Some(Notify::Resolved))
        );
        // No FOR: fires at once.
        let changes = run(&rule(0, 0), &[&["a", "b"]]);
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|c| c.2 == State::Alerting && c.3 == Some(Notify::Firing)));
    }

    #[test]
    fn a_changing_value_does_not_renotify() {
        let r = rule(0, 0);
        let mut instances = BTreeMap::new();
        let row = |v: f64| {
            Outcome::Rows(vec![Row {
                key: vec!["a".into()],
                labels: vec![("host".into(), "a".into())],
                values: vec![("v".into(), serde_json::json!(v))],
            }])
        };
        assert_eq!(apply(&r, &mut instances, &row(91.0), 0).len(), 1);
        assert!(apply(&r, &mut instances, &row(99.0), 10 * S).is_empty());
        assert_eq!(instances[&vec!["a".to_string()]].values[0].1, serde_json::json!(99.0));
    }

    #[test]
    fn no_data_and_error_policies() {
        let mut r = rule(0, 0);
        let nodata = || vec![NODATA_KEY.to_string()];
        let error = || vec![ERROR_KEY.to_string()];
        let mut instances = BTreeMap::new();
        // ok (default): no rows resolves what fired.
        apply(&r, &mut instances, &rows(&["a"]), 0);
        let c = apply(&r, &mut instances, &rows(&[]), 10 * S);
        assert_eq!(c[0].notify, Some(Notify::Resolved));

        r.no_data = OnNoData::NoData;
        let c = apply(&r, &mut instances, &rows(&[]), 20 * S);
        assert_eq!(
            (c[0].key.clone(), c[0].to, c[0].notify),
            (nodata(), State::NoData, Some(Notify::Firing))
        );
        assert!(instances[&nodata()].labels.contains(&("alertstate".into(), "nodata".into())));
        // Data again: the nodata instance resolves.
        let c = apply(&r, &mut instances, &rows(&["a"]), 30 * S);
        assert!(c.iter().any(|c| c.key == nodata() && c.notify == Some(Notify::Resolved)));

        r.no_data = OnNoData::KeepLast;
        let c = apply(&r, &mut instances, &rows(&[]), 40 * S);
        assert!(c.is_empty(), "keep_last changes nothing: {c:?}");
        assert_eq!(instances[&vec!["a".to_string()]].state, State::Alerting);

        // error (default): the error instance fires; the others keep their state.
        let c = apply(&r, &mut instances, &Outcome::Error("boom".into()), 50 * S);
        assert_eq!((c.len(), c[0].key.clone(), c[0].to), (1, error(), State::Error));
        assert_eq!(instances[&vec!["a".to_string()]].state, State::Alerting);
        let c = apply(&r, &mut instances, &rows(&["a"]), 60 * S);
        assert!(c.iter().any(|c| c.key == error() && c.notify == Some(Notify::Resolved)));

        r.on_error = OnError::KeepLast;
        assert!(apply(&r, &mut instances, &Outcome::Error("boom".into()), 70 * S).is_empty());
        r.on_error = OnError::Alerting;
        let c = apply(&r, &mut instances, &Outcome::Error("boom".into()), 80 * S);
        assert_eq!(c[0].to, State::Alerting);
    }

    #[test]
    fn pending_timers_survive_short_outages_only() {
        let r = rule(30, 0);
        let mut instances = BTreeMap::new();
        apply(&r, &mut instances, &rows(&["a"]), 0);
        let mut kept = instances.clone();
        after_restart(&mut kept, Some(0), 60 * S, 3600 * S);
        // The timer kept: true again after the restart fires at once (60 s ≥ 30 s).
        let c = apply(&r, &mut kept, &rows(&["a"]), 60 * S);
        assert_eq!(c[0].notify, Some(Notify::Firing));
        let mut reset = instances.clone();
        after_restart(&mut reset, Some(0), 7200 * S, 3600 * S);
        assert!(reset.is_empty());
    }
}
