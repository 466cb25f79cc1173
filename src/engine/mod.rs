//! The engine ties the write path together and owns the live state:
//!
//! write: parse lines → check them against a catalog snapshot → build Arrow rows (all on the
//! request's task) → grow the catalog under a short lock → WAL append; the WAL writer thread
//! applies rows to the buffer once durable, in sequence order, and hands them to subscribers.
//!
//! startup: manifest (schemas, files) → WAL replay, skipping rows already in files → buffer.
//!
//! persistence: a background loop writes partitions to Parquet on a timer and under memory
//! pressure, then deletes WAL segments that hold nothing unpersisted.
//!
//! It holds no protocol knowledge: `http` and later `pg` call it.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use tokio_util::sync::CancellationToken;

use crate::buffer::last::LastValues;
use crate::buffer::{PendingBatch, RowsBuilder, TableBuffer};
use crate::catalog::{self, Catalog, Column, ParquetFile, TableSchema};
use crate::line_protocol::{self, Line, Precision};
use crate::persist::manifest::{Manifest, Op};
use crate::persist::store::Store;
use crate::wal::{self, Wal};
use crate::ErrorKind;

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Where Parquet files and the manifest go; `None` means `file://{data_dir}/objects`.
    pub object_store_url: Option<String>,
    /// Buffered rows may use this much memory; writes get 503 beyond it.
    pub buffer_bytes_max: usize,
    /// Width of a time partition.
    pub partition: Duration,
    /// Everything buffered is persisted at least this often.
    pub persist_interval: Duration,
    pub wal_sync: bool,
    pub wal_segment_bytes_max: u64,
    pub wal_record_bytes_max: usize,
    /// Unsorted buffered rows a partition gathers before they are sorted by series.
    pub sort_rows_min: usize,
}

impl Config {
    pub fn for_tests(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            object_store_url: None,
            buffer_bytes_max: 64 << 20,
            partition: Duration::from_secs(86_400),
            persist_interval: Duration::from_secs(3600),
            wal_sync: true,
            wal_segment_bytes_max: 1 << 20,
            wal_record_bytes_max: 64 << 20,
            sort_rows_min: crate::buffer::SORT_ROWS_MIN,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} \"{name}\" is invalid: {reason}")]
    InvalidName { what: &'static str, name: String, reason: String },
    #[error("database \"{0}\" not found")]
    DatabaseNotFound(String),
    #[error("table \"{0}\" already exists")]
    TableExists(String),
    #[error("buffer memory limit of {bytes_max} bytes reached; persisting, retry shortly")]
    BufferFull { bytes_max: usize },
    #[error("database \"{database}\" would exceed {tables_max} tables")]
    TooManyTables { database: String, tables_max: usize },
    #[error("no line was accepted")]
    Rejected(Vec<RejectedLine>),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Wal(Arc<wal::Error>),
    #[error(transparent)]
    Persist(#[from] crate::persist::Error),
    #[error("startup: {0}")]
    Startup(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidName { .. } | Error::Rejected(_) | Error::TooManyTables { .. } => {
                ErrorKind::InvalidInput
            }
            Error::DatabaseNotFound(_) => ErrorKind::NotFound,
            Error::TableExists(_) => ErrorKind::AlreadyExists,
            Error::BufferFull { .. } => ErrorKind::ResourceExhausted,
            Error::ShuttingDown => ErrorKind::Unavailable,
            Error::Wal(e) => e.kind(),
            Error::Persist(e) => e.kind(),
            Error::Startup(_) | Error::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// A line that was not stored, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RejectedLine {
    pub line_number: usize,
    pub original_line: String,
    pub error_message: String,
}

#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    pub precision: Precision,
    /// Store the good lines when some are bad (otherwise store nothing).
    pub accept_partial: bool,
    /// Answer once written to the WAL file, before the sync.
    pub no_sync: bool,
    /// Timestamp for lines without one: the time of receipt, ns.
    pub default_time_ns: i64,
}

/// What a write stored.
#[derive(Debug, Default)]
pub struct WriteOutcome {
    pub lines_stored: usize,
    pub rejected: Vec<RejectedLine>,
}

/// A durable write, as handed to subscribers (continuous views build on this).
pub struct CommittedWrite<'a> {
    pub database: &'a str,
    pub seq: u64,
    /// Per table, the rows this write added (with `_seq`).
    pub tables: Vec<(&'a str, &'a RecordBatch)>,
}

