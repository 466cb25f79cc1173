//! A view as DataFusion reads it, and the background refresh.
//!
//! A query on a view: the clean materialized rows of the buckets it asks for, plus its dirty
//! bucket × groups recomputed by running the defining query on raw data restricted to their
//! time ranges (and, when there are few, their group keys), keeping only the rows of dirty
//! bucket × groups. Before the view is materialized the defining query answers alone.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr as SqlExpr, Ident, Query, SetExpr, Statement, Value,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::definition::Definition;
use super::state::{covered, decode_key, Dirty, Plan};
use super::{Error, View, Views};
use crate::query::QueryEngine;

/// A refresh recomputes at most this many dirty buckets; the rest wait for the next one.
const REFRESH_BUCKETS_MAX: usize = 4096;

/// A restriction names group keys only while there are at most this many (else it restricts
/// time alone, and the rows of clean groups are dropped after).
const GROUP_TERMS_MAX: usize = 64;

/// Time ranges a restriction lists before it falls back to one range around all of them.
const RANGES_MAX: usize = 64;

/// How often the refresh job looks for views whose refresh interval has passed.
const REFRESH_TICK: Duration = Duration::from_millis(50);

/// A view with subscribers refreshes at most this often (and when marked, not on the tick).
const SUBSCRIBED_REFRESH_INTERVAL: Duration = Duration::from_millis(10);

fn external(e: Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// Plans and runs `query` in `state`, returning its schema and rows.
async fn run(state: &SessionState, query: Query) -> DfResult<(SchemaRef, Vec<RecordBatch>)> {
    let statement = DfStatement::Statement(Box::new(Statement::Query(Box::new(query))));
    let plan = state.statement_to_plan(statement).await?;
    let ctx = SessionContext::new_with_state(state.clone());
    let df = ctx.execute_logical_plan(plan).await?;
    let schema = df.schema().inner().clone();
    Ok((schema, df.collect().await?))
}

/// Whether `view`'s base is missing (a table that has had no write yet): the view is empty.
fn waiting(views: &Views, view: &View, definition: &Definition) -> bool {
    !views.has_rows_source(&view.db, &definition.base)
}

/// `definition`'s query with `restriction` ANDed to its `WHERE`. The restriction is built as
/// an AST (identifiers and literals from user data never become SQL text).
fn restricted(definition: &Definition, restriction: Option<SqlExpr>) -> DfResult<Query> {
    let mut query = definition.query.clone();
    let Some(predicate) = restriction else { return Ok(query) };
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Err(DataFusionError::Internal("a view's query is a SELECT".into()));
    };
    select.selection = Some(match select.selection.take() {
        Some(existing) => and(SqlExpr::Nested(Box::new(existing)), predicate),
        None => predicate,
    });
    Ok(query)
}

fn column(name: &str) -> SqlExpr {
    SqlExpr::Identifier(Ident::with_quote('"', name))
}

fn and(left: SqlExpr, right: SqlExpr) -> SqlExpr {
    SqlExpr::BinaryOp {
        left: Box::new(left),
        op: BinaryOperator::And,
        right: Box::new(SqlExpr::Nested(Box::new(right))),
    }
}

fn any(terms: Vec<SqlExpr>) -> Option<SqlExpr> {
    let or = terms.into_iter().reduce(|a, b| SqlExpr::BinaryOp {
        left: Box::new(a),
        op: BinaryOperator::Or,
        right: Box::new(b),
    })?;
    Some(SqlExpr::Nested(Box::new(or)))
}

/// `name <op> to_timestamp_nanos(ns)`.
fn time_compare(name: &str, op: BinaryOperator, ns: i64) -> DfResult<SqlExpr> {
    // Only digits reach the parser here.
    let timestamp = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&format!("to_timestamp_nanos({ns})"))
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| DataFusionError::Internal(format!("timestamp literal {ns}: {e}")))?;
    Ok(SqlExpr::BinaryOp { left: Box::new(column(name)), op, right: Box::new(timestamp) })
}

