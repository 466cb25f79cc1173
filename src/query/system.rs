//! The `system` schema of each database: `system.views` (`views::system`), the alert tables
//! (`alerts::system`), `system.object_store` (the store and its cache), `system.files` (the
//! database's Parquet files), `system.compactions` (its recent compactions) and
//! `system.retention` (its databases' and tables' retention), built live when
//! a query names them, read-only.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::SchemaProvider;
use datafusion::datasource::{MemTable, TableProvider};
use datafusion::error::{DataFusionError, Result as DfResult};

/// The `system` schema of a database.
#[derive(Debug)]
pub struct SystemSchema {
    pub engine: Arc<crate::engine::Engine>,
    pub views: Arc<crate::views::Views>,
    pub alerts: Arc<crate::alerts::Alerts>,
    pub db: String,
}

/// A system table: read-only, and listed by catalog queries as a view (relkind `v`), not as
/// one of the user's tables (`\dt`, SQLAlchemy's `get_table_names` list only those).
#[derive(Debug)]
struct SystemTable(MemTable);

#[async_trait]
impl TableProvider for SystemTable {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        datafusion::datasource::TableType::View
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        self.0.scan(state, projection, filters, limit).await
    }
}

#[async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names = ["views", "object_store", "files", "compactions", "retention"]
            .map(String::from)
            .to_vec();
        names.extend(crate::alerts::system::TABLES.iter().map(|t| t.to_string()));
        names
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let batch = if name == "views" {
            crate::views::system::views_table(&self.views, &self.db)?
        } else if name == "object_store" {
            object_store_table(self.engine.store())
                .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?
        } else if name == "files" {
            files_table(&self.engine.files_of(&self.db))
                .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?
        } else if name == "retention" {
            retention_table(&self.engine, &self.db)
                .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?
        } else if name == "compactions" {
            compactions_table(&self.engine.compactions_of(&self.db))
                .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?
        } else {
            match crate::alerts::system::table(&self.alerts, &self.db, name) {
                Some(batch) => batch.map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?,
                None => return Ok(None),
            }
        };
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]])?;
        Ok(Some(Arc::new(SystemTable(table))))
    }

    fn table_exist(&self, name: &str) -> bool {
        ["views", "object_store", "files", "compactions", "retention"].contains(&name)
            || crate::alerts::system::TABLES.contains(&name)
    }
}

/// One row: the store (as configured), whether it is remote, and its cache's counters (zero
/// and null for a local directory, which needs no cache).
fn object_store_table(
    store: &crate::persist::store::Store,
) -> Result<arrow::record_batch::RecordBatch, arrow::error::ArrowError> {
    use arrow::array::{ArrayRef, BooleanArray, StringArray, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    let stats = store.cache_stats();
    let counter = |f: fn(&crate::persist::cache::Stats) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from(vec![stats.as_ref().map(f)]))
    };
    let fields = vec![
        Field::new("store", DataType::Utf8, false),
        Field::new("remote", DataType::Boolean, false),
        Field::new("cache_files", DataType::UInt64, true),
        Field::new("cache_bytes", DataType::UInt64, true),
        Field::new("cache_bytes_max", DataType::UInt64, true),
        Field::new("cache_hits", DataType::UInt64, true),
        Field::new("cache_misses", DataType::UInt64, true),
    ];
    let columns: Vec<ArrayRef> = vec![
        // A local directory is the server's business, not its clients'.
        Arc::new(StringArray::from(vec![match store.is_remote() {
            true => store.display.clone(),
            false => "local directory".to_string(),
        }])),
        Arc::new(BooleanArray::from(vec![store.is_remote()])),
        counter(|s| s.files),
        counter(|s| s.bytes),
        counter(|s| s.bytes_max),
        counter(|s| s.hits),
        counter(|s| s.misses),
    ];
    arrow::record_batch::RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// One row per Parquet file of the database's tables, as the manifest records it.
fn files_table(
    tables: &[(String, Vec<Arc<crate::catalog::ParquetFile>>)],
) -> Result<arrow::record_batch::RecordBatch, arrow::error::ArrowError> {
    use arrow::array::{
        ArrayRef, BooleanArray, StringArray, TimestampNanosecondArray, UInt32Array, UInt64Array,
    };
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let files: Vec<(&str, &crate::catalog::ParquetFile)> = tables
        .iter()
        .flat_map(|(table, files)| files.iter().map(move |f| (table.as_str(), f.as_ref())))
        .collect();
    let time = || DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    let times = |f: fn(&crate::catalog::ParquetFile) -> i64| -> ArrayRef {
        Arc::new(
            TimestampNanosecondArray::from(files.iter().map(|(_, x)| f(x)).collect::<Vec<_>>())
                .with_timezone("UTC"),
        )
    };
    let counts = |f: fn(&crate::catalog::ParquetFile) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from(files.iter().map(|(_, x)| f(x)).collect::<Vec<_>>()))
    };
    let fields = vec![
        Field::new("table_name", DataType::Utf8, false),
        Field::new("partition", time(), false),
        Field::new("path", DataType::Utf8, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("min_time", time(), false),
        Field::new("max_time", time(), false),
        Field::new("max_seq", DataType::UInt64, false),
        Field::new("overlap", DataType::Boolean, false),
        Field::new("level", DataType::UInt32, false),
    ];
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(files.iter().map(|(t, _)| *t).collect::<Vec<_>>())),
        times(|f| f.partition_ns),
        Arc::new(StringArray::from(files.iter().map(|(_, f)| f.path.as_str()).collect::<Vec<_>>())),
        counts(|f| f.rows),
        counts(|f| f.bytes),
        times(|f| f.min_time_ns),
        times(|f| f.max_time_ns),
        counts(|f| f.max_seq),
        Arc::new(BooleanArray::from(files.iter().map(|(_, f)| f.overlap).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(files.iter().map(|(_, f)| f.level).collect::<Vec<_>>())),
    ];
    arrow::record_batch::RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// The database's retention (a row with no table name) and each table's: its own setting or
