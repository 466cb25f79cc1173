//! The catalog: which databases exist, which tables they hold, and each table's columns
//! (tags, typed fields, `time`). Schema grows on write: a new table or column appears as
//! written, and a column's kind and type never change afterwards, so a line that was valid
//! once stays valid against any later catalog (WAL replay relies on this).
//!
//! Pure data: no I/O. `persist` records schemas in manifest commits; `engine` serialises
//! changes; queries read copy-on-write `Arc<TableSchema>` snapshots.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::line_protocol::{FieldValue, Line};

/// Name of the timestamp column every table has.
pub const TIME_COLUMN: &str = "time";
/// Name of the hidden column holding the WAL sequence a row came from.
pub const SEQ_COLUMN: &str = "_seq";
/// Limits that keep one careless client from growing the catalog without bound.
pub const COLUMNS_PER_TABLE_MAX: usize = 2_000;
pub const TABLES_PER_DATABASE_MAX: usize = 10_000;
pub const NAME_BYTES_MAX: usize = 512;

/// Why a line or a name does not fit the catalog. The messages are what a rejected line reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{what} longer than {NAME_BYTES_MAX} bytes")]
    NameTooLong { what: &'static str },
    #[error("{what} \"{SEQ_COLUMN}\" is reserved")]
    Reserved { what: &'static str },
    #[error("{what} name is empty")]
    EmptyObjectName { what: &'static str },
    #[error("{what} name longer than {NAME_BYTES_MAX} bytes")]
    ObjectNameTooLong { what: &'static str },
    #[error("{what} name \"{name}\" contains a control character")]
    ObjectNameCharacter { what: &'static str, name: String },
    #[error("\"{key}\" is a {field_type} field in table \"{table}\", not a tag")]
    FieldNotTag { key: String, field_type: &'static str, table: String },
    #[error("\"{key}\" is used as both a tag and a field")]
    TagAndField { key: String },
    #[error("field \"{key}\" is {expected} in table \"{table}\", got {got}")]
    FieldType { key: String, expected: &'static str, table: String, got: &'static str },
    #[error("\"{key}\" is a tag in table \"{table}\", not a field")]
    TagNotField { key: String, table: String },
    #[error("table \"{table}\" would exceed {COLUMNS_PER_TABLE_MAX} columns")]
    TooManyColumns { table: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Float,
    Integer,
    UInteger,
    String,
    Boolean,
}

impl FieldType {
    pub fn of(value: &FieldValue<'_>) -> FieldType {
        match value {
            FieldValue::Float(_) => FieldType::Float,
            FieldValue::Integer(_) => FieldType::Integer,
            FieldValue::UInteger(_) => FieldType::UInteger,
            FieldValue::String(_) => FieldType::String,
            FieldValue::Boolean(_) => FieldType::Boolean,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FieldType::Float => "float",
            FieldType::Integer => "integer",
            FieldType::UInteger => "unsigned integer",
            FieldType::String => "string",
            FieldType::Boolean => "boolean",
        }
    }

    pub fn data_type(self) -> DataType {
        match self {
            FieldType::Float => DataType::Float64,
            FieldType::Integer => DataType::Int64,
            FieldType::UInteger => DataType::UInt64,
            FieldType::String => DataType::Utf8,
            FieldType::Boolean => DataType::Boolean,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "type")]
pub enum ColumnKind {
    Tag,
    Field(FieldType),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(flatten)]
    pub kind: ColumnKind,
}

/// Arrow type of tag columns.
pub fn tag_data_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Arrow type of the `time` column: nanoseconds, UTC.
pub fn time_data_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// One table's columns. Arrow schema order: tags, then fields, each in creation order, then
/// `time`; that is also the sort key order (tags, time).
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub name: String,
    columns: Vec<Column>,
    by_name: HashMap<String, usize>,
    arrow: SchemaRef,
    arrow_with_seq: SchemaRef,
}

impl PartialEq for TableSchema {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.columns == other.columns
    }
}

impl TableSchema {
    pub fn new(name: impl Into<String>, columns: Vec<Column>) -> TableSchema {
        let mut schema = TableSchema {
            name: name.into(),
            columns: Vec::new(),
            by_name: HashMap::new(),
            arrow: Arc::new(Schema::empty()),
            arrow_with_seq: Arc::new(Schema::empty()),
        };
        for column in columns {
            schema.push(column);
        }
        schema.rebuild_arrow();
        schema
    }

    fn push(&mut self, column: Column) {
        self.by_name.insert(column.name.clone(), self.columns.len());
        self.columns.push(column);
    }

    fn rebuild_arrow(&mut self) {
        let tags = self.tags().map(|c| Field::new(&c.name, tag_data_type(), true));
        let fields = self.columns.iter().filter_map(|c| match c.kind {
            ColumnKind::Field(t) => Some(Field::new(&c.name, t.data_type(), true)),
            ColumnKind::Tag => None,
        });
        let mut all: Vec<Field> = tags.chain(fields).collect();
        all.push(Field::new(TIME_COLUMN, time_data_type(), false));
        self.arrow = Arc::new(Schema::new(all.clone()));
        all.push(Field::new(SEQ_COLUMN, DataType::UInt64, false));
        self.arrow_with_seq = Arc::new(Schema::new(all));
    }

    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.by_name.get(name).map(|&i| &self.columns[i])
    }

    pub fn tags(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| c.kind == ColumnKind::Tag)
    }

    /// The schema queries see.
    pub fn arrow_schema(&self) -> &SchemaRef {
        &self.arrow
    }

    /// The schema of stored data: the query schema plus `_seq`.
    pub fn arrow_schema_with_seq(&self) -> &SchemaRef {
        &self.arrow_with_seq
    }

    /// Checks `line` against this schema plus `pending` (columns this batch added before it),
    /// and returns the columns the line would add. Nothing changes unless the caller applies
    /// them, so a rejected line leaves no trace.
    pub fn check_line(&self, line: &Line<'_>, pending: &[Column]) -> Result<Vec<Column>, Error> {
        // Many pending columns (a new table of many keys) are looked up through a map.
        let pending_by_name: Option<HashMap<&str, ColumnKind>> = (pending.len() > 32)
            .then(|| pending.iter().map(|c| (c.name.as_str(), c.kind)).collect());
        let lookup = |name: &str| -> Option<ColumnKind> {
            self.column(name).map(|c| c.kind).or_else(|| match &pending_by_name {
                Some(by_name) => by_name.get(name).copied(),
                None => pending.iter().find(|c| c.name == name).map(|c| c.kind),
            })
        };
        let mut added = Vec::new();
        for (key, _) in &line.tags {
            check_name("tag key", key)?;
            match lookup(key) {
                Some(ColumnKind::Tag) => {}
                Some(ColumnKind::Field(t)) => {
                    return Err(Error::FieldNotTag {
                        key: key.to_string(),
                        field_type: t.name(),
                        table: self.name.clone(),
                    })
                }
                None => added.push(Column { name: key.to_string(), kind: ColumnKind::Tag }),
            }
        }
        // A key written twice in one line: only the last occurrence counts.
        let superseded = line.superseded_fields();
        let tags: Option<std::collections::HashSet<&str>> =
            (line.tags.len() > 32).then(|| line.tags.iter().map(|(k, _)| k.as_ref()).collect());
        for (index, (key, value)) in line.fields.iter().enumerate() {
            if superseded.as_ref().is_some_and(|s| s[index]) {
                continue;
            }
            check_name("field key", key)?;
            let also_tag = match &tags {
                Some(tags) => tags.contains(key.as_ref()),
                None => line.tags.iter().any(|(k, _)| k == key),
            };
            if also_tag {
                return Err(Error::TagAndField { key: key.to_string() });
            }
            let wanted = FieldType::of(value);
            match lookup(key) {
                Some(ColumnKind::Field(t)) if t == wanted => {}
                Some(ColumnKind::Field(t)) => {
                    return Err(Error::FieldType {
                        key: key.to_string(),
                        expected: t.name(),
                        table: self.name.clone(),
                        got: wanted.name(),
                    })
                }
                Some(ColumnKind::Tag) => {
                    return Err(Error::TagNotField {
                        key: key.to_string(),
                        table: self.name.clone(),
                    })
                }
                None => {
                    added.push(Column { name: key.to_string(), kind: ColumnKind::Field(wanted) })
                }
            }
        }
        if self.columns.len() + pending.len() + added.len() > COLUMNS_PER_TABLE_MAX {
            return Err(Error::TooManyColumns { table: self.name.clone() });
        }
        Ok(added)
    }

    /// A copy with `added` appended; columns already present are skipped.
    pub fn with_columns(&self, added: &[Column]) -> TableSchema {
        let mut next = self.clone();
        for column in added {
            if next.column(&column.name).is_none() {
                next.push(column.clone());
            }
        }
        next.rebuild_arrow();
        next
    }

    /// Whether adding `added` conflicts with a column that is already here with another kind.
    pub fn conflicts_with(&self, added: &[Column]) -> bool {
        added.iter().any(|c| self.column(&c.name).is_some_and(|existing| existing.kind != c.kind))
    }
}

/// Checks a column name (tag or field), by the same rules for line protocol and `CREATE TABLE`.
pub fn check_name(what: &'static str, name: &str) -> Result<(), Error> {
    if name.len() > NAME_BYTES_MAX {
        return Err(Error::NameTooLong { what });
    }
    if name == SEQ_COLUMN {
        return Err(Error::Reserved { what });
    }
    Ok(())
}

/// Checks a database or table name: any UTF-8 but control characters, 1 to `NAME_BYTES_MAX`
/// bytes. Names never become object paths (files are stored under the ids the manifest
/// assigns), so `/`, `\\`, `%`, `?` or `..` are ordinary characters.
pub fn check_object_name(what: &'static str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::EmptyObjectName { what });
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(Error::ObjectNameTooLong { what });
    }
    if name.chars().any(char::is_control) {
        return Err(Error::ObjectNameCharacter { what, name: name.escape_debug().to_string() });
    }
    Ok(())
}

/// Every database and table. Cloned cheaply: tables are `Arc`s.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    databases: BTreeMap<String, BTreeMap<String, Arc<TableSchema>>>,
    /// Materialized views per database: name → the text of the defining query. Tables and
    /// views share one namespace per database.
    views: BTreeMap<String, BTreeMap<String, Arc<ViewSpec>>>,
    /// Retention periods set on databases, and on tables (overriding their database's).
    database_retention: BTreeMap<String, Retention>,
    table_retention: BTreeMap<(String, String), Retention>,
    /// Per table: the time below which its rows were expired (the highest cutoff its
    /// retention ever applied, in ns). Rows below it are gone even if the retention is later
    /// lengthened, and writes below it are refused.
    expired_before: BTreeMap<(String, String), i64>,
}

