//! SQL over a database: DataFusion with one catalog per database (schema `public`), whose tables
//! read a snapshot of the buffer together with the table's Parquet files.
//!
//! Pruning: time predicates select partitions and files before anything is opened (a query for
//! the last hour opens no file of other days); the remaining predicates go to the Parquet reader
//! for row-group and page pruning, and only the projected columns are read.
//!
//! Dedup: partitions flagged `overlap` (a key may occur in more than one row) are read whole
//! (filtered on key columns only), merged field by field, and then filtered like the rest.
//! Other partitions are read as they are: they hold each key once.

pub mod ddl;
pub mod files;
pub mod functions;
pub mod gapfill;
pub mod insert;
pub mod last_cache;
pub mod prefilter;
pub mod system;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider, SchemaProvider, Session};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::expr_rewriter::unnormalize_col;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::TableReference;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{LogicalPlan, WriteOp};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;

use crate::buffer::{adapt, dedup, time_range};
use crate::catalog::{ParquetFile, SEQ_COLUMN, TIME_COLUMN};
use crate::engine::{Engine, PartitionSnapshot};
use crate::statement::RewriteContext;

#[derive(Debug, Clone)]
pub struct Config {
    /// Memory all running queries may use together; a query that needs more fails.
    pub memory_bytes_max: usize,
    /// Parallelism of one query.
    pub target_partitions: usize,
}

impl Config {
    pub fn for_tests() -> Config {
        Config { memory_bytes_max: 512 << 20, target_partitions: 2 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database \"{0}\" not found")]
    DatabaseNotFound(String),
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Statement(#[from] crate::statement::Error),
    #[error("relation \"{0}\" does not exist")]
    UndefinedTable(String),
    #[error("function {0} does not exist")]
    UndefinedFunction(String),
}

impl Error {
    /// The single mapping point from DataFusion errors to error kinds.
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind;
        match self {
            Error::DatabaseNotFound(_) => ErrorKind::NotFound,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Statement(e) => e.kind(),
            // As DataFusion's own planning error was: 400 over HTTP, not the 404 of a database.
            Error::UndefinedTable(_) => ErrorKind::InvalidInput,
            Error::UndefinedFunction(_) => ErrorKind::InvalidInput,
            Error::DataFusion(e) => kind_of(e),
        }
    }
}

/// The kind of a DataFusion error (and of Sundial's errors raised inside one).
pub fn kind_of(error: &DataFusionError) -> crate::ErrorKind {
    use crate::ErrorKind;
    match error.find_root() {
        DataFusionError::SQL(..) | DataFusionError::Plan(_) | DataFusionError::SchemaError(..) => {
            ErrorKind::InvalidInput
        }
        DataFusionError::NotImplemented(_) => ErrorKind::Unsupported,
        DataFusionError::ResourcesExhausted(_) => ErrorKind::ResourceExhausted,
        DataFusionError::Execution(_) | DataFusionError::ArrowError(..) => ErrorKind::InvalidInput,
        DataFusionError::External(e) => match e.downcast_ref::<crate::views::Error>() {
            Some(view) => view.kind(),
            None => ErrorKind::Internal,
        },
        _ => ErrorKind::Internal,
    }
}

/// Runs SQL against the engine's databases.
pub struct QueryEngine {
    engine: Arc<Engine>,
    runtime: Arc<RuntimeEnv>,
    config: Config,
    contexts: Mutex<HashMap<String, SessionContext>>,
    views: Arc<crate::views::Views>,
    alerts: Arc<crate::alerts::Alerts>,
    /// Itself, for the sessions' catalogs (a view is planned in its database's session).
    me: std::sync::Weak<QueryEngine>,
}

