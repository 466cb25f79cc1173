//! The object store that holds Parquet files and the manifest, with the durability `object_store`
//! lacks on a local directory: its local `put` renames a staging file without syncing, so after
//! each put we sync the file and its directory ourselves. On S3 a completed PUT is durable.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

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
}

#[derive(Debug, Clone)]
pub struct Store {
    pub inner: Arc<dyn ObjectStore>,
    /// Root directory when the store is local (files must then be synced by us).
    local_root: Option<PathBuf>,
    /// The URL DataFusion knows this store by.
    pub datafusion_url: String,
}

/// What a create-if-absent put found.
pub enum Created {
    Yes,
    AlreadyExists,
}

impl Store {
    /// Opens `file:///abs/dir` (created if missing). Cloud schemes come with their features.
    pub fn open(url: &str) -> Result<Store, Error> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::BadUrl { url: url.into(), reason: e.to_string() })?;
        match parsed.scheme() {
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
                    datafusion_url: "sundial://store/".into(),
                })
            }
            other => Err(Error::BadUrl {
                url: url.into(),
                reason: format!("scheme \"{other}\" is not supported by this build (use file://)"),
            }),
        }
    }

    fn object_error(&self, op: &'static str, path: String, source: object_store::Error) -> Error {
        let mut reason = source.to_string();
        if let Some(root) = self.local_root.as_ref().and_then(|r| r.to_str()) {
            reason = reason.replace(root, "");
        }
        Error::ObjectStore { op, path, reason }
    }

    /// The root directory, when the store is a local one.
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.local_root.as_deref()
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

    /// Writes (or replaces) an object and returns only once it is durable.
    pub async fn put(&self, path: &Path, data: Bytes) -> Result<(), Error> {
        self.inner
            .put(path, PutPayload::from(data))
            .await
            .map_err(|source| self.object_error("put", path.to_string(), source))?;
        self.sync_local(path).await
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

    pub async fn get(&self, path: &Path) -> Result<Bytes, Error> {
        let result = self
            .inner
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
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.object_error("delete", path.to_string(), source)),
        }
    }

    /// Object names directly or indirectly under `prefix`, sorted.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<Path>, Error> {
        let mut names: Vec<Path> = self
            .inner
            .list(Some(prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(|source| self.object_error("list", prefix.to_string(), source))?;
        names.sort();
        Ok(names)
    }
}