/// How long a database or table keeps its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Rows are kept forever (a table's setting overrides its database's).
    Infinite,
    /// Rows whose time is older than now minus this many nanoseconds are gone.
    PeriodNs(i64),
}

/// The shortest retention period (InfluxDB 3 allows an hour; shorter ones serve tests and
/// short-lived debug data).
pub const RETENTION_MIN_NS: i64 = 1_000_000_000;

impl Retention {
    /// `'30d'`, `'12h'`, `'1h 30m'`, `'30 days'`, or `none` / `infinite` / `inf` (InfluxQL's
    /// `INF`) for forever.
    pub fn parse(text: &str) -> Result<Retention, String> {
        let trimmed = text.trim();
        if ["none", "infinite", "inf"].iter().any(|w| trimmed.eq_ignore_ascii_case(w)) {
            return Ok(Retention::Infinite);
        }
        let compact: String = trimmed.split_whitespace().collect();
        let duration = humantime::parse_duration(&compact).map_err(|_| {
            format!(
                "retention '{text}' is not a duration: write it as '30d', '12h', '90 days' or 'none'"
            )
        })?;
        let ns = i64::try_from(duration.as_nanos())
            .map_err(|_| format!("retention '{text}' is too long (at most about 292 years)"))?;
        if ns < RETENTION_MIN_NS {
            return Err(format!("retention '{text}' is shorter than the minimum of 1s"));
        }
        Ok(Retention::PeriodNs(ns))
    }