impl QueryEngine {
    pub fn new(
        engine: Arc<Engine>,
        config: Config,
        alerts: Arc<crate::alerts::Alerts>,
    ) -> Result<Arc<QueryEngine>, Error> {
        let runtime =
            RuntimeEnvBuilder::new().with_memory_limit(config.memory_bytes_max, 1.0).build_arc()?;
        let url = url::Url::parse(&engine.store().datafusion_url)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        runtime.register_object_store(&url, engine.store().reader());
        // DataFusion registers the whole local filesystem as `file://`; Sundial's queries read
        // only Sundial's own store, so no query can name a server file.
        let file =
            url::Url::parse("file:///").map_err(|e| DataFusionError::External(Box::new(e)))?;
        let _ = runtime.object_store_registry.deregister_store(&file);
        let views = crate::views::Views::new(engine.clone());
        Ok(Arc::new_cyclic(|me| QueryEngine {
            engine,
            runtime,
            config,
            contexts: Mutex::new(HashMap::new()),
            views,
            alerts,
            me: me.clone(),
        }))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn views(&self) -> &Arc<crate::views::Views> {
        &self.views
    }

    pub fn alerts(&self) -> &Arc<crate::alerts::Alerts> {
        &self.alerts
    }

    /// The session for `db` (one per database, cached).
    pub fn context(&self, db: &str) -> Result<SessionContext, Error> {
        if !self.engine.catalog().has_database(db) {
            return Err(Error::DatabaseNotFound(db.to_string()));
        }
        let mut contexts = self.contexts.lock().expect("contexts lock");
        if let Some(ctx) = contexts.get(db) {
            return Ok(ctx.clone());
        }
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(db, "public")
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true)
            .with_target_partitions(self.config.target_partitions);
        config.options_mut().execution.parquet.pushdown_filters = true;
        config.options_mut().execution.parquet.reorder_filters = true;
        // Sundial writes no bloom filters; looking for them costs every row group a probe.
        config.options_mut().execution.parquet.bloom_filter_on_read = false;
        let ctx = SessionContext::new_with_config_rt(config, self.runtime.clone());
        functions::register(&ctx);
        ctx.register_udtf(
            "last_cache",
            Arc::new(last_cache::LastCacheFunction {
                engine: self.engine.clone(),
                db: db.to_string(),
            }),
        );
        let catalog = MemoryCatalogProvider::new();
        catalog.register_schema(
            "public",
            Arc::new(DatabaseSchema {
                engine: self.engine.clone(),
                db: db.to_string(),
                query: self.me.clone(),
            }),
        )?;
        catalog.register_schema(
            "system",
            Arc::new(system::SystemSchema {
                engine: self.engine.clone(),
                views: self.views.clone(),
                alerts: self.alerts.clone(),
                db: db.to_string(),
            }),
        )?;
        ctx.register_catalog(db, Arc::new(catalog));
        contexts.insert(db.to_string(), ctx.clone());
        Ok(ctx)
    }

    /// Plans one query of the statement pipeline (a [`Command::Query`]) in `ctx`: Sundial's
    /// rewrites on the AST, then DataFusion's planner, then the check that the plan only reads
    /// or inserts (no DDL, no `COPY … TO` a file, no statements that change the session).
    ///
    /// [`Command::Query`]: crate::statement::Command::Query
    pub async fn plan(
        &self,
        ctx: &SessionContext,
        db: &str,
        mut statement: Statement,
    ) -> Result<LogicalPlan, Error> {
        let catalog = self.engine.catalog();
        crate::statement::rewrite(&mut statement, &RewriteContext { catalog: &catalog, db })?;
        let state = ctx.state();
        let statement = DfStatement::Statement(Box::new(statement));
        // Every table the statement names must exist: said here, typed, rather than in words
        // DataFusion may change.
        for table in state.resolve_table_references(&statement)? {
            // Table functions (`range`, `last_cache`, `generate_series`) are named like tables.
            let function = matches!(&table, TableReference::Bare { table }
                if state.table_functions().contains_key(table.as_ref()));
            if !function && !ctx.table_exist(table.clone())? {
                return Err(Error::UndefinedTable(table.to_string()));
            }
        }
        let kept = statement.clone();
        let plan = match state.statement_to_plan(statement).await {
            Ok(plan) => plan,
            Err(error) => return Err(undefined_function(&state, &kept).unwrap_or(error.into())),
        };
        verify_read_or_insert(&plan)?;
        Ok(plan)
    }

