//! A local disk cache of Parquet files for a remote object store (S3), bounded in bytes.
//!
//! Files never change once written (their paths are made of ids and sequence numbers, and a
//! rewrite gets a new path), so a cached copy is never stale: it is the file, and it stays
//! until evicted (least recently used first) or the file is deleted. A file enters the cache
//! when this server writes it (write-through from persistence) or when a query first reads it
//! (a background download, at most two at once, while that first query reads its ranges from
//! the store; later queries read the local copy with `pread`). Downloads go to a temporary name
//! and are renamed into place, so a crash leaves no partial file under a real name; temporary
//! files are removed at start, and the index is rebuilt from the directory.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use tokio::io::AsyncWriteExt;

/// Suffix of a download in progress.
const PARTIAL: &str = ".partial";

/// Parquet files downloaded into the cache at once.
const DOWNLOADS_MAX: usize = 2;

#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    bytes_max: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    bytes: u64,
    /// Logical clock for recency: bumped on every use.
    clock: u64,
    /// Objects being downloaded now.
    filling: HashSet<String>,
    hits: u64,
    misses: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    used: u64,
}

/// Counters, for `system.object_cache` and tests.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub files: u64,
    pub bytes: u64,
    pub bytes_max: u64,
    pub hits: u64,
    pub misses: u64,
}

impl Cache {
    /// Opens (creating) the cache directory and indexes the files already in it, oldest
    /// modification first as least recently used; removes partial downloads.
    pub fn open(dir: &Path, bytes_max: u64) -> std::io::Result<Cache> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(current) = pending.pop() {
            for entry in std::fs::read_dir(&current)? {
                let entry = entry?;
                let path = entry.path();
                let meta = entry.metadata()?;
                if meta.is_dir() {
                    pending.push(path);
                } else if path.to_string_lossy().ends_with(PARTIAL) {
                    let _ = std::fs::remove_file(&path);
                } else if let Ok(relative) = path.strip_prefix(dir) {
                    let modified = meta.modified().ok();
                    found.push((modified, relative.to_string_lossy().into_owned(), meta.len()));
                }
            }
        }
        found.sort();
        let cache = Cache { dir: dir.to_path_buf(), bytes_max, state: Mutex::default() };
        {
            let mut state = cache.lock();
            for (_, key, bytes) in found {
                state.clock += 1;
                let used = state.clock;
                state.bytes += bytes;
                state.entries.insert(key, Entry { bytes, used });
            }
        }
        cache.evict(None);
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing under this lock can panic but an allocation failure; a poisoned lock still
        // holds a consistent index (each update is one insert or remove).
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The local copy of `key`, marking it used; `None` (a miss) if it is not cached.
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        match state.entries.get_mut(key) {
            Some(entry) => {
                entry.used = clock;
                state.hits += 1;
                Some(self.dir.join(key))
            }
            None => {
                state.misses += 1;
                None
            }
        }
    }

    /// Claims the download of `key`: false if it is cached, being downloaded, or too large
    /// for the cache.
    pub fn begin_fill(&self, key: &str, bytes: u64) -> bool {
        // `bytes` may be 0 when not known yet; the download checks it again.
        let mut state = self.lock();
        if bytes > self.bytes_max || state.entries.contains_key(key) {
            return false;
        }
        state.filling.insert(key.to_string())
    }

    /// Ends a claim without a file (the download failed).
    pub fn abandon_fill(&self, key: &str) {
        self.lock().filling.remove(key);
    }

    /// Where a download of `key` is written before `commit_fill` renames it into place.
    pub fn partial_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}{PARTIAL}"))
    }

    /// Moves a finished download into place and indexes it, evicting others to make room.
    pub fn commit_fill(&self, key: &str) -> std::io::Result<()> {
        let result = self.install(key, &self.partial_path(key));
        self.abandon_fill(key);
        result
    }

    /// Writes `bytes` as the cached copy of `key` (write-through after a persist).
    pub fn insert(&self, key: &str, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.len() as u64 > self.bytes_max {
            return Ok(());
        }
        let partial = self.partial_path(key);
        if let Some(parent) = partial.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&partial, bytes)?;
        self.install(key, &partial)
    }

    fn install(&self, key: &str, partial: &Path) -> std::io::Result<()> {
        let bytes = std::fs::metadata(partial)?.len();
        std::fs::rename(partial, self.dir.join(key))?;
        {
            let mut state = self.lock();
            state.clock += 1;
            let used = state.clock;
            if let Some(old) = state.entries.insert(key.to_string(), Entry { bytes, used }) {
                state.bytes = state.bytes.saturating_sub(old.bytes);
            }
            state.bytes += bytes;
        }
        self.evict(Some(key));
        Ok(())
    }

    /// Forgets and deletes the copy of `key` (the file was deleted from the store).
    pub fn remove(&self, key: &str) {
        let removed = {
            let mut state = self.lock();
            let removed = state.entries.remove(key);
            if let Some(entry) = removed {
                state.bytes = state.bytes.saturating_sub(entry.bytes);
            }
            removed.is_some()
        };
        if removed {
            let _ = std::fs::remove_file(self.dir.join(key));
        }
    }

    /// Deletes least recently used copies until the cache fits its limit, never `keep`. A
    /// reader that has the file open goes on reading it (the inode lives until closed).
    fn evict(&self, keep: Option<&str>) {
        let victims = {
            let mut state = self.lock();
            let mut order: Vec<(u64, String)> = state
                .entries
                .iter()
                .filter(|(key, _)| Some(key.as_str()) != keep)
                .map(|(key, entry)| (entry.used, key.clone()))
                .collect();
            order.sort_unstable();
            let mut victims = Vec::new();
            for (_, key) in order {
                if state.bytes <= self.bytes_max {
                    break;
                }
                if let Some(entry) = state.entries.remove(&key) {
                    state.bytes = state.bytes.saturating_sub(entry.bytes);
                    victims.push(key);
                }
            }
            victims
        };
        for key in victims {
            let _ = std::fs::remove_file(self.dir.join(&key));
        }
    }

    pub fn stats(&self) -> Stats {
        let state = self.lock();
        Stats {
            files: state.entries.len() as u64,
            bytes: state.bytes,
            bytes_max: self.bytes_max,
            hits: state.hits,
            misses: state.misses,
        }
    }
}