    /// As users write it back: `'7days'`, or `none`.
    pub fn display(self) -> String {
        match self {
            Retention::Infinite => "none".to_string(),
            Retention::PeriodNs(ns) => {
                humantime::format_duration(std::time::Duration::from_nanos(ns as u64)).to_string()
            }
        }
    }
}

/// A materialized view as the catalog records it: its name, the id the manifest gave it and
/// its definition (`CREATE MATERIALIZED VIEW` as the user wrote it; `views` parses it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewSpec {
    pub name: String,
    pub id: u64,
    pub sql: String,
}

impl Catalog {
    pub fn database_names(&self) -> impl Iterator<Item = &String> {
        self.databases.keys()
    }

    pub fn has_database(&self, db: &str) -> bool {
        self.databases.contains_key(db)
    }

    pub fn create_database(&mut self, db: &str) -> bool {
        if self.databases.contains_key(db) {
            return false;
        }
        self.databases.insert(db.to_string(), BTreeMap::new());
        true
    }

    pub fn table(&self, db: &str, table: &str) -> Option<&Arc<TableSchema>> {
        self.databases.get(db)?.get(table)
    }

    pub fn tables(&self, db: &str) -> impl Iterator<Item = &Arc<TableSchema>> {
        self.databases.get(db).into_iter().flat_map(|t| t.values())
    }

    pub fn table_count(&self, db: &str) -> usize {
        self.databases.get(db).map_or(0, |t| t.len())
    }

    /// Removes a table; `false` if there was none.
    pub fn drop_table(&mut self, db: &str, table: &str) -> bool {
        let key = (db.to_string(), table.to_string());
        self.table_retention.remove(&key);
        self.expired_before.remove(&key);
        self.databases.get_mut(db).is_some_and(|tables| tables.remove(table).is_some())
    }

    /// Removes a database, its tables and views; `false` if there was none.
    pub fn drop_database(&mut self, db: &str) -> bool {
        self.views.remove(db);
        self.database_retention.remove(db);
        self.table_retention.retain(|(d, _), _| d != db);
        self.expired_before.retain(|(d, _), _| d != db);
        self.databases.remove(db).is_some()
    }

