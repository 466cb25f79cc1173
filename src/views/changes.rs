//! A view's change feed: what each refresh changed in its materialized rows — a bucket × group
//! with new values (`upsert`) or gone (`delete`) — as change sets, each with the id of the base
//! write sequence it reflects. Subscribers take a snapshot of the materialized rows and then
//! every change set after it, in order, so snapshot + changes is the view as materialized at
//! every step. A bounded history of change sets lets a client resume after a disconnect
//! (`Last-Event-ID`); it lives in memory, so it starts anew with every start of the server.
//! A rebuilt view (`reset`) ends every subscription: its clients take a new snapshot.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use super::definition::Definition;
use super::state::row_keys;

/// Change sets kept for resuming subscribers.
pub const HISTORY_MAX: usize = 4096;

/// Change sets a subscriber may fall behind by before it is disconnected as too slow.
pub const LAG_MAX: usize = 1024;

/// Where a change set sits in a view's feed: the base sequence number it reflects, and its
/// place among change sets of the same sequence number (a refresh that covered part of the
/// dirty buckets is followed by another at the same number). Written `seq` or `seq.n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ChangeId {
    pub seq: u64,
    pub n: u32,
}

impl std::fmt::Display for ChangeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.n {
            0 => write!(f, "{}", self.seq),
            n => write!(f, "{}.{n}", self.seq),
        }
    }
}

impl std::str::FromStr for ChangeId {
    type Err = ();

    fn from_str(s: &str) -> Result<ChangeId, ()> {
        let (seq, n) = s.trim().split_once('.').unwrap_or((s.trim(), "0"));
        Ok(ChangeId { seq: seq.parse().map_err(|_| ())?, n: n.parse().map_err(|_| ())? })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A bucket × group with new values (the whole row).
    Upsert(Map<String, Value>),
    /// A bucket × group that has no rows any more (its bucket and group columns).
    Delete(Map<String, Value>),
    /// The view was rebuilt from scratch: take a new snapshot.
    Reset,
}

#[derive(Debug)]
pub struct ChangeSet {
    pub id: ChangeId,
    pub events: Vec<Event>,
}

impl ChangeSet {
    /// The change set as one JSON document: `[{"op": "upsert", "row": {…}}, …]`.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.events
                .iter()
                .map(|e| match e {
                    Event::Upsert(row) => serde_json::json!({"op": "upsert", "row": row}),
                    Event::Delete(row) => serde_json::json!({"op": "delete", "row": row}),
                    Event::Reset => serde_json::json!({"op": "reset"}),
                })
                .collect(),
        )
    }
}

/// The live end of a view's feed.
pub(super) struct Feed {
    tx: broadcast::Sender<Arc<ChangeSet>>,
    /// Set by the first subscription: from then on refreshes compute what they changed.
    enabled: AtomicBool,
    pub(super) subscribers: AtomicUsize,
}

impl Default for Feed {
    fn default() -> Feed {
        Feed {
            tx: broadcast::channel(LAG_MAX).0,
            enabled: AtomicBool::new(false),
            subscribers: AtomicUsize::new(0),
        }
    }
}

impl Feed {
    pub(super) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub(super) fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }
}

/// The feed's history, kept in the view's state (changed under its lock, with the rows).
#[derive(Default)]
pub(super) struct History {
    sets: VecDeque<Arc<ChangeSet>>,
    /// The id of the latest change set, or where the feed began.
    pub(super) last: ChangeId,
    /// Resuming after an id below this is impossible (those change sets are gone).
    floor: ChangeId,
}

impl History {
    /// The next id for a change set reflecting `seq`.
    fn next_id(&self, seq: u64) -> ChangeId {
        if seq > self.last.seq {
            ChangeId { seq, n: 0 }
        } else {
            ChangeId { seq: self.last.seq, n: self.last.n.saturating_add(1) }
        }
    }

    /// Records and sends a change set (nothing if it changes nothing).
    pub(super) fn publish(&mut self, feed: &Feed, seq: u64, events: Vec<Event>) {
        if events.is_empty() || !feed.enabled() {
            return;
        }
        let set = Arc::new(ChangeSet { id: self.next_id(seq), events });
        self.last = set.id;
        self.sets.push_back(set.clone());
        if self.sets.len() > HISTORY_MAX {
            if let Some(gone) = self.sets.pop_front() {
                self.floor = gone.id;
            }
        }
        let _ = feed.tx.send(set);
    }
}

/// A subscription: the rows at its start (if asked for), the change sets since the id it
/// resumed from, and the live feed after both.
pub struct Subscription {
    pub snapshot: Option<(ChangeId, Vec<RecordBatch>)>,
    pub backlog: Vec<Arc<ChangeSet>>,
    pub live: broadcast::Receiver<Arc<ChangeSet>>,
    pub guard: SubscriberGuard,
}

