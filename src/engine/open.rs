//! Startup recovery: the manifest gives the catalog (schemas) and each table's Parquet files,
//! then WAL replay rebuilds the buffer, skipping rows already in files (by each partition's
//! greatest persisted `max_seq`) and rows of tables dropped since; then the WAL writer starts
//! above every sequence number used before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};

use super::record::LpRecord;
use super::write::{grow_catalog, prepare};
use super::{in_flight_kib_max, Config, Engine, Error, TableData, TableKey};
use crate::buffer::TableBuffer;
use crate::catalog::{Catalog, TableSchema, ViewSpec};
use crate::persist::manifest::Manifest;
use crate::persist::store::Store;
use crate::wal::{self, Wal};

/// Why a WAL record cannot be replayed: startup stops rather than drop acknowledged rows.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error(transparent)]
    Record(#[from] super::record::RecordError),
    #[error("record {seq} no longer fits the catalog: line {line}: {reason}")]
    NoLongerFits { seq: u64, line: usize, reason: String },
    #[error("record {seq} conflicts with the catalog")]
    Conflicts { seq: u64 },
}

impl Engine {
    /// Opens the data directory: loads the manifest, replays the WAL, starts the WAL writer.
    pub async fn open(mut config: Config) -> Result<Arc<Engine>, Error> {
        let startup =
            |what: &str, e: &dyn std::fmt::Display| Error::Startup(format!("{what}: {e}"));
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| startup("creating the data directory", &e))?;
        let data_dir = std::fs::canonicalize(&config.data_dir)
            .map_err(|e| startup("resolving the data directory", &e))?;
        let wal_id = wal_id(&data_dir).map_err(|e| startup("reading the WAL id", &e))?;
        let url = match &config.object_store_url {
            Some(url) => url.clone(),
            None => url::Url::from_directory_path(data_dir.join("objects"))
                .map_err(|()| Error::Startup("data directory is not an absolute path".into()))?
                .to_string(),
        };
        let mut options = config.store.clone();
        options.cache_dir.get_or_insert_with(|| data_dir.join("cache"));
        let store =
            Store::open(&url, &options).map_err(|e| startup("opening the object store", &e))?;
        if store.is_remote() {
            store
                .check_conditional_writes()
                .await
                .map_err(|e| startup("checking the object store", &e))?;
        }
        let mut manifest =
            Manifest::load(store.clone()).await.map_err(|e| startup("loading the manifest", &e))?;
        config.partition = partition_duration(&mut manifest, config.partition)
            .await
            .map_err(|e| startup("recording the partition duration", &e))?;

        let named = manifest
            .state()
            .databases
            .values()
            .flat_map(|db| db.tables.values())
            .flat_map(|table| table.files.iter().map(crate::persist::location))
            .collect();
        let orphans = crate::persist::remove_orphans(&store, &named).await;
        if orphans > 0 {
            tracing::info!(files = orphans, "removed files no manifest commit names");
        }