    /// Plans and runs one query of `db`, returning every result batch and the result schema.
    pub async fn run(&self, db: &str, statement: Statement) -> Result<Collected, Error> {
        use futures::StreamExt;
        let ctx = self.context(db)?;
        let plan = self.plan(&ctx, db, statement).await?;
        let df = ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = df.schema().inner().clone();
        // The collected rows count against the query memory pool like the work that made
        // them: a result larger than `--query-memory-max` fails instead of growing the server.
        let pool = ctx.runtime_env().memory_pool.clone();
        let reservation =
            datafusion::execution::memory_pool::MemoryConsumer::new("query result").register(&pool);
        let mut stream = df.execute_stream().await?;
        let mut batches = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            reservation.try_grow(new_buffer_bytes(&batch, &mut seen))?;
            batches.push(batch);
        }
        Ok(Collected { schema, batches, reservation })
    }

    /// Plans and runs `sql`, one query, through the statement pipeline.
    #[cfg(test)]
    pub async fn sql(&self, db: &str, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), Error> {
        match crate::statement::command(sql)? {
            Some(crate::statement::Command::Query(statement)) => {
                self.run(db, *statement).await.map(|c| (c.schema, c.batches))
            }
            Some(_) => Err(Error::Unsupported("not a query".into())),
            None => Err(Error::Unsupported("no statement".into())),
        }
    }
}

/// Bytes of the allocations behind `batch` that no earlier batch of the result holds
/// (`seen`: their start addresses). `RecordBatch::get_array_memory_size` counts a whole
/// allocation for every batch that slices it, so a result cut from a few large buffers (a
/// dictionary's values, a buffered run) was counted many times over, and a result that fits
/// in memory was refused as larger than the pool.
fn new_buffer_bytes(batch: &RecordBatch, seen: &mut std::collections::HashSet<usize>) -> usize {
    fn walk(data: &arrow::array::ArrayData, seen: &mut std::collections::HashSet<usize>) -> usize {
        let mut bytes = 0;
        let nulls = data.nulls().map(|n| n.buffer());
        for buffer in data.buffers().iter().chain(nulls) {
            if seen.insert(buffer.data_ptr().as_ptr() as usize) {
                bytes += buffer.capacity();
            }
        }
        bytes + data.child_data().iter().map(|child| walk(child, seen)).sum::<usize>()
    }
    batch.columns().iter().map(|column| walk(&column.to_data(), seen)).sum()
}

/// A query's whole result, and its share of the query memory pool (held until dropped).
pub struct Collected {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub reservation: datafusion::execution::memory_pool::MemoryReservation,
}

/// A function `statement` calls that `state` does not know, as the error to report when its
/// planning failed.
fn undefined_function(
    state: &datafusion::execution::SessionState,
    statement: &DfStatement,
) -> Option<Error> {
    use datafusion::sql::sqlparser::ast::{visit_expressions, Expr as SqlExpr};
    let DfStatement::Statement(statement) = statement else { return None };
    let mut unknown = None;
    let _ = visit_expressions(statement.as_ref(), |expr| {
        if let SqlExpr::Function(f) = expr {
            let name = f.name.0.last().and_then(|p| p.as_ident()).map(|i| {
                if i.quote_style.is_some() {
                    i.value.clone()
                } else {
                    i.value.to_lowercase()
                }
            });
            if let Some(name) = name {
                // Functions DataFusion's SQL planner handles itself rather than by registry.
                const PLANNED: &[&str] = &["unnest", "struct", "grouping", "rollup", "cube"];
                let known = PLANNED.contains(&name.as_str())
                    || state.scalar_functions().contains_key(&name)
                    || state.aggregate_functions().contains_key(&name)
                    || state.window_functions().contains_key(&name);
                if !known {
                    unknown = Some(name);
                    return std::ops::ControlFlow::Break(());
                }
            }
        }
        std::ops::ControlFlow::Continue(())
    });
    unknown.map(Error::UndefinedFunction)
}

