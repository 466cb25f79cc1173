//! The object store that holds Parquet files and the manifest: a local directory (the default)
//! or S3 and S3-compatible stores (MinIO, SeaweedFS, Ceph, R2).
//!
//! On a local directory it adds the durability `object_store` lacks: its local `put` renames a
//! staging file without syncing, so after each put we sync the file and its directory
//! ourselves. On S3 a completed PUT is durable. A remote store's Parquet files also go through
//! a local disk cache (`cache`): written through on persist, downloaded once on first read.
//!
//! Commits rely on create-if-absent (`PutMode::Create`, S3 `If-None-Match: *`): a remote store
//! is checked for it at start-up (`check_conditional_writes`), and one that ignores it is
//! refused, since two servers on one prefix could then both commit the same number.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::cache::{Cache, CachedStore};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

/// How a remote store is reached; each `None` leaves the setting to the `AWS_*` environment
/// variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ALLOW_HTTP`, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, …).
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: Option<bool>,
    pub virtual_hosted_style: Option<bool>,
    /// Where a remote store's files are cached, and how many bytes the cache may hold.
    pub cache_dir: Option<PathBuf>,
    pub cache_bytes_max: u64,
    /// One request's time limit (connecting has 5 s of it).
    pub request_timeout: Duration,
    /// Objects larger than this go to a remote store as multipart uploads (0: the default,
    /// `MULTIPART_FROM`).
    pub multipart_bytes: u64,
}

/// Requests that fail for a reason worth retrying (5xx, a dropped connection, a timeout) are
/// retried this often within this time, with jittered exponential backoff; beyond that the
/// caller sees the error (a persist then retries later, a query fails).
const RETRIES: usize = 4;
const RETRY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object store url \"{url}\": {reason}")]
    BadUrl { url: String, reason: String },
    /// `reason` is the object store's error with the local root cut out of it (errors reach
    /// clients, and the server's directories are none of their business).
    #[error("object store {op} {path}: {reason}")]
    ObjectStore { op: &'static str, path: String, reason: String },
    /// `path` is the object's path in the store (never the server's directory: errors reach
    /// clients).
    #[error("sync {path}: {source}")]
    Sync { path: String, source: std::io::Error },
    #[error("opening the cache directory: {reason}")]
    Cache { reason: String },
    #[error(
        "object store {store} accepted a second create-if-absent of one object: it does not \
         support conditional writes (If-None-Match), which manifest commits need to keep two \
         servers from both committing; use a store that does (AWS S3, MinIO, SeaweedFS ≥ 4.48, R2)"
    )]
    NoConditionalWrites { store: String },
}

/// Objects larger than this (unless `Options::multipart_bytes` says otherwise) go to a
/// remote store as multipart uploads, in parts of `MULTIPART_PART` (S3 wants at least 5 MiB
/// per part but the last).
pub const MULTIPART_FROM: u64 = 32 << 20;
const MULTIPART_PART: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct Store {
    pub inner: Arc<dyn ObjectStore>,
    /// Root directory when the store is local (files must then be synced by us).
    local_root: Option<PathBuf>,
    /// A remote store behind the disk cache of its Parquet files.
    cached: Option<Arc<CachedStore>>,
    /// The URL DataFusion knows this store by.
    pub datafusion_url: String,
    /// The store as the user named it, for messages (no credentials: those come from
    /// the environment).
    pub display: String,
    /// Objects above this many bytes are put in parts (remote stores).
    multipart_bytes: usize,
}

/// What a create-if-absent put found.
pub enum Created {
    Yes,
    AlreadyExists,
}