/// A remote store seen through the cache: reads of a cached object are served from the local
/// copy (ranges, suffixes and heads alike, so Parquet footers and page indexes are read
/// locally too); a read of an object that is not cached goes to the remote store and starts a
/// background download of it. Everything else goes to the remote store. This is the store
/// queries read through (registered with DataFusion).
#[derive(Debug)]
pub struct CachedStore {
    remote: Arc<dyn ObjectStore>,
    cache: Arc<Cache>,
    local: LocalFileSystem,
    downloads: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Display for CachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CachedStore({})", self.remote)
    }
}

impl CachedStore {
    pub fn new(remote: Arc<dyn ObjectStore>, cache: Arc<Cache>) -> object_store::Result<Self> {
        let local = LocalFileSystem::new_with_prefix(&cache.dir)?;
        let downloads = Arc::new(tokio::sync::Semaphore::new(DOWNLOADS_MAX));
        Ok(CachedStore { remote, cache, local, downloads })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The cached copy of `location`, if there is one; a miss starts a background download
    /// of `bytes` (when cacheable: a Parquet file under `data/`).
    pub fn local_file(self: &Arc<Self>, location: &object_store::path::Path) -> Option<PathBuf> {
        let found = self.cache.path(location.as_ref());
        if found.is_none() {
            self.prefetch(location);
        }
        found
    }

    /// Downloads an object into the cache in the background, unless it is there, already on
    /// its way, too large, or not a Parquet file.
    fn prefetch(self: &Arc<Self>, location: &object_store::path::Path) {
        if !is_data(location) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let key = location.to_string();
        // The size is checked again once known; claim now so one download runs per file.
        if !self.cache.begin_fill(&key, 0) {
            return;
        }
        let this = self.clone();
        let location = location.clone();
        runtime.spawn(async move {
            let Ok(_permit) = this.downloads.clone().acquire_owned().await else {
                this.cache.abandon_fill(&key);
                return;
            };
            if let Err(error) = this.download(&location).await {
                this.cache.abandon_fill(&key);
                let _ = tokio::fs::remove_file(this.cache.partial_path(&key)).await;
                tracing::warn!(%error, %location, "caching a file failed; it is read remotely");
            }
        });
    }

    /// Streams an object to its partial file and moves it into place.
    async fn download(&self, location: &object_store::path::Path) -> std::io::Result<()> {
        let key = location.to_string();
        let partial = self.cache.partial_path(&key);
        let result = self.remote.get_opts(location, GetOptions::default()).await;
        let result = result.map_err(std::io::Error::other)?;
        if result.meta.size > self.cache.bytes_max {
            self.cache.abandon_fill(&key);
            return Ok(());
        }
        if let Some(parent) = partial.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let mut file = tokio::fs::File::create(&partial).await?;
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk.map_err(std::io::Error::other)?).await?;
        }
        file.flush().await?;
        drop(file);
        self.cache.commit_fill(&key)
    }

    /// Writes a Parquet file this server just stored remotely into the cache.
    pub fn write_through(&self, location: &object_store::path::Path, bytes: &[u8]) {
        if !is_data(location) {
            return;
        }
        if let Err(error) = self.cache.insert(location.as_ref(), bytes) {
            tracing::warn!(%error, %location, "writing a file to the cache failed");
        }
    }

    /// Reads a cached copy with `read`, or the remote object with `remote` (also when the
    /// copy went away between the lookup and the read: an eviction).
    async fn read<T, L, R>(
        &self,
        location: &object_store::path::Path,
        read: L,
        remote: R,
    ) -> object_store::Result<T>
    where
        L: std::future::Future<Output = object_store::Result<T>>,
        R: std::future::Future<Output = object_store::Result<T>>,
    {
        if self.cache.path(location.as_ref()).is_some() {
            match read.await {
                Ok(value) => return Ok(value),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        remote.await
    }
}

#[async_trait::async_trait]
impl ObjectStore for CachedStore {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.remote.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.remote.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let local = self.local.get_opts(location, options.clone());
        let remote = self.remote.get_opts(location, options);
        self.read(location, local, remote).await
    }

    async fn get_ranges(
        &self,
        location: &object_store::path::Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let local = self.local.get_ranges(location, ranges);
        let remote = self.remote.get_ranges(location, ranges);
        self.read(location, local, remote).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<object_store::path::Path>>,
    ) -> BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.remote.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.remote.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<ListResult> {
        self.remote.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.remote.copy_opts(from, to, options).await
    }
}