/// its database's, the cutoff now (rows before it are gone from queries) and the mark below
/// which rows were expired for good.
fn retention_table(
    engine: &crate::engine::Engine,
    db: &str,
) -> Result<arrow::record_batch::RecordBatch, arrow::error::ArrowError> {
    use crate::catalog::Retention;
    use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampNanosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let catalog = engine.catalog();
    let now_ns = engine.clock().now_ns();
    let mut names: Vec<Option<String>> = vec![None];
    names.extend(catalog.tables(db).map(|t| Some(t.name.clone())));
    let (mut retention, mut source, mut period, mut cutoff, mut expired) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for name in &names {
        let (setting, from) = match name {
            None => (catalog.retention_setting(db, None), "database"),
            Some(table) => match catalog.retention_setting(db, Some(table)) {
                Some(own) => (Some(own), "table"),
                None => (catalog.retention_setting(db, None), "database"),
            },
        };
        let setting = setting.unwrap_or(Retention::Infinite);
        retention.push(setting.display());
        source.push(from);
        period.push(match setting {
            Retention::Infinite => None,
            Retention::PeriodNs(ns) => Some(ns / 1_000_000_000),
        });
        match name {
            None => {
                cutoff.push(match setting {
                    Retention::Infinite => None,
                    Retention::PeriodNs(ns) => Some(now_ns.saturating_sub(ns)),
                });
                expired.push(None);
            }
            Some(table) => {
                cutoff.push(catalog.cutoff(db, table, now_ns));
                expired.push(catalog.expired_before(db, table));
            }
        }
    }
    let time = || DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    let fields = vec![
        Field::new("table_name", DataType::Utf8, true),
        Field::new("retention", DataType::Utf8, false),
        Field::new("retention_seconds", DataType::Int64, true),
        Field::new("set_on", DataType::Utf8, false),
        Field::new("cutoff", time(), true),
        Field::new("expired_before", time(), true),
    ];
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(names)),
        Arc::new(StringArray::from(retention)),
        Arc::new(Int64Array::from(period)),
        Arc::new(StringArray::from(source)),
        Arc::new(TimestampNanosecondArray::from(cutoff).with_timezone("UTC")),
        Arc::new(TimestampNanosecondArray::from(expired).with_timezone("UTC")),
    ];
    arrow::record_batch::RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// One row per recent compaction of the database's tables (this process's, newest last).
fn compactions_table(
    records: &[crate::engine::CompactionRecord],
) -> Result<arrow::record_batch::RecordBatch, arrow::error::ArrowError> {
    use arrow::array::{
        ArrayRef, Float64Array, StringArray, TimestampNanosecondArray, UInt32Array, UInt64Array,
    };
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    type Record = crate::engine::CompactionRecord;
    let time = || DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    let times = |f: fn(&Record) -> i64| -> ArrayRef {
        Arc::new(
            TimestampNanosecondArray::from(records.iter().map(f).collect::<Vec<_>>())
                .with_timezone("UTC"),
        )
    };
    let counts = |f: fn(&Record) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from(records.iter().map(f).collect::<Vec<_>>()))
    };
    let fields = vec![
        Field::new("table_name", DataType::Utf8, false),
        Field::new("partition", time(), false),
        Field::new("started", time(), false),
        Field::new("duration_ms", DataType::Float64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("input_files", DataType::UInt64, false),
        Field::new("input_bytes", DataType::UInt64, false),
        Field::new("input_rows", DataType::UInt64, false),
        Field::new("output_files", DataType::UInt64, false),
        Field::new("output_bytes", DataType::UInt64, false),
        Field::new("output_rows", DataType::UInt64, false),
        Field::new("level", DataType::UInt32, false),
    ];
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(records.iter().map(|r| r.table.as_str()).collect::<Vec<_>>())),
        times(|r| r.partition_ns),
        times(|r| r.started_ns),
        Arc::new(Float64Array::from(
            records.iter().map(|r| r.duration.as_secs_f64() * 1e3).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(records.iter().map(|r| r.status).collect::<Vec<_>>())),
        Arc::new(StringArray::from(records.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>())),
        counts(|r| r.input_files),
        counts(|r| r.input_bytes),
        counts(|r| r.input_rows),
        counts(|r| r.output_files),
        counts(|r| r.output_bytes),
        counts(|r| r.output_rows),
        Arc::new(UInt32Array::from(records.iter().map(|r| r.level).collect::<Vec<_>>())),
    ];
    arrow::record_batch::RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}