/// The allowlist's second line: whatever reached DataFusion as a query may read, explain and
/// insert, nothing else (the pipeline refuses other statements before planning).
fn verify_read_or_insert(plan: &LogicalPlan) -> Result<(), Error> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_statements(false)
        .with_allow_dml(true)
        .verify_plan(plan)?;
    let mut refused = None;
    plan.apply(|node| {
        Ok(match node {
            LogicalPlan::Copy(_) => {
                refused = Some("COPY … TO a file");
                TreeNodeRecursion::Stop
            }
            LogicalPlan::Dml(dml) if dml.op != WriteOp::Insert(InsertOp::Append) => {
                refused = Some("UPDATE, DELETE and INSERT OVERWRITE");
                TreeNodeRecursion::Stop
            }
            // INSERT only into Sundial's tables (pg_catalog's would take rows into memory and
            // keep none).
            LogicalPlan::Dml(dml)
                if datafusion::datasource::source_as_provider(&dml.target)
                    .map_or(true, |p| !p.is::<Table>()) =>
            {
                refused = Some("INSERT into anything but a Sundial table");
                TreeNodeRecursion::Stop
            }
            _ => TreeNodeRecursion::Continue,
        })
    })?;
    match refused {
        Some(what) => Err(Error::Unsupported(format!("{what} is not supported"))),
        None => Ok(()),
    }
}

/// A database's tables and materialized views, read live from the engine's catalog.
#[derive(Debug)]
struct DatabaseSchema {
    engine: Arc<Engine>,
    db: String,
    query: std::sync::Weak<QueryEngine>,
}

#[async_trait]
impl SchemaProvider for DatabaseSchema {
    fn table_names(&self) -> Vec<String> {
        let catalog = self.engine.catalog();
        let tables = catalog.tables(&self.db).map(|t| t.name.clone());
        tables.chain(catalog.views(&self.db).map(|v| v.name.clone())).collect()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if self.engine.catalog().view(&self.db, name).is_some() {
            let Some(query) = self.query.upgrade() else { return Ok(None) };
            let ctx =
                query.context(&self.db).map_err(|e| DataFusionError::External(Box::new(e)))?;
            return query.views.provider(&ctx.state(), &self.db, name).await;
        }
        let Some(schema) = self.engine.catalog().table(&self.db, name).cloned() else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Table {
            engine: self.engine.clone(),
            db: self.db.clone(),
            name: name.to_string(),
            schema: schema.arrow_schema().clone(),
            keys: schema.tags().map(|c| c.name.clone()).chain([TIME_COLUMN.to_string()]).collect(),
            table_schema: schema,
            time_default: datafusion::functions::datetime::expr_fn::now(),
        })))
    }

    fn table_exist(&self, name: &str) -> bool {
        let catalog = self.engine.catalog();
        catalog.table(&self.db, name).is_some() || catalog.view(&self.db, name).is_some()
    }
}

/// One table as DataFusion sees it.
#[derive(Debug)]
pub struct Table {
    engine: Arc<Engine>,
    db: String,
    name: String,
    /// The schema when the query was planned; newer columns are not seen by this query.
    schema: SchemaRef,
    /// Tag columns and time: the dedup key.
    keys: Vec<String>,
    table_schema: Arc<crate::catalog::TableSchema>,
    /// `INSERT` without `time` stores the time of the insert.
    time_default: Expr,
}

impl Table {
    fn schema_with_seq(&self) -> SchemaRef {
        let mut fields: Vec<_> = self.schema.fields().iter().cloned().collect();
        fields.push(Arc::new(arrow::datatypes::Field::new(
            SEQ_COLUMN,
            arrow::datatypes::DataType::UInt64,
            false,
        )));
        Arc::new(Schema::new(fields))
    }

