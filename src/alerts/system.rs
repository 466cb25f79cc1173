//! `system.alert_rules`, `system.alerts`, `system.alert_events` and
//! `system.alert_notifications` of a database, read live.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, StringArray, TimestampNanosecondArray, UInt16Array,
    UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use super::{labels_json, Alerts};

pub const TABLES: &[&str] = &["alert_rules", "alerts", "alert_events", "alert_notifications"];

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

fn times(values: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(TimestampNanosecondArray::from(values).with_timezone("UTC"))
}

fn texts(values: Vec<Option<String>>) -> ArrayRef {
    Arc::new(StringArray::from(values))
}

fn batch(fields: Vec<Field>, columns: Vec<ArrayRef>) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

fn text(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn values_json(values: &[(String, serde_json::Value)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = values.iter().cloned().collect();
    serde_json::Value::Object(map).to_string()
}

/// The system table `name` of `db`, if it is one of [`TABLES`].
pub fn table(alerts: &Alerts, db: &str, name: &str) -> Option<Result<RecordBatch, ArrowError>> {
    Some(match name {
        "alert_rules" => rules(alerts, db),
        "alerts" => instances(alerts, db),
        "alert_events" => events(alerts, db),
        "alert_notifications" => notifications(alerts, db),
        _ => return None,
    })
}

fn rules(alerts: &Alerts, db: &str) -> Result<RecordBatch, ArrowError> {
    let rules = alerts.rules_of(db);
    let count = |state: fn(super::state::State) -> bool| -> ArrayRef {
        Arc::new(UInt64Array::from(
            rules
                .iter()
                .map(|r| r.instances.iter().filter(|i| state(i.state)).count() as u64)
                .collect::<Vec<_>>(),
        ))
    };
    use super::state::State;
    batch(
        vec![
            text("name", false),
            text("database", false),
            Field::new("paused", DataType::Boolean, false),
            Field::new("every_s", DataType::Float64, false),
            Field::new("for_s", DataType::Float64, false),
            Field::new("keep_firing_for_s", DataType::Float64, false),
            Field::new("pending", DataType::UInt64, false),
            Field::new("firing", DataType::UInt64, false),
            Field::new("evaluations", DataType::UInt64, false),
            Field::new("last_evaluation", time_type(), true),
            Field::new("evaluation_ms", DataType::Float64, true),
            Field::new("lag_ms", DataType::Float64, true),
            text("last_error", true),
            text("targets", false),
            text("definition", false),
        ],
        vec![
            texts(rules.iter().map(|r| Some(r.rule.name.clone())).collect()),
            texts(rules.iter().map(|r| Some(r.rule.db.clone())).collect()),
            Arc::new(BooleanArray::from(rules.iter().map(|r| r.rule.paused).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(
                rules.iter().map(|r| r.rule.every_ms as f64 / 1000.0).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                rules.iter().map(|r| r.rule.for_ms as f64 / 1000.0).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                rules.iter().map(|r| r.rule.keep_firing_for_ms as f64 / 1000.0).collect::<Vec<_>>(),
            )),
            count(|s| s == State::Pending),
            count(State::firing),
            Arc::new(UInt64Array::from(rules.iter().map(|r| r.evaluations).collect::<Vec<_>>())),
            times(rules.iter().map(|r| r.last_evaluation_ns).collect()),
            Arc::new(Float64Array::from(
                rules.iter().map(|r| r.last_evaluation_ms).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(rules.iter().map(|r| r.last_lag_ms).collect::<Vec<_>>())),
            texts(rules.iter().map(|r| r.last_error.clone()).collect()),
            texts(
                rules
                    .iter()
                    .map(|r| {
                        Some(
                            r.rule
                                .targets
                                .iter()
                                .map(|t| t.describe())
                                .collect::<Vec<_>>()
                                .join(", "),
                        )
                    })
                    .collect(),
            ),
            texts(rules.iter().map(|r| Some(r.rule.sql())).collect()),
        ],
    )
}

/// One row per rule and instance; a rule with no instance has one row with no labels, in
/// state `normal` (or `paused`).
fn instances(alerts: &Alerts, db: &str) -> Result<RecordBatch, ArrowError> {
    let rules = alerts.rules_of(db);
    let mut rows = Vec::new();
    for r in &rules {
        if r.instances.is_empty() {
            rows.push((r, None));
        }
        for i in &r.instances {
            rows.push((r, Some(i)));
        }
    }
    let state = |(r, i): &(&super::RuleView, Option<&super::state::Instance>)| {
        if r.rule.paused {
            "paused".to_string()
        } else {
            i.map_or("normal", |i| i.state.name()).to_string()
        }
    };
    batch(
        vec![
            text("name", false),
            text("database", false),
            text("labels", true),
            text("state", false),
            Field::new("active_at", time_type(), true),
            Field::new("fired_at", time_type(), true),
            Field::new("resolved_at", time_type(), true),
            text("last_value", true),
            Field::new("last_evaluation", time_type(), true),
            text("last_error", true),
        ],
        vec![
            texts(rows.iter().map(|(r, _)| Some(r.rule.name.clone())).collect()),
            texts(rows.iter().map(|(r, _)| Some(r.rule.db.clone())).collect()),
            texts(rows.iter().map(|(_, i)| i.map(|i| labels_json(&i.labels))).collect()),
            texts(rows.iter().map(|row| Some(state(row))).collect()),
            times(rows.iter().map(|(_, i)| i.and_then(|i| i.active_at)).collect()),
            times(rows.iter().map(|(_, i)| i.and_then(|i| i.fired_at)).collect()),
            times(rows.iter().map(|(_, i)| i.and_then(|i| i.resolved_at)).collect()),
            texts(rows.iter().map(|(_, i)| i.map(|i| values_json(&i.values))).collect()),
            times(rows.iter().map(|(r, _)| r.last_evaluation_ns).collect()),
            texts(rows.iter().map(|(r, _)| r.last_error.clone()).collect()),
        ],
    )
}

fn events(alerts: &Alerts, db: &str) -> Result<RecordBatch, ArrowError> {
    let events = alerts.events_of(db);
    let t = |f: fn(&super::Event) -> Option<String>| texts(events.iter().map(f).collect());
    batch(
        vec![
            Field::new("time", time_type(), false),
            text("name", false),
            text("kind", false),
            text("labels", true),
            text("from_state", true),
            text("to_state", true),
            text("target", true),
            text("outcome", true),
            Field::new("status", DataType::UInt16, true),
            Field::new("attempt", DataType::UInt32, true),
            text("message", true),
            text("idempotency_key", true),
        ],
        vec![
            Arc::new(
                TimestampNanosecondArray::from(
                    events.iter().map(|e| e.time_ns).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            t(|e| Some(e.rule.clone())),
            t(|e| Some(e.kind.clone())),
            t(|e| e.labels.clone()),
            t(|e| e.from_state.clone()),
            t(|e| e.to_state.clone()),
            t(|e| e.target.clone()),
            t(|e| e.outcome.clone()),
            Arc::new(UInt16Array::from(events.iter().map(|e| e.status).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from(events.iter().map(|e| e.attempt).collect::<Vec<_>>())),
            t(|e| e.message.clone()),
            t(|e| e.key.clone()),
        ],
    )
}

/// The outbox: notifications not yet delivered, and dead-lettered ones.
fn notifications(alerts: &Alerts, db: &str) -> Result<RecordBatch, ArrowError> {
    let outbox = alerts.outbox_of(db);
    let t =
        |f: fn(&super::notify::Outgoing) -> Option<String>| texts(outbox.iter().map(f).collect());
    batch(
        vec![
            Field::new("id", DataType::UInt64, false),
            text("name", false),
            text("target", false),
            text("status", false),
            Field::new("firing", DataType::UInt64, false),
            Field::new("resolved", DataType::UInt64, false),
            Field::new("attempts", DataType::UInt32, false),
            Field::new("created", time_type(), false),
            Field::new("next_attempt", time_type(), true),
            text("last_error", true),
            text("idempotency_key", false),
        ],
        vec![
            Arc::new(UInt64Array::from(outbox.iter().map(|o| o.id).collect::<Vec<_>>())),
            t(|o| Some(o.rule.clone())),
            t(|o| Some(o.target.describe())),
            t(|o| {
                Some(match o.status {
                    super::notify::Delivery::Pending => "pending".into(),
                    super::notify::Delivery::Dead => "dead".into(),
                })
            }),
            Arc::new(UInt64Array::from(outbox.iter().map(|o| o.firing as u64).collect::<Vec<_>>())),
            Arc::new(UInt64Array::from(
                outbox.iter().map(|o| o.resolved as u64).collect::<Vec<_>>(),
            )),
            Arc::new(UInt32Array::from(outbox.iter().map(|o| o.attempts).collect::<Vec<_>>())),
            Arc::new(
                TimestampNanosecondArray::from(
                    outbox.iter().map(|o| o.created_ns).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            times(
                outbox
                    .iter()
                    .map(|o| {
                        (o.status == super::notify::Delivery::Pending).then_some(o.next_attempt_ns)
                    })
                    .collect(),
            ),
            t(|o| o.last_error.clone()),
            t(|o| Some(o.key.clone())),
        ],
    )
}