/// Counts a live subscriber while held.
pub struct SubscriberGuard(pub(super) Arc<super::View>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.feed.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a subscription cannot start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubscribeError {
    #[error(
        "change {since} is no longer retained (this server keeps the last {HISTORY_MAX} change \
         sets since it started, from {floor}): take a new snapshot"
    )]
    Gone { since: ChangeId, floor: ChangeId },
    #[error("change {since} is newer than the latest change {last}: take a new snapshot")]
    Unknown { since: ChangeId, last: ChangeId },
}

/// Starts a subscription on `history` (under the view's state lock, so no change set is
/// missed or seen twice). `rows` gives the materialized rows for a snapshot.
pub(super) fn subscribe(
    view: &Arc<super::View>,
    history: &History,
    since: Option<ChangeId>,
    rows: impl FnOnce() -> Vec<RecordBatch>,
) -> Result<Subscription, SubscribeError> {
    let backlog = match since {
        None => Vec::new(),
        Some(since) if since > history.last => {
            return Err(SubscribeError::Unknown { since, last: history.last })
        }
        Some(since) if since < history.floor => {
            return Err(SubscribeError::Gone { since, floor: history.floor })
        }
        Some(since) => history.sets.iter().filter(|s| s.id > since).cloned().collect(),
    };
    view.feed.enable();
    view.feed.subscribers.fetch_add(1, Ordering::AcqRel);
    let guard = SubscriberGuard(view.clone());
    let snapshot = since.is_none().then(|| (history.last, rows()));
    Ok(Subscription { snapshot, backlog, live: view.feed.tx.subscribe(), guard })
}

/// Starts the history where the feed begins: nothing before `last` can be resumed from.
pub(super) fn begin(history: &mut History, seq: u64) {
    if history.sets.is_empty() && history.last == ChangeId::default() {
        history.last = ChangeId { seq, n: 0 };
        history.floor = history.last;
    }
}

/// A view row's bucket start and encoded group key.
type RowKey = (i64, Vec<u8>);

/// JSON objects of `batches`' rows, keyed by bucket × group.
fn keyed_json(
    batches: &[RecordBatch],
    definition: &Definition,
) -> Option<HashMap<RowKey, Map<String, Value>>> {
    let mut out = HashMap::new();
    for batch in batches {
        let keys = row_keys(batch, definition)?;
        for (key, row) in keys.into_iter().zip(json_rows(batch)?) {
            out.insert(key, row);
        }
    }
    Some(out)
}

/// A batch's rows as JSON objects (as the HTTP JSON format writes them).
pub fn json_rows(batch: &RecordBatch) -> Option<Vec<Map<String, Value>>> {
    let (_, plain) = crate::query::plain(&batch.schema(), std::slice::from_ref(batch)).ok()?;
    let mut out = Vec::new();
    let mut writer = arrow::json::ArrayWriter::new(&mut out);
    for b in &plain {
        writer.write(b).ok()?;
    }
    writer.finish().ok()?;
    drop(writer);
    if out.is_empty() {
        return Some(Vec::new());
    }
    serde_json::from_slice(&out).ok()
}

/// What replacing `old` rows (the materialized rows of some bucket × groups) by `new` ones
/// changes, in bucket order.
pub(super) fn diff(
    old: &[RecordBatch],
    new: &[RecordBatch],
    definition: &Definition,
) -> Option<Vec<Event>> {
    let old = keyed_json(old, definition)?;
    let new = keyed_json(new, definition)?;
    let mut keys: Vec<&RowKey> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut events = Vec::new();
    for key in keys {
        match (old.get(key), new.get(key)) {
            (Some(a), Some(b)) if a == b => {}
            (_, Some(b)) => events.push(Event::Upsert(b.clone())),
            (Some(a), None) => {
                let mut identity = Map::new();
                for name in std::iter::once(&definition.bucket.output)
                    .chain(definition.groups.iter().map(|g| &g.output))
                {
                    identity.insert(name.clone(), a.get(name).cloned().unwrap_or(Value::Null));
                }
                events.push(Event::Delete(identity));
            }
            (None, None) => {}
        }
    }
    Some(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_ids_order_and_round_trip() {
        let a: ChangeId = "12".parse().expect("id");
        let b: ChangeId = "12.3".parse().expect("id");
        assert!(a < b && b < ChangeId { seq: 13, n: 0 });
        assert_eq!((a.to_string(), b.to_string()), ("12".to_string(), "12.3".to_string()));
        assert!("x".parse::<ChangeId>().is_err());
        let mut history = History::default();
        begin(&mut history, 5);
        assert_eq!(history.next_id(5), ChangeId { seq: 5, n: 1 });
        assert_eq!(history.next_id(9), ChangeId { seq: 9, n: 0 });
    }
}
