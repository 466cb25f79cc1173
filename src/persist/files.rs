//! A table's Parquet files in the object store: writing one (durably), reading one back whole,
//! decoding it batch by batch, deleting one. The engine reaches its files only through these
//! (it decides when; they do the I/O and the Parquet decoding).

use bytes::Bytes;
use object_store::path::Path;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::store::Store;
use super::Error;
use crate::catalog::ParquetFile;

/// The object path a manifest's file record names. The record holds the path as it is
/// stored (already percent-encoded where a part needed it, as paths of files written before
/// paths were made of ids may be), so it is parsed, never encoded a second time.
pub fn location(file: &ParquetFile) -> Path {
    Path::parse(&file.path).unwrap_or_else(|_| Path::from(file.path.as_str()))
}

/// Writes (or replaces) a file, as `encode` made it; returns once it is durable.
pub async fn put_file(store: &Store, path: &Path, bytes: Bytes) -> Result<(), Error> {
    Ok(store.put(path, bytes).await?)
}

/// Reads a whole file; decode it with `decode_file`.
pub async fn read_file(store: &Store, path: &Path) -> Result<Bytes, Error> {
    Ok(store.get(path).await?)
}

/// The record batches of a file `read_file` read, decoded one at a time as the reader is
/// iterated. CPU-heavy: run it off the I/O threads.
pub fn decode_file(
    bytes: Bytes,
) -> Result<ParquetRecordBatchReader, parquet::errors::ParquetError> {
    ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()
}

/// Deletes a file; one that is already gone is not an error.
pub async fn delete_file(store: &Store, path: &Path) -> Result<(), Error> {
    Ok(store.delete(path).await?)
}

/// Age below which a remote store's unnamed file may still be about to be committed.
const REMOTE_ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Deletes Parquet files no manifest record names: those a persist wrote before a crash or a
/// failed commit. Only files under id directories (`data/{n}/{n}/…`) are considered; paths
/// made of names (older stores) are left alone. Run at startup, before anything persists.
///
/// On a remote store only files older than `REMOTE_ORPHAN_AGE` go: another server wrongly
/// started on the same prefix may be between writing a file and committing it (it is fenced at
/// its next commit, but its file must not vanish before), so a crash's orphans there wait for a
/// later start.
pub async fn remove_orphans(store: &Store, named: &std::collections::HashSet<Path>) -> usize {
    let listed = match store.list_meta(&Path::from("data")).await {
        Ok(listed) => listed,
        Err(error) => {
            tracing::warn!(%error, "listing data files to remove orphans failed");
            return 0;
        }
    };
    let by_ids = |path: &Path| {
        let parts: Vec<_> = path.parts().collect();
        parts.len() == 5
            && parts[1..3].iter().all(|p| p.as_ref().bytes().all(|b| b.is_ascii_digit()))
            && parts[4].as_ref().ends_with(".parquet")
    };
    let cutoff =
        chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now() - REMOTE_ORPHAN_AGE);
    let old_enough =
        |meta: &object_store::ObjectMeta| !store.is_remote() || meta.last_modified < cutoff;
    let mut removed = 0;
    let orphans = listed
        .iter()
        .filter(|meta| old_enough(meta))
        .map(|meta| &meta.location)
        .filter(|p| by_ids(p) && !named.contains(*p));
    for path in orphans {
        match store.delete(path).await {
            Ok(()) => removed += 1,
            Err(error) => tracing::warn!(%error, %path, "deleting an orphan file failed"),
        }
    }
    removed
}
