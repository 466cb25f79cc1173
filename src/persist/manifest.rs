//! The manifest: an append-only log of numbered commits in the object store, each created only
//! if absent (so a commit number is taken once, on a local directory and on S3 alike), plus a
//! checkpoint of the whole state every `CHECKPOINT_EVERY` commits. It says which databases and
//! tables exist, each table's columns, and which Parquet files make up each table. Layout and
//! JSON shapes: `storage-format/manifest.md`.

use std::collections::BTreeMap;

use bytes::Bytes;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::store::{Created, Store};
use crate::catalog::{Column, ParquetFile, Retention};

pub const FORMAT_VERSION: u32 = 1;
pub const CHECKPOINT_EVERY: u64 = 100;
const LOG_DIR: &str = "manifest/log";
const CHECKPOINT_DIR: &str = "manifest/checkpoint";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] super::store::Error),
    #[error("manifest {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
    #[error("manifest commit {number} already exists: another server is writing to this store")]
    Fenced { number: u64 },
    /// The store refused the create (409 while another request for it was in flight, or an
    /// earlier attempt of ours that landed late): the next commit clears it and tries again.
    #[error("manifest commit {number}: the store reported a conflicting write; it is retried")]
    Conflict { number: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableState {
    /// Assigned when the table first appears in the manifest; names its files' directory.
    /// A table dropped and written again is a new table with a new id.
    #[serde(default)]
    pub id: u64,
    pub columns: Vec<Column>,
    pub files: Vec<ParquetFile>,
    /// The table's own retention (`None`: its database's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Rows below this time (ns) were expired by retention: replay skips them and writes
    /// below it are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_before_ns: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatabaseState {
    /// Assigned like a table's id.
    #[serde(default)]
    pub id: u64,
    pub tables: BTreeMap<String, TableState>,
    /// Tables dropped, with the WAL sequence number of the drop: replay skips their rows up to it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped_tables: BTreeMap<String, u64>,
    /// Materialized views by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub views: BTreeMap<String, ViewState>,
    /// The database's retention (`None`: forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

/// A materialized view: its id (from the same sequence as tables', never reused, so a view
/// dropped and created again under its name is a new view) and its definition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ViewState {
    pub id: u64,
    /// The whole `CREATE MATERIALIZED VIEW` statement, as accepted.
    pub sql: String,
}

/// Everything the manifest says, as of one commit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// Number of the last commit applied (0: none).
    pub commit: u64,
    /// Highest WAL sequence number whose rows any commit recorded.
    pub wal_seq: u64,
    pub databases: BTreeMap<String, DatabaseState>,
    /// The time partition width every file of this store was written with, fixed by the first
    /// start (`None` in stores that predate it, until their next start records it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_ns: Option<i64>,
    /// The next database or table id (ids are never reused; 0 means none assigned yet).
    #[serde(default)]
    pub next_id: u64,
    /// Databases dropped, with the WAL sequence number of the drop.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped_databases: BTreeMap<String, u64>,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    CreateDatabase {
        database: String,
    },
    /// A table declared with `CREATE TABLE` before any row was written.
    CreateTable {
        database: String,
        table: String,
        columns: Vec<Column>,
    },
    /// A partition of a table was written to `file`; `columns` is the table's schema then.
    AddFile {
        database: String,
        table: String,
        columns: Vec<Column>,
        file: ParquetFile,
    },
    /// `DROP TABLE`: the table and its files are gone, and so are its WAL rows up to `seq`.
    DropTable {
        database: String,
        table: String,
        seq: u64,
    },
    /// The store's time partition width, recorded once by the first start.
    SetPartitionDuration {
        partition_ns: i64,
    },
    /// `DROP DATABASE`: every table of it, as `DropTable` each.
    DropDatabase {
        database: String,
        seq: u64,
    },
    /// `CREATE MATERIALIZED VIEW`: `sql` is the statement as accepted.
    CreateView {
        database: String,
        view: String,
        sql: String,
    },
    /// `DROP MATERIALIZED VIEW`.
    DropView {
        database: String,
        view: String,
    },
    /// Compaction: the files of a table at the paths `removed` are replaced by `added`, which
    /// hold the same rows (keys merged). The removed files are deleted only later.
    ReplaceFiles {
        database: String,
        table: String,
        removed: Vec<String>,
        added: Vec<ParquetFile>,
    },
    /// A database's retention (`table` absent) or a table's; `None` clears it (a database
    /// keeps rows forever, a table follows its database).
    SetRetention {
        database: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table: Option<String>,
        retention: Option<Retention>,
    },
    /// Retention: the table's rows below `before_ns` are gone, and so are the files at the
    /// paths `removed` (every row of them is below it). Deleted from the store only later.
    Expire {
        database: String,
        table: String,
        before_ns: i64,
        removed: Vec<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Commit {
    format: u32,
    commit: u64,
    /// A random id of the server process that wrote the commit, so that it can tell its own
    /// commit (a put retried after a lost response) from another server's. Absent in commits
    /// written before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    writer: Option<String>,
    ops: Vec<Op>,
}

impl State {
    /// The sequence number up to which WAL rows of `table` are gone (dropped); 0 if none.
    pub fn dropped_seq(&self, database: &str, table: &str) -> u64 {
        let db = self.dropped_databases.get(database).copied().unwrap_or(0);
        let table = self
            .databases
            .get(database)
            .and_then(|d| d.dropped_tables.get(table))
            .copied()
            .unwrap_or(0);
        db.max(table)
    }

    /// The id of a table the manifest knows.
    pub fn table_id(&self, database: &str, table: &str) -> Option<(u64, u64)> {
        let db = self.databases.get(database)?;
        Some((db.id, db.tables.get(table)?.id))
    }

    fn new_id(&mut self) -> u64 {
        self.next_id = self.next_id.max(1);
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Gives ids to databases and tables that have none (a checkpoint written before ids
    /// existed), in name order, so every load of the same store assigns the same ones.
    fn assign_missing_ids(&mut self) {
        let mut next = self.next_id.max(1);
        for db in self.databases.values_mut() {
            for id in std::iter::once(&mut db.id).chain(db.tables.values_mut().map(|t| &mut t.id)) {
                if *id == 0 {
                    *id = next;
                    next += 1;
                }
            }
        }
        self.next_id = next;
    }

    fn database(&mut self, database: &str) -> &mut DatabaseState {
        if !self.databases.contains_key(database) {
            let id = self.new_id();
            self.databases.insert(database.to_string(), DatabaseState { id, ..Default::default() });
        }
        self.databases.get_mut(database).expect("inserted above")
    }

    fn table(&mut self, database: &str, table: &str) -> &mut TableState {
        if self.databases.get(database).is_none_or(|db| !db.tables.contains_key(table)) {
            let id = self.new_id();
            let state = TableState { id, ..Default::default() };
            self.database(database).tables.insert(table.to_string(), state);
        }
        self.database(database).tables.get_mut(table).expect("inserted above")
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::CreateDatabase { database } => {
                self.database(database);
            }
            Op::CreateTable { database, table, columns } => {
                let table = self.table(database, table);
                if table.columns.is_empty() {
                    table.columns = columns.clone();
                }
            }
            Op::AddFile { database, table, columns, file } => {
                let table = self.table(database, table);
                table.columns = columns.clone();
                table.files.push(file.clone());
                self.wal_seq = self.wal_seq.max(file.max_seq);
            }
            Op::DropTable { database, table, seq } => {
                // The database existed when its table was dropped, even if it was created by
                // a write no earlier commit named.
                let db = self.database(database);
                db.tables.remove(table);
                db.dropped_tables.insert(table.clone(), *seq);
                self.wal_seq = self.wal_seq.max(*seq);
            }
            Op::SetPartitionDuration { partition_ns } => {
                self.partition_ns = Some(*partition_ns);
            }
            Op::DropDatabase { database, seq } => {
                self.databases.remove(database);
                self.dropped_databases.insert(database.clone(), *seq);
                self.wal_seq = self.wal_seq.max(*seq);
            }
            Op::CreateView { database, view, sql } => {
                self.database(database);
                let id = self.new_id();
                let db = self.database(database);
                db.views.insert(view.clone(), ViewState { id, sql: sql.clone() });
            }
            Op::DropView { database, view } => {
                if let Some(db) = self.databases.get_mut(database) {
                    db.views.remove(view);
                }
            }
            Op::ReplaceFiles { database, table, removed, added } => {
                let Some(state) =
                    self.databases.get_mut(database).and_then(|db| db.tables.get_mut(table))
                else {
                    return;
                };
                state.files.retain(|f| !removed.contains(&f.path));
                state.files.extend(added.iter().cloned());
                let max_seq = added.iter().map(|f| f.max_seq).max().unwrap_or(0);
                self.wal_seq = self.wal_seq.max(max_seq);
            }
            Op::SetRetention { database, table: None, retention } => {
                self.database(database).retention = *retention;
            }
            Op::SetRetention { database, table: Some(table), retention } => {
                self.table(database, table).retention = *retention;
            }
            Op::Expire { database, table, before_ns, removed } => {
                let Some(state) =
                    self.databases.get_mut(database).and_then(|db| db.tables.get_mut(table))
                else {
                    return;
                };
                state.files.retain(|f| !removed.contains(&f.path));
                state.expired_before_ns = state.expired_before_ns.max(Some(*before_ns));
            }
        }
    }
}

fn log_path(number: u64) -> Path {
    Path::from(format!("{LOG_DIR}/{number:020}.json"))
}

fn checkpoint_path(number: u64) -> Path {
    Path::from(format!("{CHECKPOINT_DIR}/{number:020}.json"))
}

fn number_of(path: &Path) -> Option<u64> {
    path.filename()?.strip_suffix(".json")?.parse().ok()
}

fn invalid(path: &Path, reason: impl ToString) -> Error {
    Error::Invalid { path: path.to_string(), reason: reason.to_string() }
}

/// The writer of the manifest; one per server.
pub struct Manifest {
    store: Store,
    state: State,
    /// A commit whose put failed after the object may have been created (its sync failed):
    /// the number and bytes. The next commit removes it if it is there and ours, so one failed
    /// sync does not make every later commit find its number taken (and call itself fenced).
    uncertain: Option<(u64, Bytes)>,
    /// This process's writer id (`Commit::writer`).
    writer: String,
    /// Cancelled once a commit found its number taken by another writer: every later commit
    /// fails at once, and the server stops (`fenced`).
    fenced: tokio_util::sync::CancellationToken,
}

impl Manifest {
    /// Loads the newest checkpoint and every commit after it.
    pub async fn load(store: Store) -> Result<Manifest, Error> {
        let mut state = State { format: FORMAT_VERSION, ..Default::default() };
        let checkpoints = store.list(&Path::from(CHECKPOINT_DIR)).await?;
        if let Some(path) =
            checkpoints.iter().filter(|p| number_of(p).is_some()).max_by_key(|p| number_of(p))
        {
            let bytes = store.get(path).await?;
            state = serde_json::from_slice(&bytes).map_err(|e| invalid(path, e))?;
            if state.format != FORMAT_VERSION {
                return Err(invalid(path, format!("unsupported format {}", state.format)));
            }
            state.assign_missing_ids();
        }
        let commits = store.list(&Path::from(LOG_DIR)).await?;
        for path in commits {
            let Some(number) = number_of(&path) else { continue };
            if number <= state.commit {
                continue;
            }
            if number != state.commit + 1 {
                return Err(invalid(&path, format!("commit {} is missing", state.commit + 1)));
            }
            let bytes = store.get(&path).await?;
            let commit: Commit = serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e))?;
            if commit.format != FORMAT_VERSION || commit.commit != number {
                return Err(invalid(&path, "format or commit number does not match"));
            }
            for op in &commit.ops {
                state.apply(op);
            }
            state.commit = number;
        }
        let nonce = crate::random_bytes::<8>();
        Ok(Manifest {
            store,
            state,
            uncertain: None,
            writer: hex::encode(nonce),
            fenced: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Cancelled when another server has committed to this store (this one is fenced).
    pub fn fenced(&self) -> tokio_util::sync::CancellationToken {
        self.fenced.clone()
    }

    fn fence(&self, number: u64) -> Error {
        if !self.fenced.is_cancelled() {
            tracing::error!(
                commit = number,
                store = %self.store.display,
                "another server committed to this object store: this server is fenced and stops; \
                 its acknowledged writes stay in its WAL and persist when it is started alone"
            );
            self.fenced.cancel();
        }
        Error::Fenced { number }
    }

    /// Fails once this server is fenced, so that it writes nothing more to the store.
    pub fn check_fenced(&self) -> Result<(), Error> {
        match self.fenced.is_cancelled() {
            true => Err(Error::Fenced { number: self.state.commit + 1 }),
            false => Ok(()),
        }
    }

    /// Whether a commit object was written by this process (its writer id is ours).
    fn written_by_us(&self, found: &[u8]) -> bool {
        let writer = serde_json::from_slice::<Commit>(found).ok().and_then(|c| c.writer);
        writer.as_deref() == Some(self.writer.as_str())
    }

    /// Removes the object a failed commit `number` may have left, if it holds exactly what that
    /// commit wrote; another writer's commit there means this server is fenced.
    async fn clear_uncertain(&mut self, number: u64) -> Result<(), Error> {
        let Some((uncertain, bytes)) = self.uncertain.clone() else { return Ok(()) };
        if uncertain != number {
            self.uncertain = None;
            return Ok(());
        }
        let path = log_path(number);
        match self.store.get_if_exists(&path).await? {
            // Ours (these bytes, or a still earlier attempt that landed late): remove it.
            Some(found) if found == bytes || self.written_by_us(&found) => {
                self.store.delete(&path).await?
            }
            Some(_) => return Err(self.fence(number)),
            None => {}
        }
        self.uncertain = None;
        Ok(())
    }

    /// The ids of a table, recording it first (a `create_table` with `columns`) if no commit
    /// named it yet: a table's files are stored under its ids, so it needs them before its
    /// first file is written.
    pub async fn table_ids(
        &mut self,
        database: &str,
        table: &str,
        columns: &[Column],
    ) -> Result<(u64, u64), Error> {
        if let Some(ids) = self.state.table_id(database, table) {
            return Ok(ids);
        }
        let op = Op::CreateTable {
            database: database.into(),
            table: table.into(),
            columns: columns.to_vec(),
        };
        self.commit(vec![op]).await?;
        Ok(self.state.table_id(database, table).expect("just created"))
    }

    /// Durably records `ops` as the next commit. The caller serialises commits. A database
    /// that an op names and no earlier commit created (a write created it) is created first
    /// in the same commit, so the manifest knows every database any of its ops touched.
    pub async fn commit(&mut self, ops: Vec<Op>) -> Result<(), Error> {
        let mut created = Vec::new();
        for op in &ops {
            let database = match op {
                Op::CreateTable { database, .. }
                | Op::AddFile { database, .. }
                | Op::DropTable { database, .. }
                | Op::CreateView { database, .. }
                | Op::SetRetention { database, .. }
                | Op::Expire { database, .. } => database,
                Op::CreateDatabase { .. }
                | Op::DropDatabase { .. }
                | Op::DropView { .. }
                | Op::ReplaceFiles { .. }
                | Op::SetPartitionDuration { .. } => continue,
            };
            if !self.state.databases.contains_key(database) && !created.contains(database) {
                created.push(database.clone());
            }
        }
        let ops = created
            .into_iter()
            .map(|database| Op::CreateDatabase { database })
            .chain(ops)
            .collect();
        let number = self.state.commit + 1;
        self.check_fenced()?;
        self.clear_uncertain(number).await?;
        let commit = Commit {
            format: FORMAT_VERSION,
            commit: number,
            writer: Some(self.writer.clone()),
            ops,
        };
        let bytes = Bytes::from(serde_json::to_vec(&commit).expect("manifest types serialise"));
        match self.store.put_if_absent(&log_path(number), bytes.clone()).await {
            Ok(Created::Yes) => {}
            // Something is at `number`. The same bytes (writer id included): our own put,
            // which the client retried after a 5xx or a lost response, succeeded. Another
            // object of ours: an earlier attempt that landed late, or nothing there (a 409
            // while our own request was in flight): uncertain, cleared by the next commit.
            // Only another writer's commit fences this server.
            Ok(Created::AlreadyExists) => match self.store.get_if_exists(&log_path(number)).await {
                Ok(Some(found)) if found == bytes => {}
                Ok(Some(found)) if self.written_by_us(&found) => {
                    self.uncertain = Some((number, found));
                    return Err(Error::Conflict { number });
                }
                Ok(Some(_)) => return Err(self.fence(number)),
                Ok(None) => {
                    self.uncertain = Some((number, bytes));
                    return Err(Error::Conflict { number });
                }
                Err(error) => {
                    self.uncertain = Some((number, bytes));
                    return Err(error.into());
                }
            },
            Err(error) => {
                // Reported as failed; should it have reached the disk anyway, a restart reads
                // it as committed, which each op allows (a file named is a file written; a
                // drop reported failed may then have happened).
                self.uncertain = Some((number, bytes));
                return Err(error.into());
            }
        }
        for op in &commit.ops {
            self.state.apply(op);
        }
        self.state.commit = number;
        if number.is_multiple_of(CHECKPOINT_EVERY) {
            let bytes = serde_json::to_vec(&self.state).expect("manifest types serialise");
            // A failed checkpoint only makes the next start read more commits.
            if let Err(error) = self.store.put(&checkpoint_path(number), Bytes::from(bytes)).await {
                tracing::warn!(%error, "manifest checkpoint failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path) -> Store {
        let url = url::Url::from_directory_path(dir).expect("absolute");
        Store::open(url.as_str(), &Default::default()).expect("store")
    }

    /// Ids are assigned once and the same on every load, also for a checkpoint written before
    /// ids existed; a table dropped and recreated gets a new one; a commit that names a
    /// database a write created records the database first.
    #[tokio::test]
    async fn ids_are_stable_and_never_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let old_checkpoint = r#"{"format": 1, "commit": 100, "wal_seq": 7, "databases": {
            "b": {"tables": {"t": {"columns": [], "files": []}}},
            "a": {"tables": {"y": {"columns": [], "files": []}, "x": {"columns": [], "files": []}}}}}"#;
        store.put(&checkpoint_path(100), Bytes::from(old_checkpoint)).await.expect("checkpoint");

        let mut manifest = Manifest::load(store.clone()).await.expect("load");
        // Name order: a, a.x, a.y, b, b.t.
        assert_eq!(manifest.state().table_id("a", "x"), Some((1, 2)));
        assert_eq!(manifest.state().table_id("a", "y"), Some((1, 3)));
        assert_eq!(manifest.state().table_id("b", "t"), Some((4, 5)));
        assert_eq!(manifest.table_ids("new", "n", &[]).await.expect("ids"), (6, 7));
        manifest
            .commit(vec![Op::DropTable { database: "a".into(), table: "x".into(), seq: 9 }])
            .await
            .expect("drop");
        assert_eq!(manifest.table_ids("a", "x", &[]).await.expect("ids"), (1, 8), "a new table");
        let state = manifest.state().clone();

        let reloaded = Manifest::load(store).await.expect("reload");
        assert_eq!(reloaded.state(), &state);
        assert_eq!(reloaded.state().wal_seq, 9);
    }
}