    /// Sets (or with `None` clears) a database's retention, or a table's when `table` is given
    /// (a table without one follows its database).
    pub fn set_retention(&mut self, db: &str, table: Option<&str>, retention: Option<Retention>) {
        match (table, retention) {
            (None, Some(r)) => {
                self.database_retention.insert(db.to_string(), r);
            }
            (None, None) => {
                self.database_retention.remove(db);
            }
            (Some(t), Some(r)) => {
                self.table_retention.insert((db.to_string(), t.to_string()), r);
            }
            (Some(t), None) => {
                self.table_retention.remove(&(db.to_string(), t.to_string()));
            }
        }
    }

    /// A database's own retention, or a table's own (`None`: not set).
    pub fn retention_setting(&self, db: &str, table: Option<&str>) -> Option<Retention> {
        match table {
            None => self.database_retention.get(db).copied(),
            Some(t) => self.table_retention.get(&(db.to_string(), t.to_string())).copied(),
        }
    }

    /// The retention a table's rows live by: its own, else its database's, else forever.
    pub fn retention(&self, db: &str, table: &str) -> Retention {
        self.retention_setting(db, Some(table))
            .or_else(|| self.retention_setting(db, None))
            .unwrap_or(Retention::Infinite)
    }

    /// Records that a table's rows below `before_ns` were expired (the mark only rises).
    pub fn set_expired_before(&mut self, db: &str, table: &str, before_ns: i64) {
        let mark =
            self.expired_before.entry((db.to_string(), table.to_string())).or_insert(i64::MIN);
        *mark = (*mark).max(before_ns);
    }

    pub fn expired_before(&self, db: &str, table: &str) -> Option<i64> {
        self.expired_before.get(&(db.to_string(), table.to_string())).copied()
    }

    /// The time below which a table has no rows at `now_ns` (`None`: it keeps every row):
    /// now minus its retention, or the mark of rows it already expired if that is later.
    pub fn cutoff(&self, db: &str, table: &str, now_ns: i64) -> Option<i64> {
        let by_period = match self.retention(db, table) {
            Retention::Infinite => None,
            Retention::PeriodNs(ns) => Some(now_ns.saturating_sub(ns)),
        };
        by_period.max(self.expired_before(db, table))
    }

    pub fn view(&self, db: &str, name: &str) -> Option<&Arc<ViewSpec>> {
        self.views.get(db)?.get(name)
    }

    pub fn views(&self, db: &str) -> impl Iterator<Item = &Arc<ViewSpec>> {
        self.views.get(db).into_iter().flat_map(|v| v.values())
    }

    /// Every view of every database, with its database.
    pub fn all_views(&self) -> impl Iterator<Item = (&String, &Arc<ViewSpec>)> {
        self.views.iter().flat_map(|(db, views)| views.values().map(move |v| (db, v)))
    }

    /// Installs a view, creating the database if needed.
    pub fn put_view(&mut self, db: &str, view: ViewSpec) {
        self.create_database(db);
        self.views.entry(db.to_string()).or_default().insert(view.name.clone(), Arc::new(view));
    }

    /// Removes a view; `false` if there was none.
    pub fn drop_view(&mut self, db: &str, name: &str) -> bool {
        self.views.get_mut(db).is_some_and(|views| views.remove(name).is_some())
    }

    /// Installs `schema` (a new table, or a grown one), creating the database if needed.
    pub fn put_table(&mut self, db: &str, schema: TableSchema) -> Arc<TableSchema> {
        let schema = Arc::new(schema);
        self.databases
            .entry(db.to_string())
            .or_default()
            .insert(schema.name.clone(), schema.clone());
        schema
    }
}

/// A Parquet file that holds rows of one partition of one table (see `storage-format/parquet.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParquetFile {
    /// Object path within the store.
    pub path: String,
    /// Start of the partition's time window, ns.
    pub partition_ns: i64,
    pub min_time_ns: i64,
    pub max_time_ns: i64,
    pub rows: u64,
    pub bytes: u64,
    /// Every WAL record up to this sequence number that had rows for this partition is in
    /// this file or an earlier one: replay skips them.
    pub max_seq: u64,
    /// Rows of this file may share keys with other files or the buffer of the same partition,
    /// so queries must merge them.
    pub overlap: bool,
    /// The id of the WAL (data directory) whose records `max_seq` counts: only that WAL's
    /// replay may skip records by it. Absent in files written before it was recorded, which
    /// count for every WAL (one data directory per store was all there was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<String>,
    /// 0 for a file a persist wrote; a compaction's output is one more than its highest input.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub level: u32,
}

fn is_zero(level: &u32) -> bool {
    *level == 0
}