/// `start <= name < end`; no bound on a side at the end of the time range.
fn time_range(name: &str, start: i64, end: i64) -> DfResult<SqlExpr> {
    let lower = (start != i64::MIN).then(|| time_compare(name, BinaryOperator::GtEq, start));
    let upper = (end != i64::MAX).then(|| time_compare(name, BinaryOperator::Lt, end));
    match (lower.transpose()?, upper.transpose()?) {
        (Some(l), Some(u)) => Ok(and(l, u)),
        (Some(one), None) | (None, Some(one)) => Ok(one),
        (None, None) => Ok(SqlExpr::value(Value::Boolean(true))),
    }
}

/// The source-time range of buckets `[lo, hi]` (bucket starts).
fn range_predicate(definition: &Definition, lo: i64, hi: i64) -> DfResult<Option<SqlExpr>> {
    let bucket = &definition.bucket;
    let start = if lo == i64::MIN { i64::MIN } else { bucket.of(lo) };
    let end = if hi == i64::MAX { i64::MAX } else { bucket.end(bucket.of(hi)) };
    if start == i64::MIN && end == i64::MAX {
        return Ok(None);
    }
    time_range(&bucket.source, start, end).map(Some)
}

/// A restriction to the raw rows of `dirty`'s bucket × groups (a superset of them).
fn dirty_predicate(definition: &Definition, dirty: &Dirty) -> DfResult<Option<SqlExpr>> {
    let bucket = &definition.bucket;
    // Contiguous dirty buckets become one range.
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for &start in dirty.buckets.keys() {
        let end = bucket.end(start);
        match ranges.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => ranges.push((start, end)),
        }
    }
    let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else { return Ok(None) };
    let mut predicate = time_range(&bucket.source, first.0, last.1)?;
    if ranges.len() > 1 && ranges.len() <= RANGES_MAX {
        let terms = ranges
            .iter()
            .map(|(s, e)| time_range(&bucket.source, *s, *e).map(|t| SqlExpr::Nested(Box::new(t))))
            .collect::<DfResult<Vec<_>>>()?;
        if let Some(terms) = any(terms) {
            predicate = and(predicate, terms);
        }
    }
    if !definition.groups.is_empty() {
        let keys: BTreeSet<&Vec<u8>> = dirty.buckets.values().flat_map(|k| k.keys()).collect();
        if keys.len() <= GROUP_TERMS_MAX {
            let terms: Vec<SqlExpr> = keys
                .iter()
                .filter_map(|key| {
                    let values = decode_key(key);
                    definition
                        .groups
                        .iter()
                        .zip(values)
                        .map(|(g, v)| match v {
                            None => SqlExpr::IsNull(Box::new(column(&g.source))),
                            Some(v) => SqlExpr::BinaryOp {
                                left: Box::new(column(&g.source)),
                                op: BinaryOperator::Eq,
                                right: Box::new(SqlExpr::value(Value::SingleQuotedString(v))),
                            },
                        })
                        .reduce(and)
                        .map(|t| SqlExpr::Nested(Box::new(t)))
                })
                .collect();
            if let Some(terms) = any(terms) {
                predicate = and(predicate, terms);
            }
        }
    }
    Ok(Some(predicate))
}

/// The earliest time of `definition`'s base that can still have rows (`None`: all can): the
/// retention cutoff of the table at the root of the chain of views, carried up as the start
/// of the bucket holding it in each view between.
fn source_cutoff(views: &Views, db: &str, definition: &Definition, depth: usize) -> Option<i64> {
    let engine = views.engine();
    if engine.catalog().table(db, &definition.base).is_some() {
        return engine.cutoff(db, &definition.base);
    }
    if depth >= crate::views::VIEW_DEPTH_MAX {
        return None;
    }
    let base = views.get(db, &definition.base)?;
    let below = base.definition.as_ref().ok()?;
    source_cutoff(views, db, below, depth + 1).map(|c| below.bucket.of(c))
}

