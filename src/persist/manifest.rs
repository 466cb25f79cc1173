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
use crate::catalog::{Column, ParquetFile};

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
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableState {
    pub columns: Vec<Column>,
    pub files: Vec<ParquetFile>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatabaseState {
    pub tables: BTreeMap<String, TableState>,
    /// Tables dropped, with the WAL sequence number of the drop: replay skips their rows up to it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped_tables: BTreeMap<String, u64>,
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
    /// `DROP DATABASE`: every table of it, as `DropTable` each.
    DropDatabase {
        database: String,
        seq: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Commit {
    format: u32,
    commit: u64,
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

    fn apply(&mut self, op: &Op) {
        match op {
            Op::CreateDatabase { database } => {
                self.databases.entry(database.clone()).or_default();
            }
            Op::CreateTable { database, table, columns } => {
                let table = self
                    .databases
                    .entry(database.clone())
                    .or_default()
                    .tables
                    .entry(table.clone())
                    .or_default();
                if table.columns.is_empty() {
                    table.columns = columns.clone();
                }
            }
            Op::AddFile { database, table, columns, file } => {
                let table = self
                    .databases
                    .entry(database.clone())
                    .or_default()
                    .tables
                    .entry(table.clone())
                    .or_default();
                table.columns = columns.clone();
                table.files.push(file.clone());
                self.wal_seq = self.wal_seq.max(file.max_seq);
            }
            Op::DropTable { database, table, seq } => {
                // The database existed when its table was dropped, even if it was created by
                // a write no earlier commit named.
                let db = self.databases.entry(database.clone()).or_default();
                db.tables.remove(table);
                db.dropped_tables.insert(table.clone(), *seq);
                self.wal_seq = self.wal_seq.max(*seq);
            }
            Op::DropDatabase { database, seq } => {
                self.databases.remove(database);
                self.dropped_databases.insert(database.clone(), *seq);
                self.wal_seq = self.wal_seq.max(*seq);
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
        Ok(Manifest { store, state })
    }

    pub fn state(&self) -> &State {
        &self.state
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
                | Op::DropTable { database, .. } => database,
                Op::CreateDatabase { .. } | Op::DropDatabase { .. } => continue,
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
        let commit = Commit { format: FORMAT_VERSION, commit: number, ops };
        let bytes = serde_json::to_vec(&commit).expect("manifest types serialise");
        match self.store.put_if_absent(&log_path(number), Bytes::from(bytes)).await? {
            Created::Yes => {}
            Created::AlreadyExists => return Err(Error::Fenced { number }),
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