    fn parquet_exec(
        &self,
        state: &dyn Session,
        schema: &SchemaRef,
        files: &[Arc<ParquetFile>],
        filters: &[Expr],
        projection: Option<Vec<usize>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        // Files never change once written: their footers and page indexes are read once and
        // kept in the runtime's metadata cache, not read again for every query (`files`).
        let url = ObjectStoreUrl::parse(&self.engine.store().datafusion_url)?;
        let readers = files::Readers {
            cached:
                datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory::new(
                    state.runtime_env().object_store(&url)?,
                    state.runtime_env().cache_manager.get_file_metadata_cache(),
                ),
            store: self.engine.store().clone(),
        };
        let mut source = ParquetSource::new(schema.clone())
            .with_table_parquet_options(state.table_options().parquet.clone())
            .with_parquet_file_reader_factory(Arc::new(readers));
        if let Some(predicate) = filters.iter().cloned().map(unnormalize_col).reduce(Expr::and) {
            let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
            source = source.with_predicate(state.create_physical_expr(predicate, &df_schema)?);
        }
        let groups = split(
            files
                .iter()
                .map(|f| {
                    PartitionedFile::from(object_store::ObjectMeta {
                        location: crate::persist::location(f),
                        last_modified: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
                        size: f.bytes,
                        e_tag: None,
                        version: None,
                    })
                })
                .collect(),
            state.config().target_partitions(),
        );
        let config = FileScanConfigBuilder::new(
            ObjectStoreUrl::parse(&self.engine.store().datafusion_url)?,
            Arc::new(source),
        )
        .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
        .with_projection_indices(projection)?
        .build();
        Ok(DataSourceExec::from_data_source(config))
    }

    /// Reads an overlapping partition whole and merges duplicate keys.
    async fn merged_partition(
        &self,
        buffered: Vec<RecordBatch>,
        files: &[Arc<ParquetFile>],
        key_filters: &[Expr],
        state: &dyn Session,
    ) -> DfResult<Vec<RecordBatch>> {
        let schema = self.schema_with_seq();
        let mut batches: Vec<RecordBatch> = buffered.iter().map(|b| adapt(b, &schema)).collect();
        if !files.is_empty() {
            let plan = self.parquet_exec(state, &schema, files, key_filters, None)?;
            let task = Arc::new(datafusion::execution::TaskContext::from(state));
            batches.extend(datafusion::physical_plan::collect(plan, task).await?);
        }
        let all = arrow::compute::concat_batches(&schema, &batches)?;
        let keys: Vec<usize> = self.keys.iter().filter_map(|k| schema.index_of(k).ok()).collect();
        let seq = schema.index_of(SEQ_COLUMN)?;
        let merged = dedup::sort_and_merge(&all, &keys, seq, true)?;
        Ok(vec![adapt(&merged, &self.schema)])
    }
}

/// Splits items into `n` groups (fewer when there are fewer items) whose sizes differ by at
/// most one, keeping order.
fn split<T>(items: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let n = n.max(1).min(items.len());
    let (per, extra) = (items.len() / n.max(1), items.len() % n.max(1));
    let mut groups: Vec<Vec<T>> =
        (0..n).map(|g| Vec::with_capacity(per + usize::from(g < extra))).collect();
    let mut items = items.into_iter();
    for (g, group) in groups.iter_mut().enumerate() {
        group.extend(items.by_ref().take(per + usize::from(g < extra)));
    }
    groups
}

/// The time range `filters` allow, as inclusive nanosecond bounds.
pub fn time_bounds(filters: &[Expr]) -> (i64, i64) {
    column_time_bounds(filters, TIME_COLUMN)
}

