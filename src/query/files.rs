//! How scans read Sundial's Parquet files: DataFusion's cached reader, with one change. Its
//! scans ask for footers without the page index and then load the page index separately,
//! uncached, for every query that prunes pages (in DataFusion 55, each such query re-reads
//! and decodes the column and offset indexes of every row group it keeps). Files never change
//! once written, so here the page index is requested with the footer and both stay in the
//! runtime's metadata cache.
//!
//! On a local directory the byte ranges are read with `pread` on the calling thread from a
//! file opened once per scan, instead of `object_store`'s open-and-read on a blocking thread
//! for every range: a one-host query reads a handful of small, usually page-cached ranges, and
//! each hop to the blocking pool and back cost more than the read. On a remote store (S3) the
//! same local reads serve files in the disk cache; a file not yet cached is read from the
//! store in ranged GETs (the Parquet reader coalesces nearby ranges) while the store downloads
//! it into the cache for the next query (`persist::store::Store::local_file`).

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::ParquetFileReaderFactory;
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, MetricBuilder};
use futures::future::BoxFuture;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};

#[derive(Debug)]
pub struct Readers {
    pub cached: CachedParquetFileReaderFactory,
    /// The store, which knows the local file of an object (its own, or a cached copy).
    pub store: crate::persist::store::Store,
}

impl ParquetFileReaderFactory for Readers {
    fn create_reader(
        &self,
        partition_index: usize,
        file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> datafusion::error::Result<Box<dyn AsyncFileReader + Send>> {
        // A location with percent-escapes names a file whose on-disk name differs; leave
        // those to the object store.
        let location = &file.object_meta.location;
        let plain = !location.as_ref().contains('%');
        let path = plain.then(|| self.store.local_file(location, file.object_meta.size)).flatten();
        let local = path.and_then(|path| {
            // A cached copy is opened now: were it evicted before the first read, the open
            // file still reads (and a failed open falls back to the store).
            let file = match self.store.is_remote() {
                true => Some(std::fs::File::open(&path).ok()?),
                false => None,
            };
            Some(LocalFile {
                path,
                file,
                bytes_scanned: MetricBuilder::new(metrics)
                    .with_new_label("filename", location.to_string())
                    .counter("bytes_scanned", partition_index),
            })
        });
        let inner =
            self.cached.create_reader(partition_index, file, metadata_size_hint, metrics)?;
        Ok(Box::new(Reader { inner, local }))
    }
}

struct LocalFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    bytes_scanned: Count,
}

impl LocalFile {
    fn read(&mut self, ranges: &[Range<u64>]) -> parquet::errors::Result<Vec<Bytes>> {
        let io = |e: std::io::Error| parquet::errors::ParquetError::External(Box::new(e));
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(std::fs::File::open(&self.path).map_err(io)?),
        };
        ranges
            .iter()
            .map(|range| {
                let mut buffer = vec![0u8; (range.end - range.start) as usize];
                file.read_exact_at(&mut buffer, range.start).map_err(io)?;
                self.bytes_scanned.add(buffer.len());
                Ok(Bytes::from(buffer))
            })
            .collect()
    }
}

struct Reader {
    inner: Box<dyn AsyncFileReader + Send>,
    local: Option<LocalFile>,
}

impl AsyncFileReader for Reader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        match &mut self.local {
            Some(local) => {
                let read = local
                    .read(std::slice::from_ref(&range))
                    .map(|mut parts| parts.pop().unwrap_or_default());
                Box::pin(std::future::ready(read))
            }
            None => self.inner.get_bytes(range),
        }
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        match &mut self.local {
            Some(local) => Box::pin(std::future::ready(local.read(&ranges))),
            None => self.inner.get_byte_ranges(ranges),
        }
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        let options =
            options.cloned().unwrap_or_default().with_page_index_policy(PageIndexPolicy::Optional);
        Box::pin(async move { self.inner.get_metadata(Some(&options)).await })
    }
}
