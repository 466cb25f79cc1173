//! Materialized views that are exact at every moment.
//!
//! A view is an aggregate query grouped by a time bucket and tag columns (`definition`). Its
//! answer is kept per bucket × group key: rows materialized by a background refresh, and
//! *dirty marks* for the bucket × group keys that writes touched since. Marks are taken on the
//! WAL writer thread from the rows each durable write applied, before the write is
//! acknowledged, and travel down to views defined over views. A query on a view unions the
//! clean materialized rows with the dirty buckets recomputed from the deduplicated raw data at
//! query time (`table`), so it equals the defining query over raw data: late, out-of-order and
//! overwritten points included, no refresh needed. The refresh recomputes dirty buckets from
//! raw — never adding deltas to stored totals — and clears only the marks it covered: a mark
//! that changed while it ran stays.
//!
//! Durability: a view's definition is a manifest op; its materialized rows live in memory and
//! are rebuilt from raw data after a restart (until they are, queries compute the view from
//! raw), so a crash can lose work but never make a view wrong.

pub mod changes;
pub mod ddl;
pub mod definition;
mod state;
pub mod system;
pub mod table;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arrow::array::{Array, ArrayRef, AsArray, DictionaryArray, StringArray};
use arrow::datatypes::{DataType, Int32Type, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::catalog::{ViewSpec, TIME_COLUMN};
use crate::engine::{CommittedWrite, Engine};
pub use definition::Definition;
use state::{Marks, State};

/// At most this many dirty bucket × group marks per view; past it the view forgets its
/// materialized rows and is computed from raw until rebuilt (memory stays bounded, answers
/// stay exact).
pub const DIRTY_MARKS_MAX: usize = 1_000_000;

/// At most this many views per database (each write's rows are checked against the views of
/// its table on the WAL writer thread).
pub const VIEWS_PER_DATABASE_MAX: usize = 100;

/// A view may read a view that reads a view… at most this deep.
pub const VIEW_DEPTH_MAX: usize = 8;

/// At most this many bytes of materialized rows per view; a view whose rows grow past it is
/// answered from raw data (exact, slower), and says so in `system.views`.
pub const MATERIALIZED_BYTES_MAX: usize = 256 << 20;

/// Why a view cannot answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("materialized view \"{view}\" failed: {reason}")]
    Failed { view: String, reason: String },
    #[error("materialized view \"{view}\": {source}")]
    Query { view: String, source: Arc<datafusion::error::DataFusionError> },
}

/// One live view.
pub struct View {
    pub db: String,
    pub spec: Arc<ViewSpec>,
    pub definition: Result<Definition, String>,
    state: Mutex<State>,
    /// Serialises refreshes of this view.
    refreshing: tokio::sync::Mutex<()>,
    feed: Arc<changes::Feed>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View").field("db", &self.db).field("name", &self.spec.name).finish()
    }
}

/// How a view's marks reach a view defined over it.
struct Edge {
    view: Arc<View>,
    /// For each of the dependent's groups, the position of its source among this view's
    /// groups; `None` if it reads a column this view does not group by (the dependent is then
    /// invalidated whole).
    groups: Option<Vec<usize>>,
}

#[derive(Default)]
struct Index {
    /// Views by (database, name).
    views: HashMap<(String, String), Arc<View>>,
    /// Views reading a table or view, by (database, base name).
    readers: HashMap<(String, String), Vec<Edge>>,
}

/// Every live view, kept in step with the catalog.
pub struct Views {
    engine: Arc<Engine>,
    index: RwLock<Index>,
    /// Wakes the refresh task: a view with subscribers was marked.
    wakeup: Arc<tokio::sync::Notify>,
    /// Serialises CREATE and DROP MATERIALIZED VIEW (their checks and commits).
    pub(crate) ddl: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Views").finish_non_exhaustive()
    }
}

/// A snapshot of one view's state, for `system.views`.
#[derive(Debug, Clone)]
pub struct Status {
    pub db: String,
    pub name: String,
    pub sql: String,
    pub status: String,
    pub reason: Option<String>,
    pub base: String,
    pub base_seq: u64,
    pub marked_seq: u64,
    pub materialized_seq: u64,
    pub dirty_buckets: usize,
    pub dirty_marks: usize,
    pub materialized: bool,
    pub rows: usize,
    pub bytes: usize,
    pub refreshes: u64,
    pub last_refresh: Option<SystemTime>,
    pub last_refresh_duration: Option<Duration>,
}

