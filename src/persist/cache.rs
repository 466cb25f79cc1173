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
    /// Objects found larger than the whole cache: never downloaded again.
    too_large: HashSet<String>,
    hits: u64,
    misses: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    used: u64,
}

/// Counters, for `system.object_store` and tests.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub files: u64,
    pub bytes: u64,
    pub bytes_max: u64,
    pub hits: u64,
    pub misses: u64,
}

/// The file naming the store a cache directory caches; copies of another store's files are
/// deleted at open.
const MARKER: &str = "STORE";

impl Cache {
    /// Opens (creating) the cache directory for the store named `store`, and indexes the
    /// Parquet files already under its `data/`, oldest modification first as least recently
    /// used; removes partial downloads. Only `data/…/*.parquet` is ever indexed, served or
    /// evicted, so a cache directory shared with anything else deletes nothing else. A
    /// directory that holds `data/` but no marker (a local store's objects, say) is refused:
    /// its files are not copies of this store's.
    pub fn open(dir: &Path, bytes_max: u64, store: &str) -> std::io::Result<Cache> {
        std::fs::create_dir_all(dir)?;
        let marker = dir.join(MARKER);
        let data = dir.join("data");
        match std::fs::read_to_string(&marker) {
            Ok(named) if named == store => {}
            Ok(_) => {
                // A cache of another store (the flag changed): its copies are not ours.
                if data.exists() {
                    std::fs::remove_dir_all(&data)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if data.exists() {
                    return Err(std::io::Error::other(format!(
                        "{} holds data/ but is not a cache (no {MARKER} file); give the cache \
                         a directory of its own",
                        dir.display()
                    )));
                }
            }
            Err(e) => return Err(e),
        }
        write_synced(&marker, store.as_bytes())?;
        let mut found = Vec::new();
        let mut pending = vec![data.clone()];
        while let Some(current) = pending.pop() {
            let entries = match std::fs::read_dir(&current) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let path = entry.path();
                let meta = entry.metadata()?;
                let name = path.to_string_lossy();
                if meta.is_dir() {
                    pending.push(path);
                } else if name.ends_with(PARTIAL) {
                    let _ = std::fs::remove_file(&path);
                } else if name.ends_with(".parquet") {
                    if let Ok(relative) = path.strip_prefix(dir) {
                        let modified = meta.modified().ok();
                        let key = relative.to_string_lossy().into_owned();
                        found.push((modified, key, meta.len()));
                    }
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
            cache.evict(&mut state, None);
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing under this lock can panic but an allocation failure; a poisoned lock still
        // holds a consistent index (each update is one insert or remove).
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The local copy of `key` if it is cached with exactly `bytes` bytes, marking it used;
    /// `None` (a miss) otherwise. A copy of another size (cut short by a power loss, say) is
    /// deleted.
    pub fn path(&self, key: &str, bytes: u64) -> Option<PathBuf> {
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        match state.entries.get_mut(key) {
            Some(entry) if entry.bytes == bytes => {
                entry.used = clock;
                state.hits += 1;
                Some(self.dir.join(key))
            }
            Some(_) => {
                tracing::warn!(key, "a cached copy has the wrong size; deleting it");
                self.forget(&mut state, key);
                state.misses += 1;
                None
            }
            None => {
                state.misses += 1;
                None
            }
        }
    }

    /// Whether `key` is cached (counts nothing).
    pub fn contains(&self, key: &str) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// Claims the download of `key`: false if it is cached, being downloaded, or too large
    /// for the cache.
    pub fn begin_fill(&self, key: &str, bytes: u64) -> bool {
        let mut state = self.lock();
        if bytes > self.bytes_max {
            state.too_large.insert(key.to_string());
        }
        if state.too_large.contains(key) || state.entries.contains_key(key) {
            return false;
        }
        state.filling.insert(key.to_string())
    }

    /// Ends a claim without a file (the download failed, or found the object too large).
    pub fn abandon_fill(&self, key: &str, too_large: bool) {
        let mut state = self.lock();
        state.filling.remove(key);
        if too_large {
            state.too_large.insert(key.to_string());
        }
    }

    /// A fresh name to write a copy of `key` to before `install` renames it into place
    /// (unique, so a download and a write-through of one key never share one).
    pub fn partial_path(&self, key: &str) -> PathBuf {
        let nonce = u64::from_le_bytes(crate::random_bytes::<8>());
        self.dir.join(format!("{key}.{nonce:016x}{PARTIAL}"))
    }

    /// Moves a finished download into place and indexes it, evicting others to make room.
    pub fn commit_fill(&self, key: &str, partial: &Path) -> std::io::Result<()> {
        let result = self.install(key, partial);
        self.abandon_fill(key, false);
        if result.is_err() {
            let _ = std::fs::remove_file(partial);
        }
        result
    }

    /// Writes `bytes` as the cached copy of `key` (write-through after a persist). Any copy
    /// there was is dropped first, so a failure leaves none rather than an old one.
    pub fn insert(&self, key: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.remove(key);
        if bytes.len() as u64 > self.bytes_max {
            return Ok(());
        }
        let partial = self.partial_path(key);
        if let Some(parent) = partial.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let written = write_synced(&partial, bytes).and_then(|()| self.install(key, &partial));
        if written.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        written
    }

    /// Renames a synced copy into place and indexes it, under the lock, so the index and the
    /// directory agree at every moment (an eviction never deletes a copy just installed).
    fn install(&self, key: &str, partial: &Path) -> std::io::Result<()> {
        let bytes = std::fs::metadata(partial)?.len();
        let mut state = self.lock();
        std::fs::rename(partial, self.dir.join(key))?;
        state.clock += 1;
        let used = state.clock;
        if let Some(old) = state.entries.insert(key.to_string(), Entry { bytes, used }) {
            state.bytes = state.bytes.saturating_sub(old.bytes);
        }
        state.bytes += bytes;
        self.evict(&mut state, Some(key));
        Ok(())
    }

    /// Forgets and deletes the copy of `key` (the file was deleted from the store).
    pub fn remove(&self, key: &str) {
        let mut state = self.lock();
        self.forget(&mut state, key);
    }

    fn forget(&self, state: &mut State, key: &str) {
        if let Some(entry) = state.entries.remove(key) {
            state.bytes = state.bytes.saturating_sub(entry.bytes);
            let _ = std::fs::remove_file(self.dir.join(key));
        }
    }

    /// Deletes least recently used copies until the cache fits its limit, never `keep`. A
    /// reader that has the file open goes on reading it (the inode lives until closed).
    fn evict(&self, state: &mut State, keep: Option<&str>) {
        if state.bytes <= self.bytes_max {
            return;
        }
        let mut order: Vec<(u64, String)> = state
            .entries
            .iter()
            .filter(|(key, _)| Some(key.as_str()) != keep)
            .map(|(key, entry)| (entry.used, key.clone()))
            .collect();
        order.sort_unstable();
        for (_, key) in order {
            if state.bytes <= self.bytes_max {
                break;
            }
            self.forget(state, &key);
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

/// Writes a file and syncs it, so that a rename after it never leaves a short file under the
/// real name after a power loss.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()
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

    /// The cached copy of `location` (an object of `bytes` bytes), if there is one; a miss
    /// starts a background download (when cacheable: a Parquet file under `data/`).
    pub fn local_file(
        self: &Arc<Self>,
        location: &object_store::path::Path,
        bytes: u64,
    ) -> Option<PathBuf> {
        let found = self.cache.path(location.as_ref(), bytes);
        if found.is_none() {
            self.prefetch(location, bytes);
        }
        found
    }

    /// Downloads an object into the cache in the background, unless it is there, already on
    /// its way, too large, or not a Parquet file.
    fn prefetch(self: &Arc<Self>, location: &object_store::path::Path, bytes: u64) {
        if !is_data(location) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let key = location.to_string();
        if !self.cache.begin_fill(&key, bytes) {
            return;
        }
        let this = self.clone();
        let location = location.clone();
        runtime.spawn(async move {
            let Ok(_permit) = this.downloads.clone().acquire_owned().await else {
                this.cache.abandon_fill(&key, false);
                return;
            };
            if let Err(error) = this.download(&location).await {
                this.cache.abandon_fill(&key, false);
                tracing::warn!(%error, %location, "caching a file failed; it is read remotely");
            }
        });
    }

    /// Streams an object to a partial file, syncs it and moves it into place.
    async fn download(&self, location: &object_store::path::Path) -> std::io::Result<()> {
        let key = location.to_string();
        let result = self.remote.get_opts(location, GetOptions::default()).await;
        let result = result.map_err(std::io::Error::other)?;
        if result.meta.size > self.cache.bytes_max {
            self.cache.abandon_fill(&key, true);
            return Ok(());
        }
        let partial = self.cache.partial_path(&key);
        if let Some(parent) = partial.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let written = async {
            let mut file = tokio::fs::File::create(&partial).await?;
            let mut stream = result.into_stream();
            while let Some(chunk) = stream.next().await {
                file.write_all(&chunk.map_err(std::io::Error::other)?).await?;
            }
            file.sync_all().await
        }
        .await;
        if let Err(error) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(error);
        }
        self.cache.commit_fill(&key, &partial)
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
        if self.cache.contains(location.as_ref()) {
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
        let cache = Cache::open(dir.path(), 10, "s3://b/p").expect("open");
        cache.insert("data/1/a.parquet", b"aaaa").expect("a");
        cache.insert("data/1/b.parquet", b"bbbb").expect("b");
        assert!(cache.path("data/1/a.parquet", 4).is_some(), "a is used after b");
        cache.insert("data/2/c.parquet", b"cccc").expect("c");
        assert!(cache.path("data/1/b.parquet", 4).is_none(), "b was the least recently used");
        assert!(cache.path("data/1/a.parquet", 4).is_some());
        assert!(!dir.path().join("data/1/b.parquet").exists(), "evicted copies are deleted");
        assert_eq!(cache.stats().bytes, 8);
        cache.insert("data/big.parquet", &[0u8; 11]).expect("too large is skipped");
        assert!(cache.path("data/big.parquet", 11).is_none());

        std::fs::write(dir.path().join("data/2/d.parquet.1.partial"), b"half").expect("partial");
        std::fs::write(dir.path().join("data/2/notes.txt"), b"not ours").expect("other file");
        drop(cache);
        let reopened = Cache::open(dir.path(), 10, "s3://b/p").expect("reopen");
        assert_eq!(reopened.stats().files, 2, "only Parquet copies are indexed");
        assert!(reopened.path("data/2/c.parquet", 4).is_some());
        assert!(!dir.path().join("data/2/d.parquet.1.partial").exists(), "partials are removed");
        // A copy of the wrong size (cut short) is a miss, and is deleted.
        assert!(reopened.path("data/1/a.parquet", 5).is_none());
        assert!(!dir.path().join("data/1/a.parquet").exists());
        reopened.remove("data/2/c.parquet");
        assert!(reopened.path("data/2/c.parquet", 4).is_none());
        assert_eq!(reopened.stats().bytes, 0);
        assert!(dir.path().join("data/2/notes.txt").exists(), "other files are left alone");
        drop(reopened);

        // Another store's cache is emptied; a directory with data/ but no marker is refused.
        let other = Cache::open(dir.path(), 10, "s3://other/p").expect("other store");
        assert_eq!(other.stats().files, 0);
        assert!(!dir.path().join("data").exists());
        let objects = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(objects.path().join("data/1")).expect("mkdir");
        let refused = Cache::open(objects.path(), 10, "s3://b/p").expect_err("not a cache");
        assert!(refused.to_string().contains("not a cache"), "{refused}");
    }

    #[test]
    fn one_download_at_a_time_per_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 100, "s3://b/p").expect("open");
        assert!(cache.begin_fill("data/x.parquet", 5));
        assert!(!cache.begin_fill("data/x.parquet", 5), "already being downloaded");
        assert!(!cache.begin_fill("data/y.parquet", 101), "larger than the cache");
        assert!(!cache.begin_fill("data/y.parquet", 0), "remembered as too large");
        std::fs::create_dir_all(dir.path().join("data")).expect("mkdir");
        let partial = cache.partial_path("data/x.parquet");
        assert_ne!(partial, cache.partial_path("data/x.parquet"), "partial names are unique");
        std::fs::write(&partial, b"12345").expect("write");
        cache.commit_fill("data/x.parquet", &partial).expect("commit");
        assert!(!cache.begin_fill("data/x.parquet", 5), "cached");
        assert!(cache.path("data/x.parquet", 5).is_some());
    }
}