impl Store {
    /// Opens `file:///abs/dir` (created if missing) or `s3://bucket[/prefix]`.
    pub fn open(url: &str, options: &Options) -> Result<Store, Error> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::BadUrl { url: url.into(), reason: e.to_string() })?;
        match parsed.scheme() {
            "s3" => Store::open_s3(url, &parsed, options),
            "file" => {
                let root = parsed.to_file_path().map_err(|()| Error::BadUrl {
                    url: url.into(),
                    reason: "not an absolute local path".into(),
                })?;
                std::fs::create_dir_all(&root)
                    .map_err(|source| Error::Sync { path: root.display().to_string(), source })?;
                let fs = LocalFileSystem::new_with_prefix(&root).map_err(|source| {
                    Error::ObjectStore {
                        op: "open",
                        path: root.display().to_string(),
                        reason: source.to_string(),
                    }
                })?;
                Ok(Store {
                    inner: Arc::new(fs),
                    local_root: Some(root),
                    cached: None,
                    datafusion_url: "sundial://store/".into(),
                    display: url.into(),
                    multipart_bytes: usize::MAX,
                })
            }
            other => Err(Error::BadUrl {
                url: url.into(),
                reason: format!("scheme \"{other}\" is not supported (use file:// or s3://)"),
            }),
        }
    }

    fn open_s3(url: &str, parsed: &url::Url, options: &Options) -> Result<Store, Error> {
        let bad = |reason: String| Error::BadUrl { url: url.into(), reason };
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("no bucket (write s3://bucket/prefix)".into()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad("credentials do not go in the URL: use AWS_ACCESS_KEY_ID and \
                            AWS_SECRET_ACCESS_KEY"
                .into()));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("a query or fragment is not part of a store URL".into()));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_url(url)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: RETRIES,
                retry_timeout: RETRY_TIMEOUT,
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(options.request_timeout)
                    .with_connect_timeout(Duration::from_secs(5).min(options.request_timeout)),
            );
        if let Some(endpoint) = &options.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        }
        if let Some(allow) = options.allow_http {
            builder = builder.with_allow_http(allow);
        }
        if let Some(virtual_hosted) = options.virtual_hosted_style {
            builder = builder.with_virtual_hosted_style_request(virtual_hosted);
        }
        let s3 = builder.build().map_err(|e| bad(e.to_string()))?;
        let prefix = parsed.path().trim_matches('/');
        let prefix = Path::parse(prefix).map_err(|e| bad(format!("prefix: {e}")))?;
        let cache_dir = options
            .cache_dir
            .clone()
            .ok_or_else(|| bad("a remote store needs a cache directory".into()))?;
        // The cache is keyed by the store it caches: the URL, endpoint included.
        let identity = format!("{url} {}", options.endpoint.as_deref().unwrap_or(""));
        let cache = Cache::open(&cache_dir, options.cache_bytes_max, identity.trim_end())
            .map_err(|e| Error::Cache { reason: e.to_string() })?;
        let inner: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(s3, prefix));
        let cached = CachedStore::new(inner.clone(), Arc::new(cache))
            .map_err(|e| bad(format!("cache: {e}")))?;
        Ok(Store {
            inner,
            local_root: None,
            cached: Some(Arc::new(cached)),
            datafusion_url: "sundial://store/".into(),
            display: url.into(),
            multipart_bytes: usize::try_from(match options.multipart_bytes {
                0 => MULTIPART_FROM,
                n => n,
            })
            .unwrap_or(usize::MAX),
        })
    }

    /// Whether the store is remote (not a local directory).
    pub fn is_remote(&self) -> bool {
        self.local_root.is_none()
    }

    /// Checks that the store refuses a second create-if-absent of one object, which manifest
    /// commits rely on; a store that does not (an old MinIO, a proxy that drops the header)
    /// is refused with the reason. Also checks the store is reachable with these credentials.
    pub async fn check_conditional_writes(&self) -> Result<(), Error> {
        let nonce: u64 = rand_u64();
        let path = Path::from_iter(["_sundial", "probe", &format!("{nonce:016x}")]);
        let first = self.put_if_absent(&path, Bytes::from_static(b"1")).await?;
        let second = self.put_if_absent(&path, Bytes::from_static(b"2")).await;
        let _ = self.delete(&path).await;
        match (first, second?) {
            (Created::Yes, Created::AlreadyExists) => Ok(()),
            _ => Err(Error::NoConditionalWrites { store: self.display.clone() }),
        }
    }

    /// The local file that holds the object at `path`: in a local store, the object itself;
    /// in a remote one, its cached copy if there is one (a miss starts a background download,
    /// so that the next reader finds it).
    pub fn local_file(&self, path: &Path, bytes: u64) -> Option<PathBuf> {
        if let Some(root) = &self.local_root {
            return Some(root.join(path.as_ref()));
        }
        self.cached.as_ref()?.local_file(path, bytes)
    }

    /// The store queries read through: a remote store's cache in front of it.
    pub fn reader(&self) -> Arc<dyn ObjectStore> {
        match &self.cached {
            Some(cached) => cached.clone(),
            None => self.inner.clone(),
        }
    }

    /// Cache counters of a remote store.
    pub fn cache_stats(&self) -> Option<super::cache::Stats> {
        self.cached.as_ref().map(|cached| cached.cache().stats())
    }

    fn object_error(&self, op: &'static str, path: String, source: object_store::Error) -> Error {
        let mut reason = source.to_string();
        if let Some(root) = self.local_root.as_ref().and_then(|r| r.to_str()) {
            reason = reason.replace(root, "");
        }
        Error::ObjectStore { op, path, reason }
    }

    /// Syncs a local object and its directory, on a blocking thread (fsync can take long).
    async fn sync_local(&self, path: &Path) -> Result<(), Error> {
        let Some(root) = self.local_root.clone() else { return Ok(()) };
        let object = path.to_string();
        let synced = tokio::task::spawn_blocking(move || {
            let file = root.join(&object);
            let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
            let top = object.split('/').next().unwrap_or_default();
            crate::fault(&format!("store_sync_{top}"))?;
            sync(&file)?;
            sync(file.parent().unwrap_or(&root))
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        synced.map_err(|source| Error::Sync { path: path.to_string(), source })
    }

    /// Writes (or replaces) an object and returns only once it is durable. A Parquet file
    /// written to a remote store is also written to the cache (a failure there only costs a
    /// download later).
    pub async fn put(&self, path: &Path, data: Bytes) -> Result<(), Error> {
        if self.is_remote() && data.len() > self.multipart_bytes {
            // A large object (a compaction's output) goes up in parts, each its own request
            // under the request timeout, rather than as one body that a slow link never
            // finishes within it.
            self.put_in_parts(path, data.clone())
                .await
                .map_err(|source| self.object_error("put", path.to_string(), source))?;
        } else {
            self.inner
                .put(path, PutPayload::from(data.clone()))
                .await
                .map_err(|source| self.object_error("put", path.to_string(), source))?;
        }
        if let Some(cached) = self.cached.clone() {
            let path = path.clone();
            let _ = tokio::task::spawn_blocking(move || cached.write_through(&path, &data)).await;
        }
        self.sync_local(path).await
    }

    async fn put_in_parts(&self, path: &Path, data: Bytes) -> object_store::Result<()> {
        let upload = self.inner.put_multipart(path).await?;
        let mut parts = object_store::WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART);
        parts.put(data);
        parts.finish().await.map(|_| ())
    }

    /// Writes an object only if none exists at `path` (the commit primitive), durably.
    pub async fn put_if_absent(&self, path: &Path, data: Bytes) -> Result<Created, Error> {
        let options = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.inner.put_opts(path, PutPayload::from(data), options).await {
            Ok(_) => {
                self.sync_local(path).await?;
                Ok(Created::Yes)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::AlreadyExists),
            Err(source) => Err(self.object_error("put", path.to_string(), source)),
        }
    }

    /// Reads a whole object (a cached copy if there is one).
    pub async fn get(&self, path: &Path) -> Result<Bytes, Error> {
        let result = self
            .reader()
            .get(path)
            .await
            .map_err(|source| self.object_error("get", path.to_string(), source))?;
        result.bytes().await.map_err(|source| self.object_error("read", path.to_string(), source))
    }

    /// Reads an object; `None` if there is none.
    pub async fn get_if_exists(&self, path: &Path) -> Result<Option<Bytes>, Error> {
        match self.inner.get(path).await {
            Ok(result) => result
                .bytes()
                .await
                .map(Some)
                .map_err(|source| self.object_error("read", path.to_string(), source)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(self.object_error("get", path.to_string(), source)),
        }
    }

    /// Deletes an object; one that is already gone is not an error.
    pub async fn delete(&self, path: &Path) -> Result<(), Error> {
        if let Some(cached) = &self.cached {
            cached.cache().remove(path.as_ref());
        }
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.object_error("delete", path.to_string(), source)),
        }
    }

    /// Object names directly or indirectly under `prefix`, sorted.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<Path>, Error> {
        let mut names: Vec<Path> =
            self.list_meta(prefix).await?.into_iter().map(|meta| meta.location).collect();
        names.sort();
        Ok(names)
    }

    /// Objects under `prefix` with their sizes and modification times.
    pub async fn list_meta(&self, prefix: &Path) -> Result<Vec<object_store::ObjectMeta>, Error> {
        self.inner
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|source| self.object_error("list", prefix.to_string(), source))
    }
}

/// A random number for probe names (two servers probing at once must not collide).
fn rand_u64() -> u64 {
    u64::from_le_bytes(crate::random_bytes::<8>())
}