impl View {
    /// A view whose table does not exist (yet, or any more) has no answer, and says why.
    fn check_waiting(&self, views: &Views, definition: &Definition) -> Result<(), Error> {
        if waiting(views, self, definition) {
            return Err(self.failed(format!(
                "its base \"{}\" does not exist yet (a table appears with its first write); \
                 the view is empty until then",
                definition.base
            )));
        }
        Ok(())
    }

    /// Whether the definition fits what it reads now: a table's group columns must be tags
    /// (a point's field may change by overwrite, moving it between groups, which marks by
    /// the new value alone cannot follow).
    fn check_fits(&self, views: &Views, definition: &Definition) -> Result<(), Error> {
        let catalog = views.engine().catalog();
        let Some(table) = catalog.table(&self.db, &definition.base) else { return Ok(()) };
        for g in &definition.groups {
            if let Some(c) = table.column(&g.source) {
                if !matches!(c.kind, crate::catalog::ColumnKind::Tag) {
                    let reason = format!(
                        "it groups by \"{}\", a field of \"{}\"; a view groups by tags",
                        g.source, definition.base
                    );
                    self.set_failure(Some(reason.clone()));
                    return Err(self.failed(reason));
                }
            }
        }
        Ok(())
    }

    /// The view's rows for buckets in `[lo, hi]` (a superset: the caller filters), read in
    /// `state`: clean materialized rows ∪ dirty ones recomputed from raw. Under a retention
    /// of the table it reads (at the root of a chain of views), buckets wholly before the
    /// cutoff are gone and the bucket holding it is recomputed from the rows still kept, so
    /// the view stays what its query over the table says.
    pub(super) async fn answer(
        &self,
        views: &Views,
        state: &SessionState,
        lo: i64,
        hi: i64,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), Error> {
        let definition = self.definition()?;
        self.check_waiting(views, definition)?;
        self.check_fits(views, definition)?;
        let Some(edge) =
            source_cutoff(views, &self.db, definition, 0).map(|c| definition.bucket.of(c))
        else {
            return self.answer_range(state, definition, lo, hi).await;
        };
        let lo = lo.max(edge);
        if lo > edge || lo > hi {
            return self.answer_range(state, definition, lo, hi).await;
        }
        let failed = |e: DataFusionError| self.failed(e.to_string());
        let query_error =
            |e: DataFusionError| Error::Query { view: self.spec.name.clone(), source: Arc::new(e) };
        let query =
            restricted(definition, range_predicate(definition, edge, edge).map_err(failed)?)
                .map_err(failed)?;
        let (schema, mut batches) = run(state, query).await.map_err(query_error)?;
        let next = definition.bucket.end(edge);
        if next > hi || next == edge {
            return Ok((schema, batches));
        }
        let (_, rest) = self.answer_range(state, definition, next, hi).await?;
        batches.extend(rest);
        Ok((schema, batches))
    }

    /// `answer` for buckets in `[lo, hi]`, none of them cut by a retention.
    async fn answer_range(
        &self,
        state: &SessionState,
        definition: &Definition,
        lo: i64,
        hi: i64,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), Error> {
        let plan = self.state().plan_query(lo, hi);
        let failed = |e: DataFusionError| self.failed(e.to_string());
        let result = match plan {
            Plan::Full { .. } => {
                run(
                    state,
                    restricted(definition, range_predicate(definition, lo, hi).map_err(failed)?)
                        .map_err(failed)?,
                )
                .await
            }
            Plan::Partial { chunks, dirty, .. } => {
                let mut batches: Vec<RecordBatch> =
                    chunks.iter().filter_map(|c| c.clean(&dirty, lo, hi)).collect();
                let schema = self.schema();
                if dirty.is_empty() {
                    if let Some(schema) = schema {
                        return Ok((schema, batches));
                    }
                }
                match run(
                    state,
                    restricted(definition, dirty_predicate(definition, &dirty).map_err(failed)?)
                        .map_err(failed)?,
                )
                .await
                {
                    Ok((schema, fresh)) => match covered(fresh, &dirty, definition) {
                        Some(fresh) => {
                            batches.extend(fresh);
                            Ok((schema, batches))
                        }
                        None => Err(DataFusionError::Internal(
                            "the view's rows lack its bucket or group columns".into(),
                        )),
                    },
                    Err(e) => Err(e),
                }
            }
        };
        result.map_err(|e| Error::Query { view: self.spec.name.clone(), source: Arc::new(e) })
    }