pub type Subscriber = Arc<dyn Fn(&CommittedWrite<'_>) + Send + Sync>;

type TableKey = (String, String);

/// A table's rows: buffered partitions and the Parquet files of persisted ones.
#[derive(Default)]
pub struct TableData {
    pub buffer: TableBuffer,
    pub files: Vec<Arc<ParquetFile>>,
    /// Set by a drop: the buffer's bytes are no longer counted and a persist still running
    /// must delete what it wrote.
    pub dropped: bool,
    /// The table's last-value cache, once a query asked for it: every applied write is folded
    /// in; `ready` once a build from a snapshot of everything before has been merged in.
    pub last: Option<LastCache>,
}

#[derive(Default)]
pub struct LastCache {
    pub values: LastValues,
    pub ready: bool,
}

/// One partition's buffered rows as a query sees them.
pub struct PartitionSnapshot {
    pub partition_ns: i64,
    pub batches: Vec<RecordBatch>,
    pub overlap: bool,
}

/// A consistent view of a table for one query.
pub struct TableSnapshot {
    pub schema: Arc<TableSchema>,
    pub files: Vec<Arc<ParquetFile>>,
    pub partitions: Vec<PartitionSnapshot>,
}

pub struct Engine {
    config: Config,
    catalog: RwLock<Arc<Catalog>>,
    /// Serialises catalog changes (the check-then-grow step of writes).
    schema_lock: Mutex<()>,
    /// Writes and table creation hold it shared until their rows are applied; drops hold it
    /// exclusively, so a drop sees every earlier write applied and no later one started.
    write_gate: tokio::sync::RwLock<()>,
    tables: RwLock<HashMap<TableKey, Arc<RwLock<TableData>>>>,
    wal: Mutex<Option<Wal>>,
    wal_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    store: Store,
    manifest: tokio::sync::Mutex<Manifest>,
    buffered_bytes: AtomicUsize,
    applied_seq: AtomicU64,
    file_counter: AtomicU64,
    subscribers: RwLock<Vec<Subscriber>>,
    persist_wakeup: tokio::sync::Notify,
    /// Bytes of request bodies being parsed, built and logged at once (in KiB permits): parsed
    /// rows take a few times their text, so this bounds in-flight write memory.
    in_flight_kib: tokio::sync::Semaphore,
}

/// KiB of request bodies that may be in flight: a quarter of the buffer limit, at least 64 MiB.
fn in_flight_kib_max(buffer_bytes_max: usize) -> usize {
    (buffer_bytes_max / 4).max(64 << 20) >> 10
}

/// The WAL payload of a line-protocol write (layout in `storage-format/wal.md`).
struct LpRecord<'a> {
    precision: Precision,
    default_time_ns: i64,
    database: &'a str,
    lines: &'a [u8],
}

impl<'a> LpRecord<'a> {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 + self.database.len() + self.lines.len());
        out.push(self.precision.code());
        out.extend_from_slice(&self.default_time_ns.to_le_bytes());
        let db_len =
            u16::try_from(self.database.len()).expect("database names are at most NAME_BYTES_MAX");
        out.extend_from_slice(&db_len.to_le_bytes());
        out.extend_from_slice(self.database.as_bytes());
        out.extend_from_slice(self.lines);
        out
    }

    fn decode(payload: &'a [u8]) -> Result<LpRecord<'a>, String> {
        if payload.len() < 11 {
            return Err("line protocol record shorter than its header".into());
        }
        let precision = Precision::from_code(payload[0]).ok_or("unknown precision code")?;
        let default_time_ns = i64::from_le_bytes(payload[1..9].try_into().expect("8 bytes"));
        let db_len = u16::from_le_bytes(payload[9..11].try_into().expect("2 bytes")) as usize;
        let database = payload.get(11..11 + db_len).ok_or("database name runs past the record")?;
        let database = std::str::from_utf8(database).map_err(|_| "database name is not UTF-8")?;
        Ok(LpRecord { precision, default_time_ns, database, lines: &payload[11 + db_len..] })
    }
}

/// Lines checked against a catalog and turned into rows.
struct Prepared {
    wal_lines: Vec<u8>,
    rejected: Vec<RejectedLine>,
    /// New columns (and tables) these lines need, per table.
    additions: BTreeMap<String, Vec<Column>>,
    rows: RowsBuilder,
}

const ORIGINAL_LINE_BYTES_MAX: usize = 1024;

/// Checks and builds the lines of `body`; lines of tables for which `skip` says so are left
/// out silently (replay skips the rows of dropped tables that way).
fn prepare(
    catalog: &Catalog,
    db: &str,
    body: &[u8],
    precision: Precision,
    default_time_ns: i64,
    partition_ns: i64,
    skip: &dyn Fn(&str) -> bool,
) -> Prepared {
    let mut prepared = Prepared {
        wal_lines: Vec::with_capacity(body.len()),
        rejected: Vec::new(),
        additions: BTreeMap::new(),
        rows: RowsBuilder::new(partition_ns),
    };
    let mut line = Line::default();
    let empty_tables: &mut HashMap<String, TableSchema> = &mut HashMap::new();
    let mut new_tables = 0usize;
    for (number, bytes) in line_protocol::lines(body) {
        let parsed = line_protocol::parse_line(number, bytes, &mut line).map_err(|e| e.to_string());
        if parsed.is_ok() && skip(line.measurement.as_ref()) {
            continue;
        }
        let outcome = parsed.and_then(|()| {
            let name = line.measurement.as_ref();
            catalog::check_object_name("table", name)?;
            let schema = match catalog.table(db, name) {
                Some(schema) => schema.as_ref(),
                None => &*empty_tables
                    .entry(name.to_string())
                    .or_insert_with(|| TableSchema::new(name, Vec::new())),
            };
            let pending = prepared.additions.get(name).map_or(&[][..], |v| v.as_slice());
            let added = schema.check_line(&line, pending)?;
            let time_ns = match line.timestamp {
                None => default_time_ns,
                Some(t) => precision.to_nanos(t).ok_or_else(|| {
                    format!("timestamp {t} is out of range for precision {precision:?}")
                })?,
            };
            if catalog.table(db, name).is_none() && !prepared.additions.contains_key(name) {
                if catalog.table_count(db) + new_tables >= catalog::TABLES_PER_DATABASE_MAX {
                    return Err(format!(
                        "database would exceed {} tables",
                        catalog::TABLES_PER_DATABASE_MAX
                    ));
                }
                new_tables += 1;
            }
            Ok((added, time_ns))
        });
        match outcome {
            Ok((added, time_ns)) => {
                if !added.is_empty() {
                    match prepared.additions.get_mut(line.measurement.as_ref()) {
                        Some(columns) => columns.extend(added),
                        None => {
                            prepared.additions.insert(line.measurement.to_string(), added);
                        }
                    }
                }
                prepared.rows.push(&line, time_ns);
                prepared.wal_lines.extend_from_slice(bytes);
                prepared.wal_lines.push(b'\n');
            }
            Err(error_message) => {
                let mut original = String::from_utf8_lossy(bytes).into_owned();
                if original.len() > ORIGINAL_LINE_BYTES_MAX {
                    let mut cut = ORIGINAL_LINE_BYTES_MAX;
                    while !original.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    original.truncate(cut);
                }
                prepared.rejected.push(RejectedLine {
                    line_number: number,
                    original_line: original,
                    error_message,
                });
            }
        }
    }
    prepared
}

