//! The engine ties the write path together and owns the live state:
//!
//! write: parse lines → check them against a catalog snapshot → build Arrow rows (all on the
//! request's task) → grow the catalog under a short lock → WAL append; the WAL writer thread
//! applies rows to the buffer once durable, in sequence order, and hands them to subscribers.
//!
//! startup: manifest (schemas, files) → WAL replay, skipping rows already in files → buffer.
//!
//! persistence: a background job writes partitions to Parquet on a timer and under memory
//! pressure, then deletes WAL segments that hold nothing unpersisted; another sorts buffered
//! runs by series; a third compacts a partition's small or overlapping files into few.
//!
//! It holds no protocol knowledge: `http` and later `pg` call it.
//!
//! Files: `open` (startup recovery), `record` (the WAL payload), `write` (the write path),
//! `ddl` (creating and dropping databases and tables), `snapshot` and `last_cache` (what
//! queries read), `persist` (what to persist and when), `sort` (sorting buffered runs),
//! `compact` (what to compact and when), and `jobs` (the background-job scheduler that runs
//! persisting, sorting and compacting).

mod compact;
mod ddl;
mod jobs;
mod last_cache;
mod open;
mod persist;
mod record;
mod retention;
mod snapshot;
mod sort;
#[cfg(test)]
mod tests;
mod write;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arrow::record_batch::RecordBatch;

use crate::buffer::last::LastValues;
use crate::buffer::TableBuffer;
// `tests` takes this module's names with `use super::*`, `Column` among them.
#[cfg(test)]
use crate::catalog::Column;
use crate::catalog::{Catalog, ParquetFile};
use crate::line_protocol::Precision;
use crate::persist::manifest::Manifest;
use crate::persist::store::Store;
use crate::wal::{self, Wal};
use crate::ErrorKind;

pub use compact::{CompactionConfig, CompactionRecord};

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Where Parquet files and the manifest go; `None` means `file://{data_dir}/objects`.
    pub object_store_url: Option<String>,
    /// How a remote store is reached and cached (`cache_dir` `None`: `{data_dir}/cache`).
    pub store: crate::persist::store::Options,
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
    /// Where "now" comes from (the system clock; a manual one in tests).
    pub clock: Arc<dyn crate::clock::Clock>,
    pub compaction: CompactionConfig,
}

impl Config {
    pub fn for_tests(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            object_store_url: None,
            store: crate::persist::store::Options {
                cache_bytes_max: 1 << 30,
                request_timeout: Duration::from_secs(30),
                ..Default::default()
            },
            buffer_bytes_max: 64 << 20,
            partition: Duration::from_secs(86_400),
            persist_interval: Duration::from_secs(3600),
            wal_sync: true,
            wal_segment_bytes_max: 1 << 20,
            wal_record_bytes_max: 64 << 20,
            sort_rows_min: crate::buffer::SORT_ROWS_MIN,
            clock: Arc::new(crate::clock::SystemClock),
            compaction: CompactionConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} \"{name}\" is invalid: {reason}")]
    InvalidName { what: &'static str, name: String, reason: crate::catalog::Error },
    #[error("database \"{0}\" not found")]
    DatabaseNotFound(String),
    #[error("relation \"{0}\" already exists")]
    TableExists(String),
    #[error("table \"{0}\" does not exist")]
    TableNotFound(String),
    #[error("buffer memory limit of {bytes_max} bytes reached; persisting, retry shortly")]
    BufferFull { bytes_max: usize },
    #[error("database \"{database}\" would exceed {tables_max} tables")]
    TooManyTables { database: String, tables_max: usize },
    #[error("no line was accepted")]
    Rejected(Rejections),
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
            Error::DatabaseNotFound(_) | Error::TableNotFound(_) => ErrorKind::NotFound,
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

/// At most this many rejected lines are kept and reported per write; the rest are counted.
pub const REJECTED_LINES_MAX: usize = 100;

/// The lines of a write that were not stored: the first [`REJECTED_LINES_MAX`] of them, and
/// how many there were (a body of millions of bad lines gets a bounded answer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rejections {
    pub lines: Vec<RejectedLine>,
    pub total: usize,
}

impl Rejections {
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Counts a rejected line; `line` makes its report only while fewer than the limit are kept.
    pub fn push(&mut self, line: impl FnOnce() -> RejectedLine) {
        self.total += 1;
        if self.lines.len() < REJECTED_LINES_MAX {
            self.lines.push(line());
        }
    }

    /// "N lines rejected", saying how many are listed when not all are.
    pub fn summary(&self) -> String {
        if self.total > self.lines.len() {
            format!("{} lines rejected (the first {} listed)", self.total, self.lines.len())
        } else {
            format!("{} lines rejected", self.total)
        }
    }
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
    pub rejected: Rejections,
}