    /// Recomputes what is dirty (or, before the view is materialized, all of it) and installs
    /// it. Returns whether anything was installed.
    pub(super) async fn refresh(&self, views: &Views, query: &QueryEngine) -> Result<bool, Error> {
        let _one = self.refreshing.lock().await;
        let definition = self.definition()?;
        if waiting(views, self, definition) {
            return Ok(false);
        }
        self.check_fits(views, definition)?;
        let started = Instant::now();
        let ctx = query.context(&self.db).map_err(|e| self.failed(e.to_string()))?;
        let state = ctx.state();
        let plan = self.state().plan_refresh(REFRESH_BUCKETS_MAX);
        let installed = match plan {
            Plan::Full { epoch, marked_seq } => {
                let (schema, batches) = match run(&state, definition.query.clone()).await {
                    Ok(result) => result,
                    Err(e) => {
                        self.set_failure(Some(e.to_string()));
                        return Err(self.failed(e.to_string()));
                    }
                };
                let mut s = self.state();
                s.failure = None;
                s.install_full(epoch, marked_seq, schema, batches, definition)
            }
            Plan::Partial { epoch, marked_seq, dirty, chunks } => {
                if dirty.is_empty() {
                    self.set_failure(None);
                    return Ok(false);
                }
                let query = dirty_predicate(definition, &dirty)
                    .and_then(|p| restricted(definition, p))
                    .map_err(|e| self.failed(e.to_string()))?;
                let (schema, fresh) = match run(&state, query).await {
                    Ok(result) => result,
                    Err(e) => {
                        self.set_failure(Some(e.to_string()));
                        return Err(self.failed(e.to_string()));
                    }
                };
                let Some(fresh) = covered(fresh, &dirty, definition) else {
                    return Err(self.failed("the view's rows lack its bucket or group columns"));
                };
                // What this changes, for subscribers: the rows it replaces against the new ones
                // (only the refresh changes the rows, and refreshes take turns).
                let events = if self.feed.enabled() {
                    let old: Vec<RecordBatch> =
                        chunks.iter().filter_map(|c| c.covered_live(&dirty)).collect();
                    super::changes::diff(&old, &fresh, definition).unwrap_or_default()
                } else {
                    Vec::new()
                };
                // The replacement is computed here, outside the lock the WAL thread takes.
                let same_shape = self.schema().is_none_or(|known| known == schema);
                let chunks = match same_shape {
                    true => super::state::replaced(chunks, &dirty, fresh, definition),
                    false => None,
                };
                let mut s = self.state();
                s.failure = None;
                match chunks {
                    Some(chunks) => s.install_partial(epoch, marked_seq, &dirty, chunks, events),
                    None => {
                        // The base was replaced by one of other types: start over.
                        s.reset(marked_seq);
                        false
                    }
                }
            }
        };
        self.note_refresh(started);
        Ok(installed)
    }

    /// The view's schema: known once it ran, else planned now in `state`.
    pub(super) async fn planned_schema(
        &self,
        views: &Views,
        state: &SessionState,
    ) -> Result<SchemaRef, Error> {
        if let Some(schema) = self.schema() {
            return Ok(schema);
        }
        let definition = self.definition()?;
        self.check_waiting(views, definition)?;
        self.check_fits(views, definition)?;
        let statement =
            DfStatement::Statement(Box::new(Statement::Query(Box::new(definition.query.clone()))));
        match state.statement_to_plan(statement).await {
            Ok(plan) => {
                let schema = plan.schema().inner().clone();
                let mut s = self.state();
                if s.schema.is_none() {
                    s.schema = Some(schema.clone());
                }
                s.failure = None;
                Ok(schema)
            }
            Err(e) => {
                self.set_failure(Some(e.to_string()));
                Err(self.failed(e.to_string()))
            }
        }
    }
}

