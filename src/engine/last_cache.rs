//! The engine side of the last-value cache (`buffer::last` does the folding): a table's cache
//! is built lazily, the first time a query asks, from a snapshot of its buffer and its files,
//! while every applied write folds into it (`Engine::apply`); later queries answer from memory.

use arrow::record_batch::RecordBatch;

use super::{Engine, Error, LastCache};
use crate::buffer::last::LastValues;

impl Engine {
    /// The latest point of every series of a table (see `buffer::last`), exactly as a query
    /// over all its rows would find it (rows past the table's retention left out). The first call builds the cache from a snapshot of the
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
                    .to_batch(&schema, self.cutoff(db, table))
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
                    .to_batch(&schema, self.cutoff(db, table))
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
            let bytes =
                crate::persist::read_file(&self.store, &crate::persist::location(&file)).await?;
            let fold_schema = schema.clone();
            let partial = tokio::task::spawn_blocking(
                move || -> Result<LastValues, parquet::errors::ParquetError> {
                    let mut partial = LastValues::default();
                    for batch in crate::persist::decode_file(bytes)? {
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
        cache
            .values
            .to_batch(&schema, self.cutoff(db, table))
            .map(Some)
            .map_err(|e| Error::Internal(e.to_string()))
    }
}