/// The range `filters` allow on the timestamp column `column`, as inclusive nanosecond bounds.
pub fn column_time_bounds(filters: &[Expr], column: &str) -> (i64, i64) {
    let mut lo = i64::MIN;
    let mut hi = i64::MAX;
    for filter in filters {
        if let Expr::BinaryExpr(BinaryExpr { left, op, right }) = filter {
            let (op, value) = match (left.as_ref(), right.as_ref()) {
                (Expr::Column(c), Expr::Literal(v, _)) if c.name == column => (*op, v),
                (Expr::Literal(v, _), Expr::Column(c)) if c.name == column => match op.swap() {
                    Some(op) => (op, v),
                    None => continue,
                },
                _ => continue,
            };
            let Some(ns) = timestamp_nanos(value) else { continue };
            match op {
                Operator::Gt => lo = lo.max(ns.saturating_add(1)),
                Operator::GtEq => lo = lo.max(ns),
                Operator::Lt => hi = hi.min(ns.saturating_sub(1)),
                Operator::LtEq => hi = hi.min(ns),
                Operator::Eq => {
                    lo = lo.max(ns);
                    hi = hi.min(ns);
                }
                _ => {}
            }
        }
    }
    (lo, hi)
}

fn timestamp_nanos(value: &ScalarValue) -> Option<i64> {
    match value {
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampMicrosecond(Some(v), _) => v.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000_000),
        _ => None,
    }
}

/// Whether a filter only reads key columns (so it may run before the merge).
fn only_keys(filter: &Expr, keys: &[String]) -> bool {
    filter.column_refs().iter().all(|c| keys.contains(&c.name))
}

#[async_trait]
impl TableProvider for Table {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn get_column_default(&self, column: &str) -> Option<&Expr> {
        (column == TIME_COLUMN).then_some(&self.time_default)
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: datafusion::logical_expr::dml::InsertOp,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if insert_op != datafusion::logical_expr::dml::InsertOp::Append {
            return Err(DataFusionError::NotImplemented(format!("{insert_op} is not supported; INSERT appends (a later write to the same point wins)")));
        }
        let sink = insert::LineProtocolSink {
            engine: self.engine.clone(),
            db: self.db.clone(),
            table: self.table_schema.clone(),
            schema: self.schema.clone(),
        };
        Ok(Arc::new(datafusion::datasource::sink::DataSinkExec::new(input, Arc::new(sink), None)))
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Inexact: we prune with them; DataFusion still filters every row.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let Some(cutoff) = self.engine.cutoff(&self.db, &self.name) else {
            return self.scan_rows(state, projection, filters, i64::MIN).await;
        };
        // Rows past the table's retention are gone: read them with their time, keep those at
        // or after the cutoff, and leave the time out again if the query did not ask for it.
        let time_index = self.schema.index_of(TIME_COLUMN)?;
        let asked: Vec<usize> =
            projection.cloned().unwrap_or_else(|| (0..self.schema.fields().len()).collect());
        let mut read = asked.clone();
        let position = match read.iter().position(|&i| i == time_index) {
            Some(position) => position,
            None => {
                read.push(time_index);
                read.len() - 1
            }
        };
        let rows = self.scan_rows(state, Some(&read), filters, cutoff).await?;
        let cutoff = ScalarValue::TimestampNanosecond(Some(cutoff), Some("UTC".into()));
        let predicate = Arc::new(datafusion::physical_expr::expressions::BinaryExpr::new(
            Arc::new(datafusion::physical_expr::expressions::Column::new(TIME_COLUMN, position)),
            Operator::GtEq,
            Arc::new(datafusion::physical_expr::expressions::Literal::new(cutoff)),
        ));
        let mut filter = datafusion::physical_plan::filter::FilterExecBuilder::new(predicate, rows);
        if read.len() > asked.len() {
            filter = filter.apply_projection(Some((0..asked.len()).collect()))?;
        }
        let filter = filter.build()?;
        Ok(Arc::new(filter))
    }
}