impl Views {
    /// The provider for view `name` of `db`, planned in `state`.
    pub async fn provider(
        self: &Arc<Self>,
        state: &SessionState,
        db: &str,
        name: &str,
    ) -> DfResult<Option<Arc<dyn TableProvider>>> {
        self.sync_if_stale(db, name);
        let Some(view) = self.get(db, name) else { return Ok(None) };
        // A view that cannot answer still has a name and columns (catalog listings of every
        // table must not fail for it); reading it returns why it cannot answer.
        let (schema, error) = match view.planned_schema(self, state).await {
            Ok(schema) => (schema, None),
            Err(error) => (placeholder_schema(&view), Some(error)),
        };
        Ok(Some(Arc::new(ViewTable { view, schema, error, views: self.clone() })))
    }

    /// The catalog names a view the index does not have (or an older one): re-sync.
    fn sync_if_stale(&self, db: &str, name: &str) {
        let spec = self.engine().catalog().view(db, name).cloned();
        let live = self.get(db, name).map(|v| v.spec.clone());
        if spec != live {
            self.sync();
        }
    }

    /// Refreshes every view whose interval has passed, until `stop` (a background task on the
    /// query runtime, never the WAL writer thread).
    pub async fn refresh_loop(
        self: Arc<Self>,
        query: Arc<QueryEngine>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut last: std::collections::HashMap<u64, Instant> = Default::default();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(REFRESH_TICK) => {}
                () = self.wakeup.notified() => {}
            }
            for view in self.all() {
                let Ok(definition) = view.definition() else { continue };
                // With subscribers, changes are pushed as soon as they are marked.
                let interval = if view.feed.subscribers.load(Ordering::Acquire) > 0 {
                    SUBSCRIBED_REFRESH_INTERVAL.min(definition.refresh_interval)
                } else {
                    definition.refresh_interval
                };
                let due = last.get(&view.spec.id).is_none_or(|t| t.elapsed() >= interval);
                if !due || !view.needs_refresh() {
                    continue;
                }
                last.insert(view.spec.id, Instant::now());
                if let Err(error) = view.refresh(&self, &query).await {
                    // Shown in system.views; retried at the view's interval.
                    tracing::debug!(view = %view.spec.name, %error, "refreshing a view failed");
                }
            }
        }
    }

    /// Subscribes to view `name`'s changes, from a snapshot (`since` = `None`) or after change
    /// `since`. The view is materialized first if it is not.
    pub async fn subscribe(
        &self,
        query: &QueryEngine,
        db: &str,
        name: &str,
        since: Option<super::changes::ChangeId>,
    ) -> Result<super::changes::Subscription, Error> {
        self.sync_if_stale(db, name);
        let Some(view) = self.get(db, name) else {
            return Err(Error::Failed { view: name.into(), reason: "no such view".into() });
        };
        let definition = view.definition()?;
        if waiting(self, &view, definition) {
            return Err(view.failed(format!(
                "its base \"{}\" does not exist yet; subscribe once it has rows",
                definition.base
            )));
        }
        if view.state().over_limit {
            return Err(view.failed(format!(
                "its rows would take more than {} bytes, so it is answered from raw data and \
                 has no change feed",
                super::MATERIALIZED_BYTES_MAX
            )));
        }
        // On before the refresh, so a refresh running meanwhile records what it changes.
        view.feed.enable();
        for _ in 0..8 {
            view.refresh(self, query).await?;
            let mut state = view.state();
            if !state.complete {
                continue;
            }
            // Ids are base sequence numbers, which never repeat across restarts: a feed that
            // begins here refuses to resume from any id of an earlier run or an earlier view.
            super::changes::begin(&mut state.history, self.engine().applied_seq());
            let rows = || state.all_rows();
            return super::changes::subscribe(&view, &state.history, since, rows)
                .map_err(|e| view.failed(e.to_string()));
        }
        Err(view.failed("it is being rebuilt; subscribe again shortly"))
    }

    /// `REFRESH MATERIALIZED VIEW`: materializes what is dirty now.
    pub async fn refresh_now(
        &self,
        query: &QueryEngine,
        db: &str,
        name: &str,
    ) -> Result<(), Error> {
        self.sync_if_stale(db, name);
        let Some(view) = self.get(db, name) else {
            return Err(Error::Failed { view: name.into(), reason: "no such view".into() });
        };
        view.check_waiting(self, view.definition()?)?;
        // Everything marked when it was asked for; writes after that may wait for the next.
        let target = view.state().marked_seq;
        for _ in 0..64 {
            let installed = view.refresh(self, query).await?;
            let state = view.state();
            let done =
                state.complete && (state.dirty.is_empty() || state.materialized_seq >= target);
            if done || (!installed && state.complete) {
                break;
            }
        }
        Ok(())
    }
}