/// Applies a batch's additions to `catalog`; `false` if one conflicts (another write won a race).
fn grow_catalog(
    catalog: &mut Catalog,
    db: &str,
    additions: &BTreeMap<String, Vec<Column>>,
) -> bool {
    for (table, columns) in additions {
        if let Some(existing) = catalog.table(db, table) {
            if existing.conflicts_with(columns) {
                return false;
            }
        }
    }
    catalog.create_database(db);
    for (table, columns) in additions {
        let next = match catalog.table(db, table) {
            Some(existing) if columns.iter().all(|c| existing.column(&c.name).is_some()) => {
                continue
            }
            Some(existing) => existing.with_columns(columns),
            None => TableSchema::new(table.clone(), columns.clone()),
        };
        catalog.put_table(db, next);
    }
    true
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("data_dir", &self.config.data_dir).finish_non_exhaustive()
    }
}

impl Engine {
    /// Opens the data directory: loads the manifest, replays the WAL, starts the WAL writer.
    pub async fn open(config: Config) -> Result<Arc<Engine>, Error> {
        let startup =
            |what: &str, e: &dyn std::fmt::Display| Error::Startup(format!("{what}: {e}"));
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| startup("creating the data directory", &e))?;
        let data_dir = std::fs::canonicalize(&config.data_dir)
            .map_err(|e| startup("resolving the data directory", &e))?;
        let url = match &config.object_store_url {
            Some(url) => url.clone(),
            None => url::Url::from_directory_path(data_dir.join("objects"))
                .map_err(|()| Error::Startup("data directory is not an absolute path".into()))?
                .to_string(),
        };
        let store = Store::open(&url).map_err(|e| startup("opening the object store", &e))?;
        let manifest =
            Manifest::load(store.clone()).await.map_err(|e| startup("loading the manifest", &e))?;

        let mut catalog = Catalog::default();
        let mut tables: HashMap<TableKey, TableData> = HashMap::new();
        let mut persisted: HashMap<(String, String, i64), u64> = HashMap::new();
        for (db, state) in &manifest.state().databases {
            catalog.create_database(db);
            for (name, table) in &state.tables {
                catalog.put_table(db, TableSchema::new(name.clone(), table.columns.clone()));
                let floor = table.files.iter().map(|f| f.max_time_ns).max().unwrap_or(i64::MIN);
                for f in &table.files {
                    let watermark =
                        persisted.entry((db.clone(), name.clone(), f.partition_ns)).or_default();
                    *watermark = (*watermark).max(f.max_seq);
                }
                tables.insert(
                    (db.clone(), name.clone()),
                    TableData {
                        buffer: TableBuffer::new(floor),
                        files: table.files.iter().cloned().map(Arc::new).collect(),
                        dropped: false,
                        last: None,
                    },
                );
            }
        }

        let partition_ns = i64::try_from(config.partition.as_nanos()).unwrap_or(i64::MAX).max(1);
        let wal_config = wal::Config {
            dir: data_dir.join("wal"),
            segment_bytes_max: config.wal_segment_bytes_max,
            record_bytes_max: config.wal_record_bytes_max,
            queue_len_max: 256,
            sync: config.wal_sync,
        };
        let mut replayed_rows = 0usize;
        let replayed = wal::replay(&wal_config, |seq, kind, payload| {
            if kind != wal::KIND_LINE_PROTOCOL {
                return Err(format!("unknown record kind {kind}"));
            }
            let record = LpRecord::decode(payload)?;
            let dropped = |table: &str| seq <= manifest.state().dropped_seq(record.database, table);
            let prepared = prepare(
                &catalog,
                record.database,
                record.lines,
                record.precision,
                record.default_time_ns,
                partition_ns,
                &dropped,
            );
            if prepared.wal_lines.is_empty() && prepared.rejected.is_empty() {
                // Every line belonged to a table dropped since.
                return Ok(());
            }
            if let Some(bad) = prepared.rejected.first() {
                // Cannot happen for records this server wrote; refuse rather than drop data.
                return Err(format!(
                    "record {seq} no longer fits the catalog: line {}: {}",
                    bad.line_number, bad.error_message
                ));
            }
            if !grow_catalog(&mut catalog, record.database, &prepared.additions) {
                return Err(format!("record {seq} conflicts with the catalog"));
            }
            for pending in prepared.rows.finish() {
                let db = record.database.to_string();
                let watermark = persisted
                    .get(&(db.clone(), pending.table.clone(), pending.partition))
                    .copied()
                    .unwrap_or(0);
                if seq <= watermark {
                    continue;
                }
                let schema = catalog
                    .table(&db, &pending.table)
                    .expect("grown above")
                    .arrow_schema_with_seq()
                    .clone();
                let data = tables.entry((db, pending.table.clone())).or_insert_with(|| TableData {
                    buffer: TableBuffer::new(i64::MIN),
                    files: Vec::new(),
                    dropped: false,
                    last: None,
                });
                data.buffer.append(&pending, seq, &schema);
                replayed_rows += pending.batch.num_rows();
            }
            Ok(())
        })
        .map_err(|e| startup("replaying the WAL", &e))?;
        let next_seq = replayed.next_seq.max(manifest.state().wal_seq + 1);
        tracing::info!(
            records = replayed.records,
            rows = replayed_rows,
            truncated_bytes = replayed.truncated_bytes,
            next_seq,
            "wal replayed"
        );
        let (wal, wal_thread) =
            Wal::start(wal_config, next_seq).map_err(|e| startup("starting the WAL", &e))?;

