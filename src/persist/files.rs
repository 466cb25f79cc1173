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