/// Whether an object is a Parquet file (under `data/`), the only objects the cache holds.
fn is_data(path: &object_store::path::Path) -> bool {
    path.parts().next().is_some_and(|part| part.as_ref() == "data")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 10).expect("open");
        cache.insert("data/1/a.parquet", b"aaaa").expect("a");
        cache.insert("data/1/b.parquet", b"bbbb").expect("b");
        assert!(cache.path("data/1/a.parquet").is_some(), "a is used after b");
        cache.insert("data/2/c.parquet", b"cccc").expect("c");
        assert!(cache.path("data/1/b.parquet").is_none(), "b was the least recently used");
        assert!(cache.path("data/1/a.parquet").is_some());
        assert!(!dir.path().join("data/1/b.parquet").exists(), "evicted copies are deleted");
        assert_eq!(cache.stats().bytes, 8);
        cache.insert("big.parquet", &[0u8; 11]).expect("too large is skipped");
        assert!(cache.path("big.parquet").is_none());

        std::fs::write(dir.path().join("data/2/d.parquet.partial"), b"half").expect("partial");
        drop(cache);
        let reopened = Cache::open(dir.path(), 10).expect("reopen");
        assert_eq!(reopened.stats().files, 2);
        assert!(reopened.path("data/2/c.parquet").is_some());
        assert!(!dir.path().join("data/2/d.parquet.partial").exists(), "partials are removed");
        reopened.remove("data/2/c.parquet");
        assert!(reopened.path("data/2/c.parquet").is_none());
        assert_eq!(reopened.stats().bytes, 4);
    }

    #[test]
    fn one_download_at_a_time_per_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 100).expect("open");
        assert!(cache.begin_fill("x", 5));
        assert!(!cache.begin_fill("x", 5), "already being downloaded");
        assert!(!cache.begin_fill("y", 101), "larger than the cache");
        std::fs::write(cache.partial_path("x"), b"12345").expect("write");
        cache.commit_fill("x").expect("commit");
        assert!(!cache.begin_fill("x", 5), "cached");
        assert!(cache.path("x").is_some());
    }
}
