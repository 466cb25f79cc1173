//! Schema changes outside the write path: `CREATE DATABASE`, `CREATE TABLE`, and drops. A drop
//! holds the write gate exclusively, commits a manifest op carrying the last applied sequence
//! number (replay skips the table's rows up to it), removes the table from the catalog and the
//! live state, then frees its buffer and deletes its files.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use super::{CommittedWrite, Engine, Error, TableData, TableKey};
use crate::catalog::{self, Column, TableSchema};
use crate::persist::manifest::Op;

impl Engine {
    /// Creates a database explicitly (a write creates it implicitly). `false` if it existed.
    pub async fn create_database(&self, db: &str) -> Result<bool, Error> {
        self.create_database_with(db, None).await
    }

    /// Creates a database with a retention, in one commit. `false` (and the database left as
    /// it is) if it existed.
    pub async fn create_database_with(
        &self,
        db: &str,
        retention: Option<crate::catalog::Retention>,
    ) -> Result<bool, Error> {
        catalog::check_object_name("database", db).map_err(|reason| Error::InvalidName {
            what: "database",
            name: db.into(),
            reason,
        })?;
        if self.catalog().has_database(db) {
            return Ok(false);
        }
        let _gate = self.write_gate.read().await;
        let mut manifest = self.manifest.lock().await;
        if self.catalog().has_database(db) {
            return Ok(false);
        }
        let mut ops = vec![Op::CreateDatabase { database: db.to_string() }];
        if retention.is_some() {
            ops.push(Op::SetRetention { database: db.to_string(), table: None, retention });
        }
        manifest.commit(ops).await.map_err(crate::persist::Error::from)?;
        let _guard = self.schema_lock.lock().expect("schema lock");
        let mut catalog = self.catalog().as_ref().clone();
        catalog.create_database(db);
        catalog.set_retention(db, None, retention);
        *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        Ok(true)
    }

