//! Retention: how long a database's (or one table's) rows live. A retention is a manifest op;
//! from the moment it is set, queries see no row older than the table's cutoff (now minus
//! its retention, `Catalog::cutoff`) and writes of such rows are refused line by line. The
//! "retention" job (`jobs`) then expires, per table, the files whose every row is below the
//! cutoff: one `expire` commit removes them from the manifest and raises the table's
//! expired-before mark, and they are deleted from the store after the compaction grace period
//! (queries that started before may still read them). Rows below the mark are gone for good:
//! lengthening the retention later does not bring them back, replay skips them, and writes
//! below it are refused. A file that straddles the cutoff stays until all of it is older.

use std::sync::Arc;
use std::time::Instant;

use super::{Engine, Error};
use crate::catalog::Retention;
use crate::persist::manifest::Op;

impl Engine {
    /// The time below which a table has no rows now (`None`: it keeps every row).
    pub fn cutoff(&self, db: &str, table: &str) -> Option<i64> {
        self.catalog().cutoff(db, table, self.clock().now_ns())
    }

    /// Sets a database's retention (`table` `None`) or a table's; `None` clears it (a database
    /// then keeps rows forever, a table follows its database). Takes effect on queries and
    /// writes at once; files are expired by the next run of the retention job, which this
    /// starts.
    pub async fn set_retention(
        &self,
        db: &str,
        table: Option<&str>,
        retention: Option<Retention>,
    ) -> Result<(), Error> {
        // Shared: a drop (exclusive) never runs between the check and the commit.
        let _gate = self.write_gate.read().await;
        if !self.catalog().has_database(db) {
            return Err(Error::DatabaseNotFound(db.into()));
        }
        if let Some(table) = table {
            if self.catalog().table(db, table).is_none() {
                return Err(Error::TableNotFound(table.into()));
            }
        }
        let mut manifest = self.manifest.lock().await;
        let op =
            Op::SetRetention { database: db.into(), table: table.map(str::to_string), retention };
        manifest.commit(vec![op]).await.map_err(crate::persist::Error::from)?;
        {
            let _guard = self.schema_lock.lock().expect("schema lock");
            let mut catalog = self.catalog().as_ref().clone();
            catalog.set_retention(db, table, retention);
            *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        }
        drop(manifest);
        self.retention_wakeup.notify_one();
        Ok(())
    }

    /// One run of the "retention" job: deletes expired (and compaction-replaced) files whose
    /// grace period is over, then expires, table by table, the files wholly below the table's
    /// cutoff. Returns how many files it expired; a table whose commit fails is tried again at
    /// the next run.
    pub(super) async fn expire_all(&self) -> usize {
        self.delete_replaced().await;
        let catalog = self.catalog();
        let mut expired = 0;
        for db in catalog.database_names() {
            for schema in catalog.tables(db) {
                // Only a hint: the cutoff that counts is read again under the manifest lock.
                if self.cutoff(db, &schema.name).is_none() {
                    continue;
                }
                match self.expire_table(db, &schema.name).await {
                    Ok(n) => expired += n,
                    Err(error) => tracing::warn!(
                        %error, db, table = %schema.name,
                        "expiring files failed; the next run tries again"
                    ),
                }
            }
        }
        expired
    }

    /// Expires a table's files whose rows are all below its cutoff, in one commit.
    async fn expire_table(&self, db: &str, table: &str) -> Result<usize, Error> {
        let Some(data) = self.table_data(db, table) else { return Ok(0) };
        let removed = {
            let mut manifest = self.manifest.lock().await;
            // Under the manifest lock, as persists, compactions and retention settings commit:
            // the table is still the live one, its retention is the one set last, and its
            // files are what they are now.
            if !self.table_data(db, table).is_some_and(|live| Arc::ptr_eq(&live, &data)) {
                return Ok(0);
            }
            let Some(cutoff) = self.cutoff(db, table) else { return Ok(0) };
            let removed: Vec<String> = {
                let guard = data.read().expect("table lock");
                guard
                    .files
                    .iter()
                    .filter(|f| f.max_time_ns < cutoff)
                    .map(|f| f.path.clone())
                    .collect()
            };
            if removed.is_empty() {
                return Ok(0);
            }
            let op = Op::Expire {
                database: db.into(),
                table: table.into(),
                before_ns: cutoff,
                removed: removed.clone(),
            };
            manifest.commit(vec![op]).await.map_err(crate::persist::Error::from)?;
            crate::crash_point("expire_after_commit");
            {
                let _guard = self.schema_lock.lock().expect("schema lock");
                let mut catalog = self.catalog().as_ref().clone();
                catalog.set_expired_before(db, table, cutoff);
                *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
            }
            let mut guard = data.write().expect("table lock");
            guard.files.retain(|f| !removed.contains(&f.path));
            // Below the mark now, for good: no longer lengthening the retention could show them.
            if let Some(cache) = guard.last.as_mut() {
                cache.values.forget_before(cutoff);
            }
            removed
        };
        let count = removed.len();
        tracing::info!(db, table, files = count, "expired files past the retention period");
        self.defer_delete(removed, Instant::now() + self.config.compaction.grace);
        Ok(count)
    }
}