impl Views {
    /// The views of `engine`'s catalog; subscribes to its writes for the dirty marks.
    pub fn new(engine: Arc<Engine>) -> Arc<Views> {
        let views = Arc::new(Views {
            engine: engine.clone(),
            index: RwLock::default(),
            wakeup: Arc::default(),
            ddl: tokio::sync::Mutex::new(()),
        });
        views.sync();
        let weak = Arc::downgrade(&views);
        engine.subscribe(Arc::new(move |change: &CommittedWrite<'_>| {
            if let Some(views) = weak.upgrade() {
                views.on_change(change);
            }
        }));
        views
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Brings the live views in line with the catalog: new definitions start (empty, computed
    /// from raw until materialized), dropped ones stop. A view dropped and created again under
    /// its name is a new view (its manifest id differs) and starts clean.
    pub fn sync(&self) {
        let catalog = self.engine.catalog();
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        let mut views = HashMap::new();
        for (db, spec) in catalog.all_views() {
            let key = (db.clone(), spec.name.clone());
            let view = match index.views.get(&key) {
                Some(v) if v.spec == *spec => v.clone(),
                _ => Arc::new(View::new(db, spec.clone())),
            };
            views.insert(key, view);
        }
        // A view dropped, or replaced by a new one of its name: its subscribers are told.
        for (key, old) in &index.views {
            if views.get(key).is_none_or(|new| !Arc::ptr_eq(new, old)) {
                old.state().reset(0);
            }
        }
        let mut readers: HashMap<(String, String), Vec<Edge>> = HashMap::new();
        for ((db, _), view) in &views {
            let Ok(definition) = &view.definition else { continue };
            let groups = match views.get(&(db.clone(), definition.base.clone())) {
                Some(base) => match &base.definition {
                    Ok(base) => definition
                        .groups
                        .iter()
                        .map(|g| base.groups.iter().position(|b| b.output == g.source))
                        .collect::<Option<Vec<usize>>>(),
                    Err(_) => None,
                },
                None => Some(Vec::new()),
            };
            readers
                .entry((db.clone(), definition.base.clone()))
                .or_default()
                .push(Edge { view: view.clone(), groups });
        }
        *index = Index { views, readers };
    }

    pub fn get(&self, db: &str, name: &str) -> Option<Arc<View>> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index.views.get(&(db.to_string(), name.to_string())).cloned()
    }