        let mut catalog = Catalog::default();
        let mut tables: HashMap<TableKey, TableData> = HashMap::new();
        let mut persisted: HashMap<(String, String, i64), u64> = HashMap::new();
        for (db, state) in &manifest.state().databases {
            catalog.create_database(db);
            catalog.set_retention(db, None, state.retention);
            for (name, view) in &state.views {
                let spec = ViewSpec { name: name.clone(), id: view.id, sql: view.sql.clone() };
                catalog.put_view(db, spec);
            }
            for (name, table) in &state.tables {
                catalog.put_table(db, TableSchema::new(name.clone(), table.columns.clone()));
                catalog.set_retention(db, Some(name), table.retention);
                if let Some(before) = table.expired_before_ns {
                    catalog.set_expired_before(db, name, before);
                }
                let floor = table.files.iter().map(|f| f.max_time_ns).max().unwrap_or(i64::MIN);
                // Only files persisted from this WAL say which of its records are in them.
                for f in table.files.iter().filter(|f| f.wal.as_ref().is_none_or(|w| *w == wal_id))
                {
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

        let partition_ns = super::partition_ns(config.partition);
        let wal_config = wal::Config {
            dir: data_dir.join("wal"),
            segment_bytes_max: config.wal_segment_bytes_max,
            record_bytes_max: config.wal_record_bytes_max,
            queue_len_max: 256,
            sync: config.wal_sync,
        };
        let mut replayed_rows = 0usize;
        let now_ns = config.clock.now_ns();
        let replayed = wal::replay(&wal_config, |seq, kind, payload| {
            if kind != wal::KIND_LINE_PROTOCOL {
                return Err(ReplayError::UnknownKind(kind));
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
                crate::line_protocol::Strictness::Replay,
                now_ns,
            );
            if prepared.wal_lines.is_empty() && prepared.rejected.is_empty() {
                // Every line belonged to a table dropped since.
                return Ok(());
            }
            if let Some(bad) = prepared.rejected.lines.first() {
                // Cannot happen for records this server wrote; refuse rather than drop data.
                return Err(ReplayError::NoLongerFits {
                    seq,
                    line: bad.line_number,
                    reason: bad.error_message.clone(),
                });
            }
            if !grow_catalog(&mut catalog, record.database, &prepared.additions) {
                return Err(ReplayError::Conflicts { seq });
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
            write_gate: Arc::new(tokio::sync::RwLock::new(())),
            tables: RwLock::new(
                tables.into_iter().map(|(k, v)| (k, Arc::new(RwLock::new(v)))).collect(),
            ),
            wal: Mutex::new(Some(wal)),
            wal_thread: Mutex::new(Some(wal_thread)),
            store,
            wal_id,
            fenced: manifest.fenced(),
            manifest: tokio::sync::Mutex::new(manifest),
            buffered_bytes: AtomicUsize::new(buffered),
            applied_seq: AtomicU64::new(next_seq - 1),
            file_counter: AtomicU64::new(file_counter),
            subscribers: RwLock::new(Vec::new()),
            persist_wakeup: Arc::new(tokio::sync::Notify::new()),
            retention_wakeup: Arc::new(tokio::sync::Notify::new()),
            in_flight_kib: Arc::new(tokio::sync::Semaphore::new(kib_max)),
            compaction: Default::default(),
        });
        Ok(engine)
    }
}

/// The store's time partition width: the one its first start recorded, whatever the flag says
/// now (files, replay's skip marks and merges are all per partition, so a different width
/// would count persisted rows twice); recorded now if the store has none yet.
async fn partition_duration(
    manifest: &mut Manifest,
    configured: std::time::Duration,
) -> Result<std::time::Duration, crate::persist::manifest::Error> {
    let configured_ns = super::partition_ns(configured);
    match manifest.state().partition_ns {
        Some(stored) => {
            if stored != configured_ns {
                tracing::warn!(
                    configured = %humantime::format_duration(configured),
                    stored = %humantime::format_duration(std::time::Duration::from_nanos(stored as u64)),
                    "--partition-duration differs from the one this data directory was created \
                     with; keeping the stored one"
                );
            }
            Ok(std::time::Duration::from_nanos(stored as u64))
        }
        None => {
            let op =
                crate::persist::manifest::Op::SetPartitionDuration { partition_ns: configured_ns };
            manifest.commit(vec![op]).await?;
            Ok(configured)
        }
    }
}

/// The id of this data directory's WAL (`{data-dir}/wal-id`, made at the first start): 16
/// random hex digits. Files persisted from this WAL carry it (`ParquetFile::wal`), so a
/// replay skips records only by the files of its own WAL, never by another server's that
/// numbered its records the same way (two servers wrongly on one store, one of them fenced).
fn wal_id(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("wal-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if id.trim().len() == 16 && id.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
            return Ok(id.trim().to_string())
        }
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} does not hold a WAL id (16 hex digits)",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = hex::encode(crate::random_bytes::<8>());
    let partial = data_dir.join("wal-id.partial");
    std::fs::write(&partial, &id)?;
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, &path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(id)
}
