//! When and what the engine persists (`crate::persist` does the encoding and the storage): a
//! partition's oldest buffered rows, in bounded chunks, become one Parquet file committed to
//! the manifest; then the buffer lets go of them and WAL segments holding nothing unpersisted
//! are deleted. `persist_all` writes everything buffered (on a timer and at shutdown),
//! `persist_down_to` the largest partitions under memory pressure; `jobs` runs them.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use arrow::record_batch::RecordBatch;

use super::{Engine, Error, TableData};
use crate::catalog::{ParquetFile, TableSchema};
use crate::persist::manifest::Op;

impl Engine {
    /// Smallest sequence number whose rows are not all in Parquet yet.
    pub(super) fn min_unpersisted_seq(&self) -> u64 {
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
    pub(crate) async fn persist_partition(
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
            crate::persist::delete_file(&self.store, &crate::persist::location(&orphan)).await
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
        let ids = {
            let mut manifest = self.manifest.lock().await;
            // Under the manifest lock, as a drop commits: a dropped table gets no ids (which
            // would record it again).
            if !self.table_data(db, table).is_some_and(|live| Arc::ptr_eq(&live, data)) {
                return Ok(None);
            }
            // A fenced server writes nothing more to the store.
            manifest.check_fenced().map_err(crate::persist::Error::from)?;
            manifest
                .table_ids(db, table, schema.columns())
                .await
                .map_err(crate::persist::Error::from)?
        };
        let n = self.file_counter.fetch_add(1, Ordering::Relaxed);
        let path = crate::persist::file_path(ids, partition_ns, max_seq, n, &self.wal_id);
        let bytes = encoded.bytes.len() as u64;
        crate::persist::put_file(&self.store, &path, encoded.bytes).await?;
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
            wal: Some(self.wal_id.clone()),
            level: 0,
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
            if let Err(error) = crate::persist::delete_file(&self.store, &path).await {
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

    /// Buffered partitions, largest first: (db, table, partition, bytes).
    fn buffered_partitions(&self) -> Vec<(String, String, i64, usize)> {
        let tables = self.all_tables();
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
    pub(super) async fn persist_down_to(&self, bytes_target: usize) -> Result<(), Error> {
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
}