impl Table {
    /// The table's rows (all of them: the caller drops those past the retention) for a query
    /// with these filters, none of whose rows is below `lowest`.
    async fn scan_rows(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        lowest: i64,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let projected = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };
        let (lo, hi) = time_bounds(filters);
        let lo = lo.max(lowest);
        let Some(snapshot) = self.engine.snapshot(&self.db, &self.name, lo, hi) else {
            return Ok(Arc::new(EmptyExec::new(projected)));
        };
        let overlapping: BTreeSet<i64> = snapshot
            .partitions
            .iter()
            .filter(|p| p.overlap)
            .map(|p| p.partition_ns)
            .chain(snapshot.files.iter().filter(|f| f.overlap).map(|f| f.partition_ns))
            .collect();

        let mut plain_batches: Vec<RecordBatch> = Vec::new();
        let mut merged_batches = Vec::new();
        let key_filters: Vec<Expr> =
            filters.iter().filter(|f| only_keys(f, &self.keys)).cloned().collect();
        let mut by_partition: HashMap<i64, Vec<RecordBatch>> = HashMap::new();
        let tag_filters = prefilter::tag_filters(filters, &self.table_schema);
        for PartitionSnapshot { partition_ns, batches, .. } in snapshot.partitions {
            if overlapping.contains(&partition_ns) {
                by_partition.insert(partition_ns, batches);
            } else {
                // A buffered batch outside the query's time range is skipped unread.
                let in_range =
                    |b: &RecordBatch| time_range(b).is_none_or(|(min, max)| max >= lo && min <= hi);
                plain_batches
                    .extend(batches.into_iter().filter(|b| in_range(b) && b.num_rows() > 0));
            }
        }
        for &partition_ns in &overlapping {
            let buffered = by_partition.remove(&partition_ns).unwrap_or_default();
            let files: Vec<_> =
                snapshot.files.iter().filter(|f| f.partition_ns == partition_ns).cloned().collect();
            merged_batches
                .extend(self.merged_partition(buffered, &files, &key_filters, state).await?);
        }
        let plain_files: Vec<_> = snapshot
            .files
            .iter()
            .filter(|f| !overlapping.contains(&f.partition_ns))
            .cloned()
            .collect();

        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        let partitions = state.config().target_partitions();
        let mut groups = if tag_filters.is_empty() {
            split(plain_batches.iter().map(|b| adapt(b, &self.schema)).collect(), partitions)
        } else {
            // Tag filters keep only the rows that can pass them (DataFusion still filters),
            // gathered into one batch per group.
            let refs: Vec<&RecordBatch> = plain_batches.iter().collect();
            prefilter::select(&refs, &tag_filters, &self.schema, partitions)?
                .into_iter()
                .map(|b| vec![b])
                .collect()
        };
        groups.extend(split(
            merged_batches.into_iter().filter(|b| b.num_rows() > 0).collect(),
            partitions,
        ));
        groups.retain(|g| !g.is_empty());
        if !groups.is_empty() {
            inputs.push(MemorySourceConfig::try_new_exec(
                &groups,
                self.schema.clone(),
                projection.cloned(),
            )?);
        }
        if !plain_files.is_empty() {
            inputs.push(self.parquet_exec(
                state,
                &self.schema,
                &plain_files,
                filters,
                projection.cloned(),
            )?);
        }
        if inputs.is_empty() {
            return Ok(Arc::new(EmptyExec::new(projected)));
        }
        UnionExec::try_new(inputs)
    }
}

/// Dictionary columns (tags) become plain strings, for text output (HTTP formats, COPY).
pub fn plain(
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<(SchemaRef, Vec<RecordBatch>), arrow::error::ArrowError> {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Dictionary(_, value) => {
                Field::new(f.name(), value.as_ref().clone(), f.is_nullable())
            }
            _ => f.as_ref().clone(),
        })
        .collect();
    let target = Arc::new(Schema::new(fields));
    let converted = batches
        .iter()
        .map(|b| {
            let columns = b
                .columns()
                .iter()
                .zip(target.fields())
                .map(|(c, f)| {
                    if c.data_type() == f.data_type() {
                        Ok(c.clone())
                    } else {
                        arrow::compute::cast(c, f.data_type())
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new(target.clone(), columns)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((target, converted))
}