    pub fn all(&self) -> Vec<Arc<View>> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = index.views.values().cloned().collect();
        all.sort_by(|a, b| (&a.db, &a.spec.name).cmp(&(&b.db, &b.spec.name)));
        all
    }

    /// The views reading `base` directly, with how their groups map (for a view base).
    fn readers(&self, db: &str, base: &str) -> Vec<(Arc<View>, Option<Vec<usize>>)> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index
            .readers
            .get(&(db.to_string(), base.to_string()))
            .map(|edges| edges.iter().map(|e| (e.view.clone(), e.groups.clone())).collect())
            .unwrap_or_default()
    }

    /// `name`, then its base while it is a view, that view's base, and so on (at most 64; a
    /// view whose definition failed ends the chain). Read from the live views, whose
    /// definitions are parsed once, not from the catalog's text.
    fn chain(&self, db: &str, name: &str) -> Vec<String> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let mut chain = vec![name.to_string()];
        while chain.len() < 64 {
            let Some(last) = chain.last() else { break };
            let Some(view) = index.views.get(&(db.to_string(), last.clone())) else { break };
            match &view.definition {
                Ok(d) => chain.push(d.base.clone()),
                Err(_) => break,
            }
        }
        chain
    }

    /// Whether `name` is `of` or one of the bases it reads, transitively.
    pub fn reads(&self, db: &str, of: &str, name: &str) -> bool {
        self.chain(db, of).iter().any(|n| n == name)
    }

    /// Whether `name` is a table, or a view that reads one (through any chain of views): a
    /// view over anything else waits, empty, for its table's first write.
    pub fn has_rows_source(&self, db: &str, name: &str) -> bool {
        let catalog = self.engine.catalog();
        self.chain(db, name).iter().any(|n| catalog.table(db, n).is_some())
    }

    /// How many views deep `name` is (0: a table or nothing).
    pub fn depth(&self, db: &str, name: &str) -> usize {
        let catalog = self.engine.catalog();
        self.chain(db, name).iter().filter(|n| catalog.view(db, n).is_some()).count()
    }

    /// On the WAL writer thread (or a drop's task), before the change is acknowledged.
    fn on_change(&self, change: &CommittedWrite<'_>) {
        if self.index.read().unwrap_or_else(|p| p.into_inner()).readers.is_empty() {
            return;
        }
        for (table, rows) in &change.tables {
            for (view, _) in self.readers(change.database, table) {
                let Ok(definition) = &view.definition else { continue };
                let marks = marks_of_rows(definition, rows);
                if !marks.is_empty() {
                    self.mark(&view, marks, change.seq, 0);
                }
            }
        }
        for table in &change.dropped {
            for (view, _) in self.readers(change.database, table) {
                self.invalidate(&view, change.seq, 0);
            }
        }
    }

    /// Marks `view`'s buckets × groups dirty, and the buckets they fall in of views over it.
    fn mark(&self, view: &Arc<View>, marks: Marks, seq: u64, depth: usize) {
        if depth > VIEW_DEPTH_MAX {
            // Deeper than CREATE allows: cannot happen; forget rather than go stale.
            view.state().reset(seq);
            return;
        }
        view.state().mark(&marks, seq);
        if view.feed.subscribers.load(std::sync::atomic::Ordering::Acquire) > 0 {
            self.wakeup.notify_one();
        }
        for (reader, groups) in self.readers(&view.db, &view.spec.name) {
            let Ok(definition) = &reader.definition else { continue };
            match &groups {
                Some(groups) => {
                    let lifted = marks.lift(&definition.bucket, groups);
                    self.mark(&reader, lifted, seq, depth + 1);
                }
                None => self.invalidate(&reader, seq, depth + 1),
            }
        }
    }

    /// Forgets what `view` materialized (its base was dropped, or cannot be mapped): it is
    /// computed from raw until rebuilt.
    fn invalidate(&self, view: &Arc<View>, seq: u64, depth: usize) {
        view.state().reset(seq);
        if depth > VIEW_DEPTH_MAX {
            return;
        }
        for (reader, _) in self.readers(&view.db, &view.spec.name) {
            self.invalidate(&reader, seq, depth + 1);
        }
    }

    pub fn statuses(&self) -> Vec<Status> {
        let base_seq = self.engine.applied_seq();
        self.all().iter().map(|v| v.status(base_seq)).collect()
    }
}

impl View {
    /// The view's state; a panic elsewhere while it was held does not make it unusable (the
    /// WAL writer thread takes it for every write).
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn new(db: &str, spec: Arc<ViewSpec>) -> View {
        let definition = definition::from_sql(&spec.sql).map_err(|e| e.to_string());
        let feed = Arc::new(changes::Feed::default());
        View {
            db: db.to_string(),
            spec,
            definition,
            state: Mutex::new(State { feed: feed.clone(), ..State::default() }),
            refreshing: tokio::sync::Mutex::new(()),
            feed,
        }
    }

    fn failed(&self, reason: impl Into<String>) -> Error {
        Error::Failed { view: self.spec.name.clone(), reason: reason.into() }
    }

    pub fn definition(&self) -> Result<&Definition, Error> {
        self.definition.as_ref().map_err(|reason| self.failed(reason.clone()))
    }

    fn status(&self, base_seq: u64) -> Status {
        let state = self.state();
        let (status, reason) = match (&self.definition, &state.failure) {
            (Err(reason), _) | (_, Some(reason)) => ("failed", Some(reason.clone())),
            _ if state.over_limit => (
                "ok",
                Some(format!(
                    "answered from raw data: its rows would take more than {MATERIALIZED_BYTES_MAX} bytes"
                )),
            ),
            _ => ("ok", None),
        };
        Status {
            db: self.db.clone(),
            name: self.spec.name.clone(),
            sql: self.spec.sql.clone(),
            status: status.into(),
            reason,
            base: self.definition.as_ref().map(|d| d.base.clone()).unwrap_or_default(),
            base_seq,
            marked_seq: state.marked_seq,
            materialized_seq: state.materialized_seq,
            dirty_buckets: state.dirty.len(),
            dirty_marks: state.dirty_marks,
            materialized: state.complete,
            rows: state.rows(),
            bytes: state.bytes(),
            refreshes: state.refreshes,
            last_refresh: state.last_refresh,
            last_refresh_duration: state.last_refresh_duration,
        }
    }