        let buffered: usize = tables.values().map(|t| t.buffer.bytes()).sum();
        let file_counter = tables.values().map(|t| t.files.len() as u64).sum();
        let kib_max = in_flight_kib_max(config.buffer_bytes_max);
        let engine = Arc::new(Engine {
            config,
            catalog: RwLock::new(Arc::new(catalog)),
            schema_lock: Mutex::new(()),
            write_gate: tokio::sync::RwLock::new(()),
            tables: RwLock::new(
                tables.into_iter().map(|(k, v)| (k, Arc::new(RwLock::new(v)))).collect(),
            ),
            wal: Mutex::new(Some(wal)),
            wal_thread: Mutex::new(Some(wal_thread)),
            store,
            manifest: tokio::sync::Mutex::new(manifest),
            buffered_bytes: AtomicUsize::new(buffered),
            applied_seq: AtomicU64::new(next_seq - 1),
            file_counter: AtomicU64::new(file_counter),
            subscribers: RwLock::new(Vec::new()),
            persist_wakeup: tokio::sync::Notify::new(),
            in_flight_kib: tokio::sync::Semaphore::new(kib_max),
        });
        Ok(engine)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().expect("catalog lock").clone()
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes.load(Ordering::Relaxed)
    }

    fn partition_ns(&self) -> i64 {
        i64::try_from(self.config.partition.as_nanos()).unwrap_or(i64::MAX).max(1)
    }

    /// Registers a callback that sees every write once it is durable, in sequence order.
    pub fn subscribe(&self, subscriber: Subscriber) {
        self.subscribers.write().expect("subscribers lock").push(subscriber);
    }

    fn wal(&self) -> Result<Wal, Error> {
        self.wal.lock().expect("wal handle lock").clone().ok_or(Error::ShuttingDown)
    }

    fn table_data(&self, db: &str, table: &str) -> Option<Arc<RwLock<TableData>>> {
        self.tables.read().expect("tables lock").get(&(db.to_string(), table.to_string())).cloned()
    }

    /// Creates a database explicitly (a write creates it implicitly). `false` if it existed.
    pub async fn create_database(&self, db: &str) -> Result<bool, Error> {
        catalog::check_object_name("database", db).map_err(|reason| Error::InvalidName {
            what: "database",
            name: db.into(),
            reason,
        })?;
        if self.catalog().has_database(db) {
            return Ok(false);
        }
        let _gate = self.write_gate.read().await;
        let mut manifest = self.manifest.lock().await;
        if self.catalog().has_database(db) {
            return Ok(false);
        }
        manifest
            .commit(vec![Op::CreateDatabase { database: db.to_string() }])
            .await
            .map_err(crate::persist::Error::from)?;
        let _guard = self.schema_lock.lock().expect("schema lock");
        let mut catalog = self.catalog().as_ref().clone();
        catalog.create_database(db);
        *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        Ok(true)
    }

    /// Declares a table before any row is written (`CREATE TABLE`); `false` if it existed and
    /// `if_not_exists`. Its columns are recorded in the manifest, so they outlive the WAL.
    pub async fn create_table(
        &self,
        db: &str,
        table: &str,
        columns: Vec<Column>,
        if_not_exists: bool,
    ) -> Result<bool, Error> {
        let invalid = |what: &'static str, name: &str, reason: String| Error::InvalidName {
            what,
            name: name.into(),
            reason,
        };
        catalog::check_object_name("database", db).map_err(|r| invalid("database", db, r))?;
        catalog::check_object_name("table", table).map_err(|r| invalid("table", table, r))?;
        let _gate = self.write_gate.read().await;
        if !self.catalog().has_database(db) {
            return Err(Error::DatabaseNotFound(db.into()));
        }
        // Install the table first, atomically with the check, so a concurrent line-protocol
        // write either sees the declared columns or created the table first (and we stop).
        {
            let _guard = self.schema_lock.lock().expect("schema lock");
            if self.catalog().table(db, table).is_some() {
                return if if_not_exists {
                    Ok(false)
                } else {
                    Err(Error::TableExists(table.into()))
                };
            }
            let mut catalog = self.catalog().as_ref().clone();
            catalog.put_table(db, TableSchema::new(table, columns.clone()));
            self.tables
                .write()
                .expect("tables lock")
                .entry((db.to_string(), table.to_string()))
                .or_default();
            *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        }
        // Then make it durable. Should this fail, the table lives until restart, and rows
        // written to it meanwhile are in the WAL, which recreates it from their lines.
        let op = Op::CreateTable { database: db.into(), table: table.into(), columns };
        self.manifest.lock().await.commit(vec![op]).await.map_err(crate::persist::Error::from)?;
        Ok(true)
    }

    /// Drops a table: once this returns its rows, buffered or in files, are gone for good and
    /// a later write creates it afresh. `false` if it did not exist.
    pub async fn drop_table(&self, db: &str, table: &str) -> Result<bool, Error> {
        // Exclusive: every earlier write is applied (its rows are in the buffer, below `seq`),
        // and none starts until the drop is recorded and the table removed.
        let _gate = self.write_gate.write().await;
        if self.catalog().table(db, table).is_none() {
            return Ok(false);
        }
        let seq = self.applied_seq.load(Ordering::Acquire);
        let op = Op::DropTable { database: db.into(), table: table.into(), seq };
        let removed = self.commit_drop(op, db, Some(table)).await?;
        self.discard(removed).await;
        Ok(true)
    }

    /// Drops a database and every table in it. `false` if it did not exist.
    pub async fn drop_database(&self, db: &str) -> Result<bool, Error> {
        let _gate = self.write_gate.write().await;
        if !self.catalog().has_database(db) {
            return Ok(false);
        }
        let seq = self.applied_seq.load(Ordering::Acquire);
        let removed =
            self.commit_drop(Op::DropDatabase { database: db.into(), seq }, db, None).await?;
        self.discard(removed).await;
        Ok(true)
    }

    /// Records a drop in the manifest, then removes the table (or, with `None`, every table of
    /// the database) from the catalog and the live state, under the manifest lock: a persist
    /// racing the drop checks, under that lock, that its table is still the live one.
    async fn commit_drop(
        &self,
        op: Op,
        db: &str,
        table: Option<&str>,
    ) -> Result<Vec<Arc<RwLock<TableData>>>, Error> {
        let mut manifest = self.manifest.lock().await;
        manifest.commit(vec![op]).await.map_err(crate::persist::Error::from)?;
        let _guard = self.schema_lock.lock().expect("schema lock");
        let mut catalog = self.catalog().as_ref().clone();
        match table {
            Some(table) => catalog.drop_table(db, table),
            None => catalog.drop_database(db),
        };
        let mut tables = self.tables.write().expect("tables lock");
        let doomed: Vec<TableKey> = tables
            .keys()
            .filter(|(d, t)| d == db && table.is_none_or(|name| name == t))
            .cloned()
            .collect();
        let removed = doomed.iter().filter_map(|key| tables.remove(key)).collect();
        *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        Ok(removed)
    }

    /// Frees the buffers of dropped tables and deletes their files (a file left behind by a
    /// failed delete is named by no manifest, so nothing reads it).
    async fn discard(&self, removed: Vec<Arc<RwLock<TableData>>>) {
        let mut paths = Vec::new();
        for data in removed {
            let mut data = data.write().expect("table lock");
            data.dropped = true;
            self.buffered_bytes.fetch_sub(data.buffer.bytes(), Ordering::Relaxed);
            paths
                .extend(data.files.iter().map(|f| object_store::path::Path::from(f.path.as_str())));
        }
        for path in paths {
            if let Err(error) = self.store.delete(&path).await {
                tracing::warn!(%error, %path, "deleting a dropped table's file failed");
            }
        }
        if let Ok(wal) = self.wal() {
            if let Err(error) = wal.remove_segments_below(self.min_unpersisted_seq()) {
                tracing::warn!(%error, "removing wal segments failed");
            }
        }
    }

    /// Stores the lines of a line-protocol body. Returns once they are durable (or written,
    /// with `no_sync`), and visible to queries.
    pub async fn write_lp(
        self: &Arc<Self>,
        db: &str,
        body: &[u8],
        options: WriteOptions,
    ) -> Result<WriteOutcome, Error> {
        catalog::check_object_name("database", db).map_err(|reason| Error::InvalidName {
            what: "database",
            name: db.into(),
            reason,
        })?;
        if self.buffered_bytes() > self.config.buffer_bytes_max {
            self.persist_wakeup.notify_one();
            return Err(Error::BufferFull { bytes_max: self.config.buffer_bytes_max });
        }
        // Waits while other writes hold the budget; a body larger than all of it takes all of it.
        let kib = u32::try_from((body.len() >> 10) + 1)
            .unwrap_or(u32::MAX)
            .min(in_flight_kib_max(self.config.buffer_bytes_max) as u32);
        let _permit =
            self.in_flight_kib.acquire_many(kib).await.map_err(|_| Error::ShuttingDown)?;
        let partition_ns = self.partition_ns();
        let _gate = self.write_gate.read().await;
        let mut prepared = prepare(
            &self.catalog(),
            db,
            body,
            options.precision,
            options.default_time_ns,
            partition_ns,
            &|_| false,
        );
        let needs_growth = !self.catalog().has_database(db)
            || prepared.additions.values().any(|c| !c.is_empty())
            || prepared.additions.keys().any(|t| self.catalog().table(db, t).is_none());
        if needs_growth && !prepared.wal_lines.is_empty() {
            let _guard = self.schema_lock.lock().expect("schema lock");
            let mut catalog = self.catalog().as_ref().clone();
            if !grow_catalog(&mut catalog, db, &prepared.additions) {
                // Another write added a conflicting column meanwhile: check again, under the lock.
                prepared = prepare(
                    &catalog,
                    db,
                    body,
                    options.precision,
                    options.default_time_ns,
                    partition_ns,
                    &|_| false,
                );
                let grown = grow_catalog(&mut catalog, db, &prepared.additions);
                debug_assert!(grown, "lines checked under the schema lock cannot conflict");
            }
            if !prepared.rejected.is_empty() && !options.accept_partial {
                return Err(Error::Rejected(prepared.rejected));
            }
            let mut tables = self.tables.write().expect("tables lock");
            for table in prepared.additions.keys() {
                tables.entry((db.to_string(), table.clone())).or_default();
            }
            *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        }
        let Prepared { wal_lines, rejected, rows, .. } = prepared;
        if !rejected.is_empty() && !options.accept_partial {
            return Err(Error::Rejected(rejected));
        }
        if wal_lines.is_empty() {
            return if rejected.is_empty() {
                Ok(WriteOutcome::default())
            } else {
                Err(Error::Rejected(rejected))
            };
        }
        let lines_stored = rows.rows();
        let pending = rows.finish();
        let payload = LpRecord {
            precision: options.precision,
            default_time_ns: options.default_time_ns,
            database: db,
            lines: &wal_lines,
        }
        .encode();
        drop(wal_lines);
        let engine = self.clone();
        let database = db.to_string();
        let apply: wal::Apply = Box::new(move |seq| engine.apply(&database, seq, pending));
        self.wal()?
            .append(wal::KIND_LINE_PROTOCOL, payload, !options.no_sync, Some(apply))
            .await
            .map_err(Error::Wal)?;
        Ok(WriteOutcome { lines_stored, rejected })
    }

    /// A table's buffer went from `before` to `after` bytes.
    fn buffer_resized(&self, before: usize, after: usize) {
        if after >= before {
            self.buffered_bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.buffered_bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Runs on the WAL writer thread, in sequence order, once the record is durable.
    fn apply(&self, db: &str, seq: u64, pending: Vec<PendingBatch>) {
        let catalog = self.catalog();
        let mut appended = Vec::with_capacity(pending.len());
        for p in &pending {
            let Some(table) = self.table_data(db, &p.table) else {
                tracing::error!(db, table = %p.table, "table vanished before its rows were applied");
                continue;
            };
            let table_schema =
                catalog.table(db, &p.table).expect("tables are in the catalog before their rows");
            let schema = table_schema.arrow_schema_with_seq().clone();
            let mut data = table.write().expect("table lock");
            let before = data.buffer.bytes();
            let stored = data.buffer.append(p, seq, &schema);
            if let Some(cache) = data.last.as_mut() {
                cache.values.fold(table_schema, &stored);
            }
            let after = data.buffer.bytes();
            drop(data);
            self.buffer_resized(before, after);
            appended.push((p.table.as_str(), stored));
        }
        self.applied_seq.store(seq, Ordering::Release);
        let subscribers = self.subscribers.read().expect("subscribers lock");
        if !subscribers.is_empty() {
            let committed = CommittedWrite {
                database: db,
                seq,
                tables: appended.iter().map(|(t, b)| (*t, b)).collect(),
            };
            for subscriber in subscribers.iter() {
                subscriber(&committed);
            }
        }
        if self.buffered_bytes() > self.config.buffer_bytes_max / 4 {
            self.persist_wakeup.notify_one();
        }
    }

    /// A consistent view of one table, limited to partitions that may hold rows in
    /// `[min_time_ns, max_time_ns]`.
    pub fn snapshot(
        &self,
        db: &str,
        table: &str,
        min_time_ns: i64,
        max_time_ns: i64,
    ) -> Option<TableSnapshot> {
        let schema = self.catalog().table(db, table)?.clone();
        let data = self.table_data(db, table)?;
        let data = data.read().expect("table lock");
        let partition_ns = self.partition_ns();
        let lowest = crate::buffer::partition_of(min_time_ns, partition_ns);
        let partitions = data
            .buffer
            .partitions
            .range(lowest..=max_time_ns)
            .map(|(&partition_ns, p)| PartitionSnapshot {
                partition_ns,
                batches: p.persisting.iter().chain(p.batches.iter()).cloned().collect(),
                overlap: p.overlap || p.persisting_overlap,
            })
            .collect();
        let files = data
            .files
            .iter()
            .filter(|f| f.max_time_ns >= min_time_ns && f.min_time_ns <= max_time_ns)
            .cloned()
            .collect();
        Some(TableSnapshot { schema, files, partitions })
    }

    /// The latest point of every series of a table (see `buffer::last`), exactly as a query
    /// over all its rows would find it. The first call builds the cache from a snapshot of the
    /// buffer and the files while new writes fold into it; later calls answer from memory.
    pub async fn last_values(&self, db: &str, table: &str) -> Result<Option<RecordBatch>, Error> {
        let Some(data) = self.table_data(db, table) else { return Ok(None) };
        let Some(schema) = self.catalog().table(db, table).cloned() else { return Ok(None) };
        {
            // The common case, once built: answer under the read lock, so the WAL thread's
            // applies to this table wait for no query.
            let guard = data.read().expect("table lock");
            if let Some(cache) = guard.last.as_ref().filter(|c| c.ready) {
                return cache
                    .values
                    .to_batch(&schema)
                    .map(Some)
                    .map_err(|e| Error::Internal(e.to_string()));
            }
        }
        let (batches, files) = {
            let mut guard = data.write().expect("table lock");
            let cache = guard.last.get_or_insert_with(LastCache::default);
            if cache.ready {
                return cache
                    .values
                    .to_batch(&schema)
                    .map(Some)
                    .map_err(|e| Error::Internal(e.to_string()));
            }
            let batches: Vec<RecordBatch> = guard
                .buffer
                .partitions
                .values()
                .flat_map(|p| p.persisting.iter().chain(p.batches.iter()).cloned())
                .collect();
            (batches, guard.files.clone())
        };
        // Built concurrently by more than one query, each merge is still exact: folding is
        // order-independent and idempotent.
        let mut built = LastValues::default();
        for batch in &batches {
            built.fold(&schema, batch);
        }
        for file in files {
            let bytes = self
                .store
                .get(&object_store::path::Path::from(file.path.as_str()))
                .await
                .map_err(crate::persist::Error::from)?;
            let fold_schema = schema.clone();
            let partial = tokio::task::spawn_blocking(
                move || -> Result<LastValues, parquet::errors::ParquetError> {
                    let mut partial = LastValues::default();
                    for batch in
                        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                            bytes,
                        )?
                        .build()?
                    {
                        partial.fold(&fold_schema, &batch?);
                    }
                    Ok(partial)
                },
            )
            .await
            .map_err(|e| Error::Internal(format!("last-value cache task failed: {e}")))?
            .map_err(|e| {
                Error::Internal(format!("reading {} for the last-value cache: {e}", file.path))
            })?;
            built.merge(partial);
        }
        let mut guard = data.write().expect("table lock");
        let cache = guard.last.get_or_insert_with(LastCache::default);
        cache.values.merge(built);
        cache.ready = true;
        let schema = self.catalog().table(db, table).cloned().unwrap_or(schema);
        cache.values.to_batch(&schema).map(Some).map_err(|e| Error::Internal(e.to_string()))
    }

    /// Smallest sequence number whose rows are not all in Parquet yet.
    fn min_unpersisted_seq(&self) -> u64 {
        let in_flight = self.applied_seq.load(Ordering::Acquire) + 1;
        let tables: Vec<_> = self.tables.read().expect("tables lock").values().cloned().collect();
        tables
            .iter()
            .map(|t| t.read().expect("table lock").buffer.min_unpersisted_seq())
            .min()
            .unwrap_or(u64::MAX)
            .min(in_flight)
    }

    /// Writes the oldest buffered rows of a partition, at most an eighth of the buffer limit,
    /// to one Parquet file and commits it. `false` if there was nothing to write (or a persist
    /// of it is already running). Bounded chunks bound the memory a persist needs.
    pub async fn persist_partition(
        &self,
        db: &str,
        table: &str,
        partition_ns: i64,
    ) -> Result<bool, Error> {
        let Some(data) = self.table_data(db, table) else { return Ok(false) };
        let Some(schema) = self.catalog().table(db, table).cloned() else { return Ok(false) };
        let chunk_bytes = (self.config.buffer_bytes_max / 8).max(1 << 20);
        let Some((batches, overlap)) =
            data.write().expect("table lock").buffer.start_persist(partition_ns, chunk_bytes)
        else {
            return Ok(false);
        };
        let result =
            self.write_file(db, table, partition_ns, &schema, batches, overlap, &data).await;
        let orphan = {
            let mut guard = data.write().expect("table lock");
            match result {
                Ok(Some(file)) if guard.dropped => file,
                Ok(Some(file)) => {
                    let before = guard.buffer.bytes();
                    guard.buffer.finish_persist(partition_ns);
                    self.buffered_bytes.fetch_sub(before - guard.buffer.bytes(), Ordering::Relaxed);
                    guard.files.push(Arc::new(file));
                    drop(guard);
                    if let Ok(wal) = self.wal() {
                        match wal.remove_segments_below(self.min_unpersisted_seq()) {
                            Ok(0) => {}
                            Ok(n) => tracing::debug!(segments = n, "wal segments removed"),
                            Err(error) => {
                                tracing::warn!(%error, "removing persisted wal segments failed")
                            }
                        }
                    }
                    return Ok(true);
                }
                Ok(None) => {
                    // The table was dropped before the commit.
                    guard.buffer.abort_persist(partition_ns);
                    return Ok(false);
                }
                Err(error) => {
                    guard.buffer.abort_persist(partition_ns);
                    return Err(error);
                }
            }
        };
        // Committed just before a drop, which removed it from the manifest again.
        if let Err(error) =
            self.store.delete(&object_store::path::Path::from(orphan.path.as_str())).await
        {
            tracing::warn!(%error, path = %orphan.path, "deleting the file of a dropped table failed");
        }
        Ok(false)
    }

    /// Writes a Parquet file and commits it; `None` when the table was dropped meanwhile.
    #[allow(clippy::too_many_arguments)]
    async fn write_file(
        &self,
        db: &str,
        table: &str,
        partition_ns: i64,
        schema: &Arc<TableSchema>,
        batches: Vec<RecordBatch>,
        overlap: bool,
        data: &Arc<RwLock<TableData>>,
    ) -> Result<Option<ParquetFile>, Error> {
        let max_seq = crate::buffer::seq_bounds(&batches).map_or(0, |(_, hi)| hi);
        let encode_schema = schema.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            crate::persist::encode(&encode_schema, &batches, overlap)
        })
        .await
        .map_err(|e| Error::Internal(format!("persist task failed: {e}")))??;
        let n = self.file_counter.fetch_add(1, Ordering::Relaxed);
        let path = crate::persist::file_path(db, table, partition_ns, max_seq, n);
        let bytes = encoded.bytes.len() as u64;
        self.store.put(&path, encoded.bytes).await.map_err(crate::persist::Error::from)?;
        crate::crash_point("persist_after_parquet_write");
        let file = ParquetFile {
            path: path.to_string(),
            partition_ns,
            min_time_ns: encoded.min_time_ns,
            max_time_ns: encoded.max_time_ns,
            rows: encoded.rows,
            bytes,
            max_seq,
            overlap,
        };
        let op = Op::AddFile {
            database: db.into(),
            table: table.into(),
            columns: schema.columns().to_vec(),
            file: file.clone(),
        };
        let mut manifest = self.manifest.lock().await;
        if !self.table_data(db, table).is_some_and(|live| Arc::ptr_eq(&live, data)) {
            drop(manifest);
            if let Err(error) = self.store.delete(&path).await {
                tracing::warn!(%error, %path, "deleting the file of a dropped table failed");
            }
            return Ok(None);
        }
        manifest.commit(vec![op]).await.map_err(crate::persist::Error::from)?;
        drop(manifest);
        crate::crash_point("persist_after_manifest_commit");
        tracing::debug!(db, table, path = %file.path, rows = file.rows, bytes, "partition persisted");
        Ok(Some(file))
    }

    /// Sorts runs of buffered batches by series (see `buffer::sort`), one run at a time on a
    /// blocking thread, so queries for a few series find their rows by binary search. A run
    /// that a persist or a merge moved meanwhile is left as it was. Returns the runs sorted.
    pub async fn sort_buffers(&self) -> Result<usize, Error> {
        let tables: Vec<_> = self
            .tables
            .read()
            .expect("tables lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut sorted_runs = 0;
        for ((db, table), data) in tables {
            loop {
                let Some((partition, start, run)) =
                    data.read().expect("table lock").buffer.unsorted_run(self.config.sort_rows_min)
                else {
                    break;
                };
                let Some(schema) =
                    self.catalog().table(&db, &table).map(|t| t.arrow_schema_with_seq().clone())
                else {
                    break;
                };
                let inputs = run.clone();
                let sorted = tokio::task::spawn_blocking(move || {
                    crate::buffer::sort::sort_by_series(&inputs, &schema)
                })
                .await
                .map_err(|e| Error::Internal(format!("sorting task: {e}")))?
                .map_err(|e| Error::Internal(format!("sorting buffered rows: {e}")))?;
                let mut guard = data.write().expect("table lock");
                if guard.dropped {
                    break;
                }
                let before = guard.buffer.bytes();
                if !guard.buffer.replace_run(partition, start, &run, sorted) {
                    break;
                }
                let after = guard.buffer.bytes();
                drop(guard);
                self.buffer_resized(before, after);
                sorted_runs += 1;
            }
        }
        Ok(sorted_runs)
    }

    /// Buffered partitions, largest first: (db, table, partition, bytes).
    fn buffered_partitions(&self) -> Vec<(String, String, i64, usize)> {
        let tables: Vec<_> = self
            .tables
            .read()
            .expect("tables lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::new();
        for ((db, table), data) in tables {
            for (&partition, p) in &data.read().expect("table lock").buffer.partitions {
                if !p.batches.is_empty() {
                    out.push((db.clone(), table.clone(), partition, p.bytes));
                }
            }
        }
        out.sort_by_key(|p| std::cmp::Reverse(p.3));
        out
    }

    /// Persists every buffered partition, chunk by chunk: what was buffered when it started,
    /// not what keeps arriving meanwhile.
    pub async fn persist_all(&self) -> Result<usize, Error> {
        let chunk_bytes = (self.config.buffer_bytes_max / 8).max(1 << 20);
        let partitions = self.buffered_partitions();
        let rounds = partitions.len() + self.buffered_bytes() / chunk_bytes + 1;
        let mut written = 0;
        for _ in 0..rounds {
            let mut progress = false;
            for (db, table, partition, _) in self.buffered_partitions() {
                if partitions.iter().any(|(d, t, p, _)| *d == db && *t == table && *p == partition)
                    && self.persist_partition(&db, &table, partition).await?
                {
                    written += 1;
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
        Ok(written)
    }

    /// Persists chunks of the largest partitions until the buffer is under `bytes_target`.
    async fn persist_down_to(&self, bytes_target: usize) -> Result<(), Error> {
        while self.buffered_bytes() > bytes_target {
            let Some((db, table, partition, _)) = self.buffered_partitions().into_iter().next()
            else {
                break;
            };
            if !self.persist_partition(&db, &table, partition).await? {
                break;
            }
        }
        Ok(())
    }

    /// Background persistence: everything every `persist_interval`; the largest partitions
    /// whenever the buffer passes a quarter of its limit.
    pub async fn persist_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last_full = Instant::now();
        let high_water = self.config.buffer_bytes_max / 4;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.persist_wakeup.notified() => {}
            }
            let result = if last_full.elapsed() >= self.config.persist_interval {
                last_full = Instant::now();
                self.persist_all().await.map(|_| ())
            } else if self.buffered_bytes() > high_water {
                self.persist_down_to(high_water / 2).await
            } else {
                Ok(())
            };
            if let Err(error) = result {
                tracing::error!(%error, "persist failed; rows stay buffered and in the WAL");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if let Err(error) = self.sort_buffers().await {
                tracing::error!(%error, "sorting buffered rows failed; they stay as they were");
            }
        }
    }

    /// Stops the WAL: queued writes finish, the log is synced, the writer thread exits.
    pub fn close(&self) {
        self.wal.lock().expect("wal handle lock").take();
        if let Some(handle) = self.wal_thread.lock().expect("wal thread lock").take() {
            // The writer exits once the last sender (held by in-flight writes) is gone.
            if handle.join().is_err() {
                tracing::error!("wal writer thread panicked");
            }
        }
    }
}