/// The columns of a view that cannot be planned (its table does not exist yet, or it failed):
/// the bucket, the groups as text, and the other items untyped, by their names.
fn placeholder_schema(view: &View) -> SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::sql::sqlparser::ast::SelectItem;
    let Ok(definition) = &view.definition else { return Arc::new(Schema::empty()) };
    let SetExpr::Select(select) = definition.query.body.as_ref() else {
        return Arc::new(Schema::empty());
    };
    let mut seen = std::collections::HashSet::new();
    let fields: Vec<Field> = select
        .projection
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let mut name = match item {
                SelectItem::ExprWithAlias { alias, .. } => alias.value.clone(),
                SelectItem::UnnamedExpr(SqlExpr::Identifier(i)) => i.value.clone(),
                other => other.to_string(),
            };
            if !seen.insert(name.clone()) {
                name = format!("{name}_{i}");
            }
            let data_type = if name == definition.bucket.output {
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
            } else if definition.groups.iter().any(|g| g.output == name) {
                DataType::Utf8
            } else {
                DataType::Null
            };
            Field::new(name, data_type, true)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// DataFusion's handle on one view.
#[derive(Debug)]
pub struct ViewTable {
    view: Arc<View>,
    views: Arc<Views>,
    schema: SchemaRef,
    /// Why the view cannot answer, if it cannot.
    error: Option<Error>,
}

#[async_trait]
impl TableProvider for ViewTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    /// `information_schema.views.definition` (and `SHOW CREATE TABLE`): the stored statement.
    fn get_table_definition(&self) -> Option<&str> {
        Some(&self.view.spec.sql)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if let Some(error) = &self.error {
            return Err(external(error.clone()));
        }
        let Some(session) = state.as_any().downcast_ref::<SessionState>() else {
            return Err(DataFusionError::Internal("a view is read in a SessionState".into()));
        };
        let definition = self.view.definition().map_err(external)?;
        let (lo, hi) = crate::query::column_time_bounds(filters, &definition.bucket.output);
        let (_, batches) =
            self.view.answer(&self.views, session, lo, hi).await.map_err(external)?;
        let batches: Vec<RecordBatch> = batches
            .into_iter()
            .map(|b| {
                if b.schema() == self.schema {
                    Ok(b)
                } else {
                    RecordBatch::try_new(self.schema.clone(), b.columns().to_vec())
                }
            })
            .collect::<Result<_, _>>()
            .map_err(|e| {
                DataFusionError::Execution(format!(
                    "materialized view \"{}\" changed shape while it was read ({e}); retry",
                    self.view.spec.name
                ))
            })?;
        Ok(MemorySourceConfig::try_new_exec(&[batches], self.schema.clone(), projection.cloned())?)
    }
}