    /// Records the outcome of planning or running the defining query: a failure is shown in
    /// `system.views` and returned by queries until a later run succeeds.
    fn set_failure(&self, failure: Option<String>) {
        self.state().failure = failure;
    }

    /// The view's schema, once known (from its first successful run).
    pub fn schema(&self) -> Option<SchemaRef> {
        self.state().schema.clone()
    }

    /// Whether a refresh has something to do.
    pub fn needs_refresh(&self) -> bool {
        let state = self.state();
        !state.over_limit && (!state.complete || !state.dirty.is_empty() || state.failure.is_some())
    }

    fn note_refresh(&self, started: Instant) {
        let mut state = self.state();
        state.refreshes += 1;
        state.last_refresh = Some(SystemTime::now());
        state.last_refresh_duration = Some(started.elapsed());
    }
}

/// The bucket × group keys `rows` (a table's rows, as stored) touch for `definition`.
fn marks_of_rows(definition: &Definition, rows: &RecordBatch) -> Marks {
    let mut marks = Marks::default();
    let Some(times) = rows.column_by_name(TIME_COLUMN) else { return marks };
    let Some(times) = times.as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>() else {
        return marks;
    };
    let columns: Vec<Option<KeyColumn>> = definition
        .groups
        .iter()
        .map(|g| rows.column_by_name(&g.source).map(KeyColumn::new))
        .collect();
    let mut key = Vec::new();
    for row in 0..rows.num_rows() {
        if times.is_null(row) {
            continue;
        }
        let bucket = definition.bucket.of(times.value(row));
        key.clear();
        for column in &columns {
            state::push_key_part(&mut key, column.as_ref().and_then(|c| c.value(row)));
        }
        marks.insert(bucket, &key);
    }
    marks
}

/// A group column of stored rows: a tag (dictionary) or, in other tables, text.
enum KeyColumn {
    Dictionary(DictionaryArray<Int32Type>, StringArray),
    Text(StringArray),
    Missing,
}

impl KeyColumn {
    fn new(array: &ArrayRef) -> KeyColumn {
        if let Some(dict) = array.as_dictionary_opt::<Int32Type>() {
            if let Ok(values) = arrow::compute::cast(dict.values(), &DataType::Utf8) {
                return KeyColumn::Dictionary(dict.clone(), values.as_string::<i32>().clone());
            }
        }
        match arrow::compute::cast(array, &DataType::Utf8) {
            Ok(text) => KeyColumn::Text(text.as_string::<i32>().clone()),
            Err(_) => KeyColumn::Missing,
        }
    }

    fn value(&self, row: usize) -> Option<&str> {
        match self {
            KeyColumn::Dictionary(dict, values) => {
                if dict.is_null(row) {
                    return None;
                }
                let key = dict.keys().value(row);
                usize::try_from(key)
                    .ok()
                    .filter(|&k| k < values.len() && !values.is_null(k))
                    .map(|k| values.value(k))
            }
            KeyColumn::Text(text) => (!text.is_null(row)).then(|| text.value(row)),
            KeyColumn::Missing => None,
        }
    }
}

impl Error {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Error::Failed { reason, .. } if reason == "no such view" => crate::ErrorKind::NotFound,
            Error::Failed { .. } => crate::ErrorKind::InvalidInput,
            Error::Query { source, .. } => crate::query::kind_of(source),
        }
    }
}

/// The SQLSTATE of a view's error on the Postgres protocol.
pub fn sqlstate_of(error: &Error) -> crate::pg::sqlstate::SqlState {
    use crate::pg::sqlstate::SqlState;
    match error {
        Error::Failed { reason, .. } if reason == "no such view" => SqlState::UndefinedTable,
        Error::Failed { .. } => SqlState::ObjectNotInPrerequisiteState,
        Error::Query { source, .. } => crate::pg::sqlstate_of(source),
    }
}