    /// Declares a table before any row is written (`CREATE TABLE`); `false` if it existed and
    /// `if_not_exists`. Its columns are recorded in the manifest, so they outlive the WAL.
    pub async fn create_table(
        &self,
        db: &str,
        table: &str,
        columns: Vec<Column>,
        if_not_exists: bool,
    ) -> Result<bool, Error> {
        let invalid = |what: &'static str, name: &str, reason: catalog::Error| Error::InvalidName {
            what,
            name: name.into(),
            reason,
        };
        catalog::check_object_name("database", db).map_err(|r| invalid("database", db, r))?;
        catalog::check_object_name("table", table).map_err(|r| invalid("table", table, r))?;
        let _gate = self.write_gate.read().await;
        if !self.catalog().has_database(db) {
            return Err(Error::DatabaseNotFound(db.into()));
        }
        // Install the table first, atomically with the check, so a concurrent line-protocol
        // write either sees the declared columns or created the table first (and we stop).
        {
            let _guard = self.schema_lock.lock().expect("schema lock");
            if self.catalog().view(db, table).is_some() {
                return Err(Error::TableExists(table.into()));
            }
            if self.catalog().table(db, table).is_some() {
                return if if_not_exists {
                    Ok(false)
                } else {
                    Err(Error::TableExists(table.into()))
                };
            }
            let mut catalog = self.catalog().as_ref().clone();
            catalog.put_table(db, TableSchema::new(table, columns.clone()));
            self.tables
                .write()
                .expect("tables lock")
                .entry((db.to_string(), table.to_string()))
                .or_default();
            *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        }
        // Then make it durable. Should this fail, the table lives until restart, and rows
        // written to it meanwhile are in the WAL, which recreates it from their lines.
        let op = Op::CreateTable { database: db.into(), table: table.into(), columns };
        self.manifest.lock().await.commit(vec![op]).await.map_err(crate::persist::Error::from)?;
        Ok(true)
    }

    /// Records a materialized view (`views` has checked its definition). `false` if a view of
    /// that name exists; an error if a table does. Holds the write gate exclusively, so no
    /// write creates a table of the name meanwhile.
    pub async fn create_view(&self, db: &str, name: &str, sql: &str) -> Result<bool, Error> {
        catalog::check_object_name("view", name).map_err(|reason| Error::InvalidName {
            what: "view",
            name: name.into(),
            reason,
        })?;
        let _gate = self.write_gate.write().await;
        if !self.catalog().has_database(db) {
            return Err(Error::DatabaseNotFound(db.into()));
        }
        if self.catalog().table(db, name).is_some() {
            return Err(Error::TableExists(name.into()));
        }
        if self.catalog().view(db, name).is_some() {
            return Ok(false);
        }
        let mut manifest = self.manifest.lock().await;
        let op = Op::CreateView { database: db.into(), view: name.into(), sql: sql.into() };
        manifest.commit(vec![op]).await.map_err(crate::persist::Error::from)?;
        let id = manifest.state().databases.get(db).and_then(|d| d.views.get(name)).map(|v| v.id);
        let _guard = self.schema_lock.lock().expect("schema lock");
        let mut catalog = self.catalog().as_ref().clone();
        let spec = catalog::ViewSpec { name: name.into(), id: id.unwrap_or(0), sql: sql.into() };
        catalog.put_view(db, spec);
        *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        Ok(true)
    }

    /// Drops a materialized view; `false` if there was none.
    pub async fn drop_view(&self, db: &str, name: &str) -> Result<bool, Error> {
        let _gate = self.write_gate.write().await;
        if self.catalog().view(db, name).is_none() {
            return Ok(false);
        }
        let mut manifest = self.manifest.lock().await;
        let op = Op::DropView { database: db.into(), view: name.into() };
        manifest.commit(vec![op]).await.map_err(crate::persist::Error::from)?;
        let _guard = self.schema_lock.lock().expect("schema lock");
        let mut catalog = self.catalog().as_ref().clone();
        catalog.drop_view(db, name);
        *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        Ok(true)
    }

    /// Drops a table: once this returns its rows, buffered or in files, are gone for good and
    /// a later write creates it afresh. `false` if it did not exist.
    pub async fn drop_table(&self, db: &str, table: &str) -> Result<bool, Error> {
        // Exclusive: every earlier write is applied (its rows are in the buffer, below `seq`),
        // and none starts until the drop is recorded and the table removed.
        let _gate = self.write_gate.write().await;
        if self.catalog().table(db, table).is_none() {
            return Ok(false);
        }
        let seq = self.applied_seq.load(Ordering::Acquire);
        let op = Op::DropTable { database: db.into(), table: table.into(), seq };
        let removed = self.commit_drop(op, db, Some(table)).await?;
        self.discard(removed).await;
        Ok(true)
    }

    /// Drops a database and every table in it. `false` if it did not exist.
    pub async fn drop_database(&self, db: &str) -> Result<bool, Error> {
        let _gate = self.write_gate.write().await;
        if !self.catalog().has_database(db) {
            return Ok(false);
        }
        let seq = self.applied_seq.load(Ordering::Acquire);
        let removed =
            self.commit_drop(Op::DropDatabase { database: db.into(), seq }, db, None).await?;
        self.discard(removed).await;
        Ok(true)
    }

    /// Records a drop in the manifest, then removes the table (or, with `None`, every table of
    /// the database) from the catalog and the live state, under the manifest lock: a persist
    /// racing the drop checks, under that lock, that its table is still the live one.
    async fn commit_drop(
        &self,
        op: Op,
        db: &str,
        table: Option<&str>,
    ) -> Result<Vec<Arc<RwLock<TableData>>>, Error> {
        let mut manifest = self.manifest.lock().await;
        manifest.commit(vec![op]).await.map_err(crate::persist::Error::from)?;
        let _guard = self.schema_lock.lock().expect("schema lock");
        let mut catalog = self.catalog().as_ref().clone();
        match table {
            Some(table) => catalog.drop_table(db, table),
            None => catalog.drop_database(db),
        };
        let mut tables = self.tables.write().expect("tables lock");
        let doomed: Vec<TableKey> = tables
            .keys()
            .filter(|(d, t)| d == db && table.is_none_or(|name| name == t))
            .cloned()
            .collect();
        let removed = doomed.iter().filter_map(|key| tables.remove(key)).collect();
        // Subscribers (views) forget the tables' rows before queries stop seeing them, so no
        // query reads what a view kept of a table that is gone.
        let subscribers = self.subscribers.read().expect("subscribers lock");
        if !subscribers.is_empty() {
            let dropped = CommittedWrite {
                database: db,
                seq: self.applied_seq.load(Ordering::Acquire),
                tables: Vec::new(),
                dropped: doomed.iter().map(|(_, t)| t.as_str()).collect(),
            };
            for subscriber in subscribers.iter() {
                subscriber(&dropped);
            }
        }
        drop(subscribers);
        *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        Ok(removed)
    }

    /// Frees the buffers of dropped tables and deletes their files (a file left behind by a
    /// failed delete is named by no manifest, so nothing reads it).
    async fn discard(&self, removed: Vec<Arc<RwLock<TableData>>>) {
        let mut paths = Vec::new();
        for data in removed {
            let mut data = data.write().expect("table lock");
            data.dropped = true;
            self.buffered_bytes.fetch_sub(data.buffer.bytes(), Ordering::Relaxed);
            paths.extend(data.files.iter().map(|f| crate::persist::location(f)));
        }
        for path in paths {
            if let Err(error) = crate::persist::delete_file(&self.store, &path).await {
                tracing::warn!(%error, %path, "deleting a dropped table's file failed");
            }
        }
        if let Ok(wal) = self.wal() {
            if let Err(error) = wal.remove_segments_below(self.min_unpersisted_seq()) {
                tracing::warn!(%error, "removing wal segments failed");
            }
        }
    }
}