/// A durable change, as handed to subscribers (continuous views): rows a write added, or
/// tables a drop removed.
pub struct CommittedWrite<'a> {
    pub database: &'a str,
    pub seq: u64,
    /// Per table, the rows this write added (with `_seq`).
    pub tables: Vec<(&'a str, &'a RecordBatch)>,
    /// Tables whose rows are all gone (`DROP TABLE`, `DROP DATABASE`).
    pub dropped: Vec<&'a str>,
}

pub type Subscriber = Arc<dyn Fn(&CommittedWrite<'_>) + Send + Sync>;

type TableKey = (String, String);

/// A table's rows: buffered partitions and the Parquet files of persisted ones.
#[derive(Default)]
pub(crate) struct TableData {
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
pub(crate) struct LastCache {
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
    write_gate: Arc<tokio::sync::RwLock<()>>,
    tables: RwLock<HashMap<TableKey, Arc<RwLock<TableData>>>>,
    wal: Mutex<Option<Wal>>,
    wal_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    store: Store,
    manifest: tokio::sync::Mutex<Manifest>,
    /// This data directory's WAL id (`open::wal_id`), recorded in every file persisted from it.
    wal_id: String,
    /// Cancelled when another server committed to the same store (`Manifest::fenced`).
    fenced: tokio_util::sync::CancellationToken,
    buffered_bytes: AtomicUsize,
    applied_seq: AtomicU64,
    file_counter: AtomicU64,
    subscribers: RwLock<Vec<Subscriber>>,
    /// Wakes the "persist" job (`jobs`): a write found the buffer above its high-water mark.
    persist_wakeup: Arc<tokio::sync::Notify>,
    /// Wakes the "retention" job: a retention was set.
    retention_wakeup: Arc<tokio::sync::Notify>,
    /// Bytes of request bodies being parsed, built and logged at once (in KiB permits): parsed
    /// rows take a few times their text, so this bounds in-flight write memory.
    in_flight_kib: Arc<tokio::sync::Semaphore>,
    compaction: compact::CompactionState,
}

/// KiB of request bodies that may be in flight: a quarter of the buffer limit, at least 64 MiB.
fn in_flight_kib_max(buffer_bytes_max: usize) -> usize {
    (buffer_bytes_max / 4).max(64 << 20) >> 10
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("data_dir", &self.config.data_dir).finish_non_exhaustive()
    }
}

impl Engine {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Cancelled when another server has committed to this store: the server then stops.
    pub fn fenced(&self) -> tokio_util::sync::CancellationToken {
        self.fenced.clone()
    }

    /// The clock every "now" of the data path is read from.
    pub fn clock(&self) -> &dyn crate::clock::Clock {
        self.config.clock.as_ref()
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
        partition_ns(self.config.partition)
    }

    /// The sequence number of the last write applied to the buffer.
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq.load(Ordering::Acquire)
    }

    /// Registers a callback that sees every write once it is durable, in sequence order, and
    /// every dropped table (`CommittedWrite::dropped`), on the thread that made the change.
    pub fn subscribe(&self, subscriber: Subscriber) {
        self.subscribers.write().expect("subscribers lock").push(subscriber);
    }

    /// Why writes cannot be made durable right now (the WAL cannot write), if so.
    pub fn write_failure(&self) -> Option<String> {
        match self.wal() {
            Ok(wal) => wal.failure(),
            Err(e) => Some(e.to_string()),
        }
    }

    fn wal(&self) -> Result<Wal, Error> {
        self.wal.lock().expect("wal handle lock").clone().ok_or(Error::ShuttingDown)
    }

    /// Every table's data, taken out of the tables lock so each can be worked on alone.
    fn all_tables(&self) -> Vec<(TableKey, Arc<RwLock<TableData>>)> {
        let tables = self.tables.read().expect("tables lock");
        tables.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The Parquet files of every live table of `db` (for `system.files`), by table name.
    pub fn files_of(&self, db: &str) -> Vec<(String, Vec<Arc<ParquetFile>>)> {
        let mut out: Vec<_> = self
            .all_tables()
            .into_iter()
            .filter(|((d, _), _)| d == db)
            .filter_map(|((_, table), data)| {
                let data = data.read().ok()?;
                (!data.dropped).then(|| (table, data.files.clone()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn table_data(&self, db: &str, table: &str) -> Option<Arc<RwLock<TableData>>> {
        self.tables.read().expect("tables lock").get(&(db.to_string(), table.to_string())).cloned()
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

/// A partition width in nanoseconds (at least 1).
fn partition_ns(width: Duration) -> i64 {
    i64::try_from(width.as_nanos()).unwrap_or(i64::MAX).max(1)
}
